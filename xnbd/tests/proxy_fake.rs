//! The proxy in-process against a scriptable fake NBD source: each read can be answered,
//! refused with an error, cut off half-way through its reply, or left unanswered, and the
//! source checks every request against the block sizes it advertised. Counts are exact and
//! the scenarios take a few seconds.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};

use xnbd::client::Addr;
use xnbd::proto::{
    self, cmd, err, opt, rep, tflag, ClientOption, InfoItem, OptionReply, Request, SimpleReply,
};
use xnbd::proxy::{Proxy, ProxyConfig, Status};

const SIZE: usize = 4 << 20;

/// What the source does with one read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    /// Answer with the data.
    Data,
    /// Answer with this NBD error.
    Error(u32),
    /// Send the header and half the data, then drop the connection.
    CutOff,
    /// Never answer (the connection stays open).
    Silent,
}

type Script = dyn Fn(u64, u64, u32) -> Act + Send + Sync;

/// The fake source: an export of `data`, advertising `limits` (min, preferred, max).
struct Fake {
    data: Arc<Vec<u8>>,
    limits: (u32, u32, u32),
    /// Decides each read from (read number, offset, length).
    script: Arc<Script>,
    reads: AtomicU64,
    connections: AtomicU64,
    /// Reads outside the advertised limits (answered with EINVAL, as nbdkit's
    /// `blocksize-policy` does).
    violations: AtomicU64,
    /// Read times (since `t0`), for rate checks.
    log: Mutex<Vec<Duration>>,
    t0: Instant,
}

impl Fake {
    fn new(data: Vec<u8>, limits: (u32, u32, u32), script: Arc<Script>) -> Arc<Self> {
        Arc::new(Self {
            data: Arc::new(data),
            limits,
            script,
            reads: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            violations: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            t0: Instant::now(),
        })
    }

    fn start(self: &Arc<Self>, sock: &Path) -> tokio::task::JoinHandle<()> {
        let l = UnixListener::bind(sock).unwrap();
        let me = self.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                me.connections.fetch_add(1, Ordering::Relaxed);
                let me = me.clone();
                tokio::spawn(async move {
                    let _ = me.serve(s).await;
                });
            }
        })
    }

    fn reads_between(&self, a: Duration, b: Duration) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|t| **t >= a && **t < b).count()
    }

    async fn serve(&self, mut s: UnixStream) -> std::io::Result<()> {
        s.write_all(&proto::encode_greeting(
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        ))
        .await?;
        let _client_flags = s.read_u32().await?;
        loop {
            let mut h = [0u8; proto::OPTION_HEADER_LEN];
            s.read_exact(&mut h).await?;
            let (code, len) = proto::parse_option_header(&h).map_err(std::io::Error::other)?;
            let mut data = vec![0u8; len as usize];
            s.read_exact(&mut data).await?;
            match ClientOption::parse(code, &data) {
                Ok(ClientOption::Go(_)) => {
                    let (min, preferred, max) = self.limits;
                    let export = InfoItem::Export {
                        size: self.data.len() as u64,
                        flags: tflag::HAS_FLAGS | tflag::READ_ONLY,
                    };
                    let bs = InfoItem::BlockSize {
                        min,
                        preferred,
                        max,
                    };
                    s.write_all(&OptionReply::info(opt::GO, &export).encode())
                        .await?;
                    s.write_all(&OptionReply::info(opt::GO, &bs).encode())
                        .await?;
                    s.write_all(&OptionReply::ack(opt::GO).encode()).await?;
                    break;
                }
                _ => {
                    s.write_all(&OptionReply::error(code, rep::ERR_UNSUP, "").encode())
                        .await?;
                }
            }
        }
        loop {
            let mut b = [0u8; proto::REQUEST_LEN];
            s.read_exact(&mut b).await?;
            let r = Request::parse(&b).map_err(std::io::Error::other)?;
            if r.typ == cmd::DISC {
                return Ok(());
            }
            if r.typ != cmd::READ {
                let e = SimpleReply {
                    error: err::EINVAL,
                    cookie: r.cookie,
                };
                s.write_all(&e.encode()).await?;
                continue;
            }
            let n = self.reads.fetch_add(1, Ordering::Relaxed);
            self.log.lock().unwrap().push(self.t0.elapsed());
            let (min, _, max) = self.limits;
            let end = r.offset + u64::from(r.length);
            if r.offset % u64::from(min) != 0
                || (end % u64::from(min) != 0 && end != self.data.len() as u64)
                || r.length > max
                || end > self.data.len() as u64
            {
                self.violations.fetch_add(1, Ordering::Relaxed);
                let e = SimpleReply {
                    error: err::EINVAL,
                    cookie: r.cookie,
                };
                s.write_all(&e.encode()).await?;
                continue;
            }
            let ok = SimpleReply {
                error: 0,
                cookie: r.cookie,
            };
            let bytes = &self.data[r.offset as usize..end as usize];
            match (self.script)(n, r.offset, r.length) {
                Act::Data => {
                    s.write_all(&ok.encode()).await?;
                    s.write_all(bytes).await?;
                }
                Act::Error(e) => {
                    let e = SimpleReply {
                        error: e,
                        cookie: r.cookie,
                    };
                    s.write_all(&e.encode()).await?;
                }
                Act::CutOff => {
                    s.write_all(&ok.encode()).await?;
                    s.write_all(&bytes[..bytes.len() / 2]).await?;
                    return Ok(());
                }
                Act::Silent => {}
            }
        }
    }
}

