//! The per-member superblock: encode/decode with CRC32C, and the fixed member layout. No I/O.
//!
//! Member layout (byte offsets on every member; see docs/FORMATS.md "RAID member layout"):
//!
//! | range | content |
//! | --- | --- |
//! | 0 .. 4 KiB | superblock (this module) |
//! | 4 KiB .. 1 MiB | write-intent bitmap (`bitmap` module), 1 bit per region |
//! | 1 MiB .. 1 MiB + 64 KiB | HA mailbox, reserved: RAID never reads or writes it |
//! | 4 MiB .. | data area (`data_offset`) |

use crate::layout::{Level, MAX_MEMBERS};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

/// Size of the superblock block at member offset 0.
pub const SUPERBLOCK_BYTES: usize = 4096;
/// Where the write-intent bitmap starts.
pub const BITMAP_OFFSET_BYTES: u64 = 4096;
/// Most bytes the bitmap may use (it ends where the mailbox begins).
pub const BITMAP_MAX_BYTES: u64 = MAILBOX_OFFSET_BYTES - BITMAP_OFFSET_BYTES;
/// The HA mailbox area RAID leaves alone.
pub const MAILBOX_OFFSET_BYTES: u64 = 1 << 20;
/// Length of the HA mailbox area.
pub const MAILBOX_BYTES: u64 = 64 << 10;
/// First byte of array data on every member.
pub const DATA_OFFSET_BYTES: u64 = 4 << 20;
/// Magic at byte 0.
pub const MAGIC: [u8; 8] = *b"TWBRAID\x01";
/// Format version written by this code. Version 2 adds the journal mark (bytes 176..204);
/// version 1 superblocks (those bytes zero) are still read, as "no journal mark recorded".
pub const FORMAT_VERSION: u32 = 2;
/// The oldest format version this code reads.
pub const OLDEST_READABLE_VERSION: u32 = 1;
/// Bytes of the array name field.
pub const NAME_BYTES: usize = 32;
const HEADER_BYTES: usize = 256;
const ENTRY_BYTES: usize = 32;
const CRC_OFFSET: usize = SUPERBLOCK_BYTES - 4;
/// Role value meaning "spare".
const ROLE_SPARE: u32 = u32::MAX;
/// `rebuild_slot` value meaning "no rebuild in progress".
const NO_REBUILD: u32 = u32::MAX;
const FLAG_CLEAN: u32 = 1;
/// Journal flag: the journal stopped cleanly (its final CP applied every record it held).
const JOURNAL_FLAG_STOPPED_CLEAN: u32 = 1;

/// The state of one member slot as the array sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MemberState {
    Active,
    Faulty,
    Spare,
    Rebuilding,
    Missing,
}

impl MemberState {
    fn code(self) -> u8 {
        match self {
            MemberState::Active => 1,
            MemberState::Faulty => 2,
            MemberState::Spare => 3,
            MemberState::Rebuilding => 4,
            MemberState::Missing => 5,
        }
    }

    fn from_code(c: u8) -> Option<MemberState> {
        Some(match c {
            1 => MemberState::Active,
            2 => MemberState::Faulty,
            3 => MemberState::Spare,
            4 => MemberState::Rebuilding,
            5 => MemberState::Missing,
            _ => return None,
        })
    }
}

/// What this member is in the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Slot(u32),
    Spare,
}

/// One entry of the member table (one per slot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemberEntry {
    /// Identity of the device holding the slot (nil when none).
    pub dev_uuid: Uuid,
    pub state: MemberState,
    /// The events count when the slot's device left (faulty/removed); 0 otherwise.
    pub left_events: u64,
}

/// A rebuild in progress: slot being rebuilt and the rows already done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RebuildCheckpoint {
    pub slot: u32,
    pub rows_done: u64,
}

/// Bitmap geometry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapGeometry {
    pub offset: u64,
    /// Member data bytes covered by one bit.
    pub region_bytes: u64,
    pub bits: u64,
}

