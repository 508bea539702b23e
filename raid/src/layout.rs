//! Address math for every RAID level, with no I/O.
//!
//! Each member's data area (starting at `data_offset`, see `superblock`) is cut into chunks of
//! `chunk_bytes`. Chunk number `row` on every member forms row `row` (for parity levels: one stripe).
//! The array's logical space is cut into data chunks `k = offset / chunk_bytes`, each placed on one
//! or more (member, row) positions:
//!
//! | level | data chunks per row | placement of data chunk `k` |
//! | --- | --- | --- |
//! | 0 | n | member `k % n`, row `k / n` |
//! | 1 | 1 | every member, row `k` |
//! | 5 | n-1 | row `k / (n-1)`; parity P on member `n-1 - row % n`; data `i` on `(P + 1 + i) % n` (left-symmetric, md's default) |
//! | 6 | n-2 | row `k / (n-2)`; P on `n-1 - row % n`, Q on `(P + 1) % n`, data `i` on `(P + 2 + i) % n` |
//! | 10 | n/2 | near-2 copies: slots `2k` and `2k+1`, slot `s` = member `s % n`, row `s / n` (odd n allowed) |

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// RAID level of an array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Raid0,
    Raid1,
    Raid5,
    Raid6,
    Raid10,
}

impl Level {
    /// The number stored in the superblock (the level's usual name).
    pub fn code(self) -> u32 {
        match self {
            Level::Raid0 => 0,
            Level::Raid1 => 1,
            Level::Raid5 => 5,
            Level::Raid6 => 6,
            Level::Raid10 => 10,
        }
    }

    /// Inverse of [`Level::code`].
    pub fn from_code(code: u32) -> Option<Level> {
        Some(match code {
            0 => Level::Raid0,
            1 => Level::Raid1,
            5 => Level::Raid5,
            6 => Level::Raid6,
            10 => Level::Raid10,
            _ => return None,
        })
    }

    /// Fewest members an array of this level can have.
    pub fn min_members(self) -> usize {
        match self {
            Level::Raid0 => 1,
            Level::Raid1 | Level::Raid10 => 2,
            Level::Raid5 => 3,
            Level::Raid6 => 4,
        }
    }

    /// Parity chunks per row (0 for levels without parity).
    pub fn parity_chunks(self) -> usize {
        match self {
            Level::Raid5 => 1,
            Level::Raid6 => 2,
            _ => 0,
        }
    }

    /// Parses "raid5", "5", "RAID-6" and so on.
    pub fn parse(text: &str) -> Option<Level> {
        let t = text.trim().to_ascii_lowercase();
        let t = t.trim_start_matches("raid").trim_start_matches('-');
        t.parse::<u32>().ok().and_then(Level::from_code)
    }
}

impl std::fmt::Display for Level {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "raid{}", self.code())
    }
}

/// Why a geometry cannot be built.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum LayoutError {
    #[error("{level} needs at least {min} members, got {got}")]
    TooFewMembers {
        level: Level,
        min: usize,
        got: usize,
    },
    #[error("{level} supports at most {max} members, got {got}")]
    TooManyMembers {
        level: Level,
        max: usize,
        got: usize,
    },
    #[error("chunk size {chunk_bytes} bytes must be a power of two between {min} and {max} bytes")]
    BadChunk {
        chunk_bytes: u64,
        min: u64,
        max: u64,
    },
    #[error("members hold {member_bytes} data bytes each, less than one {chunk_bytes}-byte chunk")]
    TooSmall { member_bytes: u64, chunk_bytes: u64 },
}

/// Smallest chunk accepted (one 4 KiB block, so chunks stay O_DIRECT-aligned).
pub const MIN_CHUNK_BYTES: u64 = 4096;
/// Largest chunk accepted.
pub const MAX_CHUNK_BYTES: u64 = 16 << 20;
/// Most members in one array (bounded by the superblock's member table).
pub const MAX_MEMBERS: usize = 64;

/// What a member's chunk holds in a parity row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkRole {
    /// Data chunk number `i` of the row (0-based).
    Data(usize),
    P,
    Q,
}

/// One place a data chunk lives: member index and row (chunk number on that member).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Place {
    pub member: usize,
    pub row: u64,
}

/// A piece of a logical request that falls in one data chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Logical data chunk number.
    pub chunk: u64,
    /// Byte offset inside the chunk.
    pub offset_in_chunk: u64,
    /// Length in bytes.
    pub len: u64,
    /// Offset of this piece inside the caller's buffer.
    pub buf_offset: u64,
}

