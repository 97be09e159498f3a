//! `mvc`: the one operator binary of a site frontend.
//!
//! Overlay: `mvc edge`, `mvc supernode` (implemented in `dataplane::cli`).
//! Controller: `mvc key`, `mvc site`, `mvc cluster`, `mvc vm`; per-site appliance:
//! `mvc agent`; the whole thing on one machine: `mvc demo`.
use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use control::agent::{self, AgentConfig, AgentCore, HostSpec, OverlayImpl};
use control::auth::{Authorization, SigningKey};
use control::controller::{self, Controller, CreateArgs};
use control::driver::{NetnsDriver, QemuConfig, QemuDriver, VmDriver};
use control::guest::{self, BootFiles};
use control::store::SqliteStore;
use control::validate;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "mvc",
    version,
    about = "Multi-site virtual clusters over an encrypted L2 overlay",
    long_about = "Multi-site virtual clusters over an encrypted L2 overlay.\n\n\
        Quick start (controller on the origin frontend):\n  \
        mvc key gen                                   # your Ed25519 key\n  \
        # at each site, the admin: mvc agent init / mvc agent authorize / mvc agent run\n  \
        mvc site add A --agent 198.18.1.2:7000 --agent-key <hex>\n  \
        mvc cluster create vc1 --sites A:B:C --computes 3:2:2 --start\n  \
        mvc cluster hostfile vc1\n\n\
        Or everything on one machine: mvc demo"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

/// Options of every controller command (not of `mvc edge` / `mvc supernode`).
#[derive(Args, Clone)]
struct Common {
    /// Controller database.
    #[arg(
        long,
        global = true,
        env = "MVC_DB",
        default_value = "/var/lib/mvc/controller.db"
    )]
    db: PathBuf,
    /// Your Ed25519 key (PKCS#8 hex), made by `mvc key gen` [default: ~/.config/mvc/user.key].
    #[arg(long, global = true, env = "MVC_KEY")]
    key: Option<PathBuf>,
    /// Print results as JSON.
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand)]
enum Cmd {
    /// Joins this host to a community's private L2 network through a TAP device.
    Edge(dataplane::cli::EdgeCommand),
    /// Runs a rendezvous and relay point for edges (needs no secret).
    Supernode(dataplane::cli::SupernodeCommand),
    /// Your signing key.
    Key {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        cmd: KeyCmd,
    },
    /// The per-site agent (run by each site's admin on its frontend).
    Agent {
        /// Print results as JSON.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        cmd: AgentCmd,
    },
    /// Sites the controller knows.
    Site {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        cmd: SiteCmd,
    },
    /// Multi-site virtual clusters.
    Cluster {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        cmd: ClusterCmd,
    },
    /// Single VMs of a cluster.
    Vm {
        #[command(flatten)]
        common: Common,
        #[command(subcommand)]
        cmd: VmCmd,
    },
    /// On this machine: three sites (two behind NAT) in network namespaces, a cluster
    /// across them made with one command, an OpenMPI job on it, then teardown.
    Demo(DemoArgs),
}

#[derive(Subcommand)]
enum KeyCmd {
    /// Make a new key (refuses to overwrite unless --force) and print its public half.
    Gen {
        /// Where to write it (default: --key, or ~/.config/mvc/user.key).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Overwrite an existing key.
        #[arg(long)]
        force: bool,
    },
    /// Print the public key of --key.
    Show,
}

#[derive(Subcommand)]
enum AgentCmd {
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
        #[arg(long, default_value = "netns", value_parser = ["netns", "qemu"])]
        driver: String,
        /// Prefix of the netns VMs' namespace names (as the agent runs with).
        #[arg(long, default_value = "mvc-")]
        ns_prefix: String,
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
    },
}

