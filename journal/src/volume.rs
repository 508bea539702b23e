//! The journaled volume: writes are acknowledged once they are records in NVRAM; a flusher applies
//! them to the [`Backing`] store in consistency points (CPs); at open the records the store lacks are indexed again and the first CP applies them.
//!
//! # State-machine logging
//!
//! Each write is a small transaction with the states *received → journaled → mirrored →
//! acknowledged → applied*. Following the state-machine-logging design, the log holds the
//! *state* reached at each transition (volume, offset, data), never code, and is written at the
//! level of requests, not of RAID stripes. The transitions are recorded compactly:
//!
//! | transition | what is logged |
//! | --- | --- |
//! | received | nothing: a request not yet journaled was never acknowledged, so there is nothing to redo; the client resends it after a crash |
//! | journaled | the WRITE / ZERO / TRIM record itself (seq S), persisted before anything else happens |
//! | mirrored | a bit in a batched TRANSITION record: seq ranges the partner holds |
//! | acknowledged | a batched TRANSITION record: seq ranges whose client got the reply |
//! | applied | a CP record: every record with seq ≤ `applied_seq` is durable in the store; the store also keeps `applied_seq` in its superblocks |
//!
//! TRANSITION records are emitted at CPs, on `flush`, and when the pending set grows to
//! [`TRANSITION_MAX_ENTRIES`] ranges, so they cost a fraction of a record per write. Recovery needs
//! only two facts: a data record is *retired* when its seq ≤ `applied_seq` (the store's value or
//! any CP record's, whichever is larger) and is skipped; every other intact data record is redone
//! in seq order, acknowledged or not (an unacknowledged write that is redone is a write that
//! happened before the crash, which NBD allows). The mirrored/acknowledged ranges are kept for the
//! takeover path and for `dump`, which shows which in-flight transactions reached which state.
//!
//! # Concurrency
//!
//! One `std::sync::Mutex` guards the log cursor, the region and the dirty index; it is never held
//! across an `.await`. Appends copy under it. In `none` and `pmem` mode they also persist under it
//! (nothing, or cache-line write-back: far cheaper than handing the record to another thread), so
//! records become persistent strictly in seq order and a crash can tear only the newest one. In
//! `msync` mode the appender hands the record to the log's group-commit thread
//! ([`crate::group_commit`]) and awaits its persistence with the lock released; the thread
//! persists every record appended meanwhile with one `msync` per run of pages, so concurrent
//! writers share one disk write. At most [`crate::scan::UNPERSISTED_MAX_RECORDS`] records are then
//! unpersisted at once (appenders wait for room), which recovery relies on. Reads copy dirty
//! bytes out of NVRAM under the lock and read the gaps from the store after releasing it.
//!
//! A CP (one at a time, `cp_lock`) snapshots the index and the head, writes the snapshot to the
//! store in stripe-aligned batches, flushes, stores `applied_seq`, persists the new tail in the
//! region's control slot, frees the space, retires index entries with seq ≤ the CP's seq (entries
//! overwritten during the CP have newer seqs and stay), and appends the CP record. Writers that
//! find the log full wait on `space_freed` (back-pressure) after waking the flusher; if CPs fail
//! while the log is full they get [`JournalError::CpFailed`] instead of waiting forever.
//!
//! # Durability: what an acknowledgement survives
//!
//! A write is acknowledged once its record is persisted in NVRAM (and shipped to the partner when
//! a mirror is configured; in `msync` mode the group commit persists while the record is
//! shipped). FLUSH and FUA promise more, as the NBD specification says: the covered writes survive
//! the loss of this host's power. The volume tracks the *durable seq*, the highest
//! seq known to survive power loss, as the largest of
//! - the newest persisted seq, when the NVRAM medium survives power loss (`msync` on a persistent
//!   file, `pmem` on DAX: [`Nvram::survives_power_loss`]);
//! - [`MirrorHook::partner_durable_seq`]: what an in-sync partner holds;
//! - `applied_seq`: what a CP wrote to the store and flushed.
//!
//! FLUSH waits until the durable seq reaches the newest data seq journaled when it was called;
//! FUA waits for its own record's seq. With an in-sync partner it first waits (bounded by the
//! mirror) for the partner's acknowledgement of that seq ([`MirrorHook::wait_partner_durable`]).
//! When that does not make it durable (tmpfs, no in-sync partner), the waiters queue on
//! `cp_lock` and one CP covers all of them (group commit). `flushes_by_partner` and
//! `flushes_by_cp` in [`VolumeStatus`] count which of the two made a FLUSH / FUA durable.
//!
//! # Mirror hook
//!
//! With a [`MirrorHook`] enabled, each appended record is copied under the lock and shipped (with
//! its log offset) before the request returns; the mirrored seqs go into the next TRANSITION
//! record. A CP does not free log space until every record it covers has been shipped, so the
//! partner never receives a record for space the owner has already reused. See
//! [`crate::nvram::PartnerRegion::receive`] for the receiving side and [`crate::recover`] for
//! takeover replay.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::sync::futures::Notified;
use tokio::sync::Notify;

use crate::backing::Backing;
use crate::error::JournalError;
use crate::format::{
    align_up, encode_transitions, CpPayload, RecordHeader, RecordKind, TransitionEntry,
    TransitionState, RECORD_HEADER_BYTES, TRANSITION_ENTRY_BYTES, TRANSITION_MAX_ENTRIES,
};
use crate::group_commit::{GroupCommit, PendingRecord};
use crate::index::{DirtyIndex, Extent, ExtentData};
use crate::log::LogCursor;
use crate::nvram::{Nvram, Region};
use crate::pmem::{PersistMethod, PersistenceMode};
use crate::ppl::{self, PplAppend, PplLog, PPL_FRAMING_BYTES};
use crate::ppl_budget::{Owed, PplBudget};
use crate::recover::{apply_plan, backing_err, plan_recovery, RecoveryReport};
use crate::verify::{DamagedRecord, Unverified};

mod bypass;
mod gate;

/// Log bytes writers leave free so that CP, TRANSITION and PAD records always fit.
const CONTROL_RESERVE_BYTES: u64 =
    4 * (RECORD_HEADER_BYTES as u64 + 8 + (TRANSITION_MAX_ENTRIES * TRANSITION_ENTRY_BYTES) as u64);

/// Most store writes a CP keeps in flight at once.
const CP_MAX_PARALLEL_WRITES: usize = 32;
/// Log bytes whose deferred CRCs the background check verifies per hold of the volume's lock
/// (writers wait at most this long: well under 0.1 ms of CRC32C).
const DEFERRED_CRC_CHUNK_BYTES: u64 = 256 << 10;
/// Most CP batches (of `cp_batch_bytes`) copied out of NVRAM and in flight at once.
const CP_MAX_INFLIGHT_BATCHES: u64 = 8;
/// CP runs of at least this many bytes are copied out of NVRAM into buffers of the volume's
/// aligned pool (`Shared::cp_pool`) rather than fresh allocations: a fresh allocation that size
/// costs a page fault and a kernel page clear per 4 KiB once the allocator has given its pages
/// back, more than the copy itself; smaller ones come from the allocator's own free lists.
const CP_POOLED_RUN_MIN_BYTES: u64 = 16 << 10;

/// One store operation of a CP.
enum CpOp {
    Write(u64, Bytes),
    Zero(u64, u64),
    Trim(u64, u64),
}

impl CpOp {
    fn range(&self) -> (u64, u64) {
        match self {
            CpOp::Write(at, data) => (*at, data.len() as u64),
            CpOp::Zero(at, len) | CpOp::Trim(at, len) => (*at, *len),
        }
    }

    fn data_bytes(&self) -> u64 {
        match self {
            CpOp::Write(_, data) => data.len() as u64,
            _ => 0,
        }
    }
}

/// CP operations that share stripes, run one after the other by one task.
#[derive(Default)]
struct CpGroup {
    ops: Vec<CpOp>,
    bytes: u64,
    last_stripe: Option<u64>,
}

/// The store writes of one CP in flight; dropping it (CP cancelled) aborts them.
struct CpJobs {
    set: tokio::task::JoinSet<Result<u64, JournalError>>,
    inflight_bytes: u64,
}

impl CpJobs {
    /// Waits for one write to finish; its error (or panic) fails the CP.
    async fn join_one(&mut self) -> Result<(), JournalError> {
        match self.set.join_next().await {
            Some(Ok(Ok(bytes))) => {
                self.inflight_bytes -= bytes;
                Ok(())
            }
            Some(Ok(Err(e))) => Err(e),
            Some(Err(join)) => Err(JournalError::Backing {
                op: "write",
                offset: 0,
                message: format!("CP write task failed: {join}"),
            }),
            None => Ok(()),
        }
    }

    /// Waits until one more job of `bytes` fits the limits.
    async fn make_room(&mut self, bytes: u64, max_inflight_bytes: u64) -> Result<(), JournalError> {
        while !self.set.is_empty()
            && (self.set.len() >= CP_MAX_PARALLEL_WRITES
                || self.inflight_bytes + bytes > max_inflight_bytes)
        {
            self.join_one().await?;
        }
        Ok(())
    }
}

/// Tuning of a journaled volume.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct VolumeConfig {
    /// A CP runs at least this often while there are unapplied writes.
    pub cp_interval_ms: u64,
    /// A CP starts when the log is this full (percent of the region's log).
    pub cp_fill_percent: u8,
    /// Larger writes are split into records of at most this payload.
    pub max_record_payload_bytes: u64,
    /// A CP writes the store in batches of about this many bytes (rounded to stripes).
    pub cp_batch_bytes: u64,
    /// Start even when the log is damaged in the middle (records after the damage are lost).
    pub discard_corrupt_log: bool,
    /// Writes covering whole stripes of the store go to it directly (durable first), and only
    /// a small STORED record goes to NVRAM (see `bypass`); when the store allows it (a RAID
    /// array that is not degraded).
    pub large_write_bypass: bool,
    /// The whole-stripe part of a write bypasses the log only when it is at least this many
    /// bytes (and always at least one full stripe); 0: one full stripe.
    pub large_write_bypass_min_bytes: u64,
}

