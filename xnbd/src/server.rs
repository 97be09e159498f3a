//! The NBD server: fixed newstyle negotiation (with optional STARTTLS) and the transmission
//! phase, where cached reads and large writes are served inline by the connection's reader,
//! small writes go in batches to the file's writer threads, every other request runs on its
//! own task, and replies go out in completion order.

use std::collections::VecDeque;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::budget::{Budget, Hold, MemoryLimits};
use crate::conn::Conn;
use crate::listen::{AcceptErrors, Limits, ListenCounts, ListenStats};
use crate::op::OpError;
use crate::proto::{
    self, cflag, chunk, cmd, err, info as infot, opt, rep, tflag, Chunk, ClientOption, InfoItem,
    OptionReply, Request, SimpleReply,
};
use crate::storage::QueuedWrite;

/// Requests of one connection allowed in flight at once (more are read only when one ends).
const MAX_IN_FLIGHT: usize = 64;
/// Budget held by a block status reply (its largest size: 65536 extents of 8 bytes).
const BLOCK_STATUS_HOLD: u64 = 512 << 10;
/// Budget held by a reply header.
const HEADER_HOLD: u64 = 64;
/// TCP keepalive of client connections: first probe after 60 s without traffic, then every
/// 10 s, reset after 6 unanswered (a vanished peer's connection goes after about 2 min; a
/// live idle one is never disturbed).
const KEEPALIVE: (u32, u32, u32) = (60, 10, 6);
/// Read buffer of a connection.
const READ_BUFFER: usize = 256 << 10;
/// Largest read served inline when the page cache holds it (larger ones, and reads that
/// would wait for the disk, run on the blocking pool: on a busy machine, copying 256 KiB
/// reads on more threads than the runtime's gave nbdcopy about 20% more).
const INLINE_READ: usize = 64 << 10;
/// Largest write without FUA written inline to a local file (a copy into the page cache).
const INLINE_WRITE: usize = 256 << 10;
/// Writes up to this size go to the file's writer threads instead, in batches: many small
/// inline writes would each hold up the connection's reader (a page-cache write can wait
/// for writeback), and a thread per write would spin on the file's inode lock.
const SMALL_WRITE: usize = 64 << 10;
/// Small writes handed to the writer threads at most in one batch.
const WRITE_BATCH: usize = 32;
/// Preferred block size advertised.
const PREFERRED_BLOCK: u32 = 4096;
/// Largest read or write payload accepted (and advertised as the maximum block size) when
/// a connection's memory share is at least as large; smaller shares lower it (see
/// [`Server::max_payload`]).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Context id of `base:allocation` after `NBD_OPT_SET_META_CONTEXT`.
const BASE_ALLOCATION_ID: u32 = 1;

/// Server errors (connection-level; request errors are [`OpError`]s sent to the client).
#[derive(Debug, Error)]
pub enum ServerError {
    /// Socket I/O failed.
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    /// The client broke the protocol badly enough to drop it.
    #[error("protocol: {0}")]
    Protocol(String),
    /// TLS setup failed.
    #[error("tls: {0}")]
    Tls(String),
    /// The client did not finish negotiating in time.
    #[error("negotiation not finished within {0:?}")]
    HandshakeTimeout(std::time::Duration),
}

/// One export.
#[derive(Debug)]
pub struct Export {
    /// Name clients ask for.
    pub name: String,
    /// Free-form description (for `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`).
    pub description: String,
    /// Where the data lives.
    pub backend: Backend,
    /// Refuse writes.
    pub read_only: bool,
}

impl Export {
    fn flags(&self) -> u16 {
        let mut f = tflag::HAS_FLAGS
            | tflag::SEND_FLUSH
            | tflag::SEND_FUA
            | tflag::SEND_TRIM
            | tflag::SEND_WRITE_ZEROES
            | tflag::SEND_CACHE
            | tflag::CAN_MULTI_CONN;
        if self.read_only {
            f |= tflag::READ_ONLY;
        }
        f
    }
}

/// TLS policy.
#[derive(Clone)]
pub struct Tls {
    /// Acceptor built from the certificate and key.
    pub acceptor: TlsAcceptor,
    /// Refuse everything but STARTTLS and ABORT before TLS is up.
    pub required: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("required", &self.required)
            .finish()
    }
}

