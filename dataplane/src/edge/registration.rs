//! Registration with the supernodes: signed registrations with cookies, signed
//! acknowledgements and peer lists, liveness checks of a relaying supernode and failover.
//!
//! Peer lists are versioned: the edge registers with the version of the complete list it
//! holds from that supernode, and gets a list back only when that is not the community's
//! current one. An acknowledgement carrying the version held confirms every peer that
//! supernode listed. Peer lists are shared by every member (signed once): they count
//! when they carry the epoch of the supernode's last acknowledgement and a version newer
//! than anything taken from it. Registrations are jittered, and back off while unanswered.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

// Looked up for every packet: a seeded fast hash instead of SipHash.

use crate::outbox::Outbox;
use crate::snkey;
use crate::status::hex;
use crate::wire::{
    Cookie, InfoKind, PeerInfo, Register, RegisterAck, COOKIE_LEN, NO_LIST, PROMPT_SEQ, SIG_LEN,
    SN_KEY_LEN,
};

use super::drops::DropReason;
use super::{Earliest, EdgeCore};

pub(super) struct SnState {
    pub(super) addr: SocketAddr,
    pub(super) last_ack: Option<Instant>,
    pub(super) last_sent: Option<Instant>,
    pub(super) observed: Option<SocketAddr>,
    /// Public key signatures are checked with.
    pub(super) key: Option<[u8; SN_KEY_LEN]>,
    /// Whether `key` was configured (else: taken on first use).
    pub(super) pinned: bool,
    /// Cookie for the next registration.
    pub(super) cookie: [u8; COOKIE_LEN],
    /// Sequence number of the last registration sent to it, and when.
    pub(super) sent_seq: u64,
    pub(super) sent_at: Option<Instant>,
    /// Highest sequence number it acknowledged.
    pub(super) acked_seq: u64,
    /// Registration round trip time.
    pub(super) rtt: Option<Duration>,
    /// First relayed datagram sent through it since it last showed life.
    pub(super) relay_wait: Option<Instant>,
    /// An early registration checking that it is alive, not answered yet.
    pub(super) check_sent: Option<Instant>,
    /// When the last check was answered.
    pub(super) check_ok: Option<Instant>,
    /// Declared down by an unanswered check (until its next acknowledgement).
    pub(super) failed: bool,
    /// Last registration sent at once on a cookie message.
    pub(super) cookie_resend: Option<Instant>,
    /// Last registration sent at once on a prompt (a cookie message answering none).
    pub(super) prompt_resend: Option<Instant>,
    /// When the next registration is due (`None`: at once).
    pub(super) next_register: Option<Instant>,
    /// Registrations sent since the last acknowledgement.
    pub(super) unanswered: u32,
    /// Its epoch, from its last acknowledgement (`None`: no acknowledgement yet).
    pub(super) epoch: Option<u64>,
    /// The list version its last acknowledgement named: no complete list older than it
    /// is taken.
    pub(super) ack_version: u64,
    /// Highest list version taken from it in this epoch: peer information only moves
    /// forward ([`NO_LIST`]: none).
    pub(super) applied: u64,
    /// Version of the complete peer list held from it ([`NO_LIST`]: none).
    pub(super) list_version: u64,
    /// A complete list coming in: its version and the next part expected.
    pub(super) list_part: Option<(u64, u16)>,
}

impl EdgeCore {
    pub(super) fn sn_up(&self, i: usize, now: Instant) -> bool {
        let s = &self.sns[i];
        !s.failed
            && s.last_ack.is_some_and(|t| {
                now.saturating_duration_since(t) < self.cfg.timers.supernode_down_after
            })
    }

