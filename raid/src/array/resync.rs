//! The resync driver: one background task takes slots that need a full rebuild or a bitmap resync
//! one after the other, runs their batches through a read-ahead / write-behind pipeline under a
//! rate limit, records checkpoints and reports progress.

use super::*;

/// What a resync does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncKind {
    /// Every row, from a checkpoint.
    Full,
    /// Only rows of regions the write-intent bitmap marks.
    Bitmap,
}

/// Index of the first batch not covered by `done_rows` rows of completed batches.
fn done_batches(batches: &[(u64, u64)], done_rows: u64) -> usize {
    let mut rows = 0;
    for (i, (a, b)) in batches.iter().enumerate() {
        if rows >= done_rows {
            return i;
        }
        rows += b - a;
    }
    batches.len()
}

/// Progress figures of a resync that has done `done` of `total` bytes in `elapsed`; the
/// identifying fields are the caller's.
fn progress(done: u64, total: u64, elapsed: Duration) -> RebuildStatus {
    let rate = done as f64 / elapsed.as_secs_f64().max(1e-6);
    RebuildStatus {
        slot: 0,
        member: String::new(),
        kind: ResyncKind::Full,
        running: false,
        done_bytes: done,
        total_bytes: total,
        percent: if total == 0 {
            100.0
        } else {
            done as f64 * 100.0 / total as f64
        },
        rate_bytes_per_sec: rate,
        eta_secs: (rate > 0.0).then(|| total.saturating_sub(done) as f64 / rate),
        error: None,
    }
}

impl Inner {
    pub(super) fn next_resync_slot(&self) -> Option<usize> {
        let m = lock(&self.meta);
        if m.failed.is_some() {
            return None;
        }
        m.slots
            .iter()
            .position(|s| s.resync.is_some() && s.member.is_some())
            .or_else(|| m.replacement.as_ref().map(|r| r.slot))
    }

    pub(super) fn kick_rebuild(self: &Arc<Self>) {
        // A pending array rebuilds nothing before its partial-parity replay: the rebuild would
        // copy blocks reconstructed from parity the replay has not repaired yet.
        if self.stop.load(Ordering::SeqCst)
            || self.ppl_pending.load(Ordering::SeqCst)
            || self.next_resync_slot().is_none()
        {
            return;
        }
        if self.rebuild_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let handle = tokio::spawn(async move {
            while let Some(slot) = me.next_resync_slot() {
                if me.stop.load(Ordering::SeqCst) || !me.run_resync(slot).await {
                    break;
                }
            }
            me.rebuild_running.store(false, Ordering::SeqCst);
            // Work queued while this task was finishing would otherwise wait for the next kick.
            if !me.stop.load(Ordering::SeqCst) && me.next_resync_slot().is_some() {
                me.kick_rebuild();
            }
        });
        *lock(&self.rebuild_task) = Some(handle);
    }

    /// Row ranges a resync of `kind` covers, starting at `from_row`.
    pub(super) fn resync_ranges(&self, kind: ResyncKind, from_row: u64) -> (Vec<(u64, u64)>, u64) {
        match kind {
            ResyncKind::Full => (vec![(from_row, self.geo.rows)], 0),
            ResyncKind::Bitmap => {
                let regions = self.with_bitmap(|b| b.dirty_regions());
                let ranges: Vec<(u64, u64)> = regions
                    .iter()
                    .map(|r| self.region_rows(*r))
                    .filter(|(a, b)| a < b)
                    .collect();
                (ranges, regions.len() as u64)
            }
        }
    }

