//! `mvc-guest`: the guest agent inside a qemu guest of the mvc agent. It reads
//! `Exec` frames (control/src/guest_proto.rs) from the virtio-serial port
//! `org.mvc.guest.0` and answers each with a `Done`: the command run in its own
//! process group, its output kept up to 512 KiB per stream (the rest counted), the
//! group ended at the timeout (SIGTERM, 2 s later SIGKILL), as the agent runs a
//! command in a netns VM (control/src/bounded_exec.rs, included here). Commands run as root with
//! `PATH=/usr/sbin:/usr/bin:/sbin:/bin`, in `/mvc/home` when it exists, and with
//! `SLURM_CONF=/mvc/slurm.conf` when that exists. Each command has a thread, so a
//! long job does not hold the others. Only the agent's side of the port reaches it:
//! nothing listens on the network.
#[path = "../bounded_exec.rs"]
mod bounded_exec;
#[path = "../guest_proto.rs"]
#[allow(dead_code)]
mod guest_proto;

use bounded_exec::{kill_command, Bounds};
use guest_proto::{decode, encode, resync, Done, Exec, Msg, OUTPUT_MAX};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const PORT_NAME: &str = "org.mvc.guest.0";

/// The port's device: the `vportNpM` whose `name` is [`PORT_NAME`].
fn find_port() -> Option<PathBuf> {
    for e in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(Path::new("/dev").join(e.file_name()));
        }
    }
    None
}

fn os(b: &[u8]) -> std::ffi::OsString {
    use std::os::unix::ffi::OsStringExt;
    std::ffi::OsString::from_vec(b.to_vec())
}

fn run(e: Exec) -> Done {
    let mut cmd = Command::new(os(&e.argv[0]));
    cmd.args(e.argv[1..].iter().map(|a| os(a)))
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
    let home = Path::new("/mvc/home");
    cmd.current_dir(if home.is_dir() { home } else { Path::new("/") });
    if Path::new("/mvc/slurm.conf").exists() {
        cmd.env("SLURM_CONF", "/mvc/slurm.conf");
    }
    let bounds = Bounds::new(OUTPUT_MAX, Duration::from_millis(u64::from(e.timeout_ms)));
    // busybox's `kill`: the guest's signals without a system call of its own.
    match bounded_exec::run(&mut cmd, e.stdin, &bounds, kill_command) {
        Ok(f) => Done {
            code: f.code,
            timed_out: f.timed_out,
            dropped: f.dropped,
            stdout: f.stdout,
            stderr: f.stderr,
        },
        Err(err) => Done {
            code: Some(127),
            stderr: format!("cannot run {}: {err}", String::from_utf8_lossy(&e.argv[0]))
                .into_bytes(),
            ..Done::default()
        },
    }
}

fn serve(port: &Path) -> std::io::Result<()> {
    let mut rd = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(port)?;
    let wr = Arc::new(Mutex::new(rd.try_clone()?));
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 65536];
    let mut unknown = 0u64;
    loop {
        match rd.read(&mut chunk) {
            // No host connected: the port reads as closed until one is.
            Ok(0) => std::thread::sleep(Duration::from_millis(100)),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
        loop {
            match decode(&buf) {
                Ok(None) => break,
                Ok(Some((f, n))) => {
                    buf.drain(..n);
                    match f.msg {
                        Msg::Exec(e) => {
                            let wr = wr.clone();
                            std::thread::spawn(move || {
                                let mut out = Vec::new();
                                if encode(f.id, &Msg::Done(run(e)), &mut out).is_ok() {
                                    let mut w = wr.lock().unwrap_or_else(|p| p.into_inner());
                                    let _ = w.write_all(&out);
                                }
                            });
                        }
                        _ => {
                            unknown += 1;
                            eprintln!("mvc-guest: {unknown} frames of no use dropped");
                        }
                    }
                }
                Err(e) => {
                    eprintln!("mvc-guest: {e}; skipping to the next frame");
                    let n = resync(&buf);
                    buf.drain(..n);
                }
            }
        }
    }
}

fn main() {
    let end = Instant::now() + Duration::from_secs(120);
    let port = loop {
        if let Some(p) = find_port().filter(|p| p.exists()) {
            break p;
        }
        if Instant::now() > end {
            eprintln!("mvc-guest: no virtio-serial port named {PORT_NAME}");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    loop {
        if let Err(e) = serve(&port) {
            eprintln!("mvc-guest: {}: {e}", port.display());
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}
