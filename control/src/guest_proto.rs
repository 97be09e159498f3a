//! The guest agent protocol: the agent (host) and `mvc-guest` (inside a qemu guest)
//! over a virtio-serial port, qemu's Unix socket on the host side.
//!
//! The guest is not trusted: every frame starts with a fixed header whose length is
//! checked against [`MAX_FRAME`] before a byte of the body is kept, every field is
//! read through a bounds-checked cursor, and nothing in a frame is used as a size to
//! allocate before it was checked against the bytes that are there. The host reads
//! with a deadline (`guest_call` in `control/src/agent/stack.rs`), so a guest that
//! never answers or answers without end costs a bounded wait and a bounded buffer.
//!
//! Frame (all integers big-endian):
//!
//! ```text
//! magic "MVGA" | version u8 (= VERSION) | kind u8 | id u32 | length u32 | body
//! ```
//!
//! Kinds: 1 `Exec` (host to guest), 2 `Done` (guest to host, with the `id` of its
//! `Exec`). A frame of an unknown kind decodes as [`Msg::Unknown`] (its body skipped),
//! for the reader to count and drop. Bodies:
//!
//! ```text
//! Exec: timeout_ms u32 | argc u16 | argc x (len u16 | bytes) | stdin_len u32 | stdin
//! Done: flags u8 (bit 0: exited with a code, bit 1: timed out) | code i32 |
//!       dropped u64 | stdout_len u32 | stdout | stderr_len u32 | stderr
//! ```
//!
//! This module is pure (no I/O, no clock) and uses only `std`: the guest binary
//! (`src/bin/mvc-guest.rs`) includes the same file.

/// First bytes of every frame.
pub const MAGIC: [u8; 4] = *b"MVGA";
/// Protocol version. Change it with any change of the frame or a body, and say so in
/// docs/PROTOCOL.md.
pub const VERSION: u8 = 1;
/// Header bytes.
pub const HEADER_LEN: usize = 14;
/// Largest body: two output streams of 512 KiB, or 1 MiB of input with 256 arguments
/// of 4 KiB, and room to spare.
pub const MAX_FRAME: usize = 3 << 20;
/// Bytes of each output stream a `Done` may carry (also what a netns exec keeps:
/// `stack::EXEC_OUTPUT_MAX` is this).
pub const OUTPUT_MAX: usize = 512 * 1024;
/// Most arguments of an `Exec`, and bytes of one.
pub const ARGS_MAX: (usize, usize) = (256, 4096);
/// Bytes of standard input an `Exec` may carry.
pub const STDIN_MAX: usize = 1024 * 1024;

const KIND_EXEC: u8 = 1;
const KIND_DONE: u8 = 2;

/// Run a command in the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exec {
    /// Program and arguments.
    pub argv: Vec<Vec<u8>>,
    /// Standard input.
    pub stdin: Vec<u8>,
    /// Milliseconds before the guest ends the command's process group.
    pub timeout_ms: u32,
}

/// What a command did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Done {
    /// Exit status (`None`: ended by a signal, or not started).
    pub code: Option<i32>,
    /// Whether the timeout ended it.
    pub timed_out: bool,
    /// Output bytes past the bounds (both streams).
    pub dropped: u64,
    /// Standard output (at most [`OUTPUT_MAX`]).
    pub stdout: Vec<u8>,
    /// Standard error (at most [`OUTPUT_MAX`]).
    pub stderr: Vec<u8>,
}

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Host to guest.
    Exec(Exec),
    /// Guest to host.
    Done(Done),
    /// A kind this version does not know (counted and dropped by the reader).
    Unknown(u8),
}

/// A message with the id that pairs a `Done` with its `Exec`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Request id (the host's choice, echoed by the guest).
    pub id: u32,
    /// The message.
    pub msg: Msg,
}

