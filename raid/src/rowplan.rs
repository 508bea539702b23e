//! The parity-write planner: how new data for one row of a RAID 5/6 array is written, whatever its
//! shape (one small write, a flusher's scattered blocks, a full stripe) and whatever the state of
//! the row's members (all healthy, or some missing, failed or still rebuilding).
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
//! counting block reads, among those whose reads are all possible. When neither is (a block it
//! needs sits on a member that cannot be read), the column is written by
//!
//! - recover-write: read every readable block of the column, recover the missing ones from
//!   parity, and compute the parity afresh from the new data.
//!
//! It writes only the touched data blocks and the parity of the touched columns; the caller skips
//! members that cannot be written. Adjacent columns of one chunk become one I/O; reads also bridge
//! small gaps, since one larger read costs less than two. A write run that one piece covers
//! exactly is written from the piece's own buffer ([`RowPlan::direct`]), so a full-stripe write
//! copies no data, and parity of adjacent reconstruct-write columns is computed in one pass.
//! Pure: no I/O, tested against a brute-force model.

use crate::parity::{self, RowBufs};

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
    /// Read every readable block (data and parity), recover the unreadable ones, then compute
    /// parity from all data blocks. Only when a block the other modes need cannot be read.
    RecoverWrite,
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

    /// Whether the old contents of data chunk `i` must be read (when its member is readable;
    /// recover-write reads every readable block).
    pub fn reads_data(&self, i: usize) -> bool {
        match self.mode {
            // The difference `old ^ new` needs the old block even when it is overwritten whole.
            ColumnMode::ReadModifyWrite => self.touched(i),
            ColumnMode::ReconstructWrite => !self.full(i),
            ColumnMode::RecoverWrite => true,
        }
    }

    /// Whether the old parity must be read (when its member is readable).
    pub fn reads_parity(&self) -> bool {
        self.mode != ColumnMode::ReconstructWrite
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
    /// Per data role, per write run: the piece that covers the run exactly, if one does. Its
    /// bytes are the run's new contents, so the caller can write the piece's buffer as it is.
    pub direct: Vec<Vec<Option<usize>>>,
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

    /// Bytes of the buffer [`compute_indirect`] fills for write run `k` of `role`: none for a
    /// run a piece covers exactly ([`RowPlan::direct`]), the whole run otherwise.
    pub fn indirect_write_bytes(&self, role: usize, k: usize) -> usize {
        let direct = self.direct.get(role).is_some_and(|v| v[k].is_some());
        if direct {
            0
        } else {
            (self.writes[role][k].columns() * COLUMN_BYTES) as usize
        }
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
    #[error(
        "{unreadable} chunks of the row cannot be read, parity can stand in for at most {parity}"
    )]
    Unrecoverable { unreadable: usize, parity: usize },
}

/// Plans `pieces` into a row of `d` data chunks and `parity` parity chunks (1 or 2) of
/// `chunk_bytes` each (a multiple of [`COLUMN_BYTES`]), every member readable.
pub fn plan(
    d: usize,
    parity: usize,
    chunk_bytes: u64,
    pieces: &[Piece],
) -> Result<RowPlan, PlanError> {
    plan_readable(d, parity, chunk_bytes, pieces, &vec![true; d + parity])
}

