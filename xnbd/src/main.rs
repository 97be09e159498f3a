//! `xnbd`: serve images over NBD, relocate them with the proxy, control the proxy.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use xnbd::backend::Backend;
use xnbd::budget::MemoryLimits;
use xnbd::client::{load_client_tls, Addr};
use xnbd::ctl;
use xnbd::listen::Limits;
use xnbd::proxy::{Proxy, ProxyConfig, ProxyError};
use xnbd::server::{self, Export, Listen, Server, Tls};
use xnbd::storage::Storage;

#[derive(Parser)]
#[command(name = "xnbd", version, about = "NBD server and live-migration proxy")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Export files or block devices (target mode).
    Serve(ServeArgs),
    /// Serve an image whose data is still at a source NBD server, relocating it.
    Proxy(Box<ProxyArgs>),
    /// Control a running proxy.
    Ctl(CtlArgs),
    /// Writes man pages made from these definitions into DIR (for packaging).
    #[command(hide = true)]
    GenMan {
        /// Directory for `xnbd.1`, `xnbd-serve.1`, ...
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// `xnbd gen-man --out DIR`.
fn gen_man(out: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("create {}", out.display()))?;
    let mut cmd = <Cli as clap::CommandFactory>::command();
    cmd.build();
    write_man(&cmd, "xnbd", out)
}

/// One man page per command and subcommand (`xnbd.1`, `xnbd-serve.1`, `xnbd-ctl-status.1`),
/// hidden ones left out.
fn write_man(cmd: &clap::Command, name: &str, dir: &std::path::Path) -> Result<()> {
    if cmd.is_hide_set() {
        return Ok(());
    }
    let mut text = Vec::new();
    clap_mangen::Man::new(cmd.clone().display_name(name.to_string())).render(&mut text)?;
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, text).with_context(|| format!("write {}", path.display()))?;
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        write_man(sub, &format!("{name}-{}", sub.get_name()), dir)?;
    }
    Ok(())
}

#[derive(Args)]
struct ListenArgs {
    /// TCP address to listen on (repeatable). Default 0.0.0.0:10809 when no --unix is given.
    #[arg(long)]
    listen: Vec<String>,
    /// Unix socket to listen on (repeatable).
    #[arg(long)]
    unix: Vec<PathBuf>,
    /// Server certificate (PEM) for STARTTLS.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// Server private key (PEM).
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Allow clients that do not upgrade to TLS (default: TLS required when configured).
    #[arg(long)]
    tls_optional: bool,
    /// Advertised minimum block size; misaligned requests then get EINVAL.
    #[arg(long, default_value_t = 1)]
    min_block: u32,
    /// Client connections open at once (TCP and Unix together); more are closed at accept.
    #[arg(long, default_value_t = 1000)]
    max_connections: usize,
    /// Seconds a client has to finish the NBD handshake (TLS included) before it is closed.
    /// Established connections may stay idle as long as they like.
    #[arg(long, default_value_t = 30.0)]
    handshake_timeout: f64,
    /// Bytes of request payloads and replies held at once for all clients (K/M/G suffixes);
    /// requests wait when it is used up.
    #[arg(long, default_value = "512M", value_parser = parse_size)]
    memory_budget: u64,
    /// Bytes of the budget one connection may hold (a client that does not read its
    /// replies holds no more).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    conn_memory: u64,
    /// Seconds a client's replies may go unread while other clients wait for the memory
    /// budget before that client is disconnected.
    #[arg(long, default_value_t = 60.0)]
    stall_timeout: f64,
}

#[derive(Args)]
struct ServeArgs {
    /// Export as [NAME=]PATH[:ro] (repeatable). The first export also answers the empty name.
    #[arg(long, required = true)]
    export: Vec<String>,
    /// Make every export read-only.
    #[arg(long)]
    read_only: bool,
    /// Control socket (`xnbd ctl status` shows the server's counters).
    #[arg(long)]
    ctl: Option<PathBuf>,
    /// Read every write payload into memory before writing it (by default the payloads of
    /// large writes on plain connections go from the socket into the file with splice).
    #[arg(long)]
    no_splice: bool,
    #[command(flatten)]
    listen: ListenArgs,
}

