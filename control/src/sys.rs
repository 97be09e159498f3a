//! The system calls of `control` that std does not wrap: signals, file locks, syncfs and
//! network interface lookups. Every
//! `unsafe` block of the crate is here, each with its `// SAFETY:` note.
use std::fs::File;
use std::os::fd::AsRawFd;

/// Send `sig` to process `pid`. Errors (no such process, not permitted) are ignored:
/// callers check afterwards whether the process is gone. Callers pass pids they know
/// to be theirs (a child not yet reaped, a process whose command line names one of
/// their files); the pid is the only thing kill(2) is given.
pub fn signal(pid: i32, sig: i32) {
    if pid <= 0 {
        // 0 and negative pids address process groups, never one process.
        return;
    }
    // SAFETY: kill(2) takes two integers and touches no memory of this process.
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Send `sig` to every process of group `pgid` (a group a caller made for a child it
/// spawned, whose leader it has not reaped before the call's first signal).
pub fn signal_group(pgid: i32, sig: i32) {
    if pgid <= 1 {
        return;
    }
    // SAFETY: kill(2) with a negative pid addresses the process group; it takes two
    // integers and touches no memory of this process.
    unsafe {
        libc::kill(-pgid, sig);
    }
}

/// Block until this process holds an exclusive lock on `file` (flock(2)). The lock goes
/// with the open file: dropping it, or the process ending however it ends, unlocks.
pub fn lock_exclusive(file: &File) -> std::io::Result<()> {
    loop {
        // SAFETY: flock(2) on a descriptor `file` owns and keeps open for the call.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        if r == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The index of the network interface named `name` in this process's network namespace
/// (if_nametoindex(3): one ioctl on a socket, no process started, no list of every link
/// read), `None` when there is no such interface or the name cannot be one.
pub fn if_index(name: &str) -> Option<u32> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('/') {
        return None;
    }
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: `c` is a NUL-terminated string shorter than IFNAMSIZ that lives across the
    // call; if_nametoindex only reads it.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    (i != 0).then_some(i)
}

/// Write everything of the filesystem holding `file` to disk (syncfs(2)): one call for
/// many files written in a row, instead of one fsync each.
pub fn syncfs(file: &File) -> std::io::Result<()> {
    // SAFETY: syncfs(2) on a descriptor `file` owns and keeps open for the call.
    let r = unsafe { libc::syncfs(file.as_raw_fd()) };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
