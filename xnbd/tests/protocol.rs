//! Handshake corner cases and bad requests: nbdsh (libnbd) scripts with strict mode off,
//! plus raw-socket checks for what libnbd cannot send (unknown options and commands, bad
//! magic, oversized options).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{serve, unix_uri};
use xnbd::proto::{self, cmd, err, opt, rep, ClientOption, InfoRequest, MetaQuery, Request};

const MIB: u64 = 1 << 20;

const SCRIPT: &str = r#"
import errno, os, nbd

uri = os.environ["XNBD_URI"]
ro_uri = os.environ["XNBD_RO_URI"]
base = os.environ["XNBD_BASE_URI"]
aligned_uri = os.environ["XNBD_ALIGNED_URI"]

def expect(code, f, *a):
    try:
        f(*a)
    except nbd.Error as e:
        assert e.errnum == code, "%s%r: errno %s (%s), wanted %s" % (f.__name__, a[1:], e.errnum, e, code)
        return
    raise AssertionError("no error from %s" % f.__name__)

# Negotiation in option mode: LIST, INFO for a missing and an existing export, meta contexts.
o = nbd.NBD()
o.set_opt_mode(True)
o.connect_uri(base)
names = []
o.opt_list(lambda n, d: names.append(n))
assert sorted(names) == ["disk", "ro"], names
o.set_export_name("nope")
try:
    o.opt_info()
    raise AssertionError("info on a missing export succeeded")
except nbd.Error:
    pass
o.set_export_name("disk")
o.opt_info()
assert o.get_size() == 64 << 20
ctx = []
o.opt_list_meta_context(lambda c: ctx.append(c))
assert "base:allocation" in ctx, ctx
o.opt_go()
assert o.pread(16, 0) == bytes(16)
o.shutdown()

# Transmission with strict client-side checks off, so bad requests reach the server.
h = nbd.NBD()
h.set_strict_mode(0)
h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
h.connect_uri(uri)
size = h.get_size()
expect(errno.EINVAL, h.pread, 4096, size - 100)
expect(errno.ENOSPC, h.pwrite, b"x" * 4096, size - 100)
expect(errno.EINVAL, h.trim, 8192, size - 4096)
expect(errno.ENOSPC, h.zero, 8192, size - 4096)
expect(errno.EINVAL, h.cache, 8192, size - 4096)
expect(errno.EINVAL, h.pread, 1, 1 << 63)
expect(errno.EOVERFLOW, h.pread, 33 << 20, 0)
expect(errno.EOVERFLOW, h.pwrite, b"z" * (33 << 20), 0)
# The connection survived all of that.
h.pwrite(b"a" * 4096, 8192, nbd.CMD_FLAG_FUA)
assert h.pread(4096, 8192) == b"a" * 4096
h.flush()

# Block status: data where written, a hole elsewhere; REQ_ONE gives one extent.
ext = []
h.block_status(size, 0, lambda meta, off, e, err: ext.append((meta, list(e))))
meta, e = ext[0]
assert meta == "base:allocation"
assert sum(e[0::2]) == size, e
assert e[1] == 3 and e[3] == 0, e
one = []
h.block_status(size, 0, lambda meta, off, e, err: one.append(list(e)), nbd.CMD_FLAG_REQ_ONE)
assert len(one[0]) == 2 and one[0][0] == e[0] and one[0][1] == e[1], (one, e)
expect(errno.EINVAL, h.block_status, 4096, size, lambda *a: 0)

# Many requests in flight on one connection.
bufs = []
for i in range(64):
    b = nbd.Buffer.from_bytearray(bytearray([i + 1]) * 65536)
    bufs.append((h.aio_pwrite(b, (i + 1) * 65536), b))
n = 0
while h.aio_in_flight() > 0 and n < 10000:
    h.poll(1000)
    n += 1
for c, _ in bufs:
    assert h.aio_command_completed(c)
rb = [nbd.Buffer(65536) for i in range(64)]
cookies = [h.aio_pread(rb[i], (i + 1) * 65536) for i in range(64)]
n = 0
while h.aio_in_flight() > 0 and n < 10000:
    h.poll(1000)
    n += 1
