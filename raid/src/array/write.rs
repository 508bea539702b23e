//! The foreground write path: plain writes, a flusher's scattered writes, flush and discard.
//! Mirrored levels write every copy; RAID 5/6 rows go through the parity-write paths here. Every
//! write of a redundant level is registered in the write-intent bitmap first.
//!
//! `Inner::write_members` is the single place where foreground data and parity writes are handed
//! to the members (the pair's fencing check will sit behind it, in the member itself).

use super::fullrows;
use super::*;
use crate::rowdense;

impl Inner {
    pub(super) async fn write(self: &Arc<Self>, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.check_failed()?;
        self.check_ppl_replayed()?;
        if len == 0 {
            return Ok(());
        }
        let exts = self.geo.extents(offset, len);
        let (first_row, last_row) = self.rows_span(&exts);
        let c = self.geo.chunk_bytes;
        let tracked = self.geo.level != Level::Raid0;
        if tracked {
            self.bitmap_begin(first_row * c, (last_row + 1) * c).await?;
        }
        let res = if self.geo.level.parity_chunks() > 0 {
            let mut rows: Vec<(u64, Vec<(Piece, Bytes)>)> = Vec::new();
            for (row, piece) in self.row_pieces(&exts, &data) {
                match rows.last_mut() {
                    Some((r, pieces)) if *r == row => pieces.push(piece),
                    _ => rows.push((row, vec![piece])),
                }
            }
            // Runs of whole rows go out as one write per member (`fullrows`), the rest row by row.
            let d = self.geo.data_per_row();
            let runs = fullrows::full_row_runs(&rows, d, c);
            let in_run = |row: u64| runs.iter().any(|(r, n)| (*r..r + n).contains(&row));
            let row_bytes = d as u64 * c;
            let merged = runs.iter().map(|&(first, n)| {
                let at = (first * row_bytes - offset) as usize;
                self.write_full_rows(first, data.slice(at..at + (n * row_bytes) as usize))
            });
            let single = rows
                .into_iter()
                .filter(|(row, _)| !in_run(*row))
                .map(|(row, pieces)| self.write_row(row, pieces));
            futures_util::future::try_join(try_join_all(merged), try_join_all(single))
                .await
                .map(|_| ())
        } else {
            try_join_all(exts.into_iter().map(|e| {
                self.write_copies(
                    e,
                    data.slice(e.buf_offset as usize..(e.buf_offset + e.len) as usize),
                )
            }))
            .await
            .map(|_| ())
        };
        if tracked {
            self.with_bitmap(|b| {
                let rs = b.regions(first_row * c, (last_row + 1) * c);
                b.end_write(rs)
            });
        }
        res?;
        self.check_failed()
    }

