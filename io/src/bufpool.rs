//! A pool of page-aligned buffers that come back when the last `Bytes` of them is dropped.
//!
//! Full-stripe writes build one aligned image per member for every large write (a few hundred
//! KiB to a few MiB each). A fresh allocation of that size costs a memset and, because the
//! allocator hands such sizes back to the kernel, a page fault and a kernel page clear per 4 KiB
//! on the next use: together more CPU than the copy that fills the image. Buffers taken here are
//! reused as they are (their old bytes are overwritten by the caller, which must fill all of
//! them), and return to the pool when the I/O that borrowed them lets go.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::buf::AlignedBuf;

/// Idle buffers kept at most.
pub const POOL_MAX_IDLE_BUFFERS: usize = 64;
/// Idle bytes kept at most.
pub const POOL_MAX_IDLE_BYTES: usize = 64 << 20;

#[derive(Default)]
struct Idle {
    buffers: Vec<AlignedBuf>,
    bytes: usize,
}

/// Aligned buffers for reuse; see the module doc.
#[derive(Default)]
pub struct AlignedPool {
    idle: Mutex<Idle>,
}

impl std::fmt::Debug for AlignedPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let idle = self.idle();
        f.debug_struct("AlignedPool")
            .field("idle_buffers", &idle.buffers.len())
            .field("idle_bytes", &idle.bytes)
            .finish()
    }
}

impl AlignedPool {
    fn idle(&self) -> std::sync::MutexGuard<'_, Idle> {
        // A list of spare buffers: a panic elsewhere cannot leave it inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A buffer of exactly `len` bytes holding arbitrary old bytes (zeroes when new): the caller
    /// overwrites all of it.
    pub fn take(&self, len: usize) -> AlignedBuf {
        {
            let mut idle = self.idle();
            if let Some(i) = idle.buffers.iter().rposition(|b| b.len() == len) {
                let buf = idle.buffers.swap_remove(i);
                idle.bytes -= len;
                return buf;
            }
        }
        AlignedBuf::zeroed(len)
    }

    fn give_back(&self, buf: AlignedBuf) {
        let mut idle = self.idle();
        if idle.buffers.len() >= POOL_MAX_IDLE_BUFFERS
            || idle.bytes + buf.len() > POOL_MAX_IDLE_BYTES
        {
            // Make room by dropping the oldest idle buffer (sizes drift with the workload).
            if idle.buffers.is_empty() {
                return;
            }
            let old = idle.buffers.remove(0);
            idle.bytes -= old.len();
            if idle.bytes + buf.len() > POOL_MAX_IDLE_BYTES {
                return;
            }
        }
        idle.bytes += buf.len();
        idle.buffers.push(buf);
    }

    /// Freezes `buf` into `Bytes` that give it back to this pool when the last clone is dropped.
    pub fn freeze(self: &Arc<Self>, buf: AlignedBuf) -> Bytes {
        Bytes::from_owner(Pooled {
            buf: Some(buf),
            pool: Arc::clone(self),
        })
    }
}

struct Pooled {
    /// Always `Some` until `Drop` takes it.
    buf: Option<AlignedBuf>,
    pool: Arc<AlignedPool>,
}

impl AsRef<[u8]> for Pooled {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b[..])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            self.pool.give_back(buf);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_buffer_is_reused_at_the_same_address_and_stays_aligned() {
        let pool = Arc::new(AlignedPool::default());
        let mut b = pool.take(8192);
        b[0] = 7;
        let bytes = pool.freeze(b);
        let addr = bytes.as_ptr() as usize;
        assert_eq!(addr % crate::buf::ALIGN_BYTES, 0);
        let clone = bytes.clone();
        drop(bytes);
        // A clone still holds it: not back yet.
        assert_ne!(pool.take(8192).as_ref().as_ptr() as usize, addr);
        drop(clone);
        let again = pool.take(8192);
        assert_eq!(again.as_ref().as_ptr() as usize, addr);
        assert_eq!(again[0], 7, "old bytes stay: the caller overwrites them");
    }

    #[test]
    fn other_sizes_get_fresh_buffers_and_idle_bytes_stay_bounded() {
        let pool = Arc::new(AlignedPool::default());
        drop(pool.freeze(pool.take(4096)));
        assert_eq!(pool.take(8192).len(), 8192);
        for _ in 0..3 {
            let big: Vec<Bytes> = (0..POOL_MAX_IDLE_BUFFERS + 4)
                .map(|_| pool.freeze(pool.take(2 << 20)))
                .collect();
            drop(big);
        }
        let idle = pool.idle();
        assert!(
            idle.bytes <= POOL_MAX_IDLE_BYTES,
            "{} idle bytes",
            idle.bytes
        );
        assert!(idle.buffers.len() <= POOL_MAX_IDLE_BUFFERS);
    }
}
