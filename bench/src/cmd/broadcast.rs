//! `bench broadcast`: what a cluster build floods across the WAN. Three sites with N VMs
//! each, joined by mvc with the L2 control plane on or off, or by n2n 1.3.1 on the same
//! layout. Rounds:
//!
//! 1. `meet`: every VM pings every other VM once (each VM's pings in parallel, one VM
//!    after the other: the ARP traffic of nodes meeting each other);
//! 2. `meet-again`: the same after every VM's ARP cache is flushed (nodes that meet again
//!    later);
//! 3. `dhcp-storm`: every VM asks a DHCP server (dnsmasq in site A's first VM) for a lease
//!    at the same moment (DISCOVER, OFFER, REQUEST, ACK, broadcast flag set);
//! 4. `mpi`: an MPI job over every VM, one rank each (the demo's program: an allreduce of
//!    the ranks, with mpi4py; OpenMPI over TCP on the overlay).
//!
//! Per site and round: the bytes and packets the site's frontend sent on its WAN uplink
//! (everything the overlay sent: floods, unicast, control), and for mvc the frames and
//! bytes its edge flooded (`flooded_frames`, `flooded_wan_bytes`), ARP requests flooded
//! and answered locally, plus the pings answered and leases obtained. Then, for mvc, the
//! time until a VM is reachable again (pings 0.1 s apart) after its edge restarts, and
//! after it moves to another site carrying on with its own traffic (no gratuitous ARP).

use std::net::SocketAddrV4;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use lab::overlay::{EdgeOpts, Mvc, MvcCluster, N2n, COMMUNITY, EDGE_PORT, SECRET, SUPERNODE_PORT};
use lab::{dhcp, Lab, Proc, Topology};
use serde::Serialize;
use serde_json::Value;

use super::apps;
use super::{find_mvc, utc_now, write_json, Machine};

/// Options of `bench broadcast`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mvc binary (default: next to this one).
    #[arg(long, value_name = "PATH")]
    pub mvc: Option<PathBuf>,
    /// VMs per site, one run each (comma-separated, each 2..=64; 64 makes 192 VM
    /// namespaces).
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    pub vms: Vec<u8>,
    /// Overlays to compare: `on` and `off` (mvc with the L2 control plane on or off),
    /// `n2n` (n2n 1.3.1).
    #[arg(long, value_delimiter = ',', default_value = "on,off,n2n")]
    pub control: Vec<String>,
    /// Run the `meet-again` round (with 64 VMs per site each `meet` round takes tens of
    /// minutes).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub again: bool,
    /// Run the DHCP storm round.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub dhcp: bool,
    /// Run the MPI round (needs OpenMPI and python3-mpi4py).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub mpi: bool,
    /// Measure the time to reachability after an edge restart and a move (mvc only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub recovery: bool,
    /// Where the JSON result goes.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
}

/// One site in one round.
#[derive(Debug, Serialize)]
struct SiteRound {
    site: String,
    /// Sent on the site frontend's WAN uplink during the round.
    wan_tx_packets: u64,
    wan_tx_bytes: u64,
    /// mvc's counters (none for n2n).
    flooded_frames: Option<u64>,
    flooded_wan_bytes: Option<u64>,
    arp_requests_flooded: Option<u64>,
    arp_answered_locally: Option<u64>,
    /// Pings sent and answered, or leases asked for and obtained.
    tries: u32,
    ok: u32,
}

#[derive(Debug, Serialize)]
struct Round {
    name: String,
    seconds: f64,
    sites: Vec<SiteRound>,
}

/// One configuration: VMs per site, overlay.
#[derive(Debug, Serialize)]
struct Run {
    vms_per_site: u8,
    /// `on`, `off` (mvc's L2 control plane) or `n2n`.
    control: String,
    rounds: Vec<Round>,
    /// Seconds from a restarted edge's start to the first answered ping to a VM behind it.
    restart_reachable_s: Option<f64>,
    /// Seconds from a VM's move to the first answered ping to it from a third site.
    move_reachable_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    started: String,
    machine: Machine,
    runs: Vec<Run>,
}

/// Longest an edge's status snapshot lags behind (its loop wakes at least every 2 s).
const SNAPSHOT_WAIT: Duration = Duration::from_millis(2500);

const COUNTERS: [&str; 4] = [
    "flooded_frames",
    "flooded_wan_bytes",
    "arp_requests_flooded",
    "arp_answered_locally",
];

