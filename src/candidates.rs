//! Which of an array's candidate disks belong to it, decided from what each disk holds.
//!
//! The config names candidates (paths and patterns, `crate::config::disks`); the superblocks
//! say which array each belongs to. An array is found by its UUID when the config gives one,
//! else by its name; every candidate holding it is passed to the assembler (which reads slots
//! and spares from the freshest superblock), and every other candidate is left alone with a
//! reason the node logs. This is why a replaced disk or an added spare needs no config edit.
//!
//! Pure: the callers read the disks (async at start, `std::fs` for `--check`).

use crate::disk_check::Contents;
use twinblock_raid::superblock::Superblock;
use uuid::Uuid;

/// What one candidate holds.
#[derive(Debug)]
pub struct Found {
    pub name: String,
    pub contents: Contents,
    /// The decoded superblock when `contents` is `Twinblock` (an error text when corrupt).
    pub superblock: Option<Result<Superblock, String>>,
}

/// The outcome for one array.
#[derive(Debug, PartialEq, Eq)]
pub enum Selection {
    /// These candidates (indices) hold the array; the others are skipped for the reasons given.
    Assemble {
        members: Vec<usize>,
        skipped: Vec<(usize, String)>,
    },
    /// No candidate holds the array.
    Absent,
}

/// Why the candidates cannot be judged.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    #[error(
        "the disks hold {count} different arrays named `{name}` ({uuids}); set `uuid` in the \
         array's config to the one to run"
    )]
    Ambiguous {
        name: String,
        count: usize,
        uuids: String,
    },
}

/// Finds array `name` (or the array with `uuid`) among `found`.
pub fn select(name: &str, uuid: Option<Uuid>, found: &[Found]) -> Result<Selection, SelectError> {
    let holds = |sb: &Superblock| match uuid {
        Some(u) => sb.array_uuid == u,
        None => sb.name == name,
    };
    let mut uuids: Vec<Uuid> = Vec::new();
    for f in found {
        if let Some(Ok(sb)) = &f.superblock {
            if holds(sb) && !uuids.contains(&sb.array_uuid) {
                uuids.push(sb.array_uuid);
            }
        }
    }
    if uuids.len() > 1 {
        return Err(SelectError::Ambiguous {
            name: name.to_string(),
            count: uuids.len(),
            uuids: uuids
                .iter()
                .map(Uuid::to_string)
                .collect::<Vec<_>>()
                .join(", "),
        });
    }
    let Some(chosen) = uuids.first() else {
        return Ok(Selection::Absent);
    };
    let mut members = Vec::new();
    let mut skipped = Vec::new();
    for (i, f) in found.iter().enumerate() {
        match &f.superblock {
            Some(Ok(sb)) if sb.array_uuid == *chosen => members.push(i),
            Some(Ok(sb)) => skipped.push((
                i,
                format!("holds another array, `{}` ({})", sb.name, sb.array_uuid),
            )),
            Some(Err(e)) => skipped.push((i, format!("its superblock cannot be read: {e}"))),
            None => skipped.push((i, f.contents.describe())),
        }
    }
    Ok(Selection::Assemble { members, skipped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinblock_raid::superblock::{BitmapGeometry, Role, DATA_OFFSET_BYTES};
    use twinblock_raid::Level;

    fn sb(name: &str, array: u128) -> Superblock {
        Superblock {
            array_uuid: Uuid::from_u128(array),
            name: name.into(),
            level: Level::Raid1,
            chunk_bytes: 65536,
            member_count: 2,
            role: Role::Spare,
            dev_uuid: Uuid::from_u128(1),
            events: 1,
            applied_seq: 0,
            data_offset: DATA_OFFSET_BYTES,
            member_data_bytes: 1 << 20,
            array_bytes: 1 << 20,
            clean: true,
            rebuild: None,
            bitmap: BitmapGeometry {
                offset: 4096,
                region_bytes: 1 << 20,
                bits: 1,
            },
            members: Vec::new(),
            journal: Default::default(),
        }
    }

    fn ours(name: &str, array: u128) -> Found {
        Found {
            name: format!("{name}-{array}"),
            contents: Contents::Twinblock,
            superblock: Some(Ok(sb(name, array))),
        }
    }

    fn blank() -> Found {
        Found {
            name: "blank".into(),
            contents: Contents::Blank,
            superblock: None,
        }
    }

    #[test]
    fn array_is_found_by_name_and_other_candidates_are_skipped() {
        let found = [ours("md0", 1), blank(), ours("md1", 2), ours("md0", 1)];
        let Selection::Assemble { members, skipped } = select("md0", None, &found).unwrap() else {
            panic!("not found");
        };
        assert_eq!(members, vec![0, 3]);
        assert_eq!(skipped.len(), 2);
        assert!(skipped[1].1.contains("md1"), "{:?}", skipped);
    }

    #[test]
    fn two_arrays_of_one_name_need_the_uuid() {
        let found = [ours("md0", 1), ours("md0", 2)];
        assert!(matches!(
            select("md0", None, &found),
            Err(SelectError::Ambiguous { count: 2, .. })
        ));
        let Selection::Assemble { members, .. } =
            select("md0", Some(Uuid::from_u128(2)), &found).unwrap()
        else {
            panic!("not found");
        };
        assert_eq!(members, vec![1]);
    }

    #[test]
    fn blank_candidates_only_are_absent() {
        assert_eq!(
            select("md0", None, &[blank(), blank()]).unwrap(),
            Selection::Absent
        );
    }

    #[test]
    fn corrupt_superblock_is_skipped_with_its_reason() {
        let bad = Found {
            name: "bad".into(),
            contents: Contents::Twinblock,
            superblock: Some(Err("checksum mismatch".into())),
        };
        let Selection::Assemble { skipped, .. } =
            select("md0", None, &[ours("md0", 1), bad]).unwrap()
        else {
            panic!("not found");
        };
        assert!(skipped[0].1.contains("checksum mismatch"));
    }
}
