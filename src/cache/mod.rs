//! The volume read cache: 4 KiB blocks of what the store (an array or an image) holds, kept in
//! memory under quick_cache's S3-FIFO-like policy ([`policy`] says why that one), so re-read data
//! does not go back to the disks.
//!
//! Where it sits: directly over the store, under everything else. For a journaled volume that
//! is under the NVRAM dirty index: the journal answers a read from the index first and asks the
//! store (through this cache) only for ranges the index does not hold, so the cache never hides
//! a write that is still only in NVRAM. For plain volumes and unjournaled arrays it is the
//! store's front. It caches the *store's* bytes, not the volume's, which is why it stays right
//! whatever the journal does above it.
//!
//! # Staying equal to the store (the ordering argument)
//!
//! Every write that reaches the store (a client write on a plain volume, a consistency point's
//! write-back, a zeroing or trim, a journal replay) calls [`ReadCache::begin_write`] before it is
//! issued and [`ReadCache::end_write`] after it returned (failed or not). Each shard has a
//! generation; `begin_write` and `end_write` bump it under the shard's lock. A read miss reads
//! the shard generations before it asks the store and installs a block only if its shard's
//! generation is still the same, under the lock. Take any write W and any fill F of a block W
//! touches:
//! - F read its generation after W's `end_write`: F's store read started after W completed, so
//!   it saw W's data (or a later write's, which has its own begin/end).
//! - F read it before W's `end_write` and installs after it: the generation changed, F is
//!   dropped.
//! - F installs before W's `end_write`: `end_write` then replaces or removes the block, so what
//!   F put there does not outlive W.
//!
//! `end_write` installs the written bytes (whole blocks only) when no other write began or
//! ended in the shard since its own `begin_write`, else removes the blocks: with two
//! overlapping writes in flight, which one the store kept is unknown, and the next read asks the
//! store. Skipping a fill or removing a block only costs a later miss.
//!
//! "A write began or ended in the shard" is narrowed to "... over one of the blocks in
//! question": each shard logs the block span of its last write events ([`writelog`]), and a
//! fill or install is given up only when an event since its generation overlaps its own span
//! (or the log no longer reaches back that far). The argument above holds block by block, and
//! concurrent writes to different places (a sequential writer, a consistency point) no longer
//! cancel each other's installs.
//!
//! A block straddling the store's end (a size not a multiple of 4 KiB) is never cached; reads
//! touching it go to the store.
//!
//! A sequential stream of large misses stops filling the cache once it has filled
//! [`STREAM_FILL_CACHE_PERCENT`] of it ([`stream`] says why): its later misses are handed to the
//! caller without being kept. That only ever skips a fill, which the ordering argument allows.
//!
//! A large read the cache holds only in part is answered from its cached blocks plus one store
//! read of the span of missing blocks ([`partial`]).
//!
//! Cold start on takeover and drop at giveback need nothing here: the cache belongs to the
//! volume's device, which takeover creates and giveback drops.

pub mod hasher;
pub mod partial;
pub mod policy;
pub mod s3fifo;
pub mod stream;
pub mod writelog;

use bytes::{Buf, Bytes, BytesMut};
use policy::BlockPolicy;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use stream::StreamTracker;
use writelog::{BlockSpan, WriteLog};
// Kept blocks are copied into recycled 4 KiB buffers: a cache that evicts one block for each it
// admits then reuses memory instead of faulting in fresh pages (see `block_pool`).
use twinblock_io::bufpool::copy_block;

