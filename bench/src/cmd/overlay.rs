//! `bench overlay`: iperf3 TCP single-stream and ping RTT VM -> VM, in one lab and one run,
//! over the raw routed underlay, this overlay (ciphers x direct/relayed x datapaths),
//! Debian's n2n 1.3.1 and the peers of [`bench::peers`] (kernel VXLAN, nebula, tinc,
//! OpenVPN, boringtun, gotatun), with ratios to the raw underlay of the same run. `--small`
//! measures instead the small-frame rate (64/512-byte UDP) and the CPU cost per GB and per
//! packet; `--latency` the request/reply latency (`sockperf ping-pong` and ping, raw
//! paired) and the CPU each round trip costs. `--layout hosts` measures between two hosts
//! instead (`super::hosts`).
//!
//! The measured pair is VM b1 (site B, behind NAT) -> VM a1 (site A, public). The raw
//! reference routes the same two namespaces over the same links (B's NAT, the internet
//! router, A's frontend) with no overlay. "Relayed" blocks UDP between B's public address
//! and A's edge port at the internet router, so B's traffic must go through the supernode.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use bench::peers::{Peer, Running};
use bench::sockperf::{self, PingPong};
use lab::cpu;
use lab::overlay::{Edge, Mvc, MvcCluster, N2n, EDGE_PORT, N2N_MTU};
use lab::{Lab, Topology};
use serde::Serialize;

use super::hosts::{self, Hosts};
use super::{find_mvc, utc_now, write_json, Machine};
use crate::cmd::wanem;

/// Options of `bench overlay`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The mvc binary (default: next to this one).
    #[arg(long)]
    pub mvc: Option<PathBuf>,
    /// Systems to measure, comma-separated: raw, mvc, n2n, vxlan, nebula, tinc, openvpn,
    /// boringtun, gotatun (`--layout hosts`: raw, mvc, boringtun, gotatun). Missing peers
    /// are installed (apt-get, cargo install boringtun-cli / gotatun-cli).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "raw,mvc,n2n,vxlan,nebula,tinc,openvpn,boringtun"
    )]
    pub systems: Vec<String>,
    /// sites: VM b1 (site B, behind NAT) -> VM a1 (site A), edges on the sites' frontends
    /// with the TAP on the VM bridge. hosts: two hosts on one bridge, the edge's TAP as
    /// each host's interface (TAP datapath only, no delay).
    #[arg(long, default_value = "sites", value_parser = ["sites", "hosts"])]
    pub layout: String,
    /// Ciphers of the overlay to measure.
    #[arg(long, value_delimiter = ',', default_value = "aes-256-gcm,none")]
    pub ciphers: Vec<String>,
    /// Overlay datapaths to measure: tap, xdp (`--bridge br0`, the edge's own veth port).
    #[arg(long, value_delimiter = ',', default_value = "tap,xdp")]
    pub datapath: Vec<String>,
    /// Paths to measure: direct, relayed.
    #[arg(long, value_delimiter = ',', default_value = "direct,relayed")]
    pub paths: Vec<String>,
    /// How the supernode relays on the relayed path, comma-separated to measure each in
    /// turn (`--layout hosts`): user (its socket), kernel (`mvc supernode --xdp-relay eth0`,
    /// the TC hook on the host's veth; row `mvc kernel relay`). In the sites layout the
    /// relayed traffic ends at the supernode's own host, which the kernel relay leaves to
    /// the socket, so only user is accepted there.
    #[arg(long, value_delimiter = ',', default_value = "user")]
    pub relay: Vec<String>,
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
    /// Small-frame run instead of TCP/ping: UDP datagrams of `--sizes` bytes at `--pps`,
    /// delivered packets/s, loss and CPU cost.
    #[arg(long)]
    pub small: bool,
    /// Latency run instead of TCP/ping: `sockperf ping-pong` (64-byte UDP, one message in
    /// flight) for `--secs` seconds and a ping series, `--runs` times, each run paired
    /// with the same over the raw underlay, and the system's CPU per round trip and per ping.
    #[arg(long, conflicts_with = "small")]
    pub latency: bool,
    /// UDP payload sizes of the small-frame run.
    #[arg(long, value_delimiter = ',', default_value = "64,512")]
    pub sizes: Vec<u32>,
    /// Offered rate of the small-frame run, datagrams per second.
    #[arg(long, default_value_t = 100_000)]
    pub pps: u32,
    /// Forwarder threads of every edge (`mvc edge --threads N`; 1 is the edge's default
    /// and passes no flag).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub edge_threads: u32,
    /// Parallel TCP streams of each iperf3 run (`iperf3 -P N`), the raw underlay's
    /// paired runs alike.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=16))]
    pub streams: u32,
    /// Where to write the JSON result and figures.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// One measured configuration.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct Row {
    /// raw, mvc, n2n-1.3.1.
    pub system: String,
    /// Cipher (`-` for raw; n2n uses twofish).
    pub cipher: String,
    /// direct, relayed, routed.
    pub path: String,
    /// Datapath the edges reported (`-` when not applicable).
    pub datapath: String,
    /// L2 (frames on the VM bridge) or L3 (routed by the frontends; `-` for raw).
    pub layer: String,
    /// The VMs' MTU during the measurement.
    pub mtu: u32,
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
    /// CPU seconds (user + system) of the system's own processes (edges, supernode,
    /// daemons) per GB delivered, median over the runs: unlike the throughput, this barely
    /// depends on how much CPU other jobs leave, so it compares builds on a loaded machine.
    /// It holds the kernel work done in those processes' context (TAP and UDP I/O, and the
    /// host stack's TCP input that a TAP write runs), not iperf3's or softirq threads'.
    #[serde(default)]
    pub proc_cpu_s_per_gb: Option<f64>,
}

