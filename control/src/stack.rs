//! The cluster stack: Slurm in a virtual cluster (`cluster create --stack slurm`,
//! `cluster stack`, `cluster exec`, `cluster submit`).
//!
//! The frontend VM runs `munged` and `slurmctld`, every compute `munged` and `slurmd`.
//! The controller makes one munge key per cluster (`secrets/<cluster>.munge`, 0600, next
//! to the community secret) and sends it with the node list to every site's agent in
//! [`crate::proto::Request::Stack`], over the same signed, encrypted channel as the
//! community secret. The agent writes the key 0400 into its `secrets/`, renders
//! `slurm.conf` and `topology.conf` itself from that node list ([`slurm_conf`],
//! [`topology_conf`]: the controller sends data, never configuration text, since the
//! daemons run as root on the agent's machine) and starts the daemons inside each VM
//! of the cluster it holds (`control/src/agent/stack.rs`).
//!
//! Commands run on the frontend through its agent ([`crate::proto::Request::Exec`]):
//! no SSH into the VM. Output is bounded ([`EXEC_OUTPUT_MAX`] per stream) and so is
//! the time ([`EXEC_TIMEOUT_MAX`]).
use crate::atomic_file::{self, Durability};
use crate::client::AgentClient;
use crate::controller::{ControlError, Controller, Result};
use crate::model::{hex, Cluster, Role};
use crate::proto::{check_name, Request};
use crate::validate::quote;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

// The exec bounds are the guest protocol's: an exec admitted here must fit in the frame
// that carries it into a qemu guest, and a netns VM keeps as much output as a guest may
// send back. The guest agent links only `std`, so the numbers live in `guest_proto`.
/// Bytes of each output stream an exec returns; the rest is counted, not kept.
pub const EXEC_OUTPUT_MAX: usize = crate::guest_proto::OUTPUT_MAX;
/// Bytes of standard input an exec may carry.
pub const EXEC_STDIN_MAX: usize = crate::guest_proto::STDIN_MAX;
/// Longest an exec may run (seconds).
pub const EXEC_TIMEOUT_MAX: u64 = 3600;
/// Most arguments of an exec, and bytes of one argument.
pub const EXEC_ARGS_MAX: (usize, usize) = crate::guest_proto::ARGS_MAX;
/// Munge key length the controller makes (bytes; munge wants at least 32).
pub const MUNGE_KEY_LEN: usize = 1024;

/// One Slurm compute node: a compute VM of the cluster.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlurmNode {
    /// VM name (Slurm `NodeName`, also its host name inside the VM).
    pub name: String,
    /// Overlay address (`NodeAddr`).
    pub addr: String,
    /// Site (its leaf switch in `topology.conf`).
    pub site: String,
    /// CPUs as allocated.
    pub cpus: u32,
    /// Memory as allocated (MiB, `RealMemory`).
    pub memory_mb: u64,
}

/// What every agent of a cluster needs to run its part of Slurm.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SlurmStack {
    /// The cluster's munge key, hex.
    pub munge_key: String,
    /// Frontend VM name (`SlurmctldHost`).
    pub frontend: String,
    /// Frontend overlay address.
    pub frontend_addr: String,
    /// The compute nodes.
    pub nodes: Vec<SlurmNode>,
}

impl SlurmStack {
    /// Check what came over the wire: every field ends up in a configuration file.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let k = &self.munge_key;
        if !(64..=2 * 4096).contains(&k.len())
            || k.len() % 2 != 0
            || !k.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return Err("the munge key must be 32 to 4096 bytes, hex".into());
        }
        check_name("frontend VM", &self.frontend, 40)?;
        check_ip(&self.frontend_addr)?;
        if self.nodes.is_empty() || self.nodes.len() > crate::proto::MAX_ITEMS {
            return Err(format!(
                "1 to {} Slurm nodes per cluster",
                crate::proto::MAX_ITEMS
            ));
        }
        for n in &self.nodes {
            check_name("Slurm node", &n.name, 40)?;
            check_name("site", &n.site, 24)?;
            check_ip(&n.addr)?;
            if n.cpus == 0 || n.cpus > 4096 {
                return Err(format!("node {} has {} CPUs", quote(&n.name), n.cpus));
            }
            if n.memory_mb == 0 || n.memory_mb > crate::proto::MAX_VM_MEMORY_MB {
                return Err(format!("node {} has {} MiB", quote(&n.name), n.memory_mb));
            }
        }
        Ok(())
    }
}

