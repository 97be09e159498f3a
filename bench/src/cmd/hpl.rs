//! `bench hpl`: HPL (Debian's `hpcc`, with OpenMPI) on 1..N nodes of a three-site cluster,
//! over the mvc overlay and over the raw routed underlay between the same VM namespaces
//! (the 2012 paper's figure 13: Gflop/s against the number of nodes).
//!
//! The three sites are public here (no NAT), so that the raw underlay joins every pair
//! of VMs both ways, as MPI needs; the overlay runs over the same links. Node k is VM
//! k/3+1 of site k%3 (A, B, C, A, ...). Raw and overlay runs alternate (raw, mvc, raw,
//! mvc, ...), so both see the same machine load.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::overlay::{Mvc, MvcCluster};
use lab::{Lab, Topology};
use serde::Serialize;

use super::apps::{self, Net};
use super::figure::Panel;
use super::find_mvc;

/// Options of `bench hpl`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: apps::CommonArgs,
    /// Node counts to run, comma-separated (one MPI rank per node).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3,4")]
    pub nodes: Vec<usize>,
    /// HPL problem size N (the matrix is N x N doubles).
    #[arg(long, default_value_t = 1000)]
    pub n: u32,
    /// HPL block size NB.
    #[arg(long, default_value_t = 80)]
    pub nb: u32,
    /// Seconds one hpcc run may take before it is killed.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// hpcc's input file; @N@, @NB@, @P@, @Q@ are filled in.
const HPCCINF: &str = "HPLinpack benchmark input file
Innovative Computing Laboratory, University of Tennessee
HPL.out      output file name (if any)
8            device out (6=stdout,7=stderr,file)
1            # of problems sizes (N)
@N@          Ns
1            # of NBs
@NB@         NBs
0            PMAP process mapping (0=Row-,1=Column-major)
1            # of process grids (P x Q)
@P@          Ps
@Q@          Qs
16.0         threshold
1            # of panel fact
2            PFACTs (0=left, 1=Crout, 2=Right)
1            # of recursive stopping criterium
4            NBMINs (>= 1)
1            # of panels in recursion
2            NDIVs
1            # of recursive panel fact.
1            RFACTs (0=left, 1=Crout, 2=Right)
1            # of broadcast
1            BCASTs (0=1rg,1=1rM,2=2rg,3=2rM,4=Lng,5=LnM)
1            # of lookahead depth
1            DEPTHs (>=0)
2            SWAP (0=bin-exch,1=long,2=mix)
64           swapping threshold
0            L1 in (0=transposed,1=no-transposed) form
0            U  in (0=transposed,1=no-transposed) form
1            Equilibration (0=no,1=yes)
8            memory alignment in double (> 0)
##### This line (no. 32) is ignored (it serves as a separator). ######
0                      		Number of additional problem sizes for PTRANS
1200 10000 30000        	values of N
0                       	number of additional blocking sizes for PTRANS
40 9 8 13 13 20 16 32 64       	values of NB
";

/// The process grid P x Q for `np` ranks: P <= Q, P as large as divides `np`.
pub fn grid(np: usize) -> (usize, usize) {
    let mut p = 1;
    let mut i = 1;
    while i * i <= np {
        if np % i == 0 {
            p = i;
        }
        i += 1;
    }
    (p, np / p.max(1))
}

/// hpcc's input for problem size `n`, block `nb`, grid `p` x `q`.
pub fn hpccinf(n: u32, nb: u32, p: usize, q: usize) -> String {
    HPCCINF
        .replace("@NB@", &nb.to_string())
        .replace("@N@", &n.to_string())
        .replace("@P@", &p.to_string())
        .replace("@Q@", &q.to_string())
}

/// HPL's result in hpcc's summary (`hpccoutf.txt`): (Gflop/s, seconds of the solve).
pub fn parse_hpcc(out: &str) -> Option<(f64, f64)> {
    let field = |k: &str| {
        out.lines()
            .rev()
            .filter_map(|l| l.trim().strip_prefix(k))
            .filter_map(|v| v.strip_prefix('='))
            .find_map(|v| v.trim().parse::<f64>().ok())
    };
    let tflops = field("HPL_Tflops")?;
    let secs = field("HPL_time")?;
    if !(tflops.is_finite() && tflops > 0.0 && secs.is_finite() && secs > 0.0) {
        return None;
    }
    Some((tflops * 1000.0, secs))
}

