//! Transmission: the request loop of a negotiated connection and its replies.

mod lane;
mod splice;

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use super::{discard, Server, ServerError, Session, BASE_ALLOCATION_ID, MAX_PAYLOAD};
use crate::backend::Backend;
use crate::budget::{Budget, Hold};
use crate::conn::Conn;
use crate::op::OpError;
use crate::proto::{self, cflag, chunk, cmd, err, Chunk, Request, SimpleReply};
use crate::storage::Storage;
use lane::{LaneOp, WriteLane};
use splice::{Outcome, Splicer, Stream};

/// Requests of one connection allowed in flight at once (more are read only when one ends).
const MAX_IN_FLIGHT: usize = 64;
/// Budget held by a block status reply (its largest size: 65536 extents of 8 bytes).
const BLOCK_STATUS_HOLD: u64 = 512 << 10;
/// Budget held by a reply header.
const HEADER_HOLD: u64 = 64;
/// Read buffer of a connection.
const READ_BUFFER: usize = 256 << 10;
/// Largest read copied inline when the page cache holds it. Larger cached reads are sent
/// straight from the page cache to a plain socket (`sendfile`, no copy in this process);
/// over TLS, and when the data is not cached, they run on the blocking pool.
const INLINE_READ: usize = 64 << 10;
/// Most bytes of a read reply sent with one `sendfile`.
const SEND_CHUNK: usize = 4 << 20;
/// Writes over `SMALL_WRITE` and up to this size, without FUA, are written by the reader
/// itself when the write lane is idle (a copy into the page cache, straight from the read
/// buffer when the payload is all there): handed to the lane they cost a thread wake-up and
/// a context switch each, more CPU than the overlap saves on a busy machine
/// (docs/BENCH-NBD.md, "Write lane").
const INLINE_WRITE: usize = 256 << 10;
/// Writes up to this size always go to the lane, which writes those that arrive together in
/// one go (one wake-up for the lot).
const SMALL_WRITE: usize = 64 << 10;
/// Small reads that arrive together are served in groups of this many on the other runtime
/// threads, the last (partial) group by the reader itself. Served one after another by the
/// reader alone, a batch of pipelined reads keeps one thread busy while the client waits
/// for all of its replies; spread out, the replies come back sooner and in parallel.
const READ_GROUP: usize = 8;

