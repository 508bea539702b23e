//! `twinctl demo --failover`: the demo pair under a verifying writer, node 1 killed, node 0
//! taking over, timed and checked.
//!
//! One cycle: a writer thread writes self-describing 4 KiB blocks to node 1's journaled volume
//! (`r5b`) one request at a time and records each acknowledgement ([`Ledger`]); node 1 gets
//! SIGKILL; a prober connects to node 1's address every few milliseconds until a read succeeds
//! (now served by node 0); node 0's log gives the steps in between ([`marks_from_log`]); every
//! block is read back at node 1's address and judged against the ledger. Then node 1 starts
//! again, waits for giveback, node 0 gives back, and the blocks are read back once more, now
//! from node 1. With `--repeat N` the cycle runs N times and the timings are summed up as a
//! Markdown table. Blocking NBD I/O runs on blocking threads; the admin calls are async.

use crate::demo::DemoPair;
use crate::nbd_client::NbdClient;
use crate::takeover_timing::{markdown_table, marks_from_log, Marks, Takeover};
use crate::write_ledger::{Ledger, Verdict, BLOCK_BYTES};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

/// The export the writer targets: node 1's journaled RAID-5 volume.
const EXPORT: &str = "r5b";
/// Blocks the writer cycles over (4 MiB): small enough to read back in a moment, and the
/// writer overwrites each block many times, so stale data is caught too.
const REGION_BLOCKS: u64 = 1024;
/// The writer runs at least this long before the kill, so the kill lands under load...
const WRITE_BEFORE_KILL: Duration = Duration::from_millis(500);
/// ...and at least this many writes were acknowledged.
const MIN_ACKED_BEFORE_KILL: u64 = 200;
/// Longest the writer may take to reach that.
const WRITER_START_TIMEOUT: Duration = Duration::from_secs(20);
/// Pause between two attempts of the prober.
const PROBE_INTERVAL: Duration = Duration::from_millis(5);
/// Connect and request timeout of the prober (the port is refused, not silent, before the
/// takeover, so this is only reached if something hangs).
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// Longest wait for the first I/O at the dead node's address.
const FIRST_IO_TIMEOUT: Duration = Duration::from_secs(20);
/// Timeout of the writer's and the verifier's requests.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long node 1 may take to come back and wait for giveback, and the giveback to finish.
const RESTART_TIMEOUT: Duration = Duration::from_secs(30);
/// How long node 0 may take before it could take over again (mirror back in sync).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Lets the survivor's last log lines reach the file before it is read.
const LOG_SETTLE: Duration = Duration::from_millis(200);

/// What the read-back of the region found.
struct Verification {
    checked: u64,
    ok: u64,
    unwritten: u64,
    lost: Vec<String>,
}

impl Verification {
    fn passed(&self) -> bool {
        self.lost.is_empty()
    }

