//! The migration proxy (destination side of a disk relocation).
//!
//! Clients see an ordinary NBD export. Behind it, a local cache file holds the blocks that
//! have arrived and a [`Bitmap`] says which ones those are. A read of a missing block
//! fetches it from the source (any NBD server) on demand; a write stays local (a partially
//! written missing block is fetched first); a background task copies the remaining blocks,
//! keeping the link full, with the rate budget shared with on-demand fetches (which go
//! first, and while they are in flight the background copy keeps one request of its own
//! in flight instead of `background_depth`); sequential reads trigger readahead, decided
//! when the read arrives and fetched alongside it, in chunks all in flight at once, with a
//! window that doubles while the reader stays sequential (see [`Readahead`]).
//! Once every block is local the proxy drops the source and keeps serving as a plain
//! target, without interrupting clients.
//!
//! Concurrency: a block being fetched or written-while-missing is *claimed* in the
//! in-flight table; anyone else needing it waits for the claim to go away and then looks
//! at the bitmap again, except a reader: a fetch publishes its data to the claim as soon as
//! it arrives, and readers waiting for those blocks answer from it (no block is fetched
//! twice, and nobody waits for another fetch's `fdatasync`). Fetches claim only blocks nobody holds (and never wait while holding
//! claims); writers claim all missing blocks of their range or nothing, so claims cannot
//! deadlock.
//!
//! Crash safety: data written and `fdatasync`ed, then the bitmap bit set and persisted
//! (see [`crate::bitmap`]). A restart resumes from the bitmap and fetches only clear blocks.
//! A client read that fetches blocks is answered from the fetched data as soon as it
//! arrives; the blocks are written, made durable and marked after that, in the background
//! (with every other fetch ready by then: one `fdatasync` of the cache and one of the
//! bitmap for the lot), and stay claimed until they are marked.
//!
//! Source connections: `source_connections` NBD connections to the source, each kept up
//! by a reconnector of its own; every request goes to the live one with the fewest reply
//! bytes outstanding (so a long link carries several TCP windows at once, and a client's
//! fetch does not queue behind one connection's backlog); an on-demand fetch is split
//! over them, its pieces requested at once. A request whose connection dies
//! or falls silent is sent again at once on another live connection, once. An extra
//! connection the source does not accept while another works is retried now and then and
//! is not a source failure.
//!
//! Source outage: fetches wait for the source to come back (the reconnector retries at
//! most every second, at the same address or a new one given with `reconnect`), for at most
//! `source_timeout` counted from the moment the source went missing (not from the client's
//! request, which may have queued behind the background copy on a slow link); a client
//! request touching a missing block then fails with `EIO`. A connected source that leaves
//! requests unanswered, with no reply byte for `source_timeout`, counts as gone (see
//! [`crate::client`]). Requests touching only local blocks are unaffected. The background
//! copy pauses and resumes by itself.
//!
//! Source errors: every failed request to the source (an error reply, a lost connection, a
//! failed connection attempt) extends a backoff, 10 ms doubling to 5 s, reset by the next
//! successful read. The background copy sends no request before its turn, so a source
//! that fails every read sees a few requests per backoff period, not a loop; on-demand
//! reads still go at once (one try per client request). `status` reports the failure, its
//! start and the last error.
//!
//! Exclusive use: the proxy holds a lock on the cache and bitmap files (see [`crate::lock`]).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures_util::future::try_join_all;
use serde::Serialize;
use thiserror::Error;
use tokio::sync::{oneshot, watch, Notify};
use tokio::time::Instant;
use tracing::{info, warn};

use crate::bitmap::{Bitmap, BitmapError};
use crate::client::{Addr, Client, ClientError, ClientTls};
use crate::lock::{FileLock, LockError};
use crate::op::{blocking, OpError};
use crate::proto::err;
use crate::storage::Storage;

/// Longest wait for a source connection and handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest single fetch handed to the client (which splits it further at the source's
/// maximum block size).
const MAX_FETCH: u64 = 4 << 20;
/// First pause after a source error.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause between requests while the source keeps failing.
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Longest pause between connection attempts, so that a client waiting for a source that
/// comes back is served within a second of it.
const RECONNECT_MAX: Duration = Duration::from_secs(1);
/// How long a background fetch holding claims waits for a missing source before it lets
/// the blocks go (clients needing them then fetch them with their own patience).
const BACKGROUND_PATIENCE: Duration = Duration::from_secs(1);
/// Most source connections a proxy opens.
pub const MAX_SOURCE_CONNECTIONS: usize = 16;
/// First pause before an extra source connection that failed is tried again while
/// another one works (a source that takes fewer clients: qemu-nbd's default of one).
const EXTRA_RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest such pause.
const EXTRA_RETRY_MAX: Duration = Duration::from_secs(30);

/// Proxy errors at setup.
#[derive(Debug, Error)]
pub enum ProxyError {
    /// Local file I/O.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// Bitmap problem.
    #[error(transparent)]
    Bitmap(#[from] BitmapError),
    /// Source unreachable or unusable.
    #[error("source: {0}")]
    Source(#[from] ClientError),
    /// The cache or bitmap is in use by another process.
    #[error(transparent)]
    Locked(#[from] LockError),
    /// Inconsistent files or arguments.
    #[error("{0}")]
    Config(String),
}

/// Proxy settings.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// Source server.
    pub source: Addr,
    /// Export name at the source.
    pub export_name: String,
    /// TLS towards the source.
    pub tls: Option<ClientTls>,
    /// Local image (created sparse if missing).
    pub cache: PathBuf,
    /// Bitmap file (created if missing).
    pub bitmap: PathBuf,
    /// Block size (unit of fetch and of the bitmap).
    pub block_size: u32,
    /// Background copy rate in bytes per second (0: unlimited).
    pub rate: u64,
    /// Run the background copy from the start (otherwise only after `cache-all`).
    pub background: bool,
    /// Bytes per background request.
    pub background_chunk: u64,
    /// Background requests in flight at once.
    pub background_depth: usize,
    /// How long client requests touching missing blocks wait for an absent source.
    pub source_timeout: Duration,
    /// Bytes fetched ahead of a sequential reader at first (0: no readahead).
    pub readahead: u64,
    /// Largest readahead window: it doubles with every sequential read up to this (at or
    /// below `readahead`: a fixed window).
    pub readahead_max: u64,
    /// While on-demand fetches (client reads, readahead) are in flight, the background
    /// copy keeps at most one request of its own in flight, so that the requests clients
    /// wait for do not queue behind `background_depth` chunks at the source.
    pub background_yield: bool,
    /// On-demand fetches are split over the live source connections and their pieces
    /// fetched at once (false: each goes whole to one connection).
    pub demand_split: bool,
    /// Source connections (1 to [`MAX_SOURCE_CONNECTIONS`]): each request goes to the
    /// least busy one, so that a long link whose TCP window bounds one stream carries
    /// several windows at once.
    pub source_connections: usize,
}

/// Mode of the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Data still partly at the source.
    Proxy,
    /// Every block local (or forced): the source is no longer used.
    Target,
}

/// Status reported by `xnbd ctl query`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Proxy or target.
    pub mode: Mode,
    /// Current source address.
    pub source: String,
    /// Whether a source connection is up.
    pub source_connected: bool,
    /// Source connections the proxy keeps open (`--source-connections`).
    pub source_connections: usize,
    /// Of those, how many are up.
    pub source_connections_up: usize,
    /// Export size.
    pub size: u64,
    /// Block size.
    pub block_size: u32,
    /// Number of blocks.
    pub total_blocks: u64,
    /// Blocks local.
    pub cached_blocks: u64,
    /// Blocks fetched from the source by this process.
    pub fetched_blocks: u64,
    /// Bytes fetched from the source by this process.
    pub fetched_bytes: u64,
    /// Blocks fetched on demand (client reads, partial writes, readahead, CACHE).
    pub demand_blocks: u64,
    /// Blocks fetched by the background copy.
    pub background_blocks: u64,
    /// Bytes of `fetched_bytes` fetched on demand (source -> proxy link).
    pub demand_bytes: u64,
    /// Bytes of `fetched_bytes` fetched by the background copy (source -> proxy link).
    pub background_bytes: u64,
    /// Bytes sent to clients as read replies (proxy -> client link).
    pub client_read_bytes: u64,
    /// Bytes received from clients as write payloads (client -> proxy link).
    pub client_write_bytes: u64,
    /// Client writes that made a missing block local without fetching it.
    pub written_blocks: u64,
    /// Fetch rate over the last seconds, bytes per second.
    pub rate_bytes_per_sec: f64,
    /// Background rate limit (0: none).
    pub rate_limit: u64,
    /// Background copy running.
    pub background: bool,
    /// Estimated seconds to completion (null when unknown).
    pub eta_secs: Option<f64>,
    /// Source failures seen.
    pub source_errors: u64,
    /// Source requests are failing: errors since the last successful read.
    pub source_failing: bool,
    /// Unix time (seconds) of the first error of the current failure.
    pub source_failing_since: Option<u64>,
    /// Seconds since then.
    pub source_failing_secs: Option<f64>,
    /// Errors since the last successful read.
    pub source_errors_in_row: u64,
    /// Current pause between background requests (and, up to a second, connection
    /// attempts), milliseconds; 0 while the source is healthy.
    pub source_backoff_ms: u64,
    /// The last source error seen (kept after recovery).
    pub source_last_error: Option<String>,
}