/// [`plan`] for a row where only the roles marked in `readable` (`d + parity` entries) can be
/// read: each column takes the cheapest mode whose reads are all possible.
pub fn plan_readable(
    d: usize,
    parity: usize,
    chunk_bytes: u64,
    pieces: &[Piece],
    readable: &[bool],
) -> Result<RowPlan, PlanError> {
    debug_assert!(chunk_bytes.is_multiple_of(COLUMN_BYTES) && (1..=2).contains(&parity));
    debug_assert_eq!(readable.len(), d + parity);
    check_pieces(d, chunk_bytes, pieces)?;
    let roles = d + parity;
    let parity_readable = readable[d..].iter().all(|r| *r);
    let columns: Vec<Column> = coverage(d, pieces)
        .into_iter()
        .map(|(index, covered)| {
            let touched = covered.iter().filter(|&&c| c > 0).count();
            let full = covered.iter().filter(|&&c| c == COLUMN_BYTES).count();
            let rmw_possible = parity_readable && (0..d).all(|i| covered[i] == 0 || readable[i]);
            let rcw_possible = (0..d).all(|i| covered[i] == COLUMN_BYTES || readable[i]);
            // Block reads each way. Ties go to reconstruct-write, which does not read parity.
            let rmw_reads = touched + parity;
            let rcw_reads = d - full;
            let mode = match (rmw_possible, rcw_possible) {
                (true, true) if rmw_reads < rcw_reads => ColumnMode::ReadModifyWrite,
                (_, true) => ColumnMode::ReconstructWrite,
                (true, false) => ColumnMode::ReadModifyWrite,
                (false, false) => ColumnMode::RecoverWrite,
            };
            Column {
                index,
                mode,
                covered,
            }
        })
        .collect();
    let unreadable = readable.iter().filter(|r| !**r).count();
    if unreadable > parity && columns.iter().any(|c| c.mode == ColumnMode::RecoverWrite) {
        return Err(PlanError::Unrecoverable { unreadable, parity });
    }

    let mut read_cols: Vec<Vec<u64>> = vec![Vec::new(); roles];
    let mut write_cols: Vec<Vec<u64>> = vec![Vec::new(); roles];
    for c in &columns {
        for i in 0..d {
            if c.reads_data(i) && readable[i] {
                read_cols[i].push(c.index);
            }
            if c.touched(i) {
                write_cols[i].push(c.index);
            }
        }
        for r in d..roles {
            if c.reads_parity() && readable[r] {
                read_cols[r].push(c.index);
            }
            write_cols[r].push(c.index);
        }
    }
    let writes: Vec<Vec<Run>> = write_cols.iter().map(|cols| runs(cols, 0)).collect();
    let direct = (0..d)
        .map(|i| {
            writes[i]
                .iter()
                .map(|r| {
                    pieces.iter().position(|p| {
                        p.data == i
                            && p.start == r.first * COLUMN_BYTES
                            && p.len == r.columns() * COLUMN_BYTES
                    })
                })
                .collect()
        })
        .collect();
    Ok(RowPlan {
        reads: read_cols
            .iter()
            .map(|cols| runs(cols, READ_MERGE_GAP_COLUMNS))
            .collect(),
        writes,
        direct,
        columns,
    })
}

/// Refuses pieces outside the row, empty ones, and overlapping ones.
fn check_pieces(d: usize, chunk_bytes: u64, pieces: &[Piece]) -> Result<(), PlanError> {
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
    Ok(())
}

/// Bytes covered per (column, data chunk), for touched columns only, in column order.
fn coverage(d: usize, pieces: &[Piece]) -> std::collections::BTreeMap<u64, Vec<u64>> {
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
    covered
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

/// Index of the run holding `col`, if one does.
fn run_of(runs: &[Run], col: u64) -> Option<usize> {
    let k = runs.partition_point(|r| r.end <= col);
    runs.get(k).filter(|r| r.contains(col)).map(|_| k)
}

/// Byte range of columns `[col, col + n)` inside run `k`'s buffer, if that run holds them all.
fn span_in(runs: &[Run], col: u64, n: u64) -> Option<(usize, std::ops::Range<usize>)> {
    let k = run_of(runs, col)?;
    if runs[k].end < col + n {
        return None;
    }
    let at = ((col - runs[k].first) * COLUMN_BYTES) as usize;
    Some((k, at..at + (n * COLUMN_BYTES) as usize))
}

/// The bytes of columns `[col, col + n)` inside the buffers of one role's runs.
fn span<'a, B: AsRef<[u8]>>(runs: &[Run], bufs: &'a [B], col: u64, n: u64) -> Option<&'a [u8]> {
    let (k, range) = span_in(runs, col, n)?;
    bufs.get(k)?.as_ref().get(range)
}

fn span_mut<'a>(runs: &[Run], bufs: &'a mut [&mut [u8]], col: u64, n: u64) -> Option<&'a mut [u8]> {
    let (k, range) = span_in(runs, col, n)?;
    bufs.get_mut(k)?.get_mut(range)
}

/// The block of `col` inside the buffers of one role's runs, if a run holds it.
fn block<'a, B: AsRef<[u8]>>(runs: &[Run], bufs: &'a [B], col: u64) -> Option<&'a [u8]> {
    span(runs, bufs, col, 1)
}

fn block_mut<'a>(runs: &[Run], bufs: &'a mut [&mut [u8]], col: u64) -> Option<&'a mut [u8]> {
    span_mut(runs, bufs, col, 1)
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
    fill(plan, d, pieces, data, reads, writes, true)
}

