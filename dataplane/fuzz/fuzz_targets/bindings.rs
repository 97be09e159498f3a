#![no_main]
//! Bindings control message: decode, and re-encode what decodes to the same bytes; ARP
//! parsing of the same bytes as a frame, and the reply written for what parses.
use dataplane::eth::Mac;
use dataplane::l2::{parse_arp, write_arp_reply, Bindings, ARP_FRAME_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Bindings::decode(data) {
        let mut buf = vec![0u8; data.len()];
        let n = m.encode(&mut buf).expect("re-encodes");
        assert_eq!(&buf[..n], data);
    }
    if let Some(a) = parse_arp(data) {
        let mut buf = [0u8; ARP_FRAME_LEN];
        let n = write_arp_reply(&a, Mac([2, 0, 0, 0, 0, 1]), &mut buf).expect("fits");
        let r = parse_arp(&buf[..n]).expect("the reply parses");
        assert_eq!((r.spa, r.tpa), (a.tpa, a.spa));
    }
});
