//! Member I/O benchmark: io_uring against the thread pool, buffered and `O_DIRECT`, for 4 KiB
//! random reads and writes at queue depth 32 on a 256 MiB image.
//!
//! Run: `cargo bench -p twinblock-io --bench member_io`. Environment: `MEMBER_IO_DIR` (where the
//! image goes; default the cargo target tmp dir, which must support `O_DIRECT` for the direct rows)
//! and `MEMBER_IO_SECS` (seconds per row, default 2).

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use twinblock_io::buf::AlignedBuf;
use twinblock_io::file::{EngineChoice, FileMember, FileOptions};
use twinblock_io::uring::UringStats;
use twinblock_io::Member;

const IMAGE_BYTES: u64 = 256 << 20;
const BLOCK_BYTES: usize = 4096;
const QUEUE_DEPTH: usize = 32;
const DEFAULT_SECS_PER_ROW: u64 = 2;

#[derive(Clone, Copy)]
enum Pattern {
    RandRead,
    RandWrite,
}

/// CPU time (user + system) used so far by this process, all threads (io-wq workers included),
/// from `/proc/self/stat`, in seconds. Under a loaded machine IOPS mostly measure how much CPU
/// share an engine's threads win; CPU per operation measures the engine itself.
fn process_cpu_secs() -> f64 {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
        return 0.0;
    };
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 2..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / CLOCK_TICKS_PER_SEC
}

/// `sysconf(_SC_CLK_TCK)` on every Linux platform we run on.
const CLOCK_TICKS_PER_SEC: f64 = 100.0;