#[derive(Args)]
struct ProxyArgs {
    /// Source server: HOST:PORT or unix:PATH.
    #[arg(long)]
    source: Addr,
    /// Export name at the source.
    #[arg(long, default_value = "")]
    source_export: String,
    /// CA certificate (PEM): use STARTTLS towards the source and verify it with this CA.
    #[arg(long)]
    source_tls_ca: Option<PathBuf>,
    /// Name expected in the source's certificate (default: the source host).
    #[arg(long)]
    source_tls_name: Option<String>,
    /// Local image (created sparse if missing).
    #[arg(long)]
    cache: PathBuf,
    /// Bitmap file (default: CACHE.bitmap).
    #[arg(long)]
    bitmap: Option<PathBuf>,
    /// Block size of the bitmap and of fetches (power of two, >= 512).
    #[arg(long, default_value = "64K", value_parser = parse_size)]
    block_size: u64,
    /// Link budget, bytes/s with optional K/M/G suffix (0: unlimited): on-demand fetches
    /// count against it, the background copy gets the rest.
    #[arg(long, default_value = "0", value_parser = parse_size)]
    rate: u64,
    /// Do not copy in the background until `xnbd ctl cache-all`.
    #[arg(long)]
    no_background: bool,
    /// Bytes per background request.
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    background_chunk: u64,
    /// Background requests in flight at once (fills long links).
    #[arg(long, default_value_t = 4)]
    background_depth: usize,
    /// Seconds a client request touching missing blocks waits for an absent source before
    /// failing with EIO, counted from when the source went missing; also how long a busy
    /// source connection may go without a reply byte before it counts as gone.
    #[arg(long, default_value_t = 30.0)]
    source_timeout: f64,
    /// Bytes fetched ahead of sequential readers at first (0: off).
    #[arg(long, default_value = "1M", value_parser = parse_size)]
    readahead: u64,
    /// Largest readahead: the window doubles with each sequential read up to this (at or
    /// below --readahead: a fixed window).
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    readahead_max: u64,
    /// Keep the background copy at its full depth while clients wait for on-demand
    /// fetches (by default it drops to one request in flight meanwhile).
    #[arg(long)]
    no_background_yield: bool,
    /// Send each on-demand fetch whole to one source connection (by default it is split
    /// over the live connections and its pieces fetched at once).
    #[arg(long)]
    no_demand_split: bool,
    /// Connections to the source (1-16), each request on the least busy one: over a long
    /// link one TCP stream carries one window per round trip, several carry several.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=16))]
    source_connections: u16,
    /// Export name offered to clients.
    #[arg(long, default_value = "")]
    name: String,
    /// Control socket.
    #[arg(long)]
    ctl: Option<PathBuf>,
    #[command(flatten)]
    listen: ListenArgs,
}

#[derive(Args)]
struct CtlArgs {
    /// Control socket of the proxy.
    #[arg(long)]
    socket: PathBuf,
    /// Print JSON (for scripts).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: CtlCmd,
}

#[derive(Subcommand)]
enum CtlCmd {
    /// Cached/total blocks, rate, ETA, source health, server counters (as `mvc edge status`;
    /// `query` is the older name).
    #[command(visible_alias = "query")]
    Status,
    /// Copy every missing block now and wait for it (progress bar unless --json).
    CacheAll {
        /// Return at once instead of waiting.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this many seconds.
        #[arg(long)]
        timeout: Option<f64>,
    },
    /// Drop the source and serve only local data (refused while blocks are missing).
    Switch {
        /// Switch even with blocks missing (they then read as the local file holds them).
        #[arg(long)]
        force: bool,
    },
    /// Reconnect to the source, optionally at another address.
    Reconnect {
        /// New source address.
        #[arg(long)]
        source: Option<String>,
    },
    /// Set the background copy rate (bytes/s, K/M/G suffixes, 0: unlimited).
    SetRate {
        /// Rate.
        #[arg(value_parser = parse_size)]
        rate: u64,
    },
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mul) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .map_err(|e| format!("{s}: {e}"))?
        .checked_mul(mul)
        .ok_or_else(|| format!("{s}: too large"))
}

