//! CPU cost of a measured interval: the user time of given processes (/proc/PID/stat) and
//! the whole machine's kernel time (system, irq and softirq from /proc/stat), which holds
//! the kernel side of every datapath (veth, bridge, TAP, XDP, UDP, crypto in the kernel).
//! Optionally the machine's CPU cycles from `perf stat -a` where the CPU exposes them.

use std::process::{Child, Command, Stdio};

/// Counters at one instant, in clock ticks.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User time of the processes.
    pub proc_user: u64,
    /// System time of the processes (part of `kernel`).
    pub proc_sys: u64,
    /// Machine-wide system + irq + softirq time.
    pub kernel: u64,
}

/// Reads the counters now. Processes that have gone count as zero.
pub fn sample(pids: &[u32]) -> Sample {
    let mut s = Sample::default();
    for pid in pids {
        if let Some((u, k)) = proc_times(*pid) {
            s.proc_user += u;
            s.proc_sys += k;
        }
    }
    s.kernel = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|t| machine_kernel(&t))
        .unwrap_or(0);
    s
}

/// CPU seconds between two samples: (process user, machine kernel, process system).
pub fn seconds(a: &Sample, b: &Sample) -> (f64, f64, f64) {
    let hz = crate::sys::clock_ticks_per_sec();
    let d = |x: u64, y: u64| y.saturating_sub(x) as f64 / hz;
    (
        d(a.proc_user, b.proc_user),
        d(a.kernel, b.kernel),
        d(a.proc_sys, b.proc_sys),
    )
}

fn proc_times(pid: u32) -> Option<(u64, u64)> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_proc_stat(&t)
}

/// utime and stime of a /proc/PID/stat line (the whole thread group).
fn parse_proc_stat(t: &str) -> Option<(u64, u64)> {
    // The command name may hold spaces and parentheses: fields start after the last ')'.
    let rest = &t[t.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // Field 3 (state) is f[0]; utime is field 14, stime field 15.
    Some((f.get(11)?.parse().ok()?, f.get(12)?.parse().ok()?))
}

/// system + irq + softirq of the "cpu" line of /proc/stat.
fn machine_kernel(t: &str) -> Option<u64> {
    let line = t.lines().find(|l| l.starts_with("cpu "))?;
    let f: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq ...
    Some(f.get(2)? + f.get(5)? + f.get(6)?)
}

/// Whether `perf stat` can count cycles here (virtual machines often expose no PMU).
pub fn perf_cycles_available() -> bool {
    Command::new("perf")
        .args(["stat", "-x,", "-e", "cycles", "true"])
        .stdout(Stdio::null())
        .output()
        .is_ok_and(|o| {
            o.status.success() && parse_perf_cycles(&String::from_utf8_lossy(&o.stderr)).is_some()
        })
}

/// A running `perf stat -a -e cycles` over the whole machine.
pub struct PerfCycles {
    child: Child,
}

impl PerfCycles {
    /// Starts counting for (at most) `secs` seconds.
    pub fn start(secs: u32) -> Option<PerfCycles> {
        let s = secs.to_string();
        Command::new("perf")
            .args(["stat", "-a", "-x,", "-e", "cycles", "--", "sleep", &s])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .ok()
            .map(|child| PerfCycles { child })
    }

    /// Waits for the count.
    pub fn finish(self) -> Option<u64> {
        let out = self.child.wait_with_output().ok()?;
        parse_perf_cycles(&String::from_utf8_lossy(&out.stderr))
    }
}

fn parse_perf_cycles(csv: &str) -> Option<u64> {
    csv.lines()
        .find(|l| l.split(',').nth(2).is_some_and(|e| e.starts_with("cycles")))
        .and_then(|l| l.split(',').next())
        .and_then(|v| v.trim().parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_and_perf_output() {
        let t = "1234 (my (odd) name) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 4 0";
        assert_eq!(parse_proc_stat(t), Some((250, 75)));
        assert_eq!(parse_proc_stat("garbage"), None);
        let s = "cpu  100 5 300 9000 10 20 30 0 0 0\ncpu0 1 2 3 4 5 6 7 0 0 0\n";
        assert_eq!(machine_kernel(s), Some(350));
        assert_eq!(
            parse_perf_cycles("123456,,cycles,1000,100.00,,\n"),
            Some(123_456)
        );
        assert_eq!(
            parse_perf_cycles("<not supported>,,cycles,0,100.00,,\n"),
            None
        );
    }
}
