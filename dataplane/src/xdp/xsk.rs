//! AF_XDP socket: UMEM, fill/completion/RX/TX rings, driven in batches.
//!
//! This is the one module of the XDP path with raw memory and system calls.
//! Layout and protocol follow `linux/if_xdp.h` and libxdp's `xsk.h`:
//!
//! * The UMEM is an anonymous mapping cut into `frame_size` chunks. Half of
//!   the chunks belong to receive (they cycle fill ring -> kernel -> RX ring ->
//!   us -> fill ring), half to transmit (free list -> TX ring -> kernel ->
//!   completion ring -> free list). A chunk is never in two places at once.
//! * Each ring is a single-producer single-consumer array shared with the
//!   kernel through `mmap` of the socket fd: a `producer` and a `consumer`
//!   index (free-running `u32`, masked by `size - 1`), a `flags` word and the
//!   descriptors. We read the other side's index with `Acquire` and publish
//!   ours with `Release`; between those we keep cached copies so that a batch
//!   costs two atomic operations, not two per frame.
//! * Drop order: rings are unmapped, then the socket fd is closed, then the
//!   UMEM is unmapped (fields are declared in that order), so the kernel never
//!   holds a socket whose rings or UMEM have gone away under it.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd},
    ptr::NonNull,
    sync::atomic::{AtomicU32, Ordering},
};

use thiserror::Error;

/// A failed system call of the AF_XDP setup.
#[derive(Debug, Error)]
#[error("{call}: {source}")]
pub struct SysError {
    /// Which call (and option) failed.
    pub call: &'static str,
    /// The errno.
    #[source]
    pub source: io::Error,
}

pub(super) fn last(call: &'static str) -> SysError {
    SysError {
        call,
        source: io::Error::last_os_error(),
    }
}

/// Sizes of the UMEM and the rings.
#[derive(Clone, Copy, Debug)]
pub struct XskConfig {
    /// Number of UMEM chunks (power of two, at least 4).
    pub frames: u32,
    /// Size of one chunk: 2048 or 4096 (aligned chunk mode).
    pub frame_size: u32,
}

impl Default for XskConfig {
    fn default() -> Self {
        Self {
            frames: 4096,
            frame_size: 4096,
        }
    }
}

/// Anonymous memory registered with the kernel as the socket's UMEM.
struct Umem {
    ptr: NonNull<u8>,
    len: usize,
}

impl Umem {
    fn new(len: usize) -> Result<Self, SysError> {
        // SAFETY: anonymous private mapping with no address hint; the result
        // is checked against MAP_FAILED before use.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last("mmap(umem)"));
        }
        let ptr = NonNull::new(ptr.cast::<u8>()).ok_or_else(|| SysError {
            call: "mmap(umem)",
            source: io::Error::other("null mapping"),
        })?;
        Ok(Self { ptr, len })
    }
}

impl Umem {
    /// The bytes of a received descriptor, or `None` if it points outside.
    fn slice(&self, addr: u64, len: u32) -> Option<&[u8]> {
        let start = usize::try_from(addr).ok()?;
        let end = start.checked_add(len as usize)?;
        if end > self.len {
            return None;
        }
        // SAFETY: [start, end) lies inside the mapping (checked above); the
        // chunk belongs to us until it goes back to the fill ring, which
        // happens only after the borrow ends.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.as_ptr().add(start), len as usize) })
    }
}

