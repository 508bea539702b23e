//! Power loss with the NVRAM in `msync` or `pmem` mode: every acknowledged write must survive.
//!
//! The NVRAM file gets a power-loss model (`NvramPowerModel`): the power goes after a random
//! number of persists, anywhere inside an append, a control-slot update or a CP. Stores not
//! persisted by then are lost, kept, or torn per 64-byte line (by seed) in the file the next boot
//! finds; the store (a `MemBacking`) loses what it did not flush. Each block must then read back
//! with its last version acknowledged before the cut, or a version written after it (a torn or
//! unacknowledged record is discarded by the scan, never applied).
//!
//! Seeds: `TWINBLOCK_NVRAM_POWER_SEEDS` (default 100); a failure names its seed and
//! `TWINBLOCK_NVRAM_POWER_SEED_BASE=<seed> TWINBLOCK_NVRAM_POWER_SEEDS=1` replays it.

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

fn cfg(dir: &std::path::Path) -> NvramConfig {
    cfg_in(dir, PersistenceMode::Msync)
}

fn cfg_in(dir: &std::path::Path, mode: PersistenceMode) -> NvramConfig {
    NvramConfig {
        persistence: mode,
        ..common::nvram_at(dir, 48 * 1024)
    }
}

fn vcfg() -> VolumeConfig {
    VolumeConfig {
        cp_interval_ms: 3_600_000,
        cp_fill_percent: 50,
        max_record_payload_bytes: 8192,
        cp_batch_bytes: 16 * 1024,
        discard_corrupt_log: false,
        ..VolumeConfig::default()
    }
}

/// Per block: last version acknowledged before the cut, and versions sent after it.
#[derive(Debug, Clone, Default)]
struct BlockModel {
    acked: u32,
    later: Vec<u32>,
}

async fn run_seed(mode: PersistenceMode, seed: u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(BLOCKS * BLOCK_BYTES, 16 * 1024);
    // A first life that leaves records behind, so that the cut may also hit a recovery in place.
    let mut model: HashMap<u64, BlockModel> = HashMap::new();
    let mut version = 0u32;
    let power = Arc::new(NvramPowerModel::new());
    let nv = Nvram::open_with_power_model(&cfg_in(dir.path(), mode), power.clone()).unwrap();
    let vol = JournaledVolume::open(nv, mem.clone(), 1, vcfg())
        .await
        .unwrap();
    power.cut_after_persists(rng.gen_range(0..400));
    for _ in 0..rng.gen_range(1..200) {
        if power.is_off() {
            break;
        }
        let block = rng.gen_range(0..BLOCKS);
        version += 1;
        let m = model.entry(block).or_default();
        m.later.push(version);
        if rng.gen_ratio(1, 10) {
            vol.checkpoint().await.unwrap();
            if power.is_off() {
                break;
            }
        }
        vol.write(
            block * BLOCK_BYTES,
            Bytes::from(block_bytes(block, version)),
        )
        .await
        .unwrap();
        if !power.is_off() {
            // Acknowledged with the power on: the record is on the medium.
            let m = model.entry(block).or_default();
            m.acked = version;
            m.later.clear();
        }
    }
    drop(vol);
    tokio::task::yield_now().await;
    mem.crash();
    let cut = match rng.gen_range(0..3) {
        0 => NvramCut::LoseAll,
        1 => NvramCut::KeepAll,
        _ => NvramCut::Torn { seed },
    };
    std::fs::write(dir.path().join("nvram.img"), power.file_after_cut(cut)).unwrap();
    // A fresh model: `pmem` mode then needs no DAX file system (see `Nvram::open_with_power_model`).
    let next_boot = Arc::new(NvramPowerModel::new());
    let nv = Nvram::open_with_power_model(&cfg_in(dir.path(), mode), next_boot).unwrap();
    let vol = match JournaledVolume::open(nv, mem.clone(), 1, vcfg()).await {
        Ok(v) => v,
        Err(e) => panic!("{mode:?} seed {seed}: recovery after the cut refused: {e}"),
    };
    for b in 0..BLOCKS {
        let got = vol.read(b * BLOCK_BYTES, BLOCK_BYTES).await.unwrap();
        let m = model.get(&b).cloned().unwrap_or_default();
        let ok = std::iter::once(m.acked)
            .chain(m.later.iter().copied())
            .any(|v| got[..] == block_bytes(b, v)[..]);
        assert!(
            ok,
            "{mode:?} seed {seed} ({cut:?}): block {b} lost acknowledged version {} (later {:?}); \
             replay with TWINBLOCK_NVRAM_POWER_SEED_BASE={seed} TWINBLOCK_NVRAM_POWER_SEEDS=1",
            m.acked, m.later
        );
    }
}

#[test]
fn acknowledged_writes_survive_power_cuts_in_msync_mode() {
    let base = env_u64("TWINBLOCK_NVRAM_POWER_SEED_BASE", 0);
    let count = env_u64("TWINBLOCK_NVRAM_POWER_SEEDS", 100);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for seed in base..base + count {
        rt.block_on(run_seed(PersistenceMode::Msync, seed));
    }
}

/// The same in `pmem` mode (the model stands in for the DAX medium): each record is written back
/// line by line and fenced before it is acknowledged.
#[test]
fn acknowledged_writes_survive_power_cuts_in_pmem_mode() {
    let base = env_u64("TWINBLOCK_NVRAM_POWER_SEED_BASE", 0);
    let count = env_u64("TWINBLOCK_NVRAM_POWER_SEEDS", 100);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for seed in base..base + count {
        rt.block_on(run_seed(PersistenceMode::Pmem, seed));
    }
}

