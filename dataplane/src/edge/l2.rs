//! The L2 control plane of an edge: MAC/IP bindings, announced to peers, ARP answered
//! locally, and limits on what is flooded across the WAN.
//!
//! - **Local bindings** (MAC, and IPv4 when known) are learned from frames of the TAP
//!   device: ARP packets (sender MAC and address), broadcast/multicast frames (MAC only),
//!   and a MAC that a peer held before (the VM moved here). They are announced to every
//!   peer with a session as Bindings control messages: the full set when a session comes
//!   up and every `announce_interval`, new ones at the next poll (at once).
//! - **Remote bindings** come from peers' announcements; they also point the MAC table
//!   at the peer, so unicast to an announced MAC is never flooded. A full set replaces
//!   what the peer announced before; a peer's bindings go when the peer expires, or when
//!   another edge of the same name (the same site restarted) brings up a session.
//! - An ARP request from the TAP device for an address bound behind a peer is answered
//!   here and never crosses the WAN; one for an address bound on our side is not
//!   forwarded (its owner answers on the local segment).
//! - Frames that would be flooded (broadcast, multicast, unknown unicast) pass a token
//!   bucket per source MAC, one per edge, and one of bytes per edge (so large frames
//!   cannot take a WAN link within the frame limits); over a limit they are dropped and
//!   counted (`flood_vm_limit`, `flood_edge_limit`, `flood_edge_bytes`).
//! - The first local VM that sends DHCP replies is this edge's bound DHCP server (until
//!   its local binding goes). Its broadcast replies (UDP 67 to 68) to a client whose
//!   place is known go to that client's peer only, as a unicast frame would; they are
//!   not charged to the VM's or the edge's flood limits but to their own bucket
//!   (`dhcp_reply_pps`), so one server can answer a whole cluster at once. Replies from
//!   any other VM (one that fakes being a server too), or to a client nobody knows, are
//!   flooded and limited as before (`dhcp_replies_steered`, `dhcp_reply_limit`).
//! - An address claimed by a second MAC while the first still holds it is a duplicate:
//!   counted, logged once per address, and the first binding kept.
//!
//! Per frame this costs a two-byte EtherType comparison for unicast frames and a hash
//! lookup or two for ARP and flooded frames.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};

use crate::eth::Mac;
use crate::l2::{
    self, Arp, Binding, Binding6, Bindings, Bindings6, Control, Groups, Nd, TokenBucket,
    ARP_REQUEST, MAX_BINDINGS, MAX_BINDINGS6, MAX_GROUPS,
};
use crate::outbox::Outbox;
use crate::status::L2Status;
use crate::wire::{EdgeId, MsgType};

use super::drops::DropReason;
use super::{EdgeCore, Map};

/// Settings of the L2 control plane.
#[derive(Clone, Debug)]
pub struct L2Config {
    /// Bindings announced, ARP and neighbour solicitations answered locally, multicast
    /// sent only where there are members (off: all of it is flooded).
    pub control: bool,
    /// Flooded frames per second from one source MAC (0: no limit).
    pub vm_flood_pps: u32,
    /// Flooded frames one source MAC may send at once after a quiet time.
    pub vm_flood_burst: u32,
    /// Flooded frames per second from this edge (0: no limit).
    pub edge_flood_pps: u32,
    /// Flooded frames this edge may send at once after a quiet time.
    pub edge_flood_burst: u32,
    /// Bytes of flooded frames per second from this edge (0: no limit); the frame limits
    /// alone would let large broadcast frames take a WAN link.
    pub edge_flood_bytes: u32,
    /// Bytes of flooded frames this edge may send at once after a quiet time.
    pub edge_flood_byte_burst: u32,
    /// Broadcast replies per second from this edge's bound DHCP server that go to the
    /// one peer behind which the client is (0: no limit); they are not charged to the
    /// flood limits above.
    pub dhcp_reply_pps: u32,
    /// Such replies this edge may send at once after a quiet time.
    pub dhcp_reply_burst: u32,
    /// Full set of local bindings re-announced this often (also when local bindings
    /// that were not seen for the MAC expiry time are forgotten).
    pub announce_interval: Duration,
}

impl Default for L2Config {
    fn default() -> Self {
        Self {
            control: true,
            vm_flood_pps: 100,
            vm_flood_burst: 200,
            edge_flood_pps: 2000,
            edge_flood_burst: 4000,
            edge_flood_bytes: 2_000_000,
            edge_flood_byte_burst: 2_000_000,
            dhcp_reply_pps: 1000,
            dhcp_reply_burst: 2000,
            announce_interval: Duration::from_secs(30),
        }
    }
}

/// Most source MACs with their own flood bucket (beyond: only the edge's bucket).
const MAX_VM_BUCKETS: usize = 4096;
/// Most addresses remembered as already reported duplicates.
const MAX_DUP_LOGGED: usize = 4096;
/// Most IPv6 addresses kept per MAC (a link-local one and a few others); a new one
/// beyond replaces the oldest.
const MAX_IP6_PER_MAC: usize = 8;
/// Most membership records read from one report.
const MAX_REPORT_RECORDS: usize = 64;
/// Most groups with local members tracked (beyond: peers are asked for everything).
const MAX_LOCAL_GROUPS: usize = 1024;
/// Most DHCP servers remembered (by MAC).
const MAX_DHCP_SERVERS: usize = 8;

struct Local {
    ip: Option<Ipv4Addr>,
    ip6: Vec<Ipv6Addr>,
    seen: Instant,
}

struct Remote {
    peer: EdgeId,
    ip: Option<Ipv4Addr>,
    ip6: Vec<Ipv6Addr>,
}

