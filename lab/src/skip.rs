//! How a test that cannot run on this machine says so.
//!
//! `cargo test` shows a test that returned early as passed, and keeps what it printed to
//! itself. So a test that skips calls [`skip`] (or [`skip_unsupported`]) and returns: it
//! prints `SKIPPED <test>: <reason>` and, when the environment variable [`LOG_VAR`] names a
//! file, appends one line to it. `.ci/test` points that variable at a fresh file, lists its
//! lines after `cargo test`, and fails a run as root in which a test skipped with [`skip`].
//!
//! Line format: `<kind> <test>: <reason>`, kind `required` (what a root machine set up by
//! `.ci/setup-deps` has: root, the installed tools) or `unsupported` (what no setup step
//! can give: a device node the container lacks, a kernel that refuses a mount).

use std::io::Write as _;
use std::path::Path;

/// The environment variable naming the skip log.
pub const LOG_VAR: &str = "MVC_SKIP_LOG";

/// Skips for a reason a root machine set up by `.ci/setup-deps` never has: not root, a
/// tool of the setup missing, a build of the XDP program missing. CI fails a root run
/// with such a skip.
pub fn skip(test: &str, reason: &str) {
    record("required", test, reason);
}

/// Skips because the machine lacks something no setup step provides (a device node, a
/// kernel feature): listed by CI, not counted against the run.
pub fn skip_unsupported(test: &str, reason: &str) {
    record("unsupported", test, reason);
}

/// The name of the running test: libtest runs each test on a thread named after it
/// (`module::test_name`). Falls back to "unnamed test" elsewhere.
pub fn current_test() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .unwrap_or("unnamed test")
        .to_string()
}

fn record(kind: &str, test: &str, reason: &str) {
    let log = std::env::var_os(LOG_VAR).filter(|p| !p.is_empty());
    if let Err(e) = record_to(log.as_deref().map(Path::new), kind, test, reason) {
        // A skip that cannot be recorded must not pass unseen in CI.
        panic!("{LOG_VAR}: {e}");
    }
}

fn record_to(log: Option<&Path>, kind: &str, test: &str, reason: &str) -> std::io::Result<()> {
    // One line whatever the reason holds (a tool's multi-line error).
    let reason = reason.split_whitespace().collect::<Vec<_>>().join(" ");
    eprintln!("SKIPPED {test}: {reason}");
    let Some(path) = log else {
        return Ok(());
    };
    // One write of one line in append mode: lines of concurrent tests do not interleave.
    let line = format!("{kind} {test}: {reason}\n");
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_append_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("skips");
        record_to(Some(&log), "required", "a::t1", "needs root").unwrap();
        record_to(
            Some(&log),
            "unsupported",
            "t2",
            "no /dev/fuse:\n  mount failed",
        )
        .unwrap();
        record_to(None, "required", "t3", "not logged").unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        assert_eq!(
            text,
            "required a::t1: needs root\nunsupported t2: no /dev/fuse: mount failed\n"
        );
        let e = record_to(Some(&dir.path().join("no/such/dir")), "required", "t", "r");
        assert!(e.unwrap_err().to_string().contains("no/such/dir"));
    }

    #[test]
    fn current_test_is_the_thread_name() {
        assert!(
            current_test().ends_with("current_test_is_the_thread_name"),
            "{}",
            current_test()
        );
    }
}