fn check_ip(s: &str) -> std::result::Result<(), String> {
    s.parse::<std::net::Ipv4Addr>()
        .map(|_| ())
        .map_err(|_| format!("{} is not an IPv4 address", quote(s)))
}

/// A command to run inside a VM, as [`crate::proto::Request::Exec`] carries it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecReq {
    /// Program and arguments (no shell unless the caller asks for one).
    pub argv: Vec<String>,
    /// Standard input (UTF-8 text, at most [`EXEC_STDIN_MAX`] bytes).
    #[serde(default)]
    pub stdin: String,
    /// Seconds before the command is killed.
    pub timeout_secs: u64,
}

impl ExecReq {
    /// Check the bounds.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let (n, len) = EXEC_ARGS_MAX;
        if self.argv.is_empty() || self.argv.len() > n {
            return Err(format!("1 to {n} command arguments"));
        }
        if self.argv.iter().any(|a| a.len() > len || a.contains('\0')) {
            return Err(format!(
                "a command argument is longer than {len} bytes or holds a NUL"
            ));
        }
        if self.argv[0].is_empty() {
            return Err("the command is empty".into());
        }
        if self.stdin.len() > EXEC_STDIN_MAX {
            return Err(format!("standard input over {EXEC_STDIN_MAX} bytes"));
        }
        if self.timeout_secs == 0 || self.timeout_secs > EXEC_TIMEOUT_MAX {
            return Err(format!("a timeout of 1 to {EXEC_TIMEOUT_MAX} s"));
        }
        Ok(())
    }
}

/// What a command run in a VM did.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status (`None`: killed by a signal, or by the timeout).
    pub code: Option<i32>,
    /// Whether the timeout ended it.
    pub timed_out: bool,
    /// Standard output (lossy UTF-8, at most [`EXEC_OUTPUT_MAX`] bytes).
    pub stdout: String,
    /// Standard error (likewise).
    pub stderr: String,
    /// Bytes of output dropped past the bound (both streams).
    pub dropped: u64,
}

/// Where one VM's Slurm and munge files live, under the agent's `run/<local>.slurm/`.
#[derive(Clone, Debug)]
pub struct VmPaths {
    /// The directory.
    pub dir: PathBuf,
}

impl VmPaths {
    /// The paths of a VM whose per-VM directory is `dir`.
    pub fn new(dir: &Path) -> VmPaths {
        VmPaths { dir: dir.into() }
    }
    /// A file in the directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
    /// `slurm.conf` (`SLURM_CONF` of everything run in the VM).
    pub fn conf(&self) -> PathBuf {
        self.file("slurm.conf")
    }
    /// munged's socket.
    pub fn munge_socket(&self) -> PathBuf {
        self.file("munge.sock")
    }
    /// The VM's working directory for commands and jobs.
    pub fn home(&self) -> PathBuf {
        self.file("home")
    }
}

