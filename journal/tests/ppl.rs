//! Partial-parity records through the journal, over a store that logs them like a degraded RAID
//! 5 array would: a CP stays within the log's PPL reserve (and later CPs apply the rest), a log
//! filled with records whose partial parity is larger than themselves (WRITE_ZEROES, FLUSHes'
//! TRANSITION records) drains without a CP running out of PPL space, PPL records of an
//! interrupted CP are handed back at the next open, and those of a finished CP are not.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use twinblock_journal::{Backing, BackingError, JournaledVolume, MemBacking, PplLog, VolumeConfig};

mod common;

const VOLUME_BYTES: u64 = 1024 * 1024;
const STRIPE_BYTES: u64 = 8 * 1024;
const COLUMN_BYTES: u64 = 4096;
const LOG_BYTES: u64 = 128 * 1024;

/// What recovery handed to the store: the PPL payloads and whether the log was complete.
type Replayed = (Vec<Vec<u8>>, bool);

/// A store that, while `active`, persists one PPL record per write (as many bytes as the write
/// covers columns) before writing, and records what recovery hands back.
#[derive(Clone)]
struct PplStore {
    mem: MemBacking,
    active: Arc<AtomicBool>,
    log: Arc<Mutex<Option<PplLog>>>,
    logged: Arc<AtomicU64>,
    replayed: Arc<Mutex<Option<Replayed>>>,
    /// The next write starts the logging (a member failed just then).
    activate_on_write: Arc<AtomicBool>,
}

impl PplStore {
    fn new(mem: MemBacking) -> PplStore {
        PplStore {
            mem,
            active: Arc::new(AtomicBool::new(true)),
            log: Arc::new(Mutex::new(None)),
            logged: Arc::new(AtomicU64::new(0)),
            replayed: Arc::new(Mutex::new(None)),
            activate_on_write: Arc::new(AtomicBool::new(false)),
        }
    }

