//! Placeholder; see README.

pub mod xdp;
