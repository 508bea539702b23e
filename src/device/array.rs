//! RAID arrays as volumes: `ArrayDevice` serves an array over NBD directly (no journal), and
//! `ArrayBacking` is the array as the store under an NVRAM journal.

use async_trait::async_trait;
use bytes::Bytes;
use twinblock_journal::{Backing, BackingError};
use twinblock_nbd::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, ZeroFlags};
use twinblock_raid::array::{Array, ArrayError};

fn dev_err(e: ArrayError) -> DeviceError {
    DeviceError::Io(e.into())
}

/// An array served without a journal: every write goes to the members before it is answered.
pub struct ArrayDevice {
    array: Array,
    read_only: bool,
}

impl ArrayDevice {
    pub fn new(array: Array, read_only: bool) -> Self {
        ArrayDevice { array, read_only }
    }
}

/// Capabilities shared by array-backed volumes: stripe-sized preferred blocks, one array
/// instance behind every connection (so a flush covers all of them).
pub fn array_caps(array: &Array, read_only: bool) -> DeviceCaps {
    let preferred = u32::try_from(array.stripe_bytes())
        .unwrap_or(u32::MAX)
        .clamp(4096, 1 << 20);
    DeviceCaps {
        read_only,
        fast_zero: false,
        multi_conn: true,
        preferred_block: preferred.next_power_of_two().min(1 << 20),
        // Zeroing (and trimming partial rows) writes zero buffers of up to this size.
        zero_scratch_bytes: u32::try_from(twinblock_raid::array::ZERO_WRITE_BYTES)
            .unwrap_or(u32::MAX),
        ..DeviceCaps::default()
    }
}

#[async_trait]
impl BlockDevice for ArrayDevice {
    fn size(&self) -> u64 {
        self.array.size()
    }

    fn caps(&self) -> DeviceCaps {
        array_caps(&self.array, self.read_only)
    }

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes> {
        self.array.read(offset, len as usize).await.map_err(dev_err)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.array.write(offset, data).await.map_err(dev_err)?;
        if fua {
            self.array.flush().await.map_err(dev_err)?;
        }
        Ok(())
    }

    async fn flush(&self) -> DeviceResult<()> {
        self.array.flush().await.map_err(dev_err)
    }

    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        self.array
            .discard(offset, u64::from(len))
            .await
            .map_err(dev_err)?;
        if fua {
            self.array.flush().await.map_err(dev_err)?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        if flags.fast {
            // Zeroing a parity array means writing the members: not faster than a write.
            return Err(DeviceError::NotFast);
        }
        self.array
            .write_zeroes(offset, u64::from(len))
            .await
            .map_err(dev_err)?;
        if flags.fua {
            self.array.flush().await.map_err(dev_err)?;
        }
        Ok(())
    }
}

fn backing_err(e: ArrayError) -> BackingError {
    BackingError(e.to_string())
}

/// The array as the journal's store.
pub struct ArrayBacking {
    pub array: Array,
}

#[async_trait]
impl Backing for ArrayBacking {
    fn size(&self) -> u64 {
        self.array.size()
    }

    fn stripe_bytes(&self) -> u64 {
        self.array.stripe_bytes().max(1)
    }

    fn store_id(&self) -> Option<[u8; 16]> {
        Some(*self.array.uuid().as_bytes())
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BackingError> {
        let len = usize::try_from(len).map_err(|_| BackingError(format!("read of {len} bytes")))?;
        self.array.read(offset, len).await.map_err(backing_err)
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackingError> {
        self.array.write(offset, data).await.map_err(backing_err)
    }

    async fn write_scattered(&self, writes: Vec<(u64, Bytes)>) -> Result<(), BackingError> {
        self.array
            .write_scattered(writes)
            .await
            .map_err(backing_err)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.array
            .write_zeroes(offset, len)
            .await
            .map_err(backing_err)
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.array.discard(offset, len).await.map_err(backing_err)
    }

    async fn flush(&self) -> Result<(), BackingError> {
        self.array.flush().await.map_err(backing_err)
    }

    async fn applied_seq(&self) -> Result<u64, BackingError> {
        Ok(self.array.applied_seq())
    }

    async fn set_applied_seq(&self, seq: u64) -> Result<(), BackingError> {
        self.array.set_applied_seq(seq).await.map_err(backing_err)
    }
}
