//! Measures journaled 4 KiB random writes over an in-memory backing (NVRAM on /dev/shm, or the
//! directory given as first argument), at queue depth 1 and 32. Not a test: run with
//! `cargo run --release -p twinblock-journal --example write_rate [DIR]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rand::Rng;
use twinblock_journal::{JournaledVolume, MemBacking, Nvram, NvramConfig, VolumeConfig};

const VOLUME_BYTES: u64 = 256 * 1024 * 1024;
const BLOCK_BYTES: u64 = 4096;
const RUN: Duration = Duration::from_secs(2);

async fn run(vol: Arc<JournaledVolume<MemBacking>>, depth: usize) -> (u64, Vec<Duration>) {
    let deadline = Instant::now() + RUN;
    let mut tasks = Vec::new();
    for _ in 0..depth {
        let vol = Arc::clone(&vol);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let data = Bytes::from(vec![0xa5u8; BLOCK_BYTES as usize]);
            while Instant::now() < deadline {
                let block = rand::thread_rng().gen_range(0..VOLUME_BYTES / BLOCK_BYTES);
                let t = Instant::now();
                if let Err(e) = vol.write(block * BLOCK_BYTES, data.clone()).await {
                    eprintln!("write failed: {e}");
                    break;
                }
                lat.push(t.elapsed());
            }
            lat
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        if let Ok(l) = t.await {
            all.extend(l);
        }
    }
    all.sort();
    (all.len() as u64, all)
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).unwrap_or_else(|| "/dev/shm".into());
    let path =
        std::path::Path::new(&dir).join(format!("twinblock-bench-{}.img", std::process::id()));
    let cfg = NvramConfig {
        path: path.clone(),
        ..NvramConfig::new(0, [0; 16])
    };
    let nv = Nvram::open(&cfg)?;
    let backing = MemBacking::new(VOLUME_BYTES, 64 * 1024);
    let vol = Arc::new(JournaledVolume::open(nv, backing, 1, VolumeConfig::default()).await?);
    for depth in [1, 32] {
        let (n, lat) = run(Arc::clone(&vol), depth).await;
        let p = |q: f64| {
            lat.get(((lat.len() as f64) * q) as usize)
                .copied()
                .unwrap_or_default()
        };
        println!(
            "depth {depth:>2}: {:>8.0} writes/s, p50 {:?}, p99 {:?}",
            n as f64 / RUN.as_secs_f64(),
            p(0.5),
            p(0.99)
        );
    }
    println!("status: {:?}", vol.status());
    drop(vol);
    std::fs::remove_file(&path)?;
    Ok(())
}
