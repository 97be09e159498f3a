//! Sealing and opening transport messages (data and probes), direct or through a
//! supernode.

use std::net::SocketAddr;
use std::time::Instant;

// Looked up for every packet: a seeded fast hash instead of SipHash.

use crate::crypto::EdgeAad;
use crate::outbox::Outbox;
use crate::wire::{
    self, EdgeId, MsgType, RelayHdr, TransportHdr, DATA_CSUM_PARTIAL, TRANSPORT_HDR_LEN,
};

use super::drops::DropReason;
use super::{EdgeCore, Via, HEADROOM};

impl EdgeCore {
    /// Seals a transport message to a peer and queues it: to `to` if given, else to the
    /// peer's direct address, else through a supernode. False when there is no usable
    /// session.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn send_transport(
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
            self.drop(DropReason::FrameTooBig);
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
            self.drop(DropReason::NoRoom);
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
    pub(super) fn send_edge_packet(
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

    pub(super) fn on_transport(
        &mut self,
        now: Instant,
        via: Via,
        pkt: &mut [u8],
        out: &mut Outbox,
    ) {
        let hdr = match TransportHdr::decode(pkt) {
            Ok(h) => h,
            Err(e) => return self.drop(e.into()),
        };
        let Some(pid) = self.index.get(&hdr.receiver_index).copied() else {
            return self.drop(DropReason::UnknownSession);
        };
        if let Via::Relayed { src, .. } = via {
            if src != pid {
                return self.drop(DropReason::RelayMismatch);
            }
        }
        let community = self.keys.id;
        let me = self.id;
        let Some(p) = self.peers.get_mut(&pid) else {
            return self.drop(DropReason::UnknownSession);
        };
        let Some((s, slot)) = p.session_mut(hdr.receiver_index) else {
            return self.drop(DropReason::UnknownSession);
        };
        if !s.replay.check(hdr.counter) {
            return self.drop(DropReason::Replay);
        }
        let (head, body) = pkt.split_at_mut(TRANSPORT_HDR_LEN);
        let aad = EdgeAad::new(&community, &pid, &me, head);
        let n = match s.recv.open(hdr.counter, aad.as_bytes(), body) {
            Ok(n) => n,
            Err(e) => return self.drop(e.into()),
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
            _ => self.on_probe(now, via, &pid, &hdr, n, pkt, out),
        }
    }
}
