#![no_main]
//! A whole edge fed arbitrary datagrams (claiming to come from its supernode or from
//! elsewhere) and frames: nothing may panic, and after a poll the next deadline lies ahead.
use std::time::Instant;

use dataplane::crypto::Cipher;
use dataplane::edge::{EdgeConfig, EdgeCore, Timers};
use dataplane::outbox::Outbox;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let sn: std::net::SocketAddr = "198.18.0.1:7654".parse().unwrap();
    let cfg = EdgeConfig {
        name: "f".into(),
        community: "c".into(),
        secret: b"s".to_vec(),
        cipher: Cipher::Aes256Gcm,
        supernodes: vec![sn.into()],
        local_addrs: vec![],
        timers: Timers::default(),
        max_peers: 16,
        max_macs: 16,
    };
    let mut e = EdgeCore::new(cfg, now).unwrap();
    let mut out = Outbox::new(2048);
    let mut buf = data.to_vec();
    if let Some((&sel, _)) = data.split_first() {
        let src = if sel & 1 == 0 { sn } else { "198.18.0.9:1".parse().unwrap() };
        e.handle_udp(now, src, &mut buf[1..], &mut out);
        e.handle_tap(now, &data[1..], &mut out);
    }
    e.poll(now, &mut out);
    assert!(e.poll_timeout().is_some_and(|d| d > now));
    out.recycle_sent();
});
