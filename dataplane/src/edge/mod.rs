//! Edge core: supernode registration, peer table, handshakes and sessions, path probing
//! (NAT hole punching, direct preferred, relay fallback), MAC learning and switching.
//! Pure: every entry point takes `now` and writes into an [`Outbox`]; no sockets, no clock.
//!
//! What changes the tables is authenticated: acknowledgements and peer lists carry the
//! supernode's signature (pinned key, or the first one seen when none is configured);
//! acknowledgements the edge's own id and registration number, peer lists the
//! supernode's epoch and a version that only moves forward; peers and sessions come from handshakes
//! checked with the community key. Addresses nobody has proven to own (candidates from
//! peer lists) get a bounded number of handshake inits.
//!
//! Layout (as boringtun's `noise/` and quinn-proto's `connection/`): this file holds the
//! state, the entry points and the dispatch of datagrams and timers; the parts are
//! - `config`: timers, limits, supernode addresses, errors;
//! - `registration`: the supernodes: signed registrations with cookies, signed
//!   acknowledgements and peer lists, checks of a silent relaying supernode, failover;
//! - `peer`: a peer's entry (sessions, pending handshake, path state, counters);
//! - `table`: the peer table and the index of the peers' deadlines (what makes
//!   `poll_timeout` O(1) and `poll` visit only the peers whose timers came);
//! - `handshake`: handshakes, session lifetimes and rekeying;
//! - `transport`: sealing and opening transport messages, direct or relayed;
//! - `delivery`: frames from the TAP device to peers (unicast, TSO batches, floods,
//!   broadcasts) and from peers to the TAP device (MAC learning);
//! - `paths`: candidate addresses, limits on addresses that never answered, probes;
//! - `status`: the status document.

use std::net::{IpAddr, SocketAddr};
use std::time::Instant;

use foldhash::fast::FixedState;
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::crypto::{AeadKey, CommunityKeys};
use crate::eth::Mac;
use crate::outbox::Outbox;
use crate::supernode::edge_id_of;
use crate::wire::{
    self, EdgeId, MsgType, RelayHdr, COOKIE_LEN, MAX_BCAST_DSTS, NO_LIST, RELAY_HDR_LEN,
    TRANSPORT_HDR_LEN,
};

mod config;
mod delivery;
mod drops;
mod handshake;
mod l2;
mod paths;
mod peer;
mod registration;
mod rng;
mod status;
mod table;
mod transport;

pub use config::{EdgeConfig, EdgeError, SupernodeAddr, Timers};
pub use drops::DropReason;
use drops::Drops;
pub use l2::L2Config;
use l2::L2;
pub use paths::in_nets;
use peer::Peer;
use registration::SnState;
pub use rng::{EdgeRng, RngError, SeededRng, SystemRng};
use table::{DeadlineCtx, PeerTable};

/// The core's tables, looked up for every packet: a fast hash (foldhash) instead of
/// SipHash, seeded from the core's [`EdgeRng`].
type Map<K, V> = std::collections::HashMap<K, V, FixedState>;

/// How an edge-to-edge packet arrived.
#[derive(Clone, Copy, Debug)]
enum Via {
    Direct(SocketAddr),
    Relayed { src: EdgeId, sn: SocketAddr },
}

/// The edge state machine.
pub struct EdgeCore {
    cfg: EdgeConfig,
    keys: CommunityKeys,
    id: EdgeId,
    reg_key: Ed25519KeyPair,
    reg_pub: [u8; 32],
    reg_seq: u64,
    rng: Box<dyn EdgeRng>,
    sns: Vec<SnState>,
    peers: PeerTable,
    /// The peers a poll visits (kept to reuse its allocation).
    due_scratch: Vec<EdgeId>,
    index: Indexes,
    macs: Map<Mac, (EdgeId, Instant)>,
    /// No learned MAC expires before this (the earliest at the last sweep; learning one
    /// later or hearing from one again never makes it earlier, so it is not recomputed
    /// per frame, and a poll sweeps the MACs only once it came).
    mac_expiry_at: Option<Instant>,
    bcast_tx: AeadKey,
    bcast_ctr: u64,
    hs_ts: u64,
    probe_id: u64,
    started: Instant,
    /// When [`EdgeCore::poll`] last ran: what its timers were last checked against.
    last_poll: Instant,
    drops: Drops,
    tap_rx: u64,
    tap_tx: u64,
    flooded: u64,
    /// Frame bytes of the copies of flooded frames sent (one per direct peer, one per
    /// broadcast through a supernode).
    flooded_wan_bytes: u64,
    udp_rx: u64,
    udp_tx: u64,
    scratch_dsts: Vec<EdgeId>,
    seg_scratch: Vec<u8>,
    overlay_nets: Vec<(IpAddr, u8)>,
    /// Datagrams sent to unvalidated addresses in the current one-second window.
    unvalidated_window: (Instant, u32),
    /// The L2 control plane: bindings, local ARP answers, flood limits.
    l2: L2,
}

