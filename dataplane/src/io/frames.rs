//! The edge's frame port: where frames from the VMs come from and frames for them go.
//! Either a TAP device (one read/write per frame, TSO through virtio headers) or an
//! XDP port on the VM bridge (AF_XDP rings, batches, no TSO). The event loops in
//! `driver` and `uring` are written once against this enum; [`RingPort`] holds what
//! differs between the two kinds when an io_uring forwarder drives them (what stays
//! armed, how frames come in, how they go out), so that the forwarder does not ask.

use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, squeue, types, IoUring};

use crate::edge::EdgeCore;
use crate::offload::{self, RxGro, VnetHdr, VNET_HDR_LEN};
use crate::outbox::{Outbox, TapOut};
use crate::xdp::XdpPort;

use super::sys::set_blocking;
use super::tap::Tap;
use super::threads::FlowQueues;
use super::IoError;

/// Reads kept armed on a TAP queue.
const TAP_READS: usize = 4;
/// Largest read from a TAP device: a TSO super-frame with its virtio header.
pub const TAP_READ_BUF: usize = 65_536 + VNET_HDR_LEN;
/// Failed TAP reads in a row after which the device counts as gone.
const TAP_GONE_AFTER: u64 = 10_000;
/// Frames taken off the AF_XDP RX ring per call, and calls per wake-up at most.
const XDP_BATCH: u32 = 64;
const XDP_ROUNDS: usize = 4;
/// Ethernet header with one VLAN tag: what a frame of one MTU may carry above it.
const MAX_ETH_HDR: usize = 18;

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
            Self::Tap(t) => describe_tap(t),
            Self::Xdp(p) => describe_xdp(p),
        }
    }
}

fn describe_tap(t: &Tap) -> String {
    format!("tap-vnet-hdr/tso {}", if t.vnet_hdr { "on" } else { "off" })
}

