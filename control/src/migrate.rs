//! Live migration of a running VM to another site: `mvc vm migrate`.
//!
//! The controller drives both agents step by step ([`MigrateStep`], inside
//! [`crate::proto::Request::Migrate`]); the agents move the data between themselves:
//!
//! ```text
//!  origin agent                                   destination agent
//!  1 offer(token): the VM's `xnbd serve` socket
//!    may be tunnelled to whoever shows the token
//!                                                 2 prepare(token, origin addr+key): a slot,
//!                                                   `xnbd proxy --no-background` whose source
//!    <===== tunnel "nbd" (agent channel) ========   is a local socket relayed to the origin,
//!                                                   qemu -incoming on a local socket
//!  3 send(token, dest addr+key): qemu `migrate`
//!    to a local socket, relayed ===== tunnel "ram" =====> into the waiting qemu
//!  4 status (query-migrate) until `completed`: the origin qemu is paused, the
//!    destination qemu runs on the proxy
//!                                                 5 finish: announce-self (the guest's MAC
//!                                                   is heard at the new site at once),
//!                                                   background copy starts
//!  (the store moves the VM)                       6 status until the proxy switched to
//!                                                   local; done: the relay ends
//!  7 release: qemu, xnbd, TAP, disk, slot gone
//! ```
//!
//! A tunnel is a new TCP connection to the other agent's listening port (the one port a
//! NATed site forwards), the same channel handshake as a controller's (the agent key
//! pinned: the controller hands each agent the other's key from its store), then one
//! frame `{"tunnel": TOKEN, "kind": "ram"|"nbd"|"libvirt"}` and from then on raw bytes in sealed
//! frames both ways (an empty frame: that direction ended). The token is 32 random
//! bytes the controller sent both agents over their own channels; the agent that
//! accepts a tunnel connects it to a local socket only for the token and kind it was
//! told. So both streams are encrypted and authenticated end to end between the two
//! agents, and qemu and xnbd see only Unix sockets under the agents' state directories.
//!
//! Consistency: the destination proxy starts with `--no-background` and nothing reads
//! the disk before switchover (a qemu waiting in `-incoming` keeps its block devices
//! inactive), so no block is fetched while the origin VM still writes; the background
//! copy starts at step 5, after the origin qemu stopped and flushed.
//!
//! `--precopy-disk` instead mirrors the disk before the memory: the destination serves
//! an empty disk with `xnbd serve` and waits paused (`-S`); the origin qemu mirrors
//! into it through a third tunnel (`mirror`), the memory follows once the copy is in
//! step, `mirror_end` completes the mirror after the memory, and `finish` resumes.
//!
//! Failure: anything failing before step 5 has succeeded cancels the migration at the
//! origin (`migrate_cancel`, `cont` if it was paused: the VM goes on where it was) and
//! removes everything the destination made (qemu, proxy, relay, TAP, cache, slot).
//! After it, a proxy that died is started again by the destination agent from its saved
//! command line and resumes from its bitmap (qemu's NBD client waits for it).
//!
//! Light VMs (netns driver) move through the same steps: their disk file is served for
//! the move, and instead of qemu's memory the origin sends the VM's state
//! ([`NetnsState`], its addresses) through the `ram` tunnel once it took its NIC down;
//! the destination's namespace, made at `prepare` with the VM's MAC and its NIC down,
//! takes the addresses and comes up (see `driver/netns_migrate.rs`).
//!
//! libvirt domains move by libvirt's own migration instead of qemu's (`virsh migrate
//! --live --p2p --tunnelled` into the destination's libvirtd through a `libvirt`
//! tunnel, the destination's domain XML signed by its agent: [`LibvirtIncoming`]); the
//! disk follows through the proxy in the same way.
//!
//! The overlay is not extended for a move: a destination site where the cluster has no
//! VMs (no edge, no bridge) is refused before any agent is asked.
use crate::channel::{Channel, Half};
use serde::{Deserialize, Serialize};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// One step of a migration, as the controller asks an agent.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "step", rename_all = "snake_case")]
pub enum MigrateStep {
    /// Origin: let the destination tunnel to this VM's disk server with `token`.
    Offer {
        /// 64 hex digits.
        token: String,
    },
    /// Destination: reserve a slot on `host` and start the VM waiting for its memory,
    /// its disk behind a proxy whose source is the origin's disk server.
    Prepare {
        /// 64 hex digits.
        token: String,
        /// Host within the site.
        host: String,
        /// Memory in MiB (qemu's `-m` must match the origin's).
        memory_mb: u64,
        /// The VM's MAC.
        mac: crate::model::Mac,
        /// The origin agent's address.
        origin: String,
        /// The origin agent's key (hex), pinned for the tunnel.
        origin_key: String,
        /// `--precopy-disk`: the disk's size; an empty disk of it is served for the
        /// origin to mirror into, and the VM waits paused for the mirror to complete.
        #[serde(default)]
        precopy_disk_size: Option<u64>,
        /// The proxy's fetch rate, bytes/s (0: unlimited).
        #[serde(default)]
        disk_rate: u64,
        /// The origin's VM driver (`qemu`, `netns`, `libvirt`); the destination must run
        /// the same. Absent: `qemu`.
        #[serde(default)]
        origin_driver: Option<String>,
        /// libvirt driver: the origin's domain (its name and UUID go into the
        /// destination's migration XML, its type must match the destination's).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        origin_domain: Option<LibvirtDomain>,
    },
    /// Origin (`--precopy-disk`): mirror the disk into the destination's disk server,
    /// through a tunnel, before the memory.
    Mirror {
        /// 64 hex digits.
        token: String,
        /// The destination agent's address.
        dest: String,
        /// The destination agent's key (hex), pinned for the tunnel.
        dest_key: String,
    },
    /// Origin (`--precopy-disk`), after the memory: end the mirror, the destination's
    /// disk then holds the stopped VM's last write.
    MirrorEnd,
    /// Origin: start sending the memory to the destination.
    Send {
        /// 64 hex digits.
        token: String,
        /// The destination agent's address.
        dest: String,
        /// The destination agent's key (hex), pinned for the tunnel.
        dest_key: String,
        /// Longest pause of the VM at switchover qemu may plan for, ms.
        downtime_ms: u64,
        /// Memory bandwidth cap, bytes/s (0: qemu's default, 128 MiB/s).
        rate: u64,
        /// libvirt driver: the domain the destination prepared, signed by it.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        libvirt: Option<LibvirtIncoming>,
    },
    /// Either side: progress (origin: qemu's `query-migrate`; destination: qemu's
    /// run state and the proxy's status).
    Status,
    /// Destination: the VM runs here now; announce it and start the background copy.
    Finish,
    /// Destination: the proxy switched to local; end the relay.
    Done,
    /// Origin: the VM runs at the destination; stop and delete it here.
    Release,
    /// Either side, before switchover: undo (origin: the VM goes on; destination:
    /// everything made for it is removed).
    Abort,
}

