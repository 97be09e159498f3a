//! What the VM tests on the three-site lab share: the binaries under test, the
//! overlay, the qemu guest, finding a cluster's VMs, ending the
//! processes a failed test leaves, `mvc` runs that go on while the test watches, and
//! reading a ping's losses, a libvirtd of a test's own ([`libvirtd`]), a local agent
//! for the tests without root ([`agent`]). Each test file uses a part of it.
#![allow(dead_code)]

pub mod agent;
pub mod libvirtd;
pub mod slurm;

use control::demo::{pick_overlay, SiteLab};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The `mvc` binary under test and the `xnbd` beside it (asserted present).
pub fn mvc_and_xnbd() -> (PathBuf, PathBuf) {
    let mvc = PathBuf::from(env!("CARGO_BIN_EXE_mvc"));
    let xnbd = mvc.with_file_name("xnbd");
    assert!(
        xnbd.exists(),
        "{} missing: build it (`cargo build -p xnbd`; `cargo test --workspace` does)",
        xnbd.display()
    );
    (mvc, xnbd)
}

/// The overlay the tests run on: `MVC_TEST_OVERLAY`, `auto` when unset.
pub fn overlay_under_test(mvc: &Path) -> String {
    pick_overlay(
        mvc,
        &std::env::var("MVC_TEST_OVERLAY").unwrap_or_else(|_| "auto".into()),
    )
}

/// Kernel (fetched once from Debian's archive when the host has none in /boot) and
/// initramfs of the qemu guest, prepared in the root namespace so that the agents
/// find them in the cache; the cache directory (`MVC_QEMU_CACHE`, `/var/cache/mvc`
/// when unset).
pub fn prepare_qemu_guest(mvc: &Path) -> String {
    assert!(
        lab::run(&["qemu-system-x86_64", "--version"]).is_ok(),
        "qemu-system-x86_64 missing: install the Debian package qemu-system-x86 (.ci/setup-deps)"
    );
    let cache = std::env::var("MVC_QEMU_CACHE").unwrap_or_else(|_| "/var/cache/mvc".into());
    let t0 = Instant::now();
    let prep = std::process::Command::new(mvc)
        .args(["agent", "qemu-prepare", "--cache", &cache])
        .output()
        .expect("mvc agent qemu-prepare");
    assert!(
        prep.status.success(),
        "qemu-prepare: {}",
        String::from_utf8_lossy(&prep.stderr)
    );
    eprintln!(
        "guest prepared in {:.1} s:\n{}",
        t0.elapsed().as_secs_f64(),
        String::from_utf8_lossy(&prep.stdout)
    );
    cache
}

/// The three-site lab with site C's agent on the qemu driver (64 MiB guests), its sites
/// added: the lab, C's state directory, and the guard that ends C's VM processes should
/// the agent not have (declare it after the lab, so that it runs first).
pub fn qemu_lab_at_c() -> (SiteLab, PathBuf, VmProcs) {
    let (mvc, xnbd) = mvc_and_xnbd();
    let cache = prepare_qemu_guest(&mvc);
    let overlay = overlay_under_test(&mvc);
    eprintln!("overlay under test: {overlay}");
    let mut extra = std::collections::BTreeMap::new();
    extra.insert(
        "C".to_string(),
        lab::sites::qemu_agent_args(&cache, &xnbd, 64),
    );
    let sl = SiteLab::with_agent_args(&mvc, &overlay, 8, 8, &extra).expect("lab");
    let c_state = sl.agents["C"].state.clone();
    let procs = VmProcs(c_state.join("run"));
    sl.add_sites().expect("site add");
    (sl, c_state, procs)
}

