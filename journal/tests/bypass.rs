//! Large writes that bypass the NVRAM data copy (STORED records): what goes to the store and
//! what to the log, that older journaled bytes of the range never come back (reads, CPs,
//! recovery, the partner's copy at takeover), and that a bypass racing CPs and small writes on
//! the same range leaves one state that reads, CPs and recovery all agree on.

use std::path::Path;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use twinblock_journal::format::RecordKind;
use twinblock_journal::{
    replay_region, Backing, JournaledVolume, MemBacking, MirrorHook, MirrorOutcome, Nvram,
    NvramConfig, PartnerRegion, PersistenceMode, VolumeConfig,
};

const STRIPE_BYTES: u64 = 16 * 1024;
const VOLUME_BYTES: u64 = 64 * STRIPE_BYTES;

fn nvram_cfg(dir: &Path, node: u32) -> NvramConfig {
    NvramConfig {
        path: dir.join(format!("node{node}.img")),
        log_bytes_per_region: 512 * 1024,
        ..NvramConfig::new(node, [6; 16])
    }
}

fn quiet_cfg() -> VolumeConfig {
    VolumeConfig {
        cp_interval_ms: 3_600_000,
        cp_fill_percent: 100,
        max_record_payload_bytes: 16 * 1024,
        ..VolumeConfig::default()
    }
}

async fn open(dir: &Path, mem: &MemBacking) -> JournaledVolume<MemBacking> {
    let nv = Nvram::open(&nvram_cfg(dir, 0)).unwrap();
    JournaledVolume::open(nv, mem.clone(), 1, quiet_cfg())
        .await
        .unwrap()
}

fn pattern(seed: u8, len: u64) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| seed.wrapping_add((i % 251) as u8))
            .collect::<Vec<u8>>(),
    )
}

fn live_kinds(dir: &Path) -> Vec<RecordKind> {
    let dump = twinblock_journal::dump::dump_file(&dir.join("node0.img")).unwrap();
    dump.regions[0].records.iter().map(|r| r.kind).collect()
}

#[tokio::test]
async fn whole_stripes_go_to_the_store_and_only_head_and_tail_to_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open(dir.path(), &mem).await;
    // 1 KiB before a stripe boundary, three whole stripes, 2 KiB after.
    let at = 4 * STRIPE_BYTES - 1024;
    let data = pattern(7, 1024 + 3 * STRIPE_BYTES + 2048);
    vol.write(at, data.clone()).await.unwrap();
    let stats = mem.stats();
    assert_eq!(stats.full_stripe_writes, 1, "{stats:?}");
    assert_eq!(vol.status().dirty_bytes, 1024 + 2048);
    assert_eq!(
        &mem.contents()[(4 * STRIPE_BYTES) as usize..(7 * STRIPE_BYTES) as usize],
        &data[1024..1024 + 3 * STRIPE_BYTES as usize]
    );
    assert_eq!(vol.read(at, data.len() as u64).await.unwrap(), data);
    let kinds = live_kinds(dir.path());
    assert_eq!(
        kinds.iter().filter(|k| **k == RecordKind::Stored).count(),
        1,
        "{kinds:?}"
    );
    let text = twinblock_journal::dump::dump_file(&dir.path().join("node0.img"))
        .unwrap()
        .to_string();
    assert!(text.contains("STORED"), "{text}");
}

#[tokio::test]
async fn small_writes_are_journaled_even_with_bypass_on() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open(dir.path(), &mem).await;
    vol.write(STRIPE_BYTES + 512, pattern(1, STRIPE_BYTES))
        .await
        .unwrap();
    assert_eq!(mem.stats().writes, 0);
    assert!(!live_kinds(dir.path()).contains(&RecordKind::Stored));
}

