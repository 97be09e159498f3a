//! The controller's operations behind the `mvc site|cluster|vm` commands.
//!
//! The controller is the `mvc` command itself plus its SQLite store on the origin
//! frontend: each command opens the store, talks to the agents it needs over signed,
//! encrypted channels, records the outcome and exits. Restarting it loses nothing.
use crate::auth::SigningKey;
use crate::client::{AgentClient, ClientError};
use crate::model::{hex, Attachment, Cluster, HostInfo, Overlay, OverlayNet, Role, Site, Vm};
use crate::proto::{DhcpService, InfoData, Request, ReserveData, SlotReq, VmSpec};
use crate::store::{ClusterPlan, PlannedVm, Store, StoreError};
use crate::validate;
use ring::rand::{SecureRandom, SystemRandom};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Controller failures.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Store failure.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Agent unreachable or refused.
    #[error(transparent)]
    Agent(#[from] ClientError),
    /// Not enough capacity; nothing was allocated.
    #[error("{0}; nothing was allocated")]
    Capacity(String),
    /// Bad arguments.
    #[error("{0}")]
    Usage(String),
    /// Local file problem.
    #[error("{0}")]
    Local(String),
    /// Several sites failed.
    #[error("{}", .0.join("; "))]
    Sites(Vec<String>),
}

/// Result of controller operations.
pub type Result<T> = std::result::Result<T, ControlError>;

/// Progress sink (stderr for humans; silent for `--json` callers that want only data).
pub type Progress<'a> = &'a (dyn Fn(&str) + Sync);

/// The controller: store, user key, and where cluster secrets live.
pub struct Controller<'a> {
    /// The store.
    pub store: &'a mut dyn Store,
    /// The user's signing key.
    pub key: &'a SigningKey,
    /// Directory for community secrets (0600 files).
    pub secrets_dir: PathBuf,
    /// Progress messages.
    pub progress: Progress<'a>,
}

/// A site with its reported hosts.
#[derive(Clone, Debug, Serialize)]
pub struct SiteView {
    /// The site.
    #[serde(flatten)]
    pub site: Site,
    /// Hosts and capacity as last reported.
    pub hosts: Vec<HostInfo>,
}

/// What `cluster create` needs.
#[derive(Clone, Debug)]
pub struct CreateArgs {
    /// Cluster name.
    pub name: String,
    /// Sites; the first is the origin (frontend VM, supernode).
    pub sites: Vec<String>,
    /// Computes per site.
    pub computes: Vec<u32>,
    /// Memory per compute in MiB.
    pub memory_mb: u64,
    /// Memory of the frontend VM in MiB.
    pub frontend_memory_mb: u64,
    /// The cluster's overlay network; `None`: the first free /24 of `pool`.
    pub overlay: Option<OverlayNet>,
    /// Where default overlay networks come from.
    pub pool: OverlayNet,
}

/// The overlay pool `cluster create` takes networks from unless told otherwise.
pub const DEFAULT_OVERLAY_POOL: &str = "198.19.0.0/16";

/// One VM's live view.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    /// Stored record.
    #[serde(flatten)]
    pub vm: Vm,
    /// State the agent reports, or `unknown (site down)`.
    pub live: String,
    /// How the VM is reached on its agent's machine (`netns:<name>`), while it runs.
    pub handle: Option<String>,
}

/// One site's live view within a cluster.
#[derive(Clone, Debug, Serialize)]
pub struct SiteStatus {
    /// Site name.
    pub site: String,
    /// Whether the agent answered.
    pub reachable: bool,
    /// Why not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the cluster's edge (and supernode) processes run there.
    pub overlay_up: Option<bool>,
    /// The edge's peers there as `mvc edge status` reports them.
    pub peers: Vec<PeerView>,
}

/// One overlay peer seen from a site's edge.
#[derive(Clone, Debug, Serialize)]
pub struct PeerView {
    /// Peer edge name.
    pub name: String,
    /// `direct` or `relayed`.
    pub path: String,
    /// Why that path.
    pub path_reason: Option<String>,
    /// Measured RTT in ms.
    pub rtt_ms: Option<f64>,
}