/// The control plane's tables and counters.
pub(super) struct L2 {
    pub(super) cfg: L2Config,
    local: Map<Mac, Local>,
    remote: Map<Mac, Remote>,
    /// Who holds each address (a MAC in `local` or `remote`).
    ips: Map<IpAddr, Mac>,
    vm_buckets: Map<Mac, TokenBucket>,
    edge_bucket: TokenBucket,
    edge_bytes: TokenBucket,
    /// Steered broadcast replies of local DHCP servers.
    dhcp_replies: TokenBucket,
    /// Local bindings learned since the last poll, announced by it.
    pending: Vec<Binding>,
    pending6: Vec<Binding6>,
    next_announce: Instant,
    dup_logged: Map<IpAddr, Mac>,
    /// Group MACs joined by local VMs, with their members.
    members: Map<Mac, Vec<Mac>>,
    /// More groups were joined than `members` holds: peers send us every group.
    groups_overflow: bool,
    /// The set of groups changed since the last poll.
    groups_changed: bool,
    /// What each peer announced it has members for (sorted; `None`: everything). A peer
    /// that never announced gets every multicast frame.
    peer_groups: Map<EdgeId, Option<Vec<Mac>>>,
    /// MACs that sent DHCP replies: where clients' broadcasts need to go.
    dhcp_servers: Vec<Mac>,
    /// The first local VM that sent DHCP replies while none other held the role: its
    /// steered replies are outside the flood limits.
    bound_server: Option<Mac>,
    stats: L2Status,
}

fn usable_v4(a: &Ipv4Addr) -> bool {
    !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast()
}

fn usable_v6(a: &Ipv6Addr) -> bool {
    !a.is_unspecified() && !a.is_multicast() && !a.is_loopback()
}

impl L2 {
    pub(super) fn new(cfg: L2Config, now: Instant, seed: u64) -> Self {
        let t = || foldhash::fast::FixedState::with_seed(seed);
        Self {
            edge_bucket: TokenBucket::new(cfg.edge_flood_burst, now),
            edge_bytes: TokenBucket::new(cfg.edge_flood_byte_burst, now),
            dhcp_replies: TokenBucket::new(cfg.dhcp_reply_burst, now),
            next_announce: now + cfg.announce_interval,
            cfg,
            local: Map::with_hasher(t()),
            remote: Map::with_hasher(t()),
            ips: Map::with_hasher(t()),
            vm_buckets: Map::with_hasher(t()),
            pending: Vec::new(),
            pending6: Vec::new(),
            dup_logged: Map::with_hasher(t()),
            members: Map::with_hasher(t()),
            groups_overflow: false,
            groups_changed: false,
            peer_groups: Map::with_hasher(t()),
            dhcp_servers: Vec::new(),
            bound_server: None,
            stats: L2Status::default(),
        }
    }

    fn holds(&self, mac: &Mac) -> bool {
        self.local.contains_key(mac) || self.remote.contains_key(mac)
    }

    /// Whether `mac` may take `ip`: false (counted, logged once) when another MAC that is
    /// still bound holds it.
    fn may_claim(&mut self, mac: Mac, ip: IpAddr) -> bool {
        match self.ips.get(&ip) {
            Some(m) if *m != mac && self.holds(m) => {
                let holder = *m;
                self.stats.duplicate_ip_claims += 1;
                if self.dup_logged.len() < MAX_DUP_LOGGED
                    && self.dup_logged.insert(ip, mac) != Some(mac)
                {
                    tracing::warn!(%ip, holder = %holder, claimant = %mac,
                        "duplicate IP address: claimed by a second MAC; the first binding is kept");
                }
                false
            }
            _ => true,
        }
    }

    fn release_ip(&mut self, mac: &Mac, ip: IpAddr) {
        if self.ips.get(&ip) == Some(mac) {
            self.ips.remove(&ip);
        }
    }

    fn release_all(&mut self, mac: &Mac, ip: Option<Ipv4Addr>, ip6: &[Ipv6Addr]) {
        if let Some(a) = ip {
            self.release_ip(mac, a.into());
        }
        for a in ip6 {
            self.release_ip(mac, (*a).into());
        }
    }

    fn drop_remote(&mut self, mac: &Mac) {
        if let Some(r) = self.remote.remove(mac) {
            self.release_all(mac, r.ip, &r.ip6);
        }
    }

    fn drop_local(&mut self, mac: &Mac) {
        if let Some(l) = self.local.remove(mac) {
            self.release_all(mac, l.ip, &l.ip6);
            self.leave_all(mac);
        }
    }

    /// Learns a local binding; queues it for announcement when new or changed. A MAC
    /// that moved here keeps the addresses its peer announced.
    fn bind_local(&mut self, now: Instant, mac: Mac, ip: Option<Ipv4Addr>, max: usize) {
        let ip = ip.filter(usable_v4);
        let new = !self.local.contains_key(&mac);
        if new {
            let moved = self.remote.remove(&mac);
            if self.local.len() >= max {
                if let Some(r) = moved {
                    self.release_all(&mac, r.ip, &r.ip6);
                }
                return;
            }
            let (ip0, ip6) = moved.map(|r| (r.ip, r.ip6)).unwrap_or_default();
            self.pending6
                .extend(ip6.iter().map(|a| Binding6 { mac, ip: *a }));
            self.local.insert(
                mac,
                Local {
                    ip: ip0,
                    ip6,
                    seen: now,
                },
            );
        }
        let Some(l) = self.local.get_mut(&mac) else {
            return;
        };
        l.seen = now;
        let old = l.ip;
        let mut now_ip = old;
        if let Some(a) = ip.filter(|a| old != Some(*a)) {
            if self.may_claim(mac, a.into()) {
                if let Some(o) = old {
                    self.release_ip(&mac, o.into());
                }
                self.ips.insert(a.into(), mac);
                now_ip = Some(a);
                if let Some(l) = self.local.get_mut(&mac) {
                    l.ip = now_ip;
                }
            }
        }
        if new || now_ip != old {
            self.pending.push(Binding { mac, ip: now_ip });
        }
    }

