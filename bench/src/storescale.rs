//! The controller's store at scale: a SQLite store filled with synthetic sites, clusters
//! and VMs (through the same [`SqliteStore`] API the commands use), and the time of the
//! calls behind `cluster create/status/list/destroy` and MAC allocation.

use std::time::Instant;

use control::model::{Attachment, Overlay, Role};
use control::store::{ClusterPlan, PlannedVm, SqliteStore, Store, StoreError};
use serde::Serialize;

/// What to fill the store with.
#[derive(Clone, Debug, Serialize)]
pub struct StoreScaleConfig {
    /// Sites.
    pub sites: usize,
    /// Clusters.
    pub clusters: usize,
    /// VMs per cluster (frontend included), spread over three sites.
    pub vms_per_cluster: usize,
}

/// One timed call.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// What was called.
    pub op: String,
    /// Wall time (ms).
    pub ms: f64,
}

/// Result of a store run.
#[derive(Clone, Debug, Serialize)]
pub struct StoreScaleResult {
    /// The settings.
    pub config: StoreScaleConfig,
    /// VMs in the store once filled.
    pub vms: usize,
    /// Time to fill it (ms).
    pub fill_ms: f64,
    /// The calls, timed with the store full.
    pub timings: Vec<Timing>,
}

fn plan(i: usize, sites: usize, vms: usize, net: bool) -> ClusterPlan {
    let name = format!("k{i}");
    let site = |j: usize| format!("s{}", (i + j) % sites);
    let vms: Vec<PlannedVm> = (0..vms)
        .map(|v| PlannedVm {
            name: if v == 0 {
                format!("{name}-fe")
            } else {
                format!("{name}-c{v}")
            },
            role: if v == 0 {
                Role::Frontend
            } else {
                Role::Compute
            },
            site: site(v % 3),
            host: "h0".into(),
            memory_mb: 256,
        })
        .collect();
    let attachments = (0..3.min(vms.len()))
        .map(|j| Attachment {
            site: site(j),
            host: "h0".into(),
            tap: "mvt1".into(),
            bridge: "mvb1".into(),
            edge_name: format!("{}-h0-0", site(j)),
        })
        .collect();
    ClusterPlan {
        name: name.clone(),
        origin: site(0),
        overlay: Overlay {
            community: format!("mvc-{name}"),
            secret_ref: format!("file:/tmp/{name}"),
            supernode: "198.18.0.1:7701".into(),
        },
        overlay_net: net.then(|| "198.19.1.0/24".parse().ok()).flatten(),
        pool: "198.19.0.0/16"
            .parse()
            .unwrap_or_else(|_| unreachable!("a valid prefix")),
        vms,
        attachments,
    }
}

fn timed<T>(timings: &mut Vec<Timing>, op: &str, f: impl FnOnce() -> T) -> T {
    let t = Instant::now();
    let v = f();
    timings.push(Timing {
        op: op.into(),
        ms: t.elapsed().as_secs_f64() * 1e3,
    });
    v
}

/// Fills an in-memory store and times the calls.
pub fn run(cfg: &StoreScaleConfig) -> Result<StoreScaleResult, StoreError> {
    let mut s = SqliteStore::open_in_memory()?;
    let t = Instant::now();
    for i in 0..cfg.sites {
        s.add_site(&format!("s{i}"), "198.18.0.1:7000", "00")?;
    }
    for i in 0..cfg.clusters {
        s.create_cluster(&plan(i, cfg.sites, cfg.vms_per_cluster, true))?;
    }
    let fill_ms = t.elapsed().as_secs_f64() * 1e3;
    let mut tm = Vec::new();
    let n = cfg.clusters;
    let p = plan(n, cfg.sites, cfg.vms_per_cluster, true);
    timed(&mut tm, "create_cluster (given network)", || {
        s.create_cluster(&p)
    })?;
    let p = plan(n + 1, cfg.sites, cfg.vms_per_cluster, false);
    // The pool's first free /24: refused once every one overlaps a cluster's network.
    let r = timed(&mut tm, "create_cluster (network from the pool)", || {
        s.create_cluster(&p)
    });
    match r {
        Ok(_) | Err(StoreError::NoSubnet(_)) => {}
        Err(e) => return Err(e),
    }
    let name = format!("k{}", n / 2);
    timed(&mut tm, "cluster (status)", || s.cluster(&name))?;
    timed(&mut tm, "set_vm_state", || {
        s.set_vm_state(&format!("{name}-fe"), "running")
    })?;
    timed(&mut tm, "set_cluster_state", || {
        s.set_cluster_state(&name, "running")
    })?;
    let vms = timed(&mut tm, "all_macs", || s.all_macs())?.len();
    timed(
        &mut tm,
        "clusters (`cluster list --json`: every cluster loaded)",
        || s.clusters(),
    )?;
    timed(&mut tm, "cluster_summaries (`cluster list`)", || {
        s.cluster_summaries(None, usize::MAX)
    })?;
    timed(&mut tm, "cluster_summaries (a page of 100)", || {
        s.cluster_summaries(Some(&name), 100)
    })?;
    timed(&mut tm, "cluster_of_vm (`vm start/stop` lookup)", || {
        s.cluster_of_vm(&format!("{name}-c1"))
    })?;
    timed(&mut tm, "sites", || s.sites())?;
    timed(&mut tm, "delete_cluster", || s.delete_cluster(&name))?;
    timed(&mut tm, "add_site", || {
        s.add_site("extra", "198.18.0.1:7000", "00")
    })?;
    timed(&mut tm, "remove_site (unused)", || s.remove_site("extra"))?;
    let busy = format!("s{}", cfg.sites / 2);
    match timed(&mut tm, "remove_site (in use: refused)", || {
        s.remove_site(&busy)
    }) {
        Ok(()) | Err(StoreError::InUse(_)) => {}
        Err(e) => return Err(e),
    }
    Ok(StoreScaleResult {
        config: cfg.clone(),
        vms,
        fill_ms,
        timings: tm,
    })
}
