//! Scanning a region's circular log: the pure half of recovery.
//!
//! [`scan_log`] walks the log from its tail (given by the region's control slot) and accepts
//! records while each one is intact and is the expected successor: right magic and kind, CRC32C
//! over header and payload matching, the region's generation, seq exactly one more than the
//! previous record, and it ends inside the log. The first record that fails any check ends the
//! scan; it is *reported* in the [`ScanReport`] (reason and log offset), never returned for apply.
//!
//! Records are appended in seq order under one lock. In `none` and `pmem` mode they are also
//! persisted one at a time under it, so a crash can tear only the newest record. In `msync` mode a
//! group-commit thread persists them in rounds (see `group_commit`): up to
//! [`UNPERSISTED_MAX_RECORDS`] newest records, spanning at most [`UNPERSISTED_MAX_LOG_BYTES`] of
//! log, may be stored and not persisted at once, and a power cut may leave any of them torn or
//! intact; none of them was acknowledged. Either way a scan that stops at a torn or stale record
//! has found the true end of what was acknowledged. A stop followed by an intact record of the same
//! generation too new to have been unpersisted with the stopping one (found by [`probe_beyond`];
//! the window is [`ScanReport::unpersisted_window_records`], set by the region for `msync` mode)
//! means damage in the middle of the log, which the caller treats as an error. Intact newer records
//! inside the window are the leftovers of a torn group: never applied, and blanked before the log
//! continues in place ([`unpersisted_leftovers`]).

use crate::error::FormatError;
use crate::format::{CpPayload, RecordHeader, RecordKind, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES};

/// Where a scan starts (from the region's control slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ScanStart {
    pub tail_offset: u64,
    pub tail_seq: u64,
    pub generation: u64,
}

/// One intact record found by a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ScannedRecord {
    /// Offset of the record header within the log.
    pub log_offset: u64,
    pub header: RecordHeader,
}

impl ScannedRecord {
    /// Offset of the payload within the log.
    pub fn payload_offset(&self) -> u64 {
        self.log_offset + RECORD_HEADER_BYTES as u64
    }
}

/// Why a scan stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Bytes never written (zero header): the clean end of a young log.
    Blank,
    /// An intact record of an earlier lap or generation: the clean end of the log.
    Stale { seq: u64, generation: u64 },
    /// The whole log was walked (a completely full log).
    LogExhausted,
    /// Header magic is wrong (torn or foreign bytes).
    BadMagic,
    /// Unknown record kind.
    BadKind(u16),
    /// The CRC32C over header and payload does not match (torn or bit-flipped).
    BadCrc { stored: u32, computed: u32 },
    /// Intact record whose seq is not the expected successor (and not older: a gap).
    UnexpectedSeq { expected: u64, found: u64 },
    /// Intact record of a newer generation than the region's.
    GenerationAhead { expected: u64, found: u64 },
    /// The record's declared size runs past the end of the log or is malformed.
    BadLength { total_bytes: u64 },
    /// The control slot's tail offset is outside the log.
    BadTail,
}

impl StopReason {
    /// What the stop means, in words for people (`twinctl journal dump`).
    pub fn describe(&self) -> String {
        match self {
            StopReason::Blank => "bytes never written (the end of a young log)".into(),
            StopReason::Stale { seq, generation } => format!(
                "an older record (seq {seq}, generation {generation}) from an earlier pass over \
                 the log"
            ),
            StopReason::LogExhausted => "the whole log was read (it is full)".into(),
            StopReason::BadMagic => {
                "a record header with the wrong magic (torn or foreign bytes)".into()
            }
            StopReason::BadKind(k) => format!("a record of unknown kind {k}"),
            StopReason::BadCrc { stored, computed } => format!(
                "a record whose checksum does not match (stored {stored:#010x}, computed \
                 {computed:#010x})"
            ),
            StopReason::UnexpectedSeq { expected, found } => {
                format!("a record with seq {found} where seq {expected} was expected")
            }
            StopReason::GenerationAhead { expected, found } => format!(
                "a record of generation {found}, newer than the log's generation {expected}"
            ),
            StopReason::BadLength { total_bytes } => {
                format!("a record whose length ({total_bytes} bytes) runs past the end of the log")
            }
            StopReason::BadTail => "a recorded tail offset outside the log".into(),
        }
    }

