//! `mvc doctor`: checks this host before the edge, supernode or agent start on it, and
//! says what to fix.
//!
//! Required checks (a failure makes the exit status 1): the TUN device, a bridge-capable
//! kernel, a packet filter tool (nft or iptables), and, when `--supernode` is given, one
//! cookie round trip of the overlay protocol with that supernode (a registration with no
//! cookie, which the supernode answers with one Cookie message and records nothing).
//! Advisory checks (warnings): io_uring (the edge falls back to a plain loop without it),
//! BTF for the XDP datapath (it falls back to TAP), and the underlay MTU towards the
//! supernode. With `--agents`, the clock of every site's agent in the controller's store
//! is compared with this host's (the agent's `info` reply carries its clock): a skew above
//! `--max-skew` warns, an agent that refuses the request for its timestamp (more than
//! [`control::auth::MAX_SKEW_SECS`] away) or cannot be asked fails.
use anyhow::Result;
use clap::Args;
use dataplane::wire::{self, Cookie, Register};
use ring::signature::KeyPair as _;
use serde::Serialize;
use std::net::{SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::Path;
use std::time::{Duration, Instant};

/// Options of `mvc doctor`.
#[derive(Args)]
pub struct DoctorArgs {
    /// Also check UDP reachability of this supernode (one cookie round trip of the overlay
    /// protocol) and the underlay MTU towards it. `@KEY` is accepted and ignored.
    #[arg(long, value_name = "ADDR:PORT[@KEY]")]
    supernode: Option<String>,
    /// Seconds to wait for the supernode's answer (three tries share it).
    #[arg(long, default_value_t = 3.0, value_parser = timeout_secs)]
    timeout: f64,
    /// Print the results as JSON.
    #[arg(long)]
    json: bool,
    /// Also compare this host's clock with every site's agent in the controller's store.
    #[arg(long)]
    agents: bool,
    /// Clock skew (seconds) above which `--agents` warns.
    #[arg(long, default_value_t = 5.0, value_parser = timeout_secs)]
    max_skew: f64,
    /// Controller database (for `--agents`).
    #[arg(long, env = "MVC_DB", default_value = "/var/lib/mvc/controller.db")]
    db: std::path::PathBuf,
    /// Your Ed25519 key (for `--agents`) [default: ~/.config/mvc/user.key].
    #[arg(long, env = "MVC_KEY")]
    key: Option<std::path::PathBuf>,
}

fn timeout_secs(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if (0.1..=60.0).contains(&v) => Ok(v),
        _ => Err(format!("{s:?} is not a number of seconds in 0.1..=60")),
    }
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "lowercase")]
enum Status {
    Ok,
    Warn,
    Fail,
}

