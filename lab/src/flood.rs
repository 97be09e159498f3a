//! A junk flood: one prebuilt Ethernet/IPv4/UDP frame sent over and over from a raw
//! packet socket, in batches of `sendmmsg`, straight to an interface's queue (no socket,
//! routing or qdisc work per datagram), bounded in count and time. On a veth every frame
//! arrives at the peer as its own packet, as on a wire. Used by the junk-filter
//! measurement (`control/tests/xdp_relay.rs`, `measure_junk_flood`).

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
    let fd = sys::packet_socket(ifname)?;
    let until = Instant::now() + secs;
    let mut sent = 0u64;
    while sent < max && Instant::now() < until {
        let n = (max - sent).min(BATCH as u64) as usize;
        sent += sys::send_frame_batch(&fd, frame, n)? as u64;
    }
    Ok(sent)
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
}
