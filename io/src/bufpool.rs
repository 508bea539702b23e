//! A pool of page-aligned buffers that come back when the last `Bytes` of them is dropped.
//!
//! Full-stripe writes build one aligned image per member for every large write (a few hundred
//! KiB to a few MiB each). A fresh allocation of that size costs a memset and, because the
//! allocator hands such sizes back to the kernel, a page fault and a kernel page clear per 4 KiB
//! on the next use: together more CPU than the copy that fills the image. Buffers taken here are
//! reused as they are (their old bytes are overwritten by the caller, which must fill all of
//! them), and return to the pool when the I/O that borrowed them lets go.
//!
//! [`block_pool`] is one process-wide pool of 4 KiB blocks: every 4 KiB member read lands in
//! one, and the volume read cache copies the blocks it keeps into them. A cache larger than
//! the working set it cannot hold evicts a block for every block it admits, so a random read
//! workload would otherwise allocate a fresh 4 KiB per miss and free another: the allocator
//! then keeps asking the kernel for fresh (zeroed) huge pages, 18% of the daemon's CPU in a
//! profile of 4 KiB random reads over a 1 GiB set with a 256 MiB cache.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::buf::AlignedBuf;

/// Idle buffers kept at most.
pub const POOL_MAX_IDLE_BUFFERS: usize = 64;
/// Idle bytes kept at most.
pub const POOL_MAX_IDLE_BYTES: usize = 64 << 20;
/// Bytes of each buffer of [`block_pool`]: the read cache's block, a typical member read.
pub const BLOCK_POOL_BLOCK_BYTES: usize = 4096;
/// Idle blocks [`block_pool`] keeps at most (16 MiB).
pub const BLOCK_POOL_MAX_IDLE_BLOCKS: usize = 4096;

/// A stack of idle [`BLOCK_POOL_BLOCK_BYTES`] buffers: every buffer has the same size, so
/// taking and giving back are a pop and a push (the general pool searches by size and, when
/// full, drops its oldest buffer to follow drifting sizes).
pub struct BlockPool {
    idle: Mutex<Vec<AlignedBuf>>,
}

impl BlockPool {
    fn idle(&self) -> std::sync::MutexGuard<'_, Vec<AlignedBuf>> {
        // A list of spare buffers: a panic elsewhere cannot leave it inconsistent.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A block holding arbitrary old bytes (zeroes when new): the caller overwrites all of it.
    pub fn take(&self) -> AlignedBuf {
        self.take_idle()
            .unwrap_or_else(|| AlignedBuf::zeroed(BLOCK_POOL_BLOCK_BYTES))
    }

    /// An idle block, if the pool has one.
    fn take_idle(&self) -> Option<AlignedBuf> {
        self.idle().pop()
    }

    /// Freezes `buf` (taken from this pool) into `Bytes` that give it back when the last clone
    /// is dropped.
    pub fn freeze(&'static self, buf: AlignedBuf) -> Bytes {
        Bytes::from_owner(PooledBlock { buf: Some(buf) })
    }

    fn give_back(&self, buf: AlignedBuf) {
        if buf.len() != BLOCK_POOL_BLOCK_BYTES {
            return;
        }
        let mut idle = self.idle();
        if idle.len() < BLOCK_POOL_MAX_IDLE_BLOCKS {
            idle.push(buf);
        }
    }
}

struct PooledBlock {
    /// Always `Some` until `Drop` takes it.
    buf: Option<AlignedBuf>,
}

impl AsRef<[u8]> for PooledBlock {
    fn as_ref(&self) -> &[u8] {
        self.buf.as_ref().map_or(&[], |b| &b[..])
    }
}

impl Drop for PooledBlock {
    fn drop(&mut self) {
        if let Some(buf) = self.buf.take() {
            block_pool().give_back(buf);
        }
    }
}

/// The process's pool of [`BLOCK_POOL_BLOCK_BYTES`] buffers (see the module doc).
pub fn block_pool() -> &'static BlockPool {
    static POOL: BlockPool = BlockPool {
        idle: Mutex::new(Vec::new()),
    };
    &POOL
}

