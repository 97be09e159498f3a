//! The qemu driver: real VMs (`qemu-system-x86_64`, KVM when it works, TCG otherwise)
//! on a TAP enslaved to the cluster bridge, booting the guest [`super::guest`] builds,
//! their disks served by `xnbd serve` over NBD on a Unix socket.
use super::guest::{self, BootFiles};
use super::vmfiles::{check_sockets, discard_disk, end_children, running_or_ended, GuestFiles};
use super::{link_exists, DriverError, RunningVm, VmDriver};
use crate::model::Role;
use crate::process::{kill_pidfile, pidfile_alive, run, spawn, stop_child};
use crate::proto::VmSpec;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Configuration of the [`QemuDriver`].
#[derive(Clone, Debug)]
pub struct QemuConfig {
    /// Where logs, sockets and pid files go.
    pub run_dir: PathBuf,
    /// Where VM disks live (`<vm>.img`, raw, kept across stop/start).
    pub disk_dir: PathBuf,
    /// Cache of guest kernels and initramfs images.
    pub cache_dir: PathBuf,
    /// The `xnbd` binary that serves the disks.
    pub xnbd: PathBuf,
    /// QEMU binary.
    pub qemu: String,
    /// Image each new VM disk starts as a raw copy of (any format `qemu-img` reads);
    /// `None`: an empty sparse disk of `disk_mb`.
    pub image: Option<PathBuf>,
    /// Size of an empty disk in MiB.
    pub disk_mb: u64,
    /// Kernel and initramfs to boot instead of the built ones.
    pub boot: Option<BootFiles>,
    /// Extra kernel command line.
    pub append: String,
    /// vCPUs per VM.
    pub vcpus: u32,
}

impl QemuConfig {
    /// Defaults for an agent state directory: disks in `<state>/disks`, logs in
    /// `<state>/run`, cache `/var/cache/mvc`, xnbd next to the running binary.
    pub fn new(state_dir: &Path) -> QemuConfig {
        let xnbd = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("xnbd")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("xnbd"));
        QemuConfig {
            run_dir: state_dir.join("run"),
            disk_dir: state_dir.join("disks"),
            cache_dir: PathBuf::from("/var/cache/mvc"),
            xnbd,
            qemu: "qemu-system-x86_64".into(),
            image: None,
            disk_mb: 1024,
            boot: None,
            append: String::new(),
            vcpus: 1,
        }
    }
}

/// Real VMs with qemu-system-x86_64: direct kernel boot of the guest built by
/// [`super::guest`], a TAP on the cluster bridge, and a disk served by `xnbd serve` on a
/// Unix socket that qemu attaches over NBD (virtio-blk).
pub struct QemuDriver {
    /// Configuration.
    pub cfg: QemuConfig,
    counter: u32,
    accel: Option<&'static str>,
    /// Built boot files: the plain guest, the guest with Slurm.
    built: [Option<BootFiles>; 2],
}

/// Files of one qemu VM: the guest's (shared with the libvirt driver) and qemu's own.
struct QemuFiles {
    guest: GuestFiles,
    qemu_pid: PathBuf,
    log: PathBuf,
}

/// How to make the VMs' socket paths shorter.
const SOCK_HINT: &str = "use a shorter state directory";

impl std::ops::Deref for QemuFiles {
    type Target = GuestFiles;
    fn deref(&self) -> &GuestFiles {
        &self.guest
    }
}

impl QemuDriver {
    /// A driver with `cfg`.
    pub fn new(cfg: QemuConfig) -> QemuDriver {
        QemuDriver {
            cfg,
            counter: 0,
            accel: None,
            built: [None, None],
        }
    }

