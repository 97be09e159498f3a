//! The qemu VM driver in the three-site lab: site C (behind NAT) runs its agent with
//! `--driver qemu`, so its compute is a real qemu-system-x86_64 VM (KVM when usable,
//! TCG otherwise) booting the built guest, its NIC a TAP on the cluster bridge and its
//! disk served by `xnbd serve` over NBD. The VM must get its DHCP lease from the
//! frontend VM at site A over the overlay, answer ping from site B's VM, ping the other
//! sites itself (`cluster topology`), and write its boot marker through xnbd into its
//! disk image; stopped and started again it boots from the same disk, as it does after
//! its agent crashed and came back (the restarted agent ends the orphaned qemu and xnbd
//! by pid). Everything (qemu, xnbd, TAPs, disks) is gone after `cluster destroy`. Needs root; otherwise prints
//! that it was skipped.
mod common;

use common::{alive_pid, compute_at, links, qemu_lab_at_c, wait_until};
use std::path::Path;
use std::time::{Duration, Instant};

/// The process has exited (an orphan may stay a zombie until init reaps it).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(st) => st
            .rsplit_once(')')
            .is_some_and(|(_, rest)| matches!(rest.trim_start().chars().next(), Some('Z' | 'X'))),
    }
}

fn disk_marker(img: &Path) -> String {
    let b = std::fs::read(img).unwrap_or_default();
    let first = &b[..b.len().min(512)];
    String::from_utf8_lossy(first)
        .trim_end_matches('\0')
        .trim()
        .to_string()
}