for i in range(64):
    assert h.aio_command_completed(cookies[i])
    assert rb[i].to_bytearray() == bytearray([i + 1]) * 65536, i

# Trim and write zeroes read back as zeroes.
h.trim(65536, 65536)
h.zero(65536, 2 * 65536, nbd.CMD_FLAG_NO_HOLE)
assert h.pread(65536, 2 * 65536) == bytes(65536)
h.shutdown()

# A second connection sees the first one's flushed data (multi-conn).
m = nbd.NBD()
m.connect_uri(uri)
assert m.can_multi_conn()
assert m.pread(4096, 8192) == b"a" * 4096
m.shutdown()

# Read-only export.
r = nbd.NBD()
r.set_strict_mode(0)
r.connect_uri(ro_uri)
assert r.is_read_only()
expect(errno.EPERM, r.pwrite, b"w" * 512, 0)
expect(errno.EPERM, r.trim, 512, 0)
expect(errno.EPERM, r.zero, 512, 0)
assert r.pread(512, 0) == bytes(512)
r.shutdown()

# Alignment constraints advertised: misaligned requests are refused, aligned ones work.
a = nbd.NBD()
a.set_strict_mode(0)
a.connect_uri(aligned_uri)
assert a.get_block_size(nbd.SIZE_MINIMUM) == 512
expect(errno.EINVAL, a.pread, 100, 0)
expect(errno.EINVAL, a.pwrite, b"q" * 512, 3)
a.pwrite(b"q" * 512, 512)
assert a.pread(512, 512) == b"q" * 512
a.shutdown()

# Simple replies only (no structured replies negotiated).
s = nbd.NBD()
s.set_request_structured_replies(False)
s.set_strict_mode(0)
s.connect_uri(uri)
assert not s.get_structured_replies_negotiated()
expect(errno.EINVAL, s.pread, 4096, size - 100)
expect(errno.EINVAL, s.pread, 33 << 20, 0)
assert s.pread(4096, 8192) == b"a" * 4096
s.shutdown()
print("nbdsh checks passed")
"#;

#[test]
fn nbdsh_corner_cases() {
    require!("/usr/bin/nbdsh");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let ro = d.path().join("ro.img");
    common::make_image(&img, 64 * MIB, 0, 0);
    common::make_image(&ro, MIB, 0, 0);
    let sock = d.path().join("nbd.sock");
    let asock = d.path().join("aligned.sock");
    let disk = format!("disk={}", img.display());
    let _srv = serve(
        &[disk.clone(), format!("ro={}:ro", ro.display())],
        &sock,
        &[],
        &d.path().join("serve.log"),
    );
    let _aligned = serve(
        &[disk],
        &asock,
        &["--min-block", "512"],
        &d.path().join("aligned.log"),
    );
    let script = d.path().join("checks.py");
    std::fs::write(&script, SCRIPT).unwrap();
    let out = std::process::Command::new("timeout")
        .args(["120", "/usr/bin/nbdsh", "-c"])
        .arg(format!("exec(open('{}').read())", script.display()))
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .env("XNBD_URI", unix_uri(&sock, "disk"))
        .env("XNBD_RO_URI", unix_uri(&sock, "ro"))
        .env("XNBD_BASE_URI", unix_uri(&sock, ""))
        .env("XNBD_ALIGNED_URI", unix_uri(&asock, "disk"))
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("nbdsh checks passed"),
        "{text}"
    );
}

struct Raw(UnixStream);