    async fn log_before(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        if self.activate_on_write.swap(false, Ordering::SeqCst) {
            self.active.store(true, Ordering::SeqCst);
        }
        if !self.active.load(Ordering::SeqCst) {
            return Ok(());
        }
        let log = self.log.lock().unwrap().clone();
        let Some(log) = log else {
            return Err(BackingError("no PPL log attached".into()));
        };
        let columns = (offset + len).div_ceil(COLUMN_BYTES) - offset / COLUMN_BYTES;
        let payload = vec![(offset / COLUMN_BYTES) as u8 + 1; (columns * COLUMN_BYTES) as usize];
        log.persist(&payload)
            .await
            .map_err(|e| BackingError(e.to_string()))?;
        self.logged.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

#[async_trait]
impl Backing for PplStore {
    fn size(&self) -> u64 {
        self.mem.size()
    }
    fn stripe_bytes(&self) -> u64 {
        STRIPE_BYTES
    }
    async fn read(&self, offset: u64, len: u64) -> Result<Bytes, BackingError> {
        self.mem.read(offset, len).await
    }
    async fn write(&self, offset: u64, data: Bytes) -> Result<(), BackingError> {
        self.log_before(offset, data.len() as u64).await?;
        self.mem.write(offset, data).await
    }
    async fn write_scattered(&self, writes: Vec<(u64, Bytes)>) -> Result<(), BackingError> {
        for (offset, data) in writes {
            self.write(offset, data).await?;
        }
        Ok(())
    }
    async fn write_zeroes(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        // Like a RAID array's partial rows: one column of partial parity per zeroing.
        self.log_before(offset, len.min(1)).await?;
        self.mem.write_zeroes(offset, len).await
    }
    async fn discard(&self, offset: u64, len: u64) -> Result<(), BackingError> {
        self.mem.discard(offset, len).await
    }
    async fn flush(&self) -> Result<(), BackingError> {
        self.mem.flush().await
    }
    async fn applied_seq(&self) -> Result<u64, BackingError> {
        self.mem.applied_seq().await
    }
    async fn set_applied_seq(&self, seq: u64) -> Result<(), BackingError> {
        self.mem.set_applied_seq(seq).await
    }
    fn attach_ppl(&self, log: PplLog) {
        *self.log.lock().unwrap() = Some(log);
    }
    fn ppl_active(&self) -> bool {
        self.active.load(Ordering::SeqCst)
    }
    fn ppl_bound_bytes(&self, len: u64, whole_rows: bool, framing_bytes: u64) -> u64 {
        let len = if whole_rows { 0 } else { len };
        // One record per write, each covering its columns plus one partial column.
        (len.div_ceil(COLUMN_BYTES) + 1) * COLUMN_BYTES + framing_bytes
    }
    async fn replay_ppl(&self, payloads: Vec<Vec<u8>>, complete: bool) -> Result<(), BackingError> {
        *self.replayed.lock().unwrap() = Some((payloads, complete));
        Ok(())
    }
}

/// Opens (recovering) the volume of `dir` over `store`.
async fn open(dir: &std::path::Path, store: &PplStore) -> JournaledVolume<PplStore> {
    common::open_volume(dir, LOG_BYTES, store.clone(), cfg())
        .await
        .unwrap()
}

fn cfg() -> VolumeConfig {
    VolumeConfig {
        cp_interval_ms: 3_600_000,
        cp_fill_percent: 100,
        max_record_payload_bytes: 8 * 1024,
        // Small batches: every 4 KiB block is its own store write (and PPL record).
        cp_batch_bytes: STRIPE_BYTES,
        ..VolumeConfig::default()
    }
}

fn block(b: u64, v: u8) -> Bytes {
    Bytes::from(vec![v ^ (b as u8); 4096])
}

#[tokio::test]
async fn degraded_writes_beyond_the_log_wait_for_cps_that_fit_their_partial_parity() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let store = PplStore::new(mem.clone());
    let vol = open(dir.path(), &store).await;
    // Scattered blocks (no two adjacent: each its own store write), more than the log holds
    // at once: writers wait for CPs, and every CP must fit its PPL records.
    let blocks: Vec<u64> = (0..100u64).map(|i| (i * 37) % 128 * 2).collect();
    for (i, &b) in blocks.iter().enumerate() {
        vol.write(b * 4096, block(b, i as u8)).await.unwrap();
    }
    vol.flush().await.unwrap();
    let status = vol.status();
    assert_eq!(status.last_cp_error, None);
    assert!(
        status.cps_done > 1 && status.writer_waits > 0,
        "writers waited for the log's room for partial parity, and several CPs made it \
         ({} CPs, {} waits)",
        status.cps_done,
        status.writer_waits
    );
    assert!(store.logged.load(Ordering::SeqCst) >= blocks.len() as u64 / 2);
    let contents = mem.contents();
    let mut last = std::collections::HashMap::new();
    for (i, &b) in blocks.iter().enumerate() {
        last.insert(b, i as u8);
    }
    for (b, v) in last {
        let at = (b * 4096) as usize;
        assert!(
            contents[at..at + 4096] == block(b, v)[..],
            "block {b} applied"
        );
    }
}

/// The failure a power-loss seed once hit on a degraded RAID 5 with a 64 KiB log: records whose
/// partial parity takes more log than they do fill the log, and each CP that drains it leaves
/// its PPL records behind, until one cannot log the partial parity of its first record and the
/// client's write fails. Here: WRITE_ZEROES records of 64 bytes that each log a 4 KiB column,
/// and 4 KiB writes, far more than the log holds, with no FLUSH (which would run a CP) between.
#[tokio::test]
async fn records_logging_more_partial_parity_than_their_size_never_fail_a_write() {
    const BLOCKS: u64 = 4096;
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(BLOCKS * 4096, STRIPE_BYTES);
    let store = PplStore::new(mem.clone());
    let vol = open(dir.path(), &store).await;
    // Every other block: no two adjacent, so each is its own store update and PPL record.
    for i in 0..BLOCKS / 2 {
        let b = (i * 2 * 37) % BLOCKS;
        let result = if i % 3 == 0 {
            vol.write(b * 4096, block(b, 7)).await
        } else {
            vol.write_zeroes(b * 4096, 4096).await
        };
        if let Err(e) = result {
            panic!("operation {i} (block {b}) failed: {e}");
        }
    }
    vol.flush().await.unwrap();
    assert_eq!(vol.status().last_cp_error, None);
    let contents = mem.contents();
    for i in 0..BLOCKS / 2 {
        let b = (i * 2 * 37) % BLOCKS;
        let at = (b * 4096) as usize;
        let want = if i % 3 == 0 {
            block(b, 7)
        } else {
            Bytes::from(vec![0u8; 4096])
        };
        assert!(contents[at..at + 4096] == want[..], "block {b} applied");
    }
}

/// A member fails while a CP runs: the CP planned without partial parity, its store starts
/// logging at its first write, and the log has no room for the partial parity of everything the
/// CP applies. The CP runs again over fewer records instead of failing the writers.
#[tokio::test]
async fn a_store_that_starts_logging_during_a_cp_gets_smaller_cps_not_errors() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let store = PplStore::new(mem.clone());
    store.active.store(false, Ordering::SeqCst);
    let vol = open(dir.path(), &store).await;
    let blocks: Vec<u64> = (0..128u64).map(|i| (i * 37) % 128 * 2).collect();
    // Whole: the log fills up to the reserve of one record.
    for &b in &blocks[..24] {
        vol.write(b * 4096, block(b, 1)).await.unwrap();
    }
    store.activate_on_write.store(true, Ordering::SeqCst);
    for &b in &blocks[24..] {
        if let Err(e) = vol.write(b * 4096, block(b, 1)).await {
            panic!("write of block {b} failed: {e}");
        }
    }
    vol.flush().await.unwrap();
    assert!(store.active.load(Ordering::SeqCst));
    assert_eq!(vol.status().last_cp_error, None);
    let contents = mem.contents();
    for &b in &blocks {
        let at = (b * 4096) as usize;
        assert!(
            contents[at..at + 4096] == block(b, 1)[..],
            "block {b} applied"
        );
    }
}

