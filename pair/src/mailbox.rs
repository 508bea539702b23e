//! The mailbox area: where each node writes its status record on the shared disks.
//!
//! The disks are the third heartbeat path and the one that makes a network partition harmless:
//! as long as both nodes reach the disks they read each other's slot and neither takes over.
//! This module is the pure codec; the node reads and writes the blocks with `O_DIRECT`.
//!
//! # Layout (relative to the start of the mailbox area; 16 KiB, 4 KiB aligned)
//!
//! | area offset | bytes | content |
//! | --- | --- | --- |
//! | 0 | 4096 | node 0's slot, copy 0 |
//! | 4096 | 4096 | node 0's slot, copy 1 |
//! | 8192 | 4096 | node 1's slot, copy 0 |
//! | 12288 | 4096 | node 1's slot, copy 1 |
//!
//! Each node writes only its own slot and reads only its partner's. A record with sequence `S`
//! goes to copy `S mod 2`, one 4 KiB `O_DIRECT` write. A torn or failed write therefore damages
//! at most the copy being written; the other still holds the previous record, and the reader takes
//! the newest copy whose CRCs check. A slot whose copies are both unreadable is an error, never a
//! record: the caller counts such a read as a failed mailbox read (which blocks takeover, see
//! `state`), so garbage on the disk can never look like a silent partner.
//!
//! # Copy block (4096 bytes)
//!
//! | offset | bytes | field |
//! | --- | --- | --- |
//! | 0 | 4 | magic `TBMB` |
//! | 4 | 2 | mailbox format version = 1 |
//! | 6 | 1 | owner node id (0/1) |
//! | 7 | 1 | copy index (0/1) |
//! | 8 | 2 | status record length `L` |
//! | 10 | 6 | reserved, zero |
//! | 16 | L | the status record exactly as sent on the network (its own magic and CRC) |
//! | 16 + L | to 4092 | zero |
//! | 4092 | 4 | CRC32C of bytes 0..4092 |
//!
//! The record keeps its own frame so that a partner speaking a newer status protocol is still
//! recognised as alive (see `status`); the block CRC covers the padding so a half-written block
//! is detected even where the record's bytes happen to be intact.

use crate::status::{self, NodeId, StatusError, StatusRecord};
use thiserror::Error;

/// Bytes of one copy block (one `O_DIRECT` write).
pub const COPY_BYTES: usize = 4096;
/// Copies per node slot.
pub const COPIES_PER_SLOT: usize = 2;
/// Bytes of one node's slot.
pub const SLOT_BYTES: usize = COPY_BYTES * COPIES_PER_SLOT;
/// Bytes of the whole mailbox area (two slots). The area must start 4 KiB aligned.
pub const AREA_BYTES: usize = SLOT_BYTES * 2;
/// Required alignment of the area's start and of every block buffer, for `O_DIRECT`.
pub const AREA_ALIGN_BYTES: usize = 4096;
/// `TBMB`: first four bytes of every copy block.
pub const MAGIC: [u8; 4] = *b"TBMB";
/// Mailbox block format version.
pub const FORMAT_VERSION: u16 = 1;
const HEADER_BYTES: usize = 16;
const CRC_AT: usize = COPY_BYTES - 4;