impl Raw {
    fn connect(p: &Path) -> Self {
        let s = UnixStream::connect(p).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut r = Raw(s);
        let mut g = [0u8; proto::GREETING_LEN];
        r.0.read_exact(&mut g).unwrap();
        let flags = proto::parse_greeting(&g).unwrap();
        assert_eq!(flags, proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES);
        r.0.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        r
    }
    /// Connects and selects `name` with EXPORT_NAME; returns the size and flags sent back.
    fn export_name(p: &Path, name: &str) -> (Self, [u8; 10]) {
        let mut c = Self::connect(p);
        c.send(&ClientOption::ExportName(name.into()).encode());
        let mut b = [0u8; 10];
        c.0.read_exact(&mut b).unwrap();
        (c, b)
    }

    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).unwrap();
    }
    fn raw_option(&mut self, code: u32, data: &[u8]) {
        let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
        b.extend_from_slice(&code.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }
    fn reply(&mut self) -> proto::OptionReply {
        let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
        self.0.read_exact(&mut h).unwrap();
        let (o, t, l) = proto::OptionReply::parse_header(&h).unwrap();
        let mut data = vec![0u8; l as usize];
        self.0.read_exact(&mut data).unwrap();
        proto::OptionReply {
            option: o,
            reply_type: t,
            data,
        }
    }
    /// Read option replies up to and including the final one.
    fn replies(&mut self) -> Vec<proto::OptionReply> {
        let mut v = Vec::new();
        loop {
            let r = self.reply();
            let last = r.reply_type == rep::ACK || r.reply_type & rep::FLAG_ERROR != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }
    fn request(&mut self, typ: u16, flags: u16, cookie: u64, offset: u64, length: u32) {
        let r = Request {
            flags,
            typ,
            cookie,
            offset,
            length,
        };
        self.send(&r.encode());
    }
    fn simple(&mut self) -> proto::SimpleReply {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        self.0.read_exact(&mut h).unwrap();
        proto::SimpleReply::parse(&h).unwrap()
    }
    fn chunk(&mut self) -> (proto::ChunkHeader, proto::Chunk) {
        let mut h = [0u8; proto::CHUNK_HEADER_LEN];
        self.0.read_exact(&mut h).unwrap();
        let h = proto::ChunkHeader::parse(&h).unwrap();
        let mut p = vec![0u8; h.length as usize];
        self.0.read_exact(&mut p).unwrap();
        (h, proto::Chunk::parse(h.typ, &p).unwrap())
    }
}

/// `xnbd serve` of `img` as the export `disk` on `sock`.
fn serve_disk(img: &Path, sock: &Path, log: &Path) -> common::Proc {
    serve(&[format!("disk={}", img.display())], sock, &[], log)
}

fn go(name: &str) -> Vec<u8> {
    ClientOption::Go(InfoRequest {
        name: name.into(),
        infos: vec![],
    })
    .encode()
}

#[test]
fn raw_handshake_and_requests() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 4 * MIB, MIB, 7);
    let sock = d.path().join("nbd.sock");
    let _srv = serve_disk(&img, &sock, &d.path().join("serve.log"));

    let mut c = Raw::connect(&sock);
    // Unknown option: ERR_UNSUP, negotiation goes on.
    c.raw_option(0xdead, b"junk");
    let r = c.replies();
    assert_eq!(r[0].reply_type, rep::ERR_UNSUP);
    assert_eq!(r[0].option, 0xdead);
    // Withdrawn PEEK_EXPORT and unsupported EXTENDED_HEADERS: ERR_UNSUP too.
    c.raw_option(opt::PEEK_EXPORT, &[]);
    assert_eq!(c.replies()[0].reply_type, rep::ERR_UNSUP);
    c.raw_option(opt::EXTENDED_HEADERS, &[]);
    assert_eq!(c.replies()[0].reply_type, rep::ERR_UNSUP);
    // Malformed GO: ERR_INVALID.
    c.raw_option(opt::GO, &[0, 0, 0, 50, b'a']);
    assert_eq!(c.replies()[0].reply_type, rep::ERR_INVALID);
    // LIST with a payload: ERR_INVALID (and the connection stays).
    c.raw_option(opt::LIST, &[1]);
    assert_eq!(c.replies()[0].reply_type, rep::ERR_INVALID);
    // Oversized option: payload discarded, ERR_TOO_BIG.
    c.raw_option(opt::INFO, &vec![0u8; 1 << 20]);
    assert_eq!(c.replies()[0].reply_type, rep::ERR_TOO_BIG);
    // STARTTLS without TLS configured.
    c.raw_option(opt::STARTTLS, &[]);
    assert_eq!(c.replies()[0].reply_type, rep::ERR_UNSUP);
    // Meta contexts need structured replies first.
    let set = ClientOption::SetMetaContext(MetaQuery {
        export: "disk".into(),
        queries: vec![proto::BASE_ALLOCATION.into()],
    })
    .encode();
    c.send(&set);
    assert_eq!(c.replies()[0].reply_type, rep::ERR_INVALID);
    // LIST still works.
    c.send(&ClientOption::List.encode());
    let r = c.replies();
    assert_eq!(r.len(), 2);
    assert_eq!(r[0].reply_type, rep::SERVER);
    // GO on a missing export: ERR_UNKNOWN; then a real GO with structured replies.
    c.send(&go("missing"));
    assert_eq!(c.replies()[0].reply_type, rep::ERR_UNKNOWN);
    c.send(&ClientOption::StructuredReply.encode());
    assert_eq!(c.replies()[0].reply_type, rep::ACK);
    c.send(&set);
    let r = c.replies();
    assert_eq!(r[0].reply_type, rep::META_CONTEXT);
    assert_eq!(&r[0].data[..4], &1u32.to_be_bytes());
    c.send(&go("disk"));
    let r = c.replies();
    assert!(r.iter().any(|x| x.reply_type == rep::INFO
        && matches!(proto::InfoItem::parse(&x.data), Ok(proto::InfoItem::Export { size, .. }) if size == 4 * MIB)));
    assert_eq!(r.last().unwrap().reply_type, rep::ACK);

    // Unknown command and unknown flags: EINVAL, connection survives.
    c.request(42, 0, 1, 0, 0);
    let s = c.simple();
    assert_eq!((s.cookie, s.error), (1, err::EINVAL));
    c.request(cmd::FLUSH, 1 << 12, 2, 0, 0);
    assert_eq!(c.simple().error, err::EINVAL);
    // A read gets one OFFSET_DATA chunk with DONE; out of range gets an ERROR chunk.
    c.request(cmd::READ, 0, 3, 4096, 16);
    let (h, ch) = c.chunk();
    assert_eq!(h.cookie, 3);
    assert_eq!(h.flags, proto::chunk::FLAG_DONE);
    assert!(matches!(ch, proto::Chunk::OffsetData { offset: 4096, ref data } if data.len() == 16));
    c.request(cmd::READ, 0, 4, 4 * MIB - 1, 2);
    let (h, ch) = c.chunk();
    assert_eq!(h.cookie, 4);
    assert!(matches!(
        ch,
        proto::Chunk::Error {
            error: err::EINVAL,
            ..
        }
    ));
    // Block status with a zero length: EINVAL as an error chunk.
    c.request(cmd::BLOCK_STATUS, 0, 5, 0, 0);
    assert!(matches!(
        c.chunk().1,
        proto::Chunk::Error {
            error: err::EINVAL,
            ..
        }
    ));
    // Block status of the whole export.
    c.request(cmd::BLOCK_STATUS, 0, 6, 0, 4 * MIB as u32);
    match c.chunk().1 {
        proto::Chunk::BlockStatus { context, extents } => {
            assert_eq!(context, 1);
            assert_eq!(extents.iter().map(|e| u64::from(e.0)).sum::<u64>(), 4 * MIB);
            assert_eq!(extents[0].1, 0);
            assert_eq!(
                extents.last().unwrap().1,
                proto::STATE_HOLE | proto::STATE_ZERO
            );
        }
        other => panic!("{other:?}"),
    }
    // Disconnect: the server closes.
    c.request(cmd::DISC, 0, 7, 0, 0);
    assert!(c.closed());

    // A bad request magic ends the connection.
    let mut c = Raw::connect(&sock);
    c.send(&go(""));
    c.replies();
    c.send(&[0u8; proto::REQUEST_LEN]);
    assert!(c.closed());

    // EXPORT_NAME: unknown name closes; known name gets size+flags without the zeroes.
    let mut c = Raw::connect(&sock);
    c.send(&ClientOption::ExportName("missing".into()).encode());
    assert!(c.closed());
    let (mut c, b) = Raw::export_name(&sock, "disk");
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), 4 * MIB);
    let flags = u16::from_be_bytes([b[8], b[9]]);
    assert!(flags & proto::tflag::CAN_MULTI_CONN != 0);
    // Simple replies: a read returns header + data.
    c.request(cmd::READ, 0, 9, 0, 8);
    let s = c.simple();
    assert_eq!((s.cookie, s.error), (9, 0));
    let mut data = [0u8; 8];
    c.0.read_exact(&mut data).unwrap();
    assert_eq!(&data[..], &std::fs::read(&img).unwrap()[..8]);

    // ABORT gets an ACK and the connection closes.
    let mut c = Raw::connect(&sock);
    c.send(&ClientOption::Abort.encode());
    assert_eq!(c.reply().reply_type, rep::ACK);
    assert!(c.closed());
}

