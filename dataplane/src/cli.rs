//! `mvc edge` and `mvc supernode`: flags, config file, logging, signals, and the wiring of
//! cores to the I/O drivers.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::{Args, Subcommand, ValueEnum};
use serde::Deserialize;

use crate::crypto::Cipher;
use crate::edge::{EdgeConfig, EdgeCore, EdgeError, L2Config, SupernodeAddr, Timers};
use crate::io::ctl::{self, Snapshot};
use crate::io::driver::{self, EdgeInfo};
use crate::io::frames::FramePort;
use crate::io::levers::Levers;
use crate::io::uring::{self, ForwarderConfig, Offloads};
use crate::io::{tap, udp, IoError};
use crate::snkey::{KeyError, SupernodeKey};
use crate::status::{EdgeStatus, SupernodeStatus};
use crate::supernode::{SupernodeConfig, SupernodeCore};
use crate::xdp;
use std::os::fd::AsRawFd;

/// Errors of the command line front end.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Missing or inconsistent options.
    #[error("{0}")]
    Usage(String),
    /// I/O set-up or loop failure.
    #[error(transparent)]
    Io(#[from] IoError),
    /// Edge configuration.
    #[error(transparent)]
    Edge(#[from] EdgeError),
    /// Supernode key file.
    #[error("supernode key: {0}")]
    Key(#[from] KeyError),
}

/// Which datapath carries frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Datapath {
    /// The one that moves bulk traffic fastest here: the TAP device, by the rule
    /// in docs/XDP.md ("Choosing the datapath").
    #[default]
    Auto,
    /// TAP device with io_uring.
    Tap,
    /// XDP/AF_XDP fast path.
    Xdp,
}

const EDGE_AFTER_HELP: &str = "\
An edge joins this host to one community (one private layer-2 network). Frames written
to the TAP device by local VMs (enslave it to the VMs' bridge) reach the VMs behind the
other edges of the community, encrypted, directly when the NATs allow it and through a
supernode otherwise. The supernode never sees the secret or the frames.

Example (site B, behind NAT; site A runs the supernode on 198.18.0.1 and printed its
key with `mvc supernode key`):
  echo 'long random string' > /etc/mvc/secret; chmod 600 /etc/mvc/secret
  mvc edge --name site-b --community lab --secret-file /etc/mvc/secret \\
      --supernode 198.18.0.1:7654@<64 hex digits> --tap mvc0 --create-tap
  ip link set mvc0 master br-vms
  mvc edge status            # peers, direct/relayed, RTT, counters, drops
A config file (--config edge.toml) takes the same keys as the long flags, with
underscores (secret_file, create_tap, status_socket) and `supernodes = [\"ADDR@KEY\", ..]`;
flags override it. Without @KEY the edge trusts the key of the supernode's first signed
answer (logged as a warning): pin keys wherever the network is not trusted. Logs go to stderr (RUST_LOG=debug for more).
MTU: the TAP MTU defaults to 1500 so VMs keep 1500. TCP is re-segmented so that its
overlay packets fit --underlay-mtu (default 1500); other oversized frames are fragmented
by IP (docs/ARCHITECTURE.md).";

const SN_AFTER_HELP: &str = "\
A supernode introduces the edges of each community to each other (observed and local
addresses), relays packets between edges that have no direct path, fans broadcast
frames out and forgets edges that stay silent. Run it on a host with a public address
(or several, and give every edge all of them). It needs no community secret; its own
Ed25519 key (--key-file, made on first start) signs what it tells edges, and edges pin
its public key (--supernode ADDR@KEY). It answers an address it has not seen receive
with one small cookie only, so it cannot be used to flood a third party.

Example:  mvc supernode --listen 0.0.0.0:7654     # logs `key=<64 hex digits>`
          mvc supernode key                       # prints the public key
          mvc supernode status --json";

/// `mvc edge`: joins a community with a TAP device.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, after_help = EDGE_AFTER_HELP)]
pub struct EdgeCommand {
    #[command(subcommand)]
    sub: Option<EdgeSub>,
    #[command(flatten)]
    args: EdgeArgs,
}

#[derive(Subcommand, Debug)]
enum EdgeSub {
    /// Shows a running edge's peers, paths, RTT, counters and drops.
    Status(EdgeStatusArgs),
}

#[derive(Args, Debug)]
struct EdgeStatusArgs {
    /// Status socket of the edge [default: /run/mvc/edge-<tap>.sock, or the only one there].
    #[arg(long, value_name = "PATH")]
    status_socket: Option<PathBuf>,
    /// TAP device of the edge (picks its default status socket).
    #[arg(long, value_name = "IFNAME")]
    tap: Option<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Default)]