impl MigrateStep {
    /// Check what came over the wire.
    pub fn validate(&self) -> Result<(), String> {
        let token = |t: &str| {
            if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(())
            } else {
                Err("a migration token is 64 hex digits".to_string())
            }
        };
        let key = |k: &str| {
            if k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit()) {
                Ok(())
            } else {
                Err("an agent key is 64 hex digits".to_string())
            }
        };
        let addr = |a: &str| {
            if a.is_empty() || a.len() > 255 || a.contains(|c: char| c.is_whitespace()) {
                Err(format!(
                    "not an agent address: {}",
                    crate::validate::quote(a)
                ))
            } else {
                Ok(())
            }
        };
        match self {
            MigrateStep::Offer { token: t } => token(t),
            MigrateStep::Prepare {
                token: t,
                host,
                memory_mb,
                origin,
                origin_key,
                origin_domain,
                ..
            } => {
                token(t)?;
                crate::proto::check_host(host)?;
                if *memory_mb == 0 || *memory_mb > 1 << 20 {
                    return Err(format!("{memory_mb} MiB"));
                }
                addr(origin)?;
                key(origin_key)?;
                match origin_domain {
                    Some(d) => d.validate(),
                    None => Ok(()),
                }
            }
            MigrateStep::Mirror {
                token: t,
                dest,
                dest_key,
            } => {
                token(t)?;
                addr(dest)?;
                key(dest_key)
            }
            MigrateStep::Send {
                token: t,
                dest,
                dest_key,
                downtime_ms,
                libvirt,
                ..
            } => {
                token(t)?;
                addr(dest)?;
                key(dest_key)?;
                if *downtime_ms == 0 || *downtime_ms > 60_000 {
                    return Err(format!("downtime limit {downtime_ms} ms (1 to 60000)"));
                }
                match libvirt {
                    Some(l) => l.validate(),
                    None => Ok(()),
                }
            }
            _ => Ok(()),
        }
    }
}

/// A libvirt domain name as the driver makes them (and checks on the wire): 1 to 200
/// of `A-Z a-z 0-9 - _ .`.
pub fn check_domain_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 200
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(format!(
            "not a domain name: {}",
            crate::validate::quote(name)
        ));
    }
    Ok(())
}

/// The origin's domain, for the destination's migration XML (libvirt refuses one whose
/// name or UUID is not the origin's).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LibvirtDomain {
    /// Domain name at the origin.
    pub name: String,
    /// Its UUID (`virsh domuuid`).
    pub uuid: String,
    /// Its type, `kvm`, `qemu` (TCG) or `xen`: both ends must use the same.
    pub domain_type: String,
}

impl LibvirtDomain {
    /// Check what came over the wire.
    pub fn validate(&self) -> Result<(), String> {
        check_domain_name(&self.name)?;
        let u = self.uuid.as_bytes();
        let uuid_ok = u.len() == 36
            && u.iter().enumerate().all(|(i, b)| {
                if matches!(i, 8 | 13 | 18 | 23) {
                    *b == b'-'
                } else {
                    b.is_ascii_hexdigit()
                }
            });
        if !uuid_ok {
            return Err(format!(
                "not a domain UUID: {}",
                crate::validate::quote(&self.uuid)
            ));
        }
        if !matches!(self.domain_type.as_str(), "kvm" | "qemu" | "xen") {
            return Err(format!(
                "not a domain type: {}",
                crate::validate::quote(&self.domain_type)
            ));
        }
        Ok(())
    }
}

/// Longest migration XML the destination may hand the origin.
pub const MAX_DOMAIN_XML: usize = 64 << 10;

/// The domain a libvirt destination prepared for an incoming VM: its XML (the
/// destination's bridge, TAP, sockets and boot copies under the origin's name and
/// UUID), the name it takes there (`--dname`), and the destination agent's signature
/// over both and the token ([`LibvirtIncoming::signed`]), which the origin checks with
/// the key it pins for the tunnel before it hands the XML to its libvirtd: the
/// controller passes the XML on but cannot make one of its own.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LibvirtIncoming {
    /// Migration XML.
    pub xml: String,
    /// Domain name at the destination.
    pub dname: String,
    /// Ed25519 signature (128 hex digits) of [`LibvirtIncoming::signed`].
    pub sig: String,
}

impl LibvirtIncoming {
    /// The bytes the destination signs: a context string, the token, the name, the XML.
    pub fn signed(token: &str, dname: &str, xml: &str) -> Vec<u8> {
        let mut m = b"mvc-libvirt-migration-v1\0".to_vec();
        for part in [token, dname, xml] {
            m.extend_from_slice(part.as_bytes());
            m.push(0);
        }
        m
    }

    /// Check what came over the wire (the signature is checked where the key is known).
    pub fn validate(&self) -> Result<(), String> {
        check_domain_name(&self.dname)?;
        if self.xml.len() > MAX_DOMAIN_XML || !self.xml.starts_with("<domain ") {
            return Err("not a domain XML (or longer than 64 KiB)".into());
        }
        if self.sig.len() != 128 || !self.sig.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("a domain signature is 128 hex digits".into());
        }
        Ok(())
    }

    /// Whether `key_hex` (the destination agent's key) signed it for `token`.
    pub fn verify(&self, token: &str, key_hex: &str) -> bool {
        let (Ok(key), Some(sig)) = (
            crate::auth::parse_public(key_hex),
            crate::model::unhex(&self.sig),
        ) else {
            return false;
        };
        crate::auth::verify(&key, &Self::signed(token, &self.dname, &self.xml), &sig)
    }
}

