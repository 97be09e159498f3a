//! Offloads done in user space, pure: the `virtio_net_hdr` of TAP frames, Internet
//! checksums, TCP segmentation of TSO super-frames (re-segmented to fit the underlay)
//! and coalescing of consecutive TCP segments into one super-frame for the TAP device.

/// Length of `struct virtio_net_hdr`.
pub const VNET_HDR_LEN: usize = 10;
/// The checksum at `csum_start + csum_offset` must be completed.
pub const F_NEEDS_CSUM: u8 = 1;
/// The checksum has been verified.
pub const F_DATA_VALID: u8 = 2;
/// No segmentation.
pub const GSO_NONE: u8 = 0;
/// TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// TCP over IPv6.
pub const GSO_TCPV6: u8 = 4;
/// ECN bit of gso_type.
pub const GSO_ECN: u8 = 0x80;

/// A parsed `virtio_net_hdr` (little-endian fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// Flags.
    pub flags: u8,
    /// GSO type.
    pub gso_type: u8,
    /// Header length hint.
    pub hdr_len: u16,
    /// Segment payload size.
    pub gso_size: u16,
    /// Checksum start.
    pub csum_start: u16,
    /// Checksum field offset from `csum_start`.
    pub csum_offset: u16,
}

impl VnetHdr {
    /// Parses the first 10 bytes.
    pub fn parse(b: &[u8]) -> Option<Self> {
        if b.len() < VNET_HDR_LEN {
            return None;
        }
        let u = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        Some(Self {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u(2),
            gso_size: u(4),
            csum_start: u(6),
            csum_offset: u(8),
        })
    }
    /// Writes 10 bytes.
    pub fn write(&self, b: &mut [u8]) {
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
    }

    /// Completes the partial checksum this header asks for (`F_NEEDS_CSUM`), as a NIC
    /// would before the frame leaves: for writers without checksum offload (a TAP
    /// without virtio header, AF_XDP). Frames without the flag are left as they are.
    pub fn complete_csum(&self, frame: &mut [u8]) -> Result<(), OffloadError> {
        if self.flags & F_NEEDS_CSUM == 0 {
            return Ok(());
        }
        complete_csum(
            frame,
            usize::from(self.csum_start),
            usize::from(self.csum_offset),
        )
    }
}

/// Errors of user-space offloads; each is a drop reason.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum OffloadError {
    /// Headers do not parse or do not match the offload request.
    #[error("bad offload frame")]
    BadFrame,
}

/// Adds `data` to a ones-complement sum (as 16-bit big-endian words).
pub fn csum_add(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let mut a = [0u8; 8];
        a.copy_from_slice(c);
        let (s, o) = sum.overflowing_add(u64::from_be_bytes(a));
        sum = s + u64::from(o);
    }
    let r = chunks.remainder();
    if !r.is_empty() {
        let mut a = [0u8; 8];
        a[..r.len()].copy_from_slice(r);
        let (s, o) = sum.overflowing_add(u64::from_be_bytes(a));
        sum = s + u64::from(o);
    }
    sum
}

/// Folds a sum to 16 bits (not complemented).
pub fn csum_fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum as u16
}

/// Completes a partial checksum as a NIC would: sums `frame[start..]` (whose checksum
/// field holds the pseudo-header sum) and stores the complement at `start + offset`.
pub fn complete_csum(frame: &mut [u8], start: usize, offset: usize) -> Result<(), OffloadError> {
    let at = start.checked_add(offset).ok_or(OffloadError::BadFrame)?;
    if at + 2 > frame.len() || start > frame.len() {
        return Err(OffloadError::BadFrame);
    }
    let c = !csum_fold(csum_add(0, &frame[start..]));
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    Ok(())
}

/// Positions of the headers of an Ethernet/IP/TCP frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TcpFrame {
    /// Offset of the IP header.
    pub ip: usize,
    /// IPv4 (else IPv6).
    pub v4: bool,
    /// Offset of the TCP header.
    pub tcp: usize,
    /// Length of all headers.
    pub hdr_len: usize,
}

