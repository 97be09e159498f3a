//! xnbd: an NBD server (target mode) and a live-migration proxy that relocates a disk while
//! clients keep using it.
//!
//! - [`proto`]: the NBD wire format (pure codec, fuzzed).
//! - [`server`]: exports, listeners and connections; `server/negotiate.rs` (fixed newstyle
//!   option haggling, STARTTLS) and `server/transmit.rs` (the concurrent request loop).
//! - [`op`] and [`conn`]: what both sides share: an operation's outcome ([`op::OpError`],
//!   `op::blocking`) and the stream NBD runs over ([`conn::Conn`]).
//! - [`backend`]: what an export is served from (a file or the proxy).
//! - [`storage`] and [`sys`]: positional file I/O, hole punching, `SEEK_DATA`/`SEEK_HOLE`.
//! - [`client`]: the NBD client the proxy fetches with.
//! - [`bitmap`] and [`proxy`]: crash-safe cached-block bitmap, on-demand fetch, background
//!   copy, switch to target mode.
//! - [`ctl`]: the proxy's control socket.
//! - [`listen`] and [`budget`]: accept loops that outlive transient errors, connection and
//!   negotiation bounds, and the server's memory budget.
//! - [`lock`]: the exclusive lock a proxy holds on its cache and bitmap.
//!
//! See `docs/XNBD.md` for usage and design.

pub mod backend;
pub mod bitmap;
pub mod budget;
pub mod client;
pub mod conn;
pub mod ctl;
pub mod listen;
pub mod lock;
pub mod op;
pub mod proto;
pub mod proxy;
pub mod server;
pub mod storage;
pub mod sys;