impl Server {
    pub(super) async fn transmission(
        self: Arc<Self>,
        conn: Box<dyn Conn>,
        s: Session,
    ) -> Result<(), ServerError> {
        let session = Arc::new(s);
        // The socket itself, for read replies sent from the page cache: plain TCP and Unix
        // connections to a local file. A second descriptor of the same socket, registered
        // with the runtime for write readiness only.
        let direct = match &session.export.backend {
            Backend::File(_) => crate::conn::plain_socket(conn.as_ref())
                .and_then(|fd| fd.try_clone_to_owned().ok())
                .and_then(|fd| crate::sys::writable_async(fd).ok())
                .map(Arc::new),
            Backend::Proxy(_) => None,
        };
        let (rd, wr) = tokio::io::split(conn);
        // Large inline writes spliced from the socket into the file (plain sockets to a
        // local file, the only ones with `direct`); the stream reads what the splicer
        // read ahead first.
        let splicer = direct
            .as_ref()
            .filter(|_| self.splice_writes)
            .map(|d| Splicer::new(d.clone()));
        // Buffered: one read system call brings in many small request headers.
        let mut rd = BufReader::with_capacity(READ_BUFFER, Stream::new(rd, splicer));
        let out = Arc::new(Outbox::default());
        let wr = Arc::new(tokio::sync::Mutex::new(wr));
        let writer = tokio::spawn(write_replies(
            wr.clone(),
            out.clone(),
            self.clone(),
            direct.clone(),
        ));
        let permits = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        // This connection's share of the memory budget: every request holds its bytes from
        // before its payload is read until its reply is written.
        let share = self.budget.connection();
        // Replies of requests served inline, handed to the writer together whenever the
        // next request is not buffered yet (one wake-up and one write for the lot).
        let mut ready: Vec<Seg> = Vec::new();
        // Writes, write-zeroes, trims and flushes of a local file, applied in order on a
        // thread of their own while the reader goes on (see `lane`).
        let lane = match &session.export.backend {
            Backend::File(st) => Some(Arc::new(WriteLane::new(
                st.clone(),
                session.clone(),
                out.clone(),
                self.clone(),
            ))),
            Backend::Proxy(_) => None,
        };
        // Small reads waiting for a group to fill (see `READ_GROUP`).
        let mut reads = ReadGroup::default();
        let result: Result<(), ServerError> = async {
            loop {
                if rd.buffer().len() < proto::REQUEST_LEN {
                    // The socket may have to be waited for: the reader serves the reads of
                    // the last group itself.
                    reads.serve_here(&session, &out, &self, &mut ready);
                }
                if rd.buffer().len() < proto::REQUEST_LEN {
                    send_ready(&wr, &out, &mut ready, &self.budget, direct.as_deref()).await?;
                }
                let mut h = [0u8; proto::REQUEST_LEN];
                let alone = rd.get_mut().take_streaming();
                // The writer may fail while the client sends nothing: that ends the
                // connection too (and gives its budget back).
                let got = tokio::select! {
                    biased;
                    r = unless_ready(read_header(&mut rd, &mut h, alone), || kick(&lane)) => r,
                    () = out.failed() => Err(io::ErrorKind::BrokenPipe.into()),
                };
                match got {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e.into()),
                }
                let req = Request::parse(&h).map_err(|e| ServerError::Protocol(e.to_string()))?;
                self.stats.requests.fetch_add(1, Ordering::Relaxed);
                tracing::trace!(cookie = req.cookie, typ = req.typ, "request parsed");
                if req.typ == cmd::DISC {
                    return Ok(());
                }
                if req.typ == cmd::WRITE && rd.buffer().len() < req.length as usize {
                    // The payload may have to be waited for: the replies so far leave now (a
                    // client with a window of large writes in flight sends more only as
                    // their replies come back).
                    send_ready(&wr, &out, &mut ready, &self.budget, direct.as_deref()).await?;
                }
                let units = self.budget.units(held_bytes(&req));
                let hold = self.budget.try_take(&share, units);
                let hold = match hold {
                    Some(h) if ReadGroup::fits(&session, &req) => {
                        match permits.clone().try_acquire_owned() {
                            Ok(permit) => {
                                reads.push(req, h, permit);
                                if reads.reqs.len() >= READ_GROUP {
                                    reads.spawn(&session, &out, &self);
                                }
                                continue;
                            }
                            Err(_) => Some(h),
                        }
                    }
                    h => h,
                };
                if hold.is_some() {
                    let lane_idle = lane.as_ref().is_some_and(|l| l.is_idle());
                    let inline = Inline {
                        direct: direct.is_some(),
                        lane_idle,
                        srv: &self,
                    };
                    if let Some(reply) = serve_inline(&session, &req, &mut rd, inline).await? {
                        ready.push(self.reply_seg(reply, hold));
                        continue;
                    }
                }
                let hold = match hold {
                    Some(h) => h,
                    None => {
                        // Grouped reads, replies and queued writes hold budget: they go to
                        // the writers before any wait for more.
                        kick(&lane);
                        reads.serve_here(&session, &out, &self, &mut ready);
                        out.push_all(&mut ready);
                        tokio::select! {
                            biased;
                            h = self.budget.take(&share, units) => {
                                h.ok_or_else(|| ServerError::Protocol("closed".into()))?
                            }
                            () = out.failed() => {
                                return Err(io::Error::from(io::ErrorKind::BrokenPipe).into())
                            }
                        }
                    }
                };
                let mut payload = Vec::new();
                let mut early: Option<OpError> = None;
                if req.typ == cmd::WRITE {
                    let len = req.length as usize;
                    if req.length > session.max_payload {
                        kick(&lane);
                        discard(&mut rd, u64::from(req.length)).await?;
                        early = Some(OpError::new(
                            if session.structured {
                                err::EOVERFLOW
                            } else {
                                err::EINVAL
                            },
                            "write larger than the maximum block size",
                        ));
                    } else {
                        if let Some(lane) = lane.as_ref().filter(|l| !l.has_room(len)) {
                            // The lane is full: what is ready goes out while it drains.
                            reads.serve_here(&session, &out, &self, &mut ready);
                            out.push_all(&mut ready);
                            tokio::select! {
                                biased;
                                () = lane.room(len) => {}
                                () = out.failed() => {
                                    return Err(io::Error::from(io::ErrorKind::BrokenPipe).into())
                                }
                            }
                        }
                        // Into a pooled buffer (given back once written).
                        payload = self.write_buffers.take(len);
                        unless_ready(rd.read_exact(&mut payload), || kick(&lane)).await?;
                    }
                }
                let permit = match permits.clone().try_acquire_owned() {
                    Ok(p) => p,
                    Err(_) => {
                        kick(&lane);
                        reads.serve_here(&session, &out, &self, &mut ready);
                        out.push_all(&mut ready);
                        permits
                            .clone()
                            .acquire_owned()
                            .await
                            .map_err(|_| ServerError::Protocol("closed".into()))?
                    }
                };
                if let (Some(lane), None) = (&lane, &early) {
                    if WriteLane::takes(&req) {
                        match validate(&session, &req) {
                            Ok(()) => lane.push(LaneOp {
                                req,
                                data: payload,
                                hold,
                                permit,
                            }),
                            Err(e) => {
                                self.write_buffers.put(payload);
                                let reply = error_reply(&session, &req, e);
                                ready.push(self.reply_seg(reply, Some(hold)));
                            }
                        }
                        continue;
                    }
                }
                let out = out.clone();
                let session = session.clone();
                let srv = self.clone();
                let (wr, direct) = (wr.clone(), direct.clone());
                tokio::spawn(async move {
                    let reply = match early {
                        Some(e) => error_reply(&session, &req, e),
                        None => handle(&session, &req, payload).await,
                    };
                    // Written by this task when the writer is idle: one task hand-off less
                    // on the reply path (a proxied cold read waits for nothing else).
                    let mut segs = vec![srv.reply_seg(reply, Some(hold))];
                    if send_ready(&wr, &out, &mut segs, &srv.budget, direct.as_deref())
                        .await
                        .is_err()
                    {
                        out.fail();
                    }
                    drop(permit);
                });
            }
        }
        .await;
        // Outstanding requests finish and their replies are written before the socket closes.
        kick(&lane);
        reads.serve_here(&session, &out, &self, &mut ready);
        out.push_all(&mut ready);
        let _ = permits.acquire_many(MAX_IN_FLIGHT as u32).await;
        out.close();
        match writer.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!("writer: {e}"),
            Err(e) => warn!("writer task: {e}"),
        }
        result
    }
}

