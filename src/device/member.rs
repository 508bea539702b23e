//! A volume served straight from one member (a plain image file or block device): the NBD
//! `BlockDevice` for `[[volume]] file = ...`, with no RAID and no journal.

use super::holes;
use crate::cache::ReadCache;
use async_trait::async_trait;
use bytes::Bytes;
use std::fs::File;
use std::sync::Arc;
use twinblock_io::Member;
use twinblock_nbd::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, Extent, ZeroFlags};

/// Zeroes are written in pieces of at most this size (the shared zero buffer's) when the range
/// may not be deallocated.
const ZERO_WRITE_BYTES_MAX: u64 = twinblock_nbd::zeroes::ZERO_BUFFER_BYTES as u64;

pub struct MemberDevice {
    member: Arc<dyn Member>,
    read_only: bool,
    /// A plain descriptor on the image for `SEEK_DATA`/`SEEK_HOLE`; `None` for block devices.
    map: Option<Arc<File>>,
    /// Re-reads from memory (see [`crate::cache`]); every write, trim and zeroing below keeps
    /// it equal to the image.
    cache: Option<Arc<ReadCache>>,
}

impl MemberDevice {
    pub fn new(member: Arc<dyn Member>, read_only: bool, map: Option<File>) -> Self {
        MemberDevice {
            member,
            read_only,
            map: map.map(Arc::new),
            cache: None,
        }
    }

    /// Serves re-reads from `cache`; None: every read goes to the image.
    pub fn with_cache(mut self, cache: Option<Arc<ReadCache>>) -> Self {
        self.cache = cache;
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
            Some(c) => {
                c.read(offset, u64::from(len), |o, l| member.read_at(o, l as usize))
                    .await?
            }
            None => member.read_at(offset, len as usize).await?,
        })
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        match &self.cache {
            Some(c) => {
                c.write(offset, &data, self.member.write_at(offset, data.clone()))
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
