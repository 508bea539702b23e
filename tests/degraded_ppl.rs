//! The write hole of a degraded RAID 5 under a journal, closed by the partial-parity log.
//!
//! A journaled RAID-5 volume (3 in-memory members with volatile write caches, NVRAM in `msync`
//! mode under the NVRAM power-loss model) loses a member; a consistency point then updates data chunk 0 of
//! row 0, whose data chunk 1 lived on the lost member. The power goes after the CP's member
//! writes and before their flush (the NVRAM keeps what was persisted before: the partial-parity
//! record, not the CP's end), and each of the two present members keeps, loses or tears what it
//! had not synced. After the restart the array must start (no `start_dirty_degraded`),
//! every block, the lost member's chunk included, must read back as written, and after a rebuild
//! onto a fresh member a scrub must find no parity mismatch.
//!
//! `without_ppl_the_lost_chunk_reads_wrong` runs the same cut with the partial-parity records
//! dropped instead of persisted, and shows that the lost member's chunk then reads wrong: the
//! first test checks what PPL protects, not something that holds anyway.

use std::sync::Arc;

use bytes::Bytes;
use twinblock::device::ArrayBacking;
use twinblock_io::mem::MemMember;
use twinblock_io::wcache::{CutPolicy, PowerSupply};
use twinblock_io::Member;
use twinblock_journal::power::{NvramCut, NvramPowerModel};
use twinblock_journal::{JournaledVolume, Nvram, NvramConfig, PersistenceMode, VolumeConfig};
use twinblock_raid::superblock::DATA_OFFSET_BYTES;
use twinblock_raid::{Array, AssembleOptions, CreateOptions, Level, PartialParityLog, ScrubMode};

const BLOCK_BYTES: u64 = 4096;
const CHUNK_BYTES: u64 = 4096;
const MEMBER_DATA_BYTES: u64 = 16 * CHUNK_BYTES;
/// Data chunks per row: RAID 5 over 3 members, RAID 6 over 4.
const DATA_PER_ROW: u64 = 2;
const BLOCKS: u64 = DATA_PER_ROW * MEMBER_DATA_BYTES / BLOCK_BYTES;
/// Most member operations a CP of one block takes before its flush (searched upwards).
const MAX_POWER_BUDGET: u64 = 200;

fn block(b: u64, version: u8) -> Vec<u8> {
    (0..BLOCK_BYTES)
        .map(|i| (i as u8).wrapping_mul(31) ^ (b as u8).wrapping_mul(7) ^ version)
        .collect()
}

fn vol_cfg() -> VolumeConfig {
    VolumeConfig {
        cp_interval_ms: 3_600_000,
        cp_fill_percent: 90,
        max_record_payload_bytes: 8192,
        cp_batch_bytes: 16 * 1024,
        discard_corrupt_log: false,
        ..VolumeConfig::default()
    }
}

fn nvram_cfg(dir: &std::path::Path) -> NvramConfig {
    NvramConfig {
        path: dir.join("nvram.img"),
        persistence: PersistenceMode::Msync,
        log_bytes_per_region: 64 * 1024,
        ..NvramConfig::new(0, [9; 16])
    }
}

/// A partial-parity log that persists nothing: PPL switched off.
struct DroppedPpl;

#[async_trait::async_trait]
impl PartialParityLog for DroppedPpl {
    async fn persist(&self, _payload: Vec<u8>) -> std::io::Result<()> {
        Ok(())
    }
}

fn dyns(ms: &[Arc<MemMember>]) -> Vec<Arc<dyn Member>> {
    ms.iter().map(|m| m.clone() as Arc<dyn Member>).collect()
}

/// The array after the cut, reopened, and what the test learnt on the way.
struct Cut {
    vol: JournaledVolume<ArrayBacking>,
    _dir: tempfile::TempDir,
}

