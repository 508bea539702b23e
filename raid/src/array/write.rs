//! The foreground write path: plain writes, a flusher's scattered writes, flush and discard.
//! Mirrored levels write every copy; RAID 5/6 rows go through the parity-write paths here. Every
//! write of a redundant level is registered in the write-intent bitmap first.
//!
//! `Inner::write_members` is the single place where foreground data and parity writes are handed
//! to the members (the pair's fencing check will sit behind it, in the member itself).

use super::*;

impl Inner {
    pub(super) async fn write(self: &Arc<Self>, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.check_failed()?;
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
            let d = self.geo.data_per_row() as u64;
            let mut groups: Vec<Vec<Extent>> = Vec::new();
            for e in exts {
                match groups.last_mut() {
                    Some(g) if g[0].chunk / d == e.chunk / d => g.push(e),
                    _ => groups.push(vec![e]),
                }
            }
            try_join_all(groups.into_iter().map(|g| self.write_parity_row(g, &data)))
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
            let pieces = rows.entry(row).or_default();
            for e in exts {
                let piece = Piece {
                    data: (e.chunk % d) as usize,
                    start: e.offset_in_chunk,
                    len: e.len,
                };
                let at = e.buf_offset as usize;
                pieces.push((piece, data.slice(at..at + e.len as usize)));
            }
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

    /// Writes pieces that all lie in parity row `row`, as one plan when every member of the row
    /// is healthy, else piece by piece through the degraded-capable path.
    pub(super) async fn write_row_pieces(
        self: &Arc<Self>,
        row: u64,
        pieces: Vec<(Piece, Bytes)>,
    ) -> Result<()> {
        let c = self.geo.chunk_bytes;
        self.bitmap_begin(row * c, (row + 1) * c).await?;
        let res = self.write_row_pieces_tracked(row, pieces).await;
        self.with_bitmap(|b| {
            let rs = b.regions(row * c, (row + 1) * c);
            b.end_write(rs)
        });
        res
    }

    pub(super) async fn write_row_pieces_tracked(
        self: &Arc<Self>,
        row: u64,
        pieces: Vec<(Piece, Bytes)>,
    ) -> Result<()> {
        let geo = self.geo;
        let d = geo.data_per_row();
        let np = geo.level.parity_chunks();
        let shape: Vec<Piece> = pieces.iter().map(|(p, _)| *p).collect();
        let plan = rowplan::plan(d, np, geo.chunk_bytes, &shape)
            .map_err(|e| self.invalid(format!("row {row}: {e}")))?;
        let member_of = |role: usize| match role {
            r if r < d => geo.data_member(row, r),
            r if r == d => geo.p_member(row),
            _ => geo.q_member(row),
        };
        {
            let _g = self.lock_rows([row]).await;
            self.check_failed()?;
            let view = self.view();
            let healthy =
                (0..d + np).all(|r| view.readable[member_of(r)] && view.writable[member_of(r)]);
            if healthy {
                // Reads.
                let reads = join_all(plan.reads.iter().enumerate().flat_map(|(role, runs)| {
                    let m = member_of(role);
                    let dv = view.members[m].clone();
                    runs.iter().map(move |r| {
                        let dv = dv.clone();
                        async move {
                            let dv = dv?;
                            let off = self.member_off(row, r.first * COLUMN_BYTES);
                            self.read_member(m, &dv, off, r.columns() * COLUMN_BYTES)
                                .await
                        }
                    })
                }))
                .await;
                if reads.iter().all(Option::is_some) {
                    let mut it = reads.into_iter().flatten();
                    let old: Vec<Vec<Bytes>> = plan
                        .reads
                        .iter()
                        .map(|runs| it.by_ref().take(runs.len()).collect())
                        .collect();
                    let old_refs: Vec<Vec<&[u8]>> = old
                        .iter()
                        .map(|v| v.iter().map(|b| b.as_ref()).collect())
                        .collect();
                    let mut bufs: Vec<Vec<AlignedBuf>> = plan
                        .writes
                        .iter()
                        .map(|runs| {
                            runs.iter()
                                .map(|r| AlignedBuf::zeroed((r.columns() * COLUMN_BYTES) as usize))
                                .collect()
                        })
                        .collect();
                    {
                        let mut outs: Vec<Vec<&mut [u8]>> = bufs
                            .iter_mut()
                            .map(|v| v.iter_mut().map(|b| &mut b[..]).collect())
                            .collect();
                        let data: Vec<&[u8]> = pieces.iter().map(|(_, b)| b.as_ref()).collect();
                        rowplan::compute(&plan, d, &shape, &data, &old_refs, &mut outs)
                            .map_err(|e| self.invalid(format!("row {row}: {e}")))?;
                    }
                    let writes: Vec<(usize, u64, Bytes)> = plan
                        .writes
                        .iter()
                        .zip(bufs)
                        .enumerate()
                        .flat_map(|(role, (runs, bufs))| {
                            let m = member_of(role);
                            runs.iter().zip(bufs).map(move |(r, b)| {
                                (
                                    m,
                                    self.member_off(row, r.first * COLUMN_BYTES),
                                    b.into_bytes(),
                                )
                            })
                        })
                        .collect();
                    // Members may have failed (or a spare arrived) during the reads: write to
                    // what is writable now; the blocks computed are right for any of them.
                    let now = self.view();
                    let writes = writes
                        .into_iter()
                        .filter(|(m, _, _)| now.writable[*m])
                        .collect();
                    self.write_members(&now, writes).await;
                    return self.check_failed();
                }
                // A read failed (its member is now faulty): nothing was written yet.
            }
        }
        for (p, data) in pieces {
            let e = Extent {
                chunk: row * d as u64 + p.data as u64,
                offset_in_chunk: p.start,
                len: p.len,
                buf_offset: 0,
            };
            self.write_parity_row(vec![e], &data).await?;
        }
        self.check_failed()
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

    /// Writes extents that all fall in one parity row.
    pub(super) async fn write_parity_row(
        self: &Arc<Self>,
        exts: Vec<Extent>,
        data: &Bytes,
    ) -> Result<()> {
        let geo = self.geo;
        let d = geo.data_per_row();
        let c = geo.chunk_bytes;
        let row = exts[0].chunk / d as u64;
        let _g = self.lock_rows([row]).await;
        let lo = exts.iter().map(|e| e.offset_in_chunk).min().unwrap_or(0);
        let hi = exts
            .iter()
            .map(|e| e.offset_in_chunk + e.len)
            .max()
            .unwrap_or(0);
        let span = (hi - lo) as usize;
        let raid6 = geo.level == Level::Raid6;
        let mut newdata: Vec<Option<(Extent, Bytes)>> = vec![None; d];
        for e in &exts {
            let i = (e.chunk % d as u64) as usize;
            newdata[i] = Some((
                *e,
                data.slice(e.buf_offset as usize..(e.buf_offset + e.len) as usize),
            ));
        }
        let full = lo == 0
            && hi == c
            && newdata
                .iter()
                .all(|x| x.as_ref().is_some_and(|(e, _)| e.len == c));
        for _attempt in 0..=geo.members {
            self.check_failed()?;
            let view = self.view();
            let pm = geo.p_member(row);
            let qm = geo.q_member(row);
            let parity_readable = view.readable[pm] && (!raid6 || view.readable[qm]);
            let touched: Vec<usize> = (0..d).filter(|i| newdata[*i].is_some()).collect();
            let fully: usize = newdata
                .iter()
                .flatten()
                .filter(|(e, _)| e.offset_in_chunk == lo && e.len as usize == span)
                .count();
            let rmw_reads = touched.len() + geo.level.parity_chunks();
            let rcw_reads = d - fully;
            let rmw = !full
                && parity_readable
                && touched
                    .iter()
                    .all(|i| view.readable[geo.data_member(row, *i)])
                && rmw_reads < rcw_reads;
            let (p, q) = if full {
                let refs: Vec<&[u8]> = newdata.iter().flatten().map(|(_, b)| b.as_ref()).collect();
                // Page-aligned, so O_DIRECT members write the parity without a bounce copy.
                let mut p = AlignedBuf::zeroed(span);
                let mut q = AlignedBuf::zeroed(if raid6 { span } else { 0 });
                parity::gen_pq(&refs, &mut p, raid6.then_some(&mut q[..]));
                (p.into_bytes(), q.into_bytes())
            } else if rmw {
                let mut want = vec![false; geo.members];
                want[pm] = true;
                if raid6 {
                    want[qm] = true;
                }
                for i in &touched {
                    want[geo.data_member(row, *i)] = true;
                }
                let reads = join_all((0..geo.members).filter(|m| want[*m]).map(|m| {
                    let dv = view.members[m].clone();
                    async move {
                        match dv {
                            Some(dv) => (
                                m,
                                self.read_member(m, &dv, self.member_off(row, lo), hi - lo)
                                    .await,
                            ),
                            None => (m, None),
                        }
                    }
                }))
                .await;
                let mut old: Vec<Option<Vec<u8>>> = vec![None; geo.members];
                let mut ok = true;
                for (m, r) in reads {
                    match r {
                        Some(b) => old[m] = Some(b.to_vec()),
                        None => ok = false,
                    }
                }
                if !ok {
                    continue;
                }
                let mut p = old[pm].take().unwrap_or_default();
                let mut q = if raid6 {
                    old[qm].take().unwrap_or_default()
                } else {
                    Vec::new()
                };
                for &i in &touched {
                    let mut delta = old[geo.data_member(row, i)].take().unwrap_or_default();
                    let before = delta.clone();
                    if let Some((e, b)) = &newdata[i] {
                        let at = (e.offset_in_chunk - lo) as usize;
                        delta[at..at + b.len()].copy_from_slice(b);
                    }
                    parity::xor_into(&mut delta, &before);
                    parity::xor_into(&mut p, &delta);
                    if raid6 {
                        parity::mul_xor_into(parity::gf_pow2(i), &delta, &mut q);
                    }
                }
                (Bytes::from(p), Bytes::from(q))
            } else {
                // Reconstruct-write: every data chunk over [lo, hi), recovered where needed.
                let mut want = vec![true; geo.members];
                let all_data_readable = (0..d).all(|i| view.readable[geo.data_member(row, i)]);
                if all_data_readable {
                    want[pm] = false;
                    if raid6 {
                        want[qm] = false;
                    }
                }
                for (i, nd) in newdata.iter().enumerate() {
                    if nd
                        .as_ref()
                        .is_some_and(|(e, _)| e.offset_in_chunk == lo && e.len as usize == span)
                        && all_data_readable
                    {
                        want[geo.data_member(row, i)] = false;
                    }
                }
                let mut rb = if want.iter().any(|w| *w) || !all_data_readable {
                    if all_data_readable {
                        // read only what is wanted; fully-overwritten chunks get placeholders
                        let view2 = self.view();
                        let reads = join_all((0..d).map(|i| {
                            let m = geo.data_member(row, i);
                            let dv = view2.members[m].clone();
                            let go = want[m];
                            async move {
                                match (go, dv) {
                                    (true, Some(dv)) => Some(
                                        self.read_member(m, &dv, self.member_off(row, lo), hi - lo)
                                            .await,
                                    ),
                                    _ => None,
                                }
                            }
                        }))
                        .await;
                        let mut rb = RowBufs {
                            data: vec![None; d],
                            p: None,
                            q: None,
                            has_q: raid6,
                        };
                        let mut ok = true;
                        for (i, r) in reads.into_iter().enumerate() {
                            match r {
                                Some(Some(b)) => rb.data[i] = Some(b.to_vec()),
                                Some(None) => ok = false,
                                None => rb.data[i] = Some(vec![0u8; span]),
                            }
                        }
                        if !ok {
                            continue;
                        }
                        rb
                    } else {
                        match self.gather_row(row, lo, hi, &want).await? {
                            Some(rb) => rb,
                            None => continue,
                        }
                    }
                } else {
                    RowBufs {
                        data: vec![Some(vec![0u8; span]); d],
                        p: None,
                        q: None,
                        has_q: raid6,
                    }
                };
                for (i, nd) in newdata.iter().enumerate() {
                    if let (Some((e, b)), Some(buf)) = (nd, rb.data[i].as_mut()) {
                        let at = (e.offset_in_chunk - lo) as usize;
                        buf[at..at + b.len()].copy_from_slice(b);
                    }
                }
                let refs: Vec<&[u8]> = rb
                    .data
                    .iter()
                    .map(|x| x.as_deref().unwrap_or(&[]))
                    .collect();
                if refs.iter().any(|r| r.len() != span) {
                    return Err(ArrayError::Failed {
                        array: self.name.clone(),
                        detail: format!("row {row} could not be reconstructed"),
                    });
                }
                let mut p = vec![0u8; span];
                let mut q = vec![0u8; span];
                parity::gen_pq(&refs, &mut p, raid6.then_some(&mut q[..]));
                (Bytes::from(p), Bytes::from(q))
            };
            // Issue the writes.
            let view = self.view();
            let mut writes: Vec<(usize, u64, Bytes)> = Vec::new();
            for (i, nd) in newdata.iter().enumerate() {
                if let Some((e, b)) = nd {
                    let m = geo.data_member(row, i);
                    if view.writable[m] {
                        writes.push((m, self.member_off(row, e.offset_in_chunk), b.clone()));
                    }
                }
            }
            if view.writable[pm] {
                writes.push((pm, self.member_off(row, lo), p));
            }
            if raid6 && view.writable[qm] {
                writes.push((qm, self.member_off(row, lo), q));
            }
            self.write_members(&view, writes).await;
            return self.check_failed();
        }
        self.check_failed()?;
        Err(ArrayError::Failed {
            array: self.name.clone(),
            detail: format!("row {row}: members kept failing"),
        })
    }

    /// Issues member writes `(slot, offset, bytes)` of `view` concurrently; a device whose write
    /// fails is marked faulty.
    pub(super) async fn write_members(
        self: &Arc<Self>,
        view: &View,
        writes: Vec<(usize, u64, Bytes)>,
    ) {
        let results = join_all(writes.into_iter().filter_map(|(m, off, b)| {
            let dv = view.members[m].clone()?;
            Some(async move {
                let r = dv.write_at(off, b).await;
                (m, dv, r)
            })
        }))
        .await;
        for (m, dv, r) in results {
            if let Err(e) = r {
                self.device_failed(m, &dv, "write", &e).await;
            }
        }
    }

    pub(super) async fn flush(self: &Arc<Self>) -> Result<()> {
        self.check_failed()?;
        let epoch = self.with_bitmap(|b| b.start_flush());
        let view = self.view();
        let results = join_all(
            (0..self.geo.members)
                .filter(|m| view.writable[*m])
                .filter_map(|m| {
                    let d = view.members[m].clone()?;
                    Some(async move { (m, d.sync().await) })
                }),
        )
        .await;
        for (m, r) in results {
            if let Err(e) = r {
                self.member_failed(m, "sync", Some(&e), true).await;
            }
        }
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
