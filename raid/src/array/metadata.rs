//! Metadata persistence: the superblock written to every member (rewritten whenever membership,
//! events or the applied sequence change) and the write-intent bitmap blocks (set before a write,
//! cleared lazily after a flush). Both are written to every attached device; a device that fails
//! such a write is failed like any other.

use super::*;

impl Inner {
    pub(super) fn superblock_for(&self, m: &Meta, role: Role, dev_uuid: Uuid) -> Superblock {
        let bgeo = lock(&self.bitmap).geometry();
        Superblock {
            array_uuid: self.uuid,
            name: self.name.clone(),
            level: self.geo.level,
            chunk_bytes: self.geo.chunk_bytes,
            member_count: self.geo.members as u32,
            role,
            dev_uuid,
            events: m.events,
            applied_seq: m.applied_seq,
            data_offset: self.data_offset,
            member_data_bytes: self.geo.member_data_bytes(),
            array_bytes: self.geo.size_bytes(),
            clean: m.clean,
            rebuild: m.rebuild,
            bitmap: bgeo,
            members: m
                .slots
                .iter()
                .map(|s| MemberEntry {
                    dev_uuid: s.dev_uuid,
                    state: match (s.state, s.resync) {
                        // A bitmap resync is recorded as the absence it repairs, so a restart
                        // resyncs from the bitmap again.
                        (MemberState::Rebuilding, Some((ResyncKind::Bitmap, _))) => {
                            MemberState::Faulty
                        }
                        (st, _) => st,
                    },
                    left_events: s.left_events,
                })
                .collect(),
            journal: m.journal,
        }
    }

    /// Writes (and syncs) the superblock on every attached device; a device that fails is
    /// marked faulty and the round is repeated without it.
    pub(super) async fn write_superblocks(self: &Arc<Self>) {
        let _g = self.sb_lock.lock().await;
        for _round in 0..=self.geo.members + 1 {
            let targets: Vec<(Option<usize>, Arc<dyn Member>, Bytes)> = {
                let m = lock(&self.meta);
                let mut t = Vec::new();
                for (i, s) in m.slots.iter().enumerate() {
                    if let (Some(d), MemberState::Active | MemberState::Rebuilding) =
                        (&s.member, s.state)
                    {
                        let sb = self.superblock_for(&m, Role::Slot(i as u32), s.dev_uuid);
                        t.push((Some(i), d.clone(), Bytes::from(sb.encode())));
                    }
                }
                for sp in &m.spares {
                    let sb = self.superblock_for(&m, Role::Spare, sp.dev_uuid);
                    t.push((None, sp.member.clone(), Bytes::from(sb.encode())));
                }
                // A hot replace's copy target is a spare on disk until the copy completes.
                if let Some(r) = &m.replacement {
                    let sb = self.superblock_for(&m, Role::Spare, r.dev_uuid);
                    t.push((None, r.member.clone(), Bytes::from(sb.encode())));
                }
                t
            };
            let results = join_all(targets.iter().map(|(_, d, b)| async move {
                d.write_at(0, b.clone()).await?;
                d.sync().await
            }))
            .await;
            let mut any_failed = false;
            for ((slot, d, _), r) in targets.iter().zip(results) {
                if let Err(e) = r {
                    tracing::error!(array = %self.name, member = %d.name(), error = %e, "superblock write failed");
                    any_failed = true;
                    match slot {
                        Some(i) => {
                            let mut m = lock(&self.meta);
                            self.mark_faulty_locked(&mut m, *i, true);
                        }
                        None => {
                            let mut m = lock(&self.meta);
                            m.spares.retain(|s| !Arc::ptr_eq(&s.member, d));
                            if m.replacement
                                .as_ref()
                                .is_some_and(|r| Arc::ptr_eq(&r.member, d))
                            {
                                tracing::warn!(array = %self.name, member = %d.name(), "hot replace abandoned: its target failed");
                                m.replacement = None;
                            }
                        }
                    }
                }
            }
            if !any_failed {
                break;
            }
        }
        self.kick_rebuild();
    }

