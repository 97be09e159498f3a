//! The system calls std does not wrap: hole punching, zero ranges, `SEEK_DATA`/`SEEK_HOLE`,
//! read-ahead hints, data-only sync, TCP keepalive and `flock`. Every `unsafe` block of the
//! crate lives here.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

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