#[tokio::test]
async fn ppl_records_of_an_interrupted_cp_come_back_and_finished_ones_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let store = PplStore::new(mem.clone());
    let vol = open(dir.path(), &store).await;
    vol.write(0, block(0, 1)).await.unwrap();
    vol.write(3 * 4096, block(3, 1)).await.unwrap();
    // The store logs its partial parity, then its writes fail: the CP stops after its PPL
    // records, as a power cut would.
    mem.set_fail_writes(true);
    assert!(vol.checkpoint().await.is_err());
    let logged = store.logged.load(Ordering::SeqCst);
    assert!(logged >= 1);
    drop(vol);
    tokio::task::yield_now().await;
    mem.set_fail_writes(false);
    let store2 = PplStore::new(mem.clone());
    let vol = open(dir.path(), &store2).await;
    let (payloads, complete) = store2.replayed.lock().unwrap().clone().unwrap();
    assert!(complete);
    assert_eq!(
        payloads.len() as u64,
        logged,
        "every PPL record of the interrupted CP"
    );
    for p in &payloads {
        assert!(
            (p[0] == 1 || p[0] == 4) && p.iter().all(|&b| b == p[0]),
            "the store's bytes as persisted"
        );
    }
    // A CP that finishes retires its PPL records.
    assert!(vol.checkpoint().await.unwrap());
    drop(vol);
    tokio::task::yield_now().await;
    let store3 = PplStore::new(mem.clone());
    let _vol = open(dir.path(), &store3).await;
    let (payloads, _) = store3.replayed.lock().unwrap().clone().unwrap();
    assert!(
        payloads.is_empty(),
        "retired by the finished CP: {}",
        payloads.len()
    );
}
