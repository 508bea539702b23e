//! Model tests: every level against a plain in-memory byte vector under random reads, writes,
//! member failures (up to the level's tolerance), rebuilds, returns with bitmap resync and
//! re-assemblies. Reads must always equal the model; after everything is repaired every member's
//! data area must equal a fresh encode of the model.

use bytes::Bytes;
use proptest::prelude::*;
use std::sync::Arc;
use twinblock_io::mem::MemMember;
use twinblock_io::Member;
use twinblock_raid::layout::{encode_members, Level};
use twinblock_raid::superblock::DATA_OFFSET_BYTES;
use twinblock_raid::{Array, MemberState};

const CHUNK_BYTES: u64 = 4096;
const ROWS: u64 = 8;

#[derive(Debug, Clone, Copy)]
enum Fault {
    Vanish,
    Reads,
    Writes,
    Operator,
}

#[derive(Debug, Clone)]
enum Op {
    Write {
        at: u64,
        len: u64,
        seed: u8,
    },
    Read {
        at: u64,
        len: u64,
    },
    /// Several writes handed over at once (`write_scattered`), as a journal flush does; clustered
    /// around `base` so that several land in one row.
    Scatter {
        base: u64,
        writes: Vec<(u64, u64, u8)>,
    },
    /// Make a member fail: by injected I/O errors or by the operator.
    Fail {
        slot: usize,
        how: Fault,
    },
    /// Replace a failed member by a blank one and rebuild.
    Replace {
        slot: usize,
    },
    /// Let a failed member come back (bitmap resync).
    Return {
        slot: usize,
    },
    Flush,
    Reassemble,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u64>(), 1u64..3 * 4 * CHUNK_BYTES, any::<u8>()).prop_map(|(at, len, seed)| Op::Write { at, len, seed }),
        3 => (any::<u64>(), 1u64..3 * 4 * CHUNK_BYTES).prop_map(|(at, len)| Op::Read { at, len }),
        3 => (any::<u64>(), proptest::collection::vec((0u64..8 * CHUNK_BYTES, 1u64..3 * 4096, any::<u8>()), 1..10))
            .prop_map(|(base, writes)| Op::Scatter { base, writes }),
        1 => (0usize..8, prop_oneof![Just(Fault::Vanish), Just(Fault::Reads), Just(Fault::Writes), Just(Fault::Operator)])
            .prop_map(|(slot, how)| Op::Fail { slot, how }),
        1 => (0usize..8).prop_map(|slot| Op::Replace { slot }),
        1 => (0usize..8).prop_map(|slot| Op::Return { slot }),
        1 => Just(Op::Flush),
        1 => Just(Op::Reassemble),
    ]
}

struct Harness {
    members: Vec<Arc<MemMember>>,
    array: Array,
    model: Vec<u8>,
    /// Slots whose device is failed (vanished or failed by the operator) and not yet repaired.
    down: Vec<bool>,
    fresh_names: usize,
    member_bytes: u64,
}

fn dynv(v: &[Arc<MemMember>]) -> Vec<Arc<dyn Member>> {
    v.iter().map(|m| m.clone() as Arc<dyn Member>).collect()
}

impl Harness {
    async fn new(level: Level, n: usize, chunk_bytes: u64) -> Harness {
        let member_bytes = DATA_OFFSET_BYTES + ROWS * chunk_bytes;
        let members: Vec<Arc<MemMember>> = (0..n)
            .map(|i| Arc::new(MemMember::new(format!("m{i}"), member_bytes)))
            .collect();
        let array = Array::create("model", level, chunk_bytes, dynv(&members), vec![])
            .await
            .unwrap();
        let model = vec![0u8; array.size() as usize];
        Harness {
            members,
            array,
            model,
            down: vec![false; n],
            fresh_names: 0,
            member_bytes,
        }
    }

    async fn check_read(&self, at: u64, len: u64) {
        let got = self.array.read(at, len as usize).await.unwrap();
        assert!(
            got[..] == self.model[at as usize..(at + len) as usize],
            "read at {at} len {len} differs from the model"
        );
    }

