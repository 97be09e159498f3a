//! The system calls of the WAN emulator that libstd does not wrap: `AF_PACKET` sockets
//! and real-time scheduling; and the thread CPU clock of `bench limits`. (The lab's own
//! are in `lab::sys`.)

use std::io;
use std::os::fd::RawFd;

use lab::SysError as Error;

/// An `AF_PACKET` raw socket bound to one interface, carrying a `virtio_net_hdr` before
/// each frame (so GSO and checksum-offload state crosses userspace intact).
pub struct PacketSocket {
    fd: std::os::fd::OwnedFd,
}

/// Size of `struct virtio_net_hdr`, which precedes every frame with `PACKET_VNET_HDR`.
pub const VNET_HDR_LEN: usize = 10;

const PACKET_VNET_HDR: libc::c_int = 15;
const PACKET_IGNORE_OUTGOING: libc::c_int = 23;

fn sys_err(call: &'static str) -> Error {
    Error::last(call)
}

fn setsockopt_int(
    fd: RawFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
    call: &'static str,
) -> Result<(), Error> {
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `v` lives across the call and `len` is its size.
    let r = unsafe { libc::setsockopt(fd, level, opt, std::ptr::from_ref(&v).cast(), len) };
    if r == 0 {
        Ok(())
    } else {
        Err(sys_err(call))
    }
}

impl PacketSocket {
    /// Opens a socket on `ifname` of the current network namespace. With `receive`, it
    /// receives every frame arriving on the interface (not the ones sent from this host);
    /// without, it only sends.
    pub fn open(ifname: &str, receive: bool) -> Result<PacketSocket, Error> {
        use std::os::fd::{AsRawFd, FromRawFd};
        let cname = std::ffi::CString::new(ifname).map_err(|_| Error {
            call: "if_nametoindex",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: cname is a valid NUL-terminated string for the duration of the call.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        if ifindex == 0 {
            return Err(sys_err("if_nametoindex"));
        }
        let proto: u16 = if receive {
            (libc::ETH_P_ALL as u16).to_be()
        } else {
            0
        };
        // SAFETY: plain socket(2) call with constant arguments.
        let raw = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::c_int::from(proto),
            )
        };
        if raw < 0 {
            return Err(sys_err("socket(AF_PACKET)"));
        }
        // SAFETY: `raw` is a fresh descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(raw) };
        setsockopt_int(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            PACKET_VNET_HDR,
            1,
            "PACKET_VNET_HDR",
        )?;
        if receive {
            setsockopt_int(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_IGNORE_OUTGOING,
                1,
                "PACKET_IGNORE_OUTGOING",
            )?;
        }
        // SAFETY: sockaddr_ll is plain old data; all-zero is a valid value.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = libc::c_int::try_from(ifindex).map_err(|_| sys_err("ifindex"))?;
        let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap_or(20);
        // SAFETY: `sll` is a valid sockaddr_ll and `len` its size.
        let r = unsafe { libc::bind(fd.as_raw_fd(), std::ptr::from_ref(&sll).cast(), len) };
        if r != 0 {
            return Err(sys_err("bind(AF_PACKET)"));
        }
        Ok(PacketSocket { fd })
    }

    /// Receives one frame (virtio_net_hdr first) into `buf`; returns its length.
    pub fn recv(&self, buf: &mut [u8]) -> Result<usize, Error> {
        use std::os::fd::AsRawFd;
        loop {
            // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole call.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n >= 0 {
                return Ok(usize::try_from(n).unwrap_or(0));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(Error {
                    call: "recv(AF_PACKET)",
                    source: e,
                });
            }
        }
    }

    /// Sends one frame (virtio_net_hdr first) out of the bound interface.
    pub fn send(&self, frame: &[u8]) -> Result<(), Error> {
        use std::os::fd::AsRawFd;
        // SAFETY: `frame` is valid for reads of `frame.len()` bytes for the whole call.
        let n = unsafe { libc::send(self.fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        if n < 0 {
            Err(sys_err("send(AF_PACKET)"))
        } else {
            Ok(())
        }
    }
}

/// Asks for real-time scheduling (SCHED_FIFO) and the finest timer slack for the calling
/// thread and the threads it spawns afterwards, so that timed sends are not late when the
/// machine is busy.
pub fn realtime(priority: i32) -> Result<(), Error> {
    // SAFETY: PR_SET_TIMERSLACK takes an integer argument and touches no memory of ours.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
    let param = libc::sched_param {
        sched_priority: priority,
    };
    // SAFETY: `param` is a valid sched_param living across the call; pid 0 is this thread.
    let r = unsafe { libc::sched_setscheduler(0, libc::SCHED_FIFO, &param) };
    if r == 0 {
        Ok(())
    } else {
        Err(sys_err("sched_setscheduler"))
    }
}

/// CPU time the calling thread has used (`CLOCK_THREAD_CPUTIME_ID`): what `bench limits`
/// divides by, so that other jobs on a shared machine do not count against a primitive.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec the call writes into; the clock id is a constant.
    let r = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if r != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(
        u64::try_from(ts.tv_sec).unwrap_or(0),
        u32::try_from(ts.tv_nsec).unwrap_or(0),
    )
}

/// Bytes allocated through [`CountingAlloc`] and not yet freed.
static ALLOCATED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// The system allocator, counting the bytes live (`bench scale` installs it as the
/// global allocator to measure the cores' tables).
pub struct CountingAlloc;

// SAFETY: every call is forwarded unchanged to the system allocator, which upholds the
// GlobalAlloc contract; the counter is only arithmetic on the sizes.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        // SAFETY: the caller's layout contract is passed on as is.
        let p = unsafe { std::alloc::System.alloc(layout) };
        if !p.is_null() {
            ALLOCATED.fetch_add(layout.size(), std::sync::atomic::Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: `ptr` came from this allocator with `layout` (the caller's contract).
        unsafe { std::alloc::System.dealloc(ptr, layout) };
        ALLOCATED.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract for `ptr`, `layout` and `new_size` is passed on.
        let p = unsafe { std::alloc::System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            ALLOCATED.fetch_sub(layout.size(), std::sync::atomic::Ordering::Relaxed);
            ALLOCATED.fetch_add(new_size, std::sync::atomic::Ordering::Relaxed);
        }
        p
    }
}

/// Bytes live through [`CountingAlloc`] (0 when it is not the global allocator).
pub fn allocated_bytes() -> usize {
    ALLOCATED.load(std::sync::atomic::Ordering::Relaxed)
}
