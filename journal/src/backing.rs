//! What a journaled volume writes through to: the [`Backing`] trait (the node implements it for a
//! RAID array), and [`MemBacking`], an in-memory backing with a volatile write cache used by tests.

use std::sync::{Arc, Mutex, MutexGuard};

use async_trait::async_trait;
use bytes::Bytes;

use crate::error::BackingError;
use crate::loss::StoreMark;
use crate::ppl::PplLog;

/// The store under a journal (a RAID array). Offsets and lengths are bytes; the journal never
/// calls outside `0..size()`.
#[async_trait]
pub trait Backing: Send + Sync + 'static {
    /// Bytes of the store.
    fn size(&self) -> u64;
    /// Bytes of one full data stripe (RAID 5/6 write without read-modify-write); 1 if none.
    fn stripe_bytes(&self) -> u64;
    /// A stable identity of the store (a RAID array's UUID). The journal binds its log to it and
    /// refuses to replay a log bound to another store. `None`: no identity, no check.
    fn store_id(&self) -> Option<[u8; 16]> {
        None
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BackingError>;
    /// The same bytes as [`Backing::read`], in order, possibly in several pieces (a read cache's
    /// blocks, shared rather than copied into one buffer). The default is `read` in one piece.
    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<Bytes>, BackingError> {
        Ok(vec![self.read(offset, len).await?])
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackingError>;
    /// Writes several non-overlapping pieces, in any order. A RAID 5/6 store plans the pieces
    /// that share a stripe together (one parity update per block column instead of one
    /// read-modify-write per piece); the default writes them one by one.
    async fn write_scattered(&self, writes: Vec<(u64, Bytes)>) -> Result<(), BackingError> {
        for (offset, data) in writes {
            self.write(offset, data).await?;
        }
        Ok(())
    }
    /// Whether a large write may go to the store now instead of through the log (see the
    /// volume's `bypass` module): the store writes whole stripes without reading (parity
    /// computed once) and is not degraded (a degraded RAID 5/6 store needs the partial-parity
    /// records of the journal path). The default: never.
    fn bypass_allowed(&self) -> bool {
        false
    }
    /// Makes `len` bytes at `offset` read as zero.
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackingError>;
    /// Discards `len` bytes at `offset`; their contents afterwards are unspecified.
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError>;
    /// Makes every completed write durable.
    async fn flush(&self) -> Result<(), BackingError>;
    /// The seq of the newest journal record whose effect the store holds (0 for a new store).
    async fn applied_seq(&self) -> Result<u64, BackingError>;
    /// Durably records `seq` as applied (the RAID array stores it in its member superblocks).
    /// Called only after [`Backing::flush`] made the writes it covers durable.
    async fn set_applied_seq(&self, seq: u64) -> Result<(), BackingError>;
    /// What the store records about the NVRAM log journaling it (see [`crate::loss`]); `None`:
    /// the store keeps no such record, and a lost log cannot be detected.
    async fn journal_mark(&self) -> Result<Option<StoreMark>, BackingError> {
        Ok(None)
    }
    /// Durably records that log `log_id` journals the store, and whether it stopped cleanly.
    async fn set_journal_mark(
        &self,
        _log_id: [u8; 16],
        _stopped_clean: bool,
    ) -> Result<(), BackingError> {
        Ok(())
    }
    /// Partial parity (see [`crate::ppl`]): the journal hands the store the log it persists its
    /// PPL records through, once at open, before any write. The default keeps none.
    fn attach_ppl(&self, _log: PplLog) {}
    /// Whether the store logs partial parity before its stripe updates now (a degraded RAID 5/6
    /// array); CPs then stay within the PPL reserve.
    fn ppl_active(&self) -> bool {
        false
    }
    /// Log bytes the PPL records of one store update of `len` bytes can take at most, each
    /// framed in at most `framing_bytes`; `whole_rows`: a zeroing or discard. 0: the store
    /// never logs partial parity.
    fn ppl_bound_bytes(&self, _len: u64, _whole_rows: bool, _framing_bytes: u64) -> u64 {
        0
    }
    /// After an unclean stop, before any other I/O: the store's bytes of the unretired PPL
    /// records, oldest first. `complete`: they come from the log that journaled the store
    /// (false when that log was lost). The store repairs the stripes they cover, or refuses.
    async fn replay_ppl(
        &self,
        _payloads: Vec<Vec<u8>>,
        _complete: bool,
    ) -> Result<(), BackingError> {
        Ok(())
    }
}

/// A shared store is a store (the node keeps the array in an `Arc`).
#[async_trait]
impl<T: Backing> Backing for Arc<T> {
    fn size(&self) -> u64 {
        (**self).size()
    }
    fn stripe_bytes(&self) -> u64 {
        (**self).stripe_bytes()
    }
    fn store_id(&self) -> Option<[u8; 16]> {
        (**self).store_id()
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BackingError> {
        (**self).read(offset, len).await
    }
    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<Bytes>, BackingError> {
        (**self).read_pieces(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackingError> {
        (**self).write(offset, data).await
    }
    async fn write_scattered(&self, writes: Vec<(u64, Bytes)>) -> Result<(), BackingError> {
        (**self).write_scattered(writes).await
    }
    fn bypass_allowed(&self) -> bool {
        (**self).bypass_allowed()
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        (**self).write_zeroes(offset, len).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        (**self).discard(offset, len).await
    }
    async fn flush(&self) -> Result<(), BackingError> {
        (**self).flush().await
    }
    async fn applied_seq(&self) -> Result<u64, BackingError> {
        (**self).applied_seq().await
    }
    async fn set_applied_seq(&self, seq: u64) -> Result<(), BackingError> {
        (**self).set_applied_seq(seq).await
    }
    async fn journal_mark(&self) -> Result<Option<StoreMark>, BackingError> {
        (**self).journal_mark().await
    }
    async fn set_journal_mark(
        &self,
        log_id: [u8; 16],
        stopped_clean: bool,
    ) -> Result<(), BackingError> {
        (**self).set_journal_mark(log_id, stopped_clean).await
    }
    fn attach_ppl(&self, log: PplLog) {
        (**self).attach_ppl(log)
    }
    fn ppl_active(&self) -> bool {
        (**self).ppl_active()
    }
    fn ppl_bound_bytes(&self, len: u64, whole_rows: bool, framing_bytes: u64) -> u64 {
        (**self).ppl_bound_bytes(len, whole_rows, framing_bytes)
    }
    async fn replay_ppl(&self, payloads: Vec<Vec<u8>>, complete: bool) -> Result<(), BackingError> {
        (**self).replay_ppl(payloads, complete).await
    }
}

/// Counters of a [`MemBacking`], for tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    pub writes: u64,
    /// Writes that started and ended on stripe boundaries.
    pub full_stripe_writes: u64,
    /// `write_scattered` calls, and the pieces they carried (also counted in `writes`).
    pub scattered_calls: u64,
    pub scattered_pieces: u64,
    pub flushes: u64,
    pub zero_or_discard: u64,
}

#[derive(Debug)]
struct MemState {
    /// What reads see (includes writes not yet flushed).
    current: Vec<u8>,
    /// What survives a crash.
    durable: Vec<u8>,
    applied_seq: u64,
    /// The journal mark, kept durably like `applied_seq` (a crash keeps it).
    mark: StoreMark,
    stats: MemStats,
    fail_writes: bool,
}

/// An in-memory [`Backing`] with a volatile cache: writes are lost by [`MemBacking::crash`]
/// unless flushed. Clones share the same store.
#[derive(Debug, Clone)]
pub struct MemBacking {
    state: Arc<Mutex<MemState>>,
    stripe_bytes: u64,
    /// Yield to the scheduler before each operation, like real I/O would, so that tests see
    /// writes interleave with consistency points.
    yield_on_io: bool,
    /// What [`Backing::store_id`] reports.
    id: Option<[u8; 16]>,
    /// What [`Backing::bypass_allowed`] reports.
    bypass: bool,
}

impl MemBacking {
    pub fn new(size: u64, stripe_bytes: u64) -> MemBacking {
        MemBacking {
            state: Arc::new(Mutex::new(MemState {
                current: vec![0; size as usize],
                durable: vec![0; size as usize],
                applied_seq: 0,
                mark: StoreMark::default(),
                stats: MemStats::default(),
                fail_writes: false,
            })),
            stripe_bytes: stripe_bytes.max(1),
            yield_on_io: false,
            id: None,
            bypass: false,
        }
    }

    /// This backing (and clones made afterwards) report `id` as their store identity.
    pub fn with_store_id(mut self, id: [u8; 16]) -> MemBacking {
        self.id = Some(id);
        self
    }

    /// This backing (and clones made afterwards) let large writes bypass the log.
    pub fn with_bypass(mut self) -> MemBacking {
        self.bypass = true;
        self
    }

    /// Like [`MemBacking::new`], but every operation first yields to the scheduler.
    pub fn with_yields(size: u64, stripe_bytes: u64) -> MemBacking {
        MemBacking {
            yield_on_io: true,
            ..MemBacking::new(size, stripe_bytes)
        }
    }

    async fn maybe_yield(&self) {
        if self.yield_on_io {
            tokio::task::yield_now().await;
        }
    }

    fn lock(&self) -> MutexGuard<'_, MemState> {
        // A poisoned lock means a test thread panicked; the data is still usable for reporting.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Loses every write not flushed.
    pub fn crash(&self) {
        let mut s = self.lock();
        s.current = s.durable.clone();
    }

    pub fn stats(&self) -> MemStats {
        self.lock().stats
    }

    /// Makes subsequent writes fail (fault injection).
    pub fn set_fail_writes(&self, fail: bool) {
        self.lock().fail_writes = fail;
    }

    /// A copy of what reads currently see.
    pub fn contents(&self) -> Vec<u8> {
        self.lock().current.clone()
    }

    fn check(&self, s: &MemState, offset: u64, len: u64) -> Result<(), BackingError> {
        if s.fail_writes {
            return Err(BackingError("injected write failure".into()));
        }
        match offset.checked_add(len) {
            Some(end) if end <= s.current.len() as u64 => Ok(()),
            _ => Err(BackingError(format!(
                "range {offset}+{len} outside memory backing of {} bytes",
                s.current.len()
            ))),
        }
    }
}

#[async_trait]
impl Backing for MemBacking {
    fn size(&self) -> u64 {
        self.lock().current.len() as u64
    }

    fn stripe_bytes(&self) -> u64 {
        self.stripe_bytes
    }

    fn store_id(&self) -> Option<[u8; 16]> {
        self.id
    }

    fn bypass_allowed(&self) -> bool {
        self.bypass
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BackingError> {
        self.maybe_yield().await;
        let s = self.lock();
        match offset.checked_add(len) {
            Some(end) if end <= s.current.len() as u64 => Ok(Bytes::copy_from_slice(
                &s.current[offset as usize..end as usize],
            )),
            _ => Err(BackingError(format!("read {offset}+{len} out of range"))),
        }
    }

    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackingError> {
        self.maybe_yield().await;
        let mut s = self.lock();
        self.check(&s, offset, data.len() as u64)?;
        let at = offset as usize;
        s.current[at..at + data.len()].copy_from_slice(&data);
        s.stats.writes += 1;
        if offset.is_multiple_of(self.stripe_bytes)
            && (data.len() as u64).is_multiple_of(self.stripe_bytes)
        {
            s.stats.full_stripe_writes += 1;
        }
        Ok(())
    }

    async fn write_scattered(&self, writes: Vec<(u64, Bytes)>) -> Result<(), BackingError> {
        {
            let mut s = self.lock();
            s.stats.scattered_calls += 1;
            s.stats.scattered_pieces += writes.len() as u64;
        }
        for (offset, data) in writes {
            self.write(offset, data).await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.maybe_yield().await;
        let mut s = self.lock();
        self.check(&s, offset, len)?;
        s.current[offset as usize..(offset + len) as usize].fill(0);
        s.stats.zero_or_discard += 1;
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.write_zeroes(offset, len).await
    }

    async fn flush(&self) -> Result<(), BackingError> {
        self.maybe_yield().await;
        let mut s = self.lock();
        s.durable = s.current.clone();
        s.stats.flushes += 1;
        Ok(())
    }

    async fn applied_seq(&self) -> Result<u64, BackingError> {
        Ok(self.lock().applied_seq)
    }

    async fn journal_mark(&self) -> Result<Option<StoreMark>, BackingError> {
        Ok(Some(self.lock().mark))
    }

    async fn set_journal_mark(
        &self,
        log_id: [u8; 16],
        stopped_clean: bool,
    ) -> Result<(), BackingError> {
        let mut s = self.lock();
        s.mark.log_id = log_id;
        s.mark.stopped_clean = stopped_clean;
        Ok(())
    }

    async fn set_applied_seq(&self, seq: u64) -> Result<(), BackingError> {
        self.lock().mark.last_cp_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.lock().applied_seq = seq;
        Ok(())
    }
}
