//! The controller's store at scale: a SQLite store filled with synthetic sites, clusters
//! and VMs (through the same [`SqliteStore`] API the commands use), and the time of the
//! calls behind `cluster create/status/list/destroy`, `site list`, `vm list` (with the
//! JSON they print) and MAC allocation. [`agent`] times
//! one agent (served in-process on 127.0.0.1, netns driver, nothing started) holding
//! many clusters' reservations.

use std::time::Instant;

use control::auth::SigningKey;
use control::controller::{ControlError, Controller};
use control::model::{Attachment, Cluster, HostInfo, Overlay, Role, Vm};
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

/// One timed call: the median of its samples.
#[derive(Clone, Debug, Serialize)]
pub struct Timing {
    /// What was called.
    pub op: String,
    /// Wall time (ms), the median of the samples.
    pub ms: f64,
    /// Fastest sample (ms).
    pub min_ms: f64,
    /// Slowest sample (ms).
    pub max_ms: f64,
    /// Samples taken (calls that change the store: one).
    pub samples: usize,
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
    /// The 1-minute load average when the calls were timed.
    pub load: f64,
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

/// Times `f` `reps` times (at least once, and no more after it fails) and records the
/// median; the last result is returned.
fn timed<T, E>(
    timings: &mut Vec<Timing>,
    op: &str,
    reps: usize,
    mut f: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut ms = Vec::with_capacity(reps.max(1));
    let mut last = None;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let v = f();
        ms.push(t.elapsed().as_secs_f64() * 1e3);
        // A refusal is timed too (`remove_site` of a site in use).
        let failed = v.is_err();
        last = Some(v);
        if failed {
            break;
        }
    }
    ms.sort_by(f64::total_cmp);
    timings.push(Timing {
        op: op.into(),
        ms: ms[ms.len() / 2],
        min_ms: ms[0],
        max_ms: ms[ms.len() - 1],
        samples: ms.len(),
    });
    last.unwrap_or_else(|| unreachable!("at least one sample"))
}

/// `value` as `mvc ... --json` prints it (pretty), into nothing: bytes written.
fn json_out<T: Serialize>(value: &T) -> Result<usize, ControlError> {
    let mut out = Counter(0);
    serde_json::to_writer_pretty(&mut out, value)
        .map_err(|e| ControlError::Local(e.to_string()))?;
    Ok(out.0)
}

/// Every VM with its cluster's name from loaded clusters: what `vm list` printed from
/// before the listing (the baseline of its rows).
fn vm_pairs(clusters: Vec<Cluster>) -> Vec<(String, Vm)> {
    clusters
        .into_iter()
        .flat_map(|c| {
            let n = c.name;
            c.vms.into_iter().map(move |v| (n.clone(), v))
        })
        .collect()
}

/// A sink that counts what is written to it.
struct Counter(usize);

impl std::io::Write for Counter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0 += buf.len();
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Hosts each site reports in the filled store.
const HOSTS_PER_SITE: usize = 2;

/// VMs of the one large cluster whose status and VM list are timed.
const LARGE_CLUSTER_VMS: usize = 100;