    /// True when the stop is the normal end of the log rather than damage.
    pub fn is_clean_end(&self) -> bool {
        matches!(
            self,
            StopReason::Blank | StopReason::Stale { .. } | StopReason::LogExhausted
        )
    }
}

/// What a scan found and where and why it stopped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ScanReport {
    pub start: ScanStart,
    pub records_valid: u64,
    /// Seq of the last intact record (`tail_seq - 1` when none).
    pub last_seq: u64,
    /// Log offset right after the last intact record (where the next append goes).
    pub end_offset: u64,
    /// Log offset of the record that ended the scan.
    pub stop_offset: u64,
    pub stop: StopReason,
    /// Largest `applied_seq` of the CP records seen, if any.
    pub cp_applied_seq: Option<u64>,
    /// The newest intact record of the same generation found after a damaged stop:
    /// `(offset, seq)`.
    pub later_valid_record: Option<(u64, u64)>,
    /// How many records may have been stored and not persisted at once when the log was written
    /// (0: one at a time; [`UNPERSISTED_MAX_RECORDS`] for a region in `msync` mode). A later
    /// record within this many seqs of the stop may be a leftover of a torn group commit.
    pub unpersisted_window_records: u64,
}

impl ScanReport {
    /// True when the scan ended on damage with an intact newer record after it that cannot be a
    /// leftover of a torn group commit (see the module doc).
    pub fn corrupt_mid_region(&self) -> bool {
        let stop_seq = self.last_seq.wrapping_add(1);
        !self.stop.is_clean_end()
            && self.later_valid_record.is_some_and(|(_, seq)| {
                seq >= stop_seq.saturating_add(self.unpersisted_window_records)
            })
    }
}

/// At most this many log records are stored and not yet persisted at any time (`msync` mode's
/// group commit; appenders wait for room). Equal to [`DEFERRED_SCAN_VERIFIED_TAIL_RECORDS`], so a
/// deferred scan checks the CRC of every record a power cut may have torn.
pub const UNPERSISTED_MAX_RECORDS: u64 = DEFERRED_SCAN_VERIFIED_TAIL_RECORDS as u64;
/// ...and the records stored and not yet persisted span at most this many log bytes (PADs
/// included), unless a single record is larger. Equal to [`DEFERRED_SCAN_VERIFIED_TAIL_BYTES`].
pub const UNPERSISTED_MAX_LOG_BYTES: u64 = DEFERRED_SCAN_VERIFIED_TAIL_BYTES;

/// The result of a scan: intact records in log order, and the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Scan {
    pub records: Vec<ScannedRecord>,
    pub report: ScanReport,
    /// Indices into `records` of WRITE records whose CRC a deferred scan ([`scan_log_deferred`])
    /// has not checked yet, in log order. Empty after a full scan.
    pub crc_deferred: Vec<usize>,
}

impl Scan {
    /// Data records recovery must redo: intact WRITE/ZERO/TRIM with seq > `applied_seq`, in order.
    pub fn replay_list(&self, applied_seq: u64) -> Vec<ScannedRecord> {
        self.records
            .iter()
            .filter(|r| r.header.kind.is_data() && r.header.seq > applied_seq)
            .copied()
            .collect()
    }
}

/// A deferred scan still checks the CRC of the WRITE records among the newest this many...
pub const DEFERRED_SCAN_VERIFIED_TAIL_RECORDS: usize = 64;
/// ...and among the newest this many log bytes, whichever covers more.
pub const DEFERRED_SCAN_VERIFIED_TAIL_BYTES: u64 = 4 << 20;

