//! A lost NVRAM file (power cut with the file in RAM, modelled by deleting it after a crash):
//! the store's journal mark tells the next start that acknowledged writes may be lost, a clean
//! stop tells it nothing was, and the partner's copy of the log brings every record back.

use std::path::Path;

use bytes::Bytes;
use twinblock_journal::restore::{restore_into, FetchedLog, RestoreTarget};
use twinblock_journal::{
    check_log_continuity, Backing, JournaledVolume, LossCause, MemBacking, Nvram,
};

mod common;
use common::{nvram_at, pattern, quiet_cfg};

const VOLUME_BYTES: u64 = 1024 * 1024;
const STRIPE_BYTES: u64 = 64 * 1024;
const LOG_BYTES: u64 = 1 << 20;
const STORE: [u8; 16] = [0x51; 16];
const VOLUME_ID: u64 = 1;

fn backing() -> MemBacking {
    MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_store_id(STORE)
}

/// Opens a volume, writes A and checkpoints it, then writes B (acknowledged, not applied).
async fn run_until_crash(dir: &Path, mem: &MemBacking) -> JournaledVolume<MemBacking> {
    let nv = Nvram::open(&nvram_at(dir, LOG_BYTES)).unwrap();
    let vol = JournaledVolume::open(nv, mem.clone(), VOLUME_ID, quiet_cfg())
        .await
        .unwrap();
    vol.write(0, pattern(1, 8192)).await.unwrap();
    assert!(vol.checkpoint().await.unwrap());
    vol.write(65536, pattern(2, 8192)).await.unwrap();
    vol.write(4096, pattern(3, 4096)).await.unwrap();
    vol
}

/// The power cut: the daemon dies, the store keeps what was flushed, the NVRAM file vanishes.
fn power_cut(vol: JournaledVolume<MemBacking>, mem: &MemBacking, dir: &Path) {
    drop(vol);
    mem.crash();
    std::fs::remove_file(dir.join("nvram.img")).unwrap();
}

#[tokio::test]
async fn lost_nvram_after_unclean_stop_is_reported_with_the_lost_seq_range() {
    let dir = tempfile::tempdir().unwrap();
    let mem = backing();
    let vol = run_until_crash(dir.path(), &mem).await;
    let applied = vol.status().applied_seq;
    power_cut(vol, &mem, dir.path());
    let nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    let loss = check_log_continuity(&nv, &mem)
        .await
        .unwrap()
        .expect("a blank log after an unclean stop is a loss");
    assert_eq!(loss.first_lost_seq, applied + 1);
    assert_eq!(loss.cause, LossCause::MissingOrBlank);
    assert!(loss.last_cp_unix_ms > 0);
    assert!(!loss.medium_survives_power_loss);
    let text = loss.describe();
    assert!(text.contains(&format!("seq {}", applied + 1)), "{text}");
    assert!(text.contains("does not survive a loss of power"), "{text}");
    // The same check at a second start (the first refused): the file is no longer new, but its
    // log was never used, so it is still a blank log.
    drop(nv);
    let nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    let again = check_log_continuity(&nv, &mem).await.unwrap().unwrap();
    assert_eq!(again.cause, LossCause::MissingOrBlank);
}

#[tokio::test]
async fn lost_nvram_after_clean_stop_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = backing();
    let vol = run_until_crash(dir.path(), &mem).await;
    assert!(vol.stop_clean().await.unwrap());
    power_cut(vol, &mem, dir.path());
    let nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    assert_eq!(check_log_continuity(&nv, &mem).await.unwrap(), None);
    let vol = JournaledVolume::open(nv, mem.clone(), VOLUME_ID, quiet_cfg())
        .await
        .unwrap();
    assert_eq!(vol.read(65536, 8192).await.unwrap(), pattern(2, 8192));
}

#[tokio::test]
async fn intact_nvram_after_unclean_stop_is_no_loss() {
    let dir = tempfile::tempdir().unwrap();
    let mem = backing();
    let vol = run_until_crash(dir.path(), &mem).await;
    drop(vol);
    mem.crash();
    let nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    assert_eq!(check_log_continuity(&nv, &mem).await.unwrap(), None);
    let vol = JournaledVolume::open(nv, mem.clone(), VOLUME_ID, quiet_cfg())
        .await
        .unwrap();
    assert_eq!(vol.read(65536, 8192).await.unwrap(), pattern(2, 8192));
}

