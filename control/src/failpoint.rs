//! Test-only crash points: when the environment variable `MVC_AGENT_FAILPOINT` names a
//! point, the process aborts there (no destructors, no cleanup: what `kill -9` at that
//! moment leaves behind). The crash tests use it to stop an agent between two steps
//! of creating a cluster; nothing else sets it.
use std::sync::OnceLock;

/// The variable naming the point to abort at.
pub const ENV: &str = "MVC_AGENT_FAILPOINT";

/// The points an agent may abort at, in the order a cluster's life reaches them.
pub const POINTS: &[&str] = &[
    "reserve-saved",
    "confirm-saved",
    "overlay-bridge",
    "overlay-edge",
    "vm-netns",
    "vm-veth",
    "vm-started",
    "release-begin",
];

/// Abort the process when [`ENV`] names `point`.
pub fn hit(point: &str) {
    static WANTED: OnceLock<Option<String>> = OnceLock::new();
    if WANTED.get_or_init(|| std::env::var(ENV).ok()).as_deref() == Some(point) {
        eprintln!("failpoint {point}: aborting");
        std::process::abort();
    }
}
