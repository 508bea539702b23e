//! One rebuild batch: reading the sources of a run of rows, computing the target's contents (copy
//! for mirrors, XOR / P+Q recovery for parity) and writing it, all under the batch's row locks.

use super::*;

/// How one rebuild batch ended.
pub(super) enum BatchOutcome {
    Done,
    /// The target left its slot or the array failed: stop this resync quietly.
    TargetGone,
    Error(String),
}

/// Row locks of one rebuild batch, held from before its sources are read until its target
/// write completes, so no foreground write to those rows can land in between.
pub(super) type BatchLocks = Vec<tokio::sync::OwnedMutexGuard<()>>;

/// A rebuild batch read and recomputed, waiting for its target write.
pub(super) struct RebuiltBatch {
    _rows: BatchLocks,
    slot: usize,
    dev: Uuid,
    target: Arc<dyn Member>,
    offset: u64,
    out: Bytes,
}

/// What reading and recomputing a rebuild batch gave.
pub(super) enum Prepared {
    Ready(RebuiltBatch),
    /// A source failed (and is now faulty): retry with the remaining members, same locks.
    Retry(BatchLocks),
    TargetGone,
}

impl Inner {
    /// Whether `slot` still holds device `dev` under resync in a working array.
    pub(super) fn still_rebuilding(&self, slot: usize, dev: Uuid) -> bool {
        let m = lock(&self.meta);
        m.slots[slot].dev_uuid == dev && m.slots[slot].resync.is_some() && m.failed.is_none()
    }

    /// The rows a rebuild batch `[r0, r1)` locks: RAID 10 copies may sit in a neighbouring row
    /// (odd member count), so one more on each side there; other levels exactly their rows.
    pub(super) fn rebuild_lock_rows(&self, r0: u64, r1: u64) -> std::ops::Range<u64> {
        if self.geo.level == Level::Raid10 {
            r0.saturating_sub(1)..(r1 + 1).min(self.geo.rows)
        } else {
            r0..r1
        }
    }

    /// Writes a prepared batch to its target. A failed write fails the target (when it is still the
    /// slot's device), not the batch; a target that left its slot is not written at all.
    pub(super) async fn rebuild_write(self: &Arc<Self>, batch: RebuiltBatch) -> BatchOutcome {
        if !self.still_rebuilding(batch.slot, batch.dev) {
            return BatchOutcome::TargetGone;
        }
        if let Err(e) = batch.target.write_at(batch.offset, batch.out).await {
            self.device_failed(batch.slot, &batch.target, "rebuild write", &e)
                .await;
            return BatchOutcome::TargetGone;
        }
        BatchOutcome::Done
    }

    /// Second stage of a rebuild batch, given what its first stage (`rebuild_prepare`) gave:
    /// writes the target, or reads again (still holding the batch's locks) after a source
    /// failed, a bounded number of times.
    pub(super) async fn rebuild_finish(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        r0: u64,
        r1: u64,
        mut prepared: Result<Prepared>,
    ) -> BatchOutcome {
        for _attempt in 0..=self.geo.members {
            match prepared {
                Ok(Prepared::Ready(batch)) => return self.rebuild_write(batch).await,
                Ok(Prepared::TargetGone) => return BatchOutcome::TargetGone,
                Err(e) => return BatchOutcome::Error(e.to_string()),
                Ok(Prepared::Retry(locks)) => {
                    prepared = self.rebuild_prepare(slot, dev, r0, r1, locks).await;
                }
            }
        }
        BatchOutcome::Error(format!("rows {r0}..{r1}: source members kept failing"))
    }

    /// Reads the sources of rows `[r0, r1)` of `slot` and computes the target's contents; the
    /// caller holds the rows' locks (`locks`, from [`Inner::rebuild_lock_rows`]).
    pub(super) async fn rebuild_prepare(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        r0: u64,
        r1: u64,
        locks: BatchLocks,
    ) -> Result<Prepared> {
        let geo = self.geo;
        let view = self.view();
        let target = match &view.members[slot] {
            Some(t) if self.still_rebuilding(slot, dev) => Arc::clone(t),
            _ => return Ok(Prepared::TargetGone),
        };
        // Output buffers are page-aligned so O_DIRECT members write them without a bounce copy.
        let out = match geo.level {
            Level::Raid0 => return Err(self.invalid("raid0 cannot rebuild a member".into())),
            Level::Raid1 => self.rebuild_copy(&view, slot, r0, r1).await?,
            Level::Raid10 => self.rebuild_raid10(&view, slot, r0, r1).await?,
            Level::Raid5 | Level::Raid6 => self.rebuild_parity(&view, slot, r0, r1).await?,
        };
        let Some(out) = out else {
            return Ok(Prepared::Retry(locks));
        };
        Ok(Prepared::Ready(RebuiltBatch {
            _rows: locks,
            slot,
            dev,
            target,
            offset: self.member_off(r0, 0),
            out,
        }))
    }

    /// RAID 1: rows `[r0, r1)` of `slot` are a copy of any readable member. `None`: retry.
    async fn rebuild_copy(
        self: &Arc<Self>,
        view: &View,
        slot: usize,
        r0: u64,
        r1: u64,
    ) -> Result<Option<Bytes>> {
        let geo = self.geo;
        let c = geo.chunk_bytes;
        let len = ((r1 - r0) * c) as usize;
        let Some(src) = (0..geo.members).find(|m| *m != slot && view.readable[*m]) else {
            return Err(ArrayError::Failed {
                array: self.name.clone(),
                detail: "no source copy".into(),
            });
        };
        let Some(d) = view.members[src].clone() else {
            return Ok(None);
        };
        Ok(self
            .read_member(src, &d, self.member_off(r0, 0), len as u64)
            .await)
    }

