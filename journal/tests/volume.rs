//! Behaviour of the journaled volume over an in-memory backing: overlay reads, CPs, stripe
//! gathering, back-pressure, writes during a CP, recovery and its refusals.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::Semaphore;
use twinblock_journal::{
    Backing, BackingError, JournalError, JournaledVolume, MemBacking, Nvram, NvramConfig,
    VolumeConfig,
};

mod common;
use common::{nvram_at, open_volume, pattern, quiet_cfg, HookedBacking, WriteHook};

const VOLUME_BYTES: u64 = 1024 * 1024;
const STRIPE_BYTES: u64 = 64 * 1024;

#[tokio::test]
async fn reads_overlay_dirty_writes_on_backing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    vol.write(1000, pattern(1, 5000)).await.unwrap();
    vol.write(3000, pattern(2, 100)).await.unwrap();
    vol.write_zeroes(4000, 50).await.unwrap();
    let got = vol.read(0, 8192).await.unwrap();
    let mut want = vec![0u8; 8192];
    want[1000..6000].copy_from_slice(&pattern(1, 5000));
    want[3000..3100].copy_from_slice(&pattern(2, 100));
    want[4000..4050].fill(0);
    assert_eq!(&got[..], &want[..]);
    assert!(
        mem.contents()[..8192].iter().all(|&b| b == 0),
        "nothing applied before a CP"
    );
    assert!(vol.checkpoint().await.unwrap());
    assert_eq!(&mem.contents()[..8192], &want[..]);
    assert_eq!(vol.read(0, 8192).await.unwrap(), Bytes::from(want));
    let st = vol.status();
    assert_eq!(st.dirty_extents, 0);
    assert_eq!(mem.applied_seq().await.unwrap(), st.applied_seq);
}

#[tokio::test]
async fn out_of_range_requests_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let vol = open_volume(
        dir.path(),
        1 << 20,
        MemBacking::new(VOLUME_BYTES, 1),
        quiet_cfg(),
    )
    .await
    .unwrap();
    assert!(matches!(
        vol.write(VOLUME_BYTES - 10, pattern(0, 11)).await,
        Err(JournalError::OutOfRange { .. })
    ));
    assert!(vol.read(u64::MAX - 1, 4).await.is_err());
}

#[tokio::test]
async fn cp_gathers_full_stripes_from_scattered_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    // Two stripes written as 32 blocks of 4 KiB in a scrambled order.
    let mut blocks: Vec<u64> = (0..32).collect();
    blocks.sort_by_key(|b| (b * 7919) % 32);
    for b in blocks {
        vol.write(b * 4096, pattern(b as u8, 4096)).await.unwrap();
    }
    vol.checkpoint().await.unwrap();
    let stats = mem.stats();
    assert_eq!(stats.writes, 1, "one coalesced write for two stripes");
    assert_eq!(stats.full_stripe_writes, 1);
    for b in 0..32u64 {
        let at = (b * 4096) as usize;
        assert_eq!(&mem.contents()[at..at + 4096], &pattern(b as u8, 4096)[..]);
    }
}

#[tokio::test]
async fn cp_hands_the_blocks_of_one_stripe_to_the_store_together() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    // Old contents the store must keep around the new blocks.
    let old = pattern(200, STRIPE_BYTES as usize);
    mem.write(STRIPE_BYTES, old.clone()).await.unwrap();
    let before = mem.stats();
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    // Three separate 4 KiB blocks in the second stripe, one alone in the fourth.
    for b in [1u64, 3, 5] {
        vol.write(STRIPE_BYTES + b * 8192, pattern(b as u8, 4096))
            .await
            .unwrap();
    }
    vol.write(3 * STRIPE_BYTES + 4096, pattern(99, 4096))
        .await
        .unwrap();
    vol.checkpoint().await.unwrap();
    let stats = mem.stats();
    assert_eq!(
        stats.scattered_calls - before.scattered_calls,
        1,
        "the three blocks of one stripe in one call"
    );
    assert_eq!(stats.scattered_pieces - before.scattered_pieces, 3);
    assert_eq!(
        stats.writes - before.writes,
        4,
        "three pieces plus the lone block"
    );
    assert_eq!(stats.full_stripe_writes - before.full_stripe_writes, 0);
    let mut want = old.to_vec();
    for b in [1usize, 3, 5] {
        want[b * 8192..b * 8192 + 4096].copy_from_slice(&pattern(b as u8, 4096));
    }
    let contents = mem.contents();
    assert_eq!(
        &contents[STRIPE_BYTES as usize..2 * STRIPE_BYTES as usize],
        &want[..]
    );
    let lone = 3 * STRIPE_BYTES as usize + 4096;
    assert_eq!(&contents[lone..lone + 4096], &pattern(99, 4096)[..]);
}

