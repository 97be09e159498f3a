//! The netns driver's side of live migration ([`crate::migrate`]): a light VM moves
//! with its MAC, its addresses and its disk file.
//!
//! The destination recreates the namespace with the VM's MAC on an `eth0` that stays
//! down (so nothing is heard from the MAC here before the switch), starts `xnbd proxy
//! --no-background` whose cache is the VM's disk file, and waits on the migration's
//! memory socket for the VM's state ([`NetnsState`], one JSON line: its addresses),
//! which the origin sends through the agents' `ram` tunnel once it has taken its own
//! `eth0` down. The addresses are then set, `eth0` comes up and a gratuitous ARP tells
//! the bridge and the overlay where the MAC is now; the answer `ok` ends the origin's
//! send step. After the switch the VM's DHCP client starts (renewing the same lease,
//! reserved per MAC at the frontend, without ever dropping the address) and the disk
//! follows in the background as for a qemu VM.
use super::netns::NetnsDriver;
use super::{DriverError, RunningVm};
use crate::migrate::{IncomingDisk, NetnsState};
use crate::process::{run, spawn, stop_child};
use crate::proto::VmSpec;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

/// DHCP client script of a moved light VM: its address stays while the lease is
/// renewed (`replace`, never a flush), so the move costs no address-less moment.
const KEEP_SCRIPT: &str = "#!/bin/sh\n\
# Renews a moved VM's DHCP lease without dropping its address (written by mvc agent).\n\
case \"$1\" in\n\
  deconfig) ip link set \"$interface\" up ;;\n\
  bound|renew) ip addr replace \"$ip/${mask:-24}\" dev \"$interface\" ;;\n\
esac\n\
exit 0\n";

/// How long the destination waits for the VM's state.
const STATE_WAIT: Duration = Duration::from_secs(3600);

