//! `bench scale-store` on a small store: every call is timed, the counts add up.
use bench::storescale::{run, StoreScaleConfig};

#[test]
fn a_small_store_times_every_call() {
    let cfg = StoreScaleConfig {
        sites: 5,
        clusters: 20,
        vms_per_cluster: 4,
    };
    let r = run(&cfg, 3).unwrap();
    // The filled clusters, one with a given network, one from the pool, one of 100 VMs.
    assert_eq!(r.vms, 20 * 4 + 4 + 4 + 100);
    let ops: Vec<&str> = r.timings.iter().map(|t| t.op.as_str()).collect();
    for op in [
        "cluster (status of a 100-VM cluster)",
        "`cluster list --json`: clusters and their JSON",
        "`site list --json`",
        "`vm list --json` (every VM)",
        "remove_site (in use: refused)",
    ] {
        assert!(ops.contains(&op), "{op} not timed: {ops:?}");
    }
    for t in &r.timings {
        assert!(t.samples >= 1 && t.samples <= 3, "{t:?}");
        assert!(t.min_ms <= t.ms && t.ms <= t.max_ms, "{t:?}");
    }
    let listing = r.timings.iter().find(|t| t.op == "`site list --json`");
    assert_eq!(listing.map(|t| t.samples), Some(3));
}
