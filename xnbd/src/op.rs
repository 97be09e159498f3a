//! The outcome of one storage operation, shared by the backends (file, proxy) and the server
//! that turns it into an NBD reply.

use std::io;

use thiserror::Error;

use crate::proto::err;

/// A failed operation, with the NBD error value to send.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("{msg} (nbd error {errno})")]
pub struct OpError {
    /// NBD error value (`proto::err::*`).
    pub errno: u32,
    /// Human-readable reason (sent in structured error chunks).
    pub msg: String,
}

impl OpError {
    /// An error with value `errno`.
    pub fn new(errno: u32, msg: impl Into<String>) -> Self {
        Self {
            errno,
            msg: msg.into(),
        }
    }
}

impl From<io::Error> for OpError {
    fn from(e: io::Error) -> Self {
        let errno = match e.raw_os_error() {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => err::ENOSPC,
            Some(libc::EPERM | libc::EROFS | libc::EACCES) => err::EPERM,
            Some(libc::ENOMEM) => err::ENOMEM,
            Some(libc::EINVAL) => err::EINVAL,
            Some(libc::EOPNOTSUPP) => err::ENOTSUP,
            _ => err::EIO,
        };
        Self {
            errno,
            msg: e.to_string(),
        }
    }
}

/// Run blocking storage work off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| OpError::new(err::EIO, format!("worker failed: {e}")))?
}
