//! Power loss with volatile member write caches: what the array finds at its next assembly.
//!
//! The members model disks with a write cache (`MemMember::enable_write_cache`): a power cut
//! keeps, loses or tears each write not followed by a sync. The array must never be left with a
//! stripe whose parity disagrees with its data in a region its write-intent bitmap does not mark
//! (the unclean-shutdown resync would then skip it, and a later member failure would reconstruct
//! wrong data).

use bytes::Bytes;
use std::sync::Arc;
use twinblock_io::mem::MemMember;
use twinblock_io::wcache::CutPolicy;
use twinblock_io::Member;
use twinblock_raid::array::ScrubMode;
use twinblock_raid::{Array, Level};

const CHUNK_BYTES: u64 = 64 * 1024;
const MEMBER_BYTES: u64 = 16 << 20;

async fn fresh_array(members: &[Arc<MemMember>]) -> Array {
    let dyns: Vec<Arc<dyn Member>> = members
        .iter()
        .map(|m| m.clone() as Arc<dyn Member>)
        .collect();
    Array::create("pl", Level::Raid5, CHUNK_BYTES, dyns, Vec::new())
        .await
        .unwrap()
}

async fn assemble(members: &[Arc<MemMember>]) -> Array {
    let dyns: Vec<Arc<dyn Member>> = members
        .iter()
        .map(|m| m.clone() as Arc<dyn Member>)
        .collect();
    Array::assemble(dyns).await.unwrap()
}

/// Defect 2 of the crash-consistency issue: the bitmap block used to be written without a sync
/// before the data writes it covers, so the power cut could keep the data and parity writes of a
/// member and lose the bitmap block on the member the bitmap is later read from.
#[tokio::test]
async fn bitmap_bit_is_durable_before_the_data_it_covers() {
    for keeper in 0..3 {
        // One chunk in the second data column of row 0: a read-modify-write of data and parity.
        let members = one_chunk_written_then_abandoned().await;
        for (i, m) in members.iter().enumerate() {
            m.power_cut(if i == keeper {
                CutPolicy::KeepAll
            } else {
                CutPolicy::LoseAll
            });
        }
        let array = assemble(&members).await;
        let report = array.scrub(ScrubMode::Check).await.unwrap();
        assert_eq!(
            report.mismatches, 0,
            "member {keeper} kept its unsynced writes, the others lost theirs: {report:?}"
        );
    }
}

/// An array that stopped uncleanly while a member was missing, with writes in progress, cannot
/// have the parity of those regions checked: its start is refused unless the operator says so.
#[tokio::test]
async fn unclean_degraded_start_is_refused_without_the_override() {
    let members: Vec<Arc<MemMember>> = (0..3)
        .map(|i| Arc::new(MemMember::new(format!("m{i}"), MEMBER_BYTES)))
        .collect();
    let array = fresh_array(&members).await;
    array.fail_member(2).await.unwrap();
    array
        .write(0, Bytes::from(vec![5u8; CHUNK_BYTES as usize]))
        .await
        .unwrap();
    array.abandon().await;
    drop(array);
    let two: Vec<Arc<MemMember>> = members[..2].to_vec();
    let err =
        match Array::assemble(two.iter().map(|m| m.clone() as Arc<dyn Member>).collect()).await {
            Ok(_) => panic!("an unclean degraded array with dirty regions started"),
            Err(e) => e,
        };
    let text = err.to_string();
    assert!(
        text.contains("start_dirty_degraded") && text.contains("write hole"),
        "{text}"
    );
    let started = Array::assemble_with(
        two.iter().map(|m| m.clone() as Arc<dyn Member>).collect(),
        twinblock_raid::AssembleOptions {
            start_dirty_degraded: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert!(started.status().degraded);
    let data = started.read(0, CHUNK_BYTES as usize).await.unwrap();
    assert!(data.iter().all(|&b| b == 5));
}

/// Partial parity is logged only while the array is degraded. A member that was in sync when the
/// power went and is missing at the next assembly was written without it, so the journal's log
/// cannot repair the rows it was part of: even a journaled assembly must refuse the dirty start
/// (found by seed 997 of the workspace power-loss test: a replacement rebuilt in full, a write
/// to the whole array, the cut, and the replacement left out of the assembly).
#[tokio::test]
async fn journaled_start_refuses_when_a_member_in_sync_at_the_cut_is_missing() {
    // Row 0: data column 0 on m0 (never written), column 1 on m1, parity on m2.
    let members = one_chunk_written_then_abandoned().await;
    // The data write survives, the parity write does not: m0's chunk no longer reconstructs.
    members[0].power_cut(CutPolicy::KeepAll);
    members[1].power_cut(CutPolicy::KeepAll);
    members[2].power_cut(CutPolicy::LoseAll);
    let two: Vec<Arc<dyn Member>> = members[1..]
        .iter()
        .map(|m| m.clone() as Arc<dyn Member>)
        .collect();
    let opts = twinblock_raid::AssembleOptions {
        journaled: true,
        ..Default::default()
    };
    match Array::assemble_with(two, opts).await {
        Ok(a) => {
            let row0 = a.read(0, CHUNK_BYTES as usize).await;
            panic!(
                "started without the member in sync at the cut (pending {}); m0's chunk would \
                 read {:?}",
                a.ppl_pending(),
                row0.map(|b| b[0])
            );
        }
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("start_dirty_degraded") && text.contains("write hole"),
                "{text}"
            );
        }
    }
    // With the member back the array resyncs its dirty regions and reads what was written.
    let array = assemble(&members).await;
    let data = array.read(0, CHUNK_BYTES as usize).await.unwrap();
    assert!(data.iter().all(|&b| b == 0));
    let data = array.read(CHUNK_BYTES, CHUNK_BYTES as usize).await.unwrap();
    assert!(data.iter().all(|&b| b == 0xab));
}

/// Three members behind write caches, a fresh array, one chunk written in row 0's second data
/// column (a read-modify-write of data and parity), then the array abandoned as a crash leaves
/// it: the members' caches still hold whatever the power cut that follows decides.
async fn one_chunk_written_then_abandoned() -> Vec<Arc<MemMember>> {
    let members: Vec<Arc<MemMember>> = (0..3)
        .map(|i| Arc::new(MemMember::new(format!("m{i}"), MEMBER_BYTES)))
        .collect();
    let array = fresh_array(&members).await;
    for m in &members {
        m.enable_write_cache();
    }
    array
        .write(CHUNK_BYTES, Bytes::from(vec![0xab; CHUNK_BYTES as usize]))
        .await
        .unwrap();
    array.abandon().await;
    drop(array);
    members
}