/// The counters of one site: WAN uplink (tx packets, tx bytes), then mvc's.
fn counters(
    mvc: &Mvc,
    lab: &Lab,
    c: Option<&MvcCluster>,
    s: &lab::Site,
) -> anyhow::Result<[Option<u64>; 6]> {
    let mut v = [None; 6];
    v[0] = Some(lab.if_counter(&s.frontend, "eth0", "tx_packets")?);
    v[1] = Some(lab.if_counter(&s.frontend, "eth0", "tx_bytes")?);
    if let Some(c) = c {
        let st: Value = mvc.edge_status(lab, c.edge(&s.name))?;
        for (i, k) in COUNTERS.iter().enumerate() {
            let n = st
                .get(k)
                .or_else(|| st["l2"].get(k))
                .and_then(Value::as_u64)
                .with_context(|| format!("edge {}: no {k} in its status", s.name))?;
            v[2 + i] = Some(n);
        }
    }
    Ok(v)
}

/// Every VM of the topology pings every other one once; returns (sent, answered) per site
/// of the pinging VM.
fn ping_all(lab: &Lab, t: &Topology) -> anyhow::Result<Vec<(u32, u32)>> {
    let all: Vec<String> = t
        .sites
        .iter()
        .flat_map(|s| s.vms.iter().map(|v| v.ip.to_string()))
        .collect();
    let mut per_site = Vec::new();
    for s in &t.sites {
        let (mut sent, mut ok) = (0u32, 0u32);
        for v in &s.vms {
            let me = v.ip.to_string();
            let targets: Vec<&String> = all.iter().filter(|ip| **ip != me).collect();
            let script = format!(
                "for ip in {}; do (ping -n -q -c 1 -W 3 $ip >/dev/null && echo ok) & done; wait",
                targets
                    .iter()
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(" ")
            );
            let o = lab.exec_timeout(&v.ns, &["sh", "-c", &script], Duration::from_secs(60))?;
            sent += targets.len() as u32;
            ok += o.stdout.lines().filter(|l| l.trim() == "ok").count() as u32;
        }
        per_site.push((sent, ok));
    }
    Ok(per_site)
}

/// Starts dnsmasq in site A's first VM (addresses 198.19.200.10 to 198.19.203.250).
fn start_dnsmasq(lab: &Lab, t: &Topology) -> anyhow::Result<Proc> {
    let va = &t.sites[0].vms[0];
    let leases = lab.dir().join("dnsmasq.leases");
    let pid = lab.dir().join("dnsmasq.pid");
    let p = lab.spawn(
        &va.ns,
        "dnsmasq",
        &[
            "dnsmasq",
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--port=0",
            "--user=root",
            "--interface=eth0",
            "--except-interface=lo",
            "--bind-interfaces",
            "--dhcp-range=198.19.200.10,198.19.203.250,255.255.0.0,10m",
            "--dhcp-lease-max=2000",
            // No ping before an offer: dnsmasq checks one address at a time, which would
            // measure its own pacing, not the overlay's.
            "--no-ping",
            &format!("--dhcp-leasefile={}", leases.display()),
            &format!("--pid-file={}", pid.display()),
            "--log-facility=-",
        ],
    )?;
    lab.wait_until("dnsmasq listening", Duration::from_secs(5), || {
        lab.exec(&va.ns, &["ss", "-Hlun", "sport = :67"])
            .is_ok_and(|o| !o.stdout.trim().is_empty())
    })?;
    Ok(p)
}

/// Every VM but the server asks for a lease at the same moment; (asked, obtained) per site.
fn dhcp_storm(lab: &Lab, t: &Topology) -> Vec<(u32, u32)> {
    let server = &t.sites[0].vms[0].ns;
    std::thread::scope(|sc| {
        let per_site: Vec<Vec<_>> = t
            .sites
            .iter()
            .map(|s| {
                s.vms
                    .iter()
                    .filter(|v| &v.ns != server)
                    .map(|v| {
                        sc.spawn(move || {
                            let r = lab.in_ns(&v.ns, || {
                                dhcp::obtain_lease("eth0", &v.mac, Duration::from_secs(20))
                            });
                            match r {
                                Ok(Ok(_)) => true,
                                Ok(Err(e)) => {
                                    eprintln!("{}: no lease: {e}", v.ns);
                                    false
                                }
                                Err(e) => {
                                    eprintln!("{}: {e}", v.ns);
                                    false
                                }
                            }
                        })
                    })
                    .collect()
            })
            .collect();
        per_site
            .into_iter()
            .map(|hs| {
                let n = hs.len() as u32;
                let ok = hs
                    .into_iter()
                    .map(|h| h.join().unwrap_or(false))
                    .filter(|ok| *ok)
                    .count() as u32;
                (n, ok)
            })
            .collect()
    })
}