impl Default for VolumeConfig {
    fn default() -> Self {
        VolumeConfig {
            cp_interval_ms: 1000,
            cp_fill_percent: 50,
            max_record_payload_bytes: 1024 * 1024,
            cp_batch_bytes: 4 * 1024 * 1024,
            discard_corrupt_log: false,
            large_write_bypass: true,
            large_write_bypass_min_bytes: 0,
        }
    }
}

/// Whether the partner holds a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorOutcome {
    Mirrored,
    /// Partner down or link out: the write proceeds on local NVRAM alone.
    NotMirrored,
}

/// Where the mirror ships records to the partner before a write returns.
#[async_trait]
pub trait MirrorHook: Send + Sync + 'static {
    /// When false the journal does not copy records for shipping.
    fn enabled(&self) -> bool;
    /// Ships one encoded record that sits at `log_offset` of the own log; returns once the
    /// partner has persisted it (or gave up).
    async fn ship(&self, log_offset: u64, seq: u64, record: Bytes) -> MirrorOutcome;
    /// The own log restarted (after recovery) at `tail_offset` with `tail_seq` in `generation`.
    fn log_reset(&self, generation: u64, tail_offset: u64, tail_seq: u64);
    /// When the partner is in sync and its NVRAM survives the loss of this host's power: the
    /// highest seq X such that it has persisted every record of this log with seq <= X. `None`
    /// when it is not in sync. FLUSH and FUA covered by X need no CP (see [`durable seq`]).
    ///
    /// [`durable seq`]: JournaledVolume::durable_seq
    fn partner_durable_seq(&self) -> Option<u64> {
        None
    }
    /// Waits until [`MirrorHook::partner_durable_seq`] reaches `seq`, for at most the mirror's
    /// own bounded wait; true when it did. A FLUSH calls this before falling back to a CP, so
    /// that records still in flight to an in-sync partner are waited for, not checkpointed. The
    /// default does not wait.
    async fn wait_partner_durable(&self, seq: u64) -> bool {
        self.partner_durable_seq().is_some_and(|x| x >= seq)
    }
}

/// No partner: nothing is shipped.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMirror;

#[async_trait]
impl MirrorHook for NoMirror {
    fn enabled(&self) -> bool {
        false
    }
    async fn ship(&self, _log_offset: u64, _seq: u64, _record: Bytes) -> MirrorOutcome {
        MirrorOutcome::NotMirrored
    }
    fn log_reset(&self, _generation: u64, _tail_offset: u64, _tail_seq: u64) {}
}

/// A snapshot of the volume's journal state, for status output.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VolumeStatus {
    pub volume_id: u64,
    pub persistence: PersistenceMode,
    pub persist_method: PersistMethod,
    pub generation: u64,
    pub log_bytes: u64,
    pub log_used_bytes: u64,
    pub next_seq: u64,
    pub applied_seq: u64,
    pub dirty_extents: u64,
    pub dirty_bytes: u64,
    /// The highest seq known to survive the loss of this host's power.
    pub durable_seq: u64,
    /// An acknowledged write survives the loss of this host's power (else: a daemon crash only).
    pub ack_survives_power_loss: bool,
    pub cps_done: u64,
    /// FLUSH / FUA requests that an in-sync partner's copy made durable (no CP needed).
    pub flushes_by_partner: u64,
    /// FLUSH / FUA requests that waited for a CP (tmpfs NVRAM and no in-sync partner).
    pub flushes_by_cp: u64,
    pub writer_waits: u64,
    /// Persist calls made for log records: one per record in `pmem` mode (none in `none` mode),
    /// one per run of pages per group-commit round in `msync` mode.
    pub log_persists: u64,
    /// Group-commit rounds in `msync` mode (each acknowledges every writer it covered).
    pub group_commit_rounds: u64,
    pub last_cp_error: Option<String>,
    /// How long the CPs took (for the metrics; not in the admin replies).
    #[serde(skip)]
    pub cp_durations: crate::cp_timing::CpDurations,
    /// Records recovered at open whose CRC the background check has not verified yet.
    pub crc_unverified_records: u64,
    /// A recovered record failed its CRC check: the volume refuses I/O (the error).
    pub corrupt: Option<String>,
}

/// Sorted, merged inclusive seq ranges.
#[derive(Debug, Default)]
struct SeqRanges(Vec<(u64, u64)>);

impl SeqRanges {
    fn add(&mut self, seq: u64) {
        let v = &mut self.0;
        let i = v.partition_point(|&(a, _)| a <= seq);
        if i > 0 && v[i - 1].1 >= seq {
            return;
        }
        let joins_left = i > 0 && v[i - 1].1 + 1 == seq;
        let joins_right = i < v.len() && v[i].0 == seq + 1;
        match (joins_left, joins_right) {
            (true, true) => {
                v[i - 1].1 = v[i].1;
                v.remove(i);
            }
            (true, false) => v[i - 1].1 = seq,
            (false, true) => v[i].0 = seq,
            (false, false) => v.insert(i, (seq, seq)),
        }
    }
}

/// A record that was appended and may need shipping.
struct Shipped {
    log_offset: u64,
    seq: u64,
    bytes: Bytes,
}

/// Records appended for the mirror and not yet shipped. Dropping the list (also when the
/// writer's future is cancelled) takes its seqs out of `State::shipping`, so a CP never waits for
/// a shipment that will not happen.
struct ShipList<'a, B: Backing> {
    shared: &'a Shared<B>,
    items: Vec<Shipped>,
    seqs: Vec<u64>,
}

impl<'a, B: Backing> ShipList<'a, B> {
    fn new(shared: &'a Shared<B>) -> Self {
        ShipList {
            shared,
            items: Vec::new(),
            seqs: Vec::new(),
        }
    }

    /// Ships every pending record; returns the seqs the partner now holds.
    async fn send(&mut self) -> Vec<u64> {
        let mut mirrored = Vec::new();
        for s in std::mem::take(&mut self.items) {
            self.seqs.push(s.seq);
            let outcome = self.shared.mirror.ship(s.log_offset, s.seq, s.bytes).await;
            if outcome == MirrorOutcome::Mirrored {
                mirrored.push(s.seq);
            }
        }
        self.release();
        mirrored
    }

    fn release(&mut self) {
        self.seqs.extend(self.items.drain(..).map(|s| s.seq));
        if self.seqs.is_empty() {
            return;
        }
        {
            let mut st = self.shared.lock();
            for s in self.seqs.drain(..) {
                st.shipping.remove(&s);
            }
        }
        self.shared.shipped.notify_waiters();
    }
}

impl<B: Backing> Drop for ShipList<'_, B> {
    fn drop(&mut self) {
        self.release();
    }
}

/// What [`Shared::append_record`] does when the log is full.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WhenFull {
    /// Wait for a CP to free space, then append.
    Wait,
    /// Return `None` at once (a large write lets go of the CP gate first, then waits).
    Return,
}

/// What [`State::append`] did.
enum Appended {
    /// The record is in the log: its seq and log offset.
    Done { seq: u64, at: u64 },
    /// The log is full (leaving the reserve asked for).
    LogFull,
    /// Too many records wait for the group commit: wait for its progress, then retry.
    PersistBehind,
}

struct State {
    region: Region,
    /// `msync` mode: the log's group-commit thread (shared with [`Shared::group`]).
    group: Option<Arc<GroupCommit>>,
    /// Persist calls made under the lock (modes without a group commit).
    inline_persists: u64,
    cursor: LogCursor,
    generation: u64,
    index: DirtyIndex,
    applied_seq: u64,
    last_data_seq: u64,
    acked: SeqRanges,
    mirrored: SeqRanges,
    cps_done: u64,
    cp_durations: crate::cp_timing::CpDurations,
    flushes_by_partner: u64,
    flushes_by_cp: u64,
    writer_waits: u64,
    /// A writer found the log full since the last CP.
    space_wanted: bool,
    /// Seqs of records copied for the mirror and not yet shipped; a CP does not free log space
    /// holding one of them (the partner would get an old record after a newer one at the same
    /// offset).
    shipping: BTreeSet<u64>,
    last_cp_error: Option<String>,
    /// Recovered WRITE records whose CRC is not checked yet (see [`crate::verify`]).
    unverified: Option<Unverified>,
    /// A recovered record failed its CRC check: all I/O and CPs are refused.
    damaged: Option<DamagedRecord>,
    /// The seq the running (or last) CP applies up to: PPL records appended now carry it.
    ppl_cp_seq: u64,
    /// The PPL bounds the live data records owe ([`crate::ppl_budget`]).
    ppl_owed: Owed,
    /// A PPL record found no room since the running CP started.
    ppl_short: bool,
    /// The data records the running CP applies and the sum of their PPL bounds.
    ppl_planned: (u64, u64),
    /// Free bytes a PPL record leaves: the control reserve, and while a CP planned without
    /// partial parity runs, also the writers' PPL reserve (so that when the store starts logging
    /// during that CP and it fails, the CP run again can log the partial parity of a record).
    ppl_floor: u64,
}

impl State {
    /// Refuses I/O once a recovered record was found damaged.
    fn check_not_damaged(&self) -> Result<(), JournalError> {
        match self.damaged {
            Some(d) => Err(JournalError::CorruptRecordFound {
                region: self.region.name(),
                offset: d.log_offset,
                seq: d.seq,
            }),
            None => Ok(()),
        }
    }

    /// Before a read uses log bytes at `log_offset`: checks the CRC of the recovered record
    /// holding them if the background check has not reached it yet.
    fn verify_before_use(&mut self, log_offset: u64) -> Result<(), JournalError> {
        self.check_not_damaged()?;
        let Some(r) = self
            .unverified
            .as_ref()
            .and_then(|u| u.containing(log_offset))
        else {
            return Ok(());
        };
        if let Err(d) = Unverified::verify_record(&self.region, &r) {
            self.record_damage(d);
        }
        self.check_not_damaged()
    }

    fn record_damage(&mut self, d: DamagedRecord) {
        if self.damaged.is_none() {
            tracing::error!(
                region = self.region.name(),
                offset = d.log_offset,
                seq = d.seq,
                "recovered NVRAM record fails its CRC check: the volume refuses I/O and applies nothing"
            );
        }
        self.damaged = Some(d);
        self.unverified = None;
    }
    /// Makes stored log bytes persistent: at once (`pmem`, `none`), or by handing them to the
    /// group commit (`msync`; the caller awaits [`Shared::wait_persisted`] before acknowledging).
    fn persist_appended(
        &mut self,
        seq: u64,
        at: u64,
        len: u64,
        consumed: u64,
    ) -> Result<(), JournalError> {
        match &self.group {
            Some(group) => group.submit(PendingRecord {
                seq,
                at,
                len,
                consumed,
            }),
            None => {
                self.region.persist_log(at, len)?;
                if self.region.persist_method() != PersistMethod::Nothing {
                    self.inline_persists += 1;
                }
            }
        }
        Ok(())
    }

