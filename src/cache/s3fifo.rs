//! S3-FIFO written here, as pure data structure (no I/O, no locks, no clocks): the volume read
//! cache's first policy, now the baseline `examples/cache_compare.rs` measures the policy the
//! cache uses ([`super::policy`], quick_cache) against. Kept so that comparison can be rerun when
//! either side changes.
//!
//! Why S3-FIFO: a block cache sees scans (a backup, `dd`, a sequential benchmark) that touch each
//! block once; LRU lets one scan flush the hot set. S3-FIFO (Yang et al., SOSP 2023) sends every
//! new key to a small FIFO (a tenth of the capacity); a key read again while there moves to the
//! main FIFO, the rest leave after one pass (their keys stay in a ghost FIFO, so a key coming
//! back soon goes straight to main). Main is a CLOCK-like FIFO: an entry read since it was last
//! looked at gets another round. Only FIFOs and a 2-bit counter: no list splicing on a hit, so a
//! hit is one hash lookup.
//!
//! Queues hold `(key, stamp)`; removing an entry (an invalidation) leaves its queue slot behind
//! with a stamp that no longer matches, skipped when it reaches the head (and compacted when the
//! stale slots outnumber the live ones), so `remove` is O(1) too.

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;

pub use super::hasher::BlockHasher;

type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

/// Highest access count kept per entry (2 bits, as in the paper).
const FREQ_MAX: u8 = 3;
/// Share of the capacity given to the small (probationary) FIFO, in percent.
const SMALL_SHARE_PERCENT: usize = 10;

struct Entry<V> {
    value: V,
    freq: u8,
    stamp: u64,
    in_main: bool,
}

/// An S3-FIFO map from block numbers to values, holding at most `capacity` entries.
pub struct S3Fifo<V> {
    capacity: usize,
    small_target: usize,
    entries: BlockMap<Entry<V>>,
    small: VecDeque<(u64, u64)>,
    main: VecDeque<(u64, u64)>,
    small_live: usize,
    ghost: VecDeque<(u64, u64)>,
    ghost_keys: BlockMap<u64>,
    next_stamp: u64,
}

