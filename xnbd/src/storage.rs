//! A file or block device accessed with positional I/O only, so that any number of requests
//! can run on it at once from the blocking pool, plus four writer threads per file for small
//! client writes.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;
use std::sync::{mpsc, Arc, Mutex, OnceLock};

use crate::proto::{STATE_HOLE, STATE_ZERO};
use crate::sys;

/// Writer threads per file. Buffered writes to one file serialise on its inode lock, but
/// with more than one thread a batch can start the moment another's write is done even when
/// that thread is waiting for a CPU (two measured slightly ahead of one, and well ahead of
/// a thread per request, which spins on the lock; four keep up with the runtime's eight
/// threads on a busy machine, where the scheduler shares the CPUs out per thread).
const WRITERS: usize = 4;

/// Largest single zero-filled write used when the file system cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

/// One write of a batch queued for the file's writer threads.
#[derive(Debug)]
pub struct QueuedWrite {
    /// Where in the file.
    pub offset: u64,
    /// What (written whole).
    pub data: Vec<u8>,
}

/// Runs on a writer thread once a batch is written, with the result of each write in
/// batch order.
pub type WritesDone = Box<dyn FnOnce(Vec<io::Result<()>>) + Send>;

struct WriteBatch {
    writes: Vec<QueuedWrite>,
    done: WritesDone,
}

/// A local image.
#[derive(Debug)]
pub struct Storage {
    file: File,
    size: u64,
    block_device: bool,
    /// The writer threads' queue, started by the first queued write; the threads end when
    /// the storage is dropped and the queue is empty.
    writer: OnceLock<mpsc::Sender<WriteBatch>>,
}

impl Storage {
    /// Open `path` (read-only when `read_only`). The size is the file's length, or the
    /// device's size for a block device.
    pub fn open(path: &Path, read_only: bool) -> io::Result<Self> {
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        Self::from_file(file)
    }

    /// Wrap an open file.
    pub fn from_file(file: File) -> io::Result<Self> {
        let md = file.metadata()?;
        let block_device = md.file_type().is_block_device();
        let size = if block_device {
            (&file).seek(SeekFrom::End(0))?
        } else {
            md.len()
        };
        Ok(Self {
            file,
            size,
            block_device,
            writer: OnceLock::new(),
        })
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Read exactly `buf.len()` bytes at `offset` (zeroes past the end of a short file).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut done = 0;
        while done < buf.len() {
            match self.file.read_at(&mut buf[done..], offset + done as u64) {
                Ok(0) => {
                    buf[done..].fill(0);
                    return Ok(());
                }
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Read `buf` at `offset` if it can be done without blocking (all of it in the page
    /// cache); `Ok(false)` means the caller must use [`Storage::read_at`] off the async
    /// threads.
    pub fn read_cached(&self, buf: &mut [u8], offset: u64) -> io::Result<bool> {
        if buf.is_empty() {
            return Ok(true);
        }
        match sys::pread_nowait(&self.file, buf, offset)? {
            Some(n) if n == buf.len() => Ok(true),
            _ => Ok(false),
        }
    }

    /// Whether all of `[offset, offset+len)` is in the page cache, so that sending it cannot
    /// wait for the disk. `false` when the kernel cannot tell (logged once).
    pub fn cached(&self, offset: u64, len: u64) -> bool {
        static UNKNOWN: std::sync::Once = std::sync::Once::new();
        match sys::all_cached(&self.file, offset, len) {
            Ok(Some(c)) => c,
            Ok(None) => {
                UNKNOWN.call_once(|| {
                    tracing::info!("cachestat unavailable: large reads are copied through memory")
                });
                false
            }
            Err(_) => false,
        }
    }

    /// Send up to `len` bytes at `offset` straight from the page cache to the socket `sock`
    /// (see [`sys::sendfile`]).
    pub fn send_to(
        &self,
        sock: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        sys::sendfile(sock, &self.file, offset, len)
    }

    /// Write all of `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
    }

    /// Write a batch on one of the file's writer threads, in order, then call `done` there
    /// with the results. Buffered writes to one file serialise on its inode lock anyway: a
    /// thread per request only spins on that lock, while a couple of long-lived threads
    /// taking whole batches need one wake-up per batch instead of one per write. Batches
    /// may complete in any order. If no thread can be started, `done` gets the error for
    /// every write at once.
    pub fn queue_writes(&self, writes: Vec<QueuedWrite>, done: WritesDone) {
        let batch = WriteBatch { writes, done };
        let tx = match self.writer() {
            Ok(tx) => tx,
            Err(e) => return fail_batch(batch, &e),
        };
        if let Err(mpsc::SendError(batch)) = tx.send(batch) {
            fail_batch(batch, &io::Error::other("writer threads gone"));
        }
    }

    fn writer(&self) -> io::Result<&mpsc::Sender<WriteBatch>> {
        if let Some(tx) = self.writer.get() {
            return Ok(tx);
        }
        let (tx, rx) = mpsc::channel::<WriteBatch>();
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..WRITERS {
            let file = self.file.try_clone()?;
            let rx = rx.clone();
            std::thread::Builder::new()
                .name("xnbd-writer".into())
                .spawn(move || loop {
                    // The idle writer waits for the lock, the other for the next batch.
                    let b = match rx.lock().unwrap_or_else(|e| e.into_inner()).recv() {
                        Ok(b) => b,
                        Err(_) => break,
                    };
                    let results = b
                        .writes
                        .iter()
                        .map(|w| file.write_all_at(&w.data, w.offset))
                        .collect();
                    (b.done)(results);
                })?;
        }
        // Another caller may have won the race: its thread is used, this one ends at once.
        let _ = self.writer.set(tx);
        self.writer
            .get()
            .ok_or_else(|| io::Error::other("writer thread not set"))
    }

    /// Make everything written so far durable.
    pub fn sync(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Discard a range (advisory: unsupported file systems make it a no-op).
    pub fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.block_device {
            return Ok(());
        }
        match sys::punch_hole(&self.file, offset, len) {
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            r => r,
        }
    }

    /// Make a range read as zeroes; `may_trim` allows deallocating it.
    pub fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool) -> io::Result<()> {
        if !self.block_device {
            let r = if may_trim {
                sys::punch_hole(&self.file, offset, len)
            } else {
                sys::zero_range(&self.file, offset, len)
            };
            if r.is_ok() {
                return Ok(());
            }
        }
        let zeroes = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_CHUNK) as usize;
            self.write_at(&zeroes[..n], offset + done)?;
            done += n as u64;
        }
        Ok(())
    }

