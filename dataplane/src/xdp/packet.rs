//! The port's `AF_PACKET` socket for frames to the VMs.
//!
//! AF_XDP TX carries no GSO metadata, so every frame sent through it is its own
//! skb of one MTU. A packet socket with `PACKET_VNET_HDR` takes the same
//! `virtio_net_hdr` a TAP write does: a TCP super-frame of up to 64 KiB becomes one
//! GSO skb with its checksum partial, which the veth and the bridge pass to the VM
//! whole (docs/XDP.md "Frames to the VMs through a packet socket").

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use super::xsk::{last, setsockopt_at, SysError};

/// A packet socket that sends on interface `ifindex` and receives nothing
/// (protocol 0), taking a `virtio_net_hdr` in front of each frame. Writes go
/// through the interface's queueing (a veth has none by default).
pub fn vnet_tx_socket(ifindex: u32) -> Result<OwnedFd, SysError> {
    let fd = packet_socket(0)?;
    let on: libc::c_int = 1;
    setsockopt_at(
        fd.as_fd(),
        libc::SOL_PACKET,
        libc::PACKET_VNET_HDR,
        &on,
        "setsockopt(PACKET_VNET_HDR)",
    )?;
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