/// Checks the structure of the record at `at` of `log` (magic, kind, header fields, length
/// inside the log); returns its header or the reason it is not acceptable. No CRC, no seq or
/// generation ordering.
fn check_header(log: &[u8], at: u64) -> Result<RecordHeader, StopReason> {
    let log_bytes = log.len() as u64;
    if at + RECORD_HEADER_BYTES as u64 > log_bytes {
        return Err(StopReason::BadLength {
            total_bytes: RECORD_HEADER_BYTES as u64,
        });
    }
    let header = match RecordHeader::decode(&log[at as usize..]) {
        Ok(h) => h,
        Err(FormatError::Blank) => return Err(StopReason::Blank),
        Err(FormatError::BadRecordKind(k)) => return Err(StopReason::BadKind(k)),
        Err(_) => return Err(StopReason::BadMagic),
    };
    let total = header.total_bytes();
    let pad_ok = header.kind != RecordKind::Pad
        || (header.payload_bytes == 0
            && total >= RECORD_HEADER_BYTES as u64
            && total % RECORD_ALIGN_BYTES == 0);
    if !pad_ok || total > log_bytes - at {
        return Err(StopReason::BadLength { total_bytes: total });
    }
    Ok(header)
}

/// Checks the CRC32C over the header at `at` and its payload (structure already checked).
fn check_crc(log: &[u8], at: u64, header: &RecordHeader) -> Result<(), StopReason> {
    let at_us = at as usize;
    let payload_start = at_us + RECORD_HEADER_BYTES;
    let payload = &log[payload_start..payload_start + header.payload_bytes as usize];
    match RecordHeader::verify_crc(&log[at_us..], payload) {
        Err(FormatError::BadCrc {
            stored, computed, ..
        }) => Err(StopReason::BadCrc { stored, computed }),
        _ => Ok(()),
    }
}

/// Checks the record at `at` of `log`, CRC included; returns its header or the reason it is not
/// acceptable. Does not check seq/generation ordering.
#[cfg(test)]
fn check_record(log: &[u8], at: u64) -> Result<RecordHeader, StopReason> {
    let header = check_header(log, at)?;
    check_crc(log, at, &header)?;
    Ok(header)
}

/// Verifies the CRC of the record `r` found by a deferred scan of `log` (see [`Scan::crc_deferred`]).
pub fn verify_deferred(log: &[u8], r: &ScannedRecord) -> Result<(), StopReason> {
    check_crc(log, r.log_offset, &r.header)
}

/// Walks `log` (the circular log bytes of one region) from `start`, checking every record's CRC.
/// Pure.
pub fn scan_log(log: &[u8], start: ScanStart) -> Scan {
    scan_log_with(log, start, None)
}

/// [`scan_log`] for recovery at open: the CRC of a WRITE record (header and payload, the bulk of
/// the log's bytes) is checked only for the newest records ([`DEFERRED_SCAN_VERIFIED_TAIL_RECORDS`],
/// [`DEFERRED_SCAN_VERIFIED_TAIL_BYTES`]); the others are listed in [`Scan::crc_deferred`] for
/// the caller to verify before it reads or applies them. Every other check (structure, seq chain,
/// generation, and the CRC of every non-WRITE record, so CP records are trusted only when intact)
/// is the same as in a full scan.
///
/// Why this still finds the true end of the log: records are appended and persisted one at a
/// time in seq order (one lock), so only the newest record can be torn by a crash or power cut;
/// its CRC is checked here, with a margin of older records. A torn record whose header survived
/// intact ends the scan exactly as in a full scan. A bad CRC further back cannot come from a
/// crash; it is media damage, which the caller's verification of `crc_deferred` reports before
/// any of it is used.
pub fn scan_log_deferred(log: &[u8], start: ScanStart) -> Scan {
    let window = TailWindow {
        records: DEFERRED_SCAN_VERIFIED_TAIL_RECORDS,
        bytes: DEFERRED_SCAN_VERIFIED_TAIL_BYTES,
    };
    scan_log_with(log, start, Some(window))
}

/// The newest records whose CRC a deferred scan checks: at least this many records and bytes.
#[derive(Debug, Clone, Copy)]
struct TailWindow {
    records: usize,
    bytes: u64,
}

/// Where and why the walk of [`scan_log_with`] stopped.
struct Walk {
    records: Vec<ScannedRecord>,
    deferred: Vec<usize>,
    stop: StopReason,
    /// Log offset after the last accepted record.
    at: u64,
    expected_seq: u64,
}

