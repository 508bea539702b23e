//! The frame envelope: every message on the interconnect, handshake included, is one frame.
//!
//! ```text
//! offset  size  field
//!   0      4    body_bytes  (u32 LE, at most MAX_FRAME_BODY_BYTES)
//!   4      2    kind        (u16 LE, see FrameKind)
//!   6      2    flags       (u16 LE: 0, or FLAG_MAC = 1 on every frame after the handshake)
//!   8      4    crc32c      (u32 LE, CRC32C of bytes 0..8 followed by the body)
//!  12      -    body
//! ```
//!
//! [`split_frame`] takes the front of a receive buffer and returns the next complete frame or
//! asks for more bytes; it refuses an oversized length as soon as the header is in, so a peer
//! can never make the receiver buffer more than one maximal frame. Sealed frames are found with
//! [`locate_frame`] (the same without the CRC) and checked by their MAC; their CRC is read only
//! when the MAC fails, to tell corruption from tampering.

use super::session::{FLAG_MAC, FRAME_MAC_BYTES};
use super::{get_u16, get_u32, WireError, MAX_RECORD_BYTES};

/// Bytes of the frame header.
pub const FRAME_HEADER_BYTES: usize = 12;
/// Largest frame body: a maximal RECORD (its tag, 24 bytes of fields, the record).
pub const MAX_FRAME_BODY_BYTES: usize = MAX_RECORD_BYTES + 64 + FRAME_MAC_BYTES;

/// What a frame holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    Hello = 1,
    Challenge = 2,
    Auth = 3,
    Accept = 4,
    Reject = 5,
    Record = 16,
    Ack = 17,
    LogReset = 18,
    Status = 19,
    ResyncBegin = 20,
    ResyncEnd = 21,
    /// NVRAM-loss recovery: a node asks for the partner's copy of its own log.
    FetchRequest = 22,
    /// NVRAM-loss recovery: one record of the copy, sent back to its owner.
    FetchRecord = 23,
    /// NVRAM-loss recovery: what the copy holds (store, generation, tail, last seq), sent before
    /// its FETCH_RECORDs.
    FetchBegin = 24,
}

impl FrameKind {
    pub fn from_u16(v: u16) -> Option<FrameKind> {
        Some(match v {
            1 => FrameKind::Hello,
            2 => FrameKind::Challenge,
            3 => FrameKind::Auth,
            4 => FrameKind::Accept,
            5 => FrameKind::Reject,
            16 => FrameKind::Record,
            17 => FrameKind::Ack,
            18 => FrameKind::LogReset,
            19 => FrameKind::Status,
            20 => FrameKind::ResyncBegin,
            21 => FrameKind::ResyncEnd,
            22 => FrameKind::FetchRequest,
            23 => FrameKind::FetchRecord,
            24 => FrameKind::FetchBegin,
            _ => return None,
        })
    }
}

/// The first 8 header bytes (the CRC follows them).
pub(crate) fn frame_header(kind: FrameKind, flags: u16, body_len: usize) -> [u8; 8] {
    let mut h = [0u8; 8];
    h[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    h[6..8].copy_from_slice(&flags.to_le_bytes());
    h
}

/// Appends one frame whose body is the concatenation of `parts` to `out` (the parts are not
/// joined first: a RECORD's record bytes are copied once, straight into the send buffer).
/// Unsealed (flags 0): handshake frames; after the handshake frames are sealed, see
/// [`super::session`].
pub fn encode_frame(out: &mut Vec<u8>, kind: FrameKind, parts: &[&[u8]]) {
    super::session::FrameWriter::frame(&mut super::session::Plain, out, kind, parts);
}

/// One frame found at the front of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameAt {
    pub kind: FrameKind,
    /// 0, or [`FLAG_MAC`] (the body starts with a tag: see [`super::session`]).
    pub flags: u16,
    /// Offset of the body in the buffer.
    pub body_start: usize,
    /// Bytes of the frame (header and body): consume this many.
    pub total: usize,
}

/// Looks at the front of `buf`: `Ok(Some(frame))` when a whole valid frame is there,
/// `Ok(None)` when more bytes are needed, an error when the bytes can never become a valid frame.
pub fn split_frame(buf: &[u8]) -> Result<Option<FrameAt>, WireError> {
    let Some(f) = locate_frame(buf)? else {
        return Ok(None);
    };
    check_frame_crc(buf, &f)?;
    Ok(Some(f))
}