/// What the array knows about the NVRAM log that journals it, so that a start with a lost or
/// foreign log can tell whether acknowledged writes were lost (see docs/FORMATS.md).
///
/// The log's head seq as of each CP is the superblock's `applied_seq`: a CP applies every
/// record up to the head it snapshotted and stores that seq.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct JournalMark {
    /// Identity of the NVRAM log journaling this array; nil when none was recorded.
    pub log_id: Uuid,
    /// The journal stopped cleanly: every record of its log is in the array.
    pub stopped_clean: bool,
    /// Wall-clock time (Unix milliseconds) of the newest CP (`applied_seq` update); 0: unknown.
    pub last_cp_unix_ms: u64,
}

/// A decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub array_uuid: Uuid,
    pub name: String,
    pub level: Level,
    pub chunk_bytes: u64,
    pub member_count: u32,
    pub role: Role,
    pub dev_uuid: Uuid,
    pub events: u64,
    pub applied_seq: u64,
    pub data_offset: u64,
    /// Data bytes used on each member.
    pub member_data_bytes: u64,
    pub array_bytes: u64,
    pub clean: bool,
    pub rebuild: Option<RebuildCheckpoint>,
    pub bitmap: BitmapGeometry,
    pub members: Vec<MemberEntry>,
    /// The journal mark (version 2; all default in a version 1 superblock).
    pub journal: JournalMark,
}

/// Why bytes are not a valid superblock.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SuperblockError {
    #[error("no twinblock RAID superblock (magic {found:02x?}): foreign or blank member")]
    NotOurs { found: [u8; 8] },
    #[error(
        "superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x}): corrupt"
    )]
    BadChecksum { stored: u32, computed: u32 },
    #[error("superblock format version {0} is not supported (this build reads versions {OLDEST_READABLE_VERSION} to {FORMAT_VERSION})")]
    Version(u32),
    #[error("superblock field {field} holds an invalid value {value}")]
    Invalid { field: &'static str, value: u64 },
    #[error("superblock needs {need} bytes, got {got}")]
    Short { need: usize, got: usize },
}

fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}
fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}
fn get_uuid(b: &[u8], at: usize) -> Uuid {
    let mut w = [0u8; 16];
    w.copy_from_slice(&b[at..at + 16]);
    Uuid::from_bytes(w)
}

impl Superblock {
    /// Encodes into exactly [`SUPERBLOCK_BYTES`] bytes.
    pub fn encode(&self) -> Vec<u8> {
        assert!(
            self.members.len() <= MAX_MEMBERS,
            "member table larger than the format allows"
        );
        let mut b = vec![0u8; SUPERBLOCK_BYTES];
        b[0..8].copy_from_slice(&MAGIC);
        put_u32(&mut b, 8, FORMAT_VERSION);
        put_u32(&mut b, 12, if self.clean { FLAG_CLEAN } else { 0 });
        b[16..32].copy_from_slice(self.array_uuid.as_bytes());
        let name = self.name.as_bytes();
        let n = name.len().min(NAME_BYTES);
        b[32..32 + n].copy_from_slice(&name[..n]);
        put_u32(&mut b, 64, self.level.code());
        put_u32(&mut b, 68, self.chunk_bytes as u32);
        put_u32(&mut b, 72, self.member_count);
        put_u32(
            &mut b,
            76,
            match self.role {
                Role::Slot(i) => i,
                Role::Spare => ROLE_SPARE,
            },
        );
        b[80..96].copy_from_slice(self.dev_uuid.as_bytes());
        put_u64(&mut b, 96, self.events);
        put_u64(&mut b, 104, self.applied_seq);
        put_u64(&mut b, 112, self.data_offset);
        put_u64(&mut b, 120, self.member_data_bytes);
        put_u64(&mut b, 128, self.array_bytes);
        let (slot, rows) = match self.rebuild {
            Some(c) => (c.slot, c.rows_done),
            None => (NO_REBUILD, 0),
        };
        put_u32(&mut b, 136, slot);
        put_u64(&mut b, 144, rows);
        put_u64(&mut b, 152, self.bitmap.offset);
        put_u64(&mut b, 160, self.bitmap.region_bytes);
        put_u64(&mut b, 168, self.bitmap.bits);
        b[176..192].copy_from_slice(self.journal.log_id.as_bytes());
        put_u64(&mut b, 192, self.journal.last_cp_unix_ms);
        put_u32(
            &mut b,
            200,
            if self.journal.stopped_clean {
                JOURNAL_FLAG_STOPPED_CLEAN
            } else {
                0
            },
        );
        for (i, e) in self.members.iter().enumerate() {
            let at = HEADER_BYTES + i * ENTRY_BYTES;
            b[at..at + 16].copy_from_slice(e.dev_uuid.as_bytes());
            b[at + 16] = e.state.code();
            put_u64(&mut b, at + 24, e.left_events);
        }
        let crc = crc32c::crc32c(&b[..CRC_OFFSET]);
        put_u32(&mut b, CRC_OFFSET, crc);
        b
    }