/// Read a request header through the read buffer, or, `alone` and the buffer empty,
/// straight from the stream: after a spliced write the buffer would otherwise take in most
/// of the next payload (see `splice`).
async fn read_header<R: AsyncRead + Unpin>(
    rd: &mut BufReader<R>,
    h: &mut [u8; proto::REQUEST_LEN],
    alone: bool,
) -> io::Result<()> {
    if alone && rd.buffer().is_empty() {
        rd.get_mut().read_exact(h).await?;
    } else {
        rd.read_exact(h).await?;
    }
    Ok(())
}

/// Start the write lane, if any, on what it holds (before the reader may wait).
fn kick(lane: &Option<Arc<WriteLane>>) {
    if let Some(l) = lane {
        l.kick();
    }
}

/// Await `f`, calling `before_wait` first if it cannot complete at once.
async fn unless_ready<F: std::future::Future>(f: F, before_wait: impl FnOnce()) -> F::Output {
    tokio::pin!(f);
    let mut before_wait = Some(before_wait);
    std::future::poll_fn(|cx| {
        let p = f.as_mut().poll(cx);
        if p.is_pending() {
            if let Some(b) = before_wait.take() {
                b();
            }
        }
        p
    })
    .await
}

/// Small reads of a local file, validated and holding their budget and in-flight permits,
/// not yet served.
#[derive(Default)]
struct ReadGroup {
    reqs: Vec<(Request, Hold, OwnedSemaphorePermit)>,
}

impl ReadGroup {
    /// Whether `req` may join a group: a valid read of at most `INLINE_READ` bytes of a
    /// local file (anything else, errors included, takes the usual path).
    fn fits(s: &Session, req: &Request) -> bool {
        req.typ == cmd::READ
            && req.length as usize <= INLINE_READ
            && matches!(s.export.backend, Backend::File(_))
            && validate(s, req).is_ok()
    }

    fn push(&mut self, req: Request, hold: Hold, permit: OwnedSemaphorePermit) {
        self.reqs.push((req, hold, permit));
    }

