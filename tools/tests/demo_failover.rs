//! `twinctl demo --failover` end to end: the demo pair (two node processes with `[ha]`) under
//! the built-in verifying NBD writer, node 1 killed with SIGKILL, node 0 taking over, every
//! acknowledged write read back at node 1's address, then node 1 restarted and given back.
//!
//! Needs no external client (the writer speaks NBD itself) and keeps its NVRAM files in its
//! temporary directory; its ports lie below the ephemeral range, probed free first.

mod common;

use common::free_demo_base_port as free_base_port;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// The whole run: two node starts, a takeover, a restart and a giveback.
const RUN_TIMEOUT: Duration = Duration::from_secs(180);

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

#[test]
fn demo_failover_survivor_serves_node1_address_and_every_acknowledged_write_reads_back() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let nvram = tmp.path().join("nvram");
    std::fs::create_dir_all(&nvram).unwrap();
    let out = tmp.path().join("stdout");
    let err = tmp.path().join("stderr");
    let port = free_base_port();
    let mut child = Command::new(env!("CARGO_BIN_EXE_twinctl"))
        .args(["demo", "--failover", "--no-check", "--size", "64MiB"])
        .arg("--port")
        .arg(port.to_string())
        .arg("--dir")
        .arg(&dir)
        .arg("--nvram-dir")
        .arg(&nvram)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if t0.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "demo --failover still running after {RUN_TIMEOUT:?}\n{}\n{}\n--- node 0 ---\n{}",
                read(&out),
                read(&err),
                read(&dir.join("node0/twinblockd.log"))
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let stdout = read(&out);
    let logs = format!(
        "stdout:\n{stdout}\nstderr:\n{}\n--- node 0 log ---\n{}\n--- node 1 log ---\n{}",
        read(&err),
        read(&dir.join("node0/twinblockd.log")),
        read(&dir.join("node1/twinblockd.log"))
    );
    assert!(status.success(), "demo --failover failed: {status}\n{logs}");
    assert!(
        stdout.contains("verification at node 1's address (served by node 0): every acknowledged write reads back"),
        "{logs}"
    );
    assert!(
        stdout.contains("read back from node 1: every acknowledged write reads back"),
        "{logs}"
    );
    let first_io = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("first successful I/O there"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
        .unwrap_or_else(|| panic!("no first-I/O time printed\n{logs}"));
    eprintln!("demo --failover: first I/O at node 1's address {first_io} ms after SIGKILL");
    assert!(first_io < 10_000, "{logs}");
    // The banner's commands name this run's sockets and the full path of twinctl.
    let socket0 = dir.join("node0/admin.sock");
    assert!(
        stdout.contains(&format!(
            "{} --socket {} status",
            env!("CARGO_BIN_EXE_twinctl"),
            socket0.display()
        )),
        "{logs}"
    );
}
