#![no_main]
//! A supernode fed arbitrary datagrams: nothing may panic, also when it announces what
//! it gathered (polled once at once and once after the announcement delay).
use std::time::{Duration, Instant};

use dataplane::outbox::Outbox;
use dataplane::snkey::SupernodeKey;
use dataplane::supernode::{SupernodeConfig, SupernodeCore};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let now = Instant::now();
    let key = SupernodeKey::from_seed(&[7; 32]).unwrap();
    let mut s = SupernodeCore::new(SupernodeConfig::default(), key, now);
    let mut out = Outbox::new(2048);
    s.handle(now, "198.18.0.9:1".parse().unwrap(), data, &mut out);
    s.poll(now, &mut out);
    s.poll(now + Duration::from_secs(1), &mut out);
    out.recycle_sent();
});