    /// Appends one record (and a PAD first when it must wrap), leaving `reserve` bytes free.
    /// With a group commit that has too many records in flight, blocks until it has room when
    /// `block_for_room` (records appended under the lock by CPs and flushes), else returns
    /// [`Appended::PersistBehind`]. The copies to ship go to `ship`.
    #[allow(clippy::too_many_arguments)]
    fn append(
        &mut self,
        kind: RecordKind,
        volume_id: u64,
        offset: u64,
        length: u64,
        payload: &[u8],
        reserve: u64,
        block_for_room: bool,
        copy: bool,
        ship: &mut Vec<Shipped>,
    ) -> Result<Appended, JournalError> {
        let total = RECORD_HEADER_BYTES as u64 + align_up(payload.len() as u64);
        let Some(p) = self.cursor.place(total, reserve) else {
            return Ok(Appended::LogFull);
        };
        if let Some(group) = &self.group {
            let records = 1 + u64::from(p.pad_bytes.is_some());
            let bytes = p.consumed + RECORD_HEADER_BYTES as u64;
            if block_for_room {
                group.wait_room_blocking(records, bytes)?;
            } else if !group.has_room(records, bytes)? {
                return Ok(Appended::PersistBehind);
            }
        }
        let mut seq = self.cursor.next_seq;
        if let Some(pad_bytes) = p.pad_bytes {
            let pad = RecordHeader {
                kind: RecordKind::Pad,
                generation: self.generation,
                seq,
                volume_id: 0,
                offset: 0,
                length: pad_bytes,
                payload_bytes: 0,
            }
            .encode(&[]);
            let at = self.cursor.head;
            self.region.write_log(at, &pad);
            self.persist_appended(seq, at, pad.len() as u64, pad_bytes)?;
            if copy {
                self.shipping.insert(seq);
                ship.push(Shipped {
                    log_offset: at,
                    seq,
                    bytes: Bytes::copy_from_slice(&pad),
                });
            }
            seq += 1;
        }
        let header = RecordHeader {
            kind,
            generation: self.generation,
            seq,
            volume_id,
            offset,
            length,
            payload_bytes: payload.len() as u32,
        }
        .encode(payload);
        self.region.write_log(p.at, &header);
        self.region
            .write_log(p.at + RECORD_HEADER_BYTES as u64, payload);
        let written = (RECORD_HEADER_BYTES + payload.len()) as u64;
        // Zero the padding and, when it is free space inside the log, the next header slot: the
        // scan then ends on a blank header instead of on the middle of an older lap's record,
        // which would look like damage. (Offset 0 always holds a record start of some lap.)
        let end = p.at + total;
        let next_header_free = end + RECORD_HEADER_BYTES as u64 <= self.cursor.log_bytes
            && self.cursor.free() - p.consumed >= RECORD_HEADER_BYTES as u64;
        let stored = if next_header_free {
            total + RECORD_HEADER_BYTES as u64
        } else {
            total
        };
        self.region.zero_log(p.at + written, stored - written);
        self.persist_appended(seq, p.at, stored, total)?;
        let committed = self.cursor.commit(p, total);
        debug_assert_eq!(committed, seq);
        if copy {
            self.shipping.insert(seq);
            ship.push(Shipped {
                log_offset: p.at,
                seq,
                bytes: Bytes::copy_from_slice(self.region.log_slice(p.at, stored)),
            });
        }
        Ok(Appended::Done { seq, at: p.at })
    }

    /// Appends TRANSITION records for the pending mirrored/acknowledged ranges, leaving
    /// `reserve` bytes free (they may use the control reserve, never the space kept for partial
    /// parity: [`crate::ppl_budget`]). Keeps what does not fit for after the next CP.
    fn emit_transitions(
        &mut self,
        volume_id: u64,
        copy: bool,
        reserve: u64,
        ship: &mut Vec<Shipped>,
    ) -> Result<(), JournalError> {
        let mut entries: Vec<TransitionEntry> = Vec::new();
        let take = |from: &mut SeqRanges, state, entries: &mut Vec<TransitionEntry>| {
            let room = TRANSITION_MAX_ENTRIES - entries.len();
            let n = from.0.len().min(room);
            entries.extend(from.0.drain(..n).map(|(a, b)| TransitionEntry {
                state,
                first_seq: a,
                last_seq: b,
            }));
        };
        take(&mut self.mirrored, TransitionState::Mirrored, &mut entries);
        take(&mut self.acked, TransitionState::Acknowledged, &mut entries);
        if entries.is_empty() {
            return Ok(());
        }
        let payload = encode_transitions(&entries);
        let appended = self.append(
            RecordKind::Transition,
            volume_id,
            0,
            0,
            &payload,
            reserve,
            true,
            copy,
            ship,
        )?;
        if !matches!(appended, Appended::Done { .. }) {
            // Log completely full: put the ranges back in front (they were drained from the
            // front, nothing was added since); they go out after the next CP.
            let back = |state| {
                entries
                    .iter()
                    .filter(move |e| e.state == state)
                    .map(|e| (e.first_seq, e.last_seq))
            };
            let mirrored: Vec<_> = back(TransitionState::Mirrored).collect();
            let acked: Vec<_> = back(TransitionState::Acknowledged).collect();
            self.mirrored.0.splice(0..0, mirrored);
            self.acked.0.splice(0..0, acked);
        }
        Ok(())
    }
}

struct Shared<B: Backing> {
    backing: B,
    volume_id: u64,
    size: u64,
    config: VolumeConfig,
    persistence: PersistenceMode,
    /// A record persisted in the own NVRAM survives the loss of this host's power.
    local_durable: bool,
    /// The NVRAM is on tmpfs/ramfs: none of its records survives this host's power loss.
    nvram_lost_with_power: bool,
    state: Mutex<State>,
    /// `msync` mode: the log's group-commit thread.
    group: Option<Arc<GroupCommit>>,
    space_freed: Notify,
    /// Signalled when records leave `State::shipping`.
    shipped: Notify,
    /// Signalled when the deferred CRC check ends (all verified, or damage found).
    verified: Notify,
    cp_wanted: Arc<Notify>,
    cp_lock: tokio::sync::Mutex<()>,
    /// Large writes that bypass the log: the gate that orders them against CPs, and their
    /// shared store flushes (see `bypass`).
    bypass: bypass::Bypasses,
    mirror: Arc<dyn MirrorHook>,
    closed: AtomicBool,
    /// The own log's id (NVRAM file header), recorded in the store's journal mark.
    log_id: [u8; 16],
    /// The partial-parity space rule of this volume's log.
    ppl_budget: PplBudget,
    /// Aligned buffers of CP runs, reused across CPs (see [`CP_POOLED_RUN_MIN_BYTES`]); being
    /// page-aligned, they also reach `O_DIRECT` members without a bounce copy.
    cp_pool: Arc<twinblock_io::AlignedPool>,
}

