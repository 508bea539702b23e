//! Scrub: compare every row's parity or mirror copies with its data and, in repair mode, rewrite
//! them from the data.

use super::*;

/// Scrub mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScrubMode {
    /// Count mismatching stripes only.
    Check,
    /// Count and rewrite parity / mirror copies from the data.
    Repair,
}

/// Outcome of a scrub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    pub rows_checked: u64,
    pub mismatches: u64,
    pub repaired: u64,
}

impl Inner {
    pub(super) async fn scrub(self: &Arc<Self>, mode: ScrubMode) -> Result<ScrubReport> {
        self.check_failed()?;
        if self.geo.level == Level::Raid0 {
            return Ok(ScrubReport {
                rows_checked: self.geo.rows,
                mismatches: 0,
                repaired: 0,
            });
        }
        if self.is_degraded() {
            return Err(
                self.invalid("scrub needs every member active; wait for the rebuild".into())
            );
        }
        if self.scrub_running.swap(true, Ordering::SeqCst) {
            return Err(self.invalid("a scrub is already running".into()));
        }
        self.mismatches.store(0, Ordering::SeqCst);
        self.scrub_rows_done.store(0, Ordering::SeqCst);
        let batch = (REBUILD_BATCH_BYTES / self.geo.chunk_bytes).clamp(1, ROW_LOCK_SHARDS);
        let mut report = ScrubReport {
            rows_checked: 0,
            mismatches: 0,
            repaired: 0,
        };
        let mut r0 = 0;
        let mut result = Ok(());
        while r0 < self.geo.rows {
            let r1 = (r0 + batch).min(self.geo.rows);
            match self.scrub_rows(r0, r1, mode).await {
                Ok((mm, rep)) => {
                    report.mismatches += mm;
                    report.repaired += rep;
                    report.rows_checked += r1 - r0;
                    self.scrub_rows_done
                        .store(report.rows_checked, Ordering::SeqCst);
                    self.mismatches.fetch_add(mm, Ordering::SeqCst);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            r0 = r1;
        }
        self.scrub_running.store(false, Ordering::SeqCst);
        result.map(|_| report)
    }

    /// Checks rows `[r0, r1)`; returns (mismatching rows, rows rewritten).
    pub(super) async fn scrub_rows(
        self: &Arc<Self>,
        r0: u64,
        r1: u64,
        mode: ScrubMode,
    ) -> Result<(u64, u64)> {
        let geo = self.geo;
        let c = geo.chunk_bytes as usize;
        let _g = self
            .lock_rows(r0.saturating_sub(1)..(r1 + 1).min(geo.rows))
            .await;
        let view = self.view();
        if view.readable.iter().any(|r| !r) {
            return Err(self.invalid("scrub needs every member active".into()));
        }
        // RAID 10 with an odd member count: a chunk's second copy may sit in the next row, so
        // read one row more than is checked.
        let read_end = if geo.level == Level::Raid10 {
            (r1 + 1).min(geo.rows)
        } else {
            r1
        };
        let len = (read_end - r0) as usize * c;
        let reads = join_all((0..geo.members).map(|m| {
            let d = view.members[m].clone();
            async move {
                match d {
                    Some(d) => {
                        self.read_member(m, &d, self.member_off(r0, 0), len as u64)
                            .await
                    }
                    None => None,
                }
            }
        }))
        .await;
        let mut bufs = Vec::with_capacity(geo.members);
        for r in reads {
            match r {
                Some(b) => bufs.push(b),
                None => return Err(self.invalid("a member failed during scrub".into())),
            }
        }
        let mut fixes: Vec<(usize, u64, Bytes)> = Vec::new();
        let mut mismatches = 0;
        let mut repaired_rows = std::collections::BTreeSet::new();
        for r in r0..r1 {
            let at = (r - r0) as usize * c;
            let chunk = |m: usize| &bufs[m][at..at + c];
            let mut bad = false;
            match geo.level {
                Level::Raid1 => {
                    for m in 1..geo.members {
                        if chunk(m) != chunk(0) {
                            bad = true;
                            fixes.push((m, r, Bytes::copy_from_slice(chunk(0))));
                        }
                    }
                }
                Level::Raid10 => {
                    for m in 0..geo.members {
                        let Some(k) = geo.raid10_chunk_at(m, r) else {
                            continue;
                        };
                        let places = geo.places(k);
                        if places[0].member != m || places[0].row != r {
                            continue;
                        }
                        let p = places[1];
                        if p.row >= read_end {
                            continue; // beyond the array's last row: no second copy
                        }
                        let other = &bufs[p.member]
                            [(p.row - r0) as usize * c..(p.row - r0) as usize * c + c];
                        if other != chunk(m) {
                            bad = true;
                            fixes.push((p.member, p.row, Bytes::copy_from_slice(chunk(m))));
                        }
                    }
                }
                Level::Raid5 | Level::Raid6 => {
                    let data: Vec<&[u8]> = (0..geo.data_per_row())
                        .map(|i| chunk(geo.data_member(r, i)))
                        .collect();
                    let mut p = vec![0u8; c];
                    let mut q = vec![0u8; c];
                    let raid6 = geo.level == Level::Raid6;
                    parity::gen_pq(&data, &mut p, raid6.then_some(&mut q[..]));
                    if chunk(geo.p_member(r)) != p.as_slice() {
                        bad = true;
                        fixes.push((geo.p_member(r), r, Bytes::from(p)));
                    }
                    if raid6 && chunk(geo.q_member(r)) != q.as_slice() {
                        bad = true;
                        fixes.push((geo.q_member(r), r, Bytes::from(q)));
                    }
                }
                Level::Raid0 => {}
            }
            if bad {
                mismatches += 1;
                repaired_rows.insert(r);
            }
        }
        if mode == ScrubMode::Repair && !fixes.is_empty() {
            // A hot replace's target gets the slot's fixes too (rows it has copied stay copied).
            if let Some((slot, dev, d)) = self.replacement() {
                for (m, r, b) in &fixes {
                    if *m == slot {
                        if let Err(e) = d.write_at(self.member_off(*r, 0), b.clone()).await {
                            self.replacement_failed(slot, dev, "scrub repair write", &e)
                                .await;
                            break;
                        }
                    }
                }
            }
            let results = join_all(fixes.into_iter().map(|(m, r, b)| {
                let d = view.members[m].clone();
                async move {
                    match d {
                        Some(d) => (m, d.write_at(self.member_off(r, 0), b).await),
                        None => (m, Ok(())),
                    }
                }
            }))
            .await;
            for (m, r) in results {
                if let Err(e) = r {
                    self.member_failed(m, "scrub repair write", Some(&e), true)
                        .await;
                }
            }
            return Ok((mismatches, repaired_rows.len() as u64));
        }
        Ok((mismatches, 0))
    }
}
