//! The system calls std does not wrap: hole punching, zero ranges, `SEEK_DATA`/`SEEK_HOLE`,
//! read-ahead hints, page-cache residency (`cachestat`), `sendfile`, pipes and `splice`,
//! data-only sync, TCP keepalive and `flock`. Every `unsafe` block of the crate lives here.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

fn fallocate(f: &File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let l = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: fallocate only reads its integer arguments; the fd is owned by `f`, which
        // outlives the call.
        let r = unsafe { libc::fallocate(f.as_raw_fd(), mode, off, l) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Deallocate `[offset, offset+len)`; reads of the range return zeroes afterwards.
pub fn punch_hole(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// Zero `[offset, offset+len)` keeping it allocated.
pub fn zero_range(f: &File, offset: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        offset,
        len,
    )
}

/// `lseek(fd, offset, whence)` for `SEEK_DATA`/`SEEK_HOLE`; `Ok(None)` on `ENXIO` (no more
/// data after `offset`).
fn seek(f: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek takes integers only. It moves the shared file position, which this crate
    // never uses: all data I/O is positional (pread/pwrite).
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

/// Next offset >= `offset` holding data, or `None` if only a hole follows.
pub fn seek_data(f: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(f, offset, libc::SEEK_DATA)
}

/// Next offset >= `offset` starting a hole (the end of file counts as a hole).
pub fn seek_hole(f: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(f, offset, libc::SEEK_HOLE)
}

/// Ask the kernel to read `[offset, offset+len)` into the page cache.
pub fn willneed(f: &File, offset: u64, len: u64) -> io::Result<()> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let l = libc::off_t::try_from(len).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: posix_fadvise takes integers only and does not touch our memory.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), off, l, libc::POSIX_FADV_WILLNEED) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// Read into `buf` at `offset` only if the data is already in the page cache
/// (`preadv2(RWF_NOWAIT)`): `Ok(Some(n))` bytes read without blocking, `Ok(None)` when the
/// read would block (or the kernel or file system cannot tell), errors otherwise.
pub fn pread_nowait(f: &File, buf: &mut [u8], offset: u64) -> io::Result<Option<usize>> {
    let off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    let iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: `iov` describes `buf`, which is valid for writes of `buf.len()` bytes and
    // exclusively borrowed for the duration of the call; the kernel writes at most that many
    // bytes. The fd is owned by `f`.
    let r = unsafe { libc::preadv2(f.as_raw_fd(), &iov, 1, off, libc::RWF_NOWAIT) };
    if r >= 0 {
        return Ok(Some(r as usize));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL) => Ok(None),
        _ => Err(e),
    }
}

/// `cachestat(2)` (Linux 6.5), the same number on every architecture.
const SYS_CACHESTAT: libc::c_long = 451;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

fn page_size() -> u64 {
    static SIZE: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf takes an integer and reads no memory of ours.
        let r = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(r).ok().filter(|&p| p > 0).unwrap_or(4096)
    })
}

/// Whether every page of `[offset, offset+len)` is in the page cache (`cachestat`):
/// `Ok(None)` when the kernel cannot tell (too old, or the call is filtered).
pub fn all_cached(f: &File, offset: u64, len: u64) -> io::Result<Option<bool>> {
    if len == 0 {
        return Ok(Some(true));
    }
    let ps = page_size();
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
    let pages = end.div_ceil(ps) - offset / ps;
    let range = CachestatRange { off: offset, len };
    let mut st = Cachestat::default();
    // SAFETY: `range` and `st` are live, properly laid out (`#[repr(C)]`, the kernel's
    // `struct cachestat_range` and `struct cachestat`) for the duration of the call; the
    // kernel reads the first and writes only the second. The fd is owned by `f`.
    let r = unsafe {
        libc::syscall(
            SYS_CACHESTAT,
            f.as_raw_fd(),
            &range as *const CachestatRange,
            &mut st as *mut Cachestat,
            0 as libc::c_uint,
        )
    };
    if r == 0 {
        return Ok(Some(st.nr_cache >= pages));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOSYS | libc::EPERM | libc::EOPNOTSUPP) => Ok(None),
        _ => Err(e),
    }
}