#[tokio::test]
async fn accepted_loss_serves_and_rebinds_the_store_to_the_new_log() {
    let dir = tempfile::tempdir().unwrap();
    let mem = backing();
    let vol = run_until_crash(dir.path(), &mem).await;
    power_cut(vol, &mem, dir.path());
    let nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    assert!(check_log_continuity(&nv, &mem).await.unwrap().is_some());
    // The operator accepted: the journal opens on the new log and the store names it.
    let new_id = nv.log_id();
    let vol = JournaledVolume::open(nv, mem.clone(), VOLUME_ID, quiet_cfg())
        .await
        .unwrap();
    assert_eq!(mem.journal_mark().await.unwrap().unwrap().log_id, new_id);
    assert_eq!(vol.read(0, 8192).await.unwrap(), pattern(1, 8192));
    assert_eq!(
        vol.read(65536, 8192).await.unwrap(),
        Bytes::from(vec![0u8; 8192]),
        "the unapplied write is gone: that is the loss that was accepted"
    );
    drop(vol);
    mem.crash();
    let nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    assert_eq!(check_log_continuity(&nv, &mem).await.unwrap(), None);
}

#[tokio::test]
async fn log_restored_from_the_partners_copy_reads_back_every_write() {
    let dir = tempfile::tempdir().unwrap();
    let mem = backing();
    let vol = run_until_crash(dir.path(), &mem).await;
    // What an in-sync partner holds: every unretired record, at the same offsets.
    let live = vol.unretired_records();
    let copy = FetchedLog {
        store_id: STORE,
        generation: live.generation,
        tail_offset: live.tail_offset,
        tail_seq: live.tail_seq,
        last_seq: live.next_seq - 1,
        records: live.records,
    };
    let applied = vol.status().applied_seq;
    power_cut(vol, &mem, dir.path());
    let mut nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    assert!(check_log_continuity(&nv, &mem).await.unwrap().is_some());
    let target = RestoreTarget {
        store_id: STORE,
        volume_id: VOLUME_ID,
        log_bytes: LOG_BYTES,
        from_seq: applied + 1,
    };
    restore_into(&mut nv.take_own().unwrap(), &target, &copy).unwrap();
    drop(nv);
    let nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    assert!(
        nv.generation() > copy.generation,
        "the next log generation is past the restored one"
    );
    let vol = JournaledVolume::open(nv, mem.clone(), VOLUME_ID, quiet_cfg())
        .await
        .unwrap();
    assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(1, 4096));
    assert_eq!(vol.read(4096, 4096).await.unwrap(), pattern(3, 4096));
    assert_eq!(vol.read(65536, 8192).await.unwrap(), pattern(2, 8192));
    assert!(vol.checkpoint().await.unwrap());
    assert_eq!(&mem.contents()[65536..65536 + 8192], &pattern(2, 8192)[..]);
}

#[tokio::test]
async fn refused_copy_writes_nothing_into_the_own_log() {
    let dir = tempfile::tempdir().unwrap();
    let mem = backing();
    let vol = run_until_crash(dir.path(), &mem).await;
    let live = vol.unretired_records();
    let mut copy = FetchedLog {
        store_id: [0x77; 16],
        generation: live.generation,
        tail_offset: live.tail_offset,
        tail_seq: live.tail_seq,
        last_seq: live.next_seq - 1,
        records: live.records,
    };
    let applied = vol.status().applied_seq;
    power_cut(vol, &mem, dir.path());
    let mut nv = Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap();
    let mut own = nv.take_own().unwrap();
    let target = RestoreTarget {
        store_id: STORE,
        volume_id: VOLUME_ID,
        log_bytes: LOG_BYTES,
        from_seq: applied + 1,
    };
    let e = restore_into(&mut own, &target, &copy).unwrap_err();
    assert!(e.to_string().contains("store"), "{e}");
    copy.store_id = STORE;
    copy.records.remove(0);
    assert!(restore_into(&mut own, &target, &copy).is_err());
    assert!(own.control().is_none(), "no control slot written");
    assert!(own.log().iter().all(|&b| b == 0), "no record written");
}
