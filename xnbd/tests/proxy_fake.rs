//! The proxy in-process against a scriptable fake NBD source: each read can be answered
//! (at once or after a delay), refused with an error, cut off half-way through its reply,
//! or left unanswered; the source can go away (listener and connections closed) and come
//! back, at the same address or another; it checks every request against the block sizes
//! it advertised. Counts are exact and the scenarios take a few seconds.
//!
//! Virtual time: the tests on a current-thread runtime pause the clock (`time::pause`)
//! while the proxy waits for a failing or missing source, so that 10 s of backoff or a 30 s
//! source timeout pass at once and exactly. The clock runs again (`time::resume`) before
//! anything is written to the cache: a paused clock jumps to the next timer whenever every
//! task waits, and a task waiting for a blocking-pool write (the cache, its `fdatasync`,
//! the bitmap) would see stall timeouts of its source connection expire that never did.

mod common;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::time::Instant;

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
    /// Answer with the data after this long (later requests on the connection wait).
    Delay(Duration),
}

type Script = dyn Fn(u64, u64, u32) -> Act + Send + Sync;

/// Decides a read by the connection it came on (numbered from 0 in accept order), before
/// the script: `None` leaves it to the script.
type ConnScript = dyn Fn(u64) -> Option<Act> + Send + Sync;

/// The fake source: an export of `data`, advertising `limits` (min, preferred, max).
struct Fake {
    data: Arc<Vec<u8>>,
    limits: (u32, u32, u32),
    /// Decides each read from (read number, offset, length).
    script: Arc<Script>,
    reads: AtomicU64,
    connections: AtomicU64,
    /// Connections past this many open at once are closed at once (0: no limit).
    max_open: AtomicU64,
    open: Arc<AtomicU64>,
    /// Reads answered (or not) per connection number.
    per_conn: Mutex<Vec<u64>>,
    conn_script: Mutex<Option<Arc<ConnScript>>>,
    /// Reads outside the advertised limits (answered with EINVAL, as nbdkit's
    /// `blocksize-policy` does).
    violations: AtomicU64,
    /// Read times (since `t0`), for rate checks.
    log: Mutex<Vec<Duration>>,
    t0: Instant,
    /// Delayed reads waiting for their answer now, and the most there ever were.
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
}

impl Fake {
    fn new(data: Vec<u8>, limits: (u32, u32, u32), script: Arc<Script>) -> Arc<Self> {
        Arc::new(Self {
            data: Arc::new(data),
            limits,
            script,
            reads: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            max_open: AtomicU64::new(0),
            open: Arc::new(AtomicU64::new(0)),
            per_conn: Mutex::new(Vec::new()),
            conn_script: Mutex::new(None),
            violations: AtomicU64::new(0),
            log: Mutex::new(Vec::new()),
            t0: Instant::now(),
            in_flight: AtomicU64::new(0),
            most_in_flight: AtomicU64::new(0),
        })
    }

    /// Listen on `sock` until the returned handle is dropped, which closes the listener
    /// and every connection (the source goes away; connecting is then refused).
    fn start(self: &Arc<Self>, sock: &Path) -> Up {
        let _ = std::fs::remove_file(sock);
        let l = UnixListener::bind(sock).unwrap();
        let me = self.clone();
        Up(tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            while let Ok((s, _)) = l.accept().await {
                let max = me.max_open.load(Ordering::Relaxed);
                if max > 0 && me.open.load(Ordering::Relaxed) >= max {
                    // A source that takes fewer clients: closed before the greeting.
                    drop(s);
                    continue;
                }
                let id = me.connections.fetch_add(1, Ordering::Relaxed);
                me.per_conn.lock().unwrap().push(0);
                let me = me.clone();
                let open = Open::new(me.open.clone());
                conns.spawn(async move {
                    let _open = open;
                    let _ = me.serve(s, id).await;
                });
                while conns.try_join_next().is_some() {}
            }
        }))
    }

    fn reads_between(&self, a: Duration, b: Duration) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|t| **t >= a && **t < b).count()
    }

    /// Reads each connection saw, in accept order.
    fn reads_per_connection(&self) -> Vec<u64> {
        self.per_conn.lock().unwrap().clone()
    }

    async fn serve(&self, mut s: UnixStream, id: u64) -> std::io::Result<()> {
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
            self.per_conn.lock().unwrap()[id as usize] += 1;
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
            let by_conn = self.conn_script.lock().unwrap().clone();
            let act = by_conn
                .and_then(|f| f(id))
                .unwrap_or_else(|| (self.script)(n, r.offset, r.length));
            match act {
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
                Act::Delay(d) => {
                    let now = self.in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                    self.most_in_flight.fetch_max(now, Ordering::Relaxed);
                    tokio::time::sleep(d).await;
                    self.in_flight.fetch_sub(1, Ordering::Relaxed);
                    s.write_all(&ok.encode()).await?;
                    s.write_all(bytes).await?;
                }
            }
        }
    }
}