    /// Decodes and validates a superblock block.
    pub fn decode(b: &[u8]) -> Result<Superblock, SuperblockError> {
        if b.len() < SUPERBLOCK_BYTES {
            return Err(SuperblockError::Short {
                need: SUPERBLOCK_BYTES,
                got: b.len(),
            });
        }
        let mut found = [0u8; 8];
        found.copy_from_slice(&b[0..8]);
        if found != MAGIC {
            return Err(SuperblockError::NotOurs { found });
        }
        let stored = get_u32(b, CRC_OFFSET);
        let computed = crc32c::crc32c(&b[..CRC_OFFSET]);
        if stored != computed {
            return Err(SuperblockError::BadChecksum { stored, computed });
        }
        let version = get_u32(b, 8);
        if !(OLDEST_READABLE_VERSION..=FORMAT_VERSION).contains(&version) {
            return Err(SuperblockError::Version(version));
        }
        let invalid = |field, value| SuperblockError::Invalid { field, value };
        let level_code = get_u32(b, 64);
        let level = Level::from_code(level_code).ok_or(invalid("level", level_code as u64))?;
        let member_count = get_u32(b, 72);
        if member_count == 0 || member_count as usize > MAX_MEMBERS {
            return Err(invalid("member_count", member_count as u64));
        }
        let role = match get_u32(b, 76) {
            ROLE_SPARE => Role::Spare,
            i if i < member_count => Role::Slot(i),
            i => return Err(invalid("role", i as u64)),
        };
        let name_raw = &b[32..32 + NAME_BYTES];
        let name_len = name_raw.iter().position(|&c| c == 0).unwrap_or(NAME_BYTES);
        let name = String::from_utf8_lossy(&name_raw[..name_len]).into_owned();
        let rebuild = match get_u32(b, 136) {
            NO_REBUILD => None,
            s if s < member_count => Some(RebuildCheckpoint {
                slot: s,
                rows_done: get_u64(b, 144),
            }),
            s => return Err(invalid("rebuild_slot", s as u64)),
        };
        let mut members = Vec::with_capacity(member_count as usize);
        for i in 0..member_count as usize {
            let at = HEADER_BYTES + i * ENTRY_BYTES;
            let state = MemberState::from_code(b[at + 16])
                .ok_or(invalid("member state", b[at + 16] as u64))?;
            members.push(MemberEntry {
                dev_uuid: get_uuid(b, at),
                state,
                left_events: get_u64(b, at + 24),
            });
        }
        let sb = Superblock {
            array_uuid: get_uuid(b, 16),
            name,
            level,
            chunk_bytes: get_u32(b, 68) as u64,
            member_count,
            role,
            dev_uuid: get_uuid(b, 80),
            events: get_u64(b, 96),
            applied_seq: get_u64(b, 104),
            data_offset: get_u64(b, 112),
            member_data_bytes: get_u64(b, 120),
            array_bytes: get_u64(b, 128),
            clean: get_u32(b, 12) & FLAG_CLEAN != 0,
            rebuild,
            bitmap: BitmapGeometry {
                offset: get_u64(b, 152),
                region_bytes: get_u64(b, 160),
                bits: get_u64(b, 168),
            },
            members,
            // Version 1 wrote zeros here: a nil log id, no clean stop recorded, time unknown.
            journal: JournalMark {
                log_id: get_uuid(b, 176),
                stopped_clean: get_u32(b, 200) & JOURNAL_FLAG_STOPPED_CLEAN != 0,
                last_cp_unix_ms: get_u64(b, 192),
            },
        };
        if !sb.chunk_bytes.is_power_of_two() {
            return Err(invalid("chunk_bytes", sb.chunk_bytes));
        }
        if sb.data_offset < DATA_OFFSET_BYTES {
            return Err(invalid("data_offset", sb.data_offset));
        }
        if sb.bitmap.region_bytes == 0
            || sb.bitmap.offset != BITMAP_OFFSET_BYTES
            || sb.bitmap.bits.div_ceil(8) > BITMAP_MAX_BYTES
        {
            return Err(invalid("bitmap geometry", sb.bitmap.region_bytes));
        }
        Ok(sb)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Superblock {
        Superblock {
            array_uuid: Uuid::from_u128(0x1234),
            name: "vol0".into(),
            level: Level::Raid6,
            chunk_bytes: 65536,
            member_count: 4,
            role: Role::Slot(2),
            dev_uuid: Uuid::from_u128(0x99),
            events: 42,
            applied_seq: 7,
            data_offset: DATA_OFFSET_BYTES,
            member_data_bytes: 1 << 30,
            array_bytes: 2 << 30,
            clean: false,
            rebuild: Some(RebuildCheckpoint {
                slot: 1,
                rows_done: 100,
            }),
            bitmap: BitmapGeometry {
                offset: BITMAP_OFFSET_BYTES,
                region_bytes: 4 << 20,
                bits: 256,
            },
            members: (0..4)
                .map(|i| MemberEntry {
                    dev_uuid: Uuid::from_u128(i),
                    state: if i == 1 {
                        MemberState::Rebuilding
                    } else {
                        MemberState::Active
                    },
                    left_events: 0,
                })
                .collect(),
            journal: JournalMark {
                log_id: Uuid::from_u128(0xabc),
                stopped_clean: true,
                last_cp_unix_ms: 1_700_000_000_000,
            },
        }
    }

    #[test]
    fn superblock_round_trips() {
        let sb = sample();
        let bytes = sb.encode();
        assert_eq!(bytes.len(), SUPERBLOCK_BYTES);
        assert_eq!(Superblock::decode(&bytes), Ok(sb));
    }

    #[test]
    fn version_1_superblock_reads_with_no_journal_mark() {
        let mut sb = sample();
        sb.journal = JournalMark::default();
        let mut bytes = sb.encode();
        put_u32(&mut bytes, 8, 1);
        let crc = crc32c::crc32c(&bytes[..CRC_OFFSET]);
        put_u32(&mut bytes, CRC_OFFSET, crc);
        assert_eq!(Superblock::decode(&bytes), Ok(sb));
    }

    #[test]
    fn newer_superblock_version_is_refused() {
        let mut bytes = sample().encode();
        put_u32(&mut bytes, 8, FORMAT_VERSION + 1);
        let crc = crc32c::crc32c(&bytes[..CRC_OFFSET]);
        put_u32(&mut bytes, CRC_OFFSET, crc);
        assert_eq!(
            Superblock::decode(&bytes),
            Err(SuperblockError::Version(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn flipped_bit_is_reported_as_corrupt() {
        let mut bytes = sample().encode();
        bytes[100] ^= 1;
        assert!(matches!(
            Superblock::decode(&bytes),
            Err(SuperblockError::BadChecksum { .. })
        ));
    }

    #[test]
    fn zeroed_block_is_not_ours() {
        assert!(matches!(
            Superblock::decode(&[0u8; SUPERBLOCK_BYTES]),
            Err(SuperblockError::NotOurs { .. })
        ));
    }

    #[test]
    fn invalid_role_is_refused_even_with_a_good_checksum() {
        let mut sb = sample();
        sb.role = Role::Slot(9);
        assert!(matches!(
            Superblock::decode(&sb.encode()),
            Err(SuperblockError::Invalid { field: "role", .. })
        ));
    }
}
