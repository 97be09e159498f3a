//! `bench hpl`: HPL (Debian's `hpcc`, with OpenMPI) on 1..N nodes of a three-site cluster,
//! submitted as a Slurm batch job (the 2012 paper's figure 13: Gflop/s against the number
//! of nodes), over the mvc overlay and over the raw routed underlay between the same VM
//! namespaces, at each one-way delay the WAN emulator adds on the uplinks of sites B and C.
//!
//! The frontend VM (site A) runs slurmctld, the compute VMs at A, B and C slurmd
//! (`control::stack`, as `cluster create --stack slurm` runs them; one Slurm per network,
//! side by side, see `slurmlab`). A job is `sbatch -N K` of a script that runs `mpirun`
//! inside the allocation (OpenMPI starts its daemons on the allocated nodes through
//! `srun`); hpcc writes its summary into the job's directory, which the bench reads. The
//! node sweep forces round-robin placement (`-w`: A, B, C, A, ...); at `--placement K`
//! nodes the overlay also runs a job without `-w`, which Slurm's `topology/tree` keeps
//! within one site, so the figure shows one site against three. The sites are public
//! (no NAT), so the raw underlay joins every pair of VMs both ways, as MPI needs; runs
//! alternate between the networks, so both see the same machine load.

use std::time::Duration;

use anyhow::{bail, Context};
use lab::overlay::{Mvc, MvcCluster};
use lab::{Lab, Topology, Vm};
use serde::Serialize;

use super::apps::{self, Net};
use super::figure::Panel;
use super::find_mvc;
use super::slurmlab::SlurmLab;
use super::wanem::{LinkArgs, Wan};

/// slurmctld and slurmd ports of the underlay's Slurm and the overlay's.
const PORTS: [(u16, u16); 2] = [(6821, 6822), (6823, 6824)];

/// Options of `bench hpl`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: apps::CommonArgs,
    /// Node counts to run, comma-separated (one MPI rank per node, placed A, B, C, A, ...).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub nodes: Vec<usize>,
    /// One-way delays (ms) added on the uplinks of sites B and C, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,20")]
    pub delay: Vec<u32>,
    /// Node count at which a job placed by Slurm (one site) is run beside the spread one
    /// (0: none). Every site gets at least this many compute VMs.
    #[arg(long, default_value_t = 3)]
    pub placement: usize,
    /// HPL problem size N (the matrix is N x N doubles).
    #[arg(long, default_value_t = 1000)]
    pub n: u32,
    /// HPL block size NB.
    #[arg(long, default_value_t = 80)]
    pub nb: u32,
    /// Seconds one hpcc job may take before it is cancelled.
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

/// The batch script of one hpcc job: it names its nodes, runs `mpirun` inside the
/// allocation (one rank per node, TCP only, on the addresses of `cidr`) and records
/// its start, end and exit code. hpcc reads `hpccinf.txt` from and writes
/// `hpccoutf.txt` to the job's directory.
pub fn job_script(cidr: &str) -> String {
    format!(
        "#!/bin/sh
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
export OPENBLAS_NUM_THREADS=1 OMP_NUM_THREADS=1
scontrol show hostnames \"$SLURM_JOB_NODELIST\" | sed 's/^/NODE /'
t0=$(date +%s.%N)
mpirun --allow-run-as-root -np \"$SLURM_JOB_NUM_NODES\" --map-by node \\
  --mca btl tcp,self --mca pml ob1 \\
  --mca btl_tcp_if_include {cidr} --mca oob_tcp_if_include {cidr} \\
  -x OPENBLAS_NUM_THREADS -x OMP_NUM_THREADS hpcc
rc=$?
echo \"WALL $t0 $(date +%s.%N) $rc\"
exit $rc
"
    )
}

/// What a job's script printed: its nodes, wall seconds of `mpirun`, its exit code.
#[derive(Debug, Clone, PartialEq)]
pub struct JobOut {
    /// Node names, as Slurm allocated them.
    pub nodes: Vec<String>,
    /// Seconds `mpirun` ran.
    pub wall_s: f64,
    /// `mpirun`'s exit code.
    pub rc: i32,
}