/// Send up to `len` bytes of `f` from `offset` to the socket `sock` (`sendfile`: page-cache
/// pages go to the socket without a copy through user memory). Returns the bytes sent, 0 at
/// the end of the file; `WouldBlock` when the (non-blocking) socket is full. Blocks while
/// the kernel reads pages that are not cached.
pub fn sendfile(sock: BorrowedFd<'_>, f: &File, offset: u64, len: usize) -> io::Result<usize> {
    let mut off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    loop {
        // SAFETY: `off` is a live off_t the kernel reads and updates; both fds are borrowed
        // (the socket) or owned by `f`, so they stay open during the call.
        let r = unsafe { libc::sendfile(sock.as_raw_fd(), f.as_raw_fd(), &mut off, len) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Register `fd` with the runtime for write readiness (must be called on the runtime).
pub fn writable_async(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    register_async(fd, tokio::io::Interest::WRITABLE)
}

/// Register `fd` with the runtime for read readiness (must be called on the runtime).
pub fn readable_async(fd: OwnedFd) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    register_async(fd, tokio::io::Interest::READABLE)
}

fn register_async(
    fd: OwnedFd,
    interest: tokio::io::Interest,
) -> io::Result<tokio::io::unix::AsyncFd<OwnedFd>> {
    // SAFETY: an `OwnedFd` is open and keeps returning the same descriptor, referring to the
    // same open file description, until it is dropped, which happens only with the `AsyncFd`.
    let r = unsafe { tokio::io::unix::AsyncFd::register_with_interest(fd, interest) };
    r.map_err(io::Error::from)
}

/// A pipe, both ends non-blocking and close-on-exec: `(read end, write end)`.
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as libc::c_int; 2];
    // SAFETY: `fds` is a live array of two c_ints, which is what pipe2 writes.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: pipe2 succeeded, so both are open descriptors that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Ask for a pipe of at least `bytes` (`F_SETPIPE_SZ`); returns the capacity given. Fails
/// (`EPERM`) beyond `/proc/sys/fs/pipe-max-size` or the user's pipe quota.
pub fn set_pipe_size(pipe: BorrowedFd<'_>, bytes: usize) -> io::Result<usize> {
    let n = libc::c_int::try_from(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: fcntl with F_SETPIPE_SZ takes an integer and touches no memory of ours; the fd
    // is borrowed, so it stays open during the call.
    let r = unsafe { libc::fcntl(pipe.as_raw_fd(), libc::F_SETPIPE_SZ, n) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as usize)
}

/// Whether a pipe can take more data now (`poll` for `POLLOUT`, without waiting).
pub fn pipe_has_room(pipe: BorrowedFd<'_>) -> io::Result<bool> {
    let mut p = libc::pollfd {
        fd: pipe.as_raw_fd(),
        events: libc::POLLOUT,
        revents: 0,
    };
    loop {
        // SAFETY: `p` is one live pollfd for the duration of the call, as the count says;
        // the fd is borrowed, so it stays open.
        let r = unsafe { libc::poll(&mut p, 1, 0) };
        if r >= 0 {
            return Ok(p.revents & libc::POLLOUT != 0);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

fn splice(
    from: BorrowedFd<'_>,
    to: BorrowedFd<'_>,
    to_offset: Option<u64>,
    len: usize,
    flags: libc::c_uint,
) -> io::Result<usize> {
    let mut off = to_offset
        .map(|o| libc::loff_t::try_from(o).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL)))
        .transpose()?;
    let off_ptr = off
        .as_mut()
        .map_or(std::ptr::null_mut(), |o| o as *mut libc::loff_t);
    loop {
        // SAFETY: the input offset is null (sockets and pipes have none) and the output one
        // is null or points to `off`, a live loff_t the kernel reads and updates; both fds
        // are borrowed, so they stay open during the call.
        let r = unsafe {
            libc::splice(
                from.as_raw_fd(),
                std::ptr::null_mut(),
                to.as_raw_fd(),
                off_ptr,
                len,
                flags,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Move up to `len` bytes from the socket `sock` into `pipe` (`splice`: the socket
/// buffers' pages go into the pipe without a copy). Returns the bytes moved, 0 when the
/// peer has closed; `WouldBlock` when the socket has nothing to read or the pipe is full.
pub fn splice_to_pipe(sock: BorrowedFd<'_>, pipe: BorrowedFd<'_>, len: usize) -> io::Result<usize> {
    splice(
        sock,
        pipe,
        None,
        len,
        libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
    )
}

/// Move up to `len` bytes from `pipe` into `f` at `offset` (the one copy, into the page
/// cache; the file position is not used). Returns the bytes written.
pub fn splice_to_file(
    pipe: BorrowedFd<'_>,
    f: &File,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    splice(pipe, f.as_fd(), Some(offset), len, libc::SPLICE_F_MOVE)
}

fn setsockopt_int(
    fd: BorrowedFd<'_>,
    level: libc::c_int,
    name: libc::c_int,
    value: libc::c_int,
) -> io::Result<()> {
    // SAFETY: `value` is a live c_int for the duration of the call and its exact size is
    // passed; the fd is borrowed, so it stays open during the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Turn on TCP keepalive: the first probe after `idle_secs` without traffic, then every
/// `interval_secs`, the connection reset after `count` unanswered probes. An idle peer that
/// is alive answers at kernel level and is never disturbed.
pub fn tcp_keepalive(
    fd: BorrowedFd<'_>,
    idle_secs: u32,
    interval_secs: u32,
    count: u32,
) -> io::Result<()> {
    let int =
        |v: u32| libc::c_int::try_from(v).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL));
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1)?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, int(idle_secs)?)?;
    setsockopt_int(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_KEEPINTVL,
        int(interval_secs)?,
    )?;
    setsockopt_int(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, int(count)?)
}
/// Take an exclusive `flock` on `f` without waiting: `Ok(false)` when another open file
/// description holds a lock on the file. The kernel drops the lock when the last descriptor
/// of this open file description closes, including when the process dies (`kill -9`).
pub fn try_lock_exclusive(f: &File) -> io::Result<bool> {
    loop {
        // SAFETY: flock takes integers only; the fd is owned by `f`, which outlives the call.
        let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EWOULDBLOCK) => return Ok(false),
            Some(libc::EINTR) => continue,
            _ => return Err(e),
        }
    }
}
