//! `MemDevice`: a plain in-memory [`BlockDevice`] for tests, examples and the fuzz target.
//!
//! It tracks allocation per 4 KiB block (trim and hole-punching zeroes mark blocks as holes)
//! so block status has something real to report, and counts flushes so tests can check them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use bytes::Bytes;

use crate::buffer::BufferPool;
use crate::device::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, Extent, ZeroFlags};

/// Granularity of the allocation map.
pub const MEM_BLOCK_BYTES: u64 = 4096;

struct State {
    data: Vec<u8>,
    /// One flag per `MEM_BLOCK_BYTES` block: true when the block holds data.
    allocated: Vec<bool>,
}

pub struct MemDevice {
    state: RwLock<State>,
    size: u64,
    caps: DeviceCaps,
    flushes: AtomicU64,
    /// Read buffers are recycled once the server has sent them.
    read_buffers: Arc<BufferPool>,
}

impl MemDevice {
    /// A zeroed device of `size` bytes with default caps; every block starts as a hole.
    pub fn new(size: usize) -> Self {
        Self::with_caps(size, DeviceCaps::default())
    }

    pub fn with_caps(size: usize, caps: DeviceCaps) -> Self {
        let blocks = (size as u64).div_ceil(MEM_BLOCK_BYTES) as usize;
        MemDevice {
            state: RwLock::new(State {
                data: vec![0; size],
                allocated: vec![false; blocks],
            }),
            size: size as u64,
            caps,
            flushes: AtomicU64::new(0),
            read_buffers: Arc::new(BufferPool::default()),
        }
    }

    pub fn flush_count(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// A copy of the whole contents.
    pub fn contents(&self) -> Vec<u8> {
        self.read_state().data.clone()
    }

    fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        // Every mutation below is a slice copy that cannot panic halfway in a way that breaks
        // an invariant, so a poisoned lock is still consistent.
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn range(&self, offset: u64, len: u64) -> DeviceResult<std::ops::Range<usize>> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(offset as usize..end as usize),
            _ => Err(DeviceError::NoSpace),
        }
    }

    /// Blocks of the allocation map that `range` touches, each with its byte range and
    /// whether `range` covers it completely.
    fn blocks(
        data_len: usize,
        range: &std::ops::Range<usize>,
    ) -> impl Iterator<Item = (usize, std::ops::Range<usize>, bool)> {
        let bs = MEM_BLOCK_BYTES as usize;
        let (start, end) = (range.start, range.end);
        (start / bs..end.div_ceil(bs)).map(move |b| {
            let block = b * bs..((b + 1) * bs).min(data_len);
            let whole = start <= block.start && block.end <= end;
            (b, block, whole)
        })
    }
}

#[async_trait]
impl BlockDevice for MemDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn caps(&self) -> DeviceCaps {
        self.caps
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        let r = self.range(offset, u64::from(len))?;
        let mut buf = self.read_buffers.take(r.len());
        buf.extend_from_slice(&self.read_state().data[r]);
        Ok(self.read_buffers.freeze(buf))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> DeviceResult<()> {
        if self.caps.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let r = self.range(offset, data.len() as u64)?;
        let mut state = self.write_state();
        state.data[r.clone()].copy_from_slice(&data);
        for (b, _, _) in Self::blocks(state.data.len(), &r) {
            state.allocated[b] = true;
        }
        Ok(())
    }

    async fn flush(&self) -> DeviceResult<()> {
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> DeviceResult<()> {
        let r = self.range(offset, u64::from(len))?;
        let mut state = self.write_state();
        // Only whole blocks are discarded; they read back as zeroes.
        for (b, block, whole) in Self::blocks(state.data.len(), &r) {
            if whole {
                state.data[block].fill(0);
                state.allocated[b] = false;
            }
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> DeviceResult<()> {
        let r = self.range(offset, u64::from(len))?;
        let mut state = self.write_state();
        state.data[r.clone()].fill(0);
        for (b, _, whole) in Self::blocks(state.data.len(), &r) {
            // Zeroes allocate storage unless the client allows a hole and the block is whole.
            state.allocated[b] = !(flags.may_trim && whole);
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        let r = self.range(offset, u64::from(len))?;
        let state = self.read_state();
        let mut extents: Vec<Extent> = Vec::new();
        let mut pos = r.start as u64;
        while pos < r.end as u64 {
            let block = pos / MEM_BLOCK_BYTES;
            let block_end = ((block + 1) * MEM_BLOCK_BYTES).min(r.end as u64);
            let hole = !state.allocated[block as usize];
            let piece = (block_end - pos) as u32;
            match extents.last_mut() {
                Some(last) if last.hole == hole => last.length += piece,
                _ => extents.push(Extent {
                    length: piece,
                    hole,
                    zero: hole,
                }),
            }
            pos = block_end;
        }
        Ok(extents)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn written_data_reads_back_and_is_allocated() {
        let d = MemDevice::new(16384);
        d.write(4096, Bytes::from(vec![7u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(&d.read(4096, 4096).await.unwrap()[..], &[7u8; 4096][..]);
        let ext = d.block_status(0, 16384).await.unwrap();
        assert_eq!(
            ext,
            vec![
                Extent {
                    length: 4096,
                    hole: true,
                    zero: true
                },
                Extent {
                    length: 4096,
                    hole: false,
                    zero: false
                },
                Extent {
                    length: 8192,
                    hole: true,
                    zero: true
                },
            ]
        );
    }

    #[tokio::test]
    async fn trim_punches_only_whole_blocks() {
        let d = MemDevice::new(16384);
        d.write(0, Bytes::from(vec![1u8; 16384]), false)
            .await
            .unwrap();
        d.trim(100, 8192, false).await.unwrap();
        let ext = d.block_status(0, 16384).await.unwrap();
        assert_eq!(
            ext[1],
            Extent {
                length: 4096,
                hole: true,
                zero: true
            }
        );
        assert_eq!(d.read(0, 1).await.unwrap()[0], 1);
    }

    #[tokio::test]
    async fn out_of_range_access_fails() {
        let d = MemDevice::new(4096);
        assert!(d.read(4000, 200).await.is_err());
        assert!(d
            .write(u64::MAX, Bytes::from_static(b"x"), false)
            .await
            .is_err());
    }
}