/// Build a TLS acceptor from PEM files (ring provider).
pub fn load_tls(cert: &Path, key: &Path) -> Result<TlsAcceptor, ServerError> {
    let certs = {
        let mut r = io::BufReader::new(std::fs::File::open(cert)?);
        rustls_pemfile::certs(&mut r).collect::<Result<Vec<_>, _>>()?
    };
    if certs.is_empty() {
        return Err(ServerError::Tls(format!(
            "no certificate in {}",
            cert.display()
        )));
    }
    let key = {
        let mut r = io::BufReader::new(std::fs::File::open(key)?);
        rustls_pemfile::private_key(&mut r)?
            .ok_or_else(|| ServerError::Tls(format!("no private key in {}", key.display())))?
    };
    let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| ServerError::Tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| ServerError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Counters for operators.
#[derive(Debug, Default)]
pub struct Stats {
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Requests served (all commands).
    pub requests: AtomicU64,
    /// Requests answered with an error.
    pub request_errors: AtomicU64,
    /// Connections dropped for protocol violations.
    pub protocol_drops: AtomicU64,
}

/// What `xnbd ctl query` shows of the server under `"server"`.
#[derive(Debug, Clone, Serialize)]
pub struct ServerStatus {
    /// Connections that reached negotiation.
    pub connections: u64,
    /// Requests served.
    pub requests: u64,
    /// Requests answered with an error.
    pub request_errors: u64,
    /// Connections dropped for protocol violations.
    pub protocol_drops: u64,
    /// The NBD listeners together (TCP and Unix).
    pub listeners: ListenCounts,
    /// Bytes of the memory budget.
    pub memory_budget: u64,
    /// Bytes of it held now.
    pub memory_used: u64,
    /// Requests that waited for the memory budget.
    pub budget_waits: u64,
    /// Connections closed because they did not read their replies while others waited
    /// for the budget.
    pub stalled_drops: u64,
}

/// Server configuration shared by all connections.
#[derive(Debug)]
pub struct Server {
    /// Exports; the first one also answers the empty name.
    pub exports: Vec<Arc<Export>>,
    /// Optional TLS.
    pub tls: Option<Tls>,
    /// Advertised minimum block size (1 = no alignment constraint). When larger, clients
    /// must ask for `NBD_INFO_BLOCK_SIZE` and misaligned requests get `EINVAL`.
    pub min_block: u32,
    /// Counters.
    pub stats: Stats,
    /// Bounds on connections (shared by every NBD listener of the server).
    pub limits: Limits,
    /// Counters of the listeners.
    pub listeners: Arc<ListenStats>,
    /// Bytes of requests and replies held at once.
    pub budget: Budget,
}

impl Server {
    /// A server for `exports` with the given bounds.
    pub fn new(
        exports: Vec<Arc<Export>>,
        tls: Option<Tls>,
        min_block: u32,
        limits: Limits,
        memory: MemoryLimits,
    ) -> Server {
        Server {
            exports,
            tls,
            min_block,
            stats: Stats::default(),
            limits,
            listeners: Arc::default(),
            budget: Budget::new(memory),
        }
    }

    /// The maximum block size advertised and enforced: [`MAX_PAYLOAD`], or the largest
    /// power of two within a connection's memory share if that is smaller, so one request
    /// never holds more than a share.
    pub fn max_payload(&self) -> u32 {
        let share = u32::try_from(self.budget.connection_bytes()).unwrap_or(u32::MAX);
        let share = if share.is_power_of_two() {
            share
        } else {
            share.next_power_of_two() >> 1
        };
        MAX_PAYLOAD
            .min(share)
            .max(PREFERRED_BLOCK.max(self.min_block))
    }

    /// Counters for operators.
    pub fn status(&self) -> ServerStatus {
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        ServerStatus {
            connections: n(&self.stats.connections),
            requests: n(&self.stats.requests),
            request_errors: n(&self.stats.request_errors),
            protocol_drops: n(&self.stats.protocol_drops),
            listeners: self.listeners.counts(),
            memory_budget: self.budget.total_bytes(),
            memory_used: self.budget.used_bytes(),
            budget_waits: n(&self.budget.waits),
            stalled_drops: n(&self.budget.stalled),
        }
    }

    fn find(&self, name: &str) -> Option<Arc<Export>> {
        self.exports
            .iter()
            .find(|e| e.name == name)
            .or_else(|| {
                if name.is_empty() {
                    self.exports.first()
                } else {
                    None
                }
            })
            .cloned()
    }

    /// Accept TCP connections forever (failed accepts back off; see [`crate::listen`]).
    pub async fn run_tcp(self: Arc<Self>, l: TcpListener) {
        let mut errs = AcceptErrors::new("nbd tcp");
        loop {
            match l.accept().await {
                Ok((s, peer)) => {
                    errs.ok();
                    let _ = s.set_nodelay(true);
                    // Idle connections may stay; connections to peers that vanished go.
                    {
                        use std::os::fd::AsFd;
                        let (idle, interval, count) = KEEPALIVE;
                        if let Err(e) = crate::sys::tcp_keepalive(s.as_fd(), idle, interval, count)
                        {
                            debug!(%peer, "keepalive not set: {e}");
                        }
                    }
                    self.clone().spawn_conn(Box::new(s), peer.to_string());
                }
                Err(e) => tokio::time::sleep(errs.failed(&e, &self.listeners)).await,
            }
        }
    }

    /// Accept Unix-socket connections forever.
    pub async fn run_unix(self: Arc<Self>, l: UnixListener) {
        let mut errs = AcceptErrors::new("nbd unix");
        loop {
            match l.accept().await {
                Ok((s, _)) => {
                    errs.ok();
                    self.clone().spawn_conn(Box::new(s), "unix".into());
                }
                Err(e) => tokio::time::sleep(errs.failed(&e, &self.listeners)).await,
            }
        }
    }

    /// Serve an accepted connection on its own task, or close it at once when
    /// `max_connections` are open.
    fn spawn_conn(self: Arc<Self>, conn: Box<dyn Conn>, peer: String) {
        let Some(slot) = self.listeners.admit(self.limits.max_connections) else {
            let refused = self.listeners.refused.load(Ordering::Relaxed);
            if refused.is_power_of_two() {
                warn!(
                    %peer,
                    refused,
                    max = self.limits.max_connections,
                    "too many connections: closed at accept"
                );
            }
            return;
        };
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = self.serve(conn).await {
                debug!(%peer, "connection ended: {e}");
            }
        });
    }

    /// Serve one connection to its end; negotiation must end within the handshake timeout.
    pub async fn serve(self: Arc<Self>, conn: Box<dyn Conn>) -> Result<(), ServerError> {
        self.stats.connections.fetch_add(1, Ordering::Relaxed);
        let limit = self.limits.handshake_timeout;
        let negotiated = match tokio::time::timeout(limit, self.negotiate(conn)).await {
            Ok(n) => n?,
            Err(_) => {
                self.listeners
                    .handshake_timeouts
                    .fetch_add(1, Ordering::Relaxed);
                return Err(ServerError::HandshakeTimeout(limit));
            }
        };
        let r = match negotiated {
            Some((conn, session)) => self.clone().transmission(conn, session).await,
            None => Ok(()),
        };
        if let Err(ServerError::Protocol(_)) = &r {
            self.stats.protocol_drops.fetch_add(1, Ordering::Relaxed);
        }
        r
    }

    async fn negotiate(
        &self,
        conn: Box<dyn Conn>,
    ) -> Result<Option<(Box<dyn Conn>, Session)>, ServerError> {
        let mut conn = conn;
        conn.write_all(&proto::encode_greeting(
            proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES,
        ))
        .await?;
        conn.flush().await?;
        let cflags = conn.read_u32().await?;
        if cflags & !(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES) != 0 {
            return Err(ServerError::Protocol(format!(
                "unknown client flags {cflags:#x}"
            )));
        }
        let fixed = cflags & proto::FLAG_C_FIXED_NEWSTYLE != 0;
        let no_zeroes = cflags & proto::FLAG_C_NO_ZEROES != 0;
        let mut tls_up = false;
        let mut structured = false;
        let mut meta: Option<String> = None; // export name base:allocation was set for
        loop {
            let mut h = [0u8; proto::OPTION_HEADER_LEN];
            conn.read_exact(&mut h).await?;
            let (code, len) =
                proto::parse_option_header(&h).map_err(|e| ServerError::Protocol(e.to_string()))?;
            if len > proto::MAX_OPTION_LEN {
                discard(&mut conn, u64::from(len)).await?;
                if code == opt::EXPORT_NAME || !fixed {
                    return Ok(None);
                }
                send(
                    &mut conn,
                    OptionReply::error(code, rep::ERR_TOO_BIG, "option too long"),
                )
                .await?;
                continue;
            }
            let mut data = vec![0u8; len as usize];
            conn.read_exact(&mut data).await?;
            let tls_required = self.tls.as_ref().is_some_and(|t| t.required) && !tls_up;
            if tls_required && code != opt::STARTTLS && code != opt::ABORT {
                if code == opt::EXPORT_NAME {
                    return Ok(None);
                }
                send(
                    &mut conn,
                    OptionReply::error(code, rep::ERR_TLS_REQD, "TLS required"),
                )
                .await?;
                continue;
            }
            let o = match ClientOption::parse(code, &data) {
                Ok(o) => o,
                Err(e) => {
                    if code == opt::EXPORT_NAME {
                        return Ok(None);
                    }
                    send(
                        &mut conn,
                        OptionReply::error(code, rep::ERR_INVALID, &e.to_string()),
                    )
                    .await?;
                    continue;
                }
            };
            match o {
                ClientOption::ExportName(name) => {
                    let Some(export) = self.find(&name) else {
                        return Ok(None);
                    };
                    conn.write_all(&proto::encode_export_name_reply(
                        export.backend.size(),
                        export.flags(),
                        no_zeroes,
                    ))
                    .await?;
                    conn.flush().await?;
                    let base_alloc = meta.as_deref() == Some(export.name.as_str()) && structured;
                    return Ok(Some((
                        conn,
                        Session {
                            export,
                            structured,
                            base_alloc,
                            min_block: 1,
                            max_payload: self.max_payload(),
                        },
                    )));
                }
                ClientOption::Abort => {
                    let _ = send(&mut conn, OptionReply::ack(code)).await;
                    return Ok(None);
                }
                ClientOption::List => {
                    for e in &self.exports {
                        send(&mut conn, OptionReply::server(&e.name, &e.description)).await?;
                    }
                    send(&mut conn, OptionReply::ack(code)).await?;
                }
                ClientOption::StartTls => {
                    let Some(tls) = &self.tls else {
                        send(
                            &mut conn,
                            OptionReply::error(code, rep::ERR_UNSUP, "TLS not configured"),
                        )
                        .await?;
                        continue;
                    };
                    if tls_up {
                        send(
                            &mut conn,
                            OptionReply::error(code, rep::ERR_INVALID, "TLS already active"),
                        )
                        .await?;
                        continue;
                    }
                    send(&mut conn, OptionReply::ack(code)).await?;
                    let s = tls
                        .acceptor
                        .accept(conn)
                        .await
                        .map_err(|e| ServerError::Tls(e.to_string()))?;
                    conn = Box::new(s);
                    tls_up = true;
                    // Everything negotiated in clear text is forgotten.
                    structured = false;
                    meta = None;
                }
                ClientOption::StructuredReply => {
                    structured = true;
                    send(&mut conn, OptionReply::ack(code)).await?;
                }
                ClientOption::Info(req) | ClientOption::Go(req) => {
                    let Some(export) = self.find(&req.name) else {
                        send(
                            &mut conn,
                            OptionReply::error(code, rep::ERR_UNKNOWN, "no such export"),
                        )
                        .await?;
                        continue;
                    };
                    let asked_bs = req.infos.contains(&infot::BLOCK_SIZE);
                    if self.min_block > 1 && !asked_bs {
                        send(
                            &mut conn,
                            OptionReply::error(
                                code,
                                rep::ERR_BLOCK_SIZE_REQD,
                                "block size constraints apply",
                            ),
                        )
                        .await?;
                        continue;
                    }
                    send(
                        &mut conn,
                        OptionReply::info(
                            code,
                            &InfoItem::Export {
                                size: export.backend.size(),
                                flags: export.flags(),
                            },
                        ),
                    )
                    .await?;
                    if req.infos.contains(&infot::NAME) {
                        send(
                            &mut conn,
                            OptionReply::info(code, &InfoItem::Name(export.name.clone())),
                        )
                        .await?;
                    }
                    if req.infos.contains(&infot::DESCRIPTION) {
                        send(
                            &mut conn,
                            OptionReply::info(
                                code,
                                &InfoItem::Description(export.description.clone()),
                            ),
                        )
                        .await?;
                    }
                    send(
                        &mut conn,
                        OptionReply::info(
                            code,
                            &InfoItem::BlockSize {
                                min: self.min_block,
                                preferred: PREFERRED_BLOCK.max(self.min_block),
                                max: self.max_payload(),
                            },
                        ),
                    )
                    .await?;
                    send(&mut conn, OptionReply::ack(code)).await?;
                    if code == opt::GO {
                        let base_alloc = structured
                            && meta.as_deref().is_some_and(|m| {
                                self.find(m).is_some_and(|e| Arc::ptr_eq(&e, &export))
                            });
                        return Ok(Some((
                            conn,
                            Session {
                                export,
                                structured,
                                base_alloc,
                                min_block: if asked_bs { self.min_block } else { 1 },
                                max_payload: self.max_payload(),
                            },
                        )));
                    }
                }
                ClientOption::ListMetaContext(q) | ClientOption::SetMetaContext(q) => {
                    let set = code == opt::SET_META_CONTEXT;
                    if !structured {
                        send(
                            &mut conn,
                            OptionReply::error(
                                code,
                                rep::ERR_INVALID,
                                "structured replies not negotiated",
                            ),
                        )
                        .await?;
                        continue;
                    }
                    if self.find(&q.export).is_none() {
                        send(
                            &mut conn,
                            OptionReply::error(code, rep::ERR_UNKNOWN, "no such export"),
                        )
                        .await?;
                        continue;
                    }
                    let matched = if set {
                        q.queries.iter().any(|s| s == proto::BASE_ALLOCATION)
                    } else {
                        q.queries.is_empty()
                            || q.queries
                                .iter()
                                .any(|s| s == "base:" || s == proto::BASE_ALLOCATION)
                    };
                    if matched {
                        let id = if set { BASE_ALLOCATION_ID } else { 0 };
                        send(
                            &mut conn,
                            OptionReply::meta_context(code, id, proto::BASE_ALLOCATION),
                        )
                        .await?;
                    }
                    if set {
                        meta = matched.then(|| q.export.clone());
                    }
                    send(&mut conn, OptionReply::ack(code)).await?;
                }
                ClientOption::Unknown(_) => {
                    send(
                        &mut conn,
                        OptionReply::error(code, rep::ERR_UNSUP, "option not supported"),
                    )
                    .await?;
                }
            }
        }
    }

    async fn transmission(
        self: Arc<Self>,
        conn: Box<dyn Conn>,
        s: Session,
    ) -> Result<(), ServerError> {
        let session = Arc::new(s);
        let (rd, wr) = tokio::io::split(conn);
        // Buffered: one read system call brings in many small request headers.
        let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
        let mut scratch = Vec::new();
        let out = Arc::new(Outbox::default());
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let writer = tokio::spawn(write_replies(wr.clone(), out.clone(), self.clone()));
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        // This connection's share of the memory budget: every request holds its bytes from
        // before its payload is read until its reply is written.
        let share = self.budget.connection();
        // Replies of requests served inline, handed to the writer together whenever the
        // next request is not buffered yet (one wake-up and one write for the lot).
        let mut ready: Vec<Seg> = Vec::new();
        // Small writes without FUA, handed to the file's writer threads as one batch whenever
        // the reader might wait (and every `WRITE_BATCH` writes).
        let mut writes = PendingWrites::default();
        let result: Result<(), ServerError> = async {
            loop {
                if rd.buffer().len() < proto::REQUEST_LEN {
                    // The socket may have to be waited for: queued writes go first.
                    writes.submit(&session, &out, &self);
                }
                if rd.buffer().len() < proto::REQUEST_LEN && !ready.is_empty() {
                    // Written here when the writer is idle: no hand-off to another task.
                    match wr.try_lock() {
                        Ok(mut w) => {
                            let mut segs = VecDeque::from(std::mem::take(&mut ready));
                            write_segments(&mut *w, &mut segs, &self.budget).await?;
                            stalled(&self.budget, w.flush()).await?;
                            ready = Vec::from(segs);
                        }
                        Err(_) => out.push_all(&mut ready),
                    }
                }
                let mut h = [0u8; proto::REQUEST_LEN];
                // The writer may fail while the client sends nothing: that ends the
                // connection too (and gives its budget back).
                let got = tokio::select! {
                    biased;
                    r = rd.read_exact(&mut h) => r.map(|_| ()),
                    () = out.failed() => Err(io::ErrorKind::BrokenPipe.into()),
                };
                match got {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
                let req = Request::parse(&h).map_err(|e| ServerError::Protocol(e.to_string()))?;
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                if req.typ == cmd::DISC {
                    return Ok(());
                }
                if req.typ == cmd::WRITE && rd.buffer().len() < req.length as usize {
                    // The payload may have to be waited for.
                    writes.submit(&session, &out, &self);
                }
                let units = self.budget.units(held_bytes(&req));
                let hold = self.budget.try_take(&share, units);
                if hold.is_some() {
                    if let Some(reply) = serve_inline(&session, &req, &mut rd, &mut scratch).await?
                    {
                        if reply.failed {
                            self.stats.request_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        ready.push(Seg {
                            bytes: reply.bytes,
                            _hold: hold,
                        });
                        continue;
                    }
                }
                let hold = match hold {
                    Some(h) => h,
                    None => {
                        // Queued writes and replies hold budget: they go to the writers
                        // before any wait for more.
                        writes.submit(&session, &out, &self);
                        out.push_all(&mut ready);
                        tokio::select! {
                            biased;
                            h = self.budget.take(&share, units) => {
                                h.ok_or_else(|| ServerError::Protocol("closed".into()))?
                            }
                            () = out.failed() => {
                                return Err(io::Error::from(io::ErrorKind::BrokenPipe).into())
                            }
                        }
                    }
                };
                let mut payload = Vec::new();
                let mut early: Option<OpError> = None;
                if req.typ == cmd::WRITE {
                    if req.length > session.max_payload {
                        writes.submit(&session, &out, &self);
                        discard(&mut rd, u64::from(req.length)).await?;
                        early = Some(OpError::new(
                            if session.structured {
                                err::EOVERFLOW
                            } else {
                                err::EINVAL
                            },
                            "write larger than the maximum block size",
                        ));
                    } else if rd.buffer().len() >= req.length as usize {
                        // All there: one copy, no zero-fill.
                        payload = rd.buffer()[..req.length as usize].to_vec();
                        rd.consume(req.length as usize);
                    } else {
                        writes.submit(&session, &out, &self);
                        payload = vec![0u8; req.length as usize];
                        rd.read_exact(&mut payload).await?;
                    }
                }
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        writes.submit(&session, &out, &self);
                        permits
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| ServerError::Protocol("closed".into()))?
                    }
                };
                if let (cmd::WRITE, Backend::File(_), None) =
                    (req.typ, &session.export.backend, &early)
                {
                    if req.flags & cflag::FUA == 0 {
                        if let Err(e) = validate(&session, &req) {
                            let reply = error_reply(&session, &req, e);
                            self.stats.request_errors.fetch_add(1, Ordering::Relaxed);
                            ready.push(Seg {
                                bytes: reply.bytes,
                                _hold: Some(hold),
                            });
                            continue;
                        }
                        writes.push(req, payload, permit, hold);
                        if writes.reqs.len() >= WRITE_BATCH {
                            writes.submit(&session, &out, &self);
                        }
                        continue;
                    }
                }
                let out = out.clone();
                let session = session.clone();
                let srv = self.clone();
                if let (cmd::WRITE, Backend::File(st), None) =
                    (req.typ, &session.export.backend, &early)
                {
                    // FUA: straight to the blocking pool (its fdatasync must not hold up the
                    // writer threads), which queues the reply itself.
                    let st = st.clone();
                    tokio::task::spawn_blocking(move || {
                        let r = (|| -> Result<(), OpError> {
                            validate(&session, &req)?;
                            st.write_at(&payload, req.offset)?;
                            if req.flags & cflag::FUA != 0 {
                                st.sync()?;
                            }
                            Ok(())
                        })();
                        let reply = match r {
                            Ok(()) => ok_reply(&req),
                            Err(e) => error_reply(&session, &req, e),
                        };
                        if reply.failed {
                            srv.stats.request_errors.fetch_add(1, Ordering::Relaxed);
                        }
                        out.push_all(&mut vec![Seg {
                            bytes: reply.bytes,
                            _hold: Some(hold),
                        }]);
                        drop(permit);
                    });
                    continue;
                }
                tokio::spawn(async move {
                    let reply = match early {
                        Some(e) => error_reply(&session, &req, e),
                        None => handle(&session, &req, payload).await,
                    };
                    if reply.failed {
                        srv.stats.request_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    out.push_all(&mut vec![Seg {
                        bytes: reply.bytes,
                        _hold: Some(hold),
                    }]);
                    drop(permit);
                });
            }
        }
        .await;
        // Outstanding requests finish and their replies are written before the socket closes.
        writes.submit(&session, &out, &self);
        out.push_all(&mut ready);
        let _ = permits.acquire_many(MAX_IN_FLIGHT as u32).await;
        out.close();
        match writer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!("writer: {e}"),
            Err(e) => warn!("writer task: {e}"),
        }
        result
    }
}