    async fn apply(&mut self, op: Op) {
        let size = self.model.len() as u64;
        let n = self.members.len();
        let geo = self.array.geometry();
        match op {
            Op::Write { at, len, seed } => {
                let at = at % size;
                let len = len.min(size - at);
                let data: Vec<u8> = (0..len)
                    .map(|i| seed.wrapping_add((i * 7 + i / 251) as u8))
                    .collect();
                self.array
                    .write(at, Bytes::from(data.clone()))
                    .await
                    .unwrap();
                self.model[at as usize..(at + len) as usize].copy_from_slice(&data);
            }
            Op::Scatter { base, writes } => {
                let base = base % size;
                let mut taken: Vec<(u64, u64)> = Vec::new();
                let mut batch = Vec::new();
                for (off, len, seed) in writes {
                    let at = (base + off) % size;
                    let len = len.min(size - at);
                    if taken.iter().any(|&(a, l)| a < at + len && at < a + l) {
                        continue;
                    }
                    taken.push((at, len));
                    let data: Vec<u8> = (0..len)
                        .map(|i| seed.wrapping_add((i * 13 + i / 241) as u8))
                        .collect();
                    self.model[at as usize..(at + len) as usize].copy_from_slice(&data);
                    batch.push((at, Bytes::from(data)));
                }
                self.array.write_scattered(batch).await.unwrap();
            }
            Op::Read { at, len } => {
                let at = at % size;
                self.check_read(at, len.min(size - at)).await;
            }
            Op::Fail { slot, how } => {
                let slot = slot % n;
                let mut down = self.down.clone();
                down[slot] = true;
                if self.down[slot] || !geo.survives(&down) {
                    return;
                }
                self.down[slot] = true;
                match how {
                    Fault::Vanish => self.members[slot].vanish(),
                    Fault::Reads => self.members[slot].fail_reads(true),
                    Fault::Writes => self.members[slot].fail_writes(true),
                    Fault::Operator => self.array.fail_member(slot).await.unwrap(),
                }
            }
            Op::Replace { slot } => {
                let slot = slot % n;
                if !self.down[slot] {
                    return;
                }
                self.fresh_names += 1;
                let fresh = Arc::new(MemMember::new(
                    format!("fresh{}", self.fresh_names),
                    self.member_bytes,
                ));
                let st = self
                    .array
                    .replace_member(slot, fresh.clone())
                    .await
                    .unwrap();
                assert_eq!(st.slot, Some(slot));
                self.array.wait_rebuild().await;
                self.members[slot] = fresh;
                self.down[slot] = false;
            }
            Op::Return { slot } => {
                let slot = slot % n;
                if !self.down[slot] {
                    return;
                }
                self.array.fail_member(slot).await.unwrap();
                self.array.remove_member(slot).await.unwrap();
                self.members[slot].reappear();
                self.members[slot].fail_reads(false);
                self.members[slot].fail_writes(false);
                let back = self.members[slot].clone();
                let st = self.array.add_member(back.clone()).await.unwrap();
                self.array.wait_rebuild().await;
                match st.slot {
                    Some(s) if s == slot => self.down[slot] = false,
                    Some(s) => {
                        // It was failed during its own rebuild, so it came back as a blank
                        // device and filled the first empty slot instead.
                        self.members[s] = back;
                        self.down[s] = false;
                        let ghost = Arc::new(MemMember::new("ghost", self.member_bytes));
                        ghost.vanish();
                        self.members[slot] = ghost;
                    }
                    None => panic!("member came back as a spare while slot {slot} was empty"),
                }
            }
            Op::Flush => self.array.flush().await.unwrap(),
            Op::Reassemble => {
                self.array.close().await.unwrap();
                let present: Vec<Arc<MemMember>> = self
                    .members
                    .iter()
                    .zip(&self.down)
                    .filter(|(_, d)| !**d)
                    .map(|(m, _)| m.clone())
                    .collect();
                self.array = Array::assemble(dynv(&present)).await.unwrap();
            }
        }
    }

