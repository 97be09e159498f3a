//! What an export is served from: a local file (target mode) or the migration proxy.
//! Each operation runs on its own (blocking-pool) task with positional I/O, so requests of
//! one connection and of all connections proceed at once.

use std::sync::Arc;

use crate::op::{blocking, OpError};
use crate::proxy::Proxy;
use crate::storage::Storage;

/// Largest read tried inline on the async threads.
const INLINE_READ: usize = 64 << 10;

/// Where an export's data lives.
#[derive(Debug, Clone)]
pub enum Backend {
    /// A local file or block device.
    File(Arc<Storage>),
    /// The migration proxy (local cache in front of a remote source).
    Proxy(Arc<Proxy>),
}

impl Backend {
    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        match self {
            Backend::File(s) => s.size(),
            Backend::Proxy(p) => p.size(),
        }
    }

    /// Read `buf.len() - start` bytes at `offset` into `buf[start..]`.
    pub async fn read(
        &self,
        offset: u64,
        mut buf: Vec<u8>,
        start: usize,
    ) -> Result<Vec<u8>, OpError> {
        match self {
            Backend::File(s) => {
                // Small page-cache hits are served on the spot (the hand-off to the blocking
                // pool would cost more than the copy); large or uncached reads go to the pool.
                if buf.len() - start <= INLINE_READ && s.read_cached(&mut buf[start..], offset)? {
                    return Ok(buf);
                }
                let s = s.clone();
                blocking(move || {
                    s.read_at(&mut buf[start..], offset)?;
                    Ok(buf)
                })
                .await
            }
            Backend::Proxy(p) => p.read(offset, buf, start).await,
        }
    }

    /// Write `data` at `offset`; durable before returning when `fua`.
    pub async fn write(&self, offset: u64, data: Vec<u8>, fua: bool) -> Result<(), OpError> {
        match self {
            Backend::File(s) => {
                let s = s.clone();
                blocking(move || {
                    s.write_at(&data, offset)?;
                    if fua {
                        s.sync()?;
                    }
                    Ok(())
                })
                .await
            }
            Backend::Proxy(p) => p.write(offset, data, fua).await,
        }
    }

    /// Make all completed writes durable.
    pub async fn flush(&self) -> Result<(), OpError> {
        match self {
            Backend::File(s) => {
                let s = s.clone();
                blocking(move || Ok(s.sync()?)).await
            }
            Backend::Proxy(p) => p.flush().await,
        }
    }

    /// Discard a range.
    pub async fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), OpError> {
        match self {
            Backend::File(s) => {
                let s = s.clone();
                blocking(move || {
                    s.trim(offset, len)?;
                    if fua {
                        s.sync()?;
                    }
                    Ok(())
                })
                .await
            }
            Backend::Proxy(p) => p.trim(offset, len, fua).await,
        }
    }

    /// Zero a range (`may_trim`: holes allowed).
    pub async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), OpError> {
        match self {
            Backend::File(s) => {
                let s = s.clone();
                blocking(move || {
                    s.write_zeroes(offset, len, may_trim)?;
                    if fua {
                        s.sync()?;
                    }
                    Ok(())
                })
                .await
            }
            Backend::Proxy(p) => p.write_zeroes(offset, len, may_trim, fua).await,
        }
    }

    /// Prefetch a range.
    pub async fn cache(&self, offset: u64, len: u64) -> Result<(), OpError> {
        match self {
            Backend::File(s) => {
                let s = s.clone();
                blocking(move || {
                    // A hint: failure to prefetch is not an error of the request.
                    let _ = s.cache(offset, len);
                    Ok(())
                })
                .await
            }
            Backend::Proxy(p) => p.cache(offset, len).await,
        }
    }

    /// `base:allocation` extents for a range, at most `max`.
    pub async fn block_status(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<(u64, u32)>, OpError> {
        match self {
            Backend::File(s) => {
                let s = s.clone();
                blocking(move || Ok(s.extents(offset, len, max)?)).await
            }
            Backend::Proxy(p) => p.block_status(offset, len, max).await,
        }
    }
}
