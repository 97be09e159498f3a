//! Edge core: supernode registration, peer table, handshakes and sessions, path probing
//! (NAT hole punching, direct preferred, relay fallback), MAC learning and switching.
//! Pure: every entry point takes `now` and writes into an [`Outbox`]; no sockets, no clock.
//!
//! What changes the tables is authenticated: acknowledgements and peer lists carry the
//! supernode's signature (pinned key, or the first one seen when none is configured) and
//! the edge's own id and registration number; peers and sessions come from handshakes
//! checked with the community key. Addresses nobody has proven to own (candidates from
//! peer lists) get a bounded number of handshake inits.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

// Looked up for every packet: a seeded fast hash instead of SipHash.
use foldhash::HashMap;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};

use crate::crypto::{AeadKey, Cipher, CommunityKeys, EdgeAad, InitState};
use crate::eth::{self, Mac};
use crate::offload::{self, VnetHdr};
use crate::outbox::Outbox;
use crate::replay::ReplayWindow;
use crate::snkey;
use crate::status::{hex, EdgeStatus, MacStatus, PeerStatus, SupernodeLink};
use crate::supernode::edge_id_of;
use crate::wire::{
    self, Cookie, EdgeId, HandshakeInit, HandshakeResp, MsgType, PeerInfo, Register, RegisterAck,
    RelayHdr, TransportHdr, COOKIE_LEN, DATA_CSUM_PARTIAL, MAX_BCAST_DSTS, PROBE_BODY_LEN,
    PROBE_REPLY, RELAY_HDR_LEN, SIG_LEN, SN_KEY_LEN, TRANSPORT_HDR_LEN,
};

/// Timers and limits of an edge. Defaults suit a WAN; tests shrink them.
#[derive(Clone, Debug)]
pub struct Timers {
    /// Registration refresh.
    pub register_interval: Duration,
    /// A supernode is down after this long without an acknowledgement.
    pub supernode_down_after: Duration,
    /// Handshake retransmission.
    pub handshake_retry: Duration,
    /// The higher-id edge waits this long for the lower-id edge to start a handshake.
    pub handshake_defer: Duration,
    /// Rekey a session this old...
    pub rekey_after_time: Duration,
    /// ...or after this many messages sent with it.
    pub rekey_after_packets: u64,
    /// Never send with a session this old.
    pub reject_after_time: Duration,
    /// Probing of candidate addresses while there is no direct path.
    pub probe_interval: Duration,
    /// Keepalive probe on a direct path.
    pub keepalive_interval: Duration,
    /// A direct path is given up after this long without a probe reply.
    pub direct_timeout: Duration,
    /// A peer nobody lists and who sends nothing is forgotten after this long.
    pub peer_expiry: Duration,
    /// A learned MAC is forgotten after this long.
    pub mac_expiry: Duration,
    /// Relayed traffic sent through a supernode with nothing back from it for this long
    /// makes the edge check that supernode (an early registration).
    pub relay_silence: Duration,
    /// Least time a check waits for its acknowledgement (at least 4 RTTs of that
    /// supernode); a check not answered in time marks the supernode down at once.
    pub relay_check_timeout: Duration,
    /// After an answered check, the next one waits this long (traffic to a peer that
    /// went away, or flowing one way, then costs one registration per interval).
    pub relay_check_every: Duration,
    /// Handshake inits sent to one candidate address that has never answered before the
    /// edge slows down to one per `unvalidated_backoff`.
    pub unvalidated_tries: u32,
    /// Spacing of further attempts to a candidate address that has never answered.
    pub unvalidated_backoff: Duration,
    /// Most handshake inits per second to addresses that have never answered, over all
    /// peers.
    pub unvalidated_per_sec: u32,
}

impl Default for Timers {
    fn default() -> Self {
        Self {
            register_interval: Duration::from_secs(5),
            supernode_down_after: Duration::from_secs(12),
            handshake_retry: Duration::from_secs(1),
            handshake_defer: Duration::from_secs(2),
            rekey_after_time: Duration::from_secs(120),
            rekey_after_packets: 1 << 32,
            reject_after_time: Duration::from_secs(180),
            probe_interval: Duration::from_secs(1),
            keepalive_interval: Duration::from_secs(2),
            direct_timeout: Duration::from_secs(7),
            peer_expiry: Duration::from_secs(90),
            mac_expiry: Duration::from_secs(300),
            relay_silence: Duration::from_millis(200),
            relay_check_timeout: Duration::from_millis(300),
            relay_check_every: Duration::from_secs(1),
            unvalidated_tries: 8,
            unvalidated_backoff: Duration::from_secs(30),
            unvalidated_per_sec: 64,
        }
    }
}

/// Edge settings.
#[derive(Clone, Debug)]
pub struct EdgeConfig {
    /// Edge name (at most 32 bytes).
    pub name: String,
    /// Community name.
    pub community: String,
    /// Community secret.
    pub secret: Vec<u8>,
    /// Data cipher.
    pub cipher: Cipher,
    /// Supernodes, in order of preference, each with the public key to pin (without
    /// one, the key of the first signed acknowledgement is trusted: first use).
    pub supernodes: Vec<SupernodeAddr>,
    /// Our own addresses (announced for peers behind the same NAT).
    pub local_addrs: Vec<SocketAddr>,
    /// Timers.
    pub timers: Timers,
    /// Most peers kept.
    pub max_peers: usize,
    /// Most learned MACs kept.
    pub max_macs: usize,
}

/// A supernode as an edge knows it: `ADDR:PORT` or `ADDR:PORT@KEY` (KEY = the
/// supernode's Ed25519 public key in 64 hex digits, as `mvc supernode` prints it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(try_from = "String")]
pub struct SupernodeAddr {
    /// UDP address.
    pub addr: SocketAddr,
    /// Pinned public key.
    pub key: Option<[u8; SN_KEY_LEN]>,
}

impl From<SocketAddr> for SupernodeAddr {
    fn from(addr: SocketAddr) -> Self {
        Self { addr, key: None }
    }
}

impl std::str::FromStr for SupernodeAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, k) = match s.split_once('@') {
            Some((a, k)) => (a, Some(k)),
            None => (s, None),
        };
        let addr = a
            .parse()
            .map_err(|e| format!("supernode {s:?}: {a:?} is not ADDR:PORT ({e})"))?;
        let key = k
            .map(|k| snkey::parse_hex(k).map_err(|e| format!("supernode {s:?}: {e}")))
            .transpose()?;
        Ok(Self { addr, key })
    }
}

impl TryFrom<String> for SupernodeAddr {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::fmt::Display for SupernodeAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(k) => write!(f, "{}@{}", self.addr, snkey::to_hex(k)),
            None => write!(f, "{}", self.addr),
        }
    }
}

/// Errors creating an edge.
#[derive(Debug, thiserror::Error)]
pub enum EdgeError {
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
    /// Key generation failed.
    #[error("key generation failed")]
    Keys,
}

struct Session {
    local_index: u32,
    remote_index: u32,
    send: AeadKey,
    recv: AeadKey,
    send_ctr: u64,
    replay: ReplayWindow,
    created: Instant,
    initiator: bool,
}

#[derive(Default, Clone, Copy)]
struct Stats {
    tx_bytes: u64,
    rx_bytes: u64,
    tx_packets: u64,
    rx_packets: u64,
}

struct Pending {
    state: InitState,
    sent: Instant,
}

