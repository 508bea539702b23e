//! Operator mistakes against a running `twinblockd` and with `--check`: every refused command
//! exits non-zero with one clear line and leaves the array exactly as it was (status, member
//! list, every disk's superblock, the files in the data directory); disks holding another format
//! are never turned into an array; paths never create directories; `--check` opens the files a
//! config names and only approves configs that start.

mod common;

use common::{ctl, free_addr, start_daemon, text, twinblockd, Daemon, READY_TIMEOUT};
use std::collections::BTreeSet;
use std::fs::File;
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const DISK_BYTES: u64 = 40 << 20;
const SUPERBLOCK_BYTES: usize = 4096;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A node config serving RAID 5 array `md0` over `disks` (relative to `dir`) as volume `r5`.
fn raid5_config(dir: &Path, addr: &str, disks: &[&str], extra: &str) -> PathBuf {
    let list = disks
        .iter()
        .map(|d| format!("\"{d}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let config = format!(
        "[node]\nid = 0\ndata_dir = \"{dir}\"\n[nbd]\nlisten = [\"{addr}\"]\n\
         [[array]]\nname = \"md0\"\nlevel = 5\nchunk = \"64KiB\"\ndisks = [{list}]\ncreate = true\n{extra}\n\
         [[volume]]\nname = \"r5\"\narray = \"md0\"\n",
        dir = dir.display()
    );
    let cfg = dir.join("node0.toml");
    std::fs::write(&cfg, config).unwrap();
    cfg
}

fn run_daemon(cfg: &Path, log: &Path) -> Child {
    Command::new(twinblockd())
        .arg("--config")
        .arg(cfg)
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap())
        .spawn()
        .unwrap()
}

fn start(dir: &Path) -> (Daemon, PathBuf) {
    let addr = free_addr();
    let cfg = raid5_config(
        dir,
        &addr,
        &["d0.img", "d1.img", "d2.img", "d3.img"],
        "disk_size = \"40MiB\"",
    );
    let d = start_daemon(&cfg, &addr, &dir.join("daemon.log"));
    (d, dir.join("admin.sock"))
}

/// Runs a daemon that must refuse to start; returns its log.
fn start_refused(cfg: &Path, dir: &Path) -> String {
    let log = dir.join("refused.log");
    let mut child = run_daemon(cfg, &log);
    let t = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if t.elapsed() > READY_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("twinblockd started although it should have refused the config");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    std::fs::read_to_string(&log).unwrap()
}

fn check(cfg: &Path) -> Output {
    Command::new(twinblockd())
        .arg("--config")
        .arg(cfg)
        .arg("--check")
        .output()
        .unwrap()
}

/// Everything a refused command must leave as it was.
#[derive(Debug, PartialEq)]
struct State {
    array: serde_json::Value,
    superblocks: Vec<Vec<u8>>,
    files: BTreeSet<String>,
}

fn state(dir: &Path, sock: &Path) -> State {
    let out = ctl(sock, &["--json", "volume", "show", "r5"]);
    assert!(out.status.success(), "{}", text(&out));
    let show: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let mut array = show["array"].clone();
    array.as_object_mut().unwrap().remove("rebuild");
    let mut files = BTreeSet::new();
    let mut superblocks = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".img") {
            let mut sb = vec![0u8; SUPERBLOCK_BYTES];
            File::open(&p).unwrap().read_exact_at(&mut sb, 0).unwrap();
            superblocks.push(sb);
        }
        files.insert(name);
    }
    State {
        array,
        superblocks,
        files,
    }
}

/// Runs `args`, which must be refused with a message containing `why`, and checks that nothing
/// changed.
fn refused(dir: &Path, sock: &Path, args: &[&str], why: &str) {
    let before = state(dir, sock);
    let out = ctl(sock, args);
    assert!(!out.status.success(), "twinctl {args:?} was accepted");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(why), "twinctl {args:?}: {err}");
    assert_eq!(
        state(dir, sock),
        before,
        "twinctl {args:?} changed the array"
    );
}

#[test]
fn replace_with_a_disk_already_in_the_array_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, sock) = start(dir.path());
    refused(
        dir.path(),
        &sock,
        &["disk", "replace", "md0", "d0.img", "d1.img"],
        "already in the array",
    );
    let show = state(dir.path(), &sock);
    assert_eq!(show.array["degraded"], false, "{:?}", show.array);
}