/// Bytes of one cached block; requests are widened to whole blocks on a miss.
pub const CACHE_BLOCK_BYTES: u64 = 4096;
// A cached block is exactly one buffer of the recycled block pool.
const _: () = assert!(CACHE_BLOCK_BYTES as usize == twinblock_io::bufpool::BLOCK_POOL_BLOCK_BYTES);
/// Independent lock domains; block `b` lives in shard `b % CACHE_SHARD_COUNT`.
const CACHE_SHARD_COUNT: usize = 16;
/// Default `read_cache` of a volume, in bytes.
pub const DEFAULT_READ_CACHE_BYTES: u64 = 256 << 20;
/// Written pieces at least this long are streaming writes: their blocks are removed from the
/// cache, never installed. Copying every block of a 1 MiB sequential write into the cache added
/// 15% to the daemon's CPU per write (1,084 against 937 µs, journaled RAID-5), and a large
/// write evicting read-hot blocks would undo the policy's scan resistance. Installing only into
/// free room and only blocks not cached yet still cost resident 1 MiB writes 16% of their
/// throughput (a repeated pass alternates between removing and re-copying each block: 958
/// against 1,144 IOPS, `tools/bench-ab`, 2026-11-27 23:40Z), so a streaming write's data enters
/// the cache only when it is read.
pub const STREAMING_WRITE_BYTES: u64 = 256 << 10;
/// Smallest cache that holds anything: one block per shard.
pub const READ_CACHE_MIN_BYTES: u64 = CACHE_BLOCK_BYTES * CACHE_SHARD_COUNT as u64;
/// Share of the cache (percent of its capacity) one sequential stream of large misses may fill;
/// its later misses are not kept (see [`stream`]). Half leaves the other half to everything
/// else, and is what the policy's ghost list (half the capacity, in keys) can remember, so the
/// filled part of a repeated scan is admitted to the main queue on a later pass.
pub const STREAM_FILL_CACHE_PERCENT: u64 = 50;

struct Shard {
    /// Bumped (under `state`'s lock) by every write's begin and end; read without the lock by
    /// a miss before it asks the store.
    gen: AtomicU64,
    state: Mutex<ShardState>,
}

/// What a shard's lock guards.
struct ShardState {
    policy: BlockPolicy,
    /// The block spans of the last write events, by the generation each took.
    writes: WriteLog,
}

/// Counters for status and metrics.
#[derive(Debug, Default)]
struct Counters {
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
    fills_dropped: AtomicU64,
    stream_fills_skipped: AtomicU64,
}

/// A snapshot of the cache's counters and size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct CacheStats {
    /// Reads answered entirely from memory.
    pub hits: u64,
    /// Reads that went to the store.
    pub misses: u64,
    /// Blocks dropped to make room.
    pub evictions: u64,
    /// Blocks read from the store but not kept because a write touched their shard meanwhile.
    pub fills_dropped: u64,
    /// Blocks read from the store but not kept because their read continued a sequential
    /// stream that had filled its share of the cache.
    pub stream_fills_skipped: u64,
    /// Blocks held now.
    pub blocks: u64,
    /// Most blocks held.
    pub capacity_blocks: u64,
}

/// What `begin_write` saw, for `end_write`.
#[must_use = "every begin_write needs its end_write"]
pub struct WriteTicket {
    gens: [u64; CACHE_SHARD_COUNT],
    touched: [bool; CACHE_SHARD_COUNT],
    /// The blocks the write covers (all its ranges); None when it covers none.
    span: Option<BlockSpan>,
}

/// What a miss's fetch gave back ([`ReadCache::fetch_and_fill`]).
enum Fetched {
    /// Exactly the bytes asked for (kept in the cache when the stream rule allowed).
    Whole(Vec<Bytes>),
    /// A length other than the one asked for: nothing kept, handed on for the caller to report.
    WrongLength(Vec<Bytes>),
}

/// A read cache of one store of `size` bytes.
pub struct ReadCache {
    shards: Box<[Shard]>,
    /// End of the last whole block: bytes past it are never cached.
    cached_end: u64,
    counters: Counters,
    /// Which large misses fill (see [`stream`]); taken only by misses of at least
    /// [`stream::STREAM_MIN_READ_BYTES`].
    streams: Mutex<StreamTracker>,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadCache")
            .field("stats", &self.stats())
            .finish()
    }
}

fn lock(m: &Mutex<ShardState>) -> MutexGuard<'_, ShardState> {
    // A panic while holding the lock cannot leave a block disagreeing with the store (a block
    // is replaced in one assignment), so a poisoned lock is still usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn shard_of(block: u64) -> usize {
    (block % CACHE_SHARD_COUNT as u64) as usize
}

impl ReadCache {
    /// A cache of at most `capacity_bytes` (rounded down to blocks) over a store of
    /// `store_bytes`; `None` when that is less than one block per shard (disabled).
    pub fn new(capacity_bytes: u64, store_bytes: u64) -> Option<ReadCache> {
        let blocks = capacity_bytes / CACHE_BLOCK_BYTES;
        let per_shard = usize::try_from(blocks / CACHE_SHARD_COUNT as u64).ok()?;
        let shards = (0..CACHE_SHARD_COUNT)
            .map(|_| {
                Some(Shard {
                    gen: AtomicU64::new(0),
                    state: Mutex::new(ShardState {
                        policy: BlockPolicy::new(per_shard)?,
                        writes: WriteLog::default(),
                    }),
                })
            })
            .collect::<Option<_>>()?;
        let stream_limit_bytes = blocks * CACHE_BLOCK_BYTES / 100 * STREAM_FILL_CACHE_PERCENT;
        Some(ReadCache {
            shards,
            cached_end: store_bytes - store_bytes % CACHE_BLOCK_BYTES,
            counters: Counters::default(),
            streams: Mutex::new(StreamTracker::new(stream_limit_bytes)),
        })
    }

