//! Control protocol of the proxy: one JSON object per line over a Unix socket, one reply
//! line per request.
//!
//! Requests: `{"cmd":"query"}`, `{"cmd":"cache-all"}`, `{"cmd":"switch","force":false}`,
//! `{"cmd":"reconnect","source":"HOST:PORT"|null}`, `{"cmd":"set-rate","rate":BYTES}`.
//! Replies: `{"ok":true,"status":{...}}` or `{"ok":false,"error":"..."}`; `status` is a
//! [`crate::proxy::Status`].

use std::io;
use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tracing::debug;

use crate::client::Addr;
use crate::proxy::Proxy;

/// Longest request line accepted.
const MAX_LINE: usize = 4096;

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
    /// Status.
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

fn apply(p: &Proxy, req: Request) -> Reply {
    let r: Result<(), String> = match req {
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
    };
    let status = serde_json::to_value(p.status()).ok();
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

/// Serve the control socket at `path` (replaced if present) forever.
pub async fn serve(path: &Path, proxy: Arc<Proxy>) -> io::Result<()> {
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path)?;
    loop {
        let (s, _) = l.accept().await?;
        let p = proxy.clone();
        tokio::spawn(async move {
            if let Err(e) = session(s, p).await {
                debug!("control session: {e}");
            }
        });
    }
}

async fn session(s: UnixStream, p: Arc<Proxy>) -> Result<(), CtlError> {
    let (rd, mut wr) = s.into_split();
    let mut rd = BufReader::new(rd);
    let mut line = String::new();
    loop {
        line.clear();
        let n = (&mut rd).take(MAX_LINE as u64).read_line(&mut line).await?;
        if n == 0 {
            return Ok(());
        }
        let reply = match serde_json::from_str::<Request>(line.trim()) {
            Ok(req) => apply(&p, req),
            Err(e) => Reply {
                ok: false,
                error: Some(format!("bad request: {e}")),
                status: None,
            },
        };
        let mut out = serde_json::to_vec(&reply)?;
        out.push(b'\n');
        wr.write_all(&out).await?;
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
        assert!(serde_json::from_str::<Request>(r#"{"cmd":"explode"}"#).is_err());
    }
}
