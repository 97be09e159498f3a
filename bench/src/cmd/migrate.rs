//! `bench migrate`: live migration of a qemu VM between two sites (`mvc vm migrate`)
//! against the WAN delay and the disk size, the disk moved after the switch (xnbd
//! proxy, post-copy, the default) or before it (`--precopy-disk`), as the xNBD paper's
//! figures 5 to 7 measure it.
//!
//! The lab is the controller demo's ([`lab::sites`]): site A public (the controller,
//! netns VMs), B and C behind NAT with the qemu driver, B's uplink through the userspace
//! WAN emulator (so every byte between B and C crosses one added delay each way). The
//! cluster has one compute at A and one at B (C's own compute is stopped to spare the
//! CPU); B's compute moves B -> C, then C -> B, and so on, while:
//!
//! - A's compute pings it every 10 ms: the longest run of lost replies is the downtime
//!   the network sees;
//! - the guest sends a TCP stream (8 KiB every 10 ms, busybox `nc`) to A's compute: the
//!   longest pause between arrivals is the TCP stall, and the stream must survive;
//! - the guest reads its disk in a loop (1 MiB direct reads, cycling through the disk,
//!   one console line per MiB): the read rate during the move and for some seconds
//!   after it, from when those lines appear in the two sites' console logs;
//! - the bytes through B's uplink (its NAT router's `wan` interface, both ways) are the
//!   bytes over the WAN.
//!
//! Each point runs both strategies side by side in the same lab, so they compare on the
//! same load; `--baseline-proxy-args` adds a third, the proxy with extra options (through
//! an `xnbd` wrapper the agents run), for an A/B of proxy settings.

use std::collections::BTreeMap;
use std::io::Read;
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use lab::sites::SiteLab;
use lab::{Lab, Topology};
use serde::Serialize;

use super::apps;
use super::figure::Panel;
use super::find_mvc;
use super::wanem::{LinkArgs, Wan};

/// Options of `bench migrate`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mvc binary (default: next to this one).
    #[arg(long)]
    pub mvc: Option<PathBuf>,
    /// One-way delays (ms) added on site B's uplink, comma-separated (full sweep:
    /// 0,20,60,100).
    #[arg(long, value_delimiter = ',', default_value = "0,100")]
    pub delay: Vec<u32>,
    /// Disk sizes (MiB), comma-separated, one lab each (full sweep: 128,512,1024).
    #[arg(long, value_delimiter = ',', default_value = "128")]
    pub disk_mb: Vec<u64>,
    /// Guest memory, MiB.
    #[arg(long, default_value_t = 128)]
    pub memory_mb: u64,
    /// Migrations per point and strategy (the median is reported).
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    /// qemu's downtime limit, ms.
    #[arg(long, default_value_t = 300)]
    pub downtime_ms: u64,
    /// Seconds the disk read rate is measured for after each move.
    #[arg(long, default_value_t = 5)]
    pub after_secs: u64,
    /// Cap of the proxy's background copy, bytes/s (`vm migrate --disk-rate`; 0: none).
    #[arg(long, default_value_t = 0)]
    pub disk_rate: u64,
    /// Only the default strategy (post-copy through the xnbd proxy).
    #[arg(long)]
    pub post_copy_only: bool,
    /// Extra `xnbd proxy` options measured as a third strategy, `post-copy-base`, taking
    /// turns with the others (an A/B of proxy settings on the same load), e.g.
    /// "--readahead-max 1M --no-background-yield" for the proxy before its readahead grew
    /// and its background copy yielded.
    #[arg(long, allow_hyphen_values = true)]
    pub baseline_proxy_args: Option<String>,
    /// Where to write the JSON result, the table and the figure.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// One migration.
#[derive(Debug, Clone, Serialize)]
pub struct Run {
    /// `B->C` or `C->B`.
    pub direction: String,
    /// Seconds of `mvc vm migrate` (start to the origin released).
    pub total_s: f64,
    /// The pause qemu measured at switchover, ms.
    pub qemu_downtime_ms: Option<u64>,
    /// Longest run of lost pings (every 10 ms) times 10 ms.
    pub ping_gap_ms: f64,
    /// Pings lost in all.
    pub pings_lost: u64,
    /// Longest pause between arrivals of the guest's TCP stream, ms.
    pub tcp_stall_ms: f64,
    /// The stream still delivered after the move, on the same connection.
    pub tcp_survived: bool,
    /// Bytes through B's uplink (both ways) during the move.
    pub wan_bytes: u64,
    /// Memory bytes qemu sent.
    pub ram_bytes: u64,
    /// Disk bytes the proxy fetched (post-copy) or the mirror copied (pre-copy).
    pub disk_bytes: u64,
    /// Disk size.
    pub disk_total: u64,
    /// The guest's disk read rate while the disk moved (post-copy: from the switch to
    /// the end; pre-copy: from the start to the switch), MiB/s.
    pub io_during_mibs: Option<f64>,
    /// The same after the move, MiB/s.
    pub io_after_mibs: Option<f64>,
}