/// [`compute`] without filling the data write runs that a piece covers exactly
/// ([`RowPlan::direct`]): the caller writes those pieces' own buffers, and may pass empty
/// buffers for those runs.
pub fn compute_indirect(
    plan: &RowPlan,
    d: usize,
    pieces: &[Piece],
    data: &[&[u8]],
    reads: &[Vec<&[u8]>],
    writes: &mut [Vec<&mut [u8]>],
) -> Result<(), PlanError> {
    fill(plan, d, pieces, data, reads, writes, false)
}

/// The new contents of data role `i` at columns `[col, col + n)`: from the piece that covers its
/// run exactly, or from the role's write buffer.
fn new_data<'a>(
    plan: &RowPlan,
    data: &[&'a [u8]],
    data_w: &'a [Vec<&mut [u8]>],
    i: usize,
    col: u64,
    n: u64,
) -> Option<&'a [u8]> {
    let (k, range) = span_in(&plan.writes[i], col, n)?;
    match plan.direct[i][k] {
        Some(piece) => data.get(piece)?.get(range),
        None => data_w[i].get(k)?.get(range),
    }
}

fn fill(
    plan: &RowPlan,
    d: usize,
    pieces: &[Piece],
    data: &[&[u8]],
    reads: &[Vec<&[u8]>],
    writes: &mut [Vec<&mut [u8]>],
    fill_direct: bool,
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
    let recovered = recover_columns(plan, d, parity, reads)?;
    lay_data(
        plan,
        d,
        pieces,
        data,
        reads,
        &recovered,
        writes,
        fill_direct,
    )?;
    // Parity: runs of adjacent reconstruct- or recover-write columns in one pass, read-modify-
    // write columns one by one.
    let (data_w, parity_w) = writes.split_at_mut(d);
    let mut delta = vec![0u8; COLUMN_BYTES as usize];
    let mut k = 0;
    while k < plan.columns.len() {
        let c = &plan.columns[k];
        if c.mode == ColumnMode::ReadModifyWrite {
            rmw_column(plan, d, c, data, data_w, reads, parity_w, &mut delta)?;
            k += 1;
            continue;
        }
        // The following columns of the same kind, adjacent to this one, share one parity pass
        // when every input lies contiguous over all of them (always so for a full stripe);
        // otherwise the span is halved until it does.
        let mut n = 1;
        while plan.columns.get(k + n).is_some_and(|next| {
            next.index == c.index + n as u64
                && next.mode == c.mode
                && (0..d).all(|i| next.touched(i) == c.touched(i))
        }) {
            n += 1;
        }
        let new = loop {
            match fresh_inputs(plan, d, c, data, data_w, reads, &recovered, k, n) {
                Some(new) => break new,
                None if n > 1 => n /= 2,
                None => return Err(bad(format!("no data blocks for column {}", c.index))),
            }
        };
        let (p_w, q_w) = parity_w.split_at_mut(1);
        let p = span_mut(&plan.writes[d], &mut p_w[0], c.index, n as u64)
            .ok_or_else(|| bad(format!("no P write for column {}", c.index)))?;
        let q = match q_w.first_mut() {
            Some(q) => Some(
                span_mut(&plan.writes[d + 1], q, c.index, n as u64)
                    .ok_or_else(|| bad(format!("no Q write for column {}", c.index)))?,
            ),
            None => None,
        };
        parity::gen_pq(&new, p, q);
        k += n;
    }
    Ok(())
}

/// The data of columns `k..k + n` of the plan (adjacent, same mode) for a fresh parity encode:
/// new contents of touched blocks, old contents (read or recovered) of the others. `None` when
/// some input is not contiguous over the columns.
#[allow(clippy::too_many_arguments)]
fn fresh_inputs<'a>(
    plan: &RowPlan,
    d: usize,
    c: &Column,
    data: &[&'a [u8]],
    data_w: &'a [Vec<&mut [u8]>],
    reads: &'a [Vec<&[u8]>],
    recovered: &'a [Option<Vec<Vec<u8>>>],
    k: usize,
    n: usize,
) -> Option<Vec<&'a [u8]>> {
    (0..d)
        .map(|i| {
            if c.touched(i) {
                new_data(plan, data, data_w, i, c.index, n as u64)
            } else if let Some(rec) = &recovered[k] {
                // Recovered columns are computed one by one.
                (n == 1).then(|| rec[i].as_slice())
            } else {
                span(&plan.reads[i], &reads[i], c.index, n as u64)
            }
        })
        .collect()
}

