//! The libvirt driver: VMs as libvirt domains, for hosts whose hypervisor an admin
//! already runs through libvirt (KVM/QEMU with `qemu:///system`, Xen with
//! `xen:///system`).
//!
//! It speaks to libvirt with `virsh` and domain XML (libvirt's stable interface), not
//! through the C library: the `mvc` binary then links no libvirt and needs none on the
//! hosts that only run edges or supernodes, the same code reaches local and remote
//! URIs, and what it does can be repeated by hand with the XML it leaves in the run
//! directory. docs/CONTROLLER.md says more.
//!
//! A domain is what the qemu driver starts, described to libvirt:
//! - name `<prefix><local name>` (the agent's `--ns-prefix`, then `c<cluster number>-<vm>`)
//!   and a `<metadata>` element naming the agent's state directory, so that a
//!   reconcile finds this agent's domains and leaves every other domain alone;
//! - `type='kvm'` when KVM is usable (on a local URI: `/dev/kvm` open to qemu's group
//!   and a KVM guest starts; on a remote one: libvirt's capabilities offer it), TCG
//!   (`type='qemu'`) otherwise and, for good, once a KVM domain does not start;
//!   `type='xen'` on Xen URIs;
//! - direct kernel boot of the guest [`super::guest`] builds (copied beside the sockets:
//!   libvirt hands the files to the qemu user, which must not change the cache);
//! - `<interface type='bridge'>` on the cluster bridge with the allocated MAC and the
//!   TAP name the agent saved for the VM;
//! - the disk as an NBD network disk, `xnbd serve` of the VM's image on a Unix socket;
//! - the serial console on a Unix socket, logged (by libvirt's virtlogd) to
//!   `<run>/<local>.console.log`: the lease (`MVC-LEASE`) is read from the log and
//!   `ping` runs through the socket, as with the qemu driver.
//!
//! `start` defines and starts the domain, `stop` destroys and undefines it (the disk
//! stays until the cluster is released: [`VmDriver::discard`]), `alive` asks
//! `virsh domstate`. The sockets and boot copies live in a directory the qemu user's
//! group may enter (`/run/mvc/libvirt` by default): the agent's state directory is
//! private to root.
use super::guest::BootFiles;
use super::qemu::{console_run, parse_lease, MAX_SOCK_PATH};
use super::VmDriver;
use super::{link_exists, parse_ping_avg, DriverError, QemuConfig, QemuDriver, RunningVm};
use crate::model::Role;
use crate::process::{kill_pidfile, pidfile_alive, run, spawn, stop_child};
use crate::proto::VmSpec;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

/// XML namespace of the driver's `<metadata>` element.
pub const METADATA_NS: &str = "urn:mvc:libvirt:1";

/// Configuration of the [`LibvirtDriver`].
#[derive(Clone, Debug)]
pub struct LibvirtConfig {
    /// Connection URI (`qemu:///system`, `xen:///system`, `qemu+ssh://host/system`).
    pub uri: String,
    /// Prefix of domain names (the agent's `--ns-prefix`).
    pub prefix: String,
    /// Who owns the domains: the agent's state directory, written in each domain's
    /// metadata.
    pub owner: String,
    /// Directory of the NBD and console sockets and the boot file copies.
    pub sock_dir: PathBuf,
    /// Group the hypervisor's processes run as (may use the sockets); none: root only.
    pub group: Option<String>,
    /// Disks, guest boot files, xnbd, vCPUs: as the qemu driver has them.
    pub vm: QemuConfig,
}

impl LibvirtConfig {
    /// Defaults for an agent state directory and domain name prefix: `qemu:///system`,
    /// sockets in `/run/mvc/libvirt`, group `libvirt-qemu` (Debian's qemu user).
    pub fn new(state_dir: &Path, prefix: &str) -> LibvirtConfig {
        LibvirtConfig {
            uri: "qemu:///system".into(),
            prefix: prefix.into(),
            owner: state_dir.display().to_string(),
            sock_dir: PathBuf::from("/run/mvc/libvirt"),
            group: Some("libvirt-qemu".into()),
            vm: QemuConfig::new(state_dir),
        }
    }
}

