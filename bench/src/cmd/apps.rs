//! What the application runs (`bench hpl`, `bench dock`, `bench build-time`) share: the
//! machine's load, progress bars, common options and result files, node placement over
//! the sites, and an OpenMPI launcher for VM namespaces.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};
use lab::{Topology, Vm};
use serde::Serialize;

use super::figure::{self, Panel};
use super::{utc_now, write_json, Machine};

/// The 1, 5 and 15 minute load averages (zeros when /proc cannot be read).
pub fn load_avg() -> [f64; 3] {
    let s = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let mut it = s.split_whitespace().map(|v| v.parse().unwrap_or(0.0));
    [
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
        it.next().unwrap_or(0.0),
    ]
}

/// "load 1.23 / 2.34 / 3.45" for tables.
pub fn load_line(l: [f64; 3]) -> String {
    format!("load average {:.2} / {:.2} / {:.2}", l[0], l[1], l[2])
}

/// A progress bar of `len` steps on stderr (hidden when stderr is not a terminal).
pub fn progress(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} (eta {eta}) {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    pb.set_prefix(what.to_string());
    pb.enable_steady_tick(Duration::from_millis(500));
    pb
}

/// The `n` nodes of a run, placed round-robin over the sites: node 0 is site A's first
/// VM, node 1 site B's first, node 2 site C's first, node 3 site A's second, ...
pub fn nodes(t: &Topology, n: usize) -> anyhow::Result<Vec<Vm>> {
    let mut v = Vec::with_capacity(n);
    for k in 0..n {
        let site = &t.sites[k % t.sites.len()];
        let vm = site
            .vms
            .get(k / t.sites.len())
            .with_context(|| format!("site {} has too few VMs for {n} nodes", site.name))?;
        v.push(vm.clone());
    }
    Ok(v)
}

/// VMs per site needed to place `n` nodes round-robin over `sites` sites.
pub fn vms_per_site(n: usize, sites: usize) -> u8 {
    u8::try_from(n.div_ceil(sites.max(1))).unwrap_or(u8::MAX)
}

/// The node name OpenMPI sees for a VM: its namespace name without the lab prefix.
pub fn node_name(vm: &Vm) -> String {
    vm.ns.rsplit('-').next().unwrap_or(&vm.ns).to_string()
}

/// Writes an OpenMPI `plm_rsh_agent` launcher: OpenMPI calls it as `launcher HOST CMD...`
/// with HOST one of a VM's addresses (overlay or underlay); it runs CMD inside that VM's
/// namespace, in a UTS namespace of its own named after the VM, so that every rank sees
/// its own node name, at the lowest CPU priority ([`RANK_NICE`]).
pub fn write_launcher(dir: &Path, vms: &[Vm]) -> anyhow::Result<PathBuf> {
    let mut s = String::from("#!/bin/sh\nhost=\"$1\"; shift\ncase \"$host\" in\n");
    for vm in vms {
        s.push_str(&format!(
            "  {}|{}) ns={}; name={} ;;\n",
            vm.ip,
            vm.underlay_ip,
            vm.ns,
            node_name(vm)
        ));
    }
    s.push_str(&format!(
        "  *) echo \"unknown host $host\" >&2; exit 255 ;;\nesac\n\
         exec nice -n {RANK_NICE} ip netns exec \"$ns\" unshare --uts sh -c 'hostname \"$0\"; exec sh -c \"$*\"' \"$name\" \"$@\"\n",
    ));
    let p = dir.join("mpi-launcher");
    std::fs::write(&p, s).with_context(|| format!("writing {}", p.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))?;
    Ok(p)
}

/// Which network an application run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Net {
    /// The routed underlay between the same VM namespaces (the reference).
    Raw,
    /// The mvc overlay.
    Mvc,
}

impl Net {
    /// The address of `vm` on this network.
    pub fn addr(self, vm: &Vm) -> Ipv4Addr {
        match self {
            Net::Raw => vm.underlay_ip,
            Net::Mvc => vm.ip,
        }
    }

    /// The network OpenMPI is told to use (`btl_tcp_if_include`), as CIDR.
    pub fn cidr(self) -> &'static str {
        match self {
            Net::Raw => "198.18.0.0/16",
            Net::Mvc => "198.19.0.0/16",
        }
    }

    /// Name in tables.
    pub fn name(self) -> &'static str {
        match self {
            Net::Raw => "raw",
            Net::Mvc => "mvc",
        }
    }
}

