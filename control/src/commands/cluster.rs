//! `mvc cluster`: create, start, inspect and destroy virtual clusters.
use crate::{counts_arg, print, site_list_arg, Counts};
use anyhow::Result;
use clap::Subcommand;
use control::controller::{self, Controller, CreateArgs};
use control::validate;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Subcommand)]
pub enum ClusterCmd {
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
        /// Run this stack in it (`slurm`: munged and slurmctld on the frontend, munged
        /// and slurmd on every compute), from `--start` or `mvc cluster start` on.
        #[arg(long)]
        stack: Option<control::stack::StackKind>,
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
    /// All clusters by name, or one page of them (`--after` the last name of the
    /// previous page).
    List {
        /// At most this many clusters.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
        /// Only clusters whose names sort after this one.
        #[arg(long, value_parser = validate::cluster_name)]
        after: Option<String>,
    },
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
    /// Run a stack (Slurm) in a cluster; started now if the cluster runs.
    Stack(super::stack::StackArgs),
    /// Run a command on the cluster's frontend VM through its agent (no SSH); its
    /// output, bounded, and its exit status.
    Exec(super::stack::ExecArgs),
    /// Submit a Slurm batch job on the frontend (`-- sbatch ARGS...`); prints sbatch's
    /// answer (`--json`: with `job_id`).
    Submit(super::stack::SubmitArgs),
}

/// Seconds `--start` and `cluster start` wait until Slurm shows every compute idle.
const STACK_WAIT: Duration = Duration::from_secs(60);

/// Run `mvc cluster CMD` against the controller's store and the sites' agents.
pub fn run(c: &mut Controller, cmd: ClusterCmd, json: bool) -> Result<()> {
    match cmd {
        ClusterCmd::Create {
            name,
            sites,
            computes,
            memory,
            frontend_memory,
            start,
            stack,
            lease_timeout,
            overlay,
            overlay_pool,
        } => {
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
            if let Some(k) = stack {
                c.stack_enable(&name, k, STACK_WAIT)?;
            }
            if start {
                cl = c.cluster_start(&name, Duration::from_secs(lease_timeout))?;
                if c.has_stack(&name) {
                    c.stack_apply(&name, STACK_WAIT)?;
                }
            }
            print(json, &cl, cluster_table)
        }
        ClusterCmd::Start {
            name,
            lease_timeout,
        } => {
            let cl = c.cluster_start(&name, Duration::from_secs(lease_timeout))?;
            if c.has_stack(&name) {
                c.stack_apply(&name, STACK_WAIT)?;
            }
            print(json, &cl, cluster_table)
        }
        ClusterCmd::Status { name } => {
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
        ClusterCmd::List { limit, after } => {
            let limit = limit.map_or(usize::MAX, |n| usize::try_from(n).unwrap_or(usize::MAX));
            if json {
                let l = c.store.cluster_listing(after.as_deref(), limit)?;
                return print(json, &l, |_| String::new());
            }
            // The table needs no VM rows: one query, counts from an index.
            let v = c.store.cluster_summaries(after.as_deref(), limit)?;
            print(json, &v, |v| {
                let mut s = format!(
                    "{:<14} {:<9} {:<8} {:<5} {}\n",
                    "CLUSTER", "STATE", "ORIGIN", "VMS", "OVERLAY"
                );
                for x in v {
                    s += &format!(
                        "{:<14} {:<9} {:<8} {:<5} {}\n",
                        x.name, x.state, x.origin, x.vms, x.overlay_net
                    );
                }
                s
            })
        }
        ClusterCmd::Destroy { name, force } => {
            let r = c.cluster_destroy(&name, force)?;
            control::stack::forget(&c.secrets_dir, &name);
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
        ClusterCmd::Hostfile {
            name,
            slots,
            computes_only,
            launcher,
        } => {
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
        ClusterCmd::Stack(a) => super::stack::stack(c, a, json),
        ClusterCmd::Exec(a) => super::stack::exec(c, a, json),
        ClusterCmd::Submit(a) => super::stack::submit(c, a, json),
        ClusterCmd::Topology { name, slurm } => {
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
