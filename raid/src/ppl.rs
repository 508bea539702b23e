//! Partial-parity log (PPL) entries of a degraded RAID 5/6 array: what is logged before a stripe
//! update, how it is encoded, and how recovery turns it back into parity. Pure: no I/O.
//!
//! The write hole of a degraded array: a power cut in the middle of a stripe update can leave a
//! data block written and its parity not (or the reverse, or either torn). A healthy array
//! recomputes such parity from the data after the cut; a degraded one cannot, because a block of
//! the stripe lives only in the parity, and that block then reads wrong forever. md's answer
//! (PPL) is used here: before each update of a row, the array logs the *partial parity* of the
//! parity columns the update writes, that is the XOR of the data the update leaves alone. After
//! a cut, `partial parity ^ (whatever the touched blocks hold now)` is a parity that agrees with
//! every present block *and* with the absent block's intended contents, whatever state the update
//! reached. The array hands these entries to the NVRAM journal ([`crate::array::PartialParityLog`]),
//! which persists them before the stripe is written and retires them at the end of the
//! consistency point.
//!
//! Logged per parity write run of one row:
//! - `touched`: the byte ranges the update writes on *present* data members (recovery reads
//!   them back from the members, in whatever state the cut left them);
//! - `partial`: `P_new ^ (new bytes of those ranges)`. New bytes written for an *absent* data
//!   member are left folded into it: they exist nowhere else, and recovery must put them into
//!   the parity.
//!
//! RAID 6: only P is logged (as md does). Recovery computes P from the entry, recovers the one
//! absent data block of each column from P (at most one may be absent: a RAID 6 array missing two
//! members is not protected, and its unclean start is refused), and computes Q afresh from the
//! full data. A row whose only absent member is a parity chunk needs no partial parity in RAID 5
//! (nothing depends on it); in RAID 6 it is logged like the others, and recovery recomputes the
//! present parity from the data.
//!
//! `docs/FORMATS.md` ("Partial-parity log entries") documents the byte layout; bump
//! [`PPL_FORMAT_VERSION`] on any change.

use crate::parity;
use crate::rowplan::{Piece, Run, COLUMN_BYTES};

/// Version of the payload layout described here.
pub const PPL_FORMAT_VERSION: u16 = 1;
/// First bytes of a PPL payload ("TBPL").
pub const PPL_MAGIC: u32 = u32::from_le_bytes(*b"TBPL");
/// Bytes of the payload header.
pub const PPL_HEADER_BYTES: usize = 16;
/// Bytes of one entry header (before its touched ranges and partial parity).
pub const PPL_ENTRY_HEADER_BYTES: usize = 24;
/// Bytes of one touched range.
pub const PPL_TOUCHED_BYTES: usize = 20;
/// Payload flag: every entry logged before this payload is void (the array was whole again
/// in between); recovery starts after the last payload carrying it.
pub const PPL_FLAG_RESET: u16 = 1;

/// One logged parity write run of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PplEntry {
    /// Row (chunk number on the members).
    pub row: u64,
    /// Parity columns `[first_column, first_column + columns)` of the row.
    pub first_column: u64,
    pub columns: u64,
    /// Byte ranges (chunk-relative, inside the run) the update writes on present data members.
    pub touched: Vec<Piece>,
    /// `columns * COLUMN_BYTES` bytes: the XOR of every data block of the run that the update
    /// leaves alone, with the new bytes of absent members folded in.
    pub partial: Vec<u8>,
}

impl PplEntry {
    /// Chunk-relative byte range of the run.
    pub fn byte_range(&self) -> (u64, u64) {
        (
            self.first_column * COLUMN_BYTES,
            (self.first_column + self.columns) * COLUMN_BYTES,
        )
    }
}

/// Why a PPL payload cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PplError {
    #[error("partial-parity payload: {0}")]
    Malformed(String),
    #[error(
        "partial-parity payload version {found} is not supported (this build reads {supported})"
    )]
    Version { found: u16, supported: u16 },
    #[error("partial-parity entry of row {row}: {what}")]
    Entry { row: u64, what: String },
}