    /// Hint that a range will be read soon.
    pub fn cache(&self, offset: u64, len: u64) -> io::Result<()> {
        sys::willneed(&self.file, offset, len)
    }

    /// `base:allocation` extents from `offset`, at most `max` of them, covering the range
    /// `[offset, offset+len)` or a prefix of it when `max` runs out. Holes are reported as
    /// `HOLE|ZERO`, data as 0. Block devices and file systems without `SEEK_DATA` report one
    /// data extent.
    pub fn extents(&self, offset: u64, len: u64, max: usize) -> io::Result<Vec<(u64, u32)>> {
        let end = offset + len;
        let mut out: Vec<(u64, u32)> = Vec::new();
        if self.block_device {
            return Ok(vec![(len, 0)]);
        }
        let mut pos = offset;
        while pos < end {
            if out.len() >= max {
                // Fewer descriptors than the range needs is allowed: the client asks again.
                break;
            }
            let data = match sys::seek_data(&self.file, pos) {
                Ok(d) => d,
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(vec![(len, 0)]),
                Err(e) => return Err(e),
            };
            match data {
                None => {
                    out.push((end - pos, STATE_HOLE | STATE_ZERO));
                    break;
                }
                Some(d) if d > pos => {
                    let h = d.min(end);
                    out.push((h - pos, STATE_HOLE | STATE_ZERO));
                    pos = h;
                }
                Some(_) => {
                    let h = sys::seek_hole(&self.file, pos)?.unwrap_or(end).min(end);
                    let h = if h <= pos { end } else { h };
                    out.push((h - pos, 0));
                    pos = h;
                }
            }
        }
        Ok(out)
    }
}

fn fail_batch(b: WriteBatch, e: &io::Error) {
    let results = b
        .writes
        .iter()
        .map(|_| Err(io::Error::new(e.kind(), e.to_string())))
        .collect();
    (b.done)(results);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queued_writes_land_in_order_and_report_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let s = Storage::open(&p, false).unwrap();
        let (tx, rx) = mpsc::channel();
        for round in 0..3u8 {
            // Overlapping writes of one batch are applied in batch order.
            let writes = (0..8u8)
                .map(|i| QueuedWrite {
                    offset: 4096 * u64::from(i % 4),
                    data: vec![round * 16 + i; 4096],
                })
                .collect();
            let tx = tx.clone();
            s.queue_writes(
                writes,
                Box::new(move |r| tx.send(r.iter().all(|x| x.is_ok())).unwrap()),
            );
            // Batches may complete in any order: the next round waits.
            assert!(rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap());
        }
        let mut b = vec![0u8; 4 * 4096];
        s.read_at(&mut b, 0).unwrap();
        for i in 0..4 {
            assert!(b[i * 4096..(i + 1) * 4096]
                .iter()
                .all(|&x| x == 32 + 4 + i as u8));
        }
        // A read-only file: every write of the batch fails, and says so.
        let ro = Storage::open(&p, true).unwrap();
        let (tx, rx) = mpsc::channel();
        let writes = vec![
            QueuedWrite {
                offset: 0,
                data: vec![1; 512],
            },
            QueuedWrite {
                offset: 4096,
                data: vec![1; 512],
            },
        ];
        ro.queue_writes(
            writes,
            Box::new(move |r| tx.send(r.iter().filter(|x| x.is_err()).count()).unwrap()),
        );
        assert_eq!(
            rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap(),
            2
        );
    }

    #[test]
    fn extents_follow_holes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        drop(f);
        let s = Storage::open(&p, false).unwrap();
        s.write_at(&[1u8; 65536], 1 << 20).unwrap();
        let e = s.extents(0, 4 << 20, 64).unwrap();
        let total: u64 = e.iter().map(|x| x.0).sum();
        assert_eq!(total, 4 << 20);
        assert_eq!(e[0], (1 << 20, STATE_HOLE | STATE_ZERO));
        assert_eq!(e[1].1, 0);
        // A capped list covers a prefix, exactly.
        let e = s.extents(0, 4 << 20, 1).unwrap();
        assert_eq!(e, vec![(1 << 20, STATE_HOLE | STATE_ZERO)]);
        s.write_zeroes(1 << 20, 65536, true).unwrap();
        let mut b = vec![9u8; 65536];
        s.read_at(&mut b, 1 << 20).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }
}
