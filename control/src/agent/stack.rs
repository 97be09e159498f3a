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
use super::{AgentCore, Refusal};
use crate::auth::Authorization;
use crate::driver::RunningVm;
use crate::process::{pids_marked, spawn};
use crate::proto::Reply;
use crate::stack::{
    as_vm, munged_argv, prepare_vm, slurm_daemon_argv, write_munge_key, ExecOutput, ExecReq,
    SlurmStack, VmPaths, EXEC_OUTPUT_MAX,
};
use crate::validate::quote;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A command to run in a VM, prepared under the agent's lock and run outside it.
pub struct ExecPlan {
    cmd: Vec<String>,
    env: Vec<(String, String)>,
    cwd: PathBuf,
    stdin: String,
    timeout: Duration,
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
        if self.driver.kind() != "netns" {
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
        self.save().map_err(|e| e.to_string())?;
        let vms: Vec<String> = self.state.clusters[&n]
            .slots
            .iter()
            .filter(|s| s.state == "running")
            .map(|s| s.name.clone())
            .collect();
        for vm in &vms {
            self.stack_start_vm(n, vm)
                .map_err(|e| format!("Slurm in VM {}: {e}", quote(vm)))?;
        }
        Ok(serde_json::json!({ "vms": vms }))
    }

    /// Start what the stack runs in VM `vm` of cluster `n` (after the VM started, or
    /// when the stack arrives): munged, then slurmctld on the frontend or slurmd on a
    /// compute; rewrite its configuration. Daemons that run already are left running
    /// (`scontrol reconfigure` on the frontend makes them re-read it). Nothing when the
    /// cluster has no stack.
    pub(super) fn stack_start_vm(&mut self, n: u32, vm: &str) -> Result<(), String> {
        let Some(c) = self.state.clusters.get(&n) else {
            return Ok(());
        };
        let Some(stack) = c.stack.clone() else {
            return Ok(());
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
            return Ok(());
        }
        let ns = slot
            .handle
            .as_deref()
            .and_then(|h| h.strip_prefix("netns:"))
            .ok_or_else(|| format!("VM {} is not a running netns VM", quote(vm)))?
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
        Ok(())
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
        })
    }
}

/// Collect at most [`EXEC_OUTPUT_MAX`] bytes of a stream, counting the rest.
fn drain(mut r: impl Read + Send + 'static, buf: Arc<Mutex<(Vec<u8>, u64)>>) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 16384];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => {
                    let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                    let room = EXEC_OUTPUT_MAX.saturating_sub(b.0.len()).min(k);
                    b.0.extend_from_slice(&chunk[..room]);
                    b.1 += (k - room) as u64;
                }
            }
        }
    });
}

/// [`crate::proto::Request::Exec`], second half (outside the agent's lock): run the
/// command in its own process group, feed its input, keep its bounded output, and
/// end the whole group at the timeout.
pub fn run_exec(plan: ExecPlan) -> ExecOutput {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(&plan.cmd[0]);
    cmd.args(&plan.cmd[1..])
        .current_dir(&plan.cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    for (k, v) in &plan.env {
        cmd.env(k, v);
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return ExecOutput {
                code: Some(127),
                stderr: format!("cannot run {}: {e}", plan.cmd[0]),
                ..Default::default()
            }
        }
    };
    let pgid = child.id() as i32;
    let out = Arc::new(Mutex::new((Vec::new(), 0u64)));
    let err = Arc::new(Mutex::new((Vec::new(), 0u64)));
    if let Some(o) = child.stdout.take() {
        drain(o, out.clone());
    }
    if let Some(e) = child.stderr.take() {
        drain(e, err.clone());
    }
    if let Some(mut i) = child.stdin.take() {
        let data = plan.stdin.into_bytes();
        std::thread::spawn(move || {
            let _ = i.write_all(&data);
        });
    }
    let end = Instant::now() + plan.timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= end => {
                timed_out = true;
                // The group this command leads (its own, made at spawn).
                crate::sys::signal_group(pgid, libc::SIGTERM);
                std::thread::sleep(Duration::from_secs(2));
                crate::sys::signal_group(pgid, libc::SIGKILL);
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    // What it left in the background holds the pipes open: give it a moment, then
    // take what came.
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle && (Arc::strong_count(&out) > 1 || Arc::strong_count(&err) > 1) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let take = |b: &Arc<Mutex<(Vec<u8>, u64)>>| {
        let b = b.lock().unwrap_or_else(|p| p.into_inner());
        (String::from_utf8_lossy(&b.0).into_owned(), b.1)
    };
    let (stdout, d1) = take(&out);
    let (stderr, d2) = take(&err);
    ExecOutput {
        code: status.and_then(|s| s.code()),
        timed_out,
        stdout,
        stderr,
        dropped: d1 + d2,
    }
}

/// The reply to an exec.
pub fn exec_reply(plan: ExecPlan) -> Reply {
    let out = run_exec(plan);
    Reply {
        ok: true,
        error: None,
        data: serde_json::to_value(out).unwrap_or_default(),
    }
}