    /// Serve the group on its own task; the replies are queued together.
    fn spawn(&mut self, session: &Arc<Session>, out: &Arc<Outbox>, srv: &Arc<Server>) {
        if self.reqs.is_empty() {
            return;
        }
        let reqs = std::mem::take(&mut self.reqs);
        let (session, out, srv) = (session.clone(), out.clone(), srv.clone());
        tokio::spawn(async move {
            let mut replies = Vec::with_capacity(reqs.len());
            let mut permits = Vec::with_capacity(reqs.len());
            for (req, hold, permit) in reqs {
                let reply = match cached_read(&session, &req) {
                    Some(r) => r,
                    None => handle(&session, &req, Vec::new()).await,
                };
                replies.push(srv.reply_seg(reply, Some(hold)));
                permits.push(permit);
            }
            out.push_all(&mut replies);
            // The permits go only now, with the replies queued.
            drop(permits);
        });
    }

    /// Serve the group here: replies of what the page cache holds go to `ready`; the rest
    /// (which must wait for the disk) each get a task.
    fn serve_here(
        &mut self,
        session: &Arc<Session>,
        out: &Arc<Outbox>,
        srv: &Arc<Server>,
        ready: &mut Vec<Seg>,
    ) {
        for (req, hold, permit) in self.reqs.drain(..) {
            if let Some(reply) = cached_read(session, &req) {
                ready.push(srv.reply_seg(reply, Some(hold)));
                continue;
            }
            let (session, out, srv) = (session.clone(), out.clone(), srv.clone());
            tokio::spawn(async move {
                let reply = handle(&session, &req, Vec::new()).await;
                out.push_all(&mut vec![srv.reply_seg(reply, Some(hold))]);
                drop(permit);
            });
        }
    }
}

/// A (validated) read of a local file from the page cache, `None` when it is not all there.
fn cached_read(s: &Session, req: &Request) -> Option<Reply> {
    match &s.export.backend {
        Backend::File(st) => copy_cached(s, st, req),
        Backend::Proxy(_) => None,
    }
}

impl Server {
    /// `reply` ready to queue with the budget its request holds; an error reply is counted.
    fn reply_seg(&self, reply: Reply, hold: Option<Hold>) -> Seg {
        if reply.failed {
            self.stats.request_errors.fetch_add(1, Ordering::Relaxed);
        }
        Seg {
            bytes: reply.bytes,
            span: reply.span,
            _hold: hold,
        }
    }
}

/// A reply to write, with the budget its request holds until then.
struct Seg {
    bytes: Vec<u8>,
    /// Sent after `bytes`, straight from the page cache.
    span: Option<Span>,
    _hold: Option<Hold>,
}

impl Seg {
    fn len(&self) -> usize {
        self.bytes.len() + self.span.as_ref().map_or(0, |s| s.len)
    }
}

/// Part of a file that goes into a reply as it is (the data of a read).
struct Span {
    st: Arc<Storage>,
    offset: u64,
    len: usize,
}

/// Replies waiting to be written, in the order they completed.
#[derive(Default)]
struct Outbox {
    q: std::sync::Mutex<OutQueue>,
    /// Wakes the writer (a stored permit covers a push between its check and its wait).
    more: Notify,
    /// Wakes the reader when the writer has failed.
    dead: Notify,
}

