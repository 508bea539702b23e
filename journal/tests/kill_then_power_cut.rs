//! A `kill -9` of the daemon, a restart, then a power cut, in `msync` and `pmem` mode.
//!
//! The kill leaves records the dead process stored in the NVRAM mapping and never persisted:
//! in the page cache (`msync`) or the CPU caches (`pmem`), not on the medium. The restart reads
//! them like any other record and acknowledges new writes after them; recovery must make them
//! persistent first, or a power cut that tears them ends the next scan before the new
//! acknowledged records. The NVRAM's power-loss model (`NvramPowerModel`) keeps the dead
//! process's unpersisted stores across the restart (the host kept running) and decides what the
//! cut keeps; in `pmem` mode it stands in for the DAX medium, which this machine need not have.
//! The kill is made by failing the persists from a chosen point: the write is stored, its persist
//! fails, and the process is dropped.
//!
//! Seeds: `TWINBLOCK_KILL_CUT_SEEDS` (default 300 in `pmem` mode, a fifth of that in `msync`
//! mode, whose every persist is a real `msync`); `many_seeds` (ignored by default) runs 5,000 per
//! mode. A failure names its seed and `TWINBLOCK_KILL_CUT_SEED_BASE=<seed>
//! TWINBLOCK_KILL_CUT_SEEDS=1` replays it.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use twinblock_journal::power::{NvramCut, NvramPowerModel};
use twinblock_journal::{
    JournaledVolume, MemBacking, Nvram, NvramConfig, PersistenceMode, VolumeConfig,
};

mod common;
use common::{env_u64, versioned_block as block_bytes, BLOCK_BYTES};

const BLOCKS: u64 = 32;

fn cfg(dir: &std::path::Path, mode: PersistenceMode) -> NvramConfig {
    NvramConfig {
        persistence: mode,
        ..common::nvram_at(dir, 256 * 1024)
    }
}

fn vcfg() -> VolumeConfig {
    VolumeConfig {
        cp_interval_ms: 3_600_000,
        cp_fill_percent: 90,
        max_record_payload_bytes: 8192,
        cp_batch_bytes: 16 * 1024,
        discard_corrupt_log: false,
        ..VolumeConfig::default()
    }
}

/// Per block: last version acknowledged with the power on, and versions sent after it (which
/// may or may not survive).
#[derive(Debug, Clone, Default)]
struct BlockModel {
    acked: u32,
    later: Vec<u32>,
}

type Model = HashMap<u64, BlockModel>;

fn sent(model: &mut Model, block: u64, version: u32) {
    model.entry(block).or_default().later.push(version);
}

fn acked(model: &mut Model, block: u64, version: u32) {
    let m = model.entry(block).or_default();
    m.acked = version;
    m.later.clear();
}

/// Checks that every block reads back its acknowledged version or one sent after it.
async fn check(vol: &JournaledVolume<MemBacking>, model: &Model, what: &str) {
    for b in 0..BLOCKS {
        let got = vol.read(b * BLOCK_BYTES, BLOCK_BYTES).await.unwrap();
        let m = model.get(&b).cloned().unwrap_or_default();
        let ok = std::iter::once(m.acked)
            .chain(m.later.iter().copied())
            .any(|v| got[..] == block_bytes(b, v)[..]);
        assert!(
            ok,
            "{what}: block {b} lost acknowledged version {} (later {:?})",
            m.acked, m.later
        );
    }
}

/// Writes `count` random blocks, acknowledged while the power is on; a CP now and then.
async fn write_some(
    vol: &JournaledVolume<MemBacking>,
    power: &NvramPowerModel,
    rng: &mut StdRng,
    model: &mut Model,
    version: &mut u32,
    count: u32,
) {
    for _ in 0..count {
        if power.is_off() {
            return;
        }
        if rng.gen_ratio(1, 12) {
            // A CP may fail (the store refuses writes in some seeds): the log keeps its records.
            let _ = vol.checkpoint().await;
        }
        let block = rng.gen_range(0..BLOCKS);
        *version += 1;
        sent(model, block, *version);
        let data = Bytes::from(block_bytes(block, *version));
        if vol.write(block * BLOCK_BYTES, data).await.is_ok() && !power.is_off() {
            acked(model, block, *version);
        }
    }
}

