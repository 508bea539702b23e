//! Rebuilds racing with replacements, failing targets and each other: the pipelined rebuild
//! must not deadlock on shared row locks (RAID 10 batches share edge rows), must not hand one
//! target's progress to its replacement, and must not blame a spare for the old target's errors.
//! Also: scattered writes (the journal's flush path) refuse bad input before writing anything.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use twinblock_io::mem::MemMember;
use twinblock_io::Member;
use twinblock_raid::layout::Level;
use twinblock_raid::superblock::DATA_OFFSET_BYTES;
use twinblock_raid::{Array, MemberState};

const CHUNK: u64 = 4096;

fn members(n: usize, bytes: u64) -> Vec<Arc<MemMember>> {
    (0..n)
        .map(|i| Arc::new(MemMember::new(format!("d{i}"), bytes)))
        .collect()
}

fn dynv(v: &[Arc<MemMember>]) -> Vec<Arc<dyn Member>> {
    v.iter().map(|m| m.clone() as Arc<dyn Member>).collect()
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 4099) as u8).collect()
}

fn differing_bytes(a: &[u8], b: &[u8]) -> usize {
    a.iter().zip(b).filter(|(x, y)| x != y).count()
}

/// A rebuild of many batches (2048 rows of 4 KiB: more batches than the pipeline holds).
async fn rebuild_many_batches(level: Level, n: usize) {
    let bytes = DATA_OFFSET_BYTES + 2048 * CHUNK;
    let ms = members(n, bytes);
    let a = Array::create("t", level, CHUNK, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.replace_member(1, Arc::new(MemMember::new("new", bytes)))
        .await
        .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), a.wait_rebuild()).await;
    assert!(
        done.is_ok(),
        "{level} rebuild hung: {:?}",
        a.status().rebuild
    );
    assert!(!a.status().degraded, "{:?}", a.status());
    let back = a.read(0, data.len()).await.unwrap();
    assert_eq!(differing_bytes(&back, &data), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid10_rebuild_of_many_batches_finishes() {
    rebuild_many_batches(Level::Raid10, 4).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid10_odd_member_count_rebuild_of_many_batches_finishes() {
    rebuild_many_batches(Level::Raid10, 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid5_rebuild_of_many_batches_finishes() {
    rebuild_many_batches(Level::Raid5, 4).await;
}

/// Foreground discards (which lock many rows at once) and writes during a RAID 10 rebuild.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreground_discards_and_writes_during_a_rebuild_do_not_deadlock() {
    let bytes = DATA_OFFSET_BYTES + 2048 * CHUNK;
    let ms = members(4, bytes);
    let a = Array::create("t", Level::Raid10, CHUNK, dynv(&ms), vec![])
        .await
        .unwrap();
    let mut data = pattern(a.size() as usize);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.set_rebuild_rate(16 << 20);
    a.replace_member(2, Arc::new(MemMember::new("new", bytes)))
        .await
        .unwrap();
    let size = a.size();
    let work = async {
        for k in 0..40u64 {
            let at = (k * 977 * CHUNK) % (size - 64 * CHUNK);
            if k % 3 == 0 {
                a.discard(at, 64 * CHUNK).await.unwrap();
                data[at as usize..(at + 64 * CHUNK) as usize].fill(0);
            } else {
                let b = vec![k as u8; 3 * CHUNK as usize];
                a.write(at, Bytes::from(b.clone())).await.unwrap();
                data[at as usize..at as usize + b.len()].copy_from_slice(&b);
            }
        }
    };
    let finished = tokio::time::timeout(Duration::from_secs(30), work).await;
    assert!(finished.is_ok(), "foreground I/O hung during the rebuild");
    a.set_rebuild_rate(0);
    let done = tokio::time::timeout(Duration::from_secs(30), a.wait_rebuild()).await;
    assert!(done.is_ok(), "rebuild hung: {:?}", a.status().rebuild);
    let back = a.read(0, data.len()).await.unwrap();
    assert_eq!(differing_bytes(&back, &data), 0);
}

/// Replacing a target mid-rebuild, then stopping: the replacement must start from row 0, not
/// from the checkpoint of the device it replaced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replacement_does_not_inherit_the_previous_targets_checkpoint() {
    let bytes = DATA_OFFSET_BYTES + (4 << 20);
    let ms = members(3, bytes);
    let a = Array::create("r5", Level::Raid5, CHUNK, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.set_rebuild_rate(2 << 20);
    // Slot 1 faulty: the replace rebuilds (an active member would be hot-replaced).
    a.fail_member(1).await.unwrap();
    a.replace_member(1, Arc::new(MemMember::new("first", bytes)))
        .await
        .unwrap();
    // Long enough for a periodic checkpoint of the first target.
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let second = Arc::new(MemMember::new("second", bytes));
    a.replace_member(1, second.clone()).await.unwrap();
    a.abandon().await;
    let b = Array::assemble(vec![ms[0].clone(), second.clone(), ms[2].clone()])
        .await
        .unwrap();
    b.wait_rebuild().await;
    let back = b.read(0, data.len()).await.unwrap();
    assert_eq!(
        differing_bytes(&back, &data),
        0,
        "the resumed rebuild of the replacement skipped rows"
    );
}

/// The rebuild target starts failing its writes while a hot spare waits: the spare takes over
/// and is rebuilt, and errors of the old target's in-flight writes do not fail the spare.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_rebuild_target_hands_over_to_the_spare_cleanly() {
    let bytes = DATA_OFFSET_BYTES + (4 << 20);
    let ms = members(3, bytes);
    let spare = Arc::new(MemMember::new("spare", bytes));
    let a = Array::create("r5", Level::Raid5, CHUNK, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.set_rebuild_rate(2 << 20);
    // Slot 1 faulty first, then the spare joins: the replace below is an ordinary rebuild (an
    // active member would be hot-replaced) and the spare waits.
    a.fail_member(1).await.unwrap();
    a.add_member(spare.clone() as Arc<dyn Member>)
        .await
        .unwrap();
    let first = Arc::new(MemMember::new("first", bytes));
    a.replace_member(1, first.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    first.fail_writes(true);
    a.set_rebuild_rate(0);
    let done = tokio::time::timeout(Duration::from_secs(30), a.wait_rebuild()).await;
    assert!(done.is_ok(), "rebuild hung");
    let st = a.status();
    let slot1 = st
        .members
        .iter()
        .find(|m| m.slot == Some(1))
        .expect("slot 1");
    assert_eq!(slot1.name.as_deref(), Some("spare"), "{st:?}");
    assert_eq!(slot1.state, MemberState::Active, "{st:?}");
    assert!(!st.degraded, "{st:?}");
    let back = a.read(0, data.len()).await.unwrap();
    assert_eq!(differing_bytes(&back, &data), 0);
}

/// Overlapping pieces handed to `write_scattered` are refused before anything is written: the
/// order they would land in is undefined.
#[tokio::test]
async fn overlapping_scattered_writes_are_refused_and_change_nothing() {
    let bytes = DATA_OFFSET_BYTES + 64 * CHUNK;
    let ms = members(4, bytes);
    let a = Array::create("r5", Level::Raid5, CHUNK, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    let before: Vec<Vec<u8>> = ms.iter().map(|m| m.snapshot()).collect();
    let e = a
        .write_scattered(vec![
            (8192, Bytes::from(vec![1u8; 4096])),
            (100, Bytes::from(vec![2u8; 100])),
            (10000, Bytes::from(vec![3u8; 4096])),
        ])
        .await
        .unwrap_err();
    assert!(e.to_string().contains("overlap"), "{e}");
    let past_end = a
        .write_scattered(vec![(a.size() - 10, Bytes::from(vec![4u8; 20]))])
        .await;
    assert!(past_end.is_err());
    let after: Vec<Vec<u8>> = ms.iter().map(|m| m.snapshot()).collect();
    assert!(
        before == after,
        "a refused scattered write changed a member"
    );
    assert_eq!(a.read(0, data.len()).await.unwrap()[..], data[..]);
}