/// One latency run (`--latency`): sockperf ping-pong and ping, over the system or raw.
#[derive(Debug, Clone, Serialize)]
pub struct LatRun {
    /// sockperf's figures (one-way latency, half the round trip).
    pub pingpong: PingPong,
    /// Median ping RTT of the run's ping series, ms.
    pub ping_ms: Option<f64>,
    /// CPU seconds (user + system) of the system's processes during the ping-pong.
    pub proc_cpu_s: f64,
    /// CPU microseconds of the system's processes per ping answered during the ping
    /// series: what an idle path's wake-ups and polling cost.
    pub ping_cpu_us: Option<f64>,
}

/// A configuration's latency (`--latency`): medians over the runs, raw paired.
#[derive(Debug, Clone, Serialize)]
pub struct LatRow {
    /// As in [`Row`].
    pub system: String,
    /// As in [`Row`].
    pub cipher: String,
    /// As in [`Row`].
    pub path: String,
    /// As in [`Row`].
    pub datapath: String,
    /// The system's runs.
    pub runs: Vec<LatRun>,
    /// The raw underlay's runs, each right before the system's run of the same index.
    pub raw_runs: Vec<LatRun>,
    /// Median over the runs of sockperf's median one-way latency, us.
    pub p50_us: Option<f64>,
    /// The same for the raw runs.
    pub raw_p50_us: Option<f64>,
    /// Median over the runs of sockperf's 99th percentile, us.
    pub p99_us: Option<f64>,
    /// The same for the raw runs.
    pub raw_p99_us: Option<f64>,
    /// Median of the per-pair ratios p50 / raw p50.
    pub p50_vs_raw: Option<f64>,
    /// Smallest and largest per-pair ratio (the spread).
    pub p50_vs_raw_range: Option<(f64, f64)>,
    /// Median over the runs of the ping series' median RTT, ms.
    pub ping_ms: Option<f64>,
    /// The same for the raw runs.
    pub raw_ping_ms: Option<f64>,
    /// Median of the per-pair ratios of the ping RTTs.
    pub ping_vs_raw: Option<f64>,
    /// Median over the runs of the system's processes' CPU per round trip, us.
    pub cpu_us_per_rtt: Option<f64>,
    /// Median over the runs of the system's processes' CPU per ping (10 ms apart), us.
    pub cpu_us_per_ping: Option<f64>,
}

impl LatRow {
    fn of(d: &Desc, runs: Vec<LatRun>, raw_runs: Vec<LatRun>) -> LatRow {
        let med = |v: &[LatRun], f: &dyn Fn(&LatRun) -> Option<f64>| {
            lab::median(&v.iter().filter_map(f).collect::<Vec<_>>())
        };
        let ratios = |f: &dyn Fn(&LatRun) -> Option<f64>| -> Vec<f64> {
            runs.iter()
                .zip(&raw_runs)
                .filter_map(|(s, r)| match (f(s), f(r)) {
                    (Some(x), Some(y)) if y > 0.0 => Some(x / y),
                    _ => None,
                })
                .collect()
        };
        let p50 = |r: &LatRun| Some(r.pingpong.p50_us);
        let p50_ratios = ratios(&p50);
        let range = p50_ratios.iter().fold(None, |acc: Option<(f64, f64)>, &x| {
            Some(acc.map_or((x, x), |(lo, hi)| (lo.min(x), hi.max(x))))
        });
        LatRow {
            system: d.system.into(),
            cipher: d.cipher.into(),
            path: d.path.into(),
            datapath: d.datapath.into(),
            p50_us: med(&runs, &p50),
            raw_p50_us: med(&raw_runs, &p50),
            p99_us: med(&runs, &|r| Some(r.pingpong.p99_us)),
            raw_p99_us: med(&raw_runs, &|r| Some(r.pingpong.p99_us)),
            p50_vs_raw: lab::median(&p50_ratios),
            p50_vs_raw_range: range,
            ping_ms: med(&runs, &|r| r.ping_ms),
            raw_ping_ms: med(&raw_runs, &|r| r.ping_ms),
            ping_vs_raw: lab::median(&ratios(&|r| r.ping_ms)),
            cpu_us_per_rtt: med(&runs, &|r| {
                (r.pingpong.replies > 0).then(|| r.proc_cpu_s * 1e6 / r.pingpong.replies as f64)
            }),
            cpu_us_per_ping: med(&runs, &|r| r.ping_cpu_us),
            runs,
            raw_runs,
        }
    }
}

/// One run of the small-frame measurement.
#[derive(Debug, Clone, Serialize)]
pub struct SmallRun {
    /// What iperf3 reported.
    pub udp: lab::UdpRun,
    /// User CPU seconds of the system's processes over the run.
    pub proc_user_s: f64,
    /// System CPU seconds of the system's processes (part of `kernel_s`).
    pub proc_sys_s: f64,
    /// Kernel CPU seconds of the whole machine (system + irq + softirq).
    pub kernel_s: f64,
    /// Machine cycles over the run (`perf stat -a`), where available.
    pub cycles: Option<u64>,
    /// How many of the system's processes were sampled (0 for the raw underlay, which
    /// has none of its own).
    pub procs: usize,
}

