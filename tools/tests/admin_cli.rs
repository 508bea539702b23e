//! `twinctl` against a running `twinblockd`: an operator fails a disk of a journaled RAID-5
//! volume, replaces it, watches the rebuild, scrubs, and mistypes commands; the data written
//! over NBD reads back unchanged throughout.

#[path = "../../tests/support/nbd_client.rs"]
mod nbd_client;

mod common;

use common::{ctl, ctl_json, ctl_ok, start_raid5, twinctl, Daemon};
use nbd_client::Client;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const DATA_BYTES: usize = 8 << 20;

fn start(dir: &Path) -> (Daemon, SocketAddr, PathBuf) {
    let (d, addr, sock) = start_raid5(dir, "");
    (d, addr.parse().unwrap(), sock)
}

fn pattern() -> Vec<u8> {
    (0..DATA_BYTES)
        .map(|i| (i as u32).wrapping_mul(2_654_435_761).to_le_bytes()[i % 4] ^ (i >> 12) as u8)
        .collect()
}

fn check_data(addr: SocketAddr, want: &[u8], when: &str) {
    let mut c = Client::connect(addr, "r5").unwrap();
    for (i, chunk) in want.chunks(1 << 20).enumerate() {
        let got = c.read((i << 20) as u64, chunk.len() as u32).unwrap();
        assert!(
            got == chunk,
            "{when}: MiB {i} of the volume differs from what was written"
        );
    }
}

#[test]
fn operator_fails_replaces_rebuilds_and_scrubs_without_losing_data() {
    let dir = tempfile::tempdir().unwrap();
    let (_daemon, addr, sock) = start(dir.path());

    let list = ctl_ok(&sock, &["volume", "list"]);
    assert!(list.contains("r5") && list.contains("optimal"), "{list}");

    let data = pattern();
    let mut c = Client::connect(addr, "r5").unwrap();
    for (i, chunk) in data.chunks(1 << 20).enumerate() {
        c.write((i << 20) as u64, chunk, false).unwrap();
    }
    c.flush().unwrap();
    // Let a consistency point move the journal into the array.
    std::thread::sleep(Duration::from_millis(500));

    let show = ctl_json(&sock, &["volume", "show", "r5"]);
    assert_eq!(show["array"]["level"], "raid5", "{show}");
    assert_eq!(show["state"], "optimal");

    ctl_ok(&sock, &["disk", "fail", "md0", "d1.img"]);
    let show = ctl_json(&sock, &["volume", "show", "r5"]);
    assert_eq!(show["state"], "degraded", "{show}");
    check_data(addr, &data, "degraded after failing d1.img");

    ctl_ok(&sock, &["disk", "replace", "md0", "d1.img", "d4.img"]);
    // Not a terminal: plain progress lines, returns when the rebuild is done.
    let watch = ctl_ok(&sock, &["rebuild", "status", "--watch"]);
    assert!(watch.contains("no rebuild running"), "{watch}");
    let show = ctl_json(&sock, &["volume", "show", "r5"]);
    assert_eq!(show["state"], "optimal", "{show}");
    let members = show["array"]["members"].to_string();
    assert!(
        members.contains("d4.img") && !members.contains("d1.img"),
        "{members}"
    );
    check_data(addr, &data, "after rebuilding onto d4.img");

    ctl_ok(&sock, &["scrub", "start", "md0"]);
    let t = Instant::now();
    let scrub = loop {
        let s = ctl_json(&sock, &["scrub", "status"]);
        if s[0]["state"] != "running" {
            break s;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "scrub did not finish"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(scrub[0]["state"], "done", "{scrub}");
    assert_eq!(scrub[0]["mismatches"], 0, "{scrub}");

    // A disk added to an array with a faulty member is rebuilt into its place, as md does.
    ctl_ok(&sock, &["disk", "fail", "md0", "d2.img"]);
    let added = ctl_ok(&sock, &["disk", "add", "md0", "d5.img"]);
    assert!(added.contains("added as rebuilding in slot 2"), "{added}");
    ctl_ok(&sock, &["rebuild", "status", "--watch"]);
    let show = ctl_json(&sock, &["volume", "show", "r5"]);
    assert_eq!(show["state"], "optimal", "{show}");
    check_data(addr, &data, "after rebuilding onto d5.img");

    // Mistakes get a clear refusal and change nothing.
    let out = ctl(&sock, &["disk", "fail", "md0", "nosuch.img"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no member `nosuch.img`"));
    let out = ctl(&sock, &["volume", "show", "nosuch"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no volume named `nosuch`"));
    let out = ctl(&sock, &["scrub", "start", "md9"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no array named `md9`"));
    assert_eq!(
        ctl_json(&sock, &["volume", "show", "r5"])["state"],
        "optimal"
    );
    check_data(addr, &data, "at the end");
}

#[test]
fn twinctl_without_a_daemon_says_how_to_reach_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = ctl(&dir.path().join("none.sock"), &["status"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach twinblockd") && err.contains("--socket"),
        "{err}"
    );
}

#[test]
fn journal_dump_reports_a_foreign_file_without_failing() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("garbage.nvram");
    std::fs::write(&f, vec![0xA5u8; 64 * 1024]).unwrap();
    let out = Command::new(twinctl())
        .args(["journal", "dump"])
        .arg(&f)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("header error"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
