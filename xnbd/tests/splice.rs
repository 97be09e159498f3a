//! Write payloads spliced from the socket into the file (`xnbd serve`, plain Unix and TCP
//! connections): exact data with real clients, with splicing on and off, and clients that
//! go away in the middle of a payload.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

use common::{ok, pattern, query, unix_uri, xnbd};
use xnbd::proto::{self, cmd, ClientOption, Request};

const MIB: u64 = 1 << 20;

/// `xnbd serve` of `img` on `sock`, on a TCP port and with a control socket `ctl`;
/// `extra` arguments after them. Returns the process and the port.
fn serve(img: &Path, sock: &Path, ctl: &Path, extra: &[&str], log: &Path) -> (common::Proc, u16) {
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec![
        "serve",
        "--export",
        img.to_str().unwrap(),
        "--unix",
        sock.to_str().unwrap(),
        "--listen",
        &listen,
        "--ctl",
        ctl.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let p = xnbd(&args, log, sock);
    assert!(common::wait_tcp(port, Duration::from_secs(10)));
    assert!(common::wait_path(ctl, Duration::from_secs(10)));
    (p, port)
}

fn server_counter(ctl: &Path, k: &str) -> u64 {
    common::u(&query(ctl)["server"], k)
}

/// (offset, length) of writes of many sizes: around and over the pipe's 256 KiB, up to
/// 1 MiB, and small ones, at unaligned offsets, none overlapping, within `size`.
fn mixed_writes(size: u64) -> Vec<(u64, u64)> {
    const LENS: [u64; 13] = [
        65_537, 100_003, 196_608, 200_001, 212_992, 233_333, 262_143, 262_144, 300_001, 1_048_583,
        4_096, 12_345, 70_000,
    ];
    let mut v = Vec::new();
    let mut at = 7;
    for i in 0.. {
        let len = LENS[i % LENS.len()];
        if at + len > size {
            break;
        }
        v.push((at, len));
        at += len + 4_099;
    }
    v
}

/// qemu-io writes a source file's bytes in pieces of mixed sizes, half over the Unix
/// socket and half over TCP; the image and what nbdcopy reads back must equal the source
/// where written and zeroes elsewhere. With `splice`, the server must have spliced some
/// payloads and never fallen back; without, it must have spliced none.
fn writes_land_exactly(splice: bool) {
    require!("qemu-io", "nbdcopy");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    let src = d.path().join("src.img");
    const SIZE: u64 = 24 * MIB;
    common::make_image(&img, SIZE, 0, 0);
    common::make_image(&src, SIZE, SIZE, 5);
    let source = std::fs::read(&src).unwrap();
    let sock = d.path().join("nbd.sock");
    let ctl = d.path().join("ctl.sock");
    let extra: &[&str] = if splice { &[] } else { &["--no-splice"] };
    let (_srv, port) = serve(&img, &sock, &ctl, extra, &d.path().join("serve.log"));

    let writes = mixed_writes(SIZE);
    assert!(writes.len() > 40, "{} writes", writes.len());
    let mut model = vec![0u8; SIZE as usize];
    let mut cmds: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for (i, &(off, len)) in writes.iter().enumerate() {
        let range = off as usize..(off + len) as usize;
        let piece = d.path().join(format!("piece-{i}"));
        std::fs::write(&piece, &source[range.clone()]).unwrap();
        model[range.clone()].copy_from_slice(&source[range]);
        cmds[i % 2].extend([
            "-c".to_string(),
            format!("write -q -s {} {off} {len}", piece.display()),
        ]);
    }
    let uris = [unix_uri(&sock, ""), format!("nbd://127.0.0.1:{port}/")];
    for (c, uri) in cmds.iter().zip(&uris) {
        // Write-back: qemu-io's default (write-through) would make every write FUA.
        let mut args: Vec<&str> = vec!["-f", "raw", "-t", "writeback"];
        args.extend(c.iter().map(|s| s.as_str()));
        args.push(uri);
        let out = ok(120, "qemu-io", &args);
        assert!(!out.contains("failed"), "{out}");
    }
    let check = |what: &str, got: &[u8]| {
        assert_eq!(got.len(), model.len(), "{what}: size");
        if let Some(at) = (0..got.len()).find(|&k| got[k] != model[k]) {
            let w = writes
                .iter()
                .find(|&&(o, l)| (o..o + l).contains(&(at as u64)));
            panic!(
                "{what}: byte {at} is {}, wanted {} (in write {w:?})",
                got[at], model[at]
            );
        }
    };
    check("image", &std::fs::read(&img).unwrap());
    let back = d.path().join("back.img");
    ok(60, "nbdcopy", &[&uris[0], back.to_str().unwrap()]);
    check("read back", &std::fs::read(&back).unwrap());

    let spliced = server_counter(&ctl, "spliced_writes");
    assert_eq!(server_counter(&ctl, "splice_fallbacks"), 0);
    if splice {
        // Writes of 64-256 KiB whose payload was not all in the read buffer when their
        // header was read (how many depends on how fast qemu-io's bytes came in).
        let inline = writes
            .iter()
            .filter(|&&(_, l)| (64 << 10) < l && l <= (256 << 10))
            .count() as u64;
        assert!(
            spliced > 0 && spliced <= inline,
            "{spliced} spliced of {inline} inline writes"
        );
    } else {
        assert_eq!(spliced, 0);
    }
}

#[test]
fn spliced_writes_of_mixed_sizes_land_exactly() {
    writes_land_exactly(true);
}

#[test]
fn writes_without_splice_land_exactly() {
    writes_land_exactly(false);
}

/// A negotiated raw NBD connection (EXPORT_NAME of the default export).
struct Raw<S: Read + Write>(S);

impl<S: Read + Write> Raw<S> {
    fn negotiate(mut s: S) -> Self {
        let mut g = [0u8; proto::GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        proto::parse_greeting(&g).unwrap();
        s.write_all(&(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        s.write_all(&ClientOption::ExportName(String::new()).encode())
            .unwrap();
        let mut b = [0u8; 10];
        s.read_exact(&mut b).unwrap();
        Raw(s)
    }

    /// Send a write's header and the first `sent` bytes of `data`.
    fn write_start(&mut self, cookie: u64, offset: u64, data: &[u8], sent: usize) {
        let r = Request {
            flags: 0,
            typ: cmd::WRITE,
            cookie,
            offset,
            length: data.len() as u32,
        };
        let mut wire = r.encode().to_vec();
        wire.extend_from_slice(&data[..sent]);
        self.0.write_all(&wire).unwrap();
    }

    fn reply(&mut self) -> proto::SimpleReply {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        self.0.read_exact(&mut h).unwrap();
        proto::SimpleReply::parse(&h).unwrap()
    }

    /// A whole write, acknowledged.
    fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.write_start(cookie, offset, data, data.len());
        let s = self.reply();
        assert_eq!((s.cookie, s.error), (cookie, 0));
    }

    fn read(&mut self, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        let r = Request {
            flags: 0,
            typ: cmd::READ,
            cookie,
            offset,
            length: len as u32,
        };
        self.0.write_all(&r.encode()).unwrap();
        let s = self.reply();
        assert_eq!((s.cookie, s.error), (cookie, 0));
        let mut v = vec![0u8; len];
        self.0.read_exact(&mut v).unwrap();
        v
    }
}

/// Clients that stop in the middle of a spliced write's payload: one closes its Unix
/// socket (end of stream), one resets its TCP connection (it leaves a reply unread, so
/// the close sends a reset). Each connection ends; another client is served before and
/// after; every acknowledged write is in the file, and nothing of the cut write (whose
/// received part was still in the pipe) reached it.
#[test]
fn client_gone_mid_payload_leaves_acknowledged_writes_and_others_served() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    const SIZE: u64 = 16 * MIB;
    common::make_image(&img, SIZE, SIZE, 21);
    let mut model = std::fs::read(&img).unwrap();
    let sock = d.path().join("nbd.sock");
    let ctl = d.path().join("ctl.sock");
    let log = d.path().join("serve.log");
    let (srv, port) = serve(&img, &sock, &ctl, &[], &log);
    let unix = || {
        let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s
    };
    let mut other = Raw::negotiate(unix());
    const LEN: usize = 256 << 10;
    let put = |model: &mut Vec<u8>, off: u64, data: &[u8]| {
        model[off as usize..off as usize + data.len()].copy_from_slice(data);
    };

    for (round, tcp) in [false, true].into_iter().enumerate() {
        let base = round as u64 * 4 * MIB;
        let before = server_counter(&ctl, "spliced_writes");
        let stream: Box<dyn ReadWriteStream> = if tcp {
            let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
            Box::new(s)
        } else {
            Box::new(unix())
        };
        let mut c = Raw::negotiate(stream);
        // Acknowledged writes (each payload larger than the read buffer holds with its
        // header, so at least its end is spliced).
        for i in 0..4u64 {
            let data = pattern(base + i, LEN);
            c.write(i, base + i * LEN as u64, &data);
            put(&mut model, base + i * LEN as u64, &data);
        }
        assert!(
            server_counter(&ctl, "spliced_writes") >= before + 4,
            "writes not spliced"
        );
        // Another client is served meanwhile.
        let mine = pattern(1000 + base, 4096);
        other.write(50, SIZE - 4096, &mine);
        put(&mut model, SIZE - 4096, &mine);
        assert_eq!(other.read(51, SIZE - 4096, 4096), mine);
        if tcp {
            // A write whose reply stays unread: once the reply is in, closing resets.
            let data = pattern(base + 5, LEN);
            c.write_start(5, base + 5 * LEN as u64, &data, LEN);
            put(&mut model, base + 5 * LEN as u64, &data);
            wait_reply_arrived(&c.0);
        }
        // Half of a write's payload, then the client is gone.
        let cut = pattern(base + 9, LEN);
        c.write_start(9, base + 9 * LEN as u64, &cut, 100 << 10);
        drop(c);
        common::wait_status(&ctl, Duration::from_secs(20), |q| {
            q["server"]["listeners"]["open"].as_u64() == Some(1)
        });
        // The server goes on serving the other client.
        let again = pattern(2000 + base, 200 << 10);
        other.write(52, base + 12 * LEN as u64, &again);
        put(&mut model, base + 12 * LEN as u64, &again);
        assert_eq!(other.read(53, base + 12 * LEN as u64, again.len()), again);
    }
    let got = std::fs::read(&img).unwrap();
    if let Some(at) = (0..got.len()).find(|&k| got[k] != model[k]) {
        panic!(
            "byte {at}: {} in the file, {} expected (acknowledged writes, the cut one absent)",
            got[at], model[at]
        );
    }
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(!text.contains("panicked"), "{text}");
    drop(srv);
}

/// Both stream kinds behind one type.
trait ReadWriteStream: Read + Write {
    /// Bytes waiting to be read, without taking them.
    fn pending(&self) -> usize;
}

impl ReadWriteStream for std::os::unix::net::UnixStream {
    fn pending(&self) -> usize {
        0
    }
}

impl ReadWriteStream for std::net::TcpStream {
    fn pending(&self) -> usize {
        let mut b = [0u8; proto::SIMPLE_REPLY_LEN];
        self.set_nonblocking(true).unwrap();
        let n = self.peek(&mut b).unwrap_or(0);
        self.set_nonblocking(false).unwrap();
        n
    }
}

impl<S: ReadWriteStream + ?Sized> ReadWriteStream for Box<S> {
    fn pending(&self) -> usize {
        (**self).pending()
    }
}

/// Wait (bounded) until a whole simple reply is waiting on `s`, unread.
fn wait_reply_arrived(s: &impl ReadWriteStream) {
    let end = std::time::Instant::now() + Duration::from_secs(20);
    while s.pending() < proto::SIMPLE_REPLY_LEN {
        assert!(std::time::Instant::now() < end, "no reply arrived");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Pipelined bursts where spliced writes are followed by writes the lane takes (small and
/// over 256 KiB), flushes and reads, sent without waiting for replies: what the server
/// reads ahead into the pipe behind a spliced payload must reach every other request in
/// order. Every write lands, every reply is success, and reads return what was written.
#[test]
fn pipelined_bursts_after_spliced_writes_keep_the_stream_in_order() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    const SIZE: u64 = 64 * MIB;
    common::make_image(&img, SIZE, 0, 0);
    let sock = d.path().join("nbd.sock");
    let ctl = d.path().join("ctl.sock");
    let (_srv, _port) = serve(&img, &sock, &ctl, &[], &d.path().join("serve.log"));
    let s = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut c = Raw::negotiate(s);
    let mut model = vec![0u8; SIZE as usize];
    let mut at = 0u64;
    for round in 0..6u64 {
        let mut wire = Vec::new();
        let mut writes = 0;
        for i in 0..24u64 {
            let cookie = round * 100 + i;
            let len: usize = match i % 6 {
                0 | 1 | 3 => 256 << 10,
                2 => 4096,
                4 => 200_001,
                _ => (1 << 20) + 3,
            };
            if i % 6 == 5 && i % 4 == 1 {
                let r = Request {
                    flags: 0,
                    typ: cmd::FLUSH,
                    cookie,
                    offset: 0,
                    length: 0,
                };
                wire.extend_from_slice(&r.encode());
                writes += 1;
                continue;
            }
            let data = pattern(cookie + 7, len);
            let r = Request {
                flags: 0,
                typ: cmd::WRITE,
                cookie,
                offset: at,
                length: len as u32,
            };
            wire.extend_from_slice(&r.encode());
            wire.extend_from_slice(&data);
            model[at as usize..at as usize + len].copy_from_slice(&data);
            at += len as u64 + 513;
            writes += 1;
        }
        // Sent from another thread: the server may wait for replies to be read.
        let mut tx = c.0.try_clone().unwrap();
        let sender = std::thread::spawn(move || tx.write_all(&wire).unwrap());
        for _ in 0..writes {
            let r = c.reply();
            assert_eq!(r.error, 0, "cookie {}", r.cookie);
        }
        sender.join().unwrap();
        // A read right after the burst goes through what was read ahead, if anything.
        let back = c.read(9999, 0, 256 << 10);
        assert!(
            back == model[..256 << 10],
            "round {round}: first write read back"
        );
    }
    assert!(at < SIZE);
    assert!(
        server_counter(&ctl, "spliced_writes") > 0,
        "nothing spliced"
    );
    let got = std::fs::read(&img).unwrap();
    if let Some(k) = (0..got.len()).find(|&k| got[k] != model[k]) {
        panic!("byte {k}: {} in the file, {} written", got[k], model[k]);
    }
}
