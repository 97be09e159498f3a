//! Control protocol of the proxy: one JSON object per line over a Unix socket, one reply
//! line per request.
//!
//! Requests: `{"cmd":"query"}` (or `"status"`), `{"cmd":"cache-all"}`, `{"cmd":"switch","force":false}`,
//! `{"cmd":"reconnect","source":"HOST:PORT"|null}`, `{"cmd":"set-rate","rate":BYTES}`.
//! Replies: `{"ok":true,"status":{...}}` or `{"ok":false,"error":"..."}`; `status` is a
//! [`crate::proxy::Status`] (only `"mode":"serve"` for `xnbd serve`, which answers `query`
//! alone) with the NBD server's counters under `"server"` ([`crate::server::ServerStatus`])
//! and the control socket's under `"ctl"` ([`crate::listen::ListenCounts`]).
//!
//! The control socket takes at most [`MAX_SESSIONS`] connections at once and closes one
//! that sends no complete request line for [`IDLE`] (counted as a handshake timeout).

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::debug;

use crate::client::Addr;
use crate::listen::{AcceptErrors, ListenStats};
use crate::proxy::Proxy;
use crate::server::Server;

/// Longest request line accepted.
const MAX_LINE: usize = 4096;
/// Control connections served at once; more are closed at accept.
pub const MAX_SESSIONS: usize = 16;
/// Time a control connection has to send each request line.
pub const IDLE: Duration = Duration::from_secs(30);

/// Control errors.
#[derive(Debug, Error)]
pub enum CtlError {
    /// Socket I/O.
    #[error("control socket: {0}")]
    Io(#[from] io::Error),
    /// Malformed message.
    #[error("control message: {0}")]
    Json(#[from] serde_json::Error),
    /// The proxy refused.
    #[error("{0}")]
    Refused(String),
}

/// A control request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "kebab-case")]
pub enum Request {
    /// Status (`xnbd ctl status`); `{"cmd":"status"}` is accepted too.
    #[serde(alias = "status")]
    Query,
    /// Start the background copy of every missing block.
    CacheAll,
    /// Drop the source.
    Switch {
        /// Even with blocks missing.
        #[serde(default)]
        force: bool,
    },
    /// Reconnect to the source, optionally at a new address.
    Reconnect {
        /// New address.
        #[serde(default)]
        source: Option<String>,
    },
    /// Set the background rate (bytes per second, 0: unlimited).
    SetRate {
        /// Bytes per second.
        rate: u64,
    },
}

/// A control reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    /// Success.
    pub ok: bool,
    /// Error message when not ok.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Status after the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// What the control socket controls: a proxy, or a plain server (status only).
#[derive(Debug, Clone)]
pub struct Controlled {
    /// The proxy, if this is one.
    pub proxy: Option<Arc<Proxy>>,
    /// The NBD server.
    pub server: Arc<Server>,
    /// Counters of the control socket itself.
    pub ctl: Arc<ListenStats>,
}

impl Controlled {
    /// A control target.
    pub fn new(proxy: Option<Arc<Proxy>>, server: Arc<Server>) -> Controlled {
        Controlled {
            proxy,
            server,
            ctl: Arc::default(),
        }
    }

    fn status(&self) -> Option<serde_json::Value> {
        let mut v = match &self.proxy {
            Some(p) => serde_json::to_value(p.status()).ok()?,
            None => serde_json::json!({ "mode": "serve" }),
        };
        let o = v.as_object_mut()?;
        o.insert(
            "server".into(),
            serde_json::to_value(self.server.status()).ok()?,
        );
        o.insert("ctl".into(), serde_json::to_value(self.ctl.counts()).ok()?);
        Some(v)
    }

    fn apply(&self, req: Request) -> Reply {
        let r = match (&self.proxy, req) {
            (_, Request::Query) => Ok(()),
            (Some(p), req) => apply(p, req),
            (None, _) => Err("not a proxy: only status is available".to_owned()),
        };
        let status = self.status();
        match r {
            Ok(()) => Reply {
                ok: true,
                error: None,
                status,
            },
            Err(e) => Reply {
                ok: false,
                error: Some(e),
                status,
            },
        }
    }
}

fn apply(p: &Proxy, req: Request) -> Result<(), String> {
    match req {
        Request::Query => Ok(()),
        Request::CacheAll => {
            p.cache_all();
            Ok(())
        }
        Request::Switch { force } => p.switch(force),
        Request::Reconnect { source } => match source.map(|s| s.parse::<Addr>()).transpose() {
            Ok(a) => {
                p.reconnect(a);
                Ok(())
            }
            Err(e) => Err(e),
        },
        Request::SetRate { rate } => {
            p.set_rate(rate);
            Ok(())
        }
    }
}

/// Bind the control socket at `path` (replaced if present; it appears once it listens).
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    crate::listen::bind_unix(path)
}

/// Serve the control socket forever (failed accepts back off; see [`crate::listen`]).
pub async fn serve(l: UnixListener, target: Controlled) {
    let mut errs = AcceptErrors::new("control");
    loop {
        let s = match l.accept().await {
            Ok((s, _)) => {
                errs.ok();
                s
            }
            Err(e) => {
                tokio::time::sleep(errs.failed(&e, &target.ctl)).await;
                continue;
            }
        };
        let Some(slot) = target.ctl.admit(MAX_SESSIONS) else {
            continue;
        };
        let t = target.clone();
        tokio::spawn(async move {
            let _slot = slot;
            if let Err(e) = session(s, &t).await {
                debug!("control session: {e}");
            }
        });
    }
}

async fn session(s: UnixStream, t: &Controlled) -> Result<(), CtlError> {
    let (rd, mut wr) = s.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        let mut limited = (&mut rd).take(MAX_LINE as u64);
        let n = match tokio::time::timeout(IDLE, limited.read_line(&mut line)).await {
            Ok(n) => n?,
            Err(_) => {
                t.ctl
                    .handshake_timeouts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(());
            }
        };
        if n == 0 {
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => t.apply(req),
            Err(e) => Reply {
                ok: false,
                error: Some(format!("bad request: {e}")),
                status: None,
            },
        };
        let mut out = serde_json::to_vec(&reply)?;
        out.push(b'\n');
        match tokio::time::timeout(IDLE, wr.write_all(&out)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        }
    }
}

use tokio::io::AsyncReadExt as _;

/// Send one request and return the reply (an error reply becomes [`CtlError::Refused`]).
pub async fn call(path: &Path, req: &Request) -> Result<Reply, CtlError> {
    let s = UnixStream::connect(path).await?;
    let (rd, mut wr) = s.into_split();
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    wr.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(rd).read_line(&mut line).await?;
    let r: Reply = serde_json::from_str(line.trim())?;
    if !r.ok {
        return Err(CtlError::Refused(r.error.unwrap_or_default()));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_roundtrip_as_json() {
        for r in [
            Request::Query,
            Request::CacheAll,
            Request::Switch { force: true },
            Request::Reconnect {
                source: Some("127.0.0.1:10809".into()),
            },
            Request::Reconnect { source: None },
            Request::SetRate { rate: 1 << 20 },
        ] {
            let s = serde_json::to_string(&r).unwrap();
            assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        }
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"switch"}"#).unwrap(),
            Request::Switch { force: false }
        );
        // The CLI's verb is `status`; the socket takes both names.
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"cmd":"status"}"#).unwrap(),
            Request::Query
        );
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }
}
