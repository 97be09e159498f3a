//! Buffers the pure cores write their output into; the I/O driver sends them and gives
//! the buffers back. No allocation per packet once the pools are warm.
//!
//! Frames for the TAP device can be coalesced here (consecutive TCP segments of one flow
//! become one super-frame with a GSO `virtio_net_hdr`), and datagrams can be queued as a
//! GSO batch (equal-size segments in one buffer).

use std::net::SocketAddr;

use crate::offload::{self, Coalescer, VnetHdr, VNET_HDR_LEN};

/// A datagram (or a GSO batch) to send: `buf[start..start + len]` to `dst`.
#[derive(Debug)]
pub struct UdpOut {
    /// Destination.
    pub dst: SocketAddr,
    /// Owning buffer.
    pub buf: Vec<u8>,
    /// Offset of the datagram in `buf`.
    pub start: usize,
    /// Length of the datagram (of all segments for a batch).
    pub len: usize,
    /// Segment size of a GSO batch (every segment but the last has this size).
    pub segment: Option<usize>,
    /// The buffer is from the large pool.
    pub big: bool,
}

impl UdpOut {
    /// The datagram bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// A frame to write to the TAP device: `buf[start..start + len]`, with `start >=
/// VNET_HDR_LEN` so the driver can put `hdr` in front when the device takes virtio headers.
#[derive(Debug)]
pub struct TapOut {
    /// Owning buffer.
    pub buf: Vec<u8>,
    /// Offset of the frame.
    pub start: usize,
    /// Length of the frame.
    pub len: usize,
    /// Offload header (checksum to complete, GSO).
    pub hdr: VnetHdr,
    /// The buffer is from the large pool.
    pub big: bool,
}

impl TapOut {
    /// Completes the frame's partial checksum, for a writer without checksum offload
    /// (see [`VnetHdr::complete_csum`]).
    pub fn complete_csum(&mut self) -> Result<(), offload::OffloadError> {
        self.hdr
            .complete_csum(&mut self.buf[self.start..self.start + self.len])
    }

    /// Writes `hdr` in front of the frame, for a TAP device that takes virtio headers;
    /// returns where header and frame start and their length.
    pub fn put_vnet_hdr(&mut self) -> (usize, usize) {
        let s = self.start - VNET_HDR_LEN;
        self.hdr.write(&mut self.buf[s..self.start]);
        (s, self.len + VNET_HDR_LEN)
    }
}

/// Size of large buffers (GSO batches, coalesced super-frames).
pub const BIG_BUF: usize = VNET_HDR_LEN + offload::MAX_COALESCED + 4096;

/// Output queues and pools of buffers.
#[derive(Debug)]
pub struct Outbox {
    /// Datagrams to send, in order.
    pub udp: Vec<UdpOut>,
    /// Frames to write, in order.
    pub tap: Vec<TapOut>,
    /// The driver can send GSO batches.
    pub gso: bool,
    /// Segment size limit of GSO batches (the underlay's UDP payload size).
    pub gso_max_segment: usize,
    buf_size: usize,
    pool: Vec<Vec<u8>>,
    big_pool: Vec<Vec<u8>>,
    coalescer: Option<Coalescer>,
}

impl Outbox {
    /// An outbox whose small buffers hold `buf_size` bytes (plus the TAP headroom).
    pub fn new(buf_size: usize) -> Self {
        Self {
            udp: Vec::with_capacity(256),
            tap: Vec::with_capacity(256),
            gso: false,
            gso_max_segment: 1472,
            buf_size: buf_size + VNET_HDR_LEN,
            pool: Vec::new(),
            big_pool: Vec::new(),
            coalescer: None,
        }
    }

    /// Turns on coalescing of TCP segments for the TAP device.
    pub fn enable_coalescing(&mut self) {
        self.coalescer = Some(Coalescer::new());
    }

