//! The L2 control plane's pure parts: a checked view of ARP packets and the reply an edge
//! writes for a known binding, the Bindings control message (codec), and a token bucket.
//! No I/O, no clock: callers pass `now` and buffers.
//!
//! The Bindings message travels as the plaintext of a Control transport message (0x14)
//! inside an authenticated session; its layout is in `docs/PROTOCOL.md`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::eth::{Mac, ETH_HDR_LEN};
use crate::wire::WireError;

/// EtherType of ARP.
pub const ETHERTYPE_ARP: u16 = 0x0806;
/// Length of an Ethernet frame carrying an IPv4-over-Ethernet ARP packet (unpadded).
pub const ARP_FRAME_LEN: usize = ETH_HDR_LEN + 28;

/// ARP opcodes.
pub const ARP_REQUEST: u16 = 1;
/// ARP reply opcode.
pub const ARP_REPLY: u16 = 2;

/// The fields of an IPv4-over-Ethernet ARP packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Arp {
    /// 1 request, 2 reply.
    pub op: u16,
    /// Sender hardware address.
    pub sha: Mac,
    /// Sender protocol address.
    pub spa: Ipv4Addr,
    /// Target hardware address.
    pub tha: Mac,
    /// Target protocol address.
    pub tpa: Ipv4Addr,
}

/// The EtherType of a frame (no VLAN tags looked through), `None` for a runt.
pub fn ethertype(frame: &[u8]) -> Option<u16> {
    frame.get(12..14).map(|t| u16::from_be_bytes([t[0], t[1]]))
}

fn mac_at(b: &[u8], at: usize) -> Mac {
    let mut m = [0u8; 6];
    m.copy_from_slice(&b[at..at + 6]);
    Mac(m)
}

fn ip_at(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Parses the ARP packet of an Ethernet frame: `None` unless it is ARP for IPv4 over
/// Ethernet (htype 1, ptype 0x0800, lengths 6 and 4) with opcode 1 or 2.
pub fn parse_arp(frame: &[u8]) -> Option<Arp> {
    if frame.len() < ARP_FRAME_LEN || ethertype(frame) != Some(ETHERTYPE_ARP) {
        return None;
    }
    let a = &frame[ETH_HDR_LEN..ARP_FRAME_LEN];
    if a[0..6] != [0, 1, 8, 0, 6, 4] {
        return None;
    }
    let op = u16::from_be_bytes([a[6], a[7]]);
    if op != ARP_REQUEST && op != ARP_REPLY {
        return None;
    }
    Some(Arp {
        op,
        sha: mac_at(a, 8),
        spa: ip_at(a, 14),
        tha: mac_at(a, 18),
        tpa: ip_at(a, 24),
    })
}

/// Writes into `buf` the ARP reply that `owner` (holding `req.tpa`) would send to the
/// requester of `req`; returns its length ([`ARP_FRAME_LEN`]).
pub fn write_arp_reply(req: &Arp, owner: Mac, buf: &mut [u8]) -> Result<usize, WireError> {
    let f = buf.get_mut(..ARP_FRAME_LEN).ok_or(WireError::NoRoom)?;
    f[0..6].copy_from_slice(&req.sha.0);
    f[6..12].copy_from_slice(&owner.0);
    f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
    f[14..20].copy_from_slice(&[0, 1, 8, 0, 6, 4]);
    f[20..22].copy_from_slice(&ARP_REPLY.to_be_bytes());
    f[22..28].copy_from_slice(&owner.0);
    f[28..32].copy_from_slice(&req.tpa.octets());
    f[32..38].copy_from_slice(&req.sha.0);
    f[38..42].copy_from_slice(&req.spa.octets());
    Ok(ARP_FRAME_LEN)
}

/// Version of the control messages (byte 0 of a Control plaintext).
pub const CONTROL_VERSION: u8 = 1;
/// Control message kind: the sender's local bindings.
pub const CONTROL_BINDINGS: u8 = 1;
/// Bindings flag: this message starts a full set (replaces what the sender announced).
pub const BINDINGS_FULL: u8 = 1;
/// Most entries in one Bindings message (keeps it under 1300 bytes).
pub const MAX_BINDINGS: usize = 120;
/// Fixed part of a Bindings message.
pub const BINDINGS_HDR_LEN: usize = 4;
/// Length of one entry: MAC (6) and IPv4 address (4, 0.0.0.0 = none known).
pub const BINDING_LEN: usize = 10;

/// One binding: a MAC and, when known, its IPv4 address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding {
    /// The VM's MAC.
    pub mac: Mac,
    /// Its IPv4 address, when known.
    pub ip: Option<Ipv4Addr>,
}

