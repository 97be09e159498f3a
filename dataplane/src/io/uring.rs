//! The edge's forwarder threads on io_uring. A [`Forwarder`] is one thread: its own UDP
//! socket and frame-port queue, the protocol core shared with the others (see
//! `io::threads`). UDP receives and frame-port reads stay armed (one of each while the
//! loop is calm, several under load: `io::armed`); each round waits for completions
//! (`Forwarder::wait`: its own sends and writes and one more event), locks the core
//! once, hands it what arrived
//! (`Forwarder::reap`: datagrams to `Forwarder::on_udp`, frames to
//! `Forwarder::on_frames`, finished sends back to the pools), runs the core's timers
//! (thread 0), submits everything the core queued as one batch (`Forwarder::flush`) and
//! publishes counters and status (`Forwarder::publish`). UDP GSO/GRO and the TAP's
//! virtio header (TSO, checksum offload) are used when the kernel has them.
//!
//! What differs between a TAP device and an XDP port (what stays armed, how frames are
//! taken in, how frames for the VMs leave) lives in [`RingPort`]; the forwarder does not
//! ask which one it drives.
//!
//! Buffers handed to the kernel are owned by slots that live (boxed, never moved) until
//! their completion arrives; the ring is dropped before the file descriptors, and the
//! buffers the kernel may still write into are then leaked, not freed (see [`Forwarder`]).

use std::mem::ManuallyDrop;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use io_uring::{opcode, squeue, types, IoUring};

use crate::edge::EdgeCore;
use crate::offload::VNET_HDR_LEN;
use crate::outbox::{Outbox, UdpOut};
use crate::status::EdgeStatus;

use super::armed::{wait_for, Armed};
use super::ctl::Snapshot;
use super::driver::{self, EdgeInfo};
use super::frames::{FramePort, RingPort, RxContext};
use super::levers::{on, Levers};
use super::mtu;
use super::multishot::{refused, Multishot};
use super::spin::{host_busy, AdaptiveSpin, IdleCores};
use super::sys::{from_sockaddr, set_blocking, to_sockaddr};
use super::threads::{Counts, Forwarders, MAX_THREADS};
use super::udp::{read_gro_cmsg, write_segment_cmsg, CMSG_SPACE};
use super::IoError;

const UDP_SLOTS: usize = 4;
const RX_BUF: usize = 65_536 + VNET_HDR_LEN;
const MAX_IN_FLIGHT: usize = 2048;
/// The longest sleep: status snapshots and per-thread counters are published this often
/// while traffic flows, and an idle loop wakes this often at most (the core's own timers
/// are waited for exactly, through `EdgeCore::poll_timeout`).
const MAX_WAIT: Duration = Duration::from_millis(200);
/// While the completion queue never runs dry, the core's next deadline is re-read this
/// often (an event can move it earlier); it is always re-read before the loop may sleep.
const DEADLINE_REFRESH: Duration = Duration::from_millis(5);
/// How often the host's load is checked to decide whether polling may run.
const LOAD_CHECK: Duration = Duration::from_secs(1);
const PUBLISH: Duration = Duration::from_millis(200);
const MAX_GSO_SEGS: usize = 64;
/// A TAP read longer than this is a TSO super-frame: a sign of bulk traffic.
const SMALL_READ: usize = 2048;
const MAX_GSO_BYTES: usize = 65_000;

const K_UDP: u64 = 1 << 32;
const K_FRAMES: u64 = 2 << 32;
const K_OUT: u64 = 3 << 32;
const K_UDP_MULTI: u64 = 4 << 32;
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
    /// io_uring features beyond plain reads and sends (`io::levers`).
    pub levers: Levers,
}

impl Offloads {
    /// The status and log line of the I/O: these offloads and levers, then `port`, the
    /// frame side's own description (`FramePort::describe`; every thread's port is set up
    /// alike), then the number of forwarder threads when above one.
    pub fn describe(&self, port: &str, threads: usize) -> String {
        let threads = if threads > 1 {
            format!("; {threads} threads")
        } else {
            String::new()
        };
        format!(
            "io_uring; udp-gso {}; udp-gro {}; {}; {port}{threads}",
            on(self.gso),
            on(self.gro),
            self.levers.describe(),
        )
    }
}

