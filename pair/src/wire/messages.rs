//! The frames exchanged after the handshake, their bodies and their checks.
//!
//! All integers little endian. Bodies (see `docs/FORMATS.md`, "Interconnect"):
//!
//! | kind | body |
//! | --- | --- |
//! | RECORD, FETCH_RECORD | volume u64, log_offset u64, seq u64, record bytes (64..=MAX_RECORD_BYTES, a multiple of 64) |
//! | ACK | volume u64, seq u64: every record of the volume's current stream with a seq ≤ this is stored and persisted (cumulative) |
//! | LOG_RESET | volume u64, generation u64, tail_offset u64, tail_seq u64 |
//! | STATUS | opaque status record (1..=MAX_STATUS_BYTES), defined by `crate::status` |
//! | RESYNC_BEGIN | volume u64, first_seq u64, last_seq u64 (the records the resync sends) |
//! | RESYNC_END | volume u64, last_seq u64 |
//! | FETCH_REQUEST | volume u64, from_seq u64: the owner asks for the partner's copy of its log |
//! | FETCH_BEGIN | volume u64, store_id [16], generation u64, tail_offset u64, tail_seq u64, last_seq u64: what the copy holds (store all zero: no copy); its records follow as FETCH_RECORDs, tail_seq..=last_seq |
//!
//! Decoding checks sizes and bounds only; what a value means for the receiver's state (order,
//! known volume, generation) is checked by the receiver.

use super::frame::FrameKind;
use super::session::{FrameWriter, Plain};
use super::{get_u64, WireError, MAX_RECORD_BYTES, MAX_STATUS_BYTES};

/// Records are stored at cache-line granularity, like the journal lays them out.
const RECORD_ALIGN_BYTES: usize = 64;
/// Bytes of the fixed fields before a RECORD's record bytes.
pub const RECORD_FIELDS_BYTES: usize = 24;

/// One journal record, shipped from its owner to the partner (or back, for FETCH_RECORD).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordFrame {
    pub volume: u64,
    pub log_offset: u64,
    pub seq: u64,
    pub record: Vec<u8>,
}

/// A RECORD frame's body read in place: the record bytes stay in the receive buffer (the
/// receiver copies them once, into its NVRAM mapping, instead of into a [`RecordFrame`] first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordRef<'a> {
    pub volume: u64,
    pub log_offset: u64,
    pub seq: u64,
    pub record: &'a [u8],
}

impl<'a> RecordRef<'a> {
    /// Decodes a RECORD body with the same checks as [`Message::decode`].
    pub fn decode(body: &'a [u8]) -> Result<RecordRef<'a>, WireError> {
        RecordRef::decode_as("RECORD", body)
    }

    fn decode_as(what: &'static str, body: &'a [u8]) -> Result<RecordRef<'a>, WireError> {
        if body.len() < RECORD_FIELDS_BYTES {
            return Err(malformed(what, "shorter than its fixed fields"));
        }
        check_record_bytes(what, body.len() - RECORD_FIELDS_BYTES)?;
        let log_offset = get_u64(body, 8);
        if !log_offset.is_multiple_of(RECORD_ALIGN_BYTES as u64) {
            return Err(malformed(
                what,
                format!("log offset {log_offset} is unaligned"),
            ));
        }
        Ok(RecordRef {
            volume: get_u64(body, 0),
            log_offset,
            seq: get_u64(body, 16),
            record: &body[RECORD_FIELDS_BYTES..],
        })
    }
}

/// The owner's log (re)started: the partner's copy restarts at this tail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogReset {
    pub volume: u64,
    pub generation: u64,
    pub tail_offset: u64,
    pub tail_seq: u64,
}

/// The header of a fetched copy (NVRAM-loss recovery): the partner's copy of the asking node's
/// log is bound to `store_id`, its live part starts at `tail_offset` with `tail_seq`, and it
/// holds every seq up to `last_seq`, all in `generation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchBegin {
    pub volume: u64,
    pub store_id: [u8; 16],
    pub generation: u64,
    pub tail_offset: u64,
    pub tail_seq: u64,
    pub last_seq: u64,
}

/// Bytes of a FETCH_BEGIN body.
const FETCH_BEGIN_BYTES: usize = 56;

/// A decoded post-handshake frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Record(RecordFrame),
    Ack {
        volume: u64,
        seq: u64,
    },
    LogReset(LogReset),
    Status(Vec<u8>),
    ResyncBegin {
        volume: u64,
        first_seq: u64,
        last_seq: u64,
    },
    ResyncEnd {
        volume: u64,
        last_seq: u64,
    },
    FetchRequest {
        volume: u64,
        from_seq: u64,
    },
    FetchRecord(RecordFrame),
    FetchBegin(FetchBegin),
}