/// Parses Ethernet (optionally one VLAN tag), IPv4 without fragments or IPv6 without
/// extension headers, and TCP.
pub fn parse_tcp(frame: &[u8]) -> Option<TcpFrame> {
    if frame.len() < 14 {
        return None;
    }
    let mut ip = 14;
    let mut et = u16::from_be_bytes([frame[12], frame[13]]);
    if et == 0x8100 {
        if frame.len() < 18 {
            return None;
        }
        et = u16::from_be_bytes([frame[16], frame[17]]);
        ip = 18;
    }
    let (v4, tcp) = match et {
        0x0800 => {
            let h = frame.get(ip..ip + 20)?;
            let ihl = usize::from(h[0] & 0xf) * 4;
            if h[0] >> 4 != 4 || ihl < 20 || h[9] != 6 {
                return None;
            }
            // No fragments.
            if u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0 {
                return None;
            }
            (true, ip + ihl)
        }
        0x86dd => {
            let h = frame.get(ip..ip + 40)?;
            if h[0] >> 4 != 6 || h[6] != 6 {
                return None;
            }
            (false, ip + 40)
        }
        _ => return None,
    };
    let th = frame.get(tcp..tcp + 20)?;
    let doff = usize::from(th[12] >> 4) * 4;
    if doff < 20 || tcp + doff > frame.len() {
        return None;
    }
    Some(TcpFrame {
        ip,
        v4,
        tcp,
        hdr_len: tcp + doff,
    })
}

fn pseudo_sum(frame: &[u8], f: &TcpFrame, tcp_len: usize) -> u64 {
    let mut s = 0u64;
    if f.v4 {
        s = csum_add(s, &frame[f.ip + 12..f.ip + 20]);
    } else {
        s = csum_add(s, &frame[f.ip + 8..f.ip + 40]);
    }
    let mut tail = [0u8; 8];
    tail[2..4].copy_from_slice(&((tcp_len >> 16) as u16).to_be_bytes());
    tail[4..6].copy_from_slice(&(tcp_len as u16).to_be_bytes());
    tail[7] = 6;
    csum_add(s, &tail)
}

/// Fixes lengths (and the IPv4 header checksum) of a TCP frame of `len` bytes; with
/// `full`, computes the TCP checksum, else stores the pseudo-header sum for the receiver's
/// checksum offload.
pub fn fix_headers(seg: &mut [u8], f: &TcpFrame, full: bool) {
    let len = seg.len();
    let tcp_len = len - f.tcp;
    if f.v4 {
        let tot = (len - f.ip) as u16;
        seg[f.ip + 2..f.ip + 4].copy_from_slice(&tot.to_be_bytes());
        seg[f.ip + 10..f.ip + 12].copy_from_slice(&[0, 0]);
        let c = !csum_fold(csum_add(0, &seg[f.ip..f.tcp]));
        seg[f.ip + 10..f.ip + 12].copy_from_slice(&c.to_be_bytes());
    } else {
        let pl = (len - f.ip - 40) as u16;
        seg[f.ip + 4..f.ip + 6].copy_from_slice(&pl.to_be_bytes());
    }
    seg[f.tcp + 16..f.tcp + 18].copy_from_slice(&[0, 0]);
    let ps = pseudo_sum(seg, f, tcp_len);
    let c = if full {
        !csum_fold(csum_add(ps, &seg[f.tcp..]))
    } else {
        csum_fold(ps)
    };
    seg[f.tcp + 16..f.tcp + 18].copy_from_slice(&c.to_be_bytes());
}

/// Number of segments a TSO payload of `payload_len` bytes is cut into, `mss` bytes each
/// (at least one: a super-frame without payload still carries its headers).
pub fn tso_segments(payload_len: usize, mss: usize) -> usize {
    payload_len.div_ceil(mss.max(1)).max(1)
}