/// The io_uring and the send buffers it has been lent: each stays in `flights` until its
/// completion is reaped.
struct Ring {
    uring: IoUring,
    /// Never freed: sends still in flight when the ring closes may be read afterwards.
    flights: ManuallyDrop<Vec<Option<InFlight>>>,
    free: Vec<usize>,
    /// Sends and writes queued since the last wait.
    outs: usize,
}

impl Ring {
    fn new() -> Result<Self, IoError> {
        let uring = IoUring::builder()
            .setup_single_issuer()
            .build(1024)
            .or_else(|_| IoUring::new(1024))
            .map_err(|e| IoError::Sys {
                call: "io_uring_setup".into(),
                source: e,
            })?;
        Ok(Self {
            uring,
            flights: ManuallyDrop::new(Vec::new()),
            free: Vec::new(),
            outs: 0,
        })
    }

    fn push(&mut self, e: &squeue::Entry) -> Result<(), IoError> {
        loop {
            // SAFETY: every entry refers to memory owned by a slot or an in-flight record
            // that stays alive and unmoved until its completion is reaped.
            if unsafe { self.uring.submission().push(e) }.is_ok() {
                return Ok(());
            }
            self.uring.submit().map_err(|e| IoError::Sys {
                call: "io_uring_enter".into(),
                source: e,
            })?;
        }
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

    /// Queues a write of `buf[start..start + len]` to `fd`; false when too many
    /// operations are in flight (the buffer is then dropped).
    fn write(
        &mut self,
        fd: RawFd,
        buf: Vec<u8>,
        start: usize,
        len: usize,
        big: bool,
    ) -> Result<bool, IoError> {
        let ptr = buf[start..].as_ptr();
        let Some(i) = self.flight(InFlight {
            buf,
            big,
            gso: false,
            _meta: None,
        }) else {
            return Ok(false);
        };
        let e = opcode::Write::new(types::Fd(fd), ptr, len as u32)
            .build()
            .user_data(K_OUT | i as u64);
        self.push(&e)?;
        self.outs += 1;
        Ok(true)
    }

    /// Queues the send of datagram `u` on `fd` (a GSO send of `u.segment`-byte segments
    /// when set); false when too many operations are in flight (the buffer is then
    /// dropped).
    fn send(&mut self, fd: RawFd, u: UdpOut) -> Result<bool, IoError> {
        let (addr, alen) = to_sockaddr(&u.dst);
        let mut meta = Box::new(SendMeta {
            iov: libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: u.len,
            },
            addr,
            ctrl: [0; CMSG_SPACE / 8],
            // SAFETY: plain old data; zero is valid.
            hdr: unsafe { std::mem::zeroed() },
        });
        meta.iov.iov_base = u.buf[u.start..].as_ptr() as *mut libc::c_void;
        meta.hdr.msg_name = &mut meta.addr as *mut _ as *mut libc::c_void;
        meta.hdr.msg_namelen = alen;
        meta.hdr.msg_iov = &mut meta.iov;
        meta.hdr.msg_iovlen = 1;
        if let Some(s) = u.segment {
            let n = write_segment_cmsg(&mut meta.ctrl, s as u16);
            meta.hdr.msg_control = meta.ctrl.as_mut_ptr() as *mut libc::c_void;
            meta.hdr.msg_controllen = n;
        }
        let hp: *const libc::msghdr = &meta.hdr;
        let Some(i) = self.flight(InFlight {
            buf: u.buf,
            big: u.big,
            gso: u.segment.is_some(),
            _meta: Some(meta),
        }) else {
            return Ok(false);
        };
        let e = opcode::SendMsg::new(types::Fd(fd), hp)
            .build()
            .user_data(K_OUT | i as u64);
        self.push(&e)?;
        self.outs += 1;
        Ok(true)
    }
}

