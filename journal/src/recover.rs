//! Recovery of a region's log: which records still need the store, checked before anything is
//! done with them, and the two ways of redoing them.
//!
//! [`plan_recovery`] scans a region (the own one at open, the partner's at takeover), refuses
//! what must never be applied (damage in the middle of the log, records of another volume or
//! store, records outside the store) and lists the *unretired* data records: intact, with seq
//! greater than the store's `applied_seq` (or any CP record's), in seq order. A torn or corrupt
//! record ends the scan, is reported, and is never applied.
//!
//! Then either
//! - the volume serves at once ([`RecoveryPlan::dirty_index`], [`RecoveryPlan::cursor`]): the
//!   records stay where they are in the log, the dirty index rebuilt from them overlays reads, and
//!   the first CP applies them in the background like any other write. Opening costs a scan,
//!   not a redo through the store; or
//! - [`apply_plan`] redoes them through the store one by one before anything else (used for a
//!   log that cannot continue in place, and by [`replay_region`]).
//!
//! Both are ordered and idempotent: records are applied in seq order (the index keeps the
//! newest record per byte), and a record applied twice writes the same bytes twice.

use bytes::Bytes;

use crate::backing::Backing;
use crate::error::{BackingError, JournalError};
use crate::format::RecordKind;
use crate::index::{DirtyIndex, Extent, ExtentData};
use crate::log::LogCursor;
use crate::nvram::Region;
use crate::scan::{verify_deferred, Scan, ScanReport, ScannedRecord, StopReason};

/// What recovery found and did at open.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RecoveryReport {
    pub generation: u64,
    pub scan: ScanReport,
    pub backing_applied_seq: u64,
    /// `applied_seq` used to skip retired records (store or CP record, the larger).
    pub effective_applied_seq: u64,
    /// Unretired data records found: redone before serving, or (see `applied_in_background`)
    /// indexed and left to the first CP.
    pub replayed_records: u64,
    pub replayed_bytes: u64,
    pub skipped_retired_records: u64,
    /// The scan ended on damage (torn or corrupt record), which was discarded.
    pub damaged_tail_discarded: bool,
    /// The records stayed in the log and the volume served at once; the first CP applies them.
    pub applied_in_background: bool,
    pub next_seq: u64,
    /// Time spent scanning and checking the log (microseconds).
    pub scan_micros: u64,
    /// Time spent building the dirty index from the unretired records (microseconds).
    pub index_micros: u64,
    /// Time spent persisting what the scan read, in case a crashed process had stored it
    /// without persisting it (microseconds; see [`crate::write_back`]). Part of `scan_micros`.
    pub write_back_micros: u64,
}

/// The checked result of scanning a region: what is retired and what must still be applied.
#[derive(Debug, Clone)]
pub struct RecoveryPlan {
    pub scan: Scan,
    pub backing_applied_seq: u64,
    /// The store's `applied_seq` or the newest CP record's, the larger.
    pub applied_seq: u64,
    /// Unretired data records, in seq order.
    pub redo: Vec<ScannedRecord>,
    /// The WRITE records of `redo` whose CRC the deferred scan left unchecked, in log order:
    /// verify them ([`RecoveryPlan::verify_deferred`], or one by one) before reading or applying
    /// their payload.
    pub crc_pending: Vec<ScannedRecord>,
    pub skipped_retired: u64,
    /// Time spent persisting what the scan read (microseconds).
    pub write_back_micros: u64,
}

pub(crate) fn backing_err(op: &'static str, offset: u64) -> impl Fn(BackingError) -> JournalError {
    move |e| JournalError::Backing {
        op,
        offset,
        message: e.0,
    }
}