struct Peer {
    id: EdgeId,
    name: String,
    observed: Option<SocketAddr>,
    locals: Vec<SocketAddr>,
    reflexive: Option<SocketAddr>,
    listed_by: u64,
    last_listed: Option<Instant>,
    first_seen: Instant,
    last_rx: Option<Instant>,
    cur: Option<Session>,
    prev: Option<Session>,
    next: Option<Session>,
    pending: Option<Pending>,
    last_init_sent: Option<Instant>,
    last_init_ts: u64,
    direct: Option<SocketAddr>,
    direct_last_rx: Option<Instant>,
    direct_lost: bool,
    last_probe: Option<Instant>,
    last_relay_probe: Option<Instant>,
    probes: Vec<(u64, Option<SocketAddr>, Instant)>,
    rtt: Option<Duration>,
    bcast_rx: Option<(AeadKey, ReplayWindow)>,
    stats: Stats,
    handshakes: u64,
    /// Direct attempts per address; see [`AddrTries`].
    tries: Vec<AddrTries>,
    /// The supernode the peer's last authenticated relayed packet came through.
    relay_rx_sn: Option<(usize, Instant)>,
}

/// Handshake inits sent to one address of a peer, and when an authenticated packet last
/// came from it (then the address is validated and not limited).
struct AddrTries {
    addr: SocketAddr,
    sent: u32,
    last: Instant,
    validated: Option<Instant>,
}

impl Peer {
    fn new(id: EdgeId, now: Instant) -> Self {
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
        }
    }

    /// Records that an authenticated packet came straight from `a`.
    fn validate(&mut self, a: SocketAddr, now: Instant) {
        match self.tries.iter_mut().find(|t| t.addr == a) {
            Some(t) => {
                t.validated = Some(now);
                t.sent = 0;
            }
            None => {
                if self.tries.len() >= 16 {
                    self.tries.remove(0);
                }
                self.tries.push(AddrTries {
                    addr: a,
                    sent: 0,
                    last: now,
                    validated: Some(now),
                });
            }
        }
    }

    /// Addresses worth probing, minus those inside the overlay itself.
    fn candidates(&self, overlay: &[(IpAddr, u8)]) -> Vec<SocketAddr> {
        let mut v = Vec::with_capacity(4);
        for a in self
            .observed
            .iter()
            .chain(self.reflexive.iter())
            .chain(self.locals.iter())
        {
            if !v.contains(a) && !in_nets(a, overlay) {
                v.push(*a);
            }
        }
        v
    }

    fn session_mut(&mut self, index: u32) -> Option<(&mut Session, u8)> {
        if self.cur.as_ref().is_some_and(|s| s.local_index == index) {
            return self.cur.as_mut().map(|s| (s, 0));
        }
        if self.prev.as_ref().is_some_and(|s| s.local_index == index) {
            return self.prev.as_mut().map(|s| (s, 1));
        }
        if self.next.as_ref().is_some_and(|s| s.local_index == index) {
            return self.next.as_mut().map(|s| (s, 2));
        }
        None
    }
}

struct SnState {
    addr: SocketAddr,
    last_ack: Option<Instant>,
    last_sent: Option<Instant>,
    observed: Option<SocketAddr>,
    /// Public key signatures are checked with.
    key: Option<[u8; SN_KEY_LEN]>,
    /// Whether `key` was configured (else: taken on first use).
    pinned: bool,
    /// Cookie for the next registration.
    cookie: [u8; COOKIE_LEN],
    /// Sequence number of the last registration sent to it, and when.
    sent_seq: u64,
    sent_at: Option<Instant>,
    /// Highest sequence number it acknowledged.
    acked_seq: u64,
    /// Registration round trip time.
    rtt: Option<Duration>,
    /// First relayed datagram sent through it since it last showed life.
    relay_wait: Option<Instant>,
    /// An early registration checking that it is alive, not answered yet.
    check_sent: Option<Instant>,
    /// When the last check was answered.
    check_ok: Option<Instant>,
    /// Declared down by an unanswered check (until its next acknowledgement).
    failed: bool,
    /// Last registration sent at once on a cookie message.
    cookie_resend: Option<Instant>,
}

/// Whether `a` lies in one of the networks (address, prefix length).
pub fn in_nets(a: &SocketAddr, nets: &[(IpAddr, u8)]) -> bool {
    nets.iter().any(|(net, len)| match (a.ip(), net) {
        (IpAddr::V4(x), IpAddr::V4(n)) => {
            let m = if *len == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from((*len).min(32)))
            };
            u32::from(x) & m == u32::from(*n) & m
        }
        (IpAddr::V6(x), IpAddr::V6(n)) => {
            let m = if *len == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from((*len).min(128)))
            };
            u128::from(x) & m == u128::from(*n) & m
        }
        _ => false,
    })
}

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
    rng: SystemRandom,
    sns: Vec<SnState>,
    peers: HashMap<EdgeId, Peer>,
    index: HashMap<u32, EdgeId>,
    macs: HashMap<Mac, (EdgeId, Instant)>,
    bcast_tx: AeadKey,
    bcast_ctr: u64,
    hs_ts: u64,
    probe_id: u64,
    started: Instant,
    drops: BTreeMap<&'static str, u64>,
    tap_rx: u64,
    tap_tx: u64,
    flooded: u64,
    udp_rx: u64,
    udp_tx: u64,
    scratch_dsts: Vec<EdgeId>,
    seg_scratch: Vec<u8>,
    overlay_nets: Vec<(IpAddr, u8)>,
    /// Datagrams sent to unvalidated addresses in the current one-second window.
    unvalidated_window: (Instant, u32),
}

/// Headroom the core leaves in front of edge-to-edge packets for a relay header.
pub const HEADROOM: usize = RELAY_HDR_LEN;

/// Largest frame the core accepts from the TAP device for a given buffer size.
pub fn max_frame(buf_size: usize) -> usize {
    buf_size - HEADROOM - TRANSPORT_HDR_LEN - wire::TAG_LEN - MAX_BCAST_DSTS * 8
}

