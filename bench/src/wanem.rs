//! A userspace WAN emulator, because this kernel has no netem: a link between two
//! interfaces of a router namespace that forwards every frame in userspace (AF_PACKET) and
//! adds, per direction, a delay, a jitter, a loss rate and a rate limit.
//!
//! [`Shaper`] is the pure core (it takes `now` and random draws and answers when a frame
//! leaves, or that it is lost); [`run_link`] does the I/O with two threads per direction.
//! Frames keep their order (jitter never reorders). GSO super-frames and checksum offload
//! state pass through untouched thanks to `PACKET_VNET_HDR`; the rate limit counts the bytes
//! of IP packets (frames without their Ethernet header).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sys::{PacketSocket, VNET_HDR_LEN};
use lab::Result;

/// Conditions of one direction of the link.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Dir {
    /// Added one-way delay.
    pub delay: Duration,
    /// Jitter: each frame's delay varies uniformly within +- this (never below zero, never
    /// reordering).
    pub jitter: Duration,
    /// Loss probability, 0..=1.
    pub loss: f64,
    /// Rate limit in bits per second of IP packets (None: unlimited).
    pub rate_bps: Option<u64>,
    /// Longest queueing the rate limit may build before it drops (the link's buffer).
    pub queue: Duration,
}

impl Default for Dir {
    fn default() -> Self {
        Dir {
            delay: Duration::ZERO,
            jitter: Duration::ZERO,
            loss: 0.0,
            rate_bps: None,
            queue: Duration::from_millis(50),
        }
    }
}

/// The pure per-direction scheduler.
#[derive(Debug, Clone)]
pub struct Shaper {
    dir: Dir,
    busy_until: Duration,
    last_depart: Duration,
}

impl Shaper {
    /// A scheduler for `dir`.
    pub fn new(dir: Dir) -> Shaper {
        Shaper {
            dir,
            busy_until: Duration::ZERO,
            last_depart: Duration::ZERO,
        }
    }

    /// A frame of `ip_len` IP bytes arrives at `now` (time since the link started);
    /// `u_loss` and `u_jitter` are uniform draws in [0, 1). Returns when it leaves, or None
    /// when it is lost (random loss, or the rate limiter's queue is full).
    pub fn admit(
        &mut self,
        now: Duration,
        ip_len: usize,
        u_loss: f64,
        u_jitter: f64,
    ) -> Option<Duration> {
        if self.dir.loss > 0.0 && u_loss < self.dir.loss {
            return None;
        }
        let mut sent = now;
        if let Some(rate) = self.dir.rate_bps.filter(|r| *r > 0) {
            let start = self.busy_until.max(now);
            if start - now > self.dir.queue {
                return None;
            }
            let bits = u128::try_from(ip_len)
                .unwrap_or(u128::MAX)
                .saturating_mul(8);
            let nanos = bits.saturating_mul(1_000_000_000) / u128::from(rate);
            self.busy_until =
                start + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
            sent = self.busy_until;
        }
        let j = self.dir.jitter.as_secs_f64() * (2.0 * u_jitter - 1.0);
        let delay = (self.dir.delay.as_secs_f64() + j).max(0.0);
        let depart = (sent + Duration::from_secs_f64(delay)).max(self.last_depart);
        self.last_depart = depart;
        Some(depart)
    }
}

/// Frames forwarded and dropped, per direction (a->b, b->a).
#[derive(Debug, Default)]
pub struct Stats {
    /// Forwarded a->b, b->a.
    pub forwarded: [AtomicU64; 2],
    /// Dropped (loss or full queue) a->b, b->a.
    pub dropped: [AtomicU64; 2],
}