/// `slurm.conf` for one VM of a cluster: the same nodes, partition and plugins
/// everywhere; the state, spool, log and pid paths and the munge socket are the VM's
/// own (several VMs and clusters share a machine).
pub fn slurm_conf(cluster: &str, s: &SlurmStack, p: &VmPaths) -> String {
    let d = |f: &str| p.file(f).display().to_string();
    let mut out = format!(
        "# slurm.conf of cluster {cluster}, written by the mvc agent from the controller's store\n\
         ClusterName={cluster}\n\
         SlurmctldHost={fe}({fe_addr})\n\
         AuthType=auth/munge\n\
         CredType=cred/munge\n\
         AuthInfo=socket={sock}\n\
         SlurmUser=root\n\
         SlurmdUser=root\n\
         StateSaveLocation={state}\n\
         SlurmdSpoolDir={spool}\n\
         SlurmctldPidFile={ctldpid}\n\
         SlurmdPidFile={dpid}\n\
         SlurmctldLogFile={ctldlog}\n\
         SlurmdLogFile={dlog}\n\
         TmpFS={tmp}\n\
         ProctrackType=proctrack/pgid\n\
         TaskPlugin=task/none\n\
         JobAcctGatherType=jobacct_gather/none\n\
         SelectType=select/cons_tres\n\
         SelectTypeParameters=CR_Core_Memory\n\
         SlurmdParameters=config_overrides\n\
         MpiDefault=none\n\
         ReturnToService=2\n\
         SlurmdTimeout=10\n\
         SlurmctldTimeout=10\n\
         MessageTimeout=10\n\
         InactiveLimit=0\n\
         EnforcePartLimits=ALL\n\
         KillWait=5\n\
         DebugFlags=NO_CONF_HASH\n\
         TopologyPlugin=topology/tree\n\
         MailProg=/bin/true\n",
        fe = s.frontend,
        fe_addr = s.frontend_addr,
        sock = d("munge.sock"),
        state = d("state"),
        spool = d("spool"),
        ctldpid = d("slurmctld.pid"),
        dpid = d("slurmd.pid"),
        ctldlog = d("slurmctld.log"),
        dlog = d("slurmd.log"),
        tmp = d("tmp"),
    );
    for n in &s.nodes {
        out.push_str(&format!(
            "NodeName={} NodeAddr={} CPUs={} RealMemory={} State=UNKNOWN\n",
            n.name, n.addr, n.cpus, n.memory_mb
        ));
    }
    out.push_str("PartitionName=all Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n");
    out
}

/// The shell that gives a netns VM's process its host name and the cgroup mounts
/// slurmd looks for, then runs the command. A process in a network namespace entered
/// with `ip netns exec` (or an agent that runs in one, as in the lab) sees a fresh
/// `/sys` without them: then a private tmpfs with the named `systemd` v1 hierarchy (a
/// cgroup v1 host), or else cgroup2.
pub const VM_SHELL: &str = "mountpoint -q /sys/fs/cgroup || \
     { mount -t tmpfs cgroup /sys/fs/cgroup && mkdir -p /sys/fs/cgroup/systemd && \
       mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd; } || \
     mount -t cgroup2 cgroup2 /sys/fs/cgroup; hostname \"$0\" && exec \"$@\"";

/// `argv` as a process of netns VM `vm` (to run inside its network namespace): its own
/// UTS namespace holding the VM's name, its own mount namespace ([`VM_SHELL`]).
pub fn as_vm(vm: &str, argv: &[String]) -> Vec<String> {
    let mut c: Vec<String> = ["unshare", "--uts", "--mount", "sh", "-c", VM_SHELL, vm]
        .iter()
        .map(|s| s.to_string())
        .collect();
    c.extend(argv.iter().cloned());
    c
}

/// Make a VM's Slurm directory (`state/`, `spool/`, `home/`; searchable by everyone,
/// as munged wants its socket's directory) and write its `slurm.conf` (plus `extra`
/// lines) and `topology.conf` where they changed.
pub fn prepare_vm(
    cluster: &str,
    stack: &SlurmStack,
    p: &VmPaths,
    extra: &str,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    for d in [
        p.dir.clone(),
        p.file("state"),
        p.file("spool"),
        p.file("tmp"),
        p.home(),
    ] {
        std::fs::create_dir_all(&d)?;
    }
    std::fs::set_permissions(&p.dir, std::fs::Permissions::from_mode(0o755))?;
    write_if_changed(&p.conf(), &(slurm_conf(cluster, stack, p) + extra))?;
    write_if_changed(&p.file("topology.conf"), &topology_conf(cluster, stack))?;
    Ok(())
}

/// Write `text` to `path` (mode 0644, not synced: it is rendered again from the stack
/// before the daemons start) unless it holds it already.
fn write_if_changed(path: &Path, text: &str) -> std::io::Result<()> {
    if std::fs::read_to_string(path).is_ok_and(|t| t == text) {
        return Ok(());
    }
    atomic_file::write(path, text.as_bytes(), 0o644, Durability::Deferred)
}

/// Write a munge key (raw bytes) with mode 0400, atomically.
pub fn write_munge_key(path: &Path, key: &[u8]) -> std::io::Result<()> {
    atomic_file::write(path, key, 0o400, Durability::Synced)
}

