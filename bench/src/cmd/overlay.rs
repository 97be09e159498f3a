//! `bench overlay`: iperf3 TCP single-stream and ping RTT VM -> VM, in one lab and one run,
//! over the raw routed underlay, this overlay (ciphers x direct/relayed x datapaths) and
//! Debian's n2n 1.3.1, with ratios to the raw underlay of the same run.
//!
//! The measured pair is VM b1 (site B, behind NAT) -> VM a1 (site A, public). The raw
//! reference routes the same two namespaces over the same links (B's NAT, the internet
//! router, A's frontend) with no overlay. "Relayed" blocks UDP between B's public address
//! and A's edge port at the internet router, so B's traffic must go through the supernode.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bench::lab::{self, Lab, Topology};
use bench::overlay::{Mvc, MvcCluster, N2n, EDGE_PORT};
use serde::Serialize;

use super::{find_mvc, utc_now, write_json, Machine};
use crate::cmd::wanem;

/// Options of `bench overlay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mvc binary (default: next to this one).
    #[arg(long)]
    pub mvc: Option<PathBuf>,
    /// Systems to measure, comma-separated: raw, mvc, n2n.
    #[arg(long, value_delimiter = ',', default_value = "raw,mvc,n2n")]
    pub systems: Vec<String>,
    /// Ciphers of the overlay to measure.
    #[arg(long, value_delimiter = ',', default_value = "aes-256-gcm,none")]
    pub ciphers: Vec<String>,
    /// Overlay datapaths to measure (tap now; xdp once it exists).
    #[arg(long, value_delimiter = ',', default_value = "tap")]
    pub datapath: Vec<String>,
    /// Paths to measure: direct, relayed.
    #[arg(long, value_delimiter = ',', default_value = "direct,relayed")]
    pub paths: Vec<String>,
    /// iperf3 runs per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    pub secs: u32,
    /// Pings per configuration (the median RTT is reported).
    #[arg(long, default_value_t = 20)]
    pub pings: u32,
    /// One-way delays (ms) added by the WAN emulator on site B's uplink, comma-separated.
    /// Without it the sites are joined by plain veth links.
    #[arg(long, value_delimiter = ',')]
    pub delay: Vec<u32>,
    /// Where to write the JSON result and figures.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// raw, mvc, n2n-1.3.1.
    pub system: String,
    /// Cipher (`-` for raw; n2n uses twofish).
    pub cipher: String,
    /// direct, relayed, routed.
    pub path: String,
    /// Datapath the edges reported (`-` when not applicable).
    pub datapath: String,
    /// Added one-way delay on B's uplink, ms.
    pub delay_ms: u32,
    /// iperf3 results, Gb/s.
    pub gbps_runs: Vec<f64>,
    /// Median Gb/s.
    pub gbps: f64,
    /// Per-packet ping RTTs, ms.
    pub rtt_samples: Vec<f64>,
    /// Median RTT, ms.
    pub rtt_ms: Option<f64>,
    /// The raw underlay's Gb/s, measured alternately with this row's runs.
    pub raw_gbps_runs: Vec<f64>,
    /// Median of `raw_gbps_runs`.
    pub raw_gbps: f64,
    /// The raw underlay's median RTT, measured right after this row's pings.
    pub raw_rtt_ms: Option<f64>,
    /// Throughput relative to the paired raw runs.
    pub tput_vs_raw: Option<f64>,
    /// RTT relative to the paired raw pings.
    pub rtt_vs_raw: Option<f64>,
}

#[derive(Serialize)]
struct Report<'a> {
    bench: &'static str,
    date: String,
    machine: Machine,
    pair: &'static str,
    runs: u32,
    secs: u32,
    pings: u32,
    mvc: Option<String>,
    rows: &'a [Row],
}

struct Ctx<'a> {
    lab: &'a Lab,
    topo: &'a Topology,
    args: &'a Args,
    delay: u32,
}

