//! Partial-parity (PPL) records: bytes a degraded RAID 5/6 store asks the journal to persist
//! before it updates a stripe, so that after a power cut it can make the interrupted stripe
//! consistent again (the store's side, and what the bytes mean: `twinblock_raid::ppl`).
//!
//! The journal treats the store's bytes as opaque. It frames them as a PPL record (kind 7) whose
//! payload starts with the seq of the consistency point that is applying records when the store
//! asks (`cp_seq`), persists the record like any other, and ships it to the partner. A PPL record
//! is *retired* once that CP's `applied_seq` reached the store: the CP flushed the members
//! before, so every stripe update the record protected is durable. Recovery hands the unretired
//! ones back to the store, oldest first, before anything else touches the store
//! ([`crate::Backing::replay_ppl`]).
//!
//! Space: the records of one CP must fit the log beside the data records the CP applies. A store
//! that may log partial parity reports a bound per update ([`crate::Backing::ppl_bound_bytes`]);
//! [`crate::ppl_budget`] holds the rule that keeps room for them (while the store logs, every
//! data record is appended only with room for its bound), and a CP takes the oldest records
//! whose bounds fit what is free ([`cut`]); the rest wait for the next.

use std::sync::Weak;

use async_trait::async_trait;

use crate::error::{FormatError, JournalError};
use crate::format::{RecordHeader, RecordKind, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES};
use crate::nvram::Region;
use crate::scan::Scan;

/// Bytes of the `cp_seq` field in front of the store's bytes.
pub const PPL_CP_SEQ_BYTES: usize = 8;
/// Log bytes a PPL record takes beyond the store's bytes, at most: header, `cp_seq`, padding.
pub const PPL_FRAMING_BYTES: u64 =
    RECORD_HEADER_BYTES as u64 + PPL_CP_SEQ_BYTES as u64 + RECORD_ALIGN_BYTES;

/// The payload of a PPL record.
pub fn encode_payload(cp_seq: u64, store_bytes: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(PPL_CP_SEQ_BYTES + store_bytes.len());
    b.extend_from_slice(&cp_seq.to_le_bytes());
    b.extend_from_slice(store_bytes);
    b
}

/// Splits a PPL payload into its `cp_seq` and the store's bytes.
pub fn decode_payload(b: &[u8]) -> Result<(u64, &[u8]), FormatError> {
    if b.len() < PPL_CP_SEQ_BYTES {
        return Err(FormatError::BadPayload {
            what: "PPL",
            bytes: b.len() as u64,
        });
    }
    let mut seq = [0u8; 8];
    seq.copy_from_slice(&b[..PPL_CP_SEQ_BYTES]);
    Ok((u64::from_le_bytes(seq), &b[PPL_CP_SEQ_BYTES..]))
}

/// The store's bytes of every unretired PPL record of `scan` (its CP's seq above
/// `applied_seq`), oldest first. The scan checked their CRCs (only WRITE records' are deferred).
pub fn live_payloads(
    region: &Region,
    scan: &Scan,
    applied_seq: u64,
) -> Result<Vec<Vec<u8>>, JournalError> {
    let mut out = Vec::new();
    for r in &scan.records {
        if r.header.kind != RecordKind::Ppl {
            continue;
        }
        let payload = region.log_slice(r.payload_offset(), u64::from(r.header.payload_bytes));
        let (cp_seq, store) = decode_payload(payload).map_err(|e| JournalError::BadPplRecord {
            region: region.name(),
            seq: r.header.seq,
            detail: e.to_string(),
        })?;
        if cp_seq > applied_seq {
            out.push(store.to_vec());
        }
    }
    Ok(out)
}

/// What a store calls to persist partial parity (the volume implements it).
#[async_trait]
pub(crate) trait PplAppend: Send + Sync {
    async fn append_ppl(&self, store_bytes: &[u8]) -> Result<(), JournalError>;
}