    /// Rebuilds or resyncs `slot`; returns false when the task should stop.
    pub(super) async fn run_resync(self: &Arc<Self>, slot: usize) -> bool {
        let Some((kind, from_row, dev, name)) = self.resync_target(slot) else {
            return self.run_hot_copy(slot).await;
        };
        let (ranges, regions) = self.resync_ranges(kind, from_row);
        let c = self.geo.chunk_bytes;
        let total_rows: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        let started = Instant::now();
        let mut done_rows = 0u64;
        let mut last_cp = Instant::now();
        let set_progress = |done_rows: u64, running: bool, error: Option<String>| {
            *lock(&self.progress) = Some(RebuildStatus {
                slot,
                member: name.clone(),
                kind,
                running,
                error,
                ..progress(done_rows * c, total_rows * c, started.elapsed())
            });
        };
        set_progress(0, true, None);
        tracing::info!(array = %self.name, slot, member = %name, ?kind, rows = total_rows, "resync starts");
        let batches = self.resync_batches(ranges);
        // A two-stage pipeline: up to REBUILD_READ_AHEAD batches are read and recomputed while
        // up to REBUILD_WRITE_DEPTH earlier ones are written, so the sources and the target are
        // busy at the same time (batches that each read, then write, fall into step and leave
        // the disks idle in turn). Results arrive in order, so every batch before the one being
        // consumed is complete when a checkpoint is recorded.
        //
        // Batches take their row locks one batch after the other (`then`), each batch all of its
        // locks before the next one starts: a batch waiting in the pipeline for an earlier one
        // to finish then never holds a lock that earlier batch (or a foreground request that the
        // earlier batch waits for) still needs. RAID 10 batches share rows at their edges.
        //
        // The rate limit delays a batch before it takes its locks, so a throttled rebuild does
        // not keep rows locked (and foreground writes to them waiting) while it sleeps.
        let mut rows_before = Vec::with_capacity(batches.len());
        let mut sum = 0u64;
        for &(r0, r1) in &batches {
            rows_before.push(sum);
            sum += r1 - r0;
        }
        let results = stream::iter(batches.clone().into_iter().zip(rows_before))
            .then(|((r0, r1), rows_before)| {
                let me = Arc::clone(self);
                async move {
                    let rate = me.rate_limit_bytes_per_sec.load(Ordering::SeqCst);
                    if rate > 0 {
                        let due = Duration::from_secs_f64((rows_before * c) as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    let locks = me.lock_rows_owned(me.rebuild_lock_rows(r0, r1)).await;
                    (r0, r1, locks)
                }
            })
            .map(|(r0, r1, locks)| async move {
                (r0, r1, self.rebuild_prepare(slot, dev, r0, r1, locks).await)
            })
            .buffered(REBUILD_READ_AHEAD)
            .map(|(r0, r1, read)| async move {
                (r0, r1, self.rebuild_finish(slot, dev, r0, r1, read).await)
            })
            .buffered(REBUILD_WRITE_DEPTH);
        let mut results = Box::pin(results);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                drop(results);
                let next = batches.get(done_batches(&batches, done_rows)).map(|b| b.0);
                if let Some(r0) = next {
                    self.record_checkpoint(slot, dev, kind, r0).await;
                }
                set_progress(done_rows, false, Some("stopped".into()));
                return false;
            }
            let Some((r0, r1, outcome)) = results.next().await else {
                break;
            };
            match outcome {
                BatchOutcome::Done => {}
                BatchOutcome::TargetGone => {
                    set_progress(done_rows, false, Some("target or array failed".into()));
                    return true;
                }
                BatchOutcome::Error(e) => {
                    set_progress(done_rows, false, Some(e));
                    return false;
                }
            }
            done_rows += r1 - r0;
            set_progress(done_rows, true, None);
            if kind == ResyncKind::Full
                && last_cp.elapsed() >= Duration::from_millis(CHECKPOINT_INTERVAL_MS)
            {
                self.record_checkpoint(slot, dev, kind, r1).await;
                last_cp = Instant::now();
            }
        }
        if !self.resync_done(slot, dev) {
            return true;
        }
        if kind == ResyncKind::Bitmap {
            self.bitmap_resync_regions
                .fetch_add(regions, Ordering::SeqCst);
        }
        set_progress(done_rows, false, None);
        tracing::info!(array = %self.name, slot, ?kind, "resync complete");
        self.write_superblocks().await;
        self.ppl_whole_again().await;
        true
    }

    /// What `slot` resyncs: kind, first row, device and its name; `None` when nothing.
    fn resync_target(&self, slot: usize) -> Option<(ResyncKind, u64, Uuid, String)> {
        let m = lock(&self.meta);
        let s = &m.slots[slot];
        let (kind, from) = s.resync?;
        let name = s
            .member
            .as_ref()
            .map(|d| d.name().to_string())
            .unwrap_or_default();
        Some((kind, from, s.dev_uuid, name))
    }

    /// `ranges` cut into batches: at most [`REBUILD_BATCH_BYTES`] of member bytes, few enough
    /// rows that batches in flight never share a row-lock shard, and under a rate limit about a
    /// tenth of a second of the allowed rate.
    fn resync_batches(&self, ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
        let c = self.geo.chunk_bytes;
        let in_flight = (REBUILD_READ_AHEAD + REBUILD_WRITE_DEPTH) as u64;
        let mut batch_rows = (REBUILD_BATCH_BYTES / c).clamp(1, ROW_LOCK_SHARDS / in_flight);
        let rate = self.rate_limit_bytes_per_sec.load(Ordering::SeqCst);
        if rate > 0 {
            batch_rows = batch_rows.min((rate / 10 / c).max(1));
        }
        let mut batches = Vec::new();
        for (a, b) in ranges {
            let mut r0 = a;
            while r0 < b {
                let r1 = (r0 + batch_rows).min(b);
                batches.push((r0, r1));
                r0 = r1;
            }
        }
        batches
    }

    /// Makes the resynced device `dev` of `slot` active; false when the slot holds another
    /// device by now or no longer resyncs.
    fn resync_done(&self, slot: usize, dev: Uuid) -> bool {
        let mut m = lock(&self.meta);
        let s = &mut m.slots[slot];
        if s.dev_uuid != dev || s.resync.is_none() {
            return false;
        }
        s.state = MemberState::Active;
        s.resync = None;
        s.left_events = 0;
        m.rebuild = None;
        m.events += 1;
        true
    }

    /// Records that rows before `row` of device `dev` in `slot` are rebuilt. Nothing when the
    /// slot holds another device by now: a replacement must not inherit this progress.
    pub(super) async fn record_checkpoint(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        kind: ResyncKind,
        row: u64,
    ) {
        if kind != ResyncKind::Full {
            return;
        }
        {
            let mut m = lock(&self.meta);
            if m.slots[slot].dev_uuid != dev || m.slots[slot].resync.is_none() {
                return;
            }
            m.rebuild = Some(RebuildCheckpoint {
                slot: slot as u32,
                rows_done: row,
            });
            if let Some(r) = m.slots[slot].resync.as_mut() {
                r.1 = row;
            }
        }
        self.write_superblocks().await;
    }
}