    /// Learns a local IPv6 binding (the MAC's binding first, as [`L2::bind_local`]).
    fn bind_local6(&mut self, now: Instant, mac: Mac, ip: Ipv6Addr, max: usize) {
        if !usable_v6(&ip) {
            return;
        }
        self.bind_local(now, mac, None, max);
        if self.local.get(&mac).is_none_or(|l| l.ip6.contains(&ip)) {
            return;
        }
        if !self.may_claim(mac, ip.into()) {
            return;
        }
        let Some(l) = self.local.get_mut(&mac) else {
            return;
        };
        let oldest = (l.ip6.len() >= MAX_IP6_PER_MAC).then(|| l.ip6.remove(0));
        l.ip6.push(ip);
        if let Some(o) = oldest {
            self.release_ip(&mac, o.into());
        }
        self.ips.insert(ip.into(), mac);
        self.pending6.push(Binding6 { mac, ip });
    }

    /// Applies one binding announced by `peer`; false when the table is full. A MAC
    /// announced without an address keeps the ones it had here (a VM that moved).
    fn bind_remote(&mut self, peer: EdgeId, b: Binding, max: usize) -> bool {
        if !self.remote.contains_key(&b.mac) {
            if self.remote.len() >= max {
                return false;
            }
            let (ip, ip6) = match self.local.remove(&b.mac) {
                Some(l) => {
                    self.leave_all(&b.mac);
                    (l.ip, l.ip6)
                }
                None => (None, Vec::new()),
            };
            self.remote.insert(b.mac, Remote { peer, ip, ip6 });
        }
        let Some(r) = self.remote.get_mut(&b.mac) else {
            return false;
        };
        r.peer = peer;
        let old = r.ip;
        if let Some(a) = b.ip.filter(|a| old != Some(*a)) {
            if self.may_claim(b.mac, a.into()) {
                if let Some(o) = old {
                    self.release_ip(&b.mac, o.into());
                }
                self.ips.insert(a.into(), b.mac);
                if let Some(r) = self.remote.get_mut(&b.mac) {
                    r.ip = Some(a);
                }
            }
        }
        true
    }

    /// Applies one IPv6 binding announced by `peer`; false when the table is full.
    fn bind_remote6(&mut self, peer: EdgeId, b: Binding6, max: usize) -> bool {
        let mac = b.mac;
        if !self.bind_remote(peer, Binding { mac, ip: None }, max) {
            return false;
        }
        if self.remote.get(&mac).is_some_and(|r| r.ip6.contains(&b.ip))
            || !self.may_claim(mac, b.ip.into())
        {
            return true;
        }
        let Some(r) = self.remote.get_mut(&mac) else {
            return true;
        };
        let oldest = (r.ip6.len() >= MAX_IP6_PER_MAC).then(|| r.ip6.remove(0));
        r.ip6.push(b.ip);
        if let Some(o) = oldest {
            self.release_ip(&mac, o.into());
        }
        self.ips.insert(b.ip.into(), mac);
        true
    }

    fn forget_peer(&mut self, peer: &EdgeId) {
        let gone: Vec<Mac> = self
            .remote
            .iter()
            .filter(|(_, r)| r.peer == *peer)
            .map(|(m, _)| *m)
            .collect();
        for m in gone {
            self.drop_remote(&m);
        }
    }

    /// The IPv6 addresses `peer` announced are forgotten (a full Bindings6 follows).
    fn forget_peer6(&mut self, peer: &EdgeId) {
        let mut gone = Vec::new();
        for (m, r) in self.remote.iter_mut().filter(|(_, r)| r.peer == *peer) {
            gone.extend(r.ip6.drain(..).map(|a| (*m, a)));
        }
        for (m, a) in gone {
            self.release_ip(&m, a.into());
        }
    }

    /// A local VM joined or left a group.
    fn membership(&mut self, vm: Mac, r: l2::Report) {
        let n = self.members.len();
        match self.members.get_mut(&r.group) {
            Some(v) if r.join && !v.contains(&vm) => v.push(vm),
            Some(_) if r.join => {}
            Some(v) => {
                v.retain(|m| *m != vm);
                if v.is_empty() {
                    self.members.remove(&r.group);
                    self.groups_changed = true;
                }
            }
            None if r.join && n < MAX_LOCAL_GROUPS => {
                self.members.insert(r.group, vec![vm]);
                self.groups_changed = true;
            }
            None if r.join => {
                self.groups_changed |= !self.groups_overflow;
                self.groups_overflow = true;
            }
            None => {}
        }
    }

    /// A local VM is gone (or moved away): it is no member of any group here.
    fn leave_all(&mut self, vm: &Mac) {
        let before = self.members.len();
        self.members.retain(|_, v| {
            v.retain(|m| m != vm);
            !v.is_empty()
        });
        if self.members.len() != before {
            self.groups_changed = true;
        }
    }

    /// The Groups message this edge announces.
    fn groups(&self) -> Groups {
        if self.groups_overflow || self.members.len() > MAX_GROUPS {
            return Groups {
                all: true,
                groups: Vec::new(),
            };
        }
        let mut groups: Vec<Mac> = self.members.keys().copied().collect();
        groups.sort_unstable();
        Groups { all: false, groups }
    }

    fn take(&mut self, now: Instant, src: Mac, len: usize) -> Result<(), DropReason> {
        let c = &self.cfg;
        let (vr, vb, er, eb) = (
            c.vm_flood_pps,
            c.vm_flood_burst,
            c.edge_flood_pps,
            c.edge_flood_burst,
        );
        if vr > 0 {
            let n = self.vm_buckets.len();
            let b = match self.vm_buckets.get_mut(&src) {
                Some(b) => Some(b),
                None if n < MAX_VM_BUCKETS => Some(
                    self.vm_buckets
                        .entry(src)
                        .or_insert(TokenBucket::new(vb, now)),
                ),
                None => None,
            };
            if let Some(b) = b {
                if !b.take(now, vr, vb) {
                    return Err(DropReason::FloodVmLimit);
                }
            }
        }
        if er > 0 && !self.edge_bucket.take(now, er, eb) {
            return Err(DropReason::FloodEdgeLimit);
        }
        let (br, bb) = (self.cfg.edge_flood_bytes, self.cfg.edge_flood_byte_burst);
        let n = u32::try_from(len).unwrap_or(u32::MAX);
        if br > 0 && !self.edge_bytes.take_n(now, br, bb, n) {
            return Err(DropReason::FloodEdgeBytes);
        }
        Ok(())
    }
}