/// Hundreds of requests pipelined on one connection, mixing small reads (grouped across
/// the runtime threads), large reads, small writes (the write lane) and odd-sized
/// reads: every request gets exactly one reply, under its own cookie, with its own data.
#[test]
fn pipelined_mixed_requests_keep_replies_matched() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 8 * MIB, 8 * MIB, 11);
    let orig = std::fs::read(&img).unwrap();
    let sock = d.path().join("nbd.sock");
    let _srv = serve_disk(&img, &sock, &d.path().join("serve.log"));
    let (mut c, _) = Raw::export_name(&sock, "disk");

    // (typ, offset, length, byte written) by cookie. Reads stay below 4 MiB, writes above.
    let mut reqs: Vec<(u16, u64, u32, u8)> = Vec::new();
    let mut wire = Vec::new();
    for i in 0..800u64 {
        let r = match i % 20 {
            7 => (cmd::READ, (i * 12_288) % (3 * MIB), 256 << 10, 0),
            3 | 13 => (cmd::WRITE, 4 * MIB + i * 4096, 4096, (i % 251) as u8 + 1),
            11 => (
                cmd::READ,
                (i * 4099) % (4 * MIB - 8192),
                1 + (i as u32 % 8000),
                0,
            ),
            _ => (cmd::READ, ((i * 7919) % 1024) * 4096, 4096, 0),
        };
        wire.extend_from_slice(
            &Request {
                flags: 0,
                typ: r.0,
                cookie: 1000 + i,
                offset: r.1,
                length: r.2,
            }
            .encode(),
        );
        if r.0 == cmd::WRITE {
            wire.extend(std::iter::repeat_n(r.3, r.2 as usize));
        }
        reqs.push(r);
    }
    // Sent from another thread while this one reads: the replies outgrow the socket buffer.
    let mut tx = c.0.try_clone().unwrap();
    let sender = std::thread::spawn(move || tx.write_all(&wire).unwrap());
    let mut seen = vec![false; reqs.len()];
    for _ in 0..reqs.len() {
        let s = c.simple();
        assert_eq!(s.error, 0, "cookie {}", s.cookie);
        let i = s
            .cookie
            .checked_sub(1000)
            .filter(|&i| (i as usize) < reqs.len())
            .unwrap_or_else(|| panic!("unknown cookie {}", s.cookie)) as usize;
        assert!(!seen[i], "two replies for cookie {}", s.cookie);
        seen[i] = true;
        let (typ, off, len, _) = reqs[i];
        if typ == cmd::READ {
            let mut data = vec![0u8; len as usize];
            c.0.read_exact(&mut data).unwrap();
            assert!(
                data == orig[off as usize..(off + u64::from(len)) as usize],
                "read {i} ({len} bytes at {off}) has other data"
            );
        }
    }
    sender.join().unwrap();
    // The writes landed where they were meant to.
    for (i, &(typ, off, len, v)) in reqs.iter().enumerate() {
        if typ != cmd::WRITE {
            continue;
        }
        c.request(cmd::READ, 0, 5000 + i as u64, off, len);
        let s = c.simple();
        assert_eq!((s.cookie, s.error), (5000 + i as u64, 0));
        let mut data = vec![0u8; len as usize];
        c.0.read_exact(&mut data).unwrap();
        assert!(data.iter().all(|&x| x == v), "write {i} at {off}");
    }
    c.request(cmd::DISC, 0, 1, 0, 0);
    assert!(c.closed());
}

