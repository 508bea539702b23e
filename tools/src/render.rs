//! Rendering admin answers for people (aligned tables) or scripts (`--json`).
//! Table building is pure (`table`); only the `Output` methods print.

use anyhow::Result;
use serde_json::Value;
use std::future::Future;
use std::io::IsTerminal;
use twinblock::config::format_bytes;

pub struct Output {
    pub json: bool,
}

/// Left-aligned columns separated by two spaces; the header is printed as given.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{:<w$}  ", c, w = widths[i]));
            }
        }
        s.trim_end().to_string()
    };
    let mut out = line(header.iter().map(|h| h.to_string()).collect());
    out.push('\n');
    for r in rows {
        out.push_str(&line(r.clone()));
        out.push('\n');
    }
    out
}

fn s(v: &Value, key: &str) -> String {
    match v.get(key) {
        Some(Value::String(x)) => x.clone(),
        Some(Value::Null) | None => "-".into(),
        Some(other) => other.to_string(),
    }
}

fn bytes(v: &Value, key: &str) -> String {
    v.get(key)
        .and_then(Value::as_u64)
        .map(format_bytes)
        .unwrap_or_else(|| "-".into())
}

/// The elements of a JSON array answer (none for anything else).
fn items(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string())
}

/// One rebuild/scrub line: `md0  rebuilding d3.img  42.0%  180 MiB/s  ETA 12s`.
pub fn progress_line(r: &Value) -> String {
    match r.get("state").and_then(Value::as_str) {
        Some("idle") => {
            let degraded = r.get("degraded").and_then(Value::as_bool).unwrap_or(false);
            return format!(
                "{}  idle{}",
                s(r, "array"),
                if degraded {
                    " (degraded: add a spare to rebuild)"
                } else {
                    ""
                }
            );
        }
        Some("failed") => {
            return format!(
                "{}  rebuild of {} failed: {}",
                s(r, "array"),
                s(r, "target"),
                s(r, "error")
            );
        }
        _ => {}
    }
    let pct = r.get("percent").and_then(Value::as_f64).unwrap_or(0.0);
    let rate = r
        .get("rate_bytes_per_s")
        .and_then(Value::as_u64)
        .map(|b| format!("{}/s", format_bytes(b)))
        .unwrap_or_else(|| "-".into());
    let eta = r
        .get("eta_s")
        .and_then(Value::as_u64)
        .map(|e| format!("ETA {e}s"))
        .unwrap_or_default();
    format!(
        "{}  {} {}  {:.1}%  {}  {}",
        s(r, "array"),
        s(r, "state"),
        s(r, "target"),
        pct,
        rate,
        eta
    )
    .trim_end()
    .to_string()
}

impl Output {
    /// `--json` prints the answer as it came; otherwise `human` renders it.
    fn show(&self, v: &Value, human: impl FnOnce(&Value)) -> Result<()> {
        if self.json {
            println!("{}", pretty(v));
        } else {
            human(v);
        }
        Ok(())
    }

    pub fn status(&self, v: &Value) -> Result<()> {
        self.show(v, |v| {
            print!("{}", crate::views::node(v));
            for h in items(v.get("volumes_held").unwrap_or(&Value::Null)) {
                println!(
                    "\nHELD: volume {} does not serve: {}",
                    s(h, "name"),
                    h.get("loss")
                        .map(|l| format!(
                            "acknowledged writes from seq {} may be lost (NVRAM log {} is gone)",
                            s(l, "first_lost_seq"),
                            s(l, "recorded_log_id")
                        ))
                        .unwrap_or_default()
                );
                if let Some(e) = h.get("partner_fetch_error").and_then(Value::as_str) {
                    println!("  partner's copy not usable: {e}");
                }
                println!("  to serve it anyway: {}", s(h, "remedy"));
            }
            if let Some(p) = v.get("pair").filter(|p| !p.is_null()) {
                print!("{}", crate::pair_status::render(p));
            }
        })
    }