impl Ctx<'_> {
    fn client(&self) -> &str {
        &self.topo.site("b").vms[0].ns
    }

    fn measure(
        &self,
        system: &str,
        cipher: &str,
        path: &str,
        datapath: &str,
        dst: Ipv4Addr,
    ) -> anyhow::Result<Row> {
        let (lab, a) = (self.lab, self.args);
        lab::wait_ping(lab, self.client(), dst, Duration::from_secs(30))
            .with_context(|| format!("{system} {cipher} {path}: no connectivity"))?;
        // Warm up (ARP, sessions, path selection) before measuring.
        let _ = lab::ping(lab, self.client(), dst, 5, 0.1);
        // The raw underlay between the same VMs is measured alternately with each system
        // (the machine's load drifts; a reference taken minutes earlier would not do).
        let raw_dst = self.topo.site("a").vms[0].underlay_ip;
        let paired = dst != raw_dst;
        let rtt_samples = lab::ping_samples(lab, self.client(), dst, a.pings, 0.1)?;
        let raw_rtt = if paired {
            lab::ping_samples(lab, self.client(), raw_dst, a.pings, 0.1)?
        } else {
            rtt_samples.clone()
        };
        let mut gbps_runs = Vec::new();
        let mut raw_gbps_runs = Vec::new();
        for i in 0..a.runs {
            if paired {
                let bps = lab::iperf(lab, self.client(), raw_dst, a.secs)
                    .with_context(|| format!("raw reference run {}", i + 1))?;
                raw_gbps_runs.push(bps / 1e9);
            }
            let bps = lab::iperf(lab, self.client(), dst, a.secs)
                .with_context(|| format!("{system} {cipher} {path}: iperf3 run {}", i + 1))?;
            gbps_runs.push(bps / 1e9);
        }
        if !paired {
            raw_gbps_runs.clone_from(&gbps_runs);
        }
        let gbps = lab::median(&gbps_runs).unwrap_or(0.0);
        let rtt_ms = lab::median(&rtt_samples);
        let raw_gbps = lab::median(&raw_gbps_runs).unwrap_or(0.0);
        let raw_rtt_ms = lab::median(&raw_rtt);
        let row = Row {
            system: system.into(),
            cipher: cipher.into(),
            path: path.into(),
            datapath: datapath.into(),
            delay_ms: self.delay,
            gbps,
            gbps_runs,
            rtt_ms,
            rtt_samples,
            raw_gbps,
            raw_gbps_runs,
            raw_rtt_ms,
            tput_vs_raw: (raw_gbps > 0.0).then(|| gbps / raw_gbps),
            rtt_vs_raw: match (rtt_ms, raw_rtt_ms) {
                (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                _ => None,
            },
        };
        eprintln!(
            "  {:<10} {:<12} {:<8} {:<5} {:>7.3} Gb/s  rtt {} ms",
            row.system,
            row.cipher,
            row.path,
            row.datapath,
            row.gbps,
            row.rtt_ms.map_or("-".into(), |r| format!("{r:.3}"))
        );
        Ok(row)
    }
}

/// Runs the configurations of `args` at one delay in an existing lab.
fn run_all(
    lab: &Lab,
    topo: &Topology,
    args: &Args,
    mvc: Option<&Mvc>,
    delay: u32,
) -> anyhow::Result<Vec<Row>> {
    let ctx = Ctx {
        lab,
        topo,
        args,
        delay,
    };
    let (a, b) = (topo.site("a"), topo.site("b"));
    let va = &a.vms[0];
    let mut rows = Vec::new();
    let has = |s: &str| args.systems.iter().any(|x| x == s);
    if has("raw") {
        rows.push(ctx.measure("raw", "-", "routed", "-", va.underlay_ip)?);
    }
    let relay_block = || topo.block_udp(lab, b, a, Some(EDGE_PORT));
    if let Some(mvc) = mvc {
        // A build without `--datapath` has only the TAP path: measure it without the flag.
        let help = lab::run(&[&mvc.bin.to_string_lossy(), "edge", "--help"])?.stdout;
        let datapath_flag = help.contains("--datapath");
        if !datapath_flag {
            if args.datapath.iter().any(|d| d != "tap") {
                bail!("{} has no --datapath option", mvc.bin.display());
            }
            eprintln!(
                "note: {} has no --datapath option; measuring its TAP path",
                mvc.bin.display()
            );
        }
        for dp in &args.datapath {
            for cipher in &args.ciphers {
                for path in &args.paths {
                    let rules = if path == "relayed" {
                        Some(relay_block()?)
                    } else {
                        None
                    };
                    let c = MvcCluster::start(lab, topo, mvc, |o| {
                        o.cipher = Some(cipher.clone());
                        o.datapath = datapath_flag.then(|| dp.clone());
                    })?;
                    let res = (|| -> anyhow::Result<Row> {
                        lab::wait_ping(lab, ctx.client(), va.ip, Duration::from_secs(30))?;
                        c.wait_path(lab, "b", "a", path, Duration::from_secs(30))?;
                        let st = mvc.edge_status(lab, c.edge("b"))?;
                        let actual = st["datapath"].as_str().unwrap_or("?").to_string();
                        let row = ctx.measure("mvc", cipher, path, &actual, va.ip)?;
                        if mvc.path_to(lab, c.edge("b"), "a").as_deref() != Some(path.as_str()) {
                            bail!("path b -> a changed during the {path} measurement");
                        }
                        Ok(row)
                    })();
                    c.stop(lab);
                    if let Some(r) = rules {
                        topo.unblock(lab, &r)?;
                    }
                    rows.push(res?);
                }
            }
        }
    }
    if has("n2n") {
        for path in &args.paths {
            let rules = if path == "relayed" {
                Some(relay_block()?)
            } else {
                None
            };
            let n = N2n::start(lab, topo)?;
            let res = ctx.measure("n2n-1.3.1", "twofish", path, "-", va.ip);
            n.stop(lab, topo)?;
            if let Some(r) = rules {
                topo.unblock(lab, &r)?;
            }
            rows.push(res?);
        }
    }
    Ok(rows)
}

