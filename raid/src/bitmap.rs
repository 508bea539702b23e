//! The write-intent bitmap, with no I/O.
//!
//! One bit per *region* of member data offsets (the same region on every member, so one bit
//! covers whole rows). A bit is set and made durable (written and synced) on every member *before*
//! a write to its region is issued (set-before-write; writers waiting at the same time share one
//! bitmap write and sync: [`Bitmap::begin_write_durable`], [`Bitmap::take_pending`]) and cleared lazily, at a flush, once every write that touched the
//! region has completed before that flush's sync began and every slot is active (clear-after-sync).
//! While the array is degraded no bit is cleared, so a member that comes back after a short absence
//! is resynchronised only in regions whose bit is set.
//!
//! Set-ahead for sequential streams: a sequential writer entering a new region would wait for a
//! bitmap write and a sync of every member at each region boundary (every 4 MiB of member data).
//! When a write newly sets region `r` and region `r - 1` is set too (the stream came from there),
//! the next [`SET_AHEAD_REGIONS`] regions are set in the same change, so one bitmap write and sync
//! covers the stream's next boundaries as well. A bit set ahead is an ordinary set bit: durable
//! before any write into its region, cleared by a flush once idle (it has no write in flight);
//! at worst it makes a resync after a crash look at a few more regions.
//!
//! Region size: the smallest power of two that is a multiple of the chunk size, at least
//! [`MIN_REGION_BYTES`], and small enough that the bitmap fits its 1020 KiB area.
//! The bitmap is stored as plain bytes (bit `r % 8` of byte `r / 8` is region `r`) at
//! `BITMAP_OFFSET_BYTES`, written in whole [`BITMAP_BLOCK_BYTES`] blocks.

use crate::superblock::{BitmapGeometry, BITMAP_MAX_BYTES, BITMAP_OFFSET_BYTES};
use std::collections::HashMap;

/// Smallest default region (a smaller one can be asked for at create time).
pub const MIN_REGION_BYTES: u64 = 4 << 20;
/// Unit of bitmap writes.
pub const BITMAP_BLOCK_BYTES: u64 = 4096;
/// Regions set ahead of a sequential stream entering a new region (see the module docs): the
/// stream then waits for the bitmap at one boundary in `SET_AHEAD_REGIONS + 1`.
pub const SET_AHEAD_REGIONS: u64 = 3;

/// Picks the region size for `member_data_bytes` with `chunk_bytes` chunks; `wanted` overrides the
/// minimum (rounded up to a power of two and a whole number of chunks).
pub fn geometry(member_data_bytes: u64, chunk_bytes: u64, wanted: Option<u64>) -> BitmapGeometry {
    let max_bits = BITMAP_MAX_BYTES * 8;
    let floor = member_data_bytes.div_ceil(max_bits);
    let mut region = wanted
        .unwrap_or(MIN_REGION_BYTES)
        .max(chunk_bytes)
        .max(floor);
    region = region.next_power_of_two();
    BitmapGeometry {
        offset: BITMAP_OFFSET_BYTES,
        region_bytes: region,
        bits: member_data_bytes.div_ceil(region).max(1),
    }
}

/// In-memory write-intent bitmap with in-flight accounting.
#[derive(Debug, Clone)]
pub struct Bitmap {
    geo: BitmapGeometry,
    bytes: Vec<u8>,
    /// Per set region: writes in flight, and the flush epoch in which the last one completed.
    active: HashMap<u64, (u32, u64)>,
    epoch: u64,
    /// Blocks with bits set in memory and not yet durable on the members.
    pending_blocks: std::collections::BTreeSet<u64>,
    /// Counts bit-setting changes; `durable_gen` is the newest one known durable.
    set_gen: u64,
    durable_gen: u64,
}

impl Bitmap {
    /// An empty bitmap.
    pub fn new(geo: BitmapGeometry) -> Bitmap {
        Bitmap::from_bytes(geo, &[])
    }

