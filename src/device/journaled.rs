//! A RAID array behind the NVRAM journal: writes are answered once they are records in NVRAM;
//! consistency points apply them to the array later (see `twinblock_journal::volume`).

use super::array::{array_caps, check_gate, ArrayBacking};
use crate::pair::hops::{self, Hop};
use async_trait::async_trait;
use bytes::Bytes;
use twinblock_journal::{JournalError, JournaledVolume};
use twinblock_nbd::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, ReadData, ZeroFlags};

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

impl crate::pair::LogSource for JournaledDevice {
    fn unretired(&self) -> twinblock_journal::UnretiredRecords {
        self.volume.unretired_records()
    }
}

#[async_trait]
impl BlockDevice for JournaledDevice {
    fn size(&self) -> u64 {
        self.volume.size()
    }

    fn caps(&self) -> DeviceCaps {
        DeviceCaps {
            // Zeroes are a small journal record: as fast as it gets, and no zero buffer.
            fast_zero: true,
            zero_scratch_bytes: 0,
            ..array_caps(&self.volume.backing().array, self.read_only)
        }
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        self.volume
            .read(offset, u64::from(len))
            .await
            .map_err(dev_err)
    }

    /// Clean ranges come back as the read cache's blocks, sent without joining them.
    async fn read_data(&self, offset: u64, len: u32) -> DeviceResult<ReadData> {
        self.volume
            .read_pieces(offset, u64::from(len))
            .await
            .map(ReadData::from)
            .map_err(dev_err)
    }

    /// A plain write is answered once it is in NVRAM; with FUA, once it survives the loss of
    /// this host's power (the journal waits for a CP when its NVRAM would not).
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        // A fenced node must not acknowledge writes into its journal either: they would never
        // reach the disks it no longer holds.
        check_gate(&self.volume.backing().gate)?;
        hops::mark(Hop::DevWrite, 0);
        let done = if fua {
            self.volume.write_fua(offset, data).await.map_err(dev_err)
        } else {
            self.volume.write(offset, data).await.map_err(dev_err)
        };
        hops::mark(Hop::DevDone, 0);
        done
    }

    async fn flush(&self) -> DeviceResult<()> {
        self.volume.flush().await.map_err(dev_err)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        // A fenced node must not acknowledge writes into its journal either: they would never
        // reach the disks it no longer holds.
        check_gate(&self.volume.backing().gate)?;
        let len = u64::from(len);
        if fua {
            self.volume.trim_fua(offset, len).await
        } else {
            self.volume.trim(offset, len).await
        }
        .map_err(dev_err)
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        // A fenced node must not acknowledge writes into its journal either: they would never
        // reach the disks it no longer holds.
        check_gate(&self.volume.backing().gate)?;
        let len = u64::from(len);
        if flags.fua {
            self.volume.write_zeroes_fua(offset, len).await
        } else {
            self.volume.write_zeroes(offset, len).await
        }
        .map_err(dev_err)
    }
}
