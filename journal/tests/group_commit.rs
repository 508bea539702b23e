//! The group commit of `msync` mode, seen through a journaled volume: concurrent writers share
//! `msync` calls, a failing `msync` fails every write it covered with a clear error, and `none`
//! mode has no group commit at all.

use std::sync::Arc;

use bytes::Bytes;
use twinblock_journal::power::NvramPowerModel;
use twinblock_journal::{
    JournaledVolume, MemBacking, Nvram, NvramConfig, PersistenceMode, VolumeConfig,
};

const BLOCK_BYTES: u64 = 4096;

fn cfg(dir: &std::path::Path, persistence: PersistenceMode) -> NvramConfig {
    NvramConfig {
        path: dir.join("nvram.img"),
        persistence,
        log_bytes_per_region: 4 << 20,
        ..NvramConfig::new(0, [4; 16])
    }
}

fn vcfg() -> VolumeConfig {
    VolumeConfig {
        cp_interval_ms: 3_600_000,
        ..VolumeConfig::default()
    }
}

fn block(i: u64) -> Bytes {
    Bytes::from(vec![(i % 251) as u8 + 1; BLOCK_BYTES as usize])
}

async fn open(
    dir: &std::path::Path,
    mode: PersistenceMode,
    power: Option<Arc<NvramPowerModel>>,
) -> Arc<JournaledVolume<MemBacking>> {
    open_on(dir, mode, power, store()).await
}

fn store() -> MemBacking {
    MemBacking::new(1024 * BLOCK_BYTES, 64 * 1024)
}

