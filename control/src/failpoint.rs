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

/// Points inside the write of one reservation file (any reservation, any request): the
/// temporary file written and synced, then renamed over the reservation's file. Not in
/// [`POINTS`]: they are hit by every change, not at one step of a cluster's life.
pub const STORE_POINTS: &[&str] = &["state-file-synced", "state-file-renamed"];

/// Abort the process when [`ENV`] names `point`.
pub fn hit(point: &str) {
    static WANTED: OnceLock<Option<String>> = OnceLock::new();
    if WANTED.get_or_init(|| std::env::var(ENV).ok()).as_deref() == Some(point) {
        eprintln!("failpoint {point}: aborting");
        std::process::abort();
    }
}
