//! Several forwarder threads over one edge (`mvc edge --threads N`).
//!
//! Each thread runs its own io_uring loop ([`super::uring::Forwarder`]) over its own
//! UDP socket (one `SO_REUSEPORT` group: the kernel keeps each peer's 4-tuple on one
//! socket) and its own queue of the frame port (a queue of a multi-queue TAP device, or
//! the AF_XDP socket of one veth rx queue): the kernel hashes each flow onto one queue,
//! so one flow is read, sealed and sent by one thread, in order.
//!
//! The protocol core stays one [`EdgeCore`] behind a mutex that a thread takes once per
//! round of completions (not per packet), so registration, handshakes, timers, session
//! counters, replay windows and MAC learning keep their single-owner logic and tests.
//! Send counters are taken under that lock, so AEAD nonces never repeat across threads;
//! what one thread sealed may leave after what another thread sealed later (each submits
//! its own output after releasing the lock), at most one round of output apart, which
//! the receiver's replay window (`replay::WINDOW`, 1984 counters) absorbs. The kernel
//! side of every packet (socket sends and receives, TAP reads and writes, AF_XDP kicks)
//! runs outside the lock, in each thread's own `io_uring_enter`.
//!
//! TAP writes: a multi-queue TAP steers a flow's frames from the VMs to the queue its
//! reverse direction was last written on (the kernel's automatic flow steering). Frames
//! for the VMs are therefore written to the queue their flow was last read from
//! ([`FlowQueues`]), so that a flow never moves between threads because of our writes.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::edge::EdgeCore;
use crate::status::ThreadStatus;

/// Most forwarder threads (the XDP program's XSKMAP has 64 entries).
pub const MAX_THREADS: usize = 64;

/// Counters of one forwarder thread, published by it every status period.
#[derive(Default, Debug)]
#[repr(align(64))]
pub struct ThreadCounters {
    /// Frames taken from the frame port.
    pub frames_rx: AtomicU64,
    /// Frames (or TSO super-frames) handed to the frame port.
    pub frames_tx: AtomicU64,
    /// Datagrams received.
    pub udp_rx: AtomicU64,
    /// Datagrams sent (each segment of a GSO send counts).
    pub udp_tx: AtomicU64,
    /// Rounds that found the core locked by another thread.
    pub lock_waits: AtomicU64,
}

/// One thread's counters as plain numbers.
#[derive(Default, Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counts {
    /// See [`ThreadCounters`].
    pub frames_rx: u64,
    /// See [`ThreadCounters`].
    pub frames_tx: u64,
    /// See [`ThreadCounters`].
    pub udp_rx: u64,
    /// See [`ThreadCounters`].
    pub udp_tx: u64,
    /// See [`ThreadCounters`].
    pub lock_waits: u64,
}

impl ThreadCounters {
    /// Stores a thread's running totals.
    pub fn publish(&self, c: &Counts) {
        self.frames_rx.store(c.frames_rx, Ordering::Relaxed);
        self.frames_tx.store(c.frames_tx, Ordering::Relaxed);
        self.udp_rx.store(c.udp_rx, Ordering::Relaxed);
        self.udp_tx.store(c.udp_tx, Ordering::Relaxed);
        self.lock_waits.store(c.lock_waits, Ordering::Relaxed);
    }
}

/// What the forwarder threads of one edge share.
pub struct Forwarders {
    core: Mutex<EdgeCore>,
    counters: Box<[ThreadCounters]>,
    flows: FlowQueues,
}

impl Forwarders {
    /// `threads` forwarders (at least one) over `core`.
    pub fn new(core: EdgeCore, threads: usize) -> Self {
        let n = threads.clamp(1, MAX_THREADS);
        Self {
            core: Mutex::new(core),
            counters: (0..n).map(|_| ThreadCounters::default()).collect(),
            flows: FlowQueues::new(n),
        }
    }

    /// Number of threads.
    pub fn threads(&self) -> usize {
        self.counters.len()
    }

    /// Locks the core (a thread that panicked while holding it leaves it usable: every
    /// core method keeps its state consistent between packets).
    pub fn lock(&self) -> MutexGuard<'_, EdgeCore> {
        self.core.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the core, telling whether another thread held it.
    pub fn lock_counted(&self) -> (MutexGuard<'_, EdgeCore>, bool) {
        match self.core.try_lock() {
            Ok(g) => (g, false),
            Err(std::sync::TryLockError::Poisoned(e)) => (e.into_inner(), false),
            Err(std::sync::TryLockError::WouldBlock) => (self.lock(), true),
        }
    }

    /// Thread `i`'s counters.
    pub fn counters(&self, i: usize) -> &ThreadCounters {
        &self.counters[i.min(self.counters.len() - 1)]
    }

    /// Flow-to-queue table for TAP writes.
    pub fn flows(&self) -> &FlowQueues {
        &self.flows
    }

    /// Per-thread counters for status.
    pub fn status(&self) -> Vec<ThreadStatus> {
        self.counters
            .iter()
            .enumerate()
            .map(|(i, c)| ThreadStatus {
                thread: i,
                frames_rx: c.frames_rx.load(Ordering::Relaxed),
                frames_tx: c.frames_tx.load(Ordering::Relaxed),
                udp_rx: c.udp_rx.load(Ordering::Relaxed),
                udp_tx: c.udp_tx.load(Ordering::Relaxed),
                lock_waits: c.lock_waits.load(Ordering::Relaxed),
            })
            .collect()
    }
}

const FLOW_SLOTS: usize = 4096;

/// Which queue each flow was last read from (by a hash of its addresses and ports, the
/// same in both directions), so that frames of that flow towards the VMs are written to
/// the same queue. Collisions only cost a less good queue choice, never a lost frame.
pub struct FlowQueues {
    queues: usize,
    slots: Box<[AtomicU8]>,
}