/// Scans `region`, persists what the scan read (a crashed process may have stored it without
/// persisting it: see [`crate::write_back`]), and checks its records against `backing` and
/// `volume_id`; changes no byte of the region.
///
/// Refuses a region damaged in the middle unless `discard_corrupt_log`, a log bound to another
/// store that still holds unapplied records, records of another volume, and records outside the
/// store.
pub async fn plan_recovery<B: Backing>(
    region: &Region,
    backing: &B,
    volume_id: u64,
    discard_corrupt_log: bool,
) -> Result<RecoveryPlan, JournalError> {
    // The CRCs of older WRITE records are left for later (verified in the background while the
    // volume serves, or by `apply_plan` before it writes anything), except when damage is to be
    // discarded: that needs the full scan to find where the damage is.
    let scan = if discard_corrupt_log {
        region.scan()
    } else {
        region.scan_deferred()
    };
    // Before anything is done with what the scan found: nothing it trusted may vanish with the
    // host's power later (records acknowledged after it would be lost with it).
    let write_back_started = std::time::Instant::now();
    region.persist_after_crash(&scan.report)?;
    let write_back_micros = write_back_started.elapsed().as_micros() as u64;
    let report = &scan.report;
    if report.corrupt_mid_region() && !discard_corrupt_log {
        let (later_offset, later_seq) = report.later_valid_record.unwrap_or_default();
        return Err(JournalError::CorruptMidRegion {
            region: region.name(),
            offset: report.stop_offset,
            expected_seq: report.last_seq + 1,
            later_offset,
            later_seq,
        });
    }
    check_store(region, backing, &scan)?;
    let backing_applied = backing
        .applied_seq()
        .await
        .map_err(backing_err("applied_seq", 0))?;
    let applied = backing_applied.max(report.cp_applied_seq.unwrap_or(0));
    let redo = scan.replay_list(applied);
    let crc_pending: Vec<ScannedRecord> = scan
        .crc_deferred
        .iter()
        .map(|&i| scan.records[i])
        .filter(|r| r.header.seq > applied)
        .collect();
    let size = backing.size();
    for r in &redo {
        let h = &r.header;
        if h.volume_id != volume_id || h.offset.checked_add(h.length).is_none_or(|e| e > size) {
            // About to refuse the record: first make sure it is not just damaged bytes.
            verify_one(region, r)?;
        }
        if h.volume_id != volume_id {
            return Err(JournalError::ForeignVolume {
                region: region.name(),
                seq: h.seq,
                found: h.volume_id,
                expected: volume_id,
            });
        }
        let end = h.offset.checked_add(h.length);
        let payload_ok = h.kind != RecordKind::Write || u64::from(h.payload_bytes) == h.length;
        let inside = matches!(end, Some(e) if e <= size);
        if !payload_ok || !inside {
            return Err(JournalError::RecordOutOfRange {
                seq: h.seq,
                offset: h.offset,
                end: end.unwrap_or(u64::MAX),
                size,
            });
        }
    }
    let skipped_retired = scan
        .records
        .iter()
        .filter(|r| r.header.kind.is_data() && r.header.seq <= applied)
        .count() as u64;
    Ok(RecoveryPlan {
        scan,
        backing_applied_seq: backing_applied,
        applied_seq: applied,
        redo,
        crc_pending,
        skipped_retired,
        write_back_micros,
    })
}

/// Checks the CRC of one record a deferred scan accepted; a failure is damage in the middle of
/// the log (the scan already checked the newest records, the only ones a crash can tear).
pub fn verify_one(region: &Region, r: &ScannedRecord) -> Result<(), JournalError> {
    verify_deferred(region.log(), r).map_err(|_| JournalError::CorruptRecordFound {
        region: region.name(),
        offset: r.log_offset,
        seq: r.header.seq,
    })
}

/// Refuses a log bound to another store while it holds records that store has not applied.
fn check_store<B: Backing>(region: &Region, backing: &B, scan: &Scan) -> Result<(), JournalError> {
    let bound = region.store_id();
    let Some(id) = backing
        .store_id()
        .filter(|id| bound != [0; 16] && bound != *id)
    else {
        return Ok(());
    };
    // Records a CP of this log retired were applied to the bound store and are done with; any
    // other data record still belongs to that store. Only a log holding none of those may move to
    // another store (for example, the array was recreated after a clean stop).
    let retired = scan.report.cp_applied_seq.unwrap_or(0);
    let unapplied = scan
        .records
        .iter()
        .any(|r| r.header.kind.is_data() && r.header.seq > retired);
    if unapplied {
        return Err(JournalError::ForeignStore {
            region: region.name(),
            bound: uuid::Uuid::from_bytes(bound).to_string(),
            store: uuid::Uuid::from_bytes(id).to_string(),
        });
    }
    tracing::info!(
        region = region.name(),
        from = %uuid::Uuid::from_bytes(bound),
        to = %uuid::Uuid::from_bytes(id),
        "NVRAM log holds nothing unapplied; it moves to this store"
    );
    Ok(())
}

impl RecoveryPlan {
    /// Verifies every CRC the deferred scan left unchecked (see [`RecoveryPlan::crc_pending`]).
    pub fn verify_deferred(&self, region: &Region) -> Result<(), JournalError> {
        self.crc_pending
            .iter()
            .try_for_each(|r| verify_one(region, r))
    }

    /// True when the volume can serve the log's records in place: there is something to apply,
    /// and appending after the last intact record cannot make a discarded record look live again
    /// (no damage with intact newer records after it, which only `discard_corrupt_log` lets
    /// through: such a log is redone and restarted in a new generation instead).
    pub fn continues_in_place(&self) -> bool {
        let r = &self.scan.report;
        !self.redo.is_empty()
            && r.stop != StopReason::BadTail
            && r.later_valid_record.is_none()
            && r.last_seq >= self.applied_seq
    }