/// Fills an in-memory store and times the calls, read-only ones `reps` times each
/// (median).
pub fn run(cfg: &StoreScaleConfig, reps: usize) -> Result<StoreScaleResult, ControlError> {
    let mut s = SqliteStore::open_in_memory()?;
    let t = Instant::now();
    let hosts: Vec<HostInfo> = (0..HOSTS_PER_SITE)
        .map(|h| HostInfo {
            name: format!("h{h}"),
            vcpus: 32,
            memory_mb: 131_072,
            max_vms: 64,
            free_vms: 64,
            free_memory_mb: 131_072,
        })
        .collect();
    for i in 0..cfg.sites {
        let name = format!("s{i}");
        s.add_site(&name, "198.18.0.1:7000", "00")?;
        s.set_hosts(&name, &hosts)?;
    }
    for i in 0..cfg.clusters {
        s.create_cluster(&plan(i, cfg.sites, cfg.vms_per_cluster, true))?;
    }
    let fill_ms = t.elapsed().as_secs_f64() * 1e3;
    let load = load_avg();
    let mut tm = Vec::new();
    let n = cfg.clusters;
    let p = plan(n, cfg.sites, cfg.vms_per_cluster, true);
    timed(&mut tm, "create_cluster (given network)", 1, || {
        s.create_cluster(&p)
    })?;
    let p = plan(n + 1, cfg.sites, cfg.vms_per_cluster, false);
    // The pool's first free /24: refused once every one overlaps a cluster's network.
    let r = timed(&mut tm, "create_cluster (network from the pool)", 1, || {
        s.create_cluster(&p)
    });
    match r {
        Ok(_) | Err(StoreError::NoSubnet(_)) => {}
        Err(e) => return Err(e.into()),
    }
    let large = plan(n + 2, cfg.sites, LARGE_CLUSTER_VMS, true);
    timed(
        &mut tm,
        "create_cluster (100 VMs, given network)",
        1,
        || s.create_cluster(&large),
    )?;
    let name = format!("k{}", n / 2);
    timed(&mut tm, "cluster (status)", reps, || s.cluster(&name))?;
    timed(
        &mut tm,
        "cluster (status of a 100-VM cluster)",
        reps,
        || s.cluster(&large.name),
    )?;
    timed(&mut tm, "set_vm_state", 1, || {
        s.set_vm_state(&format!("{name}-fe"), "running")
    })?;
    timed(&mut tm, "set_cluster_state", 1, || {
        s.set_cluster_state(&name, "running")
    })?;
    let vms = timed(&mut tm, "all_macs", reps, || s.all_macs())?.len();
    timed(
        &mut tm,
        "clusters (`cluster list --json`: every cluster loaded)",
        reps,
        || s.clusters(),
    )?;
    timed(
        &mut tm,
        "cluster_listing (`cluster list --json` loaded)",
        reps,
        || s.cluster_listing(None, usize::MAX),
    )?;
    // What `cluster list --json` does before its output, and its output into a sink.
    timed(
        &mut tm,
        "`cluster list --json`: clusters and their JSON",
        reps,
        || json_out(&s.cluster_listing(None, usize::MAX)?),
    )?;
    timed(
        &mut tm,
        "`cluster list --json`: the same from loaded clusters (before)",
        reps,
        || json_out(&s.clusters()?),
    )?;
    timed(
        &mut tm,
        "`cluster list --json --after k.. --limit 100`",
        reps,
        || json_out(&s.cluster_listing(Some(&name), 100)?),
    )?;
    // The listing one `cluster()` (four queries) per cluster: the baseline of the
    // listing in one pass, timed beside it under the same load.
    timed(
        &mut tm,
        "clusters, one load per cluster (before)",
        reps,
        || {
            s.cluster_summaries(None, usize::MAX)?
                .iter()
                .map(|c| s.cluster(&c.name))
                .collect::<Result<Vec<_>, _>>()
        },
    )?;
    timed(&mut tm, "cluster_summaries (`cluster list`)", reps, || {
        s.cluster_summaries(None, usize::MAX)
    })?;
    timed(&mut tm, "cluster_summaries (a page of 100)", reps, || {
        s.cluster_summaries(Some(&name), 100)
    })?;
    timed(
        &mut tm,
        "cluster_of_vm (`vm start/stop` lookup)",
        reps,
        || s.cluster_of_vm(&format!("{name}-c1")),
    )?;
    timed(&mut tm, "sites", reps, || s.sites())?;
    // The site baseline: one hosts query per site, as `site list` did.
    timed(
        &mut tm,
        "sites and each site's hosts (`site list` before)",
        reps,
        || {
            s.sites()?
                .into_iter()
                .map(|x| s.hosts(&x.name))
                .collect::<Result<Vec<_>, _>>()
        },
    )?;
    let key = SigningKey::generate().map_err(|e| ControlError::Local(e.to_string()))?;
    let dir = tempfile::tempdir().map_err(|e| ControlError::Local(e.to_string()))?;
    {
        let c = Controller {
            store: &mut s,
            key: &key,
            secrets_dir: dir.path().to_owned(),
            progress: &|_| {},
        };
        timed(&mut tm, "`site list --json`", reps, || {
            json_out(&c.site_list()?)
        })?;
        timed(&mut tm, "`vm list --json` (every VM)", reps, || {
            json_out(&c.store.cluster_listing(None, usize::MAX)?.vms())
        })?;
        timed(
            &mut tm,
            "`vm list --json` (every VM) from loaded clusters (before)",
            reps,
            || json_out(&vm_pairs(c.store.clusters()?)),
        )?;
        timed(
            &mut tm,
            "`vm list --json --cluster` of the 100-VM cluster",
            reps,
            || json_out(&c.store.cluster_listing_of(&large.name)?.vms()),
        )?;
        timed(
            &mut tm,
            "`vm list --json --cluster` of the 100-VM cluster, loaded (before)",
            reps,
            || json_out(&vm_pairs(vec![c.store.cluster(&large.name)?])),
        )?;
        // `vm list` in text: the listing and its table, against the pairs from loaded
        // clusters the table was made from before (the same table work per VM).
        timed(&mut tm, "`vm list` (text, every VM)", reps, || {
            Ok::<_, StoreError>(c.store.cluster_listing(None, usize::MAX)?.vm_table().len())
        })?;
        timed(
            &mut tm,
            "`vm list` (text): (cluster, VM) pairs from loaded clusters (before, without the table)",
            reps,
            || Ok::<_, StoreError>(vm_pairs(c.store.clusters()?).len()),
        )?;
    }
    timed(&mut tm, "delete_cluster", 1, || s.delete_cluster(&name))?;
    timed(&mut tm, "delete_cluster (100 VMs)", 1, || {
        s.delete_cluster(&large.name)
    })?;
    timed(&mut tm, "add_site", 1, || {
        s.add_site("extra", "198.18.0.1:7000", "00")
    })?;
    timed(&mut tm, "remove_site (unused)", 1, || {
        s.remove_site("extra")
    })?;
    let busy = format!("s{}", cfg.sites / 2);
    match timed(&mut tm, "remove_site (in use: refused)", 1, || {
        s.remove_site(&busy)
    }) {
        Ok(()) | Err(StoreError::InUse(_)) => {}
        Err(e) => return Err(e.into()),
    }
    Ok(StoreScaleResult {
        config: cfg.clone(),
        vms,
        fill_ms,
        load,
        timings: tm,
    })
}