/// Small writes read but not yet handed to the writer threads, with what their replies need.
#[derive(Default)]
struct PendingWrites {
    writes: Vec<QueuedWrite>,
    reqs: Vec<(Request, OwnedSemaphorePermit, Hold)>,
}

impl PendingWrites {
    fn push(&mut self, req: Request, data: Vec<u8>, permit: OwnedSemaphorePermit, hold: Hold) {
        self.writes.push(QueuedWrite {
            offset: req.offset,
            data,
        });
        self.reqs.push((req, permit, hold));
    }

    /// Hand the batch to the writer threads; they queue the replies (each holding its
    /// budget until written) and release the in-flight permits once the writes are done.
    fn submit(&mut self, session: &Arc<Session>, out: &Arc<Outbox>, srv: &Arc<Server>) {
        if self.reqs.is_empty() {
            return;
        }
        let Backend::File(st) = &session.export.backend else {
            return;
        };
        let reqs = std::mem::take(&mut self.reqs);
        let (session2, out, srv) = (session.clone(), out.clone(), srv.clone());
        st.queue_writes(
            std::mem::take(&mut self.writes),
            Box::new(move |results| {
                let mut replies = Vec::with_capacity(reqs.len());
                let mut permits = Vec::with_capacity(reqs.len());
                for ((req, permit, hold), r) in reqs.into_iter().zip(results) {
                    let reply = match r {
                        Ok(()) => ok_reply(&req),
                        Err(e) => error_reply(&session2, &req, e.into()),
                    };
                    if reply.failed {
                        srv.stats.request_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    replies.push(Seg {
                        bytes: reply.bytes,
                        _hold: Some(hold),
                    });
                    permits.push(permit);
                }
                out.push_all(&mut replies);
                // The permits go only now, with the replies queued.
                drop(permits);
            }),
        );
    }
}

/// A reply to write, with the budget its request holds until then.
struct Seg {
    bytes: Vec<u8>,
    _hold: Option<Hold>,
}

/// Replies waiting to be written, in the order they completed.
#[derive(Default)]
struct Outbox {
    q: std::sync::Mutex<OutQueue>,
    /// Wakes the writer (a stored permit covers a push between its check and its wait).
    more: Notify,
    /// Wakes the reader when the writer has failed.
    dead: Notify,
}

#[derive(Default)]
struct OutQueue {
    segs: VecDeque<Seg>,
    writer_idle: bool,
    closed: bool,
    failed: bool,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutQueue> {
        // A poisoned lock only means a panic elsewhere; the queue itself stays consistent.
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue replies (taken out of `v`), waking the writer if it is waiting. Once the
    /// writer has failed they are dropped at once (with the budget they hold).
    fn push_all(&self, v: &mut Vec<Seg>) {
        if v.is_empty() {
            return;
        }
        let wake = {
            let mut q = self.lock();
            if q.failed {
                v.clear();
                return;
            }
            q.segs.extend(v.drain(..));
            std::mem::take(&mut q.writer_idle)
        };
        if wake {
            self.more.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.more.notify_one();
    }

    /// The writer cannot go on: drop what it had queued and wake the reader.
    fn fail(&self) {
        let dropped = {
            let mut q = self.lock();
            q.failed = true;
            std::mem::take(&mut q.segs)
        };
        drop(dropped);
        self.dead.notify_waiters();
    }

    /// Returns once the writer has failed.
    async fn failed(&self) {
        loop {
            // Registered before the check: a failure after it still wakes this future.
            let dead = self.dead.notified();
            if self.lock().failed {
                return;
            }
            dead.await;
        }
    }
}

/// Await a write to the client. A write that makes no progress for the stall timeout
/// while another connection waits for the memory budget fails (counted): the client is
/// not reading its replies and holds budget others need.
async fn stalled<T>(
    budget: &Budget,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::pin!(f);
    loop {
        match tokio::time::timeout(budget.stall_timeout(), &mut f).await {
            Ok(r) => return r,
            Err(_) if budget.contended() => {
                budget.stalled.fetch_add(1, Ordering::Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "replies not read while the memory budget is short",
                ));
            }
            Err(_) => {}
        }
    }
}

/// The writer of a connection, for replies completed on other tasks (the reader writes its
/// inline replies itself when the socket is free): takes every queued reply at once and
/// writes them with one gathered write (more if the socket takes less).
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: Arc<tokio::sync::Mutex<W>>,
    out: Arc<Outbox>,
    srv: Arc<Server>,
) -> io::Result<()> {
    let r = async {
        let mut segs: VecDeque<Seg> = VecDeque::new();
        loop {
            let more = out.more.notified();
            let closed = {
                let mut q = out.lock();
                std::mem::swap(&mut segs, &mut q.segs);
                q.writer_idle = segs.is_empty();
                q.closed
            };
            if segs.is_empty() {
                if closed {
                    break;
                }
                more.await;
                continue;
            }
            let mut w = wr.lock().await;
            write_segments(&mut *w, &mut segs, &srv.budget).await?;
            stalled(&srv.budget, w.flush()).await?;
        }
        let mut w = wr.lock().await;
        stalled(&srv.budget, w.flush()).await?;
        let _ = w.shutdown().await;
        Ok(())
    }
    .await;
    if r.is_err() {
        out.fail();
    }
    r
}

/// Write every segment (emptying `segs`, each dropped with its budget once written).
async fn write_segments<W: AsyncWrite + Unpin>(
    wr: &mut W,
    segs: &mut VecDeque<Seg>,
    budget: &Budget,
) -> io::Result<()> {
    const MAX_IOV: usize = 512;
    let mut skip = 0; // bytes of the front segment already written
    while let Some(front) = segs.front() {
        if skip >= front.bytes.len() {
            skip -= front.bytes.len();
            segs.pop_front();
            continue;
        }
        let n = if wr.is_write_vectored() {
            let mut iov: Vec<io::IoSlice<'_>> = Vec::with_capacity(segs.len().min(MAX_IOV));
            iov.push(io::IoSlice::new(&front.bytes[skip..]));
            iov.extend(
                segs.iter()
                    .skip(1)
                    .take(MAX_IOV - 1)
                    .map(|s| io::IoSlice::new(&s.bytes)),
            );
            stalled(budget, wr.write_vectored(&iov)).await?
        } else {
            stalled(budget, wr.write(&front.bytes[skip..])).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        skip += n;
    }
    Ok(())
}

/// Serve a request on the spot when that cannot block for long: small reads the page cache
/// holds and small writes without FUA to a local file (a page-cache copy), plus requests
/// that fail validation. `None`: the request must run on its own task (its payload, if any,
/// is still unread).
///
/// `scratch` is the connection's buffer for write payloads that are not all in `rd` yet;
/// it is reused from request to request, so it is zero-filled only when it grows.
async fn serve_inline<R: AsyncRead + Unpin>(
    s: &Session,
    req: &Request,
    rd: &mut BufReader<R>,
    scratch: &mut Vec<u8>,
) -> Result<Option<Reply>, ServerError> {
    let Backend::File(st) = &s.export.backend else {
        return Ok(None);
    };
    match req.typ {
        cmd::READ if req.length as usize <= INLINE_READ => {
            if let Err(e) = validate(s, req) {
                return Ok(Some(error_reply(s, req, e)));
            }
            let mut buf = read_reply_header(s, req);
            let hdr = buf.len();
            buf.resize(hdr + req.length as usize, 0);
            match st.read_cached(&mut buf[hdr..], req.offset) {
                Ok(true) => Ok(Some(Reply {
                    bytes: buf,
                    failed: false,
                })),
                Ok(false) => Ok(None),
                Err(e) => Ok(Some(error_reply(s, req, e.into()))),
            }
        }
        cmd::WRITE
            if (SMALL_WRITE + 1..=INLINE_WRITE).contains(&(req.length as usize))
                && req.flags & cflag::FUA == 0 =>
        {
            let len = req.length as usize;
            let v = validate(s, req);
            // The payload straight from the read buffer when it is all there.
            let r = if rd.buffer().len() >= len {
                let r = match &v {
                    Ok(()) => st.write_at(&rd.buffer()[..len], req.offset),
                    Err(_) => Ok(()),
                };
                rd.consume(len);
                r
            } else {
                scratch.resize(len, 0);
                rd.read_exact(scratch).await?;
                match &v {
                    Ok(()) => st.write_at(scratch, req.offset),
                    Err(_) => Ok(()),
                }
            };
            Ok(Some(match (v, r) {
                (Err(e), _) => error_reply(s, req, e),
                (Ok(()), Err(e)) => error_reply(s, req, e.into()),
                (Ok(()), Ok(())) => ok_reply(req),
            }))
        }
        _ => Ok(None),
    }
}

/// The header of a successful read reply.
fn read_reply_header(s: &Session, req: &Request) -> Vec<u8> {
    if s.structured {
        proto::encode_offset_data_header(chunk::FLAG_DONE, req.cookie, req.offset, req.length)
    } else {
        SimpleReply {
            error: 0,
            cookie: req.cookie,
        }
        .encode()
        .to_vec()
    }
}

/// Per-connection state after negotiation.
#[derive(Debug)]
struct Session {
    export: Arc<Export>,
    structured: bool,
    base_alloc: bool,
    min_block: u32,
    /// Largest read or write accepted.
    max_payload: u32,
}

struct Reply {
    bytes: Vec<u8>,
    failed: bool,
}

fn error_reply(s: &Session, req: &Request, e: OpError) -> Reply {
    let bytes = if s.structured && (req.typ == cmd::READ || req.typ == cmd::BLOCK_STATUS) {
        Chunk::Error {
            error: e.errno,
            message: e.msg,
        }
        .encode(chunk::FLAG_DONE, req.cookie)
    } else {
        SimpleReply {
            error: e.errno,
            cookie: req.cookie,
        }
        .encode()
        .to_vec()
    };
    Reply {
        bytes,
        failed: true,
    }
}

fn ok_reply(req: &Request) -> Reply {
    Reply {
        bytes: SimpleReply {
            error: 0,
            cookie: req.cookie,
        }
        .encode()
        .to_vec(),
        failed: false,
    }
}

/// Bytes of the memory budget a request holds until its reply is written: its read data or
/// write payload (refused beyond the maximum block size, so never more), or the largest
/// block status reply; a header for the rest. Reply headers of reads and writes ride in
/// the unit rounding, so a share of N MiB holds N reads of 1 MiB.
fn held_bytes(req: &Request) -> u64 {
    match req.typ {
        cmd::READ | cmd::WRITE => u64::from(req.length.min(MAX_PAYLOAD)),
        cmd::BLOCK_STATUS => BLOCK_STATUS_HOLD,
        _ => HEADER_HOLD,
    }
}

/// Check a request against the export and the negotiated session.
fn validate(s: &Session, req: &Request) -> Result<(), OpError> {
    let known = cflag::FUA | cflag::NO_HOLE | cflag::DF | cflag::REQ_ONE | cflag::FAST_ZERO;
    if req.flags & !known != 0 {
        return Err(OpError::new(err::EINVAL, "unknown command flags"));
    }
    let ranged = matches!(
        req.typ,
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
    );
    if !ranged && req.typ != cmd::FLUSH {
        return Err(OpError::new(err::EINVAL, "unknown command"));
    }
    let writes = matches!(req.typ, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && s.export.read_only {
        return Err(OpError::new(err::EPERM, "export is read-only"));
    }
    if req.flags & cflag::FAST_ZERO != 0 {
        return Err(OpError::new(err::EINVAL, "fast zero not negotiated"));
    }
    if req.flags & cflag::DF != 0 && !(s.structured && req.typ == cmd::READ) {
        return Err(OpError::new(
            err::EINVAL,
            "DF only applies to structured reads",
        ));
    }
    if !ranged {
        return Ok(());
    }
    let size = s.export.backend.size();
    let end = req.offset.checked_add(u64::from(req.length));
    if end.is_none_or(|e| e > size) {
        let e = if matches!(req.typ, cmd::WRITE | cmd::WRITE_ZEROES) {
            err::ENOSPC
        } else {
            err::EINVAL
        };
        return Err(OpError::new(e, "request beyond the end of the export"));
    }
    if s.min_block > 1 {
        let m = u64::from(s.min_block);
        if req.offset % m != 0 || u64::from(req.length) % m != 0 {
            return Err(OpError::new(
                err::EINVAL,
                "request not aligned to the minimum block size",
            ));
        }
    }
    if req.typ == cmd::READ && req.length > s.max_payload {
        let e = if s.structured {
            err::EOVERFLOW
        } else {
            err::EINVAL
        };
        return Err(OpError::new(e, "read larger than the maximum block size"));
    }
    if req.typ == cmd::BLOCK_STATUS {
        if !s.structured || !s.base_alloc {
            return Err(OpError::new(err::EINVAL, "no metadata context negotiated"));
        }
        if req.length == 0 {
            return Err(OpError::new(err::EINVAL, "empty block status request"));
        }
    }
    Ok(())
}

async fn handle(s: &Session, req: &Request, payload: Vec<u8>) -> Reply {
    match run(s, req, payload).await {
        Ok(r) => r,
        Err(e) => error_reply(s, req, e),
    }
}

async fn run(s: &Session, req: &Request, payload: Vec<u8>) -> Result<Reply, OpError> {
    validate(s, req)?;
    let b = &s.export.backend;
    let fua = req.flags & cflag::FUA != 0;
    let off = req.offset;
    let len = u64::from(req.length);
    match req.typ {
        cmd::READ => {
            let (hdr, bytes) = if s.structured {
                let h =
                    proto::encode_offset_data_header(chunk::FLAG_DONE, req.cookie, off, req.length);
                (h.len(), h)
            } else {
                let h = SimpleReply {
                    error: 0,
                    cookie: req.cookie,
                }
                .encode()
                .to_vec();
                (h.len(), h)
            };
            let mut buf = vec![0u8; hdr + req.length as usize];
            buf[..hdr].copy_from_slice(&bytes);
            let buf = b.read(off, buf, hdr).await?;
            Ok(Reply {
                bytes: buf,
                failed: false,
            })
        }
        cmd::WRITE => {
            b.write(off, payload, fua).await?;
            Ok(ok_reply(req))
        }
        cmd::FLUSH => {
            b.flush().await?;
            Ok(ok_reply(req))
        }
        cmd::TRIM => {
            b.trim(off, len, fua).await?;
            Ok(ok_reply(req))
        }
        cmd::WRITE_ZEROES => {
            b.write_zeroes(off, len, req.flags & cflag::NO_HOLE == 0, fua)
                .await?;
            Ok(ok_reply(req))
        }
        cmd::CACHE => {
            b.cache(off, len).await?;
            Ok(ok_reply(req))
        }
        cmd::BLOCK_STATUS => {
            let max = if req.flags & cflag::REQ_ONE != 0 {
                1
            } else {
                (MAX_PAYLOAD as usize - 4) / 8
            };
            let ext = b.block_status(off, len, max.min(1 << 16)).await?;
            let extents: Vec<(u32, u32)> = ext
                .into_iter()
                .filter(|e| e.0 > 0)
                .map(|(l, f)| (l as u32, f))
                .collect();
            if extents.is_empty() {
                return Err(OpError::new(err::EIO, "no extents"));
            }
            Ok(Reply {
                bytes: Chunk::BlockStatus {
                    context: BASE_ALLOCATION_ID,
                    extents,
                }
                .encode(chunk::FLAG_DONE, req.cookie),
                failed: false,
            })
        }
        _ => Err(OpError::new(err::EINVAL, "unknown command")),
    }
}

async fn send(conn: &mut Box<dyn Conn>, r: OptionReply) -> io::Result<()> {
    conn.write_all(&r.encode()).await?;
    conn.flush().await
}

async fn discard<R: AsyncRead + Unpin>(r: &mut R, mut n: u64) -> io::Result<()> {
    let mut buf = vec![0u8; 64 * 1024];
    while n > 0 {
        let k = n.min(buf.len() as u64) as usize;
        r.read_exact(&mut buf[..k]).await?;
        n -= k as u64;
    }
    Ok(())
}

/// Where to listen.
#[derive(Debug, Clone)]
pub enum Listen {
    /// TCP address.
    Tcp(String),
    /// Unix socket path (replaced if it exists).
    Unix(PathBuf),
}

/// Bind every listener and serve until the returned tasks are aborted.
pub async fn start(
    srv: Arc<Server>,
    listen: &[Listen],
) -> io::Result<Vec<tokio::task::JoinHandle<()>>> {
    let mut tasks = Vec::new();
    for l in listen {
        match l {
            Listen::Tcp(a) => {
                let tl = TcpListener::bind(a).await?;
                info!("listening on tcp {}", tl.local_addr()?);
                tasks.push(tokio::spawn(srv.clone().run_tcp(tl)));
            }
            Listen::Unix(p) => {
                let _ = std::fs::remove_file(p);
                let ul = UnixListener::bind(p)?;
                info!("listening on unix {}", p.display());
                tasks.push(tokio::spawn(srv.clone().run_unix(ul)));
            }
        }
    }
    Ok(tasks)
}
