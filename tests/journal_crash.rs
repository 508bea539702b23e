//! Safety property 1 under `kill -9`: every write the client saw acknowledged reads back with its
//! last acknowledged content after the daemon is killed at a random moment and restarted.
//!
//! The volume is a RAID-5 array over four images behind the NVRAM journal. Writer threads own
//! disjoint blocks; each block carries its offset and a version number and a pattern derived
//! from both, so a torn or misplaced block is caught as well as a lost one. A block whose write
//! was in flight at the kill may hold either the acknowledged version or the in-flight one.
//!
//! Iterations: 50 by default; `TWINBLOCK_CRASH_ITERATIONS=N` changes it and `TWINBLOCK_SOAK=1`
//! runs 500. `TWINBLOCK_CRASH_SEED` replays a schedule.

#[path = "support/nbd_client.rs"]
mod nbd_client;

use nbd_client::Client;
use rand::{Rng, SeedableRng};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BLOCK_BYTES: u64 = 4096;
/// Blocks the workload touches (a 16 MiB window of the volume).
const BLOCKS: u64 = 4096;
const WRITER_THREADS: u64 = 4;
const READY_TIMEOUT: Duration = Duration::from_secs(20);
const EXPORT: &str = "crashvol";

/// `TWINBLOCK_CRASH_VOLUME=plain`: the crash schedule runs on a plain image (tests about
/// journals and arrays have nothing to check then).
fn plain_volume_run() -> bool {
    std::env::var("TWINBLOCK_CRASH_VOLUME").is_ok_and(|v| v == "plain")
}

/// What the checker knows of every block: nothing written yet.
fn new_model() -> Arc<Vec<Mutex<BlockState>>> {
    Arc::new(
        (0..BLOCKS)
            .map(|_| Mutex::new(BlockState::default()))
            .collect(),
    )
}

