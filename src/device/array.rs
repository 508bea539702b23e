//! RAID arrays as volumes: `ArrayDevice` serves an array over NBD directly (no journal), and
//! `ArrayBacking` is the array as the store under an NVRAM journal.
//!
//! In an HA pair both carry the array's [`WriteGate`]: every write, trim, zeroing, journal
//! consistency point and applied-sequence update checks it first (lease fresh, reservations
//! held) and is refused with [`fence_error`] before anything reaches a member.

use crate::cache::ReadCache;
use crate::ha::gate::{FenceError, WriteGate};
use async_trait::async_trait;
use bytes::Bytes;
use std::sync::Arc;
use twinblock_journal::{Backing, BackingError, PplLog, StoreMark};
use twinblock_nbd::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, ReadData, ZeroFlags};
use twinblock_raid::array::{Array, ArrayError, PartialParityLog};

/// A write refused by the HA fence, as the I/O error clients and the journal see
/// (`PermissionDenied`: "reservation lost" or "lease expired", never retried on this node).
pub fn fence_error(e: FenceError) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::PermissionDenied, e)
}

/// Checks an optional gate (no gate: not HA-managed, always allowed).
pub fn check_gate(gate: &Option<Arc<WriteGate>>) -> std::io::Result<()> {
    match gate {
        Some(g) => g.check().map_err(fence_error),
        None => Ok(()),
    }
}

fn dev_err(e: ArrayError) -> DeviceError {
    DeviceError::Io(e.into())
}

/// An array served without a journal: every write goes to the members before it is answered.
pub struct ArrayDevice {
    array: Array,
    read_only: bool,
    gate: Option<Arc<WriteGate>>,
    cache: Option<Arc<ReadCache>>,
}

impl ArrayDevice {
    pub fn new(array: Array, read_only: bool) -> Self {
        ArrayDevice {
            array,
            read_only,
            gate: None,
            cache: None,
        }
    }

    /// Fences every write with `gate` (HA).
    pub fn with_gate(mut self, gate: Option<Arc<WriteGate>>) -> Self {
        self.gate = gate;
        self
    }

    /// Serves re-reads from `cache` (see [`crate::cache`]); None: every read goes to the array.
    pub fn with_cache(mut self, cache: Option<Arc<ReadCache>>) -> Self {
        self.cache = cache;
        self
    }

    pub fn cache(&self) -> Option<&Arc<ReadCache>> {
        self.cache.as_ref()
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
        let Some(cache) = &self.cache else {
            return self.array.read(offset, len as usize).await.map_err(dev_err);
        };
        cache
            .read(offset, u64::from(len), |o, l| array_read(&self.array, o, l))
            .await
            .map_err(dev_err)
    }

    /// A cache hit as the cached blocks themselves (see [`ReadData`]).
    async fn read_data(&self, offset: u64, len: u32) -> DeviceResult<ReadData> {
        let Some(cache) = &self.cache else {
            return self
                .array
                .read_pieces(offset, len as usize)
                .await
                .map(ReadData::from)
                .map_err(dev_err);
        };
        cache
            .read_pieces_partial(offset, u64::from(len), |o, l| {
                array_read_pieces(&self.array, o, l)
            })
            .await
            .map(ReadData::from)
            .map_err(dev_err)
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> DeviceResult<()> {
        if self.read_only {
            return Err(DeviceError::ReadOnly);
        }
        check_gate(&self.gate)?;
        match &self.cache {
            Some(c) => {
                c.write(offset, &data, self.array.write(offset, data.clone()))
                    .await
            }
            None => self.array.write(offset, data).await,
        }
        .map_err(dev_err)?;
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
        check_gate(&self.gate)?;
        let len = u64::from(len);
        invalidating(&self.cache, offset, len, self.array.discard(offset, len))
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
        check_gate(&self.gate)?;
        let len = u64::from(len);
        invalidating(
            &self.cache,
            offset,
            len,
            self.array.write_zeroes(offset, len),
        )
        .await
        .map_err(dev_err)?;
        if flags.fua {
            self.array.flush().await.map_err(dev_err)?;
        }
        Ok(())
    }
}

/// An array read as the cache's fetch (lengths are at most a request's, so they fit in usize).
async fn array_read(array: &Array, offset: u64, len: u64) -> Result<Bytes, ArrayError> {
    array.read(offset, len as usize).await
}

/// An array read as one buffer per chunk extent (no joining copy), as the cache's fetch.
async fn array_read_pieces(array: &Array, offset: u64, len: u64) -> Result<Vec<Bytes>, ArrayError> {
    array.read_pieces(offset, len as usize).await
}

/// Runs `op` (a zeroing or discard of `offset..offset+len`) with the cache's blocks of the range
/// invalidated around it (see [`crate::cache`]'s ordering argument).
async fn invalidating<Fut, T, E>(
    cache: &Option<Arc<ReadCache>>,
    offset: u64,
    len: u64,
    op: Fut,
) -> Result<T, E>
where
    Fut: std::future::Future<Output = Result<T, E>>,
{
    match cache {
        Some(c) => c.invalidate_around(offset, len, op).await,
        None => op.await,
    }
}

fn backing_err(e: ArrayError) -> BackingError {
    BackingError(e.to_string())
}

/// The journal's log as the array's partial-parity log: a degraded row update persists its
/// partial parity as a PPL record in NVRAM before any member write.
struct JournalPpl(PplLog);

#[async_trait]
impl PartialParityLog for JournalPpl {
    async fn persist(&self, payload: Vec<u8>) -> std::io::Result<()> {
        self.0
            .persist(&payload)
            .await
            .map_err(std::io::Error::other)
    }
}

/// The array as the journal's store.
pub struct ArrayBacking {
    pub array: Array,
    /// The HA fence of the array's disks (None: not HA-managed).
    pub gate: Option<Arc<WriteGate>>,
    /// The read cache of the array's bytes, under the journal's dirty index (the journal asks
    /// the store only for ranges its index does not hold; see [`crate::cache`]). Every store
    /// write below (CP write-back, replay, zeroing, discard) keeps it equal to the array.
    pub cache: Option<Arc<ReadCache>>,
}

impl ArrayBacking {
    /// The array as a store, without a read cache.
    pub fn new(array: Array, gate: Option<Arc<WriteGate>>) -> Self {
        ArrayBacking {
            array,
            gate,
            cache: None,
        }
    }