/// The entries of one row update: for each parity write run `p_runs[k]` with new parity bytes
/// `p_new[k]`, the partial parity and the ranges of `pieces` on data roles not marked `absent`.
pub fn entries_for_row(
    row: u64,
    p_runs: &[Run],
    p_new: &[&[u8]],
    pieces: &[(Piece, &[u8])],
    absent: &[bool],
) -> Vec<PplEntry> {
    p_runs
        .iter()
        .zip(p_new)
        .map(|(run, p)| {
            let (lo, hi) = (run.first * COLUMN_BYTES, run.end * COLUMN_BYTES);
            let mut partial = p.to_vec();
            let mut touched = Vec::new();
            for (piece, bytes) in pieces {
                if absent.get(piece.data).copied().unwrap_or(true) {
                    continue;
                }
                let (s, e) = (piece.start.max(lo), (piece.start + piece.len).min(hi));
                if s >= e {
                    continue;
                }
                let from = (s - piece.start) as usize;
                parity::xor_into(
                    &mut partial[(s - lo) as usize..(e - lo) as usize],
                    &bytes[from..from + (e - s) as usize],
                );
                touched.push(Piece {
                    data: piece.data,
                    start: s,
                    len: e - s,
                });
            }
            PplEntry {
                row,
                first_column: run.first,
                columns: run.columns(),
                touched,
                partial,
            }
        })
        .collect()
}

