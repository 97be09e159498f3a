//! `bench scale`: cost curves of the supernode and the edges against the number of edges,
//! from the in-process simulation in [`bench::scale`].

use std::path::PathBuf;

use bench::scale::{self, ScaleConfig, ScaleResult};
use serde::Serialize;

use super::figure::{lines, Panel};

/// Arguments of `bench scale`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Edge counts of the curve, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000,10000")]
    pub edges: Vec<usize>,
    /// Edges per community.
    #[arg(long, default_value_t = 10)]
    pub community_size: usize,
    /// Every point of the curve is one community of all its edges (`--community-size`
    /// is then the edge count): the curve against the community size.
    #[arg(long)]
    pub one_community: bool,
    /// Supernodes (every edge registers with all of them).
    #[arg(long, default_value_t = 1)]
    pub supernodes: usize,
    /// Longest a convergence may take, in virtual seconds.
    #[arg(long, default_value_t = 60)]
    pub budget_s: u64,
    /// New registrations a supernode admits per second (0: no limit).
    #[arg(long, default_value_t = 5000)]
    pub new_per_s: u32,
    /// Community sizes at which one periodic registration is timed both ways (the list
    /// held is current / a complete list goes back), comma-separated; 0: none.
    #[arg(long, value_delimiter = ',', default_value = "10,100,1000")]
    pub reg_cost: Vec<usize>,
    /// Where to write the JSON result and the figure.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: super::Machine,
    runs: Vec<ScaleResult>,
    registration_cost: Vec<scale::RegCost>,
}

fn ms(v: Option<u64>) -> String {
    v.map_or_else(|| "missed".into(), |v| v.to_string())
}

fn opt(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
}

/// Runs the curve.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let mut runs = Vec::new();
    println!(
        "| edges | sn B/edge | reg µs | relay µs | peerinfo B/join (cold) | sn signatures/join (cold) | sn CPU ms (cold) | B late join | cold ms | sessions ms | sn µs/edge/s (steady) | peerinfo msgs (steady) | restart rereg ms | restart all know ms | lost | overload drops | churn ms | outage rereg ms | lost | overload drops | edge B/edge | edge B/peer | edge µs/peer/s | wall ms |"
    );
    println!(
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    );
    for &n in &args.edges {
        let mut cfg = ScaleConfig::new(n);
        cfg.community_size = if args.one_community {
            n
        } else {
            args.community_size
        };
        cfg.supernodes = args.supernodes;
        cfg.budget_s = args.budget_s;
        cfg.new_per_s = args.new_per_s;
        let r = scale::run(&cfg, Some(bench::allocated_bytes))?;
        println!(
            "| {} | {} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} | {} | {} | {} | {:.2} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.2} | {} |",
            n,
            opt(r.sn_bytes_per_edge),
            r.cpu_per_registration_us,
            r.cpu_per_relay_us,
            r.peerinfo_bytes_per_join_cold,
            r.signatures_per_join_cold,
            r.cold_sn.cpu_us as f64 / 1000.0,
            r.peerinfo_bytes_late_join,
            ms(r.cold.all_ms),
            ms(r.cold_sessions.all_ms),
            r.sn_cpu_per_edge_s_us,
            r.steady_sn.peerinfo_msgs,
            ms(r.restart_reregistered_ms),
            ms(r.restart.all_ms),
            r.restart_dropped_known,
            r.restart_overload_drops,
            ms(r.churn.all_ms),
            ms(r.outage_reregistered_ms),
            r.outage_dropped_known,
            r.outage_overload_drops,
            opt(r.edge_bytes_per_edge),
            opt(r.edge_bytes_per_peer),
            r.edge_cpu_per_peer_s_us,
            r.wall_ms,
        );
        runs.push(r);
    }
    let mut costs = Vec::new();
    let reg_cost: Vec<usize> = args.reg_cost.iter().copied().filter(|k| *k > 0).collect();
    if !reg_cost.is_empty() {
        println!("\n| community | µs, list current | µs, complete list | ratio | sent (current) | sent (complete) |");
        println!("|---:|---:|---:|---:|---|---|");
    }
    for &k in &reg_cost {
        let c = scale::registration_cost(k, 1000)?;
        println!(
            "| {} | {:.1} | {:.1} | {:.1} | {} datagrams, {} B | {} datagrams, {} B |",
            k,
            c.current_us,
            c.full_list_us,
            c.full_list_us / c.current_us.max(0.001),
            c.current_out.0,
            c.current_out.1,
            c.full_list_out.0,
            c.full_list_out.1
        );
        costs.push(c);
    }
    let (iso, compact) = super::utc_now();
    let report = Report {
        date: iso,
        machine: super::Machine::probe(),
        runs,
        registration_cost: costs,
    };
    let json = super::write_json(&args.results, &format!("scale-{compact}.json"), &report)?;
    let pts = |f: &dyn Fn(&ScaleResult) -> Option<f64>| -> Vec<(f64, f64)> {
        report
            .runs
            .iter()
            .filter_map(|r| f(r).map(|y| (r.config.edges as f64, y)))
            .collect()
    };
    let svg = args.results.join(format!("scale-{compact}.svg"));
    lines(
        &[
            Panel {
                title: "supernode cost per edge",
                x: "edges",
                y: "bytes / µs",
                series: vec![
                    ("memory per edge (B)".into(), pts(&|r| r.sn_bytes_per_edge)),
                    (
                        "peer info per join, cold (B)".into(),
                        pts(&|r| Some(r.peerinfo_bytes_per_join_cold)),
                    ),
                    (
                        "CPU per registration (µs)".into(),
                        pts(&|r| Some(r.cpu_per_registration_us)),
                    ),
                    (
                        "signatures per join, cold".into(),
                        pts(&|r| Some(r.signatures_per_join_cold)),
                    ),
                    (
                        "edge memory per peer (B)".into(),
                        pts(&|r| r.edge_bytes_per_peer),
                    ),
                    (
                        "steady CPU per edge per s (µs)".into(),
                        pts(&|r| Some(r.sn_cpu_per_edge_s_us)),
                    ),
                ],
            },
            Panel {
                title: "convergence (virtual time)",
                x: "edges",
                y: "ms",
                series: vec![
                    (
                        "cold start: all know all".into(),
                        pts(&|r| r.cold.all_ms.map(|v| v as f64)),
                    ),
                    (
                        "cold start: all sessions".into(),
                        pts(&|r| r.cold_sessions.all_ms.map(|v| v as f64)),
                    ),
                    (
                        "restart: all know all".into(),
                        pts(&|r| r.restart.all_ms.map(|v| v as f64)),
                    ),
                    (
                        "restart: re-registered".into(),
                        pts(&|r| r.restart_reregistered_ms.map(|v| v as f64)),
                    ),
                    (
                        "outage: re-registered".into(),
                        pts(&|r| r.outage_reregistered_ms.map(|v| v as f64)),
                    ),
                    (
                        "churn: new ids known".into(),
                        pts(&|r| r.churn.all_ms.map(|v| v as f64)),
                    ),
                ],
            },
        ],
        &svg,
    )?;
    println!("wrote {} and {}", json.display(), svg.display());
    Ok(())
}

