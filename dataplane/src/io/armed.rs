//! Two decisions of the io_uring loop that matter at a low packet rate.
//!
//! **How many receives stay armed on one descriptor** ([`Armed`]). Reads armed on the same
//! TAP queue or UDP socket all wait on its one wait queue: a single frame wakes every one
//! of them, one takes it, and the others find nothing, go back to polling, and after 128
//! such misses the kernel hands the request to an io-wq worker thread (a second thread
//! wake-up for the frame it takes). Under load several armed reads let a round take
//! several frames; at a ping's rate they only cost. So one read stays armed while the loop
//! is calm, all of them as soon as it is busy (completions waiting before it could sleep,
//! a read returning a batch, or a read armed in a wait completing within [`QUICK`] of
//! it: the frame was already queued, as in a flood of small frames), and the number
//! shrinks back one at a time after a run of calm rounds.
//!
//! **How many completions a wait asks for** ([`wait_for`]). A send or TAP write the loop
//! has just queued completes during the `io_uring_enter` that submits it; a wait for one
//! completion would return for it at once, and the loop would go round again only to sleep
//! in a second `io_uring_enter`, after being preempted on the way out of the first by the
//! process its packet woke. Waiting for the loop's own operations plus one more sleeps in
//! the first call.

use std::time::Duration;

/// Calm rounds in a row after which one armed read fewer is kept.
pub const CALM_ROUNDS: u32 = 64;

/// A read armed in a wait that completes within this long of the wait's start found its
/// frame already queued.
pub const QUICK: Duration = Duration::from_micros(8);

/// The receives of one descriptor: which slots are armed, and how many should be.
#[derive(Debug, Clone)]
pub struct Armed {
    slots: Vec<bool>,
    /// Armed since the last [`Armed::new_wait`].
    fresh: Vec<bool>,
    target: usize,
    calm: u32,
}

impl Armed {
    /// `max` slots (at least one), one of them to be armed.
    pub fn new(max: usize) -> Self {
        Self {
            slots: vec![false; max.max(1)],
            fresh: vec![false; max.max(1)],
            target: 1,
            calm: 0,
        }
    }

    /// How many slots should be armed now.
    pub fn target(&self) -> usize {
        self.target
    }

    /// How many slots are armed.
    pub fn armed(&self) -> usize {
        self.slots.iter().filter(|a| **a).count()
    }

    /// The loop is busy: arm every slot.
    pub fn busy(&mut self) {
        self.target = self.slots.len();
        self.calm = 0;
    }

    /// A round in which the loop was calm (nothing was waiting before it could sleep).
    pub fn calm(&mut self) {
        self.calm += 1;
        if self.calm >= CALM_ROUNDS {
            self.calm = 0;
            self.target = (self.target - 1).max(1);
        }
    }

    /// A wait begins: slots armed from now on are fresh.
    pub fn new_wait(&mut self) {
        self.fresh.iter_mut().for_each(|f| *f = false);
    }

    /// Slot `i` completed after `waited` (from the start of the wait that returned it):
    /// it is no longer armed. A fresh slot that completed at once found its frame queued,
    /// and the loop counts as busy.
    pub fn done(&mut self, i: usize, waited: Duration) {
        if let Some(s) = self.slots.get_mut(i) {
            *s = false;
        }
        if self.fresh.get(i).copied().unwrap_or(false) && waited < QUICK {
            self.busy();
        }
    }

    /// A slot to arm (marked armed), while fewer than the target are.
    pub fn to_arm(&mut self) -> Option<usize> {
        if self.armed() >= self.target {
            return None;
        }
        let i = self.slots.iter().position(|a| !a)?;
        self.slots[i] = true;
        self.fresh[i] = true;
        Some(i)
    }
}

/// Completions to wait for: none while some are ready (`ready`), else the `outs` sends and
/// writes submitted since the last wait (each completes on its own, most during the
/// submission itself) and one more: the event that gives the loop work.
pub fn wait_for(ready: bool, outs: usize) -> usize {
    if ready {
        0
    } else {
        outs + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn arm_all(a: &mut Armed) -> Vec<usize> {
        std::iter::from_fn(|| a.to_arm()).collect()
    }

    #[test]
    fn calm_loop_keeps_one_read_armed() {
        let mut a = Armed::new(4);
        assert_eq!(arm_all(&mut a), vec![0]);
        for _ in 0..1000 {
            // A ping: the read completes, the round was calm, the read is armed again.
            a.done(0, Duration::from_micros(50));
            a.calm();
            assert_eq!(arm_all(&mut a), vec![0]);
        }
        assert_eq!(a.armed(), 1);
    }

    #[test]
    fn busy_loop_arms_every_slot_and_calms_down_slowly() {
        let mut a = Armed::new(4);
        assert_eq!(arm_all(&mut a), vec![0]);
        a.busy();
        assert_eq!(arm_all(&mut a), vec![1, 2, 3]);
        assert_eq!(a.armed(), 4);
        // One busy round in a calm stretch keeps them all.
        for _ in 0..CALM_ROUNDS - 1 {
            a.calm();
        }
        a.busy();
        for _ in 0..CALM_ROUNDS - 1 {
            a.calm();
        }
        assert_eq!(a.target(), 4);
        // Then one fewer per calm stretch, never below one.
        a.calm();
        assert_eq!(a.target(), 3);
        for _ in 0..10 * CALM_ROUNDS {
            a.calm();
        }
        assert_eq!(a.target(), 1);
        // Reads already armed stay armed; completed ones are not armed again past the
        // target.
        assert_eq!(arm_all(&mut a), Vec::<usize>::new());
        for i in 0..4 {
            a.done(i, Duration::from_millis(1));
        }
        assert_eq!(arm_all(&mut a), vec![0]);
    }

    #[test]
    fn a_slot_is_never_armed_twice() {
        let mut a = Armed::new(2);
        a.busy();
        assert_eq!(arm_all(&mut a), vec![0, 1]);
        a.done(1, Duration::from_millis(1));
        assert_eq!(arm_all(&mut a), vec![1]);
        a.done(7, Duration::ZERO);
        assert_eq!(a.armed(), 2);
        let mut one = Armed::new(0);
        one.busy();
        assert_eq!(arm_all(&mut one), vec![0]);
    }

    #[test]
    fn a_read_that_finds_its_frame_queued_makes_the_loop_busy() {
        let mut a = Armed::new(4);
        a.new_wait();
        assert_eq!(arm_all(&mut a), vec![0]);
        // Armed in this wait and completed at once: a flood of small frames.
        a.done(0, Duration::from_micros(3));
        assert_eq!(a.target(), 4);
        for _ in 0..4 * CALM_ROUNDS {
            a.calm();
        }
        assert_eq!(a.target(), 1);
        a.new_wait();
        for i in 0..4 {
            a.done(i, Duration::from_millis(1));
        }
        assert_eq!(arm_all(&mut a), vec![0]);
        // Armed in an earlier wait: completing at once says nothing about a queue.
        a.new_wait();
        a.done(0, Duration::ZERO);
        assert_eq!(a.target(), 1);
        // Armed in this wait but completed after a sleep: a calm ping.
        assert_eq!(arm_all(&mut a), vec![0]);
        a.done(0, Duration::from_millis(10));
        assert_eq!(a.target(), 1);
    }

    #[test]
    fn wait_asks_for_own_operations_and_one_event() {
        assert_eq!(wait_for(true, 5), 0);
        assert_eq!(wait_for(false, 0), 1);
        assert_eq!(wait_for(false, 2), 3);
    }
}