async fn run_seed(mode: PersistenceMode, seed: u64) {
    let what = format!(
        "{mode:?} seed {seed}; replay with TWINBLOCK_KILL_CUT_SEED_BASE={seed} TWINBLOCK_KILL_CUT_SEEDS=1"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), mode);
    let mem = MemBacking::new(BLOCKS * BLOCK_BYTES, 16 * 1024);
    let power = Arc::new(NvramPowerModel::new());
    let mut model = Model::new();
    let mut version = 0u32;

    // First life: acknowledged writes, then the kill between a store and its persist.
    let nv = Nvram::open_with_power_model(&c, power.clone()).unwrap();
    let vol = JournaledVolume::open(nv, mem.clone(), 1, vcfg())
        .await
        .unwrap();
    let n = rng.gen_range(0..60);
    write_some(&vol, &power, &mut rng, &mut model, &mut version, n).await;
    power.fail_persists(Some(libc::EIO));
    for _ in 0..rng.gen_range(1..4) {
        let block = rng.gen_range(0..BLOCKS);
        version += 1;
        sent(&mut model, block, version);
        let data = Bytes::from(block_bytes(block, version));
        assert!(
            vol.write(block * BLOCK_BYTES, data).await.is_err(),
            "{what}: a write whose persist failed was acknowledged"
        );
    }
    drop(vol);
    tokio::task::yield_now().await;
    power.fail_persists(None);

    // Second life on the same host (the power stayed on): recovery reads the unpersisted records
    // from the caches. A store that refuses writes keeps every CP from retiring them.
    mem.set_fail_writes(rng.gen_bool(0.5));
    let nv = Nvram::open_with_power_model(&c, power.clone()).unwrap();
    let vol = match JournaledVolume::open(nv, mem.clone(), 1, vcfg()).await {
        Ok(v) => v,
        Err(e) => panic!("{what}: restart after the kill refused: {e}"),
    };
    power.cut_after_persists(rng.gen_range(0..80));
    let n = rng.gen_range(1..80);
    write_some(&vol, &power, &mut rng, &mut model, &mut version, n).await;
    drop(vol);
    tokio::task::yield_now().await;

    // The power goes; the next boot finds what the medium kept.
    mem.crash();
    mem.set_fail_writes(false);
    let cut = match rng.gen_range(0..3) {
        0 => NvramCut::LoseAll,
        1 => NvramCut::KeepAll,
        _ => NvramCut::Torn { seed },
    };
    std::fs::write(&c.path, power.file_after_cut(cut)).unwrap();
    let nv = Nvram::open_with_power_model(&c, Arc::new(NvramPowerModel::new())).unwrap();
    let vol = match JournaledVolume::open(nv, mem.clone(), 1, vcfg()).await {
        Ok(v) => v,
        Err(e) => panic!("{what} ({cut:?}): recovery after the power cut refused: {e}"),
    };
    check(&vol, &model, &format!("{what} ({cut:?})")).await;
}

fn run_seeds(mode: PersistenceMode, count: u64) {
    let base = env_u64("TWINBLOCK_KILL_CUT_SEED_BASE", 0);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for seed in base..base + count {
        rt.block_on(run_seed(mode, seed));
    }
}

#[test]
fn writes_acknowledged_after_a_kill_survive_a_later_power_cut_in_pmem_mode() {
    run_seeds(
        PersistenceMode::Pmem,
        env_u64("TWINBLOCK_KILL_CUT_SEEDS", 300),
    );
}

#[test]
fn writes_acknowledged_after_a_kill_survive_a_later_power_cut_in_msync_mode() {
    let count = env_u64("TWINBLOCK_KILL_CUT_SEEDS", 300);
    run_seeds(PersistenceMode::Msync, count.div_ceil(5));
}

#[test]
#[ignore = "long: 5,000 seeds per mode"]
fn many_seeds() {
    run_seeds(PersistenceMode::Pmem, 5_000);
    run_seeds(PersistenceMode::Msync, 5_000);
}

/// The plain case, step by step: in `pmem` mode the record the killed process stored and never
/// wrote back is written back by recovery before the restarted process acknowledges anything.
#[tokio::test]
async fn pmem_recovery_writes_back_the_record_a_kill_left_in_the_caches() {
    let dir = tempfile::tempdir().unwrap();
    let c = cfg(dir.path(), PersistenceMode::Pmem);
    let mem = MemBacking::new(BLOCKS * BLOCK_BYTES, 16 * 1024);
    let power = Arc::new(NvramPowerModel::new());
    let nv = Nvram::open_with_power_model(&c, power.clone()).unwrap();
    let vol = JournaledVolume::open(nv, mem.clone(), 1, vcfg())
        .await
        .unwrap();
    vol.write(0, Bytes::from(block_bytes(0, 1))).await.unwrap();
    power.fail_persists(Some(libc::EIO));
    assert!(vol
        .write(BLOCK_BYTES, Bytes::from(block_bytes(1, 2)))
        .await
        .is_err());
    drop(vol);
    power.fail_persists(None);
    mem.set_fail_writes(true);
    let nv = Nvram::open_with_power_model(&c, power.clone()).unwrap();
    let vol = JournaledVolume::open(nv, mem.clone(), 1, vcfg())
        .await
        .unwrap();
    assert!(vol.recovery().scan.records_valid >= 2);
    vol.write(2 * BLOCK_BYTES, Bytes::from(block_bytes(2, 3)))
        .await
        .unwrap();
    drop(vol);
    // Everything not written back is lost.
    std::fs::write(&c.path, power.file_after_cut(NvramCut::LoseAll)).unwrap();
    mem.crash();
    mem.set_fail_writes(false);
    let nv = Nvram::open_with_power_model(&c, Arc::new(NvramPowerModel::new())).unwrap();
    let vol = JournaledVolume::open(nv, mem, 1, vcfg()).await.unwrap();
    for (b, v) in [(0, 1), (1, 2), (2, 3)] {
        let got = vol.read(b * BLOCK_BYTES, BLOCK_BYTES).await.unwrap();
        assert!(
            got[..] == block_bytes(b, v)[..],
            "block {b} lost version {v}"
        );
    }
}
