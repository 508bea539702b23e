//! Bringing an array up: `Array::create` (fresh superblocks, empty bitmap, blank data areas) and
//! `Array::assemble` (slots chosen by `crate::assemble` from the superblocks found, then the
//! unclean-shutdown resync and the background rebuild of stale members).

use super::*;

impl Array {
    /// Creates a new array over `members` (in slot order) with `spares`, writing fresh
    /// superblocks and an empty bitmap. The data areas are discarded (punched, or zero-filled by
    /// members that cannot punch) so the array reads as zeroes and parity is consistent from the
    /// start; `CreateOptions::assume_clean` skips that for images known to be blank.
    pub async fn create(
        name: &str,
        level: Level,
        chunk_bytes: u64,
        members: Vec<Arc<dyn Member>>,
        spares: Vec<Arc<dyn Member>>,
    ) -> Result<Array> {
        Self::create_with(
            name,
            level,
            chunk_bytes,
            members,
            spares,
            CreateOptions::default(),
        )
        .await
    }

    /// [`Array::create`] with options.
    pub async fn create_with(
        name: &str,
        level: Level,
        chunk_bytes: u64,
        members: Vec<Arc<dyn Member>>,
        spares: Vec<Arc<dyn Member>>,
        opts: CreateOptions,
    ) -> Result<Array> {
        let invalid = |what: String| ArrayError::Invalid {
            array: name.to_string(),
            what,
        };
        if name.is_empty() || name.len() > NAME_BYTES {
            return Err(invalid(format!("name must be 1..={NAME_BYTES} bytes")));
        }
        let all: Vec<&Arc<dyn Member>> = members.iter().chain(spares.iter()).collect();
        for (i, m) in all.iter().enumerate() {
            for o in &all[..i] {
                if m.name() == o.name() || Arc::ptr_eq(m, o) {
                    return Err(invalid(format!("member {} is listed twice", m.name())));
                }
            }
        }
        let min_size = all.iter().map(|m| m.size()).min().unwrap_or(0);
        let usable = opts.member_bytes.unwrap_or(u64::MAX).min(min_size);
        let need = DATA_OFFSET_BYTES + chunk_bytes.max(4096);
        for m in &all {
            if m.size() < need {
                return Err(ArrayError::MemberTooSmall {
                    array: name.to_string(),
                    member: m.name().to_string(),
                    size_bytes: m.size(),
                    need_bytes: need,
                });
            }
        }
        let geo = Geometry::new(
            level,
            members.len(),
            chunk_bytes,
            usable.saturating_sub(DATA_OFFSET_BYTES),
        )
        .map_err(|source| ArrayError::Layout {
            array: name.to_string(),
            source,
        })?;
        let bgeo = bitmap::geometry(
            geo.member_data_bytes(),
            chunk_bytes,
            opts.bitmap_region_bytes,
        );
        let slots = members
            .into_iter()
            .map(|m| Slot {
                member: Some(m),
                dev_uuid: Uuid::new_v4(),
                state: MemberState::Active,
                left_events: 0,
                resync: None,
            })
            .collect();
        let spares = spares
            .into_iter()
            .map(|m| Spare {
                member: m,
                dev_uuid: Uuid::new_v4(),
            })
            .collect();
        let meta = Meta {
            slots,
            spares,
            events: 1,
            applied_seq: 0,
            clean: false,
            journal: JournalMark::default(),
            rebuild: None,
            failed: None,
            replacement: None,
        };
        let inner = Arc::new(Inner::new(
            name.to_string(),
            Uuid::new_v4(),
            geo,
            DATA_OFFSET_BYTES,
            bgeo,
            meta,
            Bitmap::new(bgeo),
        ));
        // Empty bitmap on every member, blank data areas, then the superblocks.
        let bm_len = inner.with_bitmap(|b| b.stored_len());
        let zeros = Bytes::from(vec![0u8; bm_len as usize]);
        let targets = inner.all_devices();
        if !opts.assume_clean {
            let area = geo.member_data_bytes();
            let results = join_all(
                targets
                    .iter()
                    .map(|(m, _)| m.discard(DATA_OFFSET_BYTES, area)),
            )
            .await;
            for ((m, _), r) in targets.iter().zip(results) {
                r.map_err(|source| ArrayError::MemberIo {
                    array: name.to_string(),
                    member: m.name().to_string(),
                    op: "discard of the data area",
                    source,
                })?;
            }
        }
        for (m, _) in &targets {
            m.write_at(bgeo.offset, zeros.clone())
                .await
                .map_err(|source| ArrayError::MemberIo {
                    array: name.to_string(),
                    member: m.name().to_string(),
                    op: "bitmap write",
                    source,
                })?;
        }
        inner.write_superblocks_strict().await?;
        Ok(Array { inner })
    }

