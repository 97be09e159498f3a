//! The edge loop on the XDP datapath: frames from the VM bridge come out of
//! the AF_XDP socket in batches, go through the same pure core as TAP frames
//! (`EdgeCore::handle_tap`), and frames for the bridge go back through the
//! AF_XDP TX ring in one batch per loop turn. The UDP side is the same as in
//! `io::driver` (GRO batches in, GSO batches out where the kernel has them).
//!
//! Differences from the TAP path: no virtio-net header, so no TSO in either
//! direction (the VMs' segments arrive MTU-sized; frames from peers are sent
//! as they are), and a frame whose TCP checksum is partial (a peer's
//! segmentation left the pseudo-header sum in it) is completed here.

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::edge::EdgeCore;
use crate::io::ctl::Snapshot;
use crate::io::driver::EdgeInfo;
use crate::io::{udp, IoError};
use crate::offload;
use crate::outbox::Outbox;
use crate::status::EdgeStatus;

use super::XdpPort;

const BATCH: u32 = 64;
const TICK: Duration = Duration::from_millis(20);
const PUBLISH: Duration = Duration::from_millis(200);

/// Completes a partial checksum: the 16-bit field at `start + offset` holds
/// the pseudo-header sum; the result covers `frame[start..]`. Returns false
/// (frame left alone) when the offsets do not fit the frame.
pub fn complete_csum(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let Some(field) = start.checked_add(offset) else {
        return false;
    };
    if field + 2 > frame.len() || start >= frame.len() {
        return false;
    }
    let mut sum: u32 = 0;
    let data = &frame[start..];
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    let c = !(sum as u16);
    frame[field..field + 2].copy_from_slice(&c.to_be_bytes());
    true
}

/// What the UDP side may use (probed by the caller).
#[derive(Clone, Copy, Debug)]
pub struct UdpOffloads {
    /// UDP GSO for batches to one peer.
    pub gso: bool,
    /// UDP GRO is on for the socket (datagrams arrive coalesced).
    pub gro: bool,
    /// Underlay MTU (bounds GSO segments).
    pub underlay_mtu: usize,
}

/// Runs an edge on an XDP port until `stop` is set.
pub fn run_edge(
    mut core: EdgeCore,
    sock: UdpSocket,
    mut port: XdpPort,
    off: UdpOffloads,
    info: EdgeInfo,
    snap: Snapshot<EdgeStatus>,
    stop: Arc<AtomicBool>,
) -> Result<(), IoError> {
    let fd = sock.as_raw_fd();
    let buf_size = info.mtu as usize + 14 + 4 + 1024;
    let mut out = Outbox::new(buf_size);
    out.gso = off.gso;
    out.gso_max_segment = off.underlay_mtu.saturating_sub(28);
    let gro = off.gro;
    let mut rx = vec![0u8; 65_536];
    let mut last_tick = Instant::now() - TICK;
    let mut last_pub = Instant::now() - PUBLISH;
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: port.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let timeout = if port.flush_tx() > 0 {
            1
        } else {
            TICK.as_millis() as i32
        };
        // SAFETY: `fds` is a valid array of two pollfds for the call.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(IoError::Sys {
                    call: "poll".into(),
                    source: e,
                });
            }
        }
        let now = Instant::now();
        if fds[0].revents != 0 {
            for _ in 0..BATCH {
                match udp::recv_msg(fd, &mut rx) {
                    Ok(Some((n, src, seg))) => {
                        let seg = if gro {
                            seg.unwrap_or(n).max(1)
                        } else {
                            n.max(1)
                        };
                        let mut o = 0;
                        while o < n {
                            let e = (o + seg).min(n);
                            core.handle_udp(now, src, &mut rx[o..e], &mut out);
                            o = e;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => {
                        core.count_drop("udp_recv_error");
                        break;
                    }
                }
            }
        }
        if fds[1].revents != 0 {
            port.recv_batch(BATCH, |frame| core.handle_tap(now, frame, &mut out));
        }
        if now.saturating_duration_since(last_tick) >= TICK {
            last_tick = now;
            core.poll(now, &mut out);
        }
        for u in &out.udp {
            let seg = u.segment.and_then(|s| u16::try_from(s).ok());
            if udp::send_msg(fd, u.bytes(), u.dst, seg).is_err() {
                core.count_drop("udp_send_error");
            }
        }
        out.flush_tap();
        for t in out.tap.iter_mut() {
            if t.hdr.flags & offload::F_NEEDS_CSUM != 0 {
                let frame = &mut t.buf[t.start..t.start + t.len];
                if !complete_csum(
                    frame,
                    usize::from(t.hdr.csum_start),
                    usize::from(t.hdr.csum_offset),
                ) {
                    core.count_drop("xdp_bad_csum_offsets");
                }
            }
        }
        let before = port.stats().socket;
        port.send_batch(out.tap.iter().map(|t| &t.buf[t.start..t.start + t.len]));
        let after = port.stats().socket;
        for _ in before.tx_ring_full..after.tx_ring_full {
            core.count_drop("xdp_tx_ring_full");
        }
        for _ in before.tx_too_big..after.tx_too_big {
            core.count_drop("xdp_tx_too_big");
        }
        out.recycle_sent();
        if now.saturating_duration_since(last_pub) >= PUBLISH {
            last_pub = now;
            let mut s = core.status(now);
            s.datapath = info.datapath.clone();
            s.datapath_reason = info.datapath_reason.clone();
            s.io = info.io.clone();
            s.tap = info.tap.clone();
            s.mtu = info.mtu;
            s.listen = info.listen.clone();
            *snap.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fold(mut s: u32) -> u16 {
        while s >> 16 != 0 {
            s = (s & 0xffff) + (s >> 16);
        }
        s as u16
    }

    fn sum(b: &[u8]) -> u32 {
        b.chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
            .sum()
    }

    /// A partial checksum (pseudo-header sum in the field) completed here
    /// equals the checksum computed over pseudo-header and data directly.
    #[test]
    fn completes_a_partial_checksum() {
        let pseudo: [u8; 12] = [198, 18, 0, 1, 198, 18, 0, 2, 0, 6, 0, 25];
        let mut seg = vec![0u8; 25];
        for (i, b) in seg.iter_mut().enumerate() {
            *b = (i * 37 + 11) as u8;
        }
        seg[16] = 0;
        seg[17] = 0;
        let want = !fold(sum(&pseudo) + sum(&seg));
        let mut frame = vec![0xeeu8; 10];
        let start = frame.len();
        seg[16..18].copy_from_slice(&fold(sum(&pseudo)).to_be_bytes());
        frame.extend_from_slice(&seg);
        assert!(complete_csum(&mut frame, start, 16));
        assert_eq!(
            u16::from_be_bytes([frame[start + 16], frame[start + 17]]),
            want
        );
        assert!(!complete_csum(&mut frame, start + 20, 16));
        assert!(!complete_csum(&mut frame, usize::MAX, 6));
    }
}
