//! Large writes without the NVRAM data copy.
//!
//! A write whose range covers whole stripes of the store sends those stripes to the store
//! directly, through its normal write path (full-stripe writes: parity computed once, no read;
//! the RAID array's write-intent bitmap and stripe locks apply), makes them durable, and only
//! then appends a small STORED record (no payload) saying "the store holds `[offset, offset +
//! len)` as of this seq". The head and tail that are not whole stripes go through the journal
//! like any write. The STORED record is mirrored, persisted and acknowledged like every other
//! record; the partner needs nothing else, the data being on the shared disks.
//!
//! # Ordering
//!
//! The record's seq S orders the write among the others, exactly as a WRITE record would:
//! - records older than S over the range are superseded: appending the record removes the
//!   range from the dirty index under the same hold of the volume's lock (every entry there is
//!   older than S), so reads go to the store; recovery builds its index with the STORED range on
//!   top of older records (`recover::RecoveryPlan::dirty_index`) and never redoes them there;
//! - records newer than S (appended after it) stay in the index and are applied by CPs as usual.
//!
//! What must never happen is a CP writing bytes older than S over the range after the store
//! write. A CP applies a snapshot of the index taken at its start; [`Bypasses::gate`] (a gate
//! by byte range, `gate`) keeps the two apart where they overlap: a bypass holds its range from
//! before its store write until its record is appended and the index forgot the range; a CP
//! holds its snapshot's ranges until its store writes are done, and waits for the bypasses in
//! flight over them (then snapshots again). So a CP that snapshotted older entries of the range
//! finishes its writes before the bypass writes the store, and a CP that starts afterwards
//! snapshots an index without them. Bypasses beside a CP's ranges do not wait for it. Small
//! writes to the range during a bypass are ordered by their seq against S: in the index, in the
//! store after CPs, and in recovery alike.
//!
//! A log too full for the record: the bypass lets go of its range (the CP that frees space may
//! need it), waits, and writes the store again (that CP may have written older bytes over it).
//!
//! # Crashes
//!
//! Before the record is persisted the write was not acknowledged: recovery redoes the older
//! records over the range (their bytes or the new ones are both acceptable), and parity of
//! stripes the cut interrupted is repaired by the bitmap resync like for any interrupted write.
//! Degraded arrays never take this path ([`crate::Backing::bypass_allowed`]): their stripe
//! updates need the journal's partial-parity records.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;

use super::{Shared, ShipList, WhenFull};
use crate::backing::Backing;
use crate::error::{BackingError, JournalError};
use crate::format::RecordKind;
use crate::recover::backing_err;

/// What a volume keeps for its large writes.
pub(super) struct Bypasses {
    /// Held by a bypass over its range from before its store write until its record is
    /// appended and the index forgot the range; by a CP over its snapshot's ranges from the
    /// snapshot to the end of its store writes (module doc).
    pub gate: super::gate::RangeGate,
    /// Bypass store writes completed so far; each gets the next number.
    writes_done: AtomicU64,
    /// The highest write number a completed store flush covers. Held while flushing, so that
    /// concurrent bypasses share flushes: one whose write a flush that started after it covers
    /// waits for that flush instead of issuing its own.
    flushed_through: tokio::sync::Mutex<u64>,
}

impl Bypasses {
    pub(super) fn new() -> Bypasses {
        Bypasses {
            gate: super::gate::RangeGate::default(),
            writes_done: AtomicU64::new(0),
            flushed_through: tokio::sync::Mutex::new(0),
        }
    }

    /// Writes `data` at `offset` through the store's normal write path; with `flush`, returns
    /// only once a store flush that started after the write completed has finished (its own, or
    /// a concurrent bypass's). Without, the write is left to [`Bypasses::flush_pending`].
    async fn write_durable<B: Backing>(
        &self,
        backing: &B,
        offset: u64,
        data: Bytes,
        flush: bool,
    ) -> Result<(), BackingError> {
        backing.write(offset, data).await?;
        let ticket = self.writes_done.fetch_add(1, Ordering::AcqRel) + 1;
        if flush {
            self.flush_through(backing, ticket).await?;
        }
        Ok(())
    }

    /// Returns once every bypass store write completed so far is covered by a finished store
    /// flush (at once when one already is).
    pub(super) async fn flush_pending<B: Backing>(&self, backing: &B) -> Result<(), BackingError> {
        let ticket = self.writes_done.load(Ordering::Acquire);
        self.flush_through(backing, ticket).await
    }

    /// Returns once a finished store flush covers write number `ticket`: one that started after
    /// it completed, issued here unless a concurrent caller's already covers it.
    async fn flush_through<B: Backing>(
        &self,
        backing: &B,
        ticket: u64,
    ) -> Result<(), BackingError> {
        if ticket == 0 {
            return Ok(());
        }
        let mut flushed = self.flushed_through.lock().await;
        if *flushed >= ticket {
            return Ok(());
        }
        // Every write numbered up to here completed before this flush starts.
        let upto = self.writes_done.load(Ordering::Acquire);
        backing.flush().await?;
        *flushed = upto;
        Ok(())
    }
}

