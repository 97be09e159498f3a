//! The agent's store of reservations: one small file per reservation,
//! `<state>/reservations/c<n>.json`, so that a change costs what the reservation it
//! touches costs, not what every reservation of the agent costs.
//!
//! Each file is written whole to `c<n>.json.tmp`, synced, renamed over `c<n>.json`, and
//! the directory synced ([`crate::atomic_file`]); a removal unlinks the file and syncs the directory. A process
//! killed at any point (`kill -9`, a crash, the failpoints) therefore leaves every
//! reservation either as it was before the change or as it is after it, never a torn
//! file: the rename is the commit. A `*.tmp` found at start is a write that never
//! committed and is deleted.
//!
//! Before version 3 the agent kept every reservation in one `state.json` (version 2),
//! rewritten whole on every change. When that file is found it is migrated: each of its
//! reservations is written as its own file, files it does not name are removed, then it
//! is renamed to `state.json.migrated` (kept for the operator, never read again). A crash
//! during the migration leaves `state.json` in place, and the next start migrates again
//! from it (it stays the authority until renamed). A `state.json` of version 1 is still
//! refused, as before.
//!
//! Rejected: a journal (one append per change, compacted at start) costs the same fsync
//! per change and needs its own framing and torn-tail handling; SQLite would do, but the
//! agent's reservations are few and independent, and a file each keeps them readable
//! with `cat` when an operator repairs a site by hand.
use super::{AgentError, ClusterHere};
use crate::atomic_file::{self, Durability, Step};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// Version of a reservation file.
pub(super) const VERSION: u32 = 3;
/// Version of the old single `state.json` that is migrated.
const OLD_VERSION: u32 = 2;

/// The directory of the reservation files in a state directory.
pub fn reservations_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("reservations")
}

#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    n: u32,
    cluster: ClusterHere,
}

#[derive(Deserialize)]
struct Header {
    version: u32,
    n: u32,
}

#[derive(Serialize)]
struct FileRef<'a> {
    version: u32,
    n: u32,
    cluster: &'a ClusterHere,
}

#[derive(Deserialize)]
struct OldState {
    version: u32,
    #[serde(default)]
    clusters: BTreeMap<u32, ClusterHere>,
}

/// The reservation files of one agent, and what was last written to each (a change is
/// written only when its bytes differ).
pub(super) struct Reservations {
    dir: PathBuf,
    written: HashMap<u32, Vec<u8>>,
    /// Of writes and removals ([`Durability::Deferred`]: the caller syncs the
    /// filesystem after them).
    durability: Durability,
}

fn file_err(path: &Path) -> impl Fn(std::io::Error) -> AgentError + '_ {
    move |err| AgentError::File {
        path: path.into(),
        err,
    }
}

/// Sync directory `dir` (a rename or unlink in it is durable after this).
fn sync_dir(dir: &Path) -> Result<(), AgentError> {
    atomic_file::sync_dir(dir).map_err(file_err(dir))
}

