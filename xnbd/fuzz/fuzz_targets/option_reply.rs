//! Option replies and the information items they carry.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xnbd::proto::{InfoItem, OptionReply};

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = OptionReply::parse(data) {
        assert_eq!(r.encode(), data);
        if let Ok(i) = InfoItem::parse(&r.data) {
            if !matches!(i, InfoItem::Unknown(_)) {
                assert_eq!(InfoItem::parse(&i.encode()).expect("own encoding"), i);
            }
        }
    }
    let _ = xnbd::proto::parse_greeting(data);
});