impl Drop for Umem {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly the mapping made in `new`; the
        // socket that registered it was closed before (field order of `Xsk`).
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// One mmapped ring. `T` is `xdp_desc` for RX/TX and `u64` for fill/completion.
struct Ring<T> {
    map: NonNull<u8>,
    map_len: usize,
    producer: NonNull<AtomicU32>,
    consumer: NonNull<AtomicU32>,
    flags: NonNull<AtomicU32>,
    descs: NonNull<T>,
    mask: u32,
    size: u32,
    /// Our copy of the producer index (ours for producer rings, last seen for
    /// consumer rings).
    cached_prod: u32,
    /// Our copy of the consumer index (plus `size` for producer rings, as in
    /// libxdp, so that `cached_cons - cached_prod` is the free space).
    cached_cons: u32,
}

impl<T: Copy> Ring<T> {
    /// Maps the ring at page offset `pgoff` of `fd`.
    fn map(
        fd: BorrowedFd<'_>,
        off: &libc::xdp_ring_offset,
        size: u32,
        pgoff: libc::off_t,
        producer_ring: bool,
    ) -> Result<Self, SysError> {
        let map_len = off.desc as usize + size as usize * std::mem::size_of::<T>();
        // SAFETY: shared mapping of the socket's ring region as the kernel
        // documents it (offset from XDP_MMAP_OFFSETS, length desc + size *
        // entry); checked against MAP_FAILED.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                pgoff,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(last("mmap(ring)"));
        }
        let base = ptr.cast::<u8>();
        let at = |o: u64| {
            // SAFETY: the kernel's offsets lie inside the `map_len` mapping.
            NonNull::new(unsafe { base.add(o as usize) }).expect("mmap returned non-null")
        };
        let producer = at(off.producer).cast::<AtomicU32>();
        let consumer = at(off.consumer).cast::<AtomicU32>();
        let mut ring = Self {
            map: at(0),
            map_len,
            producer,
            consumer,
            flags: at(off.flags).cast::<AtomicU32>(),
            descs: at(off.desc).cast::<T>(),
            mask: size - 1,
            size,
            cached_prod: 0,
            cached_cons: 0,
        };
        // SAFETY: producer/consumer point at aligned u32 words of the ring
        // mapping, which lives as long as `ring`.
        unsafe {
            ring.cached_prod = ring.producer.as_ref().load(Ordering::Acquire);
            ring.cached_cons = ring.consumer.as_ref().load(Ordering::Acquire);
        }
        if producer_ring {
            ring.cached_cons = ring.cached_cons.wrapping_add(size);
        }
        Ok(ring)
    }

    fn producer(&self) -> &AtomicU32 {
        // SAFETY: points into the live ring mapping; the kernel only ever
        // accesses it atomically.
        unsafe { self.producer.as_ref() }
    }

    fn consumer(&self) -> &AtomicU32 {
        // SAFETY: as for `producer`.
        unsafe { self.consumer.as_ref() }
    }

    fn needs_wakeup(&self) -> bool {
        // SAFETY: as for `producer`.
        let flags = unsafe { self.flags.as_ref() }.load(Ordering::Relaxed);
        flags & libc::XDP_RING_NEED_WAKEUP != 0
    }

    /// Producer side: how many slots are free (at most `want`).
    fn free(&mut self, want: u32) -> u32 {
        let free = self.cached_cons.wrapping_sub(self.cached_prod);
        if free >= want {
            return want;
        }
        self.cached_cons = self
            .consumer()
            .load(Ordering::Acquire)
            .wrapping_add(self.size);
        self.cached_cons.wrapping_sub(self.cached_prod).min(want)
    }

    /// Producer side: writes `v` at the next reserved slot (publish with
    /// `submit`). The caller checked `free` first.
    fn push(&mut self, v: T) {
        let idx = (self.cached_prod & self.mask) as usize;
        // SAFETY: idx < size, so the slot lies inside the descriptor array;
        // the slot is ours (between the kernel's consumer and our producer).
        unsafe { self.descs.as_ptr().add(idx).write(v) };
        self.cached_prod = self.cached_prod.wrapping_add(1);
    }

    /// Producer side: publishes everything pushed so far.
    fn submit(&mut self) {
        self.producer().store(self.cached_prod, Ordering::Release);
    }

    /// Producer side: whether the kernel has consumed everything published.
    fn drained(&self) -> bool {
        self.consumer().load(Ordering::Acquire) == self.cached_prod
    }

    /// Consumer side: how many entries are ready (at most `want`).
    fn available(&mut self, want: u32) -> u32 {
        let mut n = self.cached_prod.wrapping_sub(self.cached_cons);
        if n == 0 {
            self.cached_prod = self.producer().load(Ordering::Acquire);
            n = self.cached_prod.wrapping_sub(self.cached_cons);
        }
        n.min(want)
    }

    /// Consumer side: reads the `i`-th ready entry (after `available`).
    fn peek(&self, i: u32) -> T {
        let idx = (self.cached_cons.wrapping_add(i) & self.mask) as usize;
        // SAFETY: idx < size; the entry was published by the kernel (Acquire
        // in `available`) and is not reused until we `release` it.
        unsafe { self.descs.as_ptr().add(idx).read() }
    }

