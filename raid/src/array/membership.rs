//! Membership and failure handling: marking members faulty (on an I/O error or by the operator),
//! hot spares taking a failed slot, removing, adding and replacing devices. Every change bumps the
//! event counter and is written to the superblocks before the caller sees it done.

use super::*;

impl Array {
    /// Marks the member in `slot` faulty (like an I/O error would); a hot spare takes over.
    pub async fn fail_member(&self, slot: usize) -> Result<()> {
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        self.inner.check_slot(slot)?;
        self.inner
            .member_failed(slot, "operator fail", None, true)
            .await;
        Ok(())
    }

    /// The operator's `disk fail`: like [`Array::fail_member`], but refused (nothing changed) when
    /// the array could not lose that member, as md refuses to fail the last device that holds
    /// the data. An I/O error still fails whatever it must.
    pub async fn operator_fail_member(&self, slot: usize) -> Result<()> {
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        self.inner.check_slot(slot)?;
        self.inner.check_replace_survives(slot)?;
        self.inner
            .member_failed(slot, "operator fail", None, true)
            .await;
        Ok(())
    }

    /// Detaches the device of a faulty (or rebuilding) slot, which becomes missing.
    pub async fn remove_member(&self, slot: usize) -> Result<()> {
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        self.inner.remove_member(slot).await
    }

    /// Removes a spare by member name.
    pub async fn remove_spare(&self, name: &str) -> Result<()> {
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        self.inner.remove_spare(name).await
    }

    /// Adds a device: a member that comes back to its empty slot is resynchronised from the
    /// bitmap; otherwise it fills an empty slot (full rebuild) or becomes a spare.
    pub async fn add_member(&self, member: Arc<dyn Member>) -> Result<MemberStatus> {
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        self.inner.add_member(member, None).await
    }

    /// Replaces the device of `slot` by `new`. An active member is replaced hot (see
    /// `hotreplace`): it stays active while its contents are copied onto `new`, so redundancy
    /// is kept. A faulty or rebuilding slot's device is removed and `new` rebuilt in its place.
    ///
    /// Everything that can refuse the replacement is checked before the old device is touched
    /// (slot, size, `new` not already in the array nor the device it replaces, its superblock
    /// readable, the array surviving the old device's removal): a refused replace changes nothing.
    pub async fn replace_member(&self, slot: usize, new: Arc<dyn Member>) -> Result<MemberStatus> {
        let _one_at_a_time = self.inner.membership_lock.lock().await;
        self.inner.check_slot(slot)?;
        let existing = self.inner.admit(&new, Some(slot)).await?;
        self.inner.check_replace_survives(slot)?;
        let active = lock(&self.inner.meta).slots[slot].state == MemberState::Active;
        if active && self.inner.geo.level != Level::Raid0 {
            return self.inner.start_hot_replace(slot, new).await;
        }
        if active {
            self.inner.member_failed(slot, "replace", None, false).await;
        }
        self.inner.remove_member(slot).await?;
        self.inner.add_admitted(new, existing, Some(slot)).await
    }
}

impl Inner {
    /// Detaches the device of a faulty (or rebuilding) slot; see [`Array::remove_member`].
    pub(super) async fn remove_member(self: &Arc<Self>, slot: usize) -> Result<()> {
        self.check_slot(slot)?;
        {
            let mut m = lock(&self.meta);
            let s = &mut m.slots[slot];
            if s.state == MemberState::Active {
                return Err(
                    self.invalid(format!("slot {slot} is active; fail it before removing it"))
                );
            }
            if s.state == MemberState::Rebuilding {
                s.left_events = 0;
            }
            s.member = None;
            s.resync = None;
            if s.state != MemberState::Faulty {
                s.state = MemberState::Missing;
            }
            m.events += 1;
        }
        self.write_superblocks().await;
        Ok(())
    }

