//! Runs of whole parity rows written as one I/O per member.
//!
//! A large write (a journal bypass, a CP batch) covers several consecutive rows completely. Row
//! by row, each would cost one member write per chunk (`members` × rows small I/Os, each a
//! system call, a block request and a device doorbell). Here the rows' chunks are laid out per
//! member in one aligned buffer (consecutive rows are consecutive member offsets), the parity
//! computed straight into its place, and each member gets a single write: one copy of the data
//! buys `rows` times fewer I/Os. The images come from a pool of aligned buffers
//! (`twinblock_io::AlignedPool`): fresh ones of this size cost a memset and a kernel page clear
//! per page, more than the copy. Only a healthy array takes this path; a degraded row needs the
//! partial-parity log of the row-by-row path, which also takes over the rows again when a
//! member fails during the write.

use super::*;

/// Rows a run must have for the merged path; a single row goes through `write_row`.
pub(super) const MERGED_ROWS_MIN: u64 = 2;

/// The pieces of `rows` whose pieces cover every data chunk of the row entirely, as runs
/// `(first row, rows)` of at least [`MERGED_ROWS_MIN`] consecutive rows.
pub(super) fn full_row_runs(
    rows: &[(u64, Vec<(Piece, Bytes)>)],
    data_per_row: usize,
    chunk_bytes: u64,
) -> Vec<(u64, u64)> {
    let full = |pieces: &[(Piece, Bytes)]| {
        pieces.len() == data_per_row
            && pieces
                .iter()
                .enumerate()
                .all(|(k, (p, _))| p.data == k && p.start == 0 && p.len == chunk_bytes)
    };
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (row, pieces) in rows {
        if !full(pieces) {
            continue;
        }
        match runs.last_mut() {
            Some((first, n)) if *first + *n == *row => *n += 1,
            _ => runs.push((*row, 1)),
        }
    }
    runs.retain(|(_, n)| *n >= MERGED_ROWS_MIN);
    runs
}

/// Per member, its chunks of the whole rows starting at `first_row` that `data` fills (row after
/// row, data chunks in order), in row order: data copied, P (and Q) computed in place. Every
/// byte of the buffers `take(len)` gives is overwritten (they may hold old bytes: a pool's).
pub(super) fn member_images(
    geo: &Geometry,
    first_row: u64,
    data: &[u8],
    mut take: impl FnMut(usize) -> AlignedBuf,
) -> Vec<AlignedBuf> {
    let c = geo.chunk_bytes as usize;
    let d = geo.data_per_row();
    let rows = data.len() / (c * d);
    let mut bufs: Vec<AlignedBuf> = (0..geo.members).map(|_| take(rows * c)).collect();
    for i in 0..rows {
        let row = first_row + i as u64;
        let at = i * c..(i + 1) * c;
        let chunks: Vec<&[u8]> = (0..d)
            .map(|k| &data[(i * d + k) * c..(i * d + k + 1) * c])
            .collect();
        for (k, chunk) in chunks.iter().enumerate() {
            bufs[geo.data_member(row, k)][at.clone()].copy_from_slice(chunk);
        }
        let p = geo.p_member(row);
        if geo.level.parity_chunks() == 2 {
            let q = geo.q_member(row);
            let (pb, qb) = two_mut(&mut bufs, p, q);
            parity::gen_pq(&chunks, &mut pb[at.clone()], Some(&mut qb[at]));
        } else {
            parity::gen_pq(&chunks, &mut bufs[p][at], None);
        }
    }
    bufs
}

/// Two distinct elements of `v`, both mutable.
fn two_mut<T>(v: &mut [T], a: usize, b: usize) -> (&mut T, &mut T) {
    assert_ne!(a, b, "two_mut of one element");
    if a < b {
        let (lo, hi) = v.split_at_mut(b);
        (&mut lo[a], &mut hi[0])
    } else {
        let (lo, hi) = v.split_at_mut(a);
        (&mut hi[0], &mut lo[b])
    }
}

