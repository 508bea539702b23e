//! One read of the partner's connection, handled as one batch: every whole frame the read
//! brought is applied (records stored in this node's copies, in seq order), everything stored is
//! persisted as one group, and one cumulative ACK per volume is sealed for the highest seq that
//! batch stored. A partial frame at the end stays in the buffer for the next read.
//!
//! Kept apart from the connection's async loop ([`super::interconnect`]) so that what a read
//! stores and acknowledges can be tested on bytes alone, without sockets. The loop writes the
//! bytes this returns (FETCH replies, then the ACKs, in the order they were sealed) and drops
//! the connection when it returns an error.
//!
//! # A bad frame in the middle of a read
//!
//! The frames before it were checked and stored like any others: they are persisted and
//! acknowledged (cumulative ACK of the good prefix), so the owner need not resend them after it
//! redials; nothing of the bad frame or of any frame after it is stored, and the error drops the
//! connection. When the persist itself fails, nothing of the read is acknowledged.

use std::collections::{BTreeMap, HashSet};

use twinblock_pair::wire::{FrameKind, FrameSealer, Message, RecordRef};

use super::hops::{self, Hop};
use super::interconnect::{FrameBuf, LinkError};
use super::receiver::Receiver;

/// Applies every whole frame buffered in `fb`, persists what they stored and seals the ACKs.
/// `out` gets the bytes to send back (FETCH replies, then one ACK per volume stored to, for the
/// highest seq stored); `touched` (cleared first; kept by the caller to reuse its allocation)
/// ends holding those seqs. An error means: drop the connection once `out` is written.
pub(super) fn apply_read(
    fb: &mut FrameBuf,
    receiver: &Receiver,
    announced: &HashSet<u64>,
    seal: &mut FrameSealer,
    out: &mut Vec<u8>,
    touched: &mut BTreeMap<u64, u64>,
) -> Result<(), LinkError> {
    touched.clear();
    let applied = apply_frames(fb, receiver, announced, seal, out, touched);
    // Everything this read stored is persisted before it is acknowledged.
    if let Err(e) = receiver.persist_pending() {
        touched.clear();
        return Err(applied.err().unwrap_or(e.into()));
    }
    for (volume, seq) in touched.iter() {
        hops::mark(Hop::RxPersisted, *seq);
        Message::Ack {
            volume: *volume,
            seq: *seq,
        }
        .encode_with(seal, out);
    }
    applied
}