    /// Removes a spare by member name.
    pub(super) async fn remove_spare(self: &Arc<Self>, name: &str) -> Result<()> {
        let found = {
            let mut m = lock(&self.meta);
            let before = m.spares.len();
            m.spares.retain(|s| s.member.name() != name);
            before != m.spares.len()
        };
        if !found {
            return Err(self.invalid(format!("no spare named {name}")));
        }
        self.write_superblocks().await;
        Ok(())
    }

    /// Marks `slot` faulty in `m`; returns whether a spare took the slot.
    pub(super) fn mark_faulty_locked(&self, m: &mut Meta, slot: usize, use_spare: bool) -> bool {
        let s = &mut m.slots[slot];
        if !matches!(s.state, MemberState::Active | MemberState::Rebuilding) {
            return false;
        }
        let was_active = s.state == MemberState::Active;
        s.state = MemberState::Faulty;
        s.resync = None;
        s.left_events = if was_active { m.events } else { 0 };
        if m.rebuild.is_some_and(|c| c.slot as usize == slot) {
            m.rebuild = None;
        }
        m.events += 1;
        tracing::warn!(array = %self.name, slot, "member marked faulty");
        let down: Vec<bool> = m
            .slots
            .iter()
            .map(|s| s.state != MemberState::Active || s.member.is_none())
            .collect();
        if !self.geo.survives(&down) && m.failed.is_none() {
            let detail = format!(
                "{} of {} members unusable for {}",
                down.iter().filter(|d| **d).count(),
                m.slots.len(),
                self.geo.level
            );
            tracing::error!(array = %self.name, %detail, "array failed");
            m.failed = Some(detail);
        }
        // A hot replace of this slot goes on as an ordinary rebuild from where its copy got to:
        // every write since it started reached the copy target too.
        if m.failed.is_none() && m.replacement.as_ref().is_some_and(|r| r.slot == slot) {
            if let Some(r) = m.replacement.take() {
                tracing::info!(array = %self.name, slot, member = %r.member.name(), rows_done = r.rows_done, "hot replace continues as a rebuild");
                let s = &mut m.slots[slot];
                s.member = Some(r.member);
                s.dev_uuid = r.dev_uuid;
                s.state = MemberState::Rebuilding;
                s.left_events = 0;
                s.resync = Some((ResyncKind::Full, r.rows_done));
                m.rebuild = Some(RebuildCheckpoint {
                    slot: slot as u32,
                    rows_done: r.rows_done,
                });
                return true;
            }
        }
        if use_spare && m.failed.is_none() && !m.spares.is_empty() {
            let sp = m.spares.remove(0);
            let s = &mut m.slots[slot];
            tracing::info!(array = %self.name, slot, spare = %sp.member.name(), "hot spare takes the slot");
            s.member = Some(sp.member);
            s.dev_uuid = sp.dev_uuid;
            s.state = MemberState::Rebuilding;
            s.left_events = 0;
            s.resync = Some((ResyncKind::Full, 0));
            m.rebuild = Some(RebuildCheckpoint {
                slot: slot as u32,
                rows_done: 0,
            });
            return true;
        }
        false
    }

    /// Handles an I/O error (or operator request) on `slot`.
    pub(super) async fn member_failed(
        self: &Arc<Self>,
        slot: usize,
        op: &str,
        err: Option<&io::Error>,
        use_spare: bool,
    ) {
        self.slot_failed(slot, None, op, err, use_spare).await
    }

    /// An I/O error of device `dev` in `slot`. Ignored when the slot holds another device by
    /// now (a spare or a replacement took over while the I/O was in flight): the error says
    /// nothing about the new device.
    pub(super) async fn device_failed(
        self: &Arc<Self>,
        slot: usize,
        dev: &Arc<dyn Member>,
        op: &str,
        err: &io::Error,
    ) {
        self.slot_failed(slot, Some(dev), op, Some(err), true).await
    }

