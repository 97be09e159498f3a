//! Client options: header and payload parsing; anything that parses re-encodes to the same
//! bytes and parses again to the same value.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xnbd::proto::{parse_option_header, ClientOption, OPTION_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    let _ = parse_option_header(&data[..data.len().min(OPTION_HEADER_LEN)]);
    if data.len() < 4 {
        return;
    }
    let code = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
    if let Ok(o) = ClientOption::parse(code, &data[4..]) {
        let enc = o.encode();
        let (c, len) = parse_option_header(&enc[..OPTION_HEADER_LEN]).expect("own header");
        assert_eq!(len as usize, enc.len() - OPTION_HEADER_LEN);
        let back = ClientOption::parse(c, &enc[OPTION_HEADER_LEN..]).expect("own encoding");
        assert_eq!(back, o);
    }
});