/// Errors of the agent run.
#[derive(Debug, thiserror::Error)]
pub enum AgentRunError {
    /// Setting the agent up failed.
    #[error("agent: {0}")]
    Agent(#[from] control::agent::AgentError),
    /// A request failed.
    #[error("request: {0}")]
    Client(#[from] control::client::ClientError),
    /// Keys, files or sockets.
    #[error("{0}")]
    Setup(String),
}

/// One request timed `samples.len()` times.
#[derive(Clone, Debug, Serialize)]
pub struct OpStats {
    /// The request.
    pub op: String,
    /// Median (ms).
    pub median_ms: f64,
    /// Fastest (ms).
    pub min_ms: f64,
    /// Slowest (ms).
    pub max_ms: f64,
    /// Every sample (ms), in the order taken.
    pub samples: Vec<f64>,
}

impl OpStats {
    fn of(op: &str, mut samples: Vec<f64>) -> OpStats {
        let taken = samples.clone();
        samples.sort_by(f64::total_cmp);
        OpStats {
            op: op.into(),
            median_ms: samples.get(samples.len() / 2).copied().unwrap_or(0.0),
            min_ms: samples.first().copied().unwrap_or(0.0),
            max_ms: samples.last().copied().unwrap_or(0.0),
            samples: taken,
        }
    }
}

/// Result of an agent run at one number of reservations.
#[derive(Clone, Debug, Serialize)]
pub struct AgentScaleResult {
    /// Reservations the agent held when timed.
    pub clusters: usize,
    /// Time to make those added since the previous point, one reserve and one confirm
    /// each (ms).
    pub fill_ms: f64,
    /// Reservations added for this point.
    pub filled: usize,
    /// The 1-minute load average when the point was timed.
    pub load: f64,
    /// The requests, timed with the agent holding `clusters` (each sample reserves,
    /// confirms, lists and releases one more cluster).
    pub ops: Vec<OpStats>,
}

fn load_avg() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|t| t.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0)
}

