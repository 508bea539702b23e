//! Mapping the log's pages in parallel while recovery walks it.
//!
//! The recovery scan reads every record header; with 4 KiB records that is every page of the
//! log, and for a freshly started process each page costs a page fault (the kernel maps it,
//! a few hundred nanoseconds, most of the scan's time for a full log). The walk itself is
//! sequential (each header gives the next record's offset), but mapping pages is not: helper
//! threads touch the pages ahead of the walker, in log order from the tail, taking chunks from a
//! shared counter, and stop as soon as the walk is over (a young log is not mapped in full).
//! The pages stay mapped for the reads and the CP that follow.
//!
//! Only reads through a shared `&[u8]`: no `unsafe`, nothing changes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Bytes a helper maps per step (then checks whether the walk is over).
const PREFAULT_CHUNK_BYTES: u64 = 1 << 20;
/// Most helper threads (the walker is one more).
const PREFAULT_MAX_HELPERS: usize = 3;
/// Page size assumed for touching (a smaller real page only means fewer pages touched early).
const PAGE_BYTES: usize = 4096;
/// Logs smaller than this are walked without helpers (threads cost more than they save).
const PREFAULT_MIN_LOG_BYTES: u64 = 16 << 20;

/// Runs `walk` while helper threads touch the pages of `log` in order from `from` (wrapping).
pub fn while_walking<T: Send>(log: &[u8], from: u64, walk: impl FnOnce() -> T + Send) -> T {
    let log_bytes = log.len() as u64;
    let helpers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(PREFAULT_MAX_HELPERS);
    if log_bytes < PREFAULT_MIN_LOG_BYTES || from >= log_bytes {
        return walk();
    }
    let done = AtomicBool::new(false);
    let next = AtomicU64::new(0);
    std::thread::scope(|s| {
        for _ in 0..helpers {
            s.spawn(|| touch_chunks(log, from, &next, &done));
        }
        let out = walk();
        done.store(true, Ordering::Relaxed);
        out
    })
}

/// One helper: takes the next chunk (by distance from `from`) until the log is covered or the
/// walk is over, reading one byte of every page.
fn touch_chunks(log: &[u8], from: u64, next: &AtomicU64, done: &AtomicBool) {
    let log_bytes = log.len() as u64;
    while !done.load(Ordering::Relaxed) {
        let d = next.fetch_add(PREFAULT_CHUNK_BYTES, Ordering::Relaxed);
        if d >= log_bytes {
            return;
        }
        let start = ((from + d) % log_bytes) as usize;
        let end = (start as u64 + PREFAULT_CHUNK_BYTES.min(log_bytes - d)).min(log_bytes) as usize;
        let mut sum = 0u8;
        for at in (start..end).step_by(PAGE_BYTES) {
            sum = sum.wrapping_add(log[at]);
        }
        std::hint::black_box(sum);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn walk_result_is_returned_with_and_without_helpers() {
        let small = vec![1u8; 4096];
        assert_eq!(while_walking(&small, 0, || 7), 7);
        let big = vec![1u8; PREFAULT_MIN_LOG_BYTES as usize + 4096];
        assert_eq!(while_walking(&big, 8192, || 9), 9);
        assert_eq!(
            while_walking(&big, u64::MAX, || 3),
            3,
            "tail outside: no helpers"
        );
    }
}
