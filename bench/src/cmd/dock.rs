//! `bench dock`: a DOCK-like parameter study (the 2012 paper's figure 12) submitted as a
//! Slurm job array. The frontend VM (site A) runs slurmctld, the worker VMs at three
//! sites slurmd (`control::stack`, as `cluster create --stack slurm` runs them); each
//! array task fetches the study's inputs (receptor, ligand, its line of the job list)
//! from the frontend over HTTP, runs one small AutoDock Vina docking and writes its
//! result (node, seconds, the docked pose) to its job output, which the bench reads.
//! The total time (`sbatch --wait` of the array, submission to the last task's end) is
//! measured against the one-way delay the WAN emulator adds on the uplinks of sites B
//! and C, with one Slurm over the mvc overlay and another over the raw routed underlay
//! between the same VMs, alternating raw and overlay runs. The sites are public here
//! (no NAT): slurmctld connects to every slurmd, which the raw underlay allows only
//! without NAT.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::overlay::{Mvc, MvcCluster};
use lab::{Lab, Topology, Vm};
use serde::{Deserialize, Serialize};

use super::apps::{self, Net};
use super::figure::Panel;
use super::find_mvc;
use super::slurmlab::{self, SlurmLab};
use super::wanem::{LinkArgs, Wan};

/// Where Debian's autodock-vina ships its test complex.
const TEST_DATA: &str = "/usr/share/doc/autodock-vina/test-data";
/// The TCP port the frontend serves the study's inputs on.
const PORT: u16 = 7800;
/// slurmctld and slurmd ports of the overlay's Slurm and the underlay's.
const PORTS: [(u16, u16); 2] = [(6817, 6818), (6819, 6820)];

/// Options of `bench dock`.
#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub common: apps::CommonArgs,
    /// One-way delays (ms) added on the uplinks of sites B and C, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,20,60,100,140")]
    pub delay: Vec<u32>,
    /// Docking jobs per run.
    #[arg(long, default_value_t = 12)]
    pub jobs: u32,
    /// Worker VMs per site.
    #[arg(long, default_value_t = 1)]
    pub workers: u8,
    /// Vina's evaluations per Monte Carlo run (keeps each job short).
    #[arg(long, default_value_t = 1000)]
    pub max_evals: u32,
    /// Seconds one run may take before it is abandoned.
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
}

/// One docking job.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Job {
    /// Job number.
    pub id: u32,
    /// Centre of the search box (Angstrom).
    pub center: [f64; 3],
    /// Edge of the (cubic) search box.
    pub size: f64,
    /// Random seed.
    pub seed: u32,
    /// Vina's `--max_evals`.
    pub max_evals: u32,
}

/// One job's result.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct JobResult {
    /// Job number.
    pub id: u32,
    /// Best affinity (kcal/mol), when vina succeeded.
    pub affinity: Option<f64>,
    /// Worker's node name.
    pub node: String,
    /// Seconds vina ran.
    pub secs: f64,
}

/// The parameter study: box centres on a small grid around the test complex's pocket
/// (the centre of Debian's test configuration), one seed per job.
pub fn jobs(n: u32, max_evals: u32) -> Vec<Job> {
    let base = [11.0, 90.5, 57.5];
    (0..n)
        .map(|i| {
            let k = f64::from(i % 27);
            let off = [
                (k % 3.0 - 1.0) * 2.0,
                ((k / 3.0).floor() % 3.0 - 1.0) * 2.0,
                ((k / 9.0).floor() - 1.0) * 2.0,
            ];
            Job {
                id: i,
                center: [base[0] + off[0], base[1] + off[1], base[2] + off[2]],
                size: 20.0,
                seed: 1000 + i,
                max_evals,
            }
        })
        .collect()
}

/// The receptor (gunzipped) and ligand of Debian's test data.
fn inputs() -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    let ligand = std::fs::read(Path::new(TEST_DATA).join("ligand.pdbqt"))
        .with_context(|| format!("reading {TEST_DATA}/ligand.pdbqt"))?;
    let out = std::process::Command::new("gzip")
        .args(["-dc", &format!("{TEST_DATA}/protein.pdbqt.gz")])
        .output()
        .context("running gzip")?;
    if !out.status.success() || out.stdout.is_empty() {
        bail!("could not gunzip {TEST_DATA}/protein.pdbqt.gz");
    }
    Ok((out.stdout, ligand))
}