impl FlowQueues {
    /// A table for `queues` queues.
    pub fn new(queues: usize) -> Self {
        Self {
            queues: queues.clamp(1, MAX_THREADS),
            slots: (0..FLOW_SLOTS).map(|_| AtomicU8::new(0)).collect(),
        }
    }

    /// Notes that `frame` was read from queue `q`.
    pub fn record(&self, frame: &[u8], q: usize) {
        if self.queues < 2 {
            return;
        }
        if let Some(h) = flow_hash(frame) {
            let v = (q.min(self.queues - 1) + 1) as u8;
            let slot = &self.slots[h as usize % FLOW_SLOTS];
            if slot.load(Ordering::Relaxed) != v {
                slot.store(v, Ordering::Relaxed);
            }
        }
    }

    /// The queue to write `frame` to: where its flow was last read, else one picked by
    /// its flow hash, else `own` (frames that are not TCP/UDP over IP).
    pub fn pick(&self, frame: &[u8], own: usize) -> usize {
        if self.queues < 2 {
            return 0;
        }
        match flow_hash(frame) {
            Some(h) => match self.slots[h as usize % FLOW_SLOTS].load(Ordering::Relaxed) {
                0 => h as usize % self.queues,
                v => (usize::from(v) - 1).min(self.queues - 1),
            },
            None => own.min(self.queues - 1),
        }
    }
}

/// A hash of an Ethernet frame's IP addresses, protocol and (TCP/UDP) ports that is the
/// same for both directions of a flow; `None` for anything that is not IPv4/IPv6.
pub fn flow_hash(frame: &[u8]) -> Option<u32> {
    let et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (proto, a, b, l4): (u8, &[u8], &[u8], Option<&[u8]>) = match et {
        0x0800 => {
            let ihl = usize::from(*ip.first()? & 0x0f) * 4;
            if ihl < 20 || ip.len() < ihl {
                return None;
            }
            // Fragments after the first carry no ports: hash them on addresses only.
            let frag = u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0;
            (ip[9], &ip[12..16], &ip[16..20], (!frag).then(|| &ip[ihl..]))
        }
        0x86dd => {
            if ip.len() < 40 {
                return None;
            }
            (ip[6], &ip[8..24], &ip[24..40], Some(&ip[40..]))
        }
        _ => return None,
    };
    let ports = match (proto, l4) {
        (6 | 17, Some(l)) if l.len() >= 4 => Some(([l[0], l[1]], [l[2], l[3]])),
        _ => None,
    };
    let (pa, pb) = ports.unwrap_or(([0; 2], [0; 2]));
    // Order the two endpoints so that both directions hash alike.
    let ((a, pa), (b, pb)) = if (a, pa) <= (b, pb) {
        ((a, pa), (b, pb))
    } else {
        ((b, pb), (a, pa))
    };
    // FNV-1a: small, no state, good enough to spread a handful of flows.
    let mut h: u32 = 0x811c_9dc5;
    for x in a.iter().chain(&pa).chain(b).chain(&pb).chain(&[proto]) {
        h ^= u32::from(*x);
        h = h.wrapping_mul(0x0100_0193);
    }
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp4(src: [u8; 4], dst: [u8; 4], sp: u16, dp: u16) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12] = 0x08;
        f[14] = 0x45;
        f[14 + 9] = 6;
        f[26..30].copy_from_slice(&src);
        f[30..34].copy_from_slice(&dst);
        f[34..36].copy_from_slice(&sp.to_be_bytes());
        f[36..38].copy_from_slice(&dp.to_be_bytes());
        f
    }

    #[test]
    fn flow_hash_is_symmetric_and_tells_flows_apart() {
        let a = tcp4([198, 19, 0, 1], [198, 19, 0, 2], 40000, 5201);
        let b = tcp4([198, 19, 0, 2], [198, 19, 0, 1], 5201, 40000);
        let c = tcp4([198, 19, 0, 1], [198, 19, 0, 2], 40001, 5201);
        assert_eq!(flow_hash(&a), flow_hash(&b));
        assert!(flow_hash(&a).is_some());
        assert_ne!(flow_hash(&a), flow_hash(&c));
        // ARP, runts and bad IHLs have no flow.
        let mut arp = a.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(flow_hash(&arp), None);
        assert_eq!(flow_hash(&a[..20]), None);
        let mut bad = a.clone();
        bad[14] = 0x41;
        assert_eq!(flow_hash(&bad), None);
        for n in 0..a.len() {
            let _ = flow_hash(&a[..n]);
        }
    }

    #[test]
    fn frames_for_the_vms_follow_the_queue_their_flow_was_read_from() {
        let q = FlowQueues::new(2);
        let out = tcp4([198, 19, 0, 1], [198, 19, 0, 2], 40000, 5201);
        let back = tcp4([198, 19, 0, 2], [198, 19, 0, 1], 5201, 40000);
        let unknown = q.pick(&back, 0);
        assert!(unknown < 2);
        // Stable while nothing is read.
        assert_eq!(q.pick(&back, 1), unknown);
        q.record(&out, 1 - unknown);
        assert_eq!(q.pick(&back, 0), 1 - unknown);
        q.record(&out, unknown);
        assert_eq!(q.pick(&back, 1), unknown);
        // Not IP: the writing thread's own queue.
        let mut arp = back.clone();
        arp[12..14].copy_from_slice(&[0x08, 0x06]);
        assert_eq!(q.pick(&arp, 1), 1);
        // One queue: always 0.
        let one = FlowQueues::new(1);
        one.record(&out, 5);
        assert_eq!(one.pick(&back, 3), 0);
    }
}
