//! Slurm in the bench's lab VMs: the same daemons, configuration and per-VM files as
//! the agents run for `cluster create --stack slurm` (`control::stack`), started here
//! directly in the lab's VM namespaces so that one Slurm runs over the mvc overlay and
//! another over the raw underlay side by side (own cluster name, ports, munge key and
//! directories each), and runs alternate between them.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use control::stack::{
    as_vm, munged_argv, prepare_vm, slurm_daemon_argv, write_munge_key, SlurmNode, SlurmStack,
    VmPaths,
};
use lab::{Lab, Proc, Vm};

use super::apps::{self, Net};

/// One Slurm over one network of the lab.
pub struct SlurmLab {
    /// Cluster name (`<tag>-<net>`).
    pub name: String,
    /// The frontend VM's namespace (slurmctld; jobs are submitted there).
    pub frontend_ns: String,
    /// The frontend's `slurm.conf`.
    pub conf: PathBuf,
    /// The frontend's working directory (jobs submitted from it run there).
    pub home: PathBuf,
    /// Compute node names, in the order given.
    pub nodes: Vec<String>,
    procs: Vec<Proc>,
}

impl SlurmLab {
    /// Start munged and slurmctld in `frontend`, munged and slurmd in each of
    /// `computes` (VM, site), all addressed on `net`, listening on `ports`
    /// (slurmctld, slurmd); wait until every compute is idle.
    pub fn start(
        lab: &Lab,
        tag: &str,
        net: Net,
        frontend: &Vm,
        computes: &[(Vm, String)],
        ports: (u16, u16),
    ) -> anyhow::Result<SlurmLab> {
        let name = format!("{tag}-{}", net.name());
        let dir = lab.dir().join(format!("slurm-{name}"));
        std::fs::create_dir_all(&dir)?;
        let key_file = dir.join("munge.key");
        let mut key = vec![0u8; control::stack::MUNGE_KEY_LEN];
        std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
        let _ = std::fs::remove_file(&key_file);
        write_munge_key(&key_file, &key)?;
        let stack = SlurmStack {
            munge_key: String::new(),
            frontend: apps::node_name(frontend),
            frontend_addr: net.addr(frontend).to_string(),
            nodes: computes
                .iter()
                .map(|(vm, site)| SlurmNode {
                    name: apps::node_name(vm),
                    addr: net.addr(vm).to_string(),
                    site: site.clone(),
                    cpus: 1,
                    memory_mb: 512,
                })
                .collect(),
        };
        let extra = format!("SlurmctldPort={}\nSlurmdPort={}\n", ports.0, ports.1);
        let mut procs = Vec::new();
        let all: Vec<(&Vm, bool)> = std::iter::once((frontend, true))
            .chain(computes.iter().map(|(v, _)| (v, false)))
            .collect();
        for (vm, fe) in &all {
            let node = apps::node_name(vm);
            let p = VmPaths::new(&dir.join(&node));
            prepare_vm(&name, &stack, &p, &extra)?;
            let munged = as_vm(&node, &munged_argv(&p, &key_file));
            procs.push(spawn(
                lab,
                &vm.ns,
                &format!("munged-{name}-{node}"),
                &munged,
            )?);
            let end = Instant::now() + Duration::from_secs(10);
            while !p.munge_socket().exists() {
                if Instant::now() > end {
                    bail!("munged of {node} ({name}) made no socket within 10 s");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let d = as_vm(&node, &slurm_daemon_argv(&node, *fe, &p));
            procs.push(spawn(lab, &vm.ns, &format!("slurm-{name}-{node}"), &d)?);
        }
        let fe = VmPaths::new(&dir.join(apps::node_name(frontend)));
        let s = SlurmLab {
            name,
            frontend_ns: frontend.ns.clone(),
            conf: fe.conf(),
            home: fe.home(),
            nodes: stack.nodes.iter().map(|n| n.name.clone()).collect(),
            procs,
        };
        s.wait_idle(lab, Duration::from_secs(60))?;
        Ok(s)
    }

    /// `argv` run in the frontend VM with this Slurm's configuration, in its home.
    pub fn command(&self, argv: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "env".into(),
            format!("SLURM_CONF={}", self.conf.display()),
            "sh".into(),
            "-c".into(),
            "cd \"$0\" && exec \"$@\"".into(),
            self.home.display().to_string(),
        ];
        a.extend(argv.iter().map(|s| s.to_string()));
        as_vm("frontend", &a)
    }

    /// Run `argv` on the frontend (see [`SlurmLab::command`]); its output.
    pub fn run(&self, lab: &Lab, argv: &[&str], limit: Duration) -> anyhow::Result<lab::Out> {
        let a = self.command(argv);
        let a: Vec<&str> = a.iter().map(String::as_str).collect();
        Ok(lab.exec_timeout(&self.frontend_ns, &a, limit)?)
    }

    /// Wait (at most `limit`) until `sinfo` shows every compute idle.
    pub fn wait_idle(&self, lab: &Lab, limit: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + limit;
        loop {
            let o = self.run(lab, &["sinfo", "-h", "-N", "-o", "%N %t"], limit)?;
            let idle = self
                .nodes
                .iter()
                .all(|n| o.stdout.lines().any(|l| l == format!("{n} idle")));
            if idle {
                return Ok(());
            }
            if Instant::now() > end {
                bail!(
                    "Slurm {}: not every compute idle within {} s: {}{}",
                    self.name,
                    limit.as_secs(),
                    o.stdout,
                    o.stderr
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Wait (at most `limit`) until job `job` has left the queue; cancel it and fail
    /// when it has not.
    pub fn wait_gone(&self, lab: &Lab, job: &str, limit: Duration) -> anyhow::Result<()> {
        let end = Instant::now() + limit;
        loop {
            let q = self.run(lab, &["squeue", "-h", "-j", job], Duration::from_secs(30))?;
            if q.ok && q.stdout.trim().is_empty() {
                return Ok(());
            }
            if Instant::now() > end {
                let _ = self.run(lab, &["scancel", job], Duration::from_secs(30));
                bail!(
                    "job {job} over {} not done in {} s",
                    self.name,
                    limit.as_secs()
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Stop every daemon.
    pub fn stop(&self, lab: &Lab) {
        for p in self.procs.iter().rev() {
            lab.stop(p);
        }
    }
}

fn spawn(lab: &Lab, ns: &str, name: &str, argv: &[String]) -> anyhow::Result<Proc> {
    let a: Vec<&str> = argv.iter().map(String::as_str).collect();
    lab.spawn(ns, name, &a)
        .with_context(|| format!("starting {name}"))
}

/// The job output files `prefix*` in `dir`, sorted by name.
pub fn outputs(dir: &Path, prefix: &str) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    let n = e.file_name().to_string_lossy().into_owned();
                    n.starts_with(prefix)
                        .then(|| (n, std::fs::read_to_string(e.path()).unwrap_or_default()))
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}