impl<B: Backing> Shared<B> {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state stays consistent at every unlock; a panic elsewhere must not wedge the
        // volume, so poisoning is ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<(), JournalError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(JournalError::OutOfRange {
                offset,
                len,
                size: self.size,
            }),
        }
    }

    /// Appends a data record, waiting for log space when full; updates the dirty index.
    async fn append_data(
        &self,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: &[u8],
        ship: &mut Vec<Shipped>,
    ) -> Result<u64, JournalError> {
        let appended = self
            .append_record(
                kind,
                offset,
                length,
                payload,
                ship,
                WhenFull::Wait,
                |st, seq, log_offset| {
                    let data = match kind {
                        RecordKind::Write => ExtentData::Nvram {
                            log_offset: log_offset + RECORD_HEADER_BYTES as u64,
                        },
                        RecordKind::Zero => ExtentData::Zero,
                        _ => ExtentData::Trim,
                    };
                    st.index.insert(
                        offset,
                        Extent {
                            len: length,
                            seq,
                            data,
                        },
                    );
                },
            )
            .await?;
        // `WhenFull::Wait` returns only with a record appended.
        appended.ok_or(JournalError::ShutDown)
    }

    /// Appends one record of `kind` (the one append loop of data and STORED records): retries
    /// while the group commit is behind; when the log is full, waits for a CP to free space
    /// (`WhenFull::Wait`) or returns `None` (`WhenFull::Return`: the caller asks for that CP).
    /// `indexed` updates the dirty index under the same hold of the lock as the append.
    #[allow(clippy::too_many_arguments)]
    async fn append_record(
        &self,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: &[u8],
        ship: &mut Vec<Shipped>,
        when_full: WhenFull,
        indexed: impl FnOnce(&mut State, u64, u64),
    ) -> Result<Option<u64>, JournalError> {
        let copy = self.mirror.enabled();
        let mut indexed = Some(indexed);
        let owes = self.record_ppl_bound(kind, length);
        // Armed only once the log was found full (registering with `space_freed` costs two
        // lock round trips, paid per write when done up front); the look after arming decides.
        let mut space_waiter: Option<Pin<Box<Notified<'_>>>> = None;
        loop {
            if self.closed.load(Ordering::Acquire) {
                return Err(JournalError::ShutDown);
            }
            // Subscribed before looking, so progress made after the look is not missed.
            let progress = self.group.as_ref().map(|g| g.subscribe());
            // Asked before taking the lock (the store takes its own): a record appended as the
            // store starts logging is one of those the first CPs after it drain.
            let logging = self.ppl_logging();
            let persist_behind = {
                let mut st = self.lock();
                st.check_not_damaged()?;
                let reserve = self
                    .ppl_budget
                    .writer_reserve_bytes(st.ppl_owed.total().saturating_add(owes), logging);
                let appended = st.append(
                    kind,
                    self.volume_id,
                    offset,
                    length,
                    payload,
                    reserve,
                    false,
                    copy,
                    ship,
                )?;
                if let Appended::Done {
                    seq,
                    at: log_offset,
                } = appended
                {
                    st.ppl_owed.push(seq, owes);
                    if let Some(f) = indexed.take() {
                        f(&mut st, seq, log_offset);
                    }
                    st.last_data_seq = seq;
                    let fill_percent = st.cursor.used * 100 / st.cursor.log_bytes;
                    if fill_percent >= u64::from(self.config.cp_fill_percent) {
                        self.cp_wanted.notify_one();
                    }
                    return Ok(Some(seq));
                }
                if matches!(appended, Appended::LogFull) {
                    if let Some(e) = &st.last_cp_error {
                        // The log is full and CPs fail: report instead of waiting indefinitely.
                        return Err(JournalError::CpFailed { message: e.clone() });
                    }
                    if space_waiter.is_some() || when_full == WhenFull::Return {
                        st.writer_waits += 1;
                        st.space_wanted = true;
                    }
                    if when_full == WhenFull::Return {
                        return Ok(None);
                    }
                    None
                } else {
                    progress
                }
            };
            // Too many records wait for the group commit: retry once it made progress.
            if let Some(mut rx) = persist_behind {
                rx.changed().await.map_err(|_| JournalError::ShutDown)?;
                continue;
            }
            match space_waiter.take() {
                None => {
                    // Subscribe, then look again: space freed after this point wakes us.
                    let mut waiter = Box::pin(self.space_freed.notified());
                    waiter.as_mut().enable();
                    space_waiter = Some(waiter);
                }
                Some(waiter) => {
                    self.cp_wanted.notify_one();
                    waiter.await;
                }
            }
        }
    }

    /// Records the mirrored and acknowledged transitions of a finished request.
    async fn finish(&self, mirrored: &[u64], data_seqs: &[u64]) -> Result<(), JournalError> {
        let mut more = ShipList::new(self);
        {
            let mut st = self.lock();
            for &s in mirrored {
                st.mirrored.add(s);
            }
            for &s in data_seqs {
                st.acked.add(s);
            }
            if st.acked.0.len() + st.mirrored.0.len() >= TRANSITION_MAX_ENTRIES {
                let reserve = self.transition_reserve(&st);
                st.emit_transitions(
                    self.volume_id,
                    self.mirror.enabled(),
                    reserve,
                    &mut more.items,
                )?;
            }
        }
        more.send().await;
        Ok(())
    }

    /// Returns once every record with seq <= `seq` is persistent in the own NVRAM per the mode.
    async fn wait_persisted(&self, seq: u64) -> Result<(), JournalError> {
        match &self.group {
            Some(group) => group.wait_persisted(seq).await,
            None => Ok(()),
        }
    }

    /// Journals one data record (waiting for space), then ships it; returns (seq, mirrored seqs).
    /// The record may not be persistent yet: see [`Shared::wait_persisted`].
    async fn journal_and_ship(
        &self,
        kind: RecordKind,
        offset: u64,
        length: u64,
        payload: &[u8],
    ) -> Result<(u64, Vec<u64>), JournalError> {
        let mut ship = ShipList::new(self);
        let seq = self
            .append_data(kind, offset, length, payload, &mut ship.items)
            .await?;
        Ok((seq, ship.send().await))
    }

    /// Journals `data` (its whole stripes may bypass the log: see `bypass`); says which seqs
    /// it got and whether part of it bypassed.
    async fn write(&self, offset: u64, data: Bytes) -> Result<bypass::Written, JournalError> {
        self.check_range(offset, data.len() as u64)?;
        if let Some(split) = self.bypass_split(offset, data.len() as u64) {
            return self.write_split(offset, data, split).await;
        }
        let seq = self.write_journaled(offset, data).await?;
        Ok(bypass::Written {
            seq,
            journaled_seq: seq,
            stored: false,
        })
    }

    /// Journals `data` record by record; returns the seq of its last record.
    async fn write_journaled(&self, offset: u64, data: Bytes) -> Result<u64, JournalError> {
        let chunk = self.config.max_record_payload_bytes as usize;
        if !data.is_empty() && data.len() <= chunk {
            // One record (every small write): the same steps without the per-write lists.
            let (seq, mirrored) = self
                .journal_and_ship(RecordKind::Write, offset, data.len() as u64, &data)
                .await?;
            self.wait_persisted(seq).await?;
            self.finish(&mirrored, &[seq]).await?;
            return Ok(seq);
        }
        let mut mirrored = Vec::new();
        let mut seqs = Vec::new();
        let mut at = 0;
        while at < data.len() {
            let n = chunk.min(data.len() - at);
            let (seq, m) = self
                .journal_and_ship(
                    RecordKind::Write,
                    offset + at as u64,
                    n as u64,
                    &data[at..at + n],
                )
                .await?;
            seqs.push(seq);
            mirrored.extend(m);
            at += n;
        }
        // The group commit ran while the records were shipped; all of them are covered by the
        // wait for the last (persisted seqs are a prefix).
        if let Some(&last) = seqs.last() {
            self.wait_persisted(last).await?;
        }
        self.finish(&mirrored, &seqs).await?;
        Ok(seqs.last().copied().unwrap_or(0))
    }

    /// Journals a ZERO or TRIM; returns its seq (0 for an empty range).
    async fn write_range(
        &self,
        kind: RecordKind,
        offset: u64,
        len: u64,
    ) -> Result<u64, JournalError> {
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(0);
        }
        let (seq, mirrored) = self.journal_and_ship(kind, offset, len, &[]).await?;
        self.wait_persisted(seq).await?;
        self.finish(&mirrored, &[seq]).await?;
        Ok(seq)
    }

    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, JournalError> {
        self.check_range(offset, len)?;
        // Allocated only when the index holds part of the range: a clean read returns the
        // store's buffer as it is.
        let mut out = BytesMut::new();
        let mut gaps = Vec::new();
        let all_clean = {
            let mut st = self.lock();
            st.check_not_damaged()?;
            let all_clean = st.index.is_clean(offset, len);
            if !all_clean {
                let pieces = st.index.lookup(offset, len);
                out = BytesMut::zeroed(len as usize);
                for p in pieces {
                    let at = (p.offset - offset) as usize;
                    match p.data {
                        Some(ExtentData::Nvram { log_offset }) => {
                            st.verify_before_use(log_offset)?;
                            out[at..at + p.len as usize]
                                .copy_from_slice(st.region.log_slice(log_offset, p.len))
                        }
                        Some(ExtentData::Zero | ExtentData::Trim) => {}
                        Some(ExtentData::Stored) | None => gaps.push(p),
                    }
                }
            }
            all_clean
        };
        if all_clean {
            return self
                .backing
                .read(offset, len)
                .await
                .map_err(backing_err("read", offset));
        }
        // The gaps are read as one store read covering all of them (at most the request's
        // length): one request the array splits into concurrent member reads, rather than one
        // store round trip per gap in turn. The dirty bytes between gaps it also reads are
        // ignored.
        let (Some(lo), Some(hi)) = (
            gaps.iter().map(|g| g.offset).min(),
            gaps.iter().map(|g| g.offset + g.len).max(),
        ) else {
            return Ok(out.freeze());
        };
        let data = self
            .backing
            .read(lo, hi - lo)
            .await
            .map_err(backing_err("read", lo))?;
        if data.len() as u64 != hi - lo {
            return Err(JournalError::Backing {
                op: "read",
                offset: lo,
                message: format!("returned {} bytes, asked {}", data.len(), hi - lo),
            });
        }
        for g in gaps {
            let at = (g.offset - offset) as usize;
            let from = (g.offset - lo) as usize;
            out[at..at + g.len as usize].copy_from_slice(&data[from..from + g.len as usize]);
        }
        Ok(out.freeze())
    }

    /// [`Shared::read`] as pieces: a range the dirty index does not touch is the store's pieces
    /// as they are (a read cache's blocks, sent without joining them); anything else is the
    /// overlaid read in one piece. The index check and the store read are ordered exactly as
    /// in `read`, so a piece is never older than the index was when the read began.
    async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<Bytes>, JournalError> {
        self.check_range(offset, len)?;
        let all_clean = {
            let st = self.lock();
            st.check_not_damaged()?;
            st.index.is_clean(offset, len)
        };
        if !all_clean {
            return Ok(vec![self.read(offset, len).await?]);
        }
        self.backing
            .read_pieces(offset, len)
            .await
            .map_err(backing_err("read", offset))
    }

    /// The highest seq known to survive the loss of this host's power (module doc).
    fn durable_seq(&self, st: &State) -> u64 {
        let partner = self.mirror.partner_durable_seq().unwrap_or(0);
        self.own_durable_seq(st).max(partner)
    }

    /// The durable seq this node guarantees by itself: its NVRAM medium, or the store after a CP.
    fn own_durable_seq(&self, st: &State) -> u64 {
        let local = match (&self.group, self.local_durable) {
            (_, false) => 0,
            (Some(group), true) => group.persisted_seq(),
            (None, true) => st.cursor.next_seq - 1,
        };
        local.max(st.applied_seq)
    }

    /// Returns once every record with seq <= `target` survives the loss of this host's power,
    /// running a CP when nothing else makes it so. Concurrent callers share CPs: they queue on
    /// `cp_lock`, and one whose target the finished CP covered returns without another.
    async fn wait_durable(self: &Arc<Self>, target: u64) -> Result<(), JournalError> {
        if self.own_durable_seq(&self.lock()) >= target {
            return Ok(());
        }
        if let (Some(group), true) = (&self.group, self.local_durable) {
            // The own NVRAM survives power loss: the records are durable once the group commit
            // covers them (at once for every acknowledged write).
            return group.wait_persisted(target).await;
        }
        // An in-sync partner that holds (or is about to acknowledge) the records makes them
        // survive this host's power loss without a CP. Not while the mirror is out of sync:
        // the hook then returns false at once.
        if self.mirror.wait_partner_durable(target).await {
            self.lock().flushes_by_partner += 1;
            return Ok(());
        }
        self.lock().flushes_by_cp += 1;
        loop {
            if self.durable_seq(&self.lock()) >= target {
                return Ok(());
            }
            let cp_guard = self.cp_lock.lock().await;
            if self.durable_seq(&self.lock()) >= target {
                return Ok(());
            }
            let ran = self.run_cp_locked(&cp_guard).await?;
            if !ran && self.durable_seq(&self.lock()) < target {
                // Cannot happen: seq `target` was journaled, so a CP has something to apply.
                return Err(JournalError::CpFailed {
                    message: format!("no CP to run, yet seq {target} is not durable"),
                });
            }
        }
    }

    async fn flush(self: &Arc<Self>) -> Result<(), JournalError> {
        // Record the acknowledged set, then wait until everything journaled so far survives
        // power loss (at once when the NVRAM or the partner already guarantee it).
        let copy = self.mirror.enabled();
        let mut ship = ShipList::new(self);
        let target = {
            let mut st = self.lock();
            let reserve = self.transition_reserve(&st);
            st.emit_transitions(self.volume_id, copy, reserve, &mut ship.items)?;
            st.last_data_seq
        };
        ship.send().await;
        self.wait_durable(target).await
    }

    /// Writes the snapshot to the store: adjacent extents of one kind are coalesced, and data runs
    /// are cut only at stripe boundaries into batches of about `cp_batch_bytes`. Groups of writes
    /// run in parallel (up to [`CP_MAX_PARALLEL_WRITES`] groups and [`CP_MAX_INFLIGHT_BATCHES`] ×
    /// `cp_batch_bytes`); writes touching the same stripe are kept in one group and run in order,
    /// so the store never sees two concurrent writes to one stripe from a CP.
    async fn apply_snapshot(
        self: &Arc<Self>,
        snapshot: &[(u64, Extent)],
    ) -> Result<(), JournalError> {
        let stripe = self.backing.stripe_bytes().max(1);
        let batch = (self.config.cp_batch_bytes / stripe).max(1) * stripe;
        let max_inflight_bytes = batch * CP_MAX_INFLIGHT_BATCHES;
        let mut jobs = CpJobs {
            set: tokio::task::JoinSet::new(),
            inflight_bytes: 0,
        };
        let mut group = CpGroup::default();
        let mut i = 0;
        while i < snapshot.len() {
            let (start, first) = snapshot[i];
            let class = std::mem::discriminant(&first.data);
            let mut end = start + first.len;
            let mut j = i + 1;
            while j < snapshot.len()
                && snapshot[j].0 == end
                && std::mem::discriminant(&snapshot[j].1.data) == class
            {
                end += snapshot[j].1.len;
                j += 1;
            }
            match first.data {
                // The store holds these bytes already (never in a live index: see `index`).
                ExtentData::Stored => {}
                ExtentData::Zero | ExtentData::Trim => {
                    let op = if matches!(first.data, ExtentData::Zero) {
                        CpOp::Zero(start, end - start)
                    } else {
                        CpOp::Trim(start, end - start)
                    };
                    self.add_cp_op(&mut jobs, &mut group, op, stripe, max_inflight_bytes)
                        .await?;
                }
                ExtentData::Nvram { .. } => {
                    let mut k = i;
                    let mut at = start;
                    while at < end {
                        // `batch` is a multiple of `stripe`, so this cut is a stripe boundary
                        // past `at`.
                        let cut = ((at + batch) / stripe * stripe).min(end);
                        let data = self.copy_run(snapshot, &mut k, at, cut);
                        let op = CpOp::Write(at, data);
                        self.add_cp_op(&mut jobs, &mut group, op, stripe, max_inflight_bytes)
                            .await?;
                        at = cut;
                    }
                }
            }
            i = j;
        }
        self.spawn_cp_group(&mut jobs, &mut group, max_inflight_bytes)
            .await?;
        while !jobs.set.is_empty() {
            jobs.join_one().await?;
        }
        Ok(())
    }

    /// The bytes of volume range `at..cut` out of NVRAM, from the NVRAM extents of `snapshot`
    /// starting at `*k` (advanced past the extents the range ends). Long runs go into a buffer
    /// of the CP pool (rounded up to a power of two so that buffers are reused whatever the run
    /// lengths), short ones into a fresh `BytesMut`.
    fn copy_run(&self, snapshot: &[(u64, Extent)], k: &mut usize, at: u64, cut: u64) -> Bytes {
        let len = (cut - at) as usize;
        let st = self.lock();
        let mut fill = |out: &mut [u8]| {
            let mut done = 0;
            while done < len {
                let (e_off, e) = snapshot[*k];
                let ExtentData::Nvram { log_offset } = e.data else {
                    unreachable!("run holds only NVRAM extents");
                };
                let from = at + done as u64;
                let skip = from - e_off;
                let n = (e.len - skip).min(cut - from);
                out[done..done + n as usize]
                    .copy_from_slice(st.region.log_slice(log_offset + skip, n));
                done += n as usize;
                if from + n == e_off + e.len {
                    *k += 1;
                }
            }
        };
        if (len as u64) < CP_POOLED_RUN_MIN_BYTES {
            let mut buf = BytesMut::zeroed(len);
            fill(&mut buf);
            return buf.freeze();
        }
        let mut buf = self.cp_pool.take(len.next_power_of_two());
        fill(&mut buf[..len]);
        self.cp_pool.freeze(buf).slice(..len)
    }

    /// Adds `op` to the current group when it shares a stripe with it, else starts a new group
    /// (spawning the previous one).
    async fn add_cp_op(
        self: &Arc<Self>,
        jobs: &mut CpJobs,
        group: &mut CpGroup,
        op: CpOp,
        stripe: u64,
        max_inflight_bytes: u64,
    ) -> Result<(), JournalError> {
        let (offset, len) = op.range();
        let first_stripe = offset / stripe;
        let last_stripe = (offset + len.max(1) - 1) / stripe;
        if group.last_stripe != Some(first_stripe) {
            self.spawn_cp_group(jobs, group, max_inflight_bytes).await?;
        }
        group.bytes += op.data_bytes();
        group.ops.push(op);
        group.last_stripe = Some(last_stripe);
        Ok(())
    }

    async fn spawn_cp_group(
        self: &Arc<Self>,
        jobs: &mut CpJobs,
        group: &mut CpGroup,
        max_inflight_bytes: u64,
    ) -> Result<(), JournalError> {
        let g = std::mem::take(group);
        if g.ops.is_empty() {
            return Ok(());
        }
        jobs.make_room(g.bytes, max_inflight_bytes).await?;
        jobs.inflight_bytes += g.bytes;
        let shared = Arc::clone(self);
        jobs.set.spawn(async move {
            // The pieces of one stripe go to the store together, so a RAID 5/6 store can plan
            // their parity updates as one (they never overlap: they come from the dirty index).
            let mut writes = Vec::new();
            let mut clears = Vec::new();
            for op in g.ops {
                match op {
                    CpOp::Write(at, data) => writes.push((at, data)),
                    CpOp::Zero(at, len) => clears.push((true, at, len)),
                    CpOp::Trim(at, len) => clears.push((false, at, len)),
                }
            }
            if writes.len() > 1 {
                let at = writes[0].0;
                shared
                    .backing
                    .write_scattered(writes)
                    .await
                    .map_err(backing_err("write", at))?;
            } else if let Some((at, data)) = writes.pop() {
                shared
                    .backing
                    .write(at, data)
                    .await
                    .map_err(backing_err("write", at))?;
            }
            for (zero, at, len) in clears {
                if zero {
                    shared.backing.write_zeroes(at, len).await
                } else {
                    shared.backing.discard(at, len).await
                }
                .map_err(backing_err(
                    if zero { "write_zeroes" } else { "discard" },
                    at,
                ))?;
            }
            Ok(g.bytes)
        });
        Ok(())
    }

    /// Waits until the background check has verified every recovered record (a CP writes
    /// their payloads to the store); fails when it found one damaged.
    async fn wait_verified(&self) -> Result<(), JournalError> {
        loop {
            let notified = self.verified.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.lock();
                st.check_not_damaged()?;
                if st.unverified.is_none() {
                    return Ok(());
                }
            }
            notified.await;
        }
    }

    /// One step of the background CRC check; false once it is over (or the volume is closed).
    fn verify_step(&self) -> bool {
        let mut guard = self.lock();
        let st = &mut *guard;
        let Some(u) = st.unverified.as_mut() else {
            return false;
        };
        let result = u.verify_chunk(&st.region, DEFERRED_CRC_CHUNK_BYTES);
        let over = match result {
            Ok(done) => {
                if done {
                    st.unverified = None;
                }
                done
            }
            Err(d) => {
                st.record_damage(d);
                true
            }
        };
        drop(guard);
        if over {
            self.verified.notify_waiters();
            // Writers waiting for log space re-check (and get the damage error).
            self.space_freed.notify_waiters();
        }
        !over && !self.closed.load(Ordering::Acquire)
    }

    /// Runs one consistency point; `Ok(false)` when there was nothing to do.
    async fn run_cp(self: &Arc<Self>) -> Result<bool, JournalError> {
        let one_at_a_time = self.cp_lock.lock().await;
        self.run_cp_locked(&one_at_a_time).await
    }

    /// [`Shared::run_cp`] for a caller holding `cp_lock` (the guard proves it).
    ///
    /// A CP whose partial parity found no room in the log (the store started logging while
    /// the CP ran, or the log held records appended before it did: [`crate::ppl_budget`]) is run
    /// again at once over half the PPL bounds it planned for, down to a single record; only a
    /// CP of one record that finds no room fails. Running a CP again is safe: its store writes
    /// are redone from records still in the log, and the PPL records it logged stay unretired.
    async fn run_cp_locked(
        self: &Arc<Self>,
        cp_lock_held: &tokio::sync::MutexGuard<'_, ()>,
    ) -> Result<bool, JournalError> {
        let mut cap = None;
        loop {
            self.lock().ppl_short = false;
            let result = self.run_cp_once(cp_lock_held, cap).await;
            let Err(e) = result else {
                return result;
            };
            let st = self.lock();
            let (records, planned) = st.ppl_planned;
            if !st.ppl_short || records <= 1 {
                return Err(e);
            }
            tracing::info!(
                volume = self.volume_id,
                records,
                planned_ppl_bytes = planned,
                free_bytes = st.cursor.free(),
                "a consistency point found no log room for its partial parity; running it again \
                 over fewer records"
            );
            cap = Some(planned / 2);
        }
    }

    /// One attempt of [`Shared::run_cp_locked`]; `ppl_cap`: the most PPL bytes it may plan for.
    async fn run_cp_once(
        self: &Arc<Self>,
        _cp_lock_held: &tokio::sync::MutexGuard<'_, ()>,
        ppl_cap: Option<u64>,
    ) -> Result<bool, JournalError> {
        let started = std::time::Instant::now();
        self.wait_verified().await?;
        // The snapshot's ranges are held against large writes until they are in the store, and
        // the large writes in flight over them finish first (`gate`): no bypass is overwritten
        // by the older bytes of this snapshot, and every bypass after it finds an index without
        // them.
        let (cp_seq, head, used, snapshot, partial, cp_pass, in_flight) = {
            let mut st = self.lock();
            let fill_percent = st.cursor.used * 100 / st.cursor.log_bytes;
            let pending_data = st.last_data_seq > st.applied_seq;
            let wanted = st.space_wanted || fill_percent >= u64::from(self.config.cp_fill_percent);
            if st.cursor.used == 0 || (!pending_data && !wanted) {
                return Ok(false);
            }
            let cut = self.ppl_cut(&st, ppl_cap);
            let (cp_seq, head, used) = match cut {
                Some(c) => (c.cp_seq, c.head, c.used),
                None => (st.cursor.next_seq - 1, st.cursor.head, st.cursor.used),
            };
            st.ppl_planned = st.ppl_owed.through(cp_seq);
            st.ppl_floor = if self.ppl_logging() {
                CONTROL_RESERVE_BYTES
            } else {
                self.ppl_budget.writer_reserve_bytes(0, false)
            };
            let mut snapshot = st.index.snapshot();
            if cut.is_some() {
                snapshot.retain(|(_, e)| e.seq <= cp_seq);
            }
            st.ppl_cp_seq = cp_seq;
            let (cp_pass, in_flight) = self.bypass.gate.register_cp(gate::ranges_of(&snapshot));
            (
                cp_seq,
                head,
                used,
                snapshot,
                cut.is_some(),
                cp_pass,
                in_flight,
            )
        };
        let snapshot = if in_flight.is_empty() {
            snapshot
        } else {
            // Those bypasses removed their ranges from the index (or, finding the log full,
            // will write the store again after this CP): snapshot again, same seqs.
            self.bypass.gate.wait_finished(&in_flight).await;
            let mut again = self.lock().index.snapshot();
            again.retain(|(_, e)| e.seq <= cp_seq);
            again
        };
        self.apply_snapshot(&snapshot).await?;
        drop(cp_pass);
        self.backing
            .flush()
            .await
            .map_err(backing_err("flush", 0))?;
        self.backing
            .set_applied_seq(cp_seq)
            .await
            .map_err(backing_err("set_applied_seq", 0))?;
        // Records up to cp_seq must have reached the partner before their space is reused.
        loop {
            let notified = self.shipped.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let oldest = self.lock().shipping.first().copied();
            if oldest.is_none_or(|s| s > cp_seq) {
                break;
            }
            notified.await;
        }
        let copy = self.mirror.enabled();
        let mut ship = ShipList::new(self);
        {
            let mut st = self.lock();
            let generation = st.generation;
            st.region.write_control(generation, head, cp_seq + 1)?;
            st.cursor.release(head, used);
            st.space_wanted = false;
            st.index.retire_through(cp_seq);
            st.ppl_owed.retire_through(cp_seq);
            st.applied_seq = cp_seq;
            st.cps_done += 1;
            st.ppl_floor = CONTROL_RESERVE_BYTES;
            st.cp_durations.observe(started.elapsed());
            st.last_cp_error = None;
            let reserve = self.transition_reserve(&st);
            st.emit_transitions(self.volume_id, copy, reserve, &mut ship.items)?;
            let cp = CpPayload {
                applied_seq: cp_seq,
                tail_offset: head,
                tail_seq: cp_seq + 1,
            }
            .encode();
            st.append(
                RecordKind::Cp,
                self.volume_id,
                0,
                0,
                &cp,
                0,
                true,
                copy,
                &mut ship.items,
            )?;
        }
        self.space_freed.notify_waiters();
        ship.send().await;
        if partial {
            // The records this CP left for the next one.
            self.cp_wanted.notify_one();
        }
        Ok(true)
    }

    /// While the store logs partial parity: where this CP stops so that its PPL records fit
    /// the free space less the control reserve and one PAD ([`crate::ppl::cut`],
    /// [`PplBudget::cp_budget_bytes`]); `None`: it applies everything.
    fn ppl_cut(&self, st: &State, cap: Option<u64>) -> Option<ppl::Cut> {
        if !self.ppl_logging() {
            return None;
        }
        let budget = self.ppl_budget.cp_budget_bytes(st.cursor.free());
        let budget = cap.map_or(budget, |c| budget.min(c));
        if st.ppl_owed.total() <= budget {
            return None;
        }
        ppl::cut(
            |at| header_at(&st.region, at),
            st.cursor.log_bytes,
            st.cursor.tail,
            st.cursor.used,
            budget,
            |h| self.record_ppl_bound(h.kind, h.length),
        )
    }

    /// True while the store logs partial parity (and may: a store without parity never does).
    fn ppl_logging(&self) -> bool {
        self.ppl_budget.enabled() && self.backing.ppl_active()
    }

    /// The store's PPL bound for the record of `kind` over `length` bytes: what applying it may
    /// log at most.
    fn record_ppl_bound(&self, kind: RecordKind, length: u64) -> u64 {
        record_ppl_bound(&self.backing, self.ppl_budget, kind, length)
    }

    /// What a TRANSITION record must leave free now.
    fn transition_reserve(&self, st: &State) -> u64 {
        self.ppl_budget
            .transition_reserve_bytes(st.ppl_owed.total(), self.ppl_logging())
    }
}

