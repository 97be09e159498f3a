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
//!   bucket per source MAC and one per edge; over the limit they are dropped and counted
//!   (`bcast_vm_limit`, `bcast_edge_limit`).
//! - An address claimed by a second MAC while the first still holds it is a duplicate:
//!   counted, logged once per address, and the first binding kept.
//!
//! Per frame this costs a two-byte EtherType comparison for unicast frames and a hash
//! lookup or two for ARP and flooded frames.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::eth::Mac;
use crate::l2::{self, Arp, Binding, Bindings, TokenBucket, ARP_REQUEST, MAX_BINDINGS};
use crate::outbox::Outbox;
use crate::status::L2Status;
use crate::wire::{EdgeId, MsgType};

use super::drops::DropReason;
use super::{EdgeCore, Map};

/// Settings of the L2 control plane.
#[derive(Clone, Debug)]
pub struct L2Config {
    /// Bindings announced and ARP answered locally (off: every ARP request is flooded).
    pub control: bool,
    /// Flooded frames per second from one source MAC (0: no limit).
    pub vm_flood_pps: u32,
    /// Flooded frames one source MAC may send at once after a quiet time.
    pub vm_flood_burst: u32,
    /// Flooded frames per second from this edge (0: no limit).
    pub edge_flood_pps: u32,
    /// Flooded frames this edge may send at once after a quiet time.
    pub edge_flood_burst: u32,
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
            announce_interval: Duration::from_secs(30),
        }
    }
}

/// Most source MACs with their own flood bucket (beyond: only the edge's bucket).
const MAX_VM_BUCKETS: usize = 4096;
/// Most addresses remembered as already reported duplicates.
const MAX_DUP_LOGGED: usize = 4096;

#[derive(Clone, Copy)]
struct Local {
    ip: Option<Ipv4Addr>,
    seen: Instant,
}

#[derive(Clone, Copy)]
struct Remote {
    peer: EdgeId,
    ip: Option<Ipv4Addr>,
}

/// The control plane's tables and counters.
pub(super) struct L2 {
    pub(super) cfg: L2Config,
    local: Map<Mac, Local>,
    remote: Map<Mac, Remote>,
    /// Who holds each address (a MAC in `local` or `remote`).
    ips: Map<Ipv4Addr, Mac>,
    vm_buckets: Map<Mac, TokenBucket>,
    edge_bucket: TokenBucket,
    /// Local bindings learned since the last poll, announced by it.
    pending: Vec<Binding>,
    next_announce: Instant,
    dup_logged: Map<Ipv4Addr, Mac>,
    stats: L2Status,
}

impl L2 {
    pub(super) fn new(cfg: L2Config, now: Instant, seed: u64) -> Self {
        let t = || foldhash::fast::FixedState::with_seed(seed);
        Self {
            edge_bucket: TokenBucket::new(cfg.edge_flood_burst, now),
            next_announce: now + cfg.announce_interval,
            cfg,
            local: Map::with_hasher(t()),
            remote: Map::with_hasher(t()),
            ips: Map::with_hasher(t()),
            vm_buckets: Map::with_hasher(t()),
            pending: Vec::new(),
            dup_logged: Map::with_hasher(t()),
            stats: L2Status::default(),
        }
    }

    fn holds(&self, mac: &Mac) -> bool {
        self.local.contains_key(mac) || self.remote.contains_key(mac)
    }