/// The compute VM at `site` in the answer of `cluster create`.
pub fn compute_at(cluster: &serde_json::Value, site: &str) -> serde_json::Value {
    cluster["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["site"] == site && v["role"] == "compute")
        .unwrap_or_else(|| panic!("no compute at {site}: {cluster}"))
        .clone()
}

/// `mvc <args>` as the first user on site A's frontend, bounded by `limit_secs`
/// (`timeout`), its stdin closed; the caller chooses its output and spawns it, to
/// watch or disturb the sites meanwhile.
pub fn mvc_on_frontend(
    sl: &SiteLab,
    mvc: &Path,
    limit_secs: u32,
    args: &[&str],
) -> std::process::Command {
    let user = sl.first_user();
    let mut cmd = std::process::Command::new("timeout");
    cmd.args([
        &limit_secs.to_string(),
        "ip",
        "netns",
        "exec",
        &sl.topo.sites[0].frontend,
    ])
    .arg(mvc)
    .args(args)
    .env("MVC_DB", &user.db)
    .env("MVC_KEY", &user.key)
    .stdin(std::process::Stdio::null());
    cmd
}

/// A ping `ping -n -i <interval> -c <count> -w <limit_secs> dst` from `ns`, its
/// output kept for [`lost_pings`].
pub fn spawn_ping(
    ns: &str,
    dst: std::net::Ipv4Addr,
    interval: &str,
    count: u32,
    limit_secs: u32,
) -> std::process::Child {
    std::process::Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "ping",
            "-n",
            "-i",
            interval,
            "-c",
            &count.to_string(),
            "-w",
            &limit_secs.to_string(),
        ])
        .arg(dst.to_string())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("ping")
}

/// The summary line of an ended ping's output and how many of its requests got no
/// reply (asserted: it sent some).
pub fn lost_pings(ping: std::process::Child) -> (String, u32) {
    let out = ping.wait_with_output().expect("ping output");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let summary = text
        .lines()
        .rev()
        .find(|l| l.contains("received"))
        .unwrap_or("")
        .to_string();
    let p = lab::parse_ping(&text).unwrap_or_else(|| panic!("no ping summary in {text:?}"));
    assert!(p.sent > 0, "no ping sent: {summary}");
    (summary, p.sent.saturating_sub(p.received))
}

/// Ends the qemu and xnbd processes of an agent (its `run` directory) should the
/// agent not have (a failed test), from the pid files the driver writes, by pid, when
/// the process still names this run's files.
pub struct VmProcs(pub PathBuf);

impl Drop for VmProcs {
    fn drop(&mut self) {
        let Ok(rd) = std::fs::read_dir(&self.0) else {
            return;
        };
        for e in rd.flatten() {
            let p = e.path();
            let n = p.display().to_string();
            if !(n.ends_with(".qemu.pid") || n.ends_with(".xnbd.pid")) {
                continue;
            }
            if let Some(pid) = alive_pid(&p, &self.0) {
                // A process of this test's agent whose command line names this run's
                // directory.
                let _ = lab::sys::kill(pid, libc::SIGKILL);
            }
        }
    }
}

/// The pid in `pidfile` when that process runs and its command line names `dir`.
pub fn alive_pid(pidfile: &Path, dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmd)
        .contains(&dir.display().to_string())
        .then_some(pid)
}

/// Waits, every `step`, until `done` or `limit` has passed; whether it is done.
pub fn wait_until(limit: Duration, step: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(step);
    }
    true
}

