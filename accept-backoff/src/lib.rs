//! What an accept loop does after a failed `accept`, shared by every listener of the
//! workspace (xnbd's NBD and control sockets, the `mvc agent` listener, the dataplane's
//! status and metrics sockets).
//!
//! `accept` fails for reasons that say nothing about the listener: the process or the
//! system is out of descriptors (`EMFILE`, `ENFILE`) or memory (`ENOMEM`, `ENOBUFS`), or a
//! client gave up between the handshake and the accept (`ECONNABORTED`). None of them may
//! end a listener. Failures of the first kind back off (doubling from [`BACKOFF_MIN`] to
//! [`BACKOFF_MAX`]: the pending connection stays in the backlog and would fail again at
//! once) and are logged once per burst, with a summary when accepting works again;
//! failures of one connection are not logged and the loop goes on at once.

use std::io;
use std::time::Duration;

/// First pause after a resource error.
pub const BACKOFF_MIN: Duration = Duration::from_millis(5);
/// Longest pause between attempts while resources stay short.
pub const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Whether an accept error is about the one connection being accepted (go on at once)
/// rather than about resources (back off): the errors accept(2) says to retry at once,
/// pending network errors of the new connection included, and a spurious wake-up.
pub fn per_connection(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc::ECONNABORTED
                | libc::ECONNRESET
                | libc::EPROTO
                | libc::EPERM
                | libc::EINTR
                | libc::EAGAIN
                | libc::ETIMEDOUT
                | libc::ENETDOWN
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::ENONET
                | libc::EHOSTUNREACH
                | libc::EOPNOTSUPP
                | libc::ENETUNREACH
        )
    ) || matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::Interrupted
    )
}

/// State of one accept loop between failures: logs the first failure of a burst and how
/// many followed once accepting works again, and grows the pause while they go on.
#[derive(Debug)]
pub struct AcceptBackoff {
    what: &'static str,
    in_burst: u64,
    backoff: Duration,
}

impl AcceptBackoff {
    /// For the listener called `what` in logs.
    pub fn new(what: &'static str) -> AcceptBackoff {
        AcceptBackoff {
            what,
            in_burst: 0,
            backoff: BACKOFF_MIN,
        }
    }

    /// An accept succeeded: ends a burst of failures.
    pub fn ok(&mut self) {
        if self.in_burst > 0 {
            tracing::info!(
                listener = self.what,
                failures = self.in_burst,
                "accepting again"
            );
            self.in_burst = 0;
            self.backoff = BACKOFF_MIN;
        }
    }

    /// An accept failed: log it if it starts a burst of resource errors, and return how
    /// long to pause before the next attempt (nothing for an error of one connection).
    pub fn failed(&mut self, e: &io::Error) -> Duration {
        if per_connection(e) {
            return Duration::ZERO;
        }
        if self.in_burst == 0 {
            tracing::warn!(
                listener = self.what,
                "accept failed: {e}; backing off and retrying (logged once until accepting works)"
            );
        }
        self.in_burst += 1;
        let d = self.backoff;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_errors_back_off_and_connection_errors_do_not() {
        let mut b = AcceptBackoff::new("test");
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        let aborted = io::Error::from_raw_os_error(libc::ECONNABORTED);
        assert_eq!(b.failed(&aborted), Duration::ZERO);
        assert_eq!(b.failed(&emfile), BACKOFF_MIN);
        let mut last = Duration::ZERO;
        for _ in 0..20 {
            let d = b.failed(&emfile);
            assert!(d >= last && d <= BACKOFF_MAX);
            last = d;
        }
        assert_eq!(last, BACKOFF_MAX);
        // A connection error in a burst neither ends it nor grows the pause.
        assert_eq!(b.failed(&aborted), Duration::ZERO);
        assert_eq!(b.failed(&emfile), BACKOFF_MAX);
        b.ok();
        assert_eq!(b.failed(&emfile), BACKOFF_MIN);
        for e in [libc::ENFILE, libc::ENOMEM, libc::ENOBUFS] {
            assert!(!per_connection(&io::Error::from_raw_os_error(e)));
        }
    }
}
