//! The L2 control plane's pure parts: a checked view of ARP packets and the reply an edge
//! writes for a known binding, the control messages (codec: Bindings, Bindings6, Groups),
//! and a token bucket; neighbour discovery, IGMP/MLD and DHCP in `frames`.
//! No I/O, no clock: callers pass `now` and buffers.
//!
//! The control messages travel as the plaintext of a Control transport message (0x14)
//! inside an authenticated session; their layout is in `docs/PROTOCOL.md`.

use std::net::{Ipv4Addr, Ipv6Addr};

mod frames;
pub use frames::*;
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
        let n = self.entries.len();
        let flags = if self.full { BINDINGS_FULL } else { 0 };
        let b = control_head(buf, CONTROL_BINDINGS, flags, n, MAX_BINDINGS, BINDING_LEN)?;
        for (e, c) in self.entries.iter().zip(b.chunks_exact_mut(BINDING_LEN)) {
            c[..6].copy_from_slice(&e.mac.0);
            c[6..].copy_from_slice(&e.ip.unwrap_or(Ipv4Addr::UNSPECIFIED).octets());
        }
        Ok(self.len())
    }

    /// Parses a whole control plaintext: another version or kind is `BadVersion` /
    /// `UnknownType`, unknown flags, group MACs or a count over [`MAX_BINDINGS`] are
    /// `Malformed`, a length that does not match the count `Truncated` / `Trailing`.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let (flags, n, body) = control_body(
            b,
            CONTROL_BINDINGS,
            BINDINGS_FULL,
            MAX_BINDINGS,
            BINDING_LEN,
        )?;
        let mut entries = Vec::with_capacity(n);
        for c in body.chunks_exact(BINDING_LEN) {
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
            full: flags & BINDINGS_FULL != 0,
            entries,
        })
    }
}

/// Control message kind: the sender's local IPv6 bindings.
pub const CONTROL_BINDINGS6: u8 = 2;
/// Control message kind: the multicast groups the sender's VMs are members of.
pub const CONTROL_GROUPS: u8 = 3;
/// Most entries in one Bindings6 message (keeps it under 1300 bytes).
pub const MAX_BINDINGS6: usize = 56;
/// Length of one Bindings6 entry: MAC (6) and IPv6 address (16).
pub const BINDING6_LEN: usize = 22;
/// Groups flag: the sender wants every multicast frame (more groups than one message
/// holds); no entries follow.
pub const GROUPS_ALL: u8 = 2;
/// Most groups in one Groups message.
pub const MAX_GROUPS: usize = 200;

/// One IPv6 binding: a MAC and one of its addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Binding6 {
    /// The VM's MAC.
    pub mac: Mac,
    /// One of its IPv6 addresses (unicast).
    pub ip: Ipv6Addr,
}

/// A Bindings6 control message (a MAC with several addresses has several entries).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bindings6 {
    /// Starts a full set: the receiver forgets the IPv6 addresses the sender announced
    /// before.
    pub full: bool,
    /// At most [`MAX_BINDINGS6`] entries.
    pub entries: Vec<Binding6>,
}

/// A Groups control message: always the sender's full set of group MACs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Groups {
    /// The sender wants every multicast frame (then `groups` is empty).
    pub all: bool,
    /// Group MACs (IPv4 or IPv6 multicast) with members behind the sender, at most
    /// [`MAX_GROUPS`].
    pub groups: Vec<Mac>,
}

/// A control message of any kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    /// MAC and IPv4 bindings.
    Bindings(Bindings),
    /// IPv6 bindings.
    Bindings6(Bindings6),
    /// Multicast membership.
    Groups(Groups),
}

/// Checks the common header of a control message and the length its count implies:
/// returns (flags, count, entries).
fn control_body(
    b: &[u8],
    kind: u8,
    flags: u8,
    max: usize,
    entry: usize,
) -> Result<(u8, usize, &[u8]), WireError> {
    let h = b.get(..BINDINGS_HDR_LEN).ok_or(WireError::Truncated)?;
    if h[0] != CONTROL_VERSION {
        return Err(WireError::BadVersion);
    }
    if h[1] != kind {
        return Err(WireError::UnknownType);
    }
    if h[2] & !flags != 0 {
        return Err(WireError::Malformed);
    }
    let n = usize::from(h[3]);
    if n > max {
        return Err(WireError::Malformed);
    }
    let end = BINDINGS_HDR_LEN + n * entry;
    if b.len() < end {
        return Err(WireError::Truncated);
    }
    if b.len() > end {
        return Err(WireError::Trailing);
    }
    Ok((h[2], n, &b[BINDINGS_HDR_LEN..end]))
}