    /// Consumer side: hands `n` entries back to the kernel.
    fn release(&mut self, n: u32) {
        self.cached_cons = self.cached_cons.wrapping_add(n);
        self.consumer().store(self.cached_cons, Ordering::Release);
    }
}

impl<T> Drop for Ring<T> {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `map`; nothing borrows it past
        // the ring's life.
        unsafe { libc::munmap(self.map.as_ptr().cast(), self.map_len) };
    }
}

/// Counters kept by the socket itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct XskCounters {
    /// Frames received.
    pub rx_frames: u64,
    /// Frames queued for transmit.
    pub tx_frames: u64,
    /// Frames not sent because no transmit chunk or TX slot was free.
    pub tx_ring_full: u64,
    /// Frames not sent because they are larger than one chunk.
    pub tx_too_big: u64,
    /// Received descriptors that pointed outside the UMEM (never expected).
    pub rx_bad_desc: u64,
    /// Multi-buffer frames received (more than one chunk).
    pub rx_multi_buffer: u64,
    /// Received frames dropped for being larger than [`MAX_FRAME`].
    pub rx_too_big: u64,
    /// Multi-buffer frames sent.
    pub tx_multi_buffer: u64,
}

/// `XDP_MAX_TX_SKB_BUDGET` (linux/if_xdp.h, Linux >= 6.17; not in libc yet).
const XDP_MAX_TX_SKB_BUDGET: libc::c_int = 9;

/// Largest frame handled in multi-buffer mode (a 64 KiB IP packet plus its
/// Ethernet header; at most 17 chunks, the kernel's limit for one frame).
pub const MAX_FRAME: usize = 65535 + 14;

/// An AF_XDP socket bound to one queue of one interface, with its own UMEM.
pub struct Xsk {
    // Field order is drop order: rings, then fd, then UMEM.
    rx: Ring<libc::xdp_desc>,
    tx: Ring<libc::xdp_desc>,
    fill: Ring<u64>,
    comp: Ring<u64>,
    fd: OwnedFd,
    umem: Umem,
    frame_size: u32,
    /// Transmit chunks not in flight.
    tx_free: Vec<u64>,
    /// Transmit chunks handed to the kernel and not completed yet.
    tx_in_flight: u32,
    /// Bound with `XDP_USE_SG`: frames may span several chunks.
    multi_buffer: bool,
    /// Reassembly of a multi-buffer frame (may span `recv_batch` calls).
    partial: Vec<u8>,
    /// The frame being reassembled is too big and is being skipped.
    partial_overflow: bool,
    counters: XskCounters,
}

/// How to bind: copy or let the kernel choose (zero-copy where the driver
/// has it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BindMode {
    /// `XDP_COPY`: always works (generic XDP needs it).
    Copy,
    /// No flag: zero-copy if the driver supports it, copy otherwise.
    Auto,
}

/// `setsockopt(fd, SOL_XDP, opt, v)`.
fn setsockopt<T>(
    fd: BorrowedFd<'_>,
    opt: libc::c_int,
    v: &T,
    call: &'static str,
) -> Result<(), SysError> {
    setsockopt_at(fd, libc::SOL_XDP, opt, v, call)
}

/// `setsockopt(fd, level, opt, v)`, `call` naming it in the error.
pub(super) fn setsockopt_at<T>(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    opt: libc::c_int,
    v: &T,
    call: &'static str,
) -> Result<(), SysError> {
    // SAFETY: `v` is a valid `T` for the duration of the call and the length
    // passed is its size.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            (v as *const T).cast(),
            std::mem::size_of::<T>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last(call));
    }
    Ok(())
}

fn bind(fd: BorrowedFd<'_>, flags: u16, ifindex: u32, queue: u32) -> Result<(), SysError> {
    let sa = libc::sockaddr_xdp {
        sxdp_family: libc::AF_XDP as u16,
        sxdp_flags: flags,
        sxdp_ifindex: ifindex,
        sxdp_queue_id: queue,
        sxdp_shared_umem_fd: 0,
    };
    // SAFETY: `sa` is a valid sockaddr_xdp and the length is its size.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_xdp).cast(),
            std::mem::size_of::<libc::sockaddr_xdp>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last("bind(AF_XDP)"));
    }
    Ok(())
}

