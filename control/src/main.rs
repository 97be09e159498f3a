//! `mvc`: the one operator binary of a site frontend.
use clap::Parser;

#[derive(Parser)]
#[command(
    name = "mvc",
    version,
    about = "Multi-site virtual clusters over an encrypted L2 overlay"
)]
enum Command {}

fn main() -> anyhow::Result<()> {
    match Command::parse() {}
}
