//! Checked views of the frames the L2 control plane looks into besides ARP: IPv6
//! neighbour discovery (solicitations and advertisements) and the advertisement an edge
//! writes for a known binding, IGMP and MLD membership reports, DHCP acknowledgements.
//!
//! Every parser checks the Ethernet, IP and message lengths against the frame before it
//! reads a field; ICMPv6 and IGMP checksums are verified (they are computed in software
//! by senders), a DHCP message's UDP checksum is not (it may be left to an offload).
//! Anything that does not parse is `None`: the frame is then forwarded as it is.

use std::net::{Ipv4Addr, Ipv6Addr};

use crate::eth::{Mac, ETH_HDR_LEN};
use crate::offload::{csum_add, csum_fold};
use crate::wire::WireError;

use super::{ethertype, ip_at, mac_at, ETHERTYPE_ARP};

/// EtherType of IPv4.
pub const ETHERTYPE_IPV4: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETHERTYPE_IPV6: u16 = 0x86dd;

const IPV6_HDR_LEN: usize = 40;
const NH_HOP_BY_HOP: u8 = 0;
const NH_ICMPV6: u8 = 58;
const PROTO_IGMP: u8 = 2;
const PROTO_UDP: u8 = 17;
const ICMP6_MLD1_REPORT: u8 = 131;
const ICMP6_MLD1_DONE: u8 = 132;
const ICMP6_NS: u8 = 135;
const ICMP6_NA: u8 = 136;
const ICMP6_MLD2_REPORT: u8 = 143;
/// Fixed part of a neighbour solicitation or advertisement (type to target address).
const ND_LEN: usize = 24;
/// NA flags.
const NA_SOLICITED: u8 = 0x40;
const NA_OVERRIDE: u8 = 0x20;
/// Length of the advertisement frame [`write_na`] writes (Ethernet, IPv6, NA with a
/// target link-layer address option).
pub const NA_FRAME_LEN: usize = ETH_HDR_LEN + IPV6_HDR_LEN + ND_LEN + 8;

/// Whether the control plane needs to look into a frame: ARP, ICMPv6 (possibly behind
/// a hop-by-hop header), IGMP, and UDP from port 67 or 68 (DHCP servers and clients). A few byte
/// comparisons; everything else is switched without a look.
pub fn worth_a_look(frame: &[u8]) -> bool {
    match ethertype(frame) {
        Some(ETHERTYPE_ARP) => true,
        Some(ETHERTYPE_IPV6) => matches!(frame.get(20), Some(&NH_ICMPV6) | Some(&NH_HOP_BY_HOP)),
        Some(ETHERTYPE_IPV4) => match frame.get(23) {
            Some(&PROTO_IGMP) => true,
            Some(&PROTO_UDP) => {
                let ihl = usize::from(frame[14] & 0x0f) * 4;
                matches!(
                    frame.get(ETH_HDR_LEN + ihl..ETH_HDR_LEN + ihl + 2),
                    Some(&[0, 67]) | Some(&[0, 68])
                )
            }
            _ => false,
        },
        _ => false,
    }
}

/// A neighbour solicitation (`advert` false) or advertisement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Nd {
    /// An advertisement (136) rather than a solicitation (135).
    pub advert: bool,
    /// IPv6 source (unspecified for duplicate address detection).
    pub src: Ipv6Addr,
    /// IPv6 destination.
    pub dst: Ipv6Addr,
    /// The address asked for or advertised.
    pub target: Ipv6Addr,
    /// The source (solicitation) or target (advertisement) link-layer address option.
    pub lladdr: Option<Mac>,
    /// Advertisement flags: an answer to a solicitation, and whether it overrides.
    pub solicited: bool,
    /// Advertisement override flag.
    pub override_: bool,
}

impl Nd {
    /// A solicitation sent for duplicate address detection (from the unspecified
    /// address): the target is the sender's tentative address.
    pub fn is_dad(&self) -> bool {
        !self.advert && self.src.is_unspecified()
    }
}

fn ip6_at(b: &[u8], at: usize) -> Ipv6Addr {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Ipv6Addr::from(a)
}