    pub fn stats(&self) -> CacheStats {
        let (mut blocks, mut capacity) = (0, 0);
        for s in self.shards.iter() {
            let p = &lock(&s.state).policy;
            blocks += p.len() as u64;
            capacity += p.capacity() as u64;
        }
        let c = &self.counters;
        CacheStats {
            hits: c.hits.load(Ordering::Relaxed),
            misses: c.misses.load(Ordering::Relaxed),
            evictions: c.evictions.load(Ordering::Relaxed),
            fills_dropped: c.fills_dropped.load(Ordering::Relaxed),
            stream_fills_skipped: c.stream_fills_skipped.load(Ordering::Relaxed),
            blocks,
            capacity_blocks: capacity,
        }
    }

    /// Blocks `first..=last` covering `offset..offset+len` (len > 0), when all are cacheable.
    fn blocks(&self, offset: u64, len: u64) -> Option<(u64, u64)> {
        let end = offset.checked_add(len)?;
        if len == 0 || end > self.cached_end {
            return None;
        }
        Some((offset / CACHE_BLOCK_BYTES, (end - 1) / CACHE_BLOCK_BYTES))
    }

    /// `len` bytes at `offset`, from memory when every block is cached, else from
    /// `fetch(offset, len)` widened to whole blocks (the blocks are then kept).
    pub async fn read<F, Fut, E>(&self, offset: u64, len: u64, fetch: F) -> Result<Bytes, E>
    where
        F: FnOnce(u64, u64) -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        Ok(join(self.read_pieces(offset, len, fetch).await?, len))
    }

    /// [`ReadCache::read`] without joining: a hit is the cached blocks themselves (the first
    /// and last trimmed to the range), shared with the cache, in order; a miss is one piece.
    /// The pieces are immutable: a write that replaces or removes a block afterwards leaves a
    /// piece already handed out as it was (the same as a copy taken at lookup time).
    pub async fn read_pieces<F, Fut, E>(
        &self,
        offset: u64,
        len: u64,
        fetch: F,
    ) -> Result<Vec<Bytes>, E>
    where
        F: FnOnce(u64, u64) -> Fut,
        Fut: Future<Output = Result<Bytes, E>>,
    {
        self.read_pieces_from(
            offset,
            len,
            |o, l| async move { Ok(vec![fetch(o, l).await?]) },
        )
        .await
    }

    /// Reads blocks `first..first + count` through `fetch` and keeps them in the cache when the
    /// sequential-stream rule allows. The shards' generations are taken before the fetch, so a
    /// write that overlaps it cancels the fill; whether to keep is decided before the fetch too,
    /// as requests reach here in about the order the client sent them.
    async fn fetch_and_fill<F, Fut, E>(
        &self,
        first: u64,
        count: u64,
        fetch: F,
    ) -> Result<Fetched, E>
    where
        F: FnOnce(u64, u64) -> Fut,
        Fut: Future<Output = Result<Vec<Bytes>, E>>,
    {
        let gens: [u64; CACHE_SHARD_COUNT] =
            std::array::from_fn(|i| self.shards[i].gen.load(Ordering::Acquire));
        let span_offset = first * CACHE_BLOCK_BYTES;
        let span_len = count * CACHE_BLOCK_BYTES;
        let keep = self.should_fill(span_offset, span_len);
        let data = fetch(span_offset, span_len).await?;
        if data.iter().map(|p| p.len() as u64).sum::<u64>() != span_len {
            // The store broke its contract: keep none of it.
            return Ok(Fetched::WrongLength(data));
        }
        if keep {
            self.fill(first, &data, &gens);
        } else {
            self.counters
                .stream_fills_skipped
                .fetch_add(count, Ordering::Relaxed);
        }
        Ok(Fetched::Whole(data))
    }

    /// [`ReadCache::read_pieces`] over a store that answers in pieces too (a RAID array's
    /// per-chunk buffers): a miss hands the store's pieces on without joining them, and the
    /// blocks kept are copied out of them (a piece that is exactly one block is kept as it is).
    pub async fn read_pieces_from<F, Fut, E>(
        &self,
        offset: u64,
        len: u64,
        fetch: F,
    ) -> Result<Vec<Bytes>, E>
    where
        F: FnOnce(u64, u64) -> Fut,
        Fut: Future<Output = Result<Vec<Bytes>, E>>,
    {
        let Some((first, last)) = self.blocks(offset, len) else {
            return fetch(offset, len).await;
        };
        if let Some(hit) = self.lookup(offset, len, first, last) {
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(hit);
        }
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        let cover_offset = first * CACHE_BLOCK_BYTES;
        let cover_len = (last - first + 1) * CACHE_BLOCK_BYTES;
        let data = match self.fetch_and_fill(first, last - first + 1, fetch).await? {
            Fetched::Whole(data) => data,
            // The caller checks lengths and reports the store.
            Fetched::WrongLength(data) => return Ok(data),
        };
        if offset == cover_offset && len == cover_len {
            // Block-aligned (every 4 KiB read of a filesystem): the store's pieces are the
            // answer as they are, without another vector.
            return Ok(data);
        }
        Ok(slice_pieces(
            &data,
            (offset - cover_offset) as usize,
            len as usize,
        ))
    }

    /// Whether a miss of `len` bytes at `offset` keeps its blocks (see [`stream`]); small misses
    /// always do, without taking the tracker's lock.
    fn should_fill(&self, offset: u64, len: u64) -> bool {
        if len < stream::STREAM_MIN_READ_BYTES {
            return true;
        }
        // A panic while holding it leaves at worst one stream miscounted: still usable.
        let mut t = self.streams.lock().unwrap_or_else(|p| p.into_inner());
        t.should_fill(offset, len)
    }

    /// The whole range from memory as slices of the cached blocks, or None at the first
    /// missing block.
    fn lookup(&self, offset: u64, len: u64, first: u64, last: u64) -> Option<Vec<Bytes>> {
        let at = (offset - first * CACHE_BLOCK_BYTES) as usize;
        if first == last {
            let block = lock(&self.shards[shard_of(first)].state)
                .policy
                .get(first)?
                .clone();
            return Some(vec![block.slice(at..at + len as usize)]);
        }
        // Each shard's lock is taken once for all its blocks (a 1 MiB read is 256 blocks over
        // 16 shards), and only to take a reference to each block.
        let count = (last - first + 1) as usize;
        let mut blocks: Vec<Bytes> = vec![Bytes::new(); count];
        for lead in first..=last.min(first + CACHE_SHARD_COUNT as u64 - 1) {
            let p = &lock(&self.shards[shard_of(lead)].state).policy;
            for b in (lead..=last).step_by(CACHE_SHARD_COUNT) {
                blocks[(b - first) as usize] = p.get(b)?.clone();
            }
        }
        let end = at + len as usize - (count - 1) * CACHE_BLOCK_BYTES as usize;
        if let Some(tail) = blocks.last_mut() {
            tail.truncate(end);
        }
        if let Some(head) = blocks.first_mut() {
            head.advance(at);
        }
        Some(blocks)
    }

    /// Keeps the blocks of `data` (pieces that together start at block `first` and cover
    /// whole blocks) whose shard saw no write since `gens` were read.
    fn fill(&self, first: u64, data: &[Bytes], gens: &[u64; CACHE_SHARD_COUNT]) {
        // Blocks are cut (copied, unless a piece is exactly one block) before any lock is
        // taken, then each shard's lock is taken once for all its blocks.
        let blocks = split_blocks(data, CACHE_BLOCK_BYTES as usize);
        let count = blocks.len();
        let Some(last) = (count as u64).checked_sub(1).map(|n| first + n) else {
            return;
        };
        let span = BlockSpan { first, last };
        for lead in 0..count.min(CACHE_SHARD_COUNT) {
            let mine = (lead..count)
                .step_by(CACHE_SHARD_COUNT)
                .map(|i| (first + i as u64, blocks[i].clone()));
            self.fill_shard(shard_of(first + lead as u64), span, mine, gens);
        }
    }

    /// Installs `blocks` (all of shard `shard`, within `span`) unless a write over `span` began
    /// or ended in the shard since `gens`.
    fn fill_shard(
        &self,
        shard: usize,
        span: BlockSpan,
        blocks: impl Iterator<Item = (u64, Bytes)>,
        gens: &[u64; CACHE_SHARD_COUNT],
    ) {
        let s = &self.shards[shard];
        let mut st = lock(&s.state);
        let now = s.gen.load(Ordering::Acquire);
        if st.writes.touched_since(gens[shard], now, span) {
            let dropped = blocks.count() as u64;
            self.counters
                .fills_dropped
                .fetch_add(dropped, Ordering::Relaxed);
            return;
        }
        let p = &mut st.policy;
        let mut evicted = 0;
        for (b, value) in blocks {
            if !p.contains(b) {
                evicted += p.insert(b, value);
            }
        }
        self.counters
            .evictions
            .fetch_add(evicted as u64, Ordering::Relaxed);
    }

    /// Before a write (or zeroing, trim) of each `(offset, len)` in `ranges` is issued.
    pub fn begin_write(&self, ranges: &[(u64, u64)]) -> WriteTicket {
        let mut touched = [false; CACHE_SHARD_COUNT];
        let mut span: Option<BlockSpan> = None;
        for &(offset, len) in ranges {
            mark_touched(&mut touched, offset, len);
            if let Some(s) = block_span(offset, len) {
                span = Some(span.map_or(s, |acc| acc.union(s)));
            }
        }
        let mut gens = [0; CACHE_SHARD_COUNT];
        if let Some(span) = span {
            for (i, shard) in self.shards.iter().enumerate() {
                if touched[i] {
                    let mut st = lock(&shard.state);
                    gens[i] = shard.gen.fetch_add(1, Ordering::AcqRel) + 1;
                    st.writes.record(gens[i], span);
                }
            }
        }
        WriteTicket {
            gens,
            touched,
            span,
        }
    }

    /// After the writes of `begin_write` returned. `written` holds, for a successful write of
    /// data, each `(offset, bytes)` written (then whole blocks are installed when no other write
    /// raced them); `None` for zeroing, trims and failed writes (the blocks are removed).
    pub fn end_write(
        &self,
        ticket: WriteTicket,
        ranges: &[(u64, u64)],
        written: Option<&[(u64, &[u8])]>,
    ) {
        let Some(span) = ticket.span else {
            return;
        };
        for (i, shard) in self.shards.iter().enumerate() {
            if !ticket.touched[i] {
                continue;
            }
            let mut st = lock(&shard.state);
            let now = shard.gen.load(Ordering::Acquire);
            let unraced = !st.writes.touched_since(ticket.gens[i], now, span);
            match written.filter(|_| unraced) {
                Some(pieces) => {
                    for &(offset, bytes) in pieces {
                        self.install(&mut st.policy, i, offset, bytes);
                    }
                }
                None => {
                    for &(offset, len) in ranges {
                        remove_in_shard(&mut st.policy, i, offset, len);
                    }
                }
            }
            let gen = shard.gen.fetch_add(1, Ordering::AcqRel) + 1;
            st.writes.record(gen, span);
        }
    }

    /// Installs the whole blocks of `bytes` at `offset` that belong to shard `shard`; removes
    /// its partly covered ones.
    fn install(&self, p: &mut BlockPolicy, shard: usize, offset: u64, bytes: &[u8]) {
        let len = bytes.len() as u64;
        if len == 0 {
            return;
        }
        let end = offset + len;
        let first = offset / CACHE_BLOCK_BYTES;
        let last = (end - 1) / CACHE_BLOCK_BYTES;
        let streaming = len >= STREAMING_WRITE_BYTES;
        for b in (first..=last).filter(|&b| shard_of(b) == shard) {
            let start = b * CACHE_BLOCK_BYTES;
            let whole = start >= offset && start + CACHE_BLOCK_BYTES <= end;
            // A streaming write's blocks are dropped, not copied (see STREAMING_WRITE_BYTES).
            let wanted = !streaming;
            if whole && wanted && start + CACHE_BLOCK_BYTES <= self.cached_end {
                let at = (start - offset) as usize;
                let block = copy_block(&bytes[at..at + CACHE_BLOCK_BYTES as usize]);
                let evicted = p.insert(b, block);
                self.counters
                    .evictions
                    .fetch_add(evicted as u64, Ordering::Relaxed);
            } else {
                p.remove(b);
            }
        }
    }

    /// Runs `write` between `begin_write` and `end_write` for one data write.
    pub async fn write<Fut, T, E>(&self, offset: u64, data: &Bytes, write: Fut) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let ranges = [(offset, data.len() as u64)];
        let ticket = self.begin_write(&ranges);
        let r = write.await;
        let pieces = [(offset, &data[..])];
        self.end_write(ticket, &ranges, r.is_ok().then_some(&pieces[..]));
        r
    }

    /// Runs `op` between `begin_write` and `end_write` for a range whose new contents are not
    /// data (zeroing, trim): the range's blocks are removed.
    pub async fn invalidate_around<Fut, T, E>(&self, offset: u64, len: u64, op: Fut) -> Result<T, E>
    where
        Fut: Future<Output = Result<T, E>>,
    {
        let ranges = [(offset, len)];
        let ticket = self.begin_write(&ranges);
        let r = op.await;
        self.end_write(ticket, &ranges, None);
        r
    }
}