/// What every forwarder thread of an edge is set up with.
#[derive(Clone)]
pub struct ForwarderConfig {
    /// Offloads probed at start.
    pub off: Offloads,
    /// MTU of the underlay path (datagrams between edges).
    pub underlay_mtu: usize,
    /// Longest busy-poll before sleeping (zero: never poll).
    pub spin: Duration,
    /// What status reports about the edge.
    pub info: EdgeInfo,
    /// Where thread 0 publishes the status.
    pub snap: Snapshot<EdgeStatus>,
    /// Set to stop every thread.
    pub stop: Arc<AtomicBool>,
}

/// One forwarder thread of an edge (see the module comment).
///
/// Teardown: fields drop in the order they are declared, and the ring goes first.
/// Receives and reads are still armed then and the kernel cancels them asynchronously
/// after the ring closes, so the memory it may still write into (receive slots, TAP read
/// buffers, in-flight sends) is held in `ManuallyDrop` and leaked on purpose (the thread
/// is ending with the process); the socket and the frame port close last.
pub struct Forwarder {
    ring: Ring,
    // Boxed so a slot's address never changes while the kernel holds pointers into it.
    #[allow(clippy::vec_box)]
    udp_slots: ManuallyDrop<Vec<Box<RecvSlot>>>,
    /// Which UDP receives are armed, and how many should be (see `io::armed`).
    udp_armed: Armed,
    /// The multishot receive that replaces `udp_slots` when the kernel has it.
    multishot: Option<Multishot>,
    port: RingPort,
    /// The same for the frame port's reads.
    frames_armed: Armed,
    sock: UdpSocket,
    out: Outbox,
    off: Offloads,
    gso_warned: bool,
    underlay_payload: usize,
    max_seg_frame: usize,
    shared: Arc<Forwarders>,
    me: usize,
    counts: Counts,
    cfg: ForwarderConfig,
    spinner: AdaptiveSpin,
    idle: IdleCores,
    cores: usize,
    /// Thread 0: when the core's timers are due next (`EdgeCore::poll_timeout`).
    next_poll: Instant,
    /// Thread 0: when `next_poll` was last read from the core.
    deadline_read: Instant,
    last_pub: Instant,
    last_load: Instant,
    last_host: Instant,
    /// This round's completions: user data, result, flags.
    cqes: Vec<(u64, i32, u32)>,
    /// An error found while reaping, returned once the round is done.
    fatal: Option<IoError>,
}

impl Forwarder {
    /// Forwarder thread `me` over its socket and frame-port queue; `tap_queues` holds
    /// every queue of a multi-queue TAP device (empty on XDP). Thread 0 also runs the
    /// core's timers and publishes the status snapshot.
    pub fn new(
        shared: Arc<Forwarders>,
        me: usize,
        sock: UdpSocket,
        port: FramePort,
        tap_queues: Arc<[RawFd]>,
        cfg: &ForwarderConfig,
    ) -> Result<Self, IoError> {
        let ring = Ring::new()?;
        set_blocking(sock.as_raw_fd());
        let mut port = RingPort::new(port, tap_queues, shared.threads());
        let mut off = cfg.off;
        let multishot = if off.levers.multishot {
            match Multishot::new(&ring.uring, RX_BUF) {
                Ok(m) => Some(m),
                Err(e) => {
                    if me == 0 {
                        tracing::warn!("no multishot receive ({e}); one recvmsg per datagram");
                    }
                    off.levers.multishot = false;
                    None
                }
            }
        } else {
            None
        };
        if off.levers.fixed_reads {
            off.levers.fixed_reads = match port.register_fixed_reads(&ring.uring) {
                Ok(registered) => registered,
                Err(e) => {
                    if me == 0 {
                        tracing::warn!("TAP read buffers not registered ({e}); plain reads");
                    }
                    false
                }
            };
        }
        let frames_armed = Armed::new(port.reads());
        let mut out = Outbox::new(mtu::packet_buf_size(cfg.info.mtu));
        out.gso = cfg.off.gso;
        out.gso_max_segment = mtu::udp_payload(cfg.underlay_mtu);
        if port.takes_vnet_hdr(cfg.off.vnet) {
            out.enable_coalescing();
        }
        let now = Instant::now();
        Ok(Self {
            ring,
            udp_slots: ManuallyDrop::new((0..UDP_SLOTS).map(|_| RecvSlot::new()).collect()),
            udp_armed: Armed::new(UDP_SLOTS),
            multishot,
            port,
            frames_armed,
            sock,
            out,
            off,
            gso_warned: false,
            underlay_payload: mtu::udp_payload(cfg.underlay_mtu),
            max_seg_frame: mtu::max_segment_frame(cfg.underlay_mtu),
            shared,
            me,
            counts: Counts::default(),
            cfg: cfg.clone(),
            spinner: AdaptiveSpin::new(cfg.spin),
            idle: IdleCores::default(),
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            next_poll: now,
            deadline_read: now,
            last_pub: now - PUBLISH,
            last_load: now - LOAD_CHECK,
            last_host: now - driver::HOST_REFRESH,
            cqes: Vec::with_capacity(256),
            fatal: None,
        })
    }

