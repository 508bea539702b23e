//! Long-running checks, ignored by default: run them with `cargo test --test soak -- --ignored`.
//! `TWINBLOCK_SOAK_SECS` sets how long each runs (default 300 seconds).

mod common;

use std::process::Command;
use std::time::Duration;

use common::{require_tool, run_ok, Daemon, DaemonSpec, VolumeSpec, CLIENT_TIMEOUT};

/// Default soak length in seconds.
const DEFAULT_SOAK_SECS: u64 = 300;

/// Soak length: `TWINBLOCK_SOAK_SECS`, else [`DEFAULT_SOAK_SECS`].
fn soak_secs() -> u64 {
    std::env::var("TWINBLOCK_SOAK_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(DEFAULT_SOAK_SECS)
}

#[test]
#[ignore = "soak test, minutes long: cargo test --test soak -- --ignored"]
fn soak_fio_verify_mixed_workload_on_several_connections() {
    let secs = soak_secs();
    if !require_tool("fio") {
        return;
    }
    let mut daemon = Daemon::start(DaemonSpec {
        volumes: vec![VolumeSpec {
            size_bytes: 512 * 1024 * 1024,
            ..VolumeSpec::default()
        }],
        extra_toml: String::new(),
    });
    let uri = daemon.default_uri();
    let runtime = format!("--runtime={secs}");
    let out = run_ok(
        Command::new("fio")
            .current_dir(daemon.dir())
            .args([
                "--ioengine=nbd",
                &format!("--uri={uri}"),
                "--time_based",
                &runtime,
            ])
            .args([
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--verify_backlog=1024",
            ])
            .args([
                "--name=rand",
                "--rw=randrw",
                "--bsrange=512-256k",
                "--iodepth=32",
                "--size=128M",
            ])
            .args([
                "--name=seq",
                "--rw=write",
                "--bs=1m",
                "--iodepth=8",
                "--size=128M",
                "--offset=256M",
            ]),
        Duration::from_secs(secs + 120),
    );
    assert!(
        !out.stdout.contains("verify:"),
        "fio reported a verify problem\n{}",
        out.describe()
    );
    daemon.assert_serving();
}

#[test]
#[ignore = "soak test, minutes long: cargo test --test soak -- --ignored"]
fn soak_repeated_sigkill_keeps_flushed_writes() {
    let secs = soak_secs();
    if !require_tool("qemu-io") {
        return;
    }
    let mut daemon = Daemon::start_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(secs);
    let mut round: u64 = 0;
    while std::time::Instant::now() < deadline {
        let byte = (round % 250 + 1) as u8;
        let offset = (round * 12_289) % (60 << 20);
        let uri = daemon.default_uri();
        let write = format!("write -P {byte:#x} {offset} 12289");
        run_ok(
            Command::new("qemu-io").args(["-f", "raw", &uri, "-c", &write, "-c", "flush"]),
            CLIENT_TIMEOUT,
        );
        daemon.kill_hard();
        daemon.restart();
        let read = format!("read -P {byte:#x} {offset} 12289");
        let out = run_ok(
            Command::new("qemu-io").args(["-f", "raw", &daemon.default_uri(), "-c", &read]),
            CLIENT_TIMEOUT,
        );
        assert!(
            !out.stdout.contains("failed"),
            "round {round}: {}",
            out.describe()
        );
        round += 1;
    }
    eprintln!("{round} kill/restart rounds");
}
