//! Transmission request headers.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xnbd::proto::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = Request::parse(data) {
        assert_eq!(&r.encode()[..], data);
    }
});
