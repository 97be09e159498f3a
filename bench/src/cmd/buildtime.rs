//! `bench build-time`: how long one `mvc cluster create ... --start` takes to build and
//! start a three-site cluster through the controller and the site agents (the 2012
//! paper's figure 9), against the one-way delay the WAN emulator adds on the uplinks of
//! sites B and C.
//!
//! The lab is the controller demo's (`mvc demo`, control/src/demo.rs): site A public, B
//! and C behind NAT with the agent's TCP port forwarded, an `mvc agent` on every site
//! frontend, the controller run on site A's frontend. The reference measured in the same
//! run is the underlay RTT from B's frontend to A's.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bench::lab::{self, Lab, Topology};
use serde::Serialize;

use super::apps;
use super::figure::{self, Panel};
use super::wanem::{LinkArgs, Wan};
use super::{find_mvc, utc_now, write_json, Machine};

/// TCP port of the agents.
const AGENT_PORT: u16 = 7000;

/// Options of `bench build-time`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mvc binary (default: next to this one).
    #[arg(long)]
    pub mvc: Option<PathBuf>,
    /// One-way delays (ms) added on the uplinks of sites B and C, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0,20,60,100,140")]
    pub delay: Vec<u32>,
    /// Builds per delay (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Compute VMs per site.
    #[arg(long, default_value_t = 2)]
    pub computes: u32,
    /// Where to write the JSON result, the table and the figure.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// Agents started with `nsenter --net` (they must stay in the root mount namespace so the
/// VM namespaces they make are seen by all); stopped on drop, with the VMs they left.
struct Agents {
    children: Vec<Child>,
    vm_prefix: String,
}

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.children {
            if let (Ok(pid), Ok(None)) = (i32::try_from(c.id()), c.try_wait()) {
                // SAFETY: kill(2) on a child we spawned and have not reaped.
                unsafe {
                    libc::kill(pid, libc::SIGTERM);
                }
            }
        }
        for c in &mut self.children {
            let end = Instant::now() + Duration::from_secs(15);
            while matches!(c.try_wait(), Ok(None)) && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        let left: Vec<String> = std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.vm_prefix))
                    .collect()
            })
            .unwrap_or_default();
        for ns in left {
            if let Ok(o) = lab::run(&["ip", "netns", "pids", &ns]) {
                for pid in o.stdout.split_whitespace().filter_map(|p| p.parse().ok()) {
                    // SAFETY: kill(2) has no memory-safety preconditions; the process
                    // runs in a VM namespace of this run's agents.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                    }
                }
            }
            let _ = lab::run(&["ip", "netns", "del", &ns]);
        }
    }
}