/// A fresh directory under cargo's per-target temporary directory.
fn test_dir(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(
            std::env::var_os("CARGO_TARGET_TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir),
        )
        .expect("tempdir")
}

fn config(dir: &Path, port: u16) -> String {
    // `TWINBLOCK_CRASH_VOLUME=plain` runs the same schedule on a plain image volume: a failure
    // there is a broken test, not a broken journal.
    if plain_volume_run() {
        return format!(
            "[node]\nid = 0\ndata_dir = \"{}\"\n[nbd]\nlisten = [\"127.0.0.1:{port}\"]\n\
             [[volume]]\nname = \"{EXPORT}\"\nfile = \"plain.img\"\nsize = \"64MiB\"\n",
            dir.display()
        );
    }
    format!(
        r#"[node]
id = 0
data_dir = "{dir}"

[nbd]
listen = ["127.0.0.1:{port}"]

[[array]]
name = "md0"
level = 5
chunk = "64KiB"
disks = ["d0.img", "d1.img", "d2.img", "d3.img"]
create = true
disk_size = "48MiB"

[[volume]]
name = "{EXPORT}"
array = "md0"
journal = true

[nvram]
path = "{dir}/node0.nvram"
size = "8MiB"
persistence = "msync"
cp_interval_ms = 200
"#,
        dir = dir.display()
    )
}

struct Daemon {
    child: Child,
}

impl Daemon {
    fn start(config: &Path, log: &Path, addr: SocketAddr) -> Daemon {
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open daemon log");
        let child = Command::new(env!("CARGO_BIN_EXE_twinblockd"))
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .stderr(log_file)
            .spawn()
            .expect("spawn twinblockd");
        let mut d = Daemon { child };
        let start = Instant::now();
        loop {
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return d;
            }
            if let Ok(Some(status)) = d.child.try_wait() {
                panic!(
                    "twinblockd exited with {status} before serving; log:\n{}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < READY_TIMEOUT,
                "twinblockd did not serve within {READY_TIMEOUT:?}; log:\n{}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The content of `block` at `version`: offset, version, then a pattern of both.
fn block_image(block: u64, version: u64) -> Vec<u8> {
    let mut b = vec![0u8; BLOCK_BYTES as usize];
    if version == 0 {
        return b;
    }
    b[0..8].copy_from_slice(&(block * BLOCK_BYTES).to_le_bytes());
    b[8..16].copy_from_slice(&version.to_le_bytes());
    let mut x =
        block.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_mul(0xD1B5_4A32_D192_ED03) | 1;
    for chunk in b[16..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    b
}

/// Which version a block holds, or a description of why it holds none.
fn decode(block: u64, data: &[u8]) -> Result<u64, String> {
    let version = u64::from_le_bytes(data[8..16].try_into().unwrap());
    if data == block_image(block, version).as_slice() {
        Ok(version)
    } else {
        let off = u64::from_le_bytes(data[0..8].try_into().unwrap());
        Err(format!(
            "block {block} holds garbage (header offset {off}, version {version})"
        ))
    }
}

#[derive(Clone, Copy, Default, Debug)]
struct BlockState {
    acked: u64,
    inflight: Option<u64>,
}

fn free_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr")
}

fn iterations() -> u32 {
    if let Ok(n) = std::env::var("TWINBLOCK_CRASH_ITERATIONS") {
        return n
            .parse()
            .expect("TWINBLOCK_CRASH_ITERATIONS must be a number");
    }
    if std::env::var("TWINBLOCK_SOAK").is_ok_and(|v| v == "1") {
        500
    } else {
        50
    }
}

/// Run writers until the daemon dies under them; return nothing (state is in `blocks`).
fn workload(
    addr: SocketAddr,
    export: &'static str,
    blocks: &Arc<Vec<Mutex<BlockState>>>,
    stop: &Arc<AtomicBool>,
    seed: u64,
) -> Vec<std::thread::JoinHandle<u64>> {
    (0..WRITER_THREADS)
        .map(|t| {
            let blocks = blocks.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (t + 1));
                let Ok(mut c) = Client::connect(addr, export) else {
                    return 0;
                };
                let mut acked_writes = 0;
                while !stop.load(Ordering::Relaxed) {
                    let block = rng.gen_range(0..BLOCKS / WRITER_THREADS) * WRITER_THREADS + t;
                    let version = {
                        let mut s = blocks[block as usize].lock().unwrap();
                        let v = s.acked.max(s.inflight.unwrap_or(0)) + 1;
                        s.inflight = Some(v);
                        v
                    };
                    let fua = rng.gen_ratio(1, 8);
                    match c.write(block * BLOCK_BYTES, &block_image(block, version), fua) {
                        Ok(()) => {
                            let mut s = blocks[block as usize].lock().unwrap();
                            s.acked = version;
                            s.inflight = None;
                            acked_writes += 1;
                        }
                        // The daemon was killed: this write stays "in flight".
                        Err(_) => return acked_writes,
                    }
                    if rng.gen_ratio(1, 64) && c.flush().is_err() {
                        return acked_writes;
                    }
                }
                acked_writes
            })
        })
        .collect()
}

/// Read every block back and check it against the model; fold in-flight writes that landed.
fn verify(addr: SocketAddr, export: &str, blocks: &[Mutex<BlockState>], iteration: u32) {
    let mut c = Client::connect(addr, export).expect("connect after restart");
    for block in 0..BLOCKS {
        let data = c
            .read(block * BLOCK_BYTES, BLOCK_BYTES as u32)
            .unwrap_or_else(|e| panic!("iteration {iteration}: read block {block}: {e}"));
        let got = decode(block, &data).unwrap_or_else(|e| panic!("iteration {iteration}: {e}"));
        let mut s = blocks[block as usize].lock().unwrap();
        let ok = got == s.acked || Some(got) == s.inflight;
        assert!(
            ok,
            "iteration {iteration}: block {block} reads version {got}, but version {} was \
             acknowledged (in flight: {:?}): an acknowledged write was lost",
            s.acked, s.inflight
        );
        s.acked = got;
        s.inflight = None;
    }
    c.disconnect();
}

#[test]
fn acknowledged_writes_survive_kill_9_of_the_daemon() {
    let dir = test_dir("twinblock-crash-");
    let addr = free_addr();
    let config_path = dir.path().join("node0.toml");
    std::fs::write(&config_path, config(dir.path(), addr.port())).expect("write config");
    let log = dir.path().join("daemon.log");

    let seed: u64 = std::env::var("TWINBLOCK_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    println!("crash test seed {seed} (replay with TWINBLOCK_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let blocks = new_model();

    let n = iterations();
    let mut total_acked = 0u64;
    for i in 0..n {
        let mut daemon = Daemon::start(&config_path, &log, addr);
        if i > 0 {
            verify(addr, EXPORT, &blocks, i);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let writers = workload(addr, EXPORT, &blocks, &stop, rng.gen());
        std::thread::sleep(Duration::from_millis(rng.gen_range(20..300)));
        daemon.kill9();
        stop.store(true, Ordering::Relaxed);
        for w in writers {
            total_acked += w.join().expect("writer thread");
        }
    }
    let daemon = Daemon::start(&config_path, &log, addr);
    verify(addr, EXPORT, &blocks, n);
    drop(daemon);
    println!("{n} kill -9 iterations, {total_acked} acknowledged writes, none lost");
    assert!(
        total_acked > u64::from(n),
        "the workload barely ran: {total_acked} writes acknowledged"
    );
}

/// A journaled volume pointed at an NVRAM file that holds another array's unapplied writes must
/// not start (replaying them would write that array's data into this one), and the right array
/// still gets them back.
#[test]
fn an_nvram_file_of_another_array_is_refused() {
    if plain_volume_run() {
        return;
    }
    let dir = test_dir("twinblock-foreign-nvram-");
    let addr = free_addr();
    let first = config(dir.path(), addr.port());
    let first_path = dir.path().join("first.toml");
    std::fs::write(&first_path, &first).expect("write config");
    let log = dir.path().join("daemon.log");
    let blocks = new_model();
    let mut daemon = Daemon::start(&first_path, &log, addr);
    let stop = Arc::new(AtomicBool::new(false));
    let writers = workload(addr, EXPORT, &blocks, &stop, 7);
    std::thread::sleep(Duration::from_millis(300));
    daemon.kill9();
    stop.store(true, Ordering::Relaxed);
    let acked: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
    assert!(acked > 0, "no write was acknowledged before the kill");

    // Same NVRAM file, another (new) array.
    let second = first.replace(
        "\"d0.img\", \"d1.img\", \"d2.img\", \"d3.img\"",
        "\"e0.img\", \"e1.img\", \"e2.img\", \"e3.img\"",
    );
    assert_ne!(first, second);
    let second_path = dir.path().join("second.toml");
    std::fs::write(&second_path, &second).expect("write config");
    let second_log = dir.path().join("second.log");
    let out = Command::new(env!("CARGO_BIN_EXE_twinblockd"))
        .arg("--config")
        .arg(&second_path)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&second_log).expect("log"))
        .spawn()
        .expect("spawn")
        .wait_timeout_or_kill(READY_TIMEOUT);
    let text = std::fs::read_to_string(&second_log).unwrap_or_default();
    assert!(
        out.is_some_and(|s| !s.success()),
        "twinblockd started on another array's journal; log:\n{text}"
    );
    assert!(
        text.contains("refusing to replay another array's journal"),
        "unclear refusal; log:\n{text}"
    );
    // The original array gets every acknowledged write back.
    let daemon = Daemon::start(&first_path, &log, addr);
    verify(addr, EXPORT, &blocks, 1);
    drop(daemon);
}

trait WaitTimeout {
    /// Waits up to `timeout` for the child to exit; kills it and returns `None` if it does not.
    fn wait_timeout_or_kill(self, timeout: Duration) -> Option<std::process::ExitStatus>;
}

impl WaitTimeout for Child {
    fn wait_timeout_or_kill(mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(status)) = self.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.kill();
        let _ = self.wait();
        None
    }
}

/// Two journaled volumes on two arrays, each with its own NVRAM file: writes to both survive
/// kill -9 (neither journal is replayed into the other's array).
#[test]
fn two_journaled_volumes_each_with_its_own_nvram_survive_kill_9() {
    if plain_volume_run() {
        return;
    }
    let dir = test_dir("twinblock-two-journals-");
    let addr = free_addr();
    let text = format!(
        r#"{base}
[[array]]
name = "md1"
level = 1
disks = ["m0.img", "m1.img"]
create = true
disk_size = "40MiB"

[[volume]]
name = "second"
array = "md1"
journal = true
nvram = "second.nvram"
"#,
        base = config(dir.path(), addr.port())
    );
    let config_path = dir.path().join("node0.toml");
    std::fs::write(&config_path, text).expect("write config");
    let log = dir.path().join("daemon.log");
    let first = new_model();
    let second = new_model();
    for i in 0..3u32 {
        let mut daemon = Daemon::start(&config_path, &log, addr);
        if i > 0 {
            verify(addr, EXPORT, &first, i);
            verify(addr, "second", &second, i);
        }
        let stop = Arc::new(AtomicBool::new(false));
        let mut writers = workload(addr, EXPORT, &first, &stop, u64::from(i) * 2 + 1);
        writers.extend(workload(
            addr,
            "second",
            &second,
            &stop,
            u64::from(i) * 2 + 2,
        ));
        std::thread::sleep(Duration::from_millis(250));
        daemon.kill9();
        stop.store(true, Ordering::Relaxed);
        let acked: u64 = writers.into_iter().map(|w| w.join().expect("writer")).sum();
        assert!(acked > 0, "iteration {i}: nothing acknowledged");
    }
    let daemon = Daemon::start(&config_path, &log, addr);
    verify(addr, EXPORT, &first, 3);
    verify(addr, "second", &second, 3);
    drop(daemon);
    assert!(dir.path().join("second.nvram").exists());
}
