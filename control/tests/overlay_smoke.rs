//! Smoke test of the real overlay binary in network namespaces: a supernode and two
//! edges on one underlay segment, ping across the overlay, the path goes direct, an edge
//! with the wrong secret reaches nothing. Needs root; skips (saying so) otherwise.
//! Built with the `lab` crate (namespaces torn down even when the test fails); the
//! three-site NAT tests are in overlay_lab.rs, this only guards the I/O layer.

use std::net::Ipv4Addr;
use std::process::Command;
use std::time::{Duration, Instant};

use lab::Lab;

/// One ping from namespace `ns` to `to` (1 s timeout).
fn ping(lab: &Lab, ns: &str, to: &str) -> bool {
    lab.exec_timeout(ns, &["ping", "-c1", "-W1", to], Duration::from_secs(5))
        .is_ok_and(|o| o.ok)
}

/// The lab of both tests: a supernode and edges `a`, `b`, `c` (underlay 198.18.200.1-4,
/// overlay 198.19.200.2-4 on each edge's TAP), each edge started with its secret and
/// extra arguments. Returns the lab and the namespace of each host.
fn start(
    lab_name: &str,
    edges: &[(&str, &str, &[&str])],
) -> (Lab, std::collections::HashMap<&'static str, String>) {
    let mvc = env!("CARGO_BIN_EXE_mvc");
    let lab = Lab::new(lab_name).expect("lab");
    let dir = lab.dir().to_path_buf();
    // One underlay segment: a bridge in namespace "sw", and a veth port on it for the
    // supernode and each of the three edges.
    let sw = lab.add_ns("sw").expect("ns");
    lab.bridge(&sw, "br0").expect("bridge");
    let mut ns = std::collections::HashMap::new();
    for (i, n) in ["sn", "a", "b", "c"].into_iter().enumerate() {
        let name = lab.add_ns(n).expect("ns");
        let port = format!("{n}p");
        lab.veth(&name, "u0", &sw, &port).expect("veth");
        lab.enslave(&sw, &port, "br0").expect("enslave");
        let host = u8::try_from(i + 1).expect("small");
        lab.addr(&name, "u0", Ipv4Addr::new(198, 18, 200, host), 24)
            .expect("addr");
        ns.insert(n, name);
    }
    let sn_sock = dir.join("sn.sock").display().to_string();
    lab.spawn(
        &ns["sn"],
        "sn",
        &[
            mvc,
            "supernode",
            "--listen",
            "198.18.200.1:7654",
            "--status-socket",
            &sn_sock,
        ],
    )
    .expect("supernode");
    for (n, secret, extra) in edges {
        let sock = dir.join(format!("{n}.sock")).display().to_string();
        let name = format!("edge-{n}");
        let mut args = vec![
            mvc,
            "edge",
            "--name",
            &name,
            "--community",
            "smoke",
            "--secret",
            secret,
            "--supernode",
            "198.18.200.1:7654",
            "--tap",
            "ovl0",
            "--create-tap",
            "--status-socket",
            &sock,
        ];
        args.extend_from_slice(extra);
        lab.spawn(&ns[n], n, &args).expect("edge");
    }
    // Wait for the TAP devices, then address them.
    let deadline = Instant::now() + Duration::from_secs(10);
    for (n, _, _) in edges {
        let ip = match *n {
            "a" => 2,
            "b" => 3,
            _ => 4,
        };
        let addr = Ipv4Addr::new(198, 19, 200, ip);
        while lab.addr(&ns[n], "ovl0", addr, 24).is_err() {
            assert!(Instant::now() < deadline, "TAP of edge {n} never appeared");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !ping(&lab, &ns["a"], "198.19.200.3") {
        assert!(Instant::now() < deadline, "no ping across the overlay");
    }
    (lab, ns)
}

/// `mvc edge status` of edge `n`, as a table or JSON.
fn status(lab: &Lab, n: &str, json: bool) -> String {
    let mut c = Command::new(env!("CARGO_BIN_EXE_mvc"));
    c.args(["edge", "status"]);
    if json {
        c.arg("--json");
    }
    let out = c
        .arg("--status-socket")
        .arg(lab.dir().join(format!("{n}.sock")))
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn two_edges_ping_direct_and_wrong_secret_is_isolated() {
    const TEST: &str = "two_edges_ping_direct_and_wrong_secret_is_isolated";
    if !lab::is_root() {
        lab::skip(TEST, "needs root (network namespaces, TAP devices)");
        return;
    }
    let (lab, ns) = start(
        "smoke",
        &[
            ("a", "s3cret", &[]),
            ("b", "s3cret", &[]),
            ("c", "wrong", &[]),
        ],
    );
    // The path becomes direct.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let s = status(&lab, "a", true);
        if s.contains("\"path\":\"direct\"") {
            assert!(s.contains("\"name\":\"edge-b\""), "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "never direct: {s}");
        std::thread::sleep(Duration::from_millis(200));
    }
    // The operator's table names the datapath and why: auto takes the TAP device by
    // the rule of docs/XDP.md, and says so.
    let table = status(&lab, "a", false);
    assert!(
        table
            .lines()
            .next()
            .is_some_and(|l| l.contains("datapath tap (auto: the TAP device")),
        "{table}"
    );
    // The wrong secret reaches nothing, and is reached by nothing.
    assert!(!ping(&lab, &ns["c"], "198.19.200.2"));
    assert!(!ping(&lab, &ns["a"], "198.19.200.4"));
    assert!(ping(&lab, &ns["b"], "198.19.200.2"));
}

/// Edge a uses the io_uring features the kernel has (registered TAP reads, multishot
/// receive), edge b is told to use none (`--uring-off all`, the path of a kernel without
/// them): bulk TCP crosses both ways, each status says which it uses, and no receive or
/// read fails.
#[test]
fn uring_features_and_their_fallbacks_carry_bulk_tcp_both_ways() {
    const TEST: &str = "uring_features_and_their_fallbacks_carry_bulk_tcp_both_ways";
    if !lab::is_root() {
        lab::skip(TEST, "needs root (network namespaces, TAP devices)");
        return;
    }
    let (lab, ns) = start(
        "uring",
        &[
            ("a", "s3cret", &[]),
            ("b", "s3cret", &["--uring-off", "all"]),
        ],
    );
    for (client, server, dst) in [("a", "b", 3), ("b", "a", 2)] {
        let gbps = lab::iperf(
            &lab,
            &ns[client],
            &ns[server],
            Ipv4Addr::new(198, 19, 200, dst),
            2,
        )
        .expect("iperf3 across the overlay");
        assert!(gbps > 0.0, "{client} -> {server}: nothing moved");
    }
    let off = status(&lab, "b", false);
    assert!(off.contains("fixed-reads off; multishot-recv off"), "{off}");
    let on = status(&lab, "a", false);
    eprintln!("edge a, features on: {on}");
    assert!(
        on.contains("fixed-reads o") && on.contains("multishot-recv o"),
        "{on}"
    );
    // Nothing was lost on the way in: no receive or read failed on either edge.
    for n in ["a", "b"] {
        let json = status(&lab, n, true);
        assert!(
            !json.contains("udp_recv_error") && !json.contains("tap_read_error"),
            "{n}: {json}"
        );
    }
}
