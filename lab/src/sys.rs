//! The few system calls of the lab that libstd does not wrap: who we are (`geteuid`),
//! entering a namespace (`setns`), signalling a process by PID (`kill`), binding a socket
//! to a device, the clock tick of /proc, a raw packet socket that sends batches of
//! one frame (the junk flood, [`crate::flood`]), and a UDP socket bound to an address
//! that is not the namespace's own (`IP_TRANSPARENT`). Every `unsafe` of the lab is here.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A failed system call: which one, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct SysError {
    /// The call (or socket option) that failed.
    pub call: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl SysError {
    /// The error of `call` from `errno`.
    pub fn last(call: &'static str) -> SysError {
        SysError {
            call,
            source: io::Error::last_os_error(),
        }
    }
}

/// True when the process runs with effective user id 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread into the network namespace open at `fd`.
pub fn setns_net(fd: RawFd) -> Result<(), SysError> {
    // SAFETY: setns only reads its integer arguments; `fd` is an open namespace file owned
    // by the caller for the duration of the call. It changes the calling thread only.
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("setns"))
    }
}

/// Sends signal `sig` to process `pid`. Refuses PIDs that are not positive (0 and -1
/// would signal a process group or every process), so a bad PID cannot hit more than
/// one process.
pub fn kill(pid: u32, sig: libc::c_int) -> Result<(), SysError> {
    let pid = match libc::pid_t::try_from(pid) {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(SysError {
                call: "kill",
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })
        }
    };
    // SAFETY: kill has no memory-safety preconditions; the pid is positive, so it names
    // one process. The callers only pass processes they started (or that run inside
    // namespaces they made).
    let r = unsafe { libc::kill(pid, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("kill"))
    }
}

/// Binds a socket to a device (`SO_BINDTODEVICE`).
pub fn bind_to_device(fd: RawFd, ifname: &str) -> Result<(), SysError> {
    let name = ifname.as_bytes();
    let len = libc::socklen_t::try_from(name.len()).map_err(|_| SysError {
        call: "SO_BINDTODEVICE",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: the pointer and length describe `name`, which lives across the call; the
    // kernel copies at most `len` bytes from it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("SO_BINDTODEVICE"))
    }
}

/// A UDP socket bound to `addr`, which need not be an address of the namespace
/// (`IP_TRANSPARENT`, needs CAP_NET_ADMIN): it sends datagrams with that source, as a
/// router on the path could. For tests of source checks that must pass.
pub fn udp_transparent(addr: std::net::SocketAddrV4) -> Result<std::net::UdpSocket, SysError> {
    // SAFETY: socket only reads its integer arguments.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(SysError::last("socket"));
    }
    // SAFETY: `fd` is a new socket that nothing else owns; the OwnedFd closes it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: the pointer and length describe `one`, which lives across the call.
    let r = unsafe {
        libc::setsockopt(
            owned.as_raw_fd(),
            libc::SOL_IP,
            libc::IP_TRANSPARENT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::last("IP_TRANSPARENT"));
    }
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(*addr.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: the pointer and length describe `sin`, a valid sockaddr_in that lives
    // across the call.
    let r = unsafe {
        libc::bind(
            owned.as_raw_fd(),
            (&sin as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::last("bind"));
    }
    Ok(std::net::UdpSocket::from(owned))
}

/// Clock ticks per second of /proc's CPU times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

/// An `AF_PACKET` socket bound to interface `ifname` of the calling thread's namespace,
/// sending frames straight to the device's queue (`PACKET_QDISC_BYPASS`).
pub fn packet_socket(ifname: &str) -> Result<OwnedFd, SysError> {
    let cname = std::ffi::CString::new(ifname).map_err(|_| SysError {
        call: "if_nametoindex",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `cname` is a NUL-terminated string that lives across the call.
    let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if ifindex == 0 {
        return Err(SysError::last("if_nametoindex"));
    }
    // SAFETY: socket only reads its integer arguments.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(SysError::last("socket(AF_PACKET)"));
    }
    // SAFETY: `raw` is a socket just opened here and owned by nothing else.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let one: libc::c_int = 1;
    // SAFETY: the pointer and length describe `one`, which lives across the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            libc::PACKET_QDISC_BYPASS,
            std::ptr::from_ref(&one).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::last("PACKET_QDISC_BYPASS"));
    }
    // SAFETY: an all-zero sockaddr_ll is a valid value (plain integers).
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: the pointer and length describe `sll`, which lives across the call.
    let r = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::from_ref(&sll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(SysError::last("bind(AF_PACKET)"));
    }
    Ok(fd)
}

/// Sends `frame` `n` times (at most 1024) in one `sendmmsg` on a packet socket; returns
/// how many the kernel took.
pub fn send_frame_batch(fd: &OwnedFd, frame: &[u8], n: usize) -> Result<usize, SysError> {
    let n = n.min(1024);
    let mut iov = libc::iovec {
        iov_base: frame.as_ptr() as *mut libc::c_void,
        iov_len: frame.len(),
    };
    // SAFETY: an all-zero mmsghdr is a valid value (null pointers, zero lengths).
    let mut msgs: Vec<libc::mmsghdr> = vec![unsafe { std::mem::zeroed() }; n];
    for m in &mut msgs {
        m.msg_hdr.msg_iov = &mut iov;
        m.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: every header points at `iov`, which describes `frame`; both live across the
    // call, and for a send the kernel only reads them.
    let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), msgs.as_mut_ptr(), n as libc::c_uint, 0) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if matches!(e.raw_os_error(), Some(libc::ENOBUFS | libc::EAGAIN)) {
            return Ok(0);
        }
        return Err(SysError {
            call: "sendmmsg",
            source: e,
        });
    }
    Ok(r as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_refuses_group_pids() {
        for pid in [0, u32::MAX, 1 << 31] {
            let e = kill(pid, 0).expect_err("must refuse");
            assert_eq!(e.source.kind(), io::ErrorKind::InvalidInput, "{pid}");
        }
        // Signal 0 checks that a process exists: this one does.
        kill(std::process::id(), 0).expect("own pid");
    }
}
