//! Shared helpers for the integration tests: processes killed on drop, bounded waits,
//! tool detection, commands run under `timeout`.
#![allow(dead_code)]

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The xnbd binary under test.
pub const XNBD: &str = env!("CARGO_BIN_EXE_xnbd");

/// Whether `tool` is on PATH (or an absolute path that exists).
pub fn have(tool: &str) -> bool {
    if tool.starts_with('/') {
        return Path::new(tool).exists();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

/// Return early when a tool is missing, saying so through [`lab::skip`] (on stderr, and
/// in the skip log CI reads).
#[macro_export]
macro_rules! require {
    ($($t:expr),* $(,)?) => {
        for t in [$($t),*] {
            if !common::have(t) {
                lab::skip(&lab::skip::current_test(), &format!("{t} is not installed"));
                return;
            }
        }
    };
}

/// A child process killed (SIGKILL) and reaped on drop.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Kill now (SIGKILL), as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Start a program with stdout/stderr going to `log`.
pub fn spawn(prog: &str, args: &[&str], log: &Path) -> Proc {
    let f = File::create(log).expect("log file");
    let child = Command::new(prog)
        .args(args)
        .env(
            "RUST_LOG",
            std::env::var("XNBD_TEST_LOG").unwrap_or_else(|_| "info".into()),
        )
        .stdin(Stdio::null())
        .stdout(f.try_clone().expect("log file"))
        .stderr(f)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {prog}: {e}"));
    Proc {
        child,
        log: log.to_owned(),
    }
}

/// Start xnbd and wait until `ready` (a socket path) exists.
pub fn xnbd(args: &[&str], log: &Path, ready: &Path) -> Proc {
    let mut p = spawn(XNBD, args, log);
    if !wait_path(ready, Duration::from_secs(20)) {
        let _ = p.child.kill();
        panic!("xnbd did not come up: {}", p.log_text());
    }
    p
}

/// Start `xnbd serve` of `exports` (each the value of one `--export`) on the Unix socket
/// `sock`, with `extra` arguments after them, and wait for the socket.
pub fn serve(exports: &[String], sock: &Path, extra: &[&str], log: &Path) -> Proc {
    let mut args = vec!["serve"];
    for e in exports {
        args.extend(["--export", e.as_str()]);
    }
    args.extend(["--unix", sock.to_str().unwrap()]);
    args.extend(extra);
    xnbd(&args, log, sock)
}

/// Start nbdkit in the foreground on a Unix socket and wait for it.
pub fn nbdkit(sock: &Path, args: &[&str], log: &Path) -> Proc {
    let _ = std::fs::remove_file(sock);
    let s = sock.to_str().expect("utf-8 path");
    let mut a = vec!["-f", "-U", s];
    a.extend_from_slice(args);
    let mut p = spawn("nbdkit", &a, log);
    if !wait_path(sock, Duration::from_secs(20)) {
        let _ = p.child.kill();
        panic!("nbdkit did not come up: {}", p.log_text());
    }
    p
}

/// Poll for a path, bounded.
pub fn wait_path(p: &Path, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if p.exists() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Run `prog args` under `timeout secs`, returning its output.
pub fn run(secs: u32, prog: &str, args: &[&str]) -> Output {
    let out = Command::new("timeout")
        .arg("-k")
        .arg("5")
        .arg(secs.to_string())
        .arg(prog)
        .args(args)
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {prog}: {e}"));
    out
}

/// Run and require success; returns stdout.
pub fn ok(secs: u32, prog: &str, args: &[&str]) -> String {
    let o = run(secs, prog, args);
    assert!(
        o.status.success(),
        "{prog} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A file of `size` bytes whose first `data` bytes are pseudo-random (seeded) and the rest
/// a hole.
pub fn make_image(p: &Path, size: u64, data: u64, seed: u64) {
    use std::io::Write;
    let mut f = File::create(p).expect("image");
    let mut x = seed | 1;
    let mut buf = vec![0u8; 1 << 20];
    let mut done = 0;
    while done < data {
        for c in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
        }
        let n = (data - done).min(buf.len() as u64) as usize;
        f.write_all(&buf[..n]).expect("write image");
        done += n as u64;
    }
    f.set_len(size).expect("size image");
}

/// Whether two files have the same bytes.
pub fn same_bytes(a: &Path, b: &Path) -> bool {
    std::fs::read(a).expect("read a") == std::fs::read(b).expect("read b")
}

/// URI of an export on a Unix socket.
pub fn unix_uri(sock: &Path, name: &str) -> String {
    format!("nbd+unix:///{name}?socket={}", sock.display())
}

/// A free loopback TCP port (bound then released).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Wait for a TCP port to accept connections, bounded.
pub fn wait_tcp(port: u16, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `xnbd ctl --socket S --json status` as JSON.
pub fn query(ctl: &Path) -> serde_json::Value {
    let out = ok(
        20,
        XNBD,
        &["ctl", "--socket", ctl.to_str().unwrap(), "--json", "status"],
    );
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("bad json {out}: {e}"))
}

/// Poll `ctl status` until `pred` holds, bounded.
pub fn wait_status(
    ctl: &Path,
    timeout: Duration,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let end = Instant::now() + timeout;
    loop {
        let q = query(ctl);
        if pred(&q) {
            return q;
        }
        assert!(
            Instant::now() < end,
            "condition not reached in time; last status {q}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reads seen by nbdkit's log filter: (offset, count).
pub fn nbdkit_reads(log: &Path) -> Vec<(u64, u64)> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let hex = |line: &str, key: &str| -> Option<u64> {
        let i = line.find(key)? + key.len();
        let v = line[i..].split_whitespace().next()?;
        u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
    };
    text.lines()
        .filter(|l| l.contains(" Read id=") && !l.contains("...Read"))
        .filter_map(|l| Some((hex(l, "offset=")?, hex(l, "count=")?)))
        .collect()
}

/// How many times each block was read from the source, by block index.
pub fn fetch_counts(reads: &[(u64, u64)], block: u64) -> std::collections::HashMap<u64, u32> {
    let mut m = std::collections::HashMap::new();
    for &(off, count) in reads {
        let mut b = off / block;
        while b * block < off + count {
            *m.entry(b).or_insert(0) += 1;
            b += 1;
        }
    }
    m
}

/// `xnbd proxy` in `dir`, on `{tag}.sock` with control socket `{tag}.ctl` and the cache
/// `cache.img` (shared by every run in `dir`).
pub struct ProxyRun {
    pub dir: PathBuf,
    pub sock: PathBuf,
    pub ctl: PathBuf,
    pub cache: PathBuf,
}

impl ProxyRun {
    pub fn new(dir: &Path, tag: &str) -> Self {
        Self {
            dir: dir.to_owned(),
            sock: dir.join(format!("{tag}.sock")),
            ctl: dir.join(format!("{tag}.ctl")),
            cache: dir.join("cache.img"),
        }
    }
    /// The command line; a 64 KiB block unless `extra` names `--block-size`.
    pub fn args<'a>(&'a self, source: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
        let mut a = vec![
            "proxy",
            "--source",
            source,
            "--cache",
            self.cache.to_str().unwrap(),
            "--unix",
            self.sock.to_str().unwrap(),
            "--ctl",
            self.ctl.to_str().unwrap(),
        ];
        if !extra.contains(&"--block-size") {
            a.extend_from_slice(&["--block-size", "64K"]);
        }
        a.extend_from_slice(extra);
        a
    }
    /// Start, logging to `log` in `dir`, and wait for both sockets.
    pub fn start(&self, source: &str, extra: &[&str], log: &str) -> Proc {
        let _ = std::fs::remove_file(&self.sock);
        let p = xnbd(&self.args(source, extra), &self.dir.join(log), &self.sock);
        assert!(wait_path(&self.ctl, Duration::from_secs(10)));
        p
    }
    pub fn uri(&self) -> String {
        unix_uri(&self.sock, "")
    }
    /// `xnbd ctl` on this proxy's control socket.
    pub fn ctl(&self, args: &[&str]) -> Output {
        let mut a = vec!["ctl", "--socket", self.ctl.to_str().unwrap()];
        a.extend_from_slice(args);
        run(120, XNBD, &a)
    }
    /// `ctl cache-all` as JSON; on failure, panics with every `*.log` in `dir`.
    pub fn cache_all(&self) -> serde_json::Value {
        let o = self.ctl(&["--json", "cache-all", "--timeout", "90"]);
        if !o.status.success() {
            let mut logs = String::new();
            for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    logs += &format!("--- {}\n{}\n", p.display(), text);
                }
            }
            panic!("cache-all: {}\n{logs}", String::from_utf8_lossy(&o.stderr));
        }
        serde_json::from_slice(&o.stdout).unwrap()
    }
}

/// A counter from a status JSON object.
pub fn u(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64()
        .unwrap_or_else(|| panic!("{k} missing in {v}"))
}

/// The `--source` form of an NBD server on a Unix socket.
pub fn src_uri(sock: &Path) -> String {
    format!("unix:{}", sock.display())
}

/// Make a CA and a server certificate for localhost with openssl.
pub fn make_certs(dir: &Path) -> bool {
    if !have("openssl") {
        return false;
    }
    let p = |f: &str| dir.join(f).to_str().unwrap().to_owned();
    let steps: Vec<Vec<String>> = vec![
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p("ca-key.pem"),
            "-out",
            &p("ca-cert.pem"),
            "-days",
            "2",
            "-subj",
            "/CN=xnbd test ca",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            &p("server-key.pem"),
            "-out",
            &p("server.csr"),
            "-subj",
            "/CN=localhost",
        ]
        .into_iter()
        .map(String::from)
        .collect(),
    ];
    for s in steps {
        let a: Vec<&str> = s.iter().map(|x| x.as_str()).collect();
        if !run(60, "openssl", &a).status.success() {
            return false;
        }
    }
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    let a = [
        "x509",
        "-req",
        "-in",
        &p("server.csr"),
        "-CA",
        &p("ca-cert.pem"),
        "-CAkey",
        &p("ca-key.pem"),
        "-CAcreateserial",
        "-out",
        &p("server-cert.pem"),
        "-days",
        "2",
        "-extfile",
        &p("ext.cnf"),
    ];
    run(60, "openssl", &a).status.success()
}

/// Pseudo-random bytes (xorshift), distinct for each seed.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