impl Inner {
    /// Writes the whole rows starting at `first_row` that `data` fills, one write per member.
    /// The caller holds the bitmap registration of the rows.
    pub(super) async fn write_full_rows(
        self: &Arc<Self>,
        first_row: u64,
        data: Bytes,
    ) -> Result<()> {
        let c = self.geo.chunk_bytes;
        let rows = data.len() as u64 / (c * self.geo.data_per_row() as u64);
        if self.is_degraded() {
            return self.write_rows_each(first_row, data).await;
        }
        let guards = self.lock_rows(first_row..first_row + rows).await;
        self.check_failed()?;
        let view = self.view();
        if view.readable.iter().any(|r| !r) {
            drop(guards);
            return self.write_rows_each(first_row, data).await;
        }
        let images = member_images(&self.geo, first_row, &data, |len| self.image_pool.take(len));
        let at = self.member_off(first_row, 0);
        let writes = images
            .into_iter()
            .enumerate()
            .filter(|(m, _)| view.writable[*m])
            .map(|(m, b)| (m, at, self.image_pool.freeze(b)))
            .collect();
        self.write_members(&view, writes).await;
        let failed_mid_write = self.view().readable != view.readable;
        drop(guards);
        if failed_mid_write {
            // The row-by-row path writes the rows again degraded, logging their partial
            // parity first (the same bytes: idempotent).
            return self.write_rows_each(first_row, data).await;
        }
        self.check_failed()
    }

    /// The rows starting at `first_row` that `data` fills, each through `write_row`.
    async fn write_rows_each(self: &Arc<Self>, first_row: u64, data: Bytes) -> Result<()> {
        let c = self.geo.chunk_bytes;
        let d = self.geo.data_per_row();
        let row_bytes = c as usize * d;
        let rows = data.len() / row_bytes;
        try_join_all((0..rows).map(|i| {
            let pieces = (0..d)
                .map(|k| {
                    let at = i * row_bytes + k * c as usize;
                    let piece = Piece {
                        data: k,
                        start: 0,
                        len: c,
                    };
                    (piece, data.slice(at..at + c as usize))
                })
                .collect();
            self.write_row(first_row + i as u64, pieces)
        }))
        .await
        .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn geo(level: Level, members: usize) -> Geometry {
        Geometry {
            level,
            members,
            chunk_bytes: 8192,
            rows: 64,
        }
    }

    fn full_row(row: u64, d: usize, c: u64) -> (u64, Vec<(Piece, Bytes)>) {
        let pieces = (0..d)
            .map(|k| {
                let p = Piece {
                    data: k,
                    start: 0,
                    len: c,
                };
                (p, Bytes::from(vec![0u8; c as usize]))
            })
            .collect();
        (row, pieces)
    }

    #[test]
    fn runs_need_two_consecutive_full_rows() {
        let c = 8192;
        let mut partial = full_row(4, 3, c);
        partial.1[1].0.start = 4096;
        partial.1[1].0.len = 4096;
        let rows = vec![
            full_row(1, 3, c),
            full_row(2, 3, c),
            full_row(3, 3, c),
            partial,
            full_row(5, 3, c),
            full_row(7, 3, c),
            full_row(8, 3, c),
        ];
        assert_eq!(full_row_runs(&rows, 3, c), vec![(1, 3), (7, 2)]);
    }

    #[test]
    fn member_images_match_row_by_row_parity() {
        for (level, members) in [(Level::Raid5, 4), (Level::Raid6, 5)] {
            let g = geo(level, members);
            let c = g.chunk_bytes as usize;
            let d = g.data_per_row();
            let rows = 5;
            let data: Vec<u8> = (0..rows * d * c)
                .map(|i| (i * 7 + i / 4093) as u8)
                .collect();
            let first = 3u64;
            // Buffers full of old bytes, as a pool hands them out: all must be overwritten.
            let images = member_images(&g, first, &data, |len| {
                let mut b = AlignedBuf::zeroed(len);
                b.fill(0xAA);
                b
            });
            for i in 0..rows {
                let row = first + i as u64;
                let at = i * c..(i + 1) * c;
                let chunks: Vec<&[u8]> = (0..d)
                    .map(|k| &data[(i * d + k) * c..(i * d + k + 1) * c])
                    .collect();
                for (k, chunk) in chunks.iter().enumerate() {
                    assert_eq!(&images[g.data_member(row, k)][at.clone()], *chunk);
                }
                let mut p = vec![0u8; c];
                let mut q = vec![0u8; c];
                let two = level.parity_chunks() == 2;
                parity::gen_pq(&chunks, &mut p, two.then_some(&mut q[..]));
                assert_eq!(
                    &images[g.p_member(row)][at.clone()],
                    &p[..],
                    "P of row {row}"
                );
                if two {
                    assert_eq!(&images[g.q_member(row)][at], &q[..], "Q of row {row}");
                }
            }
        }
    }
}
