//! The read cache against a model store: the ordering rules of the module doc, one interleaving
//! at a time, then every interleaving a proptest finds.

use super::*;
use proptest::prelude::*;
use std::sync::Mutex as StdMutex;

const B: u64 = CACHE_BLOCK_BYTES;

/// A store of `blocks` blocks in memory.
struct Store(StdMutex<Vec<u8>>);

impl Store {
    fn new(blocks: u64) -> Store {
        Store(StdMutex::new(vec![0; (blocks * B) as usize]))
    }
    fn read(&self, offset: u64, len: u64) -> Bytes {
        let v = self.0.lock().unwrap();
        Bytes::copy_from_slice(&v[offset as usize..(offset + len) as usize])
    }
    fn write(&self, offset: u64, data: &[u8]) {
        let mut v = self.0.lock().unwrap();
        v[offset as usize..offset as usize + data.len()].copy_from_slice(data);
    }
}

fn filled(byte: u8, len: u64) -> Bytes {
    Bytes::from(vec![byte; len as usize])
}

fn cache(blocks: u64, store_blocks: u64) -> ReadCache {
    ReadCache::new(blocks * B, store_blocks * B).unwrap()
}

async fn read(c: &ReadCache, s: &Store, offset: u64, len: u64) -> Bytes {
    c.read(offset, len, |o, l| async move { Ok::<_, ()>(s.read(o, l)) })
        .await
        .unwrap()
}

#[tokio::test]
async fn second_read_is_a_hit_with_the_same_bytes() {
    let s = Store::new(64);
    s.write(5 * B, &[7; 4096]);
    let c = cache(256, 64);
    assert_eq!(read(&c, &s, 5 * B + 100, 200).await, filled(7, 200));
    assert_eq!(read(&c, &s, 5 * B + 100, 200).await, filled(7, 200));
    let st = c.stats();
    assert_eq!((st.hits, st.misses), (1, 1));
}

#[tokio::test]
async fn multi_block_read_hits_after_fill() {
    let s = Store::new(64);
    s.write(3 * B, &[1; 4096]);
    s.write(4 * B, &[2; 4096]);
    let c = cache(256, 64);
    let first = read(&c, &s, 3 * B + 10, B).await;
    let again = read(&c, &s, 3 * B + 10, B).await;
    assert_eq!(first, again);
    assert_eq!(c.stats().hits, 1);
    assert_eq!(&again[..B as usize - 10], &[1; 4086][..]);
    assert_eq!(again[B as usize - 10..], [2; 10]);
}

async fn read_pieces(c: &ReadCache, s: &Store, offset: u64, len: u64) -> Vec<Bytes> {
    c.read_pieces(offset, len, |o, l| async move { Ok::<_, ()>(s.read(o, l)) })
        .await
        .unwrap()
}

#[tokio::test]
async fn hit_pieces_are_the_cached_blocks_trimmed_to_the_range() {
    let s = Store::new(64);
    for b in 0..4u8 {
        s.write(u64::from(b) * B, &[b + 1; 4096]);
    }
    let c = cache(256, 64);
    let miss = read_pieces(&c, &s, 10, 3 * B).await;
    assert_eq!(miss.len(), 1, "a miss is the store's one buffer");
    let hit = read_pieces(&c, &s, 10, 3 * B).await;
    assert_eq!(c.stats().hits, 1);
    let lens: Vec<usize> = hit.iter().map(Bytes::len).collect();
    assert_eq!(lens, [4086, 4096, 4096, 10]);
    assert_eq!(hit.concat(), miss[0]);
    // The pieces are the cached blocks' memory, not copies.
    let cached = lock(&c.shards[shard_of(1)].state)
        .policy
        .get(1)
        .cloned()
        .unwrap();
    assert_eq!(hit[1].as_ptr(), cached.as_ptr());
}