struct EdgeArgs {
    /// Name of this edge as the peers and supernodes show it (<= 32 bytes).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Community (virtual network) to join.
    #[arg(long, value_name = "NAME")]
    community: Option<String>,
    /// File holding the community secret (trailing newline ignored).
    #[arg(long, value_name = "PATH")]
    secret_file: Option<PathBuf>,
    /// Community secret (prefer --secret-file or MVC_SECRET: arguments are visible in ps).
    #[arg(long, value_name = "STR", env = "MVC_SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// Supernode address and its public key (64 hex digits, from `mvc supernode key`);
    /// repeat for fail-over (all are used, the first up one relays). Without @KEY the
    /// key of its first signed answer is trusted.
    #[arg(long = "supernode", value_name = "ADDR:PORT[@KEY]")]
    supernodes: Vec<SupernodeAddr>,
    /// TAP device to attach to.
    #[arg(long, value_name = "IFNAME")]
    tap: Option<String>,
    /// Create the TAP device if it does not exist (it goes away when the edge exits).
    #[arg(long)]
    create_tap: bool,
    /// MTU of the TAP device [default: 1500].
    #[arg(long, value_name = "N")]
    mtu: Option<u32>,
    /// Data cipher; all edges of a community must use the same [default: aes-256-gcm].
    #[arg(long, value_name = "aes-256-gcm|chacha20-poly1305|none")]
    cipher: Option<Cipher>,
    /// UDP address to listen on [default: 0.0.0.0:0].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Unix socket for `mvc edge status` [default: /run/mvc/edge-<tap>.sock].
    #[arg(long, value_name = "PATH")]
    status_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// TOML file with the same settings (flags override it).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Datapath: auto, tap, or xdp [default: auto]. auto takes the TAP device (XDP measured
    /// 0.83-1.18x TAP's bulk TCP, about its ping RTT; docs/XDP.md "Choosing the datapath"). xdp
    /// makes the --tap name a veth port served by XDP/AF_XDP (enslaved to --bridge, or
    /// by the operator like a TAP). `mvc edge status` says which and why.
    #[arg(long, value_enum)]
    datapath: Option<Datapath>,
    /// The VM bridge: the edge puts its port (the TAP device, or the XDP datapath's veth
    /// port, named by --tap) on it; with auto the TAP device is created when missing.
    #[arg(long, value_name = "BRIDGE")]
    bridge: Option<String>,
    /// MTU of the underlay path; TCP is re-segmented so overlay packets fit it [default: 1500].
    #[arg(long, value_name = "N")]
    underlay_mtu: Option<u32>,
    /// Longest poll of the I/O loop before it sleeps, in microseconds; the window adapts to
    /// how soon events follow each other and is off while the host has no idle core.
    /// 0 never polls [default: 200].
    #[arg(long, value_name = "MICROS")]
    busy_poll_us: Option<u64>,
    /// io_uring features not to use even where the kernel has them, comma-separated:
    /// fixed-reads (registered TAP read buffers), multishot (one multishot UDP receive
    /// over a ring of provided buffers), or all. For measuring one against the other;
    /// `mvc edge status` shows which are on.
    #[arg(long, value_name = "LIST", env = "MVC_URING_OFF")]
    uring_off: Option<String>,
    /// Forwarder threads, each with its own UDP socket (SO_REUSEPORT) and frame queue
    /// (multi-queue TAP, or one AF_XDP socket per veth queue); a flow stays on one
    /// thread. 1..=64 [default: 1].
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
    /// Drop junk for the edge's UDP port in an XDP program on this underlay interface
    /// before it reaches the socket (wrong version, unknown type, too short, another
    /// community id; docs/XDP.md). If the kernel or driver refuses, one warning.
    #[arg(long, value_name = "IFACE")]
    xdp_filter: Option<String>,
    /// Hook for --xdp-filter: tc (a TC classifier on ingress: the peer's GSO batches stay
    /// whole; Linux 6.6), native or generic XDP, or auto (tc on veth, else native XDP,
    /// generic where the driver refuses) [default: auto].
    #[arg(long, value_name = "MODE")]
    xdp_filter_mode: Option<String>,
    /// With --datapath xdp: the VMs' TCP super-packets reach the edge whole (generic XDP
    /// mode) and are re-segmented there; off: the kernel segments them for the port
    /// (needed where VMs run tunnels of their own with checksum offload, docs/XDP.md
    /// "GSO through the port") [default: on].
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    xdp_gso: Option<bool>,
    /// The L2 control plane: announce this edge's MAC/IP bindings to peers and answer ARP
    /// requests for known ones locally (off: every ARP request is flooded) [default: on].
    #[arg(long, value_name = "on|off", value_parser = parse_on_off)]
    l2_control: Option<bool>,
    /// Frames flooded across the WAN (broadcast, multicast, unknown unicast) per second
    /// from one VM (source MAC); 0 = no limit [default: 100].
    #[arg(long, value_name = "N")]
    flood_vm_pps: Option<u32>,
    /// Flooded frames one VM may send at once after a quiet time [default: 2 x --flood-vm-pps].
    #[arg(long, value_name = "N")]
    flood_vm_burst: Option<u32>,
    /// Frames flooded across the WAN per second from this edge; 0 = no limit [default: 2000].
    #[arg(long, value_name = "N")]
    flood_edge_pps: Option<u32>,
    /// Flooded frames this edge may send at once after a quiet time
    /// [default: 2 x --flood-edge-pps].
    #[arg(long, value_name = "N")]
    flood_edge_burst: Option<u32>,
    /// Kilobits per second of flooded frames from this edge (one second's worth may go
    /// at once, at least 64 KiB); 0 = no limit [default: 16000].
    #[arg(long, value_name = "KBIT")]
    flood_edge_kbps: Option<u32>,
    /// Broadcast replies per second of this edge's DHCP server (the first local VM that
    /// sends DHCP replies) to clients behind a known peer: sent to that peer only and not
    /// charged to the flood limits; twice as many may go at once; 0 = no limit
    /// [default: 1000].
    #[arg(long, value_name = "N")]
    dhcp_reply_pps: Option<u32>,
}

