//! A volume served straight from one member (a plain image file or block device): the NBD
//! `BlockDevice` for `[[volume]] file = ...`, with no RAID and no journal.
//!
//! The read cache and the page cache: with `direct_io = false` the kernel's page cache already
//! holds what the image holds, and a large request costs the same copy from either. The volume
//! cache still pays for small random reads (a hit is a lookup and a slice, no syscall), but for
//! a large request it only adds work: a miss copies the whole read again into 4 KiB blocks, and
//! a write copies every written block into the cache besides the page cache. So a member on the
//! page cache runs its cache in [`CacheScope::SmallRequests`]: writes (and joined `read`s) larger
//! than [`PAGE_CACHE_BYPASS_BYTES_MIN`] go to the member alone, a large write only removing the
//! blocks it overlaps so the cache never serves older bytes. With `O_DIRECT` the volume cache is
//! the only cache and sees every request.
//!
//! Reads the NBD server makes (`read_data`) take the cache by reference: a hit is the cached
//! blocks themselves, handed to the socket by one vectored write, and a large read cached in part
//! reads only the span of its missing blocks ([`crate::cache::partial`]). On the page cache, large
//! reads still
//! bypass the volume cache: answering a resident 1 MiB read from cached blocks (one kernel copy,
//! cache to socket, against two for a page-cache read) cut the daemon's CPU per read by about 6%
//! but measured 0.89x-0.97x the throughput of the page-cache read, and 0.64x-0.70x on a range
//! four times the cache (the fill copies), in interleaved runs (docs/BENCHMARKS.md, issue 13).

use super::holes;
use crate::cache::ReadCache;
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::File;
use std::sync::Arc;
use twinblock_io::Member;
use twinblock_nbd::{
    BlockDevice, DeviceCaps, DeviceError, DeviceResult, Extent, ReadData, ZeroFlags,
};

/// Zeroes are written in pieces of at most this size (the shared zero buffer's) when the range
/// may not be deallocated.
const ZERO_WRITE_BYTES_MAX: u64 = twinblock_nbd::zeroes::ZERO_BUFFER_BYTES as u64;

/// With [`CacheScope::SmallRequests`], reads and writes longer than this many bytes bypass the
/// volume cache (64 KiB: 16 blocks, above any filesystem's or database's page size, where the
/// per-block fill or install starts to cost more than the page-cache copy it would save).
pub const PAGE_CACHE_BYPASS_BYTES_MIN: u64 = 64 * 1024;

/// Which requests the volume read cache takes part in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheScope {
    /// Every read and write (the member does `O_DIRECT`: nothing else caches).
    #[default]
    AllRequests,
    /// Requests of at most [`PAGE_CACHE_BYPASS_BYTES_MIN`] (the member is on the page cache).
    SmallRequests,
}

impl CacheScope {
    /// The scope for a member that does (`true`) or does not do `O_DIRECT`.
    pub fn for_member(direct_io: bool) -> CacheScope {
        if direct_io {
            CacheScope::AllRequests
        } else {
            CacheScope::SmallRequests
        }
    }

    /// Whether a read or write of `len` bytes goes through the cache (fills it, installs its
    /// bytes in it); `false`: straight to the member (a write still removes the cached blocks it
    /// overlaps).
    pub fn serves(self, len: u64) -> bool {
        match self {
            CacheScope::AllRequests => true,
            CacheScope::SmallRequests => len <= PAGE_CACHE_BYPASS_BYTES_MIN,
        }
    }
}

pub struct MemberDevice {
    member: Arc<dyn Member>,
    read_only: bool,
    /// A plain descriptor on the image for `SEEK_DATA`/`SEEK_HOLE`; `None` for block devices.
    map: Option<Arc<File>>,
    /// Re-reads from memory (see [`crate::cache`]); every write, trim and zeroing below keeps
    /// it equal to the image.
    cache: Option<Arc<ReadCache>>,
    cache_scope: CacheScope,
}

impl MemberDevice {
    pub fn new(member: Arc<dyn Member>, read_only: bool, map: Option<File>) -> Self {
        MemberDevice {
            member,
            read_only,
            map: map.map(Arc::new),
            cache: None,
            cache_scope: CacheScope::default(),
        }
    }

    /// Serves re-reads from `cache`; None: every read goes to the image.
    pub fn with_cache(mut self, cache: Option<Arc<ReadCache>>) -> Self {
        self.cache = cache;
        self
    }

    /// Which requests the cache takes part in (see [`CacheScope::for_member`]).
    pub fn with_cache_scope(mut self, scope: CacheScope) -> Self {
        self.cache_scope = scope;
        self
    }