/// The markdown table of a run.
pub fn table(rows: &[Row], runs: u32, with_delay: bool) -> String {
    let mut s = String::new();
    let dcol = if with_delay { " delay ms |" } else { "" };
    let dsep = if with_delay { "---:|" } else { "" };
    s.push_str(&format!(
        "|{dcol} system | cipher | path | datapath | TCP Gb/s (median of {runs}) | raw Gb/s (paired) | of raw | ping RTT ms (median) | raw RTT ms | x raw |\n"
    ));
    s.push_str(&format!(
        "|{dsep}---|---|---|---|---:|---:|---:|---:|---:|---:|\n"
    ));
    for r in rows {
        let d = if with_delay {
            format!(" {} |", r.delay_ms)
        } else {
            String::new()
        };
        let ms = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
        s.push_str(&format!(
            "|{d} {} | {} | {} | {} | {:.3} | {:.3} | {} | {} | {} | {} |\n",
            r.system,
            r.cipher,
            r.path,
            r.datapath,
            r.gbps,
            r.raw_gbps,
            r.tput_vs_raw
                .map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
            ms(r.rtt_ms),
            ms(r.raw_rtt_ms),
            r.rtt_vs_raw.map_or("-".into(), |x| format!("{x:.2}")),
        ));
    }
    s
}

/// `bench overlay`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    for s in &args.systems {
        if !["raw", "mvc", "n2n"].contains(&s.as_str()) {
            bail!("unknown system {s:?} (raw, mvc, n2n)");
        }
    }
    for p in &args.paths {
        if !["direct", "relayed"].contains(&p.as_str()) {
            bail!("unknown path {p:?} (direct, relayed)");
        }
    }
    if args.runs == 0
        || args.runs > 20
        || args.secs == 0
        || args.secs > 60
        || args.pings == 0
        || args.pings > 1000
    {
        bail!("runs must be 1..=20, secs 1..=60, pings 1..=1000");
    }
    if !lab::is_root() {
        bail!("bench overlay builds network namespaces: run it as root");
    }
    let mvc = if args.systems.iter().any(|s| s == "mvc") {
        Some(Mvc {
            bin: find_mvc(args.mvc.clone())?,
        })
    } else {
        None
    };
    let (date, stamp) = utc_now();
    let machine = Machine::probe();
    eprintln!("bench overlay: {date}, {}", machine.line());
    let lab = Lab::new("bo")?;
    let delays = if args.delay.is_empty() {
        vec![0]
    } else {
        args.delay.clone()
    };
    let use_wan = !args.delay.is_empty();
    let (topo, mut wan) = if use_wan {
        let (t, w) = wanem::three_sites_with_wan(&lab, 1)?;
        (t, Some(w))
    } else {
        (Topology::three_sites(&lab, 1)?, None)
    };
    for s in &topo.sites {
        lab::iperf_server(&lab, &s.vms[0].ns, &format!("iperf-{}", s.name))?;
    }
    let mut rows = Vec::new();
    for d in delays {
        if let Some(w) = wan.as_mut() {
            w.set(&lab, &wanem::LinkArgs::delay(f64::from(d)))?;
            eprintln!("delay {d} ms each way on site B's uplink");
        }
        rows.extend(run_all(&lab, &topo, args, mvc.as_ref(), d)?);
    }
    lab.teardown();
    let md = table(&rows, args.runs, use_wan);
    println!(
        "\nVM b1 (site B, behind NAT) -> VM a1 (site A), {date}, {}\n",
        machine.line()
    );
    println!("{md}");
    let report = Report {
        bench: "overlay",
        date,
        machine,
        pair: "b1 -> a1",
        runs: args.runs,
        secs: args.secs,
        pings: args.pings,
        mvc: mvc.map(|m| m.bin.display().to_string()),
        rows: &rows,
    };
    let p = write_json(&args.results, &format!("overlay-{stamp}.json"), &report)?;
    std::fs::write(args.results.join(format!("overlay-{stamp}.md")), &md)?;
    if use_wan {
        let svg = args.results.join(format!("overlay-{stamp}.svg"));
        crate::plot::overlay_vs_delay(&rows, &svg)?;
        eprintln!("figure: {}", svg.display());
    }
    eprintln!("results: {}", p.display());
    Ok(())
}
