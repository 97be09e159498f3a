//! `lab`: the project's network-namespace lab, shared by `mvc demo`, the integration
//! tests of the overlay, the controller and the XDP port, and the `bench` measurements.
//!
//! This module (the crate root): namespaces, veth, bridges, NAT routers and "VM" namespaces,
//! background processes tracked by PID, and teardown on drop, panic and (for binaries that
//! call [`install_signal_teardown`]) SIGINT/SIGTERM: processes, every namespace named with
//! the lab's prefix (also those made by processes the lab started) and the temp dir. A lab
//! that keeps a run file ([`Lab::record_run`], [`runs`]) can also be cleaned up after by a
//! later process when it was killed with SIGKILL.
//!
//! Every namespace of a lab is named `<prefix>-<name>`, with a prefix unique to the process
//! and the lab, so parallel runs never clash. Interfaces are created directly inside their
//! namespaces, so their names (<= 15 characters) only have to be unique within one namespace.
//!
//! Addresses stay inside 198.18.0.0/15: the underlay uses 198.18.x.x and overlay (VM)
//! addresses are 198.19.x.x, see [`addr`].
//!
//! - [`sites`]: three sites with an `mvc agent` each and the controller on site A: the
//!   lab of `mvc demo`, the controller's integration tests and `bench build-time`.
//! - [`overlay`]: starting `mvc supernode`/`mvc edge` and Debian's n2n 1.3.1 in a lab, and
//!   reading their status.
//! - [`dhcp`]: a minimal DHCP client, to check that leases cross the overlay.
//! - [`flood`]: junk floods of one frame: a raw packet socket (`sendmmsg` batches), or
//!   seeds from it that a tc program clones on their way out (paced, >= 1 M frames/s).
//! - [`runs`]: run files, and the cleanup of what a killed lab left behind.
//! - [`cpu`]: CPU time of processes and of the kernel over a measured interval.
//! - [`skip`](mod@skip): how a test that cannot run here says so (and leaves a line for CI).
//! - [`sys`]: the system calls (`geteuid`, `setns`, `kill`, ...) and their error type.

pub mod cpu;
pub mod dhcp;
pub mod flood;
pub mod overlay;
pub mod runs;
pub mod sites;
pub mod skip;
pub mod sys;

pub use skip::{skip, skip_unsupported};
pub use sys::SysError;

use crate::runs::RunRecord;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Errors of the lab builder.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A command could not be started at all (missing binary, ...).
    #[error("could not start `{cmd}`: {source}")]
    Spawn {
        /// The command line.
        cmd: String,
        /// The OS error.
        source: io::Error,
    },
    /// A command ran and failed.
    #[error("`{cmd}` failed ({status}): {stderr}")]
    Command {
        /// The command line.
        cmd: String,
        /// Its exit status.
        status: String,
        /// Its standard error (trimmed).
        stderr: String,
    },
    /// Something did not happen in time.
    #[error("timed out after {secs:.1}s: {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        secs: f64,
    },
    /// A tool's output could not be understood.
    #[error("could not parse output of {what}: {detail}")]
    Parse {
        /// Which tool.
        what: String,
        /// What was wrong.
        detail: String,
    },
    /// A system call failed.
    #[error(transparent)]
    Sys(#[from] SysError),
    /// Any other I/O error (log files, temp dirs).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Result type of the lab.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Writes a file only its owner may read (mode 0600), as the edge wants its secret file.
pub fn write_private(path: &Path, data: &[u8]) -> io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An older file keeps its mode through open: set it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)
}

/// True when the process runs as root (the lab needs it).
pub fn is_root() -> bool {
    sys::is_root()
}

/// Address plan of the labs (all inside 198.18.0.0/15).
pub mod addr {
    use std::net::Ipv4Addr;

    /// Link between the internet router and site `s`'s public side: 198.18.s.0/24, the
    /// router is .1, the site's public address is .2.
    pub fn inet_side(s: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, s, 1)
    }
    /// The public address of site `s` (its frontend, or its NAT router).
    pub fn public(s: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, s, 2)
    }
    /// NAT router's inside address on site `s`'s private LAN 198.18.(10+s).0/24.
    pub fn nat_inside(s: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 10 + s, 1)
    }
    /// Frontend address of a NATed site `s` on its private LAN.
    pub fn frontend_private(s: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 10 + s, 2)
    }
    /// The frontend's bridge address on site `s`'s VM LAN 198.18.(100+s).0/24 (the VMs'
    /// gateway for raw underlay traffic).
    pub fn vm_gateway(s: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 100 + s, 1)
    }
    /// Underlay (routed, no overlay) address of VM `i` at site `s`.
    pub fn vm_underlay(s: u8, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 100 + s, 10 + i)
    }
    /// Overlay address of VM `i` at site `s`, in the cluster's 198.19.0.0/16 L2 network.
    pub fn vm_overlay(s: u8, i: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 19, s, 10 + i)
    }
    /// Prefix length of the overlay network.
    pub const OVERLAY_PREFIX: u8 = 16;
    /// A locally administered MAC for VM `i` at site `s`.
    pub fn vm_mac(s: u8, i: u8) -> String {
        format!("02:4d:56:00:{s:02x}:{:02x}", 10 + i)
    }
}

static LAB_SEQ: AtomicU32 = AtomicU32::new(0);

/// What teardown needs: shared with the signal handler through [`registry`].
#[derive(Default)]
struct State {
    prefix: String,
    namespaces: Vec<String>,
    procs: Vec<(u32, String, Child)>,
    down: bool,
    /// The lab's temp dir (removed by [`finish`]).
    dir: PathBuf,
    /// The run file and what it records, when the lab keeps one.
    run: Option<(PathBuf, RunRecord)>,
}

impl State {
    /// Records a process the lab started (in the run file, when there is one).
    fn record_child(&mut self, pid: u32) {
        if let Some((path, rec)) = &mut self.run {
            if let Some(t) = runs::start_time(pid) {
                rec.children.push((pid, t));
                if let Err(e) = rec.write(path) {
                    eprintln!("run file {}: {e}", path.display());
                }
            }
        }
    }
}

fn registry() -> &'static Mutex<Vec<Arc<Mutex<State>>>> {
    static REG: OnceLock<Mutex<Vec<Arc<Mutex<State>>>>> = OnceLock::new();
    REG.get_or_init(|| Mutex::new(Vec::new()))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Whether SIGINT or SIGTERM arrived and [`install_signal_teardown`]'s handler is tearing
/// the labs down (the process exits when it is done): failures seen meanwhile are its
/// doing, not worth reporting.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// When [`interrupted`]: waits (at most a minute) for the signal handler to finish the
/// teardown and exit the process.
pub fn wait_if_interrupted() {
    if interrupted() {
        std::thread::sleep(Duration::from_secs(60));
    }
}