    /// Runs until the stop flag is set or an I/O error ends the thread.
    pub fn run(mut self) -> Result<(), IoError> {
        let shared = Arc::clone(&self.shared);
        while !self.cfg.stop.load(Ordering::Relaxed) {
            let idle_from = self.wait()?;
            // The core is locked once per round (not per packet) and never while waiting.
            let (mut guard, waited) = shared.lock_counted();
            self.counts.lock_waits += u64::from(waited);
            let core: &mut EdgeCore = &mut guard;
            self.port.count_drops(core);
            let now = Instant::now();
            self.reap(core, now, idle_from)?;
            if let Some(e) = self.fatal.take() {
                return Err(e);
            }
            let polled = self.tick(core, now);
            // New session indexes into the junk filter before anything names them.
            if let Some(f) = &self.cfg.info.xdp_filter {
                f.sync_sessions(core.session_generation(), core.session_indexes());
            }
            self.flush(core)?;
            self.publish(core, now);
            self.read_deadline(core, now, polled);
            drop(guard);
            self.counts.frames_tx += self.port.send_unlocked(&mut self.out);
        }
        Ok(())
    }

    /// Arms UDP receives and frame-port reads up to their targets (`io::armed`).
    fn rearm(&mut self) -> Result<(), IoError> {
        if let Some(m) = self.multishot.as_mut() {
            if m.needs_arming() {
                let e = m.arm(self.sock.as_raw_fd(), K_UDP_MULTI);
                self.ring.push(&e)?;
            }
        }
        while let Some(i) = self.udp_armed.to_arm().filter(|_| self.multishot.is_none()) {
            let e = self.udp_slots[i].arm(self.sock.as_raw_fd(), K_UDP | i as u64);
            self.ring.push(&e)?;
        }
        while let Some(i) = self.frames_armed.to_arm() {
            let e = self.port.arm(i).user_data(K_FRAMES | i as u64);
            self.ring.push(&e)?;
        }
        Ok(())
    }