impl<V> S3Fifo<V> {
    /// A policy holding at most `capacity` entries (0: holds nothing).
    pub fn new(capacity: usize) -> Self {
        S3Fifo {
            capacity,
            small_target: (capacity * SMALL_SHARE_PERCENT / 100).max(1),
            entries: BlockMap::default(),
            small: VecDeque::new(),
            main: VecDeque::new(),
            small_live: 0,
            ghost: VecDeque::new(),
            ghost_keys: BlockMap::default(),
            next_stamp: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn contains(&self, key: u64) -> bool {
        self.entries.contains_key(&key)
    }

    /// The value of `key`, counting the access.
    pub fn get(&mut self, key: u64) -> Option<&V> {
        let e = self.entries.get_mut(&key)?;
        e.freq = (e.freq + 1).min(FREQ_MAX);
        Some(&e.value)
    }

    fn stamp(&mut self) -> u64 {
        self.next_stamp += 1;
        self.next_stamp
    }

    /// Inserts or replaces `key`; returns how many entries were evicted to make room.
    pub fn insert(&mut self, key: u64, value: V) -> usize {
        if self.capacity == 0 {
            return 0;
        }
        if let Some(e) = self.entries.get_mut(&key) {
            // A new version of a cached block: same place in the queues, same history.
            e.value = value;
            return 0;
        }
        let mut evicted = 0;
        while self.entries.len() >= self.capacity {
            if !self.evict_one() {
                break;
            }
            evicted += 1;
        }
        let stamp = self.stamp();
        let in_main = self.ghost_keys.remove(&key).is_some();
        if in_main {
            self.main.push_back((key, stamp));
        } else {
            self.small.push_back((key, stamp));
            self.small_live += 1;
        }
        self.entries.insert(
            key,
            Entry {
                value,
                freq: 0,
                stamp,
                in_main,
            },
        );
        evicted
    }

    /// Drops `key` (an invalidation); true when it was cached.
    pub fn remove(&mut self, key: u64) -> bool {
        let Some(e) = self.entries.remove(&key) else {
            return false;
        };
        if !e.in_main {
            self.small_live -= 1;
        }
        self.compact();
        true
    }

    /// Drops every key in `first..=last`; returns how many were cached. Walks the range or the
    /// entries, whichever is shorter, so invalidating a huge trim costs at most the cache's size.
    pub fn remove_range(&mut self, first: u64, last: u64) -> usize {
        if first > last {
            return 0;
        }
        let span = last - first;
        if span >= self.entries.len() as u64 {
            let keys: Vec<u64> = self
                .entries
                .keys()
                .copied()
                .filter(|k| (first..=last).contains(k))
                .collect();
            keys.iter().filter(|&&k| self.remove(k)).count()
        } else {
            (first..=last).filter(|&k| self.remove(k)).count()
        }
    }

    /// True when `(key, stamp)` at a queue head is the live entry it was pushed for.
    fn live(&self, key: u64, stamp: u64) -> bool {
        self.entries.get(&key).is_some_and(|e| e.stamp == stamp)
    }

    /// Evicts one entry; false when there is nothing to evict.
    fn evict_one(&mut self) -> bool {
        loop {
            if self.entries.is_empty() {
                return false;
            }
            let from_small =
                self.small_live > 0 && (self.small_live >= self.small_target || self.main_empty());
            let step = if from_small {
                self.evict_small()
            } else {
                self.evict_main()
            };
            match step {
                Some(true) => return true,
                Some(false) => {}
                // A queue without the live entries the counts promise: stop rather than spin
                // (the proptest checks this never happens).
                None => return false,
            }
        }
    }

    fn main_empty(&self) -> bool {
        self.entries.len() == self.small_live
    }

    /// Takes the small FIFO's head: read again since insertion -> main (Some(false)), else
    /// evicted into the ghost FIFO (Some(true)); None when small holds no live entry.
    fn evict_small(&mut self) -> Option<bool> {
        while let Some((key, stamp)) = self.small.pop_front() {
            if !self.live(key, stamp) {
                continue;
            }
            self.small_live -= 1;
            let new_stamp = self.stamp();
            let e = self.entries.get_mut(&key)?;
            if e.freq > 0 {
                e.freq = 0;
                e.in_main = true;
                e.stamp = new_stamp;
                self.main.push_back((key, new_stamp));
                return Some(false);
            }
            self.entries.remove(&key);
            self.ghost.push_back((key, new_stamp));
            self.ghost_keys.insert(key, new_stamp);
            while self.ghost_keys.len() > self.capacity {
                let Some((k, s)) = self.ghost.pop_front() else {
                    break;
                };
                if self.ghost_keys.get(&k) == Some(&s) {
                    self.ghost_keys.remove(&k);
                }
            }
            return Some(true);
        }
        None
    }

    /// Takes the main FIFO's head: read since last looked at -> another round (Some(false)),
    /// else evicted (Some(true)); None when main holds no live entry.
    fn evict_main(&mut self) -> Option<bool> {
        while let Some((key, stamp)) = self.main.pop_front() {
            if !self.live(key, stamp) {
                continue;
            }
            let e = self.entries.get_mut(&key)?;
            if e.freq > 0 {
                e.freq -= 1;
                self.main.push_back((key, stamp));
                return Some(false);
            }
            self.entries.remove(&key);
            return Some(true);
        }
        None
    }

    /// Drops stale queue slots once they outnumber live entries, bounding the queues' memory.
    fn compact(&mut self) {
        let live = self.entries.len();
        if self.small.len() + self.main.len() <= 2 * live + 64 {
            return;
        }
        let entries = &self.entries;
        let keep = |&(k, s): &(u64, u64)| entries.get(&k).is_some_and(|e| e.stamp == s);
        self.small.retain(keep);
        self.main.retain(keep);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap as Model;

    #[test]
    fn hot_set_survives_a_scan_larger_than_the_cache() {
        let mut c = S3Fifo::new(100);
        for round in 0..3 {
            for k in 0..50u64 {
                if c.get(k).is_none() {
                    c.insert(k, round);
                }
            }
        }
        for k in 1000..1500u64 {
            if c.get(k).is_none() {
                c.insert(k, 0);
            }
        }
        let kept = (0..50u64).filter(|&k| c.contains(k)).count();
        assert_eq!(kept, 50, "the scan evicted part of the hot set");
    }

    #[test]
    fn key_read_twice_while_small_is_promoted_and_kept() {
        let mut c = S3Fifo::new(10);
        c.insert(1, ());
        c.get(1);
        for k in 100..130u64 {
            c.insert(k, ());
        }
        assert!(c.contains(1));
    }

    #[test]
    fn key_returning_from_ghost_goes_to_main() {
        let mut c = S3Fifo::new(10);
        c.insert(1, ());
        for k in 100..111u64 {
            c.insert(k, ());
        }
        assert!(!c.contains(1));
        c.insert(1, ());
        assert!(c.entries.get(&1).is_some_and(|e| e.in_main));
    }

    #[test]
    fn remove_range_drops_only_the_range_both_ways() {
        let mut c = S3Fifo::new(1000);
        for k in 0..100u64 {
            c.insert(k, k);
        }
        assert_eq!(c.remove_range(10, 19), 10);
        assert_eq!(c.remove_range(50, u64::MAX), 50);
        assert_eq!(c.len(), 40);
        assert!(c.contains(9) && c.contains(20) && !c.contains(10) && !c.contains(50));
    }

    #[test]
    fn zero_capacity_holds_nothing() {
        let mut c = S3Fifo::new(0);
        assert_eq!(c.insert(1, ()), 0);
        assert!(c.is_empty());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Get(u64),
        Insert(u64, u32),
        Remove(u64),
        RemoveRange(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0..64u64).prop_map(Op::Get),
            4 => (0..64u64, any::<u32>()).prop_map(|(k, v)| Op::Insert(k, v)),
            1 => (0..64u64).prop_map(Op::Remove),
            1 => (0..64u64, 0..8u64).prop_map(|(k, n)| Op::RemoveRange(k, k + n)),
        ]
    }

    proptest! {
        /// Whatever the sequence, the cache never exceeds its capacity, never returns a value
        /// other than the latest inserted for a key, never returns a removed key, and reports
        /// evictions that add up.
        #[test]
        fn cache_agrees_with_a_map_and_stays_in_capacity(
            capacity in 0..20usize,
            ops in proptest::collection::vec(op(), 0..400),
        ) {
            let mut c = S3Fifo::new(capacity);
            let mut model: Model<u64, u32> = Model::new();
            for op in ops {
                match op {
                    Op::Get(k) => {
                        if let Some(v) = c.get(k) {
                            prop_assert_eq!(Some(v), model.get(&k));
                        }
                    }
                    Op::Insert(k, v) => {
                        let before = c.len();
                        let present = c.contains(k);
                        let evicted = c.insert(k, v);
                        model.insert(k, v);
                        if capacity > 0 {
                            let grew = usize::from(!present);
                            prop_assert_eq!(c.len(), before + grew - evicted);
                        }
                    }
                    Op::Remove(k) => {
                        c.remove(k);
                        model.remove(&k);
                    }
                    Op::RemoveRange(a, b) => {
                        c.remove_range(a, b);
                        model.retain(|k, _| !(a..=b).contains(k));
                    }
                }
                prop_assert!(c.len() <= capacity);
                prop_assert!(c.small_live <= c.len());
                for k in c.entries.keys() {
                    prop_assert!(model.contains_key(k), "key {} cached after removal", k);
                }
            }
        }
    }
}