    /// A bitmap loaded from its stored bytes (missing bytes read as zero).
    pub fn from_bytes(geo: BitmapGeometry, stored: &[u8]) -> Bitmap {
        let len = geo.bits.div_ceil(8) as usize;
        let mut bytes = vec![0u8; len];
        let n = stored.len().min(len);
        bytes[..n].copy_from_slice(&stored[..n]);
        // Bits past the end are meaningless; keep them clear.
        if !geo.bits.is_multiple_of(8) {
            bytes[len - 1] &= (1u8 << (geo.bits % 8)) - 1;
        }
        let mut active = HashMap::new();
        for r in 0..geo.bits {
            if bytes[(r / 8) as usize] & (1 << (r % 8)) != 0 {
                active.insert(r, (0, 0));
            }
        }
        Bitmap {
            geo,
            bytes,
            active,
            epoch: 1,
            pending_blocks: std::collections::BTreeSet::new(),
            set_gen: 0,
            durable_gen: 0,
        }
    }

    pub fn geometry(&self) -> BitmapGeometry {
        self.geo
    }

    /// Bytes of the stored form (rounded up to whole blocks).
    pub fn stored_len(&self) -> u64 {
        (self.bytes.len() as u64).div_ceil(BITMAP_BLOCK_BYTES) * BITMAP_BLOCK_BYTES
    }

    /// Regions covering member data offsets `[start, end)`.
    pub fn regions(&self, start: u64, end: u64) -> std::ops::Range<u64> {
        if end <= start {
            return 0..0;
        }
        let first = start / self.geo.region_bytes;
        let last = ((end - 1) / self.geo.region_bytes + 1).min(self.geo.bits);
        first..last
    }

    /// Member data offsets covered by `region`.
    pub fn region_range(&self, region: u64) -> std::ops::Range<u64> {
        region * self.geo.region_bytes..(region + 1) * self.geo.region_bytes
    }

    pub fn is_set(&self, region: u64) -> bool {
        self.bytes
            .get((region / 8) as usize)
            .is_some_and(|b| b & (1 << (region % 8)) != 0)
    }

    /// Registers a write starting in `regions`; returns the stored blocks (block index) whose bits
    /// changed and must be written before the data write may be issued.
    pub fn begin_write(&mut self, regions: std::ops::Range<u64>) -> Vec<u64> {
        let mut blocks = Vec::new();
        let mut newly_set_last = None;
        for r in regions.clone() {
            let entry = self.active.entry(r).or_insert((0, 0));
            entry.0 += 1;
            if self.set_bit(r, &mut blocks) {
                newly_set_last = Some(r);
            }
        }
        // A stream coming from the region before the first it newly set: set ahead of it.
        if let Some(last) = newly_set_last {
            if (regions.start > 0 && self.is_set(regions.start - 1)) || regions.start < last {
                let ahead_end = (last + 1 + SET_AHEAD_REGIONS).min(self.geo.bits);
                for r in last + 1..ahead_end {
                    if self.set_bit(r, &mut blocks) {
                        // No write in flight: idle as of now, cleared by the next flush.
                        self.active.entry(r).or_insert((0, self.epoch));
                    }
                }
            }
        }
        blocks.sort_unstable();
        blocks.dedup();
        blocks
    }

    /// Sets region `r`'s bit; true (and its block added to `blocks`) if it was clear.
    fn set_bit(&mut self, r: u64, blocks: &mut Vec<u64>) -> bool {
        let byte = (r / 8) as usize;
        if self.bytes[byte] & (1 << (r % 8)) != 0 {
            return false;
        }
        self.bytes[byte] |= 1 << (r % 8);
        let block = byte as u64 / BITMAP_BLOCK_BYTES;
        if blocks.last() != Some(&block) {
            blocks.push(block);
        }
        true
    }

    /// Like [`Bitmap::begin_write`], for a writer that must not issue its data write before the
    /// bits covering it are durable (set-before-write). Returns the generation that must be
    /// durable first ([`Bitmap::is_durable`]); 0 when nothing is pending. A bit set by another
    /// writer whose bitmap write is still in flight counts as pending too.
    pub fn begin_write_durable(&mut self, regions: std::ops::Range<u64>) -> u64 {
        let blocks = self.begin_write(regions);
        if !blocks.is_empty() {
            self.set_gen += 1;
            self.pending_blocks.extend(blocks);
        }
        if self.pending_blocks.is_empty() && self.durable_gen == self.set_gen {
            0
        } else {
            self.set_gen
        }
    }

    /// True when every bit-setting change up to `gen` is durable.
    pub fn is_durable(&self, gen: u64) -> bool {
        self.durable_gen >= gen
    }

