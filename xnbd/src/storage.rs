//! A file or block device accessed with positional I/O only, so that any number of requests
//! can run on it at once from the blocking pool.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::Path;

use crate::proto::{STATE_HOLE, STATE_ZERO};
use crate::sys;

/// Largest single zero-filled write used when the file system cannot zero a range.
const ZERO_CHUNK: u64 = 1 << 20;

/// A local image.
#[derive(Debug)]
pub struct Storage {
    file: File,
    size: u64,
    block_device: bool,
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

    /// Move up to `len` bytes from `pipe` into the file at `offset` (see
    /// [`sys::splice_to_file`]); returns the bytes written.
    pub fn splice_from(
        &self,
        pipe: std::os::fd::BorrowedFd<'_>,
        offset: u64,
        len: usize,
    ) -> io::Result<usize> {
        sys::splice_to_file(pipe, &self.file, offset, len)
    }

    /// Write all of `data` at `offset`.
    pub fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(data, offset)
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

#[cfg(test)]
mod tests {
    use super::*;

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