/// [`split_frame`] without the CRC check: the header is checked (length, kind, flags) and the
/// whole frame must be in `buf`, but the body is not read. For sealed frames, whose MAC is
/// checked instead (a stronger check over the same bytes; the CRC is then only read to name a
/// failure, see `FrameOpener::open`): one pass over a 4 KiB record less on the receiving node.
pub fn locate_frame(buf: &[u8]) -> Result<Option<FrameAt>, WireError> {
    if buf.len() < FRAME_HEADER_BYTES {
        return Ok(None);
    }
    let body_bytes = get_u32(buf, 0) as usize;
    if body_bytes > MAX_FRAME_BODY_BYTES {
        return Err(WireError::TooLarge {
            body_bytes: body_bytes as u64,
            max: MAX_FRAME_BODY_BYTES as u64,
        });
    }
    let raw_kind = get_u16(buf, 4);
    let kind = FrameKind::from_u16(raw_kind).ok_or(WireError::UnknownKind(raw_kind))?;
    let flags = get_u16(buf, 6);
    if flags & !FLAG_MAC != 0 {
        return Err(WireError::BadFlags(flags));
    }
    let total = FRAME_HEADER_BYTES + body_bytes;
    if buf.len() < total {
        return Ok(None);
    }
    Ok(Some(FrameAt {
        kind,
        flags,
        body_start: FRAME_HEADER_BYTES,
        total,
    }))
}

/// Checks the CRC of frame `f` (found by [`locate_frame`] at the front of `buf`).
pub fn check_frame_crc(buf: &[u8], f: &FrameAt) -> Result<(), WireError> {
    let stored = get_u32(buf, 8);
    let computed =
        crc32c::crc32c_append(crc32c::crc32c(&buf[..8]), &buf[FRAME_HEADER_BYTES..f.total]);
    if stored != computed {
        return Err(WireError::BadCrc { stored, computed });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_round_trips_and_reports_its_extent() {
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Status, &[b"abc", b"def"]);
        encode_frame(&mut out, FrameKind::Accept, &[]);
        let f = split_frame(&out).unwrap().unwrap();
        assert_eq!(f.kind, FrameKind::Status);
        assert_eq!(&out[f.body_start..f.total], b"abcdef");
        let g = split_frame(&out[f.total..]).unwrap().unwrap();
        assert_eq!(g.kind, FrameKind::Accept);
        assert_eq!(g.total, FRAME_HEADER_BYTES);
    }

    #[test]
    fn truncated_frame_asks_for_more_bytes() {
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Status, &[&[7u8; 100]]);
        for cut in 0..out.len() {
            assert_eq!(split_frame(&out[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn flipped_body_bit_is_a_crc_error() {
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Status, &[&[7u8; 100]]);
        out[50] ^= 4;
        assert!(matches!(split_frame(&out), Err(WireError::BadCrc { .. })));
    }

    #[test]
    fn oversized_length_is_refused_before_the_body_arrives() {
        let mut h = [0u8; FRAME_HEADER_BYTES];
        h[..4].copy_from_slice(&((MAX_FRAME_BODY_BYTES + 1) as u32).to_le_bytes());
        h[4..6].copy_from_slice(&16u16.to_le_bytes());
        assert!(matches!(split_frame(&h), Err(WireError::TooLarge { .. })));
    }

    #[test]
    fn unknown_kind_and_flags_are_refused() {
        let mut out = Vec::new();
        encode_frame(&mut out, FrameKind::Ack, &[&[0u8; 16]]);
        let mut k = out.clone();
        k[4] = 99;
        assert_eq!(split_frame(&k), Err(WireError::UnknownKind(99)));
        let mut f = out.clone();
        f[6] = 2;
        assert_eq!(split_frame(&f), Err(WireError::BadFlags(2)));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = split_frame(&bytes);
        }

        #[test]
        fn any_single_bit_flip_is_detected(body in proptest::collection::vec(any::<u8>(), 0..200), bit in 0usize..10_000) {
            let mut out = Vec::new();
            encode_frame(&mut out, FrameKind::Status, &[&body]);
            let bit = bit % (out.len() * 8);
            out[bit / 8] ^= 1 << (bit % 8);
            // A flip in the length may make the frame look incomplete; otherwise it is refused.
            let r = split_frame(&out);
            prop_assert!(!matches!(r, Ok(Some(f)) if f.total == out.len() && f.kind == FrameKind::Status));
        }
    }
}
