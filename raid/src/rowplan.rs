//! Planning several small writes that land in one row of a RAID 5/6 array.
//!
//! A consistency point hands the array many scattered writes, often a few 4 KiB blocks per
//! stripe. Treating the stripe as one unit (read every data chunk, write every chunk back) moves
//! the whole stripe for a handful of blocks; treating each write on its own costs one
//! read-modify-write per block. Like md's stripe cache, this plan works per *column*: the
//! [`COLUMN_BYTES`] slice at one offset across every chunk of the row. For each column that
//! carries new data it picks the cheaper of
//!
//! - read-modify-write: read the old contents of the touched data blocks and the parity, then
//!   `P ^= old ^ new` (and `Q ^= g^i·(old ^ new)`), and
//! - reconstruct-write: read the data blocks that are not wholly overwritten and compute the
//!   parity afresh,
//!
//! counting block reads, and writes only the touched data blocks and the parity of the touched
//! columns. Adjacent columns of one chunk become one I/O; reads also bridge small gaps, since one
//! larger read costs less than two. Pure: no I/O, tested against a brute-force model.

/// The unit of planning: a 4 KiB block, the smallest chunk size and `O_DIRECT`-aligned.
pub const COLUMN_BYTES: u64 = 4096;

/// Two reads of one chunk whose runs are at most this many columns apart become one read.
pub const READ_MERGE_GAP_COLUMNS: u64 = 2;

/// New data for one data chunk of the row: `len` bytes at `start` inside data chunk `data`
/// (`0..d`, in stripe order). Pieces of one plan never overlap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub data: usize,
    pub start: u64,
    pub len: u64,
}

/// How one column's parity is brought up to date.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnMode {
    /// Read old data of the touched blocks and old parity; fold the difference into parity.
    ReadModifyWrite,
    /// Read the data blocks not wholly overwritten; compute parity from all data blocks.
    ReconstructWrite,
}

/// What one touched column needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column number inside the chunk (byte offset `index * COLUMN_BYTES`).
    pub index: u64,
    pub mode: ColumnMode,
    /// Per data chunk: bytes of this column covered by new data (0 = untouched).
    pub covered: Vec<u64>,
}

impl Column {
    /// Whether data chunk `i` gets new bytes in this column.
    pub fn touched(&self, i: usize) -> bool {
        self.covered[i] > 0
    }

    /// Whether data chunk `i`'s block is overwritten whole (its old contents are not needed).
    pub fn full(&self, i: usize) -> bool {
        self.covered[i] == COLUMN_BYTES
    }

    /// Whether the old contents of data chunk `i` must be read.
    pub fn reads_data(&self, i: usize) -> bool {
        match self.mode {
            // The difference `old ^ new` needs the old block even when it is overwritten whole.
            ColumnMode::ReadModifyWrite => self.touched(i),
            ColumnMode::ReconstructWrite => !self.full(i),
        }
    }

    /// Whether the old parity must be read.
    pub fn reads_parity(&self) -> bool {
        self.mode == ColumnMode::ReadModifyWrite
    }
}

/// A run of columns `[first, end)` of one chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    pub first: u64,
    pub end: u64,
}

impl Run {
    pub fn contains(&self, column: u64) -> bool {
        (self.first..self.end).contains(&column)
    }

    pub fn columns(&self) -> u64 {
        self.end - self.first
    }
}

/// The plan for one row. Chunk roles are numbered `0..d` for data, `d` for P and `d + 1` for Q.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowPlan {
    /// Touched columns in ascending order.
    pub columns: Vec<Column>,
    /// Per chunk role, the runs to read (ascending, disjoint).
    pub reads: Vec<Vec<Run>>,
    /// Per chunk role, the runs to write (ascending, disjoint, never adjacent).
    pub writes: Vec<Vec<Run>>,
}

impl RowPlan {
    /// Number of read I/Os.
    pub fn read_ios(&self) -> usize {
        self.reads.iter().map(Vec::len).sum()
    }

    /// Number of write I/Os.
    pub fn write_ios(&self) -> usize {
        self.writes.iter().map(Vec::len).sum()
    }
}

/// Why pieces cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    #[error("piece {index} ({data}:{start}+{len}) lies outside a row of {d} chunks of {chunk_bytes} bytes")]
    OutOfRow {
        index: usize,
        data: usize,
        start: u64,
        len: u64,
        d: usize,
        chunk_bytes: u64,
    },
    #[error("pieces {a} and {b} overlap")]
    Overlap { a: usize, b: usize },
    #[error("buffers do not match the plan: {0}")]
    Buffers(String),
}

