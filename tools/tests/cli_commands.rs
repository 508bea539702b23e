//! Every `twinctl` command against a running `twinblockd`, in both output forms: the human form
//! must read as text for people (units and words, no JSON, no Rust debug names), `--json` must
//! carry the reply fields `docs/OPERATIONS.md` lists. Mistakes (unknown volume, disk or array,
//! malformed arguments, HA commands on a node without a partner) exit non-zero with one line on
//! stderr and leave the node as it was.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

const REBUILD_TIMEOUT: Duration = Duration::from_secs(60);
/// Slow enough that a 36 MiB member rebuild is seen running, fast enough to keep the test short.
const SLOW_REBUILD: &str = "rebuild_rate = \"12MiB\"";

const VOLUME_FIELDS: &[&str] = &[
    "name",
    "description",
    "kind",
    "size",
    "read_only",
    "backing",
    "io_engine",
    "direct_io",
    "nvram",
    "state",
    "array",
    "journal",
    "journal_recovery",
    "stats",
];
const ARRAY_FIELDS: &[&str] = &[
    "name",
    "uuid",
    "level",
    "size_bytes",
    "chunk_bytes",
    "stripe_bytes",
    "members",
    "degraded",
    "failed",
    "events",
    "applied_seq",
    "rebuild",
    "mismatches",
    "scrub_running",
    "scrub_rows_checked",
    "scrub_rows_total",
    "bitmap_resync_regions",
    "unclean_resync_regions",
    "bitmap_dirty_regions",
    "bitmap_region_bytes",
];
const STATS_FIELDS: &[&str] = &[
    "connections_active",
    "connections_total",
    "read_ops",
    "read_bytes",
    "write_ops",
    "write_bytes",
    "flush_ops",
    "trim_ops",
    "zero_ops",
    "errors",
];
const SCRUB_FIELDS: &[&str] = &[
    "array",
    "state",
    "mode",
    "mismatches",
    "repaired",
    "rows_checked",
    "rows_total",
    "percent",
    "rate_bytes_per_s",
    "eta_s",
    "error",
];
const REBUILD_FIELDS: &[&str] = &[
    "array",
    "state",
    "target",
    "slot",
    "kind",
    "percent",
    "done_bytes",
    "total_bytes",
    "rate_bytes_per_s",
    "eta_s",
    "error",
];

fn member_states(sock: &Path) -> Vec<(String, String)> {
    let show = ctl_json(sock, &["volume", "show", "r5"]);
    show["array"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            // An empty slot (its member removed) has no name.
            let file = m["name"].as_str().map_or("-".into(), |name| {
                Path::new(name)
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            });
            (file, m["state"].as_str().unwrap().to_string())
        })
        .collect()
}

