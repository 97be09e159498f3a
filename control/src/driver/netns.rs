//! The netns driver: light VMs, each a network namespace whose `eth0` is a veth with
//! the allocated MAC, its other end enslaved to the cluster bridge.
use super::{link_exists, parse_ping_avg, DriverError, RunningVm, VmDriver};
use crate::model::Role;
use crate::process::{run, spawn, stop_child};
use crate::proto::VmSpec;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// Size of a light VM's disk file.
pub const DISK_BYTES: u64 = 8 << 20;

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

    pub(super) fn free_veth(&mut self) -> String {
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

    /// What a VM about to start in namespace `ns` takes over: a leftover of that
    /// namespace is removed (the agent's store names it as the VM's, so it is
    /// ours), and its host-side veth name is the one `spec` names (a leftover link
    /// of that name deleted) or a free one.
    pub(super) fn reclaim_ns_and_veth(&mut self, spec: &VmSpec, ns: &str) -> String {
        if Path::new("/run/netns").join(ns).exists() {
            self.cleanup(&format!("netns:{ns}"));
        }
        if spec.nic.is_empty() {
            self.free_veth()
        } else {
            if link_exists(&spec.nic) {
                let _ = run("ip", &["link", "del", &spec.nic]);
            }
            spec.nic.clone()
        }
    }

    /// The VM's disk file (`<state>/disks/<local>.img`; `run_dir` is `<state>/run`).
    pub fn disk_path(&self, local: &str) -> PathBuf {
        self.run_dir
            .parent()
            .unwrap_or(&self.run_dir)
            .join("disks")
            .join(format!("{local}.img"))
    }

    /// A light VM's disk: a sparse file of [`DISK_BYTES`] made at its first start and
    /// kept across stop and start (removed with its cluster), which processes of the
    /// VM may use as a plain file; it moves with the VM through the xnbd proxy.
    fn ensure_disk(&self, local: &str) -> Result<(), DriverError> {
        let disk = self.disk_path(local);
        if disk.exists() {
            return Ok(());
        }
        let err = |e: std::io::Error| DriverError::Config(format!("{}: {e}", disk.display()));
        if let Some(d) = disk.parent() {
            std::fs::create_dir_all(d).map_err(err)?;
        }
        let tmp = disk.with_extension("img.tmp");
        std::fs::File::create(&tmp)
            .and_then(|f| f.set_len(DISK_BYTES))
            .and_then(|()| std::fs::rename(&tmp, &disk))
            .map_err(err)
    }

    pub(super) fn ns_of(handle: &str) -> Result<&str, DriverError> {
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
        let local = spec.local();
        let ns = self.ns_name(local);
        let veth = self.reclaim_ns_and_veth(spec, &ns);
        let peer = format!("{veth}p");
        let mac = spec.mac.to_string();
        self.ensure_disk(local)?;
        run("ip", &["netns", "add", &ns])?;
        crate::failpoint::hit("vm-netns");
        let made = (|| -> Result<Vec<Child>, DriverError> {
            run(
                "ip",
                &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            )?;
            crate::failpoint::hit("vm-veth");
            run("ip", &["link", "set", &peer, "netns", &ns])?;
            run("ip", &["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
            run(
                "ip",
                &["-n", &ns, "link", "set", "eth0", "address", &mac, "up"],
            )?;
            run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
            run("ip", &["link", "set", &veth, "master", &spec.bridge, "up"])?;
            let mut children = Vec::new();
            let log = self.run_dir.join(format!("{local}.log"));
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
                            self.run_dir.join(format!("{local}.leases")).display()
                        ),
                        format!(
                            "--pid-file={}",
                            self.run_dir.join(format!("{local}.dnsmasq.pid")).display()
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
                    // Written aside and renamed: a DHCP client of another VM may be
                    // running the script right now and must never read it half written.
                    let script = self.run_dir.join("udhcpc.script");
                    let tmp = self.run_dir.join(format!("udhcpc.script.{local}"));
                    std::fs::write(&tmp, UDHCPC_SCRIPT)
                        .and_then(|_| {
                            use std::os::unix::fs::PermissionsExt;
                            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
                        })
                        .and_then(|_| std::fs::rename(&tmp, &script))
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
                // Processes inside the namespace this driver created for the VM.
                crate::sys::signal(pid, libc::SIGKILL);
            }
        }
        let _ = run("ip", &["netns", "del", ns]);
    }

    fn handle_for(&self, local: &str, _nic: &str) -> String {
        format!("netns:{}", self.ns_name(local))
    }

    fn present(&self, handle: &str) -> bool {
        Self::ns_of(handle).is_ok_and(|ns| Path::new("/run/netns").join(ns).exists())
    }

    fn alive(&self, handle: &str) -> bool {
        // Its DHCP server or client still runs inside.
        self.present(handle)
            && Self::ns_of(handle)
                .ok()
                .and_then(|ns| run("ip", &["netns", "pids", ns]).ok())
                .is_some_and(|p| !p.trim().is_empty())
    }

    fn start_incoming(
        &mut self,
        spec: &VmSpec,
        disk: crate::migrate::IncomingDisk,
        incoming: &Path,
    ) -> Result<RunningVm, DriverError> {
        super::netns_migrate::start_incoming(self, spec, disk, incoming)
    }

    fn finish_incoming(&mut self, vm: &mut RunningVm, name: &str) -> Result<(), DriverError> {
        super::netns_migrate::finish_incoming(self, vm, name)
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

pub(super) fn prefix_mask(prefix: u8) -> Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    Ipv4Addr::from(bits)
}
