//! Listeners under hostile load (no root needed): descriptors exhausted by idle connections,
//! connections over the limit, clients that never negotiate, clients that never read their
//! replies. After each, a normal client is served.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{ok, query, unix_uri, XNBD};
use xnbd::proto::{self, cmd, opt, Request};

const MIB: u64 = 1 << 20;

/// A stat of the process: `VmRSS` or `VmHWM` in bytes.
fn vm(pid: u32, key: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in {s}"));
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb * 1024
}

/// Start xnbd with `args` (through `prlimit` when `nofile` is given) and wait for `ready`.
fn start(args: &[&str], nofile: Option<u32>, log: &Path, ready: &Path) -> common::Proc {
    let mut p = match nofile {
        Some(n) => {
            let lim = format!("--nofile={n}:{n}");
            let mut a = vec![lim.as_str(), XNBD];
            a.extend_from_slice(args);
            common::spawn("prlimit", &a, log)
        }
        None => common::spawn(XNBD, args, log),
    };
    if !common::wait_path(ready, Duration::from_secs(20)) {
        let _ = p.child.kill();
        panic!("xnbd did not come up: {}", p.log_text());
    }
    p
}

/// `xnbd serve` of `img` as export `disk` on a free loopback TCP port, with the control
/// socket `ctl` and `extra` arguments (`nofile` as for [`start`]); returns the process, the
/// port and `host:port`.
fn serve_tcp(
    img: &Path,
    ctl: &Path,
    extra: &[&str],
    nofile: Option<u32>,
    log: &Path,
) -> (common::Proc, u16, String) {
    let port = common::free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut args = vec!["--listen", &listen, "--ctl", ctl.to_str().unwrap()];
    args.extend_from_slice(extra);
    let srv = serve_disk(img, &args, nofile, log, ctl);
    (srv, port, listen)
}

/// `xnbd serve` of `img` as export `disk` with `args` (listeners and limits), started as
/// [`start`] does.
fn serve_disk(
    img: &Path,
    args: &[&str],
    nofile: Option<u32>,
    log: &Path,
    ready: &Path,
) -> common::Proc {
    let export = format!("disk={}", img.display());
    let mut a = vec!["serve", "--export", &export];
    a.extend_from_slice(args);
    start(&a, nofile, log, ready)
}

/// `xnbd serve` of `img` on TCP (control socket in `dir`) with a memory budget of `budget`,
/// `conn` of it per connection and a 2 s stall timeout, once its port is open; returns the
/// process, `host:port` and the control socket.
fn serve_budget(
    dir: &Path,
    img: &Path,
    budget: &str,
    conn: &str,
) -> (common::Proc, String, PathBuf) {
    let ctl = dir.join("ctl.sock");
    let (srv, port, listen) = serve_tcp(
        img,
        &ctl,
        &[
            "--memory-budget",
            budget,
            "--conn-memory",
            conn,
            "--stall-timeout",
            "2",
        ],
        None,
        &dir.join("serve.log"),
    );
    assert!(common::wait_tcp(port, Duration::from_secs(10)));
    (srv, listen, ctl)
}

/// Waits (30 s at most, polling every `poll`) until the server's memory in use reaches `n`.
fn wait_memory_used(ctl: &Path, n: u64, poll: Duration) {
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let q = query(ctl);
        if counter(&q, &["server", "memory_used"]) >= n {
            break;
        }
        assert!(Instant::now() < end, "budget never filled: {q}");
        std::thread::sleep(poll);
    }
}

/// Fixed newstyle negotiation with `NBD_OPT_EXPORT_NAME`; returns the export size.
fn negotiate<S: Read + Write>(s: &mut S, name: &str) -> u64 {
    let mut g = [0u8; proto::GREETING_LEN];
    s.read_exact(&mut g).unwrap();
    proto::parse_greeting(&g).unwrap();
    let mut b = (proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES)
        .to_be_bytes()
        .to_vec();
    b.extend_from_slice(&proto::IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt::EXPORT_NAME.to_be_bytes());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    s.write_all(&b).unwrap();
    let mut r = [0u8; 10];
    s.read_exact(&mut r).unwrap();
    u64::from_be_bytes(r[..8].try_into().unwrap())
}

fn read_req(cookie: u64, offset: u64, length: u32) -> [u8; proto::REQUEST_LEN] {
    Request {
        flags: 0,
        typ: cmd::READ,
        cookie,
        offset,
        length,
    }
    .encode()
}