fn wait_rebuild_done(sock: &Path) {
    let t = Instant::now();
    while ctl_json(sock, &["rebuild", "status"])[0]["state"] == "rebuilding" {
        assert!(t.elapsed() < REBUILD_TIMEOUT, "rebuild did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn status_shows_node_in_words_and_documented_json_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, addr, sock) = start_raid5(dir.path(), "");
    let human = ctl_human(&sock, &["status"]);
    for want in ["node 0", "up ", &addr, "r5", "md0", "NVRAM", "msync"] {
        assert!(human.contains(want), "no `{want}` in:\n{human}");
    }
    let json = ctl_json(&sock, &["status"]);
    assert_keys(
        &json,
        &[
            "node_id",
            "name",
            "version",
            "admin_protocol",
            "uptime_s",
            "nbd_listen",
            "volumes",
            "arrays",
            "nvram",
        ],
        "status",
    );
    assert_keys(&json["nvram"], &["path", "persistence"], "status.nvram");
    assert_eq!(json["node_id"], 0);
    assert_eq!(json["volumes"], serde_json::json!(["r5"]));
    assert!(
        json.get("ha").is_none(),
        "a node without [ha] has no ha section: {json}"
    );
}

#[test]
fn volume_list_and_show_use_units_for_people_and_reply_fields_for_scripts() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, sock) = start_raid5(dir.path(), "");

    let list = ctl_human(&sock, &["volume", "list"]);
    let mut lines = list.lines();
    let header = lines.next().unwrap();
    for col in ["NAME", "SIZE", "STATE", "BACKING", "READ", "WRITTEN"] {
        assert!(header.contains(col), "no column {col}:\n{list}");
    }
    let row = lines.next().unwrap();
    assert!(
        row.starts_with("r5 ") && row.contains("108 MiB") && row.contains("optimal"),
        "{list}"
    );
    let json = ctl_json(&sock, &["volume", "list"]);
    assert_eq!(json.as_array().map(Vec::len), Some(1), "{json}");
    assert_keys(&json[0], VOLUME_FIELDS, "volume list");
    assert_keys(&json[0]["stats"], STATS_FIELDS, "volume list stats");

    let show = ctl_human(&sock, &["volume", "show", "r5"]);
    for want in [
        "volume r5",
        "108 MiB",
        "RAID 5",
        "chunk 64 KiB",
        "SLOT",
        "active",
        "d3.img",
        "journal:",
        "MiB log",
        "clients:",
    ] {
        assert!(show.contains(want), "no `{want}` in:\n{show}");
    }
    let json = ctl_json(&sock, &["volume", "show", "r5"]);
    assert_keys(&json, VOLUME_FIELDS, "volume show");
    assert_keys(&json["array"], ARRAY_FIELDS, "volume show array");
    assert_eq!(json["size"], 108u64 << 20);
    assert_eq!(json["array"]["chunk_bytes"], 64 << 10);
    assert_keys(
        &json["array"]["members"][0],
        &["slot", "name", "state"],
        "member",
    );
}

#[test]
fn disk_commands_and_rebuild_status_in_both_forms() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, sock) = start_raid5(dir.path(), SLOW_REBUILD);

    let idle = ctl_human(&sock, &["rebuild", "status"]);
    assert_eq!(idle.trim(), "md0  idle", "{idle}");
    let json = ctl_json(&sock, &["rebuild", "status"]);
    assert_eq!(
        json,
        serde_json::json!([{"array": "md0", "state": "idle", "degraded": false}])
    );

    let failed = ctl_human(&sock, &["disk", "fail", "md0", "d1.img"]);
    assert!(
        failed.contains("d1.img") && failed.contains("faulty"),
        "{failed}"
    );
    let degraded = ctl_human(&sock, &["rebuild", "status"]);
    assert!(degraded.contains("degraded"), "{degraded}");

    let removed = ctl_json(&sock, &["disk", "remove", "md0", "d1.img"]);
    assert_keys(&removed, &["message"], "disk remove");
    assert!(
        removed["message"].as_str().unwrap().contains("d1.img"),
        "{removed}"
    );
    assert!(!member_states(&sock).iter().any(|(n, _)| n == "d1.img"));

    // Added to a degraded array: rebuilt into the empty slot.
    let added = ctl_human(&sock, &["disk", "add", "md0", "d4.img"]);
    assert!(
        added.contains("d4.img") && added.contains("rebuilding"),
        "{added}"
    );
    let running = ctl_human(&sock, &["rebuild", "status"]);
    assert!(
        running.contains("md0  rebuilding") && running.contains('%') && running.contains("/s"),
        "{running}"
    );
    let json = ctl_json(&sock, &["rebuild", "status"]);
    assert_eq!(json[0]["state"], "rebuilding", "{json}");
    assert_keys(&json[0], REBUILD_FIELDS, "rebuild status");
    assert_eq!(json[0]["kind"], "full");
    // `--watch --json` prints one JSON document per poll until the rebuild ends.
    let watch = ctl_ok(&sock, &["--json", "rebuild", "status", "--watch"]);
    assert!(watch.lines().count() >= 1, "--watch --json printed nothing");
    for line in watch.lines() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("watch line is not JSON ({e}): {line}"));
        assert_eq!(v[0]["array"], "md0", "{line}");
    }
    wait_rebuild_done(&sock);
    assert!(member_states(&sock).iter().all(|(_, s)| s == "active"));

    // Added to an optimal array: a spare.
    let spare = ctl_json(&sock, &["disk", "add", "md0", "d5.img"]);
    assert_keys(&spare, &["message", "member"], "disk add");
    assert_keys(
        &spare["member"],
        &["slot", "name", "state"],
        "disk add member",
    );
    assert_eq!(spare["member"]["state"], "spare", "{spare}");

    let replaced = ctl_json(&sock, &["disk", "replace", "md0", "d2.img", "d6.img"]);
    assert_keys(&replaced, &["message", "member"], "disk replace");
    assert_eq!(replaced["member"]["slot"], 2, "{replaced}");
    let watch = ctl_human(&sock, &["rebuild", "status", "--watch"]);
    assert!(watch.contains("no rebuild running"), "{watch}");
    wait_rebuild_done(&sock);
    let states = member_states(&sock);
    assert!(
        states.contains(&("d6.img".into(), "active".into()))
            && !states.iter().any(|(n, _)| n == "d2.img"),
        "{states:?}"
    );

    let replaced = ctl_human(&sock, &["disk", "replace", "md0", "d3.img", "d7.img"]);
    assert!(replaced.contains("d7.img"), "{replaced}");
    wait_rebuild_done(&sock);

    let removed = ctl_human(&sock, &["disk", "remove", "md0", "d5.img"]);
    assert!(removed.contains("d5.img"), "{removed}");
    let states = member_states(&sock);
    assert!(!states.iter().any(|(n, _)| n == "d5.img"), "{states:?}");
    assert!(
        states.iter().filter(|(_, s)| s == "active").count() == 4,
        "{states:?}"
    );
}

