//! `bench`: the project's network lab and its end-to-end measurements.
//!
//! - [`lab`]: network namespaces, veth, bridges, NAT routers and "VM" namespaces, with
//!   background processes and teardown on drop, panic and signals. The overlay's lab tests
//!   (`control/tests/overlay_lab.rs`) and the `bench` binary build on it.
//! - [`overlay`]: starting `mvc supernode`/`mvc edge` and Debian's n2n 1.3.1 in a lab, and
//!   reading their status.
//! - [`wanem`]: the userspace WAN emulator (delay, jitter, loss, rate per direction).
//! - [`dhcp`]: a minimal DHCP client, to check that leases cross the overlay.
//! - [`peers`]: the peer systems (kernel VXLAN, nebula, tinc, OpenVPN, boringtun) in a lab.
//! - [`sites`]: three sites with an `mvc agent` each and the controller on site A: the
//!   lab of `mvc demo`, the controller's integration tests and `bench build-time`.
//! - [`runs`]: run files, and the cleanup of what a killed lab left behind.
//! - [`cpu`]: CPU time of processes and of the kernel over a measured interval.

pub mod cpu;
pub mod dhcp;
pub mod lab;
pub mod overlay;
pub mod peers;
pub mod runs;
pub mod sites;
mod sys;
pub mod wanem;