/// Size of the buffer an oversized TAP frame is cut into segments in.
const SEG_SCRATCH: usize = 65_536;

/// Headroom the core leaves in front of edge-to-edge packets for a relay header.
pub const HEADROOM: usize = RELAY_HDR_LEN;

/// Largest frame the core accepts from the TAP device for a given buffer size.
pub fn max_frame(buf_size: usize) -> usize {
    buf_size - HEADROOM - TRANSPORT_HDR_LEN - wire::TAG_LEN - MAX_BCAST_DSTS * 8
}

impl EdgeCore {
    /// A new edge with a fresh registration key (hence a fresh edge id), drawing its
    /// randomness from the operating system.
    pub fn new(cfg: EdgeConfig, now: Instant) -> Result<Self, EdgeError> {
        Self::with_rng(cfg, now, Box::new(SystemRng::default()))
    }

    /// A new edge drawing its randomness from `rng` (a seeded one makes a simulation
    /// repeatable; see [`EdgeRng`]).
    pub fn with_rng(
        cfg: EdgeConfig,
        now: Instant,
        mut rng: Box<dyn EdgeRng>,
    ) -> Result<Self, EdgeError> {
        if cfg.name.is_empty() || cfg.name.len() > wire::MAX_NAME_LEN {
            return Err(EdgeError::Config(format!(
                "edge name must be 1..={} bytes",
                wire::MAX_NAME_LEN
            )));
        }
        if cfg.supernodes.is_empty() {
            return Err(EdgeError::Config("at least one supernode is needed".into()));
        }
        if cfg.supernodes.iter().all(|s| s.key.is_none()) {
            tracing::warn!(
                "no supernode key pinned (--supernode ADDR@KEY): trusting the key of each \
                 supernode's first signed answer; a network attacker present at start can \
                 impersonate it"
            );
        }
        if cfg.supernodes.len() > 64 {
            return Err(EdgeError::Config("at most 64 supernodes".into()));
        }
        if cfg.secret.is_empty() {
            return Err(EdgeError::Config("the community secret is empty".into()));
        }
        let mut seed = [0u8; 32];
        rng.fill(&mut seed).map_err(|_| EdgeError::Keys)?;
        let reg_key = Ed25519KeyPair::from_seed_unchecked(&seed).map_err(|_| EdgeError::Keys)?;
        let table_seed = rng.next_u64().map_err(|_| EdgeError::Keys)?;
        let table = || FixedState::with_seed(table_seed);
        let mut reg_pub = [0u8; 32];
        reg_pub.copy_from_slice(reg_key.public_key().as_ref());
        let id = edge_id_of(&reg_pub);
        let keys = CommunityKeys::derive(&cfg.community, &cfg.secret);
        let bcast_tx = keys.bcast_key(cfg.cipher, &id);
        let sns = cfg
            .supernodes
            .iter()
            .map(|a| SnState {
                addr: a.addr,
                last_ack: None,
                last_sent: None,
                observed: None,
                key: a.key,
                pinned: a.key.is_some(),
                cookie: [0; COOKIE_LEN],
                sent_seq: 0,
                sent_at: None,
                acked_seq: 0,
                rtt: None,
                relay_wait: None,
                check_sent: None,
                check_ok: None,
                failed: false,
                cookie_resend: None,
                prompt_resend: None,
                next_register: None,
                unanswered: 0,
                epoch: None,
                ack_version: NO_LIST,
                applied: NO_LIST,
                list_version: NO_LIST,
                list_part: None,
            })
            .collect();
        let mut local_addrs = cfg.local_addrs.clone();
        local_addrs.truncate(wire::MAX_LOCAL_ADDRS);
        Ok(Self {
            cfg: EdgeConfig { local_addrs, ..cfg },
            keys,
            id,
            reg_key,
            reg_pub,
            reg_seq: 0,
            rng,
            sns,
            peers: PeerTable::new(table_seed),
            due_scratch: Vec::new(),
            index: Indexes {
                map: Map::with_hasher(table()),
                generation: 0,
            },
            macs: Map::with_hasher(table()),
            mac_expiry_at: None,
            bcast_tx,
            bcast_ctr: 0,
            hs_ts: 0,
            probe_id: 0,
            started: now,
            last_poll: now,
            drops: Drops::default(),
            tap_rx: 0,
            tap_tx: 0,
            flooded: 0,
            flooded_wan_bytes: 0,
            udp_rx: 0,
            udp_tx: 0,
            scratch_dsts: Vec::new(),
            seg_scratch: Vec::new(),
            overlay_nets: Vec::new(),
            unvalidated_window: (now, 0),
            l2: L2::new(L2Config::default(), now, table_seed),
        })
    }

