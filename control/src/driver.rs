//! VM drivers: how an agent turns a [`VmSpec`] into a running machine on a bridge.
//!
//! - [`NetnsDriver`]: a light VM, a network namespace whose `eth0` (a veth with the
//!   allocated MAC) is enslaved to the cluster bridge. Processes of the "VM" run with
//!   `ip netns exec`. The default for demos and tests: it starts in milliseconds.
//! - [`QemuDriver`]: a real VM with `qemu-system-x86_64`, a TAP on the bridge,
//!   virtio-net with the allocated MAC, KVM when `/dev/kvm` exists and TCG otherwise,
//!   booting a copy-on-write overlay of a base image.
//!
//! A libvirt (KVM/Xen) driver plugs in the same way: `start` defines a domain whose
//! `<interface type='bridge'>` names the cluster bridge and the MAC, and starts it;
//! `stop` destroys and undefines it; `address` reads the guest's lease. See
//! docs/CONTROLLER.md.
use crate::model::Role;
use crate::proto::VmSpec;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Driver failures.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// A helper command failed.
    #[error("`{cmd}` failed: {msg}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its stderr or the spawn error.
        msg: String,
    },
    /// The driver cannot do this.
    #[error("the {driver} driver does not support {what}")]
    Unsupported {
        /// Driver name.
        driver: &'static str,
        /// The operation.
        what: &'static str,
    },
    /// Configuration problem.
    #[error("{0}")]
    Config(String),
}