fn direction(
    rx: PacketSocket,
    tx: PacketSocket,
    dir: Dir,
    stats: Arc<Stats>,
    i: usize,
    start: Instant,
) -> Result<()> {
    let (qtx, qrx) = mpsc::channel::<(Duration, Vec<u8>)>();
    let st = stats.clone();
    let sender = std::thread::spawn(move || -> Result<()> {
        while let Ok((depart, frame)) = qrx.recv() {
            let now = start.elapsed();
            if depart > now {
                std::thread::sleep(depart - now);
            }
            // A frame the peer cannot take (e.g. too big) is counted, not fatal.
            if tx.send(&frame).is_err() {
                st.dropped[i].fetch_add(1, Ordering::Relaxed);
            } else {
                st.forwarded[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    });
    let mut shaper = Shaper::new(dir);
    let mut buf = vec![0u8; VNET_HDR_LEN + 65_536 + 14];
    loop {
        let n = rx.recv(&mut buf)?;
        if n < VNET_HDR_LEN + 14 {
            continue;
        }
        let ip_len = n - VNET_HDR_LEN - 14;
        let (ul, uj): (f64, f64) = (rand::random(), rand::random());
        match shaper.admit(start.elapsed(), ip_len, ul, uj) {
            Some(depart) => {
                if qtx.send((depart, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
            None => {
                stats.dropped[i].fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    drop(qtx);
    sender.join().unwrap_or(Ok(()))
}

/// Forwards frames between interfaces `a` and `b` of the current network namespace with
/// conditions `ab` (a to b) and `ba` (b to a), until an I/O error. Run it in the router
/// namespace (a process started there, or a thread from [`lab::Lab::in_ns`]).
///
/// It asks for SCHED_FIFO first (so its timed sends are not late on a busy machine); when
/// that is refused it says so on stderr and goes on.
pub fn run_link(a: &str, b: &str, ab: Dir, ba: Dir, stats: Arc<Stats>) -> Result<()> {
    if let Err(e) = crate::sys::realtime(20) {
        eprintln!("wanem: no real-time scheduling ({e}); delays may overshoot under load");
    }
    let start = Instant::now();
    let (a_rx, b_tx) = (PacketSocket::open(a, true)?, PacketSocket::open(b, false)?);
    let (b_rx, a_tx) = (PacketSocket::open(b, true)?, PacketSocket::open(a, false)?);
    let s2 = stats.clone();
    let back = std::thread::spawn(move || direction(b_rx, a_tx, ba, s2, 1, start));
    let fwd = direction(a_rx, b_tx, ab, stats, 0, start);
    let back = back.join().unwrap_or(Ok(()));
    fwd.and(back)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(x: u64) -> Duration {
        Duration::from_millis(x)
    }

    #[test]
    fn delay_only() {
        let mut s = Shaper::new(Dir {
            delay: ms(20),
            ..Dir::default()
        });
        assert_eq!(s.admit(ms(5), 1500, 0.5, 0.5), Some(ms(25)));
        assert_eq!(s.admit(ms(6), 1500, 0.5, 0.5), Some(ms(26)));
    }

    #[test]
    fn rate_spaces_frames_and_drops_beyond_the_queue() {
        // 1 Mb/s: 1250 bytes take 10 ms.
        let mut s = Shaper::new(Dir {
            rate_bps: Some(1_000_000),
            queue: ms(25),
            ..Dir::default()
        });
        assert_eq!(s.admit(ms(0), 1250, 0.5, 0.5), Some(ms(10)));
        assert_eq!(s.admit(ms(0), 1250, 0.5, 0.5), Some(ms(20)));
        assert_eq!(s.admit(ms(0), 1250, 0.5, 0.5), Some(ms(30)));
        // Queue now 30 ms > 25 ms: dropped, and it does not advance the clock.
        assert_eq!(s.admit(ms(0), 1250, 0.5, 0.5), None);
        assert_eq!(s.admit(ms(100), 1250, 0.5, 0.5), Some(ms(110)));
    }

    #[test]
    fn loss_uses_the_draw() {
        let mut s = Shaper::new(Dir {
            loss: 0.1,
            ..Dir::default()
        });
        assert_eq!(s.admit(ms(1), 100, 0.05, 0.5), None);
        assert_eq!(s.admit(ms(1), 100, 0.15, 0.5), Some(ms(1)));
    }

    #[test]
    fn jitter_never_reorders() {
        let mut s = Shaper::new(Dir {
            delay: ms(10),
            jitter: ms(5),
            ..Dir::default()
        });
        let a = s.admit(ms(0), 100, 0.5, 1.0).unwrap(); // 15 ms
        let b = s.admit(ms(1), 100, 0.5, 0.0).unwrap(); // would be 6 ms
        assert!(a >= ms(14) && b >= a, "{a:?} {b:?}");
        let c = s.admit(ms(50), 100, 0.5, 0.0).unwrap();
        assert!(c >= ms(54) && c <= ms(56), "{c:?}");
    }
}