    pub(super) async fn write_scattered(self: &Arc<Self>, writes: Vec<(u64, Bytes)>) -> Result<()> {
        for (offset, data) in &writes {
            self.check_range(*offset, data.len() as u64)?;
        }
        let mut sorted: Vec<(u64, u64)> = writes
            .iter()
            .map(|(o, d)| (*o, d.len() as u64))
            .filter(|(_, len)| *len > 0)
            .collect();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(self.invalid(format!(
                "scattered writes overlap: {}+{} and {}+{}",
                w[0].0, w[0].1, w[1].0, w[1].1
            )));
        }
        self.check_failed()?;
        self.check_ppl_replayed()?;
        if self.geo.level.parity_chunks() == 0 {
            return try_join_all(writes.into_iter().map(|(o, d)| self.write(o, d)))
                .await
                .map(|_| ());
        }
        // Pieces by row; a write that crosses rows goes its own way.
        let d = self.geo.data_per_row() as u64;
        let mut rows: std::collections::BTreeMap<u64, Vec<(Piece, Bytes)>> = Default::default();
        let mut spanning = Vec::new();
        for (offset, data) in writes {
            if data.is_empty() {
                continue;
            }
            let exts = self.geo.extents(offset, data.len() as u64);
            let row = exts[0].chunk / d;
            if exts.iter().any(|e| e.chunk / d != row) {
                spanning.push((offset, data));
                continue;
            }
            rows.entry(row)
                .or_default()
                .extend(self.row_pieces(&exts, &data).into_iter().map(|(_, p)| p));
        }
        // Every job runs to its end even when one fails: dropping the others mid-way would
        // release their row locks while their member writes are still in flight.
        let row_jobs = join_all(
            rows.into_iter()
                .map(|(row, pieces)| self.write_row_pieces(row, pieces)),
        );
        let spanning_jobs = join_all(spanning.into_iter().map(|(o, b)| self.write(o, b)));
        let (a, b) = futures_util::future::join(row_jobs, spanning_jobs).await;
        a.into_iter().chain(b).collect::<Result<Vec<()>>>()?;
        self.check_failed()
    }

    /// Writes pieces that all lie in parity row `row` (a flusher's scattered writes), registered
    /// in the bitmap for the time of the write.
    pub(super) async fn write_row_pieces(
        self: &Arc<Self>,
        row: u64,
        pieces: Vec<(Piece, Bytes)>,
    ) -> Result<()> {
        let c = self.geo.chunk_bytes;
        self.bitmap_begin(row * c, (row + 1) * c).await?;
        let res = self.write_row(row, pieces).await;
        self.with_bitmap(|b| {
            let rs = b.regions(row * c, (row + 1) * c);
            b.end_write(rs)
        });
        res
    }

    /// Writes pieces that all lie in parity row `row`, under the row lock: the one parity-write
    /// path of RAID 5/6, for a single write, a flusher's scattered pieces and a full stripe alike.
    /// The plan ([`rowplan::plan_readable`]) is made against the members readable now; when a
    /// read fails (its member is faulty by then) the row is planned again without it, a bounded
    /// number of times. Nothing is written before every read has succeeded. The caller holds the
    /// bitmap registration of the row.
    pub(super) async fn write_row(
        self: &Arc<Self>,
        row: u64,
        pieces: Vec<(Piece, Bytes)>,
    ) -> Result<()> {
        let geo = self.geo;
        let (d, np) = (geo.data_per_row(), geo.level.parity_chunks());
        let shape: Vec<Piece> = pieces.iter().map(|(p, _)| *p).collect();
        let _g = self.lock_rows([row]).await;
        for _attempt in 0..=geo.members {
            self.check_failed()?;
            let view = self.view();
            let readable: Vec<bool> = (0..d + np)
                .map(|r| view.readable[self.role_member(row, r)])
                .collect();
            let mut plan = rowplan::plan_readable(d, np, geo.chunk_bytes, &shape, &readable)
                .map_err(|e| self.row_plan_error(row, e))?;
            // Many scattered blocks (a CP's): one span per chunk when that is cheaper
            // (`rowdense`); only with every member readable, so a degraded row keeps the column
            // plan and its partial-parity logging.
            let dense = if readable.iter().all(|r| *r) {
                rowdense::choose(d, np, &shape, &plan)
            } else {
                None
            };
            let dense_pieces = match dense {
                Some(dense) => {
                    let Some(spans) = self.dense_pieces(row, &dense, &pieces, &view).await else {
                        continue;
                    };
                    plan = rowplan::plan_readable(
                        d,
                        np,
                        geo.chunk_bytes,
                        &rowdense::span_pieces(&dense, d),
                        &readable,
                    )
                    .map_err(|e| self.row_plan_error(row, e))?;
                    Some(spans)
                }
                None => None,
            };
            let pieces: &[(Piece, Bytes)] = dense_pieces.as_deref().unwrap_or(&pieces);
            let Some(old) = self.read_plan(row, &plan, &view).await else {
                continue;
            };
            let writes = self.row_writes(row, &plan, pieces, &old)?;
            // Degraded: the partial parity is persisted before any member write (see `ppl`).
            let logged = self
                .log_row_ppl(row, &plan, pieces, &writes, &readable)
                .await?;
            // Members may have failed (or a spare arrived) during the reads: write to what is
            // writable now; the blocks computed are right for any of them.
            let now = self.view();
            let chosen = writes
                .iter()
                .filter(|(m, _, _)| now.writable[*m])
                .cloned()
                .collect();
            self.write_members(&now, chosen).await;
            if !logged {
                self.log_ppl_after_failure(row, &plan, pieces, &writes, &readable)
                    .await;
            }
            return self.check_failed();
        }
        self.check_failed()?;
        Err(ArrayError::Failed {
            array: self.name.clone(),
            detail: format!("row {row}: members kept failing"),
        })
    }

    /// The new span of every data chunk of a dense rewrite ([`rowdense`]): the old contents read
    /// (one read per chunk the pieces do not cover whole) with the pieces laid over them, as
    /// pieces covering the span. `None` when a read failed (that member is now faulty).
    async fn dense_pieces(
        self: &Arc<Self>,
        row: u64,
        dense: &rowdense::DensePlan,
        pieces: &[(Piece, Bytes)],
        view: &View,
    ) -> Option<Vec<(Piece, Bytes)>> {
        let d = self.geo.data_per_row();
        let off = self.member_off(row, dense.start_bytes());
        let reads = join_all((0..d).filter(|i| dense.read[*i]).map(|i| {
            let m = self.role_member(row, i);
            let dv = view.members[m].clone();
            async move { self.read_member(m, &dv?, off, dense.span_bytes()).await }
        }))
        .await;
        let shape: Vec<Piece> = pieces.iter().map(|(p, _)| *p).collect();
        let refs: Vec<(Piece, &[u8])> = pieces.iter().map(|(p, b)| (*p, b.as_ref())).collect();
        let mut old = reads.into_iter();
        let mut out = Vec::with_capacity(d);
        for (i, span) in rowdense::span_pieces(dense, d).into_iter().enumerate() {
            let bytes = if let (false, Some(k)) =
                (dense.read[i], rowdense::exact_piece(dense, i, &shape))
            {
                pieces[k].1.clone()
            } else {
                // Old contents (or nothing, when several pieces cover the span whole between
                // them) with the pieces over them: every byte of the span is written.
                let n = dense.span_bytes() as usize;
                let mut buf = self.row_buf(n);
                if dense.read[i] {
                    buf[..n].copy_from_slice(&old.next()??);
                }
                rowdense::lay_pieces(dense, i, &refs, &mut buf[..n]);
                self.freeze_row_buf(buf, n)
            };
            out.push((span, bytes));
        }
        Some(out)
    }

    /// The member holding chunk role `role` of `row` (`0..d` data, `d` P, `d + 1` Q).
    pub(super) fn role_member(&self, row: u64, role: usize) -> usize {
        let d = self.geo.data_per_row();
        match role {
            r if r < d => self.geo.data_member(row, r),
            r if r == d => self.geo.p_member(row),
            _ => self.geo.q_member(row),
        }
    }

    fn row_plan_error(&self, row: u64, e: rowplan::PlanError) -> ArrayError {
        match e {
            rowplan::PlanError::Unrecoverable { .. } => ArrayError::Failed {
                array: self.name.clone(),
                detail: format!("row {row} could not be reconstructed: {e}"),
            },
            e => self.invalid(format!("row {row}: {e}")),
        }
    }

    /// Issues the reads of `plan` concurrently; per role, the buffers of its read runs. `None`
    /// when one failed (that member is now faulty).
    async fn read_plan(
        self: &Arc<Self>,
        row: u64,
        plan: &RowPlan,
        view: &View,
    ) -> Option<Vec<Vec<Bytes>>> {
        let reads = join_all(plan.reads.iter().enumerate().flat_map(|(role, runs)| {
            let m = self.role_member(row, role);
            let dv = view.members[m].clone();
            runs.iter().map(move |r| {
                let dv = dv.clone();
                async move {
                    let off = self.member_off(row, r.first * COLUMN_BYTES);
                    self.read_member(m, &dv?, off, r.columns() * COLUMN_BYTES)
                        .await
                }
            })
        }))
        .await;
        let mut it = reads.into_iter();
        plan.reads
            .iter()
            .map(|runs| it.by_ref().take(runs.len()).collect())
            .collect()
    }

    /// The member writes `(member, offset, bytes)` of `plan`: pieces that cover a write run
    /// exactly go out as they are (a full stripe copies no data), the other data runs and the
    /// parity runs are computed into page-aligned buffers (`O_DIRECT` members take them without
    /// a bounce copy).
    fn row_writes(
        &self,
        row: u64,
        plan: &RowPlan,
        pieces: &[(Piece, Bytes)],
        old: &[Vec<Bytes>],
    ) -> Result<Vec<(usize, u64, Bytes)>> {
        let d = self.geo.data_per_row();
        let shape: Vec<Piece> = pieces.iter().map(|(p, _)| *p).collect();
        // Reused buffers (old bytes in them), cut to each run's length: `compute_indirect`
        // writes every byte of every run it fills, and gets empty ones for direct runs.
        let lens: Vec<Vec<usize>> = plan
            .writes
            .iter()
            .enumerate()
            .map(|(role, runs)| {
                (0..runs.len())
                    .map(|k| plan.indirect_write_bytes(role, k))
                    .collect()
            })
            .collect();
        let mut bufs: Vec<Vec<AlignedBuf>> = lens
            .iter()
            .map(|v| v.iter().map(|&len| self.row_buf(len)).collect())
            .collect();
        {
            let old_refs: Vec<Vec<&[u8]>> = old
                .iter()
                .map(|v| v.iter().map(|b| b.as_ref()).collect())
                .collect();
            let mut outs: Vec<Vec<&mut [u8]>> = bufs
                .iter_mut()
                .zip(&lens)
                .map(|(v, lens)| v.iter_mut().zip(lens).map(|(b, &n)| &mut b[..n]).collect())
                .collect();
            let data: Vec<&[u8]> = pieces.iter().map(|(_, b)| b.as_ref()).collect();
            rowplan::compute_indirect(plan, d, &shape, &data, &old_refs, &mut outs)
                .map_err(|e| self.row_plan_error(row, e))?;
        }
        let mut writes = Vec::with_capacity(plan.write_ios());
        for (role, ((runs, bufs), lens)) in plan.writes.iter().zip(bufs).zip(&lens).enumerate() {
            let m = self.role_member(row, role);
            for (k, ((r, b), &len)) in runs.iter().zip(bufs).zip(lens).enumerate() {
                let bytes = match plan.direct.get(role).and_then(|v| v[k]) {
                    Some(piece) => pieces[piece].1.clone(),
                    None => self.freeze_row_buf(b, len),
                };
                writes.push((m, self.member_off(row, r.first * COLUMN_BYTES), bytes));
            }
        }
        Ok(writes)
    }

    /// A buffer for `len` bytes of a row write, its old contents arbitrary: a chunk-sized one
    /// from the row pool (every run fits one chunk, so all are alike and always reusable), cut to
    /// `len` by [`Inner::freeze_row_buf`].
    fn row_buf(&self, len: usize) -> AlignedBuf {
        let chunk = self.geo.chunk_bytes as usize;
        match len {
            0 => AlignedBuf::zeroed(0),
            n if n <= chunk => self.row_pool.take(chunk),
            n => AlignedBuf::zeroed(n),
        }
    }

    /// The first `len` bytes of a [`Inner::row_buf`] buffer as `Bytes` that give the buffer back
    /// to the row pool once the member I/O lets go of them.
    fn freeze_row_buf(&self, buf: AlignedBuf, len: usize) -> Bytes {
        if buf.len() == self.geo.chunk_bytes as usize {
            self.row_pool.freeze(buf).slice(..len)
        } else {
            buf.into_bytes().slice(..len)
        }
    }

    /// The extents `exts` of a write of `data` as row pieces `(row, (piece, bytes))`, in order.
    fn row_pieces(&self, exts: &[Extent], data: &Bytes) -> Vec<(u64, (Piece, Bytes))> {
        let d = self.geo.data_per_row() as u64;
        exts.iter()
            .map(|e| {
                let piece = Piece {
                    data: (e.chunk % d) as usize,
                    start: e.offset_in_chunk,
                    len: e.len,
                };
                let at = e.buf_offset as usize;
                (e.chunk / d, (piece, data.slice(at..at + e.len as usize)))
            })
            .collect()
    }

    pub(super) fn rows_span(&self, exts: &[Extent]) -> (u64, u64) {
        let mut lo = u64::MAX;
        let mut hi = 0;
        for e in [exts.first(), exts.last()].into_iter().flatten() {
            for p in self.geo.places(e.chunk) {
                lo = lo.min(p.row);
                hi = hi.max(p.row);
            }
        }
        if self.geo.level == Level::Raid10 {
            // copies of the first/last chunk bound the rows in between
            lo = lo.saturating_sub(1);
            hi = (hi + 1).min(self.geo.rows - 1);
        }
        (lo, hi)
    }

    pub(super) async fn write_copies(self: &Arc<Self>, e: Extent, bytes: Bytes) -> Result<()> {
        let rows = self.geo.lock_rows(e.chunk);
        let _g = self.lock_rows(rows).await;
        let view = self.view();
        let places = self.geo.places(e.chunk);
        let writes = places
            .iter()
            .filter(|p| view.writable[p.member])
            .map(|p| {
                (
                    p.member,
                    self.member_off(p.row, e.offset_in_chunk),
                    bytes.clone(),
                )
            })
            .collect();
        self.write_members(&view, writes).await;
        self.check_failed()?;
        let view = self.view();
        if !places.iter().any(|p| view.readable[p.member]) {
            return Err(ArrayError::Failed {
                array: self.name.clone(),
                detail: format!("no copy of chunk {} could be written", e.chunk),
            });
        }
        Ok(())
    }

    /// Issues member writes `(slot, offset, bytes)` of `view` concurrently; a device whose write
    /// fails is marked faulty.
    pub(super) async fn write_members(
        self: &Arc<Self>,
        view: &View,
        writes: Vec<(usize, u64, Bytes)>,
    ) {
        // A hot replace's target gets every write of its slot (copied rows stay copied).
        let rep = self.replacement();
        let extra: Vec<(u64, Bytes)> = match &rep {
            Some((slot, _, _)) => writes
                .iter()
                .filter(|(m, _, _)| m == slot)
                .map(|(_, off, b)| (*off, b.clone()))
                .collect(),
            None => Vec::new(),
        };
        let to_rep = async {
            if let Some((slot, dev, d)) = &rep {
                for (off, b) in extra {
                    if let Err(e) = d.write_at(off, b).await {
                        self.replacement_failed(*slot, *dev, "write", &e).await;
                        break;
                    }
                }
            }
        };
        let to_members = join_all(writes.into_iter().filter_map(|(m, off, b)| {
            let dv = view.members[m].clone()?;
            Some(async move {
                let r = dv.write_at(off, b).await;
                (m, dv, r)
            })
        }));
        let (results, ()) = futures_util::future::join(to_members, to_rep).await;
        for (m, dv, r) in results {
            if let Err(e) = r {
                self.device_failed(m, &dv, "write", &e).await;
            }
        }
    }

    pub(super) async fn flush(self: &Arc<Self>) -> Result<()> {
        self.check_failed()?;
        let epoch = self.with_bitmap(|b| b.start_flush());
        self.sync_writable("sync").await;
        self.check_failed()?;
        if !self.is_degraded() {
            let _g = self.bitmap_io.lock().await;
            let blocks = self.with_bitmap(|b| b.finish_flush(epoch));
            if !blocks.is_empty() {
                self.persist_bitmap(&blocks).await;
            }
        }
        self.check_failed()
    }

    pub(super) async fn discard(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_failed()?;
        self.check_ppl_replayed()?;
        let geo = self.geo;
        let row_bytes = match geo.level {
            Level::Raid10 if geo.members % 2 == 1 => 0,
            Level::Raid1 => geo.chunk_bytes,
            _ => geo.data_per_row() as u64 * geo.chunk_bytes,
        };
        let end = offset + len;
        let (r0, r1) = if row_bytes == 0 {
            (0, 0)
        } else {
            (offset.div_ceil(row_bytes), end / row_bytes)
        };
        let (head_end, tail_start) = if r1 > r0 {
            (r0 * row_bytes, r1 * row_bytes)
        } else {
            (end, end)
        };
        self.zero_fill(offset, head_end).await?;
        if r1 > r0 {
            let c = geo.chunk_bytes;
            self.bitmap_begin(r0 * c, r1 * c).await?;
            let _g = self.lock_rows(r0..r1.min(r0 + ROW_LOCK_SHARDS)).await;
            let view = self.view();
            let results = join_all((0..geo.members).filter(|m| view.writable[*m]).filter_map(
                |m| {
                    let d = view.members[m].clone()?;
                    let off = self.member_off(r0, 0);
                    Some(async move { (m, d.discard(off, (r1 - r0) * c).await) })
                },
            ))
            .await;
            self.with_bitmap(|b| {
                let rs = b.regions(r0 * c, r1 * c);
                b.end_write(rs)
            });
            for (m, r) in results {
                if let Err(e) = r {
                    self.member_failed(m, "discard", Some(&e), true).await;
                }
            }
            if let Some((slot, dev, d)) = self.replacement() {
                if let Err(e) = d.discard(self.member_off(r0, 0), (r1 - r0) * c).await {
                    self.replacement_failed(slot, dev, "discard", &e).await;
                }
            }
        }
        self.zero_fill(tail_start, end).await?;
        self.check_failed()
    }

    pub(super) async fn zero_fill(self: &Arc<Self>, start: u64, end: u64) -> Result<()> {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(ZERO_WRITE_BYTES);
            self.write(pos, Bytes::from(vec![0u8; n as usize])).await?;
            pos += n;
        }
        Ok(())
    }
}
