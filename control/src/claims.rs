//! Host-wide claims on the names agents allocate.
//!
//! Each agent numbers its reservations from its own store, but several agents may run
//! on one machine (one per site in a test lab, or one per admin), and what they name is
//! shared there: links (`mvb<n>`, `mvt<n>`, `mvv<n>-<i>`) within a network namespace,
//! VM namespaces (`/run/netns`) and UDP ports across it. So before an agent records a
//! cluster number or a supernode port, it claims it in a directory every agent of the
//! machine uses (default [`DEFAULT_DIR`]): one file per claimed name (`n<number>`,
//! `port<port>`), created with `O_EXCL`, holding the claiming agent's state directory.
//!
//! A claim is released when its reservation is; an agent's reconcile (at start and
//! `mvc agent gc`) releases claims that name its state directory but not its store
//! (a crash between claiming and recording, or between forgetting and releasing). A
//! claim whose state directory no longer exists is stale: its agent is gone for good,
//! the next agent to want the name takes it, and any agent's reconcile removes it. Claiming, releasing and sweeping hold
//! an exclusive lock on `<dir>/.lock`, so a stale claim cannot be taken twice.
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The claim directory agents use unless told otherwise (`--claims-dir`).
pub const DEFAULT_DIR: &str = "/run/mvc/claims";

/// A failure to read or write the claim directory.
#[derive(Debug, thiserror::Error)]
#[error("claims {}: {err}", path.display())]
pub struct ClaimError {
    /// The file or directory.
    pub path: PathBuf,
    /// What went wrong.
    pub err: std::io::Error,
}

/// One agent's view of the machine's claim directory.
#[derive(Clone, Debug)]
pub struct Claims {
    dir: PathBuf,
    owner: PathBuf,
}

/// Who holds a claim.
enum Holder {
    Nobody,
    Us,
    /// Another agent whose state directory exists.
    Other,
    /// An agent whose state directory is gone.
    Stale,
}

impl Claims {
    /// Claims in `dir` made for the agent whose (absolute) state directory is `owner`.
    pub fn new(dir: &Path, owner: &Path) -> Claims {
        Claims {
            dir: dir.into(),
            owner: owner.into(),
        }
    }

