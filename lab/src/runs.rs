//! Run files: what a lab records so that a later process can remove what it left behind
//! when it was killed (SIGKILL leaves no chance to tear down).
//!
//! A lab that calls [`crate::Lab::record_run`] keeps `<run dir>/<prefix>.json` up to
//! date with its PID, the namespace prefix all its namespaces share (also those made by
//! processes it started, such as the agents' VM namespaces), its temp dir, and the PIDs
//! of the processes it started, each with its start time. The file goes once the lab is
//! torn down. [`clean_dead_runs`] treats a run whose process no longer exists (or whose
//! PID now belongs to a process started at another time) as dead and removes:
//!
//! - the recorded processes that still are the recorded ones (same PID and start time);
//! - every process inside a namespace named `<prefix>-...` (the prefix holds the dead
//!   run's PID and a sequence number, so no other run's namespace matches), then those
//!   namespaces, and with them their links;
//! - the temp dir, when its name is the one the lab gave it (`mvc-lab-<prefix>-...`);
//! - the run file.
//!
//! Runs still alive are left alone.
use serde::{Deserialize, Serialize};
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// What a run file holds.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The process that built the lab.
    pub pid: u32,
    /// Its start time ([`start_time`]).
    pub start_time: u64,
    /// Namespace prefix: every namespace of the run is `<prefix>-...`.
    pub prefix: String,
    /// The lab's temp dir (logs, keys, databases).
    pub dir: PathBuf,
    /// Processes the lab started: PID and start time.
    pub children: Vec<(u32, u64)>,
}

/// What [`clean_dead_runs`] removed for one dead run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// The dead run's namespace prefix.
    pub prefix: String,
    /// Its PID.
    pub pid: u32,
    /// Processes killed (recorded ones and those inside its namespaces).
    pub processes: usize,
    /// Namespaces deleted.
    pub namespaces: usize,
    /// Whether its temp dir was removed.
    pub dir_removed: bool,
}

/// Start time of process `pid` in clock ticks since boot (field 22 of
/// `/proc/PID/stat`), or `None` when there is no such process or it has exited and
/// only waits to be reaped (a zombie).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: skip past its last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    // Field 3, the state: Z (zombie) and X (dead) have exited.
    if matches!(fields.next(), Some("Z" | "X") | None) {
        return None;
    }
    fields.nth(18)?.parse().ok()
}

/// Whether `pid` still is the process that started at `start`.
pub fn is_same_process(pid: u32, start: u64) -> bool {
    pid > 0 && start_time(pid) == Some(start)
}

impl RunRecord {
    /// Whether the run's process is alive.
    pub fn alive(&self) -> bool {
        is_same_process(self.pid, self.start_time)
    }