impl EdgeCore {
    /// Replaces the L2 control plane's settings.
    pub fn set_l2_config(&mut self, cfg: L2Config) {
        self.l2.edge_bucket = TokenBucket::new(cfg.edge_flood_burst, self.last_poll);
        self.l2.edge_bytes = TokenBucket::new(cfg.edge_flood_byte_burst, self.last_poll);
        self.l2.dhcp_replies = TokenBucket::new(cfg.dhcp_reply_burst, self.last_poll);
        self.l2.vm_buckets.clear();
        self.l2.cfg = cfg;
    }

    /// A frame from the TAP device whose source MAC was behind a peer: the VM moved here.
    pub(super) fn l2_moved_here(&mut self, now: Instant, src: Mac) {
        if self.l2.cfg.control {
            self.l2.bind_local(now, src, None, self.cfg.max_macs);
        }
    }

    /// A broadcast or multicast frame from the TAP device: its source is a local VM.
    pub(super) fn l2_seen_local(&mut self, now: Instant, src: Mac) {
        if self.l2.cfg.control && !src.is_group() {
            self.l2.bind_local(now, src, None, self.cfg.max_macs);
        }
    }

    /// A frame from the TAP device that [`l2::worth_a_look`] picked: ARP, neighbour
    /// discovery, membership reports, DHCP acknowledgements.
    pub(super) fn l2_tap_frame(
        &mut self,
        now: Instant,
        src: Mac,
        group: bool,
        frame: &[u8],
        out: &mut Outbox,
    ) -> L2Seen {
        match l2::ethertype(frame) {
            Some(l2::ETHERTYPE_ARP) => self.l2_tap_arp(now, src, group, frame, out),
            Some(l2::ETHERTYPE_IPV6) => self.l2_tap_ipv6(now, src, group, frame, out),
            Some(l2::ETHERTYPE_IPV4) => {
                if self.l2.cfg.control && !src.is_group() {
                    self.l2_reports(src, frame);
                    self.l2_dhcp_server_seen(frame);
                    self.l2_dhcp_ack(now, frame);
                    if let Some(l2::DhcpWay::FromServer(_)) = l2::dhcp_way(frame) {
                        self.l2_bind_server(src);
                    }
                }
                L2Seen::Other
            }
            _ => L2Seen::Other,
        }
    }

    fn l2_reports(&mut self, src: Mac, frame: &[u8]) {
        let mut seen = Vec::new();
        if l2::parse_reports(frame, MAX_REPORT_RECORDS, |r| seen.push(r)) {
            self.l2.stats.membership_reports += 1;
            for r in seen {
                self.l2.membership(src, r);
            }
        }
    }

    /// `src`, a local VM, sent a DHCP reply (an offer comes before the first
    /// acknowledgement): it becomes the bound server unless another local VM that is
    /// still bound holds the role.
    fn l2_bind_server(&mut self, src: Mac) {
        let held = self
            .l2
            .bound_server
            .is_some_and(|s| s != src && self.l2.local.contains_key(&s));
        if !held {
            self.l2.bound_server = Some(src);
        }
    }

    /// A DHCP server's reply (offer, acknowledgement or refusal) from the TAP device or
    /// from a peer: its sender is a server, where clients' broadcasts need to go. An
    /// offer comes before its client's REQUEST, so the request already goes to the
    /// server's site only; what is flooded to every peer is only what the site's clients
    /// send before the first reply reaches it.
    fn l2_dhcp_server_seen(&mut self, frame: &[u8]) {
        let Some(l2::DhcpWay::FromServer(_)) = l2::dhcp_way(frame) else {
            return;
        };
        let Some((_, server)) = crate::eth::macs(frame) else {
            return;
        };
        let known = &mut self.l2.dhcp_servers;
        if !server.is_group() && !known.contains(&server) {
            if known.len() >= MAX_DHCP_SERVERS {
                known.remove(0);
            }
            known.push(server);
        }
    }

    /// A DHCP acknowledgement from the TAP device (a local server) or from a peer: the
    /// leased address is bound to the client's MAC where the client is (its DHCP
    /// requests made it known), so the binding exists before the client's first ARP.
    /// A client nobody knows yet is left alone (every site the acknowledgement is
    /// flooded to would take it for its own).
    fn l2_dhcp_ack(&mut self, now: Instant, frame: &[u8]) {
        let Some(ack) = l2::parse_dhcp_ack(frame) else {
            return;
        };
        self.l2.stats.dhcp_acks_seen += 1;
        let max = self.cfg.max_macs;
        let b = Binding {
            mac: ack.client,
            ip: Some(ack.addr),
        };
        if self.l2.local.contains_key(&ack.client) {
            self.l2.bind_local(now, ack.client, b.ip, max);
        } else if let Some(peer) = self
            .l2
            .remote
            .get(&ack.client)
            .map(|r| r.peer)
            .or_else(|| self.macs.get(&ack.client).map(|e| e.0))
        {
            self.l2.bind_remote(peer, b, max);
        }
    }

