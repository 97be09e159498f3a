//! `bench build-time`: how long one `mvc cluster create ... --start` takes to build and
//! start a three-site cluster through the controller and the site agents (the 2012
//! paper's figure 9), against the one-way delay the WAN emulator adds on the uplinks of
//! sites B and C.
//!
//! The lab is the controller demo's ([`lab::sites`]): site A public, B and C behind
//! NAT (and a WAN link each) with the agent's TCP port forwarded, an `mvc agent` on every
//! site frontend, the controller run on site A's frontend. The reference measured in the same
//! run is the underlay RTT from B's frontend to A's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::sites::SiteLab;
use lab::{Lab, Topology};
use serde::Serialize;

use super::apps;
use super::figure::Panel;
use super::find_mvc;
use super::wanem::{LinkArgs, Wan};

/// Options of `bench build-time`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: apps::CommonArgs,
    /// One-way delays (ms) added on the uplinks of sites B and C, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,20,60,100,140")]
    pub delay: Vec<u32>,
    /// Compute VMs per site.
    #[arg(long, default_value_t = 2)]
    pub computes: u32,
}

/// One delay.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Added one-way delay on B's and C's uplinks, ms.
    pub delay_ms: u32,
    /// Seconds of each `mvc cluster create --start`.
    pub build_s_runs: Vec<f64>,
    /// Median.
    pub build_s: f64,
    /// Seconds of each `mvc cluster destroy`.
    pub destroy_s_runs: Vec<f64>,
    /// Median.
    pub destroy_s: f64,
    /// Errors of builds that failed (not in the medians).
    pub failed: Vec<String>,
    /// Underlay RTT B frontend -> A frontend (median of 5 pings), ms.
    pub rtt_ab_ms: Option<f64>,
}

#[derive(Serialize)]
struct Fields<'a> {
    computes_per_site: u32,
    vms: u32,
    runs: u32,
    rows: &'a [Row],
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let base = rows.first().map_or(f64::NAN, |r| r.build_s);
    let mut s = String::from(
        "| delay ms (B, C uplinks) | underlay RTT B-A ms | build + start s | x first delay | destroy s | builds failed |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {:.1} | {:.2} | {:.1} | {} of {} |\n",
            r.delay_ms,
            r.rtt_ab_ms.map_or("-".into(), |x| format!("{x:.1}")),
            r.build_s,
            r.build_s / base,
            r.destroy_s,
            r.failed.len(),
            r.failed.len() + r.build_s_runs.len(),
        ));
    }
    s
}

/// `bench build-time`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.delay.is_empty() || args.delay.iter().any(|&d| d > 150) {
        bail!("--delay takes one-way delays in 0..=150 ms");
    }
    if args.common.runs == 0 || args.common.runs > 20 || args.computes == 0 || args.computes > 8 {
        bail!("--runs must be 1..=20, --computes 1..=8");
    }
    if !lab::is_root() {
        bail!("bench build-time builds network namespaces: run it as root");
    }
    let mvc = find_mvc(args.common.mvc.clone())?;
    let mut info = apps::RunInfo::start("build-time");
    let lab = Lab::new("bt")?;
    let mut t = Topology::new(&lab)?;
    t.add_site(&lab, "a", false, 0)?;
    let mut wans = Vec::new();
    for s in ["b", "c"] {
        let site = t.add_site_wan(&lab, s, true, 0, true)?;
        wans.push(Wan::new(
            site.wan.as_deref().context("site has no WAN namespace")?,
        ));
    }
    for w in &mut wans {
        w.set(&lab, &LinkArgs::delay(0.0))?;
    }
    let vms = args.computes * 3 + 1;
    let mut sl = SiteLab::start(lab, t, &mvc, "mvc", vms + 1, vms + 1, &BTreeMap::new())?;
    sl.echo_ctl = false;
    sl.ctl_limit = Duration::from_secs(300);
    sl.add_sites()?;
    let counts = format!("{0}:{0}:{0}", args.computes);
    let steps = args.delay.len() as u64 * u64::from(args.common.runs);
    let pb = apps::progress(steps, "build-time");
    let mut rows = Vec::new();
    let mut seq = 0;
    for &d in &args.delay {
        for w in &mut wans {
            w.set(&sl.lab, &LinkArgs::delay(f64::from(d)))?;
        }
        let pings = lab::ping_samples(
            &sl.lab,
            &sl.topo.sites[1].frontend,
            sl.topo.sites[0].public_ip,
            5,
            0.2,
        )?;
        let mut row = Row {
            delay_ms: d,
            build_s_runs: Vec::new(),
            build_s: f64::NAN,
            destroy_s_runs: Vec::new(),
            destroy_s: f64::NAN,
            failed: Vec::new(),
            rtt_ab_ms: lab::median(&pings),
        };
        for i in 0..args.common.runs {
            seq += 1;
            let name = format!("bt{seq}");
            pb.set_message(format!("delay {d} ms, build {}", i + 1));
            let t0 = Instant::now();
            let made = sl.create_cluster(&name, &counts);
            let built = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let destroyed = sl.ctl(&["cluster", "destroy", &name]);
            match made {
                Ok(_) => row.build_s_runs.push(built),
                Err(e) => {
                    // A failed build is counted and shown, not timed.
                    apps::note(&pb, format!("delay {d} ms: build {name} failed: {e:#}"));
                    row.failed.push(format!("{e:#}"));
                }
            }
            destroyed?;
            row.destroy_s_runs.push(t1.elapsed().as_secs_f64());
            pb.inc(1);
        }
        row.build_s = lab::median(&row.build_s_runs).unwrap_or(f64::NAN);
        row.destroy_s = lab::median(&row.destroy_s_runs).unwrap_or(f64::NAN);
        apps::note(
            &pb,
            format!(
                "delay {d} ms: build {:.1} s, destroy {:.1} s",
                row.build_s, row.destroy_s
            ),
        );
        rows.push(row);
    }
    pb.finish_and_clear();
    drop(wans);
    drop(sl);
    let when = info.finish();
    let md = table(&rows);
    let head = format!(
        "Cluster build time: `mvc cluster create --sites A:B:C --computes {counts} --start` ({vms} VMs: frontend and computes, overlay edges, DHCP leases) through the controller on site A and the three site agents; delay added each way on B's and C's uplinks; median of {} builds, {when}",
        args.common.runs,
    );
    let fields = Fields {
        computes_per_site: args.computes,
        vms,
        runs: args.common.runs,
        rows: &rows,
    };
    info.save(
        &args.common.results,
        &head,
        &md,
        &fields,
        &[Panel {
            title: "Multi-site cluster build time",
            x: "added one-way delay on sites B and C (ms)",
            y: "seconds",
            series: vec![
                (
                    "mvc cluster create --start".into(),
                    rows.iter()
                        .map(|r| (f64::from(r.delay_ms), r.build_s))
                        .collect(),
                ),
                (
                    "mvc cluster destroy".into(),
                    rows.iter()
                        .map(|r| (f64::from(r.delay_ms), r.destroy_s))
                        .collect(),
                ),
            ],
        }],
    )?;
    Ok(())
}