/// Store writes wait for permits, to hold a CP in the middle.
#[derive(Clone)]
struct Gate(Arc<Semaphore>);

#[async_trait]
impl WriteHook for Gate {
    async fn write(
        &self,
        inner: &MemBacking,
        offset: u64,
        data: Bytes,
    ) -> Result<(), BackingError> {
        let permit = self
            .0
            .acquire()
            .await
            .map_err(|e| BackingError(e.to_string()))?;
        permit.forget();
        inner.write(offset, data).await
    }
}

#[tokio::test]
async fn writer_waits_for_cp_when_log_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, 4096);
    let gate = Arc::new(Semaphore::new(0));
    let backing = HookedBacking {
        inner: mem.clone(),
        hook: Gate(Arc::clone(&gate)),
    };
    let cfg = VolumeConfig {
        max_record_payload_bytes: 4096,
        ..quiet_cfg()
    };
    let log_bytes = 64 * 1024;
    let vol = Arc::new(
        open_volume(dir.path(), log_bytes, backing, cfg)
            .await
            .unwrap(),
    );
    // Fill the log until a write blocks.
    let mut written = 0u64;
    loop {
        let v = Arc::clone(&vol);
        let at = written * 4096;
        let w = tokio::spawn(async move { v.write(at, pattern((at / 4096) as u8, 4096)).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        if vol.status().writer_waits > 0 {
            assert!(
                written >= 10,
                "log of 64 KiB should take 10+ records, took {written}"
            );
            // The CP is stuck on the gate: the writer must still be waiting.
            tokio::time::sleep(Duration::from_millis(50)).await;
            assert!(!w.is_finished(), "writer must wait while the log is full");
            gate.add_permits(1000);
            tokio::time::timeout(Duration::from_secs(5), w)
                .await
                .expect("writer released after CP")
                .unwrap()
                .unwrap();
            break;
        }
        w.await.unwrap().unwrap();
        written += 1;
        assert!(written < 100, "log never filled");
    }
    for b in 0..=written {
        let at = b * 4096;
        assert_eq!(vol.read(at, 4096).await.unwrap(), pattern(b as u8, 4096));
    }
    assert!(vol.status().cps_done >= 1);
}

#[tokio::test]
async fn writes_during_cp_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, 4096);
    let gate = Arc::new(Semaphore::new(0));
    let backing = HookedBacking {
        inner: mem.clone(),
        hook: Gate(Arc::clone(&gate)),
    };
    let vol = Arc::new(
        open_volume(dir.path(), 1 << 20, backing, quiet_cfg())
            .await
            .unwrap(),
    );
    vol.write(0, pattern(1, 8192)).await.unwrap();
    let v = Arc::clone(&vol);
    let cp = tokio::spawn(async move { v.checkpoint().await });
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(!cp.is_finished());
    // Overwrite half of what the CP is applying.
    vol.write(4096, pattern(2, 4096)).await.unwrap();
    gate.add_permits(100);
    assert!(cp.await.unwrap().unwrap());
    let mut want = pattern(1, 8192).to_vec();
    want[4096..].copy_from_slice(&pattern(2, 4096));
    assert_eq!(vol.read(0, 8192).await.unwrap(), Bytes::from(want.clone()));
    assert_eq!(vol.status().dirty_extents, 1, "the newer write stays dirty");
    vol.checkpoint().await.unwrap();
    assert_eq!(&mem.contents()[..8192], &want[..]);
}