#[derive(Default)]
struct OutQueue {
    segs: VecDeque<Seg>,
    writer_idle: bool,
    closed: bool,
    failed: bool,
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, OutQueue> {
        // A poisoned lock only means a panic elsewhere; the queue itself stays consistent.
        self.q.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queue replies (taken out of `v`), waking the writer if it is waiting. Once the
    /// writer has failed they are dropped at once (with the budget they hold).
    fn push_all(&self, v: &mut Vec<Seg>) {
        if v.is_empty() {
            return;
        }
        let wake = {
            let mut q = self.lock();
            if q.failed {
                v.clear();
                return;
            }
            q.segs.extend(v.drain(..));
            std::mem::take(&mut q.writer_idle)
        };
        if wake {
            self.more.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.more.notify_one();
    }

    /// The writer cannot go on: drop what it had queued and wake the reader.
    fn fail(&self) {
        let dropped = {
            let mut q = self.lock();
            q.failed = true;
            std::mem::take(&mut q.segs)
        };
        drop(dropped);
        self.dead.notify_waiters();
    }

    /// Returns once the writer has failed.
    async fn failed(&self) {
        loop {
            // Registered before the check: a failure after it still wakes this future.
            let dead = self.dead.notified();
            if self.lock().failed {
                return;
            }
            dead.await;
        }
    }
}

/// Await a write to the client. A write that makes no progress for the stall timeout
/// while another connection waits for the memory budget fails (counted): the client is
/// not reading its replies and holds budget others need.
async fn stalled<T>(
    budget: &Budget,
    f: impl std::future::Future<Output = io::Result<T>>,
) -> io::Result<T> {
    tokio::pin!(f);
    loop {
        match tokio::time::timeout(budget.stall_timeout(), &mut f).await {
            Ok(r) => return r,
            Err(_) if budget.contended() => {
                budget.stalled.fetch_add(1, Ordering::Relaxed);
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "replies not read while the memory budget is short",
                ));
            }
            Err(_) => {}
        }
    }
}

/// Write the replies in `ready` from the reader itself when the connection's writer is idle
/// (no hand-off to another task), else queue them for the writer.
async fn send_ready<W: AsyncWrite + Unpin>(
    wr: &tokio::sync::Mutex<W>,
    out: &Outbox,
    ready: &mut Vec<Seg>,
    budget: &Budget,
    direct: Option<&AsyncFd<OwnedFd>>,
) -> io::Result<()> {
    if ready.is_empty() {
        return Ok(());
    }
    match wr.try_lock() {
        Ok(mut w) => {
            let mut segs = VecDeque::from(std::mem::take(ready));
            write_segments(&mut *w, &mut segs, budget, direct).await?;
            stalled(budget, w.flush()).await?;
            // Empty now: its allocation is kept for the next replies.
            *ready = Vec::from(segs);
        }
        Err(_) => out.push_all(ready),
    }
    Ok(())
}

/// The writer of a connection, for replies completed on other tasks (the reader writes its
/// inline replies itself when the socket is free): takes every queued reply at once and
/// writes them with one gathered write (more if the socket takes less).
async fn write_replies<W: AsyncWrite + Unpin>(
    wr: Arc<tokio::sync::Mutex<W>>,
    out: Arc<Outbox>,
    srv: Arc<Server>,
    direct: Option<Arc<AsyncFd<OwnedFd>>>,
) -> io::Result<()> {
    let r = async {
        let mut segs: VecDeque<Seg> = VecDeque::new();
        loop {
            let more = out.more.notified();
            let closed = {
                let mut q = out.lock();
                std::mem::swap(&mut segs, &mut q.segs);
                q.writer_idle = segs.is_empty();
                q.closed
            };
            if segs.is_empty() {
                if closed {
                    break;
                }
                more.await;
                continue;
            }
            let mut w = wr.lock().await;
            write_segments(&mut *w, &mut segs, &srv.budget, direct.as_deref()).await?;
            stalled(&srv.budget, w.flush()).await?;
        }
        let mut w = wr.lock().await;
        stalled(&srv.budget, w.flush()).await?;
        let _ = w.shutdown().await;
        Ok(())
    }
    .await;
    if r.is_err() {
        out.fail();
    }
    r
}

