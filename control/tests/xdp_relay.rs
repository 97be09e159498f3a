//! The supernode's XDP relay and junk filter (`mvc supernode --xdp-relay IFACE`) in the
//! three-site netns lab, with UDP between sites B and C blocked so that their traffic
//! goes through the supernode at site A. Needs root; otherwise prints that it was skipped.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::path::PathBuf;
use std::time::Duration;

use dataplane::xdp::{
    filter_tc_programs, relay_tc_programs, HookMode, ModeRequest, XdpFilter, XdpRelay,
};
use lab::overlay::{self as ov, EdgeOpts, Mvc, COMMUNITY, SECRET, SUPERNODE_PORT};
use lab::{Lab, Topology};
use serde_json::Value;

const UP: Duration = Duration::from_secs(20);

/// The overlay's wire version (docs/PROTOCOL.md), as the junk below carries it.
const V: u8 = dataplane::wire::VERSION;

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

/// Starts the supernode on site A's frontend (with the kernel relay on its uplink `eth0` in
/// `mode`, native, generic or tc, when `xdp`) and an edge per site. The returned relay handle
/// is the pass-through program on the uplink's peer (native mode only), which must live
/// as long as the supernode.
fn start(
    lab: &Lab,
    t: &Topology,
    mvc: &Mvc,
    xdp: bool,
    mode: &str,
) -> (ov::Supernode, Vec<ov::Edge>, Option<XdpRelay>) {
    let a = t.site("a");
    let sn_addr = SocketAddrV4::new(a.public_ip, SUPERNODE_PORT);
    // Native XDP_TX on a veth delivers to the peer only when the peer runs an XDP
    // program of its own (the kernel's veth_xdp_flush kicks the peer only then): the
    // internet router's end of site A's uplink (named after the site's number) gets the
    // relay program with a configuration that matches nothing (port 0), which passes
    // every frame on.
    let peer_prog = (xdp && mode == "native").then(|| {
        let peer = format!("s{}", a.idx);
        lab.in_ns(&t.inet, || {
            XdpRelay::attach(
                &peer,
                "0.0.0.0:0".parse().unwrap(),
                HookMode::Xdp(ModeRequest::Native),
            )
        })
        .unwrap()
        .unwrap()
    });
    let extra: &[&str] = if xdp {
        &["--xdp-relay", "eth0", "--xdp-relay-mode", mode]
    } else {
        &[]
    };
    let sn = mvc
        .supernode_with(lab, &a.frontend, sn_addr, "supernode", extra)
        .unwrap();
    let mut edges = Vec::new();
    for s in &t.sites {
        t.reset_tap(lab, s).unwrap();
        let o = EdgeOpts::new(s, COMMUNITY, SECRET, &[sn_addr]);
        edges.push(mvc.edge(lab, s, &o).unwrap());
    }
    (sn, edges, peer_prog)
}

/// Why a test of the XDP programs cannot run here: not root, or (with
/// `MVC_XDP_OPTIONAL=1`) the program not built into this build. As root, a
/// missing program fails the test otherwise (a CI without the BPF toolchain must
/// not pass silently), as in `dataplane/tests/xdp.rs`.
fn skip_reason() -> Option<String> {
    if !lab::is_root() {
        return Some("needs root for network namespaces".into());
    }
    if let Err(e @ dataplane::xdp::Error::NotBuilt(_)) = dataplane::xdp::availability() {
        if std::env::var("MVC_XDP_OPTIONAL").is_ok_and(|v| v == "1") {
            return Some(e.to_string());
        }
        panic!("{e} (set MVC_XDP_OPTIONAL=1 to skip)");
    }
    None
}

/// Starts the supernode on site A's frontend (no XDP) and the edges of sites A and B,
/// A's with the junk filter (`--xdp-filter eth0 --xdp-filter-mode MODE`) when `filter`
/// names a mode (`native`, `generic`, `tc` or `auto`).
fn start_filtered(
    lab: &Lab,
    t: &Topology,
    mvc: &Mvc,
    filter: Option<&str>,
) -> (ov::Supernode, Vec<ov::Edge>) {
    let (a, b) = (t.site("a"), t.site("b"));
    let sn_addr = SocketAddrV4::new(a.public_ip, SUPERNODE_PORT);
    let sn = mvc
        .supernode(lab, &a.frontend, sn_addr, "supernode")
        .unwrap();
    let mut edges = Vec::new();
    for s in [a, b] {
        t.reset_tap(lab, s).unwrap();
        let mut o = EdgeOpts::new(s, COMMUNITY, SECRET, &[sn_addr]);
        if let (Some(mode), "a") = (filter, s.name.as_str()) {
            o.extra = vec![
                "--xdp-filter".into(),
                "eth0".into(),
                "--xdp-filter-mode".into(),
                mode.into(),
            ];
        }
        edges.push(mvc.edge(lab, s, &o).unwrap());
    }
    (sn, edges)
}

/// The edges (and the supernode, when given) still run.
fn assert_running(lab: &Lab, sn: Option<&ov::Supernode>, edges: &[ov::Edge]) {
    if let Some(sn) = sn {
        assert!(
            lab.running(&sn.proc),
            "supernode died: {}",
            lab.log(&sn.proc)
        );
    }
    for e in edges {
        assert!(
            lab.running(&e.proc),
            "edge {} died: {}",
            e.name,
            lab.log(&e.proc)
        );
    }
}

/// The userspace drop counters for `reasons` in `after` are where they were in
/// `before`: none of that junk reached the `what`'s socket.
fn assert_drops_unchanged(before: &Value, after: &Value, reasons: &[&str], what: &str) {
    for reason in reasons {
        assert_eq!(
            after["drops"][reason].as_u64().unwrap_or(0),
            before["drops"][reason].as_u64().unwrap_or(0),
            "{reason} reached the {what}: {}",
            after["drops"]
        );
    }
}

fn test_bin() -> Mvc {
    Mvc {
        bin: std::env::var_os("MVC_TEST_BIN")
            .map_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_mvc")), PathBuf::from),
    }
}

/// Relayed ping and iperf3 between B and C go through the XDP program (its counter,
/// not userspace's, grows); junk for the supernode's port is dropped there and counted
/// by reason, never reaching the socket; a relay datagram naming edge B but sent from
/// another address is dropped as spoofed and not relayed, except the few the supernode
/// answers with a prompt to register; ping still works after.
#[test]
fn xdp_relay_relays_filters_junk_and_refuses_spoofed_sources() {
    relays_filters_junk_and_refuses_spoofed_sources(
        "xdp_relay_relays_filters_junk_and_refuses_spoofed_sources",
        "xr",
        "native",
    );
}