/// Parses the `NODE` and `WALL` lines of [`job_script`]'s output; None without a
/// (sane) `WALL` line or without nodes.
pub fn parse_job_output(out: &str) -> Option<JobOut> {
    let nodes: Vec<String> = out
        .lines()
        .filter_map(|l| l.strip_prefix("NODE "))
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty())
        .collect();
    let w: Vec<&str> = out
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("WALL "))?
        .split_whitespace()
        .collect();
    let [t0, t1, rc] = w.as_slice() else {
        return None;
    };
    let (t0, t1) = (t0.parse::<f64>().ok()?, t1.parse::<f64>().ok()?);
    let wall_s = t1 - t0;
    if nodes.is_empty() || !wall_s.is_finite() || wall_s < 0.0 {
        return None;
    }
    Some(JobOut {
        nodes,
        wall_s,
        rc: rc.parse().ok()?,
    })
}

/// The runs of one network and placement at one node count and delay.
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
    /// Seconds of the whole hpcc run (every HPC Challenge test, `mpirun` in the job) of
    /// each run.
    pub wall_s_runs: Vec<f64>,
    /// Median wall seconds.
    pub wall_s: f64,
    /// Sites the job's nodes were at, each run.
    pub sites_runs: Vec<usize>,
    /// Nodes of the last run.
    pub nodes: Vec<String>,
}

impl Runs {
    fn finish(&mut self) {
        self.gflops = lab::median(&self.gflops_runs).unwrap_or(f64::NAN);
        self.hpl_s = lab::median(&self.hpl_s_runs).unwrap_or(f64::NAN);
        self.wall_s = lab::median(&self.wall_s_runs).unwrap_or(f64::NAN);
    }

    fn sites(&self) -> usize {
        self.sites_runs.iter().copied().max().unwrap_or(0)
    }
}

/// One node count at one delay.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Added one-way delay on B's and C's uplinks, ms.
    pub delay_ms: u32,
    /// Nodes (= MPI ranks).
    pub nodes: usize,
    /// Process grid.
    pub grid: (usize, usize),
    /// Over the mvc overlay, nodes placed A, B, C, A, ...
    pub mvc: Runs,
    /// Over the raw underlay (the reference), same nodes.
    pub raw: Runs,
    /// Over the mvc overlay, nodes chosen by Slurm (`--placement` only).
    pub mvc_placed: Option<Runs>,
}

#[derive(Serialize)]
struct Fields<'a> {
    n: u32,
    nb: u32,
    runs: u32,
    placement: usize,
    rows: &'a [Row],
}

/// One job: hpcc on `k` nodes of `slurm` (`-w nodelist` when given), over `net`, in
/// the frontend's `home/tag`. Returns (Gflop/s, HPL seconds, job output).
fn one_run(
    lab: &Lab,
    slurm: &SlurmLab,
    net: Net,
    k: usize,
    nodelist: Option<&str>,
    args: &Args,
    tag: &str,
) -> anyhow::Result<(f64, f64, JobOut)> {
    let dir = slurm.home.join(tag);
    std::fs::create_dir_all(&dir)?;
    let (p, q) = grid(k);
    std::fs::write(dir.join("hpccinf.txt"), hpccinf(args.n, args.nb, p, q))?;
    std::fs::write(dir.join("job.sh"), job_script(net.cidr()))?;
    let d = dir.display().to_string();
    let out = format!("{d}/out.txt");
    let script = format!("{d}/job.sh");
    let nodes = k.to_string();
    let mut argv = vec![
        "sbatch",
        "--parsable",
        "-N",
        &nodes,
        "--chdir",
        &d,
        "-o",
        &out,
    ];
    let w;
    if let Some(l) = nodelist {
        w = format!("--nodelist={l}");
        argv.push(&w);
    }
    argv.push(&script);
    let limit = Duration::from_secs(args.timeout);
    let o = slurm.run(lab, &argv, Duration::from_secs(60))?;
    let job = o.stdout.trim().split(';').next().unwrap_or("").to_string();
    if !o.ok || job.parse::<u64>().is_err() {
        bail!("sbatch over {}: {}{}", slurm.name, o.stdout, o.stderr);
    }
    slurm.wait_gone(lab, &job, limit)?;
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let jo = parse_job_output(&text).with_context(|| {
        format!(
            "job {job} over {} left no result in {out}: {text}",
            net.name()
        )
    })?;
    if jo.rc != 0 || jo.nodes.len() != k {
        bail!(
            "job {job}: hpcc on {k} nodes over {} failed (exit {}, nodes {:?}): {}",
            net.name(),
            jo.rc,
            jo.nodes,
            text.chars().take(2000).collect::<String>()
        );
    }
    let summary = std::fs::read_to_string(dir.join("hpccoutf.txt")).unwrap_or_default();
    let (gf, secs) = parse_hpcc(&summary)
        .with_context(|| format!("no HPL result in {d}/hpccoutf.txt (job said: {text})"))?;
    Ok((gf, secs, jo))
}