/// munged's command line for a VM: in the foreground, its socket, pid and seed files
/// in the VM's directory, origin the VM's `eth0` address (its name resolves nowhere).
pub fn munged_argv(p: &VmPaths, key: &Path) -> Vec<String> {
    vec![
        "munged".into(),
        "--foreground".into(),
        // Lab state directories are 0700: accepted with a warning.
        "--force".into(),
        format!("--socket={}", p.munge_socket().display()),
        format!("--key-file={}", key.display()),
        format!("--pid-file={}", p.file("munged.pid").display()),
        format!("--seed-file={}", p.file("munged.seed").display()),
        "--origin=eth0".into(),
    ]
}

/// slurmctld's (the frontend) or slurmd's command line for VM `vm`, in the foreground.
pub fn slurm_daemon_argv(vm: &str, frontend: bool, p: &VmPaths) -> Vec<String> {
    let conf = p.conf().display().to_string();
    if frontend {
        vec!["slurmctld".into(), "-D".into(), "-f".into(), conf]
    } else {
        vec![
            "slurmd".into(),
            "-D".into(),
            "-N".into(),
            vm.into(),
            "-f".into(),
            conf,
        ]
    }
}

/// `topology.conf`: one leaf switch per site holding its computes, one `wan` switch
/// above them (the text `mvc cluster topology --slurm` prints, without the frontend).
pub fn topology_conf(cluster: &str, s: &SlurmStack) -> String {
    let t = crate::controller::Topology {
        cluster: cluster.into(),
        nodes: s
            .nodes
            .iter()
            .map(|n| crate::controller::TopoNode {
                name: n.name.clone(),
                site: n.site.clone(),
                ip: n.addr.clone(),
                role: Role::Compute,
            })
            .collect(),
        rtt_ms: Vec::new(),
    };
    crate::controller::slurm_topology(&t)
}

/// The stack a cluster runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum StackKind {
    /// Slurm with munge.
    Slurm,
}

/// Path of a cluster's munge key at the controller.
fn key_path(secrets_dir: &Path, cluster: &str) -> PathBuf {
    secrets_dir.join(format!("{cluster}.munge"))
}

/// Forget a cluster's stack at the controller (its key), when it is destroyed.
pub fn forget(secrets_dir: &Path, cluster: &str) {
    let _ = std::fs::remove_file(key_path(secrets_dir, cluster));
}

/// The Slurm nodes and frontend of a cluster, from the store.
pub fn stack_of(cluster: &Cluster, munge_key: &str) -> Result<SlurmStack> {
    let fe = cluster
        .frontend()
        .ok_or_else(|| ControlError::Local("cluster has no frontend".into()))?;
    Ok(SlurmStack {
        munge_key: munge_key.into(),
        frontend: fe.name.clone(),
        frontend_addr: fe.ip.to_string(),
        nodes: cluster
            .vms
            .iter()
            .filter(|v| v.role == Role::Compute)
            .map(|v| SlurmNode {
                name: v.name.clone(),
                addr: v.ip.to_string(),
                site: v.site.clone(),
                cpus: 1,
                memory_mb: v.memory_mb,
            })
            .collect(),
    })
}