    /// Updates this host's addresses: `locals` are announced to peers (a registration
    /// goes out at once when they change); `overlay` are the networks reached through the
    /// overlay itself (addresses of the TAP device and its bridge), never used as a path:
    /// a path inside the overlay would carry the overlay's own packets in a loop.
    pub fn set_host_addrs(&mut self, mut locals: Vec<SocketAddr>, overlay: Vec<(IpAddr, u8)>) {
        locals.retain(|a| !in_nets(a, &overlay));
        locals.truncate(wire::MAX_LOCAL_ADDRS);
        if locals != self.cfg.local_addrs {
            self.cfg.local_addrs = locals;
            for s in &mut self.sns {
                s.next_register = None;
            }
        }
        if overlay != self.overlay_nets {
            for p in self.peers.values_mut() {
                if p.direct.is_some_and(|d| in_nets(&d, &overlay)) {
                    p.direct = None;
                }
                if p.reflexive.is_some_and(|d| in_nets(&d, &overlay)) {
                    p.reflexive = None;
                }
            }
        }
        self.overlay_nets = overlay;
        self.reindex();
    }

    /// This edge's id.
    pub fn id(&self) -> EdgeId {
        self.id
    }

    /// Changes whenever a local session index is added or removed (see
    /// [`EdgeCore::session_indexes`]).
    pub fn session_generation(&self) -> u64 {
        self.index.generation
    }