/// The shape of one array: level, member count, chunk size and rows per member.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub level: Level,
    pub members: usize,
    pub chunk_bytes: u64,
    /// Chunks per member data area.
    pub rows: u64,
}

impl Geometry {
    /// Builds a geometry using `member_data_bytes` of each member (rounded down to whole chunks).
    pub fn new(
        level: Level,
        members: usize,
        chunk_bytes: u64,
        member_data_bytes: u64,
    ) -> Result<Geometry, LayoutError> {
        if members < level.min_members() {
            return Err(LayoutError::TooFewMembers {
                level,
                min: level.min_members(),
                got: members,
            });
        }
        if members > MAX_MEMBERS {
            return Err(LayoutError::TooManyMembers {
                level,
                max: MAX_MEMBERS,
                got: members,
            });
        }
        if !chunk_bytes.is_power_of_two()
            || !(MIN_CHUNK_BYTES..=MAX_CHUNK_BYTES).contains(&chunk_bytes)
        {
            return Err(LayoutError::BadChunk {
                chunk_bytes,
                min: MIN_CHUNK_BYTES,
                max: MAX_CHUNK_BYTES,
            });
        }
        let rows = member_data_bytes / chunk_bytes;
        if rows == 0 {
            return Err(LayoutError::TooSmall {
                member_bytes: member_data_bytes,
                chunk_bytes,
            });
        }
        Ok(Geometry {
            level,
            members,
            chunk_bytes,
            rows,
        })
    }

    /// Data chunks per row (the stripe width in chunks).
    pub fn data_per_row(&self) -> usize {
        match self.level {
            Level::Raid0 => self.members,
            Level::Raid1 => 1,
            Level::Raid5 => self.members - 1,
            Level::Raid6 => self.members - 2,
            Level::Raid10 => (self.members / 2).max(1),
        }
    }

    /// Number of logical data chunks.
    pub fn data_chunks(&self) -> u64 {
        match self.level {
            Level::Raid10 => self.rows * self.members as u64 / 2,
            _ => self.rows * self.data_per_row() as u64,
        }
    }

    /// Logical size of the array in bytes.
    pub fn size_bytes(&self) -> u64 {
        self.data_chunks() * self.chunk_bytes
    }

    /// Bytes of each member's data area in use.
    pub fn member_data_bytes(&self) -> u64 {
        self.rows * self.chunk_bytes
    }

    /// Data bytes in one full stripe (writes of this size and alignment skip read-modify-write).
    pub fn stripe_bytes(&self) -> u64 {
        match self.level {
            Level::Raid1 | Level::Raid10 => self.chunk_bytes,
            _ => self.data_per_row() as u64 * self.chunk_bytes,
        }
    }

    /// Where the copies of logical data chunk `k` live (one place except for mirrors).
    pub fn places(&self, k: u64) -> Vec<Place> {
        if let Some(place) = self.single_place(k) {
            return vec![place];
        }
        let n = self.members as u64;
        match self.level {
            Level::Raid1 => (0..self.members)
                .map(|member| Place { member, row: k })
                .collect(),
            Level::Raid10 => [2 * k, 2 * k + 1]
                .iter()
                .map(|&s| Place {
                    member: (s % n) as usize,
                    row: s / n,
                })
                .collect(),
            // Single-copy levels were answered by `single_place` above.
            Level::Raid0 | Level::Raid5 | Level::Raid6 => Vec::new(),
        }
    }

    /// Where logical data chunk `k` lives when it has exactly one copy (RAID 0, 5, 6); `None`
    /// for mirrored levels. The same place as [`Geometry::places`] gives, without its vector
    /// (a small read's hot path).
    pub fn single_place(&self, k: u64) -> Option<Place> {
        let n = self.members as u64;
        match self.level {
            Level::Raid0 => Some(Place {
                member: (k % n) as usize,
                row: k / n,
            }),
            Level::Raid5 | Level::Raid6 => {
                let d = self.data_per_row() as u64;
                let row = k / d;
                Some(Place {
                    member: self.data_member(row, (k % d) as usize),
                    row,
                })
            }
            Level::Raid1 | Level::Raid10 => None,
        }
    }

    /// The one extent of `offset..offset+len` when the range is not empty and lies inside one
    /// chunk; `None` otherwise (use [`Geometry::extents`]).
    pub fn single_extent(&self, offset: u64, len: u64) -> Option<Extent> {
        let offset_in_chunk = offset % self.chunk_bytes;
        if len == 0 || len > self.chunk_bytes - offset_in_chunk {
            return None;
        }
        Some(Extent {
            chunk: offset / self.chunk_bytes,
            offset_in_chunk,
            len,
            buf_offset: 0,
        })
    }

