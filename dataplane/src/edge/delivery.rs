//! Frames: from the TAP device to peers (unicast, TSO batches, floods, broadcasts) and
//! from peers to the TAP device (MAC learning).

use std::time::Instant;

// Looked up for every packet: a seeded fast hash instead of SipHash.

use crate::crypto::EdgeAad;
use crate::eth;
use crate::l2;
use crate::offload::{self, VnetHdr};
use crate::outbox::Outbox;
use crate::replay::ReplayWindow;
use crate::wire::{
    self, EdgeId, MsgType, RelayHdr, TransportHdr, DATA_CSUM_PARTIAL, MAX_BCAST_DSTS,
    RELAY_HDR_LEN, TRANSPORT_HDR_LEN,
};

use super::drops::DropReason;
use super::l2::L2Seen;
use super::{max_frame, EdgeCore, SEG_SCRATCH};

impl EdgeCore {
    /// Handles one Ethernet frame read from the TAP device.
    pub fn handle_tap(&mut self, now: Instant, frame: &[u8], out: &mut Outbox) {
        self.tap_frame(now, frame, out);
        self.reindex();
    }

    fn tap_frame(&mut self, now: Instant, frame: &[u8], out: &mut Outbox) {
        let Some((dst, src)) = eth::macs(frame) else {
            return self.drop(DropReason::RuntFrame);
        };
        if frame.len() > max_frame(out.buf_size()) {
            return self.drop(DropReason::FrameTooBig);
        }
        self.tap_rx += 1;
        // A MAC we had behind a peer now speaks from our side: the VM moved here.
        if !src.is_group() && self.macs.remove(&src).is_some() {
            self.l2_moved_here(now, src);
        }
        let seen = if l2::worth_a_look(frame) {
            self.l2_tap_frame(now, src, dst.is_group(), frame, out)
        } else {
            L2Seen::Other
        };
        if seen == L2Seen::Handled {
            return;
        }
        if dst.is_group() {
            self.l2_seen_local(now, src);
        } else {
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
        if self.l2_admit_flood(now, src, frame, seen) {
            self.flood(now, frame, out);
        }
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
        self.tap_tso(now, hdr, frame, max_frame, out);
        self.reindex();
    }

    fn tap_tso(
        &mut self,
        now: Instant,
        hdr: &VnetHdr,
        frame: &[u8],
        max_frame: usize,
        out: &mut Outbox,
    ) {
        let Some((dst, src)) = eth::macs(frame) else {
            return self.drop(DropReason::RuntFrame);
        };
        if !src.is_group() && self.macs.remove(&src).is_some() {
            self.l2_moved_here(now, src);
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
        // Made on the first oversized frame: most edges never get one.
        if scratch.is_empty() {
            scratch = vec![0u8; SEG_SCRATCH];
        }
        let r = offload::segment_tcp(hdr, frame, max_frame, &mut scratch, |s| {
            self.tap_frame(now, s, out)
        });
        self.seg_scratch = scratch;
        if r.is_err() {
            self.drop(DropReason::BadTsoFrame);
        }
    }

    /// The GSO fast path; `Ok(false)` when it does not apply.
    pub(super) fn send_tso_batch(
        &mut self,
        now: Instant,
        pid: &EdgeId,
        hdr: &VnetHdr,
        frame: &[u8],
        max_frame: usize,
        out: &mut Outbox,
    ) -> Result<bool, DropReason> {
        let f = offload::parse_tcp(frame).ok_or(DropReason::BadTsoFrame)?;
        if (hdr.gso_type & !offload::GSO_ECN == offload::GSO_TCPV4) != f.v4 {
            return Err(DropReason::BadTsoFrame);
        }
        let mss = usize::from(hdr.gso_size).min(max_frame.saturating_sub(f.hdr_len));
        if mss == 0 {
            return Err(DropReason::BadTsoFrame);
        }
        let payload_len = frame.len() - f.hdr_len;
        let n = offload::tso_segments(payload_len, mss);
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
        let p = self.peers.get_mut(pid).ok_or(DropReason::UnknownPeer)?;
        let s = p.cur.as_mut().ok_or(DropReason::NoSession)?;
        let mut buf: Option<Vec<u8>> = None;
        let mut off = 0;
        let mut count = 0;
        let mut sent = 0u64;
        for i in 0..n {
            let b = buf.get_or_insert_with(|| out.take_big());
            if prefix > 0 {
                let _ = relay.write(&mut b[off..]);
            }
            let t = off + prefix;
            let body = t + TRANSPORT_HDR_LEN;
            // Checksums stay partial: the receiving edge hands them to its TAP to complete.
            let seg_len = offload::write_tso_segment(frame, &f, mss, i, &mut b[body..], false)
                .map_err(|_| DropReason::BadTsoFrame)?;
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
                .map_err(DropReason::from)?;
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

    pub(super) fn flood(&mut self, now: Instant, frame: &[u8], out: &mut Outbox) {
        self.flooded += 1;
        let mut via_sn = std::mem::take(&mut self.scratch_dsts);
        via_sn.clear();
        let ids: Vec<EdgeId> = self.peers.keys().copied().collect();
        let to = self.l2_flood_to(frame);
        for id in ids {
            if !self.l2_peer_wants(&to, &id) {
                continue;
            }
            let direct = self
                .peers
                .get(&id)
                .is_some_and(|p| p.direct.is_some() && p.cur.is_some());
            if direct && self.send_transport(now, &id, MsgType::Data, 0, frame, None, out) {
                self.flooded_wan_bytes += frame.len() as u64;
            } else {
                via_sn.push(id);
            }
        }
        for chunk in via_sn.chunks(MAX_BCAST_DSTS) {
            self.send_bcast(now, frame, chunk, out);
            self.flooded_wan_bytes += frame.len() as u64;
        }
        self.scratch_dsts = via_sn;
    }

    pub(super) fn send_bcast(
        &mut self,
        now: Instant,
        frame: &[u8],
        dsts: &[EdgeId],
        out: &mut Outbox,
    ) {
        if dsts.is_empty() {
            return;
        }
        let mut b = out.take();
        let ctr = self.bcast_ctr;
        self.bcast_ctr += 1;
        let Ok(hl) = wire::write_bcast_header(&mut b, &self.keys.id, &self.id, ctr, dsts) else {
            out.give(b, false);
            return self.drop(DropReason::NoRoom);
        };
        b[2] = self.cfg.cipher as u8;
        if b.len() < hl + frame.len() + wire::TAG_LEN {
            out.give(b, false);
            return self.drop(DropReason::FrameTooBig);
        }
        b[hl..hl + frame.len()].copy_from_slice(frame);
        let (head, body) = b.split_at_mut(hl);
        let Ok(n) = self.bcast_tx.seal(ctr, head, body, frame.len()) else {
            out.give(b, false);
            return self.drop(DropReason::NoRoom);
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

    pub(super) fn on_bcast(&mut self, now: Instant, sn: usize, pkt: &mut [u8], out: &mut Outbox) {
        let (src, counter, hl, cipher) = match wire::decode_bcast(pkt) {
            Ok(v) => {
                if v.community != self.keys.id
                    || v.src == self.id
                    || !(v.dsts.is_empty() || v.dsts.contains(&self.id))
                {
                    return self.drop(DropReason::BcastNotForUs);
                }
                (v.src, v.counter, v.header.len(), pkt[2])
            }
            Err(e) => return self.drop(e.into()),
        };
        if cipher != self.cfg.cipher as u8 {
            return self.drop(DropReason::CipherMismatch);
        }
        // A sender we do not know yet becomes a peer only once its frame authenticates.
        let mut fresh = match self.peers.get_mut(&src).and_then(|p| p.bcast_rx.take()) {
            Some(k) => k,
            None => Box::new((
                self.keys.bcast_key(self.cfg.cipher, &src),
                ReplayWindow::new(),
            )),
        };
        let (key, replay) = &mut *fresh;
        let opened = if replay.check(counter) {
            let (head, body) = pkt.split_at_mut(hl);
            key.open(counter, head, body).map_err(DropReason::from)
        } else {
            Err(DropReason::Replay)
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
    pub(super) fn deliver(
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
            return self.drop(DropReason::RuntFrame);
        };
        if let Some(p) = self.peers.get_mut(pid) {
            p.stats.rx_packets += 1;
            p.stats.rx_bytes += len as u64;
            p.last_rx = Some(now);
        }
        let mut moved = false;
        if !src.is_group() {
            let n = self.macs.len();
            match self.macs.get_mut(&src) {
                Some(e) => {
                    moved = e.0 != *pid;
                    *e = (*pid, now)
                }
                None if n < self.cfg.max_macs => {
                    moved = true;
                    self.macs.insert(src, (*pid, now));
                    // The first MAC since the last sweep sets when the next one is due.
                    self.mac_expiry_at
                        .get_or_insert(now + self.cfg.timers.mac_expiry);
                }
                None => self.drop(DropReason::MacTableFull),
            }
        }
        if moved || l2::worth_a_look(frame) {
            self.l2_from_peer(now, src, moved, frame);
        }
        out.push_tap(frame, partial_csum);
        self.tap_tx += 1;
    }
}
