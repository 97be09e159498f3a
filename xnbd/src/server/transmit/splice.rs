//! Large write payloads moved from the client's socket into the file with `splice(2)`:
//! socket -> pipe -> page cache, one copy (into the page cache) where reading the payload
//! into memory and `pwrite`-ing it makes two (socket -> buffer -> page cache).
//!
//! Used for the writes the reader serves inline (64-256 KiB, no FUA, the write lane idle)
//! on plain TCP and Unix connections to a local file, when the payload is not all in the
//! read buffer yet. Each such connection gets one pipe, made when it first needs it and
//! kept (`F_SETPIPE_SZ` asks for room for a whole inline write; a smaller pipe works in
//! more steps). The bytes of the payload already in the read buffer are written from
//! there, the rest is spliced; nothing reaches the file before the whole payload has
//! arrived unless the pipe fills first, so a client that goes away mid-payload normally
//! leaves the file as it was (a write never acknowledged may leave anything in its range,
//! as the NBD spec allows, and a pipe that fills, e.g. with small TCP segments, is emptied
//! into the file before the rest arrives).
//!
//! After a spliced write, the next request header is read on its own (32 bytes) instead
//! of through the read buffer, which would otherwise take in most of the next payload
//! (and with it the copy this saves).
//!
//! Fallback: a socket or file that refuses to splice (`EINVAL`, `ENOSYS`) turns splicing
//! off for the connection (counted in `splice_fallbacks`, logged once per process); the
//! payload in hand is finished by copying. A pipe that cannot be made (descriptors or
//! memory short) leaves that one write to the copying path. Request order, replies,
//! FLUSH/FUA and the memory budget are the caller's and unchanged: this only decides how
//! the bytes of one write reach the file.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader};

use super::Server;
use crate::storage::Storage;
use crate::sys;

/// Capacity asked for a connection's pipe: a whole inline write.
const PIPE_BYTES: usize = super::INLINE_WRITE;
/// Largest piece of a pipe copied through memory when the file refuses to splice.
const COPY_PIECE: usize = 64 << 10;

/// How a connection's inline write payloads reach the file.
pub(super) struct Splicer {
    /// The connection's socket (registered for write readiness), duplicated for reading
    /// when the pipe is made.
    socket: Arc<AsyncFd<OwnedFd>>,
    state: State,
    /// The last payload was spliced: read the next request header on its own.
    streaming: bool,
}

enum State {
    /// No pipe yet.
    Unset,
    Ready(Pipe),
    /// The socket or the file refused to splice.
    Off,
}

struct Pipe {
    /// The socket, registered for read readiness.
    sock: AsyncFd<OwnedFd>,
    /// Read end.
    out: File,
    /// Write end.
    input: OwnedFd,
}

/// What became of a payload handed to [`Splicer::write`].
pub(super) enum Outcome {
    /// Not taken (splicing is off, or no pipe could be made): nothing was read.
    NotTaken,
    /// The whole payload was read, and this is how writing it into the file went.
    Written(io::Result<()>),
}

/// One step of filling the pipe from the socket.
enum Fill {
    Moved(usize),
    /// The pipe holds all it can.
    Full,
    /// The client closed its side.
    Closed,
}

impl Splicer {
    pub fn new(socket: Arc<AsyncFd<OwnedFd>>) -> Self {
        Splicer {
            socket,
            state: State::Unset,
            streaming: false,
        }
    }

    /// Whether the last payload was spliced (and forget it): the caller then reads the
    /// next header on its own.
    pub fn take_streaming(&mut self) -> bool {
        std::mem::take(&mut self.streaming)
    }

    /// Read the `len`-byte payload of a (validated) write whose first bytes may be in
    /// `rd`'s buffer (fewer than `len`), and write it into `st` at `offset`. An error is
    /// the connection's (the client went away mid-payload, the socket failed); the
    /// payload is then not all read and the connection must end.
    pub async fn write<R: AsyncRead + Unpin>(
        &mut self,
        rd: &mut BufReader<R>,
        st: &Storage,
        offset: u64,
        len: usize,
        srv: &Server,
    ) -> io::Result<Outcome> {
        self.streaming = false;
        if matches!(self.state, State::Unset) {
            match self.make_pipe() {
                Ok(p) => self.state = State::Ready(p),
                // Descriptors or memory short: this write is copied, the next tries again.
                Err(e) => {
                    tracing::debug!("no pipe for a spliced write: {e}");
                    return Ok(Outcome::NotTaken);
                }
            }
        }
        let State::Ready(pipe) = &self.state else {
            return Ok(Outcome::NotTaken);
        };
        let r = pipe.write(rd, st, offset, len, srv).await;
        match r {
            Ok((res, refused)) => {
                if let Some(e) = refused {
                    self.turn_off(&e, srv);
                } else {
                    self.streaming = true;
                    srv.stats.spliced_writes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Written(res))
            }
            Err(e) => {
                // The pipe may hold part of the payload: a new one if the connection goes on.
                self.state = State::Unset;
                Err(e)
            }
        }
    }

    fn make_pipe(&self) -> io::Result<Pipe> {
        let (out, input) = sys::pipe()?;
        // A smaller pipe (over the user's pipe quota) still works, in more steps.
        if let Err(e) = sys::set_pipe_size(input.as_fd(), PIPE_BYTES) {
            tracing::debug!("pipe size left as it is: {e}");
        }
        let sock = sys::readable_async(self.socket.get_ref().try_clone()?)?;
        Ok(Pipe {
            sock,
            out: File::from(out),
            input,
        })
    }