    /// Assembles an array from the superblocks on `members` (any order; spares included).
    /// Starts degraded when members are missing or stale, resyncs dirty bitmap regions after an
    /// unclean shutdown, and starts rebuilds of stale members in the background. Refuses an
    /// unclean, degraded parity array with dirty regions (see [`Array::assemble_with`]).
    pub async fn assemble(members: Vec<Arc<dyn Member>>) -> Result<Array> {
        Self::assemble_with(members, AssembleOptions::default()).await
    }

    /// [`Array::assemble`] with options.
    pub async fn assemble_with(
        members: Vec<Arc<dyn Member>>,
        opts: AssembleOptions,
    ) -> Result<Array> {
        let candidates = read_candidates(&members).await?;
        let plan = assemble::plan(&candidates)?;
        let sb = &plan.superblock;
        let geo = Geometry::new(
            sb.level,
            sb.member_count as usize,
            sb.chunk_bytes,
            sb.member_data_bytes,
        )
        .map_err(|source| ArrayError::Layout {
            array: sb.name.clone(),
            source,
        })?;
        let (slots, changed) = plan_slots(&plan, &members, geo);
        for (i, why) in &plan.ignored {
            tracing::warn!(array = %sb.name, member = %members[*i].name(), "{why}; not used");
        }
        let applied_seq = candidates
            .iter()
            .filter_map(|c| c.superblock.as_ref().ok())
            .filter(|s| s.events == sb.events)
            .map(|s| s.applied_seq)
            .max()
            .unwrap_or(sb.applied_seq);
        let spares = plan
            .spares
            .iter()
            .filter_map(|&i| {
                let dev = candidates[i].superblock.as_ref().ok()?.dev_uuid;
                Some(Spare {
                    member: members[i].clone(),
                    dev_uuid: dev,
                })
            })
            .collect();
        let bm = read_bitmap(&sb.name, sb.bitmap, &slots).await?;
        let meta = Meta {
            slots,
            spares,
            events: sb.events + u64::from(changed),
            applied_seq,
            clean: false,
            journal: sb.journal,
            rebuild: sb.rebuild,
            failed: None,
            replacement: None,
        };
        let inner = Arc::new(Inner::new(
            sb.name.clone(),
            sb.array_uuid,
            geo,
            sb.data_offset,
            sb.bitmap,
            meta,
            bm,
        ));
        let dirty_degraded = plan.unclean
            && geo.level.parity_chunks() > 0
            && inner.has_absent_slot()
            && inner.with_bitmap(|b| !b.dirty_regions().is_empty());
        // Partial parity recovers one absent block per column: RAID 5, or RAID 6 missing one
        // member. A journaled array it can protect waits for the journal's replay instead.
        // Partial parity is logged only while the array is degraded: a member the superblocks
        // record as active (in sync) when the array stopped, and absent now, was written without
        // it, so the log cannot repair the rows it was part of (the write hole of an unclean stop
        // and a lost member together).
        let absent = inner.absent_slots();
        let absent_was_in_sync = plan
            .slots
            .iter()
            .any(|sp| matches!(sp.start, SlotStart::Absent) && sp.recorded == MemberState::Active);
        let ppl_can_protect = absent <= 1 && geo.level.parity_chunks() > 0 && !absent_was_in_sync;
        let wait_for_ppl = dirty_degraded && opts.journaled && ppl_can_protect;
        if dirty_degraded && !wait_for_ppl && !opts.start_dirty_degraded {
            // Before anything is written: the operator may still bring the member back.
            return Err(ArrayError::DirtyDegraded {
                array: sb.name.clone(),
                regions: inner.with_bitmap(|b| b.dirty_regions().len()),
            });
        }
        inner
            .start_dirty_degraded
            .store(opts.start_dirty_degraded, Ordering::SeqCst);
        inner.ppl_pending.store(wait_for_ppl, Ordering::SeqCst);
        inner.write_superblocks().await;
        inner.check_failed()?;
        if plan.unclean && geo.level != Level::Raid0 {
            inner.resync_after_unclean_shutdown(dirty_degraded).await?;
        }
        inner.kick_rebuild();
        Ok(Array { inner })
    }
}

