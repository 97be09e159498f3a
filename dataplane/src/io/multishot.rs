//! Multishot UDP receive (`IORING_OP_RECVMSG` with `IORING_RECV_MULTISHOT`): one armed
//! request keeps delivering datagrams (and GRO batches, with their `UDP_GRO` control
//! message) into buffers the kernel picks from a provided-buffer ring, instead of one
//! `recvmsg` re-armed per datagram.
//!
//! Ownership: the ring's entries and the buffers are lent to the kernel from
//! registration on. A buffer named by a completion is ours until [`Multishot::give_back`]
//! puts it back on the ring (the forwarder does so in the same round, after the core has
//! handled it). Like the other receive slots, the memory is never freed: the kernel
//! cancels an armed request asynchronously after the ring closes, so it is leaked with
//! the thread that ends with the process.

use std::alloc::{alloc_zeroed, Layout};
use std::mem::ManuallyDrop;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use super::sys::from_sockaddr;
use super::udp::{read_gro_cmsg, CMSG_SPACE};
use super::IoError;

/// Buffers in the ring (a power of two).
const ENTRIES: u16 = 16;
/// The buffer group id of the receive ring (one per io_uring).
const GROUP: u16 = 0;
/// `struct io_uring_recvmsg_out` at the start of each buffer: name, control and payload
/// lengths and the message flags, four `u32`s.
const OUT_HDR: usize = 16;
const NAME_LEN: usize = std::mem::size_of::<libc::sockaddr_storage>();
const PAGE: usize = 4096;

/// What one completion delivered: the buffer it used and where the datagram is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// The buffer (give it back with [`Multishot::give_back`]).
    pub bid: u16,
    /// The sender, when its address is one we know.
    pub src: Option<SocketAddr>,
    /// GRO segment size, when the payload is a batch.
    pub segment: Option<usize>,
    /// Offset and length of the payload in the buffer.
    pub payload: (usize, usize),
    /// The datagram was longer than the buffer (it is dropped).
    pub truncated: bool,
}

/// The armed multishot receive of one forwarder and its buffer ring.
pub struct Multishot {
    /// Page-aligned array of `ENTRIES` `io_uring_buf` entries (16 bytes each); the
    /// tail is the last `u16` of entry 0.
    ring: *mut types::BufRingEntry,
    /// `ENTRIES` buffers of `buf_len` bytes, one allocation.
    bufs: *mut u8,
    buf_len: usize,
    tail: u16,
    /// Only `msg_namelen` and `msg_controllen` are read by the kernel: how much room
    /// each buffer keeps for the name and control data. Boxed: its address is in the
    /// armed request; never freed, like the buffers.
    hdr: ManuallyDrop<Box<libc::msghdr>>,
    armed: bool,
}

impl Multishot {
    /// Registers a buffer ring of payloads up to `payload` bytes with `ring`; an error
    /// when the kernel has no provided-buffer rings (Linux < 5.19) or refuses it.
    pub fn new(ring: &IoUring, payload: usize) -> Result<Self, IoError> {
        let buf_len = OUT_HDR + NAME_LEN + CMSG_SPACE + payload;
        let entries = usize::from(ENTRIES);
        let ring_layout = Layout::from_size_align(
            (entries * std::mem::size_of::<types::BufRingEntry>()).max(PAGE),
            PAGE,
        )
        .map_err(|e| IoError::Invalid(format!("buffer ring layout: {e}")))?;
        let bufs_layout = Layout::from_size_align(entries * buf_len, 64)
            .map_err(|e| IoError::Invalid(format!("receive buffers layout: {e}")))?;
        // SAFETY: both layouts have a non-zero size.
        let (ring_mem, bufs) = unsafe { (alloc_zeroed(ring_layout), alloc_zeroed(bufs_layout)) };
        if ring_mem.is_null() || bufs.is_null() {
            return Err(IoError::Invalid(
                "out of memory for the receive ring".into(),
            ));
        }
        // SAFETY: plain old data; zero is valid.
        let mut hdr: Box<libc::msghdr> = Box::new(unsafe { std::mem::zeroed() });
        hdr.msg_namelen = NAME_LEN as u32;
        hdr.msg_controllen = CMSG_SPACE;
        let mut m = Self {
            ring: ring_mem.cast(),
            bufs,
            buf_len,
            tail: 0,
            hdr: ManuallyDrop::new(hdr),
            armed: false,
        };
        // SAFETY: the ring memory is page-aligned, holds `ENTRIES` entries and is never
        // freed (see the module comment), so it outlives the registration.
        unsafe {
            ring.submitter()
                .register_buf_ring_with_flags(m.ring as u64, ENTRIES, GROUP, 0)
        }
        .map_err(|e| IoError::Sys {
            call: "io_uring_register(IORING_REGISTER_PBUF_RING)".into(),
            source: e,
        })?;
        for bid in 0..ENTRIES {
            m.give_back(bid);
        }
        Ok(m)
    }