/// Options of the qemu driver (`mvc agent run --driver qemu`).
#[derive(Args)]
struct QemuArgs {
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

#[derive(Args)]
struct AgentRun {
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
    #[arg(long, default_value = "netns", value_parser = ["netns", "qemu"])]
    driver: String,
    /// Prefix of the netns VMs' namespace names.
    #[arg(long, default_value = "mvc-", value_parser = validate::ns_prefix)]
    ns_prefix: String,
    #[command(flatten)]
    qemu: Box<QemuArgs>,
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
}

#[derive(Subcommand)]
enum SiteCmd {
    /// Register a site by its agent (pins the agent key; your key must be authorised).
    Add {
        /// Site name (letters, digits and '-', at most 24).
        #[arg(value_parser = validate::site_name)]
        name: String,
        /// Agent address ip:port.
        #[arg(long, value_parser = validate::agent_addr)]
        agent: String,
        /// Agent public key (hex), printed by `mvc agent init` at that site.
        #[arg(long, value_parser = validate::public_key)]
        agent_key: String,
    },
    /// Registered sites with their hosts and capacity.
    List,
    /// Forget a site (refused while a cluster uses it).
    Remove {
        /// Site name.
        #[arg(value_parser = validate::site_name)]
        name: String,
    },
}

#[derive(Subcommand)]
enum ClusterCmd {
    /// Allocate VMs at every site (all or nothing), MACs and addresses, and bring up
    /// the overlay (community, secret, supernode on the origin, one edge per VM host).
    Create {
        /// Cluster name (letters, digits and '-', at most 24).
        #[arg(value_parser = validate::cluster_name)]
        name: String,
        /// Sites, colon separated; the first is the origin (frontend VM, supernode).
        #[arg(long, value_parser = site_list_arg)]
        sites: String,
        /// Computes per site, colon separated (at least one compute in all).
        #[arg(long, value_parser = counts_arg)]
        computes: Counts,
        /// Memory per compute VM (MiB).
        #[arg(long, default_value_t = 512, value_parser = validate::memory_mb)]
        memory: u64,
        /// Memory of the frontend VM (MiB).
        #[arg(long, default_value_t = 1024, value_parser = validate::memory_mb)]
        frontend_memory: u64,
        /// Also start it (as `mvc cluster start`).
        #[arg(long)]
        start: bool,
        /// Seconds to wait for every compute's DHCP lease when starting.
        #[arg(long, default_value_t = 60, value_parser = validate::seconds)]
        lease_timeout: u64,
        /// The cluster's overlay network, e.g. 198.19.5.0/24 [default: the first /24
        /// of --overlay-pool no other cluster of this controller uses].
        #[arg(long)]
        overlay: Option<control::model::OverlayNet>,
        /// Where default overlay networks come from.
        #[arg(long, env = "MVC_OVERLAY_POOL", default_value = controller::DEFAULT_OVERLAY_POOL)]
        overlay_pool: control::model::OverlayNet,
    },
    /// Start the frontend VM, then all computes in parallel; wait for their leases.
    Start {
        /// Cluster name.
        #[arg(value_parser = validate::cluster_name)]
        name: String,
        /// Seconds to wait for every compute's DHCP lease.
        #[arg(long, default_value_t = 60, value_parser = validate::seconds)]
        lease_timeout: u64,
    },
    /// Stored state and what each site reports now.
    Status {
        /// Cluster name.
        #[arg(value_parser = validate::cluster_name)]
        name: String,
    },
    /// All clusters.
    List,
    /// Stop and release everything at every site and forget the cluster.
    Destroy {
        /// Cluster name.
        #[arg(value_parser = validate::cluster_name)]
        name: String,
        /// Forget it even if some site cannot be reached, and release a reservation of
        /// this name your key holds at any registered site even if this controller
        /// does not know the cluster.
        #[arg(long)]
        force: bool,
    },
    /// MPI hostfile of the cluster.
    Hostfile {
        /// Cluster name.
        #[arg(value_parser = validate::cluster_name)]
        name: String,
        /// Slots per node.
        #[arg(long, default_value_t = 1, value_parser = validate::slots)]
        slots: u32,
        /// Leave the frontend out.
        #[arg(long)]
        computes_only: bool,
        /// Also write an OpenMPI `plm_rsh_agent` launcher for netns VMs here.
        #[arg(long)]
        launcher: Option<PathBuf>,
    },
    /// Each node's site and the RTT between sites measured over the overlay.
    Topology {
        /// Cluster name.
        #[arg(value_parser = validate::cluster_name)]
        name: String,
        /// Print a Slurm topology.conf instead (with --json: `{"slurm_topology_conf": TEXT}`).
        #[arg(long)]
        slurm: bool,
    },
}

#[derive(Subcommand)]
enum VmCmd {
    /// Start one VM.
    Start {
        /// VM name.
        #[arg(value_parser = validate::vm_name)]
        name: String,
    },
    /// Stop one VM (its slot stays reserved).
    Stop {
        /// VM name.
        #[arg(value_parser = validate::vm_name)]
        name: String,
    },
    /// VMs of a cluster, or of all clusters.
    List {
        /// Only this cluster.
        #[arg(long, value_parser = validate::cluster_name)]
        cluster: Option<String>,
    },
    /// Move a running VM (qemu driver at both sites) to another site of its cluster
    /// while it runs: memory, disk (xnbd proxy) and network follow.
    Migrate {
        /// Cluster name.
        #[arg(value_parser = validate::cluster_name)]
        cluster: String,
        /// VM name.
        #[arg(value_parser = validate::vm_name)]
        vm: String,
        /// Destination site.
        #[arg(long, value_parser = validate::site_name)]
        to: String,
        /// Host at the destination (default: the cluster's host there).
        #[arg(long)]
        host: Option<String>,
        /// Longest pause of the VM at switchover, ms.
        #[arg(long, default_value_t = 300, value_parser = clap::value_parser!(u64).range(1..=60000))]
        downtime_ms: u64,
        /// Memory bandwidth in bytes/s (0: qemu's default, 128 MiB/s).
        #[arg(long, default_value_t = 0)]
        rate: u64,
        /// Give up (before switchover: undo) after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// Copy the disk before the memory (qemu's mirror, as libvirt's
        /// --copy-storage-all) instead of after it through the xnbd proxy.
        #[arg(long)]
        precopy_disk: bool,
        /// Cap on the disk copy after switchover, bytes/s (0: none).
        #[arg(long, default_value_t = 0)]
        disk_rate: u64,
    },
    /// Migrations run from this controller: phase, bytes moved, outcome.
    Migrations,
}

#[derive(Args)]
struct DemoArgs {
    /// Computes per site A:B:C.
    #[arg(long, default_value = "3:2:2", value_parser = demo_counts)]
    computes: Counts,
    /// Overlay implementation for the cluster: mvc, n2n (the paper's baseline), or auto
    /// (mvc when this binary has `mvc edge`).
    #[arg(long, default_value = "auto", value_parser = ["auto", "mvc", "n2n"])]
    overlay: String,
    /// Only remove what killed demo runs left behind (namespaces, processes, temp
    /// dirs), then exit; runs that are still alive are left alone.
    #[arg(long)]
    cleanup: bool,
}

/// Colon-separated counts (`--computes 3:2:2`).
#[derive(Clone, Debug)]
struct Counts(Vec<u32>);

fn counts_arg(s: &str) -> Result<Counts, validate::Invalid> {
    validate::counts(s).map(Counts)
}

fn demo_counts(s: &str) -> Result<Counts, validate::Invalid> {
    let c = validate::counts(s)?;
    if c.len() != 3 || c.iter().all(|&n| n == 0) {
        return Err(validate::Invalid(format!(
            "'{s}': want three counts A:B:C with at least one compute, e.g. 3:2:2"
        )));
    }
    Ok(Counts(c))
}

fn site_list_arg(s: &str) -> Result<String, validate::Invalid> {
    validate::site_list(s).map(|_| s.to_string())
}

fn host_list_arg(s: &str) -> Result<String, validate::Invalid> {
    validate::host_list(s).map(|_| s.to_string())
}

fn default_key_path() -> PathBuf {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"))
        .join(".config/mvc/user.key")
}

fn load_user_key(p: &Option<PathBuf>) -> Result<SigningKey> {
    let path = p.clone().unwrap_or_else(default_key_path);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading your key {} (make one with `mvc key gen`)",
            path.display()
        )
    })?;
    SigningKey::from_file_text(&text).with_context(|| format!("key {}", path.display()))
}