/// Old data blocks of every recover-write column (indexed like `plan.columns`; `None` for other
/// modes): the readable blocks as read, the others recovered from parity.
fn recover_columns(
    plan: &RowPlan,
    d: usize,
    parity: usize,
    reads: &[Vec<&[u8]>],
) -> Result<Vec<Option<Vec<Vec<u8>>>>, PlanError> {
    plan.columns
        .iter()
        .map(|c| {
            if c.mode != ColumnMode::RecoverWrite {
                return Ok(None);
            }
            let old =
                |role: usize| block(&plan.reads[role], &reads[role], c.index).map(<[u8]>::to_vec);
            let mut rb = RowBufs {
                data: (0..d).map(old).collect(),
                p: old(d),
                q: if parity == 2 { old(d + 1) } else { None },
                has_q: parity == 2,
            };
            parity::recover(&mut rb).map_err(|e| PlanError::Unrecoverable {
                unreadable: e.missing,
                parity: e.parity,
            })?;
            let data = rb
                .data
                .into_iter()
                .map(|b| {
                    b.ok_or_else(|| PlanError::Buffers(format!("column {} not recovered", c.index)))
                })
                .collect::<Result<Vec<Vec<u8>>, PlanError>>()?;
            Ok(Some(data))
        })
        .collect()
}

