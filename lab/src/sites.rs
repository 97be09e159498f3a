//! Three sites with their agents: what `mvc demo`, the controller's integration tests
//! and `bench build-time` run on. The sites live in network namespaces on one machine
//! (A public, B and C each behind its own NAT, built with the [`Lab`]), an `mvc agent`
//! runs on every site frontend, a user key is authorised at every site, and the
//! controller (the `mvc` command with its store) runs on site A's frontend.
//!
//! The NAT routers of B and C forward one TCP port (the agent's) to their frontend, as
//! a site admin publishes a frontend's SSH port; the overlay's UDP gets no such help.
use crate::{sys, Lab, Topology};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// TCP port the agents listen on.
pub const AGENT_PORT: u16 = 7000;

/// Runs `cmd` in a guest's console shell (the Unix socket `sock` of a qemu VM) and
/// returns what it printed, read until a marker echoed after it (1 MiB at the most,
/// `timeout` at the longest).
pub fn guest_console(sock: &Path, cmd: &str, timeout: Duration) -> Result<String> {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(sock)
        .map_err(|e| SitesError::Failed(format!("console {}: {e}", sock.display())))?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    let tag = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let marker = format!("END-{tag}");
    // The quotes keep the echoed command line from matching the marker.
    s.write_all(format!("\n{cmd}\necho E\"\"ND-{tag}\n").as_bytes())?;
    let deadline = Instant::now() + timeout;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline && out.len() < 1 << 20 {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        let t = String::from_utf8_lossy(&out);
        if let Some(i) = t.find(&marker) {
            return Ok(t[..i].to_string());
        }
    }
    Err(SitesError::Failed(format!(
        "no answer from {} to {cmd:?} within {timeout:?}: {}",
        sock.display(),
        String::from_utf8_lossy(&out)
    )))
}

/// The flags of an agent that runs qemu VMs (`--driver qemu`), its guest from
/// `cache`, its disks of `disk_mb` MiB served by `xnbd`.
pub fn qemu_agent_args(cache: &str, xnbd: &Path, disk_mb: u64) -> Vec<String> {
    vec![
        "--driver".into(),
        "qemu".into(),
        "--qemu-cache".into(),
        cache.into(),
        "--xnbd".into(),
        xnbd.display().to_string(),
        "--qemu-disk-mb".into(),
        disk_mb.to_string(),
    ]
}

