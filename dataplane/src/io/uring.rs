//! The edge's event loop on io_uring: UDP receives and TAP reads stay armed in batches,
//! output is submitted as a batch after each round of completions. UDP GSO/GRO and the
//! TAP's virtio header (TSO, checksum offload) are used when the kernel has them.
//!
//! With an XDP port instead of a TAP device, a `POLL_ADD` on the AF_XDP socket stands in
//! for the TAP reads: when it fires, frames are taken off the RX ring in batches, TCP
//! segments of one flow coalesced into super-frames ([`RxGro`]) that take the TSO path
//! (one UDP GSO send per super-frame), and frames for the VMs leave through the TX ring
//! in one batch per round.
//!
//! Buffers handed to the kernel are owned by slots that live (boxed, never moved) until
//! their completion arrives; the ring is dropped before the file descriptors.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use crate::edge::EdgeCore;
use crate::offload::{self, RxGro, VnetHdr, VNET_HDR_LEN};
use crate::outbox::Outbox;
use crate::status::EdgeStatus;

use super::ctl::Snapshot;
use super::driver::EdgeInfo;
use super::frames::{self, FramePort};
use super::spin::{host_busy, AdaptiveSpin, IdleCores};
use super::sys::{from_sockaddr, to_sockaddr};
use super::threads::{Counts, Forwarders};
use super::udp::{read_gro_cmsg, write_segment_cmsg, CMSG_SPACE};
use super::IoError;

const UDP_SLOTS: usize = 4;
const TAP_SLOTS: usize = 4;
const RX_BUF: usize = 65_536 + VNET_HDR_LEN;
const MAX_IN_FLIGHT: usize = 2048;
const TICK: Duration = Duration::from_millis(20);
/// How often the host's load is checked to decide whether polling may run.
const LOAD_CHECK: Duration = Duration::from_secs(1);
const PUBLISH: Duration = Duration::from_millis(200);
const MAX_GSO_SEGS: usize = 64;
const MAX_GSO_BYTES: usize = 65_000;
/// Frames taken off the AF_XDP RX ring per call, and calls per wake-up at most.
const XDP_BATCH: u32 = 64;
const XDP_ROUNDS: usize = 4;

const K_UDP: u64 = 1 << 32;
const K_TAP: u64 = 2 << 32;
const K_OUT: u64 = 3 << 32;
const K_MASK: u64 = 0xffff_ffff << 32;

struct RecvSlot {
    buf: Vec<u8>,
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    ctrl: [u64; CMSG_SPACE / 8],
    hdr: libc::msghdr,
}

impl RecvSlot {
    fn new() -> Box<Self> {
        Box::new(Self {
            buf: vec![0u8; RX_BUF],
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            },
            // SAFETY: plain old data; zero is valid.
            addr: unsafe { std::mem::zeroed() },
            ctrl: [0; CMSG_SPACE / 8],
            // SAFETY: plain old data; zero is valid.
            hdr: unsafe { std::mem::zeroed() },
        })
    }

    /// Points the header at this slot's own fields (the slot is boxed and does not move).
    fn arm(&mut self, fd: RawFd, ud: u64) -> squeue::Entry {
        self.iov.iov_base = self.buf.as_mut_ptr() as *mut libc::c_void;
        self.iov.iov_len = self.buf.len();
        self.hdr.msg_name = &mut self.addr as *mut _ as *mut libc::c_void;
        self.hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
        self.hdr.msg_iov = &mut self.iov;
        self.hdr.msg_iovlen = 1;
        self.hdr.msg_control = self.ctrl.as_mut_ptr() as *mut libc::c_void;
        self.hdr.msg_controllen = CMSG_SPACE;
        self.hdr.msg_flags = 0;
        opcode::RecvMsg::new(types::Fd(fd), &mut self.hdr)
            .build()
            .user_data(ud)
    }
}

struct SendMeta {
    iov: libc::iovec,
    addr: libc::sockaddr_storage,
    ctrl: [u64; CMSG_SPACE / 8],
    hdr: libc::msghdr,
}

struct InFlight {
    buf: Vec<u8>,
    big: bool,
    gso: bool,
    _meta: Option<Box<SendMeta>>,
}

/// Offloads in use, probed at start.
#[derive(Clone, Copy, Debug)]
pub struct Offloads {
    /// UDP GSO on send.
    pub gso: bool,
    /// UDP GRO on receive.
    pub gro: bool,
    /// TAP with virtio header (TSO/checksum offload).
    pub vnet: bool,
}