#[async_trait]
impl<B: Backing> PplAppend for Shared<B> {
    async fn append_ppl(&self, store_bytes: &[u8]) -> Result<(), JournalError> {
        let copy = self.mirror.enabled();
        let mut ship = ShipList::new(self);
        let seq = {
            let mut st = self.lock();
            st.check_not_damaged()?;
            let payload = ppl::encode_payload(st.ppl_cp_seq, store_bytes);
            // Leaves the control reserve (the CP record that retires this one must still fit),
            // and more during a CP planned without partial parity (`ppl_floor`).
            let floor = st.ppl_floor;
            let appended = st.append(
                RecordKind::Ppl,
                self.volume_id,
                0,
                store_bytes.len() as u64,
                &payload,
                floor,
                true,
                copy,
                &mut ship.items,
            )?;
            match appended {
                Appended::Done { seq, .. } => seq,
                _ => {
                    st.ppl_short = true;
                    return Err(JournalError::PplLogFull {
                        region: st.region.name(),
                        bytes: payload.len() as u64,
                    });
                }
            }
        };
        ship.send().await;
        // The member writes this record protects start only once it is on the medium.
        self.wait_persisted(seq).await
    }
}

/// A volume whose writes go through the NVRAM journal into a [`Backing`] store.
pub struct JournaledVolume<B: Backing> {
    shared: Arc<Shared<B>>,
    flusher: tokio::task::JoinHandle<()>,
    recovery: RecoveryReport,
}