/// The L2 control plane's settings from flags and file (flags win).
fn l2_config(a: &EdgeArgs, f: &EdgeFile) -> Result<L2Config, CliError> {
    let d = L2Config::default();
    let vm_pps = a.flood_vm_pps.or(f.flood_vm_pps).unwrap_or(d.vm_flood_pps);
    let edge_pps = a
        .flood_edge_pps
        .or(f.flood_edge_pps)
        .unwrap_or(d.edge_flood_pps);
    let vm_burst = a
        .flood_vm_burst
        .or(f.flood_vm_burst)
        .unwrap_or(vm_pps.saturating_mul(2));
    let edge_burst = a
        .flood_edge_burst
        .or(f.flood_edge_burst)
        .unwrap_or(edge_pps.saturating_mul(2));
    for (flag, pps, burst) in [
        ("--flood-vm-burst", vm_pps, vm_burst),
        ("--flood-edge-burst", edge_pps, edge_burst),
    ] {
        if pps > 0 && burst == 0 {
            return Err(CliError::Usage(format!(
                "{flag} 0 would drop every flooded frame; give at least 1 (or a rate of 0 for no limit)"
            )));
        }
    }
    let bytes = a
        .flood_edge_kbps
        .or(f.flood_edge_kbps)
        .map_or(d.edge_flood_bytes, |k| k.saturating_mul(125));
    let dhcp_pps = a
        .dhcp_reply_pps
        .or(f.dhcp_reply_pps)
        .unwrap_or(d.dhcp_reply_pps);
    Ok(L2Config {
        control: a.l2_control.or(f.l2_control).unwrap_or(d.control),
        dhcp_reply_pps: dhcp_pps,
        dhcp_reply_burst: dhcp_pps.saturating_mul(2),
        vm_flood_pps: vm_pps,
        vm_flood_burst: vm_burst,
        edge_flood_pps: edge_pps,
        edge_flood_burst: edge_burst,
        edge_flood_bytes: bytes,
        edge_flood_byte_burst: bytes.max(65_536),
        ..d
    })
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(format!("{s:?} is not on or off")),
    }
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct EdgeFile {
    name: Option<String>,
    community: Option<String>,
    secret_file: Option<PathBuf>,
    secret: Option<String>,
    #[serde(alias = "supernode")]
    supernodes: Option<Vec<SupernodeAddr>>,
    tap: Option<String>,
    create_tap: Option<bool>,
    mtu: Option<u32>,
    cipher: Option<Cipher>,
    listen: Option<SocketAddr>,
    status_socket: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    datapath: Option<Datapath>,
    bridge: Option<String>,
    underlay_mtu: Option<u32>,
    busy_poll_us: Option<u64>,
    threads: Option<usize>,
    xdp_filter: Option<String>,
    xdp_filter_mode: Option<String>,
    xdp_gso: Option<bool>,
    l2_control: Option<bool>,
    flood_vm_pps: Option<u32>,
    flood_vm_burst: Option<u32>,
    flood_edge_pps: Option<u32>,
    flood_edge_burst: Option<u32>,
    flood_edge_kbps: Option<u32>,
    dhcp_reply_pps: Option<u32>,
}

/// `mvc supernode`: rendezvous and relay.
#[derive(Args, Debug)]
#[command(args_conflicts_with_subcommands = true, after_help = SN_AFTER_HELP)]
pub struct SupernodeCommand {
    #[command(subcommand)]
    sub: Option<SnSub>,
    #[command(flatten)]
    args: SnArgs,
}

#[derive(Subcommand, Debug)]
enum SnSub {
    /// Shows a running supernode's communities, edges, relay counters and drops.
    Status(SnStatusArgs),
    /// Prints the supernode's public key (made, like at start, when the file is missing).
    Key(SnKeyArgs),
}

#[derive(Args, Debug)]
struct SnKeyArgs {
    /// The supernode's key file [default: /var/lib/mvc/supernode.key].
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
}

const SN_KEY_DEFAULT: &str = "/var/lib/mvc/supernode.key";

#[derive(Args, Debug)]
struct SnStatusArgs {
    /// Status socket of the supernode [default: /run/mvc/supernode.sock].
    #[arg(long, value_name = "PATH")]
    status_socket: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Args, Debug, Default)]
