//! Human views of `volume show` and `status`: sentences and small tables with units, built from
//! the admin API's JSON (the same JSON `--json` prints). Internal field names, enum spellings and
//! raw floats stay in the JSON; a person sees "RAID 5, 4 slots, chunk 64 KiB" and "12 MiB of
//! 64 MiB (18%)". Pure functions from JSON to text, so the tests check the exact wording.

use crate::render::table;
use serde_json::Value;
use std::fmt::Write as _;
use twinblock::config::format_bytes;

fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}

fn u64_of(v: &Value, key: &str) -> Option<u64> {
    v.get(key).and_then(Value::as_u64)
}

fn bool_of(v: &Value, key: &str) -> bool {
    v.get(key).and_then(Value::as_bool).unwrap_or(false)
}

fn size_of(v: &Value, key: &str) -> String {
    u64_of(v, key).map_or_else(|| "-".into(), format_bytes)
}

/// "1 client", "3 clients".
fn count(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Whole seconds as "45 s", "12 min 5 s", "3 h 20 min", "2 d 4 h".
pub fn duration(secs: u64) -> String {
    match secs {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s if s < 86_400 => format!("{} h {} min", s / 3600, s % 3600 / 60),
        s => format!("{} d {} h", s / 86_400, s % 86_400 / 3600),
    }
}

/// "RAID 5" from the JSON level (`raid5`).
fn level(a: &Value) -> String {
    match str_of(a, "level").and_then(|l| l.strip_prefix("raid")) {
        Some(n) => format!("RAID {n}"),
        None => "RAID".into(),
    }
}

fn kind(v: &Value) -> &'static str {
    match str_of(v, "kind") {
        Some("file") => "image file",
        Some("array") => "RAID volume",
        Some("journaled_array") => "journaled RAID volume",
        _ => "volume",
    }
}

/// `twinctl volume show`.
pub fn volume(v: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "volume {}: {}, {}, {}{}",
        str_of(v, "name").unwrap_or("?"),
        kind(v),
        size_of(v, "size"),
        str_of(v, "state").unwrap_or("unknown"),
        if bool_of(v, "read_only") {
            ", read-only"
        } else {
            ""
        }
    );
    if let Some(d) = str_of(v, "description").filter(|d| !d.is_empty()) {
        let _ = writeln!(out, "  {d}");
    }
    let io = format!(
        "{}{}",
        str_of(v, "io_engine").unwrap_or("?"),
        if bool_of(v, "direct_io") {
            ", O_DIRECT"
        } else {
            ", page cache"
        }
    );
    let _ = writeln!(
        out,
        "  served from {} ({io})",
        str_of(v, "backing").unwrap_or("?")
    );
    if let Some(a) = v.get("array").filter(|a| a.is_object()) {
        array(a, &mut out);
    }
    if let Some(j) = v.get("journal").filter(|j| j.is_object()) {
        journal(j, str_of(v, "nvram"), &mut out);
    }
    if let Some(s) = v.get("stats").filter(|s| s.is_object()) {
        traffic(s, &mut out);
    }
    out
}

fn array(a: &Value, out: &mut String) {
    let members = a.get("members").and_then(Value::as_array);
    let slots = members.map_or(0, |m| m.iter().filter(|x| !x["slot"].is_null()).count());
    let state = if bool_of(a, "failed") {
        "FAILED"
    } else if bool_of(a, "degraded") {
        "degraded"
    } else {
        "optimal"
    };
    let _ = writeln!(
        out,
        "array {}: {}, {} slots, chunk {}, {}, {state}",
        str_of(a, "name").unwrap_or("?"),
        level(a),
        slots,
        size_of(a, "chunk_bytes"),
        size_of(a, "size_bytes"),
    );
    let rows: Vec<Vec<String>> = members
        .into_iter()
        .flatten()
        .map(|m| {
            vec![
                u64_of(m, "slot").map_or("spare".into(), |s| s.to_string()),
                str_of(m, "state").unwrap_or("?").to_string(),
                str_of(m, "name").unwrap_or("(no disk)").to_string(),
            ]
        })
        .collect();
    for line in table(&["SLOT", "STATE", "DISK"], &rows).lines() {
        let _ = writeln!(out, "  {line}");
    }
    if let Some(r) = a.get("rebuild").filter(|r| r.is_object()) {
        let _ = writeln!(out, "  {}", rebuild(r));
    }
    let mismatches = u64_of(a, "mismatches").unwrap_or(0);
    if bool_of(a, "scrub_running") {
        let _ = writeln!(out, "  scrub running, {mismatches} mismatches so far");
    } else if mismatches > 0 {
        let _ = writeln!(out, "  scrubs found {mismatches} mismatches");
    }
    let dirty = u64_of(a, "bitmap_dirty_regions").unwrap_or(0);
    if dirty > 0 {
        let _ = writeln!(
            out,
            "  write-intent bitmap: {} of {} each being written",
            count(dirty, "region", "regions"),
            size_of(a, "bitmap_region_bytes")
        );
    }
}