    /// Size of each small buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Takes a small buffer.
    pub fn take(&mut self) -> Vec<u8> {
        self.pool.pop().unwrap_or_else(|| vec![0u8; self.buf_size])
    }

    /// Takes a large buffer.
    pub fn take_big(&mut self) -> Vec<u8> {
        self.big_pool.pop().unwrap_or_else(|| vec![0u8; BIG_BUF])
    }

    /// Returns a buffer to its pool.
    pub fn give(&mut self, mut b: Vec<u8>, big: bool) {
        if big {
            if self.big_pool.len() < 256 {
                b.resize(BIG_BUF, 0);
                self.big_pool.push(b);
            }
        } else if self.pool.len() < 4096 {
            b.resize(self.buf_size, 0);
            self.pool.push(b);
        }
    }

    /// Queues a datagram in a small buffer.
    pub fn push_udp(&mut self, dst: SocketAddr, buf: Vec<u8>, start: usize, len: usize) {
        self.udp.push(UdpOut {
            dst,
            buf,
            start,
            len,
            segment: None,
            big: false,
        });
    }

    /// Queues a GSO batch in a large buffer.
    pub fn push_udp_batch(&mut self, dst: SocketAddr, buf: Vec<u8>, len: usize, segment: usize) {
        self.udp.push(UdpOut {
            dst,
            buf,
            start: 0,
            len,
            segment: Some(segment),
            big: true,
        });
    }

    /// Queues a datagram copied from `bytes`.
    pub fn push_udp_copy(&mut self, dst: SocketAddr, bytes: &[u8]) {
        let mut b = self.take();
        if bytes.len() > b.len() {
            b.resize(bytes.len(), 0);
        }
        b[..bytes.len()].copy_from_slice(bytes);
        self.push_udp(dst, b, 0, bytes.len());
    }

    /// Queues a frame for the TAP device (copied). `partial_csum`: its TCP checksum holds
    /// only the pseudo-header sum and must be completed (by the kernel or the driver).
    pub fn push_tap(&mut self, frame: &[u8], partial_csum: bool) {
        if let Some(c) = self.coalescer.as_mut() {
            if c.push(frame) {
                return;
            }
            self.flush_tap();
            let fresh = self.take_big();
            let c = self.coalescer.as_mut().expect("coalescing on");
            match c.start(frame, fresh) {
                Ok(()) => return,
                Err(b) => self.give(b, true),
            }
        }
        let mut hdr = VnetHdr::default();
        if partial_csum {
            match offload::parse_tcp(frame) {
                Some(f) => {
                    hdr.flags = offload::F_NEEDS_CSUM;
                    hdr.csum_start = f.tcp as u16;
                    hdr.csum_offset = 16;
                }
                None => return,
            }
        }
        let mut b = self.take();
        let h = VNET_HDR_LEN;
        if h + frame.len() > b.len() {
            b.resize(h + frame.len(), 0);
        }
        b[h..h + frame.len()].copy_from_slice(frame);
        self.tap.push(TapOut {
            buf: b,
            start: h,
            len: frame.len(),
            hdr,
            big: false,
        });
    }

    /// Ends the super-frame being built, if any (call before handing `tap` to the device).
    pub fn flush_tap(&mut self) {
        if let Some(c) = self.coalescer.as_mut() {
            if let Some((buf, len, hdr)) = c.finish() {
                self.tap.push(TapOut {
                    buf,
                    start: VNET_HDR_LEN,
                    len,
                    hdr,
                    big: true,
                });
            }
        }
    }

    /// Gives every queued buffer back (after sending).
    pub fn recycle_sent(&mut self) {
        let mut udp = std::mem::take(&mut self.udp);
        for u in udp.drain(..) {
            self.give(u.buf, u.big);
        }
        self.udp = udp;
        let mut tap = std::mem::take(&mut self.tap);
        for t in tap.drain(..) {
            self.give(t.buf, t.big);
        }
        self.tap = tap;
    }
}