impl<B: Backing> std::fmt::Debug for JournaledVolume<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JournaledVolume")
            .field("volume_id", &self.shared.volume_id)
            .field("size", &self.shared.size)
            .finish()
    }
}

impl<B: Backing> Drop for JournaledVolume<B> {
    fn drop(&mut self) {
        self.shared.closed.store(true, Ordering::Release);
        self.flusher.abort();
    }
}

impl<B: Backing> JournaledVolume<B> {
    /// Recovers and opens the volume without a partner mirror.
    pub async fn open(
        nvram: Nvram,
        backing: B,
        volume_id: u64,
        config: VolumeConfig,
    ) -> Result<JournaledVolume<B>, JournalError> {
        Self::open_with_mirror(nvram, backing, volume_id, config, Arc::new(NoMirror)).await
    }

    /// Recovers and starts serving with a flusher task. The unretired records of the log (intact,
    /// newer than the store's `applied_seq`) normally stay where they are: the dirty index is
    /// rebuilt from them, the volume serves at once, and the first CP (asked for right away)
    /// applies them. A log that cannot continue in place (damage discarded by
    /// `discard_corrupt_log`) is redone through the store first and restarted empty.
    pub async fn open_with_mirror(
        mut nvram: Nvram,
        backing: B,
        volume_id: u64,
        config: VolumeConfig,
        mirror: Arc<dyn MirrorHook>,
    ) -> Result<JournaledVolume<B>, JournalError> {
        let region = nvram
            .take_own()
            .ok_or_else(|| JournalError::Config("the own region is already in use".into()))?;
        Self::open_on_region(nvram, region, backing, volume_id, config, mirror, true).await
    }

    /// Takeover: recovers and serves the partner's volume from this node's *copy* of the
    /// partner's log (the partner region of the copy file the mirror receiver kept), through the
    /// same path as [`JournaledVolume::open_with_mirror`]: the scan rebuilds the dirty index, the
    /// volume serves at once, and new writes continue in that log after its last record. The
    /// caller checks that the copy is bound to `backing`'s store (recovery refuses a copy bound
    /// to another store that still holds unapplied records).
    pub async fn open_partner_copy(
        mut nvram: Nvram,
        backing: B,
        volume_id: u64,
        config: VolumeConfig,
        mirror: Arc<dyn MirrorHook>,
    ) -> Result<JournaledVolume<B>, JournalError> {
        let region = nvram
            .take_partner()
            .ok_or_else(|| JournalError::Config("the partner region is already in use".into()))?
            .into_region();
        Self::open_on_region(nvram, region, backing, volume_id, config, mirror, false).await
    }

