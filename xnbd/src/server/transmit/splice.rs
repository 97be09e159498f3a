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
//! Read-ahead: once a payload is all in, whatever else the socket holds (the next request,
//! usually the next payload's start) is spliced into the pipe behind it before the
//! payload goes into the file, so the client has the whole socket buffer to refill while
//! the server copies (reading only the payload left the next request in the socket, and a
//! client whose socket buffer is smaller than one request then waited more often). The
//! connection's byte stream is therefore: the read buffer, then the bytes held in the pipe
//! ([`Stream`] serves them to every other read, in order), then the socket. After a spliced
//! write the next request header is read on its own (32 bytes, out of the pipe), so the
//! read buffer does not copy in the next payload.
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
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, BufReader, ReadBuf};

use super::Server;
use crate::storage::Storage;
use crate::sys;

/// Capacity asked for a connection's pipe: a whole inline write.
const PIPE_BYTES: usize = super::INLINE_WRITE;
/// Largest piece of a pipe copied through memory when the file refuses to splice.
const COPY_PIECE: usize = 64 << 10;

/// The byte stream a connection's requests are read from: the bytes the splicer holds in
/// its pipe (read ahead of the socket), then the socket.
pub(super) struct Stream<R> {
    inner: R,
    splicer: Option<Splicer>,
}

impl<R> Stream<R> {
    pub fn new(inner: R, splicer: Option<Splicer>) -> Self {
        Stream { inner, splicer }
    }

    /// Whether the last payload was spliced (and forget it): the caller then reads the
    /// next header on its own.
    pub fn take_streaming(&mut self) -> bool {
        self.splicer
            .as_mut()
            .is_some_and(|s| std::mem::take(&mut s.streaming))
    }
}

impl<R: AsyncRead + Unpin> AsyncRead for Stream<R> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let me = self.get_mut();
        if let Some(sp) = me.splicer.as_mut() {
            if sp.held > 0 && buf.remaining() > 0 {
                return Poll::Ready(sp.read_held(buf));
            }
        }
        Pin::new(&mut me.inner).poll_read(cx, buf)
    }
}

/// How a connection's inline write payloads reach the file.
pub(super) struct Splicer {
    /// The connection's socket (registered for write readiness), duplicated for reading
    /// when the pipe is made.
    socket: Arc<AsyncFd<OwnedFd>>,
    pipe: Option<Pipe>,
    /// Bytes of the stream read ahead into the pipe and not yet consumed.
    held: usize,
    /// The socket or the file refused to splice.
    off: bool,
    /// The last payload was spliced: read the next request header on its own.
    streaming: bool,
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
    /// The socket has nothing (only when not waiting).
    Empty,
    /// The pipe holds all it can.
    Full,
    /// The client closed its side.
    Closed,
}

impl Splicer {
    pub fn new(socket: Arc<AsyncFd<OwnedFd>>) -> Self {
        Splicer {
            socket,
            pipe: None,
            held: 0,
            off: false,
            streaming: false,
        }
    }

    /// Read bytes held in the pipe into `buf` (at least one; there are some).
    fn read_held(&mut self, buf: &mut ReadBuf<'_>) -> io::Result<()> {
        let pipe = self.pipe.as_ref().ok_or_else(pipe_emptied)?;
        let n = self.held.min(buf.remaining());
        let k = (&pipe.out).read(buf.initialize_unfilled_to(n))?;
        if k == 0 {
            return Err(pipe_emptied());
        }
        buf.advance(k);
        self.held -= k;
        Ok(())
    }

    /// Read the `len`-byte payload of a (validated) write whose first bytes may be in
    /// `rd`'s buffer (fewer than `len`), and write it into `st` at `offset`. An error is
    /// the connection's (the client went away mid-payload, the socket failed); the
    /// payload is then not all read and the connection must end.
    pub async fn write<R: AsyncRead + Unpin>(
        rd: &mut BufReader<Stream<R>>,
        st: &Storage,
        offset: u64,
        len: usize,
        srv: &Server,
    ) -> io::Result<Outcome> {
        let Some(sp) = rd.get_mut().splicer.as_mut().filter(|s| !s.off) else {
            return Ok(Outcome::NotTaken);
        };
        sp.streaming = false;
        if sp.pipe.is_none() {
            match sp.make_pipe() {
                Ok(p) => sp.pipe = Some(p),
                // Descriptors or memory short: this write is copied, the next tries again.
                Err(e) => {
                    tracing::debug!("no pipe for a spliced write: {e}");
                    return Ok(Outcome::NotTaken);
                }
            }
        }
        match receive_and_write(rd, st, offset, len, srv).await {
            Ok((res, refused)) => {
                let sp = rd.get_mut().splicer.as_mut().expect("splicer");
                if let Some(e) = refused {
                    sp.turn_off(&e, srv);
                } else {
                    sp.streaming = true;
                    srv.stats.spliced_writes.fetch_add(1, Ordering::Relaxed);
                }
                Ok(Outcome::Written(res))
            }
            // The connection ends.
            Err(e) => Err(e),
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
        // The pipe stays while it holds bytes of the stream.
        self.off = true;
    }
}

fn pipe_emptied() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "pipe emptied early")
}