/// "rebuilding slot 2 onto d4.img: 42.0% (40 MiB of 96 MiB), 180 MiB/s, about 12 s left".
pub fn rebuild(r: &Value) -> String {
    let what = match str_of(r, "kind") {
        Some("bitmap") => "resync (changed regions)",
        _ => "rebuild",
    };
    let head = format!(
        "{what} of slot {} onto {}",
        u64_of(r, "slot").map_or("?".into(), |s| s.to_string()),
        str_of(r, "member").unwrap_or("?")
    );
    let pct = r.get("percent").and_then(Value::as_f64).unwrap_or(0.0);
    let done = format!(
        "{pct:.1}% ({} of {})",
        size_of(r, "done_bytes"),
        size_of(r, "total_bytes")
    );
    if let Some(e) = str_of(r, "error") {
        return format!("{head} failed at {done}: {e}");
    }
    if !bool_of(r, "running") {
        return format!("{head} done");
    }
    let rate = r
        .get("rate_bytes_per_s")
        .and_then(Value::as_f64)
        .map(|b| format!(", {}/s", format_bytes(b as u64)))
        .unwrap_or_default();
    let eta = r
        .get("eta_s")
        .and_then(Value::as_f64)
        .map(|e| format!(", about {} left", duration(e.ceil() as u64)))
        .unwrap_or_default();
    format!("{head}: {done}{rate}{eta}")
}

fn journal(j: &Value, nvram: Option<&str>, out: &mut String) {
    let log = u64_of(j, "log_bytes").unwrap_or(0);
    let used = u64_of(j, "log_used_bytes").unwrap_or(0);
    let pct = if log > 0 {
        used as f64 * 100.0 / log as f64
    } else {
        0.0
    };
    let _ = writeln!(
        out,
        "journal: {} of {} log in use ({pct:.0}%), {} not yet applied to the array",
        format_bytes(used),
        format_bytes(log),
        size_of(j, "dirty_bytes")
    );
    let _ = writeln!(
        out,
        "  {} done, {} waited for log space",
        count(
            u64_of(j, "cps_done").unwrap_or(0),
            "consistency point",
            "consistency points"
        ),
        count(u64_of(j, "writer_waits").unwrap_or(0), "write", "writes")
    );
    let survives = if bool_of(j, "ack_survives_power_loss") {
        "a daemon crash and a power cut"
    } else {
        "a daemon crash (not a power cut: FLUSH/FUA wait for a consistency point)"
    };
    let _ = writeln!(
        out,
        "  NVRAM {} ({}): acknowledged writes survive {survives}",
        nvram.unwrap_or("?"),
        str_of(j, "persistence").unwrap_or("?")
    );
    if let Some(e) = str_of(j, "last_cp_error") {
        let _ = writeln!(out, "  last consistency point failed: {e}");
    }
}

fn traffic(s: &Value, out: &mut String) {
    let n = |k| u64_of(s, k).unwrap_or(0);
    let _ = writeln!(
        out,
        "clients: {} now, {} since start",
        n("connections_active"),
        n("connections_total")
    );
    let _ = writeln!(
        out,
        "  read {} in {}, wrote {} in {}; {}, {}, {}; {}",
        size_of(s, "read_bytes"),
        count(n("read_ops"), "request", "requests"),
        size_of(s, "write_bytes"),
        count(n("write_ops"), "request", "requests"),
        count(n("flush_ops"), "flush", "flushes"),
        count(n("trim_ops"), "trim", "trims"),
        count(n("zero_ops"), "zeroing", "zeroings"),
        count(n("errors"), "error", "errors")
    );
}