/// One node's line of `sinfo -h -N -o '%N %t'`.
fn parse_sinfo(out: &str) -> Vec<(String, String)> {
    out.lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

/// The job id in sbatch's `Submitted batch job N`.
pub fn parse_job_id(out: &str) -> Option<u64> {
    out.lines()
        .find_map(|l| l.trim().strip_prefix("Submitted batch job "))
        .and_then(|n| n.split_whitespace().next()?.parse().ok())
}

impl Controller<'_> {
    /// Whether the cluster runs a Slurm stack (its munge key exists here).
    pub fn has_stack(&self, cluster: &str) -> bool {
        key_path(&self.secrets_dir, cluster).exists()
    }

    /// Give a cluster the Slurm stack: make its munge key (once) and, when it runs,
    /// start the daemons everywhere and wait until `sinfo` shows every compute idle
    /// (at most `wait`). A cluster that does not run yet gets its daemons at
    /// `cluster start`.
    pub fn stack_enable(&mut self, name: &str, kind: StackKind, wait: Duration) -> Result<()> {
        let StackKind::Slurm = kind;
        let cluster = self.store.cluster(name)?;
        let p = key_path(&self.secrets_dir, name);
        if !p.exists() {
            let mut k = vec![0u8; MUNGE_KEY_LEN];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut k)
                .map_err(|_| ControlError::Local("no system randomness".into()))?;
            crate::agent::write_private(&p, &hex(&k))
                .map_err(|e| ControlError::Local(e.to_string()))?;
        }
        if cluster.state == "running" {
            self.stack_apply(name, wait)?;
        }
        Ok(())
    }

    /// Send the stack to every site of a running cluster (the agents start or
    /// reconfigure the daemons in their VMs), have `slurmctld` re-read its
    /// configuration, and wait (at most `wait`) until every compute is idle.
    pub fn stack_apply(&mut self, name: &str, wait: Duration) -> Result<()> {
        let cluster = self.store.cluster(name)?;
        let key = std::fs::read_to_string(key_path(&self.secrets_dir, name))
            .map_err(|e| ControlError::Local(format!("munge key of {}: {e}", quote(name))))?;
        let stack = stack_of(&cluster, key.trim())?;
        let sites = self.cluster_sites(&cluster)?;
        (self.progress)(&format!(
            "starting Slurm in {}: slurmctld on {}, slurmd on {} computes",
            name,
            stack.frontend,
            stack.nodes.len()
        ));
        let res = self.each_site(&sites, |c, _| {
            c.call_value(&Request::Stack {
                cluster: name.into(),
                stack: stack.clone(),
            })
        });
        let errs: Vec<String> = res
            .into_iter()
            .filter_map(|r| r.err().map(|e| e.to_string()))
            .collect();
        if !errs.is_empty() {
            return Err(ControlError::Sites(errs));
        }
        // Nodes added, removed or moved: slurmctld and every slurmd re-read.
        let r = self.exec_on(&cluster, None, &["scontrol", "reconfigure"], "", 30)?;
        if r.code != Some(0) {
            // slurmctld may still be starting; the wait below tells.
            tracing::debug!(stderr = %r.stderr, "scontrol reconfigure");
        }
        self.stack_wait_idle(&cluster, &stack, wait)
    }

    /// Wait (at most `wait`) until `sinfo` shows every compute idle, except those
    /// stopped with `vm stop` (marked down; they return by themselves when started).
    fn stack_wait_idle(&self, cluster: &Cluster, stack: &SlurmStack, wait: Duration) -> Result<()> {
        let deadline = Instant::now() + wait;
        let stopped = |name: &str| {
            cluster
                .vms
                .iter()
                .any(|v| v.name == name && v.state == "stopped")
        };
        let want: Vec<&str> = stack
            .nodes
            .iter()
            .map(|n| n.name.as_str())
            .filter(|n| !stopped(n))
            .collect();
        let skipped = stack.nodes.len() - want.len();
        loop {
            let r = self.exec_on(cluster, None, &["sinfo", "-h", "-N", "-o", "%N %t"], "", 10)?;
            let st = parse_sinfo(&r.stdout);
            let not_idle: Vec<String> = want
                .iter()
                .filter(|n| !st.iter().any(|(m, s)| m == *n && s == "idle"))
                .map(|n| {
                    let s = st
                        .iter()
                        .find(|(m, _)| m == n)
                        .map(|(_, s)| s.as_str())
                        .unwrap_or("missing");
                    format!("{n} {s}")
                })
                .collect();
            if not_idle.is_empty() {
                (self.progress)(&if skipped == 0 {
                    format!(
                        "Slurm in {}: all {} computes idle",
                        cluster.name,
                        want.len()
                    )
                } else {
                    format!(
                        "Slurm in {}: all {} running computes idle ({skipped} stopped, not waited for)",
                        cluster.name,
                        want.len()
                    )
                });
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ControlError::Local(format!(
                    "Slurm in {}: not every compute idle within {} s ({}){}",
                    quote(&cluster.name),
                    wait.as_secs(),
                    not_idle.join(", "),
                    if r.stderr.trim().is_empty() {
                        String::new()
                    } else {
                        format!("; sinfo: {}", r.stderr.trim())
                    }
                )));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    /// Run a command in one of a cluster's VMs (`vm`; default the frontend) through
    /// its agent.
    fn exec_on(
        &self,
        cluster: &Cluster,
        vm: Option<&str>,
        argv: &[&str],
        stdin: &str,
        timeout_secs: u64,
    ) -> Result<ExecOutput> {
        let v = match vm {
            Some(n) => cluster.vms.iter().find(|v| v.name == n).ok_or_else(|| {
                ControlError::Usage(format!(
                    "cluster {} has no VM {}",
                    quote(&cluster.name),
                    quote(n)
                ))
            })?,
            None => cluster
                .frontend()
                .ok_or_else(|| ControlError::Local("cluster has no frontend".into()))?,
        };
        let site = self.store.site(&v.site)?;
        let req = ExecReq {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            stdin: stdin.into(),
            timeout_secs,
        };
        req.validate().map_err(ControlError::Usage)?;
        let mut c = AgentClient::connect(&site, self.key)?;
        c.set_reply_timeout(Duration::from_secs(timeout_secs + 30))?;
        let out: ExecOutput = c.call(&Request::Exec {
            cluster: cluster.name.clone(),
            vm: v.name.clone(),
            exec: req,
        })?;
        Ok(out)
    }

    /// `mvc cluster exec`: run a command in a running cluster's VM (default: the
    /// frontend), with Slurm's configuration in its environment when the cluster
    /// has the stack.
    pub fn cluster_exec(
        &self,
        name: &str,
        vm: Option<&str>,
        argv: &[String],
        stdin: &str,
        timeout_secs: u64,
    ) -> Result<ExecOutput> {
        let cluster = self.running_cluster(name)?;
        let a: Vec<&str> = argv.iter().map(|s| s.as_str()).collect();
        self.exec_on(&cluster, vm, &a, stdin, timeout_secs)
    }

    /// `mvc cluster submit`: `sbatch ...` on the frontend; the job id.
    pub fn cluster_submit(
        &self,
        name: &str,
        args: &[String],
        stdin: &str,
        timeout_secs: u64,
    ) -> Result<(Option<u64>, ExecOutput)> {
        let cluster = self.running_cluster(name)?;
        if !self.has_stack(name) {
            return Err(ControlError::Usage(format!(
                "cluster {} has no Slurm stack; add one with `mvc cluster stack {name} slurm`",
                quote(name)
            )));
        }
        let mut argv: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        if argv.first() != Some(&"sbatch") {
            argv.insert(0, "sbatch");
        }
        let out = self.exec_on(&cluster, None, &argv, stdin, timeout_secs)?;
        Ok((parse_job_id(&out.stdout), out))
    }

    fn running_cluster(&self, name: &str) -> Result<Cluster> {
        let cluster = self.store.cluster(name)?;
        if cluster.state != "running" {
            return Err(ControlError::Usage(format!(
                "cluster {} is not running (state {}); start it with `mvc cluster start {name}`",
                quote(name),
                quote(&cluster.state)
            )));
        }
        Ok(cluster)
    }

    /// After a VM of a cluster with the stack moved to another site: every
    /// `topology.conf` gets its new switch and slurmctld re-reads it. Best effort: the
    /// move itself succeeded.
    pub fn stack_after_move(&mut self, cluster: &str) {
        if !self.has_stack(cluster) {
            return;
        }
        if let Err(e) = self.stack_apply(cluster, Duration::from_secs(60)) {
            (self.progress)(&format!(
                "warning: Slurm not reconfigured after the move: {e}"
            ));
        }
    }

    /// After a compute of a cluster with the stack stopped: mark its node down in
    /// Slurm so that no job waits for it (it returns by itself when its slurmd
    /// registers again, `ReturnToService=2`). Best effort: a frontend that does not
    /// run cannot be told.
    pub fn stack_node_stopped(&self, cluster: &Cluster, vm: &str) {
        let compute = cluster
            .vms
            .iter()
            .any(|v| v.name == vm && v.role == Role::Compute);
        if !compute || !self.has_stack(&cluster.name) {
            return;
        }
        let reason = "Reason=mvc vm stop";
        let node = format!("NodeName={vm}");
        match self.exec_on(
            cluster,
            None,
            &["scontrol", "update", &node, "State=DOWN", reason],
            "",
            30,
        ) {
            Ok(o) if o.code == Some(0) => {
                (self.progress)(&format!("Slurm: node {vm} marked down"));
            }
            Ok(o) => tracing::warn!(vm, stderr = %o.stderr, "marking the node down failed"),
            Err(e) => tracing::warn!(vm, error = %e, "marking the node down failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stack() -> SlurmStack {
        SlurmStack {
            munge_key: "ab".repeat(64),
            frontend: "k-fe".into(),
            frontend_addr: "198.19.5.1".into(),
            nodes: vec![
                SlurmNode {
                    name: "k-c1".into(),
                    addr: "198.19.5.10".into(),
                    site: "A".into(),
                    cpus: 1,
                    memory_mb: 512,
                },
                SlurmNode {
                    name: "k-c2".into(),
                    addr: "198.19.5.11".into(),
                    site: "B".into(),
                    cpus: 2,
                    memory_mb: 256,
                },
            ],
        }
    }

    #[test]
    fn conf_names_every_node_and_the_vm_own_paths() {
        let s = stack();
        let c = slurm_conf("k", &s, &VmPaths::new(Path::new("/st/run/c1-k-c1.slurm")));
        assert!(c.contains("SlurmctldHost=k-fe(198.19.5.1)\n"));
        assert!(c.contains("NodeName=k-c1 NodeAddr=198.19.5.10 CPUs=1 RealMemory=512"));
        assert!(c.contains("NodeName=k-c2 NodeAddr=198.19.5.11 CPUs=2 RealMemory=256"));
        assert!(c.contains("AuthInfo=socket=/st/run/c1-k-c1.slurm/munge.sock\n"));
        assert!(c.contains("SlurmdSpoolDir=/st/run/c1-k-c1.slurm/spool\n"));
        assert!(c.contains("TmpFS=/st/run/c1-k-c1.slurm/tmp\n"));
        assert!(c.contains("TopologyPlugin=topology/tree\n"));
        let t = topology_conf("k", &s);
        assert!(t.contains("SwitchName=site-A Nodes=k-c1\n"));
        assert!(t.contains("SwitchName=site-B Nodes=k-c2\n"));
        assert!(t.contains("SwitchName=wan Switches=site-A,site-B\n"));
        assert!(!t.contains("k-fe"));
    }

    #[test]
    fn hostile_stacks_and_execs_are_refused() {
        assert!(stack().validate().is_ok());
        let mut s = stack();
        s.nodes[0].name = "x\nProlog=/tmp/evil".into();
        assert!(s.validate().is_err());
        let mut s = stack();
        s.nodes[1].addr = "198.19.5.11 Prolog=/x".into();
        assert!(s.validate().is_err());
        let mut s = stack();
        s.munge_key = "ab".into();
        assert!(s.validate().is_err());
        let mut s = stack();
        s.frontend_addr = "fe".into();
        assert!(s.validate().is_err());
        let mut s = stack();
        s.nodes.clear();
        assert!(s.validate().is_err());
        let ok = ExecReq {
            argv: vec!["sinfo".into()],
            stdin: String::new(),
            timeout_secs: 10,
        };
        assert!(ok.validate().is_ok());
        for bad in [
            ExecReq {
                argv: vec![],
                ..ok.clone()
            },
            ExecReq {
                timeout_secs: 0,
                ..ok.clone()
            },
            ExecReq {
                timeout_secs: EXEC_TIMEOUT_MAX + 1,
                ..ok.clone()
            },
            ExecReq {
                argv: vec!["a\0b".into()],
                ..ok.clone()
            },
            ExecReq {
                stdin: "x".repeat(EXEC_STDIN_MAX + 1),
                ..ok.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn parsers() {
        assert_eq!(parse_job_id("Submitted batch job 42\n"), Some(42));
        assert_eq!(parse_job_id("sbatch: error: x\n"), None);
        assert_eq!(
            parse_sinfo("k-c1 idle\nk-c2 down*\n"),
            vec![
                ("k-c1".to_string(), "idle".to_string()),
                ("k-c2".to_string(), "down*".to_string())
            ]
        );
    }
}
