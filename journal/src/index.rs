//! The dirty index: which byte ranges of the volume are newer in NVRAM than in the backing store.
//!
//! A map from volume offset to non-overlapping extents; each extent says where its bytes are (a
//! log offset of WRITE payload, or "zero", or "trimmed") and the seq of the record that set it.
//! Inserting punches a hole first (latest write wins, overlapped extents are split and their log
//! offsets adjusted). A consistency point snapshots the index, applies the snapshot, and then
//! retires only entries with `seq <= cp_seq`: anything overwritten meanwhile has a newer seq and
//! stays. Pure; no I/O.

use std::collections::BTreeMap;

/// Where an extent's current contents are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentData {
    /// In the log, starting at this log offset.
    Nvram { log_offset: u64 },
    /// Reads as zero (WRITE_ZEROES).
    Zero,
    /// Discarded (TRIM); reads as zero until applied, unspecified after.
    Trim,
    /// The store holds the final bytes (a STORED record: a large write that bypassed the log).
    /// Only recovery builds these, to trim older records under them; it then drops them
    /// ([`DirtyIndex::drop_stored`]), so a live index never holds one: reads treat one as a gap
    /// and CPs skip it.
    Stored,
}

/// One extent of the index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub len: u64,
    pub seq: u64,
    pub data: ExtentData,
}

impl Extent {
    /// The part of `self` (which starts at `start`) beginning `skip` bytes in, `len` long.
    fn slice(&self, skip: u64, len: u64) -> Extent {
        let data = match self.data {
            ExtentData::Nvram { log_offset } => ExtentData::Nvram {
                log_offset: log_offset + skip,
            },
            other => other,
        };
        Extent {
            len,
            seq: self.seq,
            data,
        }
    }
}

/// One piece of a lookup: `len` bytes at `offset`, from an extent or a gap (backing store).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub offset: u64,
    pub len: u64,
    /// `None` for a gap: read the backing store.
    pub data: Option<ExtentData>,
}

/// Non-overlapping dirty extents keyed by volume offset.
#[derive(Debug, Default, Clone)]
pub struct DirtyIndex {
    map: BTreeMap<u64, Extent>,
    bytes: u64,
}

impl DirtyIndex {
    pub fn new() -> DirtyIndex {
        DirtyIndex::default()
    }

    /// Number of extents.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of the volume covered by extents.
    pub fn dirty_bytes(&self) -> u64 {
        self.bytes
    }

    /// Removes `[start, end)` from the index, splitting extents that straddle its edges.
    /// Walks the overlapping extents from the last one down, without collecting them first:
    /// every write punches its range, so this runs once per request under the volume's lock.
    fn punch(&mut self, start: u64, end: u64) {
        while let Some((&k, &e)) = self.map.range(..end).next_back() {
            let e_end = k + e.len;
            if e_end <= start {
                break;
            }
            self.map.remove(&k);
            self.bytes -= e.len;
            if e_end > end {
                // Only the last overlapping extent can reach past `end`; its tail has key `end`,
                // outside the `..end` range walked.
                self.put(end, e.slice(end - k, e_end - end));
            }
            if k < start {
                // The first overlapping extent: its head stays and nothing before it overlaps.
                self.put(k, e.slice(0, start - k));
                break;
            }
        }
    }

    fn put(&mut self, offset: u64, e: Extent) {
        self.bytes += e.len;
        self.map.insert(offset, e);
    }

    /// Records that `[offset, offset + e.len)` now has contents `e` (latest wins).
    pub fn insert(&mut self, offset: u64, e: Extent) {
        if e.len == 0 {
            return;
        }
        self.punch(offset, offset + e.len);
        self.put(offset, e);
    }