/// The runs of one network at one node count.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Runs {
    /// Gflop/s of each run.
    pub gflops_runs: Vec<f64>,
    /// Median Gflop/s.
    pub gflops: f64,
    /// HPL solve seconds of each run.
    pub hpl_s_runs: Vec<f64>,
    /// Median HPL solve seconds.
    pub hpl_s: f64,
    /// Wall seconds of the whole hpcc run (every HPC Challenge test) of each run.
    pub wall_s_runs: Vec<f64>,
    /// Median wall seconds.
    pub wall_s: f64,
}

impl Runs {
    fn finish(&mut self) {
        self.gflops = lab::median(&self.gflops_runs).unwrap_or(f64::NAN);
        self.hpl_s = lab::median(&self.hpl_s_runs).unwrap_or(f64::NAN);
        self.wall_s = lab::median(&self.wall_s_runs).unwrap_or(f64::NAN);
    }
}

/// One node count.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Nodes (= MPI ranks).
    pub nodes: usize,
    /// Sites the nodes are at.
    pub sites: usize,
    /// Process grid.
    pub grid: (usize, usize),
    /// Over the mvc overlay.
    pub mvc: Runs,
    /// Over the raw underlay (the reference).
    pub raw: Runs,
}

#[derive(Serialize)]
struct Fields<'a> {
    n: u32,
    nb: u32,
    runs: u32,
    rows: &'a [Row],
}

fn one_run(
    lab: &Lab,
    vms: &[lab::Vm],
    net: Net,
    launcher: &std::path::Path,
    args: &Args,
    tag: &str,
) -> anyhow::Result<(f64, f64, f64)> {
    let dir = lab.dir().join(format!("hpl-{tag}"));
    std::fs::create_dir_all(&dir)?;
    let (p, q) = grid(vms.len());
    std::fs::write(dir.join("hpccinf.txt"), hpccinf(args.n, args.nb, p, q))?;
    let hf = dir.join("hosts");
    apps::write_hostfile(&hf, vms, net)?;
    let argv = apps::mpirun_argv(vms, net, &hf, launcher, &dir, &["hpcc"]);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let t0 = Instant::now();
    let out = lab.exec_timeout(&vms[0].ns, &argv, Duration::from_secs(args.timeout))?;
    let wall = t0.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(dir.join("hpccoutf.txt")).unwrap_or_default();
    if !out.ok {
        bail!(
            "hpcc on {} nodes over {} failed: {}{}",
            vms.len(),
            net.name(),
            out.stderr.trim(),
            out.stdout.chars().take(2000).collect::<String>()
        );
    }
    let (gf, secs) = parse_hpcc(&text).with_context(|| {
        format!(
            "no HPL result in {}/hpccoutf.txt (mpirun said: {})",
            dir.display(),
            out.stderr.trim()
        )
    })?;
    Ok((gf, secs, wall))
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| nodes | sites | grid | mvc Gflop/s | raw Gflop/s | mvc of raw | mvc HPL s | raw HPL s | mvc hpcc wall s | raw hpcc wall s |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {}x{} | {:.3} | {:.3} | {:.1}% | {:.2} | {:.2} | {:.1} | {:.1} |\n",
            r.nodes,
            r.sites,
            r.grid.0,
            r.grid.1,
            r.mvc.gflops,
            r.raw.gflops,
            100.0 * r.mvc.gflops / r.raw.gflops,
            r.mvc.hpl_s,
            r.raw.hpl_s,
            r.mvc.wall_s,
            r.raw.wall_s,
        ));
    }
    s
}