fn fmt_opt(v: Option<f64>, prec: usize) -> String {
    match v {
        Some(x) if x.is_finite() => format!("{x:.prec$}"),
        _ => "-".into(),
    }
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| delay ms (B, C uplinks) | nodes | grid | mvc Gflop/s (A, B, C, ...) | raw Gflop/s (same nodes) | mvc of raw | mvc Gflop/s (Slurm placed) | sites Slurm used | placed / spread | mvc HPL s | raw HPL s | mvc hpcc s | raw hpcc s |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let placed = r.mvc_placed.as_ref();
        s.push_str(&format!(
            "| {} | {} | {}x{} | {:.3} | {:.3} | {:.1}% | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.1} |\n",
            r.delay_ms,
            r.nodes,
            r.grid.0,
            r.grid.1,
            r.mvc.gflops,
            r.raw.gflops,
            100.0 * r.mvc.gflops / r.raw.gflops,
            fmt_opt(placed.map(|p| p.gflops), 3),
            placed.map_or("-".into(), |p| p.sites().to_string()),
            fmt_opt(placed.map(|p| p.gflops / r.mvc.gflops), 2),
            r.mvc.hpl_s,
            r.raw.hpl_s,
            r.mvc.wall_s,
            r.raw.wall_s,
        ));
    }
    s
}

/// The compute VMs placed round-robin over the sites: A's first, B's first, C's
/// first, A's second, ... (`per_site` of each, site by site in `computes`).
fn round_robin(computes: &[(Vm, String)], sites: usize, per_site: usize) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..per_site {
        for s in 0..sites {
            if let Some((vm, _)) = computes.get(s * per_site + i) {
                v.push(apps::node_name(vm));
            }
        }
    }
    v
}

