//! Exclusive use of a proxy's cache and bitmap.
//!
//! Two proxies on one cache would each fetch, write and mark blocks the other does not know
//! about: a write one of them acknowledged can be overwritten by the other's background copy.
//! A proxy therefore holds an exclusive `flock` on the cache file and on the bitmap file for
//! as long as it runs. The kernel releases it when the process ends in any way (`kill -9`
//! included), so a crash never leaves a stale lock behind; nothing is written to take it.
//! `flock` locks do not interact with the byte-range (`fcntl`) locks qemu takes on images.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::sys;

/// Lock errors.
#[derive(Debug, Error)]
pub enum LockError {
    /// Another process holds the lock.
    #[error("{} is in use by another process{}: refusing to start a second proxy on it", path.display(), pid.map(|p| format!(" (pid {p})")).unwrap_or_default())]
    Busy {
        /// The locked file.
        path: PathBuf,
        /// The holder, when `/proc/locks` tells.
        pid: Option<u32>,
    },
    /// Opening or locking failed.
    #[error("locking {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: io::Error,
    },
}

/// An exclusive lock on one file, held until dropped.
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

impl FileLock {
    /// Lock `path` (which must exist) exclusively, or fail at once if someone else holds it.
    pub fn try_lock(path: &Path) -> Result<Self, LockError> {
        let io_err = |source| LockError::Io {
            path: path.to_owned(),
            source,
        };
        // Read access is enough for flock; the lock belongs to this open file description.
        let file = OpenOptions::new().read(true).open(path).map_err(io_err)?;
        if sys::try_lock_exclusive(&file).map_err(io_err)? {
            return Ok(Self { _file: file });
        }
        let pid = file.metadata().ok().and_then(|m| {
            let text = std::fs::read_to_string("/proc/locks").ok()?;
            holder_pid(&text, m.dev(), m.ino())
        });
        Err(LockError::Busy {
            path: path.to_owned(),
            pid,
        })
    }
}

/// The pid holding a `FLOCK` on inode `ino` of device `dev`, from `/proc/locks` lines such as
/// `1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF`.
fn holder_pid(locks: &str, dev: u64, ino: u64) -> Option<u32> {
    let want_major = libc::major(dev);
    let want_minor = libc::minor(dev);
    locks.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        // Lines of waiters start with "1: ->"; they hold nothing.
        if f.len() < 6 || f[1] != "FLOCK" {
            return None;
        }
        let mut id = f[5].split(':');
        let major = u32::from_str_radix(id.next()?, 16).ok()?;
        let minor = u32::from_str_radix(id.next()?, 16).ok()?;
        let inode: u64 = id.next()?.parse().ok()?;
        (major == want_major && minor == want_minor && inode == ino)
            .then(|| f[4].parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_released_on_drop() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("cache.img");
        std::fs::write(&p, b"x").unwrap();
        let first = FileLock::try_lock(&p).unwrap();
        let e = FileLock::try_lock(&p).unwrap_err();
        let LockError::Busy { pid, .. } = &e else {
            panic!("{e}");
        };
        assert_eq!(*pid, Some(std::process::id()), "{e}");
        assert!(e.to_string().contains("in use by another process"), "{e}");
        drop(first);
        FileLock::try_lock(&p).unwrap();
    }

    #[test]
    fn proc_locks_lines_are_parsed() {
        let text = "1: POSIX  ADVISORY  WRITE 99 08:01:77 0 EOF\n\
                    2: FLOCK  ADVISORY  WRITE 1234 103:02:5678 0 EOF\n\
                    2: -> FLOCK  ADVISORY  WRITE 4321 103:02:5678 0 EOF\n";
        let dev = libc::makedev(0x103, 2);
        assert_eq!(holder_pid(text, dev, 5678), Some(1234));
        assert_eq!(holder_pid(text, dev, 77), None);
        assert_eq!(holder_pid("garbage\n\n1: FLOCK", dev, 5678), None);
    }
}
