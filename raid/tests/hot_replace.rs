//! Hot replace of an active member: the old member stays active while its contents are copied
//! onto the new disk, so the array is never degraded by the replace; writes during the copy reach
//! the new disk; a failed new disk leaves the array as it was; a failed old disk turns the copy
//! into an ordinary rebuild.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use twinblock_io::mem::MemMember;
use twinblock_io::Member;
use twinblock_raid::layout::Level;
use twinblock_raid::superblock::DATA_OFFSET_BYTES;
use twinblock_raid::{Array, MemberState};

const CHUNK_BYTES: u64 = 4096;
const DATA_BYTES: u64 = 1 << 20;
/// Slow enough that the copy of one member (1 MiB) takes about a second.
const COPY_RATE_BYTES_PER_SEC: u64 = 1 << 20;

fn mems(prefix: &str, n: usize) -> Vec<Arc<MemMember>> {
    (0..n)
        .map(|i| {
            Arc::new(MemMember::new(
                format!("{prefix}{i}"),
                DATA_OFFSET_BYTES + DATA_BYTES,
            ))
        })
        .collect()
}

fn dynv(v: &[Arc<MemMember>]) -> Vec<Arc<dyn Member>> {
    v.iter().map(|m| m.clone() as Arc<dyn Member>).collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8).wrapping_mul(7))
        .collect()
}

