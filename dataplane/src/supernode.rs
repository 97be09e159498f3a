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
//!
//! Peer information costs one signature per message, not per receiver: the changes of a
//! community are gathered for [`SupernodeConfig::announce_delay`] and then sent, signed
//! once, to every member; a complete list is signed once per community version and the
//! same parts go to every edge that registers while that version is current. What makes
//! such shared messages safe to accept is the supernode's random epoch and the version
//! (edges only move forward, see `docs/PROTOCOL.md` and `docs/THREAT-MODEL.md`).

use std::collections::{BTreeMap, HashSet};
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
    /// Joined or changed since the last announcement (listed in `Community::pending`).
    pending: bool,
}

#[derive(Debug, Default)]
struct Community {
    edges: HashMap<EdgeId, Edge>,
    /// Version of the peer list: one more with every message of changes or departures.
    version: u64,
    /// Edges that joined or changed since the last announcement, in order.
    pending: Vec<EdgeId>,
    /// The complete list at `version`, signed (one datagram per part), made when the first
    /// edge needs it and kept until the version changes or the next poll.
    list: Option<Vec<Vec<u8>>>,
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
    /// Joins and address changes are gathered this long after the first one, then
    /// announced to every member in messages signed once each (a registration storm costs
    /// a few signatures per window, not one per member and join).
    pub announce_delay: Duration,
    /// Prompts to register (a cookie message with [`wire::PROMPT_SEQ`]) sent per second
    /// at most, in answer to relayed traffic from edges not in the table (after a restart,
    /// a new NAT mapping); one per source address per 100 ms at most. More are counted
    /// (`prompts_limited`), not sent. 0: no prompts.
    pub prompts_per_s: u32,
}

impl Default for SupernodeConfig {
    fn default() -> Self {
        Self {
            edge_timeout: Duration::from_secs(30),
            max_edges: 10_000,
            new_per_s: 5_000,
            announce_delay: Duration::from_millis(100),
            prompts_per_s: 2_000,
        }
    }
}

/// Admission and prompts are counted in slots of this length (`new_per_s / 10` and
/// `prompts_per_s / 10` per slot).
const ADMIT_SLOT: Duration = Duration::from_millis(100);

/// What one [`ADMIT_SLOT`] of the supernode's age has used of a budget of `per_s / 10`.
#[derive(Debug, Default)]
struct SlotBudget {
    slot: u64,
    used: u32,
}

impl SlotBudget {
    /// Moves to the slot `age` falls in (its budget unused when it is a new one); whether
    /// it is a new one.
    fn enter(&mut self, age: Duration) -> bool {
        let slot = (age.as_millis() / ADMIT_SLOT.as_millis()) as u64;
        let new = slot != self.slot;
        if new {
            *self = SlotBudget { slot, used: 0 };
        }
        new
    }

    /// Whether the slot has room for one more of `per_s` per second.
    fn has_room(&self, per_s: u32) -> bool {
        self.used < per_s.div_ceil(10)
    }
}

/// The supernode state machine.
#[derive(Debug)]
pub struct SupernodeCore {
    cfg: SupernodeConfig,
    key: SupernodeKey,
    jar: CookieJar,
    cookies_sent: u64,
    /// Prompts to register sent, and those left out by the rate limits.
    prompts_sent: u64,
    prompts_limited: u64,
    /// Prompts sent in the current slot, and their addresses (at most `prompts_per_s /
    /// 10`: the set is bounded by the global limit).
    prompt_slot: SlotBudget,
    prompted: HashSet<SocketAddr>,
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
    /// New registrations admitted in the current slot.
    admit: SlotBudget,
    drops: BTreeMap<&'static str, u64>,
    /// Changes whenever an edge is added, removed or changes its registration.
    edges_generation: u64,
    /// Random, drawn at start: in every acknowledgement and peer-information message.
    epoch: u64,
    /// When the gathered changes are announced (`None`: none gathered).
    announce_at: Option<Instant>,
    /// Signatures made (acknowledgements and peer information).
    signatures: u64,
}

