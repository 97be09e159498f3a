//! The TAP device: open or create it, set MTU and offloads, bring it up.

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::IoError;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
/// Offload flags of TUNSETOFFLOAD.
pub const TUN_F_CSUM: libc::c_uint = 0x01;
/// TSO for IPv4.
pub const TUN_F_TSO4: libc::c_uint = 0x02;
/// TSO for IPv6.
pub const TUN_F_TSO6: libc::c_uint = 0x04;

/// Length of `struct virtio_net_hdr` (no mergeable buffers).
pub const VNET_HDR_LEN: usize = 10;

#[repr(C)]
struct IfReqFlags {
    name: [libc::c_char; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[repr(C)]
struct IfReqInt {
    name: [libc::c_char; libc::IFNAMSIZ],
    value: libc::c_int,
    _pad: [u8; 20],
}

fn ifname(name: &str) -> Result<[libc::c_char; libc::IFNAMSIZ], IoError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return Err(IoError::Invalid(format!(
            "bad interface name {name:?} (1..15 characters)"
        )));
    }
    let mut n = [0 as libc::c_char; libc::IFNAMSIZ];
    for (d, s) in n.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(n)
}

/// Whether an interface of this name exists.
pub fn exists(name: &str) -> bool {
    let Ok(c) = CString::new(name) else {
        return false;
    };
    // SAFETY: c is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// An open TAP device.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    /// Interface name.
    pub name: String,
    /// Frames carry a `virtio_net_hdr` in front.
    pub vnet_hdr: bool,
    /// TSO/checksum offload enabled (frames may be larger than the MTU).
    pub offload: bool,
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl Tap {
    /// Opens (and with `create`, creates) the TAP device `name`, sets its MTU and brings
    /// it up. With `vnet_hdr`, asks for virtio headers and TSO/checksum offload, and falls
    /// back to plain frames when the kernel refuses (the caller logs that once).
    pub fn open(name: &str, create: bool, mtu: u32, vnet_hdr: bool) -> Result<Self, IoError> {
        let n = ifname(name)?;
        if !create && !exists(name) {
            return Err(IoError::Invalid(format!(
                "TAP device {name} does not exist: create it with `ip tuntap add dev {name} mode tap` \
                 or pass --create-tap"
            )));
        }
        match Self::open_with(n, name, vnet_hdr, false) {
            Ok(t) => {
                set_mtu_up(name, mtu)?;
                Ok(t)
            }
            Err(e) if vnet_hdr => {
                tracing::warn!(error = %e, "TAP with virtio headers refused; using plain frames");
                let t = Self::open_with(n, name, false, false)?;
                set_mtu_up(name, mtu)?;
                Ok(t)
            }
            Err(e) => Err(e),
        }
    }

    /// Opens `queues` queues of a multi-queue TAP device (`IFF_MULTI_QUEUE`), one
    /// descriptor each; the kernel spreads the frames it sends by flow over the queues.
    /// One queue is [`Tap::open`] (a single-queue device, as before). An existing device
    /// must have been made multi-queue (`ip tuntap add dev NAME mode tap multi_queue`).
    pub fn open_queues(
        name: &str,
        create: bool,
        mtu: u32,
        vnet_hdr: bool,
        queues: usize,
    ) -> Result<Vec<Self>, IoError> {
        if queues <= 1 {
            return Ok(vec![Self::open(name, create, mtu, vnet_hdr)?]);
        }
        let n = ifname(name)?;
        if !create && !exists(name) {
            return Err(IoError::Invalid(format!(
                "TAP device {name} does not exist: create it with `ip tuntap add dev {name} mode tap \
                 multi_queue` or pass --create-tap"
            )));
        }
        let mut vnet = vnet_hdr;
        let first = match Self::open_with(n, name, vnet, true) {
            Ok(t) => t,
            Err(e) if vnet => {
                tracing::warn!(error = %e, "TAP with virtio headers refused; using plain frames");
                vnet = false;
                Self::open_with(n, name, false, true).map_err(|e| not_multi_queue(name, e))?
            }
            Err(e) => return Err(not_multi_queue(name, e)),
        };
        let mut v = vec![first];
        while v.len() < queues {
            v.push(Self::open_with(n, name, vnet, true).map_err(|e| {
                IoError::Invalid(format!(
                    "TAP {name}: queue {} of {queues}: {e} (a device made without \
                     multi_queue has one queue)",
                    v.len()
                ))
            })?);
        }
        set_mtu_up(name, mtu)?;
        Ok(v)
    }

    fn open_with(
        n: [libc::c_char; libc::IFNAMSIZ],
        name: &str,
        vnet_hdr: bool,
        multi_queue: bool,
    ) -> Result<Self, IoError> {
        // SAFETY: the path is a valid C string; the result is checked.
        let fd = unsafe {
            libc::open(
                c"/dev/net/tun".as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(IoError::last("open /dev/net/tun"));
        }
        // SAFETY: fd was just opened and is owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut flags = IFF_TAP | IFF_NO_PI;
        if vnet_hdr {
            flags |= IFF_VNET_HDR;
        }
        if multi_queue {
            flags |= IFF_MULTI_QUEUE;
        }
        let mut req = IfReqFlags {
            name: n,
            flags,
            _pad: [0; 22],
        };
        // SAFETY: TUNSETIFF reads and writes a struct ifreq, which req is laid out as.
        if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(IoError::last(format!("TUNSETIFF {name}")));
        }
        let mut offload = false;
        if vnet_hdr {
            let sz: libc::c_int = VNET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer.
            if unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETVNETHDRSZ, &sz) } < 0 {
                return Err(IoError::last("TUNSETVNETHDRSZ"));
            }
            let f: libc::c_uint = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6;
            // SAFETY: TUNSETOFFLOAD takes the flags by value.
            offload =
                unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETOFFLOAD, f as libc::c_ulong) } == 0;
        }
        Ok(Self {
            fd,
            name: name.to_owned(),
            vnet_hdr,
            offload,
        })
    }
}

