//! The system calls of `control` that std does not wrap: signals and file locks. Every
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