#[tokio::test]
async fn bypass_supersedes_older_journaled_bytes_in_reads_cps_and_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open(dir.path(), &mem).await;
    let range = 2 * STRIPE_BYTES;
    // Older small writes inside and across the edge of the range, journaled only.
    vol.write(range + 100, pattern(1, 3000)).await.unwrap();
    vol.write(range - 500, pattern(2, 1000)).await.unwrap();
    let big = pattern(9, 2 * STRIPE_BYTES);
    vol.write(range, big.clone()).await.unwrap();
    let mut want = vec![0u8; (4 * STRIPE_BYTES) as usize];
    want[(range - 500) as usize..range as usize].copy_from_slice(&pattern(2, 1000)[..500]);
    want[range as usize..(range + 2 * STRIPE_BYTES) as usize].copy_from_slice(&big);
    assert_eq!(&vol.read(0, 4 * STRIPE_BYTES).await.unwrap()[..], &want[..]);

    // Crash without a CP: recovery must not redo the older records over the stored range.
    drop(vol);
    mem.crash();
    let vol = open(dir.path(), &mem).await;
    assert_eq!(&vol.read(0, 4 * STRIPE_BYTES).await.unwrap()[..], &want[..]);
    // The CP then applies only what the store lacks.
    vol.checkpoint().await.unwrap();
    assert_eq!(&mem.contents()[..want.len()], &want[..]);
}

#[tokio::test]
async fn newer_small_writes_stay_on_top_of_a_stored_range() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open(dir.path(), &mem).await;
    let big = pattern(3, STRIPE_BYTES);
    vol.write(0, big.clone()).await.unwrap();
    vol.write(4096, pattern(4, 4096)).await.unwrap();
    let mut want = big.to_vec();
    want[4096..8192].copy_from_slice(&pattern(4, 4096));
    assert_eq!(&vol.read(0, STRIPE_BYTES).await.unwrap()[..], &want[..]);
    drop(vol);
    mem.crash();
    let vol = open(dir.path(), &mem).await;
    assert_eq!(&vol.read(0, STRIPE_BYTES).await.unwrap()[..], &want[..]);
    vol.checkpoint().await.unwrap();
    assert_eq!(&mem.contents()[..want.len()], &want[..]);
}

/// A large write racing CPs and small writes on the same range, many times: after every round
/// the volume's reads, the store after a CP, and a recovery after a crash hold the same bytes,
/// and a write acknowledged before the large write started never shows through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bypass_racing_cps_and_small_writes_leaves_one_state() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::with_yields(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let mut vol = Arc::new(open(dir.path(), &mem).await);
    let range = 4 * STRIPE_BYTES;
    let len = 2 * STRIPE_BYTES;
    for round in 0..40u8 {
        // Acknowledged before the large write starts: must be superseded by it.
        vol.write(range + 4096, pattern(round.wrapping_add(100), 4096))
            .await
            .unwrap();
        let big = pattern(round, len);
        let cps = {
            let vol = Arc::clone(&vol);
            tokio::spawn(async move {
                for _ in 0..3 {
                    vol.checkpoint().await.unwrap();
                    tokio::task::yield_now().await;
                }
            })
        };
        let small = {
            let vol = Arc::clone(&vol);
            tokio::spawn(async move {
                // Blocks 2.. of the range (block 1 is the one checked below).
                for i in 0..4u64 {
                    let at = range + (2 + (round as u64 + i * 5) % (len / 4096 - 2)) * 4096;
                    vol.write(at, pattern(200 + i as u8, 4096)).await.unwrap();
                }
            })
        };
        vol.write(range, big.clone()).await.unwrap();
        assert_eq!(
            vol.read(range + 4096, 4096).await.unwrap(),
            big.slice(4096..8192),
            "round {round}: the write acknowledged before the large write shows through it"
        );
        cps.await.unwrap();
        small.await.unwrap();
        let seen = vol.read(range, len).await.unwrap();
        // Every 4 KiB block holds the large write's bytes or one small write's.
        for (b, block) in seen.chunks(4096).enumerate() {
            let from_big = block == &big[b * 4096..(b + 1) * 4096];
            let from_small = (0..4u8).any(|i| block == &pattern(200 + i, 4096)[..]);
            assert!(from_big || from_small, "round {round}: block {b} is torn");
        }
        if round % 4 == 3 {
            // Crash and recover: the same bytes.
            drop(Arc::try_unwrap(vol).expect("tasks are done"));
            mem.crash();
            vol = Arc::new(open(dir.path(), &mem).await);
            assert_eq!(
                vol.read(range, len).await.unwrap(),
                seen,
                "round {round}: recovery disagrees with what was read"
            );
        }
        vol.checkpoint().await.unwrap();
        assert_eq!(
            &mem.contents()[range as usize..(range + len) as usize],
            &seen[..],
            "round {round}: the store after a CP disagrees with what was read"
        );
    }
}

