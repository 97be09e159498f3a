//! The few system calls of the bench that libstd does not wrap.

use std::io;
use std::os::fd::RawFd;

use crate::lab::Error;

/// Moves the calling thread into the network namespace open at `fd`.
pub fn setns_net(fd: RawFd) -> Result<(), Error> {
    // SAFETY: setns only reads its integer arguments; `fd` is an open namespace file owned
    // by the caller for the duration of the call. It changes the calling thread only.
    let r = unsafe { libc::setns(fd, libc::CLONE_NEWNET) };
    if r == 0 {
        Ok(())
    } else {
        Err(Error::Sys {
            call: "setns",
            source: io::Error::last_os_error(),
        })
    }
}

/// Binds a socket to a device (`SO_BINDTODEVICE`).
pub fn bind_to_device(fd: RawFd, ifname: &str) -> Result<(), Error> {
    let name = ifname.as_bytes();
    let len = libc::socklen_t::try_from(name.len()).map_err(|_| Error::Sys {
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
        Err(Error::Sys {
            call: "SO_BINDTODEVICE",
            source: io::Error::last_os_error(),
        })
    }
}