    /// The claim directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn err(&self, path: &Path) -> impl FnOnce(std::io::Error) -> ClaimError {
        let path = path.to_path_buf();
        move |err| ClaimError { path, err }
    }

    /// The directory made if needed, and its lock held until the file is dropped.
    fn lock(&self) -> Result<File, ClaimError> {
        std::fs::create_dir_all(&self.dir).map_err(self.err(&self.dir))?;
        let p = self.dir.join(".lock");
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&p)
            .map_err(self.err(&p))?;
        crate::sys::lock_exclusive(&f).map_err(self.err(&p))?;
        Ok(f)
    }

    fn holder(&self, name: &str) -> Holder {
        match std::fs::read_to_string(self.dir.join(name)) {
            Err(_) => Holder::Nobody,
            Ok(t) => {
                let who = Path::new(t.trim_end_matches('\n'));
                if who == self.owner {
                    Holder::Us
                } else if !who.as_os_str().is_empty() && who.is_dir() {
                    Holder::Other
                } else {
                    Holder::Stale
                }
            }
        }
    }

    /// Claim the first of `names` that no other agent holds and that `free` accepts
    /// (checked with the claim in hand: e.g. no device of that name exists). A claim
    /// this agent already holds counts as free (the caller passes only names its store
    /// does not use). Returns the name claimed, or `None` when none is left.
    pub fn claim_first(
        &self,
        names: impl IntoIterator<Item = String>,
        free: impl Fn(&str) -> bool,
    ) -> Result<Option<String>, ClaimError> {
        let _lock = self.lock()?;
        for name in names {
            let path = self.dir.join(&name);
            match self.holder(&name) {
                Holder::Other => continue,
                Holder::Stale => std::fs::remove_file(&path).map_err(self.err(&path))?,
                Holder::Us => {
                    if free(&name) {
                        return Ok(Some(name));
                    }
                    continue;
                }
                Holder::Nobody => {}
            }
            let mut f = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(f) => f,
                // Another agent's (one not using the lock would be a bug, but skip).
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(self.err(&path)(e)),
            };
            let text = format!("{}\n", self.owner.display());
            if let Err(e) = f.write_all(text.as_bytes()) {
                let _ = std::fs::remove_file(&path);
                return Err(self.err(&path)(e));
            }
            if free(&name) {
                return Ok(Some(name));
            }
            // Taken on the machine by something that does not claim (another program,
            // an agent of an older version): leave the name to it.
            let _ = std::fs::remove_file(&path);
        }
        Ok(None)
    }

    /// Release the claims among `names` that this agent holds.
    pub fn release(&self, names: &[String]) -> Result<(), ClaimError> {
        let _lock = self.lock()?;
        for name in names {
            if matches!(self.holder(name), Holder::Us) {
                let p = self.dir.join(name);
                std::fs::remove_file(&p).map_err(self.err(&p))?;
            }
        }
        Ok(())
    }

    /// Remove every stale claim (its agent's state directory is gone), whoever made
    /// it; returns how many. Agents call this when they reconcile, so that the claims
    /// of agents removed for good do not pile up.
    pub fn remove_stale(&self) -> Result<usize, ClaimError> {
        let _lock = self.lock()?;
        let rd = std::fs::read_dir(&self.dir).map_err(self.err(&self.dir))?;
        let mut n = 0;
        for e in rd.flatten() {
            let Ok(name) = e.file_name().into_string() else {
                continue;
            };
            if !name.starts_with('.') && matches!(self.holder(&name), Holder::Stale) {
                std::fs::remove_file(e.path()).map_err(self.err(&e.path()))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// The names this agent holds claims on.
    pub fn held(&self) -> Result<Vec<String>, ClaimError> {
        let rd = match std::fs::read_dir(&self.dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.err(&self.dir)(e)),
        };
        let mut out: Vec<String> = rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.'))
            .filter(|n| matches!(self.holder(n), Holder::Us))
            .collect();
        out.sort();
        Ok(out)
    }
}

/// The claim name of cluster number `n`.
pub fn number(n: u32) -> String {
    format!("n{n}")
}

/// The claim name of UDP port `p`.
pub fn port(p: u16) -> String {
    format!("port{p}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_released_and_stale_ones_taken() {
        let t = tempfile::tempdir().unwrap();
        let dir = t.path().join("claims");
        let a_state = t.path().join("a");
        let b_state = t.path().join("b");
        std::fs::create_dir_all(&a_state).unwrap();
        std::fs::create_dir_all(&b_state).unwrap();
        let a = Claims::new(&dir, &a_state);
        let b = Claims::new(&dir, &b_state);
        let names = || (1..=3).map(number);
        assert_eq!(
            a.claim_first(names(), |_| true).unwrap().as_deref(),
            Some("n1")
        );
        // b skips a's claim, and a name `free` refuses.
        assert_eq!(
            b.claim_first(names(), |n| n != "n2").unwrap().as_deref(),
            Some("n3")
        );
        assert!(!dir.join("n2").exists(), "a refused name stays unclaimed");
        // b's store now uses n3, so b asks for the others only: none is left.
        assert_eq!(
            b.claim_first((1..=2).map(number), |n| n != "n2").unwrap(),
            None
        );
        // A name b holds but its store does not use (a crash before recording) is free
        // to b again.
        assert_eq!(
            b.claim_first(names(), |n| n != "n2").unwrap().as_deref(),
            Some("n3")
        );
        assert_eq!(a.held().unwrap(), vec!["n1"]);
        // Releasing another agent's claim does nothing.
        a.release(&["n3".into()]).unwrap();
        assert_eq!(b.held().unwrap(), vec!["n3"]);
        a.release(&["n1".into()]).unwrap();
        assert!(a.held().unwrap().is_empty());
        // b's state directory goes: its claims are stale and a takes them.
        std::fs::remove_dir_all(&b_state).unwrap();
        assert_eq!(
            a.claim_first((3..=3).map(number), |_| true)
                .unwrap()
                .as_deref(),
            Some("n3")
        );
        assert_eq!(a.held().unwrap(), vec!["n3"]);
        // A claim whose agent is gone is removed by anyone's sweep; live ones stay.
        let c_state = t.path().join("c");
        std::fs::create_dir_all(&c_state).unwrap();
        let c = Claims::new(&dir, &c_state);
        assert_eq!(
            c.claim_first([port(7700)], |_| true).unwrap().as_deref(),
            Some("port7700")
        );
        std::fs::remove_dir_all(&c_state).unwrap();
        assert_eq!(a.remove_stale().unwrap(), 1);
        assert!(!dir.join("port7700").exists());
        assert_eq!(a.remove_stale().unwrap(), 0);
        assert_eq!(a.held().unwrap(), vec!["n3"]);
    }
}