    /// Takes the blocks waiting to be made durable, and the generation they cover. One bitmap
    /// write and sync then serves every writer waiting on a generation up to it.
    pub fn take_pending(&mut self) -> (Vec<u64>, u64) {
        let blocks = std::mem::take(&mut self.pending_blocks)
            .into_iter()
            .collect();
        (blocks, self.set_gen)
    }

    /// The blocks taken with generation `gen` are written and synced.
    pub fn mark_durable(&mut self, gen: u64) {
        self.durable_gen = self.durable_gen.max(gen);
    }

    /// Registers the completion of a write registered by [`Bitmap::begin_write`].
    pub fn end_write(&mut self, regions: std::ops::Range<u64>) {
        for r in regions {
            if let Some(e) = self.active.get_mut(&r) {
                e.0 = e.0.saturating_sub(1);
                e.1 = self.epoch;
            }
        }
    }

    /// Called before a flush syncs the members: returns the epoch the flush covers.
    pub fn start_flush(&mut self) -> u64 {
        let e = self.epoch;
        self.epoch += 1;
        e
    }

    /// After a successful sync that started at `epoch`: clears idle regions whose writes all
    /// completed in or before `epoch`. Returns the blocks to write.
    pub fn finish_flush(&mut self, epoch: u64) -> Vec<u64> {
        let idle: Vec<u64> = self
            .active
            .iter()
            .filter(|(_, (inflight, done))| *inflight == 0 && *done <= epoch)
            .map(|(r, _)| *r)
            .collect();
        let mut blocks: Vec<u64> = Vec::new();
        for r in idle {
            self.active.remove(&r);
            self.bytes[(r / 8) as usize] &= !(1 << (r % 8));
            blocks.push(r / 8 / BITMAP_BLOCK_BYTES);
        }
        blocks.sort_unstable();
        blocks.dedup();
        blocks
    }

    /// Clears one region's bit (after it was resynchronised); returns its block.
    pub fn clear(&mut self, region: u64) -> u64 {
        if !matches!(self.active.get(&region), Some(e) if e.0 > 0) {
            self.active.remove(&region);
            self.bytes[(region / 8) as usize] &= !(1 << (region % 8));
        }
        region / 8 / BITMAP_BLOCK_BYTES
    }

    /// Every set region, ascending.
    pub fn dirty_regions(&self) -> Vec<u64> {
        (0..self.geo.bits).filter(|r| self.is_set(*r)).collect()
    }

