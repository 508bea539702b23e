//! What recovery makes persistent before it trusts a log that a crashed process left behind.
//!
//! A process killed between storing into the NVRAM mapping and persisting what it stored leaves
//! those bytes where only the host's power keeps them: dirty pages of the page cache (`msync`
//! mode) or dirty lines of the CPU caches (`pmem` mode). The next process reads them like any
//! other byte, so recovery accepts such a record (or a control slot that moved the tail), serves
//! it and appends acknowledged records after it. A power cut before the kernel or the CPU writes
//! them back on its own could then tear the record under newer acknowledged ones, and the scan
//! after that cut would end the log there, losing everything acknowledged after it. So recovery
//! persists, right after the scan and before anything is done with what it found, every byte the
//! scan trusted: the region's control area (tail) and the log from the tail through the header
//! that ended the scan.
//!
//! The ranges differ per mode because the costs do. `msync` writes back only dirty pages, so the
//! whole region costs one walk of its page tables (nothing is written after a clean stop) and
//! also covers any leftovers of a torn group commit. The cache-line write-back of `pmem` mode
//! costs an instruction per 64-byte line whether or not the line is dirty, and touching a page
//! the scan never read would map it, so it covers the part the scan read and no more. `none`
//! mode persists nothing ever. Pure: [`crash_write_back_ranges`] only computes the ranges.

use crate::format::{CONTROL_AREA_BYTES, RECORD_HEADER_BYTES};
use crate::pmem::PersistMethod;
use crate::scan::{ScanReport, StopReason};

/// Byte ranges `(offset, len)` of a region (offsets from the start of the region: the control
/// area, then the log at [`CONTROL_AREA_BYTES`]) to persist after the scan in `report`, for a
/// region whose log is `log_bytes` long and persisted by `method`.
pub fn crash_write_back_ranges(
    method: PersistMethod,
    report: &ScanReport,
    log_bytes: u64,
) -> Vec<(u64, u64)> {
    let whole = vec![(0, CONTROL_AREA_BYTES + log_bytes)];
    match method {
        PersistMethod::Nothing => Vec::new(),
        PersistMethod::Msync => whole,
        PersistMethod::Clwb | PersistMethod::ClflushOpt | PersistMethod::Clflush => {
            let tail = report.start.tail_offset;
            if log_bytes == 0
                || tail >= log_bytes
                || matches!(report.stop, StopReason::LogExhausted | StopReason::BadTail)
            {
                // The whole log was read (or the tail cannot be trusted to bound it).
                return whole;
            }
            let stop = report.stop_offset.min(log_bytes);
            let end = (stop + RECORD_HEADER_BYTES as u64).min(log_bytes);
            let mut out = vec![(0, CONTROL_AREA_BYTES)];
            let log = |at: u64, len: u64| (CONTROL_AREA_BYTES + at, len);
            if stop >= tail {
                out.push(log(tail, end - tail));
            } else {
                // The scan wrapped past the log's end: tail..end of log, then 0..the stop header.
                out.push(log(tail, log_bytes - tail));
                out.push(log(0, end));
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scan::ScanStart;

    const LOG: u64 = 1 << 20;
    const H: u64 = RECORD_HEADER_BYTES as u64;
    const C: u64 = CONTROL_AREA_BYTES;

    fn report(tail: u64, stop_offset: u64, stop: StopReason) -> ScanReport {
        ScanReport {
            start: ScanStart {
                tail_offset: tail,
                tail_seq: 1,
                generation: 1,
            },
            records_valid: 1,
            last_seq: 1,
            end_offset: stop_offset,
            stop_offset,
            stop,
            cp_applied_seq: None,
            later_valid_record: None,
            unpersisted_window_records: 0,
        }
    }

    #[test]
    fn none_mode_persists_nothing_and_msync_the_whole_region() {
        let r = report(4096, 8192, StopReason::Blank);
        assert!(crash_write_back_ranges(PersistMethod::Nothing, &r, LOG).is_empty());
        assert_eq!(
            crash_write_back_ranges(PersistMethod::Msync, &r, LOG),
            vec![(0, C + LOG)]
        );
    }

    #[test]
    fn pmem_covers_control_area_and_log_from_tail_through_the_stopping_header() {
        let r = report(4096, 8192, StopReason::Blank);
        assert_eq!(
            crash_write_back_ranges(PersistMethod::Clwb, &r, LOG),
            vec![(0, C), (C + 4096, 4096 + H)]
        );
    }

    #[test]
    fn pmem_covers_both_pieces_of_a_scan_that_wrapped() {
        let r = report(
            LOG - 8192,
            128,
            StopReason::BadCrc {
                stored: 1,
                computed: 2,
            },
        );
        assert_eq!(
            crash_write_back_ranges(PersistMethod::ClflushOpt, &r, LOG),
            vec![(0, C), (C + LOG - 8192, 8192), (C, 128 + H)]
        );
    }

    #[test]
    fn pmem_covers_the_whole_region_when_the_scan_read_all_of_it_or_the_tail_is_bad() {
        for r in [
            report(4096, 4096, StopReason::LogExhausted),
            report(4096, 0, StopReason::BadTail),
            report(LOG + 64, 0, StopReason::Blank),
        ] {
            assert_eq!(
                crash_write_back_ranges(PersistMethod::Clflush, &r, LOG),
                vec![(0, C + LOG)],
                "{r:?}"
            );
        }
    }

    #[test]
    fn pmem_stop_header_at_the_end_of_the_log_stays_inside_it() {
        let r = report(0, LOG - H / 2, StopReason::Blank);
        assert_eq!(
            crash_write_back_ranges(PersistMethod::Clwb, &r, LOG),
            vec![(0, C), (C, LOG)]
        );
    }
}