/// The same with the relay as a TC classifier (`--xdp-relay-mode tc`): the edges' GSO
/// batches are relayed whole by the kernel, with the same checks and counters.
#[test]
fn tc_relay_relays_filters_junk_and_refuses_spoofed_sources() {
    relays_filters_junk_and_refuses_spoofed_sources(
        "tc_relay_relays_filters_junk_and_refuses_spoofed_sources",
        "xt",
        "tc",
    );
}

/// The relay scenario of the two tests above, with the relay in `mode`.
fn relays_filters_junk_and_refuses_spoofed_sources(test: &str, prefix: &str, mode: &str) {
    if let Some(why) = skip_reason() {
        lab::skip(test, &why);
        return;
    }
    let lab = Lab::new(prefix).expect("lab");
    let mvc = test_bin();
    let t = Topology::three_sites(&lab, 1).unwrap();
    let (a, b, c) = (t.site("a"), t.site("b"), t.site("c"));
    t.block_udp(&lab, b, c, None).unwrap();
    let sn_addr = SocketAddrV4::new(a.public_ip, SUPERNODE_PORT);
    let (sn, edges, _peer_prog) = start(&lab, &t, &mvc, true, mode);
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
    assert_eq!(st0["xdp_relay"]["mode"].as_str(), Some(mode), "{st0}");

    let p = lab::ping(&lab, &vb.ns, vc.ip, 20, 0.05).unwrap();
    assert!(p.received + 1 >= p.sent, "relayed ping: {p:?}");
    let secs = 2;
    let bps = lab::iperf(&lab, &vb.ns, &vc.ns, vc.ip, secs).unwrap();
    assert!(bps > 1e6, "relayed iperf3: {bps} b/s");
    // Published every PUBLISH interval: wait for the counters to catch up.
    std::thread::sleep(Duration::from_millis(600));
    let st1 = status();
    let by_xdp = xdp(&st1, "relayed_packets") - xdp(&st0, "relayed_packets");
    let by_user =
        st1["relayed_packets"].as_u64().unwrap() - st0["relayed_packets"].as_u64().unwrap();
    assert!(
        by_xdp > 1000 && by_xdp > 10 * by_user,
        "kernel relayed {by_xdp}, userspace {by_user}: {st1}"
    );
    // What iperf3 moved went through the kernel's relay (sealed, so more bytes).
    let bytes_by_xdp = xdp(&st1, "relayed_bytes") - xdp(&st0, "relayed_bytes");
    let moved = bps * f64::from(secs) / 8.0;
    assert!(
        bytes_by_xdp as f64 >= 0.9 * moved,
        "kernel relayed {bytes_by_xdp} bytes, iperf3 moved {moved:.0}: {st1}"
    );
    for e in [&edges[1], &edges[2]] {
        assert_eq!(
            mvc.path_to(&lab, e, if e.name == "b" { "c" } else { "b" })
                .as_deref(),
            Some("relayed")
        );
    }

    // Junk, from the internet router's namespace; the first datagram carries an old
    // wire version.
    let n = 50;
    throw(&lab, &t.inet, sn_addr, &[1, 4, 0, 0, 9, 9, 9, 9], n);
    throw(&lab, &t.inet, sn_addr, &[V, 4, 0, 0, 9, 9, 9, 9], n);
    throw(&lab, &t.inet, sn_addr, &[V, 0x33, 0, 0, 9, 9, 9, 9], n);
    let mut unknown = vec![V, 4, 0, 0];
    unknown.extend([7u8; 32]);
    unknown.extend([V, 0x12, 0, 0]);
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
    let mut spoofed = vec![V, 4, 0, 0];
    spoofed.extend(hex(comm["id"].as_str().unwrap()));
    spoofed.extend(id_of("b"));
    spoofed.extend(id_of("c"));
    spoofed.extend([V, 0x12, 0, 0, 0, 0, 0, 1]);
    spoofed.extend([0u8; 40]);
    throw(&lab, &t.inet, sn_addr, &spoofed, n);
    std::thread::sleep(Duration::from_millis(600));
    let st2 = status();
    for reason in ["bad_version", "truncated", "unknown_type"] {
        assert!(
            xdp_drop(&st2, reason) >= n as u64,
            "{reason}: {}",
            st2["xdp_relay"]
        );
    }
    assert!(
        xdp_drop(&st2, "unknown_edge")
            + xdp_drop(&st2, "spoofed_source")
            + xdp(&st2, "passed_unknown_source")
            - xdp(&st1, "passed_unknown_source")
            >= 2 * n as u64,
        "{}",
        st2["xdp_relay"]
    );
    assert_eq!(
        xdp(&st2, "relayed_packets"),
        xdp(&st1, "relayed_packets"),
        "nothing relayed while no VM sent: {st2}"
    );
    // None of the junk reached the socket; of the relays from unvalidated sources (two
    // source addresses, one per batch), only what the supernode answers with a prompt
    // to register: one per address per 100 ms.
    assert_drops_unchanged(
        &st1,
        &st2,
        &["bad_version", "truncated", "unknown_type"],
        "supernode",
    );
    let passed = xdp(&st2, "passed_unknown_source") - xdp(&st1, "passed_unknown_source");
    let prompted = st2["prompts_sent"].as_u64().unwrap() - st1["prompts_sent"].as_u64().unwrap();
    let unvalidated = [
        "relay_unknown_src",
        "unknown_community",
        "relay_src_mismatch",
    ]
    .iter()
    .map(|r| st2["drops"][r].as_u64().unwrap_or(0) - st1["drops"][r].as_u64().unwrap_or(0))
    .sum::<u64>();
    assert!(
        prompted >= 2 && passed >= prompted && unvalidated == passed && passed <= 2 * n as u64 / 5,
        "passed {passed}, prompted {prompted}, dropped in userspace {unvalidated}: {st2}"
    );

    let p = lab::ping(&lab, &vb.ns, vc.ip, 10, 0.05).unwrap();
    assert!(p.received + 1 >= p.sent, "relayed ping after junk: {p:?}");
    let table = mvc
        .status_table(&lab, &a.frontend, "supernode", &sn.sock)
        .unwrap();
    assert!(
        table.contains(&format!("xdp relay on eth0 ({mode}")),
        "{table}"
    );
    assert_running(&lab, Some(&sn), &edges);
}

