//! Hot replace (md's `--replace`): the device of an active slot is copied onto a new device
//! while it stays active, so the array keeps its redundancy during the copy.
//!
//! The new device is a [`Replacement`] held in memory only; on disk it is a spare until the copy
//! completes (no format change). Every foreground write to the slot also goes to it, and the
//! copy runs batch by batch under the rows' locks, so rows already copied stay copied. At the
//! end the slot takes the new device (one superblock update, events bumped) and the old device
//! leaves the array, as the old replace left it.
//!
//! Failures: the old device failing mid-copy turns the copy into an ordinary rebuild of the slot
//! from the rows already copied (`mark_faulty_locked`); the new device failing abandons the
//! replace and leaves the array as it was. A restart during the copy finds the old device in its
//! slot and the new one as a spare; the operator runs the replace again.

use super::*;

impl Inner {
    /// The hot replace in progress: slot, device id and device of its copy target.
    pub(super) fn replacement(&self) -> Option<(usize, Uuid, Arc<dyn Member>)> {
        lock(&self.meta)
            .replacement
            .as_ref()
            .map(|r| (r.slot, r.dev_uuid, r.member.clone()))
    }

    /// Starts a hot replace of active `slot` by the admitted device `new`.
    pub(super) async fn start_hot_replace(
        self: &Arc<Self>,
        slot: usize,
        new: Arc<dyn Member>,
    ) -> Result<MemberStatus> {
        {
            let mut m = lock(&self.meta);
            if let Some(r) = &m.replacement {
                return Err(self.invalid(format!(
                    "slot {} is already being replaced by {}; wait for that copy to finish",
                    r.slot,
                    r.member.name()
                )));
            }
            m.replacement = Some(Replacement {
                slot,
                member: new.clone(),
                dev_uuid: Uuid::new_v4(),
                rows_done: 0,
            });
            m.events += 1;
        }
        tracing::info!(array = %self.name, slot, member = %new.name(), "hot replace starts");
        self.write_superblocks().await;
        self.kick_rebuild();
        Ok(MemberStatus {
            slot: Some(slot),
            name: Some(new.name().to_string()),
            state: MemberState::Rebuilding,
        })
    }

    /// The copy target of `slot` (device `dev`) failed: the replace is abandoned and the array
    /// stays as it was, with the old device.
    pub(super) async fn replacement_failed(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        op: &str,
        err: &io::Error,
    ) {
        if self.drop_replacement(slot, dev) {
            tracing::error!(array = %self.name, slot, op, error = %err,
                "hot replace target failed; replace abandoned, the old member stays");
            self.write_superblocks().await;
        }
    }

    /// Drops the replace of `slot` onto `dev` if it is still registered.
    async fn abandon_replace(self: &Arc<Self>, slot: usize, dev: Uuid) {
        if self.drop_replacement(slot, dev) {
            tracing::warn!(array = %self.name, slot, "hot replace abandoned");
            self.write_superblocks().await;
        }
    }

    /// Forgets the replace of `slot` onto `dev` if it is still the registered one (a newer
    /// replace or a finished one is left alone); true when it was dropped.
    fn drop_replacement(&self, slot: usize, dev: Uuid) -> bool {
        let mut m = lock(&self.meta);
        let ours = m
            .replacement
            .as_ref()
            .is_some_and(|r| r.slot == slot && r.dev_uuid == dev);
        if ours {
            m.replacement = None;
            m.events += 1;
        }
        ours
    }

    /// Whether `slot` is still being hot-replaced onto device `dev` in a working array.
    fn still_replacing(&self, slot: usize, dev: Uuid) -> bool {
        let m = lock(&self.meta);
        m.failed.is_none()
            && m.slots[slot].state == MemberState::Active
            && m.replacement
                .as_ref()
                .is_some_and(|r| r.slot == slot && r.dev_uuid == dev)
    }

