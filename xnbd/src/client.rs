//! A small NBD client used by the proxy to fetch blocks from the source: fixed newstyle,
//! `NBD_OPT_GO` (falling back to `NBD_OPT_EXPORT_NAME`), optional STARTTLS, simple replies,
//! many reads in flight on one connection.

use std::collections::HashMap;
use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use thiserror::Error;
use tokio::io::{AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpStream, UnixStream};
use tokio::sync::oneshot;
use tokio_rustls::rustls;
use tokio_rustls::TlsConnector;

use crate::proto::{
    self, cmd, info, opt, rep, ClientOption, InfoItem, InfoRequest, OptionReply, Request,
    SimpleReply,
};
use crate::server::Conn;

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

type Pending = HashMap<u64, (u32, oneshot::Sender<Result<Vec<u8>, ClientError>>)>;

struct Shared {
    pending: Pending,
    dead: bool,
}

/// A connected client.
pub struct Client {
    size: u64,
    flags: u16,
    max_payload: u32,
    writer: tokio::sync::Mutex<WriteHalf<Box<dyn Conn>>>,
    shared: Arc<Mutex<Shared>>,
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
        let mut max_payload = 32 << 20;
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
                    InfoItem::BlockSize { max, .. } => max_payload = max.max(512),
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
        }));
        let reader = tokio::spawn(reader_loop(rd, shared.clone()));
        Ok(Self {
            size,
            flags,
            max_payload: max_payload.min(32 << 20),
            writer: tokio::sync::Mutex::new(wr),
            shared,
            cookie: AtomicU64::new(1),
            reader,
        })
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags.
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Largest read the server accepts.
    pub fn max_payload(&self) -> u32 {
        self.max_payload
    }

    /// Whether the connection has failed.
    pub fn is_dead(&self) -> bool {
        self.shared.lock().map(|s| s.dead).unwrap_or(true)
    }

    async fn request(
        &self,
        typ: u16,
        offset: u64,
        length: u32,
        read_len: u32,
    ) -> Result<Vec<u8>, ClientError> {
        let cookie = self.cookie.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut s = self.shared.lock().map_err(|_| ClientError::Disconnected)?;
            if s.dead {
                return Err(ClientError::Disconnected);
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
        {
            let mut w = self.writer.lock().await;
            if let Err(e) = async {
                w.write_all(&req.encode()).await?;
                w.flush().await
            }
            .await
            {
                if let Ok(mut s) = self.shared.lock() {
                    s.pending.remove(&cookie);
                }
                return Err(e.into());
            }
        }
        rx.await.map_err(|_| ClientError::Disconnected)?
    }

    /// Read `len` bytes at `offset`.
    pub async fn read(&self, offset: u64, len: u32) -> Result<Vec<u8>, ClientError> {
        self.request(cmd::READ, offset, len, len).await
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
        let mut w = self.writer.lock().await;
        let _ = w.write_all(&req.encode()).await;
        let _ = w.flush().await;
        let _ = w.shutdown().await;
    }
}

async fn reader_loop(mut rd: ReadHalf<Box<dyn Conn>>, shared: Arc<Mutex<Shared>>) {
    let r: Result<(), ClientError> = async {
        loop {
            let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
            rd.read_exact(&mut h).await?;
            let rep = SimpleReply::parse(&h)?;
            let entry = shared
                .lock()
                .map_err(|_| ClientError::Disconnected)?
                .pending
                .remove(&rep.cookie);
            let Some((len, tx)) = entry else {
                return Err(ClientError::Protocol(format!(
                    "unknown cookie {}",
                    rep.cookie
                )));
            };
            if rep.error != 0 {
                let _ = tx.send(Err(ClientError::Request(rep.error)));
                continue;
            }
            let mut data = vec![0u8; len as usize];
            rd.read_exact(&mut data).await?;
            let _ = tx.send(Ok(data));
        }
    }
    .await;
    let e = r.err().map(|e| e.to_string()).unwrap_or_default();
    tracing::debug!("source connection closed: {e}");
    if let Ok(mut s) = shared.lock() {
        s.dead = true;
        for (_, (_, tx)) in s.pending.drain() {
            let _ = tx.send(Err(ClientError::Disconnected));
        }
    }
}
