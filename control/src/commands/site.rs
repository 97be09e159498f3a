//! `mvc site`: register, list and forget sites (their agents).
use crate::print;
use anyhow::Result;
use clap::Subcommand;
use control::controller::Controller;
use control::validate;

#[derive(Subcommand)]
pub enum SiteCmd {
    /// Register a site by its agent (pins the agent key; your key must be authorised).
    Add {
        /// Site name (letters, digits and '-', at most 24).
        #[arg(value_parser = validate::site_name)]
        name: String,
        /// Agent address ip:port.
        #[arg(long, value_parser = validate::agent_addr)]
        agent: String,
        /// Agent public key (hex), printed by `mvc agent init` at that site.
        #[arg(long, value_parser = validate::public_key)]
        agent_key: String,
    },
    /// Registered sites with their hosts and capacity.
    List,
    /// Forget a site (refused while a cluster uses it).
    Remove {
        /// Site name.
        #[arg(value_parser = validate::site_name)]
        name: String,
    },
}

/// Run `mvc site CMD` against the controller's store.
pub fn run(c: &mut Controller, cmd: SiteCmd, json: bool) -> Result<()> {
    match cmd {
        SiteCmd::Add {
            name,
            agent,
            agent_key,
        } => {
            let v = c.site_add(&name, &agent, &agent_key)?;
            print(json, &v, |v| {
                format!(
                    "site {} added: agent {}, {} host(s), {} free VM slots\n",
                    v.site.name,
                    v.site.agent_addr,
                    v.hosts.len(),
                    v.hosts.iter().map(|h| h.free_vms).sum::<u32>()
                )
            })
        }
        SiteCmd::List => {
            let v = c.site_list()?;
            print(json, &v, |v| {
                let mut s = format!(
                    "{:<12} {:<22} {:<8} {:>6} {:>10}\n",
                    "SITE", "AGENT", "HOSTS", "FREE", "FREE_MiB"
                );
                for x in v {
                    s += &format!(
                        "{:<12} {:<22} {:<8} {:>6} {:>10}\n",
                        x.site.name,
                        x.site.agent_addr,
                        x.hosts.len(),
                        x.hosts.iter().map(|h| h.free_vms).sum::<u32>(),
                        x.hosts.iter().map(|h| h.free_memory_mb).sum::<u64>()
                    );
                }
                s
            })
        }
        SiteCmd::Remove { name } => {
            c.site_remove(&name)?;
            print(json, &serde_json::json!({"removed": name}), |_| {
                format!("site {name} removed\n")
            })
        }
    }
}