    pub(super) async fn slot_failed(
        self: &Arc<Self>,
        slot: usize,
        dev: Option<&Arc<dyn Member>>,
        op: &str,
        err: Option<&io::Error>,
        use_spare: bool,
    ) {
        let changed = {
            let mut m = lock(&self.meta);
            if let Some(dev) = dev {
                let current = m.slots[slot]
                    .member
                    .as_ref()
                    .is_some_and(|d| Arc::ptr_eq(d, dev));
                if !current {
                    tracing::warn!(array = %self.name, slot, member = %dev.name(), op,
                        "I/O error of a device no longer in its slot; ignored");
                    return;
                }
            }
            let before = m.slots[slot].state;
            if let (Some(e), Some(d)) = (err, &m.slots[slot].member) {
                tracing::error!(array = %self.name, member = %d.name(), op, error = %e, "member I/O failed");
            }
            self.mark_faulty_locked(&mut m, slot, use_spare);
            before != m.slots[slot].state || m.slots[slot].state == MemberState::Rebuilding
        };
        if changed {
            self.write_superblocks().await;
        }
    }

    pub(super) async fn add_member(
        self: &Arc<Self>,
        member: Arc<dyn Member>,
        want_slot: Option<usize>,
    ) -> Result<MemberStatus> {
        let existing = self.admit(&member, None).await?;
        self.add_admitted(member, existing, want_slot).await
    }

    /// Checks a device about to join the array (as a spare, into an empty slot, or in place of
    /// the device of `replacing`) without changing anything: big enough for the array's member
    /// layout, not already in the array under any name (compared by the device behind the name,
    /// so `./d0.img`, a symlink or a hard link to a member is recognised), its superblock area
    /// readable. Returns the superblock found on it, if any.
    pub(super) async fn admit(
        &self,
        member: &Arc<dyn Member>,
        replacing: Option<usize>,
    ) -> Result<Option<Superblock>> {
        let need = self.data_offset + self.geo.member_data_bytes();
        if member.size() < need {
            return Err(ArrayError::MemberTooSmall {
                array: self.name.clone(),
                member: member.name().to_string(),
                size_bytes: member.size(),
                need_bytes: need,
            });
        }
        if let Some(slot) = replacing {
            let current = lock(&self.meta).slots[slot].member.clone();
            if current.is_some_and(|d| same_device(&d, member)) {
                return Err(self.invalid(format!(
                    "cannot replace {} with itself (slot {slot}); name a different disk",
                    member.name()
                )));
            }
        }
        if let Some((d, role)) = self
            .all_devices()
            .into_iter()
            .find(|(d, _)| same_device(d, member))
        {
            let what = match role {
                Role::Slot(i) => format!("the member in slot {i}"),
                Role::Spare => "a spare".to_string(),
            };
            return Err(self.invalid(format!(
                "{} is already in the array ({what}, {}); name a disk that is not",
                member.name(),
                d.name()
            )));
        }
        match member.read_at(0, SUPERBLOCK_BYTES).await {
            Ok(b) => Ok(Superblock::decode(&b).ok()),
            Err(source) => Err(ArrayError::MemberIo {
                array: self.name.clone(),
                member: member.name().to_string(),
                op: "superblock read",
                source,
            }),
        }
    }