impl Offloads {
    /// Short description for status and logs.
    pub fn describe(&self) -> String {
        format!(
            "io_uring; udp-gso {}; udp-gro {}; tap-vnet-hdr/tso {}",
            on(self.gso),
            on(self.gro),
            on(self.vnet)
        )
    }
}

fn on(b: bool) -> &'static str {
    if b {
        "on"
    } else {
        "off"
    }
}

struct Loop {
    ring: IoUring,
    udp_fd: RawFd,
    tap_fd: RawFd,
    port: FramePort,
    off: Offloads,
    // Boxed so a slot's address never changes while the kernel holds pointers into it.
    #[allow(clippy::vec_box)]
    udp_slots: Vec<Box<RecvSlot>>,
    tap_bufs: Vec<Vec<u8>>,
    flights: Vec<Option<InFlight>>,
    free: Vec<usize>,
    underlay_payload: usize,
    gso_warned: bool,
    /// Every queue of a multi-queue TAP device (one per thread), this thread's own.
    tap_fds: Arc<[RawFd]>,
    me: usize,
    shared: Arc<Forwarders>,
    counts: Counts,
    /// With several threads, frames for the VMs leave through AF_XDP after the core
    /// lock is released (the copy-mode `sendto` is the costly part of the XDP path).
    xdp_after_unlock: bool,
}

impl Loop {
    fn push(&mut self, e: &squeue::Entry) -> Result<(), IoError> {
        loop {
            // SAFETY: every entry refers to memory owned by a slot or an in-flight record
            // that stays alive and unmoved until its completion is reaped.
            if unsafe { self.ring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            self.ring.submit().map_err(|e| IoError::Sys {
                call: "io_uring_enter".into(),
                source: e,
            })?;
        }
    }

    fn arm_udp(&mut self, i: usize) -> Result<(), IoError> {
        let e = self.udp_slots[i].arm(self.udp_fd, K_UDP | i as u64);
        self.push(&e)
    }

    fn arm_tap(&mut self, i: usize) -> Result<(), IoError> {
        if matches!(self.port, FramePort::Xdp(_)) {
            let e = opcode::PollAdd::new(types::Fd(self.tap_fd), libc::POLLIN as u32)
                .build()
                .user_data(K_TAP | i as u64);
            return self.push(&e);
        }
        let b = &mut self.tap_bufs[i];
        let e = opcode::Read::new(types::Fd(self.tap_fd), b.as_mut_ptr(), b.len() as u32)
            .build()
            .user_data(K_TAP | i as u64);
        self.push(&e)
    }

    fn flight(&mut self, f: InFlight) -> Option<usize> {
        if let Some(i) = self.free.pop() {
            self.flights[i] = Some(f);
            return Some(i);
        }
        if self.flights.len() >= MAX_IN_FLIGHT {
            return None;
        }
        self.flights.push(Some(f));
        Some(self.flights.len() - 1)
    }

    /// Queues a TAP write of `buf[..len]` (vnet header included when enabled).
    fn write_tap(
        &mut self,
        buf: Vec<u8>,
        start: usize,
        len: usize,
        big: bool,
        core: &mut EdgeCore,
    ) -> Result<(), IoError> {
        let ptr = buf[start..].as_ptr();
        self.counts.frames_tx += 1;
        let fd = if self.tap_fds.len() > 1 {
            let h = if self.off.vnet { VNET_HDR_LEN } else { 0 };
            let frame = buf.get(start + h..start + len).unwrap_or(&[]);
            let q = self.shared.flows().pick(frame, self.me);
            self.tap_fds.get(q).copied().unwrap_or(self.tap_fd)
        } else {
            self.tap_fd
        };
        let Some(i) = self.flight(InFlight {
            buf,
            big,
            gso: false,
            _meta: None,
        }) else {
            core.count_drop("tap_backpressure");
            return Ok(());
        };
        let e = opcode::Write::new(types::Fd(fd), ptr, len as u32)
            .build()
            .user_data(K_OUT | i as u64);
        self.push(&e)
    }

    #[allow(clippy::too_many_arguments)]
    fn send_udp(
        &mut self,
        buf: Vec<u8>,
        start: usize,
        len: usize,
        dst: SocketAddr,
        seg: Option<u16>,
        big: bool,
        core: &mut EdgeCore,
    ) -> Result<(), IoError> {
        let (addr, alen) = to_sockaddr(&dst);
        let mut meta = Box::new(SendMeta {
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: len,
            },
            addr,
            ctrl: [0; CMSG_SPACE / 8],
            // SAFETY: plain old data; zero is valid.
            hdr: unsafe { std::mem::zeroed() },
        });
        meta.iov.iov_base = buf[start..].as_ptr() as *mut libc::c_void;
        meta.hdr.msg_name = &mut meta.addr as *mut _ as *mut libc::c_void;
        meta.hdr.msg_namelen = alen;
        meta.hdr.msg_iov = &mut meta.iov;
        meta.hdr.msg_iovlen = 1;
        if let Some(s) = seg {
            let n = write_segment_cmsg(&mut meta.ctrl, s);
            meta.hdr.msg_control = meta.ctrl.as_mut_ptr() as *mut libc::c_void;
            meta.hdr.msg_controllen = n;
        }
        let hp: *const libc::msghdr = &meta.hdr;
        self.counts.udp_tx += match seg {
            Some(s) => len.div_ceil(usize::from(s).max(1)) as u64,
            None => 1,
        };
        let Some(i) = self.flight(InFlight {
            buf,
            big,
            gso: seg.is_some(),
            _meta: Some(meta),
        }) else {
            core.count_drop("udp_backpressure");
            return Ok(());
        };
        let e = opcode::SendMsg::new(types::Fd(self.udp_fd), hp)
            .build()
            .user_data(K_OUT | i as u64);
        self.push(&e)
    }