fn malformed(what: &'static str, detail: impl Into<String>) -> WireError {
    WireError::Malformed {
        what,
        detail: detail.into(),
    }
}

fn exact(what: &'static str, body: &[u8], n: usize) -> Result<(), WireError> {
    if body.len() != n {
        return Err(malformed(
            what,
            format!("body is {} bytes, expected {n}", body.len()),
        ));
    }
    Ok(())
}

fn check_record_bytes(what: &'static str, n: usize) -> Result<(), WireError> {
    if !(RECORD_ALIGN_BYTES..=MAX_RECORD_BYTES).contains(&n)
        || !n.is_multiple_of(RECORD_ALIGN_BYTES)
    {
        return Err(malformed(
            what,
            format!("record of {n} bytes (must be 64..={MAX_RECORD_BYTES} and a multiple of 64)"),
        ));
    }
    Ok(())
}

/// Appends an unsealed RECORD frame for `record` (copied once, into `out`).
pub fn encode_record(out: &mut Vec<u8>, volume: u64, log_offset: u64, seq: u64, record: &[u8]) {
    let f = record_fields(volume, log_offset, seq);
    Plain.frame(out, FrameKind::Record, &[&f, record]);
}

/// The fixed fields in front of a RECORD's record bytes.
fn record_fields(volume: u64, log_offset: u64, seq: u64) -> [u8; RECORD_FIELDS_BYTES] {
    let mut f = [0u8; RECORD_FIELDS_BYTES];
    f[..8].copy_from_slice(&volume.to_le_bytes());
    f[8..16].copy_from_slice(&log_offset.to_le_bytes());
    f[16..].copy_from_slice(&seq.to_le_bytes());
    f
}

/// Appends a RECORD frame's head (header, tag when sealed, and the fixed fields) to `out`; the
/// record bytes themselves must follow it on the wire. The sender hands them to the kernel from
/// the journal's copy instead of copying them into a send buffer.
pub fn encode_record_head<W: FrameWriter>(
    w: &mut W,
    out: &mut Vec<u8>,
    volume: u64,
    log_offset: u64,
    seq: u64,
    record: &[u8],
) {
    let f = record_fields(volume, log_offset, seq);
    w.frame_head(out, FrameKind::Record, &[&f, record]);
    out.extend_from_slice(&f);
}