/// Write every segment (emptying `segs`, each dropped with its budget once written): the
/// bytes of consecutive replies with one gathered write, the file spans with `sendfile` on
/// `sock` (the same socket as `wr`, which buffers nothing, so the stream keeps its order).
async fn write_segments<W: AsyncWrite + Unpin>(
    wr: &mut W,
    segs: &mut VecDeque<Seg>,
    budget: &Budget,
    sock: Option<&AsyncFd<OwnedFd>>,
) -> io::Result<()> {
    const MAX_IOV: usize = 512;
    let replies = segs.len();
    let mut skip = 0; // bytes of the front segment already written
    while let Some(front) = segs.front() {
        if skip >= front.len() {
            skip -= front.len();
            segs.pop_front();
            continue;
        }
        let n = match &front.span {
            Some(span) if skip >= front.bytes.len() => {
                send_span(wr, sock, span, skip - front.bytes.len(), budget).await?
            }
            _ if wr.is_write_vectored() => {
                let mut iov: Vec<io::IoSlice<'_>> = Vec::with_capacity(segs.len().min(MAX_IOV));
                iov.push(io::IoSlice::new(&front.bytes[skip..]));
                if front.span.is_none() {
                    // Up to (and including) the header of the next reply with a span.
                    for s in segs.iter().skip(1).take(MAX_IOV - 1) {
                        iov.push(io::IoSlice::new(&s.bytes));
                        if s.span.is_some() {
                            break;
                        }
                    }
                }
                stalled(budget, wr.write_vectored(&iov)).await?
            }
            _ => stalled(budget, wr.write(&front.bytes[skip..])).await?,
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        skip += n;
    }
    tracing::trace!(replies, "replies written");
    Ok(())
}

/// Send part of `span` from byte `done` on; returns the bytes sent. With the socket, the
/// page cache's pages go to it without a copy; without it (or past the end of a file that
/// shrank since the request was checked, where the rest reads as zeroes) the data goes
/// through memory and `wr`.
async fn send_span<W: AsyncWrite + Unpin>(
    wr: &mut W,
    sock: Option<&AsyncFd<OwnedFd>>,
    span: &Span,
    done: usize,
    budget: &Budget,
) -> io::Result<usize> {
    let offset = span.offset + done as u64;
    let len = (span.len - done).min(SEND_CHUNK);
    if let Some(sock) = sock {
        loop {
            let mut ready = stalled(budget, sock.writable()).await?;
            match ready.try_io(|fd| span.st.send_to(fd.get_ref().as_fd(), offset, len)) {
                Ok(Ok(0)) => break,
                Ok(r) => return r,
                Err(_would_block) => {}
            }
        }
    }
    let mut buf = vec![0u8; len.min(256 << 10)];
    span.st.read_at(&mut buf, offset)?;
    stalled(budget, wr.write(&buf)).await
}

/// What [`serve_inline`] may use.
struct Inline<'a> {
    /// Read replies may be sent from the page cache to the socket.
    direct: bool,
    /// The write lane has nothing queued or in progress (a write done here cannot pass one
    /// sent before it).
    lane_idle: bool,
    /// Its payload buffers and counters.
    srv: &'a Server,
}

/// Serve a request on the spot when that cannot block for long: small reads the page cache
/// holds, writes of `SMALL_WRITE`-`INLINE_WRITE` bytes without FUA to a local file while
/// its lane is idle (a page-cache copy, the payload spliced from the socket when it is not
/// all in the read buffer), and reads that fail validation. `None`: the request goes its
/// usual way (its payload, if any, is still unread).
async fn serve_inline<R: AsyncRead + Unpin>(
    s: &Session,
    req: &Request,
    rd: &mut BufReader<Stream<R>>,
    how: Inline<'_>,
) -> Result<Option<Reply>, ServerError> {
    let Backend::File(st) = &s.export.backend else {
        return Ok(None);
    };
    match req.typ {
        cmd::READ if how.direct => {
            if let Err(e) = validate(s, req) {
                return Ok(Some(error_reply(s, req, e)));
            }
            let len = req.length as usize;
            if len <= INLINE_READ {
                return Ok(copy_cached(s, st, req));
            }
            if !st.cached(req.offset, u64::from(req.length)) {
                return Ok(None);
            }
            Ok(Some(Reply {
                bytes: read_reply_header(s, req),
                span: Some(Span {
                    st: st.clone(),
                    offset: req.offset,
                    len,
                }),
                failed: false,
            }))
        }
        cmd::READ if req.length as usize <= INLINE_READ => {
            if let Err(e) = validate(s, req) {
                return Ok(Some(error_reply(s, req, e)));
            }
            Ok(copy_cached(s, st, req))
        }
        cmd::WRITE
            if how.lane_idle
                && (SMALL_WRITE + 1..=INLINE_WRITE).contains(&(req.length as usize))
                && req.flags & cflag::FUA == 0 =>
        {
            let len = req.length as usize;
            let v = validate(s, req);
            let write = |data: &[u8]| match &v {
                Ok(()) => st.write_at(data, req.offset),
                Err(_) => Ok(()),
            };
            // The payload straight from the read buffer when it is all there, else spliced
            // from the socket (a valid write), else read into a buffer.
            let r = if rd.buffer().len() >= len {
                let r = write(&rd.buffer()[..len]);
                rd.consume(len);
                r
            } else {
                let spliced = match &v {
                    Ok(()) => Splicer::write(rd, st, req.offset, len, how.srv).await?,
                    Err(_) => Outcome::NotTaken,
                };
                match spliced {
                    Outcome::Written(r) => r,
                    Outcome::NotTaken => {
                        let mut buf = how.srv.write_buffers.take(len);
                        rd.read_exact(&mut buf).await?;
                        let r = write(&buf);
                        how.srv.write_buffers.put(buf);
                        r
                    }
                }
            };
            Ok(Some(match (v, r) {
                (Err(e), _) => error_reply(s, req, e),
                (Ok(()), Err(e)) => error_reply(s, req, e.into()),
                (Ok(()), Ok(())) => ok_reply(req),
            }))
        }
        _ => Ok(None),
    }
}