    pub fn volume_list(&self, v: &Value) -> Result<()> {
        self.show(v, |v| {
            let rows: Vec<Vec<String>> = items(v)
                .iter()
                .map(|vol| {
                    let st = vol.get("stats").cloned().unwrap_or(Value::Null);
                    vec![
                        s(vol, "name"),
                        s(vol, "kind"),
                        bytes(vol, "size"),
                        s(vol, "state"),
                        s(vol, "backing"),
                        s(&st, "connections_active"),
                        bytes(&st, "read_bytes"),
                        bytes(&st, "write_bytes"),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &["NAME", "KIND", "SIZE", "STATE", "BACKING", "CONNS", "READ", "WRITTEN"],
                    &rows
                )
            );
        })
    }

    pub fn volume_show(&self, v: &Value) -> Result<()> {
        self.show(v, |v| print!("{}", crate::views::volume(v)))
    }

    pub fn done(&self, v: &Value) -> Result<()> {
        self.show(v, |v| match v.get("message").and_then(Value::as_str) {
            Some(m) => println!("{m}"),
            None => println!("{}", pretty(v)),
        })
    }

    pub fn rebuild(&self, v: &Value) -> Result<()> {
        self.show(v, |v| {
            if items(v).is_empty() {
                println!("no rebuild running");
            }
            for r in items(v) {
                println!("{}", progress_line(r));
            }
        })
    }

    pub fn scrub(&self, v: &Value) -> Result<()> {
        self.show(v, |v| {
            let rows: Vec<Vec<String>> = items(v).iter().map(scrub_row).collect();
            print!(
                "{}",
                table(
                    &[
                        "ARRAY",
                        "STATE",
                        "MODE",
                        "CHECKED",
                        "RATE",
                        "ETA",
                        "MISMATCHES",
                        "REPAIRED"
                    ],
                    &rows
                )
            );
            for r in items(v) {
                if let Some(e) = r.get("error").and_then(Value::as_str) {
                    println!("{}: scrub failed: {e}", s(r, "array"));
                }
            }
        })
    }
}

/// One `scrub status` row: rows checked of the total with the percentage, rate and time left.
pub fn scrub_row(r: &Value) -> Vec<String> {
    let checked = match (
        r.get("rows_checked").and_then(Value::as_u64),
        r.get("rows_total").and_then(Value::as_u64),
    ) {
        (Some(c), Some(t)) => format!(
            "{c}/{t} rows ({:.1}%)",
            r.get("percent").and_then(Value::as_f64).unwrap_or(0.0)
        ),
        _ => "-".into(),
    };
    let mode = match r.get("mode").and_then(Value::as_str) {
        Some("repair") => "repair",
        Some("check") => "check only",
        _ => "-",
    };
    vec![
        s(r, "array"),
        s(r, "state"),
        mode.into(),
        checked,
        r.get("rate_bytes_per_s")
            .and_then(Value::as_u64)
            .map_or("-".into(), |b| format!("{}/s", format_bytes(b))),
        r.get("eta_s")
            .and_then(Value::as_u64)
            .map_or("-".into(), crate::views::duration),
        s(r, "mismatches"),
        s(r, "repaired"),
    ]
}

/// What a `--watch` follows: the state that means "still running" and how a running entry is
/// described on a line.
pub struct Watched {
    /// `rebuild` or `scrub`, for the closing line.
    pub what: &'static str,
    /// The `state` value of an entry that is still running.
    pub running_state: &'static str,
    /// One line of progress for a running entry (rate, ETA, counts).
    pub line: fn(&Value) -> String,
}

/// The rebuild watcher: `rebuild status --watch`.
pub const REBUILD: Watched = Watched {
    what: "rebuild",
    running_state: "rebuilding",
    line: progress_line,
};

/// The scrub watcher: `scrub status --watch`.
pub const SCRUB: Watched = Watched {
    what: "scrub",
    running_state: "running",
    line: scrub_line,
};

/// A running scrub on one line: rows checked, rate, time left, mismatches so far.
fn scrub_line(r: &Value) -> String {
    let row = scrub_row(r);
    format!(
        "{}: {} at {}, {} left, {} mismatches",
        row[0], row[3], row[4], row[5], row[6]
    )
}

/// Poll a status once a second until nothing is running: a live bar per array on a terminal, a
/// plain line per poll otherwise (logs, pipes), the raw reply per poll with `--json`.
pub async fn watch<F, Fut>(out: &Output, watched: &Watched, mut poll: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Value>>,
{
    let tty = std::io::stdout().is_terminal() && !out.json;
    let multi = indicatif::MultiProgress::new();
    let mut bars: std::collections::BTreeMap<String, indicatif::ProgressBar> = Default::default();
    loop {
        let v = poll().await?;
        let running: Vec<&Value> = items(&v)
            .iter()
            .filter(|r| r.get("state").and_then(Value::as_str) == Some(watched.running_state))
            .collect();
        if tty {
            for r in &running {
                let name = s(r, "array");
                let bar = bars.entry(name.clone()).or_insert_with(|| {
                    let b = multi.add(indicatif::ProgressBar::new(1000));
                    if let Ok(style) = indicatif::ProgressStyle::with_template(
                        "{prefix:8} [{bar:40}] {percent:>3}% {msg}",
                    ) {
                        b.set_style(style.progress_chars("=> "));
                    }
                    b.set_prefix(name);
                    b
                });
                let pct = r.get("percent").and_then(Value::as_f64).unwrap_or(0.0);
                bar.set_position((pct * 10.0) as u64);
                bar.set_message((watched.line)(r));
            }
        } else if out.json {
            println!("{}", v);
        } else {
            for r in &running {
                println!("{}", (watched.line)(r));
            }
        }
        if running.is_empty() {
            for b in bars.values() {
                b.finish_with_message("done");
            }
            if !out.json {
                println!("no {} running", watched.what);
            }
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns() {
        let t = table(
            &["NAME", "SIZE"],
            &[
                vec!["vol0".into(), "1 GiB".into()],
                vec!["longname".into(), "2".into()],
            ],
        );
        assert_eq!(t, "NAME      SIZE\nvol0      1 GiB\nlongname  2\n");
    }

    #[test]
    fn scrub_row_shows_rows_rate_and_time_left() {
        let v = serde_json::json!({"array":"md0","state":"running","mode":"check",
            "rows_checked":250,"rows_total":1000,"percent":25.0,"rate_bytes_per_s":104857600u64,
            "eta_s":75,"mismatches":0,"repaired":null});
        assert_eq!(
            scrub_row(&v),
            [
                "md0",
                "running",
                "check only",
                "250/1000 rows (25.0%)",
                "100 MiB/s",
                "1 min 15 s",
                "0",
                "-"
            ]
        );
    }

    #[test]
    fn scrub_line_names_rows_rate_time_left_and_mismatches() {
        let r = serde_json::json!({
            "array": "md0", "state": "running", "mode": "check", "mismatches": 2,
            "rows_checked": 50, "rows_total": 200, "percent": 25.0,
            "rate_bytes_per_s": 1048576, "eta_s": 90
        });
        let line = scrub_line(&r);
        assert!(line.starts_with("md0: 50/200 rows (25.0%) at "), "{line}");
        assert!(line.contains("/s"), "{line}");
        assert!(line.ends_with(", 2 mismatches"), "{line}");
        assert!(!line.contains('{') && !line.contains("null"), "{line}");
    }

    #[test]
    fn progress_line_reads_rebuild_fields() {
        let v = serde_json::json!({"array":"md0","state":"rebuilding","target":"d3.img",
            "percent":42.0,"rate_bytes_per_s":188743680u64,"eta_s":12});
        assert_eq!(
            progress_line(&v),
            "md0  rebuilding d3.img  42.0%  180 MiB/s  ETA 12s"
        );
    }
}
