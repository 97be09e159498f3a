//! `bench broadcast`: what a cluster build floods across the WAN. Three sites with N VMs
//! each, joined by mvc with the L2 control plane on or off; every VM pings every other VM
//! once (each VM's pings in parallel, one VM after the other: the ARP traffic of nodes
//! meeting each other), then again after every VM's ARP cache is flushed (nodes that meet
//! again later). Per site and round: frames and bytes the edge flooded across the WAN
//! (`flooded_frames`, `flooded_wan_bytes`), ARP requests flooded and answered locally,
//! and how many pings were answered.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use lab::overlay::{Mvc, MvcCluster};
use lab::{Lab, Topology};
use serde::Serialize;
use serde_json::Value;

use super::{find_mvc, utc_now, write_json, Machine};

/// Options of `bench broadcast`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mvc binary (default: next to this one).
    #[arg(long)]
    pub mvc: Option<PathBuf>,
    /// VMs per site, one run each (comma-separated, each 1..=32).
    #[arg(long, value_delimiter = ',', default_value = "4,16")]
    pub vms: Vec<u8>,
    /// L2 control plane settings to compare (`on`, `off`).
    #[arg(long, value_delimiter = ',', default_value = "on,off")]
    pub control: Vec<String>,
    /// Where the JSON result goes.
    #[arg(long, default_value = "results")]
    pub out: PathBuf,
}

/// One site in one round.
#[derive(Debug, Serialize)]
struct SiteRound {
    site: String,
    flooded_frames: u64,
    flooded_wan_bytes: u64,
    arp_requests_flooded: u64,
    arp_answered_locally: u64,
    pings_sent: u32,
    pings_answered: u32,
}

/// One configuration: VMs per site, control plane on or off.
#[derive(Debug, Serialize)]
struct Run {
    vms_per_site: u8,
    control: String,
    /// Round 1: first contact; round 2: after the VMs' ARP caches were flushed.
    rounds: Vec<Vec<SiteRound>>,
}

#[derive(Debug, Serialize)]
struct Report {
    started: String,
    machine: Machine,
    runs: Vec<Run>,
}

const COUNTERS: [&str; 4] = [
    "flooded_frames",
    "flooded_wan_bytes",
    "arp_requests_flooded",
    "arp_answered_locally",
];

fn counters(mvc: &Mvc, lab: &Lab, c: &MvcCluster, site: &str) -> anyhow::Result<[u64; 4]> {
    let st: Value = mvc.edge_status(lab, c.edge(site))?;
    let get = |k: &str| {
        st.get(k)
            .or_else(|| st["l2"].get(k))
            .and_then(Value::as_u64)
            .with_context(|| format!("edge {site}: no {k} in its status"))
    };
    Ok([
        get(COUNTERS[0])?,
        get(COUNTERS[1])?,
        get(COUNTERS[2])?,
        get(COUNTERS[3])?,
    ])
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
            let o = lab.exec_timeout(&v.ns, &["sh", "-c", &script], Duration::from_secs(30))?;
            sent += targets.len() as u32;
            ok += o.stdout.lines().filter(|l| l.trim() == "ok").count() as u32;
        }
        per_site.push((sent, ok));
    }
    Ok(per_site)
}

fn one_run(mvc: &Mvc, vms: u8, control: &str) -> anyhow::Result<Run> {
    let lab = Lab::new("bc")?;
    let t = Topology::three_sites(&lab, vms)?;
    let c = MvcCluster::start(&lab, &t, mvc, |o| {
        o.extra = vec!["--l2-control".into(), control.into()];
    })?;
    // The overlay is up when the first VMs of every pair of sites reach each other.
    for x in &t.sites {
        for y in t.sites.iter().filter(|y| y.name != x.name) {
            lab::wait_ping(&lab, &x.vms[0].ns, y.vms[0].ip, Duration::from_secs(30))
                .with_context(|| format!("{} -> {}", x.name, y.name))?;
        }
    }
    // Let the warm-up's ARP settle and start from clean caches.
    std::thread::sleep(Duration::from_secs(1));
    for s in &t.sites {
        for v in &s.vms {
            lab.exec(&v.ns, &["ip", "neigh", "flush", "all"])?;
        }
    }
    let mut rounds = Vec::new();
    for round in 0..2 {
        if round == 1 {
            for s in &t.sites {
                for v in &s.vms {
                    lab.exec(&v.ns, &["ip", "neigh", "flush", "all"])?;
                }
            }
        }
        let before: Vec<[u64; 4]> = t
            .sites
            .iter()
            .map(|s| counters(mvc, &lab, &c, &s.name))
            .collect::<anyhow::Result<_>>()?;
        let pings = ping_all(&lab, &t)?;
        let mut sites = Vec::new();
        for (i, s) in t.sites.iter().enumerate() {
            let after = counters(mvc, &lab, &c, &s.name)?;
            let d = |k: usize| after[k].saturating_sub(before[i][k]);
            sites.push(SiteRound {
                site: s.name.clone(),
                flooded_frames: d(0),
                flooded_wan_bytes: d(1),
                arp_requests_flooded: d(2),
                arp_answered_locally: d(3),
                pings_sent: pings[i].0,
                pings_answered: pings[i].1,
            });
        }
        rounds.push(sites);
    }
    Ok(Run {
        vms_per_site: vms,
        control: control.into(),
        rounds,
    })
}

/// `bench broadcast`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if !lab::is_root() {
        bail!("bench broadcast builds network namespaces: run it as root");
    }
    if args.vms.iter().any(|v| !(1..=32).contains(v)) {
        bail!("--vms: each must be 1..=32");
    }
    if let Some(c) = args.control.iter().find(|c| *c != "on" && *c != "off") {
        bail!("--control: {c:?} is not on or off");
    }
    let mvc = Mvc {
        bin: find_mvc(args.mvc.clone())?,
    };
    let (started, compact) = utc_now();
    let mut runs = Vec::new();
    println!(
        "{:>4} {:>7} {:>5} {:>4} {:>8} {:>11} {:>9} {:>9} {:>9}",
        "VMS",
        "CONTROL",
        "ROUND",
        "SITE",
        "FLOODED",
        "FLOOD-BYTES",
        "ARP-WAN",
        "ARP-HERE",
        "PINGS-OK"
    );
    for &vms in &args.vms {
        for control in &args.control {
            let r = one_run(&mvc, vms, control)?;
            for (i, round) in r.rounds.iter().enumerate() {
                for s in round {
                    println!(
                        "{:>4} {:>7} {:>5} {:>4} {:>8} {:>11} {:>9} {:>9} {:>5}/{}",
                        vms,
                        control,
                        i + 1,
                        s.site,
                        s.flooded_frames,
                        s.flooded_wan_bytes,
                        s.arp_requests_flooded,
                        s.arp_answered_locally,
                        s.pings_answered,
                        s.pings_sent
                    );
                }
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