    /// The index that inserting `records` one by one in seq order would give (newest wins per
    /// byte), built in bulk: recovery indexes a whole log at once, and sorting plus one sweep
    /// with a bulk-loaded map costs a fraction of tens of thousands of punch-and-insert steps.
    ///
    /// `records` are `(volume offset, extent)` pairs in any order; seqs must be distinct. The
    /// sweep visits them by offset and keeps the output sorted and non-overlapping, so an
    /// incoming extent can only overlap output extents at the end of the output (those ending
    /// past its start); those few are merged with it by seq.
    pub fn from_records(mut records: Vec<(u64, Extent)>) -> DirtyIndex {
        records.retain(|(_, e)| e.len > 0);
        records.sort_unstable_by_key(|&(off, e)| (off, e.seq));
        let mut out: Vec<(u64, Extent)> = Vec::with_capacity(records.len());
        let mut overlapped: Vec<(u64, Extent)> = Vec::new();
        for (start, e) in records {
            let end = start + e.len;
            // Output extents are sorted and disjoint, so the ones ending after `start` are a
            // suffix of the output.
            while out.last().is_some_and(|&(k, x)| k + x.len > start) {
                overlapped.extend(out.pop());
            }
            if overlapped.is_empty() {
                out.push((start, e));
                continue;
            }
            overlapped.reverse();
            merge_overlap(&mut out, &overlapped, start, e, end);
            overlapped.clear();
        }
        let bytes = out.iter().map(|(_, e)| e.len).sum();
        DirtyIndex {
            map: out.into_iter().collect(),
            bytes,
        }
    }

    /// Splits `[offset, offset+len)` into pieces from extents and gaps, in order.
    /// True when no extent overlaps `offset..offset+len`: the read path's allocation-free
    /// check before [`DirtyIndex::lookup`].
    pub fn is_clean(&self, offset: u64, len: u64) -> bool {
        let end = offset + len;
        let before = self
            .map
            .range(..offset)
            .next_back()
            .is_some_and(|(&k, e)| k + e.len > offset);
        !before && self.map.range(offset..end).next().is_none()
    }

    pub fn lookup(&self, offset: u64, len: u64) -> Vec<Piece> {
        let end = offset + len;
        let mut pieces = Vec::new();
        let mut at = offset;
        let first = self
            .map
            .range(..offset)
            .next_back()
            .filter(|(&k, e)| k + e.len > offset)
            .map(|(&k, &e)| (k, e));
        let rest = self.map.range(offset..end).map(|(&k, &e)| (k, e));
        for (k, e) in first.into_iter().chain(rest) {
            if k > at {
                pieces.push(Piece {
                    offset: at,
                    len: k - at,
                    data: None,
                });
                at = k;
            }
            let piece_end = (k + e.len).min(end);
            let s = e.slice(at - k, piece_end - at);
            pieces.push(Piece {
                offset: at,
                len: s.len,
                data: Some(s.data),
            });
            at = piece_end;
        }
        if at < end {
            pieces.push(Piece {
                offset: at,
                len: end - at,
                data: None,
            });
        }
        pieces
    }

    /// Removes `[offset, offset + len)` from the index (a large write that bypassed the log
    /// made the store hold the range's final bytes: every extent there is older).
    pub fn remove(&mut self, offset: u64, len: u64) {
        if len > 0 {
            self.punch(offset, offset.saturating_add(len));
        }
    }

    /// Drops the [`ExtentData::Stored`] extents (what is left is what the store still lacks).
    pub fn drop_stored(&mut self) {
        let mut freed = 0;
        self.map.retain(|_, e| {
            let keep = e.data != ExtentData::Stored;
            if !keep {
                freed += e.len;
            }
            keep
        });
        self.bytes -= freed;
    }

    /// All extents in offset order.
    pub fn snapshot(&self) -> Vec<(u64, Extent)> {
        self.map.iter().map(|(&k, &e)| (k, e)).collect()
    }

    /// Drops every extent with `seq <= applied_seq` (they are in the backing store now).
    pub fn retire_through(&mut self, applied_seq: u64) {
        let mut freed = 0;
        self.map.retain(|_, e| {
            let keep = e.seq > applied_seq;
            if !keep {
                freed += e.len;
            }
            keep
        });
        self.bytes -= freed;
    }
}

