//! A libvirtd and virtlogd of a test's own inside one site's network namespace, with
//! private `/run/libvirt`, `/var/lib/libvirt`, `/var/cache/libvirt`, `/var/log/libvirt`
//! and `/etc/libvirt` (bind mounts in a mount namespace of their own), reached through
//! `qemu:///system?socket=...`: libvirtd puts a domain's TAP on a bridge of its own
//! namespace, and a lab's site is a namespace.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The tools a libvirt test needs, asserted present.
pub fn assert_libvirt_tools() {
    for tool in ["libvirtd", "virtlogd", "virsh", "qemu-system-x86_64"] {
        assert!(
            lab::run(&["sh", "-c", &format!("command -v {tool}")]).is_ok(),
            "{tool} missing: install libvirt-daemon-system, libvirt-daemon-driver-qemu, \
             libvirt-clients and qemu-system-x86 (.ci/setup-deps)"
        );
    }
}

/// What a libvirt lab test starts from, for the test `name` with lab names starting
/// `prefix`: `None` (printed as skipped) when not root; else, the libvirt tools asserted
/// present, the binaries under test (`mvc`, `xnbd`), the qemu guest's cache directory,
/// the overlay, and a three-site lab with its topology.
pub fn libvirt_lab(
    name: &str,
    prefix: &str,
) -> Option<(PathBuf, PathBuf, String, String, lab::Lab, lab::Topology)> {
    if !lab::is_root() {
        lab::skip(name, "needs root for network namespaces, libvirtd and TAPs");
        return None;
    }
    assert_libvirt_tools();
    let (mvc, xnbd) = super::mvc_and_xnbd();
    let cache = super::prepare_qemu_guest(&mvc);
    let overlay = super::overlay_under_test(&mvc);
    let lab = lab::Lab::new(prefix).expect("lab");
    let topo = lab::Topology::three_sites(&lab, 0).expect("topology");
    Some((mvc, xnbd, cache, overlay, lab, topo))
}

/// The agent options of a libvirt site served by `lv` (disks of `disk_mb` MiB), with
/// or without accepting migrations.
pub fn libvirt_agent_args(
    lv: &Libvirtd,
    cache: &str,
    xnbd: &Path,
    disk_mb: u64,
    accept_migrations: bool,
) -> Vec<String> {
    let mut a: Vec<String> = [
        "--driver",
        "libvirt",
        "--libvirt-uri",
        &lv.uri,
        "--libvirt-sock-dir",
        &lv.sock_dir.display().to_string(),
        "--qemu-cache",
        cache,
        "--xnbd",
        &xnbd.display().to_string(),
        "--qemu-disk-mb",
        &disk_mb.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if accept_migrations {
        a.push("--libvirt-accept-migrations".into());
    }
    a
}

/// A libvirtd and virtlogd of this test in one namespace; on drop every domain of it is
/// destroyed, both daemons end (by pid) and the socket directory goes.
pub struct Libvirtd {
    dir: PathBuf,
    /// Its URI, for `--libvirt-uri`.
    pub uri: String,
    /// The agent's `--libvirt-sock-dir` (removed on drop).
    pub sock_dir: PathBuf,
}

impl Libvirtd {
    /// Start one in namespace `ns`, its files under `dir`.
    pub fn start(ns: &str, dir: &Path, sock_dir: &Path) -> Libvirtd {
        let sub = ["run", "lib", "cache", "log", "etc"];
        for s in sub {
            std::fs::create_dir_all(dir.join(s)).unwrap();
        }
        lab::run(&[
            "cp",
            "-a",
            "/etc/libvirt/.",
            &dir.join("etc").display().to_string(),
        ])
        .expect("copy /etc/libvirt");
        // qemu as root: libvirt checks whether qemu's user may open /dev/kvm each time
        // it looks at qemu's capabilities, and where it may not (this machine's /dev/kvm
        // is root's alone) it probes them again for every domain it defines (40-60 s
        // each on the loaded test machine). The driver still hands the sockets to the
        // libvirt-qemu group, as for a qemu of that group.
        let conf = dir.join("etc/qemu.conf");
        let mut text = std::fs::read_to_string(&conf).unwrap_or_default();
        text.push_str("\nuser = \"+0\"\ngroup = \"+0\"\n");
        std::fs::write(&conf, text).unwrap();
        let d = dir.display();
        let script = format!(
            "set -e
mount --make-rprivate /
mkdir -p /run/libvirt
mount --bind {d}/run /run/libvirt
mount --bind {d}/lib /var/lib/libvirt
mount --bind {d}/cache /var/cache/libvirt
mount --bind {d}/log /var/log/libvirt
mount --bind {d}/etc /etc/libvirt
virtlogd -d -p {d}/virtlogd.pid
libvirtd -d -p {d}/libvirtd.pid
"
        );
        let me = Libvirtd {
            dir: dir.into(),
            uri: format!("qemu:///system?socket={d}/run/libvirt-sock"),
            sock_dir: sock_dir.into(),
        };
        lab::run(&[
            "nsenter",
            &format!("--net=/run/netns/{ns}"),
            "unshare",
            "-m",
            "sh",
            "-c",
            &script,
        ])
        .expect("start libvirtd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while me.virsh(&["version"]).is_none() {
            assert!(Instant::now() < deadline, "libvirtd did not answer in 30 s");
            std::thread::sleep(Duration::from_millis(200));
        }
        me
    }

    /// `virsh -q ARGS` against it; its output, `None` when it failed.
    pub fn virsh(&self, args: &[&str]) -> Option<String> {
        let mut a = vec!["virsh", "-c", &self.uri, "-q"];
        a.extend_from_slice(args);
        lab::run(&a).ok().map(|o| o.stdout)
    }

    /// Every domain it has, running or not.
    pub fn domains(&self) -> Vec<String> {
        self.virsh(&["list", "--all", "--name"])
            .unwrap_or_default()
            .lines()
            .map(|l| l.trim().to_string())
            .filter(|l| !l.is_empty())
            .collect()
    }
}

impl Drop for Libvirtd {
    fn drop(&mut self) {
        for d in self.domains() {
            let _ = self.virsh(&["destroy", &d]);
            let _ = self.virsh(&["undefine", &d]);
        }
        for (file, name) in [("libvirtd.pid", "libvirtd"), ("virtlogd.pid", "virtlogd")] {
            let pid = std::fs::read_to_string(self.dir.join(file))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            // Only the daemon this test started (its pid file, its command name).
            if let Some(pid) = pid.filter(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == name)
            }) {
                let _ = lab::sys::kill(pid, libc::SIGTERM);
            }
        }
        let _ = std::fs::remove_dir_all(&self.sock_dir);
    }
}