/// The ones-complement sum of the ICMPv6 pseudo-header.
fn pseudo6(src: &[u8], dst: &[u8], len: usize) -> u64 {
    let mut s = csum_add(0, src);
    s = csum_add(s, dst);
    s = csum_add(s, &(len as u32).to_be_bytes());
    csum_add(s, &[0, 0, 0, NH_ICMPV6])
}

/// The ICMPv6 message of an IPv6 frame (after at most one hop-by-hop header), with
/// its checksum verified: (IPv6 header, message).
fn icmp6(frame: &[u8]) -> Option<(&[u8], &[u8])> {
    if ethertype(frame) != Some(ETHERTYPE_IPV6) {
        return None;
    }
    let ip = frame.get(ETH_HDR_LEN..ETH_HDR_LEN + IPV6_HDR_LEN)?;
    if ip[0] >> 4 != 6 {
        return None;
    }
    let plen = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
    let payload = frame.get(ETH_HDR_LEN + IPV6_HDR_LEN..ETH_HDR_LEN + IPV6_HDR_LEN + plen)?;
    let msg = match ip[6] {
        NH_ICMPV6 => payload,
        NH_HOP_BY_HOP => {
            let h = payload.get(..2)?;
            let hl = (usize::from(h[1]) + 1) * 8;
            if h[0] != NH_ICMPV6 {
                return None;
            }
            payload.get(hl..)?
        }
        _ => return None,
    };
    if msg.len() < 8 {
        return None;
    }
    let sum = csum_add(pseudo6(&ip[8..24], &ip[24..40], msg.len()), msg);
    (csum_fold(sum) == 0xffff).then_some((ip, msg))
}

/// Parses a neighbour solicitation or advertisement: `None` unless the frame is IPv6
/// with hop limit 255, ICMPv6 type 135 or 136 with code 0, a right checksum, a unicast
/// target, and well-formed options.
pub fn parse_nd(frame: &[u8]) -> Option<Nd> {
    let (ip, m) = icmp6(frame)?;
    if ip[6] != NH_ICMPV6 || ip[7] != 255 || m.len() < ND_LEN || m[1] != 0 {
        return None;
    }
    let advert = match m[0] {
        ICMP6_NS => false,
        ICMP6_NA => true,
        _ => return None,
    };
    let target = ip6_at(m, 8);
    if target.is_multicast() || target.is_unspecified() {
        return None;
    }
    let want = if advert { 2 } else { 1 };
    let mut lladdr = None;
    let mut opts = &m[ND_LEN..];
    while !opts.is_empty() {
        let (t, l) = (opts[0], usize::from(*opts.get(1)?) * 8);
        if l == 0 {
            return None;
        }
        let o = opts.get(..l)?;
        if t == want && l == 8 {
            lladdr = Some(mac_at(o, 2));
        }
        opts = &opts[l..];
    }
    Some(Nd {
        advert,
        src: ip6_at(ip, 8),
        dst: ip6_at(ip, 24),
        target,
        lladdr,
        solicited: advert && m[4] & NA_SOLICITED != 0,
        override_: advert && m[4] & NA_OVERRIDE != 0,
    })
}

/// Writes into `buf` the neighbour advertisement `owner` (holding `ns.target`) would
/// send to `requester` in answer to the solicitation `ns`; returns its length
/// ([`NA_FRAME_LEN`]). A solicitation for duplicate address detection is answered to
/// all nodes (ff02::1), not solicited; any other is answered to its sender.
pub fn write_na(ns: &Nd, requester: Mac, owner: Mac, buf: &mut [u8]) -> Result<usize, WireError> {
    let f = buf.get_mut(..NA_FRAME_LEN).ok_or(WireError::NoRoom)?;
    let (dst_mac, dst, flags) = if ns.src.is_unspecified() {
        (
            Mac([0x33, 0x33, 0, 0, 0, 1]),
            Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1),
            NA_OVERRIDE,
        )
    } else {
        (requester, ns.src, NA_SOLICITED | NA_OVERRIDE)
    };
    let (eth, rest) = f.split_at_mut(ETH_HDR_LEN);
    eth[0..6].copy_from_slice(&dst_mac.0);
    eth[6..12].copy_from_slice(&owner.0);
    eth[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    let (ip, m) = rest.split_at_mut(IPV6_HDR_LEN);
    ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    ip[4..6].copy_from_slice(&((ND_LEN + 8) as u16).to_be_bytes());
    ip[6] = NH_ICMPV6;
    ip[7] = 255;
    ip[8..24].copy_from_slice(&ns.target.octets());
    ip[24..40].copy_from_slice(&dst.octets());
    m[0..8].copy_from_slice(&[ICMP6_NA, 0, 0, 0, flags, 0, 0, 0]);
    m[8..24].copy_from_slice(&ns.target.octets());
    m[24..26].copy_from_slice(&[2, 1]);
    m[26..32].copy_from_slice(&owner.0);
    let sum = csum_add(pseudo6(&ip[8..24], &ip[24..40], m.len()), m);
    m[2..4].copy_from_slice(&(!csum_fold(sum)).to_be_bytes());
    Ok(NA_FRAME_LEN)
}

