//! The byte stream NBD runs over, on both sides (server and client).

use std::any::Any;
use std::os::fd::{AsFd, BorrowedFd};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpStream, UnixStream};

/// Any stream NBD can be spoken over (TCP, Unix, TLS over either).
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {
    /// The stream as `Any`, to find out what it is.
    fn as_any(&self) -> &dyn Any;
}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
}

/// The socket under `c` when bytes written to it reach the peer as they are (plain TCP or
/// Unix streams; not TLS, which must encrypt them first).
pub fn plain_socket(c: &dyn Conn) -> Option<BorrowedFd<'_>> {
    let any = c.as_any();
    if let Some(s) = any.downcast_ref::<UnixStream>() {
        return Some(s.as_fd());
    }
    any.downcast_ref::<TcpStream>().map(|s| s.as_fd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_plain_sockets_are_written_directly() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c: Box<dyn Conn> = Box::new(a);
        assert!(plain_socket(c.as_ref()).is_some());
        let (d, _e) = tokio::io::duplex(64);
        let c: Box<dyn Conn> = Box::new(d);
        assert!(plain_socket(c.as_ref()).is_none());
    }
}
