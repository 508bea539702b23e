//! Byte layouts of the NVRAM file: file header, region control slots and log records.
//!
//! Everything here is pure: encode into and decode from byte slices, no I/O. All integers are
//! little endian. `docs/FORMATS.md` ("NVRAM journal") documents the same layouts byte by byte;
//! keep the two in step and bump [`FORMAT_VERSION`] on any incompatible change.
//!
//! File:   `[header slot A | header slot B]` (4 KiB) then the own region, then the partner region.
//! Region: `[control slot A | control slot B]` (4 KiB) then the circular log.
//! Header and control slots are written ping-pong (the slot not holding the newest valid copy is
//! overwritten), so a torn update leaves the previous copy readable.

use crate::error::FormatError;

/// Version of the layout described here.
pub const FORMAT_VERSION: u32 = 1;
/// First bytes of each header slot.
pub const HEADER_MAGIC: [u8; 8] = *b"TWBNVRAM";
/// Bytes reserved for the file header (two slots).
pub const HEADER_AREA_BYTES: u64 = 4096;
/// Offset of the second header slot within the header area.
pub const HEADER_SLOT_B_OFFSET: u64 = 2048;
/// Encoded size of one header slot.
pub const HEADER_SLOT_BYTES: usize = 128;
/// Bytes reserved at the start of each region for its two control slots.
pub const CONTROL_AREA_BYTES: u64 = 4096;
/// Offset of the second control slot within the control area (own cache line).
pub const CONTROL_SLOT_B_OFFSET: u64 = 64;
/// Encoded size of one control slot.
pub const CONTROL_SLOT_BYTES: usize = 64;
/// Magic of a control slot ("TBJC").
pub const CONTROL_MAGIC: u32 = u32::from_le_bytes(*b"TBJC");
/// Magic of a record header ("TBJR").
pub const RECORD_MAGIC: u32 = u32::from_le_bytes(*b"TBJR");
/// Records start and end on this alignment (one cache line).
pub const RECORD_ALIGN_BYTES: u64 = 64;
/// Encoded size of a record header.
pub const RECORD_HEADER_BYTES: usize = 64;
/// Byte offset of the CRC field inside a record header.
const RECORD_CRC_OFFSET: usize = 60;
/// Encoded size of a CP record payload.
pub const CP_PAYLOAD_BYTES: usize = 32;
/// Encoded size of one TRANSITION entry.
pub const TRANSITION_ENTRY_BYTES: usize = 24;
/// Largest number of entries in one TRANSITION record.
pub const TRANSITION_MAX_ENTRIES: usize = 64;

fn get_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn get_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn put(b: &mut [u8], at: usize, v: &[u8]) {
    b[at..at + v.len()].copy_from_slice(v);
}

/// Rounds `n` up to the record alignment.
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(RECORD_ALIGN_BYTES) * RECORD_ALIGN_BYTES
}

/// The file header: identity of the file and where its regions are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FileHeader {
    pub version: u32,
    pub node_id: u32,
    /// The HA pair this file belongs to.
    pub pair_id: [u8; 16],
    /// Generation G: increased and persisted at every open.
    pub generation: u64,
    pub own_region_offset: u64,
    /// Size of the own region including its control area.
    pub own_region_bytes: u64,
    pub partner_region_offset: u64,
    pub partner_region_bytes: u64,
    pub file_bytes: u64,
    /// Identity of the own log, random at format time (all zero in files formatted before it
    /// existed: [`crate::nvram::Nvram::open`] assigns one). The array's superblocks record it,
    /// so a start with another log (a lost, blank or foreign file) is recognised.
    #[serde(serialize_with = "serialize_store_id")]
    pub log_id: [u8; 16],
}