/// One point: disk size, delay, strategy.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Disk size, MiB.
    pub disk_mb: u64,
    /// Added one-way delay on B's uplink, ms.
    pub delay_ms: u32,
    /// `post-copy` or `pre-copy`.
    pub strategy: &'static str,
    /// Underlay RTT B frontend -> A's public address (median of 5 pings), ms.
    pub rtt_ba_ms: Option<f64>,
    /// The migrations.
    pub runs: Vec<Run>,
    /// Migrations that failed (their errors).
    pub failed: Vec<String>,
    /// Medians of the runs.
    pub total_s: f64,
    /// Median.
    pub ping_gap_ms: f64,
    /// Median.
    pub tcp_stall_ms: f64,
    /// Median.
    pub wan_bytes: f64,
    /// Median of wan bytes / (disk size + guest memory).
    pub wan_ratio: f64,
    /// Median.
    pub io_during_mibs: f64,
    /// Median.
    pub io_after_mibs: f64,
    /// Every run's stream survived.
    pub tcp_survived: bool,
    /// No run fetched more disk bytes than the disk holds (post-copy).
    pub fetched_once: bool,
}

#[derive(Serialize)]
struct Fields<'a> {
    memory_mb: u64,
    downtime_limit_ms: u64,
    disk_rate: u64,
    runs_per_point: u32,
    rows: &'a [Row],
}

fn med(v: impl Iterator<Item = f64>) -> f64 {
    let v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    lab::median(&v).unwrap_or(f64::NAN)
}

fn spread(v: impl Iterator<Item = f64>) -> String {
    let v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    if v.len() < 2 {
        return String::new();
    }
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(" ({lo:.0}-{hi:.0})")
}

impl Row {
    fn summarise(&mut self, memory_mb: u64) {
        let r = &self.runs;
        self.total_s = med(r.iter().map(|x| x.total_s));
        self.ping_gap_ms = med(r.iter().map(|x| x.ping_gap_ms));
        self.tcp_stall_ms = med(r.iter().map(|x| x.tcp_stall_ms));
        self.wan_bytes = med(r.iter().map(|x| x.wan_bytes as f64));
        let moved = ((self.disk_mb + memory_mb) << 20) as f64;
        self.wan_ratio = med(r.iter().map(|x| x.wan_bytes as f64 / moved));
        self.io_during_mibs = med(r.iter().filter_map(|x| x.io_during_mibs));
        self.io_after_mibs = med(r.iter().filter_map(|x| x.io_after_mibs));
        self.tcp_survived = !r.is_empty() && r.iter().all(|x| x.tcp_survived);
        self.fetched_once = !r.is_empty()
            && r.iter()
                .all(|x| x.disk_total > 0 && x.disk_bytes <= x.disk_total);
    }
}

/// The markdown table.
pub fn table(rows: &[Row]) -> String {
    let mut s = String::from(
        "| disk MiB | delay ms | strategy | RTT B-A ms | total s | ping gap ms | TCP stall ms | TCP survived | WAN MiB | WAN / (disk+RAM) | disk fetched once | read MiB/s during | after | during/after | failed |\n\
         |---:|---:|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let yes = |b: bool| if b { "yes" } else { "NO" };
        s.push_str(&format!(
            "| {} | {} | {} | {} | {:.1} | {:.0}{} | {:.0}{} | {} | {:.0} | {:.2} | {} | {:.1} | {:.1} | {:.2} | {} of {} |\n",
            r.disk_mb,
            r.delay_ms,
            r.strategy,
            r.rtt_ba_ms.map_or("-".into(), |x| format!("{x:.1}")),
            r.total_s,
            r.ping_gap_ms,
            spread(r.runs.iter().map(|x| x.ping_gap_ms)),
            r.tcp_stall_ms,
            spread(r.runs.iter().map(|x| x.tcp_stall_ms)),
            yes(r.tcp_survived),
            r.wan_bytes / f64::from(1u32 << 20),
            r.wan_ratio,
            if r.strategy == "pre-copy" { "-" } else { yes(r.fetched_once) },
            r.io_during_mibs,
            r.io_after_mibs,
            r.io_during_mibs / r.io_after_mibs,
            r.failed.len(),
            r.failed.len() + r.runs.len(),
        ));
    }
    s
}

/// Run `cmd` in a guest's console shell (Unix socket `sock`); its output.
fn console(sock: &Path, cmd: &str, timeout: Duration) -> anyhow::Result<String> {
    Ok(lab::sites::guest_console(sock, cmd, timeout)?)
}

