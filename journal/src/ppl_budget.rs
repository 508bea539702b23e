//! The log-space rule that keeps a consistency point from running out of room for the
//! partial-parity (PPL) records of a degraded RAID 5/6 store ([`crate::ppl`]). Pure arithmetic:
//! the volume feeds it the cursor's free bytes and the store's bounds, and asks what an append
//! must leave free and how much a CP may take.
//!
//! Why it is shaped this way: a CP logs the partial parity of the records it applies *before*
//! it frees their space, and those PPL records stay in the circular log until a later CP moves
//! the tail past them. Applying a record can need more PPL bytes than the record itself takes
//! (a 4 KiB write logs a 4 KiB column plus framing; a WRITE_ZEROES record of 64 bytes can log
//! two columns), so a log filled with records and then drained by CPs that each take what a
//! fixed reserve allows loses space with every CP until one cannot log its first record. The
//! rule here does not let that happen:
//!
//! - every data record owes the store's bound for its update (`owed`: the sum over the live,
//!   unapplied data records of the log);
//! - while the store logs partial parity, a data record is appended only if the log keeps
//!   `control + pad + max(one, owed including the new record)` bytes free; while it does not,
//!   `control + pad + one` (`one`: the bound of the largest record, so that the first CP after
//!   the store starts logging can apply at least the oldest record);
//! - TRANSITION records (not needed for recovery of data; they wait for the next CP when they do
//!   not fit) leave what a data record leaves. They once left only `pad + max(one, owed)`: a
//!   TRANSITION could then eat the control reserve, the next CP started with less free than
//!   `control + pad + owed`, and its one-record minimum found no room for the last PPL record;
//!   PPL records leave `control` free (the CP record that retires them must fit); CP records use
//!   anything;
//! - a CP takes the longest prefix of the log whose records' bounds sum to at most
//!   `min(one, free - control - pad)` ([`crate::ppl::cut`]; at least one record).
//!
//! `pad` is one PPL record's worth: a PPL record that does not fit before the end of the log is
//! preceded by a PAD record filling the rest ([`crate::log::LogCursor::place`]), and the PPL
//! records of one CP wrap at most once. Why the rule suffices (checked by the proptest below
//! against the cursor's own arithmetic): at a CP's start `free >= control + pad + owed`; its PPL
//! records take at most the bounds of what it applies plus one PAD; its release gives back the
//! records' own bytes and the bounds they owed leave `owed`; so afterwards `free >= control +
//! pad + owed` again, less the CP and TRANSITION records, which the control reserve is for.

use std::collections::VecDeque;

/// The constants of the rule for one volume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PplBudget {
    /// Bytes every data record leaves for CP, TRANSITION and PAD records.
    pub control_bytes: u64,
    /// The store's PPL bound of the largest record (0: the store never logs partial parity).
    pub one_record_bytes: u64,
    /// The largest single PPL record the store writes (framed), which is also the largest PAD
    /// that can precede one.
    pub pad_bytes: u64,
}

impl PplBudget {
    /// True when the store may log partial parity at all.
    pub fn enabled(&self) -> bool {
        self.one_record_bytes > 0
    }

    /// Free bytes a data record must leave after it is appended. `owed_after`: the PPL bounds
    /// of the live data records, this one included; `active`: the store logs partial parity now.
    pub fn writer_reserve_bytes(&self, owed_after: u64, active: bool) -> u64 {
        if !self.enabled() {
            return self.control_bytes;
        }
        self.control_bytes
            .saturating_add(self.ppl_hold_bytes(owed_after, active))
    }

    /// Free bytes a TRANSITION record must leave: what a data record leaves, so that a CP never
    /// starts with less than the control reserve, one PAD and what the live records owe.
    pub fn transition_reserve_bytes(&self, owed: u64, active: bool) -> u64 {
        if !self.enabled() {
            return 0;
        }
        self.control_bytes
            .saturating_add(self.ppl_hold_bytes(owed, active))
    }

