//! Large reads that the cache holds only in part: the cached blocks are answered from memory
//! (by reference, like a hit) and only the span of missing blocks goes to the store.
//!
//! Why: [`ReadCache::read_pieces_from`] is all or nothing, so one evicted or removed block in a
//! 1 MiB range (a small write that was not installed, the policy evicting one block, the edge
//! of what a sequential stream filled) sends all 256 blocks back to the store, and a page-cache
//! image then pays two copies for every byte instead of one. Here the cached blocks before the
//! first missing block and after the last one are answered from memory, and one store read
//! covers the span from the first missing block to the last (cached blocks inside it are read
//! again). One read, not one per run of missing blocks: the policy evicts block by block and
//! shard by shard, so a range the cache half-forgot has holes all over it, and a store read per
//! hole turned one merged 1 MiB array read into dozens of small ones (0.71x the throughput of
//! the all-or-nothing path on a sequential read of a range four times the cache, journaled
//! RAID-5, 2026-11-28 01:47Z).
//!
//! Cost on a full miss: before walking the range, the first and the last block are probed; when
//! neither is cached the read is a plain miss (no walk of the other 254 blocks of a 1 MiB miss,
//! which the streaming misses of a scan would pay on every request). A range cached only in its
//! middle is therefore a miss, which is only a lost saving.
//!
//! Safety is the module's ordering argument, block by block: the shard generations are read
//! before the first run's store read and every run's blocks are kept only when no write over
//! the read's span touched their shard since; the cached blocks are the ones the lookup found
//! (immutable `Bytes`). A write racing the read may thus be seen in some blocks of the answer
//! and not in others, which is what a read overlapping an unanswered write may return; a write
//! answered before the read started has ended, so its blocks were installed or removed before
//! the lookup and every block of the answer is at least that new.

use super::*;

/// Reads shorter than this take the all-or-nothing path ([`ReadCache::read_pieces_from`])
/// unchanged: a small read is one or a few blocks, where probing the ends first would only add
/// lock round trips (64 KiB, where the sequential-stream tracking starts too).
pub const PARTIAL_HIT_MIN_BYTES: u64 = stream::STREAM_MIN_READ_BYTES;

/// The span from the first missing block of `found` to the last, as indices into `found`
/// (`start..end`); None when every block was found.
fn missing_span(found: &[Option<Bytes>]) -> Option<(usize, usize)> {
    let start = found.iter().position(Option::is_none)?;
    let end = found.iter().rposition(Option::is_none)? + 1;
    Some((start, end))
}

impl ReadCache {
    /// [`ReadCache::read_pieces_from`], but a range partly in the cache is answered from its
    /// cached blocks plus one `fetch` of the span of missing blocks (see the module doc), kept by
    /// the sequential-stream rule ([`stream`]). Reads shorter than [`PARTIAL_HIT_MIN_BYTES`]
    /// take `read_pieces_from` as they are.
    pub async fn read_pieces_partial<F, Fut, E>(
        &self,
        offset: u64,
        len: u64,
        fetch: F,
    ) -> Result<Vec<Bytes>, E>
    where
        F: Fn(u64, u64) -> Fut,
        Fut: Future<Output = Result<Vec<Bytes>, E>>,
    {
        let Some((first, last)) = self
            .blocks(offset, len)
            .filter(|_| len >= PARTIAL_HIT_MIN_BYTES)
        else {
            return self.read_pieces_from(offset, len, &fetch).await;
        };
        let found = if self.holds_either(first, last) {
            self.lookup_each(first, last)
        } else {
            vec![None; (last - first + 1) as usize]
        };
        let at = (offset - first * CACHE_BLOCK_BYTES) as usize;
        let Some((start, end)) = missing_span(&found) else {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            // Trimmed in place: no second reference per block to take and drop.
            let mut blocks: Vec<Bytes> = found.into_iter().flatten().collect();
            let tail_end = at + len as usize - (blocks.len() - 1) * CACHE_BLOCK_BYTES as usize;
            if let Some(tail) = blocks.last_mut() {
                tail.truncate(tail_end);
            }
            if let Some(head) = blocks.first_mut() {
                head.advance(at);
            }
            return Ok(blocks);
        };
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let span_first = first + start as u64;
        let data = match self
            .fetch_and_fill(span_first, (end - start) as u64, &fetch)
            .await?
        {
            Fetched::Whole(data) => data,
            // A wrong length for the caller to report.
            Fetched::WrongLength(data) => return Ok(data),
        };
        // Cached head, the store's span, cached tail (the found blocks inside the span are
        // dropped: the store's bytes replace them).
        let mut found = found;
        let tail: Vec<Bytes> = found.drain(end..).flatten().collect();
        found.truncate(start);
        let mut pieces: Vec<Bytes> = found.into_iter().flatten().collect();
        pieces.extend(data);
        pieces.extend(tail);
        Ok(slice_pieces(&pieces, at, len as usize))
    }

    /// Whether block `first` or block `last` is cached (a cheap test before walking a range).
    fn holds_either(&self, first: u64, last: u64) -> bool {
        [first, last]
            .iter()
            .any(|&b| lock(&self.shards[shard_of(b)].state).policy.contains(b))
    }