/// A client with large writes in flight sends more only as their replies come back, so the
/// reply to a write is sent before the server waits for the next write's payload (held
/// back until then, both sides would wait for each other).
#[test]
fn large_write_replied_while_the_next_payload_is_awaited() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 8 * MIB, 8 * MIB, 13);
    let sock = d.path().join("nbd.sock");
    let _srv = serve_disk(&img, &sock, &d.path().join("serve.log"));
    let (mut c, _) = Raw::export_name(&sock, "disk");
    const LEN: u32 = 128 << 10;
    let header = |cookie: u64, offset: u64| {
        Request {
            flags: 0,
            typ: cmd::WRITE,
            cookie,
            offset,
            length: LEN,
        }
        .encode()
    };
    for i in 0..20u64 {
        let (a, b) = (2 * i, 2 * i + 1);
        // Write `a` whole, then `b`'s header and half its payload, in one go.
        let mut wire = header(a, a * u64::from(LEN)).to_vec();
        wire.extend(std::iter::repeat_n(a as u8 + 1, LEN as usize));
        wire.extend_from_slice(&header(b, b * u64::from(LEN)));
        wire.extend(std::iter::repeat_n(b as u8 + 1, LEN as usize / 2));
        c.send(&wire);
        // `a`'s reply arrives although `b` is incomplete (the read times out otherwise).
        let s = c.simple();
        assert_eq!((s.cookie, s.error), (a, 0));
        c.send(&vec![b as u8 + 1; LEN as usize / 2]);
        let s = c.simple();
        assert_eq!((s.cookie, s.error), (b, 0));
    }
    let mut data = vec![0u8; LEN as usize];
    for cookie in 0..40u64 {
        c.request(cmd::READ, 0, 100 + cookie, cookie * u64::from(LEN), LEN);
        let s = c.simple();
        assert_eq!((s.cookie, s.error), (100 + cookie, 0));
        c.0.read_exact(&mut data).unwrap();
        assert!(
            data.iter().all(|&x| x == cookie as u8 + 1),
            "write {cookie}"
        );
    }
    c.request(cmd::DISC, 0, 1, 0, 0);
    assert!(c.closed());
}

