//! The write lane of a connection to a local file: its writes, write-zeroes, trims and
//! flushes, applied in the order they arrived by one thread of the blocking pool at a time,
//! while the connection's reader goes on receiving the next requests.
//!
//! Why: the reader reads a payload into a pooled buffer, hands it to the lane and reads on,
//! so receiving the next requests overlaps writing this one, and every modifying command
//! of a connection has one order. Writes of 64-256 KiB without FUA are still written by
//! the reader itself while the lane is idle (`transmit.rs`, `INLINE_WRITE`): handing each
//! of a sequential copy's 256 KiB writes to the lane measured no faster on a busy 2-core
//! machine and cost 40-50% more server CPU per GiB (docs/BENCH-NBD.md, "Write lane").
//!
//! Wake-ups: handing work to another thread costs a wake-up and a context switch, which on
//! a busy machine costs as much as the copy it overlaps. So an idle lane is started only
//! once `LANE_START` bytes (or `LANE_START_OPS` operations) are queued, or when the reader
//! is about to wait (for the socket, the budget, a permit or room in the lane); while a
//! thread is on the lane, what is pushed joins its next batch without a wake-up. A reader
//! that finds the lane full waits until it is down to half (`LANE_LOW`), then reads several
//! payloads in a row.
//!
//! Order: a lane is drained by at most one thread at a time, in arrival order, so
//! overlapping writes of one connection land in request order (the NBD spec allows any
//! order for requests in flight together; a client that sends overlapping writes without
//! waiting gets what it sent last). FLUSH runs in the lane too, so it covers every write of
//! its connection that arrived before it, not only those already replied to (which is all
//! the spec asks), and with `fdatasync` of the file it covers the replied writes of every
//! other connection (multi-conn). FUA writes and flushes of one drained batch share one
//! `fdatasync`, done before their replies are queued.
//!
//! Bounds: an operation holds its in-flight permit (at most `MAX_IN_FLIGHT` per connection)
//! and its share of the memory budget (a write: its payload) from before the payload was
//! read until its reply is written, as every request does; a client that sends writes and
//! never reads the replies therefore holds at most its connection's share. On top of that
//! the reader reads the next payload only while the lane holds less than `LANE_BYTES` of
//! payloads not yet written (or none): queueing more would not write faster, and it keeps
//! the buffers in use few enough to come back to the pool instead of being allocated and
//! freed (and faulted in) for every write. Buffers go back to the server's pool once
//! written; the permit goes only after the reply is queued (the connection's end waits for
//! every permit, then for the queued replies).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use tokio::sync::{Notify, OwnedSemaphorePermit};

use super::{error_reply, ok_reply, Outbox, Seg, Server, Session};
use crate::budget::Hold;
use crate::op::OpError;
use crate::proto::{cflag, cmd, err, Request};
use crate::storage::Storage;

/// Bytes written after which the replies so far are queued before the rest of a batch (so
/// a window of large writes is answered as it goes, not only at the batch's end).
const REPLY_EVERY: usize = 1 << 20;
/// Bytes of payloads a lane holds before the reader waits for it (a new payload is read
/// only below it, or into an empty lane). Small, so the buffers stay in the CPU's caches
/// between the socket copy and the page-cache copy.
const LANE_BYTES: usize = 1 << 20;
/// A reader that waited for room resumes once the lane holds no more than this.
const LANE_LOW: usize = LANE_BYTES / 2;
/// Bytes queued that start an idle lane without waiting for the reader to run dry.
const LANE_START: usize = 512 << 10;
/// Operations queued that start an idle lane likewise.
const LANE_START_OPS: usize = 32;

/// One operation handed to the lane: a validated request, its payload (writes only) and
/// what it holds until its reply is written.
pub(super) struct LaneOp {
    pub req: Request,
    pub data: Vec<u8>,
    pub hold: Hold,
    pub permit: OwnedSemaphorePermit,
}

/// The write lane of one connection.
pub(super) struct WriteLane {
    st: Arc<Storage>,
    session: Arc<Session>,
    out: Arc<Outbox>,
    srv: Arc<Server>,
    state: Mutex<LaneState>,
    /// Signalled as operations are done (the reader may be waiting for room).
    done: Notify,
}

#[derive(Default)]
struct LaneState {
    ops: VecDeque<LaneOp>,
    /// Payload bytes pushed and not yet written.
    bytes: usize,
    /// A thread is applying the lane's operations (and takes what is pushed meanwhile).
    draining: bool,
}

impl WriteLane {
    pub fn new(
        st: Arc<Storage>,
        session: Arc<Session>,
        out: Arc<Outbox>,
        srv: Arc<Server>,
    ) -> Self {
        WriteLane {
            st,
            session,
            out,
            srv,
            state: Mutex::default(),
            done: Notify::new(),
        }
    }