/// `len` bytes from byte `at` of the concatenation of `pieces`, as slices of them (no copy).
fn slice_pieces(pieces: &[Bytes], mut at: usize, len: usize) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(pieces.len());
    let mut want = len;
    for p in pieces {
        if want == 0 {
            break;
        }
        if at >= p.len() {
            at -= p.len();
            continue;
        }
        let take = (p.len() - at).min(want);
        out.push(p.slice(at..at + take));
        want -= take;
        at = 0;
    }
    out
}

/// The concatenation of `pieces` cut into `block`-byte buffers (a trailing partial block is
/// dropped). A piece that is exactly one block at a block boundary is kept as it is (its own
/// buffer, as a member read of one block is); the rest are copied, so a cached block never pins
/// a larger read buffer.
fn split_blocks(pieces: &[Bytes], block: usize) -> Vec<Bytes> {
    let total: usize = pieces.iter().map(Bytes::len).sum();
    let mut out = Vec::with_capacity(total / block);
    let mut partial = BytesMut::new();
    for p in pieces {
        if partial.is_empty() && p.len() == block {
            out.push(p.clone());
            continue;
        }
        let mut rest = &p[..];
        while !rest.is_empty() {
            if partial.is_empty() && rest.len() >= block {
                out.push(copy_block(&rest[..block]));
                rest = &rest[block..];
                continue;
            }
            let take = (block - partial.len()).min(rest.len());
            if partial.capacity() == 0 {
                partial.reserve(block);
            }
            partial.extend_from_slice(&rest[..take]);
            rest = &rest[take..];
            if partial.len() == block {
                out.push(partial.split().freeze());
            }
        }
    }
    out
}