/// IOPS, p50 latency in microseconds, CPU microseconds per operation.
async fn run_row(member: Arc<FileMember>, pattern: Pattern, duration: Duration) -> (f64, f64, f64) {
    let cpu_before = process_cpu_secs();
    let ops = Arc::new(AtomicU64::new(0));
    let deadline = Instant::now() + duration;
    let blocks = IMAGE_BYTES / BLOCK_BYTES as u64;
    let mut workers = Vec::new();
    let start = Instant::now();
    for worker in 0..QUEUE_DEPTH {
        let member = Arc::clone(&member);
        let ops = Arc::clone(&ops);
        workers.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(worker as u64);
            let mut payload = AlignedBuf::zeroed(BLOCK_BYTES);
            rng.fill(&mut payload[..]);
            let payload: Bytes = payload.into_bytes();
            let mut latencies = Vec::new();
            while Instant::now() < deadline {
                let offset = rng.gen_range(0..blocks) * BLOCK_BYTES as u64;
                let t = Instant::now();
                let result = match pattern {
                    Pattern::RandRead => member.read_at(offset, BLOCK_BYTES).await.map(|_| ()),
                    Pattern::RandWrite => member.write_at(offset, payload.clone()).await,
                };
                if let Err(e) = result {
                    eprintln!("I/O error: {e}");
                    return latencies;
                }
                latencies.push(t.elapsed());
                ops.fetch_add(1, Ordering::Relaxed);
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for w in workers {
        if let Ok(l) = w.await {
            all.extend(l);
        }
    }
    let secs = start.elapsed().as_secs_f64();
    all.sort();
    let p50_us = all
        .get(all.len() / 2)
        .map_or(0.0, |d| d.as_secs_f64() * 1e6);
    let total_ops = ops.load(Ordering::Relaxed) as f64;
    let cpu_us_per_op = (process_cpu_secs() - cpu_before) * 1e6 / total_ops.max(1.0);
    (total_ops / secs, p50_us, cpu_us_per_op)
}

type BenchResult<T> = Result<T, String>;

/// Fill the image through O_DIRECT so reads hit allocated blocks and the page cache starts
/// empty: a cached page in the range makes a NOWAIT direct write fall back to io-wq.
async fn fill_image(path: &Path) -> BenchResult<()> {
    let opts = FileOptions {
        direct: true,
        create_size: Some(IMAGE_BYTES),
        engine: EngineChoice::Pool,
        ..FileOptions::default()
    };
    let member = FileMember::open(path, &opts).map_err(|e| e.to_string())?;
    let mut chunk = AlignedBuf::zeroed(1 << 20);
    chunk.fill(0xa5);
    let chunk = chunk.into_bytes();
    for i in 0..(IMAGE_BYTES >> 20) {
        member
            .write_at(i << 20, chunk.clone())
            .await
            .map_err(|e| e.to_string())?;
    }
    member.sync().await.map_err(|e| e.to_string())
}

/// Read the whole image once so it sits in the page cache.
async fn warm_cache(member: &FileMember) -> BenchResult<()> {
    for i in 0..(IMAGE_BYTES >> 20) {
        member
            .read_at(i << 20, 1 << 20)
            .await
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

fn batch_ratio(before: Option<UringStats>, after: Option<UringStats>) -> String {
    match (before, after) {
        (Some(b), Some(a)) if a.enter_calls > b.enter_calls => {
            let ops = (a.ops_submitted - b.ops_submitted) as f64;
            format!("{:.2}", ops / (a.enter_calls - b.enter_calls) as f64)
        }
        _ => "-".to_string(),
    }
}

async fn bench(path: &Path, secs: u64) -> BenchResult<()> {
    fill_image(path).await?;
    println!(
        "member_io: 4 KiB random I/O, depth {QUEUE_DEPTH}, {} MiB image at {}, {secs} s per row",
        IMAGE_BYTES >> 20,
        path.display()
    );
    println!(
        "{:<8} {:<9} {:<10} {:>10} {:>9} {:>10} {:>10}",
        "engine", "mode", "pattern", "IOPS", "p50 us", "CPU us/op", "ops/enter"
    );
    // Direct rows first, while the page cache holds none of the image.
    for direct in [true, false] {
        for engine in [EngineChoice::Uring, EngineChoice::Pool] {
            let opts = FileOptions {
                direct,
                engine,
                ..FileOptions::default()
            };
            let member = match FileMember::open(path, &opts) {
                Ok(m) => m,
                Err(e) => {
                    eprintln!("skipping {engine:?} direct={direct}: {e}");
                    continue;
                }
            };
            if direct && !member.direct() {
                eprintln!("O_DIRECT refused for {}", path.display());
            }
            if !direct {
                // Same starting point for both engines.
                warm_cache(&member).await?;
            }
            let patterns = [
                (Pattern::RandRead, "randread"),
                (Pattern::RandWrite, "randwrite"),
            ];
            for (pattern, name) in patterns {
                let before = member.uring_stats();
                let row = Arc::clone(&member);
                let (iops, p50, cpu) = run_row(row, pattern, Duration::from_secs(secs)).await;
                println!(
                    "{:<8} {:<9} {:<10} {:>10.0} {:>9.1} {:>10.1} {:>10}",
                    member.engine(),
                    if member.direct() {
                        "direct"
                    } else {
                        "buffered"
                    },
                    name,
                    iops,
                    p50,
                    cpu,
                    batch_ratio(before, member.uring_stats())
                );
            }
        }
    }
    Ok(())
}

fn main() {
    let dir =
        std::env::var("MEMBER_IO_DIR").unwrap_or_else(|_| env!("CARGO_TARGET_TMPDIR").to_string());
    let secs = std::env::var("MEMBER_IO_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(DEFAULT_SECS_PER_ROW);
    let result = tempfile::tempdir_in(&dir)
        .map_err(|e| format!("cannot create a temporary directory in {dir}: {e}"))
        .and_then(|tmp| {
            let runtime =
                tokio::runtime::Runtime::new().map_err(|e| format!("cannot start tokio: {e}"))?;
            runtime.block_on(bench(&tmp.path().join("member_io.img"), secs))
        });
    if let Err(e) = result {
        eprintln!("member_io: {e}");
        std::process::exit(1);
    }
}
