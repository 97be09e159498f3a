//! Whatever bytes a guest sends on its agent port: frames decoded one after another,
//! resynchronising after a bad one as the guest's reader does. Must never panic, never
//! claim more bytes than it was given, and a decoded frame must encode back to a frame
//! that decodes to the same message.
#![no_main]
use control::guest_proto::{decode, encode, resync, Msg};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut at = 0;
    while at < data.len() {
        let rest = &data[at..];
        match decode(rest) {
            Ok(Some((frame, used))) => {
                assert!(used > 0 && used <= rest.len());
                if !matches!(frame.msg, Msg::Unknown(_)) {
                    let mut out = Vec::new();
                    encode(frame.id, &frame.msg, &mut out).expect("a decoded frame encodes");
                    let (again, n) = decode(&out).expect("re-decode").expect("whole frame");
                    assert_eq!(n, out.len());
                    assert_eq!(again, frame);
                }
                at += used;
            }
            Ok(None) => break,
            Err(_) => {
                // Skip at least one byte so the loop always ends.
                at += resync(rest).max(1);
            }
        }
    }
});
