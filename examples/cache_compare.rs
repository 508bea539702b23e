//! The volume read cache's policy (`twinblock::cache::s3fifo`, sharded as `ReadCache` shards it)
//! against `quick_cache` (a maintained crate whose policy is also S3-FIFO-like), on the same
//! traces: hit ratio on a scan-plus-hot-set trace and on a skewed (Zipf) trace, then nanoseconds
//! per lookup (plus insert on a miss) with two threads sharing one cache, then the whole
//! `ReadCache` answering 4 KiB and 1 MiB hits.
//!
//! Run: `cargo run --release --example cache_compare` (about 20 s; numbers vary with machine
//! load, so both sides of each comparison run back to back in one process).
//!
//! Both caches hold `Bytes` values (a refcounted 4 KiB block, as the volume cache does) and hash
//! block numbers with the same hasher, so the comparison is of the structures and policies, not
//! of allocation or hashing.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use twinblock::cache::s3fifo::{BlockHasher, S3Fifo};
use twinblock::cache::ReadCache;

/// Blocks the caches hold (64 MiB of 4 KiB blocks).
const CAPACITY_BLOCKS: usize = 16 * 1024;
/// Lock domains of our side (as `ReadCache`).
const SHARD_COUNT: usize = 16;
/// Accesses per trace.
const TRACE_LEN: usize = 2_000_000;
/// Hot blocks of the scan-plus-hot trace (half the cache).
const HOT_BLOCKS: u64 = CAPACITY_BLOCKS as u64 / 2;
/// Blocks one scan walks (four caches' worth), far from the hot set.
const SCAN_BLOCKS: u64 = 4 * CAPACITY_BLOCKS as u64;
/// Blocks the Zipf trace draws from (eight caches' worth).
const ZIPF_BLOCKS: usize = 8 * CAPACITY_BLOCKS;
const ZIPF_EXPONENT: f64 = 0.9;

type QuickCache = quick_cache::sync::Cache<
    u64,
    Bytes,
    quick_cache::UnitWeighter,
    BuildHasherDefault<BlockHasher>,
>;
type QuickShard = quick_cache::unsync::Cache<
    u64,
    Bytes,
    quick_cache::UnitWeighter,
    BuildHasherDefault<BlockHasher>,
>;

/// The operations both sides offer to the trace runner.
trait BlockCache: Sync {
    fn get(&self, key: u64) -> Option<Bytes>;
    fn insert(&self, key: u64, value: Bytes);
}

/// Our policy, sharded by `block % SHARD_COUNT` under one mutex each, as `ReadCache` does.
struct Ours {
    shards: Vec<Mutex<S3Fifo<Bytes>>>,
}