struct SnArgs {
    /// UDP address to listen on [default: 0.0.0.0:7654].
    #[arg(long, value_name = "ADDR:PORT")]
    listen: Option<SocketAddr>,
    /// Unix socket for `mvc supernode status` [default: /run/mvc/supernode.sock].
    #[arg(long, value_name = "PATH")]
    status_socket: Option<PathBuf>,
    /// Serve Prometheus metrics on http://ADDR:PORT/metrics.
    #[arg(long, value_name = "ADDR:PORT")]
    metrics: Option<SocketAddr>,
    /// TOML file with the same settings (flags override it).
    #[arg(long, value_name = "FILE.toml")]
    config: Option<PathBuf>,
    /// Forget an edge after this many seconds without a registration [default: 30].
    #[arg(long, value_name = "SECS")]
    edge_timeout: Option<u64>,
    /// The supernode's Ed25519 key (seed, 64 hex digits), made with mode 0600 when
    /// missing; keep it across restarts, edges pin its public half
    /// [default: /var/lib/mvc/supernode.key].
    #[arg(long, value_name = "PATH")]
    key_file: Option<PathBuf>,
    /// Relay sealed data between validated edges in the kernel (an XDP or TC program)
    /// on this underlay interface, and drop junk for the supernode's port there
    /// (docs/XDP.md); anything else goes to the socket as without it. If the kernel or
    /// driver refuses, the supernode warns once and relays in userspace.
    #[arg(long, value_name = "IFACE")]
    xdp_relay: Option<String>,
    /// Hook for --xdp-relay: tc (a TC classifier on ingress: keeps the edges' GSO
    /// batches whole; Linux 6.6), native or generic XDP, or auto (tc on veth, else
    /// native XDP, generic where the driver refuses) [default: auto].
    #[arg(long, value_name = "MODE")]
    xdp_relay_mode: Option<String>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct SnFile {
    listen: Option<SocketAddr>,
    status_socket: Option<PathBuf>,
    metrics: Option<SocketAddr>,
    edge_timeout: Option<u64>,
    key_file: Option<PathBuf>,
    xdp_relay: Option<String>,
    xdp_relay_mode: Option<String>,
}

/// The hook `option` asks for (auto when not given).
fn hook_mode(option: &str, value: Option<&str>) -> Result<xdp::HookMode, CliError> {
    value
        .unwrap_or("auto")
        .parse()
        .map_err(|e: xdp::Error| CliError::Usage(format!("{option}: {e}")))
}

fn read_toml<T: serde::de::DeserializeOwned + Default>(p: Option<&Path>) -> Result<T, CliError> {
    let Some(p) = p else {
        return Ok(T::default());
    };
    let s = std::fs::read_to_string(p)
        .map_err(|e| CliError::Usage(format!("cannot read config {}: {e}", p.display())))?;
    toml::from_str(&s).map_err(|e| CliError::Usage(format!("config {}: {e}", p.display())))
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

fn stop_flag() -> Result<Arc<AtomicBool>, CliError> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| IoError::Sys {
            call: "sigaction".into(),
            source: e,
        })?;
    }
    Ok(stop)
}

fn print_status<T: serde::de::DeserializeOwned>(
    path: &Path,
    json: bool,
    table: impl Fn(&T) -> String,
) -> Result<(), CliError> {
    let s = ctl::query_status(path)?;
    if json {
        print!("{s}");
        return Ok(());
    }
    let v: T = serde_json::from_str(&s).map_err(|e| {
        CliError::Usage(format!(
            "unexpected status from {} ({e}); the process may still be starting",
            path.display()
        ))
    })?;
    print!("{}", table(&v));
    Ok(())
}

fn edge_socket_default(tap: &str) -> PathBuf {
    PathBuf::from(format!("/run/mvc/edge-{tap}.sock"))
}

impl EdgeCommand {
    /// Runs the command (the edge in the foreground, or a status query).
    pub fn run(self) -> Result<(), CliError> {
        match self.sub {
            Some(EdgeSub::Status(a)) => {
                let path = match (a.status_socket, a.tap) {
                    (Some(p), _) => p,
                    (None, Some(t)) => edge_socket_default(&t),
                    (None, None) => only_edge_socket()?,
                };
                print_status::<EdgeStatus>(&path, a.json, EdgeStatus::table)
            }
            None => {
                init_logging();
                run_edge(self.args)
            }
        }
    }
}