/// Plans `pieces` into a row of `d` data chunks and `parity` parity chunks (1 or 2) of
/// `chunk_bytes` each (a multiple of [`COLUMN_BYTES`]).
pub fn plan(
    d: usize,
    parity: usize,
    chunk_bytes: u64,
    pieces: &[Piece],
) -> Result<RowPlan, PlanError> {
    debug_assert!(chunk_bytes.is_multiple_of(COLUMN_BYTES) && (1..=2).contains(&parity));
    for (index, p) in pieces.iter().enumerate() {
        if p.data >= d || p.len == 0 || p.start.checked_add(p.len).is_none_or(|e| e > chunk_bytes) {
            return Err(PlanError::OutOfRow {
                index,
                data: p.data,
                start: p.start,
                len: p.len,
                d,
                chunk_bytes,
            });
        }
    }
    let mut order: Vec<usize> = (0..pieces.len()).collect();
    order.sort_by_key(|&k| (pieces[k].data, pieces[k].start));
    for w in order.windows(2) {
        let (a, b) = (pieces[w[0]], pieces[w[1]]);
        if a.data == b.data && a.start + a.len > b.start {
            return Err(PlanError::Overlap { a: w[0], b: w[1] });
        }
    }

    // Coverage per (column, data chunk). Only touched columns are stored.
    let mut covered: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for p in pieces {
        let mut at = p.start;
        let end = p.start + p.len;
        while at < end {
            let col = at / COLUMN_BYTES;
            let col_end = (col + 1) * COLUMN_BYTES;
            let n = col_end.min(end) - at;
            covered.entry(col).or_insert_with(|| vec![0; d])[p.data] += n;
            at += n;
        }
    }

    let columns: Vec<Column> = covered
        .into_iter()
        .map(|(index, covered)| {
            let touched = covered.iter().filter(|&&c| c > 0).count();
            let full = covered.iter().filter(|&&c| c == COLUMN_BYTES).count();
            // Block reads each way. Ties go to reconstruct-write, which does not read parity.
            let rmw_reads = touched + parity;
            let rcw_reads = d - full;
            let mode = if rmw_reads < rcw_reads {
                ColumnMode::ReadModifyWrite
            } else {
                ColumnMode::ReconstructWrite
            };
            Column {
                index,
                mode,
                covered,
            }
        })
        .collect();

    let roles = d + parity;
    let mut read_cols: Vec<Vec<u64>> = vec![Vec::new(); roles];
    let mut write_cols: Vec<Vec<u64>> = vec![Vec::new(); roles];
    for c in &columns {
        for i in 0..d {
            if c.reads_data(i) {
                read_cols[i].push(c.index);
            }
            if c.touched(i) {
                write_cols[i].push(c.index);
            }
        }
        for r in d..roles {
            if c.reads_parity() {
                read_cols[r].push(c.index);
            }
            write_cols[r].push(c.index);
        }
    }
    Ok(RowPlan {
        reads: read_cols
            .iter()
            .map(|cols| runs(cols, READ_MERGE_GAP_COLUMNS))
            .collect(),
        writes: write_cols.iter().map(|cols| runs(cols, 0)).collect(),
        columns,
    })
}

/// Ascending columns into runs, bridging gaps of at most `gap` columns.
fn runs(cols: &[u64], gap: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::new();
    for &c in cols {
        match out.last_mut() {
            Some(r) if c <= r.end + gap => r.end = c + 1,
            _ => out.push(Run {
                first: c,
                end: c + 1,
            }),
        }
    }
    out
}

/// The block of `col` inside the buffers of one role's runs, if a run holds it.
fn block<'a, B: AsRef<[u8]>>(runs: &[Run], bufs: &'a [B], col: u64) -> Option<&'a [u8]> {
    let k = runs.partition_point(|r| r.end <= col);
    let run = runs.get(k).filter(|r| r.contains(col))?;
    let at = ((col - run.first) * COLUMN_BYTES) as usize;
    bufs.get(k)?.as_ref().get(at..at + COLUMN_BYTES as usize)
}

fn block_mut<'a>(runs: &[Run], bufs: &'a mut [&mut [u8]], col: u64) -> Option<&'a mut [u8]> {
    let k = runs.partition_point(|r| r.end <= col);
    let run = runs.get(k).filter(|r| r.contains(col))?;
    let at = ((col - run.first) * COLUMN_BYTES) as usize;
    bufs.get_mut(k)?.get_mut(at..at + COLUMN_BYTES as usize)
}