#[test]
fn replace_of_a_disk_by_itself_is_refused_under_any_path() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, sock) = start(dir.path());
    let abs = dir.path().join("d0.img").display().to_string();
    let dotted = format!("{}/./d0.img", dir.path().display());
    let link = dir.path().join("alias-of-d0");
    std::os::unix::fs::symlink(dir.path().join("d0.img"), &link).unwrap();
    let link = link.display().to_string();
    for new in ["d0.img", abs.as_str(), dotted.as_str(), link.as_str()] {
        refused(
            dir.path(),
            &sock,
            &["disk", "replace", "md0", "d0.img", new],
            "with itself",
        );
    }
}

#[test]
fn replace_that_would_fail_the_degraded_array_changes_nothing_and_creates_no_image() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, sock) = start(dir.path());
    let out = ctl(&sock, &["disk", "fail", "md0", "d1.img"]);
    assert!(out.status.success(), "{}", text(&out));
    refused(
        dir.path(),
        &sock,
        &["disk", "replace", "md0", "d2.img", "new.img"],
        "would fail",
    );
    assert!(!dir.path().join("new.img").exists());
}

#[test]
fn add_in_a_missing_directory_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, sock) = start(dir.path());
    let missing = dir.path().join("no-such-dir");
    let target = missing.join("x.img").display().to_string();
    refused(
        dir.path(),
        &sock,
        &["disk", "add", "md0", &target],
        "does not exist",
    );
    assert!(!missing.exists(), "the directory was created");
    refused(
        dir.path(),
        &sock,
        &["disk", "add", "md0", "/nonexistent/dir/x.img"],
        "does not exist",
    );
    assert!(!Path::new("/nonexistent").exists());
}

#[test]
fn add_of_a_disk_smaller_than_the_members_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, sock) = start(dir.path());
    File::create(dir.path().join("small.img"))
        .unwrap()
        .set_len(DISK_BYTES / 2)
        .unwrap();
    refused(
        dir.path(),
        &sock,
        &["disk", "add", "md0", "small.img"],
        "at least",
    );
}

#[test]
fn add_of_a_disk_holding_a_filesystem_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, sock) = start(dir.path());
    let f = File::create(dir.path().join("fs.img")).unwrap();
    f.set_len(DISK_BYTES).unwrap();
    f.write_all_at(b"_BHRfS_M", 65536 + 64).unwrap();
    refused(
        dir.path(),
        &sock,
        &["disk", "add", "md0", "fs.img"],
        "btrfs",
    );
}

/// Blank images of `sizes`, named d0.img, d1.img, ...
fn images(dir: &Path, sizes: &[u64]) -> Vec<String> {
    sizes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let name = format!("d{i}.img");
            File::create(dir.join(&name)).unwrap().set_len(*s).unwrap();
            name
        })
        .collect()
}

fn read_all(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

#[test]
fn array_is_not_created_over_an_md_member_or_a_btrfs_disk() {
    // (disk, offset, magic, what the refusal names)
    let cases: [(usize, u64, &[u8], &str); 2] = [
        (
            2,
            4096,
            &[0xfc, 0x4e, 0x2b, 0xa9, 1, 0, 0, 0],
            "md RAID superblock (v1.2)",
        ),
        (1, 65536 + 64, b"_BHRfS_M", "btrfs"),
    ];
    for (disk, off, magic, what) in cases {
        let dir = tempfile::tempdir().unwrap();
        let names = images(dir.path(), &[DISK_BYTES; 4]);
        let target = dir.path().join(&names[disk]);
        let f = File::options().write(true).open(&target).unwrap();
        f.write_all_at(magic, off).unwrap();
        // Data in what would be the array's data area, which creation would discard.
        f.write_all_at(&[0x5a; 65536], 8 << 20).unwrap();
        drop(f);
        let before: Vec<Vec<u8>> = names
            .iter()
            .map(|n| read_all(&dir.path().join(n)))
            .collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let cfg = raid5_config(dir.path(), &free_addr(), &refs, "");

        let out = check(&cfg);
        assert_eq!(out.status.code(), Some(2), "{}", text(&out));
        assert!(
            text(&out).contains(&names[disk]) && text(&out).contains(what),
            "{}",
            text(&out)
        );

        let log = start_refused(&cfg, dir.path());
        assert!(log.contains(&names[disk]) && log.contains(what), "{log}");
        let after: Vec<Vec<u8>> = names
            .iter()
            .map(|n| read_all(&dir.path().join(n)))
            .collect();
        assert!(before == after, "a refused start changed the disks");
    }
}

#[test]
fn config_disk_in_a_missing_directory_fails_check_and_start_and_creates_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = raid5_config(
        dir.path(),
        &free_addr(),
        &["d0.img", "d1.img", "d2.img", "missing/d3.img"],
        "disk_size = \"40MiB\"",
    );
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("missing"), "{}", text(&out));
    let log = start_refused(&cfg, dir.path());
    assert!(log.contains("does not exist"), "{log}");
    assert!(
        !dir.path().join("missing").exists(),
        "the directory was created"
    );
}