/// Why bytes are not a frame. After any of these the stream is out of step: the host
/// closes the connection; the guest skips to the next magic.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProtoError {
    /// The first bytes are not [`MAGIC`].
    #[error("not a guest agent frame (bad magic)")]
    Magic,
    /// Another protocol version.
    #[error("guest agent protocol version {0}, this side speaks {VERSION}")]
    Version(u8),
    /// The header announces a body over [`MAX_FRAME`].
    #[error("guest agent frame of {0} bytes (most {MAX_FRAME})")]
    TooLong(u64),
    /// A field runs past the body, or a bound is broken.
    #[error("malformed guest agent frame: {0}")]
    Malformed(&'static str),
    /// A message too large to encode within the bounds.
    #[error("guest agent message over its bounds: {0}")]
    Bounds(&'static str),
}

/// A bounds-checked reader over a body.
struct Cursor<'a> {
    b: &'a [u8],
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtoError> {
        if self.b.len() < n {
            return Err(ProtoError::Malformed(what));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    fn u8(&mut self, what: &'static str) -> Result<u8, ProtoError> {
        Ok(self.take(1, what)?[0])
    }
    fn u16(&mut self, what: &'static str) -> Result<u16, ProtoError> {
        let s = self.take(2, what)?;
        Ok(u16::from_be_bytes([s[0], s[1]]))
    }
    fn u32(&mut self, what: &'static str) -> Result<u32, ProtoError> {
        let s = self.take(4, what)?;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }
    fn u64(&mut self, what: &'static str) -> Result<u64, ProtoError> {
        let s = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(s);
        Ok(u64::from_be_bytes(a))
    }
    fn bytes32(&mut self, max: usize, what: &'static str) -> Result<Vec<u8>, ProtoError> {
        let n = self.u32(what)? as usize;
        if n > max {
            return Err(ProtoError::Malformed(what));
        }
        Ok(self.take(n, what)?.to_vec())
    }
}

fn put32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Append the frame of `msg` with `id` to `out`.
pub fn encode(id: u32, msg: &Msg, out: &mut Vec<u8>) -> Result<(), ProtoError> {
    let mut body = Vec::new();
    let kind = match msg {
        Msg::Exec(e) => {
            let (n, len) = ARGS_MAX;
            if e.argv.is_empty() || e.argv.len() > n || e.argv.iter().any(|a| a.len() > len) {
                return Err(ProtoError::Bounds("arguments"));
            }
            if e.stdin.len() > STDIN_MAX {
                return Err(ProtoError::Bounds("standard input"));
            }
            body.extend_from_slice(&e.timeout_ms.to_be_bytes());
            body.extend_from_slice(&(e.argv.len() as u16).to_be_bytes());
            for a in &e.argv {
                body.extend_from_slice(&(a.len() as u16).to_be_bytes());
                body.extend_from_slice(a);
            }
            put32(&mut body, &e.stdin);
            KIND_EXEC
        }
        Msg::Done(d) => {
            if d.stdout.len() > OUTPUT_MAX || d.stderr.len() > OUTPUT_MAX {
                return Err(ProtoError::Bounds("output"));
            }
            let flags = u8::from(d.code.is_some()) | (u8::from(d.timed_out) << 1);
            body.push(flags);
            body.extend_from_slice(&d.code.unwrap_or(0).to_be_bytes());
            body.extend_from_slice(&d.dropped.to_be_bytes());
            put32(&mut body, &d.stdout);
            put32(&mut body, &d.stderr);
            KIND_DONE
        }
        Msg::Unknown(_) => return Err(ProtoError::Bounds("unknown kinds are not sent")),
    };
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(kind);
    out.extend_from_slice(&id.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    Ok(())
}

/// The body length a complete header announces, checked against [`MAX_FRAME`] (the
/// reader knows how much to wait for before it keeps any of it).
pub fn body_len(header: &[u8; HEADER_LEN]) -> Result<usize, ProtoError> {
    if header[..4] != MAGIC {
        return Err(ProtoError::Magic);
    }
    if header[4] != VERSION {
        return Err(ProtoError::Version(header[4]));
    }
    let len = u32::from_be_bytes([header[10], header[11], header[12], header[13]]);
    if len as usize > MAX_FRAME {
        return Err(ProtoError::TooLong(u64::from(len)));
    }
    Ok(len as usize)
}

/// Decode the first frame of `buf`: `Ok(None)` while it is incomplete, else the frame
/// and the bytes it took.
pub fn decode(buf: &[u8]) -> Result<Option<(Frame, usize)>, ProtoError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        // A wrong start is wrong already.
        let n = buf.len().min(4);
        if buf[..n] != MAGIC[..n] {
            return Err(ProtoError::Magic);
        }
        return Ok(None);
    };
    let mut header = [0u8; HEADER_LEN];
    header.copy_from_slice(h);
    let len = body_len(&header)?;
    let Some(body) = buf.get(HEADER_LEN..HEADER_LEN + len) else {
        return Ok(None);
    };
    let kind = header[5];
    let id = u32::from_be_bytes([header[6], header[7], header[8], header[9]]);
    let mut c = Cursor { b: body };
    let msg = match kind {
        KIND_EXEC => {
            let timeout_ms = c.u32("timeout")?;
            let argc = c.u16("argc")? as usize;
            let (n, alen) = ARGS_MAX;
            if argc == 0 || argc > n {
                return Err(ProtoError::Malformed("argc"));
            }
            let mut argv = Vec::with_capacity(argc);
            for _ in 0..argc {
                let l = c.u16("argument")? as usize;
                if l > alen {
                    return Err(ProtoError::Malformed("argument"));
                }
                argv.push(c.take(l, "argument")?.to_vec());
            }
            let stdin = c.bytes32(STDIN_MAX, "stdin")?;
            Msg::Exec(Exec {
                argv,
                stdin,
                timeout_ms,
            })
        }
        KIND_DONE => {
            let flags = c.u8("flags")?;
            let code = c.u32("code")? as i32;
            let dropped = c.u64("dropped")?;
            let stdout = c.bytes32(OUTPUT_MAX, "stdout")?;
            let stderr = c.bytes32(OUTPUT_MAX, "stderr")?;
            Msg::Done(Done {
                code: (flags & 1 != 0).then_some(code),
                timed_out: flags & 2 != 0,
                dropped,
                stdout,
                stderr,
            })
        }
        k => {
            return Ok(Some((
                Frame {
                    id,
                    msg: Msg::Unknown(k),
                },
                HEADER_LEN + len,
            )))
        }
    };
    if !c.b.is_empty() {
        return Err(ProtoError::Malformed("bytes after the body"));
    }
    Ok(Some((Frame { id, msg }, HEADER_LEN + len)))
}

/// Where the next frame may start after bytes that were not a frame: the next
/// occurrence of [`MAGIC`] after the first byte (or the end).
pub fn resync(buf: &[u8]) -> usize {
    (1..buf.len())
        .find(|&i| buf[i..].starts_with(&MAGIC[..MAGIC.len().min(buf.len() - i)]))
        .unwrap_or(buf.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn exec() -> Exec {
        Exec {
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()],
            stdin: b"input".to_vec(),
            timeout_ms: 5000,
        }
    }

    #[test]
    fn round_trip_and_incomplete() {
        let d = Done {
            code: Some(-3),
            timed_out: true,
            dropped: 7,
            stdout: b"out".to_vec(),
            stderr: vec![0, 255],
        };
        for m in [Msg::Exec(exec()), Msg::Done(d), Msg::Done(Done::default())] {
            let mut b = Vec::new();
            encode(42, &m, &mut b).unwrap();
            for cut in 0..b.len() {
                assert_eq!(decode(&b[..cut]), Ok(None), "cut {cut}");
            }
            let (f, n) = decode(&b).unwrap().unwrap();
            assert_eq!((f.id, f.msg, n), (42, m, b.len()));
        }
    }

    #[test]
    fn hostile_headers_refused_before_any_body() {
        let mut b = Vec::new();
        encode(1, &Msg::Exec(exec()), &mut b).unwrap();
        let mut v = b.clone();
        v[4] = 9;
        assert_eq!(decode(&v), Err(ProtoError::Version(9)));
        // A guest announcing 4 GiB: refused from the header alone.
        let mut v = b[..HEADER_LEN].to_vec();
        v[10..14].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(decode(&v), Err(ProtoError::TooLong(u64::from(u32::MAX))));
        assert_eq!(decode(b"XY"), Err(ProtoError::Magic));
        assert_eq!(decode(b"MV"), Ok(None));
        // An unknown kind is skipped whole.
        let mut v = b.clone();
        v[5] = 77;
        let (f, n) = decode(&v).unwrap().unwrap();
        assert_eq!((f.msg, n), (Msg::Unknown(77), b.len()));
        // A field longer than its body.
        let mut v = b.clone();
        let l = v.len();
        v[l - 9..l - 5].copy_from_slice(&1000u32.to_be_bytes());
        assert!(matches!(decode(&v), Err(ProtoError::Malformed(_))));
        // Over the bounds: not encoded.
        let mut big = exec();
        big.stdin = vec![0; STDIN_MAX + 1];
        assert!(encode(1, &Msg::Exec(big), &mut Vec::new()).is_err());
        assert_eq!(resync(b"xxMVGAyy"), 2);
        assert_eq!(resync(b"xxxxM"), 4);
        assert_eq!(resync(b"xxxx"), 4);
    }

    proptest! {
        #[test]
        fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode(&b);
            let mut v = Vec::new();
            encode(1, &Msg::Exec(exec()), &mut v).unwrap();
            v.truncate(HEADER_LEN);
            v.extend_from_slice(&b);
            let _ = decode(&v);
            prop_assert!(resync(&b) <= b.len());
        }

        #[test]
        fn any_done_round_trips(code in proptest::option::of(any::<i32>()), t in any::<bool>(),
            dropped in any::<u64>(), out in proptest::collection::vec(any::<u8>(), 0..64),
            id in any::<u32>()) {
            let m = Msg::Done(Done { code, timed_out: t, dropped, stdout: out.clone(), stderr: out });
            let mut b = Vec::new();
            encode(id, &m, &mut b).unwrap();
            let (f, n) = decode(&b).unwrap().unwrap();
            prop_assert_eq!((f.id, f.msg, n), (id, m, b.len()));
        }
    }
}