/// The best affinity in a vina output pose file.
pub fn best_affinity(pdbqt: &str) -> Option<f64> {
    pdbqt
        .lines()
        .find_map(|l| l.strip_prefix("REMARK VINA RESULT:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The study's job list: one line per job, `id cx cy cz size seed max_evals`.
pub fn job_lines(jobs: &[Job]) -> String {
    jobs.iter()
        .map(|j| {
            format!(
                "{} {:.3} {:.3} {:.3} {:.3} {} {}\n",
                j.id, j.center[0], j.center[1], j.center[2], j.size, j.seed, j.max_evals
            )
        })
        .collect()
}

/// The array task: inputs from the frontend over HTTP, one vina run, its result line
/// and pose to standard output (the job's output file). @BASE@ is the inputs' URL.
const TASK: &str = r#"#!/bin/sh
# One docking job of the bench dock study (array task $SLURM_ARRAY_TASK_ID).
set -e
w=$(mktemp -d)
trap 'rm -rf "$w"' EXIT
cd "$w"
for f in jobs.txt receptor.pdbqt ligand.pdbqt; do
  busybox wget -q -O "$f" "@BASE@/$f"
done
set -- $(sed -n "$((SLURM_ARRAY_TASK_ID + 1))p" jobs.txt)
t0=$(date +%s.%N)
vina --receptor receptor.pdbqt --ligand ligand.pdbqt --center_x "$2" --center_y "$3" \
  --center_z "$4" --size_x "$5" --size_y "$5" --size_z "$5" --exhaustiveness 1 \
  --num_modes 1 --cpu 1 --seed "$6" --max_evals "$7" --verbosity 0 --out pose.pdbqt \
  >/dev/null
t1=$(date +%s.%N)
echo "RESULT $1 $(hostname) $(awk "BEGIN { print $t1 - $t0 }") $t1"
cat pose.pdbqt
"#;

/// A task's output: `RESULT id node secs end`, then the pose; with the task's end
/// (Unix seconds: the lab's VMs share this machine's clock).
pub fn parse_output(text: &str) -> Option<(JobResult, f64)> {
    let mut lines = text.lines();
    let head = lines.find(|l| l.starts_with("RESULT "))?;
    let mut w = head.split_whitespace().skip(1);
    let id = w.next()?.parse().ok()?;
    let node = w.next()?.to_string();
    let secs = w.next()?.parse().ok()?;
    let end = w.next()?.parse().ok()?;
    Some((
        JobResult {
            id,
            node,
            secs,
            affinity: best_affinity(text),
        },
        end,
    ))
}

/// One run: the study staged in the frontend's home, served over `net`, submitted as
/// an array to `slurm`; returns the seconds from submission to the last task's end and
/// the results. (Not `sbatch --wait`: it polls at growing intervals, which would
/// quantise the time.)
fn one_run(
    lab: &Lab,
    slurm: &SlurmLab,
    url: &str,
    args: &Args,
    inputs: &(Vec<u8>, Vec<u8>),
    tag: &str,
) -> anyhow::Result<(f64, Vec<JobResult>)> {
    let dir = slurm.home.join(tag);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("receptor.pdbqt"), &inputs.0)?;
    std::fs::write(dir.join("ligand.pdbqt"), &inputs.1)?;
    std::fs::write(
        dir.join("jobs.txt"),
        job_lines(&jobs(args.jobs, args.max_evals)),
    )?;
    std::fs::write(
        dir.join("task.sh"),
        TASK.replace("@BASE@", &format!("{url}/{tag}")),
    )?;
    let array = format!("--array=0-{}", args.jobs - 1);
    let out = format!("{tag}/out-%a.txt");
    let script = format!("{tag}/task.sh");
    let limit = Duration::from_secs(args.timeout);
    let unix = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0)
    };
    let t0 = unix();
    let o = slurm.run(
        lab,
        &[
            "sbatch",
            "--parsable",
            &array,
            "-N",
            "1",
            "-o",
            &out,
            &script,
        ],
        limit,
    )?;
    let job = o.stdout.trim().split(';').next().unwrap_or("").to_string();
    if !o.ok || job.parse::<u64>().is_err() {
        bail!("sbatch over {}: {}{}", slurm.name, o.stdout, o.stderr);
    }
    let end = Instant::now() + limit;
    loop {
        let q = slurm.run(lab, &["squeue", "-h", "-j", &job], Duration::from_secs(30))?;
        if q.ok && q.stdout.trim().is_empty() {
            break;
        }
        if Instant::now() > end {
            let _ = slurm.run(lab, &["scancel", &job], Duration::from_secs(30));
            bail!(
                "job array {job} over {} not done in {} s",
                slurm.name,
                args.timeout
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut all = Vec::new();
    let mut last = t0;
    for (name, text) in slurmlab::outputs(&dir, "out-") {
        let (r, t) = parse_output(&text).with_context(|| format!("{tag}/{name}: {text}"))?;
        last = last.max(t);
        all.push(r);
    }
    if all.len() != args.jobs as usize {
        bail!("{} of {} jobs came back", all.len(), args.jobs);
    }
    Ok((last - t0, all))
}

/// The runs of one network at one delay.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Runs {
    /// Total seconds of each run.
    pub secs_runs: Vec<f64>,
    /// Median total seconds.
    pub secs: f64,
    /// Median seconds vina ran per job (all runs).
    pub job_secs: f64,
    /// Jobs per worker node (last run), by node name.
    pub per_node: std::collections::BTreeMap<String, u32>,
}

/// One delay.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Added one-way delay on B's and C's uplinks, ms.
    pub delay_ms: u32,
    /// Over the mvc overlay.
    pub mvc: Runs,
    /// Over the raw underlay.
    pub raw: Runs,
}

#[derive(Serialize)]
struct Fields<'a> {
    jobs: u32,
    workers: usize,
    max_evals: u32,
    runs: u32,
    best_affinity: Option<f64>,
    rows: &'a [Row],
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let base = rows.first().map_or(f64::NAN, |r| r.mvc.secs);
    let mut s = String::from(
        "| delay ms (B, C uplinks) | mvc total s | raw total s | mvc / raw | mvc / mvc at first delay | vina s per job (mvc) |\n\
         |---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.2} | {:.2} | {:.1} |\n",
            r.delay_ms,
            r.mvc.secs,
            r.raw.secs,
            r.mvc.secs / r.raw.secs,
            r.mvc.secs / base,
            r.mvc.job_secs,
        ));
    }
    s
}