/// Counts one open connection of the fake source while it lives.
struct Open(Arc<AtomicU64>);

impl Open {
    fn new(c: Arc<AtomicU64>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        Self(c)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A running fake source; dropping it takes the source away (the accept task and, with
/// its join set, every connection task are aborted, closing their sockets).
struct Up(tokio::task::JoinHandle<()>);

impl Drop for Up {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn image() -> Vec<u8> {
    common::pattern(0x2545_f491_4f6c_dd1d, SIZE)
}

/// The proxy's settings that differ between scenarios.
#[derive(Debug, Clone, Copy)]
struct Opts {
    block_size: u32,
    source_timeout: Duration,
    /// Copy in the background from the start.
    background: bool,
    /// Readahead start and maximum, bytes.
    readahead: (u64, u64),
    background_yield: bool,
    /// Source connections.
    connections: usize,
    /// On-demand fetches split over the connections.
    demand_split: bool,
}

impl Opts {
    /// 64 KiB blocks, no background copy until `cache_all`, no readahead, background yield.
    fn new(source_timeout: Duration) -> Self {
        Self {
            block_size: 65536,
            source_timeout,
            background: false,
            readahead: (0, 0),
            background_yield: true,
            connections: 1,
            demand_split: true,
        }
    }
}

/// A proxy of the source on `sock` with its cache in `dir`.
async fn start_proxy(dir: &Path, sock: &Path, o: Opts) -> Arc<Proxy> {
    let cfg = ProxyConfig {
        source: Addr::Unix(sock.to_owned()),
        export_name: String::new(),
        tls: None,
        cache: dir.join("cache.img"),
        bitmap: dir.join("cache.bitmap"),
        block_size: o.block_size,
        rate: 0,
        background: o.background,
        background_chunk: 256 << 10,
        background_depth: 4,
        source_timeout: o.source_timeout,
        readahead: o.readahead.0,
        readahead_max: o.readahead.1,
        background_yield: o.background_yield,
        demand_split: o.demand_split,
        source_connections: o.connections,
    };
    Proxy::start(cfg).await.unwrap()
}

/// Block sizes (minimum, preferred, maximum) of a source that takes any request.
const ANY_SIZE: (u32, u32, u32) = (1, 4096, 32 << 20);

/// One scenario's pieces: a temporary directory for the cache, the source's image and a
/// fake source of it advertising `limits`, not yet listening.
struct Rig {
    dir: tempfile::TempDir,
    data: Vec<u8>,
    fake: Arc<Fake>,
}

impl Rig {
    fn new(
        limits: (u32, u32, u32),
        script: impl Fn(u64, u64, u32) -> Act + Send + Sync + 'static,
    ) -> Self {
        let data = image();
        let fake = Fake::new(data.clone(), limits, Arc::new(script));
        Self {
            dir: tempfile::tempdir().unwrap(),
            data,
            fake,
        }
    }

    /// A source taking any request size ([`ANY_SIZE`]) that answers every read `ms`
    /// after the one before it on the same connection.
    fn with_delay(ms: u64) -> Self {
        Self::new(ANY_SIZE, move |_, _, _| {
            Act::Delay(Duration::from_millis(ms))
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Starts the fake source on `src.sock` and a proxy of it.
    async fn start(&self, o: Opts) -> (Up, Arc<Proxy>) {
        let sock = self.path("src.sock");
        let srv = self.fake.start(&sock);
        (srv, start_proxy(self.dir.path(), &sock, o).await)
    }

    /// Asserts that `len` bytes read at `off` are the source's.
    fn assert_data(&self, got: &[u8], off: u64, len: usize) {
        assert!(
            got == &self.data[off as usize..off as usize + len],
            "at {off}+{len}"
        );
    }

    /// Asserts that the cache file holds the whole image.
    fn assert_cache_complete(&self) {
        assert!(std::fs::read(self.path("cache.img")).unwrap() == self.data);
    }

    /// The blocks the bitmap file marks.
    fn marked(&self) -> Vec<usize> {
        marked(&self.path("cache.bitmap"), SIZE / 65536)
    }

    /// Waits until the source has seen `n` reads.
    async fn wait_reads(&self, n: u64) {
        let end = Instant::now() + Duration::from_secs(10);
        while self.fake.reads.load(Ordering::Relaxed) < n {
            assert!(Instant::now() < end, "the background copy did not start");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// [`Rig::with_delay`] with the source up and a proxy of it started with `o`.
async fn rig_with_delay(ms: u64, o: Opts) -> (Rig, Up, Arc<Proxy>) {
    let r = Rig::with_delay(ms);
    let (srv, p) = r.start(o).await;
    (r, srv, p)
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
    let r = Rig::new((4096, 4096, 64 << 10), |_, _, _| Act::Data);
    let o = Opts {
        block_size: 512,
        ..Opts::new(Duration::from_secs(5))
    };
    let (_srv, p) = r.start(o).await;
    for (off, len) in [
        (1000u64, 3000usize),
        (100_000, 1 << 20),
        (SIZE as u64 - 700, 700),
    ] {
        let got = p.read(off, vec![0u8; len], 0).await.unwrap();
        r.assert_data(&got, off, len);
    }
    p.cache_all();
    let st = wait_complete(&p, 30).await;
    assert_eq!(r.fake.violations.load(Ordering::Relaxed), 0);
    assert_eq!(st.source_errors, 0, "{st:?}");
    r.assert_cache_complete();
}

/// Counts the warnings logged on this thread (the proxy's tasks run on it: current-thread
/// runtime).
#[derive(Clone, Default)]
struct Warnings(Arc<AtomicU64>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
    fn on_event(&self, e: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if *e.metadata().level() == tracing::Level::WARN {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Every read fails for 10 s (virtual time): the background copy sends one request per
/// backoff period (10 ms doubling to 5 s), a client read still gets its answer (EIO) at
/// once, status reports the failure, since when and why, and the log gets two lines, not
/// one per error; then the copy completes with the source's bytes.
#[tokio::test]
async fn failing_reads_back_off_and_clients_are_not_held() {
    use tracing_subscriber::layer::SubscriberExt;
    let warnings = Warnings::default();
    let _log =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));
    let failing = Arc::new(AtomicBool::new(true));
    let f = failing.clone();
    let r = Rig::new(ANY_SIZE, move |_, _, _| {
        if f.load(Ordering::Relaxed) {
            Act::Error(err::EIO)
        } else {
            Act::Data
        }
    });
    let fake = &r.fake;
    let o = Opts {
        background: true,
        ..Opts::new(Duration::from_secs(5))
    };
    let (_srv, p) = r.start(o).await;
    // Nothing reaches the cache while every read fails: the clock may stand still.
    tokio::time::pause();
    let t0 = fake.t0;
    tokio::time::sleep_until(t0 + Duration::from_millis(1500)).await;
    let t = Instant::now();
    let e = p.read(2 << 20, vec![0u8; 4096], 0).await.unwrap_err();
    assert_eq!(e.errno, err::EIO);
    assert!(t.elapsed() < Duration::from_millis(1), "{:?}", t.elapsed());
    tokio::time::sleep_until(t0 + Duration::from_secs(10)).await;
    let st = p.status();
    assert!(st.source_failing, "{st:?}");
    assert_eq!(st.cached_blocks, 0, "{st:?}");
    assert!(st.source_failing_since.is_some(), "{st:?}");
    assert!(st.source_failing_secs.unwrap() >= 9.5, "{st:?}");
    assert!(st.source_backoff_ms >= 1000, "{st:?}");
    assert!(
        st.source_last_error.as_deref().unwrap().contains("error 5"),
        "{st:?}"
    );
    // Turns at about 0, 10, 30, 70, 150, 310, 630, 1270, 2550, 5110 ms, plus the four
    // chunks in flight when the first error came back and the client's read: 15 at most;
    // without a backoff it was tens of thousands a second.
    let n = fake.reads.load(Ordering::Relaxed);
    let late = fake.reads_between(Duration::from_secs(3), Duration::from_secs(10));
    println!("reads in 10 s of errors: {n}, {late} of them after 3 s");
    assert!(n <= 16, "{n} reads in 10 s of errors");
    assert!(late <= 2, "{late} reads between 3 s and 10 s");
    // "source failing" and "source still failing after N errors".
    let w = warnings.0.load(Ordering::Relaxed);
    assert!(w <= 3, "{w} warnings");

    // Healthy again; the cache is written from here on, so real time.
    tokio::time::resume();
    failing.store(false, Ordering::Relaxed);
    let t = Instant::now();
    let st = wait_complete(&p, 30).await;
    println!("copy complete {:?} after recovery", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(!st.source_failing, "{st:?}");
    assert!(st.source_last_error.is_some(), "{st:?}");
    r.assert_cache_complete();
}

/// The source goes away with blocks missing (default 30 s source timeout, in virtual
/// time): local blocks are served, a read of a missing block fails with EIO after the
/// timeout and not before; a read waiting while the source comes back gets its data; when
/// it goes again, `reconnect` to another address lets the copy finish.
#[tokio::test]
async fn source_outage_eio_after_the_timeout_then_reconnect() {
    let r = Rig::new(ANY_SIZE, |_, _, _| Act::Data);
    let (fake, data) = (&r.fake, &r.data);
    let (sock_a, sock_b) = (r.path("a.sock"), r.path("b.sock"));
    let a = fake.start(&sock_a);
    let p = start_proxy(r.dir.path(), &sock_a, Opts::new(Duration::from_secs(30))).await;
    let got = p.read(0, vec![0u8; 1 << 20], 0).await.unwrap();
    assert!(got == data[..1 << 20]);

    // The source goes away. Local blocks stay readable.
    drop(a);
    let got = p.read(4096, vec![0u8; 65536], 0).await.unwrap();
    assert!(got == data[4096..4096 + 65536]);
    // A missing block: the client waits for the source timeout, then gets EIO.
    tokio::time::pause();
    let t = Instant::now();
    let e = p.read(3 << 20, vec![0u8; 65536], 0).await.unwrap_err();
    assert_eq!(e.errno, err::EIO);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
        "{waited:?}"
    );
    let st = p.status();
    assert!(!st.source_connected && st.source_failing, "{st:?}");

    // A client waits for another missing block; the source comes back 10 s later.
    let q = p.clone();
    let t = Instant::now();
    let waiting = tokio::spawn(async move { q.read(2 << 20, vec![0u8; 65536], 0).await });
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(!waiting.is_finished());
    let a = fake.start(&sock_a);
    // The fetched block is written to the cache: real time from here on.
    tokio::time::resume();
    let got = waiting.await.unwrap().unwrap();
    assert!(got == data[2 << 20..(2 << 20) + 65536]);
    let waited = t.elapsed();
    assert!(waited < Duration::from_secs(12), "{waited:?}");

    // It goes again; pointed at another address, the proxy finishes the copy.
    drop(a);
    let _b = fake.start(&sock_b);
    p.reconnect(Some(Addr::Unix(sock_b.clone())));
    p.cache_all();
    let st = wait_complete(&p, 30).await;
    assert!(st.source.contains("b.sock"), "{st:?}");
    r.assert_cache_complete();
}

/// Replies cut off half-way (the first six reads) and a read left unanswered: the proxy
/// reconnects, a stalled connection is given up after the timeout, and the copy completes
/// with the source's bytes. Reconnections stay few.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_off_and_unanswered_replies_are_survived() {
    let r = Rig::new((512, 4096, 1 << 20), |n, _, _| match n {
        0..=5 => Act::CutOff,
        6 => Act::Silent,
        _ => Act::Data,
    });
    let o = Opts {
        background: true,
        ..Opts::new(Duration::from_secs(1))
    };
    let (_srv, p) = r.start(o).await;
    let st = wait_complete(&p, 30).await;
    r.assert_cache_complete();
    assert!(st.source_errors >= 7, "{st:?}");
    let conns = r.fake.connections.load(Ordering::Relaxed);
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

/// A slow source (each reply 250 ms after the one before it, on the one connection) and a
/// 1 s source timeout: client reads queued behind the background copy wait longer than the
/// timeout and still succeed (silence counts, not queueing); the copy completes without a
/// source error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queueing_behind_a_slow_source_is_not_silence() {
    let o = Opts {
        background: true,
        ..Opts::new(Duration::from_secs(1))
    };
    let (r, _srv, p) = rig_with_delay(250, o).await;
    // The background copy fills the queue (four chunks, a second of replies) first.
    r.wait_reads(4).await;
    let t = Instant::now();
    for off in [(7 << 19) as u64, 13 << 18, 3 << 20] {
        let got = p.read(off, vec![0u8; 65536], 0).await.unwrap();
        r.assert_data(&got, off, 65536);
    }
    let waited = t.elapsed();
    println!("three queued client reads took {waited:?}");
    assert!(waited > Duration::from_millis(1500), "{waited:?}");
    let st = wait_complete(&p, 60).await;
    assert_eq!(st.source_errors, 0, "{st:?}");
    r.assert_cache_complete();
}

/// A source that accepts the connection and never answers a read, 1 s source timeout: a
/// client read fails after about a second (virtual time) and status says why.
#[tokio::test]
async fn a_silent_source_fails_a_read_after_the_timeout() {
    let r = Rig::new(ANY_SIZE, |_, _, _| Act::Silent);
    let (_srv, p) = r.start(Opts::new(Duration::from_secs(1))).await;
    // No reply ever arrives, so nothing is written to the cache: the clock may stand still.
    tokio::time::pause();
    let t = Instant::now();
    let e = p.read(0, vec![0u8; 65536], 0).await.unwrap_err();
    let took = t.elapsed();
    println!("read from a silent source failed after {took:?} (virtual)");
    assert_eq!(e.errno, err::EIO);
    assert!(
        took >= Duration::from_secs(1) && took <= Duration::from_millis(2500),
        "{took:?}"
    );
    let st = p.status();
    assert!(
        st.source_last_error
            .as_deref()
            .is_some_and(|e| e.contains("no reply")),
        "{st:?}"
    );
}

/// The blocks the bitmap file marks (header of 32 bytes, then one bit per block).
fn marked(bitmap: &Path, nblocks: usize) -> Vec<usize> {
    let b = std::fs::read(bitmap).unwrap();
    (0..nblocks)
        .filter(|i| b[32 + i / 8] & (1 << (i % 8)) != 0)
        .collect()
}

/// Waits until the proxy's status has `n` blocks local.
async fn wait_cached(p: &Proxy, n: u64, secs: u64) -> Status {
    let end = Instant::now() + Duration::from_secs(secs);
    loop {
        let st = p.status();
        if st.cached_blocks >= n {
            return st;
        }
        assert!(Instant::now() < end, "{n} blocks not local: {st:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Eight readers of one cold block and of ranges overlapping it, all at once, against a
/// source that answers after 200 ms: the source sees one request, every reader gets the
/// source's bytes from that one fetch, and the block is counted fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_readers_of_a_cold_block_fetch_it_once() {
    let (r, _srv, p) = rig_with_delay(200, Opts::new(Duration::from_secs(10))).await;
    let t = Instant::now();
    let mut readers = tokio::task::JoinSet::new();
    for (off, len) in [
        (1 << 20, 65536usize),
        (1 << 20, 65536),
        ((1 << 20) + 100, 4000),
        ((1 << 20) + 60000, 5536),
        (1 << 20, 65536),
        ((1 << 20) + 4096, 8192),
        ((1 << 20) + 32768, 32768),
        (1 << 20, 512),
    ] {
        let p = p.clone();
        readers.spawn(async move { (off, len, p.read(off, vec![0u8; len], 0).await) });
    }
    while let Some(j) = readers.join_next().await {
        let (off, len, got) = j.unwrap();
        r.assert_data(&got.unwrap(), off, len);
    }
    let took = t.elapsed();
    println!("eight readers of one cold block: {took:?}");
    // Bounded (a hang would show here); how much under depends on the machine's load.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(r.fake.reads.load(Ordering::Relaxed), 1);
    let st = wait_cached(&p, 1, 10).await;
    assert_eq!((st.cached_blocks, st.fetched_blocks), (1, 1), "{st:?}");
    assert_eq!(st.fetched_bytes, 65536, "{st:?}");
}

/// A sequential reader through the last 2 MiB of the device: readahead grows from 64 KiB
/// to 1 MiB, fetches every block once, asks for nothing past the device end (the source
/// counts any such request), and its requests are several at once, not one per read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readahead_grows_and_stops_at_the_device_end() {
    let r = Rig::new((4096, 4096, 256 << 10), |_, _, _| {
        Act::Delay(Duration::from_millis(20))
    });
    let fake = &r.fake;
    let o = Opts {
        readahead: (64 << 10, 1 << 20),
        ..Opts::new(Duration::from_secs(10))
    };
    let (_srv, p) = r.start(o).await;
    let start = SIZE - (2 << 20);
    for off in (start..SIZE).step_by(64 << 10) {
        let got = p.read(off as u64, vec![0u8; 64 << 10], 0).await.unwrap();
        r.assert_data(&got, off as u64, 64 << 10);
    }
    let st = wait_cached(&p, 32, 10).await;
    // Let anything still in flight land, then count.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let st2 = p.status();
    assert_eq!(st2.cached_blocks, 32, "{st:?}");
    assert_eq!(st2.fetched_blocks, 32, "{st2:?}");
    assert_eq!(st2.fetched_bytes, 2 << 20, "{st2:?}");
    assert_eq!(fake.violations.load(Ordering::Relaxed), 0);
    let reads = fake.reads.load(Ordering::Relaxed);
    println!("32 sequential reads of 64 KiB: {reads} source requests");
    // Without readahead: 32 requests, each a round trip.
    assert!(reads < 32, "{reads} source requests");
    let bm = r.marked();
    assert_eq!(bm, (start / 65536..SIZE / 65536).collect::<Vec<_>>());
}

/// The source answers reads below 640 KiB and cuts every other reply off half-way (then
/// it goes away): of a 1 MiB readahead extent the first two chunks arrive and the other two
/// never do; no block is marked that was not written with the source's bytes, the
/// reader's own blocks are right, and what the bitmap file marks equals what status
/// counts. Every wait is on a condition (a loaded machine only makes it slower).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_dying_mid_extent_marks_only_written_blocks() {
    let r = Rig::new(ANY_SIZE, |_, off, _| {
        if off < 640 << 10 {
            Act::Data
        } else {
            Act::CutOff
        }
    });
    let data = &r.data;
    // Patience long enough for the reader's own fetches to get through while the cut
    // chunks keep cutting off the connections they share.
    let o = Opts {
        readahead: (1 << 20, 2 << 20),
        ..Opts::new(Duration::from_secs(20))
    };
    let (srv, p) = r.start(o).await;
    // Two sequential reads: the second asks for 1 MiB ahead (from 128 KiB) in four 256
    // KiB chunks, of which two are answered whole.
    for off in [0u64, 65536] {
        let got = p.read(off, vec![0u8; 65536], 0).await.unwrap();
        r.assert_data(&got, off, 65536);
    }
    // The whole chunks land; the cut ones are retried on new connections and cut off
    // again until the source goes away.
    wait_cached(&p, 10, 30).await;
    drop(srv);
    // Blocks are marked after their data is durable, in group commits.
    let end = Instant::now() + Duration::from_secs(10);
    while r.marked().len() < 10 && Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = p.status();
    let bm = r.marked();
    println!("marked after the source died mid-extent: {bm:?}; {st:?}");
    assert_eq!(bm.len() as u64, st.cached_blocks, "{st:?}");
    assert_eq!(bm, (0..10).collect::<Vec<_>>());
    let cache = std::fs::read(r.path("cache.img")).unwrap();
    for b in bm {
        let r = b * 65536..(b + 1) * 65536;
        assert!(
            cache[r.clone()] == data[r],
            "block {b} marked with wrong bytes"
        );
    }
}

/// A source that never answers reads of one region, 1 s source timeout: a local block is
/// read at once meanwhile, a reader of another missing block gets its data on a new
/// connection, and the reader of the silent region gets EIO within a few seconds, not
/// never.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_region_does_not_hold_other_reads() {
    let r = Rig::new(ANY_SIZE, |_, off, _| {
        if (2 << 20..3 << 20).contains(&off) {
            Act::Silent
        } else {
            Act::Data
        }
    });
    let data = &r.data;
    let (_srv, p) = r.start(Opts::new(Duration::from_secs(1))).await;
    let got = p.read(0, vec![0u8; 65536], 0).await.unwrap();
    assert!(got == data[..65536]);
    wait_cached(&p, 1, 10).await;
    let t = Instant::now();
    let q = p.clone();
    let silent = tokio::spawn(async move { q.read(2 << 20, vec![0u8; 65536], 0).await });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // A local block: no wait for the source at all.
    let t_local = Instant::now();
    let got = p.read(0, vec![0u8; 65536], 0).await.unwrap();
    assert!(got == data[..65536]);
    assert!(
        t_local.elapsed() < Duration::from_millis(200),
        "{:?}",
        t_local.elapsed()
    );
    // Another missing block, asked for on the connection that went silent.
    let got = p.read(1 << 20, vec![0u8; 65536], 0).await.unwrap();
    assert!(got == data[1 << 20..(1 << 20) + 65536]);
    let other = t.elapsed();
    let e = tokio::time::timeout(Duration::from_secs(10), silent)
        .await
        .expect("the read of the silent region never ended")
        .unwrap()
        .unwrap_err();
    let failed = t.elapsed();
    println!("other missing block after {other:?}, silent region failed after {failed:?}");
    assert_eq!(e.errno, err::EIO);
    assert!(other < Duration::from_secs(4), "{other:?}");
    assert!(failed < Duration::from_secs(6), "{failed:?}");
}

/// While clients keep reading cold blocks, the background copy keeps one request in
/// flight instead of four, so that their requests queue behind fewer chunks: three reads
/// in a row against a source answering every 200 ms take less time with the yield than
/// without it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_reads_go_ahead_of_the_background_copy() {
    let mut took = Vec::new();
    for yield_ in [true, false] {
        let o = Opts {
            background_yield: yield_,
            ..Opts::new(Duration::from_secs(10))
        };
        let (r, _srv, p) = rig_with_delay(200, o).await;
        p.cache_all();
        r.wait_reads(4).await;
        let t = Instant::now();
        for i in 0..3u64 {
            let off = (3 << 20) + i * (128 << 10);
            let got = p.read(off, vec![0u8; 4096], 0).await.unwrap();
            r.assert_data(&got, off, 4096);
        }
        took.push(t.elapsed());
    }
    println!("three cold reads behind the background copy: {took:?} (yield, no yield)");
    // With the yield: about 5 + 2 x 2 replies of 200 ms; without: up to 3 x 5.
    assert!(took[1] > took[0] + Duration::from_millis(400), "{took:?}");
}

impl Rig {
    /// Decide reads by their connection first (see [`ConnScript`]).
    fn by_connection(&self, f: impl Fn(u64) -> Option<Act> + Send + Sync + 'static) {
        *self.fake.conn_script.lock().unwrap() = Some(Arc::new(f));
    }
}

/// Waits until `n` source connections are up.
async fn wait_links(p: &Proxy, n: usize) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let st = p.status();
        if st.source_connections_up >= n {
            return;
        }
        assert!(Instant::now() < end, "{n} connections not up: {st:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn several(connections: usize, source_timeout: Duration) -> Opts {
    Opts {
        connections,
        ..Opts::new(source_timeout)
    }
}

/// Four source connections against a source answering each read 60 ms after the one
/// before it on the same connection: the copy and a sequential reader's readahead use all
/// four, the copy takes well under the one-connection time, every block is fetched once
/// and the cache holds the source's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_source_connections_share_the_fetches() {
    let o = Opts {
        readahead: (256 << 10, 1 << 20),
        ..several(4, Duration::from_secs(5))
    };
    let (r, _srv, p) = rig_with_delay(60, o).await;
    wait_links(&p, 4).await;
    // A sequential reader over the first MiB: its blocks and the readahead spread.
    for i in 0..4u64 {
        let off = i * (256 << 10);
        let got = p.read(off, vec![0u8; 256 << 10], 0).await.unwrap();
        r.assert_data(&got, off, 256 << 10);
    }
    p.cache_all();
    let st = wait_complete(&p, 30).await;
    let per = r.fake.reads_per_connection();
    let most = r.fake.most_in_flight.load(Ordering::Relaxed);
    println!("reads per connection {per:?}; at most {most} answered at once");
    assert_eq!(per.len(), 4, "{per:?}");
    assert!(per.iter().all(|&n| n >= 2), "{per:?}");
    // Each connection's reads wait 60 ms one after another: the copy used the four at
    // once, which one connection never does (a count, not a duration: load cannot fail it).
    assert!(most >= 2, "at most {most} source reads in flight at once");
    assert_eq!(st.fetched_blocks, st.total_blocks, "{st:?}");
    assert_eq!(st.source_errors, 0, "{st:?}");
    assert_eq!(r.fake.violations.load(Ordering::Relaxed), 0);
    r.assert_cache_complete();
}

/// A cold 1 MiB client read over four source connections is split in four pieces, one
/// per connection, fetched at once (so the client waits for the slowest 256 KiB, not for
/// one connection to carry the MiB; on new TCP connections that is three slow-start round
/// trips less); with the split off it goes whole to one connection. Either way the data
/// is the source's and each block is fetched once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_client_read_is_split_over_the_connections() {
    for split in [true, false] {
        let o = Opts {
            demand_split: split,
            ..several(4, Duration::from_secs(5))
        };
        let (r, _srv, p) = rig_with_delay(20, o).await;
        wait_links(&p, 4).await;
        let got = p.read(1 << 20, vec![0u8; 1 << 20], 0).await.unwrap();
        r.assert_data(&got, 1 << 20, 1 << 20);
        let per = r.fake.reads_per_connection();
        println!("split {split}: reads per connection {per:?}");
        if split {
            assert_eq!(per, vec![1, 1, 1, 1]);
        } else {
            assert_eq!(per.iter().sum::<u64>(), 1, "{per:?}");
        }
        let st = wait_cached(&p, 16, 10).await;
        assert_eq!(st.fetched_blocks, 16, "{st:?}");
        assert_eq!(r.fake.violations.load(Ordering::Relaxed), 0);
    }
}

/// A source connection cut off in the middle of a reply, once under a client read and once
/// while the copy runs: the reads it carried are sent again on another connection at once
/// (the client gets its data, no EIO, no wait for a reconnection), the connection comes
/// back, and every block is fetched once and marked with the source's bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_cut_off_mid_fetch_is_retried_on_another() {
    let r = Rig::new(ANY_SIZE, |n, _, _| match n {
        0 | 8 => Act::CutOff,
        _ => Act::Delay(Duration::from_millis(5)),
    });
    let (_srv, p) = r.start(several(4, Duration::from_secs(5))).await;
    wait_links(&p, 4).await;
    let t = Instant::now();
    let got = p.read(1 << 20, vec![0u8; 1 << 20], 0).await.unwrap();
    let took = t.elapsed();
    r.assert_data(&got, 1 << 20, 1 << 20);
    println!("client read cut off once took {took:?}");
    assert!(took < Duration::from_millis(500), "{took:?}");
    // Four pieces of 256 KiB, one per connection, and the cut one again.
    assert_eq!(r.fake.reads.load(Ordering::Relaxed), 5);
    p.cache_all();
    let st = wait_complete(&p, 30).await;
    println!("{st:?}");
    assert!(st.source_errors >= 2, "{st:?}");
    assert_eq!(st.fetched_blocks, st.total_blocks, "{st:?}");
    assert!(!st.source_failing, "{st:?}");
    assert_eq!(r.marked().len(), SIZE / 65536);
    r.assert_cache_complete();
    // The cut connections were opened again.
    assert!(r.fake.connections.load(Ordering::Relaxed) >= 5);
}

/// One source connection (the first opened) never answers, `--source-timeout 2`: eight
/// concurrent reads of cold blocks mostly land on the other three and are answered at once;
/// those the silent one took are sent again on another connection once it is found silent
/// and get their data too (no EIO, no hang).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_connection_does_not_hold_the_others() {
    let r = Rig::with_delay(20);
    r.by_connection(|id| (id == 0).then_some(Act::Silent));
    let (_srv, p) = r.start(several(4, Duration::from_secs(2))).await;
    wait_links(&p, 4).await;
    let t = Instant::now();
    let mut reads = tokio::task::JoinSet::new();
    for i in 0..8u64 {
        let q = p.clone();
        let off = i * (512 << 10);
        reads.spawn(async move {
            let got = q.read(off, vec![0u8; 65536], 0).await;
            (off, got, t.elapsed())
        });
    }
    let mut times = Vec::new();
    let all = tokio::time::timeout(Duration::from_secs(10), async {
        while let Some(j) = reads.join_next().await {
            let (off, got, took) = j.unwrap();
            r.assert_data(&got.unwrap(), off, 65536);
            times.push(took);
        }
    })
    .await;
    assert!(all.is_ok(), "reads still waiting after 10 s: {times:?}");
    times.sort();
    let per = r.fake.reads_per_connection();
    println!("read times {times:?}; reads per connection {per:?}");
    let quick = times
        .iter()
        .filter(|t| **t < Duration::from_millis(1000))
        .count();
    assert!(per[0] >= 1, "{per:?}");
    assert!(quick as u64 >= 8 - per[0].min(3), "{times:?} {per:?}");
    assert!(quick >= 5, "{times:?}");
    // The silent connection's reads: after its stall timeout, not much later.
    assert!(times[7] < Duration::from_secs(5), "{times:?}");
    let st = p.status();
    assert!(
        st.source_last_error
            .as_deref()
            .is_some_and(|e| e.contains("no reply")),
        "{st:?}"
    );
}

/// A source that takes one client at a time (qemu-nbd's default) and closes the others:
/// the proxy carries on with one connection, the extra ones are tried again now and then
/// without counting as a source failure, and the copy completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_taking_one_client_is_enough() {
    let r = Rig::new(ANY_SIZE, |_, _, _| Act::Data);
    r.fake.max_open.store(1, Ordering::Relaxed);
    let (_srv, p) = r.start(several(4, Duration::from_secs(5))).await;
    let got = p.read(0, vec![0u8; 65536], 0).await.unwrap();
    r.assert_data(&got, 0, 65536);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let st = p.status();
    assert_eq!(
        (st.source_connections, st.source_connections_up),
        (4, 1),
        "{st:?}"
    );
    assert!(!st.source_failing && st.source_errors == 0, "{st:?}");
    p.cache_all();
    let st = wait_complete(&p, 30).await;
    assert_eq!(st.source_errors, 0, "{st:?}");
    assert_eq!(st.fetched_blocks, st.total_blocks, "{st:?}");
    r.assert_cache_complete();
}