/// Why a mailbox block or slot did not yield a record.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum MailboxError {
    /// The buffer has the wrong size.
    #[error("mailbox buffer is {len} bytes, expected {expected}")]
    WrongSize {
        /// Bytes given.
        len: usize,
        /// Bytes expected.
        expected: usize,
    },
    /// All zero: the slot was never written (a fresh disk, or the partner never started).
    #[error("mailbox copy is empty (never written)")]
    Empty,
    /// Not a mailbox block: the disk region holds something else or was overwritten.
    #[error("mailbox copy has magic {found:02x?}, expected {MAGIC:02x?}: the area holds something else; check the disk layout")]
    BadMagic {
        /// First four bytes.
        found: [u8; 4],
    },
    /// An unknown mailbox block format.
    #[error("mailbox copy has format version {0}, this node reads version {FORMAT_VERSION}")]
    UnknownFormat(u16),
    /// The block CRC does not match: a torn write or corruption.
    #[error("mailbox copy CRC32C mismatch (stored {stored:#010x}, computed {computed:#010x}): torn write or corruption")]
    BadCrc {
        /// Stored CRC.
        stored: u32,
        /// Computed CRC.
        computed: u32,
    },
    /// Header fields out of range or reserved bytes set.
    #[error("mailbox copy header invalid: {0}")]
    BadHeader(&'static str),
    /// The block is in the wrong place (owner or copy index do not match where it was read).
    #[error("mailbox copy belongs to node {owner} copy {copy}, but was read from node {expected_owner}'s copy {expected_copy}")]
    Misplaced {
        /// Owner byte in the block.
        owner: u8,
        /// Copy byte in the block.
        copy: u8,
        /// Owner of the slot read.
        expected_owner: u8,
        /// Copy index read.
        expected_copy: u8,
    },
    /// The embedded status record is invalid (including another protocol version).
    #[error("mailbox copy holds an invalid status record: {0}")]
    Status(#[from] StatusError),
    /// Neither copy of the slot yields a record.
    #[error("mailbox slot of {owner} unreadable: copy 0: {copy0}; copy 1: {copy1}")]
    SlotUnreadable {
        /// The slot's owner.
        owner: NodeId,
        /// Why copy 0 failed.
        copy0: Box<MailboxError>,
        /// Why copy 1 failed.
        copy1: Box<MailboxError>,
    },
}

/// Offset of `node`'s slot from the start of the mailbox area.
pub fn slot_offset(node: NodeId) -> u64 {
    (node.get() as u64) * SLOT_BYTES as u64
}

/// Which copy a record goes to: its sequence modulo 2.
pub fn copy_for(record: &StatusRecord) -> u8 {
    (record.stamp.sequence % COPIES_PER_SLOT as u64) as u8
}

/// Offset, from the start of the mailbox area, of the copy block `record` is written to.
pub fn copy_offset_for(record: &StatusRecord) -> u64 {
    slot_offset(record.node_id) + u64::from(copy_for(record)) * COPY_BYTES as u64
}

/// The 4 KiB block to write at [`copy_offset_for`] for `record` (in the sender's own slot).
pub fn encode_copy(record: &StatusRecord) -> [u8; COPY_BYTES] {
    let mut b = [0u8; COPY_BYTES];
    let rec = record.encode();
    b[0..4].copy_from_slice(&MAGIC);
    b[4..6].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
    b[6] = record.node_id.get();
    b[7] = copy_for(record);
    b[8..10].copy_from_slice(&(rec.len() as u16).to_le_bytes());
    b[HEADER_BYTES..HEADER_BYTES + rec.len()].copy_from_slice(&rec);
    let crc = crc32c::crc32c(&b[..CRC_AT]);
    b[CRC_AT..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes one copy block read from `owner`'s slot, copy `copy`. Never panics.
pub fn decode_copy(block: &[u8], owner: NodeId, copy: u8) -> Result<StatusRecord, MailboxError> {
    if block.len() != COPY_BYTES {
        return Err(MailboxError::WrongSize {
            len: block.len(),
            expected: COPY_BYTES,
        });
    }
    if block.iter().all(|&b| b == 0) {
        return Err(MailboxError::Empty);
    }
    let magic = [block[0], block[1], block[2], block[3]];
    if magic != MAGIC {
        return Err(MailboxError::BadMagic { found: magic });
    }
    let version = u16::from_le_bytes([block[4], block[5]]);
    if version != FORMAT_VERSION {
        return Err(MailboxError::UnknownFormat(version));
    }
    let stored = u32::from_le_bytes([
        block[CRC_AT],
        block[CRC_AT + 1],
        block[CRC_AT + 2],
        block[CRC_AT + 3],
    ]);
    let computed = crc32c::crc32c(&block[..CRC_AT]);
    if stored != computed {
        return Err(MailboxError::BadCrc { stored, computed });
    }
    if block[6] != owner.get() || block[7] != copy {
        return Err(MailboxError::Misplaced {
            owner: block[6],
            copy: block[7],
            expected_owner: owner.get(),
            expected_copy: copy,
        });
    }
    let len = u16::from_le_bytes([block[8], block[9]]) as usize;
    if !(status::MIN_FRAME_BYTES..=CRC_AT - HEADER_BYTES).contains(&len) {
        return Err(MailboxError::BadHeader("record length out of range"));
    }
    if block[10..HEADER_BYTES].iter().any(|&b| b != 0) {
        return Err(MailboxError::BadHeader("reserved bytes not zero"));
    }
    if block[HEADER_BYTES + len..CRC_AT].iter().any(|&b| b != 0) {
        return Err(MailboxError::BadHeader("padding after the record not zero"));
    }
    let record = status::decode(&block[HEADER_BYTES..HEADER_BYTES + len])?;
    if record.node_id != owner {
        return Err(MailboxError::Misplaced {
            owner: record.node_id.get(),
            copy,
            expected_owner: owner.get(),
            expected_copy: copy,
        });
    }
    Ok(record)
}

/// Decodes `owner`'s whole slot ([`SLOT_BYTES`], both copies) and returns the newest valid record.
/// One bad copy is tolerated (a torn write); two are an error. Two empty copies are
/// [`MailboxError::Empty`]: the partner never wrote its slot, the read itself worked. A copy of another protocol version
/// makes the result that version-mismatch error when the other copy is not newer and valid, so the
/// caller still learns its partner is alive.
pub fn decode_slot(slot: &[u8], owner: NodeId) -> Result<StatusRecord, MailboxError> {
    if slot.len() != SLOT_BYTES {
        return Err(MailboxError::WrongSize {
            len: slot.len(),
            expected: SLOT_BYTES,
        });
    }
    let c0 = decode_copy(&slot[..COPY_BYTES], owner, 0);
    let c1 = decode_copy(&slot[COPY_BYTES..], owner, 1);
    match (c0, c1) {
        (Ok(a), Ok(b)) => Ok(if b.stamp > a.stamp { b } else { a }),
        (Ok(a), Err(_)) | (Err(_), Ok(a)) => Ok(a),
        (Err(MailboxError::Empty), Err(MailboxError::Empty)) => Err(MailboxError::Empty),
        (Err(e @ MailboxError::Status(StatusError::VersionMismatch(_))), Err(_))
        | (Err(_), Err(e @ MailboxError::Status(StatusError::VersionMismatch(_)))) => Err(e),
        (Err(a), Err(b)) => Err(MailboxError::SlotUnreadable {
            owner,
            copy0: Box::new(a),
            copy1: Box::new(b),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{Stamp, StatusFlags, WireState};

    fn rec(node: NodeId, s: u64) -> StatusRecord {
        StatusRecord {
            pair_id: [3; 16],
            node_id: node,
            state: WireState::Normal,
            flags: StatusFlags::MIRROR_IN_SYNC,
            stamp: Stamp {
                generation: 4,
                sequence: s,
            },
            partner_seen: Stamp::default(),
            lease_ms: 400,
            interval_ms: 100,
            blockers: 0,
        }
    }

    fn write(area: &mut [u8], r: &StatusRecord) {
        let at = copy_offset_for(r) as usize;
        area[at..at + COPY_BYTES].copy_from_slice(&encode_copy(r));
    }

    #[test]
    fn slots_do_not_overlap_and_fit_the_area() {
        assert_eq!(slot_offset(NodeId::ZERO), 0);
        assert_eq!(slot_offset(NodeId::ONE), SLOT_BYTES as u64);
        assert_eq!(slot_offset(NodeId::ONE) as usize + SLOT_BYTES, AREA_BYTES);
        assert_eq!(AREA_BYTES % AREA_ALIGN_BYTES, 0);
    }

    #[test]
    fn newest_copy_wins() {
        let mut area = vec![0u8; AREA_BYTES];
        write(&mut area, &rec(NodeId::ONE, 7));
        write(&mut area, &rec(NodeId::ONE, 8));
        let slot = &area[SLOT_BYTES..];
        assert_eq!(
            decode_slot(slot, NodeId::ONE).map(|r| r.stamp.sequence),
            Ok(8)
        );
    }

    #[test]
    fn torn_copy_falls_back_to_the_previous_record() {
        let mut area = vec![0u8; AREA_BYTES];
        write(&mut area, &rec(NodeId::ZERO, 7));
        write(&mut area, &rec(NodeId::ZERO, 8));
        // Tear copy 0 (sequence 8): its second half still holds zeros of an older write.
        area[2048] ^= 0xff;
        assert_eq!(
            decode_slot(&area[..SLOT_BYTES], NodeId::ZERO).map(|r| r.stamp.sequence),
            Ok(7)
        );
    }

    #[test]
    fn garbage_slot_is_an_error_not_a_record() {
        let area: Vec<u8> = (0..SLOT_BYTES).map(|i| (i * 31 % 251) as u8).collect();
        assert!(matches!(
            decode_slot(&area, NodeId::ONE),
            Err(MailboxError::SlotUnreadable { .. })
        ));
        assert_eq!(
            decode_slot(&vec![0u8; SLOT_BYTES], NodeId::ONE),
            Err(MailboxError::Empty)
        );
    }

    #[test]
    fn a_record_in_the_wrong_slot_is_refused() {
        let block = encode_copy(&rec(NodeId::ZERO, 2));
        assert!(matches!(
            decode_copy(&block, NodeId::ONE, 0),
            Err(MailboxError::Misplaced { .. })
        ));
    }
}