#[tokio::test]
async fn handed_out_pieces_keep_their_bytes_when_a_write_replaces_the_block() {
    let s = Store::new(64);
    let c = cache(256, 64);
    read_pieces(&c, &s, 0, 2 * B).await;
    let before = read_pieces(&c, &s, 0, 2 * B).await;
    assert_eq!(before.len(), 2);
    let new = filled(9, 2 * B);
    c.write(0, &new, async {
        s.write(0, &new);
        Ok::<_, ()>(())
    })
    .await
    .unwrap();
    assert_eq!(
        before.concat(),
        vec![0; 2 * B as usize],
        "a piece changed under its reader"
    );
    assert_eq!(read_pieces(&c, &s, 0, 2 * B).await.concat(), new);
}

#[test]
fn slice_pieces_spans_piece_boundaries_without_copying() {
    let pieces = [
        Bytes::from_static(b"abcd"),
        Bytes::from_static(b"efg"),
        Bytes::from_static(b"hijkl"),
    ];
    let got = slice_pieces(&pieces, 2, 7);
    assert_eq!(got.concat(), b"cdefghi");
    assert_eq!(got.len(), 3);
    assert_eq!(got[1].as_ptr(), pieces[1].as_ptr());
    assert_eq!(slice_pieces(&pieces, 4, 3).concat(), b"efg");
    assert!(slice_pieces(&pieces, 12, 0).is_empty());
}

#[test]
fn split_blocks_keeps_whole_block_pieces_and_copies_the_rest() {
    let one = Bytes::from(vec![1u8; 8]);
    // A piece straddling blocks, then a block-sized piece at a block boundary.
    let pieces = [
        Bytes::from(vec![2u8; 12]),
        Bytes::from(vec![3u8; 4]),
        one.clone(),
    ];
    let blocks = split_blocks(&pieces, 8);
    let joined: Vec<u8> = pieces.iter().flat_map(|p| p.to_vec()).collect();
    assert_eq!(blocks.len(), 3);
    assert!(blocks.iter().all(|b| b.len() == 8));
    assert_eq!(blocks.concat(), joined);
    assert_eq!(
        blocks[2].as_ptr(),
        one.as_ptr(),
        "the block-sized piece was copied"
    );
    // A block-sized piece that is not at a block boundary is copied into place.
    let odd = [
        Bytes::from(vec![4u8; 4]),
        one.clone(),
        Bytes::from(vec![5u8; 4]),
    ];
    let blocks = split_blocks(&odd, 8);
    assert_eq!(blocks.concat(), odd.concat());
    assert_ne!(blocks[1].as_ptr(), one.as_ptr());
}

#[tokio::test]
async fn miss_from_a_pieced_store_hands_on_its_pieces_and_fills_every_block() {
    let s = Store::new(64);
    for b in 0..6u8 {
        s.write(u64::from(b) * B, &[b + 1; 4096]);
    }
    let c = cache(256, 64);
    // The store answers in two pieces split mid-block (as chunk extents need not be blocks).
    let fetch = |o: u64, l: u64| {
        let all = s.read(o, l);
        let cut = (B + B / 2) as usize;
        async move { Ok::<_, ()>(vec![all.slice(..cut), all.slice(cut..)]) }
    };
    let miss = c.read_pieces_from(100, 5 * B, fetch).await.unwrap();
    assert_eq!(
        miss.len(),
        2,
        "a miss is the store's pieces, not a joined copy"
    );
    assert_eq!(miss.concat(), s.read(100, 5 * B).to_vec());
    let hit = read_pieces(&c, &s, 0, 6 * B).await;
    assert_eq!(c.stats().hits, 1, "every block of the miss was kept");
    assert_eq!(hit.concat(), s.read(0, 6 * B).to_vec());
}