#[test]
fn scrub_start_and_status_in_both_forms() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, sock) = start_raid5(dir.path(), "");

    let idle = ctl_human(&sock, &["scrub", "status"]);
    assert!(
        idle.starts_with("ARRAY") && idle.contains("md0") && idle.contains("idle"),
        "{idle}"
    );
    let json = ctl_json(&sock, &["scrub", "status"]);
    assert_keys(&json[0], SCRUB_FIELDS, "scrub status");
    assert_eq!(json[0]["state"], "idle");

    let started = ctl_human(&sock, &["scrub", "start", "md0"]);
    assert!(
        started.contains("md0") && started.contains("started"),
        "{started}"
    );
    let done = wait_scrub(&sock);
    assert_eq!(done["mode"], "check", "{done}");
    assert_eq!(done["mismatches"], 0, "{done}");
    assert_eq!(done["rows_checked"], done["rows_total"], "{done}");
    let human = ctl_human(&sock, &["scrub", "status"]);
    assert!(
        human.contains("done") && human.contains("check only") && human.contains("(100.0%)"),
        "{human}"
    );

    let started = ctl_json(&sock, &["scrub", "start", "md0", "--repair"]);
    assert_keys(&started, &["message"], "scrub start");
    assert!(
        started["message"].as_str().unwrap().contains("repair"),
        "{started}"
    );
    let done = wait_scrub(&sock);
    assert_eq!(done["mode"], "repair", "{done}");
    assert_eq!(done["repaired"], 0, "{done}");
    let human = ctl_human(&sock, &["scrub", "status"]);
    assert!(human.contains("repair"), "{human}");
}

fn wait_scrub(sock: &Path) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let s = ctl_json(sock, &["scrub", "status"]);
        if s[0]["state"] != "running" {
            assert_eq!(s[0]["state"], "done", "{s}");
            return s[0].clone();
        }
        assert!(t.elapsed() < REBUILD_TIMEOUT, "scrub did not finish");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn journal_dump_of_a_live_nodes_nvram_in_both_forms() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, _sock) = start_raid5(dir.path(), "");
    let nvram = dir.path().join("node0.nvram");
    let nvram = nvram.to_str().unwrap();
    // No daemon needed: the socket is not used.
    let none = dir.path().join("unused.sock");
    let human = ctl_ok(&none, &["journal", "dump", nvram]);
    for want in [
        "header: version 1 node 0",
        "own region",
        "partner region",
        "intact records",
    ] {
        assert!(human.contains(want), "no `{want}` in:\n{human}");
    }
    // Not `assert_human`: the dump is a diagnostic with the records' fields; but the scan's
    // stop reason is in words, and nothing is JSON or Rust debug output.
    assert!(human.contains("bytes never written"), "{human}");
    for debug in ["{\"", "Some(", "Blank", "Stale {", "Mirrored"] {
        assert!(!human.contains(debug), "`{debug}` in:\n{human}");
    }
    let json = ctl_json(&none, &["journal", "dump", nvram]);
    assert!(json.is_object(), "{json}");
    assert!(!json.as_object().unwrap().is_empty(), "{json}");
}

