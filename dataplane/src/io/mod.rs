//! Everything that touches the operating system: the UDP socket, the TAP device, interface
//! addresses, the status socket and metrics listener, and the event loops. Each `unsafe`
//! block says why it is sound.

pub mod armed;
pub mod ctl;
pub mod driver;
pub mod frames;
pub mod levers;
pub mod mtu;
pub mod multishot;
pub mod spin;
pub mod sys;
pub mod tap;
pub mod threads;
pub mod udp;
pub mod uring;

/// Errors of the I/O layer.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// A system call failed.
    #[error("{call}: {source}")]
    Sys {
        /// What was called.
        call: String,
        /// The error.
        source: std::io::Error,
    },
    /// Bad input from the operator.
    #[error("{0}")]
    Invalid(String),
}

impl IoError {
    /// Wraps the last OS error.
    pub fn last(call: impl Into<String>) -> Self {
        Self::Sys {
            call: call.into(),
            source: std::io::Error::last_os_error(),
        }
    }
}