/// Encodes one payload (the entries of one row update, or a reset marker with none).
pub fn encode(flags: u16, entries: &[PplEntry]) -> Vec<u8> {
    let body: usize = entries
        .iter()
        .map(|e| PPL_ENTRY_HEADER_BYTES + e.touched.len() * PPL_TOUCHED_BYTES + e.partial.len())
        .sum();
    let mut b = Vec::with_capacity(PPL_HEADER_BYTES + body);
    b.extend_from_slice(&PPL_MAGIC.to_le_bytes());
    b.extend_from_slice(&PPL_FORMAT_VERSION.to_le_bytes());
    b.extend_from_slice(&flags.to_le_bytes());
    b.extend_from_slice(&(entries.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    for e in entries {
        b.extend_from_slice(&e.row.to_le_bytes());
        b.extend_from_slice(&(e.first_column as u32).to_le_bytes());
        b.extend_from_slice(&(e.columns as u32).to_le_bytes());
        b.extend_from_slice(&(e.touched.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for t in &e.touched {
            b.extend_from_slice(&(t.data as u32).to_le_bytes());
            b.extend_from_slice(&t.start.to_le_bytes());
            b.extend_from_slice(&t.len.to_le_bytes());
        }
        b.extend_from_slice(&e.partial);
    }
    b
}

/// A little-endian reader that reports truncation instead of panicking.
struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], PplError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.b.len());
        let Some(end) = end else {
            return Err(PplError::Malformed(format!(
                "truncated at byte {} of {} (needs {n} more)",
                self.at,
                self.b.len()
            )));
        };
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
    fn u16(&mut self) -> Result<u16, PplError> {
        let s = self.take(2)?;
        Ok(u16::from_le_bytes([s[0], s[1]]))
    }
    fn u32(&mut self) -> Result<u32, PplError> {
        let mut a = [0u8; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    fn u64(&mut self) -> Result<u64, PplError> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
}

/// Decodes one payload: its flags and entries. Checks the structure only; [`check_entry`]
/// checks an entry against the array's geometry.
pub fn decode(b: &[u8]) -> Result<(u16, Vec<PplEntry>), PplError> {
    let mut r = Reader { b, at: 0 };
    if r.u32()? != PPL_MAGIC {
        return Err(PplError::Malformed("bad magic".into()));
    }
    let version = r.u16()?;
    if version != PPL_FORMAT_VERSION {
        return Err(PplError::Version {
            found: version,
            supported: PPL_FORMAT_VERSION,
        });
    }
    let flags = r.u16()?;
    let count = r.u32()? as usize;
    r.u32()?;
    let mut entries = Vec::new();
    for _ in 0..count {
        let row = r.u64()?;
        let first_column = u64::from(r.u32()?);
        let columns = u64::from(r.u32()?);
        let n = r.u32()? as usize;
        r.u32()?;
        let mut touched = Vec::new();
        for _ in 0..n {
            touched.push(Piece {
                data: r.u32()? as usize,
                start: r.u64()?,
                len: r.u64()?,
            });
        }
        let bytes = usize::try_from(columns * COLUMN_BYTES)
            .map_err(|_| PplError::Malformed(format!("{columns} columns")))?;
        let partial = r.take(bytes)?.to_vec();
        entries.push(PplEntry {
            row,
            first_column,
            columns,
            touched,
            partial,
        });
    }
    if r.at != b.len() {
        return Err(PplError::Malformed(format!(
            "{} bytes after the last entry",
            b.len() - r.at
        )));
    }
    Ok((flags, entries))
}

/// Checks that `e` fits an array of `rows` rows, `d` data chunks of `chunk_bytes` per row.
pub fn check_entry(e: &PplEntry, rows: u64, d: usize, chunk_bytes: u64) -> Result<(), PplError> {
    let bad = |what: String| PplError::Entry { row: e.row, what };
    let (lo, hi) = e.byte_range();
    if e.row >= rows {
        return Err(bad(format!("the array has {rows} rows")));
    }
    if e.columns == 0 || hi > chunk_bytes {
        return Err(bad(format!(
            "columns {}+{} outside a chunk of {chunk_bytes} bytes",
            e.first_column, e.columns
        )));
    }
    for t in &e.touched {
        if t.data >= d || t.len == 0 || t.start < lo || t.start.saturating_add(t.len) > hi {
            return Err(bad(format!(
                "touched range {}:{}+{} outside data chunks 0..{d}, bytes {lo}..{hi}",
                t.data, t.start, t.len
            )));
        }
    }
    Ok(())
}

/// Log bytes that the entries of an update of `len` bytes can take at most, in a row geometry
/// of `stripe_bytes` data per row and `chunk_bytes` per chunk, each payload framed in at most
/// `framing_bytes` by the log that keeps it. A bound, not an estimate: each row an update
/// touches costs one payload, and within a row the parity columns are at most the columns of its
/// bytes plus the two partial columns at its ends.
pub fn bound_bytes(len: u64, stripe_bytes: u64, chunk_bytes: u64, framing_bytes: u64) -> u64 {
    if len == 0 {
        return 0;
    }
    let rows = len.div_ceil(stripe_bytes.max(1)) + 1;
    let chunk_columns = chunk_bytes.div_ceil(COLUMN_BYTES).max(1);
    let columns = (len.div_ceil(COLUMN_BYTES) + 2 * rows).min(rows * chunk_columns);
    let per_column = COLUMN_BYTES + (PPL_ENTRY_HEADER_BYTES + 2 * PPL_TOUCHED_BYTES) as u64;
    rows * (framing_bytes + PPL_HEADER_BYTES as u64) + columns * per_column
}

/// [`bound_bytes`] for a zeroing or discard of `len` bytes: whole rows are discarded on the
/// members without partial parity; the partial rows at its head and tail (each inside one row,
/// at most a stripe) are written as zeroes in calls of at most `zero_write_bytes`, each call one
/// payload of at most its columns plus two, and at most a chunk's columns.
pub fn zeroing_bound_bytes(
    len: u64,
    stripe_bytes: u64,
    chunk_bytes: u64,
    zero_write_bytes: u64,
    framing_bytes: u64,
) -> u64 {
    if len == 0 {
        return 0;
    }
    let side = len.min(stripe_bytes.max(1));
    let calls = side.div_ceil(zero_write_bytes.max(1)).max(1);
    let chunk_columns = chunk_bytes.div_ceil(COLUMN_BYTES).max(1);
    let columns = (side.div_ceil(COLUMN_BYTES) + 2 * calls).min(calls * chunk_columns);
    let per_column = COLUMN_BYTES + (PPL_ENTRY_HEADER_BYTES + 2 * PPL_TOUCHED_BYTES) as u64;
    2 * (calls * (framing_bytes + PPL_HEADER_BYTES as u64) + columns * per_column)
}

/// Recovery of one entry: the parity the run must hold now. `data[i]` holds the run's current
/// bytes of data role `i` read from its member, `None` when the member is absent. Returns P and,
/// when `with_q`, Q. Fails when a touched member is absent now, or (with Q) more than one data
/// block is absent.
pub fn repair(
    e: &PplEntry,
    data: &[Option<Vec<u8>>],
    with_q: bool,
) -> Result<(Vec<u8>, Option<Vec<u8>>), PplError> {
    let bad = |what: String| PplError::Entry { row: e.row, what };
    let (lo, _) = e.byte_range();
    let mut p = e.partial.clone();
    for t in &e.touched {
        let Some(Some(block)) = data.get(t.data) else {
            return Err(bad(format!(
                "data chunk {} was written while present and is absent now",
                t.data
            )));
        };
        let at = (t.start - lo) as usize;
        parity::xor_into(
            &mut p[at..at + t.len as usize],
            &block[at..at + t.len as usize],
        );
    }
    if !with_q {
        return Ok((p, None));
    }
    let absent: Vec<usize> = (0..data.len()).filter(|&i| data[i].is_none()).collect();
    if absent.len() > 1 {
        return Err(bad(format!(
            "{} data chunks are absent; partial parity recovers one",
            absent.len()
        )));
    }
    let mut full: Vec<Vec<u8>> = data.iter().map(|b| b.clone().unwrap_or_default()).collect();
    if let Some(&m) = absent.first() {
        let mut block = p.clone();
        for (i, b) in data.iter().enumerate() {
            if let Some(b) = b {
                debug_assert_ne!(i, m);
                parity::xor_into(&mut block, b);
            }
        }
        full[m] = block;
    }
    let refs: Vec<&[u8]> = full.iter().map(Vec::as_slice).collect();
    let mut p2 = vec![0u8; p.len()];
    let mut q = vec![0u8; p.len()];
    parity::gen_pq(&refs, &mut p2, Some(&mut q));
    debug_assert_eq!(p2, p);
    Ok((p, Some(q)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C: u64 = 4 * COLUMN_BYTES;

    fn xor_all(blocks: &[&[u8]]) -> Vec<u8> {
        let mut p = vec![0u8; blocks[0].len()];
        for b in blocks {
            parity::xor_into(&mut p, b);
        }
        p
    }

    /// A row of `d` chunks, updated by `pieces` while data role `absent` is missing; the cut
    /// leaves each present touched block old, new or torn (`state`). Recovery's parity must
    /// reconstruct the absent block as the update meant it.
    fn cut_and_repair(d: usize, absent: usize, pieces: &[(Piece, Vec<u8>)], state: u64) {
        let old: Vec<Vec<u8>> = (0..d)
            .map(|i| {
                (0..C)
                    .map(|x| (x as u8).wrapping_mul(7) ^ i as u8)
                    .collect()
            })
            .collect();
        let mut new = old.clone();
        for (p, b) in pieces {
            new[p.data][p.start as usize..(p.start + p.len) as usize].copy_from_slice(b);
        }
        let new_refs: Vec<&[u8]> = new.iter().map(Vec::as_slice).collect();
        let p_new = xor_all(&new_refs);
        let run = Run {
            first: 0,
            end: C / COLUMN_BYTES,
        };
        let mut flags = vec![false; d];
        flags[absent] = true;
        let ps: Vec<(Piece, &[u8])> = pieces.iter().map(|(p, b)| (*p, b.as_slice())).collect();
        let entries = entries_for_row(3, &[run], &[&p_new], &ps, &flags);
        let (_, decoded) = decode(&encode(0, &entries)).unwrap();
        assert_eq!(decoded, entries);
        // The cut: each present block is old, new, or new up to some byte.
        let mut disk: Vec<Option<Vec<u8>>> = (0..d)
            .map(|i| {
                let cut = match (state >> (2 * i)) & 3 {
                    0 => 0,
                    1 => C as usize,
                    _ => ((state >> 16) as usize * 512 + i * 512) % C as usize,
                };
                let mut b = old[i].clone();
                b[..cut].copy_from_slice(&new[i][..cut]);
                Some(b)
            })
            .collect();
        disk[absent] = None;
        let (p, _) = repair(&decoded[0], &disk, false).unwrap();
        let mut rebuilt = p;
        for b in disk.iter().flatten() {
            parity::xor_into(&mut rebuilt, b);
        }
        assert_eq!(rebuilt, new[absent], "absent block reconstructs as written");
    }

    proptest! {
        #[test]
        fn absent_block_survives_any_cut(d in 2usize..5, absent_pick: usize, state: u64,
                                         raw in proptest::collection::vec((0usize..5, 0u64..C, 1u64..C, any::<u8>()), 1..4)) {
            let absent = absent_pick % d;
            // Non-overlapping pieces: at most one per data role.
            let mut pieces: Vec<(Piece, Vec<u8>)> = Vec::new();
            for (data, start, len, fill) in raw {
                let data = data % d;
                if pieces.iter().any(|(p, _)| p.data == data) { continue; }
                let len = len.min(C - start).max(1);
                let start = start.min(C - len);
                pieces.push((Piece { data, start, len }, vec![fill; len as usize]));
            }
            cut_and_repair(d, absent, &pieces, state);
        }
    }

    #[test]
    fn raid6_repair_recomputes_q_from_recovered_data() {
        let d = 3;
        let old: Vec<Vec<u8>> = (0..d)
            .map(|i| vec![i as u8 + 1; COLUMN_BYTES as usize])
            .collect();
        let mut new = old.clone();
        let piece = Piece {
            data: 0,
            start: 512,
            len: 1024,
        };
        new[0][512..1536].fill(0xAB);
        let refs: Vec<&[u8]> = new.iter().map(Vec::as_slice).collect();
        let (mut p_new, mut q_new) = (vec![0u8; 4096], vec![0u8; 4096]);
        parity::gen_pq(&refs, &mut p_new, Some(&mut q_new));
        let run = Run { first: 0, end: 1 };
        let piece_bytes = new[0][512..1536].to_vec();
        let e = &entries_for_row(
            0,
            &[run],
            &[&p_new],
            &[(piece, &piece_bytes)],
            &[false, true, false],
        )[0];
        // The cut left data 0 old: parity must now describe the old block 0 and block 1 intact.
        let disk = vec![Some(old[0].clone()), None, Some(old[2].clone())];
        let (p, q) = repair(e, &disk, true).unwrap();
        let old_refs: Vec<&[u8]> = old.iter().map(Vec::as_slice).collect();
        let (mut p_old, mut q_old) = (vec![0u8; 4096], vec![0u8; 4096]);
        parity::gen_pq(&old_refs, &mut p_old, Some(&mut q_old));
        assert_eq!(p, p_old);
        assert_eq!(q.unwrap(), q_old);
    }

    #[test]
    fn malformed_payloads_are_refused_without_panicking() {
        let e = PplEntry {
            row: 1,
            first_column: 0,
            columns: 1,
            touched: vec![Piece {
                data: 0,
                start: 0,
                len: 10,
            }],
            partial: vec![1; COLUMN_BYTES as usize],
        };
        let good = encode(0, std::slice::from_ref(&e));
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "truncated at {cut}");
        }
        let mut bad = good.clone();
        bad[4] = 9;
        assert!(matches!(
            decode(&bad),
            Err(PplError::Version { found: 9, .. })
        ));
        assert!(check_entry(&e, 1, 2, C).is_err(), "row beyond the array");
        assert!(check_entry(&e, 2, 2, C).is_ok());
        let far = PplEntry {
            first_column: 4,
            ..e
        };
        assert!(
            check_entry(&far, 2, 2, C).is_err(),
            "columns beyond the chunk"
        );
    }

    #[test]
    fn zeroing_bound_covers_both_partial_rows() {
        // Stripe of 4 chunks of 1 MiB, zeroes written in 1 MiB calls: each side up to 4 calls
        // of a whole chunk's columns.
        let chunk = 1 << 20;
        let b = zeroing_bound_bytes(64 << 20, 4 * chunk, chunk, 1 << 20, 128);
        assert!(b >= 2 * 4 * (chunk / COLUMN_BYTES) * COLUMN_BYTES);
        // One column per side for a tiny chunk.
        let b = zeroing_bound_bytes(1 << 20, 2 * COLUMN_BYTES, COLUMN_BYTES, 1 << 20, 128);
        assert!((2 * (COLUMN_BYTES + 128)..3 * (COLUMN_BYTES + 256)).contains(&b));
        assert_eq!(zeroing_bound_bytes(0, 8192, 4096, 1 << 20, 128), 0);
    }

    #[test]
    fn bound_covers_small_and_row_crossing_updates() {
        // 512 bytes cost a whole column, and an update crossing a row boundary two payloads.
        let b = bound_bytes(512, 2 * C, C, 128);
        assert!(b >= COLUMN_BYTES + 128 + PPL_HEADER_BYTES as u64);
        let one = encode(
            0,
            &entries_for_row(
                0,
                &[Run { first: 0, end: 4 }],
                &[&vec![0u8; C as usize]],
                &[(
                    Piece {
                        data: 0,
                        start: 0,
                        len: C,
                    },
                    &vec![0u8; C as usize],
                )],
                &[false, false],
            ),
        );
        assert!(bound_bytes(C, 2 * C, C, 128) >= one.len() as u64 + 128);
    }
}