/// The `xnbd` binary: next to this one, else from `PATH`.
pub fn xnbd_bin() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(|d| d.join("xnbd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("xnbd"))
}

/// Files of one light VM's migration in the run directory.
pub struct Files {
    /// The NBD socket of its disk server (origin) or proxy (destination).
    pub nbd: PathBuf,
    /// The disk server's or proxy's pid file.
    pub pid: PathBuf,
    /// Its log.
    pub log: PathBuf,
    /// The proxy's command line (JSON), for the agent to start it again.
    pub args: PathBuf,
    /// Written once the VM's state was applied here (it runs here).
    pub moved: PathBuf,
}

/// The migration files of the VM whose local name is `local`.
pub fn files(run_dir: &Path, local: &str) -> Files {
    let r = |ext: &str| run_dir.join(format!("{local}.{ext}"));
    Files {
        nbd: r("nbd"),
        pid: r("xnbd.pid"),
        log: r("xnbd.log"),
        args: r("xnbd.args"),
        moved: r("moved"),
    }
}

/// Wait until `sock` exists, failing when `child` exits or after 10 s.
fn wait_socket(sock: &Path, child: &mut Child, log: &Path) -> Result<(), DriverError> {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !sock.exists() {
        if let Ok(Some(st)) = child.try_wait() {
            return Err(DriverError::Command {
                cmd: "xnbd".into(),
                msg: format!("exited with {st}; see {}", log.display()),
            });
        }
        if Instant::now() > deadline {
            return Err(DriverError::Config(format!(
                "xnbd did not create {} within 10 s; see {}",
                sock.display(),
                log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// [`super::VmDriver::start_incoming`] of the netns driver.
pub fn start_incoming(
    d: &mut NetnsDriver,
    spec: &VmSpec,
    disk: IncomingDisk,
    incoming: &Path,
) -> Result<RunningVm, DriverError> {
    let IncomingDisk::Proxy { source, ctl, rate } = disk else {
        return Err(DriverError::Unsupported {
            driver: "netns",
            what: "--precopy-disk (a light VM's disk follows through the proxy)",
        });
    };
    let local = spec.local().to_string();
    let ns = d.ns_name(&local);
    let f = files(&d.run_dir, &local);
    let veth = d.reclaim_ns_and_veth(spec, &ns);
    let peer = format!("{veth}p");
    let mac = spec.mac.to_string();
    // A cache left by an earlier attempt would resume from its bitmap: start clean.
    let cache = d.disk_path(&local);
    let bitmap = cache.with_extension("img.bitmap");
    for p in [&cache, &bitmap, &f.moved, incoming] {
        let _ = std::fs::remove_file(p);
    }
    if let Some(dir) = cache.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| DriverError::Config(format!("{}: {e}", dir.display())))?;
    }
    run("ip", &["netns", "add", &ns])?;
    let mut children = Vec::new();
    let made = (|| -> Result<(), DriverError> {
        run(
            "ip",
            &["link", "add", &veth, "type", "veth", "peer", "name", &peer],
        )?;
        run("ip", &["link", "set", &peer, "netns", &ns])?;
        run("ip", &["-n", &ns, "link", "set", &peer, "name", "eth0"])?;
        // Down until the switch: the MAC must not be heard here before.
        run("ip", &["-n", &ns, "link", "set", "eth0", "address", &mac])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run("ip", &["link", "set", &veth, "master", &spec.bridge, "up"])?;
        let xnbd = xnbd_bin().display().to_string();
        let argv: Vec<String> = vec![
            xnbd,
            "proxy".into(),
            "--source".into(),
            format!("unix:{}", source.display()),
            "--source-export".into(),
            spec.name.clone(),
            "--cache".into(),
            cache.display().to_string(),
            "--no-background".into(),
            "--name".into(),
            spec.name.clone(),
            "--unix".into(),
            f.nbd.display().to_string(),
            "--ctl".into(),
            ctl.display().to_string(),
            "--rate".into(),
            rate.to_string(),
        ];
        let _ = std::fs::write(&f.args, serde_json::to_string(&argv).unwrap_or_default());
        let a: Vec<&str> = argv[1..].iter().map(String::as_str).collect();
        let mut proxy = spawn(&argv[0], &a, &[], &f.log)?;
        let _ = std::fs::write(&f.pid, proxy.id().to_string());
        let waited = wait_socket(ctl, &mut proxy, &f.log);
        children.push(proxy);
        waited?;
        let l = UnixListener::bind(incoming)
            .map_err(|e| DriverError::Config(format!("{}: {e}", incoming.display())))?;
        let (ns2, moved, sock) = (ns.clone(), f.moved.clone(), incoming.to_path_buf());
        std::thread::Builder::new()
            .name("netns-incoming".into())
            .spawn(move || receive_state(l, &sock, &ns2, &moved))
            .map_err(|e| DriverError::Config(e.to_string()))?;
        Ok(())
    })();
    match made {
        Ok(()) => Ok(RunningVm {
            handle: format!("netns:{ns}"),
            children,
        }),
        Err(e) => {
            for c in &mut children {
                stop_child(c);
            }
            let _ = run("ip", &["link", "del", &veth]);
            super::VmDriver::cleanup(d, &format!("netns:{ns}"));
            Err(e)
        }
    }
}

/// Wait for the one connection that brings the VM's state (until the socket is
/// removed, the migration then being over, or [`STATE_WAIT`]), apply it and answer.
fn receive_state(l: UnixListener, sock: &Path, ns: &str, moved: &Path) {
    if l.set_nonblocking(true).is_err() {
        return;
    }
    let deadline = Instant::now() + STATE_WAIT;
    let conn = loop {
        match l.accept() {
            Ok((c, _)) => break c,
            Err(_) if Instant::now() < deadline && sock.exists() => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(_) => return,
        }
    };
    let _ = std::fs::remove_file(sock);
    let _ = conn.set_nonblocking(false);
    let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
    let mut w = match conn.try_clone() {
        Ok(w) => w,
        Err(_) => return,
    };
    let mut line = String::new();
    // One line of at most 4 KiB.
    let got = BufReader::new(conn)
        .take(4096)
        .read_line(&mut line)
        .map_err(|e| e.to_string())
        .and_then(|_| NetnsState::parse(line.trim()));
    let applied = got.and_then(|st| apply(ns, &st).map(|()| st));
    match applied {
        Ok(st) => {
            let _ = std::fs::write(moved, line.trim());
            let _ = w.write_all(b"ok\n");
            drop(w);
            // Again, after the answer: every bridge on the way learns the MAC anew.
            announce(ns, &st);
        }
        Err(e) => {
            tracing::warn!(ns, error = %e, "moved VM's state not applied");
            let _ = w.write_all(format!("{e}\n").as_bytes());
        }
    }
}

/// Give the namespace the VM's addresses and bring its NIC up.
fn apply(ns: &str, st: &NetnsState) -> Result<(), String> {
    for a in &st.addrs {
        run("ip", &["-n", ns, "addr", "replace", a, "dev", "eth0"]).map_err(|e| e.to_string())?;
    }
    run("ip", &["-n", ns, "link", "set", "eth0", "up"]).map_err(|e| e.to_string())?;
    announce(ns, st);
    Ok(())
}

/// Gratuitous ARP for each address from `eth0` of `ns` (busybox `arping -U`).
fn announce(ns: &str, st: &NetnsState) {
    for a in &st.addrs {
        let ip = a.split('/').next().unwrap_or(a);
        if let Err(e) = run(
            "ip",
            &[
                "netns", "exec", ns, "busybox", "arping", "-U", "-c", "1", "-w", "1", "-I", "eth0",
                ip,
            ],
        ) {
            tracing::warn!(ns, error = %e, "gratuitous ARP");
        }
    }
}

/// [`super::VmDriver::finish_incoming`] of the netns driver: the VM's DHCP client, with
/// a script that never drops the address it moved with.
pub fn finish_incoming(
    d: &mut NetnsDriver,
    vm: &mut RunningVm,
    name: &str,
) -> Result<(), DriverError> {
    let ns = NetnsDriver::ns_of(&vm.handle)?.to_string();
    let script = d.run_dir.join("udhcpc-keep.script");
    let tmp = d.run_dir.join(format!("udhcpc-keep.script.{ns}"));
    std::fs::write(&tmp, KEEP_SCRIPT)
        .and_then(|_| {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
        })
        .and_then(|_| std::fs::rename(&tmp, &script))
        .map_err(|e| DriverError::Config(format!("udhcpc script: {e}")))?;
    let addr = run(
        "ip",
        &["-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"],
    )?;
    let ip = super::netns::parse_inet(&addr)
        .map(|a| a.to_string())
        .unwrap_or_default();
    let script = script.display().to_string();
    let host = format!("hostname:{name}");
    let log = d
        .run_dir
        .join(format!("{}.log", ns.trim_start_matches(&d.prefix)));
    let mut args = vec![
        "netns", "exec", &ns, "udhcpc", "-f", "-i", "eth0", "-s", &script, "-t", "60", "-T", "1",
        "-A", "1", "-x", &host,
    ];
    if !ip.is_empty() {
        args.extend(["-r", ip.as_str()]);
    }
    vm.children.push(spawn("ip", &args, &[], &log)?);
    Ok(())
}
