//! `mvc demo` killed with SIGKILL or interrupted with SIGINT at several points: after
//! SIGKILL, `mvc demo --cleanup` (or the next run) removes the dead run's namespaces,
//! processes, links and temp dir; after SIGINT the run has removed them itself. One full
//! demo run at the end (the "next run") must succeed and leave nothing either. Needs
//! root; otherwise prints that it was skipped.
use lab::runs::{self, RunRecord};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn mvc() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_mvc"))
}

fn demo(run_dir: &Path, log: &Path, args: &[&str]) -> Child {
    let f = std::fs::File::create(log).unwrap();
    Command::new(mvc())
        .arg("demo")
        .args(args)
        .env("MVC_DEMO_RUN_DIR", run_dir)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap()
}

fn run_record(run_dir: &Path) -> Option<RunRecord> {
    let rd = std::fs::read_dir(run_dir).ok()?;
    rd.flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "json"))
        .and_then(|p| RunRecord::read(&p).ok())
}

/// Links of the root namespace whose names this project's labs and agents use.
fn root_links() -> BTreeSet<String> {
    let out = Command::new("ip").args(["-o", "link"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .filter(|n| n.starts_with("mv") || n.starts_with("veth"))
        .collect()
}

/// Processes whose command line names `needle`.
fn procs_naming(needle: &str) -> Vec<String> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if !e
            .file_name()
            .to_string_lossy()
            .bytes()
            .all(|b| b.is_ascii_digit())
        {
            continue;
        }
        let Ok(c) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let c = String::from_utf8_lossy(&c).replace('\0', " ");
        if c.contains(needle)
            && runs::start_time(e.file_name().to_string_lossy().parse().unwrap_or(0)).is_some()
        {
            v.push(format!("{} {c}", e.file_name().to_string_lossy()));
        }
    }
    v
}

