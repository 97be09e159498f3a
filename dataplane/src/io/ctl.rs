//! Operator interfaces: the status socket (JSON, one document per connection) and the
//! Prometheus metrics listener (a minimal HTTP/1.1 responder).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::IoError;

/// How long a status query made right after start waits for the loop's first snapshot.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

/// A snapshot published by an event loop and read by the operator threads.
pub type Snapshot<T> = Arc<Mutex<Option<T>>>;

/// Listens on a Unix socket and answers every connection with the JSON of the snapshot.
/// Removes a stale socket file first. Returns a guard that removes the file on drop.
pub fn serve_status<T: serde::Serialize + Send + 'static>(
    path: &Path,
    snap: Snapshot<T>,
) -> Result<SocketFile, IoError> {
    if let Some(dir) = path.parent() {
        if !dir.as_os_str().is_empty() {
            std::fs::create_dir_all(dir).map_err(|e| IoError::Sys {
                call: format!("create {}", dir.display()),
                source: e,
            })?;
        }
    }
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(IoError::Invalid(format!(
                "status socket {} is in use by a running process (pass --status-socket)",
                path.display()
            )));
        }
        let _ = std::fs::remove_file(path);
    }
    let l = UnixListener::bind(path).map_err(|e| IoError::Sys {
        call: format!("bind {}", path.display()),
        source: e,
    })?;
    std::thread::Builder::new()
        .name("status".into())
        .spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                // Right after start the loop has not published yet: a query then waits
                // for the first snapshot rather than answer with nothing.
                let first_wait = Instant::now() + FIRST_SNAPSHOT_WAIT;
                let body = loop {
                    let body = {
                        let g = snap.lock().unwrap_or_else(|e| e.into_inner());
                        g.as_ref().and_then(|s| serde_json::to_string(s).ok())
                    };
                    if body.is_some() || Instant::now() >= first_wait {
                        break body;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                };
                let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                let starting = r#"{"state":"starting"}"#;
                let _ = c.write_all(body.as_deref().unwrap_or(starting).as_bytes());
                let _ = c.write_all(b"\n");
            }
        })
        .map_err(|e| IoError::Sys {
            call: "spawn status thread".into(),
            source: e,
        })?;
    Ok(SocketFile(path.to_owned()))
}

/// Removes the socket file when dropped.
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads the status document from a status socket.
pub fn query_status(path: &Path) -> Result<String, IoError> {
    let mut c = UnixStream::connect(path).map_err(|e| IoError::Sys {
        call: format!(
            "connect {} (is the process running? pass --status-socket)",
            path.display()
        ),
        source: e,
    })?;
    let _ = c.set_read_timeout(Some(Duration::from_secs(5)));
    let mut s = String::new();
    c.read_to_string(&mut s).map_err(|e| IoError::Sys {
        call: "read status".into(),
        source: e,
    })?;
    Ok(s)
}

/// Serves `render()` as Prometheus text on `GET /metrics`.
pub fn serve_metrics(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + 'static,
) -> Result<SocketAddr, IoError> {
    let l = TcpListener::bind(addr).map_err(|e| IoError::Sys {
        call: format!("bind metrics {addr}"),
        source: e,
    })?;
    let local = l.local_addr().unwrap_or(addr);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let _ = c.set_read_timeout(Some(Duration::from_secs(2)));
                let _ = c.set_write_timeout(Some(Duration::from_secs(2)));
                let mut req = [0u8; 2048];
                let mut got = 0;
                while got < req.len() {
                    match c.read(&mut req[got..]) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => got += n,
                    }
                    if req[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                        break;
                    }
                }
                let line = String::from_utf8_lossy(&req[..got]);
                let ok = line.starts_with("GET /metrics ") || line.starts_with("GET / ");
                let (status, body) = if ok {
                    ("200 OK", render())
                } else {
                    ("404 Not Found", "try GET /metrics\n".to_string())
                };
                let resp = format!(
                    "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = c.write_all(resp.as_bytes());
            }
        })
        .map_err(|e| IoError::Sys {
            call: "spawn metrics thread".into(),
            source: e,
        })?;
    Ok(local)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_right_after_start_waits_for_the_first_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let snap: Snapshot<serde_json::Value> = Arc::new(Mutex::new(None));
        let _guard = serve_status(&path, snap.clone()).unwrap();
        let publisher = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(150));
            *snap.lock().unwrap() = Some(serde_json::json!({"datapath": "tap"}));
        });
        let got = query_status(&path).unwrap();
        publisher.join().unwrap();
        assert_eq!(got.trim(), r#"{"datapath":"tap"}"#);
    }

    #[test]
    fn a_loop_that_never_publishes_is_reported_as_starting() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.sock");
        let snap: Snapshot<serde_json::Value> = Arc::new(Mutex::new(None));
        let _guard = serve_status(&path, snap).unwrap();
        let got = query_status(&path).unwrap();
        assert_eq!(got.trim(), r#"{"state":"starting"}"#);
    }
}