#[test]
fn mixed_member_sizes_are_warned_with_the_space_lost() {
    let dir = tempfile::tempdir().unwrap();
    let names = images(dir.path(), &[64 << 20, 64 << 20, 64 << 20, 32 << 20]);
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let addr = free_addr();
    let cfg = raid5_config(dir.path(), &addr, &refs, "");
    let out = check(&cfg);
    assert!(out.status.success(), "{}", text(&out));
    let report = text(&out);
    assert!(
        report.contains("warning")
            && report.contains("differ in size")
            && report.contains("96 MiB"),
        "{report}"
    );
    // The config --check approved starts, and says the same in its log.
    let log = dir.path().join("daemon.log");
    let _d = Daemon(run_daemon(&cfg, &log));
    let t = Instant::now();
    while TcpStream::connect(&addr).is_err() {
        assert!(
            t.elapsed() < READY_TIMEOUT,
            "{}",
            std::fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("differ in size") && text.contains("96 MiB"),
        "{text}"
    );
}

#[test]
fn check_refuses_configs_that_would_not_start() {
    let dir = tempfile::tempdir().unwrap();
    let disks = ["d0.img", "d1.img", "d2.img"];
    // No images and no disk_size; then a disk_size too small for the member layout.
    for (extra, why) in [("", "`disk_size`"), ("disk_size = \"1KiB\"", "too small")] {
        let cfg = raid5_config(dir.path(), &free_addr(), &disks, extra);
        let out = check(&cfg);
        assert_eq!(out.status.code(), Some(2), "{extra}: {}", text(&out));
        assert!(text(&out).contains(why), "{extra}: {}", text(&out));
        let log = start_refused(&cfg, dir.path());
        assert!(log.contains(why), "{extra}: {log}");
        assert!(
            !dir.path().join("d0.img").exists(),
            "{extra}: a refused start created images"
        );
    }
    // Disks of another array.
    let other = tempfile::tempdir().unwrap();
    let cfg = raid5_config(other.path(), &free_addr(), &disks, "disk_size = \"40MiB\"");
    let out = check(&cfg);
    assert!(out.status.success(), "{}", text(&out));
    // Create the array once (as md0), then stop the node.
    let addr = free_addr();
    let cfg = raid5_config(other.path(), &addr, &disks, "disk_size = \"40MiB\"");
    let d = Daemon(run_daemon(&cfg, &other.path().join("daemon.log")));
    let t = Instant::now();
    while TcpStream::connect(&addr).is_err() {
        assert!(t.elapsed() < READY_TIMEOUT, "twinblockd did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    drop(d);
    let renamed = std::fs::read_to_string(&cfg)
        .unwrap()
        .replace("\"md0\"", "\"md7\"");
    std::fs::write(&cfg, renamed).unwrap();
    let out = check(&cfg);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("`md0`"), "{}", text(&out));
}

/// The first ```toml block of a markdown file.
fn toml_block(md: &str) -> String {
    let start = md.find("```toml\n").expect("a ```toml block") + "```toml\n".len();
    let len = md[start..].find("```").expect("the block ends");
    md[start..start + len].to_string()
}

#[test]
fn config_md_example_passes_check_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let example = toml_block(&std::fs::read_to_string(repo_root().join("docs/CONFIG.md")).unwrap());
    let cfg = dir.path().join("node.toml");
    std::fs::write(&cfg, &example).unwrap();
    // Some images exist already (blank, at the configured size); the others would be created.
    for name in ["d0.img", "d1.img", "e0.img"] {
        let size = if name.starts_with('d') {
            256 << 20
        } else {
            64 << 20
        };
        File::create(dir.path().join(name))
            .unwrap()
            .set_len(size)
            .unwrap();
    }
    let out = check(&cfg);
    assert!(out.status.success(), "{}\n{example}", text(&out));
    assert!(text(&out).contains("would be created"), "{}", text(&out));
}

#[test]
fn examples_node0_passes_check_where_the_readme_runs_it() {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    assert!(
        readme.contains("--config examples/node0.toml"),
        "README does not point at it"
    );
    let cfg = repo_root().join("examples/node0.toml");
    let out = check(&cfg);
    assert!(out.status.success(), "{}", text(&out));
    // And a copy elsewhere (as the README suggests) passes too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(&cfg, dir.path().join("node0.toml")).unwrap();
    let out = check(&dir.path().join("node0.toml"));
    assert!(out.status.success(), "{}", text(&out));
}