fn image() -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..SIZE)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn config(dir: &Path, sock: &Path, block_size: u32, timeout: Duration) -> ProxyConfig {
    ProxyConfig {
        source: Addr::Unix(sock.to_owned()),
        export_name: String::new(),
        tls: None,
        cache: dir.join("cache.img"),
        bitmap: dir.join("cache.bitmap"),
        block_size,
        rate: 0,
        background: true,
        background_chunk: 256 << 10,
        background_depth: 4,
        source_timeout: timeout,
        readahead: 0,
    }
}

async fn wait_complete(p: &Proxy, secs: u64) -> Status {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = p.status();
        if st.cached_blocks == st.total_blocks {
            return st;
        }
        assert!(Instant::now() < end, "copy did not finish: {st:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// 512-byte proxy blocks against a source with a 4 KiB minimum and a 64 KiB maximum: no
/// request breaks the limits, unaligned client reads and the copy give the source's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_keep_to_the_advertised_block_sizes() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("src.sock");
    let data = image();
    let fake = Fake::new(
        data.clone(),
        (4096, 4096, 64 << 10),
        Arc::new(|_, _, _| Act::Data),
    );
    let _srv = fake.start(&sock);
    let mut cfg = config(d.path(), &sock, 512, Duration::from_secs(5));
    cfg.background = false;
    let p = Proxy::start(cfg).await.unwrap();
    for (off, len) in [
        (1000u64, 3000usize),
        (100_000, 1 << 20),
        (SIZE as u64 - 700, 700),
    ] {
        let got = p.read(off, vec![0u8; len], 0).await.unwrap();
        assert!(
            got == data[off as usize..off as usize + len],
            "at {off}+{len}"
        );
    }
    p.cache_all();
    let st = wait_complete(&p, 30).await;
    assert_eq!(fake.violations.load(Ordering::Relaxed), 0);
    assert_eq!(st.source_errors, 0, "{st:?}");
    assert!(std::fs::read(d.path().join("cache.img")).unwrap() == data);
}

/// Every read fails for 3 s: the background copy sends one request per backoff period
/// (10 ms doubling), a client read still gets its answer (EIO) at once, status reports the
/// failure; then the copy completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_reads_back_off_and_clients_are_not_held() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("src.sock");
    let data = image();
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let fake = Fake::new(
        data.clone(),
        (1, 4096, 32 << 20),
        Arc::new(move |_, _, _| {
            if f.load(Ordering::Relaxed) {
                Act::Error(err::EIO)
            } else {
                Act::Data
            }
        }),
    );
    let _srv = fake.start(&sock);
    let p = Proxy::start(config(d.path(), &sock, 65536, Duration::from_secs(5)))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = Instant::now();
    let e = p.read(2 << 20, vec![0u8; 4096], 0).await.unwrap_err();
    assert_eq!(e.errno, err::EIO);
    assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let st = p.status();
    assert!(st.source_failing, "{st:?}");
    assert!(st.source_failing_secs.unwrap() >= 2.5, "{st:?}");
    assert!(
        st.source_last_error.as_deref().unwrap().contains("error 5"),
        "{st:?}"
    );
    // Turns at about 0, 10, 30, 70, 150, 310, 630, 1270, 2550 ms, plus the four chunks in
    // flight when the first error came back and the client's read: 14 at most; without a
    // backoff it was thousands.
    let n = fake.reads.load(Ordering::Relaxed);
    println!("reads in 3 s of errors: {n}");
    assert!(n <= 16, "{n} reads in 3 s of errors");
    // Later turns are spaced out: at most 2 reads in the last second.
    let late = fake.reads_between(Duration::from_secs(2), Duration::from_secs(3));
    assert!(late <= 2, "{late} reads in the third second");

    failing.store(false, Ordering::Relaxed);
    let t = Instant::now();
    let st = wait_complete(&p, 30).await;
    println!("copy complete {:?} after recovery", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!p.status().source_failing, "{st:?}");
    assert!(std::fs::read(d.path().join("cache.img")).unwrap() == data);
}

/// Replies cut off half-way (the first six reads) and a read left unanswered: the proxy
/// reconnects, a stalled connection is given up after the timeout, and the copy completes
/// with the source's bytes. Reconnections stay few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_and_unanswered_replies_are_survived() {
    let d = tempfile::tempdir().unwrap();
    let sock = d.path().join("src.sock");
    let data = image();
    let fake = Fake::new(
        data.clone(),
        (512, 4096, 1 << 20),
        Arc::new(|n, _, _| match n {
            0..=5 => Act::CutOff,
            6 => Act::Silent,
            _ => Act::Data,
        }),
    );
    let _srv = fake.start(&sock);
    let p = Proxy::start(config(d.path(), &sock, 65536, Duration::from_secs(1)))
        .await
        .unwrap();
    let st = wait_complete(&p, 30).await;
    assert!(std::fs::read(d.path().join("cache.img")).unwrap() == data);
    assert!(st.source_errors >= 7, "{st:?}");
    let conns = fake.connections.load(Ordering::Relaxed);
    println!("{conns} connections, {} source errors", st.source_errors);
    assert!((3..=12).contains(&conns), "{conns} connections");
    assert!(
        st.source_last_error
            .as_deref()
            .is_some_and(|e| e.contains("no reply")),
        "{st:?}"
    );
    assert!(!st.source_failing, "{st:?}");
}
