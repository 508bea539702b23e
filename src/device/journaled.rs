//! A RAID array behind the NVRAM journal: writes are answered once they are records in NVRAM;
//! consistency points apply them to the array later (see `twinblock_journal::volume`).

use super::array::{array_caps, check_gate, ArrayBacking};
use async_trait::async_trait;
use bytes::Bytes;
use twinblock_journal::{JournalError, JournaledVolume};
use twinblock_nbd::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, ZeroFlags};

fn dev_err(e: JournalError) -> DeviceError {
    DeviceError::Io(std::io::Error::other(e))
}

pub struct JournaledDevice {
    volume: JournaledVolume<ArrayBacking>,
    read_only: bool,
}

impl JournaledDevice {
    pub fn new(volume: JournaledVolume<ArrayBacking>, read_only: bool) -> Self {
        JournaledDevice { volume, read_only }
    }

    pub fn volume(&self) -> &JournaledVolume<ArrayBacking> {
        &self.volume
    }
}

#[async_trait]
impl BlockDevice for JournaledDevice {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn caps(&self) -> DeviceCaps {
        DeviceCaps {
            // Zeroes are a small journal record: as fast as it gets.
            fast_zero: true,
            ..array_caps(&self.volume.backing().array, self.read_only)
        }
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        self.volume
            .read(offset, u64::from(len))
            .await
            .map_err(dev_err)
    }

    /// A journaled write is durable (in NVRAM) when it returns, so FUA needs nothing more.
    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        // A fenced node must not acknowledge writes into its journal either: they would never
        // reach the disks it no longer holds.
        check_gate(&self.volume.backing().gate)?;
        self.volume.write(offset, data).await.map_err(dev_err)
    }

    async fn flush(&self) -> DeviceResult<()> {
        self.volume.flush().await.map_err(dev_err)
    }

    async fn trim(&self, offset: u64, len: u32, _fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        // A fenced node must not acknowledge writes into its journal either: they would never
        // reach the disks it no longer holds.
        check_gate(&self.volume.backing().gate)?;
        self.volume
            .trim(offset, u64::from(len))
            .await
            .map_err(dev_err)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, _flags: ZeroFlags) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        // A fenced node must not acknowledge writes into its journal either: they would never
        // reach the disks it no longer holds.
        check_gate(&self.volume.backing().gate)?;
        self.volume
            .write_zeroes(offset, u64::from(len))
            .await
            .map_err(dev_err)
    }
}
