//! `mvc agent`: a site admin's commands (init, authorize, revoke, run, gc, qemu-prepare).
use crate::{host_list_arg, print};
use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use control::agent::{self, AgentConfig, AgentCore, HostSpec, OverlayImpl};
use control::auth::Authorization;
use control::driver::guest::{self, BootFiles};
use control::driver::{
    LibvirtConfig, LibvirtDriver, NetnsDriver, QemuConfig, QemuDriver, VmDriver,
};
use control::validate;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Subcommand)]
pub enum AgentCmd {
    /// Create the state directory and the agent key; prints the agent public key that
    /// controllers pin with `mvc site add --agent-key`.
    Init {
        /// State directory.
        #[arg(long, default_value = "/var/lib/mvc/agent")]
        state: PathBuf,
    },
    /// Let a user key use this site.
    Authorize {
        /// State directory.
        #[arg(long, default_value = "/var/lib/mvc/agent")]
        state: PathBuf,
        /// The user's public key (hex, from `mvc key show`).
        #[arg(long = "key", visible_alias = "user-key", value_parser = validate::public_key)]
        user_key: String,
        /// Most VMs this key may hold here at once.
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..=65536))]
        max_vms: u32,
        /// Hosts it may use, comma separated, or `*`.
        #[arg(long, default_value = "*", value_parser = host_list_arg)]
        hosts: String,
        /// Do not let it create clusters here.
        #[arg(long)]
        no_create_clusters: bool,
        /// Who this is.
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// Withdraw a user key's authorisation.
    Revoke {
        /// State directory.
        #[arg(long, default_value = "/var/lib/mvc/agent")]
        state: PathBuf,
        /// The user's public key (hex).
        #[arg(long = "key", visible_alias = "user-key", value_parser = validate::public_key)]
        user_key: String,
    },
    /// Serve controllers (foreground; SIGINT/SIGTERM stop every VM and overlay process
    /// it started and exit).
    Run(AgentRun),
    /// Reconcile a stopped agent's store with what exists (what `mvc agent run` does
    /// at start): reservations whose lease lapsed or whose release was cut short are
    /// removed with every namespace, link, process and file they name; what the
    /// other reservations left running is stopped. Refused while the agent runs (it
    /// expires leases itself).
    Gc {
        /// State directory.
        #[arg(long, default_value = "/var/lib/mvc/agent")]
        state: PathBuf,
        /// VM driver the agent runs with.
        #[arg(long, default_value = "netns", value_parser = ["netns", "qemu", "libvirt"])]
        driver: String,
        /// Prefix of the netns VMs' namespace names and libvirt domain names (as the
        /// agent runs with).
        #[arg(long, default_value = "mvc-")]
        ns_prefix: String,
        #[command(flatten)]
        libvirt: LibvirtArgs,
        /// The machine's claim directory (as the agent runs with).
        #[arg(long, env = "MVC_CLAIMS_DIR", default_value = control::claims::DEFAULT_DIR)]
        claims_dir: PathBuf,
        /// Only print what would be done.
        #[arg(long)]
        dry_run: bool,
    },
    /// Fetch the guest kernel (when the host has none in /boot) and build the guest
    /// initramfs of the qemu driver into the cache; prints their paths.
    QemuPrepare {
        /// Cache directory.
        #[arg(long, default_value = "/var/cache/mvc")]
        cache: PathBuf,
        /// Build the guest of clusters with the Slurm stack (munged, slurmd and their
        /// libraries from this machine) instead of the plain one.
        #[arg(long)]
        slurm: bool,
    },
}

/// Options of the qemu driver (`mvc agent run --driver qemu`; disk, boot and vCPU
/// options also of `--driver libvirt`).
#[derive(Args)]
pub struct QemuArgs {
    /// Image each new VM disk starts as a raw copy of (raw, qcow2, ...: what qemu-img
    /// reads) [default: an empty sparse disk of --qemu-disk-mb].
    #[arg(long)]
    qemu_image: Option<PathBuf>,
    /// Size of an empty VM disk (MiB).
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u64).range(1..=(1 << 24)))]
    qemu_disk_mb: u64,
    /// Cache of guest kernels and initramfs images.
    #[arg(long, default_value = "/var/cache/mvc")]
    qemu_cache: PathBuf,
    /// Kernel to boot instead of the built guest (needs --qemu-initrd).
    #[arg(long, requires = "qemu_initrd")]
    qemu_kernel: Option<PathBuf>,
    /// Initramfs to boot with --qemu-kernel.
    #[arg(long, requires = "qemu_kernel")]
    qemu_initrd: Option<PathBuf>,
    /// Extra kernel command line.
    #[arg(long, default_value = "")]
    qemu_append: String,
    /// vCPUs per VM.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    qemu_vcpus: u32,
    /// The xnbd binary serving VM disks [default: next to this binary, else PATH].
    #[arg(long, env = "MVC_XNBD")]
    xnbd: Option<PathBuf>,
    /// QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu_bin: String,
}

