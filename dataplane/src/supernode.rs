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
use ring::signature::{UnparsedPublicKey, ED25519};

use crate::outbox::Outbox;
use crate::snkey::{CookieJar, SupernodeKey};
use crate::status::{hex, CommunityStatus, RegisteredEdge, SupernodeStatus};
use crate::wire::{
    self, CommunityId, Cookie, EdgeId, MsgType, PeerEntry, PeerInfo, Register, RegisterAck,
    RelayHdr, MAX_PEERS_PER_INFO,
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
    /// When it was last sent the complete list.
    last_full: Instant,
}

#[derive(Debug, Default)]
struct Community {
    edges: HashMap<EdgeId, Edge>,
}

/// The complete peer list goes to a registering edge at most this often when nothing
/// about it changed (edges check a relaying supernode with early registrations).
const FULL_LIST_EVERY: Duration = Duration::from_secs(2);

/// Supernode settings.
#[derive(Clone, Debug)]
pub struct SupernodeConfig {
    /// Silent edges are forgotten after this long.
    pub edge_timeout: Duration,
    /// Most edges over all communities.
    pub max_edges: usize,
}

impl Default for SupernodeConfig {
    fn default() -> Self {
        Self {
            edge_timeout: Duration::from_secs(30),
            max_edges: 10_000,
        }
    }
}

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
    drops: BTreeMap<&'static str, u64>,
    /// Changes whenever an edge is added, removed or changes its registration.
    edges_generation: u64,
}

impl SupernodeCore {
    /// A supernode with no registrations, signing with `key`.
    pub fn new(cfg: SupernodeConfig, key: SupernodeKey, now: Instant) -> Self {
        let jar = CookieJar::new(&key);
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
            drops: BTreeMap::new(),
            edges_generation: 0,
        }
    }

    fn drop(&mut self, reason: &'static str) {
        *self.drops.entry(reason).or_insert(0) += 1;
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
        if UnparsedPublicKey::new(&ED25519, &v.msg.edge_key)
            .verify(v.signed, v.sig)
            .is_err()
        {
            return self.drop("bad_signature");
        }
        let m = v.msg;
        let id = edge_id_of(&m.edge_key);
        let is_new = !self
            .communities
            .get(&m.community)
            .is_some_and(|c| c.edges.contains_key(&id));
        if is_new && self.n_edges >= self.cfg.max_edges {
            return self.drop("table_full");
        }
        let comm = self.communities.entry(m.community).or_default();
        let changed;
        let send_full;
        match comm.edges.get_mut(&id) {
            Some(e) => {
                if e.key != m.edge_key {
                    return self.drop("id_conflict");
                }
                if m.seq <= e.seq {
                    return self.drop("stale_register");
                }
                changed = e.observed != src || e.local_addrs != m.local_addrs || e.name != m.name;
                e.observed = src;
                e.local_addrs = m.local_addrs;
                e.name = m.name;
                e.last_seen = now;
                e.seq = m.seq;
                send_full =
                    changed || now.saturating_duration_since(e.last_full) >= FULL_LIST_EVERY;
                if send_full {
                    e.last_full = now;
                }
            }
            None => {
                changed = true;
                send_full = true;
                comm.edges.insert(
                    id,
                    Edge {
                        key: m.edge_key,
                        name: m.name,
                        observed: src,
                        local_addrs: m.local_addrs,
                        last_seen: now,
                        seq: m.seq,
                        last_full: now,
                    },
                );
                self.n_edges += 1;
            }
        }
        self.registrations += 1;
        if changed {
            self.edges_generation += 1;
        }
        let lifetime = self.cfg.edge_timeout.as_secs().min(u16::MAX as u64) as u16;
        let ack = RegisterAck {
            community: m.community,
            edge: id,
            seq: m.seq,
            observed: src,
            lifetime_secs: lifetime,
            cookie: self.jar.make(age, &src),
            sn_key: self.key.public(),
        };
        let mut b = out.take();
        match ack
            .encode_unsigned(&mut b)
            .ok()
            .and_then(|n| self.key.sign_into(&mut b, n))
        {
            Some(n) => out.push_udp(src, b, 0, n),
            None => out.give(b, false),
        }
        let comm = &self.communities[&m.community];
        let key = &self.key;
        // The complete list of the others to the registering edge.
        let others: Vec<PeerEntry> = if send_full {
            comm.edges
                .iter()
                .filter(|(k, _)| **k != id)
                .map(|(k, e)| entry(k, e))
                .collect()
        } else {
            Vec::new()
        };
        for chunk in others.chunks(MAX_PEERS_PER_INFO) {
            let info = PeerInfo {
                community: m.community,
                full: true,
                dst: id,
                seq: m.seq,
                peers: chunk.to_vec(),
            };
            send_info(out, key, src, &info);
        }
        // The news about this edge to the others (all registered from validated addresses).
        if changed {
            let me = entry(&id, &comm.edges[&id]);
            for (k, e) in &comm.edges {
                if *k != id {
                    let info = PeerInfo {
                        community: m.community,
                        full: false,
                        dst: *k,
                        seq: e.seq,
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

    /// Expires silent edges.
    pub fn poll(&mut self, now: Instant) {
        let timeout = self.cfg.edge_timeout;
        let mut removed = 0;
        for c in self.communities.values_mut() {
            let before = c.edges.len();
            c.edges
                .retain(|_, e| now.saturating_duration_since(e.last_seen) < timeout);
            removed += before - c.edges.len();
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
