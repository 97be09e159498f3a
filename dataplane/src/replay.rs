//! Anti-replay window (RFC 6479 style bitmap): accepts each counter at most once and
//! rejects counters older than the window. Pure: no clock, no I/O.

const WORDS: usize = 32;
/// Window size in counters.
pub const WINDOW: u64 = (WORDS as u64 - 1) * 64;

/// Sliding bitmap of seen counters.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// Highest counter accepted so far plus one (0 = none yet).
    next: u64,
    bits: [u64; WORDS],
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// Empty window.
    pub fn new() -> Self {
        Self {
            next: 0,
            bits: [0; WORDS],
        }
    }

    /// Whether `ctr` would be accepted (call before the costly decryption).
    pub fn check(&self, ctr: u64) -> bool {
        if ctr == u64::MAX {
            return false;
        }
        if ctr >= self.next {
            return true;
        }
        if self.next - ctr > WINDOW {
            return false;
        }
        let bit = ctr % (WORDS as u64 * 64);
        self.bits[(bit / 64) as usize] & (1 << (bit % 64)) == 0
    }

    /// Marks `ctr` seen (call after successful decryption); returns false on replay.
    pub fn update(&mut self, ctr: u64) -> bool {
        if !self.check(ctr) {
            return false;
        }
        let total = WORDS as u64 * 64;
        if ctr >= self.next {
            if self.next == 0 {
                self.bits = [0; WORDS];
            } else {
                // Clear the words between the old top and the new one.
                let old_word = (self.next - 1) / 64;
                let new_word = ctr / 64;
                let n = (new_word - old_word).min(WORDS as u64);
                for i in 1..=n {
                    self.bits[((old_word + i) % WORDS as u64) as usize] = 0;
                }
            }
            self.next = ctr + 1;
        }
        let bit = ctr % total;
        self.bits[(bit / 64) as usize] |= 1 << (bit % 64);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_and_duplicates() {
        let mut w = ReplayWindow::new();
        for c in 0..5000 {
            assert!(w.update(c));
            assert!(!w.update(c));
        }
    }

    #[test]
    fn out_of_order_within_window() {
        let mut w = ReplayWindow::new();
        assert!(w.update(100));
        assert!(w.update(50));
        assert!(!w.update(50));
        assert!(w.update(99));
        assert!(w.update(WINDOW + 100));
        assert!(!w.check(99));
        assert!(w.update(101));
        assert!(!w.update(101));
    }

    #[test]
    fn too_old_rejected_after_jump() {
        let mut w = ReplayWindow::new();
        assert!(w.update(1));
        assert!(w.update(1_000_000));
        assert!(!w.update(2));
        assert!(w.update(1_000_000 - 10));
        assert!(!w.update(u64::MAX));
    }

    /// Two forwarder threads take counters in rounds (here 256 at a time, alternating)
    /// and each sends its round after the lock is released, so a round can arrive after
    /// the other thread's next one: every counter is still taken exactly once while the
    /// lag stays within the window, and one lagging by more than the window is refused.
    #[test]
    fn rounds_of_two_senders_interleaved_within_the_window() {
        let mut w = ReplayWindow::new();
        let round = 256u64;
        let rounds: Vec<std::ops::Range<u64>> =
            (0..40).map(|k| k * round..(k + 1) * round).collect();
        // Thread 0 has the even rounds, thread 1 the odd ones; thread 0 lags by one round.
        let mut order = Vec::new();
        for k in (0..40).step_by(2) {
            order.push(rounds[k + 1].clone());
            order.push(rounds[k].clone());
        }
        for r in order {
            for c in r {
                assert!(w.update(c), "counter {c}");
            }
        }
        for c in 0..40 * round {
            assert!(!w.check(c), "{c} accepted twice");
        }
        assert!(round * 2 < WINDOW);
        let top = 40 * round - 1;
        assert!(!w.update(top - WINDOW - 1));
    }

    #[test]
    fn reused_bits_are_cleared_on_advance() {
        let mut w = ReplayWindow::new();
        assert!(w.update(5));
        // 5 + 2048 maps to the same bit; it must be accepted, and 5 must now be too old.
        assert!(w.update(5 + 2048));
        assert!(!w.update(5));
        assert!(w.update(5 + 2048 - 64));
    }
}
