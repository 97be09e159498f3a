//! Supernode core: registrations per community, peer introduction, relay and fan-out,
//! expiry of silent edges. Pure: takes `now` and writes datagrams into an [`Outbox`].
//!
//! The supernode never holds a community secret: it sees community ids, edge ids and
//! addresses, and forwards encrypted packets unchanged.
//!
//! It sends nothing but one small cookie message to an address that has not proven it
//! receives (see `snkey`): registrations are recorded, acknowledged and fanned out only
//! when they carry a valid cookie for their source address, so every address the
//! supernode sends lists, relays or broadcasts to has answered it. Acknowledgements and
//! peer lists are signed with the supernode's key.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

// Looked up for every packet: a seeded fast hash instead of SipHash.
use foldhash::HashMap;
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{UnparsedPublicKey, ED25519};

use crate::outbox::Outbox;
use crate::snkey::{CookieJar, SupernodeKey};
use crate::status::{hex, CommunityStatus, RegisteredEdge, SupernodeStatus};
use crate::wire::{
    self, CommunityId, Cookie, EdgeId, InfoKind, MsgType, PeerEntry, PeerInfo, Register,
    RegisterAck, RelayHdr, MAX_PEERS_PER_INFO,
};

/// Edge id of a registration key: the first 8 bytes of its SHA-256.
pub fn edge_id_of(key: &[u8; 32]) -> EdgeId {
    let d = ring::digest::digest(&ring::digest::SHA256, key);
    let mut id = [0u8; 8];
    id.copy_from_slice(&d.as_ref()[..8]);
    id
}

#[derive(Debug)]
struct Edge {
    key: [u8; 32],
    name: String,
    observed: SocketAddr,
    local_addrs: Vec<SocketAddr>,
    last_seen: Instant,
    seq: u64,
}

#[derive(Debug, Default)]
struct Community {
    edges: HashMap<EdgeId, Edge>,
    /// Version of the peer list: changes with every join, address change and departure.
    version: u64,
}

/// Supernode settings.
#[derive(Clone, Debug)]
pub struct SupernodeConfig {
    /// Silent edges are forgotten after this long.
    pub edge_timeout: Duration,
    /// Most edges over all communities.
    pub max_edges: usize,
    /// Registrations of edges not in the table admitted per second (each costs a
    /// signature check and a complete list); more are dropped (`overload`) and the edges
    /// retry with backoff. Refreshes of registered edges are always admitted. 0: no limit.
    pub new_per_s: u32,
}

impl Default for SupernodeConfig {
    fn default() -> Self {
        Self {
            edge_timeout: Duration::from_secs(30),
            max_edges: 10_000,
            new_per_s: 5_000,
        }
    }
}

/// Admission is counted in slots of this length (`new_per_s / 10` per slot).
const ADMIT_SLOT: Duration = Duration::from_millis(100);

/// The supernode state machine.
#[derive(Debug)]
pub struct SupernodeCore {
    cfg: SupernodeConfig,
    key: SupernodeKey,
    jar: CookieJar,
    cookies_sent: u64,
    communities: HashMap<CommunityId, Community>,
    n_edges: usize,
    started: Instant,
    registrations: u64,
    relayed_packets: u64,
    relayed_bytes: u64,
    /// First peer-list version of the community made last: each new community starts
    /// 2^32 further (its changes count up by one from there), so no version repeats while
    /// this core lives; the first one is random, so one from before a restart is not
    /// taken for current.
    version_base: u64,
    /// Admission slot (index since start) and the new registrations admitted in it.
    admit: (u64, u32),
    drops: BTreeMap<&'static str, u64>,
    /// Changes whenever an edge is added, removed or changes its registration.
    edges_generation: u64,
}

impl SupernodeCore {
    /// A supernode with no registrations, signing with `key`.
    pub fn new(cfg: SupernodeConfig, key: SupernodeKey, now: Instant) -> Self {
        let jar = CookieJar::new(&key);
        let mut v = [0u8; 8];
        // Without the system generator versions start at 1: a restarted supernode may then
        // take an edge's list for current until the community changes.
        let version = match SystemRandom::new().fill(&mut v) {
            Ok(()) => u64::from_be_bytes(v) >> 1,
            Err(_) => 1,
        };
        Self {
            cfg,
            key,
            jar,
            cookies_sent: 0,
            communities: HashMap::default(),
            n_edges: 0,
            started: now,
            registrations: 0,
            relayed_packets: 0,
            relayed_bytes: 0,
            version_base: version,
            admit: (0, 0),
            drops: BTreeMap::new(),
            edges_generation: 0,
        }
    }

    fn drop(&mut self, reason: &'static str) {
        *self.drops.entry(reason).or_insert(0) += 1;
    }

