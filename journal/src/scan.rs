//! Scanning a region's circular log: the pure half of recovery.
//!
//! [`scan_log`] walks the log from its tail (given by the region's control slot) and accepts
//! records while each one is intact and is the expected successor: right magic and kind, CRC32C
//! over header and payload matching, the region's generation, seq exactly one more than the
//! previous record, and it ends inside the log. The first record that fails any check ends the
//! scan; it is *reported* in the [`ScanReport`] (reason and log offset), never returned for apply.
//!
//! Records are appended and persisted strictly in seq order under one lock, so a crash can tear
//! only the newest record: a scan that stops at a torn or stale record has found the true end of
//! the log. A stop followed by intact newer records of the same generation (found by
//! [`probe_beyond`]) means damage in the middle of the log, which the caller treats as an error.

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
    /// An intact newer record of the same generation found after a damaged stop: `(offset, seq)`.
    pub later_valid_record: Option<(u64, u64)>,
}

impl ScanReport {
    /// True when the scan ended on damage with intact newer records after it.
    pub fn corrupt_mid_region(&self) -> bool {
        !self.stop.is_clean_end() && self.later_valid_record.is_some()
    }
}

/// The result of a scan: intact records in log order, and the report.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Scan {
    pub records: Vec<ScannedRecord>,
    pub report: ScanReport,
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

/// Checks the record at `at` of `log`; returns its header or the reason it is not acceptable.
/// Does not check seq/generation ordering.
fn check_record(log: &[u8], at: u64) -> Result<RecordHeader, StopReason> {
    let log_bytes = log.len() as u64;
    let at_us = at as usize;
    if at + RECORD_HEADER_BYTES as u64 > log_bytes {
        return Err(StopReason::BadLength {
            total_bytes: RECORD_HEADER_BYTES as u64,
        });
    }
    let header = match RecordHeader::decode(&log[at_us..]) {
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
    let payload_start = at_us + RECORD_HEADER_BYTES;
    let payload = &log[payload_start..payload_start + header.payload_bytes as usize];
    if let Err(FormatError::BadCrc {
        stored, computed, ..
    }) = RecordHeader::verify_crc(&log[at_us..], payload)
    {
        return Err(StopReason::BadCrc { stored, computed });
    }
    Ok(header)
}

/// Walks `log` (the circular log bytes of one region) from `start`. Pure.
pub fn scan_log(log: &[u8], start: ScanStart) -> Scan {
    let log_bytes = log.len() as u64;
    let mut records = Vec::new();
    let mut at = start.tail_offset;
    let mut expected_seq = start.tail_seq;
    let mut walked: u64 = 0;
    let mut cp_applied_seq = None;
    let stop = loop {
        if at >= log_bytes || !at.is_multiple_of(RECORD_ALIGN_BYTES) {
            break StopReason::BadTail;
        }
        if walked >= log_bytes {
            break StopReason::LogExhausted;
        }
        let header = match check_record(log, at) {
            Ok(h) => h,
            Err(reason) => break reason,
        };
        if header.generation < start.generation || header.seq < expected_seq {
            break StopReason::Stale {
                seq: header.seq,
                generation: header.generation,
            };
        }
        if header.generation > start.generation {
            break StopReason::GenerationAhead {
                expected: start.generation,
                found: header.generation,
            };
        }
        if header.seq != expected_seq {
            break StopReason::UnexpectedSeq {
                expected: expected_seq,
                found: header.seq,
            };
        }
        if header.kind == RecordKind::Pad && at + header.length != log_bytes {
            break StopReason::BadLength {
                total_bytes: header.length,
            };
        }
        if header.kind == RecordKind::Cp {
            let p = &log[at as usize + RECORD_HEADER_BYTES..][..header.payload_bytes as usize];
            match CpPayload::decode(p) {
                Ok(cp) => {
                    cp_applied_seq = Some(cp_applied_seq.unwrap_or(0).max(cp.applied_seq));
                }
                Err(_) => {
                    break StopReason::BadLength {
                        total_bytes: header.total_bytes(),
                    }
                }
            }
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
    let end_offset = if at >= log_bytes { 0 } else { at };
    let later_valid_record = if stop.is_clean_end() || stop == StopReason::BadTail {
        None
    } else {
        probe_beyond(log, end_offset, start.generation, expected_seq)
    };
    Scan {
        report: ScanReport {
            start,
            records_valid: records.len() as u64,
            last_seq: expected_seq.wrapping_sub(1),
            end_offset,
            stop_offset: end_offset,
            stop,
            cp_applied_seq,
            later_valid_record,
        },
        records,
    }
}

/// Looks for any intact record of `generation` with seq greater than `damaged_seq` anywhere in
/// the log except the damaged position itself. Such a record proves the damage is not a torn
/// final append. Returns the first found as `(offset, seq)`.
pub fn probe_beyond(
    log: &[u8],
    damaged_offset: u64,
    generation: u64,
    damaged_seq: u64,
) -> Option<(u64, u64)> {
    let log_bytes = log.len() as u64;
    let mut at = 0;
    while at + RECORD_HEADER_BYTES as u64 <= log_bytes {
        if at != damaged_offset {
            if let Ok(h) = check_record(log, at) {
                if h.generation == generation && h.seq > damaged_seq {
                    return Some((at, h.seq));
                }
            }
        }
        at += RECORD_ALIGN_BYTES;
    }
    None
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
