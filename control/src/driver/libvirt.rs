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
use super::vmfiles::{check_sockets, discard_disk, end_children, running_or_ended, GuestFiles};
use super::VmDriver;
use super::{link_exists, DriverError, QemuConfig, QemuDriver, RunningVm};
use crate::model::Role;
use crate::process::{kill_pidfile, run, spawn};
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
    /// Let other sites' libvirtds migrate domains into this one through the agent
    /// (off by default: the tunnel gives the origin's libvirtd this libvirtd's rights
    /// while the domain moves).
    pub accept_migrations: bool,
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
            accept_migrations: false,
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

/// Files of one domain: the guest's (shared with the qemu driver) and libvirt's own.
struct DomainFiles {
    guest: GuestFiles,
    xml: PathBuf,
    kernel: PathBuf,
    initrd: PathBuf,
}

impl std::ops::Deref for DomainFiles {
    type Target = GuestFiles;
    fn deref(&self) -> &GuestFiles {
        &self.guest
    }
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
    /// The domain's UUID (an incoming migration keeps the origin's); `None`: libvirt
    /// makes one.
    pub uuid: Option<&'a str>,
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
        // no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check
        // can time out and panic the guest.
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 loglevel=4 no_timer_check mvc.name={}",
            s.name
        );
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
{uuid}  <metadata>
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
      <geometry cyls='1024' heads='16' secs='63'/>
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
            uuid = self
                .uuid
                .map(|u| format!("  <uuid>{}</uuid>\n", e(u)))
                .unwrap_or_default(),
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
            guest: GuestFiles {
                nbd: s("nbd"),
                console: s("console"),
                console_log: r("console.log"),
                xnbd_pid: r("xnbd.pid"),
                xnbd_log: r("xnbd.log"),
                disk: self.cfg.vm.disk_dir.join(format!("{local}.img")),
            },
            xml: r("domain.xml"),
            kernel: s("vmlinuz"),
            initrd: s("initrd"),
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

    /// The NBD socket `sock` for root and the hypervisor's group `gid`.
    fn share_socket(sock: &Path, gid: Option<u32>) -> Result<(), DriverError> {
        use std::os::unix::fs::PermissionsExt;
        let err = |e: std::io::Error| DriverError::Config(format!("{}: {e}", sock.display()));
        std::os::unix::fs::chown(sock, Some(0), gid).map_err(err)?;
        let mode = if gid.is_some() { 0o660 } else { 0o600 };
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(mode)).map_err(err)
    }

    /// Once the disk server `xnbd` (`what`) started, one of `children` from then on:
    /// its socket awaited and shared with the hypervisor's group `gid`, the console log
    /// cleared; the boot files the domain names.
    fn disk_served(
        f: &DomainFiles,
        mut xnbd: std::process::Child,
        what: &str,
        gid: Option<u32>,
        children: &mut Vec<std::process::Child>,
    ) -> Result<BootFiles, DriverError> {
        let waited = QemuDriver::wait_socket(&f.nbd, &mut xnbd, what, &f.xnbd_log);
        children.push(xnbd);
        waited?;
        Self::share_socket(&f.nbd, gid)?;
        let _ = std::fs::remove_file(&f.console_log);
        Ok(BootFiles {
            kernel: f.kernel.clone(),
            initrd: f.initrd.clone(),
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

    /// Before a domain's disk server starts: socket paths checked and cleared, the
    /// socket directory and run directory made, the boot files copied. The group id of
    /// the hypervisor's group.
    fn lay_out(&mut self, f: &DomainFiles) -> Result<Option<u32>, DriverError> {
        f.clear_sockets("use a shorter --libvirt-sock-dir or --ns-prefix")?;
        let gid = self.ensure_sock_dir()?;
        std::fs::create_dir_all(&self.cfg.vm.run_dir)
            .map_err(|e| DriverError::Config(format!("{}: {e}", self.cfg.vm.run_dir.display())))?;
        let boot = self.disks.boot_files()?;
        Self::copy_boot_file(&boot.kernel, &f.kernel)?;
        Self::copy_boot_file(&boot.initrd, &f.initrd)?;
        Ok(gid)
    }

    /// The domain `name` of type `domain_type` for `spec` on TAP `tap`, with the files
    /// of `f`, the kernel and initramfs `boot` and this driver's vCPUs, kernel command
    /// line and owner; libvirt makes its UUID.
    fn domain_xml<'a>(
        &'a self,
        domain_type: &'a str,
        name: &'a str,
        spec: &'a VmSpec,
        tap: &'a str,
        f: &'a DomainFiles,
        boot: &'a BootFiles,
    ) -> DomainXml<'a> {
        DomainXml {
            domain_type,
            name,
            spec,
            tap,
            vcpus: self.cfg.vm.vcpus,
            boot,
            append: &self.cfg.vm.append,
            nbd: &f.nbd,
            console: &f.console,
            console_log: &f.console_log,
            owner: &self.cfg.owner,
            uuid: None,
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
        let gid = self.lay_out(f)?;
        self.disks.ensure_disk(&f.disk)?;
        let xnbd = f.spawn_server(&self.cfg.vm.xnbd, &spec.name)?;
        let boot = Self::disk_served(f, xnbd, "xnbd serve", gid, children)?;
        let mut dtype = self.domain_type();
        loop {
            let xml = self.domain_xml(dtype, &dom, spec, tap, f, &boot).render();
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

/// Live migration by libvirt's own protocol (docs/CONTROLLER.md, "Live migration of
/// libvirt domains"): the origin's libvirtd moves the domain into the destination's
/// libvirtd through a Unix socket the origin agent relays to the destination agent
/// (`--p2p --tunnelled`: libvirt's RPC carries the memory too).
impl LibvirtDriver {
    /// The socket of the libvirtd this driver speaks to, for the destination agent to
    /// connect a `libvirt` tunnel to: the URI's `socket=` parameter, or the system
    /// daemon's socket for `qemu:///system`; `None` for other URIs (a remote or Xen
    /// hypervisor is not reached through a local socket).
    pub fn daemon_socket(&self) -> Option<PathBuf> {
        let uri = &self.cfg.uri;
        let (base, query) = uri.split_once('?').unwrap_or((uri, ""));
        let param = query
            .split('&')
            .find_map(|kv| kv.strip_prefix("socket="))
            .map(PathBuf::from);
        match base {
            "qemu:///system" => {
                Some(param.unwrap_or_else(|| PathBuf::from("/run/libvirt/libvirt-sock")))
            }
            "qemu+unix:///system" => param,
            _ => None,
        }
    }

    /// Whether this agent's admin lets other sites' libvirtds migrate domains into its
    /// libvirtd (`--libvirt-accept-migrations`).
    pub fn accepts_migrations(&self) -> bool {
        self.cfg.accept_migrations
    }

    /// The NBD socket of the disk of the VM with local name `local`.
    pub fn disk_socket(&self, local: &str) -> PathBuf {
        self.files(local).guest.nbd
    }

    /// Origin: what the destination needs of the running domain of `local`.
    pub fn origin_domain(
        &mut self,
        local: &str,
    ) -> Result<crate::migrate::LibvirtDomain, DriverError> {
        let name = self.domain_name(local);
        let uuid = self.virsh(&["domuuid", &name])?.trim().to_string();
        let xml = self.virsh(&["dumpxml", &name])?;
        let domain_type = ["kvm", "qemu", "xen"]
            .into_iter()
            .find(|t| {
                xml.contains(&format!("<domain type='{t}'"))
                    || xml.contains(&format!("<domain type=\"{t}\""))
            })
            .unwrap_or("qemu")
            .to_string();
        let d = crate::migrate::LibvirtDomain {
            name,
            uuid,
            domain_type,
        };
        d.validate().map_err(DriverError::Config)?;
        Ok(d)
    }

    /// Destination: the disk of an incoming VM behind `xnbd proxy --no-background` on
    /// the domain's NBD socket (source `source`, control socket `ctl`, fetch rate
    /// `rate`), the boot files copied, and the migration XML: what `start` would
    /// define here, under the origin's name and UUID. Nothing is defined: the origin's
    /// libvirtd does that through the tunnel. Returns the VM (the proxy its child), the
    /// XML and the domain's name here.
    pub fn start_incoming_domain(
        &mut self,
        spec: &VmSpec,
        origin: &crate::migrate::LibvirtDomain,
        source: &Path,
        ctl: &Path,
        rate: u64,
    ) -> Result<(RunningVm, String, String), DriverError> {
        if self.domain_type() != origin.domain_type {
            return Err(DriverError::Config(format!(
                "the origin's domain is of type {} and this site runs {} domains: a \
                 domain moves only between hosts of the same type",
                origin.domain_type,
                self.domain_type()
            )));
        }
        let local = spec.local().to_string();
        let dname = self.domain_name(&local);
        let tap = spec.nic.clone();
        self.remove_all(&tap, &local);
        let f = self.files(&local);
        check_sockets(&[source, ctl], "use a shorter state directory")?;
        let _ = std::fs::remove_file(ctl);
        f.clear_disk();
        let mut children = Vec::new();
        let made = (|| {
            let gid = self.lay_out(&f)?;
            std::fs::create_dir_all(&self.cfg.vm.disk_dir).map_err(|e| {
                DriverError::Config(format!("{}: {e}", self.cfg.vm.disk_dir.display()))
            })?;
            let xnbd = f.spawn_proxy(&self.cfg.vm.xnbd, &spec.name, source, ctl, rate)?;
            let boot = Self::disk_served(&f, xnbd, "xnbd proxy", gid, &mut children)?;
            let xml = DomainXml {
                uuid: Some(&origin.uuid),
                ..self.domain_xml(&origin.domain_type, &origin.name, spec, &tap, &f, &boot)
            }
            .render();
            std::fs::write(&f.xml, &xml)
                .map_err(|e| DriverError::Config(format!("{}: {e}", f.xml.display())))?;
            Ok(xml)
        })();
        let (started, xml) = match made {
            Ok(xml) => (Ok(()), xml),
            Err(e) => (Err(e), String::new()),
        };
        match running_or_ended(format!("libvirt:{tap}:{local}"), children, started) {
            Ok(vm) => Ok((vm, xml, dname)),
            Err(e) => {
                self.remove_all(&tap, &local);
                Err(e)
            }
        }
    }

    /// Origin: start moving the domain of `local` into the libvirtd behind the local
    /// socket `dest` (relayed to the destination), under the destination's `xml`
    /// (saved as `<run>/<local>.dest.xml`) and name `dname`, at most `rate` bytes/s
    /// (0: libvirt's default). The `virsh migrate` process, its stderr in `log`: its
    /// exit is the end of the move (0: the domain runs at the destination and is
    /// undefined here).
    pub fn migrate_out(
        &self,
        local: &str,
        xml: &str,
        dname: &str,
        dest: &Path,
        rate: u64,
        log: &Path,
    ) -> Result<std::process::Child, DriverError> {
        let f = self.cfg.vm.run_dir.join(format!("{local}.dest.xml"));
        std::fs::write(&f, xml)
            .map_err(|e| DriverError::Config(format!("{}: {e}", f.display())))?;
        let (dom, file) = (self.domain_name(local), f.display().to_string());
        let desturi = format!("qemu+unix:///system?socket={}", dest.display());
        let mib = (rate >> 20).max(1).to_string();
        let mut args = vec![
            "-c",
            &self.cfg.uri,
            "migrate",
            "--live",
            "--p2p",
            "--tunnelled",
            "--persistent",
            "--undefinesource",
            // The disk is an NBD export, not a file with a host cache: qemu flushes and
            // lets go of it at switchover, and the destination's proxy serves it.
            "--unsafe",
            "--dname",
            dname,
            "--xml",
            &file,
        ];
        if rate > 0 {
            args.extend(["--bandwidth", &mib]);
        }
        args.extend([dom.as_str(), desturi.as_str()]);
        let _ = std::fs::remove_file(log);
        Ok(spawn("virsh", &args, &[], log)?)
    }

    /// Origin: the running migration job of `local` (`virsh domjobinfo`): memory
    /// processed, total and remaining, bytes/s; `None` when no job runs.
    pub fn job_info(&self, local: &str) -> Option<(u64, u64, u64, u64)> {
        let out = self.virsh(&["domjobinfo", &self.domain_name(local)]).ok()?;
        let field = |name: &str| parse_job_field(&out, name);
        let total = field("Memory total")?;
        Some((
            field("Memory processed").unwrap_or(0),
            total,
            field("Memory remaining").unwrap_or(0),
            field("Memory bandwidth").unwrap_or(0),
        ))
    }

    /// Destination: the downtime of the migration that brought the domain of `local`
    /// here, ms, as libvirt measured it (`virsh domjobinfo --completed`), if it says.
    pub fn incoming_downtime_ms(&self, local: &str) -> Option<u64> {
        let out = self
            .virsh(&["domjobinfo", "--completed", &self.domain_name(local)])
            .ok()?;
        parse_job_field(&out, "Total downtime")
    }

    /// Origin: how long the domain may be paused at switchover, ms (once its job runs).
    pub fn set_max_downtime(&self, local: &str, ms: u64) -> bool {
        self.virsh(&[
            "migrate-setmaxdowntime",
            &self.domain_name(local),
            &ms.to_string(),
        ])
        .is_ok()
    }

    /// Origin: cancel the migration job of `local` (libvirt then resumes the domain here
    /// and kills the destination's).
    pub fn abort_job(&self, local: &str) {
        let _ = self.virsh(&["domjobabort", &self.domain_name(local)]);
    }

    /// `virsh domstate` of the domain of `local` (`running`, `paused`, ...), `None`
    /// when libvirt has no such domain.
    pub fn domain_state(&self, local: &str) -> Option<String> {
        self.virsh(&["domstate", &self.domain_name(local)])
            .ok()
            .map(|s| s.trim().to_string())
    }

    /// Resume the paused domain of `local`.
    pub fn resume(&self, local: &str) {
        let _ = self.virsh(&["resume", &self.domain_name(local)]);
    }
}

/// A number of `virsh domjobinfo`'s output in bytes (`Memory processed: 12.5 MiB`,
/// `Memory bandwidth: 30.1 MiB/s`).
fn parse_job_field(out: &str, name: &str) -> Option<u64> {
    let v = out.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == name).then(|| v.trim().to_string())
    })?;
    let mut w = v.split_whitespace();
    let n: f64 = w.next()?.parse().ok()?;
    let unit = w.next().unwrap_or("B");
    let mult = match unit.trim_end_matches("/s") {
        "KiB" => 1u64 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => 1,
    };
    Some((n * mult as f64) as u64)
}

impl VmDriver for LibvirtDriver {
    fn kind(&self) -> &'static str {
        "libvirt"
    }

    fn as_libvirt(&mut self) -> Option<&mut LibvirtDriver> {
        Some(self)
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
        let started = self.start_inner(spec, &tap, &f, &mut children);
        let vm = running_or_ended(format!("libvirt:{tap}:{local}"), children, started);
        if vm.is_err() {
            self.remove_all(&tap, &local);
        }
        vm
    }

    fn stop(&mut self, vm: &mut RunningVm) -> Result<(), DriverError> {
        // The domain first: qemu still holds the disk's NBD connection.
        if let Ok((_, local)) = Self::parse_handle(&vm.handle) {
            self.remove_domain(&self.domain_name(local));
        }
        end_children(vm);
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
            || [&f.xnbd_pid, &f.nbd, &f.console].iter().any(|p| p.exists())
    }

    fn alive(&self, handle: &str) -> bool {
        let Ok((_, local)) = Self::parse_handle(handle) else {
            return false;
        };
        self.virsh(&["domstate", &self.domain_name(local)])
            .is_ok_and(|s| s.trim() == "running")
            && self.files(local).disk_server_alive()
    }

    fn discard(&mut self, vm: &str) {
        discard_disk(&self.cfg.vm.disk_dir, vm);
    }

    fn address(&self, handle: &str) -> Result<Option<Ipv4Addr>, DriverError> {
        let (_, local) = Self::parse_handle(handle)?;
        Ok(self.files(local).lease())
    }

    fn ping(&self, handle: &str, target: Ipv4Addr) -> Result<Option<f64>, DriverError> {
        let (_, local) = Self::parse_handle(handle)?;
        self.files(local).ping(local, target)
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
            uuid: Some("0c4fb6a4-7d63-4b38-9a1b-2a0e3c9d1f10"),
        }
        .render();
        assert!(x.contains("<uuid>0c4fb6a4-7d63-4b38-9a1b-2a0e3c9d1f10</uuid>"));
        assert!(x.contains("<geometry cyls='1024' heads='16' secs='63'/>"));
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
                uuid: None,
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
        let job = "Job type:         Unbounded\nMemory processed: 12.500 MiB\n\
                   Memory remaining: 100.000 KiB\nMemory total:     128.008 MiB\n\
                   Memory bandwidth: 30.000 MiB/s\n";
        assert_eq!(
            parse_job_field(job, "Memory processed"),
            Some((125 << 20) / 10)
        );
        assert_eq!(parse_job_field(job, "Memory remaining"), Some(100 << 10));
        assert_eq!(parse_job_field(job, "Memory bandwidth"), Some(30 << 20));
        assert_eq!(parse_job_field(job, "Data total"), None);
        assert_eq!(
            parse_job_field("Total downtime:   87 ms\n", "Total downtime"),
            Some(87)
        );
        let uri = |u: &str| {
            let d = tempfile::tempdir().unwrap();
            let mut cfg = LibvirtConfig::new(d.path(), "t-");
            cfg.uri = u.into();
            LibvirtDriver::new(cfg).daemon_socket()
        };
        assert_eq!(
            uri("qemu:///system"),
            Some(PathBuf::from("/run/libvirt/libvirt-sock"))
        );
        assert_eq!(
            uri("qemu:///system?socket=/x/libvirt-sock"),
            Some(PathBuf::from("/x/libvirt-sock"))
        );
        assert_eq!(uri("qemu+ssh://h/system"), None);
        assert_eq!(uri("xen:///system"), None);
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
