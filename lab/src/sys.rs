//! The few system calls of the lab that libstd does not wrap: who we are (`geteuid`),
//! entering a namespace (`setns`), signalling a process by PID (`kill`), binding a socket
//! to a device and the clock tick of /proc. Every `unsafe` of the lab is here.

use std::io;
use std::os::fd::RawFd;

/// A failed system call: which one, and the OS error.
#[derive(Debug, thiserror::Error)]
#[error("{call}: {source}")]
pub struct SysError {
    /// The call (or socket option) that failed.
    pub call: &'static str,
    /// The OS error.
    #[source]
    pub source: io::Error,
}

impl SysError {
    /// The error of `call` from `errno`.
    pub fn last(call: &'static str) -> SysError {
        SysError {
            call,
            source: io::Error::last_os_error(),
        }
    }
}

/// True when the process runs with effective user id 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Moves the calling thread into the network namespace open at `fd`.
pub fn setns_net(fd: RawFd) -> Result<(), SysError> {
    // SAFETY: setns only reads its integer arguments; `fd` is an open namespace file owned
    // by the caller for the duration of the call. It changes the calling thread only.
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("setns"))
    }
}

/// Sends signal `sig` to process `pid`. Refuses PIDs that are not positive (0 and -1
/// would signal a process group or every process), so a bad PID cannot hit more than
/// one process.
pub fn kill(pid: u32, sig: libc::c_int) -> Result<(), SysError> {
    let pid = match libc::pid_t::try_from(pid) {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(SysError {
                call: "kill",
                source: io::Error::from(io::ErrorKind::InvalidInput),
            })
        }
    };
    // SAFETY: kill has no memory-safety preconditions; the pid is positive, so it names
    // one process. The callers only pass processes they started (or that run inside
    // namespaces they made).
    let r = unsafe { libc::kill(pid, sig) };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("kill"))
    }
}

/// Binds a socket to a device (`SO_BINDTODEVICE`).
pub fn bind_to_device(fd: RawFd, ifname: &str) -> Result<(), SysError> {
    let name = ifname.as_bytes();
    let len = libc::socklen_t::try_from(name.len()).map_err(|_| SysError {
        call: "SO_BINDTODEVICE",
        source: io::Error::from(io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: the pointer and length describe `name`, which lives across the call; the
    // kernel copies at most `len` bytes from it.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            name.as_ptr().cast(),
            len,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(SysError::last("SO_BINDTODEVICE"))
    }
}

/// Clock ticks per second of /proc's CPU times (`sysconf(_SC_CLK_TCK)`, 100 on Linux).
pub fn clock_ticks_per_sec() -> f64 {
    // SAFETY: sysconf only reads its integer argument.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if hz > 0 {
        hz as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kill_refuses_group_pids() {
        for pid in [0, u32::MAX, 1 << 31] {
            let e = kill(pid, 0).expect_err("must refuse");
            assert_eq!(e.source.kind(), io::ErrorKind::InvalidInput, "{pid}");
        }
        // Signal 0 checks that a process exists: this one does.
        kill(std::process::id(), 0).expect("own pid");
    }
}
