//! The server's memory budget: bytes of request payloads and replies held at once, for all
//! connections together and for each connection.
//!
//! A request takes its share before its payload is read or its reply is built (reads: the
//! reply's data; writes: the payload; other commands: one unit) and gives it back only when
//! its reply has been written to the socket. So a client that sends reads and never reads
//! the replies holds at most its connection's share; once every byte of the budget is held,
//! new requests on every connection wait (counted) instead of allocating. Shares are counted
//! in 4 KiB units; a request larger than a whole share (or the whole budget) takes all of it
//! and runs alone, so nothing waits for more than exists.
//!
//! Held replies are only given back when the client reads them. A client that stops reading
//! therefore keeps its share until it goes away; to keep such clients from holding the
//! budget against everyone else, a connection whose replies make no progress for
//! `stall_timeout` while another connection waits for the budget is closed (counted). With
//! the budget free, a stalled connection is left alone: it holds no more than its share.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Unit of the budget.
pub const UNIT: u64 = 4096;

/// Memory limits of a server.
#[derive(Debug, Clone, Copy)]
pub struct MemoryLimits {
    /// Bytes held for all connections together.
    pub total: u64,
    /// Bytes one connection may hold (clamped to `total`).
    pub per_connection: u64,
    /// How long a connection's replies may make no progress while others wait for the
    /// budget before it is closed.
    pub stall_timeout: Duration,
}

impl Default for MemoryLimits {
    fn default() -> MemoryLimits {
        MemoryLimits {
            total: 512 << 20,
            per_connection: 32 << 20,
            stall_timeout: Duration::from_secs(60),
        }
    }
}

/// The budget shared by every connection of a server.
#[derive(Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    total_units: u32,
    conn_units: u32,
    stall_timeout: Duration,
    /// Connections waiting for the shared budget now.
    waiting: AtomicUsize,
    /// Requests that had to wait for the shared budget.
    pub waits: AtomicU64,
    /// Connections closed because their replies stalled while others waited.
    pub stalled: AtomicU64,
}

impl Budget {
    /// A budget for `l` (at least one unit of each kind).
    pub fn new(l: MemoryLimits) -> Budget {
        let units = |b: u64| u32::try_from(b.div_ceil(UNIT)).unwrap_or(u32::MAX).max(1);
        // A tokio semaphore holds at most `usize::MAX >> 3` permits.
        let total_units = units(l.total).min((usize::MAX >> 3) as u32);
        Budget {
            sem: Arc::new(Semaphore::new(total_units as usize)),
            total_units,
            conn_units: units(l.per_connection).min(total_units),
            stall_timeout: l.stall_timeout,
            waiting: AtomicUsize::new(0),
            waits: AtomicU64::new(0),
            stalled: AtomicU64::new(0),
        }
    }

    /// Bytes of the whole budget.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.total_units) * UNIT
    }

    /// Bytes held now.
    pub fn used_bytes(&self) -> u64 {
        let free = self.sem.available_permits() as u64;
        (u64::from(self.total_units).saturating_sub(free)) * UNIT
    }

    /// Bytes of one connection's share.
    pub fn connection_bytes(&self) -> u64 {
        u64::from(self.conn_units) * UNIT
    }

    /// The share of a new connection.
    pub fn connection(&self) -> Arc<Semaphore> {
        Arc::new(Semaphore::new(self.conn_units as usize))
    }

    /// Units for `bytes`, at least one and at most a whole connection share.
    pub fn units(&self, bytes: u64) -> u32 {
        u32::try_from(bytes.div_ceil(UNIT))
            .unwrap_or(u32::MAX)
            .clamp(1, self.conn_units)
    }

    /// Whether some connection waits for the shared budget.
    pub fn contended(&self) -> bool {
        self.waiting.load(Ordering::Relaxed) > 0
    }

    /// How long replies may stall while the budget is contended.
    pub fn stall_timeout(&self) -> Duration {
        self.stall_timeout
    }

    /// Take `units` from the connection's share and the budget if both have them now.
    pub fn try_take(&self, conn: &Arc<Semaphore>, units: u32) -> Option<Hold> {
        let c = conn.clone().try_acquire_many_owned(units).ok()?;
        let g = self.sem.clone().try_acquire_many_owned(units).ok()?;
        Some(Hold { _conn: c, _all: g })
    }

    /// Take `units`, waiting for the connection's share first, then for the budget
    /// (counted). `None` if a semaphore was closed (never happens while the server runs).
    pub async fn take(&self, conn: &Arc<Semaphore>, units: u32) -> Option<Hold> {
        let c = conn.clone().acquire_many_owned(units).await.ok()?;
        let g = match self.sem.clone().try_acquire_many_owned(units) {
            Ok(g) => g,
            Err(_) => {
                self.waits.fetch_add(1, Ordering::Relaxed);
                self.waiting.fetch_add(1, Ordering::Relaxed);
                let _w = Waiting(&self.waiting);
                self.sem.clone().acquire_many_owned(units).await.ok()?
            }
        };
        Some(Hold { _conn: c, _all: g })
    }
}

/// Decrements the waiting count when the wait ends (or is cancelled).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Bytes held by one request until its reply is written.
#[derive(Debug)]
pub struct Hold {
    _conn: OwnedSemaphorePermit,
    _all: OwnedSemaphorePermit,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn budget(total: u64, per: u64) -> Budget {
        Budget::new(MemoryLimits {
            total,
            per_connection: per,
            stall_timeout: Duration::from_secs(1),
        })
    }

    #[test]
    fn a_connection_holds_at_most_its_share() {
        let b = budget(1 << 20, 256 << 10);
        let c = b.connection();
        let h: Vec<Hold> = (0..64).filter_map(|_| b.try_take(&c, 1)).collect();
        assert_eq!(h.len(), 64);
        assert!(b.try_take(&c, 1).is_none());
        assert_eq!(b.used_bytes(), 256 << 10);
        // Another connection still gets its share.
        let c2 = b.connection();
        assert!(b.try_take(&c2, 64).is_some());
        drop(h);
        assert_eq!(b.used_bytes(), 0);
    }

    #[test]
    fn oversized_requests_take_a_whole_share() {
        let b = budget(1 << 20, 4 << 20);
        assert_eq!(b.units(64 << 20), 256);
        assert_eq!(b.units(0), 1);
        let c = b.connection();
        assert!(b.try_take(&c, b.units(64 << 20)).is_some());
    }

    #[tokio::test]
    async fn waits_for_the_budget_are_counted_and_end_when_it_frees() {
        let b = Arc::new(budget(64 << 10, 64 << 10));
        let (c1, c2) = (b.connection(), b.connection());
        let h = b.take(&c1, 16).await.unwrap();
        assert!(b.try_take(&c2, 1).is_none());
        let b2 = b.clone();
        let t = tokio::spawn(async move { b2.take(&c2, 16).await.is_some() });
        for _ in 0..100 {
            if b.contended() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(b.contended());
        drop(h);
        assert!(tokio::time::timeout(Duration::from_secs(5), t)
            .await
            .unwrap()
            .unwrap());
        assert!(!b.contended());
        assert_eq!(b.waits.load(Ordering::Relaxed), 1);
    }
}