impl Xsk {
    /// Creates the socket and UMEM, maps the rings, fills the fill ring and
    /// binds to `ifindex`/`queue`.
    pub fn new(ifindex: u32, queue: u32, cfg: XskConfig, mode: BindMode) -> Result<Self, SysError> {
        let invalid = |what: &'static str| SysError {
            call: what,
            source: io::Error::from(io::ErrorKind::InvalidInput),
        };
        if !cfg.frames.is_power_of_two() || cfg.frames < 4 {
            return Err(invalid("frames must be a power of two >= 4"));
        }
        if cfg.frame_size != 2048 && cfg.frame_size != 4096 {
            return Err(invalid("frame_size must be 2048 or 4096"));
        }
        // SAFETY: plain socket(2) call; the result is checked.
        let raw = unsafe { libc::socket(libc::AF_XDP, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if raw < 0 {
            return Err(last("socket(AF_XDP)"));
        }
        // SAFETY: `raw` is a freshly created fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };

        let umem = Umem::new(cfg.frames as usize * cfg.frame_size as usize)?;
        let reg = libc::xdp_umem_reg {
            addr: umem.ptr.as_ptr() as u64,
            len: umem.len as u64,
            chunk_size: cfg.frame_size,
            headroom: 0,
            flags: 0,
            tx_metadata_len: 0,
        };
        setsockopt(
            fd.as_fd(),
            libc::XDP_UMEM_REG,
            &reg,
            "setsockopt(XDP_UMEM_REG)",
        )?;
        // Each ring can hold every chunk of its half.
        let ring = cfg.frames / 2;
        for (opt, call) in [
            (libc::XDP_UMEM_FILL_RING, "setsockopt(XDP_UMEM_FILL_RING)"),
            (
                libc::XDP_UMEM_COMPLETION_RING,
                "setsockopt(XDP_UMEM_COMPLETION_RING)",
            ),
            (libc::XDP_RX_RING, "setsockopt(XDP_RX_RING)"),
            (libc::XDP_TX_RING, "setsockopt(XDP_TX_RING)"),
        ] {
            setsockopt(fd.as_fd(), opt, &ring, call)?;
        }

        // Copy mode sends at most 32 frames per kick unless told otherwise
        // (Linux >= 6.17): let one kick take the whole ring. Older kernels
        // refuse the option; the kick loop then takes 32 at a time.
        let _ = setsockopt(
            fd.as_fd(),
            XDP_MAX_TX_SKB_BUDGET,
            &ring,
            "setsockopt(XDP_MAX_TX_SKB_BUDGET)",
        );

        // SAFETY: all-zero is a valid xdp_mmap_offsets (plain integers).
        let mut off: libc::xdp_mmap_offsets = unsafe { std::mem::zeroed() };
        let mut optlen = std::mem::size_of::<libc::xdp_mmap_offsets>() as libc::socklen_t;
        // SAFETY: `off`/`optlen` are valid for writes of the size given.
        let r = unsafe {
            libc::getsockopt(
                fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_MMAP_OFFSETS,
                (&mut off as *mut libc::xdp_mmap_offsets).cast(),
                &mut optlen,
            )
        };
        if r != 0 {
            return Err(last("getsockopt(XDP_MMAP_OFFSETS)"));
        }
        if optlen as usize != std::mem::size_of::<libc::xdp_mmap_offsets>() {
            return Err(SysError {
                call: "getsockopt(XDP_MMAP_OFFSETS)",
                source: io::Error::other("kernel without ring flags (needs Linux >= 5.4)"),
            });
        }

        let rx = Ring::map(fd.as_fd(), &off.rx, ring, libc::XDP_PGOFF_RX_RING, false)?;
        let tx = Ring::map(fd.as_fd(), &off.tx, ring, libc::XDP_PGOFF_TX_RING, true)?;
        let mut fill = Ring::map(
            fd.as_fd(),
            &off.fr,
            ring,
            libc::XDP_UMEM_PGOFF_FILL_RING as libc::off_t,
            true,
        )?;
        let comp = Ring::map(
            fd.as_fd(),
            &off.cr,
            ring,
            libc::XDP_UMEM_PGOFF_COMPLETION_RING as libc::off_t,
            false,
        )?;

        // Receive half into the fill ring, transmit half into the free list.
        let n = fill.free(ring);
        for i in 0..n {
            fill.push(u64::from(i) * u64::from(cfg.frame_size));
        }
        fill.submit();
        let tx_free = (ring..cfg.frames)
            .map(|i| u64::from(i) * u64::from(cfg.frame_size))
            .collect();

        let flags = libc::XDP_USE_NEED_WAKEUP
            | match mode {
                BindMode::Copy => libc::XDP_COPY,
                BindMode::Auto => 0,
            };
        // Multi-buffer first (Linux >= 6.6 in copy mode); without it frames
        // larger than a chunk are dropped by the kernel (counted there).
        let multi_buffer = match bind(fd.as_fd(), flags | libc::XDP_USE_SG, ifindex, queue) {
            Ok(()) => true,
            Err(sg) => {
                bind(fd.as_fd(), flags, ifindex, queue).map_err(|_| sg)?;
                false
            }
        };
        Ok(Self {
            rx,
            tx,
            fill,
            comp,
            fd,
            umem,
            frame_size: cfg.frame_size,
            tx_free,
            tx_in_flight: 0,
            multi_buffer,
            partial: Vec::new(),
            partial_overflow: false,
            counters: XskCounters::default(),
        })
    }

    /// Whether frames larger than a chunk are received and sent (`XDP_USE_SG`).
    pub fn multi_buffer(&self) -> bool {
        self.multi_buffer
    }

    /// The socket's counters.
    pub fn counters(&self) -> XskCounters {
        self.counters
    }

    /// Largest frame `send_batch` accepts.
    pub fn max_frame(&self) -> usize {
        if self.multi_buffer {
            MAX_FRAME
        } else {
            self.frame_size as usize
        }
    }

    /// Kernel-side statistics (`XDP_STATISTICS`).
    pub fn kernel_stats(&self) -> Result<libc::xdp_statistics, SysError> {
        // SAFETY: all-zero is a valid xdp_statistics.
        let mut st: libc::xdp_statistics = unsafe { std::mem::zeroed() };
        let mut len = std::mem::size_of::<libc::xdp_statistics>() as libc::socklen_t;
        // SAFETY: `st`/`len` are valid for writes of the size given.
        let r = unsafe {
            libc::getsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_XDP,
                libc::XDP_STATISTICS,
                (&mut st as *mut libc::xdp_statistics).cast(),
                &mut len,
            )
        };
        if r != 0 {
            return Err(last("getsockopt(XDP_STATISTICS)"));
        }
        Ok(st)
    }