/// Writes a control header and reserves `n * entry` bytes after it.
fn control_head(
    buf: &mut [u8],
    kind: u8,
    flags: u8,
    n: usize,
    max: usize,
    entry: usize,
) -> Result<&mut [u8], WireError> {
    if n > max {
        return Err(WireError::Malformed);
    }
    let b = buf
        .get_mut(..BINDINGS_HDR_LEN + n * entry)
        .ok_or(WireError::NoRoom)?;
    b[..BINDINGS_HDR_LEN].copy_from_slice(&[CONTROL_VERSION, kind, flags, n as u8]);
    Ok(&mut b[BINDINGS_HDR_LEN..])
}

fn bad_ip6(ip: &Ipv6Addr) -> bool {
    ip.is_unspecified() || ip.is_multicast() || ip.is_loopback()
}

impl Bindings6 {
    /// Writes the message into `buf`; returns its length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        let n = self.entries.len();
        let flags = if self.full { BINDINGS_FULL } else { 0 };
        let b = control_head(
            buf,
            CONTROL_BINDINGS6,
            flags,
            n,
            MAX_BINDINGS6,
            BINDING6_LEN,
        )?;
        for (e, c) in self.entries.iter().zip(b.chunks_exact_mut(BINDING6_LEN)) {
            c[..6].copy_from_slice(&e.mac.0);
            c[6..].copy_from_slice(&e.ip.octets());
        }
        Ok(BINDINGS_HDR_LEN + n * BINDING6_LEN)
    }

    /// Parses a whole control plaintext of kind 2; group MACs and addresses that are
    /// unspecified, multicast or loopback are `Malformed`.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let (flags, n, body) = control_body(
            b,
            CONTROL_BINDINGS6,
            BINDINGS_FULL,
            MAX_BINDINGS6,
            BINDING6_LEN,
        )?;
        let mut entries = Vec::with_capacity(n);
        for c in body.chunks_exact(BINDING6_LEN) {
            let mac = mac_at(c, 0);
            let mut a = [0u8; 16];
            a.copy_from_slice(&c[6..]);
            let ip = Ipv6Addr::from(a);
            if mac.is_group() || bad_ip6(&ip) {
                return Err(WireError::Malformed);
            }
            entries.push(Binding6 { mac, ip });
        }
        Ok(Self {
            full: flags & BINDINGS_FULL != 0,
            entries,
        })
    }
}

impl Groups {
    /// Writes the message into `buf`; returns its length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        if self.all && !self.groups.is_empty() {
            return Err(WireError::Malformed);
        }
        let n = self.groups.len();
        let flags = if self.all { GROUPS_ALL } else { 0 };
        let b = control_head(buf, CONTROL_GROUPS, flags, n, MAX_GROUPS, 6)?;
        for (g, c) in self.groups.iter().zip(b.chunks_exact_mut(6)) {
            c.copy_from_slice(&g.0);
        }
        Ok(BINDINGS_HDR_LEN + n * 6)
    }

    /// Parses a whole control plaintext of kind 3; entries that are not group MACs, the
    /// broadcast MAC, or entries with the "all" flag are `Malformed`.
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let (flags, n, body) = control_body(b, CONTROL_GROUPS, GROUPS_ALL, MAX_GROUPS, 6)?;
        let all = flags & GROUPS_ALL != 0;
        if all && n > 0 {
            return Err(WireError::Malformed);
        }
        let mut groups = Vec::with_capacity(n);
        for c in body.chunks_exact(6) {
            let g = mac_at(c, 0);
            if !g.is_group() || g.0 == [0xff; 6] {
                return Err(WireError::Malformed);
            }
            groups.push(g);
        }
        Ok(Self { all, groups })
    }
}

impl Control {
    /// Parses a whole control plaintext of any known kind; another version is
    /// `BadVersion`, another kind `UnknownType` (an edge counts and drops it).
    pub fn decode(b: &[u8]) -> Result<Self, WireError> {
        let h = b.get(..2).ok_or(WireError::Truncated)?;
        if h[0] != CONTROL_VERSION {
            return Err(WireError::BadVersion);
        }
        match h[1] {
            CONTROL_BINDINGS => Bindings::decode(b).map(Self::Bindings),
            CONTROL_BINDINGS6 => Bindings6::decode(b).map(Self::Bindings6),
            CONTROL_GROUPS => Groups::decode(b).map(Self::Groups),
            _ => Err(WireError::UnknownType),
        }
    }