impl SmallRun {
    fn cpu_s(&self) -> f64 {
        self.proc_user_s + self.kernel_s
    }
    fn cpu_s_per_gb(&self) -> Option<f64> {
        (self.udp.bytes > 0).then(|| self.cpu_s() / (self.udp.bytes as f64 / 1e9))
    }
    fn delivered(&self) -> u64 {
        self.udp.sent.saturating_sub(self.udp.lost)
    }
    fn cpu_us_per_pkt(&self) -> Option<f64> {
        let n = self.delivered();
        (n > 0).then(|| self.cpu_s() * 1e6 / n as f64)
    }
    /// The system's own processes (edges, supernode, daemons: user + system time) per
    /// delivered datagram: what the machine-wide figure holds of the system itself,
    /// without other jobs' kernel time.
    fn proc_us_per_pkt(&self) -> Option<f64> {
        let n = self.delivered();
        (self.procs > 0 && n > 0).then(|| (self.proc_user_s + self.proc_sys_s) * 1e6 / n as f64)
    }
    fn cycles_per_pkt(&self) -> Option<f64> {
        let n = self.delivered();
        self.cycles.filter(|_| n > 0).map(|c| c as f64 / n as f64)
    }
}

/// Medians of one side (system or raw) of a small-frame row.
#[derive(Debug, Clone, Serialize)]
pub struct SmallStats {
    /// Every run.
    pub runs: Vec<SmallRun>,
    /// Median delivered datagrams/s.
    pub pps: f64,
    /// Median loss fraction.
    pub loss: f64,
    /// Median CPU seconds per GB of payload delivered.
    pub cpu_s_per_gb: Option<f64>,
    /// Median CPU microseconds per delivered datagram.
    pub cpu_us_per_pkt: Option<f64>,
    /// Median CPU microseconds of the system's own processes per delivered datagram.
    pub proc_us_per_pkt: Option<f64>,
    /// Median machine cycles per delivered datagram.
    pub cycles_per_pkt: Option<f64>,
}

impl SmallStats {
    fn of(runs: Vec<SmallRun>) -> SmallStats {
        let med = |f: &dyn Fn(&SmallRun) -> Option<f64>| {
            lab::median(&runs.iter().filter_map(f).collect::<Vec<_>>())
        };
        SmallStats {
            pps: med(&|r| Some(r.udp.pps())).unwrap_or(0.0),
            loss: med(&|r| Some(r.udp.loss())).unwrap_or(1.0),
            cpu_s_per_gb: med(&SmallRun::cpu_s_per_gb),
            cpu_us_per_pkt: med(&SmallRun::cpu_us_per_pkt),
            proc_us_per_pkt: med(&SmallRun::proc_us_per_pkt),
            cycles_per_pkt: med(&SmallRun::cycles_per_pkt),
            runs,
        }
    }
}

/// One small-frame configuration: a system at one datagram size, with its paired raw runs.
#[derive(Debug, Clone, Serialize)]
pub struct SmallRow {
    /// As in [`Row`].
    pub system: String,
    /// As in [`Row`].
    pub cipher: String,
    /// As in [`Row`].
    pub path: String,
    /// As in [`Row`].
    pub datapath: String,
    /// As in [`Row`].
    pub layer: String,
    /// UDP payload bytes per datagram.
    pub size: u32,
    /// Offered datagrams per second.
    pub offered_pps: u32,
    /// The system.
    pub sys: SmallStats,
    /// The raw underlay, measured alternately with it.
    pub raw: SmallStats,
}

/// What a configuration is, for the tables.
struct Desc<'a> {
    system: &'a str,
    cipher: &'a str,
    path: &'a str,
    datapath: &'a str,
    layer: &'a str,
    mtu: u32,
}

#[derive(Default)]
pub(super) struct Results {
    rows: Vec<Row>,
    small: Vec<SmallRow>,
    latency: Vec<LatRow>,
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
    perf_cycles: bool,
    layout: &'a str,
    edge_threads: u32,
    streams: u32,
    rows: &'a [Row],
    small: &'a [SmallRow],
    latency: &'a [LatRow],
}

/// Where a layout's measurements run: the client and server namespaces and the server's
/// address on the raw underlay (the paired reference).
pub(super) struct Ctx<'a> {
    pub(super) lab: &'a Lab,
    pub(super) args: &'a Args,
    pub(super) delay: u32,
    pub(super) perf: bool,
    pub(super) client: String,
    pub(super) server: String,
    pub(super) raw_dst: Ipv4Addr,
}