#[test]
fn qemu_vm_at_nated_site_gets_lease_answers_ping_and_writes_through_xnbd() {
    if !lab::is_root() {
        lab::skip(
            "qemu_vm_at_nated_site_gets_lease_answers_ping_and_writes_through_xnbd",
            "needs root for network namespaces and TAPs",
        );
        return;
    }
    let (mut sl, c_state, _procs) = qemu_lab_at_c();
    let c_ns = sl.agents["C"].ns.clone();

    let t0 = Instant::now();
    let cl = sl
        .ctl_json(&[
            "cluster",
            "create",
            "q",
            "--sites",
            "A:B:C",
            "--computes",
            "1:1:1",
            "--memory",
            "256",
            "--frontend-memory",
            "256",
            "--start",
            "--lease-timeout",
            "150",
        ])
        .expect("cluster create");
    eprintln!(
        "cluster with a qemu VM at C started and leased in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    assert_eq!(cl["state"], "running");
    let (qvm, bvm) = (compute_at(&cl, "C"), compute_at(&cl, "B"));
    let qname = qvm["name"].as_str().unwrap().to_string();
    // Its files at C are named by C's agent (`qemu:<tap>:<local name>`).
    let handles = sl.vm_handles("q").expect("handles");
    let qlocal = handles[&qname].rsplit(':').next().unwrap().to_string();
    let qip: std::net::Ipv4Addr = qvm["ip"].as_str().unwrap().parse().unwrap();
    let qmac = qvm["mac"].as_str().unwrap().to_string();
    let fe = cl["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["role"] == "frontend")
        .unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string();

    // The lease came from the frontend's dnsmasq at A, over the overlay, through C's NAT.
    let leases = std::fs::read_to_string(
        sl.vm_file("A", &fe, "leases")
            .expect("frontend lease file at A"),
    )
    .expect("frontend lease file");
    assert!(
        leases.contains(&qmac) && leases.contains(&qip.to_string()),
        "{qname} ({qmac}) not in frontend leases:\n{leases}"
    );
    let console =
        std::fs::read_to_string(c_state.join("run").join(format!("{qlocal}.console.log")))
            .unwrap_or_default();
    assert!(console.contains(&format!("MVC-LEASE {qip}")), "{console}");

    // A real VM: qemu runs, with the MAC the controller allocated, its TAP on the bridge.
    let qpid = alive_pid(
        &c_state.join("run").join(format!("{qlocal}.qemu.pid")),
        &c_state,
    )
    .expect("qemu running");
    let cmdline = String::from_utf8_lossy(&std::fs::read(format!("/proc/{qpid}/cmdline")).unwrap())
        .replace('\0', " ");
    assert!(cmdline.contains(&format!("mac={qmac}")), "{cmdline}");
    assert!(cmdline.contains("driver=nbd,"), "{cmdline}");
    let tap_list = links(&c_ns, "mvq");
    assert_eq!(tap_list.len(), 1, "{tap_list:?}");
    let master = lab::run(&["ip", "-n", &c_ns, "-o", "link", "show", &tap_list[0]]).unwrap();
    assert!(master.stdout.contains("master mvb"), "{}", master.stdout);

    // Site B's VM reaches it over the overlay.
    let b_ns = sl
        .vm_ns("q", bvm["name"].as_str().unwrap())
        .expect("B's VM namespace");
    lab::wait_ping(&sl.lab, &b_ns, qip, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("B's VM -> qemu VM {qip}: {e}"));

    // Its disk is served by xnbd: the boot marker the guest wrote is in the image.
    let xpid = alive_pid(
        &c_state.join("run").join(format!("{qlocal}.xnbd.pid")),
        &c_state,
    )
    .expect("xnbd serving the disk");
    let img = c_state.join("disks").join(format!("{qlocal}.img"));
    assert_eq!(std::fs::metadata(&img).unwrap().len(), 64 << 20);
    wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        disk_marker(&img) == format!("MVC-DISK {qname} boot 1")
    });
    assert_eq!(disk_marker(&img), format!("MVC-DISK {qname} boot 1"));

    // Topology: the qemu VM pings the other sites from inside (through its console).
    let topo = sl
        .ctl_json(&["cluster", "topology", "q"])
        .expect("topology");
    let rtts = topo["rtt_ms"].as_array().unwrap();
    assert_eq!(rtts.len(), 6, "{topo}");
    assert!(
        rtts.iter()
            .all(|r| r["ms"].as_f64().is_some_and(|ms| ms > 0.0)),
        "{rtts:?}"
    );

    // Stop: qemu, xnbd and the TAP are gone; the disk stays.
    let st = sl.ctl_json(&["vm", "stop", &qname]).expect("vm stop");
    assert_eq!(st["state"], "stopped");
    for pid in [qpid, xpid] {
        assert!(gone(pid), "pid {pid} still runs after vm stop");
    }
    assert!(links(&c_ns, "mvq").is_empty(), "{:?}", links(&c_ns, "mvq"));
    assert!(img.exists());

    // Start again: same MAC and lease, and it booted from the same disk.
    sl.ctl_json(&["vm", "start", &qname]).expect("vm start");
    lab::wait_ping(&sl.lab, &b_ns, qip, Duration::from_secs(120))
        .unwrap_or_else(|e| panic!("B's VM -> qemu VM {qip} after restart: {e}"));
    wait_until(Duration::from_secs(20), Duration::from_millis(200), || {
        disk_marker(&img) == format!("MVC-DISK {qname} boot 2")
    });
    assert_eq!(disk_marker(&img), format!("MVC-DISK {qname} boot 2"));

    // C's agent crashes (SIGKILL): qemu and xnbd outlive it; restarted, the agent
    // adopts the running VM (same qemu, same TAP, no reboot) and `cluster start` finds
    // it running.
    let run_c = c_state.join("run");
    let qpid = alive_pid(&run_c.join(format!("{qlocal}.qemu.pid")), &c_state).expect("qemu");
    sl.kill_agent("C");
    assert!(alive_pid(&run_c.join(format!("{qlocal}.qemu.pid")), &c_state) == Some(qpid));
    sl.restart_agent("C").expect("agent C restart");
    assert!(!gone(qpid), "qemu {qpid} ended by the agent's restart");
    assert_eq!(links(&c_ns, "mvq").len(), 1, "{:?}", links(&c_ns, "mvq"));
    sl.ctl(&["cluster", "start", "q", "--lease-timeout", "150"])
        .expect("cluster start after agent crash");
    assert!(!gone(qpid), "qemu {qpid} restarted by cluster start");
    lab::wait_ping(&sl.lab, &b_ns, qip, Duration::from_secs(30))
        .unwrap_or_else(|e| panic!("B's VM -> qemu VM {qip} after agent crash: {e}"));
    assert_eq!(disk_marker(&img), format!("MVC-DISK {qname} boot 2"));

    // Destroy: no qemu, no xnbd, no TAP, no disk left at C.
    sl.ctl(&["cluster", "destroy", "q"]).expect("destroy");
    let run = c_state.join("run");
    for e in std::fs::read_dir(&run).unwrap().flatten() {
        let p = e.path();
        let n = p.display().to_string();
        if n.ends_with(".qemu.pid") || n.ends_with(".xnbd.pid") {
            assert!(alive_pid(&p, &c_state).is_none(), "{n} still runs");
        }
    }
    assert!(links(&c_ns, "mvq").is_empty(), "{:?}", links(&c_ns, "mvq"));
    assert!(!img.exists(), "disk {} left", img.display());
}
