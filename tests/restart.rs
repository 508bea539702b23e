//! Restarts: what a client flushed is still there after the daemon is killed with SIGKILL and
//! started again on the same data directory; a graceful SIGTERM stop exits cleanly.

mod common;

use std::process::Command;

use common::{require_tool, run_ok, Daemon, DaemonSpec, VolumeSpec, CLIENT_TIMEOUT};

/// (offset, length, pattern byte) written before the kill.
const WRITES: [(u64, u64, u8); 4] = [
    (0, 4096, 0x5a),
    (4096 * 3 + 17, 9000, 0xa5),
    (1 << 20, 1 << 20, 0x3c),
    ((8 << 20) - 512, 512, 0xc3),
];

fn qemu_io(daemon: &Daemon, commands: &[String]) -> String {
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw", &daemon.default_uri()]);
    for c in commands {
        cmd.args(["-c", c]);
    }
    let out = run_ok(&mut cmd, CLIENT_TIMEOUT);
    assert!(!out.stdout.contains("failed"), "{}", out.describe());
    out.stdout
}

/// Small writes the page-cache test reads back (so the volume cache holds them) before large
/// writes cover them: (offset, length, pattern byte).
const CACHED_FIRST: [(u64, u64, u8); 2] = [(1 << 20, 4096, 0x11), ((1 << 20) + 65536, 8192, 0x22)];

fn flushed_writes_survive_sigkill(direct_io: bool) {
    if !require_tool("qemu-io") {
        return;
    }
    let mut daemon = Daemon::start(DaemonSpec {
        volumes: vec![VolumeSpec {
            direct_io,
            ..VolumeSpec::default()
        }],
        ..DaemonSpec::default()
    });
    // Cached blocks first, then the writes (one of 1 MiB, over them) and the FLUSH: what is read
    // after the restart must be the later data, from the image.
    let mut writes: Vec<String> = Vec::new();
    for (o, l, p) in CACHED_FIRST {
        writes.push(format!("write -P {p:#x} {o} {l}"));
        writes.push(format!("read -P {p:#x} {o} {l}"));
    }
    writes.extend(
        WRITES
            .iter()
            .map(|(o, l, p)| format!("write -P {p:#x} {o} {l}")),
    );
    // Read back before the kill too: the large write must have dropped the cached blocks.
    writes.extend(
        WRITES
            .iter()
            .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}")),
    );
    writes.push("flush".into());
    qemu_io(&daemon, &writes);
    daemon.kill_hard();
    daemon.restart();
    let reads: Vec<String> = WRITES
        .iter()
        .map(|(o, l, p)| format!("read -P {p:#x} {o} {l}"))
        .collect();
    let out = qemu_io(&daemon, &reads);
    assert_eq!(
        out.matches("read ").count(),
        WRITES.len(),
        "every read ran:\n{out}"
    );
    assert_eq!(daemon.starts(), 2);
}

#[test]
fn flushed_writes_survive_sigkill_and_restart() {
    flushed_writes_survive_sigkill(true);
}

/// The default plain volume: page-cache I/O, FLUSH = fdatasync, the read cache on small requests.
#[test]
fn flushed_writes_survive_sigkill_and_restart_on_the_page_cache() {
    flushed_writes_survive_sigkill(false);
}

#[test]
fn sigterm_stops_the_daemon_cleanly() {
    let mut daemon = Daemon::start_default();
    daemon.assert_serving();
    let status = daemon.stop();
    let log = daemon.log();
    match status {
        Some(status) => assert!(
            status.success(),
            "exit status {status} after SIGTERM\nlog:\n{log}"
        ),
        None => panic!("daemon did not exit within the grace period after SIGTERM\nlog:\n{log}"),
    }
}
