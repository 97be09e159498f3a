//! Placeholder; see README.