    /// Submits everything the core queued: datagrams (consecutive equal-size datagrams to
    /// one address grouped into GSO sends) and TAP frames.
    fn flush(&mut self, core: &mut EdgeCore, out: &mut Outbox) -> Result<(), IoError> {
        out.flush_tap();
        let mut udp = std::mem::take(&mut out.udp);
        let mut i = 0;
        while i < udp.len() {
            let dst = udp[i].dst;
            if let Some(seg) = udp[i].segment {
                let u = &mut udp[i];
                let b = std::mem::take(&mut u.buf);
                if self.off.gso {
                    self.send_udp(b, 0, u.len, dst, Some(seg as u16), true, core)?;
                } else {
                    // No GSO: one datagram per segment, each copied to a small buffer.
                    let mut o = 0;
                    while o < u.len {
                        let e = (o + seg).min(u.len);
                        let mut sb = out.take();
                        sb[..e - o].copy_from_slice(&b[o..e]);
                        self.send_udp(sb, 0, e - o, dst, None, false, core)?;
                        o = e;
                    }
                    out.give(b, true);
                }
                i += 1;
                continue;
            }
            let first_len = udp[i].len;
            let mut j = i + 1;
            if self.off.gso && first_len <= self.underlay_payload {
                let mut total = first_len;
                while j < udp.len()
                    && j - i < MAX_GSO_SEGS
                    && udp[j].segment.is_none()
                    && udp[j].dst == dst
                    && udp[j].len <= first_len
                    && total + udp[j].len <= MAX_GSO_BYTES
                {
                    total += udp[j].len;
                    j += 1;
                    if udp[j - 1].len < first_len {
                        break;
                    }
                }
            }
            if j - i == 1 {
                let u = &mut udp[i];
                let b = std::mem::take(&mut u.buf);
                self.send_udp(b, u.start, u.len, dst, None, false, core)?;
            } else {
                let mut big = out.take_big();
                let mut off = 0;
                for u in &udp[i..j] {
                    let b = u.bytes();
                    big[off..off + b.len()].copy_from_slice(b);
                    off += b.len();
                }
                for u in &mut udp[i..j] {
                    let b = std::mem::take(&mut u.buf);
                    out.give(b, false);
                }
                self.send_udp(big, 0, off, dst, Some(first_len as u16), true, core)?;
            }
            i = j;
        }
        udp.clear();
        out.udp = udp;

        if self.xdp_after_unlock {
            return Ok(());
        }
        if let Some(p) = self.port.xdp() {
            self.counts.frames_tx += out.tap.len() as u64;
            frames::send_xdp(p, core, out);
            return Ok(());
        }
        let mut tap = std::mem::take(&mut out.tap);
        for mut t in tap.drain(..) {
            if self.off.vnet {
                let s = t.start - VNET_HDR_LEN;
                t.hdr.write(&mut t.buf[s..t.start]);
                self.write_tap(t.buf, s, t.len + VNET_HDR_LEN, t.big, core)?;
            } else {
                let frame = &mut t.buf[t.start..t.start + t.len];
                if t.hdr.flags & offload::F_NEEDS_CSUM != 0
                    && offload::complete_csum(
                        frame,
                        usize::from(t.hdr.csum_start),
                        usize::from(t.hdr.csum_offset),
                    )
                    .is_err()
                {
                    core.count_drop("bad_csum_offload");
                    out.give(t.buf, t.big);
                    continue;
                }
                self.write_tap(t.buf, t.start, t.len, t.big, core)?;
            }
        }
        out.tap = tap;
        Ok(())
    }

