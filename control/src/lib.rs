//! The multi-site virtual cluster controller and its per-site agent.
//!
//! - [`store`]: the controller's SQLite state behind the [`store::Store`] trait.
//! - [`model`]: records shared by store, agent protocol and commands.
pub mod agent;
pub mod auth;
pub mod channel;
pub mod client;
pub mod controller;
#[cfg(feature = "demo")]
pub mod demo;
pub mod driver;
pub mod model;
pub mod proto;
pub mod store;
