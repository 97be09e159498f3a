//! Sessions: handshakes (initiator and responder), rekeying and session lifetimes.

use std::time::Instant;

// Looked up for every packet: a seeded fast hash instead of SipHash.

use crate::crypto::AeadKey;
use crate::outbox::Outbox;
use crate::replay::ReplayWindow;
use crate::wire::{self, EdgeId, HandshakeInit, HandshakeResp};

use super::drops::DropReason;
use super::peer::*;
use super::table::DeadlineCtx;
use super::{Earliest, EdgeCore, Timers, Via};

impl EdgeCore {
    pub(super) fn start_handshake(&mut self, now: Instant, id: &EdgeId, out: &mut Outbox) {
        // Counted as an attempt even if it fails here: the next one waits its turn.
        if let Some(p) = self.peers.get_mut(id) {
            p.last_init_sent = Some(now);
        }
        let index = self.new_index();
        self.hs_ts += 1;
        let st = match self.keys.handshake_init(
            self.rng.ring(),
            self.cfg.cipher,
            &self.id,
            id,
            index,
            self.hs_ts,
        ) {
            Ok(s) => s,
            Err(e) => return self.drop(e.into()),
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
        p.pending = Some(Box::new(Pending {
            state: st,
            sent: now,
        }));
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

    pub(super) fn on_init(&mut self, now: Instant, via: Via, pkt: &[u8], out: &mut Outbox) {
        let init = match HandshakeInit::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.into()),
        };
        if let Via::Relayed { src, .. } = via {
            if src != init.src {
                return self.drop(DropReason::RelayMismatch);
            }
        }
        if init.src == self.id {
            return self.drop(DropReason::OwnPacket);
        }
        if !self.keys.verify_init(&self.id, &init) {
            return self.drop(DropReason::AuthFailed);
        }
        if init.cipher != self.cfg.cipher as u8 {
            return self.drop(DropReason::CipherMismatch);
        }
        let index = self.new_index();
        let Some(p) = self.peer_entry(init.src, now) else {
            return;
        };
        if init.ts <= p.last_init_ts {
            // The same init arrives once relayed and once direct: only the first counts.
            let reason = if init.ts == p.last_init_ts {
                DropReason::DuplicateHandshake
            } else {
                DropReason::Replay
            };
            return self.drop(reason);
        }
        p.last_init_ts = init.ts;
        let (resp, keys) =
            match self
                .keys
                .handshake_respond(self.rng.ring(), &self.id, &init, index)
            {
                Ok(v) => v,
                Err(e) => return self.drop(e.into()),
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
        if let Some(old) = p.next.replace(Box::new(s)) {
            self.index.remove(&old.local_index);
        }
        self.index.insert(index, init.src);
        self.authentic_from(&init.src, via, now);
        let mut b = [0u8; wire::HS_RESP_LEN];
        if resp.encode(&mut b).is_ok() {
            self.send_edge_packet(now, &init.src, &b, via, out);
        }
    }

    pub(super) fn on_resp(&mut self, now: Instant, via: Via, pkt: &[u8], out: &mut Outbox) {
        let resp = match HandshakeResp::decode(pkt) {
            Ok(v) => v,
            Err(e) => return self.drop(e.into()),
        };
        if let Via::Relayed { src, .. } = via {
            if src != resp.src {
                return self.drop(DropReason::RelayMismatch);
            }
        }
        let Some(p) = self.peers.get_mut(&resp.src) else {
            return self.drop(DropReason::UnexpectedResp);
        };
        let ok = p.pending.as_ref().is_some_and(|pd| {
            pd.state.init.sender_index == resp.receiver_index
                && self.keys.verify_resp(&self.id, &pd.state.init, &resp)
        });
        if !ok {
            return self.drop(DropReason::UnexpectedResp);
        }
        let Some(pd) = p.pending.take() else {
            return;
        };
        let local_index = pd.state.init.sender_index;
        let keys = match self.keys.handshake_finish(&self.id, pd.state, &resp) {
            Ok(k) => k,
            Err(e) => {
                self.index.remove(&local_index);
                return self.drop(e.into());
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
        p.prev = p.cur.replace(Box::new(s));
        let first = p.prev.is_none();
        if first {
            tracing::info!(peer = %p.name, "session established");
        }
        if let Some(old) = old {
            self.index.remove(&old.local_index);
        }
        // Confirms the session at the responder and starts path probing.
        let pid = resp.src;
        self.authentic_from(&pid, via, now);
        self.send_probe(now, &pid, None, out);
        if first {
            self.l2_session_up(now, &pid, out);
        }
    }

    /// Session timers of one peer: lifetimes, handshake retries, rekeying.
    pub(super) fn poll_sessions(
        &mut self,
        now: Instant,
        id: &EdgeId,
        t: &Timers,
        out: &mut Outbox,
    ) {
        let my_id = self.id;
        let Some(p) = self.peers.get_mut(id) else {
            return;
        };
        // Drop sessions past their life.
        let mut lapsed = false;
        if p.cur
            .as_ref()
            .is_some_and(|s| now.saturating_duration_since(s.created) >= t.reject_after_time)
        {
            if let Some(s) = p.cur.take() {
                self.index.remove(&s.local_index);
                lapsed = true;
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
        if lapsed {
            self.l2_session_lapsed(id);
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
    }
}

impl Peer {
    /// Adds the session timers to `d` (as [`EdgeCore::poll_sessions`] runs them).
    pub(super) fn session_deadline(&self, c: &DeadlineCtx, d: &mut Earliest) {
        let t = c.timers;
        let due = c.due;
        for s in [&self.cur, &self.prev].into_iter().flatten() {
            d.add(s.created + t.reject_after_time);
        }
        if let Some(s) = &self.next {
            d.add(s.created + t.handshake_retry * 10);
        }
        if let Some(pd) = &self.pending {
            d.add(pd.sent + t.handshake_retry * 5);
        }
        let need_at = match &self.cur {
            None if self.listed_by == 0 && self.last_rx.is_none() => None,
            None if c.me < self.id => Some(due),
            None => Some(self.first_seen + t.handshake_defer),
            Some(s) if s.send_ctr >= t.rekey_after_packets => Some(due),
            Some(s) if s.initiator => Some(s.created + t.rekey_after_time),
            Some(s) => Some(s.created + t.rekey_after_time + t.handshake_retry * 10),
        };
        if let Some(need_at) = need_at {
            let retry_at = self.last_init_sent.map_or(due, |l| l + t.handshake_retry);
            d.add(need_at.max(retry_at));
        }
    }
}
