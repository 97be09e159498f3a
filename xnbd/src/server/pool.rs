//! Payload buffers of client writes, reused from request to request (no allocation per
//! write once warm, and no zero-fill when a buffer comes back for a write of its size).

use std::sync::Mutex;

/// Bytes of idle buffers kept, all connections together (more are freed). Buffers in use
/// are held against the memory budget like every payload; these are not.
const POOL_BYTES: usize = 16 << 20;
/// Largest buffer kept (writes larger than this allocate and free their own).
const POOL_BUFFER_MAX: usize = 1 << 20;

/// Idle write buffers of a server.
#[derive(Debug, Default)]
pub struct BufferPool {
    free: Mutex<Free>,
}

#[derive(Debug, Default)]
struct Free {
    bufs: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufferPool {
    fn lock(&self) -> std::sync::MutexGuard<'_, Free> {
        // A poisoned lock only means a panic elsewhere; the list itself stays consistent.
        self.free.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of `len` bytes, its contents unspecified (the caller fills all of it).
    pub fn take(&self, len: usize) -> Vec<u8> {
        let reused = (len <= POOL_BUFFER_MAX)
            .then(|| {
                let mut f = self.lock();
                // The latest returned buffer that is large enough (its pages are warm), else
                // any (it grows).
                let i = f
                    .bufs
                    .iter()
                    .rposition(|b| b.capacity() >= len)
                    .or_else(|| f.bufs.len().checked_sub(1))?;
                let b = f.bufs.swap_remove(i);
                f.bytes -= b.capacity();
                Some(b)
            })
            .flatten();
        let mut b = reused.unwrap_or_default();
        // Zero-fills only bytes this buffer never held.
        b.resize(len, 0);
        b
    }

    /// Give a buffer back (kept if the pool has room for it).
    pub fn put(&self, b: Vec<u8>) {
        let cap = b.capacity();
        if cap == 0 || cap > POOL_BUFFER_MAX {
            return;
        }
        let mut f = self.lock();
        if f.bytes + cap <= POOL_BYTES {
            f.bytes += cap;
            f.bufs.push(b);
        }
    }

    /// Bytes of idle buffers kept now.
    #[cfg(test)]
    fn idle_bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_come_back_and_the_pool_stays_bounded() {
        let p = BufferPool::default();
        let a = p.take(256 << 10);
        assert_eq!(a.len(), 256 << 10);
        let ptr = a.as_ptr();
        p.put(a);
        // The same allocation serves the next write of that size, and a smaller one.
        let b = p.take(256 << 10);
        assert_eq!(b.as_ptr(), ptr);
        p.put(b);
        let c = p.take(4096);
        assert_eq!((c.as_ptr(), c.len()), (ptr, 4096));
        p.put(c);
        assert_eq!(p.idle_bytes(), 256 << 10);
        // Buffers over the largest kept size are freed, and idle bytes never pass the bound.
        p.put(vec![0; POOL_BUFFER_MAX + 1]);
        for _ in 0..2 * POOL_BYTES / POOL_BUFFER_MAX {
            p.put(vec![0; POOL_BUFFER_MAX]);
        }
        assert!(p.idle_bytes() <= POOL_BYTES);
        let big = p.take(POOL_BUFFER_MAX + 1);
        assert_eq!(big.len(), POOL_BUFFER_MAX + 1);
    }
}
