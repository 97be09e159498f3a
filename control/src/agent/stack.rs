//! The agent's side of the cluster stack ([`crate::stack`]): munged, slurmctld and
//! slurmd inside the cluster's VMs here, and commands run inside a VM.
//!
//! Each VM keeps its Slurm and munge files in `run/<local>.slurm/` (`slurm.conf`,
//! `topology.conf`, `munge.sock`, `state/`, `spool/`, logs, pid files, `home/`, the
//! working directory of commands and jobs): several VMs and clusters share this
//! machine, so nothing goes to the daemons' default paths. Every daemon's command line
//! names that directory, so the VM's stop and the cluster's release end them by the
//! same rule as the VM's other processes (and delete the directory). The munge key is
//! `secrets/c<n>.munge` (0400, root: the daemons run as root).
//!
//! netns VMs share this machine's mount and UTS namespaces; the daemons enter the
//! VM's network namespace with `nsenter --net` (not `ip netns exec`, whose fresh
//! `/sys` hides the cgroup mounts slurmd checks) and get a UTS namespace of their own
//! holding the VM's name, so jobs see their node's host name.
//!
//! A qemu VM is a guest of its own: its daemons and commands run inside it, reached
//! through its guest agent (`mvc-guest` on a virtio-serial port, the protocol of
//! [`crate::guest_proto`]). The agent writes the munge key (0400), `slurm.conf` and
//! `topology.conf` into the guest's `/mvc/` with it and starts munged and slurmd
//! there ([`GUEST_START`]); the guest's files and daemons end with the guest.
use super::{AgentCore, Refusal};
use crate::auth::Authorization;
use crate::bounded_exec::{self, Bounds, Signal};
use crate::driver::RunningVm;
use crate::guest_proto::{self, Done, Exec, Msg};
use crate::process::{pids_marked, spawn};
use crate::proto::Reply;
use crate::stack::{
    as_vm, munged_argv, prepare_vm, slurm_conf, slurm_daemon_argv, topology_conf, write_munge_key,
    ExecOutput, ExecReq, SlurmStack, VmPaths, EXEC_OUTPUT_MAX,
};
use crate::validate::quote;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// A command to run in a VM, prepared under the agent's lock and run outside it.
pub struct ExecPlan {
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    stdin: String,
    timeout: Duration,
    /// Run in a guest through its guest agent's socket (`cmd` as it is), not here.
    guest: Option<PathBuf>,
}

/// Where a guest keeps its Slurm and munge files (`slurm.conf` is rendered with
/// these paths).
pub const GUEST_SLURM_DIR: &str = "/mvc";

/// Write standard input to file `$1` with mode `$2`, atomically (run in a guest).
const GUEST_WRITE: &str =
    "umask 077 && mkdir -p \"${1%/*}\" && cat > \"$1.tmp\" && chmod \"$2\" \"$1.tmp\" && mv \"$1.tmp\" \"$1\"";

/// Start munged and slurmd in a guest (node name `$1`) unless they run: in the
/// foreground of a session of their own, in the background of this script (their
/// own daemon forks would leave zombies behind, the guest's init being a shell). A
/// slurmd that runs re-reads `slurm.conf` (SIGHUP). Their files are under
/// [`GUEST_SLURM_DIR`].
pub const GUEST_START: &str = r#"d=/mvc
command -v slurmd >/dev/null ||
  { echo "this guest booted without Slurm: stop and start the VM to boot the one with it" >&2; exit 1; }
mkdir -p $d/state $d/spool $d/tmp $d/home || exit 1
if ! pidof munged >/dev/null; then
  rm -f $d/munge.sock
  setsid munged --foreground --force --socket=$d/munge.sock --key-file=$d/munge.key \
    --pid-file=$d/munged.pid --seed-file=$d/munged.seed --log-file=$d/munged.log \
    --origin=eth0 </dev/null >$d/munged.out 2>&1 &
fi
n=0
while [ ! -S $d/munge.sock ]; do
  n=$((n+1))
  [ $n -gt 50 ] && { echo "munged made no socket in 10 s:" >&2; cat $d/munged.out >&2; exit 1; }
  sleep 0.2
