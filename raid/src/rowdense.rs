//! Dense rows: whether a RAID 5/6 row update is cheaper as one span rewritten on every chunk than
//! as the column-by-column plan of [`crate::rowplan`], and the pure steps of that rewrite.
//!
//! A consistency point hands the array the dirty blocks of a row all at once. When there are many
//! of them, scattered over the columns, the column plan issues one member I/O per run of touched
//! columns per chunk (data and parity), plus reads: on a 4-member RAID 5 with 64 KiB chunks and
//! thirty scattered 4 KiB blocks that is easily fifty small I/Os, and on a shared machine each
//! I/O costs far more CPU (submission, completion, wake-up, buffer) than moving its 4 KiB.
//!
//! The dense alternative covers the *span* of touched columns (first to last) on every data
//! chunk: it reads the old contents of the span once per data chunk that the new pieces do not
//! cover whole, lays the new pieces over them, and hands the result to the planner as pieces that
//! cover the span on every data chunk. The planner then makes a reconstruct-write that reads
//! nothing and writes one run per member (data runs straight from those buffers, parity computed
//! in one pass). Bytes between the new pieces are written back as they were read: the caller
//! holds the row lock, so nothing changes them meanwhile, and a torn write of equal bytes leaves
//! them equal. It is chosen only when every member of the row is readable (a degraded row keeps
//! the column plan and its partial-parity logging) and only when [`choose`]'s cost model, which
//! counts member I/Os and bytes moved, says it is cheaper. Pure; no I/O.

use crate::rowplan::{Piece, RowPlan, Run, COLUMN_BYTES};

/// What one member I/O costs, as the bytes whose moving (read or write, plus the copy and parity
/// work they bring) costs the same CPU. Measured on a virtio disk under io_uring, an I/O costs
/// roughly 8 µs of CPU on both sides of the ring, about what 64 KiB of memory traffic does; half
/// of that is used so that the dense rewrite is chosen only when it clearly wins, and so that
/// it does not trade a little CPU for a lot of disk bandwidth.
pub const IO_COST_EQUIVALENT_BYTES: u64 = 32 * 1024;

/// A dense rewrite of one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DensePlan {
    /// The columns rewritten on every data chunk.
    pub span: Run,
    /// Per data chunk: whether its old contents of the span must be read (the new pieces do not
    /// cover the span whole).
    pub read: Vec<bool>,
}

impl DensePlan {
    /// Byte offset of the span inside a chunk.
    pub fn start_bytes(&self) -> u64 {
        self.span.first * COLUMN_BYTES
    }

    /// Bytes of the span on one chunk.
    pub fn span_bytes(&self) -> u64 {
        self.span.columns() * COLUMN_BYTES
    }

    /// Member reads of the dense rewrite.
    pub fn read_ios(&self) -> usize {
        self.read.iter().filter(|r| **r).count()
    }
}

/// The dense rewrite of `pieces` in a row of `d` data and `parity` parity chunks, when it costs
/// less than `plan` (the column plan of the same pieces); `None` to keep the column plan.
pub fn choose(d: usize, parity: usize, pieces: &[Piece], plan: &RowPlan) -> Option<DensePlan> {
    let first = plan.columns.first()?.index;
    let last = plan.columns.last()?.index;
    let span = Run {
        first,
        end: last + 1,
    };
    let dense = DensePlan {
        span,
        read: (0..d).map(|i| !covers(pieces, i, span)).collect(),
    };
    let dense_ios = (dense.read_ios() + d + parity) as u64;
    let dense_cost = dense_ios * (IO_COST_EQUIVALENT_BYTES + dense.span_bytes());
    let run_bytes = |runs: &Vec<Vec<Run>>| -> u64 {
        runs.iter()
            .flatten()
            .map(|r| r.columns() * COLUMN_BYTES)
            .sum()
    };
    let column_ios = (plan.read_ios() + plan.write_ios()) as u64;
    let column_cost =
        column_ios * IO_COST_EQUIVALENT_BYTES + run_bytes(&plan.reads) + run_bytes(&plan.writes);
    (dense_cost < column_cost).then_some(dense)
}

/// Whether the pieces of data chunk `data` together cover the columns of `span` whole.
fn covers(pieces: &[Piece], data: usize, span: Run) -> bool {
    let mut mine: Vec<(u64, u64)> = pieces
        .iter()
        .filter(|p| p.data == data)
        .map(|p| (p.start, p.start + p.len))
        .collect();
    mine.sort_unstable();
    let mut at = span.first * COLUMN_BYTES;
    let end = span.end * COLUMN_BYTES;
    for (s, e) in mine {
        if s > at {
            return false;
        }
        at = at.max(e);
    }
    at >= end
}