    /// Like `write_superblocks` but any failure is an error (used at create).
    pub(super) async fn write_superblocks_strict(self: &Arc<Self>) -> Result<()> {
        let targets: Vec<(Arc<dyn Member>, Bytes)> = {
            let m = lock(&self.meta);
            let mut t = Vec::new();
            for (i, s) in m.slots.iter().enumerate() {
                if let Some(d) = &s.member {
                    t.push((
                        d.clone(),
                        Bytes::from(
                            self.superblock_for(&m, Role::Slot(i as u32), s.dev_uuid)
                                .encode(),
                        ),
                    ));
                }
            }
            for sp in &m.spares {
                t.push((
                    sp.member.clone(),
                    Bytes::from(self.superblock_for(&m, Role::Spare, sp.dev_uuid).encode()),
                ));
            }
            if let Some(r) = &m.replacement {
                t.push((
                    r.member.clone(),
                    Bytes::from(self.superblock_for(&m, Role::Spare, r.dev_uuid).encode()),
                ));
            }
            t
        };
        for (d, b) in targets {
            let r = async {
                d.write_at(0, b).await?;
                d.sync().await
            }
            .await;
            r.map_err(|source| ArrayError::MemberIo {
                array: self.name.clone(),
                member: d.name().to_string(),
                op: "superblock write",
                source,
            })?;
        }
        Ok(())
    }

    /// Registers a write to member offsets `[start, end)` in the bitmap (persisting newly set
    /// bits first). On error the registration is undone, so callers that bail out with `?` do
    /// not leave the regions counted as busy.
    pub(super) async fn bitmap_begin(self: &Arc<Self>, start: u64, end: u64) -> Result<()> {
        // Set-before-write: the bits must be durable (written *and* synced, as md writes its
        // bitmap with PREFLUSH|FUA) before the data write is issued, or a power cut can leave new
        // data with old parity in a region no bit marks. Writers queue on `bitmap_io`; the first
        // one writes and syncs every pending block, and those it covered return at once.
        let need = self.with_bitmap(|b| {
            let rs = b.regions(start, end);
            b.begin_write_durable(rs)
        });
        if need > 0 {
            let _g = self.bitmap_io.lock().await;
            let (blocks, gen) = self.with_bitmap(|b| {
                if b.is_durable(need) {
                    (Vec::new(), 0)
                } else {
                    b.take_pending()
                }
            });
            if !blocks.is_empty() {
                self.persist_bitmap(&blocks).await;
                self.sync_writable("bitmap sync").await;
            }
            if gen > 0 {
                self.with_bitmap(|b| b.mark_durable(gen));
            }
        }
        let res = self.check_failed();
        if res.is_err() {
            self.with_bitmap(|b| {
                let rs = b.regions(start, end);
                b.end_write(rs)
            });
        }
        res
    }

    /// Syncs every writable member; a member whose sync fails is marked faulty (`op` names the
    /// operation in that message).
    pub(super) async fn sync_writable(self: &Arc<Self>, op: &'static str) {
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
                self.member_failed(m, op, Some(&e), true).await;
            }
        }
    }

    /// Writes bitmap blocks to every writable member. Caller holds `bitmap_io`.
    pub(super) async fn persist_bitmap(self: &Arc<Self>, blocks: &[u64]) {
        let base = lock(&self.bitmap).geometry().offset;
        let writes: Vec<(u64, Bytes)> = self.with_bitmap(|b| {
            blocks
                .iter()
                .map(|&blk| {
                    (
                        base + blk * BITMAP_BLOCK_BYTES,
                        Bytes::from(b.block_bytes(blk)),
                    )
                })
                .collect()
        });
        let view = self.view();
        let results = join_all(
            (0..self.geo.members)
                .filter(|m| view.writable[*m])
                .filter_map(|m| {
                    let d = view.members[m].clone()?;
                    let writes = writes.clone();
                    Some(async move {
                        for (off, b) in writes {
                            if let Err(e) = d.write_at(off, b).await {
                                return (m, Err(e));
                            }
                        }
                        (m, Ok(()))
                    })
                }),
        )
        .await;
        for (m, r) in results {
            if let Err(e) = r {
                self.member_failed(m, "bitmap write", Some(&e), true).await;
            }
        }
    }
}
