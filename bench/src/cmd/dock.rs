//! `bench dock`: a DOCK-like parameter study (the 2012 paper's figure 12). A master in the
//! frontend VM (site A) farms out small AutoDock Vina docking jobs to workers in VMs at
//! three sites; each job's inputs (receptor, ligand, search box, seed) and its result
//! (the docked pose) cross the network. The total time is measured against the one-way
//! delay the WAN emulator adds on the uplinks of sites B and C, over the mvc overlay and
//! over the raw routed underlay (workers behind NAT connect out to the master, as grid
//! workers do), alternating raw and overlay runs.
//!
//! The protocol between master and workers is line-framed: the worker sends `READY`; the
//! master answers `JOB <json>` followed by the receptor and ligand bytes the JSON gives
//! the lengths of, or `DONE`; the worker answers `RESULT <json>` followed by the pose.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::overlay::{Mvc, MvcCluster};
use lab::{Lab, Topology, Vm};
use serde::{Deserialize, Serialize};

use super::apps::{self, Net};
use super::figure::Panel;
use super::find_mvc;
use super::wanem::{LinkArgs, Wan};

/// Where Debian's autodock-vina ships its test complex.
const TEST_DATA: &str = "/usr/share/doc/autodock-vina/test-data";
/// The TCP port the master listens on.
const PORT: u16 = 7800;
/// Largest input or output a job may carry.
const MAX_BYTES: usize = 16 << 20;

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

/// Options of the hidden `bench dock-worker` (run inside a worker VM).
#[derive(Debug, clap::Args)]
pub struct WorkerArgs {
    /// The master's address.
    #[arg(long)]
    pub master: SocketAddr,
    /// Scratch directory.
    #[arg(long)]
    pub dir: PathBuf,
    /// Seconds one vina run may take.
    #[arg(long, default_value_t = 600)]
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
    /// Bytes of receptor PDBQT that follow.
    pub receptor_len: usize,
    /// Bytes of ligand PDBQT that follow.
    pub ligand_len: usize,
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
    /// Error text, when vina failed.
    pub error: Option<String>,
    /// Bytes of pose PDBQT that follow.
    pub out_len: usize,
}