    /// The stored bytes of block `block` (always [`BITMAP_BLOCK_BYTES`] long).
    pub fn block_bytes(&self, block: u64) -> Vec<u8> {
        let mut out = vec![0u8; BITMAP_BLOCK_BYTES as usize];
        let start = (block * BITMAP_BLOCK_BYTES) as usize;
        if start < self.bytes.len() {
            let end = (start + BITMAP_BLOCK_BYTES as usize).min(self.bytes.len());
            out[..end - start].copy_from_slice(&self.bytes[start..end]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bm() -> Bitmap {
        Bitmap::new(geometry(64 << 20, 65536, Some(1 << 20)))
    }

    #[test]
    fn region_size_fits_the_bitmap_area() {
        let g = geometry(16 << 40, 65536, None);
        assert!(g.bits.div_ceil(8) <= BITMAP_MAX_BYTES);
        assert!(g.region_bytes.is_power_of_two());
        assert_eq!(
            geometry(64 << 20, 65536, None).region_bytes,
            MIN_REGION_BYTES
        );
    }

    #[test]
    fn first_write_to_a_region_needs_a_bitmap_write_and_later_ones_do_not() {
        let mut b = bm();
        assert_eq!(b.begin_write(b.regions(0, 4096)), vec![0]);
        assert!(b.begin_write(b.regions(100, 4096)).is_empty());
        assert!(b.is_set(0));
    }

    #[test]
    fn bit_stays_set_until_a_flush_after_the_write_completed() {
        let mut b = bm();
        let rs = b.regions(3 << 20, (3 << 20) + 10);
        b.begin_write(rs.clone());
        let e = b.start_flush();
        assert!(b.finish_flush(e).is_empty(), "write still in flight");
        b.end_write(rs.clone());
        // completed after that flush's sync started: not covered by it
        let e = b.start_flush();
        b.end_write(rs.clone()); // no-op for counts, stamps a newer epoch
        assert!(b.finish_flush(e).is_empty());
        let e = b.start_flush();
        assert_eq!(b.finish_flush(e), vec![0]);
        assert!(!b.is_set(3));
    }

    #[test]
    fn a_stream_entering_a_region_sets_the_next_ones_in_the_same_change() {
        let mut b = bm();
        let mb = 1u64 << 20;
        // Region 0, from nothing before it: no set-ahead.
        b.begin_write_durable(b.regions(0, 4096));
        assert_eq!(b.dirty_regions(), vec![0]);
        let (_, gen) = b.take_pending();
        b.mark_durable(gen);
        // The stream crosses into region 1: regions 2..=4 are set with it, in one block write.
        let g = b.begin_write_durable(b.regions(mb - 4096, mb + 4096));
        assert!(g > 0);
        assert_eq!(b.dirty_regions(), vec![0, 1, 2, 3, 4]);
        let (blocks, gen) = b.take_pending();
        assert_eq!(blocks, vec![0]);
        b.mark_durable(gen);
        // Entering the regions set ahead waits for nothing.
        for r in 2..=4 {
            assert_eq!(b.begin_write_durable(b.regions(r * mb, r * mb + 4096)), 0);
        }
        // Entering region 5 sets 6..=8.
        assert!(b.begin_write_durable(b.regions(5 * mb, 5 * mb + 4096)) > 0);
        assert_eq!(b.dirty_regions(), (0..=8).collect::<Vec<_>>());
    }

    #[test]
    fn an_isolated_write_sets_only_its_own_region() {
        let mut b = bm();
        b.begin_write_durable(b.regions(10 << 20, (10 << 20) + 4096));
        assert_eq!(b.dirty_regions(), vec![10]);
    }

    #[test]
    fn regions_set_ahead_and_never_written_are_cleared_by_the_next_flush() {
        let mut b = bm();
        let rs0 = b.regions(0, 4096);
        b.begin_write(rs0.clone());
        let rs1 = b.regions((1 << 20) - 4096, (1 << 20) + 4096);
        b.begin_write(rs1.clone());
        assert_eq!(b.dirty_regions(), vec![0, 1, 2, 3, 4]);
        // Region 2 gets a write that is still in flight at the flush; 3 and 4 stay idle.
        let rs2 = b.regions(2 << 20, (2 << 20) + 4096);
        b.begin_write(rs2.clone());
        b.end_write(rs0);
        b.end_write(rs1);
        let e = b.start_flush();
        b.finish_flush(e);
        assert_eq!(
            b.dirty_regions(),
            vec![2],
            "only the region with a write in flight"
        );
        b.end_write(rs2);
    }

    #[test]
    fn set_ahead_stops_at_the_last_region() {
        let mut b = bm();
        let last = b.geometry().bits - 1;
        let mb = 1u64 << 20;
        b.begin_write(b.regions(last * mb - 4096, last * mb + 4096));
        assert_eq!(b.dirty_regions(), vec![last - 1, last]);
    }

    #[test]
    fn stored_bytes_load_back_with_their_dirty_regions() {
        let mut b = bm();
        b.begin_write(b.regions(5 << 20, 6 << 20));
        let again = Bitmap::from_bytes(b.geometry(), &b.block_bytes(0));
        assert_eq!(again.dirty_regions(), vec![5]);
    }

    #[test]
    fn writers_wait_for_bits_others_set_until_one_sync_covers_them() {
        let mut b = bm();
        let g1 = b.begin_write_durable(b.regions(0, 4096));
        assert!(g1 > 0 && !b.is_durable(g1));
        // Same region, bit already set in memory but not durable yet: must wait too.
        let g2 = b.begin_write_durable(b.regions(100, 4096));
        assert!(!b.is_durable(g2));
        let g3 = b.begin_write_durable(b.regions(9 << 20, (9 << 20) + 10));
        let (blocks, gen) = b.take_pending();
        assert_eq!(blocks, vec![0], "one block write for all three");
        b.mark_durable(gen);
        assert!(b.is_durable(g1) && b.is_durable(g2) && b.is_durable(g3));
        assert_eq!(
            b.begin_write_durable(b.regions(0, 10)),
            0,
            "nothing pending"
        );
    }
}