impl Ctx<'_> {
    fn client(&self) -> &str {
        &self.client
    }

    fn server(&self) -> &str {
        &self.server
    }

    /// The raw underlay's row: the server at [`Ctx::raw_dst`] without an overlay.
    pub(super) fn raw_row(&self, out: &mut Results) -> anyhow::Result<()> {
        let d = Desc {
            system: "raw",
            cipher: "-",
            path: "routed",
            datapath: "-",
            layer: "-",
            mtu: 1500,
        };
        self.measure(&d, self.raw_dst, &[], out)
    }

    /// mvc's row (labelled `system`) once its cluster is up: the client reaches `dst`
    /// through `edge` (the client's), whose path to edge `to` must be `path` before and
    /// after; the datapath is the one the edge reports. `pids`: the cluster's processes.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn mvc_row(
        &self,
        system: &str,
        mvc: &Mvc,
        edge: &Edge,
        to: &str,
        cipher: &str,
        path: &str,
        dst: Ipv4Addr,
        pids: &[u32],
        out: &mut Results,
    ) -> anyhow::Result<()> {
        let lab = self.lab;
        lab::wait_ping(lab, self.client(), dst, Duration::from_secs(30))?;
        lab.wait_until(
            &format!("edge {} -> {to} path {path}", edge.name),
            Duration::from_secs(30),
            || mvc.path_to(lab, edge, to).as_deref() == Some(path),
        )?;
        let st = mvc.edge_status(lab, edge)?;
        let actual = st["datapath"].as_str().unwrap_or("?").to_string();
        let d = Desc {
            system,
            cipher,
            path,
            datapath: &actual,
            layer: "L2",
            mtu: 1500,
        };
        self.measure(&d, dst, pids, out)?;
        if mvc.path_to(lab, edge, to).as_deref() != Some(path) {
            bail!(
                "path {} -> {to} changed during the {path} measurement",
                edge.name
            );
        }
        Ok(())
    }

    /// A peer system's row (`label`, the VMs' MTU `mtu`): the client reaches `dst`
    /// through `running`, whose logs are printed when the measurement fails.
    pub(super) fn peer_row(
        &self,
        running: &Running,
        label: &str,
        mtu: u32,
        dst: Ipv4Addr,
        out: &mut Results,
    ) -> anyhow::Result<()> {
        let d = Desc {
            system: label,
            cipher: running.peer.cipher(),
            path: "direct",
            datapath: "-",
            layer: running.peer.layer(),
            mtu,
        };
        let res = self.measure(&d, dst, &running.pids(), out);
        if res.is_err() {
            for p in running.procs() {
                eprintln!("---- {} log:\n{}", p.name, self.lab.log(p));
            }
        }
        res
    }

    /// Measures one configuration (TCP/ping, or small frames with `--small`) into `out`;
    /// `pids` are the system's processes, for the CPU cost.
    fn measure(
        &self,
        d: &Desc,
        dst: Ipv4Addr,
        pids: &[u32],
        out: &mut Results,
    ) -> anyhow::Result<()> {
        if self.args.small {
            out.small.extend(self.measure_small(d, dst, pids)?);
        } else if self.args.latency {
            out.latency.push(self.measure_latency(d, dst, pids)?);
        } else {
            out.rows.push(self.measure_tcp(d, dst, pids)?);
        }
        Ok(())
    }

    fn small_run(&self, dst: Ipv4Addr, size: u32, pids: &[u32]) -> anyhow::Result<SmallRun> {
        let a = self.args;
        let bps = u64::from(a.pps) * u64::from(size) * 8;
        let perf = if self.perf {
            cpu::PerfCycles::start(a.secs)
        } else {
            None
        };
        let before = cpu::sample(pids);
        let udp = lab::iperf_udp(
            self.lab,
            self.client(),
            self.server(),
            dst,
            a.secs,
            size,
            bps,
        )?;
        let after = cpu::sample(pids);
        let (proc_user_s, kernel_s, proc_sys_s) = cpu::seconds(&before, &after);
        Ok(SmallRun {
            udp,
            proc_user_s,
            proc_sys_s,
            kernel_s,
            cycles: perf.and_then(cpu::PerfCycles::finish),
            procs: pids.len(),
        })
    }

    fn measure_small(
        &self,
        d: &Desc,
        dst: Ipv4Addr,
        pids: &[u32],
    ) -> anyhow::Result<Vec<SmallRow>> {
        let (lab, a) = (self.lab, self.args);
        lab::wait_ping(lab, self.client(), dst, Duration::from_secs(30))
            .with_context(|| format!("{} {}: no connectivity", d.system, d.path))?;
        let _ = lab::ping(lab, self.client(), dst, 5, 0.1);
        let raw_dst = self.raw_dst;
        let paired = dst != raw_dst;
        let mut rows = Vec::new();
        for &size in &a.sizes {
            let (mut sys, mut raw) = (Vec::new(), Vec::new());
            for i in 0..a.runs {
                if paired {
                    raw.push(
                        self.small_run(raw_dst, size, &[])
                            .with_context(|| format!("raw reference run {}", i + 1))?,
                    );
                }
                sys.push(
                    self.small_run(dst, size, pids)
                        .with_context(|| format!("{} {size} B: run {}", d.system, i + 1))?,
                );
            }
            if !paired {
                raw.clone_from(&sys);
            }
            let row = SmallRow {
                system: d.system.into(),
                cipher: d.cipher.into(),
                path: d.path.into(),
                datapath: d.datapath.into(),
                layer: d.layer.into(),
                size,
                offered_pps: a.pps,
                sys: SmallStats::of(sys),
                raw: SmallStats::of(raw),
            };
            eprintln!(
                "  {:<16} {:<5} {:>4} B {:>9.0} pkt/s loss {:>5.1}%  cpu {} s/GB, process {} us/pkt",
                row.system,
                row.datapath,
                size,
                row.sys.pps,
                row.sys.loss * 100.0,
                row.sys
                    .cpu_s_per_gb
                    .map_or("-".into(), |x| format!("{x:.1}")),
                row.sys
                    .proc_us_per_pkt
                    .map_or("-".into(), |x| format!("{x:.2}"))
            );
            rows.push(row);
        }
        Ok(rows)
    }

    /// One latency run to `dst`: sockperf ping-pong for `--secs` seconds, then `--pings`
    /// pings 10 ms apart.
    fn latency_run(&self, dst: Ipv4Addr, pids: &[u32]) -> anyhow::Result<LatRun> {
        let a = self.args;
        let before = cpu::sample(pids);
        let pingpong = sockperf::ping_pong(self.lab, self.client(), self.server(), dst, a.secs)?;
        let after = cpu::sample(pids);
        let (user, _, sys) = cpu::seconds(&before, &after);
        let pings = lab::ping_samples(self.lab, self.client(), dst, a.pings, 0.01)?;
        let after_pings = cpu::sample(pids);
        let (ping_user, _, ping_sys) = cpu::seconds(&after, &after_pings);
        Ok(LatRun {
            pingpong,
            ping_ms: lab::median(&pings),
            proc_cpu_s: user + sys,
            ping_cpu_us: (!pids.is_empty() && !pings.is_empty())
                .then(|| (ping_user + ping_sys) * 1e6 / pings.len() as f64),
        })
    }

    fn measure_latency(&self, d: &Desc, dst: Ipv4Addr, pids: &[u32]) -> anyhow::Result<LatRow> {
        let (lab, a) = (self.lab, self.args);
        lab::wait_ping(lab, self.client(), dst, Duration::from_secs(30))
            .with_context(|| format!("{} {}: no connectivity", d.system, d.path))?;
        let _ = lab::ping(lab, self.client(), dst, 5, 0.1);
        let raw_dst = self.raw_dst;
        let paired = dst != raw_dst;
        let (mut sys, mut raw) = (Vec::new(), Vec::new());
        for i in 0..a.runs {
            if paired {
                raw.push(
                    self.latency_run(raw_dst, &[])
                        .with_context(|| format!("raw reference latency run {}", i + 1))?,
                );
            }
            sys.push(
                self.latency_run(dst, pids)
                    .with_context(|| format!("{} {}: latency run {}", d.system, d.path, i + 1))?,
            );
        }
        if !paired {
            raw.clone_from(&sys);
        }
        let row = LatRow::of(d, sys, raw);
        let us = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
        eprintln!(
            "  {:<10} {:<12} {:<8} p50 {} us (raw {}), x raw {}",
            row.system,
            row.cipher,
            row.path,
            us(row.p50_us),
            us(row.raw_p50_us),
            row.p50_vs_raw.map_or("-".into(), |x| format!("{x:.2}"))
        );
        Ok(row)
    }

    fn measure_tcp(&self, d: &Desc, dst: Ipv4Addr, pids: &[u32]) -> anyhow::Result<Row> {
        let (system, cipher, path) = (d.system, d.cipher, d.path);
        let (lab, a) = (self.lab, self.args);
        lab::wait_ping(lab, self.client(), dst, Duration::from_secs(30))
            .with_context(|| format!("{system} {cipher} {path}: no connectivity"))?;
        // Warm up (ARP, sessions, path selection) before measuring.
        let _ = lab::ping(lab, self.client(), dst, 5, 0.1);
        // The raw underlay between the same VMs is measured alternately with each system
        // (the machine's load drifts; a reference taken minutes earlier would not do).
        let raw_dst = self.raw_dst;
        let paired = dst != raw_dst;
        let rtt_samples = lab::ping_samples(lab, self.client(), dst, a.pings, 0.1)?;
        let raw_rtt = if paired {
            lab::ping_samples(lab, self.client(), raw_dst, a.pings, 0.1)?
        } else {
            rtt_samples.clone()
        };
        let mut gbps_runs = Vec::new();
        let mut raw_gbps_runs = Vec::new();
        let mut cpu_runs = Vec::new();
        for i in 0..a.runs {
            if paired {
                let bps = lab::iperf_streams(
                    lab,
                    self.client(),
                    self.server(),
                    raw_dst,
                    a.secs,
                    a.streams,
                )
                .with_context(|| format!("raw reference run {}", i + 1))?;
                raw_gbps_runs.push(bps / 1e9);
            }
            let before = cpu::sample(pids);
            let bps = lab::iperf_streams(lab, self.client(), self.server(), dst, a.secs, a.streams)
                .with_context(|| format!("{system} {cipher} {path}: iperf3 run {}", i + 1))?;
            let after = cpu::sample(pids);
            gbps_runs.push(bps / 1e9);
            let (user, _, sys) = cpu::seconds(&before, &after);
            let gb = bps * f64::from(a.secs) / 8e9;
            if !pids.is_empty() && gb > 0.0 {
                cpu_runs.push((user + sys) / gb);
            }
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
            datapath: d.datapath.into(),
            layer: d.layer.into(),
            mtu: d.mtu,
            delay_ms: self.delay,
            gbps,
            gbps_runs,
            rtt_ms,
            rtt_samples,
            raw_gbps,
            raw_gbps_runs,
            raw_rtt_ms,
            tput_vs_raw: (raw_gbps > 0.0).then(|| gbps / raw_gbps),
            proc_cpu_s_per_gb: lab::median(&cpu_runs),
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
    perf: bool,
    out: &mut Results,
) -> anyhow::Result<()> {
    let (a, b) = (topo.site("a"), topo.site("b"));
    let va = &a.vms[0];
    let ctx = Ctx {
        lab,
        args,
        delay,
        perf,
        client: b.vms[0].ns.clone(),
        server: va.ns.clone(),
        raw_dst: va.underlay_ip,
    };
    let has = |s: &str| args.systems.iter().any(|x| x == s);
    if has("raw") {
        ctx.raw_row(out)?;
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
                        if dp == "xdp" {
                            // The XDP datapath makes its own veth port on the bridge.
                            o.tap = Some("xp0".into());
                            o.bridge = Some(a.bridge.clone());
                        }
                        o.threads = args.edge_threads;
                    });
                    let c = match c {
                        Ok(c) => c,
                        Err(e) => {
                            if let Some(r) = rules {
                                topo.unblock(lab, &r)?;
                            }
                            return Err(e.into());
                        }
                    };
                    let res = ctx.mvc_row(
                        "mvc",
                        mvc,
                        c.edge("b"),
                        "a",
                        cipher,
                        path,
                        va.ip,
                        &c.pids(),
                        out,
                    );
                    c.stop(lab);
                    if let Some(r) = rules {
                        topo.unblock(lab, &r)?;
                    }
                    res?;
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
            let d = Desc {
                system: "n2n-1.3.1",
                cipher: "twofish",
                path,
                datapath: "-",
                layer: "L2",
                mtu: N2N_MTU,
            };
            let res = ctx.measure(&d, va.ip, &n.pids(), out);
            n.stop(lab, topo)?;
            if let Some(r) = rules {
                topo.unblock(lab, &r)?;
            }
            res?;
        }
    }
    for peer in Peer::ALL.into_iter().filter(|p| has(p.name())) {
        // B reaches A straight in every peer's set-up (A is public and the hub).
        let label = peer.label();
        let running = peer
            .start(lab, topo)
            .with_context(|| format!("starting {label}"))?;
        let res = ctx.peer_row(&running, &label, peer.vm_mtu(), va.ip, out);
        running.stop(lab, topo)?;
        res?;
    }
    Ok(())
}