fn walk_log(log: &[u8], start: ScanStart, defer_write_crc: bool) -> Walk {
    let log_bytes = log.len() as u64;
    let mut records = Vec::new();
    let mut deferred = Vec::new();
    let mut at = start.tail_offset;
    let mut expected_seq = start.tail_seq;
    let mut walked: u64 = 0;
    let stop = loop {
        if at >= log_bytes || !at.is_multiple_of(RECORD_ALIGN_BYTES) {
            break StopReason::BadTail;
        }
        if walked >= log_bytes {
            break StopReason::LogExhausted;
        }
        let header = match check_header(log, at) {
            Ok(h) => h,
            Err(reason) => break reason,
        };
        let defer = defer_write_crc && header.kind == RecordKind::Write;
        if !defer {
            if let Err(reason) = check_crc(log, at, &header) {
                break reason;
            }
        }
        if let Some(reason) = out_of_order(&header, start, expected_seq, at, log_bytes) {
            // A record that ends the walk has its CRC checked even when deferred: a torn or
            // damaged header can look stale (a clean end), and only the CRC tells them apart,
            // exactly as in a full scan.
            if defer {
                if let Err(bad) = check_crc(log, at, &header) {
                    break bad;
                }
            }
            break reason;
        }
        if header.kind == RecordKind::Cp {
            let p = &log[at as usize + RECORD_HEADER_BYTES..][..header.payload_bytes as usize];
            if CpPayload::decode(p).is_err() {
                break StopReason::BadLength {
                    total_bytes: header.total_bytes(),
                };
            }
        }
        if defer {
            deferred.push(records.len());
        }
        records.push(ScannedRecord {
            log_offset: at,
            header,
        });
        expected_seq += 1;
        walked += header.total_bytes();
        at += header.total_bytes();
        if at == log_bytes {
            at = 0;
        }
    };
    Walk {
        records,
        deferred,
        stop,
        at,
        expected_seq,
    }
}

/// Why an intact `header` at `at` is not the record expected next, if it is not.
fn out_of_order(
    header: &RecordHeader,
    start: ScanStart,
    expected_seq: u64,
    at: u64,
    log_bytes: u64,
) -> Option<StopReason> {
    if header.generation < start.generation || header.seq < expected_seq {
        return Some(StopReason::Stale {
            seq: header.seq,
            generation: header.generation,
        });
    }
    if header.generation > start.generation {
        return Some(StopReason::GenerationAhead {
            expected: start.generation,
            found: header.generation,
        });
    }
    if header.seq != expected_seq {
        return Some(StopReason::UnexpectedSeq {
            expected: expected_seq,
            found: header.seq,
        });
    }
    if header.kind == RecordKind::Pad && at + header.length != log_bytes {
        return Some(StopReason::BadLength {
            total_bytes: header.length,
        });
    }
    None
}

/// Checks the CRC of the deferred records among the newest ones of `w` (module doc of
/// [`scan_log_deferred`]); the first that fails ends the walk there, as in a full scan.
fn verify_tail(log: &[u8], w: &mut Walk, window: TailWindow) {
    let n = w.records.len();
    let mut first = n;
    let mut bytes = 0u64;
    while first > 0 && (n - first < window.records || bytes < window.bytes) {
        first -= 1;
        bytes += w.records[first].header.total_bytes();
    }
    let from = w.deferred.partition_point(|&i| i < first);
    for k in from..w.deferred.len() {
        let i = w.deferred[k];
        let r = w.records[i];
        if let Err(reason) = check_crc(log, r.log_offset, &r.header) {
            w.records.truncate(i);
            w.deferred.truncate(from);
            w.stop = reason;
            w.at = r.log_offset;
            w.expected_seq = r.header.seq;
            return;
        }
    }
    w.deferred.truncate(from);
}