fn parse_export(spec: &str, all_ro: bool) -> Result<Export> {
    let (name, rest) = match spec.split_once('=') {
        Some((n, r)) => (n.to_owned(), r),
        None => (String::new(), spec),
    };
    let (path, ro) = match rest.strip_suffix(":ro") {
        Some(p) => (p, true),
        None => (rest, false),
    };
    let read_only = ro || all_ro;
    let storage =
        Storage::open(path.as_ref(), read_only).with_context(|| format!("opening {path}"))?;
    let name = if name.is_empty() && !spec.contains('=') {
        std::path::Path::new(path)
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    } else {
        name
    };
    Ok(Export {
        name,
        description: path.to_owned(),
        backend: Backend::File(Arc::new(storage)),
        read_only,
    })
}

fn listeners(a: &ListenArgs) -> Vec<Listen> {
    let mut v: Vec<Listen> = a.listen.iter().cloned().map(Listen::Tcp).collect();
    v.extend(a.unix.iter().cloned().map(Listen::Unix));
    if v.is_empty() {
        v.push(Listen::Tcp("0.0.0.0:10809".into()));
    }
    v
}

fn secs(what: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).map_err(|e| anyhow::anyhow!("--{what} {s}: {e}"))
}

/// The NBD server for `exports` with the listener and memory bounds of `a`.
fn server(exports: Vec<Arc<Export>>, a: &ListenArgs) -> Result<Server> {
    if a.max_connections == 0 {
        bail!("--max-connections must be at least 1");
    }
    if a.memory_budget < 1 << 20 || a.conn_memory < 1 << 20 {
        bail!("--memory-budget and --conn-memory must be at least 1M");
    }
    Ok(Server::new(
        exports,
        tls(a)?,
        a.min_block,
        Limits {
            max_connections: a.max_connections,
            handshake_timeout: secs("handshake-timeout", a.handshake_timeout)?,
        },
        MemoryLimits {
            total: a.memory_budget,
            per_connection: a.conn_memory.min(a.memory_budget),
            stall_timeout: secs("stall-timeout", a.stall_timeout)?,
        },
    ))
}

/// Serve the control socket at `path` on its own task.
fn control(path: &std::path::Path, target: ctl::Controlled) -> Result<tokio::task::JoinHandle<()>> {
    let l = ctl::bind(path).with_context(|| format!("control socket {}", path.display()))?;
    Ok(tokio::spawn(ctl::serve(l, target)))
}

fn tls(a: &ListenArgs) -> Result<Option<Tls>> {
    match (&a.tls_cert, &a.tls_key) {
        (Some(c), Some(k)) => Ok(Some(Tls {
            acceptor: server::load_tls(c, k)?,
            required: !a.tls_optional,
        })),
        _ => Ok(None),
    }
}

async fn wait_for_signal() -> Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutting down");
    Ok(())
}

