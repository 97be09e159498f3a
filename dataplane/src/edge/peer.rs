//! The peer table's entries: sessions (current, previous, next), pending handshake,
//! paths and counters of one peer.
//!
//! Sessions, the pending handshake and the broadcast receive state are boxed: each holds
//! expanded AEAD keys and a replay window (about 1.3 KB per session), and most peers have
//! one session and no handshake under way, so the table holds a pointer where there is
//! nothing, not room for three sessions (a peer took about 8 KB before, 1,000 peers 8 MB).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

// Looked up for every packet: a seeded fast hash instead of SipHash.

use crate::crypto::{AeadKey, InitState};
use crate::replay::ReplayWindow;
use crate::wire::EdgeId;

use super::table::DeadlineCtx;
use super::{Earliest, Timers};

pub(super) struct Session {
    pub(super) local_index: u32,
    pub(super) remote_index: u32,
    pub(super) send: AeadKey,
    pub(super) recv: AeadKey,
    pub(super) send_ctr: u64,
    pub(super) replay: ReplayWindow,
    pub(super) created: Instant,
    pub(super) initiator: bool,
}

#[derive(Default, Clone, Copy)]
pub(super) struct Stats {
    pub(super) tx_bytes: u64,
    pub(super) rx_bytes: u64,
    pub(super) tx_packets: u64,
    pub(super) rx_packets: u64,
}

pub(super) struct Pending {
    pub(super) state: InitState,
    pub(super) sent: Instant,
}

pub(super) struct Peer {
    pub(super) id: EdgeId,
    pub(super) name: String,
    pub(super) observed: Option<SocketAddr>,
    pub(super) locals: Vec<SocketAddr>,
    pub(super) reflexive: Option<SocketAddr>,
    pub(super) listed_by: u64,
    pub(super) last_listed: Option<Instant>,
    pub(super) first_seen: Instant,
    pub(super) last_rx: Option<Instant>,
    pub(super) cur: Option<Box<Session>>,
    pub(super) prev: Option<Box<Session>>,
    pub(super) next: Option<Box<Session>>,
    pub(super) pending: Option<Box<Pending>>,
    pub(super) last_init_sent: Option<Instant>,
    pub(super) last_init_ts: u64,
    pub(super) direct: Option<SocketAddr>,
    pub(super) direct_last_rx: Option<Instant>,
    pub(super) direct_lost: bool,
    pub(super) last_probe: Option<Instant>,
    pub(super) last_relay_probe: Option<Instant>,
    pub(super) probes: Vec<(u64, Option<SocketAddr>, Instant)>,
    pub(super) rtt: Option<Duration>,
    pub(super) bcast_rx: Option<Box<(AeadKey, ReplayWindow)>>,
    pub(super) stats: Stats,
    pub(super) handshakes: u64,
    /// Direct attempts per address; see [`AddrTries`].
    pub(super) tries: Vec<AddrTries>,
    /// The supernode the peer's last authenticated relayed packet came through.
    pub(super) relay_rx_sn: Option<(usize, Instant)>,
    /// Its entry in the peer table's deadline index (`None`: not indexed yet).
    pub(super) indexed_at: Option<Instant>,
    /// Changed since the table last indexed it (listed once in the table's touched
    /// peers: its deadline is computed once per entry point, however often it was
    /// accessed).
    pub(super) touched: bool,
}

/// Handshake inits sent to one address of a peer, and when an authenticated packet last
/// came from it (then the address is validated and not limited).
pub(super) struct AddrTries {
    pub(super) addr: SocketAddr,
    pub(super) sent: u32,
    pub(super) last: Instant,
    pub(super) validated: Option<Instant>,
}

impl Peer {
    pub(super) fn new(id: EdgeId, now: Instant) -> Self {
        Self {
            id,
            name: "?".into(),
            observed: None,
            locals: Vec::new(),
            reflexive: None,
            listed_by: 0,
            last_listed: None,
            first_seen: now,
            last_rx: None,
            cur: None,
            prev: None,
            next: None,
            pending: None,
            last_init_sent: None,
            last_init_ts: 0,
            direct: None,
            direct_last_rx: None,
            direct_lost: false,
            last_probe: None,
            last_relay_probe: None,
            probes: Vec::new(),
            rtt: None,
            bcast_rx: None,
            stats: Stats::default(),
            handshakes: 0,
            tries: Vec::new(),
            relay_rx_sn: None,
            indexed_at: None,
            touched: false,
        }
    }

    /// When the peer expires: once nobody listed it and nothing came from it for
    /// strictly longer than `peer_expiry`.
    pub(super) fn expires_at(&self, t: &Timers) -> Instant {
        let last = [self.last_listed, self.last_rx]
            .into_iter()
            .flatten()
            .fold(self.first_seen, Instant::max);
        last + t.peer_expiry + Duration::from_nanos(1)
    }

    /// The earliest of the peer's timers (as [`super::EdgeCore::poll`] runs them):
    /// sessions, paths, expiry.
    pub(super) fn deadline(&self, c: &DeadlineCtx) -> Instant {
        let mut d = Earliest::default();
        self.session_deadline(c, &mut d);
        self.path_deadline(c, &mut d);
        d.add(self.expires_at(c.timers));
        d.0.unwrap_or_else(|| self.expires_at(c.timers))
    }

    pub(super) fn session_mut(&mut self, index: u32) -> Option<(&mut Session, u8)> {
        if self.cur.as_ref().is_some_and(|s| s.local_index == index) {
            return self.cur.as_deref_mut().map(|s| (s, 0));
        }
        if self.prev.as_ref().is_some_and(|s| s.local_index == index) {
            return self.prev.as_deref_mut().map(|s| (s, 1));
        }
        if self.next.as_ref().is_some_and(|s| s.local_index == index) {
            return self.next.as_deref_mut().map(|s| (s, 2));
        }
        None
    }
}