done
if pids=$(pidof slurmd); then
  kill -HUP $pids
else
  setsid slurmd -D -N "$1" -f $d/slurm.conf </dev/null >$d/slurmd.out 2>&1 &
  sleep 1
  pidof slurmd >/dev/null || { cat $d/slurmd.out >&2; tail -n 10 $d/slurmd.log >&2; exit 1; }
fi
"#;

/// What the agent does in a guest to run its part of Slurm: the files to write and
/// the start, through the guest agent; prepared under the agent's lock, done with or
/// without it.
pub struct GuestStack {
    vm: String,
    sock: PathBuf,
    files: Vec<(String, Vec<u8>, &'static str)>,
}

impl GuestStack {
    /// Write the files and start the daemons, each step bounded by `wait` (a guest
    /// that still boots answers when its guest agent runs).
    pub fn apply(&self, wait: Duration) -> Result<(), String> {
        let call = |argv: Vec<&str>, stdin: Vec<u8>| -> Result<(), String> {
            let e = Exec {
                argv: argv.iter().map(|a| a.as_bytes().to_vec()).collect(),
                stdin,
                timeout_ms: 30_000,
            };
            let d = guest_call(&self.sock, e, wait)?;
            if d.code != Some(0) {
                return Err(format!(
                    "{} in the guest: exit {:?}: {}",
                    argv[0],
                    d.code,
                    String::from_utf8_lossy(&d.stderr).trim()
                ));
            }
            Ok(())
        };
        for (path, data, mode) in &self.files {
            call(
                vec!["sh", "-c", GUEST_WRITE, "sh", path, mode],
                data.clone(),
            )?;
        }
        call(vec!["sh", "-c", GUEST_START, "sh", &self.vm], Vec::new())
    }

    /// [`GuestStack::apply`] on a thread of its own; a failure is logged.
    pub fn apply_in_background(self, wait: Duration) {
        std::thread::spawn(move || {
            if let Err(e) = self.apply(wait) {
                tracing::warn!(vm = self.vm, error = %e, "Slurm in the guest not started");
            }
        });
    }
}

/// A guest's `/etc/hosts`: the cluster's VMs by name (Slurm looks node and
/// controller names up; the guest has no other name service).
fn guest_hosts(s: &SlurmStack) -> String {
    let mut t = format!("127.0.0.1 localhost\n{} {}\n", s.frontend_addr, s.frontend);
    for n in &s.nodes {
        t.push_str(&format!("{} {}\n", n.addr, n.name));
    }
    t
}

/// Ids of guest agent requests: the reply to a request that timed out may still
/// come, on the next connection.
static GUEST_IDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);

/// Send one `Exec` to the guest agent behind Unix socket `sock` and wait (at most
/// `wait`) for its `Done`. A guest is not trusted: a frame over the bounds, a
/// malformed one, more than a few frames' worth of bytes, or no answer in time ends
/// the call with an error, having kept at most one frame in memory.
pub fn guest_call(sock: &Path, e: Exec, wait: Duration) -> Result<Done, String> {
    let err = |e: std::io::Error| format!("guest agent {}: {e}", sock.display());
    let deadline = Instant::now() + wait;
    let id = GUEST_IDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut frame = Vec::new();
    guest_proto::encode(id, &Msg::Exec(e), &mut frame).map_err(|e| e.to_string())?;
    let mut s = std::os::unix::net::UnixStream::connect(sock).map_err(err)?;
    s.set_write_timeout(Some(wait.max(Duration::from_secs(1))))
        .map_err(err)?;
    s.write_all(&frame).map_err(err)?;
    let mut buf = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let mut total = 0usize;
    loop {
        while let Some((f, n)) =
            guest_proto::decode(&buf).map_err(|e| format!("guest agent {}: {e}", sock.display()))?
        {
            buf.drain(..n);
            match f.msg {
                Msg::Done(d) if f.id == id => return Ok(d),
                // An answer to an earlier request, or a kind this side does not know.
                _ => tracing::debug!(id = f.id, "guest agent frame dropped"),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "the guest agent did not answer within {} s",
                wait.as_secs()
            ));
        }
        s.set_read_timeout(Some(left.min(Duration::from_secs(1))))
            .map_err(err)?;
        match s.read(&mut chunk) {
            Ok(0) => return Err("the guest agent's port closed".into()),
            Ok(k) => {
                total += k;
                if total > 4 * (guest_proto::MAX_FRAME + guest_proto::HEADER_LEN) {
                    return Err("the guest agent sent too much".into());
                }
                buf.extend_from_slice(&chunk[..k]);
            }
            Err(e) if super::read_again(&e) => {}
            Err(e) => return Err(err(e)),
        }
    }
}

