//! Arrays assembled from what the disks say: a config naming its candidate disks by a pattern
//! survives membership changes made through the admin API (a hot spare taking a failed member's
//! slot, a `disk replace`) across a restart with the config unchanged; a config without
//! `create = true` never creates an array.

mod common;

use common::{free_addr, start_daemon as start, twinblockd, twinctl};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const REBUILD_TIMEOUT: Duration = Duration::from_secs(60);

/// RAID 5 `md0` over the candidates `disks/n0-*.img`; `create` adds `create = true` (four
/// members, images created at 40 MiB).
fn config(dir: &Path, addr: &str, create: bool) -> PathBuf {
    let create = if create {
        "create = true\nmembers = 4\ndisk_size = \"40MiB\"\n"
    } else {
        ""
    };
    let text = format!(
        "[node]\nid = 0\n[nbd]\nlisten = [\"{addr}\"]\n\
         [[array]]\nname = \"md0\"\nlevel = 5\nchunk = \"64KiB\"\ndisks = \"disks/n0-*.img\"\n\
         {create}\n[[volume]]\nname = \"r5\"\narray = \"md0\"\n"
    );
    let cfg = dir.join("node0.toml");
    std::fs::write(&cfg, text).unwrap();
    cfg
}

fn ctl(sock: &Path, args: &[&str]) -> Output {
    let out = Command::new(twinctl())
        .arg("--socket")
        .arg(sock)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "twinctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn array_json(sock: &Path) -> serde_json::Value {
    let out = ctl(sock, &["--json", "volume", "show", "r5"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["array"].clone()
}

/// Waits until the array is optimal with no rebuild running.
fn wait_optimal(sock: &Path) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let a = array_json(sock);
        let rebuilding = a["rebuild"]["running"].as_bool().unwrap_or(false);
        if a["degraded"] == false && !rebuilding {
            return a;
        }
        assert!(t.elapsed() < REBUILD_TIMEOUT, "array not optimal: {a}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// File names of the devices in the array's slots (spares excluded).
fn slot_members(a: &serde_json::Value) -> Vec<String> {
    a["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| !m["slot"].is_null())
        .map(|m| {
            let n = m["name"].as_str().unwrap_or("");
            Path::new(n)
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

#[test]
fn membership_changes_survive_a_restart_with_the_config_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("disks")).unwrap();
    let addr = free_addr();
    let cfg = config(dir.path(), &addr, true);
    let config_before = std::fs::read(&cfg).unwrap();
    let sock = dir.path().join("admin.sock");
    let log = dir.path().join("daemon.log");

    let d = start(&cfg, &addr, &log);
    wait_optimal(&sock);
    // A hot spare takes the slot of a failed member ...
    ctl(&sock, &["disk", "add", "md0", "disks/n0-4.img"]);
    ctl(&sock, &["disk", "fail", "md0", "n0-2.img"]);
    wait_optimal(&sock);
    // ... and a member is replaced by a new disk.
    ctl(
        &sock,
        &["disk", "replace", "md0", "n0-1.img", "disks/n0-5.img"],
    );
    let before = wait_optimal(&sock);
    let members = slot_members(&before);
    assert_eq!(members, ["n0-0.img", "n0-5.img", "n0-4.img", "n0-3.img"]);
    d.stop();

    let d = start(&cfg, &addr, &dir.path().join("daemon2.log"));
    let after = array_json(&sock);
    assert_eq!(after["degraded"], false, "{after}");
    assert_eq!(slot_members(&after), members, "{after}");
    let all: String = after["members"].to_string();
    assert!(
        !all.contains("n0-1.img") && !all.contains("n0-2.img"),
        "a replaced disk is used again: {after}"
    );
    d.stop();
    assert_eq!(std::fs::read(&cfg).unwrap(), config_before);
}

#[test]
fn without_create_blank_disks_are_not_made_an_array() {
    let dir = tempfile::tempdir().unwrap();
    let disks = dir.path().join("disks");
    std::fs::create_dir(&disks).unwrap();
    for i in 0..4 {
        File::create(disks.join(format!("n0-{i}.img")))
            .unwrap()
            .set_len(40 << 20)
            .unwrap();
    }
    let cfg = config(dir.path(), &free_addr(), false);
    let check = Command::new(twinblockd())
        .arg("--config")
        .arg(&cfg)
        .arg("--check")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&check.stderr).into_owned()
        + &String::from_utf8_lossy(&check.stdout);
    assert!(!check.status.success(), "--check approved: {text}");
    assert!(text.contains("create = true"), "{text}");
    let out = Command::new(twinblockd())
        .arg("--config")
        .arg(&cfg)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("none of its 4 candidate disks holds it"),
        "{err}"
    );
    for i in 0..4 {
        let mut head = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_exact_at(
            &File::open(disks.join(format!("n0-{i}.img"))).unwrap(),
            &mut head,
            0,
        )
        .unwrap();
        assert!(head.iter().all(|b| *b == 0), "disk {i} was written");
    }
}
