//! `bench wanem`: run the userspace WAN emulator on a link (`link`), or check it against
//! its settings in a small lab (`check`): RTT within 1 ms + 5% of the setting, rate within
//! 5%. Also the helpers `bench overlay --delay` uses to put it on site B's uplink.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bench::wanem::{self, Dir, Stats};
use lab::{Lab, Proc, Topology};
use serde::Serialize;

use super::{utc_now, write_json, Machine};

/// `bench wanem ...`.
#[derive(Debug, clap::Subcommand)]
pub enum Cmd {
    /// Forward frames between two interfaces of this namespace with added conditions.
    Link(LinkArgs),
    /// Check the emulator against its settings in a small lab.
    Check(CheckArgs),
}

/// Conditions of one link.
#[derive(Debug, Clone, clap::Args)]
pub struct LinkArgs {
    /// First interface.
    #[arg(long)]
    pub a: String,
    /// Second interface.
    #[arg(long)]
    pub b: String,
    /// One-way delay in ms, both directions (0..=150).
    #[arg(long, default_value_t = 0.0)]
    pub delay_ms: f64,
    /// One-way delay b->a in ms, when it differs.
    #[arg(long)]
    pub delay_ba_ms: Option<f64>,
    /// Jitter in ms (+- around the delay).
    #[arg(long, default_value_t = 0.0)]
    pub jitter_ms: f64,
    /// Loss in percent, both directions.
    #[arg(long, default_value_t = 0.0)]
    pub loss_pct: f64,
    /// Rate limit in Mbit/s (IP bytes), both directions; 0 is unlimited.
    #[arg(long, default_value_t = 0.0)]
    pub rate_mbit: f64,
    /// Rate limit b->a in Mbit/s, when it differs.
    #[arg(long)]
    pub rate_ba_mbit: Option<f64>,
}

fn dir(delay_ms: f64, jitter_ms: f64, loss_pct: f64, rate_mbit: f64) -> anyhow::Result<Dir> {
    if !(0.0..=150.0).contains(&delay_ms) || !(0.0..=150.0).contains(&jitter_ms) {
        bail!("delay and jitter must be within 0..=150 ms");
    }
    if !(0.0..=100.0).contains(&loss_pct) || !(0.0..=100_000.0).contains(&rate_mbit) {
        bail!("loss must be 0..=100 %, rate 0..=100000 Mbit/s");
    }
    Ok(Dir {
        delay: Duration::from_secs_f64(delay_ms / 1000.0),
        jitter: Duration::from_secs_f64(jitter_ms / 1000.0),
        loss: loss_pct / 100.0,
        rate_bps: (rate_mbit > 0.0).then_some((rate_mbit * 1e6) as u64),
        ..Dir::default()
    })
}

impl LinkArgs {
    fn dirs(&self) -> anyhow::Result<(Dir, Dir)> {
        let ab = dir(self.delay_ms, self.jitter_ms, self.loss_pct, self.rate_mbit)?;
        let ba = dir(
            self.delay_ba_ms.unwrap_or(self.delay_ms),
            self.jitter_ms,
            self.loss_pct,
            self.rate_ba_mbit.unwrap_or(self.rate_mbit),
        )?;
        Ok((ab, ba))
    }

    fn argv(&self) -> Vec<String> {
        let mut v = vec![
            "wanem".into(),
            "link".into(),
            "--a".into(),
            self.a.clone(),
            "--b".into(),
            self.b.clone(),
            "--delay-ms".into(),
            self.delay_ms.to_string(),
            "--jitter-ms".into(),
            self.jitter_ms.to_string(),
            "--loss-pct".into(),
            self.loss_pct.to_string(),
            "--rate-mbit".into(),
            self.rate_mbit.to_string(),
        ];
        if let Some(d) = self.delay_ba_ms {
            v.extend(["--delay-ba-ms".into(), d.to_string()]);
        }
        if let Some(r) = self.rate_ba_mbit {
            v.extend(["--rate-ba-mbit".into(), r.to_string()]);
        }
        v
    }