/// The disk of a VM started for an incoming live migration
/// ([`crate::driver::VmDriver::start_incoming`]).
#[derive(Clone, Copy, Debug)]
pub enum IncomingDisk<'a> {
    /// Post-copy: an `xnbd proxy` (control socket `ctl`) whose source is the NBD socket
    /// `source`; the VM runs as soon as its memory arrived.
    Proxy {
        /// The origin's disk, as a local NBD socket.
        source: &'a Path,
        /// The proxy's control socket.
        ctl: &'a Path,
        /// Its fetch rate, bytes/s (0: unlimited).
        rate: u64,
    },
    /// Pre-copy (`--precopy-disk`): an empty disk of `size` bytes served by `xnbd
    /// serve`, which the origin qemu mirrors into; the VM stays paused after its
    /// memory arrived (`-S`) until the mirror completed.
    Mirror {
        /// Disk size in bytes.
        size: u64,
    },
}

/// What a tunnel carries.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TunnelKind {
    /// qemu's migration stream, origin -> destination.
    Ram,
    /// NBD, destination proxy -> origin disk server.
    Nbd,
    /// libvirt's RPC (memory inside it, `--tunnelled`), origin libvirtd -> destination
    /// libvirtd's socket.
    Libvirt,
}

/// The first frame of a tunnel connection.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TunnelHello {
    /// The token both agents were given.
    pub tunnel: String,
    /// What it carries.
    pub kind: TunnelKind,
}

impl TunnelHello {
    /// A tunnel hello, or `None` for anything else (a signed request).
    pub fn parse(msg: &[u8]) -> Option<TunnelHello> {
        serde_json::from_slice(msg).ok()
    }
}

/// The state of a light (netns) VM, which the origin sends the destination through the
/// `ram` tunnel instead of qemu's memory: one JSON line, answered `ok` once applied.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetnsState {
    /// The IPv4 addresses of its `eth0`, `a.b.c.d/prefix` (1 to 8).
    pub addrs: Vec<String>,
}

impl NetnsState {
    /// Parse and check what came through the tunnel.
    pub fn parse(t: &str) -> Result<NetnsState, String> {
        let st: NetnsState = serde_json::from_str(t).map_err(|e| format!("not a VM state: {e}"))?;
        if st.addrs.is_empty() || st.addrs.len() > 8 {
            return Err(format!("{} addresses (1 to 8)", st.addrs.len()));
        }
        for a in &st.addrs {
            let ok = a.split_once('/').is_some_and(|(ip, p)| {
                ip.parse::<std::net::Ipv4Addr>().is_ok()
                    && p.parse::<u8>().is_ok_and(|p| (1..=32).contains(&p))
            });
            if !ok {
                return Err(format!(
                    "not an address/prefix: {}",
                    crate::validate::quote(a)
                ));
            }
        }
        Ok(st)
    }
}

/// The block job (and target node) of a `--precopy-disk` mirror in the origin qemu.
pub const MIRROR_JOB: &str = "mvc-mirror";

/// Largest chunk of stream data per sealed frame.
const CHUNK: usize = 256 << 10;

/// Open a tunnel to the agent at `addr` whose key is `key_hex`, for `token`/`kind`.
pub fn open_tunnel(
    addr: &str,
    key_hex: &str,
    token: &str,
    kind: TunnelKind,
) -> Result<Channel<TcpStream>, String> {
    use std::net::ToSocketAddrs;
    let pinned = crate::auth::parse_public(key_hex).map_err(|e| e.to_string())?;
    let sa = addr
        .to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))?;
    let s = TcpStream::connect_timeout(&sa, Duration::from_secs(5))
        .map_err(|e| format!("tunnel to {addr}: {e}"))?;
    let _ = s.set_nodelay(true);
    s.set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut ch =
        crate::channel::client(s, &pinned).map_err(|e| format!("tunnel to {addr}: {e}"))?;
    let hello = serde_json::to_vec(&TunnelHello {
        tunnel: token.into(),
        kind,
    })
    .map_err(|e| e.to_string())?;
    ch.send(&hello).map_err(|e| e.to_string())?;
    let ok = ch.recv().map_err(|e| format!("tunnel to {addr}: {e}"))?;
    if ok != b"ok" {
        return Err(format!(
            "tunnel to {addr} refused: {}",
            String::from_utf8_lossy(&ok)
        ));
    }
    Ok(ch)
}

/// Relay between a local stream and a tunnel until both directions ended (or either
/// side failed). Returns the bytes carried (local -> tunnel, tunnel -> local).
pub fn relay(ch: Channel<TcpStream>, local: UnixStream) -> (u64, u64) {
    let tcp = match ch_stream_clone(&ch) {
        Some(t) => t,
        None => return (0, 0),
    };
    let _ = tcp.set_read_timeout(None);
    let Ok(local2) = local.try_clone() else {
        return (0, 0);
    };
    let (tx, rx) = ch.split(tcp);
    let up = std::thread::spawn(move || pump_out(local, tx));
    let down = pump_in(rx, local2);
    let up = up.join().unwrap_or(0);
    (up, down)
}

fn ch_stream_clone(ch: &Channel<TcpStream>) -> Option<TcpStream> {
    ch.stream_ref().try_clone().ok()
}