/// CPU priority (nice) of the MPI ranks, their daemons and `mpirun`. In the lab every VM
/// is a namespace on the same few cores as the sites' edges (which on real sites run on
/// their own frontends), and an MPI rank waiting for a message polls without sleeping: at
/// normal priority 192 polling ranks on 2 cores leave the overlay a 1/200 share of the CPU,
/// connections time out and ORTE loses its daemons. At nice 19 (with
/// `mpi_yield_when_idle`) the ranks take what the overlay leaves.
pub const RANK_NICE: u8 = 19;

/// `mpirun` from `vms[0]`'s namespace over `vms` (one rank per node), in working directory
/// `wdir`, with `prog`; returns the argv to run with [`lab::Lab::exec_timeout`]. It and
/// its ranks run at [`RANK_NICE`], ranks waiting for messages yield the CPU.
pub fn mpirun_argv(
    vms: &[Vm],
    net: Net,
    hostfile: &Path,
    launcher: &Path,
    wdir: &Path,
    prog: &[&str],
) -> Vec<String> {
    let first = vms.first().map(node_name).unwrap_or_default();
    let nice = RANK_NICE.to_string();
    let mut v: Vec<String> = [
        "nice",
        "-n",
        &nice,
        "env",
        "OMPI_ALLOW_RUN_AS_ROOT=1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1",
        "unshare",
        "--uts",
        "sh",
        "-c",
        "hostname \"$0\"; exec \"$@\"",
        &first,
        "mpirun",
        "--allow-run-as-root",
        "--hostfile",
        &hostfile.to_string_lossy(),
        "-np",
        &vms.len().to_string(),
        "--map-by",
        "node",
        "--wdir",
        &wdir.to_string_lossy(),
        "--mca",
        "plm_rsh_agent",
        &launcher.to_string_lossy(),
        "--mca",
        "plm_rsh_no_tree_spawn",
        "1",
        "--mca",
        "mpi_yield_when_idle",
        "1",
        "--mca",
        "btl",
        "tcp,self",
        "--mca",
        "pml",
        "ob1",
        "--mca",
        "btl_tcp_if_include",
        net.cidr(),
        "--mca",
        "oob_tcp_if_include",
        net.cidr(),
        "-x",
        "OPENBLAS_NUM_THREADS=1",
        "-x",
        "OMP_NUM_THREADS=1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    v.extend(prog.iter().map(|s| s.to_string()));
    v
}

/// Writes an OpenMPI hostfile (one slot per node) for `vms` on `net`.
pub fn write_hostfile(path: &Path, vms: &[Vm], net: Net) -> anyhow::Result<()> {
    let mut s = String::new();
    for vm in vms {
        s.push_str(&format!("{} slots=1\n", net.addr(vm)));
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}

/// Installs Debian packages that provide missing commands (`(command, package)` pairs).
pub fn ensure_packages(need: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = need
        .iter()
        .filter(|(cmd, _)| {
            !std::process::Command::new("sh")
                .args(["-c", &format!("command -v {cmd} >/dev/null")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(_, pkg)| *pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("installing {}", missing.join(" "));
    let mut args = vec!["install", "-y", "-q"];
    args.extend(&missing);
    let st = std::process::Command::new("apt-get")
        .args(&args)
        .env("DEBIAN_FRONTEND", "noninteractive")
        .status()
        .context("running apt-get")?;
    if !st.success() {
        anyhow::bail!("apt-get install {} failed ({st})", missing.join(" "));
    }
    Ok(())
}

/// Makes the VMs' routed (underlay) traffic leave from their underlay address: the VMs'
/// interface carries the overlay address first, which the kernel would otherwise pick as
/// the source of routed connections, and MPI refuses a peer whose source address is not
/// the one it announced.
pub fn underlay_source(lab: &lab::Lab, t: &Topology) -> anyhow::Result<()> {
    for s in &t.sites {
        for vm in &s.vms {
            lab.ip(
                &vm.ns,
                &[
                    "route",
                    "replace",
                    "default",
                    "via",
                    &lab::addr::vm_gateway(s.idx).to_string(),
                    "src",
                    &vm.underlay_ip.to_string(),
                ],
            )?;
        }
    }
    Ok(())
}

/// Leaves the VMs of `t` only the address of `net` (and, for the underlay, the default
/// route): OpenMPI binds its TCP sockets to one address of an interface, and the VMs'
/// single interface carries both, so a rank may otherwise call from the other network
/// and be refused by its peer as an unknown address.
pub fn use_only(lab: &lab::Lab, t: &Topology, net: Net) -> anyhow::Result<()> {
    use lab::addr;
    for s in &t.sites {
        for vm in &s.vms {
            let ov = format!("{}/{}", vm.ip, addr::OVERLAY_PREFIX);
            let un = format!("{}/24", vm.underlay_ip);
            let (del, add) = match net {
                Net::Raw => (ov, un),
                Net::Mvc => (un, ov),
            };
            let _ = lab.ip(&vm.ns, &["addr", "del", &del, "dev", &vm.ifname]);
            let _ = lab.ip(&vm.ns, &["addr", "add", &add, "dev", &vm.ifname]);
            if net == Net::Raw {
                lab.ip(
                    &vm.ns,
                    &[
                        "route",
                        "replace",
                        "default",
                        "via",
                        &addr::vm_gateway(s.idx).to_string(),
                    ],
                )?;
            }
        }
    }
    Ok(())
}

/// Prints a line above the progress bar, or plainly when the bar is hidden (stderr is not
/// a terminal), so logs of unattended runs keep the per-step results.
pub fn note(pb: &ProgressBar, msg: String) {
    if pb.is_hidden() {
        eprintln!("{msg}");
    } else {
        pb.println(msg);
    }
}

/// Options every application run has.
#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    /// The mvc binary (default: next to this one).
    #[arg(long)]
    pub mvc: Option<PathBuf>,
    /// Runs per point and network (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Where to write the JSON result, the table and the figure.
    #[arg(long, default_value = "results")]
    pub results: PathBuf,
}

/// When and where an application run happened and the machine's load around it: the
/// frame of every result it writes.
#[derive(Debug, Serialize)]
pub struct RunInfo {
    /// The bench's name (`hpl`, `dock`, `build-time`).
    pub bench: &'static str,
    /// Start, UTC, ISO 8601.
    pub date: String,
    #[serde(skip)]
    stamp: String,
    /// The machine.
    pub machine: Machine,
    /// Load averages at the start.
    pub load_before: [f64; 3],
    /// Load averages at the end ([`RunInfo::finish`]).
    pub load_after: [f64; 3],
}

impl RunInfo {
    /// Notes the start and says it on stderr.
    pub fn start(bench: &'static str) -> RunInfo {
        let (date, stamp) = utc_now();
        let info = RunInfo {
            bench,
            date,
            stamp,
            machine: Machine::probe(),
            load_before: load_avg(),
            load_after: [0.0; 3],
        };
        eprintln!(
            "bench {bench}: {}, {}, {}",
            info.date,
            info.machine.line(),
            load_line(info.load_before)
        );
        info
    }

    /// Notes the load at the end; returns "DATE, MACHINE; LOAD before, LOAD after." for
    /// the result's headline.
    pub fn finish(&mut self) -> String {
        self.load_after = load_avg();
        format!(
            "{}, {}; {} before, {} after.",
            self.date,
            self.machine.line(),
            load_line(self.load_before),
            load_line(self.load_after)
        )
    }

    /// Prints the headline and the table, and writes them (`BENCH-STAMP.md`), the JSON
    /// result (this frame with `fields` beside it, `.json`) and the figure (`.svg`) to
    /// `dir`.
    pub fn save(
        &self,
        dir: &Path,
        head: &str,
        table: &str,
        fields: &impl Serialize,
        panels: &[Panel],
    ) -> anyhow::Result<()> {
        #[derive(Serialize)]
        struct Result<'a, T: Serialize> {
            #[serde(flatten)]
            info: &'a RunInfo,
            #[serde(flatten)]
            fields: &'a T,
        }
        println!("\n{head}\n\n{table}");
        let name = format!("{}-{}", self.bench, self.stamp);
        let p = write_json(dir, &format!("{name}.json"), &Result { info: self, fields })?;
        std::fs::write(dir.join(format!("{name}.md")), format!("{head}\n\n{table}"))?;
        let svg = dir.join(format!("{name}.svg"));
        figure::lines(panels, &svg)?;
        eprintln!("results: {}, figure: {}", p.display(), svg.display());
        Ok(())
    }
}
