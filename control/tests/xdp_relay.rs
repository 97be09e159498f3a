//! The supernode's XDP relay and junk filter (`mvc supernode --xdp-relay IFACE`) in the
//! three-site netns lab, with UDP between sites B and C blocked so that their traffic
//! goes through the supernode at site A. Needs root; otherwise prints that it was skipped.

use std::net::{SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use lab::overlay::{self as ov, EdgeOpts, Mvc, COMMUNITY, SECRET, SUPERNODE_PORT};
use lab::{Lab, Topology};
use serde_json::Value;

const UP: Duration = Duration::from_secs(20);

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}

fn xdp(st: &Value, key: &str) -> u64 {
    st["xdp_relay"][key].as_u64().unwrap_or(0)
}

fn xdp_drop(st: &Value, reason: &str) -> u64 {
    st["xdp_relay"]["drops"][reason].as_u64().unwrap_or(0)
}

fn throw(lab: &Lab, ns: &str, dst: SocketAddrV4, datagram: &[u8], n: usize) {
    lab.in_ns(ns, || {
        let s = UdpSocket::bind("0.0.0.0:0").unwrap();
        for i in 0..n {
            s.send_to(datagram, dst).unwrap();
            if i % 5 == 4 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    })
    .unwrap();
}

/// Relayed ping and iperf3 between B and C go through the XDP program (its counter,
/// not userspace's, grows); junk for the supernode's port is dropped there and counted
/// by reason, never reaching the socket; a relay datagram naming edge B but sent from
/// another address is dropped as spoofed and not relayed; ping still works after.
#[test]
fn xdp_relay_relays_filters_junk_and_refuses_spoofed_sources() {
    if !lab::is_root() {
        lab::skip(
            "xdp_relay_relays_filters_junk_and_refuses_spoofed_sources",
            "needs root for network namespaces",
        );
        return;
    }
    let lab = Lab::new("xr").expect("lab");
    let mvc = Mvc {
        bin: std::env::var_os("MVC_TEST_BIN")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mvc")), PathBuf::from),
    };
    let t = Topology::three_sites(&lab, 1).unwrap();
    let (a, b, c) = (t.site("a"), t.site("b"), t.site("c"));
    t.block_udp(&lab, b, c, None).unwrap();
    // Native XDP_TX on a veth delivers to the peer only when the peer runs an XDP
    // program of its own (the kernel's veth_xdp_flush kicks the peer only then): the
    // internet router's end of site A's uplink (named after the site's number) gets the
    // relay program with a configuration that matches nothing (port 0), which passes
    // every frame on.
    let peer = format!("s{}", a.idx);
    let _peer_prog = lab
        .in_ns(&t.inet, || {
            dataplane::xdp::XdpRelay::attach(
                &peer,
                "0.0.0.0:0".parse().unwrap(),
                dataplane::xdp::ModeRequest::Native,
            )
        })
        .unwrap()
        .unwrap();
    let sn_addr = SocketAddrV4::new(a.public_ip, SUPERNODE_PORT);
    let sn = mvc
        .supernode_with(
            &lab,
            &a.frontend,
            sn_addr,
            "supernode",
            &["--xdp-relay", "eth0", "--xdp-relay-mode", "native"],
        )
        .unwrap();
    let mut edges = Vec::new();
    for s in [a, b, c] {
        t.reset_tap(&lab, s).unwrap();
        let o = EdgeOpts::new(s, COMMUNITY, SECRET, &[sn_addr]);
        edges.push(mvc.edge(&lab, s, &o).unwrap());
    }
    let (vb, vc) = (&b.vms[0], &c.vms[0]);
    let status = || mvc.supernode_status(&lab, &sn).expect("supernode status");
    if let Err(e) = lab::wait_ping(&lab, &vb.ns, vc.ip, UP) {
        panic!("{e}: {}", status());
    }
    lab.wait_until("3 edges in the XDP map", Duration::from_secs(5), || {
        xdp(&status(), "edges") >= 3
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status()));
    let st0 = status();
    assert_eq!(st0["xdp_relay"]["mode"].as_str(), Some("native"), "{st0}");

    let p = lab::ping(&lab, &vb.ns, vc.ip, 20, 0.05).unwrap();
    assert!(p.received + 1 >= p.sent, "relayed ping: {p:?}");
    let bps = lab::iperf(&lab, &vb.ns, &vc.ns, vc.ip, 2).unwrap();
    assert!(bps > 1e6, "relayed iperf3: {bps} b/s");
    // Published every PUBLISH interval: wait for the counters to catch up.
    std::thread::sleep(Duration::from_millis(600));
    let st1 = status();
    let by_xdp = xdp(&st1, "relayed_packets") - xdp(&st0, "relayed_packets");
    let by_user =
        st1["relayed_packets"].as_u64().unwrap() - st0["relayed_packets"].as_u64().unwrap();
    assert!(
        by_xdp > 1000 && by_xdp > 10 * by_user,
        "XDP relayed {by_xdp}, userspace {by_user}: {st1}"
    );
    for e in [&edges[1], &edges[2]] {
        assert_eq!(
            mvc.path_to(&lab, e, if e.name == "b" { "c" } else { "b" })
                .as_deref(),
            Some("relayed")
        );
    }

    // Junk, from the internet router's namespace.
    let n = 50;
    throw(&lab, &t.inet, sn_addr, &[1, 4, 0, 0, 9, 9, 9, 9], n);
    throw(&lab, &t.inet, sn_addr, &[2, 4, 0, 0, 9, 9, 9, 9], n);
    throw(&lab, &t.inet, sn_addr, &[2, 0x33, 0, 0, 9, 9, 9, 9], n);
    let mut unknown = vec![2, 4, 0, 0];
    unknown.extend([7u8; 32]);
    unknown.extend([2, 0x12, 0, 0]);
    unknown.extend([0u8; 28]);
    throw(&lab, &t.inet, sn_addr, &unknown, n);

    // Spoofed: B's community and id, to C, from the internet router's address.
    let comm = &st1["communities"][0];
    let id_of = |name: &str| {
        comm["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| hex(e["id"].as_str().unwrap()))
            .unwrap_or_else(|| panic!("{name} not registered: {st1}"))
    };
    let mut spoofed = vec![2, 4, 0, 0];
    spoofed.extend(hex(comm["id"].as_str().unwrap()));
    spoofed.extend(id_of("b"));
    spoofed.extend(id_of("c"));
    spoofed.extend([2, 0x12, 0, 0, 0, 0, 0, 1]);
    spoofed.extend([0u8; 40]);
    throw(&lab, &t.inet, sn_addr, &spoofed, n);
    std::thread::sleep(Duration::from_millis(600));
    let st2 = status();
    for reason in [
        "bad_version",
        "truncated",
        "unknown_type",
        "unknown_edge",
        "spoofed_source",
    ] {
        assert!(
            xdp_drop(&st2, reason) >= n as u64,
            "{reason}: {}",
            st2["xdp_relay"]
        );
    }
    assert_eq!(
        xdp(&st2, "relayed_packets"),
        xdp(&st1, "relayed_packets"),
        "nothing relayed while no VM sent: {st2}"
    );
    // None of it reached the socket.
    for reason in [
        "bad_version",
        "truncated",
        "unknown_type",
        "relay_unknown_src",
        "unknown_community",
        "relay_src_mismatch",
    ] {
        assert_eq!(
            st2["drops"][reason].as_u64().unwrap_or(0),
            st1["drops"][reason].as_u64().unwrap_or(0),
            "{reason} reached userspace: {st2}"
        );
    }

    let p = lab::ping(&lab, &vb.ns, vc.ip, 10, 0.05).unwrap();
    assert!(p.received + 1 >= p.sent, "relayed ping after junk: {p:?}");
    let table = mvc
        .status_table(&lab, &a.frontend, "supernode", &sn.sock)
        .unwrap();
    assert!(table.contains("xdp relay on eth0 (native"), "{table}");
    assert!(
        lab.running(&sn.proc),
        "supernode died: {}",
        lab.log(&sn.proc)
    );
    for e in &edges {
        assert!(
            lab.running(&e.proc),
            "edge {} died: {}",
            e.name,
            lab.log(&e.proc)
        );
    }
    let _: &ov::Edge = &edges[0];
}
