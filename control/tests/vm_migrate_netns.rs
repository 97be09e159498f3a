//! Live migration of a light (netns) VM between two NATed sites: B's compute, with a
//! pattern in its disk file, moves to C with `mvc vm migrate` while A's compute pings
//! it. Its disk follows through the xnbd proxy at 2 MiB/s, and the proxy is killed
//! part way: C's agent starts it again, it resumes from its bitmap (no block fetched
//! twice) and the copy completes. Afterwards the namespace at C has the VM's MAC and
//! address, C's disk file holds the pattern, B holds nothing of it, and `cluster
//! status` places it at C. A move to a site where the cluster has no overlay is
//! refused with a clear error, the VM untouched. Needs root; otherwise prints that it
//! was skipped.
mod common;

use common::{
    compute_at, lost_pings, migrate_args, mvc_and_xnbd, mvc_on_frontend, overlay_under_test,
    spawn_ping,
};
use control::demo::SiteLab;
use std::io::{BufRead, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The file of `dir` whose name is `c<N>-<vm>.<ext>`.
fn vm_file(dir: &Path, vm: &str, ext: &str) -> Option<PathBuf> {
    lab::sites::vm_files(dir, vm, ext).into_iter().next()
}

/// The status object of an xnbd control socket.
fn proxy_status(ctl: &Path) -> Option<serde_json::Value> {
    let mut s = std::os::unix::net::UnixStream::connect(ctl).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(b"{\"cmd\":\"status\"}\n").ok()?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line).ok()?;
    let v: serde_json::Value = serde_json::from_str(&line).ok()?;
    Some(v["status"].clone())
}

/// The bound of the whole `vm migrate` (its `timeout`): seconds on a quiet machine,
/// generous for one at load 200.
const MOVE_LIMIT_SECS: u32 = 300;