/// Network devices of namespace `ns` whose names start with `prefix` (a VM's TAP
/// `mvq...`).
pub fn links(ns: &str, prefix: &str) -> Vec<String> {
    lab::run(&["ip", "-n", ns, "-o", "link", "show"])
        .map(|o| {
            o.stdout
                .lines()
                .filter_map(|l| l.split(": ").nth(1))
                .map(|n| n.split('@').next().unwrap_or(n).to_string())
                .filter(|n| n.starts_with(prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// `cluster create NAME --sites A:B:C --computes 1:1:1 --start`, every VM with
/// `memory` MiB, leases awaited up to `lease_secs`: its JSON answer.
pub fn create_1_1_1(sl: &SiteLab, name: &str, memory: u32, lease_secs: u32) -> serde_json::Value {
    let lease = lease_secs.to_string();
    let out = sl
        .create_cluster_with(
            name,
            "1:1:1",
            memory,
            &["--lease-timeout", &lease, "--json"],
        )
        .expect("cluster create");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("cluster create: bad JSON: {e}: {out}"))
}

/// `vm migrate CLUSTER VM --to SITE` and then `extra`: the arguments of `mvc`.
pub fn migrate_args<'a>(
    cluster: &'a str,
    vm: &'a str,
    to: &'a str,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut a = vec!["vm", "migrate", cluster, vm, "--to", to];
    a.extend_from_slice(extra);
    a
}

/// [`create_1_1_1`] of `name` with 128 MiB VMs (leases awaited up to 300 s), C's own
/// compute stopped to spare the CPU (C holds the cluster's overlay), and A's compute
/// pinging B's: the answer of `cluster create`, the address of B's compute and the
/// namespace of A's compute.
pub fn create_b_pinged_from_a(
    sl: &SiteLab,
    name: &str,
) -> (serde_json::Value, std::net::Ipv4Addr, String) {
    let cl = create_1_1_1(sl, name, 128, 300);
    let (avm, bvm, cvm) = (
        compute_at(&cl, "A"),
        compute_at(&cl, "B"),
        compute_at(&cl, "C"),
    );
    sl.ctl_json(&["vm", "stop", cvm["name"].as_str().unwrap()])
        .expect("stop C's own compute");
    let ip: std::net::Ipv4Addr = bvm["ip"].as_str().unwrap().parse().unwrap();
    let a_ns = sl
        .vm_ns(name, avm["name"].as_str().unwrap())
        .expect("A's VM namespace");
    lab::wait_ping(&sl.lab, &a_ns, ip, Duration::from_secs(60))
        .unwrap_or_else(|e| panic!("A's VM -> {ip}: {e}"));
    (cl, ip, a_ns)
}

/// Checks a move to C that `vm migrate` answered with `mig`, made while `ping` (from
/// [`spawn_ping`]) ran from A's compute (namespace `a_ns`) to `ip`: done, at C, no disk
/// block fetched by the destination before the switchover, at most `max_lost` pings
/// lost (`lost_as` says how long that is), and `ip` answering afterwards.
pub fn assert_moved_to_c_while_pinged(
    sl: &SiteLab,
    mig: &serde_json::Value,
    ping: std::process::Child,
    (max_lost, lost_as): (u32, &str),
    a_ns: &str,
    ip: std::net::Ipv4Addr,
) {
    assert_eq!(mig["phase"], "done", "{mig}");
    assert_eq!(mig["to"], "C");
    assert_eq!(
        mig["disk_bytes_before_switchover"], 0,
        "the destination fetched disk blocks before the switchover: {mig}"
    );
    let (summary, lost) = lost_pings(ping);
    eprintln!("ping from A's VM during the migration: {summary}");
    assert!(
        lost <= max_lost,
        "more than {lost_as} of pings lost: {summary}"
    );
    lab::wait_ping(&sl.lab, a_ns, ip, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("A's VM -> {ip} after the migration: {e}"));
}

/// The md5 sum busybox printed.
pub fn md5_of(out: &str) -> String {
    out.lines()
        .rev()
        .find_map(|l| {
            let w = l.split_whitespace().next()?;
            (w.len() == 32 && w.bytes().all(|b| b.is_ascii_hexdigit())).then(|| w.to_string())
        })
        .unwrap_or_else(|| panic!("no md5 sum in {out:?}"))
}

/// Whether directory `dir` holds a file whose name ends with `suffix`.
pub fn has_file_ending(dir: &Path, suffix: &str) -> bool {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .any(|e| e.file_name().to_string_lossy().ends_with(suffix))
        })
        .unwrap_or(false)
}

/// A move to C that fails because C's agent (pid `c_pid`) is killed on the way, as
/// [`migrate_killing_agent`] does; then C's agent is started again.
pub fn migrate_killing_c(
    sl: &mut SiteLab,
    migrate: &[&str],
    c_pid: u32,
    ready: impl FnMut() -> bool,
    settle: Duration,
) {
    let killed = migrate_killing_agent(sl, migrate, c_pid, ready, settle);
    let err = killed.expect_err("migration to a killed agent succeeded");
    eprintln!("migration to a killed agent: {err}");
    sl.kill_agent("C");
    sl.restart_agent("C").expect("agent C restart");
}

/// `mvc <migrate>` run while the agent whose pid is `agent_pid` is killed with SIGKILL
/// once `ready` (polled every 100 ms, up to 60 s) and `settle` more have passed: what
/// the `mvc` run answered.
pub fn migrate_killing_agent(
    sl: &SiteLab,
    migrate: &[&str],
    agent_pid: u32,
    mut ready: impl FnMut() -> bool,
    settle: Duration,
) -> lab::sites::Result<String> {
    std::thread::scope(|scope| {
        let h = scope.spawn(|| sl.ctl(migrate));
        assert!(
            wait_until(
                Duration::from_secs(60),
                Duration::from_millis(100),
                &mut ready
            ),
            "the migration did not get far enough to kill the agent"
        );
        std::thread::sleep(settle);
        // The test's own agent (its pid file names it).
        lab::sys::kill(agent_pid, libc::SIGKILL).expect("SIGKILL to the agent");
        h.join().expect("migrate thread")
    })
}
