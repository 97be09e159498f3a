#![no_main]
//! An edge fed datagrams signed with its pinned supernode's key, acknowledgements
//! addressed to its own id and registration and peer lists to its community (as only the
//! real supernode can make them): the parsing after the signature check, acknowledgements
//! and peer lists (their epochs, versions, parts, changes and departures), never panics.
use std::time::Instant;

use dataplane::crypto::{Cipher, CommunityKeys};
use dataplane::edge::{EdgeConfig, EdgeCore, SupernodeAddr, Timers};
use dataplane::outbox::Outbox;
use dataplane::snkey::SupernodeKey;
use dataplane::wire::SIG_LEN;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let sn: std::net::SocketAddr = "198.18.0.1:7654".parse().unwrap();
    let key = SupernodeKey::from_seed(&[7; 32]).unwrap();
    let cfg = EdgeConfig {
        name: "f".into(),
        community: "c".into(),
        secret: b"s".to_vec(),
        cipher: Cipher::Aes256Gcm,
        supernodes: vec![SupernodeAddr {
            addr: sn,
            key: Some(key.public()),
        }],
        local_addrs: vec![],
        timers: Timers::default(),
        max_peers: 16,
        max_macs: 16,
    };
    let mut e = EdgeCore::new(cfg, now).unwrap();
    let mut out = Outbox::new(2048);
    // Registration 1 goes out.
    e.poll(now, &mut out);
    out.recycle_sent();
    // Several messages in a row (each `length byte ‖ bytes`), so sequences of acks,
    // list parts, changes and departures with their versions are explored.
    // RegisterAck and PeerInfo both carry the community at 4..20; RegisterAck the edge
    // id at 20..28 and the registration number at 28..36 (PeerInfo the epoch and the
    // version there, which the input chooses, as it chooses the ack's epoch).
    let community = CommunityKeys::derive("c", b"s").id;
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let len = (len as usize).min(tail.len());
        let (msg, next) = tail.split_at(len);
        rest = next;
        let mut buf = msg.to_vec();
        if buf.len() >= 36 {
            buf[4..20].copy_from_slice(&community);
            if buf[1] != dataplane::wire::MsgType::PeerInfo as u8 {
                buf[20..28].copy_from_slice(&e.id());
                buf[28..36].copy_from_slice(&1u64.to_be_bytes());
            }
        }
        let n = buf.len();
        buf.resize(n + SIG_LEN, 0);
        key.sign_into(&mut buf, n).unwrap();
        e.handle_udp(now, sn, &mut buf, &mut out);
        out.recycle_sent();
    }
    e.poll(now, &mut out);
    let _ = e.status(now);
    out.recycle_sent();
});
