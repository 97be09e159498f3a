//! Paths to peers: candidate addresses, the limits on addresses that never answered,
//! probes and their replies (direct preferred, relayed otherwise).

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

// Looked up for every packet: a seeded fast hash instead of SipHash.

use crate::outbox::Outbox;
use crate::wire::{EdgeId, MsgType, TransportHdr, PROBE_BODY_LEN, PROBE_REPLY, TRANSPORT_HDR_LEN};

use super::drops::DropReason;
use super::peer::*;
use super::table::DeadlineCtx;
use super::{Earliest, EdgeCore, Timers, Via};

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

impl Peer {
    /// Records that an authenticated packet came straight from `a`.
    pub(super) fn validate(&mut self, a: SocketAddr, now: Instant) {
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
    pub(super) fn candidates(&self, overlay: &[(IpAddr, u8)]) -> Vec<SocketAddr> {
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
}

impl EdgeCore {
    /// Whether a handshake init may go straight to `a` now (counted when it may): always to an address the peer answered from lately; to others at most
    /// `unvalidated_tries` times, then one per `unvalidated_backoff`, and at most
    /// `unvalidated_per_sec` per second over all peers.
    pub(super) fn may_send_direct(&mut self, pid: &EdgeId, a: SocketAddr, now: Instant) -> bool {
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
            self.drops.count(DropReason::UnvalidatedLimit);
            return false;
        }
        let w = &mut self.unvalidated_window;
        if now.saturating_duration_since(w.0) >= Duration::from_secs(1) {
            *w = (now, 0);
        }
        if w.1 >= per_sec {
            self.drops.count(DropReason::UnvalidatedBudget);
            return false;
        }
        w.1 += 1;
        e.sent = e.sent.saturating_add(1);
        e.last = now;
        true
    }

    /// Notes an authenticated packet from peer `pid`: a direct source address is then
    /// validated; a relaying supernode is alive and carries our answers.
    pub(super) fn authentic_from(&mut self, pid: &EdgeId, via: Via, now: Instant) {
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

    pub(super) fn send_probe(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        to: Option<SocketAddr>,
        out: &mut Outbox,
    ) {
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

    /// Path timers of one peer with a session: direct path loss, probes and keepalives.
    pub(super) fn poll_paths(&mut self, now: Instant, id: &EdgeId, t: &Timers, out: &mut Outbox) {
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

    /// A probe (opened and authenticated): answered on the path it came by, or, for a
    /// reply, the path it came by is up and its RTT measured.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_probe(
        &mut self,
        now: Instant,
        via: Via,
        pid: &EdgeId,
        hdr: &TransportHdr,
        n: usize,
        pkt: &[u8],
        out: &mut Outbox,
    ) {
        let pid = *pid;
        let Some(p) = self.peers.get_mut(&pid) else {
            return;
        };
        if n != PROBE_BODY_LEN {
            return self.drop(DropReason::Malformed);
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
                self.send_transport(now, &pid, MsgType::Probe, PROBE_REPLY, &idb, None, out);
                if let Some(p) = self.peers.get_mut(&pid) {
                    p.direct = d;
                }
            } else {
                self.send_transport(now, &pid, MsgType::Probe, PROBE_REPLY, &idb, to, out);
            }
        } else {
            let id = u64::from_be_bytes(idb);
            let Some(pos) = p.probes.iter().position(|x| x.0 == id) else {
                return self.drop(DropReason::StaleProbe);
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

impl Peer {
    /// Adds the path timers to `d` (as [`EdgeCore::poll_paths`] runs them).
    pub(super) fn path_deadline(&self, c: &DeadlineCtx, d: &mut Earliest) {
        let t = c.timers;
        if self.cur.is_none() {
            return;
        }
        if let (Some(_), Some(last)) = (self.direct, self.direct_last_rx) {
            d.add(last + t.direct_timeout);
        }
        let every = if self.direct.is_some() {
            t.keepalive_interval
        } else {
            t.probe_interval
        };
        d.add(self.last_probe.map_or(c.due, |l| l + every));
    }
}