/// One agent filled step by step to each of `points` confirmed one-VM reservations
/// through its protocol (signed requests over TCP, as the controller sends them); at
/// each point `reps` more clusters are reserved, confirmed, listed (`info`, every
/// reservation) and released, each request timed.
pub fn agent(points: &[usize], reps: usize) -> Result<Vec<AgentScaleResult>, AgentRunError> {
    use control::agent::{self, AgentConfig, AgentCore, HostSpec, OverlayImpl};
    use control::auth::Authorization;
    use control::client::AgentClient;
    use control::driver::NetnsDriver;
    use control::model::Site;
    use control::proto::{Request, SlotReq};
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    let clusters = points.iter().copied().max().unwrap_or(0);
    let setup = |e: &dyn std::fmt::Display| AgentRunError::Setup(e.to_string());
    let dir = tempfile::tempdir().map_err(|e| setup(&e))?;
    let key = agent::init(dir.path())?;
    let user = SigningKey::generate().map_err(|e| setup(&e))?;
    let room = u32::try_from(clusters + 16).unwrap_or(u32::MAX);
    agent::authorize(
        dir.path(),
        Authorization {
            key: user.public_hex(),
            comment: "bench".into(),
            may_create_clusters: true,
            max_vms: room,
            hosts: vec!["*".into()],
        },
    )?;
    let cfg = AgentConfig {
        claims_dir: dir.path().join("claims"),
        ..AgentConfig::new(
            "s0",
            dir.path(),
            vec![HostSpec {
                name: "h0".into(),
                vcpus: 64,
                memory_mb: u64::from(room) * 64,
                max_vms: room,
            }],
            OverlayImpl::N2n,
        )
    };
    let drv = NetnsDriver::new("mvcbench-", &dir.path().join("run"));
    let core = AgentCore::open(cfg, Box::new(drv))?;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| setup(&e))?;
    let addr = listener.local_addr().map_err(|e| setup(&e))?.to_string();
    let stop = Arc::new(AtomicBool::new(false));
    let hk = Arc::new(agent::load_key(dir.path())?);
    let s2 = stop.clone();
    let server =
        std::thread::spawn(move || agent::serve(Arc::new(Mutex::new(core)), hk, listener, s2));
    let site = Site {
        id: 0,
        name: "s0".into(),
        agent_addr: addr,
        agent_key: key,
    };
    let reserve = |i: usize| Request::Reserve {
        cluster: format!("k{i}"),
        slots: vec![SlotReq {
            name: format!("k{i}-fe"),
            host: "h0".into(),
            memory_mb: 64,
        }],
        supernode: false,
    };
    let run = || -> Result<Vec<AgentScaleResult>, AgentRunError> {
        let mut c = AgentClient::connect(&site, &user)?;
        let mut out = Vec::new();
        let mut held = 0;
        for &p in points {
            let t = Instant::now();
            let filled = p.saturating_sub(held);
            for i in held..p {
                c.call_value(&reserve(i))?;
                c.call_value(&Request::Confirm {
                    cluster: format!("k{i}"),
                })?;
            }
            held = held.max(p);
            let fill_ms = t.elapsed().as_secs_f64() * 1e3;
            let load = load_avg();
            let mut ms: Vec<Vec<f64>> = (0..4).map(|_| Vec::with_capacity(reps)).collect();
            let mut time = |k: usize, req: &Request| -> Result<(), AgentRunError> {
                let t = Instant::now();
                c.call_value(req)?;
                ms[k].push(t.elapsed().as_secs_f64() * 1e3);
                Ok(())
            };
            for _ in 0..reps {
                let name = format!("k{clusters}");
                time(0, &reserve(clusters))?;
                time(
                    1,
                    &Request::Confirm {
                        cluster: name.clone(),
                    },
                )?;
                time(2, &Request::Info)?;
                time(3, &Request::Release { cluster: name })?;
            }
            let names = [
                "reserve (one more cluster)",
                "confirm",
                "info (every reservation listed)",
                "release",
            ];
            out.push(AgentScaleResult {
                clusters: held,
                fill_ms,
                filled,
                load,
                ops: names
                    .iter()
                    .zip(ms)
                    .map(|(n, v)| OpStats::of(n, v))
                    .collect(),
            });
        }
        Ok(out)
    };
    let r = run();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = server.join();
    r
}