/// `data` copied into a buffer from [`block_pool`] when it is one block long (the buffer goes
/// back to the pool when the last `Bytes` of it is dropped), else into a plain allocation.
pub fn copy_block(data: &[u8]) -> Bytes {
    if data.len() != BLOCK_POOL_BLOCK_BYTES {
        return Bytes::copy_from_slice(data);
    }
    let pool = block_pool();
    // With no idle block, a fresh one is allocated uninitialised and filled by the copy: zeroing
    // it first (as `take` does) would write its 4 KiB twice, and the read cache takes a fresh
    // block for every written block it installs until it is full.
    let buf = match pool.take_idle() {
        Some(mut buf) => {
            buf.copy_from_slice(data);
            buf
        }
        None => AlignedBuf::copy_from(data),
    };
    pool.freeze(buf)
}

#[derive(Default)]
struct Idle {
    buffers: Vec<AlignedBuf>,
    bytes: usize,
}

/// Aligned buffers for reuse; see the module doc.
pub struct AlignedPool {
    idle: Mutex<Idle>,
    max_idle_buffers: usize,
    max_idle_bytes: usize,
}

impl Default for AlignedPool {
    fn default() -> AlignedPool {
        AlignedPool::with_limits(POOL_MAX_IDLE_BUFFERS, POOL_MAX_IDLE_BYTES)
    }
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
    /// A pool keeping at most `max_idle_buffers` idle buffers of `max_idle_bytes` in all.
    pub fn with_limits(max_idle_buffers: usize, max_idle_bytes: usize) -> AlignedPool {
        AlignedPool {
            idle: Mutex::new(Idle::default()),
            max_idle_buffers,
            max_idle_bytes,
        }
    }

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
        if idle.buffers.len() >= self.max_idle_buffers
            || idle.bytes + buf.len() > self.max_idle_bytes
        {
            // Make room by dropping the oldest idle buffer (sizes drift with the workload).
            if idle.buffers.is_empty() {
                return;
            }
            let old = idle.buffers.remove(0);
            idle.bytes -= old.len();
            if idle.bytes + buf.len() > self.max_idle_bytes {
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
    fn block_copies_are_aligned_pool_buffers_and_other_lengths_plain_copies() {
        let data: Vec<u8> = (0..BLOCK_POOL_BLOCK_BYTES).map(|i| i as u8).collect();
        let block = copy_block(&data);
        assert_eq!(&block[..], &data[..]);
        assert_eq!(block.as_ptr() as usize % crate::buf::ALIGN_BYTES, 0);
        let odd = copy_block(&data[..100]);
        assert_eq!(&odd[..], &data[..100]);
    }

    #[test]
    fn block_copies_hold_the_data_whether_the_block_is_fresh_or_reused() {
        let a: Vec<u8> = (0..BLOCK_POOL_BLOCK_BYTES).map(|i| (i * 3) as u8).collect();
        let b: Vec<u8> = (0..BLOCK_POOL_BLOCK_BYTES)
            .map(|i| (i * 5 + 1) as u8)
            .collect();
        // Drain the idle blocks so the first copy takes the uninitialised-allocation path.
        let pool = block_pool();
        let drained: Vec<AlignedBuf> = std::iter::from_fn(|| pool.take_idle()).collect();
        let fresh = copy_block(&a);
        assert_eq!(&fresh[..], &a[..]);
        assert_eq!(fresh.as_ptr() as usize % crate::buf::ALIGN_BYTES, 0);
        drop(fresh);
        // The fresh block went back to the pool (other tests share it, so which idle block the
        // next copy takes is not fixed); a reused block is overwritten whole.
        let reused = copy_block(&b);
        assert_eq!(&reused[..], &b[..]);
        drop(drained);
    }

    #[test]
    fn the_block_pool_keeps_at_most_its_limit_of_idle_blocks() {
        let held: Vec<Bytes> = (0..BLOCK_POOL_MAX_IDLE_BLOCKS + 10)
            .map(|_| copy_block(&[1; BLOCK_POOL_BLOCK_BYTES]))
            .collect();
        drop(held);
        assert!(block_pool().idle().len() <= BLOCK_POOL_MAX_IDLE_BLOCKS);
    }

    #[test]
    fn a_pool_keeps_no_more_idle_buffers_than_its_limit() {
        let pool = Arc::new(AlignedPool::with_limits(2, 1 << 20));
        let held: Vec<Bytes> = (0..5).map(|_| pool.freeze(pool.take(4096))).collect();
        drop(held);
        assert_eq!(pool.idle().buffers.len(), 2);
        assert_eq!(pool.idle().bytes, 2 * 4096);
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