impl SupernodeCore {
    /// A supernode with no registrations, signing with `key`.
    pub fn new(cfg: SupernodeConfig, key: SupernodeKey, now: Instant) -> Self {
        let jar = CookieJar::new(&key);
        let mut v = [0u8; 16];
        // Without the system generator versions start at 1 and the epoch comes from the
        // clock's address space only: a restarted supernode may then take an edge's list
        // for current until the community changes, and old announcements may be replayed
        // to its edges (the generator does not fail on Linux; the key needed it too).
        let (version, epoch) = match SystemRandom::new().fill(&mut v) {
            Ok(()) => (
                u64::from_be_bytes(v[..8].try_into().unwrap_or_default()) >> 1,
                u64::from_be_bytes(v[8..].try_into().unwrap_or_default()),
            ),
            Err(_) => (1, 1),
        };
        Self {
            cfg,
            key,
            jar,
            cookies_sent: 0,
            prompts_sent: 0,
            prompts_limited: 0,
            prompt_slot: SlotBudget::default(),
            prompted: HashSet::new(),
            communities: HashMap::default(),
            n_edges: 0,
            started: now,
            registrations: 0,
            relayed_packets: 0,
            relayed_bytes: 0,
            version_base: version,
            admit: SlotBudget::default(),
            drops: BTreeMap::new(),
            edges_generation: 0,
            epoch,
            announce_at: None,
            signatures: 0,
        }
    }