/// VMs as libvirt domains (see the module documentation).
pub struct LibvirtDriver {
    cfg: LibvirtConfig,
    /// Makes disks and boot files as the qemu driver does.
    disks: QemuDriver,
    domain_type: Option<&'static str>,
}

/// Files of one domain.
struct DomainFiles {
    xml: PathBuf,
    nbd: PathBuf,
    console: PathBuf,
    console_log: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
    xnbd_pid: PathBuf,
    xnbd_log: PathBuf,
    disk: PathBuf,
}

/// What a domain's XML says.
#[derive(Clone, Debug)]
pub struct DomainXml<'a> {
    /// Domain type: `kvm`, `qemu` (TCG) or `xen`.
    pub domain_type: &'a str,
    /// Domain name.
    pub name: &'a str,
    /// The VM as the controller asked for it.
    pub spec: &'a VmSpec,
    /// TAP device libvirt creates on the bridge (empty: libvirt names it).
    pub tap: &'a str,
    /// vCPUs.
    pub vcpus: u32,
    /// Kernel and initramfs.
    pub boot: &'a BootFiles,
    /// Extra kernel command line.
    pub append: &'a str,
    /// NBD socket of the disk (export named after the VM).
    pub nbd: &'a Path,
    /// Console socket and its log.
    pub console: &'a Path,
    /// Console log.
    pub console_log: &'a Path,
    /// The owning agent (metadata).
    pub owner: &'a str,
}

/// `s` with XML's special characters escaped (text and attribute values).
pub fn xml_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '\'' => o.push_str("&apos;"),
            '"' => o.push_str("&quot;"),
            c => o.push(c),
        }
    }
    o
}

impl DomainXml<'_> {
    /// The domain XML.
    pub fn render(&self) -> String {
        let e = |s: &str| xml_escape(s);
        let p = |p: &Path| xml_escape(&p.display().to_string());
        let s = self.spec;
        let mut cmdline = format!("console=ttyS0 panic=-1 loglevel=4 mvc.name={}", s.name);
        if !self.append.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(self.append);
        }
        // Xen's HVM guests take no machine type; QEMU's get q35 and the most capable
        // CPU model (`-cpu max`), as with the qemu driver.
        let (os_type, cpu) = if self.domain_type == "xen" {
            ("<type arch='x86_64'>hvm</type>", "")
        } else {
            (
                "<type arch='x86_64' machine='q35'>hvm</type>",
                "\n  <cpu mode='maximum'/>",
            )
        };
        format!(
            "<domain type='{dtype}'>
  <name>{name}</name>
  <metadata>
    <mvc:vm xmlns:mvc='{ns}' owner='{owner}' cluster='{cluster}' vm='{vm}'/>
  </metadata>
  <memory unit='MiB'>{mem}</memory>
  <vcpu>{vcpus}</vcpu>{cpu}
  <os>
    {os_type}
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <disk type='network' device='disk'>
      <driver name='qemu' type='raw'/>
      <source protocol='nbd' name='{vm}'>
        <host transport='unix' socket='{nbd}'/>
      </source>
      <target dev='vda' bus='virtio'/>
    </disk>
    <interface type='bridge'>
      <source bridge='{bridge}'/>
      <mac address='{mac}'/>
{tap}      <model type='virtio'/>
      <rom enabled='no'/>
    </interface>
    <serial type='unix'>
      <source mode='bind' path='{console}'/>
      <log file='{console_log}' append='off'/>
      <target port='0'/>
    </serial>
    <memballoon model='none'/>
  </devices>
</domain>
",
            dtype = e(self.domain_type),
            name = e(self.name),
            ns = METADATA_NS,
            owner = e(self.owner),
            cluster = e(&s.cluster),
            vm = e(&s.name),
            mem = s.memory_mb,
            vcpus = self.vcpus.max(1),
            kernel = p(&self.boot.kernel),
            initrd = p(&self.boot.initrd),
            cmdline = e(&cmdline),
            nbd = p(self.nbd),
            bridge = e(&s.bridge),
            mac = s.mac,
            tap = if self.tap.is_empty() {
                String::new()
            } else {
                format!("      <target dev='{}'/>\n", e(self.tap))
            },
            console = p(self.console),
            console_log = p(self.console_log),
        )
    }
}