    fn summary(&self, acked: u64) -> String {
        if self.passed() {
            format!(
                "every acknowledged write reads back ({acked} writes acknowledged; {} of {} blocks \
                 written, all correct)",
                self.checked - self.unwritten,
                self.checked
            )
        } else {
            format!(
                "{} of {} written blocks LOST their last acknowledged write ({} ok, {} never \
                 written); first: {}",
                self.lost.len(),
                self.checked - self.unwritten,
                self.ok,
                self.unwritten,
                self.lost
                    .iter()
                    .take(5)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        }
    }
}

/// Runs `repeat` kill/takeover cycles; `giveback` restarts node 1 and gives back after each
/// (always between cycles). Fails if any acknowledged write was lost.
pub async fn run(pair: &mut DemoPair, repeat: u32, giveback: bool) -> Result<()> {
    let mut runs = Vec::new();
    let mut failures = 0u32;
    for i in 1..=repeat {
        pair.wait_takeover_ready(0, READY_TIMEOUT).await?;
        pair.wait_state(1, "normal", READY_TIMEOUT).await?;
        println!(
            "\n--- takeover {i}/{repeat}: SIGKILL to node 1 under a verifying writer on {EXPORT}"
        );
        let (takeover, ledger, verified) = cycle(pair).await?;
        print_cycle(&takeover, &ledger, &verified);
        if !verified.passed() {
            failures += 1;
        }
        runs.push(takeover);
        if giveback || i < repeat {
            let again = restart_and_give_back(pair, ledger).await?;
            if !again {
                failures += 1;
            }
        }
    }
    if repeat > 1 {
        println!(
            "\n{repeat} takeovers (node 1 killed, node 0 takes over), default timers:\n\n{}",
            markdown_table(&runs)
        );
    }
    if failures > 0 {
        bail!("{failures} verification(s) found lost acknowledged writes (see above)");
    }
    Ok(())
}

/// One kill and takeover: returns its timing, the writer's ledger and the read-back result.
async fn cycle(pair: &mut DemoPair) -> Result<(Takeover, Arc<Ledger>, Verification)> {
    let target = pair.address(1);
    let writer = Writer::start(target)?;
    writer.wait_under_load()?;
    let killed_wall = SystemTime::now();
    let killed = Instant::now();
    pair.kill(1)?;
    let ledger = writer.finish()?;
    let first_io = tokio::task::spawn_blocking(move || probe_first_io(target, killed))
        .await
        .context("the prober thread failed")??;
    tokio::time::sleep(LOG_SETTLE).await;
    let log = std::fs::read_to_string(pair.log(0)).unwrap_or_default();
    let marks: Marks = marks_from_log(&log, killed_wall);
    let ledger = Arc::new(ledger);
    let verified = {
        let ledger = ledger.clone();
        tokio::task::spawn_blocking(move || verify(target, &ledger))
            .await
            .context("the verifier thread failed")??
    };
    Ok((Takeover { marks, first_io }, ledger, verified))
}

fn print_cycle(t: &Takeover, ledger: &Ledger, v: &Verification) {
    let show = |d: Option<Duration>| match d {
        Some(d) => format!("{} ms", d.as_millis()),
        None => "not logged".into(),
    };
    println!(
        "  node 0 declared node 1 failed  {}\n  \
         disks preempted (fence)        {}\n  \
         arrays assembled               {}\n  \
         journal replayed, volumes open {}\n  \
         listening on node 1's address  {}\n  \
         first successful I/O there     {} ms after SIGKILL",
        show(t.marks.detected),
        show(t.marks.fenced),
        show(t.marks.assembled),
        show(t.marks.replayed),
        show(t.marks.serving),
        t.first_io.as_millis()
    );
    println!(
        "  verification at node 1's address (served by node 0): {}",
        v.summary(ledger.acked())
    );
}

/// Starts node 1 again, waits until it waits for giveback, gives back from node 0 and reads
/// the region back from node 1. Returns whether that read-back passed.
async fn restart_and_give_back(pair: &mut DemoPair, ledger: Arc<Ledger>) -> Result<bool> {
    pair.spawn(1, true)?;
    pair.wait_state(1, "waiting_for_giveback", RESTART_TIMEOUT)
        .await?;
    let t0 = Instant::now();
    twinblock::admin::client::call(
        &pair.admin_socket(0),
        &twinblock::admin::Request::HaGiveback,
    )
    .await
    .context("giveback refused by node 0")?;
    pair.wait_state(1, "normal", RESTART_TIMEOUT).await?;
    pair.wait_state(0, "normal", RESTART_TIMEOUT).await?;
    // Measured here: the read-back below (every block of the region over NBD) is not part of
    // the giveback, and once took most of the time this line printed.
    let gave_back = t0.elapsed();
    let target = pair.address(1);
    let verified =
        tokio::task::spawn_blocking(move || verify(target, &ledger).map(|v| (v, ledger)))
            .await
            .context("the verifier thread failed")??;
    println!(
        "  giveback: node 1 serves its own volumes again {} ms after the command; read back \
         from node 1: {}",
        gave_back.as_millis(),
        verified.0.summary(verified.1.acked())
    );
    Ok(verified.0.passed())
}

/// The verifying writer on its own thread.
struct Writer {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    started: Instant,
    thread: std::thread::JoinHandle<Result<Ledger>>,
}

impl Writer {
    fn start(target: SocketAddr) -> Result<Writer> {
        let mut client = NbdClient::connect(target, EXPORT, CLIENT_TIMEOUT)
            .with_context(|| format!("the verifying writer cannot reach {EXPORT} at {target}"))?;
        let blocks = REGION_BLOCKS.min(client.size() / BLOCK_BYTES as u64);
        if blocks == 0 {
            bail!("{EXPORT} at {target} is smaller than one block");
        }
        let run = run_id();
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let thread = {
            let (stop, acked) = (stop.clone(), acked.clone());
            std::thread::spawn(move || {
                let mut ledger = Ledger::new(run, blocks);
                // Writes until told to stop or the server goes away (the kill).
                while !stop.load(Ordering::Relaxed) {
                    let (block, data) = ledger.begin();
                    if client.write(block * BLOCK_BYTES as u64, &data).is_err() {
                        break;
                    }
                    ledger.ack();
                    acked.store(ledger.acked(), Ordering::Relaxed);
                }
                Ok(ledger)
            })
        };
        Ok(Writer {
            stop,
            acked,
            started: Instant::now(),
            thread,
        })
    }