/// Nothing of the run `rec` remains.
fn assert_gone(rec: &RunRecord, run_dir: &Path, links_before: &BTreeSet<String>) {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let ns = runs::namespaces_with_prefix(&rec.prefix);
        let procs = procs_naming(&rec.dir.display().to_string());
        let kids: Vec<_> = rec
            .children
            .iter()
            .filter(|(p, t)| runs::is_same_process(*p, *t))
            .collect();
        let new_links: Vec<String> = root_links().difference(links_before).cloned().collect();
        let left = format!(
            "namespaces {ns:?}, processes {procs:?}, recorded children alive {kids:?}, \
             root links {new_links:?}, temp dir {}, run file {}",
            rec.dir.exists(),
            run_dir.join(format!("{}.json", rec.prefix)).exists()
        );
        let clean = ns.is_empty()
            && procs.is_empty()
            && kids.is_empty()
            && new_links.is_empty()
            && !rec.dir.exists()
            && !run_dir.join(format!("{}.json", rec.prefix)).exists();
        if clean {
            return;
        }
        assert!(Instant::now() < end, "run {} left: {left}", rec.prefix);
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn wait_exit(c: &mut Child, limit: Duration) -> Option<i32> {
    let end = Instant::now() + limit;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return st.code();
        }
        if Instant::now() > end {
            let _ = c.kill();
            let _ = c.wait();
            panic!("mvc demo did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[derive(Clone, Copy, Debug)]
enum Point {
    /// Some namespaces made, agents not started yet.
    Building,
    /// Agents running, sites being added.
    AgentsUp,
    /// The cluster's VMs have their leases (edges, supernode, dnsmasq, VM namespaces).
    Leased,
}

/// Starts a demo and waits until it reaches `p`; returns it with its run record.
fn demo_at(run_dir: &Path, log: &Path, p: Point) -> (Child, RunRecord) {
    let mut c = demo(run_dir, log, &["--computes", "1:1:1"]);
    let end = Instant::now() + Duration::from_secs(120);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if let Some(rec) = run_record(run_dir) {
            let reached = match p {
                Point::Building => runs::namespaces_with_prefix(&rec.prefix).len() >= 3,
                Point::AgentsUp => text.contains("==> mvc site add"),
                Point::Leased => text.contains(" leased "),
            };
            if reached {
                // The record as it is now (the agents are in it from AgentsUp on).
                let rec = run_record(run_dir).unwrap_or(rec);
                return (c, rec);
            }
        }
        if let Ok(Some(st)) = c.try_wait() {
            panic!("mvc demo ended ({st}) before {p:?}:\n{text}");
        }
        assert!(
            Instant::now() < end,
            "mvc demo did not reach {p:?}:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn killed_or_interrupted_demo_leaves_nothing_after_cleanup_or_next_run() {
    if !lab::is_root() {
        lab::skip(
            "killed_or_interrupted_demo_leaves_nothing_after_cleanup_or_next_run",
            "needs root for network namespaces",
        );
        return;
    }
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("runs");
    let log = tmp.path().join("demo.log");
    let links_before = root_links();

    // A run file that cannot be read: --cleanup says so in one line and keeps it.
    std::fs::create_dir_all(&run_dir).unwrap();
    let bad = run_dir.join("bad.json");
    std::fs::write(&bad, "{").unwrap();
    let o = Command::new(mvc())
        .args(["demo", "--cleanup"])
        .env("MVC_DEMO_RUN_DIR", &run_dir)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 2, "{err}");
    assert!(lines[0].starts_with("no killed demo run"), "{err}");
    assert!(
        lines[1].starts_with(&format!("error: run file {}", bad.display())),
        "{err}"
    );
    assert!(bad.exists());
    std::fs::remove_file(&bad).unwrap();

    for p in [Point::Building, Point::AgentsUp, Point::Leased] {
        let (mut c, rec) = demo_at(&run_dir, &log, p);
        c.kill().unwrap();
        c.wait().unwrap();
        assert!(
            !runs::namespaces_with_prefix(&rec.prefix).is_empty() && rec.dir.exists(),
            "SIGKILL at {p:?} should leave something to clean up"
        );
        if matches!(p, Point::AgentsUp | Point::Leased) {
            assert_eq!(
                rec.children.len(),
                3,
                "the three agents are recorded: {rec:?}"
            );
        }
        let o = Command::new(mvc())
            .args(["demo", "--cleanup"])
            .env("MVC_DEMO_RUN_DIR", &run_dir)
            .env("RUST_BACKTRACE", "1")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            o.status.success(),
            "--cleanup after SIGKILL at {p:?}: {err}"
        );
        assert!(
            err.contains(&format!("removed what the killed demo run {}", rec.prefix)),
            "{err}"
        );
        assert_gone(&rec, &run_dir, &links_before);
        eprintln!(
            "SIGKILL at {p:?}: cleaned up ({:.0} s so far)",
            t0.elapsed().as_secs_f64()
        );
    }

    for p in [Point::AgentsUp, Point::Leased] {
        let (mut c, rec) = demo_at(&run_dir, &log, p);
        // SAFETY: kill(2) on our own child, not yet reaped.
        unsafe {
            libc::kill(c.id() as libc::pid_t, libc::SIGINT);
        }
        let code = wait_exit(&mut c, Duration::from_secs(60));
        assert_eq!(
            code,
            Some(130),
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        assert_gone(&rec, &run_dir, &links_before);
        eprintln!(
            "SIGINT at {p:?}: torn down ({:.0} s so far)",
            t0.elapsed().as_secs_f64()
        );
    }

    // A run killed with its cluster up, then the next full run: it cleans up first,
    // succeeds, and afterwards nothing of either run remains.
    let (mut c, dead) = demo_at(&run_dir, &log, Point::Leased);
    c.kill().unwrap();
    c.wait().unwrap();
    let mut next = demo(&run_dir, &log, &["--computes", "1:1:1"]);
    let prefix = format!("mvcc{}x0", next.id());
    let code = wait_exit(&mut next, Duration::from_secs(300));
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains(&format!("removed what the killed demo run {}", dead.prefix)),
        "{text}"
    );
    assert!(text.contains("==> mvc cluster destroy demo"), "{text}");
    // Each progress step of `cluster create --start` is printed once.
    let steps: Vec<&str> = text.lines().filter(|l| l.starts_with("mvc: ")).collect();
    let uniq: BTreeSet<&&str> = steps.iter().collect();
    assert_eq!(uniq.len(), steps.len(), "a step printed twice:\n{text}");
    assert_gone(&dead, &run_dir, &links_before);
    assert!(runs::namespaces_with_prefix(&prefix).is_empty());
    assert!(std::fs::read_dir(&run_dir).unwrap().next().is_none());
    assert!(procs_naming(&format!("mvc-lab-{prefix}-")).is_empty());
    eprintln!("done in {:.0} s", t0.elapsed().as_secs_f64());
}