    /// The first peer-list version of a new community (never [`wire::NO_LIST`]).
    fn new_base(&mut self) -> u64 {
        self.version_base = self.version_base.wrapping_add(1 << 32);
        if self.version_base == wire::NO_LIST {
            self.version_base = 1;
        }
        self.version_base
    }

    /// Whether one more registration of an edge not in the table fits this slot.
    fn admit_new(&mut self, age: Duration) -> bool {
        if self.cfg.new_per_s == 0 {
            return true;
        }
        let slot = (age.as_millis() / ADMIT_SLOT.as_millis()) as u64;
        if self.admit.0 != slot {
            self.admit = (slot, 0);
        }
        let per_slot = self.cfg.new_per_s.div_ceil(10);
        if self.admit.1 >= per_slot {
            return false;
        }
        self.admit.1 += 1;
        true
    }

    /// Edges registered, over all communities.
    pub fn edge_count(&self) -> usize {
        self.n_edges
    }

    /// The supernode's public key (what edges pin).
    pub fn public_key(&self) -> [u8; wire::SN_KEY_LEN] {
        self.key.public()
    }

    /// Handles one datagram from `src`.
    pub fn handle(&mut self, now: Instant, src: SocketAddr, pkt: &[u8], out: &mut Outbox) {
        let t = match wire::peek_type(pkt) {
            Ok(t) => t,
            Err(e) => return self.drop(e.reason()),
        };
        match t {
            MsgType::Register => self.on_register(now, src, pkt, out),
            MsgType::Relay => self.on_relay(src, pkt, out),
            MsgType::Bcast => self.on_bcast(src, pkt, out),
            _ => self.drop("unexpected_type"),
        }
    }

    fn on_register(&mut self, now: Instant, src: SocketAddr, pkt: &[u8], out: &mut Outbox) {
        let v = match Register::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        let age = now.saturating_duration_since(self.started);
        if !self.jar.check(age, &src, &v.msg.cookie) {
            // The source may be spoofed: one datagram, smaller than the request, and no
            // state, no signature check, nothing for anyone else.
            let c = Cookie {
                edge: edge_id_of(&v.msg.edge_key),
                seq: v.msg.seq,
                cookie: self.jar.make(age, &src),
            };
            let mut b = out.take();
            match c.encode(&mut b) {
                Ok(n) if n <= pkt.len() => {
                    out.push_udp(src, b, 0, n);
                    self.cookies_sent += 1;
                }
                _ => out.give(b, false),
            }
            return;
        }
        let id = edge_id_of(&v.msg.edge_key);
        // Known edges (in the table under this key) first: a new one is refused before any
        // public-key work when the table is full or this slot's admissions are used up.
        let known = self
            .communities
            .get(&v.msg.community)
            .and_then(|c| c.edges.get(&id))
            .map(|e| e.key == v.msg.edge_key);
        match known {
            Some(false) => return self.drop("id_conflict"),
            Some(true) => {}
            None if self.n_edges >= self.cfg.max_edges => return self.drop("table_full"),
            None if !self.admit_new(age) => return self.drop("overload"),
            None => {}
        }
        if UnparsedPublicKey::new(&ED25519, &v.msg.edge_key)
            .verify(v.signed, v.sig)
            .is_err()
        {
            return self.drop("bad_signature");
        }
        let m = v.msg;
        if !self.communities.contains_key(&m.community) {
            let base = self.new_base();
            self.communities.insert(
                m.community,
                Community {
                    edges: HashMap::default(),
                    version: base,
                },
            );
        }
        let Some(comm) = self.communities.get_mut(&m.community) else {
            return;
        };
        let changed;
        match comm.edges.get_mut(&id) {
            Some(e) => {
                if m.seq <= e.seq {
                    return self.drop("stale_register");
                }
                changed = e.observed != src || e.local_addrs != m.local_addrs || e.name != m.name;
                e.observed = src;
                e.local_addrs = m.local_addrs;
                e.name = m.name;
                e.last_seen = now;
                e.seq = m.seq;
            }
            None => {
                changed = true;
                comm.edges.insert(
                    id,
                    Edge {
                        key: m.edge_key,
                        name: m.name,
                        observed: src,
                        local_addrs: m.local_addrs,
                        last_seen: now,
                        seq: m.seq,
                    },
                );
                self.n_edges += 1;
            }
        }
        self.registrations += 1;
        if changed {
            self.edges_generation += 1;
            if let Some(c) = self.communities.get_mut(&m.community) {
                c.version = next_version(c.version);
            }
        }
        let comm = &self.communities[&m.community];
        let version = comm.version;
        let lifetime = self.cfg.edge_timeout.as_secs().min(u16::MAX as u64) as u16;
        let ack = RegisterAck {
            community: m.community,
            edge: id,
            seq: m.seq,
            version,
            observed: src,
            lifetime_secs: lifetime,
            cookie: self.jar.make(age, &src),
            sn_key: self.key.public(),
        };
        let comm = &self.communities[&m.community];
        let key = &self.key;
        let mut b = out.take();
        match ack
            .encode_unsigned(&mut b)
            .ok()
            .and_then(|n| key.sign_into(&mut b, n))
        {
            Some(n) => out.push_udp(src, b, 0, n),
            None => out.give(b, false),
        }
        // The complete list of the others, unless the edge holds the current one: an
        // unchanged periodic registration costs the acknowledgement only.
        if changed || m.known != version {
            let others: Vec<PeerEntry> = comm
                .edges
                .iter()
                .filter(|(k, _)| **k != id)
                .map(|(k, e)| entry(k, e))
                .collect();
            let parts = others.len().div_ceil(MAX_PEERS_PER_INFO).max(1);
            let parts = u16::try_from(parts).unwrap_or(u16::MAX);
            // An empty community still gets one (empty) part: it carries the version.
            let mut chunks = others.chunks(MAX_PEERS_PER_INFO);
            for part in 0..parts {
                let info = PeerInfo {
                    community: m.community,
                    kind: InfoKind::Full,
                    dst: id,
                    seq: m.seq,
                    version,
                    part,
                    parts,
                    peers: chunks.next().map(<[PeerEntry]>::to_vec).unwrap_or_default(),
                };
                send_info(out, key, src, &info);
            }
        }
        // The news about this edge to the others (all registered from validated addresses).
        if changed {
            let me = entry(&id, &comm.edges[&id]);
            for (k, e) in &comm.edges {
                if *k != id {
                    let info = PeerInfo {
                        community: m.community,
                        kind: InfoKind::Update,
                        dst: *k,
                        seq: e.seq,
                        version,
                        part: 0,
                        parts: 1,
                        peers: vec![me.clone()],
                    };
                    send_info(out, key, e.observed, &info);
                }
            }
        }
    }