/// Tears every live lab of this process down when SIGINT or SIGTERM arrives (processes,
/// namespaces, temp dirs, run files), then exits with status 130. Call once, early, from
/// a binary.
pub fn install_signal_teardown() -> Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals =
        signal_hook::iterator::Signals::new([SIGINT, SIGTERM]).map_err(|e| SysError {
            call: "signal handler",
            source: e,
        })?;
    std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            INTERRUPTED.store(true, Ordering::SeqCst);
            eprintln!("signal {sig}: tearing the lab down");
            let labs: Vec<_> = lock(registry()).clone();
            for st in labs {
                let mut st = lock(&st);
                teardown(&mut st);
                finish(&mut st);
            }
            std::process::exit(130);
        }
    });
    Ok(())
}

/// Signals one of our own children (or a process inside one of our own namespaces); one
/// that is already gone is no error here.
fn signal_pid(pid: u32, sig: libc::c_int) {
    let _ = sys::kill(pid, sig);
}

fn stop_child(child: &mut Child, grace: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    signal_pid(child.id(), libc::SIGTERM);
    let end = Instant::now() + grace;
    while Instant::now() < end {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn teardown(st: &mut State) {
    if st.down {
        return;
    }
    st.down = true;
    for (_, _, child) in st.procs.iter_mut() {
        if matches!(child.try_wait(), Ok(None)) {
            signal_pid(child.id(), libc::SIGTERM);
        }
    }
    for (_, _, child) in st.procs.iter_mut() {
        stop_child(child, Duration::from_secs(2));
    }
    st.procs.clear();
    // Anything still living in our namespaces was started by this lab (children of our
    // children): end it by PID so the namespaces can go.
    for ns in st.namespaces.iter().rev() {
        if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                if let Ok(pid) = pid.parse::<u32>() {
                    signal_pid(pid, libc::SIGKILL);
                }
            }
        }
    }
    for ns in st.namespaces.iter().rev() {
        let _ = Command::new("ip")
            .args(["netns", "del", ns])
            .stderr(Stdio::null())
            .status();
    }
    st.namespaces.clear();
    // Namespaces the lab's processes made under its prefix (e.g. agents' VM namespaces),
    // left behind when those processes were killed rather than stopped.
    if !st.prefix.is_empty() {
        runs::remove_namespaces(&st.prefix);
    }
}

/// After [`teardown`]: removes the temp dir, then the run file (in that order, so a
/// run file exists as long as anything it names may).
fn finish(st: &mut State) {
    if !st.dir.as_os_str().is_empty() {
        let _ = std::fs::remove_dir_all(&st.dir);
    }
    if let Some((path, _)) = st.run.take() {
        let _ = std::fs::remove_file(path);
    }
}

/// A background process started by a lab.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Its PID.
    pub pid: u32,
    /// A short label (also the log file's name).
    pub name: String,
    /// Its stdout and stderr.
    pub log: PathBuf,
}