/// Options of the libvirt driver (`mvc agent run --driver libvirt`; the disk, boot
/// and vCPU options are the qemu driver's).
#[derive(Args)]
pub struct LibvirtArgs {
    /// libvirt connection URI (`qemu:///system`, `xen:///system`, ...).
    #[arg(long, default_value = "qemu:///system")]
    libvirt_uri: String,
    /// Directory of the domains' NBD and console sockets and boot file copies (the
    /// hypervisor's group may enter it).
    #[arg(long, default_value = "/run/mvc/libvirt")]
    libvirt_sock_dir: PathBuf,
    /// Group the hypervisor runs VMs as; `""`: the sockets stay root's.
    #[arg(long, default_value = "libvirt-qemu")]
    libvirt_group: String,
    /// Let other sites' libvirtds live-migrate domains into this site's libvirtd
    /// through the agent (`mvc vm migrate` to this site). While a domain moves, the
    /// origin's libvirtd holds a connection to this libvirtd with its rights: allow it
    /// only between sites whose admins trust each other as with `qemu+ssh://root@`.
    #[arg(long)]
    libvirt_accept_migrations: bool,
}

impl LibvirtArgs {
    fn config(self, state: &Path, prefix: &str, vm: QemuConfig) -> LibvirtConfig {
        LibvirtConfig {
            uri: self.libvirt_uri,
            sock_dir: self.libvirt_sock_dir,
            group: Some(self.libvirt_group).filter(|g| !g.is_empty()),
            vm,
            accept_migrations: self.libvirt_accept_migrations,
            ..LibvirtConfig::new(state, prefix)
        }
    }
}

#[derive(Args)]
pub struct AgentRun {
    /// State directory (made by `mvc agent init`).
    #[arg(long, default_value = "/var/lib/mvc/agent")]
    state: PathBuf,
    /// This site's name (as controllers register it).
    #[arg(long, value_parser = validate::site_name)]
    site: String,
    /// TCP address to listen on.
    #[arg(long, default_value = "0.0.0.0:7000", value_parser = validate::listen_addr)]
    listen: String,
    /// Connections served at once; more are closed at accept.
    #[arg(long, default_value_t = agent::MAX_CONNECTIONS)]
    max_connections: usize,
    /// Seconds a client has to send its channel hello before it is closed.
    #[arg(long, default_value_t = 10.0)]
    handshake_timeout: f64,
    /// A VM host: NAME:VCPUS:MEMORY_MB:MAX_VMS (repeatable; default: this machine).
    #[arg(long = "host")]
    hosts: Vec<HostSpec>,
    /// VM driver.
    #[arg(long, default_value = "netns", value_parser = ["netns", "qemu", "libvirt"])]
    driver: String,
    /// Prefix of the netns VMs' namespace names and libvirt domain names.
    #[arg(long, default_value = "mvc-", value_parser = validate::ns_prefix)]
    ns_prefix: String,
    #[command(flatten)]
    qemu: Box<QemuArgs>,
    #[command(flatten)]
    libvirt: LibvirtArgs,
    /// Overlay implementation: this project's `mvc edge`/`mvc supernode`, or Debian's
    /// n2n 1.3 (the 2012 paper's overlay, for comparison).
    #[arg(long, default_value = "mvc", value_parser = ["mvc", "n2n"])]
    overlay: String,
    /// The binary providing `edge` and `supernode` for `--overlay mvc` [default: this one].
    #[arg(long, env = "MVC_OVERLAY_BIN")]
    overlay_bin: Option<PathBuf>,
    /// Seconds a reservation holds until the controller confirms it.
    #[arg(long, default_value_t = agent::DEFAULT_LEASE_SECS)]
    lease_secs: u64,
    /// UDP ports cluster supernodes may listen on here: FIRST-LAST.
    #[arg(long, default_value = "7700-7999")]
    supernode_ports: String,
    /// The machine's claim directory, shared by all its agents: cluster numbers and
    /// supernode ports are claimed there so that agents on one machine never pick the
    /// same bridge, TAP, veth, namespace or port.
    #[arg(long, env = "MVC_CLAIMS_DIR", default_value = control::claims::DEFAULT_DIR)]
    claims_dir: PathBuf,
}

