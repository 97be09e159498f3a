//! `bench nbd`: the NBD target and the relocation proxy (`xnbd`), in one run on one machine.
//!
//! Target mode: `xnbd serve`, nbdkit's file plugin and qemu-nbd export the same image file
//! over Unix sockets; each measurement starts a fresh server, and the servers alternate
//! within every run. fio's nbd engine measures 4k random read and write IOPS, `nbdcopy`
//! sequential read and write throughput; medians of the runs and ratios to nbdkit.
//!
//! Proxy: the source is nbdkit's file plugin behind the log, delay and rate filters (the log
//! records every read the proxy makes). Measured: on-demand latency of cold 64 KiB blocks
//! through `xnbd proxy --no-background` against a direct read from the same source (its
//! RTT); relocation time and bytes fetched by `xnbd ctl cache-all` against disk size / link
//! rate, with a check that no block was read twice from the source; and the cached fraction
//! over time while a fio workload runs and the background copy proceeds (the xNBD paper's
//! figure 7), as an SVG.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use plotters::prelude::*;
use serde::Serialize;

use super::figure;
use super::{utc_now, write_json, Machine};

/// Options of `bench nbd`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The xnbd binary (default: next to this one).
    #[arg(long)]
    pub xnbd: Option<PathBuf>,
    /// Parts to run, comma-separated: target, latency, relocation, figure.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "target,latency,relocation,figure"
    )]
    pub parts: Vec<String>,
    /// Target mode: servers to compare (xnbd, nbdkit, qemu-nbd).
    #[arg(long, value_delimiter = ',', default_value = "xnbd,nbdkit,qemu-nbd")]
    pub servers: Vec<String>,
    /// Target mode: runs per server and measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Target mode: seconds per fio run.
    #[arg(long, default_value_t = 5)]
    pub secs: u32,
    /// Target mode: image size, MiB.
    #[arg(long, default_value_t = 512)]
    pub image_mib: u64,
    /// Target mode: fio jobs (one NBD connection each).
    #[arg(long, default_value_t = 4)]
    pub numjobs: u32,
    /// Target mode: fio iodepth per job.
    #[arg(long, default_value_t = 32)]
    pub iodepth: u32,
    /// Target mode: passes of every metric and server before the measured runs, not
    /// counted (the first measurements on a freshly written image are the slowest, and
    /// would always fall to the first server).
    #[arg(long, default_value_t = 1)]
    pub warmup: u32,
    /// Proxy: source read delays (nbdkit delay filter), ms.
    #[arg(long, value_delimiter = ',', default_value = "0,20,60,100")]
    pub delays: Vec<u32>,
    /// Proxy: cold blocks read per delay (the median latency is reported).
    #[arg(long, default_value_t = 8)]
    pub cold_reads: u32,
    /// Proxy: disk size, MiB.
    #[arg(long, default_value_t = 128)]
    pub disk_mib: u64,
    /// Proxy: link rate (nbdkit rate filter), MiB/s.
    #[arg(long, default_value_t = 16)]
    pub link_mib: u64,
    /// Proxy: source delays at which the full relocation is timed, ms.
    #[arg(long, value_delimiter = ',', default_value = "0,60")]
    pub reloc_delays: Vec<u32>,
    /// Proxy figure: source delay, ms.
    #[arg(long, default_value_t = 20)]
    pub figure_delay: u32,
    /// Proxy figure: the workload's IOPS (fio 4k random read/write, rate-limited).
    #[arg(long, default_value_t = 200)]
    pub figure_iops: u32,
    /// Where to write the JSON result, table and figure.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// Finds `xnbd`: the given path, or the binary next to this one (target/release/xnbd).
fn find_xnbd(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(p) = given {
        if p.is_file() {
            return Ok(p.to_path_buf());
        }
        bail!("--xnbd {}: no such file", p.display());
    }
    let me = std::env::current_exe().context("locating the bench binary")?;
    let dir = me.parent().context("bench binary has no directory")?;
    for cand in [dir.join("xnbd"), dir.join("../xnbd")] {
        if cand.is_file() {
            return Ok(cand);
        }
    }
    bail!(
        "no xnbd binary next to {} (build it with `cargo build --release -p xnbd`, or pass --xnbd PATH)",
        me.display()
    )
}

fn need_tool(name: &str) -> anyhow::Result<()> {
    let ok = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        bail!("`{name}` not found in PATH (apt-get install nbdkit libnbd-bin fio qemu-utils)");
    }
    Ok(())
}