#[derive(Serialize, Debug)]
struct Check {
    name: String,
    status: Status,
    detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

impl Check {
    fn ok(name: impl Into<String>, detail: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            status: Status::Ok,
            detail: detail.into(),
            fix: None,
        }
    }
    fn bad(name: impl Into<String>, status: Status, detail: impl Into<String>, fix: &str) -> Self {
        Self {
            name: name.into(),
            status,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Runs every check, prints them, and exits with status 1 when a required one failed.
pub fn run(a: DoctorArgs) -> Result<()> {
    let mut checks = vec![
        check_tun(Path::new("/dev/net/tun")),
        check_io_uring(),
        check_btf(),
        check_bridge(),
        check_packet_filter(),
    ];
    if let Some(sn) = &a.supernode {
        let addr_part = sn.split_once('@').map_or(sn.as_str(), |(a, _)| a);
        match addr_part.to_socket_addrs().map(|mut i| i.next()) {
            Ok(Some(addr)) => {
                checks.push(check_supernode(addr, Duration::from_secs_f64(a.timeout)));
                checks.push(check_mtu(addr));
            }
            Ok(None) | Err(_) => checks.push(Check::bad(
                "supernode",
                Status::Fail,
                format!("{addr_part:?} does not resolve to an address"),
                "give --supernode ADDR:PORT (as in the edge's supernodes list)",
            )),
        }
    }
    if a.agents {
        checks.extend(check_agent_clocks(&a)?);
    }
    let failed = checks.iter().filter(|c| c.status == Status::Fail).count();
    if a.json {
        let v = serde_json::json!({ "ok": failed == 0, "checks": checks });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        for c in &checks {
            let tag = match c.status {
                Status::Ok => "ok  ",
                Status::Warn => "warn",
                Status::Fail => "FAIL",
            };
            println!("{tag}  {:<14} {}", c.name, c.detail);
            if let Some(f) = &c.fix {
                println!("      {:<14} fix: {f}", "");
            }
        }
    }
    if failed > 0 {
        // The report is the answer (JSON included): no second error object on stdout.
        eprintln!("error: {failed} required check(s) failed");
        std::io::Write::flush(&mut std::io::stdout())?;
        std::process::exit(1);
    }
    Ok(())
}

fn check_tun(dev: &Path) -> Check {
    match std::fs::OpenOptions::new().read(true).write(true).open(dev) {
        Ok(_) => Check::ok("tun", format!("{} opens read-write", dev.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Check::bad(
            "tun",
            Status::Fail,
            format!("{} is missing", dev.display()),
            "modprobe tun; in a container, pass the device in (docker --device /dev/net/tun, \
             lxc.cgroup2.devices.allow = c 10:200 rwm)",
        ),
        Err(e) => Check::bad(
            "tun",
            Status::Fail,
            format!("cannot open {}: {e}", dev.display()),
            "run as root or with CAP_NET_ADMIN, and check the device's mode (crw-rw-rw-) and \
             the unit's DeviceAllow=",
        ),
    }
}

fn check_io_uring() -> Check {
    let fix = "sysctl kernel.io_uring_disabled=0 (the edge falls back to a slower loop)";
    match std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled") {
        Ok(s) => match s.trim() {
            "0" => Check::ok("io_uring", "enabled (kernel.io_uring_disabled = 0)"),
            v => Check::bad(
                "io_uring",
                Status::Warn,
                format!("kernel.io_uring_disabled = {v}"),
                fix,
            ),
        },
        // Kernels before 6.6 have no switch: io_uring is there from 5.1 unless compiled out.
        Err(_) => match kernel_version() {
            Some((maj, min)) if (maj, min) >= (5, 6) => Check::ok(
                "io_uring",
                format!("kernel {maj}.{min} (no io_uring_disabled switch)"),
            ),
            v => Check::bad(
                "io_uring",
                Status::Warn,
                format!("kernel {v:?} is older than 5.6"),
                "a 5.6 or newer kernel (the edge falls back to a slower loop)",
            ),
        },
    }
}

fn kernel_version() -> Option<(u32, u32)> {
    let s = std::fs::read_to_string("/proc/sys/kernel/osrelease").ok()?;
    let mut it = s.trim().split(['.', '-']);
    Some((it.next()?.parse().ok()?, it.next()?.parse().ok()?))
}

fn check_btf() -> Check {
    let p = Path::new("/sys/kernel/btf/vmlinux");
    if p.exists() {
        Check::ok(
            "xdp-btf",
            format!("{} present (XDP datapath possible)", p.display()),
        )
    } else {
        Check::bad(
            "xdp-btf",
            Status::Warn,
            format!("{} is missing: the edge uses TAP, not XDP", p.display()),
            "a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's is) for datapath = \"xdp\"",
        )
    }
}

fn check_bridge() -> Check {
    if Path::new("/sys/module/bridge").exists() {
        return Check::ok("bridge", "bridge module loaded");
    }
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let dir = Path::new("/lib/modules")
        .join(release.trim())
        .join("kernel/net/bridge");
    let has_module = std::fs::read_dir(&dir).is_ok_and(|mut d| {
        d.any(|e| e.is_ok_and(|e| e.file_name().to_string_lossy().starts_with("bridge.ko")))
    });
    if has_module {
        Check::ok("bridge", "bridge module available (loaded on first use)")
    } else {
        Check::bad(
            "bridge",
            Status::Fail,
            "no bridge module loaded or installed",
            "modprobe bridge (package linux-image-*), or load it on the container's host",
        )
    }
}

fn check_packet_filter() -> Check {
    for tool in ["nft", "iptables"] {
        if let Some(p) = find_in_path(tool) {
            return Check::ok("packet-filter", format!("{tool} at {}", p.display()));
        }
    }
    Check::bad(
        "packet-filter",
        Status::Fail,
        "neither nft nor iptables is installed",
        "apt install nftables (or iptables)",
    )
}

fn find_in_path(tool: &str) -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_else(|| "/usr/sbin:/usr/bin:/sbin:/bin".into());
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// One registration without a cookie, answered by one Cookie message that names our edge
/// id and sequence number. Proves that UDP reaches the supernode and comes back.
fn check_supernode(addr: SocketAddr, timeout: Duration) -> Check {
    match cookie_round_trip(addr, timeout) {
        Ok(rtt) => Check::ok(
            "supernode",
            format!(
                "{addr} answered a registration with a cookie in {:.1} ms",
                rtt.as_secs_f64() * 1e3
            ),
        ),
        Err(e) => Check::bad(
            "supernode",
            Status::Fail,
            format!("{addr}: {e}"),
            "check that mvc-supernode runs there, that its UDP port is open in its firewall \
             (and in any cloud security group), and that this host may send UDP out",
        ),
    }
}

fn cookie_round_trip(addr: SocketAddr, timeout: Duration) -> Result<Duration, String> {
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .map_err(|_| "cannot make a key".to_string())?;
    let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .map_err(|_| "cannot make a key".to_string())?;
    let mut edge_key = [0u8; wire::EDGE_KEY_LEN];
    edge_key.copy_from_slice(kp.public_key().as_ref());
    let digest = ring::digest::digest(&ring::digest::SHA256, &edge_key);
    let edge_id = &digest.as_ref()[..wire::EDGE_ID_LEN];
    let seq = 1;
    let reg = Register {
        cookie: [0; wire::COOKIE_LEN],
        community: [0; wire::COMMUNITY_ID_LEN],
        edge_key,
        seq,
        known: wire::NO_LIST,
        name: "mvc-doctor".into(),
        local_addrs: Vec::new(),
    };
    let mut buf = [0u8; 512];
    let n = reg
        .encode_unsigned(&mut buf)
        .map_err(|e| format!("encode: {e}"))?;
    let sig = kp.sign(&buf[..n]);
    buf[n..n + wire::SIG_LEN].copy_from_slice(sig.as_ref());
    let msg = &buf[..n + wire::SIG_LEN];

    let bind: SocketAddr = if addr.is_ipv4() {
        "0.0.0.0:0".parse().expect("literal")
    } else {
        "[::]:0".parse().expect("literal")
    };
    let sock = UdpSocket::bind(bind).map_err(|e| format!("bind: {e}"))?;
    sock.connect(addr).map_err(|e| format!("connect: {e}"))?;
    let tries = 3;
    let per_try = timeout / tries;
    let mut rx = [0u8; 2048];
    for _ in 0..tries {
        let sent = Instant::now();
        sock.send(msg).map_err(|e| format!("send: {e}"))?;
        let deadline = sent + per_try;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left))
                .map_err(|e| format!("socket: {e}"))?;
            match sock.recv(&mut rx) {
                Ok(len) => match Cookie::decode(&rx[..len]) {
                    Ok(c) if c.edge == edge_id && c.seq == seq => return Ok(sent.elapsed()),
                    // Anything else (a stale answer, another protocol) is ignored.
                    _ => continue,
                },
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err("port closed (ICMP port unreachable): nothing listens".into())
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(format!("receive: {e}")),
            }
        }
    }
    Err(format!(
        "no answer to {tries} registrations in {:.1} s (UDP blocked, or not an mvc {} \
         supernode)",
        timeout.as_secs_f64(),
        wire::VERSION
    ))
}

/// The MTU of the route towards the supernode: the cached path MTU when the kernel has
/// learnt one, else the outgoing interface's.
fn check_mtu(addr: SocketAddr) -> Check {
    let out = std::process::Command::new("ip")
        .args(["route", "get", &addr.ip().to_string()])
        .output();
    let text = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).into_owned(),
        Ok(o) => {
            return Check::bad(
                "underlay-mtu",
                Status::Warn,
                format!(
                    "no route to {}: {}",
                    addr.ip(),
                    String::from_utf8_lossy(&o.stderr).trim()
                ),
                "add a default route or a route to the supernode",
            )
        }
        Err(e) => {
            return Check::bad(
                "underlay-mtu",
                Status::Warn,
                format!("cannot run ip route get: {e}"),
                "apt install iproute2",
            )
        }
    };
    let (dev, mtu) = parse_route(&text);
    let mtu = mtu.or_else(|| {
        let d = dev.as_deref()?;
        std::fs::read_to_string(format!("/sys/class/net/{d}/mtu"))
            .ok()?
            .trim()
            .parse()
            .ok()
    });
    let dev = dev.unwrap_or_else(|| "?".into());
    match mtu {
        Some(m) if m >= 1500 => Check::ok("underlay-mtu", format!("{m} via {dev}")),
        Some(m) => Check::bad(
            "underlay-mtu",
            Status::Warn,
            format!("{m} via {dev}, below 1500"),
            &format!("set underlay_mtu = {m} in /etc/mvc/edge-*.toml"),
        ),
        None => Check::bad(
            "underlay-mtu",
            Status::Warn,
            format!("unknown for {dev}"),
            "set underlay_mtu in /etc/mvc/edge-*.toml to the path MTU",
        ),
    }
}