impl Ours {
    fn new(capacity: usize) -> Ours {
        Ours {
            shards: (0..SHARD_COUNT)
                .map(|_| Mutex::new(S3Fifo::new(capacity / SHARD_COUNT)))
                .collect(),
        }
    }
    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, S3Fifo<Bytes>> {
        self.shards[(key % SHARD_COUNT as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockCache for Ours {
    fn get(&self, key: u64) -> Option<Bytes> {
        self.shard(key).get(key).cloned()
    }
    fn insert(&self, key: u64, value: Bytes) {
        self.shard(key).insert(key, value);
    }
}

/// quick_cache's single-threaded cache under our sharding and locks: what `ReadCache` would use
/// if it took quick_cache's policy (its generation checks need the shard lock held around the
/// policy anyway).
struct QuickSharded {
    shards: Vec<Mutex<QuickShard>>,
}

impl QuickSharded {
    fn new(capacity: usize) -> QuickSharded {
        let per = capacity / SHARD_COUNT;
        QuickSharded {
            shards: (0..SHARD_COUNT)
                .map(|_| {
                    Mutex::new(QuickShard::with(
                        per,
                        per as u64,
                        quick_cache::UnitWeighter,
                        BuildHasherDefault::default(),
                        Default::default(),
                    ))
                })
                .collect(),
        }
    }
    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, QuickShard> {
        self.shards[(key % SHARD_COUNT as u64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockCache for QuickSharded {
    fn get(&self, key: u64) -> Option<Bytes> {
        self.shard(key).get(&key).cloned()
    }
    fn insert(&self, key: u64, value: Bytes) {
        self.shard(key).insert(key, value);
    }
}

fn quick(capacity: usize) -> QuickCache {
    QuickCache::with(
        capacity,
        capacity as u64,
        quick_cache::UnitWeighter,
        BuildHasherDefault::default(),
        Default::default(),
    )
}

impl BlockCache for QuickCache {
    fn get(&self, key: u64) -> Option<Bytes> {
        quick_cache::sync::Cache::get(self, &key)
    }
    fn insert(&self, key: u64, value: Bytes) {
        quick_cache::sync::Cache::insert(self, key, value);
    }
}

/// Half the accesses uniformly over a hot set, half stepping through a long scan.
fn scan_plus_hot_trace(seed: u64) -> Vec<u64> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut scan = 0u64;
    (0..TRACE_LEN)
        .map(|_| {
            if rng.gen_bool(0.5) {
                rng.gen_range(0..HOT_BLOCKS)
            } else {
                scan = (scan + 1) % SCAN_BLOCKS;
                1_000_000 + scan
            }
        })
        .collect()
}

/// Block `k` (0-based rank) drawn with probability proportional to `1 / (k+1)^s`.
fn zipf_trace(seed: u64) -> Vec<u64> {
    let mut cdf = Vec::with_capacity(ZIPF_BLOCKS);
    let mut sum = 0.0;
    for k in 0..ZIPF_BLOCKS {
        sum += 1.0 / ((k + 1) as f64).powf(ZIPF_EXPONENT);
        cdf.push(sum);
    }
    let mut rng = StdRng::seed_from_u64(seed);
    // Ranks are scattered over the block space so hot blocks are not neighbours.
    (0..TRACE_LEN)
        .map(|_| {
            let x = rng.gen_range(0.0..sum);
            let rank = cdf.partition_point(|&c| c < x) as u64;
            rank.wrapping_mul(0x9E37_79B9) % (ZIPF_BLOCKS as u64 * 4)
        })
        .collect()
}

/// Runs `trace` (lookup; insert on a miss) and returns the hits.
fn run(cache: &dyn BlockCache, trace: &[u64], block: &Bytes) -> usize {
    let mut hits = 0;
    for &k in trace {
        if cache.get(k).is_some() {
            hits += 1;
        } else {
            cache.insert(k, block.clone());
        }
    }
    hits
}

fn hit_ratios(name: &str, trace: &[u64], block: &Bytes) {
    // Hit ratio is measured after one warm-up pass of the first tenth of the trace.
    let warm = trace.len() / 10;
    let ours = Ours::new(CAPACITY_BLOCKS);
    run(&ours, &trace[..warm], block);
    let ours_hits = run(&ours, &trace[warm..], block);
    let q = quick(CAPACITY_BLOCKS);
    run(&q, &trace[..warm], block);
    let q_hits = run(&q, &trace[warm..], block);
    let qs = QuickSharded::new(CAPACITY_BLOCKS);
    run(&qs, &trace[..warm], block);
    let qs_hits = run(&qs, &trace[warm..], block);
    let n = (trace.len() - warm) as f64;
    println!(
        "| hit ratio, {name} | {:.3} | {:.3} | {:.3} |",
        ours_hits as f64 / n,
        q_hits as f64 / n,
        qs_hits as f64 / n
    );
}

/// CPU time of the calling thread, in ns (wall time on this shared machine mostly measures the
/// other builds).
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return 0;
    }
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Two threads run their own trace on one shared cache: (wall ns, CPU ns) per trace step.
fn two_thread_ns(
    cache: Arc<dyn BlockCache + Send>,
    traces: &[Vec<u64>; 2],
    block: &Bytes,
) -> (f64, f64) {
    let start = Instant::now();
    let cpu: u64 = std::thread::scope(|s| {
        let handles: Vec<_> = traces
            .iter()
            .map(|t| {
                let cache = Arc::clone(&cache);
                let block = block.clone();
                s.spawn(move || {
                    let c0 = thread_cpu_ns();
                    run(cache.as_ref(), t, &block);
                    thread_cpu_ns() - c0
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let steps = (traces[0].len() + traces[1].len()) as f64;
    (
        start.elapsed().as_nanos() as f64 / steps,
        cpu as f64 / steps,
    )
}

fn throughput(name: &str, make_traces: fn(u64) -> Vec<u64>, block: &Bytes) {
    let traces = [make_traces(11), make_traces(12)];
    let mut sides: [Vec<(f64, f64)>; 3] = Default::default();
    // Alternate the sides three times; report each side's best (least disturbed) run.
    for _ in 0..3 {
        sides[0].push(two_thread_ns(
            Arc::new(Ours::new(CAPACITY_BLOCKS)),
            &traces,
            block,
        ));
        sides[1].push(two_thread_ns(
            Arc::new(quick(CAPACITY_BLOCKS)),
            &traces,
            block,
        ));
        sides[2].push(two_thread_ns(
            Arc::new(QuickSharded::new(CAPACITY_BLOCKS)),
            &traces,
            block,
        ));
    }
    let best = |v: &[(f64, f64)], cpu: bool| {
        v.iter()
            .map(|&(w, c)| if cpu { c } else { w })
            .fold(f64::INFINITY, f64::min)
    };
    for (what, cpu) in [("wall", false), ("CPU", true)] {
        println!(
            "| {what} ns per lookup (+insert on miss), 2 threads, {name} | {:.0} | {:.0} | {:.0} |",
            best(&sides[0], cpu),
            best(&sides[1], cpu),
            best(&sides[2], cpu)
        );
    }
}

/// The whole `ReadCache` answering reads of `len` bytes that all hit: CPU ns per read.
fn read_cache_hit_ns(len: u64) -> f64 {
    let store_bytes = 64u64 << 20;
    let cache = ReadCache::new(store_bytes * 2, store_bytes).expect("cache size is valid");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime");
    rt.block_on(async {
        let fetch = |_o: u64, l: u64| async move {
            Ok::<Bytes, std::io::Error>(Bytes::from(vec![7u8; l as usize]))
        };
        let reads = store_bytes / len;
        for i in 0..reads {
            cache.read(i * len, len, fetch).await.expect("fill");
        }
        let rounds = (256 << 20) / store_bytes.max(len);
        let start = thread_cpu_ns();
        for _ in 0..rounds.max(1) {
            for i in 0..reads {
                let b = cache.read(i * len, len, fetch).await.expect("hit");
                std::hint::black_box(b);
            }
        }
        (thread_cpu_ns() - start) as f64 / (reads * rounds.max(1)) as f64
    })
}

fn main() {
    let block = Bytes::from(vec![0u8; 4096]);
    println!(
        "capacity {CAPACITY_BLOCKS} blocks; {TRACE_LEN} accesses per trace; cores: {}",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("| measure | twinblock S3-FIFO (16 mutex shards) | quick_cache sync | quick_cache unsync in our 16 shards |");
    println!("| --- | ---: | ---: | ---: |");
    let scan = scan_plus_hot_trace(1);
    hit_ratios("scan + hot set", &scan, &block);
    let zipf = zipf_trace(2);
    hit_ratios("Zipf 0.9", &zipf, &block);
    throughput("scan + hot set", scan_plus_hot_trace, &block);
    throughput("Zipf 0.9", zipf_trace, &block);
    println!();
    println!("| ReadCache hit | CPU ns per read | GB/s |");
    println!("| --- | ---: | ---: |");
    for len in [4096u64, 64 << 10, 1 << 20] {
        let ns = read_cache_hit_ns(len);
        println!("| {} KiB | {ns:.0} | {:.2} |", len >> 10, len as f64 / ns);
    }
}