    /// Parity levels: the member holding P in `row`.
    pub fn p_member(&self, row: u64) -> usize {
        let n = self.members as u64;
        (n - 1 - row % n) as usize
    }

    /// RAID 6: the member holding Q in `row`.
    pub fn q_member(&self, row: u64) -> usize {
        (self.p_member(row) + 1) % self.members
    }

    /// Parity levels: the member holding data chunk `i` of `row`.
    pub fn data_member(&self, row: u64, i: usize) -> usize {
        let skip = self.level.parity_chunks();
        (self.p_member(row) + skip + i) % self.members
    }

    /// Parity levels: what `member` holds in `row`.
    pub fn role(&self, row: u64, member: usize) -> ChunkRole {
        let n = self.members;
        let p = self.p_member(row);
        let rel = (member + n - p) % n;
        match (self.level, rel) {
            (_, 0) => ChunkRole::P,
            (Level::Raid6, 1) => ChunkRole::Q,
            (level, rel) => ChunkRole::Data(rel - level.parity_chunks()),
        }
    }

    /// RAID 10: the logical chunk held at (`member`, `row`), or `None` for the unused last slot.
    pub fn raid10_chunk_at(&self, member: usize, row: u64) -> Option<u64> {
        let slot = row * self.members as u64 + member as u64;
        let k = slot / 2;
        (k < self.data_chunks()).then_some(k)
    }

    /// Splits a logical byte range into per-chunk extents.
    pub fn extents(&self, offset: u64, len: u64) -> Vec<Extent> {
        let mut out = Vec::new();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let chunk = pos / self.chunk_bytes;
            let offset_in_chunk = pos % self.chunk_bytes;
            let take = (self.chunk_bytes - offset_in_chunk).min(end - pos);
            out.push(Extent {
                chunk,
                offset_in_chunk,
                len: take,
                buf_offset: pos - offset,
            });
            pos += take;
        }
        out
    }

    /// The row a logical chunk belongs to for locking and stripe grouping (parity levels: its
    /// stripe; others: the first copy's row).
    pub fn lock_rows(&self, k: u64) -> Vec<u64> {
        let mut rows: Vec<u64> = self.places(k).iter().map(|p| p.row).collect();
        rows.sort_unstable();
        rows.dedup();
        rows
    }

    /// Whether the array can still serve every byte when the members with `down[m] == true` are
    /// unusable.
    pub fn survives(&self, down: &[bool]) -> bool {
        let failed = down.iter().filter(|d| **d).count();
        match self.level {
            Level::Raid0 => failed == 0,
            Level::Raid1 => failed < self.members,
            Level::Raid5 | Level::Raid6 => failed <= self.level.parity_chunks(),
            Level::Raid10 => {
                let n = self.members as u64;
                // Chunk k uses slots 2k and 2k+1; their member pairs repeat with period n.
                (0..n.min(self.data_chunks()))
                    .all(|k| self.places(k).iter().any(|p| !down[p.member]))
            }
        }
    }
}

