//! Fault and management tests on in-memory members: failures mid-workload, hot spares, bitmap
//! resync of a returning member, rebuild checkpoints, scrub, unclean shutdown, and bad input.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use twinblock_io::mem::MemMember;
use twinblock_io::Member;
use twinblock_raid::array::CreateOptions;
use twinblock_raid::layout::{encode_members, Level};
use twinblock_raid::superblock::DATA_OFFSET_BYTES;
use twinblock_raid::{Array, ArrayError, MemberState, ScrubMode};

const CHUNK_BYTES: u64 = 64 << 10;

fn mems(prefix: &str, n: usize, data_bytes: u64) -> Vec<Arc<MemMember>> {
    (0..n)
        .map(|i| {
            Arc::new(MemMember::new(
                format!("{prefix}{i}"),
                DATA_OFFSET_BYTES + data_bytes,
            ))
        })
        .collect()
}

fn dynv(v: &[Arc<MemMember>]) -> Vec<Arc<dyn Member>> {
    v.iter().map(|m| m.clone() as Arc<dyn Member>).collect()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i % 251) as u8).wrapping_mul(3))
        .collect()
}

fn assert_members_match_encode(array: &Array, members: &[Arc<MemMember>], logical: &[u8]) {
    let geo = array.geometry();
    let want = encode_members(&geo, logical);
    for (i, m) in members.iter().enumerate() {
        let snap = m.snapshot();
        let area = &snap
            [DATA_OFFSET_BYTES as usize..(DATA_OFFSET_BYTES + geo.member_data_bytes()) as usize];
        assert!(
            area == want[i].as_slice(),
            "member {i} differs from a fresh encode"
        );
    }
}