    /// Source edge of a relayed packet, checked against the address it registered from.
    fn check_src(&mut self, src: SocketAddr, community: &CommunityId, id: &EdgeId) -> bool {
        let ok = match self.communities.get(community) {
            None => Err("unknown_community"),
            Some(c) => match c.edges.get(id) {
                Some(e) if e.observed == src => Ok(()),
                Some(_) => Err("relay_src_mismatch"),
                None => Err("relay_unknown_src"),
            },
        };
        match ok {
            Ok(()) => true,
            Err(r) => {
                self.drop(r);
                false
            }
        }
    }

    /// Checks a relay packet and returns where to forward it unchanged (counted as
    /// relayed); `None` when it is dropped (counted) or is not a relay packet.
    pub fn relay_target(&mut self, src: SocketAddr, pkt: &[u8]) -> Option<SocketAddr> {
        let (h, _) = match RelayHdr::decode(pkt) {
            Ok(v) => v,
            Err(e) => {
                self.drop(e.reason());
                return None;
            }
        };
        if !self.check_src(src, &h.community, &h.src) {
            return None;
        }
        let dst = self.communities[&h.community]
            .edges
            .get(&h.dst)
            .map(|e| e.observed);
        match dst {
            Some(d) if h.dst != h.src => {
                self.relayed_packets += 1;
                self.relayed_bytes += pkt.len() as u64;
                Some(d)
            }
            _ => {
                self.drop("relay_unknown_dst");
                None
            }
        }
    }

    fn on_relay(&mut self, src: SocketAddr, pkt: &[u8], out: &mut Outbox) {
        let (h, _) = match RelayHdr::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        if !self.check_src(src, &h.community, &h.src) {
            return;
        }
        let dst = self.communities[&h.community]
            .edges
            .get(&h.dst)
            .map(|e| e.observed);
        match dst {
            Some(d) if h.dst != h.src => {
                out.push_udp_copy(d, pkt);
                self.relayed_packets += 1;
                self.relayed_bytes += pkt.len() as u64;
            }
            _ => self.drop("relay_unknown_dst"),
        }
    }

