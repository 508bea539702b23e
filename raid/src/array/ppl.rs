//! The partial-parity log at work (entries and their math: [`crate::ppl`]): a degraded RAID 5/6
//! row update persists its entries through the attached [`PartialParityLog`] before any member
//! write, and after an unclean stop the journal hands the unretired entries back
//! ([`Array::replay_ppl`]) so the parity of every interrupted row agrees with its data, and the
//! absent member's blocks reconstruct as written, before the array does any other I/O.
//!
//! An array assembled after an unclean stop while degraded, with dirty bitmap regions and a
//! journal to replay ([`AssembleOptions::journaled`]), starts *pending*: it refuses writes and
//! starts no rebuild until [`Array::replay_ppl`] ran.

use super::*;
use crate::ppl::{self, PplEntry, PplError};

/// Where a degraded array persists partial parity before a stripe update (the NVRAM journal).
#[async_trait::async_trait]
pub trait PartialParityLog: Send + Sync + 'static {
    /// Persists one payload ([`crate::ppl::encode`]); returns once it survives what the log's
    /// medium survives. An error stops the row update before any member write.
    async fn persist(&self, payload: Vec<u8>) -> io::Result<()>;
}

impl Array {
    /// Attaches the log that degraded row updates persist their partial parity to (replacing
    /// any earlier one). Attach it before the first write of a journaled array.
    pub fn attach_ppl(&self, log: Arc<dyn PartialParityLog>) {
        *lock(&self.inner.ppl) = Some(log);
    }

    /// True while row updates log partial parity: a log is attached, the level has parity, and
    /// a member is absent or not readable yet.
    pub fn ppl_active(&self) -> bool {
        self.inner.ppl_needed().is_some()
    }

    /// Log bytes (each payload framed in at most `framing_bytes`) that the partial parity of an
    /// update of `len` bytes can take at most; 0 for levels without parity. `whole_rows`: the
    /// update is a discard or zeroing, which logs only its partial head and tail rows.
    pub fn ppl_bound_bytes(&self, len: u64, whole_rows: bool, framing_bytes: u64) -> u64 {
        let geo = self.inner.geo;
        if geo.level.parity_chunks() == 0 {
            return 0;
        }
        let stripe = geo.stripe_bytes();
        if whole_rows {
            ppl::zeroing_bound_bytes(
                len,
                stripe,
                geo.chunk_bytes,
                ZERO_WRITE_BYTES,
                framing_bytes,
            )
        } else {
            ppl::bound_bytes(len, stripe, geo.chunk_bytes, framing_bytes)
        }
    }

    /// True while the array waits for [`Array::replay_ppl`] (see the module doc).
    pub fn ppl_pending(&self) -> bool {
        self.inner.ppl_pending.load(Ordering::SeqCst)
    }

    /// After an unclean stop: rewrites the parity of every row the unretired payloads (oldest
    /// first) cover. Only an array that started pending uses them: a whole array recomputed its
    /// dirty regions' parity from the data at assembly, and later payloads would be stale.
    /// `complete`: the payloads come from the log that journaled the array (false after the
    /// log was lost: then a pending array refuses to start, unless `start_dirty_degraded`).
    /// Returns the number of entries applied; afterwards writes are accepted and rebuilds start.
    pub async fn replay_ppl(&self, payloads: Vec<Vec<u8>>, complete: bool) -> Result<usize> {
        let inner = &self.inner;
        if !inner.ppl_pending.load(Ordering::SeqCst) {
            return Ok(0);
        }
        if !complete && !inner.start_dirty_degraded.load(Ordering::SeqCst) {
            return Err(ArrayError::DirtyDegraded {
                array: inner.name.clone(),
                regions: inner.with_bitmap(|b| b.dirty_regions().len()),
            });
        }
        let mut entries: Vec<PplEntry> = Vec::new();
        for p in &payloads {
            let (flags, es) = ppl::decode(p).map_err(|e| inner.ppl_error(e))?;
            if flags & ppl::PPL_FLAG_RESET != 0 {
                entries.clear();
            }
            entries.extend(es);
        }
        let (d, rows) = (inner.geo.data_per_row(), inner.geo.rows);
        for e in &entries {
            ppl::check_entry(e, rows, d, inner.geo.chunk_bytes).map_err(|e| inner.ppl_error(e))?;
        }
        for e in &entries {
            inner.repair_row(e).await?;
        }
        if !entries.is_empty() {
            inner
                .sync_writable("sync after partial-parity replay")
                .await;
        }
        inner.check_failed()?;
        tracing::info!(array = %inner.name, entries = entries.len(), complete, "partial-parity log replayed; the degraded array starts");
        inner.ppl_pending.store(false, Ordering::SeqCst);
        inner.kick_rebuild();
        Ok(entries.len())
    }
}

impl Inner {
    fn ppl_error(&self, e: PplError) -> ArrayError {
        self.invalid(format!(
            "unusable partial-parity log record ({e}); the NVRAM log is damaged"
        ))
    }

    /// The attached log when a row update must log partial parity now.
    pub(super) fn ppl_needed(&self) -> Option<Arc<dyn PartialParityLog>> {
        if self.geo.level.parity_chunks() == 0 || !self.is_degraded() {
            return None;
        }
        lock(&self.ppl).clone()
    }