    /// Whether `req` goes through the lane (the connection's modifying commands and
    /// flushes).
    pub fn takes(req: &Request) -> bool {
        matches!(
            req.typ,
            cmd::WRITE | cmd::WRITE_ZEROES | cmd::TRIM | cmd::FLUSH
        )
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LaneState> {
        // A poisoned lock only means a panic elsewhere; the queue itself stays consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether nothing is queued or in progress.
    pub fn is_idle(&self) -> bool {
        let s = self.lock();
        s.ops.is_empty() && !s.draining
    }

    /// Whether a payload of `len` bytes may be read now (see `LANE_BYTES`).
    pub fn has_room(&self, len: usize) -> bool {
        let bytes = self.lock().bytes;
        bytes == 0 || bytes + len <= LANE_BYTES
    }

    /// Returns once a payload of `len` bytes may be read, the lane down to `LANE_LOW`.
    pub async fn room(self: &Arc<Self>, len: usize) {
        self.kick();
        loop {
            // Registered before the check: an operation done after it still wakes this.
            let done = self.done.notified();
            let bytes = self.lock().bytes;
            if bytes == 0 || (bytes <= LANE_LOW && bytes + len <= LANE_BYTES) {
                return;
            }
            done.await;
        }
    }

    /// Queue `op` after every operation pushed before it. An idle lane is started once
    /// enough is queued (else by [`WriteLane::kick`]).
    pub fn push(self: &Arc<Self>, op: LaneOp) {
        let start = {
            let mut s = self.lock();
            s.bytes += op.data.len();
            s.ops.push_back(op);
            let enough = s.bytes >= LANE_START || s.ops.len() >= LANE_START_OPS;
            enough && !std::mem::replace(&mut s.draining, true)
        };
        if start {
            self.start();
        }
    }

    /// Start a thread on the queued operations if none is on them: the reader calls this
    /// before anything that may wait.
    pub fn kick(self: &Arc<Self>) {
        let start = {
            let mut s = self.lock();
            !s.ops.is_empty() && !std::mem::replace(&mut s.draining, true)
        };
        if start {
            self.start();
        }
    }

    fn start(self: &Arc<Self>) {
        let lane = self.clone();
        tokio::task::spawn_blocking(move || lane.drain());
    }

    /// Apply the queued operations, batch after batch, until none is left.
    fn drain(&self) {
        let mut batch = VecDeque::new();
        loop {
            {
                let mut s = self.lock();
                if s.ops.is_empty() {
                    s.draining = false;
                    return;
                }
                std::mem::swap(&mut batch, &mut s.ops);
            }
            self.apply(&mut batch);
        }
    }

    /// Apply a batch in order and queue its replies: those of FUA writes and flushes after
    /// one `fdatasync` at the end, the others as they go (every `REPLY_EVERY` bytes).
    fn apply(&self, batch: &mut VecDeque<LaneOp>) {
        let mut replies: Vec<Seg> = Vec::new();
        let mut permits: Vec<OwnedSemaphorePermit> = Vec::new();
        let mut durable: Vec<(Request, Hold, OwnedSemaphorePermit)> = Vec::new();
        let mut written = 0;
        for LaneOp {
            req,
            data,
            hold,
            permit,
        } in batch.drain(..)
        {
            let r = self.run(&req, &data);
            let len = data.len();
            written += len;
            self.srv.write_buffers.put(data);
            if len > 0 {
                let left = {
                    let mut s = self.lock();
                    s.bytes -= len;
                    s.bytes
                };
                if left <= LANE_LOW {
                    self.done.notify_one();
                }
            }
            if r.is_ok() && (req.typ == cmd::FLUSH || req.flags & cflag::FUA != 0) {
                durable.push((req, hold, permit));
                continue;
            }
            replies.push(self.reply(&req, r, hold));
            permits.push(permit);
            if written >= REPLY_EVERY {
                self.out.push_all(&mut replies);
                permits.clear();
                written = 0;
            }
        }
        if !durable.is_empty() {
            let synced = self.st.sync().map_err(OpError::from);
            for (req, hold, permit) in durable {
                replies.push(self.reply(&req, synced.clone(), hold));
                permits.push(permit);
            }
        }
        self.out.push_all(&mut replies);
        drop(permits);
    }

    fn run(&self, req: &Request, data: &[u8]) -> Result<(), OpError> {
        let len = u64::from(req.length);
        match req.typ {
            cmd::WRITE => self.st.write_at(data, req.offset)?,
            cmd::WRITE_ZEROES => {
                self.st
                    .write_zeroes(req.offset, len, req.flags & cflag::NO_HOLE == 0)?
            }
            cmd::TRIM => self.st.trim(req.offset, len)?,
            cmd::FLUSH => {}
            _ => return Err(OpError::new(err::EINVAL, "unknown command")),
        }
        Ok(())
    }

    fn reply(&self, req: &Request, r: Result<(), OpError>, hold: Hold) -> Seg {
        let reply = match r {
            Ok(()) => ok_reply(req),
            Err(e) => error_reply(&self.session, req, e),
        };
        self.srv.reply_seg(reply, Some(hold))
    }
}
