//! Adaptive polling before the I/O loop sleeps.
//!
//! A wake-up from a blocking wait costs tens of microseconds on a virtual machine (the idle
//! vCPU halts and needs an interrupt), and a ping through the overlay crosses an edge four
//! times. Polling the completion queue for a short while before sleeping saves most of that
//! when the next event is close, and wastes CPU when it is not. The window adapts in the
//! manner of Linux's guest halt-polling: it grows fast when a wait ended soon after the
//! window ran out (a longer poll would have caught it), shrinks slowly when waits run far
//! past the maximum, and is off altogether while the host has no idle core (sampled from
//! `/proc/stat` every second), where polling
//! only takes time from the threads that would produce the next event.

use std::time::Duration;

/// Smallest window worth polling for.
const STEP: Duration = Duration::from_micros(8);

/// The polling window of one I/O loop.
#[derive(Debug, Clone)]
pub struct AdaptiveSpin {
    max: Duration,
    window: Duration,
    host_busy: bool,
}

impl AdaptiveSpin {
    /// A window that never exceeds `max`; `max` of zero never polls.
    pub fn new(max: Duration) -> Self {
        Self {
            max,
            window: Duration::ZERO,
            host_busy: false,
        }
    }

    /// How long to poll before the next sleep.
    pub fn window(&self) -> Duration {
        if self.host_busy {
            Duration::ZERO
        } else {
            self.window
        }
    }

    /// Reports how long the loop waited for its next completion, polling and sleeping
    /// together, after it found the completion queue empty.
    pub fn waited(&mut self, idle: Duration) {
        if self.max.is_zero() || self.host_busy || idle <= self.window {
            return;
        }
        if idle <= self.max {
            self.window = (self.window * 2).max(STEP).min(self.max);
        } else {
            self.window -= self.window / 8;
            if self.window < STEP / 2 {
                self.window = Duration::ZERO;
            }
        }
    }

    /// Tells whether the host has no idle core (see [`host_busy`]).
    pub fn set_host_busy(&mut self, busy: bool) {
        self.host_busy = busy;
    }
}

/// Watches the host's idle CPU time (`/proc/stat`) between two samples.
#[derive(Debug, Default)]
pub struct IdleCores {
    last: Option<CpuTimes>,
}

/// Idle and total jiffies of all CPUs together.
#[derive(Debug, Clone, Copy, PartialEq)]
struct CpuTimes {
    idle: u64,
    total: u64,
}

impl IdleCores {
    /// How many cores were idle on average since the previous call (`None` on the first
    /// call or when `/proc/stat` cannot be read).
    pub fn sample(&mut self, cores: usize) -> Option<f64> {
        let now = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|s| parse_cpu_times(&s))?;
        let prev = self.last.replace(now)?;
        idle_cores(prev, now, cores)
    }
}

/// True when less than half a core was idle: polling would only take CPU time from the
/// threads that produce the next event.
pub fn host_busy(idle_cores: Option<f64>) -> bool {
    idle_cores.is_some_and(|c| c < 0.5)
}

fn idle_cores(prev: CpuTimes, now: CpuTimes, cores: usize) -> Option<f64> {
    let total = now.total.checked_sub(prev.total)?;
    let idle = now.idle.checked_sub(prev.idle)?;
    if total == 0 {
        return None;
    }
    Some(idle as f64 / total as f64 * cores as f64)
}

/// Parses the aggregate `cpu` line of `/proc/stat`: idle is idle + iowait.
fn parse_cpu_times(stat: &str) -> Option<CpuTimes> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal [guest guest_nice]: guest time is
    // already counted in user.
    let total = v.iter().take(8).sum();
    Some(CpuTimes {
        idle: v[3] + v[4],
        total,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const US: Duration = Duration::from_micros(1);

    #[test]
    fn disabled_never_polls() {
        let mut s = AdaptiveSpin::new(Duration::ZERO);
        for _ in 0..10 {
            s.waited(50 * US);
        }
        assert_eq!(s.window(), Duration::ZERO);
    }

    #[test]
    fn grows_to_catch_close_events_and_caps_at_max() {
        let mut s = AdaptiveSpin::new(100 * US);
        let mut hits = 0;
        for _ in 0..20 {
            // The reply arrives 60 us after the request went out.
            if 60 * US <= s.window() {
                hits += 1;
            }
            s.waited(60 * US);
        }
        assert!(s.window() >= 60 * US && s.window() <= 100 * US);
        assert!(hits >= 15, "{hits}");
    }

    #[test]
    fn shrinks_to_zero_when_events_are_far_apart() {
        let mut s = AdaptiveSpin::new(100 * US);
        for _ in 0..5 {
            s.waited(60 * US);
        }
        assert!(s.window() > Duration::ZERO);
        for _ in 0..40 {
            s.waited(Duration::from_millis(100));
        }
        assert_eq!(s.window(), Duration::ZERO);
    }

    #[test]
    fn ping_pattern_keeps_catching_the_reply() {
        // One short wait (the reply) and one long wait (the next ping) per cycle.
        let mut s = AdaptiveSpin::new(200 * US);
        let mut hits = 0;
        for _ in 0..100 {
            if 150 * US <= s.window() {
                hits += 1;
            }
            s.waited(150 * US);
            s.waited(Duration::from_millis(100));
        }
        assert!(hits >= 50, "{hits}");
    }

    #[test]
    fn busy_host_turns_polling_off() {
        let mut s = AdaptiveSpin::new(100 * US);
        for _ in 0..5 {
            s.waited(60 * US);
        }
        s.set_host_busy(true);
        assert_eq!(s.window(), Duration::ZERO);
        s.set_host_busy(false);
        assert!(s.window() > Duration::ZERO);
    }

    #[test]
    fn idle_cores_from_proc_stat() {
        let a = parse_cpu_times("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 50 0 50 400 0 0 0 0 0 0\n")
            .unwrap();
        let b = parse_cpu_times("cpu  200 0 200 900 0 0 0 0 0 0\n").unwrap();
        // 100 idle of 300 jiffies on 2 cores: two thirds of a core idle.
        let c = idle_cores(a, b, 2).unwrap();
        assert!((c - 2.0 / 3.0).abs() < 1e-9, "{c}");
        assert!(!host_busy(Some(c)));
        assert!(host_busy(Some(0.2)));
        assert!(!host_busy(None));
        assert_eq!(idle_cores(b, a, 2), None);
        assert_eq!(idle_cores(a, a, 2), None);
        assert_eq!(parse_cpu_times(""), None);
        assert_eq!(parse_cpu_times("cpu  1 2 x 4 5\n"), None);
        assert_eq!(parse_cpu_times("cpu  1 2\n"), None);
    }
}
