//! Benchmark: restart to serving after `kill -9` with a full NVRAM log of 4 KiB writes.
//!
//! `cargo run --release -p twinblock-journal --example restart_after_kill [-- LOG_MIB ROUNDS [pmem]]`
//!
//! 1. A child process fills a log of LOG_MIB (default 256) MiB with 4 KiB writes at random
//!    offsets (no CP runs: the interval is an hour and the fill trigger is off), says so, and is
//!    killed with SIGKILL.
//! 2. ROUNDS (default 10) times, a child process opens the NVRAM file and the volume (recovery:
//!    scan, dirty index), serves one read of a recovered block, prints how long that took from its
//!    own start, and is killed with SIGKILL before its first CP can apply anything, so every
//!    round recovers the same full log. The parent also times spawn to "serving".
//!    The block read is the fill's first write (the oldest record), whose CRC the background
//!    check has not reached yet: the read verifies it first. Each round also reports when the
//!    background check has verified every record's CRC (no CP runs before that).
//!
//! The store is an in-memory backing (the array's own assembly time is not part of this number).
//! The NVRAM file lives in /dev/shm (mode `none`), as in the default configuration. With `pmem`
//! the mode is `pmem` with the power-loss model standing in for the DAX medium (this runs on any
//! file system): every record is written back line by line, and recovery writes back the whole
//! scanned log before trusting it (`write_back` in the output). The model's own bookkeeping (a
//! copy of the file at open) is in "NVRAM open", not in recovery.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use bytes::Bytes;
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use twinblock_journal::power::NvramPowerModel;
use twinblock_journal::{
    JournaledVolume, MemBacking, Nvram, NvramConfig, PersistenceMode, VolumeConfig,
};

const BLOCK_BYTES: u64 = 4096;
const VOLUME_BYTES: u64 = 1 << 30;
/// Log bytes one 4 KiB write takes (64-byte header + payload).
const RECORD_BYTES: u64 = 64 + BLOCK_BYTES;
/// Log bytes left free so that the writer never waits for (and so never triggers) a CP.
const HEADROOM_BYTES: u64 = 64 * 1024;

fn nvram_cfg(path: &Path, log_mib: u64, pmem: bool) -> NvramConfig {
    NvramConfig {
        path: path.to_path_buf(),
        log_bytes_per_region: log_mib << 20,
        persistence: if pmem {
            PersistenceMode::Pmem
        } else {
            PersistenceMode::None
        },
        ..NvramConfig::new(0, [7; 16])
    }
}

/// Opens the NVRAM file; in `pmem` mode through the power model (no DAX needed).
fn open_nvram(path: &Path, log_mib: u64, pmem: bool) -> Nvram {
    let cfg = nvram_cfg(path, log_mib, pmem);
    if pmem {
        Nvram::open_with_power_model(&cfg, Arc::new(NvramPowerModel::new())).expect("open NVRAM")
    } else {
        Nvram::open(&cfg).expect("open NVRAM")
    }
}

