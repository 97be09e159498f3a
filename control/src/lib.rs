//! The multi-site virtual cluster controller and its per-site agent (docs/CONTROLLER.md).
//!
//! - [`store`]: the controller's SQLite state behind the [`store::Store`] trait, and
//!   the MAC allocator.
//! - [`model`]: records shared by store, agent protocol and commands.
//! - [`auth`]: user and agent keys, signed requests, replay window, site authorisations.
//! - [`channel`]: the encrypted channel to an agent, pinned to its key.
//! - [`proto`]: the requests an agent serves.
//! - [`agent`]: `mvc agent`, reservations and VM/overlay lifecycle at a site.
//! - [`client`]: the controller's side of the agent protocol.
//! - [`driver`]: VM drivers (`netns`, `qemu`).
//! - [`failpoint`]: test-only crash points of the agent.
//! - [`guest`]: kernel and initramfs of the qemu driver's guest.
//! - [`controller`]: the operations behind `mvc site|cluster|vm`.
//! - [`validate`]: checks of names, counts and addresses where they enter.
//! - `demo` (feature `demo`): `mvc demo` and the integration tests' three-site lab.
pub mod agent;
pub mod auth;
pub mod channel;
pub mod client;
pub mod controller;
#[cfg(feature = "demo")]
pub mod demo;
pub mod driver;
pub mod failpoint;
pub mod guest;
pub mod migrate;
pub mod model;
pub mod proto;
pub mod store;
pub mod validate;