/// `pieces` (of `len` bytes in all) in one buffer: the piece itself when there is one.
fn join(mut pieces: Vec<Bytes>, len: u64) -> Bytes {
    if pieces.len() == 1 {
        return pieces.pop().unwrap_or_default();
    }
    let mut out = BytesMut::with_capacity(len as usize);
    for p in &pieces {
        out.extend_from_slice(p);
    }
    out.freeze()
}

/// The blocks `offset..offset+len` touches; None for an empty range.
fn block_span(offset: u64, len: u64) -> Option<BlockSpan> {
    if len == 0 {
        return None;
    }
    Some(BlockSpan {
        first: offset / CACHE_BLOCK_BYTES,
        last: offset.saturating_add(len - 1) / CACHE_BLOCK_BYTES,
    })
}

fn mark_touched(touched: &mut [bool; CACHE_SHARD_COUNT], offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let first = offset / CACHE_BLOCK_BYTES;
    let last = offset.saturating_add(len - 1) / CACHE_BLOCK_BYTES;
    if last - first >= CACHE_SHARD_COUNT as u64 {
        *touched = [true; CACHE_SHARD_COUNT];
        return;
    }
    for b in first..=last {
        touched[shard_of(b)] = true;
    }
}

/// Removes shard `shard`'s blocks in `offset..offset+len`.
fn remove_in_shard(p: &mut BlockPolicy, shard: usize, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    let first = offset / CACHE_BLOCK_BYTES;
    let last = offset.saturating_add(len - 1) / CACHE_BLOCK_BYTES;
    if last - first < 4 * p.len() as u64 {
        for b in (first..=last).filter(|&b| shard_of(b) == shard) {
            p.remove(b);
        }
    } else {
        // A huge range (a whole-device trim): cheaper to walk the cached keys.
        p.remove_range(first, last);
    }
}

#[cfg(test)]
mod tests;