    /// An ARP frame from the TAP device: learns the sender's binding and answers a
    /// request for an address bound behind a peer.
    fn l2_tap_arp(
        &mut self,
        now: Instant,
        src: Mac,
        group: bool,
        frame: &[u8],
        out: &mut Outbox,
    ) -> L2Seen {
        let Some(a) = l2::parse_arp(frame) else {
            return L2Seen::Other;
        };
        if !self.l2.cfg.control {
            return L2Seen::arp(&a, group);
        }
        if a.sha == src && !src.is_group() {
            self.l2.bind_local(now, src, Some(a.spa), self.cfg.max_macs);
        }
        if a.op != ARP_REQUEST || !group || a.tpa == a.spa {
            return L2Seen::arp(&a, group);
        }
        match self.l2_owner(a.tpa.into(), src) {
            Owner::Unknown => L2Seen::arp(&a, group),
            Owner::Here => {
                // The owner is on this side and answers on the local segment.
                self.l2.stats.arp_owned_locally += 1;
                L2Seen::Handled
            }
            Owner::Peer(owner) => {
                let mut reply = [0u8; l2::ARP_FRAME_LEN];
                if l2::write_arp_reply(&a, owner, &mut reply).is_err() {
                    return L2Seen::arp(&a, group);
                }
                out.push_tap(&reply, false);
                self.tap_tx += 1;
                self.l2.stats.arp_answered_locally += 1;
                L2Seen::Handled
            }
        }
    }

    /// Where the holder of `ip` is, for a request from `asker`.
    fn l2_owner(&self, ip: IpAddr, asker: Mac) -> Owner {
        match self.l2.ips.get(&ip) {
            Some(m) if *m == asker || self.l2.local.contains_key(m) => Owner::Here,
            Some(m) if self.l2.remote.contains_key(m) => Owner::Peer(*m),
            _ => Owner::Unknown,
        }
    }

    /// An IPv6 frame from the TAP device: neighbour discovery (bindings learned from
    /// solicitations, advertisements and duplicate address detection; multicast
    /// solicitations for an address bound behind a peer answered here) and MLD reports.
    fn l2_tap_ipv6(
        &mut self,
        now: Instant,
        src: Mac,
        group: bool,
        frame: &[u8],
        out: &mut Outbox,
    ) -> L2Seen {
        let Some(nd) = l2::parse_nd(frame) else {
            if self.l2.cfg.control && !src.is_group() {
                self.l2_reports(src, frame);
            }
            return L2Seen::Other;
        };
        let asks = !nd.advert && group && !nd.is_dad();
        if !self.l2.cfg.control {
            return if asks { L2Seen::Solicit } else { L2Seen::Other };
        }
        if !src.is_group() && nd.lladdr.is_none_or(|m| m == src) {
            let max = self.cfg.max_macs;
            let addr = if nd.advert || nd.is_dad() {
                nd.target
            } else {
                nd.src
            };
            self.l2.bind_local6(now, src, addr, max);
        }
        if nd.advert || !group {
            return L2Seen::Other;
        }
        match self.l2_owner(nd.target.into(), src) {
            Owner::Unknown if asks => L2Seen::Solicit,
            Owner::Unknown => L2Seen::Other,
            Owner::Here => {
                // The owner answers on the local segment (or, for duplicate address
                // detection of its own address, nobody needs to).
                self.l2.stats.nd_owned_locally += 1;
                L2Seen::Handled
            }
            Owner::Peer(owner) => self.l2_answer_ns(&nd, src, owner, out),
        }
    }

    fn l2_answer_ns(&mut self, nd: &Nd, src: Mac, owner: Mac, out: &mut Outbox) -> L2Seen {
        let mut na = [0u8; l2::NA_FRAME_LEN];
        if l2::write_na(nd, src, owner, &mut na).is_err() {
            return L2Seen::Solicit;
        }
        out.push_tap(&na, false);
        self.tap_tx += 1;
        self.l2.stats.nd_answered_locally += 1;
        L2Seen::Handled
    }

    /// Admits a frame about to be flooded across the WAN (the per-VM and per-edge
    /// limits, or for a local DHCP server's steered reply its own limit); counts ARP
    /// requests and neighbour solicitations that go.
    pub(super) fn l2_admit_flood(
        &mut self,
        now: Instant,
        src: Mac,
        frame: &[u8],
        seen: L2Seen,
    ) -> bool {
        if self.l2_steered_reply(src, frame) {
            let (r, b) = (self.l2.cfg.dhcp_reply_pps, self.l2.cfg.dhcp_reply_burst);
            if r > 0 && !self.l2.dhcp_replies.take(now, r, b) {
                self.drop(DropReason::DhcpReplyLimit);
                return false;
            }
            self.l2.stats.dhcp_replies_steered += 1;
            return true;
        }
        if let Err(r) = self.l2.take(now, src, frame.len()) {
            self.drop(r);
            return false;
        }
        match seen {
            L2Seen::Request => self.l2.stats.arp_requests_flooded += 1,
            L2Seen::Solicit => self.l2.stats.nd_solicits_flooded += 1,
            _ => {}
        }
        true
    }

    /// Whether a frame from the TAP device is a broadcast DHCP reply from the bound
    /// local server which [`EdgeCore::l2_flood_to`] sends to at most one peer. Any other
    /// VM's replies on port 67 are not.
    fn l2_steered_reply(&self, src: Mac, frame: &[u8]) -> bool {
        if !self.l2.cfg.control
            || self.l2.bound_server != Some(src)
            || !self.l2.local.contains_key(&src)
        {
            return false;
        }
        match crate::eth::macs(frame) {
            Some((dst, _)) if dst.0 == [0xff; 6] => {}
            _ => return false,
        }
        match l2::dhcp_way(frame) {
            Some(l2::DhcpWay::FromServer(client)) => self.l2_reply_to(client).is_some(),
            _ => false,
        }
    }

    /// Where a DHCP server's broadcast reply to `client` goes: the peer behind which the
    /// client is, nowhere when it is on this side, `None` (every peer) when unknown.
    fn l2_reply_to(&self, client: Mac) -> Option<FloodTo> {
        match self.macs.get(&client) {
            Some((p, _)) => Some(FloodTo::Dhcp(vec![*p])),
            None if self.l2.local.contains_key(&client) => Some(FloodTo::Dhcp(Vec::new())),
            None => None,
        }
    }