struct LocalMirror {
    partner: Mutex<PartnerRegion>,
}

#[async_trait]
impl MirrorHook for LocalMirror {
    fn enabled(&self) -> bool {
        true
    }
    async fn ship(&self, log_offset: u64, _seq: u64, record: Bytes) -> MirrorOutcome {
        tokio::task::yield_now().await;
        match self.partner.lock().unwrap().receive(log_offset, &record) {
            Ok(()) => MirrorOutcome::Mirrored,
            Err(e) => panic!("partner refused a record: {e}"),
        }
    }
    fn log_reset(&self, generation: u64, tail_offset: u64, tail_seq: u64) {
        self.partner
            .lock()
            .unwrap()
            .reset(generation, tail_offset, tail_seq)
            .unwrap();
    }
}

/// The partner receives the STORED record only (no data); after the owner's death, both ways of
/// replaying its copy (redo through the store, or serve in place at takeover) give what the owner
/// read.
#[tokio::test]
async fn partner_copy_with_stored_records_replays_to_the_owners_view() {
    let dir = tempfile::tempdir().unwrap();
    let mut partner_nv = Nvram::open(&nvram_cfg(dir.path(), 1)).unwrap();
    let mirror = Arc::new(LocalMirror {
        partner: Mutex::new(partner_nv.take_partner().unwrap()),
    });
    drop(partner_nv);
    let mem = MemBacking::with_yields(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = JournaledVolume::open_with_mirror(
        Nvram::open(&nvram_cfg(dir.path(), 0)).unwrap(),
        mem.clone(),
        3,
        quiet_cfg(),
        mirror.clone(),
    )
    .await
    .unwrap();
    vol.write(STRIPE_BYTES + 10, pattern(1, 5000))
        .await
        .unwrap();
    vol.write(STRIPE_BYTES - 300, pattern(2, 2 * STRIPE_BYTES + 600))
        .await
        .unwrap();
    vol.write(STRIPE_BYTES + 8192, pattern(3, 100))
        .await
        .unwrap();
    let view = vol.read(0, 4 * STRIPE_BYTES).await.unwrap();
    drop(vol);
    mem.crash();
    let mirror = Arc::try_unwrap(mirror)
        .ok()
        .expect("the volume was dropped, nothing else holds the mirror");
    let partner = mirror.partner.into_inner().unwrap();
    let scan = partner.scan();
    let stored: Vec<_> = scan
        .records
        .iter()
        .filter(|r| r.header.kind == RecordKind::Stored)
        .collect();
    assert_eq!(stored.len(), 1);
    assert_eq!(
        stored[0].header.payload_bytes, 0,
        "the partner gets no data"
    );

    // Redo through the store (a log that cannot continue in place takes this path).
    let redo_store = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES);
    redo_store
        .write(0, Bytes::copy_from_slice(&mem.contents()))
        .await
        .unwrap();
    replay_region(partner.region(), &redo_store, 3, false)
        .await
        .unwrap();
    assert_eq!(&redo_store.contents()[..view.len()], &view[..]);
}