/// Source health: the current run of errors and the backoff it implies.
#[derive(Debug, Default)]
struct Health {
    /// Errors since the last successful read.
    errors: u64,
    /// A read (not only a connection attempt) failed since the last successful read.
    reads_failed: bool,
    /// First error of the current run.
    since: Option<(Instant, SystemTime)>,
    last_error: Option<String>,
    /// Earliest start of the next background request.
    next: Option<Instant>,
    /// Whether the "still failing" line was logged for this run.
    logged_cap: bool,
}

impl Health {
    fn backoff(&self) -> Duration {
        if self.errors == 0 {
            return Duration::ZERO;
        }
        let shift = (self.errors - 1).min(20) as u32;
        BACKOFF_MIN.saturating_mul(1 << shift).min(BACKOFF_MAX)
    }
}

/// Fetched data: `(offset, bytes)` pieces in offset order.
type Pieces = Vec<(u64, Vec<u8>)>;

/// What a claim fetched, published to readers waiting for its blocks as soon as it
/// arrives (before it is stored, made durable and marked).
struct Fetched {
    /// The claim's blocks, sorted.
    blocks: Vec<u64>,
    pieces: Arc<Pieces>,
}

/// Watches a claim: `None` until its data arrives (if it is a fetch), closed when the
/// claim ends.
type Waiter = watch::Receiver<Option<Arc<Fetched>>>;

/// Runs of blocks waiting to be committed, and who to tell the outcome.
type Committing = (Vec<(u64, u64)>, oneshot::Sender<Result<(), OpError>>);

/// Blocks whose data is written to the cache and waits to be made durable and marked,
/// together with whatever else is ready by then (group commit).
#[derive(Default)]
struct Commits {
    queue: Mutex<Vec<Committing>>,
    /// Held by the one caller committing a batch.
    turn: tokio::sync::Mutex<()>,
}

/// Blocks held by one fetch or write; released (and waiters woken) on drop.
struct Claim {
    table: Arc<Mutex<HashMap<u64, Waiter>>>,
    blocks: Vec<u64>,
    tx: watch::Sender<Option<Arc<Fetched>>>,
}

impl Claim {
    /// Hand the fetched data to readers waiting for these blocks (the claim stays until
    /// the blocks are marked).
    fn publish(&self, pieces: &Arc<Pieces>) -> Arc<Fetched> {
        let f = Arc::new(Fetched {
            blocks: self.blocks.clone(),
            pieces: pieces.clone(),
        });
        self.tx.send_replace(Some(f.clone()));
        f
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        if let Ok(mut m) = self.table.lock() {
            for b in &self.blocks {
                m.remove(b);
            }
        }
    }
}

/// Counts one operation in flight while it lives.
struct Busy<'a>(&'a AtomicU64);

impl<'a> Busy<'a> {
    fn new(c: &'a AtomicU64) -> Self {
        c.fetch_add(1, Ordering::AcqRel);
        Self(c)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Wait for the claims to end.
async fn wait_all(ws: Vec<Waiter>) {
    for mut w in ws {
        // Returns once the claim's sender is dropped.
        while w.changed().await.is_ok() {}
    }
}

/// Wait until the claim's data arrived (`Some`) or the claim ended without it (`None`:
/// its blocks are then marked, or free to claim again).
async fn wait_data(mut w: Waiter) -> Option<Arc<Fetched>> {
    loop {
        if let Some(f) = w.borrow_and_update().clone() {
            return Some(f);
        }
        if w.changed().await.is_err() {
            return w.borrow().clone();
        }
    }
}

/// One waiter per claim (a claim's blocks each have a clone of its receiver).
fn distinct(ws: Vec<Waiter>) -> Vec<Waiter> {
    let mut out: Vec<Waiter> = Vec::new();
    for w in ws {
        if !out.iter().any(|o| o.same_channel(&w)) {
            out.push(w);
        }
    }
    out
}

/// Sequential-read detection and the readahead window (pure: no I/O, no clock).
///
/// A read is sequential when it starts where the previous one ended, or further on but
/// inside what readahead has already asked for (a reader skipping a little, or one request
/// of a client's split read overtaking another). Each sequential read doubles the window,
/// from `min` up to `max`; any other read resets it. The range to fetch ahead is what lies
/// between what was asked for already and `window` bytes past the read, clipped to the
/// device end: nothing is asked for twice while the reader keeps going.
#[derive(Debug, Clone)]
pub struct Readahead {
    next: u64,
    frontier: u64,
    window: u64,
    min: u64,
    max: u64,
}

impl Readahead {
    /// A window starting at `min` bytes and growing to `max` (0 `min`: never read ahead).
    pub fn new(min: u64, max: u64) -> Self {
        Self {
            next: u64::MAX,
            frontier: 0,
            window: 0,
            min,
            max: max.max(min),
        }
    }

    /// The current window (0 until a sequential read).
    pub fn window(&self) -> u64 {
        self.window
    }

    /// A read of `[off, off+len)` arrived on a device of `size` bytes: the range to
    /// fetch ahead of it, if any.
    pub fn on_read(&mut self, off: u64, len: u64, size: u64) -> Option<(u64, u64)> {
        let end = off.saturating_add(len).min(size);
        let sequential = off == self.next || (off > self.next && off < self.frontier);
        self.next = end;
        if !sequential || self.min == 0 {
            self.window = 0;
            self.frontier = end;
            return None;
        }
        self.window = if self.window == 0 {
            self.min
        } else {
            self.window.saturating_mul(2).min(self.max)
        };
        let from = self.frontier.max(end);
        let to = end.saturating_add(self.window).min(size);
        if from >= to {
            return None;
        }
        self.frontier = to;
        Some((from, to))
    }
}

/// One connection slot to the source, reconnected by a background task of its own.
struct Link {
    client: watch::Sender<Option<Arc<Client>>>,
    kick: Notify,
}

impl Link {
    fn new() -> Self {
        Self {
            client: watch::channel(None).0,
            kick: Notify::new(),
        }
    }
    /// Forget `c` if it is this slot's connection (and have it reconnected).
    fn drop_client(&self, c: &Arc<Client>) {
        let mine = self.client.send_if_modified(|cur| {
            if cur.as_ref().is_some_and(|x| Arc::ptr_eq(x, c)) {
                *cur = None;
                true
            } else {
                false
            }
        });
        if mine {
            self.kick.notify_one();
        }
    }

    /// The slot's connection if it is up.
    fn live(&self) -> Option<Arc<Client>> {
        let cur = self.client.borrow().clone();
        match cur {
            Some(c) if c.is_dead() => {
                self.drop_client(&c);
                None
            }
            c => c,
        }
    }
}

/// The proxy.
pub struct Proxy {
    cfg: ProxyConfig,
    storage: Arc<Storage>,
    bitmap: Arc<Bitmap>,
    size: u64,
    bs: u64,
    inflight: Arc<Mutex<HashMap<u64, Waiter>>>,
    source: Mutex<Addr>,
    /// The source connections (at least one).
    links: Vec<Link>,
    /// Bumped whenever a source connection comes up.
    up: watch::Sender<u64>,
    /// Where the next choice of a connection starts looking (ties go round).
    next_link: AtomicU64,
    target: AtomicBool,
    background: AtomicBool,
    rate_limit: AtomicU64,
    /// When the shared link budget (`rate_limit`) is next free.
    pace: Mutex<Instant>,
    readahead: Mutex<Readahead>,
    /// On-demand fetches (client reads, readahead, partial writes, CACHE) in flight.
    demand_inflight: AtomicU64,
    wake: Notify,
    fetched_blocks: AtomicU64,
    fetched_bytes: AtomicU64,
    demand_blocks: AtomicU64,
    background_blocks: AtomicU64,
    demand_bytes: AtomicU64,
    background_bytes: AtomicU64,
    client_read_bytes: AtomicU64,
    client_write_bytes: AtomicU64,
    written_blocks: AtomicU64,
    source_errors: AtomicU64,
    health: Mutex<Health>,
    samples: Mutex<VecDeque<(Instant, u64)>>,
    commits: Commits,
    /// Held for the proxy's lifetime: the cache and the bitmap.
    _locks: [FileLock; 2],
}

impl std::fmt::Debug for Proxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Proxy")
            .field("size", &self.size)
            .field("block_size", &self.bs)
            .finish()
    }
}

