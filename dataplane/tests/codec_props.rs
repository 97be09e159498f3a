//! Property tests of the wire codec: every message round-trips, and no input makes a
//! decoder panic.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use dataplane::wire::*;
use proptest::prelude::*;

fn addr() -> impl Strategy<Value = SocketAddr> {
    prop_oneof![
        (any::<[u8; 4]>(), any::<u16>())
            .prop_map(|(a, p)| SocketAddr::new(IpAddr::V4(Ipv4Addr::from(a)), p)),
        (any::<[u8; 16]>(), any::<u16>())
            .prop_map(|(a, p)| SocketAddr::new(IpAddr::V6(Ipv6Addr::from(a)), p)),
    ]
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9.-]{0,32}"
}

proptest! {
    #[test]
    fn register_roundtrip(community in any::<[u8; 16]>(), key in any::<[u8; 32]>(), seq in any::<u64>(),
                          n in name(), addrs in prop::collection::vec(addr(), 0..=MAX_LOCAL_ADDRS),
                          sig in any::<[u8; 32]>(), cookie in any::<[u8; 16]>(), known in any::<u64>()) {
        let m = Register { cookie, community, edge_key: key, seq, known, name: n, local_addrs: addrs };
        let mut buf = [0u8; 1024];
        let len = m.encode_unsigned(&mut buf).unwrap();
        buf[len..len + 32].copy_from_slice(&sig);
        buf[len + 32..len + 64].copy_from_slice(&sig);
        let v = Register::decode(&buf[..len + SIG_LEN]).unwrap();
        prop_assert_eq!(v.msg, m);
        prop_assert_eq!(v.signed.len(), len);
    }

    #[test]
    fn ack_and_cookie_roundtrip(community in any::<[u8; 16]>(), edge in any::<[u8; 8]>(), seq in any::<u64>(),
                     observed in addr(), lifetime in any::<u16>(), cookie in any::<[u8; 16]>(),
                     sn_key in any::<[u8; 32]>(), sig in any::<[u8; 32]>(), version in any::<u64>(),
                     epoch in any::<u64>()) {
        let m = RegisterAck { community, edge, seq, version, epoch, observed, lifetime_secs: lifetime, cookie, sn_key };
        let mut buf = [0u8; 256];
        let n = m.encode_unsigned(&mut buf).unwrap();
        buf[n..n + 32].copy_from_slice(&sig);
        buf[n + 32..n + 64].copy_from_slice(&sig);
        let v = RegisterAck::decode(&buf[..n + SIG_LEN]).unwrap();
        prop_assert_eq!(v.msg, m);
        prop_assert_eq!(v.signed.len(), n);
        let c = Cookie { edge, seq, cookie };
        let n = c.encode(&mut buf).unwrap();
        prop_assert_eq!(Cookie::decode(&buf[..n]).unwrap(), c);
    }

    #[test]
    fn peer_info_roundtrip(community in any::<[u8; 16]>(), kind in 0u8..3, version in any::<u64>(),
                           parts in 1u16..=u16::MAX, part in any::<u16>(),
                           epoch in any::<u64>(),
                           peers in prop::collection::vec(
                               (any::<[u8; 8]>(), name(), addr(), prop::collection::vec(addr(), 0..=3)),
                               0..=MAX_PEERS_PER_INFO)) {
        let (kind, part, parts) = match kind {
            0 => (InfoKind::Update, 0, 1),
            1 => (InfoKind::Full, part % parts, parts),
            _ => (InfoKind::Gone, 0, 1),
        };
        let m = PeerInfo {
            community,
            kind,
            epoch,
            version,
            part,
            parts,
            peers: peers.into_iter().map(|(id, name, observed, local_addrs)| PeerEntry { id, name, observed, local_addrs }).collect(),
        };
        let mut buf = vec![0u8; 8192];
        let n = m.encode_unsigned(&mut buf).unwrap();
        let v = PeerInfo::decode(&buf[..n + SIG_LEN]).unwrap();
        prop_assert_eq!(v.msg, m);
    }

    #[test]
    fn handshake_roundtrip(cipher in any::<u8>(), a in any::<u32>(), b in any::<u32>(), src in any::<[u8; 8]>(),
                           ts in any::<u64>(), e in any::<[u8; 32]>(), mac in any::<[u8; 16]>(), c in any::<[u8; 16]>()) {
        let i = HandshakeInit { cipher, sender_index: a, src, ts, ephemeral: e, mac };
        let mut buf = [0u8; 128];
        let n = i.encode(&mut buf).unwrap();
        prop_assert_eq!(HandshakeInit::decode(&buf[..n]).unwrap(), i);
        let r = HandshakeResp { cipher, sender_index: a, receiver_index: b, src, ephemeral: e, mac, confirm: c };
        let n = r.encode(&mut buf).unwrap();
        prop_assert_eq!(HandshakeResp::decode(&buf[..n]).unwrap(), r);
    }

    #[test]
    fn relay_bcast_transport_roundtrip(community in any::<[u8; 16]>(), src in any::<[u8; 8]>(), dst in any::<[u8; 8]>(),
                                       ctr in any::<u64>(), dsts in prop::collection::vec(any::<[u8; 8]>(), 0..=MAX_BCAST_DSTS),
                                       body in prop::collection::vec(any::<u8>(), 2..100), idx in any::<u32>(), flags in any::<u8>()) {
        let mut buf = vec![0u8; 2048];
        let h = RelayHdr { community, src, dst };
        h.write(&mut buf).unwrap();
        buf[RELAY_HDR_LEN..RELAY_HDR_LEN + body.len()].copy_from_slice(&body);
        let (h2, inner) = RelayHdr::decode(&buf[..RELAY_HDR_LEN + body.len()]).unwrap();
        prop_assert_eq!(h2, h);
        prop_assert_eq!(inner, &body[..]);
        let n = write_bcast_header(&mut buf, &community, &src, ctr, &dsts).unwrap();
        buf[n..n + body.len()].copy_from_slice(&body);
        let v = decode_bcast(&buf[..n + body.len()]).unwrap();
        prop_assert_eq!(v.counter, ctr);
        prop_assert_eq!(&v.dsts, &dsts);
        prop_assert_eq!(v.body, &body[..]);
        for kind in [MsgType::Data, MsgType::Probe] {
            let t = TransportHdr { kind, flags, receiver_index: idx, counter: ctr };
            t.write(&mut buf).unwrap();
            prop_assert_eq!(TransportHdr::decode(&buf[..TRANSPORT_HDR_LEN]).unwrap(), t);
        }
    }

    #[test]
    fn decoders_never_panic(mut data in prop::collection::vec(any::<u8>(), 0..600), t in any::<u8>()) {
        if data.len() >= 2 {
            data[0] = VERSION;
            data[1] = t;
        }
        let _ = peek_type(&data);
        let _ = Register::decode(&data);
        let _ = RegisterAck::decode(&data);
        let _ = PeerInfo::decode(&data);
        let _ = Cookie::decode(&data);
        let _ = RelayHdr::decode(&data);
        let _ = decode_bcast(&data);
        let _ = HandshakeInit::decode(&data);
        let _ = HandshakeResp::decode(&data);
        let _ = TransportHdr::decode(&data);
    }
}
