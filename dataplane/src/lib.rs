//! The encrypted L2 overlay of MVC: edges attach a TAP device to a community, supernodes
//! introduce edges to each other and relay when there is no direct path.
//!
//! Layout: pure cores ([`wire`], [`crypto`], [`replay`], [`edge`], [`supernode`]) take
//! `now` and caller buffers and do no I/O; [`io`] holds the sockets, TAP device and
//! io_uring; [`cli`] wires them into `mvc edge` and `mvc supernode`.

pub mod cli;
pub mod crypto;
pub mod edge;
pub mod eth;
pub mod io;
pub mod l2;
pub mod offload;
pub mod outbox;
pub mod replay;
pub mod snkey;
pub mod status;
pub mod supernode;
pub mod wire;
pub mod xdp;
