//! A volatile write cache, modelled for the in-memory member: what a disk may hold after a loss
//! of power.
//!
//! A real disk with a write cache acknowledges writes before they reach the medium and makes them
//! durable only at a cache flush (`sync`). When the power goes, each sector written since the last
//! flush holds one of the versions written to it since then, or what it held at that flush; which
//! one, and whether the sectors of one write agree, is up to the disk. The model records, per
//! write, the whole sectors it changed (before and after) and at a power cut picks per sector
//! according to a [`CutPolicy`]. Pure: the member applies the result to its bytes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Granularity at which a disk may tear a write.
pub const SECTOR_BYTES: u64 = 512;

/// What a power cut does to the writes not yet flushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CutPolicy {
    /// Every unflushed write is lost: sectors hold what they held at the last flush.
    LoseAll,
    /// Every unflushed write reached the medium.
    KeepAll,
    /// Each sector independently holds one of its versions, chosen by `seed`.
    Torn { seed: u64 },
}

/// The power feeding a set of members: it goes off after a given number of member operations
/// (writes, discards, syncs), at any point inside an array operation. From then on those
/// operations report success and change nothing, as a host still running for a moment after its
/// disks lost power would see; a test stops its workload once [`PowerSupply::is_off`].
#[derive(Debug)]
pub struct PowerSupply {
    remaining: AtomicU64,
}

impl PowerSupply {
    /// Power for `operations` more member operations.
    pub fn new(operations: u64) -> PowerSupply {
        PowerSupply {
            remaining: AtomicU64::new(operations),
        }
    }

    /// Takes power for one operation; false once the power is off.
    pub fn draw(&self) -> bool {
        self.remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |r| r.checked_sub(1))
            .is_ok()
    }

    pub fn is_off(&self) -> bool {
        self.remaining.load(Ordering::SeqCst) == 0
    }
}

/// One write (or discard) not yet flushed, as whole sectors.
#[derive(Debug, Clone)]
struct PendingWrite {
    first_sector: u64,
    before: Vec<u8>,
    after: Vec<u8>,
}

/// The writes since the last flush.
#[derive(Debug, Clone, Default)]
pub struct WriteCache {
    pending: Vec<PendingWrite>,
}

/// A small, well-mixed hash (splitmix64) for per-sector choices.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

impl WriteCache {
    /// The sector-aligned byte range covering `[offset, offset+len)`.
    pub fn sector_span(offset: u64, len: u64) -> std::ops::Range<u64> {
        let start = offset / SECTOR_BYTES * SECTOR_BYTES;
        let end = (offset + len).div_ceil(SECTOR_BYTES) * SECTOR_BYTES;
        start..end
    }

    /// Records a write that changed the sectors starting at byte `start` (sector aligned) from
    /// `before` to `after` (same length, whole sectors).
    pub fn record(&mut self, start: u64, before: Vec<u8>, after: Vec<u8>) {
        debug_assert_eq!(before.len(), after.len());
        self.pending.push(PendingWrite {
            first_sector: start / SECTOR_BYTES,
            before,
            after,
        });
    }

    /// A flush completed: everything written so far is durable.
    pub fn flushed(&mut self) {
        self.pending.clear();
    }

    /// Writes not yet flushed.
    pub fn pending_writes(&self) -> usize {
        self.pending.len()
    }

    /// The power goes: rewrites `data` (the member's bytes, which hold every write) to what the
    /// medium holds afterwards, and forgets the pending writes.
    pub fn cut(&mut self, data: &mut [u8], policy: CutPolicy) {
        let sector = SECTOR_BYTES as usize;
        // Per sector: the version at the last flush, then each version written since, in order.
        let mut versions: BTreeMap<u64, Vec<&[u8]>> = BTreeMap::new();
        for w in &self.pending {
            for (i, (b, a)) in w
                .before
                .chunks(sector)
                .zip(w.after.chunks(sector))
                .enumerate()
            {
                versions
                    .entry(w.first_sector + i as u64)
                    .or_insert_with(|| vec![b])
                    .push(a);
            }
        }
        for (s, v) in versions {
            let pick = match policy {
                CutPolicy::LoseAll => 0,
                CutPolicy::KeepAll => v.len() - 1,
                CutPolicy::Torn { seed } => (mix(seed ^ mix(s)) % v.len() as u64) as usize,
            };
            let at = (s * SECTOR_BYTES) as usize;
            if at + sector <= data.len() {
                data[at..at + sector].copy_from_slice(v[pick]);
            }
        }
        self.pending.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(data: &mut [u8], cache: &mut WriteCache, at: u64, byte: u8, len: u64) {
        let span = WriteCache::sector_span(at, len);
        let r = span.start as usize..span.end as usize;
        let before = data[r.clone()].to_vec();
        data[at as usize..(at + len) as usize].fill(byte);
        cache.record(span.start, before, data[r].to_vec());
    }

    #[test]
    fn lose_all_restores_the_last_flush_and_keep_all_changes_nothing() {
        let mut data = vec![0u8; 4096];
        let mut c = WriteCache::default();
        write(&mut data, &mut c, 0, 1, 1024);
        c.flushed();
        write(&mut data, &mut c, 512, 2, 1024);
        write(&mut data, &mut c, 100, 3, 10);
        let mut kept = data.clone();
        c.clone().cut(&mut kept, CutPolicy::KeepAll);
        assert_eq!(kept, data);
        c.cut(&mut data, CutPolicy::LoseAll);
        assert!(data[..1024].iter().all(|&b| b == 1));
        assert!(data[1024..].iter().all(|&b| b == 0));
    }

    #[test]
    fn torn_cut_leaves_each_sector_at_one_of_its_versions() {
        let mut torn_seen = false;
        for seed in 0..64 {
            let mut data = vec![0u8; 8192];
            let mut c = WriteCache::default();
            write(&mut data, &mut c, 0, 5, 8192);
            write(&mut data, &mut c, 0, 6, 4096);
            c.cut(&mut data, CutPolicy::Torn { seed });
            let mut kinds = std::collections::BTreeSet::new();
            for s in data.chunks(512) {
                assert!(s.iter().all(|&b| b == s[0]), "a sector is never split");
                kinds.insert(s[0]);
            }
            for (i, s) in data.chunks(512).enumerate() {
                let ok = if i < 8 {
                    [0, 5, 6].contains(&s[0])
                } else {
                    [0, 5].contains(&s[0])
                };
                assert!(ok, "seed {seed} sector {i} holds {}", s[0]);
            }
            torn_seen |= kinds.len() > 1;
        }
        assert!(torn_seen, "some seed tears a write");
    }
}