/// Output of a command run to completion.
#[derive(Debug)]
pub struct Out {
    /// Exit status was success.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// One lab: a set of network namespaces and the processes running in them.
pub struct Lab {
    prefix: String,
    state: Arc<Mutex<State>>,
    dir: tempfile::TempDir,
}

fn cmd_line(args: &[&str]) -> String {
    args.join(" ")
}

fn check(cmd: String, out: Output) -> Result<Out> {
    let o = Out {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    if o.ok {
        Ok(o)
    } else {
        Err(Error::Command {
            cmd,
            status: out.status.to_string(),
            stderr: o.stderr.trim().to_string(),
        })
    }
}

impl Lab {
    /// A new, empty lab. `tag` (its first 4 ASCII letters) starts the namespace prefix
    /// `<tag><pid>x<seq>`: letters only, so no two processes' prefixes can be equal or
    /// one the start of another followed by `-`.
    pub fn new(tag: &str) -> Result<Lab> {
        let seq = LAB_SEQ.fetch_add(1, Ordering::Relaxed);
        let tag: String = tag
            .chars()
            .filter(char::is_ascii_alphabetic)
            .take(4)
            .collect();
        let prefix = format!("{tag}{}x{seq}", std::process::id());
        let dir = tempfile::Builder::new()
            .prefix(&format!("mvc-lab-{prefix}-"))
            .tempdir()?;
        let state = Arc::new(Mutex::new(State {
            prefix: prefix.clone(),
            dir: dir.path().to_path_buf(),
            ..State::default()
        }));
        lock(registry()).push(state.clone());
        Ok(Lab { prefix, state, dir })
    }

    /// Keeps a run file `<run_dir>/<prefix>.json` from now until teardown, so that
    /// [`runs::clean_dead_runs`] can remove what this lab leaves if its process is killed.
    /// Call it before creating anything. Returns the run file's path.
    pub fn record_run(&self, run_dir: &Path) -> Result<PathBuf> {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(run_dir)?;
        let me = std::process::id();
        let rec = RunRecord {
            pid: me,
            start_time: runs::start_time(me).ok_or_else(|| Error::Parse {
                what: format!("/proc/{me}/stat"),
                detail: "no start time".into(),
            })?,
            prefix: self.prefix.clone(),
            dir: self.dir().to_path_buf(),
            children: Vec::new(),
        };
        let path = run_dir.join(format!("{}.json", self.prefix));
        rec.write(&path)?;
        lock(&self.state).run = Some((path.clone(), rec));
        Ok(path)
    }

    /// Records a process this lab's owner started outside [`Lab::spawn`] (which records
    /// its own), so a later cleanup of a killed run ends it.
    pub fn record_child(&self, pid: u32) {
        lock(&self.state).record_child(pid);
    }

    /// The per-run prefix of this lab's namespaces.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A private directory for this lab's files (logs, sockets, leases); removed on drop.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Creates namespace `<prefix>-<name>` with loopback up and IPv6 off (so interface
    /// counters only see what the tests send), and returns its full name.
    pub fn add_ns(&self, name: &str) -> Result<String> {
        let full = format!("{}-{name}", self.prefix);
        run(&["ip", "netns", "add", &full])?;
        lock(&self.state).namespaces.push(full.clone());
        self.ip(&full, &["link", "set", "lo", "up"])?;
        self.sysctl(&full, "net.ipv6.conf.all.disable_ipv6", "1")?;
        self.sysctl(&full, "net.ipv6.conf.default.disable_ipv6", "1")?;
        Ok(full)
    }

    /// Sets a sysctl inside a namespace.
    pub fn sysctl(&self, ns: &str, key: &str, value: &str) -> Result<()> {
        self.exec(ns, &["sysctl", "-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// `ip -n NS args...`.
    pub fn ip(&self, ns: &str, args: &[&str]) -> Result<Out> {
        let mut v = vec!["ip", "-n", ns];
        v.extend_from_slice(args);
        run(&v)
    }

    /// A veth pair: `a_if` in namespace `a`, `b_if` in namespace `b`, both up.
    pub fn veth(&self, a: &str, a_if: &str, b: &str, b_if: &str) -> Result<()> {
        self.ip(
            a,
            &[
                "link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b,
            ],
        )?;
        self.ip(a, &["link", "set", a_if, "up"])?;
        self.ip(b, &["link", "set", b_if, "up"])?;
        Ok(())
    }

    /// Adds `ip/prefix` to an interface.
    pub fn addr(&self, ns: &str, ifname: &str, ip: Ipv4Addr, prefix: u8) -> Result<()> {
        self.ip(
            ns,
            &["addr", "add", &format!("{ip}/{prefix}"), "dev", ifname],
        )?;
        Ok(())
    }

    /// Adds a route (`dest` like "default" or "198.18.2.0/24") via a gateway.
    pub fn route(&self, ns: &str, dest: &str, via: Ipv4Addr) -> Result<()> {
        self.ip(ns, &["route", "add", dest, "via", &via.to_string()])?;
        Ok(())
    }

    /// A Linux bridge, up.
    pub fn bridge(&self, ns: &str, name: &str) -> Result<()> {
        self.ip(ns, &["link", "add", name, "type", "bridge"])?;
        // No STP and no forwarding delay: ports forward as soon as they are up.
        self.ip(
            ns,
            &[
                "link",
                "set",
                name,
                "type",
                "bridge",
                "stp_state",
                "0",
                "forward_delay",
                "0",
            ],
        )?;
        self.ip(ns, &["link", "set", name, "up"])?;
        Ok(())
    }

    /// Enslaves `ifname` to `bridge`, and sets it up.
    pub fn enslave(&self, ns: &str, ifname: &str, bridge: &str) -> Result<()> {
        self.ip(ns, &["link", "set", ifname, "master", bridge, "up"])?;
        Ok(())
    }

    /// A persistent TAP device (for an edge to attach to), up.
    pub fn tap(&self, ns: &str, name: &str) -> Result<()> {
        self.tap_queues(ns, name, false)
    }

    /// [`Lab::tap`], multi-queue when `multi_queue` (an edge with `--threads` above 1
    /// opens one queue per thread).
    pub fn tap_queues(&self, ns: &str, name: &str, multi_queue: bool) -> Result<()> {
        let mut add = vec!["tuntap", "add", "dev", name, "mode", "tap"];
        if multi_queue {
            add.push("multi_queue");
        }
        self.ip(ns, &add)?;
        self.ip(ns, &["link", "set", name, "up"])?;
        Ok(())
    }

    /// Sets an interface's MTU.
    pub fn mtu(&self, ns: &str, ifname: &str, mtu: u32) -> Result<()> {
        self.ip(ns, &["link", "set", ifname, "mtu", &mtu.to_string()])?;
        Ok(())
    }

    /// Turns a namespace into a home-style NAT router out of `wan_if`: masquerading, and a
    /// stateful firewall that drops unsolicited (NEW) inbound packets. Dropping them also
    /// means they leave no conntrack entry behind, as on common routers; an entry left by
    /// an early hole-punching packet would otherwise make MASQUERADE pick another port.
    pub fn nat(&self, ns: &str, wan_if: &str) -> Result<()> {
        self.sysctl(ns, "net.ipv4.ip_forward", "1")?;
        self.iptables(
            ns,
            &[
                "-t",
                "nat",
                "-A",
                "POSTROUTING",
                "-o",
                wan_if,
                "-j",
                "MASQUERADE",
            ],
        )?;
        for chain in ["INPUT", "FORWARD"] {
            let rule = [
                "-A",
                chain,
                "-i",
                wan_if,
                "-m",
                "conntrack",
                "--ctstate",
                "NEW,INVALID",
            ];
            let mut args = rule.to_vec();
            args.extend(["-j", "DROP"]);
            self.iptables(ns, &args)?;
        }
        Ok(())
    }

    /// Runs `iptables ARGS` inside a namespace.
    pub fn iptables(&self, ns: &str, args: &[&str]) -> Result<()> {
        let mut v = vec!["iptables", "-w"];
        v.extend_from_slice(args);
        self.exec(ns, &v)?;
        Ok(())
    }

    /// Runs a command inside a namespace to completion; fails on a non-zero exit.
    pub fn exec(&self, ns: &str, args: &[&str]) -> Result<Out> {
        let out = self.exec_timeout(ns, args, Duration::from_secs(60))?;
        if out.ok {
            Ok(out)
        } else {
            Err(Error::Command {
                cmd: cmd_line(args),
                status: "non-zero exit".into(),
                stderr: format!("{}{}", out.stderr.trim(), out.stdout.trim()),
            })
        }
    }

    /// Runs a command inside a namespace, killing it after `limit`; returns its output
    /// whatever its exit status (a killed command counts as failed).
    pub fn exec_timeout(&self, ns: &str, args: &[&str], limit: Duration) -> Result<Out> {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(args);
        let mut child = c
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| Error::Spawn {
                cmd: cmd_line(args),
                source: e,
            })?;
        // Read both pipes on threads so a chatty command cannot block on a full pipe.
        let mut so = child.stdout.take();
        let mut se = child.stderr.take();
        let t_out = std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(p) = so.as_mut() {
                let _ = io::Read::read_to_end(p, &mut s);
            }
            s
        });
        let t_err = std::thread::spawn(move || {
            let mut s = Vec::new();
            if let Some(p) = se.as_mut() {
                let _ = io::Read::read_to_end(p, &mut s);
            }
            s
        });
        let end = Instant::now() + limit;
        let mut timed_out = false;
        let status = loop {
            if let Some(st) = child.try_wait()? {
                break Some(st);
            }
            if Instant::now() >= end {
                timed_out = true;
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let stdout = String::from_utf8_lossy(&t_out.join().unwrap_or_default()).into_owned();
        let mut stderr = String::from_utf8_lossy(&t_err.join().unwrap_or_default()).into_owned();
        if timed_out {
            let _ = write!(stderr, "\n(killed after {:.1}s)", limit.as_secs_f64());
        }
        Ok(Out {
            ok: status.is_some_and(|s| s.success()),
            stdout,
            stderr,
        })
    }

    /// Starts a background process inside a namespace, logging to `<dir>/<name>.log`.
    /// It is tracked by PID and stopped (SIGTERM, then SIGKILL) on teardown.
    pub fn spawn(&self, ns: &str, name: &str, args: &[&str]) -> Result<Proc> {
        self.spawn_env(ns, name, args, &[])
    }

    /// [`Lab::spawn`] with extra environment variables.
    pub fn spawn_env(
        &self,
        ns: &str,
        name: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Proc> {
        let log = self.dir().join(format!("{name}.log"));
        let f = File::options().create(true).append(true).open(&log)?;
        let f2 = f.try_clone()?;
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).args(args);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()
            .map_err(|e| Error::Spawn {
                cmd: cmd_line(args),
                source: e,
            })?;
        let pid = child.id();
        let mut st = lock(&self.state);
        st.procs.push((pid, name.to_string(), child));
        st.record_child(pid);
        Ok(Proc {
            pid,
            name: name.to_string(),
            log,
        })
    }

    /// Whether a process of this lab is still running.
    pub fn running(&self, p: &Proc) -> bool {
        let mut st = lock(&self.state);
        st.procs
            .iter_mut()
            .find(|(pid, _, _)| *pid == p.pid)
            .is_some_and(|(_, _, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// Exit status of a process of this lab, if it has exited.
    pub fn exit_status(&self, p: &Proc) -> Option<std::process::ExitStatus> {
        let mut st = lock(&self.state);
        st.procs
            .iter_mut()
            .find(|(pid, _, _)| *pid == p.pid)
            .and_then(|(_, _, c)| c.try_wait().ok().flatten())
    }

    /// Stops a process (SIGTERM, SIGKILL after 3 s) and forgets it.
    pub fn stop(&self, p: &Proc) {
        let child = {
            let mut st = lock(&self.state);
            let idx = st.procs.iter().position(|(pid, _, _)| *pid == p.pid);
            idx.map(|i| st.procs.remove(i))
        };
        if let Some((_, _, mut c)) = child {
            stop_child(&mut c, Duration::from_secs(3));
        }
    }

    /// Kills a process at once (SIGKILL), as a crash would, and forgets it.
    pub fn kill(&self, p: &Proc) {
        let child = {
            let mut st = lock(&self.state);
            let idx = st.procs.iter().position(|(pid, _, _)| *pid == p.pid);
            idx.map(|i| st.procs.remove(i))
        };
        if let Some((_, _, mut c)) = child {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The log of a process so far.
    pub fn log(&self, p: &Proc) -> String {
        std::fs::read_to_string(&p.log).unwrap_or_default()
    }

    /// Runs `f` on a thread that has entered namespace `ns` (sockets it opens live there).
    pub fn in_ns<R: Send, F: FnOnce() -> R + Send>(&self, ns: &str, f: F) -> Result<R> {
        let path = format!("/run/netns/{ns}");
        let file = File::open(&path)?;
        std::thread::scope(|s| {
            s.spawn(|| {
                sys::setns_net(file.as_raw_fd())?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// Polls `cond` every 100 ms until it holds or `limit` passes.
    pub fn wait_until(
        &self,
        what: &str,
        limit: Duration,
        mut cond: impl FnMut() -> bool,
    ) -> Result<()> {
        let start = Instant::now();
        loop {
            if cond() {
                return Ok(());
            }
            if start.elapsed() >= limit {
                return Err(Error::Timeout {
                    what: what.to_string(),
                    secs: limit.as_secs_f64(),
                });
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Reads a counter of an interface (`rx_packets`, `tx_bytes`, ...) inside a namespace.
    pub fn if_counter(&self, ns: &str, ifname: &str, counter: &str) -> Result<u64> {
        let out = self.exec(
            ns,
            &[
                "cat",
                &format!("/sys/class/net/{ifname}/statistics/{counter}"),
            ],
        )?;
        out.stdout.trim().parse().map_err(|_| Error::Parse {
            what: format!("{ifname} {counter}"),
            detail: out.stdout,
        })
    }

    /// Prints the tail of every process log to stderr (used when a test fails).
    pub fn dump_logs(&self) {
        let Ok(rd) = std::fs::read_dir(self.dir()) else {
            return;
        };
        let mut logs: Vec<_> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|x| x == "log"))
            .collect();
        logs.sort();
        for p in logs {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(40)..];
            eprintln!("---- {} (last {} lines)", p.display(), tail.len());
            for l in tail {
                eprintln!("{l}");
            }
        }
    }

    /// Stops every process and deletes every namespace now (also done on drop).
    pub fn teardown(&self) {
        teardown(&mut lock(&self.state));
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("MVC_LAB_LOGS").is_some() {
            self.dump_logs();
        }
        self.teardown();
        finish(&mut lock(&self.state));
        lock(registry()).retain(|s| !Arc::ptr_eq(s, &self.state));
    }
}

/// Runs a command in the current namespace; fails on a non-zero exit.
pub fn run(args: &[&str]) -> Result<Out> {
    let (prog, rest) = args.split_first().ok_or_else(|| Error::Parse {
        what: "command".into(),
        detail: "empty".into(),
    })?;
    let out = Command::new(prog)
        .args(rest)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| Error::Spawn {
            cmd: cmd_line(args),
            source: e,
        })?;
    check(cmd_line(args), out)
}

/// One site of a [`Topology`].
#[derive(Debug, Clone)]
pub struct Site {
    /// Site number (1 = A, 2 = B, ...); it picks the addresses in [`addr`].
    pub idx: u8,
    /// Short name ("a", "b", ...).
    pub name: String,
    /// The frontend namespace (runs the edge; holds the site bridge `br0`).
    pub frontend: String,
    /// The NAT router namespace, when the site is behind NAT.
    pub router: Option<String>,
    /// The frontend's underlay address (public, or private behind the NAT).
    pub frontend_ip: Ipv4Addr,
    /// The site's public address (frontend or NAT router).
    pub public_ip: Ipv4Addr,
    /// The TAP device in the frontend, enslaved to `br0` (the edge attaches to it).
    pub tap: String,
    /// The site bridge in the frontend.
    pub bridge: String,
    /// The site's VMs.
    pub vms: Vec<Vm>,
    /// The WAN-emulator namespace on the site's uplink, if any (interfaces `w0`, `w1`).
    pub wan: Option<String>,
}

/// A "VM": a namespace attached by veth to its site's bridge.
#[derive(Debug, Clone)]
pub struct Vm {
    /// Namespace.
    pub ns: String,
    /// Its interface (`eth0`).
    pub ifname: String,
    /// The frontend-side veth end (enslaved to the bridge).
    pub port: String,
    /// Overlay address (198.19.s.(10+i)/16).
    pub ip: Ipv4Addr,
    /// Routed underlay address (198.18.(100+s).(10+i)/24).
    pub underlay_ip: Ipv4Addr,
    /// MAC address of `eth0`.
    pub mac: String,
}

/// Room in the host's IPv4 neighbour (ARP) table, from [`NeighRoom::ensure`]. The table
/// is one for all namespaces: past `net.ipv4.neigh.default.gc_thresh3` entries (1024 by
/// default) the kernel refuses new ones ("neighbor table overflow") and VMs fail to
/// resolve each other, which 48 VMs that all meet already exceed. The old limits come
/// back on drop (unless something else changed them meanwhile).
pub struct NeighRoom {
    /// (file, old value, value set) of each limit raised.
    raised: Vec<(PathBuf, u64, u64)>,
}

impl NeighRoom {
    const FILES: [&'static str; 2] = [
        "/proc/sys/net/ipv4/neigh/default/gc_thresh2",
        "/proc/sys/net/ipv4/neigh/default/gc_thresh3",
    ];

    /// Raises the limits so that `entries` more fit (gc_thresh2 to half of gc_thresh3,
    /// where the kernel starts to reclaim hard); never lowers them.
    pub fn ensure(entries: u64) -> Result<NeighRoom> {
        let mut raised = Vec::new();
        for (i, f) in Self::FILES.iter().enumerate() {
            let path = PathBuf::from(f);
            let text = std::fs::read_to_string(&path)?;
            let old: u64 = text.trim().parse().map_err(|_| Error::Parse {
                what: (*f).to_string(),
                detail: text.trim().to_string(),
            })?;
            let want = (old + entries) / if i == 0 { 2 } else { 1 };
            if want > old {
                std::fs::write(&path, want.to_string())?;
                raised.push((path, old, want));
            }
        }
        Ok(NeighRoom { raised })
    }
}

impl Drop for NeighRoom {
    fn drop(&mut self) {
        for (path, old, set) in self.raised.iter().rev() {
            let now = std::fs::read_to_string(path).unwrap_or_default();
            if now.trim().parse::<u64>().ok() == Some(*set) {
                let _ = std::fs::write(path, old.to_string());
            }
        }
    }
}

/// Most VM namespaces set up at once: each takes a dozen `ip`/`sysctl` runs, and on a
/// small machine 192 of them one after the other take minutes.
const VM_SETUP_THREADS: usize = 8;

/// VMs `1..=vms` of site `idx` (namespaces `<name>vm<i>`), each on its own veth to the
/// frontend `fe`'s bridge, set up [`VM_SETUP_THREADS`] at a time; returned in order.
fn add_vms(lab: &Lab, fe: &str, name: &str, idx: u8, vms: u8) -> Result<Vec<Vm>> {
    let one = |i: u8| -> Result<Vm> {
        let ns = lab.add_ns(&format!("{name}vm{i}"))?;
        let port = format!("vm{i}");
        lab.veth(fe, &port, &ns, "eth0")?;
        lab.enslave(fe, &port, "br0")?;
        let mac = addr::vm_mac(idx, i);
        lab.ip(&ns, &["link", "set", "eth0", "address", &mac])?;
        let ip = addr::vm_overlay(idx, i);
        let underlay_ip = addr::vm_underlay(idx, i);
        lab.addr(&ns, "eth0", ip, addr::OVERLAY_PREFIX)?;
        lab.addr(&ns, "eth0", underlay_ip, 24)?;
        lab.route(&ns, "default", addr::vm_gateway(idx))?;
        Ok(Vm {
            ns,
            ifname: "eth0".into(),
            port,
            ip,
            underlay_ip,
            mac,
        })
    };
    let all: Vec<u8> = (1..=vms).collect();
    let per = all.len().div_ceil(VM_SETUP_THREADS).max(1);
    std::thread::scope(|sc| {
        let parts: Vec<_> = all
            .chunks(per)
            .map(|c| sc.spawn(move || c.iter().map(|i| one(*i)).collect::<Result<Vec<Vm>>>()))
            .collect();
        let mut v = Vec::with_capacity(all.len());
        for p in parts {
            v.extend(p.join().unwrap_or_else(|e| std::panic::resume_unwind(e))?);
        }
        Ok(v)
    })
}

/// Sites around an "internet" router namespace.
pub struct Topology {
    /// The internet router namespace.
    pub inet: String,
    /// The sites, by creation order.
    pub sites: Vec<Site>,
}

impl Topology {
    /// Only the internet router.
    pub fn new(lab: &Lab) -> Result<Topology> {
        let inet = lab.add_ns("inet")?;
        lab.sysctl(&inet, "net.ipv4.ip_forward", "1")?;
        Ok(Topology {
            inet,
            sites: Vec::new(),
        })
    }

    /// The three sites of the README's demo: A public (frontend runs supernode and edge), B and C each
    /// behind its own NAT router; `vms` VMs per site.
    pub fn three_sites(lab: &Lab, vms: u8) -> Result<Topology> {
        let mut t = Topology::new(lab)?;
        t.add_site(lab, "a", false, vms)?;
        t.add_site(lab, "b", true, vms)?;
        t.add_site(lab, "c", true, vms)?;
        Ok(t)
    }

    /// Adds a site: frontend with bridge `br0` and TAP `tap0`, `vms` VM namespaces on the
    /// bridge, optionally a NAT router in front. Site numbers follow creation order.
    pub fn add_site(&mut self, lab: &Lab, name: &str, natted: bool, vms: u8) -> Result<&Site> {
        self.add_site_wan(lab, name, natted, vms, false)
    }

    /// [`Topology::add_site`], with (`wan`) a WAN-emulator namespace `<name>wan` cut into the
    /// site's uplink: its interfaces `w0` (internet side) and `w1` (site side) are joined
    /// only by a userspace forwarder (the `bench` crate's WAN emulator), which the caller starts.
    pub fn add_site_wan(
        &mut self,
        lab: &Lab,
        name: &str,
        natted: bool,
        vms: u8,
        wan: bool,
    ) -> Result<&Site> {
        let idx = u8::try_from(self.sites.len() + 1)
            .unwrap_or(u8::MAX)
            .min(60);
        let fe = lab.add_ns(&format!("{name}fe"))?;
        lab.sysctl(&fe, "net.ipv4.ip_forward", "1")?;
        let wan_name = format!("s{idx}");
        let wan_ns = if wan {
            Some(lab.add_ns(&format!("{name}wan"))?)
        } else {
            None
        };
        let wan = wan_name;
        let (router, frontend_ip) = if natted {
            let r = lab.add_ns(&format!("{name}nat"))?;
            self.uplink(lab, &wan, &r, "wan", wan_ns.as_deref())?;
            lab.addr(&self.inet, &wan, addr::inet_side(idx), 24)?;
            lab.addr(&r, "wan", addr::public(idx), 24)?;
            lab.route(&r, "default", addr::inet_side(idx))?;
            lab.veth(&r, "lan", &fe, "eth0")?;
            lab.addr(&r, "lan", addr::nat_inside(idx), 24)?;
            lab.addr(&fe, "eth0", addr::frontend_private(idx), 24)?;
            lab.route(&fe, "default", addr::nat_inside(idx))?;
            // The VM LAN stays private: only the NAT router knows where it is.
            lab.route(
                &r,
                &format!("198.18.{}.0/24", 100 + idx),
                addr::frontend_private(idx),
            )?;
            lab.nat(&r, "wan")?;
            (Some(r), addr::frontend_private(idx))
        } else {
            self.uplink(lab, &wan, &fe, "eth0", wan_ns.as_deref())?;
            lab.addr(&self.inet, &wan, addr::inet_side(idx), 24)?;
            lab.addr(&fe, "eth0", addr::public(idx), 24)?;
            lab.route(&fe, "default", addr::inet_side(idx))?;
            // A public site's VM LAN is routed (the raw underlay reference path).
            lab.route(
                &self.inet,
                &format!("198.18.{}.0/24", 100 + idx),
                addr::public(idx),
            )?;
            (None, addr::public(idx))
        };
        lab.bridge(&fe, "br0")?;
        // A fixed address: a bridge otherwise takes its lowest port's MAC and changes it when
        // ports come and go (a TAP re-created between runs), leaving the VMs' ARP entries for
        // their gateway stale.
        lab.ip(
            &fe,
            &[
                "link",
                "set",
                "br0",
                "address",
                &format!("02:4d:56:fe:{idx:02x}:01"),
            ],
        )?;
        lab.addr(&fe, "br0", addr::vm_gateway(idx), 24)?;
        lab.tap(&fe, "tap0")?;
        lab.enslave(&fe, "tap0", "br0")?;
        let vms = add_vms(lab, &fe, name, idx, vms)?;
        let site = Site {
            idx,
            name: name.to_string(),
            frontend: fe.clone(),
            router,
            frontend_ip,
            public_ip: addr::public(idx),
            tap: "tap0".into(),
            bridge: "br0".into(),
            vms,
            wan: wan_ns,
        };
        self.sites.push(site);
        Ok(self.sites.last().unwrap_or_else(|| unreachable!()))
    }

    fn uplink(
        &self,
        lab: &Lab,
        inet_if: &str,
        ns: &str,
        ifname: &str,
        wan: Option<&str>,
    ) -> Result<()> {
        match wan {
            None => lab.veth(&self.inet, inet_if, ns, ifname),
            Some(w) => {
                lab.veth(&self.inet, inet_if, w, "w0")?;
                lab.veth(w, "w1", ns, ifname)?;
                Ok(())
            }
        }
    }

    /// The site called `name`.
    pub fn site(&self, name: &str) -> &Site {
        self.sites
            .iter()
            .find(|s| s.name == name)
            .unwrap_or_else(|| panic!("no site {name}"))
    }

    /// Replaces a site's TAP device by a fresh one on the bridge, so that offload settings
    /// an earlier overlay left on it (TSO, checksum offload) do not reach the next one.
    pub fn reset_tap(&self, lab: &Lab, site: &Site) -> Result<()> {
        self.reset_tap_queues(lab, site, false)
    }

    /// [`Topology::reset_tap`], the new device multi-queue when `multi_queue` (one queue
    /// per thread of an edge with `--threads` above 1).
    pub fn reset_tap_queues(&self, lab: &Lab, site: &Site, multi_queue: bool) -> Result<()> {
        let _ = lab.ip(&site.frontend, &["link", "del", &site.tap]);
        lab.tap_queues(&site.frontend, &site.tap, multi_queue)?;
        lab.enslave(&site.frontend, &site.tap, &site.bridge)
    }

    /// Sets the MTU of a site's VM interfaces, bridge ports, bridge and TAP.
    pub fn set_site_mtu(&self, lab: &Lab, site: &Site, mtu: u32) -> Result<()> {
        for vm in &site.vms {
            lab.mtu(&vm.ns, &vm.ifname, mtu)?;
            lab.mtu(&site.frontend, &vm.port, mtu)?;
        }
        lab.mtu(&site.frontend, &site.tap, mtu)?;
        lab.mtu(&site.frontend, &site.bridge, mtu)?;
        Ok(())
    }

    /// Drops UDP between two sites' public addresses at the internet router (both ways),
    /// optionally only to/from one port at `b`. Returns the rules, for [`Topology::unblock`].
    pub fn block_udp(
        &self,
        lab: &Lab,
        a: &Site,
        b: &Site,
        b_port: Option<u16>,
    ) -> Result<Vec<Vec<String>>> {
        let (pa, pb) = (a.public_ip.to_string(), b.public_ip.to_string());
        let mut rules = vec![
            vec!["-s", &pa, "-d", &pb, "-p", "udp"],
            vec!["-s", &pb, "-d", &pa, "-p", "udp"],
        ];
        let port = b_port.map(|p| p.to_string());
        if let Some(p) = &port {
            rules[0].extend(["--dport", p.as_str()]);
            rules[1].extend(["--sport", p.as_str()]);
        }
        let rules: Vec<Vec<String>> = rules
            .into_iter()
            .map(|r| r.into_iter().map(String::from).collect())
            .collect();
        for r in &rules {
            let mut args = vec!["-I", "FORWARD"];
            args.extend(r.iter().map(String::as_str));
            args.extend(["-j", "DROP"]);
            lab.iptables(&self.inet, &args)?;
        }
        Ok(rules)
    }

    /// Removes rules added by [`Topology::block_udp`].
    pub fn unblock(&self, lab: &Lab, rules: &[Vec<String>]) -> Result<()> {
        for r in rules {
            let mut args = vec!["-D", "FORWARD"];
            args.extend(r.iter().map(String::as_str));
            args.extend(["-j", "DROP"]);
            lab.iptables(&self.inet, &args)?;
        }
        Ok(())
    }
}

/// Result of a ping run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Ping {
    /// Echo requests sent.
    pub sent: u32,
    /// Replies received.
    pub received: u32,
    /// Average RTT in ms (None when nothing came back).
    pub avg_ms: Option<f64>,
    /// Minimum RTT in ms.
    pub min_ms: Option<f64>,
}

/// `ping -c count -i interval` from a namespace, bounded in time.
pub fn ping(lab: &Lab, ns: &str, dst: Ipv4Addr, count: u32, interval: f64) -> Result<Ping> {
    let out = run_ping(lab, ns, dst, count, interval, &["-q"])?;
    parse_ping(&out.stdout).ok_or_else(|| Error::Parse {
        what: "ping".into(),
        detail: format!("{}{}", out.stdout, out.stderr),
    })
}

/// Runs `ping -n -c count -i interval -W 1 [extra] dst` in `ns`, bounded in time.
fn run_ping(
    lab: &Lab,
    ns: &str,
    dst: Ipv4Addr,
    count: u32,
    interval: f64,
    extra: &[&str],
) -> Result<Out> {
    let limit = Duration::from_secs_f64(f64::from(count) * interval + 5.0);
    let count = count.to_string();
    let interval = format!("{interval}");
    let dst = dst.to_string();
    let mut argv = vec!["ping", "-n", "-c", &count, "-i", &interval, "-W", "1"];
    argv.extend_from_slice(extra);
    argv.push(&dst);
    lab.exec_timeout(ns, &argv, limit)
}

/// The summary of ping's output (`N packets transmitted, M received, ...` and the
/// `rtt` line); None when it has none.
pub fn parse_ping(s: &str) -> Option<Ping> {
    let line = s.lines().find(|l| l.contains("packets transmitted"))?;
    let mut nums = line.split(',').map(|p| {
        p.split_whitespace()
            .next()
            .and_then(|n| n.parse::<u32>().ok())
    });
    let sent = nums.next()??;
    let received = nums.next()??;
    let rtt = s
        .lines()
        .find(|l| l.starts_with("rtt") || l.starts_with("round-trip"));
    let (min_ms, avg_ms) = match rtt.and_then(|l| l.split('=').nth(1)) {
        Some(v) => {
            let f: Vec<f64> = v
                .trim()
                .trim_end_matches("ms")
                .split('/')
                .filter_map(|x| x.trim().parse().ok())
                .collect();
            (f.first().copied(), f.get(1).copied())
        }
        None => (None, None),
    };
    Some(Ping {
        sent,
        received,
        avg_ms,
        min_ms,
    })
}

/// Per-packet RTTs (ms) of `ping -c count -i interval` from a namespace (lost packets are
/// simply missing).
pub fn ping_samples(
    lab: &Lab,
    ns: &str,
    dst: Ipv4Addr,
    count: u32,
    interval: f64,
) -> Result<Vec<f64>> {
    let out = run_ping(lab, ns, dst, count, interval, &[])?;
    Ok(out
        .stdout
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.trim_end_matches("ms").trim().parse().ok())
        .collect())
}

/// A measurement's numeric knob from the environment: variable `key` parsed as a `T`,
/// `default` when unset or not a number.
pub fn env_number<T: std::str::FromStr>(key: &str, default: T) -> T {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Median of a list (None when empty).
pub fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    Some(if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    })
}

/// Pings until one reply comes back or `limit` passes.
pub fn wait_ping(lab: &Lab, ns: &str, dst: Ipv4Addr, limit: Duration) -> Result<()> {
    let start = Instant::now();
    loop {
        let p = ping(lab, ns, dst, 1, 0.2)?;
        if p.received > 0 {
            return Ok(());
        }
        if start.elapsed() >= limit {
            return Err(Error::Timeout {
                what: format!("ping {dst} from {ns}"),
                secs: limit.as_secs_f64(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Pings `dst` from `ns` `count` times 0.1 s apart (each waiting at most 1 s); returns the
/// sequence number (from 1) of the first answered ping, if any, and ping's output. The
/// first answer tells how long `dst` took to become reachable (in tenths of a second).
pub fn first_answer(
    lab: &Lab,
    ns: &str,
    dst: Ipv4Addr,
    count: u32,
) -> Result<(Option<u32>, String)> {
    let n = count.to_string();
    let out = lab.exec_timeout(
        ns,
        &[
            "ping",
            "-n",
            "-c",
            &n,
            "-i",
            "0.1",
            "-W",
            "1",
            &dst.to_string(),
        ],
        Duration::from_secs(u64::from(count) / 10 + 10),
    )?;
    let first = out
        .stdout
        .lines()
        .filter(|l| l.contains("bytes from"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse::<u32>().ok())
        });
    Ok((first, out.stdout))
}

static IPERF_PORT: AtomicU32 = AtomicU32::new(0);

/// One iperf3 TCP single-stream run of `secs` seconds from namespace `client` to `dst` (an
/// address of namespace `server`); returns received bits per second. Every run has its own
/// one-off server on its own port, so a run that ended badly cannot leave a busy server
/// behind for the next one.
pub fn iperf(lab: &Lab, client: &str, server: &str, dst: Ipv4Addr, secs: u32) -> Result<f64> {
    iperf_streams(lab, client, server, dst, secs, 1)
}

/// [`iperf`] with `streams` parallel TCP streams (`iperf3 -P`; one: none); returns the
/// bits per second received over all of them.
pub fn iperf_streams(
    lab: &Lab,
    client: &str,
    server: &str,
    dst: Ipv4Addr,
    secs: u32,
    streams: u32,
) -> Result<f64> {
    let p = streams.to_string();
    let extra: &[&str] = if streams > 1 { &["-P", &p] } else { &[] };
    let v = iperf_json(lab, client, server, dst, secs, extra)?;
    v.pointer("/end/sum_received/bits_per_second")
        .and_then(serde_json::Value::as_f64)
        .ok_or_else(|| Error::Parse {
            what: "iperf3".into(),
            detail: v.to_string().chars().take(400).collect(),
        })
}

/// Result of one iperf3 UDP run.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct UdpRun {
    /// Datagrams sent.
    pub sent: u64,
    /// Datagrams the server counted as lost.
    pub lost: u64,
    /// Payload bytes the server received.
    pub bytes: u64,
    /// Length of the sending interval, s.
    pub secs: f64,
}

impl UdpRun {
    /// Datagrams delivered per second.
    pub fn pps(&self) -> f64 {
        if self.secs > 0.0 {
            self.sent.saturating_sub(self.lost) as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Fraction of the datagrams lost.
    pub fn loss(&self) -> f64 {
        if self.sent > 0 {
            self.lost as f64 / self.sent as f64
        } else {
            1.0
        }
    }
}

/// One iperf3 UDP run: `len`-byte datagrams offered at `bps` bits/s of payload for `secs`
/// seconds from `client` to `dst` (an address of `server`).
pub fn iperf_udp(
    lab: &Lab,
    client: &str,
    server: &str,
    dst: Ipv4Addr,
    secs: u32,
    len: u32,
    bps: u64,
) -> Result<UdpRun> {
    let (l, b) = (len.to_string(), bps.to_string());
    let v = iperf_json(lab, client, server, dst, secs, &["-u", "-l", &l, "-b", &b])?;
    let num = |p: &str| v.pointer(p).and_then(serde_json::Value::as_f64);
    match (
        num("/end/sum_sent/packets"),
        num("/end/sum_received/lost_packets"),
        num("/end/sum_received/bytes"),
        num("/end/sum_sent/seconds"),
    ) {
        (Some(sent), Some(lost), Some(bytes), Some(secs)) => Ok(UdpRun {
            sent: sent as u64,
            lost: lost.max(0.0) as u64,
            bytes: bytes as u64,
            secs,
        }),
        _ => Err(Error::Parse {
            what: "iperf3 -u".into(),
            detail: v.to_string().chars().take(400).collect(),
        }),
    }
}

/// Runs iperf3 once (`extra` arguments added to the client) against a one-off server
/// and returns the client's JSON report.
pub fn iperf_json(
    lab: &Lab,
    client: &str,
    server: &str,
    dst: Ipv4Addr,
    secs: u32,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let n = IPERF_PORT.fetch_add(1, Ordering::Relaxed);
    let port = u16::try_from(5201 + (std::process::id() + n) % 4000).unwrap_or(5201);
    let p = port.to_string();
    let srv = lab.spawn(
        server,
        &format!("iperf3-server-{port}"),
        &["iperf3", "-s", "-1", "-p", &p, "-i", "0"],
    )?;
    let filter = format!("sport = :{port}");
    let listening = lab.wait_until("iperf3 server listening", Duration::from_secs(5), || {
        lab.exec(server, &["ss", "-Hltn", &filter])
            .is_ok_and(|o| !o.stdout.trim().is_empty())
    });
    let r = listening.and_then(|()| iperf_once(lab, client, dst, port, secs, extra));
    lab.stop(&srv);
    r
}

fn iperf_once(
    lab: &Lab,
    ns: &str,
    dst: Ipv4Addr,
    port: u16,
    secs: u32,
    extra: &[&str],
) -> Result<serde_json::Value> {
    let (d, p, t) = (dst.to_string(), port.to_string(), secs.to_string());
    let mut args = vec![
        "iperf3",
        "-c",
        &d,
        "-p",
        &p,
        "-t",
        &t,
        "-J",
        "--connect-timeout",
        "3000",
    ];
    args.extend_from_slice(extra);
    let out = lab.exec_timeout(ns, &args, Duration::from_secs(u64::from(secs) + 15))?;
    let v: serde_json::Value = serde_json::from_str(&out.stdout).map_err(|e| Error::Parse {
        what: "iperf3".into(),
        detail: format!("{e}: {}{}", out.stdout, out.stderr),
    })?;
    if let Some(err) = v.get("error").and_then(|e| e.as_str()) {
        return Err(Error::Command {
            cmd: format!("iperf3 -c {dst}"),
            status: "error".into(),
            stderr: err.to_string(),
        });
    }
    Ok(v)
}

/// Captured frames: a tcpdump writing a pcap file, stopped by [`Capture::frames`].
pub struct Capture {
    proc: Proc,
    file: PathBuf,
}

impl Capture {
    /// Starts `tcpdump -i ifname -w FILE FILTER` in a namespace.
    pub fn start(lab: &Lab, ns: &str, ifname: &str, name: &str, filter: &str) -> Result<Capture> {
        let file = lab.dir().join(format!("{name}.pcap"));
        let f = file.to_string_lossy().into_owned();
        let mut args = vec!["tcpdump", "-n", "-U", "-i", ifname, "-w", &f];
        args.extend(filter.split_whitespace());
        let proc = lab.spawn(ns, name, &args)?;
        lab.wait_until("tcpdump started", Duration::from_secs(5), || {
            lab.log(&proc).contains("listening on")
        })?;
        Ok(Capture { proc, file })
    }

    /// Stops the capture and returns the captured frames (link-layer bytes).
    pub fn frames(self, lab: &Lab) -> Result<Vec<Vec<u8>>> {
        std::thread::sleep(Duration::from_millis(300));
        lab.stop(&self.proc);
        let data = std::fs::read(&self.file)?;
        parse_pcap(&data).ok_or_else(|| Error::Parse {
            what: "pcap".into(),
            detail: format!("{} bytes", data.len()),
        })
    }
}

/// Parses a classic pcap file into its records (no link-type interpretation).
pub fn parse_pcap(data: &[u8]) -> Option<Vec<Vec<u8>>> {
    if data.len() < 24 {
        return if data.is_empty() {
            Some(Vec::new())
        } else {
            None
        };
    }
    let magic = u32::from_le_bytes(data[0..4].try_into().ok()?);
    let le = match magic {
        0xa1b2_c3d4 | 0xa1b2_3c4d => true,
        0xd4c3_b2a1 | 0x4d3c_b2a1 => false,
        _ => return None,
    };
    let rd = |b: &[u8]| -> Option<u32> {
        let a: [u8; 4] = b.try_into().ok()?;
        Some(if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    };
    let mut off = 24;
    let mut out = Vec::new();
    while off + 16 <= data.len() {
        let incl = usize::try_from(rd(&data[off + 8..off + 12])?).ok()?;
        let start = off + 16;
        let end = start.checked_add(incl)?;
        if end > data.len() || incl > 262_144 {
            break;
        }
        out.push(data[start..end].to_vec());
        off = end;
    }
    Some(out)
}

/// The UDP payloads of Ethernet/IPv4 frames (as captured on an Ethernet interface).
pub fn udp_payloads(frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for f in frames {
        if f.len() < 14 + 20 + 8 || f[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &f[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        if ip[0] >> 4 != 4 || ihl < 20 || ip.len() < ihl + 8 || ip[9] != 17 {
            continue;
        }
        // Skip non-first fragments.
        if u16::from_be_bytes([ip[6], ip[7]]) & 0x1fff != 0 {
            continue;
        }
        v.push(ip[ihl + 8..].to_vec());
    }
    v
}

/// Source MAC addresses of Ethernet frames, as lowercase "aa:bb:..." strings, with counts.
pub fn src_macs(frames: &[Vec<u8>]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for f in frames.iter().filter(|f| f.len() >= 14) {
        let s = f[6..12]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":");
        *m.entry(s).or_insert(0) += 1;
    }
    m
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ping_summary() {
        let s = "PING 198.19.1.11 (198.19.1.11) 56(84) bytes of data.\n\n--- 198.19.1.11 ping statistics ---\n5 packets transmitted, 4 received, 20% packet loss, time 804ms\nrtt min/avg/max/mdev = 0.041/0.052/0.071/0.011 ms\n";
        let p = parse_ping(s).unwrap();
        assert_eq!((p.sent, p.received), (5, 4));
        assert_eq!(p.avg_ms, Some(0.052));
        assert_eq!(p.min_ms, Some(0.041));
        let s = "3 packets transmitted, 0 received, 100% packet loss, time 2030ms\n";
        let p = parse_ping(s).unwrap();
        assert_eq!((p.sent, p.received, p.avg_ms), (3, 0, None));
        assert!(parse_ping("garbage").is_none());
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn pcap_rejects_garbage_and_truncation() {
        assert!(parse_pcap(b"short").is_none());
        let mut f = vec![0xd4, 0xc3, 0xb2, 0xa1];
        f.extend([0u8; 20]);
        assert_eq!(parse_pcap(&f).unwrap().len(), 0);
        // one record of 3 bytes, then a truncated record header
        f.extend([0u8; 8]);
        f.extend(3u32.to_le_bytes());
        f.extend(3u32.to_le_bytes());
        f.extend([1, 2, 3]);
        f.extend([9u8; 10]);
        assert_eq!(parse_pcap(&f).unwrap(), vec![vec![1, 2, 3]]);
    }

    #[test]
    fn addresses_stay_in_the_lab_range() {
        for s in 1..=9 {
            for ip in [
                addr::public(s),
                addr::inet_side(s),
                addr::nat_inside(s),
                addr::frontend_private(s),
                addr::vm_gateway(s),
                addr::vm_underlay(s, 1),
                addr::vm_overlay(s, 1),
            ] {
                let o = ip.octets();
                assert!(o[0] == 198 && (o[1] == 18 || o[1] == 19), "{ip}");
            }
        }
    }
}
