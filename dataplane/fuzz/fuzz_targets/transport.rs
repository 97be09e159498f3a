#![no_main]
//! Data/Probe transport header: decode, and re-encode what decodes.
use dataplane::wire::{TransportHdr, TRANSPORT_HDR_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = TransportHdr::decode(data) {
        let mut buf = [0u8; TRANSPORT_HDR_LEN];
        h.write(&mut buf).expect("fits");
        assert_eq!(&buf[..], &data[..TRANSPORT_HDR_LEN]);
    }
});