impl Proxy {
    /// Open (or create) the cache and bitmap and start the background tasks. Resumes from
    /// an existing bitmap; contacts the source first only when there is none.
    pub async fn start(cfg: ProxyConfig) -> Result<Arc<Self>, ProxyError> {
        if cfg.block_size < 512 || !cfg.block_size.is_power_of_two() {
            return Err(ProxyError::Config(
                "block size must be a power of two >= 512".into(),
            ));
        }
        if cfg.bitmap.exists() && !cfg.cache.exists() {
            return Err(ProxyError::Config(format!(
                "bitmap {} exists but cache {} does not; remove the bitmap to start over",
                cfg.bitmap.display(),
                cfg.cache.display()
            )));
        }
        let mut first: Option<Client> = None;
        // Lock an existing cache before anything else: a proxy already using it must not
        // see a second one even contact the source.
        let mut cache_lock = if cfg.cache.exists() {
            Some(FileLock::try_lock(&cfg.cache)?)
        } else {
            None
        };
        let size = if cfg.bitmap.exists() && cfg.cache.exists() {
            Storage::open(&cfg.cache, false)?.size()
        } else {
            let c = tokio::time::timeout(
                CONNECT_TIMEOUT,
                Client::connect(&cfg.source, &cfg.export_name, cfg.tls.as_ref()),
            )
            .await
            .map_err(|_| ClientError::Protocol("handshake timed out".into()))??;
            let s = c.size();
            first = Some(c);
            s
        };
        if cache_lock.is_none() {
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&cfg.cache)
            {
                Ok(f) => {
                    // Locked before it gets its size: a second proxy that finds it then
                    // waits for nothing, it is refused.
                    cache_lock = Some(FileLock::try_lock(&cfg.cache)?);
                    f.set_len(size)?;
                    f.sync_all()?;
                }
                // Another proxy created it meanwhile: it holds the lock, or the file is ours.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    cache_lock = Some(FileLock::try_lock(&cfg.cache)?);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let cache_lock = match cache_lock {
            Some(l) => l,
            None => FileLock::try_lock(&cfg.cache)?,
        };
        let storage = Storage::open(&cfg.cache, false)?;
        if storage.size() != size {
            return Err(ProxyError::Config(format!(
                "cache {} has size {}, source has {size}",
                cfg.cache.display(),
                storage.size()
            )));
        }
        let bitmap = Bitmap::open(&cfg.bitmap, size, cfg.block_size)?;
        let bitmap_lock = FileLock::try_lock(&cfg.bitmap)?;
        let complete = bitmap.complete();
        let p = Arc::new(Self {
            storage: Arc::new(storage),
            bitmap: Arc::new(bitmap),
            size,
            bs: u64::from(cfg.block_size),
            inflight: Arc::new(Mutex::new(HashMap::new())),
            source: Mutex::new(cfg.source.clone()),
            links: (0..cfg.source_connections.clamp(1, MAX_SOURCE_CONNECTIONS))
                .map(|_| Link::new())
                .collect(),
            up: watch::channel(0).0,
            next_link: AtomicU64::new(0),
            target: AtomicBool::new(complete),
            background: AtomicBool::new(cfg.background),
            rate_limit: AtomicU64::new(cfg.rate),
            pace: Mutex::new(Instant::now()),
            readahead: Mutex::new(Readahead::new(cfg.readahead, cfg.readahead_max)),
            demand_inflight: AtomicU64::new(0),
            wake: Notify::new(),
            fetched_blocks: AtomicU64::new(0),
            fetched_bytes: AtomicU64::new(0),
            demand_blocks: AtomicU64::new(0),
            background_blocks: AtomicU64::new(0),
            demand_bytes: AtomicU64::new(0),
            background_bytes: AtomicU64::new(0),
            client_read_bytes: AtomicU64::new(0),
            client_write_bytes: AtomicU64::new(0),
            written_blocks: AtomicU64::new(0),
            source_errors: AtomicU64::new(0),
            health: Mutex::new(Health::default()),
            samples: Mutex::new(VecDeque::new()),
            commits: Commits::default(),
            _locks: [cache_lock, bitmap_lock],
            cfg,
        });
        if complete {
            info!(
                "all {} blocks are local: serving as a plain target",
                p.bitmap.nblocks()
            );
            return Ok(p);
        }
        info!(
            "resuming: {}/{} blocks local",
            p.bitmap.cached(),
            p.bitmap.nblocks()
        );
        if let Some(c) = first {
            p.note_limits(&c);
            c.set_stall_timeout(Some(p.stall_timeout()));
            p.links[0].client.send_replace(Some(Arc::new(c)));
        }
        for i in 0..p.links.len() {
            tokio::spawn(p.clone().reconnector(i));
        }
        tokio::spawn(p.clone().background_copy());
        tokio::spawn(p.clone().sampler());
        Ok(p)
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The least busy live source connection (fewest reply bytes outstanding; ties go
    /// round), if any. Every connection carries both on-demand and background reads, many
    /// in flight each; on-demand reads go first because the background copy waits for what
    /// they leave of the rate budget, and they land on the connection with the shortest
    /// queue. A connection that stopped answering keeps its queue, so new requests avoid it
    /// until it is declared dead.
    fn pick(&self) -> Option<Arc<Client>> {
        let n = self.links.len();
        let start = self.next_link.fetch_add(1, Ordering::Relaxed) as usize % n;
        let mut best: Option<(u64, Arc<Client>)> = None;
        for k in 0..n {
            let Some(c) = self.links[(start + k) % n].live() else {
                continue;
            };
            let load = c.outstanding_bytes();
            if best.as_ref().is_none_or(|(b, _)| load < *b) {
                best = Some((load, c));
            }
        }
        best.map(|(_, c)| c)
    }

    /// Source connections up now.
    fn links_up(&self) -> usize {
        self.links.iter().filter(|l| l.live().is_some()).count()
    }

    /// Forget a failed source connection (its slot reconnects).
    fn drop_client(&self, c: &Arc<Client>) {
        for l in &self.links {
            l.drop_client(c);
        }
    }

    fn is_target(&self) -> bool {
        self.target.load(Ordering::Acquire)
    }

    /// Keep source connection `i` up while in proxy mode. Attempts are spaced by the
    /// source backoff (at most [`RECONNECT_MAX`]), also when a connection that succeeded
    /// fails again at once. An extra connection (not the first) that cannot be opened while
    /// another one works is not a source failure (the source may take fewer clients): it is
    /// tried again after a pause of its own, 1 s doubling to 30 s.
    async fn reconnector(self: Arc<Self>, i: usize) {
        let link = &self.links[i];
        let mut last_attempt: Option<Instant> = None;
        let mut extra_failures = 0u32;
        while !self.is_target() {
            if link.live().is_some() {
                tokio::select! {
                    _ = link.kick.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
                continue;
            }
            if link.client.borrow().is_some() {
                link.client.send_replace(None);
            }
            if let Some(t) = last_attempt {
                if extra_failures > 0 {
                    let pause = EXTRA_RETRY_MIN
                        .saturating_mul(1 << (extra_failures - 1).min(5))
                        .min(EXTRA_RETRY_MAX);
                    // Woken early when no connection is left, or by `reconnect`.
                    tokio::select! {
                        _ = tokio::time::sleep_until(t + pause) => {}
                        _ = link.kick.notified() => {}
                    }
                } else {
                    let pause = self.backoff().min(RECONNECT_MAX);
                    tokio::time::sleep_until(t + pause).await;
                }
                if self.is_target() {
                    break;
                }
            }
            last_attempt = Some(Instant::now());
            let addr = match self.source.lock() {
                Ok(a) => a.clone(),
                Err(_) => return,
            };
            let conn = tokio::time::timeout(
                CONNECT_TIMEOUT,
                Client::connect(&addr, &self.cfg.export_name, self.cfg.tls.as_ref()),
            )
            .await
            .unwrap_or_else(|_| Err(ClientError::Protocol("handshake timed out".into())));
            match conn {
                Ok(c) if c.size() == self.size => {
                    if self.health().reads_failed || extra_failures > 0 || i > 0 {
                        // Still failing on reads, or one of several: one line per attempt
                        // would flood the log.
                        tracing::debug!("source {addr} connected (connection {})", i + 1);
                    } else {
                        info!("source {addr} connected");
                    }
                    extra_failures = 0;
                    self.note_limits(&c);
                    c.set_stall_timeout(Some(self.stall_timeout()));
                    self.connected();
                    link.client.send_replace(Some(Arc::new(c)));
                    self.up.send_modify(|g| *g += 1);
                    self.wake.notify_waiters();
                }
                Ok(c) => {
                    self.source_failed(
                        format!(
                            "source {addr} has size {}, expected {}",
                            c.size(),
                            self.size
                        ),
                        false,
                    );
                }
                Err(e) if i > 0 && self.links_up() > 0 => {
                    if extra_failures == 0 {
                        info!(
                            "source connection {} of {} not opened ({e}): carrying on with {}, trying again later",
                            i + 1,
                            self.links.len(),
                            self.links_up()
                        );
                    }
                    extra_failures = extra_failures.saturating_add(1);
                }
                Err(e) => {
                    extra_failures = 0;
                    self.source_failed(format!("connecting to {addr}: {e}"), false)
                }
            }
        }
        if let Some(c) = link.client.send_replace(None) {
            c.disconnect().await;
        }
    }

    /// How long a busy source connection may stay silent.
    fn stall_timeout(&self) -> Duration {
        self.cfg.source_timeout.max(Duration::from_secs(1))
    }

    /// Say once per connection how the source's block sizes shape the fetches.
    fn note_limits(&self, c: &Client) {
        let l = c.limits();
        if u64::from(l.min) > self.bs {
            warn!(
                "source minimum block size {} is larger than --block-size {}: fetches are widened to it",
                l.min, self.bs
            );
        }
        tracing::debug!(
            "source block sizes: minimum {}, preferred {}, maximum {}",
            l.min,
            l.preferred,
            l.max
        );
    }

    fn health(&self) -> std::sync::MutexGuard<'_, Health> {
        self.health.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current backoff (zero while healthy).
    fn backoff(&self) -> Duration {
        self.health().backoff()
    }

    /// A request to the source failed: extend the backoff. Logged at the start of a run of
    /// errors and once more when the backoff reaches its cap, not per error.
    fn source_failed(&self, e: String, read: bool) {
        self.source_errors.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut h = self.health();
        h.errors += 1;
        h.reads_failed |= read;
        if h.since.is_none() {
            h.since = Some((now, SystemTime::now()));
            warn!("source failing: {e}");
        } else if h.backoff() >= BACKOFF_MAX && !h.logged_cap {
            h.logged_cap = true;
            warn!(
                "source still failing after {} errors: {e}; retrying every {:?}",
                h.errors, BACKOFF_MAX
            );
        } else {
            tracing::debug!("source error: {e}");
        }
        let next = now + h.backoff();
        h.next = Some(h.next.map_or(next, |n| n.max(next)));
        h.last_error = Some(e);
    }

    /// A read succeeded: the source is healthy again.
    fn source_ok(&self) {
        let mut h = self.health();
        if h.errors == 0 {
            return;
        }
        let secs = h.since.map_or(0.0, |s| s.0.elapsed().as_secs_f64());
        info!(
            "source healthy again after {} errors in {secs:.1} s",
            h.errors
        );
        let last = h.last_error.take();
        *h = Health {
            last_error: last,
            ..Health::default()
        };
        drop(h);
        self.wake.notify_waiters();
    }

    /// A connection attempt succeeded: that ends a run of connection errors, not one in
    /// which reads failed (a source that accepts connections but fails every read).
    fn connected(&self) {
        let reads_failed = self.health().reads_failed;
        if !reads_failed {
            self.source_ok();
        }
    }

    /// While the source is failing, book the next background turn (one per backoff period)
    /// and wait for it; returns at once while it is healthy, or as soon as it recovers.
    async fn background_turn(&self) {
        let turn = {
            let mut h = self.health();
            if h.errors == 0 {
                return;
            }
            let t = h.next.unwrap_or_else(Instant::now).max(Instant::now());
            h.next = Some(t + h.backoff());
            t
        };
        loop {
            let wake = self.wake.notified();
            if self.health().errors == 0 || self.is_target() || Instant::now() >= turn {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep_until(turn) => return,
                _ = wake => {}
            }
        }
    }

    /// A live source connection, waiting until `deadline` (None: forever) for one.
    async fn client(&self, deadline: Option<Instant>) -> Result<Arc<Client>, OpError> {
        let mut rx = self.up.subscribe();
        loop {
            if self.is_target() {
                return Err(OpError::new(err::EIO, "source detached"));
            }
            rx.borrow_and_update();
            if let Some(c) = self.pick() {
                return Ok(c);
            }
            for l in &self.links {
                l.kick.notify_one();
            }
            let wait = rx.changed();
            match deadline {
                Some(d) => {
                    let now = Instant::now();
                    if now >= d {
                        return Err(OpError::new(err::EIO, "source unavailable"));
                    }
                    if tokio::time::timeout(d - now, wait).await.is_err() {
                        return Err(OpError::new(err::EIO, "source unavailable"));
                    }
                }
                None => {
                    tokio::select! {
                        _ = wait => {}
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                    }
                }
            }
        }
    }

    /// Read `[off, off+len)` from the source, retrying over reconnections. `patience` is
    /// how long the source may be missing, counted from the moment it is found missing (a
    /// read queued behind others on a slow but live connection is not cut short). A read
    /// whose connection dies or falls silent is sent again at once on another live
    /// connection, once; after that it waits for a connection within its patience.
    async fn source_read(
        &self,
        demand: bool,
        off: u64,
        len: u32,
        patience: Duration,
    ) -> Result<Vec<u8>, OpError> {
        let mut deadline: Option<Instant> = None;
        let mut moved = false;
        loop {
            let c = match self.pick() {
                Some(c) => c,
                None => {
                    let d = *deadline.get_or_insert_with(|| Instant::now() + patience);
                    self.client(Some(d)).await?
                }
            };
            match c.read(off, len).await {
                Ok(d) => {
                    self.source_ok();
                    return Ok(d);
                }
                Err(ClientError::Request(e)) => {
                    self.source_failed(
                        format!("read of {len} bytes at {off}: error {e} from the source"),
                        true,
                    );
                    return Err(OpError::new(e, "source refused the read"));
                }
                Err(e @ ClientError::OutOfRange { .. }) => {
                    return Err(OpError::new(err::EINVAL, e.to_string()));
                }
                Err(e) => {
                    if let ClientError::Stalled(silent) = e {
                        // The source went missing when it fell silent, not now.
                        let since = Instant::now()
                            .checked_sub(silent)
                            .unwrap_or_else(Instant::now);
                        deadline.get_or_insert(since + patience);
                    }
                    let kind = if demand { "on-demand" } else { "background" };
                    self.source_failed(format!("{kind} read of {len} bytes at {off}: {e}"), true);
                    self.drop_client(&c);
                    if !moved && self.links.len() > 1 && self.pick().is_some() {
                        // Another connection is up: the read goes there now.
                        moved = true;
                        continue;
                    }
                }
            }
            let d = *deadline.get_or_insert_with(|| Instant::now() + patience);
            if Instant::now() >= d {
                return Err(OpError::new(err::EIO, "source unavailable"));
            }
        }
    }

    fn block_range(&self, off: u64, len: u64) -> (u64, u64) {
        (off / self.bs, (off + len).div_ceil(self.bs))
    }

    /// Claim missing blocks of `[a, b)` nobody holds, leaving out `except` (sorted); also
    /// return waiters for those held.
    fn claim_free(&self, a: u64, b: u64, except: &[u64]) -> (Option<Claim>, Vec<Waiter>) {
        let Ok(mut m) = self.inflight.lock() else {
            return (None, Vec::new());
        };
        let (tx, rx) = watch::channel(None);
        let mut blocks = Vec::new();
        let mut waiters = Vec::new();
        for i in a..b {
            if self.bitmap.is_set(i) || except.binary_search(&i).is_ok() {
                continue;
            }
            if let Some(w) = m.get(&i) {
                waiters.push(w.clone());
            } else {
                m.insert(i, rx.clone());
                blocks.push(i);
            }
        }
        let claim = (!blocks.is_empty()).then(|| Claim {
            table: self.inflight.clone(),
            blocks,
            tx,
        });
        (claim, waiters)
    }

    /// Claim every missing block of `[a, b)`, or none (returning one to wait for).
    fn claim_all(&self, a: u64, b: u64) -> Result<Claim, Waiter> {
        let mut m = self.inflight.lock().unwrap_or_else(|e| e.into_inner());
        for i in a..b {
            if !self.bitmap.is_set(i) {
                if let Some(w) = m.get(&i) {
                    return Err(w.clone());
                }
            }
        }
        let (tx, rx) = watch::channel(None);
        let mut blocks = Vec::new();
        for i in a..b {
            if !self.bitmap.is_set(i) {
                m.insert(i, rx.clone());
                blocks.push(i);
            }
        }
        Ok(Claim {
            table: self.inflight.clone(),
            blocks,
            tx,
        })
    }

    /// Fetch the claimed blocks, store them durably, then mark them.
    async fn fetch_claimed(
        &self,
        claim: &Claim,
        demand: bool,
        patience: Duration,
    ) -> Result<(), OpError> {
        let runs = runs_of(&claim.blocks);
        let datas = Arc::new(self.fetch_runs(&runs, demand, patience).await?);
        let (blocks, bytes) = (claim.blocks.len() as u64, pieces_len(&datas));
        self.tally(demand, blocks, bytes, true);
        claim.publish(&datas);
        let r = self.store(datas, runs).await;
        if r.is_err() {
            self.tally(demand, blocks, bytes, false);
        }
        r
    }

    /// Count `blocks` fetched blocks of `bytes` (or take them back when `add` is false).
    /// Counted before the bits are set, so a status showing a block local always shows its
    /// fetch too (taken back if storing fails).
    fn tally(&self, demand: bool, blocks: u64, bytes: u64, add: bool) {
        let (kind, kind_bytes) = if demand {
            (&self.demand_blocks, &self.demand_bytes)
        } else {
            (&self.background_blocks, &self.background_bytes)
        };
        for (c, n) in [
            (&self.fetched_blocks, blocks),
            (kind, blocks),
            (&self.fetched_bytes, bytes),
            (kind_bytes, bytes),
        ] {
            if add {
                c.fetch_add(n, Ordering::Relaxed);
            } else {
                c.fetch_sub(n, Ordering::Relaxed);
            }
        }
    }

    /// Read the blocks of `runs` from the source, every piece at once.
    ///
    /// On-demand fetches (a client's read, readahead) are split over the live source
    /// connections ([`Proxy::demand_piece`]), so a client waits for the slowest piece
    /// rather than for one connection to carry it all. That matters most when the
    /// connections have carried nothing yet (the first reads after a VM's switchover,
    /// the connections idle since the proxy started): TCP's slow start needs about
    /// seven round trips for a new connection's first MiB but four for its first
    /// 128 KiB, and every connection's window grows at once. The background copy's
    /// chunks go whole, one request each, `background_depth` of them in flight.
    async fn fetch_runs(
        &self,
        runs: &[(u64, u64)],
        demand: bool,
        patience: Duration,
    ) -> Result<Pieces, OpError> {
        let bytes: u64 = runs
            .iter()
            .map(|&(a, b)| (b * self.bs).min(self.size) - a * self.bs)
            .sum();
        let (_busy, piece) = if demand {
            let _ = self.reserve(bytes);
            let piece = if self.cfg.demand_split {
                self.demand_piece(bytes)
            } else {
                MAX_FETCH
            };
            (Some(Busy::new(&self.demand_inflight)), piece)
        } else {
            (None, MAX_FETCH)
        };
        let mut pieces = Vec::new();
        for &(a, b) in runs {
            let end = (b * self.bs).min(self.size);
            let mut off = a * self.bs;
            while off < end {
                let n = (end - off).min(piece);
                pieces.push((off, n));
                off += n;
            }
        }
        let reads = pieces
            .iter()
            .map(|&(off, n)| self.source_read(demand, off, n as u32, patience));
        // Together in this task; the first error drops the other reads.
        let datas = try_join_all(reads).await?;
        Ok(pieces.iter().map(|p| p.0).zip(datas).collect())
    }

    /// The largest piece of an on-demand fetch of `bytes`: an equal share per live
    /// source connection, whole blocks, at most [`MAX_FETCH`].
    fn demand_piece(&self, bytes: u64) -> u64 {
        let links = self.links_up().max(1) as u64;
        bytes
            .div_ceil(links)
            .next_multiple_of(self.bs)
            .clamp(self.bs, MAX_FETCH)
    }

    /// Store fetched blocks (`datas`, covering `runs`): write them to the cache, then make
    /// them durable and mark them (see [`Proxy::commit`]).
    async fn store(&self, datas: Arc<Pieces>, runs: Vec<(u64, u64)>) -> Result<(), OpError> {
        let st = self.storage.clone();
        blocking(move || {
            for (off, d) in datas.iter() {
                st.write_at(d, *off)?;
            }
            Ok(())
        })
        .await?;
        self.commit(runs).await?;
        self.check_complete();
        Ok(())
    }

    /// Make blocks whose data is already written to the cache durable (`fdatasync`), then
    /// set and persist their bits (this order is the crash-safety argument of the bitmap).
    /// Callers arriving while a commit runs are committed together by the next one: one
    /// `fdatasync` of the cache and one of the bitmap for all of them.
    async fn commit(&self, runs: Vec<(u64, u64)>) -> Result<(), OpError> {
        let (tx, rx) = oneshot::channel();
        self.commits
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((runs, tx));
        {
            let _turn = self.commits.turn.lock().await;
            // Everything queued now was written before it was queued.
            let batch =
                std::mem::take(&mut *self.commits.queue.lock().unwrap_or_else(|e| e.into_inner()));
            if !batch.is_empty() {
                let all: Vec<(u64, u64)> = batch.iter().flat_map(|b| b.0.iter().copied()).collect();
                let all_runs = all.len();
                let st = self.storage.clone();
                let bm = self.bitmap.clone();
                let r = blocking(move || {
                    st.sync()?;
                    bm.set_durable(&all)?;
                    Ok(())
                })
                .await;
                tracing::trace!(runs = all_runs, ok = r.is_ok(), "commit: blocks marked");
                for (_, tx) in batch {
                    let _ = tx.send(r.clone());
                }
            }
        }
        rx.await
            .unwrap_or_else(|_| Err(OpError::new(err::EIO, "commit abandoned")))
    }

    /// Make `[off, off+len)` readable: like [`Proxy::ensure`], but what this call fetches is
    /// returned instead of waited for: it is stored, made durable and marked in the
    /// background, its blocks claimed until then (nobody reads or writes them in the cache
    /// meanwhile; a crash before the mark leaves them missing). Blocks another fetch holds
    /// are taken from its data as soon as it arrives (a second reader of a cold block waits
    /// for the first one's fetch, not for its `fdatasync`, and never fetches it again).
    ///
    /// `ahead` is a range to read ahead, asked for once this read's own blocks are claimed
    /// (so that the request this read waits for goes to the source first).
    async fn fetch_for_read(
        self: &Arc<Self>,
        off: u64,
        len: u64,
        patience: Duration,
        mut ahead: Option<(u64, u64)>,
    ) -> Result<Vec<Arc<Fetched>>, OpError> {
        let mut got: Vec<Arc<Fetched>> = Vec::new();
        if len == 0 {
            return Ok(got);
        }
        let (a, b) = self.block_range(off, len);
        // Blocks whose data is in `got` (their claims end when they are marked).
        let mut mine: Vec<u64> = Vec::new();
        loop {
            if self.is_target() {
                return Ok(got);
            }
            let (claim, waiters) = self.claim_free(a, b, &mine);
            if let Some((ra, rb)) = ahead.take() {
                self.read_ahead(ra, rb);
            }
            if claim.is_none() && waiters.is_empty() {
                return Ok(got);
            }
            if let Some(c) = claim {
                let runs = runs_of(&c.blocks);
                let datas = Arc::new(self.fetch_runs(&runs, true, patience).await?);
                // Counted before the reply, as if stored.
                let (blocks, bytes) = (c.blocks.len() as u64, pieces_len(&datas));
                self.tally(true, blocks, bytes, true);
                got.push(c.publish(&datas));
                mine.extend_from_slice(&c.blocks);
                mine.sort_unstable();
                let p = self.clone();
                tokio::spawn(async move {
                    // On failure the bits stay clear and the blocks are fetched again later.
                    if p.store(datas, runs).await.is_err() {
                        p.tally(true, blocks, bytes, false);
                    }
                    drop(c);
                });
            }
            for w in distinct(waiters) {
                if let Some(f) = wait_data(w).await {
                    if !got.iter().any(|g| Arc::ptr_eq(g, &f)) {
                        mine.extend(f.blocks.iter().filter(|&&i| i >= a && i < b));
                        mine.sort_unstable();
                        got.push(f);
                    }
                }
            }
        }
    }

    /// Make `[off, off+len)` local, fetching what is missing (on demand). Blocks another
    /// fetch holds are waited for without a deadline: that fetch ends by itself (it has its
    /// own patience with a missing source, and a live source makes progress), and its blocks
    /// are then claimed here if they are still missing.
    async fn ensure(&self, off: u64, len: u64, patience: Duration) -> Result<(), OpError> {
        if len == 0 {
            return Ok(());
        }
        let (a, b) = self.block_range(off, len);
        loop {
            if self.is_target() {
                return Ok(());
            }
            let (claim, waiters) = self.claim_free(a, b, &[]);
            if claim.is_none() && waiters.is_empty() {
                return Ok(());
            }
            if let Some(c) = &claim {
                self.fetch_claimed(c, true, patience).await?;
            }
            drop(claim);
            wait_all(waiters).await;
        }
    }

    /// How long client requests wait for a missing source.
    fn patience(&self) -> Duration {
        self.cfg.source_timeout
    }

    /// Serve a read.
    pub async fn read(
        self: &Arc<Self>,
        off: u64,
        mut buf: Vec<u8>,
        start: usize,
    ) -> Result<Vec<u8>, OpError> {
        let len = (buf.len() - start) as u64;
        tracing::trace!(off, len, "read: request");
        let mut fetched = Vec::new();
        if !self.is_target() {
            // Decided on arrival, so that the fetch ahead runs alongside this read's own.
            let ahead = self
                .readahead
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .on_read(off, len, self.size);
            fetched = self
                .fetch_for_read(off, len, self.patience(), ahead)
                .await?;
        }
        // What was fetched just now is not in the cache yet (or not durable): it is copied
        // from memory, the rest read from the cache.
        let end = off + len;
        let overlap = |p: &(u64, Vec<u8>)| (p.0.max(off), (p.0 + p.1.len() as u64).min(end));
        let from_source: u64 = fetched
            .iter()
            .flat_map(|d| d.pieces.iter())
            .map(|p| {
                let (lo, hi) = overlap(p);
                hi.saturating_sub(lo)
            })
            .sum();
        if from_source < len {
            let s = self.clone();
            buf = blocking(move || {
                s.storage.read_at(&mut buf[start..], off)?;
                Ok(buf)
            })
            .await?;
        }
        for p in fetched.iter().flat_map(|d| d.pieces.iter()) {
            let (lo, hi) = overlap(p);
            if lo < hi {
                let at = start + (lo - off) as usize;
                let from = (lo - p.0) as usize;
                buf[at..at + (hi - lo) as usize]
                    .copy_from_slice(&p.1[from..from + (hi - lo) as usize]);
            }
        }
        self.client_read_bytes.fetch_add(len, Ordering::Relaxed);
        tracing::trace!(off, len, "read: reply ready");
        Ok(buf)
    }

    /// Fetch the missing blocks of `[from, to)` ahead of a sequential reader, in the
    /// background: one claim and one request per `background_chunk`, all in flight at
    /// once, each chunk's blocks published to readers as soon as they arrive. Blocks held
    /// by other fetches are left to them.
    fn read_ahead(self: &Arc<Self>, from: u64, to: u64) {
        let (a, b) = self.block_range(from, to - from);
        let chunk = (self.cfg.background_chunk / self.bs).max(1);
        let mut i = a;
        while i < b {
            let j = (i + chunk).min(b);
            let (claim, _) = self.claim_free(i, j, &[]);
            if let Some(c) = claim {
                let p = self.clone();
                tokio::spawn(async move {
                    // A failure is accounted in the source health; a reader needing these
                    // blocks fetches them itself.
                    let _ = p.fetch_claimed(&c, true, p.patience()).await;
                });
            }
            i = j;
        }
    }

    /// Apply a local modification of `[off, off+len)`: partial missing head/tail blocks are
    /// fetched first, fully covered missing blocks are claimed, modified, synced and marked.
    async fn modify(
        self: &Arc<Self>,
        off: u64,
        len: u64,
        fua: bool,
        op: impl FnOnce(&Storage) -> std::io::Result<()> + Send + 'static,
    ) -> Result<(), OpError> {
        if len == 0 {
            return Ok(());
        }
        if !self.is_target() {
            let patience = self.patience();
            let (a, b) = self.block_range(off, len);
            let end = off + len;
            if off % self.bs != 0 && !self.bitmap.is_set(a) {
                self.ensure(a * self.bs, 1, patience).await?;
            }
            let tail_partial = end % self.bs != 0 && end < self.size;
            if tail_partial && !self.bitmap.is_set(b - 1) {
                self.ensure((b - 1) * self.bs, 1, patience).await?;
            }
            loop {
                match self.claim_all(a, b) {
                    Ok(claim) => {
                        let runs = runs_of(&claim.blocks);
                        let n = claim.blocks.len() as u64;
                        let s = self.clone();
                        self.written_blocks.fetch_add(n, Ordering::Relaxed);
                        let r = blocking(move || {
                            op(&s.storage)?;
                            if !runs.is_empty() || fua {
                                s.storage.sync()?;
                            }
                            s.bitmap.set_durable(&runs)?;
                            Ok(())
                        })
                        .await;
                        if r.is_err() {
                            self.written_blocks.fetch_sub(n, Ordering::Relaxed);
                        }
                        r?;
                        drop(claim);
                        self.check_complete();
                        return Ok(());
                    }
                    Err(w) => wait_all(vec![w]).await,
                }
            }
        }
        let s = self.clone();
        blocking(move || {
            op(&s.storage)?;
            if fua {
                s.storage.sync()?;
            }
            Ok(())
        })
        .await
    }

    /// Serve a write.
    pub async fn write(
        self: &Arc<Self>,
        off: u64,
        data: Vec<u8>,
        fua: bool,
    ) -> Result<(), OpError> {
        let len = data.len() as u64;
        // Counted on arrival: the payload crossed the client link even if the write fails.
        self.client_write_bytes.fetch_add(len, Ordering::Relaxed);
        self.modify(off, len, fua, move |s| s.write_at(&data, off))
            .await
    }

    /// Serve a write-zeroes.
    pub async fn write_zeroes(
        self: &Arc<Self>,
        off: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), OpError> {
        self.modify(off, len, fua, move |s| s.write_zeroes(off, len, may_trim))
            .await
    }

    /// Serve a trim: advisory, so a no-op while blocks may still be at the source (a trimmed
    /// missing block would otherwise have to be fetched or marked); a hole punch in target mode.
    pub async fn trim(self: &Arc<Self>, off: u64, len: u64, fua: bool) -> Result<(), OpError> {
        if !self.is_target() {
            return Ok(());
        }
        let s = self.clone();
        blocking(move || {
            s.storage.trim(off, len)?;
            if fua {
                s.storage.sync()?;
            }
            Ok(())
        })
        .await
    }

    /// Serve a flush (the bitmap is always durable already).
    pub async fn flush(self: &Arc<Self>) -> Result<(), OpError> {
        let s = self.clone();
        blocking(move || Ok(s.storage.sync()?)).await
    }

    /// Serve a cache request: fetch the range now.
    pub async fn cache(self: &Arc<Self>, off: u64, len: u64) -> Result<(), OpError> {
        self.ensure(off, len, self.patience()).await
    }

    /// `base:allocation`: missing blocks are reported as data; local ones as the cache file's
    /// allocation says.
    pub async fn block_status(
        self: &Arc<Self>,
        off: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, u32)>, OpError> {
        let s = self.clone();
        blocking(move || {
            if s.is_target() {
                return Ok(s.storage.extents(off, len, max)?);
            }
            let end = off + len;
            let mut out: Vec<(u64, u32)> = Vec::new();
            let mut pos = off;
            while pos < end && out.len() < max {
                let blk = pos / s.bs;
                let local = s.bitmap.is_set(blk);
                let mut stop = ((blk + 1) * s.bs).min(end);
                while stop < end && s.bitmap.is_set(stop / s.bs) == local {
                    stop = ((stop / s.bs + 1) * s.bs).min(end);
                }
                if local {
                    let room = max - out.len();
                    for e in s.storage.extents(pos, stop - pos, room)? {
                        push_extent(&mut out, e);
                    }
                } else {
                    push_extent(&mut out, (stop - pos, 0));
                }
                pos = stop;
            }
            out.truncate(max);
            Ok(out)
        })
        .await
    }

    fn check_complete(&self) {
        if self.bitmap.complete() && !self.target.swap(true, Ordering::AcqRel) {
            info!(
                "all {} blocks local: source dropped, serving as a plain target",
                self.bitmap.nblocks()
            );
            self.drop_source();
        }
    }

    fn drop_source(&self) {
        for l in &self.links {
            l.kick.notify_one();
        }
        self.wake.notify_waiters();
    }

    /// Claim a contiguous run of at most `limit` missing blocks nobody holds, starting at
    /// the first such block at or after `from`.
    fn claim_run(&self, from: u64, limit: usize) -> Option<Claim> {
        let mut m = self.inflight.lock().ok()?;
        let mut i = from;
        loop {
            let s = self.bitmap.next_missing(i)?;
            if !m.contains_key(&s) {
                i = s;
                break;
            }
            i = s + 1;
        }
        let (tx, rx) = watch::channel(None);
        let mut blocks = Vec::new();
        while blocks.len() < limit
            && i < self.bitmap.nblocks()
            && !self.bitmap.is_set(i)
            && !m.contains_key(&i)
        {
            m.insert(i, rx.clone());
            blocks.push(i);
            i += 1;
        }
        Some(Claim {
            table: self.inflight.clone(),
            blocks,
            tx,
        })
    }

    /// Copy missing blocks in the background: runs of `background_chunk` bytes, up to
    /// `background_depth` requests in flight (to fill long links, also while on-demand
    /// fetches run), within what on-demand fetches leave of the rate budget, and while the
    /// source is failing one run per backoff period. Failures are accounted in the source
    /// health (a failed run is fetched again on a later pass).
    async fn background_copy(self: Arc<Self>) {
        let chunk_blocks = (self.cfg.background_chunk / self.bs).max(1) as usize;
        let depth = self.cfg.background_depth.max(1);
        let mut cursor = 0u64;
        let mut tasks: tokio::task::JoinSet<Result<(), OpError>> = tokio::task::JoinSet::new();
        while !self.is_target() {
            // Every pass gives the runtime a turn. While it shuts down, each copy task
            // spawned is cancelled at once, so a pass could spawn, reap and claim again
            // without ever waiting: it would hold its worker, and the shutdown, for good.
            tokio::task::yield_now().await;
            while tasks.try_join_next().is_some() {}
            if tasks.len() >= depth {
                tasks.join_next().await;
                continue;
            }
            if self.cfg.background_yield
                && !tasks.is_empty()
                && self.demand_inflight.load(Ordering::Acquire) > 0
            {
                // Clients are waiting for the source: one background request at a time.
                tokio::select! {
                    _ = tasks.join_next() => {}
                    _ = tokio::time::sleep(Duration::from_millis(10)) => {}
                }
                continue;
            }
            if !self.background.load(Ordering::Acquire) {
                tokio::select! {
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                }
                continue;
            }
            // Wait for the source's turn and for the source itself without holding claims,
            // so that clients needing these blocks are not stuck behind either.
            self.background_turn().await;
            if self
                .client(Some(Instant::now() + Duration::from_secs(1)))
                .await
                .is_err()
            {
                continue;
            }
            // Book the link before claiming, so that clients never wait for blocks the
            // background copy holds while it waits for its turn.
            let want = chunk_blocks as u64 * self.bs;
            if let Some(start) = self.reserve(want) {
                tokio::select! {
                    _ = tokio::time::sleep_until(start) => {}
                    // A new rate, a reconnection or the end: book again.
                    _ = self.wake.notified() => {
                        self.unreserve(want);
                        continue;
                    }
                }
            }
            let claim = match self.claim_run(cursor, chunk_blocks) {
                Some(c) => c,
                None => match self.claim_run(0, chunk_blocks) {
                    Some(c) => c,
                    None => {
                        if self.bitmap.complete() {
                            self.check_complete();
                            break;
                        }
                        self.unreserve(want);
                        // The rest is in flight: wait for some of it.
                        if tasks.join_next().await.is_none() {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        continue;
                    }
                },
            };
            let (Some(&first), Some(&last)) = (claim.blocks.first(), claim.blocks.last()) else {
                self.unreserve(want);
                continue;
            };
            cursor = last + 1;
            let bytes = ((last + 1) * self.bs).min(self.size) - first * self.bs;
            self.unreserve(want.saturating_sub(bytes));
            let p = self.clone();
            tasks.spawn(async move { p.fetch_claimed(&claim, false, BACKGROUND_PATIENCE).await });
        }
        tasks.abort_all();
    }

    /// Book `bytes` on the link budget shared by on-demand and background fetches (the
    /// rate limit); returns when they may be requested, `None` without a limit. On-demand
    /// fetches book without waiting, so the background copy, which waits for its slot, gets
    /// only what they leave of the link.
    fn reserve(&self, bytes: u64) -> Option<Instant> {
        let rate = self.rate_limit.load(Ordering::Acquire);
        if rate == 0 {
            return None;
        }
        let now = Instant::now();
        let mut next = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        let start = (*next).max(now);
        *next = start + Duration::from_secs_f64(bytes as f64 / rate as f64);
        Some(start)
    }

    /// Give back booked bytes that were not fetched.
    fn unreserve(&self, bytes: u64) {
        let rate = self.rate_limit.load(Ordering::Acquire);
        if rate == 0 || bytes == 0 {
            return;
        }
        let mut next = self.pace.lock().unwrap_or_else(|e| e.into_inner());
        let d = Duration::from_secs_f64(bytes as f64 / rate as f64);
        *next = next.checked_sub(d).unwrap_or(*next);
    }

    async fn sampler(self: Arc<Self>) {
        while !self.is_target() {
            self.sample();
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    fn sample(&self) -> f64 {
        let now = Instant::now();
        let bytes = self.fetched_bytes.load(Ordering::Relaxed);
        let Ok(mut s) = self.samples.lock() else {
            return 0.0;
        };
        s.push_back((now, bytes));
        while s.len() > 2 && now.duration_since(s[0].0) > Duration::from_secs(5) {
            s.pop_front();
        }
        let (t0, b0) = s[0];
        let dt = now.duration_since(t0).as_secs_f64();
        if dt < 0.2 {
            0.0
        } else {
            (bytes - b0) as f64 / dt
        }
    }

    /// Current status.
    pub fn status(&self) -> Status {
        let cached = self.bitmap.cached();
        let total = self.bitmap.nblocks();
        let rate = if self.is_target() { 0.0 } else { self.sample() };
        let missing_bytes = (total - cached) * self.bs;
        let eta = if cached == total {
            Some(0.0)
        } else if rate > 0.0 {
            Some(missing_bytes as f64 / rate)
        } else {
            None
        };
        let up = if self.is_target() { 0 } else { self.links_up() };
        let h = self.health();
        Status {
            mode: if self.is_target() {
                Mode::Target
            } else {
                Mode::Proxy
            },
            source: self
                .source
                .lock()
                .map(|a| a.to_string())
                .unwrap_or_default(),
            source_connected: up > 0,
            source_connections: self.links.len(),
            source_connections_up: up,
            size: self.size,
            block_size: self.cfg.block_size,
            total_blocks: total,
            cached_blocks: cached,
            fetched_blocks: self.fetched_blocks.load(Ordering::Relaxed),
            fetched_bytes: self.fetched_bytes.load(Ordering::Relaxed),
            demand_blocks: self.demand_blocks.load(Ordering::Relaxed),
            background_blocks: self.background_blocks.load(Ordering::Relaxed),
            demand_bytes: self.demand_bytes.load(Ordering::Relaxed),
            background_bytes: self.background_bytes.load(Ordering::Relaxed),
            client_read_bytes: self.client_read_bytes.load(Ordering::Relaxed),
            client_write_bytes: self.client_write_bytes.load(Ordering::Relaxed),
            written_blocks: self.written_blocks.load(Ordering::Relaxed),
            rate_bytes_per_sec: rate,
            rate_limit: self.rate_limit.load(Ordering::Relaxed),
            background: self.background.load(Ordering::Relaxed),
            eta_secs: eta,
            source_errors: self.source_errors.load(Ordering::Relaxed),
            source_failing: h.errors > 0,
            source_failing_since: h.since.map(|s| {
                s.1.duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs())
            }),
            source_failing_secs: h.since.map(|s| s.0.elapsed().as_secs_f64()),
            source_errors_in_row: h.errors,
            source_backoff_ms: u64::try_from(h.backoff().as_millis()).unwrap_or(u64::MAX),
            source_last_error: h.last_error.clone(),
        }
    }

    /// Start (or keep) the background copy.
    pub fn cache_all(&self) {
        self.background.store(true, Ordering::Release);
        self.wake.notify_waiters();
    }

    /// Change the background rate limit (bytes per second, 0: none).
    pub fn set_rate(&self, rate: u64) {
        self.rate_limit.store(rate, Ordering::Release);
        // Bookings made at the old rate no longer apply.
        *self.pace.lock().unwrap_or_else(|e| e.into_inner()) = Instant::now();
        self.wake.notify_waiters();
    }

    /// Reconnect to the source, optionally at a new address.
    pub fn reconnect(&self, addr: Option<Addr>) {
        if let Some(a) = addr {
            if let Ok(mut s) = self.source.lock() {
                *s = a;
            }
        }
        for l in &self.links {
            if let Some(c) = l.client.send_replace(None) {
                tokio::spawn(async move { c.disconnect().await });
            }
            l.kick.notify_one();
        }
    }

    /// Drop the source and serve only local data. Refused while blocks are missing unless
    /// `force` (then missing blocks read as whatever the cache file holds: zeroes in a fresh
    /// sparse cache).
    pub fn switch(&self, force: bool) -> Result<(), String> {
        let missing = self.bitmap.nblocks() - self.bitmap.cached();
        if missing > 0 && !force {
            return Err(format!(
                "{missing} blocks are still at the source (use --force)"
            ));
        }
        if !self.target.swap(true, Ordering::AcqRel) {
            if missing > 0 {
                warn!("forced switch with {missing} blocks missing");
            }
            self.drop_source();
        }
        Ok(())
    }
}

fn push_extent(out: &mut Vec<(u64, u32)>, e: (u64, u32)) {
    if e.0 == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        if last.1 == e.1 {
            last.0 += e.0;
            return;
        }
    }
    out.push(e);
}

/// Contiguous runs `[a, b)` of a sorted block list.
fn pieces_len(p: &Pieces) -> u64 {
    p.iter().map(|d| d.1.len() as u64).sum()
}

fn runs_of(blocks: &[u64]) -> Vec<(u64, u64)> {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &b in blocks {
        match runs.last_mut() {
            Some(r) if r.1 == b => r.1 = b + 1,
            _ => runs.push((b, b + 1)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_group_contiguous_blocks() {
        assert_eq!(runs_of(&[1, 2, 3, 7, 9, 10]), vec![(1, 4), (7, 8), (9, 11)]);
        assert!(runs_of(&[]).is_empty());
        let mut v = Vec::new();
        push_extent(&mut v, (10, 0));
        push_extent(&mut v, (5, 0));
        push_extent(&mut v, (5, 3));
        push_extent(&mut v, (0, 0));
        assert_eq!(v, vec![(15, 0), (5, 3)]);
    }

    /// The window doubles with each sequential read up to its maximum, nothing is asked
    /// for twice, it stops at the device end, and a jump resets it.
    #[test]
    fn readahead_grows_while_sequential_and_stops_at_the_end() {
        const M: u64 = 1 << 20;
        let size = 40 * M;
        let mut r = Readahead::new(M, 8 * M);
        // The first read of a stream: nothing ahead.
        assert_eq!(r.on_read(0, M, size), None);
        assert_eq!(r.on_read(M, M, size), Some((2 * M, 3 * M)));
        assert_eq!(r.on_read(2 * M, M, size), Some((3 * M, 5 * M)));
        assert_eq!(r.on_read(3 * M, M, size), Some((5 * M, 8 * M)));
        assert_eq!(r.on_read(4 * M, M, size), Some((8 * M, 13 * M)));
        assert_eq!(r.window(), 8 * M);
        // Bounded: one more read moves the frontier by one read's length.
        assert_eq!(r.on_read(5 * M, M, size), Some((13 * M, 14 * M)));
        // A client's split read whose second half arrives first is still sequential.
        assert_eq!(
            r.on_read(6 * M + M / 2, M / 2, size),
            Some((14 * M, 15 * M))
        );
        assert_eq!(r.window(), 8 * M);
        // A jump well past what was asked for starts a new stream; near the end the
        // window is clipped to the device, then nothing more is asked for.
        assert_eq!(r.on_read(34 * M, M, size), None);
        assert_eq!(r.on_read(35 * M, M, size), Some((36 * M, 37 * M)));
        assert_eq!(r.on_read(36 * M, 2 * M, size), Some((38 * M, 40 * M)));
        assert_eq!(r.on_read(38 * M, 2 * M, size), None);
        // A jump (the reader wrapped around): no readahead, the window starts over.
        assert_eq!(r.on_read(0, M, size), None);
        assert_eq!(r.window(), 0);
        assert_eq!(r.on_read(M, M, size), Some((2 * M, 3 * M)));
        // Off: never anything ahead.
        let mut off = Readahead::new(0, 8 * M);
        assert_eq!(off.on_read(0, M, size), None);
        assert_eq!(off.on_read(M, M, size), None);
        // A fixed window.
        let mut fixed = Readahead::new(M, 0);
        fixed.on_read(0, M, size);
        assert_eq!(fixed.on_read(M, M, size), Some((2 * M, 3 * M)));
        assert_eq!(fixed.on_read(2 * M, M, size), Some((3 * M, 4 * M)));
    }
}
