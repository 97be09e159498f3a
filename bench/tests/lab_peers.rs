//! The benchmark's peer drivers carry traffic between sites of the lab: kernel VXLAN (L2,
//! no package needed) and nebula (L3, routed by the frontends; in `.ci/setup-deps`). After
//! `stop`, nothing of the peer is left: the sites no longer reach each other's VMs. One lab
//! serves every start, and nebula starts twice in it, as in a delay sweep.

use std::time::Duration;

use bench::peers::Peer;
use lab::{Lab, Topology};

#[test]
fn vxlan_and_nebula_carry_ping_and_iperf3_between_sites() {
    if !lab::is_root() {
        lab::skip(
            "vxlan_and_nebula_carry_ping_and_iperf3_between_sites",
            "needs root (network namespaces)",
        );
        return;
    }
    let l = Lab::new("lp").unwrap();
    let t = Topology::three_sites(&l, 1).unwrap();
    let (a, b) = (t.site("a"), t.site("b"));
    for peer in [Peer::Vxlan, Peer::Nebula, Peer::Nebula] {
        peer.ensure_installed().expect("install");
        let r = peer.start(&l, &t).unwrap();
        for (x, y) in [(b, a), (a, b)] {
            lab::wait_ping(&l, &x.vms[0].ns, y.vms[0].ip, Duration::from_secs(30))
                .unwrap_or_else(|e| panic!("{}: {} -> {}: {e}", peer.name(), x.name, y.name));
            let p = lab::ping(&l, &x.vms[0].ns, y.vms[0].ip, 5, 0.1).unwrap();
            assert!(p.received >= 4, "{}: {p:?}", peer.name());
        }
        let bps = lab::iperf(&l, &b.vms[0].ns, &a.vms[0].ns, a.vms[0].ip, 2).unwrap();
        assert!(bps > 1e6, "{}: {bps} b/s", peer.name());
        if peer == Peer::Nebula {
            assert_eq!(r.pids().len(), 3, "one nebula per site");
        }
        r.stop(&l, &t).unwrap();
        let p = lab::ping(&l, &b.vms[0].ns, a.vms[0].ip, 3, 0.2).unwrap();
        assert_eq!(p.received, 0, "{} left a path behind: {p:?}", peer.name());
        // The raw underlay is untouched.
        let p = lab::ping(&l, &b.vms[0].ns, a.vms[0].underlay_ip, 3, 0.2).unwrap();
        assert_eq!(p.received, 3, "{}: {p:?}", peer.name());
    }
}