/// Whether an error means the socket or file cannot splice at all.
fn refused(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOSYS))
}

/// Receive the payload (the part in `rd`'s buffer, `prefix`, first in the stream, then
/// the bytes held in the pipe, then the rest from the socket into the pipe), read ahead
/// what else the socket holds, then write the payload. Returns the write's result and, if
/// the socket or the file refused to splice, why (the payload was then finished by
/// copying).
async fn receive_and_write<R: AsyncRead + Unpin>(
    rd: &mut BufReader<Stream<R>>,
    st: &Storage,
    offset: u64,
    len: usize,
    srv: &Server,
) -> io::Result<(io::Result<()>, Option<io::Error>)> {
    let prefix = rd.buffer().len().min(len);
    let rest = len - prefix;
    let sp = rd.get_mut().splicer.as_mut().expect("splicer");
    let pipe = sp.pipe.as_ref().expect("pipe");
    let mut res: io::Result<()> = Ok(());
    let mut refusal: Option<io::Error> = None;
    // Bytes of `rest` in the pipe or taken from the socket; of them, those still in the
    // pipe and those already in the file (emptied early because the pipe was full).
    let mut got = sp.held.min(rest);
    sp.held -= got;
    let (mut in_pipe, mut emptied) = (got, 0);
    while got < rest {
        match pipe.fill(rest - got, true).await {
            Ok(Fill::Moved(n)) => (got, in_pipe) = (got + n, in_pipe + n),
            Ok(Fill::Full | Fill::Empty) if in_pipe > 0 => {
                let at = offset + (prefix + emptied) as u64;
                pipe.empty(st, at, in_pipe, &mut res, &mut refusal, srv)?;
                (emptied, in_pipe) = (emptied + in_pipe, 0);
            }
            Ok(Fill::Full | Fill::Empty) => {
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
    if got == rest && sp.held == 0 {
        // Read ahead: the client may refill its socket buffer while this is written. An
        // error here (the client gone) shows on the next read.
        if let Ok(Fill::Moved(n)) = pipe.fill(PIPE_BYTES, false).await {
            sp.held = n;
        }
    }
    // What the socket would not splice, read through memory (past the read buffer,
    // whose bytes come before it; nothing is held in the pipe then).
    let mut tail = Vec::new();
    if got < rest {
        tail = srv.write_buffers.take(rest - got);
        rd.get_mut().read_exact(&mut tail).await?;
    }
    // All of the payload is here: into the file.
    let sp = rd.get_mut().splicer.as_mut().expect("splicer");
    let pipe = sp.pipe.as_ref().expect("pipe");
    let at = offset + (prefix + emptied) as u64;
    pipe.empty(st, at, in_pipe, &mut res, &mut refusal, srv)?;
    if !tail.is_empty() {
        if res.is_ok() {
            res = st.write_at(&tail, offset + (prefix + got) as u64);
        }
        srv.write_buffers.put(tail);
    }
    if res.is_ok() && prefix > 0 {
        res = st.write_at(&rd.buffer()[..prefix], offset);
    }
    rd.consume(prefix);
    Ok((res, refusal))
}

impl Pipe {
    /// Move as much as the socket has, up to `want` bytes, into the pipe; with `wait`,
    /// waiting until it has something.
    async fn fill(&self, want: usize, wait: bool) -> io::Result<Fill> {
        let step = |sock: &OwnedFd| {
            match sys::splice_to_pipe(sock.as_fd(), self.input.as_fd(), want) {
                Ok(0) => Ok(Fill::Closed),
                Ok(n) => Ok(Fill::Moved(n)),
                // The socket is empty (or, not waiting, the pipe full), unless it is the
                // pipe that is full (the socket's readiness then stays as it is).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !wait {
                        Ok(Fill::Empty)
                    } else if !sys::pipe_has_room(self.input.as_fd())? {
                        Ok(Fill::Full)
                    } else {
                        Err(e)
                    }
                }
                Err(e) => Err(e),
            }
        };
        if !wait {
            return step(self.sock.get_ref());
        }
        loop {
            let mut ready = self.sock.readable().await?;
            if let Ok(r) = ready.try_io(|sock| step(sock.get_ref())) {
                return r;
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
        let mut piece = Vec::new();
        while n > 0 {
            if res.is_ok() && refusal.is_none() {
                match st.splice_from(self.out.as_fd(), offset, n) {
                    Ok(0) => return Err(pipe_emptied()),
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
                return Err(pipe_emptied());
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
