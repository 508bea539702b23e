//! The recent write events of one read-cache shard: which blocks each write that began or ended
//! lately covers, by the shard generation it took.
//!
//! Why: a shard's generation says only *that* some write began or ended since a fill (or
//! another write) started, not *where*. Deciding on the generation alone dropped every fill and
//! every write's install that overlapped in time with any other write of the shard, and with
//! 16 shards every write of 64 KiB or more touches all of them: eight concurrent 1 MiB writes
//! (a sequential writer, a consistency point's write-back) left next to nothing cached, so the
//! first pass of reads after them went to the disks. With the blocks of each event known, only
//! a fill or install that overlaps another write's blocks is given up; the ordering argument of
//! [`super`] is unchanged, applied per block range instead of per shard.
//!
//! The log keeps the last [`WRITE_LOG_EVENTS`] events; when the events since a generation are
//! no longer all there, the answer is "touched" (the old, safe answer: a later miss).

use std::collections::VecDeque;

/// Events (write begins and ends) remembered per shard.
pub const WRITE_LOG_EVENTS: usize = 64;

/// Blocks `first..=last`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpan {
    pub first: u64,
    pub last: u64,
}

impl BlockSpan {
    fn overlaps(&self, other: &BlockSpan) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    /// The smallest span holding both.
    pub fn union(self, other: BlockSpan) -> BlockSpan {
        BlockSpan {
            first: self.first.min(other.first),
            last: self.last.max(other.last),
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Event {
    gen: u64,
    span: BlockSpan,
}

/// The shard's last events, oldest first. Each event took the next generation, so the
/// generations held are consecutive.
#[derive(Debug, Default)]
pub struct WriteLog {
    events: VecDeque<Event>,
}

impl WriteLog {
    /// Records that the write covering `span` began or ended, taking generation `gen` (one more
    /// than the previous event's).
    pub fn record(&mut self, gen: u64, span: BlockSpan) {
        if self.events.len() == WRITE_LOG_EVENTS {
            self.events.pop_front();
        }
        self.events.push_back(Event { gen, span });
    }

    /// Whether an event after generation `since`, up to the shard's current generation `now`,
    /// covers any block of `span`; also true when the log no longer holds every event after
    /// `since`.
    pub fn touched_since(&self, since: u64, now: u64, span: BlockSpan) -> bool {
        if now == since {
            return false;
        }
        match (self.events.front(), self.events.back()) {
            (Some(oldest), Some(newest)) if oldest.gen <= since + 1 && newest.gen == now => {}
            _ => return true,
        }
        self.events
            .iter()
            .rev()
            .take_while(|e| e.gen > since)
            .any(|e| e.span.overlaps(&span))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(first: u64, last: u64) -> BlockSpan {
        BlockSpan { first, last }
    }

    #[test]
    fn nothing_since_is_untouched() {
        let log = WriteLog::default();
        assert!(!log.touched_since(5, 5, span(0, 10)));
    }

    #[test]
    fn only_overlapping_events_after_since_count() {
        let mut log = WriteLog::default();
        log.record(1, span(0, 3));
        log.record(2, span(16, 31));
        log.record(3, span(100, 100));
        assert!(
            !log.touched_since(1, 3, span(0, 15)),
            "event 1 is not after 1"
        );
        assert!(log.touched_since(0, 3, span(3, 3)));
        assert!(log.touched_since(1, 3, span(31, 40)));
        assert!(!log.touched_since(1, 3, span(32, 99)));
        assert!(log.touched_since(2, 3, span(100, 100)));
    }

    #[test]
    fn events_fallen_out_of_the_log_count_as_touched() {
        let mut log = WriteLog::default();
        for g in 1..=(WRITE_LOG_EVENTS as u64 + 1) {
            log.record(g, span(1000, 1000));
        }
        // Event 1 is gone: the log cannot say what it touched.
        assert!(log.touched_since(0, WRITE_LOG_EVENTS as u64 + 1, span(0, 0)));
        assert!(!log.touched_since(1, WRITE_LOG_EVENTS as u64 + 1, span(0, 0)));
    }

    #[test]
    fn a_generation_the_log_never_saw_counts_as_touched() {
        let mut log = WriteLog::default();
        log.record(1, span(0, 0));
        // The shard is at generation 2 but the log ends at 1: be safe.
        assert!(log.touched_since(0, 2, span(50, 50)));
    }

    #[test]
    fn union_covers_both() {
        assert_eq!(span(4, 6).union(span(1, 2)), span(1, 6));
    }
}
