//! `mvc agent`: the per-site appliance on each frontend.
//!
//! It reports its site's VM hosts and free capacity, reserves VM slots for clusters,
//! starts and stops the VMs (through a [`VmDriver`]) and the overlay processes (edge,
//! and on the origin frontend the supernode) there. Every request arrives signed by a
//! user key over the encrypted [`crate::channel`]; the site admin's authorisations
//! (`authorized.json`, written by `mvc agent authorize`) decide what each key may do.
//!
//! State directory layout: `agent.key` (the agent's Ed25519 key, PKCS#8 hex, 0600),
//! `authorized.json`, `state.json` (reservations, survives restarts), `secrets/`
//! (community secrets, 0600), `run/` (logs, leases, status sockets).
use crate::auth::{AuthError, Authorization, Envelope, SigningKey, Verifier};
use crate::channel::{self, ChannelError};
use crate::driver::{self, run, stop_child, DriverError, RunningVm, VmDriver};
use crate::model::HostInfo;
use crate::proto::{AgentVm, Body, InfoData, Reply, Request, SlotReq, VmSpec, PROTO_VERSION};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

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
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Slot {
    name: String,
    host: String,
    memory_mb: u64,
    state: String,
    handle: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct OverlayHere {
    tap: String,
    bridge: String,
    pids: Vec<u32>,
    #[serde(default)]
    supernode_port: Option<u16>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct ClusterHere {
    owner: String,
    slots: Vec<Slot>,
    overlay: Option<OverlayHere>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Persisted {
    clusters: BTreeMap<String, ClusterHere>,
}

/// Path of the agent key in a state directory.
pub fn key_path(state_dir: &Path) -> PathBuf {
    state_dir.join("agent.key")
}

/// Path of the authorisations file in a state directory.
pub fn authz_path(state_dir: &Path) -> PathBuf {
    state_dir.join("authorized.json")
}

/// Write `text` to `path` with mode 0600, atomically.
pub fn write_private(path: &Path, text: &str) -> Result<(), AgentError> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let file_err = |err| AgentError::File {
        path: path.into(),
        err,
    };
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d).map_err(file_err)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(file_err)?;
    f.write_all(text.as_bytes()).map_err(file_err)?;
    f.sync_all().map_err(file_err)?;
    std::fs::rename(&tmp, path).map_err(file_err)
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

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The agent's request handling and its resources.
pub struct AgentCore {
    cfg: AgentConfig,
    state: Persisted,
    driver: Box<dyn VmDriver>,
    running: HashMap<String, RunningVm>,
    overlay_procs: HashMap<String, Vec<Child>>,
    verifier: Verifier,
}

type Refusal = String;

impl AgentCore {
    /// Open the agent's state: key must exist; leftovers of a previous run that did not
    /// shut down cleanly are removed.
    pub fn open(cfg: AgentConfig, driver: Box<dyn VmDriver>) -> Result<AgentCore, AgentError> {
        load_key(&cfg.state_dir)?;
        let dir_err = |err| AgentError::File {
            path: cfg.state_dir.join("run"),
            err,
        };
        std::fs::create_dir_all(cfg.state_dir.join("run")).map_err(dir_err)?;
        let sp = cfg.state_dir.join("state.json");
        let mut state: Persisted = match std::fs::read_to_string(&sp) {
            Ok(t) => serde_json::from_str(&t).map_err(|err| AgentError::Parse {
                path: sp.clone(),
                err,
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Persisted::default(),
            Err(err) => return Err(AgentError::File { path: sp, err }),
        };
        let mut driver = driver;
        for c in state.clusters.values_mut() {
            for s in &mut c.slots {
                if let Some(h) = s.handle.take() {
                    driver.cleanup(&h);
                }
                if s.state == "running" {
                    s.state = "stopped".into();
                }
            }
            if let Some(o) = c.overlay.take() {
                kill_stale(&o);
            }
        }
        let verifier = Verifier::new(load_authorizations(&cfg.state_dir)?);
        let core = AgentCore {
            cfg,
            state,
            driver,
            running: HashMap::new(),
            overlay_procs: HashMap::new(),
            verifier,
        };
        core.save()?;
        Ok(core)
    }

    /// The agent's public key (hex).
    pub fn public_key(&self) -> Result<String, AgentError> {
        Ok(load_key(&self.cfg.state_dir)?.public_hex())
    }

    fn save(&self) -> Result<(), AgentError> {
        let p = self.cfg.state_dir.join("state.json");
        let t = serde_json::to_string_pretty(&self.state).map_err(|err| AgentError::Parse {
            path: p.clone(),
            err,
        })?;
        write_private(&p, &t)
    }

    fn run_dir(&self) -> PathBuf {
        self.cfg.state_dir.join("run")
    }

    /// Re-read the authorisations file (the admin may have changed it).
    pub fn reload_authorizations(&mut self) -> Result<(), AgentError> {
        let a = load_authorizations(&self.cfg.state_dir)?;
        self.verifier.set_authorizations(a);
        Ok(())
    }

    /// Check and serve one signed request that arrived on channel `channel_id`.
    pub fn handle(&mut self, channel_id: &[u8; 32], env: &Envelope, now: u64) -> Reply {
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
                Ok(b) => b
                    .req
                    .validate()
                    .and_then(|()| self.dispatch(&authz, b.req))
                    .map_err(|e| format!("site {}: {e}", self.cfg.site)),
            },
        };
        match result {
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
        }
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

    fn owned(&mut self, owner: &str, cluster: &str) -> Result<&mut ClusterHere, Refusal> {
        match self.state.clusters.get_mut(cluster) {
            None => Err(format!("no cluster {cluster:?} reserved here")),
            Some(c) if c.owner != owner => {
                Err(format!("cluster {cluster:?} belongs to another key"))
            }
            Some(c) => Ok(c),
        }
    }

    fn dispatch(
        &mut self,
        authz: &Authorization,
        req: Request,
    ) -> Result<serde_json::Value, Refusal> {
        let json = |v: &dyn erased::Ser| v.to_value();
        match req {
            Request::Info => {
                let mut vms = Vec::new();
                let mut overlays = Vec::new();
                let mut edges = Vec::new();
                for (name, c) in &self.state.clusters {
                    if c.owner != authz.key {
                        continue;
                    }
                    for s in &c.slots {
                        vms.push(AgentVm {
                            cluster: name.clone(),
                            name: s.name.clone(),
                            host: s.host.clone(),
                            state: s.state.clone(),
                            handle: s.handle.clone(),
                        });
                    }
                    let up = self.overlay_procs.get_mut(name).is_some_and(|p| {
                        !p.is_empty() && p.iter_mut().all(|c| matches!(c.try_wait(), Ok(None)))
                    });
                    overlays.push((name.clone(), up));
                    if let (true, OverlayImpl::Mvc(bin)) = (up, &self.cfg.overlay) {
                        let sock = self.run_dir().join(format!("edge-{name}.sock"));
                        if let Some(v) = edge_status(bin, &sock) {
                            edges.push((name.clone(), v));
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
                })
            }
            Request::Reserve { cluster, slots } => self.reserve(authz, &cluster, slots),
            Request::Release { cluster } => {
                match self.state.clusters.get(&cluster) {
                    None => return json(&"nothing reserved"),
                    Some(c) if c.owner != authz.key => {
                        return Err(format!("cluster {cluster:?} belongs to another key"))
                    }
                    Some(_) => {}
                }
                self.release(&cluster);
                self.save().map_err(|e| e.to_string())?;
                json(&"released")
            }
            Request::StartOverlay {
                cluster,
                community,
                secret,
                supernode,
                supernode_port,
                tap,
                bridge,
                edge_name,
            } => {
                self.owned(&authz.key, &cluster)?;
                self.start_overlay(
                    &cluster,
                    &community,
                    &secret,
                    &supernode,
                    supernode_port,
                    &tap,
                    &bridge,
                    &edge_name,
                )
                .map_err(|e| format!("starting overlay of {cluster:?}: {e}"))?;
                self.save().map_err(|e| e.to_string())?;
                json(&"overlay up")
            }
            Request::StartVm { spec } => {
                let c = self.owned(&authz.key, &spec.cluster)?;
                if !c
                    .slots
                    .iter()
                    .any(|s| s.name == spec.name && s.host == spec.host)
                {
                    return Err(format!(
                        "VM {:?} has no reserved slot on host {:?} here",
                        spec.name, spec.host
                    ));
                }
                if c.overlay.is_none() {
                    return Err(format!(
                        "overlay of {:?} is not up here; start the cluster",
                        spec.cluster
                    ));
                }
                self.start_vm(&spec)
                    .map_err(|e| format!("starting VM {:?}: {e}", spec.name))?;
                self.save().map_err(|e| e.to_string())?;
                json(&"running")
            }
            Request::StopVm { cluster, vm } => {
                let c = self.owned(&authz.key, &cluster)?;
                if !c.slots.iter().any(|s| s.name == vm) {
                    return Err(format!("no VM {vm:?} in cluster {cluster:?} here"));
                }
                self.stop_vm(&cluster, &vm);
                self.save().map_err(|e| e.to_string())?;
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
                        .map_err(|_| format!("not an IPv4 address: {t:?}"))?;
                    out.push(self.driver.ping(&handle, ip).map_err(|e| e.to_string())?);
                }
                json(&out)
            }
        }
    }

    fn handle_of(&mut self, owner: &str, cluster: &str, vm: &str) -> Result<String, Refusal> {
        let c = self.owned(owner, cluster)?;
        c.slots
            .iter()
            .find(|s| s.name == vm)
            .ok_or_else(|| format!("no VM {vm:?} in cluster {cluster:?} here"))?
            .handle
            .clone()
            .ok_or_else(|| format!("VM {vm:?} is not running"))
    }

    fn reserve(
        &mut self,
        authz: &Authorization,
        cluster: &str,
        slots: Vec<SlotReq>,
    ) -> Result<serde_json::Value, Refusal> {
        if let Some(c) = self.state.clusters.get(cluster) {
            let same = c.owner == authz.key
                && c.slots.len() == slots.len()
                && c.slots
                    .iter()
                    .zip(&slots)
                    .all(|(a, b)| a.name == b.name && a.host == b.host);
            return if same {
                Ok(serde_json::json!("already reserved"))
            } else {
                Err(format!(
                    "cluster {cluster:?} already has a reservation here"
                ))
            };
        }
        let held: u32 = self
            .state
            .clusters
            .values()
            .filter(|c| c.owner == authz.key)
            .map(|c| c.slots.len() as u32)
            .sum();
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
                    "host {:?} lacks capacity: asked {} VMs / {mem} MiB, free {} VMs / {} MiB",
                    h.name,
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
            return Err(format!("no host {:?} at this site", s.host));
        }
        self.state.clusters.insert(
            cluster.into(),
            ClusterHere {
                owner: authz.key.clone(),
                slots: slots
                    .into_iter()
                    .map(|s| Slot {
                        name: s.name,
                        host: s.host,
                        memory_mb: s.memory_mb,
                        state: "reserved".into(),
                        handle: None,
                    })
                    .collect(),
                overlay: None,
            },
        );
        self.save().map_err(|e| e.to_string())?;
        Ok(serde_json::json!("reserved"))
    }

    #[allow(clippy::too_many_arguments)]
    fn start_overlay(
        &mut self,
        cluster: &str,
        community: &str,
        secret: &str,
        supernode: &str,
        supernode_port: Option<u16>,
        tap: &str,
        bridge: &str,
        edge_name: &str,
    ) -> Result<(), DriverError> {
        if let Some(p) = self.overlay_procs.get_mut(cluster) {
            if !p.is_empty() && p.iter_mut().all(|c| matches!(c.try_wait(), Ok(None))) {
                return Ok(());
            }
        }
        self.stop_overlay(cluster);
        let run_dir = self.run_dir();
        let secret_file = self
            .cfg
            .state_dir
            .join("secrets")
            .join(format!("{cluster}.key"));
        write_private(&secret_file, secret).map_err(|e| DriverError::Config(e.to_string()))?;
        if run("ip", &["link", "show", bridge]).is_err() {
            run("ip", &["link", "add", bridge, "type", "bridge"])?;
        }
        run("ip", &["link", "set", bridge, "up"])?;
        let log = run_dir.join(format!("overlay-{cluster}.log"));
        let mut procs = Vec::new();
        let result = (|| -> Result<(), DriverError> {
            if let Some(port) = supernode_port {
                let listen = format!("0.0.0.0:{port}");
                let sock = run_dir
                    .join(format!("sn-{cluster}.sock"))
                    .display()
                    .to_string();
                let p = port.to_string();
                procs.push(match &self.cfg.overlay {
                    OverlayImpl::Mvc(bin) => driver::spawn(
                        &bin.display().to_string(),
                        &["supernode", "--listen", &listen, "--status-socket", &sock],
                        &[],
                        &log,
                    )?,
                    OverlayImpl::N2n => driver::spawn("supernode", &["-l", &p], &[], &log)?,
                });
            }
            let sock = run_dir
                .join(format!("edge-{cluster}.sock"))
                .display()
                .to_string();
            let sf = secret_file.display().to_string();
            procs.push(match &self.cfg.overlay {
                OverlayImpl::Mvc(bin) => driver::spawn(
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
                        supernode,
                        "--tap",
                        tap,
                        "--create-tap",
                        "--status-socket",
                        &sock,
                    ],
                    &[],
                    &log,
                )?,
                OverlayImpl::N2n => driver::spawn(
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
            let deadline = Instant::now() + Duration::from_secs(15);
            while run("ip", &["link", "show", tap]).is_err() {
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
        if let Some(c) = self.state.clusters.get_mut(cluster) {
            c.overlay = Some(OverlayHere {
                tap: tap.into(),
                bridge: bridge.into(),
                pids: procs.iter().map(|c| c.id()).collect(),
                supernode_port,
            });
        }
        self.overlay_procs.insert(cluster.into(), procs);
        Ok(())
    }

    fn stop_overlay(&mut self, cluster: &str) {
        if let Some(mut procs) = self.overlay_procs.remove(cluster) {
            for c in &mut procs {
                stop_child(c);
            }
        }
        if let Some(o) = self
            .state
            .clusters
            .get_mut(cluster)
            .and_then(|c| c.overlay.take())
        {
            let _ = run("ip", &["link", "del", &o.tap]);
            let _ = run("ip", &["link", "del", &o.bridge]);
        }
        let _ = std::fs::remove_file(
            self.cfg
                .state_dir
                .join("secrets")
                .join(format!("{cluster}.key")),
        );
    }

    fn start_vm(&mut self, spec: &VmSpec) -> Result<(), DriverError> {
        if let Some(vm) = self.running.get_mut(&spec.name) {
            if vm
                .children
                .iter_mut()
                .all(|c| matches!(c.try_wait(), Ok(None)))
            {
                return Ok(());
            }
            let mut vm = self.running.remove(&spec.name).expect("present");
            let _ = self.driver.stop(&mut vm);
        }
        let vm = self.driver.start(spec)?;
        if let Some(s) = self
            .state
            .clusters
            .get_mut(&spec.cluster)
            .and_then(|c| c.slots.iter_mut().find(|s| s.name == spec.name))
        {
            s.state = "running".into();
            s.handle = Some(vm.handle.clone());
        }
        self.running.insert(spec.name.clone(), vm);
        Ok(())
    }

    fn stop_vm(&mut self, cluster: &str, vm: &str) {
        if let Some(mut r) = self.running.remove(vm) {
            let _ = self.driver.stop(&mut r);
        }
        if let Some(s) = self
            .state
            .clusters
            .get_mut(cluster)
            .and_then(|c| c.slots.iter_mut().find(|s| s.name == vm))
        {
            if let Some(h) = s.handle.take() {
                self.driver.cleanup(&h);
            }
            s.state = "stopped".into();
        }
    }

    fn release(&mut self, cluster: &str) {
        let names: Vec<String> = self
            .state
            .clusters
            .get(cluster)
            .map(|c| c.slots.iter().map(|s| s.name.clone()).collect())
            .unwrap_or_default();
        for n in names {
            self.stop_vm(cluster, &n);
            self.driver.discard(&n);
        }
        self.stop_overlay(cluster);
        self.state.clusters.remove(cluster);
    }

    /// Stop every VM and overlay process this agent started (reservations stay).
    pub fn shutdown(&mut self) {
        let all: Vec<(String, Vec<String>)> = self
            .state
            .clusters
            .iter()
            .map(|(k, c)| (k.clone(), c.slots.iter().map(|s| s.name.clone()).collect()))
            .collect();
        for (cluster, vms) in all {
            for v in vms {
                if self.running.contains_key(&v) {
                    self.stop_vm(&cluster, &v);
                }
            }
            self.stop_overlay(&cluster);
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

/// Kill overlay processes left by an agent that died without shutting down, when the
/// pid still runs a process naming our TAP.
fn kill_stale(o: &OverlayHere) {
    for pid in &o.pids {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let ours = cmdline.contains(&o.tap)
            || o.supernode_port
                .is_some_and(|p| cmdline.contains("supernode") && cmdline.contains(&p.to_string()));
        if ours {
            if let Ok(p) = i32::try_from(*pid) {
                // SAFETY: kill(2) has no memory-safety preconditions; the pid was one of
                // ours and its command line still names our TAP or supernode.
                unsafe {
                    libc::kill(p, libc::SIGTERM);
                }
            }
        }
    }
    let _ = run("ip", &["link", "del", &o.tap]);
    let _ = run("ip", &["link", "del", &o.bridge]);
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
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut ch = channel::server(stream, key)?;
    ch_loop(core, &mut ch)
}

fn ch_loop(
    core: &Mutex<AgentCore>,
    ch: &mut channel::Channel<TcpStream>,
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
        let id = *ch.id();
        let reply = match serde_json::from_slice::<Envelope>(&msg) {
            Ok(env) => core
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .handle(&id, &env, unix_now()),
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

/// Most connections served at once; more are closed at accept.
pub const MAX_CONNECTIONS: usize = 64;

/// Accept connections until `stop` is set, then shut the core down.
pub fn serve(
    core: Arc<Mutex<AgentCore>>,
    key: Arc<SigningKey>,
    listener: TcpListener,
    stop: Arc<AtomicBool>,
) -> std::io::Result<()> {
    listener.set_nonblocking(true)?;
    let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut refused: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((s, peer)) => {
                if open.load(Ordering::Relaxed) >= MAX_CONNECTIONS {
                    refused += 1;
                    tracing::warn!(%peer, refused, "too many open connections; refused");
                    continue;
                }
                if s.set_nonblocking(false).is_err() {
                    continue;
                }
                let core = core.clone();
                let key = key.clone();
                let open = open.clone();
                open.fetch_add(1, Ordering::Relaxed);
                std::thread::spawn(move || {
                    if let Err(e) = serve_conn(&core, &key, s) {
                        tracing::debug!(%peer, error = %e, "connection ended");
                    }
                    open.fetch_sub(1, Ordering::Relaxed);
                });
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => {
                // EMFILE, ECONNABORTED...: keep serving.
                tracing::warn!(error = %e, "accept failed");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
    core.lock().unwrap_or_else(|p| p.into_inner()).shutdown();
    Ok(())
}
