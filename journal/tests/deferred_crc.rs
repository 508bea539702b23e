//! Recovery serves before it has checked the CRC of every recovered record (see
//! `twinblock_journal::verify`): these tests check that a damaged record found that way is never
//! read or applied, and that an intact log is verified in the background and applied by the
//! first CP.
//!
//! The log must be larger than the part a deferred scan checks itself (the newest 4 MiB and 64
//! records), so each test writes about 6 MiB of 4 KiB records into an 8 MiB log.

use std::path::Path;
use std::time::Duration;

use bytes::Bytes;
use twinblock_journal::{JournalError, JournaledVolume, MemBacking, Nvram, VolumeConfig};

mod common;
use common::{nvram_at, quiet_cfg};

const BLOCK: u64 = 4096;
const VOLUME_BYTES: u64 = 16 << 20;
const WRITES: u64 = 1500;
const LOG_BYTES: u64 = 8 << 20;

fn pattern(i: u64) -> u8 {
    (i % 250 + 1) as u8
}

/// Writes block i with pattern(i), then drops the volume without a CP (a crash).
async fn fill(dir: &Path, mem: &MemBacking) {
    let vol = JournaledVolume::open(
        Nvram::open(&nvram_at(dir, LOG_BYTES)).unwrap(),
        mem.clone(),
        1,
        quiet_cfg(),
    )
    .await
    .unwrap();
    for i in 0..WRITES {
        let data = Bytes::from(vec![pattern(i); BLOCK as usize]);
        vol.write(i * BLOCK, data).await.unwrap();
    }
    drop(vol);
}

/// Flips one payload byte of the record holding block `block` (as a media error would).
fn damage_block_record(dir: &Path, block: u64) {
    let mut nv = Nvram::open(&nvram_at(dir, LOG_BYTES)).unwrap();
    let mut region = nv.take_own().unwrap();
    let scan = region.scan();
    let r = scan
        .records
        .iter()
        .find(|r| r.header.kind.is_data() && r.header.offset == block * BLOCK)
        .copied()
        .unwrap();
    let at = r.payload_offset() + 100;
    let byte = region.log_slice(at, 1)[0] ^ 0x40;
    region.write_log(at, &[byte]);
}

async fn open(dir: &Path, mem: &MemBacking) -> JournaledVolume<MemBacking> {
    JournaledVolume::open(
        Nvram::open(&nvram_at(dir, LOG_BYTES)).unwrap(),
        mem.clone(),
        1,
        quiet_cfg(),
    )
    .await
    .unwrap()
}

async fn wait_verified(vol: &JournaledVolume<MemBacking>) {
    for _ in 0..1000 {
        let st = vol.status();
        if st.crc_unverified_records == 0 || st.corrupt.is_some() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("background CRC check did not finish: {:?}", vol.status());
}

#[tokio::test]
async fn intact_log_serves_at_once_and_is_verified_then_applied() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, 65536);
    fill(dir.path(), &mem).await;
    let vol = open(dir.path(), &mem).await;
    assert!(vol.recovery().applied_in_background);
    let got = vol.read(0, BLOCK).await.unwrap();
    assert!(got.iter().all(|&b| b == pattern(0)));
    wait_verified(&vol).await;
    let st = vol.status();
    assert_eq!((st.crc_unverified_records, st.corrupt), (0, None));
    // The CP asked for at open may already have run; either way the records are applied now.
    vol.checkpoint().await.unwrap();
    assert_eq!(vol.status().dirty_extents, 0);
    let store = mem.contents();
    for i in [0, 1, WRITES / 2, WRITES - 1] {
        let b = &store[(i * BLOCK) as usize..((i + 1) * BLOCK) as usize];
        assert!(b.iter().all(|&x| x == pattern(i)), "block {i} in the store");
    }
}

#[tokio::test]
async fn damaged_old_record_is_never_read() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, 65536);
    fill(dir.path(), &mem).await;
    damage_block_record(dir.path(), 3);
    let vol = open(dir.path(), &mem).await;
    // Whether the read or the background check meets the damage first, the read fails.
    match vol.read(3 * BLOCK, BLOCK).await {
        Err(JournalError::CorruptRecordFound { seq, .. }) => assert!(seq > 0),
        other => panic!("read of a damaged record returned {other:?}"),
    }
    wait_verified(&vol).await;
    let st = vol.status();
    assert!(
        st.corrupt
            .as_deref()
            .unwrap_or("")
            .contains("fails its CRC check"),
        "{st:?}"
    );
    // Nothing else is served either, and nothing is applied.
    assert!(vol.read(0, BLOCK).await.is_err());
    assert!(vol.write(0, Bytes::from(vec![9; 4096])).await.is_err());
    assert!(vol.checkpoint().await.is_err());
    assert!(
        mem.contents().iter().all(|&b| b == 0),
        "a damaged log reached the store"
    );
}

#[tokio::test]
async fn damage_found_by_the_background_check_stops_the_first_cp() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, 65536);
    fill(dir.path(), &mem).await;
    damage_block_record(dir.path(), 7);
    let vol = open(dir.path(), &mem).await;
    // No read touches the damaged record: the background check finds it, and the CP (which
    // waits for the check) refuses to apply anything.
    assert!(vol.checkpoint().await.is_err());
    assert!(vol.status().corrupt.is_some());
    assert!(mem.contents().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn discard_corrupt_log_uses_the_full_scan_and_keeps_the_records_before_the_damage() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, 65536);
    fill(dir.path(), &mem).await;
    damage_block_record(dir.path(), 5);
    let cfg = VolumeConfig {
        discard_corrupt_log: true,
        ..quiet_cfg()
    };
    let vol = JournaledVolume::open(
        Nvram::open(&nvram_at(dir.path(), LOG_BYTES)).unwrap(),
        mem.clone(),
        1,
        cfg,
    )
    .await
    .unwrap();
    assert!(vol.recovery().damaged_tail_discarded);
    assert_eq!(vol.status().corrupt, None);
    for i in 0..5 {
        let got = vol.read(i * BLOCK, BLOCK).await.unwrap();
        assert!(got.iter().all(|&b| b == pattern(i)), "block {i}");
    }
}
