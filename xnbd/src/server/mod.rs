//! The NBD server: exports, listeners and the life of a connection.
//!
//! - `negotiate`: fixed newstyle option haggling with optional STARTTLS, ending in a
//!   a `Session` (or the connection's end).
//! - `transmit`: the transmission phase, where cached reads are served inline by the
//!   connection's reader, writes, write-zeroes, trims and flushes of a local file go in
//!   order to the connection's write lane (`transmit/lane.rs`, a blocking-pool thread that
//!   writes while the reader receives), every other request runs on its own task, and
//!   replies go out in completion order; the payloads of large inline writes go from the
//!   socket into the file with `splice` (`transmit/splice.rs`).
//! - `pool`: the write payload buffers, reused from request to request.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use serde::Serialize;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::{TcpListener, UnixListener};
use tracing::{debug, info, warn};

use crate::backend::Backend;
use crate::budget::{Budget, MemoryLimits};
use crate::conn::Conn;
use crate::listen::{AcceptErrors, Limits, ListenCounts, ListenStats};
use crate::proto::tflag;

mod negotiate;
mod pool;
mod transmit;

pub use negotiate::{load_tls, Tls};

/// TCP keepalive of client connections: first probe after 60 s without traffic, then every
/// 10 s, reset after 6 unanswered (a vanished peer's connection goes after about 2 min; a
/// live idle one is never disturbed).
const KEEPALIVE: (u32, u32, u32) = (60, 10, 6);
/// Preferred block size advertised.
const PREFERRED_BLOCK: u32 = 4096;
/// Largest read or write payload accepted (and advertised as the maximum block size) when
/// a connection's memory share is at least as large; smaller shares lower it (see
/// [`Server::max_payload`]).
pub const MAX_PAYLOAD: u32 = 32 << 20;
/// Context id of `base:allocation` after `NBD_OPT_SET_META_CONTEXT`.
const BASE_ALLOCATION_ID: u32 = 1;

/// Server errors (connection-level; request errors are [`crate::op::OpError`]s sent to the client).
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
    /// Write payloads moved from the socket into the file with `splice`.
    pub spliced_writes: AtomicU64,
    /// Connections whose socket or file refused to splice (their writes are copied).
    pub splice_fallbacks: AtomicU64,
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
    /// Write payloads moved from the socket into the file with `splice`.
    pub spliced_writes: u64,
    /// Connections whose socket or file refused to splice.
    pub splice_fallbacks: u64,
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
    /// Write payload buffers, reused.
    write_buffers: pool::BufferPool,
    /// Move large write payloads from plain sockets into local files with `splice`
    /// (`transmit/splice.rs`); off, they are read into memory and written from there.
    pub splice_writes: bool,
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
            write_buffers: pool::BufferPool::default(),
            splice_writes: true,
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
            spliced_writes: n(&self.stats.spliced_writes),
            splice_fallbacks: n(&self.stats.splice_fallbacks),
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
        let l = &l;
        self.accept_forever("nbd tcp", move || async move {
            let (s, peer) = l.accept().await?;
            let _ = s.set_nodelay(true);
            // Idle connections may stay; connections to peers that vanished go.
            {
                use std::os::fd::AsFd;
                let (idle, interval, count) = KEEPALIVE;
                if let Err(e) = crate::sys::tcp_keepalive(s.as_fd(), idle, interval, count) {
                    debug!(%peer, "keepalive not set: {e}");
                }
            }
            Ok((Box::new(s) as Box<dyn Conn>, peer.to_string()))
        })
        .await
    }

    /// Accept Unix-socket connections forever.
    pub async fn run_unix(self: Arc<Self>, l: UnixListener) {
        let l = &l;
        self.accept_forever("nbd unix", move || async move {
            let (s, _) = l.accept().await?;
            Ok((Box::new(s) as Box<dyn Conn>, "unix".to_owned()))
        })
        .await
    }

    /// Serve every connection `accept` gives (with its peer's name), forever; failed
    /// accepts back off and are counted as `what`.
    async fn accept_forever<F, Fut>(self: Arc<Self>, what: &'static str, mut accept: F)
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = io::Result<(Box<dyn Conn>, String)>>,
    {
        let mut errs = AcceptErrors::new(what);
        loop {
            match accept().await {
                Ok((s, peer)) => {
                    errs.ok();
                    self.clone().spawn_conn(s, peer);
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
                let ul = crate::listen::bind_unix(p)?;
                info!("listening on unix {}", p.display());
                tasks.push(tokio::spawn(srv.clone().run_unix(ul)));
            }
        }
    }
    Ok(tasks)
}