/// Lays the pieces of data chunk `data` (`(piece, bytes)`) over `out`, which holds that chunk's
/// span of `dense` (old contents, or anything when the pieces cover it whole).
pub fn lay_pieces(dense: &DensePlan, data: usize, pieces: &[(Piece, &[u8])], out: &mut [u8]) {
    let base = dense.start_bytes();
    for (p, bytes) in pieces.iter().filter(|(p, _)| p.data == data) {
        let at = (p.start - base) as usize;
        out[at..at + p.len as usize].copy_from_slice(&bytes[..p.len as usize]);
    }
}

/// The piece that alone covers data chunk `data`'s span exactly, if one does: its buffer is the
/// chunk's new span as it is, with no copy.
pub fn exact_piece(dense: &DensePlan, data: usize, pieces: &[Piece]) -> Option<usize> {
    pieces.iter().position(|p| {
        p.data == data && p.start == dense.start_bytes() && p.len == dense.span_bytes()
    })
}

/// The pieces the planner gets for a dense rewrite: the whole span on every data chunk.
pub fn span_pieces(dense: &DensePlan, d: usize) -> Vec<Piece> {
    (0..d)
        .map(|data| Piece {
            data,
            start: dense.start_bytes(),
            len: dense.span_bytes(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rowplan::{self, ColumnMode};
    use proptest::prelude::*;

    const C: u64 = COLUMN_BYTES;

    fn piece(data: usize, start: u64, len: u64) -> Piece {
        Piece { data, start, len }
    }

    #[test]
    fn contiguous_partial_blocks_keep_the_column_plan() {
        // Reads merge into one run per chunk and writes into one run per member already.
        let pieces: Vec<Piece> = (4..12)
            .flat_map(|k| [piece(0, k * C, 100), piece(2, k * C + 7, 9)])
            .collect();
        let plan = rowplan::plan(3, 1, 16 * C, &pieces).unwrap();
        assert_eq!(choose(3, 1, &pieces, &plan), None);
    }

    #[test]
    fn a_single_block_keeps_the_column_plan() {
        let pieces = [piece(1, 5 * C, C)];
        let plan = rowplan::plan(3, 1, 16 * C, &pieces).unwrap();
        assert_eq!(choose(3, 1, &pieces, &plan), None);
    }

    #[test]
    fn many_scattered_blocks_of_a_row_are_rewritten_as_one_span() {
        // Every other column of every data chunk of a 4-member RAID 5 with 64 KiB chunks: the
        // column plan needs dozens of I/Os, the dense one 3 reads and 4 writes.
        let pieces: Vec<Piece> = (0..3)
            .flat_map(|i| (0..8).map(move |k| piece(i, (2 * k + (i as u64 % 2)) * C, C)))
            .collect();
        let plan = rowplan::plan(3, 1, 16 * C, &pieces).unwrap();
        assert!(plan.read_ios() + plan.write_ios() > 20);
        let dense = choose(3, 1, &pieces, &plan).expect("dense rewrite chosen");
        assert_eq!(dense.span, Run { first: 0, end: 16 });
        assert_eq!(dense.read, vec![true, true, true]);
    }

    #[test]
    fn a_chunk_covered_whole_by_its_pieces_is_not_read() {
        let mut pieces = vec![piece(0, 0, 8 * C), piece(0, 8 * C, 8 * C)];
        pieces.extend((0..8).map(|k| piece(1, 2 * k * C, C)));
        pieces.extend((0..8).map(|k| piece(2, (2 * k + 1) * C, C)));
        let plan = rowplan::plan(3, 1, 16 * C, &pieces).unwrap();
        let dense = choose(3, 1, &pieces, &plan).expect("dense rewrite chosen");
        assert_eq!(dense.read, vec![false, true, true]);
        assert_eq!(dense.read_ios(), 1 + 1);
    }

    #[test]
    fn the_span_runs_from_the_first_to_the_last_touched_column() {
        // Partial blocks in every other column from 4 to 10 of two chunks: the column plan
        // writes each column on its own (12 writes); the span 4..11 needs 3 reads, 4 writes.
        let pieces: Vec<Piece> = [4, 6, 8, 10]
            .into_iter()
            .flat_map(|k| [piece(0, k * C, 100), piece(2, k * C + 7, 9)])
            .collect();
        let plan = rowplan::plan(3, 1, 16 * C, &pieces).unwrap();
        let dense = choose(3, 1, &pieces, &plan).expect("dense rewrite chosen");
        assert_eq!(dense.span, Run { first: 4, end: 11 });
        assert_eq!(dense.start_bytes(), 4 * C);
        assert_eq!(dense.span_bytes(), 7 * C);
        assert_eq!(dense.read_ios(), 3);
    }

    #[test]
    fn span_pieces_plan_to_a_write_without_reads() {
        let dense = DensePlan {
            span: Run { first: 2, end: 9 },
            read: vec![true; 3],
        };
        let plan = rowplan::plan(3, 1, 16 * C, &span_pieces(&dense, 3)).unwrap();
        assert_eq!(plan.read_ios(), 0);
        assert_eq!(plan.write_ios(), 4);
        assert!(plan
            .columns
            .iter()
            .all(|c| c.mode == ColumnMode::ReconstructWrite));
        assert!(plan.direct.iter().all(|v| v.len() == 1 && v[0].is_some()));
    }

    #[test]
    fn exact_piece_is_found_only_when_it_covers_the_span() {
        let dense = DensePlan {
            span: Run { first: 1, end: 3 },
            read: vec![false, true],
        };
        let pieces = [piece(1, C, C), piece(0, C, 2 * C)];
        assert_eq!(exact_piece(&dense, 0, &pieces), Some(1));
        assert_eq!(exact_piece(&dense, 1, &pieces), None);
    }

    fn xor_parity(chunks: &[Vec<u8>]) -> Vec<u8> {
        let mut p = vec![0u8; chunks[0].len()];
        for c in chunks {
            for (a, b) in p.iter_mut().zip(c) {
                *a ^= b;
            }
        }
        p
    }

    proptest! {
        /// The dense rewrite (old span, pieces laid over it, planned as span pieces) leaves every
        /// data chunk equal to the old row with the pieces applied, and the parity equal to a
        /// fresh encode of it.
        #[test]
        fn dense_rewrite_matches_the_row_with_the_pieces_applied(
            raw in proptest::collection::vec((0usize..3, 0u64..16, 1u64..3, 0u64..4096, any::<u8>()), 1..40),
            seed in any::<u8>(),
        ) {
            let (d, cols) = (3usize, 16u64);
            let chunk = (cols * C) as usize;
            let old: Vec<Vec<u8>> = (0..d)
                .map(|i| (0..chunk).map(|b| seed.wrapping_add((b * 31 + i * 7) as u8)).collect())
                .collect();
            // Non-overlapping pieces of 1-2 columns, some starting mid-column.
            let mut taken = vec![vec![false; cols as usize]; d];
            let mut pieces: Vec<(Piece, Vec<u8>)> = Vec::new();
            for (i, col, n, skew, fill) in raw {
                let end = (col + n).min(cols);
                if (col..end).any(|c| taken[i][c as usize]) {
                    continue;
                }
                (col..end).for_each(|c| taken[i][c as usize] = true);
                let start = col * C + skew % C / 2;
                let len = end * C - start - skew % 3;
                pieces.push((piece(i, start, len), vec![fill; len as usize]));
            }
            let shape: Vec<Piece> = pieces.iter().map(|(p, _)| *p).collect();
            let plan = rowplan::plan(d, 1, cols * C, &shape).unwrap();
            let dense = DensePlan {
                span: Run {
                    first: plan.columns[0].index,
                    end: plan.columns.last().unwrap().index + 1,
                },
                read: (0..d).map(|i| !covers(&shape, i, Run {
                    first: plan.columns[0].index,
                    end: plan.columns.last().unwrap().index + 1,
                })).collect(),
            };
            let (s, n) = (dense.start_bytes() as usize, dense.span_bytes() as usize);
            let refs: Vec<(Piece, &[u8])> = pieces.iter().map(|(p, b)| (*p, &b[..])).collect();
            let mut expect = old.clone();
            for (p, b) in &pieces {
                expect[p.data][p.start as usize..(p.start + p.len) as usize].copy_from_slice(b);
            }
            let mut spans: Vec<Vec<u8>> = Vec::new();
            for (i, old_chunk) in old.iter().enumerate() {
                let mut out = if dense.read[i] { old_chunk[s..s + n].to_vec() } else { vec![0xEE; n] };
                lay_pieces(&dense, i, &refs, &mut out);
                prop_assert_eq!(&out[..], &expect[i][s..s + n]);
                spans.push(out);
            }
            // The planner's write of the span pieces: parity from the new spans alone.
            let span_shape = span_pieces(&dense, d);
            let span_plan = rowplan::plan(d, 1, cols * C, &span_shape).unwrap();
            prop_assert_eq!(span_plan.read_ios(), 0);
            let data: Vec<&[u8]> = spans.iter().map(|v| &v[..]).collect();
            let mut bufs: Vec<Vec<Vec<u8>>> = span_plan
                .writes
                .iter()
                .map(|runs| runs.iter().map(|r| vec![0u8; (r.columns() * C) as usize]).collect())
                .collect();
            let mut outs: Vec<Vec<&mut [u8]>> = bufs
                .iter_mut()
                .map(|v| v.iter_mut().map(|b| &mut b[..]).collect())
                .collect();
            let reads: Vec<Vec<&[u8]>> = vec![Vec::new(); d + 1];
            rowplan::compute(&span_plan, d, &span_shape, &data, &reads, &mut outs).unwrap();
            let fresh: Vec<Vec<u8>> = expect.iter().map(|c| c[s..s + n].to_vec()).collect();
            prop_assert_eq!(&bufs[d][0], &xor_parity(&fresh));
        }
    }
}