/// The `owner` attribute of the driver's metadata element (`virsh metadata` output).
pub fn metadata_owner(xml: &str) -> Option<String> {
    let rest = xml.split("owner=").nth(1)?;
    let q = rest.chars().next().filter(|c| *c == '"' || *c == '\'')?;
    let v = rest[1..].split(q).next()?;
    Some(
        v.replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&amp;", "&"),
    )
}

/// The group id of `name` in `/etc/group`-formatted `text`.
fn group_id(text: &str, name: &str) -> Option<u32> {
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    })
}

impl LibvirtDriver {
    /// A driver with `cfg`.
    pub fn new(cfg: LibvirtConfig) -> LibvirtDriver {
        let disks = QemuDriver::new(cfg.vm.clone());
        LibvirtDriver {
            cfg,
            disks,
            domain_type: None,
        }
    }

    /// `virsh -c <uri> -q ARGS`.
    fn virsh(&self, args: &[&str]) -> Result<String, DriverError> {
        let mut a = vec!["-c", &self.cfg.uri, "-q"];
        a.extend_from_slice(args);
        Ok(run("virsh", &a)?)
    }

    /// Domain name of a VM with local name `local`.
    pub fn domain_name(&self, local: &str) -> String {
        format!("{}{local}", self.cfg.prefix)
    }

    fn files(&self, local: &str) -> DomainFiles {
        let dom = self.domain_name(local);
        let s = |ext: &str| self.cfg.sock_dir.join(format!("{dom}.{ext}"));
        let r = |ext: &str| self.cfg.vm.run_dir.join(format!("{local}.{ext}"));
        DomainFiles {
            xml: r("domain.xml"),
            nbd: s("nbd"),
            console: s("console"),
            console_log: r("console.log"),
            kernel: s("vmlinuz"),
            initrd: s("initrd"),
            xnbd_pid: r("xnbd.pid"),
            xnbd_log: r("xnbd.log"),
            disk: self.cfg.vm.disk_dir.join(format!("{local}.img")),
        }
    }

    /// `(tap, local)` of a handle `libvirt:<tap>:<local>`.
    fn parse_handle(handle: &str) -> Result<(&str, &str), DriverError> {
        handle
            .strip_prefix("libvirt:")
            .and_then(|h| h.split_once(':'))
            .filter(|(_, v)| !v.is_empty() && !v.contains('/'))
            .ok_or_else(|| DriverError::Config(format!("not a libvirt handle: {handle}")))
    }

