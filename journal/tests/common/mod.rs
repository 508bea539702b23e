//! Fixtures shared by the journal's integration tests: the NVRAM file of a test directory, a
//! volume config without timer or fill CPs, the block contents the seeded crash tests check
//! against, and the environment knobs of those tests. Each test file uses only some of them.
#![allow(dead_code)]

use std::path::Path;

use async_trait::async_trait;
use bytes::Bytes;
use twinblock_journal::{
    Backing, BackingError, JournalError, JournaledVolume, MemBacking, Nvram, NvramConfig,
    VolumeConfig,
};

/// Bytes of one block of the block-model tests.
pub const BLOCK_BYTES: u64 = 4096;
/// Version of a block the model zeroed (reads as zeroes, like version 0: never written).
pub const ZEROED: u32 = u32::MAX;

/// The NVRAM file `nvram.img` of `dir` with `log_bytes` per region (node 0, `persistence =
/// "none"`; change fields with struct update syntax).
pub fn nvram_at(dir: &Path, log_bytes: u64) -> NvramConfig {
    NvramConfig {
        path: dir.join("nvram.img"),
        log_bytes_per_region: log_bytes,
        ..NvramConfig::new(0, [3; 16])
    }
}

/// No timer or fill CPs (any CP seen was asked for, or made by writers waiting for room);
/// records of up to 64 KiB.
pub fn quiet_cfg() -> VolumeConfig {
    VolumeConfig {
        cp_interval_ms: 3_600_000,
        cp_fill_percent: 100,
        max_record_payload_bytes: 64 * 1024,
        ..VolumeConfig::default()
    }
}

/// Opens (recovering) the volume of `dir`'s NVRAM file over `backing`.
pub async fn open_volume<B: Backing>(
    dir: &Path,
    log_bytes: u64,
    backing: B,
    cfg: VolumeConfig,
) -> Result<JournaledVolume<B>, JournalError> {
    let nv = Nvram::open(&nvram_at(dir, log_bytes))?;
    JournaledVolume::open(nv, backing, 1, cfg).await
}

/// `len` bytes that differ per `seed` and along the buffer.
pub fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add((i % 251) as u8))
            .collect::<Vec<u8>>(),
    )
}

/// Contents of `block` at `version`: the block and version repeated with their position, so a
/// torn or misplaced block names what it holds; zeroes for version 0 and [`ZEROED`].
pub fn versioned_block(block: u64, version: u32) -> Vec<u8> {
    if version == 0 || version == ZEROED {
        return vec![0; BLOCK_BYTES as usize];
    }
    let mut v = Vec::with_capacity(BLOCK_BYTES as usize);
    while v.len() < BLOCK_BYTES as usize {
        v.extend_from_slice(&block.to_le_bytes());
        v.extend_from_slice(&version.to_le_bytes());
        v.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    v.truncate(BLOCK_BYTES as usize);
    v
}

/// A numeric environment knob of the seeded tests, `default` when unset or not a number.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What a [`HookedBacking`] does for a store write.
#[async_trait]
pub trait WriteHook: Send + Sync + 'static {
    /// Writes `data` at `offset` of `inner` (or fails), doing whatever the test watches.
    async fn write(&self, inner: &MemBacking, offset: u64, data: Bytes)
        -> Result<(), BackingError>;
}

/// A memory store whose writes go through a test's hook (to hold a CP, to watch its writes);
/// every other call goes straight to the store.
#[derive(Clone)]
pub struct HookedBacking<H> {
    pub inner: MemBacking,
    pub hook: H,
}

#[async_trait]
impl<H: WriteHook> Backing for HookedBacking<H> {
    fn size(&self) -> u64 {
        self.inner.size()
    }
    fn stripe_bytes(&self) -> u64 {
        self.inner.stripe_bytes()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BackingError> {
        self.inner.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackingError> {
        self.hook.write(&self.inner, offset, data).await
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.inner.write_zeroes(offset, len).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.inner.discard(offset, len).await
    }
    async fn flush(&self) -> Result<(), BackingError> {
        self.inner.flush().await
    }
    async fn applied_seq(&self) -> Result<u64, BackingError> {
        self.inner.applied_seq().await
    }
    async fn set_applied_seq(&self, seq: u64) -> Result<(), BackingError> {
        self.inner.set_applied_seq(seq).await
    }
}
