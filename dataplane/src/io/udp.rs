//! The overlay's UDP socket.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use super::sys::setsockopt_int;
use super::IoError;

/// Binds the socket: non-blocking, large buffers, no Don't-Fragment bit (overlay packets
/// larger than the underlay MTU are fragmented by IP; see `docs/ARCHITECTURE.md`).
pub fn bind(addr: SocketAddr) -> Result<UdpSocket, IoError> {
    let s = UdpSocket::bind(addr).map_err(|e| IoError::Sys {
        call: format!("bind {addr}"),
        source: e,
    })?;
    s.set_nonblocking(true).map_err(|e| IoError::Sys {
        call: "set_nonblocking".into(),
        source: e,
    })?;
    let fd = s.as_raw_fd();
    for (opt, v) in [(libc::SO_RCVBUF, 4 << 20), (libc::SO_SNDBUF, 4 << 20)] {
        // Larger buffers absorb bursts; the kernel caps them at its limits.
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, opt, v);
    }
    for (opt, v) in [
        (libc::SO_RCVBUFFORCE, 4 << 20),
        (libc::SO_SNDBUFFORCE, 4 << 20),
    ] {
        // As root the caps do not apply.
        let _ = setsockopt_int(fd, libc::SOL_SOCKET, opt, v);
    }
    if addr.is_ipv4() {
        setsockopt_int(
            fd,
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_DONT,
        )?;
    }
    Ok(s)
}
