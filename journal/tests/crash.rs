//! In-process crash simulation: random writes against a journaled volume over a memory backing,
//! a "crash" at a random moment (the runtime is dropped with every task mid-flight, the backing
//! loses its unflushed writes, only the NVRAM file survives), reopen, and check that every
//! acknowledged write reads back with its last acknowledged content.
//!
//! Each block's content encodes (block, version); a block is written by one task only, so per
//! block there is one last acknowledged version and at most one in-flight version, and after
//! recovery the block must hold one of those two. `JOURNAL_CRASH_ITERATIONS` raises the count.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use twinblock_journal::{JournaledVolume, MemBacking, Nvram, NvramConfig, VolumeConfig};

mod common;
use common::{versioned_block as block_bytes, BLOCK_BYTES, ZEROED};

const BLOCKS: u64 = 64;
const TASKS: u64 = 4;
const DEFAULT_ITERATIONS: u64 = 100;

/// Per block: last acknowledged version (0 = never written, all zero) and an in-flight one.
#[derive(Debug, Clone, Copy, Default)]
struct BlockModel {
    acked: u32,
    in_flight: Option<u32>,
}

fn describe(block: u64, data: &[u8]) -> String {
    if data.iter().all(|&b| b == 0) {
        return "zeroes".into();
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[..8]);
    let mut v = [0u8; 4];
    v.copy_from_slice(&data[8..12]);
    format!(
        "block {} version {} (reading block {block})",
        u64::from_le_bytes(b),
        u32::from_le_bytes(v)
    )
}

fn nvram_cfg(dir: &Path) -> NvramConfig {
    // Small: wraps and CPs under back-pressure happen within one iteration.
    common::nvram_at(dir, 96 * 1024)
}

type Model = Arc<Mutex<HashMap<u64, BlockModel>>>;

async fn worker(
    vol: Arc<JournaledVolume<MemBacking>>,
    model: Model,
    task: u64,
    seed: u64,
    next_version: Arc<Mutex<u32>>,
    acked_ops: Arc<AtomicU64>,
) {
    let mut rng = StdRng::seed_from_u64(seed);
    let per_task = BLOCKS / TASKS;
    let first = task * per_task;
    loop {
        let start = first + rng.gen_range(0..per_task);
        let count = rng.gen_range(1..=3).min(first + per_task - start);
        let zero = rng.gen_ratio(1, 8);
        let version = {
            let mut v = next_version.lock().unwrap();
            *v += 1;
            if zero {
                ZEROED
            } else {
                *v
            }
        };
        {
            let mut m = model.lock().unwrap();
            for b in start..start + count {
                m.entry(b).or_default().in_flight = Some(version);
            }
        }
        let offset = start * BLOCK_BYTES;
        let result = if zero {
            vol.write_zeroes(offset, count * BLOCK_BYTES).await
        } else {
            let mut data = Vec::new();
            for b in start..start + count {
                data.extend_from_slice(&block_bytes(b, version));
            }
            vol.write(offset, Bytes::from(data)).await
        };
        if let Err(e) = result {
            panic!("write failed: {e}");
        }
        {
            let mut m = model.lock().unwrap();
            for b in start..start + count {
                let e = m.entry(b).or_default();
                e.acked = version;
                e.in_flight = None;
            }
        }
        acked_ops.fetch_add(1, Ordering::Relaxed);
        if rng.gen_ratio(1, 10) {
            vol.flush().await.unwrap();
        }
        if rng.gen_ratio(1, 4) {
            tokio::task::yield_now().await;
        }
    }
}

/// One life of the node: recover, verify, run the workload, crash once `run_ops` writes were
/// acknowledged plus a random extra delay of `extra_us`.
#[derive(Debug, Default)]
struct Totals {
    replayed_records: u64,
    cps: u64,
    writer_waits: u64,
    acked_writes_seen: u64,
}

