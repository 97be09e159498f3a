//! Helper processes: run a command to completion, spawn a long-running one with its
//! output to a log, stop a child (SIGTERM, a grace period, SIGKILL, always reaped), and
//! end processes no [`Child`] handle is kept of, found by their pid file or by the files
//! their command lines name (a previous agent run's). Signals go through
//! [`crate::sys::signal`].
use crate::sys::signal;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A helper command that could not be run or failed.
#[derive(Debug, thiserror::Error)]
#[error("`{cmd}` failed: {msg}")]
pub struct ProcessError {
    /// The command line.
    pub cmd: String,
    /// Its stderr or the spawn error.
    pub msg: String,
}

/// Run a command to completion; stdout on success, a [`ProcessError`] with its stderr
/// otherwise.
pub fn run(prog: &str, args: &[&str]) -> Result<String, ProcessError> {
    let cmd = || format!("{prog} {}", args.join(" "));
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| ProcessError {
            cmd: cmd(),
            msg: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(ProcessError {
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
) -> Result<Child, ProcessError> {
    let cmd = || format!("{prog} {}", args.join(" "));
    let f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| ProcessError {
            cmd: cmd(),
            msg: format!("log {}: {e}", log.display()),
        })?;
    let f2 = f.try_clone().map_err(|e| ProcessError {
        cmd: cmd(),
        msg: e.to_string(),
    })?;
    let mut c = Command::new(prog);
    c.args(args).stdin(Stdio::null()).stdout(f).stderr(f2);
    for (k, v) in env {
        c.env(k, v);
    }
    c.spawn().map_err(|e| ProcessError {
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
        // Not reaped yet (try_wait above returned None): the pid cannot have been
        // reused.
        signal(pid, libc::SIGTERM);
    }
    for _ in 0..30 {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Whether the process of a pid file runs and its command line still names `mark`.
pub fn pidfile_alive(pidfile: &Path, mark: &str) -> bool {
    std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
        .and_then(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
        .is_some_and(|c| String::from_utf8_lossy(&c).contains(mark))
}

/// End a process we started from its pid file, when its command line still names
/// `mark` (so a reused pid is left alone): SIGTERM, up to 3 s, then SIGKILL.
pub fn kill_pidfile(pidfile: &Path, mark: &str) {
    let Some(pid) = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|t| t.trim().parse::<i32>().ok())
    else {
        return;
    };
    let ours = |pid: i32| {
        std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).contains(mark))
            .unwrap_or(false)
    };
    for (i, sig) in std::iter::repeat_n(libc::SIGTERM, 30)
        .chain(std::iter::once(libc::SIGKILL))
        .enumerate()
    {
        if !ours(pid) {
            break;
        }
        if i == 0 || sig == libc::SIGKILL {
            // The pid file's process still names `mark`: it is ours.
            signal(pid, sig);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(pidfile);
}

/// The command lines of every process (not this one) at one moment, read once so that
/// many marks can be looked for without reading `/proc` again for each: an agent
/// reconciling or releasing asks for a few marks per reservation, and one read of
/// every process per mark made its start linear in reservations times processes.
/// Processes started after the snapshot are not in it: only callers that start none
/// of the processes they look for while using it (reconcile, release) use one.
pub struct ProcSnapshot(Vec<String>);

impl ProcSnapshot {
    /// Read every process's command line now.
    pub fn take() -> ProcSnapshot {
        let me = std::process::id() as i32;
        let Ok(rd) = std::fs::read_dir("/proc") else {
            return ProcSnapshot(Vec::new());
        };
        ProcSnapshot(
            rd.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|pid| *pid != me)
                .filter_map(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).ok())
                .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
                .collect(),
        )
    }

    /// Whether a process of the snapshot names one of `marks`.
    pub fn any_marked(&self, marks: &[String]) -> bool {
        self.0
            .iter()
            .any(|c| marks.iter().any(|m| c.contains(m.as_str())))
    }
}

/// Pids of processes (not this one) whose command line contains one of `marks`.
pub fn pids_marked(marks: &[String]) -> Vec<i32> {
    let me = std::process::id() as i32;
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| *pid != me)
        .filter(|pid| {
            let c = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            marks.iter().any(|m| c.contains(m.as_str()))
        })
        .collect()
}

/// End every process whose command line names one of `marks` (files under the
/// agent's state directory that only that cluster or VM uses): SIGTERM, up to 3 s,
/// then SIGKILL. With `dry`, only note them.
pub fn kill_marked(marks: &[String], dry: bool, log: &mut Vec<String>) {
    let pids = pids_marked(marks);
    if pids.is_empty() {
        return;
    }
    let list: Vec<String> = pids.iter().map(|p| p.to_string()).collect();
    log.push(format!("end processes {}", list.join(", ")));
    if dry {
        return;
    }
    for p in &pids {
        signal(*p, libc::SIGTERM);
    }
    for _ in 0..30 {
        if pids_marked(marks).is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for p in pids_marked(marks) {
        signal(p, libc::SIGKILL);
    }
}