/// A (validated) read copied from the page cache into its reply, if the page cache holds
/// all of it; `None` when it must wait for the disk.
fn copy_cached(s: &Session, st: &Storage, req: &Request) -> Option<Reply> {
    let mut buf = read_reply_header(s, req);
    let hdr = buf.len();
    buf.resize(hdr + req.length as usize, 0);
    match st.read_cached(&mut buf[hdr..], req.offset) {
        Ok(true) => Some(Reply {
            bytes: buf,
            span: None,
            failed: false,
        }),
        Ok(false) => None,
        Err(e) => Some(error_reply(s, req, e.into())),
    }
}

/// The header of a successful read reply.
fn read_reply_header(s: &Session, req: &Request) -> Vec<u8> {
    if s.structured {
        proto::encode_offset_data_header(chunk::FLAG_DONE, req.cookie, req.offset, req.length)
    } else {
        SimpleReply {
            error: 0,
            cookie: req.cookie,
        }
        .encode()
        .to_vec()
    }
}

struct Reply {
    bytes: Vec<u8>,
    /// File data that follows `bytes`.
    span: Option<Span>,
    failed: bool,
}

fn error_reply(s: &Session, req: &Request, e: OpError) -> Reply {
    let bytes = if s.structured && (req.typ == cmd::READ || req.typ == cmd::BLOCK_STATUS) {
        Chunk::Error {
            error: e.errno,
            message: e.msg,
        }
        .encode(chunk::FLAG_DONE, req.cookie)
    } else {
        SimpleReply {
            error: e.errno,
            cookie: req.cookie,
        }
        .encode()
        .to_vec()
    };
    Reply {
        bytes,
        span: None,
        failed: true,
    }
}

fn ok_reply(req: &Request) -> Reply {
    Reply {
        bytes: SimpleReply {
            error: 0,
            cookie: req.cookie,
        }
        .encode()
        .to_vec(),
        span: None,
        failed: false,
    }
}

/// Bytes of the memory budget a request holds until its reply is written: its read data or
/// write payload (refused beyond the maximum block size, so never more), or the largest
/// block status reply; a header for the rest. Reply headers of reads and writes ride in
/// the unit rounding, so a share of N MiB holds N reads of 1 MiB.
fn held_bytes(req: &Request) -> u64 {
    match req.typ {
        cmd::READ | cmd::WRITE => u64::from(req.length.min(MAX_PAYLOAD)),
        cmd::BLOCK_STATUS => BLOCK_STATUS_HOLD,
        _ => HEADER_HOLD,
    }
}

