//! A small NBD client used by the proxy to fetch blocks from the source: fixed newstyle,
//! `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME`), optional STARTTLS, simple replies,
//! many reads in flight on one connection.
//!
//! Reads respect the block sizes the server advertises (`NBD_INFO_BLOCK_SIZE`): a range is
//! widened to the minimum block size and split into pieces no larger than the maximum
//! (multiples of the preferred size where it fits), sent pipelined and put back together.
//!
//! Liveness: with a stall timeout set, the connection is declared dead when requests are
//! outstanding and no reply byte has arrived for that long, counted from the moment the
//! connection went from idle to busy or from the last byte received. A slow link that keeps
//! delivering bytes never trips it, however long the queue of requests behind it.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::{oneshot, watch};
use tokio::time::Instant;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use crate::conn::Conn;
use crate::proto::{
    self, cmd, info, opt, rep, ClientOption, InfoItem, InfoRequest, OptionReply, Request,
    SimpleReply,
};

/// Client errors.
#[derive(Debug, Error)]
pub enum ClientError {
    /// Socket I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The server refused an option.
    #[error("server refused option {option}: reply {reply:#x} {msg}")]
    Refused {
        /// Option code.
        option: u32,
        /// Reply type.
        reply: u32,
        /// Server message.
        msg: String,
    },
    /// The server answered a request with an error.
    #[error("server error {0}")]
    Request(u32),
    /// The connection is gone.
    #[error("disconnected")]
    Disconnected,
    /// Requests were outstanding and nothing arrived for the stall timeout.
    #[error("no reply byte for {0:?} with requests outstanding")]
    Stalled(Duration),
    /// A read outside the export.
    #[error("read of {len} bytes at {offset} is outside the export")]
    OutOfRange {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
    },
    /// TLS failed.
    #[error("tls: {0}")]
    Tls(String),
}

impl From<proto::CodecError> for ClientError {
    fn from(e: proto::CodecError) -> Self {
        ClientError::Protocol(e.to_string())
    }
}

/// Where a server is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    /// `host:port`.
    Tcp(String),
    /// `unix:PATH` or an absolute path.
    Unix(PathBuf),
}

impl std::str::FromStr for Addr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(Addr::Unix(p.into()));
        }
        if s.starts_with('/') {
            return Ok(Addr::Unix(s.into()));
        }
        let t = s.strip_prefix("tcp:").unwrap_or(s);
        if !t.contains(':') {
            return Err(format!("{s}: expected HOST:PORT or unix:PATH"));
        }
        Ok(Addr::Tcp(t.to_owned()))
    }
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Addr::Tcp(a) => write!(f, "{a}"),
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Client-side TLS settings.
#[derive(Clone)]
pub struct ClientTls {
    /// Connector trusting the configured CA.
    pub connector: TlsConnector,
    /// Name to verify in the server certificate.
    pub server_name: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish()
    }
}