    /// The request to submit when none is armed ([`Self::needs_arming`]).
    pub fn arm(&mut self, fd: RawFd, user_data: u64) -> squeue::Entry {
        self.armed = true;
        opcode::RecvMsgMulti::new(types::Fd(fd), &**self.hdr, GROUP)
            .build()
            .user_data(user_data)
    }

    /// True when the last request ended (or none was armed yet).
    pub fn needs_arming(&self) -> bool {
        !self.armed
    }

    /// Reads a completion of the armed request: `Ok(Some)` for a datagram (its buffer
    /// then belongs to the caller until given back), `Ok(None)` when the kernel ended
    /// the request with no data (out of buffers: it is re-armed), `Err(errno)` for a
    /// receive error.
    pub fn complete(&mut self, res: i32, flags: u32) -> Result<Option<Received>, i32> {
        if !cqueue::more(flags) {
            self.armed = false;
        }
        let bid = cqueue::buffer_select(flags);
        if res < 0 {
            if let Some(bid) = bid {
                self.give_back(bid);
            }
            return match -res {
                libc::ENOBUFS => Ok(None),
                e => Err(e),
            };
        }
        let Some(bid) = bid.filter(|b| *b < ENTRIES) else {
            return Ok(None);
        };
        let n = (res as usize).min(self.buf_len);
        Ok(Some(parse(bid, &self.buf(bid)[..n])))
    }

    /// Buffer `bid`, to read and open its datagram in place.
    pub fn buf(&mut self, bid: u16) -> &mut [u8] {
        let bid = usize::from(bid % ENTRIES);
        // SAFETY: `bufs` holds `ENTRIES` buffers of `buf_len` bytes; a buffer named by a
        // completion is not written by the kernel until it is given back.
        unsafe { std::slice::from_raw_parts_mut(self.bufs.add(bid * self.buf_len), self.buf_len) }
    }

    /// Puts buffer `bid` back on the ring for the kernel to fill.
    pub fn give_back(&mut self, bid: u16) {
        let bid = bid % ENTRIES;
        let slot = usize::from(self.tail & (ENTRIES - 1));
        // SAFETY: `slot < ENTRIES`, inside the ring memory; the kernel reads entries only
        // up to the tail, which is published below, after the entry is written.
        let e = unsafe { &mut *self.ring.add(slot) };
        // SAFETY: `bid < ENTRIES`, inside the buffers' allocation.
        e.set_addr(unsafe { self.bufs.add(usize::from(bid) * self.buf_len) } as u64);
        e.set_len(self.buf_len as u32);
        e.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
        // SAFETY: the tail field lies in entry 0 of the live ring memory, which is
        // u16-aligned; the kernel reads it concurrently, hence the atomic release store.
        let tail = unsafe { AtomicU16::from_ptr(types::BufRingEntry::tail(self.ring) as *mut u16) };
        tail.store(self.tail, Ordering::Release);
    }
}

/// Whether a receive error means the kernel does not take multishot receives at all
/// (rather than an error of one datagram, such as an ICMP-reported refusal).
pub fn refused(errno: i32) -> bool {
    matches!(errno, libc::EINVAL | libc::EOPNOTSUPP | libc::EBADF)
}

