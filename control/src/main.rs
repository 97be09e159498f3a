//! `mvc`: the one operator binary of a site frontend.
//!
//! Overlay: `mvc edge`, `mvc supernode` (implemented in `dataplane::cli`).
//! Controller: `mvc key`, `mvc site`, `mvc cluster`, `mvc vm`; per-site appliance:
//! `mvc agent`; host checks: `mvc doctor`; the whole thing on one machine: `mvc demo`.
mod commands;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use commands::agent::AgentCmd;
use commands::cluster::ClusterCmd;
use commands::key::KeyCmd;
use commands::site::SiteCmd;
use commands::vm::VmCmd;
use control::auth::SigningKey;
use control::controller::{self, Controller};
use control::store::SqliteStore;
use control::validate;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Mutex;

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
    /// Checks this host (TUN, io_uring, XDP, bridge, packet filter, a supernode's
    /// reachability and the underlay MTU towards it, the agents' clocks) and says what
    /// to fix.
    Doctor(commands::doctor::DoctorArgs),
    /// Writes shell completions and man pages (for packaging).
    #[command(hide = true)]
    GenDocs(commands::gendocs::GenDocsArgs),
    /// On this machine: three sites (two behind NAT) in network namespaces, a cluster
    /// across them made with one command, an OpenMPI job on it, then teardown.
    Demo(DemoArgs),
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
    use std::io::Write;
    // Written as it is made, in large writes: a listing of 100,000 VMs is tens of MB.
    let mut out = std::io::BufWriter::with_capacity(1 << 16, std::io::stdout().lock());
    if json {
        serde_json::to_writer_pretty(&mut out, v)?;
        writeln!(out)?;
    } else {
        out.write_all(human(v).as_bytes())?;
    }
    out.flush()?;
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
        Cmd::Key { common, cmd } => return commands::key::run(cmd, &common.key, common.json),
        Cmd::Agent { json, cmd } => return commands::agent::run(cmd, json),
        Cmd::Doctor(a) => return commands::doctor::run(a),
        Cmd::GenDocs(a) => {
            return commands::gendocs::run(a, <Cli as clap::CommandFactory>::command())
        }
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
    match cmd {
        Ctl::Site(cmd) => commands::site::run(&mut c, cmd, common.json),
        Ctl::Cluster(cmd) => commands::cluster::run(&mut c, cmd, common.json),
        Ctl::Vm(cmd) => commands::vm::run(&mut c, cmd, common.json),
    }
}

/// The commands that need the controller's store and key.
enum Ctl {
    Site(SiteCmd),
    Cluster(ClusterCmd),
    Vm(VmCmd),
}