fn words(vals: &[u64]) -> Vec<u8> {
    vals.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Message {
    /// The frame kind this message travels as (for error messages about unexpected frames).
    pub fn kind(&self) -> FrameKind {
        match self {
            Message::Record(_) => FrameKind::Record,
            Message::Ack { .. } => FrameKind::Ack,
            Message::LogReset(_) => FrameKind::LogReset,
            Message::Status(_) => FrameKind::Status,
            Message::ResyncBegin { .. } => FrameKind::ResyncBegin,
            Message::ResyncEnd { .. } => FrameKind::ResyncEnd,
            Message::FetchRequest { .. } => FrameKind::FetchRequest,
            Message::FetchRecord(_) => FrameKind::FetchRecord,
            Message::FetchBegin(_) => FrameKind::FetchBegin,
        }
    }

    /// Appends this message as one unsealed frame to `out` (tests, tools).
    pub fn encode(&self, out: &mut Vec<u8>) {
        self.encode_with(&mut Plain, out);
    }

    /// Appends this message as one frame to `out`, sealed by `w` after the handshake.
    pub fn encode_with<W: FrameWriter>(&self, w: &mut W, out: &mut Vec<u8>) {
        let mut encode_frame = |out: &mut Vec<u8>, kind, parts: &[&[u8]]| w.frame(out, kind, parts);
        match self {
            Message::Record(r) | Message::FetchRecord(r) => {
                let f = record_fields(r.volume, r.log_offset, r.seq);
                encode_frame(out, self.kind(), &[&f, &r.record])
            }
            Message::Ack { volume, seq } => {
                encode_frame(out, FrameKind::Ack, &[&words(&[*volume, *seq])])
            }
            Message::LogReset(r) => encode_frame(
                out,
                FrameKind::LogReset,
                &[&words(&[r.volume, r.generation, r.tail_offset, r.tail_seq])],
            ),
            Message::Status(s) => encode_frame(out, FrameKind::Status, &[s]),
            Message::ResyncBegin {
                volume,
                first_seq,
                last_seq,
            } => encode_frame(
                out,
                FrameKind::ResyncBegin,
                &[&words(&[*volume, *first_seq, *last_seq])],
            ),
            Message::ResyncEnd { volume, last_seq } => {
                encode_frame(out, FrameKind::ResyncEnd, &[&words(&[*volume, *last_seq])])
            }
            Message::FetchRequest { volume, from_seq } => encode_frame(
                out,
                FrameKind::FetchRequest,
                &[&words(&[*volume, *from_seq])],
            ),
            Message::FetchBegin(b) => encode_frame(
                out,
                FrameKind::FetchBegin,
                &[
                    &b.volume.to_le_bytes(),
                    &b.store_id,
                    &words(&[b.generation, b.tail_offset, b.tail_seq, b.last_seq]),
                ],
            ),
        }
    }

    /// Decodes a post-handshake frame's body; handshake kinds here are `Unexpected`.
    pub fn decode(kind: FrameKind, body: &[u8]) -> Result<Message, WireError> {
        let record = |what| -> Result<RecordFrame, WireError> {
            let r = RecordRef::decode_as(what, body)?;
            Ok(RecordFrame {
                volume: r.volume,
                log_offset: r.log_offset,
                seq: r.seq,
                record: r.record.to_vec(),
            })
        };
        Ok(match kind {
            FrameKind::Record => Message::Record(record("RECORD")?),
            FrameKind::FetchRecord => Message::FetchRecord(record("FETCH_RECORD")?),
            FrameKind::Ack => {
                exact("ACK", body, 16)?;
                Message::Ack {
                    volume: get_u64(body, 0),
                    seq: get_u64(body, 8),
                }
            }
            FrameKind::LogReset => {
                exact("LOG_RESET", body, 32)?;
                let tail_offset = get_u64(body, 16);
                if !tail_offset.is_multiple_of(RECORD_ALIGN_BYTES as u64) {
                    return Err(malformed("LOG_RESET", "tail offset is unaligned"));
                }
                Message::LogReset(LogReset {
                    volume: get_u64(body, 0),
                    generation: get_u64(body, 8),
                    tail_offset,
                    tail_seq: get_u64(body, 24),
                })
            }
            FrameKind::Status => {
                if body.is_empty() || body.len() > MAX_STATUS_BYTES {
                    return Err(malformed(
                        "STATUS",
                        format!("{} bytes (must be 1..={MAX_STATUS_BYTES})", body.len()),
                    ));
                }
                Message::Status(body.to_vec())
            }
            FrameKind::ResyncBegin => {
                exact("RESYNC_BEGIN", body, 24)?;
                let (first_seq, last_seq) = (get_u64(body, 8), get_u64(body, 16));
                if last_seq.saturating_add(1) < first_seq {
                    return Err(malformed("RESYNC_BEGIN", "last seq before first seq"));
                }
                Message::ResyncBegin {
                    volume: get_u64(body, 0),
                    first_seq,
                    last_seq,
                }
            }
            FrameKind::ResyncEnd => {
                exact("RESYNC_END", body, 16)?;
                Message::ResyncEnd {
                    volume: get_u64(body, 0),
                    last_seq: get_u64(body, 8),
                }
            }
            FrameKind::FetchRequest => {
                exact("FETCH_REQUEST", body, 16)?;
                Message::FetchRequest {
                    volume: get_u64(body, 0),
                    from_seq: get_u64(body, 8),
                }
            }
            FrameKind::FetchBegin => {
                exact("FETCH_BEGIN", body, FETCH_BEGIN_BYTES)?;
                let mut store_id = [0u8; 16];
                store_id.copy_from_slice(&body[8..24]);
                let (tail_offset, tail_seq, last_seq) =
                    (get_u64(body, 32), get_u64(body, 40), get_u64(body, 48));
                if !tail_offset.is_multiple_of(RECORD_ALIGN_BYTES as u64) {
                    return Err(malformed("FETCH_BEGIN", "tail offset is unaligned"));
                }
                if last_seq.saturating_add(1) < tail_seq {
                    return Err(malformed("FETCH_BEGIN", "last seq before tail seq"));
                }
                Message::FetchBegin(FetchBegin {
                    volume: get_u64(body, 0),
                    store_id,
                    generation: get_u64(body, 24),
                    tail_offset,
                    tail_seq,
                    last_seq,
                })
            }
            FrameKind::Hello
            | FrameKind::Challenge
            | FrameKind::Auth
            | FrameKind::Accept
            | FrameKind::Reject => {
                return Err(WireError::Unexpected {
                    got: kind,
                    state: "streaming (the handshake is over)",
                })
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::frame::{split_frame, FRAME_HEADER_BYTES};
    use super::*;
    use proptest::prelude::*;

    fn round_trip(m: &Message) -> Message {
        let mut out = Vec::new();
        m.encode(&mut out);
        let f = split_frame(&out).unwrap().unwrap();
        assert_eq!(f.total, out.len());
        Message::decode(f.kind, &out[f.body_start..f.total]).unwrap()
    }

    #[test]
    fn record_ref_decodes_what_message_decode_does() {
        let mut out = Vec::new();
        encode_record(&mut out, 4, 128, 9, &[3u8; 192]);
        let body = &out[FRAME_HEADER_BYTES..];
        let r = RecordRef::decode(body).unwrap();
        match Message::decode(FrameKind::Record, body).unwrap() {
            Message::Record(f) => {
                assert_eq!(
                    (f.volume, f.log_offset, f.seq),
                    (r.volume, r.log_offset, r.seq)
                );
                assert_eq!(f.record, r.record);
            }
            other => panic!("decoded as {:?}", other.kind()),
        }
        // The same refusals as the owned decode: short, unaligned offset, odd record size.
        assert!(RecordRef::decode(&body[..20]).is_err());
        let mut bad = body.to_vec();
        bad[8] = 1;
        assert!(RecordRef::decode(&bad).is_err());
        assert!(RecordRef::decode(&body[..body.len() - 1]).is_err());
    }

    #[test]
    fn every_message_round_trips() {
        let rec = RecordFrame {
            volume: 7,
            log_offset: 128,
            seq: 42,
            record: vec![9; 192],
        };
        let all = [
            Message::Record(rec.clone()),
            Message::FetchRecord(rec.clone()),
            Message::Ack { volume: 7, seq: 42 },
            Message::LogReset(LogReset {
                volume: 7,
                generation: 3,
                tail_offset: 4096,
                tail_seq: 10,
            }),
            Message::Status(vec![1, 2, 3]),
            Message::ResyncBegin {
                volume: 7,
                first_seq: 10,
                last_seq: 42,
            },
            Message::ResyncEnd {
                volume: 7,
                last_seq: 42,
            },
            Message::FetchRequest {
                volume: 7,
                from_seq: 1,
            },
            Message::FetchBegin(FetchBegin {
                volume: 7,
                store_id: [4; 16],
                generation: 3,
                tail_offset: 128,
                tail_seq: 10,
                last_seq: 42,
            }),
        ];
        for m in &all {
            assert_eq!(&round_trip(m), m);
        }
    }

    #[test]
    fn encode_record_matches_the_message_encoding() {
        let mut a = Vec::new();
        encode_record(&mut a, 1, 64, 5, &[3; 64]);
        let mut b = Vec::new();
        Message::Record(RecordFrame {
            volume: 1,
            log_offset: 64,
            seq: 5,
            record: vec![3; 64],
        })
        .encode(&mut b);
        assert_eq!(a, b);
    }

    #[test]
    fn record_sizes_and_alignment_are_checked() {
        let mut body = vec![0u8; RECORD_FIELDS_BYTES + 100];
        assert!(Message::decode(FrameKind::Record, &body).is_err());
        body.truncate(RECORD_FIELDS_BYTES);
        assert!(Message::decode(FrameKind::Record, &body).is_err());
        body.resize(RECORD_FIELDS_BYTES + 64, 0);
        body[8] = 3; // log offset 3: unaligned
        assert!(Message::decode(FrameKind::Record, &body).is_err());
        body[8] = 64;
        assert!(Message::decode(FrameKind::Record, &body).is_ok());
    }

    #[test]
    fn handshake_frames_after_the_handshake_are_unexpected() {
        assert!(matches!(
            Message::decode(FrameKind::Hello, &[0; 80]),
            Err(WireError::Unexpected { .. })
        ));
    }

    proptest! {
        #[test]
        fn garbage_bodies_never_panic(kind in 0u16..40, body in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Some(k) = FrameKind::from_u16(kind) {
                let _ = Message::decode(k, &body);
            }
        }

        #[test]
        fn truncated_bodies_are_errors(cut in 0usize..40) {
            let mut out = Vec::new();
            Message::LogReset(LogReset { volume: 1, generation: 2, tail_offset: 64, tail_seq: 3 }).encode(&mut out);
            let body = &out[12..];
            let cut = cut.min(body.len() - 1);
            prop_assert!(Message::decode(FrameKind::LogReset, &body[..cut]).is_err());
        }
    }
}