/// Unix time in seconds, fractional.
fn unix_secs_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// The agent's clock minus ours, in seconds: its whole-second clock against the middle
/// of the request's round trip. It can be off by up to 1 s plus half the round trip.
fn skew_secs(agent_clock: u64, sent: f64, received: f64) -> f64 {
    // The agent's second began up to 1 s before it answered: its middle is the estimate.
    agent_clock as f64 + 0.5 - (sent + received) / 2.0
}

/// One check per site of the controller's store: `clock-<site>`.
fn check_agent_clocks(a: &DoctorArgs) -> Result<Vec<Check>> {
    use control::client::AgentClient;
    use control::proto::{InfoData, Request};
    use control::store::Store as _;
    if !a.db.exists() {
        anyhow::bail!(
            "--agents: no controller database at {} (give --db)",
            a.db.display()
        );
    }
    let key = crate::load_user_key(&a.key)?;
    let store = crate::open_store(&a.db)?;
    let sites = store.sites()?;
    let name = |s: &str| format!("clock-{s}");
    let fix_sync = "run a time service on every frontend (chrony or systemd-timesyncd) \
                    against the same servers";
    let mut out = Vec::new();
    for site in &sites {
        let sent = unix_secs_f64();
        let reply =
            AgentClient::connect(site, &key).and_then(|mut c| c.call::<InfoData>(&Request::Info));
        let received = unix_secs_f64();
        out.push(match reply {
            Ok(InfoData {
                clock: Some(clock), ..
            }) => {
                let skew = skew_secs(clock, sent, received);
                let detail = format!(
                    "agent {} is {skew:+.1} s from this host (round trip {:.0} ms)",
                    site.agent_addr,
                    (received - sent) * 1e3
                );
                if skew.abs() > a.max_skew {
                    Check::bad(name(&site.name), Status::Warn, detail, fix_sync)
                } else {
                    Check::ok(name(&site.name), detail)
                }
            }
            Ok(_) => Check::bad(
                name(&site.name),
                Status::Warn,
                format!("agent {} does not report its clock", site.agent_addr),
                "upgrade mvc at that site",
            ),
            Err(e) => {
                let msg = e.to_string();
                let skewed = msg.contains("away from the agent clock");
                Check::bad(
                    name(&site.name),
                    Status::Fail,
                    format!("agent {}: {msg}", site.agent_addr),
                    if skewed {
                        fix_sync
                    } else {
                        "check that the agent runs (systemctl status mvc-agent) and that \
                         its TCP port is reachable from here"
                    },
                )
            }
        });
    }
    if sites.is_empty() {
        out.push(Check::bad(
            "clock",
            Status::Warn,
            format!("no sites in {}", a.db.display()),
            "mvc site add ...",
        ));
    }
    Ok(out)
}

