//! Simple replies, structured reply chunk headers and chunk payloads.
#![no_main]
use libfuzzer_sys::fuzz_target;
use xnbd::proto::{Chunk, ChunkHeader, SimpleReply, CHUNK_HEADER_LEN};

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = SimpleReply::parse(data) {
        assert_eq!(&s.encode()[..], data);
    }
    if data.len() < 2 {
        return;
    }
    let typ = u16::from_be_bytes([data[0], data[1]]);
    if let Ok(c) = Chunk::parse(typ, &data[2..]) {
        if !matches!(c, Chunk::Unknown(_)) {
            let enc = c.encode(0, 1);
            let h = ChunkHeader::parse(&enc[..CHUNK_HEADER_LEN]).expect("own header");
            assert_eq!(
                Chunk::parse(h.typ, &enc[CHUNK_HEADER_LEN..]).expect("own encoding"),
                c
            );
        }
    }
});