/// Runs the scenario with `budget` member operations of power for the CP; `None` when the power
/// did not go off between the CP's member writes and its flush (the caller tries another
/// budget). `policies`: what the data member and the parity member of row 0 keep.
async fn run_cut(
    level: Level,
    budget: u64,
    ppl: bool,
    policies: (CutPolicy, CutPolicy),
) -> Option<Cut> {
    let dir = tempfile::tempdir().unwrap();
    let count = DATA_PER_ROW as usize + level.parity_chunks();
    let members: Vec<Arc<MemMember>> = (0..count)
        .map(|i| {
            let m = Arc::new(MemMember::new(
                format!("m{i}"),
                DATA_OFFSET_BYTES + MEMBER_DATA_BYTES,
            ));
            m.enable_write_cache();
            m
        })
        .collect();
    let array = Array::create_with(
        "ppl",
        level,
        CHUNK_BYTES,
        dyns(&members),
        Vec::new(),
        CreateOptions::default(),
    )
    .await
    .unwrap();
    for m in &members {
        m.sync().await.unwrap();
    }
    let geo = array.geometry();
    let data0 = geo.data_member(0, 0);
    let lost = geo.data_member(0, 1);
    let parity = geo.p_member(0);
    let nv_power = Arc::new(NvramPowerModel::new());
    let vol = JournaledVolume::open(
        Nvram::open_with_power_model(&nvram_cfg(dir.path()), nv_power.clone()).unwrap(),
        ArrayBacking::new(array, None),
        1,
        vol_cfg(),
    )
    .await
    .unwrap();
    // Every block written and checkpointed: durable on all three members.
    for b in 0..BLOCKS {
        vol.write(b * BLOCK_BYTES, Bytes::from(block(b, 1)))
            .await
            .unwrap();
    }
    assert!(vol.checkpoint().await.unwrap());
    let array = vol.backing().array.clone();
    array.fail_member(lost).await.unwrap();
    if !ppl {
        array.attach_ppl(Arc::new(DroppedPpl));
    }
    // The stripe update: block 0 (data chunk 0 of row 0), new version.
    vol.write(0, Bytes::from(block(0, 2))).await.unwrap();
    let power = Arc::new(PowerSupply::new(budget));
    for m in &members {
        m.attach_power(power.clone());
    }
    // The NVRAM loses power with the members: the CP's persists before its member writes (the
    // one partial-parity record, with PPL) reach the medium, the ones after do not.
    nv_power.cut_after_persists(u64::from(ppl));
    let _ = vol.checkpoint().await;
    // Both writes of the stripe update reached the members' caches, and no flush followed.
    let row0 = |m: usize| {
        let s = members[m].snapshot();
        s[DATA_OFFSET_BYTES as usize..(DATA_OFFSET_BYTES + CHUNK_BYTES) as usize].to_vec()
    };
    let mut new_parity = block(0, 2);
    for (p, x) in new_parity.iter_mut().zip(block(1, 1)) {
        *p ^= x;
    }
    let interrupted = power.is_off()
        && row0(data0) == block(0, 2)
        && row0(parity) == new_parity
        && members[data0].unsynced_writes() > 0
        && members[parity].unsynced_writes() > 0;
    drop(vol);
    array.abandon().await;
    drop(array);
    if !interrupted {
        return None;
    }
    let path = dir.path().join("nvram.img");
    std::fs::write(&path, nv_power.file_after_cut(NvramCut::LoseAll)).unwrap();
    members[data0].power_cut(policies.0);
    members[parity].power_cut(policies.1);
    if level == Level::Raid6 {
        members[geo.q_member(0)].power_cut(policies.1);
    }
    for m in &members {
        m.attach_power(Arc::new(PowerSupply::new(u64::MAX)));
    }
    let present: Vec<Arc<MemMember>> = (0..count)
        .filter(|&i| i != lost)
        .map(|i| members[i].clone())
        .collect();
    let array = Array::assemble_with(
        dyns(&present),
        AssembleOptions {
            journaled: true,
            ..AssembleOptions::default()
        },
    )
    .await
    .expect("a journaled degraded array starts after an unclean stop");
    assert!(
        array.ppl_pending(),
        "the array waits for the journal's replay"
    );
    let vol = JournaledVolume::open(
        Nvram::open(&nvram_cfg(dir.path())).unwrap(),
        ArrayBacking::new(array, None),
        1,
        vol_cfg(),
    )
    .await
    .unwrap();
    assert!(!vol.backing().array.ppl_pending());
    Some(Cut { vol, _dir: dir })
}

