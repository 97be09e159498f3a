//! Accept loops that never end on a transient error (what to do after a failed accept is
//! [`accept_backoff`]'s, shared with the other listeners of the workspace; here every
//! failure is also counted), with a bound on open connections.
//!
//! Connections over the limit are accepted and closed at once (counted): the client sees a
//! reset or EOF at once instead of waiting in the backlog.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use accept_backoff::AcceptBackoff;
use serde::Serialize;

/// Binds a Unix listener at `path` (a stale file there is replaced) so that the path
/// appears only once the socket listens: it is bound under a temporary name beside it and
/// renamed into place. A client that waits for the file (qemu, `xnbd ctl`, the tests)
/// then never meets a refused connect between bind and listen. Where the temporary name
/// would not fit a socket address, the socket is bound at `path` directly.
pub fn bind_unix(path: &Path) -> io::Result<tokio::net::UnixListener> {
    let _ = std::fs::remove_file(path);
    let tmp = path.file_name().map(|n| {
        let mut t = std::ffi::OsString::from(".");
        t.push(n);
        t.push(format!(".{}", std::process::id()));
        path.with_file_name(t)
    });
    let Some(tmp) = tmp else {
        return tokio::net::UnixListener::bind(path);
    };
    let _ = std::fs::remove_file(&tmp);
    match tokio::net::UnixListener::bind(&tmp) {
        Ok(l) => match std::fs::rename(&tmp, path) {
            Ok(()) => Ok(l),
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                Err(e)
            }
        },
        // The longer name is over the limit of a socket address.
        Err(e) if e.kind() == io::ErrorKind::InvalidInput => tokio::net::UnixListener::bind(path),
        Err(e) => Err(e),
    }
}

/// Limits of one listener (or of a server's listeners together).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections open at once; more are closed at accept.
    pub max_connections: usize,
    /// Time a connection has to finish its negotiation before it is closed.
    pub handshake_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_connections: 1000,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters of a listener, shown by `xnbd ctl query`.
#[derive(Debug, Default)]
pub struct ListenStats {
    /// Connections accepted and served.
    pub accepted: AtomicU64,
    /// Connections open now.
    pub open: AtomicUsize,
    /// Connections closed at accept because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed because they did not finish negotiating in time.
    pub handshake_timeouts: AtomicU64,
    /// Failed `accept` calls (descriptors or memory short, aborted connections).
    pub accept_errors: AtomicU64,
}

/// A snapshot of [`ListenStats`].
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, Eq)]
pub struct ListenCounts {
    /// Connections accepted and served.
    pub accepted: u64,
    /// Connections open now.
    pub open: usize,
    /// Connections closed at accept over the limit.
    pub refused: u64,
    /// Connections closed for not negotiating in time.
    pub handshake_timeouts: u64,
    /// Failed `accept` calls.
    pub accept_errors: u64,
}

impl ListenStats {
    /// Current values.
    pub fn counts(&self) -> ListenCounts {
        ListenCounts {
            accepted: self.accepted.load(Ordering::Relaxed),
            open: self.open.load(Ordering::Relaxed),
            refused: self.refused.load(Ordering::Relaxed),
            handshake_timeouts: self.handshake_timeouts.load(Ordering::Relaxed),
            accept_errors: self.accept_errors.load(Ordering::Relaxed),
        }
    }

    /// Take a slot for a new connection, or `None` (counted as refused) when `max` are open.
    pub fn admit(self: &Arc<Self>, max: usize) -> Option<Slot> {
        let taken = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !taken {
            self.refused.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        self.accepted.fetch_add(1, Ordering::Relaxed);
        Some(Slot(self.clone()))
    }
}

/// An open connection's place under the limit; given back on drop.
#[derive(Debug)]
pub struct Slot(Arc<ListenStats>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
    }
}

/// State of one accept loop between failures (see [`accept_backoff`]), counting every
/// failure in the listener's stats.
#[derive(Debug)]
pub struct AcceptErrors(AcceptBackoff);

impl AcceptErrors {
    /// For the listener called `what` in logs.
    pub fn new(what: &'static str) -> AcceptErrors {
        AcceptErrors(AcceptBackoff::new(what))
    }

    /// An accept succeeded: ends a burst of failures.
    pub fn ok(&mut self) {
        self.0.ok();
    }

    /// An accept failed: count it, log it if it starts a burst, and return how long to
    /// pause before the next attempt.
    pub fn failed(&mut self, e: &io::Error, stats: &ListenStats) -> Duration {
        stats.accept_errors.fetch_add(1, Ordering::Relaxed);
        self.0.failed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_bounded_and_given_back() {
        let s = Arc::new(ListenStats::default());
        let a = s.admit(2).unwrap();
        let _b = s.admit(2).unwrap();
        assert!(s.admit(2).is_none());
        drop(a);
        assert!(s.admit(2).is_some());
        let c = s.counts();
        assert_eq!((c.accepted, c.refused, c.open), (3, 1, 1));
    }

    #[test]
    fn accept_errors_are_counted_and_back_off() {
        use accept_backoff::{BACKOFF_MAX, BACKOFF_MIN};
        let s = ListenStats::default();
        let mut e = AcceptErrors::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(e.failed(&aborted, &s), Duration::ZERO);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            let d = e.failed(&emfile, &s);
            assert!(d >= last && d <= BACKOFF_MAX);
            last = d;
        }
        assert_eq!(last, BACKOFF_MAX);
        e.ok();
        assert_eq!(e.failed(&emfile, &s), BACKOFF_MIN);
        assert_eq!(s.counts().accept_errors, 22);
    }
}