    /// I/O engine and offloads, for status.
    fn describe(&self) -> String {
        match &self.port {
            FramePort::Tap(_) => self.off.describe(),
            FramePort::Xdp(_) => format!(
                "io_uring; udp-gso {}; udp-gro {}; {}",
                on(self.off.gso),
                on(self.off.gro),
                self.port.describe()
            ),
        }
    }
}

/// Sets a descriptor blocking (io_uring waits for readiness itself).
fn set_blocking(fd: RawFd) {
    // SAFETY: fcntl on a descriptor we own; failure leaves it as it was.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl >= 0 {
            libc::fcntl(fd, libc::F_SETFL, fl & !libc::O_NONBLOCK);
        }
    }
}

/// Runs forwarder thread `me` of an edge (its own socket and frame queue, the core
/// shared, see `io::threads`) until `stop` is set. Thread 0 also runs the core's timers
/// and publishes the status snapshot. `tap_fds` holds every TAP queue (empty on XDP).
#[allow(clippy::too_many_arguments)]
pub fn run_forwarder(
    shared: &Arc<Forwarders>,
    me: usize,
    sock: UdpSocket,
    port: FramePort,
    tap_fds: Arc<[RawFd]>,
    off: Offloads,
    underlay_mtu: usize,
    spin: Duration,
    info: EdgeInfo,
    snap: Snapshot<EdgeStatus>,
    stop: Arc<AtomicBool>,
) -> Result<(), IoError> {
    let ring = IoUring::builder()
        .setup_single_issuer()
        .build(1024)
        .or_else(|_| IoUring::new(1024))
        .map_err(|e| IoError::Sys {
            call: "io_uring_setup".into(),
            source: e,
        })?;
    set_blocking(sock.as_raw_fd());
    let is_xdp = matches!(port, FramePort::Xdp(_));
    if !is_xdp {
        set_blocking(port.fd());
    }
    let buf_size = info.mtu as usize + 18 + 1024;
    let mut out = Outbox::new(buf_size);
    out.gso = off.gso;
    out.gso_max_segment = underlay_mtu.saturating_sub(28);
    if off.vnet {
        out.enable_coalescing();
    }
    let mut lp = Loop {
        ring,
        udp_fd: sock.as_raw_fd(),
        tap_fd: port.fd(),
        port,
        off,
        udp_slots: (0..UDP_SLOTS).map(|_| RecvSlot::new()).collect(),
        tap_bufs: if is_xdp {
            Vec::new()
        } else {
            (0..TAP_SLOTS).map(|_| vec![0u8; RX_BUF]).collect()
        },
        flights: Vec::new(),
        free: Vec::new(),
        underlay_payload: underlay_mtu.saturating_sub(28),
        gso_warned: false,
        tap_fds,
        me,
        shared: Arc::clone(shared),
        counts: Counts::default(),
        xdp_after_unlock: is_xdp && shared.threads() > 1,
    };
    // Largest frame after re-segmentation: fits the underlay with relay header and AEAD.
    let max_seg_frame = underlay_mtu.saturating_sub(28 + crate::edge::HEADROOM + 16 + 16);
    // Everything that can fail while the kernel holds slot memory runs in here, so that
    // every exit path goes through the teardown below.
    let result = (|| -> Result<(), IoError> {
        for i in 0..UDP_SLOTS {
            lp.arm_udp(i)?;
        }
        // One poll on an XDP port (it reads whole batches); several reads on a TAP.
        for i in 0..if is_xdp { 1 } else { TAP_SLOTS } {
            lp.arm_tap(i)?;
        }
        let mut gro = RxGro::new();
        let mut last_tick = Instant::now() - TICK;
        let mut last_pub = Instant::now() - PUBLISH;
        let mut cqes: Vec<(u64, i32)> = Vec::with_capacity(256);
        let ts = types::Timespec::new().nsec(TICK.as_nanos() as u32);
        // While AF_XDP transmits are in flight, wake up soon to reap their completions.
        let ts_tx = types::Timespec::new().nsec(1_000_000);
        let mut spinner = AdaptiveSpin::new(spin);
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut last_load = Instant::now() - LOAD_CHECK;
        let mut idle = IdleCores::default();
        let mut tap_errors = 0u64;
        let mut last_host = Instant::now() - super::driver::HOST_REFRESH;
        let mut fatal: Option<IoError> = None;
        let mut xdp_drops = frames::XdpDrops::default();
        loop {
            if stop.load(Ordering::Relaxed) {
                break Ok(());
            }
            // Before sleeping, poll the completion queue for the adaptive window: a wake-up
            // costs more than a short poll and dominates the overlay's RTT.
            let idle_from = lp.ring.completion().is_empty().then(Instant::now);
            let window = spinner.window();
            if idle_from.is_some() && !window.is_zero() {
                let until = Instant::now() + window;
                let _ = lp.ring.submit();
                while lp.ring.completion().is_empty() && Instant::now() < until {
                    let _ = lp
                        .ring
                        .submitter()
                        .submit_with_args(0, &types::SubmitArgs::new());
                    std::hint::spin_loop();
                }
            }
            let tx_pending = lp.port.xdp().is_some_and(|p| p.flush_tx() > 0);
            let args = types::SubmitArgs::new().timespec(if tx_pending { &ts_tx } else { &ts });
            let want = usize::from(lp.ring.completion().is_empty());
            match lp.ring.submitter().submit_with_args(want, &args) {
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                    ) => {}
                Err(e) => {
                    break Err(IoError::Sys {
                        call: "io_uring_enter".into(),
                        source: e,
                    })
                }
            }
            cqes.clear();
            cqes.extend(lp.ring.completion().map(|c| (c.user_data(), c.result())));
            // The core is locked once per round (not per packet) and never while waiting.
            let (mut guard, waited) = shared.lock_counted();
            lp.counts.lock_waits += u64::from(waited);
            let core: &mut EdgeCore = &mut guard;
            std::mem::take(&mut xdp_drops).count(core);
            let now = Instant::now();
            // Only traffic or a timeout tells how far away the next event was; completions
            // of our own sends arrive at once and say nothing about it.
            if let Some(t0) = idle_from {
                if cqes.is_empty() || cqes.iter().any(|c| c.0 & K_MASK != K_OUT) {
                    spinner.waited(now.saturating_duration_since(t0));
                }
            }
            for &(ud, res) in &cqes {
                let idx = (ud & !K_MASK) as usize;
                match ud & K_MASK {
                    K_UDP => {
                        if res > 0 {
                            let slot = &mut lp.udp_slots[idx];
                            let n = res as usize;
                            let src = from_sockaddr(&slot.addr);
                            let seg = if lp.off.gro {
                                read_gro_cmsg(&slot.ctrl, slot.hdr.msg_controllen)
                            } else {
                                None
                            };
                            if let Some(src) = src {
                                let seg = seg.unwrap_or(n).max(1);
                                let mut o = 0;
                                while o < n {
                                    let e = (o + seg).min(n);
                                    core.handle_udp(now, src, &mut slot.buf[o..e], &mut out);
                                    lp.counts.udp_rx += 1;
                                    o = e;
                                }
                            }
                        } else if res < 0 {
                            core.count_drop("udp_recv_error");
                        }
                        lp.arm_udp(idx)?;
                    }
                    K_TAP if is_xdp => {
                        if res < 0 {
                            core.count_drop("xdp_poll_error");
                        }
                        if let FramePort::Xdp(p) = &mut lp.port {
                            let mut emit = |h: Option<&VnetHdr>, f: &[u8]| match h {
                                Some(h) => core.handle_tap_tso(now, h, f, max_seg_frame, &mut out),
                                None => core.handle_tap(now, f, &mut out),
                            };
                            for _ in 0..XDP_ROUNDS {
                                let n = p.recv_batch(XDP_BATCH, |f| gro.push(f, &mut emit));
                                lp.counts.frames_rx += u64::from(n);
                                if n < XDP_BATCH {
                                    break;
                                }
                            }
                            gro.flush(&mut emit);
                        }
                        lp.arm_tap(idx)?;
                    }
                    K_TAP => {
                        if res > 0 {
                            let n = res as usize;
                            let b = &mut lp.tap_bufs[idx];
                            lp.counts.frames_rx += 1;
                            if lp.tap_fds.len() > 1 {
                                let h = if lp.off.vnet { VNET_HDR_LEN } else { 0 };
                                shared.flows().record(b.get(h..n).unwrap_or(&[]), me);
                            }
                            if lp.off.vnet {
                                match VnetHdr::parse(&b[..n]) {
                                    Some(h) if h.gso_type != offload::GSO_NONE => {
                                        let frame = &b[VNET_HDR_LEN..n];
                                        core.handle_tap_tso(
                                            now,
                                            &h,
                                            frame,
                                            max_seg_frame,
                                            &mut out,
                                        );
                                    }
                                    Some(h) => {
                                        let frame = &mut b[VNET_HDR_LEN..n];
                                        if h.flags & offload::F_NEEDS_CSUM != 0
                                            && offload::complete_csum(
                                                frame,
                                                usize::from(h.csum_start),
                                                usize::from(h.csum_offset),
                                            )
                                            .is_err()
                                        {
                                            core.count_drop("bad_csum_offload");
                                        } else {
                                            core.handle_tap(now, frame, &mut out);
                                        }
                                    }
                                    None => core.count_drop("runt_frame"),
                                }
                            } else {
                                core.handle_tap(now, &b[..n], &mut out);
                            }
                        } else if res < 0 {
                            core.count_drop("tap_read_error");
                            tap_errors += 1;
                            // A device that went away fails every read at once: give up
                            // instead of spinning.
                            if tap_errors > 10_000 && fatal.is_none() {
                                fatal = Some(IoError::Sys {
                                    call: format!("read from TAP {}", info.tap),
                                    source: std::io::Error::from_raw_os_error(-res),
                                });
                            }
                        }
                        if res > 0 {
                            tap_errors = 0;
                        }
                        lp.arm_tap(idx)?;
                    }
                    K_OUT => {
                        if let Some(f) = lp.flights.get_mut(idx).and_then(Option::take) {
                            lp.free.push(idx);
                            if res < 0 {
                                if f.gso && (res == -libc::EIO || res == -libc::EINVAL) {
                                    lp.off.gso = false;
                                    if !lp.gso_warned {
                                        lp.gso_warned = true;
                                        tracing::warn!(errno = -res, "UDP GSO send failed; sending datagrams one by one from now on");
                                    }
                                    core.count_drop("gso_send_failed");
                                } else {
                                    core.count_drop("send_error");
                                }
                            }
                            out.give(f.buf, f.big);
                        }
                    }
                    _ => core.count_drop("unknown_completion"),
                }
            }
            if let Some(e) = fatal.take() {
                break Err(e);
            }
            if now.saturating_duration_since(last_load) >= LOAD_CHECK {
                last_load = now;
                if !spin.is_zero() {
                    spinner.set_host_busy(host_busy(idle.sample(cores)));
                }
            }
            if me == 0 && now.saturating_duration_since(last_tick) >= TICK {
                last_tick = now;
                if now.saturating_duration_since(last_host) >= super::driver::HOST_REFRESH {
                    last_host = now;
                    let (l, o) = super::driver::host_addrs(&info.tap, info.listen_addr);
                    core.set_host_addrs(l, o);
                }
                core.poll(now, &mut out);
            }
            if let Err(e) = lp.flush(core, &mut out) {
                break Err(e);
            }
            if now.saturating_duration_since(last_pub) >= PUBLISH {
                last_pub = now;
                shared.counters(me).publish(&lp.counts);
                if me == 0 {
                    let mut s = core.status(now);
                    s.threads = shared.status();
                    s.datapath = info.datapath.clone();
                    s.datapath_reason = info.datapath_reason.clone();
                    s.io = lp.describe();
                    s.tap = info.tap.clone();
                    s.mtu = info.mtu;
                    s.listen = info.listen.clone();
                    *snap.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
                }
            }
            drop(guard);
            if lp.xdp_after_unlock {
                if let Some(p) = lp.port.xdp() {
                    lp.counts.frames_tx += out.tap.len() as u64;
                    xdp_drops = frames::send_xdp_unlocked(p, &mut out);
                }
            }
        }
    })();
    // Receives and reads are still armed and the kernel cancels them asynchronously
    // after the ring closes: their memory is leaked on purpose (the process is exiting)
    // so that the kernel can never write into freed buffers.
    drop(lp.ring);
    std::mem::forget(lp.udp_slots);
    std::mem::forget(lp.tap_bufs);
    std::mem::forget(lp.flights);
    result
}