fn print<T: serde::Serialize>(json: bool, v: &T, human: impl FnOnce(&T) -> String) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
    } else {
        print!("{}", human(v));
    }
    Ok(())
}

fn open_store(db: &Path) -> Result<SqliteStore> {
    if let Some(d) = db.parent() {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    SqliteStore::open(db).with_context(|| format!("opening {}", db.display()))
}

/// Exit status of a command line or value the user has to change.
const EXIT_USAGE: u8 = 2;

/// One line: the error and its causes joined by ": " (a cause the message already
/// quotes is not repeated), line breaks inside them folded.
fn one_line(e: &anyhow::Error) -> String {
    let mut s = String::new();
    for c in e.chain() {
        let m = c.to_string();
        if s.contains(&m) {
            continue;
        }
        if !s.is_empty() {
            s += ": ";
        }
        s += &m;
    }
    let parts: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    parts.join(" | ")
}

/// A user error: a value refused by the checks, or a request the controller refuses
/// as such (exit status [`EXIT_USAGE`]).
fn is_usage(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.is::<validate::Invalid>()
            || matches!(
                c.downcast_ref::<controller::ControlError>(),
                Some(controller::ControlError::Usage(_))
            )
    })
}

/// Clap's own report of a bad command line, on one line (help and version print as usual).
fn command_line_error(e: clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return ExitCode::from(if e.use_stderr() { EXIT_USAGE } else { 0 });
    }
    let text = e.render().to_string();
    let mut parts = Vec::new();
    for l in text.lines().map(str::trim) {
        if l.starts_with("Usage:") || l.starts_with("For more information") {
            break;
        }
        if !l.is_empty() {
            parts.push(l);
        }
    }
    let line = parts.join(" ");
    let line = format!(
        "{} (see --help)",
        line.strip_prefix("error: ").unwrap_or(&line)
    );
    fail(&line, EXIT_USAGE)
}