/// Whether the peer closes `s` within `within` (EOF or reset).
fn closed_within<S: Read>(s: &mut S, within: Duration) -> bool {
    let end = Instant::now() + within;
    let mut b = [0u8; 64];
    while Instant::now() < end {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

fn counter(q: &serde_json::Value, path: &[&str]) -> u64 {
    let mut v = q;
    for k in path {
        v = &v[*k];
    }
    v.as_u64().unwrap_or_else(|| panic!("no {path:?} in {q}"))
}

#[test]
fn descriptor_exhaustion_then_a_normal_client_is_served() {
    require!("prlimit", "nbdinfo");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 16 * MIB, MIB, 3);
    let ctl = d.path().join("ctl.sock");
    let (srv, port, listen) = serve_tcp(
        &img,
        &ctl,
        &["--handshake-timeout", "120"],
        Some(64),
        &d.path().join("serve.log"),
    );
    // Idle connections until the server is out of descriptors (the kernel completes the
    // TCP handshakes into the backlog whether or not the server can accept them).
    let addr: SocketAddr = listen.parse().unwrap();
    let mut idle = Vec::new();
    for _ in 0..150 {
        if let Ok(s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) {
            idle.push(s);
        }
    }
    assert!(idle.len() > 64, "only {} connections", idle.len());
    let end = Instant::now() + Duration::from_secs(20);
    while !srv.log_text().contains("accept failed") {
        assert!(
            Instant::now() < end,
            "no accept failure: {}",
            srv.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // Some time out of descriptors: the listener keeps retrying.
    std::thread::sleep(Duration::from_secs(2));
    drop(idle);

    // A normal client is served (bounded: nbdinfo under `timeout`).
    let info = ok(60, "nbdinfo", &[&format!("nbd://{listen}/disk")]);
    assert!(info.contains("export-size: 16777216"), "{info}");
    let q = query(&ctl);
    let errors = counter(&q, &["server", "listeners", "accept_errors"]);
    let log = srv.log_text();
    let logged = log.matches("accept failed").count() as u64;
    assert!(errors >= 1, "{q}");
    // Logged once per burst, not once per failure.
    assert!((1..=5).contains(&logged) && logged <= errors, "{log}");
    assert!(log.contains("accepting again"), "{log}");
    assert!(
        Path::new(&format!("/proc/{}", srv.pid())).exists(),
        "xnbd exited"
    );
    // An established connection may idle; TCP keepalive (not a timeout) finds dead peers.
    if common::have("ss") {
        let mut c = TcpStream::connect(&listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        negotiate(&mut c, "disk");
        let filter = format!("sport = :{port}");
        // The timer shows once the last reply is acknowledged.
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let ss = ok(10, "ss", &["-tnoH", "state", "established", &filter]);
            if ss.contains("keepalive") {
                break;
            }
            assert!(Instant::now() < end, "{ss}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn connection_limit_and_negotiation_timeout() {
    require!("nbdinfo");
    use std::os::unix::net::UnixStream;
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 16 * MIB, MIB, 4);
    let sock = d.path().join("nbd.sock");
    let ctl = d.path().join("ctl.sock");
    let _srv = serve_disk(
        &img,
        &[
            "--unix",
            sock.to_str().unwrap(),
            "--ctl",
            ctl.to_str().unwrap(),
            "--max-connections",
            "4",
            "--handshake-timeout",
            "1.5",
        ],
        None,
        &d.path().join("serve.log"),
        &ctl,
    );
    assert!(common::wait_path(&sock, Duration::from_secs(10)));
    let t0 = Instant::now();
    // One connection negotiates and then stays idle past the timeout.
    let mut est = UnixStream::connect(&sock).unwrap();
    est.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    assert_eq!(negotiate(&mut est, "disk"), 16 * MIB);
    // Three read the greeting and never answer.
    let mut stuck: Vec<UnixStream> = (0..3)
        .map(|_| {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .unwrap();
            let mut g = [0u8; proto::GREETING_LEN];
            s.read_exact(&mut g).unwrap();
            s
        })
        .collect();
    // The fifth is over the limit: closed at once.
    let mut over = UnixStream::connect(&sock).unwrap();
    over.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(closed_within(&mut over, Duration::from_secs(1)));
    // The silent ones are closed after the timeout, not before.
    for s in &mut stuck {
        assert!(closed_within(s, Duration::from_secs(10)));
    }
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_secs(8),
        "{took:?}"
    );
    // The established connection was left alone: it still reads.
    std::thread::sleep(Duration::from_millis(500));
    est.write_all(&read_req(7, 0, 4096)).unwrap();
    let mut r = vec![0u8; proto::SIMPLE_REPLY_LEN + 4096];
    est.read_exact(&mut r).unwrap();
    let h = proto::SimpleReply::parse(&r[..proto::SIMPLE_REPLY_LEN]).unwrap();
    assert_eq!((h.error, h.cookie), (0, 7));
    assert_eq!(
        &r[proto::SIMPLE_REPLY_LEN..],
        &std::fs::read(&img).unwrap()[..4096]
    );
    // And a normal client gets in now that slots are free.
    let info = ok(30, "nbdinfo", &[&unix_uri(&sock, "disk")]);
    assert!(info.contains("export-size: 16777216"), "{info}");
    let q = query(&ctl);
    assert_eq!(counter(&q, &["server", "listeners", "refused"]), 1, "{q}");
    assert_eq!(
        counter(&q, &["server", "listeners", "handshake_timeouts"]),
        3,
        "{q}"
    );
}

#[test]
fn clients_that_never_read_replies_hold_bounded_memory() {
    require!("qemu-io");
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 512 * MIB, 0, 5);
    let (srv, listen, ctl) = serve_budget(d.path(), &img, "128M", "16M");
    let pid = srv.pid();
    let base = vm(pid, "VmRSS:");
    // Eight clients each ask for 32 reads of 16 MiB (512 MiB) and never read a reply.
    let mut hogs = Vec::new();
    for c in 0..8u64 {
        let mut s = TcpStream::connect(&listen).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        negotiate(&mut s, "disk");
        let mut reqs = Vec::new();
        for i in 0..32u64 {
            reqs.extend_from_slice(&read_req(c << 32 | i, (i % 32) * 16 * MIB, 16 << 20));
        }
        s.write_all(&reqs).unwrap();
        hogs.push(s);
    }
    // The budget fills up (each client holds its 16 MiB share) and stays full.
    wait_memory_used(&ctl, 128 * MIB, Duration::from_millis(100));
    std::thread::sleep(Duration::from_secs(1));
    let held = vm(pid, "VmRSS:");
    // A normal client is served: it waits for the budget until the stalled clients are
    // dropped (after the stall timeout), then reads.
    let t0 = Instant::now();
    let out = ok(
        60,
        "qemu-io",
        &[
            "-f",
            "raw",
            "-r",
            "-c",
            "read -P 0 0 4M",
            &format!("nbd://{listen}/disk"),
        ],
    );
    let waited = t0.elapsed();
    assert!(out.contains("read 4194304/4194304"), "{out}");
    let peak = vm(pid, "VmHWM:");
    let q = query(&ctl);
    eprintln!(
        "rss: {} MiB at start, {} MiB with eight stalled clients, peak {} MiB; \
         normal client served in {waited:?}; {q}",
        base >> 20,
        held >> 20,
        peak >> 20
    );
    // The budget plus the server's own baseline and allocator slack; without a budget
    // the eight clients took it past 1.5 GiB.
    assert!(peak < base + 256 * MIB, "peak rss {} MiB", peak >> 20);
    assert!(counter(&q, &["server", "budget_waits"]) >= 1, "{q}");
    assert!(counter(&q, &["server", "stalled_drops"]) >= 1, "{q}");
    drop(hogs);
}

/// The same with small reads (served in groups on the runtime threads): a client that
/// pipelines 120 MiB worth of 4 KiB reads and reads no reply holds no more than its share
/// of the budget, the server's memory stays flat, and a normal client is served once the
/// stalled one is dropped.
#[test]
fn small_reads_never_read_hold_bounded_memory() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 64 * MIB, 64 * MIB, 8);
    let (srv, listen, ctl) = serve_budget(d.path(), &img, "1M", "1M");
    let pid = srv.pid();
    let base = vm(pid, "VmRSS:");
    let mut hog = TcpStream::connect(&listen).unwrap();
    negotiate(&mut hog, "disk");
    let mut reqs = Vec::new();
    for i in 0..30_000u64 {
        reqs.extend_from_slice(&read_req(i, (i * 4096) % (64 * MIB), 4096));
    }
    // The server stops taking requests once the budget is held: written from a thread
    // that gives up when the connection goes.
    let mut w = hog.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
    let sender = std::thread::spawn(move || {
        let _ = w.write_all(&reqs);
    });
    wait_memory_used(&ctl, MIB, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(500));
    let q = query(&ctl);
    let held = vm(pid, "VmRSS:");
    assert!(counter(&q, &["server", "memory_used"]) <= MIB, "{q}");
    // A normal client waits for the budget until the hog is dropped, then is served.
    let mut c = TcpStream::connect(&listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    negotiate(&mut c, "disk");
    c.write_all(&read_req(7, 8192, 4096)).unwrap();
    let mut r = [0u8; proto::SIMPLE_REPLY_LEN + 4096];
    c.read_exact(&mut r).unwrap();
    let reply = proto::SimpleReply::parse(&r[..proto::SIMPLE_REPLY_LEN]).unwrap();
    assert_eq!((reply.cookie, reply.error), (7, 0));
    assert!(r[proto::SIMPLE_REPLY_LEN..] == std::fs::read(&img).unwrap()[8192..12288]);
    let peak = vm(pid, "VmHWM:");
    let q = query(&ctl);
    eprintln!(
        "rss: {} MiB at start, {} MiB with the stalled client, peak {} MiB; {q}",
        base >> 20,
        held >> 20,
        peak >> 20
    );
    assert!(peak < base + 64 * MIB, "peak rss {} MiB", peak >> 20);
    assert!(counter(&q, &["server", "stalled_drops"]) >= 1, "{q}");
    drop(hog);
    sender.join().unwrap();
}

#[test]
fn max_block_size_follows_the_connection_share() {
    require!("nbdinfo");
    use std::os::unix::net::UnixStream;
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 32 * MIB, 8 * MIB, 6);
    let sock = d.path().join("nbd.sock");
    let _srv = serve_disk(
        &img,
        &[
            "--unix",
            sock.to_str().unwrap(),
            "--memory-budget",
            "8M",
            "--conn-memory",
            "5M",
        ],
        None,
        &d.path().join("serve.log"),
        &sock,
    );
    // The largest power of two within the 5 MiB share.
    let info = ok(30, "nbdinfo", &[&unix_uri(&sock, "disk")]);
    assert!(info.contains("block_size_maximum: 4194304"), "{info}");
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    negotiate(&mut c, "disk");
    let simple = |c: &mut UnixStream| {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        c.read_exact(&mut h).unwrap();
        proto::SimpleReply::parse(&h).unwrap()
    };
    // Larger than the maximum: refused, the connection goes on.
    c.write_all(&read_req(1, 0, 8 << 20)).unwrap();
    let r = simple(&mut c);
    assert_eq!((r.cookie, r.error), (1, proto::err::EINVAL));
    let mut w = Request {
        flags: 0,
        typ: cmd::WRITE,
        cookie: 2,
        offset: 0,
        length: 8 << 20,
    }
    .encode()
    .to_vec();
    w.resize(w.len() + (8 << 20), 0xa5);
    c.write_all(&w).unwrap();
    let r = simple(&mut c);
    assert_eq!((r.cookie, r.error), (2, proto::err::EINVAL));
    // At the maximum: served.
    c.write_all(&read_req(3, 0, 4 << 20)).unwrap();
    let r = simple(&mut c);
    assert_eq!((r.cookie, r.error), (3, 0));
    let mut data = vec![0u8; 4 << 20];
    c.read_exact(&mut data).unwrap();
    assert_eq!(data, std::fs::read(&img).unwrap()[..4 << 20]);
}

/// Writes held at the budget: a client pipelines up to 1 GiB of 16 KiB writes on a Unix
/// socket and never reads a reply. The server writes them (its write lane) until the
/// socket is full of unread replies, then stops at the connection's share of the budget;
/// its memory stays flat, another client's writes and reads are served meanwhile, and
/// when the hog goes away its connection ends too.
#[test]
fn writes_never_read_hold_the_budget_and_end_with_the_client() {
    use std::os::unix::net::UnixStream;
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("disk.img");
    common::make_image(&img, 64 * MIB, 0, 0);
    let (sock, ctl) = (d.path().join("nbd.sock"), d.path().join("ctl.sock"));
    let srv = serve_disk(
        &img,
        &[
            "--unix",
            sock.to_str().unwrap(),
            "--ctl",
            ctl.to_str().unwrap(),
            "--memory-budget",
            "8M",
            "--conn-memory",
            "4M",
        ],
        None,
        &d.path().join("serve.log"),
        &ctl,
    );
    assert!(common::wait_path(&sock, Duration::from_secs(10)));
    let pid = srv.pid();
    let base = vm(pid, "VmRSS:");
    let mut hog = UnixStream::connect(&sock).unwrap();
    negotiate(&mut hog, "disk");
    let mut w = hog.try_clone().unwrap();
    w.set_write_timeout(Some(Duration::from_secs(60))).unwrap();
    const LEN: u32 = 16 << 10;
    // Sent as it is made (1 GiB is not built in memory); ends when the connection goes.
    let sender = std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut wire = Vec::with_capacity(64 * (proto::REQUEST_LEN + LEN as usize));
        for i in 0..(1u64 << 30) / u64::from(LEN) {
            let r = Request {
                flags: 0,
                typ: cmd::WRITE,
                cookie: i,
                offset: (i * u64::from(LEN)) % (64 * MIB),
                length: LEN,
            };
            wire.extend_from_slice(&r.encode());
            wire.extend(std::iter::repeat_n(i as u8, LEN as usize));
            if wire.len() >= 64 * LEN as usize {
                if w.write_all(&wire).is_err() {
                    break;
                }
                sent += wire.len() as u64;
                wire.clear();
            }
        }
        sent
    });
    // The hog's share fills up and stays full.
    wait_memory_used(&ctl, 4 * MIB, Duration::from_millis(50));
    std::thread::sleep(Duration::from_millis(500));
    let q = query(&ctl);
    assert!(counter(&q, &["server", "memory_used"]) <= 8 * MIB, "{q}");
    let held = vm(pid, "VmRSS:");
    // Another client is served meanwhile (the rest of the budget is free).
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    negotiate(&mut c, "disk");
    let mut wire = Request {
        flags: proto::cflag::FUA,
        typ: cmd::WRITE,
        cookie: 7,
        offset: 8192,
        length: 4096,
    }
    .encode()
    .to_vec();
    wire.extend_from_slice(&[0x5a; 4096]);
    c.write_all(&wire).unwrap();
    let mut r = [0u8; proto::SIMPLE_REPLY_LEN];
    c.read_exact(&mut r).unwrap();
    let reply = proto::SimpleReply::parse(&r).unwrap();
    assert_eq!((reply.cookie, reply.error), (7, 0));
    c.write_all(&read_req(8, 8192, 4096)).unwrap();
    let mut r = [0u8; proto::SIMPLE_REPLY_LEN + 4096];
    c.read_exact(&mut r).unwrap();
    let reply = proto::SimpleReply::parse(&r[..proto::SIMPLE_REPLY_LEN]).unwrap();
    assert_eq!((reply.cookie, reply.error), (8, 0));
    assert!(r[proto::SIMPLE_REPLY_LEN..].iter().all(|&b| b == 0x5a));
    drop(c);
    // Still held: the hog was not dropped, only stopped.
    let q = query(&ctl);
    assert!(counter(&q, &["server", "memory_used"]) >= 4 * MIB, "{q}");
    // The hog goes: the sender stops, and the server closes its side (no hang on the
    // writes in flight or the unread replies).
    hog.shutdown(std::net::Shutdown::Both).unwrap();
    let sent = sender.join().unwrap();
    assert!(
        sent < 1 << 30,
        "the server took all {sent} bytes: it never pushed back"
    );
    let end = Instant::now() + Duration::from_secs(30);
    loop {
        let q = query(&ctl);
        if counter(&q, &["server", "listeners", "open"]) == 0 {
            assert_eq!(counter(&q, &["server", "memory_used"]), 0, "{q}");
            break;
        }
        assert!(Instant::now() < end, "connections still open: {q}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let peak = vm(pid, "VmHWM:");
    eprintln!(
        "rss: {} MiB at start, {} MiB with the hog at its share, peak {} MiB; hog sent {} MiB",
        base >> 20,
        held >> 20,
        peak >> 20,
        sent >> 20
    );
    // The budget, the idle buffer pool (16 MiB) and allocator slack.
    assert!(peak < base + 64 * MIB, "peak rss {} MiB", peak >> 20);
}
