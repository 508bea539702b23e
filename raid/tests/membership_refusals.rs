//! Refused membership commands change nothing: a replace naming a disk that is already in the
//! array, a replace of a disk by itself (also through a second path to the same image file), a
//! device too small, and a replace that would fail a degraded array are all refused before the
//! old member is touched. "Nothing" is checked on the status and on every member's superblock.

use std::path::Path;
use std::sync::Arc;
use twinblock_io::file::{FileMember, FileOptions};
use twinblock_io::mem::MemMember;
use twinblock_io::Member;
use twinblock_raid::layout::Level;
use twinblock_raid::superblock::{DATA_OFFSET_BYTES, SUPERBLOCK_BYTES};
use twinblock_raid::{Array, ArrayStatus, MemberState};

const CHUNK_BYTES: u64 = 4096;
const MEMBER_BYTES: u64 = DATA_OFFSET_BYTES + 64 * CHUNK_BYTES;

fn mems(n: usize) -> Vec<Arc<MemMember>> {
    (0..n)
        .map(|i| Arc::new(MemMember::new(format!("d{i}"), MEMBER_BYTES)))
        .collect()
}

fn dynv(v: &[Arc<MemMember>]) -> Vec<Arc<dyn Member>> {
    v.iter().map(|m| m.clone() as Arc<dyn Member>).collect()
}

/// The status and every member's superblock area.
async fn state(a: &Array, members: &[Arc<dyn Member>]) -> (ArrayStatus, Vec<Vec<u8>>) {
    let mut sbs = Vec::new();
    for m in members {
        sbs.push(m.read_at(0, SUPERBLOCK_BYTES).await.unwrap().to_vec());
    }
    let mut st = a.status();
    st.rebuild = None;
    (st, sbs)
}

#[tokio::test]
async fn replace_with_a_disk_already_in_the_array_changes_nothing() {
    let ms = mems(4);
    let all = dynv(&ms);
    let a = Array::create("t", Level::Raid5, CHUNK_BYTES, all.clone(), vec![])
        .await
        .unwrap();
    let before = state(&a, &all).await;
    let e = a.replace_member(0, all[1].clone()).await.unwrap_err();
    assert!(e.to_string().contains("already in the array"), "{e}");
    assert_eq!(state(&a, &all).await, before);
    assert!(a
        .status()
        .members
        .iter()
        .all(|m| m.state == MemberState::Active));
}

#[tokio::test]
async fn replace_with_a_spare_of_the_array_changes_nothing() {
    let ms = mems(5);
    let all = dynv(&ms);
    let a = Array::create(
        "t",
        Level::Raid5,
        CHUNK_BYTES,
        all[..4].to_vec(),
        vec![all[4].clone()],
    )
    .await
    .unwrap();
    let before = state(&a, &all).await;
    let e = a.replace_member(2, all[4].clone()).await.unwrap_err();
    assert!(e.to_string().contains("a spare"), "{e}");
    assert_eq!(state(&a, &all).await, before);
}

#[tokio::test]
async fn replace_of_a_disk_by_itself_is_refused() {
    let ms = mems(4);
    let all = dynv(&ms);
    let a = Array::create("t", Level::Raid5, CHUNK_BYTES, all.clone(), vec![])
        .await
        .unwrap();
    let before = state(&a, &all).await;
    let e = a.replace_member(0, all[0].clone()).await.unwrap_err();
    assert!(e.to_string().contains("with itself"), "{e}");
    // A second handle with the same name is the same disk too.
    let twin: Arc<dyn Member> = Arc::new(MemMember::new("d0", MEMBER_BYTES));
    let e = a.replace_member(0, twin).await.unwrap_err();
    assert!(e.to_string().contains("with itself"), "{e}");
    assert_eq!(state(&a, &all).await, before);
}

fn open_image(path: &Path) -> Arc<dyn Member> {
    let opts = FileOptions {
        direct: false,
        create_size: Some(MEMBER_BYTES),
        ..Default::default()
    };
    FileMember::open(path, &opts).unwrap()
}

#[tokio::test]
async fn replace_by_the_same_image_through_another_path_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let paths: Vec<_> = (0..3)
        .map(|i| dir.path().join(format!("d{i}.img")))
        .collect();
    let all: Vec<Arc<dyn Member>> = paths.iter().map(|p| open_image(p)).collect();
    let a = Array::create("t", Level::Raid5, CHUNK_BYTES, all.clone(), vec![])
        .await
        .unwrap();
    let before = state(&a, &all).await;
    // The same file reached through a symlink and through a hard link: other names, one inode.
    let link = dir.path().join("alias.img");
    std::os::unix::fs::symlink(&paths[0], &link).unwrap();
    let e = a.replace_member(0, open_image(&link)).await.unwrap_err();
    assert!(e.to_string().contains("with itself"), "{e}");
    let hard = dir.path().join("hard.img");
    std::fs::hard_link(&paths[1], &hard).unwrap();
    let e = a.replace_member(0, open_image(&hard)).await.unwrap_err();
    assert!(e.to_string().contains("already in the array"), "{e}");
    assert_eq!(state(&a, &all).await, before);
}

#[tokio::test]
async fn replace_by_a_too_small_disk_changes_nothing() {
    let ms = mems(4);
    let all = dynv(&ms);
    let a = Array::create("t", Level::Raid5, CHUNK_BYTES, all.clone(), vec![])
        .await
        .unwrap();
    let before = state(&a, &all).await;
    let small: Arc<dyn Member> = Arc::new(MemMember::new("small", MEMBER_BYTES - CHUNK_BYTES));
    let e = a.replace_member(3, small).await.unwrap_err();
    assert!(e.to_string().contains("at least"), "{e}");
    assert_eq!(state(&a, &all).await, before);
}

#[tokio::test]
async fn replace_that_would_fail_a_degraded_array_is_refused() {
    let ms = mems(4);
    let all = dynv(&ms);
    let a = Array::create("t", Level::Raid5, CHUNK_BYTES, all.clone(), vec![])
        .await
        .unwrap();
    a.fail_member(1).await.unwrap();
    let before = state(&a, &all).await;
    let fresh: Arc<dyn Member> = Arc::new(MemMember::new("fresh", MEMBER_BYTES));
    let e = a.replace_member(2, fresh).await.unwrap_err();
    assert!(e.to_string().contains("would fail"), "{e}");
    assert_eq!(state(&a, &all).await, before);
    assert!(a.read(0, 4096).await.is_ok());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_replaces_onto_one_disk_put_it_in_one_slot_only() {
    for _ in 0..20 {
        let ms = mems(4);
        let all = dynv(&ms);
        let a = Array::create("t", Level::Raid6, CHUNK_BYTES, all.clone(), vec![])
            .await
            .unwrap();
        let fresh: Arc<dyn Member> = Arc::new(MemMember::new("fresh", MEMBER_BYTES));
        let (a1, a2) = (a.clone(), a.clone());
        let (f1, f2) = (fresh.clone(), fresh.clone());
        let t1 = tokio::spawn(async move { a1.replace_member(0, f1).await });
        let t2 = tokio::spawn(async move { a2.replace_member(1, f2).await });
        let (r1, r2) = (t1.await.unwrap(), t2.await.unwrap());
        assert!(
            r1.is_ok() != r2.is_ok(),
            "exactly one replace succeeds: {r1:?} {r2:?}"
        );
        let holders = a
            .status()
            .members
            .iter()
            .filter(|m| m.name.as_deref() == Some("fresh"))
            .count();
        assert_eq!(holders, 1, "{:?}", a.status().members);
    }
}