    /// Submits what is queued and waits for completions (after polling for the adaptive
    /// window), collecting them; returns when the wait started idle (no completion
    /// ready). Sends and writes just queued are waited for along with one more event
    /// (`io::armed::wait_for`).
    fn wait(&mut self) -> Result<Option<Instant>, IoError> {
        let ready = !self.ring.uring.completion().is_empty();
        if ready {
            self.udp_armed.busy();
            self.frames_armed.busy();
        } else {
            self.udp_armed.calm();
            self.frames_armed.calm();
        }
        self.udp_armed.new_wait();
        self.frames_armed.new_wait();
        self.rearm()?;
        let outs = std::mem::take(&mut self.ring.outs);
        let uring = &mut self.ring.uring;
        let want = wait_for(ready, outs);
        // Before sleeping, poll the completion queue for the adaptive window: a wake-up
        // costs more than a short poll and dominates the overlay's RTT.
        let idle_from = (!ready).then(Instant::now);
        let window = self.spinner.window();
        if idle_from.is_some() && !window.is_zero() {
            let until = Instant::now() + window;
            let _ = uring.submit();
            while uring.completion().len() < want && Instant::now() < until {
                let _ = uring
                    .submitter()
                    .submit_with_args(0, &types::SubmitArgs::new());
                std::hint::spin_loop();
            }
        }
        // Thread 0 sleeps until the core's next timer at most; while AF_XDP transmits are
        // in flight, wake up soon to reap their completions.
        let mut sleep = MAX_WAIT;
        if self.me == 0 {
            sleep = sleep.min(self.next_poll.saturating_duration_since(Instant::now()));
        }
        if self.port.tx_pending() {
            sleep = sleep.min(Duration::from_millis(1));
        }
        let timeout = types::Timespec::from(sleep);
        let args = types::SubmitArgs::new().timespec(&timeout);
        match uring.submitter().submit_with_args(want, &args) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::ETIME) | Some(libc::EINTR) | Some(libc::EBUSY)
                ) => {}
            Err(e) => {
                return Err(IoError::Sys {
                    call: "io_uring_enter".into(),
                    source: e,
                })
            }
        }
        self.cqes.clear();
        self.cqes.extend(
            uring
                .completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        Ok(idle_from)
    }

    /// Handles the completions of this round and re-arms what they used.
    fn reap(
        &mut self,
        core: &mut EdgeCore,
        now: Instant,
        idle_from: Option<Instant>,
    ) -> Result<(), IoError> {
        // Only traffic or a timeout tells how far away the next event was; completions
        // of our own sends arrive at once and say nothing about it.
        if let Some(t0) = idle_from {
            if self.cqes.is_empty() || self.cqes.iter().any(|c| c.0 & K_MASK != K_OUT) {
                self.spinner.waited(now.saturating_duration_since(t0));
            }
        }
        // How long after the wait began its completions came (zero when some were ready).
        let waited = idle_from.map_or(Duration::ZERO, |t0| now.saturating_duration_since(t0));
        let cqes = std::mem::take(&mut self.cqes);
        let mut r = Ok(());
        for &(ud, res, flags) in &cqes {
            let i = (ud & !K_MASK) as usize;
            r = match ud & K_MASK {
                K_UDP => self.on_udp(i, res, core, now, waited),
                K_UDP_MULTI => {
                    self.on_udp_multishot(res, flags, core, now);
                    Ok(())
                }
                K_FRAMES => self.on_frames(i, res, core, now, waited),
                K_OUT => {
                    self.on_sent(i, res, core);
                    Ok(())
                }
                _ => {
                    core.count_drop("unknown_completion");
                    Ok(())
                }
            };
            if r.is_err() {
                break;
            }
        }
        self.cqes = cqes;
        r
    }

    /// A datagram (or a GRO batch of them) arrived in receive slot `i`.
    fn on_udp(
        &mut self,
        i: usize,
        res: i32,
        core: &mut EdgeCore,
        now: Instant,
        waited: Duration,
    ) -> Result<(), IoError> {
        if res > 0 {
            let slot = &mut self.udp_slots[i];
            let n = res as usize;
            let src = from_sockaddr(&slot.addr);
            let seg = if self.off.gro {
                read_gro_cmsg(&slot.ctrl, slot.hdr.msg_controllen)
            } else {
                None
            };
            if let Some(src) = src {
                let cx = (now, &mut self.out, &mut self.counts);
                if handle_datagrams(core, cx, src, &mut slot.buf[..n], seg) {
                    // A GRO batch: datagrams arrive faster than one per round.
                    self.udp_armed.busy();
                }
            }
        } else if res < 0 {
            core.count_drop("udp_recv_error");
        }
        self.udp_armed
            .done(i, if res > 0 { waited } else { Duration::MAX });
        Ok(())
    }

    /// A completion of the multishot receive: its datagram (or GRO batch) is handled in
    /// place and the buffer goes straight back to the kernel's ring.
    fn on_udp_multishot(&mut self, res: i32, flags: u32, core: &mut EdgeCore, now: Instant) {
        let Some(m) = self.multishot.as_mut() else {
            return core.count_drop("unknown_completion");
        };
        let r = match m.complete(res, flags) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(errno) if refused(errno) && m.needs_arming() => {
                // The kernel does not take the request: back to one recvmsg per slot,
                // for good (the ring's memory stays leaked, see `io::multishot`).
                tracing::warn!(errno, "multishot receive refused; one recvmsg per datagram");
                self.multishot = None;
                self.off.levers.multishot = false;
                return core.count_drop("udp_recv_error");
            }
            Err(_) => return core.count_drop("udp_recv_error"),
        };
        let (o, n) = r.payload;
        match r.src {
            Some(src) if !r.truncated => {
                let seg = if self.off.gro { r.segment } else { None };
                let cx = (now, &mut self.out, &mut self.counts);
                handle_datagrams(core, cx, src, &mut m.buf(r.bid)[o..o + n], seg);
            }
            _ => core.count_drop("udp_recv_error"),
        }
        m.give_back(r.bid);
    }

    /// Read `i` of the frame port completed.
    fn on_frames(
        &mut self,
        i: usize,
        res: i32,
        core: &mut EdgeCore,
        now: Instant,
        waited: Duration,
    ) -> Result<(), IoError> {
        if res > SMALL_READ as i32 {
            self.frames_armed.busy();
        }
        let mut cx = RxContext {
            now,
            core,
            out: &mut self.out,
            flows: self.shared.flows(),
            me: self.me,
            max_seg_frame: self.max_seg_frame,
        };
        match self.port.on_read(i, res, &mut cx) {
            Ok(n) => self.counts.frames_rx += n,
            Err(e) => {
                self.fatal.get_or_insert(e);
            }
        }
        self.frames_armed
            .done(i, if res > 0 { waited } else { Duration::MAX });
        Ok(())
    }

    /// Send `i` completed: its buffer goes back to the pool. A GSO send the kernel
    /// refuses turns GSO off for good (once, loudly).
    fn on_sent(&mut self, i: usize, res: i32, core: &mut EdgeCore) {
        let Some(f) = self.ring.flights.get_mut(i).and_then(Option::take) else {
            return;
        };
        self.ring.free.push(i);
        if res < 0 {
            if f.gso && (res == -libc::EIO || res == -libc::EINVAL) {
                self.off.gso = false;
                if !self.gso_warned {
                    self.gso_warned = true;
                    tracing::warn!(
                        errno = -res,
                        "UDP GSO send failed; sending datagrams one by one from now on"
                    );
                }
                core.count_drop("gso_send_failed");
            } else {
                core.count_drop("send_error");
            }
        }
        self.out.give(f.buf, f.big);
    }

    /// The host's load (whether polling may run) and, on thread 0, the core's timers when
    /// they are due; says whether the core was polled.
    fn tick(&mut self, core: &mut EdgeCore, now: Instant) -> bool {
        if now.saturating_duration_since(self.last_load) >= LOAD_CHECK {
            self.last_load = now;
            if !self.cfg.spin.is_zero() {
                self.spinner
                    .set_host_busy(host_busy(self.idle.sample(self.cores)));
            }
        }
        if self.me != 0 {
            return false;
        }
        if now.saturating_duration_since(self.last_host) >= driver::HOST_REFRESH {
            self.last_host = now;
            let (l, o) = driver::host_addrs(&self.cfg.info.tap, self.cfg.info.listen_addr);
            core.set_host_addrs(l, o);
        }
        if now < self.next_poll {
            return false;
        }
        core.poll(now, &mut self.out);
        true
    }

    /// Thread 0: re-reads the core's next deadline after a poll, before the loop may sleep
    /// (no completion waiting) and at least every `DEADLINE_REFRESH` under load. A
    /// deadline the poll left in the past is retried a millisecond later, not in a spin.
    fn read_deadline(&mut self, core: &EdgeCore, now: Instant, polled: bool) {
        if self.me != 0 {
            return;
        }
        let idle = self.ring.uring.completion().is_empty();
        if !(polled
            || idle
            || now.saturating_duration_since(self.deadline_read) >= DEADLINE_REFRESH)
        {
            return;
        }
        self.deadline_read = now;
        let next = core.poll_timeout().unwrap_or(now + MAX_WAIT);
        self.next_poll = if polled && next <= now {
            now + Duration::from_millis(1)
        } else {
            next
        };
    }

    /// Submits everything the core queued: datagrams, then frames for the VMs.
    fn flush(&mut self, core: &mut EdgeCore) -> Result<(), IoError> {
        self.out.flush_tap();
        self.flush_udp(core)?;
        let ring = &mut self.ring;
        let n = self.port.send(
            core,
            &mut self.out,
            self.me,
            self.shared.flows(),
            |fd, f, start, len, core| {
                if !ring.write(fd, f.buf, start, len, f.big)? {
                    core.count_drop("tap_backpressure");
                }
                Ok(())
            },
        )?;
        self.counts.frames_tx += n;
        Ok(())
    }

    /// Sends the queued datagrams: consecutive equal-size datagrams to one address are
    /// grouped into GSO sends; a GSO batch of the core is split when GSO is off.
    fn flush_udp(&mut self, core: &mut EdgeCore) -> Result<(), IoError> {
        let mut udp = std::mem::take(&mut self.out.udp);
        let mut i = 0;
        while i < udp.len() {
            let dst = udp[i].dst;
            if let Some(seg) = udp[i].segment {
                let u = &mut udp[i];
                let b = std::mem::take(&mut u.buf);
                if self.off.gso {
                    self.send_udp(datagram(dst, b, 0, u.len, Some(seg), true), core)?;
                } else {
                    // No GSO: one datagram per segment, each copied to a small buffer.
                    let mut o = 0;
                    while o < u.len {
                        let e = (o + seg).min(u.len);
                        let mut sb = self.out.take();
                        sb[..e - o].copy_from_slice(&b[o..e]);
                        self.send_udp(datagram(dst, sb, 0, e - o, None, false), core)?;
                        o = e;
                    }
                    self.out.give(b, true);
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
                self.send_udp(datagram(dst, b, u.start, u.len, None, false), core)?;
            } else {
                let mut big = self.out.take_big();
                let mut off = 0;
                for u in &udp[i..j] {
                    let b = u.bytes();
                    big[off..off + b.len()].copy_from_slice(b);
                    off += b.len();
                }
                for u in &mut udp[i..j] {
                    let b = std::mem::take(&mut u.buf);
                    self.out.give(b, false);
                }
                self.send_udp(datagram(dst, big, 0, off, Some(first_len), true), core)?;
            }
            i = j;
        }
        udp.clear();
        self.out.udp = udp;
        Ok(())
    }

    fn send_udp(&mut self, u: UdpOut, core: &mut EdgeCore) -> Result<(), IoError> {
        self.counts.udp_tx += match u.segment {
            Some(s) => u.len.div_ceil(s.max(1)) as u64,
            None => 1,
        };
        if !self.ring.send(self.sock.as_raw_fd(), u)? {
            core.count_drop("udp_backpressure");
        }
        Ok(())
    }

    /// Every status period: this thread's counters, and on thread 0 the status snapshot.
    fn publish(&mut self, core: &mut EdgeCore, now: Instant) {
        if now.saturating_duration_since(self.last_pub) < PUBLISH {
            return;
        }
        self.last_pub = now;
        self.shared.counters(self.me).publish(&self.counts);
        if self.me != 0 {
            return;
        }
        let info = &self.cfg.info;
        let mut s = core.status(now);
        s.threads = self.shared.status();
        s.datapath = info.datapath.clone();
        s.datapath_reason = info.datapath_reason.clone();
        s.xdp_filter = info.xdp_filter.as_ref().map(|f| f.status());
        s.io = self
            .off
            .describe(&self.port.describe(), self.shared.threads());
        s.tap = info.tap.clone();
        s.mtu = info.mtu;
        s.listen = info.listen.clone();
        *self.cfg.snap.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
    }
}

