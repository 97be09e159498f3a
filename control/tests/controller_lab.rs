//! The controller end to end in a network-namespace lab, its main test: three
//! sites (A public, B and C behind NAT) with an `mvc agent` each, a cluster with
//! computes 3:2:2 made by one `mvc cluster create --start`, every compute leased by the
//! frontend VM's DHCP server over the overlay, all nodes pinging each other, an
//! `mpirun` across the hostfile, an agent that goes down and comes back, and a clean
//! destroy. Needs root; otherwise prints that it was skipped.
use control::demo::{pick_overlay, SiteLab, MPI_PROGRAM};
use std::path::{Path, PathBuf};
use std::time::Duration;

fn vms(cl: &serde_json::Value) -> Vec<(String, String, String, String, String)> {
    cl["vms"]
        .as_array()
        .expect("vms")
        .iter()
        .map(|v| {
            (
                v["name"].as_str().unwrap().to_string(),
                v["role"].as_str().unwrap().to_string(),
                v["site"].as_str().unwrap().to_string(),
                v["ip"].as_str().unwrap().to_string(),
                v["mac"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn three_site_cluster_with_dhcp_ping_mpi_and_agent_loss() {
    if !lab::is_root() {
        lab::skip(
            "three_site_cluster_with_dhcp_ping_mpi_and_agent_loss",
            "needs root for network namespaces",
        );
        return;
    }
    let mvc = PathBuf::from(env!("CARGO_BIN_EXE_mvc"));
    let overlay = pick_overlay(
        &mvc,
        &std::env::var("MVC_TEST_OVERLAY").unwrap_or_else(|_| "auto".into()),
    );
    eprintln!("overlay under test: {overlay}");
    let mut sl = SiteLab::new(&mvc, &overlay, 12, 12).expect("lab");
    sl.add_sites().expect("site add");

    // One command: allocation at three sites, overlay, VMs, DHCP leases.
    let cl = sl
        .ctl_json(&[
            "cluster",
            "create",
            "t",
            "--sites",
            "A:B:C",
            "--computes",
            "3:2:2",
            "--memory",
            "256",
            "--frontend-memory",
            "256",
            "--start",
        ])
        .expect("cluster create");
    assert_eq!(cl["state"], "running");
    let nodes = vms(&cl);
    assert_eq!(nodes.len(), 8);
    let count = |s: &str| {
        nodes
            .iter()
            .filter(|n| n.2 == s && n.1 == "compute")
            .count()
    };
    assert_eq!((count("A"), count("B"), count("C")), (3, 2, 2));

    // Each compute holds its address, and the frontend's dnsmasq lease file has its MAC:
    // the address came from the frontend VM over the overlay, also at the NATed sites.
    let fe = nodes
        .iter()
        .find(|n| n.1 == "frontend")
        .expect("frontend")
        .clone();
    let leases_path = sl
        .vm_file("A", &fe.0, "leases")
        .expect("frontend lease file");
    let leases = std::fs::read_to_string(&leases_path).expect("frontend lease file");
    let ns_of = sl.vm_handles("t").expect("handles");
    let ns_of = |vm: &str| ns_of[vm].strip_prefix("netns:").unwrap().to_string();
    for (name, role, site, ip, mac) in &nodes {
        let ns = ns_of(name);
        let a = lab::run(&["ip", "-n", &ns, "-4", "-o", "addr", "show", "dev", "eth0"])
            .expect("ip addr");
        assert!(
            a.stdout.contains(&format!("inet {ip}/24")),
            "{name} at {site}: {}",
            a.stdout
        );
        if role == "compute" {
            assert!(
                leases.contains(mac.as_str()) && leases.contains(ip.as_str()),
                "{name} ({mac}) not in frontend leases:\n{leases}"
            );
        }
    }

    // All nodes ping each other over the overlay.
    for (from, _, _, _, _) in &nodes {
        let ns = ns_of(from);
        for (to, _, _, ip, _) in &nodes {
            if from != to {
                lab::wait_ping(&sl.lab, &ns, ip.parse().unwrap(), Duration::from_secs(15))
                    .unwrap_or_else(|e| panic!("{from} -> {to} ({ip}): {e}"));
            }
        }
    }

    // Status: every site up with its overlay running; with mvc's edges, each site's
    // edge reports the other two sites' edges as peers.
    let st = sl.ctl_json(&["cluster", "status", "t"]).expect("status");
    for s in st["sites"].as_array().unwrap() {
        assert_eq!(s["reachable"], true, "{s}");
        assert_eq!(s["overlay_up"], true, "{s}");
        if overlay == "mvc" {
            assert_eq!(s["peers"].as_array().unwrap().len(), 2, "{s}");
        }
    }
    assert!(
        st["vms"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["live"] == "running"),
        "{st}"
    );

    // Topology: every site pair measured.
    let topo = sl
        .ctl_json(&["cluster", "topology", "t"])
        .expect("topology");
    let rtts = topo["rtt_ms"].as_array().unwrap();
    assert_eq!(rtts.len(), 6);
    assert!(
        rtts.iter()
            .all(|r| r["ms"].as_f64().is_some_and(|ms| ms > 0.0)),
        "{rtts:?}"
    );
    let slurm = sl.ctl(&["cluster", "topology", "t", "--slurm"]).unwrap();
    assert!(
        slurm.contains("SwitchName=site-B Nodes=t-c4,t-c5"),
        "{slurm}"
    );
    // With --json, the Slurm text under a key that says what it is.
    let j = sl
        .ctl_json(&["cluster", "topology", "t", "--slurm"])
        .expect("topology --slurm --json");
    let conf = j["slurm_topology_conf"].as_str().unwrap_or_default();
    assert!(conf.contains("SwitchName=site-B Nodes=t-c4,t-c5"), "{j}");

    // An MPI job across the hostfile, launched from the frontend VM.
    if Path::new("/usr/lib/python3/dist-packages/mpi4py").exists() {
        let prog = sl.lab.dir().join("allreduce.py");
        std::fs::write(&prog, MPI_PROGRAM).unwrap();
        let out = sl
            .mpirun("t", 8, &["/usr/bin/python3", &prog.display().to_string()])
            .expect("mpirun");
        assert!(
            out.contains("allreduce(sum of ranks) = 28 (expected 28)"),
            "{out}"
        );
        for (name, ..) in &nodes {
            assert!(out.contains(name.as_str()), "{name} missing from {out}");
        }
    } else {
        lab::skip(
            "three_site_cluster_with_dhcp_ping_mpi_and_agent_loss (MPI allreduce step)",
            "python3-mpi4py is not installed: mpirun runs `hostname` on every node instead",
        );
        let out = sl.mpirun("t", 8, &["hostname"]).expect("mpirun");
        for (name, ..) in &nodes {
            assert!(
                out.lines().any(|l| l.trim() == name),
                "{name} missing from {out}"
            );
        }
    }

    // One VM stopped and started again keeps its MAC and address.
    let c4 = sl.ctl_json(&["vm", "stop", "t-c4"]).expect("vm stop");
    assert_eq!(c4["state"], "stopped");
    assert!(!sl
        .leftover_vm_namespaces()
        .iter()
        .any(|n| n.ends_with("t-c4")));
    let c4 = sl.ctl_json(&["vm", "start", "t-c4"]).expect("vm start");
    assert_eq!(c4["state"], "running");
    let c4_ip = c4["ip"].as_str().unwrap().to_string();
    let fe_ns = ns_of("t-fe");
    lab::wait_ping(
        &sl.lab,
        &fe_ns,
        c4_ip.parse().unwrap(),
        Duration::from_secs(20),
    )
    .expect("frontend -> t-c4 after vm start");

    // Site C's agent goes down: status says so, operations there fail clearly.
    sl.stop_agent("C");
    let st = sl
        .ctl_json(&["cluster", "status", "t"])
        .expect("status with a site down");
    let c = st["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == "C")
        .unwrap()
        .clone();
    assert_eq!(c["reachable"], false, "{st}");
    assert!(
        c["error"]
            .as_str()
            .unwrap()
            .contains("site C's agent at 198.18.3.2:7000 refused the connection (is it running?)"),
        "{c}"
    );
    let o = sl.ctl_output(&["vm", "stop", "t-c6"]).unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.lines().count() == 1
            && err.contains("site C's agent at")
            && err.contains("is it running?"),
        "{err}"
    );
    // The agent stopped its VMs on the way down.
    assert!(!sl
        .leftover_vm_namespaces()
        .iter()
        .any(|n| n.ends_with("t-c6")));

    // Back up: status shows the VMs stopped; `cluster start` brings them back with leases.
    sl.restart_agent("C").expect("agent C restart");
    let st = sl.ctl_json(&["cluster", "status", "t"]).unwrap();
    let c6 = st["vms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "t-c6")
        .unwrap()
        .clone();
    assert_eq!(c6["live"], "stopped", "{st}");
    sl.ctl(&["cluster", "start", "t"]).expect("restart cluster");
    let c6_ip = &nodes.iter().find(|n| n.0 == "t-c6").unwrap().3;
    let ns = ns_of("t-fe");
    lab::wait_ping(
        &sl.lab,
        &ns,
        c6_ip.parse().unwrap(),
        Duration::from_secs(20),
    )
    .expect("frontend -> t-c6 after restart");

    // Site B's agent crashes (SIGKILL), leaving its VMs and edge running; restarted,
    // it adopts them as they are (same namespaces, no restart), and `cluster start`
    // finds the site up.
    let before = ns_of("t-c5");
    sl.kill_agent("B");
    assert!(sl.leftover_vm_namespaces().contains(&before));
    sl.restart_agent("B").expect("agent B restart");
    assert!(sl.leftover_vm_namespaces().contains(&before));
    let c5_ip = &nodes.iter().find(|n| n.0 == "t-c5").unwrap().3;
    lab::wait_ping(
        &sl.lab,
        &ns,
        c5_ip.parse().unwrap(),
        Duration::from_secs(20),
    )
    .expect("frontend -> t-c5 after agent crash, adopted");
    let st = sl.ctl_json(&["cluster", "status", "t"]).unwrap();
    let b = st["sites"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["site"] == "B")
        .unwrap()
        .clone();
    assert_eq!(b["overlay_up"], true, "{st}");
    assert!(
        st["vms"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["site"] == "B")
            .all(|v| v["live"] == "running"),
        "{st}"
    );
    sl.ctl(&["cluster", "start", "t"])
        .expect("start after crash");
    assert_eq!(sl.vm_ns("t", "t-c5").unwrap(), before);
    lab::wait_ping(
        &sl.lab,
        &ns,
        c5_ip.parse().unwrap(),
        Duration::from_secs(20),
    )
    .expect("frontend -> t-c5 after agent crash");

    // Destroy: nothing left at any site.
    sl.ctl(&["cluster", "destroy", "t"]).expect("destroy");
    assert!(
        sl.leftover_vm_namespaces().is_empty(),
        "{:?}",
        sl.leftover_vm_namespaces()
    );
    let list = sl.ctl_json(&["cluster", "list"]).unwrap();
    assert_eq!(list.as_array().unwrap().len(), 0);
    let sites = sl.ctl_json(&["site", "list"]).unwrap();
    assert_eq!(sites.as_array().unwrap().len(), 3);
}
