//! The multi-site virtual cluster controller and its per-site agent (docs/CONTROLLER.md).
//!
//! - [`atomic_file`]: files written whole or not at all (agent keys, secrets, reservations).
//! - [`store`]: the controller's SQLite state behind the [`store::Store`] trait, and
//!   the MAC allocator.
//! - [`listing`]: every cluster as `cluster list --json` prints it, text in one buffer.
//! - [`model`]: records shared by store, agent protocol and commands.
//! - [`auth`]: user and agent keys, signed requests, replay window, site authorisations.
//! - [`channel`]: the encrypted channel to an agent, pinned to its key.
//! - [`claims`]: host-wide claims on the names agents of one machine allocate.
//! - [`proto`]: the requests an agent serves.
//! - [`agent`]: `mvc agent`, reservations and VM/overlay lifecycle at a site.
//! - [`client`]: the controller's side of the agent protocol.
//! - [`driver`]: VM drivers (`netns`, `qemu`) and the qemu guest's boot files.
//! - [`process`]: running, spawning and stopping helper processes.
//! - [`failpoint`]: test-only crash points of the agent.
//! - [`guest_proto`]: the frames between the agent and the guest agent in a qemu guest.
//! - [`bounded_exec`]: a command run with bounded output and time (agent and guest agent).
//! - [`controller`]: the operations behind `mvc site|cluster|vm`.
//! - [`sys`]: the system calls std does not wrap (signals, file locks).
//! - [`validate`]: checks of names, counts and addresses where they enter.
//! - `demo` (feature `demo`): `mvc demo` and the integration tests' three-site lab.
pub mod agent;
pub mod atomic_file;
pub mod auth;
pub mod bounded_exec;
pub mod channel;
pub mod claims;
pub mod client;
pub mod controller;
#[cfg(feature = "demo")]
pub mod demo;
pub mod driver;
pub mod failpoint;
pub mod guest_proto;
pub mod listing;
pub mod migrate;
pub mod model;
pub mod process;
pub mod proto;
pub mod stack;
pub mod store;
pub mod sys;
pub mod validate;