fn peers_of(status: &serde_json::Value) -> Vec<PeerView> {
    status["peers"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|p| PeerView {
                    name: p["name"].as_str().unwrap_or("?").to_string(),
                    path: p["path"].as_str().unwrap_or("?").to_string(),
                    path_reason: p["path_reason"].as_str().map(str::to_string),
                    rtt_ms: p["rtt_ms"].as_f64(),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `cluster status`.
#[derive(Clone, Debug, Serialize)]
pub struct ClusterStatus {
    /// Name.
    pub name: String,
    /// Stored state.
    pub state: String,
    /// Origin site.
    pub origin: String,
    /// Overlay.
    pub overlay: Overlay,
    /// Sites.
    pub sites: Vec<SiteStatus>,
    /// VMs.
    pub vms: Vec<VmStatus>,
}

/// What `cluster destroy` did.
#[derive(Clone, Debug, Serialize)]
pub struct DestroyReport {
    /// Whether this store knew the cluster.
    pub known: bool,
    /// Sites where a reservation was released.
    pub released_at: Vec<String>,
    /// Sites that could not be reached (with `--force`).
    pub unreachable: Vec<String>,
}

/// `cluster topology`.
#[derive(Clone, Debug, Serialize)]
pub struct Topology {
    /// Cluster.
    pub cluster: String,
    /// Node name, site, address.
    pub nodes: Vec<TopoNode>,
    /// Measured RTT between sites over the overlay, VM to VM (ms; null if unreachable).
    pub rtt_ms: Vec<SiteRtt>,
}

/// A node in the topology.
#[derive(Clone, Debug, Serialize)]
pub struct TopoNode {
    /// VM name.
    pub name: String,
    /// Site.
    pub site: String,
    /// Overlay address.
    pub ip: String,
    /// Frontend or compute.
    pub role: Role,
}

/// RTT between two sites.
#[derive(Clone, Debug, Serialize)]
pub struct SiteRtt {
    /// From.
    pub from: String,
    /// To.
    pub to: String,
    /// Average RTT in ms.
    pub ms: Option<f64>,
}

fn random_hex(n: usize) -> Result<String> {
    let mut b = vec![0u8; n];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| ControlError::Local("no system randomness".into()))?;
    Ok(hex(&b))
}

/// The IP part of a site's agent address.
fn agent_ip(site: &Site) -> String {
    site.agent_addr
        .rsplit_once(':')
        .map(|(h, _)| h.to_string())
        .unwrap_or_else(|| site.agent_addr.clone())
}

impl Controller<'_> {
    /// Register a site: the agent must answer with the pinned key and know the user.
    pub fn site_add(&mut self, name: &str, agent_addr: &str, agent_key: &str) -> Result<SiteView> {
        validate::site_name(name).map_err(|e| ControlError::Usage(e.0))?;
        validate::agent_addr(agent_addr).map_err(|e| ControlError::Usage(e.0))?;
        validate::public_key(agent_key).map_err(|e| ControlError::Usage(e.0))?;
        let info: InfoData =
            AgentClient::connect_to(name, agent_addr, agent_key, self.key)?.call(&Request::Info)?;
        if info.site != name {
            return Err(ControlError::Usage(format!(
                "the agent at {agent_addr} serves site '{}', not '{name}'",
                info.site
            )));
        }
        let site = self.store.add_site(name, agent_addr, agent_key)?;
        self.store.set_hosts(name, &info.hosts)?;
        Ok(SiteView {
            site,
            hosts: info.hosts,
        })
    }

    /// All sites with their last reported hosts.
    pub fn site_list(&self) -> Result<Vec<SiteView>> {
        Ok(self
            .store
            .sites_with_hosts()?
            .into_iter()
            .map(|(site, hosts)| SiteView { site, hosts })
            .collect())
    }

    /// Forget a site (refused while clusters use it).
    pub fn site_remove(&mut self, name: &str) -> Result<()> {
        Ok(self.store.remove_site(name)?)
    }

    /// Plan, reserve at every site (all or nothing), record, and bring the overlay up.
    pub fn cluster_create(&mut self, args: &CreateArgs) -> Result<Cluster> {
        // Names, counts and sizes are judged before any agent is asked.
        validate::create_args(args).map_err(|e| ControlError::Usage(e.0))?;
        if self.store.cluster(&args.name).is_ok() {
            return Err(StoreError::Exists {
                kind: "cluster",
                name: args.name.clone(),
            }
            .into());
        }
        let sites: Vec<Site> = args
            .sites
            .iter()
            .map(|s| self.store.site(s))
            .collect::<std::result::Result<_, _>>()?;
        self.check_overlay(args)?;
        // 1. Fresh capacity from every agent, in parallel.
        (self.progress)("asking each site for its capacity");
        let infos = self.each_site(&sites, |c, _| c.call::<InfoData>(&Request::Info));
        let mut errs = Vec::new();
        let mut free: BTreeMap<String, Vec<HostInfo>> = BTreeMap::new();
        for (site, r) in sites.iter().zip(infos) {
            match r {
                Ok(i) => {
                    self.store.set_hosts(&site.name, &i.hosts)?;
                    free.insert(site.name.clone(), i.hosts);
                }
                Err(e) => errs.push(e.to_string()),
            }
        }
        if !errs.is_empty() {
            return Err(ControlError::Sites(errs));
        }
        // 2. Placement, refused before anything is reserved.
        let mut vms = Vec::new();
        let mut k = 0;
        for (i, site) in args.sites.iter().enumerate() {
            let hosts = free.get_mut(site).expect("asked above");
            let mut want: Vec<(String, Role, u64)> = Vec::new();
            if i == 0 {
                want.push((
                    format!("{}-fe", args.name),
                    Role::Frontend,
                    args.frontend_memory_mb,
                ));
            }
            for _ in 0..args.computes[i] {
                k += 1;
                want.push((format!("{}-c{k}", args.name), Role::Compute, args.memory_mb));
            }
            let total_mem: u64 = want.iter().map(|w| w.2).sum();
            for (name, role, mem) in want.iter().cloned() {
                let best = hosts
                    .iter_mut()
                    .filter(|h| h.free_vms > 0 && h.free_memory_mb >= mem)
                    .max_by_key(|h| (h.free_vms, h.free_memory_mb));
                let Some(h) = best else {
                    let have: Vec<String> = free[site]
                        .iter()
                        .map(|h| {
                            format!(
                                "{} {} VM slots / {} MiB free",
                                h.name, h.free_vms, h.free_memory_mb
                            )
                        })
                        .collect();
                    return Err(ControlError::Capacity(format!(
                        "site {site} lacks capacity: asked {} VMs / {total_mem} MiB, hosts: {}",
                        want.len(),
                        if have.is_empty() {
                            "none".into()
                        } else {
                            have.join(", ")
                        }
                    )));
                };
                h.free_vms -= 1;
                h.free_memory_mb -= mem;
                vms.push(PlannedVm {
                    name,
                    role,
                    site: site.clone(),
                    host: h.name.clone(),
                    memory_mb: mem,
                });
            }
        }
        let room = args.overlay.map_or(
            args.pool
                .subnet(args.pool.prefix.max(24), 0)
                .map_or(0, |n| n.max_vms()),
            |n| n.max_vms(),
        );
        if vms.len() > room {
            return Err(ControlError::Usage(format!(
                "{} VMs do not fit the overlay network (at most {room}); pass a larger --overlay",
                vms.len()
            )));
        }
        // 3. Reserve at every site; each agent names the cluster's devices and port
        //    there. Any refusal releases all.
        (self.progress)(&format!(
            "reserving {} VMs at {} site(s)",
            vms.len(),
            sites.len()
        ));
        let origin = args.sites[0].clone();
        let res = self.each_site(&sites, |cl, site| {
            let slots = vms
                .iter()
                .filter(|v| v.site == site.name)
                .map(|v| SlotReq {
                    name: v.name.clone(),
                    host: v.host.clone(),
                    memory_mb: v.memory_mb,
                })
                .collect();
            cl.call::<ReserveData>(&Request::Reserve {
                cluster: args.name.clone(),
                slots,
                supernode: site.name == origin,
            })
        });
        let mut reserved = BTreeMap::new();
        let mut errs = Vec::new();
        for (site, r) in sites.iter().zip(res) {
            match r {
                Ok(d) => {
                    reserved.insert(site.name.clone(), d);
                }
                Err(e) => errs.push(e.to_string()),
            }
        }
        if !errs.is_empty() {
            self.release_all(&args.name, &sites);
            return Err(ControlError::Capacity(errs.join("; ")));
        }
        // 4. Record (one transaction: cluster, overlay, VMs with MACs, attachments).
        let secret = random_hex(32)?;
        let community = format!("mvc{}", random_hex(4)?);
        let secret_path = self.secrets_dir.join(format!("{}.secret", args.name));
        crate::agent::write_private(&secret_path, &secret)
            .map_err(|e| ControlError::Local(e.to_string()))?;
        let origin_ip = agent_ip(&sites[0]);
        let Some(port) = reserved[&origin].supernode_port else {
            self.release_all(&args.name, &sites);
            let _ = std::fs::remove_file(&secret_path);
            return Err(ControlError::Sites(vec![format!(
                "site {origin}'s agent gave the cluster no supernode port"
            )]));
        };
        let mut attachments: Vec<Attachment> = Vec::new();
        for v in &vms {
            if !attachments
                .iter()
                .any(|a| a.site == v.site && a.host == v.host)
            {
                let d = &reserved[&v.site];
                let n = attachments.len();
                attachments.push(Attachment {
                    site: v.site.clone(),
                    host: v.host.clone(),
                    tap: d.tap.clone(),
                    bridge: d.bridge.clone(),
                    edge_name: format!("{}-{}-{n}", v.site, v.host),
                });
            }
        }
        let plan = ClusterPlan {
            name: args.name.clone(),
            origin: origin.clone(),
            overlay: Overlay {
                community,
                secret_ref: format!("file:{}", secret_path.display()),
                supernode: format!("{origin_ip}:{port}"),
            },
            overlay_net: args.overlay,
            pool: args.pool,
            vms,
            attachments,
        };
        let cluster = match self.store.create_cluster(&plan) {
            Ok(c) => c,
            Err(e) => {
                self.release_all(&args.name, &sites);
                let _ = std::fs::remove_file(&secret_path);
                return Err(e.into());
            }
        };
        // 5. The store holds it: confirm at every site (an unconfirmed reservation
        //    lapses at its agent after the lease).
        let res = self.each_site(&sites, |cl, _| {
            cl.call_value(&Request::Confirm {
                cluster: args.name.clone(),
            })
        });
        let errs: Vec<String> = res
            .iter()
            .filter_map(|r| r.as_ref().err().map(|e| e.to_string()))
            .collect();
        if !errs.is_empty() {
            self.undo(&cluster, &sites);
            return Err(ControlError::Sites(errs));
        }
        // 6. Overlay: supernode on the origin frontend, one edge per VM host.
        if let Err(e) = self.start_overlay(&cluster, &secret) {
            self.undo(&cluster, &sites);
            return Err(e);
        }
        (self.progress)(&format!(
            "cluster {} created: overlay {}, community {}, supernode {}, {} VMs",
            cluster.name,
            cluster.overlay_net,
            cluster.overlay.community,
            cluster.overlay.supernode,
            cluster.vms.len()
        ));
        Ok(self.store.cluster(&cluster.name)?)
    }

    /// Release `name` at every site of `sites` (errors ignored: an unconfirmed
    /// reservation an unreachable agent keeps lapses by itself).
    fn release_all(&self, name: &str, sites: &[Site]) {
        let _ = self.each_site(sites, |cl, _| {
            cl.call_value(&Request::Release {
                cluster: name.into(),
            })
        });
    }

    /// Refuse overlay networks and pools that hold an address of the underlay (an
    /// agent's address), or are too large or too small to serve.
    fn check_overlay(&self, args: &CreateArgs) -> Result<()> {
        let mut nets = vec![("--overlay-pool", args.pool)];
        if let Some(n) = args.overlay {
            nets.push(("--overlay", n));
            if !(crate::model::MIN_OVERLAY_PREFIX..=crate::model::MAX_OVERLAY_PREFIX)
                .contains(&n.prefix)
            {
                return Err(ControlError::Usage(format!(
                    "--overlay {n}: the prefix must be /{} to /{}",
                    crate::model::MIN_OVERLAY_PREFIX,
                    crate::model::MAX_OVERLAY_PREFIX
                )));
            }
        } else if args.pool.prefix > 24 {
            return Err(ControlError::Usage(format!(
                "--overlay-pool {}: clusters take /24s from it, so it must be /24 or larger",
                args.pool
            )));
        }
        for site in self.store.sites()? {
            let Ok(ip) = agent_ip(&site).parse::<std::net::Ipv4Addr>() else {
                continue;
            };
            for (flag, n) in &nets {
                if n.contains(ip) {
                    return Err(ControlError::Usage(format!(
                        "{flag} {n} holds site {}'s agent address {ip}: overlay addresses \
                         must not overlap the underlay",
                        site.name
                    )));
                }
            }
        }
        Ok(())
    }

    fn undo(&mut self, cluster: &Cluster, sites: &[Site]) {
        self.release_all(&cluster.name, sites);
        let _ = self.store.delete_cluster(&cluster.name);
        if let Some(p) = cluster.overlay.secret_ref.strip_prefix("file:") {
            let _ = std::fs::remove_file(p);
        }
    }

    fn secret(cluster: &Cluster) -> Result<String> {
        let p = cluster
            .overlay
            .secret_ref
            .strip_prefix("file:")
            .ok_or_else(|| {
                ControlError::Local(format!(
                    "unknown secret reference {}",
                    cluster.overlay.secret_ref
                ))
            })?;
        std::fs::read_to_string(p)
            .map(|s| s.trim().to_string())
            .map_err(|e| ControlError::Local(format!("secret {p}: {e}")))
    }

    pub(crate) fn cluster_sites(&self, cluster: &Cluster) -> Result<Vec<Site>> {
        let mut names: Vec<String> = vec![cluster.origin.clone()];
        for v in &cluster.vms {
            if !names.contains(&v.site) {
                names.push(v.site.clone());
            }
        }
        Ok(names
            .iter()
            .map(|n| self.store.site(n))
            .collect::<std::result::Result<_, _>>()?)
    }

    fn start_overlay(&mut self, cluster: &Cluster, secret: &str) -> Result<()> {
        let sites = self.cluster_sites(cluster)?;
        (self.progress)(&format!(
            "starting supernode at {} ({})",
            cluster.origin, cluster.overlay.supernode
        ));
        // The origin first: its supernode must be up before edges elsewhere register.
        for chunk in [&sites[..1], &sites[1..]] {
            let res = self.each_site(chunk, |cl, site| {
                for a in cluster.attachments.iter().filter(|a| a.site == site.name) {
                    cl.call_value(&Request::StartOverlay {
                        cluster: cluster.name.clone(),
                        community: cluster.overlay.community.clone(),
                        secret: secret.into(),
                        supernode: cluster.overlay.supernode.clone(),
                        edge_name: a.edge_name.clone(),
                    })?;
                    (self.progress)(&format!("edge {} up at site {}", a.edge_name, a.site));
                }
                Ok(())
            });
            let errs: Vec<String> = res
                .into_iter()
                .filter_map(|r| r.err().map(|e| e.to_string()))
                .collect();
            if !errs.is_empty() {
                return Err(ControlError::Sites(errs));
            }
        }
        Ok(())
    }

    /// Run `f` against each site's agent in parallel, one connection per site.
    pub(crate) fn each_site<T: Send>(
        &self,
        sites: &[Site],
        f: impl Fn(&mut AgentClient, &Site) -> std::result::Result<T, ClientError> + Sync,
    ) -> Vec<std::result::Result<T, ClientError>> {
        let key = self.key;
        std::thread::scope(|s| {
            let hs: Vec<_> = sites
                .iter()
                .map(|site| {
                    let f = &f;
                    s.spawn(move || {
                        let mut c = AgentClient::connect(site, key)?;
                        f(&mut c, site)
                    })
                })
                .collect();
            hs.into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(ClientError::Local("site worker panicked".into())))
                })
                .collect()
        })
    }

    fn spec(cluster: &Cluster, vm: &Vm, stack: bool) -> VmSpec {
        // The agent replaces it with the bridge it allocated; sent for older readers.
        let bridge = cluster
            .attachments
            .iter()
            .find(|a| a.site == vm.site && a.host == vm.host)
            .map(|a| a.bridge.clone())
            .unwrap_or_default();
        let net = cluster.overlay_net;
        let dhcp = (vm.role == Role::Frontend).then(|| DhcpService {
            address: cluster.frontend_ip().to_string(),
            prefix: net.prefix,
            range: (
                net.host(10).map(|a| a.to_string()).unwrap_or_default(),
                net.host(net.size() - 2)
                    .map(|a| a.to_string())
                    .unwrap_or_default(),
            ),
            hosts: cluster
                .vms
                .iter()
                .filter(|v| v.role == Role::Compute)
                .map(|v| (v.mac, v.ip.to_string(), v.name.clone()))
                .collect(),
        });
        VmSpec {
            cluster: cluster.name.clone(),
            name: vm.name.clone(),
            role: vm.role,
            host: vm.host.clone(),
            mac: vm.mac,
            memory_mb: vm.memory_mb,
            bridge,
            dhcp,
            local_name: String::new(),
            nic: String::new(),
            stack,
        }
    }

    /// Start a cluster: overlay (idempotent), the frontend VM, then the computes at all
    /// sites in parallel; wait until every compute holds its DHCP lease.
    pub fn cluster_start(&mut self, name: &str, lease_timeout: Duration) -> Result<Cluster> {
        let cluster = self.store.cluster(name)?;
        let secret = Self::secret(&cluster)?;
        self.start_overlay(&cluster, &secret)?;
        let fe = cluster
            .frontend()
            .ok_or_else(|| ControlError::Local("cluster has no frontend".into()))?
            .clone();
        let origin = self.store.site(&cluster.origin)?;
        let stack = self.has_stack(&cluster.name);
        (self.progress)(&format!(
            "starting frontend {} at site {}",
            fe.name, fe.site
        ));
        AgentClient::connect(&origin, self.key)?.call_value(&Request::StartVm {
            spec: Self::spec(&cluster, &fe, stack),
        })?;
        self.store.set_vm_state(&fe.name, "running")?;
        let sites = self.cluster_sites(&cluster)?;
        let total = cluster.vms.len() - 1;
        let done = std::sync::atomic::AtomicUsize::new(0);
        let res = self.each_site(&sites, |cl, site| {
            let mut started = Vec::new();
            for v in cluster
                .vms
                .iter()
                .filter(|v| v.site == site.name && v.role == Role::Compute)
            {
                cl.call_value(&Request::StartVm {
                    spec: Self::spec(&cluster, v, stack),
                })?;
                let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                (self.progress)(&format!(
                    "[{n}/{total}] {} started at site {} (host {})",
                    v.name, v.site, v.host
                ));
                started.push(v.name.clone());
            }
            Ok(started)
        });
        let mut errs = Vec::new();
        for r in res {
            match r {
                Ok(names) => {
                    for n in names {
                        self.store.set_vm_state(&n, "running")?;
                    }
                }
                Err(e) => errs.push(e.to_string()),
            }
        }
        if !errs.is_empty() {
            return Err(ControlError::Sites(errs));
        }
        // Every compute must get its address from the frontend's DHCP server.
        let deadline = Instant::now() + lease_timeout;
        let leased = std::sync::atomic::AtomicUsize::new(0);
        let res = self.each_site(&sites, |cl, site| {
            for v in cluster
                .vms
                .iter()
                .filter(|v| v.site == site.name && v.role == Role::Compute)
            {
                loop {
                    let a: Option<String> = cl.call(&Request::VmAddress {
                        cluster: cluster.name.clone(),
                        vm: v.name.clone(),
                    })?;
                    if a.as_deref() == Some(&v.ip.to_string()) {
                        let n = leased.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
                        (self.progress)(&format!(
                            "[{n}/{total}] {} leased {} from the frontend (site {})",
                            v.name, v.ip, v.site
                        ));
                        break;
                    }
                    if Instant::now() > deadline {
                        return Err(ClientError::Refused(format!(
                            "{} at site {} got no DHCP lease from the frontend within {} s ({})",
                            v.name,
                            v.site,
                            lease_timeout.as_secs(),
                            match &a {
                                Some(a) => format!("it has {a}, expected {}", v.ip),
                                None => "it has no address".into(),
                            }
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(250));
                }
            }
            Ok(())
        });
        let errs: Vec<String> = res
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        if !errs.is_empty() {
            return Err(ControlError::Sites(errs));
        }
        self.store.set_cluster_state(name, "running")?;
        Ok(self.store.cluster(name)?)
    }

    /// Stored records plus what each site's agent says now.
    pub fn cluster_status(&self, name: &str) -> Result<ClusterStatus> {
        let cluster = self.store.cluster(name)?;
        let sites = self.cluster_sites(&cluster)?;
        let infos = self.each_site(&sites, |c, _| c.call::<InfoData>(&Request::Info));
        let mut site_status = Vec::new();
        let mut live: BTreeMap<String, (String, Option<String>)> = BTreeMap::new();
        for (site, r) in sites.iter().zip(infos) {
            match r {
                Ok(i) => {
                    for v in i.vms.iter().filter(|v| v.cluster == cluster.name) {
                        live.insert(v.name.clone(), (v.state.clone(), v.handle.clone()));
                    }
                    site_status.push(SiteStatus {
                        site: site.name.clone(),
                        reachable: true,
                        error: None,
                        overlay_up: i.overlays.iter().find(|o| o.0 == cluster.name).map(|o| o.1),
                        peers: i
                            .edges
                            .iter()
                            .filter(|e| e.0 == cluster.name)
                            .flat_map(|e| peers_of(&e.1))
                            .collect(),
                    });
                }
                Err(e) => site_status.push(SiteStatus {
                    site: site.name.clone(),
                    reachable: false,
                    error: Some(e.to_string()),
                    overlay_up: None,
                    peers: Vec::new(),
                }),
            }
        }
        let vms = cluster
            .vms
            .iter()
            .map(|v| {
                let up = site_status.iter().any(|s| s.site == v.site && s.reachable);
                let here = live.get(&v.name);
                VmStatus {
                    vm: v.clone(),
                    live: match (up, here) {
                        (false, _) => "unknown (site down)".into(),
                        (true, Some((state, _))) => state.clone(),
                        (true, None) => "missing at agent".into(),
                    },
                    handle: here.and_then(|h| h.1.clone()),
                }
            })
            .collect();
        Ok(ClusterStatus {
            name: cluster.name.clone(),
            state: cluster.state.clone(),
            origin: cluster.origin.clone(),
            overlay: cluster.overlay.clone(),
            sites: site_status,
            vms,
        })
    }

    /// Stop and release everything at every site, then forget the cluster. With
    /// `force`, sites that cannot be reached are skipped (their admin cleans up), and
    /// every registered site is also asked to release any reservation of this name
    /// that your key holds there, whether this store knows the cluster or not (what a
    /// crash between reserving and recording can leave).
    pub fn cluster_destroy(&mut self, name: &str, force: bool) -> Result<DestroyReport> {
        let known = match self.store.cluster(name) {
            Ok(c) => Some(c),
            Err(StoreError::NotFound { .. }) if force => None,
            Err(e) => return Err(e.into()),
        };
        let sites = match &known {
            Some(c) if !force => self.cluster_sites(c)?,
            _ => self.store.sites()?,
        };
        (self.progress)(&format!("destroying {name} at {} site(s)", sites.len()));
        let res = self.each_site(&sites, |c, _| {
            c.call::<String>(&Request::Release {
                cluster: name.into(),
            })
        });
        let mut errs = Vec::new();
        let mut released_at = Vec::new();
        for (site, r) in sites.iter().zip(res) {
            match r {
                Ok(s) if s == "released" => released_at.push(site.name.clone()),
                Ok(_) => {}
                Err(e) => errs.push(e.to_string()),
            }
        }
        if !errs.is_empty() && !force {
            return Err(ControlError::Sites(
                errs.into_iter()
                    .chain(["cluster kept; retry, or pass --force to forget it anyway".to_string()])
                    .collect(),
            ));
        }
        match &known {
            Some(cluster) => {
                self.store.delete_cluster(name)?;
                if let Some(p) = cluster.overlay.secret_ref.strip_prefix("file:") {
                    let _ = std::fs::remove_file(p);
                }
            }
            None if released_at.is_empty() && errs.is_empty() => {
                return Err(StoreError::NotFound {
                    kind: "cluster",
                    name: name.into(),
                }
                .into());
            }
            None => {}
        }
        Ok(DestroyReport {
            known: known.is_some(),
            released_at,
            unreachable: errs,
        })
    }

    fn vm_and_cluster(&self, vm: &str) -> Result<(Cluster, Vm)> {
        let c = self.store.cluster_of_vm(vm)?;
        match c.vms.iter().find(|v| v.name == vm).cloned() {
            Some(v) => Ok((c, v)),
            None => Err(StoreError::NotFound {
                kind: "vm",
                name: vm.into(),
            }
            .into()),
        }
    }

    /// Start one VM (its cluster's overlay must be up at its site).
    pub fn vm_start(&mut self, vm: &str) -> Result<Vm> {
        let (c, v) = self.vm_and_cluster(vm)?;
        let site = self.store.site(&v.site)?;
        AgentClient::connect(&site, self.key)?.call_value(&Request::StartVm {
            spec: Self::spec(&c, &v, self.has_stack(&c.name)),
        })?;
        self.store.set_vm_state(vm, "running")?;
        Ok(self.vm_and_cluster(vm)?.1)
    }

    /// Stop one VM.
    pub fn vm_stop(&mut self, vm: &str) -> Result<Vm> {
        let (c, v) = self.vm_and_cluster(vm)?;
        let site = self.store.site(&v.site)?;
        AgentClient::connect(&site, self.key)?.call_value(&Request::StopVm {
            cluster: c.name.clone(),
            vm: vm.into(),
        })?;
        self.store.set_vm_state(vm, "stopped")?;
        self.stack_node_stopped(&c, vm);
        Ok(self.vm_and_cluster(vm)?.1)
    }

    /// How each VM is reached on its agent's machine (`netns:<name>`), from the agents.
    pub fn vm_handles(&self, name: &str) -> Result<BTreeMap<String, String>> {
        let cluster = self.store.cluster(name)?;
        let sites = self.cluster_sites(&cluster)?;
        let mut out = BTreeMap::new();
        for r in self.each_site(&sites, |c, _| c.call::<InfoData>(&Request::Info)) {
            for v in r?.vms {
                if let (true, Some(h)) = (v.cluster == name, v.handle) {
                    out.insert(v.name, h);
                }
            }
        }
        Ok(out)
    }

    /// Node list and RTT between sites measured over the overlay, VM to VM.
    pub fn topology(&self, name: &str) -> Result<Topology> {
        let cluster = self.store.cluster(name)?;
        let sites = self.cluster_sites(&cluster)?;
        let nodes: Vec<TopoNode> = cluster
            .vms
            .iter()
            .map(|v| TopoNode {
                name: v.name.clone(),
                site: v.site.clone(),
                ip: v.ip.to_string(),
                role: v.role,
            })
            .collect();
        // One representative VM per site pings one VM of every other site.
        let rep: BTreeMap<String, &Vm> = sites
            .iter()
            .filter_map(|s| {
                cluster
                    .vms
                    .iter()
                    .find(|v| v.site == s.name)
                    .map(|v| (s.name.clone(), v))
            })
            .collect();
        let res = self.each_site(&sites, |c, site| {
            let Some(from) = rep.get(&site.name) else {
                return Ok(Vec::new());
            };
            let others: Vec<(&String, &&Vm)> =
                rep.iter().filter(|(s, _)| **s != site.name).collect();
            let rtts: Vec<Option<f64>> = c.call(&Request::Ping {
                cluster: cluster.name.clone(),
                vm: from.name.clone(),
                targets: others.iter().map(|(_, v)| v.ip.to_string()).collect(),
            })?;
            Ok(others
                .iter()
                .zip(rtts)
                .map(|((s, _), ms)| SiteRtt {
                    from: site.name.clone(),
                    to: (*s).clone(),
                    ms,
                })
                .collect())
        });
        let mut rtt_ms = Vec::new();
        for r in res {
            rtt_ms.extend(r?);
        }
        Ok(Topology {
            cluster: cluster.name,
            nodes,
            rtt_ms,
        })
    }
}

/// MPI hostfile: one line per node, frontend first, `slots` each.
pub fn hostfile(cluster: &Cluster, slots: u32, computes_only: bool) -> String {
    cluster
        .vms
        .iter()
        .filter(|v| !computes_only || v.role == Role::Compute)
        .map(|v| format!("{} slots={slots}  # {} site {}\n", v.ip, v.name, v.site))
        .collect()
}

/// Slurm `topology.conf` (tree plugin): one leaf switch per site, one top switch; the
/// measured inter-site RTTs are given as comments.
pub fn slurm_topology(t: &Topology) -> String {
    let mut by_site: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for n in &t.nodes {
        by_site.entry(&n.site).or_default().push(&n.name);
    }
    let mut out = format!(
        "# topology.conf for cluster {} (TopologyPlugin=topology/tree)\n",
        t.cluster
    );
    for r in &t.rtt_ms {
        match r.ms {
            Some(ms) => out.push_str(&format!("# rtt {} -> {}: {ms:.3} ms\n", r.from, r.to)),
            None => out.push_str(&format!("# rtt {} -> {}: unreachable\n", r.from, r.to)),
        }
    }
    for (site, nodes) in &by_site {
        out.push_str(&format!(
            "SwitchName=site-{site} Nodes={}\n",
            nodes.join(",")
        ));
    }
    let sw: Vec<String> = by_site.keys().map(|s| format!("site-{s}")).collect();
    out.push_str(&format!("SwitchName=wan Switches={}\n", sw.join(",")));
    out
}

/// A `plm_rsh_agent` launcher for netns VMs on one machine: OpenMPI calls it as
/// `launcher <host> <command...>`; it runs the command inside that VM's namespace, in
/// its own UTS namespace named after the VM (so each rank sees its node's name).
pub fn netns_launcher(cluster: &Cluster, handles: &BTreeMap<String, String>) -> Result<String> {
    let mut s = String::from(
        "#!/bin/sh\n# OpenMPI launcher for netns VMs (written by `mvc cluster hostfile --launcher`).\n\
         host=\"$1\"; shift\ncase \"$host\" in\n",
    );
    for v in &cluster.vms {
        let h = handles
            .get(&v.name)
            .ok_or_else(|| ControlError::Local(format!("VM {} is not running", v.name)))?;
        let ns = h
            .strip_prefix("netns:")
            .ok_or_else(|| ControlError::Usage(format!("VM {} is not a netns VM ({h})", v.name)))?;
        s.push_str(&format!(
            "  {}|{}) ns={ns}; name={} ;;\n",
            v.ip, v.name, v.name
        ));
    }
    s.push_str(
        "  *) echo \"unknown host $host\" >&2; exit 255 ;;\nesac\n\
         exec ip netns exec \"$ns\" unshare --uts sh -c 'hostname \"$0\"; exec sh -c \"$*\"' \"$name\" \"$@\"\n",
    );
    Ok(s)
}
