//! `bench broadcast`: what a cluster build floods across the WAN. Three sites with N VMs
//! each, joined by mvc with the L2 control plane on or off, or by n2n 1.3.1 on the same
//! layout. Rounds:
//!
//! 1. `meet`: every VM meets every other VM once, a TCP connection attempt to a closed
//!    port answered by a reset (each VM's attempts in parallel, one VM after the other:
//!    the ARP traffic and first round trips of nodes meeting each other);
//! 2. `meet-again`: the same after every VM's ARP cache is flushed (nodes that meet again
//!    later);
//! 3. `dhcp-storm`: every VM asks the cluster's one DHCP server (dnsmasq in site A's first
//!    VM) for a lease at the same moment (DISCOVER, OFFER, REQUEST, ACK, broadcast flag
//!    set), each giving up after 20 s;
//! 4. `mpi`: an MPI job, one rank per VM on `--mpi-ranks` VMs placed round-robin over the
//!    sites (48 by default, the same job at every VM count; the demo's program: an
//!    allreduce of the ranks, with mpi4py; OpenMPI over TCP on the overlay).
//!
//! Per site and round: the bytes and packets the site's frontend sent on its WAN uplink
//! (everything the overlay sent: floods, unicast, control), and for mvc the frames and
//! bytes its edge flooded (`flooded_frames`, `flooded_wan_bytes`), ARP requests flooded
//! and answered locally, plus the meetings answered and leases obtained. Then a storm:
//! one VM at site A sends broadcasts as fast as it can while two others ping and stream
//! to site B (with the same pings and stream just before as the reference). Then, for
//! mvc, the time until a VM is reachable again (pings 0.1 s apart) after its edge
//! restarts, and after it moves to another site carrying on with its own traffic (no
//! gratuitous ARP).

use std::net::{Ipv4Addr, SocketAddrV4, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::overlay::{EdgeOpts, Mvc, MvcCluster, N2n, COMMUNITY, EDGE_PORT, SECRET, SUPERNODE_PORT};
use lab::{dhcp, Lab, Proc, Topology};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::apps;
use super::figure::{self, Panel};
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
    /// The DHCP server gives every VM its own address (a hosts file, as a cluster's
    /// frontend does for the nodes it knows); `false`: one dynamic pool, where dnsmasq
    /// offers the same address to many clients at once and refuses all but the first
    /// (NAKs, counted per site).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub dhcp_fixed: bool,
    /// Run the MPI round (needs OpenMPI and python3-mpi4py).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub mpi: bool,
    /// Ranks of the MPI job, one per VM, placed round-robin over the sites (at most every
    /// VM; 0: every VM). 192 ranks, one per VM namespace, do not finish on a 2-core machine
    /// (docs/BENCH.md), so the default is the same 48-rank job at every VM count.
    #[arg(long, default_value_t = 48)]
    pub mpi_ranks: usize,
    /// Measure the time to reachability after an edge restart and a move (mvc only).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub recovery: bool,
    /// The storm: one VM floods broadcasts while others ping and stream (needs 3 VMs per
    /// site).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub storm: bool,
    /// Earlier result files whose runs join this one's JSON and figure.
    #[arg(long, value_delimiter = ',', value_name = "JSON")]
    pub also: Vec<PathBuf>,
    /// Run nothing: print the runs of `--also` and draw their figure
    /// (`<out>/broadcast-figure.svg`).
    #[arg(long)]
    pub draw: bool,
    /// Where the JSON result goes.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
}

/// One site in one round.
#[derive(Debug, Serialize, Deserialize)]
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
    /// DHCP storm: DISCOVERs the site's clients sent and NAKs they got (leases obtained
    /// only).
    #[serde(default)]
    dhcp_discovers: Option<u32>,
    #[serde(default)]
    dhcp_naks: Option<u32>,
}

#[derive(Debug, Serialize, Deserialize)]
struct Round {
    name: String,
    seconds: f64,
    sites: Vec<SiteRound>,
}