fn quiet() -> VolumeConfig {
    VolumeConfig {
        cp_interval_ms: 3_600_000,
        cp_fill_percent: 100,
        max_record_payload_bytes: 64 * 1024,
        ..VolumeConfig::default()
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Child: fill the log, then wait to be killed.
fn fill(path: &Path, log_mib: u64, pmem: bool) {
    runtime().block_on(async {
        let nv = open_nvram(path, log_mib, pmem);
        let vol = JournaledVolume::open(nv, MemBacking::new(VOLUME_BYTES, 65536), 1, quiet())
            .await
            .expect("open volume");
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut n = 0u64;
        loop {
            let st = vol.status();
            if st.log_used_bytes + RECORD_BYTES + HEADROOM_BYTES > st.log_bytes {
                break;
            }
            let block = rng.gen_range(0..VOLUME_BYTES / BLOCK_BYTES);
            let data = Bytes::from(vec![(n % 251) as u8 + 1; BLOCK_BYTES as usize]);
            vol.write(block * BLOCK_BYTES, data).await.expect("write");
            n += 1;
        }
        println!("full {n}");
        // Wait for SIGKILL without ever yielding to the flusher.
        std::thread::sleep(std::time::Duration::from_secs(3600));
    });
}

/// CPU time this process used so far (all threads, user and system), in ms: what recovery costs
/// independently of how many other processes compete for the cores.
fn process_cpu_ms() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    if rc != 0 {
        return f64::NAN;
    }
    ts.tv_sec as f64 * 1000.0 + ts.tv_nsec as f64 / 1e6
}

/// Child: recover and serve one read, report the time from process start, then wait.
fn open(path: &Path, log_mib: u64, pmem: bool, started: Instant) {
    runtime().block_on(async {
        let t_nvram = Instant::now();
        let nv = open_nvram(path, log_mib, pmem);
        let nvram_ms = t_nvram.elapsed().as_secs_f64() * 1000.0;
        let t_volume = Instant::now();
        let vol = JournaledVolume::open(nv, MemBacking::new(VOLUME_BYTES, 65536), 1, quiet())
            .await
            .expect("recover");
        let volume_ms = t_volume.elapsed().as_secs_f64() * 1000.0;
        let r = vol.recovery();
        // Read the block of the fill's first write: the oldest record in the log, so one whose
        // CRC the background check has not reached yet (the read checks it first).
        let first_block = rand::rngs::StdRng::seed_from_u64(1).gen_range(0..VOLUME_BYTES / BLOCK_BYTES);
        let got = vol
            .read(first_block * BLOCK_BYTES, BLOCK_BYTES)
            .await
            .expect("read");
        let ms = started.elapsed().as_secs_f64() * 1000.0;
        let cpu_ms = process_cpu_ms();
        let unverified_at_read = vol.status().crc_unverified_records;
        assert!(got.iter().all(|&b| b == got[0]) && got[0] != 0, "recovered block reads back");
        println!(
            "serving {ms:.2} cpu {cpu_ms:.2} (NVRAM open {nvram_ms:.2}, recovery {volume_ms:.2}: scan {:.2} of which write_back {:.2}, index {:.2}) records {} in_background {} crc_unverified_at_first_read {unverified_at_read}",
            r.scan_micros as f64 / 1000.0,
            r.write_back_micros as f64 / 1000.0,
            r.index_micros as f64 / 1000.0,
            r.replayed_records, r.applied_in_background
        );
        // Then wait for the background CRC check of the rest of the log (no CP can run before).
        while vol.status().crc_unverified_records > 0 {
            tokio::time::sleep(std::time::Duration::from_micros(200)).await;
        }
        let verified_ms = started.elapsed().as_secs_f64() * 1000.0;
        assert!(vol.status().corrupt.is_none());
        println!("all_crcs_verified {verified_ms:.2}");
        std::thread::sleep(std::time::Duration::from_secs(3600));
    });
}

/// Runs this program as a child with `args`, returns (first line, ms from spawn, second line
/// when `two_lines`), then kills it.
fn child(args: &[String], two_lines: bool) -> (String, f64, String) {
    let exe = std::env::current_exe().expect("own path");
    let t0 = Instant::now();
    let mut c = Command::new(exe)
        .args(args)
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn child");
    let mut line = String::new();
    let mut out = BufReader::new(c.stdout.take().expect("child stdout"));
    out.read_line(&mut line).expect("child output");
    let ms = t0.elapsed().as_secs_f64() * 1000.0;
    let mut second = String::new();
    if two_lines {
        out.read_line(&mut second).expect("child output");
    }
    // `Child::kill` sends SIGKILL.
    c.kill().expect("SIGKILL child");
    let _ = c.wait();
    (line.trim().to_string(), ms, second.trim().to_string())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    let started = Instant::now();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let child_pmem = args.get(3).map(String::as_str) == Some("pmem");
    if args.first().map(String::as_str) == Some("fill") {
        return fill(
            Path::new(&args[1]),
            args[2].parse().expect("log MiB"),
            child_pmem,
        );
    }
    if args.first().map(String::as_str) == Some("open") {
        return open(
            Path::new(&args[1]),
            args[2].parse().expect("log MiB"),
            child_pmem,
            started,
        );
    }
    let log_mib: u64 = args.first().map_or(256, |a| a.parse().expect("LOG_MIB"));
    let rounds: usize = args.get(1).map_or(10, |a| a.parse().expect("ROUNDS"));
    let mode = match args.get(2).map(String::as_str) {
        None | Some("none") => "none",
        Some("pmem") => "pmem",
        Some(other) => panic!("unknown mode {other}: none or pmem"),
    };
    let path = PathBuf::from(format!(
        "/dev/shm/twinblock-restart-bench-{}.img",
        std::process::id()
    ));
    let p = path.display().to_string();
    let (line, ms, _) = child(
        &["fill".into(), p.clone(), log_mib.to_string(), mode.into()],
        false,
    );
    println!(
        "filled {log_mib} MiB log ({mode}): {line} writes of 4 KiB in {ms:.0} ms, then SIGKILL"
    );
    let mut inside = Vec::new();
    let mut outside = Vec::new();
    let mut verified = Vec::new();
    let mut cpu_ms = Vec::new();
    let mut write_back = Vec::new();
    for round in 0..rounds {
        let (line, ms, second) = child(
            &["open".into(), p.clone(), log_mib.to_string(), mode.into()],
            true,
        );
        println!("round {round}: {line}; spawn to serving {ms:.2} ms; {second}; then SIGKILL");
        let child_ms: f64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|x| x.parse().ok())
            .unwrap_or(f64::NAN);
        let verified_ms: f64 = second
            .rsplit_once("all_crcs_verified ")
            .and_then(|(_, x)| x.parse().ok())
            .unwrap_or(f64::NAN);
        let cpu: f64 = line
            .split_whitespace()
            .nth(3)
            .and_then(|x| x.parse().ok())
            .unwrap_or(f64::NAN);
        cpu_ms.push(cpu);
        let wb: f64 = line
            .rsplit_once("write_back ")
            .and_then(|(_, x)| x.split(',').next()?.parse().ok())
            .unwrap_or(f64::NAN);
        write_back.push(wb);
        inside.push(child_ms);
        outside.push(ms);
        verified.push(verified_ms);
    }
    let spread = |v: &[f64]| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!("{lo:.1}..{hi:.1}")
    };
    println!(
        "median of {rounds}: process start to serving {:.2} ms (range {}), CPU time to serving {:.2} ms \
         (range {}), spawn to serving {:.2} ms, process start to all CRCs verified {:.2} ms (range {}), \
         write-back of the scanned log {:.2} ms (range {})",
        median(inside.clone()),
        spread(&inside),
        median(cpu_ms.clone()),
        spread(&cpu_ms),
        median(outside),
        median(verified.clone()),
        spread(&verified),
        median(write_back.clone()),
        spread(&write_back)
    );
    let _ = std::fs::remove_file(&path);
}