    /// Plain link between `w0` and `w1` with `delay_ms` each way.
    pub fn delay(delay_ms: f64) -> LinkArgs {
        LinkArgs {
            a: "w0".into(),
            b: "w1".into(),
            delay_ms,
            delay_ba_ms: None,
            jitter_ms: 0.0,
            loss_pct: 0.0,
            rate_mbit: 0.0,
            rate_ba_mbit: None,
        }
    }
}

/// A running emulator process in a lab namespace.
pub struct Wan {
    ns: String,
    proc: Option<Proc>,
}

impl Wan {
    /// The emulator of namespace `ns` (not started yet).
    pub fn new(ns: &str) -> Wan {
        Wan {
            ns: ns.into(),
            proc: None,
        }
    }

    /// (Re)starts the emulator with `link`.
    pub fn set(&mut self, lab: &Lab, link: &LinkArgs) -> anyhow::Result<()> {
        link.dirs()?;
        if let Some(p) = self.proc.take() {
            lab.stop(&p);
        }
        let exe = std::env::current_exe().context("locating the bench binary")?;
        let mut argv = vec![exe.to_string_lossy().into_owned()];
        argv.extend(link.argv());
        let args: Vec<&str> = argv.iter().map(String::as_str).collect();
        let p = lab.spawn(&self.ns, "wanem", &args)?;
        std::thread::sleep(Duration::from_millis(300));
        if !lab.running(&p) {
            bail!("wanem exited: {}", lab.log(&p));
        }
        self.proc = Some(p);
        Ok(())
    }
}

/// Three sites whose site B's uplink runs through a WAN emulator (not started).
pub fn three_sites_with_wan(lab: &Lab, vms: u8) -> anyhow::Result<(Topology, Wan)> {
    let mut t = Topology::new(lab)?;
    t.add_site(lab, "a", false, vms)?;
    let b = t.add_site_wan(lab, "b", true, vms, true)?;
    let wan = Wan::new(b.wan.as_deref().context("site b has no WAN namespace")?);
    t.add_site(lab, "c", true, vms)?;
    Ok((t, wan))
}

/// Options of `bench wanem check`.
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// One-way delays to check, ms.
    #[arg(long, value_delimiter = ',', default_value = "0,20,60,100,140")]
    pub delays: Vec<f64>,
    /// Rate limits to check, Mbit/s.
    #[arg(long, value_delimiter = ',', default_value = "20,100")]
    pub rates: Vec<f64>,
    /// Where to write the JSON result.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

#[derive(Debug, Serialize)]
struct Check {
    what: String,
    setting: f64,
    measured: f64,
    tolerance: f64,
    ok: bool,
}