/// One VM's broadcast storm, and the other VMs' traffic during it and just before.
#[derive(Debug, Serialize, Deserialize)]
struct Storm {
    /// Broadcast datagrams the storming VM sent.
    datagrams: u64,
    seconds: f64,
    /// Site A's WAN uplink during the storm (the iperf3 stream included).
    wan_tx_packets: u64,
    wan_tx_bytes: u64,
    /// Frames and bytes A's edge flooded (mvc): the storm's share of the WAN.
    flooded_frames: Option<u64>,
    flooded_wan_bytes: Option<u64>,
    /// Another VM's pings to site B during the storm, and before it.
    ping_sent: u32,
    ping_received: u32,
    ref_ping_sent: u32,
    ref_ping_received: u32,
    /// A third VM's iperf3 to site B during the storm, and before it (Mbit/s).
    mbps: f64,
    ref_mbps: f64,
}

/// One configuration: VMs per site, overlay.
#[derive(Debug, Serialize, Deserialize)]
struct Run {
    vms_per_site: u8,
    /// `on`, `off` (mvc's L2 control plane) or `n2n`.
    control: String,
    /// Seconds from the start to the overlay up between every pair of sites.
    #[serde(default)]
    setup_s: Option<f64>,
    /// Load average (1, 5, 15 min) at the end of the run.
    #[serde(default)]
    load: Option<[f64; 3]>,
    rounds: Vec<Round>,
    #[serde(default)]
    storm: Option<Storm>,
    /// Seconds from a restarted edge's start to the first answered ping to a VM behind it.
    restart_reachable_s: Option<f64>,
    /// Seconds from a VM's move to the first answered ping to it from a third site.
    move_reachable_s: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Report<'a> {
    started: String,
    machine: Machine,
    runs: &'a [Run],
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

/// Every VM of the topology meets every other one once: a TCP connection attempt to a
/// closed port, answered by a reset (the ARP and one round trip of a first contact, for a
/// thread instead of a ping process each: 192 VMs make 36,672 of them). Each VM's
/// attempts run in parallel, VMs one after the other; returns (tried, answered) per site
/// of the VM that tried.
fn meet_all(lab: &Lab, t: &Topology) -> anyhow::Result<Vec<(u32, u32)>> {
    let all: Vec<Ipv4Addr> = t
        .sites
        .iter()
        .flat_map(|s| s.vms.iter().map(|v| v.ip))
        .collect();
    let mut per_site = Vec::new();
    for s in &t.sites {
        let (mut tried, mut ok) = (0u32, 0u32);
        for v in &s.vms {
            let targets: Vec<Ipv4Addr> = all.iter().copied().filter(|ip| *ip != v.ip).collect();
            // Threads spawned in the namespace's thread are in the namespace too.
            let answered = lab.in_ns(&v.ns, || {
                std::thread::scope(|sc| {
                    let hs: Vec<_> = targets
                        .iter()
                        .map(|ip| sc.spawn(move || answers(*ip)))
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap_or(false))
                        .filter(|a| *a)
                        .count()
                })
            })?;
            tried += targets.len() as u32;
            ok += answered as u32;
        }
        per_site.push((tried, ok));
    }
    Ok(per_site)
}

/// Port tried by [`meet_all`]: nothing listens on it in a VM, so the VM answers a
/// connection attempt with a reset.
const MEET_PORT: u16 = 9;
/// How long one meeting attempt may take (the kernel repeats its SYN after 1 s and its
/// ARP request each second).
const MEET_WAIT: Duration = Duration::from_secs(3);

/// Whether `ip` answers a TCP connection attempt (refused or accepted) within [`MEET_WAIT`].
fn answers(ip: Ipv4Addr) -> bool {
    match TcpStream::connect_timeout(&SocketAddrV4::new(ip, MEET_PORT).into(), MEET_WAIT) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionRefused,
    }
}