/// A Bindings control message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bindings {
    /// Starts a full set: the receiver forgets what the sender announced before.
    pub full: bool,
    /// At most [`MAX_BINDINGS`] entries.
    pub entries: Vec<Binding>,
}

impl Bindings {
    /// Encoded length.
    pub fn len(&self) -> usize {
        BINDINGS_HDR_LEN + self.entries.len() * BINDING_LEN
    }

    /// No entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Writes the message into `buf`; returns its length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        if self.entries.len() > MAX_BINDINGS {
            return Err(WireError::Malformed);
        }
        let n = self.len();
        let b = buf.get_mut(..n).ok_or(WireError::NoRoom)?;
        b[..BINDINGS_HDR_LEN].copy_from_slice(&[
            CONTROL_VERSION,
            CONTROL_BINDINGS,
            if self.full { BINDINGS_FULL } else { 0 },
            self.entries.len() as u8,
        ]);
        for (e, c) in self
            .entries
            .iter()
            .zip(b[BINDINGS_HDR_LEN..].chunks_exact_mut(BINDING_LEN))
        {
            c[..6].copy_from_slice(&e.mac.0);
            c[6..].copy_from_slice(&e.ip.unwrap_or(Ipv4Addr::UNSPECIFIED).octets());
        }
        Ok(n)
    }

    /// Parses a whole control plaintext: another version or kind is `BadVersion` /
    /// `UnknownType`, unknown flags, group MACs or a count over [`MAX_BINDINGS`] are
    /// `Malformed`, a length that does not match the count `Truncated` / `Trailing`.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let h = b.get(..BINDINGS_HDR_LEN).ok_or(WireError::Truncated)?;
        if h[0] != CONTROL_VERSION {
            return Err(WireError::BadVersion);
        }
        if h[1] != CONTROL_BINDINGS {
            return Err(WireError::UnknownType);
        }
        if h[2] & !BINDINGS_FULL != 0 {
            return Err(WireError::Malformed);
        }
        let n = usize::from(h[3]);
        if n > MAX_BINDINGS {
            return Err(WireError::Malformed);
        }
        let end = BINDINGS_HDR_LEN + n * BINDING_LEN;
        if b.len() < end {
            return Err(WireError::Truncated);
        }
        if b.len() > end {
            return Err(WireError::Trailing);
        }
        let mut entries = Vec::with_capacity(n);
        for c in b[BINDINGS_HDR_LEN..end].chunks_exact(BINDING_LEN) {
            let mac = mac_at(c, 0);
            if mac.is_group() {
                return Err(WireError::Malformed);
            }
            let ip = ip_at(c, 6);
            entries.push(Binding {
                mac,
                ip: (!ip.is_unspecified()).then_some(ip),
            });
        }
        Ok(Self {
            full: h[2] & BINDINGS_FULL != 0,
            entries,
        })
    }
}

/// A token bucket counting frames: `rate` per second, at most `burst` saved up.
#[derive(Clone, Copy, Debug)]
pub struct TokenBucket {
    /// Tokens in millionths of a frame.
    micro: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(burst: u32, now: Instant) -> Self {
        Self {
            micro: u64::from(burst) * 1_000_000,
            last: now,
        }
    }