/// What a write that may have bypassed the log left to make durable.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Written {
    /// The newest seq of its records (journaled or STORED); 0 for nothing written.
    pub seq: u64,
    /// The newest seq of its journaled records (head and tail); 0 when all of it bypassed.
    pub journaled_seq: u64,
    /// Part of it went to the store directly (see [`Shared::bypass_flushes_each_write`]).
    pub stored: bool,
}

/// How a write splits: `head` bytes journaled, `body` bytes (whole stripes) to the store, `tail`
/// bytes journaled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Split {
    pub head: u64,
    pub body: u64,
    pub tail: u64,
}

/// The split of a write of `len` bytes at `offset` over a store of `stripe_bytes` stripes, when
/// its whole stripes are at least one stripe and `min_bytes`; `None`: all of it is journaled.
pub(super) fn split_write(
    offset: u64,
    len: u64,
    stripe_bytes: u64,
    min_bytes: u64,
) -> Option<Split> {
    let stripe = stripe_bytes.max(1);
    let end = offset.checked_add(len)?;
    let body_start = offset.div_ceil(stripe).checked_mul(stripe)?;
    let body_end = end / stripe * stripe;
    if body_end <= body_start {
        return None;
    }
    let body = body_end - body_start;
    if body < stripe.max(min_bytes) {
        return None;
    }
    Some(Split {
        head: body_start - offset,
        body,
        tail: end - body_end,
    })
}

impl<B: Backing> Shared<B> {
    /// The split of a write when part of it should bypass the log now.
    pub(super) fn bypass_split(&self, offset: u64, len: u64) -> Option<Split> {
        if !self.config.large_write_bypass || !self.backing.bypass_allowed() {
            return None;
        }
        split_write(
            offset,
            len,
            self.backing.stripe_bytes(),
            self.config.large_write_bypass_min_bytes,
        )
    }

    /// Whether every bypass flushes the store before its STORED record is appended. Yes unless
    /// the record cannot outlive this host's power: a lone volume (no partner holds a copy)
    /// whose NVRAM is on tmpfs/ramfs. Such a volume's acknowledged writes survive a crash of the
    /// daemon only, which loses no completed store write, and a power loss takes every record
    /// with it, so no STORED record can ever name bytes the disks lost. A FLUSH runs a CP (whose
    /// store flush covers every bypass before it); a FUA write flushes the store itself
    /// ([`Shared::make_durable`]). An NVRAM file on a disk in mode `none` may keep any part of
    /// itself through a power loss: there every bypass flushes.
    pub(super) fn bypass_flushes_each_write(&self) -> bool {
        self.local_durable || self.mirror.enabled() || !self.nvram_lost_with_power
    }

    /// Writes the head and tail through the journal and the whole stripes past it, all three at
    /// once.
    pub(super) async fn write_split(
        &self,
        offset: u64,
        data: Bytes,
        split: Split,
    ) -> Result<Written, JournalError> {
        let body_at = offset + split.head;
        let tail_at = body_at + split.body;
        let (h, b) = (split.head as usize, (split.head + split.body) as usize);
        let head = async {
            if split.head == 0 {
                return Ok(0);
            }
            self.write_journaled(offset, data.slice(..h)).await
        };
        let tail = async {
            if split.tail == 0 {
                return Ok(0);
            }
            self.write_journaled(tail_at, data.slice(b..)).await
        };
        let body = self.write_stored(body_at, data.slice(h..b));
        let (h, b, t) = tokio::try_join!(head, body, tail)?;
        Ok(Written {
            seq: h.max(b).max(t),
            journaled_seq: h.max(t),
            stored: true,
        })
    }

    /// Makes a finished write survive the loss of this host's power (FUA): its bypassed part
    /// by a store flush covering it (at once when every bypass flushes), its journaled part as
    /// [`Shared::wait_durable`] does for any record. The STORED record itself need not be
    /// durable: where it does not survive power loss, neither does anything older over its
    /// range that recovery could redo there.
    pub(super) async fn make_durable(self: &Arc<Self>, w: Written) -> Result<(), JournalError> {
        if !w.stored || self.bypass_flushes_each_write() {
            // The STORED record is as durable as the others here: it must be, since it
            // supersedes older records a partner or a persistent NVRAM would redo.
            return self.wait_durable(w.seq).await;
        }
        // A CP that covers the head and tail may have flushed the store before the bypass
        // write completed: the bypass gets a flush of its own (shared with concurrent ones).
        self.bypass
            .flush_pending(&self.backing)
            .await
            .map_err(backing_err("flush", 0))?;
        if w.journaled_seq > 0 {
            return self.wait_durable(w.journaled_seq).await;
        }
        Ok(())
    }