fn mvc_local(mvc: &Path, args: &[&str]) -> anyhow::Result<String> {
    let o = Command::new(mvc)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("running mvc")?;
    if !o.status.success() {
        bail!(
            "mvc {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

struct Ctl<'a> {
    mvc: &'a Path,
    ns: String,
    db: PathBuf,
    key: PathBuf,
}

impl Ctl<'_> {
    fn run(&self, args: &[&str], limit: u64) -> anyhow::Result<String> {
        let o = Command::new("timeout")
            .arg(limit.to_string())
            .args(["ip", "netns", "exec", &self.ns])
            .arg(self.mvc)
            .args(args)
            .env("MVC_DB", &self.db)
            .env("MVC_KEY", &self.key)
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .output()
            .context("running the controller")?;
        if !o.status.success() {
            bail!(
                "mvc {} failed ({}): {}",
                args.join(" "),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }
}

/// A site as the controller adds it: name, agent address, agent key.
type SiteEntry = (String, String, String);

fn start_agents(
    lab: &Lab,
    t: &Topology,
    mvc: &Path,
    user_pub: &str,
    max_vms: u32,
) -> anyhow::Result<(Agents, Vec<SiteEntry>)> {
    let vm_prefix = format!("{}-v", lab.prefix());
    let mut agents = Agents {
        children: Vec::new(),
        vm_prefix: vm_prefix.clone(),
    };
    let mut sites = Vec::new();
    for (i, site) in t.sites.iter().enumerate() {
        let name = ["A", "B", "C"].get(i).context("three sites at most")?;
        let state = lab.dir().join(format!("agent-{name}"));
        let st = state.to_string_lossy().into_owned();
        let key = mvc_local(mvc, &["agent", "init", "--state", &st])?;
        mvc_local(
            mvc,
            &[
                "agent",
                "authorize",
                "--state",
                &st,
                "--key",
                user_pub,
                "--max-vms",
                &max_vms.to_string(),
            ],
        )?;
        let port = AGENT_PORT.to_string();
        if let Some(r) = &site.router {
            let to = format!("{}:{AGENT_PORT}", site.frontend_ip);
            lab.iptables(
                r,
                &[
                    "-t",
                    "nat",
                    "-A",
                    "PREROUTING",
                    "-i",
                    "wan",
                    "-p",
                    "tcp",
                    "--dport",
                    &port,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &to,
                ],
            )?;
            lab.iptables(
                r,
                &[
                    "-I",
                    "FORWARD",
                    "1",
                    "-i",
                    "wan",
                    "-p",
                    "tcp",
                    "-d",
                    &site.frontend_ip.to_string(),
                    "--dport",
                    &port,
                    "-m",
                    "conntrack",
                    "--ctstate",
                    "NEW",
                    "-j",
                    "ACCEPT",
                ],
            )?;
        }
        let log = std::fs::File::create(lab.dir().join(format!("agent-{name}.log")))?;
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", site.frontend))
            .arg(mvc)
            .args(["agent", "run", "--state", &st, "--site", name])
            .args(["--listen", &format!("0.0.0.0:{AGENT_PORT}")])
            .args(["--ns-prefix", &vm_prefix])
            .args([
                "--host",
                &format!("{}-h0:2:8192:{max_vms}", name.to_lowercase()),
            ])
            .args(["--overlay", "mvc"])
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting mvc agent")?;
        agents.children.push(child);
        sites.push((
            name.to_string(),
            format!("{}:{AGENT_PORT}", site.public_ip),
            key,
        ));
    }
    // Wait until every agent answers from site A's frontend.
    for (name, addr, _) in &sites {
        let sa: std::net::SocketAddr = addr.parse()?;
        lab.wait_until(
            &format!("agent {name} listening"),
            Duration::from_secs(15),
            || {
                lab.in_ns(&t.sites[0].frontend, || {
                    std::net::TcpStream::connect_timeout(&sa, Duration::from_millis(300)).is_ok()
                })
                .unwrap_or(false)
            },
        )?;
    }
    Ok((agents, sites))
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
struct Report<'a> {
    bench: &'static str,
    date: String,
    machine: Machine,
    load_before: [f64; 3],
    load_after: [f64; 3],
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
    if args.runs == 0 || args.runs > 20 || args.computes == 0 || args.computes > 8 {
        bail!("--runs must be 1..=20, --computes 1..=8");
    }
    if !lab::is_root() {
        bail!("bench build-time builds network namespaces: run it as root");
    }
    let mvc = find_mvc(args.mvc.clone())?;
    let (date, stamp) = utc_now();
    let machine = Machine::probe();
    let load_before = apps::load_avg();
    eprintln!(
        "bench build-time: {date}, {}, {}",
        machine.line(),
        apps::load_line(load_before)
    );
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
    let key = lab.dir().join("user.key");
    let user_pub = mvc_local(&mvc, &["key", "gen", "--key", &key.to_string_lossy()])?;
    let vms = args.computes * 3 + 1;
    let (agents, sites) = start_agents(&lab, &t, &mvc, &user_pub, vms + 1)?;
    let ctl = Ctl {
        mvc: &mvc,
        ns: t.sites[0].frontend.clone(),
        db: lab.dir().join("controller/controller.db"),
        key,
    };
    for (name, addr, k) in &sites {
        ctl.run(
            &["site", "add", name, "--agent", addr, "--agent-key", k],
            60,
        )?;
    }
    let counts = format!("{0}:{0}:{0}", args.computes);
    let steps = args.delay.len() as u64 * u64::from(args.runs);
    let pb = apps::progress(steps, "build-time");
    let mut rows = Vec::new();
    let mut seq = 0;
    for &d in &args.delay {
        for w in &mut wans {
            w.set(&lab, &LinkArgs::delay(f64::from(d)))?;
        }
        let pings = lab::ping_samples(&lab, &t.sites[1].frontend, t.sites[0].public_ip, 5, 0.2)?;
        let mut row = Row {
            delay_ms: d,
            build_s_runs: Vec::new(),
            build_s: f64::NAN,
            destroy_s_runs: Vec::new(),
            destroy_s: f64::NAN,
            failed: Vec::new(),
            rtt_ab_ms: lab::median(&pings),
        };
        for i in 0..args.runs {
            seq += 1;
            let name = format!("bt{seq}");
            pb.set_message(format!("delay {d} ms, build {}", i + 1));
            let t0 = Instant::now();
            let made = ctl.run(
                &[
                    "cluster",
                    "create",
                    &name,
                    "--sites",
                    "A:B:C",
                    "--computes",
                    &counts,
                    "--memory",
                    "256",
                    "--frontend-memory",
                    "256",
                    "--start",
                ],
                300,
            );
            let built = t0.elapsed().as_secs_f64();
            let t1 = Instant::now();
            let destroyed = ctl.run(&["cluster", "destroy", &name], 300);
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
    drop(agents);
    lab.teardown();
    let load_after = apps::load_avg();
    let md = table(&rows);
    let head = format!(
        "Cluster build time: `mvc cluster create --sites A:B:C --computes {counts} --start` ({vms} VMs: frontend and computes, overlay edges, DHCP leases) through the controller on site A and the three site agents; delay added each way on B's and C's uplinks; median of {} builds, {date}, {}; {} before, {} after.",
        args.runs,
        machine.line(),
        apps::load_line(load_before),
        apps::load_line(load_after)
    );
    println!("\n{head}\n\n{md}");
    let report = Report {
        bench: "build-time",
        date,
        machine,
        load_before,
        load_after,
        computes_per_site: args.computes,
        vms,
        runs: args.runs,
        rows: &rows,
    };
    let p = write_json(&args.results, &format!("build-time-{stamp}.json"), &report)?;
    std::fs::write(
        args.results.join(format!("build-time-{stamp}.md")),
        format!("{head}\n\n{md}"),
    )?;
    let svg = args.results.join(format!("build-time-{stamp}.svg"));
    figure::lines(
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
        &svg,
    )?;
    eprintln!("results: {}, figure: {}", p.display(), svg.display());
    Ok(())
}