/// A directory on tmpfs when there is one: `fdatasync` costs nothing there, so a flush that
/// does not wait for the writes before it finishes ahead of them.
fn fast_tempdir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").unwrap_or_else(|_| tempfile::tempdir().unwrap())
}

/// Sends `wire` from another thread (the server may stop reading until replies are taken)
/// and returns the replies to `n` requests in the order they came.
fn burst(c: &mut Raw, wire: Vec<u8>, n: usize) -> Vec<proto::SimpleReply> {
    let mut tx = c.0.try_clone().unwrap();
    let sender = std::thread::spawn(move || tx.write_all(&wire).unwrap());
    let replies = (0..n).map(|_| c.simple()).collect();
    sender.join().unwrap();
    replies
}

/// Writes of every size (batched small ones, large ones, FUA ones) and write-zeroes to
/// overlapping ranges, sent in one burst without waiting for replies: the image ends up as
/// if they had been applied one after another in request order.
#[test]
fn overlapping_writes_in_one_burst_land_in_order() {
    let d = fast_tempdir();
    let img = d.path().join("disk.img");
    common::make_image(&img, 4 * MIB, 0, 0);
    let sock = d.path().join("nbd.sock");
    let _srv = serve_disk(&img, &sock, &d.path().join("serve.log"));
    let (mut c, _) = Raw::export_name(&sock, "disk");
    let mut model = vec![0u8; 4 * MIB as usize];
    let mut wire = Vec::new();
    const N: u64 = 240;
    for i in 0..N {
        let (typ, flags, len) = match i % 8 {
            0 | 4 => (cmd::WRITE, 0, 4096),
            1 => (cmd::WRITE, 0, 64 << 10),
            2 => (cmd::WRITE, 0, 256 << 10),
            3 => (cmd::WRITE, 0, 1 << 20),
            5 => (cmd::WRITE, proto::cflag::FUA, 128 << 10),
            6 => (cmd::WRITE_ZEROES, proto::cflag::NO_HOLE, 96 << 10),
            _ => (cmd::WRITE, 0, 12 << 10),
        };
        // Every range overlaps many others within the first 1.5 MiB.
        let offset = (i * 20_480) % (512 << 10);
        let r = Request {
            flags,
            typ,
            cookie: i,
            offset,
            length: len,
        };
        wire.extend_from_slice(&r.encode());
        let range = offset as usize..(offset + u64::from(len)) as usize;
        let byte = if typ == cmd::WRITE {
            (i % 251) as u8 + 1
        } else {
            0
        };
        if typ == cmd::WRITE {
            wire.extend(std::iter::repeat_n(byte, len as usize));
        }
        model[range].fill(byte);
    }
    let replies = burst(&mut c, wire, N as usize);
    let mut seen = vec![false; N as usize];
    for s in &replies {
        assert_eq!(s.error, 0, "cookie {}", s.cookie);
        assert!(!std::mem::replace(&mut seen[s.cookie as usize], true));
    }
    let got = std::fs::read(&img).unwrap();
    if let Some(at) = (0..got.len()).find(|&k| got[k] != model[k]) {
        panic!(
            "byte {at}: {} on disk, {} from the last request covering it",
            got[at], model[at]
        );
    }
    c.request(cmd::DISC, 0, 1, 0, 0);
    assert!(c.closed());
}

