//! `bench`: builds the network-namespace lab and runs the project's measurements.
//!
//! - `bench overlay`: iperf3 and ping VM -> VM over the raw underlay, this overlay, n2n and
//!   the peers (VXLAN, nebula, tinc, OpenVPN, boringtun); `--small` for small frames.
//! - `bench demo`: the three-site overlay demo (the README's main job).
//! - `bench wanem`: the userspace WAN emulator's self-check.
//! - `bench dock`: a DOCK-like autodock-vina parameter study, a Slurm job array across three
//!   sites, against delay.
//! - `bench build-time`: three-site cluster build time through the controller against delay.
//! - `bench report`: the latest result of every run on one dated page.
//! - `bench broadcast`: what a three-site cluster build floods across the WAN, with the L2
//!   control plane on and off.
//! - `bench scale`: edges and supernodes by the thousand on a simulated network: cost curves.
//! - `bench scale-store`: the controller's store at 1,000 sites and 100,000 VMs: call times.
//! - `bench hpl`: HPL (hpcc, OpenMPI) on 1..N nodes over the overlay and the raw underlay.
//! - `bench migrate`: live migration of a qemu VM between sites against WAN delay and disk
//!   size: downtime, WAN bytes, the guest's disk reads during and after the move.
//! - `bench limits`: AES-GCM, ChaCha20-Poly1305 and memcpy bytes per second on one core.

mod cmd;
mod plot;

use clap::Parser;

// Counts live bytes, so `bench scale` can measure the cores' tables.
#[global_allocator]
static ALLOC: bench::CountingAlloc = bench::CountingAlloc;

#[derive(Parser)]
#[command(
    name = "bench",
    version,
    about = "Lab builder and end-to-end measurements of mvc"
)]
enum Command {
    /// Throughput and RTT (or with --small: small-frame rate and CPU cost) VM -> VM: raw
    /// underlay, mvc (ciphers, direct/relayed, TAP/XDP), n2n 1.3.1, VXLAN, nebula, tinc,
    /// OpenVPN, boringtun.
    Overlay(cmd::overlay::Args),
    /// One throughput/RTT-against-delay figure from several `bench overlay --delay` results.
    Plot(cmd::overlay::PlotArgs),
    /// Three sites joined by mvc: pings, iperf3 and status tables, then teardown.
    Demo(cmd::demo::Args),
    /// WAN broadcast frames and bytes per site while N VMs per site meet each other, with
    /// the L2 control plane on and off.
    Broadcast(cmd::broadcast::Args),
    /// The userspace WAN emulator: run a link, or check it against its settings.
    #[command(subcommand)]
    Wanem(cmd::wanem::Cmd),
    /// xnbd: target mode against nbdkit and qemu-nbd; proxy latency, relocation, figure 7.
    Nbd(cmd::nbd::Args),
    /// HPL (hpcc with OpenMPI) on 1..N nodes over the overlay and the raw underlay (figure 13).
    Hpl(cmd::hpl::Args),
    /// DOCK-like autodock-vina parameter study over three sites against WAN delay (figure 12).
    Dock(cmd::dock::Args),
    /// Live migration of a qemu VM between two sites against WAN delay and disk size,
    /// the disk after the switch (xnbd proxy) or before it (--precopy-disk).
    Migrate(cmd::migrate::Args),
    /// Three-site cluster build time through the controller against WAN delay (figure 9).
    BuildTime(cmd::buildtime::Args),
    /// The latest result of every run in results/ on one dated page (markdown and HTML).
    Report(cmd::report::Args),
    /// Edges and supernodes by the thousand on a simulated network: memory, CPU, fan-out and
    /// convergence against the number of edges.
    Scale(cmd::scale::Args),
    /// The controller's store with synthetic sites, clusters and VMs: time of each call.
    ScaleStore(cmd::scale::StoreArgs),
    /// What one core does without I/O: AEAD sealing/opening and memcpy, bytes per second
    /// (the physical limit of the edge's data path on this machine).
    Limits(cmd::limits::Args),
}

fn main() -> anyhow::Result<()> {
    lab::install_signal_teardown()?;
    match Command::parse() {
        Command::Overlay(a) => cmd::overlay::run(&a),
        Command::Plot(a) => cmd::overlay::plot(&a),
        Command::Demo(a) => cmd::demo::run(&a),
        Command::Broadcast(a) => cmd::broadcast::run(&a),
        Command::Wanem(cmd::wanem::Cmd::Link(a)) => cmd::wanem::link(&a),
        Command::Wanem(cmd::wanem::Cmd::Check(a)) => cmd::wanem::check(&a),
        Command::Nbd(a) => cmd::nbd::run(&a),
        Command::Hpl(a) => cmd::hpl::run(&a),
        Command::Dock(a) => cmd::dock::run(&a),
        Command::Report(a) => cmd::report::run(&a),
        Command::BuildTime(a) => cmd::buildtime::run(&a),
        Command::Migrate(a) => cmd::migrate::run(&a),
        Command::Scale(a) => cmd::scale::run(&a),
        Command::ScaleStore(a) => cmd::scale::store(&a),
        Command::Limits(a) => cmd::limits::run(&a),
    }
}