/// The MAC an IPv4 multicast group is sent to (01:00:5e and its low 23 bits).
pub fn group_mac_v4(g: Ipv4Addr) -> Mac {
    let o = g.octets();
    Mac([0x01, 0x00, 0x5e, o[1] & 0x7f, o[2], o[3]])
}

/// The MAC an IPv6 multicast group is sent to (33:33 and its low 32 bits).
pub fn group_mac_v6(g: Ipv6Addr) -> Mac {
    let o = g.octets();
    Mac([0x33, 0x33, o[12], o[13], o[14], o[15]])
}

/// Whether frames to group MAC `m` follow membership: IPv4 and IPv6 multicast MACs,
/// except those that link-local groups map to (224.0.0.x, ff0X::/112 well-known groups
/// such as ff02::1, and solicited-node groups), which every site gets. Broadcast and
/// other group MACs (no membership protocol) are flooded.
pub fn follows_membership(m: Mac) -> bool {
    match m.0 {
        [0x01, 0x00, 0x5e, a, b, _] => !(a & 0x7f == 0 && b == 0),
        [0x33, 0x33, a, b, c, _] => !(a == 0xff || (a == 0 && b == 0 && c == 0)),
        _ => false,
    }
}

/// A change of a group's membership reported by a host.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Report {
    /// The group's MAC.
    pub group: Mac,
    /// A join (or a report of membership); false for a leave.
    pub join: bool,
}

/// What a group record of an IGMPv3 or MLDv2 report means: `Some(true)` a member
/// (exclude mode, or include with sources), `Some(false)` no longer one (include with
/// no source), `None` no change of membership (allow/block of sources).
fn record_join(rtype: u8, sources: usize) -> Option<bool> {
    match rtype {
        2 | 4 => Some(true),
        1 | 3 | 5 if sources > 0 => Some(true),
        1 | 3 => Some(false),
        _ => None,
    }
}

/// Parses the membership reports of an IGMP (v1, v2, v3) or MLD (v1, v2) message and
/// calls `f` for each group that is not link-local (those flood anyway); false when the
/// frame is no such report (then nothing was called). At most `max` records are read.
pub fn parse_reports(frame: &[u8], max: usize, mut f: impl FnMut(Report)) -> bool {
    match ethertype(frame) {
        Some(ETHERTYPE_IPV4) => igmp_reports(frame, max, &mut f).is_some(),
        Some(ETHERTYPE_IPV6) => mld_reports(frame, max, &mut f).is_some(),
        _ => false,
    }
}

fn emit(f: &mut impl FnMut(Report), group: Mac, join: bool) {
    if follows_membership(group) {
        f(Report { group, join });
    }
}

fn igmp_reports(frame: &[u8], max: usize, f: &mut impl FnMut(Report)) -> Option<()> {
    let ip = frame.get(ETH_HDR_LEN..ETH_HDR_LEN + 20)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ip[9] != PROTO_IGMP || ihl < 20 || total < ihl {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None; // a fragment
    }
    let m = frame.get(ETH_HDR_LEN + ihl..ETH_HDR_LEN + total)?;
    if m.len() < 8 || csum_fold(csum_add(0, m)) != 0xffff {
        return None;
    }
    let group = |at: usize| -> Option<Ipv4Addr> {
        let g = ip_at(m.get(at..at + 4)?, 0);
        g.is_multicast().then_some(g)
    };
    match m[0] {
        0x12 | 0x16 => emit(f, group_mac_v4(group(4)?), true),
        0x17 => emit(f, group_mac_v4(group(4)?), false),
        0x22 => {
            let n = usize::from(u16::from_be_bytes([m[6], m[7]]));
            let mut at = 8;
            for _ in 0..n.min(max) {
                let r = m.get(at..at + 8)?;
                let sources = usize::from(u16::from_be_bytes([r[2], r[3]]));
                let next = at + 8 + sources * 4 + usize::from(r[1]) * 4;
                m.get(at..next)?;
                if let (Some(g), Some(join)) = (group(at + 4), record_join(r[0], sources)) {
                    emit(f, group_mac_v4(g), join);
                }
                at = next;
            }
        }
        _ => return None,
    }
    Some(())
}