    /// The accelerator: KVM when /dev/kvm opens and a paused KVM guest of `qemu` comes
    /// up (some hosts expose /dev/kvm but cannot run a guest with it), TCG otherwise.
    pub fn probe_accel(qemu: &str) -> &'static str {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return "tcg";
        }
        let probe = Command::new(qemu)
            .args([
                "-machine",
                "q35,accel=kvm",
                "-cpu",
                "max",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "none",
                "-S",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(mut child) = probe else {
            return "tcg";
        };
        // A guest that cannot run aborts at once; one that can waits paused (-S).
        for _ in 0..20 {
            if let Ok(Some(_)) = child.try_wait() {
                tracing::warn!("/dev/kvm is there but qemu cannot start a KVM guest: using TCG");
                return "tcg";
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        stop_child(&mut child);
        "kvm"
    }

    fn accel(&mut self) -> &'static str {
        if let Some(a) = self.accel {
            return a;
        }
        let a = Self::probe_accel(&self.cfg.qemu);
        tracing::info!(accel = a, "qemu accelerator");
        self.accel = Some(a);
        a
    }

    fn files(&self, vm: &str) -> QemuFiles {
        let r = |ext: &str| self.cfg.run_dir.join(format!("{vm}.{ext}"));
        QemuFiles {
            guest: GuestFiles {
                nbd: r("nbd"),
                console: r("console"),
                console_log: r("console.log"),
                xnbd_pid: r("xnbd.pid"),
                xnbd_log: r("xnbd.log"),
                disk: self.cfg.disk_dir.join(format!("{vm}.img")),
            },
            qemu_pid: r("qemu.pid"),
            log: r("log"),
        }
    }

    fn free_tap(&mut self) -> String {
        loop {
            self.counter += 1;
            let name = format!("mvq{}", self.counter);
            if !Path::new("/sys/class/net").join(&name).exists()
                && run("ip", &["link", "show", &name]).is_err()
            {
                return name;
            }
        }
    }

    /// The TAP a VM starts on: the one its spec names (a leftover of that name deleted
    /// first), or a free one.
    fn tap_for(&mut self, spec: &VmSpec) -> String {
        if spec.nic.is_empty() {
            return self.free_tap();
        }
        if link_exists(&spec.nic) {
            let _ = run("ip", &["link", "del", &spec.nic]);
        }
        spec.nic.clone()
    }

    /// `(tap, vm)` of a handle `qemu:<tap>:<vm>`.
    fn parse_handle(handle: &str) -> Result<(&str, &str), DriverError> {
        handle
            .strip_prefix("qemu:")
            .and_then(|h| h.split_once(':'))
            .filter(|(t, v)| !t.is_empty() && !v.is_empty() && !v.contains('/'))
            .ok_or_else(|| DriverError::Config(format!("not a qemu handle: {handle}")))
    }

    /// The qemu command line for `spec` on `tap`, booting `boot`, disk on NBD socket
    /// `nbd` (export named after the VM), serial console on the Unix socket `console`
    /// logged to `console_log`.
    #[allow(clippy::too_many_arguments)]
    pub fn args(
        spec: &VmSpec,
        tap: &str,
        boot: &BootFiles,
        nbd: &Path,
        console: &Path,
        console_log: &Path,
        pidfile: &Path,
        accel: &str,
        vcpus: u32,
        append: &str,
    ) -> Vec<String> {
        // no_timer_check: under TCG on a busy host the kernel's IO-APIC timer check
        // can time out and panic the guest.
        let mut cmdline = format!(
            "console=ttyS0 panic=-1 loglevel=4 no_timer_check mvc.name={}",
            spec.name
        );
        if !append.is_empty() {
            cmdline.push(' ');
            cmdline.push_str(append);
        }
        vec![
            "-name".into(),
            spec.name.clone(),
            "-machine".into(),
            format!("q35,accel={accel}"),
            "-cpu".into(),
            "max".into(),
            "-m".into(),
            spec.memory_mb.to_string(),
            "-smp".into(),
            vcpus.max(1).to_string(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-nographic".into(),
            "-no-reboot".into(),
            "-kernel".into(),
            boot.kernel.display().to_string(),
            "-initrd".into(),
            boot.initrd.display().to_string(),
            "-append".into(),
            cmdline,
            "-chardev".into(),
            format!(
                "socket,id=con,path={},server=on,wait=off,logfile={}",
                console.display(),
                console_log.display()
            ),
            "-serial".into(),
            "chardev:con".into(),
            "-monitor".into(),
            "none".into(),
            // QMP, for live migration: `run/<vm>.qmp` beside the console.
            "-qmp".into(),
            format!(
                "unix:{},server=on,wait=off",
                console.with_extension("qmp").display()
            ),
            // The guest agent's port: `run/<vm>.ga` (guest::GUEST_AGENT_PORT).
            "-chardev".into(),
            format!(
                "socket,id=ga,path={},server=on,wait=off",
                console.with_extension("ga").display()
            ),
            "-device".into(),
            "virtio-serial-pci".into(),
            "-device".into(),
            format!("virtserialport,chardev=ga,name={}", guest::GUEST_AGENT_PORT),
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            // romfile=: no iPXE option ROM (the guest boots from -kernel).
            format!("virtio-net-pci,netdev=n0,mac={},romfile=", spec.mac),
            "-blockdev".into(),
            // reconnect-delay: a disk server or proxy that restarts (a migration's
            // proxy started again by the agent) pauses the VM's I/O instead of failing it.
            format!(
                "driver=nbd,node-name=disk0,server.type=unix,server.path={},export={},reconnect-delay=60",
                nbd.display(),
                spec.name
            ),
            "-device".into(),
            // A fixed geometry: else qemu reads sector 0 to guess one when the device
            // is created, also in a VM that waits for a live migration, whose disk
            // proxy must read nothing before switchover.
            "virtio-blk-pci,drive=disk0,cyls=1024,heads=16,secs=63".into(),
            "-pidfile".into(),
            pidfile.display().to_string(),
        ]
    }

    /// The VM's disk: made on first start (a raw copy of the image, or empty and
    /// sparse), kept afterwards.
    pub(super) fn ensure_disk(&self, disk: &Path) -> Result<(), DriverError> {
        if disk.exists() {
            return Ok(());
        }
        std::fs::create_dir_all(&self.cfg.disk_dir)
            .map_err(|e| DriverError::Config(format!("{}: {e}", self.cfg.disk_dir.display())))?;
        let tmp = disk.with_extension("img.tmp");
        match &self.cfg.image {
            Some(img) => {
                run(
                    "qemu-img",
                    &[
                        "convert",
                        "-q",
                        "-O",
                        "raw",
                        &img.display().to_string(),
                        &tmp.display().to_string(),
                    ],
                )?;
            }
            None => {
                let f = std::fs::File::create(&tmp)
                    .map_err(|e| DriverError::Config(format!("{}: {e}", tmp.display())))?;
                f.set_len(self.cfg.disk_mb.saturating_mul(1 << 20))
                    .map_err(|e| DriverError::Config(format!("{}: {e}", tmp.display())))?;
            }
        }
        std::fs::rename(&tmp, disk)
            .map_err(|e| DriverError::Config(format!("{}: {e}", disk.display())))
    }

    /// Kernel and initramfs: the configured ones, or built (cached) ones.
    pub(super) fn boot_files(&mut self) -> Result<BootFiles, DriverError> {
        self.boot_files_for(false)
    }

    /// [`QemuDriver::boot_files`] of a guest that runs Slurm (`slurm`): the built
    /// guest with Slurm's compute side; a configured kernel and initramfs carry what
    /// they carry.
    pub(super) fn boot_files_for(&mut self, slurm: bool) -> Result<BootFiles, DriverError> {
        if let Some(b) = &self.cfg.boot {
            return Ok(b.clone());
        }
        let i = usize::from(slurm);
        // Another agent sharing the cache may have pruned it: built again then.
        if let Some(b) = self.built[i].as_ref().filter(|b| b.initrd.exists()) {
            guest::mark_used(&b.initrd);
            return Ok(b.clone());
        }
        let b = guest::prepare_with(&self.cfg.cache_dir, true, &guest::GuestOptions::new(slurm))?;
        self.built[i] = Some(b.clone());
        Ok(b)
    }

    /// The Unix socket of the guest agent's port of the VM behind `handle`.
    pub fn guest_socket(&self, handle: &str) -> Option<PathBuf> {
        let (_, vm) = Self::parse_handle(handle).ok()?;
        Some(self.files(vm).console.with_extension("ga"))
    }

    /// Wait until `sock` exists (the server listens), failing when `child` exits.
    pub(super) fn wait_socket(
        sock: &Path,
        child: &mut Child,
        what: &str,
        log: &Path,
    ) -> Result<(), DriverError> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !sock.exists() {
            if let Ok(Some(st)) = child.try_wait() {
                return Err(DriverError::Command {
                    cmd: what.into(),
                    msg: format!("exited with {st}; see {}", log.display()),
                });
            }
            if std::time::Instant::now() > deadline {
                return Err(DriverError::Config(format!(
                    "{what} did not create {} within 10 s; see {}",
                    sock.display(),
                    log.display()
                )));
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(())
    }

    fn start_inner(
        &mut self,
        spec: &VmSpec,
        tap: &str,
        f: &QemuFiles,
        children: &mut Vec<Child>,
    ) -> Result<(), DriverError> {
        f.clear_sockets(SOCK_HINT)?;
        let ga = f.console.with_extension("ga");
        check_sockets(&[&ga], SOCK_HINT)?;
        let _ = std::fs::remove_file(&ga);
        let boot = self.boot_files_for(spec.stack)?;
        self.ensure_disk(&f.disk)?;
        let mut xnbd = f.spawn_server(&self.cfg.xnbd, &spec.name)?;
        let waited = Self::wait_socket(&f.nbd, &mut xnbd, "xnbd serve", &f.xnbd_log);
        children.push(xnbd);
        waited?;
        run("ip", &["tuntap", "add", "dev", tap, "mode", "tap"])?;
        run("ip", &["link", "set", tap, "master", &spec.bridge, "up"])?;
        let accel = self.accel();
        let args = Self::args(
            spec,
            tap,
            &boot,
            &f.nbd,
            &f.console,
            &f.console_log,
            &f.qemu_pid,
            accel,
            self.cfg.vcpus,
            &self.cfg.append,
        );
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        // Fresh logs for this boot: the console log is what `address` reads.
        let _ = std::fs::remove_file(&f.log);
        let _ = std::fs::remove_file(&f.console_log);
        let mut qemu = spawn(&self.cfg.qemu, &a, &[], &f.log)?;
        let waited = Self::wait_socket(&f.console, &mut qemu, "qemu", &f.log);
        // qemu first: it is stopped before the disk server.
        children.insert(0, qemu);
        waited
    }
}

impl VmDriver for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn start(&mut self, spec: &VmSpec) -> Result<RunningVm, DriverError> {
        if spec.role == Role::Frontend {
            return Err(DriverError::Unsupported {
                driver: "qemu",
                what: "the frontend VM (it runs dnsmasq; run the origin site's agent with --driver netns)",
            });
        }
        if spec.name.is_empty()
            || spec
                .name
                .contains(|c: char| matches!(c, '/' | ':' | ',' | '=') || c.is_whitespace())
        {
            return Err(DriverError::Config(format!(
                "VM name {} is not usable in file names and qemu options",
                crate::validate::quote(&spec.name)
            )));
        }
        let f = self.files(spec.local());
        let handle_vm = spec.local().to_string();
        // Leftovers of an earlier run of this VM.
        kill_pidfile(&f.qemu_pid, &f.console.display().to_string());
        kill_pidfile(&f.xnbd_pid, &f.nbd.display().to_string());
        let tap = self.tap_for(spec);
        let mut children = Vec::new();
        let started = self.start_inner(spec, &tap, &f, &mut children);
        let vm = running_or_ended(format!("qemu:{tap}:{handle_vm}"), children, started);
        if vm.is_err() {
            let _ = run("ip", &["link", "del", &tap]);
        }
        vm
    }

    fn stop(&mut self, vm: &mut RunningVm) -> Result<(), DriverError> {
        end_children(vm);
        self.cleanup(&vm.handle);
        Ok(())
    }

    fn cleanup(&mut self, handle: &str) {
        let Ok((tap, vm)) = Self::parse_handle(handle) else {
            return;
        };
        let f = self.files(vm);
        kill_pidfile(&f.qemu_pid, &f.console.display().to_string());
        kill_pidfile(&f.xnbd_pid, &f.nbd.display().to_string());
        let _ = std::fs::remove_file(&f.nbd);
        let _ = std::fs::remove_file(&f.console);
        let _ = std::fs::remove_file(f.console.with_extension("ga"));
        let _ = run("ip", &["link", "del", tap]);
    }

    fn handle_for(&self, local: &str, nic: &str) -> String {
        format!("qemu:{nic}:{local}")
    }

    fn present(&self, handle: &str) -> bool {
        let Ok((tap, vm)) = Self::parse_handle(handle) else {
            return false;
        };
        let f = self.files(vm);
        link_exists(tap)
            || [&f.qemu_pid, &f.xnbd_pid, &f.nbd, &f.console]
                .iter()
                .any(|p| p.exists())
    }

    fn alive(&self, handle: &str) -> bool {
        let Ok((_, vm)) = Self::parse_handle(handle) else {
            return false;
        };
        let f = self.files(vm);
        pidfile_alive(&f.qemu_pid, &f.console.display().to_string()) && f.disk_server_alive()
    }

    fn discard(&mut self, vm: &str) {
        discard_disk(&self.cfg.disk_dir, vm);
    }

    fn address(&self, handle: &str) -> Result<Option<Ipv4Addr>, DriverError> {
        let (_, vm) = Self::parse_handle(handle)?;
        Ok(self.files(vm).lease())
    }

    fn ping(&self, handle: &str, target: Ipv4Addr) -> Result<Option<f64>, DriverError> {
        let (_, vm) = Self::parse_handle(handle)?;
        self.files(vm).ping(vm, target)
    }

    fn start_incoming(
        &mut self,
        spec: &VmSpec,
        disk: crate::migrate::IncomingDisk,
        incoming: &Path,
    ) -> Result<RunningVm, DriverError> {
        self.start_incoming_qemu(spec, disk, incoming)
    }

    fn guest_agent(&self, handle: &str) -> Option<PathBuf> {
        self.guest_socket(handle)
    }
}

impl QemuDriver {
    /// [`VmDriver::start_incoming`]: the disk is `xnbd proxy --no-background` whose
    /// cache becomes the VM's disk file (the background copy is started at
    /// switchover), or `xnbd serve` of an empty disk the origin mirrors into; qemu
    /// waits with `-incoming unix:<incoming>`; both with the same files, pid files and
    /// command line marks as a started VM, so stop, cleanup and adoption treat it like
    /// one.
    fn start_incoming_qemu(
        &mut self,
        spec: &VmSpec,
        disk: crate::migrate::IncomingDisk,
        incoming: &Path,
    ) -> Result<RunningVm, DriverError> {
        use crate::migrate::IncomingDisk;
        let f = self.files(spec.local());
        kill_pidfile(&f.qemu_pid, &f.console.display().to_string());
        kill_pidfile(&f.xnbd_pid, &f.nbd.display().to_string());
        let (source, ctl) = match disk {
            IncomingDisk::Proxy { source, ctl, .. } => (source, ctl),
            IncomingDisk::Mirror { .. } => (incoming, incoming),
        };
        check_sockets(&[ctl, incoming, source], SOCK_HINT)?;
        f.clear_sockets(SOCK_HINT)?;
        for s in [ctl, incoming] {
            let _ = std::fs::remove_file(s);
        }
        f.clear_disk();
        std::fs::create_dir_all(&self.cfg.disk_dir)
            .map_err(|e| DriverError::Config(format!("{}: {e}", self.cfg.disk_dir.display())))?;
        let boot = self.boot_files_for(spec.stack)?;
        let tap = self.tap_for(spec);
        let mut children = Vec::new();
        let mode = disk;
        let started = (|| {
            let mut xnbd = match mode {
                IncomingDisk::Proxy { source, ctl, rate } => {
                    f.spawn_proxy(&self.cfg.xnbd, &spec.name, source, ctl, rate)?
                }
                IncomingDisk::Mirror { size } => {
                    let tmp = f.disk.with_extension("img.tmp");
                    std::fs::File::create(&tmp)
                        .and_then(|d| d.set_len(size))
                        .and_then(|()| std::fs::rename(&tmp, &f.disk))
                        .map_err(|e| DriverError::Config(format!("{}: {e}", f.disk.display())))?;
                    f.spawn_server(&self.cfg.xnbd, &spec.name)?
                }
            };
            let waited = Self::wait_socket(&f.nbd, &mut xnbd, "xnbd proxy", &f.xnbd_log);
            children.push(xnbd);
            waited?;
            run("ip", &["tuntap", "add", "dev", &tap, "mode", "tap"])?;
            run("ip", &["link", "set", &tap, "master", &spec.bridge, "up"])?;
            let accel = self.accel();
            let mut args = Self::args(
                spec,
                &tap,
                &boot,
                &f.nbd,
                &f.console,
                &f.console_log,
                &f.qemu_pid,
                accel,
                self.cfg.vcpus,
                &self.cfg.append,
            );
            args.push("-incoming".into());
            args.push(format!("unix:{}", incoming.display()));
            if let IncomingDisk::Mirror { .. } = mode {
                // Paused after the memory arrived, until the mirror completed.
                args.push("-S".into());
            }
            let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
            let _ = std::fs::remove_file(&f.log);
            let _ = std::fs::remove_file(&f.console_log);
            let mut qemu = spawn(&self.cfg.qemu, &a, &[], &f.log)?;
            let waited = Self::wait_socket(incoming, &mut qemu, "qemu -incoming", &f.log);
            children.insert(0, qemu);
            waited
        })();
        let vm = running_or_ended(format!("qemu:{tap}:{}", spec.local()), children, started);
        if vm.is_err() {
            let _ = run("ip", &["link", "del", &tap]);
        }
        vm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{parse_lease, parse_ping_avg};
    use crate::model::Mac;

    #[test]
    fn qemu_command_line() {
        let spec = VmSpec {
            cluster: "k".into(),
            name: "k-c1".into(),
            role: Role::Compute,
            host: "h0".into(),
            mac: Mac([2, 1, 0, 0, 0, 9]),
            memory_mb: 768,
            bridge: "mvb1".into(),
            dhcp: None,
            local_name: String::new(),
            nic: String::new(),
            stack: false,
        };
        let boot = BootFiles {
            kernel: "/c/vmlinuz".into(),
            initrd: "/c/initramfs.cpio".into(),
        };
        let a = QemuDriver::args(
            &spec,
            "mvq1",
            &boot,
            Path::new("/r/k-c1.nbd"),
            Path::new("/r/k-c1.console"),
            Path::new("/r/k-c1.console.log"),
            Path::new("/r/k-c1.qemu.pid"),
            "tcg",
            2,
            "quiet",
        );
        let s = a.join(" ");
        assert!(s.contains("accel=tcg"));
        assert!(s.contains("-m 768"));
        assert!(s.contains("-smp 2"));
        assert!(s.contains("ifname=mvq1"));
        assert!(s.contains("mac=02:01:00:00:00:09"));
        assert!(s.contains("-kernel /c/vmlinuz -initrd /c/initramfs.cpio"));
        assert!(s.contains("server.type=unix,server.path=/r/k-c1.nbd,export=k-c1"));
        assert!(s.contains("virtio-blk-pci,drive=disk0"));
        assert!(
            s.contains("-qmp unix:/r/k-c1.qmp,server=on,wait=off"),
            "{s}"
        );
        let append = &a[a.iter().position(|x| x == "-append").unwrap() + 1];
        assert_eq!(
            append,
            "console=ttyS0 panic=-1 loglevel=4 no_timer_check mvc.name=k-c1 quiet"
        );
    }

    #[test]
    fn qemu_refuses_frontends_and_unusable_names_before_touching_anything() {
        let d = tempfile::tempdir().unwrap();
        let mut drv = QemuDriver::new(QemuConfig::new(d.path()));
        let mut spec = VmSpec {
            cluster: "k".into(),
            name: "k-fe".into(),
            role: Role::Frontend,
            host: "h0".into(),
            mac: Mac([2, 1, 0, 0, 0, 1]),
            memory_mb: 256,
            bridge: "mvb1".into(),
            dhcp: None,
            local_name: String::new(),
            nic: String::new(),
            stack: false,
        };
        let e = drv.start(&spec).err().unwrap().to_string();
        assert!(e.contains("frontend"), "{e}");
        spec.role = Role::Compute;
        for bad in ["", "a/b", "a=b", "a,b", "a b", "a:b"] {
            spec.name = bad.into();
            let e = drv.start(&spec).err().unwrap().to_string();
            assert!(e.contains("not usable"), "{bad:?}: {e}");
        }
        assert!(std::fs::read_dir(d.path()).unwrap().next().is_none());
    }

    #[test]
    fn qemu_handles_and_leases() {
        assert_eq!(
            QemuDriver::parse_handle("qemu:mvq3:t-c3").unwrap(),
            ("mvq3", "t-c3")
        );
        assert!(QemuDriver::parse_handle("qemu:mvq3").is_err());
        assert!(QemuDriver::parse_handle("qemu:mvq3:../x").is_err());
        assert!(QemuDriver::parse_handle("netns:x").is_err());
        let log = "[    1.2] virtio_net\r\nMVC-DISK written boot 1\r\n\
                   MVC-LEASE 198.19.1.12\r\n~ # \r\nMVC-LEASE 198.19.1.13\r\n";
        assert_eq!(parse_lease(log), Some(Ipv4Addr::new(198, 19, 1, 13)));
        assert_eq!(parse_lease("MVC-LEASE 198.19.1.13\nMVC-LEASE none\n"), None);
        assert_eq!(parse_lease(""), None);
        let busybox = "3 packets transmitted, 3 packets received, 0% packet loss\n\
                       round-trip min/avg/max = 0.812/1.204/1.532 ms\n";
        assert_eq!(parse_ping_avg(busybox), Some(1.204));
    }
}
