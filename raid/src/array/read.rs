//! The foreground read path: a healthy read goes to one copy (round-robin across mirrors) without
//! a row lock; a chunk with no readable copy is rebuilt from the rest of its row under the row
//! lock (degraded reconstruct). A member whose read fails is failed and the read retried.

use super::*;

impl Inner {
    pub(super) async fn read_member(
        self: &Arc<Self>,
        slot: usize,
        d: &Arc<dyn Member>,
        off: u64,
        len: u64,
    ) -> Option<Bytes> {
        match d.read_at(off, len as usize).await {
            Ok(b) if b.len() as u64 == len => Some(b),
            Ok(b) => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read: {} of {len} bytes", b.len()),
                );
                self.device_failed(slot, d, "read", &e).await;
                None
            }
            Err(e) => {
                self.device_failed(slot, d, "read", &e).await;
                None
            }
        }
    }

    pub(super) async fn read(self: &Arc<Self>, offset: u64, len: u64) -> Result<Bytes> {
        self.check_range(offset, len)?;
        self.check_failed()?;
        let exts = self.geo.extents(offset, len);
        if exts.len() == 1 {
            return self.read_extent(exts[0]).await;
        }
        let parts = try_join_all(exts.iter().map(|e| self.read_extent(*e))).await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    /// [`Inner::read`] without joining: one buffer per extent (each member read's own aligned
    /// buffer), in order. A caller that sends or splits the bytes anyway (the NBD reply, the
    /// read cache's blocks) saves copying a large read into one buffer first.
    pub(super) async fn read_pieces(self: &Arc<Self>, offset: u64, len: u64) -> Result<Vec<Bytes>> {
        self.check_range(offset, len)?;
        self.check_failed()?;
        let exts = self.geo.extents(offset, len);
        if exts.len() == 1 {
            return Ok(vec![self.read_extent(exts[0]).await?]);
        }
        try_join_all(exts.iter().map(|e| self.read_extent(*e))).await
    }

    pub(super) async fn read_extent(self: &Arc<Self>, e: Extent) -> Result<Bytes> {
        for _attempt in 0..=self.geo.members {
            self.check_failed()?;
            let view = self.view();
            let places = self.geo.places(e.chunk);
            let start = self.read_rr.fetch_add(1, Ordering::Relaxed);
            let pick = (0..places.len())
                .map(|j| places[(start + j) % places.len()])
                .find(|p| view.readable[p.member]);
            match pick {
                Some(p) => {
                    let Some(d) = view.members[p.member].clone() else {
                        continue;
                    };
                    if let Some(b) = self
                        .read_member(
                            p.member,
                            &d,
                            self.member_off(p.row, e.offset_in_chunk),
                            e.len,
                        )
                        .await
                    {
                        return Ok(b);
                    }
                }
                None if self.geo.level.parity_chunks() > 0 => {
                    let row = places[0].row;
                    let i = (e.chunk % self.geo.data_per_row() as u64) as usize;
                    let _g = self.lock_rows([row]).await;
                    if let Some(b) = self
                        .reconstruct(row, i, e.offset_in_chunk, e.offset_in_chunk + e.len)
                        .await?
                    {
                        return Ok(b);
                    }
                }
                None => break,
            }
        }
        self.check_failed()?;
        Err(ArrayError::Failed {
            array: self.name.clone(),
            detail: format!("no readable copy of chunk {}", e.chunk),
        })
    }

    /// Reads `[lo, hi)` of every readable member of `row` (skipping `skip`) and recovers the row.
    /// `None` means a member failed meanwhile: retry. Caller holds the row lock.
    pub(super) async fn gather_row(
        self: &Arc<Self>,
        row: u64,
        lo: u64,
        hi: u64,
        want: &[bool],
    ) -> Result<Option<RowBufs>> {
        let view = self.view();
        let n = self.geo.members;
        let reads = join_all((0..n).map(|m| {
            let d = view.members[m].clone();
            let go = view.readable[m] && want[m];
            async move {
                match (go, d) {
                    (true, Some(d)) => Some(
                        self.read_member(m, &d, self.member_off(row, lo), hi - lo)
                            .await,
                    ),
                    _ => None,
                }
            }
        }))
        .await;
        let mut rb = RowBufs {
            data: vec![None; self.geo.data_per_row()],
            p: None,
            q: None,
            has_q: self.geo.level == Level::Raid6,
        };
        for (m, r) in reads.into_iter().enumerate() {
            match r {
                Some(None) => return Ok(None),
                Some(Some(b)) => {
                    let v = b.to_vec();
                    match self.geo.role(row, m) {
                        ChunkRole::Data(i) => rb.data[i] = Some(v),
                        ChunkRole::P => rb.p = Some(v),
                        ChunkRole::Q => rb.q = Some(v),
                    }
                }
                None => {}
            }
        }
        match parity::recover(&mut rb) {
            Ok(()) => Ok(Some(rb)),
            Err(e) => {
                self.check_failed()?;
                Err(ArrayError::Failed {
                    array: self.name.clone(),
                    detail: format!("row {row}: {e}"),
                })
            }
        }
    }

    pub(super) async fn reconstruct(
        self: &Arc<Self>,
        row: u64,
        i: usize,
        lo: u64,
        hi: u64,
    ) -> Result<Option<Bytes>> {
        let want = vec![true; self.geo.members];
        Ok(self
            .gather_row(row, lo, hi, &want)
            .await?
            .and_then(|mut rb| rb.data[i].take().map(Bytes::from)))
    }
}
