//! Restoring a lost own log from the partner's copy (NVRAM-loss recovery in a pair).
//!
//! The partner keeps a copy of this node's unretired records at the same log offsets as in the
//! own log (see `PartnerRegion::receive`). After a start found its own log missing or blank
//! ([`crate::loss`]), the node fetches that copy over the interconnect as a [`FetchedLog`],
//! checks it completely with [`check_fetched`] (pure: store id, volume, generation, seq and
//! offset continuity, CRC of every record, and that it covers every seq the store lacks), and
//! only then writes it into its blank own region with [`restore_into`]. The normal recovery then
//! replays it as if the records had never left. Nothing is written when any check fails.

use crate::error::JournalError;
use crate::format::{RecordHeader, RecordKind, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES};
use crate::nvram::Region;
use crate::scan::{scan_log, ScanStart};
use crate::volume::UnretiredRecord;

/// The partner's copy of one volume's own log, as fetched.
#[derive(Debug, Clone, Default)]
pub struct FetchedLog {
    /// The store the copy is bound to (all zero: the partner has no copy of this volume).
    pub store_id: [u8; 16],
    /// The generation of the copied log's records.
    pub generation: u64,
    /// Where the copy's live log starts (offset in the log, and the seq there).
    pub tail_offset: u64,
    pub tail_seq: u64,
    /// The newest seq of the copy (`tail_seq - 1` when it holds no record).
    pub last_seq: u64,
    /// The records in seq order, each as its bytes in the log (header and padded payload; a PAD
    /// as its header alone).
    pub records: Vec<UnretiredRecord>,
}

/// Why a fetched copy is refused (nothing of it is stored).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchRefusal {
    #[error("the partner holds no copy of this volume's log")]
    NoCopy,
    #[error("the partner's copy belongs to store {copy}, this volume's store is {ours}")]
    WrongStore { copy: String, ours: String },
    #[error("the partner's copy starts at seq {tail_seq}, but the store lacks every seq from {from_seq}: records {from_seq}..{tail_seq} are missing")]
    DoesNotCover { tail_seq: u64, from_seq: u64 },
    #[error("the partner's copy ends at seq {last_seq}, before its own tail {tail_seq}")]
    BadRange { tail_seq: u64, last_seq: u64 },
    #[error("gap in the fetched records: expected seq {expected}, got {found}")]
    Gap { expected: u64, found: u64 },
    #[error("fetched record seq {seq} at log offset {log_offset}: {detail}")]
    BadRecord {
        seq: u64,
        log_offset: u64,
        detail: String,
    },
    #[error("the fetched records end at seq {got}, the copy announced {last_seq}")]
    Incomplete { got: u64, last_seq: u64 },
    #[error("the fetched log does not scan back whole: {detail}")]
    DoesNotScan { detail: String },
}

/// What [`check_fetched`] compares the copy against.
#[derive(Debug, Clone, Copy)]
pub struct RestoreTarget {
    /// The store of this volume (the array's UUID).
    pub store_id: [u8; 16],
    pub volume_id: u64,
    /// Bytes of the own log (the copy has the same size).
    pub log_bytes: u64,
    /// The first seq the store lacks (`applied_seq + 1`).
    pub from_seq: u64,
}

fn id_text(id: &[u8; 16]) -> String {
    uuid::Uuid::from_bytes(*id).to_string()
}