/// Reads the superblock of every member (an unreadable member fails the assembly; a member
/// without a valid superblock is a candidate whose decode error the plan reports).
async fn read_candidates(members: &[Arc<dyn Member>]) -> Result<Vec<Candidate>> {
    let reads = join_all(members.iter().map(|m| m.read_at(0, SUPERBLOCK_BYTES))).await;
    let mut candidates = Vec::with_capacity(members.len());
    for (m, r) in members.iter().zip(reads) {
        let bytes = r.map_err(|source| ArrayError::MemberIo {
            array: "(assembling)".into(),
            member: m.name().to_string(),
            op: "superblock read",
            source,
        })?;
        candidates.push(Candidate {
            name: m.name().to_string(),
            size_bytes: m.size(),
            superblock: Superblock::decode(&bytes),
        });
    }
    Ok(candidates)
}

/// The slots as the assembly plan starts them, and whether any recorded state changed (a member
/// recorded active or rebuilding that is absent now, or a rebuild that starts afresh), which
/// bumps the event counter.
fn plan_slots(
    plan: &assemble::Plan,
    members: &[Arc<dyn Member>],
    geo: Geometry,
) -> (Vec<Slot>, bool) {
    let events = plan.superblock.events;
    let mut changed = false;
    let mut slots = Vec::with_capacity(plan.slots.len());
    for (i, sp) in plan.slots.iter().enumerate() {
        let member = sp.member.map(|c| members[c].clone());
        let slot = match sp.start {
            SlotStart::Active => Slot {
                member,
                dev_uuid: sp.dev_uuid,
                state: MemberState::Active,
                left_events: 0,
                resync: None,
            },
            SlotStart::Absent => {
                let (state, left) = match sp.recorded {
                    MemberState::Active | MemberState::Rebuilding => {
                        changed = true;
                        (MemberState::Missing, events)
                    }
                    s => (s, sp.left_events),
                };
                Slot {
                    member: None,
                    dev_uuid: sp.dev_uuid,
                    state,
                    left_events: left,
                    resync: None,
                }
            }
            SlotStart::BitmapResync => Slot {
                member,
                dev_uuid: sp.dev_uuid,
                state: MemberState::Rebuilding,
                left_events: sp.left_events.max(1),
                resync: Some((ResyncKind::Bitmap, 0)),
            },
            SlotStart::FullRebuild { from_row } => {
                changed |= sp.recorded != MemberState::Rebuilding;
                Slot {
                    member,
                    dev_uuid: sp.dev_uuid,
                    state: MemberState::Rebuilding,
                    left_events: 0,
                    resync: Some((ResyncKind::Full, from_row.min(geo.rows))),
                }
            }
        };
        tracing::info!(array = %plan.superblock.name, slot = i, start = ?sp.start, "assembling slot");
        slots.push(slot);
    }
    (slots, changed)
}

/// The write-intent bitmap as stored on a member that is active and current (empty when none).
async fn read_bitmap(array: &str, bgeo: BitmapGeometry, slots: &[Slot]) -> Result<Bitmap> {
    let Some(src) = slots
        .iter()
        .find(|s| s.state == MemberState::Active)
        .and_then(|s| s.member.clone())
    else {
        return Ok(Bitmap::new(bgeo));
    };
    let len = Bitmap::new(bgeo).stored_len() as usize;
    let stored = src
        .read_at(bgeo.offset, len)
        .await
        .map_err(|source| ArrayError::MemberIo {
            array: array.to_string(),
            member: src.name().to_string(),
            op: "bitmap read",
            source,
        })?;
    Ok(Bitmap::from_bytes(bgeo, &stored))
}

impl Inner {
    /// After an unclean shutdown, makes parity of every region the bitmap marks dirty agree with
    /// its data again (a degraded array cannot check it and relies on the journal).
    async fn resync_after_unclean_shutdown(self: &Arc<Self>, dirty_degraded: bool) -> Result<()> {
        if self.is_degraded() {
            if self.ppl_pending.load(Ordering::SeqCst) {
                tracing::info!(array = %self.name, "unclean shutdown of a degraded array: its journal's partial-parity log repairs the interrupted rows before any write");
            } else {
                tracing::warn!(array = %self.name, dirty_degraded, "unclean shutdown of a degraded array: parity of dirty regions cannot be checked; started because start_dirty_degraded is set (or nothing was being written)");
            }
            return Ok(());
        }
        let regions = self.with_bitmap(|b| b.dirty_regions());
        for r in &regions {
            let (r0, r1) = self.region_rows(*r);
            self.scrub_rows(r0, r1, ScrubMode::Repair).await?;
        }
        self.unclean_resync_regions
            .fetch_add(regions.len() as u64, Ordering::SeqCst);
        tracing::info!(array = %self.name, regions = regions.len(), "resynced dirty regions after unclean shutdown");
        Ok(())
    }
}