/// The markdown table of a run.
pub fn table(rows: &[Row], runs: u32, with_delay: bool) -> String {
    let mut s = String::new();
    let dcol = if with_delay { " delay ms |" } else { "" };
    let dsep = if with_delay { "---:|" } else { "" };
    s.push_str(&format!(
        "|{dcol} system | cipher | path | datapath | layer | VM MTU | TCP Gb/s (median of {runs}) | raw Gb/s (paired) | of raw | ping RTT ms (median) | raw RTT ms | x raw | process CPU s/GB |\n"
    ));
    s.push_str(&format!(
        "|{dsep}---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    ));
    for r in rows {
        let d = if with_delay {
            format!(" {} |", r.delay_ms)
        } else {
            String::new()
        };
        let ms = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
        s.push_str(&format!(
            "|{d} {} | {} | {} | {} | {} | {} | {:.3} | {:.3} | {} | {} | {} | {} | {} |\n",
            r.system,
            r.cipher,
            r.path,
            r.datapath,
            r.layer,
            r.mtu,
            r.gbps,
            r.raw_gbps,
            r.tput_vs_raw
                .map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
            ms(r.rtt_ms),
            ms(r.raw_rtt_ms),
            r.rtt_vs_raw.map_or("-".into(), |x| format!("{x:.2}")),
            r.proc_cpu_s_per_gb
                .map_or("-".into(), |x| format!("{x:.2}")),
        ));
    }
    s
}

/// The markdown table of a latency run.
pub fn latency_table(rows: &[LatRow], runs: u32) -> String {
    let mut s = format!(
        "| system | cipher | path | datapath | sockperf p50 us (median of {runs}) | raw p50 us (paired) | x raw (median, range) | p99 us | raw p99 us | ping RTT ms | raw RTT ms | x raw | process CPU us per round trip | process CPU us per ping |\n\
         |---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let f1 = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
    let f2 = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
    let f3 = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.3}"));
    for r in rows {
        let range = r
            .p50_vs_raw_range
            .map_or(String::new(), |(lo, hi)| format!(" ({lo:.2}-{hi:.2})"));
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {}{} | {} | {} | {} | {} | {} | {} | {} |\n",
            r.system,
            r.cipher,
            r.path,
            r.datapath,
            f1(r.p50_us),
            f1(r.raw_p50_us),
            f2(r.p50_vs_raw),
            range,
            f1(r.p99_us),
            f1(r.raw_p99_us),
            f3(r.ping_ms),
            f3(r.raw_ping_ms),
            f2(r.ping_vs_raw),
            f1(r.cpu_us_per_rtt),
            f1(r.cpu_us_per_ping),
        ));
    }
    s
}