/// Checks one fetched record against its expected seq and offset; returns where the next one
/// starts. Pure.
pub fn check_fetched_record(
    target: &RestoreTarget,
    generation: u64,
    expected_seq: u64,
    expected_offset: u64,
    r: &UnretiredRecord,
) -> Result<u64, FetchRefusal> {
    if r.seq != expected_seq {
        return Err(FetchRefusal::Gap {
            expected: expected_seq,
            found: r.seq,
        });
    }
    let bad = |detail: String| FetchRefusal::BadRecord {
        seq: r.seq,
        log_offset: r.log_offset,
        detail,
    };
    if r.log_offset != expected_offset {
        return Err(bad(format!(
            "expected at log offset {expected_offset} (right after the previous record)"
        )));
    }
    let len = r.bytes.len() as u64;
    if len < RECORD_HEADER_BYTES as u64
        || !len.is_multiple_of(RECORD_ALIGN_BYTES)
        || r.log_offset
            .checked_add(len)
            .is_none_or(|e| e > target.log_bytes)
    {
        return Err(bad(format!(
            "{len} bytes do not fit a log of {} bytes",
            target.log_bytes
        )));
    }
    let h = RecordHeader::decode(&r.bytes).map_err(|e| bad(e.to_string()))?;
    if h.seq != r.seq {
        return Err(bad(format!("header says seq {}", h.seq)));
    }
    if h.generation != generation {
        return Err(bad(format!(
            "generation {}, the copy's is {generation}",
            h.generation
        )));
    }
    if h.kind != RecordKind::Pad && h.volume_id != target.volume_id {
        return Err(bad(format!(
            "belongs to volume {}, not {}",
            h.volume_id, target.volume_id
        )));
    }
    let total = h.total_bytes();
    let payload_end = RECORD_HEADER_BYTES as u64 + u64::from(h.payload_bytes);
    let body = if h.kind == RecordKind::Pad {
        RECORD_HEADER_BYTES as u64
    } else {
        total
    };
    if payload_end > len || len < body || r.log_offset + total > target.log_bytes {
        return Err(bad(format!("{len} bytes, the header needs {total}")));
    }
    RecordHeader::verify_crc(
        &r.bytes,
        &r.bytes[RECORD_HEADER_BYTES..payload_end as usize],
    )
    .map_err(|e| bad(e.to_string()))?;
    let next = r.log_offset + total;
    Ok(if next == target.log_bytes { 0 } else { next })
}

/// Checks a whole fetched copy before anything is written. Pure.
pub fn check_fetched(target: &RestoreTarget, log: &FetchedLog) -> Result<(), FetchRefusal> {
    if log.store_id == [0; 16] {
        return Err(FetchRefusal::NoCopy);
    }
    if log.store_id != target.store_id {
        return Err(FetchRefusal::WrongStore {
            copy: id_text(&log.store_id),
            ours: id_text(&target.store_id),
        });
    }
    if log.last_seq.checked_add(1).is_none_or(|n| n < log.tail_seq) {
        return Err(FetchRefusal::BadRange {
            tail_seq: log.tail_seq,
            last_seq: log.last_seq,
        });
    }
    if log.tail_seq > target.from_seq {
        return Err(FetchRefusal::DoesNotCover {
            tail_seq: log.tail_seq,
            from_seq: target.from_seq,
        });
    }
    let mut seq = log.tail_seq;
    let mut at = log.tail_offset;
    for r in &log.records {
        at = check_fetched_record(target, log.generation, seq, at, r)?;
        seq += 1;
    }
    if seq != log.last_seq + 1 {
        return Err(FetchRefusal::Incomplete {
            got: seq - 1,
            last_seq: log.last_seq,
        });
    }
    // The same walk recovery will make, over the log image the records form.
    let mut image = vec![0u8; target.log_bytes as usize];
    for r in &log.records {
        let at = r.log_offset as usize;
        image[at..at + r.bytes.len()].copy_from_slice(&r.bytes);
    }
    let scan = scan_log(&image, start_of(log));
    if scan.records.len() != log.records.len() || !scan.report.stop.is_clean_end() {
        return Err(FetchRefusal::DoesNotScan {
            detail: format!(
                "{} of {} records, stopped at {}",
                scan.records.len(),
                log.records.len(),
                scan.report.stop.describe()
            ),
        });
    }
    Ok(())
}

fn start_of(log: &FetchedLog) -> ScanStart {
    ScanStart {
        tail_offset: log.tail_offset,
        tail_seq: log.tail_seq,
        generation: log.generation,
    }
}

