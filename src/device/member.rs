//! A volume served straight from one member (a plain image file or block device): the NBD
//! `BlockDevice` for `[[volume]] file = ...`, with no RAID and no journal.

use super::holes;
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
}

impl MemberDevice {
    pub fn new(member: Arc<dyn Member>, read_only: bool, map: Option<File>) -> Self {
        MemberDevice {
            member,
            read_only,
            map: map.map(Arc::new),
        }
    }

    /// Writes zeroes from the shared zero buffer: nothing is allocated per request, so the
    /// device reports no zero scratch memory (`DeviceCaps::zero_scratch_bytes` stays 0).
    async fn write_zero_pieces(&self, offset: u64, len: u64) -> DeviceResult<()> {
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
        Ok(self.member.read_at(offset, len as usize).await?)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.member.write_at(offset, data).await?;
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
        self.member.discard(offset, u64::from(len)).await?;
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
            self.member.discard(offset, u64::from(len)).await?;
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