#[tokio::test]
async fn block_aligned_miss_is_the_stores_own_pieces() {
    let s = Store::new(64);
    for b in 0..4u8 {
        s.write(u64::from(b) * B, &[b + 1; 4096]);
    }
    let c = cache(256, 64);
    let given = std::sync::Mutex::new(Vec::new());
    let fetch = |o: u64, l: u64| {
        let all = s.read(o, l);
        let pieces = vec![all.slice(..B as usize), all.slice(B as usize..)];
        *given.lock().unwrap() = pieces.iter().map(|p| p.as_ptr()).collect::<Vec<_>>();
        async move { Ok::<_, ()>(pieces) }
    };
    let miss = c.read_pieces_from(B, 3 * B, fetch).await.unwrap();
    let got: Vec<_> = miss.iter().map(|p| p.as_ptr()).collect();
    assert_eq!(
        got,
        *given.lock().unwrap(),
        "the store's buffers, not slices copied"
    );
    assert_eq!(miss.concat(), s.read(B, 3 * B).to_vec());
    let hit = read_pieces(&c, &s, B, 3 * B).await;
    assert_eq!(c.stats().hits, 1, "every block of the miss was kept");
    assert_eq!(hit.concat(), s.read(B, 3 * B).to_vec());
}

#[tokio::test]
async fn write_replaces_cached_block() {
    let s = Store::new(64);
    let c = cache(256, 64);
    assert_eq!(read(&c, &s, 0, B).await, filled(0, B));
    let new = filled(9, B);
    c.write(0, &new, async {
        s.write(0, &new);
        Ok::<_, ()>(())
    })
    .await
    .unwrap();
    assert_eq!(read(&c, &s, 0, B).await, new);
    assert_eq!(c.stats().hits, 1, "the written block is served from memory");
}

#[tokio::test]
async fn partial_block_write_removes_the_block() {
    let s = Store::new(64);
    let c = cache(256, 64);
    read(&c, &s, 0, B).await;
    let new = filled(3, 512);
    c.write(512, &new, async {
        s.write(512, &new);
        Ok::<_, ()>(())
    })
    .await
    .unwrap();
    let got = read(&c, &s, 0, B).await;
    assert_eq!(got[512..1024], [3; 512]);
    assert_eq!(c.stats().misses, 2);
}

#[tokio::test]
async fn failed_write_leaves_nothing_cached_for_its_range() {
    let s = Store::new(64);
    let c = cache(256, 64);
    read(&c, &s, 0, B).await;
    let new = filled(4, B);
    let r = c
        .write(0, &new, async {
            // Half the write landed before the error.
            s.write(0, &new[..2048]);
            Err::<(), _>("member failed")
        })
        .await;
    assert!(r.is_err());
    assert_eq!(read(&c, &s, 0, B).await, s.read(0, B));
}

#[tokio::test]
async fn zeroing_invalidates() {
    let s = Store::new(64);
    s.write(0, &[5; 8192]);
    let c = cache(256, 64);
    read(&c, &s, 0, 2 * B).await;
    c.invalidate_around(0, 2 * B, async {
        s.write(0, &[0; 8192]);
        Ok::<_, ()>(())
    })
    .await
    .unwrap();
    assert_eq!(read(&c, &s, 0, 2 * B).await, filled(0, 2 * B));
}

#[tokio::test]
async fn fill_racing_a_write_is_dropped() {
    let s = Store::new(64);
    let c = cache(256, 64);
    let new = filled(8, B);
    // The store is read (old data), then a whole write runs, then the fill arrives.
    let got = c
        .read(0, B, |o, l| {
            let old = s.read(o, l);
            let (c, s, new) = (&c, &s, new.clone());
            async move {
                c.write(0, &new, async {
                    s.write(0, &new);
                    Ok::<_, ()>(())
                })
                .await?;
                Ok::<_, ()>(old)
            }
        })
        .await
        .unwrap();
    assert_eq!(got, filled(0, B), "the racing read may return the old data");
    assert_eq!(read(&c, &s, 0, B).await, new, "but must not keep it");
    assert_eq!(c.stats().fills_dropped, 1);
}

#[tokio::test]
async fn fill_before_write_end_is_replaced() {
    let s = Store::new(64);
    let c = cache(256, 64);
    let ranges = [(0, B)];
    let ticket = c.begin_write(&ranges);
    // A read between begin and the store update installs the old data ...
    assert_eq!(read(&c, &s, 0, B).await, filled(0, B));
    let new = filled(6, B);
    s.write(0, &new);
    // ... and end_write replaces it (here, as a trim would, by removing it).
    c.end_write(ticket, &ranges, None);
    assert_eq!(read(&c, &s, 0, B).await, new);
}