    /// Bytes kept for partial parity beside the control reserve.
    fn ppl_hold_bytes(&self, owed: u64, active: bool) -> u64 {
        let owed = if active {
            owed.max(self.one_record_bytes)
        } else {
            self.one_record_bytes
        };
        self.pad_bytes.saturating_add(owed)
    }

    /// PPL bytes a CP starting with `free_bytes` free may plan for: what is free beyond the
    /// control reserve and the PAD allowance. Any prefix of the log is safe. (Degraded CPs were
    /// once also held to one record's bound, for power-loss seeds that failed with whole-log
    /// CPs; their cause was the test's NVRAM power model keeping a store made after the cut,
    /// see `crate::power`, not the size of the CP.)
    pub fn cp_budget_bytes(&self, free_bytes: u64) -> u64 {
        free_bytes.saturating_sub(self.control_bytes.saturating_add(self.pad_bytes))
    }

    /// Smallest log that holds two of the largest records (`max_record_total_bytes` each) beside
    /// the reserves.
    pub fn min_log_bytes(&self, max_record_total_bytes: u64) -> u64 {
        (2 * max_record_total_bytes)
            .saturating_add(2 * self.control_bytes)
            .saturating_add(self.one_record_bytes)
            .saturating_add(self.pad_bytes)
    }
}

/// The PPL bounds the live data records of a log owe, oldest first.
#[derive(Debug, Default, Clone)]
pub struct Owed {
    records: VecDeque<(u64, u64)>,
    total: u64,
}

impl Owed {
    /// Sum of the bounds of the records not applied yet.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// A data record of seq `seq` owing `bound` bytes was appended (seqs grow).
    pub fn push(&mut self, seq: u64, bound: u64) {
        if bound == 0 {
            return;
        }
        self.records.push_back((seq, bound));
        self.total += bound;
    }

    /// The records up to `seq` and the sum of their bounds (what a CP applying them may log).
    pub fn through(&self, seq: u64) -> (u64, u64) {
        self.records
            .iter()
            .take_while(|(s, _)| *s <= seq)
            .fold((0, 0), |(n, sum), (_, b)| (n + 1, sum + b))
    }