/// Check a request against the export and the negotiated session.
fn validate(s: &Session, req: &Request) -> Result<(), OpError> {
    let known = cflag::FUA | cflag::NO_HOLE | cflag::DF | cflag::REQ_ONE | cflag::FAST_ZERO;
    if req.flags & !known != 0 {
        return Err(OpError::new(err::EINVAL, "unknown command flags"));
    }
    let ranged = matches!(
        req.typ,
        cmd::READ | cmd::WRITE | cmd::TRIM | cmd::CACHE | cmd::WRITE_ZEROES | cmd::BLOCK_STATUS
    );
    if !ranged && req.typ != cmd::FLUSH {
        return Err(OpError::new(err::EINVAL, "unknown command"));
    }
    let writes = matches!(req.typ, cmd::WRITE | cmd::TRIM | cmd::WRITE_ZEROES);
    if writes && s.export.read_only {
        return Err(OpError::new(err::EPERM, "export is read-only"));
    }
    if req.flags & cflag::FAST_ZERO != 0 {
        return Err(OpError::new(err::EINVAL, "fast zero not negotiated"));
    }
    if req.flags & cflag::DF != 0 && !(s.structured && req.typ == cmd::READ) {
        return Err(OpError::new(
            err::EINVAL,
            "DF only applies to structured reads",
        ));
    }
    if !ranged {
        return Ok(());
    }
    let size = s.export.backend.size();
    let end = req.offset.checked_add(u64::from(req.length));
    if end.is_none_or(|e| e > size) {
        let e = if matches!(req.typ, cmd::WRITE | cmd::WRITE_ZEROES) {
            err::ENOSPC
        } else {
            err::EINVAL
        };
        return Err(OpError::new(e, "request beyond the end of the export"));
    }
    if s.min_block > 1 {
        let m = u64::from(s.min_block);
        if req.offset % m != 0 || u64::from(req.length) % m != 0 {
            return Err(OpError::new(
                err::EINVAL,
                "request not aligned to the minimum block size",
            ));
        }
    }
    if req.typ == cmd::READ && req.length > s.max_payload {
        let e = if s.structured {
            err::EOVERFLOW
        } else {
            err::EINVAL
        };
        return Err(OpError::new(e, "read larger than the maximum block size"));
    }
    if req.typ == cmd::BLOCK_STATUS {
        if !s.structured || !s.base_alloc {
            return Err(OpError::new(err::EINVAL, "no metadata context negotiated"));
        }
        if req.length == 0 {
            return Err(OpError::new(err::EINVAL, "empty block status request"));
        }
    }
    Ok(())
}

async fn handle(s: &Session, req: &Request, payload: Vec<u8>) -> Reply {
    match run(s, req, payload).await {
        Ok(r) => r,
        Err(e) => error_reply(s, req, e),
    }
}

async fn run(s: &Session, req: &Request, payload: Vec<u8>) -> Result<Reply, OpError> {
    validate(s, req)?;
    let b = &s.export.backend;
    let fua = req.flags & cflag::FUA != 0;
    let off = req.offset;
    let len = u64::from(req.length);
    match req.typ {
        cmd::READ => {
            let (hdr, bytes) = if s.structured {
                let h =
                    proto::encode_offset_data_header(chunk::FLAG_DONE, req.cookie, off, req.length);
                (h.len(), h)
            } else {
                let h = SimpleReply {
                    error: 0,
                    cookie: req.cookie,
                }
                .encode()
                .to_vec();
                (h.len(), h)
            };
            let mut buf = vec![0u8; hdr + req.length as usize];
            buf[..hdr].copy_from_slice(&bytes);
            let buf = b.read(off, buf, hdr).await?;
            Ok(Reply {
                bytes: buf,
                span: None,
                failed: false,
            })
        }
        cmd::WRITE => {
            b.write(off, payload, fua).await?;
            Ok(ok_reply(req))
        }
        cmd::FLUSH => {
            b.flush().await?;
            Ok(ok_reply(req))
        }
        cmd::TRIM => {
            b.trim(off, len, fua).await?;
            Ok(ok_reply(req))
        }
        cmd::WRITE_ZEROES => {
            b.write_zeroes(off, len, req.flags & cflag::NO_HOLE == 0, fua)
                .await?;
            Ok(ok_reply(req))
        }
        cmd::CACHE => {
            b.cache(off, len).await?;
            Ok(ok_reply(req))
        }
        cmd::BLOCK_STATUS => {
            let max = if req.flags & cflag::REQ_ONE != 0 {
                1
            } else {
                (MAX_PAYLOAD as usize - 4) / 8
            };
            let ext = b.block_status(off, len, max.min(1 << 16)).await?;
            let extents: Vec<(u32, u32)> = ext
                .into_iter()
                .filter(|e| e.0 > 0)
                .map(|(l, f)| (l as u32, f))
                .collect();
            if extents.is_empty() {
                return Err(OpError::new(err::EIO, "no extents"));
            }
            Ok(Reply {
                bytes: Chunk::BlockStatus {
                    context: BASE_ALLOCATION_ID,
                    extents,
                }
                .encode(chunk::FLAG_DONE, req.cookie),
                span: None,
                failed: false,
            })
        }
        _ => Err(OpError::new(err::EINVAL, "unknown command")),
    }
}