    pub fn cache(&self) -> Option<&Arc<ReadCache>> {
        self.cache.as_ref()
    }

    /// Discards (punches) a range, the cache's blocks of it invalidated around the punch.
    async fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        match &self.cache {
            Some(c) => {
                c.invalidate_around(offset, len, self.member.discard(offset, len))
                    .await
            }
            None => self.member.discard(offset, len).await,
        }
    }

    /// Writes zeroes from the shared zero buffer: nothing is allocated per request, so the
    /// device reports no zero scratch memory (`DeviceCaps::zero_scratch_bytes` stays 0).
    async fn write_zero_pieces(&self, offset: u64, len: u64) -> DeviceResult<()> {
        match &self.cache {
            Some(c) => {
                c.invalidate_around(offset, len, self.write_zero_pieces_uncached(offset, len))
                    .await
            }
            None => self.write_zero_pieces_uncached(offset, len).await,
        }
    }

    async fn write_zero_pieces_uncached(&self, offset: u64, len: u64) -> DeviceResult<()> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZERO_WRITE_BYTES_MAX);
            self.member
                .write_at(offset + done, twinblock_nbd::zeroes::zeroes(n as usize))
                .await?;
            done += n;
        }
        Ok(())
    }
}

#[async_trait]
impl BlockDevice for MemberDevice {
    fn size(&self) -> u64 {
        self.member.size()
    }

    fn caps(&self) -> DeviceCaps {
        DeviceCaps {
            read_only: self.read_only,
            fast_zero: true,
            // One descriptor shared by every connection: a flush (fdatasync) on any connection
            // covers writes completed on all of them.
            multi_conn: true,
            ..DeviceCaps::default()
        }
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        let member = &self.member;
        Ok(match &self.cache {
            Some(c) if self.cache_scope.serves(u64::from(len)) => {
                c.read(offset, u64::from(len), |o, l| member.read_at(o, l as usize))
                    .await?
            }
            _ => member.read_at(offset, len as usize).await?,
        })
    }

