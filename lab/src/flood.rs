//! Junk floods: one prebuilt Ethernet/IPv4/UDP frame sent over and over, bounded in
//! count and time, by one of two generators:
//!
//! - [`flood`]: a raw packet socket in batches of `sendmmsg`, straight to an interface's
//!   queue (no socket, routing or qdisc work per datagram): one system call's share,
//!   one copy and one skb per frame; on this 2-core machine 100-300 k frames/s.
//! - [`flood_cloned`]: a packet socket sends *seeds* (the frame with the mark
//!   [`SEED_MARK`]) through the interface's egress, and a tc program on the interface's egress (tcx) clones each seed
//!   [`CLONES_PER_SEED`] times out of the same interface (`bpf_clone_redirect`): one
//!   system call per thousands of frames, no copy, an skb clone per frame. Paced to a
//!   target rate. Frames without the mark (the interface's own traffic) pass untouched.
//!
//! The kernel's own XDP traffic generator (`BPF_PROG_TEST_RUN` with
//! `BPF_F_TEST_XDP_LIVE_FRAMES`, as xdp-tools' xdp-trafficgen uses) would need no skb at
//! all, but the lab machine's kernel refuses it (`EPERM` for every live-frames run, with
//! every capability granted; docs/BENCH.md "The lab").
//!
//! On a veth every frame arrives at the peer as its own packet, as on a wire. Used by the
//! junk-filter measurements (`control/tests/xdp_relay.rs`, `measure_junk_flood`;
//! `dataplane/tests/xdp.rs`, `measure_flood_rate`).

use std::net::SocketAddrV4;
use std::time::{Duration, Instant};

use crate::sys::{self, SysError};

/// Frames per `sendmmsg`.
const BATCH: usize = 256;

/// An Ethernet frame from `src_mac` to `dst_mac` carrying one IPv4/UDP datagram from
/// `src` to `dst` with `payload` (TTL 64, no IP options, UDP checksum 0).
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: SocketAddrV4,
    dst: SocketAddrV4,
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let ip_len = 20 + udp_len;
    let mut f = Vec::with_capacity(14 + ip_len);
    f.extend(dst_mac);
    f.extend(src_mac);
    f.extend([0x08, 0x00]);
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(ip_len as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&src.ip().octets());
    ip[16..20].copy_from_slice(&dst.ip().octets());
    let mut sum: u32 = ip
        .chunks(2)
        .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f.extend(ip);
    f.extend(src.port().to_be_bytes());
    f.extend(dst.port().to_be_bytes());
    f.extend((udp_len as u16).to_be_bytes());
    f.extend([0, 0]);
    f.extend(payload);
    f
}

/// The MAC address of `ifname` in namespace `ns`.
pub fn mac_of(ns: &str, ifname: &str) -> crate::Result<[u8; 6]> {
    let out = crate::run(&["ip", "-n", ns, "-o", "link", "show", "dev", ifname])?.stdout;
    let hex = out
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .ok_or_else(|| crate::Error::Parse {
            what: format!("ip link show {ifname} in {ns}"),
            detail: format!("no link/ether in {out}"),
        })?;
    let mut mac = [0u8; 6];
    for (i, b) in hex.split(':').enumerate().take(6) {
        mac[i] = u8::from_str_radix(b, 16).map_err(|_| crate::Error::Parse {
            what: format!("ip link show {ifname} in {ns}"),
            detail: format!("bad MAC {hex}"),
        })?;
    }
    Ok(mac)
}

/// Sends `frame` out of `ifname` (of the calling thread's namespace) as fast as the
/// kernel takes it, until `max` frames or `secs` have gone; returns how many were sent.
pub fn flood(ifname: &str, frame: &[u8], max: u64, secs: Duration) -> Result<u64, SysError> {
    let fd = sys::packet_socket(ifname, sys::PacketPath::Direct)?;
    let until = Instant::now() + secs;
    let mut sent = 0u64;
    while sent < max && Instant::now() < until {
        let n = (max - sent).min(BATCH as u64) as usize;
        sent += sys::send_frame_batch(&fd, frame, n)? as u64;
    }
    Ok(sent)
}

/// The mark that makes a frame a seed of [`flood_cloned`].
pub const SEED_MARK: u32 = 0x5eed_f100;

/// Frames each seed of [`flood_cloned`] becomes on the wire (itself and its clones).
pub const FRAMES_PER_SEED: u64 = 64;

/// Clones the tc program makes of each seed.
pub const CLONES_PER_SEED: u32 = FRAMES_PER_SEED as u32 - 1;

/// How often a paced flood tops its count up to the target rate.
const TICK: Duration = Duration::from_millis(2);

/// A backlog a paced flood gives up instead of catching up on (it fell behind the
/// target rate): 50 ms of frames.
const BACKLOG: Duration = Duration::from_millis(50);

/// What a paced flood offered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Offered {
    /// Frames put on the wire: seeds the socket took times [`FRAMES_PER_SEED`] (a clone
    /// the receiving device has no room for is dropped there and counted by it).
    pub frames: u64,
    /// From the first frame to the end.
    pub elapsed: Duration,
}