/// The markdown table of a small-frame run.
pub fn small_table(rows: &[SmallRow], runs: u32) -> String {
    let mut s = format!(
        "| system | cipher | path | datapath | layer | bytes | offered pkt/s | delivered pkt/s (median of {runs}) | loss | raw pkt/s (paired) | raw loss | of raw | CPU s/GB | raw CPU s/GB | CPU us/pkt | raw CPU us/pkt | process CPU us/pkt | cycles/pkt |\n\
         |---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    );
    let f1 = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.1}"));
    let f2 = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.2}"));
    let f0 = |x: Option<f64>| x.map_or("-".into(), |x| format!("{x:.0}"));
    for r in rows {
        s.push_str(&format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.0} | {:.1}% | {:.0} | {:.1}% | {} | {} | {} | {} | {} | {} | {} |\n",
            r.system,
            r.cipher,
            r.path,
            r.datapath,
            r.layer,
            r.size,
            r.offered_pps,
            r.sys.pps,
            r.sys.loss * 100.0,
            r.raw.pps,
            r.raw.loss * 100.0,
            if r.raw.pps > 0.0 {
                format!("{:.1}%", r.sys.pps / r.raw.pps * 100.0)
            } else {
                "-".into()
            },
            f1(r.sys.cpu_s_per_gb),
            f1(r.raw.cpu_s_per_gb),
            f2(r.sys.cpu_us_per_pkt),
            f2(r.raw.cpu_us_per_pkt),
            f2(r.sys.proc_us_per_pkt),
            f0(r.sys.cycles_per_pkt),
        ));
    }
    s
}