/// The node part of `twinctl status` (the pair and HA parts are rendered by their modules).
pub fn node(v: &Value) -> String {
    let mut out = String::new();
    let list = |key: &str| {
        v.get(key)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "none".into())
    };
    let name = str_of(v, "name")
        .map(|n| format!(" ({n})"))
        .unwrap_or_default();
    let _ = writeln!(
        out,
        "node {}{name}: twinblock {}, up {}",
        u64_of(v, "node_id").map_or("?".into(), |n| n.to_string()),
        str_of(v, "version").unwrap_or("?"),
        duration(u64_of(v, "uptime_s").unwrap_or(0))
    );
    let _ = writeln!(out, "  NBD on     {}", list("nbd_listen"));
    let _ = writeln!(out, "  volumes    {}", list("volumes"));
    let _ = writeln!(out, "  arrays     {}", list("arrays"));
    if let Some(n) = v.get("nvram").filter(|n| n.is_object()) {
        let _ = writeln!(
            out,
            "  NVRAM      {} (persistence {})",
            str_of(n, "path").unwrap_or("?"),
            str_of(n, "persistence").unwrap_or("?")
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sample() -> Value {
        json!({
            "name": "r5", "description": "demo", "kind": "journaled_array", "size": 125829120u64,
            "read_only": false, "backing": "md0", "io_engine": "io_uring", "direct_io": true,
            "nvram": "/dev/shm/n0.nvram", "state": "degraded",
            "array": {"name": "md0", "level": "raid5", "size_bytes": 125829120u64,
                "chunk_bytes": 65536, "degraded": true, "failed": false, "mismatches": 0,
                "scrub_running": false, "bitmap_dirty_regions": 0, "bitmap_region_bytes": 1048576,
                "members": [
                    {"slot": 0, "name": "/d/d0.img", "state": "active"},
                    {"slot": 1, "name": null, "state": "missing"},
                    {"slot": null, "name": "/d/d4.img", "state": "spare"}],
                "rebuild": {"slot": 1, "member": "/d/d5.img", "kind": "full", "running": true,
                    "done_bytes": 41943040u64, "total_bytes": 100663296u64,
                    "percent": 41.66666, "rate_bytes_per_s": 213973278.63058615, "eta_s": 11.2,
                    "error": null}},
            "journal": {"persistence": "none", "persist_method": "nothing", "log_bytes": 67108864u64,
                "log_used_bytes": 12582912u64, "dirty_bytes": 4194304u64, "cps_done": 42,
                "writer_waits": 1, "ack_survives_power_loss": false, "last_cp_error": null},
            "stats": {"connections_active": 1, "connections_total": 3, "read_ops": 10,
                "read_bytes": 40960, "write_ops": 1, "write_bytes": 4096, "flush_ops": 2,
                "trim_ops": 0, "zero_ops": 0, "errors": 0}
        })
    }

    #[test]
    fn volume_view_has_units_and_no_internal_names() {
        let t = volume(&sample());
        assert!(
            t.starts_with("volume r5: journaled RAID volume, 120 MiB, degraded\n"),
            "{t}"
        );
        assert!(
            t.contains("array md0: RAID 5, 2 slots, chunk 64 KiB"),
            "{t}"
        );
        assert!(t.contains("spare  spare    /d/d4.img"), "{t}");
        assert!(t.contains("(no disk)"), "{t}");
        assert!(
            t.contains("rebuild of slot 1 onto /d/d5.img: 41.7% (40 MiB of 96 MiB), 204.1 MiB/s, about 12 s left"),
            "{t}"
        );
        assert!(t.contains("12 MiB of 64 MiB log in use (19%)"), "{t}");
        assert!(
            t.contains("42 consistency points done, 1 write waited"),
            "{t}"
        );
        for internal in [
            "persist_method",
            "Nothing",
            "_bytes",
            "213973278",
            "null",
            "{",
        ] {
            assert!(!t.contains(internal), "`{internal}` shown: {t}");
        }
    }

    #[test]
    fn node_view_lists_without_json() {
        let t = node(
            &json!({"node_id": 0, "name": "tb0", "version": "0.1.0", "uptime_s": 3725,
            "nbd_listen": ["127.0.0.1:10809"], "volumes": ["r5", "vol0"], "arrays": ["md0"],
            "nvram": {"path": "/dev/shm/x.nvram", "persistence": "none"}}),
        );
        assert_eq!(
            t,
            "node 0 (tb0): twinblock 0.1.0, up 1 h 2 min\n  NBD on     127.0.0.1:10809\n  \
             volumes    r5, vol0\n  arrays     md0\n  NVRAM      /dev/shm/x.nvram (persistence none)\n"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration(5), "5 s");
        assert_eq!(duration(125), "2 min 5 s");
        assert_eq!(duration(90_000), "1 d 1 h");
    }
}