/// The first address [`start_dnsmasq`] leases.
const LEASE_FIRST: Ipv4Addr = Ipv4Addr::new(198, 19, 200, 10);
/// The last one (1,000 addresses: more than 3 x 64 clients).
const LEASE_LAST: Ipv4Addr = Ipv4Addr::new(198, 19, 203, 250);

/// Starts dnsmasq in site A's first VM: one server for the whole cluster; with `fixed`,
/// every VM has its own address in a hosts file (from [`LEASE_FIRST`] on).
fn start_dnsmasq(lab: &Lab, t: &Topology, fixed: bool) -> anyhow::Result<Proc> {
    let mut extra = vec![
        "--dhcp-lease-max=2000".to_string(),
        // No ping before an offer: dnsmasq checks one address at a time, which would
        // measure its own pacing, not the overlay's.
        "--no-ping".to_string(),
    ];
    if fixed {
        let first = u32::from(LEASE_FIRST);
        let hosts: Vec<(&str, Ipv4Addr)> = t
            .sites
            .iter()
            .flat_map(|s| s.vms.iter())
            .zip(first..)
            .map(|(v, a)| (v.mac.as_str(), Ipv4Addr::from(a)))
            .collect();
        extra.push(dhcp::hosts_file(lab, &hosts)?);
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let d = dhcp::Dnsmasq::start(lab, &t.sites[0].vms[0].ns, LEASE_FIRST, LEASE_LAST, &extra)?;
    Ok(d.proc)
}

/// One site's clients in the DHCP storm.
#[derive(Debug, Default, Clone, Copy)]
struct DhcpSite {
    asked: u32,
    obtained: u32,
    discovers: u32,
    naks: u32,
}

/// Every VM but the server asks for a lease at the same moment; per site.
fn dhcp_storm(lab: &Lab, t: &Topology) -> Vec<DhcpSite> {
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
                                Ok(Ok(l)) => Some(l),
                                Ok(Err(e)) => {
                                    eprintln!("{}: no lease: {e}", v.ns);
                                    None
                                }
                                Err(e) => {
                                    eprintln!("{}: {e}", v.ns);
                                    None
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
                let mut d = DhcpSite {
                    asked: hs.len() as u32,
                    ..DhcpSite::default()
                };
                for l in hs.into_iter().filter_map(|h| h.join().ok().flatten()) {
                    d.obtained += 1;
                    d.discovers += l.discovers;
                    d.naks += l.naks;
                }
                d
            })
            .collect()
    })
}

/// The MPI job: every rank reports its node, an allreduce sums the ranks (the demo's
/// program; `control::demo` is behind a feature bench builds without).
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

/// [`MPI_PROGRAM`] under mpirun over `ranks` VMs (every VM when 0 or more than there are),
/// placed round-robin over the sites, from site A's first VM; (ranks, ranks when the sum
/// came out right) per site.
fn mpi_job(lab: &Lab, t: &Topology, ranks: usize) -> anyhow::Result<Vec<(u32, u32)>> {
    // OpenMPI announces every address of the interface it is told to use, and the VMs'
    // routed underlay addresses (on the same interface) are not reachable behind NAT:
    // they go, so the job runs on the overlay alone.
    for s in &t.sites {
        for v in &s.vms {
            let a = format!("{}/24", v.underlay_ip);
            lab.exec(&v.ns, &["ip", "addr", "del", &a, "dev", &v.ifname])?;
        }
    }
    let all: usize = t.sites.iter().map(|s| s.vms.len()).sum();
    let n = if ranks == 0 { all } else { ranks.min(all) };
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
    // 300 s, 5 s per rank beyond 60 ranks (the launch and wire-up grow with the ranks).
    let limit = Duration::from_secs(300.max(5 * n as u64));
    let ok = match lab.exec_timeout(&vms[0].ns, &argv, limit) {
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
            let k = vms
                .iter()
                .filter(|v| s.vms.iter().any(|x| x.ns == v.ns))
                .count() as u32;
            (k, if ok { k } else { 0 })
        })
        .collect())
}

