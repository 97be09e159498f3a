#![no_main]
//! RegisterAck: decode, and re-encode what decodes to the same bytes.
use dataplane::wire::RegisterAck;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = RegisterAck::decode(data) {
        let mut buf = vec![0u8; data.len() + 64];
        let n = m.encode(&mut buf).expect("re-encodes");
        assert_eq!(&buf[..n], data);
    }
});
