//! Fault tests on real image files through `FileMember` (io_uring or the thread pool, O_DIRECT
//! where the filesystem allows): a member that becomes unreadable mid-workload, a member removed
//! and re-added with a bitmap resync, and scrub on a corrupted parity chunk.

use bytes::Bytes;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use twinblock_io::file::{FileMember, FileOptions};
use twinblock_io::Member;
use twinblock_raid::array::CreateOptions;
use twinblock_raid::layout::Level;
use twinblock_raid::superblock::DATA_OFFSET_BYTES;
use twinblock_raid::{Array, MemberState, ScrubMode};

const CHUNK_BYTES: u64 = 64 << 10;
const IMAGE_BYTES: u64 = DATA_OFFSET_BYTES + (2 << 20);

fn open(path: &Path) -> Arc<dyn Member> {
    let opts = FileOptions {
        direct: true,
        create_size: Some(IMAGE_BYTES),
        ..Default::default()
    };
    FileMember::open(path, &opts).unwrap()
}

fn images(dir: &Path, n: usize) -> (Vec<PathBuf>, Vec<Arc<dyn Member>>) {
    let paths: Vec<PathBuf> = (0..n).map(|i| dir.join(format!("disk{i}.img"))).collect();
    let members = paths.iter().map(|p| open(p)).collect();
    (paths, members)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 253) as u8))
        .collect()
}

#[tokio::test]
async fn image_made_unreadable_mid_workload_is_failed_and_data_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, members) = images(dir.path(), 4);
    let a = Array::create("f5", Level::Raid5, CHUNK_BYTES, members, vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize, 1);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.flush().await.unwrap();
    // The image loses its content under the array: reads of it come back short.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[2])
        .unwrap()
        .set_len(4096)
        .unwrap();
    assert!(a.read(0, data.len()).await.unwrap()[..] == data[..]);
    let st = a.status();
    assert_eq!(st.members[2].state, MemberState::Faulty);
    assert!(st.degraded);
}

#[tokio::test]
async fn image_removed_and_readded_resyncs_only_dirty_regions() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, members) = images(dir.path(), 3);
    let opts = CreateOptions {
        bitmap_region_bytes: Some(256 << 10),
        ..Default::default()
    };
    let a = Array::create_with("f1", Level::Raid1, CHUNK_BYTES, members, vec![], opts)
        .await
        .unwrap();
    let mut model = pattern(a.size() as usize, 2);
    a.write(0, Bytes::from(model.clone())).await.unwrap();
    a.flush().await.unwrap();
    a.fail_member(1).await.unwrap();
    a.remove_member(1).await.unwrap();
    for (at, seed) in [(10_000usize, 3u8), (700_000, 4)] {
        let d = pattern(9000, seed);
        a.write(at as u64, Bytes::from(d.clone())).await.unwrap();
        model[at..at + d.len()].copy_from_slice(&d);
    }
    a.flush().await.unwrap();
    let st = a.add_member(open(&paths[1])).await.unwrap();
    assert_eq!(st.slot, Some(1));
    a.wait_rebuild().await;
    let st = a.status();
    assert!(!st.degraded);
    assert_eq!(
        st.bitmap_resync_regions, 2,
        "regions 0 and 2 were written while the image was out"
    );
    a.close().await.unwrap();
    // The re-added image alone holds the data.
    let only = Array::assemble(vec![open(&paths[1])]).await.unwrap();
    assert!(only.read(0, model.len()).await.unwrap()[..] == model[..]);
}

#[tokio::test]
async fn scrub_on_images_finds_corrupted_parity_and_repair_fixes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, members) = images(dir.path(), 4);
    let a = Array::create("f6", Level::Raid6, CHUNK_BYTES, members, vec![])
        .await
        .unwrap();
    a.write(0, Bytes::from(pattern(a.size() as usize, 5)))
        .await
        .unwrap();
    a.flush().await.unwrap();
    let row = 7;
    let q = a.geometry().q_member(row);
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[q])
        .unwrap();
    f.write_all_at(&[0x55; 512], DATA_OFFSET_BYTES + row * CHUNK_BYTES + 4096)
        .unwrap();
    f.sync_all().unwrap();
    assert_eq!(a.scrub(ScrubMode::Check).await.unwrap().mismatches, 1);
    assert_eq!(a.scrub(ScrubMode::Repair).await.unwrap().repaired, 1);
    assert_eq!(a.scrub(ScrubMode::Check).await.unwrap().mismatches, 0);
}