/// `dev NAME` and `mtu N` of an `ip route get` answer.
fn parse_route(text: &str) -> (Option<String>, Option<u32>) {
    let words: Vec<&str> = text.split_whitespace().collect();
    let after = |k: &str| {
        words
            .windows(2)
            .find(|w| w[0] == k)
            .map(|w| w[1].to_string())
    };
    (after("dev"), after("mtu").and_then(|m| m.parse().ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_answer_parses() {
        let t = "198.18.0.1 dev eth0 src 198.18.0.2 uid 0 \n    cache mtu 1400 \n";
        assert_eq!(parse_route(t), (Some("eth0".into()), Some(1400)));
        assert_eq!(
            parse_route("local 127.0.0.1 dev lo"),
            (Some("lo".into()), None)
        );
    }

    #[test]
    fn skew_is_the_agent_second_against_the_round_trip_middle() {
        // Sent at 100.0, answered at 100.2, agent said 100: its clock read 100.x.
        assert!((skew_secs(100, 100.0, 100.2) - 0.4).abs() < 1e-9);
        assert!((skew_secs(90, 100.0, 100.2) + 9.6).abs() < 1e-9);
        assert!((skew_secs(110, 100.0, 100.2) - 10.4).abs() < 1e-9);
    }

    #[test]
    fn missing_tun_device_fails_with_a_fix() {
        let c = check_tun(Path::new("/nonexistent/tun"));
        assert_eq!(c.status, Status::Fail);
        assert!(c.fix.unwrap().contains("modprobe tun"));
    }
}