/// Local -> tunnel; an empty frame at the end.
fn pump_out(mut local: UnixStream, mut tx: Half<TcpStream>) -> u64 {
    let mut buf = vec![0u8; CHUNK];
    let mut n_total = 0u64;
    loop {
        match local.read(&mut buf) {
            Ok(0) => {
                let _ = tx.send(&[]);
                break;
            }
            Ok(n) => {
                if tx.send(&buf[..n]).is_err() {
                    let _ = local.shutdown(std::net::Shutdown::Both);
                    break;
                }
                n_total += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => {
                let _ = tx.send(&[]);
                break;
            }
        }
    }
    n_total
}

/// Tunnel -> local; ends at an empty frame or a channel error.
fn pump_in(mut rx: Half<TcpStream>, mut local: UnixStream) -> u64 {
    let mut n_total = 0u64;
    loop {
        match rx.recv() {
            Ok(m) if m.is_empty() => {
                let _ = local.shutdown(std::net::Shutdown::Write);
                break;
            }
            Ok(m) => {
                if local.write_all(&m).is_err() {
                    break;
                }
                n_total += m.len() as u64;
            }
            Err(_) => {
                let _ = local.shutdown(std::net::Shutdown::Both);
                break;
            }
        }
    }
    n_total
}

/// Run one QMP command on the monitor socket `sock`; its `return` value.
pub fn qmp(
    sock: &Path,
    execute: &str,
    arguments: serde_json::Value,
) -> Result<serde_json::Value, String> {
    let err = |e: std::io::Error| format!("qmp {}: {e}", sock.display());
    let s = UnixStream::connect(sock).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let mut w = s.try_clone().map_err(err)?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut next = |r: &mut BufReader<UnixStream>| -> Result<serde_json::Value, String> {
        loop {
            line.clear();
            if r.read_line(&mut line).map_err(err)? == 0 {
                return Err(format!("qmp {}: closed", sock.display()));
            }
            let v: serde_json::Value =
                serde_json::from_str(&line).map_err(|e| format!("qmp reply: {e}"))?;
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
    };
    next(&mut r)?; // greeting
    w.write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
        .map_err(err)?;
    next(&mut r)?;
    let mut cmd = serde_json::json!({ "execute": execute });
    if !arguments.is_null() {
        cmd["arguments"] = arguments;
    }
    let mut t = cmd.to_string();
    t.push('\n');
    w.write_all(t.as_bytes()).map_err(err)?;
    let v = next(&mut r)?;
    match (v.get("return"), v.get("error")) {
        (Some(r), _) => Ok(r.clone()),
        (_, Some(e)) => Err(format!(
            "qemu refused {execute}: {}",
            e["desc"].as_str().unwrap_or("?")
        )),
        _ => Err(format!("qmp: unexpected reply {v}")),
    }
}

/// Ask an xnbd control socket; the status object (`ok` or not).
pub fn xnbd_ctl(sock: &Path, cmd: serde_json::Value) -> Result<serde_json::Value, String> {
    let err = |e: std::io::Error| format!("xnbd ctl {}: {e}", sock.display());
    let mut s = UnixStream::connect(sock).map_err(err)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(err)?;
    let mut t = cmd.to_string();
    t.push('\n');
    s.write_all(t.as_bytes()).map_err(err)?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).map_err(err)?;
    let v: serde_json::Value = serde_json::from_str(&line).map_err(|e| format!("xnbd ctl: {e}"))?;
    if v["ok"] != true {
        return Err(format!(
            "xnbd ctl: {}",
            v["error"].as_str().unwrap_or("refused")
        ));
    }
    Ok(v["status"].clone())
}

/// What `mvc vm migrate` needs.
#[derive(Clone, Debug)]
pub struct MigrateArgs {
    /// Cluster name.
    pub cluster: String,
    /// VM name.
    pub vm: String,
    /// Destination site.
    pub to: String,
    /// Host at the destination (default: the cluster's host there).
    pub host: Option<String>,
    /// Downtime limit, ms.
    pub downtime_ms: u64,
    /// Memory bandwidth, bytes/s (0: qemu's default, 128 MiB/s).
    pub rate: u64,
    /// Where progress is recorded for `mvc vm migrations`.
    pub record: Option<PathBuf>,
    /// Copy the disk before the memory (qemu's mirror) instead of after it (xnbd proxy).
    pub precopy_disk: bool,
    /// The proxy's fetch rate, bytes/s (0: unlimited).
    pub disk_rate: u64,
    /// Longest the whole migration may take.
    pub timeout: Duration,
}

/// Progress and outcome of one migration (`mvc vm migrations`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct MigrationView {
    /// Cluster name.
    pub cluster: String,
    /// VM name.
    pub vm: String,
    /// Origin site.
    pub from: String,
    /// Destination site.
    pub to: String,
    /// `prepare`, `memory`, `switchover`, `disk`, `cleanup`, `done`, `failed`.
    pub phase: String,
    /// Memory bytes sent so far.
    pub ram_bytes: u64,
    /// Memory size.
    pub ram_total: u64,
    /// Disk bytes fetched by the proxy so far.
    pub disk_bytes: u64,
    /// Disk size.
    pub disk_total: u64,
    /// Seconds since the start.
    pub elapsed_secs: f64,
    /// Disk bytes the proxy fetched before switchover (0: nothing could go stale).
    pub disk_bytes_before_switchover: u64,
    /// Seconds left in the current phase, as qemu or the proxy estimate them.
    pub eta_secs: Option<f64>,
    /// Downtime qemu measured at switchover, ms.
    pub downtime_ms: Option<u64>,
    /// Why it failed.
    pub error: Option<String>,
    /// `post-copy` (xnbd proxy, the default) or `pre-copy` (`--precopy-disk`).
    #[serde(default)]
    pub disk_strategy: String,
    /// Process that runs it.
    pub pid: u32,
    /// Unix time of the last update.
    pub updated: u64,
}

impl MigrationView {
    fn save(&mut self, t0: Instant, path: Option<&Path>) {
        self.elapsed_secs = t0.elapsed().as_secs_f64();
        self.updated = crate::agent::unix_now();
        if let Some(p) = path {
            if let Ok(t) = serde_json::to_string(self) {
                let tmp = p.with_extension("tmp");
                if std::fs::write(&tmp, t).is_ok() {
                    let _ = std::fs::rename(&tmp, p);
                }
            }
        }
    }
}

/// The migrations recorded in `dir` (files `migrate-<vm>.json`).
pub fn recorded(dir: &Path) -> Vec<MigrationView> {
    let mut out: Vec<MigrationView> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    let n = e.file_name().to_string_lossy().to_string();
                    n.starts_with("migrate-") && n.ends_with(".json")
                })
                .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                .filter_map(|t| serde_json::from_str(&t).ok())
                .collect()
        })
        .unwrap_or_default();
    out.sort_by(|a, b| a.vm.cmp(&b.vm));
    out
}