    /// The supernode to relay through for a peer: the one its last relayed packet came
    /// through if that is up (both directions then switch together), else an up one that
    /// lists it, else any up one, else the first configured.
    pub(super) fn relay_sn(
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
    pub(super) fn note_relay_tx(&mut self, sn: SocketAddr, now: Instant) {
        if let Some(s) = self.sns.iter_mut().find(|s| s.addr == sn) {
            s.relay_wait.get_or_insert(now);
        }
    }

    /// Notes an authenticated packet relayed by supernode `i`: it is alive.
    pub(super) fn note_sn_alive(&mut self, i: usize) {
        let s = &mut self.sns[i];
        s.relay_wait = None;
        s.check_sent = None;
    }

    pub(super) fn on_ack(&mut self, now: Instant, i: usize, pkt: &[u8]) {
        let v = match RegisterAck::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.into()),
        };
        let a = &v.msg;
        if a.community != self.keys.id || a.edge != self.id {
            return self.drop(DropReason::AckNotForUs);
        }
        let s = &self.sns[i];
        let key = match s.key {
            Some(k) if k != a.sn_key => return self.drop(DropReason::SnKeyMismatch),
            Some(k) => k,
            None => a.sn_key,
        };
        // Each registration is acknowledged once: older or unsent numbers are replays.
        if a.seq <= s.acked_seq || a.seq > s.sent_seq {
            return self.drop(DropReason::StaleAck);
        }
        if !snkey::verify(&key, v.signed, v.sig) {
            return self.drop(DropReason::BadSignature);
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
        if s.epoch != Some(a.epoch) {
            // A new run of the supernode: nothing it sent before counts.
            s.epoch = Some(a.epoch);
            s.applied = NO_LIST;
            s.list_version = NO_LIST;
            s.list_part = None;
        }
        s.ack_version = a.version;
        s.key = Some(key);
        s.last_ack = Some(now);
        s.observed = Some(a.observed);
        s.cookie = a.cookie;
        s.acked_seq = a.seq;
        s.failed = false;
        s.unanswered = 0;
        if s.check_sent.take().is_some() {
            s.check_ok = Some(now);
        }
        s.relay_wait = None;
        if a.seq == s.sent_seq {
            if let Some(t) = s.sent_at {
                s.rtt = Some(now.saturating_duration_since(t));
            }
        }
        // The list held is still the supernode's: everyone it listed is still there.
        if a.version != NO_LIST && a.version == s.list_version {
            let bit = 1u64 << i;
            for p in self.peers.values_mut() {
                if p.listed_by & bit != 0 {
                    p.last_listed = Some(now);
                }
            }
        }
    }

    /// A cookie message: our registration's source address was not validated yet (first
    /// contact, a new NAT mapping or a restarted supernode). Registers again at once with
    /// the cookie, at most once per `handshake_retry`.
    ///
    /// With [`PROMPT_SEQ`] it answers no registration: the supernode dropped what we
    /// relayed through it because it does not have us (it restarted, or our address
    /// changed). Registers at once with its cookie, at most once per `handshake_retry`
    /// apart from the answers to cookies (anyone can forge it; the registration is
    /// signed and checked as ever, and a wrong cookie costs one cookie round more).
    pub(super) fn on_cookie(&mut self, now: Instant, i: usize, pkt: &[u8], out: &mut Outbox) {
        let c = match Cookie::decode(pkt) {
            Ok(c) => c,
            Err(e) => return self.drop(e.into()),
        };
        let retry = self.cfg.timers.handshake_retry;
        let s = &mut self.sns[i];
        if c.edge != self.id {
            return self.drop(DropReason::CookieNotForUs);
        }
        if c.seq == PROMPT_SEQ {
            if s.prompt_resend
                .is_some_and(|t| now.saturating_duration_since(t) < retry)
            {
                return self.drop(DropReason::PromptTooSoon);
            }
            s.prompt_resend = Some(now);
            s.cookie = c.cookie;
            return self.send_register(now, i, out);
        }
        if c.seq != s.sent_seq {
            return self.drop(DropReason::CookieNotForUs);
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

    pub(super) fn on_peer_info(&mut self, now: Instant, i: usize, pkt: &[u8]) {
        let v = match PeerInfo::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.into()),
        };
        let s = &self.sns[i];
        let Some(key) = s.key else {
            return self.drop(DropReason::SnKeyUnknown);
        };
        let info = &v.msg;
        if info.community != self.keys.id {
            return self.drop(DropReason::InfoNotForUs);
        }
        // The same signed bytes go to every member, so they are bound to the supernode's
        // run (epoch) and to the community's history (version), which only moves
        // forward: anything older than what was taken is a replay, and a complete list
        // must be at least as new as the last acknowledgement said.
        let fresh = match info.kind {
            InfoKind::Full => info.version >= s.applied && info.version >= s.ack_version,
            InfoKind::Update | InfoKind::Gone => info.version > s.applied,
        };
        if s.epoch != Some(info.epoch) || !fresh {
            return self.drop(DropReason::StaleInfo);
        }
        if !snkey::verify(&key, v.signed, v.sig) {
            return self.drop(DropReason::BadSignature);
        }
        let bit = 1u64 << i;
        let info = v.msg;
        let s = &mut self.sns[i];
        s.applied = s.applied.max(info.version);
        match info.kind {
            InfoKind::Full => {
                if info.part == 0 {
                    // A new complete list: it alone says whom this supernode lists, and
                    // none is held until its last part came.
                    s.list_part = Some((info.version, 0));
                    s.list_version = NO_LIST;
                    for p in self.peers.values_mut() {
                        p.listed_by &= !bit;
                    }
                }
                s.list_part = match s.list_part {
                    Some((v, p)) if v == info.version && p == info.part => {
                        if p + 1 >= info.parts {
                            s.list_version = v;
                            None
                        } else {
                            Some((v, p + 1))
                        }
                    }
                    // A part missed: the version stays, the next registration asks again.
                    _ => None,
                };
            }
            InfoKind::Update | InfoKind::Gone => {
                if s.list_version != NO_LIST && info.version == s.list_version.wrapping_add(1) {
                    s.list_version = info.version;
                }
            }
        }
        if info.kind == InfoKind::Gone {
            for e in &info.peers {
                if let Some(p) = self.peers.get_mut(&e.id) {
                    p.listed_by &= !bit;
                }
            }
            return;
        }
        let mut named = Vec::new();
        for e in info.peers {
            if e.id == self.id {
                continue;
            }
            let new = !self.peers.contains_key(&e.id);
            let Some(p) = self.peer_entry(e.id, now) else {
                continue;
            };
            let renamed = new || p.name != e.name;
            p.observed = Some(e.observed);
            p.locals = e.local_addrs;
            p.listed_by |= bit;
            p.last_listed = Some(now);
            if renamed {
                tracing::info!(peer = %e.name, id = %hex(&e.id), observed = %e.observed, "peer introduced");
                self.peers.set_name(&e.id, e.name);
                named.push(e.id);
            }
        }
        for id in named {
            self.l2_retire_namesakes(&id);
        }
    }