/// Build a TLS connector trusting the CA certificates in `ca` (PEM).
pub fn load_client_tls(
    ca: &std::path::Path,
    server_name: String,
) -> Result<ClientTls, ClientError> {
    let mut roots = rustls::RootCertStore::empty();
    let mut r = io::BufReader::new(std::fs::File::open(ca)?);
    for c in rustls_pemfile::certs(&mut r) {
        roots.add(c?).map_err(|e| ClientError::Tls(e.to_string()))?;
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ClientError::Tls(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(ClientTls {
        connector: TlsConnector::from(Arc::new(cfg)),
        server_name,
    })
}

/// Largest payload this client ever asks for in one request (the spec's 32 MiB that every
/// server must accept when it advertises nothing).
const MAX_REQUEST: u32 = 32 << 20;
/// Largest minimum block size the spec allows.
const MAX_MIN_BLOCK: u32 = 64 << 10;
/// Pieces of one read in flight at once.
const READ_WINDOW: usize = 16;

/// Block size constraints of a server (`NBD_INFO_BLOCK_SIZE`), made consistent: `min` is a
/// power of two of at most 64 KiB, `preferred` a power of two of at least `min`, `max` a
/// multiple of `min` of at most 32 MiB.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLimits {
    /// Requests start and end on multiples of this.
    pub min: u32,
    /// Requests are multiples of this where they can be.
    pub preferred: u32,
    /// No request carries more payload than this.
    pub max: u32,
}

impl Default for BlockLimits {
    /// What a client assumes when the server advertises nothing.
    fn default() -> Self {
        Self {
            min: 1,
            preferred: 4096,
            max: MAX_REQUEST,
        }
    }
}

impl BlockLimits {
    /// Limits from advertised values. Values outside the spec are rounded to the nearest
    /// safe ones (a larger minimum, a smaller maximum) instead of refusing the server.
    pub fn from_advertised(min: u32, preferred: u32, max: u32) -> Self {
        let min = min.clamp(1, MAX_MIN_BLOCK).next_power_of_two();
        let preferred = preferred
            .clamp(min, MAX_REQUEST)
            .checked_next_power_of_two()
            .unwrap_or(MAX_REQUEST)
            .min(MAX_REQUEST);
        let max = max.min(MAX_REQUEST) / min * min;
        Self {
            min,
            preferred,
            max: max.max(min),
        }
    }

    /// Largest piece a long read is split into: the maximum, rounded down to a multiple of
    /// the preferred size when that is not larger than the maximum.
    pub fn piece(&self) -> u32 {
        if self.preferred <= self.max {
            self.max / self.preferred * self.preferred
        } else {
            self.max
        }
    }

    /// `[off, off+len)` widened to multiples of the minimum, the end capped at `size`.
    pub fn align(&self, off: u64, len: u64, size: u64) -> (u64, u64) {
        let m = u64::from(self.min);
        let start = off / m * m;
        let end = (off + len).div_ceil(m).saturating_mul(m).min(size);
        (start, end.max(start))
    }
}

type Pending = HashMap<u64, (u32, oneshot::Sender<Result<Vec<u8>, ClientError>>)>;

struct Shared {
    pending: Pending,
    dead: bool,
    /// Longest silence allowed with requests outstanding (`None`: wait forever).
    stall: Option<Duration>,
}

/// When a connection last showed life: the last reply byte, or the moment it went from idle
/// to busy. Milliseconds since `base`, so that the reader can update it without a lock.
struct Activity {
    base: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            base: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
    fn touch(&self) {
        let ms = u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }
    fn idle(&self) -> Duration {
        let last = self.base + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Instant::now().saturating_duration_since(last)
    }
}

/// The read half, noting every byte that arrives.
struct Tracked {
    inner: ReadHalf<Box<dyn Conn>>,
    activity: Arc<Activity>,
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

/// A connected client.
pub struct Client {
    size: u64,
    flags: u16,
    limits: BlockLimits,
    writer: tokio::sync::Mutex<WriteHalf<Box<dyn Conn>>>,
    shared: Arc<Mutex<Shared>>,
    activity: Arc<Activity>,
    dead: watch::Receiver<bool>,
    cookie: AtomicU64,
    reader: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("size", &self.size)
            .field("flags", &self.flags)
            .finish()
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn send_opt(c: &mut Box<dyn Conn>, o: &ClientOption) -> io::Result<()> {
    c.write_all(&o.encode()).await?;
    c.flush().await
}

async fn read_opt_reply(c: &mut Box<dyn Conn>) -> Result<OptionReply, ClientError> {
    let mut h = [0u8; proto::OPTION_REPLY_HEADER_LEN];
    c.read_exact(&mut h).await?;
    let (option, reply_type, len) = OptionReply::parse_header(&h)?;
    if len > proto::MAX_OPTION_LEN {
        return Err(ClientError::Protocol("option reply too long".into()));
    }
    let mut data = vec![0u8; len as usize];
    c.read_exact(&mut data).await?;
    Ok(OptionReply {
        option,
        reply_type,
        data,
    })
}

impl Client {
    /// Connect to `addr` and open export `name`.
    pub async fn connect(
        addr: &Addr,
        name: &str,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ClientError> {
        let conn: Box<dyn Conn> = match addr {
            Addr::Tcp(a) => {
                let s = TcpStream::connect(a).await?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
            Addr::Unix(p) => Box::new(UnixStream::connect(p).await?),
        };
        Self::handshake(conn, name, tls).await
    }

    /// Negotiate over an already connected stream.
    pub async fn handshake(
        mut c: Box<dyn Conn>,
        name: &str,
        tls: Option<&ClientTls>,
    ) -> Result<Self, ClientError> {
        let mut g = [0u8; proto::GREETING_LEN];
        c.read_exact(&mut g).await?;
        let hflags = proto::parse_greeting(&g)?;
        if hflags & proto::FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol("server is not fixed newstyle".into()));
        }
        let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
        let mut cflags = proto::FLAG_C_FIXED_NEWSTYLE;
        if no_zeroes {
            cflags |= proto::FLAG_C_NO_ZEROES;
        }
        c.write_all(&cflags.to_be_bytes()).await?;
        if let Some(t) = tls {
            send_opt(&mut c, &ClientOption::StartTls).await?;
            let r = read_opt_reply(&mut c).await?;
            if r.reply_type != rep::ACK {
                return Err(ClientError::Refused {
                    option: opt::STARTTLS,
                    reply: r.reply_type,
                    msg: String::from_utf8_lossy(&r.data).into(),
                });
            }
            let sn = rustls::pki_types::ServerName::try_from(t.server_name.clone())
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            let s = t
                .connector
                .connect(sn, c)
                .await
                .map_err(|e| ClientError::Tls(e.to_string()))?;
            c = Box::new(s);
        }
        send_opt(
            &mut c,
            &ClientOption::Go(InfoRequest {
                name: name.to_owned(),
                infos: vec![info::BLOCK_SIZE],
            }),
        )
        .await?;
        let mut size = None;
        let mut flags = 0;
        let mut limits = BlockLimits::default();
        loop {
            let r = read_opt_reply(&mut c).await?;
            if r.option != opt::GO {
                return Err(ClientError::Protocol("reply to another option".into()));
            }
            match r.reply_type {
                rep::ACK => break,
                rep::INFO => match InfoItem::parse(&r.data)? {
                    InfoItem::Export { size: s, flags: f } => {
                        size = Some(s);
                        flags = f;
                    }
                    InfoItem::BlockSize {
                        min,
                        preferred,
                        max,
                    } => limits = BlockLimits::from_advertised(min, preferred, max),
                    _ => {}
                },
                rep::ERR_UNSUP => {
                    // Old server: fall back to NBD_OPT_EXPORT_NAME.
                    send_opt(&mut c, &ClientOption::ExportName(name.to_owned())).await?;
                    let s = c.read_u64().await?;
                    let f = c.read_u16().await?;
                    if !no_zeroes {
                        let mut z = [0u8; 124];
                        c.read_exact(&mut z).await?;
                    }
                    size = Some(s);
                    flags = f;
                    break;
                }
                t if t & rep::FLAG_ERROR != 0 => {
                    return Err(ClientError::Refused {
                        option: opt::GO,
                        reply: t,
                        msg: String::from_utf8_lossy(&r.data).into(),
                    })
                }
                _ => {}
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("no export size".into()))?;
        let (rd, wr) = tokio::io::split(c);
        let shared = Arc::new(Mutex::new(Shared {
            pending: HashMap::new(),
            dead: false,
            stall: None,
        }));
        let activity = Arc::new(Activity::new());
        let (dead_tx, dead) = watch::channel(false);
        let rd = Tracked {
            inner: rd,
            activity: activity.clone(),
        };
        let reader = tokio::spawn(reader_task(rd, shared.clone(), activity.clone(), dead_tx));
        Ok(Self {
            size,
            flags,
            limits,
            writer: tokio::sync::Mutex::new(wr),
            shared,
            activity,
            dead,
            cookie: AtomicU64::new(1),
            reader,
        })
    }

    /// Declare the connection dead when requests are outstanding and no reply byte arrives
    /// for `d` (counted from the last byte, or from the moment the connection became busy).
    pub fn set_stall_timeout(&self, d: Option<Duration>) {
        if let Ok(mut s) = self.shared.lock() {
            s.stall = d;
        }
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// The server's block size constraints (defaults when it advertised none).
    pub fn limits(&self) -> BlockLimits {
        self.limits
    }

    /// Bytes of replies still expected: the data of the reads sent and not yet answered
    /// (how busy the connection is, to spread requests over several).
    pub fn outstanding_bytes(&self) -> u64 {
        self.shared
            .lock()
            .map(|s| s.pending.values().map(|p| u64::from(p.0)).sum())
            .unwrap_or(u64::MAX)
    }

    /// Whether the connection has failed.
    pub fn is_dead(&self) -> bool {
        self.shared.lock().map(|s| s.dead).unwrap_or(true)
    }

    /// Send one request; the receiver yields its reply.
    async fn send(
        &self,
        typ: u16,
        offset: u64,
        length: u32,
        read_len: u32,
    ) -> Result<oneshot::Receiver<Result<Vec<u8>, ClientError>>, ClientError> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.shared.lock().map_err(|_| ClientError::Disconnected)?;
            if s.dead {
                return Err(ClientError::Disconnected);
            }
            if s.pending.is_empty() {
                // The stall clock starts when the connection becomes busy.
                self.activity.touch();
            }
            s.pending.insert(cookie, (read_len, tx));
        }
        let req = Request {
            flags: 0,
            typ,
            cookie,
            offset,
            length,
        };
        let write = async {
            let mut w = self.writer.lock().await;
            w.write_all(&req.encode()).await?;
            w.flush().await
        };
        let mut dead = self.dead.clone();
        // A source that stops reading must not hold the writer forever: the reader's
        // stall timeout ends the wait.
        let r = tokio::select! {
            r = write => r.map_err(ClientError::from),
            _ = dead.wait_for(|d| *d) => Err(ClientError::Disconnected),
        };
        if let Err(e) = r {
            if let Ok(mut s) = self.shared.lock() {
                s.pending.remove(&cookie);
            }
            return Err(e);
        }
        tracing::trace!(cookie, offset, length, "source request sent");
        Ok(rx)
    }

    /// Read `len` bytes at `offset`, within the server's block size constraints: widened to
    /// its minimum block size, split at its maximum, the pieces pipelined.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        let len64 = u64::from(len);
        if offset.checked_add(len64).is_none_or(|e| e > self.size) {
            return Err(ClientError::OutOfRange { offset, len: len64 });
        }
        let (a, b) = self.limits.align(offset, len64, self.size);
        let piece = u64::from(self.limits.piece());
        if a == offset && b - a == len64 && len64 <= piece {
            let rx = self.send(cmd::READ, offset, len, len).await?;
            return rx.await.map_err(|_| ClientError::Disconnected)?;
        }
        let mut out = vec![0u8; (b - a) as usize];
        let mut queue = VecDeque::new();
        let mut pos = a;
        while pos < b || !queue.is_empty() {
            while pos < b && queue.len() < READ_WINDOW {
                // `piece` is at most 32 MiB, so it fits.
                let n = (b - pos).min(piece) as u32;
                queue.push_back((pos, self.send(cmd::READ, pos, n, n).await?));
                pos += u64::from(n);
            }
            if let Some((p, rx)) = queue.pop_front() {
                let d = rx.await.map_err(|_| ClientError::Disconnected)??;
                let at = (p - a) as usize;
                out[at..at + d.len()].copy_from_slice(&d);
            }
        }
        if a == offset && b - a == len64 {
            return Ok(out);
        }
        let at = (offset - a) as usize;
        Ok(out[at..at + len as usize].to_vec())
    }

    /// Send `NBD_CMD_DISC` (best effort).
    pub async fn disconnect(&self) {
        let req = Request {
            flags: 0,
            typ: cmd::DISC,
            cookie: 0,
            offset: 0,
            length: 0,
        };
        let _ = tokio::time::timeout(Duration::from_secs(1), async {
            let mut w = self.writer.lock().await;
            let _ = w.write_all(&req.encode()).await;
            let _ = w.flush().await;
            let _ = w.shutdown().await;
        })
        .await;
    }
}

async fn reader_task(
    mut rd: Tracked,
    shared: Arc<Mutex<Shared>>,
    activity: Arc<Activity>,
    dead: watch::Sender<bool>,
) {
    let r = tokio::select! {
        r = read_replies(&mut rd, &shared) => r,
        e = watchdog(&shared, &activity) => Err(e),
    };
    let stalled = match &r {
        Err(ClientError::Stalled(d)) => Some(*d),
        _ => None,
    };
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    tracing::debug!("source connection closed: {e}");
    if let Ok(mut s) = shared.lock() {
        s.dead = true;
        for (_, (_, tx)) in s.pending.drain() {
            let _ = tx.send(Err(match stalled {
                Some(d) => ClientError::Stalled(d),
                None => ClientError::Disconnected,
            }));
        }
    }
    let _ = dead.send(true);
}

/// Returns when requests are outstanding and nothing has arrived for the stall timeout.
async fn watchdog(shared: &Mutex<Shared>, activity: &Activity) -> ClientError {
    loop {
        let stall = shared.lock().ok().and_then(|s| s.stall);
        let tick = stall.map_or(Duration::from_secs(1), |d| {
            (d / 4).clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
        tokio::time::sleep(tick).await;
        let Ok(s) = shared.lock() else {
            return ClientError::Disconnected;
        };
        if let Some(d) = s.stall {
            if !s.pending.is_empty() && activity.idle() >= d {
                return ClientError::Stalled(d);
            }
        }
    }
}

fn unknown(cookie: u64) -> ClientError {
    ClientError::Protocol(format!("unknown cookie {cookie}"))
}

async fn read_replies(rd: &mut Tracked, shared: &Mutex<Shared>) -> Result<(), ClientError> {
    loop {
        let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
        rd.read_exact(&mut h).await?;
        let rep = SimpleReply::parse(&h)?;
        let take = || {
            shared
                .lock()
                .map_err(|_| ClientError::Disconnected)
                .map(|mut s| s.pending.remove(&rep.cookie))
        };
        if rep.error != 0 {
            let Some((_, tx)) = take()? else {
                return Err(unknown(rep.cookie));
            };
            let _ = tx.send(Err(ClientError::Request(rep.error)));
            continue;
        }
        // The request stays pending while its payload arrives, so that a source falling
        // silent half-way through a reply counts as stalled like any other.
        let len = shared
            .lock()
            .map_err(|_| ClientError::Disconnected)?
            .pending
            .get(&rep.cookie)
            .map(|e| e.0)
            .ok_or_else(|| unknown(rep.cookie))?;
        let mut data = vec![0u8; len as usize];
        rd.read_exact(&mut data).await?;
        tracing::trace!(cookie = rep.cookie, "source reply read");
        if let Some((_, tx)) = take()? {
            let _ = tx.send(Ok(data));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{tflag, OPTION_HEADER_LEN};
    use tokio::io::DuplexStream;

    /// The server side of a handshake on an in-memory pipe: one read-only export of `size`.
    async fn serve_handshake(s: &mut DuplexStream, size: u64) {
        s.write_all(&proto::encode_greeting(
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        ))
        .await
        .unwrap();
        let _flags = s.read_u32().await.unwrap();
        let mut h = [0u8; OPTION_HEADER_LEN];
        s.read_exact(&mut h).await.unwrap();
        let (code, len) = proto::parse_option_header(&h).unwrap();
        assert_eq!(code, opt::GO);
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).await.unwrap();
        let export = InfoItem::Export {
            size,
            flags: tflag::HAS_FLAGS | tflag::READ_ONLY,
        };
        s.write_all(&OptionReply::info(opt::GO, &export).encode())
            .await
            .unwrap();
        s.write_all(&OptionReply::ack(opt::GO).encode())
            .await
            .unwrap();
    }

    async fn next_request(s: &mut DuplexStream) -> Request {
        let mut b = [0u8; proto::REQUEST_LEN];
        s.read_exact(&mut b).await.unwrap();
        Request::parse(&b).unwrap()
    }

    /// The next request, answered with a success header (the payload left to the caller).
    async fn next_request_answered(s: &mut DuplexStream) -> Request {
        let r = next_request(s).await;
        let ok = SimpleReply {
            error: 0,
            cookie: r.cookie,
        };
        s.write_all(&ok.encode()).await.unwrap();
        r
    }

    /// The stall timeout counts silence, not the time a reply takes: a 64 KiB reply that
    /// trickles in for about a minute, 1 KiB every 900 ms, arrives whole with a 1 s timeout;
    /// a request left unanswered ends the connection after that second. In virtual time
    /// (nothing here touches a file, so the paused clock only moves when every task waits).
    #[tokio::test(start_paused = true)]
    async fn a_slow_reply_is_not_a_stall_but_silence_is() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let source = tokio::spawn(async move {
            serve_handshake(&mut b, 1 << 20).await;
            let r = next_request_answered(&mut b).await;
            for piece in vec![7u8; r.length as usize].chunks(1024) {
                tokio::time::sleep(Duration::from_millis(900)).await;
                b.write_all(piece).await.unwrap();
            }
            let _silent = next_request(&mut b).await;
            // Held open and never answered.
            std::future::pending::<()>().await;
        });
        let c = Client::handshake(Box::new(a), "", None).await.unwrap();
        c.set_stall_timeout(Some(Duration::from_secs(1)));
        let t = Instant::now();
        let d = c.read(0, 64 << 10).await.unwrap();
        assert!(d.len() == 64 << 10 && d.iter().all(|&x| x == 7));
        assert!(
            t.elapsed() >= Duration::from_millis(64 * 900),
            "{:?}",
            t.elapsed()
        );
        assert!(!c.is_dead());
        let t = Instant::now();
        let e = c.read(64 << 10, 4096).await.unwrap_err();
        assert!(matches!(e, ClientError::Stalled(_)), "{e}");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(1) && waited <= Duration::from_millis(1300),
            "{waited:?}"
        );
        assert!(c.is_dead());
        source.abort();
    }

    /// A source that sends a reply's header and half its payload, then nothing: the read
    /// fails as stalled after the timeout (the request stays pending while its payload is
    /// read), instead of waiting forever.
    #[tokio::test(start_paused = true)]
    async fn silence_half_way_through_a_reply_is_a_stall() {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let source = tokio::spawn(async move {
            serve_handshake(&mut b, 1 << 20).await;
            let r = next_request_answered(&mut b).await;
            b.write_all(&vec![7u8; r.length as usize / 2])
                .await
                .unwrap();
            std::future::pending::<()>().await;
        });
        let c = Client::handshake(Box::new(a), "", None).await.unwrap();
        c.set_stall_timeout(Some(Duration::from_secs(2)));
        let t = Instant::now();
        let e = c.read(0, 8192).await.unwrap_err();
        assert!(matches!(e, ClientError::Stalled(_)), "{e}");
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_secs(2) && waited <= Duration::from_millis(2600),
            "{waited:?}"
        );
        source.abort();
    }

    #[test]
    fn block_limits_are_made_consistent() {
        let l = BlockLimits::from_advertised(512, 4096, 512 << 10);
        assert_eq!((l.min, l.preferred, l.max), (512, 4096, 512 << 10));
        assert_eq!(l.piece(), 512 << 10);
        // Out of spec: minimum not a power of two, maximum not a multiple of it, unlimited.
        let l = BlockLimits::from_advertised(3000, 0, 10_000);
        assert_eq!((l.min, l.preferred, l.max), (4096, 4096, 8192));
        let l = BlockLimits::from_advertised(0, 1 << 20, u32::MAX);
        assert_eq!((l.min, l.max), (1, 32 << 20));
        let l = BlockLimits::from_advertised(1 << 20, 1, 1);
        assert_eq!((l.min, l.max), (64 << 10, 64 << 10));
        // A preferred size above the maximum does not shrink pieces below the maximum.
        let l = BlockLimits::from_advertised(512, 1 << 20, 100_000);
        assert_eq!(l.piece(), 99_840);
        // Preferred below the maximum: pieces are multiples of it.
        let l = BlockLimits::from_advertised(512, 64 << 10, 200_000);
        assert_eq!(l.piece(), 196_608);
    }

    #[test]
    fn ranges_widen_to_the_minimum_block() {
        let l = BlockLimits::from_advertised(4096, 4096, 1 << 20);
        assert_eq!(l.align(4096, 512, 1 << 20), (4096, 8192));
        assert_eq!(l.align(5000, 5000, 1 << 20), (4096, 12288));
        // The end of an export that is not a multiple of the minimum.
        assert_eq!(l.align(8000, 100, 8100), (4096, 8100));
        assert_eq!(l.align(0, 0, 100), (0, 0));
    }
}
