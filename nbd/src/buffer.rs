//! A per-connection pool of write-payload buffers.
//!
//! Each `WRITE` payload is read into a buffer that becomes the `Bytes` handed to the device.
//! Allocating a fresh megabyte per request makes the allocator map and unmap memory, and every
//! page faults again on first touch; recycling buffers avoids that. A pooled buffer goes back to
//! the pool when the last clone of its `Bytes` is dropped, wherever that happens.
//!
//! Bounds: at most `POOL_MAX_BUFFERS` buffers and `POOL_MAX_BYTES` bytes are kept per pool, and a
//! request only reuses a buffer at most twice its size, so a device that keeps small payloads
//! for long (a journal's dirty index) never pins large buffers.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Most idle buffers a pool keeps.
const POOL_MAX_BUFFERS: usize = 64;
/// Most idle bytes (by capacity) a pool keeps.
const POOL_MAX_BYTES: usize = 16 << 20;
/// Smallest capacity handed out, so small writes share one size class.
const MIN_BUFFER_BYTES: usize = 4096;

#[derive(Default)]
struct Idle {
    buffers: Vec<Vec<u8>>,
    bytes: usize,
}

#[derive(Default)]
pub struct BufferPool {
    idle: Mutex<Idle>,
}

impl BufferPool {
    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        // The guarded data is a list of spare buffers; a panic elsewhere cannot corrupt it.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// An empty buffer with capacity for `len` bytes.
    pub fn take(&self, len: usize) -> Vec<u8> {
        {
            let mut idle = self.idle();
            let fit = idle.buffers.iter().rposition(|b| {
                b.capacity() >= len && b.capacity() <= len.max(MIN_BUFFER_BYTES) * 2
            });
            if let Some(i) = fit {
                let buf = idle.buffers.swap_remove(i);
                idle.bytes -= buf.capacity();
                return buf;
            }
        }
        let cap = len
            .max(MIN_BUFFER_BYTES)
            .checked_next_power_of_two()
            .unwrap_or(len);
        Vec::with_capacity(cap)
    }

    fn give_back(&self, mut buf: Vec<u8>) {
        let mut idle = self.idle();
        if idle.buffers.len() < POOL_MAX_BUFFERS && idle.bytes + buf.capacity() <= POOL_MAX_BYTES {
            buf.clear();
            idle.bytes += buf.capacity();
            idle.buffers.push(buf);
        }
    }

    /// Wraps a filled buffer so that it returns to this pool when its last `Bytes` is dropped.
    pub fn freeze(self: &Arc<Self>, buf: Vec<u8>) -> Bytes {
        Bytes::from_owner(Pooled {
            buf,
            pool: Arc::clone(self),
        })
    }

    #[cfg(test)]
    fn idle_count(&self) -> usize {
        self.idle().buffers.len()
    }
}

struct Pooled {
    buf: Vec<u8>,
    pool: Arc<BufferPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.buf));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_return_to_pool_when_last_bytes_drops() {
        let pool = Arc::new(BufferPool::default());
        let mut b = pool.take(1 << 20);
        b.extend_from_slice(&[1u8; 1 << 20]);
        let ptr = b.as_ptr();
        let bytes = pool.freeze(b);
        let clone = bytes.slice(10..20);
        drop(bytes);
        assert_eq!(pool.idle_count(), 0, "a clone is still alive");
        drop(clone);
        assert_eq!(pool.idle_count(), 1);
        let again = pool.take(1 << 20);
        assert_eq!(again.as_ptr(), ptr, "the same allocation is reused");
        assert!(again.is_empty());
    }

    #[test]
    fn small_requests_do_not_take_large_buffers() {
        let pool = Arc::new(BufferPool::default());
        drop(pool.freeze(pool.take(1 << 20)));
        assert_eq!(pool.take(4096).capacity(), 4096);
        assert_eq!(pool.idle_count(), 1);
    }

    #[test]
    fn pool_keeps_a_bounded_number_of_bytes() {
        let pool = Arc::new(BufferPool::default());
        let held: Vec<Bytes> = (0..32).map(|_| pool.freeze(pool.take(1 << 20))).collect();
        drop(held);
        assert_eq!(pool.idle_count(), POOL_MAX_BYTES >> 20);
    }
}