fn one_life(
    dir: &Path,
    backing: &MemBacking,
    model: &Model,
    seed: u64,
    run_ops: u64,
    extra_us: u64,
    totals: &mut Totals,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async {
        let nv = Nvram::open(&nvram_cfg(dir)).unwrap();
        let cfg = VolumeConfig {
            cp_interval_ms: 1 + seed % 3,
            cp_fill_percent: 60,
            max_record_payload_bytes: 8192,
            cp_batch_bytes: 16 * 1024,
            discard_corrupt_log: false,
            ..VolumeConfig::default()
        };
        let vol = match JournaledVolume::open(nv, backing.clone(), 7, cfg).await {
            Ok(v) => Arc::new(v),
            Err(e) => panic!("seed {seed}: recovery refused: {e}"),
        };
        // Nothing is torn by an in-process crash: the log must end cleanly every time.
        let r = vol.recovery();
        assert!(!r.damaged_tail_discarded, "seed {seed}: {:?}", r.scan);
        let mut contents = Vec::new();
        for b in 0..BLOCKS {
            contents.push(vol.read(b * BLOCK_BYTES, BLOCK_BYTES).await.unwrap());
        }
        {
            let mut m = model.lock().unwrap();
            for (b, got) in (0..BLOCKS).zip(contents) {
                let e = m.entry(b).or_default();
                let ok_acked = got[..] == block_bytes(b, e.acked)[..];
                let ok_flight = e.in_flight.is_some_and(|v| got[..] == block_bytes(b, v)[..]);
                assert!(
                    ok_acked || ok_flight,
                    "seed {seed}: block {b} lost its acknowledged version {} (in flight {:?}); found {}",
                    e.acked,
                    e.in_flight,
                    describe(b, &got)
                );
                if ok_flight && !ok_acked {
                    e.acked = e.in_flight.unwrap_or(e.acked);
                }
                e.in_flight = None;
            }
        }
        let next_version = Arc::new(Mutex::new((seed as u32 & 0xffff) << 12));
        let acked_ops = Arc::new(AtomicU64::new(0));
        for t in 0..TASKS {
            tokio::spawn(worker(
                Arc::clone(&vol),
                Arc::clone(model),
                t,
                seed * 31 + t,
                Arc::clone(&next_version),
                Arc::clone(&acked_ops),
            ));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while acked_ops.load(Ordering::Relaxed) < run_ops {
            assert!(tokio::time::Instant::now() < deadline, "seed {seed}: workload stalled");
            tokio::time::sleep(Duration::from_micros(100)).await;
        }
        tokio::time::sleep(Duration::from_micros(extra_us)).await;
        let st = vol.status();
        totals.replayed_records += vol.recovery().replayed_records;
        totals.cps += st.cps_done;
        totals.writer_waits += st.writer_waits;
        totals.acked_writes_seen += st.next_seq - vol.recovery().next_seq;
    });
    // Crash: every task is dropped wherever it was; unflushed backing writes are lost.
    drop(rt);
    backing.crash();
}

#[test]
fn acknowledged_writes_survive_random_crashes() {
    let iterations = std::env::var("JOURNAL_CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_ITERATIONS);
    let dir = tempfile::tempdir().unwrap();
    let backing = MemBacking::with_yields(BLOCKS * BLOCK_BYTES, 16 * 1024);
    let model: Model = Arc::new(Mutex::new(HashMap::new()));
    let mut rng = StdRng::seed_from_u64(0x7717_b10c);
    let mut totals = Totals::default();
    for i in 0..iterations {
        let run_ops = rng.gen_range(0..150);
        let extra_us = rng.gen_range(0..1000);
        one_life(
            dir.path(),
            &backing,
            &model,
            i + 1,
            run_ops,
            extra_us,
            &mut totals,
        );
    }
    // A final life verifies the last crash.
    one_life(
        dir.path(),
        &backing,
        &model,
        iterations + 1,
        0,
        0,
        &mut totals,
    );
    eprintln!("crash test totals over {iterations} crashes: {totals:?}");
    // The workload must have exercised what it is meant to test.
    assert!(totals.replayed_records > iterations, "{totals:?}");
    assert!(totals.cps > iterations / 2, "{totals:?}");
    assert!(totals.writer_waits > 0, "{totals:?}");
    let m = model.lock().unwrap();
    let written = m.values().filter(|e| e.acked != 0).count();
    assert!(
        written as u64 > BLOCKS / 2,
        "workload wrote only {written} blocks"
    );
}