    /// `own_region`: the region is the own log (its continuity with the store is checked before
    /// partial parity is replayed); false for the partner's copy at takeover, whose records the
    /// mirror shipped before each stripe update.
    #[allow(clippy::too_many_arguments)]
    async fn open_on_region(
        nvram: Nvram,
        mut region: crate::nvram::Region,
        backing: B,
        volume_id: u64,
        config: VolumeConfig,
        mirror: Arc<dyn MirrorHook>,
        own_region: bool,
    ) -> Result<JournaledVolume<B>, JournalError> {
        let log_bytes = region.log_bytes();
        let ppl_budget = ppl_budget(&backing, &config);
        check_config(&config, log_bytes, ppl_budget)?;
        let generation = nvram.generation();
        let scan_started = std::time::Instant::now();
        let plan = plan_recovery(&region, &backing, volume_id, config.discard_corrupt_log).await?;
        let scan_micros = scan_started.elapsed().as_micros() as u64;
        if let Some(id) = backing.store_id() {
            if region.store_id() != id {
                region.bind_store(id)?;
            }
        }
        // Before anything writes to the store: the partial parity of stripe updates a cut
        // interrupted (a degraded array repairs those stripes, or refuses to start).
        let ppl_payloads = ppl::live_payloads(&region, &plan.scan, plan.applied_seq)?;
        let complete = !own_region
            || crate::loss::check_log_continuity(&nvram, &backing)
                .await?
                .is_none();
        backing
            .replay_ppl(ppl_payloads, complete)
            .await
            .map_err(backing_err("replay_ppl", 0))?;
        let in_place = plan.continues_in_place();
        let (recovery, log_generation, cursor, index) = if in_place {
            // Serve at once: the records stay live in the log, in the log's generation, and the
            // first CP applies them (see `recover`).
            let start = plan.scan.report.start;
            mirror.log_reset(start.generation, start.tail_offset, start.tail_seq);
            let index_started = std::time::Instant::now();
            let index = plan.dirty_index();
            let mut report = plan.report(0, true);
            report.index_micros = index_started.elapsed().as_micros() as u64;
            let cursor = plan.cursor(log_bytes);
            blank_leftovers(&mut region, &cursor, start.generation, &config)?;
            (report, start.generation, cursor, index)
        } else {
            let mut report = apply_plan(&region, &backing, &plan).await?;
            region.write_control(generation, 0, report.next_seq)?;
            report.generation = generation;
            mirror.log_reset(generation, 0, report.next_seq);
            (
                report.clone(),
                generation,
                LogCursor::empty(log_bytes, 0, report.next_seq),
                DirtyIndex::new(),
            )
        };
        let recovery = RecoveryReport {
            scan_micros,
            ..recovery
        };
        // From here on the store names this log as its journal, not cleanly stopped: a start that
        // finds another log knows the records newer than `applied_seq` went with this one.
        let log_id = nvram.log_id();
        backing
            .set_journal_mark(log_id, false)
            .await
            .map_err(backing_err("set_journal_mark", 0))?;
        if recovery.damaged_tail_discarded {
            tracing::warn!(
                path = %nvram.path().display(),
                stop = ?recovery.scan.stop,
                offset = recovery.scan.stop_offset,
                "NVRAM log ended on a damaged record; it was discarded, not applied"
            );
        }
        // Records served in place whose CRC the scan left unchecked are checked in the
        // background (and by any read that needs one first); the records of a log redone
        // through the store were all checked by `apply_plan`.
        let unverified = if in_place {
            Unverified::new(
                plan.scan.report.start.tail_offset,
                log_bytes,
                plan.crc_pending.clone(),
            )
        } else {
            None
        };
        let size = backing.size();
        let ppl_owed = owed_of_log(&region, &cursor, |kind, length| {
            record_ppl_bound(&backing, ppl_budget, kind, length)
        });
        let group = start_group_commit(&region, &cursor, nvram.path())?;
        let shared = Arc::new(Shared {
            backing,
            volume_id,
            size,
            persistence: nvram.persistence(),
            local_durable: nvram.survives_power_loss(),
            nvram_lost_with_power: nvram.lost_with_power(),
            group: group.clone(),
            state: Mutex::new(State {
                cursor,
                region,
                group,
                inline_persists: 0,
                generation: log_generation,
                index,
                applied_seq: if in_place {
                    plan.applied_seq
                } else {
                    recovery.next_seq - 1
                },
                last_data_seq: plan.last_data_seq(),
                acked: SeqRanges::default(),
                mirrored: SeqRanges::default(),
                cps_done: 0,
                cp_durations: Default::default(),
                flushes_by_partner: 0,
                flushes_by_cp: 0,
                writer_waits: 0,
                space_wanted: false,
                shipping: BTreeSet::new(),
                last_cp_error: None,
                unverified,
                damaged: None,
                ppl_cp_seq: plan.applied_seq,
                ppl_owed,
                ppl_short: false,
                ppl_planned: (0, 0),
                ppl_floor: CONTROL_RESERVE_BYTES,
            }),
            space_freed: Notify::new(),
            shipped: Notify::new(),
            verified: Notify::new(),
            cp_wanted: Arc::new(Notify::new()),
            cp_lock: tokio::sync::Mutex::new(()),
            cp_pool: Arc::default(),
            bypass: bypass::Bypasses::new(),
            mirror,
            closed: AtomicBool::new(false),
            config,
            log_id,
            ppl_budget,
        });
        // Before the flusher's first CP: degraded stripe updates persist partial parity here.
        let target: std::sync::Weak<dyn PplAppend> = Arc::downgrade(&shared) as _;
        shared.backing.attach_ppl(PplLog { target });
        let flusher = tokio::spawn(flusher_loop(
            Arc::downgrade(&shared),
            Arc::clone(&shared.cp_wanted),
            Duration::from_millis(shared.config.cp_interval_ms.max(1)),
        ));
        if shared.lock().unverified.is_some() {
            spawn_verifier(Arc::downgrade(&shared));
        }
        if in_place {
            shared.cp_wanted.notify_one();
        }
        Ok(JournaledVolume {
            shared,
            flusher,
            recovery,
        })
    }

    /// What recovery found at open.
    pub fn recovery(&self) -> &RecoveryReport {
        &self.recovery
    }

    pub fn size(&self) -> u64 {
        self.shared.size
    }

    pub fn backing(&self) -> &B {
        &self.shared.backing
    }

    /// Journals `data` at `offset`; returns once it is persistent in NVRAM (and shipped to the
    /// partner when a mirror is configured). What that survives: see
    /// [`JournaledVolume::ack_survives_power_loss`].
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), JournalError> {
        self.shared.write(offset, data).await.map(|_| ())
    }

    /// A write with FUA: returns once `data` survives the loss of this host's power (as a
    /// write followed by a FLUSH covering only it). A write that bypassed the log entirely
    /// needs no CP for that: its bytes are on the disks once a store flush covers them; on a
    /// lone volume whose NVRAM does not survive power loss, its STORED record is then no more
    /// durable than the NVRAM, and nothing older that a recovery could redo over the range
    /// survives either (see `bypass`).
    pub async fn write_fua(&self, offset: u64, data: Bytes) -> Result<(), JournalError> {
        let written = self.shared.write(offset, data).await?;
        self.shared.make_durable(written).await
    }

    /// Journals a WRITE_ZEROES (a record without payload).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), JournalError> {
        self.shared
            .write_range(RecordKind::Zero, offset, len)
            .await
            .map(|_| ())
    }

    /// A WRITE_ZEROES with FUA (see [`JournaledVolume::write_fua`]).
    pub async fn write_zeroes_fua(&self, offset: u64, len: u64) -> Result<(), JournalError> {
        let seq = self
            .shared
            .write_range(RecordKind::Zero, offset, len)
            .await?;
        self.shared.wait_durable(seq).await
    }

    /// Journals a TRIM (a record without payload); trimmed bytes read as zero until applied.
    pub async fn trim(&self, offset: u64, len: u64) -> Result<(), JournalError> {
        self.shared
            .write_range(RecordKind::Trim, offset, len)
            .await
            .map(|_| ())
    }

    /// A TRIM with FUA (see [`JournaledVolume::write_fua`]).
    pub async fn trim_fua(&self, offset: u64, len: u64) -> Result<(), JournalError> {
        let seq = self
            .shared
            .write_range(RecordKind::Trim, offset, len)
            .await?;
        self.shared.wait_durable(seq).await
    }

    /// True when an acknowledged (plain) write survives the loss of this host's power: the
    /// NVRAM is persisted on a medium that survives it. False: it survives a crash of the
    /// daemon only, and FLUSH / FUA wait for a CP (unless an in-sync partner holds the records).
    pub fn ack_survives_power_loss(&self) -> bool {
        self.shared.local_durable
    }

    /// The highest seq known to survive the loss of this host's power (module doc).
    pub fn durable_seq(&self) -> u64 {
        self.shared.durable_seq(&self.shared.lock())
    }

    /// Reads, overlaying the dirty index on the store.
    pub async fn read(&self, offset: u64, len: u64) -> Result<Bytes, JournalError> {
        self.shared.read(offset, len).await
    }

    /// The same bytes as [`JournaledVolume::read`], in order, possibly in several shared pieces
    /// (the store's cached blocks when the dirty index holds none of the range).
    pub async fn read_pieces(&self, offset: u64, len: u64) -> Result<Vec<Bytes>, JournalError> {
        self.shared.read_pieces(offset, len).await
    }

    /// FLUSH: returns once every write journaled before it survives the loss of this host's
    /// power: at once when the NVRAM medium or an in-sync partner guarantees that, else after a
    /// CP (shared with concurrent flushes) has applied and flushed them. Also logs the batched
    /// acknowledged transitions.
    pub async fn flush(&self) -> Result<(), JournalError> {
        self.shared.flush().await
    }

    /// Runs a consistency point now; `Ok(false)` when there was nothing to apply.
    pub async fn checkpoint(&self) -> Result<bool, JournalError> {
        self.shared.run_cp().await
    }

    pub fn status(&self) -> VolumeStatus {
        let st = self.shared.lock();
        let group = self
            .shared
            .group
            .as_ref()
            .map(|g| g.stats())
            .unwrap_or_default();
        VolumeStatus {
            volume_id: self.shared.volume_id,
            persistence: self.shared.persistence,
            persist_method: st.region.persist_method(),
            generation: st.generation,
            log_bytes: st.cursor.log_bytes,
            log_used_bytes: st.cursor.used,
            next_seq: st.cursor.next_seq,
            applied_seq: st.applied_seq,
            dirty_extents: st.index.len() as u64,
            dirty_bytes: st.index.dirty_bytes(),
            durable_seq: self.shared.durable_seq(&st),
            ack_survives_power_loss: self.shared.local_durable,
            crc_unverified_records: st.unverified.as_ref().map_or(0, Unverified::remaining),
            corrupt: st.check_not_damaged().err().map(|e| e.to_string()),
            cps_done: st.cps_done,
            flushes_by_partner: st.flushes_by_partner,
            flushes_by_cp: st.flushes_by_cp,
            writer_waits: st.writer_waits,
            log_persists: st.inline_persists + group.persist_calls,
            group_commit_rounds: group.rounds,
            last_cp_error: st.last_cp_error.clone(),
            cp_durations: st.cp_durations.clone(),
        }
    }

    /// A clean stop, for a caller that no longer writes (its clients are gone): a final CP
    /// applies every record, then the store records that the journal stopped cleanly, so a later
    /// start that finds the NVRAM file lost knows nothing was lost. Returns false (and marks
    /// nothing) when records were journaled during the CP and remain unapplied.
    pub async fn stop_clean(&self) -> Result<bool, JournalError> {
        let guard = self.shared.cp_lock.lock().await;
        self.shared.run_cp_locked(&guard).await?;
        let pending = {
            let st = self.shared.lock();
            st.last_data_seq > st.applied_seq
        };
        if pending {
            return Ok(false);
        }
        self.shared
            .backing
            .set_journal_mark(self.shared.log_id, true)
            .await
            .map_err(backing_err("set_journal_mark", 0))?;
        Ok(true)
    }

    /// Applies everything (a final CP) and stops the flusher.
    pub async fn close(self) -> Result<(), JournalError> {
        let result = self.shared.run_cp().await;
        self.flusher.abort();
        result.map(|_| ())
    }

    /// Copies every unretired record of the own log (tail to head, in seq order) with where it
    /// sits, for resynchronising the partner's copy. Read-only; holds the volume's lock while it
    /// scans, so the list is one consistent cut of the log.
    pub fn unretired_records(&self) -> UnretiredRecords {
        let st = self.shared.lock();
        let scan = st.region.scan();
        let records = scan
            .records
            .iter()
            .map(|r| {
                let len = if r.header.kind == RecordKind::Pad {
                    RECORD_HEADER_BYTES as u64
                } else {
                    r.header.total_bytes()
                };
                UnretiredRecord {
                    log_offset: r.log_offset,
                    seq: r.header.seq,
                    bytes: Bytes::copy_from_slice(st.region.log_slice(r.log_offset, len)),
                }
            })
            .collect();
        UnretiredRecords {
            generation: st.generation,
            tail_offset: scan.report.start.tail_offset,
            tail_seq: scan.report.start.tail_seq,
            next_seq: st.cursor.next_seq,
            records,
        }
    }
}