/// The `mvc_relay_tc` programs on the tc ingress of site A's uplink.
fn tc_programs(lab: &Lab, t: &Topology) -> Vec<u32> {
    lab.in_ns(&t.site("a").frontend, || relay_tc_programs("eth0"))
        .unwrap()
        .unwrap()
}

/// A supernode with the TC relay killed with SIGKILL leaves no program behind (the tcx
/// link dies with the process); a fresh start on the same interface attaches exactly one
/// and relays in the kernel again; a second supernode on the same interface is refused
/// the hook (it relays in userspace) instead of attaching a second program.
#[test]
fn tc_relay_after_a_killed_supernode_is_attached_once() {
    if let Some(why) = skip_reason() {
        lab::skip("tc_relay_after_a_killed_supernode_is_attached_once", &why);
        return;
    }
    let lab = Lab::new("xk").expect("lab");
    let mvc = test_bin();
    let t = Topology::three_sites(&lab, 1).unwrap();
    let (a, b, c) = (t.site("a"), t.site("b"), t.site("c"));
    t.block_udp(&lab, b, c, None).unwrap();
    let (vb, vc) = (&b.vms[0], &c.vms[0]);
    let (sn, edges, _) = start(&lab, &t, &mvc, true, "tc");
    lab::wait_ping(&lab, &vb.ns, vc.ip, UP).unwrap();
    let first = tc_programs(&lab, &t);
    assert_eq!(
        first.len(),
        1,
        "one program after the first start: {first:?}"
    );

    lab.kill(&sn.proc);
    lab.wait_until(
        "the killed supernode's program gone",
        Duration::from_secs(5),
        || tc_programs(&lab, &t).is_empty(),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", tc_programs(&lab, &t)));

    let sn_addr = SocketAddrV4::new(a.public_ip, SUPERNODE_PORT);
    let tc = ["--xdp-relay", "eth0", "--xdp-relay-mode", "tc"];
    let sn = mvc
        .supernode_with(&lab, &a.frontend, sn_addr, "supernode", &tc)
        .unwrap();
    let status = || mvc.supernode_status(&lab, &sn).expect("supernode status");
    assert_eq!(status()["xdp_relay"]["mode"].as_str(), Some("tc"));
    let second = tc_programs(&lab, &t);
    assert!(
        second.len() == 1 && second != first,
        "one new program after the restart: {first:?} then {second:?}"
    );
    // The edges come back (prompted by the relays the new supernode does not know yet).
    lab.wait_until("3 edges in the relay map", UP, || {
        xdp(&status(), "edges") >= 3
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status()));
    lab::wait_ping(&lab, &vb.ns, vc.ip, UP).unwrap();
    let st0 = status();
    let bps = lab::iperf(&lab, &vb.ns, &vc.ns, vc.ip, 2).unwrap();
    assert!(bps > 1e6, "relayed iperf3 after the restart: {bps} b/s");
    std::thread::sleep(Duration::from_millis(600));
    let st1 = status();
    assert!(
        xdp(&st1, "relayed_packets") - xdp(&st0, "relayed_packets") > 1000,
        "the kernel relays after the restart: {st1}"
    );

    // A second supernode (another port) on the same interface: no second program.
    let other = mvc
        .supernode_with(
            &lab,
            &a.frontend,
            SocketAddrV4::new(a.public_ip, SUPERNODE_PORT + 1),
            "supernode2",
            &tc,
        )
        .unwrap();
    let st = mvc.supernode_status(&lab, &other).unwrap();
    assert!(
        st["xdp_relay"].is_null(),
        "second supernode got the hook: {st}"
    );
    assert_eq!(tc_programs(&lab, &t), second, "still exactly one program");
    assert!(
        lab.log(&other.proc).contains("already runs mvc_relay_tc"),
        "{}",
        lab.log(&other.proc)
    );
    lab.stop(&other.proc);
    assert_running(&lab, Some(&sn), &edges);
}

/// Relayed throughput with the XDP relay and the TC relay against the userspace relay
/// and the direct path, and the supernode process's CPU per relayed GB; each configuration started
/// fresh, the order rotated every round. Ignored (minutes; for docs/BENCH.md): run with
/// `MVC_TEST_BIN=$PWD/target/release/mvc cargo test -p control --test xdp_relay --
/// --ignored --nocapture measure_relay`; `MVC_RELAY_ROUNDS` (default 3), `MVC_RELAY_SECS`
/// (default 4); `MVC_RELAY_MODE` (`native`, the default, or `generic`) is the XDP relay
/// program's attach mode (`tc` is the TC classifier's configuration); `MVC_RELAY_UDP=LEN` measures iperf3 UDP datagrams of LEN bytes
/// offered at `MVC_RELAY_UDP_MBIT` (default 300) Mbit/s instead of TCP (rate = bytes
/// received); `MVC_RELAY_LINKS=1` also prints the counters of site A's uplink (both
/// ends) and of the XDP program after each run.
#[test]
#[ignore]
fn measure_relay() {
    if let Some(why) = skip_reason() {
        lab::skip("measure_relay", &why);
        return;
    }
    let (rounds, secs) = (
        lab::env_number::<u32>("MVC_RELAY_ROUNDS", 3),
        lab::env_number::<u32>("MVC_RELAY_SECS", 4),
    );
    let mode = std::env::var("MVC_RELAY_MODE").unwrap_or_else(|_| "native".into());
    let (udp_len, udp_mbit) = (
        lab::env_number::<u32>("MVC_RELAY_UDP", 0),
        lab::env_number::<u32>("MVC_RELAY_UDP_MBIT", 300),
    );
    let lab = Lab::new("xm").expect("lab");
    let mvc = test_bin();
    let t = Topology::three_sites(&lab, 1).unwrap();
    let (b, c) = (t.site("b"), t.site("c"));
    let (vb, vc) = (&b.vms[0], &c.vms[0]);
    let configs = ["direct", "user", "xdp", "tc"];
    let n = configs.len();
    let mut results: Vec<(usize, f64, f64, f64)> = Vec::new();
    for r in 0..rounds as usize {
        for k in 0..n {
            let ci = (k + r) % n;
            let name = configs[ci];
            let rules = (name != "direct").then(|| t.block_udp(&lab, b, c, None).unwrap());
            let relay_mode = if name == "tc" { "tc" } else { mode.as_str() };
            let (sn, edges, peer) =
                start(&lab, &t, &mvc, name == "xdp" || name == "tc", relay_mode);
            lab::wait_ping(&lab, &vb.ns, vc.ip, UP).unwrap();
            let want = if name == "direct" {
                "direct"
            } else {
                "relayed"
            };
            lab.wait_until("path", Duration::from_secs(30), || {
                mvc.path_to(&lab, &edges[1], "c").as_deref() == Some(want)
            })
            .unwrap();
            let st0 = mvc.supernode_status(&lab, &sn).unwrap();
            let c0 = lab::cpu::sample(&[sn.proc.pid]);
            let (bps, loss) = if udp_len > 0 {
                let run = lab::iperf_udp(
                    &lab,
                    &vb.ns,
                    &vc.ns,
                    vc.ip,
                    secs,
                    udp_len,
                    u64::from(udp_mbit) * 1_000_000,
                )
                .unwrap();
                (run.bytes as f64 * 8.0 / run.secs.max(1e-9), run.loss())
            } else {
                (lab::iperf(&lab, &vb.ns, &vc.ns, vc.ip, secs).unwrap(), 0.0)
            };
            let c1 = lab::cpu::sample(&[sn.proc.pid]);
            std::thread::sleep(Duration::from_millis(500));
            let st1 = mvc.supernode_status(&lab, &sn).unwrap();
            let (user, kernel, sys) = lab::cpu::seconds(&c0, &c1);
            let gb = bps * f64::from(secs) / 8e9;
            let sn_cpu = (user + sys) / gb;
            let by_xdp = xdp(&st1, "relayed_packets") - xdp(&st0, "relayed_packets");
            let by_user = st1["relayed_packets"].as_u64().unwrap_or(0)
                - st0["relayed_packets"].as_u64().unwrap_or(0);
            println!(
                "round {r} {name:>6}: {:8.1} Mbit/s (UDP loss {:.3})  supernode CPU {sn_cpu:6.3} s/GB  machine kernel {:6.2} s/GB  relayed xdp {by_xdp} user {by_user}",
                bps / 1e6,
                loss,
                kernel / gb
            );
            results.push((ci, bps, sn_cpu, kernel / gb));
            if std::env::var_os("MVC_RELAY_LINKS").is_some() {
                let a = t.site("a");
                for (ns, dev) in [
                    (a.frontend.clone(), "eth0".to_string()),
                    (t.inet.clone(), format!("s{}", a.idx)),
                ] {
                    if let Ok(o) = lab.ip(&ns, &["-s", "link", "show", &dev]) {
                        println!("{dev}: {}", o.stdout);
                    }
                }
                println!("{}", st1["xdp_relay"]);
            }
            for e in &edges {
                lab.stop(&e.proc);
            }
            lab.stop(&sn.proc);
            drop(peer);
            if let Some(rules) = rules {
                t.unblock(&lab, &rules).unwrap();
            }
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let of = |ci: usize, f: fn(&(usize, f64, f64, f64)) -> f64| {
        results
            .iter()
            .filter(|x| x.0 == ci)
            .map(f)
            .collect::<Vec<_>>()
    };
    for (ci, name) in configs.iter().enumerate() {
        let bps = of(ci, |x| x.1);
        println!(
            "{name:>6}: median {:8.1} Mbit/s (runs {:?})  supernode CPU median {:.3} s/GB  machine kernel median {:.2} s/GB",
            median(bps.clone()) / 1e6,
            bps.iter().map(|b| (b / 1e6).round()).collect::<Vec<_>>(),
            median(of(ci, |x| x.2)),
            median(of(ci, |x| x.3)),
        );
    }
    // Paired per round: relayed over direct.
    for (ci, name) in [(1, "user"), (2, "xdp"), (3, "tc")] {
        let ratios: Vec<f64> = (0..rounds as usize)
            .map(|r| {
                let round = &results[r * n..r * n + n];
                let rate = |c: usize| round.iter().find(|x| x.0 == c).unwrap().1;
                rate(ci) / rate(0)
            })
            .collect();
        println!(
            "{name} / direct per round: {:?}, median {:.2}",
            ratios
                .iter()
                .map(|x| (x * 100.0).round() / 100.0)
                .collect::<Vec<_>>(),
            median(ratios.clone())
        );
    }
}

/// The edge's junk filter (`mvc edge --xdp-filter eth0` at site A, whose edge has a public
/// address), as native XDP: registration, handshakes, probes and relayed traffic keep
/// working (A and B ping each other, B behind its NAT; the session's index is in the
/// filter's map), while junk sent from the internet router to A's edge port (including
/// Data naming an unknown session, direct and inside a Relay with the community's id) is
/// dropped in the program, counted by reason, and never reaches the edge's socket (its
/// own drop counters for those reasons stay where they were).
#[test]
fn xdp_filter_drops_junk_before_the_edge_and_lets_the_overlay_work() {
    filter_drops_junk(
        "xdp_filter_drops_junk_before_the_edge_and_lets_the_overlay_work",
        "native",
    );
}

/// The same with the filter as a TC classifier on the uplink's ingress
/// (`--xdp-filter-mode auto`, which takes tc on the veth uplink): the same drops and
/// counters, one `mvc_filter_tc` attached while the edge runs and none after it stops,
/// and iperf3 moves data through the filtered edge.
#[test]
fn tc_filter_drops_junk_before_the_edge_and_lets_the_overlay_work() {
    filter_drops_junk(
        "tc_filter_drops_junk_before_the_edge_and_lets_the_overlay_work",
        "auto",
    );
}

/// The body of the two filter tests, with the filter in `mode`.
fn filter_drops_junk(test: &str, mode: &str) {
    if let Some(why) = skip_reason() {
        lab::skip(test, &why);
        return;
    }
    let lab = Lab::new("xf").expect("lab");
    let mvc = test_bin();
    let t = Topology::three_sites(&lab, 1).unwrap();
    let (a, b) = (t.site("a"), t.site("b"));
    let (sn, edges) = start_filtered(&lab, &t, &mvc, Some(mode));
    let (va, vb) = (&a.vms[0], &b.vms[0]);
    lab::wait_ping(&lab, &vb.ns, va.ip, UP).unwrap();
    let status = || mvc.edge_status(&lab, &edges[0]).expect("edge status");
    lab.wait_until(
        "the filter passed datagrams",
        Duration::from_secs(10),
        || status()["xdp_filter"]["passed"].as_u64().unwrap_or(0) > 0,
    )
    .unwrap_or_else(|e| panic!("{e}: {}", status()));
    let st0 = status();
    assert!(
        st0["xdp_filter"]["passed"].as_u64().unwrap_or(0) > 0,
        "{st0}"
    );
    let hook = if mode == "native" { "native" } else { "tc" };
    assert_eq!(
        st0["xdp_filter"]["mode"].as_str(),
        Some(hook),
        "{}",
        st0["xdp_filter"]
    );
    let tc_filters = || {
        lab.in_ns(&a.frontend, || filter_tc_programs("eth0"))
            .unwrap()
            .unwrap()
            .len()
    };
    assert_eq!(tc_filters(), usize::from(hook == "tc"));
    assert!(
        st0["xdp_filter"]["drops"]
            .as_object()
            .is_none_or(|d| d.is_empty()),
        "legitimate traffic dropped: {st0}"
    );

    let dst = SocketAddrV4::new(a.public_ip, ov::EDGE_PORT);
    let n = 50;
    throw(&lab, &t.inet, dst, &[1, 0x12, 0, 0, 9, 9, 9, 9], n);
    throw(&lab, &t.inet, dst, &[V, 0x33, 0, 0, 9, 9, 9, 9], n);
    throw(&lab, &t.inet, dst, &[V, 0x10, 0, 0, 9, 9, 9, 9], n);
    let mut other = vec![V, 4, 0, 0];
    other.extend([7u8; 60]);
    throw(&lab, &t.inet, dst, &other, n);
    // Transport messages naming a session index the edge does not have: direct, and
    // relayed under the community's real id (anyone who knows it can forge the header).
    let community = dataplane::crypto::CommunityKeys::derive(COMMUNITY, SECRET.as_bytes()).id;
    let data = |index: u32| {
        let mut d = vec![V, 0x12, 0, 0];
        d.extend(index.to_be_bytes());
        d.extend([0u8; 8 + 48]);
        d
    };
    throw(&lab, &t.inet, dst, &data(0x0bad_0001), n);
    let mut relayed = vec![V, 4, 0, 0];
    relayed.extend(community);
    relayed.extend([3u8; 16]);
    relayed.extend(data(0x0bad_0002));
    throw(&lab, &t.inet, dst, &relayed, n);
    std::thread::sleep(Duration::from_millis(600));
    let st1 = status();
    assert!(
        st1["xdp_filter"]["session_check"].as_bool() == Some(true)
            && st1["xdp_filter"]["sessions"].as_u64().unwrap_or(0) >= 1,
        "the live session is in the filter's map: {}",
        st1["xdp_filter"]
    );
    for reason in [
        "bad_version",
        "unknown_type",
        "truncated",
        "wrong_community",
    ] {
        assert!(
            st1["xdp_filter"]["drops"][reason].as_u64().unwrap_or(0) >= n as u64,
            "{reason}: {}",
            st1["xdp_filter"]
        );
    }
    assert_drops_unchanged(
        &st0,
        &st1,
        &[
            "bad_version",
            "unknown_type",
            "truncated",
            "malformed",
            "relay_not_for_us",
            "unknown_session",
        ],
        "edge",
    );
    assert!(
        st1["xdp_filter"]["drops"]["unknown_session"]
            .as_u64()
            .unwrap_or(0)
            >= 2 * n as u64,
        "unknown_session: {}",
        st1["xdp_filter"]
    );
    let p = lab::ping(&lab, &vb.ns, va.ip, 10, 0.05).unwrap();
    assert!(p.received + 1 >= p.sent, "ping after junk: {p:?}");
    let table = mvc
        .status_table(&lab, &a.frontend, "edge", &edges[0].sock)
        .unwrap();
    assert!(
        table.contains(&format!("xdp filter on eth0 ({hook})")),
        "{table}"
    );
    // Data moves through the filtered edge (a GSO batch's head is checked, the rest
    // passes with it), and none of it is dropped by the filter.
    let bps = lab::iperf(&lab, &vb.ns, &va.ns, va.ip, 2).expect("iperf3");
    assert!(bps > 1e6, "iperf3 through the filtered edge: {bps} bit/s");
    let st2 = status();
    assert_eq!(
        st2["xdp_filter"]["drops"], st1["xdp_filter"]["drops"],
        "iperf3's datagrams dropped by the filter"
    );
    assert_running(&lab, None, &edges);
    for e in &edges {
        lab.stop(&e.proc);
    }
    lab.stop(&sn.proc);
    lab.wait_until(
        "the tcx link gone with the edge",
        Duration::from_secs(5),
        || tc_filters() == 0,
    )
    .unwrap();
}

/// UDP receive-buffer overflows (`Udp: RcvbufErrors` of /proc/net/snmp) in namespace `ns`:
/// datagrams the kernel dropped because a socket there did not read fast enough.
fn rcvbuf_errors(lab: &Lab, ns: &str) -> u64 {
    let out = lab
        .exec(ns, &["cat", "/proc/net/snmp"])
        .map(|o| o.stdout)
        .unwrap_or_default();
    let mut udp = out.lines().filter(|l| l.starts_with("Udp:"));
    let (Some(names), Some(values)) = (udp.next(), udp.next()) else {
        return 0;
    };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "RcvbufErrors")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

/// Where a run of [`measure_junk_flood`] sends its junk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    /// Nowhere: no flood.
    Quiet,
    /// Site A's edge, out of the internet router's end of A's uplink.
    Edge,
    /// The [`Sink`], off every path the overlay uses.
    Sink,
    /// The sink's link with the sink's end down: the router's veth frees every frame as it
    /// is sent, nothing receives it. What the flood's making costs alone.
    DeadEnd,
}

impl Target {
    fn as_str(self) -> &'static str {
        match self {
            Target::Quiet => "none",
            Target::Edge => "edge",
            Target::Sink => "sink",
            Target::DeadEnd => "dead end",
        }
    }
}

/// The flood's baseline destination: namespace `sink`, joined to the internet router by a
/// veth pair as site A's uplink is (`sk` there, `eth0` here, 198.18.99.0/24), whose
/// ingress drops the junk with the edge's filter program in the same hook (attached per
/// run by the test, with the edge's port and community and no session). The same
/// generator thread makes the same frames out of the same router, and each is received
/// and dropped by the same code as at the edge (on veth, the receive runs in the
/// sender's softirq either way), so a flood here costs the machine what one at the edge
/// costs, except whatever the overlay host pays for it beyond that.
struct Sink {
    ns: String,
    frame: Vec<u8>,
}

/// The sink's end at the internet router.
const SINK_INET_IF: &str = "sk";

impl Sink {
    fn new(lab: &Lab, t: &Topology, payload: &[u8]) -> Sink {
        let ns = lab.add_ns("sink").unwrap();
        lab.veth(&t.inet, SINK_INET_IF, &ns, "eth0").unwrap();
        let (router, own) = (Ipv4Addr::new(198, 18, 99, 1), Ipv4Addr::new(198, 18, 99, 2));
        lab.addr(&t.inet, SINK_INET_IF, router, 24).unwrap();
        lab.addr(&ns, "eth0", own, 24).unwrap();
        let frame = lab::flood::udp_frame(
            lab::flood::mac_of(&ns, "eth0").unwrap(),
            lab::flood::mac_of(&t.inet, SINK_INET_IF).unwrap(),
            SocketAddrV4::new(router, 40_000),
            SocketAddrV4::new(own, ov::EDGE_PORT),
            payload,
        );
        Sink { ns, frame }
    }

    /// Takes the sink's `eth0` down (`up` false) or up again.
    fn set_up(&self, lab: &Lab, up: bool) {
        let state = if up { "up" } else { "down" };
        lab.ip(&self.ns, &["link", "set", "eth0", state]).unwrap();
    }

    /// The edge's filter on the sink's `eth0`, in the hook `mode` names.
    fn filter(&self, lab: &Lab, mode: &str) -> XdpFilter {
        let mode: HookMode = mode.parse().unwrap_or_else(|e| panic!("{e}"));
        let community = dataplane::crypto::CommunityKeys::derive(COMMUNITY, SECRET.as_bytes()).id;
        lab.in_ns(&self.ns, || {
            XdpFilter::attach("eth0", ov::EDGE_PORT, &community, mode)
        })
        .unwrap()
        .unwrap_or_else(|e| panic!("the sink's filter: {e}"))
    }
}

/// One configuration's run of [`measure_junk_flood`].
struct FloodRun {
    filter: &'static str,
    target: Target,
    offered: u64,
    /// Junk the filter where the flood went (A's edge or the sink) dropped; at the dead
    /// end, what the router's veth freed.
    dropped: u64,
    overflows: u64,
    to_userspace: u64,
    mbps: f64,
    cpu_per_gb: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Frames the kernel dropped because a CPU's backlog queue was full (the second column
/// of /proc/net/softnet_stat, summed over the CPUs): the whole machine's, other jobs'
/// included. On veth (no XDP) every received frame goes through the sending CPU's backlog.
fn backlog_drops() -> u64 {
    std::fs::read_to_string("/proc/net/softnet_stat")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(1))
        .filter_map(|v| u64::from_str_radix(v, 16).ok())
        .sum()
}

/// The 1-minute load average.
fn load() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|l| l.split_whitespace().next()?.parse().ok())
        .unwrap_or(f64::NAN)
}