fn default_host() -> HostSpec {
    let vcpus = std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1);
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map(|kb| kb / 1024)
        .unwrap_or(4096);
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "localhost".into());
    HostSpec {
        name,
        vcpus,
        memory_mb: mem,
        max_vms: 16,
    }
}

/// Refuses a state directory that `mvc agent init` has not made (nothing is created).
fn initialised(state: &Path) -> Result<(), validate::Invalid> {
    if agent::key_path(state).is_file() {
        Ok(())
    } else {
        Err(validate::Invalid(format!(
            "{} is not an agent state directory (no agent key): run `mvc agent init --state {}` first",
            state.display(),
            state.display()
        )))
    }
}

/// Run `mvc agent CMD`.
pub fn run(a: AgentCmd, json: bool) -> Result<()> {
    if let AgentCmd::Authorize { state, .. }
    | AgentCmd::Revoke { state, .. }
    | AgentCmd::Run(AgentRun { state, .. }) = &a
    {
        initialised(state)?;
    }
    match a {
        AgentCmd::Init { state } => {
            let pk = agent::init(&state)?;
            let v = serde_json::json!({"state": state, "agent_key": pk});
            print(json, &v, |_| format!("{pk}\n"))
        }
        AgentCmd::Authorize {
            state,
            user_key,
            max_vms,
            hosts,
            no_create_clusters,
            comment,
        } => {
            let a = Authorization {
                key: user_key,
                comment,
                may_create_clusters: !no_create_clusters,
                max_vms,
                hosts: validate::host_list(&hosts)?,
            };
            agent::authorize(&state, a.clone())?;
            print(json, &a, |a| {
                format!(
                    "authorised {}: create clusters {}, at most {} VMs, hosts {}\n",
                    a.key,
                    if a.may_create_clusters { "yes" } else { "no" },
                    a.max_vms,
                    a.hosts.join(",")
                )
            })
        }
        AgentCmd::Revoke { state, user_key } => {
            if !agent::revoke(&state, &user_key)? {
                bail!("key {user_key} was not authorised");
            }
            let v = serde_json::json!({"revoked": user_key});
            print(json, &v, |_| format!("revoked {user_key}\n"))
        }
        AgentCmd::QemuPrepare { cache, slurm } => {
            let b = guest::prepare_with(&cache, true, &guest::GuestOptions::new(slurm))?;
            let v = serde_json::json!({
                "kernel": b.kernel.display().to_string(),
                "initrd": b.initrd.display().to_string(),
            });
            print(json, &v, |_| {
                format!(
                    "kernel  {}\ninitrd  {}\n",
                    b.kernel.display(),
                    b.initrd.display()
                )
            })
        }
        AgentCmd::Gc {
            state,
            driver,
            ns_prefix,
            libvirt,
            claims_dir,
            dry_run,
        } => {
            let state = state
                .canonicalize()
                .with_context(|| format!("state directory {}", state.display()))?;
            if let Some(pid) = agent::running_agent(&state) {
                bail!(
                    "the agent of {} runs (pid {pid}); it reconciles at start and expires \
                     leases itself: stop it to collect",
                    state.display()
                );
            }
            let drv: Box<dyn VmDriver> = match driver.as_str() {
                "qemu" => Box::new(QemuDriver::new(QemuConfig::new(&state))),
                "libvirt" => Box::new(LibvirtDriver::new(libvirt.config(
                    &state,
                    &ns_prefix,
                    QemuConfig::new(&state),
                ))),
                _ => Box::new(NetnsDriver::new(&ns_prefix, &state.join("run"))),
            };
            let mut cfg = AgentConfig::new(
                "gc",
                &state,
                Vec::new(),
                OverlayImpl::Mvc(std::env::current_exe()?),
            );
            cfg.claims_dir = claims_dir;
            let mut core = AgentCore::load(cfg, drv)?;
            let done = core.reconcile(agent::unix_now(), dry_run);
            print(
                json,
                &serde_json::json!({"dry_run": dry_run, "actions": done}),
                |_| {
                    let mut s = String::new();
                    if done.is_empty() {
                        s.push_str("nothing to collect\n");
                    }
                    for l in &done {
                        s += &format!("{}{l}\n", if dry_run { "would: " } else { "" });
                    }
                    s
                },
            )
        }
        AgentCmd::Run(r) => {
            std::fs::create_dir_all(r.state.join("run"))?;
            let state = r
                .state
                .canonicalize()
                .with_context(|| format!("state directory {}", r.state.display()))?;
            if let Some(pid) = agent::running_agent(&state) {
                bail!("an agent already runs on {} (pid {pid})", state.display());
            }
            agent::write_private(&state.join("agent.pid"), &std::process::id().to_string())?;
            let run_dir = state.join("run");
            let supernode_ports = r
                .supernode_ports
                .split_once('-')
                .and_then(|(a, b)| Some((a.parse::<u16>().ok()?, b.parse::<u16>().ok()?)))
                .filter(|(a, b)| *a > 0 && a <= b)
                .with_context(|| {
                    format!(
                        "--supernode-ports {}: want FIRST-LAST",
                        validate::quote(&r.supernode_ports)
                    )
                })?;
            let driver: Box<dyn VmDriver> = match r.driver.as_str() {
                "qemu" | "libvirt" => {
                    let q = *r.qemu;
                    let mut cfg = QemuConfig::new(&state);
                    cfg.image = q.qemu_image;
                    cfg.disk_mb = q.qemu_disk_mb;
                    cfg.cache_dir = q.qemu_cache;
                    cfg.append = q.qemu_append;
                    cfg.vcpus = q.qemu_vcpus;
                    cfg.qemu = q.qemu_bin;
                    if let Some(x) = q.xnbd {
                        cfg.xnbd = x;
                    }
                    if let (Some(kernel), Some(initrd)) = (q.qemu_kernel, q.qemu_initrd) {
                        cfg.boot = Some(BootFiles { kernel, initrd });
                    }
                    if r.driver == "libvirt" {
                        Box::new(LibvirtDriver::new(r.libvirt.config(
                            &state,
                            &r.ns_prefix,
                            cfg,
                        )))
                    } else {
                        Box::new(QemuDriver::new(cfg))
                    }
                }
                _ => Box::new(NetnsDriver::new(&r.ns_prefix, &run_dir)),
            };
            let overlay = match r.overlay.as_str() {
                "n2n" => OverlayImpl::N2n,
                _ => OverlayImpl::Mvc(match r.overlay_bin {
                    Some(p) => p,
                    None => std::env::current_exe()?,
                }),
            };
            let hosts = if r.hosts.is_empty() {
                vec![default_host()]
            } else {
                r.hosts
            };
            let cfg = AgentConfig {
                lease_secs: r.lease_secs,
                supernode_ports,
                claims_dir: r.claims_dir,
                ..AgentConfig::new(&r.site, &state, hosts, overlay)
            };
            let key = Arc::new(agent::load_key(&state)?);
            let core = Arc::new(Mutex::new(AgentCore::open(cfg, driver)?));
            let listener = std::net::TcpListener::bind(&r.listen)
                .with_context(|| format!("listening on {}", r.listen))?;
            let stop = Arc::new(AtomicBool::new(false));
            signal_hook::flag::register(signal_hook::consts::SIGTERM, stop.clone())?;
            signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())?;
            tracing::info!(site = %r.site, listen = %r.listen, agent_key = %key.public_hex(), driver = %r.driver, "agent serving");
            // Unconfirmed reservations lapse even when no request comes in.
            {
                let core = Arc::downgrade(&core);
                std::thread::spawn(move || {
                    while let Some(c) = core.upgrade() {
                        let mut g = c.lock().unwrap_or_else(|p| p.into_inner());
                        g.expire(agent::unix_now());
                        // A migrated VM's disk proxy that died is started again.
                        g.check_disk_proxies();
                        drop(g);
                        drop(c);
                        std::thread::sleep(Duration::from_secs(1));
                    }
                });
            }
            let limits = agent::ListenLimits {
                max_connections: r.max_connections.max(1),
                handshake_timeout: std::time::Duration::try_from_secs_f64(r.handshake_timeout)
                    .context("--handshake-timeout")?,
            };
            agent::serve_with(core, key, listener, stop, limits, Arc::default())?;
            tracing::info!("agent stopped; VMs and overlay processes it started are stopped");
            Ok(())
        }
    }
}