#[tokio::test]
async fn reopen_replays_unapplied_writes() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    {
        let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
            .await
            .unwrap();
        vol.write(0, pattern(1, 4096)).await.unwrap();
        vol.checkpoint().await.unwrap();
        vol.write(4096, pattern(2, 200_000)).await.unwrap();
        vol.trim(0, 100).await.unwrap();
        // Crash: no CP (a FLUSH would run one: this NVRAM does not survive power loss).
    }
    mem.crash();
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    let r = vol.recovery();
    assert_eq!(
        r.replayed_records, 5,
        "4 write records of <=64 KiB and a trim: {r:?}"
    );
    assert!(!r.damaged_tail_discarded, "{r:?}");
    assert_eq!(vol.read(4096, 200_000).await.unwrap(), pattern(2, 200_000));
    assert_eq!(
        &vol.read(100, 3996).await.unwrap()[..],
        &pattern(1, 4096)[100..]
    );
    assert!(r.applied_in_background, "{r:?}");
    // The first CP (started at open) applies and marks everything; reopening replays nothing.
    vol.checkpoint().await.unwrap();
    drop(vol);
    // Let the aborted flusher task (it may hold the volume while it waits for a CP) go away.
    tokio::task::yield_now().await;
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    assert_eq!(vol.recovery().replayed_records, 0);
    assert_eq!(vol.read(4096, 200_000).await.unwrap(), pattern(2, 200_000));
}

#[tokio::test]
async fn crashes_before_the_first_cp_after_recovery_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    {
        let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
            .await
            .unwrap();
        vol.write(0, pattern(1, 8192)).await.unwrap();
        vol.write_zeroes(4096, 100).await.unwrap();
    }
    mem.crash();
    let mut want = pattern(1, 8192).to_vec();
    want[4096..4196].fill(0);
    // Three more crashes, each right after open (the background CP cancelled) and after one
    // more write appended behind the recovered records.
    for round in 0..3u8 {
        let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
            .await
            .unwrap();
        assert!(vol.recovery().applied_in_background);
        assert_eq!(&vol.read(0, 8192).await.unwrap()[..], &want[..]);
        let at = 65536 + u64::from(round) * 4096;
        vol.write(at, pattern(10 + round, 4096)).await.unwrap();
        drop(vol);
        tokio::task::yield_now().await;
        mem.crash();
    }
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    assert!(!vol.recovery().damaged_tail_discarded);
    vol.checkpoint().await.unwrap();
    drop(vol);
    mem.crash();
    let got = mem.contents();
    assert_eq!(&got[..8192], &want[..]);
    for round in 0..3u8 {
        let at = 65536 + usize::from(round) * 4096;
        assert_eq!(&got[at..at + 4096], &pattern(10 + round, 4096)[..]);
    }
}

#[tokio::test]
async fn retired_records_are_never_redone() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let last_seq = {
        let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
            .await
            .unwrap();
        vol.write(0, pattern(1, 4096)).await.unwrap();
        vol.status().next_seq - 1
    };
    // The array already holds that transaction and something newer was written over it (e.g.
    // by the partner during a takeover): the record must be skipped.
    mem.write(0, pattern(9, 4096)).await.unwrap();
    mem.flush().await.unwrap();
    mem.set_applied_seq(last_seq).await.unwrap();
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    assert_eq!(vol.recovery().replayed_records, 0);
    assert_eq!(vol.recovery().skipped_retired_records, 1);
    assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(9, 4096));
}

/// Offset in the file of the own region's log (header area + control area).
const OWN_LOG_FILE_OFFSET: usize = 4096 + 4096;