/// Writes a checked copy into the blank own region: the records at their offsets, then a control
/// slot with the copy's tail and generation, bound to the store. The caller re-opens the NVRAM
/// file afterwards, so its generation moves past the restored one.
pub fn restore_into(
    region: &mut Region,
    target: &RestoreTarget,
    log: &FetchedLog,
) -> Result<(), JournalError> {
    if region.control().is_some() {
        return Err(JournalError::Config(
            "refusing to restore the partner's copy over an own log that is in use".into(),
        ));
    }
    if region.log_bytes() != target.log_bytes {
        return Err(JournalError::Config(format!(
            "own log is {} bytes, the copy {} bytes",
            region.log_bytes(),
            target.log_bytes
        )));
    }
    check_fetched(target, log).map_err(|e| JournalError::Config(e.to_string()))?;
    for r in &log.records {
        region.write_log(r.log_offset, &r.bytes);
        region.persist_log(r.log_offset, r.bytes.len() as u64)?;
    }
    region.write_control(log.generation, log.tail_offset, log.tail_seq)?;
    region.bind_store(target.store_id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_record;
    use bytes::Bytes;

    const LOG: u64 = 64 * 1024;
    const STORE: [u8; 16] = [5; 16];

    fn target(from_seq: u64) -> RestoreTarget {
        RestoreTarget {
            store_id: STORE,
            volume_id: 9,
            log_bytes: LOG,
            from_seq,
        }
    }

    /// Three WRITE records of generation 4, seqs 10..=12, from log offset 128.
    fn copy() -> FetchedLog {
        let mut records = Vec::new();
        let mut at = 128;
        for seq in 10..=12u64 {
            let payload = vec![seq as u8; 100];
            let h = RecordHeader {
                kind: RecordKind::Write,
                generation: 4,
                seq,
                volume_id: 9,
                offset: seq * 4096,
                length: 100,
                payload_bytes: 100,
            };
            let bytes = encode_record(&h, &payload);
            let len = bytes.len() as u64;
            records.push(UnretiredRecord {
                log_offset: at,
                seq,
                bytes: Bytes::from(bytes),
            });
            at += len;
        }
        FetchedLog {
            store_id: STORE,
            generation: 4,
            tail_offset: 128,
            tail_seq: 10,
            last_seq: 12,
            records,
        }
    }

    #[test]
    fn whole_copy_covering_the_lost_seqs_is_accepted() {
        assert_eq!(check_fetched(&target(10), &copy()), Ok(()));
        assert_eq!(check_fetched(&target(12), &copy()), Ok(()));
        assert_eq!(check_fetched(&target(13), &copy()), Ok(()));
    }

    #[test]
    fn copy_with_a_gap_is_refused() {
        let mut c = copy();
        c.records.remove(1);
        assert!(matches!(
            check_fetched(&target(10), &c),
            Err(FetchRefusal::Gap {
                expected: 11,
                found: 12
            })
        ));
    }

    #[test]
    fn copy_with_a_bad_crc_is_refused() {
        let mut c = copy();
        let mut b = c.records[2].bytes.to_vec();
        b[80] ^= 1;
        c.records[2].bytes = Bytes::from(b);
        let e = check_fetched(&target(10), &c).unwrap_err();
        assert!(matches!(e, FetchRefusal::BadRecord { seq: 12, .. }), "{e}");
        assert!(e.to_string().contains("CRC"), "{e}");
    }

    #[test]
    fn copy_of_another_store_is_refused() {
        let mut c = copy();
        c.store_id = [6; 16];
        assert!(matches!(
            check_fetched(&target(10), &c),
            Err(FetchRefusal::WrongStore { .. })
        ));
        c.store_id = [0; 16];
        assert_eq!(check_fetched(&target(10), &c), Err(FetchRefusal::NoCopy));
    }

    #[test]
    fn copy_starting_after_the_first_lost_seq_is_refused() {
        assert_eq!(
            check_fetched(&target(9), &copy()),
            Err(FetchRefusal::DoesNotCover {
                tail_seq: 10,
                from_seq: 9
            })
        );
    }

    #[test]
    fn copy_missing_announced_records_is_refused() {
        let mut c = copy();
        c.records.pop();
        assert_eq!(
            check_fetched(&target(10), &c),
            Err(FetchRefusal::Incomplete {
                got: 11,
                last_seq: 12
            })
        );
    }

    #[test]
    fn record_of_another_volume_or_generation_is_refused() {
        for (volume, generation) in [(8, 4), (9, 5)] {
            let mut c = copy();
            let h = RecordHeader {
                kind: RecordKind::Write,
                generation,
                seq: 11,
                volume_id: volume,
                offset: 0,
                length: 100,
                payload_bytes: 100,
            };
            c.records[1].bytes = Bytes::from(encode_record(&h, &[1; 100]));
            assert!(matches!(
                check_fetched(&target(10), &c),
                Err(FetchRefusal::BadRecord { seq: 11, .. })
            ));
        }
    }
}
