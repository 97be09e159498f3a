//! Live migration of a libvirt domain between two NATed sites: sites B and C run their
//! agents with `--driver libvirt`, each with a libvirtd of its own in its namespace
//! (`common::libvirtd`), C's agent accepting migrations. B's compute writes a pattern to
//! its disk and moves to C with `mvc vm migrate` (libvirt's peer-to-peer tunnelled
//! migration through the agents' tunnel, the disk after it through `xnbd proxy`) while
//! A's compute pings it. First C's agent is killed (SIGKILL) while the memory is on its
//! way: the migration fails, the domain runs on at B, and C's agent, restarted, keeps
//! nothing of it. Then the move: the guest reads its pattern back at C, B's libvirtd
//! has no domain of it (`virsh list --all`) and B's agent no file, and `cluster status`
//! places it at C. Needs root; otherwise prints that it was skipped.
mod common;

use common::libvirtd::{libvirt_agent_args, libvirt_lab, Libvirtd};
use common::{
    assert_moved_to_c_while_pinged, compute_at, create_b_pinged_from_a, has_file_ending, md5_of,
    migrate_args, migrate_killing_c, spawn_ping, wait_until,
};
use lab::sites::SiteLab;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The md5 sum of the pattern (4 MiB at 1 MiB) as the guest behind console `con` reads
/// it now, its page cache dropped first.
fn pattern_sum(con: &Path) -> String {
    let out = lab::sites::guest_console(
        con,
        "sync; echo 3 > /proc/sys/vm/drop_caches; \
         dd if=/dev/vda bs=64k skip=16 count=64 2>/dev/null | md5sum",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    md5_of(&out)
}

/// Files of the agent with state `state` whose names contain `-<vm>.` (its run
/// directory and disks).
fn files_of(state: &Path, vm: &str) -> Vec<String> {
    ["run", "disks"]
        .iter()
        .filter_map(|d| std::fs::read_dir(state.join(d)).ok())
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(&format!("-{vm}.")))
        .collect()
}

