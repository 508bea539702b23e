//! What FLUSH and FUA promise: once they return, the covered writes survive the loss of this
//! host's power. With NVRAM on a medium that survives it (`msync` on a disk file) that holds at
//! once; with NVRAM in RAM (`none`, or any file on tmpfs) they wait for a CP, shared by
//! concurrent flushes; an in-sync partner holding the records also suffices.
//!
//! "Survives power loss" is checked on the store with [`MemBacking::crash`], which drops every
//! write the store did not flush.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use twinblock_journal::{
    JournaledVolume, MemBacking, MirrorHook, MirrorOutcome, Nvram, NvramConfig, PersistenceMode,
};

mod common;
use common::{nvram_at, quiet_cfg};

const VOLUME_BYTES: u64 = 1024 * 1024;
const STRIPE_BYTES: u64 = 64 * 1024;

fn nvram_cfg(dir: &Path, persistence: PersistenceMode) -> NvramConfig {
    NvramConfig {
        persistence,
        ..nvram_at(dir, 1 << 20)
    }
}

fn block(seed: u8) -> Bytes {
    Bytes::from(vec![seed; 4096])
}

async fn open_in(
    dir: &Path,
    persistence: PersistenceMode,
    backing: MemBacking,
) -> JournaledVolume<MemBacking> {
    let nv = Nvram::open(&nvram_cfg(dir, persistence)).unwrap();
    JournaledVolume::open(nv, backing, 1, quiet_cfg())
        .await
        .unwrap()
}

#[tokio::test]
async fn flush_with_volatile_nvram_returns_after_the_writes_reach_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::with_yields(VOLUME_BYTES, STRIPE_BYTES);
    let vol = open_in(dir.path(), PersistenceMode::None, mem.clone()).await;
    assert!(!vol.ack_survives_power_loss());
    vol.write(0, block(7)).await.unwrap();
    vol.write(8192, block(8)).await.unwrap();
    assert_eq!(vol.durable_seq(), 0, "records in RAM survive no power loss");
    vol.flush().await.unwrap();
    mem.crash();
    let got = mem.contents();
    assert!(got[..4096].iter().all(|&b| b == 7));
    assert!(got[8192..12288].iter().all(|&b| b == 8));
    assert_eq!(vol.status().cps_done, 1);
}

#[tokio::test]
async fn fua_write_with_volatile_nvram_is_in_the_flushed_store_when_it_returns() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::with_yields(VOLUME_BYTES, STRIPE_BYTES);
    let vol = open_in(dir.path(), PersistenceMode::None, mem.clone()).await;
    vol.write_fua(4096, block(3)).await.unwrap();
    vol.write_zeroes_fua(0, 100).await.unwrap();
    mem.crash();
    assert!(mem.contents()[4096..8192].iter().all(|&b| b == 3));
    assert!(vol.durable_seq() >= 2);
}

#[tokio::test]
async fn concurrent_flushes_share_one_cp() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::with_yields(VOLUME_BYTES, STRIPE_BYTES);
    let vol = open_in(dir.path(), PersistenceMode::None, mem.clone()).await;
    for i in 0..16u64 {
        vol.write(i * 4096, block(i as u8 + 1)).await.unwrap();
    }
    let flushes = (0..8).map(|_| vol.flush());
    for r in futures_join_all(flushes).await {
        r.unwrap();
    }
    assert_eq!(vol.status().cps_done, 1, "eight flushes, one CP");
}

#[tokio::test]
async fn flush_with_nvram_on_a_persistent_disk_needs_no_cp() {
    let dir = tempfile::tempdir().unwrap();
    let nv = Nvram::open(&nvram_cfg(dir.path(), PersistenceMode::Msync)).unwrap();
    if !nv.survives_power_loss() {
        println!(
            "SKIPPED flush_with_nvram_on_a_persistent_disk_needs_no_cp: the temp dir {} is on tmpfs",
            dir.path().display()
        );
        return;
    }
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let vol = JournaledVolume::open(nv, mem.clone(), 1, quiet_cfg())
        .await
        .unwrap();
    assert!(vol.ack_survives_power_loss());
    vol.write(0, block(9)).await.unwrap();
    vol.write_fua(4096, block(9)).await.unwrap();
    vol.flush().await.unwrap();
    assert_eq!(vol.status().cps_done, 0, "the msync'ed record is enough");
    assert!(vol.durable_seq() >= 2);
}

#[tokio::test]
async fn msync_on_tmpfs_does_not_count_as_surviving_power_loss() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        println!("SKIPPED msync_on_tmpfs_does_not_count_as_surviving_power_loss: no /dev/shm");
        return;
    }
    let dir = tempfile::tempdir_in(shm).unwrap();
    let nv = Nvram::open(&nvram_cfg(dir.path(), PersistenceMode::Msync)).unwrap();
    assert!(!nv.survives_power_loss());
}

/// A partner that reports it holds every record up to `held`.
struct HoldingPartner {
    held: AtomicU64,
}

#[async_trait]
impl MirrorHook for HoldingPartner {
    fn enabled(&self) -> bool {
        false
    }
    async fn ship(&self, _log_offset: u64, _seq: u64, _record: Bytes) -> MirrorOutcome {
        MirrorOutcome::NotMirrored
    }
    fn log_reset(&self, _generation: u64, _tail_offset: u64, _tail_seq: u64) {}
    fn partner_durable_seq(&self) -> Option<u64> {
        Some(self.held.load(Ordering::SeqCst))
    }
}

#[tokio::test]
async fn flush_covered_by_an_in_sync_partner_needs_no_cp() {
    let dir = tempfile::tempdir().unwrap();
    let partner = Arc::new(HoldingPartner {
        held: AtomicU64::new(0),
    });
    let nv = Nvram::open(&nvram_cfg(dir.path(), PersistenceMode::None)).unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let vol = JournaledVolume::open_with_mirror(nv, mem.clone(), 1, quiet_cfg(), partner.clone())
        .await
        .unwrap();
    vol.write(0, block(1)).await.unwrap();
    let seq = vol.status().next_seq - 1;
    partner.held.store(seq, Ordering::SeqCst);
    vol.flush().await.unwrap();
    assert_eq!(vol.status().cps_done, 0, "the partner holds the record");
    vol.write(4096, block(2)).await.unwrap();
    vol.flush().await.unwrap();
    assert_eq!(
        vol.status().cps_done,
        1,
        "a record the partner does not hold needs a CP"
    );
}

/// Polls all futures to completion (no extra dependency for a join).
async fn futures_join_all<F: std::future::Future>(futs: impl Iterator<Item = F>) -> Vec<F::Output> {
    let handles: Vec<_> = futs.map(Box::pin).collect();
    let mut outs: Vec<Option<F::Output>> = handles.iter().map(|_| None).collect();
    let mut handles: Vec<Option<_>> = handles.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (h, out) in handles.iter_mut().zip(outs.iter_mut()) {
            if let Some(f) = h {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        *out = Some(v);
                        *h = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    outs.into_iter().map(|o| o.unwrap()).collect()
}
