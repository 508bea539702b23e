//! Rebuild throughput against a plain sequential read of the source images.
//!
//! `cargo bench -p twinblock-raid --bench rebuild`. Builds a 4-member RAID-5 (and RAID-6) over
//! image files in a temporary directory (`TWINBLOCK_BENCH_DIR` to choose where), fills it, then
//! times (a) reading every source image's data area sequentially, all sources in parallel, in
//! `REBUILD_BATCH_BYTES` pieces through the same `FileMember`s with `REBUILD_READ_AHEAD` reads
//! in flight per source (the rebuild's own read depth), and (b) rebuilding a replaced member,
//! which reads the same bytes; and (c) writing a fresh image sequentially from page-aligned
//! buffers, as the rebuild writes its target. Prints the rates and the ratios (rebuild / plain
//! sequential).
//!
//! `TWINBLOCK_BENCH_TARGET_DIR` puts the replacement images (the rebuild's targets) on another
//! filesystem, to see the rebuild when the target does not share a device with the sources.

use bytes::Bytes;
use futures_util::stream::{self, StreamExt};
use std::sync::Arc;
use std::time::Instant;
use twinblock_io::buf::AlignedBuf;
use twinblock_io::file::{FileMember, FileOptions};
use twinblock_io::Member;
use twinblock_raid::array::{REBUILD_BATCH_BYTES, REBUILD_READ_AHEAD, REBUILD_WRITE_DEPTH};
use twinblock_raid::layout::Level;
use twinblock_raid::superblock::DATA_OFFSET_BYTES;
use twinblock_raid::Array;

/// The allocator twinblockd runs with, so buffer allocation costs what it costs there.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const DATA_BYTES_PER_MEMBER: u64 = 128 << 20;
const MEMBERS: usize = 4;
const CHUNK_BYTES: u64 = 256 << 10;
const ROUNDS: usize = 3;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn open(path: &std::path::Path) -> Arc<dyn Member> {
    let opts = FileOptions {
        direct: true,
        create_size: Some(DATA_OFFSET_BYTES + DATA_BYTES_PER_MEMBER),
        ..Default::default()
    };
    match FileMember::open(path, &opts) {
        Ok(m) => m,
        Err(e) => panic!("bench cannot open {}: {e}", path.display()),
    }
}

async fn sequential_read(sources: &[Arc<dyn Member>]) -> f64 {
    let start = Instant::now();
    let jobs = sources.iter().map(|m| async move {
        let offsets = (0..DATA_BYTES_PER_MEMBER / REBUILD_BATCH_BYTES)
            .map(|k| DATA_OFFSET_BYTES + k * REBUILD_BATCH_BYTES);
        stream::iter(offsets)
            .map(|off| async move {
                let b = m
                    .read_at(off, REBUILD_BATCH_BYTES as usize)
                    .await
                    .expect("read");
                std::hint::black_box(b);
            })
            .buffered(REBUILD_READ_AHEAD)
            .collect::<Vec<()>>()
            .await;
    });
    futures_util::future::join_all(jobs).await;
    (sources.len() as u64 * DATA_BYTES_PER_MEMBER) as f64 / start.elapsed().as_secs_f64()
}

/// Rate of writing a fresh image's data area sequentially, as the rebuild writes its target.
async fn sequential_write(path: &std::path::Path) -> f64 {
    let target = open(path);
    let mut buf = AlignedBuf::zeroed(REBUILD_BATCH_BYTES as usize);
    buf.fill(0x5a);
    let buf = buf.into_bytes();
    let start = Instant::now();
    let offsets = (0..DATA_BYTES_PER_MEMBER / REBUILD_BATCH_BYTES)
        .map(|k| DATA_OFFSET_BYTES + k * REBUILD_BATCH_BYTES);
    stream::iter(offsets)
        .map(|off| {
            let (target, buf) = (target.clone(), buf.clone());
            async move { target.write_at(off, buf).await.expect("write") }
        })
        .buffered(REBUILD_WRITE_DEPTH)
        .collect::<Vec<()>>()
        .await;
    target.sync().await.expect("sync");
    let rate = DATA_BYTES_PER_MEMBER as f64 / start.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(path);
    rate
}