/// A full scan (`window` `None`) or a deferred one checking the CRCs of `window`.
fn scan_log_with(log: &[u8], start: ScanStart, window: Option<TailWindow>) -> Scan {
    let log_bytes = log.len() as u64;
    let mut w = walk_log(log, start, window.is_some());
    if let Some(window) = window {
        verify_tail(log, &mut w, window);
    }
    let cp_applied_seq = w
        .records
        .iter()
        .filter(|r| r.header.kind == RecordKind::Cp)
        .filter_map(|r| {
            let at = r.log_offset as usize + RECORD_HEADER_BYTES;
            CpPayload::decode(&log[at..][..r.header.payload_bytes as usize]).ok()
        })
        .map(|cp| cp.applied_seq)
        .max();
    let stop = w.stop;
    let end_offset = if w.at >= log_bytes { 0 } else { w.at };
    let later_valid_record = if stop.is_clean_end() || stop == StopReason::BadTail {
        None
    } else {
        probe_beyond(log, end_offset, start.generation, w.expected_seq)
    };
    Scan {
        report: ScanReport {
            start,
            records_valid: w.records.len() as u64,
            last_seq: w.expected_seq.wrapping_sub(1),
            end_offset,
            stop_offset: end_offset,
            stop,
            cp_applied_seq,
            later_valid_record,
            unpersisted_window_records: 0,
        },
        records: w.records,
        crc_deferred: w.deferred,
    }
}

/// Looks for intact records of `generation` with seq greater than `damaged_seq` anywhere in the
/// log except the damaged position itself. Such a record proves the damage is not a torn final
/// append (or, if its seq is far enough ahead, not a torn group commit). Returns the one with the
/// highest seq as `(offset, seq)`.
pub fn probe_beyond(
    log: &[u8],
    damaged_offset: u64,
    generation: u64,
    damaged_seq: u64,
) -> Option<(u64, u64)> {
    let log_bytes = log.len() as u64;
    let mut best: Option<(u64, u64)> = None;
    let mut at = 0;
    while at + RECORD_HEADER_BYTES as u64 <= log_bytes {
        if at != damaged_offset {
            // The cheap checks first: only a newer record of this generation needs its CRC.
            let newer = check_header(log, at).ok().filter(|h| {
                h.generation == generation
                    && h.seq > damaged_seq
                    && best.is_none_or(|(_, s)| h.seq > s)
            });
            if let Some(h) = newer {
                if check_crc(log, at, &h).is_ok() {
                    best = Some((at, h.seq));
                }
            }
        }
        at += RECORD_ALIGN_BYTES;
    }
    best
}