    /// The local indexes transport messages may name: those of the sessions kept for
    /// receiving (current, previous, next) and of handshakes in flight (their responses
    /// make them sessions). An XDP filter in front of the socket drops transport
    /// messages naming any other index ([`crate::xdp::XdpFilter::sync_sessions`]).
    pub fn session_indexes(&self) -> impl Iterator<Item = u32> + '_ {
        self.index.map.keys().copied()
    }

    /// Whether `addr` is one of our supernodes.
    pub fn is_supernode(&self, addr: &SocketAddr) -> bool {
        self.sns.iter().any(|s| s.addr == *addr)
    }

    fn drop(&mut self, reason: DropReason) {
        self.drops.count(reason);
    }

    /// Counts a drop noticed by the I/O driver (a [`DropReason`], or its name).
    pub fn count_drop(&mut self, reason: impl Into<DropReason>) {
        self.drop(reason.into());
    }

    fn new_index(&mut self) -> u32 {
        loop {
            let mut b = [0u8; 4];
            if self.rng.fill(&mut b).is_err() {
                b = (self.index.len() as u32 ^ 0x5a5a_5a5a).to_be_bytes();
            }
            let i = u32::from_be_bytes(b);
            if i != 0 && !self.index.contains_key(&i) {
                return i;
            }
        }
    }

    fn peer_entry(&mut self, id: EdgeId, now: Instant) -> Option<&mut Peer> {
        if !self.peers.contains_key(&id) {
            if self.peers.len() >= self.cfg.max_peers || id == self.id {
                self.drop(DropReason::PeerTableFull);
                return None;
            }
            self.peers.insert(Peer::new(id, now));
        }
        self.peers.get_mut(&id)
    }

    /// What the peers' deadlines are computed from besides the peers (the debug checks
    /// and tests; the entry points borrow it beside the table, [`Self::peers_and_ctx`]).
    #[cfg(any(debug_assertions, test))]
    fn deadline_ctx(&self) -> DeadlineCtx<'_> {
        DeadlineCtx::of(&self.cfg.timers, self.id, self.last_poll)
    }

    /// Checks the cached deadlines against a scan (debug builds): the peers' index, and
    /// no learned MAC expiring before `mac_expiry_at`.
    #[cfg(debug_assertions)]
    fn check_deadlines(&self) {
        self.peers.check_index(&self.deadline_ctx());
        let mac_expiry = self.cfg.timers.mac_expiry;
        debug_assert!(self
            .macs
            .values()
            .all(|v| self.mac_expiry_at.is_some_and(|m| m <= v.1 + mac_expiry)));
    }

    /// The peer table, and what its deadlines are computed from, borrowed together.
    fn peers_and_ctx(&mut self) -> (&mut PeerTable, DeadlineCtx<'_>) {
        let c = DeadlineCtx::of(&self.cfg.timers, self.id, self.last_poll);
        (&mut self.peers, c)
    }

    /// Brings the deadline index up to date with the peers changed since the last call:
    /// the end of every entry point.
    fn reindex(&mut self) {
        let (peers, c) = self.peers_and_ctx();
        peers.reindex(&c);
    }

    /// Handles one datagram from `src`. The buffer is decrypted in place.
    pub fn handle_udp(&mut self, now: Instant, src: SocketAddr, pkt: &mut [u8], out: &mut Outbox) {
        self.udp(now, src, pkt, out);
        self.reindex();
    }

    /// Handles a GRO batch from `src`: `segment`-byte datagrams back to back in `buf`
    /// (the last may be shorter), each as [`Self::handle_udp`] would, with the deadline
    /// index brought up to date once for the batch. Returns the number of datagrams.
    pub fn handle_udp_batch(
        &mut self,
        now: Instant,
        src: SocketAddr,
        buf: &mut [u8],
        segment: usize,
        out: &mut Outbox,
    ) -> usize {
        let mut n = 0;
        for pkt in buf.chunks_mut(segment.max(1)) {
            self.udp(now, src, pkt, out);
            n += 1;
        }
        self.reindex();
        n
    }

    fn udp(&mut self, now: Instant, src: SocketAddr, pkt: &mut [u8], out: &mut Outbox) {
        self.udp_rx += 1;
        let t = match wire::peek_type(pkt) {
            Ok(t) => t,
            Err(e) => return self.drop(e.into()),
        };
        let sn = self.sns.iter().position(|s| s.addr == src);
        match (t, sn) {
            (MsgType::RegisterAck, Some(i)) => self.on_ack(now, i, pkt),
            (MsgType::Cookie, Some(i)) => self.on_cookie(now, i, pkt, out),
            (MsgType::PeerInfo, Some(i)) => self.on_peer_info(now, i, pkt),
            (MsgType::Relay, Some(_)) => match RelayHdr::decode(pkt) {
                Ok((h, _)) => {
                    if h.community != self.keys.id || h.dst != self.id || h.src == self.id {
                        return self.drop(DropReason::RelayNotForUs);
                    }
                    let inner = &mut pkt[RELAY_HDR_LEN..];
                    self.on_edge_packet(
                        now,
                        Via::Relayed {
                            src: h.src,
                            sn: src,
                        },
                        inner,
                        out,
                    );
                }
                Err(e) => self.drop(e.into()),
            },
            (MsgType::Bcast, Some(i)) => self.on_bcast(now, i, pkt, out),
            (
                MsgType::HandshakeInit
                | MsgType::HandshakeResp
                | MsgType::Data
                | MsgType::Probe
                | MsgType::Control,
                _,
            ) => {
                if in_nets(&src, &self.overlay_nets) {
                    // Came through our own overlay: never a path.
                    return self.drop(DropReason::PathInsideOverlay);
                }
                self.on_edge_packet(now, Via::Direct(src), pkt, out)
            }
            _ => self.drop(DropReason::UnexpectedType),
        }
    }

    fn on_edge_packet(&mut self, now: Instant, via: Via, pkt: &mut [u8], out: &mut Outbox) {
        let t = match wire::peek_type(pkt) {
            Ok(t) => t,
            Err(e) => return self.drop(e.into()),
        };
        match t {
            MsgType::HandshakeInit => self.on_init(now, via, pkt, out),
            MsgType::HandshakeResp => self.on_resp(now, via, pkt, out),
            MsgType::Data | MsgType::Probe | MsgType::Control => {
                self.on_transport(now, via, pkt, out)
            }
            _ => self.drop(DropReason::UnexpectedType),
        }
    }

    /// Runs timers: registration, handshakes, rekeying, probing, expiry. Visits only the
    /// peers whose entries in the deadline index came (see `table`).
    pub fn poll(&mut self, now: Instant, out: &mut Outbox) {
        #[cfg(debug_assertions)]
        self.check_deadlines();
        self.last_poll = self.last_poll.max(now);
        self.poll_register(now, out);
        let t = self.cfg.timers.clone();
        let mut due = std::mem::take(&mut self.due_scratch);
        self.peers.due_by(now, &mut due);
        for id in &due {
            self.poll_sessions(now, id, &t, out);
            self.poll_paths(now, id, &t, out);
        }
        // Expiry of peers and MACs.
        for id in &due {
            if self.peers.get(id).is_none_or(|p| now < p.expires_at(&t)) {
                continue;
            }
            if let Some(p) = self.peers.remove(id) {
                tracing::info!(peer = %p.name, "peer expired");
                for s in [p.cur, p.prev, p.next].into_iter().flatten() {
                    self.index.remove(&s.local_index);
                }
                if let Some(pd) = p.pending {
                    self.index.remove(&pd.state.init.sender_index);
                }
                self.macs.retain(|_, v| v.0 != *id);
                self.l2_peer_gone(id);
            }
        }
        if self.mac_expiry_at.is_some_and(|m| now >= m) {
            self.macs
                .retain(|_, v| now.saturating_duration_since(v.1) < t.mac_expiry);
            self.mac_expiry_at = self.macs.values().map(|v| v.1 + t.mac_expiry).min();
        }
        self.l2_poll(now, out);
        let (peers, c) = self.peers_and_ctx();
        peers.reindex_exact(&due, &c);
        peers.reindex(&c);
        self.due_scratch = due;
    }

    /// When [`EdgeCore::poll`] must run next: the earliest of every timer the core keeps
    /// (registrations and checks of the supernodes, handshakes, session lifetimes and
    /// rekeying, probes and keepalives, loss of a direct path, expiry of peers and
    /// MACs). A time not later than the last poll means "at once" (something an event
    /// made due). Recomputed after every event: a datagram or frame can move it earlier.
    /// The peers' part is the first entry of their deadline index (debug builds check
    /// the index against a scan of every peer).
    pub fn poll_timeout(&self) -> Option<Instant> {
        #[cfg(debug_assertions)]
        self.check_deadlines();
        let mut d = Earliest::default();
        for s in &self.sns {
            self.register_deadline(s, &mut d);
        }
        if let Some(p) = self.peers.next_deadline() {
            d.add(p);
        }
        if let Some(m) = self.mac_expiry_at {
            d.add(m);
        }
        if let Some(l) = self.l2_deadline() {
            d.add(l);
        }
        d.0
    }
}