    /// `kvm` when libvirt offers it, `qemu` (TCG) otherwise, `xen` on Xen URIs.
    fn domain_type(&mut self) -> &'static str {
        if let Some(t) = self.domain_type {
            return t;
        }
        let t = if self.cfg.uri.starts_with("xen") {
            "xen"
        } else if self.cfg.uri.starts_with("qemu:///") {
            // A local hypervisor: KVM when qemu's user may open /dev/kvm (Debian's
            // udev makes it 0660 root:kvm) and a KVM guest comes up at all.
            use std::os::unix::fs::PermissionsExt;
            let shared =
                std::fs::metadata("/dev/kvm").is_ok_and(|m| m.permissions().mode() & 0o066 != 0);
            if shared && QemuDriver::probe_accel(&self.cfg.vm.qemu) == "kvm" {
                "kvm"
            } else {
                "qemu"
            }
        } else {
            match self.virsh(&["capabilities"]) {
                Ok(caps) if caps.contains("<domain type='kvm'") => "kvm",
                _ => "qemu",
            }
        };
        tracing::info!(domain_type = t, uri = %self.cfg.uri, "libvirt domain type");
        self.domain_type = Some(t);
        t
    }

    /// The directory of sockets and boot copies: root and the hypervisor's group.
    fn ensure_sock_dir(&self) -> Result<Option<u32>, DriverError> {
        use std::os::unix::fs::PermissionsExt;
        let d = &self.cfg.sock_dir;
        let err = |e: std::io::Error| DriverError::Config(format!("{}: {e}", d.display()));
        std::fs::create_dir_all(d).map_err(err)?;
        let gid = match &self.cfg.group {
            None => None,
            Some(g) => {
                let id = group_id(
                    &std::fs::read_to_string("/etc/group").unwrap_or_default(),
                    g,
                );
                if id.is_none() {
                    tracing::warn!(
                        group = %g,
                        "no such group: the hypervisor must run as root to reach the VM sockets"
                    );
                }
                id
            }
        };
        std::os::unix::fs::chown(d, Some(0), gid).map_err(err)?;
        let mode = if gid.is_some() { 0o770 } else { 0o700 };
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        Ok(gid)
    }

    /// A copy of `src` at `dst` readable by the hypervisor.
    fn copy_boot_file(src: &Path, dst: &Path) -> Result<(), DriverError> {
        use std::os::unix::fs::PermissionsExt;
        let tmp = dst.with_extension("tmp");
        std::fs::copy(src, &tmp)
            .and_then(|_| std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o644)))
            .and_then(|()| std::fs::rename(&tmp, dst))
            .map_err(|e| {
                DriverError::Config(format!("{} -> {}: {e}", src.display(), dst.display()))
            })
    }

    fn domain_exists(&self, dom: &str) -> bool {
        self.virsh(&["domstate", dom]).is_ok()
    }

    /// Destroy and undefine `dom` when it exists.
    fn remove_domain(&self, dom: &str) {
        if !self.domain_exists(dom) {
            return;
        }
        if let Err(e) = self.virsh(&["destroy", dom]) {
            tracing::debug!(domain = dom, "virsh destroy: {e}");
        }
        if let Err(e) = self.virsh(&["undefine", dom]) {
            tracing::warn!(domain = dom, "virsh undefine: {e}");
        }
    }

    fn start_inner(
        &mut self,
        spec: &VmSpec,
        tap: &str,
        f: &DomainFiles,
        children: &mut Vec<std::process::Child>,
    ) -> Result<(), DriverError> {
        let dom = self.domain_name(spec.local());
        for s in [&f.nbd, &f.console] {
            if s.as_os_str().len() > MAX_SOCK_PATH {
                return Err(DriverError::Config(format!(
                    "socket path {} is longer than {MAX_SOCK_PATH} bytes (use a shorter --libvirt-sock-dir or --ns-prefix)",
                    s.display()
                )));
            }
            let _ = std::fs::remove_file(s);
        }
        let gid = self.ensure_sock_dir()?;
        std::fs::create_dir_all(&self.cfg.vm.run_dir)
            .map_err(|e| DriverError::Config(format!("{}: {e}", self.cfg.vm.run_dir.display())))?;
        let boot = self.disks.boot_files()?;
        Self::copy_boot_file(&boot.kernel, &f.kernel)?;
        Self::copy_boot_file(&boot.initrd, &f.initrd)?;
        self.disks.ensure_disk(&f.disk)?;
        let export = format!("{}={}", spec.name, f.disk.display());
        let nbd = f.nbd.display().to_string();
        let mut xnbd = spawn(
            &self.cfg.vm.xnbd.display().to_string(),
            &["serve", "--export", &export, "--unix", &nbd],
            &[],
            &f.xnbd_log,
        )?;
        let _ = std::fs::write(&f.xnbd_pid, xnbd.id().to_string());
        let waited = QemuDriver::wait_socket(&f.nbd, &mut xnbd, "xnbd serve", &f.xnbd_log);
        children.push(xnbd);
        waited?;
        {
            use std::os::unix::fs::PermissionsExt;
            let err = |e: std::io::Error| DriverError::Config(format!("{nbd}: {e}"));
            std::os::unix::fs::chown(&f.nbd, Some(0), gid).map_err(err)?;
            let mode = if gid.is_some() { 0o660 } else { 0o600 };
            std::fs::set_permissions(&f.nbd, std::fs::Permissions::from_mode(mode)).map_err(err)?;
        }
        let _ = std::fs::remove_file(&f.console_log);
        let boot = BootFiles {
            kernel: f.kernel.clone(),
            initrd: f.initrd.clone(),
        };
        let mut dtype = self.domain_type();
        loop {
            let xml = DomainXml {
                domain_type: dtype,
                name: &dom,
                spec,
                tap,
                vcpus: self.cfg.vm.vcpus,
                boot: &boot,
                append: &self.cfg.vm.append,
                nbd: &f.nbd,
                console: &f.console,
                console_log: &f.console_log,
                owner: &self.cfg.owner,
            }
            .render();
            std::fs::write(&f.xml, xml)
                .map_err(|e| DriverError::Config(format!("{}: {e}", f.xml.display())))?;
            self.virsh(&["define", &f.xml.display().to_string()])?;
            match self.virsh(&["start", &dom]) {
                Ok(_) => return Ok(()),
                Err(e) if dtype == "kvm" => {
                    // /dev/kvm may be listed but unusable (nested, no permission).
                    tracing::warn!(domain = %dom, "a KVM domain did not start ({e}): using TCG");
                    self.domain_type = Some("qemu");
                    dtype = "qemu";
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Everything of the VM `local` with TAP `tap`: domain, xnbd, sockets, copies.
    fn remove_all(&self, tap: &str, local: &str) {
        let f = self.files(local);
        self.remove_domain(&self.domain_name(local));
        kill_pidfile(&f.xnbd_pid, &f.nbd.display().to_string());
        for p in [&f.nbd, &f.console, &f.kernel, &f.initrd] {
            let _ = std::fs::remove_file(p);
        }
        // libvirt deletes the TAP with the domain; one left by a crash goes here.
        if !tap.is_empty() && link_exists(tap) {
            let _ = run("ip", &["link", "del", tap]);
        }
    }
}

impl VmDriver for LibvirtDriver {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn start(&mut self, spec: &VmSpec) -> Result<RunningVm, DriverError> {
        if spec.role == Role::Frontend {
            return Err(DriverError::Unsupported {
                driver: "libvirt",
                what: "the frontend VM (it runs dnsmasq; run the origin site's agent with --driver netns)",
            });
        }
        let bad = |s: &str| {
            s.is_empty()
                || s.contains(|c: char| {
                    !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                })
        };
        if bad(&spec.name) || bad(spec.local()) {
            return Err(DriverError::Config(format!(
                "VM name {} is not usable as a libvirt domain name",
                crate::validate::quote(spec.local())
            )));
        }
        let local = spec.local().to_string();
        // No NIC name saved for the VM: libvirt names the TAP and deletes it with the
        // domain.
        let tap = spec.nic.clone();
        // Leftovers of an earlier run of this VM.
        self.remove_all(&tap, &local);
        let f = self.files(&local);
        let mut children = Vec::new();
        match self.start_inner(spec, &tap, &f, &mut children) {
            Ok(()) => Ok(RunningVm {
                handle: format!("libvirt:{tap}:{local}"),
                children,
            }),
            Err(e) => {
                for c in &mut children {
                    stop_child(c);
                }
                self.remove_all(&tap, &local);
                Err(e)
            }
        }
    }

    fn stop(&mut self, vm: &mut RunningVm) -> Result<(), DriverError> {
        // The domain first: qemu still holds the disk's NBD connection.
        if let Ok((_, local)) = Self::parse_handle(&vm.handle) {
            self.remove_domain(&self.domain_name(local));
        }
        for c in &mut vm.children {
            stop_child(c);
        }
        vm.children.clear();
        self.cleanup(&vm.handle);
        Ok(())
    }

    fn cleanup(&mut self, handle: &str) {
        if let Ok((tap, local)) = Self::parse_handle(handle) {
            self.remove_all(tap, local);
        }
    }

    fn handle_for(&self, local: &str, nic: &str) -> String {
        format!("libvirt:{nic}:{local}")
    }

    fn present(&self, handle: &str) -> bool {
        let Ok((tap, local)) = Self::parse_handle(handle) else {
            return false;
        };
        let f = self.files(local);
        self.domain_exists(&self.domain_name(local))
            || (!tap.is_empty() && link_exists(tap))
            || [f.xnbd_pid, f.nbd, f.console].iter().any(|p| p.exists())
    }

    fn alive(&self, handle: &str) -> bool {
        let Ok((_, local)) = Self::parse_handle(handle) else {
            return false;
        };
        let f = self.files(local);
        self.virsh(&["domstate", &self.domain_name(local)])
            .is_ok_and(|s| s.trim() == "running")
            && pidfile_alive(&f.xnbd_pid, &f.nbd.display().to_string())
    }

    fn discard(&mut self, vm: &str) {
        if !vm.contains('/') {
            let _ = std::fs::remove_file(self.files(vm).disk);
        }
    }

    fn address(&self, handle: &str) -> Result<Option<Ipv4Addr>, DriverError> {
        let (_, local) = Self::parse_handle(handle)?;
        let log = std::fs::read(self.files(local).console_log).unwrap_or_default();
        Ok(parse_lease(&String::from_utf8_lossy(&log)))
    }

    fn ping(&self, handle: &str, target: Ipv4Addr) -> Result<Option<f64>, DriverError> {
        let (_, local) = Self::parse_handle(handle)?;
        let out = console_run(
            &self.files(local).console,
            local,
            &format!("ping -q -c 3 -W 2 {target}"),
            std::time::Duration::from_secs(10),
        )?;
        Ok(parse_ping_avg(&out))
    }

    fn strays(&self, known: &[String]) -> Vec<String> {
        let Ok(names) = self.virsh(&["list", "--all", "--name"]) else {
            return Vec::new();
        };
        let known: Vec<&str> = known
            .iter()
            .filter_map(|h| Self::parse_handle(h).ok().map(|(_, l)| l))
            .collect();
        names
            .lines()
            .map(str::trim)
            .filter_map(|d| d.strip_prefix(self.cfg.prefix.as_str()))
            .filter(|local| !local.is_empty() && !known.contains(local))
            .filter(|local| {
                // Only domains this agent made: its state directory in their metadata.
                self.virsh(&["metadata", &self.domain_name(local), METADATA_NS])
                    .ok()
                    .and_then(|m| metadata_owner(&m))
                    .is_some_and(|o| o == self.cfg.owner)
            })
            .map(|local| format!("libvirt::{local}"))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mac;

    fn spec() -> VmSpec {
        VmSpec {
            cluster: "k".into(),
            name: "k-c1".into(),
            role: Role::Compute,
            host: "h0".into(),
            mac: Mac([2, 1, 0, 0, 0, 9]),
            memory_mb: 256,
            bridge: "mvb3".into(),
            dhcp: None,
            local_name: "c3-k-c1".into(),
            nic: "mvq3-0".into(),
            stack: false,
        }
    }

    #[test]
    fn domain_xml_has_mac_bridge_nbd_disk_and_owner() {
        let s = spec();
        let boot = BootFiles {
            kernel: "/run/mvc/libvirt/mvc-c3-k-c1.vmlinuz".into(),
            initrd: "/run/mvc/libvirt/mvc-c3-k-c1.initrd".into(),
        };
        let x = DomainXml {
            domain_type: "qemu",
            name: "mvc-c3-k-c1",
            spec: &s,
            tap: "mvq3-0",
            vcpus: 2,
            boot: &boot,
            append: "quiet",
            nbd: Path::new("/run/mvc/libvirt/mvc-c3-k-c1.nbd"),
            console: Path::new("/run/mvc/libvirt/mvc-c3-k-c1.console"),
            console_log: Path::new("/run/mvc/libvirt/mvc-c3-k-c1.console.log"),
            owner: "/var/lib/mvc/a'gent",
        }
        .render();
        assert!(x.starts_with("<domain type='qemu'>"), "{x}");
        assert!(x.contains("<name>mvc-c3-k-c1</name>"));
        assert!(x.contains("<mac address='02:01:00:00:00:09'/>"));
        assert!(x.contains("<source bridge='mvb3'/>"));
        assert!(x.contains("<target dev='mvq3-0'/>"));
        assert!(x.contains("<source protocol='nbd' name='k-c1'>"));
        assert!(x.contains("socket='/run/mvc/libvirt/mvc-c3-k-c1.nbd'"));
        assert!(x.contains("<vcpu>2</vcpu>"));
        assert!(x.contains("<memory unit='MiB'>256</memory>"));
        assert!(x.contains("machine='q35'") && x.contains("<cpu mode='maximum'/>"));
        assert!(x.contains("mvc.name=k-c1 quiet</cmdline>"));
        assert!(x.contains("owner='/var/lib/mvc/a&apos;gent'"), "{x}");
        assert_eq!(metadata_owner(&x).as_deref(), Some("/var/lib/mvc/a'gent"));
        let xen = DomainXml {
            domain_type: "xen",
            ..DomainXml {
                domain_type: "qemu",
                name: "d",
                spec: &s,
                tap: "t",
                vcpus: 1,
                boot: &boot,
                append: "",
                nbd: Path::new("/n"),
                console: Path::new("/c"),
                console_log: Path::new("/l"),
                owner: "o",
            }
        }
        .render();
        assert!(xen.starts_with("<domain type='xen'>"));
        assert!(!xen.contains("q35") && !xen.contains("<cpu"));
    }

    #[test]
    fn escaping_handles_and_groups() {
        assert_eq!(xml_escape("a<b>&'\""), "a&lt;b&gt;&amp;&apos;&quot;");
        // libvirt prints metadata with double quotes.
        assert_eq!(
            metadata_owner("<vm xmlns=\"urn:mvc:libvirt:1\" owner=\"/s&amp;t\" cluster=\"k\"/>")
                .as_deref(),
            Some("/s&t")
        );
        assert_eq!(metadata_owner("<vm/>"), None);
        assert_eq!(
            LibvirtDriver::parse_handle("libvirt:mvq3-0:c3-k-c1").unwrap(),
            ("mvq3-0", "c3-k-c1")
        );
        assert_eq!(
            LibvirtDriver::parse_handle("libvirt::c3-k-c1").unwrap(),
            ("", "c3-k-c1")
        );
        assert!(LibvirtDriver::parse_handle("libvirt:t:../x").is_err());
        assert!(LibvirtDriver::parse_handle("qemu:t:x").is_err());
        let g = "root:x:0:\nkvm:x:110:\nlibvirt-qemu:x:64055:libvirt-qemu\n";
        assert_eq!(group_id(g, "libvirt-qemu"), Some(64055));
        assert_eq!(group_id(g, "kvm"), Some(110));
        assert_eq!(group_id(g, "qemu"), None);
    }

    #[test]
    fn refuses_frontends_and_unusable_names_before_touching_anything() {
        let d = tempfile::tempdir().unwrap();
        let mut cfg = LibvirtConfig::new(d.path(), "t-");
        cfg.sock_dir = d.path().join("sock");
        cfg.uri = "test:///default".into();
        let mut drv = LibvirtDriver::new(cfg);
        let mut s = spec();
        s.role = Role::Frontend;
        let e = drv.start(&s).err().unwrap().to_string();
        assert!(e.contains("frontend"), "{e}");
        s.role = Role::Compute;
        for bad in ["", "a/b", "a b", "a'b", "a<b"] {
            s.local_name = bad.into();
            s.name = bad.into();
            let e = drv.start(&s).err().unwrap().to_string();
            assert!(e.contains("not usable"), "{bad:?}: {e}");
        }
        assert!(std::fs::read_dir(d.path()).unwrap().next().is_none());
    }
}