    /// Repairs every down slot, then checks reads and member contents against a fresh encode.
    async fn finish(&mut self) {
        for slot in 0..self.members.len() {
            if self.down[slot] {
                self.apply(Op::Replace { slot }).await;
            }
        }
        self.array.wait_rebuild().await;
        let st = self.array.status();
        assert!(!st.degraded, "array still degraded: {:?}", st.members);
        assert!(st
            .members
            .iter()
            .all(|m| m.state == MemberState::Active || m.slot.is_none()));
        self.check_read(0, self.model.len() as u64).await;
        let geo = self.array.geometry();
        let want = encode_members(&geo, &self.model);
        for (i, m) in self.members.iter().enumerate() {
            let snap = m.snapshot();
            let area = &snap[DATA_OFFSET_BYTES as usize
                ..(DATA_OFFSET_BYTES + geo.member_data_bytes()) as usize];
            assert!(
                area == want[i].as_slice(),
                "member {i} differs from a fresh encode"
            );
        }
        let report = self
            .array
            .scrub(twinblock_raid::ScrubMode::Check)
            .await
            .unwrap();
        assert_eq!(report.mismatches, 0);
    }
}

fn run(level: Level, n: usize, ops: Vec<Op>) {
    run_with_chunk(level, n, CHUNK_BYTES, ops)
}

fn run_with_chunk(level: Level, n: usize, chunk_bytes: u64, ops: Vec<Op>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut h = Harness::new(level, n, chunk_bytes).await;
        for op in ops {
            h.apply(op).await;
        }
        h.finish().await;
    });
}

fn cases() -> ProptestConfig {
    // PROPTEST_CASES raises the count for a longer hunt; the default keeps the suite fast.
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24);
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(cases())]

    #[test]
    fn raid0_matches_model(n in 1usize..=3, ops in prop::collection::vec(op(), 1..30)) {
        run(Level::Raid0, n, ops);
    }

    #[test]
    fn raid1_matches_model(n in 2usize..=3, ops in prop::collection::vec(op(), 1..30)) {
        run(Level::Raid1, n, ops);
    }

    #[test]
    fn raid5_matches_model(n in 3usize..=5, ops in prop::collection::vec(op(), 1..30)) {
        run(Level::Raid5, n, ops);
    }

    #[test]
    fn raid6_matches_model(n in 4usize..=6, ops in prop::collection::vec(op(), 1..30)) {
        run(Level::Raid6, n, ops);
    }

    #[test]
    fn raid10_matches_model(n in 2usize..=5, ops in prop::collection::vec(op(), 1..30)) {
        run(Level::Raid10, n, ops);
    }

    /// Chunks of four 4 KiB columns, so scattered writes plan multi-column runs and mixed modes.
    #[test]
    fn raid5_and_raid6_wide_chunks_match_model(
        raid6 in any::<bool>(),
        n in 4usize..=6,
        ops in prop::collection::vec(op(), 1..30),
    ) {
        let level = if raid6 { Level::Raid6 } else { Level::Raid5 };
        run_with_chunk(level, n, 4 * CHUNK_BYTES, ops);
    }
}

/// A consistency point's scattered blocks, dense enough in each row for the span rewrite
/// (`rowdense`): every other 4 KiB block of two rows, some partial, then a read-back and a
/// fresh-encode comparison of every member (RAID 5 and 6, 64 KiB chunks), also after a member
/// failed (the degraded rows keep the column plan).
#[test]
fn dense_scattered_rows_match_model() {
    let chunk = 16 * CHUNK_BYTES;
    for (level, n) in [(Level::Raid5, 4), (Level::Raid6, 5)] {
        let d = (n - level.parity_chunks()) as u64;
        let row_bytes = d * chunk;
        let scatter = |seed: u8| Op::Scatter {
            base: row_bytes,
            writes: (0..2 * row_bytes / 8192)
                .map(|k| {
                    (
                        k * 8192 + (k % 3) * 100,
                        4096 - (k % 5) * 7,
                        seed.wrapping_add(k as u8),
                    )
                })
                .collect(),
        };
        let ops = vec![
            scatter(1),
            Op::Flush,
            scatter(50),
            Op::Fail {
                slot: 1,
                how: Fault::Operator,
            },
            scatter(99),
        ];
        run_with_chunk(level, n, chunk, ops);
    }
}
