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
        if let Some(e) = self.geo.single_extent(offset, len) {
            return self.read_extent(e).await;
        }
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
    ///
    /// Extents that lie back to back on one member (a member's chunks of consecutive rows, a
    /// large read's usual shape) are read with one member read and handed out as slices of it:
    /// a 1 MiB read of a 4-member RAID-5 with 64 KiB chunks is about 6 member reads instead of
    /// 16. A merged read that fails falls back to the per-extent path (retry, reconstruct).
    pub(super) async fn read_pieces(self: &Arc<Self>, offset: u64, len: u64) -> Result<Vec<Bytes>> {
        self.check_range(offset, len)?;
        if let Some(e) = self.geo.single_extent(offset, len) {
            // `read_extent` checks for a failed array itself.
            return Ok(vec![self.read_extent(e).await?]);
        }
        self.check_failed()?;
        let exts = self.geo.extents(offset, len);
        if exts.len() == 1 {
            return Ok(vec![self.read_extent(exts[0]).await?]);
        }
        let runs = merge_runs(exts.iter().map(|e| self.single_place(e)));
        let parts = try_join_all(runs.iter().map(|r| self.read_run(&exts, r))).await?;
        let mut out = vec![Bytes::new(); exts.len()];
        for (run, pieces) in runs.iter().zip(parts) {
            for (&i, piece) in run.extents.iter().zip(pieces) {
                out[i] = piece;
            }
        }
        Ok(out)
    }

    /// Where extent `e` lives when it has exactly one copy (RAID-0, 5, 6): (member, byte offset
    /// on the member, length). None for mirrored levels (the read picks among copies).
    fn single_place(&self, e: &Extent) -> Option<(usize, u64, u64)> {
        match self.geo.places(e.chunk)[..] {
            [p] => Some((p.member, self.member_off(p.row, e.offset_in_chunk), e.len)),
            _ => None,
        }
    }

    /// The extents of `run`, in the run's order: one member read for the whole run when it has
    /// several extents and its member is readable, else (or when that read fails) each extent
    /// on its own path.
    async fn read_run(self: &Arc<Self>, exts: &[Extent], run: &MemberRun) -> Result<Vec<Bytes>> {
        if let (true, Some(member)) = (run.extents.len() > 1, run.member) {
            let view = self.view();
            if let (true, Some(d)) = (view.readable[member], view.members[member].clone()) {
                if let Some(b) = self.read_member(member, &d, run.offset, run.len).await {
                    let mut at = 0usize;
                    return Ok(run
                        .extents
                        .iter()
                        .map(|&i| {
                            let len = exts[i].len as usize;
                            at += len;
                            b.slice(at - len..at)
                        })
                        .collect());
                }
            }
        }
        let mut out = Vec::with_capacity(run.extents.len());
        for &i in &run.extents {
            out.push(self.read_extent(exts[i]).await?);
        }
        Ok(out)
    }

    pub(super) async fn read_extent(self: &Arc<Self>, e: Extent) -> Result<Bytes> {
        if let Some(b) = self.read_extent_healthy(e).await {
            return Ok(b);
        }
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

    /// The usual small read: extent `e` has one fixed place (RAID 0, 5, 6), the array has not
    /// failed and the member is active. One look at the metadata under its lock, no per-read
    /// vectors (`view` builds three, `places` one). `None` when any of that does not hold or
    /// the member read failed (the member is then failed, as on the general path): the caller
    /// takes the general path, which retries on another copy or rebuilds from parity.
    async fn read_extent_healthy(self: &Arc<Self>, e: Extent) -> Option<Bytes> {
        let p = self.geo.single_place(e.chunk)?;
        let d = {
            let m = lock(&self.meta);
            let slot = m.slots.get(p.member).filter(|_| m.failed.is_none())?;
            match (&slot.member, slot.state) {
                (Some(d), MemberState::Active) => Arc::clone(d),
                _ => return None,
            }
        };
        self.read_member(
            p.member,
            &d,
            self.member_off(p.row, e.offset_in_chunk),
            e.len,
        )
        .await
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

/// Most bytes one merged member read covers.
pub(super) const MERGED_MEMBER_READ_BYTES_MAX: u64 = 1 << 20;

/// Extents (indexes into a request's extent list) read together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct MemberRun {
    /// The member all of them are on; None: a single extent without one fixed place.
    pub member: Option<usize>,
    /// Byte offset on the member and length of the whole run.
    pub offset: u64,
    pub len: u64,
    /// The extents, in member order (which is also their order in the request).
    pub extents: Vec<usize>,
}

/// Groups extents (given as their single place, in request order) into runs that are back to
/// back on one member, each at most [`MERGED_MEMBER_READ_BYTES_MAX`]. An extent continues the
/// run its member has open when it starts where that run ends; otherwise it opens a new one.
pub(super) fn merge_runs(
    places: impl Iterator<Item = Option<(usize, u64, u64)>>,
) -> Vec<MemberRun> {
    let mut runs: Vec<MemberRun> = Vec::new();
    // The open run of each member seen so far: (member, index into `runs`).
    let mut open: Vec<(usize, usize)> = Vec::new();
    for (i, place) in places.enumerate() {
        let Some((member, offset, len)) = place else {
            runs.push(MemberRun {
                member: None,
                offset: 0,
                len: 0,
                extents: vec![i],
            });
            continue;
        };
        let slot = open.iter().position(|&(m, _)| m == member);
        if let Some(r) = slot.map(|k| &mut runs[open[k].1]) {
            if r.offset + r.len == offset && r.len + len <= MERGED_MEMBER_READ_BYTES_MAX {
                r.len += len;
                r.extents.push(i);
                continue;
            }
        }
        runs.push(MemberRun {
            member: Some(member),
            offset,
            len,
            extents: vec![i],
        });
        let at = runs.len() - 1;
        match slot {
            Some(k) => open[k].1 = at,
            None => open.push((member, at)),
        }
    }
    runs
}

#[cfg(test)]
mod tests {
    use super::*;

    const K: u64 = 64 << 10;

    #[test]
    fn back_to_back_extents_on_a_member_form_one_run() {
        // Member 0: rows 0, 1, 2 back to back; member 1: rows 0 and 2 (row 1 is its parity).
        let places = [
            Some((0, 0, K)),
            Some((1, 0, K)),
            Some((0, K, K)),
            Some((2, K, K)),
            Some((0, 2 * K, K)),
            Some((1, 2 * K, K)),
        ];
        let runs = merge_runs(places.into_iter());
        let got: Vec<(Option<usize>, u64, u64, Vec<usize>)> = runs
            .into_iter()
            .map(|r| (r.member, r.offset, r.len, r.extents))
            .collect();
        assert_eq!(
            got,
            [
                (Some(0), 0, 3 * K, vec![0, 2, 4]),
                (Some(1), 0, K, vec![1]),
                (Some(2), K, K, vec![3]),
                (Some(1), 2 * K, K, vec![5]),
            ]
        );
    }

    #[test]
    fn runs_stop_at_the_merge_limit() {
        let n = MERGED_MEMBER_READ_BYTES_MAX / K + 1;
        let runs = merge_runs((0..n).map(|i| Some((3, i * K, K))));
        assert_eq!(runs.len(), 2);
        assert_eq!(runs[0].len, MERGED_MEMBER_READ_BYTES_MAX);
        assert_eq!(runs[1].extents, vec![n as usize - 1]);
    }

    #[test]
    fn extents_without_a_single_place_stay_alone() {
        let runs = merge_runs([None, None, Some((0, 0, K))].into_iter());
        assert_eq!(runs.len(), 3);
        assert!(runs.iter().all(|r| r.extents.len() == 1));
    }
}