/// Writers in the concurrent test, each with its own blocks (so each block's versions are
/// ordered by one writer), and the blocks each writes.
const WRITERS: u64 = 16;
const BLOCKS_PER_WRITER: u64 = 2;

/// One writer of the concurrent test: writes its blocks with increasing versions until the
/// power is off; returns per block the last version acknowledged with the power on and the ones
/// sent after it.
async fn concurrent_writer(
    vol: Arc<JournaledVolume<MemBacking>>,
    power: Arc<NvramPowerModel>,
    writer: u64,
    seed: u64,
) -> Vec<(u64, BlockModel)> {
    let mut rng = StdRng::seed_from_u64(seed ^ (writer << 32));
    let first = writer * BLOCKS_PER_WRITER;
    let mut model: HashMap<u64, BlockModel> = HashMap::new();
    for version in 1..rng.gen_range(2..40u32) {
        if power.is_off() {
            break;
        }
        let block = first + rng.gen_range(0..BLOCKS_PER_WRITER);
        model.entry(block).or_default().later.push(version);
        if writer == 0 && rng.gen_ratio(1, 8) {
            // A CP while the others write (its control-slot update is a persist too).
            vol.checkpoint().await.unwrap();
        }
        let data = Bytes::from(block_bytes(block, version));
        vol.write(block * BLOCK_BYTES, data).await.unwrap();
        if !power.is_off() {
            let m = model.entry(block).or_default();
            m.acked = version;
            m.later.clear();
        }
    }
    model.into_iter().collect()
}

/// Opens the NVRAM file once the dropped volume's tasks (a CP in flight on another worker) have
/// let go of it.
async fn open_when_released(nvcfg: &NvramConfig) -> Nvram {
    for _ in 0..500 {
        match Nvram::open(nvcfg) {
            Err(twinblock_journal::JournalError::Locked { .. }) => {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await
            }
            other => return other.unwrap(),
        }
    }
    panic!("the dropped volume never released {}", nvcfg.path.display());
}

/// Many concurrent writers share group commits; the power goes after a random number of
/// persists. Returns (records appended, persist calls made) before the cut.
async fn run_concurrent_seed(seed: u64) -> (u64, u64) {
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let blocks = WRITERS * BLOCKS_PER_WRITER;
    let mem = MemBacking::new(blocks * BLOCK_BYTES, 16 * 1024);
    let nvcfg = NvramConfig {
        log_bytes_per_region: 256 * 1024,
        ..cfg(dir.path())
    };
    let power = Arc::new(NvramPowerModel::new());
    // A medium slow enough that writers pile up behind each round.
    power.slow_persists(std::time::Duration::from_micros(rng.gen_range(50..500)));
    let nv = Nvram::open_with_power_model(&nvcfg, power.clone()).unwrap();
    let vol = Arc::new(
        JournaledVolume::open(nv, mem.clone(), 1, vcfg())
            .await
            .unwrap(),
    );
    power.cut_after_persists(rng.gen_range(0..120));
    let tasks: Vec<_> = (0..WRITERS)
        .map(|w| tokio::spawn(concurrent_writer(vol.clone(), power.clone(), w, seed)))
        .collect();
    let mut model: HashMap<u64, BlockModel> = HashMap::new();
    for t in tasks {
        model.extend(t.await.unwrap());
    }
    let status = vol.status();
    drop(vol);
    mem.crash();
    let cut = match rng.gen_range(0..3) {
        0 => NvramCut::LoseAll,
        1 => NvramCut::KeepAll,
        _ => NvramCut::Torn { seed },
    };
    std::fs::write(&nvcfg.path, power.file_after_cut(cut)).unwrap();
    let nv = open_when_released(&nvcfg).await;
    let vol = match JournaledVolume::open(nv, mem.clone(), 1, vcfg()).await {
        Ok(v) => v,
        Err(e) => panic!("seed {seed}: recovery after the cut refused: {e}"),
    };
    for b in 0..blocks {
        let got = vol.read(b * BLOCK_BYTES, BLOCK_BYTES).await.unwrap();
        let m = model.get(&b).cloned().unwrap_or_default();
        let ok = std::iter::once(m.acked)
            .chain(m.later.iter().copied())
            .any(|v| got[..] == block_bytes(b, v)[..]);
        assert!(
            ok,
            "seed {seed} ({cut:?}): block {b} lost acknowledged version {} (later {:?}); replay \
             with TWINBLOCK_NVRAM_POWER_SEED_BASE={seed} TWINBLOCK_NVRAM_POWER_SEEDS=1",
            m.acked, m.later
        );
    }
    (status.next_seq, status.log_persists)
}

#[test]
fn concurrently_acknowledged_writes_survive_power_cuts_in_msync_mode() {
    let base = env_u64("TWINBLOCK_NVRAM_POWER_SEED_BASE", 0);
    let count = env_u64("TWINBLOCK_NVRAM_POWER_SEEDS", 100) / 4 + 1;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    let (mut records, mut persists) = (0, 0);
    for seed in base..base + count {
        let (r, p) = rt.block_on(run_concurrent_seed(seed));
        records += r;
        persists += p;
    }
    // The test is only worth something if records really waited in groups.
    assert!(
        persists * 2 < records,
        "{persists} persists for {records} records: the writers did not share group commits"
    );
}
