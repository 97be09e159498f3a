//! `mvc vm`: start, stop and list single VMs of clusters.
use crate::print;
use anyhow::Result;
use clap::Subcommand;
use control::controller::Controller;
use control::validate;

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
