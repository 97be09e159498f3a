#![no_main]
//! Bcast: decode, and re-encode the header of what decodes.
use dataplane::wire::{decode_bcast, write_bcast_header};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = decode_bcast(data) {
        let mut buf = vec![0u8; data.len() + 64];
        let n = write_bcast_header(&mut buf, &v.community, &v.src, v.counter, &v.dsts).expect("fits");
        assert_eq!(n, v.header.len());
        // Byte 2 carries the sender's cipher, which the header writer leaves to the caller.
        assert_eq!(&buf[3..n], &v.header[3..]);
        assert_eq!(&buf[..2], &v.header[..2]);
    }
});