/// `perf record -a -g` of the whole machine for `secs` seconds into `out`, started now.
fn perf_record(out: &std::path::Path, secs: u32) -> Option<std::process::Child> {
    std::process::Command::new("perf")
        .args(["record", "-a", "-g", "-q", "-o"])
        .arg(out)
        .args(["--", "sleep", &secs.to_string()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()
}

/// Per round, the iperf3 rate and the edge's CPU per GB of the run that `num` picks over
/// the run that `den` picks, printed as `what` with their medians.
fn print_paired(
    runs: &[Vec<FloodRun>],
    what: &str,
    num: impl Fn(&FloodRun) -> bool,
    den: impl Fn(&FloodRun) -> bool,
) {
    let (mut rate, mut cpu) = (Vec::new(), Vec::new());
    for round in runs {
        if let (Some(n), Some(d)) = (round.iter().find(|x| num(x)), round.iter().find(|x| den(x))) {
            rate.push(n.mbps / d.mbps.max(1e-9));
            cpu.push(n.cpu_per_gb / d.cpu_per_gb.max(1e-9));
        }
    }
    println!(
        "{what}: iperf3 per round {:.2?} (median {:.2}); edge CPU per GB {:.2?} (median {:.2})",
        rate,
        median(rate.clone()),
        cpu,
        median(cpu.clone()),
    );
}

/// A junk flood against site A's edge, without `--xdp-filter` and with it in each hook of
/// `MVC_FILTER_MODES` (default `native,tc`); for each of those the same flood against the
/// [`Sink`] (the same filter in the same hook, off the overlay's path), into the sink's
/// link with the sink's end down (the dead end: made, then freed unreceived) and no flood
/// at all, each as the baselines, in one series per round (the order rotating, each
/// configuration started fresh). The junk: Data datagrams naming an unknown session index
/// (valid version, type and length: what only the session check catches) sent out of the
/// internet router's end of A's uplink (or the sink's) by the generator of `MVC_FLOOD_GEN`
/// (`clone`, the default: seeds cloned by a tc program, paced to `MVC_FLOOD_PPS`, default 1
/// 000 000 frames/s; `socket`: raw packet sockets as fast as they go), `MVC_FLOOD_THREADS`
/// senders (default 1 for `clone`, 2 for `socket`), for `MVC_FLOOD_SECS` (default 10; at
/// most 50 million frames per sender), while iperf3 runs from B's VM to A's. Reports per
/// run the load, the rate offered, where the junk was dropped (the filter at the edge or
/// the sink, the router's veth at the dead end, the kernel's full socket buffer, the edge's
/// `unknown_session`), the machine's backlog drops, the iperf3 rate, the edge process's CPU
/// seconds per GB iperf3 moved and the machine's kernel CPU; then per round, with their
/// medians: the flood at the edge against no flood with the same filter setting (what the
/// whole 2-core machine pays: the flood's making and dropping included), against the flood
/// at the sink (what the overlay host pays beyond receiving and dropping it as any host
/// would), against the dead end (what the overlay host pays in all, receiving and dropping
/// included), the sink and the dead end against no flood, and each filter without a flood
/// against no filter. With `MVC_FLOOD_PERF=DIR`, every flooded run is profiled (`perf
/// record -a -g`, 4 s, into `DIR/round-R-FILTER-TARGET.data`; the profiler's own cost then
/// moves the figures). Ignored (for docs/BENCH.md): `MVC_TEST_BIN=$PWD/target/release/mvc
/// cargo test --release -p control --test xdp_relay -- --ignored --nocapture
/// measure_junk_flood`; `MVC_FLOOD_ROUNDS` (default 3).
#[test]
#[ignore]
fn measure_junk_flood() {
    if let Some(why) = skip_reason() {
        lab::skip("measure_junk_flood", &why);
        return;
    }
    let generator = lab::flood::Generator::from_env().unwrap_or_else(|e| panic!("{e}"));
    let default_threads = match generator {
        lab::flood::Generator::Socket => 2,
        lab::flood::Generator::Cloned { .. } => 1,
    };
    let (rounds, secs, threads) = (
        lab::env_number::<u32>("MVC_FLOOD_ROUNDS", 3),
        lab::env_number::<u32>("MVC_FLOOD_SECS", 10),
        lab::env_number::<u32>("MVC_FLOOD_THREADS", default_threads).clamp(1, 4),
    );
    let perf_dir = std::env::var_os("MVC_FLOOD_PERF").map(PathBuf::from);
    println!("junk flood: {generator}, {threads} senders, {secs} s per run, {rounds} rounds");
    let lab = Lab::new("xj").expect("lab");
    let mvc = test_bin();
    let t = Topology::three_sites(&lab, 1).unwrap();
    let (a, b) = (t.site("a"), t.site("b"));
    let (va, vb) = (&a.vms[0], &b.vms[0]);
    let uplink = format!("s{}", a.idx);
    let mut payload = vec![V, 0x12, 0, 0, 0x0b, 0xad, 0x5e, 0x55];
    payload.extend([0u8; 8 + 64 + 16]);
    let frame = lab::flood::udp_frame(
        lab::flood::mac_of(&a.frontend, "eth0").unwrap(),
        lab::flood::mac_of(&t.inet, &uplink).unwrap(),
        SocketAddrV4::new(lab::addr::inet_side(a.idx), 40_000),
        SocketAddrV4::new(a.public_ip, ov::EDGE_PORT),
        &payload,
    );
    let sink = Sink::new(&lab, &t, &payload);
    let counter = |st: &Value, part: &str, key: &str| st[part][key].as_u64().unwrap_or(0);
    // (filter, target): the flood against the edge without and with the filter, against
    // the sink and into the dead end with the filter, and no flood with and without the
    // filter (what the legitimate traffic costs on its own, and what the filter costs it).
    let modes_env = std::env::var("MVC_FILTER_MODES").unwrap_or_else(|_| "native,tc".into());
    let mut filters: Vec<&'static str> = vec!["off"];
    for m in modes_env.split(',') {
        match ["native", "generic", "tc"].into_iter().find(|k| *k == m) {
            Some(k) => filters.push(k),
            None => panic!("MVC_FILTER_MODES: {m:?} is not native, generic or tc"),
        }
    }
    let configs: Vec<(&'static str, Target)> = filters
        .iter()
        .flat_map(|&f| {
            let filtered = f != "off";
            [
                Some((f, Target::Edge)),
                filtered.then_some((f, Target::Sink)),
                filtered.then_some((f, Target::DeadEnd)),
                Some((f, Target::Quiet)),
            ]
        })
        .flatten()
        .collect();
    let mut runs: Vec<Vec<FloodRun>> = Vec::new();
    for r in 0..rounds as usize {
        let mut round = Vec::new();
        for k in 0..configs.len() {
            let (filter, target) = configs[(k + r) % configs.len()];
            let (sn, edges) = start_filtered(&lab, &t, &mvc, (filter != "off").then_some(filter));
            let sink_filter = (target == Target::Sink).then(|| sink.filter(&lab, filter));
            if target == Target::DeadEnd {
                sink.set_up(&lab, false);
            }
            let (flood_if, flood_frame) = match target {
                Target::Sink | Target::DeadEnd => (SINK_INET_IF, &sink.frame),
                _ => (uplink.as_str(), &frame),
            };
            lab::wait_ping(&lab, &vb.ns, va.ip, UP).unwrap();
            let st0 = mvc.edge_status(&lab, &edges[0]).unwrap();
            let overflow0 = rcvbuf_errors(&lab, &a.frontend);
            let (load0, backlog0) = (load(), backlog_drops());
            let freed = || {
                lab.if_counter(&t.inet, SINK_INET_IF, "tx_dropped")
                    .unwrap_or(0)
            };
            let freed0 = freed();
            let flood_for = Duration::from_secs(u64::from(secs));
            let iperf_secs = secs.saturating_sub(1).max(1);
            let perf = perf_dir
                .as_ref()
                .filter(|_| target != Target::Quiet)
                .and_then(|d| {
                    let out = d.join(format!("round-{r}-{filter}-{}.data", target.as_str()));
                    perf_record(&out, iperf_secs.min(4))
                });
            let (offered, bps, c0, c1) = std::thread::scope(|sc| {
                let senders: Vec<_> = (0..if target == Target::Quiet { 0 } else { threads })
                    .map(|_| {
                        sc.spawn(|| {
                            lab.in_ns(&t.inet, || {
                                generator.run(
                                    flood_if,
                                    flood_frame,
                                    1.0 / f64::from(threads),
                                    50_000_000,
                                    flood_for,
                                )
                            })
                            .unwrap()
                            .unwrap()
                        })
                    })
                    .collect();
                let c0 = lab::cpu::sample(&[edges[0].proc.pid]);
                let bps = lab::iperf(&lab, &vb.ns, &va.ns, va.ip, iperf_secs).unwrap_or(0.0);
                let c1 = lab::cpu::sample(&[edges[0].proc.pid]);
                let offered: u64 = senders.into_iter().map(|h| h.join().unwrap().frames).sum();
                (offered, bps, c0, c1)
            });
            if let Some(mut p) = perf {
                let _ = p.wait();
            }
            std::thread::sleep(Duration::from_millis(300));
            let (user, kernel_s, sys) = lab::cpu::seconds(&c0, &c1);
            let st = mvc.edge_status(&lab, &edges[0]).unwrap();
            let at_edge = st["xdp_filter"]["drops"]["unknown_session"]
                .as_u64()
                .unwrap_or(0);
            let dropped = match (&sink_filter, target) {
                (Some(f), _) => f
                    .status()
                    .drops
                    .get("unknown_session")
                    .copied()
                    .unwrap_or(0),
                (None, Target::DeadEnd) => freed().saturating_sub(freed0),
                (None, _) => at_edge,
            };
            // Edge CPU seconds per GB that iperf3 moved.
            let gb = bps * f64::from(iperf_secs) / 8e9;
            let run = FloodRun {
                filter,
                target,
                offered,
                dropped,
                overflows: rcvbuf_errors(&lab, &a.frontend).saturating_sub(overflow0),
                to_userspace: counter(&st, "drops", "unknown_session").saturating_sub(counter(
                    &st0,
                    "drops",
                    "unknown_session",
                )),
                mbps: bps / 1e6,
                cpu_per_gb: (user + sys) / gb.max(1e-9),
            };
            println!(
                "round {r} filter {filter:>6} flood at {:>8} (load {load0:.1}): junk offered {} ({:.0}/s), \
                 dropped there {} ({:.0}/s; by the edge's filter {at_edge}), socket buffer overflows {}, \
                 edge unknown_session {}, machine backlog drops {}, iperf3 {:.1} Mbit/s, \
                 edge A CPU {user:.2} s user + {sys:.2} s sys ({:.2} s/GB), machine kernel CPU {kernel_s:.2} s",
                target.as_str(),
                run.offered,
                run.offered as f64 / f64::from(secs),
                run.dropped,
                run.dropped as f64 / f64::from(secs),
                run.overflows,
                run.to_userspace,
                backlog_drops().saturating_sub(backlog0),
                run.mbps,
                run.cpu_per_gb,
            );
            round.push(run);
            drop(sink_filter);
            if target == Target::DeadEnd {
                sink.set_up(&lab, true);
            }
            for e in &edges {
                lab.stop(&e.proc);
            }
            lab.stop(&sn.proc);
        }
        runs.push(round);
    }
    let is = |filter: &'static str, target: Target| {
        move |x: &FloodRun| x.filter == filter && x.target == target
    };
    for &filter in &filters {
        // What the whole machine pays: the flood's making and dropping included.
        print_paired(
            &runs,
            &format!("filter {filter:>6}: flood at the edge / no flood"),
            is(filter, Target::Edge),
            is(filter, Target::Quiet),
        );
    }
    // Edge / sink: what the overlay host pays beyond the flood's making and dropping.
    // Edge / dead end: what the overlay host pays in all, receiving and dropping included.
    // Sink and dead end / no flood: what the flood costs the machine without the overlay.
    let pairs = [
        (
            Target::Edge,
            Target::Sink,
            "flood at the edge / at the sink",
        ),
        (
            Target::Edge,
            Target::DeadEnd,
            "flood at the edge / at the dead end",
        ),
        (Target::Sink, Target::Quiet, "flood at the sink / no flood"),
        (
            Target::DeadEnd,
            Target::Quiet,
            "flood at the dead end / no flood",
        ),
    ];
    for &filter in &filters[1..] {
        for (num, den, what) in pairs {
            print_paired(
                &runs,
                &format!("filter {filter:>6}: {what}"),
                is(filter, num),
                is(filter, den),
            );
        }
    }
    for &filter in &filters[1..] {
        print_paired(
            &runs,
            &format!("filter {filter:>6} without a flood / no filter"),
            is(filter, Target::Quiet),
            is("off", Target::Quiet),
        );
    }
}

/// The TC relay's GSO checks: a UDP GSO batch of Relays of Data from edge B's registered
/// address (sent from the internet router with that source, as NAT B would forward it)
/// is relayed whole when every datagram in it goes from B to C (each counted), and goes
/// to userspace whole, relayed by nobody in the kernel, when one datagram in it names
/// another destination (`passed_mixed_batch`).
#[test]
fn tc_relay_relays_agreeing_gso_batches_and_passes_mixed_ones() {
    if let Some(why) = skip_reason() {
        lab::skip(
            "tc_relay_relays_agreeing_gso_batches_and_passes_mixed_ones",
            &why,
        );
        return;
    }
    let lab = Lab::new("xg").expect("lab");
    let mvc = test_bin();
    let t = Topology::three_sites(&lab, 1).unwrap();
    let (a, b, c) = (t.site("a"), t.site("b"), t.site("c"));
    t.block_udp(&lab, b, c, None).unwrap();
    let sn_addr = SocketAddrV4::new(a.public_ip, SUPERNODE_PORT);
    let (sn, edges, _) = start(&lab, &t, &mvc, true, "tc");
    let (vb, vc) = (&b.vms[0], &c.vms[0]);
    let status = || mvc.supernode_status(&lab, &sn).expect("supernode status");
    lab::wait_ping(&lab, &vb.ns, vc.ip, UP).unwrap_or_else(|e| panic!("{e}: {}", status()));
    lab.wait_until("3 edges in the relay map", Duration::from_secs(5), || {
        xdp(&status(), "edges") >= 3
    })
    .unwrap_or_else(|e| panic!("{e}: {}", status()));
    let st0 = status();
    let comm = &st0["communities"][0];
    let edge = |name: &str| {
        comm["edges"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("{name} not registered: {st0}"))
            .clone()
    };
    let b_from: SocketAddrV4 = edge("b")["observed"].as_str().unwrap().parse().unwrap();
    let relay = |dst: &str| {
        let mut d = vec![V, 4, 0, 0];
        d.extend(hex(comm["id"].as_str().unwrap()));
        d.extend(hex(edge("b")["id"].as_str().unwrap()));
        d.extend(hex(edge(dst)["id"].as_str().unwrap()));
        d.extend([V, 0x12, 0, 0, 0, 0, 0, 1]);
        d.resize(SEGMENT, 0);
        d
    };
    const SEGMENT: usize = 300;
    const SEGS: usize = 4;
    let batch = |dsts: [&str; SEGS]| dsts.iter().flat_map(|d| relay(d)).collect::<Vec<u8>>();
    let send = |datagrams: &[u8]| {
        lab.in_ns(&t.inet, || {
            let s = lab::sys::udp_transparent(b_from).unwrap();
            dataplane::io::udp::send_msg(
                std::os::fd::AsRawFd::as_raw_fd(&s),
                datagrams,
                std::net::SocketAddr::V4(sn_addr),
                Some(SEGMENT as u16),
            )
            .unwrap();
        })
        .unwrap();
        std::thread::sleep(Duration::from_millis(600));
        status()
    };

    let st1 = send(&batch(["c", "c", "c", "c"]));
    // (The edges' own keepalives may be relayed meanwhile: single datagrams.)
    assert!(
        xdp(&st1, "relayed_packets") - xdp(&st0, "relayed_packets") >= SEGS as u64,
        "an agreeing batch is relayed whole by the kernel: {}",
        st1["xdp_relay"]
    );
    assert_eq!(
        xdp(&st1, "passed_mixed_batch"),
        xdp(&st0, "passed_mixed_batch"),
        "{}",
        st1["xdp_relay"]
    );
    let st2 = send(&batch(["c", "c", "a", "c"]));
    assert!(
        xdp(&st2, "relayed_packets") - xdp(&st1, "relayed_packets") < SEGS as u64,
        "nothing of a mixed batch relayed by the kernel: {}",
        st2["xdp_relay"]
    );
    assert_eq!(
        xdp(&st2, "passed_mixed_batch") - xdp(&st1, "passed_mixed_batch"),
        1,
        "{}",
        st2["xdp_relay"]
    );
    assert_running(&lab, Some(&sn), &edges);
}
