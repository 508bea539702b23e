//! Assembly decisions, with no I/O: given the superblocks read from a list of members, decide
//! which member fills which slot, which are stale and how they catch up, which are spares, and
//! whether the array may start at all.
//!
//! Rules:
//! - every listed member must carry a valid superblock of one array (foreign, corrupt and mixed
//!   members are refused by name, so an operator never assembles the wrong disks);
//! - a member listed twice (same device identity or same name) is refused;
//! - the superblock with the highest events count is authoritative; its member table says which
//!   device belongs to each slot;
//! - a slot's device with the top events count and state active starts active; one that is behind
//!   (it missed updates while absent) is resynchronised from the write-intent bitmap when it left
//!   after the bitmap started tracking (its events >= the slot's `left_events`), else rebuilt fully;
//! - a slot marked rebuilding resumes from the checkpoint;
//! - the array is refused when the slots that cannot serve reads exceed what the level tolerates.

use crate::layout::Geometry;
use crate::superblock::{MemberState, Role, Superblock, SuperblockError};
use thiserror::Error;
use uuid::Uuid;

/// What assembly read from one listed member.
#[derive(Debug)]
pub struct Candidate {
    pub name: String,
    pub size_bytes: u64,
    pub superblock: Result<Superblock, SuperblockError>,
}

/// How a slot starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotStart {
    Active,
    /// No device for the slot: the array runs degraded.
    Absent,
    /// Device is back after a short absence: resync regions the bitmap marks.
    BitmapResync,
    /// Device content is unusable or half rebuilt: rebuild from `from_row`.
    FullRebuild {
        from_row: u64,
    },
}

/// One slot of the assembled array.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotPlan {
    /// Index into the candidate list.
    pub member: Option<usize>,
    pub start: SlotStart,
    pub dev_uuid: Uuid,
    /// The state recorded in the authoritative table.
    pub recorded: MemberState,
    pub left_events: u64,
}

/// The outcome of a successful assembly decision.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The authoritative (freshest) superblock.
    pub superblock: Superblock,
    pub slots: Vec<SlotPlan>,
    /// Candidate indices that become spares.
    pub spares: Vec<usize>,
    /// Candidates not used, with the reason (e.g. replaced earlier).
    pub ignored: Vec<(usize, String)>,
    /// The array was not shut down cleanly: resync the bitmap's dirty regions.
    pub unclean: bool,
}

/// Why the members cannot be assembled.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AssembleError {
    #[error("no members given")]
    NoMembers,
    #[error("member {name}: {reason}")]
    BadSuperblock { name: String, reason: String },
    #[error("members belong to different arrays: {first} and {other}")]
    Mixed {
        /// "NAME (array UUID \"ARRAY\")" of the first member.
        first: String,
        other: String,
    },
    #[error("member {name} is listed twice (also as {other})")]
    Duplicate { name: String, other: String },
    #[error("member {name} has {size_bytes} bytes, the array needs {need_bytes} on each member")]
    WrongSize {
        name: String,
        size_bytes: u64,
        need_bytes: u64,
    },
    #[error("member {name} disagrees with the array's geometry: {what}")]
    Inconsistent { name: String, what: String },
    #[error("array {array} ({level}) cannot start: {down} of {members} slots unusable ({detail}); the level tolerates fewer — add the missing members")]
    TooManyMissing {
        array: String,
        level: String,
        down: usize,
        members: usize,
        detail: String,
    },
}