/// Writes segment `i` of a TSO super-frame (`frame`, its headers at `f`, `mss` payload
/// bytes per segment) into the front of `seg`: the headers with the sequence number
/// advanced, the IPv4 id incremented, FIN and PSH kept on the last segment only and CWR
/// on the first only, lengths and the IPv4 checksum fixed, and the TCP checksum complete
/// (`full`) or left as the pseudo-header sum for the receiver's checksum offload.
/// Returns the segment's length; `BadFrame` when `i` is past the last segment, `mss` is
/// zero or `seg` is too short.
pub fn write_tso_segment(
    frame: &[u8],
    f: &TcpFrame,
    mss: usize,
    i: usize,
    seg: &mut [u8],
    full: bool,
) -> Result<usize, OffloadError> {
    let hl = f.hdr_len;
    let payload = frame.get(hl..).ok_or(OffloadError::BadFrame)?;
    let n = tso_segments(payload.len(), mss);
    if mss == 0 || i >= n {
        return Err(OffloadError::BadFrame);
    }
    let chunk = &payload[(i * mss).min(payload.len())..((i + 1) * mss).min(payload.len())];
    let len = hl + chunk.len();
    let seg = seg.get_mut(..len).ok_or(OffloadError::BadFrame)?;
    seg[..hl].copy_from_slice(&frame[..hl]);
    seg[hl..].copy_from_slice(chunk);
    let t = f.tcp;
    let seq0 = u32::from_be_bytes([frame[t + 4], frame[t + 5], frame[t + 6], frame[t + 7]]);
    let seq = seq0.wrapping_add((i * mss) as u32);
    seg[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
    let mut fl = frame[t + 13];
    if i + 1 < n {
        fl &= !(0x01 | 0x08); // FIN, PSH only on the last segment
    }
    if i > 0 {
        fl &= !0x80; // CWR only on the first
    }
    seg[t + 13] = fl;
    if f.v4 {
        let id0 = u16::from_be_bytes([frame[f.ip + 4], frame[f.ip + 5]]);
        let id = id0.wrapping_add(i as u16);
        seg[f.ip + 4..f.ip + 6].copy_from_slice(&id.to_be_bytes());
    }
    fix_headers(seg, f, full);
    Ok(len)
}

/// Splits a TSO super-frame into segments (payload: the smaller of the frame's own
/// segment size and what keeps a segment within `max_frame` bytes), with complete
/// checksums, calling `emit` with each. `scratch` must hold one segment.
pub fn segment_tcp(
    hdr: &VnetHdr,
    frame: &[u8],
    max_frame: usize,
    scratch: &mut [u8],
    mut emit: impl FnMut(&[u8]),
) -> Result<usize, OffloadError> {
    let f = parse_tcp(frame).ok_or(OffloadError::BadFrame)?;
    let want_v4 = hdr.gso_type & !GSO_ECN == GSO_TCPV4;
    if want_v4 != f.v4 {
        return Err(OffloadError::BadFrame);
    }
    let mss = usize::from(hdr.gso_size).min(max_frame.saturating_sub(f.hdr_len));
    if mss == 0 || f.hdr_len + mss > scratch.len() {
        return Err(OffloadError::BadFrame);
    }
    let n = tso_segments(frame.len() - f.hdr_len, mss);
    for i in 0..n {
        let len = write_tso_segment(frame, &f, mss, i, scratch, true)?;
        emit(&scratch[..len]);
    }
    Ok(n)
}

/// The header under which a TCP super-packet received without one (AF_XDP with GSO
/// through the port) takes the TSO path: segments of at most `mtu` bytes of IP packet,
/// checksum partial. `None` when `frame` is not TCP over IPv4/IPv6 as [`parse_tcp`]
/// reads it, or its headers leave no payload room within `mtu`.
pub fn tso_hdr(frame: &[u8], mtu: usize) -> Option<VnetHdr> {
    let f = parse_tcp(frame)?;
    let mss = mtu.checked_sub(f.hdr_len - f.ip).filter(|&m| m > 0)?;
    Some(VnetHdr {
        flags: F_NEEDS_CSUM,
        gso_type: if f.v4 { GSO_TCPV4 } else { GSO_TCPV6 },
        hdr_len: u16::try_from(f.hdr_len).ok()?,
        gso_size: u16::try_from(mss).ok()?,
        csum_start: u16::try_from(f.tcp).ok()?,
        csum_offset: 16,
    })
}

/// For a TCP or UDP frame over IPv4 (not a fragment) or IPv6 (no extension headers):
/// if its checksum field holds exactly the pseudo-header sum, i.e. the sender left the
/// checksum to an offload, returns where to complete it: `(start, offset, end)` for
/// [`complete_csum`] on `frame[..end]` (the IP packet, without Ethernet padding).
/// A complete checksum that happens to equal that sum is completed to itself, so the
/// test needs no flag from the sender.
pub fn partial_l4_csum(frame: &[u8]) -> Option<(usize, usize, usize)> {
    let mut ip = 14;
    let mut et = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    if et == 0x8100 {
        et = u16::from_be_bytes([*frame.get(16)?, *frame.get(17)?]);
        ip = 18;
    }
    let (proto, l4, end, mut sum) = match et {
        0x0800 => {
            let h = frame.get(ip..ip + 20)?;
            let ihl = usize::from(h[0] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([h[2], h[3]]));
            if h[0] >> 4 != 4
                || ihl < 20
                || total < ihl
                || u16::from_be_bytes([h[6], h[7]]) & 0x3fff != 0
            {
                return None;
            }
            (h[9], ip + ihl, ip + total, csum_add(0, &h[12..20]))
        }
        0x86dd => {
            let h = frame.get(ip..ip + 40)?;
            let pl = usize::from(u16::from_be_bytes([h[4], h[5]]));
            (h[6], ip + 40, ip + 40 + pl, csum_add(0, &h[8..40]))
        }
        _ => return None,
    };
    let offset = match proto {
        6 => 16,
        17 => 6,
        _ => return None,
    };
    if end > frame.len() || l4 + offset + 2 > end {
        return None;
    }
    let len = (end - l4) as u32;
    sum = csum_add(sum, &[0, 0, (len >> 8) as u8, len as u8, 0, 0, 0, proto]);
    let field = u16::from_be_bytes([frame[l4 + offset], frame[l4 + offset + 1]]);
    (field == csum_fold(sum)).then_some((l4, offset, end))
}

/// Coalesces consecutive in-order TCP segments of one flow into a super-frame written to
/// the TAP device with a GSO `virtio_net_hdr` (the kernel then treats it as one packet).
#[derive(Debug, Default)]
pub struct Coalescer {
    buf: Vec<u8>,
    /// Frame bytes in `buf` after the header room (0 when empty).
    len: usize,
    f: Option<TcpFrame>,
    seg_payload: usize,
    next_seq: u32,
    segs: usize,
    last_short: bool,
}

/// Largest super-frame built.
pub const MAX_COALESCED: usize = 62 * 1024;

impl Coalescer {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a frame is held.
    pub fn is_empty(&self) -> bool {
        self.f.is_none()
    }

    /// Tries to append `frame`; false when it cannot join (the caller finishes the held
    /// super-frame, then starts a new one or sends the frame alone).
    pub fn push(&mut self, frame: &[u8]) -> bool {
        let Some(f) = self.f else {
            return false;
        };
        let Some(g) = parse_tcp(frame) else {
            return false;
        };
        if g != f || self.last_short {
            return false;
        }
        let pl = frame.len() - g.hdr_len;
        if pl == 0 || pl > self.seg_payload || self.len + pl > MAX_COALESCED {
            return false;
        }
        let held = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + self.len];
        // Same addresses, ports, ack, window and TCP options; sequence must follow.
        // Same TOS/traffic class and TTL too: a CE mark must not be merged away.
        let tcp = f.tcp;
        if frame[..f.ip] != held[..f.ip]
            || (f.v4 && (frame[f.ip + 1] != held[f.ip + 1] || frame[f.ip + 8] != held[f.ip + 8]))
            || (!f.v4
                && (frame[f.ip..f.ip + 4] != held[f.ip..f.ip + 4]
                    || frame[f.ip + 7] != held[f.ip + 7]))
            || (f.v4 && frame[f.ip + 12..f.ip + 20] != held[f.ip + 12..f.ip + 20])
            || (!f.v4 && frame[f.ip + 8..f.ip + 40] != held[f.ip + 8..f.ip + 40])
            || frame[tcp..tcp + 4] != held[tcp..tcp + 4]
            || frame[tcp + 8..tcp + 12] != held[tcp + 8..tcp + 12]
            || frame[tcp + 14..tcp + 16] != held[tcp + 14..tcp + 16]
            || frame[tcp + 20..f.hdr_len] != held[tcp + 20..f.hdr_len]
        {
            return false;
        }
        let seq = u32::from_be_bytes([
            frame[tcp + 4],
            frame[tcp + 5],
            frame[tcp + 6],
            frame[tcp + 7],
        ]);
        let fl = frame[tcp + 13];
        // Only plain ACK (+PSH) segments join, and nothing after a PSH.
        if seq != self.next_seq || fl & !0x08 != 0x10 || held[tcp + 13] & 0x08 != 0 {
            return false;
        }
        let at = VNET_HDR_LEN + self.len;
        self.buf[at..at + pl].copy_from_slice(&frame[g.hdr_len..]);
        self.len += pl;
        self.next_seq = seq.wrapping_add(pl as u32);
        self.segs += 1;
        if fl & 0x08 != 0 {
            self.buf[VNET_HDR_LEN + tcp + 13] |= 0x08;
        }
        if pl < self.seg_payload {
            self.last_short = true;
        }
        true
    }

    /// Starts a new super-frame in `buf` (at least `VNET_HDR_LEN + MAX_COALESCED` bytes)
    /// with `frame` if it is a TCP data segment; gives `buf` back otherwise.
    pub fn start(&mut self, frame: &[u8], mut buf: Vec<u8>) -> Result<(), Vec<u8>> {
        if !self.is_empty() || buf.len() < VNET_HDR_LEN + MAX_COALESCED {
            return Err(buf);
        }
        let Some(f) = parse_tcp(frame) else {
            return Err(buf);
        };
        let pl = frame.len() - f.hdr_len;
        let fl = frame[f.tcp + 13];
        if pl == 0 || fl & !0x08 != 0x10 || frame.len() > MAX_COALESCED {
            return Err(buf);
        }
        buf[VNET_HDR_LEN..VNET_HDR_LEN + frame.len()].copy_from_slice(frame);
        self.buf = buf;
        self.len = frame.len();
        self.f = Some(f);
        self.seg_payload = pl;
        let seq = u32::from_be_bytes([
            frame[f.tcp + 4],
            frame[f.tcp + 5],
            frame[f.tcp + 6],
            frame[f.tcp + 7],
        ]);
        self.next_seq = seq.wrapping_add(pl as u32);
        self.segs = 1;
        self.last_short = false;
        Ok(())
    }

    /// Finishes the held super-frame: returns its buffer (frame at `VNET_HDR_LEN`), the
    /// frame length and the virtio header to write with it. Empty afterwards.
    pub fn finish(&mut self) -> Option<(Vec<u8>, usize, VnetHdr)> {
        let f = self.f.take()?;
        let len = self.len;
        self.len = 0;
        let mut buf = std::mem::take(&mut self.buf);
        let frame = &mut buf[VNET_HDR_LEN..VNET_HDR_LEN + len];
        // The TCP checksum is left to the kernel (pseudo-header sum + NEEDS_CSUM).
        fix_headers(frame, &f, false);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: if self.segs == 1 {
                GSO_NONE
            } else if f.v4 {
                GSO_TCPV4
            } else {
                GSO_TCPV6
            },
            hdr_len: f.hdr_len as u16,
            gso_size: if self.segs == 1 {
                0
            } else {
                self.seg_payload as u16
            },
            csum_start: f.tcp as u16,
            csum_offset: 16,
        };
        Some((buf, len, hdr))
    }
}