/// Fills the write buffers of `plan`: `data[k]` holds the bytes of `pieces[k]`; `reads[role][n]`
/// the old contents of `plan.reads[role][n]`; `writes[role][n]` receives the new contents of
/// `plan.writes[role][n]` (every buffer `run.columns() * COLUMN_BYTES` long). Touched data blocks
/// get their old bytes with the pieces laid over them, parity blocks the parity of the new row.
pub fn compute(
    plan: &RowPlan,
    d: usize,
    pieces: &[Piece],
    data: &[&[u8]],
    reads: &[Vec<&[u8]>],
    writes: &mut [Vec<&mut [u8]>],
) -> Result<(), PlanError> {
    let roles = plan.writes.len();
    let parity = roles.saturating_sub(d);
    let bad = |what: String| PlanError::Buffers(what);
    if !(1..=2).contains(&parity)
        || reads.len() != roles
        || writes.len() != roles
        || data.len() != pieces.len()
    {
        return Err(bad(format!(
            "{} read roles, {} write roles, {} data buffers for {} pieces, plan of {roles} roles",
            reads.len(),
            writes.len(),
            data.len(),
            pieces.len()
        )));
    }
    // Old bytes of partially written blocks first, then the pieces over them.
    for c in &plan.columns {
        for i in 0..d {
            if c.touched(i) && !c.full(i) {
                let old = block(&plan.reads[i], &reads[i], c.index)
                    .ok_or_else(|| bad(format!("no read of chunk {i} column {}", c.index)))?;
                block_mut(&plan.writes[i], &mut writes[i], c.index)
                    .ok_or_else(|| bad(format!("no write of chunk {i} column {}", c.index)))?
                    .copy_from_slice(old);
            }
        }
    }
    for (p, bytes) in pieces.iter().zip(data) {
        if bytes.len() as u64 != p.len {
            return Err(bad(format!(
                "piece of {} bytes given {}",
                p.len,
                bytes.len()
            )));
        }
        // A piece's columns are all touched and adjacent, so one write run holds it whole.
        let col = p.start / COLUMN_BYTES;
        let runs = &plan.writes[p.data];
        let k = runs.partition_point(|r| r.end <= col);
        let run = runs
            .get(k)
            .filter(|r| r.contains(col))
            .ok_or_else(|| bad(format!("no write run for piece at {}", p.start)))?;
        let at = (p.start - run.first * COLUMN_BYTES) as usize;
        writes[p.data]
            .get_mut(k)
            .and_then(|b| b.get_mut(at..at + bytes.len()))
            .ok_or_else(|| bad(format!("write buffer too short for piece at {}", p.start)))?
            .copy_from_slice(bytes);
    }
    // Parity per column.
    let (data_w, parity_w) = writes.split_at_mut(d);
    let mut delta = vec![0u8; COLUMN_BYTES as usize];
    for c in &plan.columns {
        let mut new: Vec<&[u8]> = Vec::with_capacity(d);
        for i in 0..d {
            let b = if c.touched(i) {
                block(&plan.writes[i], &data_w[i], c.index)
            } else if c.mode == ColumnMode::ReconstructWrite {
                block(&plan.reads[i], &reads[i], c.index)
            } else {
                Some(&[][..])
            };
            new.push(b.ok_or_else(|| bad(format!("no block of chunk {i} column {}", c.index)))?);
        }
        let (p_w, q_w) = parity_w.split_at_mut(1);
        let p = block_mut(&plan.writes[d], &mut p_w[0], c.index)
            .ok_or_else(|| bad(format!("no P write for column {}", c.index)))?;
        let mut q = match q_w.first_mut() {
            Some(q) => Some(
                block_mut(&plan.writes[d + 1], q, c.index)
                    .ok_or_else(|| bad(format!("no Q write for column {}", c.index)))?,
            ),
            None => None,
        };
        match c.mode {
            ColumnMode::ReconstructWrite => crate::parity::gen_pq(&new, p, q),
            ColumnMode::ReadModifyWrite => {
                let old_p = block(&plan.reads[d], &reads[d], c.index)
                    .ok_or_else(|| bad(format!("no P read for column {}", c.index)))?;
                p.copy_from_slice(old_p);
                if let Some(q) = q.as_deref_mut() {
                    let old_q = block(&plan.reads[d + 1], &reads[d + 1], c.index)
                        .ok_or_else(|| bad(format!("no Q read for column {}", c.index)))?;
                    q.copy_from_slice(old_q);
                }
                for (i, new_block) in new.iter().enumerate() {
                    if !c.touched(i) {
                        continue;
                    }
                    let old = block(&plan.reads[i], &reads[i], c.index)
                        .ok_or_else(|| bad(format!("no read of chunk {i} column {}", c.index)))?;
                    delta.copy_from_slice(old);
                    crate::parity::xor_into(&mut delta, new_block);
                    crate::parity::xor_into(p, &delta);
                    if let Some(q) = q.as_deref_mut() {
                        crate::parity::mul_xor_into(crate::parity::gf_pow2(i), &delta, q);
                    }
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const C: u64 = COLUMN_BYTES;

    fn piece(data: usize, start: u64, len: u64) -> Piece {
        Piece { data, start, len }
    }

    #[test]
    fn one_block_in_a_wide_row_is_read_modify_write() {
        // RAID 5 with 7 data chunks: old data + P (2 reads) beats 6 reads.
        let plan = plan(7, 1, 16 * C, &[piece(3, 5 * C, C)]).unwrap();
        assert_eq!(plan.columns.len(), 1);
        assert_eq!(plan.columns[0].mode, ColumnMode::ReadModifyWrite);
        assert_eq!(plan.read_ios(), 2);
        assert_eq!(plan.reads[3], vec![Run { first: 5, end: 6 }]);
        assert_eq!(plan.reads[7], vec![Run { first: 5, end: 6 }]);
        assert_eq!(plan.write_ios(), 2);
    }

    #[test]
    fn two_of_three_blocks_is_reconstruct_write() {
        // RAID 5 over four members: the third data block (1 read) beats old data + P (3 reads).
        let plan = plan(3, 1, 16 * C, &[piece(0, 0, C), piece(1, 0, C)]).unwrap();
        assert_eq!(plan.columns[0].mode, ColumnMode::ReconstructWrite);
        assert_eq!(plan.reads[2], vec![Run { first: 0, end: 1 }]);
        assert!(plan.reads[0].is_empty() && plan.reads[1].is_empty() && plan.reads[3].is_empty());
        assert_eq!(plan.write_ios(), 3);
    }

    #[test]
    fn a_full_column_reads_nothing() {
        let plan = plan(2, 2, 4 * C, &[piece(0, C, C), piece(1, C, C)]).unwrap();
        assert_eq!(plan.read_ios(), 0);
        assert_eq!(plan.write_ios(), 4);
    }

    #[test]
    fn partial_blocks_read_their_old_contents() {
        let plan = plan(
            3,
            1,
            4 * C,
            &[piece(0, 100, 10), piece(1, 0, C), piece(2, 0, C)],
        )
        .unwrap();
        assert_eq!(plan.columns[0].mode, ColumnMode::ReconstructWrite);
        assert_eq!(plan.reads[0], vec![Run { first: 0, end: 1 }]);
        assert_eq!(plan.read_ios(), 1);
    }

    #[test]
    fn adjacent_columns_share_an_io_and_reads_bridge_small_gaps() {
        let pieces = [piece(0, 0, 2 * C), piece(0, 4 * C, C), piece(0, 10 * C, C)];
        let plan = plan(5, 1, 16 * C, &pieces).unwrap();
        assert_eq!(
            plan.writes[0],
            vec![
                Run { first: 0, end: 2 },
                Run { first: 4, end: 5 },
                Run { first: 10, end: 11 }
            ]
        );
        // Columns 0-1 and 4 are 2 apart: one read; column 10 is too far.
        assert_eq!(
            plan.reads[0],
            vec![Run { first: 0, end: 5 }, Run { first: 10, end: 11 }]
        );
    }

    #[test]
    fn bad_pieces_are_refused() {
        assert!(matches!(
            plan(3, 1, 4 * C, &[piece(3, 0, 1)]),
            Err(PlanError::OutOfRow { .. })
        ));
        assert!(matches!(
            plan(3, 1, 4 * C, &[piece(0, 4 * C - 1, 2)]),
            Err(PlanError::OutOfRow { .. })
        ));
        assert!(matches!(
            plan(3, 1, 4 * C, &[piece(0, 0, 0)]),
            Err(PlanError::OutOfRow { .. })
        ));
        assert!(matches!(
            plan(3, 1, 4 * C, &[piece(1, 0, 100), piece(1, 99, 5)]),
            Err(PlanError::Overlap { .. })
        ));
    }

    /// A row with random old contents and consistent parity, random pieces: applying the plan
    /// gives data = old with pieces laid over, parity = a fresh encode of that data.
    fn check_against_model(d: usize, parity: usize, cols: u64, raw: Vec<(usize, u64, u64, u8)>) {
        let chunk = cols * C;
        let mut pieces: Vec<Piece> = Vec::new();
        let mut fills: Vec<u8> = Vec::new();
        for (data, start, len, fill) in raw {
            let data = data % d;
            let start = start % chunk;
            let len = 1 + len % (chunk - start);
            let p = piece(data, start, len);
            let overlaps = pieces.iter().any(|q| {
                q.data == p.data && q.start < p.start + p.len && p.start < q.start + q.len
            });
            if !overlaps {
                pieces.push(p);
                fills.push(fill);
            }
        }
        let mut old: Vec<Vec<u8>> = (0..d)
            .map(|i| {
                (0..chunk)
                    .map(|b| (b as u8).wrapping_mul(31).wrapping_add(i as u8 * 7))
                    .collect()
            })
            .collect();
        let mut p_old = vec![0u8; chunk as usize];
        let mut q_old = vec![0u8; chunk as usize];
        {
            let refs: Vec<&[u8]> = old.iter().map(Vec::as_slice).collect();
            crate::parity::gen_pq(&refs, &mut p_old, (parity == 2).then_some(&mut q_old[..]));
        }
        old.push(p_old);
        if parity == 2 {
            old.push(q_old);
        }
        let plan = plan(d, parity, chunk, &pieces).unwrap();
        let datas: Vec<Vec<u8>> = pieces
            .iter()
            .zip(&fills)
            .map(|(p, f)| (0..p.len).map(|k| f.wrapping_add(k as u8)).collect())
            .collect();
        let data_refs: Vec<&[u8]> = datas.iter().map(Vec::as_slice).collect();
        let reads: Vec<Vec<&[u8]>> = plan
            .reads
            .iter()
            .enumerate()
            .map(|(role, runs)| {
                runs.iter()
                    .map(|r| &old[role][(r.first * C) as usize..(r.end * C) as usize])
                    .collect()
            })
            .collect();
        let mut write_bufs: Vec<Vec<Vec<u8>>> = plan
            .writes
            .iter()
            .map(|runs| {
                runs.iter()
                    .map(|r| vec![0xEEu8; (r.columns() * C) as usize])
                    .collect()
            })
            .collect();
        {
            let mut writes: Vec<Vec<&mut [u8]>> = write_bufs
                .iter_mut()
                .map(|v| v.iter_mut().map(Vec::as_mut_slice).collect())
                .collect();
            compute(&plan, d, &pieces, &data_refs, &reads, &mut writes).unwrap();
        }
        // Expected row.
        let mut want: Vec<Vec<u8>> = old[..d].to_vec();
        for (p, bytes) in pieces.iter().zip(&datas) {
            want[p.data][p.start as usize..(p.start + p.len) as usize].copy_from_slice(bytes);
        }
        let mut p_new = vec![0u8; chunk as usize];
        let mut q_new = vec![0u8; chunk as usize];
        {
            let refs: Vec<&[u8]> = want.iter().map(Vec::as_slice).collect();
            crate::parity::gen_pq(&refs, &mut p_new, (parity == 2).then_some(&mut q_new[..]));
        }
        want.push(p_new);
        if parity == 2 {
            want.push(q_new);
        }
        // Apply the writes to the old row; it must equal the expected row.
        let mut got = old.clone();
        for (role, runs) in plan.writes.iter().enumerate() {
            for (r, buf) in runs.iter().zip(&write_bufs[role]) {
                got[role][(r.first * C) as usize..(r.end * C) as usize].copy_from_slice(buf);
            }
        }
        assert_eq!(got, want);
        // Nothing is written that is not touched.
        for (role, runs) in plan.writes.iter().enumerate() {
            for r in runs {
                for col in r.first..r.end {
                    let c = plan.columns.iter().find(|c| c.index == col).unwrap();
                    assert!(role >= d || c.touched(role));
                }
            }
        }
    }

    proptest! {
        #[test]
        fn plan_and_compute_match_a_fresh_encode(
            d in 2usize..7,
            parity in 1usize..3,
            cols in 1u64..9,
            raw in proptest::collection::vec((0usize..8, 0u64..65536, 0u64..20000, any::<u8>()), 1..12),
        ) {
            check_against_model(d, parity, cols, raw);
        }
    }
}