    /// For a frame about to be flooded: which peers need it. A multicast frame to a
    /// group that follows membership goes to peers with members; a DHCP client's
    /// broadcast goes to the peers behind which known servers are (nowhere when they are
    /// all on this side), a server's broadcast reply to the peer behind which its client
    /// is; anything else, or when a server or client is not known, to every peer.
    pub(super) fn l2_flood_to(&self, frame: &[u8]) -> FloodTo {
        let Some((dst, _)) = crate::eth::macs(frame) else {
            return FloodTo::All;
        };
        if !self.l2.cfg.control {
            return FloodTo::All;
        }
        if l2::follows_membership(dst) {
            return FloodTo::Group(dst);
        }
        if dst.0 != [0xff; 6] || !l2::worth_a_look(frame) {
            return FloodTo::All;
        }
        match l2::dhcp_way(frame) {
            Some(l2::DhcpWay::FromClient) if !self.l2.dhcp_servers.is_empty() => {
                // Where a server is comes from its binding, not from the MAC table: a
                // binding goes with its peer's session or when the peer withdraws it,
                // a MAC table entry only when it expires.
                let mut peers = Vec::new();
                for s in &self.l2.dhcp_servers {
                    if self.l2.local.contains_key(s) {
                        continue;
                    }
                    match self.l2.remote.get(s) {
                        Some(r) if !peers.contains(&r.peer) => peers.push(r.peer),
                        Some(_) => {}
                        None => return FloodTo::All,
                    }
                }
                FloodTo::Dhcp(peers)
            }
            Some(l2::DhcpWay::FromServer(client)) => {
                self.l2_reply_to(client).unwrap_or(FloodTo::All)
            }
            _ => FloodTo::All,
        }
    }

    /// Whether `peer` gets a flooded frame (see [`EdgeCore::l2_flood_to`]); for a group,
    /// a peer that announced nothing (an edge without the Groups message) or everything
    /// gets it too. A peer left out is counted.
    pub(super) fn l2_peer_wants(&mut self, to: &FloodTo, peer: &EdgeId) -> bool {
        match to {
            FloodTo::All => true,
            FloodTo::Group(group) => {
                let wants = match self.l2.peer_groups.get(peer) {
                    Some(Some(g)) => g.binary_search(group).is_ok(),
                    _ => true,
                };
                if !wants {
                    self.l2.stats.multicast_withheld += 1;
                }
                wants
            }
            FloodTo::Dhcp(peers) => {
                let wants = peers.contains(peer);
                if !wants {
                    self.l2.stats.dhcp_withheld += 1;
                }
                wants
            }
        }
    }

    /// A frame from a peer that [`l2::worth_a_look`] picked or whose source MAC moved
    /// there (`moved`): requests that crossed the WAN are counted, DHCP acknowledgements
    /// for clients on this side bind their address.
    pub(super) fn l2_from_peer(&mut self, now: Instant, src: Mac, moved: bool, frame: &[u8]) {
        if moved {
            self.l2.drop_local(&src);
        }
        match l2::ethertype(frame) {
            Some(l2::ETHERTYPE_ARP) => {
                if let Some(a) = l2::parse_arp(frame) {
                    if a.op == ARP_REQUEST && a.tpa != a.spa {
                        self.l2.stats.arp_requests_from_wan += 1;
                    }
                }
            }
            Some(l2::ETHERTYPE_IPV6) => {
                if let Some(nd) = l2::parse_nd(frame) {
                    if !nd.advert && nd.dst.is_multicast() && !nd.is_dad() {
                        self.l2.stats.nd_solicits_from_wan += 1;
                    }
                }
            }
            Some(l2::ETHERTYPE_IPV4) if self.l2.cfg.control => {
                self.l2_dhcp_server_seen(frame);
                self.l2_dhcp_ack(now, frame);
            }
            _ => {}
        }
    }

    fn point_mac(&mut self, now: Instant, pid: &EdgeId, mac: Mac) {
        let n = self.macs.len();
        match self.macs.get_mut(&mac) {
            Some(e) => *e = (*pid, now),
            None if n < self.cfg.max_macs => {
                self.macs.insert(mac, (*pid, now));
                self.mac_expiry_at
                    .get_or_insert(now + self.cfg.timers.mac_expiry);
            }
            None => self.drop(DropReason::MacTableFull),
        }
    }

    /// A Control message from a peer (its session authenticated it).
    pub(super) fn on_control(&mut self, now: Instant, pid: &EdgeId, body: &[u8]) {
        let m = match Control::decode(body) {
            Ok(m) => m,
            Err(e) => return self.drop(e.into()),
        };
        self.l2.stats.bindings_received += 1;
        if !self.l2.cfg.control {
            return;
        }
        match m {
            Control::Bindings(m) => self.apply_bindings(now, pid, m.full, m.entries),
            Control::Bindings6(m) => self.apply_bindings(now, pid, m.full, m.entries),
            Control::Groups(g) => {
                let set = (!g.all).then(|| {
                    let mut v = g.groups;
                    v.sort_unstable();
                    v
                });
                self.l2.peer_groups.insert(*pid, set);
            }
        }
    }

    /// Bindings of one kind announced by `pid`: a full set replaces what it announced of
    /// that kind before; each entry also points the MAC table at `pid`.
    fn apply_bindings<B: BindingKind>(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        full: bool,
        entries: Vec<B>,
    ) {
        if full {
            B::forget_peer(&mut self.l2, pid);
        }
        let max = self.cfg.max_macs;
        for b in entries {
            if !b.bind_remote(&mut self.l2, *pid, max) {
                self.drop(DropReason::MacTableFull);
                continue;
            }
            self.point_mac(now, pid, b.mac());
        }
    }