/// Receive-side coalescing for a frame source without TSO (AF_XDP): consecutive
/// in-order TCP data segments of one flow in a receive batch become one super-frame,
/// handed on with a GSO header as if a TAP device had delivered it with TSO, so that
/// the edge seals and sends it as one UDP GSO batch. Every other frame, and a segment
/// that does not join, is handed on alone and in order (the held super-frame first),
/// so no flow is reordered.
#[derive(Debug, Default)]
pub struct RxGro {
    co: Coalescer,
    spare: Option<Vec<u8>>,
}

impl RxGro {
    /// Empty.
    pub fn new() -> Self {
        Self::default()
    }

    /// Offers one received frame; `emit` gets `(None, frame)` for a frame passed on
    /// alone and `(Some(hdr), super_frame)` for a finished super-frame.
    pub fn push(&mut self, frame: &[u8], emit: &mut impl FnMut(Option<&VnetHdr>, &[u8])) {
        if self.co.push(frame) {
            return;
        }
        self.flush(emit);
        let buf = self
            .spare
            .take()
            .unwrap_or_else(|| vec![0u8; VNET_HDR_LEN + MAX_COALESCED]);
        if let Err(b) = self.co.start(frame, buf) {
            self.spare = Some(b);
            emit(None, frame);
        }
    }