    /// Takes one token if there is one (after refilling for the time since the last
    /// call); false when the frame is over the limit.
    pub fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        let dt = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        let cap = u64::from(burst) * 1_000_000;
        let add =
            (dt.min(Duration::from_secs(3600)).as_micros() as u64).saturating_mul(u64::from(rate));
        self.micro = self.micro.saturating_add(add).min(cap);
        if self.micro >= 1_000_000 {
            self.micro -= 1_000_000;
            true
        } else {
            false
        }
    }

    /// Whether the bucket is full again by `now` (an idle sender: its entry can go).
    pub fn full_at(&self, now: Instant, rate: u32, burst: u32) -> bool {
        let dt = now.saturating_duration_since(self.last);
        let add =
            (dt.min(Duration::from_secs(3600)).as_micros() as u64).saturating_mul(u64::from(rate));
        self.micro.saturating_add(add) >= u64::from(burst) * 1_000_000
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(sha: Mac, spa: [u8; 4], tpa: [u8; 4]) -> Vec<u8> {
        let mut f = vec![0u8; 60];
        f[0..6].copy_from_slice(&[0xff; 6]);
        f[6..12].copy_from_slice(&sha.0);
        f[12..14].copy_from_slice(&[8, 6]);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&sha.0);
        f[28..32].copy_from_slice(&spa);
        f[38..42].copy_from_slice(&tpa);
        f
    }

    #[test]
    fn arp_request_and_reply() {
        let vm = Mac([2, 0, 0, 0, 0, 1]);
        let f = request(vm, [198, 19, 0, 1], [198, 19, 0, 2]);
        let a = parse_arp(&f).unwrap();
        assert_eq!(a.op, ARP_REQUEST);
        assert_eq!(a.sha, vm);
        assert_eq!(a.spa, Ipv4Addr::new(198, 19, 0, 1));
        assert_eq!(a.tpa, Ipv4Addr::new(198, 19, 0, 2));
        let owner = Mac([2, 0, 0, 0, 0, 2]);
        let mut buf = [0u8; 64];
        let n = write_arp_reply(&a, owner, &mut buf).unwrap();
        let r = parse_arp(&buf[..n]).unwrap();
        assert_eq!(r.op, ARP_REPLY);
        assert_eq!((r.sha, r.spa, r.tha, r.tpa), (owner, a.tpa, vm, a.spa));
        assert_eq!(&buf[..6], &vm.0);
        // Not ARP for IPv4 over Ethernet, or cut short: not parsed.
        let mut g = f.clone();
        g[16] = 0x86;
        assert!(parse_arp(&g).is_none());
        assert!(parse_arp(&f[..41]).is_none());
        assert!(write_arp_reply(&a, owner, &mut buf[..41]).is_err());
    }

    #[test]
    fn bindings_roundtrip_and_rejects() {
        let m = Bindings {
            full: true,
            entries: vec![
                Binding {
                    mac: Mac([2, 0, 0, 0, 0, 1]),
                    ip: Some(Ipv4Addr::new(198, 19, 1, 1)),
                },
                Binding {
                    mac: Mac([2, 0, 0, 0, 0, 2]),
                    ip: None,
                },
            ],
        };
        let mut buf = [0u8; 2048];
        let n = m.encode(&mut buf).unwrap();
        assert_eq!(n, 24);
        assert_eq!(Bindings::decode(&buf[..n]).unwrap(), m);
        assert_eq!(Bindings::decode(&buf[..n - 1]), Err(WireError::Truncated));
        assert_eq!(Bindings::decode(&buf[..n + 1]), Err(WireError::Trailing));
        let mut b = buf;
        b[0] = 2;
        assert_eq!(Bindings::decode(&b[..n]), Err(WireError::BadVersion));
        let mut b = buf;
        b[1] = 9;
        assert_eq!(Bindings::decode(&b[..n]), Err(WireError::UnknownType));
        let mut b = buf;
        b[2] = 2;
        assert_eq!(Bindings::decode(&b[..n]), Err(WireError::Malformed));
        let mut b = buf;
        b[4] = 1; // group MAC
        assert_eq!(Bindings::decode(&b[..n]), Err(WireError::Malformed));
        assert!(m.encode(&mut buf[..23]).is_err());
        let big = Bindings {
            full: false,
            entries: vec![m.entries[0]; MAX_BINDINGS + 1],
        };
        assert_eq!(big.encode(&mut buf), Err(WireError::Malformed));
        let max = Bindings {
            full: false,
            entries: vec![m.entries[0]; MAX_BINDINGS],
        };
        let n = max.encode(&mut buf).unwrap();
        assert!(n <= 1300);
        assert_eq!(Bindings::decode(&buf[..n]).unwrap(), max);
    }

    #[test]
    fn bucket_caps_and_refills() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(5, t0);
        assert_eq!((0..10).filter(|_| b.take(t0, 10, 5)).count(), 5);
        // 10 per second: one more after 100 ms, never more than the burst.
        assert!(b.take(t0 + Duration::from_millis(100), 10, 5));
        assert!(!b.take(t0 + Duration::from_millis(100), 10, 5));
        let later = t0 + Duration::from_secs(60);
        assert!(b.full_at(later, 10, 5));
        assert_eq!((0..10).filter(|_| b.take(later, 10, 5)).count(), 5);
    }
}