    /// `pid` was introduced under its name, or its first session is up: an other edge of
    /// the same name (the same site before a restart, with its old id) loses its bindings
    /// and MACs, so frames for them are flooded until their owners are known again.
    pub(super) fn l2_retire_namesakes(&mut self, pid: &EdgeId) {
        if !self.l2.cfg.control {
            return;
        }
        let name = match self.peers.get(pid) {
            Some(p) if p.name != "?" => p.name.clone(),
            _ => return,
        };
        for id in self.peers.namesakes(pid) {
            let before = self.macs.len() + self.l2.remote.len();
            self.macs.retain(|_, v| v.0 != id);
            self.l2_peer_gone(&id);
            if self.macs.len() + self.l2.remote.len() < before {
                tracing::info!(peer = %name, "edge restarted: the old edge's bindings and MACs are dropped");
            }
        }
    }

    /// A first session with `pid` is up: it gets our full set of bindings and groups
    /// (and an older edge of its name is retired).
    pub(super) fn l2_session_up(&mut self, now: Instant, pid: &EdgeId, out: &mut Outbox) {
        if !self.l2.cfg.control {
            return;
        }
        self.l2_retire_namesakes(pid);
        let (all, all6) = self.local_bindings();
        self.send_bindings(now, pid, &all, &all6, true, out);
        let g = Control::Groups(self.l2.groups());
        self.send_control(now, pid, &g, out);
    }

    /// The session with `pid` lapsed (its last one expired): what it announced is
    /// forgotten, so nothing is answered for VMs behind an edge that may be gone; a new
    /// session brings its full set again.
    pub(super) fn l2_session_lapsed(&mut self, pid: &EdgeId) {
        let before = self.l2.remote.len();
        self.l2_peer_gone(pid);
        if self.l2.remote.len() < before {
            let name = self.peers.get(pid).map_or("?", |p| p.name.as_str());
            tracing::info!(peer = %name, "session lapsed: the peer's bindings are dropped");
        }
    }

    fn local_bindings(&self) -> (Vec<Binding>, Vec<Binding6>) {
        let mut v4 = Vec::with_capacity(self.l2.local.len());
        let mut v6 = Vec::new();
        for (m, l) in &self.l2.local {
            v4.push(Binding { mac: *m, ip: l.ip });
            v6.extend(l.ip6.iter().map(|a| Binding6 { mac: *m, ip: *a }));
        }
        (v4, v6)
    }

    /// Sends one control message through the session with `pid`.
    fn send_control(&mut self, now: Instant, pid: &EdgeId, m: &Control, out: &mut Outbox) -> bool {
        let mut buf = [0u8; 1300];
        let Ok(n) = m.encode(&mut buf) else {
            self.drop(DropReason::NoRoom);
            return false;
        };
        if !self.send_transport(now, pid, MsgType::Control, 0, &buf[..n], None, out) {
            return false;
        }
        self.l2.stats.bindings_sent += 1;
        true
    }

    /// Sends bindings in as many messages as they need (a full set starts with a full
    /// message of each kind, even an empty one).
    fn send_bindings(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        v4: &[Binding],
        v6: &[Binding6],
        full: bool,
        out: &mut Outbox,
    ) {
        if self.send_kind(now, pid, v4, full, out) {
            self.send_kind(now, pid, v6, full, out);
        }
    }

    /// Sends bindings of one kind in as many messages as they need; false when one
    /// could not be sent.
    fn send_kind<B: BindingKind>(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        v: &[B],
        full: bool,
        out: &mut Outbox,
    ) -> bool {
        let mut first = true;
        let mut rest = v;
        while first && full || !rest.is_empty() {
            let (part, later) = rest.split_at(rest.len().min(B::MAX));
            let m = B::message(full && first, part.to_vec());
            if !self.send_control(now, pid, &m, out) {
                return false;
            }
            first = false;
            rest = later;
        }
        true
    }

    fn session_peers(&self) -> Vec<EdgeId> {
        self.peers
            .values()
            .filter(|p| p.cur.is_some())
            .map(|p| p.id)
            .collect()
    }

    /// The control plane's timers: new bindings and a changed set of groups announced,
    /// the full set re-announced, idle local bindings and flood buckets forgotten.
    pub(super) fn l2_poll(&mut self, now: Instant, out: &mut Outbox) {
        if !self.l2.cfg.control {
            self.l2.pending.clear();
            self.l2.pending6.clear();
            self.l2.groups_changed = false;
            return;
        }
        if now >= self.l2.next_announce {
            let expiry = self.cfg.timers.mac_expiry;
            let idle: Vec<Mac> = self
                .l2
                .local
                .iter()
                .filter(|(_, l)| now.saturating_duration_since(l.seen) >= expiry)
                .map(|(m, _)| *m)
                .collect();
            for m in idle {
                self.l2.drop_local(&m);
            }
            let c = self.l2.cfg.clone();
            self.l2
                .vm_buckets
                .retain(|_, b| !b.full_at(now, c.vm_flood_pps, c.vm_flood_burst));
            self.l2.pending.clear();
            self.l2.pending6.clear();
            self.l2.groups_changed = false;
            let (all, all6) = self.local_bindings();
            let g = Control::Groups(self.l2.groups());
            for id in self.session_peers() {
                self.send_bindings(now, &id, &all, &all6, true, out);
                self.send_control(now, &id, &g, out);
            }
            self.l2.next_announce = now + c.announce_interval;
            return;
        }
        if !self.l2.pending.is_empty() || !self.l2.pending6.is_empty() {
            let new = std::mem::take(&mut self.l2.pending);
            let new6 = std::mem::take(&mut self.l2.pending6);
            for id in self.session_peers() {
                self.send_bindings(now, &id, &new, &new6, false, out);
            }
        }
        if self.l2.groups_changed {
            self.l2.groups_changed = false;
            let g = Control::Groups(self.l2.groups());
            for id in self.session_peers() {
                self.send_control(now, &id, &g, out);
            }
        }
    }

    /// The control plane's next deadline.
    pub(super) fn l2_deadline(&self) -> Option<Instant> {
        if !self.l2.cfg.control {
            return None;
        }
        if !self.l2.pending.is_empty() || !self.l2.pending6.is_empty() || self.l2.groups_changed {
            return Some(self.last_poll);
        }
        Some(self.l2.next_announce)
    }

