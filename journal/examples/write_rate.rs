//! Measures journaled 4 KiB random writes (NVRAM on /dev/shm, or the directory given as first
//! argument) over a backing that drops data and flushes instantly, so the figures are the
//! journal's own cost (append, persist, index, CP bookkeeping), at queue depth 1 and 32.
//! Not a test: run with
//! `cargo run --release -p twinblock-journal --example write_rate [DIR]`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use rand::Rng;
use twinblock_journal::{Backing, BackingError, JournaledVolume, Nvram, NvramConfig, VolumeConfig};

const VOLUME_BYTES: u64 = 256 * 1024 * 1024;
const BLOCK_BYTES: u64 = 4096;
const RUN: Duration = Duration::from_secs(2);

/// Accepts everything, stores nothing, reads zeroes.
struct NullBacking;

#[async_trait]
impl Backing for NullBacking {
    fn size(&self) -> u64 {
        VOLUME_BYTES
    }
    fn stripe_bytes(&self) -> u64 {
        64 * 1024
    }
    async fn read(&self, _offset: u64, len: u64) -> Result<Bytes, BackingError> {
        Ok(Bytes::from(vec![0; len as usize]))
    }
    async fn write(&self, _offset: u64, _data: Bytes) -> Result<(), BackingError> {
        Ok(())
    }
    async fn write_zeroes(&self, _offset: u64, _len: u64) -> Result<(), BackingError> {
        Ok(())
    }
    async fn discard(&self, _offset: u64, _len: u64) -> Result<(), BackingError> {
        Ok(())
    }
    async fn flush(&self) -> Result<(), BackingError> {
        Ok(())
    }
    async fn applied_seq(&self) -> Result<u64, BackingError> {
        Ok(0)
    }
    async fn set_applied_seq(&self, _seq: u64) -> Result<(), BackingError> {
        Ok(())
    }
}

async fn run(vol: Arc<JournaledVolume<NullBacking>>, depth: usize) -> (u64, Vec<Duration>) {
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
    let vol = Arc::new(JournaledVolume::open(nv, NullBacking, 1, VolumeConfig::default()).await?);
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
