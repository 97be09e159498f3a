#![no_main]
//! HandshakeInit: decode, and re-encode what decodes to the same bytes.
use dataplane::wire::HandshakeInit;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = HandshakeInit::decode(data) {
        let mut buf = [0u8; 128];
        let n = m.encode(&mut buf).expect("fits");
        assert_eq!(&buf[..n], data);
    }
});
