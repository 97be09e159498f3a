//! Buffers the pure cores write their output into; the I/O driver sends them and gives
//! the buffers back. No allocation per packet once the pool is warm.

use std::net::SocketAddr;

/// A datagram to send: `buf[start..start + len]` to `dst`.
#[derive(Debug)]
pub struct UdpOut {
    /// Destination.
    pub dst: SocketAddr,
    /// Owning buffer.
    pub buf: Vec<u8>,
    /// Offset of the datagram in `buf`.
    pub start: usize,
    /// Length of the datagram.
    pub len: usize,
}

impl UdpOut {
    /// The datagram bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }
}

/// A frame to write to the TAP device: `buf[start..start + len]`. `start` is at least the
/// outbox's `tap_headroom`, so the driver may put a device header in front of the frame.
#[derive(Debug)]
pub struct TapOut {
    /// Owning buffer.
    pub buf: Vec<u8>,
    /// Offset of the frame.
    pub start: usize,
    /// Length of the frame.
    pub len: usize,
}

/// Output queues and a pool of buffers.
#[derive(Debug)]
pub struct Outbox {
    /// Datagrams to send, in order.
    pub udp: Vec<UdpOut>,
    /// Frames to write, in order.
    pub tap: Vec<TapOut>,
    /// Bytes reserved in front of TAP frames for the device header.
    pub tap_headroom: usize,
    buf_size: usize,
    pool: Vec<Vec<u8>>,
}

impl Outbox {
    /// An outbox whose buffers hold `buf_size` bytes.
    pub fn new(buf_size: usize, tap_headroom: usize) -> Self {
        Self {
            udp: Vec::with_capacity(256),
            tap: Vec::with_capacity(256),
            tap_headroom,
            buf_size,
            pool: Vec::new(),
        }
    }

    /// Size of each buffer.
    pub fn buf_size(&self) -> usize {
        self.buf_size
    }

    /// Takes a buffer of `buf_size` bytes from the pool.
    pub fn take(&mut self) -> Vec<u8> {
        match self.pool.pop() {
            Some(b) => b,
            None => vec![0u8; self.buf_size],
        }
    }

    /// Returns a buffer to the pool.
    pub fn give(&mut self, mut b: Vec<u8>) {
        if self.pool.len() < 4096 {
            b.resize(self.buf_size, 0);
            self.pool.push(b);
        }
    }

    /// Queues a datagram.
    pub fn push_udp(&mut self, dst: SocketAddr, buf: Vec<u8>, start: usize, len: usize) {
        self.udp.push(UdpOut {
            dst,
            buf,
            start,
            len,
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

    /// Queues a frame copied from `frame`.
    pub fn push_tap_copy(&mut self, frame: &[u8]) {
        let mut b = self.take();
        let h = self.tap_headroom;
        if h + frame.len() > b.len() {
            b.resize(h + frame.len(), 0);
        }
        b[h..h + frame.len()].copy_from_slice(frame);
        self.tap.push(TapOut {
            buf: b,
            start: h,
            len: frame.len(),
        });
    }

    /// Gives every queued buffer back (after sending).
    pub fn recycle_sent(&mut self) {
        let mut udp = std::mem::take(&mut self.udp);
        for u in udp.drain(..) {
            self.give(u.buf);
        }
        self.udp = udp;
        let mut tap = std::mem::take(&mut self.tap);
        for t in tap.drain(..) {
            self.give(t.buf);
        }
        self.tap = tap;
    }
}
