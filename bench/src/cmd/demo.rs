//! `bench demo`: the three-site overlay lab with `mvc` (a supernode and an edge per
//! site), pings and iperf3 runs between every pair of sites, status tables, teardown.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use lab::overlay::{Mvc, MvcCluster};
use lab::{Lab, Topology};

use super::find_mvc;

/// Options of `bench demo`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mvc binary (default: next to this one).
    #[arg(long)]
    pub mvc: Option<PathBuf>,
    /// VMs per site.
    #[arg(long, default_value_t = 2)]
    pub vms: u8,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 3)]
    pub secs: u32,
}

/// `bench demo`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if !lab::is_root() {
        bail!("bench demo builds network namespaces: run it as root");
    }
    if args.vms == 0 || args.vms > 8 || args.secs == 0 || args.secs > 30 {
        bail!("--vms must be 1..=8 and --secs 1..=30");
    }
    let mvc = Mvc {
        bin: find_mvc(args.mvc.clone())?,
    };
    let lab = Lab::new("demo")?;
    println!("== building the lab (namespaces {}-*)", lab.prefix());
    let t = Topology::three_sites(&lab, args.vms)?;
    for s in &t.sites {
        let nat = if s.router.is_some() {
            "behind NAT"
        } else {
            "public"
        };
        println!(
            "   site {}: frontend {} ({nat}, public address {}), bridge {} with {} VMs ({})",
            s.name.to_uppercase(),
            s.frontend,
            s.public_ip,
            s.bridge,
            s.vms.len(),
            s.vms
                .iter()
                .map(|v| v.ip.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    println!("== starting mvc supernode on site A and an edge on every site");
    let c = MvcCluster::start(&lab, &t, &mvc, |_| {})?;
    println!("\n| from | to | ping loss | RTT ms (avg) | iperf3 TCP Gb/s |");
    println!("|---|---|---:|---:|---:|");
    let mut failures = 0;
    for (x, y) in [
        ("a", "b"),
        ("b", "a"),
        ("a", "c"),
        ("c", "a"),
        ("b", "c"),
        ("c", "b"),
    ] {
        let (from, to) = (&t.site(x).vms[0], &t.site(y).vms[0]);
        let up = lab::wait_ping(&lab, &from.ns, to.ip, Duration::from_secs(30));
        let p = lab::ping(&lab, &from.ns, to.ip, 10, 0.1)?;
        let bps = if up.is_ok() {
            lab::iperf(&lab, &from.ns, &to.ns, to.ip, args.secs).ok()
        } else {
            None
        };
        if p.received == 0 || bps.is_none() {
            failures += 1;
        }
        println!(
            "| {} ({}) | {} ({}) | {}/{} | {} | {} |",
            x.to_uppercase(),
            from.ip,
            y.to_uppercase(),
            to.ip,
            p.sent - p.received,
            p.sent,
            p.avg_ms.map_or("-".into(), |r| format!("{r:.3}")),
            bps.map_or("failed".into(), |b| format!("{:.3}", b / 1e9)),
        );
    }
    // Every VM of a site reaches every VM of the other sites.
    let mut all = 0;
    let mut ok = 0;
    for s in &t.sites {
        for v in &s.vms {
            for o in t.sites.iter().filter(|o| o.name != s.name) {
                for w in &o.vms {
                    all += 1;
                    if lab::ping(&lab, &v.ns, w.ip, 2, 0.1).is_ok_and(|p| p.received > 0) {
                        ok += 1;
                    }
                }
            }
        }
    }
    println!("\nVM-to-VM reachability across sites: {ok}/{all}");
    for s in &t.sites {
        let e = c.edge(&s.name);
        println!("\n== mvc edge status (site {})", s.name.to_uppercase());
        print!("{}", mvc.status_table(&lab, &e.ns, "edge", &e.sock)?);
    }
    println!("\n== mvc supernode status");
    print!(
        "{}",
        mvc.status_table(&lab, &c.supernode.ns, "supernode", &c.supernode.sock)?
    );
    c.stop(&lab);
    lab.teardown();
    println!("\n== lab torn down");
    if failures > 0 || ok < all {
        bail!("{failures} site pairs failed, {ok}/{all} VM pairs reachable");
    }
    Ok(())
}