#[tokio::test]
async fn corrupt_record_mid_log_refuses_start_unless_discard_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    {
        let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
            .await
            .unwrap();
        for i in 0..3u64 {
            vol.write(i * 4096, pattern(i as u8 + 1, 4096))
                .await
                .unwrap();
        }
    }
    let path = dir.path().join("nvram.img");
    let mut bytes = std::fs::read(&path).unwrap();
    // Second record's payload (records are 64 + 4096 bytes).
    bytes[OWN_LOG_FILE_OFFSET + 4160 + 64 + 10] ^= 0x40;
    std::fs::write(&path, &bytes).unwrap();
    let e = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap_err();
    assert!(matches!(e, JournalError::CorruptMidRegion { .. }), "{e}");
    assert!(
        mem.contents()[..3 * 4096].iter().all(|&b| b == 0),
        "nothing applied"
    );
    let cfg = VolumeConfig {
        discard_corrupt_log: true,
        ..quiet_cfg()
    };
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), cfg)
        .await
        .unwrap();
    let r = vol.recovery();
    assert!(r.damaged_tail_discarded);
    assert_eq!(r.replayed_records, 1);
    assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(1, 4096));
    assert!(vol.read(4096, 8192).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn torn_last_record_is_discarded_and_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    {
        let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
            .await
            .unwrap();
        vol.write(0, pattern(1, 4096)).await.unwrap();
        vol.write(4096, pattern(2, 4096)).await.unwrap();
    }
    let path = dir.path().join("nvram.img");
    let mut bytes = std::fs::read(&path).unwrap();
    // Tear the second record: its last 1000 payload bytes never made it.
    let second = OWN_LOG_FILE_OFFSET + 4160;
    bytes[second + 64 + 3096..second + 64 + 4096].fill(0);
    std::fs::write(&path, &bytes).unwrap();
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    let r = vol.recovery();
    assert!(r.damaged_tail_discarded);
    assert_eq!(r.replayed_records, 1);
    assert_eq!(r.scan.stop_offset, 4160);
    assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(1, 4096));
    assert!(vol.read(4096, 4096).await.unwrap().iter().all(|&b| b == 0));
}

#[tokio::test]
async fn records_of_another_volume_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    {
        let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
            .await
            .unwrap();
        vol.write(0, pattern(1, 4096)).await.unwrap();
    }
    let nv = Nvram::open(&nvram_at(dir.path(), 1 << 20)).unwrap();
    let e = JournaledVolume::open(nv, mem.clone(), 2, quiet_cfg())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            JournalError::ForeignVolume {
                found: 1,
                expected: 2,
                ..
            }
        ),
        "{e}"
    );
}

#[tokio::test]
async fn a_log_bound_to_one_store_is_never_replayed_into_another() {
    let dir = tempfile::tempdir().unwrap();
    let array_a = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_store_id([0xA; 16]);
    let array_b = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_store_id([0xB; 16]);
    {
        let vol = open_volume(dir.path(), 1 << 20, array_a.clone(), quiet_cfg())
            .await
            .unwrap();
        vol.write(8192, pattern(5, 4096)).await.unwrap();
        // Crash: the write is only in NVRAM.
    }
    array_a.crash();
    let e = open_volume(dir.path(), 1 << 20, array_b.clone(), quiet_cfg())
        .await
        .unwrap_err();
    assert!(matches!(e, JournalError::ForeignStore { .. }), "{e}");
    assert!(
        e.to_string()
            .contains("0a0a0a0a-0a0a-0a0a-0a0a-0a0a0a0a0a0a"),
        "{e}"
    );
    assert_eq!(
        array_b.stats().writes,
        0,
        "nothing applied to the other array"
    );
    // The right array still gets its write back.
    let vol = open_volume(dir.path(), 1 << 20, array_a.clone(), quiet_cfg())
        .await
        .unwrap();
    assert_eq!(vol.recovery().replayed_records, 1);
    assert_eq!(vol.read(8192, 4096).await.unwrap(), pattern(5, 4096));
    let dump = twinblock_journal::dump::dump_file(&dir.path().join("nvram.img")).unwrap();
    assert!(
        dump.to_string()
            .contains("store 0a0a0a0a-0a0a-0a0a-0a0a-0a0a0a0a0a0a"),
        "{dump}"
    );
    assert!(
        dump.to_json()
            .contains("\"store_id\": \"0a0a0a0a-0a0a-0a0a-0a0a-0a0a0a0a0a0a\""),
        "{}",
        dump.to_json()
    );
}

#[tokio::test]
async fn an_emptied_log_may_move_to_a_new_store() {
    let dir = tempfile::tempdir().unwrap();
    let old_array = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_store_id([0xA; 16]);
    let new_array = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_store_id([0xB; 16]);
    {
        let vol = open_volume(dir.path(), 1 << 20, old_array.clone(), quiet_cfg())
            .await
            .unwrap();
        vol.write(0, pattern(1, 4096)).await.unwrap();
        vol.close().await.unwrap(); // final CP: nothing left unapplied
    }
    let vol = open_volume(dir.path(), 1 << 20, new_array.clone(), quiet_cfg())
        .await
        .unwrap();
    assert_eq!(vol.recovery().replayed_records, 0);
    assert_eq!(new_array.stats().writes, 0);
    vol.write(4096, pattern(2, 4096)).await.unwrap();
    drop(vol);
    // Now bound to the new store: the old one is refused while a write is unapplied.
    let e = open_volume(dir.path(), 1 << 20, old_array.clone(), quiet_cfg())
        .await
        .unwrap_err();
    assert!(matches!(e, JournalError::ForeignStore { .. }), "{e}");
}