/// Fills the data write runs: old bytes of partially written blocks first, then the pieces over
/// them. Runs a piece covers exactly are left alone unless `fill_direct`.
#[allow(clippy::too_many_arguments)]
fn lay_data(
    plan: &RowPlan,
    d: usize,
    pieces: &[Piece],
    data: &[&[u8]],
    reads: &[Vec<&[u8]>],
    recovered: &[Option<Vec<Vec<u8>>>],
    writes: &mut [Vec<&mut [u8]>],
    fill_direct: bool,
) -> Result<(), PlanError> {
    let bad = |what: String| PlanError::Buffers(what);
    for (c, rec) in plan.columns.iter().zip(recovered) {
        for i in 0..d {
            if c.touched(i) && !c.full(i) {
                let old = match rec {
                    Some(rec) => Some(rec[i].as_slice()),
                    None => block(&plan.reads[i], &reads[i], c.index),
                }
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
        let k = run_of(runs, col)
            .ok_or_else(|| bad(format!("no write run for piece at {}", p.start)))?;
        if plan.direct[p.data][k].is_some() && !fill_direct {
            continue;
        }
        let at = (p.start - runs[k].first * COLUMN_BYTES) as usize;
        writes[p.data]
            .get_mut(k)
            .and_then(|b| b.get_mut(at..at + bytes.len()))
            .ok_or_else(|| bad(format!("write buffer too short for piece at {}", p.start)))?
            .copy_from_slice(bytes);
    }
    Ok(())
}

/// Parity of one read-modify-write column: old parity with `old ^ new` of every touched block
/// folded in.
#[allow(clippy::too_many_arguments)]
fn rmw_column(
    plan: &RowPlan,
    d: usize,
    c: &Column,
    data: &[&[u8]],
    data_w: &[Vec<&mut [u8]>],
    reads: &[Vec<&[u8]>],
    parity_w: &mut [Vec<&mut [u8]>],
    delta: &mut [u8],
) -> Result<(), PlanError> {
    let bad = |what: String| PlanError::Buffers(what);
    let (p_w, q_w) = parity_w.split_at_mut(1);
    let p = block_mut(&plan.writes[d], &mut p_w[0], c.index)
        .ok_or_else(|| bad(format!("no P write for column {}", c.index)))?;
    let old_p = block(&plan.reads[d], &reads[d], c.index)
        .ok_or_else(|| bad(format!("no P read for column {}", c.index)))?;
    p.copy_from_slice(old_p);
    let mut q = match q_w.first_mut() {
        Some(q) => {
            let q = block_mut(&plan.writes[d + 1], q, c.index)
                .ok_or_else(|| bad(format!("no Q write for column {}", c.index)))?;
            let old_q = block(&plan.reads[d + 1], &reads[d + 1], c.index)
                .ok_or_else(|| bad(format!("no Q read for column {}", c.index)))?;
            q.copy_from_slice(old_q);
            Some(q)
        }
        None => None,
    };
    for i in (0..d).filter(|i| c.touched(*i)) {
        let new_block = new_data(plan, data, data_w, i, c.index, 1)
            .ok_or_else(|| bad(format!("no write of chunk {i} column {}", c.index)))?;
        let old = block(&plan.reads[i], &reads[i], c.index)
            .ok_or_else(|| bad(format!("no read of chunk {i} column {}", c.index)))?;
        delta.copy_from_slice(old);
        parity::xor_into(delta, new_block);
        parity::xor_into(p, delta);
        if let Some(q) = q.as_deref_mut() {
            parity::mul_xor_into(parity::gf_pow2(i), delta, q);
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
        check_plan(d, parity, cols, raw, &vec![true; d + parity], false);
    }

    /// [`check_against_model`] for a row whose roles marked `false` in `readable` cannot be read
    /// (their reads must not be planned), and with `indirect` the data runs a piece covers
    /// exactly are written from the piece (as the array does) instead of a filled buffer.
    fn check_plan(
        d: usize,
        parity: usize,
        cols: u64,
        raw: Vec<(usize, u64, u64, u8)>,
        readable: &[bool],
        indirect: bool,
    ) {
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
        let plan = plan_readable(d, parity, chunk, &pieces, readable).unwrap();
        for (role, runs) in plan.reads.iter().enumerate() {
            assert!(
                readable[role] || runs.is_empty(),
                "read of unreadable role {role}"
            );
        }
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
            .enumerate()
            .map(|(role, runs)| {
                runs.iter()
                    .enumerate()
                    .map(|(k, r)| match indirect {
                        true => vec![0xEEu8; plan.indirect_write_bytes(role, k)],
                        false => vec![0xEEu8; (r.columns() * C) as usize],
                    })
                    .collect()
            })
            .collect();
        if indirect {
            // What the array writes for a run a piece covers exactly: the piece itself.
            for (role, direct) in plan.direct.iter().enumerate() {
                for (k, piece) in direct.iter().enumerate() {
                    if let Some(piece) = piece {
                        assert!(write_bufs[role][k].is_empty());
                        write_bufs[role][k] = datas[*piece].clone();
                    }
                }
            }
        }
        {
            let mut writes: Vec<Vec<&mut [u8]>> = write_bufs
                .iter_mut()
                .map(|v| v.iter_mut().map(Vec::as_mut_slice).collect())
                .collect();
            if indirect {
                compute_indirect(&plan, d, &pieces, &data_refs, &reads, &mut writes).unwrap();
            } else {
                compute(&plan, d, &pieces, &data_refs, &reads, &mut writes).unwrap();
            }
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

        #[test]
        fn plan_and_compute_match_a_fresh_encode_with_unreadable_members(
            d in 2usize..7,
            parity in 1usize..3,
            cols in 1u64..9,
            raw in proptest::collection::vec((0usize..8, 0u64..65536, 0u64..20000, any::<u8>()), 1..12),
            lost in proptest::collection::vec(0usize..9, 0..3),
            indirect in any::<bool>(),
        ) {
            // Up to `parity` roles unreadable: a missing, failed or rebuilding member.
            let mut readable = vec![true; d + parity];
            for r in lost.into_iter().take(parity) {
                readable[r % (d + parity)] = false;
            }
            check_plan(d, parity, cols, raw, &readable, indirect);
        }
    }

    #[test]
    fn an_unreadable_touched_block_is_recovered_from_parity() {
        // RAID 5, 4 data chunks, data chunk 1 unreadable and partly written: neither
        // read-modify-write (needs its old block) nor reconstruct-write (idem) can run.
        let readable = [true, false, true, true, true];
        let plan = plan_readable(4, 1, 4 * C, &[piece(1, 10, 100)], &readable).unwrap();
        assert_eq!(plan.columns[0].mode, ColumnMode::RecoverWrite);
        assert!(plan.reads[1].is_empty());
        assert_eq!(plan.read_ios(), 4);
    }

    #[test]
    fn a_full_stripe_is_written_from_the_pieces() {
        let pieces = [piece(0, 0, 4 * C), piece(1, 0, 4 * C), piece(2, 0, 4 * C)];
        let plan = plan(3, 2, 4 * C, &pieces).unwrap();
        assert_eq!(plan.read_ios(), 0);
        assert_eq!(
            plan.direct,
            vec![vec![Some(0)], vec![Some(1)], vec![Some(2)]]
        );
    }

    #[test]
    fn too_many_unreadable_members_are_refused() {
        let readable = [false, false, true, true];
        assert!(matches!(
            plan_readable(3, 1, 4 * C, &[piece(0, 0, 10)], &readable),
            Err(PlanError::Unrecoverable { .. })
        ));
    }
}