fn mld_reports(frame: &[u8], max: usize, f: &mut impl FnMut(Report)) -> Option<()> {
    let (_, m) = icmp6(frame)?;
    let group = |at: usize| -> Option<Ipv6Addr> {
        let b = m.get(at..at + 16)?;
        let g = ip6_at(b, 0);
        g.is_multicast().then_some(g)
    };
    match m[0] {
        ICMP6_MLD1_REPORT => emit(f, group_mac_v6(group(8)?), true),
        ICMP6_MLD1_DONE => emit(f, group_mac_v6(group(8)?), false),
        ICMP6_MLD2_REPORT => {
            let n = usize::from(u16::from_be_bytes([m[6], m[7]]));
            let mut at = 8;
            for _ in 0..n.min(max) {
                let r = m.get(at..at + 20)?;
                let sources = usize::from(u16::from_be_bytes([r[2], r[3]]));
                let next = at + 20 + sources * 16 + usize::from(r[1]) * 4;
                m.get(at..next)?;
                if let (Some(g), Some(join)) = (group(at + 4), record_join(r[0], sources)) {
                    emit(f, group_mac_v6(g), join);
                }
                at = next;
            }
        }
        _ => return None,
    }
    Some(())
}

/// A DHCP acknowledgement: the client's hardware address and the address it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DhcpAck {
    /// The client's MAC (`chaddr`).
    pub client: Mac,
    /// The leased address (`yiaddr`).
    pub addr: Ipv4Addr,
}

const BOOTP_MAGIC: [u8; 4] = [99, 130, 83, 99];
const DHCP_ACK: u8 = 5;

/// The BOOTP message of a DHCP frame (IPv4, not a fragment, UDP between ports 67 and
/// 68, op 1 from 68 or 2 from 67, Ethernet hardware addresses, the DHCP magic cookie).
fn bootp(frame: &[u8]) -> Option<&[u8]> {
    if ethertype(frame) != Some(ETHERTYPE_IPV4) {
        return None;
    }
    let ip = frame.get(ETH_HDR_LEN..ETH_HDR_LEN + 20)?;
    let ihl = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ip[9] != PROTO_UDP || ihl < 20 || total < ihl + 8 {
        return None;
    }
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
        return None;
    }
    let udp = frame.get(ETH_HDR_LEN + ihl..ETH_HDR_LEN + total)?;
    let op = match udp[0..4] {
        [0, 67, 0, 68] => 2,
        [0, 68, 0, 67] => 1,
        _ => return None,
    };
    let b = &udp[8..];
    if b.len() < 240 || b[0] != op || b[1] != 1 || b[2] != 6 || b[236..240] != BOOTP_MAGIC {
        return None;
    }
    Some(b)
}

/// Which way a DHCP message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DhcpWay {
    /// From a client to the servers (port 68 to 67).
    FromClient,
    /// From a server to the client with this hardware address (port 67 to 68).
    FromServer(Mac),
}

/// Which way a DHCP message goes, `None` for a frame that is not one.
pub fn dhcp_way(frame: &[u8]) -> Option<DhcpWay> {
    let b = bootp(frame)?;
    Some(if b[0] == 1 {
        DhcpWay::FromClient
    } else {
        DhcpWay::FromServer(mac_at(b, 28))
    })
}