/// The record of an unfinished move of `vm` to `to` whose switchover happened (the VM
/// runs there) and whose `vm migrate` no longer runs; an error when it still runs.
fn unfinished(
    record: Option<&Path>,
    cluster: &str,
    vm: &str,
    to: &str,
) -> crate::controller::Result<Option<MigrationView>> {
    let Some(m) = record
        .and_then(|p| std::fs::read_to_string(p).ok())
        .and_then(|t| serde_json::from_str::<MigrationView>(&t).ok())
    else {
        return Ok(None);
    };
    if m.cluster != cluster || m.vm != vm || m.to != to || m.from == to {
        return Ok(None);
    }
    // After switchover: copying the disk, releasing the origin, or given up on those. A
    // record still at "switchover" counts too: the caller resumes only when the store
    // already places the VM at `to`, which it does once the destination runs it.
    let after = matches!(m.phase.as_str(), "switchover" | "disk" | "cleanup")
        || (m.phase == "failed" && m.error.as_deref().is_some_and(|e| e.contains("disk")));
    if !after {
        return Ok(None);
    }
    let running = m.pid != std::process::id()
        && std::fs::read(format!("/proc/{}/cmdline", m.pid))
            .is_ok_and(|c| String::from_utf8_lossy(&c).contains("migrate"));
    if running {
        return Err(crate::controller::ControlError::Usage(format!(
            "a migration of {} still runs (pid {})",
            crate::validate::quote(vm),
            m.pid
        )));
    }
    Ok(Some(m))
}

/// A progress line that changes only every tenth, `[####------] 40% memory sent (of
/// 128 MiB)` (progress lines are printed once each, so this draws a bar step by step).
fn tenths(what: &str, done: u64, total: u64) -> String {
    let t = (done.saturating_mul(10) / total.max(1)).min(10) as usize;
    format!(
        "[{}{}] {:>3}% {what} (of {} MiB)",
        "#".repeat(t),
        "-".repeat(10 - t),
        t * 10,
        total >> 20
    )
}

fn random_token() -> Result<String, crate::controller::ControlError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; 32];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| crate::controller::ControlError::Local("no randomness".into()))?;
    Ok(crate::model::hex(&b))
}