impl FileHeader {
    /// A header for a fresh file with two regions of `log_bytes` of log each.
    pub fn new(node_id: u32, pair_id: [u8; 16], log_bytes: u64) -> FileHeader {
        let region_bytes = CONTROL_AREA_BYTES + log_bytes;
        FileHeader {
            version: FORMAT_VERSION,
            node_id,
            pair_id,
            generation: 0,
            own_region_offset: HEADER_AREA_BYTES,
            own_region_bytes: region_bytes,
            partner_region_offset: HEADER_AREA_BYTES + region_bytes,
            partner_region_bytes: region_bytes,
            file_bytes: HEADER_AREA_BYTES + 2 * region_bytes,
            log_id: [0; 16],
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SLOT_BYTES] {
        let mut b = [0u8; HEADER_SLOT_BYTES];
        put(&mut b, 0, &HEADER_MAGIC);
        put(&mut b, 8, &self.version.to_le_bytes());
        put(&mut b, 12, &(HEADER_SLOT_BYTES as u32).to_le_bytes());
        put(&mut b, 16, &self.node_id.to_le_bytes());
        put(&mut b, 20, &0u32.to_le_bytes());
        put(&mut b, 24, &self.pair_id);
        put(&mut b, 40, &self.generation.to_le_bytes());
        put(&mut b, 48, &self.own_region_offset.to_le_bytes());
        put(&mut b, 56, &self.own_region_bytes.to_le_bytes());
        put(&mut b, 64, &self.partner_region_offset.to_le_bytes());
        put(&mut b, 72, &self.partner_region_bytes.to_le_bytes());
        put(&mut b, 80, &(RECORD_ALIGN_BYTES as u32).to_le_bytes());
        put(&mut b, 84, &(CONTROL_AREA_BYTES as u32).to_le_bytes());
        put(&mut b, 88, &self.file_bytes.to_le_bytes());
        put(&mut b, 96, &self.log_id);
        let crc = crc32c::crc32c(&b[..124]);
        put(&mut b, 124, &crc.to_le_bytes());
        b
    }

    /// Decodes one header slot. Checks magic, CRC and version; not the geometry (see
    /// [`FileHeader::check_geometry`]).
    pub fn decode(b: &[u8]) -> Result<FileHeader, FormatError> {
        if b.len() < HEADER_SLOT_BYTES {
            return Err(FormatError::Truncated {
                what: "header slot",
                need: HEADER_SLOT_BYTES as u64,
                have: b.len() as u64,
            });
        }
        if b[..8] != HEADER_MAGIC {
            if b[..8].iter().all(|&x| x == 0) {
                return Err(FormatError::Blank);
            }
            return Err(FormatError::BadMagic {
                what: "header slot",
            });
        }
        let stored = get_u32(b, 124);
        let computed = crc32c::crc32c(&b[..124]);
        if stored != computed {
            return Err(FormatError::BadCrc {
                what: "header slot",
                stored,
                computed,
            });
        }
        let version = get_u32(b, 8);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let mut pair_id = [0u8; 16];
        pair_id.copy_from_slice(&b[24..40]);
        let mut log_id = [0u8; 16];
        log_id.copy_from_slice(&b[96..112]);
        Ok(FileHeader {
            version,
            node_id: get_u32(b, 16),
            pair_id,
            generation: get_u64(b, 40),
            own_region_offset: get_u64(b, 48),
            own_region_bytes: get_u64(b, 56),
            partner_region_offset: get_u64(b, 64),
            partner_region_bytes: get_u64(b, 72),
            file_bytes: get_u64(b, 88),
            log_id,
        })
    }

    /// Checks that the regions are where this version puts them and fit in `actual_file_bytes`.
    pub fn check_geometry(&self, actual_file_bytes: u64) -> Result<(), FormatError> {
        let expected = FileHeader::new(
            self.node_id,
            self.pair_id,
            self.own_region_bytes.saturating_sub(CONTROL_AREA_BYTES),
        );
        let log_bytes = self.own_region_bytes.saturating_sub(CONTROL_AREA_BYTES);
        let sane = self.own_region_bytes > CONTROL_AREA_BYTES
            && log_bytes.is_multiple_of(RECORD_ALIGN_BYTES)
            && self.own_region_offset == expected.own_region_offset
            && self.partner_region_offset == expected.partner_region_offset
            && self.partner_region_bytes == expected.partner_region_bytes
            && self.file_bytes == expected.file_bytes;
        if !sane {
            return Err(FormatError::BadGeometry {
                detail: format!("{self:?}"),
            });
        }
        if actual_file_bytes < self.file_bytes {
            return Err(FormatError::Truncated {
                what: "NVRAM file",
                need: self.file_bytes,
                have: actual_file_bytes,
            });
        }
        Ok(())
    }
}

/// One control slot of a region: where the live part of the circular log starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ControlSlot {
    /// Incremented at each update; the valid slot with the larger counter wins.
    pub counter: u64,
    /// Generation of the records in the live part of the log.
    pub generation: u64,
    /// Offset within the log (not the file) of the oldest live record.
    pub tail_offset: u64,
    /// Seq of the record at `tail_offset`.
    pub tail_seq: u64,
    /// Identity of the store (the RAID array's UUID) the log's records are applied to; all zero
    /// while unbound. A log bound to one store is never replayed into another.
    #[serde(serialize_with = "serialize_store_id")]
    pub store_id: [u8; 16],
}

