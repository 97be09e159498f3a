//! Operator interfaces: the status socket (JSON, one document per connection) and the
//! Prometheus metrics listener (a minimal HTTP/1.1 responder).
//!
//! Both accept loops outlive any accept error: when descriptors run out (EMFILE/ENFILE)
//! or anything else short of resources fails, they log once, back off and accept again; an
//! aborted connection (ECONNABORTED) is skipped at once (see [`accept_backoff`]). At most [`MAX_CONNS`] connections are served at once, each on its
//! own thread and for at most [`CONN_DEADLINE`]; more are closed at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::IoError;

/// How long a status query made right after start waits for the loop's first snapshot.
const FIRST_SNAPSHOT_WAIT: Duration = Duration::from_secs(2);

/// A snapshot published by an event loop and read by the operator threads.
pub type Snapshot<T> = Arc<Mutex<Option<T>>>;

/// Most connections served at once per listener.
pub const MAX_CONNS: usize = 16;
/// Longest time one connection is served (reading the request, waiting for the first
/// snapshot, writing the answer).
pub const CONN_DEADLINE: Duration = Duration::from_secs(3);

/// Accepts connections until `accept` returns `Ok(None)` (never, for a real listener)
/// and hands each to `serve` on its own thread, at most [`MAX_CONNS`] at a time.
fn accept_loop<C: Send + 'static>(
    what: &'static str,
    mut accept: impl FnMut() -> std::io::Result<Option<C>>,
    serve: impl Fn(C) + Send + Sync + 'static,
) {
    let serve = Arc::new(serve);
    let busy = Arc::new(AtomicUsize::new(0));
    let mut errors = accept_backoff::AcceptBackoff::new(what);
    loop {
        let c = match accept() {
            Ok(Some(c)) => c,
            Ok(None) => return,
            Err(e) => {
                std::thread::sleep(errors.failed(&e));
                continue;
            }
        };
        errors.ok();
        if busy.fetch_add(1, Ordering::AcqRel) >= MAX_CONNS {
            busy.fetch_sub(1, Ordering::AcqRel);
            drop(c);
            continue;
        }
        let (serve2, busy2) = (Arc::clone(&serve), Arc::clone(&busy));
        let spawned = std::thread::Builder::new()
            .name(format!("{what}-conn"))
            .spawn(move || {
                serve2(c);
                busy2.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            // The thread was not made and the connection went down with its closure.
            busy.fetch_sub(1, Ordering::AcqRel);
            std::thread::sleep(accept_backoff::BACKOFF_MIN);
        }
    }
}

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
            accept_loop(
                "status",
                || l.accept().map(|(c, _)| Some(c)),
                move |mut c: UnixStream| {
                    let start = Instant::now();
                    // Right after start the loop has not published yet: a query then
                    // waits for the first snapshot rather than answer with nothing.
                    let first_wait = start + FIRST_SNAPSHOT_WAIT;
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
                    let left = CONN_DEADLINE
                        .saturating_sub(start.elapsed())
                        .max(Duration::from_millis(100));
                    let _ = c.set_write_timeout(Some(left));
                    let starting = r#"{"state":"starting"}"#;
                    let _ = c.write_all(body.as_deref().unwrap_or(starting).as_bytes());
                    let _ = c.write_all(b"\n");
                },
            )
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
    render: impl Fn() -> String + Send + Sync + 'static,
) -> Result<SocketAddr, IoError> {
    let l = TcpListener::bind(addr).map_err(|e| IoError::Sys {
        call: format!("bind metrics {addr}"),
        source: e,
    })?;
    let local = l.local_addr().unwrap_or(addr);
    std::thread::Builder::new()
        .name("metrics".into())
        .spawn(move || {
            accept_loop(
                "metrics",
                || l.accept().map(|(c, _)| Some(c)),
                move |mut c: std::net::TcpStream| {
                    // One deadline for the whole request, however slowly it trickles in.
                    let deadline = Instant::now() + CONN_DEADLINE;
                    let mut req = [0u8; 2048];
                    let mut got = 0;
                    while got < req.len() {
                        let left = deadline.saturating_duration_since(Instant::now());
                        if left.is_zero() || c.set_read_timeout(Some(left)).is_err() {
                            return;
                        }
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
                    let left = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_millis(100));
                    let _ = c.set_write_timeout(Some(left));
                    let _ = c.write_all(resp.as_bytes());
                },
            )
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
    fn accept_errors_back_off_and_accepting_goes_on() {
        // Descriptors run out five times, a connection is aborted once, then accepts work.
        let mut script: Vec<std::io::Result<Option<u32>>> = vec![];
        for _ in 0..5 {
            script.push(Err(std::io::Error::from_raw_os_error(libc::EMFILE)));
        }
        script.push(Err(std::io::Error::from_raw_os_error(libc::ECONNABORTED)));
        script.push(Err(std::io::Error::from_raw_os_error(libc::ENFILE)));
        script.push(Ok(Some(1)));
        script.push(Ok(Some(2)));
        script.push(Ok(None));
        let mut script = script.into_iter();
        let served = Arc::new(Mutex::new(Vec::new()));
        let s2 = Arc::clone(&served);
        let t = Instant::now();
        accept_loop(
            "test",
            move || script.next().unwrap_or(Ok(None)),
            move |c| s2.lock().unwrap().push(c),
        );
        // Backoff 5+10+20+40+80 ms, nothing for the aborted one, 160 ms for ENFILE.
        let took = t.elapsed();
        assert!(took >= Duration::from_millis(300), "{took:?}");
        assert!(took < Duration::from_secs(3), "{took:?}");
        let deadline = Instant::now() + Duration::from_secs(2);
        while served.lock().unwrap().len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        let mut got = served.lock().unwrap().clone();
        got.sort();
        assert_eq!(got, vec![1, 2]);
    }

    #[test]
    fn idle_metrics_clients_cannot_hold_the_listener() {
        let at = serve_metrics("127.0.0.1:0".parse().unwrap(), || "m 1\n".to_string()).unwrap();
        // More idle connections than the listener serves at once; none sends a byte.
        let idle: Vec<std::net::TcpStream> = (0..MAX_CONNS + 4)
            .map(|_| std::net::TcpStream::connect(at).unwrap())
            .collect();
        let t = Instant::now();
        let mut body = String::new();
        while t.elapsed() < CONN_DEADLINE * 3 {
            let mut c = std::net::TcpStream::connect(at).unwrap();
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let _ = c.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
            body.clear();
            let _ = c.read_to_string(&mut body);
            if body.contains("200 OK") {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(body.contains("m 1"), "{body:?}");
        assert!(t.elapsed() <= CONN_DEADLINE * 2, "{:?}", t.elapsed());
        drop(idle);
    }

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