/// `nsenter` into a netns VM's network namespace, then `argv` as a process of the VM
/// ([`crate::stack::as_vm`]).
fn in_vm(ns: &str, vm: &str, argv: &[String]) -> Vec<String> {
    let mut c: Vec<String> = vec!["nsenter".into(), format!("--net=/run/netns/{ns}")];
    c.extend(as_vm(vm, argv));
    c
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

impl AgentCore {
    /// The cluster's munge key here.
    pub(super) fn munge_key_file(&self, n: u32) -> PathBuf {
        self.cfg
            .state_dir
            .join("secrets")
            .join(format!("c{n}.munge"))
    }

    /// A VM's Slurm directory.
    fn slurm_paths(&self, local: &str) -> VmPaths {
        VmPaths::new(&self.run_dir().join(format!("{local}.slurm")))
    }

    /// [`crate::proto::Request::Stack`]: keep the key and nodes, start the daemons in
    /// the cluster's running VMs here (rewriting their configuration).
    pub(super) fn stack_set(
        &mut self,
        authz: &Authorization,
        cluster: &str,
        mut stack: SlurmStack,
    ) -> Result<serde_json::Value, Refusal> {
        let n = self.confirmed(&authz.key, cluster)?;
        if self.driver.kind() == "libvirt" {
            return Err(format!(
                "the {} driver's guests do not carry Slurm (docs/CONTROLLER.md, the cluster stack)",
                self.driver.kind()
            ));
        }
        let key = unhex(&stack.munge_key).ok_or("the munge key is not hex")?;
        write_munge_key(&self.munge_key_file(n), &key).map_err(|e| format!("munge key: {e}"))?;
        stack.munge_key.clear();
        if let Some(c) = self.state.clusters.get_mut(&n) {
            c.stack = Some(stack);
        }
        self.save_one(n).map_err(|e| e.to_string())?;
        let vms: Vec<String> = self.state.clusters[&n]
            .slots
            .iter()
            .filter(|s| s.state == "running")
            .map(|s| s.name.clone())
            .collect();
        for vm in &vms {
            let guest = self
                .stack_start_vm(n, vm)
                .map_err(|e| format!("Slurm in VM {}: {e}", quote(vm)))?;
            // A guest is not trusted to answer: its set-up does not hold this agent
            // (the controller's wait for idle nodes names a node whose set-up failed;
            // the reason is in this agent's log).
            if let Some(g) = guest {
                g.apply_in_background(Duration::from_secs(120));
            }
        }
        Ok(serde_json::json!({ "vms": vms }))
    }

    /// Start what the stack runs in VM `vm` of cluster `n` (after the VM started, or
    /// when the stack arrives): munged, then slurmctld on the frontend or slurmd on a
    /// compute; rewrite its configuration. Daemons that run already are left running
    /// (`scontrol reconfigure` on the frontend makes them re-read it). Nothing when the
    /// cluster has no stack. A VM that is a guest of its own gets the same through its
    /// guest agent: returned prepared, for the caller to apply ([`GuestStack::apply`]).
    pub(super) fn stack_start_vm(
        &mut self,
        n: u32,
        vm: &str,
    ) -> Result<Option<GuestStack>, String> {
        let Some(c) = self.state.clusters.get(&n) else {
            return Ok(None);
        };
        let Some(stack) = c.stack.clone() else {
            return Ok(None);
        };
        let cluster = c.name.clone();
        let slot = c
            .slots
            .iter()
            .find(|s| s.name == vm)
            .cloned()
            .ok_or_else(|| format!("no VM {} here", quote(vm)))?;
        let frontend = stack.frontend == vm;
        if !frontend && !stack.nodes.iter().any(|x| x.name == vm) {
            return Ok(None);
        }
        let handle = slot
            .handle
            .as_deref()
            .ok_or_else(|| format!("VM {} is not running", quote(vm)))?;
        if let Some(sock) = self.driver.guest_agent(handle) {
            if frontend {
                return Err("the frontend runs in a netns VM only".into());
            }
            let key =
                std::fs::read(self.munge_key_file(n)).map_err(|e| format!("munge key: {e}"))?;
            let gp = VmPaths::new(Path::new(GUEST_SLURM_DIR));
            let f = |name: &str| gp.file(name).display().to_string();
            return Ok(Some(GuestStack {
                vm: vm.to_string(),
                sock,
                files: vec![
                    (f("munge.key"), key, "0400"),
                    (
                        f("slurm.conf"),
                        slurm_conf(&cluster, &stack, &gp).into_bytes(),
                        "0644",
                    ),
                    (
                        f("topology.conf"),
                        topology_conf(&cluster, &stack).into_bytes(),
                        "0644",
                    ),
                    (
                        "/etc/hosts".into(),
                        guest_hosts(&stack).into_bytes(),
                        "0644",
                    ),
                ],
            }));
        }
        let ns = handle
            .strip_prefix("netns:")
            .ok_or_else(|| {
                format!(
                    "the {} driver's guests do not carry Slurm (no guest agent)",
                    self.driver.kind()
                )
            })?
            .to_string();
        let p = self.slurm_paths(&slot.local);
        let io = |e: std::io::Error| format!("{}: {e}", p.dir.display());
        prepare_vm(&cluster, &stack, &p, "").map_err(io)?;
        let mut started = Vec::new();
        let sock = p.munge_socket();
        if pids_marked(&[format!("--socket={}", sock.display())]).is_empty() {
            let _ = std::fs::remove_file(&sock);
            let argv = munged_argv(&p, &self.munge_key_file(n));
            started.push(self.spawn_in_vm(&ns, vm, &argv, &p.file("munged.out"))?);
            let end = Instant::now() + Duration::from_secs(10);
            while !sock.exists() {
                if Instant::now() > end {
                    return Err(format!(
                        "munged made no socket within 10 s (see {})",
                        p.file("munged.out").display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        if pids_marked(&[format!("-f {}", p.conf().display())]).is_empty() {
            let argv = slurm_daemon_argv(vm, frontend, &p);
            let log = p.file(if frontend {
                "slurmctld.out"
            } else {
                "slurmd.out"
            });
            started.push(self.spawn_in_vm(&ns, vm, &argv, &log)?);
        }
        if !started.is_empty() {
            // The VM's children: stopped with it (an adopted VM gets an entry now).
            let handle = format!("netns:{ns}");
            self.running
                .entry(slot.local.clone())
                .or_insert_with(|| RunningVm {
                    handle,
                    children: Vec::new(),
                })
                .children
                .extend(started);
        }
        Ok(None)
    }

    /// At the agent's start, after the reconcile: in the running VMs a previous run
    /// started (adopted as they run) of clusters with the stack, the daemons that
    /// outlived that run are kept and the missing ones started again
    /// ([`AgentCore::stack_start_vm`] starts only what does not run).
    pub(super) fn stack_adopt(&mut self, log: &mut Vec<String>) {
        let vms: Vec<(u32, String)> = self
            .state
            .clusters
            .iter()
            .filter(|(_, c)| c.stack.is_some())
            .flat_map(|(n, c)| {
                c.slots
                    .iter()
                    .filter(|s| s.state == "running" && s.handle.is_some())
                    .map(move |s| (*n, s.name.clone()))
            })
            .collect();
        for (n, vm) in vms {
            match self.stack_start_vm(n, &vm) {
                Ok(None) => {}
                Ok(Some(g)) => g.apply_in_background(Duration::from_secs(60)),
                Err(e) => log.push(format!("Slurm in VM {vm} not started: {e}")),
            }
        }
    }

    fn spawn_in_vm(
        &self,
        ns: &str,
        vm: &str,
        argv: &[String],
        log: &Path,
    ) -> Result<std::process::Child, String> {
        let c = in_vm(ns, vm, argv);
        let a: Vec<&str> = c[1..].iter().map(|s| s.as_str()).collect();
        spawn(&c[0], &a, &[], log).map_err(|e| e.to_string())
    }

    /// [`crate::proto::Request::Exec`], first half (under the agent's lock): check the
    /// caller owns a running netns VM of that name, and prepare the command.
    pub(super) fn exec_plan(
        &self,
        authz: &Authorization,
        cluster: &str,
        vm: &str,
        exec: ExecReq,
    ) -> Result<ExecPlan, Refusal> {
        let n = self.confirmed(&authz.key, cluster)?;
        let slot = self.state.clusters[&n]
            .slots
            .iter()
            .find(|s| s.name == vm)
            .ok_or_else(|| format!("no VM {} in cluster {} here", quote(vm), quote(cluster)))?;
        let handle = slot
            .handle
            .as_deref()
            .filter(|h| slot.state == "running" && self.driver.alive(h))
            .ok_or_else(|| format!("VM {} is not running", quote(vm)))?;
        if let Some(sock) = self.driver.guest_agent(handle) {
            return Ok(ExecPlan {
                cmd: exec.argv,
                env: Vec::new(),
                cwd: PathBuf::new(),
                stdin: exec.stdin,
                timeout: Duration::from_secs(exec.timeout_secs),
                guest: Some(sock),
            });
        }
        let ns = handle.strip_prefix("netns:").ok_or_else(|| {
            format!(
                "the {} driver cannot run commands in a guest (no guest agent)",
                self.driver.kind()
            )
        })?;
        let p = self.slurm_paths(&slot.local);
        std::fs::create_dir_all(p.home()).map_err(|e| format!("{}: {e}", p.dir.display()))?;
        let mut env = Vec::new();
        if p.conf().exists() {
            env.push(("SLURM_CONF".to_string(), p.conf().display().to_string()));
        }
        Ok(ExecPlan {
            cmd: in_vm(ns, vm, &exec.argv),
            env,
            cwd: p.home(),
            stdin: exec.stdin,
            timeout: Duration::from_secs(exec.timeout_secs),
            guest: None,
        })
    }
}

/// An exec in a guest: its guest agent runs it with the same bounds (output per
/// stream, timeout, then the process group ended); the wait here is the timeout and
/// the guest's 2 s grace, plus slack.
fn run_in_guest(sock: &Path, plan: ExecPlan) -> Result<ExecOutput, String> {
    let ms = u32::try_from(plan.timeout.as_millis()).unwrap_or(u32::MAX);
    let e = Exec {
        argv: plan.cmd.into_iter().map(String::into_bytes).collect(),
        stdin: plan.stdin.into_bytes(),
        timeout_ms: ms,
    };
    let d = guest_call(sock, e, plan.timeout + Duration::from_secs(15))?;
    Ok(ExecOutput {
        code: d.code,
        timed_out: d.timed_out,
        stdout: String::from_utf8_lossy(&d.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&d.stderr).into_owned(),
        dropped: d.dropped,
    })
}

/// [`crate::proto::Request::Exec`], second half (outside the agent's lock): run the
/// command in its own process group, feed its input, keep its bounded output, and
/// end the whole group at the timeout. In a guest: through its guest agent, which
/// does the same there; `Err` when the guest agent does not answer properly.
pub fn run_exec(plan: ExecPlan) -> Result<ExecOutput, String> {
    if let Some(sock) = plan.guest.clone() {
        return run_in_guest(&sock, plan);
    }
    Ok(run_local(plan))
}

fn run_local(plan: ExecPlan) -> ExecOutput {
    let mut cmd = Command::new(&plan.cmd[0]);
    cmd.args(&plan.cmd[1..]).current_dir(&plan.cwd);
    for (k, v) in &plan.env {
        cmd.env(k, v);
    }
    let bounds = Bounds::new(EXEC_OUTPUT_MAX, plan.timeout);
    let signal = |pgid: u32, sig: Signal| {
        let sig = match sig {
            Signal::Term => libc::SIGTERM,
            Signal::Kill => libc::SIGKILL,
        };
        crate::sys::signal_group(i32::try_from(pgid).unwrap_or(0), sig);
    };
    match bounded_exec::run(&mut cmd, plan.stdin.into_bytes(), &bounds, signal) {
        Ok(f) => ExecOutput {
            code: f.code,
            timed_out: f.timed_out,
            stdout: String::from_utf8_lossy(&f.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&f.stderr).into_owned(),
            dropped: f.dropped,
        },
        Err(e) => ExecOutput {
            code: Some(127),
            stderr: format!("cannot run {}: {e}", plan.cmd[0]),
            ..Default::default()
        },
    }
}

/// The reply to an exec.
pub fn exec_reply(plan: ExecPlan) -> Reply {
    match run_exec(plan) {
        Ok(out) => Reply {
            ok: true,
            error: None,
            data: serde_json::to_value(out).unwrap_or_default(),
        },
        Err(e) => Reply {
            ok: false,
            error: Some(e),
            data: serde_json::Value::Null,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn exec() -> Exec {
        Exec {
            argv: vec![b"hostname".to_vec()],
            stdin: Vec::new(),
            timeout_ms: 1000,
        }
    }

    /// A fake guest on a socket: reads one request frame, then `answer` writes what it
    /// likes given the request's id.
    fn guest(
        answer: impl FnOnce(u32, &mut std::os::unix::net::UnixStream) + Send + 'static,
    ) -> (tempfile::TempDir, PathBuf) {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("g.ga");
        let l = UnixListener::bind(&sock).unwrap();
        std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            let id = loop {
                let k = s.read(&mut chunk).unwrap();
                buf.extend_from_slice(&chunk[..k]);
                if let Ok(Some((f, _))) = guest_proto::decode(&buf) {
                    break f.id;
                }
            };
            answer(id, &mut s);
            // Hold the connection open a while, as a guest that says no more.
            std::thread::sleep(Duration::from_secs(5));
        });
        (d, sock)
    }

    fn done(id: u32, out: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        let d = Done {
            code: Some(0),
            stdout: out.to_vec(),
            ..Done::default()
        };
        guest_proto::encode(id, &Msg::Done(d), &mut b).unwrap();
        b
    }

    #[test]
    fn guest_answers_after_a_stale_one() {
        let (_d, sock) = guest(|id, s| {
            s.write_all(&done(id.wrapping_sub(1), b"stale")).unwrap();
            s.write_all(&done(id, b"k-c1\n")).unwrap();
        });
        let d = guest_call(&sock, exec(), Duration::from_secs(10)).unwrap();
        assert_eq!((d.code, d.stdout), (Some(0), b"k-c1\n".to_vec()));
    }

    #[test]
    fn hostile_guests_cost_a_bounded_wait_and_buffer() {
        // Announces a 1 GiB frame: refused from its header, nothing more read.
        let (_d, sock) = guest(|id, s| {
            let mut h = done(id, b"")[..guest_proto::HEADER_LEN].to_vec();
            h[10..14].copy_from_slice(&(1u32 << 30).to_be_bytes());
            s.write_all(&h).unwrap();
            let _ = s.write_all(&vec![b'x'; 1 << 20]);
        });
        let e = guest_call(&sock, exec(), Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("bytes (most"), "{e}");
        // Garbage.
        let (_d, sock) = guest(|_, s| {
            let _ = s.write_all(b"GET / HTTP/1.0\r\n\r\n");
        });
        let e = guest_call(&sock, exec(), Duration::from_secs(10)).unwrap_err();
        assert!(e.contains("bad magic"), "{e}");
        // Never answers: the call ends at its bound.
        let (_d, sock) = guest(|_, _| {});
        let t = Instant::now();
        let e = guest_call(&sock, exec(), Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("did not answer"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
        // Endless answers to other requests: cut off after a few frames' worth.
        let (_d, sock) = guest(|id, s| {
            let f = done(id.wrapping_add(7), &vec![b'y'; guest_proto::OUTPUT_MAX]);
            for _ in 0..64 {
                if s.write_all(&f).is_err() {
                    return;
                }
            }
        });
        let e = guest_call(&sock, exec(), Duration::from_secs(30)).unwrap_err();
        assert!(e.contains("too much"), "{e}");
    }
}
