//! What the qemu and libvirt drivers share about one guest: where its disk, disk server
//! and console are, and what is read or done through them (the lease, a ping from
//! inside, whether the disk server runs, the disk's removal). The qemu driver keeps all
//! of it under the agent's run directory; the libvirt driver keeps the sockets in a
//! directory the hypervisor's group may enter.
use super::{parse_ping_avg, DriverError, RunningVm};
use crate::process::{pidfile_alive, spawn, stop_child};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Child;

/// Longest Unix socket path (sun_path less its NUL).
pub(super) const MAX_SOCK_PATH: usize = 107;

/// An error unless every path in `socks` fits a Unix socket address; `hint` says how
/// to make them shorter.
pub(super) fn check_sockets(socks: &[&Path], hint: &str) -> Result<(), DriverError> {
    match socks.iter().find(|s| s.as_os_str().len() > MAX_SOCK_PATH) {
        Some(s) => Err(DriverError::Config(format!(
            "socket path {} is longer than {MAX_SOCK_PATH} bytes ({hint})",
            s.display()
        ))),
        None => Ok(()),
    }
}

/// The files of one guest.
pub(super) struct GuestFiles {
    /// The disk server's NBD socket (export named after the VM).
    pub nbd: PathBuf,
    /// The serial console's socket.
    pub console: PathBuf,
    /// The console's log (what `address` reads).
    pub console_log: PathBuf,
    /// Pid file of the disk server (`xnbd serve`, or the migration proxy).
    pub xnbd_pid: PathBuf,
    /// Its log.
    pub xnbd_log: PathBuf,
    /// The disk image, `<disk dir>/<local>.img`.
    pub disk: PathBuf,
}

impl GuestFiles {
    /// Check the disk and console socket paths (with `hint` when one is too long) and
    /// remove old sockets.
    pub fn clear_sockets(&self, hint: &str) -> Result<(), DriverError> {
        check_sockets(&[&self.nbd, &self.console], hint)?;
        let _ = std::fs::remove_file(&self.nbd);
        let _ = std::fs::remove_file(&self.console);
        Ok(())
    }

    /// Whether the disk server runs (its pid file names a process whose command line
    /// names the socket).
    pub fn disk_server_alive(&self) -> bool {
        pidfile_alive(&self.xnbd_pid, &self.nbd.display().to_string())
    }

    /// The last lease the guest printed on its console.
    pub fn lease(&self) -> Option<Ipv4Addr> {
        let log = std::fs::read(&self.console_log).unwrap_or_default();
        parse_lease(&String::from_utf8_lossy(&log))
    }

    /// Median RTT from inside the guest (VM `vm`) to `target`, through its console shell.
    pub fn ping(&self, vm: &str, target: Ipv4Addr) -> Result<Option<f64>, DriverError> {
        let out = console_run(
            &self.console,
            vm,
            &format!("ping -q -c 3 -W 2 {target}"),
            std::time::Duration::from_secs(10),
        )?;
        Ok(parse_ping_avg(&out))
    }
}

impl GuestFiles {
    /// Start `xnbd serve` of the disk (export `vm`) on the NBD socket; its pid saved.
    pub fn spawn_server(&self, xnbd: &Path, vm: &str) -> Result<Child, DriverError> {
        let export = format!("{vm}={}", self.disk.display());
        let nbd = self.nbd.display().to_string();
        let child = spawn(
            &xnbd.display().to_string(),
            &["serve", "--export", &export, "--unix", &nbd],
            &[],
            &self.xnbd_log,
        )?;
        let _ = std::fs::write(&self.xnbd_pid, child.id().to_string());
        Ok(child)
    }

