#![no_main]
//! Cookie: decode, and re-encode what decodes to the same bytes.
use dataplane::wire::Cookie;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Cookie::decode(data) {
        let mut buf = vec![0u8; data.len() + 64];
        let n = m.encode(&mut buf).expect("re-encodes");
        assert_eq!(&buf[..n], data);
    }
});
