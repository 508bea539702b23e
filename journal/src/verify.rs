//! The CRC checks recovery leaves for after the volume is serving.
//!
//! Recovery at open scans the log with [`crate::scan::scan_log_deferred`]: every record's
//! structure, seq chain and generation are checked, and the CRC of every record except the
//! payload-carrying WRITE records older than the newest few (the newest are checked: only they
//! can be torn by a crash). Checking the CRC of the whole log before serving would cost as much
//! as the rest of recovery together (it reads every payload byte), so it is done here, after the
//! volume serves, with two rules that keep a damaged record from ever being used:
//!
//! - a read that needs bytes of a record not checked yet checks that record first
//!   ([`Unverified::containing`]), and
//! - no CP runs before every record is checked (a CP writes payloads to the store).
//!
//! Meanwhile a background task checks the records in log order, a bounded chunk at a time
//! ([`Unverified::verify_chunk`]). A failed check is media damage in the middle of the log
//! (the same finding that makes a full scan refuse to open): the volume then refuses all I/O
//! with [`crate::JournalError::CorruptRecordFound`] and applies nothing.
//!
//! The records being checked cannot change underneath: they lie between the log's tail and the
//! head at open, new records go after the head, and only a CP (which waits for the check) frees
//! that space.

use crate::nvram::Region;
use crate::scan::{verify_deferred, ScannedRecord};

/// WRITE records whose CRC is not checked yet, in log order, and how far the check got.
#[derive(Debug)]
pub struct Unverified {
    /// Log offset where the records start (the log's tail at open): offsets are compared by
    /// their distance from here, since the log wraps.
    tail: u64,
    log_bytes: u64,
    records: Vec<ScannedRecord>,
    /// `records[..next]` are checked.
    next: usize,
}

/// A record whose CRC check failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DamagedRecord {
    pub log_offset: u64,
    pub seq: u64,
}

impl Unverified {
    /// `None` when there is nothing to check.
    pub fn new(tail: u64, log_bytes: u64, records: Vec<ScannedRecord>) -> Option<Unverified> {
        (!records.is_empty()).then_some(Unverified {
            tail,
            log_bytes,
            records,
            next: 0,
        })
    }

    /// Records not checked yet.
    pub fn remaining(&self) -> u64 {
        (self.records.len() - self.next) as u64
    }

    fn distance(&self, log_offset: u64) -> u64 {
        (log_offset + self.log_bytes - self.tail) % self.log_bytes
    }

    /// The unchecked record holding log byte `log_offset`, if any.
    pub fn containing(&self, log_offset: u64) -> Option<ScannedRecord> {
        let rest = &self.records[self.next..];
        let d = self.distance(log_offset);
        let i = rest.partition_point(|r| self.distance(r.log_offset) <= d);
        let r = *rest.get(i.checked_sub(1)?)?;
        (d < self.distance(r.log_offset) + r.header.total_bytes()).then_some(r)
    }

    /// Checks one record now (for a read about to use it).
    pub fn verify_record(region: &Region, r: &ScannedRecord) -> Result<(), DamagedRecord> {
        verify_deferred(region.log(), r).map_err(|_| DamagedRecord {
            log_offset: r.log_offset,
            seq: r.header.seq,
        })
    }

    /// Checks the next records in log order, about `max_bytes` of them; `Ok(true)` when all
    /// are checked.
    pub fn verify_chunk(&mut self, region: &Region, max_bytes: u64) -> Result<bool, DamagedRecord> {
        let mut bytes = 0;
        while self.next < self.records.len() && bytes < max_bytes {
            let r = self.records[self.next];
            Self::verify_record(region, &r)?;
            bytes += r.header.total_bytes();
            self.next += 1;
        }
        Ok(self.next == self.records.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{RecordHeader, RecordKind};

    fn rec(log_offset: u64, payload: u32) -> ScannedRecord {
        ScannedRecord {
            log_offset,
            header: RecordHeader {
                kind: RecordKind::Write,
                generation: 1,
                seq: log_offset,
                volume_id: 1,
                offset: 0,
                length: u64::from(payload),
                payload_bytes: payload,
            },
        }
    }

    #[test]
    fn containing_finds_the_record_across_the_wrap() {
        // A 10 KiB log whose tail is at 8192: records at 8192 (1 KiB + header), then 0, 2048.
        let u = Unverified::new(
            8192,
            10240,
            vec![rec(8192, 960), rec(0, 960), rec(2048, 960)],
        )
        .unwrap();
        assert_eq!(u.containing(8192 + 70).map(|r| r.log_offset), Some(8192));
        assert_eq!(u.containing(100).map(|r| r.log_offset), Some(0));
        assert_eq!(u.containing(2048 + 1023).map(|r| r.log_offset), Some(2048));
        assert_eq!(u.containing(1500), None, "between records");
        assert_eq!(u.containing(4096), None, "after the last record");
    }

    #[test]
    fn checked_records_are_no_longer_found() {
        let mut u = Unverified::new(0, 1 << 20, vec![rec(0, 960), rec(1024, 960)]).unwrap();
        u.next = 1;
        assert_eq!(u.containing(100), None);
        assert_eq!(u.containing(1100).map(|r| r.log_offset), Some(1024));
        assert_eq!(u.remaining(), 1);
    }
}