/// A server or client process of ours, stopped (SIGTERM, then SIGKILL) when dropped.
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn spawn(name: &str, args: &[String], dir: &Path) -> anyhow::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log)?;
        let child = Command::new(&args[0])
            .args(&args[1..])
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {}", args[0]))?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn tail(&self) -> String {
        let s = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = s.lines().collect();
        lines[lines.len().saturating_sub(5)..].join("\n")
    }

    /// Stops the process; returns how it ended (None: killed after the grace period).
    fn stop(&mut self) -> Option<std::process::ExitStatus> {
        if let Ok(Some(st)) = self.child.try_wait() {
            return Some(st);
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("  {} did not stop on SIGTERM: killed", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until something accepts connections on the Unix socket `path`.
fn wait_socket(p: &mut Proc, path: &Path) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs(15);
    while Instant::now() < end {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Ok(());
        }
        if !p.alive() {
            bail!("{} exited at start:\n{}", p.name, p.tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("{} does not listen on {}", p.name, path.display())
}

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///?socket={}", sock.display())
}

/// How often [`run_cmd`] looks whether its command has ended. The sequential copies are
/// timed by it and take 110-170 ms on a quiet machine: a 10 ms poll made their figures
/// steps of 6-9% (one server's 0.94 of nbdkit was one step), 1 ms makes them under 1%.
const EXIT_POLL: Duration = Duration::from_millis(1);

/// Runs a command to completion with a time limit; fails on a non-zero exit.
fn run_cmd(args: &[String], limit: Duration) -> anyhow::Result<String> {
    let mut child = Command::new(&args[0])
        .args(&args[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", args[0]))?;
    let end = Instant::now() + limit;
    loop {
        if child.try_wait()?.is_some() {
            break;
        }
        if Instant::now() > end {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{} did not finish within {limit:?}", args.join(" "));
        }
        std::thread::sleep(EXIT_POLL);
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "{} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| (*x).to_string()).collect()
}

/// The `p`-th percentile (nearest rank) of the finite values of `v`.
fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

fn median(v: &[f64]) -> f64 {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Writes `mib` MiB of pseudo-random, incompressible data to `path`.
fn make_image(path: &Path, mib: u64) -> anyhow::Result<()> {
    use rand::RngCore;
    use std::io::Write;
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = rand::thread_rng();
    let mut buf = vec![0u8; 1 << 20];
    for _ in 0..mib {
        rng.fill_bytes(&mut buf);
        f.write_all(&buf)?;
    }
    f.into_inner()?.sync_all()?;
    Ok(())
}

// ---------------------------------------------------------------- target mode

fn server_args(kind: &str, xnbd: &Path, img: &Path, sock: &Path) -> anyhow::Result<Vec<String>> {
    let (img, sock) = (img.display().to_string(), sock.display().to_string());
    Ok(match kind {
        "xnbd" => vec![
            xnbd.display().to_string(),
            "serve".into(),
            "--export".into(),
            img,
            "--unix".into(),
            sock,
        ],
        "nbdkit" => s(&[
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-U",
            &sock,
            "file",
            &img,
        ]),
        "qemu-nbd" => s(&[
            "qemu-nbd",
            "-f",
            "raw",
            "-t",
            "-k",
            &sock,
            "--shared=8",
            &img,
        ]),
        k => bail!("unknown server {k} (xnbd, nbdkit, qemu-nbd)"),
    })
}

/// One target-mode measurement of one server.
#[derive(Debug, Clone, Serialize)]
pub struct TargetRow {
    /// xnbd, nbdkit, qemu-nbd.
    pub server: String,
    /// randread-iops, randwrite-iops, seqread-mibs, seqwrite-mibs.
    pub metric: String,
    /// Every run's value.
    pub runs: Vec<f64>,
    /// Their median.
    pub median: f64,
    /// Median over nbdkit's median in the same run.
    pub ratio_to_nbdkit: Option<f64>,
}

fn fio_iops(json: &Path, write: bool) -> anyhow::Result<f64> {
    let v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(json).with_context(|| format!("reading {}", json.display()))?,
    )?;
    let side = if write { "write" } else { "read" };
    v["jobs"]
        .as_array()
        .ok_or_else(|| anyhow!("fio json without jobs"))?
        .iter()
        .map(|j| j[side]["iops"].as_f64().unwrap_or(0.0))
        .reduce(|a, b| a + b)
        .ok_or_else(|| anyhow!("fio json with no job"))
}

/// Starts a fresh server, runs `f` against its socket, stops it; notes a crash.
fn with_server<T>(
    kind: &str,
    a: &Ctx,
    f: impl FnOnce(&Path) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let sock = a.dir.join(format!("{kind}.sock"));
    let _ = std::fs::remove_file(&sock);
    // What the previous measurement wrote goes to the disk first: otherwise its writeback
    // runs during this one (512 MiB after a sequential write), which then measures
    // whichever server happens to come next.
    std::fs::File::open(&a.img)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing {}", a.img.display()))?;
    let mut p = Proc::spawn(kind, &server_args(kind, &a.xnbd, &a.img, &sock)?, &a.dir)?;
    wait_socket(&mut p, &sock)?;
    let r = f(&sock);
    if !p.alive() {
        bail!("{kind} died during the measurement:\n{}", p.tail());
    }
    p.stop();
    r
}

struct Ctx {
    xnbd: PathBuf,
    dir: PathBuf,
    img: PathBuf,
}

fn target(args: &Args, ctx: &Ctx) -> anyhow::Result<Vec<TargetRow>> {
    eprintln!("target mode: {} MiB image", args.image_mib);
    make_image(&ctx.img, args.image_mib)?;
    let src2 = ctx.dir.join("copy-src.img");
    make_image(&src2, args.image_mib)?;
    let metrics = [
        "randread-iops",
        "randwrite-iops",
        "seqread-mibs",
        "seqwrite-mibs",
    ];
    let mut vals: BTreeMap<(String, &str), Vec<f64>> = BTreeMap::new();
    let fio_limit = Duration::from_secs(u64::from(args.secs) + 60);
    let copy_limit = Duration::from_secs(120);
    let n = args.servers.len();
    let warmup = args.warmup as usize;
    for run in 0..warmup + args.runs as usize {
        for i in 0..n {
            // Rotate the order each run so no server always goes first (the first measured
            // run in the order given).
            let kind = args.servers[(i + run + n - warmup % n) % n].as_str();
            for m in metrics {
                let v = with_server(kind, ctx, |sock| {
                    if m.starts_with("rand") {
                        let write = m == "randwrite-iops";
                        let out = ctx.dir.join("fio.json");
                        let mut cmd = s(&[
                            "fio",
                            "--name=nbd",
                            "--ioengine=nbd",
                            &format!("--uri={}", uri(sock)),
                            if write {
                                "--rw=randwrite"
                            } else {
                                "--rw=randread"
                            },
                            "--bs=4k",
                            &format!("--iodepth={}", args.iodepth),
                            &format!("--numjobs={}", args.numjobs),
                            "--time_based",
                            &format!("--runtime={}", args.secs),
                            &format!("--size={}M", args.image_mib),
                            "--group_reporting",
                            "--output-format=json",
                        ]);
                        cmd.push(format!("--output={}", out.display()));
                        run_cmd(&cmd, fio_limit)?;
                        fio_iops(&out, write)
                    } else {
                        let cmd = if m == "seqread-mibs" {
                            s(&["nbdcopy", "--connections=4", &uri(sock), "null:"])
                        } else {
                            s(&[
                                "nbdcopy",
                                "--connections=4",
                                &src2.display().to_string(),
                                &uri(sock),
                            ])
                        };
                        let t = Instant::now();
                        run_cmd(&cmd, copy_limit)?;
                        Ok(args.image_mib as f64 / t.elapsed().as_secs_f64())
                    }
                })
                .with_context(|| format!("{kind} {m}"))?;
                if run < warmup {
                    eprintln!("  warm-up {kind:9} {m:15} {v:10.0} (not counted)");
                    continue;
                }
                eprintln!("  run {} {kind:9} {m:15} {v:10.0}", run + 1 - warmup);
                vals.entry((kind.to_string(), m)).or_default().push(v);
            }
        }
    }
    let mut rows = Vec::new();
    for m in metrics {
        let base = vals.get(&("nbdkit".to_string(), m)).map(|v| median(v));
        for kind in &args.servers {
            if let Some(v) = vals.get(&(kind.clone(), m)) {
                let med = median(v);
                rows.push(TargetRow {
                    server: kind.clone(),
                    metric: m.to_string(),
                    runs: v.clone(),
                    median: med,
                    ratio_to_nbdkit: base.map(|b| med / b),
                });
            }
        }
    }
    std::fs::remove_file(&src2).ok();
    std::fs::remove_file(&ctx.img).ok();
    Ok(rows)
}

// ---------------------------------------------------------------- proxy

/// nbdkit as the relocation source: file plugin behind log, delay and rate filters.
fn source(
    dir: &Path,
    img: &Path,
    delay_ms: u32,
    link_mib: u64,
    tag: &str,
) -> anyhow::Result<(Proc, PathBuf, PathBuf)> {
    let sock = dir.join(format!("src-{tag}.sock"));
    let log = dir.join(format!("src-{tag}.nbdlog"));
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&log);
    // The rate filter counts bits per second.
    let bits = link_mib * 1024 * 1024 * 8;
    let mut p = Proc::spawn(
        &format!("nbdkit-{tag}"),
        &s(&[
            "nbdkit",
            "-f",
            "--exit-with-parent",
            "-U",
            &sock.display().to_string(),
            "--filter=log",
            "--filter=delay",
            "--filter=rate",
            "file",
            &img.display().to_string(),
            &format!("logfile={}", log.display()),
            &format!("delay-read={delay_ms}ms"),
            &format!("rate={bits}"),
            // A short burst allowance (default 2 s) so the link rate holds from the start.
            "burstiness=0.5",
        ]),
        dir,
    )?;
    wait_socket(&mut p, &sock)?;
    Ok((p, sock, log))
}

/// Reads the log filter's file: (bytes read, blocks of `block` bytes read more than once).
fn source_reads(log: &Path, block: u64) -> anyhow::Result<(u64, u64)> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    Ok(count_reads(&text, block))
}

fn hex_field(line: &str, key: &str) -> Option<u64> {
    let v = line.split_whitespace().find_map(|w| w.strip_prefix(key))?;
    u64::from_str_radix(v.trim_start_matches("0x"), 16).ok()
}

/// Counts bytes read and blocks read twice in an nbdkit log filter's output.
fn count_reads(text: &str, block: u64) -> (u64, u64) {
    let mut seen: BTreeMap<u64, u32> = BTreeMap::new();
    let mut bytes = 0;
    for line in text.lines() {
        if !line.contains(" Read id=") {
            continue;
        }
        let (Some(off), Some(len)) = (hex_field(line, "offset="), hex_field(line, "count=")) else {
            continue;
        };
        bytes += len;
        if len == 0 {
            continue;
        }
        for b in off / block..=(off + len - 1) / block {
            *seen.entry(b).or_default() += 1;
        }
    }
    (bytes, seen.values().filter(|&&n| n > 1).count() as u64)
}

struct ProxyRun {
    proc: Proc,
    sock: PathBuf,
    ctl: PathBuf,
}

fn start_proxy(ctx: &Ctx, src: &Path, tag: &str, extra: &[&str]) -> anyhow::Result<ProxyRun> {
    let sock = ctx.dir.join(format!("px-{tag}.sock"));
    let ctl = ctx.dir.join(format!("px-{tag}.ctl"));
    let cache = ctx.dir.join(format!("px-{tag}.cache"));
    for f in [&sock, &ctl, &cache] {
        let _ = std::fs::remove_file(f);
    }
    let _ = std::fs::remove_file(ctx.dir.join(format!("px-{tag}.cache.bitmap")));
    let mut a = vec![
        ctx.xnbd.display().to_string(),
        "proxy".into(),
        "--source".into(),
        format!("unix:{}", src.display()),
        "--cache".into(),
        cache.display().to_string(),
        "--unix".into(),
        sock.display().to_string(),
        "--ctl".into(),
        ctl.display().to_string(),
    ];
    a.extend(extra.iter().map(|x| (*x).to_string()));
    let mut proc = Proc::spawn(&format!("xnbd-proxy-{tag}"), &a, &ctx.dir)?;
    wait_socket(&mut proc, &sock)?;
    Ok(ProxyRun { proc, sock, ctl })
}

fn ctl_json(
    ctx: &Ctx,
    ctl: &Path,
    cmd: &[&str],
    limit: Duration,
) -> anyhow::Result<serde_json::Value> {
    let mut a = vec![
        ctx.xnbd.display().to_string(),
        "ctl".into(),
        "--socket".into(),
        ctl.display().to_string(),
        "--json".into(),
    ];
    a.extend(cmd.iter().map(|x| (*x).to_string()));
    let out = run_cmd(&a, limit)?;
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("xnbd ctl output: {out}"))?;
    Ok(v)
}

/// Times 64 KiB reads at `offsets` with libnbd (python3-libnbd), one connection; ms per read.
fn timed_reads(sock: &Path, offsets: &[u64]) -> anyhow::Result<Vec<f64>> {
    let list = offsets
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let script = format!(
        "import nbd, time\nh = nbd.NBD()\nh.connect_uri({:?})\nfor off in [{list}]:\n    t = time.perf_counter()\n    h.pread(65536, off)\n    print((time.perf_counter() - t) * 1000)\nh.shutdown()\n",
        uri(sock)
    );
    // The system python (python3-libnbd), whatever python3 comes first in PATH.
    let out = run_cmd(
        &s(&["/usr/bin/python3", "-c", &script]),
        Duration::from_secs(120),
    )?;
    out.lines()
        .map(|l| {
            l.trim()
                .parse::<f64>()
                .map_err(|e| anyhow!("nbdsh output {l:?}: {e}"))
        })
        .collect()
}

/// Times 64 KiB reads in pairs with libnbd, one connection to each socket: `a[i]` from
/// `sock_a`, then `b[i]` from `sock_b`; ms per read, `(a, b)`. Paired, both see the same
/// moment of a loaded machine and the same state of the source's rate filter (one after
/// the other, the first set uses up its burst and the second waits for the link).
fn paired_reads(
    sock_a: &Path,
    a: &[u64],
    sock_b: &Path,
    b: &[u64],
) -> anyhow::Result<(Vec<f64>, Vec<f64>)> {
    let list = |v: &[u64]| v.iter().map(u64::to_string).collect::<Vec<_>>().join(",");
    let script = format!(
        "import nbd, time\nha = nbd.NBD()\nha.connect_uri({:?})\nhb = nbd.NBD()\nhb.connect_uri({:?})\nfor x, y in zip([{}], [{}]):\n    t = time.perf_counter()\n    ha.pread(65536, x)\n    u = time.perf_counter()\n    hb.pread(65536, y)\n    print((u - t) * 1000, (time.perf_counter() - u) * 1000)\nha.shutdown()\nhb.shutdown()\n",
        uri(sock_a),
        uri(sock_b),
        list(a),
        list(b)
    );
    let out = run_cmd(
        &s(&["/usr/bin/python3", "-c", &script]),
        Duration::from_secs(240),
    )?;
    let mut ta = Vec::new();
    let mut tb = Vec::new();
    for l in out.lines() {
        let mut it = l.split_whitespace().map(str::parse::<f64>);
        match (it.next(), it.next()) {
            (Some(Ok(x)), Some(Ok(y))) => {
                ta.push(x);
                tb.push(y);
            }
            _ => bail!("paired read output {l:?}"),
        }
    }
    Ok((ta, tb))
}

/// On-demand latency at one source delay.
#[derive(Debug, Clone, Serialize)]
pub struct LatencyRow {
    /// nbdkit delay-read, ms.
    pub delay_ms: u32,
    /// Direct 64 KiB reads from the source (its RTT as a client sees it), ms.
    pub source_ms: Vec<f64>,
    /// Cold 64 KiB reads through the proxy (fetched on demand), ms.
    pub cold_ms: Vec<f64>,
    /// The same blocks again through the proxy (now local), ms.
    pub warm_ms: Vec<f64>,
    /// Medians.
    pub source_median_ms: f64,
    /// Median of `cold_ms`.
    pub cold_median_ms: f64,
    /// Median of `warm_ms`.
    pub warm_median_ms: f64,
    /// cold / source medians.
    pub cold_over_source: f64,
    /// The proxy's own cost per cold read: each cold read minus the direct read made just before it, ms;
    /// its median and 99th percentile.
    pub excess_median_ms: f64,
    /// 99th percentile (nearest rank) of the same.
    pub excess_p99_ms: f64,
}

fn latency(args: &Args, ctx: &Ctx, disk: &Path) -> anyhow::Result<Vec<LatencyRow>> {
    let size = args.disk_mib << 20;
    let n = u64::from(args.cold_reads.max(1));
    // Distinct 64 KiB blocks far apart, never sequential (no readahead).
    let stride = (size / (2 * n + 1)) & !0xffff;
    let offsets: Vec<u64> = (0..n).map(|i| (2 * i + 1) * stride).collect();
    let other: Vec<u64> = (0..n).map(|i| 2 * i * stride + 0x10000).collect();
    let mut rows = Vec::new();
    for &d in &args.delays {
        let (mut src, ssock, _) = source(&ctx.dir, disk, d, args.link_mib, &format!("lat{d}"))?;
        let mut px = start_proxy(ctx, &ssock, &format!("lat{d}"), &["--no-background"])?;
        let (source_ms, cold_ms) = paired_reads(&ssock, &other, &px.sock, &offsets)?;
        let warm_ms = timed_reads(&px.sock, &offsets)?;
        px.proc.stop();
        src.stop();
        // Each cold read against the direct read just before it.
        let excess: Vec<f64> = cold_ms.iter().zip(&source_ms).map(|(c, s)| c - s).collect();
        let row = LatencyRow {
            delay_ms: d,
            excess_median_ms: median(&excess),
            excess_p99_ms: percentile(&excess, 99.0),
            source_median_ms: median(&source_ms),
            cold_median_ms: median(&cold_ms),
            warm_median_ms: median(&warm_ms),
            cold_over_source: median(&cold_ms) / median(&source_ms),
            source_ms,
            cold_ms,
            warm_ms,
        };
        eprintln!(
            "  delay {d:3} ms: source {:.1} ms, proxy cold {:.1} ms (cost {:.2}, p99 {:.2}), warm {:.2} ms",
            row.source_median_ms,
            row.cold_median_ms,
            row.excess_median_ms,
            row.excess_p99_ms,
            row.warm_median_ms
        );
        rows.push(row);
    }
    Ok(rows)
}

/// One full relocation (`ctl cache-all`, no client workload).
#[derive(Debug, Clone, Serialize)]
pub struct RelocRow {
    /// nbdkit delay-read, ms.
    pub delay_ms: u32,
    /// Disk size, bytes.
    pub size: u64,
    /// Link rate (nbdkit rate filter), bytes/s.
    pub link_bytes_per_sec: u64,
    /// Wall time of `xnbd ctl cache-all`, s.
    pub secs: f64,
    /// size / link rate, s.
    pub ideal_secs: f64,
    /// secs / ideal_secs (target: <= 1.10).
    pub time_ratio: f64,
    /// Bytes the source served (its log filter).
    pub source_bytes: u64,
    /// The proxy's own count (`fetched_bytes`).
    pub fetched_bytes: u64,
    /// Blocks (of the proxy's block size) read from the source more than once.
    pub blocks_read_twice: u64,
}

fn relocation(args: &Args, ctx: &Ctx, disk: &Path) -> anyhow::Result<Vec<RelocRow>> {
    let size = args.disk_mib << 20;
    let rate = args.link_mib << 20;
    let ideal = size as f64 / rate as f64;
    let mut rows = Vec::new();
    for &d in &args.reloc_delays {
        let tag = format!("rel{d}");
        let (mut src, ssock, log) = source(&ctx.dir, disk, d, args.link_mib, &tag)?;
        let mut px = start_proxy(ctx, &ssock, &tag, &["--no-background"])?;
        let limit = Duration::from_secs_f64(ideal * 4.0 + 60.0);
        let t = Instant::now();
        let st = ctl_json(
            ctx,
            &px.ctl,
            &["cache-all", "--timeout", &limit.as_secs().to_string()],
            limit + Duration::from_secs(10),
        )?;
        let secs = t.elapsed().as_secs_f64();
        let st = if st.get("status").is_some() {
            st["status"].clone()
        } else {
            st
        };
        let fetched = st["fetched_bytes"].as_u64().unwrap_or(0);
        let block = st["block_size"].as_u64().unwrap_or(65536);
        let cached = st["cached_blocks"].as_u64().unwrap_or(0);
        let total = st["total_blocks"].as_u64().unwrap_or(1);
        px.proc.stop();
        src.stop();
        if cached != total {
            bail!("relocation at {d} ms: {cached}/{total} blocks local after cache-all");
        }
        let (source_bytes, twice) = source_reads(&log, block)?;
        let row = RelocRow {
            delay_ms: d,
            size,
            link_bytes_per_sec: rate,
            secs,
            ideal_secs: ideal,
            time_ratio: secs / ideal,
            source_bytes,
            fetched_bytes: fetched,
            blocks_read_twice: twice,
        };
        eprintln!(
            "  relocation at {d} ms: {secs:.2} s (ideal {ideal:.2} s, x{:.3}), source served {} of {} bytes, {twice} blocks twice",
            row.time_ratio, source_bytes, size
        );
        rows.push(row);
    }
    Ok(rows)
}

/// One poll of `xnbd ctl query` during the figure's workload.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Seconds since the proxy started.
    pub t: f64,
    /// cached_blocks / total_blocks.
    pub cached: f64,
    /// Blocks local.
    pub cached_blocks: u64,
    /// Blocks in the disk.
    pub total_blocks: u64,
    /// Blocks fetched on demand so far.
    pub demand_blocks: u64,
    /// Blocks fetched by the background copy so far.
    pub background_blocks: u64,
    /// Blocks made local by client writes so far.
    pub written_blocks: u64,
    /// Bytes fetched from the source on demand so far.
    pub demand_bytes: u64,
    /// Bytes fetched from the source by the background copy so far.
    pub background_bytes: u64,
    /// Bytes sent to the client as read replies so far.
    pub client_read_bytes: u64,
    /// Bytes received from the client as writes so far.
    pub client_write_bytes: u64,
}

/// Traffic on each link between two polls (the xNBD paper's figures 4-6), MiB/s.
#[derive(Debug, Clone, Serialize)]
pub struct LinkRate {
    /// End of the interval, seconds since the proxy started.
    pub t: f64,
    /// Source -> proxy, fetched on demand.
    pub source_demand: f64,
    /// Source -> proxy, fetched by the background copy.
    pub source_background: f64,
    /// Proxy -> client (read replies).
    pub client_read: f64,
    /// Client -> proxy (writes).
    pub client_write: f64,
}

/// MiB/s on each link per poll interval, from the cumulative counters of the polls.
fn link_rates(samples: &[Sample]) -> Vec<LinkRate> {
    let mib = |a: u64, b: u64, dt: f64| b.saturating_sub(a) as f64 / dt / (1 << 20) as f64;
    samples
        .windows(2)
        .filter_map(|w| {
            let (a, b) = (&w[0], &w[1]);
            let dt = b.t - a.t;
            (dt > 0.0).then(|| LinkRate {
                t: b.t,
                source_demand: mib(a.demand_bytes, b.demand_bytes, dt),
                source_background: mib(a.background_bytes, b.background_bytes, dt),
                client_read: mib(a.client_read_bytes, b.client_read_bytes, dt),
                client_write: mib(a.client_write_bytes, b.client_write_bytes, dt),
            })
        })
        .collect()
}

/// The figure-7 run: relocation with a client workload.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// nbdkit delay-read, ms.
    pub delay_ms: u32,
    /// Workload: fio 4k random read/write at this rate.
    pub workload_iops: u32,
    /// Seconds until every block was local.
    pub secs: f64,
    /// size / link rate, s.
    pub ideal_secs: f64,
    /// Bytes the source served.
    pub source_bytes: u64,
    /// Blocks read from the source more than once.
    pub blocks_read_twice: u64,
    /// The polls.
    pub samples: Vec<Sample>,
    /// Traffic on each link per poll interval.
    pub links: Vec<LinkRate>,
    /// The workload's read and write IOPS (fio).
    pub fio_read_iops: f64,
    /// Write IOPS.
    pub fio_write_iops: f64,
}

fn figure(args: &Args, ctx: &Ctx, disk: &Path) -> anyhow::Result<Figure> {
    let size = args.disk_mib << 20;
    let ideal = size as f64 / (args.link_mib << 20) as f64;
    let d = args.figure_delay;
    let (mut src, ssock, log) = source(&ctx.dir, disk, d, args.link_mib, "fig")?;
    let t0 = Instant::now();
    let mut px = start_proxy(ctx, &ssock, "fig", &[])?;
    // The workload runs for most of the ideal relocation time, then stops cleanly.
    let runtime = (ideal * 0.7).max(3.0).round() as u64;
    let fio_out = ctx.dir.join("fig-fio.json");
    let mut fio = Proc::spawn(
        "fio-fig",
        &[
            s(&[
                "fio",
                "--name=vm",
                "--ioengine=nbd",
                &format!("--uri={}", uri(&px.sock)),
                "--rw=randrw",
                "--bs=4k",
                "--iodepth=4",
                "--numjobs=1",
                "--time_based",
                &format!("--runtime={runtime}"),
                &format!("--size={}M", args.disk_mib),
                &format!("--rate_iops={}", args.figure_iops),
                "--output-format=json",
            ]),
            vec![format!("--output={}", fio_out.display())],
        ]
        .concat(),
        &ctx.dir,
    )?;
    let limit = Duration::from_secs_f64(ideal * 4.0 + 60.0);
    let mut samples = Vec::new();
    let mut done = None;
    while t0.elapsed() < limit {
        let st = ctl_json(ctx, &px.ctl, &["query"], Duration::from_secs(10))?;
        let st = if st.get("status").is_some() {
            st["status"].clone()
        } else {
            st
        };
        let total = st["total_blocks"].as_u64().unwrap_or(1).max(1);
        let cached = st["cached_blocks"].as_u64().unwrap_or(0);
        let t = t0.elapsed().as_secs_f64();
        samples.push(Sample {
            t,
            cached: cached as f64 / total as f64,
            cached_blocks: cached,
            total_blocks: total,
            demand_blocks: st["demand_blocks"].as_u64().unwrap_or(0),
            background_blocks: st["background_blocks"].as_u64().unwrap_or(0),
            written_blocks: st["written_blocks"].as_u64().unwrap_or(0),
            demand_bytes: st["demand_bytes"].as_u64().unwrap_or(0),
            background_bytes: st["background_bytes"].as_u64().unwrap_or(0),
            client_read_bytes: st["client_read_bytes"].as_u64().unwrap_or(0),
            client_write_bytes: st["client_write_bytes"].as_u64().unwrap_or(0),
        });
        if cached == total && done.is_none() {
            done = Some(t);
        }
        if done.is_some() && !fio.alive() {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    // Let fio finish by itself (a clean disconnect), then stop proxy and source.
    let end = Instant::now() + Duration::from_secs(runtime + 30);
    while fio.alive() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(100));
    }
    let fio_ok = fio.stop().is_some_and(|s| s.success());
    px.proc.stop();
    src.stop();
    let Some(secs) = done else {
        bail!("figure: relocation not finished within {limit:?}");
    };
    let (r, w) = if fio_ok {
        (fio_iops(&fio_out, false)?, fio_iops(&fio_out, true)?)
    } else {
        eprintln!("  fio workload failed:\n{}", fio.tail());
        (f64::NAN, f64::NAN)
    };
    let (source_bytes, twice) = source_reads(&log, 65536)?;
    eprintln!(
        "  relocation under workload at {d} ms: {secs:.1} s (ideal {ideal:.1} s), source served {source_bytes} bytes, {twice} blocks twice; fio {r:.0} r + {w:.0} w IOPS"
    );
    Ok(Figure {
        delay_ms: d,
        workload_iops: args.figure_iops,
        secs,
        ideal_secs: ideal,
        source_bytes,
        blocks_read_twice: twice,
        links: link_rates(&samples),
        samples,
        fio_read_iops: r,
        fio_write_iops: w,
    })
}

/// Picks one count out of a sample.
type PartOf = fn(&Sample) -> u64;

fn plot_figure(f: &Figure, size_mib: u64, link_mib: u64, out: &Path) -> anyhow::Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let tmax = f.samples.last().map_or(1.0, |s| s.t).max(f.ideal_secs) * 1.05;
    let root = SVGBackend::new(out, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "xnbd proxy: {size_mib} MiB disk, {link_mib} MiB/s link, {} ms source delay, fio {} IOPS 4k randrw",
                f.delay_ms, f.workload_iops
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..tmax, 0.0..100.0)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("time since the proxy started (s)")
        .y_desc("% of blocks")
        .draw()
        .map_err(|x| e(&x))?;
    let pct = |n: u64, s: &Sample| n as f64 / s.total_blocks.max(1) as f64 * 100.0;
    let series: [(&str, RGBColor, PartOf); 4] = [
        ("cached (local)", BLUE, |s| s.cached_blocks),
        ("fetched by background copy", GREEN, |s| s.background_blocks),
        ("fetched on demand", RED, |s| s.demand_blocks),
        ("made local by writes", MAGENTA, |s| s.written_blocks),
    ];
    for (name, color, get) in series {
        let data: Vec<(f64, f64)> = f.samples.iter().map(|s| (s.t, pct(get(s), s))).collect();
        figure::draw_plain(&mut chart, name, color.to_rgba(), data)?;
    }
    let ideal = vec![(0.0, 0.0), (f.ideal_secs, 100.0)];
    figure::draw_reference(&mut chart, "disk size / link rate", ideal)?;
    figure::draw_legend(&mut chart, SeriesLabelPosition::LowerRight)?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

/// Picks one link out of an interval.
type LinkOf = fn(&LinkRate) -> f64;

/// Traffic on each link over time (the xNBD paper's figures 4-6), same run as the cached plot.
fn plot_links(f: &Figure, size_mib: u64, link_mib: u64, out: &Path) -> anyhow::Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let tmax = f.samples.last().map_or(1.0, |s| s.t).max(f.ideal_secs) * 1.05;
    let series: [(&str, RGBColor, LinkOf); 5] = [
        ("source -> proxy, total", BLUE, |l| {
            l.source_demand + l.source_background
        }),
        ("source -> proxy, background copy", GREEN, |l| {
            l.source_background
        }),
        ("source -> proxy, on demand", RED, |l| l.source_demand),
        ("proxy -> client (reads)", CYAN, |l| l.client_read),
        ("client -> proxy (writes)", MAGENTA, |l| l.client_write),
    ];
    let ymax = f
        .links
        .iter()
        .flat_map(|l| series.iter().map(move |s| (s.2)(l)))
        .fold(link_mib as f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(out, (900, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "xnbd proxy links: {size_mib} MiB disk, {link_mib} MiB/s link, {} ms source delay, fio {} IOPS 4k randrw",
                f.delay_ms, f.workload_iops
            ),
            ("sans-serif", 16),
        )
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..tmax, 0.0..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("time since the proxy started (s)")
        .y_desc("MiB/s per poll interval")
        .draw()
        .map_err(|x| e(&x))?;
    for (name, color, get) in series {
        let data: Vec<(f64, f64)> = f.links.iter().map(|l| (l.t, get(l))).collect();
        figure::draw_plain(&mut chart, name, color.to_rgba(), data)?;
    }
    let cap = vec![(0.0, link_mib as f64), (tmax, link_mib as f64)];
    figure::draw_reference(&mut chart, "source link rate limit", cap)?;
    figure::draw_legend(&mut chart, SeriesLabelPosition::UpperRight)?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

// ---------------------------------------------------------------- report

/// Everything one `bench nbd` run measured.
#[derive(Debug, Serialize)]
pub struct Report {
    /// UTC start time.
    pub date: String,
    /// Where it ran.
    pub machine: Machine,
    /// Load average at the start (1, 5, 15 min).
    pub loadavg: String,
    /// The options.
    pub options: serde_json::Value,
    /// Target mode.
    pub target: Vec<TargetRow>,
    /// On-demand latency.
    pub latency: Vec<LatencyRow>,
    /// Relocations without a workload.
    pub relocation: Vec<RelocRow>,
    /// Relocation with a workload (figure 7).
    pub figure: Option<Figure>,
}

fn markdown(r: &Report, args: &Args) -> String {
    use std::fmt::Write;
    let mut md = String::new();
    let _ = writeln!(md, "# bench nbd, {}\n", r.date);
    let _ = writeln!(md, "{}; load average {}.\n", r.machine.line(), r.loadavg);
    if !r.target.is_empty() {
        let _ = writeln!(
            md,
            "Target mode: {} MiB image in the page cache, Unix sockets, fresh server per measurement; fio 4k iodepth {} x {} jobs, {} s; nbdcopy 4 connections. {} warm-up pass(es) not counted; median of {} runs (ratio to nbdkit).\n",
            args.image_mib, args.iodepth, args.numjobs, args.secs, args.warmup, args.runs
        );
        let _ = writeln!(md, "| metric | {} |", args.servers.join(" | "));
        let _ = writeln!(md, "|---|{}", "---|".repeat(args.servers.len()));
        let mut metrics: Vec<&str> = r.target.iter().map(|t| t.metric.as_str()).collect();
        metrics.dedup();
        for m in metrics {
            let cells: Vec<String> = args
                .servers
                .iter()
                .map(|sv| {
                    r.target
                        .iter()
                        .find(|t| &t.server == sv && t.metric == m)
                        .map_or("-".into(), |t| {
                            format!(
                                "{:.0} ({:.2})",
                                t.median,
                                t.ratio_to_nbdkit.unwrap_or(f64::NAN)
                            )
                        })
                })
                .collect();
            let _ = writeln!(md, "| {m} | {} |", cells.join(" | "));
        }
        md.push('\n');
    }
    if !r.latency.is_empty() {
        let _ = writeln!(
            md,
            "Proxy on-demand read latency, 64 KiB cold blocks (`--no-background`), source nbdkit delay+rate ({} MiB/s), median of {} reads, ms:\n",
            args.link_mib, args.cold_reads
        );
        let _ = writeln!(
            md,
            "| source delay | source direct | proxy cold | cold - direct | cold - direct p99 | cold / direct | proxy warm |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|");
        for l in &r.latency {
            let _ = writeln!(
                md,
                "| {} ms | {:.1} | {:.1} | {:.2} | {:.2} | {:.2} | {:.2} |",
                l.delay_ms,
                l.source_median_ms,
                l.cold_median_ms,
                l.excess_median_ms,
                l.excess_p99_ms,
                l.cold_over_source,
                l.warm_median_ms
            );
        }
        md.push('\n');
    }
    if !r.relocation.is_empty() {
        let _ = writeln!(
            md,
            "Relocation (`xnbd ctl cache-all`, no workload), {} MiB disk over a {} MiB/s link:\n",
            args.disk_mib, args.link_mib
        );
        let _ = writeln!(md, "| source delay | time (s) | size/rate (s) | ratio | bytes from source / size | blocks read twice |");
        let _ = writeln!(md, "|---|---|---|---|---|---|");
        for x in &r.relocation {
            let _ = writeln!(
                md,
                "| {} ms | {:.2} | {:.2} | {:.3} | {:.3} | {} |",
                x.delay_ms,
                x.secs,
                x.ideal_secs,
                x.time_ratio,
                x.source_bytes as f64 / x.size as f64,
                x.blocks_read_twice
            );
        }
        md.push('\n');
    }
    if let Some(f) = &r.figure {
        let last = f.samples.last();
        let _ = writeln!(
            md,
            "Relocation under a workload (fio 4k randrw at {} IOPS, background copy on), {} ms source delay: every block local after {:.1} s (size/rate {:.1} s); source served {:.3} x disk size, {} blocks twice; on demand {} blocks, background {}, by writes {}; fio got {:.0} read + {:.0} write IOPS.\n",
            f.workload_iops,
            f.delay_ms,
            f.secs,
            f.ideal_secs,
            f.source_bytes as f64 / (args.disk_mib << 20) as f64,
            f.blocks_read_twice,
            last.map_or(0, |s| s.demand_blocks),
            last.map_or(0, |s| s.background_blocks),
            last.map_or(0, |s| s.written_blocks),
            f.fio_read_iops,
            f.fio_write_iops,
        );
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let _ = writeln!(
            md,
            "Link traffic: source -> proxy {:.1} MiB on demand + {:.1} MiB background; proxy -> client {:.1} MiB read, client -> proxy {:.1} MiB written; peak source link {:.1} MiB/s per 0.5 s poll.\n",
            mib(last.map_or(0, |s| s.demand_bytes)),
            mib(last.map_or(0, |s| s.background_bytes)),
            mib(last.map_or(0, |s| s.client_read_bytes)),
            mib(last.map_or(0, |s| s.client_write_bytes)),
            f.links
                .iter()
                .map(|l| l.source_demand + l.source_background)
                .fold(0.0, f64::max),
        );
    }
    md
}

/// Runs `bench nbd`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    let xnbd = find_xnbd(args.xnbd.as_deref())?;
    for t in ["nbdkit", "qemu-nbd", "fio", "nbdcopy"] {
        need_tool(t)?;
    }
    let libnbd = Command::new("/usr/bin/python3")
        .args(["-c", "import nbd"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !libnbd {
        bail!("/usr/bin/python3 cannot import nbd (apt-get install python3-libnbd)");
    }
    let (date, stamp) = utc_now();
    let machine = Machine::probe();
    let loadavg = std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");
    eprintln!("bench nbd: {date}, {}, load {loadavg}", machine.line());
    let tmp = tempfile::Builder::new().prefix("bench-nbd").tempdir()?;
    let ctx = Ctx {
        xnbd,
        dir: tmp.path().to_path_buf(),
        img: tmp.path().join("target.img"),
    };
    let part = |p: &str| args.parts.iter().any(|x| x == p);
    let target_rows = if part("target") {
        target(args, &ctx)?
    } else {
        Vec::new()
    };
    let disk = ctx.dir.join("disk.img");
    let (mut lat, mut rel, mut fig) = (Vec::new(), Vec::new(), None);
    if part("latency") || part("relocation") || part("figure") {
        make_image(&disk, args.disk_mib)?;
        if part("latency") {
            eprintln!("proxy: on-demand latency");
            lat = latency(args, &ctx, &disk)?;
        }
        if part("relocation") {
            eprintln!(
                "proxy: relocation, {} MiB at {} MiB/s",
                args.disk_mib, args.link_mib
            );
            rel = relocation(args, &ctx, &disk)?;
        }
        if part("figure") {
            eprintln!("proxy: relocation under a workload (figure 7)");
            fig = Some(figure(args, &ctx, &disk)?);
        }
    }
    let report = Report {
        date,
        machine,
        loadavg,
        options: serde_json::json!({
            "servers": args.servers, "runs": args.runs, "secs": args.secs,
            "image_mib": args.image_mib, "numjobs": args.numjobs, "iodepth": args.iodepth,
            "warmup": args.warmup,
            "delays": args.delays, "cold_reads": args.cold_reads, "disk_mib": args.disk_mib,
            "link_mib": args.link_mib, "reloc_delays": args.reloc_delays,
            "figure_delay": args.figure_delay, "figure_iops": args.figure_iops,
        }),
        target: target_rows,
        latency: lat,
        relocation: rel,
        figure: fig,
    };
    let md = markdown(&report, args);
    println!("{md}");
    let p = write_json(&args.results, &format!("nbd-{stamp}.json"), &report)?;
    std::fs::write(args.results.join(format!("nbd-{stamp}.md")), &md)?;
    if let Some(f) = &report.figure {
        let svg = args.results.join(format!("nbd-{stamp}-cached.svg"));
        plot_figure(f, args.disk_mib, args.link_mib, &svg)?;
        eprintln!("figure: {}", svg.display());
        let svg = args.results.join(format!("nbd-{stamp}-links.svg"));
        plot_links(f, args.disk_mib, args.link_mib, &svg)?;
        eprintln!("figure: {}", svg.display());
    }
    eprintln!("results: {}", p.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_proxy_figures_render_with_their_legends() {
        let samples: Vec<Sample> = (0..=4u64)
            .map(|i| Sample {
                t: i as f64,
                cached: i as f64 * 25.0,
                cached_blocks: i * 25,
                total_blocks: 100,
                demand_blocks: i * 5,
                background_blocks: i * 20,
                written_blocks: i,
                demand_bytes: i << 20,
                background_bytes: i << 22,
                client_read_bytes: i << 18,
                client_write_bytes: i << 16,
            })
            .collect();
        let f = Figure {
            delay_ms: 20,
            workload_iops: 200,
            secs: 4.0,
            ideal_secs: 4.0,
            source_bytes: 100 << 16,
            blocks_read_twice: 0,
            links: link_rates(&samples),
            samples,
            fio_read_iops: 100.0,
            fio_write_iops: 100.0,
        };
        let dir = tempfile::tempdir().unwrap();
        let (cached, links) = (dir.path().join("cached.svg"), dir.path().join("links.svg"));
        plot_figure(&f, 6, 4, &cached).unwrap();
        plot_links(&f, 6, 4, &links).unwrap();
        let cached = std::fs::read_to_string(cached).unwrap();
        let links = std::fs::read_to_string(links).unwrap();
        for label in [
            "cached (local)",
            "made local by writes",
            "disk size / link rate",
        ] {
            assert!(cached.contains(label), "{label} missing");
        }
        assert!(links.contains("source link rate limit"));
    }

    #[test]
    fn log_reads_count_bytes_and_repeats() {
        let log = "\
2026-11-22 05:05:40.735819 connection=1 Connect export=\"\" tls=0 size=0x400000
2026-11-22 05:05:40.736695 connection=1 Read id=1 offset=0x20000 count=0x10000 ...
2026-11-22 05:05:40.769320 connection=1 ...Read id=1 return=0
2026-11-22 05:05:40.736695 connection=1 Read id=2 offset=0x0 count=0x20000 ...
2026-11-22 05:05:40.736695 connection=1 Read id=3 offset=0x28000 count=0x1000 ...
2026-11-22 05:05:40.736695 connection=1 Write id=4 offset=0x0 count=0x10000 fua=0 ...
";
        // Blocks 0, 1 and 2 are read; block 2 twice (0x20000 and 0x28000).
        assert_eq!(count_reads(log, 0x10000), (0x10000 + 0x20000 + 0x1000, 1));
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        let v: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&v, 99.0), 198.0);
        assert_eq!(percentile(&[5.0, 1.0, 3.0], 99.0), 5.0);
        assert_eq!(percentile(&[5.0, 1.0, 3.0], 50.0), 3.0);
    }

    #[test]
    fn link_rates_are_per_interval_mib_per_sec() {
        let at = |t: f64, demand: u64, bg: u64, rd: u64, wr: u64| Sample {
            t,
            cached: 0.0,
            cached_blocks: 0,
            total_blocks: 1,
            demand_blocks: 0,
            background_blocks: 0,
            written_blocks: 0,
            demand_bytes: demand,
            background_bytes: bg,
            client_read_bytes: rd,
            client_write_bytes: wr,
        };
        const M: u64 = 1 << 20;
        let s = [
            at(0.0, 0, 0, 0, 0),
            at(0.5, M, 2 * M, M / 2, 0),
            // A repeated timestamp is skipped, not divided by zero.
            at(0.5, M, 2 * M, M / 2, 0),
            at(1.5, M, 6 * M, M, 3 * M),
        ];
        let l = link_rates(&s);
        assert_eq!(l.len(), 2);
        assert_eq!(
            (
                l[0].t,
                l[0].source_demand,
                l[0].source_background,
                l[0].client_read
            ),
            (0.5, 2.0, 4.0, 1.0)
        );
        assert_eq!(
            (
                l[1].source_demand,
                l[1].source_background,
                l[1].client_read,
                l[1].client_write
            ),
            (0.0, 4.0, 0.5, 3.0)
        );
    }
}
