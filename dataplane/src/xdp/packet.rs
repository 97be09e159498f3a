//! The port's `AF_PACKET` sockets: the probe of AF_XDP TX checksum requests, and the
//! socket that sends frames for the VMs with virtio-net headers.
//!
//! ## TX checksum probe
//!
//! A kernel can take `tx_metadata_len` and still ignore a checksum request on the
//! way the socket transmits (copy mode built the skb without it before Linux 6.8's
//! `xsk_build_skb` metadata handling; a driver may lack the zero-copy hook). Such a
//! kernel would send the frame with the bare pseudo-header sum, which the VM drops.
//! So before the edge relies on it, one frame with a checksum request goes out of
//! the socket and an `AF_PACKET` socket on the other end of the veth reads it back
//! with `PACKET_AUXDATA`: `TP_STATUS_CSUMNOTREADY` says the skb arrived
//! `CHECKSUM_PARTIAL`, i.e. the request was honoured and nothing computed the sum.
//!
//! The probe frame goes to 01:80:c2:00:00:01 (IEEE 802.3x pause), which a Linux
//! bridge drops on its port after the packet taps have seen it, with the local
//! experimental EtherType 0x88b5: it reaches no VM and no stack.
//!
//! ## Transmit with virtio-net headers
//!
//! AF_XDP TX carries no GSO metadata, so every frame sent through it is its own
//! skb of one MTU. A packet socket with `PACKET_VNET_HDR` takes the same
//! `virtio_net_hdr` a TAP write does: a TCP super-frame of up to 64 KiB becomes one
//! GSO skb with its checksum partial, which the veth and the bridge pass to the VM
//! whole (docs/XDP.md "Frames to the VMs through a packet socket").

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::xsk::{last, SysError, TxCsum, Xsk};

/// Longest wait for the probe frame to come out of the veth's other end.
const PROBE_WAIT: Duration = Duration::from_millis(300);
/// Frames read while waiting, at most (other traffic on a live bridge port).
const PROBE_READS: usize = 256;
const PROBE_DST: [u8; 6] = [0x01, 0x80, 0xc2, 0x00, 0x00, 0x01];
const PROBE_ETHERTYPE: u16 = 0x88b5;
const PROBE_MARK: &[u8; 14] = b"mvc-tx-csum-pr";
/// Where the probe's "checksum" starts and where its field lies (any place inside
/// the frame will do: the kernel only records them).
const PROBE_CSUM: TxCsum = TxCsum {
    start: 14,
    offset: 30,
};

/// Sends one probe frame with a checksum request through `xsk` (whose kernel side
/// transmits into interface `peer_ifindex`, the veth's other end) and reports
/// whether it arrived with its checksum left partial. Leaves `xsk`'s checksum
/// requests on exactly when they were honoured. A socket without TX metadata is
/// not probed (false).
pub fn probe_tx_csum(xsk: &mut Xsk, peer_ifindex: u32) -> Result<bool, SysError> {
    if !xsk.set_tx_csum(true) {
        return Ok(false);
    }
    let result = probe(xsk, peer_ifindex);
    xsk.set_tx_csum(matches!(result, Ok(true)));
    result
}

fn probe(xsk: &mut Xsk, peer_ifindex: u32) -> Result<bool, SysError> {
    let sock = AuxSocket::bind(peer_ifindex)?;
    let nonce = std::process::id().to_be_bytes();
    let mut frame = [0u8; 64];
    frame[..6].copy_from_slice(&PROBE_DST);
    // A locally administered source that names no one.
    frame[6..12].copy_from_slice(&[0x02, 0x6d, 0x76, 0x63, 0x00, 0x01]);
    frame[12..14].copy_from_slice(&PROBE_ETHERTYPE.to_be_bytes());
    frame[14..28].copy_from_slice(PROBE_MARK);
    frame[28..32].copy_from_slice(&nonce);
    if xsk.send_batch_csum([(&frame[..], Some(PROBE_CSUM))]) == 0 {
        return Ok(false);
    }
    let deadline = Instant::now() + PROBE_WAIT;
    let mut buf = [0u8; 2048];
    for _ in 0..PROBE_READS {
        xsk.flush_tx();
        let Some(left) = deadline.checked_duration_since(Instant::now()) else {
            break;
        };
        let Some((len, incoming, status)) = sock.recv(&mut buf, left)? else {
            continue;
        };
        if incoming && len >= 32 && buf[14..28] == PROBE_MARK[..] && buf[28..32] == nonce {
            return Ok(status & libc::TP_STATUS_CSUMNOTREADY != 0);
        }
    }
    Ok(false)
}

