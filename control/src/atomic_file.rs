//! Files written whole or not at all: the bytes go to `<name>.tmp` beside the file
//! (made anew with the file's mode, so neither an old temporary file nor a link planted
//! there is written through), which is then renamed over the file. A process killed at
//! any point leaves the old file or the new one, never a torn one; a leftover `*.tmp`
//! is a write that never committed.
//!
//! The agent's keys, authorisations, secrets and reservation files, and the munge keys
//! it is sent, are all written this way.
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// When a [`write()`] is on the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// When `write` returns: the file is synced before the rename and its directory
    /// after it.
    Synced,
    /// Not synced here: the caller syncs the filesystem once after many writes
    /// (`syncfs`), instead of two syncs each.
    Deferred,
}

/// The temporary file a [`write()`] of `path` goes through: `<name>.tmp`.
pub fn tmp_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".tmp");
    path.with_file_name(name)
}

/// The steps of a [`write_with`], for crash tests to stop at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// The temporary file is written (and synced, when [`Durability::Synced`]).
    Written,
    /// It is renamed over the file.
    Renamed,
}

/// Write `bytes` to `path` atomically, the file with `mode` (e.g. `0o600`).
pub fn write(path: &Path, bytes: &[u8], mode: u32, durability: Durability) -> std::io::Result<()> {
    write_with(path, bytes, mode, durability, &|_| {})
}

/// [`write()`], calling `at` after each [`Step`].
pub fn write_with(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    durability: Durability,
    at: &dyn Fn(Step),
) -> std::io::Result<()> {
    let tmp = tmp_path(path);
    match std::fs::remove_file(&tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(&tmp)?;
    f.write_all(bytes)?;
    if durability == Durability::Synced {
        f.sync_all()?;
    }
    drop(f);
    at(Step::Written);
    std::fs::rename(&tmp, path)?;
    at(Step::Renamed);
    match (durability, path.parent()) {
        (Durability::Synced, Some(dir)) => sync_dir(dir),
        _ => Ok(()),
    }
}

/// Sync directory `dir`: a rename or unlink in it is durable after this.
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn replaces_whole_with_its_mode_and_leaves_no_temporary_file() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("c1.json");
        assert_eq!(tmp_path(&p), d.path().join("c1.json.tmp"));
        std::fs::write(&p, "old").unwrap();
        // A leftover of a write that never committed, read-only, is made anew.
        std::fs::write(tmp_path(&p), "torn").unwrap();
        std::fs::set_permissions(tmp_path(&p), std::fs::Permissions::from_mode(0o400)).unwrap();
        for (i, durability) in [Durability::Synced, Durability::Deferred]
            .into_iter()
            .enumerate()
        {
            let text = format!("new {i}");
            write(&p, text.as_bytes(), 0o600, durability).unwrap();
            assert_eq!(std::fs::read_to_string(&p).unwrap(), text);
            let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            assert!(!tmp_path(&p).exists());
        }
        // A read-only file (a munge key) is replaced too.
        let k = d.path().join("k.munge");
        write(&k, b"a", 0o400, Durability::Synced).unwrap();
        write(&k, b"b", 0o400, Durability::Synced).unwrap();
        assert_eq!(std::fs::read(&k).unwrap(), b"b");
        assert!(write(
            &d.path().join("no/such/dir/f"),
            b"x",
            0o600,
            Durability::Synced
        )
        .is_err());
    }
}