/// `bench hpl`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.nodes.is_empty() || args.nodes.iter().any(|&n| n == 0 || n > 12) {
        bail!("--nodes must be counts in 1..=12");
    }
    if args.delay.is_empty() || args.delay.iter().any(|&d| d > 150) {
        bail!("--delay takes one-way delays in 0..=150 ms");
    }
    if args.placement > 4 || (args.placement > 0 && !args.nodes.contains(&args.placement)) {
        bail!("--placement must be 0 or one of --nodes, at most 4");
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
    let per_site = usize::from(apps::vms_per_site(max, 3)).max(args.placement);
    let per = u8::try_from(per_site)?;
    let lab = Lab::new("hpl")?;
    // Site A holds the frontend VM and its computes; B and C sit behind a WAN link.
    let mut t = Topology::new(&lab)?;
    t.add_site(&lab, "a", false, per + 1)?;
    let mut wans = Vec::new();
    for s in ["b", "c"] {
        let site = t.add_site_wan(&lab, s, false, per, true)?;
        wans.push(Wan::new(
            site.wan.as_deref().context("site has no WAN namespace")?,
        ));
    }
    for w in &mut wans {
        w.set(&lab, &LinkArgs::delay(0.0))?;
    }
    let frontend = t.sites[0].vms[0].clone();
    let computes: Vec<(Vm, String)> = t
        .sites
        .iter()
        .flat_map(|s| {
            let skip = usize::from(s.idx == 1);
            s.vms.iter().skip(skip).map(|v| (v.clone(), s.name.clone()))
        })
        .collect();
    let site_of = |node: &str| {
        computes
            .iter()
            .find(|(vm, _)| apps::node_name(vm) == node)
            .map(|(_, s)| s.clone())
    };
    let spread = round_robin(&computes, 3, per_site);
    let cluster = MvcCluster::start(&lab, &t, &mvc, |_| {})?;
    for (vm, _) in &computes {
        for net in [Net::Mvc, Net::Raw] {
            lab::wait_ping(&lab, &frontend.ns, net.addr(vm), Duration::from_secs(30))
                .with_context(|| format!("{} unreachable over {}", vm.ns, net.name()))?;
        }
    }
    // One Slurm per network (own name, ports, key and state), one at a time: a run
    // leaves the VMs only its network's address (`apps::use_only`), so the other
    // Slurm's nodes could not answer; it is stopped at each switch and started again
    // (with its state) when its network is back, which waits for every node idle.
    let mut active: Option<(Net, SlurmLab)> = None;
    let per_delay = args.nodes.len() * 2 + usize::from(args.placement > 0);
    let steps = (args.delay.len() * per_delay) as u64 * u64::from(args.common.runs);
    let pb = apps::progress(steps, "hpl");
    let mut rows = Vec::new();
    for &d in &args.delay {
        for w in &mut wans {
            w.set(&lab, &LinkArgs::delay(f64::from(d)))?;
        }
        for &n in &args.nodes {
            let list = spread[..n].join(",");
            let mut row = Row {
                delay_ms: d,
                nodes: n,
                grid: grid(n),
                mvc: Runs::default(),
                raw: Runs::default(),
                mvc_placed: (n == args.placement).then(Runs::default),
            };
            for i in 0..args.common.runs {
                let mut jobs = vec![
                    (Net::Raw, Some(list.as_str())),
                    (Net::Mvc, Some(list.as_str())),
                ];
                if n == args.placement {
                    jobs.push((Net::Mvc, None));
                }
                for (net, nodelist) in jobs {
                    let how = if nodelist.is_some() {
                        "spread"
                    } else {
                        "placed"
                    };
                    pb.set_message(format!(
                        "{d} ms, {n} nodes {how} over {}, run {}",
                        net.name(),
                        i + 1
                    ));
                    if active.as_ref().is_none_or(|(n, _)| *n != net) {
                        if let Some((_, s)) = active.take() {
                            s.stop(&lab);
                        }
                        apps::use_only(&lab, &t, net)?;
                        let ports = PORTS[usize::from(net == Net::Mvc)];
                        let s = SlurmLab::start(&lab, "hpl", net, &frontend, &computes, ports)?;
                        active = Some((net, s));
                    }
                    let Some((_, slurm)) = &active else {
                        bail!("no Slurm running");
                    };
                    let tag = format!("{d}-{n}-{}-{how}-{i}", net.name());
                    let (gf, secs, jo) = one_run(&lab, slurm, net, n, nodelist, args, &tag)?;
                    let r = match (net, nodelist) {
                        (Net::Raw, _) => &mut row.raw,
                        (Net::Mvc, Some(_)) => &mut row.mvc,
                        (Net::Mvc, None) => row.mvc_placed.get_or_insert_with(Runs::default),
                    };
                    let mut sites: Vec<String> =
                        jo.nodes.iter().filter_map(|x| site_of(x)).collect();
                    sites.sort();
                    sites.dedup();
                    r.gflops_runs.push(gf);
                    r.hpl_s_runs.push(secs);
                    r.wall_s_runs.push(jo.wall_s);
                    r.sites_runs.push(sites.len());
                    r.nodes = jo.nodes;
                    pb.inc(1);
                }
            }
            row.mvc.finish();
            row.raw.finish();
            if let Some(p) = &mut row.mvc_placed {
                p.finish();
            }
            apps::note(
                &pb,
                format!(
                    "{d} ms, {n} nodes: mvc {:.3} Gflop/s, raw {:.3} Gflop/s{}",
                    row.mvc.gflops,
                    row.raw.gflops,
                    row.mvc_placed.as_ref().map_or(String::new(), |p| format!(
                        ", mvc placed by Slurm on {:?} {:.3} Gflop/s",
                        p.nodes, p.gflops
                    ))
                ),
            );
            rows.push(row);
        }
    }
    pb.finish_and_clear();
    if let Some((_, s)) = &active {
        s.stop(&lab);
    }
    cluster.stop(&lab);
    lab.teardown();
    let when = info.finish();
    let md = table(&rows);
    let head = format!(
        "HPL (hpcc, N={}, NB={}, one rank per node) as Slurm batch jobs (mpirun inside the allocation), submitted on the frontend at site A; nodes forced A, B, C, A, ... (`-w`), and at {} nodes also placed by Slurm (topology/tree); delay added each way on B's and C's uplinks; median of {} runs, {when}",
        args.n,
        args.nb,
        args.placement,
        args.common.runs,
    );
    let fields = Fields {
        n: args.n,
        nb: args.nb,
        runs: args.common.runs,
        placement: args.placement,
        rows: &rows,
    };
    let mut by_nodes = Vec::new();
    for &d in &args.delay {
        for (name, raw) in [("mvc", false), ("raw", true)] {
            let pts = rows
                .iter()
                .filter(|r| r.delay_ms == d)
                .map(|r| {
                    (
                        r.nodes as f64,
                        if raw { r.raw.gflops } else { r.mvc.gflops },
                    )
                })
                .collect();
            by_nodes.push((format!("{name}, {d} ms"), pts));
        }
    }
    let at_k: Vec<&Row> = rows.iter().filter(|r| r.nodes == args.placement).collect();
    let by_delay = |f: &dyn Fn(&Row) -> f64| -> Vec<(f64, f64)> {
        at_k.iter().map(|r| (f64::from(r.delay_ms), f(r))).collect()
    };
    let title = format!("{} nodes: one site (Slurm) against three", args.placement);
    let mut panels = vec![Panel {
        title: "HPL over sites A, B, C (hpcc, Slurm)",
        x: "nodes (one rank each, placed A, B, C, A, ...)",
        y: "Gflop/s",
        series: by_nodes,
    }];
    if args.placement > 0 {
        panels.push(Panel {
            title: &title,
            x: "added one-way delay on sites B and C (ms)",
            y: "Gflop/s",
            series: vec![
                (
                    "mvc, one site (Slurm's choice)".into(),
                    by_delay(&|r| r.mvc_placed.as_ref().map_or(f64::NAN, |p| p.gflops)),
                ),
                ("mvc, three sites (-w)".into(), by_delay(&|r| r.mvc.gflops)),
                ("raw, three sites (-w)".into(), by_delay(&|r| r.raw.gflops)),
            ],
        });
    }
    info.save(&args.common.results, &head, &md, &fields, &panels)?;
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

    #[test]
    fn job_script_runs_mpirun_on_the_network_and_reports() {
        let s = job_script("198.19.0.0/16");
        assert!(s.starts_with("#!/bin/sh\n"));
        assert!(s.contains(
            "--mca btl_tcp_if_include 198.19.0.0/16 --mca oob_tcp_if_include 198.19.0.0/16"
        ));
        assert!(s.contains("-np \"$SLURM_JOB_NUM_NODES\" --map-by node"));
        assert!(s.contains("scontrol show hostnames \"$SLURM_JOB_NODELIST\""));
        assert!(s.contains("echo \"WALL $t0 $(date +%s.%N) $rc\"\nexit $rc\n"));
        assert!(!s.contains('{'));
    }

    #[test]
    fn job_output_is_parsed_and_garbage_rejected() {
        let t = "NODE a2\nNODE b1\nsome mpirun noise\nWALL 100.25 112.75 0\n";
        let j = parse_job_output(t).unwrap();
        assert_eq!(j.nodes, ["a2", "b1"]);
        assert_eq!((j.wall_s, j.rc), (12.5, 0));
        assert_eq!(parse_job_output("NODE a2\nWALL 1 2 137\n").unwrap().rc, 137);
        assert!(parse_job_output("NODE a2\n").is_none());
        assert!(parse_job_output("WALL 1 2 0\n").is_none());
        assert!(parse_job_output("NODE a2\nWALL 5 2 0\n").is_none());
        assert!(parse_job_output("NODE a2\nWALL x 2 0\n").is_none());
        assert!(parse_job_output("NODE a2\nWALL 1 2\n").is_none());
    }

    #[test]
    fn spread_takes_each_site_in_turn() {
        let vm = |n: &str| lab::Vm {
            ns: format!("hpl1-{n}"),
            ifname: "eth0".into(),
            port: String::new(),
            ip: std::net::Ipv4Addr::LOCALHOST,
            underlay_ip: std::net::Ipv4Addr::LOCALHOST,
            mac: String::new(),
        };
        let c: Vec<(lab::Vm, String)> = ["a2", "a3", "b1", "b2", "c1", "c2"]
            .iter()
            .map(|n| (vm(n), n[..1].to_string()))
            .collect();
        assert_eq!(round_robin(&c, 3, 2), ["a2", "b1", "c1", "a3", "b2", "c2"]);
    }
}
