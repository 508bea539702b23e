//! The `BlockDevice` trait: what the NBD server needs from whatever stores the bytes.
//!
//! The server knows nothing of files, RAID or journals; the node implements this trait for
//! each kind of volume. Offsets and lengths are in bytes and have already been checked by the
//! server against `size()` and the advertised block sizes before any method is called.

use async_trait::async_trait;
use bytes::Bytes;

use crate::readdata::ReadData;

/// Errors a device reports; the server maps each to an NBD error code.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("no space left on device")]
    NoSpace,
    #[error("device is read-only")]
    ReadOnly,
    #[error("operation not supported: {0}")]
    NotSupported(&'static str),
    /// Fast zeroing was requested (`NBD_CMD_FLAG_FAST_ZERO`) but would not be faster than writing.
    #[error("fast zero not possible")]
    NotFast,
    #[error("device is shutting down")]
    ShuttingDown,
    #[error("{0}")]
    Other(String),
}

pub type DeviceResult<T> = Result<T, DeviceError>;

/// One run of blocks with the same allocation state, as `base:allocation` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u32,
    /// `NBD_STATE_HOLE`: reads as zero and has no storage behind it.
    pub hole: bool,
    /// `NBD_STATE_ZERO`: known to read as zeroes.
    pub zero: bool,
}

/// What a device can do; the server turns this into transmission flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceCaps {
    pub read_only: bool,
    pub flush: bool,
    pub fua: bool,
    pub trim: bool,
    pub write_zeroes: bool,
    pub fast_zero: bool,
    pub cache: bool,
    pub rotational: bool,
    /// The device gives the same answers to every connection (NBD `CAN_MULTI_CONN`): a flush on
    /// one connection covers writes completed on all others. Only set when this is true.
    pub multi_conn: bool,
    /// Block size constraints advertised by `NBD_INFO_BLOCK_SIZE`. `max_block` is the device's
    /// own limit; the server advertises the smaller of it and its `max_request_bytes`.
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
    /// Most bytes of temporary memory one `TRIM` or `WRITE_ZEROES` allocates on this device
    /// (for example a zero-fill buffer); each such request is charged this much (at most its
    /// length) against the connection's in-flight budget. 0 for devices that write zeroes from
    /// [`crate::zeroes::zeroes`] or only record the range.
    pub zero_scratch_bytes: u32,
}

impl Default for DeviceCaps {
    fn default() -> Self {
        DeviceCaps {
            read_only: false,
            flush: true,
            fua: true,
            trim: true,
            write_zeroes: true,
            fast_zero: false,
            cache: true,
            rotational: false,
            multi_conn: false,
            min_block: 1,
            preferred_block: 4096,
            max_block: crate::server::MAX_REQUEST_BYTES_LIMIT,
            zero_scratch_bytes: 0,
        }
    }
}

/// Flags on `WRITE_ZEROES`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ZeroFlags {
    /// The client allows the range to be deallocated (it did not send `NO_HOLE`).
    pub may_trim: bool,
    /// `FAST_ZERO`: fail with `NotFast` rather than fall back to writing zeroes.
    pub fast: bool,
    pub fua: bool,
}

/// A block device served over NBD. All methods may be called concurrently.
#[async_trait]
pub trait BlockDevice: Send + Sync + 'static {
    /// Size in bytes.
    fn size(&self) -> u64;

    fn caps(&self) -> DeviceCaps;

    async fn read(&self, offset: u64, len: u32) -> DeviceResult<Bytes>;

    /// The same bytes as [`BlockDevice::read`], possibly as several shared buffers (a read
    /// cache's blocks) that the server writes to the socket with one vectored write instead of
    /// copying them into one buffer first. The pieces must not change once returned (they are
    /// `Bytes`, so they cannot). The default is `read` as one piece.
    async fn read_data(&self, offset: u64, len: u32) -> DeviceResult<ReadData> {
        self.read(offset, len).await.map(ReadData::from)
    }

    /// Write `data` at `offset`. With `fua` the data is durable when this returns.
    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()>;

    /// Make every write that completed before this call durable.
    async fn flush(&self) -> DeviceResult<()>;

    /// Discard a range; afterwards it may read as anything the device chooses, consistently.
    async fn trim(&self, offset: u64, len: u32, fua: bool) -> DeviceResult<()>;

    async fn write_zeroes(&self, offset: u64, len: u32, flags: ZeroFlags) -> DeviceResult<()>;

    /// Allocation state from `offset` for up to `len` bytes. The extents must cover at least one
    /// byte and must not run past `offset + len`... the server trims any excess. Return at most
    /// [`crate::transmission::BLOCK_STATUS_EXTENTS_MAX`] extents (the client asks again for the
    /// rest): that is what each request is charged against the in-flight budget, and extents
    /// past it are dropped.
    async fn block_status(&self, offset: u64, len: u32) -> DeviceResult<Vec<Extent>> {
        let _ = offset;
        Ok(vec![Extent {
            length: len,
            hole: false,
            zero: false,
        }])
    }

    /// Prefetch hint (`NBD_CMD_CACHE`).
    async fn cache(&self, offset: u64, len: u32) -> DeviceResult<()> {
        let _ = (offset, len);
        Ok(())
    }
}