/// Adds the likely cause to a failed multi-queue open (the kernel says only EINVAL).
fn not_multi_queue(name: &str, e: IoError) -> IoError {
    IoError::Invalid(format!(
        "{e}: is TAP {name} a multi-queue device? (--threads above 1 needs one: \
         `ip tuntap add dev {name} mode tap multi_queue`, or --create-tap)"
    ))
}

fn ctl_socket() -> Result<OwnedFd, IoError> {
    // SAFETY: plain socket(2) call; result checked.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if s < 0 {
        return Err(IoError::last("socket"));
    }
    // SAFETY: s was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(s) })
}

/// Sets the MTU of an interface and brings it up.
pub fn set_mtu_up(name: &str, mtu: u32) -> Result<(), IoError> {
    let n = ifname(name)?;
    let s = ctl_socket()?;
    let mut req = IfReqInt {
        name: n,
        value: mtu as libc::c_int,
        _pad: [0; 20],
    };
    // SAFETY: SIOCSIFMTU reads a struct ifreq with ifr_mtu, which req is laid out as.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFMTU, &mut req) } < 0 {
        return Err(IoError::last(format!("set MTU {mtu} on {name}")));
    }
    let mut f = IfReqFlags {
        name: n,
        flags: 0,
        _pad: [0; 22],
    };
    // SAFETY: SIOCGIFFLAGS fills ifr_flags of the struct ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut f) } < 0 {
        return Err(IoError::last(format!("get flags of {name}")));
    }
    f.flags |= libc::IFF_UP as libc::c_short;
    // SAFETY: SIOCSIFFLAGS reads ifr_flags of the struct ifreq.
    if unsafe { libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &mut f) } < 0 {
        return Err(IoError::last(format!("bring {name} up")));
    }
    Ok(())
}

/// Reads one frame (non-blocking); `Ok(None)` when nothing is ready.
pub fn read(fd: RawFd, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
    // SAFETY: buf is valid for writes of buf.len() bytes.
    let n = unsafe { libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len()) };
    if n < 0 {
        let e = std::io::Error::last_os_error();
        if e.kind() == std::io::ErrorKind::WouldBlock {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(n as usize))
}

/// Writes one frame.
pub fn write(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: buf is valid for reads of buf.len() bytes.
    let n = unsafe { libc::write(fd, buf.as_ptr() as *const libc::c_void, buf.len()) };
    if n < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(n as usize)
}
