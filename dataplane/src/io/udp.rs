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
    configure(s, addr)
}

/// Binds `n` sockets to one address with `SO_REUSEPORT` (one per forwarder thread; with
/// port 0, the first picks the port and the others join it). The kernel picks the socket
/// of a datagram by a hash of its 4-tuple, so each peer's datagrams reach one socket, in
/// order. `n == 1` is [`bind`].
pub fn bind_reuseport(addr: SocketAddr, n: usize) -> Result<Vec<UdpSocket>, IoError> {
    if n <= 1 {
        return Ok(vec![bind(addr)?]);
    }
    let mut v: Vec<UdpSocket> = Vec::with_capacity(n);
    let mut at = addr;
    for _ in 0..n {
        let s = configure(reuseport_socket(at)?, at)?;
        at = s.local_addr().map_err(|e| IoError::Sys {
            call: "getsockname".into(),
            source: e,
        })?;
        v.push(s);
    }
    Ok(v)
}

fn reuseport_socket(addr: SocketAddr) -> Result<UdpSocket, IoError> {
    use std::os::fd::FromRawFd;
    let family = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(IoError::last("socket"));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let s = unsafe { UdpSocket::from_raw_fd(fd) };
    setsockopt_int(fd, libc::SOL_SOCKET, libc::SO_REUSEPORT, 1)?;
    let (sa, len) = super::sys::to_sockaddr(&addr);
    // SAFETY: sa is a valid sockaddr of length len for the call's duration.
    if unsafe { libc::bind(fd, &sa as *const _ as *const libc::sockaddr, len) } < 0 {
        return Err(IoError::last(format!("bind {addr} (SO_REUSEPORT)")));
    }
    Ok(s)
}

fn configure(s: UdpSocket, addr: SocketAddr) -> Result<UdpSocket, IoError> {
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

/// Turns on UDP generic receive offload (coalesced datagrams of one sender); false when
/// the kernel lacks it.
pub fn enable_gro(fd: std::os::fd::RawFd) -> bool {
    setsockopt_int(fd, libc::SOL_UDP, libc::UDP_GRO, 1).is_ok()
}

/// Whether UDP generic segmentation offload is available (probed like quinn-udp: the
/// socket option must be accepted).
pub fn probe_gso(fd: std::os::fd::RawFd) -> bool {
    let ok = setsockopt_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT, 1200).is_ok();
    // Back to per-message segment sizes (given in a control message when used).
    let _ = setsockopt_int(fd, libc::SOL_UDP, libc::UDP_SEGMENT, 0);
    ok
}

/// Room for the control messages we use (UDP_GRO / UDP_SEGMENT).
pub const CMSG_SPACE: usize = 64;

/// Fills a control buffer with one UDP_SEGMENT message; returns its length.
pub fn write_segment_cmsg(ctrl: &mut [u64; CMSG_SPACE / 8], seg: u16) -> usize {
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    // SAFETY: CMSG_LEN/CMSG_SPACE are pure arithmetic.
    let (len, space) = unsafe { (libc::CMSG_LEN(2) as usize, libc::CMSG_SPACE(2) as usize) };
    let bytes = ctrl.as_mut_ptr() as *mut u8;
    let c = libc::cmsghdr {
        cmsg_len: len as _,
        cmsg_level: libc::SOL_UDP,
        cmsg_type: libc::UDP_SEGMENT,
    };
    // SAFETY: ctrl is 8-aligned and 64 bytes, larger than a cmsghdr plus a u16.
    unsafe {
        std::ptr::write(bytes as *mut libc::cmsghdr, c);
        std::ptr::write_unaligned(bytes.add(hdr_len) as *mut u16, seg);
    }
    space
}

/// Reads the UDP_GRO segment size from a control buffer filled by recvmsg.
pub fn read_gro_cmsg(ctrl: &[u64; CMSG_SPACE / 8], ctrl_len: usize) -> Option<usize> {
    let hdr_len = std::mem::size_of::<libc::cmsghdr>();
    let bytes = ctrl.as_ptr() as *const u8;
    let mut off = 0usize;
    while off + hdr_len <= ctrl_len.min(CMSG_SPACE) {
        // SAFETY: off + hdr_len is within the buffer; read_unaligned tolerates alignment.
        let c: libc::cmsghdr = unsafe { std::ptr::read_unaligned(bytes.add(off) as *const _) };
        let len = c.cmsg_len as usize;
        if len < hdr_len || off + len > CMSG_SPACE {
            return None;
        }
        if c.cmsg_level == libc::SOL_UDP && c.cmsg_type == libc::UDP_GRO && len >= hdr_len + 4 {
            // SAFETY: the message holds an int after its header, inside the buffer.
            let v = unsafe { std::ptr::read_unaligned(bytes.add(off + hdr_len) as *const i32) };
            return usize::try_from(v).ok().filter(|v| *v > 0);
        }
        off += (len + 7) & !7;
    }
    None
}

/// Receives one datagram (or a GRO batch) without blocking; returns the length, the
/// source and the GRO segment size. `Ok(None)` when nothing is ready.
pub fn recv_msg(
    fd: std::os::fd::RawFd,
    buf: &mut [u8],
) -> std::io::Result<Option<(usize, std::net::SocketAddr, Option<usize>)>> {
    // SAFETY: plain old data; zero is valid.
    let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut ctrl = [0u64; CMSG_SPACE / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: plain old data; zero is valid.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = &mut addr as *mut _ as *mut libc::c_void;
    hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    hdr.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
    hdr.msg_controllen = CMSG_SPACE;
    // SAFETY: every pointer in hdr refers to a live local or to buf, valid for the call.
    let n = unsafe { libc::recvmsg(fd, &mut hdr, libc::MSG_DONTWAIT) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    let Some(src) = super::sys::from_sockaddr(&addr) else {
        return Ok(None);
    };
    Ok(Some((
        n as usize,
        src,
        read_gro_cmsg(&ctrl, hdr.msg_controllen),
    )))
}

/// Sends one datagram, or a GSO batch of `segment`-byte datagrams.
pub fn send_msg(
    fd: std::os::fd::RawFd,
    buf: &[u8],
    dst: std::net::SocketAddr,
    segment: Option<u16>,
) -> std::io::Result<()> {
    let (mut addr, alen) = super::sys::to_sockaddr(&dst);
    let mut ctrl = [0u64; CMSG_SPACE / 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_ptr() as *mut libc::c_void,
        iov_len: buf.len(),
    };
    // SAFETY: plain old data; zero is valid.
    let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
    hdr.msg_name = &mut addr as *mut _ as *mut libc::c_void;
    hdr.msg_namelen = alen;
    hdr.msg_iov = &mut iov;
    hdr.msg_iovlen = 1;
    if let Some(s) = segment {
        let n = write_segment_cmsg(&mut ctrl, s);
        hdr.msg_control = ctrl.as_mut_ptr() as *mut libc::c_void;
        hdr.msg_controllen = n;
    }
    // SAFETY: every pointer in hdr refers to a live local or to buf; the kernel only reads.
    let n = unsafe { libc::sendmsg(fd, &hdr, 0) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