fn describe_xdp(p: &XdpPort) -> String {
    format!(
        "AF_XDP {} mode{}, rx-gro, {}",
        p.mode().as_str(),
        if p.multi_buffer() {
            ", multi-buffer"
        } else {
            ""
        },
        if p.vnet_tx_fd().is_some() {
            "tx packet socket vnet-hdr/tso"
        } else {
            "tx AF_XDP"
        }
    )
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
        if t.complete_csum().is_err() {
            // Sent as it is: the VM's stack drops it on the checksum and counts it.
            d.bad_csum += 1;
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

/// What a forwarder hands a frame port along with a completed read.
pub struct RxContext<'a> {
    /// The time of this round.
    pub now: Instant,
    /// The core, locked for this round.
    pub core: &'a mut EdgeCore,
    /// Where the core queues its output.
    pub out: &'a mut Outbox,
    /// Flow-to-queue table of a multi-queue TAP device.
    pub flows: &'a FlowQueues,
    /// This forwarder's thread (and queue) number.
    pub me: usize,
    /// Largest frame a TSO super-frame is cut into.
    pub max_seg_frame: usize,
}

/// A frame port as one io_uring forwarder drives it.
///
/// TAP: several reads stay armed, each into its own buffer; frames for the VMs are
/// written one by one (with the virtio header in front when the device takes it, else
/// with their partial checksum completed), to the queue their flow was last read from.
///
/// XDP: one `POLL_ADD` stays armed on the AF_XDP socket; when it fires, frames are
/// taken off the RX ring in batches and TCP segments of one flow coalesced into
/// super-frames ([`RxGro`]) that take the TSO path; frames for the VMs are written to
/// the queue's packet socket with virtio-net headers as on a TAP, or, without one, leave
/// through the TX ring in one batch per round, after the core lock is released when
/// several threads share it (the copy-mode `sendto` is the costly part of that path).
pub enum RingPort {
    /// A queue of a TAP device.
    Tap(TapQueue),
    /// The AF_XDP socket of one rx queue of the XDP port.
    Xdp(XdpQueue),
}

/// See [`RingPort::Tap`].
pub struct TapQueue {
    tap: Tap,
    /// One buffer per armed read. The kernel may still write into them after the ring
    /// is closed (cancellation is asynchronous), so they are never freed.
    bufs: ManuallyDrop<Vec<Vec<u8>>>,
    /// Every queue of the device (one per thread; empty or one with a single thread).
    queues: Arc<[RawFd]>,
    failed_reads: u64,
    /// `bufs` are registered with the ring: reads are `READ_FIXED`.
    fixed: bool,
}

/// See [`RingPort::Xdp`].
pub struct XdpQueue {
    port: Box<XdpPort>,
    gro: RxGro,
    /// AF_XDP TX after the core lock is released (several threads share the core).
    send_unlocked: bool,
    /// This queue's packet socket for frames to the VMs (virtio-net headers; one per
    /// forwarder thread); `None`: AF_XDP TX.
    vnet_tx: Option<RawFd>,
    /// Drops of the last send made without the core, counted at the next lock.
    drops: XdpDrops,
    /// A received frame whose checksum is completed before it is sealed (made on the
    /// first such frame).
    csum_scratch: Vec<u8>,
}

impl RingPort {
    /// The port of one of `threads` forwarder threads; `queues` holds every queue of a
    /// multi-queue TAP device. A TAP descriptor is made blocking (io_uring waits for
    /// readiness itself); an AF_XDP socket is only polled.
    pub fn new(port: FramePort, queues: Arc<[RawFd]>, threads: usize) -> Self {
        match port {
            FramePort::Tap(tap) => {
                set_blocking(tap.as_raw_fd());
                Self::Tap(TapQueue {
                    tap,
                    bufs: ManuallyDrop::new(
                        (0..TAP_READS).map(|_| vec![0u8; TAP_READ_BUF]).collect(),
                    ),
                    queues,
                    failed_reads: 0,
                    fixed: false,
                })
            }
            FramePort::Xdp(port) => Self::Xdp(XdpQueue {
                vnet_tx: port.vnet_tx_fd(),
                send_unlocked: threads > 1 && port.vnet_tx_fd().is_none(),
                port,
                gro: RxGro::new(),
                drops: XdpDrops::default(),
                csum_scratch: Vec::new(),
            }),
        }
    }

    /// Whether frames for the VMs leave with virtio-net headers, so that the outbox
    /// may coalesce them into TSO super-frames: a TAP device that takes the headers
    /// (`vnet`), an XDP port with its packet socket.
    pub fn takes_vnet_hdr(&self, vnet: bool) -> bool {
        match self {
            Self::Tap(_) => vnet,
            Self::Xdp(x) => x.vnet_tx.is_some(),
        }
    }

    /// Number of reads kept armed: several on a TAP, one poll on an XDP port (which
    /// reads whole batches).
    pub fn reads(&self) -> usize {
        match self {
            Self::Tap(t) => t.bufs.len(),
            Self::Xdp(_) => 1,
        }
    }

    /// Registers the TAP read buffers with `ring` (buffer `i` is read `i`'s), so that
    /// reads are `READ_FIXED`; false for an XDP port, which has none. The buffers are
    /// never freed, so they outlive the ring's registration.
    pub fn register_fixed_reads(&mut self, ring: &IoUring) -> Result<bool, IoError> {
        let Self::Tap(t) = self else {
            return Ok(false);
        };
        let iovs: Vec<libc::iovec> = t
            .bufs
            .iter_mut()
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        // SAFETY: each iovec covers a whole buffer of `bufs`, which is never freed or
        // resized (ManuallyDrop, fixed length), so the memory stays valid for as long as
        // the ring holds the registration.
        unsafe { ring.submitter().register_buffers(&iovs) }.map_err(|e| IoError::Sys {
            call: "io_uring_register(IORING_REGISTER_BUFFERS)".into(),
            source: e,
        })?;
        t.fixed = true;
        Ok(true)
    }

    /// The submission that arms read `i` (`i < reads()`). A TAP read points into the
    /// buffer of slot `i`, which lives as long as the process (registered buffer `i` when
    /// [`Self::register_fixed_reads`] succeeded).
    pub fn arm(&mut self, i: usize) -> squeue::Entry {
        match self {
            Self::Tap(t) => {
                let fd = types::Fd(t.tap.as_raw_fd());
                let b = &mut t.bufs[i];
                let (ptr, len) = (b.as_mut_ptr(), b.len() as u32);
                if t.fixed {
                    opcode::ReadFixed::new(fd, ptr, len, i as u16).build()
                } else {
                    opcode::Read::new(fd, ptr, len).build()
                }
            }
            Self::Xdp(x) => {
                opcode::PollAdd::new(types::Fd(x.port.as_raw_fd()), libc::POLLIN as u32).build()
            }
        }
    }

    /// Handles the completion of read `i` (result `res`): hands the frames to the core;
    /// returns how many were taken. An error means the TAP device is gone.
    pub fn on_read(&mut self, i: usize, res: i32, cx: &mut RxContext<'_>) -> Result<u64, IoError> {
        match self {
            Self::Tap(t) => t.on_read(i, res, cx),
            Self::Xdp(x) => Ok(x.on_poll(res, cx)),
        }
    }

    /// Before waiting: kicks AF_XDP transmits still in flight; true while some are,
    /// so that the wait is short enough to reap them soon.
    pub fn tx_pending(&mut self) -> bool {
        match self {
            Self::Tap(_) => false,
            Self::Xdp(x) => x.port.flush_tx() > 0,
        }
    }

    /// With the core locked: counts the drops of the last send made without it.
    pub fn count_drops(&mut self, core: &mut EdgeCore) {
        if let Self::Xdp(x) = self {
            std::mem::take(&mut x.drops).count(core);
        }
    }

    /// With the core locked: sends the frames `out` holds for the VMs, each TAP frame
    /// through `write(fd, frame, start, len)` (which queues the write and owns the
    /// buffer from then on); an XDP port sends later, in [`Self::send_unlocked`], when
    /// several threads share the core. Returns the number of frames handed on.
    pub fn send(
        &mut self,
        core: &mut EdgeCore,
        out: &mut Outbox,
        me: usize,
        flows: &FlowQueues,
        write: impl FnMut(RawFd, TapOut, usize, usize, &mut EdgeCore) -> Result<(), IoError>,
    ) -> Result<u64, IoError> {
        match self {
            Self::Xdp(x) if x.send_unlocked => Ok(0),
            Self::Xdp(XdpQueue {
                vnet_tx: Some(fd), ..
            }) => {
                let fd = *fd;
                write_frames(core, out, true, |_| fd, write)
            }
            Self::Xdp(x) => {
                let n = out.tap.len() as u64;
                send_xdp(&mut x.port, core, out);
                Ok(n)
            }
            Self::Tap(t) => {
                let vnet = t.tap.vnet_hdr;
                write_frames(core, out, vnet, |f| t.queue_for(f, me, flows), write)
            }
        }
    }

    /// With the core unlocked: sends the frames for the VMs an XDP port left for later;
    /// returns the number of frames handed on.
    pub fn send_unlocked(&mut self, out: &mut Outbox) -> u64 {
        match self {
            Self::Xdp(x) if x.send_unlocked => {
                let n = out.tap.len() as u64;
                x.drops = send_xdp_unlocked(&mut x.port, out);
                n
            }
            _ => 0,
        }
    }

    /// The frame side, for status.
    pub fn describe(&self) -> String {
        match self {
            Self::Tap(t) => describe_tap(&t.tap),
            Self::Xdp(x) => describe_xdp(&x.port),
        }
    }
}

/// Hands every frame `out` holds for the VMs to `write`, on the descriptor `fd_for`
/// picks for it: with its virtio-net header in front when the descriptor takes one
/// (`vnet`), else with its partial checksum completed. Returns the number handed on.
fn write_frames(
    core: &mut EdgeCore,
    out: &mut Outbox,
    vnet: bool,
    fd_for: impl Fn(&[u8]) -> RawFd,
    mut write: impl FnMut(RawFd, TapOut, usize, usize, &mut EdgeCore) -> Result<(), IoError>,
) -> Result<u64, IoError> {
    let mut tap = std::mem::take(&mut out.tap);
    let mut n = 0;
    for mut f in tap.drain(..) {
        let (start, len) = if vnet {
            f.put_vnet_hdr()
        } else if f.complete_csum().is_err() {
            core.count_drop("bad_csum_offload");
            out.give(f.buf, f.big);
            continue;
        } else {
            (f.start, f.len)
        };
        let fd = fd_for(&f.buf[f.start..f.start + f.len]);
        n += 1;
        write(fd, f, start, len, core)?;
    }
    out.tap = tap;
    Ok(n)
}

impl TapQueue {
    fn on_read(&mut self, i: usize, res: i32, cx: &mut RxContext<'_>) -> Result<u64, IoError> {
        if res < 0 {
            cx.core.count_drop("tap_read_error");
            self.failed_reads += 1;
            // A device that went away fails every read at once: give up instead of
            // spinning.
            if self.failed_reads > TAP_GONE_AFTER {
                return Err(IoError::Sys {
                    call: format!("read from TAP {}", self.tap.name),
                    source: std::io::Error::from_raw_os_error(-res),
                });
            }
            return Ok(0);
        }
        if res == 0 {
            return Ok(0);
        }
        self.failed_reads = 0;
        let n = res as usize;
        let b = &mut self.bufs[i];
        let h = if self.tap.vnet_hdr { VNET_HDR_LEN } else { 0 };
        if self.queues.len() > 1 {
            cx.flows.record(b.get(h..n).unwrap_or(&[]), cx.me);
        }
        if !self.tap.vnet_hdr {
            cx.core.handle_tap(cx.now, &b[..n], cx.out);
            return Ok(1);
        }
        match VnetHdr::parse(&b[..n]) {
            Some(hdr) if hdr.gso_type != offload::GSO_NONE => {
                let frame = &b[VNET_HDR_LEN..n];
                cx.core
                    .handle_tap_tso(cx.now, &hdr, frame, cx.max_seg_frame, cx.out);
            }
            Some(hdr) => {
                let frame = &mut b[VNET_HDR_LEN..n];
                if hdr.complete_csum(frame).is_err() {
                    cx.core.count_drop("bad_csum_offload");
                } else {
                    cx.core.handle_tap(cx.now, frame, cx.out);
                }
            }
            None => cx.core.count_drop("runt_frame"),
        }
        Ok(1)
    }

    /// The queue to write a frame for the VMs to: where its flow was last read.
    fn queue_for(&self, frame: &[u8], me: usize, flows: &FlowQueues) -> RawFd {
        if self.queues.len() > 1 {
            let q = flows.pick(frame, me);
            self.queues.get(q).copied().unwrap_or(self.tap.as_raw_fd())
        } else {
            self.tap.as_raw_fd()
        }
    }
}

impl XdpQueue {
    /// Takes what the RX ring holds. With GSO through the port a frame above the
    /// VMs' MTU is a TCP super-packet: it takes the TSO path whole (re-segmented to
    /// fit the underlay there), and one that is not TCP is dropped and counted. A frame
    /// passed on alone may carry a partial TCP/UDP checksum (the bridge side has
    /// checksum offload): it is completed first, as for a TAP read with `NEEDS_CSUM`.
    fn on_poll(&mut self, res: i32, cx: &mut RxContext<'_>) -> u64 {
        if res < 0 {
            cx.core.count_drop("xdp_poll_error");
        }
        let (now, max_seg) = (cx.now, cx.max_seg_frame);
        let (core, out) = (&mut *cx.core, &mut *cx.out);
        let gso_mtu = self.port.gso_mtu();
        let scratch = &mut self.csum_scratch;
        let mut emit = |h: Option<&VnetHdr>, f: &[u8]| match h {
            Some(h) => core.handle_tap_tso(now, h, f, max_seg, out),
            None => match gso_mtu {
                None => core.handle_tap(now, f, out),
                Some(mtu) if f.len() > mtu + MAX_ETH_HDR => core.count_drop("bad_tso_frame"),
                Some(_) => match offload::partial_l4_csum(f) {
                    None => core.handle_tap(now, f, out),
                    Some((start, offset, end)) => {
                        if scratch.len() < f.len() {
                            scratch.resize(f.len().max(TAP_READ_BUF), 0);
                        }
                        let g = &mut scratch[..f.len()];
                        g.copy_from_slice(f);
                        match offload::complete_csum(&mut g[..end], start, offset) {
                            Ok(()) => core.handle_tap(now, g, out),
                            Err(_) => core.count_drop("bad_csum_offload"),
                        }
                    }
                },
            },
        };
        let gro = &mut self.gro;
        let mut taken = 0;
        for _ in 0..XDP_ROUNDS {
            let n = self.port.recv_batch(XDP_BATCH, |f| match gso_mtu {
                Some(mtu) if f.len() > mtu + MAX_ETH_HDR => {
                    gro.push_alone(offload::tso_hdr(f, mtu).as_ref(), f, &mut emit)
                }
                _ => gro.push(f, &mut emit),
            });
            taken += u64::from(n);
            if n < XDP_BATCH {
                break;
            }
        }
        gro.flush(&mut emit);
        taken
    }
}
