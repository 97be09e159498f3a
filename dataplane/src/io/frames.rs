//! The edge's frame port: where frames from the VMs come from and frames for them go.
//! Either a TAP device (one read/write per frame, TSO through virtio headers) or an
//! XDP port on the VM bridge (AF_XDP rings, batches, no TSO). The event loops in
//! `driver` and `uring` are written once against this enum.

use std::os::fd::{AsRawFd, RawFd};

use crate::edge::EdgeCore;
use crate::offload;
use crate::outbox::Outbox;
use crate::xdp::XdpPort;

use super::tap::Tap;

/// A TAP device or an XDP port.
#[derive(Debug)]
pub enum FramePort {
    /// A TAP device.
    Tap(Tap),
    /// An XDP port (AF_XDP socket on a veth enslaved to the VM bridge).
    Xdp(Box<XdpPort>),
}

impl FramePort {
    /// The descriptor to wait on for frames.
    pub fn fd(&self) -> RawFd {
        match self {
            Self::Tap(t) => t.as_raw_fd(),
            Self::Xdp(p) => p.as_raw_fd(),
        }
    }

    /// The XDP port, if this is one.
    pub fn xdp(&mut self) -> Option<&mut XdpPort> {
        match self {
            Self::Tap(_) => None,
            Self::Xdp(p) => Some(p),
        }
    }

    /// Short description of the frame side for status ("AF_XDP native mode, ...").
    pub fn describe(&self) -> String {
        match self {
            Self::Tap(t) => format!("tap-vnet-hdr/tso {}", if t.vnet_hdr { "on" } else { "off" }),
            Self::Xdp(p) => format!(
                "AF_XDP {} mode{}, rx-gro",
                p.mode().as_str(),
                if p.multi_buffer() {
                    ", multi-buffer"
                } else {
                    ""
                }
            ),
        }
    }
}

/// Sends the queued frames for the VMs into an XDP port in one batch: partial TCP
/// checksums (left by a peer's TSO) are completed first, since AF_XDP has no checksum
/// offload; frames the ring cannot take are counted as drops. Buffers go back to `out`.
pub fn send_xdp(port: &mut XdpPort, core: &mut EdgeCore, out: &mut Outbox) {
    send_xdp_unlocked(port, out).count(core);
}

/// Drops of one [`send_xdp_unlocked`], to be counted in the core later.
#[derive(Default, Debug, Clone, Copy)]
pub struct XdpDrops {
    bad_csum: u64,
    ring_full: u64,
    too_big: u64,
}

impl XdpDrops {
    /// Counts the drops in the core.
    pub fn count(self, core: &mut EdgeCore) {
        for (reason, n) in [
            ("bad_csum_offload", self.bad_csum),
            ("xdp_tx_ring_full", self.ring_full),
            ("xdp_tx_too_big", self.too_big),
        ] {
            for _ in 0..n {
                core.count_drop(reason);
            }
        }
    }
}

/// [`send_xdp`] without the core (so that a forwarder thread can send without holding
/// the core's lock); returns the drops to count.
pub fn send_xdp_unlocked(port: &mut XdpPort, out: &mut Outbox) -> XdpDrops {
    let mut d = XdpDrops::default();
    out.flush_tap();
    for t in out.tap.iter_mut() {
        if t.hdr.flags & offload::F_NEEDS_CSUM != 0 {
            let frame = &mut t.buf[t.start..t.start + t.len];
            if offload::complete_csum(
                frame,
                usize::from(t.hdr.csum_start),
                usize::from(t.hdr.csum_offset),
            )
            .is_err()
            {
                // Sent as it is: the VM's stack drops it on the checksum and counts it.
                d.bad_csum += 1;
            }
        }
    }
    if !out.tap.is_empty() {
        let before = port.socket_counters();
        port.send_batch(out.tap.iter().map(|t| &t.buf[t.start..t.start + t.len]));
        let after = port.socket_counters();
        d.ring_full = after.tx_ring_full.saturating_sub(before.tx_ring_full);
        d.too_big = after.tx_too_big.saturating_sub(before.tx_too_big);
    }
    let mut tap = std::mem::take(&mut out.tap);
    for t in tap.drain(..) {
        out.give(t.buf, t.big);
    }
    out.tap = tap;
    d
}
