//! Space accounting of a circular log: where the next record goes, when a PAD is needed to wrap,
//! and how much is free. Pure; the bytes themselves are written by the caller.
//!
//! The live part of the log is the circular byte range `[tail, head)` holding `used` bytes.
//! Appends go at `head`; a record never straddles the end of the log: when it does not fit before
//! the end, a PAD record fills the rest and the record goes to offset 0. Consistency points move
//! `tail` forward (to the head observed when the CP started).

use crate::format::RECORD_HEADER_BYTES;

/// Where an append goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// A PAD record of this many bytes at the current head, before the record.
    pub pad_bytes: Option<u64>,
    /// Log offset of the record.
    pub at: u64,
    /// Bytes consumed, PAD included.
    pub consumed: u64,
}

/// Head, tail and fill of one circular log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LogCursor {
    pub log_bytes: u64,
    pub head: u64,
    pub tail: u64,
    pub used: u64,
    /// Seq the next record gets.
    pub next_seq: u64,
}

impl LogCursor {
    /// An empty log starting at `offset` with `next_seq`.
    pub fn empty(log_bytes: u64, offset: u64, next_seq: u64) -> LogCursor {
        LogCursor {
            log_bytes,
            head: offset,
            tail: offset,
            used: 0,
            next_seq,
        }
    }

    pub fn free(&self) -> u64 {
        self.log_bytes - self.used
    }

    /// Where a record of `total` bytes would go, if it fits leaving `reserve` bytes free.
    pub fn place(&self, total: u64, reserve: u64) -> Option<Placement> {
        let to_end = self.log_bytes - self.head;
        let placement = if total <= to_end {
            Placement {
                pad_bytes: None,
                at: self.head,
                consumed: total,
            }
        } else {
            Placement {
                pad_bytes: Some(to_end),
                at: 0,
                consumed: to_end + total,
            }
        };
        debug_assert!(to_end >= RECORD_HEADER_BYTES as u64 || placement.pad_bytes.is_none());
        (placement.consumed.checked_add(reserve)? <= self.free()).then_some(placement)
    }

    /// Accounts an append made at `p` of a record of `total` bytes; returns the record's seq
    /// (the PAD, if any, takes the seq before it).
    pub fn commit(&mut self, p: Placement, total: u64) -> u64 {
        if p.pad_bytes.is_some() {
            self.next_seq += 1;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.used += p.consumed;
        self.head = p.at + total;
        if self.head == self.log_bytes {
            self.head = 0;
        }
        debug_assert!(self.used <= self.log_bytes);
        seq
    }

    /// Frees `bytes` from the tail, making `new_tail` the oldest live offset.
    pub fn release(&mut self, new_tail: u64, bytes: u64) {
        debug_assert!(bytes <= self.used);
        self.used -= bytes.min(self.used);
        self.tail = new_tail;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_wraps_with_pad_and_counts_it() {
        let mut c = LogCursor::empty(4096, 0, 1);
        let p = c.place(3072, 0).unwrap();
        assert_eq!(c.commit(p, 3072), 1);
        let p = c.place(2048, 0);
        assert!(p.is_none(), "only 1024 bytes free");
        c.release(3072, 3072);
        let p = c.place(2048, 0).unwrap();
        assert_eq!(p.pad_bytes, Some(1024));
        assert_eq!(p.at, 0);
        assert_eq!(c.commit(p, 2048), 3, "PAD takes seq 2");
        assert_eq!(c.used, 3072);
        assert_eq!(c.head, 2048);
    }

    #[test]
    fn reserve_is_left_free() {
        let c = LogCursor::empty(4096, 0, 1);
        assert!(c.place(4096, 0).is_some());
        assert!(c.place(4096, 64).is_none());
        assert!(c.place(4032, 64).is_some());
    }

    #[test]
    fn full_log_head_meets_tail() {
        let mut c = LogCursor::empty(1024, 512, 1);
        let p = c.place(512, 0).unwrap();
        c.commit(p, 512);
        assert_eq!(c.head, 0);
        let p = c.place(512, 0).unwrap();
        c.commit(p, 512);
        assert_eq!((c.head, c.used, c.free()), (512, 1024, 0));
        assert!(c.place(64, 0).is_none());
    }
}