/// A FLUSH sent right after a burst of writes, before any of their replies was read, is
/// answered after every one of them (it covers them all, not only those already answered
/// when it arrived); writes sent after it are still answered.
#[test]
fn flush_after_a_burst_of_writes_is_answered_after_them() {
    let d = fast_tempdir();
    let img = d.path().join("disk.img");
    common::make_image(&img, 64 * MIB, 0, 0);
    let sock = d.path().join("nbd.sock");
    let _srv = serve_disk(&img, &sock, &d.path().join("serve.log"));
    let (mut c, _) = Raw::export_name(&sock, "disk");
    const FLUSH: u64 = 1000;
    let write = |wire: &mut Vec<u8>, cookie: u64, len: u32| {
        let r = Request {
            flags: 0,
            typ: cmd::WRITE,
            cookie,
            offset: cookie * MIB,
            length: len,
        };
        wire.extend_from_slice(&r.encode());
        wire.extend(std::iter::repeat_n(cookie as u8 + 1, len as usize));
    };
    for round in 0..5u64 {
        let mut wire = Vec::new();
        // 24 MiB of writes (within the connection's 32 MiB share), small and large.
        for i in 0..24 {
            write(&mut wire, i, if i % 3 == 0 { 4096 } else { 1 << 20 });
        }
        wire.extend_from_slice(
            &Request {
                flags: 0,
                typ: cmd::FLUSH,
                cookie: FLUSH,
                offset: 0,
                length: 0,
            }
            .encode(),
        );
        for i in 30..34 {
            write(&mut wire, i, 4096);
        }
        let replies = burst(&mut c, wire, 29);
        let at = replies
            .iter()
            .position(|s| s.cookie == FLUSH)
            .expect("no reply to the flush");
        let early: Vec<u64> = replies[at..]
            .iter()
            .map(|s| s.cookie)
            .filter(|&k| k < 24)
            .collect();
        assert!(
            early.is_empty(),
            "round {round}: writes {early:?} answered after the flush that followed them"
        );
        assert!(replies.iter().all(|s| s.error == 0));
    }
    let got = std::fs::read(&img).unwrap();
    for i in (0..24u64).chain(30..34) {
        let len = if i % 3 == 0 || i >= 30 {
            4096
        } else {
            MIB as usize
        };
        let at = (i * MIB) as usize;
        assert!(
            got[at..at + len].iter().all(|&x| x == i as u8 + 1),
            "write {i}"
        );
    }
    c.request(cmd::DISC, 0, 1, 0, 0);
    assert!(c.closed());
}
