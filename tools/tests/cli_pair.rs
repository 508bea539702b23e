//! The HA commands of `twinctl` against a running pair (`twinctl demo`: two `twinblockd` nodes
//! with `[ha]`), in both output forms: `status` with its HA section, `takeover-disable` and
//! `takeover-enable` (accepted, visible in status, undone), and the commands that do not fit a
//! healthy pair (`takeover` while the partner is heard, `giveback` while nothing was taken over,
//! `journal accept-loss` of a volume that is not held) refused in one line with nothing changed.

mod common;

use common::*;
use std::path::Path;
use std::time::{Duration, Instant};

/// How long a freshly started pair may take to mirror and leave the start-up window.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The codes of why takeover is not possible now (on this node, or on the partner as its last
/// status record said with `ha` = `status["ha"]["partner"]`).
fn codes(ha: &serde_json::Value) -> Vec<String> {
    ha["takeover_blockers"]
        .as_array()
        .unwrap_or_else(|| panic!("no takeover_blockers: {ha}"))
        .iter()
        .map(|b| b["code"].as_str().unwrap().to_string())
        .collect()
}

fn blocker_codes(status: &serde_json::Value) -> Vec<String> {
    codes(&status["ha"])
}

/// Waits until, on both nodes as this one sees them, the only reason against a takeover is that
/// the other is alive: the mirrors are in sync and the start-up window is over, so the state no
/// longer moves on its own.
fn wait_settled(sock: &Path) -> serde_json::Value {
    let t = Instant::now();
    loop {
        let status = ctl_json(sock, &["status"]);
        let partner = &status["ha"]["partner"];
        if blocker_codes(&status) == ["partner_heard"]
            && !partner.is_null()
            && codes(partner) == ["partner_heard"]
        {
            return status;
        }
        assert!(
            t.elapsed() < SETTLE_TIMEOUT,
            "pair did not settle: {status}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

const HA_FIELDS: &[&str] = &[
    "node",
    "partner",
    "takeover_possible",
    "takeover_blockers",
    "paths",
    "disks",
];

/// The demo's banner commands that only look (status, volume show, journal dump), run as printed:
/// each must work when pasted.
fn run_banner_commands(pair: &DemoPair) {
    let banner = pair.banner();
    let ctl = twinctl().display().to_string();
    let mut ran = 0;
    for line in banner.lines().map(str::trim) {
        let Some(rest) = line.strip_prefix(&ctl) else {
            continue;
        };
        let command = rest.split('#').next().unwrap_or_default();
        let args: Vec<&str> = command.split_whitespace().collect();
        let looks = args.contains(&"status")
            || args
                .windows(2)
                .any(|w| w == ["volume", "show"] || w == ["journal", "dump"]);
        if !looks {
            continue;
        }
        let out = std::process::Command::new(twinctl())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "pasted `{line}` failed: {}\n{banner}",
            text(&out)
        );
        ran += 1;
    }
    assert!(
        ran >= 5,
        "only {ran} commands found in the banner:\n{banner}"
    );
}

#[test]
fn ha_status_disable_enable_and_refusals_on_a_running_pair() {
    let tmp = tempfile::tempdir().unwrap();
    let pair = DemoPair::start(tmp.path());
    let sock = pair.socket(0);
    wait_settled(&sock);
    run_banner_commands(&pair);

    let human = ctl_human(&sock, &["status"]);
    for want in [
        "node 0",
        "HA pair",
        "this node 0",
        "partner node 1",
        "partner node 1: Normal",
        "takeover: not possible",
        "(partner_heard)",
        "heartbeat",
        "ms ago",
        "held by",
    ] {
        assert!(
            human.contains(want),
            "no `{want}` in:\n{human}\n{}",
            pair.logs()
        );
    }
    // Disk paths without detours (`node0/../node1/../disks/...` was shown before).
    assert!(!human.contains("/../") && !human.contains("/./"), "{human}");
    let json = ctl_json(&sock, &["status"]);
    assert!(!json.to_string().contains("/../"), "{json}");
    assert_keys(&json["ha"], HA_FIELDS, "status.ha");
    assert_keys(
        &json["ha"]["node"],
        &["node_id", "state", "generation", "lease_left_ms"],
        "status.ha.node",
    );
    assert_eq!(json["ha"]["takeover_possible"], false, "{json}");
    assert_eq!(blocker_codes(&json), ["partner_heard"], "{json}");
    // The pair node's volumes (a mirrored journaled RAID volume and a plain image) read the
    // same way as a single node's.
    let list = ctl_human(&sock, &["volume", "list"]);
    for v in json["volumes"].as_array().unwrap() {
        let name = v.as_str().unwrap();
        assert!(list.contains(name), "{list}");
        let show = ctl_human(&sock, &["volume", "show", name]);
        assert!(show.contains(&format!("volume {name}")), "{show}");
        assert_eq!(ctl_json(&sock, &["volume", "show", name])["name"], name);
    }
    let before = snapshot(&sock);

    // The partner is heard: a takeover now would run both nodes on one set of disks.
    refused(
        &sock,
        &["takeover"],
        "takeover refused: partner heard within the detection window",
    );
    // Nothing was taken over, so there is nothing to give back.
    refused(&sock, &["giveback"], "not in TAKEOVER");
    // r5a serves normally: it is not held for a lost NVRAM log.
    let volume = json["volumes"][0].as_str().unwrap().to_string();
    refused(
        &sock,
        &["journal", "accept-loss", &volume],
        "is not waiting for an NVRAM loss to be accepted",
    );

    let disabled = ctl_human(&sock, &["takeover-disable"]);
    assert!(disabled.contains("disabled"), "{disabled}");
    let status = ctl_human(&sock, &["status"]);
    assert!(status.contains("(disabled_by_operator)"), "{status}");
    let json = ctl_json(&sock, &["status"]);
    let blockers = json["ha"]["takeover_blockers"].as_array().unwrap();
    assert!(
        blockers.iter().any(|b| b["code"] == "disabled_by_operator"),
        "{json}"
    );
    for b in blockers {
        assert_keys(b, &["code", "reason"], "takeover blocker");
    }
    // Disabled in both directions: node 1 learns it from node 0's next status record, and node
    // 0 sees that in node 1's record after that.
    let on_partner = "disabled_on_partner".to_string();
    let t = Instant::now();
    while !blocker_codes(&ctl_json(&pair.socket(1), &["status"])).contains(&on_partner)
        || !codes(&ctl_json(&sock, &["status"])["ha"]["partner"]).contains(&on_partner)
    {
        assert!(
            t.elapsed() < SETTLE_TIMEOUT,
            "node 1 never saw takeover disabled on node 0"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Disabled means refused even when asked.
    refused(
        &sock,
        &["takeover"],
        "takeover disabled by the operator on this node",
    );

    let enabled = ctl_json(&sock, &["takeover-enable"]);
    assert_keys(&enabled, &["message"], "takeover-enable");
    // The partner's record of this node catches up within a heartbeat or two.
    wait_settled(&sock);
    assert_eq!(snapshot(&sock), before, "disable then enable left a trace");

    // The --json form of disable is accepted too, and enable in human form undoes it.
    let disabled = ctl_json(&sock, &["takeover-disable"]);
    assert_keys(&disabled, &["message"], "takeover-disable");
    assert_eq!(disabled["accepted"], "takeover_disable", "{disabled}");
    let enabled = ctl_human(&sock, &["takeover-enable"]);
    assert!(
        enabled.contains("enabled") || enabled.contains("allowed"),
        "{enabled}"
    );
    // As above: the partner's record of this node catches up within a heartbeat or two.
    wait_settled(&sock);
    assert_eq!(snapshot(&sock), before);
}