/// The parameter study: box centres on a small grid around the test complex's pocket
/// (the centre of Debian's test configuration), one seed per job.
pub fn jobs(n: u32, max_evals: u32, receptor_len: usize, ligand_len: usize) -> Vec<Job> {
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
                receptor_len,
                ligand_len,
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

fn read_line(r: &mut impl BufRead) -> anyhow::Result<String> {
    let mut s = String::new();
    let n = r.by_ref().take(64 * 1024).read_line(&mut s)?;
    if n == 0 {
        bail!("connection closed");
    }
    Ok(s.trim_end().to_string())
}

fn read_bytes(r: &mut impl Read, n: usize) -> anyhow::Result<Vec<u8>> {
    if n > MAX_BYTES {
        bail!("{n} bytes announced, at most {MAX_BYTES} allowed");
    }
    let mut v = vec![0; n];
    r.read_exact(&mut v)?;
    Ok(v)
}

/// The best affinity in a vina output pose file.
pub fn best_affinity(pdbqt: &str) -> Option<f64> {
    pdbqt
        .lines()
        .find_map(|l| l.strip_prefix("REMARK VINA RESULT:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

fn run_vina(job: &Job, dir: &Path, timeout: u64) -> anyhow::Result<(Vec<u8>, f64)> {
    let out = dir.join(format!("out-{}.pdbqt", job.id));
    let c = |i: usize| format!("{:.3}", job.center[i]);
    let size = format!("{:.3}", job.size);
    let t0 = Instant::now();
    let st = std::process::Command::new("timeout")
        .arg(timeout.to_string())
        .arg("vina")
        .args(["--receptor", &dir.join("receptor.pdbqt").to_string_lossy()])
        .args(["--ligand", &dir.join("ligand.pdbqt").to_string_lossy()])
        .args([
            "--center_x",
            &c(0),
            "--center_y",
            &c(1),
            "--center_z",
            &c(2),
        ])
        .args(["--size_x", &size, "--size_y", &size, "--size_z", &size])
        .args(["--exhaustiveness", "1", "--num_modes", "1", "--cpu", "1"])
        .args(["--seed", &job.seed.to_string()])
        .args(["--max_evals", &job.max_evals.to_string()])
        .args(["--verbosity", "0", "--out", &out.to_string_lossy()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .output()
        .context("running vina")?;
    if !st.status.success() {
        bail!(
            "vina exited with {}: {}",
            st.status,
            String::from_utf8_lossy(&st.stderr).trim()
        );
    }
    Ok((std::fs::read(&out)?, t0.elapsed().as_secs_f64()))
}

/// `bench dock-worker`: connects to the master and docks until it says DONE.
pub fn worker(args: &WorkerArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.dir)?;
    let node = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    let s = loop {
        match TcpStream::connect_timeout(&args.master, Duration::from_secs(3)) {
            Ok(s) => break s,
            Err(e) if Instant::now() < deadline => {
                eprintln!("connecting to {}: {e}; retrying", args.master);
                std::thread::sleep(Duration::from_millis(300));
            }
            Err(e) => return Err(e).context(format!("connecting to {}", args.master)),
        }
    };
    s.set_nodelay(true)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut have_inputs = (0usize, 0usize);
    loop {
        w.write_all(b"READY\n")?;
        let line = read_line(&mut r)?;
        if line == "DONE" {
            return Ok(());
        }
        let job: Job = serde_json::from_str(
            line.strip_prefix("JOB ")
                .with_context(|| format!("unexpected {line:?}"))?,
        )?;
        let rec = read_bytes(&mut r, job.receptor_len)?;
        let lig = read_bytes(&mut r, job.ligand_len)?;
        if have_inputs != (rec.len(), lig.len()) || have_inputs == (0, 0) {
            std::fs::write(args.dir.join("receptor.pdbqt"), &rec)?;
            std::fs::write(args.dir.join("ligand.pdbqt"), &lig)?;
            have_inputs = (rec.len(), lig.len());
        }
        let (pose, res) = match run_vina(&job, &args.dir, args.timeout) {
            Ok((pose, secs)) => {
                let a = best_affinity(&String::from_utf8_lossy(&pose));
                (pose, (a, secs, None))
            }
            Err(e) => (Vec::new(), (None, 0.0, Some(format!("{e:#}")))),
        };
        let jr = JobResult {
            id: job.id,
            affinity: res.0,
            node: node.clone(),
            secs: res.1,
            error: res.2,
            out_len: pose.len(),
        };
        w.write_all(format!("RESULT {}\n", serde_json::to_string(&jr)?).as_bytes())?;
        w.write_all(&pose)?;
    }
}

/// Serves jobs from `queue` to one connected worker until the queue is empty.
fn serve(
    s: TcpStream,
    queue: &Mutex<VecDeque<Job>>,
    receptor: &[u8],
    ligand: &[u8],
    deadline: Instant,
) -> anyhow::Result<Vec<JobResult>> {
    s.set_nodelay(true)?;
    let left = deadline.saturating_duration_since(Instant::now());
    s.set_read_timeout(Some(left.max(Duration::from_secs(1))))?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut done = Vec::new();
    loop {
        let line = read_line(&mut r)?;
        if line != "READY" {
            bail!("worker said {line:?}, not READY");
        }
        let job = lab_lock(queue).pop_front();
        let Some(job) = job else {
            w.write_all(b"DONE\n")?;
            return Ok(done);
        };
        w.write_all(format!("JOB {}\n", serde_json::to_string(&job)?).as_bytes())?;
        w.write_all(receptor)?;
        w.write_all(ligand)?;
        let line = read_line(&mut r)?;
        let jr: JobResult = serde_json::from_str(
            line.strip_prefix("RESULT ")
                .with_context(|| format!("worker said {line:?}, not RESULT"))?,
        )?;
        let _pose = read_bytes(&mut r, jr.out_len)?;
        if let Some(e) = &jr.error {
            bail!("job {} failed on {}: {e}", jr.id, jr.node);
        }
        done.push(jr);
    }
}

fn lab_lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One run: workers started in `workers`, connecting to the master in `master` over
/// `net`; returns the total seconds from the first job handed out to the last result in.
fn one_run(
    lab: &Lab,
    master: &Vm,
    workers: &[Vm],
    net: Net,
    args: &Args,
    inputs: &(Vec<u8>, Vec<u8>),
    tag: &str,
) -> anyhow::Result<(f64, Vec<JobResult>)> {
    let listener = lab.in_ns(&master.ns, || {
        TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, PORT)))
    })??;
    let exe = std::env::current_exe().context("locating the bench binary")?;
    let exe = exe.to_string_lossy().into_owned();
    let maddr = format!("{}:{PORT}", net.addr(master));
    let mut procs = Vec::new();
    for (i, w) in workers.iter().enumerate() {
        let dir = lab.dir().join(format!("dock-{tag}-w{i}"));
        let dir = dir.to_string_lossy().into_owned();
        let name = apps::node_name(w);
        procs.push(lab.spawn(
            &w.ns,
            &format!("dock-worker-{tag}-{i}"),
            &[
                "unshare",
                "--uts",
                "sh",
                "-c",
                "hostname \"$0\"; exec \"$@\"",
                &name,
                &exe,
                "dock-worker",
                "--master",
                &maddr,
                "--dir",
                &dir,
            ],
        )?);
    }
    let mut conns = Vec::new();
    listener.set_nonblocking(true)?;
    let accept_end = Instant::now() + Duration::from_secs(40);
    while conns.len() < workers.len() {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                conns.push(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if Instant::now() > accept_end {
                    let logs: Vec<String> = procs.iter().map(|p| lab.log(p)).collect();
                    bail!(
                        "only {} of {} workers connected over {}: {}",
                        conns.len(),
                        workers.len(),
                        net.name(),
                        logs.join("\n")
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(e.into()),
        }
    }
    let (rec, lig) = inputs;
    let queue = Mutex::new(VecDeque::from(jobs(
        args.jobs,
        args.max_evals,
        rec.len(),
        lig.len(),
    )));
    let deadline = Instant::now() + Duration::from_secs(args.timeout);
    let t0 = Instant::now();
    let results: Vec<anyhow::Result<Vec<JobResult>>> = std::thread::scope(|sc| {
        let hs: Vec<_> = conns
            .into_iter()
            .map(|c| {
                let q = &queue;
                sc.spawn(move || serve(c, q, rec, lig, deadline))
            })
            .collect();
        hs.into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("master thread panicked")))
            })
            .collect()
    });
    let total = t0.elapsed().as_secs_f64();
    let end = Instant::now() + Duration::from_secs(10);
    for p in &procs {
        while lab.running(p) && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(50));
        }
        lab.stop(p);
    }
    let mut all = Vec::new();
    for r in results {
        all.extend(r?);
    }
    if all.len() != args.jobs as usize {
        bail!("{} of {} jobs came back", all.len(), args.jobs);
    }
    Ok((total, all))
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
    // Site A holds the master VM and its workers; B and C are behind NAT and a WAN link.
    let mut t = Topology::new(&lab)?;
    t.add_site(&lab, "a", false, args.workers + 1)?;
    let mut wans = Vec::new();
    for s in ["b", "c"] {
        let site = t.add_site_wan(&lab, s, true, args.workers, true)?;
        wans.push(Wan::new(
            site.wan.as_deref().context("site has no WAN namespace")?,
        ));
    }
    apps::underlay_source(&lab, &t)?;
    let master = t.sites[0].vms[0].clone();
    let workers: Vec<Vm> = t
        .sites
        .iter()
        .flat_map(|s| {
            let skip = usize::from(s.idx == 1);
            s.vms.iter().skip(skip).cloned()
        })
        .collect();
    for w in &mut wans {
        w.set(&lab, &LinkArgs::delay(0.0))?;
    }
    let cluster = MvcCluster::start(&lab, &t, &mvc, |_| {})?;
    for w in &workers {
        lab::wait_ping(&lab, &w.ns, master.ip, Duration::from_secs(30))
            .with_context(|| format!("{} cannot reach the master over mvc", w.ns))?;
        lab::wait_ping(&lab, &w.ns, master.underlay_ip, Duration::from_secs(10))
            .with_context(|| format!("{} cannot reach the master over raw", w.ns))?;
    }
    let steps = args.delay.len() as u64 * u64::from(args.common.runs) * 2;
    let pb = apps::progress(steps, "dock");
    let mut rows = Vec::new();
    let mut best: Option<f64> = None;
    for &d in &args.delay {
        for w in &mut wans {
            w.set(&lab, &LinkArgs::delay(f64::from(d)))?;
        }
        for w in &workers {
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
                let (secs, res) = one_run(&lab, &master, &workers, net, args, &inputs, &tag)?;
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
    cluster.stop(&lab);
    lab.teardown();
    let when = info.finish();
    let md = table(&rows);
    let head = format!(
        "DOCK-like parameter study: {} AutoDock Vina jobs (Debian's test complex, box centres on a grid, max_evals {}) farmed out by a master at site A to {} workers at sites A, B, C; delay added each way on B's and C's uplinks; median of {} runs, {when}",
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
        let j = jobs(27, 100, 10, 5);
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
    fn oversized_announcements_are_refused() {
        let mut r: &[u8] = b"";
        assert!(read_bytes(&mut r, MAX_BYTES + 1).is_err());
    }
}