    /// Whether `mac` may take `ip`: false (counted, logged once) when another MAC that is
    /// still bound holds it.
    fn may_claim(&mut self, mac: Mac, ip: Ipv4Addr) -> bool {
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

    fn release_ip(&mut self, mac: &Mac, ip: Option<Ipv4Addr>) {
        if let Some(ip) = ip {
            if self.ips.get(&ip) == Some(mac) {
                self.ips.remove(&ip);
            }
        }
    }

    fn drop_remote(&mut self, mac: &Mac) {
        if let Some(r) = self.remote.remove(mac) {
            self.release_ip(mac, r.ip);
        }
    }

    fn drop_local(&mut self, mac: &Mac) {
        if let Some(l) = self.local.remove(mac) {
            self.release_ip(mac, l.ip);
        }
    }

    /// Learns a local binding; queues it for announcement when new or changed.
    /// A MAC that moved here without an address keeps the one its peer announced.
    fn bind_local(&mut self, now: Instant, mac: Mac, ip: Option<Ipv4Addr>, max: usize) {
        let carried = self.remote.get(&mac).and_then(|r| r.ip);
        self.drop_remote(&mac);
        let ip = ip
            .filter(|a| !a.is_unspecified() && !a.is_broadcast() && !a.is_multicast())
            .or(carried);
        let n = self.local.len();
        let old = match self.local.get_mut(&mac) {
            Some(l) => {
                l.seen = now;
                if ip.is_none() || l.ip == ip {
                    return;
                }
                l.ip
            }
            None if n < max => {
                self.local.insert(
                    mac,
                    Local {
                        ip: None,
                        seen: now,
                    },
                );
                None
            }
            None => return,
        };
        let mut now_ip = old;
        if let Some(a) = ip {
            if self.may_claim(mac, a) {
                self.release_ip(&mac, old);
                self.ips.insert(a, mac);
                now_ip = Some(a);
            }
        }
        if let Some(l) = self.local.get_mut(&mac) {
            l.ip = now_ip;
        }
        if old.is_none() || now_ip != old {
            self.pending.push(Binding { mac, ip: now_ip });
        }
    }

    /// Applies one binding announced by `peer`; false when the table is full. A MAC
    /// announced without an address keeps the one it had here (a VM that moved).
    fn bind_remote(&mut self, peer: EdgeId, b: Binding, max: usize) -> bool {
        let old = self.remote.get(&b.mac).copied();
        if old.is_none() && self.remote.len() >= max {
            return false;
        }
        let mut ip = old.and_then(|r| r.ip);
        let carried = ip.or_else(|| self.local.get(&b.mac).and_then(|l| l.ip));
        self.drop_local(&b.mac);
        if let Some(a) = b.ip.or(carried) {
            if ip != Some(a) && self.may_claim(b.mac, a) {
                self.release_ip(&b.mac, ip);
                self.ips.insert(a, b.mac);
                ip = Some(a);
            }
        }
        self.remote.insert(b.mac, Remote { peer, ip });
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

    fn take(&mut self, now: Instant, src: Mac) -> Result<(), DropReason> {
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
        Ok(())
    }
}

impl EdgeCore {
    /// Replaces the L2 control plane's settings.
    pub fn set_l2_config(&mut self, cfg: L2Config) {
        self.l2.edge_bucket = TokenBucket::new(cfg.edge_flood_burst, self.last_poll);
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

    /// An ARP frame from the TAP device: learns the sender's binding and answers a
    /// request for an address bound behind a peer.
    pub(super) fn l2_tap_arp(
        &mut self,
        now: Instant,
        src: Mac,
        group: bool,
        frame: &[u8],
        out: &mut Outbox,
    ) -> ArpSeen {
        let Some(a) = l2::parse_arp(frame) else {
            return ArpSeen::Other;
        };
        if !self.l2.cfg.control {
            return ArpSeen::flooded(&a, group);
        }
        if a.sha == src && !src.is_group() {
            self.l2.bind_local(now, src, Some(a.spa), self.cfg.max_macs);
        }
        if a.op != ARP_REQUEST || !group || a.tpa == a.spa {
            return ArpSeen::flooded(&a, group);
        }
        let Some(owner) = self.l2.ips.get(&a.tpa).copied() else {
            return ArpSeen::flooded(&a, group);
        };
        if self.l2.local.contains_key(&owner) {
            // The owner is on this side and answers on the local segment.
            self.l2.stats.arp_owned_locally += 1;
            return ArpSeen::Handled;
        }
        if !self.l2.remote.contains_key(&owner) {
            return ArpSeen::flooded(&a, group);
        }
        let mut reply = [0u8; l2::ARP_FRAME_LEN];
        if l2::write_arp_reply(&a, owner, &mut reply).is_err() {
            return ArpSeen::flooded(&a, group);
        }
        out.push_tap(&reply, false);
        self.tap_tx += 1;
        self.l2.stats.arp_answered_locally += 1;
        ArpSeen::Handled
    }

    /// Admits a frame about to be flooded across the WAN (the per-VM and per-edge
    /// limits); counts ARP requests that go.
    pub(super) fn l2_admit_flood(&mut self, now: Instant, src: Mac, arp: ArpSeen) -> bool {
        if let Err(r) = self.l2.take(now, src) {
            self.drop(r);
            return false;
        }
        if arp == ArpSeen::Request {
            self.l2.stats.arp_requests_flooded += 1;
        }
        true
    }

    /// A frame from a peer: its source MAC is behind that peer (`moved`: it was not
    /// before), and an ARP request that crossed the WAN is counted.
    pub(super) fn l2_from_peer(&mut self, src: Mac, moved: bool, frame: &[u8]) {
        if moved {
            self.l2.drop_local(&src);
        }
        if l2::ethertype(frame) == Some(l2::ETHERTYPE_ARP) {
            if let Some(a) = l2::parse_arp(frame) {
                if a.op == ARP_REQUEST && a.tpa != a.spa {
                    self.l2.stats.arp_requests_from_wan += 1;
                }
            }
        }
    }

    /// A Control message from a peer (its session authenticated it).
    pub(super) fn on_control(&mut self, now: Instant, pid: &EdgeId, body: &[u8]) {
        let m = match Bindings::decode(body) {
            Ok(m) => m,
            Err(e) => return self.drop(e.into()),
        };
        self.l2.stats.bindings_received += 1;
        if !self.l2.cfg.control {
            return;
        }
        if m.full {
            self.l2.forget_peer(pid);
        }
        for b in m.entries {
            if !self.l2.bind_remote(*pid, b, self.cfg.max_macs) {
                self.drop(DropReason::MacTableFull);
                continue;
            }
            let n = self.macs.len();
            match self.macs.get_mut(&b.mac) {
                Some(e) => *e = (*pid, now),
                None if n < self.cfg.max_macs => {
                    self.macs.insert(b.mac, (*pid, now));
                    self.mac_expiry_at
                        .get_or_insert(now + self.cfg.timers.mac_expiry);
                }
                None => self.drop(DropReason::MacTableFull),
            }
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
        let old: Vec<EdgeId> = self
            .peers
            .values()
            .filter(|p| p.id != *pid && p.name == name)
            .map(|p| p.id)
            .collect();
        for id in old {
            let before = self.macs.len() + self.l2.remote.len();
            self.macs.retain(|_, v| v.0 != id);
            self.l2.forget_peer(&id);
            if self.macs.len() + self.l2.remote.len() < before {
                tracing::info!(peer = %name, "edge restarted: the old edge's bindings and MACs are dropped");
            }
        }
    }

    /// A first session with `pid` is up: it gets our full set of bindings (and an older
    /// edge of its name is retired).
    pub(super) fn l2_session_up(&mut self, now: Instant, pid: &EdgeId, out: &mut Outbox) {
        if !self.l2.cfg.control {
            return;
        }
        self.l2_retire_namesakes(pid);
        let all = self.local_bindings();
        self.send_bindings(now, pid, &all, true, out);
    }

    fn local_bindings(&self) -> Vec<Binding> {
        self.l2
            .local
            .iter()
            .map(|(m, l)| Binding { mac: *m, ip: l.ip })
            .collect()
    }

    fn send_bindings(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        entries: &[Binding],
        full: bool,
        out: &mut Outbox,
    ) {
        let mut buf = [0u8; l2::BINDINGS_HDR_LEN + MAX_BINDINGS * l2::BINDING_LEN];
        let mut first = true;
        let mut rest = entries;
        while first || !rest.is_empty() {
            let (now_part, later) = rest.split_at(rest.len().min(MAX_BINDINGS));
            let m = Bindings {
                full: full && first,
                entries: now_part.to_vec(),
            };
            let Ok(n) = m.encode(&mut buf) else {
                return self.drop(DropReason::NoRoom);
            };
            if !self.send_transport(now, pid, MsgType::Control, 0, &buf[..n], None, out) {
                return;
            }
            self.l2.stats.bindings_sent += 1;
            first = false;
            rest = later;
        }
    }

    fn send_bindings_to_all(
        &mut self,
        now: Instant,
        entries: &[Binding],
        full: bool,
        out: &mut Outbox,
    ) {
        let ids: Vec<EdgeId> = self
            .peers
            .values()
            .filter(|p| p.cur.is_some())
            .map(|p| p.id)
            .collect();
        for id in ids {
            self.send_bindings(now, &id, entries, full, out);
        }
    }

    /// The control plane's timers: new bindings announced, the full set re-announced,
    /// idle local bindings and flood buckets forgotten.
    pub(super) fn l2_poll(&mut self, now: Instant, out: &mut Outbox) {
        if !self.l2.cfg.control {
            self.l2.pending.clear();
            return;
        }
        if !self.l2.pending.is_empty() {
            let new = std::mem::take(&mut self.l2.pending);
            self.send_bindings_to_all(now, &new, false, out);
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
            let all = self.local_bindings();
            self.send_bindings_to_all(now, &all, true, out);
            self.l2.next_announce = now + c.announce_interval;
        }
    }

    /// The control plane's next deadline.
    pub(super) fn l2_deadline(&self) -> Option<Instant> {
        if !self.l2.cfg.control {
            return None;
        }
        if !self.l2.pending.is_empty() {
            return Some(self.last_poll);
        }
        Some(self.l2.next_announce)
    }

    /// A peer is gone: so are its bindings.
    pub(super) fn l2_peer_gone(&mut self, pid: &EdgeId) {
        self.l2.forget_peer(pid);
    }

    /// The control plane's part of the status document.
    pub(super) fn l2_status(&self) -> L2Status {
        L2Status {
            control: self.l2.cfg.control,
            local_bindings: self.l2.local.len() as u64,
            remote_bindings: self.l2.remote.len() as u64,
            ..self.l2.stats.clone()
        }
    }
}

/// What an ARP frame from the TAP device turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ArpSeen {
    /// Answered or owned here: not forwarded.
    Handled,
    /// A request (not gratuitous) to be flooded.
    Request,
    /// Anything else.
    Other,
}

impl ArpSeen {
    fn flooded(a: &Arp, group: bool) -> Self {
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
        assert_eq!(t.ips.get(&ip1), Some(&mac(1)));
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
        assert_eq!(t.ips.get(&ip1), Some(&mac(1)));
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
