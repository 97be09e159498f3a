//! The proxy against awkward sources (nbdkit filters): advertised block size limits, a
//! source failing every read for a while, a slow link without `--rate`, a source that
//! stops answering; and two proxies on one cache.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{nbdkit, ok, query, run, unix_uri, wait_status, xnbd, Proc, XNBD};

const MIB: u64 = 1 << 20;
/// Exit status of `xnbd proxy` when its cache is in use.
const EXIT_LOCKED: i32 = 75;

struct ProxyRun {
    dir: PathBuf,
    sock: PathBuf,
    ctl: PathBuf,
    cache: PathBuf,
}

impl ProxyRun {
    fn new(dir: &Path, tag: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            sock: dir.join(format!("{tag}.sock")),
            ctl: dir.join(format!("{tag}.ctl")),
            cache: dir.join("cache.img"),
        }
    }
    fn args<'a>(&'a self, source: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "proxy",
            "--source",
            source,
            "--cache",
            self.cache.to_str().unwrap(),
            "--unix",
            self.sock.to_str().unwrap(),
            "--ctl",
            self.ctl.to_str().unwrap(),
        ];
        if !extra.contains(&"--block-size") {
            a.extend_from_slice(&["--block-size", "64K"]);
        }
        a.extend_from_slice(extra);
        a
    }
    fn start(&self, source: &str, extra: &[&str], log: &str) -> Proc {
        let _ = std::fs::remove_file(&self.sock);
        let p = xnbd(&self.args(source, extra), &self.dir.join(log), &self.sock);
        assert!(common::wait_path(&self.ctl, Duration::from_secs(10)));
        p
    }
    fn uri(&self) -> String {
        unix_uri(&self.sock, "")
    }
    fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut a = vec!["ctl", "--socket", self.ctl.to_str().unwrap()];
        a.extend_from_slice(args);
        run(120, XNBD, &a)
    }
    fn cache_all(&self) -> serde_json::Value {
        let o = self.ctl(&["--json", "cache-all", "--timeout", "90"]);
        assert!(
            o.status.success(),
            "cache-all: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

fn src_uri(sock: &Path) -> String {
    format!("unix:{}", sock.display())
}

fn qemu_io(uri: &str, cmds: &[&str]) -> std::process::Output {
    let mut a = vec!["-f", "raw"];
    for c in cmds {
        a.extend_from_slice(&["-c", c]);
    }
    a.push(uri);
    run(60, "qemu-io", &a)
}

fn failed(o: &std::process::Output) -> bool {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    !o.status.success() || text.contains("error")
}

/// A source advertising 16 KiB minimum and 512 KiB maximum block sizes and refusing
/// anything else: large on-demand reads, unaligned reads with a 4 KiB proxy block, and the
/// background copy with 2 MiB chunks all stay within the limits, and the data matches.
#[test]
fn source_block_size_limits_are_respected() {
    require!("nbdkit", "qemu-io");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 16 * MIB, 16 * MIB, 21);
    let ssock = d.path().join("src.sock");
    let slog = d.path().join("nbdkit-reads.log");
    let _source = nbdkit(
        &ssock,
        &[
            "--filter=log",
            "--filter=blocksize-policy",
            "file",
            src.to_str().unwrap(),
            &format!("logfile={}", slog.display()),
            "blocksize-minimum=16384",
            "blocksize-preferred=65536",
            "blocksize-maximum=524288",
            "blocksize-error-policy=error",
        ],
        &d.path().join("nbdkit.log"),
    );
    let p = ProxyRun::new(d.path(), "proxy");
    let _proxy = p.start(
        &src_uri(&ssock),
        &[
            "--block-size",
            "4K",
            "--no-background",
            "--background-chunk",
            "2M",
            "--readahead",
            "0",
        ],
        "proxy.log",
    );
    // 3 MiB in one client request (6 source requests), then 4 KiB blocks inside 16 KiB
    // source blocks.
    let o = qemu_io(
        &p.uri(),
        &["read 1M 3M", "read 5M 4k", "read 6148k 8k", "read 8M 1536k"],
    );
    assert!(!failed(&o), "{o:?}");
    let cache = std::fs::read(&p.cache).unwrap();
    let want = std::fs::read(&src).unwrap();
    assert_eq!(cache[1 << 20..4 << 20], want[1 << 20..4 << 20]);
    assert_eq!(
        cache[5 << 20..(5 << 20) + 4096],
        want[5 << 20..(5 << 20) + 4096]
    );
    let q = query(&p.ctl);
    assert_eq!(u(&q, "source_errors"), 0, "{q}");

    // The background copy in chunks four times the source's maximum.
    let q = p.cache_all();
    assert_eq!(u(&q, "cached_blocks"), u(&q, "total_blocks"), "{q}");
    assert_eq!(u(&q, "source_errors"), 0, "{q}");
    assert!(common::same_bytes(&p.cache, &src));

    let reads = common::nbdkit_reads(&slog);
    assert!(reads.len() >= 32, "{} reads", reads.len());
    for &(off, count) in &reads {
        assert!(
            count <= 512 << 10,
            "read of {count} at {off} over the maximum"
        );
        assert!(
            off % 16384 == 0 && count % 16384 == 0,
            "read of {count} at {off} not aligned to the minimum"
        );
    }
    // Large requests were split at the maximum, not into small pieces.
    assert!(
        reads.iter().any(|&(_, c)| c == 512 << 10),
        "no read used the maximum"
    );
}

/// A source failing every read for 10 s: the proxy's requests stay few (backoff), status
/// says it is failing, since when and why; once healthy, the copy completes with the
/// source's bytes.
#[test]
fn failing_source_backs_off_then_copy_completes() {
    require!("nbdkit", "qemu-io");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 16 * MIB, 16 * MIB, 22);
    let ssock = d.path().join("src.sock");
    let slog = d.path().join("nbdkit-reads.log");
    let flag = d.path().join("failing");
    std::fs::write(&flag, b"").unwrap();
    let _source = nbdkit(
        &ssock,
        &[
            "--filter=log",
            "--filter=error",
            "file",
            src.to_str().unwrap(),
            &format!("logfile={}", slog.display()),
            "error-pread=EIO",
            "error-pread-rate=100%",
            &format!("error-pread-file={}", flag.display()),
        ],
        &d.path().join("nbdkit.log"),
    );
    let p = ProxyRun::new(d.path(), "proxy");
    let mut proxy = p.start(&src_uri(&ssock), &[], "proxy.log");
    let t0 = Instant::now();
    let q = wait_status(&p.ctl, Duration::from_secs(10), |q| {
        q["source_failing"] == true
    });
    assert!(q["source_failing_since"].as_u64().is_some(), "{q}");
    assert!(
        q["source_last_error"]
            .as_str()
            .is_some_and(|e| e.contains("error 5")),
        "{q}"
    );
    // The table says so too.
    let text = String::from_utf8_lossy(&p.ctl(&["query"]).stdout).into_owned();
    assert!(text.contains("FAILING since"), "{text}");
    std::thread::sleep(Duration::from_secs(10).saturating_sub(t0.elapsed()));
    let during = common::nbdkit_reads(&slog).len();
    let q = query(&p.ctl);
    assert_eq!(u(&q, "cached_blocks"), 0, "{q}");
    assert!(u(&q, "source_backoff_ms") >= 1000, "{q}");
    // 10 ms doubling to 5 s is about a dozen turns in 10 s (plus the requests already in
    // flight when the first error came back); without a backoff this was tens of thousands
    // a second.
    println!("requests while failing for 10 s: {during}");
    assert!(during <= 40, "{during} requests while failing");
    let warnings = proxy
        .log_text()
        .lines()
        .filter(|l| l.contains("WARN"))
        .count();
    assert!(warnings <= 5, "{warnings} warnings:\n{}", proxy.log_text());

    // Healthy again: the copy completes (within one backoff period of 5 s, then the copy).
    std::fs::remove_file(&flag).unwrap();
    let t = Instant::now();
    let q = p.cache_all();
    println!("copy complete {:?} after the source recovered", t.elapsed());
    assert_eq!(u(&q, "cached_blocks"), u(&q, "total_blocks"), "{q}");
    assert_eq!(q["source_failing"], false, "{q}");
    assert!(q["source_last_error"].as_str().is_some(), "{q}");
    assert!(common::same_bytes(&p.cache, &src));
    proxy.kill9();
}

