//! A pool of large, already-initialized read buffers.
//!
//! Why: a 1 MiB read into a fresh allocation costs a page fault per 4 KiB page and a
//! zero-fill before the data is even read, which at queue depth 8 costs more CPU than the
//! read itself. Buffers here are initialized once and reused: a reply built on one is a
//! [`Bytes`] whose owner puts the buffer back in the pool when the reply has been sent.
//!
//! Bounds: at most `POOLED_BUFFERS_MAX` buffers are kept; beyond that, returned buffers
//! are freed. Buffers larger than `POOLED_BUFFER_BYTES_MAX` are never kept.

use bytes::Bytes;
use std::sync::{Arc, Mutex};

const POOLED_BUFFERS_MAX: usize = 64;
const POOLED_BUFFER_BYTES_MAX: usize = 4 << 20;

/// The pool. Cheap to clone.
#[derive(Clone, Default)]
pub struct BufferPool {
    free: Arc<Mutex<Vec<Vec<u8>>>>,
}

/// A buffer taken from the pool, `length` bytes long and fully initialized (its contents
/// are whatever it last held).
pub struct PooledBuffer {
    data: Vec<u8>,
    length: usize,
    pool: BufferPool,
}

impl BufferPool {
    /// Takes a buffer of `length` bytes.
    pub fn take(&self, length: usize) -> PooledBuffer {
        let recycled = self.free.lock().unwrap_or_else(|p| p.into_inner()).pop();
        let mut data = recycled.unwrap_or_default();
        if data.len() < length {
            data.resize(length, 0); // only the growth is filled
        }
        PooledBuffer { data, length, pool: self.clone() }
    }

    fn give_back(&self, data: Vec<u8>) {
        if data.len() > POOLED_BUFFER_BYTES_MAX {
            return;
        }
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        if free.len() < POOLED_BUFFERS_MAX {
            free.push(data);
        }
    }
}

impl PooledBuffer {
    /// The buffer's bytes, to fill.
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.data[..self.length]
    }

    /// Turns the buffer into `Bytes`; it returns to the pool when the last clone drops.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuffer {
    fn as_ref(&self) -> &[u8] {
        &self.data[..self.length]
    }
}

impl Drop for PooledBuffer {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.data));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_and_bounded() {
        let pool = BufferPool::default();
        let mut b = pool.take(1 << 20);
        b.as_mut()[0] = 7;
        let bytes = b.freeze();
        assert_eq!(bytes.len(), 1 << 20);
        drop(bytes);
        let b = pool.take(4096);
        assert_eq!(b.as_ref().len(), 4096);
        assert_eq!(b.as_ref()[0], 7, "the same buffer came back");
        drop(b);
        // Growing the pooled buffer past the limit means it is freed, not kept.
        let big = pool.take(POOLED_BUFFER_BYTES_MAX + 1);
        assert!(pool.free.lock().unwrap().is_empty());
        drop(big);
        assert!(pool.free.lock().unwrap().is_empty(), "oversized buffers are not kept");
        for _ in 0..2 * POOLED_BUFFERS_MAX {
            drop(pool.take(8));
        }
        let held: Vec<_> = (0..2 * POOLED_BUFFERS_MAX).map(|_| pool.take(8)).collect();
        drop(held);
        assert_eq!(pool.free.lock().unwrap().len(), POOLED_BUFFERS_MAX, "the pool is bounded");
    }
}
