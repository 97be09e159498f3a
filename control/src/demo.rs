//! `mvc demo`: three sites in network namespaces on one machine (A public, B and C
//! each behind its own NAT), an `mvc agent` on every site frontend, the controller run
//! on site A's frontend ([`lab::sites`]); one command builds a cluster across the
//! sites, an MPI job runs over it, and everything is torn down.
//!
//! Every run keeps a run file in [`run_dir`] (its PID, namespace prefix, temp dir and
//! the PIDs of its agents, see [`lab::runs`]): when a run is killed with SIGKILL, the
//! next run, or `mvc demo --cleanup`, removes its namespaces, processes and temp dir.
//! SIGINT and SIGTERM tear the run down at once, temp dir included.
//!
//! The lab itself is re-exported here for the controller's integration tests.
use lab::runs;
pub use lab::sites::{AgentProc, Result, SiteLab, SitesError as DemoError, AGENT_PORT};
use lab::{Lab, Topology};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;
/// The overlay to use for `auto`: this project's `mvc edge` when the binary has it,
/// otherwise Debian's n2n 1.3 (said loudly).
pub fn pick_overlay(mvc: &Path, wanted: &str) -> String {
    if wanted != "auto" {
        return wanted.into();
    }
    // Agents take their overlay binary from MVC_OVERLAY_BIN when it is set.
    let bin = std::env::var_os("MVC_OVERLAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| mvc.into());
    let ok = Command::new(&bin)
        .args(["edge", "--help"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        "mvc".into()
    } else {
        eprintln!(
            "NOTE: this mvc binary has no `mvc edge`; the cluster overlay runs on n2n 1.3 instead"
        );
        "n2n".into()
    }
}

/// Where demo runs keep their run files: `MVC_DEMO_RUN_DIR`, else `/run/mvc-demo` (on
/// tmpfs, emptied at boot like the namespaces it describes).
pub fn run_dir() -> PathBuf {
    std::env::var_os("MVC_DEMO_RUN_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/mvc-demo"))
}

fn need_root() -> Result<()> {
    if lab::is_root() {
        Ok(())
    } else {
        Err(DemoError::Failed(
            "mvc demo needs root (network namespaces)".into(),
        ))
    }
}

/// Removes what killed demo runs left behind and says what it removed; runs still alive
/// are left alone. For `mvc demo --cleanup` (`explicit`) a run file it could not act on
/// is an error; before a demo run, a warning.
fn clean_dead(explicit: bool) -> Result<()> {
    let dir = run_dir();
    let (done, errors) = runs::clean_dead_runs(&dir);
    for c in &done {
        eprintln!(
            "removed what the killed demo run {} (pid {}) left: {} process(es), {} namespace(s), {}",
            c.prefix,
            c.pid,
            c.processes,
            c.namespaces,
            if c.dir_removed {
                "its temp dir"
            } else {
                "no temp dir"
            }
        );
    }
    if done.is_empty() && explicit {
        eprintln!("no killed demo run to clean up in {}", dir.display());
    }
    if errors.is_empty() {
        Ok(())
    } else if explicit {
        Err(DemoError::Failed(errors.join("; ")))
    } else {
        for e in &errors {
            eprintln!("warning: {e}");
        }
        Ok(())
    }
}

/// `mvc demo --cleanup`.
pub fn cleanup() -> Result<()> {
    need_root()?;
    clean_dead(true)
}

/// What `mvc demo` runs.
pub struct DemoConfig {
    /// Computes at A, B, C.
    pub computes: Vec<u32>,
    /// Overlay implementation (`mvc` or `n2n`).
    pub overlay: String,
    /// The `mvc` binary.
    pub mvc: PathBuf,
}

/// A small MPI program: every rank reports its node; an allreduce sums the ranks.
pub const MPI_PROGRAM: &str = r#"from mpi4py import MPI
import socket
c = MPI.COMM_WORLD
total = c.allreduce(c.Get_rank(), op=MPI.SUM)
names = c.gather(socket.gethostname(), root=0)
if c.Get_rank() == 0:
    n = c.Get_size()
    print("mpi: %d ranks on %s" % (n, ",".join(names)))
    print("mpi: allreduce(sum of ranks) = %d (expected %d)" % (total, n * (n - 1) // 2))
"#;

/// The demo: sites, one-command cluster, OpenMPI job, teardown.
pub fn run(cfg: &DemoConfig) -> Result<()> {
    let r = run_demo(cfg);
    if r.is_err() {
        // After SIGINT/SIGTERM a failure is the teardown's doing: let it end the process.
        lab::wait_if_interrupted();
    }
    r
}

fn run_demo(cfg: &DemoConfig) -> Result<()> {
    need_root()?;
    if cfg.computes.len() != 3 {
        return Err(DemoError::Failed(
            "--computes wants three counts A:B:C".into(),
        ));
    }
    lab::install_signal_teardown()?;
    clean_dead(false)?;
    let total: u32 = cfg.computes.iter().sum();
    let step = |s: &str| eprintln!("\n==> {s}");
    step("building three sites in network namespaces (A public; B, C behind NAT), one agent each");
    let overlay = pick_overlay(&cfg.mvc, &cfg.overlay);
    eprintln!("overlay: {overlay}");
    let lab = Lab::new("mvcc")?;
    lab.record_run(&run_dir())?;
    let topo = Topology::three_sites(&lab, 0)?;
    let sl = SiteLab::start(
        lab,
        topo,
        &cfg.mvc,
        &overlay,
        total + 1,
        total + 1,
        &BTreeMap::new(),
    )?;
    let res = (|| -> Result<()> {
        step("mvc site add A|B|C (pins each agent key; the user key is authorised at each site)");
        sl.add_sites()?;
        print!("{}", sl.ctl(&["site", "list"])?);
        let counts: Vec<String> = cfg.computes.iter().map(|c| c.to_string()).collect();
        let counts = counts.join(":");
        step(&format!(
            "mvc cluster create demo --sites A:B:C --computes {counts} --start"
        ));
        let t0 = Instant::now();
        let created = sl.create_cluster("demo", &counts)?;
        let built = t0.elapsed();
        print!("{created}");
        println!(
            "cluster of {} VMs at 3 sites created, started and leased in {:.1} s",
            total + 1,
            built.as_secs_f64()
        );
        step("mvc cluster status demo");
        print!("{}", sl.ctl(&["cluster", "status", "demo"])?);
        step("mvc cluster topology demo (RTT measured VM to VM over the overlay) and --slurm");
        print!("{}", sl.ctl(&["cluster", "topology", "demo"])?);
        print!("{}", sl.ctl(&["cluster", "topology", "demo", "--slurm"])?);
        step("mvc cluster hostfile demo");
        print!("{}", sl.ctl(&["cluster", "hostfile", "demo"])?);
        let np = (total + 1) as usize;
        step(&format!(
            "mpirun -np {np} across the hostfile, from the frontend VM"
        ));
        let prog = sl.lab.dir().join("allreduce.py");
        std::fs::write(&prog, MPI_PROGRAM)?;
        let p = prog.display().to_string();
        let out = if Path::new("/usr/lib/python3/dist-packages/mpi4py").exists() {
            sl.mpirun("demo", np, &["/usr/bin/python3", &p])?
        } else {
            eprintln!("(python3-mpi4py not installed: running `hostname` under mpirun instead)");
            sl.mpirun("demo", np, &["hostname"])?
        };
        print!("{out}");
        step("mvc cluster destroy demo");
        print!("{}", sl.ctl(&["cluster", "destroy", "demo"])?);
        let left = sl.leftover_vm_namespaces();
        if !left.is_empty() {
            return Err(DemoError::Failed(format!(
                "VM namespaces left after destroy: {}",
                left.join(", ")
            )));
        }
        Ok(())
    })();
    if res.is_err() {
        // After SIGINT/SIGTERM the failure is the teardown's doing: let it end the process.
        lab::wait_if_interrupted();
        sl.dump_logs();
    }
    step("tearing the sites down");
    drop(sl);
    res
}