#[tokio::test]
async fn member_unreadable_mid_workload_is_failed_and_reads_reconstruct() {
    let ms = mems("d", 4, 2 << 20);
    let a = Array::create("r5", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let mut model = vec![0u8; a.size() as usize];
    for (i, at) in [0u64, 100_000, 1 << 20, 3 << 20].iter().enumerate() {
        let data = pattern(300_000, i as u8);
        a.write(*at, Bytes::from(data.clone())).await.unwrap();
        model[*at as usize..*at as usize + data.len()].copy_from_slice(&data);
    }
    ms[1].fail_reads(true);
    let got = a.read(0, model.len()).await.unwrap();
    assert!(got[..] == model[..], "degraded read differs");
    let st = a.status();
    assert!(st.degraded);
    assert_eq!(st.members[1].state, MemberState::Faulty);
    // writes go on degraded, and reads still match
    let data = pattern(200_000, 77);
    a.write(500_000, Bytes::from(data.clone())).await.unwrap();
    model[500_000..700_000].copy_from_slice(&data);
    assert!(a.read(0, model.len()).await.unwrap()[..] == model[..]);
    assert!(st.events > 1);
}

/// `read_pieces` returns one buffer per chunk extent, which together are exactly what `read`
/// returns, healthy and degraded (a reconstructed chunk is a piece too).
/// A read inside one chunk (the healthy fast path: one metadata look, one member read) whose
/// member fails the read fails that member and is answered from parity, through `read` and
/// `read_pieces`; later small reads of the failed member's chunks are rebuilt as well.
#[tokio::test]
async fn small_read_on_an_unreadable_member_fails_it_and_reconstructs() {
    let ms = mems("s", 4, 1 << 20);
    let a = Array::create("r5", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize, 9);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    // Healthy small reads, aligned and not.
    for (at, len) in [
        (0usize, 4096usize),
        (CHUNK_BYTES as usize + 4096, 4096),
        (777, 1000),
    ] {
        assert!(a.read(at as u64, len).await.unwrap()[..] == data[at..at + len]);
    }
    // Left-symmetric RAID-5 over 4 members: data chunk 1 of row 0 is on member 1.
    ms[1].fail_reads(true);
    let at = CHUNK_BYTES as usize + 8192;
    let got = a.read(at as u64, 4096).await.unwrap();
    assert!(got[..] == data[at..at + 4096], "first failing small read");
    assert_eq!(a.status().members[1].state, MemberState::Faulty);
    for at in (0..data.len() - 4096).step_by(4096 * 7 + 512) {
        let pieces = a.read_pieces(at as u64, 4096).await.unwrap();
        assert!(
            pieces.concat() == data[at..at + 4096],
            "degraded piece at {at}"
        );
    }
}

#[tokio::test]
async fn read_pieces_are_one_buffer_per_chunk_extent_and_join_to_read() {
    let ms = mems("p", 4, 1 << 20);
    let a = Array::create("r5", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize, 5);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    // Unaligned at both ends, across three chunk boundaries: five extents.
    let (at, len) = (CHUNK_BYTES as usize - 100, 3 * CHUNK_BYTES as usize + 200);
    for degraded in [false, true] {
        if degraded {
            ms[2].fail_reads(true);
        }
        let pieces = a.read_pieces(at as u64, len).await.unwrap();
        let lens: Vec<usize> = pieces.iter().map(Bytes::len).collect();
        let c = CHUNK_BYTES as usize;
        assert_eq!(lens, [100, c, c, c, 100], "degraded: {degraded}");
        assert!(
            pieces.concat() == data[at..at + len],
            "degraded: {degraded}"
        );
        assert!(a.read(at as u64, len).await.unwrap()[..] == data[at..at + len]);
    }
}

/// A 1 MiB read takes one member read per run of back-to-back chunks on a member (not one per
/// chunk), and its pieces are still one per chunk extent with the right bytes.
#[tokio::test]
async fn large_read_pieces_merge_back_to_back_chunks_into_one_member_read() {
    let ms = mems("m", 4, 4 << 20);
    let a = Array::create("r5", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize, 9);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    for m in &ms {
        m.reset_stats();
    }
    let (at, len) = (3 * CHUNK_BYTES as usize, 1 << 20);
    let pieces = a.read_pieces(at as u64, len).await.unwrap();
    assert_eq!(pieces.len(), len / CHUNK_BYTES as usize);
    assert!(pieces.concat() == data[at..at + len]);
    let reads: u64 = ms.iter().map(|m| m.stats().reads).sum();
    // 16 chunks over 4 members, each member's run broken at most by its parity chunk.
    assert!(reads <= 8, "{reads} member reads for 16 chunks");
    // A member failing under a merged read: the run falls back to reconstructing its chunks.
    ms[1].fail_reads(true);
    let degraded = a.read_pieces(at as u64, len).await.unwrap();
    assert_eq!(degraded.len(), len / CHUNK_BYTES as usize);
    assert!(degraded.concat() == data[at..at + len]);
    assert!(a.is_degraded());
}

#[tokio::test]
async fn too_many_failures_give_errors_never_wrong_data() {
    let ms = mems("d", 4, 1 << 20);
    let a = Array::create("r5", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    a.write(0, Bytes::from(pattern(1 << 20, 1))).await.unwrap();
    ms[0].vanish();
    ms[2].vanish();
    let err = a.read(0, 1 << 20).await.unwrap_err();
    assert!(matches!(err, ArrayError::Failed { .. }), "{err}");
    assert!(a.write(0, Bytes::from(vec![1u8; 4096])).await.is_err());
    assert!(a.status().failed);
}

#[tokio::test]
async fn hot_spare_takes_over_a_failed_member() {
    let ms = mems("d", 2, 1 << 20);
    let spare = mems("s", 1, 1 << 20);
    let a = Array::create("r1", Level::Raid1, CHUNK_BYTES, dynv(&ms), dynv(&spare))
        .await
        .unwrap();
    let data = pattern(1 << 20, 5);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    ms[0].fail_writes(true);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.wait_rebuild().await;
    let st = a.status();
    assert_eq!(st.members[0].name.as_deref(), Some("s0"));
    assert_eq!(st.members[0].state, MemberState::Active);
    assert!(!st.degraded);
    assert!(spare[0].snapshot()[DATA_OFFSET_BYTES as usize..] == data[..]);
}

#[tokio::test]
async fn removed_and_readded_member_resyncs_only_dirty_regions() {
    let region_bytes = 128 << 10;
    let ms = mems("d", 4, 2 << 20);
    let opts = CreateOptions {
        bitmap_region_bytes: Some(region_bytes),
        ..Default::default()
    };
    let a = Array::create_with("r5", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![], opts)
        .await
        .unwrap();
    let mut model = vec![0u8; a.size() as usize];
    let all = pattern(model.len(), 9);
    a.write(0, Bytes::from(all.clone())).await.unwrap();
    model.copy_from_slice(&all);
    a.flush().await.unwrap();
    assert_eq!(
        a.status().bitmap_dirty_regions,
        0,
        "flush clears idle regions"
    );

    ms[2].vanish();
    // Three writes, each inside one row; rows 0, 5 and 12 lie in member regions 0, 2 and 6.
    let stripe = a.stripe_bytes();
    for (row, seed) in [(0u64, 1u8), (5, 2), (12, 3)] {
        let at = row * stripe + 1000;
        let data = pattern(5000, seed);
        a.write(at, Bytes::from(data.clone())).await.unwrap();
        model[at as usize..at as usize + data.len()].copy_from_slice(&data);
    }
    a.flush().await.unwrap();
    assert_eq!(a.status().members[2].state, MemberState::Faulty);
    assert_eq!(
        a.status().bitmap_dirty_regions,
        3,
        "bits stay while degraded"
    );
    a.remove_member(2).await.unwrap();
    ms[2].reappear();
    ms[2].reset_stats();
    let st = a.add_member(ms[2].clone()).await.unwrap();
    assert_eq!(st.slot, Some(2));
    a.wait_rebuild().await;
    let st = a.status();
    assert!(!st.degraded, "{:?}", st.members);
    assert_eq!(st.bitmap_resync_regions, 3);
    let written = ms[2].stats().written_bytes;
    assert!(
        written <= 3 * region_bytes + 64 * 4096,
        "resync wrote {written} bytes, more than 3 regions"
    );
    assert!(a.read(0, model.len()).await.unwrap()[..] == model[..]);
    assert_members_match_encode(&a, &ms, &model);
}

#[tokio::test]
async fn rebuild_resumes_from_checkpoint_after_restart() {
    let ms = mems("d", 3, 4 << 20);
    let a = Array::create("r5", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize, 3);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.set_rebuild_rate(2 << 20);
    let fresh = Arc::new(MemMember::new("new", DATA_OFFSET_BYTES + (4 << 20)));
    // A faulty member is replaced by an ordinary rebuild (an active one would be hot-replaced).
    a.fail_member(1).await.unwrap();
    a.replace_member(1, fresh.clone()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1300)).await;
    a.abandon().await;
    let done = a.status().rebuild.unwrap().done_bytes;
    assert!(
        done > 0 && done < 4 << 20,
        "rebuild should be part way: {done}"
    );
    let members = vec![ms[0].clone(), fresh.clone(), ms[2].clone()];
    let b = Array::assemble(dynv(&members)).await.unwrap();
    b.wait_rebuild().await;
    let st = b.status();
    let rb = st.rebuild.unwrap();
    assert!(
        rb.total_bytes < 4 << 20,
        "resumed rebuild covers only what was left: {}",
        rb.total_bytes
    );
    assert!(!st.degraded);
    assert!(b.read(0, data.len()).await.unwrap()[..] == data[..]);
    assert_members_match_encode(&b, &members, &data);
}

#[tokio::test]
async fn scrub_finds_corrupted_parity_and_repair_fixes_it() {
    for level in [Level::Raid5, Level::Raid6, Level::Raid1] {
        let ms = mems("d", 4, 1 << 20);
        let a = Array::create("s", level, CHUNK_BYTES, dynv(&ms), vec![])
            .await
            .unwrap();
        let data = pattern(a.size() as usize, 4);
        a.write(0, Bytes::from(data.clone())).await.unwrap();
        assert_eq!(a.scrub(ScrubMode::Check).await.unwrap().mismatches, 0);
        let geo = a.geometry();
        let row = 3u64;
        let victim = if level == Level::Raid1 {
            2
        } else {
            geo.p_member(row)
        };
        ms[victim].poke(DATA_OFFSET_BYTES + row * CHUNK_BYTES + 10, &[0xde, 0xad]);
        let r = a.scrub(ScrubMode::Check).await.unwrap();
        assert_eq!(r.mismatches, 1, "{level}");
        assert_eq!(a.status().mismatch_count, 1);
        assert_eq!(
            a.scrub(ScrubMode::Check).await.unwrap().mismatches,
            1,
            "check mode changes nothing"
        );
        let r = a.scrub(ScrubMode::Repair).await.unwrap();
        assert_eq!(r.repaired, 1);
        assert_eq!(
            a.scrub(ScrubMode::Check).await.unwrap().mismatches,
            0,
            "{level}"
        );
        assert_members_match_encode(&a, &ms, &data);
    }
}

#[tokio::test]
async fn unclean_shutdown_resyncs_dirty_regions_at_assembly() {
    let ms = mems("d", 3, 2 << 20);
    let opts = CreateOptions {
        bitmap_region_bytes: Some(256 << 10),
        ..Default::default()
    };
    let a = Array::create_with("u", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![], opts)
        .await
        .unwrap();
    let data = pattern(a.size() as usize, 8);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.flush().await.unwrap();
    a.write(0, Bytes::from(vec![7u8; 4096])).await.unwrap();
    a.abandon().await; // crash: superblocks stay dirty, region 0 stays set
                       // A torn stripe: parity of row 0 does not match its data.
    let p = a.geometry().p_member(0);
    ms[p].poke(DATA_OFFSET_BYTES + 100, &[1, 2, 3]);
    let b = Array::assemble(dynv(&ms)).await.unwrap();
    assert_eq!(b.status().unclean_resync_regions, 1);
    assert_eq!(b.scrub(ScrubMode::Check).await.unwrap().mismatches, 0);
    b.close().await.unwrap();
    let c = Array::assemble(dynv(&ms)).await.unwrap();
    assert_eq!(
        c.status().unclean_resync_regions,
        0,
        "a clean shutdown needs no resync"
    );
}

#[tokio::test]
async fn applied_seq_survives_reassembly() {
    let ms = mems("d", 2, 1 << 20);
    let a = Array::create("j", Level::Raid1, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    a.flush().await.unwrap();
    a.set_applied_seq(12345).await.unwrap();
    a.close().await.unwrap();
    let b = Array::assemble(dynv(&ms)).await.unwrap();
    assert_eq!(b.applied_seq(), 12345);
}

#[tokio::test]
async fn degraded_start_and_refusal_when_too_many_are_missing() {
    let ms = mems("d", 4, 1 << 20);
    let a = Array::create("deg", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let data = pattern(a.size() as usize, 2);
    a.write(0, Bytes::from(data.clone())).await.unwrap();
    a.close().await.unwrap();
    let b = Array::assemble(dynv(&ms[1..])).await.unwrap();
    assert!(b.status().degraded);
    assert!(b.read(0, data.len()).await.unwrap()[..] == data[..]);
    b.close().await.unwrap();
    let err = Array::assemble(dynv(&ms[2..])).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("deg") && text.contains("cannot start"),
        "{text}"
    );
}

#[tokio::test]
async fn bad_input_gives_clear_errors() {
    let ms = mems("d", 3, 1 << 20);
    // wrong size at create
    let tiny = Arc::new(MemMember::new("tiny", 1 << 20));
    let mut v = dynv(&ms[..2]);
    v.push(tiny.clone());
    let err = Array::create("x", Level::Raid5, CHUNK_BYTES, v, vec![])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("tiny"), "{err}");
    // listed twice at create
    let err = Array::create(
        "x",
        Level::Raid1,
        CHUNK_BYTES,
        vec![ms[0].clone(), ms[0].clone()],
        vec![],
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("twice"), "{err}");

    let a = Array::create("x", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    a.close().await.unwrap();
    // member listed twice at assembly
    let err = Array::assemble(vec![ms[0].clone(), ms[1].clone(), ms[0].clone()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("listed twice"), "{err}");
    // foreign (blank) member
    let blank = Arc::new(MemMember::new("blank", DATA_OFFSET_BYTES + (1 << 20)));
    let err = Array::assemble(vec![ms[0].clone(), ms[1].clone(), blank])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("blank") && err.to_string().contains("foreign"),
        "{err}"
    );
    // corrupt superblock
    let copy = Arc::new(MemMember::from_vec("corrupt", ms[2].snapshot()));
    copy.poke(40, &[0xff]);
    let err = Array::assemble(vec![ms[0].clone(), ms[1].clone(), copy])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("corrupt") && err.to_string().contains("checksum"),
        "{err}"
    );
    // wrong size: a truncated image
    let mut short = ms[2].snapshot();
    short.truncate(DATA_OFFSET_BYTES as usize + 4096);
    let short = Arc::new(MemMember::from_vec("short", short));
    let err = Array::assemble(vec![ms[0].clone(), ms[1].clone(), short])
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("short") && err.to_string().contains("bytes"),
        "{err}"
    );
    // mixed arrays
    let other = mems("o", 3, 1 << 20);
    let b = Array::create("y", Level::Raid5, CHUNK_BYTES, dynv(&other), vec![])
        .await
        .unwrap();
    b.close().await.unwrap();
    let err = Array::assemble(vec![ms[0].clone(), ms[1].clone(), other[2].clone()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("different arrays"), "{err}");
    // out-of-range I/O
    let a = Array::assemble(dynv(&ms)).await.unwrap();
    assert!(matches!(
        a.read(a.size() - 10, 20).await,
        Err(ArrayError::OutOfRange { .. })
    ));
}

#[tokio::test]
async fn concurrent_partial_writes_to_one_stripe_keep_parity_correct() {
    let ms = mems("d", 5, 1 << 20);
    let a = Array::create("c", Level::Raid6, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for i in 0..32u64 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let at = (i % 8) * 9000 + (i / 8) * 70_000;
            a.write(at, Bytes::from(vec![i as u8 + 1; 9000])).await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(a.scrub(ScrubMode::Check).await.unwrap().mismatches, 0);
}

#[tokio::test]
async fn discard_zeroes_the_range_and_keeps_parity() {
    let ms = mems("d", 4, 1 << 20);
    let a = Array::create("t", Level::Raid5, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    let mut model = pattern(a.size() as usize, 6);
    a.write(0, Bytes::from(model.clone())).await.unwrap();
    a.discard(10_000, 700_000).await.unwrap();
    model[10_000..710_000].fill(0);
    assert!(a.read(0, model.len()).await.unwrap()[..] == model[..]);
    assert_eq!(a.scrub(ScrubMode::Check).await.unwrap().mismatches, 0);
}

#[tokio::test]
async fn create_over_used_images_reads_zeroes_with_consistent_parity() {
    let ms: Vec<Arc<MemMember>> = (0..4)
        .map(|i| {
            Arc::new(MemMember::from_vec(
                format!("old{i}"),
                pattern((DATA_OFFSET_BYTES + (1 << 20)) as usize, i),
            ))
        })
        .collect();
    let a = Array::create("re", Level::Raid6, CHUNK_BYTES, dynv(&ms), vec![])
        .await
        .unwrap();
    assert_eq!(a.scrub(ScrubMode::Check).await.unwrap().mismatches, 0);
    assert!(a
        .read(0, a.size() as usize)
        .await
        .unwrap()
        .iter()
        .all(|b| *b == 0));
}