/// The first budget that cuts the power between the CP's member writes and its flush.
async fn cut(level: Level, ppl: bool, policies: (CutPolicy, CutPolicy)) -> Cut {
    for budget in 1..MAX_POWER_BUDGET {
        if let Some(c) = run_cut(level, budget, ppl, policies).await {
            return c;
        }
    }
    panic!("no power budget interrupted the CP between its member writes and its flush");
}

/// Block 1 (the lost member's chunk) as the array reconstructs it from parity.
async fn lost_chunk(c: &Cut) -> Vec<u8> {
    c.vol
        .backing()
        .array
        .read(BLOCK_BYTES, BLOCK_BYTES as usize)
        .await
        .unwrap()
        .to_vec()
}

const POLICIES: [(CutPolicy, CutPolicy); 4] = [
    (CutPolicy::KeepAll, CutPolicy::LoseAll),
    (CutPolicy::LoseAll, CutPolicy::KeepAll),
    (CutPolicy::Torn { seed: 3 }, CutPolicy::Torn { seed: 11 }),
    (CutPolicy::KeepAll, CutPolicy::KeepAll),
];

#[tokio::test]
async fn degraded_crash_mid_stripe_update_recovers_the_lost_chunk() {
    recovers_the_lost_chunk(Level::Raid5).await;
}

/// RAID 6 missing one member: P from the partial parity, Q recomputed from the data.
#[tokio::test]
async fn degraded_raid6_crash_mid_stripe_update_recovers_the_lost_chunk() {
    recovers_the_lost_chunk(Level::Raid6).await;
}

async fn recovers_the_lost_chunk(level: Level) {
    for policies in POLICIES {
        let c = cut(level, true, policies).await;
        assert!(
            lost_chunk(&c).await == block(1, 1),
            "{policies:?}: the lost member's chunk reconstructs as written"
        );
        for b in 0..BLOCKS {
            let want = block(b, if b == 0 { 2 } else { 1 });
            let got = c.vol.read(b * BLOCK_BYTES, BLOCK_BYTES).await.unwrap();
            assert!(got.as_ref() == &want[..], "{policies:?}: block {b}");
        }
        // Apply the journal, rebuild onto a fresh member, and check every stripe.
        assert!(c.vol.checkpoint().await.unwrap());
        let array = &c.vol.backing().array;
        let fresh = Arc::new(MemMember::new(
            "fresh",
            DATA_OFFSET_BYTES + MEMBER_DATA_BYTES,
        ));
        array.add_member(fresh as Arc<dyn Member>).await.unwrap();
        array.wait_rebuild().await;
        assert!(!array.status().degraded, "{policies:?}: rebuilt");
        let report = array.scrub(ScrubMode::Check).await.unwrap();
        assert_eq!(report.mismatches, 0, "{policies:?}: scrub after rebuild");
        for b in 0..BLOCKS {
            let want = block(b, if b == 0 { 2 } else { 1 });
            let got = array
                .read(b * BLOCK_BYTES, BLOCK_BYTES as usize)
                .await
                .unwrap();
            assert!(
                got.as_ref() == &want[..],
                "{policies:?}: block {b} after rebuild"
            );
        }
    }
}

#[tokio::test]
async fn without_ppl_the_lost_chunk_reads_wrong() {
    // Data reached its member, parity did not: without partial parity the lost chunk is
    // reconstructed from new data and old parity.
    let c = cut(
        Level::Raid5,
        false,
        (CutPolicy::KeepAll, CutPolicy::LoseAll),
    )
    .await;
    assert!(
        lost_chunk(&c).await != block(1, 1),
        "without PPL the cut must corrupt the lost member's chunk (else the PPL test proves nothing)"
    );
}
