//! `bench`: the project's end-to-end measurements, on the network lab of the `lab` crate.
//!
//! - [`wanem`]: the userspace WAN emulator (delay, jitter, loss, rate per direction).
//! - [`peers`]: the peer systems (kernel VXLAN, nebula, tinc, OpenVPN, boringtun, gotatun)
//!   in a lab.
//! - [`storescale`]: the controller's store filled with synthetic rows (`bench scale-store`).
//! - [`sockperf`]: UDP request/reply latency with `sockperf ping-pong`.
//! - [`scale`]: thousands of edge and supernode cores on a simulated network (`bench scale`).
//!
//! The lab itself (namespaces, sites, the overlay and agents in them, teardown) is the
//! `lab` crate, which `mvc demo` and the integration tests share.

pub mod peers;
pub mod scale;
pub mod sockperf;
pub mod storescale;
mod sys;
pub mod wanem;

pub use sys::{allocated_bytes, thread_cpu_time, CountingAlloc};
