//! `twinctl disk reservation ...` run as a binary on lock files in a temp directory, with no
//! daemon: the operator's register / reserve / show / preempt / release / clear walk, human and
//! `--json` output, exit codes, refusals that leave the file byte-identical, corruption
//! recovery, and two racing processes.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::thread;

const NODE0: &str = "0x5442000000000000";
const NODE1: &str = "0x5442000000000001";

fn twinctl() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_twinctl"))
}

fn resv(dir: &Path, args: &[&str]) -> Output {
    Command::new(twinctl())
        .current_dir(dir)
        .arg("disk")
        .arg("reservation")
        .args(args)
        .output()
        .expect("run twinctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Run and require success.
fn ok(dir: &Path, args: &[&str]) -> String {
    let o = resv(dir, args);
    assert!(
        o.status.success(),
        "{args:?} failed: {}{}",
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

fn ok_json(dir: &Path, args: &[&str]) -> Value {
    let mut a = args.to_vec();
    a.push("--json");
    serde_json::from_str(&ok(dir, &a)).expect("--json output is JSON")
}

/// A temp dir holding an (empty) disk image `d0.img`.
fn disk() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("d0.img"), b"").unwrap();
    dir
}

fn lock_bytes(dir: &Path) -> Vec<u8> {
    std::fs::read(dir.join("d0.img.resv")).unwrap()
}

#[test]
fn operator_walk_through_every_command() {
    let d = disk();
    let dir = d.path();
    let shown = ok(dir, &["show", "d0.img"]);
    assert!(shown.contains("absent: no keys, no reservation"), "{shown}");

    ok(dir, &["register", "d0.img", "--key", NODE0]);
    // NODE1 given in decimal is the same key.
    let dec = u64::from_str_radix(&NODE1[2..], 16).unwrap().to_string();
    ok(dir, &["register", "d0.img", "--key", &dec]);
    let out = ok(dir, &["reserve", "d0.img", "--key", NODE0]);
    assert!(out.contains("reserve: done (generation 2 -> 3)"), "{out}");

    let shown = ok(dir, &["show", "d0.img"]);
    assert!(
        shown.contains(
            "reservation       write-exclusive-registrants-only, held by 0x5442000000000000"
        ),
        "{shown}"
    );
    assert!(shown.contains("0x5442000000000000  yes"), "{shown}");
    assert!(shown.contains("0x5442000000000001  -"), "{shown}");

    let v = ok_json(dir, &["show", "d0.img"]);
    assert_eq!(v["generation"], 3);
    assert_eq!(v["exists"], true);
    assert_eq!(v["reservation"]["holder"], NODE0);
    assert_eq!(v["reservation"]["type"], "write-exclusive-registrants-only");
    assert_eq!(v["keys"], serde_json::json!([NODE0, NODE1]));

    let v = ok_json(
        dir,
        &["preempt", "d0.img", "--key", NODE1, "--victim", NODE0],
    );
    assert_eq!(v["op"], "preempt");
    assert_eq!(v["changed"], true);
    assert_eq!(v["reservation"]["holder"], NODE1);
    assert_eq!(v["keys"], serde_json::json!([NODE1]));

    let v = ok_json(dir, &["release", "d0.img", "--key", NODE1]);
    assert_eq!(v["reservation"], Value::Null);
    let v = ok_json(dir, &["release", "d0.img", "--key", NODE1]);
    assert_eq!(v["changed"], false, "a second release is a no-op");

    ok(dir, &["unregister", "d0.img", "--key", NODE1]);
    ok(dir, &["register", "d0.img", "--key", NODE0]);
    let v = ok_json(dir, &["clear", "d0.img"]);
    assert_eq!(v["keys"], serde_json::json!([]));
    assert_eq!(v["generation"], 8);
}

#[test]
fn refused_commands_fail_and_leave_the_file_byte_identical() {
    let d = disk();
    let dir = d.path();
    ok(dir, &["register", "d0.img", "--key", NODE0]);
    ok(dir, &["register", "d0.img", "--key", NODE1]);
    ok(dir, &["reserve", "d0.img", "--key", NODE0]);
    let before = lock_bytes(dir);
    let refused: &[(&[&str], &str)] = &[
        (
            &["reserve", "d0.img", "--key", NODE1],
            "reservation conflict",
        ),
        (
            &["release", "d0.img", "--key", NODE1],
            "reservation conflict",
        ),
        (
            &["preempt", "d0.img", "--key", "0x99", "--victim", NODE0],
            "not registered",
        ),
        (&["unregister", "d0.img", "--key", "0x99"], "not registered"),
        (&["clear", "d0.img"], "--force"),
        (&["clear", "d0.img", "--key", NODE1], "--force"),
        (&["register", "d0.img", "--key", "0"], "key 0"),
        (&["register", "d0.img", "--key", "0xZZ"], "not a key"),
        (&["reserve", "d0.img"], "--key"),
    ];
    for (args, says) in refused {
        let o = resv(dir, args);
        assert!(!o.status.success(), "{args:?} succeeded");
        assert!(stderr(&o).contains(says), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).is_empty(), "{args:?} printed {}", stdout(&o));
        assert_eq!(lock_bytes(dir), before, "{args:?} changed the file");
    }
    let o = resv(dir, &["reserve", "d0.img", "--key", NODE1]);
    assert_eq!(o.status.code(), Some(1));
}

#[test]
fn clear_with_force_drops_a_held_reservation() {
    let d = disk();
    let dir = d.path();
    ok(dir, &["register", "d0.img", "--key", NODE0]);
    ok(dir, &["reserve", "d0.img", "--key", NODE0]);
    let out = ok(dir, &["clear", "d0.img", "--force"]);
    assert!(
        out.contains("dropped the reservation of 0x5442000000000000"),
        "{out}"
    );
    let v = ok_json(dir, &["show", "d0.img"]);
    assert_eq!(v["reservation"], Value::Null);
    assert_eq!(v["keys"], serde_json::json!([]));
}

#[test]
fn corrupt_file_is_refused_until_forced_clear() {
    let d = disk();
    let dir = d.path();
    ok(dir, &["register", "d0.img", "--key", NODE0]);
    let mut bytes = lock_bytes(dir);
    bytes[33] ^= 0x40;
    std::fs::write(dir.join("d0.img.resv"), &bytes).unwrap();
    for args in [
        &["show", "d0.img"][..],
        &["register", "d0.img", "--key", NODE1],
        &["clear", "d0.img"],
    ] {
        let o = resv(dir, args);
        assert!(!o.status.success(), "{args:?} accepted a corrupt file");
        let err = stderr(&o);
        assert!(err.contains("d0.img.resv is corrupt"), "{args:?}: {err}");
        assert_eq!(lock_bytes(dir), bytes, "{args:?} changed a corrupt file");
    }
    let v = ok_json(dir, &["clear", "d0.img", "--force"]);
    assert!(v["recovered_corrupt"].as_str().unwrap().contains("CRC32C"));
    assert_eq!(v["generation"], 2);
    ok(dir, &["register", "d0.img", "--key", NODE1]);
}

#[test]
fn mistyped_disk_is_refused_and_creates_nothing() {
    let d = disk();
    let dir = d.path();
    let o = resv(dir, &["register", "d9.img", "--key", NODE0]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("no such disk image"), "{}", stderr(&o));
    assert!(!dir.join("d9.img.resv").exists());
}

#[test]
fn lock_file_path_is_accepted_directly() {
    let d = disk();
    let dir = d.path();
    ok(dir, &["register", "d0.img", "--key", NODE0]);
    let v = ok_json(dir, &["show", "d0.img.resv"]);
    assert_eq!(v["keys"], serde_json::json!([NODE0]));
}

/// Each racer: register, then alternately reserve and preempt the other, then release. Returns
/// the generation every successful change wrote.
fn racer(dir: PathBuf, me: &'static str, other: &'static str, rounds: usize) -> Vec<u64> {
    let mut written = Vec::new();
    for i in 0..rounds {
        let step: Vec<&str> = match i % 3 {
            0 => vec!["register", "d0.img", "--key", me],
            1 => vec!["preempt", "d0.img", "--key", me, "--victim", other],
            _ => vec!["release", "d0.img", "--key", me],
        };
        let mut args = step.clone();
        args.push("--json");
        let o = resv(&dir, &args);
        if !o.status.success() {
            assert!(
                stderr(&o).contains("not registered") || stderr(&o).contains("conflict"),
                "{step:?}: {}",
                stderr(&o)
            );
            continue;
        }
        let v: Value = serde_json::from_str(&stdout(&o)).unwrap();
        if v["changed"] == true {
            written.push(v["generation"].as_u64().unwrap());
        }
    }
    written
}

#[test]
fn two_racing_processes_never_lose_an_update() {
    let d = disk();
    let dir = d.path().to_path_buf();
    let (d0, d1) = (dir.clone(), dir.clone());
    let a = thread::spawn(move || racer(d0, NODE0, NODE1, 24));
    let b = thread::spawn(move || racer(d1, NODE1, NODE0, 24));
    let mut all = a.join().unwrap();
    all.extend(b.join().unwrap());
    all.sort_unstable();
    // Every change wrote a distinct generation and together they count up from 1 to the final
    // one: the processes' updates were serialized, none based on a stale read.
    let last = ok_json(&dir, &["show", "d0.img"])["generation"]
        .as_u64()
        .unwrap();
    assert_eq!(all, (1..=last).collect::<Vec<_>>());
}