/// Log offsets, in the `window_bytes` of `log` from `from` on (wrapping at the end), that hold a
/// record header of `generation` with seq >= `next_seq`: records stored and never persisted
/// before a crash (a torn group commit leaves them beyond the log's end). A log continuing in
/// place must blank them before appending: the record it appends with seq `next_seq - 1` could
/// end exactly where one of them starts, and a later scan would accept that never-acknowledged
/// record as its successor. Only the header is looked at (torn payloads included); a slot of free
/// space that merely looks like such a header is blanked too, which costs nothing. Pure.
pub fn unpersisted_leftovers(
    log: &[u8],
    from: u64,
    window_bytes: u64,
    generation: u64,
    next_seq: u64,
) -> Vec<u64> {
    let log_bytes = log.len() as u64;
    if log_bytes == 0 || !from.is_multiple_of(RECORD_ALIGN_BYTES) {
        return Vec::new();
    }
    let mut found = Vec::new();
    let mut walked = 0;
    while walked < window_bytes.min(log_bytes) {
        let at = (from + walked) % log_bytes;
        let slot = &log[at as usize..];
        if slot.len() >= RECORD_HEADER_BYTES {
            let leftover = RecordHeader::decode(slot)
                .is_ok_and(|h| h.generation == generation && h.seq >= next_seq);
            if leftover {
                found.push(at);
            }
        }
        walked += RECORD_ALIGN_BYTES;
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{encode_record, RecordHeader};

    /// Writes records of the given payload sizes into a log of `log_bytes`, wrapping with PAD.
    fn build_log(log_bytes: usize, start: ScanStart, payloads: &[usize]) -> (Vec<u8>, Vec<u64>) {
        let mut log = vec![0u8; log_bytes];
        let mut at = start.tail_offset as usize;
        let mut seq = start.tail_seq;
        let mut offsets = Vec::new();
        for (i, &n) in payloads.iter().enumerate() {
            let payload: Vec<u8> = (0..n).map(|j| (i * 31 + j) as u8).collect();
            let h = RecordHeader {
                kind: RecordKind::Write,
                generation: start.generation,
                seq,
                volume_id: 1,
                offset: i as u64 * 4096,
                length: n as u64,
                payload_bytes: n as u32,
            };
            let bytes = encode_record(&h, &payload);
            if at + bytes.len() > log_bytes {
                let pad = RecordHeader {
                    kind: RecordKind::Pad,
                    generation: start.generation,
                    seq,
                    volume_id: 0,
                    offset: 0,
                    length: (log_bytes - at) as u64,
                    payload_bytes: 0,
                };
                log[at..at + 64].copy_from_slice(&pad.encode(&[]));
                seq += 1;
                at = 0;
                let h = RecordHeader { seq, ..h };
                let bytes = encode_record(&h, &payload);
                log[at..at + bytes.len()].copy_from_slice(&bytes);
                offsets.push(at as u64);
                at += bytes.len();
            } else {
                log[at..at + bytes.len()].copy_from_slice(&bytes);
                offsets.push(at as u64);
                at += bytes.len();
            }
            seq += 1;
        }
        (log, offsets)
    }

    const START: ScanStart = ScanStart {
        tail_offset: 0,
        tail_seq: 10,
        generation: 3,
    };

    #[test]
    fn scan_reads_all_records_and_stops_at_blank() {
        let (log, offsets) = build_log(8192, START, &[100, 0, 4096, 7]);
        let s = scan_log(&log, START);
        assert_eq!(s.records.len(), 4);
        assert_eq!(
            s.records.iter().map(|r| r.log_offset).collect::<Vec<_>>(),
            offsets
        );
        assert_eq!(s.report.stop, StopReason::Blank);
        assert_eq!(s.report.last_seq, 13);
        assert!(!s.report.corrupt_mid_region());
    }

    #[test]
    fn scan_follows_pad_across_wrap() {
        let start = ScanStart {
            tail_offset: 4096 - 128,
            ..START
        };
        let (log, _) = build_log(4096, start, &[1000, 500]);
        let s = scan_log(&log, start);
        let kinds: Vec<RecordKind> = s.records.iter().map(|r| r.header.kind).collect();
        assert_eq!(
            kinds,
            vec![RecordKind::Pad, RecordKind::Write, RecordKind::Write]
        );
        assert_eq!(s.records[1].log_offset, 0);
        assert_eq!(s.report.stop, StopReason::Blank);
        assert_eq!(s.replay_list(0).len(), 2);
        assert_eq!(s.replay_list(11).len(), 1);
    }

    #[test]
    fn torn_record_at_each_length_stops_at_last_valid() {
        let (full, offsets) = build_log(16384, START, &[300, 200, 1000]);
        let last = offsets[2] as usize;
        let end = last + 64 + 1000;
        for cut in last + 1..end {
            // A torn append: the old contents (zeros) remain after `cut`.
            let mut log = full.clone();
            log[cut..end].fill(0);
            let s = scan_log(&log, START);
            assert_eq!(s.records.len(), 2, "cut at {cut}");
            assert_eq!(s.report.stop_offset, offsets[2]);
            assert!(
                !s.report.stop.is_clean_end(),
                "cut at {cut}: {:?}",
                s.report.stop
            );
            assert!(!s.report.corrupt_mid_region());
        }
    }

    #[test]
    fn bit_flip_anywhere_in_header_or_payload_stops_scan_there() {
        let (full, offsets) = build_log(16384, START, &[300, 200, 1000]);
        let victim = offsets[1] as usize;
        for byte in victim..victim + 64 + 200 {
            for bit in [0u8, 3, 7] {
                let mut log = full.clone();
                log[byte] ^= 1 << bit;
                let s = scan_log(&log, START);
                assert_eq!(s.records.len(), 1, "flip at byte {byte} bit {bit}");
                assert_eq!(s.report.stop_offset, offsets[1]);
                assert!(!s.report.stop.is_clean_end());
                assert_eq!(
                    s.report.later_valid_record,
                    Some((offsets[2], 12)),
                    "flip at {byte}"
                );
                assert!(s.report.corrupt_mid_region());
            }
        }
    }

    #[test]
    fn damage_within_the_group_commit_window_is_a_torn_group_not_mid_log_damage() {
        let payloads = vec![100; 80];
        let (full, offsets) = build_log(64 * 1024, START, &payloads);
        let mut log = full.clone();
        // Record seq 12 torn, the records after it (a group never persisted) intact.
        log[offsets[2] as usize + 70] ^= 0x40;
        let mut s = scan_log(&log, START);
        assert_eq!(s.report.last_seq, 11);
        assert_eq!(
            s.report.later_valid_record,
            Some((offsets[79], 89)),
            "the newest later record is reported"
        );
        assert!(s.report.corrupt_mid_region(), "one at a time: damage");
        // 89 - 12 = 77 >= 64: too far ahead to have been unpersisted with seq 12.
        s.report.unpersisted_window_records = UNPERSISTED_MAX_RECORDS;
        assert!(s.report.corrupt_mid_region());
        // Only records within the window after the damage: a torn group.
        let (short, offsets) = build_log(64 * 1024, START, &payloads[..40]);
        let mut log = short.clone();
        log[offsets[2] as usize + 70] ^= 0x40;
        let mut s = scan_log(&log, START);
        assert!(s.report.corrupt_mid_region());
        s.report.unpersisted_window_records = UNPERSISTED_MAX_RECORDS;
        assert!(!s.report.corrupt_mid_region());
    }

    #[test]
    fn leftovers_beyond_the_end_are_found_and_live_or_stale_records_are_not() {
        let (log, offsets) = build_log(16384, START, &[100, 100, 100, 100, 100]);
        // The log ends after seq 11 (offsets[2] is where seq 12 was stored, never persisted).
        let found = unpersisted_leftovers(&log, offsets[2], 16384, START.generation, 12);
        assert_eq!(found, offsets[2..].to_vec());
        // Records older than the end (live or stale) and other generations are left alone.
        assert!(unpersisted_leftovers(&log, 0, 16384, START.generation, 15).is_empty());
        assert!(unpersisted_leftovers(&log, 0, 16384, START.generation + 1, 0).is_empty());
        // The window bounds the search, wrapping at the end of the log.
        let found = unpersisted_leftovers(&log, offsets[3], 16384 - offsets[3], 3, 12);
        assert_eq!(found, offsets[3..].to_vec());
        let found = unpersisted_leftovers(&log, offsets[3], 16384, 3, 12);
        assert_eq!(found, vec![offsets[3], offsets[4], offsets[2]]);
    }

    #[test]
    fn stale_records_from_earlier_lap_end_scan_cleanly() {
        // Old lap: seqs 10..; new lap starts at 0 with seq 20, covering only the first record.
        let (mut log, _) = build_log(16384, START, &[300, 200, 1000]);
        let newer = ScanStart {
            tail_offset: 0,
            tail_seq: 20,
            generation: 3,
        };
        let (fresh, _) = build_log(16384, newer, &[300]);
        log[..384].copy_from_slice(&fresh[..384]);
        let s = scan_log(&log, newer);
        assert_eq!(s.records.len(), 1);
        assert!(matches!(s.report.stop, StopReason::Stale { seq: 11, .. }));
        assert!(s.report.stop.is_clean_end());
    }

    #[test]
    fn old_generation_is_stale_and_newer_generation_is_reported() {
        let (log, _) = build_log(8192, START, &[10]);
        let next_gen = ScanStart {
            generation: 4,
            ..START
        };
        assert!(matches!(
            scan_log(&log, next_gen).report.stop,
            StopReason::Stale { generation: 3, .. }
        ));
        let prev_gen = ScanStart {
            generation: 2,
            ..START
        };
        assert!(matches!(
            scan_log(&log, prev_gen).report.stop,
            StopReason::GenerationAhead { found: 3, .. }
        ));
    }

    #[test]
    fn full_log_scan_terminates() {
        // 4 records of 1024 bytes fill a 4096-byte log exactly.
        let (log, _) = build_log(4096, START, &[960, 960, 960, 960]);
        let s = scan_log(&log, START);
        assert_eq!(s.records.len(), 4);
        assert!(s.report.stop.is_clean_end(), "{:?}", s.report.stop);
    }

    proptest::proptest! {
        /// Arbitrary bytes never make the scan panic, loop, or return a record that fails a check.
        #[test]
        fn scan_of_garbage_is_safe(noise in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4096),
                                   tail in 0u64..5000, seq in 0u64..5, generation in 0u64..3,
                                   keep in 0usize..3) {
            // Mix: a few valid records, then noise over part of them.
            let start = ScanStart { tail_offset: 0, tail_seq: seq, generation };
            let (mut log, _) = build_log(8192, start, &[100, 300, 50][..keep]);
            let at = (tail as usize) % 4096;
            let n = noise.len().min(8192 - at);
            log[at..at + n].copy_from_slice(&noise[..n]);
            let s = scan_log(&log, ScanStart { tail_offset: tail, ..start });
            for r in &s.records {
                let h = check_record(&log, r.log_offset);
                proptest::prop_assert!(h.is_ok());
            }
            proptest::prop_assert!(s.records.len() <= 8192 / 64);
        }
    }

    const SMALL_WINDOW: Option<TailWindow> = Some(TailWindow {
        records: 2,
        bytes: 0,
    });

    #[test]
    fn deferred_scan_finds_a_torn_newest_record_like_a_full_scan() {
        let (full, offsets) = build_log(32768, START, &[300, 200, 1000, 4096, 500]);
        let last = offsets[4] as usize;
        let end = last + 64 + 500;
        for cut in last + 1..end {
            let mut log = full.clone();
            log[cut..end].fill(0);
            let full_scan = scan_log(&log, START);
            let deferred = scan_log_with(&log, START, SMALL_WINDOW);
            assert_eq!(deferred.report, full_scan.report, "cut at {cut}");
            assert_eq!(deferred.records, full_scan.records);
            // Only records older than the checked window are left to the caller.
            assert!(
                deferred.crc_deferred.iter().all(|&i| i + 2 < 5),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn deferred_scan_lists_old_writes_and_their_damage_is_found_by_verify() {
        let (mut log, offsets) = build_log(32768, START, &[300, 200, 1000, 4096, 500]);
        log[offsets[1] as usize + 64 + 7] ^= 0x10;
        let s = scan_log_with(&log, START, SMALL_WINDOW);
        assert_eq!(
            s.records.len(),
            5,
            "payload CRC of old records is not checked"
        );
        assert_eq!(s.crc_deferred, vec![0, 1, 2]);
        assert!(s.report.stop.is_clean_end());
        let bad: Vec<usize> = s
            .crc_deferred
            .iter()
            .copied()
            .filter(|&i| verify_deferred(&log, &s.records[i]).is_err())
            .collect();
        assert_eq!(bad, vec![1]);
        // A full scan stops at the same record and calls it damage in the middle.
        assert!(scan_log(&log, START).report.corrupt_mid_region());
    }

    #[test]
    fn deferred_scan_damage_inside_the_window_ends_the_scan_there() {
        let (mut log, offsets) = build_log(32768, START, &[300, 200, 1000, 4096, 500]);
        log[offsets[3] as usize + 64 + 100] ^= 1;
        let s = scan_log_with(&log, START, SMALL_WINDOW);
        let full = scan_log(&log, START);
        assert_eq!(s.report, full.report);
        assert_eq!(s.records.len(), 3);
        assert!(s.report.corrupt_mid_region());
        assert_eq!(s.crc_deferred, vec![0, 1, 2]);
    }

    #[test]
    fn tail_outside_log_is_reported() {
        let log = vec![0u8; 4096];
        let s = scan_log(
            &log,
            ScanStart {
                tail_offset: 9000,
                ..START
            },
        );
        assert_eq!(s.report.stop, StopReason::BadTail);
        assert!(s.records.is_empty());
    }
}