async fn bench(level: Level, dir: &std::path::Path, target_dir: &std::path::Path) {
    let paths: Vec<_> = (0..MEMBERS + 2)
        .map(|i| {
            let d = if i < MEMBERS { dir } else { target_dir };
            d.join(format!("bench{i}.img"))
        })
        .collect();
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
    let members: Vec<Arc<dyn Member>> = paths[..MEMBERS].iter().map(|p| open(p)).collect();
    let a = Array::create("bench", level, CHUNK_BYTES, members.clone(), vec![])
        .await
        .expect("create");
    let stripe = a.stripe_bytes() as usize;
    let piece = (4 << 20) / stripe * stripe;
    let buf = Bytes::from((0..piece).map(|i| (i * 13) as u8).collect::<Vec<u8>>());
    let mut off = 0;
    while off + piece as u64 <= a.size() {
        a.write(off, buf.clone()).await.expect("fill");
        off += piece as u64;
    }
    a.flush().await.expect("flush");
    let sources: Vec<Arc<dyn Member>> = members[1..].to_vec();
    let write_rate = sequential_write(&paths[MEMBERS]).await;
    // Rounds alternate a plain read of the sources with a rebuild onto a fresh image, so both
    // see the same machine conditions; medians are reported.
    let mut seqs = Vec::new();
    let mut rebuilds = Vec::new();
    for round in 0..ROUNDS {
        seqs.push(sequential_read(&sources).await);
        let target = &paths[MEMBERS + round % 2];
        let _ = std::fs::remove_file(target);
        let fresh = open(target);
        let start = Instant::now();
        a.replace_member(0, fresh).await.expect("replace");
        a.wait_rebuild().await;
        let secs = start.elapsed().as_secs_f64();
        let st = a.status();
        assert!(!st.degraded, "rebuild did not finish: {:?}", st.rebuild);
        rebuilds.push((sources.len() as u64 * DATA_BYTES_PER_MEMBER) as f64 / secs);
    }
    let seq = median(&mut seqs);
    let rebuild = median(&mut rebuilds);
    let written = rebuild / sources.len() as f64;
    println!(
        "{level} {MEMBERS} x {} MiB, median of {ROUNDS}: sources read sequentially {:.0} MB/s, \
         during rebuild {:.0} MB/s: ratio {:.2}; target written sequentially {:.0} MB/s, by rebuild \
         {:.0} MB/s",
        DATA_BYTES_PER_MEMBER >> 20,
        seq / 1e6,
        rebuild / 1e6,
        rebuild / seq,
        write_rate / 1e6,
        written / 1e6,
    );
    if let Some((read, write)) = fio_mixed_ceiling(&paths[1..MEMBERS], &paths[MEMBERS]) {
        println!(
            "{level} device ceiling for the same mix (fio: {} sequential readers and one writer, \
             {} MiB blocks, depth {REBUILD_READ_AHEAD}): read {:.0} MB/s, write {:.0} MB/s; the \
             rebuild reaches {:.2} of that read rate",
            MEMBERS - 1,
            REBUILD_BATCH_BYTES >> 20,
            read / 1e6,
            write / 1e6,
            rebuild / read,
        );
    }
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
}

/// What the device gives when the sources are read and a target written at the same time, as a
/// rebuild does: fio with the same block size and depth, O_DIRECT. `None` without fio. On one
/// disk shared by every image (a VM's virtual disk) this, not the read-only rate, bounds the
/// rebuild.
fn fio_mixed_ceiling(
    sources: &[std::path::PathBuf],
    target: &std::path::Path,
) -> Option<(f64, f64)> {
    let _ = std::fs::remove_file(target);
    std::fs::File::create(target)
        .and_then(|f| f.set_len(DATA_OFFSET_BYTES + DATA_BYTES_PER_MEMBER))
        .ok()?;
    let mut args: Vec<String> = [
        "--minimal",
        "--group_reporting",
        "--direct=1",
        "--ioengine=io_uring",
    ]
    .iter()
    .map(|a| a.to_string())
    .collect();
    args.push(format!("--bs={}", REBUILD_BATCH_BYTES));
    args.push(format!("--iodepth={REBUILD_READ_AHEAD}"));
    args.push(format!("--offset={DATA_OFFSET_BYTES}"));
    args.push(format!("--size={DATA_BYTES_PER_MEMBER}"));
    for (i, src) in sources.iter().enumerate() {
        args.push(format!("--name=read{i}"));
        args.push("--rw=read".into());
        args.push(format!("--filename={}", src.display()));
    }
    args.push("--name=write".into());
    args.push("--rw=write".into());
    args.push(format!("--filename={}", target.display()));
    let out = std::process::Command::new("fio")
        .args(&args)
        .output()
        .ok()?;
    let _ = std::fs::remove_file(target);
    if !out.status.success() {
        eprintln!("fio failed: {}", String::from_utf8_lossy(&out.stderr));
        return None;
    }
    // Terse format: field 7 is the read bandwidth, field 48 the write bandwidth (KiB/s).
    let text = String::from_utf8_lossy(&out.stdout);
    let fields: Vec<&str> = text.lines().next()?.split(';').collect();
    let kib = |i: usize| fields.get(i)?.parse::<f64>().ok().map(|v| v * 1024.0);
    Some((kib(6)?, kib(47)?))
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = match std::env::var_os("TWINBLOCK_BENCH_DIR") {
        Some(d) => std::path::PathBuf::from(d),
        None => std::env::temp_dir(),
    };
    let target_dir = std::env::var_os("TWINBLOCK_BENCH_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.clone());
    if target_dir != dir {
        println!(
            "sources in {}, rebuild targets in {}",
            dir.display(),
            target_dir.display()
        );
    }
    rt.block_on(async {
        // TWINBLOCK_BENCH_LEVELS=6,5 changes the order (or the set) of levels measured.
        let levels = std::env::var("TWINBLOCK_BENCH_LEVELS").unwrap_or_else(|_| "5,6".into());
        for l in levels.split(',') {
            match Level::parse(l) {
                Some(level @ (Level::Raid5 | Level::Raid6)) => {
                    bench(level, &dir, &target_dir).await
                }
                _ => eprintln!("skipping level {l:?}: the rebuild bench covers raid5 and raid6"),
            }
        }
    });
}