/// A RAID 5 of four members filled with a pattern, its copy rate slowed, and the new disk.
async fn filled_raid5() -> (Array, Vec<Arc<MemMember>>, Arc<MemMember>, Vec<u8>) {
    let ms = mems("d", 4);
    let a = Array::create("r5", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let model = pattern(a.size() as usize, 3);
    a.write(0, Bytes::from(model.clone())).await.unwrap();
    a.set_rebuild_rate(COPY_RATE_BYTES_PER_SEC);
    let new = Arc::new(MemMember::new("n0", DATA_OFFSET_BYTES + DATA_BYTES));
    (a, ms, new, model)
}

async fn mid_copy(a: &Array) {
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = a.status().rebuild.expect("copy progress is reported");
    assert!(r.running, "copy still running: {r:?}");
    assert!(r.done_bytes > 0 && r.done_bytes < r.total_bytes, "{r:?}");
    assert_eq!(r.member, "n0");
}

fn slot_names(a: &Array) -> Vec<(Option<usize>, Option<String>, MemberState)> {
    a.status()
        .members
        .into_iter()
        .map(|m| (m.slot, m.name, m.state))
        .collect()
}

#[tokio::test]
async fn hot_replace_keeps_redundancy_during_the_copy() {
    let (a, ms, new, model) = filled_raid5().await;
    a.replace_member(0, new.clone()).await.unwrap();
    mid_copy(&a).await;
    let st = a.status();
    assert!(!st.degraded, "a hot replace must not degrade the array");
    assert!(st
        .members
        .iter()
        .filter(|m| m.slot.is_some())
        .all(|m| m.state == MemberState::Active));
    assert_eq!(st.members[0].name.as_deref(), Some("d0"));
    // A second replace while one copies is refused.
    let extra = Arc::new(MemMember::new("x", DATA_OFFSET_BYTES + DATA_BYTES));
    let e = a.replace_member(1, extra).await.unwrap_err();
    assert!(e.to_string().contains("already being replaced"), "{e}");
    // Another member failing mid-copy: the old member still holds its data, nothing is lost.
    ms[2].fail_reads(true);
    ms[2].fail_writes(true);
    assert_eq!(a.read(0, model.len()).await.unwrap()[..], model[..]);
    a.wait_rebuild().await;
    let st = a.status();
    assert_eq!(st.members[0].name.as_deref(), Some("n0"));
    assert_eq!(st.members[0].state, MemberState::Active);
    assert_eq!(st.members[2].state, MemberState::Faulty);
    assert!(!st.failed);
    assert_eq!(a.read(0, model.len()).await.unwrap()[..], model[..]);
}

#[tokio::test]
async fn writes_during_the_copy_reach_the_new_disk() {
    let (a, ms, new, mut model) = filled_raid5().await;
    a.replace_member(0, new.clone()).await.unwrap();
    mid_copy(&a).await;
    // Rows before and after the copy's position, and one write spanning the whole array.
    for (i, at) in [0u64, 200_000, 1_500_000, a.size() - 70_000]
        .iter()
        .enumerate()
    {
        let data = pattern(60_000, 40 + i as u8);
        a.write(*at, Bytes::from(data.clone())).await.unwrap();
        model[*at as usize..*at as usize + data.len()].copy_from_slice(&data);
    }
    assert!(!a.status().degraded);
    a.wait_rebuild().await;
    let names = slot_names(&a);
    assert_eq!(names[0], (Some(0), Some("n0".into()), MemberState::Active));
    assert!(
        names.iter().all(|(_, n, _)| n.as_deref() != Some("d0")),
        "the old member is released: {names:?}"
    );
    assert!(!a.status().degraded);
    // The old disk is out of the array: breaking it changes nothing. With a second member
    // failed, every read of slot 0's chunks and every reconstruction uses the new disk.
    ms[0].fail_reads(true);
    ms[0].fail_writes(true);
    ms[1].fail_reads(true);
    ms[1].fail_writes(true);
    assert_eq!(a.read(0, model.len()).await.unwrap()[..], model[..]);
    assert!(!a.status().failed);
}

#[tokio::test]
async fn failed_new_disk_leaves_the_array_healthy_with_the_old_member() {
    let (a, _ms, new, mut model) = filled_raid5().await;
    a.replace_member(0, new.clone()).await.unwrap();
    mid_copy(&a).await;
    new.fail_writes(true);
    let data = pattern(300_000, 90);
    a.write(100_000, Bytes::from(data.clone())).await.unwrap();
    model[100_000..400_000].copy_from_slice(&data);
    a.wait_rebuild().await;
    let st = a.status();
    assert!(!st.degraded && !st.failed);
    let names = slot_names(&a);
    assert_eq!(names[0], (Some(0), Some("d0".into()), MemberState::Active));
    assert!(
        names.iter().all(|(_, n, _)| n.as_deref() != Some("n0")),
        "the failed new disk is dropped: {names:?}"
    );
    assert_eq!(a.read(0, model.len()).await.unwrap()[..], model[..]);
}

#[tokio::test]
async fn failed_old_member_mid_copy_finishes_as_a_rebuild() {
    let (a, ms, new, mut model) = filled_raid5().await;
    a.replace_member(0, new.clone()).await.unwrap();
    mid_copy(&a).await;
    ms[0].fail_reads(true);
    ms[0].fail_writes(true);
    let data = pattern(DATA_BYTES as usize, 120);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    model[..data.len()].copy_from_slice(&data);
    let names = slot_names(&a);
    assert_eq!(
        names[0],
        (Some(0), Some("n0".into()), MemberState::Rebuilding)
    );
    a.set_rebuild_rate(0);
    a.wait_rebuild().await;
    let st = a.status();
    assert_eq!(st.members[0].name.as_deref(), Some("n0"));
    assert_eq!(st.members[0].state, MemberState::Active);
    assert!(!st.degraded && !st.failed);
    // The new disk's contents are right: with another member gone, reads reconstruct from it.
    ms[1].fail_reads(true);
    ms[1].fail_writes(true);
    assert_eq!(a.read(0, model.len()).await.unwrap()[..], model[..]);
}

#[tokio::test]
async fn restart_during_the_copy_keeps_the_old_member_and_the_new_disk_as_a_spare() {
    let (a, ms, new, model) = filled_raid5().await;
    a.replace_member(0, new.clone()).await.unwrap();
    mid_copy(&a).await;
    a.abandon().await;
    let mut all = dynv(&ms);
    all.push(new.clone());
    let b = Array::assemble(all).await.unwrap();
    b.wait_rebuild().await;
    let names = slot_names(&b);
    assert_eq!(names[0], (Some(0), Some("d0".into()), MemberState::Active));
    assert!(
        names.contains(&(None, Some("n0".into()), MemberState::Spare)),
        "{names:?}"
    );
    assert!(!b.status().degraded);
    assert_eq!(b.read(0, model.len()).await.unwrap()[..], model[..]);
}