    /// Waits until the writer has run long enough and had enough writes acknowledged.
    fn wait_under_load(&self) -> Result<()> {
        loop {
            let n = self.acked.load(Ordering::Relaxed);
            if n >= MIN_ACKED_BEFORE_KILL && self.started.elapsed() >= WRITE_BEFORE_KILL {
                return Ok(());
            }
            if self.thread.is_finished() {
                bail!("the verifying writer stopped after {n} writes before the kill");
            }
            if self.started.elapsed() > WRITER_START_TIMEOUT {
                bail!(
                    "only {n} writes acknowledged in {WRITER_START_TIMEOUT:?} (need \
                     {MIN_ACKED_BEFORE_KILL})"
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the writer (it stops by itself when the connection dies) and returns its ledger.
    fn finish(self) -> Result<Ledger> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.join() {
            Ok(r) => r,
            Err(_) => bail!("the verifying writer thread panicked"),
        }
    }
}

/// A number telling this run's blocks from every earlier run's.
fn run_id() -> u64 {
    let t = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    t ^ u64::from(std::process::id()).rotate_left(48)
}

/// Connects to `target` until a read succeeds; returns the time since `since`.
fn probe_first_io(target: SocketAddr, since: Instant) -> Result<Duration> {
    let mut buf = vec![0u8; BLOCK_BYTES];
    let mut last_error = String::from("no attempt");
    while since.elapsed() < FIRST_IO_TIMEOUT {
        match NbdClient::connect(target, EXPORT, PROBE_TIMEOUT)
            .and_then(|mut c| c.read(0, &mut buf))
        {
            Ok(()) => return Ok(since.elapsed()),
            Err(e) => last_error = e.to_string(),
        }
        std::thread::sleep(PROBE_INTERVAL);
    }
    bail!(
        "no successful I/O at {target} within {FIRST_IO_TIMEOUT:?} of the SIGKILL (last: \
         {last_error}); node 0 did not take over"
    )
}

/// Reads every block of the ledger's region at `target` and judges it.
fn verify(target: SocketAddr, ledger: &Ledger) -> Result<Verification> {
    let mut c = NbdClient::connect(target, EXPORT, CLIENT_TIMEOUT)
        .with_context(|| format!("the verifier cannot reach {EXPORT} at {target}"))?;
    let mut v = Verification {
        checked: 0,
        ok: 0,
        unwritten: 0,
        lost: Vec::new(),
    };
    let mut buf = vec![0u8; BLOCK_BYTES];
    for block in 0..ledger.blocks() {
        c.read(block * BLOCK_BYTES as u64, &mut buf)
            .with_context(|| format!("read-back of block {block} at {target}"))?;
        v.checked += 1;
        match ledger.check(block, &buf) {
            Verdict::Ok => v.ok += 1,
            Verdict::Unwritten => v.unwritten += 1,
            Verdict::Lost(why) => v.lost.push(why),
        }
    }
    Ok(v)
}
