//! The reservation lock file's byte layout (version 1), encoded and decoded without I/O.
//!
//! The file is small and fixed in shape so that a torn or foreign file is recognised, never
//! guessed at: an exact length, a magic, a version, and a CRC32C over everything before it.
//! All integers are little-endian. The layout is documented in `docs/FORMATS.md`
//! ("Reservation lock file"); keep the two in step.
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `TWBRESV\x01` |
//! | 8 | 2 | format version = 1 |
//! | 10 | 1 | reservation type: 0 = none, 5 = write exclusive, registrants only |
//! | 11 | 1 | reserved, 0 |
//! | 12 | 4 | key count n (0 ..= 64) |
//! | 16 | 8 | generation: +1 on every change |
//! | 24 | 8 | holder key, 0 when type is 0 |
//! | 32 | 8 × n | registered keys, ascending, non-zero |
//! | 32 + 8n | 4 | CRC32C of bytes 0 .. 32 + 8n |

use super::{Key, Reservation, ReservationState, ReservationType, MAX_KEYS};
use thiserror::Error;

/// The first 8 bytes of every reservation lock file.
pub const MAGIC: [u8; 8] = *b"TWBRESV\x01";
/// The layout version this code writes and reads.
pub const FORMAT_VERSION: u16 = 1;
/// Bytes before the key list.
pub const HEADER_BYTES: usize = 32;
/// Bytes of the trailing CRC32C.
pub const CRC_BYTES: usize = 4;

/// A decoded lock file: the state and the generation it was written with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Increases by one on every change; 0 for a disk that never had a lock file.
    pub generation: u64,
    pub state: ReservationState,
}

/// Why bytes are not a valid lock file. The file layer adds the path.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FormatError {
    #[error("truncated: {len} bytes, a valid file has {expected}")]
    Truncated { len: usize, expected: usize },
    #[error("{len} bytes where the header says {expected}: trailing bytes")]
    TrailingBytes { len: usize, expected: usize },
    #[error("bad magic: not a twinblock reservation file")]
    BadMagic,
    #[error("format version {found}, this build reads version {FORMAT_VERSION}")]
    UnsupportedVersion { found: u16 },
    #[error("key count {count} exceeds the maximum of {MAX_KEYS}")]
    TooManyKeys { count: u32 },
    #[error("CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc { stored: u32, computed: u32 },
    #[error("unknown reservation type code {code}")]
    UnknownType { code: u8 },
    #[error("inconsistent contents: {0}")]
    Inconsistent(&'static str),
}

/// Encoded length of a file holding `key_count` keys.
pub fn encoded_len(key_count: usize) -> usize {
    HEADER_BYTES + 8 * key_count + CRC_BYTES
}

/// The file bytes for `snap`.
pub fn encode(snap: &Snapshot) -> Vec<u8> {
    let keys = snap.state.keys();
    let mut out = Vec::with_capacity(encoded_len(keys.len()));
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    let (code, holder) = match snap.state.reservation() {
        Some(r) => (r.kind.code(), r.holder),
        None => (0, 0),
    };
    out.push(code);
    out.push(0);
    // Keys are bounded by MAX_KEYS (64), so the count always fits in a u32.
    out.extend_from_slice(&(keys.len() as u32).to_le_bytes());
    out.extend_from_slice(&snap.generation.to_le_bytes());
    out.extend_from_slice(&holder.to_le_bytes());
    for k in keys {
        out.extend_from_slice(&k.to_le_bytes());
    }
    let crc = crc32c::crc32c(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Decode file bytes, checking length, magic, version, CRC and the state invariants.
pub fn decode(bytes: &[u8]) -> Result<Snapshot, FormatError> {
    let min = encoded_len(0);
    if bytes.len() >= MAGIC.len() && bytes[..MAGIC.len()] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    if bytes.len() < min {
        return Err(FormatError::Truncated {
            len: bytes.len(),
            expected: min,
        });
    }
    let version = u16_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(FormatError::UnsupportedVersion { found: version });
    }
    let count = u32_at(bytes, 12);
    if count as usize > MAX_KEYS {
        return Err(FormatError::TooManyKeys { count });
    }
    let expected = encoded_len(count as usize);
    if bytes.len() < expected {
        return Err(FormatError::Truncated {
            len: bytes.len(),
            expected,
        });
    }
    if bytes.len() > expected {
        return Err(FormatError::TrailingBytes {
            len: bytes.len(),
            expected,
        });
    }
    let body = expected - CRC_BYTES;
    let stored = u32_at(bytes, body);
    let computed = crc32c::crc32c(&bytes[..body]);
    if stored != computed {
        return Err(FormatError::BadCrc { stored, computed });
    }
    decode_fields(bytes, count as usize)
}

/// The fields of a length- and CRC-checked file.
fn decode_fields(bytes: &[u8], count: usize) -> Result<Snapshot, FormatError> {
    if bytes[11] != 0 {
        return Err(FormatError::Inconsistent("reserved byte 11 is not 0"));
    }
    let generation = u64_at(bytes, 16);
    let holder: Key = u64_at(bytes, 24);
    let reservation = match bytes[10] {
        0 if holder == 0 => None,
        0 => {
            return Err(FormatError::Inconsistent(
                "holder set but no reservation type",
            ))
        }
        code => {
            let kind = ReservationType::from_code(code).ok_or(FormatError::UnknownType { code })?;
            Some(Reservation { holder, kind })
        }
    };
    let keys = (0..count)
        .map(|i| u64_at(bytes, HEADER_BYTES + 8 * i))
        .collect();
    let state =
        ReservationState::from_parts(keys, reservation).map_err(FormatError::Inconsistent)?;
    Ok(Snapshot { generation, state })
}

/// Best-effort generation of a file that does not decode (for forced recovery, so the
/// rewritten file still moves the generation forward): bytes 16..24 when the file is long
/// enough and has the magic, else 0.
pub fn salvage_generation(bytes: &[u8]) -> u64 {
    if bytes.len() >= HEADER_BYTES && bytes[..MAGIC.len()] == MAGIC {
        u64_at(bytes, 16)
    } else {
        0
    }
}