/// A packet socket that sends on interface `ifindex` and receives nothing
/// (protocol 0), taking a `virtio_net_hdr` in front of each frame. Writes go
/// through the interface's queueing (a veth has none by default).
pub fn vnet_tx_socket(ifindex: u32) -> Result<OwnedFd, SysError> {
    let fd = packet_socket(0)?;
    set_int(&fd, libc::PACKET_VNET_HDR, 1, "setsockopt(PACKET_VNET_HDR)")?;
    bind(&fd, ifindex, 0)?;
    Ok(fd)
}

fn packet_socket(proto_be: u16) -> Result<OwnedFd, SysError> {
    // SAFETY: socket only reads its integer arguments; the result is checked.
    let raw = unsafe {
        libc::socket(
            libc::AF_PACKET,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            i32::from(proto_be),
        )
    };
    if raw < 0 {
        return Err(last("socket(AF_PACKET)"));
    }
    // SAFETY: `raw` is a socket just opened here and owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

fn set_int(
    fd: &OwnedFd,
    opt: libc::c_int,
    v: libc::c_int,
    call: &'static str,
) -> Result<(), SysError> {
    // SAFETY: the pointer and length describe `v`, which lives across the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_PACKET,
            opt,
            std::ptr::from_ref(&v).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(last(call));
    }
    Ok(())
}

fn bind(fd: &OwnedFd, ifindex: u32, proto_be: u16) -> Result<(), SysError> {
    // SAFETY: an all-zero sockaddr_ll is a valid value (plain integers).
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = proto_be;
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
        return Err(last("bind(AF_PACKET)"));
    }
    Ok(())
}

/// An `AF_PACKET` socket that reads every frame of one interface with its
/// `tpacket_auxdata`.
struct AuxSocket {
    fd: OwnedFd,
}

impl AuxSocket {
    fn bind(ifindex: u32) -> Result<Self, SysError> {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = packet_socket(proto)?;
        set_int(&fd, libc::PACKET_AUXDATA, 1, "setsockopt(PACKET_AUXDATA)")?;
        bind(&fd, ifindex, proto)?;
        Ok(Self { fd })
    }

    /// Waits up to `wait` for a frame: its length, whether it came in (not one the
    /// interface sent) and its auxdata status; `None` when none came.
    fn recv(&self, buf: &mut [u8], wait: Duration) -> Result<Option<(usize, bool, u32)>, SysError> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: `pfd` is one valid pollfd for the call's duration.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            return Err(last("poll(AF_PACKET)"));
        }
        if r == 0 {
            return Ok(None);
        }
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // u64 words keep the control buffer aligned for cmsghdr.
        let mut control = [0u64; 16];
        // SAFETY: all-zero sockaddr_ll and msghdr are valid values.
        let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_name = std::ptr::from_mut(&mut from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: every pointer in `msg` describes a live buffer of the length given.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Ok(None);
            }
            return Err(SysError {
                call: "recvmsg(AF_PACKET)",
                source: e,
            });
        }
        let mut status = 0;
        // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control
        // buffer within msg_controllen, and the auxdata is read unaligned from
        // inside the cmsg the kernel sized for it.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET
                    && (*c).cmsg_type == libc::PACKET_AUXDATA
                    && (*c).cmsg_len as usize
                        >= libc::CMSG_LEN(std::mem::size_of::<libc::tpacket_auxdata>() as u32)
                            as usize
                {
                    let aux = libc::CMSG_DATA(c)
                        .cast::<libc::tpacket_auxdata>()
                        .read_unaligned();
                    status = aux.tp_status;
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        let incoming = from.sll_pkttype != libc::PACKET_OUTGOING;
        Ok(Some((n as usize, incoming, status)))
    }
}