/// Options of `bench plot`.
#[derive(Debug, clap::Args)]
pub struct PlotArgs {
    /// The SVG to write.
    #[arg(long)]
    pub out: PathBuf,
    /// `bench overlay --delay` results: `FILE.json`, or `FILE.json:SYS,SYS` to keep only the
    /// systems whose names start with one of SYS. Raw rows of the second and later files
    /// are labelled with their run, as their own lines.
    #[arg(required = true)]
    pub inputs: Vec<String>,
}

/// `bench plot`: one throughput/RTT-against-delay figure from several delay sweeps.
pub fn plot(args: &PlotArgs) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for (i, input) in args.inputs.iter().enumerate() {
        let (file, keep) = match input.rsplit_once(':') {
            Some((f, k)) if f.ends_with(".json") => (f, Some(k)),
            _ => (input.as_str(), None),
        };
        let text = std::fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).with_context(|| format!("parsing {file}"))?;
        let file_rows: Vec<Row> = serde_json::from_value(v["rows"].clone())
            .with_context(|| format!("{file}: no overlay rows"))?;
        for mut r in file_rows {
            let kept = keep.is_none_or(|k| k.split(',').any(|s| r.system.starts_with(s)));
            if !kept {
                continue;
            }
            if r.system == "raw" && i > 0 {
                r.system = format!("raw underlay (run {})", i + 1);
            }
            rows.push(r);
        }
    }
    if rows.is_empty() {
        bail!("no rows to plot");
    }
    crate::plot::overlay_vs_delay(&rows, &args.out)?;
    eprintln!("figure: {}", args.out.display());
    Ok(())
}