#[test]
fn libvirt_domain_migrates_between_nated_sites_with_its_disk_while_pinged() {
    let name = "libvirt_domain_migrates_between_nated_sites_with_its_disk_while_pinged";
    let Some((mvc, xnbd, cache, overlay, lab, topo)) = libvirt_lab(name, "mvlm") else {
        return;
    };
    let t0 = Instant::now();
    let mut lvs = BTreeMap::new();
    let mut extra = BTreeMap::new();
    for (i, site) in ["B", "C"].into_iter().enumerate() {
        let ns = topo.sites[i + 1].frontend.clone();
        let sock_dir = PathBuf::from(format!("/run/mvc/{}{site}", lab.prefix()));
        let lv = Libvirtd::start(&ns, &lab.dir().join(format!("libvirt-{site}")), &sock_dir);
        extra.insert(
            site.to_string(),
            libvirt_agent_args(&lv, &cache, &xnbd, 32, site == "C"),
        );
        lvs.insert(site, lv);
    }
    eprintln!(
        "libvirtds up in B's and C's namespaces in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let mut sl = SiteLab::start(lab, topo, &mvc, &overlay, 8, 8, &extra).expect("site lab");
    let (b_state, c_state) = (sl.agents["B"].state.clone(), sl.agents["C"].state.clone());
    sl.add_sites().expect("site add");
    // C's own compute is not needed (C holds the cluster's overlay): stopped to spare
    // the CPU.
    let (cl, ip, a_ns) = create_b_pinged_from_a(&sl, "v");
    eprintln!(
        "cluster with libvirt domains at B and C started, B's pinged from A, in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let vm = compute_at(&cl, "B")["name"].as_str().unwrap().to_string();
    let (lb, lc) = (&lvs["B"], &lvs["C"]);
    let doms = lb.domains();
    assert_eq!(doms.len(), 1, "{doms:?}");
    let bdom = doms[0].clone();
    let bcon = lb.sock_dir.join(format!("{bdom}.console"));

    // The pattern: 4 MiB of random data at 1 MiB, and its sum as the guest reads it.
    lab::sites::guest_console(
        &bcon,
        "dd if=/dev/urandom of=/dev/vda bs=64k seek=16 count=64 conv=fsync 2>/dev/null",
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let sum = pattern_sum(&bcon);

    // C's agent killed (SIGKILL) while the memory is on its way (capped at 1 MiB/s):
    // the migration fails, the domain runs on at B; C's agent, restarted, removes what
    // it had made for it.
    let c_pid = control::agent::running_agent(&c_state).expect("C's agent pid");
    let b_run = b_state.join("run");
    migrate_killing_c(
        &mut sl,
        &migrate_args("v", &vm, "C", &["--rate", "1048576", "--timeout", "60"]),
        c_pid,
        || has_file_ending(&b_run, ".lvd"),
        Duration::from_secs(2),
    );
    assert_eq!(lb.domains(), vec![bdom.clone()], "B's domain gone");
    assert!(
        wait_until(Duration::from_secs(30), Duration::from_millis(200), || lb
            .virsh(&["domstate", &bdom])
            .is_some_and(|s| s.trim() == "running")),
        "B's domain not running after the failed migration"
    );
    assert!(lc.domains().is_empty(), "left at C: {:?}", lc.domains());
    assert!(
        files_of(&c_state, &vm).is_empty(),
        "left at C: {:?}",
        files_of(&c_state, &vm)
    );
    lab::wait_ping(&sl.lab, &a_ns, ip, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("A's VM -> {ip} after C's agent died: {e}"));
    sl.ctl(&["cluster", "start", "v", "--lease-timeout", "300"])
        .expect("cluster start after C's agent came back");
    sl.ctl_json(&["vm", "stop", compute_at(&cl, "C")["name"].as_str().unwrap()])
        .expect("stop C's own compute again");
    eprintln!("failed move undone at {:.1} s", t0.elapsed().as_secs_f64());

    // The move, while A's compute pings it (every 50 ms, bounded: 20 s at most).
    let ping = spawn_ping(&a_ns, ip, "0.05", 300, 20);
    let t1 = Instant::now();
    let mig = sl
        .ctl_json(&["vm", "migrate", "v", &vm, "--to", "C"])
        .expect("vm migrate");
    eprintln!("migrated in {:.1} s: {mig}", t1.elapsed().as_secs_f64());
    assert_moved_to_c_while_pinged(&sl, &mig, ping, (60, "3 s"), &a_ns, ip);

    // At C: one running domain of C's agent, whose guest reads its pattern back.
    let doms = lc.domains();
    assert_eq!(doms.len(), 1, "{doms:?}");
    let cdom = doms[0].clone();
    assert!(cdom.starts_with(&format!("{}C-", sl.vm_prefix)), "{cdom}");
    assert_eq!(lc.virsh(&["domstate", &cdom]).unwrap().trim(), "running");
    let xml = lc.virsh(&["dumpxml", &cdom]).unwrap();
    assert!(
        xml.contains(&format!("owner=\"{}\"", c_state.display())),
        "{xml}"
    );
    let ccon = lc.sock_dir.join(format!("{cdom}.console"));
    assert_eq!(pattern_sum(&ccon), sum, "pattern changed by the migration");

    // B: no domain of it in its libvirtd, no file of it at its agent.
    assert!(lb.domains().is_empty(), "left at B: {:?}", lb.domains());
    assert!(
        files_of(&b_state, &vm).is_empty(),
        "left at B: {:?}",
        files_of(&b_state, &vm)
    );
    // The store places it at C.
    let st = sl.ctl_json(&["cluster", "status", "v"]).expect("status");
    let row = st["vms"]
        .as_array()
        .and_then(|v| v.iter().find(|r| r["name"] == vm.as_str()))
        .cloned()
        .unwrap_or_else(|| panic!("{vm} not in {st}"));
    assert_eq!(row["site"], "C", "{st}");
    eprintln!("checked at {:.1} s", t0.elapsed().as_secs_f64());
    sl.ctl(&["cluster", "destroy", "v"]).expect("destroy");
    assert!(lc.domains().is_empty(), "left at C: {:?}", lc.domains());
}
