#![no_main]
//! RegisterAck: decode, and re-encode what decodes to the same signed bytes.
use dataplane::wire::{RegisterAck, SIG_LEN};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = RegisterAck::decode(data) {
        let mut buf = vec![0u8; data.len() + 64];
        let n = v.msg.encode_unsigned(&mut buf).expect("re-encodes");
        assert_eq!(&buf[..n], v.signed);
        assert_eq!(n + SIG_LEN, data.len());
    }
});