    /// Writes the record to `path` (a temp file renamed over it, so readers never see
    /// half a record).
    pub fn write(&self, path: &Path) -> io::Result<()> {
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, path)
    }

    /// Reads a record.
    pub fn read(path: &Path) -> io::Result<RunRecord> {
        let text = std::fs::read(path)?;
        serde_json::from_slice(&text).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Signals a process the caller checked to be one of the run being cleaned up; whether
/// the signal was delivered.
fn signal_pid(pid: u32, sig: libc::c_int) -> bool {
    crate::sys::kill(pid, sig).is_ok()
}

/// Names under /run/netns that start with `<prefix>-`.
pub fn namespaces_with_prefix(prefix: &str) -> Vec<String> {
    let want = format!("{prefix}-");
    let mut v: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&want))
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// PIDs of the processes inside namespace `ns`.
pub fn pids_in_namespace(ns: &str) -> Vec<u32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .stderr(Stdio::null())
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Kills (SIGKILL) every process inside the namespaces `<prefix>-...` and deletes those
/// namespaces; returns (processes signalled, namespaces deleted).
pub fn remove_namespaces(prefix: &str) -> (usize, usize) {
    let mut killed = std::collections::BTreeSet::new();
    let names = namespaces_with_prefix(prefix);
    for ns in &names {
        for pid in pids_in_namespace(ns) {
            if signal_pid(pid, libc::SIGKILL) {
                killed.insert(pid);
            }
        }
    }
    let killed = killed.len();
    let mut deleted = 0;
    for ns in names.iter().rev() {
        // A process just killed may still hold a device busy for a moment.
        for attempt in 0..3 {
            let ok = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if ok {
                deleted += 1;
                break;
            }
            if attempt < 2 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    (killed, deleted)
}

/// Whether `prefix` is what [`crate::Lab::new`] makes in process `pid`:
/// `<letters><pid>x<seq>`. Only such a prefix is acted on, so a run file can never
/// make the cleanup touch namespaces named after another process.
pub fn is_lab_prefix(prefix: &str, pid: u32) -> bool {
    let rest = prefix.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    match rest.split_once('x') {
        Some((p, seq)) => {
            p == pid.to_string() && !seq.is_empty() && seq.bytes().all(|b| b.is_ascii_digit())
        }
        None => false,
    }
}

/// Whether `dir` is a temp dir the lab with `prefix` made (so removing it is safe).
fn is_lab_dir(dir: &Path, prefix: &str) -> bool {
    dir.is_absolute()
        && dir
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with(&format!("mvc-lab-{prefix}-")))
}

/// Removes what the dead runs recorded in `run_dir` left behind; live runs are left
/// alone. Unreadable run files are reported in the error list and kept.
pub fn clean_dead_runs(run_dir: &Path) -> (Vec<Cleaned>, Vec<String>) {
    let mut done = Vec::new();
    let mut errors = Vec::new();
    let Ok(rd) = std::fs::read_dir(run_dir) else {
        return (done, errors);
    };
    let mut files: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    for path in files {
        let rec = match RunRecord::read(&path) {
            Ok(r) => r,
            Err(e) => {
                errors.push(format!("run file {}: {e}", path.display()));
                continue;
            }
        };
        if rec.alive() {
            continue;
        }
        if !is_lab_prefix(&rec.prefix, rec.pid) {
            errors.push(format!(
                "run file {}: prefix '{}' is not one a lab of pid {} makes; left alone",
                path.display(),
                rec.prefix,
                rec.pid
            ));
            continue;
        }
        let mut c = Cleaned {
            prefix: rec.prefix.clone(),
            pid: rec.pid,
            ..Cleaned::default()
        };
        for &(pid, start) in &rec.children {
            if is_same_process(pid, start) && signal_pid(pid, libc::SIGKILL) {
                c.processes += 1;
            }
        }
        let (killed, deleted) = remove_namespaces(&rec.prefix);
        c.processes += killed;
        c.namespaces = deleted;
        if is_lab_dir(&rec.dir, &rec.prefix) && rec.dir.exists() {
            match std::fs::remove_dir_all(&rec.dir) {
                Ok(()) => c.dir_removed = true,
                Err(e) => errors.push(format!("removing {}: {e}", rec.dir.display())),
            }
        }
        let left = namespaces_with_prefix(&rec.prefix);
        if left.is_empty() {
            let _ = std::fs::remove_file(&path);
        } else {
            errors.push(format!(
                "run {}: namespaces still present: {}",
                rec.prefix,
                left.join(", ")
            ));
        }
        done.push(c);
    }
    (done, errors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_time_tells_processes_apart() {
        let me = std::process::id();
        let t = start_time(me).expect("own start time");
        assert!(is_same_process(me, t));
        assert!(!is_same_process(me, t + 1));
        assert!(!is_same_process(0, t));
        assert_eq!(start_time(u32::MAX), None);
    }

    #[test]
    fn a_live_run_is_left_alone_and_a_bad_file_is_kept() {
        let d = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let lab_dir = tempfile::Builder::new()
            .prefix(&format!("mvc-lab-zz{me}x0-"))
            .tempdir()
            .unwrap();
        let rec = RunRecord {
            pid: me,
            start_time: start_time(me).unwrap(),
            prefix: format!("zz{me}x0"),
            dir: lab_dir.path().into(),
            children: vec![],
        };
        let f = d.path().join(format!("zz{me}x0.json"));
        rec.write(&f).unwrap();
        assert_eq!(RunRecord::read(&f).unwrap(), rec);
        std::fs::write(d.path().join("bad.json"), "{").unwrap();
        let (done, errs) = clean_dead_runs(d.path());
        assert!(done.is_empty());
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(f.exists() && lab_dir.path().exists());
    }

    #[test]
    fn a_dead_runs_dir_and_file_go_but_only_a_lab_dir() {
        let d = tempfile::tempdir().unwrap();
        let me = std::process::id();
        let lab_dir = tempfile::Builder::new()
            .prefix(&format!("mvc-lab-zzdead{me}x0-"))
            .tempdir()
            .unwrap()
            .keep();
        let other = tempfile::tempdir().unwrap();
        // The same PID with another start time: a dead run whose PID was reused.
        let dead = RunRecord {
            pid: me,
            start_time: start_time(me).unwrap() + 1,
            prefix: format!("zzdead{me}x0"),
            dir: lab_dir.clone(),
            children: vec![(me, 1)],
        };
        dead.write(&d.path().join("zzdead.json")).unwrap();
        // A prefix not made from the run's pid is never acted on.
        let alien = RunRecord {
            prefix: "zz".into(),
            ..dead.clone()
        };
        alien.write(&d.path().join("zzalien.json")).unwrap();
        let odd = RunRecord {
            dir: other.path().into(),
            prefix: format!("zzodd{me}x1"),
            ..dead.clone()
        };
        odd.write(&d.path().join("zzodd.json")).unwrap();
        let (done, errs) = clean_dead_runs(d.path());
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(errs[0].contains("left alone"), "{errs:?}");
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|c| c.processes == 0 && c.namespaces == 0));
        assert!(!lab_dir.exists());
        assert!(other.path().exists(), "a dir the lab did not name is kept");
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "only the alien run file stays");
    }

    #[test]
    fn lab_prefixes_name_their_pid() {
        assert!(is_lab_prefix("mvcc123x0", 123));
        assert!(is_lab_prefix("123x45", 123));
        assert!(!is_lab_prefix("mvcc123x0", 12));
        assert!(!is_lab_prefix("mvcc1234x0", 123));
        assert!(!is_lab_prefix("mvcc123x", 123));
        assert!(!is_lab_prefix("mvcc123x0-", 123));
        assert!(!is_lab_prefix("", 123));
        assert!(!is_lab_prefix("m", 123));
    }
}