    fn on_bcast(&mut self, src: SocketAddr, pkt: &[u8], out: &mut Outbox) {
        let v = match wire::decode_bcast(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        if !self.check_src(src, &v.community, &v.src) {
            return;
        }
        let c = &self.communities[&v.community];
        let mut n = 0u64;
        if v.dsts.is_empty() {
            for (k, e) in &c.edges {
                if *k != v.src {
                    out.push_udp_copy(e.observed, pkt);
                    n += 1;
                }
            }
        } else {
            for d in &v.dsts {
                if *d == v.src {
                    continue;
                }
                if let Some(e) = c.edges.get(d) {
                    out.push_udp_copy(e.observed, pkt);
                    n += 1;
                }
            }
        }
        self.relayed_packets += n;
        self.relayed_bytes += n * pkt.len() as u64;
    }

    /// Expires silent edges and tells the rest of each community which left (one
    /// message per remaining member, the departures in it).
    pub fn poll(&mut self, now: Instant, out: &mut Outbox) {
        let timeout = self.cfg.edge_timeout;
        let mut removed = 0;
        for (cid, c) in self.communities.iter_mut() {
            let mut gone = Vec::new();
            c.edges.retain(|k, e| {
                let keep = now.saturating_duration_since(e.last_seen) < timeout;
                if !keep {
                    gone.push(entry(k, e));
                }
                keep
            });
            if gone.is_empty() {
                continue;
            }
            removed += gone.len();
            // One version per message, so a receiver that misses one notices.
            for chunk in gone.chunks(MAX_PEERS_PER_INFO) {
                c.version = next_version(c.version);
                let version = c.version;
                for (k, e) in &c.edges {
                    let info = PeerInfo {
                        community: *cid,
                        kind: InfoKind::Gone,
                        dst: *k,
                        seq: e.seq,
                        version,
                        part: 0,
                        parts: 1,
                        peers: chunk.to_vec(),
                    };
                    send_info(out, &self.key, e.observed, &info);
                }
            }
        }
        self.communities.retain(|_, c| !c.edges.is_empty());
        self.n_edges -= removed;
        if removed > 0 {
            self.edges_generation += 1;
        }
    }

    /// A number that changes whenever [`SupernodeCore::registered_edges`] does
    /// (an edge added, expired, or registered from another address).
    pub fn edges_generation(&self) -> u64 {
        self.edges_generation
    }

    /// Every registered edge: community, id and the address it registered
    /// from (what relayed packets must come from and go to).
    pub fn registered_edges(&self) -> impl Iterator<Item = (&CommunityId, &EdgeId, SocketAddr)> {
        self.communities
            .iter()
            .flat_map(|(c, comm)| comm.edges.iter().map(move |(id, e)| (c, id, e.observed)))
    }

    /// When [`SupernodeCore::poll`] must run next: when the edge heard from longest ago
    /// expires (its only timer; cookie secrets change as cookies are made and checked).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.communities
            .values()
            .flat_map(|c| c.edges.values())
            .map(|e| e.last_seen + self.cfg.edge_timeout)
            .min()
    }

    /// Status document.
    pub fn status(&self, now: Instant, listen: &str) -> SupernodeStatus {
        let mut communities: Vec<CommunityStatus> = self
            .communities
            .iter()
            .map(|(id, c)| {
                let mut edges: Vec<RegisteredEdge> = c
                    .edges
                    .iter()
                    .map(|(k, e)| RegisteredEdge {
                        name: e.name.clone(),
                        id: hex(k),
                        observed: e.observed.to_string(),
                        local_addrs: e.local_addrs.iter().map(|a| a.to_string()).collect(),
                        last_seen_ms: now.saturating_duration_since(e.last_seen).as_millis() as u64,
                    })
                    .collect();
                edges.sort_by(|a, b| a.name.cmp(&b.name));
                CommunityStatus { id: hex(id), edges }
            })
            .collect();
        communities.sort_by(|a, b| a.id.cmp(&b.id));
        SupernodeStatus {
            listen: listen.to_owned(),
            uptime_s: now.saturating_duration_since(self.started).as_secs(),
            communities,
            registrations: self.registrations,
            cookies_sent: self.cookies_sent,
            key: self.key.public_hex(),
            relayed_packets: self.relayed_packets,
            relayed_bytes: self.relayed_bytes,
            drops: self
                .drops
                .iter()
                .filter(|(_, v)| **v > 0)
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            xdp_relay: None,
        }
    }
}

/// The version after one change: one more, never [`wire::NO_LIST`] (edges take a change
/// that is exactly one more than what they hold).
fn next_version(v: u64) -> u64 {
    match v.wrapping_add(1) {
        wire::NO_LIST => 1,
        n => n,
    }
}

fn entry(id: &EdgeId, e: &Edge) -> PeerEntry {
    PeerEntry {
        id: *id,
        name: e.name.clone(),
        observed: e.observed,
        local_addrs: e.local_addrs.clone(),
    }
}

fn send_info(out: &mut Outbox, key: &SupernodeKey, dst: SocketAddr, info: &PeerInfo) {
    let mut b = out.take();
    match info
        .encode_unsigned(&mut b)
        .ok()
        .and_then(|n| key.sign_into(&mut b, n))
    {
        Some(n) => out.push_udp(dst, b, 0, n),
        None => out.give(b, false),
    }
}