    /// Refuses writes while a pending array waits for its partial-parity replay.
    pub(super) fn check_ppl_replayed(&self) -> Result<()> {
        if self.ppl_pending.load(Ordering::SeqCst) {
            return Err(self.invalid(
                "stopped uncleanly while degraded: writes wait until the journal replayed its \
                 partial-parity log"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The array is whole again (a rebuild finished): later row updates log nothing, so the
    /// partial parity logged so far must never be replayed over them. Logs a RESET payload that
    /// voids every earlier entry (best effort: a failure is logged).
    pub(super) async fn ppl_whole_again(&self) {
        if self.geo.level.parity_chunks() == 0 || self.is_degraded() {
            return;
        }
        let Some(log) = lock(&self.ppl).clone() else {
            return;
        };
        if let Err(e) = log.persist(ppl::encode(ppl::PPL_FLAG_RESET, &[])).await {
            tracing::warn!(array = %self.name, error = %e, "could not log the end of degraded operation in the partial-parity log");
        }
    }

    /// A member of `row` failed while the row was being written without partial parity: the
    /// survivors' writes are not durable yet, and the failed member's blocks now live only in
    /// the parity. Logs the row's partial parity at once (best effort: a failure is logged and
    /// the write goes on as it would have without PPL). The cut between the failure and this
    /// record, and rows written before the failure and not flushed yet, stay exposed.
    pub(super) async fn log_ppl_after_failure(
        &self,
        row: u64,
        plan: &RowPlan,
        pieces: &[(Piece, Bytes)],
        writes: &[(usize, u64, Bytes)],
        planned: &[bool],
    ) {
        if lock(&self.ppl).is_none() || self.geo.level.parity_chunks() == 0 {
            return;
        }
        let view = self.view();
        let readable: Vec<bool> = (0..planned.len())
            .map(|r| view.readable[self.role_member(row, r)])
            .collect();
        if readable == planned {
            return;
        }
        if let Err(e) = self.log_row_ppl(row, plan, pieces, writes, &readable).await {
            tracing::warn!(array = %self.name, row, error = %e, "partial parity of a row whose member failed mid-write could not be logged");
        }
    }

    /// Persists the entries of an update of `row` (planned as `plan`, member writes `writes` in
    /// role order, `readable` per role at planning) when the row lacks a member the parity must
    /// stand in for (RAID 5 rows whose only absent chunk is P need none). True when it logged.
    pub(super) async fn log_row_ppl(
        &self,
        row: u64,
        plan: &RowPlan,
        pieces: &[(Piece, Bytes)],
        writes: &[(usize, u64, Bytes)],
        readable: &[bool],
    ) -> Result<bool> {
        let d = self.geo.data_per_row();
        let absent: Vec<bool> = readable[..d].iter().map(|r| !r).collect();
        // RAID 6 also logs a row missing only a parity chunk: the other one must be recomputed.
        let parity_absent = readable.len() > d + 1 && readable[d..].iter().any(|r| !r);
        if !absent.iter().any(|a| *a) && !parity_absent {
            return Ok(false);
        }
        let Some(log) = lock(&self.ppl).clone() else {
            return Ok(false);
        };
        let before: usize = plan.writes[..d].iter().map(Vec::len).sum();
        let p_new: Vec<&[u8]> = writes[before..before + plan.writes[d].len()]
            .iter()
            .map(|(_, _, b)| b.as_ref())
            .collect();
        let ps: Vec<(Piece, &[u8])> = pieces.iter().map(|(p, b)| (*p, b.as_ref())).collect();
        let entries = ppl::entries_for_row(row, &plan.writes[d], &p_new, &ps, &absent);
        if entries.is_empty() {
            return Ok(false);
        }
        log.persist(ppl::encode(0, &entries))
            .await
            .map_err(|source| ArrayError::PartialParityLog {
                array: self.name.clone(),
                row,
                source,
            })?;
        Ok(true)
    }

    /// Rewrites the parity of one logged run from the data on the members now.
    async fn repair_row(self: &Arc<Self>, e: &PplEntry) -> Result<()> {
        let geo = self.geo;
        let (d, np) = (geo.data_per_row(), geo.level.parity_chunks());
        let _g = self.lock_rows([e.row]).await;
        let view = self.view();
        let (lo, hi) = e.byte_range();
        let off = self.member_off(e.row, lo);
        let reads = join_all((0..d).map(|i| {
            let m = geo.data_member(e.row, i);
            let dv = view.members[m].clone().filter(|_| view.readable[m]);
            async move {
                match dv {
                    Some(dv) => self.read_member(m, &dv, off, hi - lo).await.map(Some),
                    None => Some(None),
                }
            }
        }))
        .await;
        let mut data = Vec::with_capacity(d);
        for r in reads {
            let Some(block) = r else {
                return Err(ArrayError::Failed {
                    array: self.name.clone(),
                    detail: format!(
                        "row {}: a member failed during partial-parity replay",
                        e.row
                    ),
                });
            };
            data.push(block.map(|b| b.to_vec()));
        }
        let (p, q) = ppl::repair(e, &data, np == 2).map_err(|err| self.ppl_error(err))?;
        let now = self.view();
        let mut writes = vec![(geo.p_member(e.row), off, Bytes::from(p))];
        if let Some(q) = q {
            writes.push((geo.q_member(e.row), off, Bytes::from(q)));
        }
        let writes = writes
            .into_iter()
            .filter(|(m, _, _)| now.writable[*m])
            .collect();
        self.write_members(&now, writes).await;
        self.check_failed()
    }
}
