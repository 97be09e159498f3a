//! `bench`: the project's end-to-end measurements, on the network lab of the `lab` crate.
//!
//! - [`wanem`]: the userspace WAN emulator (delay, jitter, loss, rate per direction).
//! - [`peers`]: the peer systems (kernel VXLAN, nebula, tinc, OpenVPN, boringtun) in a lab.
//!
//! The lab itself (namespaces, sites, the overlay and agents in them, teardown) is the
//! `lab` crate, which `mvc demo` and the integration tests share.

pub mod peers;
mod sys;
pub mod wanem;