/// Reports a failure: one line on stderr, and with `--json` also `{"error": LINE}` on
/// stdout.
fn fail(line: &str, code: u8) -> ExitCode {
    if wants_json() {
        println!("{}", serde_json::json!({ "error": line }));
    }
    eprintln!("error: {line}");
    ExitCode::from(code)
}

/// Whether the command line asks for JSON output (`--json` anywhere before `--`).
fn wants_json() -> bool {
    std::env::args()
        .skip(1)
        .take_while(|a| a != "--")
        .any(|a| a == "--json")
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => return command_line_error(e),
    };
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&one_line(&e), if is_usage(&e) { EXIT_USAGE } else { 1 }),
    }
}

fn run(cli: Cli) -> Result<()> {
    // The overlay commands set up their own logging (their config may choose the level).
    let cmd = match cli.cmd {
        Cmd::Edge(c) => return c.run().map_err(Into::into),
        Cmd::Supernode(c) => return c.run().map_err(Into::into),
        cmd => cmd,
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let (common, cmd) = match cmd {
        Cmd::Edge(_) | Cmd::Supernode(_) => unreachable!("handled above"),
        Cmd::Key { common, cmd } => return key_cmd(cmd, &common.key, common.json),
        Cmd::Agent { json, cmd } => return agent_cmd(cmd, json),
        Cmd::Demo(d) => {
            if d.cleanup {
                return control::demo::cleanup().map_err(Into::into);
            }
            return control::demo::run(&control::demo::DemoConfig {
                computes: d.computes.0,
                overlay: d.overlay,
                mvc: std::env::current_exe()?,
            })
            .map_err(Into::into);
        }
        Cmd::Site { common, cmd } => (common, Ctl::Site(cmd)),
        Cmd::Cluster { common, cmd } => (common, Ctl::Cluster(cmd)),
        Cmd::Vm { common, cmd } => (common, Ctl::Vm(cmd)),
    };
    let key = load_user_key(&common.key)?;
    let mut store = open_store(&common.db)?;
    let secrets_dir = common
        .db
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("secrets");
    // Each step once: `create --start` brings the overlay up in both of its halves.
    let said = Mutex::new(std::collections::HashSet::new());
    let progress = |m: &str| {
        if said
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(m.to_string())
        {
            eprintln!("mvc: {m}");
        }
    };
    let mut c = Controller {
        store: &mut store,
        key: &key,
        secrets_dir,
        progress: &progress,
    };
    controller_cmd(&mut c, cmd, common.json)
}

/// Where `vm migrate` records its progress: `migrations/` beside the database.
fn migrations_dir(c: &Controller) -> PathBuf {
    c.secrets_dir
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("migrations")
}

/// The commands that need the controller's store and key.
enum Ctl {
    Site(SiteCmd),
    Cluster(ClusterCmd),
    Vm(VmCmd),
}

fn key_cmd(k: KeyCmd, key: &Option<PathBuf>, json: bool) -> Result<()> {
    match k {
        KeyCmd::Gen { out, force } => {
            let path = out.or_else(|| key.clone()).unwrap_or_else(default_key_path);
            if path.exists() && !force {
                bail!("{} exists; pass --force to replace it", path.display());
            }
            let k = SigningKey::generate()?;
            agent::write_private(&path, &k.to_file_text())?;
            let v = serde_json::json!({"key_file": path, "public_key": k.public_hex()});
            print(json, &v, |_| format!("{}\n", k.public_hex()))
        }
        KeyCmd::Show => {
            let k = load_user_key(key)?;
            let v = serde_json::json!({"public_key": k.public_hex()});
            print(json, &v, |_| format!("{}\n", k.public_hex()))
        }
    }
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

fn agent_cmd(a: AgentCmd, json: bool) -> Result<()> {
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
        AgentCmd::QemuPrepare { cache } => {
            let b = guest::prepare(&cache, true)?;
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
                _ => Box::new(NetnsDriver::new(&ns_prefix, &state.join("run"))),
            };
            let cfg = AgentConfig::new(
                "gc",
                &state,
                Vec::new(),
                OverlayImpl::Mvc(std::env::current_exe()?),
            );
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
                    format!("--supernode-ports {:?}: want FIRST-LAST", r.supernode_ports)
                })?;
            let driver: Box<dyn VmDriver> = match r.driver.as_str() {
                "qemu" => {
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
                    Box::new(QemuDriver::new(cfg))
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
                        c.lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .expire(agent::unix_now());
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

fn controller_cmd(c: &mut Controller, cmd: Ctl, json: bool) -> Result<()> {
    match cmd {
        Ctl::Site(SiteCmd::Add {
            name,
            agent,
            agent_key,
        }) => {
            let v = c.site_add(&name, &agent, &agent_key)?;
            print(json, &v, |v| {
                format!(
                    "site {} added: agent {}, {} host(s), {} free VM slots\n",
                    v.site.name,
                    v.site.agent_addr,
                    v.hosts.len(),
                    v.hosts.iter().map(|h| h.free_vms).sum::<u32>()
                )
            })
        }
        Ctl::Site(SiteCmd::List) => {
            let v = c.site_list()?;
            print(json, &v, |v| {
                let mut s = format!(
                    "{:<12} {:<22} {:<8} {:>6} {:>10}\n",
                    "SITE", "AGENT", "HOSTS", "FREE", "FREE_MiB"
                );
                for x in v {
                    s += &format!(
                        "{:<12} {:<22} {:<8} {:>6} {:>10}\n",
                        x.site.name,
                        x.site.agent_addr,
                        x.hosts.len(),
                        x.hosts.iter().map(|h| h.free_vms).sum::<u32>(),
                        x.hosts.iter().map(|h| h.free_memory_mb).sum::<u64>()
                    );
                }
                s
            })
        }
        Ctl::Site(SiteCmd::Remove { name }) => {
            c.site_remove(&name)?;
            print(json, &serde_json::json!({"removed": name}), |_| {
                format!("site {name} removed\n")
            })
        }
        Ctl::Cluster(ClusterCmd::Create {
            name,
            sites,
            computes,
            memory,
            frontend_memory,
            start,
            lease_timeout,
            overlay,
            overlay_pool,
        }) => {
            let args = CreateArgs {
                name: name.clone(),
                sites: sites.split(':').map(str::to_string).collect(),
                computes: computes.0,
                memory_mb: memory,
                frontend_memory_mb: frontend_memory,
                overlay,
                pool: overlay_pool,
            };
            let mut cl = c.cluster_create(&args)?;
            if start {
                cl = c.cluster_start(&name, Duration::from_secs(lease_timeout))?;
            }
            print(json, &cl, cluster_table)
        }
        Ctl::Cluster(ClusterCmd::Start {
            name,
            lease_timeout,
        }) => {
            let cl = c.cluster_start(&name, Duration::from_secs(lease_timeout))?;
            print(json, &cl, cluster_table)
        }
        Ctl::Cluster(ClusterCmd::Status { name }) => {
            let st = c.cluster_status(&name)?;
            print(json, &st, |st| {
                let mut s = format!(
                    "cluster {} ({}), origin {}, community {}, supernode {}\n",
                    st.name, st.state, st.origin, st.overlay.community, st.overlay.supernode
                );
                for x in &st.sites {
                    s += &match (&x.error, x.overlay_up) {
                        (Some(e), _) => format!("  site {:<8} DOWN: {e}\n", x.site),
                        (None, up) => format!(
                            "  site {:<8} up, overlay {}\n",
                            x.site,
                            match up {
                                Some(true) => "running",
                                Some(false) => "stopped",
                                None => "not here",
                            }
                        ),
                    };
                    for p in &x.peers {
                        s += &format!(
                            "    peer {:<14} {:<8} rtt {}\n",
                            p.name,
                            p.path,
                            p.rtt_ms
                                .map(|r| format!("{r:.3} ms"))
                                .unwrap_or_else(|| "-".into())
                        );
                    }
                }
                s += &format!(
                    "{:<12} {:<9} {:<6} {:<18} {:<15} {:<9} {}\n",
                    "VM", "ROLE", "SITE", "MAC", "IP", "STATE", "LIVE"
                );
                for v in &st.vms {
                    s += &format!(
                        "{:<12} {:<9} {:<6} {:<18} {:<15} {:<9} {}\n",
                        v.vm.name,
                        v.vm.role.as_str(),
                        v.vm.site,
                        v.vm.mac.to_string(),
                        v.vm.ip.to_string(),
                        v.vm.state,
                        v.live
                    );
                }
                s
            })
        }
        Ctl::Cluster(ClusterCmd::List) => {
            let v = c.store.clusters()?;
            print(json, &v, |v| {
                let mut s = format!(
                    "{:<14} {:<9} {:<8} {:<5} {}\n",
                    "CLUSTER", "STATE", "ORIGIN", "VMS", "OVERLAY"
                );
                for x in v {
                    s += &format!(
                        "{:<14} {:<9} {:<8} {:<5} {}\n",
                        x.name,
                        x.state,
                        x.origin,
                        x.vms.len(),
                        x.overlay_net
                    );
                }
                s
            })
        }
        Ctl::Cluster(ClusterCmd::Destroy { name, force }) => {
            let r = c.cluster_destroy(&name, force)?;
            print(
                json,
                &serde_json::json!({"destroyed": name, "known": r.known,
                    "released_at": r.released_at, "unreachable_sites": r.unreachable}),
                |_| {
                    let mut s = if r.known {
                        format!("cluster {name} destroyed\n")
                    } else {
                        format!(
                            "cluster {name} was not in this controller's store; released its \
                             reservations at site(s) {}\n",
                            r.released_at.join(", ")
                        )
                    };
                    for e in &r.unreachable {
                        s += &format!("  warning: {e}\n");
                    }
                    s
                },
            )
        }
        Ctl::Cluster(ClusterCmd::Hostfile {
            name,
            slots,
            computes_only,
            launcher,
        }) => {
            let cl = c.store.cluster(&name)?;
            let hf = controller::hostfile(&cl, slots, computes_only);
            if let Some(p) = &launcher {
                let script = controller::netns_launcher(&cl, &c.vm_handles(&name)?)?;
                std::fs::write(p, script)?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755))?;
            }
            let v = serde_json::json!({"hostfile": hf, "launcher": launcher});
            print(json, &v, |_| hf.clone())
        }
        Ctl::Cluster(ClusterCmd::Topology { name, slurm }) => {
            let t = c.topology(&name)?;
            if slurm {
                let conf = controller::slurm_topology(&t);
                let v = serde_json::json!({ "slurm_topology_conf": conf });
                return print(json, &v, |_| conf.clone());
            }
            print(json, &t, |t| {
                let mut s = format!("{:<12} {:<8} {:<15} {}\n", "NODE", "SITE", "IP", "ROLE");
                for n in &t.nodes {
                    s += &format!(
                        "{:<12} {:<8} {:<15} {}\n",
                        n.name,
                        n.site,
                        n.ip,
                        n.role.as_str()
                    );
                }
                s += "RTT between sites (VM to VM over the overlay):\n";
                for r in &t.rtt_ms {
                    s += &match r.ms {
                        Some(ms) => format!("  {} -> {}: {ms:.3} ms\n", r.from, r.to),
                        None => format!("  {} -> {}: unreachable\n", r.from, r.to),
                    };
                }
                s
            })
        }
        Ctl::Vm(VmCmd::Start { name }) => {
            let v = c.vm_start(&name)?;
            print(json, &v, |v| format!("{} {}\n", v.name, v.state))
        }
        Ctl::Vm(VmCmd::Stop { name }) => {
            let v = c.vm_stop(&name)?;
            print(json, &v, |v| format!("{} {}\n", v.name, v.state))
        }
        Ctl::Vm(VmCmd::Migrate {
            cluster,
            vm,
            to,
            host,
            downtime_ms,
            rate,
            timeout,
            precopy_disk,
            disk_rate,
        }) => {
            let dir = migrations_dir(c);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let v = c.vm_migrate(&control::migrate::MigrateArgs {
                record: Some(dir.join(format!("migrate-{vm}.json"))),
                cluster,
                vm,
                to,
                host,
                downtime_ms,
                rate,
                timeout: std::time::Duration::from_secs(timeout),
                precopy_disk,
                disk_rate,
            })?;
            print(json, &v, |v| {
                format!(
                    "{} {} -> {} {} in {:.1} s (memory {} MiB, disk {} MiB, downtime {} ms)\n",
                    v.vm,
                    v.from,
                    v.to,
                    v.phase,
                    v.elapsed_secs,
                    v.ram_bytes >> 20,
                    v.disk_bytes >> 20,
                    v.downtime_ms.unwrap_or(0)
                )
            })
        }
        Ctl::Vm(VmCmd::Migrations) => {
            let v = control::migrate::recorded(&migrations_dir(c));
            print(json, &v, |v| {
                let mut s = format!(
                    "{:<12} {:<12} {:<5} {:<5} {:<10} {:>15} {:>15} {:>8} {:>6}\n",
                    "CLUSTER", "VM", "FROM", "TO", "PHASE", "MEMORY MiB", "DISK MiB", "SECS", "ETA"
                );
                for m in v {
                    s += &format!(
                        "{:<12} {:<12} {:<5} {:<5} {:<10} {:>7}/{:<7} {:>7}/{:<7} {:>8.1} {:>6}{}\n",
                        m.cluster,
                        m.vm,
                        m.from,
                        m.to,
                        m.phase,
                        m.ram_bytes >> 20,
                        m.ram_total >> 20,
                        m.disk_bytes >> 20,
                        m.disk_total >> 20,
                        m.elapsed_secs,
                        m.eta_secs
                            .map(|e| format!("{e:.0}s"))
                            .unwrap_or_else(|| "-".into()),
                        m.error
                            .as_deref()
                            .map(|e| format!("  {e}"))
                            .unwrap_or_default()
                    );
                }
                s
            })
        }
        Ctl::Vm(VmCmd::List { cluster }) => {
            let v = c.vm_list(cluster.as_deref())?;
            print(json, &v, |v| {
                let mut s = format!(
                    "{:<12} {:<12} {:<9} {:<6} {:<10} {:<18} {:<15} {}\n",
                    "CLUSTER", "VM", "ROLE", "SITE", "HOST", "MAC", "IP", "STATE"
                );
                for (c, x) in v {
                    s += &format!(
                        "{:<12} {:<12} {:<9} {:<6} {:<10} {:<18} {:<15} {}\n",
                        c,
                        x.name,
                        x.role.as_str(),
                        x.site,
                        x.host,
                        x.mac.to_string(),
                        x.ip.to_string(),
                        x.state
                    );
                }
                s
            })
        }
    }
}

fn cluster_table(cl: &control::model::Cluster) -> String {
    let mut s = format!(
        "cluster {} ({}), origin {}, overlay {}, community {}, supernode {}\n",
        cl.name, cl.state, cl.origin, cl.overlay_net, cl.overlay.community, cl.overlay.supernode
    );
    s += &format!(
        "{:<12} {:<9} {:<6} {:<10} {:<18} {:<15} {}\n",
        "VM", "ROLE", "SITE", "HOST", "MAC", "IP", "STATE"
    );
    for v in &cl.vms {
        s += &format!(
            "{:<12} {:<9} {:<6} {:<10} {:<18} {:<15} {}\n",
            v.name,
            v.role.as_str(),
            v.site,
            v.host,
            v.mac.to_string(),
            v.ip.to_string(),
            v.state
        );
    }
    s
}
