//! `mvc agent`: the per-site appliance on each frontend.
//!
//! It reports its site's VM hosts and free capacity, reserves VM slots for clusters,
//! starts and stops the VMs (through a [`VmDriver`]) and the overlay processes (edge,
//! and on the origin frontend the supernode) there. Every request arrives signed by a
//! user key over the encrypted [`crate::channel`]; the site admin's authorisations
//! (`authorized.json`, written by `mvc agent authorize`) decide what each key may do.
//!
//! State directory layout: `agent.key` (the agent's Ed25519 key, PKCS#8 hex, 0600),
//! `authorized.json`, `reservations/c<n>.json` (one file per reservation, survives
//! restarts and crashes: [`state`]), `secrets/` (community secrets, 0600), `run/` (logs,
//! leases, status sockets), `disks/`.
//!
//! The agent owns everything at its site: it numbers each reservation (`n`, unique
//! among all users' clusters here, and claimed in [`crate::claims`] so that agents
//! sharing a machine never pick the same) and derives every name from it (bridge `mvb<n>`,
//! TAP `mvt<n>`, VM `c<n>-<vm>` with NIC `mvv<n>-<i>`, files `c<n>.*` and
//! `c<n>-<vm>.*`), saving them before it makes anything, so after a crash every
//! device, process and file it may have made is named in its reservation file. It touches
//! nothing its store does not name as belonging to the cluster at hand.
use crate::atomic_file::{self, Durability};
use crate::auth::{AuthError, Authorization, Envelope, SigningKey, Verifier};
use crate::channel::{self, ChannelError};
use crate::claims::{self, Claims};
use crate::driver::{link_exists, DriverError, RunningVm, VmDriver};
use crate::model::HostInfo;
use crate::process::{self, pids_marked, run, stop_child, ProcSnapshot};
use crate::proto::{
    AgentVm, Body, InfoData, Reply, Request, ReservationView, ReserveData, SlotReq, VmSpec,
    PROTO_VERSION,
};
use crate::validate::quote;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod migrate;
mod stack;
pub mod state;

/// Agent failures outside a request (start-up, files).
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// A state file could not be read or written.
    #[error("{path}: {err}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        err: std::io::Error,
    },
    /// A state file did not parse.
    #[error("{path}: {err}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Parser error.
        err: serde_json::Error,
    },
    /// The agent key is missing or bad.
    #[error("agent key {path}: {err} (run `mvc agent init` first)")]
    Key {
        /// Key file.
        path: PathBuf,
        /// Why.
        err: String,
    },
    /// Bad configuration.
    #[error("{0}")]
    Config(String),
}

/// Which overlay implementation the agent runs for clusters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OverlayImpl {
    /// `mvc edge` / `mvc supernode` of this project (path of the `mvc` binary).
    Mvc(PathBuf),
    /// Debian's n2n 1.3 `edge` / `supernode` (the 2012 paper's overlay), for comparison.
    N2n,
}

/// A VM host the agent manages, as declared by the site admin.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostSpec {
    /// Name.
    pub name: String,
    /// CPUs.
    pub vcpus: u32,
    /// Memory for VMs in MiB.
    pub memory_mb: u64,
    /// Most VMs at once.
    pub max_vms: u32,
}

impl std::str::FromStr for HostSpec {
    type Err = String;
    /// `name:vcpus:memory_mb:max_vms`, checked by [`crate::validate::host_spec`].
    fn from_str(s: &str) -> Result<HostSpec, String> {
        crate::validate::host_spec(s).map_err(|e| e.0)
    }
}

/// Seconds an unconfirmed reservation holds by default.
pub const DEFAULT_LEASE_SECS: u64 = 120;
/// UDP ports the agent gives supernodes by default.
pub const DEFAULT_SUPERNODE_PORTS: (u16, u16) = (7700, 7999);
/// Most clusters the agents of one machine hold together (numbers 1..=this, claimed
/// host-wide; device names stay within the kernel's 15 bytes).
pub const MAX_CLUSTERS: u32 = 65535;

/// Agent configuration.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// Site name this agent serves.
    pub site: String,
    /// State directory.
    pub state_dir: PathBuf,
    /// VM hosts of the site.
    pub hosts: Vec<HostSpec>,
    /// Overlay implementation.
    pub overlay: OverlayImpl,
    /// Seconds a reservation holds until the controller confirms it.
    pub lease_secs: u64,
    /// UDP ports (first, last) supernodes of clusters may listen on.
    pub supernode_ports: (u16, u16),
    /// The machine's claim directory, shared by every agent on it ([`crate::claims`]).
    pub claims_dir: PathBuf,
}

impl AgentConfig {
    /// A configuration with the default lease and supernode ports.
    pub fn new(site: &str, state_dir: &Path, hosts: Vec<HostSpec>, overlay: OverlayImpl) -> Self {
        AgentConfig {
            site: site.into(),
            state_dir: state_dir.into(),
            hosts,
            overlay,
            lease_secs: DEFAULT_LEASE_SECS,
            supernode_ports: DEFAULT_SUPERNODE_PORTS,
            claims_dir: PathBuf::from(crate::claims::DEFAULT_DIR),
        }
    }
}

/// One reserved VM slot. `local` (namespace and file names) and `nic` (host-side
/// device) are allocated and saved at reservation, before anything is made with them.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Slot {
    name: String,
    host: String,
    memory_mb: u64,
    state: String,
    handle: Option<String>,
    local: String,
    nic: String,
    /// A live migration into this slot whose disk is still being copied (kept so that
    /// a restarted agent relays to the origin again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    incoming: Option<migrate::IncomingRecord>,
}

/// Overlay processes a running agent started for a cluster.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct OverlayHere {
    pids: Vec<u32>,
}

/// A cluster's reservation at this site, under its site-local number `n`: bridge
/// `mvb<n>`, edge TAP `mvt<n>`, files `run/c<n>.*` and `secrets/c<n>.key`, VMs
/// `c<n>-<vm>` with NICs `mvv<n>-<i>` (`mvq<n>-<i>` for qemu VMs).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ClusterHere {
    name: String,
    owner: String,
    bridge: String,
    tap: String,
    supernode_port: Option<u16>,
    /// Unix time the reservation lapses at; `None` once the controller confirmed it.
    lease_until: Option<u64>,
    /// Set (and saved) before a release starts, so a crash mid-release finishes it.
    #[serde(default)]
    releasing: bool,
    slots: Vec<Slot>,
    overlay: Option<OverlayHere>,
    /// The cluster's Slurm (its munge key is `secrets/c<n>.munge`, not kept here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    stack: Option<crate::stack::SlurmStack>,
}

/// The reservations held in memory; each is also in its file ([`state`]).
#[derive(Debug, Default)]
struct Persisted {
    /// By site-local cluster number.
    clusters: BTreeMap<u32, ClusterHere>,
}

/// Path of the agent key in a state directory.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.key")
}

/// Path of the authorisations file in a state directory.
pub fn authz_path(state_dir: &Path) -> PathBuf {
    state_dir.join("authorized.json")
}

/// Write `text` to `path` with mode 0600, atomically and synced ([`atomic_file`]),
/// making its directory when missing.
pub fn write_private(path: &Path, text: &str) -> Result<(), AgentError> {
    let file_err = |err| AgentError::File {
        path: path.into(),
        err,
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(file_err)?;
    }
    atomic_file::write(path, text.as_bytes(), 0o600, Durability::Synced).map_err(file_err)
}