    /// RAID 10: each chunk of `slot` in rows `[r0, r1)` from its other copy. `None`: retry.
    async fn rebuild_raid10(
        self: &Arc<Self>,
        view: &View,
        slot: usize,
        r0: u64,
        r1: u64,
    ) -> Result<Option<Bytes>> {
        let geo = self.geo;
        let c = geo.chunk_bytes;
        let len = ((r1 - r0) * c) as usize;
        let mut out = AlignedBuf::zeroed(len);
        let mut jobs = Vec::new();
        for r in r0..r1 {
            let Some(k) = geo.raid10_chunk_at(slot, r) else {
                continue;
            };
            let Some(p) = geo
                .places(k)
                .into_iter()
                .find(|p| p.member != slot || p.row != r)
            else {
                continue;
            };
            if !view.readable[p.member] {
                return Err(ArrayError::Failed {
                    array: self.name.clone(),
                    detail: format!("chunk {k} has no readable copy"),
                });
            }
            jobs.push((r, p));
        }
        let reads = join_all(jobs.iter().map(|(r, p)| {
            let d = view.members[p.member].clone();
            async move {
                match d {
                    Some(d) => (
                        *r,
                        self.read_member(p.member, &d, self.member_off(p.row, 0), c)
                            .await,
                    ),
                    None => (*r, None),
                }
            }
        }))
        .await;
        for (r, b) in reads {
            let Some(b) = b else {
                return Ok(None);
            };
            let at = ((r - r0) * c) as usize;
            out[at..at + c as usize].copy_from_slice(&b);
        }
        Ok(Some(out.into_bytes()))
    }

    /// RAID 5/6: each chunk of `slot` in rows `[r0, r1)` recovered from the rest of its row.
    /// `None`: retry.
    async fn rebuild_parity(
        self: &Arc<Self>,
        view: &View,
        slot: usize,
        r0: u64,
        r1: u64,
    ) -> Result<Option<Bytes>> {
        let geo = self.geo;
        let c = geo.chunk_bytes;
        let len = ((r1 - r0) * c) as usize;
        let reads = join_all((0..geo.members).map(|m| {
            let d = view.members[m].clone();
            let go = m != slot && view.readable[m];
            async move {
                match (go, d) {
                    (true, Some(d)) => Some(
                        self.read_member(m, &d, self.member_off(r0, 0), len as u64)
                            .await,
                    ),
                    _ => None,
                }
            }
        }))
        .await;
        let mut srcs: Vec<Option<Bytes>> = Vec::with_capacity(geo.members);
        for r in reads {
            match r {
                Some(None) => return Ok(None),
                Some(Some(b)) => srcs.push(Some(b)),
                None => srcs.push(None),
            }
        }
        let mut out = AlignedBuf::zeroed(len);
        let cu = c as usize;
        for r in r0..r1 {
            let at = ((r - r0) * c) as usize;
            if self.rebuild_chunk_fast(r, slot, &srcs, at, &mut out[at..at + cu]) {
                continue;
            }
            let mut rb = RowBufs {
                data: vec![None; geo.data_per_row()],
                p: None,
                q: None,
                has_q: geo.level == Level::Raid6,
            };
            for (m, s) in srcs.iter().enumerate() {
                if let Some(s) = s {
                    let v = s[at..at + cu].to_vec();
                    match geo.role(r, m) {
                        ChunkRole::Data(i) => rb.data[i] = Some(v),
                        ChunkRole::P => rb.p = Some(v),
                        ChunkRole::Q => rb.q = Some(v),
                    }
                }
            }
            parity::recover(&mut rb).map_err(|e| ArrayError::Failed {
                array: self.name.clone(),
                detail: format!("row {r}: {e}"),
            })?;
            let chunk = match geo.role(r, slot) {
                ChunkRole::Data(i) => rb.data[i].take(),
                ChunkRole::P => rb.p.take(),
                ChunkRole::Q => rb.q.take(),
            };
            if let Some(chunk) = chunk {
                out[at..at + cu].copy_from_slice(&chunk);
            }
        }
        Ok(Some(out.into_bytes()))
    }

    /// The common single-failure cases without copies: a data chunk or P is the XOR of every
    /// other chunk but Q; Q is recomputed from the data. Returns false when the general
    /// recovery is needed (two chunks of the row missing).
    pub(super) fn rebuild_chunk_fast(
        &self,
        row: u64,
        slot: usize,
        srcs: &[Option<Bytes>],
        at: usize,
        out: &mut [u8],
    ) -> bool {
        let geo = self.geo;
        let len = out.len();
        let chunk = |m: usize| srcs[m].as_ref().map(|b| &b[at..at + len]);
        let raid6 = geo.level == Level::Raid6;
        match geo.role(row, slot) {
            ChunkRole::Q => {
                let data: Option<Vec<&[u8]>> = (0..geo.data_per_row())
                    .map(|i| chunk(geo.data_member(row, i)))
                    .collect();
                let Some(data) = data else { return false };
                let mut p = vec![0u8; len];
                parity::gen_pq(&data, &mut p, Some(out));
                true
            }
            _ => {
                let others: Option<Vec<&[u8]>> = (0..geo.members)
                    .filter(|m| *m != slot && !(raid6 && *m == geo.q_member(row)))
                    .map(chunk)
                    .collect();
                let Some(others) = others else { return false };
                parity::xor_of(out, &others);
                true
            }
        }
    }
}