    /// The dirty index the unretired records make (newest record wins per byte).
    pub fn dirty_index(&self) -> DirtyIndex {
        let records = self
            .redo
            .iter()
            .map(|r| {
                let h = &r.header;
                let data = match h.kind {
                    RecordKind::Write => ExtentData::Nvram {
                        log_offset: r.payload_offset(),
                    },
                    RecordKind::Zero => ExtentData::Zero,
                    RecordKind::Stored => ExtentData::Stored,
                    _ => ExtentData::Trim,
                };
                let extent = Extent {
                    len: h.length,
                    seq: h.seq,
                    data,
                };
                (h.offset, extent)
            })
            .collect();
        // Newest wins per byte: a STORED record hides the older records under its range (the
        // store holds newer bytes there), then goes itself (there is nothing to apply for it).
        let mut index = DirtyIndex::from_records(records);
        index.drop_stored();
        index
    }

    /// Seq of the newest unretired data record (0: none).
    pub fn last_data_seq(&self) -> u64 {
        self.redo.last().map_or(0, |r| r.header.seq)
    }

    /// The live part of the log, from the control slot's tail to the end of the last intact
    /// record, where the next record goes (over a torn record, if the scan ended on one).
    pub fn cursor(&self, log_bytes: u64) -> LogCursor {
        let r = &self.scan.report;
        let used = self
            .scan
            .records
            .iter()
            .map(|x| x.header.total_bytes())
            .sum();
        LogCursor {
            log_bytes,
            head: r.end_offset,
            tail: r.start.tail_offset,
            used,
            next_seq: r.last_seq + 1,
        }
    }

    /// Byte ranges of the store the unretired records cover, sorted and merged.
    pub fn redo_ranges(&self) -> Vec<(u64, u64)> {
        let mut v: Vec<(u64, u64)> = self
            .redo
            .iter()
            .map(|r| (r.header.offset, r.header.offset + r.header.length))
            .filter(|(a, b)| b > a)
            .collect();
        v.sort_unstable();
        let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
        for (a, b) in v {
            match out.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => out.push((a, b)),
            }
        }
        out.into_iter().map(|(a, b)| (a, b - a)).collect()
    }

    /// The report of this plan, with what was done.
    pub fn report(&self, replayed_bytes: u64, in_background: bool) -> RecoveryReport {
        let r = &self.scan.report;
        RecoveryReport {
            generation: r.start.generation,
            damaged_tail_discarded: !r.stop.is_clean_end(),
            scan: r.clone(),
            backing_applied_seq: self.backing_applied_seq,
            effective_applied_seq: self.applied_seq,
            replayed_records: self.redo.len() as u64,
            replayed_bytes,
            skipped_retired_records: self.skipped_retired,
            applied_in_background: in_background,
            next_seq: r.last_seq.max(self.applied_seq) + 1,
            scan_micros: 0,
            index_micros: 0,
            write_back_micros: self.write_back_micros,
        }
    }
}

/// Redoes the plan's records through `backing` in seq order, then flushes the store and records
/// the new `applied_seq`. Does not change the region.
pub async fn apply_plan<B: Backing>(
    region: &Region,
    backing: &B,
    plan: &RecoveryPlan,
) -> Result<RecoveryReport, JournalError> {
    plan.verify_deferred(region)?;
    let mut replayed_bytes = 0;
    // What the records make of each byte, newest first (the same as redoing them in seq order,
    // except that a STORED record's range keeps the store's bytes instead of older records').
    for (offset, e) in plan.dirty_index().snapshot() {
        match e.data {
            ExtentData::Nvram { log_offset } => {
                let data = Bytes::copy_from_slice(region.log_slice(log_offset, e.len));
                backing
                    .write(offset, data)
                    .await
                    .map_err(backing_err("replay write", offset))?;
                replayed_bytes += e.len;
            }
            ExtentData::Zero => backing
                .write_zeroes(offset, e.len)
                .await
                .map_err(backing_err("replay write_zeroes", offset))?,
            ExtentData::Trim => backing
                .discard(offset, e.len)
                .await
                .map_err(backing_err("replay discard", offset))?,
            ExtentData::Stored => {}
        }
    }
    let last_seq = plan.scan.report.last_seq.max(plan.applied_seq);
    if !plan.redo.is_empty() || last_seq > plan.backing_applied_seq {
        backing.flush().await.map_err(backing_err("flush", 0))?;
        backing
            .set_applied_seq(last_seq)
            .await
            .map_err(backing_err("set_applied_seq", 0))?;
    }
    Ok(plan.report(replayed_bytes, false))
}

/// Redoes a region's intact data records newer than the store's `applied_seq` (or any CP's), in
/// seq order, then flushes the store and records the new `applied_seq`. Does not change the
/// region. Used on takeover for the partner region ([`plan_recovery`] then [`apply_plan`]).
pub async fn replay_region<B: Backing>(
    region: &Region,
    backing: &B,
    volume_id: u64,
    discard_corrupt_log: bool,
) -> Result<RecoveryReport, JournalError> {
    let plan = plan_recovery(region, backing, volume_id, discard_corrupt_log).await?;
    apply_plan(region, backing, &plan).await
}
