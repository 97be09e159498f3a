//! `mvc`: the one operator binary of a site frontend.
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "mvc",
    version,
    about = "Multi-site virtual clusters over an encrypted L2 overlay"
)]
enum Command {
    /// Joins this host to a community's private L2 network through a TAP device.
    Edge(dataplane::cli::EdgeCommand),
    /// Runs a rendezvous and relay point for edges (needs no secret).
    Supernode(dataplane::cli::SupernodeCommand),
}

fn main() -> anyhow::Result<()> {
    match Command::parse() {
        Command::Edge(c) => c.run()?,
        Command::Supernode(c) => c.run()?,
    }
    Ok(())
}