    fn check(&self) -> Result<(), BackingError> {
        check_gate(&self.gate).map_err(|e| BackingError(e.to_string()))
    }
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

    /// Whole stripes go straight to the members while every member is active: a degraded
    /// array's stripe updates need the journal's partial-parity records (its logged path).
    fn bypass_allowed(&self) -> bool {
        !self.array.is_degraded() && !self.array.ppl_active()
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BackingError> {
        usize::try_from(len).map_err(|_| BackingError(format!("read of {len} bytes")))?;
        match &self.cache {
            Some(c) => {
                c.read(offset, len, |o, l| array_read(&self.array, o, l))
                    .await
            }
            None => array_read(&self.array, offset, len).await,
        }
        .map_err(backing_err)
    }

    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<Bytes>, BackingError> {
        usize::try_from(len).map_err(|_| BackingError(format!("read of {len} bytes")))?;
        let Some(c) = &self.cache else {
            return array_read_pieces(&self.array, offset, len)
                .await
                .map_err(backing_err);
        };
        // A large read partly cached reads only the span of its missing blocks from the array.
        c.read_pieces_partial(offset, len, |o, l| array_read_pieces(&self.array, o, l))
            .await
            .map_err(backing_err)
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackingError> {
        self.check()?;
        match &self.cache {
            Some(c) => {
                c.write(offset, &data, self.array.write(offset, data.clone()))
                    .await
            }
            None => self.array.write(offset, data).await,
        }
        .map_err(backing_err)
    }

    /// A CP's write-back: its data is installed in the cache once the array holds it.
    async fn write_scattered(&self, writes: Vec<(u64, Bytes)>) -> Result<(), BackingError> {
        self.check()?;
        let Some(c) = &self.cache else {
            return self
                .array
                .write_scattered(writes)
                .await
                .map_err(backing_err);
        };
        let ranges: Vec<(u64, u64)> = writes.iter().map(|(o, d)| (*o, d.len() as u64)).collect();
        // Bytes clones are reference counts: the pieces stay readable for the install.
        let kept = writes.clone();
        let ticket = c.begin_write(&ranges);
        let r = self.array.write_scattered(writes).await;
        let pieces: Vec<(u64, &[u8])> = kept.iter().map(|(o, d)| (*o, &d[..])).collect();
        c.end_write(ticket, &ranges, r.is_ok().then_some(&pieces[..]));
        r.map_err(backing_err)
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.check()?;
        invalidating(
            &self.cache,
            offset,
            len,
            self.array.write_zeroes(offset, len),
        )
        .await
        .map_err(backing_err)
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.check()?;
        invalidating(&self.cache, offset, len, self.array.discard(offset, len))
            .await
            .map_err(backing_err)
    }

    async fn flush(&self) -> Result<(), BackingError> {
        self.array.flush().await.map_err(backing_err)
    }

    async fn applied_seq(&self) -> Result<u64, BackingError> {
        Ok(self.array.applied_seq())
    }

    async fn set_applied_seq(&self, seq: u64) -> Result<(), BackingError> {
        self.check()?;
        self.array.set_applied_seq(seq).await.map_err(backing_err)
    }

    async fn journal_mark(&self) -> Result<Option<StoreMark>, BackingError> {
        let m = self.array.journal_mark();
        Ok(Some(StoreMark {
            log_id: *m.log_id.as_bytes(),
            stopped_clean: m.stopped_clean,
            last_cp_unix_ms: m.last_cp_unix_ms,
        }))
    }

    async fn set_journal_mark(
        &self,
        log_id: [u8; 16],
        stopped_clean: bool,
    ) -> Result<(), BackingError> {
        self.check()?;
        self.array
            .set_journal_mark(uuid::Uuid::from_bytes(log_id), stopped_clean)
            .await
            .map_err(backing_err)
    }

    fn attach_ppl(&self, log: PplLog) {
        self.array.attach_ppl(Arc::new(JournalPpl(log)));
    }

    fn ppl_active(&self) -> bool {
        self.array.ppl_active()
    }

    fn ppl_bound_bytes(&self, len: u64, whole_rows: bool, framing_bytes: u64) -> u64 {
        self.array.ppl_bound_bytes(len, whole_rows, framing_bytes)
    }

    async fn replay_ppl(&self, payloads: Vec<Vec<u8>>, complete: bool) -> Result<(), BackingError> {
        self.array
            .replay_ppl(payloads, complete)
            .await
            .map(|_| ())
            .map_err(backing_err)
    }
}