    /// Start the migration proxy `xnbd proxy --no-background` of an incoming VM `vm`
    /// on the NBD socket: its source the NBD socket `source`, its cache the disk file,
    /// control socket `ctl`, fetch rate `rate` bytes/s (0: unlimited). Its command line
    /// is saved beside the pid file (`<vm>.xnbd.args`) for the agent to start a proxy
    /// that died again (it resumes from its bitmap).
    pub fn spawn_proxy(
        &self,
        xnbd: &Path,
        vm: &str,
        source: &Path,
        ctl: &Path,
        rate: u64,
    ) -> Result<Child, DriverError> {
        let prog = xnbd.display().to_string();
        let (src, disk, nbd, ctl, rate) = (
            format!("unix:{}", source.display()),
            self.disk.display().to_string(),
            self.nbd.display().to_string(),
            ctl.display().to_string(),
            rate.to_string(),
        );
        let args = [
            "proxy",
            "--source",
            &src,
            "--source-export",
            vm,
            "--cache",
            &disk,
            "--no-background",
            "--name",
            vm,
            "--unix",
            &nbd,
            "--ctl",
            &ctl,
            "--rate",
            &rate,
        ];
        let argv: Vec<&str> = std::iter::once(prog.as_str())
            .chain(args.iter().copied())
            .collect();
        let _ = std::fs::write(
            self.xnbd_pid.with_extension("args"),
            serde_json::to_string(&argv).unwrap_or_default(),
        );
        let child = spawn(&prog, &args, &[], &self.xnbd_log)?;
        let _ = std::fs::write(&self.xnbd_pid, child.id().to_string());
        Ok(child)
    }

    /// Remove the disk file and its proxy bitmap: a cache left by an earlier attempt
    /// would resume from its bitmap, an incoming VM starts clean.
    pub fn clear_disk(&self) {
        let _ = std::fs::remove_file(&self.disk);
        let _ = std::fs::remove_file(self.disk.with_extension("img.bitmap"));
    }
}

/// The VM `handle` with the processes `children` started for it, or, when `started`
/// failed, its error once those processes have ended (the caller then removes the rest).
pub(super) fn running_or_ended(
    handle: String,
    mut children: Vec<Child>,
    started: Result<(), DriverError>,
) -> Result<RunningVm, DriverError> {
    match started {
        Ok(()) => Ok(RunningVm { handle, children }),
        Err(e) => {
            for c in &mut children {
                stop_child(c);
            }
            Err(e)
        }
    }
}

/// End the processes of a VM (the driver's own first, as it ordered them).
pub(super) fn end_children(vm: &mut RunningVm) {
    for c in &mut vm.children {
        stop_child(c);
    }
    vm.children.clear();
}

/// Delete the disk of the VM with local name `vm` from `disk_dir` (its cluster was
/// released); a name with a `/` is ignored.
pub(super) fn discard_disk(disk_dir: &Path, vm: &str) {
    if !vm.is_empty() && !vm.contains('/') {
        let _ = std::fs::remove_file(disk_dir.join(format!("{vm}.img")));
    }
}

/// Run `cmd` in the shell on the guest console behind the Unix socket `console` (of
/// VM `vm`, for errors); its output up to an end marker.
pub(super) fn console_run(
    console: &Path,
    vm: &str,
    cmd: &str,
    timeout: std::time::Duration,
) -> Result<String, DriverError> {
    use std::io::{Read, Write};
    let err = |e: std::io::Error| DriverError::Command {
        cmd: format!("console of {vm}: {cmd}"),
        msg: e.to_string(),
    };
    let mut s = std::os::unix::net::UnixStream::connect(console).map_err(err)?;
    s.set_read_timeout(Some(std::time::Duration::from_millis(200)))
        .map_err(err)?;
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // The quotes keep the echoed command line from matching the marker.
    let marker = format!("MVC-END-{nonce}");
    s.write_all(format!("\n{cmd}; echo MVC\"\"-END-{nonce}\n").as_bytes())
        .map_err(err)?;
    let deadline = std::time::Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(e) => return Err(err(e)),
        }
        let text = String::from_utf8_lossy(&out);
        if let Some(i) = text.find(&marker) {
            return Ok(text[..i].to_string());
        }
        if std::time::Instant::now() > deadline || out.len() > 1 << 20 {
            break;
        }
    }
    Err(DriverError::Command {
        cmd: format!("console of {vm}: {cmd}"),
        msg: format!("no answer within {} s", timeout.as_secs()),
    })
}

/// The address of the last `MVC-LEASE <ip>` line on a guest console (`none` after the
/// lease was dropped).
pub fn parse_lease(console: &str) -> Option<Ipv4Addr> {
    let last = console
        .lines()
        .rev()
        .find_map(|l| l.split("MVC-LEASE ").nth(1))?;
    last.split_whitespace().next()?.parse().ok()
}