/// `twinctl journal dump FILE | head`: the reader goes away before twinctl writes; twinctl
/// ends (SIGPIPE, or success if its output was already in the pipe) instead of panicking in
/// `println!` with a backtrace, as it did while admin commands ran with SIGPIPE ignored.
#[test]
fn admin_command_whose_reader_went_away_ends_without_a_panic() {
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, _sock) = start_raid5(dir.path(), "");
    let nvram = dir.path().join("node0.nvram");
    let mut child = Command::new(twinctl())
        .args(["journal", "dump"])
        .arg(&nvram)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}

#[test]
fn ha_commands_on_a_node_without_a_pair_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, sock) = start_raid5(dir.path(), "");
    for cmd in [
        "takeover",
        "giveback",
        "takeover-disable",
        "takeover-enable",
    ] {
        refused(&sock, &[cmd], "not part of an HA pair");
    }
}

#[test]
fn accept_loss_of_a_volume_that_is_not_held_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, sock) = start_raid5(dir.path(), "");
    refused(
        &sock,
        &["journal", "accept-loss", "r5"],
        "volume `r5` is not waiting for an NVRAM loss to be accepted",
    );
    // An unknown name is named as unknown, with the volumes there are.
    refused(
        &sock,
        &["journal", "accept-loss", "nosuch"],
        "no volume named `nosuch` (volumes: r5)",
    );
}

#[test]
fn unknown_volume_disk_or_array_is_refused_in_one_line_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, sock) = start_raid5(dir.path(), "");
    refused(
        &sock,
        &["volume", "show", "nosuch"],
        "no volume named `nosuch`",
    );
    for cmd in ["fail", "remove"] {
        refused(
            &sock,
            &["disk", cmd, "md9", "d0.img"],
            "no array named `md9`",
        );
        refused(&sock, &["disk", cmd, "md0", "nosuch.img"], "nosuch.img");
    }
    refused(
        &sock,
        &["disk", "add", "md9", "d9.img"],
        "no array named `md9`",
    );
    refused(
        &sock,
        &["disk", "replace", "md9", "d0.img", "d9.img"],
        "no array named `md9`",
    );
    refused(
        &sock,
        &["disk", "replace", "md0", "nosuch.img", "d9.img"],
        "nosuch.img",
    );
    refused(&sock, &["disk", "remove", "md0", "d0.img"], "active");
    refused(&sock, &["scrub", "start", "md9"], "no array named `md9`");
    assert!(
        !dir.path().join("d9.img").exists(),
        "a refused command created an image"
    );
}

/// Malformed arguments never reach the daemon: one line names what is wrong and the usage, the
/// exit code is 2, and the node is unchanged.
#[test]
fn malformed_arguments_are_refused_before_reaching_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, sock) = start_raid5(dir.path(), "");
    let before = snapshot(&sock);
    let cases: &[(&[&str], &str)] = &[
        (&["disk", "fail", "md0"], "required"),
        (
            &["disk", "fail", "md0", "d0.img", "extra"],
            "unexpected argument",
        ),
        (&["volume", "show"], "required"),
        (&["volume", "frobnicate"], "unrecognized subcommand"),
        (&["volume", "lst"], "a similar subcommand exists: 'list'"),
        (&["scrub", "start", "md0", "--fix"], "unexpected argument"),
        (&["rebuild", "status", "--wach"], "unexpected argument"),
        (&["journal", "accept-loss"], "required"),
        (&["nosuch"], "unrecognized subcommand"),
    ];
    for (args, why) in cases {
        let out = ctl(&sock, args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "twinctl {args:?} was accepted");
        assert!(out.stdout.is_empty(), "twinctl {args:?}: {}", text(&out));
        assert_eq!(out.status.code(), Some(2), "twinctl {args:?}: {err}");
        assert_eq!(
            err.trim_end().lines().count(),
            1,
            "twinctl {args:?}: not one line: {err}"
        );
        assert!(
            err.starts_with("twinctl: ") && err.contains(why) && err.contains("(usage: twinctl "),
            "twinctl {args:?}: {err}"
        );
    }
    // A command group alone lists its commands (several lines, on stderr, exit 2).
    let out = ctl(&sock, &["volume"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("list") && err.contains("show"), "{err}");
    assert_eq!(snapshot(&sock), before);
}