    /// Writes `data` (whole stripes) to the store (durably when
    /// [`Shared::bypass_flushes_each_write`]), then appends its STORED record; returns the
    /// record's seq once it is persisted (and shipped).
    async fn write_stored(&self, offset: u64, data: Bytes) -> Result<u64, JournalError> {
        let len = data.len() as u64;
        let flush = self.bypass_flushes_each_write();
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(JournalError::ShutDown);
            }
            self.lock().check_not_damaged()?;
            // Subscribed before the append looks at the log, so a CP freeing space after the look
            // is not missed.
            let space = self.space_freed.notified();
            tokio::pin!(space);
            let gate = self.bypass.gate.enter_bypass(offset, len).await;
            self.bypass
                .write_durable(&self.backing, offset, data.clone(), flush)
                .await
                .map_err(backing_err("bypass write", offset))?;
            space.as_mut().enable();
            let mut ship = ShipList::new(self);
            // Every index entry of the range is older than the record: reads go to the store.
            let appended = self
                .append_record(
                    RecordKind::Stored,
                    offset,
                    len,
                    &[],
                    &mut ship.items,
                    WhenFull::Return,
                    |st, _, _| st.index.remove(offset, len),
                )
                .await?;
            if let Some(seq) = appended {
                drop(gate);
                let mirrored = ship.send().await;
                self.wait_persisted(seq).await?;
                self.finish(&mirrored, &[seq]).await?;
                return Ok(seq);
            }
            // The log is full: the CP that frees space needs the gate, and may write older bytes
            // over the range, so the store write is done again afterwards.
            drop(gate);
            self.cp_wanted.notify_one();
            space.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRIPE: u64 = 192 * 1024;

    #[tokio::test]
    async fn durable_writes_survive_a_crash_and_concurrent_ones_share_flushes() {
        let mem = crate::MemBacking::with_yields(1 << 20, 4096);
        let b = Bypasses::new();
        let w = |i: u8| {
            b.write_durable(
                &mem,
                u64::from(i) * 4096,
                Bytes::from(vec![i + 1; 4096]),
                true,
            )
        };
        let (r0, r1, r2, r3) = tokio::join!(w(0), w(1), w(2), w(3));
        for r in [r0, r1, r2, r3] {
            r.unwrap();
        }
        mem.crash();
        let after = mem.contents();
        for i in 0..4u8 {
            let at = usize::from(i) * 4096;
            assert!(
                after[at..at + 4096].iter().all(|&x| x == i + 1),
                "write {i} lost"
            );
        }
        let flushes = mem.stats().flushes;
        assert!(
            (1..4).contains(&flushes),
            "{flushes} flushes for 4 concurrent writes"
        );
    }

    #[test]
    fn aligned_whole_stripes_bypass_entirely() {
        assert_eq!(
            split_write(STRIPE * 3, STRIPE * 2, STRIPE, 0),
            Some(Split {
                head: 0,
                body: 2 * STRIPE,
                tail: 0
            })
        );
    }

    #[test]
    fn unaligned_write_journals_head_and_tail() {
        // 1 MiB at 1 MiB: stripes from 1,179,648 to 1,966,080 (4 of them).
        let mib = 1 << 20;
        let s = split_write(mib, mib, STRIPE, 0).unwrap();
        assert_eq!(s.head, 6 * STRIPE - mib);
        assert_eq!(s.body, 4 * STRIPE);
        assert_eq!(s.head + s.body + s.tail, mib);
        assert_eq!((mib + s.head) % STRIPE, 0);
        assert_eq!((mib + s.head + s.body) % STRIPE, 0);
    }

    #[test]
    fn write_without_a_whole_stripe_does_not_bypass() {
        assert_eq!(split_write(4096, STRIPE, STRIPE, 0), None);
        assert_eq!(split_write(0, STRIPE - 1, STRIPE, 0), None);
        assert_eq!(split_write(0, 0, STRIPE, 0), None);
    }

    #[test]
    fn minimum_bytes_raise_the_threshold() {
        assert_eq!(split_write(0, 2 * STRIPE, STRIPE, 3 * STRIPE), None);
        assert!(split_write(0, 3 * STRIPE, STRIPE, 3 * STRIPE).is_some());
    }

    #[test]
    fn range_past_the_end_of_u64_does_not_bypass() {
        assert_eq!(split_write(u64::MAX - 10, 100, STRIPE, 0), None);
    }

    #[test]
    fn stripe_of_one_byte_bypasses_everything_above_the_minimum() {
        assert_eq!(
            split_write(7, 100, 1, 64),
            Some(Split {
                head: 0,
                body: 100,
                tail: 0
            })
        );
        assert_eq!(split_write(7, 63, 1, 64), None);
    }
}