/// The MPI job: every rank reports its node, an allreduce sums the ranks.
const MPI_PROGRAM: &str = r#"from mpi4py import MPI
import socket
c = MPI.COMM_WORLD
total = c.allreduce(c.Get_rank(), op=MPI.SUM)
names = c.gather(socket.gethostname(), root=0)
if c.Get_rank() == 0:
    n = c.Get_size()
    print("mpi: %d ranks on %s" % (n, ",".join(names)))
    print("mpi: allreduce(sum of ranks) = %d (expected %d)" % (total, n * (n - 1) // 2))
"#;

/// [`MPI_PROGRAM`] under mpirun over every VM (placed round-robin over the sites), from
/// site A's first VM; (ranks, ranks when the sum came out right) per site.
fn mpi_job(lab: &Lab, t: &Topology) -> anyhow::Result<Vec<(u32, u32)>> {
    // OpenMPI announces every address of the interface it is told to use, and the VMs'
    // routed underlay addresses (on the same interface) are not reachable behind NAT:
    // they go, so the job runs on the overlay alone.
    for s in &t.sites {
        for v in &s.vms {
            let a = format!("{}/24", v.underlay_ip);
            lab.exec(&v.ns, &["ip", "addr", "del", &a, "dev", &v.ifname])?;
        }
    }
    let n: usize = t.sites.iter().map(|s| s.vms.len()).sum();
    let vms = apps::nodes(t, n)?;
    let launcher = apps::write_launcher(lab.dir(), &vms)?;
    let hostfile = lab.dir().join("mpi-hostfile");
    apps::write_hostfile(&hostfile, &vms, apps::Net::Mvc)?;
    let prog = lab.dir().join("allreduce.py");
    std::fs::write(&prog, MPI_PROGRAM)?;
    let p = prog.to_string_lossy().into_owned();
    let argv = apps::mpirun_argv(
        &vms,
        apps::Net::Mvc,
        &hostfile,
        &launcher,
        lab.dir(),
        &["/usr/bin/python3", &p],
    );
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let sum = n * n.saturating_sub(1) / 2;
    let want = format!("= {sum} (expected {sum})");
    let ok = match lab.exec_timeout(&vms[0].ns, &argv, Duration::from_secs(300)) {
        Ok(o) if o.stdout.contains(&want) => true,
        Ok(o) => {
            eprintln!("mpi job failed:\n{}{}", o.stdout, o.stderr);
            false
        }
        Err(e) => {
            eprintln!("mpi job failed: {e}");
            false
        }
    };
    Ok(t.sites
        .iter()
        .map(|s| {
            let k = s.vms.len() as u32;
            (k, if ok { k } else { 0 })
        })
        .collect())
}

/// Index of the first answered ping in `ping -c N -i 0.1` output.
fn first_answered(stdout: &str) -> Option<u32> {
    stdout
        .lines()
        .filter(|l| l.contains("bytes from"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("icmp_seq="))
                .and_then(|n| n.parse::<u32>().ok())
        })
}

/// Pings `dst` from `ns` 0.1 s apart (at most 10 s); seconds until the first answer.
fn time_to_answer(lab: &Lab, ns: &str, dst: &str) -> anyhow::Result<Option<f64>> {
    let out = lab.exec_timeout(
        ns,
        &["ping", "-n", "-c", "100", "-i", "0.1", "-W", "1", dst],
        Duration::from_secs(20),
    )?;
    Ok(first_answered(&out.stdout).map(|n| f64::from(n.saturating_sub(1)) / 10.0))
}

/// B's edge is killed and started again while B's first VM stays silent; A's first VM
/// pings it: seconds from the new edge's start to the first answer.
fn restart_time(
    lab: &Lab,
    t: &Topology,
    mvc: &Mvc,
    c: &mut MvcCluster,
    control: &str,
) -> anyhow::Result<Option<f64>> {
    let (a, b) = (&t.sites[0], &t.sites[1]);
    let old = c.edges.remove(&b.name).context("no edge b")?;
    lab.kill(&old.proc);
    let port = format!("sport = :{EDGE_PORT}");
    lab.wait_until("the old edge's port free", Duration::from_secs(10), || {
        lab.exec(&b.frontend, &["ss", "-Hlun", &port])
            .is_ok_and(|o| o.stdout.trim().is_empty())
    })?;
    let sn = SocketAddrV4::new(a.public_ip, SUPERNODE_PORT);
    let mut o = EdgeOpts::new(b, COMMUNITY, SECRET, &[sn]);
    o.extra = vec!["--l2-control".into(), control.into()];
    let e = mvc.edge(lab, b, &o)?;
    c.edges.insert(b.name.clone(), e);
    time_to_answer(lab, &a.vms[0].ns, &b.vms[0].ip.to_string())
}

/// B's last VM moves to C (its port goes to C's bridge) and carries on with its own
/// traffic, pings to B's first VM (no gratuitous ARP); A's first VM, whose edge had it
/// behind B and sees none of its traffic, pings it: seconds from the move to the first
/// answer.
fn move_time(lab: &Lab, t: &Topology) -> anyhow::Result<Option<f64>> {
    let (a, b, c) = (&t.sites[0], &t.sites[1], &t.sites[2]);
    let (vm, talker, watcher) = (b.vms.last().context("no VM")?, &b.vms[0], &a.vms[0]);
    lab::wait_ping(lab, &watcher.ns, vm.ip, Duration::from_secs(10))?;
    lab::wait_ping(lab, &vm.ns, talker.ip, Duration::from_secs(10))?;
    // Renamed: C has a port of that name.
    let port = "moved1";
    lab.ip(&b.frontend, &["link", "set", &vm.port, "down"])?;
    lab.ip(&b.frontend, &["link", "set", &vm.port, "name", port])?;
    lab.ip(&b.frontend, &["link", "set", port, "netns", &c.frontend])?;
    lab.ip(&c.frontend, &["link", "set", port, "master", &c.bridge])?;
    lab.ip(&c.frontend, &["link", "set", port, "up"])?;
    let own = lab.spawn(
        &vm.ns,
        "moved-vm-traffic",
        &[
            "ping",
            "-n",
            "-c",
            "150",
            "-i",
            "0.1",
            &talker.ip.to_string(),
        ],
    )?;
    let r = time_to_answer(lab, &watcher.ns, &vm.ip.to_string());
    lab.stop(&own);
    r
}

fn one_run(mvc: &Mvc, vms: u8, control: &str, args: &Args) -> anyhow::Result<Run> {
    let (with_dhcp, recovery) = (args.dhcp, args.recovery);
    let lab = Lab::new("bc")?;
    let t = Topology::three_sites(&lab, vms)?;
    let (mut cluster, n2n) = if control == "n2n" {
        (None, Some(N2n::start(&lab, &t)?))
    } else {
        let c = MvcCluster::start(&lab, &t, mvc, |o| {
            o.extra = vec!["--l2-control".into(), control.into()];
        })?;
        (Some(c), None)
    };
    // The overlay is up when the first VMs of every pair of sites reach each other.
    for x in &t.sites {
        for y in t.sites.iter().filter(|y| y.name != x.name) {
            lab::wait_ping(&lab, &x.vms[0].ns, y.vms[0].ip, Duration::from_secs(30))
                .with_context(|| format!("{} -> {}", x.name, y.name))?;
        }
    }
    let dnsmasq = if with_dhcp {
        Some(start_dnsmasq(&lab, &t)?)
    } else {
        None
    };
    // Let the warm-up's ARP settle (and the edges' status catch up).
    std::thread::sleep(SNAPSHOT_WAIT);
    let mut rounds = Vec::new();
    let mut names = vec!["meet"];
    if args.again {
        names.push("meet-again");
    }
    if with_dhcp {
        names.push("dhcp-storm");
    }
    if args.mpi {
        names.push("mpi");
    }
    for name in &names {
        if name.starts_with("meet") {
            for s in &t.sites {
                for v in &s.vms {
                    lab.exec(&v.ns, &["ip", "neigh", "flush", "all"])?;
                }
            }
        }
        let before: Vec<[Option<u64>; 6]> = t
            .sites
            .iter()
            .map(|s| counters(mvc, &lab, cluster.as_ref(), s))
            .collect::<anyhow::Result<_>>()?;
        let t0 = std::time::Instant::now();
        let tries = match *name {
            "dhcp-storm" => dhcp_storm(&lab, &t),
            "mpi" => mpi_job(&lab, &t)?,
            _ => ping_all(&lab, &t)?,
        };
        let seconds = t0.elapsed().as_secs_f64();
        // An edge's status is a snapshot its event loop publishes when it runs (every
        // 200 ms at most, and at least at its next timer): let it catch up.
        std::thread::sleep(SNAPSHOT_WAIT);
        let mut sites = Vec::new();
        for (i, s) in t.sites.iter().enumerate() {
            let after = counters(mvc, &lab, cluster.as_ref(), s)?;
            let d = |k: usize| after[k].zip(before[i][k]).map(|(a, b)| a.saturating_sub(b));
            sites.push(SiteRound {
                site: s.name.clone(),
                wan_tx_packets: d(0).unwrap_or(0),
                wan_tx_bytes: d(1).unwrap_or(0),
                flooded_frames: d(2),
                flooded_wan_bytes: d(3),
                arp_requests_flooded: d(4),
                arp_answered_locally: d(5),
                tries: tries[i].0,
                ok: tries[i].1,
            });
        }
        rounds.push(Round {
            name: (*name).into(),
            seconds,
            sites,
        });
    }
    if let Some(p) = dnsmasq {
        lab.stop(&p);
    }
    let (mut restart, mut moved) = (None, None);
    if recovery {
        if let Some(c) = cluster.as_mut() {
            // The move first: without the control plane, a restarted edge leaves its VMs
            // unreachable from some sites for a long time.
            moved = move_time(&lab, &t).unwrap_or_else(|e| {
                eprintln!("move: {e:#}");
                None
            });
            restart = restart_time(&lab, &t, mvc, c, control).unwrap_or_else(|e| {
                eprintln!("restart: {e:#}");
                None
            });
        }
    }
    if let Some(n) = n2n {
        n.stop(&lab, &t)?;
    }
    Ok(Run {
        vms_per_site: vms,
        control: control.into(),
        rounds,
        restart_reachable_s: restart,
        move_reachable_s: moved,
    })
}

/// `bench broadcast`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if !lab::is_root() {
        bail!("bench broadcast builds network namespaces: run it as root");
    }
    if args.vms.iter().any(|v| !(2..=64).contains(v)) {
        bail!("--vms: each must be 2..=64");
    }
    if let Some(c) = args
        .control
        .iter()
        .find(|c| !["on", "off", "n2n"].contains(&c.as_str()))
    {
        bail!("--control: {c:?} is not on, off or n2n");
    }
    let mvc = Mvc {
        bin: find_mvc(args.mvc.clone())?,
    };
    let (started, compact) = utc_now();
    let mut runs = Vec::new();
    println!(
        "{:>4} {:>7} {:>10} {:>4} {:>8} {:>11} {:>8} {:>11} {:>8} {:>8} {:>9}",
        "VMS",
        "CONTROL",
        "ROUND",
        "SITE",
        "WAN-PKTS",
        "WAN-BYTES",
        "FLOODED",
        "FLOOD-BYTES",
        "ARP-WAN",
        "ARP-HERE",
        "OK"
    );
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    for &vms in &args.vms {
        for control in &args.control {
            let r = one_run(&mvc, vms, control, args)?;
            for round in &r.rounds {
                for s in &round.sites {
                    println!(
                        "{:>4} {:>7} {:>10} {:>4} {:>8} {:>11} {:>8} {:>11} {:>8} {:>8} {:>5}/{}",
                        vms,
                        control,
                        round.name,
                        s.site,
                        s.wan_tx_packets,
                        s.wan_tx_bytes,
                        opt(s.flooded_frames),
                        opt(s.flooded_wan_bytes),
                        opt(s.arp_requests_flooded),
                        opt(s.arp_answered_locally),
                        s.ok,
                        s.tries
                    );
                }
            }
            if r.restart_reachable_s.is_some() || r.move_reachable_s.is_some() {
                println!(
                    "{vms:>4} {control:>7} reachable after an edge restart: {:?} s, after a move: {:?} s",
                    r.restart_reachable_s, r.move_reachable_s
                );
            }
            runs.push(r);
        }
    }
    let p = write_json(
        &args.out,
        &format!("broadcast-{compact}.json"),
        &Report {
            started,
            machine: Machine::probe(),
            runs,
        },
    )?;
    println!("written {}", p.display());
    Ok(())
}