/// Takeover: the partner serves the dead owner's volume from its copy (the in-place path of
/// `open_partner_copy`), with the STORED record trimming the older records.
#[tokio::test]
async fn takeover_from_partner_copy_serves_stored_ranges_from_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let partner_cfg = nvram_cfg(dir.path(), 1);
    let mut partner_nv = Nvram::open(&partner_cfg).unwrap();
    let mirror = Arc::new(LocalMirror {
        partner: Mutex::new(partner_nv.take_partner().unwrap()),
    });
    drop(partner_nv);
    let mem = MemBacking::with_yields(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = JournaledVolume::open_with_mirror(
        Nvram::open(&nvram_cfg(dir.path(), 0)).unwrap(),
        mem.clone(),
        3,
        quiet_cfg(),
        mirror.clone(),
    )
    .await
    .unwrap();
    // Journaled before the large writes: must not come back over them.
    vol.write(STRIPE_BYTES + 8192, pattern(4, 4096))
        .await
        .unwrap();
    vol.write(0, pattern(5, 3 * STRIPE_BYTES)).await.unwrap();
    vol.write(STRIPE_BYTES, pattern(6, STRIPE_BYTES))
        .await
        .unwrap();
    vol.write(STRIPE_BYTES + 4096, pattern(7, 4096))
        .await
        .unwrap();
    let view = vol.read(0, 4 * STRIPE_BYTES).await.unwrap();
    drop(vol);
    mem.crash();
    drop(mirror);
    let nv = Nvram::open(&partner_cfg).unwrap();
    let taken = JournaledVolume::open_partner_copy(
        nv,
        mem.clone(),
        3,
        quiet_cfg(),
        Arc::new(twinblock_journal::NoMirror),
    )
    .await
    .unwrap();
    assert_eq!(taken.read(0, 4 * STRIPE_BYTES).await.unwrap(), view);
    taken.checkpoint().await.unwrap();
    assert_eq!(&mem.contents()[..view.len()], &view[..]);
}

/// Log bytes writers leave free for CP, TRANSITION and PAD records (`CONTROL_RESERVE_BYTES` of
/// the volume): the test fills the log up to just below it.
const CONTROL_RESERVE_BYTES: u64 = 4 * (64 + 8 + 64 * 24);

