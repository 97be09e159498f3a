//! The persistent bitmap of blocks that are local.
//!
//! File layout (big-endian): `"XNBDBMP1"`, export size (u64), block size (u32), reserved
//! (u32), block count (u64), then one bit per block, block `i` in byte `32 + i/8`, bit
//! `i % 8` (least significant first).
//!
//! Crash safety rests on one ordering, kept by every caller: the block's data is written
//! to the cache file and `fdatasync`ed *before* [`Bitmap::set_durable`] sets its bit, and
//! `set_durable` returns only after the bitmap bytes are written and `fdatasync`ed too. A
//! crash at any point therefore leaves either "bit clear" (the block is fetched again) or
//! "bit set and data durable", never a set bit over missing data. Bits are only ever set,
//! and every bitmap write happens under one lock from a snapshot taken under that lock, so
//! a later write always carries every bit an earlier one did.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use thiserror::Error;

const MAGIC: &[u8; 8] = b"XNBDBMP1";
const HEADER: u64 = 32;

/// Bitmap errors.
#[derive(Debug, Error)]
pub enum BitmapError {
    /// File I/O failed.
    #[error("bitmap i/o: {0}")]
    Io(#[from] io::Error),
    /// The file is not a bitmap or belongs to another image.
    #[error("bitmap {0}")]
    Mismatch(String),
}

/// Blocks present locally.
#[derive(Debug)]
pub struct Bitmap {
    file: File,
    words: Vec<AtomicU64>,
    nblocks: u64,
    size: u64,
    block_size: u32,
    cached: AtomicU64,
    persist: Mutex<()>,
}

impl Bitmap {
    /// Open the bitmap at `path`, or create an empty one. An existing bitmap must describe
    /// the same export size and block size.
    pub fn open(path: &Path, size: u64, block_size: u32) -> Result<Self, BitmapError> {
        let nblocks = size.div_ceil(u64::from(block_size));
        let exists = path.exists();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let nbytes = nblocks.div_ceil(8);
        let mut bits = vec![0u8; nbytes as usize];
        if exists && file.metadata()?.len() > 0 {
            let mut h = [0u8; HEADER as usize];
            file.read_exact_at(&mut h, 0)?;
            if &h[0..8] != MAGIC {
                return Err(BitmapError::Mismatch("bad magic".into()));
            }
            let fsize = u64::from_be_bytes(h[8..16].try_into().unwrap_or_default());
            let fbs = u32::from_be_bytes(h[16..20].try_into().unwrap_or_default());
            let fn_ = u64::from_be_bytes(h[24..32].try_into().unwrap_or_default());
            if fsize != size || fbs != block_size || fn_ != nblocks {
                return Err(BitmapError::Mismatch(format!(
                    "describes size {fsize} block size {fbs}, expected {size}/{block_size}"
                )));
            }
            file.read_exact_at(&mut bits, HEADER)?;
        } else {
            let mut h = [0u8; HEADER as usize];
            h[0..8].copy_from_slice(MAGIC);
            h[8..16].copy_from_slice(&size.to_be_bytes());
            h[16..20].copy_from_slice(&block_size.to_be_bytes());
            h[24..32].copy_from_slice(&nblocks.to_be_bytes());
            file.write_all_at(&h, 0)?;
            file.write_all_at(&bits, HEADER)?;
            file.sync_all()?;
            if let Some(dir) = path.parent() {
                if let Ok(d) = File::open(if dir.as_os_str().is_empty() {
                    Path::new(".")
                } else {
                    dir
                }) {
                    let _ = d.sync_all();
                }
            }
        }
        let nwords = nblocks.div_ceil(64) as usize;
        let mut words = Vec::with_capacity(nwords);
        let mut cached = 0u64;
        for w in 0..nwords {
            let mut v = 0u64;
            for b in 0..8 {
                let i = w * 8 + b;
                if i < bits.len() {
                    v |= u64::from(bits[i]) << (8 * b);
                }
            }
            // Ignore bits past the last block.
            let first = (w as u64) * 64;
            if first + 64 > nblocks {
                let keep = nblocks - first;
                v &= (1u64 << keep) - 1;
            }
            cached += u64::from(v.count_ones());
            words.push(AtomicU64::new(v));
        }
        Ok(Self {
            file,
            words,
            nblocks,
            size,
            block_size,
            cached: AtomicU64::new(cached),
            persist: Mutex::new(()),
        })
    }

    /// Number of blocks.
    pub fn nblocks(&self) -> u64 {
        self.nblocks
    }

    /// Export size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Block size.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Blocks present locally.
    pub fn cached(&self) -> u64 {
        self.cached.load(Ordering::Acquire)
    }

    /// Whether every block is local.
    pub fn complete(&self) -> bool {
        self.cached() == self.nblocks
    }

    /// Whether block `i` is local.
    pub fn is_set(&self, i: u64) -> bool {
        i < self.nblocks
            && self.words[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }

    /// First block >= `from` that is not local.
    pub fn next_missing(&self, from: u64) -> Option<u64> {
        let mut i = from;
        while i < self.nblocks {
            let w = self.words[(i / 64) as usize].load(Ordering::Acquire);
            let inv = !w >> (i % 64);
            if inv != 0 {
                let c = i + u64::from(inv.trailing_zeros());
                return (c < self.nblocks).then_some(c);
            }
            i = (i / 64 + 1) * 64;
        }
        None
    }

    /// Mark blocks `[a, b)` of every run as local and make that durable. The caller must
    /// have made the blocks' data durable first (see the module documentation).
    pub fn set_durable(&self, runs: &[(u64, u64)]) -> io::Result<()> {
        if runs.is_empty() {
            return Ok(());
        }
        let _g = self
            .persist
            .lock()
            .map_err(|_| io::Error::other("bitmap lock poisoned"))?;
        for &(a, b) in runs {
            for i in a..b.min(self.nblocks) {
                let old = self.words[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::AcqRel);
                if old & (1 << (i % 64)) == 0 {
                    self.cached.fetch_add(1, Ordering::AcqRel);
                }
            }
        }
        for &(a, b) in runs {
            let b = b.min(self.nblocks);
            if a >= b {
                continue;
            }
            let first = a / 8;
            let last = (b - 1) / 8;
            let bytes: Vec<u8> = (first..=last)
                .map(|byte| {
                    let w = self.words[(byte / 8) as usize].load(Ordering::Acquire);
                    (w >> (8 * (byte % 8))) as u8
                })
                .collect();
            self.file.write_all_at(&bytes, HEADER + first)?;
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_survive_reopen() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("bm");
        let size = 1000 * 4096 + 7;
        let b = Bitmap::open(&p, size, 4096).unwrap();
        assert_eq!(b.nblocks(), 1001);
        assert_eq!(b.next_missing(0), Some(0));
        b.set_durable(&[(0, 3), (63, 65), (1000, 1001)]).unwrap();
        assert_eq!(b.cached(), 6);
        assert_eq!(b.next_missing(0), Some(3));
        assert_eq!(b.next_missing(63), Some(65));
        drop(b);
        let b = Bitmap::open(&p, size, 4096).unwrap();
        assert_eq!(b.cached(), 6);
        assert!(b.is_set(64) && b.is_set(1000) && !b.is_set(999));
        b.set_durable(&[(0, 1001)]).unwrap();
        assert!(b.complete());
        assert_eq!(b.next_missing(0), None);
        assert!(Bitmap::open(&p, size, 8192).is_err());
    }
}