    /// Refuses to take the device of `slot` out when the array would not survive without it
    /// (a replace of an active member in an array already degraded to its limit).
    pub(super) fn check_replace_survives(&self, slot: usize) -> Result<()> {
        let m = lock(&self.meta);
        if m.slots[slot].state != MemberState::Active {
            return Ok(());
        }
        let down: Vec<bool> = m
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| i == slot || s.state != MemberState::Active || s.member.is_none())
            .collect();
        if self.geo.survives(&down) {
            return Ok(());
        }
        Err(self.invalid(format!(
            "taking slot {slot} out now would fail the {} array ({} of {} members would be \
             unusable); let the running rebuild finish or bring the missing members back first",
            self.geo.level,
            down.iter().filter(|d| **d).count(),
            m.slots.len()
        )))
    }

    /// Puts an admitted device in: back into its old slot, into an empty slot, or among the
    /// spares. `existing` is what `admit` found on it.
    pub(super) async fn add_admitted(
        self: &Arc<Self>,
        member: Arc<dyn Member>,
        existing: Option<Superblock>,
        want_slot: Option<usize>,
    ) -> Result<MemberStatus> {
        let status = {
            let mut m = lock(&self.meta);
            // A returning member: same array, its old slot empty and still assigned to it.
            let returning = existing
                .as_ref()
                .filter(|sb| sb.array_uuid == self.uuid)
                .and_then(|sb| match sb.role {
                    Role::Slot(i) => {
                        let s = &m.slots[i as usize];
                        (s.member.is_none()
                            && s.dev_uuid == sb.dev_uuid
                            && s.left_events > 0
                            && sb.events >= s.left_events
                            && want_slot.is_none_or(|w| w == i as usize))
                        .then_some(i as usize)
                    }
                    Role::Spare => None,
                });
            if let Some(i) = returning {
                let s = &mut m.slots[i];
                s.member = Some(member.clone());
                s.state = MemberState::Rebuilding;
                s.resync = Some((ResyncKind::Bitmap, 0));
                m.events += 1;
                tracing::info!(array = %self.name, slot = i, member = %member.name(), "member returns: bitmap resync");
                MemberStatus {
                    slot: Some(i),
                    name: Some(member.name().to_string()),
                    state: MemberState::Rebuilding,
                }
            } else {
                let empty = match want_slot {
                    Some(w) => (m.slots[w].member.is_none()).then_some(w),
                    None => m.slots.iter().position(|s| s.member.is_none()),
                };
                let dev = Uuid::new_v4();
                match empty {
                    Some(i) if m.failed.is_none() => {
                        let s = &mut m.slots[i];
                        s.member = Some(member.clone());
                        s.dev_uuid = dev;
                        s.state = MemberState::Rebuilding;
                        s.left_events = 0;
                        s.resync = Some((ResyncKind::Full, 0));
                        m.rebuild = Some(RebuildCheckpoint {
                            slot: i as u32,
                            rows_done: 0,
                        });
                        m.events += 1;
                        MemberStatus {
                            slot: Some(i),
                            name: Some(member.name().to_string()),
                            state: MemberState::Rebuilding,
                        }
                    }
                    _ => {
                        m.spares.push(Spare {
                            member: member.clone(),
                            dev_uuid: dev,
                        });
                        m.events += 1;
                        MemberStatus {
                            slot: None,
                            name: Some(member.name().to_string()),
                            state: MemberState::Spare,
                        }
                    }
                }
            }
        };
        if status.state == MemberState::Rebuilding {
            // The bitmap must be present on the new device before it takes writes.
            let _g = self.bitmap_io.lock().await;
            let (len, bytes) = self.with_bitmap(|b| {
                let n = b.stored_len() / BITMAP_BLOCK_BYTES;
                (
                    n,
                    (0..n)
                        .flat_map(|blk| b.block_bytes(blk))
                        .collect::<Vec<u8>>(),
                )
            });
            let off = lock(&self.bitmap).geometry().offset;
            if len > 0 {
                if let Err(e) = member.write_at(off, Bytes::from(bytes)).await {
                    if let Some(i) = status.slot {
                        self.member_failed(i, "bitmap write", Some(&e), false).await;
                    }
                }
            }
        }
        self.write_superblocks().await;
        Ok(status)
    }
}

/// Whether two member handles are the same storage: one handle, one name, or one device behind
/// two names.
fn same_device(a: &Arc<dyn Member>, b: &Arc<dyn Member>) -> bool {
    if Arc::ptr_eq(a, b) || a.name() == b.name() {
        return true;
    }
    matches!((a.identity(), b.identity()), (Some(x), Some(y)) if x == y)
}
