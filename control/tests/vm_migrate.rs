//! Live migration of a qemu VM between two NATed sites: sites B and C run their agents
//! with `--driver qemu`; B's compute writes a pattern to its disk, keeps writing while
//! its memory is sent, and moves to C with `mvc vm migrate` while A's compute pings it.
//! Afterwards the guest reads its pattern back at C, every write it made during the
//! move is in C's disk image, B holds nothing of it, and the store and `cluster
//! status` place it at C. A disk proxy killed while it copies is started again by its
//! agent and resumes (the guest's pattern reads back). A migration to a site without
//! the qemu driver fails and leaves the VM running where it was. Needs root; otherwise
//! prints that it was skipped.
mod common;

use common::{
    alive_pid, assert_moved_to_c_while_pinged, compute_at, create_b_pinged_from_a, has_file_ending,
    md5_of, migrate_args, migrate_killing_c, mvc_and_xnbd, mvc_on_frontend, overlay_under_test,
    prepare_qemu_guest, spawn_ping, wait_until, VmProcs,
};
use control::demo::SiteLab;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Run `cmd` in a guest's console shell (Unix socket `sock`); its output.
fn console(sock: &Path, cmd: &str, timeout: Duration) -> String {
    lab::sites::guest_console(sock, cmd, timeout).unwrap_or_else(|e| panic!("{e}"))
}

fn local_of(sl: &SiteLab, vm: &str) -> String {
    let handles = sl.vm_handles("m").expect("handles");
    handles[vm].rsplit(':').next().unwrap().to_string()
}

/// The text in sector `k` of disk image `img` (empty when the image is shorter).
fn sector_text(img: &Path, k: usize) -> String {
    let b = std::fs::read(img).unwrap_or_default();
    let s = b.get(k * 512..(k + 1) * 512).unwrap_or(&[]);
    String::from_utf8_lossy(s)
        .trim_end_matches('\0')
        .trim()
        .to_string()
}

/// The VM's local name at the site whose agent keeps `state`, and its console socket.
fn vm_console(sl: &SiteLab, state: &Path, vm: &str) -> (String, PathBuf) {
    let local = local_of(sl, vm);
    let con = state.join("run").join(format!("{local}.console"));
    (local, con)
}

/// The md5 sum of the pattern (4 MiB at 1 MiB) as the guest behind console `con`
/// reads it now, its page cache dropped first (after `wait`ing for its background
/// writes when `wait`).
fn pattern_sum(con: &Path, wait: bool) -> String {
    let read = "sync; echo 3 > /proc/sys/vm/drop_caches; \
                dd if=/dev/vda bs=64k skip=16 count=64 2>/dev/null | md5sum";
    let cmd = if wait {
        format!("wait; {read}")
    } else {
        read.to_string()
    };
    md5_of(&console(con, &cmd, Duration::from_secs(60)))
}