    fn turn_off(&mut self, e: &io::Error, srv: &Server) {
        static LOGGED: std::sync::Once = std::sync::Once::new();
        LOGGED.call_once(|| {
            tracing::info!("splice refused ({e}): large writes on such connections are copied")
        });
        srv.stats.splice_fallbacks.fetch_add(1, Ordering::Relaxed);
        self.state = State::Off;
    }
}

/// Whether an error means the socket or file cannot splice at all.
fn refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

impl Pipe {
    /// Receive the payload (the part in `rd`'s buffer, `prefix`, first in the stream, then
    /// the rest from the socket into the pipe), then write it. Returns the write's result
    /// and, if the socket or the file refused to splice, why (the payload was then
    /// finished by copying).
    async fn write<R: AsyncRead + Unpin>(
        &self,
        rd: &mut BufReader<R>,
        st: &Storage,
        offset: u64,
        len: usize,
        srv: &Server,
    ) -> io::Result<(io::Result<()>, Option<io::Error>)> {
        let prefix = rd.buffer().len().min(len);
        let rest = len - prefix;
        let mut res: io::Result<()> = Ok(());
        let mut refusal: Option<io::Error> = None;
        // Bytes of `rest` taken from the socket; of them, those still in the pipe and those
        // already in the file (emptied early because the pipe was full).
        let (mut got, mut in_pipe, mut emptied) = (0, 0, 0);
        while got < rest {
            match self.fill(rest - got).await {
                Ok(Fill::Moved(n)) => (got, in_pipe) = (got + n, in_pipe + n),
                Ok(Fill::Full) if in_pipe > 0 => {
                    let at = offset + (prefix + emptied) as u64;
                    self.empty(st, at, in_pipe, &mut res, &mut refusal, srv)?;
                    (emptied, in_pipe) = (emptied + in_pipe, 0);
                }
                Ok(Fill::Full) => {
                    refusal = Some(io::Error::other("pipe without room"));
                    break;
                }
                Ok(Fill::Closed) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "client closed in the middle of a write payload",
                    ))
                }
                Err(e) if refused(&e) => {
                    refusal = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        // What the socket would not splice, read through memory (past the read buffer,
        // whose bytes come before it).
        let mut tail = Vec::new();
        if got < rest {
            tail = srv.write_buffers.take(rest - got);
            rd.get_mut().read_exact(&mut tail).await?;
        }
        // All of it is here: into the file.
        if res.is_ok() && prefix > 0 {
            res = st.write_at(&rd.buffer()[..prefix], offset);
        }
        rd.consume(prefix);
        let at = offset + (prefix + emptied) as u64;
        self.empty(st, at, in_pipe, &mut res, &mut refusal, srv)?;
        if !tail.is_empty() {
            if res.is_ok() {
                res = st.write_at(&tail, offset + (prefix + got) as u64);
            }
            srv.write_buffers.put(tail);
        }
        Ok((res, refusal))
    }

    /// Move as much as the socket has, up to `want` bytes, into the pipe, waiting until it
    /// has something.
    async fn fill(&self, want: usize) -> io::Result<Fill> {
        loop {
            let mut ready = self.sock.readable().await?;
            let step = ready.try_io(|sock| {
                match sys::splice_to_pipe(sock.get_ref().as_fd(), self.input.as_fd(), want) {
                    Ok(0) => Ok(Fill::Closed),
                    Ok(n) => Ok(Fill::Moved(n)),
                    // The socket is empty, unless it is the pipe that is full (the socket's
                    // readiness then stays as it is).
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if sys::pipe_has_room(self.input.as_fd())? {
                            Err(e)
                        } else {
                            Ok(Fill::Full)
                        }
                    }
                    Err(e) => Err(e),
                }
            });
            if let Ok(step) = step {
                return step;
            }
        }
    }

    /// Move `n` bytes out of the pipe into the file at `offset`. Once `res` holds an error
    /// they are read and dropped; a file that refuses to splice gets them through memory
    /// (and `refusal` says why). The error returned is the pipe's.
    fn empty(
        &self,
        st: &Storage,
        mut offset: u64,
        mut n: usize,
        res: &mut io::Result<()>,
        refusal: &mut Option<io::Error>,
        srv: &Server,
    ) -> io::Result<()> {
        let short = || io::Error::new(io::ErrorKind::UnexpectedEof, "pipe emptied early");
        let mut piece = Vec::new();
        while n > 0 {
            if res.is_ok() && refusal.is_none() {
                match st.splice_from(self.out.as_fd(), offset, n) {
                    Ok(0) => return Err(short()),
                    Ok(k) => (n, offset) = (n - k, offset + k as u64),
                    Err(e) if refused(&e) => *refusal = Some(e),
                    Err(e) => *res = Err(e),
                }
                continue;
            }
            if piece.is_empty() {
                piece = srv.write_buffers.take(n.min(COPY_PIECE));
            }
            let want = n.min(piece.len());
            let k = (&self.out).read(&mut piece[..want])?;
            if k == 0 {
                return Err(short());
            }
            if res.is_ok() {
                *res = st.write_at(&piece[..k], offset);
            }
            (n, offset) = (n - k, offset + k as u64);
        }
        if !piece.is_empty() {
            srv.write_buffers.put(piece);
        }
        Ok(())
    }
}