    /// Every block of `first..=last` that is cached, None where it is not; each shard's lock
    /// is taken once for all its blocks.
    fn lookup_each(&self, first: u64, last: u64) -> Vec<Option<Bytes>> {
        let count = (last - first + 1) as usize;
        let mut found: Vec<Option<Bytes>> = vec![None; count];
        for lead in first..=last.min(first + CACHE_SHARD_COUNT as u64 - 1) {
            let p = &lock(&self.shards[shard_of(lead)].state).policy;
            for b in (lead..=last).step_by(CACHE_SHARD_COUNT) {
                found[(b - first) as usize] = p.get(b).cloned();
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    const B: u64 = CACHE_BLOCK_BYTES;
    const STORE_BLOCKS: u64 = 128;

    /// A store whose block `b` is filled with byte `b + 1`, and which logs its reads.
    struct Store {
        bytes: StdMutex<Vec<u8>>,
        reads: StdMutex<Vec<(u64, u64)>>,
    }

    impl Store {
        fn new() -> Store {
            let bytes = (0..STORE_BLOCKS)
                .flat_map(|b| vec![b as u8 + 1; B as usize])
                .collect();
            Store {
                bytes: StdMutex::new(bytes),
                reads: StdMutex::new(Vec::new()),
            }
        }
        fn read(&self, offset: u64, len: u64) -> Vec<Bytes> {
            self.reads.lock().unwrap().push((offset, len));
            let v = self.bytes.lock().unwrap();
            vec![Bytes::copy_from_slice(
                &v[offset as usize..(offset + len) as usize],
            )]
        }
        fn write(&self, offset: u64, data: &[u8]) {
            let mut v = self.bytes.lock().unwrap();
            v[offset as usize..offset as usize + data.len()].copy_from_slice(data);
        }
        fn range(&self, offset: u64, len: u64) -> Vec<u8> {
            self.bytes.lock().unwrap()[offset as usize..(offset + len) as usize].to_vec()
        }
        fn take_reads(&self) -> Vec<(u64, u64)> {
            std::mem::take(&mut *self.reads.lock().unwrap())
        }
    }

    async fn read(c: &ReadCache, s: &Store, offset: u64, len: u64) -> Vec<Bytes> {
        c.read_pieces_partial(offset, len, |o, l| async move { Ok::<_, ()>(s.read(o, l)) })
            .await
            .unwrap()
    }

    /// A cache of 256 blocks holding blocks 0..32 of the store.
    async fn filled_cache(s: &Store) -> ReadCache {
        let c = ReadCache::new(256 * B, STORE_BLOCKS * B).unwrap();
        read(&c, s, 0, 32 * B).await;
        assert_eq!(c.stats().blocks, 32);
        s.take_reads();
        c
    }

    async fn remove(c: &ReadCache, offset: u64, len: u64) {
        c.invalidate_around(offset, len, async { Ok::<_, ()>(()) })
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn a_large_read_cached_in_part_reads_only_the_span_of_its_missing_blocks() {
        let s = Store::new();
        let c = filled_cache(&s).await;
        remove(&c, 5 * B, B).await;
        remove(&c, 20 * B, 3 * B).await;
        let (offset, len) = (100, 32 * B - 200);
        let got = read(&c, &s, offset, len).await;
        assert_eq!(got.concat(), s.range(offset, len));
        assert_eq!(
            s.take_reads(),
            [(5 * B, 18 * B)],
            "one store read, blocks 5..23"
        );
        // The span was kept: the same read is now a hit of 32 blocks.
        let hits = c.stats().hits;
        assert_eq!(read(&c, &s, offset, len).await.len(), 32);
        assert_eq!(c.stats().hits, hits + 1);
        assert!(s.take_reads().is_empty());
    }

    #[tokio::test]
    async fn a_large_read_missing_its_first_and_last_block_is_one_store_read() {
        let s = Store::new();
        let c = filled_cache(&s).await;
        remove(&c, 0, B).await;
        remove(&c, 31 * B, B).await;
        let got = read(&c, &s, 0, 32 * B).await;
        assert_eq!(got.concat(), s.range(0, 32 * B));
        assert_eq!(s.take_reads(), [(0, 32 * B)]);
    }

    #[tokio::test]
    async fn a_read_extending_past_the_cached_blocks_reads_only_the_tail() {
        let s = Store::new();
        let c = filled_cache(&s).await;
        let got = read(&c, &s, 16 * B, 32 * B).await;
        assert_eq!(got.concat(), s.range(16 * B, 32 * B));
        assert_eq!(s.take_reads(), [(32 * B, 16 * B)]);
    }

    /// A write that begins and ends while a run is being read: the run's bytes are not kept
    /// (the write's own bytes are), so the next read returns the write's data.
    #[tokio::test]
    async fn a_write_racing_a_missing_run_never_leaves_the_run_cached() {
        let s = Store::new();
        let c = filled_cache(&s).await;
        remove(&c, 10 * B, 2 * B).await;
        let new = vec![0xee; 2 * B as usize];
        let got = c
            .read_pieces_partial(0, 32 * B, |o, l| {
                let (c, s, new) = (&c, &s, &new);
                async move {
                    let data = s.read(o, l);
                    let ranges = [(10 * B, 2 * B)];
                    let ticket = c.begin_write(&ranges);
                    s.write(10 * B, new);
                    let written = [(10 * B, &new[..])];
                    c.end_write(ticket, &ranges, Some(&written[..]));
                    Ok::<_, ()>(data)
                }
            })
            .await
            .unwrap();
        // The racing read may return either version of the blocks it overlapped.
        assert_eq!(got.concat().len(), 32 * B as usize);
        assert!(c.stats().fills_dropped >= 2, "{:?}", c.stats());
        assert_eq!(read(&c, &s, 0, 32 * B).await.concat(), s.range(0, 32 * B));
        assert_eq!(s.range(10 * B, 2 * B), new);
    }

    #[test]
    fn missing_span_runs_from_the_first_missing_block_to_the_last() {
        let some = || Some(Bytes::new());
        let found = [some(), None, some(), None, None, some()];
        assert_eq!(missing_span(&found), Some((1, 5)));
        assert_eq!(missing_span(&[None]), Some((0, 1)));
        assert_eq!(missing_span(&[some(), some()]), None);
    }
}