/// Appends to `out` the overlay of extent `e` at `[start, end)` onto `old` (sorted, disjoint
/// extents; the first may begin before `start`): per byte the higher seq wins. Adjacent pieces
/// of one extent are joined again, as inserting one by one never leaves them split.
fn merge_overlap(
    out: &mut Vec<(u64, Extent)>,
    old: &[(u64, Extent)],
    start: u64,
    e: Extent,
    end: u64,
) {
    let mut cuts: Vec<u64> = Vec::with_capacity(2 * old.len() + 2);
    cuts.extend([start, end]);
    for &(k, x) in old {
        cuts.extend([k, k + x.len]);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let merged_from = out.len();
    let mut o = 0;
    for w in cuts.windows(2) {
        let (a, b) = (w[0], w[1]);
        while o < old.len() && old[o].0 + old[o].1.len <= a {
            o += 1;
        }
        let under = old.get(o).filter(|(k, _)| *k <= a).copied();
        let over = (start <= a && b <= end).then_some((start, e));
        let winner = match (under, over) {
            (Some(u), Some(v)) => Some(if u.1.seq > v.1.seq { u } else { v }),
            (u, v) => u.or(v),
        };
        let Some((k, x)) = winner else {
            continue;
        };
        let joins = out.len() > merged_from;
        match out.last_mut() {
            Some((pk, p)) if joins && p.seq == x.seq && *pk + p.len == a => p.len += b - a,
            _ => out.push((a, x.slice(a - k, b - a))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn data(log_offset: u64, len: u64, seq: u64) -> Extent {
        Extent {
            len,
            seq,
            data: ExtentData::Nvram { log_offset },
        }
    }

    #[test]
    fn overlapping_write_splits_older_extent() {
        let mut ix = DirtyIndex::new();
        ix.insert(0, data(1000, 100, 1));
        ix.insert(40, data(5000, 20, 2));
        let p = ix.lookup(0, 120);
        assert_eq!(
            p,
            vec![
                Piece {
                    offset: 0,
                    len: 40,
                    data: Some(ExtentData::Nvram { log_offset: 1000 })
                },
                Piece {
                    offset: 40,
                    len: 20,
                    data: Some(ExtentData::Nvram { log_offset: 5000 })
                },
                Piece {
                    offset: 60,
                    len: 40,
                    data: Some(ExtentData::Nvram { log_offset: 1060 })
                },
                Piece {
                    offset: 100,
                    len: 20,
                    data: None
                },
            ]
        );
        assert_eq!(ix.dirty_bytes(), 100);
    }

    fn stored(len: u64, seq: u64) -> Extent {
        Extent {
            len,
            seq,
            data: ExtentData::Stored,
        }
    }

    #[test]
    fn recovery_trims_older_records_under_a_stored_range() {
        // seq 1 straddles the start of the stored range, seq 2 lies inside it, seq 3 straddles
        // its end; the STORED record (seq 4) covers [100, 300).
        let mut ix = DirtyIndex::from_records(vec![
            (0, data(1000, 150, 1)),
            (120, data(2000, 50, 2)),
            (250, data(3000, 100, 3)),
            (100, stored(200, 4)),
        ]);
        ix.drop_stored();
        assert_eq!(
            ix.snapshot(),
            vec![(0, data(1000, 100, 1)), (300, data(3050, 50, 3))]
        );
        assert_eq!(ix.dirty_bytes(), 150);
    }

    #[test]
    fn recovery_keeps_newer_records_over_a_stored_range() {
        let mut ix = DirtyIndex::from_records(vec![
            (0, stored(4096, 7)),
            (1024, data(500, 1024, 8)),
            (
                3072,
                Extent {
                    len: 2048,
                    seq: 9,
                    data: ExtentData::Zero,
                },
            ),
        ]);
        ix.drop_stored();
        assert_eq!(
            ix.snapshot(),
            vec![
                (1024, data(500, 1024, 8)),
                (
                    3072,
                    Extent {
                        len: 2048,
                        seq: 9,
                        data: ExtentData::Zero
                    }
                )
            ]
        );
    }

    #[test]
    fn remove_forgets_a_range_and_splits_edges() {
        let mut ix = DirtyIndex::new();
        ix.insert(0, data(0, 4096, 1));
        ix.remove(1024, 2048);
        assert_eq!(
            ix.snapshot(),
            vec![(0, data(0, 1024, 1)), (3072, data(3072, 1024, 1))]
        );
        assert_eq!(ix.dirty_bytes(), 2048);
        assert!(ix.is_clean(1024, 2048));
    }

    #[test]
    fn retire_keeps_entries_overwritten_during_cp() {
        let mut ix = DirtyIndex::new();
        ix.insert(0, data(0, 4096, 5));
        // CP snapshots at seq 5; a write with seq 6 lands on half of it meanwhile.
        ix.insert(
            2048,
            Extent {
                len: 2048,
                seq: 6,
                data: ExtentData::Zero,
            },
        );
        ix.retire_through(5);
        assert_eq!(ix.lookup(0, 4096)[0].data, None);
        assert_eq!(ix.lookup(2048, 2048)[0].data, Some(ExtentData::Zero));
        assert_eq!(ix.dirty_bytes(), 2048);
    }

    proptest! {
        /// Building in bulk gives exactly the extents of inserting one by one in seq order.
        #[test]
        fn bulk_build_equals_inserting_in_seq_order(
            ops in proptest::collection::vec((0u64..300, 0u64..80, 0u8..3), 0..60)
        ) {
            let mut one_by_one = DirtyIndex::new();
            let mut records = Vec::new();
            for (i, &(off, len, kind)) in ops.iter().enumerate() {
                let seq = i as u64 + 1;
                let data = match kind {
                    0 => ExtentData::Nvram { log_offset: seq * 1000 },
                    1 => ExtentData::Zero,
                    _ => ExtentData::Trim,
                };
                let e = Extent { len, seq, data };
                one_by_one.insert(off, e);
                records.push((off, e));
            }
            records.reverse(); // any order
            let bulk = DirtyIndex::from_records(records);
            prop_assert_eq!(bulk.snapshot(), one_by_one.snapshot());
            prop_assert_eq!(bulk.dirty_bytes(), one_by_one.dirty_bytes());
        }

        /// The index agrees with a byte-by-byte model after random overlapping inserts.
        #[test]
        fn index_matches_byte_model(ops in proptest::collection::vec((0u64..200, 1u64..60), 1..40)) {
            let mut ix = DirtyIndex::new();
            let mut model: Vec<Option<(u64, u64)>> = vec![None; 300]; // (seq, log byte)
            for (i, &(off, len)) in ops.iter().enumerate() {
                let seq = i as u64 + 1;
                let log = seq * 1000;
                ix.insert(off, data(log, len, seq));
                for b in off..off + len {
                    model[b as usize] = Some((seq, log + b - off));
                }
            }
            let mut covered = 0;
            for p in ix.lookup(0, 300) {
                for b in p.offset..p.offset + p.len {
                    let got = p.data.map(|d| match d {
                        ExtentData::Nvram { log_offset } => log_offset + b - p.offset,
                        _ => unreachable!(),
                    });
                    prop_assert_eq!(got, model[b as usize].map(|m| m.1));
                    if got.is_some() { covered += 1; }
                }
            }
            prop_assert_eq!(ix.dirty_bytes(), covered);
        }

        /// `is_clean` says exactly whether `lookup` finds no dirty piece in the range.
        #[test]
        fn is_clean_agrees_with_lookup(
            ops in proptest::collection::vec((0u64..200, 1u64..60), 0..20),
            off in 0u64..260,
            len in 1u64..80,
        ) {
            let mut ix = DirtyIndex::new();
            for (i, &(o, l)) in ops.iter().enumerate() {
                ix.insert(o, data(i as u64 * 1000, l, i as u64 + 1));
            }
            let clean = ix.lookup(off, len).iter().all(|p| p.data.is_none());
            prop_assert_eq!(ix.is_clean(off, len), clean);
        }
    }
}