fn only_edge_socket() -> Result<PathBuf, CliError> {
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/run/mvc") {
        for e in rd.flatten() {
            let n = e.file_name().to_string_lossy().into_owned();
            if n.starts_with("edge-") && n.ends_with(".sock") {
                found.push(e.path());
            }
        }
    }
    match found.len() {
        1 => Ok(found.remove(0)),
        0 => Err(CliError::Usage(
            "no edge status socket in /run/mvc; pass --status-socket or --tap".into(),
        )),
        _ => Err(CliError::Usage(format!(
            "several edges run here ({}); pass --tap or --status-socket",
            found
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

/// Refuses a secret file that users other than its owner and group may access, as ssh
/// does for private keys: the community secret decrypts and forges all of a community's
/// traffic, the supernode key lets anyone impersonate the supernode.
fn refuse_if_others_can_read(p: &Path, what: &str) -> Result<(), CliError> {
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(p)
        .map_err(|e| CliError::Usage(format!("cannot read {what} {}: {e}", p.display())))?;
    let mode = md.mode() & 0o7777;
    if mode & 0o007 != 0 {
        return Err(CliError::Usage(format!(
            "{what} {} is accessible by other users (mode {mode:04o}): \
             run `chmod 600 {}` (or 640 with a group that only the daemon's user is in)",
            p.display(),
            p.display()
        )));
    }
    Ok(())
}

/// Tells systemd (Type=notify units) that the daemon serves: its sockets are bound and
/// its status socket listens. Does nothing when NOTIFY_SOCKET is not set.
fn notify_ready() {
    if let Err(e) = sd_notify::notify(true, &[sd_notify::NotifyState::Ready]) {
        tracing::warn!(error = %e, "cannot tell systemd that the daemon is ready");
    }
}

fn run_edge(a: EdgeArgs) -> Result<(), CliError> {
    let f: EdgeFile = read_toml(a.config.as_deref())?;
    let l2 = l2_config(&a, &f)?;
    let need = |v: Option<String>, flag: &str| {
        v.ok_or_else(|| CliError::Usage(format!("--{flag} is required (or `{flag}` in --config)")))
    };
    let name = need(a.name.or(f.name), "name")?;
    let community = need(a.community.or(f.community), "community")?;
    let tap_name = need(a.tap.or(f.tap), "tap")?;
    let secret = if let Some(p) = a.secret_file.or(f.secret_file) {
        refuse_if_others_can_read(&p, "secret file")?;
        let s = std::fs::read(&p).map_err(|e| {
            CliError::Usage(format!("cannot read secret file {}: {e}", p.display()))
        })?;
        let mut s = s;
        while s.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
            s.pop();
        }
        s
    } else if let Some(s) = a.secret.or(f.secret) {
        s.into_bytes()
    } else {
        return Err(CliError::Usage(
            "a community secret is required: --secret-file PATH, --secret STR or env MVC_SECRET"
                .into(),
        ));
    };
    if secret.is_empty() {
        return Err(CliError::Usage("the community secret is empty".into()));
    }
    let supernodes = if a.supernodes.is_empty() {
        f.supernodes.unwrap_or_default()
    } else {
        a.supernodes
    };
    if supernodes.is_empty() {
        return Err(CliError::Usage(
            "at least one --supernode ADDR:PORT[@KEY] is required".into(),
        ));
    }
    let mtu = a.mtu.or(f.mtu).unwrap_or(1500);
    if !(576..=9000).contains(&mtu) {
        return Err(CliError::Usage(format!(
            "--mtu {mtu} is outside 576..=9000"
        )));
    }
    let cipher = a.cipher.or(f.cipher).unwrap_or_default();
    let listen = a
        .listen
        .or(f.listen)
        .unwrap_or_else(|| "0.0.0.0:0".parse().expect("valid literal"));
    let status_socket = a
        .status_socket
        .or(f.status_socket)
        .unwrap_or_else(|| edge_socket_default(&tap_name));
    let metrics = a.metrics.or(f.metrics);
    let create_tap = a.create_tap || f.create_tap.unwrap_or(false);
    let bridge = a.bridge.or(f.bridge);
    let request = match a.datapath.or(f.datapath).unwrap_or_default() {
        Datapath::Auto => xdp::DatapathRequest::Auto,
        Datapath::Tap => xdp::DatapathRequest::Tap,
        Datapath::Xdp => xdp::DatapathRequest::Xdp,
    };
    let threads = a.threads.or(f.threads).unwrap_or(1);
    if !(1..=crate::io::threads::MAX_THREADS).contains(&threads) {
        return Err(CliError::Usage(format!(
            "--threads {threads} is outside 1..={}",
            crate::io::threads::MAX_THREADS
        )));
    }
    let uring_ok = io_uring::IoUring::new(8).is_ok();
    let xdp_cfg = {
        let mut c = xdp::XdpPortConfig::new(bridge.as_deref(), &tap_name);
        c.mtu = mtu;
        c.queues = threads as u32;
        // Only the io_uring forwarder re-segments super-packets from the port.
        c.gso = uring_ok && a.xdp_gso.or(f.xdp_gso).unwrap_or(true);
        // Only the io_uring forwarder writes frames with virtio-net headers.
        c.tx_vnet = uring_ok;
        c
    };
    let choice = xdp::choose(request, Some(&xdp_cfg))
        .map_err(|e| CliError::Usage(format!("--datapath xdp: {e}")))?;
    let datapath = choice.datapath.name();
    let datapath_reason = choice.reason;
    let xdp_port = match choice.datapath {
        xdp::Datapath::Xdp(p) => Some(p),
        xdp::Datapath::Tap => None,
    };

    let socks = udp::bind_reuseport(listen, threads)?;
    let sock = &socks[0];
    let bound = sock.local_addr().map_err(|e| IoError::Sys {
        call: "getsockname".into(),
        source: e,
    })?;
    let (local_addrs, _) = driver::host_addrs(&tap_name, bound);
    let underlay_mtu = a.underlay_mtu.or(f.underlay_mtu).unwrap_or(1500);
    if !(576..=65_000).contains(&underlay_mtu) {
        return Err(CliError::Usage(format!(
            "--underlay-mtu {underlay_mtu} is outside 576..=65000"
        )));
    }
    let busy_poll_us = a.busy_poll_us.or(f.busy_poll_us).unwrap_or(200);
    if !uring_ok {
        if threads > 1 {
            return Err(CliError::Usage(
                "--threads above 1 needs io_uring, which this kernel does not offer".into(),
            ));
        }
        tracing::warn!("io_uring is not available; falling back to poll(2) and plain TAP frames");
    }
    // With --bridge the edge owns its port on the bridge: auto makes the TAP device
    // there as it made the XDP port before.
    let create_tap = create_tap || (request == xdp::DatapathRequest::Auto && bridge.is_some());
    let mut taps = match xdp_port {
        Some(_) => Vec::new(),
        None => tap::Tap::open_queues(&tap_name, create_tap, mtu, uring_ok, threads)?,
    };
    if let (None, Some(br)) = (xdp_port.as_ref(), bridge.as_deref()) {
        xdp::enslave(&tap_name, br).map_err(|e| CliError::Usage(format!("--bridge {br}: {e}")))?;
    }
    let more_taps = taps.split_off(taps.len().min(1));
    let tap = taps.pop();
    let off = Offloads {
        gso: uring_ok && udp::probe_gso(sock.as_raw_fd()),
        gro: uring_ok
            && socks
                .iter()
                .filter(|s| !udp::enable_gro(s.as_raw_fd()))
                .count()
                == 0,
        vnet: tap.as_ref().is_some_and(|t| t.vnet_hdr),
        levers: if uring_ok {
            Levers::without(a.uring_off.as_deref().unwrap_or(""))?.probe()
        } else {
            Levers::NONE
        },
    };
    if let Some(tap) = tap.as_ref().filter(|_| uring_ok) {
        if !off.gso {
            tracing::warn!("UDP GSO not available; datagrams are sent one by one");
        }
        if !off.gro {
            tracing::warn!("UDP GRO not available; datagrams are received one by one");
        }
        if !tap.vnet_hdr {
            tracing::warn!("TAP virtio headers not available; no TSO from the TAP device");
        } else if !tap.offload {
            tracing::warn!("TAP TSO/checksum offload refused; frames arrive segmented");
        }
    }
    let xdp_filter = match a.xdp_filter.clone().or(f.xdp_filter.clone()) {
        None => None,
        Some(iface) => {
            let mode = hook_mode(
                "--xdp-filter-mode",
                a.xdp_filter_mode
                    .as_deref()
                    .or(f.xdp_filter_mode.as_deref()),
            )?;
            let id = crate::crypto::CommunityKeys::derive(&community, &secret).id;
            match xdp::XdpFilter::attach(&iface, bound.port(), &id, mode) {
                Ok(x) => Some(Arc::new(x)),
                Err(e) => {
                    tracing::warn!(%iface, "XDP junk filter not attached ({e}); every datagram reaches the socket");
                    None
                }
            }
        }
    };
    let core = EdgeCore::new(
        EdgeConfig {
            name: name.clone(),
            community: community.clone(),
            secret,
            cipher,
            supernodes: supernodes.clone(),
            local_addrs,
            timers: Timers::default(),
            max_peers: 4096,
            max_macs: 65_536,
        },
        Instant::now(),
    )?;
    let mut core = core;
    core.set_l2_config(l2);
    let snap: Snapshot<EdgeStatus> = Arc::new(Mutex::new(None));
    let _sock_file = ctl::serve_status(&status_socket, Arc::clone(&snap))?;
    if let Some(m) = metrics {
        let s2 = Arc::clone(&snap);
        let at = ctl::serve_metrics(m, move || {
            s2.lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|s| s.prometheus())
                .unwrap_or_default()
        })?;
        tracing::info!(%at, "metrics on /metrics");
    }
    let stop = stop_flag()?;
    let (port, more_ports): (FramePort, Vec<FramePort>) = match (xdp_port, tap) {
        (Some(mut p), _) => {
            let more = p.split_queues();
            (
                FramePort::Xdp(p),
                more.into_iter()
                    .map(|q| FramePort::Xdp(Box::new(q)))
                    .collect(),
            )
        }
        (None, Some(t)) => (
            FramePort::Tap(t),
            more_taps.into_iter().map(FramePort::Tap).collect(),
        ),
        (None, None) => return Err(CliError::Usage("no frame port".into())),
    };
    // The poll(2) driver runs one thread (`--threads` above 1 is refused there).
    let io = if uring_ok {
        off.describe(&port.describe(), threads)
    } else {
        format!("poll(2); no offloads; {}", port.describe())
    };
    tracing::info!(
        %name, %community, id = %crate::status::hex(&core.id()), tap = %tap_name, mtu,
        cipher = %cipher, listen = %bound, supernodes = %supernodes.iter().map(|s| s.to_string()).collect::<Vec<_>>().join(","), io = %io, threads,
        "edge running"
    );
    notify_ready();
    let info = EdgeInfo {
        datapath: datapath.into(),
        datapath_reason,
        io,
        tap: tap_name,
        mtu,
        listen: bound.to_string(),
        listen_addr: bound,
        xdp_filter,
    };
    let mut ports = vec![port];
    ports.extend(more_ports);
    if ports.len() != socks.len() {
        return Err(CliError::Usage(format!(
            "{} frame queues for {} threads",
            ports.len(),
            socks.len()
        )));
    }
    if uring_ok {
        let spin = Duration::from_micros(busy_poll_us.min(10_000));
        let cfg = ForwarderConfig {
            off,
            underlay_mtu: underlay_mtu as usize,
            spin,
            info,
            snap,
            stop,
        };
        uring::run_edge_threads(core, socks, ports, cfg)?;
    } else {
        let (Some(sock), Some(port)) = (socks.into_iter().next(), ports.into_iter().next()) else {
            return Err(CliError::Usage("no socket or frame port".into()));
        };
        driver::run_edge(core, sock, port, info, snap, stop)?;
    }
    tracing::info!("edge stopped");
    Ok(())
}

impl SupernodeCommand {
    /// Runs the command (the supernode in the foreground, or a status query).
    pub fn run(self) -> Result<(), CliError> {
        match self.sub {
            Some(SnSub::Status(a)) => {
                let path = a
                    .status_socket
                    .unwrap_or_else(|| PathBuf::from("/run/mvc/supernode.sock"));
                print_status::<SupernodeStatus>(&path, a.json, SupernodeStatus::table)
            }
            Some(SnSub::Key(a)) => {
                let p = a.key_file.unwrap_or_else(|| PathBuf::from(SN_KEY_DEFAULT));
                println!("{}", SupernodeKey::load_or_create(&p)?.public_hex());
                Ok(())
            }
            None => {
                init_logging();
                run_supernode(self.args)
            }
        }
    }
}

fn run_supernode(a: SnArgs) -> Result<(), CliError> {
    let f: SnFile = read_toml(a.config.as_deref())?;
    let listen = a
        .listen
        .or(f.listen)
        .unwrap_or_else(|| "0.0.0.0:7654".parse().expect("valid literal"));
    let status_socket = a
        .status_socket
        .or(f.status_socket)
        .unwrap_or_else(|| PathBuf::from("/run/mvc/supernode.sock"));
    let edge_timeout = a.edge_timeout.or(f.edge_timeout).unwrap_or(30);
    if edge_timeout == 0 {
        return Err(CliError::Usage("--edge-timeout must be at least 1".into()));
    }
    let key_file = a
        .key_file
        .or(f.key_file)
        .unwrap_or_else(|| PathBuf::from(SN_KEY_DEFAULT));
    // A missing key file is made with mode 0600; an existing one must not be readable by others.
    if key_file.exists() {
        refuse_if_others_can_read(&key_file, "supernode key file")?;
    }
    let key = SupernodeKey::load_or_create(&key_file)?;
    let key_hex = key.public_hex();
    let sock = udp::bind(listen)?;
    let bound = sock.local_addr().map(|a| a.to_string()).unwrap_or_default();
    let core = SupernodeCore::new(
        SupernodeConfig {
            edge_timeout: Duration::from_secs(edge_timeout),
            ..SupernodeConfig::default()
        },
        key,
        Instant::now(),
    );
    let snap: Snapshot<SupernodeStatus> = Arc::new(Mutex::new(None));
    let _sock_file = ctl::serve_status(&status_socket, Arc::clone(&snap))?;
    if let Some(m) = a.metrics.or(f.metrics) {
        let s2 = Arc::clone(&snap);
        let at = ctl::serve_metrics(m, move || {
            s2.lock()
                .unwrap_or_else(|e| e.into_inner())
                .as_ref()
                .map(|s| s.prometheus())
                .unwrap_or_default()
        })?;
        tracing::info!(%at, "metrics on /metrics");
    }
    let stop = stop_flag()?;
    tracing::info!(
        listen = %bound, edge_timeout, key = %key_hex, key_file = %key_file.display(),
        "supernode running; edges pin it with --supernode ADDR:PORT@{key_hex}"
    );
    let relay = match a.xdp_relay.or(f.xdp_relay) {
        None => None,
        Some(iface) => {
            let mode = hook_mode(
                "--xdp-relay-mode",
                a.xdp_relay_mode.as_deref().or(f.xdp_relay_mode.as_deref()),
            )?;
            let at = sock.local_addr().map_err(|e| IoError::Sys {
                call: "getsockname".into(),
                source: e,
            })?;
            match xdp::XdpRelay::attach(&iface, at, mode) {
                Ok(r) => Some(r),
                Err(e) => {
                    tracing::warn!(
                        %iface,
                        "XDP relay not attached ({e}); relaying in userspace"
                    );
                    None
                }
            }
        }
    };
    notify_ready();
    driver::run_supernode(core, sock, bound, relay, snap, stop)?;
    tracing::info!("supernode stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_limits_from_file_and_flags() {
        let f: EdgeFile =
            toml::from_str("l2_control = false\nflood_vm_pps = 10\nflood_edge_pps = 0").unwrap();
        let c = l2_config(&EdgeArgs::default(), &f).unwrap();
        assert!(!c.control);
        assert_eq!((c.vm_flood_pps, c.vm_flood_burst), (10, 20));
        assert_eq!(c.edge_flood_pps, 0);
        // Flags win; a burst of 0 with a rate would drop everything: refused.
        let a = EdgeArgs {
            flood_vm_pps: Some(50),
            flood_vm_burst: Some(0),
            ..EdgeArgs::default()
        };
        let e = l2_config(&a, &f).unwrap_err().to_string();
        assert!(e.contains("--flood-vm-burst"), "{e}");
        let d = l2_config(&EdgeArgs::default(), &EdgeFile::default()).unwrap();
        assert!(d.control);
        assert_eq!((d.vm_flood_pps, d.edge_flood_pps), (100, 2000));
        assert_eq!(d.edge_flood_bytes, 2_000_000);
        let k = l2_config(
            &EdgeArgs {
                flood_edge_kbps: Some(80),
                ..EdgeArgs::default()
            },
            &f,
        )
        .unwrap();
        assert_eq!(
            (k.edge_flood_bytes, k.edge_flood_byte_burst),
            (10_000, 65_536)
        );
        assert_eq!((d.dhcp_reply_pps, d.dhcp_reply_burst), (1000, 2000));
        let f: EdgeFile = toml::from_str("dhcp_reply_pps = 50").unwrap();
        let r = l2_config(&EdgeArgs::default(), &f).unwrap();
        assert_eq!((r.dhcp_reply_pps, r.dhcp_reply_burst), (50, 100));
        assert_eq!(parse_on_off("off"), Ok(false));
        assert!(parse_on_off("maybe").is_err());
    }

    #[test]
    fn secret_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        std::fs::write(&p, "x").unwrap();
        for (mode, ok) in [(0o644, false), (0o604, false), (0o640, true), (0o600, true)] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            let r = refuse_if_others_can_read(&p, "secret file");
            assert_eq!(r.is_ok(), ok, "mode {mode:o}: {r:?}");
        }
        let e = refuse_if_others_can_read(&d.path().join("missing"), "secret file").unwrap_err();
        assert!(e.to_string().contains("cannot read secret file"), "{e}");
    }

    #[test]
    fn edge_config_file_parses_and_rejects_unknown_keys() {
        let f: EdgeFile = toml::from_str(
            r#"
            name = "site-b"
            community = "lab"
            secret_file = "/etc/mvc/secret"
            supernodes = ["198.18.0.1:7654", "198.18.0.5:7654@0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"]
            tap = "mvc0"
            create_tap = true
            mtu = 1500
            cipher = "chacha20-poly1305"
            datapath = "auto"
            underlay_mtu = 1400
            xdp_gso = false
            "#,
        )
        .unwrap();
        let sns = f.supernodes.unwrap();
        assert_eq!(sns.len(), 2);
        assert_eq!(sns[0].key, None);
        assert_eq!(sns[1].key.unwrap()[..2], [0x01, 0x23]);
        assert!(toml::from_str::<EdgeFile>("supernodes = [\"198.18.0.1:7654@abc\"]").is_err());
        assert_eq!(f.cipher, Some(Cipher::Chacha20Poly1305));
        assert_eq!(f.datapath, Some(Datapath::Auto));
        assert_eq!(f.xdp_gso, Some(false));
        assert!(toml::from_str::<EdgeFile>("nmae = \"x\"").is_err());
        let s: SnFile = toml::from_str(
            "listen = \"0.0.0.0:7654\"\nedge_timeout = 10\nkey_file = \"/var/lib/mvc/sn.key\"",
        )
        .unwrap();
        assert_eq!(s.edge_timeout, Some(10));
        assert!(s.key_file.is_some());
    }

    #[test]
    fn xdp_is_refused_with_a_clear_message() {
        let a = EdgeArgs {
            name: Some("a".into()),
            community: Some("c".into()),
            secret: Some("s".into()),
            supernodes: vec!["198.18.0.1:7654".parse().unwrap()],
            tap: Some("mvcx0".into()),
            datapath: Some(Datapath::Xdp),
            ..EdgeArgs::default()
        };
        // Not a bridge: refused with the reason, nothing created.
        let a = EdgeArgs {
            bridge: Some("mvc-no-such-br".into()),
            ..a
        };
        let e = run_edge(a).unwrap_err().to_string();
        assert!(e.contains("--datapath xdp"), "{e}");
    }
}