/// Every command `twinctl --help` lists (recursively), with where it is driven against a
/// running daemon or, for the offline ones, against files.
const COVERED: &[(&str, &str)] = &[
    (
        "demo",
        "demo_failover.rs, cli_pair.rs (the pair every HA test runs on)",
    ),
    (
        "status",
        "status_shows_node_in_words_and_documented_json_fields, cli_pair.rs",
    ),
    (
        "takeover",
        "cli_pair.rs, ha_commands_on_a_node_without_a_pair_...",
    ),
    (
        "giveback",
        "cli_pair.rs, ha_commands_on_a_node_without_a_pair_...",
    ),
    ("takeover-disable", "cli_pair.rs"),
    ("takeover-enable", "cli_pair.rs"),
    ("volume list", "volume_list_and_show_..."),
    ("volume show", "volume_list_and_show_..."),
    (
        "disk fail",
        "disk_commands_and_rebuild_status_in_both_forms",
    ),
    (
        "disk remove",
        "disk_commands_and_rebuild_status_in_both_forms",
    ),
    ("disk add", "disk_commands_and_rebuild_status_in_both_forms"),
    (
        "disk replace",
        "disk_commands_and_rebuild_status_in_both_forms",
    ),
    (
        "disk reservation",
        "reservation_cli.rs (lock files, no daemon)",
    ),
    (
        "rebuild status",
        "disk_commands_and_rebuild_status_in_both_forms",
    ),
    ("scrub start", "scrub_start_and_status_in_both_forms"),
    ("scrub status", "scrub_start_and_status_in_both_forms"),
    (
        "journal dump",
        "journal_dump_of_a_live_nodes_nvram_in_both_forms",
    ),
    ("journal accept-loss", "accept_loss_..., cli_pair.rs"),
    (
        "create",
        "cli_create.rs (then the daemon started on what it made)",
    ),
];

/// The subcommand names in a `--help` text's `Commands:` section (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect()
}

fn help(path: &[&str]) -> String {
    let out = std::process::Command::new(twinctl())
        .args(path)
        .arg("--help")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "twinctl {path:?} --help: {}",
        text(&out)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn every_twinctl_command_has_a_test() {
    let mut found = Vec::new();
    for top in subcommands(&help(&[])) {
        let subs = subcommands(&help(&[&top]));
        // Two levels: `disk reservation`'s own subcommands are covered by reservation_cli.rs.
        if subs.is_empty() {
            found.push(top.clone());
        }
        for s in subs {
            found.push(format!("{top} {s}"));
        }
    }
    let covered: Vec<&str> = COVERED.iter().map(|(c, _)| *c).collect();
    for c in &found {
        assert!(
            covered.contains(&c.as_str()),
            "`twinctl {c}` has no test against a running daemon: add one and list it in COVERED"
        );
    }
    for c in &covered {
        assert!(
            found.iter().any(|f| f == c),
            "COVERED lists `{c}`, which twinctl no longer has"
        );
    }
}

/// Failing a disk the degraded array cannot lose would stop the volume: refused like a replace
/// that would fail the array (`admin_safety.rs`).
#[test]
fn failing_a_member_the_degraded_array_cannot_lose_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_d, _addr, sock) = start_raid5(dir.path(), "");
    ctl_ok(&sock, &["disk", "fail", "md0", "d1.img"]);
    refused(&sock, &["disk", "fail", "md0", "d2.img"], "md0");
    assert_eq!(
        ctl_json(&sock, &["volume", "show", "r5"])["state"],
        "degraded"
    );
}