/// A log too full for the STORED record: the large write lets the CP run (it needs the gate),
/// writes the store again after it, and lands; older journaled bytes of the range stay
/// superseded.
#[tokio::test]
async fn bypass_with_a_full_log_waits_for_a_cp_and_lands() {
    let dir = tempfile::tempdir().unwrap();
    let mem = MemBacking::with_yields(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let nv = Nvram::open(&NvramConfig {
        log_bytes_per_region: 64 * 1024,
        ..nvram_cfg(dir.path(), 0)
    })
    .unwrap();
    let vol = JournaledVolume::open(nv, mem.clone(), 1, quiet_cfg())
        .await
        .unwrap();
    let range = 8 * STRIPE_BYTES;
    // Journaled under the range, older than the large write.
    vol.write(range, pattern(1, 4096)).await.unwrap();
    // Fill the log with 4 KiB records elsewhere, then one sized to leave less than a header.
    let mut at = 0;
    loop {
        let st = vol.status();
        let room = st.log_bytes - st.log_used_bytes - CONTROL_RESERVE_BYTES;
        if room < 64 + 4096 + 64 + 64 {
            let payload = (room - 64 - 32) / 64 * 64;
            vol.write(at, pattern(2, payload)).await.unwrap();
            break;
        }
        vol.write(at, pattern(2, 4096)).await.unwrap();
        at += 4096;
    }
    assert_eq!(vol.status().cps_done, 0);
    let big = pattern(3, STRIPE_BYTES);
    vol.write(range, big.clone()).await.unwrap();
    let st = vol.status();
    assert!(st.writer_waits >= 1, "the log was not full: {st:?}");
    assert!(st.cps_done >= 1, "{st:?}");
    assert_eq!(vol.read(range, STRIPE_BYTES).await.unwrap(), big);
    vol.checkpoint().await.unwrap();
    assert_eq!(
        &mem.contents()[range as usize..(range + STRIPE_BYTES) as usize],
        &big[..]
    );
}

/// An aligned write of three whole stripes: all of it bypasses the log.
fn whole_stripes() -> (u64, Bytes) {
    (8 * STRIPE_BYTES, pattern(41, 3 * STRIPE_BYTES))
}

fn stored_bytes(mem: &MemBacking, at: u64, len: usize) -> Vec<u8> {
    mem.contents()[at as usize..at as usize + len].to_vec()
}

/// A directory on tmpfs (an NVRAM there is lost with the host's power), or `None` (printed)
/// where this machine has none.
fn tmpfs_dir() -> Option<tempfile::TempDir> {
    match tempfile::tempdir_in("/dev/shm") {
        Ok(d) => Some(d),
        Err(e) => {
            println!("skipped: no /dev/shm for an NVRAM on tmpfs ({e})");
            None
        }
    }
}

/// A volume whose NVRAM (mode `persistence`) lives in `dir`.
async fn open_in(
    dir: &Path,
    mem: &MemBacking,
    persistence: PersistenceMode,
) -> JournaledVolume<MemBacking> {
    let cfg = NvramConfig {
        persistence,
        ..nvram_cfg(dir, 0)
    };
    let nv = Nvram::open(&cfg).unwrap();
    JournaledVolume::open(nv, mem.clone(), 1, quiet_cfg())
        .await
        .unwrap()
}

#[tokio::test]
async fn lone_volume_on_tmpfs_nvram_acknowledges_a_bypass_without_a_store_flush() {
    let Some(dir) = tmpfs_dir() else { return };
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open_in(dir.path(), &mem, PersistenceMode::None).await;
    let (at, data) = whole_stripes();
    vol.write(at, data.clone()).await.unwrap();
    assert_eq!(mem.stats().full_stripe_writes, 1);
    assert_eq!(mem.stats().flushes, 0, "{:?}", mem.stats());
    assert_eq!(vol.read(at, data.len() as u64).await.unwrap(), data);
    // FLUSH runs a CP whose store flush covers the bypass.
    vol.flush().await.unwrap();
    assert!(mem.stats().flushes >= 1);
    mem.crash();
    assert_eq!(stored_bytes(&mem, at, data.len()), &data[..]);
}

#[tokio::test]
async fn fua_write_that_bypasses_entirely_flushes_the_store_without_a_cp() {
    let Some(dir) = tmpfs_dir() else { return };
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open_in(dir.path(), &mem, PersistenceMode::None).await;
    let (at, data) = whole_stripes();
    vol.write_fua(at, data.clone()).await.unwrap();
    let st = vol.status();
    assert_eq!(st.flushes_by_cp, 0, "no CP for a FUA bypass");
    assert_eq!(st.cps_done, 0);
    assert!(mem.stats().flushes >= 1);
    // Power loss: the bytes are on the disks.
    mem.crash();
    assert_eq!(stored_bytes(&mem, at, data.len()), &data[..]);
}

#[tokio::test]
async fn fua_write_with_a_journaled_head_makes_both_parts_durable() {
    let Some(dir) = tmpfs_dir() else { return };
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open_in(dir.path(), &mem, PersistenceMode::None).await;
    let at = 4 * STRIPE_BYTES - 4096;
    let data = pattern(9, 4096 + 2 * STRIPE_BYTES);
    vol.write_fua(at, data.clone()).await.unwrap();
    assert_eq!(
        vol.status().flushes_by_cp,
        1,
        "the journaled head needs a CP"
    );
    mem.crash();
    assert_eq!(stored_bytes(&mem, at, data.len()), &data[..]);
}

#[tokio::test]
async fn nvram_on_a_disk_in_mode_none_flushes_the_store_before_the_record() {
    // Such a file may keep any part of itself through a power loss, STORED records included.
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open_in(dir.path(), &mem, PersistenceMode::None).await;
    let (at, data) = whole_stripes();
    vol.write(at, data.clone()).await.unwrap();
    mem.crash();
    assert_eq!(stored_bytes(&mem, at, data.len()), &data[..]);
}

#[tokio::test]
async fn bypass_on_power_safe_nvram_flushes_the_store_before_the_record() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let mem = MemBacking::new(VOLUME_BYTES, STRIPE_BYTES).with_bypass();
    let vol = open_in(dir.path(), &mem, PersistenceMode::Msync).await;
    assert!(vol.ack_survives_power_loss());
    let (at, data) = whole_stripes();
    vol.write(at, data.clone()).await.unwrap();
    // The acknowledged STORED record survives power loss: so must the bytes it names.
    mem.crash();
    assert_eq!(stored_bytes(&mem, at, data.len()), &data[..]);
}