/// A store id (or log id) as UUID text in JSON (`null` when unbound).
fn serialize_store_id<S: serde::Serializer>(id: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
    if *id == [0; 16] {
        s.serialize_none()
    } else {
        s.serialize_str(&uuid::Uuid::from_bytes(*id).to_string())
    }
}

impl ControlSlot {
    pub fn encode(&self) -> [u8; CONTROL_SLOT_BYTES] {
        let mut b = [0u8; CONTROL_SLOT_BYTES];
        put(&mut b, 0, &CONTROL_MAGIC.to_le_bytes());
        put(&mut b, 4, &FORMAT_VERSION.to_le_bytes());
        put(&mut b, 8, &self.counter.to_le_bytes());
        put(&mut b, 16, &self.generation.to_le_bytes());
        put(&mut b, 24, &self.tail_offset.to_le_bytes());
        put(&mut b, 32, &self.tail_seq.to_le_bytes());
        put(&mut b, 40, &self.store_id);
        let crc = crc32c::crc32c(&b[..60]);
        put(&mut b, 60, &crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<ControlSlot, FormatError> {
        if b.len() < CONTROL_SLOT_BYTES {
            return Err(FormatError::Truncated {
                what: "control slot",
                need: CONTROL_SLOT_BYTES as u64,
                have: b.len() as u64,
            });
        }
        if get_u32(b, 0) != CONTROL_MAGIC {
            if b[..CONTROL_SLOT_BYTES].iter().all(|&x| x == 0) {
                return Err(FormatError::Blank);
            }
            return Err(FormatError::BadMagic {
                what: "control slot",
            });
        }
        let stored = get_u32(b, 60);
        let computed = crc32c::crc32c(&b[..60]);
        if stored != computed {
            return Err(FormatError::BadCrc {
                what: "control slot",
                stored,
                computed,
            });
        }
        let version = get_u32(b, 4);
        if version != FORMAT_VERSION {
            return Err(FormatError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        Ok(ControlSlot {
            counter: get_u64(b, 8),
            generation: get_u64(b, 16),
            tail_offset: get_u64(b, 24),
            tail_seq: get_u64(b, 32),
            store_id: {
                let mut id = [0u8; 16];
                id.copy_from_slice(&b[40..56]);
                id
            },
        })
    }

    /// Picks the newest valid slot of the two encoded slots; `None` when neither is valid.
    pub fn pick(a: &[u8], b: &[u8]) -> Option<(usize, ControlSlot)> {
        match (ControlSlot::decode(a), ControlSlot::decode(b)) {
            (Ok(x), Ok(y)) if y.counter > x.counter => Some((1, y)),
            (Ok(x), _) => Some((0, x)),
            (Err(_), Ok(y)) => Some((1, y)),
            (Err(_), Err(_)) => None,
        }
    }
}

/// What a record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u16)]
pub enum RecordKind {
    /// Data written at `offset`; the payload holds `length` bytes. Its presence = "journaled".
    Write = 1,
    /// `length` bytes at `offset` read as zero; no payload.
    Zero = 2,
    /// `length` bytes at `offset` are discarded; no payload.
    Trim = 3,
    /// Consistency point: everything up to the payload's `applied_seq` is in the backing store.
    Cp = 4,
    /// Batched transitions (mirrored, acknowledged) of earlier records.
    Transition = 5,
    /// Filler up to the end of the log; the next record is at log offset 0.
    Pad = 6,
    /// Partial parity the store persisted before a stripe update (see [`crate::ppl`]); the
    /// payload is the CP's seq then the store's own bytes.
    Ppl = 7,
    /// `length` bytes at `offset` hold their final data in the store as of this record's seq: a
    /// large write that bypassed the log (see `volume::bypass`) wrote them to the store and made
    /// them durable before this record was appended. No payload. Older records over the range
    /// are superseded (recovery never redoes them there); nothing is applied for it.
    Stored = 8,
}

impl RecordKind {
    pub fn from_u16(v: u16) -> Option<RecordKind> {
        Some(match v {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            3 => RecordKind::Trim,
            4 => RecordKind::Cp,
            5 => RecordKind::Transition,
            6 => RecordKind::Pad,
            7 => RecordKind::Ppl,
            8 => RecordKind::Stored,
            _ => return None,
        })
    }

    /// Records that change the volume's contents: recovery redoes them (a STORED record by
    /// trimming older records over its range; its data is already in the store).
    pub fn is_data(self) -> bool {
        matches!(
            self,
            RecordKind::Write | RecordKind::Zero | RecordKind::Trim | RecordKind::Stored
        )
    }
}

/// A decoded record header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub generation: u64,
    pub seq: u64,
    pub volume_id: u64,
    /// Byte offset in the volume (data records), 0 otherwise.
    pub offset: u64,
    /// Bytes of the volume affected (data records); for PAD the bytes it skips (header included).
    pub length: u64,
    /// Bytes of payload that follow the header (before padding to the alignment).
    pub payload_bytes: u32,
}

impl RecordHeader {
    /// Bytes the record occupies in the log, header and padded payload.
    pub fn total_bytes(&self) -> u64 {
        match self.kind {
            RecordKind::Pad => self.length,
            _ => RECORD_HEADER_BYTES as u64 + align_up(u64::from(self.payload_bytes)),
        }
    }

    fn encode_without_crc(&self) -> [u8; RECORD_HEADER_BYTES] {
        let mut b = [0u8; RECORD_HEADER_BYTES];
        put(&mut b, 0, &RECORD_MAGIC.to_le_bytes());
        put(&mut b, 4, &(self.kind as u16).to_le_bytes());
        put(&mut b, 6, &0u16.to_le_bytes());
        put(&mut b, 8, &self.generation.to_le_bytes());
        put(&mut b, 16, &self.seq.to_le_bytes());
        put(&mut b, 24, &self.volume_id.to_le_bytes());
        put(&mut b, 32, &self.offset.to_le_bytes());
        put(&mut b, 40, &self.length.to_le_bytes());
        put(&mut b, 48, &self.payload_bytes.to_le_bytes());
        b
    }

    /// Encodes the header with its CRC32C computed over the header (CRC field zero) and `payload`.
    pub fn encode(&self, payload: &[u8]) -> [u8; RECORD_HEADER_BYTES] {
        debug_assert_eq!(payload.len() as u64, u64::from(self.payload_bytes));
        let mut b = self.encode_without_crc();
        let crc = crc32c::crc32c_append(crc32c::crc32c(&b), payload);
        put(&mut b, RECORD_CRC_OFFSET, &crc.to_le_bytes());
        b
    }

    /// Decodes a header without checking the CRC (which needs the payload: [`RecordHeader::verify_crc`]).
    pub fn decode(b: &[u8]) -> Result<RecordHeader, FormatError> {
        if b.len() < RECORD_HEADER_BYTES {
            return Err(FormatError::Truncated {
                what: "record header",
                need: RECORD_HEADER_BYTES as u64,
                have: b.len() as u64,
            });
        }
        let magic = get_u32(b, 0);
        if magic != RECORD_MAGIC {
            if b[..RECORD_HEADER_BYTES].iter().all(|&x| x == 0) {
                return Err(FormatError::Blank);
            }
            return Err(FormatError::BadMagic { what: "record" });
        }
        let kind_raw = get_u16(b, 4);
        let kind = RecordKind::from_u16(kind_raw).ok_or(FormatError::BadRecordKind(kind_raw))?;
        Ok(RecordHeader {
            kind,
            generation: get_u64(b, 8),
            seq: get_u64(b, 16),
            volume_id: get_u64(b, 24),
            offset: get_u64(b, 32),
            length: get_u64(b, 40),
            payload_bytes: get_u32(b, 48),
        })
    }

    /// Checks the CRC stored in the encoded header `b` against the header and `payload`.
    pub fn verify_crc(b: &[u8], payload: &[u8]) -> Result<(), FormatError> {
        let stored = get_u32(b, RECORD_CRC_OFFSET);
        let mut h = [0u8; RECORD_HEADER_BYTES];
        h.copy_from_slice(&b[..RECORD_HEADER_BYTES]);
        put(&mut h, RECORD_CRC_OFFSET, &[0, 0, 0, 0]);
        let computed = crc32c::crc32c_append(crc32c::crc32c(&h), payload);
        if stored != computed {
            return Err(FormatError::BadCrc {
                what: "record",
                stored,
                computed,
            });
        }
        Ok(())
    }
}

/// Encodes a whole record (header, payload, zero padding) into a new buffer.
pub fn encode_record(header: &RecordHeader, payload: &[u8]) -> Vec<u8> {
    let total = header.total_bytes() as usize;
    let mut out = vec![0u8; total];
    out[..RECORD_HEADER_BYTES].copy_from_slice(&header.encode(payload));
    out[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()].copy_from_slice(payload);
    out
}

/// Payload of a CP record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct CpPayload {
    /// Every data record with seq <= this is in the backing store and durable.
    pub applied_seq: u64,
    /// The log tail after this CP freed space (log offset and seq of the oldest live record).
    pub tail_offset: u64,
    pub tail_seq: u64,
}

impl CpPayload {
    pub fn encode(&self) -> [u8; CP_PAYLOAD_BYTES] {
        let mut b = [0u8; CP_PAYLOAD_BYTES];
        put(&mut b, 0, &self.applied_seq.to_le_bytes());
        put(&mut b, 8, &self.tail_offset.to_le_bytes());
        put(&mut b, 16, &self.tail_seq.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<CpPayload, FormatError> {
        if b.len() != CP_PAYLOAD_BYTES {
            return Err(FormatError::BadPayload {
                what: "CP",
                bytes: b.len() as u64,
            });
        }
        Ok(CpPayload {
            applied_seq: get_u64(b, 0),
            tail_offset: get_u64(b, 8),
            tail_seq: get_u64(b, 16),
        })
    }
}

/// A transaction state recorded by a TRANSITION record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[repr(u32)]
pub enum TransitionState {
    /// The partner holds the records in its partner region.
    Mirrored = 1,
    /// The client got its reply.
    Acknowledged = 2,
}

/// One entry of a TRANSITION record: records `first_seq..=last_seq` reached `state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TransitionEntry {
    pub state: TransitionState,
    pub first_seq: u64,
    pub last_seq: u64,
}

/// Encodes TRANSITION entries (at most [`TRANSITION_MAX_ENTRIES`]).
pub fn encode_transitions(entries: &[TransitionEntry]) -> Vec<u8> {
    debug_assert!(entries.len() <= TRANSITION_MAX_ENTRIES);
    let mut b = vec![0u8; 8 + entries.len() * TRANSITION_ENTRY_BYTES];
    put(&mut b, 0, &(entries.len() as u32).to_le_bytes());
    for (i, e) in entries.iter().enumerate() {
        let at = 8 + i * TRANSITION_ENTRY_BYTES;
        put(&mut b, at, &(e.state as u32).to_le_bytes());
        put(&mut b, at + 8, &e.first_seq.to_le_bytes());
        put(&mut b, at + 16, &e.last_seq.to_le_bytes());
    }
    b
}

/// Decodes a TRANSITION payload.
pub fn decode_transitions(b: &[u8]) -> Result<Vec<TransitionEntry>, FormatError> {
    let bad = || FormatError::BadPayload {
        what: "TRANSITION",
        bytes: b.len() as u64,
    };
    if b.len() < 8 {
        return Err(bad());
    }
    let count = get_u32(b, 0) as usize;
    if count > TRANSITION_MAX_ENTRIES || b.len() != 8 + count * TRANSITION_ENTRY_BYTES {
        return Err(bad());
    }
    (0..count)
        .map(|i| {
            let at = 8 + i * TRANSITION_ENTRY_BYTES;
            let state = match get_u32(b, at) {
                1 => TransitionState::Mirrored,
                2 => TransitionState::Acknowledged,
                _ => return Err(bad()),
            };
            Ok(TransitionEntry {
                state,
                first_seq: get_u64(b, at + 8),
                last_seq: get_u64(b, at + 16),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = RecordKind> {
        prop_oneof![
            Just(RecordKind::Write),
            Just(RecordKind::Zero),
            Just(RecordKind::Trim),
            Just(RecordKind::Cp),
            Just(RecordKind::Transition),
            Just(RecordKind::Ppl),
            Just(RecordKind::Stored),
        ]
    }

    proptest! {
        #[test]
        fn record_round_trips(kind in kind_strategy(), generation: u64, seq: u64, volume_id: u64,
                              offset: u64, length: u64,
                              payload in proptest::collection::vec(any::<u8>(), 0..300)) {
            let h = RecordHeader { kind, generation, seq, volume_id, offset, length,
                                   payload_bytes: payload.len() as u32 };
            let bytes = encode_record(&h, &payload);
            prop_assert_eq!(bytes.len() as u64 % RECORD_ALIGN_BYTES, 0);
            let d = RecordHeader::decode(&bytes).unwrap();
            prop_assert_eq!(d, h);
            let p = &bytes[RECORD_HEADER_BYTES..RECORD_HEADER_BYTES + payload.len()];
            prop_assert!(RecordHeader::verify_crc(&bytes, p).is_ok());
            prop_assert_eq!(p, &payload[..]);
        }

        #[test]
        fn header_round_trips(node_id: u32, pair_id: [u8; 16], generation: u64, log_kib in 1u64..1000) {
            let mut h = FileHeader::new(node_id, pair_id, log_kib * 1024);
            h.generation = generation;
            let d = FileHeader::decode(&h.encode()).unwrap();
            prop_assert_eq!(d, h);
            prop_assert!(d.check_geometry(h.file_bytes).is_ok());
        }

        #[test]
        fn transitions_round_trip(raw in proptest::collection::vec((any::<bool>(), any::<u64>(), any::<u64>()), 0..TRANSITION_MAX_ENTRIES)) {
            let entries: Vec<TransitionEntry> = raw.iter().map(|&(m, a, b)| TransitionEntry {
                state: if m { TransitionState::Mirrored } else { TransitionState::Acknowledged },
                first_seq: a, last_seq: b }).collect();
            prop_assert_eq!(decode_transitions(&encode_transitions(&entries)).unwrap(), entries);
        }
    }

    #[test]
    fn header_detects_each_flipped_bit() {
        let h = FileHeader::new(1, [7; 16], 1 << 20).encode();
        for byte in 0..HEADER_SLOT_BYTES {
            let mut c = h;
            c[byte] ^= 0x10;
            assert!(
                FileHeader::decode(&c).is_err(),
                "flip at byte {byte} went unnoticed"
            );
        }
    }

    #[test]
    fn header_with_other_version_is_refused() {
        let mut h = FileHeader::new(1, [7; 16], 1 << 20);
        h.version = 99;
        assert!(matches!(
            FileHeader::decode(&h.encode()),
            Err(FormatError::UnsupportedVersion { found: 99, .. })
        ));
    }

    #[test]
    fn control_pick_prefers_newest_valid_slot() {
        let a = ControlSlot {
            counter: 4,
            generation: 2,
            tail_offset: 128,
            tail_seq: 9,
            store_id: [7; 16],
        };
        let b = ControlSlot { counter: 5, ..a };
        assert_eq!(ControlSlot::pick(&a.encode(), &b.encode()), Some((1, b)));
        let mut torn = b.encode();
        torn[30] ^= 1;
        assert_eq!(ControlSlot::pick(&a.encode(), &torn), Some((0, a)));
        assert_eq!(ControlSlot::pick(&[0; 64], &[0; 64]), None);
    }

    #[test]
    fn cp_payload_round_trips() {
        let p = CpPayload {
            applied_seq: 77,
            tail_offset: 4096,
            tail_seq: 78,
        };
        assert_eq!(CpPayload::decode(&p.encode()).unwrap(), p);
        assert!(CpPayload::decode(&[0; 8]).is_err());
    }
}
