//! Whatever bytes a client sends to an agent's channel: handshake, then frames. Must
//! never panic or allocate beyond the frame limit; random frames never open.
#![no_main]
use control::auth::SigningKey;
use control::channel;
use libfuzzer_sys::fuzz_target;
use std::io::{Cursor, Read, Write};
use std::sync::OnceLock;

struct Wire {
    input: Cursor<Vec<u8>>,
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| SigningKey::generate().expect("key"))
}

fuzz_target!(|data: &[u8]| {
    let wire = Wire {
        input: Cursor::new(data.to_vec()),
    };
    if let Ok(mut ch) = channel::server(wire, key()) {
        for _ in 0..16 {
            match ch.recv() {
                Ok(_) => panic!("a frame opened without the session keys"),
                Err(_) => break,
            }
        }
    }
});
