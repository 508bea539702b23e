//! Rebuild throughput against a plain sequential read of the source images.
//!
//! `cargo bench -p twinblock-raid --bench rebuild`. Builds a 4-member RAID-5 (and RAID-6) over
//! image files in a temporary directory (`TWINBLOCK_BENCH_DIR` to choose where), fills it, then
//! times (a) reading every source image's data area sequentially, all sources in parallel, in
//! `REBUILD_BATCH_BYTES` pieces through the same `FileMember`s, and (b) rebuilding a replaced
//! member, which reads the same bytes. Prints both rates and their ratio.

use bytes::Bytes;
use std::sync::Arc;
use std::time::Instant;
use twinblock_raid::array::REBUILD_BATCH_BYTES;
use twinblock_raid::io::file::{FileMember, FileOptions};
use twinblock_raid::io::Member;
use twinblock_raid::layout::Level;
use twinblock_raid::superblock::DATA_OFFSET_BYTES;
use twinblock_raid::Array;

const DATA_BYTES_PER_MEMBER: u64 = 128 << 20;
const MEMBERS: usize = 4;
const CHUNK_BYTES: u64 = 256 << 10;

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
        let mut off = DATA_OFFSET_BYTES;
        while off < DATA_OFFSET_BYTES + DATA_BYTES_PER_MEMBER {
            let b = m
                .read_at(off, REBUILD_BATCH_BYTES as usize)
                .await
                .expect("read");
            std::hint::black_box(b);
            off += REBUILD_BATCH_BYTES;
        }
    });
    futures_util::future::join_all(jobs).await;
    (sources.len() as u64 * DATA_BYTES_PER_MEMBER) as f64 / start.elapsed().as_secs_f64()
}

async fn bench(level: Level, dir: &std::path::Path) {
    let paths: Vec<_> = (0..=MEMBERS)
        .map(|i| dir.join(format!("bench{i}.img")))
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
    let seq = sequential_read(&sources).await;
    let fresh = open(&paths[MEMBERS]);
    let start = Instant::now();
    a.replace_member(0, fresh).await.expect("replace");
    a.wait_rebuild().await;
    let secs = start.elapsed().as_secs_f64();
    let st = a.status();
    assert!(!st.degraded, "rebuild did not finish: {:?}", st.rebuild);
    let rebuild = (sources.len() as u64 * DATA_BYTES_PER_MEMBER) as f64 / secs;
    println!(
        "{level} {MEMBERS} x {} MiB: sequential read of sources {:.0} MB/s, rebuild reads {:.0} MB/s ({:.0} MB/s written), ratio {:.2}",
        DATA_BYTES_PER_MEMBER >> 20,
        seq / 1e6,
        rebuild / 1e6,
        DATA_BYTES_PER_MEMBER as f64 / secs / 1e6,
        rebuild / seq
    );
    for p in &paths {
        let _ = std::fs::remove_file(p);
    }
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
    rt.block_on(async {
        bench(Level::Raid5, &dir).await;
        bench(Level::Raid6, &dir).await;
    });
}