/// A slow link: a Unix socket relay to `target` passing the server's bytes on at
/// `rate` bytes/s in small pieces (as a slow TCP path does, unlike nbdkit's rate filter,
/// which holds each whole reply back). Stops accepting when the guard is dropped.
struct SlowLink {
    stop: Arc<AtomicBool>,
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn slow_link(listen: &Path, target: &Path, rate: u64) -> SlowLink {
    let l = UnixListener::bind(listen).unwrap();
    l.set_nonblocking(true).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let target = target.to_owned();
    std::thread::spawn(move || {
        while !st.load(Ordering::Relaxed) {
            let Ok((down, _)) = l.accept() else {
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            down.set_nonblocking(false).unwrap();
            let Ok(up) = UnixStream::connect(&target) else {
                continue;
            };
            let (mut d_in, mut u_out) = (down.try_clone().unwrap(), up.try_clone().unwrap());
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut d_in, &mut u_out);
                let _ = u_out.shutdown(std::net::Shutdown::Write);
            });
            let (mut u_in, mut d_out) = (up, down);
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let mut sent = 0u64;
                let mut buf = [0u8; 8192];
                while let Ok(n) = u_in.read(&mut buf) {
                    if n == 0 || d_out.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n as u64;
                    let due = Duration::from_secs_f64(sent as f64 / rate as f64);
                    std::thread::sleep(due.saturating_sub(t0.elapsed()));
                }
                let _ = d_out.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    SlowLink { stop }
}

/// A slow link (2 MiB/s) and a background copy without `--rate`: client reads queue
/// behind 4 MiB of background requests, twice `--source-timeout`, and still succeed. A
/// source that stops answering altogether is given up after about the timeout.
#[test]
fn source_timeout_counts_silence_not_queueing() {
    require!("nbdkit", "qemu-io");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 8 * MIB, 8 * MIB, 23);
    let ssock = d.path().join("src.sock");
    let _source = nbdkit(
        &ssock,
        &["file", src.to_str().unwrap()],
        &d.path().join("nbdkit.log"),
    );
    let lsock = d.path().join("link.sock");
    let _link = slow_link(&lsock, &ssock, 2 * MIB);
    let p = ProxyRun::new(d.path(), "proxy");
    let proxy = p.start(
        &src_uri(&lsock),
        &["--source-timeout", "1", "--readahead", "0"],
        "proxy.log",
    );
    // Let the background copy fill the link, then read blocks it has not reached.
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    for off in ["7M", "6656k", "6M"] {
        let o = qemu_io(&p.uri(), &[&format!("read {off} 64k")]);
        assert!(
            !failed(&o),
            "read at {off} after {:?}: {o:?}\n{}",
            t.elapsed(),
            proxy.log_text()
        );
    }
    let waited = t.elapsed();
    println!("three queued client reads took {waited:?}");
    // They did queue behind the copy for longer than the timeout.
    assert!(waited > Duration::from_millis(1500), "{waited:?}");
    let q = p.cache_all();
    assert!(common::same_bytes(&p.cache, &src));
    assert_eq!(u(&q, "source_errors"), 0, "{q}");

    // A source that accepts the connection and then never answers a read.
    let d2 = tempfile::tempdir().unwrap();
    let hsock = d2.path().join("hung.sock");
    let _hung = nbdkit(
        &hsock,
        &[
            "--filter=delay",
            "file",
            src.to_str().unwrap(),
            "delay-read=60",
        ],
        &d2.path().join("nbdkit.log"),
    );
    let p2 = ProxyRun::new(d2.path(), "proxy");
    let _proxy2 = p2.start(
        &src_uri(&hsock),
        &[
            "--source-timeout",
            "1",
            "--no-background",
            "--readahead",
            "0",
        ],
        "proxy.log",
    );
    let t = Instant::now();
    let o = qemu_io(&p2.uri(), &["read 0 64k"]);
    let took = t.elapsed();
    println!("read from a silent source failed after {took:?}");
    assert!(failed(&o), "{o:?}");
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let q = query(&p2.ctl);
    assert!(
        q["source_last_error"]
            .as_str()
            .is_some_and(|e| e.contains("no reply")),
        "{q}"
    );
}

/// A second proxy on a cache in use is refused with one line and its own exit status, and
/// changes nothing; a proxy killed with SIGKILL leaves no lock behind.
#[test]
fn one_proxy_per_cache_and_no_stale_lock() {
    require!("nbdkit", "qemu-io");
    let d = tempfile::tempdir().unwrap();
    let src = d.path().join("src.img");
    common::make_image(&src, 8 * MIB, 8 * MIB, 24);
    let ssock = d.path().join("src.sock");
    let _source = nbdkit(
        &ssock,
        &["file", src.to_str().unwrap()],
        &d.path().join("nbdkit.log"),
    );
    let a = ProxyRun::new(d.path(), "a");
    let mut pa = a.start(&src_uri(&ssock), &["--no-background"], "a.log");
    ok(
        30,
        "qemu-io",
        &["-f", "raw", "-c", "write -P 0x5a 1M 64k", &a.uri()],
    );
    let bitmap = d.path().join("cache.img.bitmap");
    let before = std::fs::read(&bitmap).unwrap();

    // Same cache, other sockets: refused before it touches anything.
    let b = ProxyRun::new(d.path(), "b");
    let src_b = src_uri(&ssock);
    let o = run(30, XNBD, &b.args(&src_b, &[]));
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert_eq!(o.status.code(), Some(EXIT_LOCKED), "{o:?}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.contains("in use by another process"), "{err}");
    assert!(err.contains(&format!("pid {}", pa.pid())), "{err}");
    assert!(!b.sock.exists() && !b.ctl.exists());
    assert_eq!(std::fs::read(&bitmap).unwrap(), before);
    // The first proxy is unaffected.
    let o = qemu_io(&a.uri(), &["read -P 0x5a 1M 64k"]);
    assert!(!failed(&o), "{o:?}");

    // Killed: the next proxy starts on the same cache and keeps the write.
    pa.kill9();
    let c = ProxyRun::new(d.path(), "c");
    let _pc = c.start(&src_uri(&ssock), &["--no-background"], "c.log");
    let q = query(&c.ctl);
    assert_eq!(q["mode"], "proxy", "{q}");
    let o = qemu_io(&c.uri(), &["read -P 0x5a 1M 64k"]);
    assert!(!failed(&o), "{o:?}");
}