/// Hands the core a received datagram, or each datagram of a GRO batch (`segment`-byte
/// pieces of `buf`); true when it was a batch.
fn handle_datagrams(
    core: &mut EdgeCore,
    (now, out, counts): (Instant, &mut Outbox, &mut Counts),
    src: std::net::SocketAddr,
    buf: &mut [u8],
    segment: Option<usize>,
) -> bool {
    let n = buf.len();
    let seg = segment.unwrap_or(n).max(1);
    counts.udp_rx += core.handle_udp_batch(now, src, buf, seg, out) as u64;
    seg < n
}

/// A datagram (or GSO batch, with `segment`) for [`Forwarder::send_udp`].
fn datagram(
    dst: std::net::SocketAddr,
    buf: Vec<u8>,
    start: usize,
    len: usize,
    segment: Option<usize>,
    big: bool,
) -> UdpOut {
    UdpOut {
        dst,
        buf,
        start,
        len,
        segment,
        big,
    }
}

/// Runs one forwarder thread per UDP socket and frame-port queue (thread 0 on the
/// calling thread; with one socket no thread is spawned) until `cfg.stop` is set or one
/// of them fails (which stops the others); returns the first error.
pub fn run_edge_threads(
    core: EdgeCore,
    socks: Vec<UdpSocket>,
    ports: Vec<FramePort>,
    cfg: ForwarderConfig,
) -> Result<(), IoError> {
    if socks.len() != ports.len() || socks.is_empty() || socks.len() > MAX_THREADS {
        return Err(IoError::Invalid(format!(
            "{} sockets for {} frame queues",
            socks.len(),
            ports.len()
        )));
    }
    let n = socks.len();
    let shared = Arc::new(Forwarders::new(core, n));
    let tap_queues: Arc<[RawFd]> = match ports.first() {
        Some(FramePort::Tap(_)) => ports.iter().map(FramePort::fd).collect(),
        _ => Arc::from(Vec::new()),
    };
    let mut work = socks.into_iter().zip(ports);
    let (sock0, port0) = work
        .next()
        .ok_or_else(|| IoError::Invalid("no forwarder".into()))?;
    let mut handles = Vec::with_capacity(n - 1);
    for (i, (sock, port)) in work.enumerate() {
        let me = i + 1;
        let (sh, queues, cfg_t) = (Arc::clone(&shared), Arc::clone(&tap_queues), cfg.clone());
        let h = std::thread::Builder::new()
            .name(format!("mvc-fwd-{me}"))
            .spawn(move || {
                let r = Forwarder::new(sh, me, sock, port, queues, &cfg_t).and_then(Forwarder::run);
                if r.is_err() {
                    cfg_t.stop.store(true, Ordering::Relaxed);
                }
                r
            })
            .map_err(|e| IoError::Sys {
                call: "spawn forwarder thread".into(),
                source: e,
            });
        match h {
            Ok(h) => handles.push(h),
            Err(e) => {
                cfg.stop.store(true, Ordering::Relaxed);
                for h in handles {
                    let _ = h.join();
                }
                return Err(e);
            }
        }
    }
    let r0 = Forwarder::new(Arc::clone(&shared), 0, sock0, port0, tap_queues, &cfg)
        .and_then(Forwarder::run);
    cfg.stop.store(true, Ordering::Relaxed);
    let mut first = r0.err();
    for h in handles {
        let r = h
            .join()
            .unwrap_or_else(|_| Err(IoError::Invalid("a forwarder thread panicked".into())));
        if let (None, Err(e)) = (&first, r) {
            first = Some(e);
        }
    }
    match first {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