    /// Receives up to `max` descriptors, calling `f` with each complete frame
    /// (a multi-buffer frame is reassembled first, possibly across calls),
    /// and gives the chunks back to the fill ring. Returns how many frames
    /// were handed to `f`.
    pub fn recv_batch(&mut self, max: u32, mut f: impl FnMut(&[u8])) -> u32 {
        let n = self.rx.available(max.min(self.rx.size));
        if n == 0 {
            self.wake_fill();
            return 0;
        }
        // The fill ring has room for every receive chunk, so this never
        // comes up short; check anyway rather than lose chunks.
        let room = self.fill.free(n);
        let mut frames = 0;
        for i in 0..n {
            let d = self.rx.peek(i);
            let more = d.options & libc::XDP_PKT_CONTD != 0;
            match self.umem.slice(d.addr, d.len) {
                // The common case: a whole frame in one chunk, no copy.
                Some(frame) if !more && self.partial.is_empty() && !self.partial_overflow => {
                    f(frame);
                    frames += 1;
                }
                Some(frame) => {
                    if self.partial.len() + frame.len() > MAX_FRAME {
                        self.partial_overflow = true;
                        self.partial.clear();
                    }
                    if !self.partial_overflow {
                        self.partial.extend_from_slice(frame);
                    }
                    if !more {
                        if self.partial_overflow {
                            self.counters.rx_too_big += 1;
                        } else {
                            f(&self.partial);
                            frames += 1;
                            self.counters.rx_multi_buffer += 1;
                        }
                        self.partial.clear();
                        self.partial_overflow = false;
                    }
                }
                None => self.counters.rx_bad_desc += 1,
            }
            if i < room {
                let chunk = d.addr - d.addr % u64::from(self.frame_size);
                self.fill.push(chunk);
            }
        }
        self.rx.release(n);
        self.fill.submit();
        self.wake_fill();
        self.counters.rx_frames += u64::from(frames);
        frames
    }

    fn wake_fill(&self) {
        if self.fill.needs_wakeup() {
            // SAFETY: zero-length recvfrom with no buffer, only to kick the
            // kernel; errors (EAGAIN) are expected and harmless.
            unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    std::ptr::null_mut(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            };
        }
    }

