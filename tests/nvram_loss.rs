//! A single node whose NVRAM file is lost between a `kill -9` and the restart (what a power cut
//! does to a file in RAM): the journaled volume is held, not served, status says what was lost and
//! why; `journal_accept_loss` serves it on a new log and the event stays in its history; a
//! refused command changes nothing.
//!
//! The daemon also serves a plain volume, so it is reachable while the journaled one is held.
//! Writes go through `nbdsh` without FLUSH, so they are acknowledged but not yet applied to the
//! array (the CP interval is an hour): deleting the NVRAM file really loses them. A missing
//! client skips the test with a message, or fails it when env `CI` is set.

mod common;

use common::{Daemon, DaemonSpec};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::Duration;

const JOURNALED: &str = "j0";
const BLOCK_BYTES: u64 = 64 * 1024;

fn spec() -> DaemonSpec {
    DaemonSpec {
        extra_toml: format!(
            r#"
[[array]]
name = "md0"
level = 5
chunk = "64KiB"
disks = ["d0.img", "d1.img", "d2.img", "d3.img"]
disk_size = "32MiB"
create = true

[[volume]]
name = "{JOURNALED}"
array = "md0"
journal = true

[nvram]
path = "{JOURNALED}.nvram"
size = "8MiB"
persistence = "none"
cp_interval_ms = 3600000
"#
        ),
        ..DaemonSpec::default()
    }
}

/// One admin request; the whole answer (`ok`, `result` or `error`).
fn admin(d: &Daemon, request: serde_json::Value) -> serde_json::Value {
    let mut s = UnixStream::connect(d.dir().join("admin.sock")).expect("admin socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    writeln!(s, "{request}").unwrap();
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line).unwrap();
    serde_json::from_str(&line).expect("admin answer")
}

fn ok(d: &Daemon, request: serde_json::Value) -> serde_json::Value {
    let a = admin(d, request.clone());
    assert_eq!(a["ok"], true, "{request}: {a}\nlog:\n{}", d.log());
    a["result"].clone()
}

/// Writes `fill` over the first block of export `name` without a FLUSH.
fn write_unflushed(d: &Daemon, fill: u8) {
    let script = format!(
        "h.pwrite(bytes([{fill}]) * {BLOCK_BYTES}, 0)\nh.shutdown()",
        BLOCK_BYTES = BLOCK_BYTES
    );
    let mut c = common::nbdsh_command();
    c.args(["-u", &d.uri(JOURNALED), "-c", &script]);
    common::run_ok(&mut c, common::CLIENT_TIMEOUT);
}

/// The first block of `name` as qemu-io sees it: `Ok` when every byte is `fill`.
fn read_block(d: &Daemon, fill: u8) -> Result<(), String> {
    let mut c = Command::new("qemu-io");
    c.args([
        "-f",
        "raw",
        &d.uri(JOURNALED),
        "-c",
        &format!("read -P {fill} 0 {BLOCK_BYTES}"),
    ]);
    match common::run_with_timeout(&mut c, common::CLIENT_TIMEOUT) {
        Ok(out) if out.status.success() && !out.stdout.contains("fail") => Ok(()),
        Ok(out) => Err(out.describe()),
        Err(e) => Err(e),
    }
}

#[test]
fn lost_nvram_holds_the_volume_until_the_loss_is_accepted() {
    if !common::require_nbdsh() || !common::require_tool("qemu-io") {
        return;
    }
    let mut d = Daemon::start(spec());
    // No read-back here: qemu-io flushes at exit, which would run a CP and apply the write.
    write_unflushed(&d, 0x5a);
    let show = ok(
        &d,
        serde_json::json!({"op": "volume_show", "name": JOURNALED}),
    );
    let applied = show["journal"]["applied_seq"].as_u64().unwrap();
    assert!(
        show["journal"]["dirty_bytes"].as_u64().unwrap() >= BLOCK_BYTES,
        "the write should still be only in the log: {show}"
    );

    // The power cut: the process dies, the NVRAM file (RAM) is gone, the disks keep theirs.
    d.kill_hard();
    std::fs::remove_file(d.dir().join(format!("{JOURNALED}.nvram"))).unwrap();
    d.restart();

    let status = ok(&d, serde_json::json!({"op": "status"}));
    let held = &status["volumes_held"][0];
    assert_eq!(held["name"], JOURNALED, "{status}");
    assert_eq!(held["loss"]["first_lost_seq"], applied + 1, "{status}");
    assert_eq!(held["loss"]["cause"], "missing_or_blank", "{status}");
    assert_eq!(held["loss"]["medium_survives_power_loss"], false);
    assert!(held["remedy"]
        .as_str()
        .unwrap()
        .contains("twinctl journal accept-loss j0"));
    assert!(
        !status["volumes"].to_string().contains(JOURNALED),
        "a held volume is not served: {status}"
    );
    assert!(read_block(&d, 0x5a).is_err(), "the held volume answered");
    let log = d.log();
    assert!(
        log.contains(&format!(
            "acknowledged writes with seq {} and later may be lost",
            applied + 1
        )) && log.contains("does not survive a loss of power"),
        "log:\n{log}"
    );

    // A refused command changes nothing.
    let before = ok(&d, serde_json::json!({"op": "status"}));
    let refused = admin(
        &d,
        serde_json::json!({"op": "journal_accept_loss", "name": "vol0"}),
    );
    assert_eq!(refused["ok"], false, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("not waiting for an NVRAM loss"),
        "{refused}"
    );
    let after = ok(&d, serde_json::json!({"op": "status"}));
    assert_eq!(before["volumes"], after["volumes"]);
    assert_eq!(before["volumes_held"], after["volumes_held"]);

    // Accepted: it serves on a new log; the unapplied write is the loss that was accepted.
    let accepted = ok(
        &d,
        serde_json::json!({"op": "journal_accept_loss", "name": JOURNALED}),
    );
    assert!(accepted["message"]
        .as_str()
        .unwrap()
        .contains("serves again"));
    read_block(&d, 0).unwrap();
    write_unflushed(&d, 0x33);
    let show = ok(
        &d,
        serde_json::json!({"op": "volume_show", "name": JOURNALED}),
    );
    let events: Vec<&str> = show["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect();
    assert!(events.contains(&"nvram-loss-detected"), "{show}");
    assert!(events.contains(&"nvram-loss-accepted"), "{show}");
    let status = ok(&d, serde_json::json!({"op": "status"}));
    assert!(status.get("volumes_held").is_none(), "{status}");

    // The new log is the array's journal now: a crash with the file intact loses nothing (the
    // 0x33 write is still only in the log: replayed at the restart).
    d.kill_hard();
    d.restart();
    read_block(&d, 0x33).unwrap();
    let status = ok(&d, serde_json::json!({"op": "status"}));
    assert!(status.get("volumes_held").is_none(), "{status}");
}

#[test]
fn lost_nvram_after_a_clean_stop_serves_at_once() {
    if !common::require_nbdsh() || !common::require_tool("qemu-io") {
        return;
    }
    let mut d = Daemon::start(spec());
    write_unflushed(&d, 0x44);
    assert!(d.stop().is_some_and(|s| s.success()), "clean stop failed");
    std::fs::remove_file(d.dir().join(format!("{JOURNALED}.nvram"))).unwrap();
    d.restart();
    let status = ok(&d, serde_json::json!({"op": "status"}));
    assert!(status.get("volumes_held").is_none(), "{status}");
    read_block(&d, 0x44).unwrap();
}