#[test]
fn qemu_vm_migrates_between_nated_sites_with_its_disk_while_pinged() {
    if !lab::is_root() {
        lab::skip(
            "qemu_vm_migrates_between_nated_sites_with_its_disk_while_pinged",
            "needs root for network namespaces and TAPs",
        );
        return;
    }
    let (mvc, xnbd) = mvc_and_xnbd();
    let cache = prepare_qemu_guest(&mvc);
    let overlay = overlay_under_test(&mvc);
    let qemu_args = lab::sites::qemu_agent_args(&cache, &xnbd, 32);
    let mut extra = BTreeMap::new();
    extra.insert("B".to_string(), qemu_args.clone());
    extra.insert("C".to_string(), qemu_args);
    let mut sl = SiteLab::with_agent_args(&mvc, &overlay, 8, 8, &extra).expect("lab");
    let b_state = sl.agents["B"].state.clone();
    let c_state = sl.agents["C"].state.clone();
    let _procs_b = VmProcs(b_state.join("run"));
    let _procs_c = VmProcs(c_state.join("run"));
    sl.add_sites().expect("site add");
    // B's compute only; C holds the cluster's overlay (and its own compute, stopped
    // to spare the CPU).
    let (cl, ip, a_ns) = create_b_pinged_from_a(&sl, "m");
    let name = compute_at(&cl, "B")["name"].as_str().unwrap().to_string();
    let (blocal, bcon) = vm_console(&sl, &b_state, &name);

    // The pattern: 4 MiB of random data at 1 MiB, and its sum as the guest reads it.
    let out = console(
        &bcon,
        "dd if=/dev/urandom of=/dev/vda bs=64k seek=16 count=64 conv=fsync 2>/dev/null; \
         dd if=/dev/vda bs=64k skip=16 count=64 2>/dev/null | md5sum",
        Duration::from_secs(60),
    );
    let sum = md5_of(&out);
    // Writes that go on while the memory is sent (and after): sector 16384+i holds `w<i>`.
    console(
        &bcon,
        "(i=0; while [ $i -lt 60 ]; do echo w$i | dd of=/dev/vda bs=512 seek=$((16384+i)) \
         conv=fsync 2>/dev/null; i=$((i+1)); sleep 0.2; done) &",
        Duration::from_secs(10),
    );
    // A migration that fails part way (memory capped at 1 MB/s, 3 s allowed) is undone:
    // the VM goes on at B in the same qemu, C keeps nothing of it.
    let bpid = alive_pid(
        &b_state.join("run").join(format!("{blocal}.qemu.pid")),
        &b_state,
    )
    .expect("qemu at B");
    let failed = sl.ctl(&migrate_args(
        "m",
        &name,
        "C",
        &["--rate", "1000000", "--timeout", "3"],
    ));
    let err = failed.expect_err("a migration capped far below what 3 s need succeeded");
    eprintln!("failed migration: {err}");
    assert_eq!(
        alive_pid(
            &b_state.join("run").join(format!("{blocal}.qemu.pid")),
            &b_state
        ),
        Some(bpid),
        "B's qemu replaced"
    );
    let status = console(&bcon, "echo alive", Duration::from_secs(20));
    assert!(status.contains("alive"), "{status}");
    let c_left = |local_prefix: &str| -> Vec<String> {
        std::fs::read_dir(c_state.join("run"))
            .unwrap()
            .chain(std::fs::read_dir(c_state.join("disks")).unwrap())
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .filter(|n| n.starts_with(local_prefix) && n.contains(&format!("-{name}.")))
            .collect()
    };
    assert!(c_left("c").is_empty(), "left at C: {:?}", c_left("c"));
    let list = sl
        .ctl_json(&["vm", "list", "--cluster", "m"])
        .expect("vm list");
    assert!(list.to_string().contains("\"site\":\"B\""), "{list}");
    let recorded = sl.ctl_json(&["vm", "migrations"]).expect("migrations");
    assert!(
        recorded.to_string().contains("\"phase\":\"failed\""),
        "{recorded}"
    );
    lab::wait_ping(&sl.lab, &a_ns, ip, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("A's VM -> {ip} after the failed migration: {e}"));

    // C's agent killed (SIGKILL) while the memory is on its way: the migration fails,
    // the VM goes on at B; C's agent, restarted, removes what it had made for it.
    let c_pid = control::agent::running_agent(&c_state).expect("C's agent pid");
    let incoming = format!("-{name}.min");
    migrate_killing_c(
        &mut sl,
        &migrate_args("m", &name, "C", &["--rate", "1000000", "--timeout", "60"]),
        c_pid,
        || has_file_ending(&c_state.join("run"), &incoming),
        Duration::from_secs(1),
    );
    assert!(c_left("c").is_empty(), "left at C: {:?}", c_left("c"));
    assert_eq!(
        alive_pid(
            &b_state.join("run").join(format!("{blocal}.qemu.pid")),
            &b_state
        ),
        Some(bpid),
        "B's qemu replaced"
    );
    lab::wait_ping(&sl.lab, &a_ns, ip, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("A's VM -> {ip} after C's agent died: {e}"));
    sl.ctl(&["cluster", "start", "m", "--lease-timeout", "300"])
        .expect("cluster start after C's agent came back");
    sl.ctl_json(&["vm", "stop", compute_at(&cl, "C")["name"].as_str().unwrap()])
        .expect("stop C's own compute again");

    // A's compute pings it all along (every 50 ms, bounded: 12 s at most).
    let ping = spawn_ping(&a_ns, ip, "0.05", 200, 12);

    let t0 = Instant::now();
    let mig = sl
        .ctl_json(&migrate_args("m", &name, "C", &["--downtime-ms", "300"]))
        .expect("vm migrate");
    let took = t0.elapsed();
    eprintln!("migrated in {:.1} s: {mig}", took.as_secs_f64());
    assert_moved_to_c_while_pinged(&sl, &mig, ping, (40, "2 s"), &a_ns, ip);

    // At C: the guest reads its pattern back and finished its writes.
    let (clocal, ccon) = vm_console(&sl, &c_state, &name);
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(
        pattern_sum(&ccon, true),
        sum,
        "pattern changed by the migration"
    );
    let img = c_state.join("disks").join(format!("{clocal}.img"));
    let sector = |i: usize| sector_text(&img, 16384 + i);
    wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
        sector(59) == "w59"
    });
    for i in 0..60 {
        assert_eq!(sector(i), format!("w{i}"), "write {i} lost");
    }
    let b = std::fs::read(&img).unwrap();
    assert!(
        String::from_utf8_lossy(&b[..512]).contains(&format!("MVC-DISK {name} boot 1")),
        "boot marker not in C's copy"
    );

    // B holds nothing of it: no files, no disk, no process.
    let left: Vec<String> = std::fs::read_dir(b_state.join("run"))
        .unwrap()
        .chain(std::fs::read_dir(b_state.join("disks")).unwrap())
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.starts_with(&format!("{blocal}.")))
        .collect();
    assert!(left.is_empty(), "left at B: {left:?}");
    // The store and the agents place it at C.
    let list = sl
        .ctl_json(&["vm", "list", "--cluster", "m"])
        .expect("vm list");
    let row = list
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r.to_string().contains(&format!("\"{name}\"")))
        .unwrap_or_else(|| panic!("{list}"))
        .to_string();
    assert!(row.contains("\"site\":\"C\""), "{row}");
    let st = sl.ctl_json(&["cluster", "status", "m"]).expect("status");
    let v = st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v.to_string().contains(&format!("\"{name}\"")))
        .unwrap()
        .to_string();
    assert!(v.contains("\"site\":\"C\"") && v.contains("running"), "{v}");
    let recorded = sl.ctl_json(&["vm", "migrations"]).expect("migrations");
    assert!(
        recorded.to_string().contains("\"phase\":\"done\""),
        "{recorded}"
    );
    let table = sl.ctl(&["vm", "migrations"]).expect("migrations table");
    assert!(table.contains("PHASE") && table.contains(&name), "{table}");

    // And back to B, the disk copy capped at 4 MiB/s, with B's agent killed (SIGKILL)
    // while the disk follows: its qemu and proxy run on, the restarted agent relays to
    // C again, the copy finishes and `vm migrate` completes.
    let back_cmd = mvc_on_frontend(
        &sl,
        &mvc,
        180,
        &migrate_args("m", &name, "B", &["--disk-rate", "4194304", "--json"]),
    )
    .stdout(std::process::Stdio::piped())
    .stderr(std::process::Stdio::piped())
    .spawn()
    .expect("vm migrate back");
    let b_pid = control::agent::running_agent(&b_state).expect("B's agent pid");
    let copying = || -> bool {
        let Some(ctl) = std::fs::read_dir(b_state.join("run")).ok().and_then(|rd| {
            rd.flatten().map(|e| e.path()).find(|p| {
                p.display()
                    .to_string()
                    .ends_with(&format!("-{name}.xnbd.ctl"))
            })
        }) else {
            return false;
        };
        let Ok(mut s) = std::os::unix::net::UnixStream::connect(&ctl) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"{\"cmd\":\"status\"}\n").is_err() {
            return false;
        }
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(s), &mut line);
        serde_json::from_str::<serde_json::Value>(&line)
            .ok()
            .and_then(|v| v["status"]["cached_blocks"].as_u64())
            .is_some_and(|n| n > 0)
    };
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(100), copying),
        "no disk copy seen at B"
    );
    // This test's own agent of site B (its pid file names it).
    lab::sys::kill(b_pid, libc::SIGKILL).expect("SIGKILL to B's agent");
    sl.kill_agent("B");
    std::thread::sleep(Duration::from_secs(2));
    sl.restart_agent("B").expect("agent B restart");
    let out = back_cmd.wait_with_output().expect("vm migrate back");
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "vm migrate back: {err}");
    assert!(
        err.contains("retrying"),
        "the agent's absence went unnoticed: {err}"
    );
    let back: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    eprintln!("migrated back, B's agent killed during the disk copy: {back}");
    assert_eq!(back["phase"], "done", "{back}");
    let (blocal, bcon) = vm_console(&sl, &b_state, &name);
    assert_eq!(
        pattern_sum(&bcon, false),
        sum,
        "pattern changed by the way back"
    );
    assert!(c_left("c").is_empty(), "left at C: {:?}", c_left("c"));
    let img = b_state.join("disks").join(format!("{blocal}.img"));
    let b_img = std::fs::read(&img).unwrap();
    for i in 0..60 {
        let s = &b_img[(16384 + i) * 512..(16385 + i) * 512];
        let s = String::from_utf8_lossy(s);
        assert_eq!(
            s.trim_end_matches('\0').trim(),
            format!("w{i}"),
            "write {i} lost on the way back"
        );
    }

    // The other strategy, the disk mirrored before the memory (`--precopy-disk`), to C
    // again, while the guest writes sectors 20480+i.
    console(
        &bcon,
        "(i=0; while [ $i -lt 40 ]; do echo p$i | dd of=/dev/vda bs=512 seek=$((20480+i)) \
         conv=fsync 2>/dev/null; i=$((i+1)); sleep 0.1; done) &",
        Duration::from_secs(10),
    );
    let pre = sl
        .ctl_json(&["vm", "migrate", "m", &name, "--to", "C", "--precopy-disk"])
        .expect("vm migrate --precopy-disk");
    eprintln!("migrated with the disk first: {pre}");
    assert_eq!(pre["phase"], "done", "{pre}");
    assert_eq!(pre["disk_strategy"], "pre-copy", "{pre}");
    let (clocal, ccon) = vm_console(&sl, &c_state, &name);
    assert_eq!(
        pattern_sum(&ccon, true),
        sum,
        "pattern changed by the mirror"
    );
    let img = c_state.join("disks").join(format!("{clocal}.img"));
    let read_sector = |k: usize| sector_text(&img, k);
    wait_until(Duration::from_secs(30), Duration::from_millis(500), || {
        read_sector(20480 + 39) == "p39"
    });
    for i in 0..60 {
        assert_eq!(
            read_sector(16384 + i),
            format!("w{i}"),
            "write {i} lost by the mirror"
        );
    }
    for i in 0..40 {
        assert_eq!(
            read_sector(20480 + i),
            format!("p{i}"),
            "write p{i} lost by the mirror"
        );
    }
    let left: Vec<String> = std::fs::read_dir(b_state.join("run"))
        .unwrap()
        .chain(std::fs::read_dir(b_state.join("disks")).unwrap())
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(&format!("-{name}.")))
        .collect();
    assert!(left.is_empty(), "left at B after the mirror: {left:?}");

    // A `vm migrate` ended (SIGTERM) after switchover, while the disk follows at 4 MiB/s:
    // the VM runs at B; the same command again finishes the move.
    let mut cut = mvc_on_frontend(
        &sl,
        &mvc,
        180,
        &migrate_args("m", &name, "B", &["--disk-rate", "4194304"]),
    )
    .stdout(std::process::Stdio::null())
    .stderr(std::process::Stdio::null())
    .spawn()
    .expect("vm migrate to be cut short");
    assert!(
        wait_until(Duration::from_secs(60), Duration::from_millis(100), copying),
        "no disk copy seen at B"
    );
    // B's disk proxy killed (SIGKILL) while it copies: B's agent starts it again, it
    // resumes from its bitmap, and the guest (its I/O waits meanwhile) reads its
    // pattern back below.
    let proxy_pid = || {
        std::fs::read_dir(b_state.join("run"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.display()
                    .to_string()
                    .ends_with(&format!("-{name}.xnbd.pid"))
            })
            .and_then(|p| alive_pid(&p, &b_state))
    };
    let old_proxy = proxy_pid().expect("B's disk proxy");
    // This test's agent's proxy (its command line names this run's directory).
    lab::sys::kill(old_proxy, libc::SIGKILL).expect("SIGKILL to B's proxy");
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(100), || {
            proxy_pid().is_some_and(|p| p != old_proxy)
        }),
        "B's proxy not started again"
    );
    // The command's record says the disk follows before it is cut short.
    let recorded_disk = || {
        sl.ctl_json(&["vm", "migrations"])
            .is_ok_and(|r| r.to_string().contains("\"phase\":\"disk\""))
    };
    wait_until(
        Duration::from_secs(30),
        Duration::from_millis(100),
        recorded_disk,
    );
    // The `timeout` process this test started, which passes the signal on to `mvc`.
    lab::sys::kill(cut.id(), libc::SIGTERM).expect("SIGTERM to the cut-short migrate");
    let _ = cut.wait();
    let rec = sl.ctl_json(&["vm", "migrations"]).expect("migrations");
    assert!(rec.to_string().contains("\"phase\":\"disk\""), "{rec}");
    let fin = sl
        .ctl_json(&["vm", "migrate", "m", &name, "--to", "B"])
        .expect("finishing the move");
    eprintln!("move finished by a second command: {fin}");
    assert_eq!(fin["phase"], "done", "{fin}");
    // The restarted proxy fetched no more than the disk holds, and nothing was lost.
    assert!(
        fin["disk_bytes"].as_u64() <= fin["disk_total"].as_u64(),
        "{fin}"
    );
    let (_, bcon) = vm_console(&sl, &b_state, &name);
    assert_eq!(
        pattern_sum(&bcon, false),
        sum,
        "pattern changed by the proxy's restart"
    );
    assert!(c_left("c").is_empty(), "left at C: {:?}", c_left("c"));
    let list = sl
        .ctl_json(&["vm", "list", "--cluster", "m"])
        .expect("vm list");
    assert!(list.to_string().contains("\"site\":\"B\""), "{list}");
    let again = sl.ctl(&["vm", "migrate", "m", &name, "--to", "B"]);
    assert!(again.is_err(), "a finished move was finished again");

    // A migration that cannot happen (site A runs netns VMs) leaves it running at B.
    let refused = sl.ctl(&["vm", "migrate", "m", &name, "--to", "A"]);
    assert!(refused.is_err(), "migration to a netns site succeeded");
    lab::wait_ping(&sl.lab, &a_ns, ip, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("A's VM -> {ip} after a refused migration: {e}"));

    sl.ctl(&["cluster", "destroy", "m"]).expect("destroy");
    assert!(!img.exists(), "disk {} left", img.display());
}
