//! The pair section of `twinctl status`: the partner, both interconnect connections, and per
//! volume whether the mirror is in sync, its lag and the age of the last acknowledgement. Pure:
//! JSON in, text out.

use serde_json::Value;
use twinblock::config::format_bytes;

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn age(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_u64)
        .map(|ms| format!("{:.1}s ago", ms as f64 / 1000.0))
        .unwrap_or_else(|| "never".into())
}

/// A connection's last error as a note after its state: while the connection is up, an error
/// from before it came up is history and is labelled so (with its age); while it is down, the
/// error is the likely cause. Empty when there was none.
fn error_note(conn: &Value, now_unix_ms: u64) -> String {
    let Some(e) = conn.get("last_error").and_then(Value::as_str) else {
        return String::new();
    };
    let at = conn.get("last_error_unix_ms").and_then(Value::as_u64);
    let ago = at
        .map(|t| {
            format!(
                ", {:.1}s ago",
                now_unix_ms.saturating_sub(t) as f64 / 1000.0
            )
        })
        .unwrap_or_default();
    let up = matches!(
        conn.get("state").and_then(Value::as_str),
        Some("up" | "resyncing")
    );
    let since = conn.get("since_unix_ms").and_then(Value::as_u64);
    match (up, at, since) {
        (true, Some(at), Some(since)) if at <= since => {
            format!(" (earlier error{ago}, before the link came up: {e})")
        }
        (true, _, _) => format!(" (error while up{ago}: {e})"),
        (false, _, _) => format!(" (last error{ago}: {e})"),
    }
}

/// Renders the `pair` object of the status answer.
pub fn render(p: &Value) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    render_at(p, now)
}

/// [`render`] at time `now_unix_ms` (for the ages of errors).
pub fn render_at(p: &Value, now_unix_ms: u64) -> String {
    let ic = &p["interconnect"];
    let (out, inb) = (&ic["outbound"], &ic["inbound"]);
    let mut t = format!(
        "\npair {}: node {} (serving {}), partner node {} (serving {})\n",
        s(p, "pair_id"),
        s(p, "node_id"),
        s(p, "service_address"),
        s(p, "partner_id"),
        s(p, "partner_service_address"),
    );
    t.push_str(&format!(
        "interconnect to partner {}: {}{}\n",
        s(ic, "partner_address"),
        s(out, "state"),
        error_note(out, now_unix_ms)
    ));
    t.push_str(&format!(
        "interconnect from partner on {}: {}{}\n",
        s(ic, "listen"),
        s(inb, "state"),
        error_note(inb, now_unix_ms)
    ));
    let rows: Vec<Vec<String>> = p["mirrors"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|m| {
            vec![
                s(m, "volume"),
                if m["in_sync"] == true {
                    "in sync".into()
                } else {
                    format!("OUT OF SYNC: {}", s(m, "out_of_sync_reason"))
                },
                s(m, "lag_records"),
                m["lag_bytes"]
                    .as_u64()
                    .map(format_bytes)
                    .unwrap_or_else(|| "-".into()),
                age(m, "last_ack_age_ms"),
            ]
        })
        .collect();
    if !rows.is_empty() {
        t.push_str(&crate::render::table(
            &["MIRRORED VOLUME", "MIRROR", "LAG", "LAG BYTES", "LAST ACK"],
            &rows,
        ));
    }
    let copies: Vec<Vec<String>> = p["partner_copies"]["copies"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            vec![
                s(c, "volume"),
                s(c, "stored_through_seq"),
                age(c, "last_record_age_ms"),
                s(c, "file"),
            ]
        })
        .collect();
    if !copies.is_empty() {
        t.push_str(&crate::render::table(
            &[
                "PARTNER VOLUME",
                "STORED THROUGH SEQ",
                "LAST RECORD",
                "COPY",
            ],
            &copies,
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_sync_volume_shows_its_reason_and_lag() {
        let p = serde_json::json!({
            "pair_id": "x", "node_id": 0, "partner_id": 1,
            "service_address": "127.0.0.1:10809", "partner_service_address": "127.0.0.1:10810",
            "interconnect": {"partner_address": "127.0.0.1:7801", "listen": "127.0.0.1:7800",
                "outbound": {"state": "down", "last_error": "connection refused"},
                "inbound": {"state": "up"}},
            "mirrors": [{"volume": "r5", "in_sync": false, "out_of_sync_reason": "interconnect down",
                "lag_records": 3, "lag_bytes": 12288, "last_ack_age_ms": 1500}],
            "partner_copies": {"copies": []}
        });
        let t = render(&p);
        assert!(t.contains("OUT OF SYNC: interconnect down"), "{t}");
        assert!(t.contains("connection refused"), "{t}");
        assert!(t.contains("12 KiB") && t.contains("1.5s ago"), "{t}");
    }

    #[test]
    fn an_error_from_before_the_link_came_up_is_labelled_as_history() {
        let p = serde_json::json!({
            "interconnect": {
                "outbound": {"state": "up", "since_unix_ms": 50_000,
                    "last_error": "connection refused", "last_error_unix_ms": 40_000},
                "inbound": {"state": "down", "last_error": "127.0.0.1:9: bad key",
                    "last_error_unix_ms": 58_000}},
        });
        let t = render_at(&p, 60_000);
        assert!(
            t.contains(
                ": up (earlier error, 20.0s ago, before the link came up: connection refused)"
            ),
            "{t}"
        );
        assert!(
            t.contains(": down (last error, 2.0s ago: 127.0.0.1:9: bad key)"),
            "{t}"
        );
        let mut fresh = p.clone();
        fresh["interconnect"]["outbound"]["last_error_unix_ms"] = 55_000.into();
        assert!(render_at(&fresh, 60_000).contains("(error while up, 5.0s ago"));
    }
}