    /// Writes the message into `buf`; returns its length.
    pub fn encode(&self, buf: &mut [u8]) -> Result<usize, WireError> {
        match self {
            Self::Bindings(m) => m.encode(buf),
            Self::Bindings6(m) => m.encode(buf),
            Self::Groups(m) => m.encode(buf),
        }
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
            micro: u64::from(burst).saturating_mul(1_000_000),
            last: now,
        }
    }

    /// Takes one token if there is one (after refilling for the time since the last
    /// call); false when the frame is over the limit.
    pub fn take(&mut self, now: Instant, rate: u32, burst: u32) -> bool {
        self.take_n(now, rate, burst, 1)
    }

    /// Takes `n` tokens (bytes, for a bucket of bytes) if there are that many; false
    /// (nothing taken) when there are not.
    pub fn take_n(&mut self, now: Instant, rate: u32, burst: u32, n: u32) -> bool {
        let dt = now.saturating_duration_since(self.last);
        self.last = self.last.max(now);
        let cap = u64::from(burst).saturating_mul(1_000_000);
        let add =
            (dt.min(Duration::from_secs(3600)).as_micros() as u64).saturating_mul(u64::from(rate));
        self.micro = self.micro.saturating_add(add).min(cap);
        let need = u64::from(n) * 1_000_000;
        if self.micro >= need {
            self.micro -= need;
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
        self.micro.saturating_add(add) >= u64::from(burst).saturating_mul(1_000_000)
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
    fn bindings6_and_groups_roundtrip_and_rejects() {
        let mut buf = [0u8; 2048];
        let m = Control::Bindings6(Bindings6 {
            full: true,
            entries: vec![Binding6 {
                mac: Mac([2, 0, 0, 0, 0, 1]),
                ip: "fe80::1".parse().unwrap(),
            }],
        });
        let n = m.encode(&mut buf).unwrap();
        assert_eq!(n, 4 + BINDING6_LEN);
        assert_eq!(Control::decode(&buf[..n]).unwrap(), m);
        assert_eq!(Control::decode(&buf[..n - 1]), Err(WireError::Truncated));
        let mut b = buf;
        b[10] = 0xff; // a multicast address
        assert_eq!(Control::decode(&b[..n]), Err(WireError::Malformed));
        let max = Bindings6 {
            full: false,
            entries: vec![
                Binding6 {
                    mac: Mac([2, 0, 0, 0, 0, 1]),
                    ip: "fe80::1".parse().unwrap(),
                };
                MAX_BINDINGS6
            ],
        };
        let n = max.encode(&mut buf).unwrap();
        assert!(n <= 1300);
        let mut over = max.clone();
        over.entries.push(over.entries[0]);
        assert_eq!(over.encode(&mut buf), Err(WireError::Malformed));

        let g = Control::Groups(Groups {
            all: false,
            groups: vec![Mac([1, 0, 0x5e, 1, 2, 3]), Mac([0x33, 0x33, 0, 0, 0, 0x42])],
        });
        let n = g.encode(&mut buf).unwrap();
        assert_eq!(n, 16);
        assert_eq!(Control::decode(&buf[..n]).unwrap(), g);
        assert_eq!(Control::decode(&buf[..n + 1]), Err(WireError::Trailing));
        let mut b = buf;
        b[4] = 2; // not a group MAC
        assert_eq!(Control::decode(&b[..n]), Err(WireError::Malformed));
        let mut b = buf;
        b[2] = GROUPS_ALL; // "all" with entries
        assert_eq!(Control::decode(&b[..n]), Err(WireError::Malformed));
        let all = Control::Groups(Groups {
            all: true,
            groups: vec![],
        });
        let n = all.encode(&mut buf).unwrap();
        assert_eq!(Control::decode(&buf[..n]).unwrap(), all);
        // The kind-1 message still decodes through Control; unknown kinds do not.
        let v4 = Control::Bindings(Bindings {
            full: false,
            entries: vec![],
        });
        let n = v4.encode(&mut buf).unwrap();
        assert_eq!(Control::decode(&buf[..n]).unwrap(), v4);
        assert_eq!(Control::decode(&[1, 9, 0, 0]), Err(WireError::UnknownType));
        assert_eq!(Control::decode(&[2, 1, 0, 0]), Err(WireError::BadVersion));
        assert_eq!(Control::decode(&[1]), Err(WireError::Truncated));
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
        // A bucket of bytes: 1000 per second, 1500 at once.
        let mut b = TokenBucket::new(1500, t0);
        assert!(b.take_n(t0, 1000, 1500, 1400));
        assert!(!b.take_n(t0, 1000, 1500, 1400));
        assert!(b.take_n(t0, 1000, 1500, 100));
        assert!(b.take_n(t0 + Duration::from_millis(1400), 1000, 1500, 1400));
        // Rates and bursts far beyond u32 bytes per microsecond saturate, never wrap.
        let mut b = TokenBucket::new(u32::MAX, t0);
        assert!(b.take_n(t0 + Duration::from_secs(7200), u32::MAX, u32::MAX, u32::MAX));
    }
}