    pub(super) fn poll_register(&mut self, now: Instant, out: &mut Outbox) {
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
            if self.sns[i].next_register.is_some_and(|n| now < n) {
                continue;
            }
            self.send_register(now, i, out);
        }
    }

    /// Sends a registration (signed, with the supernode's last cookie) to supernode `i`.
    pub(super) fn send_register(&mut self, now: Instant, i: usize, out: &mut Outbox) {
        self.reg_seq += 1;
        let m = Register {
            cookie: self.sns[i].cookie,
            community: self.keys.id,
            edge_key: self.reg_pub,
            seq: self.reg_seq,
            known: self.sns[i].list_version,
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
                self.drop(DropReason::NoRoom);
            }
        }
        let wait = self.register_wait(i, now);
        let s = &mut self.sns[i];
        s.last_sent = Some(now);
        s.sent_seq = self.reg_seq;
        s.sent_at = Some(now);
        s.unanswered = s.unanswered.saturating_add(1);
        s.next_register = Some(now + wait);
    }

    /// How long after a registration sent now the next one to supernode `i` is due: the
    /// refresh interval while it answers, a doubling backoff while it does not; drawn
    /// from the upper part of that (80-100 % and 50-100 %), so edges that started or
    /// lost a supernode together do not register in step.
    fn register_wait(&mut self, i: usize, now: Instant) -> Duration {
        let t = &self.cfg.timers;
        let (wait, low) = if self.sn_up(i, now) {
            (t.register_interval, 0.8)
        } else {
            let base = t.register_interval.min(Duration::from_secs(1));
            let k = self.sns[i].unanswered.min(16);
            (
                base.saturating_mul(1 << k)
                    .min(t.register_backoff_max.max(base)),
                0.5,
            )
        };
        // A failing generator only loses the jitter.
        let u = self.rng.next_u64().unwrap_or(u64::MAX);
        let f = low + (1.0 - low) * (u >> 11) as f64 / (1u64 << 53) as f64;
        wait.mul_f64(f)
    }

    /// Adds the timers of supernode `s` to `d` (as [`EdgeCore::poll_register`] runs
    /// them).
    pub(super) fn register_deadline(&self, s: &SnState, d: &mut Earliest) {
        let t = &self.cfg.timers;
        // Up until its acknowledgements are too old (as of the last poll).
        let up_until = s
            .last_ack
            .map(|a| a + t.supernode_down_after)
            .filter(|u| !s.failed && *u > self.last_poll);
        if let Some(u) = up_until {
            // It goes down then: registrations get more frequent.
            d.add(u);
            let wait = t.relay_check_timeout.max(s.rtt.unwrap_or_default() * 4);
            match (s.check_sent, s.relay_wait) {
                (Some(c), _) => d.add(c + wait),
                (None, Some(w)) => d.add(
                    (w + t.relay_silence).max(s.check_ok.map_or(w, |k| k + t.relay_check_every)),
                ),
                _ => {}
            }
        }
        d.add(s.next_register.unwrap_or(self.last_poll));
    }
}