fn measure_rate(
    lab: &Lab,
    tx_ns: &str,
    rx_ns: &str,
    dst: Ipv4Addr,
    mbit: f64,
) -> anyhow::Result<f64> {
    const PAYLOAD: usize = 1400;
    const IP_BYTES: f64 = (PAYLOAD + 28) as f64;
    let port = 9999;
    let rx = lab.in_ns(rx_ns, || {
        UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))
    })??;
    rx.set_read_timeout(Some(Duration::from_millis(500)))?;
    let secs = 2.0;
    let recv = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        let (mut n, mut first, mut last) = (0u64, None, None);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end {
            match rx.recv(&mut buf) {
                Ok(_) => {
                    let t = Instant::now();
                    first.get_or_insert(t);
                    last = Some(t);
                    n += 1;
                }
                Err(_) if first.is_some() => break,
                Err(_) => {}
            }
        }
        (n, first, last)
    });
    let offered = mbit * 1.3 * 1e6;
    lab.in_ns(tx_ns, || -> std::io::Result<()> {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        let buf = [0x5au8; PAYLOAD];
        let start = Instant::now();
        let mut sent = 0u64;
        while start.elapsed().as_secs_f64() < secs {
            let due = (start.elapsed().as_secs_f64() * offered / (IP_BYTES * 8.0)) as u64;
            while sent < due {
                s.send_to(&buf, SocketAddrV4::new(dst, port))?;
                sent += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        Ok(())
    })??;
    let (n, first, last) = recv
        .join()
        .map_err(|_| anyhow::anyhow!("receiver panicked"))?;
    match (first, last) {
        (Some(f), Some(l)) if n > 10 && l > f => {
            Ok((n - 1) as f64 * IP_BYTES * 8.0 / (l - f).as_secs_f64() / 1e6)
        }
        _ => bail!("rate check: only {n} datagrams arrived"),
    }
}

/// `bench wanem check`.
pub fn check(args: &CheckArgs) -> anyhow::Result<()> {
    if !lab::is_root() {
        bail!("bench wanem check builds network namespaces: run it as root");
    }
    let lab = Lab::new("wc")?;
    let h1 = lab.add_ns("h1")?;
    let w = lab.add_ns("wan")?;
    let h2 = lab.add_ns("h2")?;
    lab.veth(&h1, "eth0", &w, "w0")?;
    lab.veth(&w, "w1", &h2, "eth0")?;
    let (a1, a2) = (
        Ipv4Addr::new(198, 18, 250, 1),
        Ipv4Addr::new(198, 18, 250, 2),
    );
    lab.addr(&h1, "eth0", a1, 24)?;
    lab.addr(&h2, "eth0", a2, 24)?;
    let mut wan = Wan::new(&w);
    let mut checks = Vec::new();
    for &d in &args.delays {
        wan.set(&lab, &LinkArgs::delay(d))?;
        lab::wait_ping(&lab, &h1, a2, Duration::from_secs(5))?;
        let samples = lab::ping_samples(&lab, &h1, a2, 10, 0.05)?;
        let rtt = lab::median(&samples).context("no ping replies")?;
        let setting = 2.0 * d;
        let tol = 1.0 + 0.05 * setting;
        checks.push(Check {
            what: "rtt_ms".into(),
            setting,
            measured: rtt,
            tolerance: tol,
            ok: (rtt - setting).abs() <= tol,
        });
    }
    for &r in &args.rates {
        let mut link = LinkArgs::delay(10.0);
        link.rate_mbit = r;
        wan.set(&lab, &link)?;
        lab::wait_ping(&lab, &h1, a2, Duration::from_secs(5))?;
        let m = measure_rate(&lab, &h1, &h2, a2, r)?;
        checks.push(Check {
            what: "rate_mbit".into(),
            setting: r,
            measured: m,
            tolerance: 0.05 * r,
            ok: (m - r).abs() <= 0.05 * r,
        });
    }
    lab.teardown();
    let (date, stamp) = utc_now();
    println!("\nWAN emulator self-check, {date}\n");
    println!("| check | setting | measured | tolerance | |");
    println!("|---|---:|---:|---:|---|");
    for c in &checks {
        println!(
            "| {} | {:.1} | {:.2} | +-{:.2} | {} |",
            c.what,
            c.setting,
            c.measured,
            c.tolerance,
            if c.ok { "ok" } else { "FAIL" }
        );
    }
    #[derive(Serialize)]
    struct Report<'a> {
        bench: &'static str,
        date: String,
        machine: Machine,
        checks: &'a [Check],
    }
    let p = write_json(
        &args.results,
        &format!("wanem-check-{stamp}.json"),
        &Report {
            bench: "wanem-check",
            date,
            machine: Machine::probe(),
            checks: &checks,
        },
    )?;
    eprintln!("results: {}", p.display());
    let bad = checks.iter().filter(|c| !c.ok).count();
    if bad > 0 {
        bail!("{bad} of {} checks out of tolerance", checks.len());
    }
    Ok(())
}

/// `bench wanem link`: runs until killed.
pub fn link(args: &LinkArgs) -> anyhow::Result<()> {
    let (ab, ba) = args.dirs()?;
    let stats = Arc::new(Stats::default());
    wanem::run_link(&args.a, &args.b, ab, ba, stats)?;
    Ok(())
}