/// Run a command to completion; stdout on success, a [`DriverError`] with its stderr
/// otherwise.
pub fn run(prog: &str, args: &[&str]) -> Result<String, DriverError> {
    let cmd = || format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| DriverError::Command {
            cmd: cmd(),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(DriverError::Command {
            cmd: cmd(),
            msg: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Spawn a long-running helper with stdout/stderr to `log`.
pub fn spawn(
    prog: &str,
    args: &[&str],
    env: &[(&str, &str)],
    log: &Path,
) -> Result<Child, DriverError> {
    let cmd = || format!("{prog} {}", args.join(" "));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| DriverError::Command {
            cmd: cmd(),
            msg: format!("log {}: {e}", log.display()),
        })?;
    let f2 = f.try_clone().map_err(|e| DriverError::Command {
        cmd: cmd(),
        msg: e.to_string(),
    })?;
    let mut c = Command::new(prog);
    c.args(args).stdin(Stdio::null()).stdout(f).stderr(f2);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().map_err(|e| DriverError::Command {
        cmd: cmd(),
        msg: e.to_string(),
    })
}

/// Stop a child: SIGTERM, up to 3 s grace, then SIGKILL; always reaped.
pub fn stop_child(child: &mut Child) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        // SAFETY: kill(2) with a pid we spawned and have not reaped yet (try_wait above
        // returned None), so the pid cannot have been reused.
        unsafe {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    for _ in 0..30 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A VM the driver started: its handle and the helper processes it owns.
pub struct RunningVm {
    /// `netns:<name>` or `qemu:<tap>`.
    pub handle: String,
    /// Helper processes (dnsmasq, DHCP client, qemu).
    pub children: Vec<Child>,
}

/// What every VM driver does.
pub trait VmDriver: Send {
    /// Driver name (`netns`, `qemu`).
    fn kind(&self) -> &'static str;
    /// Create and boot the VM on `spec.bridge` with `spec.mac`.
    fn start(&mut self, spec: &VmSpec) -> Result<RunningVm, DriverError>;
    /// Stop it and remove everything `start` created.
    fn stop(&mut self, vm: &mut RunningVm) -> Result<(), DriverError>;
    /// Remove leftovers of a VM from a previous agent run, by handle.
    fn cleanup(&mut self, handle: &str);
    /// The IPv4 address on the VM's overlay NIC, if it has one yet.
    fn address(&self, handle: &str) -> Result<Option<Ipv4Addr>, DriverError>;
    /// Median RTT in ms from inside the VM to `target`, `None` if unreachable.
    fn ping(&self, handle: &str, target: Ipv4Addr) -> Result<Option<f64>, DriverError>;
}

/// Light VMs in network namespaces.
pub struct NetnsDriver {
    /// Prefix of namespace names (keeps parallel runs apart).
    pub prefix: String,
    /// Where logs, leases and the DHCP client script go.
    pub run_dir: PathBuf,
    counter: u32,
}

const UDHCPC_SCRIPT: &str = "#!/bin/sh\n\
# Applies a DHCP lease from the cluster frontend to the VM's NIC (written by mvc agent).\n\
case \"$1\" in\n\
  deconfig) ip -4 addr flush dev \"$interface\"; ip link set \"$interface\" up ;;\n\
  bound|renew) ip -4 addr flush dev \"$interface\"; ip addr add \"$ip/${mask:-24}\" dev \"$interface\" ;;\n\
esac\n\
exit 0\n";

impl NetnsDriver {
    /// A driver keeping its files in `run_dir`.
    pub fn new(prefix: &str, run_dir: &Path) -> NetnsDriver {
        NetnsDriver {
            prefix: prefix.into(),
            run_dir: run_dir.into(),
            counter: 0,
        }
    }

    /// Namespace name of a VM.
    pub fn ns_name(&self, vm: &str) -> String {
        format!("{}{vm}", self.prefix)
    }

    fn free_veth(&mut self) -> String {
        loop {
            self.counter += 1;
            let name = format!("mvv{}", self.counter);
            if !Path::new("/sys/class/net").join(&name).exists()
                && run("ip", &["link", "show", &name]).is_err()
            {
                return name;
            }
        }
    }

    fn ns_of(handle: &str) -> Result<&str, DriverError> {
        handle
            .strip_prefix("netns:")
            .ok_or_else(|| DriverError::Config(format!("not a netns handle: {handle}")))
    }
}

impl VmDriver for NetnsDriver {
    fn kind(&self) -> &'static str {
        "netns"
    }

    fn start(&mut self, spec: &VmSpec) -> Result<RunningVm, DriverError> {
        let ns = self.ns_name(&spec.name);
        if Path::new("/run/netns").join(&ns).exists() {
            self.cleanup(&format!("netns:{ns}"));
        }
        let veth = self.free_veth();
        let peer = format!("{veth}p");
        let mac = spec.mac.to_string();
        run("ip", &["netns", "add", &ns])?;
        let made = (|| -> Result<Vec<Child>, DriverError> {
            run(
                "ip",
                &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            )?;
            run("ip", &["link", "set", &peer, "netns", &ns])?;
            run("ip", &["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            run(
                "ip",
                &["-n", &ns, "link", "set", "eth0", "address", &mac, "up"],
            )?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["link", "set", &veth, "master", &spec.bridge, "up"])?;
            let mut children = Vec::new();
            let log = self.run_dir.join(format!("{}.log", spec.name));
            match (spec.role, &spec.dhcp) {
                (Role::Frontend, Some(d)) => {
                    let cidr = format!("{}/{}", d.address, d.prefix);
                    run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
                    let mask = prefix_mask(d.prefix);
                    let mut args = vec![
                        "netns".to_string(),
                        "exec".into(),
                        ns.clone(),
                        "dnsmasq".into(),
                        "--keep-in-foreground".into(),
                        "--no-resolv".into(),
                        "--no-hosts".into(),
                        "--port=0".into(),
                        "--user=root".into(),
                        "--interface=eth0".into(),
                        "--bind-interfaces".into(),
                        "--dhcp-authoritative".into(),
                        "--log-dhcp".into(),
                        "--log-facility=-".into(),
                        format!("--dhcp-range={},{},{mask},12h", d.range.0, d.range.1),
                        format!(
                            "--dhcp-leasefile={}",
                            self.run_dir.join(format!("{}.leases", spec.name)).display()
                        ),
                        format!(
                            "--pid-file={}",
                            self.run_dir
                                .join(format!("{}.dnsmasq.pid", spec.name))
                                .display()
                        ),
                    ];
                    for (m, ip, name) in &d.hosts {
                        args.push(format!("--dhcp-host={m},{ip},{name}"));
                    }
                    let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
                    children.push(spawn("ip", &a, &[], &log)?);
                }
                (Role::Frontend, None) => {
                    return Err(DriverError::Config(
                        "frontend VM without DHCP service".into(),
                    ))
                }
                (Role::Compute, _) => {
                    let script = self.run_dir.join("udhcpc.script");
                    std::fs::write(&script, UDHCPC_SCRIPT)
                        .and_then(|_| {
                            use std::os::unix::fs::PermissionsExt;
                            std::fs::set_permissions(
                                &script,
                                std::fs::Permissions::from_mode(0o755),
                            )
                        })
                        .map_err(|e| DriverError::Config(format!("udhcpc script: {e}")))?;
                    let script = script.display().to_string();
                    let host = format!("hostname:{}", spec.name);
                    children.push(spawn(
                        "ip",
                        &[
                            "netns", "exec", &ns, "udhcpc", "-f", "-i", "eth0", "-s", &script,
                            "-t", "60", "-T", "1", "-A", "1", "-x", &host,
                        ],
                        &[],
                        &log,
                    )?);
                }
            }
            Ok(children)
        })();
        match made {
            Ok(children) => Ok(RunningVm {
                handle: format!("netns:{ns}"),
                children,
            }),
            Err(e) => {
                let _ = run("ip", &["link", "del", &veth]);
                self.cleanup(&format!("netns:{ns}"));
                Err(e)
            }
        }
    }

    fn stop(&mut self, vm: &mut RunningVm) -> Result<(), DriverError> {
        for c in &mut vm.children {
            stop_child(c);
        }
        vm.children.clear();
        self.cleanup(&vm.handle);
        Ok(())
    }

    fn cleanup(&mut self, handle: &str) {
        let Ok(ns) = Self::ns_of(handle) else { return };
        // Processes still inside the VM (an MPI rank, a shell) belong to the VM: end them.
        if let Ok(pids) = run("ip", &["netns", "pids", ns]) {
            for pid in pids
                .split_whitespace()
                .filter_map(|p| p.parse::<i32>().ok())
            {
                // SAFETY: kill(2) has no memory-safety preconditions; the pids are
                // processes inside the namespace this driver created for the VM.
                unsafe {
                    libc::kill(pid, libc::SIGKILL);
                }
            }
        }
        let _ = run("ip", &["netns", "del", ns]);
    }

    fn address(&self, handle: &str) -> Result<Option<Ipv4Addr>, DriverError> {
        let ns = Self::ns_of(handle)?;
        let out = run("ip", &["-n", ns, "-4", "-o", "addr", "show", "dev", "eth0"])?;
        Ok(parse_inet(&out))
    }

    fn ping(&self, handle: &str, target: Ipv4Addr) -> Result<Option<f64>, DriverError> {
        let ns = Self::ns_of(handle)?;
        let t = target.to_string();
        let out = Command::new("ip")
            .args([
                "netns", "exec", ns, "ping", "-n", "-q", "-c", "5", "-i", "0.2", "-W", "2", &t,
            ])
            .stdin(Stdio::null())
            .output()
            .map_err(|e| DriverError::Command {
                cmd: format!("ping {t}"),
                msg: e.to_string(),
            })?;
        Ok(parse_ping_avg(&String::from_utf8_lossy(&out.stdout)))
    }
}

/// First `inet a.b.c.d/n` of `ip -o addr` output.
pub fn parse_inet(out: &str) -> Option<Ipv4Addr> {
    let mut it = out.split_whitespace();
    while let Some(w) = it.next() {
        if w == "inet" {
            return it.next()?.split('/').next()?.parse().ok();
        }
    }
    None
}

/// The average of `rtt min/avg/max/mdev = a/b/c/d ms` from ping's summary.
pub fn parse_ping_avg(out: &str) -> Option<f64> {
    let line = out.lines().find(|l| l.contains("min/avg/max"))?;
    let nums = line.split('=').nth(1)?.trim();
    nums.split('/').nth(1)?.trim().parse().ok()
}

fn prefix_mask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}

/// Real VMs with qemu-system-x86_64.
pub struct QemuDriver {
    /// Base disk image (qcow2 or raw) each VM boots a copy-on-write overlay of.
    pub image: PathBuf,
    /// Where overlays and logs go.
    pub run_dir: PathBuf,
    /// QEMU binary.
    pub qemu: String,
    counter: u32,
}

impl QemuDriver {
    /// A driver booting overlays of `image`.
    pub fn new(image: &Path, run_dir: &Path) -> QemuDriver {
        QemuDriver {
            image: image.into(),
            run_dir: run_dir.into(),
            qemu: "qemu-system-x86_64".into(),
            counter: 0,
        }
    }

    /// The accelerator: KVM when /dev/kvm can be opened, TCG otherwise.
    pub fn accel() -> &'static str {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok()
        {
            "kvm"
        } else {
            "tcg"
        }
    }

    /// The qemu command line for `spec` on `tap` with disk `disk`.
    pub fn args(spec: &VmSpec, tap: &str, disk: &Path, accel: &str) -> Vec<String> {
        vec![
            "-name".into(),
            spec.name.clone(),
            "-machine".into(),
            format!("q35,accel={accel}"),
            "-m".into(),
            spec.memory_mb.to_string(),
            "-smp".into(),
            "1".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "null".into(),
            "-netdev".into(),
            format!("tap,id=n0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            format!("virtio-net-pci,netdev=n0,mac={}", spec.mac),
            "-drive".into(),
            format!("file={},if=virtio,format=qcow2", disk.display()),
        ]
    }
}

impl VmDriver for QemuDriver {
    fn kind(&self) -> &'static str {
        "qemu"
    }

    fn start(&mut self, spec: &VmSpec) -> Result<RunningVm, DriverError> {
        self.counter += 1;
        let tap = format!("mvq{}", self.counter);
        let disk = self.run_dir.join(format!("{}.qcow2", spec.name));
        let base = self.image.display().to_string();
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "qcow2",
                "-b",
                &base,
                &disk.display().to_string(),
            ],
        )?;
        run("ip", &["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        run("ip", &["link", "set", &tap, "master", &spec.bridge, "up"])?;
        let args = Self::args(spec, &tap, &disk, Self::accel());
        let a: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        let log = self.run_dir.join(format!("{}.log", spec.name));
        match spawn(&self.qemu, &a, &[], &log) {
            Ok(child) => Ok(RunningVm {
                handle: format!("qemu:{tap}"),
                children: vec![child],
            }),
            Err(e) => {
                let _ = run("ip", &["link", "del", &tap]);
                Err(e)
            }
        }
    }

    fn stop(&mut self, vm: &mut RunningVm) -> Result<(), DriverError> {
        for c in &mut vm.children {
            stop_child(c);
        }
        vm.children.clear();
        self.cleanup(&vm.handle);
        Ok(())
    }

    fn cleanup(&mut self, handle: &str) {
        if let Some(tap) = handle.strip_prefix("qemu:") {
            let _ = run("ip", &["link", "del", tap]);
        }
    }

    fn address(&self, _handle: &str) -> Result<Option<Ipv4Addr>, DriverError> {
        Err(DriverError::Unsupported {
            driver: "qemu",
            what: "reading the guest address (read the frontend's DHCP leases instead)",
        })
    }

    fn ping(&self, _handle: &str, _target: Ipv4Addr) -> Result<Option<f64>, DriverError> {
        Err(DriverError::Unsupported {
            driver: "qemu",
            what: "running ping inside the guest",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Mac;

    #[test]
    fn parsers() {
        let o = "5: eth0    inet 198.19.1.10/24 brd 198.19.1.255 scope global eth0\n";
        assert_eq!(parse_inet(o), Some(Ipv4Addr::new(198, 19, 1, 10)));
        assert_eq!(parse_inet(""), None);
        let p = "5 packets transmitted, 5 received, 0% packet loss, time 801ms\n\
                 rtt min/avg/max/mdev = 0.051/0.072/0.101/0.017 ms\n";
        assert_eq!(parse_ping_avg(p), Some(0.072));
        assert_eq!(parse_ping_avg("100% packet loss"), None);
        assert_eq!(prefix_mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_mask(0), Ipv4Addr::new(0, 0, 0, 0));
    }

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
        };
        let a = QemuDriver::args(&spec, "mvq1", Path::new("/tmp/k-c1.qcow2"), "tcg").join(" ");
        assert!(a.contains("accel=tcg"));
        assert!(a.contains("-m 768"));
        assert!(a.contains("ifname=mvq1"));
        assert!(a.contains("mac=02:01:00:00:00:09"));
    }
}