/// Pings `dst` from `ns` 0.1 s apart (at most 10 s); seconds until the first answer.
fn time_to_answer(lab: &Lab, ns: &str, dst: Ipv4Addr) -> anyhow::Result<Option<f64>> {
    let (first, _) = lab::first_answer(lab, ns, dst, 100)?;
    Ok(first.map(|n| f64::from(n.saturating_sub(1)) / 10.0))
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
    o.l2_control(control == "on");
    let e = mvc.edge(lab, b, &o)?;
    c.edges.insert(b.name.clone(), e);
    time_to_answer(lab, &a.vms[0].ns, b.vms[0].ip)
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
    let r = time_to_answer(lab, &watcher.ns, vm.ip);
    lab.stop(&own);
    r
}

/// The storm: site A's first VM sends broadcast datagrams as fast as it can (at most
/// [`STORM_DATAGRAMS`] in [`STORM_LIMIT`]) while A's second VM pings B's first VM 0.1 s
/// apart and A's third VM runs iperf3 to B's second VM; the same pings and iperf3 run
/// just before, without the storm, as the reference.
fn storm(mvc: &Mvc, lab: &Lab, t: &Topology, c: Option<&MvcCluster>) -> anyhow::Result<Storm> {
    let (a, b) = (&t.sites[0], &t.sites[1]);
    let (flood, pinger, streamer) = (&a.vms[0], &a.vms[1], &a.vms[2]);
    let (ping_dst, iperf_dst) = (&b.vms[0], &b.vms[1]);
    let quiet = |secs: u32| -> anyhow::Result<(lab::Ping, f64)> {
        std::thread::scope(|sc| {
            let p = sc.spawn(|| lab::ping(lab, &pinger.ns, ping_dst.ip, secs * 10, 0.1));
            let bps = lab::iperf(lab, &streamer.ns, &iperf_dst.ns, iperf_dst.ip, secs);
            let p = p.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
            Ok((p?, bps?))
        })
    };
    lab::wait_ping(lab, &pinger.ns, ping_dst.ip, Duration::from_secs(10))?;
    let (ref_ping, ref_bps) = quiet(STORM_SECS)?;
    std::thread::sleep(SNAPSHOT_WAIT);
    let before = counters(mvc, lab, c, a)?;
    let t0 = Instant::now();
    let (sent, during) = std::thread::scope(|sc| {
        let f = sc.spawn(|| {
            lab.in_ns(&flood.ns, || -> std::io::Result<u64> {
                let s = UdpSocket::bind((flood.ip, 0))?;
                s.set_broadcast(true)?;
                let dst = (Ipv4Addr::new(198, 19, 255, 255), 9);
                let start = Instant::now();
                let mut sent = 0u64;
                for _ in 0..STORM_DATAGRAMS {
                    if s.send_to(&[0u8; 64], dst).is_ok() {
                        sent += 1;
                    }
                    if start.elapsed() > STORM_LIMIT {
                        break;
                    }
                }
                Ok(sent)
            })
        });
        // The pings and the stream start once the storm is under way.
        std::thread::sleep(Duration::from_millis(200));
        let during = quiet(STORM_SECS);
        let sent = f.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (sent, during)
    });
    let seconds = t0.elapsed().as_secs_f64();
    let sent = sent??;
    let (ping, bps) = during?;
    std::thread::sleep(SNAPSHOT_WAIT);
    let after = counters(mvc, lab, c, a)?;
    let d = |k: usize| after[k].zip(before[k]).map(|(x, y)| x.saturating_sub(y));
    Ok(Storm {
        datagrams: sent,
        seconds,
        wan_tx_packets: d(0).unwrap_or(0),
        wan_tx_bytes: d(1).unwrap_or(0),
        flooded_frames: d(2),
        flooded_wan_bytes: d(3),
        ping_sent: ping.sent,
        ping_received: ping.received,
        ref_ping_sent: ref_ping.sent,
        ref_ping_received: ref_ping.received,
        mbps: bps / 1e6,
        ref_mbps: ref_bps / 1e6,
    })
}