/// Decides how to assemble `candidates`.
pub fn plan(candidates: &[Candidate]) -> Result<Plan, AssembleError> {
    if candidates.is_empty() {
        return Err(AssembleError::NoMembers);
    }
    let mut sbs = Vec::with_capacity(candidates.len());
    for c in candidates {
        match &c.superblock {
            Ok(sb) => sbs.push(sb),
            Err(e) => {
                return Err(AssembleError::BadSuperblock {
                    name: c.name.clone(),
                    reason: e.to_string(),
                })
            }
        }
    }
    for (i, c) in candidates.iter().enumerate() {
        for (j, d) in candidates.iter().enumerate().take(i) {
            if sbs[i].array_uuid != sbs[j].array_uuid {
                return Err(AssembleError::Mixed {
                    first: format!("{} (array {} {:?})", d.name, sbs[j].array_uuid, sbs[j].name),
                    other: format!("{} (array {} {:?})", c.name, sbs[i].array_uuid, sbs[i].name),
                });
            }
            if c.name == d.name || sbs[i].dev_uuid == sbs[j].dev_uuid {
                return Err(AssembleError::Duplicate {
                    name: c.name.clone(),
                    other: d.name.clone(),
                });
            }
        }
    }
    let fresh_idx = (0..sbs.len()).max_by_key(|&i| sbs[i].events).unwrap_or(0);
    let fresh = sbs[fresh_idx].clone();
    let need = fresh.data_offset + fresh.member_data_bytes;
    for (c, sb) in candidates.iter().zip(&sbs) {
        if sb.level != fresh.level
            || sb.member_count != fresh.member_count
            || sb.chunk_bytes != fresh.chunk_bytes
        {
            return Err(AssembleError::Inconsistent {
                name: c.name.clone(),
                what: format!(
                    "{} x{} chunk {} vs {} x{} chunk {}",
                    sb.level,
                    sb.member_count,
                    sb.chunk_bytes,
                    fresh.level,
                    fresh.member_count,
                    fresh.chunk_bytes
                ),
            });
        }
        if c.size_bytes < need {
            return Err(AssembleError::WrongSize {
                name: c.name.clone(),
                size_bytes: c.size_bytes,
                need_bytes: need,
            });
        }
    }
    let mut slots = Vec::with_capacity(fresh.members.len());
    let mut used = vec![false; candidates.len()];
    for (slot, entry) in fresh.members.iter().enumerate() {
        let found = sbs.iter().position(|sb| {
            sb.role == Role::Slot(slot as u32)
                && sb.dev_uuid == entry.dev_uuid
                && !entry.dev_uuid.is_nil()
        });
        let start = match (found, entry.state) {
            (None, _) => SlotStart::Absent,
            (Some(_), MemberState::Rebuilding) => SlotStart::FullRebuild {
                from_row: fresh
                    .rebuild
                    .filter(|c| c.slot as usize == slot)
                    .map_or(0, |c| c.rows_done),
            },
            (Some(i), MemberState::Active) if sbs[i].events == fresh.events => SlotStart::Active,
            (Some(_), MemberState::Active) => SlotStart::BitmapResync,
            (Some(i), MemberState::Faulty | MemberState::Missing)
                if entry.left_events > 0 && sbs[i].events >= entry.left_events =>
            {
                SlotStart::BitmapResync
            }
            (Some(_), _) => SlotStart::FullRebuild { from_row: 0 },
        };
        if let Some(i) = found {
            used[i] = true;
        }
        slots.push(SlotPlan {
            member: found,
            start,
            dev_uuid: entry.dev_uuid,
            recorded: entry.state,
            left_events: entry.left_events,
        });
    }
    let mut spares = Vec::new();
    let mut ignored = Vec::new();
    for (i, sb) in sbs.iter().enumerate() {
        if used[i] {
            continue;
        }
        match sb.role {
            Role::Spare => spares.push(i),
            Role::Slot(s) => ignored.push((
                i,
                format!("held slot {s} earlier but the array gave that slot to another device"),
            )),
        }
    }
    let geo = Geometry::new(
        fresh.level,
        fresh.member_count as usize,
        fresh.chunk_bytes,
        fresh.member_data_bytes,
    )
    .map_err(|e| AssembleError::Inconsistent {
        name: candidates[fresh_idx].name.clone(),
        what: e.to_string(),
    })?;
    let down: Vec<bool> = slots.iter().map(|s| s.start != SlotStart::Active).collect();
    if !geo.survives(&down) {
        let detail = slots
            .iter()
            .enumerate()
            .filter(|(_, s)| s.start != SlotStart::Active)
            .map(|(i, s)| format!("slot {i}: {:?}", s.start))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(AssembleError::TooManyMissing {
            array: fresh.name.clone(),
            level: fresh.level.to_string(),
            down: down.iter().filter(|d| **d).count(),
            members: slots.len(),
            detail,
        });
    }
    Ok(Plan {
        unclean: !fresh.clean,
        superblock: fresh,
        slots,
        spares,
        ignored,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Level;
    use crate::superblock::{BitmapGeometry, MemberEntry, DATA_OFFSET_BYTES};

    fn sb(slot: u32, events: u64) -> Superblock {
        Superblock {
            array_uuid: Uuid::from_u128(7),
            name: "a".into(),
            level: Level::Raid5,
            chunk_bytes: 65536,
            member_count: 3,
            role: Role::Slot(slot),
            dev_uuid: Uuid::from_u128(100 + slot as u128),
            events,
            applied_seq: 0,
            data_offset: DATA_OFFSET_BYTES,
            member_data_bytes: 1 << 20,
            array_bytes: 2 << 20,
            clean: true,
            rebuild: None,
            bitmap: BitmapGeometry {
                offset: 4096,
                region_bytes: 1 << 20,
                bits: 1,
            },
            members: (0..3)
                .map(|i| MemberEntry {
                    dev_uuid: Uuid::from_u128(100 + i),
                    state: MemberState::Active,
                    left_events: 0,
                })
                .collect(),
            journal: Default::default(),
        }
    }

    fn cand(name: &str, sb: Superblock) -> Candidate {
        Candidate {
            name: name.into(),
            size_bytes: 8 << 20,
            superblock: Ok(sb),
        }
    }

    #[test]
    fn member_that_missed_updates_is_resynced_from_the_bitmap() {
        let mut fresh = sb(0, 10);
        fresh.members[2].state = MemberState::Faulty;
        fresh.members[2].left_events = 9;
        let mut fresh1 = fresh.clone();
        fresh1.role = Role::Slot(1);
        fresh1.dev_uuid = Uuid::from_u128(101);
        let p = plan(&[cand("a", fresh), cand("b", fresh1), cand("c", sb(2, 9))]).unwrap();
        assert_eq!(p.slots[2].start, SlotStart::BitmapResync);
        assert_eq!(p.slots[0].start, SlotStart::Active);
    }

    #[test]
    fn two_missing_raid5_members_are_refused_with_the_array_name() {
        let err = plan(&[cand("a", sb(0, 3))]).unwrap_err();
        assert!(
            matches!(err, AssembleError::TooManyMissing { down: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("array a"));
    }

    #[test]
    fn mixed_duplicate_and_wrong_size_members_are_refused() {
        let mut other = sb(1, 3);
        other.array_uuid = Uuid::from_u128(8);
        assert!(matches!(
            plan(&[cand("a", sb(0, 3)), cand("b", other)]),
            Err(AssembleError::Mixed { .. })
        ));
        assert!(matches!(
            plan(&[cand("a", sb(0, 3)), cand("b", sb(0, 3))]),
            Err(AssembleError::Duplicate { .. })
        ));
        let mut small = cand("c", sb(2, 3));
        small.size_bytes = 1 << 20;
        assert!(matches!(
            plan(&[cand("a", sb(0, 3)), cand("b", sb(1, 3)), small]),
            Err(AssembleError::WrongSize { .. })
        ));
    }

    #[test]
    fn corrupt_superblock_is_reported_by_member_name() {
        let bad = Candidate {
            name: "/img/d2".into(),
            size_bytes: 8 << 20,
            superblock: Err(SuperblockError::BadChecksum {
                stored: 1,
                computed: 2,
            }),
        };
        let err = plan(&[cand("a", sb(0, 3)), bad]).unwrap_err();
        assert!(err.to_string().contains("/img/d2"));
    }
}