#[tokio::test]
async fn timer_and_fill_trigger_cps() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let cfg = VolumeConfig {
        cp_interval_ms: 10,
        ..quiet_cfg()
    };
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), cfg)
        .await
        .unwrap();
    vol.write(0, pattern(5, 4096)).await.unwrap();
    wait_for_cp(&vol).await;
    assert_eq!(&mem.contents()[..4096], &pattern(5, 4096)[..]);
    drop(vol);

    let dir = tempfile::tempdir().unwrap();
    let cfg = VolumeConfig {
        cp_fill_percent: 10,
        ..quiet_cfg()
    };
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), cfg)
        .await
        .unwrap();
    for i in 0..30u64 {
        vol.write(i * 4096, pattern(6, 4096)).await.unwrap();
    }
    wait_for_cp(&vol).await;
}

async fn wait_for_cp<B: Backing>(vol: &JournaledVolume<B>) {
    tokio::time::timeout(Duration::from_secs(10), async {
        while vol.status().cps_done == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("a CP must run");
}

#[tokio::test]
async fn dump_shows_records_cps_and_scan_end() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    {
        let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
            .await
            .unwrap();
        vol.write(0, pattern(1, 4096)).await.unwrap();
        vol.checkpoint().await.unwrap();
        vol.write(8192, pattern(2, 512)).await.unwrap();
        vol.write_zeroes(65536, 1 << 16).await.unwrap();
        // No FLUSH: with this NVRAM in RAM it would run a CP and retire everything.
    }
    let d = twinblock_journal::dump::dump_file(&dir.path().join("nvram.img")).unwrap();
    let own = &d.regions[0];
    let kinds: Vec<String> = own
        .records
        .iter()
        .map(|r| format!("{:?}", r.kind))
        .collect();
    // After the CP the log holds: TRANSITION (ack of seq 1), CP, WRITE, ZERO.
    assert_eq!(kinds, ["Transition", "Cp", "Write", "Zero"], "{d}");
    assert_eq!(own.cps.len(), 1);
    assert_eq!(own.cps[0].applied_seq, 1);
    assert!(own.scan.stop.is_clean_end());
    let text = d.to_string();
    assert!(text.contains("CP: applied through seq 1"), "{text}");
    assert!(text.contains("acknowledged"), "{text}");
    assert!(d.to_json().contains("\"records_valid\": 4"));
    assert_eq!(d.header.unwrap().node_id, 0);
}

#[tokio::test]
async fn msync_mode_journal_survives_reopen_and_reports_mode() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let cfg = NvramConfig {
        persistence: twinblock_journal::PersistenceMode::Msync,
        ..nvram_at(dir.path(), 256 * 1024)
    };
    {
        let vol = JournaledVolume::open(Nvram::open(&cfg).unwrap(), mem.clone(), 1, quiet_cfg())
            .await
            .unwrap();
        assert_eq!(
            vol.status().persist_method,
            twinblock_journal::PersistMethod::Msync
        );
        for i in 0..100u64 {
            vol.write(i * 4096, pattern(i as u8, 4096)).await.unwrap();
        }
    }
    mem.crash();
    let vol = JournaledVolume::open(Nvram::open(&cfg).unwrap(), mem.clone(), 1, quiet_cfg())
        .await
        .unwrap();
    assert!(vol.recovery().replayed_records > 0);
    for i in 0..100u64 {
        assert_eq!(
            vol.read(i * 4096, 4096).await.unwrap(),
            pattern(i as u8, 4096)
        );
    }
}

#[tokio::test]
async fn close_applies_everything_and_next_open_replays_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    vol.write(12345, pattern(7, 777)).await.unwrap();
    vol.close().await.unwrap();
    mem.crash();
    assert_eq!(&mem.contents()[12345..12345 + 777], &pattern(7, 777)[..]);
    let vol = open_volume(dir.path(), 1 << 20, mem.clone(), quiet_cfg())
        .await
        .unwrap();
    assert_eq!(vol.recovery().replayed_records, 0);
    assert!(!vol.recovery().damaged_tail_discarded);
}