/// Local session index -> peer, with a generation that changes with every insertion
/// and removal (what an XDP filter's session map is synchronised by).
struct Indexes {
    map: Map<u32, EdgeId>,
    generation: u64,
}

impl Indexes {
    fn insert(&mut self, index: u32, peer: EdgeId) {
        if self.map.insert(index, peer) != Some(peer) {
            self.generation += 1;
        }
    }

    fn remove(&mut self, index: &u32) -> Option<EdgeId> {
        let r = self.map.remove(index);
        if r.is_some() {
            self.generation += 1;
        }
        r
    }

    fn get(&self, index: &u32) -> Option<&EdgeId> {
        self.map.get(index)
    }

    fn contains_key(&self, index: &u32) -> bool {
        self.map.contains_key(index)
    }

    fn len(&self) -> usize {
        self.map.len()
    }
}

/// The earliest of some deadlines.
#[derive(Default)]
struct Earliest(Option<Instant>);

impl Earliest {
    fn add(&mut self, t: Instant) {
        self.0 = Some(self.0.map_or(t, |e| e.min(t)));
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::crypto::Cipher;

    /// An edge of community "c" with one supernode and room for `max_peers` peers.
    fn lone_edge(now: Instant, max_peers: usize) -> EdgeCore {
        lone_edge_with(now, max_peers, Box::new(rng::SystemRng::default()))
    }

    fn lone_edge_with(now: Instant, max_peers: usize, rng: Box<dyn EdgeRng>) -> EdgeCore {
        EdgeCore::with_rng(
            EdgeConfig {
                name: "e".into(),
                community: "c".into(),
                secret: b"s".to_vec(),
                cipher: Cipher::Aes256Gcm,
                supernodes: vec!["198.18.0.1:7654".parse().unwrap()],
                local_addrs: vec![],
                timers: Timers::default(),
                max_peers,
                max_macs: 4,
            },
            now,
            rng,
        )
        .unwrap()
    }

    #[test]
    fn overlay_networks_are_never_paths() {
        let nets = vec![("198.19.0.0".parse().unwrap(), 16u8)];
        assert!(in_nets(&"198.19.3.4:1".parse().unwrap(), &nets));
        assert!(!in_nets(&"198.18.3.4:1".parse().unwrap(), &nets));
        assert!(!in_nets(&"[::1]:1".parse().unwrap(), &nets));
        assert!(in_nets(
            &"10.0.0.1:1".parse().unwrap(),
            &[("0.0.0.0".parse().unwrap(), 0)]
        ));
        let now = Instant::now();
        let mut e = lone_edge(now, 4);
        e.set_host_addrs(
            vec![
                "198.18.0.2:5".parse().unwrap(),
                "198.19.0.2:5".parse().unwrap(),
            ],
            nets,
        );
        assert_eq!(e.cfg.local_addrs, vec!["198.18.0.2:5".parse().unwrap()]);
        // A datagram from inside the overlay is refused as a path.
        let mut out = Outbox::new(2048);
        let mut pkt = [
            wire::VERSION,
            0x13,
            0,
            0,
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ];
        e.handle_udp(now, "198.19.0.3:9".parse().unwrap(), &mut pkt, &mut out);
        assert_eq!(e.drops.get(DropReason::PathInsideOverlay), 1);
    }

    /// The generation moves with every change of the index table and only then.
    #[test]
    fn session_generation_moves_with_every_index_change() {
        let mut t = Indexes {
            map: Map::with_hasher(FixedState::with_seed(1)),
            generation: 0,
        };
        t.insert(7, [1; 8]);
        assert_eq!(t.generation, 1);
        t.insert(7, [1; 8]);
        assert_eq!(t.generation, 1, "same entry again");
        t.insert(7, [2; 8]);
        assert_eq!(t.generation, 2, "another peer");
        assert_eq!(t.remove(&8), None);
        assert_eq!(t.generation, 2, "nothing removed");
        assert_eq!(t.remove(&7), Some([2; 8]));
        assert_eq!(t.generation, 3);
    }

    #[test]
    fn poll_timeout_is_the_next_registration_of_a_lone_edge() {
        let now = Instant::now();
        let mut e = lone_edge(now, 4);
        let mut out = Outbox::new(2048);
        // Nothing sent yet: due at once.
        assert!(e.poll_timeout().is_some_and(|d| d <= now));
        e.poll(now, &mut out);
        assert_eq!(out.udp.len(), 1);
        out.recycle_sent();
        // No acknowledgement: the supernode is down; the wait doubles from 1 s with every
        // unanswered registration (drawn between half and all of it) up to the maximum.
        let mut at = now;
        for k in 0..8u32 {
            // Other timers may come first; step from deadline to deadline.
            let mut next = e.poll_timeout().unwrap();
            e.poll(next - Duration::from_millis(1), &mut out);
            assert!(out.udp.is_empty());
            e.poll(next, &mut out);
            while out.udp.is_empty() {
                next = e.poll_timeout().unwrap();
                e.poll(next, &mut out);
            }
            assert_eq!(out.udp.len(), 1);
            out.recycle_sent();
            let full = Duration::from_secs(1 << k).min(Timers::default().register_backoff_max);
            let wait = next - at;
            assert!(
                wait >= full / 2 && wait <= full,
                "{k}: {wait:?} of {full:?}"
            );
            at = next;
        }
        let next = at;
        // New host addresses are announced at once.
        e.set_host_addrs(vec!["198.18.0.2:5".parse().unwrap()], vec![]);
        assert!(e.poll_timeout().is_some_and(|d| d <= next));
    }

    /// Peers first seen at different times, some listed (a handshake due at once or after
    /// the deferral, by id order, then retried), some listed again later: stepping from
    /// deadline to deadline, every poll visits exactly the peers whose timers are due by
    /// a scan of the table, and each peer expires at its own deadline.
    #[test]
    fn poll_visits_exactly_the_peers_that_are_due() {
        // The seed fixes the edge's id, which decides which peers it greets at once, and
        // so how many polls there are: of seeds 0..64, 19 gives the fewest (329), 15 the
        // most (5,978), 0 one in between.
        for seed in [19, 0, 15] {
            poll_visits_exactly_the_peers_that_are_due_with(seed);
        }
    }

    fn poll_visits_exactly_the_peers_that_are_due_with(seed: u64) {
        let t0 = Instant::now();
        let mut e = lone_edge_with(t0, 256, Box::new(SeededRng::new(seed)));
        let timers = Timers::default();
        let mut out = Outbox::new(2048);
        for k in 1..=200u64 {
            let mut p = Peer::new(
                (k.wrapping_mul(0x9e37_79b9_7f4a_7c15)).to_be_bytes(),
                t0 + Duration::from_millis(k * 37),
            );
            if k % 3 == 0 {
                p.listed_by = 1;
            }
            if k % 7 == 0 {
                p.last_listed = Some(t0 + Duration::from_millis(k * 101));
            }
            e.peers.insert(p);
        }
        e.reindex();
        let (mut visits, mut scanned, mut steps) = (0, 0, 0);
        while e.peers.keys().next().is_some() {
            steps += 1;
            assert!(steps < 10_000, "bounded");
            let at = e
                .poll_timeout()
                .expect("peers have timers")
                .max(e.last_poll);
            let c = e.deadline_ctx();
            let mut want: Vec<EdgeId> = e
                .peers
                .values()
                .filter(|p| p.deadline(&c) <= at)
                .map(|p| p.id)
                .collect();
            let expired: Vec<EdgeId> = e
                .peers
                .values()
                .filter(|p| p.expires_at(&timers) <= at)
                .map(|p| p.id)
                .collect();
            scanned += e.peers.len();
            e.poll(at, &mut out);
            out.recycle_sent();
            let mut got = e.due_scratch.clone();
            want.sort_unstable();
            got.sort_unstable();
            assert_eq!(got, want, "step {steps}");
            visits += got.len();
            for id in &expired {
                assert!(!e.peers.contains_key(id), "expired at its deadline");
            }
            assert!(e.peers.values().all(|p| p.expires_at(&timers) > at));
        }
        // Peers are visited for their own timers, not at every poll (a walk of the table
        // visited them all each time: as many visits as scanned). The fewest polls (seed
        // 19) give 6.5x fewer visits than a walk; with a random id, 6.5x to 187x.
        assert!(
            visits * 4 < scanned,
            "seed {seed}: {visits} visits of {scanned} in {steps} polls"
        );
    }
}
