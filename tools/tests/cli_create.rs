//! `twinctl create`: one step that makes a node's (or a new pair's) images and arrays through the
//! node's own creation path, after which the daemon starts on them without `create = true`.
//! Refusals (a disk holding another format, existing config files) exit non-zero with one line
//! and leave every file as it was; a failure part way undoes what the command had written.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};

/// Every file under `dir` (recursively) with its length and contents' hash.
fn files(dir: &Path) -> BTreeMap<String, (u64, u64)> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files(&p));
            continue;
        }
        let data = std::fs::read(&p).unwrap_or_default();
        let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
        });
        out.insert(p.display().to_string(), (data.len() as u64, h));
    }
    out
}

fn create(args: &[&str]) -> Output {
    Command::new(twinctl())
        .args(args)
        .env("NO_COLOR", "1")
        .output()
        .unwrap()
}

fn create_ok(args: &[&str]) -> String {
    let out = create(args);
    assert!(out.status.success(), "twinctl {args:?}: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a create that must be refused: non-zero, nothing on stdout, one stderr line with `why`.
fn create_refused(args: &[&str], why: &str) {
    let out = create(args);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "twinctl {args:?} was accepted");
    assert!(out.stdout.is_empty(), "twinctl {args:?}: {}", text(&out));
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    assert!(
        err.starts_with("twinctl: create: ") && err.contains(why),
        "{err}"
    );
    assert_human(&err, &format!("twinctl {args:?}"));
}

/// An md v1.2 superblock at 4 KiB of a 40 MiB image (what an md member looks like).
fn md_member(path: &Path) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(40 << 20).unwrap();
    let mut sb = 0xa92b_4efcu32.to_le_bytes().to_vec();
    sb.extend_from_slice(&1u32.to_le_bytes());
    f.write_all_at(&sb, 4096).unwrap();
}

/// The test node's config as an operator would write it for `create`: no `create = true`.
fn node_config(dir: &Path) -> (std::path::PathBuf, String) {
    let addr = free_addr();
    let cfg = raid5_config(dir, &addr, "");
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("create = true\n", "");
    std::fs::write(&cfg, text).unwrap();
    (cfg, addr)
}

#[test]
fn create_makes_the_array_the_daemon_then_assembles_and_a_second_run_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, addr) = node_config(dir.path());
    let cfg_s = cfg.to_str().unwrap();
    let human = create_ok(&["--config", cfg_s, "create"]);
    assert_human(&human, "twinctl create");
    for want in [
        "created image",
        "d3.img",
        "created array md0 (RAID 5",
        "MiB",
    ] {
        assert!(human.contains(want), "no `{want}` in:\n{human}");
    }
    let before = files(dir.path());
    let again: serde_json::Value =
        serde_json::from_str(&create_ok(&["--config", cfg_s, "--json", "create"])).unwrap();
    assert_eq!(
        again["arrays_existing"],
        serde_json::json!(["md0"]),
        "{again}"
    );
    assert_eq!(again["arrays"], serde_json::json!([]), "{again}");
    assert_eq!(again["images"], serde_json::json!([]), "{again}");
    assert_eq!(files(dir.path()), before, "a second create changed files");
    // The config has no `create = true`: the node starts only because the array exists.
    let d = start_daemon(&cfg, &addr, &dir.path().join("daemon.log"));
    let sock = dir.path().join("admin.sock");
    assert_eq!(
        ctl_json(&sock, &["volume", "show", "r5"])["state"],
        "optimal"
    );
    d.stop();
}

#[test]
fn create_on_a_disk_holding_md_metadata_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (cfg, _addr) = node_config(dir.path());
    md_member(&dir.path().join("d2.img"));
    let before = files(dir.path());
    let cfg_s = cfg.to_str().unwrap();
    for json in [false, true] {
        let mut args = vec!["--config", cfg_s];
        if json {
            args.push("--json");
        }
        args.push("create");
        create_refused(&args, "d2.img holds an md RAID superblock");
        assert_eq!(files(dir.path()), before, "twinctl {args:?} changed files");
    }
}

#[test]
fn create_without_a_config_or_with_a_missing_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    create_refused(&["--socket", "/nonexistent/x.sock", "create"], "--config");
    let (cfg, _addr) = node_config(dir.path());
    let text = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"d3.img\"", "\"nosuch/d3.img\"");
    std::fs::write(&cfg, text).unwrap();
    let before = files(dir.path());
    create_refused(&["--config", cfg.to_str().unwrap(), "create"], "nosuch");
    assert_eq!(files(dir.path()), before);
    assert!(!dir.path().join("nosuch").exists());
}

#[test]
fn create_pair_writes_both_configs_and_their_storage_and_the_configs_check() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let port = free_demo_base_port().to_string();
    let out: serde_json::Value = serde_json::from_str(&create_ok(&[
        "--json",
        "create",
        "--pair",
        d,
        "--port",
        &port,
        "--disk-size",
        "16MiB",
        "--nvram-dir",
        d,
    ]))
    .unwrap();
    assert_eq!(out["configs"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(out["arrays"].as_array().unwrap().len(), 2, "{out}");
    assert_eq!(out["images"].as_array().unwrap().len(), 8, "{out}");
    assert_eq!(out["arrays"][1]["members"].as_array().unwrap().len(), 4);
    let n0 = dir.path().join("node0.toml");
    let n1 = dir.path().join("node1.toml");
    let check = Command::new(twinblockd())
        .arg("--config")
        .arg(&n0)
        .arg("--check-partner")
        .arg(&n1)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    let check = Command::new(twinblockd())
        .arg("--config")
        .arg(&n1)
        .arg("--check")
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    // Existing configs are never overwritten.
    let before = files(dir.path());
    create_refused(
        &["create", "--pair", d, "--port", &port],
        "node0.toml exists",
    );
    assert_eq!(files(dir.path()), before);
}

#[test]
fn create_pair_refused_part_way_takes_its_config_files_back() {
    let dir = tempfile::tempdir().unwrap();
    md_member(&dir.path().join("n1-2.img"));
    let before = files(dir.path());
    let d = dir.path().to_str().unwrap();
    create_refused(
        &[
            "create",
            "--pair",
            d,
            "--disk-size",
            "16MiB",
            "--nvram-dir",
            d,
        ],
        "n1-2.img holds an md RAID superblock",
    );
    assert_eq!(files(dir.path()), before, "configs or key left behind");
}

#[test]
fn create_with_a_partner_config_of_no_pair_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let (cfg, _addr) = node_config(dir.path());
    let (partner, _addr) = node_config(other.path());
    let before = (files(dir.path()), files(other.path()));
    create_refused(
        &[
            "--config",
            cfg.to_str().unwrap(),
            "create",
            "--partner",
            partner.to_str().unwrap(),
        ],
        "not the two nodes of one pair",
    );
    assert_eq!((files(dir.path()), files(other.path())), before);
}