    /// Takes completed transmit chunks back into the free list.
    pub fn reap_completions(&mut self) -> u32 {
        let n = self.comp.available(self.comp.size);
        for i in 0..n {
            let addr = self.comp.peek(i);
            self.tx_free.push(addr - addr % u64::from(self.frame_size));
        }
        if n > 0 {
            self.comp.release(n);
            self.tx_in_flight -= n.min(self.tx_in_flight);
        }
        n
    }

    /// Copies `frames` into transmit chunks and queues them on the TX ring,
    /// then kicks the kernel. Frames that do not fit (larger than a chunk,
    /// or no free chunk/slot) are counted and dropped. Returns how many were
    /// queued.
    pub fn send_batch<'a>(&mut self, frames: impl IntoIterator<Item = &'a [u8]>) -> u32 {
        self.reap_completions();
        let mut sent = 0;
        let mut descs = 0;
        let chunk = self.frame_size as usize;
        for frame in frames {
            if frame.is_empty() || frame.len() > self.max_frame() {
                self.counters.tx_too_big += 1;
                continue;
            }
            let parts = frame.len().div_ceil(chunk) as u32;
            if self.tx.free(parts) < parts || self.tx_free.len() < parts as usize {
                self.counters.tx_ring_full += 1;
                continue;
            }
            for (j, piece) in frame.chunks(chunk).enumerate() {
                let addr = self.tx_free.pop().expect("checked above");
                // SAFETY: `addr` is the start of a transmit chunk of the UMEM
                // (frame_size bytes, inside the mapping) that no one else uses
                // while it is on the free list; `piece` is at most one chunk.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        piece.as_ptr(),
                        self.umem.ptr.as_ptr().add(addr as usize),
                        piece.len(),
                    );
                }
                let last = j as u32 + 1 == parts;
                self.tx.push(libc::xdp_desc {
                    addr,
                    len: piece.len() as u32,
                    options: if last { 0 } else { libc::XDP_PKT_CONTD },
                });
            }
            if parts > 1 {
                self.counters.tx_multi_buffer += 1;
            }
            descs += parts;
            sent += 1;
        }
        if sent > 0 {
            self.tx.submit();
            self.tx_in_flight += descs;
            self.counters.tx_frames += u64::from(sent);
        }
        if self.tx_in_flight > 0 {
            self.kick_tx();
            // Copy mode without a NAPI thread on the peer completes during
            // the kick: take those chunks back now rather than in another
            // call (with one, they come back later and the next send reaps).
            self.reap_completions();
        }
        sent
    }

    fn kick_tx(&mut self) {
        // In copy mode the kernel sends at most 32 frames per call and answers
        // EAGAIN while more are queued (or while the completion ring is full):
        // kick again, reaping completions in between, until it has taken them
        // all. Bounded by what can be in flight.
        let rounds = self.tx_in_flight / 32 + 2;
        for _ in 0..rounds {
            // Nothing left on the ring (only completions to reap): a kick
            // would be a wasted system call.
            if !self.tx.needs_wakeup() || self.tx.drained() {
                return;
            }
            // SAFETY: zero-length sendto with no buffer asks the kernel to
            // process the TX ring. EAGAIN/EBUSY/ENOBUFS mean "try again later";
            // the frames stay queued and the next call kicks again.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    std::ptr::null(),
                    0,
                    libc::MSG_DONTWAIT,
                    std::ptr::null(),
                    0,
                )
            };
            if r >= 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::EAGAIN) {
                return;
            }
            self.reap_completions();
        }
    }

    /// Descriptors on the TX ring that the kernel has not taken yet (they
    /// need another kick; taken ones complete without one).
    pub fn tx_unsent(&self) -> u32 {
        self.tx
            .cached_prod
            .wrapping_sub(self.tx.consumer().load(Ordering::Acquire))
    }

    /// Kicks the kernel again and reaps completions (call when the TX ring
    /// has frames in flight and nothing else is happening).
    pub fn flush_tx(&mut self) {
        if self.tx_in_flight > 0 {
            self.kick_tx();
        }
        self.reap_completions();
    }
}

impl AsFd for Xsk {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Xsk {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

// SAFETY: the raw pointers point into mappings owned by the `Xsk` itself;
// moving it to another thread moves sole ownership (it is not `Sync`).
unsafe impl Send for Xsk {}
