//! A small `bench scale` run (50 edges in 5 communities): everyone converges after the
//! cold start, the supernode restart, the churn and the outage, and the counts add up.

use bench::scale::{run, ScaleConfig};

#[test]
fn fifty_edges_converge_and_counts_add_up() {
    let mut cfg = ScaleConfig::new(50);
    cfg.relay_packets = 1_000;
    cfg.steady_s = 2;
    let r = run(&cfg, None).expect("scale run");
    assert_eq!(r.communities, 5);
    for (phase, c) in [
        ("cold", &r.cold),
        ("cold sessions", &r.cold_sessions),
        ("restart", &r.restart),
        ("churn", &r.churn),
        ("outage", &r.outage),
    ] {
        assert!(c.all_ms.is_some(), "{phase}: {c:?}");
        assert_eq!(c.converged, c.edges, "{phase}");
    }
    assert_eq!(r.cold.edges, 50);
    assert_eq!(r.restart.edges, 51, "the late joiner counts after the join");
    assert_eq!(r.registered, 50);
    assert_eq!(r.late_join_community, 11);
    assert!(r.restart_reregistered_ms.is_some() && r.outage_reregistered_ms.is_some());
    assert_eq!(r.churned, 6);
    // Every relay packet was between two registered members of one community.
    assert_eq!(r.relayed_counted, 1_000);
    // Peer information went out, and a late join costs about one community's worth.
    assert!(r.peerinfo_bytes_late_join > 0);
    assert!(r.cold_sn.peerinfo_msgs > 0 && r.cold_sn.ack_msgs >= 50);
    assert!(
        r.sn_bytes_per_edge.is_none(),
        "no allocation counter in this test"
    );
}

/// One community of 60: peer information costs the supernode a few signatures per join
/// (the acknowledgements, and the shared lists and announcements), not one per member
/// (about 30 per join when every announcement was signed for its receiver).
#[test]
fn one_community_costs_a_few_signatures_per_join() {
    let mut cfg = ScaleConfig::new(60);
    cfg.community_size = 60;
    cfg.relay_packets = 100;
    cfg.steady_s = 1;
    let r = run(&cfg, None).expect("scale run");
    assert_eq!(r.cold.converged, 60);
    assert!(r.cold.all_ms.is_some_and(|t| t <= 5_000), "{:?}", r.cold);
    assert!(
        r.signatures_per_join_cold < 4.0,
        "{} signatures per join",
        r.signatures_per_join_cold
    );
    assert!(r.cold_sn.signatures > 0 && r.cold_sn.cpu_us > 0);
}