/// The handle a store persists its partial parity through ([`crate::Backing::attach_ppl`]).
/// Holds the volume weakly: once the volume is gone, persisting fails (and the store writes
/// nothing).
#[derive(Clone)]
pub struct PplLog {
    pub(crate) target: Weak<dyn PplAppend>,
}

impl std::fmt::Debug for PplLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PplLog")
            .field("open", &(self.target.strong_count() > 0))
            .finish()
    }
}

impl PplLog {
    /// Persists `store_bytes` as a PPL record of the running CP; returns once it is as durable
    /// as any journaled write (and shipped to the partner when a mirror runs).
    pub async fn persist(&self, store_bytes: &[u8]) -> Result<(), JournalError> {
        match self.target.upgrade() {
            Some(t) => t.append_ppl(store_bytes).await,
            None => Err(JournalError::ShutDown),
        }
    }
}

/// Where a CP that must stay within a PPL budget stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cut {
    /// The newest seq the CP applies.
    pub cp_seq: u64,
    /// Log offset of the first record it leaves (the new tail).
    pub head: u64,
    /// Log bytes from the tail to `head`.
    pub used: u64,
}

/// Walks the live log from `tail` (`used` bytes) and finds the longest prefix whose data
/// records' PPL bounds (`bound` per header) sum to at most `budget`; at least one data record is
/// always taken (the writers' reserve guarantees it fits). `None`: the whole log fits. A header
/// that does not decode ends the walk there (it cannot happen in a live log; the caller then
/// applies everything, and a PPL record that does not fit fails its CP safely).
pub fn cut(
    header_at: impl Fn(u64) -> Option<RecordHeader>,
    log_bytes: u64,
    tail: u64,
    used: u64,
    budget: u64,
    bound: impl Fn(&RecordHeader) -> u64,
) -> Option<Cut> {
    let (mut at, mut walked, mut spent, mut took_data) = (tail, 0u64, 0u64, false);
    while walked < used {
        let h = header_at(at)?;
        if h.kind.is_data() {
            let b = bound(&h);
            if took_data && spent.saturating_add(b) > budget {
                return Some(Cut {
                    cp_seq: h.seq - 1,
                    head: at,
                    used: walked,
                });
            }
            spent = spent.saturating_add(b);
            took_data = true;
        }
        let total = h.total_bytes();
        if total == 0 {
            return None;
        }
        walked += total;
        at = (at + total) % log_bytes;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(kind: RecordKind, seq: u64, payload: u32) -> RecordHeader {
        RecordHeader {
            kind,
            generation: 1,
            seq,
            volume_id: 1,
            offset: 0,
            length: u64::from(payload),
            payload_bytes: payload,
        }
    }

    #[test]
    fn payload_round_trips_and_short_payload_is_refused() {
        let b = encode_payload(42, b"store");
        assert_eq!(decode_payload(&b).unwrap(), (42, &b"store"[..]));
        assert!(decode_payload(&b[..7]).is_err());
    }

    #[test]
    fn cut_stops_before_the_record_that_exceeds_the_budget() {
        // Log: W(1) 4K at 0, T(2) at 4160, W(3) 4K at 4288, W(4) at 8448.
        let recs = [
            (0u64, header(RecordKind::Write, 1, 4096)),
            (4160, header(RecordKind::Transition, 2, 16)),
            (4288, header(RecordKind::Write, 3, 4096)),
            (8448, header(RecordKind::Write, 4, 4096)),
        ];
        let at = |o: u64| recs.iter().find(|r| r.0 == o).map(|r| r.1);
        let used = 8448 + 4160;
        let c = cut(at, 1 << 20, 0, used, 9000, |_| 4500).unwrap();
        assert_eq!(
            c,
            Cut {
                cp_seq: 3,
                head: 8448,
                used: 8448
            }
        );
        // A budget below one record still takes the first one.
        let c = cut(at, 1 << 20, 0, used, 10, |_| 4500).unwrap();
        assert_eq!((c.cp_seq, c.head), (2, 4288));
        assert_eq!(cut(at, 1 << 20, 0, used, 1 << 20, |_| 4500), None);
    }
}
