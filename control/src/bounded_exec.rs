//! Run one command with bounds: its own process group, its input fed from a thread,
//! at most `output_max` bytes kept of each output stream (the rest counted), and the
//! whole group ended at the timeout (SIGTERM, then SIGKILL after a grace period).
//!
//! The agent runs commands in netns VMs with it (`control/src/agent/stack.rs`) and
//! the guest agent `mvc-guest` runs commands inside a qemu guest with it. The guest
//! binary does not link this crate, so this file uses `std` only and `mvc-guest`
//! (`src/bin/mvc-guest.rs`) includes the same file; how a group is signalled is the
//! caller's ([`Signal`]).
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The signals a timeout sends to the command's process group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    /// First: ask it to end.
    Term,
    /// After the grace period: end it.
    Kill,
}

/// Between SIGTERM and SIGKILL at a timeout.
pub const GRACE: Duration = Duration::from_secs(2);
/// How long a run waits, once the command ended, for what it left in the background
/// to let go of its output pipes.
pub const SETTLE: Duration = Duration::from_millis(500);

/// The bounds of one run.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    /// Bytes kept of each output stream.
    pub output_max: usize,
    /// How long the command may run.
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// How long to wait, once the command ended, for what it left in the background
    /// to let go of its output pipes.
    pub settle: Duration,
}

impl Bounds {
    /// `output_max` bytes per stream, `timeout`, then [`GRACE`]; [`SETTLE`].
    pub fn new(output_max: usize, timeout: Duration) -> Bounds {
        Bounds {
            output_max,
            timeout,
            grace: GRACE,
            settle: SETTLE,
        }
    }
}

/// Signal process group `pgid` with the system's `kill` command (`kill -s SIG --
/// -PGID`; busybox's in a guest), for a caller without a system call of its own.
pub fn kill_command(pgid: u32, sig: Signal) {
    let s = match sig {
        Signal::Term => "TERM",
        Signal::Kill => "KILL",
    };
    let _ = Command::new("kill")
        .args(["-s", s, "--", &format!("-{pgid}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// What a run gave.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Finished {
    /// Exit code (`None`: ended by a signal, or not waited for).
    pub code: Option<i32>,
    /// Whether the timeout ended it.
    pub timed_out: bool,
    /// Standard output (at most `output_max` bytes).
    pub stdout: Vec<u8>,
    /// Standard error (at most `output_max` bytes).
    pub stderr: Vec<u8>,
    /// Output bytes over the bounds, counted not kept (both streams).
    pub dropped: u64,
}

type Stream = Arc<Mutex<(Vec<u8>, u64)>>;

/// Keep at most `max` bytes of a stream in `buf`, counting the rest; the thread holds
/// its clone of `buf` until the stream closes.
fn drain(mut r: impl Read + Send + 'static, buf: Stream, max: usize) {
    std::thread::spawn(move || {
        let mut chunk = [0u8; 16384];
        loop {
            match r.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(k) => {
                    let mut b = buf.lock().unwrap_or_else(|p| p.into_inner());
                    let room = max.saturating_sub(b.0.len()).min(k);
                    b.0.extend_from_slice(&chunk[..room]);
                    b.1 += (k - room) as u64;
                }
            }
        }
    });
}

/// Run `cmd` (its program, arguments, environment and directory set by the caller)
/// within `bounds`, feeding it `stdin`; `signal(pgid, sig)` signals its process group
/// at the timeout. `Err` only when it cannot start.
pub fn run(
    cmd: &mut Command,
    stdin: Vec<u8>,
    bounds: &Bounds,
    signal: impl Fn(u32, Signal),
) -> std::io::Result<Finished> {
    cmd.stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    let mut child = cmd.spawn()?;
    // The group this command leads (its own, made at spawn).
    let pgid = child.id();
    let out: Stream = Arc::default();
    let err: Stream = Arc::default();
    if let Some(o) = child.stdout.take() {
        drain(o, out.clone(), bounds.output_max);
    }
    if let Some(e) = child.stderr.take() {
        drain(e, err.clone(), bounds.output_max);
    }
    if let Some(mut i) = child.stdin.take() {
        std::thread::spawn(move || {
            let _ = i.write_all(&stdin);
        });
    }
    let end = Instant::now() + bounds.timeout;
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() >= end => {
                timed_out = true;
                signal(pgid, Signal::Term);
                std::thread::sleep(bounds.grace);
                signal(pgid, Signal::Kill);
                break child.wait().ok();
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(_) => break None,
        }
    };
    // What it left in the background may hold the pipes open: give it a moment, then
    // take what came.
    let settle = Instant::now() + bounds.settle;
    while Instant::now() < settle && (Arc::strong_count(&out) > 1 || Arc::strong_count(&err) > 1) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let take = |b: &Stream| std::mem::take(&mut *b.lock().unwrap_or_else(|p| p.into_inner()));
    let (stdout, d1) = take(&out);
    let (stderr, d2) = take(&err);
    Ok(Finished {
        code: status.and_then(|s| s.code()),
        timed_out,
        stdout,
        stderr,
        dropped: d1 + d2,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(output_max: usize, timeout_ms: u64) -> Bounds {
        Bounds {
            output_max,
            timeout: Duration::from_millis(timeout_ms),
            grace: Duration::from_millis(300),
            settle: Duration::from_millis(200),
        }
    }

    fn sh(script: &str) -> Command {
        let mut c = Command::new("sh");
        c.args(["-c", script]);
        c
    }

    #[test]
    fn output_over_the_cap_is_counted_not_kept() {
        let f = run(
            &mut sh("head -c 70000 /dev/zero; head -c 10 /dev/zero >&2"),
            Vec::new(),
            &bounds(1000, 10_000),
            kill_command,
        )
        .unwrap();
        assert_eq!(f.code, Some(0));
        assert!(!f.timed_out);
        assert_eq!(f.stdout, vec![0u8; 1000]);
        assert_eq!(f.stderr.len(), 10);
        assert_eq!(f.dropped, 69_000);
    }

    #[test]
    fn input_is_fed_and_exit_code_kept() {
        let f = run(
            &mut sh("cat; exit 3"),
            b"abc".to_vec(),
            &bounds(1000, 10_000),
            kill_command,
        )
        .unwrap();
        assert_eq!((f.code, f.stdout.as_slice()), (Some(3), &b"abc"[..]));
    }

    #[test]
    fn timeout_ends_the_group_even_when_term_is_ignored() {
        let t0 = Instant::now();
        let sent = Mutex::new(Vec::new());
        // A shell that ignores SIGTERM, and a child of it in the same group.
        let f = run(
            &mut sh("trap '' TERM; echo up; sleep 30 & sleep 30; wait"),
            Vec::new(),
            &bounds(1000, 300),
            |pgid, sig| {
                sent.lock().unwrap().push(sig);
                kill_command(pgid, sig);
            },
        )
        .unwrap();
        let took = t0.elapsed();
        assert!(f.timed_out);
        assert_eq!(f.code, None, "ended by SIGKILL");
        assert_eq!(f.stdout, b"up\n");
        assert_eq!(sent.into_inner().unwrap(), [Signal::Term, Signal::Kill]);
        // 0.3 s timeout + 0.3 s grace + 0.2 s settle, and slack for a loaded machine.
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    #[test]
    fn a_command_that_cannot_start_is_an_error() {
        let r = run(
            &mut Command::new("/nonexistent/mvc-no-such-program"),
            Vec::new(),
            &bounds(1000, 1000),
            kill_command,
        );
        assert!(r.is_err());
    }
}