/// Opens the volume over `mem` (one store across the lives of a test).
async fn open_on(
    dir: &std::path::Path,
    mode: PersistenceMode,
    power: Option<Arc<NvramPowerModel>>,
    mem: MemBacking,
) -> Arc<JournaledVolume<MemBacking>> {
    let c = cfg(dir, mode);
    let nv = match power {
        Some(p) => Nvram::open_with_power_model(&c, p).unwrap(),
        None => Nvram::open(&c).unwrap(),
    };
    Arc::new(JournaledVolume::open(nv, mem, 1, vcfg()).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_share_msync_calls() {
    let dir = tempfile::tempdir().unwrap();
    let power = Arc::new(NvramPowerModel::new());
    // A disk where each msync takes 1 ms: writers arriving meanwhile join the next round.
    power.slow_persists(std::time::Duration::from_millis(1));
    let vol = open(dir.path(), PersistenceMode::Msync, Some(power.clone())).await;
    let before = vol.status();
    let writers = 64u64;
    let per_writer = 10u64;
    let tasks: Vec<_> = (0..writers)
        .map(|w| {
            let vol = vol.clone();
            tokio::spawn(async move {
                for k in 0..per_writer {
                    let i = w * per_writer + k;
                    vol.write(i * BLOCK_BYTES, block(i)).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let st = vol.status();
    let records = st.next_seq - before.next_seq;
    let persists = st.log_persists - before.log_persists;
    assert!(records >= writers * per_writer);
    assert!(
        persists * 8 < records,
        "{persists} msync calls for {records} records: no group commit"
    );
    assert!(st.group_commit_rounds > 0 && st.group_commit_rounds <= persists);
    for i in 0..writers * per_writer {
        let got = vol.read(i * BLOCK_BYTES, BLOCK_BYTES).await.unwrap();
        assert_eq!(got, block(i), "block {i}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_msync_fails_every_write_it_covers_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let power = Arc::new(NvramPowerModel::new());
    let vol = open(dir.path(), PersistenceMode::Msync, Some(power.clone())).await;
    vol.write(0, block(0)).await.unwrap();
    power.fail_persists(Some(libc::EIO));
    let tasks: Vec<_> = (1..=16u64)
        .map(|i| {
            let vol = vol.clone();
            tokio::spawn(async move { vol.write(i * BLOCK_BYTES, block(i)).await })
        })
        .collect();
    for t in tasks {
        let e = t.await.unwrap().unwrap_err().to_string();
        assert!(e.contains("msync"), "{e}");
        assert!(e.contains("nvram.img"), "names the file: {e}");
        assert!(e.contains("not persistent"), "says what it means: {e}");
    }
    // Sticky: later writes and flushes are refused too, even once msync works again.
    power.fail_persists(None);
    let e = vol.write(100 * BLOCK_BYTES, block(100)).await.unwrap_err();
    assert!(e.to_string().contains("restarted"), "{e}");
    assert!(vol.flush().await.is_err());
    // What was acknowledged before still reads back.
    assert_eq!(vol.read(0, BLOCK_BYTES).await.unwrap(), block(0));
}

#[tokio::test]
async fn none_mode_has_no_group_commit_and_no_persist_calls() {
    let dir = tempfile::tempdir().unwrap();
    let vol = open(dir.path(), PersistenceMode::None, None).await;
    for i in 0..32 {
        vol.write(i * BLOCK_BYTES, block(i)).await.unwrap();
    }
    let st = vol.status();
    assert_eq!(st.group_commit_rounds, 0);
    assert_eq!(st.log_persists, 0);
}

/// Finds `needle` in `hay`.
fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_a_torn_group_left_beyond_the_end_are_blanked_before_the_log_continues() {
    use twinblock_journal::power::NvramCut;
    let dir = tempfile::tempdir().unwrap();
    let power = Arc::new(NvramPowerModel::new());
    let vol = open(dir.path(), PersistenceMode::Msync, Some(power.clone())).await;
    for i in 0..4 {
        vol.write(i * BLOCK_BYTES, block(i)).await.unwrap();
    }
    let first_of_group = vol.status().next_seq;
    // The power goes during the first round of the next group; the others are stored meanwhile.
    power.slow_persists(std::time::Duration::from_millis(20));
    power.cut_after_persists(0);
    let tasks: Vec<_> = (10..18u64)
        .map(|i| {
            let vol = vol.clone();
            tokio::spawn(async move { vol.write(i * BLOCK_BYTES, block(i)).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let group: Vec<_> = vol
        .unretired_records()
        .records
        .into_iter()
        .filter(|r| r.seq >= first_of_group)
        .collect();
    assert_eq!(group.len(), 8);
    drop(vol);
    // Everything stored reached the medium except the first record of the group: the log ends
    // cleanly there, with seven never-acknowledged records after it.
    let mut file = power.file_after_cut(NvramCut::KeepAll);
    let at = find(&file, &group[0].bytes[..64]).expect("first record of the group on the medium");
    file[at..at + 64].fill(0);
    let later: Vec<usize> = group[1..]
        .iter()
        .map(|r| find(&file, &r.bytes[..64]).expect("later records on the medium"))
        .collect();
    let path = cfg(dir.path(), PersistenceMode::Msync).path;
    std::fs::write(&path, &file).unwrap();
    let vol = open(dir.path(), PersistenceMode::Msync, None).await;
    assert!(vol.recovery().applied_in_background, "{:?}", vol.recovery());
    let file = std::fs::read(&path).unwrap();
    for (r, at) in group[1..].iter().zip(later) {
        assert!(
            file[at..at + 64].iter().all(|&b| b == 0),
            "record seq {} still beyond the end of the log",
            r.seq
        );
    }
    for i in 0..4 {
        assert_eq!(
            vol.read(i * BLOCK_BYTES, BLOCK_BYTES).await.unwrap(),
            block(i)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_a_crash_left_unpersisted_are_persisted_before_new_ones_are_acknowledged() {
    use twinblock_journal::power::NvramCut;
    let dir = tempfile::tempdir().unwrap();
    let power = Arc::new(NvramPowerModel::new());
    let mem = store();
    let vol = open_on(
        dir.path(),
        PersistenceMode::Msync,
        Some(power.clone()),
        mem.clone(),
    )
    .await;
    for i in 0..4 {
        vol.write(i * BLOCK_BYTES, block(i)).await.unwrap();
    }
    // The daemon dies with records stored in the mapping (the page cache) and not persisted: here
    // their msync fails, so they never reach the medium; the host keeps running.
    power.fail_persists(Some(libc::EIO));
    for i in 10..14u64 {
        assert!(vol.write(i * BLOCK_BYTES, block(i)).await.is_err());
    }
    drop(vol);
    power.fail_persists(None);
    // The restart recovers them from the page cache and continues the log after them; the
    // writes it acknowledges must survive a power cut that follows. (The store fails writes, so
    // no CP moves the log's tail past them meanwhile.)
    mem.set_fail_writes(true);
    let vol = open_on(
        dir.path(),
        PersistenceMode::Msync,
        Some(power.clone()),
        mem.clone(),
    )
    .await;
    for i in 20..24u64 {
        vol.write(i * BLOCK_BYTES, block(i)).await.unwrap();
    }
    drop(vol);
    let path = cfg(dir.path(), PersistenceMode::Msync).path;
    std::fs::write(&path, power.file_after_cut(NvramCut::LoseAll)).unwrap();
    mem.crash();
    mem.set_fail_writes(false);
    let vol = open_on(dir.path(), PersistenceMode::Msync, None, mem).await;
    for i in (0..4).chain(20..24) {
        let got = vol.read(i * BLOCK_BYTES, BLOCK_BYTES).await.unwrap();
        assert!(got == block(i), "acknowledged block {i} lost");
    }
}