#[tokio::test]
async fn overlapping_writes_leave_the_block_uncached() {
    let s = Store::new(64);
    let c = cache(256, 64);
    let r = [(0, B)];
    let (a, b) = (filled(1, B), filled(2, B));
    let ta = c.begin_write(&r);
    let tb = c.begin_write(&r);
    s.write(0, &b);
    c.end_write(tb, &r, Some(&[(0, &b[..])]));
    // A landed last on the store.
    s.write(0, &a);
    c.end_write(ta, &r, Some(&[(0, &a[..])]));
    assert_eq!(read(&c, &s, 0, B).await, a);
}

#[tokio::test]
async fn concurrent_writes_to_different_blocks_of_one_shard_both_stay_cached() {
    // Blocks 0 and 16 share shard 0; eight 1 MiB writes in flight at once used to leave
    // nothing cached because each saw the others' begin and end.
    let s = Store::new(64);
    let c = cache(256, 64);
    let (ra, rb) = ([(0, B)], [(16 * B, B)]);
    let (a, b) = (filled(1, B), filled(2, B));
    let ta = c.begin_write(&ra);
    let tb = c.begin_write(&rb);
    s.write(0, &a);
    s.write(16 * B, &b);
    c.end_write(tb, &rb, Some(&[(16 * B, &b[..])]));
    c.end_write(ta, &ra, Some(&[(0, &a[..])]));
    assert_eq!(c.stats().blocks, 2);
    assert_eq!(read(&c, &s, 0, B).await, a);
    assert_eq!(read(&c, &s, 16 * B, B).await, b);
    assert_eq!((c.stats().hits, c.stats().misses), (2, 0));
}

#[tokio::test]
async fn fill_racing_a_write_elsewhere_in_its_shard_is_kept() {
    let s = Store::new(64);
    s.write(0, &[5; 4096]);
    let c = cache(256, 64);
    let other = filled(9, B);
    let got = c
        .read(0, B, |o, l| {
            let old = s.read(o, l);
            let (c, s, other) = (&c, &s, other.clone());
            async move {
                // Block 32 is in block 0's shard, not in the range read.
                c.write(32 * B, &other, async {
                    s.write(32 * B, &other);
                    Ok::<_, ()>(())
                })
                .await?;
                Ok::<_, ()>(old)
            }
        })
        .await
        .unwrap();
    assert_eq!(got, filled(5, B));
    assert_eq!(c.stats().fills_dropped, 0);
    assert_eq!(read(&c, &s, 0, B).await, filled(5, B));
    assert_eq!(c.stats().hits, 1);
}

