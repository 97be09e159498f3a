//! Where an idle-path ping's time goes: the sites layout of `bench overlay` (VM b1 behind
//! NAT -> VM a1), an mvc cluster on it, and `perf record -a` of the scheduler and network
//! tracepoints during a ping series 10 ms apart, over the overlay and then over the raw
//! underlay. `bench/examples/ping_trace.py` turns the two traces into per-stage times.
//!
//!     cargo build --release -p bench --example ping_trace
//!     sudo target/release/examples/ping_trace MVC OUT_DIR [tap|xdp] [PINGS] [EDGE FLAGS...]

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use lab::overlay::{Mvc, MvcCluster};
use lab::{Lab, Topology};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mvc, out, rest @ ..] = args.as_slice() else {
        bail!("usage: ping_trace MVC OUT_DIR [tap|xdp] [PINGS] [EDGE FLAGS...]");
    };
    let datapath = rest.first().cloned().unwrap_or_else(|| "tap".into());
    let pings: u32 = rest.get(1).map_or(Ok(200), |s| s.parse())?;
    if !(1..=2000).contains(&pings) {
        bail!("PINGS must be 1..=2000");
    }
    let extra: Vec<String> = rest.iter().skip(2).cloned().collect();
    if !lab::is_root() {
        bail!("ping_trace builds network namespaces: run it as root");
    }
    std::fs::create_dir_all(out)?;
    let mvc = Mvc { bin: mvc.into() };
    let lab = Lab::new("ptrace")?;
    let t = Topology::three_sites(&lab, 1)?;
    let (a, b) = (t.site("a"), t.site("b"));
    let c = MvcCluster::start(&lab, &t, &mvc, |o| {
        o.cipher = Some("aes-256-gcm".into());
        o.datapath = Some(datapath.clone());
        if datapath == "xdp" {
            o.tap = Some("xp0".into());
            o.bridge = Some(a.bridge.clone());
        }
        o.extra.extend(extra.iter().cloned());
    })?;
    let (va, vb) = (&a.vms[0], &b.vms[0]);
    lab::wait_ping(&lab, &vb.ns, va.ip, Duration::from_secs(30))?;
    c.wait_path(&lab, "b", "a", "direct", Duration::from_secs(30))?;
    let _ = lab::ping(&lab, &vb.ns, va.ip, 20, 0.01);
    let pids = format!(
        "edge_a {}\nedge_b {}\nsupernode {}\n",
        c.edge("a").proc.pid,
        c.edge("b").proc.pid,
        c.supernode.proc.pid
    );
    std::fs::write(Path::new(out).join("pids"), &pids)?;
    for (name, dst) in [("overlay", va.ip), ("raw", va.underlay_ip)] {
        trace(&lab, &vb.ns, dst, pings, &Path::new(out).join(name))
            .with_context(|| format!("{name} trace"))?;
    }
    c.stop(&lab);
    lab.teardown();
    print!("{pids}");
    Ok(())
}

/// `pings` pings 10 ms apart from `ns` to `dst` under `perf record -a` of the wake-ups,
/// context switches and packet hand-offs (frames of 60-400 bytes only); writes the
/// samples to `stem.data` and the RTTs (ms) to `stem.ping`.
fn trace(lab: &Lab, ns: &str, dst: Ipv4Addr, pings: u32, stem: &Path) -> anyhow::Result<()> {
    let secs = pings.div_ceil(100) + 2;
    let data = stem.with_extension("data");
    let mut perf = Command::new("perf")
        .args(["record", "-a", "-q", "-o"])
        .arg(&data)
        .args([
            "-e",
            "sched:sched_wakeup",
            "-e",
            "sched:sched_waking",
            "-e",
            "sched:sched_switch",
            "-e",
            "net:net_dev_queue",
            "--filter",
            "len >= 60 && len <= 400",
            "-e",
            "net:netif_receive_skb",
            "--filter",
            "len >= 40 && len <= 400",
            "-e",
            "syscalls:sys_exit_io_uring_enter",
            "-e",
            "syscalls:sys_enter_io_uring_enter",
            "--",
            "sleep",
            &secs.to_string(),
        ])
        .spawn()
        .context("perf record")?;
    std::thread::sleep(Duration::from_millis(700));
    let res = lab::ping_samples(lab, ns, dst, pings, 0.01);
    let status = perf.wait()?;
    let rtts: Vec<String> = res?.iter().map(f64::to_string).collect();
    std::fs::write(stem.with_extension("ping"), rtts.join("\n"))?;
    if !status.success() {
        bail!("perf record failed: {status}");
    }
    Ok(())
}