/// `bench hpl`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.nodes.is_empty() || args.nodes.iter().any(|&n| n == 0 || n > 12) {
        bail!("--nodes must be counts in 1..=12");
    }
    if args.common.runs == 0
        || args.common.runs > 20
        || !(100..=20_000).contains(&args.n)
        || args.nb == 0
    {
        bail!("--runs must be 1..=20, --n 100..=20000, --nb > 0");
    }
    if !lab::is_root() {
        bail!("bench hpl builds network namespaces: run it as root");
    }
    apps::ensure_packages(&[("hpcc", "hpcc"), ("mpirun", "openmpi-bin")])?;
    let mvc = Mvc {
        bin: find_mvc(args.common.mvc.clone())?,
    };
    let mut info = apps::RunInfo::start("hpl");
    let max = args.nodes.iter().copied().max().unwrap_or(1);
    let lab = Lab::new("hpl")?;
    let per_site = apps::vms_per_site(max, 3);
    let mut t = Topology::new(&lab)?;
    for s in ["a", "b", "c"] {
        t.add_site(&lab, s, false, per_site)?;
    }
    let all = apps::nodes(&t, max)?;
    let launcher = apps::write_launcher(lab.dir(), &all)?;
    let cluster = MvcCluster::start(&lab, &t, &mvc, |_| {})?;
    for vm in &all[1..] {
        for net in [Net::Mvc, Net::Raw] {
            lab::wait_ping(&lab, &all[0].ns, net.addr(vm), Duration::from_secs(30))
                .with_context(|| format!("{} unreachable over {}", vm.ns, net.name()))?;
        }
    }
    let steps = args.nodes.len() as u64 * u64::from(args.common.runs) * 2;
    let pb = apps::progress(steps, "hpl");
    let mut rows = Vec::new();
    for &n in &args.nodes {
        let vms = &all[..n];
        let mut row = Row {
            nodes: n,
            sites: n.min(3),
            grid: grid(n),
            mvc: Runs::default(),
            raw: Runs::default(),
        };
        for i in 0..args.common.runs {
            for net in [Net::Raw, Net::Mvc] {
                pb.set_message(format!("{n} nodes over {}, run {}", net.name(), i + 1));
                apps::use_only(&lab, &t, net)?;
                if let Some(last) = vms.last() {
                    lab::wait_ping(&lab, &vms[0].ns, net.addr(last), Duration::from_secs(30))?;
                }
                let (gf, secs, wall) = one_run(
                    &lab,
                    vms,
                    net,
                    &launcher,
                    args,
                    &format!("{n}-{}-{i}", net.name()),
                )?;
                let r = if net == Net::Mvc {
                    &mut row.mvc
                } else {
                    &mut row.raw
                };
                r.gflops_runs.push(gf);
                r.hpl_s_runs.push(secs);
                r.wall_s_runs.push(wall);
                pb.inc(1);
            }
        }
        row.mvc.finish();
        row.raw.finish();
        apps::note(
            &pb,
            format!(
                "{n} nodes: mvc {:.3} Gflop/s, raw {:.3} Gflop/s",
                row.mvc.gflops, row.raw.gflops
            ),
        );
        rows.push(row);
    }
    pb.finish_and_clear();
    cluster.stop(&lab);
    lab.teardown();
    let when = info.finish();
    let md = table(&rows);
    let head = format!(
        "HPL (hpcc, N={}, NB={}, one rank per node, nodes placed A, B, C, A, ...), median of {} runs, {when}",
        args.n,
        args.nb,
        args.common.runs,
    );
    let fields = Fields {
        n: args.n,
        nb: args.nb,
        runs: args.common.runs,
        rows: &rows,
    };
    let series = |f: fn(&Row) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (r.nodes as f64, f(r))).collect()
    };
    info.save(
        &args.common.results,
        &head,
        &md,
        &fields,
        &[
            Panel {
                title: "HPL performance (hpcc)",
                x: "nodes (one rank each, over 1-3 sites)",
                y: "Gflop/s",
                series: vec![
                    ("mvc overlay".into(), series(|r| r.mvc.gflops)),
                    ("raw underlay".into(), series(|r| r.raw.gflops)),
                ],
            },
            Panel {
                title: "HPL solve time",
                x: "nodes",
                y: "seconds",
                series: vec![
                    ("mvc overlay".into(), series(|r| r.mvc.hpl_s)),
                    ("raw underlay".into(), series(|r| r.raw.hpl_s)),
                ],
            },
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grids_are_near_square() {
        assert_eq!(grid(1), (1, 1));
        assert_eq!(grid(2), (1, 2));
        assert_eq!(grid(4), (2, 2));
        assert_eq!(grid(6), (2, 3));
        assert_eq!(grid(7), (1, 7));
    }

    #[test]
    fn input_file_has_the_settings_in_place() {
        let s = hpccinf(1234, 64, 2, 3);
        let l: Vec<&str> = s.lines().collect();
        assert!(l[5].starts_with("1234 "), "{}", l[5]);
        assert!(l[7].starts_with("64 "), "{}", l[7]);
        assert!(l[10].starts_with("2 "), "{}", l[10]);
        assert!(l[11].starts_with("3 "), "{}", l[11]);
        assert!(!s.contains('@'));
    }

    #[test]
    fn parses_the_summary_and_rejects_garbage() {
        let s = "Begin of Summary section.\nHPL_Tflops=0.000487344\nHPL_time=4.62379\nHPL_N=1500\n";
        let (gf, t) = parse_hpcc(s).unwrap();
        assert!((gf - 0.487344).abs() < 1e-9);
        assert!((t - 4.62379).abs() < 1e-9);
        assert!(parse_hpcc("HPL_Tflops=nan\nHPL_time=1\n").is_none());
        assert!(parse_hpcc("nothing").is_none());
    }
}