/// Where the name, control data and payload of a filled buffer are (`buf` is the part
/// the completion says was written).
fn parse(bid: u16, buf: &[u8]) -> Received {
    let word = |i: usize| {
        buf.get(i * 4..i * 4 + 4)
            .map_or(0, |b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as usize)
    };
    let (namelen, controllen, payloadlen, msg_flags) = (word(0), word(1), word(2), word(3));
    // SAFETY: plain old data; zero is valid.
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let name = buf
        .get(OUT_HDR..OUT_HDR + namelen.min(NAME_LEN))
        .unwrap_or(&[]);
    // SAFETY: `name` is at most size_of::<sockaddr_storage>() bytes, copied into one.
    unsafe {
        std::ptr::copy_nonoverlapping(
            name.as_ptr(),
            (&mut ss as *mut libc::sockaddr_storage).cast(),
            name.len(),
        )
    };
    let mut ctrl = [0u64; CMSG_SPACE / 8];
    let c0 = OUT_HDR + NAME_LEN;
    let control = buf.get(c0..c0 + controllen.min(CMSG_SPACE)).unwrap_or(&[]);
    for (i, b) in control.iter().enumerate() {
        ctrl[i / 8] |= u64::from(*b) << (8 * (i % 8)) as u64;
    }
    let p0 = c0 + CMSG_SPACE;
    let len = payloadlen.min(buf.len().saturating_sub(p0));
    Received {
        bid,
        src: (name.len() >= 2).then(|| from_sockaddr(&ss)).flatten(),
        segment: read_gro_cmsg(&ctrl, control.len()),
        payload: (p0, len),
        truncated: msg_flags as i32 & libc::MSG_TRUNC != 0 || len < payloadlen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filled(name: &[u8], control: &[u8], payload: &[u8], flags: u32) -> Vec<u8> {
        let mut b = vec![0u8; OUT_HDR + NAME_LEN + CMSG_SPACE];
        for (i, v) in [name.len(), control.len(), payload.len()]
            .iter()
            .enumerate()
        {
            b[i * 4..i * 4 + 4].copy_from_slice(&(*v as u32).to_ne_bytes());
        }
        b[12..16].copy_from_slice(&flags.to_ne_bytes());
        b[OUT_HDR..OUT_HDR + name.len()].copy_from_slice(name);
        b[OUT_HDR + NAME_LEN..OUT_HDR + NAME_LEN + control.len()].copy_from_slice(control);
        b.extend_from_slice(payload);
        b
    }

    fn v4_name(addr: SocketAddr) -> Vec<u8> {
        let (ss, len) = super::super::sys::to_sockaddr(&addr);
        // SAFETY: `ss` is a live sockaddr_storage of which `len` bytes are the address.
        unsafe {
            std::slice::from_raw_parts(
                (&ss as *const libc::sockaddr_storage).cast::<u8>(),
                len as usize,
            )
        }
        .to_vec()
    }

    #[test]
    fn parse_finds_source_gro_segment_and_payload() {
        let src: SocketAddr = "198.18.0.7:4500".parse().unwrap();
        let mut ctrl = [0u64; CMSG_SPACE / 8];
        // A UDP_GRO message looks like a UDP_SEGMENT one with an int: build it by hand.
        let hdr_len = std::mem::size_of::<libc::cmsghdr>();
        let c = libc::cmsghdr {
            // SAFETY: pure arithmetic.
            cmsg_len: unsafe { libc::CMSG_LEN(4) } as _,
            cmsg_level: libc::SOL_UDP,
            cmsg_type: libc::UDP_GRO,
        };
        // SAFETY: ctrl is 8-aligned and larger than a cmsghdr and an int.
        unsafe {
            std::ptr::write(ctrl.as_mut_ptr().cast::<libc::cmsghdr>(), c);
            std::ptr::write_unaligned(
                ctrl.as_mut_ptr().cast::<u8>().add(hdr_len).cast::<i32>(),
                1400,
            );
        }
        // SAFETY: pure arithmetic.
        let clen = unsafe { libc::CMSG_SPACE(4) } as usize;
        // SAFETY: ctrl holds 64 bytes.
        let cbytes = unsafe { std::slice::from_raw_parts(ctrl.as_ptr().cast::<u8>(), clen) };
        let b = filled(&v4_name(src), cbytes, &[7u8; 2800], 0);
        let r = parse(3, &b);
        assert_eq!(r.bid, 3);
        assert_eq!(r.src, Some(src));
        assert_eq!(r.segment, Some(1400));
        assert_eq!(r.payload, (OUT_HDR + NAME_LEN + CMSG_SPACE, 2800));
        assert!(!r.truncated);
    }

    #[test]
    fn parse_flags_truncation_and_survives_garbage() {
        let src: SocketAddr = "198.18.0.7:4500".parse().unwrap();
        let mut b = filled(&v4_name(src), &[], &[1u8; 100], libc::MSG_TRUNC as u32);
        assert!(parse(0, &b).truncated);
        // A payload length beyond what the completion covers is cut and flagged.
        b.truncate(b.len() - 50);
        let r = parse(0, &b);
        assert_eq!(r.payload.1, 50);
        assert!(r.truncated);
        // Too short for even the header: no source, no payload, no panic.
        let r = parse(0, &[0xff; 10]);
        assert_eq!((r.src, r.payload.1), (None, 0));
        // Lengths beyond the buffer: flagged (the forwarder drops it), still in bounds.
        let r = parse(0, &[0xff; 400]);
        assert!(r.truncated);
        assert!(r.payload.0 + r.payload.1 <= 400);
    }

    #[test]
    fn a_ring_of_buffers_registers_or_says_why() {
        let Ok(ring) = IoUring::new(4) else {
            return lab::skip_unsupported(&lab::skip::current_test(), "io_uring not available");
        };
        match Multishot::new(&ring, 2048) {
            Ok(mut m) => {
                assert!(m.needs_arming());
                let _ = m.arm(0, 1);
                assert!(!m.needs_arming());
                // A completion without F_MORE ends the request; ENOBUFS is no error.
                assert_eq!(m.complete(-libc::ENOBUFS, 0), Ok(None));
                assert!(m.needs_arming());
                assert_eq!(m.complete(-libc::ECONNREFUSED, 0), Err(libc::ECONNREFUSED));
                // A datagram's error keeps multishot; the kernel refusing it does not.
                assert!(!refused(libc::ECONNREFUSED));
                assert!(refused(libc::EINVAL));
            }
            Err(e) => {
                let s = e.to_string();
                assert!(s.contains("PBUF_RING"), "{s}");
            }
        }
    }
}