/// `bench dock`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.delay.is_empty() || args.delay.iter().any(|&d| d > 150) {
        bail!("--delay takes one-way delays in 0..=150 ms");
    }
    if args.common.runs == 0
        || args.common.runs > 20
        || args.jobs == 0
        || args.jobs > 400
        || args.workers == 0
        || args.workers > 4
    {
        bail!("--runs must be 1..=20, --jobs 1..=400, --workers 1..=4");
    }
    if !lab::is_root() {
        bail!("bench dock builds network namespaces: run it as root");
    }
    apps::ensure_packages(&[("vina", "autodock-vina")])?;
    let inputs = inputs()?;
    let mvc = Mvc {
        bin: find_mvc(args.common.mvc.clone())?,
    };
    let mut info = apps::RunInfo::start("dock");
    let lab = Lab::new("dock")?;
    // Site A holds the frontend VM and its workers; B and C sit behind a WAN link.
    let mut t = Topology::new(&lab)?;
    t.add_site(&lab, "a", false, args.workers + 1)?;
    let mut wans = Vec::new();
    for s in ["b", "c"] {
        let site = t.add_site_wan(&lab, s, false, args.workers, true)?;
        wans.push(Wan::new(
            site.wan.as_deref().context("site has no WAN namespace")?,
        ));
    }
    apps::underlay_source(&lab, &t)?;
    let master = t.sites[0].vms[0].clone();
    let workers: Vec<(Vm, String)> = t
        .sites
        .iter()
        .flat_map(|s| {
            let skip = usize::from(s.idx == 1);
            s.vms.iter().skip(skip).map(|v| (v.clone(), s.name.clone()))
        })
        .collect();
    for w in &mut wans {
        w.set(&lab, &LinkArgs::delay(0.0))?;
    }
    let cluster = MvcCluster::start(&lab, &t, &mvc, |_| {})?;
    for (w, _) in &workers {
        lab::wait_ping(&lab, &w.ns, master.ip, Duration::from_secs(30))
            .with_context(|| format!("{} cannot reach the frontend over mvc", w.ns))?;
        lab::wait_ping(&lab, &w.ns, master.underlay_ip, Duration::from_secs(10))
            .with_context(|| format!("{} cannot reach the frontend over raw", w.ns))?;
    }
    // One Slurm per network, side by side; each frontend home served over its network.
    let mut slurms = Vec::new();
    let mut servers = Vec::new();
    for (net, ports) in [Net::Raw, Net::Mvc].into_iter().zip(PORTS) {
        let s = SlurmLab::start(&lab, "dock", net, &master, &workers, ports)?;
        let addr = net.addr(&master).to_string();
        let home = s.home.display().to_string();
        servers.push(lab.spawn(
            &master.ns,
            &format!("inputs-{}", net.name()),
            &[
                "python3",
                "-m",
                "http.server",
                &PORT.to_string(),
                "--bind",
                &addr,
                "--directory",
                &home,
            ],
        )?);
        slurms.push((s, format!("http://{addr}:{PORT}")));
    }
    let steps = args.delay.len() as u64 * u64::from(args.common.runs) * 2;
    let pb = apps::progress(steps, "dock");
    let mut rows = Vec::new();
    let mut best: Option<f64> = None;
    for &d in &args.delay {
        for w in &mut wans {
            w.set(&lab, &LinkArgs::delay(f64::from(d)))?;
        }
        for (w, _) in &workers {
            lab::wait_ping(&lab, &w.ns, master.ip, Duration::from_secs(30))?;
        }
        let mut row = Row {
            delay_ms: d,
            mvc: Runs::default(),
            raw: Runs::default(),
        };
        let mut job_secs: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
        for i in 0..args.common.runs {
            for (k, net) in [Net::Raw, Net::Mvc].into_iter().enumerate() {
                pb.set_message(format!("delay {d} ms over {}, run {}", net.name(), i + 1));
                let tag = format!("{d}-{}-{i}", net.name());
                let (slurm, url) = &slurms[k];
                let (secs, res) = one_run(&lab, slurm, url, args, &inputs, &tag)?;
                let r = if net == Net::Mvc {
                    &mut row.mvc
                } else {
                    &mut row.raw
                };
                r.secs_runs.push(secs);
                r.per_node.clear();
                for j in &res {
                    job_secs[k].push(j.secs);
                    *r.per_node.entry(j.node.clone()).or_default() += 1;
                    if let Some(a) = j.affinity {
                        best = Some(best.map_or(a, |b: f64| b.min(a)));
                    }
                }
                pb.inc(1);
            }
        }
        row.raw.secs = lab::median(&row.raw.secs_runs).unwrap_or(f64::NAN);
        row.mvc.secs = lab::median(&row.mvc.secs_runs).unwrap_or(f64::NAN);
        row.raw.job_secs = lab::median(&job_secs[0]).unwrap_or(f64::NAN);
        row.mvc.job_secs = lab::median(&job_secs[1]).unwrap_or(f64::NAN);
        apps::note(
            &pb,
            format!(
                "delay {d} ms: mvc {:.1} s, raw {:.1} s",
                row.mvc.secs, row.raw.secs
            ),
        );
        rows.push(row);
    }
    pb.finish_and_clear();
    for p in &servers {
        lab.stop(p);
    }
    for (s, _) in &slurms {
        s.stop(&lab);
    }
    cluster.stop(&lab);
    lab.teardown();
    let when = info.finish();
    let md = table(&rows);
    let head = format!(
        "DOCK-like parameter study: {} AutoDock Vina jobs (Debian's test complex, box centres on a grid, max_evals {}) as one Slurm job array submitted on the frontend at site A, run by {} slurmd VMs at sites A, B, C (inputs fetched from the frontend, results read from the job outputs); time from submission to the last task's end; delay added each way on B's and C's uplinks; median of {} runs, {when}",
        args.jobs,
        args.max_evals,
        workers.len(),
        args.common.runs,
    );
    let fields = Fields {
        jobs: args.jobs,
        workers: workers.len(),
        max_evals: args.max_evals,
        runs: args.common.runs,
        best_affinity: best,
        rows: &rows,
    };
    let series = |f: fn(&Row) -> f64| -> Vec<(f64, f64)> {
        rows.iter().map(|r| (f64::from(r.delay_ms), f(r))).collect()
    };
    info.save(
        &args.common.results,
        &head,
        &md,
        &fields,
        &[Panel {
            title: "DOCK-like study (autodock-vina): total time",
            x: "added one-way delay on sites B and C (ms)",
            y: "seconds",
            series: vec![
                ("mvc overlay".into(), series(|r| r.mvc.secs)),
                ("raw underlay".into(), series(|r| r.raw.secs)),
            ],
        }],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_cover_a_grid_around_the_pocket() {
        let j = jobs(27, 100);
        assert_eq!(j.len(), 27);
        let mut centres: Vec<String> = j.iter().map(|x| format!("{:?}", x.center)).collect();
        centres.sort();
        centres.dedup();
        assert_eq!(centres.len(), 27);
        assert!(j.iter().all(|x| (x.center[0] - 11.0).abs() <= 2.0));
    }

    #[test]
    fn affinity_from_a_pose_file() {
        let s = "MODEL 1\nREMARK VINA RESULT:    -10.35      0.000      0.000\nROOT\n";
        assert_eq!(best_affinity(s), Some(-10.35));
        assert_eq!(best_affinity("garbage"), None);
    }

    #[test]
    fn task_output_is_parsed_and_lines_cover_the_jobs() {
        let t = "RESULT 4 b1 2.5 1796600475.25\nMODEL 1\nREMARK VINA RESULT:    -9.1      0.000      0.000\n";
        let (r, end) = parse_output(t).unwrap();
        assert_eq!(
            (r.id, r.node.as_str(), r.secs, r.affinity),
            (4, "b1", 2.5, Some(-9.1))
        );
        assert_eq!(end, 1796600475.25);
        assert!(parse_output("vina: error").is_none());
        let l = job_lines(&jobs(3, 100));
        assert_eq!(l.lines().count(), 3);
        assert!(
            l.starts_with("0 9.000 88.500 55.500 20.000 1000 100\n"),
            "{l}"
        );
    }
}