/// Seed of a cluster's supernode key (the content of `mvc supernode --key-file`, in hex):
/// `HKDF-SHA256(salt = "mvc-supernode-key-v2", ikm = secret, info = community)`.
fn supernode_seed(secret: &str, community: &str) -> [u8; 32] {
    use ring::hkdf;
    let prk =
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"mvc-supernode-key-v2").extract(secret.as_bytes());
    let mut seed = [0u8; 32];
    prk.expand(&[community.as_bytes()], hkdf::HKDF_SHA256)
        .and_then(|okm| okm.fill(&mut seed))
        .expect("32 bytes is a valid HKDF-SHA256 length");
    seed
}

/// The public key of a supernode seed, as edges pin it (`--supernode ADDR@KEY`).
fn supernode_public_hex(seed: &[u8; 32]) -> Result<String, DriverError> {
    use ring::signature::KeyPair;
    let pair = ring::signature::Ed25519KeyPair::from_seed_unchecked(seed)
        .map_err(|_| DriverError::Config("cannot make the supernode key".into()))?;
    Ok(hex_lower(pair.public_key().as_ref()))
}

fn hex_lower(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Create the state directory and the agent key if missing; returns the public key.
pub fn init(state_dir: &Path) -> Result<String, AgentError> {
    let p = key_path(state_dir);
    if p.exists() {
        return Ok(load_key(state_dir)?.public_hex());
    }
    let k = SigningKey::generate().map_err(|e| AgentError::Key {
        path: p.clone(),
        err: e.to_string(),
    })?;
    write_private(&p, &k.to_file_text())?;
    Ok(k.public_hex())
}

/// Load the agent key.
pub fn load_key(state_dir: &Path) -> Result<SigningKey, AgentError> {
    let p = key_path(state_dir);
    let text = std::fs::read_to_string(&p).map_err(|e| AgentError::Key {
        path: p.clone(),
        err: e.to_string(),
    })?;
    SigningKey::from_file_text(&text).map_err(|e| AgentError::Key {
        path: p,
        err: e.to_string(),
    })
}

/// Read the site's authorisations (empty when none yet).
pub fn load_authorizations(state_dir: &Path) -> Result<Vec<Authorization>, AgentError> {
    let p = authz_path(state_dir);
    match std::fs::read_to_string(&p) {
        Ok(t) => serde_json::from_str(&t).map_err(|err| AgentError::Parse { path: p, err }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(err) => Err(AgentError::File { path: p, err }),
    }
}

/// Add or replace the authorisation of `a.key`.
pub fn authorize(state_dir: &Path, a: Authorization) -> Result<(), AgentError> {
    crate::auth::parse_public(&a.key).map_err(|e| AgentError::Config(e.to_string()))?;
    let mut all = load_authorizations(state_dir)?;
    all.retain(|x| x.key != a.key);
    all.push(a);
    let text = serde_json::to_string_pretty(&all).map_err(|err| AgentError::Parse {
        path: authz_path(state_dir),
        err,
    })?;
    write_private(&authz_path(state_dir), &text)
}

/// Remove the authorisation of `key`; true when there was one.
pub fn revoke(state_dir: &Path, key: &str) -> Result<bool, AgentError> {
    let mut all = load_authorizations(state_dir)?;
    let n = all.len();
    all.retain(|x| x.key != key);
    let text = serde_json::to_string_pretty(&all).map_err(|err| AgentError::Parse {
        path: authz_path(state_dir),
        err,
    })?;
    write_private(&authz_path(state_dir), &text)?;
    Ok(all.len() != n)
}

/// The pid of an `mvc agent run` serving `state_dir` (from `agent.pid`, when that
/// process still runs and is an agent).
pub fn running_agent(state_dir: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(state_dir.join("agent.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    if pid == std::process::id() {
        return None;
    }
    let c = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let c = String::from_utf8_lossy(&c);
    let mut args = c.split('\0');
    (args.any(|a| a == "agent") && args.any(|a| a == "run")).then_some(pid)
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The agent's request handling and its resources.
pub struct AgentCore {
    cfg: AgentConfig,
    state: Persisted,
    /// The reservation files behind `state`.
    store: state::Reservations,
    driver: Box<dyn VmDriver>,
    /// Running VMs by local name.
    running: HashMap<String, RunningVm>,
    /// Overlay processes by cluster number.
    overlay_procs: HashMap<u32, Vec<Child>>,
    /// Clusters whose overlay processes a previous run started and this one adopted.
    adopted: std::collections::HashSet<u32>,
    verifier: Verifier,
    /// Live migrations in progress here, by the VM's local name.
    migrations: HashMap<String, migrate::Migration>,
    /// Claims on cluster numbers and ports, unique among the machine's agents.
    claims: Claims,
    /// Every process's command line, read once at the start of a reconcile or a
    /// release (which start no process) so that its many marks cost one read of `/proc`.
    procs: Option<ProcSnapshot>,
}

type Refusal = String;

/// What serving a request gives: the reply, or a command to run in a VM first.
enum Served {
    Now(Reply),
    Exec(stack::ExecPlan),
}

impl AgentCore {
    /// Open the agent's state (the key must exist) and reconcile it with what exists:
    /// leftovers of a previous run that did not shut down cleanly are stopped, lapsed
    /// or half-released reservations are removed with everything they named.
    pub fn open(cfg: AgentConfig, driver: Box<dyn VmDriver>) -> Result<AgentCore, AgentError> {
        let mut core = AgentCore::load(cfg, driver)?;
        let mut log = core.reconcile(unix_now(), false);
        core.stack_adopt(&mut log);
        for line in log {
            tracing::info!(site = %core.cfg.site, "reconcile: {line}");
        }
        core.resume_migrations();
        core.save()?;
        Ok(core)
    }

    /// Open the agent's state without touching anything (for [`AgentCore::reconcile`]).
    pub fn load(cfg: AgentConfig, driver: Box<dyn VmDriver>) -> Result<AgentCore, AgentError> {
        load_key(&cfg.state_dir)?;
        let mut cfg = cfg;
        for d in ["run", "secrets"] {
            std::fs::create_dir_all(cfg.state_dir.join(d)).map_err(|err| AgentError::File {
                path: cfg.state_dir.join(d),
                err,
            })?;
        }
        // Absolute, so that processes can be recognised by the paths they were given.
        cfg.state_dir = cfg
            .state_dir
            .canonicalize()
            .map_err(|err| AgentError::File {
                path: cfg.state_dir.clone(),
                err,
            })?;
        let (store, clusters) = state::Reservations::open(&cfg.state_dir)?;
        let state = Persisted { clusters };
        let verifier = Verifier::new(load_authorizations(&cfg.state_dir)?);
        let claims = Claims::new(&cfg.claims_dir, &cfg.state_dir);
        Ok(AgentCore {
            cfg,
            state,
            store,
            driver,
            running: HashMap::new(),
            overlay_procs: HashMap::new(),
            adopted: Default::default(),
            verifier,
            migrations: HashMap::new(),
            claims,
            procs: None,
        })
    }

    /// The agent's public key (hex).
    pub fn public_key(&self) -> Result<String, AgentError> {
        Ok(load_key(&self.cfg.state_dir)?.public_hex())
    }

    /// End the processes whose command lines name one of `marks`
    /// ([`process::kill_marked`]); nothing to read again when the snapshot of a
    /// reconcile or release in progress holds none of them.
    fn kill_marked(&self, marks: &[String], dry: bool, log: &mut Vec<String>) {
        if self.procs.as_ref().is_some_and(|p| !p.any_marked(marks)) {
            return;
        }
        process::kill_marked(marks, dry, log);
    }

    /// Bring every reservation file in line with `state` (what changed is written,
    /// what is gone removed). Every reservation is serialised to compare it; a change to
    /// one known reservation is [`AgentCore::save_one`].
    fn save(&mut self) -> Result<(), AgentError> {
        self.store.sync_all(&self.state.clusters)
    }

    /// Write reservation `n`'s file (remove it when `n` is no longer held): the cost of
    /// one reservation, whatever the agent holds.
    fn save_one(&mut self, n: u32) -> Result<(), AgentError> {
        match self.state.clusters.get(&n) {
            Some(c) => self.store.put(n, c),
            None => self.store.remove(n),
        }
    }

    fn run_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("run")
    }

    fn secret_file(&self, n: u32) -> PathBuf {
        self.cfg.state_dir.join("secrets").join(format!("c{n}.key"))
    }

    /// A per-cluster file in `run/`: `c<n>.<what>`.
    fn cluster_file(&self, n: u32, what: &str) -> PathBuf {
        self.run_dir().join(format!("c{n}.{what}"))
    }

    /// Re-read the authorisations file (the admin may have changed it).
    pub fn reload_authorizations(&mut self) -> Result<(), AgentError> {
        let a = load_authorizations(&self.cfg.state_dir)?;
        self.verifier.set_authorizations(a);
        Ok(())
    }

    /// Release every reservation whose lease lapsed at `now`.
    pub fn expire(&mut self, now: u64) {
        let lapsed: Vec<u32> = self
            .state
            .clusters
            .iter()
            .filter(|(_, c)| c.lease_until.is_some_and(|t| t <= now))
            .map(|(n, _)| *n)
            .collect();
        for n in lapsed {
            tracing::info!(cluster = %self.state.clusters[&n].name, "reservation lease lapsed; released");
            let mut log = Vec::new();
            self.release(n, &mut log);
        }
    }

    /// Check and serve one signed request that arrived on channel `channel_id`.
    pub fn handle(&mut self, channel_id: &[u8; 32], env: &Envelope, now: u64) -> Reply {
        match self.serve(channel_id, env, now) {
            Served::Now(r) => r,
            Served::Exec(plan) => stack::exec_reply(plan),
        }
    }

    /// [`AgentCore::handle`], except that a command to run in a VM is returned
    /// prepared, to be run without holding the agent.
    fn serve(&mut self, channel_id: &[u8; 32], env: &Envelope, now: u64) -> Served {
        self.expire(now);
        let verified = self
            .verifier
            .check(channel_id, env, now)
            .map(|(a, body)| (a.clone(), body.to_string()));
        let result = match verified {
            Err(e) => Err(format!("site {}: {e}", self.cfg.site)),
            Ok((authz, body)) => match serde_json::from_str::<Body>(&body) {
                Err(e) => Err(format!("site {}: malformed request: {e}", self.cfg.site)),
                Ok(b) if b.proto != PROTO_VERSION => Err(format!(
                    "site {}: protocol version {} not supported (agent speaks {PROTO_VERSION})",
                    self.cfg.site, b.proto
                )),
                Ok(b) => match (b.req.validate(), b.req) {
                    (Err(e), _) => Err(e),
                    (Ok(()), Request::Exec { cluster, vm, exec }) => {
                        match self.exec_plan(&authz, &cluster, &vm, exec) {
                            Ok(plan) => return Served::Exec(plan),
                            Err(e) => Err(e),
                        }
                    }
                    (Ok(()), req) => self.dispatch(&authz, req, now),
                }
                .map_err(|e| format!("site {}: {e}", self.cfg.site)),
            },
        };
        Served::Now(match result {
            Ok(data) => Reply {
                ok: true,
                error: None,
                data,
            },
            Err(e) => {
                tracing::info!(refused = %e, "request refused");
                Reply {
                    ok: false,
                    error: Some(e),
                    data: serde_json::Value::Null,
                }
            }
        })
    }

    fn used(&self, host: &str) -> (u32, u64) {
        let mut n = 0;
        let mut mem = 0;
        for c in self.state.clusters.values() {
            for s in c.slots.iter().filter(|s| s.host == host) {
                n += 1;
                mem += s.memory_mb;
            }
        }
        (n, mem)
    }

    /// Free capacity per host.
    pub fn hosts(&self) -> Vec<HostInfo> {
        self.cfg
            .hosts
            .iter()
            .map(|h| {
                let (n, mem) = self.used(&h.name);
                HostInfo {
                    name: h.name.clone(),
                    vcpus: h.vcpus,
                    memory_mb: h.memory_mb,
                    max_vms: h.max_vms,
                    free_vms: h.max_vms.saturating_sub(n),
                    free_memory_mb: h.memory_mb.saturating_sub(mem),
                }
            })
            .collect()
    }

    /// The number of `owner`'s cluster `cluster` here.
    fn id_of(&self, owner: &str, cluster: &str) -> Option<u32> {
        self.state
            .clusters
            .iter()
            .find(|(_, c)| c.owner == owner && c.name == cluster && !c.releasing)
            .map(|(n, _)| *n)
    }

    /// VM slots `owner` holds here, in every cluster (what its quota counts).
    fn slots_held_by(&self, owner: &str) -> u32 {
        self.state
            .clusters
            .values()
            .filter(|c| c.owner == owner)
            .map(|c| c.slots.len() as u32)
            .sum()
    }

    fn owned(&self, owner: &str, cluster: &str) -> Result<u32, Refusal> {
        self.id_of(owner, cluster)
            .ok_or_else(|| format!("no cluster {} of yours is reserved here", quote(cluster)))
    }

    /// As [`AgentCore::owned`], and the reservation must be confirmed.
    fn confirmed(&self, owner: &str, cluster: &str) -> Result<u32, Refusal> {
        let n = self.owned(owner, cluster)?;
        if self.state.clusters[&n].lease_until.is_some() {
            return Err(format!(
                "the reservation of {} is not confirmed yet",
                quote(cluster)
            ));
        }
        Ok(n)
    }

    fn overlay_up(&mut self, n: u32) -> bool {
        if self.adopted.contains(&n) {
            return self.overlay_alive(n);
        }
        self.overlay_procs.get_mut(&n).is_some_and(|p| {
            !p.is_empty() && p.iter_mut().all(|c| matches!(c.try_wait(), Ok(None)))
        })
    }

    /// Whether cluster `n`'s overlay, started by this or a previous run, runs: its edge
    /// (and supernode) processes, recognised by their status sockets, and its TAP.
    fn overlay_alive(&self, n: u32) -> bool {
        let Some(c) = self.state.clusters.get(&n) else {
            return false;
        };
        if !matches!(self.cfg.overlay, OverlayImpl::Mvc(_)) {
            return false;
        }
        let runs = |what: &str| {
            !pids_marked(&[self.cluster_file(n, what).display().to_string()]).is_empty()
        };
        runs("edge.sock") && (c.supernode_port.is_none() || runs("sn.sock")) && link_exists(&c.tap)
    }

    fn dispatch(
        &mut self,
        authz: &Authorization,
        req: Request,
        now: u64,
    ) -> Result<serde_json::Value, Refusal> {
        let json = |v: &dyn erased::Ser| v.to_value();
        match req {
            Request::Info => {
                let mut vms = Vec::new();
                let mut overlays = Vec::new();
                let mut edges = Vec::new();
                let mut reservations = Vec::new();
                let mine: Vec<u32> = self
                    .state
                    .clusters
                    .iter()
                    .filter(|(_, c)| c.owner == authz.key && !c.releasing)
                    .map(|(n, _)| *n)
                    .collect();
                for n in mine {
                    let up = self.overlay_up(n);
                    let c = &self.state.clusters[&n];
                    for s in &c.slots {
                        vms.push(AgentVm {
                            cluster: c.name.clone(),
                            name: s.name.clone(),
                            host: s.host.clone(),
                            state: s.state.clone(),
                            handle: s.handle.clone(),
                        });
                    }
                    overlays.push((c.name.clone(), up));
                    reservations.push(ReservationView {
                        cluster: c.name.clone(),
                        confirmed: c.lease_until.is_none(),
                        expires_in: c.lease_until.map(|t| t.saturating_sub(now)),
                        bridge: c.bridge.clone(),
                        tap: c.tap.clone(),
                        supernode_port: c.supernode_port,
                    });
                    if let (true, OverlayImpl::Mvc(bin)) = (up, &self.cfg.overlay) {
                        if let Some(v) = edge_status(bin, &self.cluster_file(n, "edge.sock")) {
                            edges.push((c.name.clone(), v));
                        }
                    }
                }
                json(&InfoData {
                    site: self.cfg.site.clone(),
                    driver: self.driver.kind().into(),
                    hosts: self.hosts(),
                    vms,
                    overlays,
                    edges,
                    reservations,
                    clock: Some(now),
                })
            }
            Request::Reserve {
                cluster,
                slots,
                supernode,
            } => self.reserve(authz, &cluster, slots, supernode, now),
            Request::Confirm { cluster } => {
                let n = self.id_of(&authz.key, &cluster).ok_or_else(|| {
                    format!(
                        "no reservation of {} here (did its lease lapse?)",
                        quote(&cluster)
                    )
                })?;
                if let Some(c) = self.state.clusters.get_mut(&n) {
                    c.lease_until = None;
                }
                self.save_one(n).map_err(|e| e.to_string())?;
                crate::failpoint::hit("confirm-saved");
                json(&"confirmed")
            }
            Request::Release { cluster } => {
                let Some(n) = self.id_of(&authz.key, &cluster) else {
                    return json(&"nothing reserved");
                };
                let mut log = Vec::new();
                self.release(n, &mut log);
                json(&"released")
            }
            Request::StartOverlay {
                cluster,
                community,
                secret,
                supernode,
                edge_name,
            } => {
                let n = self.confirmed(&authz.key, &cluster)?;
                self.start_overlay(n, &community, &secret, &supernode, &edge_name)
                    .map_err(|e| format!("starting overlay of {}: {e}", quote(&cluster)))?;
                self.save_one(n).map_err(|e| e.to_string())?;
                json(&"overlay up")
            }
            Request::StartVm { spec } => {
                let n = self.confirmed(&authz.key, &spec.cluster)?;
                let c = &self.state.clusters[&n];
                if !c
                    .slots
                    .iter()
                    .any(|s| s.name == spec.name && s.host == spec.host)
                {
                    return Err(format!(
                        "VM {} has no reserved slot on host {} here",
                        quote(&spec.name),
                        quote(&spec.host)
                    ));
                }
                if c.overlay.is_none() {
                    return Err(format!(
                        "overlay of {} is not up here; start the cluster",
                        quote(&spec.cluster)
                    ));
                }
                if c.slots
                    .iter()
                    .any(|s| s.name == spec.name && s.incoming.is_some())
                {
                    return Err(format!(
                        "VM {} came by live migration and its disk is not all here yet",
                        quote(&spec.name)
                    ));
                }
                self.start_vm(n, spec.clone())
                    .map_err(|e| format!("starting VM {}: {e}", quote(&spec.name)))?;
                self.save_one(n).map_err(|e| e.to_string())?;
                let guest = self
                    .stack_start_vm(n, &spec.name)
                    .map_err(|e| format!("Slurm in VM {}: {e}", quote(&spec.name)))?;
                if let Some(g) = guest {
                    // The guest boots first: its daemons start when its guest agent
                    // answers, without holding this agent.
                    g.apply_in_background(Duration::from_secs(300));
                }
                json(&"running")
            }
            Request::StopVm { cluster, vm } => {
                let n = self.owned(&authz.key, &cluster)?;
                if !self.state.clusters[&n].slots.iter().any(|s| s.name == vm) {
                    return Err(format!(
                        "no VM {} in cluster {} here",
                        quote(&vm),
                        quote(&cluster)
                    ));
                }
                self.stop_vm(n, &vm);
                self.save_one(n).map_err(|e| e.to_string())?;
                json(&"stopped")
            }
            Request::VmAddress { cluster, vm } => {
                let handle = self.handle_of(&authz.key, &cluster, &vm)?;
                let a = self.driver.address(&handle).map_err(|e| e.to_string())?;
                json(&a.map(|a| a.to_string()))
            }
            Request::Ping {
                cluster,
                vm,
                targets,
            } => {
                let handle = self.handle_of(&authz.key, &cluster, &vm)?;
                let mut out = Vec::new();
                for t in targets.iter().take(64) {
                    let ip = t
                        .parse()
                        .map_err(|_| format!("not an IPv4 address: {}", quote(t)))?;
                    out.push(self.driver.ping(&handle, ip).map_err(|e| e.to_string())?);
                }
                json(&out)
            }
            Request::Migrate { cluster, vm, step } => self.migrate_step(authz, &cluster, &vm, step),
            Request::Stack { cluster, stack } => self.stack_set(authz, &cluster, stack),
            Request::Exec { cluster, vm, exec } => {
                let plan = self.exec_plan(authz, &cluster, &vm, exec)?;
                json(&stack::run_exec(plan)?)
            }
        }
    }

    fn handle_of(&self, owner: &str, cluster: &str, vm: &str) -> Result<String, Refusal> {
        let n = self.owned(owner, cluster)?;
        self.state.clusters[&n]
            .slots
            .iter()
            .find(|s| s.name == vm)
            .ok_or_else(|| format!("no VM {} in cluster {} here", quote(vm), quote(cluster)))?
            .handle
            .clone()
            .ok_or_else(|| format!("VM {} is not running", quote(vm)))
    }

    /// What the agent allocated for cluster `n`, as [`Request::Reserve`] answers.
    fn reserve_data(&self, n: u32) -> ReserveData {
        let c = &self.state.clusters[&n];
        ReserveData {
            bridge: c.bridge.clone(),
            tap: c.tap.clone(),
            supernode_port: c.supernode_port,
            lease_secs: self.cfg.lease_secs,
            local_names: c
                .slots
                .iter()
                .map(|s| (s.name.clone(), s.local.clone()))
                .collect(),
        }
    }

    /// Claim the lowest cluster number that no reservation here holds, no other agent
    /// of this machine has claimed, and whose device names no link has.
    fn claim_number(&self) -> Result<u32, Refusal> {
        let names = (1..=MAX_CLUSTERS)
            .filter(|n| !self.state.clusters.contains_key(n))
            .map(claims::number);
        let got = self
            .claims
            .claim_first(names, |name| {
                let n = &name[1..];
                ![
                    format!("mvb{n}"),
                    format!("mvt{n}"),
                    format!("mvv{n}-0"),
                    format!("mvq{n}-0"),
                ]
                .iter()
                .any(|dev| link_exists(dev))
            })
            .map_err(|e| e.to_string())?;
        got.and_then(|name| name[1..].parse().ok())
            .ok_or_else(|| format!("this machine holds {MAX_CLUSTERS} clusters already"))
    }

    /// Claim the lowest supernode port of the configured range that no reservation
    /// here holds, no other agent of this machine has claimed, and that binds.
    fn claim_port(&self) -> Result<u16, Refusal> {
        let (lo, hi) = self.cfg.supernode_ports;
        let names = (lo..=hi)
            .filter(|p| {
                !self
                    .state
                    .clusters
                    .values()
                    .any(|c| c.supernode_port == Some(*p))
            })
            .map(claims::port);
        let got = self
            .claims
            .claim_first(names, |name| {
                name[4..]
                    .parse::<u16>()
                    .is_ok_and(|p| std::net::UdpSocket::bind(("0.0.0.0", p)).is_ok())
            })
            .map_err(|e| e.to_string())?;
        got.and_then(|name| name[4..].parse().ok())
            .ok_or_else(|| format!("no free supernode port left in {lo}-{hi} at this site"))
    }

    /// The claim names of cluster `n` (its number and supernode port).
    fn claim_names(&self, n: u32) -> Vec<String> {
        let mut v = vec![claims::number(n)];
        if let Some(p) = self.state.clusters.get(&n).and_then(|c| c.supernode_port) {
            v.push(claims::port(p));
        }
        v
    }

    /// Release the claims this agent holds that its store does not use, its clusters
    /// `gone` counted as removed already (with `dry`, only note them).
    fn sweep_claims(&self, gone: &[u32], dry: bool, log: &mut Vec<String>) {
        let used: std::collections::HashSet<String> = self
            .state
            .clusters
            .keys()
            .filter(|n| !gone.contains(n))
            .flat_map(|n| self.claim_names(*n))
            .collect();
        let held = match self.claims.held() {
            Ok(h) => h,
            Err(e) => {
                log.push(format!("cannot read claims: {e}"));
                return;
            }
        };
        if !dry {
            // Other agents' claims whose state directory is gone (not this agent's
            // doing, so not in its log).
            match self.claims.remove_stale() {
                Ok(0) => {}
                Ok(n) => tracing::info!("removed {n} stale claim(s) of agents gone for good"),
                Err(e) => tracing::warn!("claims: {e}"),
            }
        }
        let stray: Vec<String> = held.into_iter().filter(|h| !used.contains(h)).collect();
        if stray.is_empty() {
            return;
        }
        log.push(format!(
            "release claims {} in {}",
            stray.join(", "),
            self.claims.dir().display()
        ));
        if !dry {
            if let Err(e) = self.claims.release(&stray) {
                log.push(format!("cannot release claims: {e}"));
            }
        }
    }

    fn reserve(
        &mut self,
        authz: &Authorization,
        cluster: &str,
        slots: Vec<SlotReq>,
        supernode: bool,
        now: u64,
    ) -> Result<serde_json::Value, Refusal> {
        if let Some(n) = self.id_of(&authz.key, cluster) {
            let c = &self.state.clusters[&n];
            let same = c.supernode_port.is_some() == supernode
                && c.slots.len() == slots.len()
                && c.slots
                    .iter()
                    .zip(&slots)
                    .all(|(a, b)| a.name == b.name && a.host == b.host);
            return if same {
                serde_json::to_value(self.reserve_data(n)).map_err(|e| e.to_string())
            } else {
                Err(format!(
                    "you already hold a reservation of cluster {} here \
                     (`mvc cluster destroy {cluster} --force` clears it)",
                    quote(cluster)
                ))
            };
        }
        let held = self.slots_held_by(&authz.key);
        authz
            .check_reserve(
                held,
                slots.len() as u32,
                slots.iter().map(|s| s.host.as_str()),
            )
            .map_err(|e: AuthError| e.to_string())?;
        let free = self.hosts();
        for h in &free {
            let want: Vec<&SlotReq> = slots.iter().filter(|s| s.host == h.name).collect();
            let mem: u64 = want.iter().map(|s| s.memory_mb).sum();
            if want.len() as u32 > h.free_vms || mem > h.free_memory_mb {
                return Err(format!(
                    "host {} lacks capacity: asked {} VMs / {mem} MiB, free {} VMs / {} MiB",
                    quote(&h.name),
                    want.len(),
                    h.free_vms,
                    h.free_memory_mb
                ));
            }
        }
        if let Some(s) = slots
            .iter()
            .find(|s| !free.iter().any(|h| h.name == s.host))
        {
            return Err(format!("no host {} at this site", quote(&s.host)));
        }
        // Claimed host-wide before recorded; released again if recording fails.
        let n = self.claim_number()?;
        let supernode_port = if supernode {
            match self.claim_port() {
                Ok(p) => Some(p),
                Err(e) => {
                    let _ = self.claims.release(&[claims::number(n)]);
                    return Err(e);
                }
            }
        } else {
            None
        };
        // Every name the cluster will use here is saved before anything is made.
        let nic = if matches!(self.driver.kind(), "qemu" | "libvirt") {
            "mvq"
        } else {
            "mvv"
        };
        self.state.clusters.insert(
            n,
            ClusterHere {
                name: cluster.into(),
                owner: authz.key.clone(),
                bridge: format!("mvb{n}"),
                tap: format!("mvt{n}"),
                supernode_port,
                lease_until: Some(now.saturating_add(self.cfg.lease_secs)),
                releasing: false,
                slots: slots
                    .into_iter()
                    .enumerate()
                    .map(|(i, s)| Slot {
                        local: format!("c{n}-{}", s.name),
                        nic: format!("{nic}{n}-{i}"),
                        name: s.name,
                        host: s.host,
                        memory_mb: s.memory_mb,
                        state: "reserved".into(),
                        handle: None,
                        incoming: None,
                    })
                    .collect(),
                overlay: None,
                stack: None,
            },
        );
        if let Err(e) = self.save_one(n) {
            let names = self.claim_names(n);
            self.state.clusters.remove(&n);
            let _ = self.claims.release(&names);
            return Err(e.to_string());
        }
        crate::failpoint::hit("reserve-saved");
        serde_json::to_value(self.reserve_data(n)).map_err(|e| e.to_string())
    }

    fn start_overlay(
        &mut self,
        n: u32,
        community: &str,
        secret: &str,
        supernode: &str,
        edge_name: &str,
    ) -> Result<(), DriverError> {
        if self.overlay_up(n) {
            return Ok(());
        }
        self.stop_overlay(n, false);
        let c = self.state.clusters[&n].clone();
        let (tap, bridge) = (c.tap.as_str(), c.bridge.as_str());
        let secret_file = self.secret_file(n);
        write_private(&secret_file, secret).map_err(|e| DriverError::Config(e.to_string()))?;
        // Every agent of the cluster derives the supernode's key from the secret, so the
        // edges here pin the key the origin's supernode signs with.
        let sn_seed = supernode_seed(secret, community);
        let sn_key_file = self.cluster_file(n, "supernode.key");
        let pinned = format!("{supernode}@{}", supernode_public_hex(&sn_seed)?);
        if !link_exists(bridge) {
            run("ip", &["link", "add", bridge, "type", "bridge"])?;
        }
        crate::failpoint::hit("overlay-bridge");
        run("ip", &["link", "set", bridge, "up"])?;
        let log = self.cluster_file(n, "overlay.log");
        let mut procs = Vec::new();
        let result = (|| -> Result<(), DriverError> {
            if let Some(port) = c.supernode_port {
                let listen = format!("0.0.0.0:{port}");
                let sock = self.cluster_file(n, "sn.sock").display().to_string();
                let p = port.to_string();
                procs.push(match &self.cfg.overlay {
                    OverlayImpl::Mvc(bin) => {
                        write_private(&sn_key_file, &hex_lower(&sn_seed))
                            .map_err(|e| DriverError::Config(e.to_string()))?;
                        let kf = sn_key_file.display().to_string();
                        process::spawn(
                            &bin.display().to_string(),
                            &[
                                "supernode",
                                "--listen",
                                &listen,
                                "--status-socket",
                                &sock,
                                "--key-file",
                                &kf,
                            ],
                            &[],
                            &log,
                        )?
                    }
                    OverlayImpl::N2n => process::spawn("supernode", &["-l", &p], &[], &log)?,
                });
            }
            let sock = self.cluster_file(n, "edge.sock").display().to_string();
            let sf = secret_file.display().to_string();
            procs.push(match &self.cfg.overlay {
                OverlayImpl::Mvc(bin) => process::spawn(
                    &bin.display().to_string(),
                    &[
                        "edge",
                        "--name",
                        edge_name,
                        "--community",
                        community,
                        "--secret-file",
                        &sf,
                        "--supernode",
                        &pinned,
                        "--tap",
                        tap,
                        "--create-tap",
                        "--status-socket",
                        &sock,
                    ],
                    &[],
                    &log,
                )?,
                OverlayImpl::N2n => process::spawn(
                    "edge",
                    &[
                        "-d",
                        tap,
                        "-a",
                        "0.0.0.0",
                        "-s",
                        "255.255.255.0",
                        "-c",
                        community,
                        "-l",
                        supernode,
                        "-M",
                        "1500",
                        "-r",
                    ],
                    &[("N2N_KEY", secret)],
                    &log,
                )?,
            });
            crate::failpoint::hit("overlay-edge");
            let deadline = Instant::now() + Duration::from_secs(15);
            while !link_exists(tap) {
                for c in procs.iter_mut() {
                    if let Ok(Some(st)) = c.try_wait() {
                        return Err(DriverError::Command {
                            cmd: "overlay process".into(),
                            msg: format!("exited with {st}; see {}", log.display()),
                        });
                    }
                }
                if Instant::now() > deadline {
                    return Err(DriverError::Config(format!(
                        "edge did not create TAP {tap} within 15 s; see {}",
                        log.display()
                    )));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            run("ip", &["link", "set", tap, "master", bridge, "up"])?;
            Ok(())
        })();
        if let Err(e) = result {
            for c in &mut procs {
                stop_child(c);
            }
            return Err(e);
        }
        if let Some(c) = self.state.clusters.get_mut(&n) {
            c.overlay = Some(OverlayHere {
                pids: procs.iter().map(|c| c.id()).collect(),
            });
        }
        self.overlay_procs.insert(n, procs);
        Ok(())
    }

    /// Marks by which processes of cluster `n`'s overlay are recognised: the files the
    /// agent passed them, all under its own state directory.
    fn overlay_marks(&self, n: u32) -> Vec<String> {
        vec![
            format!("{}/c{n}.", self.run_dir().display()),
            self.secret_file(n).display().to_string(),
        ]
    }

    /// Stop cluster `n`'s overlay processes and delete its TAP (and, with
    /// `bridge_too`, its bridge).
    fn stop_overlay(&mut self, n: u32, bridge_too: bool) {
        self.adopted.remove(&n);
        if let Some(mut procs) = self.overlay_procs.remove(&n) {
            for c in &mut procs {
                stop_child(c);
            }
        }
        let mut log = Vec::new();
        self.kill_marked(&self.overlay_marks(n), false, &mut log);
        let Some(c) = self.state.clusters.get_mut(&n) else {
            return;
        };
        c.overlay = None;
        let (tap, bridge) = (c.tap.clone(), c.bridge.clone());
        if link_exists(&tap) {
            let _ = run("ip", &["link", "del", &tap]);
        }
        if bridge_too && link_exists(&bridge) {
            let _ = run("ip", &["link", "del", &bridge]);
        }
        let _ = std::fs::remove_file(self.secret_file(n));
    }

    fn start_vm(&mut self, n: u32, mut spec: VmSpec) -> Result<(), DriverError> {
        let c = &self.state.clusters[&n];
        let slot = c
            .slots
            .iter()
            .find(|s| s.name == spec.name)
            .ok_or_else(|| DriverError::Config(format!("no slot {}", spec.name)))?;
        spec.bridge = c.bridge.clone();
        spec.stack |= c.stack.is_some();
        spec.local_name = slot.local.clone();
        spec.nic = slot.nic.clone();
        // Started by a previous run and adopted: it runs already.
        if slot.state == "running"
            && !self.running.contains_key(&spec.local_name)
            && slot.handle.as_deref().is_some_and(|h| self.driver.alive(h))
        {
            return Ok(());
        }
        if let Some(vm) = self.running.get_mut(&spec.local_name) {
            if vm
                .children
                .iter_mut()
                .all(|c| matches!(c.try_wait(), Ok(None)))
            {
                return Ok(());
            }
            let mut vm = self.running.remove(&spec.local_name).expect("present");
            let _ = self.driver.stop(&mut vm);
        }
        let vm = self.driver.start(&spec)?;
        crate::failpoint::hit("vm-started");
        if let Some(s) = self
            .state
            .clusters
            .get_mut(&n)
            .and_then(|c| c.slots.iter_mut().find(|s| s.name == spec.name))
        {
            s.state = "running".into();
            s.handle = Some(vm.handle.clone());
        }
        self.running.insert(spec.local_name.clone(), vm);
        Ok(())
    }

    /// Stop a VM and remove what its run made (namespace, NIC, processes), found by
    /// the names the store holds for it even when its handle was never saved.
    fn stop_vm(&mut self, n: u32, vm: &str) {
        let Some(slot) = self
            .state
            .clusters
            .get(&n)
            .and_then(|c| c.slots.iter().find(|s| s.name == vm))
            .cloned()
        else {
            return;
        };
        if let Some(mut r) = self.running.remove(&slot.local) {
            let _ = self.driver.stop(&mut r);
        }
        let mut log = Vec::new();
        self.clean_vm(&slot, false, false, &mut log);
        if let Some(s) = self
            .state
            .clusters
            .get_mut(&n)
            .and_then(|c| c.slots.iter_mut().find(|s| s.name == vm))
        {
            s.handle = None;
            if s.state == "running" {
                s.state = "stopped".into();
            }
        }
    }

    /// Remove what a VM's start may have left (noting each step in `log`; with `dry`,
    /// only noting): its processes, namespace or qemu leftovers, host NIC, and with
    /// `files` its logs, leases and disk.
    fn clean_vm(&mut self, slot: &Slot, files: bool, dry: bool, log: &mut Vec<String>) {
        let marks = vec![format!("{}/{}.", self.run_dir().display(), slot.local)];
        self.kill_marked(&marks, dry, log);
        let handle = slot
            .handle
            .clone()
            .unwrap_or_else(|| self.driver.handle_for(&slot.local, &slot.nic));
        if self.driver.present(&handle) {
            log.push(format!("remove VM {} ({handle})", slot.local));
            if !dry {
                self.driver.cleanup(&handle);
            }
        }
        if link_exists(&slot.nic) {
            log.push(format!("delete link {}", slot.nic));
            if !dry {
                let _ = run("ip", &["link", "del", &slot.nic]);
            }
        }
        if files {
            let prefix = format!("{}.", slot.local);
            remove_files(&self.run_dir(), &prefix, dry, log);
            remove_files(&self.cfg.state_dir.join("disks"), &prefix, dry, log);
        }
    }

    /// Remove everything of cluster `n` here (processes, devices, files), then its
    /// reservation. A crash part way leaves it marked `releasing`; the next start
    /// finishes it.
    fn release(&mut self, n: u32, log: &mut Vec<String>) {
        let Some(c) = self.state.clusters.get_mut(&n) else {
            return;
        };
        c.releasing = true;
        let _ = self.save_one(n);
        crate::failpoint::hit("release-begin");
        self.procs = Some(ProcSnapshot::take());
        self.clean_cluster(n, true, false, log);
        self.procs = None;
        let names = self.claim_names(n);
        self.state.clusters.remove(&n);
        if self.save_one(n).is_ok() {
            // After the store forgets them (a crash in between: reconcile sweeps).
            if let Err(e) = self.claims.release(&names) {
                log.push(format!("cannot release claims: {e}"));
            }
        }
    }

    /// Stop everything of cluster `n` found by the names its reservation holds (with
    /// `files`, also delete its bridge and files).
    fn clean_cluster(&mut self, n: u32, files: bool, dry: bool, log: &mut Vec<String>) {
        let Some(c) = self.state.clusters.get(&n).cloned() else {
            return;
        };
        for s in &c.slots {
            if let Some(mut r) = self.running.remove(&s.local) {
                if !dry {
                    let _ = self.driver.stop(&mut r);
                }
            }
            self.clean_vm(s, files, dry, log);
        }
        if let Some(mut procs) = self.overlay_procs.remove(&n) {
            for p in &mut procs {
                if !dry {
                    stop_child(p);
                }
            }
        }
        self.kill_marked(&self.overlay_marks(n), dry, log);
        let mut links = vec![c.tap.clone()];
        if files {
            links.push(c.bridge.clone());
        }
        for l in links {
            if link_exists(&l) {
                log.push(format!("delete link {l}"));
                if !dry {
                    let _ = run("ip", &["link", "del", &l]);
                }
            }
        }
        for secret in [self.secret_file(n), self.munge_key_file(n)] {
            if secret.exists() {
                log.push(format!("remove {}", secret.display()));
                if !dry {
                    let _ = std::fs::remove_file(&secret);
                }
            }
        }
        if files {
            remove_files(&self.run_dir(), &format!("c{n}."), dry, log);
        }
        if !dry {
            if let Some(c) = self.state.clusters.get_mut(&n) {
                c.overlay = None;
                for s in &mut c.slots {
                    s.handle = None;
                    if s.state == "running" {
                        s.state = "stopped".into();
                    }
                }
            }
        }
    }

    /// For a reservation that stays: adopt the VMs and overlay a previous run started
    /// and recorded that still run; end and remove whatever else its names show (a
    /// start cut short, a VM whose processes died). The bridge stays.
    fn settle_cluster(&mut self, n: u32, dry: bool, log: &mut Vec<String>) {
        let Some(c) = self.state.clusters.get(&n).cloned() else {
            return;
        };
        for s in &c.slots {
            if self.running.contains_key(&s.local) {
                continue;
            }
            let live =
                s.state == "running" && s.handle.as_deref().is_some_and(|h| self.driver.alive(h));
            if live {
                log.push(format!(
                    "adopt VM {} ({})",
                    s.local,
                    s.handle.as_deref().unwrap_or("")
                ));
                continue;
            }
            if s.state == "migrating" {
                // An incoming migration that never took over: the origin runs the VM.
                log.push(format!("drop incoming VM {}", s.local));
                self.clean_vm(s, true, dry, log);
                if let (false, Some(c)) = (dry, self.state.clusters.get_mut(&n)) {
                    c.slots.retain(|x| x.name != s.name);
                }
                continue;
            }
            self.clean_vm(s, false, dry, log);
            if !dry {
                if let Some(x) = self
                    .state
                    .clusters
                    .get_mut(&n)
                    .and_then(|c| c.slots.iter_mut().find(|x| x.name == s.name))
                {
                    x.handle = None;
                    if x.state == "running" {
                        x.state = "stopped".into();
                    }
                }
            }
        }
        if self.overlay_procs.contains_key(&n) {
            return;
        }
        if c.overlay.is_some() && self.overlay_alive(n) {
            log.push(format!("adopt overlay (edge on {})", c.tap));
            if !dry {
                self.adopted.insert(n);
            }
            return;
        }
        self.kill_marked(&self.overlay_marks(n), dry, log);
        if link_exists(&c.tap) {
            log.push(format!("delete link {}", c.tap));
            if !dry {
                let _ = run("ip", &["link", "del", &c.tap]);
            }
        }
        if !dry {
            if let Some(c) = self.state.clusters.get_mut(&n) {
                c.overlay = None;
            }
        }
    }

    /// Bring the store and the machine into agreement (at start, and `mvc agent gc`):
    /// a reservation whose lease lapsed, or whose release was cut short, is removed
    /// with everything it names; of the others, the VMs and overlay a previous run
    /// recorded as started and that still run are adopted, and whatever else their
    /// names show is ended and removed (those VMs show `stopped`; `cluster start`
    /// brings them back). Returns what it did, or with `dry` what it would do.
    pub fn reconcile(&mut self, now: u64, dry: bool) -> Vec<String> {
        let mut log = Vec::new();
        let ids: Vec<u32> = self.state.clusters.keys().copied().collect();
        let mut gone = Vec::new();
        self.procs = Some(ProcSnapshot::take());
        for n in ids {
            let c = &self.state.clusters[&n];
            let who = format!(
                "cluster {} (key {}..., c{n})",
                c.name,
                &c.owner[..c.owner.len().min(8)]
            );
            let drop = c.releasing || c.lease_until.is_some_and(|t| t <= now);
            let mut steps = Vec::new();
            if drop {
                self.clean_cluster(n, true, dry, &mut steps);
            } else {
                self.settle_cluster(n, dry, &mut steps);
            }
            if drop {
                gone.push(n);
                log.push(format!(
                    "{who}: release (lease lapsed or release unfinished)"
                ));
                if !dry {
                    self.state.clusters.remove(&n);
                }
            }
            log.extend(steps.into_iter().map(|s| format!("{who}: {s}")));
        }
        self.procs = None;
        // VMs of this agent the hypervisor holds but the store does not name.
        let known: Vec<String> = self
            .state
            .clusters
            .values()
            .flat_map(|c| c.slots.iter())
            .map(|s| {
                s.handle
                    .clone()
                    .unwrap_or_else(|| self.driver.handle_for(&s.local, &s.nic))
            })
            .collect();
        for h in self.driver.strays(&known) {
            log.push(format!("remove stray VM {h}"));
            if !dry {
                self.driver.cleanup(&h);
            }
        }
        if !dry && self.save().is_err() {
            // Claims stay until the store that forgot them is saved.
            return log;
        }
        self.sweep_claims(&gone, dry, &mut log);
        log
    }

    /// Stop every VM and overlay process this agent started (reservations stay).
    pub fn shutdown(&mut self) {
        let all: Vec<(u32, Vec<String>)> = self
            .state
            .clusters
            .iter()
            .map(|(k, c)| (*k, c.slots.iter().map(|s| s.name.clone()).collect()))
            .collect();
        for (n, vms) in all {
            for v in vms {
                self.stop_vm(n, &v);
            }
            self.stop_overlay(n, true);
        }
        let _ = self.save();
    }
}

/// `mvc edge status --json` of one edge, given up after 2 s.
fn edge_status(bin: &Path, sock: &Path) -> Option<serde_json::Value> {
    let mut child = std::process::Command::new(bin)
        .args(["edge", "status", "--json", "--status-socket"])
        .arg(sock)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .ok()?;
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match child.try_wait() {
            Ok(Some(st)) if st.success() => break,
            Ok(Some(_)) | Err(_) => return None,
            Ok(None) if Instant::now() > deadline => {
                stop_child(&mut child);
                return None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
    let mut out = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut()?, &mut out).ok()?;
    serde_json::from_str(&out).ok()
}

/// Delete the files (and directories, such as a VM's `<local>.slurm/`) in `dir` whose
/// names start with `prefix`.
fn remove_files(dir: &Path, prefix: &str, dry: bool, log: &mut Vec<String>) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.flatten() {
        if e.file_name().to_string_lossy().starts_with(prefix) {
            log.push(format!("remove {}", e.path().display()));
            if !dry {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    let _ = std::fs::remove_dir_all(e.path());
                } else {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

mod erased {
    /// Serialise any reply payload to JSON.
    pub trait Ser {
        fn to_value(&self) -> Result<serde_json::Value, String>;
    }
    impl<T: serde::Serialize> Ser for T {
        fn to_value(&self) -> Result<serde_json::Value, String> {
            serde_json::to_value(self).map_err(|e| e.to_string())
        }
    }
}

/// Serve one connection: handshake, then request/reply until the peer closes.
pub fn serve_conn(
    core: &Mutex<AgentCore>,
    key: &SigningKey,
    stream: TcpStream,
) -> Result<(), ChannelError> {
    serve_conn_within(core, key, stream, ListenLimits::default().handshake_timeout)
}

/// [`serve_conn`] with the whole hello required within `handshake`: a client that sends
/// nothing, or a byte at a time, is closed when it runs out.
fn serve_conn_within(
    core: &Mutex<AgentCore>,
    key: &SigningKey,
    stream: TcpStream,
    handshake: Duration,
) -> Result<(), ChannelError> {
    await_hello(&stream, handshake)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    // A client that stops reading cannot hold this thread for ever.
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    // A reply goes out in more than one write: without this, Nagle holds the last one
    // until the client's delayed acknowledgement (about 40 ms on every request).
    let _ = stream.set_nodelay(true);
    let ch = channel::server(stream, key)?;
    ch_loop(core, ch)
}

/// Wait (at most `limit`) until the client's whole channel hello is buffered, so the
/// handshake that follows does not wait on the client.
fn await_hello(stream: &TcpStream, limit: Duration) -> std::io::Result<()> {
    let end = Instant::now() + limit;
    let mut buf = [0u8; channel::HELLO_LEN];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        match stream.peek(&mut buf) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) if n >= buf.len() => return Ok(()),
            // Part of it: the rest is on its way (or never comes; the deadline decides).
            Ok(_) => std::thread::sleep(Duration::from_millis(20).min(left)),
            Err(e) if read_again(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

/// A read that ended with its timeout or was interrupted: nothing is wrong, read again.
pub(crate) fn read_again(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock
            | std::io::ErrorKind::TimedOut
            | std::io::ErrorKind::Interrupted
    )
}

fn ch_loop(
    core: &Mutex<AgentCore>,
    mut ch: channel::Channel<TcpStream>,
) -> Result<(), ChannelError> {
    {
        let mut c = core.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = c.reload_authorizations() {
            tracing::warn!(error = %e, "authorisations not reloaded");
        }
    }
    loop {
        let msg = match ch.recv() {
            Ok(m) => m,
            Err(ChannelError::Io(e))
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::UnexpectedEof | std::io::ErrorKind::ConnectionReset
                ) =>
            {
                return Ok(())
            }
            Err(e) => return Err(e),
        };
        // Another agent's tunnel of a live migration (it names a token, not a user).
        if let Some(hello) = crate::migrate::TunnelHello::parse(&msg) {
            return migrate::serve_tunnel(core, ch, hello);
        }
        let id = *ch.id();
        let reply = match serde_json::from_slice::<Envelope>(&msg) {
            Ok(env) => {
                let served =
                    core.lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .serve(&id, &env, unix_now());
                match served {
                    Served::Now(r) => r,
                    // A command in a VM may run for minutes: not under the lock.
                    Served::Exec(plan) => stack::exec_reply(plan),
                }
            }
            Err(e) => Reply {
                ok: false,
                error: Some(format!("malformed envelope: {e}")),
                data: serde_json::Value::Null,
            },
        };
        let out = serde_json::to_vec(&reply).unwrap_or_else(|_| b"{\"ok\":false}".to_vec());
        ch.send(&out)?;
    }
}

/// Most connections served at once by default; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Bounds of the agent's listener.
#[derive(Debug, Clone, Copy)]
pub struct ListenLimits {
    /// Connections served at once; more are closed at accept (counted).
    pub max_connections: usize,
    /// Time a client has to send its channel hello; closed after it (counted).
    pub handshake_timeout: Duration,
}

impl Default for ListenLimits {
    fn default() -> ListenLimits {
        ListenLimits {
            max_connections: MAX_CONNECTIONS,
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Counters of the agent's listener.
#[derive(Debug, Default)]
pub struct ListenStats {
    /// Connections accepted and served.
    pub accepted: AtomicU64,
    /// Connections closed at accept because `max_connections` were open.
    pub refused: AtomicU64,
    /// Connections closed for not sending the channel hello in time.
    pub handshake_timeouts: AtomicU64,
    /// Failed `accept` calls (descriptors or memory short, aborted connections).
    pub accept_errors: AtomicU64,
}

/// Accept connections until `stop` is set, then shut the core down.
pub fn serve(
    core: Arc<Mutex<AgentCore>>,
    key: Arc<SigningKey>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    serve_with(
        core,
        key,
        listener,
        stop,
        ListenLimits::default(),
        Arc::default(),
    )
}

/// [`serve`] with explicit limits and counters. Failed accepts never end the loop: resource
/// errors (`EMFILE`, `ENFILE`, `ENOMEM`, `ENOBUFS`) back off from 5 ms to 1 s and are logged
/// once per burst, with a summary when accepting works again.
pub fn serve_with(
    core: Arc<Mutex<AgentCore>>,
    key: Arc<SigningKey>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
    limits: ListenLimits,
    stats: Arc<ListenStats>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut errors = accept_backoff::AcceptBackoff::new("agent");
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, peer)) => {
                errors.ok();
                if open.load(Ordering::Relaxed) >= limits.max_connections {
                    let refused = stats.refused.fetch_add(1, Ordering::Relaxed) + 1;
                    if refused.is_power_of_two() {
                        tracing::warn!(%peer, refused, max = limits.max_connections, "too many open connections; closed at accept");
                    }
                    continue;
                }
                if s.set_nonblocking(false).is_err() {
                    continue;
                }
                let core = core.clone();
                let key = key.clone();
                let open2 = open.clone();
                let stats2 = stats.clone();
                open.fetch_add(1, Ordering::Relaxed);
                let spawned =
                    std::thread::Builder::new()
                        .name("agent-conn".into())
                        .spawn(move || {
                            match serve_conn_within(&core, &key, s, limits.handshake_timeout) {
                                Ok(()) => {}
                                Err(ChannelError::Io(e))
                                    if e.kind() == std::io::ErrorKind::TimedOut =>
                                {
                                    stats2.handshake_timeouts.fetch_add(1, Ordering::Relaxed);
                                    tracing::debug!(%peer, "no channel hello in time; closed");
                                }
                                Err(e) => tracing::debug!(%peer, error = %e, "connection ended"),
                            }
                            open2.fetch_sub(1, Ordering::Relaxed);
                        });
                match spawned {
                    Ok(_) => {
                        stats.accepted.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        // The closure (and the connection) were dropped unrun.
                        open.fetch_sub(1, Ordering::Relaxed);
                        tracing::warn!(%peer, error = %e, "no thread for a connection; closed");
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                stats.accept_errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(errors.failed(&e));
            }
        }
    }
    tracing::info!(
        accepted = stats.accepted.load(Ordering::Relaxed),
        refused = stats.refused.load(Ordering::Relaxed),
        handshake_timeouts = stats.handshake_timeouts.load(Ordering::Relaxed),
        accept_errors = stats.accept_errors.load(Ordering::Relaxed),
        "agent listener closed"
    );
    core.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    Ok(())
}