    /// Runs the copy of a hot replace of `slot`; returns false when the task should stop.
    pub(super) async fn run_hot_copy(self: &Arc<Self>, slot: usize) -> bool {
        let Some((rslot, dev, target)) = self.replacement() else {
            return true;
        };
        if rslot != slot {
            return true;
        }
        let c = self.geo.chunk_bytes;
        let total_rows = self.geo.rows;
        let started = Instant::now();
        let batch_rows = (REBUILD_BATCH_BYTES / c).max(1);
        let name = target.name().to_string();
        let set_progress = |done_rows: u64, running: bool, error: Option<String>| {
            let rate = (done_rows * c) as f64 / started.elapsed().as_secs_f64().max(1e-6);
            *lock(&self.progress) = Some(RebuildStatus {
                slot,
                member: name.clone(),
                kind: ResyncKind::Full,
                running,
                done_bytes: done_rows * c,
                total_bytes: total_rows * c,
                percent: if total_rows == 0 {
                    100.0
                } else {
                    done_rows as f64 * 100.0 / total_rows as f64
                },
                rate_bytes_per_sec: rate,
                eta_secs: (rate > 0.0)
                    .then(|| ((total_rows - done_rows) * c) as f64 / rate.max(1e-6)),
                error,
            });
        };
        set_progress(0, true, None);
        tracing::info!(array = %self.name, slot, member = %name, rows = total_rows, "hot replace copy starts");
        let mut r0 = 0u64;
        while r0 < total_rows {
            if self.stop.load(Ordering::SeqCst) {
                set_progress(r0, false, Some("stopped".into()));
                return false;
            }
            let rate = self.rate_limit_bytes_per_sec.load(Ordering::SeqCst);
            let rows = if rate > 0 {
                batch_rows.min((rate / 10 / c).max(1))
            } else {
                batch_rows
            };
            let r1 = (r0 + rows).min(total_rows);
            if rate > 0 {
                let due = Duration::from_secs_f64((r0 * c) as f64 / rate as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    tokio::time::sleep(wait).await;
                }
            }
            if !self.copy_batch(slot, dev, &target, r0, r1).await {
                // The old device failed (the copy goes on as a rebuild) or the target did. Any
                // other end (the slot left its active state some other way) abandons the replace,
                // so the task does not come back to it.
                self.abandon_replace(slot, dev).await;
                set_progress(r0, false, Some("hot replace ended early".into()));
                return true;
            }
            r0 = r1;
            set_progress(r0, true, None);
        }
        if self.finish_hot_replace(slot, dev, &target).await {
            set_progress(total_rows, false, None);
            tracing::info!(array = %self.name, slot, member = %name, "hot replace complete");
        }
        true
    }

    /// Copies rows `[r0, r1)` of `slot` from its device onto the target under the rows' locks;
    /// false when the replace is over (old device or target failed, or it was abandoned).
    async fn copy_batch(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        target: &Arc<dyn Member>,
        r0: u64,
        r1: u64,
    ) -> bool {
        let _rows = self.lock_rows_owned(self.rebuild_lock_rows(r0, r1)).await;
        if !self.still_replacing(slot, dev) {
            return false;
        }
        let Some(old) = lock(&self.meta).slots[slot].member.clone() else {
            return false;
        };
        let off = self.member_off(r0, 0);
        // A failed read fails the old device, which hands the slot to the target as a rebuild.
        let Some(bytes) = self
            .read_member(slot, &old, off, (r1 - r0) * self.geo.chunk_bytes)
            .await
        else {
            return false;
        };
        if let Err(e) = target.write_at(off, bytes).await {
            self.replacement_failed(slot, dev, "copy write", &e).await;
            return false;
        }
        let mut m = lock(&self.meta);
        match m.replacement.as_mut() {
            Some(r) if r.dev_uuid == dev => {
                r.rows_done = r1;
                true
            }
            _ => false,
        }
    }

    /// The copy is complete: writes the bitmap to the target, then the slot takes it and the
    /// old device leaves, in one superblock update. False when the replace ended meanwhile.
    async fn finish_hot_replace(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        target: &Arc<dyn Member>,
    ) -> bool {
        // Holding `bitmap_io` keeps bitmap updates out until the target is a member.
        let _g = self.bitmap_io.lock().await;
        let (len, bytes) = self.with_bitmap(|b| {
            let n = b.stored_len() / BITMAP_BLOCK_BYTES;
            let bytes: Vec<u8> = (0..n).flat_map(|blk| b.block_bytes(blk)).collect();
            (n, bytes)
        });
        let off = lock(&self.bitmap).geometry().offset;
        if len > 0 {
            if let Err(e) = target.write_at(off, Bytes::from(bytes)).await {
                self.replacement_failed(slot, dev, "bitmap write", &e).await;
                return false;
            }
        }
        let old = {
            let mut m = lock(&self.meta);
            if !(m.failed.is_none()
                && m.slots[slot].state == MemberState::Active
                && m.replacement
                    .as_ref()
                    .is_some_and(|r| r.slot == slot && r.dev_uuid == dev))
            {
                return false;
            }
            m.replacement = None;
            let s = &mut m.slots[slot];
            let old = s.member.replace(target.clone());
            s.dev_uuid = dev;
            s.left_events = 0;
            s.resync = None;
            m.events += 1;
            old
        };
        if let Some(old) = old {
            tracing::info!(array = %self.name, slot, old = %old.name(), new = %target.name(), "slot taken by the replacement; old member released");
        }
        self.write_superblocks().await;
        true
    }
}