/// Datagrams the storming VM sends at most.
const STORM_DATAGRAMS: u32 = 200_000;
/// How long it storms at most.
const STORM_LIMIT: Duration = Duration::from_secs(6);
/// Seconds of pings and iperf3, during the storm and before it.
const STORM_SECS: u32 = 4;

/// The overlay between the sites: mvc (L2 control plane on or off) or n2n.
enum Overlay {
    Mvc(MvcCluster),
    N2n(N2n),
}

impl Overlay {
    fn start(lab: &Lab, mvc: &Mvc, vms: u8, control: &str) -> anyhow::Result<(Topology, Overlay)> {
        if control == "n2n" {
            let t = Topology::three_sites(lab, vms)?;
            let n = N2n::start(lab, &t)?;
            return Ok((t, Overlay::N2n(n)));
        }
        let (t, c) = MvcCluster::three_sites(lab, mvc, vms, control == "on")?;
        Ok((t, Overlay::Mvc(c)))
    }

    fn mvc(&self) -> Option<&MvcCluster> {
        match self {
            Overlay::Mvc(c) => Some(c),
            Overlay::N2n(_) => None,
        }
    }
}

fn one_run(mvc: &Mvc, vms: u8, control: &str, args: &Args) -> anyhow::Result<Run> {
    let (with_dhcp, recovery) = (args.dhcp, args.recovery);
    // Every VM meets every other: room for their ARP entries (and some to spare), held
    // until after the lab's teardown.
    let n = 3 * u64::from(vms);
    let _room = lab::NeighRoom::ensure(n * n + 1024)?;
    let lab = Lab::new("bc")?;
    let t0 = Instant::now();
    let (t, mut overlay) = Overlay::start(&lab, mvc, vms, control)?;
    // The overlay is up when the first VMs of every pair of sites reach each other.
    for x in &t.sites {
        for y in t.sites.iter().filter(|y| y.name != x.name) {
            lab::wait_ping(&lab, &x.vms[0].ns, y.vms[0].ip, Duration::from_secs(30))
                .with_context(|| format!("{} -> {}", x.name, y.name))?;
        }
    }
    let setup_s = t0.elapsed().as_secs_f64();
    let dnsmasq = if with_dhcp {
        Some(start_dnsmasq(&lab, &t, args.dhcp_fixed)?)
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
            .map(|s| counters(mvc, &lab, overlay.mvc(), s))
            .collect::<anyhow::Result<_>>()?;
        let r0 = Instant::now();
        let mut dhcp = None;
        let tries = match *name {
            "dhcp-storm" => {
                let d = dhcp_storm(&lab, &t);
                let tries = d.iter().map(|d| (d.asked, d.obtained)).collect();
                dhcp = Some(d);
                tries
            }
            "mpi" => mpi_job(&lab, &t, args.mpi_ranks)?,
            _ => meet_all(&lab, &t)?,
        };
        let seconds = r0.elapsed().as_secs_f64();
        // An edge's status is a snapshot its event loop publishes when it runs (every
        // 200 ms at most, and at least at its next timer): let it catch up.
        std::thread::sleep(SNAPSHOT_WAIT);
        let mut sites = Vec::new();
        for (i, s) in t.sites.iter().enumerate() {
            let after = counters(mvc, &lab, overlay.mvc(), s)?;
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
                dhcp_discovers: dhcp.as_ref().map(|d| d[i].discovers),
                dhcp_naks: dhcp.as_ref().map(|d| d[i].naks),
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
    let storm = if args.storm && vms >= 3 {
        storm(mvc, &lab, &t, overlay.mvc()).map_or_else(
            |e| {
                eprintln!("storm: {e:#}");
                None
            },
            Some,
        )
    } else {
        None
    };
    let (mut restart, mut moved) = (None, None);
    if recovery {
        if let Overlay::Mvc(c) = &mut overlay {
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
    if let Overlay::N2n(n) = overlay {
        n.stop(&lab, &t)?;
    }
    Ok(Run {
        vms_per_site: vms,
        control: control.into(),
        setup_s: Some(setup_s),
        load: Some(apps::load_avg()),
        rounds,
        storm,
        restart_reachable_s: restart,
        move_reachable_s: moved,
    })
}

/// Per minute, from a count over `secs` seconds.
fn per_min(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 * 60.0 / secs
    } else {
        0.0
    }
}

fn print_header() {
    println!(
        "{:>4} {:>7} {:>10} {:>4} {:>8} {:>11} {:>10} {:>8} {:>11} {:>8} {:>8} {:>11}",
        "VMS",
        "CONTROL",
        "ROUND",
        "SITE",
        "WAN-PKTS",
        "WAN-BYTES",
        "WAN-KB/MIN",
        "FLOODED",
        "FLOOD-BYTES",
        "ARP-WAN",
        "ARP-HERE",
        "OK"
    );
}

fn print_run(r: &Run) {
    let opt = |v: Option<u64>| v.map_or("-".to_string(), |n| n.to_string());
    for round in &r.rounds {
        for s in &round.sites {
            let dhcp = match (s.dhcp_discovers, s.dhcp_naks) {
                (Some(d), Some(n)) => format!(" (DISCOVERs {d}, NAKs {n})"),
                _ => String::new(),
            };
            println!(
                "{:>4} {:>7} {:>10} {:>4} {:>8} {:>11} {:>10.1} {:>8} {:>11} {:>8} {:>8} {:>6}/{}{}",
                r.vms_per_site,
                r.control,
                round.name,
                s.site,
                s.wan_tx_packets,
                s.wan_tx_bytes,
                per_min(s.wan_tx_bytes, round.seconds) / 1000.0,
                opt(s.flooded_frames),
                opt(s.flooded_wan_bytes),
                opt(s.arp_requests_flooded),
                opt(s.arp_answered_locally),
                s.ok,
                s.tries,
                dhcp
            );
        }
    }
    if let Some(s) = &r.storm {
        println!(
            "{:>4} {:>7} storm: {} datagrams in {:.1} s; site A sent {} WAN packets ({} bytes), flooded {} ({} bytes); pings {}/{} (before {}/{}); iperf3 {:.1} Mbit/s (before {:.1})",
            r.vms_per_site,
            r.control,
            s.datagrams,
            s.seconds,
            s.wan_tx_packets,
            s.wan_tx_bytes,
            opt(s.flooded_frames),
            opt(s.flooded_wan_bytes),
            s.ping_received,
            s.ping_sent,
            s.ref_ping_received,
            s.ref_ping_sent,
            s.mbps,
            s.ref_mbps
        );
    }
    if r.restart_reachable_s.is_some() || r.move_reachable_s.is_some() {
        println!(
            "{:>4} {:>7} reachable after an edge restart: {:?} s, after a move: {:?} s",
            r.vms_per_site, r.control, r.restart_reachable_s, r.move_reachable_s
        );
    }
}

/// The figure: per round, WAN bytes per site (mean of the three sites) against VMs per
/// site, one line per overlay; and what mvc's edges flooded.
fn figure(runs: &[Run], out: &Path) -> anyhow::Result<()> {
    let mut names: Vec<&str> = Vec::new();
    for r in runs {
        for x in &r.rounds {
            if !names.contains(&x.name.as_str()) && x.name != "meet-again" {
                names.push(&x.name);
            }
        }
    }
    let mut controls: Vec<&str> = runs.iter().map(|r| r.control.as_str()).collect();
    controls.dedup();
    let mut seen = Vec::new();
    controls.retain(|c| {
        let new = !seen.contains(c);
        seen.push(*c);
        new
    });
    let label = |c: &str| match c {
        "on" => "mvc, control plane on".to_string(),
        "off" => "mvc, control plane off".to_string(),
        c => format!("{c} 1.3.1"),
    };
    let mean = |x: &Round, f: &dyn Fn(&SiteRound) -> Option<u64>| -> Option<f64> {
        let v: Vec<u64> = x.sites.iter().filter_map(f).collect();
        (!v.is_empty()).then(|| v.iter().sum::<u64>() as f64 / v.len() as f64 / 1000.0)
    };
    let series = |round: &str, f: &dyn Fn(&SiteRound) -> Option<u64>, mvc_only: bool| {
        controls
            .iter()
            .filter(|c| !mvc_only || **c != "n2n")
            .map(|c| {
                let mut pts: Vec<(f64, f64)> = runs
                    .iter()
                    .filter(|r| r.control == *c)
                    .filter_map(|r| {
                        let x = r.rounds.iter().find(|x| x.name == round)?;
                        Some((f64::from(r.vms_per_site), mean(x, f)?))
                    })
                    .collect();
                pts.sort_by(|a, b| a.0.total_cmp(&b.0));
                (label(c), pts)
            })
            .collect::<Vec<_>>()
    };
    let titles: Vec<(String, String)> = names
        .iter()
        .flat_map(|n| {
            [
                (format!("{n}: WAN bytes sent per site"), (*n).to_string()),
                (
                    format!("{n}: bytes flooded per site (mvc)"),
                    (*n).to_string(),
                ),
            ]
        })
        .collect();
    let panels: Vec<Panel<'_>> = titles
        .iter()
        .enumerate()
        .map(|(i, (title, round))| {
            let flooded = i % 2 == 1;
            Panel {
                title,
                x: "VMs per site",
                y: "kB",
                series: if flooded {
                    series(round, &|s: &SiteRound| s.flooded_wan_bytes, true)
                } else {
                    series(round, &|s: &SiteRound| Some(s.wan_tx_bytes), false)
                },
            }
        })
        .collect();
    figure::lines(&panels, out)
}

/// Runs of earlier result files (`--also`).
fn earlier_runs(files: &[PathBuf]) -> anyhow::Result<Vec<Run>> {
    let mut v = Vec::new();
    for f in files {
        let text =
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        let mut doc: Value =
            serde_json::from_str(&text).with_context(|| format!("{}", f.display()))?;
        let runs: Vec<Run> = serde_json::from_value(doc["runs"].take())
            .with_context(|| format!("{}: runs", f.display()))?;
        v.extend(runs);
    }
    Ok(v)
}

/// `bench broadcast`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut runs = earlier_runs(&args.also)?;
    if args.draw {
        // Only the earlier results: print them and draw their figure.
        print_header();
        runs.iter().for_each(print_run);
        let svg = args.out.join("broadcast-figure.svg");
        std::fs::create_dir_all(&args.out)?;
        figure(&runs, &svg)?;
        println!("written {}", svg.display());
        return Ok(());
    }
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
    print_header();
    runs.iter().for_each(print_run);
    let name = format!("broadcast-{compact}.json");
    for &vms in &args.vms {
        for control in &args.control {
            let r = one_run(&mvc, vms, control, args)?;
            print_run(&r);
            runs.push(r);
            // Written after every run: a long series keeps what it measured.
            write_json(
                &args.out,
                &name,
                &Report {
                    started: started.clone(),
                    machine: Machine::probe(),
                    runs: &runs,
                },
            )?;
        }
    }
    let svg = args.out.join(format!("broadcast-{compact}.svg"));
    figure(&runs, &svg)?;
    println!(
        "written {} and {}",
        args.out.join(&name).display(),
        svg.display()
    );
    Ok(())
}
