//! `twinctl takeover | giveback | takeover-disable | takeover-enable` and the HA section of
//! `twinctl status`: rendering of the daemon's `ha_status` answer (pure, tested below).

use serde_json::Value;
use std::fmt::Write as _;

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

/// A state as people read it: the API's snake_case word as words, capitalised
/// (`waiting_for_giveback` is "Waiting for giveback").
fn state_name(v: &Value) -> String {
    let raw = s(v, "state").replace('_', " ");
    let mut c = raw.chars();
    match c.next() {
        Some(first) => first.to_uppercase().chain(c).collect(),
        None => raw,
    }
}

fn yes_no(v: &Value, key: &str) -> &'static str {
    match v.get(key).and_then(Value::as_bool) {
        Some(true) => "yes",
        Some(false) => "no",
        None => "-",
    }
}

/// The HA section of `twinctl status` as text; empty for a node without HA (`null`).
pub fn render_status(ha: &Value) -> String {
    if ha.is_null() {
        return String::new();
    }
    let mut out = String::new();
    let node = &ha["node"];
    let _ = writeln!(out, "\nHA pair");
    let _ = writeln!(
        out,
        "  this node {}: {}  (generation {}, lease left {} ms, holds own/partner disks: {}/{}, \
         serving own/partner: {}/{})",
        s(node, "node_id"),
        state_name(node),
        s(node, "generation"),
        s(node, "lease_left_ms"),
        yes_no(node, "holds_own_disks"),
        yes_no(node, "holds_partner_disks"),
        yes_no(node, "serving_own"),
        yes_no(node, "serving_partner"),
    );
    match ha.get("partner").filter(|p| !p.is_null()) {
        Some(p) => {
            let flags: Vec<String> = p["flags"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .filter_map(|x| x.as_str().map(|f| f.replace('_', " ")))
                        .collect()
                })
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  partner node {}: {}  (generation {}, sequence {}{})",
                s(p, "node_id"),
                state_name(p),
                s(p, "generation"),
                s(p, "sequence"),
                if flags.is_empty() {
                    String::new()
                } else {
                    format!(", {}", flags.join(", "))
                }
            );
        }
        None => {
            let _ = writeln!(out, "  partner: never heard since this node started");
        }
    }
    if ha["takeover_possible"].as_bool() == Some(true) {
        let _ = writeln!(out, "  takeover: possible");
    } else {
        let _ = writeln!(out, "  takeover: not possible:");
        for b in ha["takeover_blockers"].as_array().into_iter().flatten() {
            let _ = writeln!(out, "    - {} ({})", s(b, "reason"), s(b, "code"));
        }
    }
    let _ = writeln!(out, "  heartbeat (last heard from the partner):");
    for p in ha["paths"].as_array().into_iter().flatten() {
        let age = match p.get("age_ms").and_then(Value::as_u64) {
            Some(ms) => format!("{ms} ms ago"),
            None => "never".into(),
        };
        let _ = writeln!(out, "    {:<13} {age}", s(p, "path"));
    }
    let _ = writeln!(out, "  disks:");
    for d in ha["disks"].as_array().into_iter().flatten() {
        let err = match d.get("error").and_then(Value::as_str) {
            Some(e) => format!("  ({e})"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "    {} [{}]: held by {}{err}",
            s(d, "disk"),
            s(d, "set"),
            s(d, "holder")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn blockers_paths_and_holders_are_shown() {
        let ha = json!({
            "node": {"node_id": 1, "state": "normal", "generation": 3, "lease_left_ms": 350,
                     "holds_own_disks": true, "holds_partner_disks": false,
                     "serving_own": true, "serving_partner": false},
            "partner": null,
            "takeover_possible": false,
            "takeover_blockers": [{"code": "disabled_by_operator",
                                   "reason": "takeover disabled by the operator on this node"}],
            "paths": [{"path": "udp", "age_ms": 40}, {"path": "mailbox", "age_ms": null}],
            "disks": [{"disk": "/d/a.img", "set": "own", "holder": "node 1 (this node)",
                       "error": null}],
        });
        let text = render_status(&ha);
        assert!(text.contains("not possible"), "{text}");
        assert!(
            text.contains("takeover disabled by the operator on this node"),
            "{text}"
        );
        assert!(text.contains("udp           40 ms ago"), "{text}");
        assert!(text.contains("mailbox       never"), "{text}");
        assert!(
            text.contains("/d/a.img [own]: held by node 1 (this node)"),
            "{text}"
        );
        assert!(text.contains("never heard"), "{text}");
        assert!(
            text.contains("this node 1: Normal  (generation 3, lease left 350 ms, holds own/partner disks: yes/no, serving own/partner: yes/no)"),
            "{text}"
        );
    }

    #[test]
    fn partner_state_is_spelled_like_this_nodes() {
        let ha = json!({
            "node": {"node_id": 0, "state": "takeover"},
            "partner": {"node_id": 1, "state": "waiting_for_giveback", "generation": 2,
                        "sequence": 9, "flags": ["mirror_in_sync"]},
            "takeover_possible": true, "takeover_blockers": [], "paths": [], "disks": [],
        });
        let text = render_status(&ha);
        assert!(text.contains("this node 0: Takeover  ("), "{text}");
        assert!(
            text.contains(
                "partner node 1: Waiting for giveback  (generation 2, sequence 9, mirror in sync)"
            ),
            "{text}"
        );
    }

    #[test]
    fn a_node_without_ha_shows_nothing() {
        assert_eq!(render_status(&Value::Null), "");
    }
}