/// The content every member's data area holds for the logical image `logical` (a "fresh encode").
/// `logical.len()` must equal `geo.size_bytes()`. Used by tests and by scrub's reasoning.
pub fn encode_members(geo: &Geometry, logical: &[u8]) -> Vec<Vec<u8>> {
    let c = geo.chunk_bytes as usize;
    let mut out = vec![vec![0u8; geo.member_data_bytes() as usize]; geo.members];
    for k in 0..geo.data_chunks() {
        let src = &logical[k as usize * c..(k as usize + 1) * c];
        for p in geo.places(k) {
            let at = p.row as usize * c;
            out[p.member][at..at + c].copy_from_slice(src);
        }
    }
    if geo.level.parity_chunks() > 0 {
        let d = geo.data_per_row();
        for row in 0..geo.rows {
            let at = row as usize * c;
            let data: Vec<Vec<u8>> = (0..d)
                .map(|i| out[geo.data_member(row, i)][at..at + c].to_vec())
                .collect();
            let refs: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
            let mut p = vec![0u8; c];
            let mut q = vec![0u8; c];
            let want_q = geo.level == Level::Raid6;
            crate::parity::gen_pq(&refs, &mut p, if want_q { Some(&mut q) } else { None });
            out[geo.p_member(row)][at..at + c].copy_from_slice(&p);
            if want_q {
                out[geo.q_member(row)][at..at + c].copy_from_slice(&q);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn geo(level: Level, n: usize) -> Geometry {
        Geometry::new(level, n, 4096, 4096 * 12).unwrap()
    }

    #[test]
    fn single_place_is_the_one_place_of_single_copy_levels() {
        for (level, n) in [
            (Level::Raid0, 3),
            (Level::Raid5, 4),
            (Level::Raid6, 5),
            (Level::Raid1, 2),
            (Level::Raid10, 4),
        ] {
            let g = geo(level, n);
            for k in 0..g.data_chunks() {
                let all = g.places(k);
                let expected = (all.len() == 1).then(|| all[0]);
                assert_eq!(g.single_place(k), expected, "{level:?} chunk {k}");
            }
        }
    }

    #[test]
    fn single_extent_is_the_extent_list_when_it_has_one_entry() {
        let g = geo(Level::Raid5, 4);
        for (offset, len) in [
            (0, 4096),
            (4096, 4096),
            (8192 + 100, 300),
            (4000, 200),
            (0, 8192),
            (5, 0),
        ] {
            let all = g.extents(offset, len);
            let expected = (all.len() == 1).then(|| all[0]);
            assert_eq!(g.single_extent(offset, len), expected, "{offset}+{len}");
        }
    }

    #[test]
    fn raid5_is_left_symmetric_like_md() {
        let g = geo(Level::Raid5, 4);
        // row 0: P on member 3, data 0,1,2 on members 0,1,2
        assert_eq!(g.p_member(0), 3);
        assert_eq!(
            (0..3).map(|i| g.data_member(0, i)).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        // row 1: P on member 2, data on 3,0,1
        assert_eq!(g.p_member(1), 2);
        assert_eq!(
            (0..3).map(|i| g.data_member(1, i)).collect::<Vec<_>>(),
            vec![3, 0, 1]
        );
    }

    #[test]
    fn every_member_chunk_has_exactly_one_role_per_row() {
        for (level, n) in [
            (Level::Raid5, 3),
            (Level::Raid5, 5),
            (Level::Raid6, 4),
            (Level::Raid6, 7),
        ] {
            let g = geo(level, n);
            for row in 0..g.rows {
                let roles: Vec<ChunkRole> = (0..n).map(|m| g.role(row, m)).collect();
                assert_eq!(roles.iter().filter(|r| **r == ChunkRole::P).count(), 1);
                for i in 0..g.data_per_row() {
                    assert_eq!(g.role(row, g.data_member(row, i)), ChunkRole::Data(i));
                }
                if level == Level::Raid6 {
                    assert_eq!(g.role(row, g.q_member(row)), ChunkRole::Q);
                }
            }
        }
    }

    #[test]
    fn data_chunks_never_share_a_place() {
        for (level, n) in [
            (Level::Raid0, 3),
            (Level::Raid1, 3),
            (Level::Raid5, 4),
            (Level::Raid6, 5),
            (Level::Raid10, 4),
            (Level::Raid10, 3),
        ] {
            let g = geo(level, n);
            let mut seen = HashSet::new();
            for k in 0..g.data_chunks() {
                for p in g.places(k) {
                    assert!(p.row < g.rows, "{level} n={n} chunk {k} row out of range");
                    assert!(seen.insert((p.member, p.row)), "{level} n={n} place reused");
                }
            }
        }
    }

    #[test]
    fn raid10_tolerates_one_failure_per_mirror_pair() {
        let g = geo(Level::Raid10, 4);
        assert!(g.survives(&[true, false, true, false]));
        assert!(!g.survives(&[true, true, false, false]));
        let g3 = geo(Level::Raid10, 3);
        assert!(g3.survives(&[true, false, false]));
        assert!(!g3.survives(&[true, true, false]));
    }

    #[test]
    fn extents_split_at_chunk_boundaries() {
        let g = geo(Level::Raid0, 2);
        let e = g.extents(4000, 5000);
        assert_eq!(e.len(), 3);
        assert_eq!(
            e[0],
            Extent {
                chunk: 0,
                offset_in_chunk: 4000,
                len: 96,
                buf_offset: 0
            }
        );
        assert_eq!(e[2].len, 5000 - 96 - 4096);
    }

    #[test]
    fn level_parses_common_spellings() {
        assert_eq!(Level::parse("raid5"), Some(Level::Raid5));
        assert_eq!(Level::parse("RAID-6"), Some(Level::Raid6));
        assert_eq!(Level::parse("10"), Some(Level::Raid10));
        assert_eq!(Level::parse("raid4"), None);
    }
}
