//! The byte stream NBD runs over, on both sides (server and client).

use tokio::io::{AsyncRead, AsyncWrite};

/// Any stream NBD can be spoken over (TCP, Unix, TLS over either).
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}
