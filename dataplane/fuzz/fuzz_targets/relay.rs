#![no_main]
//! Relay header: decode, and re-encode what decodes to the same bytes.
use dataplane::wire::{RelayHdr, RELAY_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok((h, inner)) = RelayHdr::decode(data) {
        let mut buf = [0u8; RELAY_HDR_LEN];
        h.write(&mut buf).expect("fits");
        assert_eq!(&buf[..], &data[..RELAY_HDR_LEN]);
        assert_eq!(inner, &data[RELAY_HDR_LEN..]);
    }
});