    /// A read the cache takes part in ([`CacheScope::serves`]) is answered by reference: a hit
    /// is the cached blocks themselves, sent by one vectored write without joining them, and a
    /// large read cached in part reads only the span of its missing blocks
    /// ([`crate::cache::partial`]).
    async fn read_data(&self, offset: u64, len: u32) -> DeviceResult<ReadData> {
        let member = &self.member;
        let Some(c) = &self.cache else {
            return Ok(member.read_at(offset, len as usize).await?.into());
        };
        if !self.cache_scope.serves(u64::from(len)) {
            // Large reads on the page cache: measured slower through the cache (see the module
            // doc), so they stay one page-cache read.
            return Ok(member.read_at(offset, len as usize).await?.into());
        }
        let pieces = c
            .read_pieces_partial(offset, u64::from(len), |o, l| async move {
                Ok::<_, std::io::Error>(vec![member.read_at(o, l as usize).await?])
            })
            .await?;
        Ok(ReadData::from(pieces))
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        let len = data.len() as u64;
        match &self.cache {
            Some(c) if self.cache_scope.serves(len) => {
                c.write(offset, &data, self.member.write_at(offset, data.clone()))
                    .await?
            }
            // Not installed, but never left stale: the overlapped blocks are removed.
            Some(c) => {
                c.invalidate_around(offset, len, self.member.write_at(offset, data))
                    .await?
            }
            None => self.member.write_at(offset, data).await?,
        }
        if fua {
            self.member.sync().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> DeviceResult<()> {
        Ok(self.member.sync().await?)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.discard(offset, u64::from(len)).await?;
        if fua {
            self.member.sync().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        if flags.may_trim {
            // Punching a hole is fast and reads back as zeroes.
            self.discard(offset, u64::from(len)).await?;
        } else if flags.fast {
            return Err(DeviceError::NotFast);
        } else {
            self.write_zero_pieces(offset, u64::from(len)).await?;
        }
        if flags.fua {
            self.member.sync().await?;
        }
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        let Some(map) = self.map.clone() else {
            return Ok(vec![Extent {
                length: len,
                hole: false,
                zero: false,
            }]);
        };
        let size = self.size();
        let runs =
            tokio::task::spawn_blocking(move || holes::runs(&map, offset, u64::from(len), size))
                .await
                .map_err(|e| DeviceError::Other(format!("block status task failed: {e}")))??;
        let mut out: Vec<Extent> = runs
            .iter()
            .map(|r| Extent {
                // Each run lies inside [offset, offset + len), so it fits in u32.
                length: u32::try_from(r.end - r.start).unwrap_or(u32::MAX),
                hole: !r.data,
                zero: !r.data,
            })
            .collect();
        if out.is_empty() {
            out.push(Extent {
                length: len,
                hole: false,
                zero: false,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinblock_io::{FileMember, FileOptions};

    #[test]
    fn direct_members_cache_every_request() {
        let scope = CacheScope::for_member(true);
        assert!(scope.serves(4096));
        assert!(scope.serves(1 << 20));
    }

    #[test]
    fn page_cache_members_cache_only_small_requests() {
        let scope = CacheScope::for_member(false);
        assert!(scope.serves(4096));
        assert!(scope.serves(PAGE_CACHE_BYPASS_BYTES_MIN));
        assert!(!scope.serves(PAGE_CACHE_BYPASS_BYTES_MIN + 1));
        assert!(!scope.serves(1 << 20));
    }

    const IMAGE_BYTES: u64 = 4 << 20;

    fn page_cache_device(dir: &tempfile::TempDir) -> MemberDevice {
        device_with(dir, 1 << 20, CacheScope::for_member(false))
    }

    /// An image device (on the page cache, whatever `scope` says) with a `cache_bytes` read
    /// cache (half of it is what one sequential stream of large reads may fill).
    fn device_with(dir: &tempfile::TempDir, cache_bytes: u64, scope: CacheScope) -> MemberDevice {
        let member = FileMember::open(
            dir.path().join("img"),
            &FileOptions {
                direct: false,
                create_size: Some(IMAGE_BYTES),
                ..FileOptions::default()
            },
        )
        .unwrap();
        let cache = ReadCache::new(cache_bytes, IMAGE_BYTES).map(Arc::new);
        assert!(cache.is_some());
        MemberDevice::new(member, false, None)
            .with_cache(cache)
            .with_cache_scope(scope)
    }

    #[tokio::test]
    async fn large_reads_on_the_page_cache_do_not_fill_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let dev = page_cache_device(&dir);
        let big = 1u32 << 20;
        dev.read(0, big).await.unwrap();
        dev.read_data(0, big).await.unwrap();
        let stats = dev.cache().unwrap().stats();
        assert_eq!((stats.blocks, stats.hits, stats.misses), (0, 0, 0));
        // A small read still fills, and the next one hits.
        dev.read(8192, 4096).await.unwrap();
        dev.read(8192, 4096).await.unwrap();
        let stats = dev.cache().unwrap().stats();
        assert_eq!((stats.blocks, stats.hits, stats.misses), (1, 1, 1));
    }

    #[tokio::test]
    async fn large_write_over_a_cached_block_is_read_back_not_the_old_block() {
        let dir = tempfile::tempdir().unwrap();
        let dev = page_cache_device(&dir);
        dev.write(8192, Bytes::from(vec![1u8; 4096]), false)
            .await
            .unwrap();
        assert_eq!(&dev.read(8192, 4096).await.unwrap()[..], &[1u8; 4096][..]);
        assert_eq!(dev.cache().unwrap().stats().blocks, 1);
        // A 1 MiB write over it bypasses the cache and must remove the cached block.
        dev.write(0, Bytes::from(vec![2u8; 1 << 20]), false)
            .await
            .unwrap();
        assert_eq!(dev.cache().unwrap().stats().blocks, 0);
        assert_eq!(&dev.read(8192, 4096).await.unwrap()[..], &[2u8; 4096][..]);
        let whole = dev.read(0, 1 << 20).await.unwrap();
        assert!(whole.iter().all(|&b| b == 2));
    }

    /// A 1 MiB read with the cache on every request (an `O_DIRECT` image) fills the cache on its
    /// first pass (the stream is far inside its share) and is answered from the cached blocks on
    /// the next, one piece per block.
    #[tokio::test]
    async fn large_read_data_is_answered_from_cached_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device_with(&dir, IMAGE_BYTES, CacheScope::AllRequests);
        let data = versioned(256, 3);
        dev.write(0, data.clone(), false).await.unwrap();
        let first = dev.read_data(0, 1 << 20).await.unwrap();
        assert_eq!(first.to_contiguous(), data);
        let stats = dev.cache().unwrap().stats();
        assert_eq!((stats.blocks, stats.hits, stats.misses), (256, 0, 1));
        // Unaligned at both ends: the first and last blocks are trimmed.
        let hit = dev.read_data(100, (1 << 20) - 200).await.unwrap();
        assert_eq!(dev.cache().unwrap().stats().hits, 1);
        assert_eq!(
            hit.pieces().len(),
            256,
            "a hit is the cached blocks themselves"
        );
        assert_eq!(hit.to_contiguous(), data.slice(100..(1 << 20) - 100));
    }

    /// A by-reference reply is a snapshot of each block as the lookup found it: a write that
    /// lands after the lookup (while the reply is queued or being sent) replaces or removes the
    /// cached block, never changes the bytes of a block the reply already holds. A write racing
    /// the lookup itself may be seen in some blocks and not others (each shard's blocks are taken
    /// under that shard's lock), which NBD allows for a read overlapping an unanswered write; a
    /// read issued after the write was answered sees it in every block.
    #[tokio::test]
    async fn writes_after_a_by_reference_read_leave_its_pieces_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let dev = device_with(&dir, IMAGE_BYTES, CacheScope::AllRequests);
        let old = versioned(256, 1);
        dev.write(0, old.clone(), false).await.unwrap();
        dev.read_data(0, 1 << 20).await.unwrap();
        let held = dev.read_data(0, 1 << 20).await.unwrap();
        assert_eq!(held.pieces().len(), 256);
        // A small write installs a new block 5; a large one removes blocks 128..256.
        dev.write(5 * 4096, versioned(1, 2), false).await.unwrap();
        dev.write(128 * 4096, versioned(128, 3), false)
            .await
            .unwrap();
        assert_eq!(held.to_contiguous(), old, "the held reply changed");
        let now = dev.read_data(0, 1 << 20).await.unwrap().to_contiguous();
        let version =
            |b: usize| u64::from_le_bytes(now[b * 4096..b * 4096 + 8].try_into().unwrap());
        assert_eq!((version(4), version(5), version(6)), (1, 2, 1));
        assert!((128..256).all(|b| version(b) == 3));
    }

    /// Blocks the concurrent test writes; a large write covers this many of them.
    const RACE_BLOCKS: u64 = 256;
    const RACE_LARGE_BLOCKS: u64 = 32;

    /// `count` blocks from `first`, each holding `version` in its first 8 bytes.
    fn versioned(count: u64, version: u64) -> Bytes {
        let mut out = vec![0u8; (count * 4096) as usize];
        for block in out.chunks_exact_mut(4096) {
            block[..8].copy_from_slice(&version.to_le_bytes());
        }
        Bytes::from(out)
    }

    /// Small reads racing small (cached) and large (bypassing) writes: a read issued after a
    /// write was acknowledged never returns an older version of the block.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn reads_racing_large_and_small_writes_never_return_older_than_acknowledged() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let dev = Arc::new(page_cache_device(&dir));
        let acked: Arc<Vec<AtomicU64>> =
            Arc::new((0..RACE_BLOCKS).map(|_| AtomicU64::new(0)).collect());
        let writer = {
            let (dev, acked) = (dev.clone(), acked.clone());
            tokio::spawn(async move {
                for version in 1..=400u64 {
                    // Deterministic spread: every third write is large.
                    let (first, count) = if version % 3 == 0 {
                        (
                            (version * 7) % (RACE_BLOCKS / RACE_LARGE_BLOCKS) * RACE_LARGE_BLOCKS,
                            RACE_LARGE_BLOCKS,
                        )
                    } else {
                        ((version * 37) % RACE_BLOCKS, 1)
                    };
                    dev.write(first * 4096, versioned(count, version), false)
                        .await
                        .unwrap();
                    for b in first..first + count {
                        acked[b as usize].fetch_max(version, Ordering::SeqCst);
                    }
                }
            })
        };
        let readers: Vec<_> = (0..3u64)
            .map(|r| {
                let (dev, acked) = (dev.clone(), acked.clone());
                tokio::spawn(async move {
                    for i in 0..3000u64 {
                        let block = (i * 13 + r * 101) % RACE_BLOCKS;
                        let floor = acked[block as usize].load(Ordering::SeqCst);
                        let data = dev.read(block * 4096, 4096).await.unwrap();
                        let got = u64::from_le_bytes(data[..8].try_into().unwrap());
                        assert!(
                            got >= floor,
                            "block {block}: read version {got} after version {floor} was acknowledged"
                        );
                        if i % 64 == 0 {
                            tokio::task::yield_now().await;
                        }
                    }
                })
            })
            .collect();
        writer.await.unwrap();
        for r in readers {
            r.await.unwrap();
        }
        // Quiescent: every block reads back its last acknowledged version.
        for block in 0..RACE_BLOCKS {
            let data = dev.read(block * 4096, 4096).await.unwrap();
            let got = u64::from_le_bytes(data[..8].try_into().unwrap());
            assert_eq!(got, acked[block as usize].load(Ordering::SeqCst));
        }
    }
}
