//! The lab itself, checked with the raw underlay and with Debian's n2n 1.3.1 (the benchmark's
//! baseline): NAT, routing, bridges and VM namespaces work, and everything is torn down.

use std::time::Duration;

use lab::overlay::N2n;
use lab::{Lab, Topology};

fn root_or_skip(name: &str) -> bool {
    if lab::is_root() {
        true
    } else {
        lab::skip(name, "needs root (network namespaces)");
        false
    }
}

#[test]
fn raw_underlay_routes_and_nat() {
    if !root_or_skip("raw_underlay_routes_and_nat") {
        return;
    }
    let l = Lab::new("lt").unwrap();
    let t = Topology::three_sites(&l, 1).unwrap();
    let (a, b, c) = (t.site("a"), t.site("b"), t.site("c"));
    // A VM behind B's NAT reaches A's routed VM LAN...
    let p = lab::ping(&l, &b.vms[0].ns, a.vms[0].underlay_ip, 3, 0.2).unwrap();
    assert_eq!(p.received, 3, "{p:?}");
    // ...but nobody outside reaches the private VM LANs of B and C.
    let p = lab::ping(&l, &a.vms[0].ns, c.vms[0].underlay_ip, 2, 0.2).unwrap();
    assert_eq!(p.received, 0, "{p:?}");
    // Without an overlay the sites share no L2 network.
    let p = lab::ping(&l, &b.vms[0].ns, a.vms[0].ip, 2, 0.2).unwrap();
    assert_eq!(p.received, 0, "{p:?}");
    let bps = lab::iperf(&l, &b.vms[0].ns, &a.vms[0].ns, a.vms[0].underlay_ip, 1).unwrap();
    assert!(bps > 1e6, "{bps}");
    let prefix = l.prefix().to_string();
    drop(l);
    let left = lab::run(&["ip", "netns", "list"]).unwrap().stdout;
    assert!(!left.contains(&prefix), "namespaces left behind: {left}");
}

#[test]
fn n2n_joins_the_three_sites() {
    if !root_or_skip("n2n_joins_the_three_sites") {
        return;
    }
    let l = Lab::new("ln").unwrap();
    let t = Topology::three_sites(&l, 1).unwrap();
    let n = N2n::start(&l, &t).unwrap();
    for (x, y) in [("a", "b"), ("a", "c"), ("b", "c")] {
        let (sx, sy) = (t.site(x), t.site(y));
        lab::wait_ping(&l, &sx.vms[0].ns, sy.vms[0].ip, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("{x} -> {y}: {e}"));
        let p = lab::ping(&l, &sy.vms[0].ns, sx.vms[0].ip, 3, 0.2).unwrap();
        assert!(p.received >= 2, "{y} -> {x}: {p:?}");
    }
    let a = t.site("a");
    let bps = lab::iperf(&l, &t.site("c").vms[0].ns, &a.vms[0].ns, a.vms[0].ip, 1).unwrap();
    assert!(bps > 1e5, "{bps}");
    n.stop(&l, &t).unwrap();
}