async fn serve(a: ServeArgs) -> Result<()> {
    let exports = a
        .export
        .iter()
        .map(|e| parse_export(e, a.read_only).map(Arc::new))
        .collect::<Result<Vec<_>>>()?;
    let mut srv = server(exports, &a.listen)?;
    srv.splice_writes = !a.no_splice;
    let srv = Arc::new(srv);
    let mut tasks = server::start(srv.clone(), &listeners(&a.listen)).await?;
    if let Some(c) = &a.ctl {
        tasks.push(control(c, ctl::Controlled::new(None, srv))?);
    }
    wait_for_signal().await?;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

async fn proxy(a: ProxyArgs) -> Result<()> {
    let block_size = u32::try_from(a.block_size).context("block size too large")?;
    let source_tls = match &a.source_tls_ca {
        Some(ca) => {
            let name = match (&a.source_tls_name, &a.source) {
                (Some(n), _) => n.clone(),
                (None, Addr::Tcp(hp)) => hp
                    .rsplit_once(':')
                    .map(|x| x.0)
                    .unwrap_or(hp)
                    .trim_matches(['[', ']'])
                    .to_owned(),
                (None, Addr::Unix(_)) => "localhost".to_owned(),
            };
            Some(load_client_tls(ca, name)?)
        }
        None => None,
    };
    let bitmap = a.bitmap.clone().unwrap_or_else(|| {
        let mut p = a.cache.clone().into_os_string();
        p.push(".bitmap");
        p.into()
    });
    let p = Proxy::start(ProxyConfig {
        source: a.source.clone(),
        export_name: a.source_export.clone(),
        tls: source_tls,
        cache: a.cache.clone(),
        bitmap,
        block_size,
        rate: a.rate,
        background: !a.no_background,
        background_chunk: a.background_chunk,
        background_depth: a.background_depth,
        source_timeout: Duration::from_secs_f64(a.source_timeout.max(0.0)),
        readahead: a.readahead,
        readahead_max: a.readahead_max,
        background_yield: !a.no_background_yield,
        demand_split: !a.no_demand_split,
        source_connections: usize::from(a.source_connections),
    })
    .await;
    let p = match p {
        Err(ProxyError::Locked(e)) => {
            // One line and a status of its own, for scripts that start proxies.
            eprintln!("xnbd proxy: {e}");
            std::process::exit(EXIT_LOCKED);
        }
        r => r?,
    };
    let srv = Arc::new(server(
        vec![Arc::new(Export {
            name: a.name.clone(),
            description: format!("relocating from {}", a.source),
            backend: Backend::Proxy(p.clone()),
            read_only: false,
        })],
        &a.listen,
    )?);
    let mut tasks = server::start(srv.clone(), &listeners(&a.listen)).await?;
    if let Some(c) = &a.ctl {
        tasks.push(control(c, ctl::Controlled::new(Some(p.clone()), srv))?);
    }
    wait_for_signal().await?;
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// The log filter: `RUST_LOG`, as for `mvc`; the older `XNBD_LOG` when `RUST_LOG` is not
/// set; else `info`.
fn log_filter() -> tracing_subscriber::EnvFilter {
    ["RUST_LOG", "XNBD_LOG"]
        .into_iter()
        .find_map(|v| tracing_subscriber::EnvFilter::try_from_env(v).ok())
        .unwrap_or_else(|| tracing_subscriber::EnvFilter::new("info"))
}

/// Exit status when the cache or bitmap is in use by another process (`EX_TEMPFAIL`).
const EXIT_LOCKED: i32 = 75;

fn print_status(json: bool, r: &ctl::Reply) -> Result<()> {
    let st = r.status.clone().unwrap_or_default();
    if json {
        println!("{}", serde_json::to_string(&st)?);
        return Ok(());
    }
    let g = |k: &str| st.get(k).cloned().unwrap_or_default();
    if g("mode").as_str() == Some("serve") {
        print_server(&st);
        return Ok(());
    }
    let cached = g("cached_blocks").as_u64().unwrap_or(0);
    let total = g("total_blocks").as_u64().unwrap_or(0);
    let pct = if total > 0 {
        100.0 * cached as f64 / total as f64
    } else {
        100.0
    };
    println!("mode:      {}", g("mode").as_str().unwrap_or("?"));
    println!(
        "source:    {} ({}, {}/{} connections up)",
        g("source").as_str().unwrap_or("?"),
        if g("source_connected").as_bool().unwrap_or(false) {
            "connected"
        } else {
            "not connected"
        },
        g("source_connections_up").as_u64().unwrap_or(0),
        g("source_connections").as_u64().unwrap_or(0),
    );
    println!("{}", health_line(&st));
    if let Some(e) = g("source_last_error").as_str() {
        println!("last err:  {e}");
    }
    println!(
        "blocks:    {cached}/{total} local ({pct:.1}%), block size {}",
        g("block_size")
    );
    println!(
        "fetched:   {} blocks, {} bytes ({} on demand, {} background)",
        g("fetched_blocks"),
        g("fetched_bytes"),
        g("demand_blocks"),
        g("background_blocks")
    );
    println!(
        "bytes in:  {} on demand, {} background (from the source)",
        g("demand_bytes"),
        g("background_bytes")
    );
    println!(
        "clients:   {} bytes read, {} bytes written (client link)",
        g("client_read_bytes"),
        g("client_write_bytes")
    );
    println!(
        "rate:      {:.0} B/s (limit {})",
        g("rate_bytes_per_sec").as_f64().unwrap_or(0.0),
        g("rate_limit")
    );
    match g("eta_secs").as_f64() {
        Some(e) => println!("eta:       {e:.1} s"),
        None => println!("eta:       unknown"),
    }
    print_server(&st);
    Ok(())
}

/// The `health:` line of `ctl status`.
fn health_line(st: &serde_json::Value) -> String {
    if !st["source_failing"].as_bool().unwrap_or(false) {
        return "health:    ok".into();
    }
    let since = st["source_failing_since"]
        .as_u64()
        .map(utc)
        .unwrap_or_else(|| "?".into());
    format!(
        "health:    FAILING since {since} ({:.1} s, {} errors in a row, retry every {} ms)",
        st["source_failing_secs"].as_f64().unwrap_or(0.0),
        st["source_errors_in_row"],
        st["source_backoff_ms"]
    )
}

/// The NBD server's lines of `ctl status`.
fn print_server(st: &serde_json::Value) {
    let s = &st["server"];
    let l = &s["listeners"];
    let n = |v: &serde_json::Value| v.as_u64().unwrap_or(0);
    println!(
        "server:    {} connections open, {} accepted, {} requests ({} failed)",
        n(&l["open"]),
        n(&l["accepted"]),
        n(&s["requests"]),
        n(&s["request_errors"])
    );
    println!(
        "refused:   {} over the limit, {} handshake timeouts, {} accept errors, {} protocol drops",
        n(&l["refused"]),
        n(&l["handshake_timeouts"]),
        n(&l["accept_errors"]),
        n(&s["protocol_drops"])
    );
    println!(
        "writes:    {} spliced from the socket, {} connections copying (splice refused)",
        n(&s["spliced_writes"]),
        n(&s["splice_fallbacks"])
    );
    println!(
        "memory:    {} of {} bytes held, {} budget waits, {} stalled clients dropped",
        n(&s["memory_used"]),
        n(&s["memory_budget"]),
        n(&s["budget_waits"]),
        n(&s["stalled_drops"])
    );
}

/// `YYYY-MM-DD HH:MM:SS UTC` for a Unix time.
fn utc(secs: u64) -> String {
    const FORMAT: &[time::format_description::BorrowedFormatItem<'_>] =
        time::macros::format_description!("[year]-[month]-[day] [hour]:[minute]:[second] UTC");
    i64::try_from(secs)
        .ok()
        .and_then(|s| time::OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(FORMAT).ok())
        .unwrap_or_else(|| format!("{secs} s after 1970"))
}

async fn ctl_main(a: CtlArgs) -> Result<()> {
    use ctl::Request as R;
    let sock = &a.socket;
    match a.cmd {
        CtlCmd::Status => print_status(a.json, &ctl::call(sock, &R::Query).await?),
        CtlCmd::Switch { force } => {
            let r = ctl::call(sock, &R::Switch { force }).await?;
            print_status(a.json, &r)
        }
        CtlCmd::Reconnect { source } => {
            let r = ctl::call(sock, &R::Reconnect { source }).await?;
            print_status(a.json, &r)
        }
        CtlCmd::SetRate { rate } => {
            let r = ctl::call(sock, &R::SetRate { rate }).await?;
            print_status(a.json, &r)
        }
        CtlCmd::CacheAll { no_wait, timeout } => {
            let r = ctl::call(sock, &R::CacheAll).await?;
            if no_wait {
                return print_status(a.json, &r);
            }
            let deadline = timeout.map(|t| std::time::Instant::now() + Duration::from_secs_f64(t));
            let total = r
                .status
                .as_ref()
                .and_then(|s| s.get("total_blocks"))
                .and_then(|v| v.as_u64())
                .unwrap_or(0);
            let bar = if a.json {
                indicatif::ProgressBar::hidden()
            } else {
                let b = indicatif::ProgressBar::new(total);
                b.set_style(indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} blocks {percent}% {msg}",
                )?);
                b
            };
            loop {
                let r = ctl::call(sock, &R::Query).await?;
                let st = r.status.clone().unwrap_or_default();
                let cached = st
                    .get("cached_blocks")
                    .and_then(|v| v.as_u64())
                    .unwrap_or(0);
                bar.set_position(cached);
                if let Some(rate) = st.get("rate_bytes_per_sec").and_then(|v| v.as_f64()) {
                    bar.set_message(format!("{:.1} MiB/s", rate / (1u64 << 20) as f64));
                }
                if cached >= total {
                    bar.finish();
                    return print_status(a.json, &r);
                }
                if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                    bar.abandon();
                    print_status(a.json, &r)?;
                    bail!("timed out with {cached}/{total} blocks local");
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Prints a failure as one line (`error: ...` with its causes joined by ": "), never
/// with a backtrace, whatever RUST_BACKTRACE says, and exits with status 1.
fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            let s = format!("{e:#}");
            let parts: Vec<&str> = s.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
            eprintln!("error: {}", parts.join(" | "));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Runtime threads: at least [`MIN_WORKERS`], more on larger machines (one per CPU).
/// Connections' readers serve cached reads and writes inline and sleep in the kernel while
/// the socket drains; on a machine shared with other work the scheduler shares the CPUs
/// out per thread, and with one thread per CPU a connection whose thread was preempted
/// holds up the others queued on it (nbdcopy over 4 connections on 2 busy cores: median
/// 1289 MiB/s with 8 threads, 817 with 2, nbdkit 1198).
fn worker_threads() -> usize {
    std::thread::available_parallelism()
        .map(usize::from)
        .unwrap_or(1)
        .max(MIN_WORKERS)
}

/// Fewest runtime threads (see [`worker_threads`]).
const MIN_WORKERS: usize = 8;

fn run() -> Result<()> {
    let cli = Cli::parse();
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(log_filter())
        .init();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if std::env::var_os("TOKIO_WORKER_THREADS").is_none() {
        rt.worker_threads(worker_threads());
    }
    let rt = rt.enable_all().build()?;
    rt.block_on(async move {
        match cli.cmd {
            Cmd::Serve(a) => serve(a).await,
            Cmd::Proxy(a) => proxy(*a).await,
            Cmd::Ctl(a) => ctl_main(a).await,
            Cmd::GenMan { out } => gen_man(&out),
        }
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn utc_dates() {
        assert_eq!(super::utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(super::utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(super::utc(1_796_591_043), "2026-12-06 21:04:03 UTC");
    }

    #[test]
    fn health_line_says_since_when_and_how_often() {
        let st = serde_json::json!({
            "source_failing": true,
            "source_failing_since": 1_796_591_043u64,
            "source_failing_secs": 12.34,
            "source_errors_in_row": 9,
            "source_backoff_ms": 2560,
        });
        assert_eq!(
            super::health_line(&st),
            "health:    FAILING since 2026-12-06 21:04:03 UTC (12.3 s, 9 errors in a row, \
             retry every 2560 ms)"
        );
        let st = serde_json::json!({ "source_failing": false });
        assert_eq!(super::health_line(&st), "health:    ok");
    }
}