/// The frames of one read up to the first bad one (see the module docs).
fn apply_frames(
    fb: &mut FrameBuf,
    receiver: &Receiver,
    announced: &HashSet<u64>,
    seal: &mut FrameSealer,
    out: &mut Vec<u8>,
    touched: &mut BTreeMap<u64, u64>,
) -> Result<(), LinkError> {
    while let Some((k, range)) = fb.next()? {
        if k == FrameKind::Record {
            // The hot path: read in place, copied once into the copy's NVRAM.
            let r = RecordRef::decode(fb.body(range))?;
            hops::mark(Hop::RxFrame, r.seq);
            receiver.apply_record(r, announced, touched)?;
            hops::mark(Hop::RxStored, r.seq);
            continue;
        }
        let msg = Message::decode(k, fb.body(range))?;
        if let Message::FetchRequest { volume, from_seq } = msg {
            // The owner lost its NVRAM and asks for its records back (see `fetch`).
            let reply = receiver.fetch_reply(volume, from_seq, announced, seal)?;
            out.extend_from_slice(&reply);
            continue;
        }
        receiver.apply(msg, announced, touched)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pair::receiver::tests::{announce, receiver, record, reset, VOL};
    use crate::pair::receiver::ReceiveError;
    use twinblock_pair::wire::{FrameOpener, RecordFrame, SessionKeys};

    struct Setup {
        receiver: Receiver,
        announced: HashSet<u64>,
        /// The owner's side: seals what it sends, opens the ACKs.
        owner_seal: FrameSealer,
        owner_open: FrameOpener,
        /// This node's side.
        fb: FrameBuf,
        seal: FrameSealer,
        _dir: tempfile::TempDir,
    }

    fn setup() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let receiver = receiver(dir.path());
        receiver.open_copies(&[announce()]).unwrap();
        let keys = SessionKeys::derive(b"0123456789abcdef", b"hello", b"challenge", b"auth");
        let (owner_seal, owner_open) = keys.dialer();
        let (seal, opener) = keys.acceptor();
        let mut fb = FrameBuf::new();
        fb.opener = Some(opener);
        Setup {
            receiver,
            announced: HashSet::from([VOL]),
            owner_seal,
            owner_open,
            fb,
            seal,
            _dir: dir,
        }
    }

    fn record_frame(seq: u64, corrupt: bool) -> Message {
        let mut record = record(seq, 3, seq as u8);
        if corrupt {
            record[100] ^= 1; // the record's own CRC fails; the frame is sealed over it
        }
        Message::Record(RecordFrame {
            volume: VOL,
            log_offset: (seq - 10) * 128,
            seq,
            record,
        })
    }

    /// What one read did: its result, the bytes to send back, the seqs acknowledged.
    type ReadDone = (Result<(), LinkError>, Vec<u8>, Vec<(u64, u64)>);

    impl Setup {
        fn sealed(&mut self, msgs: &[Message]) -> Vec<u8> {
            let mut out = Vec::new();
            for m in msgs {
                m.encode_with(&mut self.owner_seal, &mut out);
            }
            out
        }

        fn apply(&mut self, bytes: &[u8]) -> ReadDone {
            self.fb.push(bytes);
            let mut out = Vec::new();
            let mut touched = BTreeMap::new();
            let r = apply_read(
                &mut self.fb,
                &self.receiver,
                &self.announced,
                &mut self.seal,
                &mut out,
                &mut touched,
            );
            (r, out, touched.into_iter().collect())
        }

        /// The ACKs in `out`, opened as the owner does.
        fn acks(&mut self, out: &[u8]) -> Vec<(u64, u64)> {
            let mut acks = Vec::new();
            let mut at = 0;
            while let Some(f) = self.owner_open.open(&out[at..]).unwrap() {
                match Message::decode(f.kind, &out[at + f.body_start..at + f.total]).unwrap() {
                    Message::Ack { volume, seq } => acks.push((volume, seq)),
                    other => panic!("not an ACK: {other:?}"),
                }
                at += f.total;
            }
            assert_eq!(at, out.len(), "a partial frame in the reply");
            acks
        }

        fn stored(&self) -> Vec<u64> {
            self.receiver.records_json()["r5"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x["seq"].as_u64().unwrap())
                .collect()
        }

        fn persist_groups(&self) -> u64 {
            self.receiver.status_json()["copies"][0]["persist_groups"]
                .as_u64()
                .unwrap()
        }
    }

    #[test]
    fn read_of_several_frames_and_a_partial_one_stores_the_whole_ones_and_acks_the_highest_once() {
        let mut s = setup();
        let mut msgs = vec![reset()];
        msgs.extend((10..15).map(|seq| record_frame(seq, false)));
        let mut bytes = s.sealed(&msgs);
        let next = s.sealed(&[record_frame(15, false)]);
        let cut = next.len() / 2;
        bytes.extend_from_slice(&next[..cut]);

        let (r, out, touched) = s.apply(&bytes);
        r.unwrap();
        assert_eq!(s.stored(), vec![10, 11, 12, 13, 14]);
        assert_eq!(touched, vec![(VOL, 14)]);
        assert_eq!(s.acks(&out), vec![(VOL, 14)], "one cumulative ACK");
        assert_eq!(s.persist_groups(), 1, "one persist for the whole read");

        // The rest of the partial frame completes it on the next read.
        let (r, out, _) = s.apply(&next[cut..]);
        r.unwrap();
        assert_eq!(s.stored(), vec![10, 11, 12, 13, 14, 15]);
        assert_eq!(s.acks(&out), vec![(VOL, 15)]);
        assert_eq!(s.persist_groups(), 2);
    }

    #[test]
    fn read_holding_only_a_partial_frame_stores_and_acks_nothing() {
        let mut s = setup();
        let first = s.sealed(&[reset()]);
        let (r, _, _) = s.apply(&first);
        r.unwrap();
        let rec = s.sealed(&[record_frame(10, false)]);
        let (r, out, touched) = s.apply(&rec[..rec.len() - 1]);
        r.unwrap();
        assert!(out.is_empty() && touched.is_empty());
        assert!(s.stored().is_empty());
    }

    #[test]
    fn bad_record_mid_read_stores_and_acks_the_good_prefix_only_then_fails() {
        let mut s = setup();
        let bytes = s.sealed(&[
            reset(),
            record_frame(10, false),
            record_frame(11, false),
            record_frame(12, true),
            record_frame(13, false),
        ]);
        let (r, out, _) = s.apply(&bytes);
        assert!(
            matches!(
                r,
                Err(LinkError::Receive(ReceiveError::BadRecord { seq: 12, .. }))
            ),
            "{r:?}"
        );
        assert_eq!(s.stored(), vec![10, 11]);
        assert_eq!(s.acks(&out), vec![(VOL, 11)], "only the good prefix");
        assert_eq!(s.persist_groups(), 1, "the prefix was persisted first");
    }

    #[test]
    fn garbage_after_good_records_drops_the_link_after_acking_them() {
        let mut s = setup();
        let mut bytes = s.sealed(&[reset(), record_frame(10, false)]);
        bytes.extend_from_slice(&[0xEE; 64]);
        let (r, out, _) = s.apply(&bytes);
        assert!(matches!(r, Err(LinkError::Wire(_))), "{r:?}");
        assert_eq!(s.stored(), vec![10]);
        assert_eq!(s.acks(&out), vec![(VOL, 10)]);
    }

    #[test]
    fn gap_in_a_read_stores_nothing_past_it() {
        let mut s = setup();
        let bytes = s.sealed(&[reset(), record_frame(10, false), record_frame(12, false)]);
        let (r, out, _) = s.apply(&bytes);
        assert!(
            matches!(r, Err(LinkError::Receive(ReceiveError::Gap { .. }))),
            "{r:?}"
        );
        assert_eq!(s.stored(), vec![10]);
        assert_eq!(s.acks(&out), vec![(VOL, 10)]);
    }

    #[test]
    fn duplicate_in_a_read_is_stored_once_and_covered_by_the_ack() {
        let mut s = setup();
        let bytes = s.sealed(&[
            reset(),
            record_frame(10, false),
            record_frame(11, false),
            record_frame(10, false),
        ]);
        let (r, out, _) = s.apply(&bytes);
        r.unwrap();
        assert_eq!(s.stored(), vec![10, 11]);
        assert_eq!(s.acks(&out), vec![(VOL, 11)]);
    }
}