    /// A peer is gone: so are its bindings, the DHCP servers behind it (clients'
    /// requests are flooded again unless other servers are known) and what it said about
    /// its groups.
    pub(super) fn l2_peer_gone(&mut self, pid: &EdgeId) {
        let l2 = &mut self.l2;
        l2.dhcp_servers
            .retain(|s| l2.remote.get(s).is_none_or(|r| r.peer != *pid));
        l2.forget_peer(pid);
        self.l2.peer_groups.remove(pid);
    }

    /// The control plane's part of the status document.
    pub(super) fn l2_status(&self) -> L2Status {
        L2Status {
            control: self.l2.cfg.control,
            local_bindings: self.l2.local.len() as u64,
            remote_bindings: self.l2.remote.len() as u64,
            local_groups: self.l2.members.len() as u64,
            ..self.l2.stats.clone()
        }
    }
}

/// What the two kinds of binding (a MAC with its IPv4 address, a MAC with one IPv6
/// address) differ in when they are announced and applied; the rest is one code path.
trait BindingKind: Copy {
    /// Most entries in one message.
    const MAX: usize;
    /// The bound MAC.
    fn mac(&self) -> Mac;
    /// The control message carrying `entries`.
    fn message(full: bool, entries: Vec<Self>) -> Control;
    /// What `peer` announced of this kind is forgotten (a full set follows).
    fn forget_peer(l2: &mut L2, peer: &EdgeId);
    /// Applies one entry announced by `peer`; false when the table is full.
    fn bind_remote(self, l2: &mut L2, peer: EdgeId, max: usize) -> bool;
}

impl BindingKind for Binding {
    const MAX: usize = MAX_BINDINGS;
    fn mac(&self) -> Mac {
        self.mac
    }
    fn message(full: bool, entries: Vec<Self>) -> Control {
        Control::Bindings(Bindings { full, entries })
    }
    fn forget_peer(l2: &mut L2, peer: &EdgeId) {
        l2.forget_peer(peer);
    }
    fn bind_remote(self, l2: &mut L2, peer: EdgeId, max: usize) -> bool {
        l2.bind_remote(peer, self, max)
    }
}

impl BindingKind for Binding6 {
    const MAX: usize = MAX_BINDINGS6;
    fn mac(&self) -> Mac {
        self.mac
    }
    fn message(full: bool, entries: Vec<Self>) -> Control {
        Control::Bindings6(Bindings6 { full, entries })
    }
    fn forget_peer(l2: &mut L2, peer: &EdgeId) {
        l2.forget_peer6(peer);
    }
    fn bind_remote(self, l2: &mut L2, peer: EdgeId, max: usize) -> bool {
        l2.bind_remote6(peer, self, max)
    }
}

/// Which peers a flooded frame goes to.
pub(super) enum FloodTo {
    /// Every peer.
    All,
    /// Peers with members of this group (or that never said).
    Group(Mac),
    /// A DHCP broadcast: only these peers.
    Dhcp(Vec<EdgeId>),
}

/// Where the holder of an address is.
enum Owner {
    /// Nobody known holds it.
    Unknown,
    /// A VM on this side (or the one asking).
    Here,
    /// The VM with this MAC, behind a peer.
    Peer(Mac),
}

/// What a frame from the TAP device turned out to be for the control plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum L2Seen {
    /// Answered or owned here: not forwarded.
    Handled,
    /// An ARP request (not gratuitous) to be flooded.
    Request,
    /// A multicast neighbour solicitation (not for duplicate address detection) to be
    /// flooded.
    Solicit,
    /// Anything else.
    Other,
}

impl L2Seen {
    fn arp(a: &Arp, group: bool) -> Self {
        if a.op == ARP_REQUEST && group && a.tpa != a.spa {
            Self::Request
        } else {
            Self::Other
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u8) -> Mac {
        Mac([2, 0, 0, 0, 0, n])
    }

    #[test]
    fn bindings_move_keep_their_address_and_duplicates_are_refused() {
        let now = Instant::now();
        let mut t = L2::new(L2Config::default(), now, 1);
        let (p, q) = ([1u8; 8], [2u8; 8]);
        let ip1 = Ipv4Addr::new(198, 19, 0, 1);
        t.bind_local(now, mac(1), Some(ip1), 8);
        assert_eq!(t.pending.len(), 1);
        // Another MAC claiming the address: counted, not taken.
        assert!(t.bind_remote(
            p,
            Binding {
                mac: mac(2),
                ip: Some(ip1)
            },
            8
        ));
        assert_eq!(t.stats.duplicate_ip_claims, 1);
        assert_eq!(t.ips.get(&IpAddr::from(ip1)), Some(&mac(1)));
        assert_eq!(t.remote[&mac(2)].ip, None);
        // VM 1 moves to p and is announced without its address: it keeps it.
        assert!(t.bind_remote(
            p,
            Binding {
                mac: mac(1),
                ip: None
            },
            8
        ));
        assert!(!t.local.contains_key(&mac(1)));
        assert_eq!(t.remote[&mac(1)].ip, Some(ip1));
        assert_eq!(t.ips.get(&IpAddr::from(ip1)), Some(&mac(1)));
        // And back here, without an ARP: still bound.
        t.bind_local(now, mac(1), None, 8);
        assert_eq!(t.local[&mac(1)].ip, Some(ip1));
        assert!(!t.remote.contains_key(&mac(1)));
        // A peer's bindings go with it; the table is bounded.
        assert!(t.bind_remote(
            q,
            Binding {
                mac: mac(3),
                ip: None
            },
            2
        ));
        assert!(!t.bind_remote(
            q,
            Binding {
                mac: mac(4),
                ip: None
            },
            2
        ));
        t.forget_peer(&p);
        t.forget_peer(&q);
        assert!(t.remote.is_empty());
        assert_eq!(t.ips.len(), 1);
    }
}
