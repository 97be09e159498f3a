//! Control-socket request lines.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xnbd::ctl::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = serde_json::from_slice::<Request>(data) {
        let s = serde_json::to_vec(&r).expect("encode");
        assert_eq!(
            serde_json::from_slice::<Request>(&s).expect("own encoding"),
            r
        );
    }
});