/// One streaming write of the whole 64-block store, through the cache.
async fn stream_write(c: &ReadCache, s: &Store, byte: u8) {
    let data = filled(byte, STREAMING_WRITE_BYTES);
    c.write(0, &data, async {
        s.write(0, &data);
        Ok::<_, ()>(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn streaming_write_keeps_nothing_and_drops_blocks_it_overwrites() {
    let blocks = STREAMING_WRITE_BYTES / B;
    let s = Store::new(blocks);
    let c = cache(2 * blocks, blocks);
    stream_write(&c, &s, 1).await;
    assert_eq!(c.stats().blocks, 0, "a streaming write is not copied in");
    assert_eq!(read(&c, &s, 0, B).await, filled(1, B));
    assert_eq!(c.stats().blocks, 1, "the block read is kept");
    // Overwritten by another streaming write: removed, not replaced.
    stream_write(&c, &s, 2).await;
    assert_eq!(c.stats().blocks, 0);
    assert_eq!(read(&c, &s, 0, B).await, filled(2, B));
}

#[tokio::test]
async fn streaming_write_never_evicts() {
    let blocks = STREAMING_WRITE_BYTES / B;
    // A store twice the write; the cache holds exactly its first half.
    let s = Store::new(2 * blocks);
    let c = cache(blocks, 2 * blocks);
    for b in 0..blocks {
        read(&c, &s, (blocks + b) * B, B).await;
    }
    let full = c.stats();
    assert_eq!(full.blocks, blocks);
    stream_write(&c, &s, 3).await;
    let after = c.stats();
    assert_eq!((after.blocks, after.evictions), (blocks, full.evictions));
    assert_eq!(read(&c, &s, 0, B).await, filled(3, B));
}

#[tokio::test]
async fn tail_block_past_a_whole_block_end_is_never_cached() {
    let c = ReadCache::new(256 * B, 10 * B + 512).unwrap();
    let s = Store::new(11);
    read(&c, &s, 10 * B, 512).await;
    read(&c, &s, 10 * B, 512).await;
    assert_eq!(c.stats().hits, 0);
    assert_eq!(c.stats().blocks, 0);
}

#[test]
fn capacity_below_one_block_per_shard_disables() {
    assert!(ReadCache::new(0, 1 << 30).is_none());
    assert!(ReadCache::new(B * CACHE_SHARD_COUNT as u64 - 1, 1 << 30).is_none());
    assert!(ReadCache::new(B * CACHE_SHARD_COUNT as u64, 1 << 30).is_some());
}

/// One step of an interleaving of reads and writes on a few blocks.
#[derive(Debug, Clone)]
enum Step {
    /// A read miss takes its generations and reads the store (as `read` does before the fill).
    ReadStart { block: u64 },
    /// The oldest started read installs what it read.
    ReadFill,
    /// A write begins (its data not yet on the store).
    WriteBegin {
        block: u64,
        len_blocks: u64,
        byte: u8,
    },
    /// The oldest begun write lands on the store.
    WriteLand,
    /// The oldest landed write ends (trims: `data` is None).
    WriteEnd { as_trim: bool },
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        (0..6u64).prop_map(|block| Step::ReadStart { block }),
        Just(Step::ReadFill),
        (0..6u64, 1..3u64, any::<u8>()).prop_map(|(block, len_blocks, byte)| Step::WriteBegin {
            block,
            len_blocks,
            byte
        }),
        Just(Step::WriteLand),
        any::<bool>().prop_map(|as_trim| Step::WriteEnd { as_trim }),
    ]
}

struct Pending {
    offset: u64,
    data: Bytes,
    ticket: WriteTicket,
}

/// Runs `steps` on a cache over a store of `store_blocks` blocks, where step block `i` is store
/// block `i * stride` and a write of `n` blocks covers `n * stride` store blocks, checking that
/// once no write is in flight every cached block equals the store.
fn check_interleaving(
    steps: Vec<Step>,
    store_blocks: u64,
    stride: u64,
) -> Result<(), TestCaseError> {
    let s = Store::new(store_blocks);
    // Two blocks per shard: small enough that evictions happen too.
    let c = cache(2 * CACHE_SHARD_COUNT as u64, store_blocks);
    let mut reads: Vec<(u64, [u64; CACHE_SHARD_COUNT], Bytes)> = Vec::new();
    let mut begun: Vec<Pending> = Vec::new();
    let mut landed: Vec<Pending> = Vec::new();
    for st in steps {
        match st {
            Step::ReadStart { block } => {
                let block = block * stride;
                let gens = std::array::from_fn(|i| c.shards[i].gen.load(Ordering::Acquire));
                reads.push((block, gens, s.read(block * B, B)));
            }
            Step::ReadFill => {
                if !reads.is_empty() {
                    let (block, gens, data) = reads.remove(0);
                    c.fill(block, std::slice::from_ref(&data), &gens);
                }
            }
            Step::WriteBegin {
                block,
                len_blocks,
                byte,
            } => {
                let block = block * stride;
                let len = (len_blocks * stride).min(store_blocks - block) * B;
                let ticket = c.begin_write(&[(block * B, len)]);
                begun.push(Pending {
                    offset: block * B,
                    data: filled(byte, len),
                    ticket,
                });
            }
            Step::WriteLand => {
                if !begun.is_empty() {
                    let w = begun.remove(0);
                    s.write(w.offset, &w.data);
                    landed.push(w);
                }
            }
            Step::WriteEnd { as_trim } => {
                if !landed.is_empty() {
                    let w = landed.remove(0);
                    let r = [(w.offset, w.data.len() as u64)];
                    let pieces = [(w.offset, &w.data[..])];
                    c.end_write(w.ticket, &r, (!as_trim).then_some(&pieces[..]));
                }
            }
        }
        if begun.is_empty() && landed.is_empty() {
            for b in 0..store_blocks {
                let shard = &c.shards[shard_of(b)];
                let cached = lock(&shard.state).policy.get(b).cloned();
                if let Some(v) = cached {
                    prop_assert_eq!(v, s.read(b * B, B), "block {} stale", b);
                }
            }
            // A hit over several blocks (the pieces the NBD server sends) equals the store.
            let (offset, len) = (B / 2, 3 * B);
            if let Some(pieces) = c.lookup(offset, len, 0, 3) {
                prop_assert_eq!(pieces.concat(), s.read(offset, len).to_vec());
            }
        }
    }
    Ok(())
}

proptest! {
    /// The interleavings below with blocks that share shards (stride 16: every step block is
    /// in shard 0, so only the write log's block spans tell the writes apart).
    #[test]
    fn quiescent_cache_equals_the_store_with_blocks_sharing_a_shard(
        steps in proptest::collection::vec(step(), 0..80),
    ) {
        check_interleaving(steps.clone(), 8 * CACHE_SHARD_COUNT as u64, CACHE_SHARD_COUNT as u64)?;
        // Stride 3: neighbours in different shards, writes spanning several of them.
        check_interleaving(steps, 24, 3)?;
    }

    /// Whatever the interleaving of fills and writes, once no write is in flight every cached
    /// block equals the store.
    #[test]
    fn quiescent_cache_always_equals_the_store(steps in proptest::collection::vec(step(), 0..80)) {
        check_interleaving(steps, 8, 1)?;
    }
}

/// A sequential scan of large reads over twice the cache stops filling after its share, so the
/// blocks cached before it (read once, which S3-FIFO's probationary queue alone would not
/// protect) stay, and the scan evicts nothing; every read still returns the store's bytes.
#[tokio::test]
async fn a_scan_larger_than_the_cache_does_not_push_out_what_it_held() {
    const READ: u64 = 16 * B; // 64 KiB: large enough to be tracked as a stream
    let s = Store::new(2048);
    for b in 0..2048 {
        s.write(b * B, &[(b % 251) as u8; B as usize]);
    }
    let c = cache(512, 2048);
    let held = 1536..1600u64;
    for b in held.clone() {
        read(&c, &s, b * B, B).await;
    }
    for i in 0..1024 / 16 {
        let got = read_pieces(&c, &s, i * READ, READ).await;
        let joined: Vec<u8> = got.iter().flat_map(|p| p.iter().copied()).collect();
        assert_eq!(joined, s.read(i * READ, READ), "scan read {i}");
    }
    let st = c.stats();
    assert!(st.stream_fills_skipped > 0, "{st:?}");
    assert_eq!(st.evictions, 0, "the scan pushed blocks out: {st:?}");
    let before = st.hits;
    for b in held.clone() {
        assert_eq!(read(&c, &s, b * B, B).await, s.read(b * B, B));
    }
    assert_eq!(
        c.stats().hits - before,
        held.end - held.start,
        "{:?}",
        c.stats()
    );
}

/// Small reads are never treated as a stream: a 4 KiB scan fills as before.
#[tokio::test]
async fn small_sequential_reads_always_fill() {
    let s = Store::new(64);
    let c = cache(32, 64);
    for b in 0..64 {
        read(&c, &s, b * B, B).await;
    }
    assert_eq!(c.stats().stream_fills_skipped, 0);
}