impl Reservations {
    /// Open the store of `state_dir` and read every reservation, migrating an old
    /// `state.json` first when there is one.
    pub(super) fn open(
        state_dir: &Path,
    ) -> Result<(Reservations, BTreeMap<u32, ClusterHere>), AgentError> {
        let dir = reservations_dir(state_dir);
        std::fs::create_dir_all(&dir).map_err(file_err(&dir))?;
        let mut r = Reservations {
            dir,
            written: HashMap::new(),
            durability: Durability::Synced,
        };
        let all = r.read_all()?;
        let old = state_dir.join("state.json");
        let text = match std::fs::read_to_string(&old) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((r, all)),
            Err(err) => return Err(AgentError::File { path: old, err }),
        };
        let state = match serde_json::from_str::<OldState>(&text) {
            Ok(s) if s.version == OLD_VERSION => s,
            _ => {
                return Err(AgentError::Config(format!(
                    "{}: not a version {OLD_VERSION} agent state (an older agent wrote it?); \
                     release its clusters with that agent, or move the file away",
                    old.display()
                )))
            }
        };
        // Written without a sync each, then the whole filesystem synced once: until
        // `state.json` is renamed it stays the authority, so a crash in between only
        // means migrating again.
        r.durability = Durability::Deferred;
        let wrote = r.sync_all(&state.clusters);
        r.durability = Durability::Synced;
        wrote?;
        let d = std::fs::File::open(&r.dir).map_err(file_err(&r.dir))?;
        crate::sys::syncfs(&d).map_err(file_err(&r.dir))?;
        let done = state_dir.join("state.json.migrated");
        std::fs::rename(&old, &done).map_err(file_err(&old))?;
        sync_dir(state_dir)?;
        tracing::info!(
            reservations = state.clusters.len(),
            "migrated {} to one file per reservation in {}",
            old.display(),
            r.dir.display()
        );
        Ok((r, state.clusters))
    }

    fn path(&self, n: u32) -> PathBuf {
        self.dir.join(format!("c{n}.json"))
    }

    /// Every reservation file; leftovers of writes that never committed are deleted.
    fn read_all(&mut self) -> Result<BTreeMap<u32, ClusterHere>, AgentError> {
        let mut all = BTreeMap::new();
        let rd = std::fs::read_dir(&self.dir).map_err(file_err(&self.dir))?;
        for e in rd {
            let e = e.map_err(file_err(&self.dir))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            if name.ends_with(".tmp") {
                std::fs::remove_file(&path).map_err(file_err(&path))?;
                continue;
            }
            let Some(n) = name
                .strip_prefix('c')
                .and_then(|x| x.strip_suffix(".json"))
                .and_then(|x| x.parse::<u32>().ok())
            else {
                continue;
            };
            let bytes = std::fs::read(&path).map_err(file_err(&path))?;
            let parse = |err| AgentError::Parse {
                path: path.clone(),
                err,
            };
            // The version first: a later agent's file is refused by name, not by field.
            let h: Header = serde_json::from_slice(&bytes).map_err(parse)?;
            if h.version != VERSION || h.n != n {
                return Err(AgentError::Config(format!(
                    "{}: not a version {VERSION} reservation numbered {n}; \
                     move the file away if it is not this agent's",
                    path.display()
                )));
            }
            let f: File = serde_json::from_slice(&bytes).map_err(parse)?;
            self.written.insert(n, bytes);
            all.insert(n, f.cluster);
        }
        Ok(all)
    }

    /// Write reservation `n` when it differs from what its file holds.
    pub(super) fn put(&mut self, n: u32, cluster: &ClusterHere) -> Result<(), AgentError> {
        let path = self.path(n);
        let bytes = serde_json::to_vec_pretty(&FileRef {
            version: VERSION,
            n,
            cluster,
        })
        .map_err(|err| AgentError::Parse {
            path: path.clone(),
            err,
        })?;
        if self.written.get(&n) == Some(&bytes) {
            return Ok(());
        }
        self.write(&path, &bytes)?;
        self.written.insert(n, bytes);
        Ok(())
    }

    fn write(&self, path: &Path, bytes: &[u8]) -> Result<(), AgentError> {
        let crash_point = |step| {
            crate::failpoint::hit(match step {
                Step::Written => "state-file-synced",
                Step::Renamed => "state-file-renamed",
            })
        };
        atomic_file::write_with(path, bytes, 0o600, self.durability, &crash_point)
            .map_err(file_err(path))
    }

    /// Remove reservation `n`'s file (nothing when there is none).
    pub(super) fn remove(&mut self, n: u32) -> Result<(), AgentError> {
        let path = self.path(n);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(err) => return Err(AgentError::File { path, err }),
        }
        self.written.remove(&n);
        match self.durability {
            Durability::Synced => sync_dir(&self.dir),
            Durability::Deferred => Ok(()),
        }
    }

    /// Make the files hold exactly `all`: changed reservations written, the files of
    /// reservations no longer in it removed. Serialises every reservation to find the
    /// changed ones; a change to one known reservation is [`Reservations::put`].
    pub(super) fn sync_all(&mut self, all: &BTreeMap<u32, ClusterHere>) -> Result<(), AgentError> {
        for (n, c) in all {
            self.put(*n, c)?;
        }
        let gone: Vec<u32> = self
            .written
            .keys()
            .filter(|n| !all.contains_key(n))
            .copied()
            .collect();
        for n in gone {
            self.remove(n)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> ClusterHere {
        ClusterHere {
            name: name.into(),
            owner: "k".into(),
            bridge: "mvb1".into(),
            tap: "mvt1".into(),
            ..ClusterHere::default()
        }
    }

    fn old(clusters: &[(u32, &str)]) -> String {
        let m: BTreeMap<String, ClusterHere> = clusters
            .iter()
            .map(|(n, c)| (n.to_string(), cluster(c)))
            .collect();
        serde_json::json!({"version": 2, "clusters": m}).to_string()
    }

    #[test]
    fn old_state_json_is_migrated_once_even_after_a_crash_midway() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("state.json"), old(&[(1, "a"), (7, "b")])).unwrap();
        // What a migration cut short leaves: a file it wrote, one it did not commit,
        // and one no reservation of the old file names.
        let r = reservations_dir(d.path());
        std::fs::create_dir_all(&r).unwrap();
        {
            let (mut s, _) = Reservations::open(&d.path().join("none")).unwrap();
            s.dir = r.clone();
            s.put(1, &cluster("a")).unwrap();
            s.put(9, &cluster("stray")).unwrap();
        }
        std::fs::write(r.join("c7.json.tmp"), "{").unwrap();
        let (_, all) = Reservations::open(d.path()).unwrap();
        let names: Vec<(u32, String)> = all.iter().map(|(n, c)| (*n, c.name.clone())).collect();
        assert_eq!(names, [(1, "a".to_string()), (7, "b".to_string())]);
        assert!(!d.path().join("state.json").exists());
        assert!(d.path().join("state.json.migrated").exists());
        let mut files: Vec<String> = std::fs::read_dir(&r)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        files.sort();
        assert_eq!(files, ["c1.json", "c7.json"]);
        // Read back from the files alone; a change and a removal stick.
        let (mut s, all) = Reservations::open(d.path()).unwrap();
        assert_eq!(all.len(), 2);
        let mut b = all[&7].clone();
        b.lease_until = Some(5);
        s.put(7, &b).unwrap();
        s.remove(1).unwrap();
        let (_, all) = Reservations::open(d.path()).unwrap();
        assert_eq!(all.keys().copied().collect::<Vec<_>>(), [7]);
        assert_eq!(all[&7].lease_until, Some(5));
    }

    #[test]
    fn unknown_versions_are_refused_not_rewritten() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        std::fs::write(&p, r#"{"version": 1, "clusters": {}}"#).unwrap();
        let e = Reservations::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("not a version 2"), "{e}");
        assert!(p.exists());
        std::fs::remove_file(&p).unwrap();
        let f = reservations_dir(d.path()).join("c3.json");
        std::fs::write(&f, r#"{"version": 4, "n": 3, "cluster": {}}"#).unwrap();
        let e = Reservations::open(d.path()).err().unwrap().to_string();
        assert!(e.contains("not a version 3"), "{e}");
        std::fs::write(&f, "{").unwrap();
        assert!(Reservations::open(d.path()).is_err());
    }
}