/// `bench overlay`.
pub fn run(args: &Args) -> anyhow::Result<()> {
    for s in &args.systems {
        if !["raw", "mvc", "n2n"].contains(&s.as_str()) && Peer::parse(s).is_none() {
            bail!("unknown system {s:?} (raw, mvc, n2n, vxlan, nebula, tinc, openvpn, boringtun, gotatun)");
        }
    }
    let hosts = args.layout == "hosts";
    if hosts {
        if let Some(s) = args
            .systems
            .iter()
            .find(|s| !hosts::SYSTEMS.contains(&s.as_str()))
        {
            bail!(
                "--layout hosts runs {}, not {s:?}",
                hosts::SYSTEMS.join(", ")
            );
        }
        if !args.delay.is_empty() {
            bail!("--layout hosts has no WAN emulator: no --delay");
        }
        if args.edge_threads > 1 {
            bail!("--layout hosts makes single-queue TAP devices: no --edge-threads");
        }
        if args.datapath.iter().all(|d| d == "xdp") && args.systems.iter().any(|s| s == "mvc") {
            bail!("--layout hosts has no VM bridge for the xdp datapath: use --datapath tap");
        }
    }
    for d in &args.datapath {
        if !["tap", "xdp", "auto"].contains(&d.as_str()) {
            bail!("unknown datapath {d:?} (tap, xdp, auto)");
        }
    }
    if args.small
        && (args.sizes.is_empty()
            || args.sizes.iter().any(|&s| !(16..=1400).contains(&s))
            || !(1..=2_000_000).contains(&args.pps))
    {
        bail!("--sizes must be 16..=1400 bytes and --pps 1..=2000000");
    }
    for p in &args.paths {
        if !["direct", "relayed"].contains(&p.as_str()) {
            bail!("unknown path {p:?} (direct, relayed)");
        }
    }
    for r in &args.relay {
        if !["user", "kernel"].contains(&r.as_str()) {
            bail!("unknown relay {r:?} (user, kernel)");
        }
        if r == "kernel" && args.layout != "hosts" {
            bail!("--relay kernel needs --layout hosts (in the sites layout the relayed traffic ends on the supernode's host)");
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
    for p in Peer::ALL
        .into_iter()
        .filter(|p| args.systems.iter().any(|s| s == p.name()))
    {
        p.ensure_installed()
            .with_context(|| format!("installing {}", p.name()))?;
    }
    if args.latency {
        sockperf::ensure_installed()?;
    }
    let perf = args.small && cpu::perf_cycles_available();
    if args.small && !perf {
        eprintln!("note: `perf stat -e cycles` counts nothing here (no PMU): no cycles/packet");
    }
    let (date, stamp) = utc_now();
    let machine = Machine::probe();
    eprintln!("bench overlay: {date}, {}", machine.line());
    let lab = Lab::new("bo")?;
    if hosts {
        let h = Hosts::build(&lab)?;
        let mut res = Results::default();
        let r = hosts::run_all(&lab, &h, args, mvc.as_ref(), perf, &mut res);
        lab.teardown();
        r?;
        let pair = "host b -> host a (two hosts on one bridge, edge TAP as the host's interface)";
        return report(
            args,
            res,
            &date,
            &stamp,
            machine,
            mvc.as_ref(),
            perf,
            pair,
            false,
        );
    }
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
    let mut res = Results::default();
    for d in delays {
        if let Some(w) = wan.as_mut() {
            w.set(&lab, &wanem::LinkArgs::delay(f64::from(d)))?;
            eprintln!("delay {d} ms each way on site B's uplink");
        }
        run_all(&lab, &topo, args, mvc.as_ref(), d, perf, &mut res)?;
    }
    lab.teardown();
    let pair = "VM b1 (site B, behind NAT) -> VM a1 (site A)";
    report(
        args,
        res,
        &date,
        &stamp,
        machine,
        mvc.as_ref(),
        perf,
        pair,
        use_wan,
    )
}

/// Prints the table of a run and writes its JSON, markdown and (with delays) figure.
#[allow(clippy::too_many_arguments)]
fn report(
    args: &Args,
    res: Results,
    date: &str,
    stamp: &str,
    machine: Machine,
    mvc: Option<&Mvc>,
    perf: bool,
    pair: &'static str,
    use_wan: bool,
) -> anyhow::Result<()> {
    let Results {
        rows,
        small,
        latency,
    } = res;
    let md = if args.small {
        small_table(&small, args.runs)
    } else if args.latency {
        latency_table(&latency, args.runs)
    } else {
        table(&rows, args.runs, use_wan)
    };
    println!("\n{pair}, {date}, {}\n", machine.line());
    println!("{md}");
    let report = Report {
        bench: "overlay",
        date: date.to_string(),
        machine,
        pair,
        runs: args.runs,
        secs: args.secs,
        pings: args.pings,
        mvc: mvc.map(|m| m.bin.display().to_string()),
        layout: &args.layout,
        edge_threads: args.edge_threads,
        streams: args.streams,
        perf_cycles: perf,
        rows: &rows,
        small: &small,
        latency: &latency,
    };
    // `bench report` keeps the latest run of each kind: the layouts are kinds of their own.
    let layout = if args.layout == "hosts" { "-hosts" } else { "" };
    let small_kind = if args.small {
        "-small"
    } else if args.latency {
        "-latency"
    } else {
        ""
    };
    let kind = format!("overlay{layout}{small_kind}");
    let p = write_json(&args.results, &format!("{kind}-{stamp}.json"), &report)?;
    std::fs::write(args.results.join(format!("{kind}-{stamp}.md")), &md)?;
    if use_wan && !args.small && !args.latency {
        let svg = args.results.join(format!("overlay-{stamp}.svg"));
        crate::plot::overlay_vs_delay(&rows, &svg)?;
        eprintln!("figure: {}", svg.display());
    }
    eprintln!("results: {}", p.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(delivered: u64, proc_s: f64, kernel_s: f64, procs: usize) -> SmallRun {
        SmallRun {
            udp: lab::UdpRun {
                sent: delivered + 10,
                lost: 10,
                bytes: delivered * 64,
                secs: 1.0,
            },
            proc_user_s: proc_s / 2.0,
            proc_sys_s: proc_s / 2.0,
            kernel_s,
            cycles: None,
            procs,
        }
    }

    fn row(system: &str, sys: Vec<SmallRun>, raw: Vec<SmallRun>) -> SmallRow {
        SmallRow {
            system: system.into(),
            cipher: "-".into(),
            path: "direct".into(),
            datapath: "tap".into(),
            layer: "L2".into(),
            size: 64,
            offered_pps: 100_000,
            sys: SmallStats::of(sys),
            raw: SmallStats::of(raw),
        }
    }

    /// The table's cells of `line`, trimmed, without the outer bars.
    fn cells(line: &str) -> Vec<&str> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        inner.split('|').map(str::trim).collect()
    }

    #[test]
    fn small_table_gives_the_systems_own_cpu_per_datagram() {
        // 0.5 s of the edges' CPU over 100,000 datagrams: 5 us each (medians of three);
        // the raw underlay has no processes of its own.
        let sys = vec![
            run(100_000, 0.5, 1.0, 3),
            run(100_000, 0.4, 1.0, 3),
            run(100_000, 0.9, 1.0, 3),
        ];
        let raw = vec![run(100_000, 0.0, 0.8, 0); 3];
        let rows = [row("mvc", sys, raw.clone()), row("raw", raw.clone(), raw)];
        let t = small_table(&rows, 3);
        let lines: Vec<&str> = t.lines().collect();
        let head = cells(lines[0]);
        let col = head
            .iter()
            .position(|h| *h == "process CPU us/pkt")
            .expect("column");
        assert_eq!(head.len(), cells(lines[1]).len(), "separator");
        let mvc = cells(lines[2]);
        assert_eq!(mvc.len(), head.len(), "{t}");
        assert_eq!(mvc[col], "5.00", "{t}");
        assert_eq!(cells(lines[3])[col], "-", "{t}");
    }
}
