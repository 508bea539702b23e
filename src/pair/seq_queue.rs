//! A queue of values keyed by record seq, kept in seq order, for what the mirror holds per
//! shipped record until the sender takes it or the partner's cumulative ACK covers it (the
//! records queued for the sender, the writers waiting for an ACK, the bytes of each record not
//! yet acknowledged).
//!
//! # Why not a `BTreeMap`
//!
//! Writers hand their records over nearly in seq order (they append under the journal's lock and
//! ship just after releasing it), and a cumulative ACK always retires a prefix. So an insert lands
//! at the back or a few places before it, and an ACK pops from the front: a ring buffer does both
//! without an allocation per record, where a `BTreeMap` allocated nodes on insert and on every
//! `split_off` an ACK made (once per ACK on the owner's hot path).

use std::collections::VecDeque;

/// Values in seq order (equal seqs keep their insertion order).
#[derive(Debug)]
pub struct SeqQueue<T> {
    items: VecDeque<(u64, T)>,
}

impl<T> Default for SeqQueue<T> {
    fn default() -> Self {
        SeqQueue {
            items: VecDeque::new(),
        }
    }
}

impl<T> SeqQueue<T> {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    pub fn clear(&mut self) {
        self.items.clear();
    }

    /// Adds `value` for `seq` after every value of a seq <= `seq`. Near the back in the usual
    /// case: the search only runs when `seq` is older than the newest one queued.
    pub fn insert(&mut self, seq: u64, value: T) {
        match self.items.back() {
            Some((last, _)) if *last > seq => {
                let at = self.items.partition_point(|(s, _)| *s <= seq);
                self.items.insert(at, (seq, value));
            }
            _ => self.items.push_back((seq, value)),
        }
    }

    /// Removes every value of a seq <= `seq`, oldest first, handing each to `each`.
    pub fn pop_through(&mut self, seq: u64, mut each: impl FnMut(u64, T)) {
        while self.items.front().is_some_and(|(s, _)| *s <= seq) {
            if let Some((s, v)) = self.items.pop_front() {
                each(s, v);
            }
        }
    }

    pub fn values(&self) -> impl Iterator<Item = &T> {
        self.items.iter().map(|(_, v)| v)
    }

    /// The oldest seq queued.
    pub fn front_seq(&self) -> Option<u64> {
        self.items.front().map(|(s, _)| *s)
    }

    /// Removes the oldest (seq, value).
    pub fn pop_front(&mut self) -> Option<(u64, T)> {
        self.items.pop_front()
    }

    /// Every (seq, value), in seq order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, &T)> {
        self.items.iter().map(|(s, v)| (*s, v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_through(q: &mut SeqQueue<u32>, seq: u64) -> Vec<(u64, u32)> {
        let mut out = Vec::new();
        q.pop_through(seq, |s, v| out.push((s, v)));
        out
    }

    #[test]
    fn out_of_order_inserts_come_out_in_seq_order() {
        let mut q = SeqQueue::new();
        for (i, s) in [5u64, 7, 6, 9, 3, 8].into_iter().enumerate() {
            q.insert(s, i as u32);
        }
        let seqs: Vec<u64> = drain_through(&mut q, u64::MAX)
            .into_iter()
            .map(|p| p.0)
            .collect();
        assert_eq!(seqs, vec![3, 5, 6, 7, 8, 9]);
    }

    #[test]
    fn pop_through_takes_exactly_the_covered_prefix() {
        let mut q = SeqQueue::new();
        for s in 1..=6u64 {
            q.insert(s, s as u32 * 10);
        }
        assert_eq!(drain_through(&mut q, 3), vec![(1, 10), (2, 20), (3, 30)]);
        assert_eq!(
            drain_through(&mut q, 3),
            vec![],
            "a repeated ACK takes nothing"
        );
        assert_eq!(drain_through(&mut q, 0), vec![]);
        assert_eq!(q.len(), 3);
        assert_eq!(q.values().copied().collect::<Vec<_>>(), vec![40, 50, 60]);
    }

    #[test]
    fn equal_seqs_keep_their_insertion_order() {
        let mut q = SeqQueue::new();
        q.insert(4, 1);
        q.insert(2, 2);
        q.insert(4, 3);
        q.insert(2, 4);
        assert_eq!(
            drain_through(&mut q, 4),
            vec![(2, 2), (2, 4), (4, 1), (4, 3)]
        );
        assert!(q.is_empty());
    }
}
