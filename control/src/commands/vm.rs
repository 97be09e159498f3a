//! `mvc vm`: start, stop, list and live-migrate single VMs of clusters.
use crate::print;
use anyhow::{Context, Result};
use clap::Subcommand;
use control::controller::Controller;
use control::migrate::{self, MigrateArgs};
use control::validate;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Subcommand)]
pub enum VmCmd {
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

/// Where `vm migrate` records its progress: `migrations/` beside the database.
fn migrations_dir(c: &Controller) -> PathBuf {
    c.secrets_dir
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join("migrations")
}

/// Run `mvc vm CMD` against the controller's store and the sites' agents.
pub fn run(c: &mut Controller, cmd: VmCmd, json: bool) -> Result<()> {
    match cmd {
        VmCmd::Start { name } => {
            let v = c.vm_start(&name)?;
            print(json, &v, |v| format!("{} {}\n", v.name, v.state))
        }
        VmCmd::Stop { name } => {
            let v = c.vm_stop(&name)?;
            print(json, &v, |v| format!("{} {}\n", v.name, v.state))
        }
        VmCmd::List { cluster } => {
            let l = match cluster {
                Some(name) => c.store.cluster_listing_of(&name)?,
                None => c.store.cluster_listing(None, usize::MAX)?,
            };
            print(json, &l.vms(), |_| l.vm_table())
        }
        VmCmd::Migrate {
            cluster,
            vm,
            to,
            host,
            downtime_ms,
            rate,
            timeout,
            precopy_disk,
            disk_rate,
        } => {
            let dir = migrations_dir(c);
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            let v = c.vm_migrate(&MigrateArgs {
                record: Some(dir.join(format!("migrate-{vm}.json"))),
                cluster,
                vm,
                to,
                host,
                downtime_ms,
                rate,
                timeout: Duration::from_secs(timeout),
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
        VmCmd::Migrations => {
            let v = migrate::recorded(&migrations_dir(c));
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
    }
}
