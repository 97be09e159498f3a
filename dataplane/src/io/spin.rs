//! Adaptive polling before the I/O loop sleeps.
//!
//! A wake-up from a blocking wait costs tens of microseconds on a virtual machine (the idle
//! vCPU halts and needs an interrupt), and a ping through the overlay crosses an edge four
//! times. Polling the completion queue for a short while before sleeping saves most of that
//! when the next event is close, and wastes CPU when it is not. The window adapts in the
//! manner of Linux's guest halt-polling: it grows fast when a wait ended soon after the
//! window ran out (a longer poll would have caught it), shrinks slowly when waits run far
//! past the maximum, and is off altogether while the host has no idle core, where polling
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

    /// Tells whether every core of the host is busy (see [`host_busy`]).
    pub fn set_host_busy(&mut self, busy: bool) {
        self.host_busy = busy;
    }
}

/// True when the host's one-minute load average leaves no idle core. Unknown counts as
/// not busy.
pub fn host_busy(cores: usize) -> bool {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| parse_load1(&s))
        .is_some_and(|load| load >= cores as f64)
}

fn parse_load1(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok()
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
    fn parses_loadavg() {
        assert_eq!(parse_load1("0.52 1.17 0.66 2/300 1234\n"), Some(0.52));
        assert_eq!(parse_load1(""), None);
        assert_eq!(parse_load1("x y"), None);
    }
}