    /// A CP applied every record up to `seq`.
    pub fn retire_through(&mut self, seq: u64) {
        while let Some(&(s, b)) = self.records.front() {
            if s > seq {
                break;
            }
            self.records.pop_front();
            self.total -= b;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{RecordHeader, RecordKind, RECORD_HEADER_BYTES};
    use crate::log::LogCursor;
    use crate::ppl::cut;
    use proptest::prelude::*;

    const CONTROL: u64 = 1024;

    fn budget(one: u64, pad: u64) -> PplBudget {
        PplBudget {
            control_bytes: CONTROL,
            one_record_bytes: one,
            pad_bytes: pad,
        }
    }

    #[test]
    fn a_store_without_parity_keeps_only_the_control_reserve() {
        let b = budget(0, 0);
        assert_eq!(b.writer_reserve_bytes(1 << 30, true), CONTROL);
        assert_eq!(b.transition_reserve_bytes(1 << 30, true), 0);
    }

    #[test]
    fn writers_keep_what_the_live_records_owe_while_the_store_logs() {
        let b = budget(100, 50);
        assert_eq!(b.writer_reserve_bytes(1000, true), CONTROL + 50 + 1000);
        assert_eq!(b.writer_reserve_bytes(10, true), CONTROL + 50 + 100);
        // Not logging: one record's worth, for the first CP after the store starts logging.
        assert_eq!(b.writer_reserve_bytes(1000, false), CONTROL + 50 + 100);
        assert_eq!(b.transition_reserve_bytes(1000, true), CONTROL + 50 + 1000);
        assert_eq!(b.cp_budget_bytes(CONTROL + 50 + 7), 7);
        assert_eq!(b.cp_budget_bytes(10), 0);
        assert_eq!(b.cp_budget_bytes(1 << 20), (1 << 20) - CONTROL - 50);
    }

    #[test]
    fn owed_retires_in_seq_order() {
        let mut o = Owed::default();
        o.push(3, 10);
        o.push(4, 0);
        o.push(7, 5);
        assert_eq!(o.total(), 15);
        assert_eq!(o.through(6), (1, 10));
        assert_eq!(o.through(7), (2, 15));
        o.retire_through(6);
        assert_eq!(o.total(), 5);
        o.retire_through(7);
        assert_eq!(o.total(), 0);
    }

    /// One data record of the simulated workload.
    #[derive(Debug, Clone)]
    struct Rec {
        /// 512-byte blocks of a WRITE; 0: a WRITE_ZEROES record (no payload).
        blocks: u64,
        /// Share of its bound the store's partial parity actually takes.
        ppl_percent: u64,
        /// A FLUSH follows (one TRANSITION record).
        flush_after: bool,
        /// Appended while a CP logs its partial parity.
        during_cp: bool,
    }

    /// Half the records log their whole bound: the extreme the rule must hold for (uniform
    /// shares alone took tens of thousands of cases to find the TRANSITION counterexample).
    fn rec() -> impl Strategy<Value = Rec> {
        (
            0u64..=8,
            prop_oneof![Just(100u64), 0u64..=100],
            any::<bool>(),
            any::<bool>(),
        )
            .prop_map(|(blocks, ppl_percent, flush_after, during_cp)| Rec {
                blocks,
                ppl_percent,
                flush_after,
                during_cp,
            })
    }

    /// Log bytes of one PPL record of the model store: one 4 KiB column and its framing, record
    /// header included (the product's bound counts the header too: `PPL_FRAMING_BYTES`).
    const COLUMN_RECORD: u64 = 4096 + 192;

    /// The model store's bound: every 512 bytes written may log a column; a zeroing two.
    fn bound_of(h: &RecordHeader) -> u64 {
        match h.kind {
            RecordKind::Write => u64::from(h.payload_bytes) / 512 * COLUMN_RECORD,
            RecordKind::Zero => 2 * COLUMN_RECORD,
            _ => 0,
        }
    }

    /// The log as the volume sees it: the cursor's arithmetic and every record's header.
    struct Model {
        c: LogCursor,
        headers: std::collections::HashMap<u64, RecordHeader>,
        ppl_percent: std::collections::HashMap<u64, u64>,
    }

    impl Model {
        /// Appends like `State::append`: a PAD first when the record does not fit before the
        /// end; `None` when it would not leave `reserve` free.
        fn append(&mut self, kind: RecordKind, payload: u64, reserve: u64) -> Option<u64> {
            let bytes = RECORD_HEADER_BYTES as u64 + payload.div_ceil(64) * 64;
            let p = self.c.place(bytes, reserve)?;
            let mut seq = self.c.next_seq;
            let header = |kind, seq, length, payload_bytes| RecordHeader {
                kind,
                generation: 1,
                seq,
                volume_id: 1,
                offset: 0,
                length,
                payload_bytes,
            };
            if let Some(pad) = p.pad_bytes {
                self.headers
                    .insert(self.c.head, header(RecordKind::Pad, seq, pad, 0));
                seq += 1;
            }
            self.headers
                .insert(p.at, header(kind, seq, payload, payload as u32));
            assert_eq!(self.c.commit(p, bytes), seq);
            Some(seq)
        }
    }

    proptest! {
        /// For any workload, log size at or above the minimum, start offset, and store that logs
        /// no more than its bounds: with writers and TRANSITION records admitted by the rule, a
        /// CP planned by the product's cut (`ppl::cut`) under `cp_budget_bytes` finds room for
        /// every PPL record it appends leaving the control reserve, however the records wrap and
        /// however many CPs run while the log stays full.
        #[test]
        fn a_planned_cp_always_has_room_for_its_partial_parity(
            recs in proptest::collection::vec(rec(), 1..150),
            extra_log in 0u64..48 * 1024,
            start in 0u64..(1u64 << 20),
            cp_every in 1usize..40,
        ) {
            let max_record = RECORD_HEADER_BYTES as u64 + 8 * 512;
            let pad = RECORD_HEADER_BYTES as u64 + COLUMN_RECORD.div_ceil(64) * 64;
            let b = budget(8 * COLUMN_RECORD, pad);
            let log_bytes = (b.min_log_bytes(max_record) + extra_log).div_ceil(64) * 64;
            let start = (start % log_bytes) / 64 * 64;
            let mut m = Model {
                c: LogCursor::empty(log_bytes, start, 1),
                headers: Default::default(),
                ppl_percent: Default::default(),
            };
            let mut owed = Owed::default();
            let mut pending: Vec<Rec> = recs.into_iter().rev().collect();
            let mut since_cp = 0usize;
            let mut rounds = 0u32;
            let write = |m: &mut Model, owed: &mut Owed, r: &Rec| -> bool {
                let (kind, payload) = if r.blocks == 0 {
                    (RecordKind::Zero, 0)
                } else {
                    (RecordKind::Write, r.blocks * 512)
                };
                let probe = RecordHeader {
                    kind, generation: 1, seq: 0, volume_id: 1, offset: 0,
                    length: payload, payload_bytes: payload as u32,
                };
                let owes = bound_of(&probe);
                let reserve = b.writer_reserve_bytes(owed.total() + owes, true);
                let Some(seq) = m.append(kind, payload, reserve) else {
                    return false;
                };
                owed.push(seq, owes);
                m.ppl_percent.insert(seq, r.ppl_percent);
                if r.flush_after {
                    // A FLUSH's TRANSITION record, when it fits (else it waits for a CP).
                    let t = b.transition_reserve_bytes(owed.total(), true);
                    let _ = m.append(RecordKind::Transition, 1536, t);
                }
                true
            };
            loop {
                rounds += 1;
                prop_assert!(rounds < 100_000, "no progress");
                if let Some(r) = pending.last().cloned() {
                    if since_cp < cp_every && write(&mut m, &mut owed, &r) {
                        pending.pop();
                        since_cp += 1;
                        continue;
                    }
                } else if owed.total() == 0 {
                    // Every record applied (each owes something in this model).
                    break;
                }
                since_cp = 0;
                // A CP: the product's plan over the headers as they lie in the log.
                let budget_bytes = b.cp_budget_bytes(m.c.free());
                let headers = m.headers.clone();
                let plan = cut(
                    |at| headers.get(&at).copied(),
                    log_bytes,
                    m.c.tail,
                    m.c.used,
                    budget_bytes,
                    bound_of,
                );
                let (cp_seq, head, used) = match plan {
                    Some(p) => (p.cp_seq, p.head, p.used),
                    None => (m.c.next_seq - 1, m.c.head, m.c.used),
                };
                // What it applies: the data records of the plan, each logging its share of its
                // bound in PPL records of one column at most.
                let mut ppl: Vec<u64> = Vec::new();
                let (mut at, mut walked) = (m.c.tail, 0u64);
                while walked < used {
                    let h = headers[&at];
                    if h.kind.is_data() && h.seq <= cp_seq {
                        let mut left = bound_of(&h) * m.ppl_percent[&h.seq] / 100;
                        while left > RECORD_HEADER_BYTES as u64 {
                            let piece = left.min(COLUMN_RECORD);
                            ppl.push(piece);
                            left -= piece;
                        }
                    }
                    walked += h.total_bytes();
                    at = (at + h.total_bytes()) % log_bytes;
                }
                for piece in ppl {
                    // Writers go on meanwhile.
                    if let Some(r) = pending.last().cloned() {
                        if r.during_cp && write(&mut m, &mut owed, &r) {
                            pending.pop();
                        }
                    }
                    prop_assert!(
                        // `piece` is framed log bytes, as the store's bound counts them.
                        m.append(RecordKind::Ppl, piece - RECORD_HEADER_BYTES as u64, CONTROL)
                            .is_some(),
                        "no room for a PPL record of {} bytes: free {}, log {}, owed {}",
                        piece, m.c.free(), log_bytes, owed.total()
                    );
                }
                m.c.release(head, used);
                owed.retire_through(cp_seq);
                let _ = m.append(RecordKind::Cp, 24, 0);
            }
        }
    }
}