impl Offered {
    /// Frames per second offered.
    pub fn per_sec(&self) -> f64 {
        self.frames as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Frames due after `elapsed` at `pps`.
fn due(pps: u64, elapsed: Duration) -> u64 {
    let due = u128::from(pps) * elapsed.as_nanos() / 1_000_000_000;
    u64::try_from(due).unwrap_or(u64::MAX)
}

/// Floods `frame` out of `ifname` (of the calling thread's namespace) at `pps` frames per
/// second, until `max` frames or `secs` have gone: attaches the cloning tc program to
/// the interface's egress for the duration, and every 2 ms sends as many seeds as the
/// rate makes due (a backlog over 50 ms is dropped, not caught up). Returns what it
/// offered.
pub fn flood_cloned(
    ifname: &str,
    frame: &[u8],
    pps: u64,
    max: u64,
    secs: Duration,
) -> Result<Offered, SysError> {
    let ifindex = sys::ifindex(ifname)?;
    let prog = sys::load_seed_cloner(ifindex, SEED_MARK, CLONES_PER_SEED)?;
    let _link = sys::tcx_attach_egress(&prog, ifindex)?;
    let fd = sys::packet_socket(ifname, sys::PacketPath::Egress)?;
    sys::set_mark(&fd, SEED_MARK)?;
    let max_seeds = max / FRAMES_PER_SEED;
    let backlog = (due(pps, BACKLOG) / FRAMES_PER_SEED).max(1);
    let start = Instant::now();
    let (mut seeds, mut skipped) = (0u64, 0u64);
    loop {
        let elapsed = start.elapsed();
        if seeds >= max_seeds || elapsed >= secs {
            break;
        }
        // Skipped seeds count against the rate, never against `max`.
        let owed = (due(pps, elapsed) / FRAMES_PER_SEED).saturating_sub(seeds + skipped);
        if owed > backlog {
            skipped += owed - backlog;
        }
        let n = owed.min(backlog).min(BATCH as u64).min(max_seeds - seeds);
        if n == 0 {
            std::thread::sleep(TICK);
            continue;
        }
        let sent = sys::send_frame_batch(&fd, frame, n as usize)? as u64;
        seeds += sent;
        // A full queue took fewer: those seeds are skipped, not owed.
        skipped += n - sent;
    }
    Ok(Offered {
        frames: seeds * FRAMES_PER_SEED,
        elapsed: start.elapsed(),
    })
}

/// The generator a measurement floods with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Generator {
    /// [`flood`]: as fast as the raw socket goes.
    Socket,
    /// [`flood_cloned`] at this many frames per second.
    Cloned {
        /// The target rate.
        pps: u64,
    },
}

impl Generator {
    /// From the environment: `MVC_FLOOD_GEN` `socket` or `clone` (the default), the
    /// latter at `MVC_FLOOD_PPS` frames per second (default 1 000 000).
    pub fn from_env() -> Result<Generator, String> {
        let pps = match std::env::var("MVC_FLOOD_PPS") {
            Ok(v) => v
                .parse()
                .map_err(|_| format!("MVC_FLOOD_PPS={v}: not a number"))?,
            Err(_) => 1_000_000,
        };
        match std::env::var("MVC_FLOOD_GEN").as_deref() {
            Ok("socket") => Ok(Generator::Socket),
            Ok("clone") | Err(_) => Ok(Generator::Cloned { pps }),
            Ok(other) => Err(format!("MVC_FLOOD_GEN={other}: socket or clone")),
        }
    }

    /// Floods `frame` out of `ifname` (calling thread's namespace) until `max` frames or
    /// `secs`; `share` is this sender's part of the target rate (1 of `n` senders: 1/n).
    pub fn run(
        &self,
        ifname: &str,
        frame: &[u8],
        share: f64,
        max: u64,
        secs: Duration,
    ) -> Result<Offered, SysError> {
        match *self {
            Generator::Socket => {
                let start = Instant::now();
                let frames = flood(ifname, frame, max, secs)?;
                Ok(Offered {
                    frames,
                    elapsed: start.elapsed(),
                })
            }
            Generator::Cloned { pps } => {
                flood_cloned(ifname, frame, (pps as f64 * share) as u64, max, secs)
            }
        }
    }
}

impl std::fmt::Display for Generator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Generator::Socket => write!(f, "raw socket, as fast as it goes"),
            Generator::Cloned { pps } => write!(f, "cloned seeds, paced to {pps} frames/s"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_has_a_valid_ipv4_header() {
        let f = udp_frame(
            [2; 6],
            [4; 6],
            "198.18.0.1:1000".parse().unwrap(),
            "198.18.0.2:7700".parse().unwrap(),
            &[9; 10],
        );
        assert_eq!(f.len(), 14 + 20 + 8 + 10);
        let sum: u32 = f[14..34]
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        let folded = (sum & 0xffff) + (sum >> 16);
        assert_eq!(folded, 0xffff, "checksum");
        assert_eq!(&f[36..38], &7700u16.to_be_bytes());
        assert_eq!(&f[38..40], &18u16.to_be_bytes());
    }

    #[test]
    fn due_follows_the_rate() {
        assert_eq!(due(1_000_000, Duration::from_millis(2)), 2_000);
        assert_eq!(due(300_000, Duration::from_secs(10)), 3_000_000);
        assert_eq!(due(u64::MAX, Duration::from_secs(1000)), u64::MAX);
    }
}