/// The per-VM files of an agent's directory `dir` (`run/` or `disks/`): those named
/// `c<n>-<vm>.<ext>`, one per cluster with a VM of that name.
pub fn vm_files(dir: &Path, vm: &str, ext: &str) -> Vec<PathBuf> {
    let tail = format!("-{vm}.{ext}");
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(&tail))
                .and_then(|n| n.strip_prefix('c'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .collect()
}

/// Failures of the site lab.
#[derive(Debug, thiserror::Error)]
pub enum SitesError {
    /// Lab construction or a lab command failed.
    #[error("lab: {0}")]
    Lab(#[from] crate::Error),
    /// File or process error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// An `mvc` command failed.
    #[error("`mvc {cmd}` failed: {stderr}")]
    Mvc {
        /// The arguments.
        cmd: String,
        /// Its stderr.
        stderr: String,
    },
    /// Something else did not work out.
    #[error("{0}")]
    Failed(String),
}

/// Result of site lab steps.
pub type Result<T> = std::result::Result<T, SitesError>;

/// A running agent of the lab.
pub struct AgentProc {
    /// Site name (`A`, `B`, `C`).
    pub site: String,
    /// Frontend namespace.
    pub ns: String,
    /// State directory.
    pub state: PathBuf,
    /// Public key.
    pub key: String,
    /// Address the controller reaches it at.
    pub addr: String,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl AgentProc {
    /// `mvc site add` arguments for this agent's site.
    fn site_add(&self) -> [&str; 7] {
        [
            "site",
            "add",
            &self.site,
            "--agent",
            &self.addr,
            "--agent-key",
            &self.key,
        ]
    }
}

/// A user of the lab's sites: a key and a controller database.
#[derive(Clone, Debug)]
pub struct User {
    /// Controller database.
    pub db: PathBuf,
    /// User key file.
    pub key: PathBuf,
}

/// Three sites with agents, a user key and a controller database.
pub struct SiteLab {
    /// The namespaces (dropped last).
    pub lab: Lab,
    /// Topology (frontends, NAT routers).
    pub topo: Topology,
    /// Agents by site name.
    pub agents: BTreeMap<String, AgentProc>,
    /// The `mvc` binary.
    pub mvc: PathBuf,
    /// Controller database.
    pub db: PathBuf,
    /// User key file.
    pub user_key: PathBuf,
    /// Prefix of VM namespaces made by the agents (each agent adds its site's name:
    /// agents on one machine share `/run/netns`, and each owns its own names).
    pub vm_prefix: String,
    /// How long one controller command may run before it is killed.
    pub ctl_limit: Duration,
    /// Whether [`SiteLab::ctl`] echoes the controller's progress (stderr).
    pub echo_ctl: bool,
}

/// Default for [`SiteLab::ctl_limit`]: longer than any command of a healthy lab.
const CTL_LIMIT: Duration = Duration::from_secs(600);

fn out_text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

impl SiteLab {
    /// Build the sites, start one agent per site (overlay `mvc` or `n2n`), make a user
    /// key and authorise it everywhere with `max_vms` VMs and `host_max` VMs per host.
    pub fn new(mvc: &Path, overlay: &str, max_vms: u32, host_max: u32) -> Result<SiteLab> {
        SiteLab::with_agent_args(mvc, overlay, max_vms, host_max, &BTreeMap::new())
    }

    /// As [`SiteLab::new`], with extra `mvc agent run` arguments per site (e.g.
    /// `--driver qemu` for one site).
    pub fn with_agent_args(
        mvc: &Path,
        overlay: &str,
        max_vms: u32,
        host_max: u32,
        extra: &BTreeMap<String, Vec<String>>,
    ) -> Result<SiteLab> {
        let lab = Lab::new("mvcc")?;
        let topo = Topology::three_sites(&lab, 0)?;
        SiteLab::start(lab, topo, mvc, overlay, max_vms, host_max, extra)
    }

    /// Start the agents on sites already built: `topo` has three sites (A, B, C; the
    /// first is where the controller runs), e.g. with WAN links whose delay the caller
    /// sets.
    pub fn start(
        lab: Lab,
        topo: Topology,
        mvc: &Path,
        overlay: &str,
        max_vms: u32,
        host_max: u32,
        extra: &BTreeMap<String, Vec<String>>,
    ) -> Result<SiteLab> {
        if topo.sites.len() != 3 {
            return Err(SitesError::Failed(format!(
                "the site lab wants three sites, the topology has {}",
                topo.sites.len()
            )));
        }
        let vm_prefix = format!("{}-v", lab.prefix());
        let mut me = SiteLab {
            db: lab.dir().join("controller/controller.db"),
            user_key: lab.dir().join("user.key"),
            lab,
            topo,
            agents: BTreeMap::new(),
            mvc: mvc.into(),
            vm_prefix,
            ctl_limit: CTL_LIMIT,
            echo_ctl: true,
        };
        let out = me.run_local(&["key", "gen", "--key", &me.user_key.display().to_string()])?;
        let user_pub = String::from_utf8_lossy(&out.stdout).trim().to_string();
        for (i, site) in me.topo.sites.clone().iter().enumerate() {
            let name = ["A", "B", "C"][i].to_string();
            let state = me.lab.dir().join(format!("agent-{name}"));
            let st = state.display().to_string();
            let key =
                String::from_utf8_lossy(&me.run_local(&["agent", "init", "--state", &st])?.stdout)
                    .trim()
                    .to_string();
            me.run_local(&[
                "agent",
                "authorize",
                "--state",
                &st,
                "--key",
                &user_pub,
                "--max-vms",
                &max_vms.to_string(),
                "--comment",
                "demo user",
            ])?;
            if let Some(r) = &site.router {
                // The site admin forwards the agent port to the frontend.
                let to = format!("{}:{AGENT_PORT}", site.frontend_ip);
                let port = AGENT_PORT.to_string();
                me.lab.iptables(
                    r,
                    &[
                        "-t",
                        "nat",
                        "-A",
                        "PREROUTING",
                        "-i",
                        "wan",
                        "-p",
                        "tcp",
                        "--dport",
                        &port,
                        "-j",
                        "DNAT",
                        "--to-destination",
                        &to,
                    ],
                )?;
                // ...and lets those new inbound connections through its firewall.
                let fe_ip = site.frontend_ip.to_string();
                me.lab.iptables(
                    r,
                    &[
                        "-I",
                        "FORWARD",
                        "1",
                        "-i",
                        "wan",
                        "-p",
                        "tcp",
                        "-d",
                        &fe_ip,
                        "--dport",
                        &port,
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "NEW",
                        "-j",
                        "ACCEPT",
                    ],
                )?;
            }
            let args = vec![
                "agent".to_string(),
                "run".into(),
                "--state".into(),
                st.clone(),
                "--site".into(),
                name.clone(),
                "--listen".into(),
                format!("0.0.0.0:{AGENT_PORT}"),
                "--ns-prefix".into(),
                format!("{}{name}-", me.vm_prefix),
                "--host".into(),
                format!("{}-h0:2:8192:{host_max}", name.to_lowercase()),
                "--overlay".into(),
                overlay.into(),
            ];
            let args = [args, extra.get(&name).cloned().unwrap_or_default()].concat();
            let mut a = AgentProc {
                site: name.clone(),
                ns: site.frontend.clone(),
                log: me.lab.dir().join(format!("agent-{name}.log")),
                state,
                key,
                addr: format!("{}:{AGENT_PORT}", site.public_ip),
                child: None,
                args,
            };
            me.start_agent_proc(&mut a, &[])?;
            me.agents.insert(name, a);
        }
        Ok(me)
    }

    fn start_agent_proc(&self, a: &mut AgentProc, env: &[(&str, &str)]) -> Result<()> {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&a.log)?;
        let f2 = f.try_clone()?;
        // nsenter enters only the network namespace: the agent must stay in the root
        // mount namespace so the VM namespaces it creates are visible to everyone.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", a.ns))
            .arg(&self.mvc)
            .args(&a.args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(f)
            .stderr(f2)
            .spawn()?;
        self.lab.record_child(child.id());
        a.child = Some(child);
        let addr = a.addr.clone();
        // Wait until the agent accepts connections (from site A's frontend).
        let deadline = Instant::now() + Duration::from_secs(30);
        let ns_a = self.topo.sites[0].frontend.clone();
        loop {
            let ok = self
                .lab
                .in_ns(&ns_a, || {
                    addr.parse::<std::net::SocketAddr>()
                        .ok()
                        .and_then(|s| {
                            std::net::TcpStream::connect_timeout(&s, Duration::from_millis(300))
                                .ok()
                        })
                        .is_some()
                })
                .unwrap_or(false);
            if ok {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SitesError::Failed(format!(
                    "agent of site {} did not come up; log:\n{}",
                    a.site,
                    std::fs::read_to_string(&a.log).unwrap_or_default()
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Stop one site's agent (SIGTERM: it stops what it started and exits).
    pub fn stop_agent(&mut self, site: &str) {
        if let Some(a) = self.agents.get_mut(site) {
            if let Some(mut c) = a.child.take() {
                stop_wait(&mut c);
            }
        }
    }

    /// Kill one site's agent with SIGKILL: it leaves its VMs and overlay processes
    /// behind, as after a crash.
    pub fn kill_agent(&mut self, site: &str) {
        if let Some(a) = self.agents.get_mut(site) {
            if let Some(mut c) = a.child.take() {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }

    /// Start a stopped agent again.
    pub fn restart_agent(&mut self, site: &str) -> Result<()> {
        self.restart_agent_with(site, &[])
    }

    /// Start a stopped agent again with extra environment (e.g. a test failpoint).
    pub fn restart_agent_with(&mut self, site: &str, env: &[(&str, &str)]) -> Result<()> {
        let mut a = self
            .agents
            .remove(site)
            .ok_or_else(|| SitesError::Failed(format!("no site {site}")))?;
        let r = self.start_agent_proc(&mut a, env);
        self.agents.insert(site.into(), a);
        r
    }

    /// Whether a site's agent process still runs (it may have aborted by itself).
    pub fn agent_alive(&mut self, site: &str) -> bool {
        self.agents
            .get_mut(site)
            .and_then(|a| a.child.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Reap an agent that exited by itself; true when it had.
    pub fn reap_agent(&mut self, site: &str) -> bool {
        let Some(a) = self.agents.get_mut(site) else {
            return false;
        };
        match a.child.as_mut().map(|c| c.try_wait()) {
            Some(Ok(Some(_))) => {
                a.child = None;
                true
            }
            _ => false,
        }
    }

    /// Make another user: a key, authorised at every agent for `max_vms` VMs, and a
    /// controller database of its own (with the three sites added).
    pub fn add_user(&self, label: &str, max_vms: u32) -> Result<User> {
        let user = User {
            db: self
                .lab
                .dir()
                .join(format!("controller-{label}/controller.db")),
            key: self.lab.dir().join(format!("{label}.key")),
        };
        let out = self.run_local(&["key", "gen", "--key", &user.key.display().to_string()])?;
        let public = String::from_utf8_lossy(&out.stdout).trim().to_string();
        for a in self.agents.values() {
            self.run_local(&[
                "agent",
                "authorize",
                "--state",
                &a.state.display().to_string(),
                "--key",
                &public,
                "--max-vms",
                &max_vms.to_string(),
                "--comment",
                label,
            ])?;
            self.ctl_as(&user, &a.site_add())?;
        }
        Ok(user)
    }

    /// The lab's first user (the one [`SiteLab::ctl`] acts as).
    pub fn first_user(&self) -> User {
        User {
            db: self.db.clone(),
            key: self.user_key.clone(),
        }
    }

    /// Run `mvc ARGS` here (no namespace), failing on a non-zero exit.
    pub fn run_local(&self, args: &[&str]) -> Result<Output> {
        let o = Command::new(&self.mvc)
            .args(args)
            .stdin(Stdio::null())
            .output()?;
        if !o.status.success() {
            return Err(SitesError::Mvc {
                cmd: args.join(" "),
                stderr: out_text(&o),
            });
        }
        Ok(o)
    }

    /// Run a controller command (`mvc ARGS`) on site A's frontend; returns the output
    /// whatever the exit status (`timeout` kills it after [`SiteLab::ctl_limit`]).
    pub fn ctl_output(&self, args: &[&str]) -> Result<Output> {
        self.ctl_output_as(&self.first_user(), args)
    }

    /// As [`SiteLab::ctl_output`], as `user`.
    pub fn ctl_output_as(&self, user: &User, args: &[&str]) -> Result<Output> {
        if let Some(d) = user.db.parent() {
            std::fs::create_dir_all(d)?;
        }
        Ok(Command::new("timeout")
            .arg(self.ctl_limit.as_secs().max(1).to_string())
            .args(["ip", "netns", "exec", &self.topo.sites[0].frontend])
            .arg(&self.mvc)
            .args(args)
            .env("MVC_DB", &user.db)
            .env("MVC_KEY", &user.key)
            .stdin(Stdio::null())
            .output()?)
    }

    /// Run a controller command on site A's frontend, failing on a non-zero exit;
    /// its stderr (progress) is echoed unless [`SiteLab::echo_ctl`] is off.
    pub fn ctl(&self, args: &[&str]) -> Result<String> {
        self.ctl_as(&self.first_user(), args)
    }

    /// As [`SiteLab::ctl`], as `user`.
    pub fn ctl_as(&self, user: &User, args: &[&str]) -> Result<String> {
        let o = self.ctl_output_as(user, args)?;
        if self.echo_ctl {
            eprint!("{}", String::from_utf8_lossy(&o.stderr));
        }
        if !o.status.success() {
            return Err(SitesError::Mvc {
                cmd: args.join(" "),
                stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
            });
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// A controller command with `--json`, parsed.
    pub fn ctl_json(&self, args: &[&str]) -> Result<serde_json::Value> {
        self.ctl_json_as(&self.first_user(), args)
    }

    /// As [`SiteLab::ctl_json`], as `user`.
    pub fn ctl_json_as(&self, user: &User, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.ctl_as(user, &a)?;
        serde_json::from_str(&out).map_err(|e| {
            SitesError::Failed(format!("mvc {}: bad JSON: {e}: {out}", args.join(" ")))
        })
    }

    /// `mvc cluster create NAME --sites A:B:C --computes COMPUTES --start` with small
    /// VMs (256 MiB), through the controller; returns what it prints.
    pub fn create_cluster(&self, name: &str, computes: &str) -> Result<String> {
        self.create_cluster_with(name, computes, 256, &[])
    }

    /// `mvc cluster create NAME --sites A:B:C --computes COMPUTES --start` with VMs of
    /// `memory` MiB and `extra` arguments after these, through the controller; returns
    /// what it prints.
    pub fn create_cluster_with(
        &self,
        name: &str,
        computes: &str,
        memory: u32,
        extra: &[&str],
    ) -> Result<String> {
        let memory = memory.to_string();
        let mut args = vec![
            "cluster",
            "create",
            name,
            "--sites",
            "A:B:C",
            "--computes",
            computes,
            "--memory",
            &memory,
            "--frontend-memory",
            &memory,
            "--start",
        ];
        args.extend_from_slice(extra);
        self.ctl(&args)
    }

    /// How each running VM of `cluster` is reached (`netns:<ns>`, `qemu:<tap>:<local>`),
    /// as `cluster status` reports it.
    pub fn vm_handles(&self, cluster: &str) -> Result<BTreeMap<String, String>> {
        self.vm_handles_as(&self.first_user(), cluster)
    }

    /// As [`SiteLab::vm_handles`], as `user`.
    pub fn vm_handles_as(&self, user: &User, cluster: &str) -> Result<BTreeMap<String, String>> {
        let st = self.ctl_json_as(user, &["cluster", "status", cluster])?;
        Ok(st["vms"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| Some((v["name"].as_str()?.into(), v["handle"].as_str()?.into())))
            .collect())
    }

    /// The network namespace of a running netns VM of `cluster`.
    pub fn vm_ns(&self, cluster: &str, vm: &str) -> Result<String> {
        self.vm_ns_as(&self.first_user(), cluster, vm)
    }

    /// As [`SiteLab::vm_ns`], as `user`.
    pub fn vm_ns_as(&self, user: &User, cluster: &str, vm: &str) -> Result<String> {
        self.vm_handles_as(user, cluster)?
            .get(vm)
            .and_then(|h| h.strip_prefix("netns:"))
            .map(str::to_string)
            .ok_or_else(|| SitesError::Failed(format!("VM {vm} of {cluster} runs in no namespace")))
    }

    /// A per-VM file of `site`'s agent (`run/c<n>-<vm>.<ext>`), when exactly one
    /// cluster there has a VM of that name.
    pub fn vm_file(&self, site: &str, vm: &str, ext: &str) -> Option<PathBuf> {
        let run = self.agents.get(site)?.state.join("run");
        let found = vm_files(&run, vm, ext);
        (found.len() == 1).then(|| found[0].clone())
    }

    /// `mvc site add` for all three sites.
    pub fn add_sites(&self) -> Result<()> {
        for a in self.agents.values() {
            self.ctl(&a.site_add())?;
        }
        Ok(())
    }

    /// Run `prog args` with `mpirun` from the cluster's frontend VM over every node of
    /// the hostfile (netns VMs: ranks are started through the launcher script).
    pub fn mpirun(&self, cluster: &str, np: usize, prog: &[&str]) -> Result<String> {
        self.mpirun_as(&self.first_user(), cluster, np, prog)
    }

    /// As [`SiteLab::mpirun`], as `user`.
    pub fn mpirun_as(
        &self,
        user: &User,
        cluster: &str,
        np: usize,
        prog: &[&str],
    ) -> Result<String> {
        let who = user
            .key
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        let hf = self.lab.dir().join(format!("{who}-{cluster}.hosts"));
        let launcher = self.lab.dir().join(format!("{who}-{cluster}.launch"));
        let text = self.ctl_as(
            user,
            &[
                "cluster",
                "hostfile",
                cluster,
                "--launcher",
                &launcher.display().to_string(),
            ],
        )?;
        std::fs::write(&hf, &text)?;
        let handles = self.ctl_json_as(user, &["vm", "list", "--cluster", cluster])?;
        let fe = handles
            .as_array()
            .and_then(|a| a.iter().find(|v| v[1]["role"] == "frontend"))
            .and_then(|v| v[1]["name"].as_str())
            .ok_or_else(|| SitesError::Failed("no frontend VM".into()))?
            .to_string();
        let ns = self.vm_ns_as(user, cluster, &fe)?;
        let mut cmd = vec![
            "mpirun".to_string(),
            "--allow-run-as-root".into(),
            "--hostfile".into(),
            hf.display().to_string(),
            "-np".into(),
            np.to_string(),
            "--map-by".into(),
            "node".into(),
            "--mca".into(),
            "plm_rsh_agent".into(),
            launcher.display().to_string(),
            "--mca".into(),
            "plm_rsh_no_tree_spawn".into(),
            "1".into(),
            "--mca".into(),
            "btl".into(),
            "tcp,self".into(),
            "--mca".into(),
            "pml".into(),
            "ob1".into(),
            "--mca".into(),
            "btl_tcp_if_include".into(),
            "eth0".into(),
            "--mca".into(),
            "oob_tcp_if_include".into(),
            "eth0".into(),
        ];
        cmd.extend(prog.iter().map(|s| s.to_string()));
        let o = Command::new("timeout")
            .args([
                "120",
                "ip",
                "netns",
                "exec",
                &ns,
                "unshare",
                "--uts",
                "sh",
                "-c",
                "hostname \"$0\"; exec \"$@\"",
                &fe,
            ])
            .args(&cmd)
            .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
            .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
            .env("PATH", "/usr/bin:/usr/sbin:/bin:/sbin")
            .stdin(Stdio::null())
            .output()?;
        if !o.status.success() {
            return Err(SitesError::Failed(format!(
                "mpirun failed ({}): {}",
                o.status,
                out_text(&o)
            )));
        }
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    /// Network namespaces of VMs still present.
    pub fn leftover_vm_namespaces(&self) -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&self.vm_prefix))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Print agent logs (on failure).
    pub fn dump_logs(&self) {
        for a in self.agents.values() {
            let t = std::fs::read_to_string(&a.log).unwrap_or_default();
            let lines: Vec<&str> = t.lines().collect();
            eprintln!("---- agent {} log (last 40 lines)", a.site);
            for l in &lines[lines.len().saturating_sub(40)..] {
                eprintln!("{l}");
            }
            if let Ok(rd) = std::fs::read_dir(a.state.join("run")) {
                for e in rd.flatten() {
                    let p = e.path();
                    if p.extension().is_some_and(|x| x == "log") {
                        let t = std::fs::read_to_string(&p).unwrap_or_default();
                        let lines: Vec<&str> = t.lines().collect();
                        eprintln!("---- {} (last 15 lines)", p.display());
                        for l in &lines[lines.len().saturating_sub(15)..] {
                            eprintln!("{l}");
                        }
                    }
                }
            }
        }
    }
}

fn stop_wait(c: &mut Child) {
    // A child we spawned and have not reaped (try_wait says it still runs): the pid is ours.
    if let Ok(None) = c.try_wait() {
        let _ = sys::kill(c.id(), libc::SIGTERM);
    }
    for _ in 0..150 {
        if let Ok(Some(_)) = c.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for SiteLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        let sites: Vec<String> = self.agents.keys().cloned().collect();
        for s in sites {
            self.stop_agent(&s);
        }
        // VMs of agents that died without cleaning up.
        for ns in self.leftover_vm_namespaces() {
            if let Ok(pids) = crate::run(&["ip", "netns", "pids", &ns]) {
                for pid in pids
                    .stdout
                    .split_whitespace()
                    .filter_map(|p| p.parse::<u32>().ok())
                {
                    // These run inside a VM namespace this lab's agents created.
                    let _ = sys::kill(pid, libc::SIGKILL);
                }
            }
            let _ = crate::run(&["ip", "netns", "del", &ns]);
        }
    }
}