/// Watches the guest's `MVC-IO <n>` lines (one per MiB read) in console logs: when
/// each new one appeared, by site.
struct IoWatch {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(Instant, usize)>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl IoWatch {
    /// Polls, every 20 ms, the console log of the VM (`c<N>-<vm>.console.log`) in each
    /// of `dirs`; a line is noted with the index of its directory. A log that is
    /// replaced (the VM started there again) is read anew.
    fn start(dirs: Vec<PathBuf>, vm: String) -> IoWatch {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (st, se) = (stop.clone(), seen.clone());
        let thread = std::thread::spawn(move || {
            use std::io::Seek;
            use std::os::unix::fs::MetadataExt;
            let find = |d: &Path| -> Option<PathBuf> {
                lab::sites::vm_files(d, &vm, "console.log")
                    .into_iter()
                    .next()
            };
            // Per directory: the log's inode, bytes already read, the partial last line.
            let mut pos: Vec<(u64, u64, String)> = dirs
                .iter()
                .map(|d| {
                    find(d)
                        .and_then(|p| std::fs::metadata(p).ok())
                        .map_or((0, 0, String::new()), |m| (m.ino(), m.len(), String::new()))
                })
                .collect();
            let limit = Instant::now() + Duration::from_secs(3600);
            while !st.load(Ordering::Relaxed) && Instant::now() < limit {
                for (i, d) in dirs.iter().enumerate() {
                    let Some(mut f) = find(d).and_then(|p| std::fs::File::open(p).ok()) else {
                        continue;
                    };
                    let Ok(m) = f.metadata() else { continue };
                    if m.ino() != pos[i].0 || m.len() < pos[i].1 {
                        pos[i] = (m.ino(), 0, String::new());
                    }
                    if f.seek(std::io::SeekFrom::Start(pos[i].1)).is_err() {
                        continue;
                    }
                    let mut new = Vec::new();
                    let _ = (&mut f).take(1 << 20).read_to_end(&mut new);
                    pos[i].1 += new.len() as u64;
                    let now = Instant::now();
                    pos[i].2.push_str(&String::from_utf8_lossy(&new));
                    let text = std::mem::take(&mut pos[i].2);
                    let (done, rest) = text.rsplit_once('\n').unwrap_or(("", &text));
                    let n = done.matches("MVC-IO ").count();
                    pos[i].2 = rest.to_string();
                    let mut s = se.lock().unwrap_or_else(|p| p.into_inner());
                    s.extend(std::iter::repeat_n((now, i), n));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        IoWatch {
            stop,
            seen,
            thread: Some(thread),
        }
    }

    /// MiB/s of the lines of log `site` (any log: `None`) seen within `[from, to)`,
    /// measured between the first and the last of them.
    fn rate(&self, site: Option<usize>, from: Instant, to: Instant) -> Option<f64> {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let t: Vec<Instant> = s
            .iter()
            .filter(|(t, i)| *t >= from && *t < to && site.is_none_or(|x| x == *i))
            .map(|(t, _)| *t)
            .collect();
        let (first, last) = (t.first()?, t.last()?);
        let secs = last.duration_since(*first).as_secs_f64();
        // Too few lines or too short a span to be a rate.
        (t.len() >= 3 && secs > 0.2).then(|| (t.len() - 1) as f64 / secs)
    }

    /// The first line of log `site` seen at or after `from`.
    fn first(&self, site: usize, from: Instant) -> Option<Instant> {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.iter()
            .find(|(t, i)| *t >= from && *i == site)
            .map(|(t, _)| *t)
    }

    /// The last line of log `site` seen before `to`.
    fn last(&self, site: usize, to: Instant) -> Option<Instant> {
        let s = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        s.iter()
            .rev()
            .find(|(t, i)| *t < to && *i == site)
            .map(|(t, _)| *t)
    }
}

impl Drop for IoWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The receiving end of the guest's TCP stream, in A's compute: arrival times.
struct Stream {
    arrivals: Arc<Mutex<Vec<Instant>>>,
    closed: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Stream {
    /// Listens on `port` inside namespace `ns`; accepts one connection (within 60 s).
    fn listen(l: &Lab, ns: &str, port: u16) -> anyhow::Result<Stream> {
        let listener = l.in_ns(ns, || {
            TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
        })??;
        listener.set_nonblocking(true)?;
        let arrivals = Arc::new(Mutex::new(Vec::new()));
        let closed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (a, c, st) = (arrivals.clone(), closed.clone(), stop.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(60);
            let mut conn = loop {
                match listener.accept() {
                    Ok((s, _)) => break s,
                    Err(_) if Instant::now() < deadline && !st.load(Ordering::Relaxed) => {
                        std::thread::sleep(Duration::from_millis(20))
                    }
                    Err(_) => {
                        c.store(true, Ordering::Relaxed);
                        return;
                    }
                }
            };
            let _ = conn.set_nonblocking(false);
            let _ = conn.set_read_timeout(Some(Duration::from_millis(200)));
            let mut buf = vec![0u8; 64 << 10];
            let limit = Instant::now() + Duration::from_secs(3600);
            while !st.load(Ordering::Relaxed) && Instant::now() < limit {
                match conn.read(&mut buf) {
                    Ok(0) => break,
                    Ok(_) => a
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .push(Instant::now()),
                    Err(e)
                        if matches!(
                            e.kind(),
                            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                        ) => {}
                    Err(_) => break,
                }
            }
            c.store(true, Ordering::Relaxed);
        });
        Ok(Stream {
            arrivals,
            closed,
            stop,
        })
    }

    /// Whether data arrived since `t`.
    fn arrived_since(&self, t: Instant) -> bool {
        self.arrivals
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .last()
            .is_some_and(|x| *x > t)
    }

    /// Longest pause between arrivals within `[from, to]`, ms (the window's ends count
    /// as arrivals only when data came before and after them).
    fn stall_ms(&self, from: Instant, to: Instant) -> f64 {
        let a = self.arrivals.lock().unwrap_or_else(|p| p.into_inner());
        let mut prev = a
            .iter()
            .rev()
            .find(|t| **t <= from)
            .copied()
            .unwrap_or(from);
        let mut worst = Duration::ZERO;
        for t in a.iter().filter(|t| **t > from) {
            worst = worst.max(t.duration_since(prev));
            prev = *t;
            if *t > to {
                break;
            }
        }
        worst.as_secs_f64() * 1000.0
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Longest run of missing `icmp_seq` (every 10 ms) in ping's output, ms, and the
/// number lost between the first and the last reply.
pub fn ping_gap(out: &str) -> (f64, u64) {
    let mut seqs: Vec<u64> = out
        .lines()
        .filter_map(|l| l.split("icmp_seq=").nth(1))
        .filter_map(|s| s.split_whitespace().next()?.parse().ok())
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    let (mut worst, mut lost) = (0u64, 0u64);
    for w in seqs.windows(2) {
        let missing = w[1] - w[0] - 1;
        worst = worst.max(missing);
        lost += missing;
    }
    ((worst * 10) as f64, lost)
}

/// `vm migrate m <vm> --to <to>`, bounded at 900 s: how every move of the bench
/// starts.
fn move_args<'a>(vm: &'a str, to: &'a str) -> Vec<&'a str> {
    vec!["vm", "migrate", "m", vm, "--to", to, "--timeout", "900"]
}

/// End a ping this bench started: SIGINT, on which it writes out what it buffered.
fn stop_ping(l: &Lab, p: &lab::Proc) {
    let _ = lab::sys::kill(p.pid, libc::SIGINT);
    let deadline = Instant::now() + Duration::from_secs(3);
    while l.running(p) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    l.stop(p);
}

/// The WAN byte counter of site B: its NAT router's `wan` interface, both ways.
fn wan_counter(sl: &SiteLab) -> anyhow::Result<u64> {
    let r = sl.topo.sites[1]
        .router
        .as_deref()
        .context("site B has no router")?;
    Ok(sl.lab.if_counter(r, "wan", "rx_bytes")? + sl.lab.if_counter(r, "wan", "tx_bytes")?)
}

/// One lab: three sites, the cluster, the moving VM.
struct Setup {
    sl: SiteLab,
    wan: Wan,
    vm: String,
    ip: Ipv4Addr,
    pinger_ns: String,
    pinger_ip: Ipv4Addr,
    /// Where the VM runs now (`B` or `C`).
    at: &'static str,
    port: u16,
    downtime_ms: u64,
    disk_rate: u64,
    /// With `--baseline-proxy-args`: the file holding the options the agents' next `xnbd
    /// proxy` gets on top of its own (empty: none), and the baseline's options.
    proxy_choice: Option<(PathBuf, String)>,
}

/// Write an `xnbd` for the agents that runs `real`, adding to `xnbd proxy` the options
/// written in `choice` (split at blanks); returns its path.
fn xnbd_switch(dir: &Path, real: &Path, choice: &Path) -> anyhow::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    std::fs::write(choice, "")?;
    let path = dir.join("xnbd");
    let script = format!(
        "#!/bin/sh\n\
         # bench migrate --baseline-proxy-args: the proxy gets the options in {choice}.\n\
         if [ \"$1\" = proxy ] && [ -s '{choice}' ]; then exec '{real}' \"$@\" $(cat '{choice}'); fi\n\
         exec '{real}' \"$@\"\n",
        choice = choice.display(),
        real = real.display(),
    );
    std::fs::write(&path, script)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

impl Setup {
    fn new(
        mvc: &Path,
        disk_mb: u64,
        memory_mb: u64,
        baseline: Option<&str>,
    ) -> anyhow::Result<Setup> {
        let cache = std::env::var("MVC_QEMU_CACHE").unwrap_or_else(|_| "/var/cache/mvc".into());
        let prep = std::process::Command::new(mvc)
            .args(["agent", "qemu-prepare", "--cache", &cache])
            .output()
            .context("mvc agent qemu-prepare")?;
        if !prep.status.success() {
            bail!(
                "mvc agent qemu-prepare: {}",
                String::from_utf8_lossy(&prep.stderr)
            );
        }
        let xnbd = mvc.with_file_name("xnbd");
        if !xnbd.exists() {
            bail!("{} missing: build xnbd next to mvc", xnbd.display());
        }
        let lab = Lab::new("mg")?;
        let mut t = Topology::new(&lab)?;
        t.add_site(&lab, "a", false, 0)?;
        let b = t.add_site_wan(&lab, "b", true, 0, true)?;
        let mut wan = Wan::new(b.wan.as_deref().context("site b has no WAN namespace")?);
        t.add_site(&lab, "c", true, 0)?;
        wan.set(&lab, &LinkArgs::delay(0.0))?;
        let mut proxy_choice = None;
        let xnbd = match baseline {
            Some(base) => {
                let dir = std::env::temp_dir().join(format!("mvc-bench-xnbd-{}", lab.prefix()));
                let choice = dir.join("proxy-args");
                let w = xnbd_switch(&dir, &xnbd, &choice)?;
                proxy_choice = Some((choice, base.to_string()));
                w
            }
            None => xnbd,
        };
        let qemu_args = lab::sites::qemu_agent_args(&cache, &xnbd, disk_mb);
        let mut extra = BTreeMap::new();
        extra.insert("B".to_string(), qemu_args.clone());
        extra.insert("C".to_string(), qemu_args);
        let mut sl = SiteLab::start(lab, t, mvc, "mvc", 8, 8, &extra)?;
        sl.echo_ctl = false;
        sl.ctl_limit = Duration::from_secs(900);
        sl.add_sites()?;
        let mem = memory_mb.to_string();
        let cl = sl.ctl_json(&[
            "cluster",
            "create",
            "m",
            "--sites",
            "A:B:C",
            "--computes",
            "1:1:1",
            "--memory",
            &mem,
            "--frontend-memory",
            "128",
            "--start",
            // A TCG guest boots slowly on a loaded machine.
            "--lease-timeout",
            "300",
        ])?;
        let vm_at = |site: &str| -> anyhow::Result<serde_json::Value> {
            cl["vms"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|v| v["site"] == site && v["role"] == "compute")
                .cloned()
                .with_context(|| format!("no compute at {site}: {cl}"))
        };
        let (bvm, avm, cvm) = (vm_at("B")?, vm_at("A")?, vm_at("C")?);
        sl.ctl(&["vm", "stop", cvm["name"].as_str().unwrap_or_default()])?;
        let vm = bvm["name"].as_str().unwrap_or_default().to_string();
        let ip: Ipv4Addr = bvm["ip"].as_str().unwrap_or_default().parse()?;
        let pinger_ip: Ipv4Addr = avm["ip"].as_str().unwrap_or_default().parse()?;
        let pinger_ns = sl.vm_ns("m", avm["name"].as_str().unwrap_or_default())?;
        lab::wait_ping(&sl.lab, &pinger_ns, ip, Duration::from_secs(120))?;
        Ok(Setup {
            sl,
            wan,
            vm,
            ip,
            pinger_ns,
            pinger_ip,
            at: "B",
            port: 5000,
            downtime_ms: 300,
            disk_rate: 0,
            proxy_choice,
        })
    }

    fn console_of(&self, site: &str) -> anyhow::Result<PathBuf> {
        self.sl
            .vm_file(site, &self.vm, "console")
            .with_context(|| format!("no console of {} at {site}", self.vm))
    }

    /// The agents' run directories, where the VM runs now first.
    fn run_dirs(&self) -> Vec<PathBuf> {
        let other = if self.at == "B" { "C" } else { "B" };
        [self.at, other]
            .iter()
            .map(|s| self.sl.agents[*s].state.join("run"))
            .collect()
    }

    /// One move to the other site.
    fn migrate(&mut self, strategy: &str, after: Duration) -> anyhow::Result<Run> {
        let (from, to) = if self.at == "B" {
            ("B", "C")
        } else {
            ("C", "B")
        };
        let con = self.console_of(from)?;
        self.port += 1;
        let stream = Stream::listen(&self.sl.lab, &self.pinger_ns, self.port)?;
        let disk_blocks = self.disk_mb_of(from)?;
        // Stop flags of an earlier run go; then the stream, the disk reader.
        console(
            &con,
            &format!(
                "rm -f /tmp/mvc-stop; \
                 (i=0; while [ ! -e /tmp/mvc-stop ] && [ $i -lt 1000000 ]; do \
                 dd if=/dev/zero bs=8k count=1 2>/dev/null; usleep 10000; i=$((i+1)); done) \
                 | nc {} {} >/dev/null 2>&1 & \
                 (i=0; while [ ! -e /tmp/mvc-stop ] && [ $i -lt 1000000 ]; do \
                 dd if=/dev/vda of=/dev/null bs=1M count=1 skip=$((i % {disk_blocks})) iflag=direct 2>/dev/null; \
                 echo MVC-IO $i; i=$((i+1)); done) &",
                self.pinger_ip, self.port
            ),
            Duration::from_secs(20),
        )?;
        let t_flow = Instant::now();
        let deadline = t_flow + Duration::from_secs(30);
        while !stream.arrived_since(t_flow) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        if !stream.arrived_since(t_flow) {
            bail!("the guest's TCP stream did not start");
        }
        let watch = IoWatch::start(self.run_dirs(), self.vm.clone());
        let ip = self.ip.to_string();
        let ping = self.sl.lab.spawn(
            &self.pinger_ns,
            &format!("ping-{}", self.port),
            &["ping", "-n", "-i", "0.01", "-w", "900", &ip],
        )?;
        std::thread::sleep(Duration::from_secs(2));
        let wan0 = wan_counter(&self.sl)?;
        let mut args = move_args(&self.vm, to);
        let dl = self.downtime_ms.to_string();
        args.extend(["--downtime-ms", &dl]);
        let dr = self.disk_rate.to_string();
        if self.disk_rate > 0 && strategy == "post-copy" {
            args.extend(["--disk-rate", &dr]);
        }
        if strategy == "pre-copy" {
            args.push("--precopy-disk");
        }
        if let Some((choice, base)) = &self.proxy_choice {
            let extra = if strategy == "post-copy-base" {
                base.as_str()
            } else {
                ""
            };
            std::fs::write(choice, extra)?;
        }
        let t0 = Instant::now();
        let moved = self.sl.ctl_json(&args);
        let t1 = Instant::now();
        let wan1 = wan_counter(&self.sl)?;
        let v = match moved {
            Ok(v) => v,
            Err(e) => {
                stop_ping(&self.sl.lab, &ping);
                self.recover(to);
                return Err(e.into());
            }
        };
        self.at = to;
        std::thread::sleep(after);
        let t2 = Instant::now();
        stop_ping(&self.sl.lab, &ping);
        let survived =
            stream.arrived_since(t1 + after / 2) && !stream.closed.load(Ordering::Relaxed);
        let (gap, lost) = ping_gap(&std::fs::read_to_string(&ping.log).unwrap_or_default());
        let stall = stream.stall_ms(t0, t1);
        // The disk moves after the switch (post-copy: the first MiB read at the
        // destination) or before it (pre-copy: the last MiB read at the origin).
        let io_during = if strategy == "pre-copy" {
            watch.last(0, t1).and_then(|sw| watch.rate(Some(0), t0, sw))
        } else {
            watch
                .first(1, t0)
                .and_then(|sw| watch.rate(Some(1), sw, t1))
        };
        let io_after = watch.rate(None, t1, t2);
        drop(watch);
        let con = self.console_of(to)?;
        console(
            &con,
            "touch /tmp/mvc-stop; sleep 1",
            Duration::from_secs(30),
        )?;
        drop(stream);
        Ok(Run {
            direction: format!("{from}->{to}"),
            total_s: t1.duration_since(t0).as_secs_f64(),
            qemu_downtime_ms: v["downtime_ms"].as_u64(),
            ping_gap_ms: gap,
            pings_lost: lost,
            tcp_stall_ms: stall,
            tcp_survived: survived,
            wan_bytes: wan1.saturating_sub(wan0),
            ram_bytes: v["ram_bytes"].as_u64().unwrap_or(0),
            disk_bytes: v["disk_bytes"].as_u64().unwrap_or(0),
            disk_total: v["disk_total"].as_u64().unwrap_or(0),
            io_during_mibs: io_during,
            io_after_mibs: io_after,
        })
    }

    /// After a failed move: where the VM runs now (a move that failed after the switch
    /// is finished by the same command again), its loops stopped.
    fn recover(&mut self, to: &'static str) {
        let at_to = || {
            self.sl
                .ctl_json(&["vm", "list", "--cluster", "m"])
                .ok()
                .and_then(|l| {
                    l.as_array()?
                        .iter()
                        .find(|v| v["name"] == self.vm.as_str())
                        .map(|v| v["site"] == to)
                })
                .unwrap_or(false)
        };
        if at_to() {
            let _ = self.sl.ctl(&move_args(&self.vm, to));
            self.at = to;
        }
        if let Ok(con) = self.console_of(self.at) {
            let _ = console(
                &con,
                "touch /tmp/mvc-stop; sleep 1",
                Duration::from_secs(30),
            );
        }
    }

    /// The VM's disk size in MiB, from its image at `site`.
    fn disk_mb_of(&self, site: &str) -> anyhow::Result<u64> {
        let disks = self.sl.agents[site].state.join("disks");
        let tail = format!("-{}.img", self.vm);
        let img = std::fs::read_dir(&disks)?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.display().to_string().ends_with(&tail))
            .with_context(|| format!("no disk of {} at {site}", self.vm))?;
        Ok((std::fs::metadata(img)?.len() >> 20).max(1))
    }
}

/// `bench migrate`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    if args.delay.is_empty() || args.delay.iter().any(|&d| d > 150) {
        bail!("--delay takes one-way delays in 0..=150 ms");
    }
    if args.disk_mb.is_empty() || args.disk_mb.iter().any(|&d| !(16..=4096).contains(&d)) {
        bail!("--disk-mb takes sizes in 16..=4096 MiB");
    }
    if args.runs == 0 || args.runs > 20 || !(64..=2048).contains(&args.memory_mb) {
        bail!("--runs must be 1..=20, --memory-mb 64..=2048");
    }
    if !lab::is_root() {
        bail!("bench migrate builds network namespaces: run it as root");
    }
    let mvc = find_mvc(args.mvc.clone())?;
    let mut strategies: Vec<&'static str> = if args.post_copy_only {
        vec!["post-copy"]
    } else {
        vec!["post-copy", "pre-copy"]
    };
    if let Some(b) = &args.baseline_proxy_args {
        if b.contains(['\'', '"', '\\', '$', '`', ';', '|', '&', '\n']) {
            bail!("--baseline-proxy-args takes plain options separated by blanks");
        }
        strategies.insert(1, "post-copy-base");
    }
    let mut info = apps::RunInfo::start("migrate");
    let steps =
        (args.disk_mb.len() * args.delay.len() * strategies.len()) as u64 * u64::from(args.runs);
    let pb = apps::progress(steps, "migrate");
    let after = Duration::from_secs(args.after_secs.clamp(1, 60));
    let mut rows = Vec::new();
    for &disk in &args.disk_mb {
        pb.set_message(format!("disk {disk} MiB: building the lab"));
        let mut s = Setup::new(
            &mvc,
            disk,
            args.memory_mb,
            args.baseline_proxy_args.as_deref(),
        )
        .with_context(|| format!("lab for a {disk} MiB disk"))?;
        s.downtime_ms = args.downtime_ms;
        s.disk_rate = args.disk_rate;
        for &d in &args.delay {
            s.wan.set(&s.sl.lab, &LinkArgs::delay(f64::from(d)))?;
            let rtt = lab::ping_samples(
                &s.sl.lab,
                &s.sl.topo.sites[1].frontend,
                s.sl.topo.sites[0].public_ip,
                5,
                0.2,
            )
            .ok()
            .and_then(|p| lab::median(&p));
            let mut point: Vec<Row> = strategies
                .iter()
                .map(|st| Row {
                    disk_mb: disk,
                    delay_ms: d,
                    strategy: st,
                    rtt_ba_ms: rtt,
                    runs: Vec::new(),
                    failed: Vec::new(),
                    total_s: f64::NAN,
                    ping_gap_ms: f64::NAN,
                    tcp_stall_ms: f64::NAN,
                    wan_bytes: f64::NAN,
                    wan_ratio: f64::NAN,
                    io_during_mibs: f64::NAN,
                    io_after_mibs: f64::NAN,
                    tcp_survived: false,
                    fetched_once: false,
                })
                .collect();
            // The strategies take turns, so both see the same load.
            for i in 0..args.runs {
                for row in point.iter_mut() {
                    pb.set_message(format!(
                        "disk {disk} MiB, delay {d} ms, {}, run {}",
                        row.strategy,
                        i + 1
                    ));
                    match s.migrate(row.strategy, after) {
                        Ok(r) => {
                            apps::note(
                                &pb,
                                format!(
                                    "disk {disk} MiB, delay {d} ms, {} {}: {:.1} s, ping gap {:.0} ms, TCP stall {:.0} ms, WAN {} MiB, read {:.1} / {:.1} MiB/s",
                                    row.strategy,
                                    r.direction,
                                    r.total_s,
                                    r.ping_gap_ms,
                                    r.tcp_stall_ms,
                                    r.wan_bytes >> 20,
                                    r.io_during_mibs.unwrap_or(f64::NAN),
                                    r.io_after_mibs.unwrap_or(f64::NAN),
                                ),
                            );
                            row.runs.push(r);
                        }
                        Err(e) => {
                            apps::note(
                                &pb,
                                format!(
                                    "disk {disk} MiB, delay {d} ms, {}: failed: {e:#}",
                                    row.strategy
                                ),
                            );
                            row.failed.push(format!("{e:#}"));
                        }
                    }
                    pb.inc(1);
                }
            }
            for mut row in point {
                row.summarise(args.memory_mb);
                rows.push(row);
            }
        }
        let _ = s.sl.ctl(&["cluster", "destroy", "m"]);
        if let Some((choice, _)) = &s.proxy_choice {
            if let Some(dir) = choice.parent() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        drop(s);
    }
    pb.finish_and_clear();
    let when = info.finish();
    let md = table(&rows);
    let head = format!(
        "Live migration (`mvc vm migrate`) of a qemu VM (TCG, {} MiB) between NATed sites B and C, delay added each way on B's uplink (userspace WAN emulator), pinged every 10 ms and sending a TCP stream to a VM at site A while it reads its disk; post-copy = xnbd proxy (default){}, pre-copy = `--precopy-disk`; median of {} move(s) per point (range in brackets), {when}",
        args.memory_mb,
        if args.disk_rate > 0 {
            format!(", its background copy capped at {:.1} MiB/s", args.disk_rate as f64 / f64::from(1u32 << 20))
        } else {
            String::new()
        },
        args.runs,
    );
    let fields = Fields {
        memory_mb: args.memory_mb,
        downtime_limit_ms: args.downtime_ms,
        disk_rate: args.disk_rate,
        runs_per_point: args.runs,
        rows: &rows,
    };
    let series = |f: &dyn Fn(&Row) -> f64| -> Vec<(String, Vec<(f64, f64)>)> {
        let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for r in &rows {
            let name = format!("{}, {} MiB disk", r.strategy, r.disk_mb);
            let pt = (f64::from(r.delay_ms), f(r));
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push(pt),
                None => out.push((name, vec![pt])),
            }
        }
        out
    };
    info.save(
        &args.results,
        &head,
        &md,
        &fields,
        &[
            Panel {
                title: "Total migration time",
                x: "added one-way delay on B's uplink (ms)",
                y: "seconds",
                series: series(&|r| r.total_s),
            },
            Panel {
                title: "Downtime (longest ping gap, 10 ms pings)",
                x: "added one-way delay on B's uplink (ms)",
                y: "ms",
                series: series(&|r| r.ping_gap_ms),
            },
            Panel {
                title: "Guest disk reads during the move / after",
                x: "added one-way delay on B's uplink (ms)",
                y: "ratio",
                series: series(&|r| r.io_during_mibs / r.io_after_mibs),
            },
        ],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agents' `xnbd` adds the baseline's options to `proxy` only while the choice file
    /// holds them.
    #[test]
    fn the_xnbd_switch_adds_the_baseline_options() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let fake = |name: &str| {
            let p = d.path().join(name);
            std::fs::write(&p, format!("#!/bin/sh\necho {name} \"$@\"\n")).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
            p
        };
        let real = fake("real");
        let choice = d.path().join("sw/proxy");
        let w = xnbd_switch(&d.path().join("sw"), &real, &choice).unwrap();
        let run = |args: &[&str]| {
            let o = std::process::Command::new(&w).args(args).output().unwrap();
            String::from_utf8(o.stdout).unwrap()
        };
        assert_eq!(
            run(&["proxy", "--cache", "a b"]),
            "real proxy --cache a b\n"
        );
        std::fs::write(&choice, "--readahead-max 1M --no-background-yield").unwrap();
        assert_eq!(
            run(&["proxy", "--cache", "x"]),
            "real proxy --cache x --readahead-max 1M --no-background-yield\n"
        );
        assert_eq!(run(&["serve", "--unix", "s"]), "real serve --unix s\n");
    }

    #[test]
    fn ping_gaps_are_the_longest_run_of_lost_replies() {
        let out = "PING 198.19.1.5 (198.19.1.5) 56(84) bytes of data.\n\
                   64 bytes from 198.19.1.5: icmp_seq=1 ttl=64 time=0.3 ms\n\
                   64 bytes from 198.19.1.5: icmp_seq=2 ttl=64 time=0.3 ms\n\
                   64 bytes from 198.19.1.5: icmp_seq=7 ttl=64 time=0.3 ms\n\
                   64 bytes from 198.19.1.5: icmp_seq=9 ttl=64 time=0.3 ms\n\
                   64 bytes from 198.19.1.5: icmp_seq=9 ttl=64 time=0.3 ms (DUP!)\n";
        assert_eq!(ping_gap(out), (40.0, 5));
        assert_eq!(ping_gap(""), (0.0, 0));
    }
}