/// Parses a DHCPACK (a BOOTREPLY from UDP port 67 to 68 for Ethernet hardware addresses
/// with message type 5 and a unicast address): `None` for anything else.
pub fn parse_dhcp_ack(frame: &[u8]) -> Option<DhcpAck> {
    let b = bootp(frame)?;
    if b[0] != 2 {
        return None;
    }
    let addr = ip_at(b, 16);
    let client = mac_at(b, 28);
    if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || client.is_group() {
        return None;
    }
    let mut opts = &b[240..];
    while let Some(&code) = opts.first() {
        match code {
            0 => opts = &opts[1..],
            255 => break,
            _ => {
                let len = usize::from(*opts.get(1)?);
                let v = opts.get(2..2 + len)?;
                if code == 53 {
                    return (v == [DHCP_ACK]).then_some(DhcpAck { client, addr });
                }
                opts = &opts[2 + len..];
            }
        }
    }
    None
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IPv6 frame around ICMPv6 message `m` (checksum filled in), hop limit 255.
    pub(crate) fn icmp6_frame(dst: Mac, src: Mac, s: Ipv6Addr, d: Ipv6Addr, m: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HDR_LEN + IPV6_HDR_LEN];
        f[0..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        f[14] = 0x60;
        f[18..20].copy_from_slice(&(m.len() as u16).to_be_bytes());
        f[20] = NH_ICMPV6;
        f[21] = 255;
        f[22..38].copy_from_slice(&s.octets());
        f[38..54].copy_from_slice(&d.octets());
        let mut m = m.to_vec();
        let sum = csum_add(pseudo6(&s.octets(), &d.octets(), m.len()), &m);
        m[2..4].copy_from_slice(&(!csum_fold(sum)).to_be_bytes());
        f.extend_from_slice(&m);
        f
    }

    /// A neighbour solicitation from `src` (`s`, unspecified for DAD) for `target`.
    pub(crate) fn ns_frame(src: Mac, s: Ipv6Addr, target: Ipv6Addr) -> Vec<u8> {
        let t = target.octets();
        let d = Ipv6Addr::from([
            0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, t[13], t[14], t[15],
        ]);
        let mut m = vec![ICMP6_NS, 0, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&t);
        if !s.is_unspecified() {
            m.extend_from_slice(&[1, 1]);
            m.extend_from_slice(&src.0);
        }
        icmp6_frame(group_mac_v6(d), src, s, d, &m)
    }

    fn ll(n: u16) -> Ipv6Addr {
        Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, n)
    }

    #[test]
    fn ns_parses_and_is_answered_with_a_valid_na() {
        let vm = Mac([2, 0, 0, 0, 0, 1]);
        let owner = Mac([2, 0, 0, 0, 0, 2]);
        let f = ns_frame(vm, ll(1), ll(2));
        assert!(worth_a_look(&f));
        let ns = parse_nd(&f).unwrap();
        assert!(!ns.advert && !ns.is_dad());
        assert_eq!((ns.src, ns.target, ns.lladdr), (ll(1), ll(2), Some(vm)));
        let mut buf = [0u8; 128];
        let n = write_na(&ns, vm, owner, &mut buf).unwrap();
        assert_eq!(n, NA_FRAME_LEN);
        assert_eq!(&buf[..6], &vm.0);
        assert_eq!(&buf[6..12], &owner.0);
        // The checksum verifies (parse_nd checks it) and the fields are the owner's.
        let na = parse_nd(&buf[..n]).unwrap();
        assert!(na.advert && na.solicited && na.override_);
        assert_eq!((na.src, na.dst, na.target), (ll(2), ll(1), ll(2)));
        assert_eq!(na.lladdr, Some(owner));
        // Duplicate address detection: answered to all nodes, not solicited.
        let dad = parse_nd(&ns_frame(vm, Ipv6Addr::UNSPECIFIED, ll(2))).unwrap();
        assert!(dad.is_dad() && dad.lladdr.is_none());
        let n = write_na(&dad, vm, owner, &mut buf).unwrap();
        let na = parse_nd(&buf[..n]).unwrap();
        assert!(!na.solicited);
        assert_eq!(na.dst, Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1));
        assert!(write_na(&ns, vm, owner, &mut buf[..NA_FRAME_LEN - 1]).is_err());
        // A wrong checksum, a lower hop limit, a cut frame, a zero-length option: no.
        let mut g = f.clone();
        g[60] ^= 1;
        assert!(parse_nd(&g).is_none());
        let mut g = f.clone();
        g[21] = 64;
        assert!(parse_nd(&g).is_none());
        assert!(parse_nd(&f[..f.len() - 1]).is_none());
        let mut m = vec![ICMP6_NS, 0, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&ll(2).octets());
        m.extend_from_slice(&[1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(parse_nd(&icmp6_frame(vm, vm, ll(1), ll(2), &m)).is_none());
    }

    /// An IPv4 frame with protocol `proto` around `m` (IGMP checksum filled in when
    /// `proto` is IGMP).
    pub(crate) fn ipv4_frame(dst: Mac, src: Mac, proto: u8, m: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; ETH_HDR_LEN + 20];
        f[0..6].copy_from_slice(&dst.0);
        f[6..12].copy_from_slice(&src.0);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[16..18].copy_from_slice(&((20 + m.len()) as u16).to_be_bytes());
        f[22] = 1;
        f[23] = proto;
        f[26..30].copy_from_slice(&[198, 19, 0, 1]);
        f[30..34].copy_from_slice(&[224, 0, 0, 22]);
        let mut m = m.to_vec();
        if proto == PROTO_IGMP {
            let c = !csum_fold(csum_add(0, &m));
            m[2..4].copy_from_slice(&c.to_be_bytes());
        }
        f.extend_from_slice(&m);
        f
    }

    /// An IGMPv3 report joining (exclude, no sources) or leaving (include, none) `g`.
    pub(crate) fn igmp3(src: Mac, g: [u8; 4], join: bool) -> Vec<u8> {
        let mut m = vec![0x22, 0, 0, 0, 0, 0, 0, 1];
        m.extend_from_slice(&[if join { 4 } else { 3 }, 0, 0, 0]);
        m.extend_from_slice(&g);
        ipv4_frame(Mac([1, 0, 0x5e, 0, 0, 22]), src, PROTO_IGMP, &m)
    }

    fn reports(f: &[u8]) -> Option<Vec<Report>> {
        let mut v = Vec::new();
        parse_reports(f, 64, |r| v.push(r)).then_some(v)
    }

    #[test]
    fn igmp_and_mld_reports() {
        let vm = Mac([2, 0, 0, 0, 0, 1]);
        let g = group_mac_v4(Ipv4Addr::new(239, 1, 2, 3));
        assert_eq!(g, Mac([1, 0, 0x5e, 1, 2, 3]));
        let f = igmp3(vm, [239, 1, 2, 3], true);
        assert!(worth_a_look(&f));
        assert_eq!(
            reports(&f),
            Some(vec![Report {
                group: g,
                join: true
            }])
        );
        let f = igmp3(vm, [239, 1, 2, 3], false);
        assert_eq!(
            reports(&f),
            Some(vec![Report {
                group: g,
                join: false
            }])
        );
        // IGMPv2 join and leave; a link-local group parses but is not reported.
        let v2 = |t: u8, g: [u8; 4]| {
            let mut m = vec![t, 0, 0, 0];
            m.extend_from_slice(&g);
            ipv4_frame(Mac([1, 0, 0x5e, 1, 2, 3]), vm, PROTO_IGMP, &m)
        };
        assert_eq!(
            reports(&v2(0x16, [239, 1, 2, 3])),
            Some(vec![Report {
                group: g,
                join: true
            }])
        );
        assert_eq!(
            reports(&v2(0x17, [239, 1, 2, 3])),
            Some(vec![Report {
                group: g,
                join: false
            }])
        );
        assert_eq!(reports(&v2(0x16, [224, 0, 0, 251])), Some(vec![]));
        // Not multicast, a query, a bad checksum, a record past the end: not reports.
        assert_eq!(reports(&v2(0x16, [198, 19, 0, 1])), None);
        assert_eq!(reports(&v2(0x11, [239, 1, 2, 3])), None);
        let mut b = v2(0x16, [239, 1, 2, 3]);
        b[40] ^= 1;
        assert_eq!(reports(&b), None);
        let mut m = vec![0x22, 0, 0, 0, 0, 0, 0, 2, 4, 0, 0, 0, 239, 1, 2, 3];
        let c = !csum_fold(csum_add(0, &m));
        m[2..4].copy_from_slice(&c.to_be_bytes());
        assert_eq!(reports(&ipv4_frame(vm, vm, PROTO_IGMP, &m)), None);
        // MLDv2 through a hop-by-hop header (router alert), and MLDv1.
        let g6 = Ipv6Addr::new(0xff15, 0, 0, 0, 0, 0, 0xabcd, 0x42);
        let mut m = vec![ICMP6_MLD2_REPORT, 0, 0, 0, 0, 0, 0, 1, 2, 0, 0, 0];
        m.extend_from_slice(&g6.octets());
        let dst = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 0x16);
        let plain = icmp6_frame(group_mac_v6(dst), vm, ll(1), dst, &m);
        let mut f = plain[..54].to_vec();
        f[20] = NH_HOP_BY_HOP;
        f[18..20].copy_from_slice(&((m.len() + 8) as u16).to_be_bytes());
        f.extend_from_slice(&[NH_ICMPV6, 0, 5, 2, 0, 0, 1, 0]);
        f.extend_from_slice(&plain[54..]);
        assert!(worth_a_look(&f));
        let want = Report {
            group: Mac([0x33, 0x33, 0xab, 0xcd, 0, 0x42]),
            join: true,
        };
        assert_eq!(reports(&f), Some(vec![want]));
        let mut m = vec![ICMP6_MLD1_DONE, 0, 0, 0, 0, 0, 0, 0];
        m.extend_from_slice(&g6.octets());
        let f = icmp6_frame(group_mac_v6(dst), vm, ll(1), dst, &m);
        assert_eq!(
            reports(&f),
            Some(vec![Report {
                join: false,
                ..want
            }])
        );
        // Which group MACs follow membership.
        assert!(follows_membership(g));
        assert!(!follows_membership(Mac([1, 0, 0x5e, 0, 0, 251])));
        assert!(!follows_membership(Mac([0x33, 0x33, 0, 0, 0, 1])));
        assert!(!follows_membership(Mac([0x33, 0x33, 0xff, 0, 0, 1])));
        assert!(!follows_membership(Mac([0xff; 6])));
        assert!(follows_membership(want.group));
    }

    /// A DHCP reply of message type `kind` giving `addr` to `client`.
    pub(crate) fn dhcp_reply(server: Mac, client: Mac, addr: [u8; 4], kind: u8) -> Vec<u8> {
        let mut b = vec![0u8; 240];
        b[0..3].copy_from_slice(&[2, 1, 6]);
        b[16..20].copy_from_slice(&addr);
        b[28..34].copy_from_slice(&client.0);
        b[236..240].copy_from_slice(&BOOTP_MAGIC);
        b.extend_from_slice(&[53, 1, kind, 0, 255]);
        let mut u = vec![0, 67, 0, 68];
        u.extend_from_slice(&((8 + b.len()) as u16).to_be_bytes());
        u.extend_from_slice(&[0, 0]);
        u.extend_from_slice(&b);
        ipv4_frame(client, server, PROTO_UDP, &u)
    }

    #[test]
    fn dhcp_acks() {
        let (sv, cl) = (Mac([2, 0, 0, 0, 0, 1]), Mac([2, 0, 0, 0, 0, 7]));
        let f = dhcp_reply(sv, cl, [198, 19, 0, 7], 5);
        assert!(worth_a_look(&f));
        assert_eq!(
            parse_dhcp_ack(&f),
            Some(DhcpAck {
                client: cl,
                addr: Ipv4Addr::new(198, 19, 0, 7)
            })
        );
        assert_eq!(dhcp_way(&f), Some(DhcpWay::FromServer(cl)));
        let mut req = f.clone();
        req[34..38].copy_from_slice(&[0, 68, 0, 67]);
        req[42] = 1;
        assert!(worth_a_look(&req));
        assert_eq!(dhcp_way(&req), Some(DhcpWay::FromClient));
        assert_eq!(parse_dhcp_ack(&req), None);
        // An offer, no address, a cut frame: not an acknowledgement.
        assert_eq!(
            parse_dhcp_ack(&dhcp_reply(sv, cl, [198, 19, 0, 7], 2)),
            None
        );
        assert_eq!(parse_dhcp_ack(&dhcp_reply(sv, cl, [0; 4], 5)), None);
        assert_eq!(parse_dhcp_ack(&f[..f.len() - 3]), None);
        // Ordinary unicast is not looked at.
        let mut u = f.clone();
        u[23] = 6;
        assert!(!worth_a_look(&u));
    }
}