impl EdgeCore {
    /// A new edge with a fresh registration key (hence a fresh edge id).
    pub fn new(cfg: EdgeConfig, now: Instant) -> Result<Self, EdgeError> {
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
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| EdgeError::Keys)?;
        let reg_key = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).map_err(|_| EdgeError::Keys)?;
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
            peers: HashMap::default(),
            index: HashMap::default(),
            macs: HashMap::default(),
            bcast_tx,
            bcast_ctr: 0,
            hs_ts: 0,
            probe_id: 0,
            started: now,
            drops: BTreeMap::new(),
            tap_rx: 0,
            tap_tx: 0,
            flooded: 0,
            udp_rx: 0,
            udp_tx: 0,
            scratch_dsts: Vec::new(),
            seg_scratch: vec![0u8; 65_536],
            overlay_nets: Vec::new(),
            unvalidated_window: (now, 0),
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
                s.last_sent = None;
            }
        }
        for p in self.peers.values_mut() {
            if p.direct.is_some_and(|d| in_nets(&d, &overlay)) {
                p.direct = None;
            }
            if p.reflexive.is_some_and(|d| in_nets(&d, &overlay)) {
                p.reflexive = None;
            }
        }
        self.overlay_nets = overlay;
    }

    /// This edge's id.
    pub fn id(&self) -> EdgeId {
        self.id
    }

    /// Whether `addr` is one of our supernodes.
    pub fn is_supernode(&self, addr: &SocketAddr) -> bool {
        self.sns.iter().any(|s| s.addr == *addr)
    }

    fn drop(&mut self, reason: &'static str) {
        *self.drops.entry(reason).or_insert(0) += 1;
    }

    /// Counts a drop noticed by the I/O driver.
    pub fn count_drop(&mut self, reason: &'static str) {
        self.drop(reason);
    }

    fn sn_up(&self, i: usize, now: Instant) -> bool {
        let s = &self.sns[i];
        !s.failed
            && s.last_ack.is_some_and(|t| {
                now.saturating_duration_since(t) < self.cfg.timers.supernode_down_after
            })
    }

    /// The supernode to relay through for a peer: the one its last relayed packet came
    /// through if that is up (both directions then switch together), else an up one that
    /// lists it, else any up one, else the first configured.
    fn relay_sn(
        &self,
        listed_by: u64,
        came_via: Option<(usize, Instant)>,
        now: Instant,
    ) -> SocketAddr {
        if let Some((i, t)) = came_via {
            if now.saturating_duration_since(t) < self.cfg.timers.supernode_down_after
                && self.sn_up(i, now)
            {
                return self.sns[i].addr;
            }
        }
        let up: Vec<usize> = (0..self.sns.len())
            .filter(|i| self.sn_up(*i, now))
            .collect();
        up.iter()
            .find(|i| listed_by & (1 << **i) != 0)
            .or(up.first())
            .map(|i| self.sns[*i].addr)
            .unwrap_or(self.sns[0].addr)
    }

    /// Notes relayed traffic sent through `sn`: if nothing comes back from it for a
    /// while, it is checked.
    fn note_relay_tx(&mut self, sn: SocketAddr, now: Instant) {
        if let Some(s) = self.sns.iter_mut().find(|s| s.addr == sn) {
            s.relay_wait.get_or_insert(now);
        }
    }

    /// Notes an authenticated packet relayed by supernode `i`: it is alive.
    fn note_sn_alive(&mut self, i: usize) {
        let s = &mut self.sns[i];
        s.relay_wait = None;
        s.check_sent = None;
    }

    /// Whether a handshake init may go straight to `a` now (counted when it may): always to an address the peer answered from lately; to others at most
    /// `unvalidated_tries` times, then one per `unvalidated_backoff`, and at most
    /// `unvalidated_per_sec` per second over all peers.
    fn may_send_direct(&mut self, pid: &EdgeId, a: SocketAddr, now: Instant) -> bool {
        let t = &self.cfg.timers;
        let (tries, backoff, per_sec, fresh) = (
            t.unvalidated_tries,
            t.unvalidated_backoff,
            t.unvalidated_per_sec,
            t.peer_expiry,
        );
        let Some(p) = self.peers.get_mut(pid) else {
            return false;
        };
        let pos = match p.tries.iter().position(|x| x.addr == a) {
            Some(i) => i,
            None => {
                if p.tries.len() >= 16 {
                    // Keep the validated ones; forget the oldest attempt otherwise.
                    let old = p
                        .tries
                        .iter()
                        .position(|x| x.validated.is_none())
                        .unwrap_or(0);
                    p.tries.remove(old);
                }
                p.tries.push(AddrTries {
                    addr: a,
                    sent: 0,
                    last: now,
                    validated: None,
                });
                p.tries.len() - 1
            }
        };
        let e = &mut p.tries[pos];
        if e.validated
            .is_some_and(|v| now.saturating_duration_since(v) < fresh)
        {
            return true;
        }
        if e.sent >= tries && now.saturating_duration_since(e.last) < backoff {
            self.drops
                .entry("unvalidated_limit")
                .and_modify(|n| *n += 1)
                .or_insert(1);
            return false;
        }
        let w = &mut self.unvalidated_window;
        if now.saturating_duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        if w.1 >= per_sec {
            self.drops
                .entry("unvalidated_budget")
                .and_modify(|n| *n += 1)
                .or_insert(1);
            return false;
        }
        w.1 += 1;
        e.sent = e.sent.saturating_add(1);
        e.last = now;
        true
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
                self.drop("peer_table_full");
                return None;
            }
            self.peers.insert(id, Peer::new(id, now));
        }
        self.peers.get_mut(&id)
    }

    // -----------------------------------------------------------------------------------
    // Frames from the TAP device

    /// Handles one Ethernet frame read from the TAP device.
    pub fn handle_tap(&mut self, now: Instant, frame: &[u8], out: &mut Outbox) {
        let Some((dst, src)) = eth::macs(frame) else {
            return self.drop("runt_frame");
        };
        if frame.len() > max_frame(out.buf_size()) {
            return self.drop("frame_too_big");
        }
        self.tap_rx += 1;
        // A MAC we had behind a peer now speaks from our side: the VM moved here.
        if !src.is_group() {
            self.macs.remove(&src);
        }
        if !dst.is_group() {
            if let Some((pid, _)) = self.macs.get(&dst).copied() {
                if self.send_transport(now, &pid, MsgType::Data, 0, frame, None, out) {
                    return;
                }
                // No session yet: the broadcast path needs none.
                self.scratch_dsts.clear();
                self.scratch_dsts.push(pid);
                let dsts = std::mem::take(&mut self.scratch_dsts);
                self.send_bcast(now, frame, &dsts, out);
                self.scratch_dsts = dsts;
                return;
            }
        }
        self.flood(now, frame, out);
    }

    /// Handles a TSO super-frame read from the TAP device: sent to the owning peer as one
    /// GSO batch of re-segmented, sealed datagrams when possible (each at most
    /// `max_frame` bytes of frame), else segmented and switched frame by frame.
    pub fn handle_tap_tso(
        &mut self,
        now: Instant,
        hdr: &VnetHdr,
        frame: &[u8],
        max_frame: usize,
        out: &mut Outbox,
    ) {
        let Some((dst, src)) = eth::macs(frame) else {
            return self.drop("runt_frame");
        };
        if !src.is_group() {
            self.macs.remove(&src);
        }
        if !dst.is_group() && out.gso {
            if let Some((pid, _)) = self.macs.get(&dst).copied() {
                match self.send_tso_batch(now, &pid, hdr, frame, max_frame, out) {
                    Ok(true) => return,
                    Ok(false) => {}
                    Err(r) => return self.drop(r),
                }
            }
        }
        let mut scratch = std::mem::take(&mut self.seg_scratch);
        let r = offload::segment_tcp(hdr, frame, max_frame, &mut scratch, |s| {
            self.handle_tap(now, s, out)
        });
        self.seg_scratch = scratch;
        if r.is_err() {
            self.drop("bad_tso_frame");
        }
    }

    /// The GSO fast path; `Ok(false)` when it does not apply.
    fn send_tso_batch(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        hdr: &VnetHdr,
        frame: &[u8],
        max_frame: usize,
        out: &mut Outbox,
    ) -> Result<bool, &'static str> {
        let f = offload::parse_tcp(frame).ok_or("bad_tso_frame")?;
        if (hdr.gso_type & !offload::GSO_ECN == offload::GSO_TCPV4) != f.v4 {
            return Err("bad_tso_frame");
        }
        let mss = usize::from(hdr.gso_size).min(max_frame.saturating_sub(f.hdr_len));
        if mss == 0 {
            return Err("bad_tso_frame");
        }
        let payload_len = frame.len() - f.hdr_len;
        let n = payload_len.div_ceil(mss).max(1);
        let reject = self.cfg.timers.reject_after_time;
        let (direct, listed, came_via) = match self.peers.get(pid) {
            Some(p) => match &p.cur {
                Some(s)
                    if now.saturating_duration_since(s.created) < reject
                        && s.send_ctr < u64::MAX - n as u64 =>
                {
                    (p.direct, p.listed_by, p.relay_rx_sn)
                }
                _ => return Ok(false),
            },
            None => return Ok(false),
        };
        let prefix = if direct.is_some() { 0 } else { RELAY_HDR_LEN };
        let stride = prefix + TRANSPORT_HDR_LEN + f.hdr_len + mss + self.cfg.cipher.overhead();
        if stride > out.gso_max_segment {
            return Ok(false);
        }
        let dst = match direct {
            Some(d) => d,
            None => {
                let sn = self.relay_sn(listed, came_via, now);
                self.note_relay_tx(sn, now);
                sn
            }
        };
        let per_batch = (60_000 / stride).clamp(1, 64);
        let community = self.keys.id;
        let me = self.id;
        let relay = RelayHdr {
            community,
            src: me,
            dst: *pid,
        };
        let p = self.peers.get_mut(pid).ok_or("unknown_peer")?;
        let s = p.cur.as_mut().ok_or("no_session")?;
        let hl = f.hdr_len;
        let seq0 = u32::from_be_bytes([
            frame[f.tcp + 4],
            frame[f.tcp + 5],
            frame[f.tcp + 6],
            frame[f.tcp + 7],
        ]);
        let id0 = u16::from_be_bytes([frame[f.ip + 4], frame[f.ip + 5]]);
        let flags0 = frame[f.tcp + 13];
        let payload = &frame[hl..];
        let mut buf: Option<Vec<u8>> = None;
        let mut off = 0;
        let mut count = 0;
        let mut sent = 0u64;
        for i in 0..n {
            let b = buf.get_or_insert_with(|| out.take_big());
            let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
            if prefix > 0 {
                let _ = relay.write(&mut b[off..]);
            }
            let t = off + prefix;
            let body = t + TRANSPORT_HDR_LEN;
            let seg_len = hl + chunk.len();
            {
                let seg = &mut b[body..body + seg_len];
                seg[..hl].copy_from_slice(&frame[..hl]);
                seg[hl..].copy_from_slice(chunk);
                let seq = seq0.wrapping_add((i * mss) as u32);
                seg[f.tcp + 4..f.tcp + 8].copy_from_slice(&seq.to_be_bytes());
                let mut fl = flags0;
                if i + 1 < n {
                    fl &= !(0x01 | 0x08);
                }
                if i > 0 {
                    fl &= !0x80;
                }
                seg[f.tcp + 13] = fl;
                if f.v4 {
                    let id = id0.wrapping_add(i as u16);
                    seg[f.ip + 4..f.ip + 6].copy_from_slice(&id.to_be_bytes());
                }
                offload::fix_headers(seg, &f, false);
            }
            let ctr = s.send_ctr;
            s.send_ctr += 1;
            let th = TransportHdr {
                kind: MsgType::Data,
                flags: DATA_CSUM_PARTIAL,
                receiver_index: s.remote_index,
                counter: ctr,
            };
            let _ = th.write(&mut b[t..]);
            let aad = EdgeAad::new(&community, &me, pid, &b[t..body]);
            let sealed = s
                .send
                .seal(ctr, aad.as_bytes(), &mut b[body..], seg_len)
                .map_err(|e| e.reason())?;
            off += prefix + TRANSPORT_HDR_LEN + sealed;
            count += 1;
            sent += seg_len as u64;
            if count == per_batch || i + 1 == n {
                if let Some(b) = buf.take() {
                    out.push_udp_batch(dst, b, off, stride);
                }
                self.udp_tx += count as u64;
                off = 0;
                count = 0;
            }
        }
        p.stats.tx_packets += n as u64;
        p.stats.tx_bytes += sent;
        self.tap_rx += n as u64;
        Ok(true)
    }

    fn flood(&mut self, now: Instant, frame: &[u8], out: &mut Outbox) {
        self.flooded += 1;
        let mut via_sn = std::mem::take(&mut self.scratch_dsts);
        via_sn.clear();
        let ids: Vec<EdgeId> = self.peers.keys().copied().collect();
        for id in ids {
            let direct = self
                .peers
                .get(&id)
                .is_some_and(|p| p.direct.is_some() && p.cur.is_some());
            if !(direct && self.send_transport(now, &id, MsgType::Data, 0, frame, None, out)) {
                via_sn.push(id);
            }
        }
        for chunk in via_sn.chunks(MAX_BCAST_DSTS) {
            self.send_bcast(now, frame, chunk, out);
        }
        self.scratch_dsts = via_sn;
    }

    fn send_bcast(&mut self, now: Instant, frame: &[u8], dsts: &[EdgeId], out: &mut Outbox) {
        if dsts.is_empty() {
            return;
        }
        let mut b = out.take();
        let ctr = self.bcast_ctr;
        self.bcast_ctr += 1;
        let Ok(hl) = wire::write_bcast_header(&mut b, &self.keys.id, &self.id, ctr, dsts) else {
            out.give(b, false);
            return self.drop("no_room");
        };
        b[2] = self.cfg.cipher as u8;
        if b.len() < hl + frame.len() + wire::TAG_LEN {
            out.give(b, false);
            return self.drop("frame_too_big");
        }
        b[hl..hl + frame.len()].copy_from_slice(frame);
        let (head, body) = b.split_at_mut(hl);
        let Ok(n) = self.bcast_tx.seal(ctr, head, body, frame.len()) else {
            out.give(b, false);
            return self.drop("no_room");
        };
        let listed = dsts
            .iter()
            .filter_map(|d| self.peers.get(d))
            .fold(0u64, |a, p| a | p.listed_by);
        let came_via = match dsts {
            [one] => self.peers.get(one).and_then(|p| p.relay_rx_sn),
            _ => None,
        };
        let sn = self.relay_sn(listed, came_via, now);
        self.note_relay_tx(sn, now);
        for d in dsts {
            if let Some(p) = self.peers.get_mut(d) {
                p.stats.tx_packets += 1;
                p.stats.tx_bytes += frame.len() as u64;
            }
        }
        out.push_udp(sn, b, 0, hl + n);
        self.udp_tx += 1;
    }

    /// Seals a transport message to a peer and queues it: to `to` if given, else to the
    /// peer's direct address, else through a supernode. False when there is no usable
    /// session.
    #[allow(clippy::too_many_arguments)]
    fn send_transport(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        kind: MsgType,
        flags: u8,
        payload: &[u8],
        to: Option<SocketAddr>,
        out: &mut Outbox,
    ) -> bool {
        let reject = self.cfg.timers.reject_after_time;
        let Some(p) = self.peers.get_mut(pid) else {
            return false;
        };
        let Some(s) = p.cur.as_mut() else {
            return false;
        };
        if now.saturating_duration_since(s.created) >= reject || s.send_ctr == u64::MAX {
            return false;
        }
        let mut b = out.take();
        let start = HEADROOM;
        let body = start + TRANSPORT_HDR_LEN;
        if b.len() < body + payload.len() + wire::TAG_LEN {
            out.give(b, false);
            self.drop("frame_too_big");
            return true;
        }
        let ctr = s.send_ctr;
        s.send_ctr += 1;
        let hdr = TransportHdr {
            kind,
            flags,
            receiver_index: s.remote_index,
            counter: ctr,
        };
        let _ = hdr.write(&mut b[start..]);
        let aad = EdgeAad::new(&self.keys.id, &self.id, pid, &b[start..body]);
        b[body..body + payload.len()].copy_from_slice(payload);
        let Ok(n) = s
            .send
            .seal(ctr, aad.as_bytes(), &mut b[body..], payload.len())
        else {
            out.give(b, false);
            self.drop("no_room");
            return true;
        };
        let len = TRANSPORT_HDR_LEN + n;
        if kind == MsgType::Data {
            p.stats.tx_packets += 1;
            p.stats.tx_bytes += payload.len() as u64;
        }
        let dst = to.or(p.direct);
        let listed = p.listed_by;
        let came_via = p.relay_rx_sn;
        match dst {
            Some(d) => out.push_udp(d, b, start, len),
            None => {
                let sn = self.relay_sn(listed, came_via, now);
                self.note_relay_tx(sn, now);
                let h = RelayHdr {
                    community: self.keys.id,
                    src: self.id,
                    dst: *pid,
                };
                let _ = h.write(&mut b);
                out.push_udp(sn, b, 0, HEADROOM + len);
            }
        }
        self.udp_tx += 1;
        true
    }

    /// Queues an edge-to-edge packet (handshake) direct or relayed.
    fn send_edge_packet(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        pkt: &[u8],
        via: Via,
        out: &mut Outbox,
    ) {
        match via {
            Via::Direct(a) => out.push_udp_copy(a, pkt),
            Via::Relayed { sn, .. } => {
                let mut b = out.take();
                let h = RelayHdr {
                    community: self.keys.id,
                    src: self.id,
                    dst: *pid,
                };
                let _ = h.write(&mut b);
                b[HEADROOM..HEADROOM + pkt.len()].copy_from_slice(pkt);
                out.push_udp(sn, b, 0, HEADROOM + pkt.len());
            }
        }
        let _ = now;
        self.udp_tx += 1;
    }

    // -----------------------------------------------------------------------------------
    // Datagrams from the network

    /// Handles one datagram from `src`. The buffer is decrypted in place.
    pub fn handle_udp(&mut self, now: Instant, src: SocketAddr, pkt: &mut [u8], out: &mut Outbox) {
        self.udp_rx += 1;
        let t = match wire::peek_type(pkt) {
            Ok(t) => t,
            Err(e) => return self.drop(e.reason()),
        };
        let sn = self.sns.iter().position(|s| s.addr == src);
        match (t, sn) {
            (MsgType::RegisterAck, Some(i)) => self.on_ack(now, i, pkt),
            (MsgType::Cookie, Some(i)) => self.on_cookie(now, i, pkt, out),
            (MsgType::PeerInfo, Some(i)) => self.on_peer_info(now, i, pkt),
            (MsgType::Relay, Some(_)) => match RelayHdr::decode(pkt) {
                Ok((h, _)) => {
                    if h.community != self.keys.id || h.dst != self.id || h.src == self.id {
                        return self.drop("relay_not_for_us");
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
                Err(e) => self.drop(e.reason()),
            },
            (MsgType::Bcast, Some(i)) => self.on_bcast(now, i, pkt, out),
            (
                MsgType::HandshakeInit | MsgType::HandshakeResp | MsgType::Data | MsgType::Probe,
                _,
            ) => {
                if in_nets(&src, &self.overlay_nets) {
                    // Came through our own overlay: never a path.
                    return self.drop("path_inside_overlay");
                }
                self.on_edge_packet(now, Via::Direct(src), pkt, out)
            }
            _ => self.drop("unexpected_type"),
        }
    }

    fn on_ack(&mut self, now: Instant, i: usize, pkt: &[u8]) {
        let v = match RegisterAck::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        let a = &v.msg;
        if a.community != self.keys.id || a.edge != self.id {
            return self.drop("ack_not_for_us");
        }
        let s = &self.sns[i];
        let key = match s.key {
            Some(k) if k != a.sn_key => return self.drop("sn_key_mismatch"),
            Some(k) => k,
            None => a.sn_key,
        };
        // Each registration is acknowledged once: older or unsent numbers are replays.
        if a.seq <= s.acked_seq || a.seq > s.sent_seq {
            return self.drop("stale_ack");
        }
        if !snkey::verify(&key, v.signed, v.sig) {
            return self.drop("bad_signature");
        }
        if s.key.is_none() {
            tracing::warn!(
                supernode = %s.addr,
                key = %snkey::to_hex(&key),
                "trusting this supernode key on first use; pin it with --supernode {}@{}",
                s.addr,
                snkey::to_hex(&key)
            );
        }
        if !self.sn_up(i, now) {
            tracing::info!(supernode = %s.addr, observed = %a.observed, "registered with supernode");
        }
        let s = &mut self.sns[i];
        s.key = Some(key);
        s.last_ack = Some(now);
        s.observed = Some(a.observed);
        s.cookie = a.cookie;
        s.acked_seq = a.seq;
        s.failed = false;
        if s.check_sent.take().is_some() {
            s.check_ok = Some(now);
        }
        s.relay_wait = None;
        if a.seq == s.sent_seq {
            if let Some(t) = s.sent_at {
                s.rtt = Some(now.saturating_duration_since(t));
            }
        }
    }

    /// A cookie message: our registration's source address was not validated yet (first
    /// contact, a new NAT mapping or a restarted supernode). Registers again at once with
    /// the cookie, at most once per `handshake_retry`.
    fn on_cookie(&mut self, now: Instant, i: usize, pkt: &[u8], out: &mut Outbox) {
        let c = match Cookie::decode(pkt) {
            Ok(c) => c,
            Err(e) => return self.drop(e.reason()),
        };
        let retry = self.cfg.timers.handshake_retry;
        let s = &mut self.sns[i];
        if c.edge != self.id || c.seq != s.sent_seq {
            return self.drop("cookie_not_for_us");
        }
        s.cookie = c.cookie;
        if s.cookie_resend
            .is_some_and(|t| now.saturating_duration_since(t) < retry)
        {
            return;
        }
        s.cookie_resend = Some(now);
        self.send_register(now, i, out);
    }

    fn on_peer_info(&mut self, now: Instant, i: usize, pkt: &[u8]) {
        let v = match PeerInfo::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        let s = &self.sns[i];
        let Some(key) = s.key else {
            return self.drop("sn_key_unknown");
        };
        let info = &v.msg;
        if info.community != self.keys.id || info.dst != self.id {
            return self.drop("info_not_for_us");
        }
        // Bound to one of our registrations since the last acknowledged one: a list from
        // an older registration is a replay.
        if info.seq < s.acked_seq || info.seq > s.sent_seq {
            return self.drop("stale_info");
        }
        if !snkey::verify(&key, v.signed, v.sig) {
            return self.drop("bad_signature");
        }
        for e in v.msg.peers {
            if e.id == self.id {
                continue;
            }
            let new = !self.peers.contains_key(&e.id);
            let Some(p) = self.peer_entry(e.id, now) else {
                continue;
            };
            if new || p.name != e.name {
                tracing::info!(peer = %e.name, id = %hex(&e.id), observed = %e.observed, "peer introduced");
            }
            p.name = e.name;
            p.observed = Some(e.observed);
            p.locals = e.local_addrs;
            p.listed_by |= 1 << i;
            p.last_listed = Some(now);
        }
    }

    fn on_bcast(&mut self, now: Instant, sn: usize, pkt: &mut [u8], out: &mut Outbox) {
        let (src, counter, hl, cipher) = match wire::decode_bcast(pkt) {
            Ok(v) => {
                if v.community != self.keys.id
                    || v.src == self.id
                    || !(v.dsts.is_empty() || v.dsts.contains(&self.id))
                {
                    return self.drop("bcast_not_for_us");
                }
                (v.src, v.counter, v.header.len(), pkt[2])
            }
            Err(e) => return self.drop(e.reason()),
        };
        if cipher != self.cfg.cipher as u8 {
            return self.drop("cipher_mismatch");
        }
        // A sender we do not know yet becomes a peer only once its frame authenticates.
        let mut fresh = match self.peers.get_mut(&src).and_then(|p| p.bcast_rx.take()) {
            Some(k) => k,
            None => (
                self.keys.bcast_key(self.cfg.cipher, &src),
                ReplayWindow::new(),
            ),
        };
        let (key, replay) = &mut fresh;
        let opened = if replay.check(counter) {
            let (head, body) = pkt.split_at_mut(hl);
            key.open(counter, head, body).map_err(|e| e.reason())
        } else {
            Err("replay")
        };
        if opened.is_ok() {
            replay.update(counter);
        }
        let keep = match self.peers.get_mut(&src) {
            Some(p) => Some(p),
            None if opened.is_ok() => self.peer_entry(src, now),
            None => None,
        };
        if let Some(p) = keep {
            p.bcast_rx = Some(fresh);
        }
        let n = match opened {
            Ok(n) => n,
            Err(r) => return self.drop(r),
        };
        self.note_sn_alive(sn);
        self.deliver(now, &src, hl, n, pkt, false, out);
    }

    /// Learns the source MAC and writes the frame `pkt[off..off + len]` to the TAP device.
    #[allow(clippy::too_many_arguments)]
    fn deliver(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        off: usize,
        len: usize,
        pkt: &[u8],
        partial_csum: bool,
        out: &mut Outbox,
    ) {
        let frame = &pkt[off..off + len];
        let Some((_, src)) = eth::macs(frame) else {
            return self.drop("runt_frame");
        };
        if let Some(p) = self.peers.get_mut(pid) {
            p.stats.rx_packets += 1;
            p.stats.rx_bytes += len as u64;
            p.last_rx = Some(now);
        }
        if !src.is_group() {
            let n = self.macs.len();
            match self.macs.get_mut(&src) {
                Some(e) => *e = (*pid, now),
                None if n < self.cfg.max_macs => {
                    self.macs.insert(src, (*pid, now));
                }
                None => self.drop("mac_table_full"),
            }
        }
        out.push_tap(frame, partial_csum);
        self.tap_tx += 1;
    }

    /// Notes an authenticated packet from peer `pid`: a direct source address is then
    /// validated; a relaying supernode is alive and carries our answers.
    fn authentic_from(&mut self, pid: &EdgeId, via: Via, now: Instant) {
        match via {
            Via::Direct(a) => {
                if let Some(p) = self.peers.get_mut(pid) {
                    p.validate(a, now);
                }
            }
            Via::Relayed { sn, .. } => {
                if let Some(i) = self.sns.iter().position(|s| s.addr == sn) {
                    self.note_sn_alive(i);
                    if let Some(p) = self.peers.get_mut(pid) {
                        p.relay_rx_sn = Some((i, now));
                    }
                }
            }
        }
    }

    fn on_edge_packet(&mut self, now: Instant, via: Via, pkt: &mut [u8], out: &mut Outbox) {
        let t = match wire::peek_type(pkt) {
            Ok(t) => t,
            Err(e) => return self.drop(e.reason()),
        };
        match t {
            MsgType::HandshakeInit => self.on_init(now, via, pkt, out),
            MsgType::HandshakeResp => self.on_resp(now, via, pkt, out),
            MsgType::Data | MsgType::Probe => self.on_transport(now, via, pkt, out),
            _ => self.drop("unexpected_type"),
        }
    }

    fn on_init(&mut self, now: Instant, via: Via, pkt: &[u8], out: &mut Outbox) {
        let init = match HandshakeInit::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        if let Via::Relayed { src, .. } = via {
            if src != init.src {
                return self.drop("relay_mismatch");
            }
        }
        if init.src == self.id {
            return self.drop("own_packet");
        }
        if !self.keys.verify_init(&self.id, &init) {
            return self.drop("auth_failed");
        }
        if init.cipher != self.cfg.cipher as u8 {
            return self.drop("cipher_mismatch");
        }
        let index = self.new_index();
        let Some(p) = self.peer_entry(init.src, now) else {
            return;
        };
        if init.ts <= p.last_init_ts {
            // The same init arrives once relayed and once direct: only the first counts.
            let reason = if init.ts == p.last_init_ts {
                "duplicate_handshake"
            } else {
                "replay"
            };
            return self.drop(reason);
        }
        p.last_init_ts = init.ts;
        let (resp, keys) = match self
            .keys
            .handshake_respond(&self.rng, &self.id, &init, index)
        {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        let cipher = self.cfg.cipher;
        let p = self.peers.get_mut(&init.src).expect("peer entry exists");
        if let Via::Direct(a) = via {
            p.reflexive = Some(a);
        }
        let s = Session {
            local_index: index,
            remote_index: init.sender_index,
            send: AeadKey::new(cipher, &keys.send),
            recv: AeadKey::new(cipher, &keys.recv),
            send_ctr: 0,
            replay: ReplayWindow::new(),
            created: now,
            initiator: false,
        };
        if let Some(old) = p.next.replace(s) {
            self.index.remove(&old.local_index);
        }
        self.index.insert(index, init.src);
        self.authentic_from(&init.src, via, now);
        let mut b = [0u8; wire::HS_RESP_LEN];
        if resp.encode(&mut b).is_ok() {
            self.send_edge_packet(now, &init.src, &b, via, out);
        }
    }

    fn on_resp(&mut self, now: Instant, via: Via, pkt: &[u8], out: &mut Outbox) {
        let resp = match HandshakeResp::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        if let Via::Relayed { src, .. } = via {
            if src != resp.src {
                return self.drop("relay_mismatch");
            }
        }
        let Some(p) = self.peers.get_mut(&resp.src) else {
            return self.drop("unexpected_resp");
        };
        let ok = p.pending.as_ref().is_some_and(|pd| {
            pd.state.init.sender_index == resp.receiver_index
                && self.keys.verify_resp(&self.id, &pd.state.init, &resp)
        });
        if !ok {
            return self.drop("unexpected_resp");
        }
        let Some(pd) = p.pending.take() else {
            return;
        };
        let local_index = pd.state.init.sender_index;
        let keys = match self.keys.handshake_finish(&self.id, pd.state, &resp) {
            Ok(k) => k,
            Err(e) => {
                self.index.remove(&local_index);
                return self.drop(e.reason());
            }
        };
        let cipher = self.cfg.cipher;
        let s = Session {
            local_index,
            remote_index: resp.sender_index,
            send: AeadKey::new(cipher, &keys.send),
            recv: AeadKey::new(cipher, &keys.recv),
            send_ctr: 0,
            replay: ReplayWindow::new(),
            created: now,
            initiator: true,
        };
        if let Via::Direct(a) = via {
            p.reflexive = Some(a);
        }
        p.handshakes += 1;
        let old = p.prev.take();
        p.prev = p.cur.replace(s);
        if p.cur.is_some() && p.prev.is_none() {
            tracing::info!(peer = %p.name, "session established");
        }
        if let Some(old) = old {
            self.index.remove(&old.local_index);
        }
        // Confirms the session at the responder and starts path probing.
        let pid = resp.src;
        self.authentic_from(&pid, via, now);
        self.send_probe(now, &pid, None, out);
    }

    fn send_probe(&mut self, now: Instant, pid: &EdgeId, to: Option<SocketAddr>, out: &mut Outbox) {
        self.probe_id += 1;
        let id = self.probe_id;
        if self.send_transport(now, pid, MsgType::Probe, 0, &id.to_be_bytes(), to, out) {
            if let Some(p) = self.peers.get_mut(pid) {
                let via = to.or(p.direct);
                if p.probes.len() >= 32 {
                    p.probes.remove(0);
                }
                p.probes.push((id, via, now));
            }
        }
    }

    fn on_transport(&mut self, now: Instant, via: Via, pkt: &mut [u8], out: &mut Outbox) {
        let hdr = match TransportHdr::decode(pkt) {
            Ok(h) => h,
            Err(e) => return self.drop(e.reason()),
        };
        let Some(pid) = self.index.get(&hdr.receiver_index).copied() else {
            return self.drop("unknown_session");
        };
        if let Via::Relayed { src, .. } = via {
            if src != pid {
                return self.drop("relay_mismatch");
            }
        }
        let community = self.keys.id;
        let me = self.id;
        let Some(p) = self.peers.get_mut(&pid) else {
            return self.drop("unknown_session");
        };
        let Some((s, slot)) = p.session_mut(hdr.receiver_index) else {
            return self.drop("unknown_session");
        };
        if !s.replay.check(hdr.counter) {
            return self.drop("replay");
        }
        let (head, body) = pkt.split_at_mut(TRANSPORT_HDR_LEN);
        let aad = EdgeAad::new(&community, &pid, &me, head);
        let n = match s.recv.open(hdr.counter, aad.as_bytes(), body) {
            Ok(n) => n,
            Err(e) => return self.drop(e.reason()),
        };
        s.replay.update(hdr.counter);
        if slot == 2 {
            // First packet on a session we answered: the initiator has it, switch to it.
            let old = p.prev.take();
            p.prev = p.cur.take();
            p.cur = p.next.take();
            p.handshakes += 1;
            if p.prev.is_none() {
                tracing::info!(peer = %p.name, "session established");
            }
            if let Some(old) = old {
                self.index.remove(&old.local_index);
            }
        }
        self.authentic_from(&pid, via, now);
        let Some(p) = self.peers.get_mut(&pid) else {
            return;
        };
        p.last_rx = Some(now);
        if let Via::Direct(a) = via {
            if p.direct == Some(a) {
                p.direct_last_rx = Some(now);
            }
        }
        match hdr.kind {
            MsgType::Data => {
                let partial = hdr.flags & DATA_CSUM_PARTIAL != 0;
                self.deliver(now, &pid, TRANSPORT_HDR_LEN, n, pkt, partial, out)
            }
            _ => {
                if n != PROBE_BODY_LEN {
                    return self.drop("malformed");
                }
                let mut idb = [0u8; 8];
                idb.copy_from_slice(&pkt[TRANSPORT_HDR_LEN..TRANSPORT_HDR_LEN + 8]);
                if hdr.flags & PROBE_REPLY == 0 {
                    let to = match via {
                        Via::Direct(a) => {
                            p.reflexive = Some(a);
                            Some(a)
                        }
                        Via::Relayed { .. } => None,
                    };
                    let force_relay = to.is_none() && p.direct.is_some();
                    if force_relay {
                        // Answer on the path asked: through the relay.
                        let d = p.direct.take();
                        self.send_transport(
                            now,
                            &pid,
                            MsgType::Probe,
                            PROBE_REPLY,
                            &idb,
                            None,
                            out,
                        );
                        if let Some(p) = self.peers.get_mut(&pid) {
                            p.direct = d;
                        }
                    } else {
                        self.send_transport(now, &pid, MsgType::Probe, PROBE_REPLY, &idb, to, out);
                    }
                } else {
                    let id = u64::from_be_bytes(idb);
                    let Some(pos) = p.probes.iter().position(|x| x.0 == id) else {
                        return self.drop("stale_probe");
                    };
                    let (_, _, sent) = p.probes.remove(pos);
                    let rtt = now.saturating_duration_since(sent);
                    match via {
                        Via::Direct(a) => {
                            if p.direct != Some(a) {
                                tracing::info!(peer = %p.name, addr = %a, rtt_ms = rtt.as_secs_f64() * 1e3, "direct path up");
                            }
                            p.direct = Some(a);
                            p.direct_last_rx = Some(now);
                            p.direct_lost = false;
                            p.rtt = Some(rtt);
                        }
                        Via::Relayed { .. } => {
                            if p.direct.is_none() {
                                p.rtt = Some(rtt);
                            }
                        }
                    }
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Timers

    /// Runs timers: registration, handshakes, rekeying, probing, expiry.
    pub fn poll(&mut self, now: Instant, out: &mut Outbox) {
        self.poll_register(now, out);
        let t = self.cfg.timers.clone();
        let ids: Vec<EdgeId> = self.peers.keys().copied().collect();
        for id in ids {
            self.poll_peer(now, &id, &t, out);
        }
        // Expiry of peers and MACs.
        let mut gone = Vec::new();
        for (id, p) in &self.peers {
            let last = [p.last_listed, p.last_rx, Some(p.first_seen)]
                .into_iter()
                .flatten()
                .max()
                .unwrap_or(p.first_seen);
            if now.saturating_duration_since(last) > t.peer_expiry {
                gone.push(*id);
            }
        }
        for id in gone {
            if let Some(p) = self.peers.remove(&id) {
                tracing::info!(peer = %p.name, "peer expired");
                for s in [p.cur, p.prev, p.next].into_iter().flatten() {
                    self.index.remove(&s.local_index);
                }
                if let Some(pd) = p.pending {
                    self.index.remove(&pd.state.init.sender_index);
                }
                self.macs.retain(|_, v| v.0 != id);
            }
        }
        self.macs
            .retain(|_, v| now.saturating_duration_since(v.1) < t.mac_expiry);
    }

    fn poll_register(&mut self, now: Instant, out: &mut Outbox) {
        let t = self.cfg.timers.clone();
        for i in 0..self.sns.len() {
            let up = self.sn_up(i, now);
            // Relayed traffic and nothing back: check the supernode now rather than
            // wait for its acknowledgements to time out.
            if up {
                let s = &mut self.sns[i];
                let wait = (t.relay_check_timeout).max(s.rtt.unwrap_or_default() * 4);
                match (s.check_sent, s.relay_wait) {
                    (Some(c), _) if now.saturating_duration_since(c) >= wait => {
                        tracing::warn!(supernode = %s.addr, "supernode does not answer; relaying through the next one");
                        s.failed = true;
                        s.check_sent = None;
                        s.relay_wait = None;
                        continue;
                    }
                    (None, Some(w))
                        if now.saturating_duration_since(w) >= t.relay_silence
                            && s.check_ok.is_none_or(|k| {
                                now.saturating_duration_since(k) >= t.relay_check_every
                            }) =>
                    {
                        s.check_sent = Some(now);
                        self.send_register(now, i, out);
                        continue;
                    }
                    _ => {}
                }
            }
            let every = if up {
                t.register_interval
            } else {
                t.register_interval.min(Duration::from_secs(2))
            };
            if self.sns[i]
                .last_sent
                .is_some_and(|l| now.saturating_duration_since(l) < every)
            {
                continue;
            }
            self.send_register(now, i, out);
        }
    }

    /// Sends a registration (signed, with the supernode's last cookie) to supernode `i`.
    fn send_register(&mut self, now: Instant, i: usize, out: &mut Outbox) {
        self.reg_seq += 1;
        let m = Register {
            cookie: self.sns[i].cookie,
            community: self.keys.id,
            edge_key: self.reg_pub,
            seq: self.reg_seq,
            name: self.cfg.name.clone(),
            local_addrs: self.cfg.local_addrs.clone(),
        };
        let mut b = out.take();
        match m.encode_unsigned(&mut b) {
            Ok(n) => {
                let sig = self.reg_key.sign(&b[..n]);
                b[n..n + SIG_LEN].copy_from_slice(sig.as_ref());
                let addr = self.sns[i].addr;
                out.push_udp(addr, b, 0, n + SIG_LEN);
                self.udp_tx += 1;
            }
            Err(_) => {
                out.give(b, false);
                self.drop("no_room");
            }
        }
        let s = &mut self.sns[i];
        s.last_sent = Some(now);
        s.sent_seq = self.reg_seq;
        s.sent_at = Some(now);
    }

    fn poll_peer(&mut self, now: Instant, id: &EdgeId, t: &crate::edge::Timers, out: &mut Outbox) {
        let my_id = self.id;
        let Some(p) = self.peers.get_mut(id) else {
            return;
        };
        // Drop sessions past their life.
        if p.cur
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.created) >= t.reject_after_time)
        {
            if let Some(s) = p.cur.take() {
                self.index.remove(&s.local_index);
            }
        }
        if p.prev
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.created) >= t.reject_after_time)
        {
            if let Some(s) = p.prev.take() {
                self.index.remove(&s.local_index);
            }
        }
        if p.next
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.created) >= t.handshake_retry * 10)
        {
            if let Some(s) = p.next.take() {
                self.index.remove(&s.local_index);
            }
        }
        if p.pending
            .as_ref()
            .is_some_and(|pd| now.saturating_duration_since(pd.sent) >= t.handshake_retry * 5)
        {
            if let Some(pd) = p.pending.take() {
                self.index.remove(&pd.state.init.sender_index);
            }
        }
        let Some(p) = self.peers.get_mut(id) else {
            return;
        };
        // Handshake when there is no session, or rekey when it is old or worn.
        let reachable = p.listed_by != 0 || p.last_rx.is_some();
        let need = match &p.cur {
            None => {
                reachable
                    && (my_id < *id
                        || now.saturating_duration_since(p.first_seen) >= t.handshake_defer)
            }
            Some(s) => {
                let age = now.saturating_duration_since(s.created);
                let limit = if s.initiator {
                    t.rekey_after_time
                } else {
                    t.rekey_after_time + t.handshake_retry * 10
                };
                age >= limit || s.send_ctr >= t.rekey_after_packets
            }
        };
        let retry_due = p
            .last_init_sent
            .is_none_or(|l| now.saturating_duration_since(l) >= t.handshake_retry);
        if need && retry_due {
            self.start_handshake(now, id, out);
        }
        // Path probing.
        let Some(p) = self.peers.get_mut(id) else {
            return;
        };
        if p.cur.is_none() {
            return;
        }
        if let (Some(d), Some(last)) = (p.direct, p.direct_last_rx) {
            if now.saturating_duration_since(last) >= t.direct_timeout {
                tracing::info!(peer = %p.name, addr = %d, "direct path lost, relaying");
                p.direct = None;
                p.direct_lost = true;
            }
        }
        let every = if p.direct.is_some() {
            t.keepalive_interval
        } else {
            t.probe_interval
        };
        if p.last_probe
            .is_some_and(|l| now.saturating_duration_since(l) < every)
        {
            return;
        }
        p.last_probe = Some(now);
        match p.direct {
            Some(d) => self.send_probe(now, id, Some(d), out),
            None => {
                // Probes need a session: the peer proved it holds the community key,
                // and its candidates come from the pinned supernode's signed list.
                for a in p.candidates(&self.overlay_nets) {
                    self.send_probe(now, id, Some(a), out);
                }
                // One through the relay, for the relayed path's RTT.
                let Some(p) = self.peers.get_mut(id) else {
                    return;
                };
                if p.last_relay_probe
                    .is_none_or(|l| now.saturating_duration_since(l) >= t.keepalive_interval)
                {
                    p.last_relay_probe = Some(now);
                    self.send_probe(now, id, None, out);
                }
            }
        }
    }

    fn start_handshake(&mut self, now: Instant, id: &EdgeId, out: &mut Outbox) {
        let index = self.new_index();
        self.hs_ts += 1;
        let st = match self.keys.handshake_init(
            &self.rng,
            self.cfg.cipher,
            &self.id,
            id,
            index,
            self.hs_ts,
        ) {
            Ok(s) => s,
            Err(e) => return self.drop(e.reason()),
        };
        let mut b = [0u8; wire::HS_INIT_LEN];
        if st.init.encode(&mut b).is_err() {
            return;
        }
        let Some(p) = self.peers.get_mut(id) else {
            return;
        };
        if let Some(old) = p.pending.take() {
            self.index.remove(&old.state.init.sender_index);
        }
        let p = self.peers.get_mut(id).expect("present");
        p.pending = Some(Pending {
            state: st,
            sent: now,
        });
        p.last_init_sent = Some(now);
        let direct = p.direct;
        let cands = p.candidates(&self.overlay_nets);
        let listed = p.listed_by;
        let came_via = p.relay_rx_sn;
        self.index.insert(index, *id);
        // Through a supernode (always works while one is up) and straight to the peer
        // (works when the supernodes are gone; also opens our NAT towards it), within
        // the limits for addresses that never answered.
        let sn = self.relay_sn(listed, came_via, now);
        self.send_edge_packet(now, id, &b, Via::Relayed { src: self.id, sn }, out);
        match direct {
            Some(d) => self.send_edge_packet(now, id, &b, Via::Direct(d), out),
            None => {
                for a in cands {
                    if self.may_send_direct(id, a, now) {
                        self.send_edge_packet(now, id, &b, Via::Direct(a), out);
                    }
                }
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Status

    /// Status document (datapath fields are filled in by the caller).
    pub fn status(&self, now: Instant) -> EdgeStatus {
        let mut peers: Vec<PeerStatus> = self
            .peers
            .values()
            .map(|p| {
                let (path, endpoint, reason) = match (p.direct, &p.cur) {
                    (Some(d), Some(_)) => (
                        "direct",
                        d.to_string(),
                        "probe replies arrive on the direct address".to_string(),
                    ),
                    (_, cur) => {
                        let sn = self.relay_sn(p.listed_by, p.relay_rx_sn, now);
                        let why = if cur.is_none() {
                            if p.pending.is_some() {
                                "handshake in progress; frames go through the supernode".to_string()
                            } else {
                                "no session yet; frames go through the supernode".to_string()
                            }
                        } else if p.direct_lost {
                            "direct path lost (no probe reply); relaying and retrying direct"
                                .to_string()
                        } else {
                            format!(
                                "no direct path yet; probing {} candidate address(es)",
                                p.candidates(&self.overlay_nets).len()
                            )
                        };
                        ("relayed", sn.to_string(), why)
                    }
                };
                PeerStatus {
                    name: p.name.clone(),
                    id: hex(&p.id),
                    endpoint,
                    path: path.to_string(),
                    path_reason: reason,
                    rtt_ms: p.rtt.map(|r| r.as_secs_f64() * 1e3),
                    session: p.cur.is_some(),
                    session_age_s: p
                        .cur
                        .as_ref()
                        .map(|s| now.saturating_duration_since(s.created).as_secs()),
                    tx_bytes: p.stats.tx_bytes,
                    rx_bytes: p.stats.rx_bytes,
                    tx_packets: p.stats.tx_packets,
                    rx_packets: p.stats.rx_packets,
                    handshakes: p.handshakes,
                }
            })
            .collect();
        peers.sort_by(|a, b| a.name.cmp(&b.name).then(a.id.cmp(&b.id)));
        let mut macs: Vec<MacStatus> = self
            .macs
            .iter()
            .map(|(m, (pid, _))| MacStatus {
                mac: m.to_string(),
                peer: self
                    .peers
                    .get(pid)
                    .map(|p| p.name.clone())
                    .unwrap_or_else(|| hex(pid)),
            })
            .collect();
        macs.sort_by(|a, b| a.mac.cmp(&b.mac));
        EdgeStatus {
            name: self.cfg.name.clone(),
            community: self.cfg.community.clone(),
            id: hex(&self.id),
            cipher: self.cfg.cipher.name().into(),
            datapath: String::new(),
            datapath_reason: String::new(),
            io: String::new(),
            tap: String::new(),
            mtu: 0,
            listen: String::new(),
            uptime_s: now.saturating_duration_since(self.started).as_secs(),
            supernodes: self
                .sns
                .iter()
                .enumerate()
                .map(|(i, s)| SupernodeLink {
                    addr: s.addr.to_string(),
                    state: if self.sn_up(i, now) { "up" } else { "down" }.into(),
                    observed: s.observed.map(|a| a.to_string()),
                    last_ack_ms: s
                        .last_ack
                        .map(|t| now.saturating_duration_since(t).as_millis() as u64),
                    key: s.key.map(|k| snkey::to_hex(&k)),
                    key_source: match (s.pinned, s.key.is_some()) {
                        (true, _) => "pinned",
                        (false, true) => "first-use",
                        (false, false) => "none",
                    }
                    .into(),
                })
                .collect(),
            peers,
            macs,
            tap_rx_frames: self.tap_rx,
            tap_tx_frames: self.tap_tx,
            flooded_frames: self.flooded,
            udp_rx_packets: self.udp_rx,
            udp_tx_packets: self.udp_tx,
            drops: self
                .drops
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            threads: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let mut e = EdgeCore::new(
            EdgeConfig {
                name: "e".into(),
                community: "c".into(),
                secret: b"s".to_vec(),
                cipher: Cipher::Aes256Gcm,
                supernodes: vec!["198.18.0.1:7654".parse().unwrap()],
                local_addrs: vec![],
                timers: Timers::default(),
                max_peers: 4,
                max_macs: 4,
            },
            now,
        )
        .unwrap();
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
        assert_eq!(e.drops.get("path_inside_overlay"), Some(&1));
    }
}