/// Arguments of `bench scale-store`.
#[derive(clap::Args, Debug)]
pub struct StoreArgs {
    /// Sites.
    #[arg(long, default_value_t = 1000)]
    pub sites: usize,
    /// Clusters.
    #[arg(long, default_value_t = 10_000)]
    pub clusters: usize,
    /// VMs per cluster.
    #[arg(long, default_value_t = 10)]
    pub vms_per_cluster: usize,
    /// Reservations one agent holds at each point of the agent run, comma-separated
    /// (0 or empty: no agent run).
    #[arg(long, value_delimiter = ',', default_value = "1,100,1000")]
    pub agent_clusters: Vec<usize>,
    /// Clusters reserved, confirmed, listed and released at each point of the agent run.
    #[arg(long, default_value_t = 11)]
    pub agent_reps: usize,
    /// Samples of each store call that changes nothing (the median is reported).
    #[arg(long, default_value_t = 5)]
    pub reps: usize,
    /// Only the agent run (no store filled).
    #[arg(long)]
    pub agent_only: bool,
    /// Where to write the JSON result.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// Fills the store and times its calls.
pub fn store(args: &StoreArgs) -> anyhow::Result<()> {
    let cfg = bench::storescale::StoreScaleConfig {
        sites: args.sites,
        clusters: args.clusters,
        vms_per_cluster: args.vms_per_cluster,
    };
    let r = if args.agent_only {
        None
    } else {
        let r = bench::storescale::run(&cfg, args.reps)?;
        println!(
            "{} sites, {} clusters, {} VMs (filled in {:.0} ms), load {:.2}\n",
            cfg.sites, cfg.clusters, r.vms, r.fill_ms, r.load
        );
        println!("| call | ms (median) | fastest-slowest | samples |\n|---|---:|---:|---:|");
        for t in &r.timings {
            println!(
                "| {} | {:.2} | {:.2}-{:.2} | {} |",
                t.op, t.ms, t.min_ms, t.max_ms, t.samples
            );
        }
        Some(r)
    };
    let points: Vec<usize> = args
        .agent_clusters
        .iter()
        .copied()
        .filter(|n| *n > 0)
        .collect();
    let agent = if points.is_empty() {
        Vec::new()
    } else {
        let a = bench::storescale::agent(&points, args.agent_reps.max(1))?;
        println!(
            "\none agent: median ms (min-max) of {} samples each\n",
            args.agent_reps.max(1)
        );
        println!("| reservations held | load | reserve | confirm | info | release | fill ms |\n|---:|---:|---:|---:|---:|---:|---:|");
        for p in &a {
            let o = |i: usize| {
                p.ops.get(i).map_or_else(String::new, |s| {
                    format!("{:.1} ({:.1}-{:.1})", s.median_ms, s.min_ms, s.max_ms)
                })
            };
            println!(
                "| {} | {:.1} | {} | {} | {} | {} | {:.0} |",
                p.clusters,
                p.load,
                o(0),
                o(1),
                o(2),
                o(3),
                p.fill_ms
            );
        }
        a
    };
    #[derive(Serialize)]
    struct StoreReport {
        store: Option<bench::storescale::StoreScaleResult>,
        agent: Vec<bench::storescale::AgentScaleResult>,
    }
    let (_, compact) = super::utc_now();
    let json = super::write_json(
        &args.results,
        &format!("scale-store-{compact}.json"),
        &StoreReport { store: r, agent },
    )?;
    println!("wrote {}", json.display());
    Ok(())
}