#[test]
fn netns_vm_migrates_with_mac_address_and_disk_and_survives_a_proxy_crash() {
    if !lab::is_root() {
        lab::skip(
            "netns_vm_migrates_with_mac_address_and_disk_and_survives_a_proxy_crash",
            "needs root for network namespaces",
        );
        return;
    }
    let t_start = Instant::now();
    let (mvc, _xnbd) = mvc_and_xnbd();
    let overlay = overlay_under_test(&mvc);
    let sl = SiteLab::new(&mvc, &overlay, 8, 8).expect("lab");
    sl.add_sites().expect("site add");
    let cl = sl
        .ctl_json(&[
            "cluster",
            "create",
            "m",
            "--sites",
            "A:B:C",
            "--computes",
            "1:1:1",
            "--start",
        ])
        .expect("cluster create");
    let (bvm, avm) = (compute_at(&cl, "B"), compute_at(&cl, "A"));
    let name = bvm["name"].as_str().unwrap().to_string();
    let mac = bvm["mac"].as_str().unwrap().to_string();
    let ip: std::net::Ipv4Addr = bvm["ip"].as_str().unwrap().parse().unwrap();
    let a_ns = sl
        .vm_ns("m", avm["name"].as_str().unwrap())
        .expect("A's VM");
    let b_ns = sl.vm_ns("m", &name).expect("B's VM");
    lab::wait_ping(&sl.lab, &a_ns, ip, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("A's VM -> {ip}: {e}"));
    let (b_state, c_state) = (sl.agents["B"].state.clone(), sl.agents["C"].state.clone());

    // The pattern: 2 MiB at 1 MiB into the VM's disk file, as a process of it would.
    let bimg = vm_file(&b_state.join("disks"), &name, "img").expect("B's disk file");
    let size = std::fs::metadata(&bimg).unwrap().len();
    assert_eq!(size, control::driver::NETNS_DISK_BYTES);
    let pattern: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    {
        let mut f = std::fs::OpenOptions::new().write(true).open(&bimg).unwrap();
        f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
        f.write_all(&pattern).unwrap();
        f.sync_all().unwrap();
    }

    // Refused: cluster `n` has no overlay at C.
    let n = sl
        .ctl_json(&[
            "cluster",
            "create",
            "n",
            "--sites",
            "A:B",
            "--computes",
            "1:1",
            "--start",
        ])
        .expect("cluster n");
    let nvm = compute_at(&n, "B")["name"].as_str().unwrap().to_string();
    for extra in [&[][..], &["--host", "c-h0"][..]] {
        let mut args = vec!["vm", "migrate", "n", &nvm, "--to", "C"];
        args.extend(extra);
        let err = sl
            .ctl(&args)
            .expect_err("a move to a site without the cluster's overlay")
            .to_string();
        assert!(err.contains("no overlay at site"), "{err}");
    }
    let list = sl
        .ctl_json(&["vm", "list", "--cluster", "n"])
        .expect("vm list");
    assert!(list.to_string().contains("\"site\":\"B\""), "{list}");

    // A's compute pings it all along (every 20 ms, 30 s at most).
    let ping = spawn_ping(&a_ns, ip, "0.02", 1500, 30);
    std::thread::sleep(Duration::from_millis(500));

    // The move, the disk copied at 2 MiB/s.
    let mut mig = mvc_on_frontend(
        &sl,
        &mvc,
        MOVE_LIMIT_SECS,
        &migrate_args("m", &name, "C", &["--disk-rate", "2097152", "--json"]),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("vm migrate");
    // C's proxy, once it copies: killed (SIGKILL), as a crash would. Its first block
    // comes after the memory phase, which a loaded machine stretches, so this waits
    // for as long as the move itself may run (its `timeout`), not for a fixed time;
    // a move that ends before any block is seen at C fails here with its output.
    let c_run = c_state.join("run");
    let first = loop {
        let st = vm_file(&c_run, &name, "xnbd.ctl").and_then(|c| proxy_status(&c));
        if let Some(st) = st.filter(|s| s["cached_blocks"].as_u64().unwrap_or(0) > 0) {
            break st;
        }
        if !matches!(mig.try_wait(), Ok(None)) {
            let out = mig.wait_with_output().expect("vm migrate");
            panic!(
                "vm migrate ended ({}) before a disk copy was seen at C: {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let pidfile = vm_file(&c_run, &name, "xnbd.pid").expect("C's proxy pid file");
    let pid: u32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    assert!(
        String::from_utf8_lossy(&cmd).contains(&c_run.display().to_string()),
        "pid {pid} is not this test's proxy"
    );
    // The proxy C's agent started for this test's VM (its command line names the run
    // directory).
    lab::sys::kill(pid, libc::SIGKILL).expect("SIGKILL to C's proxy");
    eprintln!(
        "proxy killed with {} of {} blocks local",
        first["cached_blocks"], first["total_blocks"]
    );
    // The one started again: what it found local at its start (cached less fetched
    // and written; a fetch counts just before its blocks are marked local, so the
    // largest of these samples is the one).
    // Until the move ends (bounded by its `timeout`).
    let mut at_restart: Option<u64> = None;
    while matches!(mig.try_wait(), Ok(None)) {
        let new_pid = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok());
        if new_pid.is_some_and(|p| p != pid) {
            if let Some(st) = vm_file(&c_run, &name, "xnbd.ctl").and_then(|c| proxy_status(&c)) {
                let g = |k: &str| st[k].as_u64().unwrap_or(0);
                let local = g("cached_blocks")
                    .saturating_sub(g("fetched_blocks"))
                    .saturating_sub(g("written_blocks"));
                at_restart = Some(at_restart.map_or(local, |a| a.max(local)));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = mig.wait_with_output().expect("vm migrate");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "vm migrate: {err}");
    let at_restart = at_restart.expect("no proxy started again at C");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    eprintln!("moved: {v}");
    assert_eq!(v["phase"], "done", "{v}");
    assert_eq!(v["disk_bytes_before_switchover"], 0, "{v}");
    let bs = first["block_size"].as_u64().unwrap();
    let total = first["total_blocks"].as_u64().unwrap();
    // The restarted proxy fetched only what was not local at its start.
    let fetched = v["disk_bytes"].as_u64().unwrap() / bs;
    assert!(at_restart > 0, "nothing survived the proxy's crash");
    assert!(
        fetched + at_restart <= total,
        "blocks fetched twice: {fetched} fetched after the restart, {at_restart} of {total} local before"
    );

    // Pings: all but the switch's few. (SIGINT to the ping this test started: it
    // prints its summary and ends.)
    lab::sys::kill(ping.id(), libc::SIGINT).expect("SIGINT to ping");
    let (summary, lost) = lost_pings(ping);
    eprintln!("ping from A's VM during the move: {summary}");
    assert!(lost <= 50, "over 1 s of pings lost: {summary}");

    // At C: the same MAC and address, the pattern in its disk file, a running VM.
    let c_ns = sl.vm_ns("m", &name).expect("C's VM");
    assert_ne!(c_ns, b_ns);
    let link = lab::run(&["ip", "-n", &c_ns, "link", "show", "eth0"]).expect("eth0");
    assert!(link.stdout.contains(&mac), "{}", link.stdout);
    let addr = lab::run(&["ip", "-n", &c_ns, "-4", "addr", "show", "eth0"]).expect("addr");
    assert!(addr.stdout.contains(&ip.to_string()), "{}", addr.stdout);
    let cimg = vm_file(&c_state.join("disks"), &name, "img").expect("C's disk file");
    let mut got = vec![0u8; pattern.len()];
    {
        let mut f = std::fs::File::open(&cimg).unwrap();
        f.seek(std::io::SeekFrom::Start(1 << 20)).unwrap();
        f.read_exact(&mut got).unwrap();
    }
    assert!(got == pattern, "the disk pattern changed on the way");
    assert!(
        vm_file(&c_run, &name, "xnbd.pid").is_none(),
        "C's proxy left after the copy"
    );
    lab::wait_ping(&sl.lab, &a_ns, ip, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("A's VM -> {ip} at C: {e}"));
    let st = sl.ctl_json(&["cluster", "status", "m"]).expect("status");
    let row = st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == name.as_str())
        .unwrap()
        .to_string();
    assert!(
        row.contains("\"site\":\"C\"") && row.contains("running"),
        "{row}"
    );
    // B holds nothing of it: no namespace, no files.
    assert!(!Path::new("/run/netns").join(&b_ns).exists(), "{b_ns} left");
    let left: Vec<String> = ["run", "disks"]
        .iter()
        .flat_map(|d| std::fs::read_dir(b_state.join(d)).unwrap())
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(&format!("-{name}.")))
        .collect();
    assert!(left.is_empty(), "left at B: {left:?}");

    sl.ctl(&["cluster", "destroy", "m"]).expect("destroy m");
    sl.ctl(&["cluster", "destroy", "n"]).expect("destroy n");
    assert!(!cimg.exists(), "disk {} left", cimg.display());
    eprintln!("took {:.1} s", t_start.elapsed().as_secs_f64());
}