#[tokio::test]
async fn full_log_with_failing_backing_errors_instead_of_hanging() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, 4096);
    let cfg = VolumeConfig {
        cp_interval_ms: 20,
        max_record_payload_bytes: 4096,
        ..quiet_cfg()
    };
    let vol = open_volume(dir.path(), 64 * 1024, mem.clone(), cfg)
        .await
        .unwrap();
    mem.set_fail_writes(true);
    let mut failed = None;
    for i in 0..100u64 {
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            vol.write(i * 4096, pattern(i as u8, 4096)),
        )
        .await
        .expect("a write must not hang while CPs fail");
        if let Err(e) = r {
            failed = Some((i, e));
            break;
        }
    }
    let (first_failed, e) = failed.expect("log filled without error");
    assert!(matches!(e, JournalError::CpFailed { .. }), "{e}");
    assert!(vol.status().last_cp_error.is_some());
    // Acknowledged writes still read back from NVRAM.
    assert_eq!(vol.read(0, 4096).await.unwrap(), pattern(0, 4096));
    // The array heals: the next CP succeeds and writes flow again.
    mem.set_fail_writes(false);
    tokio::time::timeout(Duration::from_secs(5), async {
        while vol.status().last_cp_error.is_some() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("CP recovers");
    vol.write(first_failed * 4096, pattern(1, 4096))
        .await
        .unwrap();
    assert_eq!(&mem.contents()[..4096], &pattern(0, 4096)[..]);
}

/// Stripes being written, writes in flight, most in flight seen, and whether two concurrent
/// writes ever touched one stripe.
#[derive(Default)]
struct StripeUse {
    stripes: std::collections::HashSet<u64>,
    in_flight: usize,
    max_in_flight: usize,
    conflict: bool,
}

/// Records how many store writes are in flight and whether two ever touched one stripe.
#[derive(Clone, Default)]
struct StripeCheck(Arc<std::sync::Mutex<StripeUse>>);

#[async_trait]
impl WriteHook for StripeCheck {
    async fn write(
        &self,
        inner: &MemBacking,
        offset: u64,
        data: Bytes,
    ) -> Result<(), BackingError> {
        let stripe = inner.stripe_bytes();
        let stripes: Vec<u64> =
            (offset / stripe..=(offset + data.len() as u64 - 1) / stripe).collect();
        {
            let mut b = self.0.lock().unwrap();
            if stripes.iter().any(|s| b.stripes.contains(s)) {
                b.conflict = true;
            }
            b.stripes.extend(&stripes);
            b.in_flight += 1;
            b.max_in_flight = b.max_in_flight.max(b.in_flight);
        }
        // Each write spans real time, so writes the CP runs in parallel do overlap whatever the
        // scheduler does, and serialised ones never do.
        tokio::time::sleep(Duration::from_millis(1)).await;
        let r = inner.write(offset, data).await;
        let mut b = self.0.lock().unwrap();
        for s in &stripes {
            b.stripes.remove(s);
        }
        b.in_flight -= 1;
        r
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cp_writes_run_in_parallel_but_never_two_on_one_stripe() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, 16 * 1024);
    let backing = HookedBacking {
        inner: mem.clone(),
        hook: StripeCheck::default(),
    };
    let vol = open_volume(dir.path(), 1 << 20, backing.clone(), quiet_cfg())
        .await
        .unwrap();
    let mut want = vec![0u8; VOLUME_BYTES as usize];
    // 100 scattered 1 KiB writes: many share a 16 KiB stripe without being adjacent.
    for i in 0..100u64 {
        let at = (i * 7919 * 1024) % (VOLUME_BYTES - 1024);
        let data = pattern(i as u8, 1024);
        want[at as usize..at as usize + 1024].copy_from_slice(&data);
        vol.write(at, data).await.unwrap();
    }
    vol.checkpoint().await.unwrap();
    assert_eq!(mem.contents(), want);
    let b = backing.hook.0.lock().unwrap();
    assert!(!b.conflict, "two concurrent CP writes touched one stripe");
    assert!(
        b.max_in_flight > 1,
        "CP writes never overlapped in time (max in flight {})",
        b.max_in_flight
    );
}