    /// Signatures made since start (acknowledgements and peer information).
    pub fn signatures(&self) -> u64 {
        self.signatures
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
        self.admit.enter(age);
        if !self.admit.has_room(self.cfg.new_per_s) {
            return false;
        }
        self.admit.used += 1;
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
            MsgType::Relay => self.on_relay(now, src, pkt, out),
            MsgType::Bcast => self.on_bcast(now, src, pkt, out),
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
                    pending: Vec::new(),
                    list: None,
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
                        pending: false,
                    },
                );
                self.n_edges += 1;
            }
        }
        self.registrations += 1;
        if changed {
            self.edges_generation += 1;
        }
        let comm = &self.communities[&m.community];
        let version = comm.version;
        let lifetime = self.cfg.edge_timeout.as_secs().min(u16::MAX as u64) as u16;
        let ack = RegisterAck {
            community: m.community,
            edge: id,
            seq: m.seq,
            version,
            epoch: self.epoch,
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
            Some(n) => {
                out.push_udp(src, b, 0, n);
                self.signatures += 1;
            }
            None => out.give(b, false),
        }
        // The complete list, unless the edge holds the current one: an unchanged periodic
        // registration costs the acknowledgement only.
        if changed || m.known != version {
            let Some(comm) = self.communities.get_mut(&m.community) else {
                return;
            };
            if comm.list.is_none() {
                let list = signed_list(&self.key, &m.community, self.epoch, comm);
                self.signatures += list.len() as u64;
                comm.list = Some(list);
            }
            for part in comm.list.iter().flatten() {
                out.push_udp_copy(src, part);
            }
        }
        // The news about this edge goes to the others at the next announcement.
        if changed {
            if let Some(comm) = self.communities.get_mut(&m.community) {
                if let Some(e) = comm.edges.get_mut(&id) {
                    if !e.pending {
                        e.pending = true;
                        comm.pending.push(id);
                    }
                }
            }
            let at = now + self.cfg.announce_delay;
            self.announce_at = Some(self.announce_at.map_or(at, |t| t.min(at)));
        }
    }

    /// Source edge of a relayed packet (`trigger`), checked against the address it
    /// registered from. An edge not registered from `src` (the supernode restarted, or its
    /// NAT mapping changed) is prompted to register, so it does not wait for its next
    /// periodic registration while what it relays is dropped.
    fn check_src(
        &mut self,
        now: Instant,
        src: SocketAddr,
        community: &CommunityId,
        id: &EdgeId,
        trigger: &[u8],
        out: &mut Outbox,
    ) -> bool {
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
                self.prompt(now, src, id, trigger.len(), out);
                false
            }
        }
    }

    /// Sends `src` a prompt to register edge `id`: a cookie message with
    /// [`wire::PROMPT_SEQ`] and a cookie for `src`, never larger than the `trigger_len`
    /// bytes that caused it, and within the rate limits (else counted in
    /// `prompts_limited`). It holds nothing but what the sender named and a cookie for
    /// its own address: the registration it asks for is signed and checked as ever.
    fn prompt(
        &mut self,
        now: Instant,
        src: SocketAddr,
        id: &EdgeId,
        trigger_len: usize,
        out: &mut Outbox,
    ) {
        if self.cfg.prompts_per_s == 0 || trigger_len < wire::COOKIE_MSG_LEN {
            return;
        }
        let age = now.saturating_duration_since(self.started);
        if self.prompt_slot.enter(age) {
            self.prompted.clear();
        }
        if !self.prompt_slot.has_room(self.cfg.prompts_per_s) || !self.prompted.insert(src) {
            self.prompts_limited += 1;
            return;
        }
        self.prompt_slot.used += 1;
        let c = Cookie {
            edge: *id,
            seq: wire::PROMPT_SEQ,
            cookie: self.jar.make(age, &src),
        };
        let mut b = out.take();
        match c.encode(&mut b) {
            Ok(n) if n <= trigger_len => {
                out.push_udp(src, b, 0, n);
                self.prompts_sent += 1;
            }
            _ => out.give(b, false),
        }
    }

    /// Checks a relay packet and returns where to forward it unchanged (counted as
    /// relayed); `None` when it is dropped (counted) or is not a relay packet. A sender
    /// not registered from `src` may get a prompt to register in `out`.
    pub fn relay_target(
        &mut self,
        now: Instant,
        src: SocketAddr,
        pkt: &[u8],
        out: &mut Outbox,
    ) -> Option<SocketAddr> {
        let (h, _) = match RelayHdr::decode(pkt) {
            Ok(v) => v,
            Err(e) => {
                self.drop(e.reason());
                return None;
            }
        };
        if !self.check_src(now, src, &h.community, &h.src, pkt, out) {
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

    /// Where each datagram of a batch from `src` goes: `segment`-byte pieces of `buf`, as
    /// UDP GRO hands them over (one datagram when `segment` is `buf`'s length). `targets`
    /// gets one entry per datagram: the relay target of a Relay that passes
    /// [`SupernodeCore::relay_target`], `None` for anything else, which is handled as by
    /// [`SupernodeCore::handle`] (answers in `out`). Each datagram is checked on its own:
    /// a batch may mix headers.
    pub fn relay_batch(
        &mut self,
        now: Instant,
        src: SocketAddr,
        (buf, segment): (&[u8], usize),
        out: &mut Outbox,
        targets: &mut Vec<Option<SocketAddr>>,
    ) {
        targets.clear();
        for p in buf.chunks(segment.max(1)) {
            if matches!(wire::peek_type(p), Ok(MsgType::Relay)) {
                targets.push(self.relay_target(now, src, p, out));
            } else {
                self.handle(now, src, p, out);
                targets.push(None);
            }
        }
    }

    fn on_relay(&mut self, now: Instant, src: SocketAddr, pkt: &[u8], out: &mut Outbox) {
        if let Some(d) = self.relay_target(now, src, pkt, out) {
            out.push_udp_copy(d, pkt);
        }
    }

    fn on_bcast(&mut self, now: Instant, src: SocketAddr, pkt: &[u8], out: &mut Outbox) {
        let v = match wire::decode_bcast(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.reason()),
        };
        if !self.check_src(now, src, &v.community, &v.src, pkt, out) {
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

    /// Expires silent edges and announces what changed: the departures at once, the
    /// joins and address changes gathered since the first of them when
    /// [`SupernodeConfig::announce_delay`] has passed. Each message (at most
    /// [`MAX_PEERS_PER_INFO`] entries) takes the community one version on, is signed once
    /// and goes as the same bytes to every member.
    pub fn poll(&mut self, now: Instant, out: &mut Outbox) {
        let timeout = self.cfg.edge_timeout;
        let announce = self.announce_at.is_some_and(|t| t <= now);
        if announce {
            self.announce_at = None;
        }
        let mut removed = 0;
        for (cid, c) in self.communities.iter_mut() {
            // Lists are kept for the registrations of one poll interval at most.
            c.list = None;
            let mut gone = Vec::new();
            c.edges.retain(|k, e| {
                let keep = now.saturating_duration_since(e.last_seen) < timeout;
                if !keep {
                    gone.push(entry(k, e));
                }
                keep
            });
            removed += gone.len();
            for chunk in gone.chunks(MAX_PEERS_PER_INFO) {
                self.signatures +=
                    announce_to_all(&self.key, self.epoch, *cid, c, InfoKind::Gone, chunk, out);
            }
            if !announce || c.pending.is_empty() {
                continue;
            }
            let mut changed = Vec::with_capacity(c.pending.len());
            for id in std::mem::take(&mut c.pending) {
                if let Some(e) = c.edges.get_mut(&id) {
                    e.pending = false;
                    changed.push(entry(&id, e));
                }
            }
            for chunk in changed.chunks(MAX_PEERS_PER_INFO) {
                self.signatures +=
                    announce_to_all(&self.key, self.epoch, *cid, c, InfoKind::Update, chunk, out);
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
    /// expires, or the gathered changes are due to be announced (cookie secrets change as
    /// cookies are made and checked).
    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self
            .communities
            .values()
            .flat_map(|c| c.edges.values())
            .map(|e| e.last_seen + self.cfg.edge_timeout)
            .min();
        match (expiry, self.announce_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When [`SupernodeCore::poll`] is due to announce the gathered joins and changes
    /// (`None`: nothing gathered). A cheap check, unlike [`SupernodeCore::poll_timeout`],
    /// which looks at every edge.
    pub fn announce_at(&self) -> Option<Instant> {
        self.announce_at
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
            prompts_sent: self.prompts_sent,
            prompts_limited: self.prompts_limited,
            key: self.key.public_hex(),
            relayed_packets: self.relayed_packets,
            relayed_bytes: self.relayed_bytes,
            // The event loop knows its sends.
            relay_sends: 0,
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

/// Signs `info` into a datagram of its own (`None`: it does not encode).
fn sign_info(key: &SupernodeKey, info: &PeerInfo) -> Option<Vec<u8>> {
    // The largest message: 16 entries of a 32-byte name and 9 IPv6 addresses.
    let mut b = vec![0u8; 4096];
    let n = info.encode_unsigned(&mut b).ok()?;
    let n = key.sign_into(&mut b, n)?;
    b.truncate(n);
    // Complete lists are kept until the version changes: no room left over.
    b.shrink_to_fit();
    Some(b)
}

/// The complete list of community `c` at its current version, each part signed.
fn signed_list(key: &SupernodeKey, cid: &CommunityId, epoch: u64, c: &Community) -> Vec<Vec<u8>> {
    let all: Vec<PeerEntry> = c.edges.iter().map(|(k, e)| entry(k, e)).collect();
    let parts = all.len().div_ceil(MAX_PEERS_PER_INFO).max(1);
    let parts = u16::try_from(parts).unwrap_or(u16::MAX);
    // An empty list still has one (empty) part: it carries the version.
    let mut chunks = all.chunks(MAX_PEERS_PER_INFO);
    (0..parts)
        .filter_map(|part| {
            let info = PeerInfo {
                community: *cid,
                kind: InfoKind::Full,
                epoch,
                version: c.version,
                part,
                parts,
                peers: chunks.next().map(<[PeerEntry]>::to_vec).unwrap_or_default(),
            };
            sign_info(key, &info)
        })
        .collect()
}

/// Takes community `c` one version on with `entries` (changes or departures): one
/// signature, the same bytes to every member. Returns the signatures made.
fn announce_to_all(
    key: &SupernodeKey,
    epoch: u64,
    cid: CommunityId,
    c: &mut Community,
    kind: InfoKind,
    entries: &[PeerEntry],
    out: &mut Outbox,
) -> u64 {
    c.version = next_version(c.version);
    c.list = None;
    let info = PeerInfo {
        community: cid,
        kind,
        epoch,
        version: c.version,
        part: 0,
        parts: 1,
        peers: entries.to_vec(),
    };
    let Some(bytes) = sign_info(key, &info) else {
        return 0;
    };
    // In address order, not the table's (seeded) order: a run repeats itself.
    let mut to: Vec<SocketAddr> = c.edges.values().map(|e| e.observed).collect();
    to.sort_unstable();
    for a in to {
        out.push_udp_copy(a, &bytes);
    }
    1
}