/// One record of [`JournaledVolume::unretired_records`]: its encoded bytes (header and padded
/// payload; a PAD's header alone) and where it sits in the log.
#[derive(Debug, Clone)]
pub struct UnretiredRecord {
    pub log_offset: u64,
    pub seq: u64,
    pub bytes: Bytes,
}

/// The live part of the own log: its tail (as the control slot states it) and its records.
#[derive(Debug, Clone)]
pub struct UnretiredRecords {
    pub generation: u64,
    pub tail_offset: u64,
    pub tail_seq: u64,
    /// The seq the next appended record gets.
    pub next_seq: u64,
    pub records: Vec<UnretiredRecord>,
}

/// The partial-parity space rule of a volume over `backing` ([`crate::ppl_budget`]): the bound
/// of the largest record, data or zeroing (0 when the store never logs partial parity), and
/// the largest single PPL record, bounded by the store's bound for one stripe (a store logs at
/// most one record per stripe row it updates).
fn ppl_budget<B: Backing>(backing: &B, config: &VolumeConfig) -> PplBudget {
    let write = backing.ppl_bound_bytes(config.max_record_payload_bytes, false, PPL_FRAMING_BYTES);
    let one = if write == 0 {
        0
    } else {
        write.max(backing.ppl_bound_bytes(u64::MAX, true, PPL_FRAMING_BYTES))
    };
    let pad = if one == 0 {
        0
    } else {
        one.max(backing.ppl_bound_bytes(backing.stripe_bytes().max(1), false, PPL_FRAMING_BYTES))
    };
    PplBudget {
        control_bytes: CONTROL_RESERVE_BYTES,
        one_record_bytes: one,
        pad_bytes: pad,
    }
}

/// The PPL bound of one record ([`Shared::record_ppl_bound`]).
fn record_ppl_bound<B: Backing>(
    backing: &B,
    budget: PplBudget,
    kind: RecordKind,
    length: u64,
) -> u64 {
    if !budget.enabled() {
        return 0;
    }
    match kind {
        RecordKind::Write => backing.ppl_bound_bytes(length, false, PPL_FRAMING_BYTES),
        RecordKind::Zero | RecordKind::Trim => {
            backing.ppl_bound_bytes(length, true, PPL_FRAMING_BYTES)
        }
        // STORED: nothing of it is applied by a CP; control records apply nothing.
        _ => 0,
    }
}

/// The header of the record at log offset `at`, if one decodes there.
fn header_at(region: &Region, at: u64) -> Option<RecordHeader> {
    (at + RECORD_HEADER_BYTES as u64 <= region.log_bytes())
        .then(|| RecordHeader::decode(region.log_slice(at, RECORD_HEADER_BYTES as u64)).ok())
        .flatten()
}

/// What the live data records of a log opened in place owe (`bound` per kind and length).
/// A header that does not decode ends the walk (the scan found the live log whole).
fn owed_of_log(
    region: &Region,
    cursor: &LogCursor,
    bound: impl Fn(RecordKind, u64) -> u64,
) -> Owed {
    let mut owed = Owed::default();
    let (mut at, mut walked) = (cursor.tail, 0u64);
    while walked < cursor.used {
        let Some(h) = header_at(region, at) else {
            break;
        };
        if h.kind.is_data() {
            owed.push(h.seq, bound(h.kind, h.length));
        }
        let total = h.total_bytes();
        if total == 0 {
            break;
        }
        walked += total;
        at = (at + total) % cursor.log_bytes;
    }
    owed
}

/// `msync` mode: starts the log's group-commit thread with every record before the cursor's next
/// seq persistent (recovery persisted what a crashed process left unpersisted: see
/// [`crate::write_back`]). Other modes persist inline.
fn start_group_commit(
    region: &Region,
    cursor: &LogCursor,
    path: &std::path::Path,
) -> Result<Option<Arc<GroupCommit>>, JournalError> {
    if region.persist_method() != PersistMethod::Msync {
        return Ok(None);
    }
    let persist = region.log_persister();
    let group = GroupCommit::start(cursor.next_seq - 1, persist, path.to_path_buf())?;
    Ok(Some(Arc::new(group)))
}

/// Before a log continues in place: blanks the records a torn group commit may have left beyond
/// its end (see [`crate::scan::unpersisted_leftovers`]). They lie within the unpersisted bound of
/// the end (or two of the largest records, when a single record is larger), in free space.
fn blank_leftovers(
    region: &mut Region,
    cursor: &LogCursor,
    generation: u64,
    config: &VolumeConfig,
) -> Result<(), JournalError> {
    let largest = RECORD_HEADER_BYTES as u64 + align_up(config.max_record_payload_bytes);
    let window = crate::scan::UNPERSISTED_MAX_LOG_BYTES
        .max(2 * largest + RECORD_HEADER_BYTES as u64)
        .min(cursor.free());
    let leftovers = crate::scan::unpersisted_leftovers(
        region.log(),
        cursor.head,
        window,
        generation,
        cursor.next_seq,
    );
    if !leftovers.is_empty() {
        tracing::info!(
            region = region.name(),
            count = leftovers.len(),
            from_offset = cursor.head,
            "blanking never-acknowledged records a power cut left beyond the end of the NVRAM log"
        );
        region.blank_log_headers(&leftovers)?;
    }
    Ok(())
}

/// Refuses a config the log cannot hold or that makes no sense.
fn check_config(
    config: &VolumeConfig,
    log_bytes: u64,
    ppl_budget: PplBudget,
) -> Result<(), JournalError> {
    let max_total = RECORD_HEADER_BYTES as u64 + align_up(config.max_record_payload_bytes);
    let needed = ppl_budget.min_log_bytes(max_total);
    if config.max_record_payload_bytes == 0
        || config.max_record_payload_bytes > u64::from(u32::MAX)
        || needed > log_bytes
    {
        let ppl = ppl_budget.one_record_bytes + ppl_budget.pad_bytes;
        return Err(JournalError::Config(format!(
            "max_record_payload_bytes {} does not fit a log of {log_bytes} bytes \
             (needs log >= 2 x record + {} bytes, {ppl} of them kept for the \
             partial-parity records of a degraded RAID 5/6 array); use a larger log or a \
             smaller max_record_payload_bytes",
            config.max_record_payload_bytes,
            needed - 2 * max_total,
        )));
    }
    if config.cp_fill_percent == 0 || config.cp_fill_percent > 100 {
        return Err(JournalError::Config(format!(
            "cp_fill_percent {} must be 1..=100",
            config.cp_fill_percent
        )));
    }
    Ok(())
}

/// Starts the background CRC check of the records recovery left unchecked (see
/// [`crate::verify`]) on a blocking thread: CRC32C of up to the whole log is CPU work that must
/// not hold up the runtime. It holds the volume only weakly and per chunk, so dropping the volume
/// stops it.
fn spawn_verifier<B: Backing>(shared: std::sync::Weak<Shared<B>>) {
    tokio::task::spawn_blocking(move || while shared.upgrade().is_some_and(|s| s.verify_step()) {});
}

/// Runs CPs on the timer and on demand. Holds the volume only weakly, so that dropping the
/// volume closes the NVRAM file at once (a crash, as far as the journal is concerned).
async fn flusher_loop<B: Backing>(
    shared: std::sync::Weak<Shared<B>>,
    wanted: Arc<Notify>,
    interval: Duration,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = wanted.notified() => {}
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        if let Err(e) = shared.run_cp().await {
            if matches!(e, JournalError::CorruptRecordFound { .. }) {
                // Permanent: the volume refuses all I/O and has nothing it may apply (logged once
                // where the damage was found).
                shared.lock().last_cp_error = Some(e.to_string());
                return;
            }
            tracing::warn!(volume = shared.volume_id, error = %e, "consistency point failed; will retry");
            shared.lock().last_cp_error = Some(e.to_string());
            // Writers waiting for space re-check and get the error.
            shared.space_freed.notify_waiters();
            drop(shared);
            tokio::time::sleep(interval).await;
        }
    }
}