impl crate::controller::Controller<'_> {
    /// Move a running VM to another site (qemu driver at both ends).
    pub fn vm_migrate(&mut self, args: &MigrateArgs) -> crate::controller::Result<MigrationView> {
        use crate::client::AgentClient;
        use crate::controller::ControlError;
        use crate::proto::Request;
        use crate::validate::quote;
        let cluster = self.store.cluster(&args.cluster)?;
        let vm = cluster
            .vms
            .iter()
            .find(|v| v.name == args.vm)
            .cloned()
            .ok_or_else(|| {
                ControlError::Usage(format!(
                    "no VM {} in cluster {}",
                    quote(&args.vm),
                    quote(&args.cluster)
                ))
            })?;
        // A move whose `vm migrate` ended after switchover is finished (disk, origin).
        let resume = unfinished(args.record.as_deref(), &cluster.name, &vm.name, &args.to)?
            .filter(|_| vm.site == args.to);
        if vm.site == args.to && resume.is_none() {
            return Err(ControlError::Usage(format!(
                "{} already runs at site {}",
                quote(&vm.name),
                quote(&args.to)
            )));
        }
        // The overlay is not extended for a move: the destination must carry the
        // cluster's edge and bridge already (a site it has VMs at), whatever `--host`.
        if !cluster.attachments.iter().any(|a| a.site == args.to) {
            return Err(ControlError::Usage(format!(
                "cluster {} has no overlay at site {} (no edge, no bridge there): a VM moves \
                 only between the sites its cluster has VMs at; create the cluster with \
                 computes at {} to move VMs there",
                quote(&cluster.name),
                quote(&args.to),
                quote(&args.to)
            )));
        }
        let precopy = resume
            .as_ref()
            .map_or(args.precopy_disk, |r| r.disk_strategy == "pre-copy");
        let host = match &args.host {
            Some(h) => h.clone(),
            None => cluster
                .attachments
                .iter()
                .find(|a| a.site == args.to)
                .map(|a| a.host.clone())
                .ok_or_else(|| {
                    ControlError::Usage(format!(
                        "cluster {} has nothing at site {} (migration moves VMs between the sites of their cluster)",
                        quote(&cluster.name),
                        quote(&args.to)
                    ))
                })?,
        };
        let from = self
            .store
            .site(resume.as_ref().map_or(&vm.site, |r| &r.from))?;
        let to = self.store.site(&args.to)?;
        let t0 = Instant::now();
        let deadline = t0 + args.timeout;
        let mut view = MigrationView {
            cluster: cluster.name.clone(),
            vm: vm.name.clone(),
            from: from.name.clone(),
            to: to.name.clone(),
            phase: "prepare".into(),
            disk_strategy: if args.precopy_disk {
                "pre-copy"
            } else {
                "post-copy"
            }
            .into(),
            pid: std::process::id(),
            ..Default::default()
        };
        let record = args.record.as_deref();
        view.save(t0, record);
        let token = random_token()?;
        let step = |c: &mut AgentClient, step: MigrateStep| {
            c.call_value(&Request::Migrate {
                cluster: cluster.name.clone(),
                vm: vm.name.clone(),
                step,
            })
        };
        // From here on every early return leaves the record saying why (`vm migrations`
        // must not show a stale `prepare`).
        let connected = AgentClient::connect(&from, self.key)
            .and_then(|o| Ok((o, AgentClient::connect(&to, self.key)?)));
        let (mut origin, mut dest) = match connected {
            Ok(clients) => clients,
            Err(e) => {
                view.phase = "failed".into();
                view.error = Some(e.to_string());
                view.save(t0, record);
                return Err(e.into());
            }
        };
        let progress = self.progress;
        let fail = |view: &mut MigrationView,
                    origin: &mut AgentClient,
                    dest: &mut AgentClient,
                    e: String| {
            let _ = step(dest, MigrateStep::Abort);
            let _ = step(origin, MigrateStep::Abort);
            view.phase = "failed".into();
            view.error = Some(e.clone());
            view.save(t0, record);
            ControlError::Local(format!(
                "migration of {} to site {} failed: {e}; it runs at site {} as before",
                quote(&vm.name),
                quote(&to.name),
                quote(&from.name)
            ))
        };
        if let Some(r) = &resume {
            progress(&format!(
                "finishing the move of {} from site {} to site {}",
                vm.name, from.name, to.name
            ));
            view.ram_bytes = r.ram_bytes;
            view.ram_total = r.ram_total;
            view.downtime_ms = r.downtime_ms;
            view.disk_bytes_before_switchover = r.disk_bytes_before_switchover;
            view.disk_strategy = r.disk_strategy.clone();
        } else {
            // 1-3: offer the disk, prepare the destination, send the memory.
            progress(&format!(
                "migrating {} from site {} to site {}",
                vm.name, from.name, to.name
            ));
            let offered = match step(
                &mut origin,
                MigrateStep::Offer {
                    token: token.clone(),
                },
            ) {
                Ok(offered) => offered,
                Err(e) => return Err(fail(&mut view, &mut origin, &mut dest, e.to_string())),
            };
            let precopy_disk_size = match (args.precopy_disk, offered["disk_size"].as_u64()) {
                (false, _) => None,
                (true, Some(n)) => Some(n),
                (true, None) => {
                    return Err(fail(
                        &mut view,
                        &mut origin,
                        &mut dest,
                        format!("site {} did not say its disk size", quote(&from.name)),
                    ))
                }
            };
            let origin_domain: Option<LibvirtDomain> =
                serde_json::from_value(offered["domain"].clone()).unwrap_or(None);
            let prepared = match step(
                &mut dest,
                MigrateStep::Prepare {
                    token: token.clone(),
                    host: host.clone(),
                    memory_mb: vm.memory_mb,
                    mac: vm.mac,
                    origin: from.agent_addr.clone(),
                    origin_key: from.agent_key.clone(),
                    precopy_disk_size,
                    disk_rate: args.disk_rate,
                    origin_driver: offered["driver"].as_str().map(str::to_string),
                    origin_domain,
                },
            ) {
                Ok(p) => p,
                Err(e) => return Err(fail(&mut view, &mut origin, &mut dest, e.to_string())),
            };
            // A libvirt destination answers with its domain, which the origin's libvirtd
            // moves the VM into.
            let libvirt: Option<LibvirtIncoming> =
                serde_json::from_value(prepared["libvirt"].clone()).unwrap_or(None);
            if args.precopy_disk {
                // The disk first: qemu mirrors it until source and copy are in step (and
                // keeps them so while the memory moves).
                view.phase = "disk".into();
                if let Err(e) = step(
                    &mut origin,
                    MigrateStep::Mirror {
                        token: token.clone(),
                        dest: to.agent_addr.clone(),
                        dest_key: to.agent_key.clone(),
                    },
                ) {
                    return Err(fail(&mut view, &mut origin, &mut dest, e.to_string()));
                }
                loop {
                    let st = match step(&mut origin, MigrateStep::Status) {
                        Ok(v) => v,
                        Err(e) => {
                            return Err(fail(&mut view, &mut origin, &mut dest, e.to_string()))
                        }
                    };
                    let job = st["jobs"]
                        .as_array()
                        .and_then(|j| j.iter().find(|j| j["device"] == MIRROR_JOB))
                        .cloned()
                        .unwrap_or_default();
                    view.disk_bytes = job["offset"].as_u64().unwrap_or(view.disk_bytes);
                    view.disk_total = job["len"].as_u64().unwrap_or(view.disk_total);
                    // Keeps the destination's connection in use: an agent drops one idle
                    // for 30 s, and a large mirror over a slow WAN takes longer.
                    let _ = step(&mut dest, MigrateStep::Status);
                    progress(&tenths("disk mirrored", view.disk_bytes, view.disk_total));
                    view.save(t0, record);
                    if job["ready"] == true {
                        break;
                    }
                    if job.is_null() || Instant::now() > deadline {
                        return Err(fail(
                            &mut view,
                            &mut origin,
                            &mut dest,
                            "the disk mirror ended or did not catch up in time".into(),
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            }
            if let Err(e) = step(
                &mut origin,
                MigrateStep::Send {
                    token: token.clone(),
                    dest: to.agent_addr.clone(),
                    dest_key: to.agent_key.clone(),
                    downtime_ms: args.downtime_ms,
                    rate: args.rate,
                    libvirt,
                },
            ) {
                return Err(fail(&mut view, &mut origin, &mut dest, e.to_string()));
            }
            // 4: memory, until qemu says completed.
            view.phase = "memory".into();
            loop {
                let st = match step(&mut origin, MigrateStep::Status) {
                    Ok(v) => v,
                    Err(e) => return Err(fail(&mut view, &mut origin, &mut dest, e.to_string())),
                };
                view.ram_bytes = st["ram"]["transferred"].as_u64().unwrap_or(view.ram_bytes);
                view.ram_total = st["ram"]["total"].as_u64().unwrap_or(view.ram_total);
                progress(&tenths("memory sent", view.ram_bytes, view.ram_total));
                // qemu's rate is in Mbit/s.
                let mbps = st["ram"]["mbps"].as_f64().unwrap_or(0.0);
                view.eta_secs = st["ram"]["remaining"]
                    .as_u64()
                    .filter(|_| mbps > 0.0)
                    .map(|r| r as f64 * 8.0 / (mbps * 1e6));
                // Until switchover the destination must fetch nothing (see the module doc).
                // (Counted while the destination qemu still waits: once it runs, the
                // guest's reads and partial writes fetch blocks, as they should.)
                if let Ok(d) = step(&mut dest, MigrateStep::Status) {
                    if d["run"]["status"] == "inmigrate" {
                        view.disk_bytes_before_switchover = view
                            .disk_bytes_before_switchover
                            .max(d["disk"]["fetched_bytes"].as_u64().unwrap_or(0));
                    }
                }
                view.save(t0, record);
                match st["status"].as_str().unwrap_or("") {
                    "completed" => {
                        view.downtime_ms = st["downtime"].as_u64();
                        break;
                    }
                    "failed" | "cancelled" | "" => {
                        let why = st["error-desc"]
                            .as_str()
                            .unwrap_or("qemu gave up")
                            .to_string();
                        return Err(fail(&mut view, &mut origin, &mut dest, why));
                    }
                    _ => {}
                }
                if Instant::now() > deadline {
                    return Err(fail(
                        &mut view,
                        &mut origin,
                        &mut dest,
                        format!("memory not moved within {} s", args.timeout.as_secs()),
                    ));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            // 5: switchover: the destination runs, announces itself, copies the disk.
            view.phase = "switchover".into();
            view.save(t0, record);
            if args.precopy_disk {
                if let Err(e) = step(&mut origin, MigrateStep::MirrorEnd) {
                    return Err(fail(&mut view, &mut origin, &mut dest, e.to_string()));
                }
            }
            let mut finished = Err(String::new());
            for _ in 0..50 {
                finished = step(&mut dest, MigrateStep::Finish).map_err(|e| e.to_string());
                if finished.is_ok() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            match finished {
                // libvirt measures the downtime at the destination.
                Ok(f) => {
                    if let Some(ms) = f["downtime_ms"].as_u64() {
                        view.downtime_ms = Some(ms);
                    }
                }
                Err(e) => return Err(fail(&mut view, &mut origin, &mut dest, e)),
            }
            self.store.move_vm(&vm.name, &to.name, &host)?;
            self.stack_after_move(&args.cluster);
            progress(&format!(
                "{} runs at site {} (memory {} MiB moved, downtime {} ms)",
                vm.name,
                to.name,
                view.ram_bytes >> 20,
                view.downtime_ms.unwrap_or(0)
            ));
        }
        // 6: the disk follows in the background; the origin keeps it until then. Saved at
        // once: a `vm migrate` ended from here on is finished by the next one.
        view.phase = "disk".into();
        view.save(t0, record);
        loop {
            if precopy {
                // Mirrored already, before the memory.
                break;
            }
            let st = match step(&mut dest, MigrateStep::Status) {
                Ok(st) => st,
                // The destination agent may be restarting: it resumes the copy.
                Err(e) if Instant::now() < deadline => {
                    progress(&format!(
                        "site {} does not answer ({e}); retrying",
                        quote(&to.name)
                    ));
                    std::thread::sleep(Duration::from_secs(1));
                    if let Ok(c) = AgentClient::connect(&to, self.key) {
                        dest = c;
                    }
                    continue;
                }
                Err(e) => return Err(e.into()),
            };
            let d = &st["disk"];
            if d.is_null() {
                // The destination agent restarted and no longer relays to the origin.
                view.phase = "failed".into();
                view.error = Some("the destination lost the disk copy".into());
                view.save(t0, record);
                return Err(ControlError::Local(format!(
                    "{} runs at site {}, but site {}'s agent no longer copies its disk \
                     (restarted?); site {} keeps the disk",
                    quote(&vm.name),
                    quote(&to.name),
                    quote(&to.name),
                    quote(&from.name)
                )));
            }
            view.disk_bytes = d["fetched_bytes"].as_u64().unwrap_or(view.disk_bytes);
            view.disk_total = d["size"].as_u64().unwrap_or(view.disk_total);
            progress(&tenths("disk copied", view.disk_bytes, view.disk_total));
            view.eta_secs = d["eta_secs"].as_f64();
            view.save(t0, record);
            if d["mode"] == "target" {
                break;
            }
            if Instant::now() > deadline {
                view.phase = "failed".into();
                view.error = Some("disk copy unfinished; the origin keeps the disk".into());
                view.save(t0, record);
                return Err(ControlError::Local(format!(
                    "{} runs at site {} but its disk was not copied within {} s; \
                     the origin keeps it (run the migration's last steps again later)",
                    quote(&vm.name),
                    quote(&to.name),
                    args.timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // 7: the origin lets go.
        view.phase = "cleanup".into();
        view.save(t0, record);
        step(&mut dest, MigrateStep::Done)?;
        // A new connection: the origin's was idle while the disk followed, longer than an
        // agent keeps an idle connection (30 s) when the disk is large or the WAN slow.
        let mut origin = AgentClient::connect(&from, self.key)?;
        step(&mut origin, MigrateStep::Release)?;
        view.phase = "done".into();
        view.eta_secs = None;
        view.save(t0, record);
        progress(&format!(
            "{} moved to site {} in {:.1} s (disk {} MiB copied)",
            vm.name,
            to.name,
            view.elapsed_secs,
            view.disk_bytes >> 20
        ));
        Ok(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    /// An agent's side of a tunnel in miniature: handshake, hello, then `answer`; on
    /// `ok`, relay into `local`.
    fn tunnel_server(
        answer: &'static [u8],
        local: UnixStream,
    ) -> (String, String, std::thread::JoinHandle<Option<TunnelHello>>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let host = crate::auth::SigningKey::generate().unwrap();
        let key = host.public_hex();
        // A client that refuses the agent's key hangs up after the handshake: `None`.
        let t = std::thread::spawn(move || {
            let (s, _) = l.accept().ok()?;
            let mut ch = crate::channel::server(s, &host).ok()?;
            let hello = TunnelHello::parse(&ch.recv().ok()?);
            ch.send(answer).ok()?;
            if answer == b"ok" {
                relay(ch, local);
            }
            hello
        });
        (addr, key, t)
    }

    #[test]
    fn tunnel_carries_both_directions_whole_and_in_order() {
        let (far, far_app) = UnixStream::pair().unwrap();
        let (addr, key, server) = tunnel_server(b"ok", far);
        let token = "ab".repeat(32);
        let ch = open_tunnel(&addr, &key, &token, TunnelKind::Ram).unwrap();
        let (near, mut near_app) = UnixStream::pair().unwrap();
        let client = std::thread::spawn(move || relay(ch, near));
        // 3 MiB one way (several frames), 100 KiB the other, at the same time.
        let up: Vec<u8> = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        let down: Vec<u8> = (0..100u32 << 10).map(|i| (i % 241) as u8).collect();
        let (up2, down2) = (up.clone(), down.clone());
        let mut far_w = far_app.try_clone().unwrap();
        let far_side = std::thread::spawn(move || {
            far_w.write_all(&down2).unwrap();
            far_w.shutdown(std::net::Shutdown::Write).unwrap();
            let mut got = Vec::new();
            let mut r = far_app;
            r.read_to_end(&mut got).unwrap();
            assert!(got == up2, "upstream bytes differ ({} received)", got.len());
        });
        let mut w = near_app.try_clone().unwrap();
        w.write_all(&up).unwrap();
        w.shutdown(std::net::Shutdown::Write).unwrap();
        let mut got = Vec::new();
        near_app.read_to_end(&mut got).unwrap();
        assert!(
            got == down,
            "downstream bytes differ ({} received)",
            got.len()
        );
        far_side.join().unwrap();
        assert_eq!(client.join().unwrap(), (3 << 20, 100 << 10));
        let hello = server.join().unwrap().unwrap();
        assert_eq!(hello.tunnel, token);
        assert_eq!(hello.kind, TunnelKind::Ram);
    }

    #[test]
    fn tunnel_refused_or_to_the_wrong_agent_fails() {
        let (far, _far_app) = UnixStream::pair().unwrap();
        let (addr, key, server) = tunnel_server(b"unknown migration", far);
        let e = open_tunnel(&addr, &key, &"cd".repeat(32), TunnelKind::Nbd).err();
        assert!(e.is_some_and(|e| e.contains("refused: unknown migration")));
        server.join().unwrap();
        // Another agent's key pinned: no tunnel.
        let (far, _far_app) = UnixStream::pair().unwrap();
        let (addr, _key, _server) = tunnel_server(b"ok", far);
        let other = crate::auth::SigningKey::generate().unwrap().public_hex();
        let e = open_tunnel(&addr, &other, &"cd".repeat(32), TunnelKind::Nbd).err();
        assert!(
            e.is_some_and(|e| e.contains("mismatch")),
            "wrong key accepted"
        );
    }

    #[test]
    fn netns_state_is_checked_before_use() {
        let ok = NetnsState::parse(r#"{"addrs":["198.19.0.11/24"]}"#).unwrap();
        assert_eq!(ok.addrs, vec!["198.19.0.11/24".to_string()]);
        for bad in [
            r#"{"addrs":[]}"#,
            r#"{"addrs":["198.19.0.11"]}"#,
            r#"{"addrs":["198.19.0.11/33"]}"#,
            r#"{"addrs":["198.19.0.11/0"]}"#,
            r#"{"addrs":["x/24"]}"#,
            r#"{"addrs":["198.19.0.11/24; reboot"]}"#,
            r#"{"addrs":["198.19.0.11/24"],"run":"x"}"#,
            "not json",
        ] {
            assert!(NetnsState::parse(bad).is_err(), "{bad} accepted");
        }
        let many = format!(r#"{{"addrs":[{}]}}"#, [r#""198.19.0.1/24""#; 9].join(","));
        assert!(NetnsState::parse(&many).is_err());
    }

    #[test]
    fn progress_bar_moves_by_tenths() {
        assert_eq!(tenths("x", 0, 0), "[----------]   0% x (of 0 MiB)");
        assert_eq!(
            tenths("x", 45 << 20, 100 << 20),
            "[####------]  40% x (of 100 MiB)"
        );
        assert_eq!(tenths("x", 200, 100), "[##########] 100% x (of 0 MiB)");
    }

    #[test]
    fn steps_and_hello_round_trip_and_refuse_bad_input() {
        let s = MigrateStep::Send {
            token: "ab".repeat(32),
            dest: "198.18.3.2:7000".into(),
            dest_key: "cd".repeat(32),
            downtime_ms: 300,
            rate: 0,
            libvirt: None,
        };
        let t = serde_json::to_string(&s).unwrap();
        assert_eq!(serde_json::from_str::<MigrateStep>(&t).unwrap(), s);
        assert!(s.validate().is_ok());
        let bad = MigrateStep::Offer { token: "zz".into() };
        assert!(bad.validate().is_err());
        let h = TunnelHello {
            tunnel: "ab".repeat(32),
            kind: TunnelKind::Nbd,
        };
        let t = serde_json::to_vec(&h).unwrap();
        assert_eq!(TunnelHello::parse(&t), Some(h));
        // A signed request is not a hello.
        assert_eq!(TunnelHello::parse(br#"{"body":"x","sig":"y"}"#), None);
        assert_eq!(TunnelHello::parse(b"\xff"), None);
    }

    #[test]
    fn libvirt_domain_is_checked_and_its_xml_signed_by_the_destination() {
        let token = "ab".repeat(32);
        let dest = crate::auth::SigningKey::generate().unwrap();
        let other = crate::auth::SigningKey::generate().unwrap();
        let xml = "<domain type='qemu'><name>b-c1-k-c1</name></domain>".to_string();
        let sig = dest.sign(&LibvirtIncoming::signed(&token, "c-c2-k-c1", &xml));
        let inc = LibvirtIncoming {
            xml: xml.clone(),
            dname: "c-c2-k-c1".into(),
            sig: crate::model::hex(&sig),
        };
        assert!(inc.validate().is_ok());
        assert!(inc.verify(&token, &dest.public_hex()));
        // Another key, another token, or a changed XML or name does not verify.
        assert!(!inc.verify(&token, &other.public_hex()));
        assert!(!inc.verify(&"cd".repeat(32), &dest.public_hex()));
        let mut x = inc.clone();
        x.xml = xml.replace("qemu", "kvm");
        assert!(!x.verify(&token, &dest.public_hex()));
        let mut x = inc.clone();
        x.dname = "c-c2-k-c2".into();
        assert!(!x.verify(&token, &dest.public_hex()));
        // Bad input is refused before use.
        for (xml, dname, sig) in [
            ("<x/>", "d", "00".repeat(64)),
            ("<domain >", "a b", "00".repeat(64)),
            ("<domain >", "d", "zz".repeat(64)),
            ("<domain >", "d", "00".repeat(63)),
        ] {
            let bad = LibvirtIncoming {
                xml: xml.into(),
                dname: dname.into(),
                sig,
            };
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        let big = LibvirtIncoming {
            xml: format!("<domain {}", " ".repeat(MAX_DOMAIN_XML)),
            ..inc.clone()
        };
        assert!(big.validate().is_err());
        let d = LibvirtDomain {
            name: "b-c1-k-c1".into(),
            uuid: "0c4fb6a4-7d63-4b38-9a1b-2a0e3c9d1f10".into(),
            domain_type: "qemu".into(),
        };
        assert!(d.validate().is_ok());
        for bad in [
            LibvirtDomain {
                name: "../x".into(),
                ..d.clone()
            },
            LibvirtDomain {
                uuid: "0c4fb6a4-7d63-4b38-9a1b-2a0e3c9d1f1".into(),
                ..d.clone()
            },
            LibvirtDomain {
                uuid: "0c4fb6a4x7d63-4b38-9a1b-2a0e3c9d1f10".into(),
                ..d.clone()
            },
            LibvirtDomain {
                domain_type: "lxc".into(),
                ..d.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
        // Old peers: a prepare without `origin_domain` still parses.
        let p: MigrateStep = serde_json::from_str(
            r#"{"step":"prepare","token":"x","host":"h","memory_mb":1,
                "mac":"02:00:00:00:00:01","origin":"o","origin_key":"k"}"#,
        )
        .unwrap();
        assert!(matches!(
            p,
            MigrateStep::Prepare {
                origin_domain: None,
                ..
            }
        ));
    }
}