    /// Hands on a frame that must not join a super-frame (a super-packet received
    /// whole, with the header `hdr` it takes the TSO path under, or `None`), after the
    /// held super-frame, so that nothing is reordered.
    pub fn push_alone(
        &mut self,
        hdr: Option<&VnetHdr>,
        frame: &[u8],
        emit: &mut impl FnMut(Option<&VnetHdr>, &[u8]),
    ) {
        self.flush(emit);
        emit(hdr, frame);
    }

    /// Hands on the held super-frame, if any (call at the end of each batch).
    pub fn flush(&mut self, emit: &mut impl FnMut(Option<&VnetHdr>, &[u8])) {
        let Some((buf, len, mut hdr)) = self.co.finish() else {
            return;
        };
        let frame = &buf[VNET_HDR_LEN..VNET_HDR_LEN + len];
        if hdr.gso_type == GSO_NONE {
            // A lone segment: its checksum now holds only the pseudo-header sum, so it
            // goes the super-frame way too (one segment of its own size).
            hdr.gso_type = match parse_tcp(frame) {
                Some(f) if f.v4 => GSO_TCPV4,
                _ => GSO_TCPV6,
            };
            hdr.gso_size = (len - usize::from(hdr.hdr_len)) as u16;
        }
        emit(Some(&hdr), frame);
        self.spare = Some(buf);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp_frame(payload: usize, seq: u32, flags: u8) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20 + payload];
        f[12] = 0x08;
        let ip = 14;
        f[ip] = 0x45;
        f[ip + 8] = 64;
        f[ip + 9] = 6;
        f[ip + 12..ip + 16].copy_from_slice(&[198, 19, 0, 2]);
        f[ip + 16..ip + 20].copy_from_slice(&[198, 19, 0, 3]);
        let t = 34;
        f[t..t + 2].copy_from_slice(&5000u16.to_be_bytes());
        f[t + 2..t + 4].copy_from_slice(&5201u16.to_be_bytes());
        f[t + 4..t + 8].copy_from_slice(&seq.to_be_bytes());
        f[t + 12] = 5 << 4;
        f[t + 13] = flags;
        for (i, b) in f[54..].iter_mut().enumerate() {
            *b = i as u8;
        }
        let p = parse_tcp(&f).unwrap();
        fix_headers(&mut f, &p, true);
        f
    }

    fn verify(frame: &[u8]) {
        let p = parse_tcp(frame).unwrap();
        assert_eq!(csum_fold(csum_add(0, &frame[p.ip..p.tcp])), 0xffff);
        let ps = pseudo_sum(frame, &p, frame.len() - p.tcp);
        assert_eq!(csum_fold(csum_add(ps, &frame[p.tcp..])), 0xffff);
    }

    #[test]
    fn checksum_known_value() {
        // RFC 1071 example words.
        let d = [0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7];
        assert_eq!(csum_fold(csum_add(0, &d)), 0xddf2);
        assert_eq!(
            csum_fold(csum_add(0, &d[..3])),
            csum_fold(csum_add(0, &[0, 1, 0xf2, 0]))
        );
    }

    #[test]
    fn segment_then_coalesce_restores_payload() {
        let big = tcp_frame(10_000, 1000, 0x18);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut scratch = vec![0u8; 2000];
        let mut segs = Vec::new();
        let n = segment_tcp(&hdr, &big, 1354, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(n, 8);
        assert_eq!(segs.len(), 8);
        for (i, s) in segs.iter().enumerate() {
            verify(s);
            let psh = s[34 + 13] & 0x08 != 0;
            assert_eq!(psh, i == 7);
        }
        let mut c = Coalescer::new();
        let buf = vec![0u8; VNET_HDR_LEN + MAX_COALESCED];
        c.start(&segs[0], buf).unwrap();
        for s in &segs[1..] {
            assert!(c.push(s));
        }
        let (out, len, h) = c.finish().unwrap();
        assert_eq!(h.gso_type, GSO_TCPV4);
        assert_eq!(h.gso_size, 1300);
        assert_eq!(len, big.len());
        assert_eq!(&out[VNET_HDR_LEN + 54..VNET_HDR_LEN + len], &big[54..]);
        assert!(c.is_empty());
        // An out-of-order segment does not join.
        c.start(&segs[0], out).unwrap();
        assert!(!c.push(&segs[2]));
    }

    /// Segments of one flow coalesce; an ACK, another flow and a gap end the
    /// super-frame and are passed on in their original order.
    #[test]
    fn rx_gro_keeps_order_and_coalesces() {
        let big = tcp_frame(1448 * 6, 5000, 0x10);
        let hdr = VnetHdr {
            flags: F_NEEDS_CSUM,
            gso_type: GSO_TCPV4,
            hdr_len: 54,
            gso_size: 1448,
            csum_start: 34,
            csum_offset: 16,
        };
        let mut scratch = vec![0u8; 2000];
        let mut segs = Vec::new();
        segment_tcp(&hdr, &big, 1514, &mut scratch, |s| segs.push(s.to_vec())).unwrap();
        assert_eq!(segs.len(), 6);
        let ack = tcp_frame(0, 77, 0x10);
        let mut other = segs[3].clone();
        other[34..36].copy_from_slice(&5001u16.to_be_bytes());
        let mut ce = segs[5].clone();
        ce[15] |= 0x03;
        // s0 s1 s2 | ack | other | s3 s4 | ce(s5)
        let input = [
            &segs[0], &segs[1], &segs[2], &ack, &other, &segs[3], &segs[4], &ce,
        ];
        let mut got: Vec<(Option<VnetHdr>, Vec<u8>)> = Vec::new();
        let mut g = RxGro::new();
        let mut emit = |h: Option<&VnetHdr>, f: &[u8]| got.push((h.copied(), f.to_vec()));
        for f in input {
            g.push(f, &mut emit);
        }
        g.flush(&mut emit);
        let shape: Vec<(bool, usize)> = got
            .iter()
            .map(|(h, f)| (h.is_some(), f.len() - 54))
            .collect();
        assert_eq!(
            shape,
            vec![
                (true, 3 * 1448),
                (false, 0),
                (true, 1448),
                (true, 2 * 1448),
                (true, 1448)
            ]
        );
        let (h, f) = &got[0];
        let h = h.unwrap();
        assert_eq!((h.gso_type, h.gso_size), (GSO_TCPV4, 1448));
        assert_eq!(&f[54..], &big[54..54 + 3 * 1448]);
        // Every super-frame re-segments into the original segments, checksums valid.
        let mut out = Vec::new();
        for (h, f) in &got {
            if let Some(h) = h {
                segment_tcp(h, f, 1514, &mut scratch, |s| out.push(s.to_vec())).unwrap();
            }
        }
        let want = [0, 1, 2, 3, 3, 4, 5];
        assert_eq!(out.len(), want.len());
        for (s, &i) in out.iter().zip(&want) {
            verify(s);
            assert_eq!(&s[54..], &segs[i][54..]);
        }
    }

    #[test]
    fn bad_frames_are_errors() {
        let hdr = VnetHdr {
            gso_type: GSO_TCPV4,
            gso_size: 1000,
            ..VnetHdr::default()
        };
        let mut scratch = vec![0u8; 2000];
        assert!(segment_tcp(&hdr, &[0u8; 20], 1000, &mut scratch, |_| {}).is_err());
        let f = tcp_frame(100, 1, 0x10);
        let h6 = VnetHdr {
            gso_type: GSO_TCPV6,
            ..hdr
        };
        assert!(segment_tcp(&h6, &f, 1000, &mut scratch, |_| {}).is_err());
        let mut f = f;
        assert!(complete_csum(&mut f, 200, 16).is_err());
    }

    /// One segment rewrite serves both the full-checksum segmentation and the partial
    /// one (pseudo-header sum left for the receiver): the same bytes apart from the
    /// TCP checksum, which the receiver's completion turns into the full one.
    #[test]
    fn tso_segment_partial_completes_to_full() {
        let big = tcp_frame(3000, 0xffff_fc00, 0x99);
        let p = parse_tcp(&big).unwrap();
        let mss = 1200;
        assert_eq!(tso_segments(3000, mss), 3);
        assert_eq!(tso_segments(0, mss), 1);
        let mut full = vec![0u8; 2000];
        let mut part = vec![0u8; 2000];
        for i in 0..3 {
            let n = write_tso_segment(&big, &p, mss, i, &mut full, true).unwrap();
            let m = write_tso_segment(&big, &p, mss, i, &mut part, false).unwrap();
            assert_eq!(n, m);
            assert_eq!(n, 54 + [1200, 1200, 600][i]);
            verify(&full[..n]);
            let seq = u32::from_be_bytes(full[38..42].try_into().unwrap());
            assert_eq!(seq, 0xffff_fc00u32.wrapping_add((i * mss) as u32));
            // FIN and PSH on the last only, CWR on the first only.
            assert_eq!(full[34 + 13], [0x90, 0x10, 0x19][i]);
            let h = VnetHdr {
                flags: F_NEEDS_CSUM,
                csum_start: 34,
                csum_offset: 16,
                ..VnetHdr::default()
            };
            h.complete_csum(&mut part[..m]).unwrap();
            assert_eq!(&part[..m], &full[..n]);
        }
        assert!(write_tso_segment(&big, &p, mss, 3, &mut full, true).is_err());
        assert!(write_tso_segment(&big, &p, 0, 0, &mut full, true).is_err());
        assert!(write_tso_segment(&big, &p, mss, 0, &mut full[..100], true).is_err());
        // Without the flag nothing is touched.
        let mut f = big.clone();
        VnetHdr::default().complete_csum(&mut f[..10]).unwrap();
        assert_eq!(f, big);
    }

    #[test]
    fn partial_checksums_are_told_from_complete_ones() {
        let full = tcp_frame(700, 1, 0x18);
        let p = parse_tcp(&full).unwrap();
        assert_eq!(partial_l4_csum(&full), None);
        let mut part = full.clone();
        fix_headers(&mut part, &p, false);
        assert_eq!(partial_l4_csum(&part), Some((34, 16, full.len())));
        // Ethernet padding is not summed.
        part.extend_from_slice(&[0xaa; 8]);
        let (start, offset, end) = partial_l4_csum(&part).unwrap();
        complete_csum(&mut part[..end], start, offset).unwrap();
        assert_eq!(&part[..end], &full[..]);
        // UDP over IPv4: the field is 6 bytes into the header.
        let mut udp = full.clone();
        udp[14 + 9] = 17;
        let ps = csum_add(0, &udp[26..34]);
        let l4 = (udp.len() - 34) as u16;
        let ps = csum_fold(csum_add(
            ps,
            &[0, 0, (l4 >> 8) as u8, l4 as u8, 0, 0, 0, 17],
        ));
        udp[40..42].copy_from_slice(&ps.to_be_bytes());
        assert_eq!(partial_l4_csum(&udp), Some((34, 6, udp.len())));
        // A fragment, another protocol, a truncated packet: left alone.
        let mut frag = part.clone();
        frag[14 + 6] = 0x20;
        assert_eq!(partial_l4_csum(&frag), None);
        let mut icmp = part.clone();
        icmp[14 + 9] = 1;
        assert_eq!(partial_l4_csum(&icmp), None);
        assert_eq!(partial_l4_csum(&full[..100]), None);
        assert_eq!(partial_l4_csum(&full[..10]), None);
    }

    #[test]
    fn super_packet_header_fits_the_mtu() {
        let big = tcp_frame(20_000, 7, 0x18);
        let h = tso_hdr(&big, 1500).unwrap();
        assert_eq!(
            (h.gso_type, h.gso_size, h.hdr_len, h.csum_start),
            (GSO_TCPV4, 1460, 54, 34)
        );
        let mut seg = vec![0u8; 1600];
        let n =
            write_tso_segment(&big, &parse_tcp(&big).unwrap(), 1460, 0, &mut seg, true).unwrap();
        assert_eq!(n, 14 + 1500);
        verify(&seg[..n]);
        assert_eq!(tso_hdr(&big, 40), None);
        let mut udp = big.clone();
        udp[14 + 9] = 17;
        assert_eq!(tso_hdr(&udp, 1500), None);
    }
}
