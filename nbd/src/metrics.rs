//! Per-export request metrics and their Prometheus text rendering.
//!
//! Every export counts, per command, the requests answered, the bytes they moved, the errors
//! among them, and a latency histogram (time from the request being accepted to its reply being
//! handed to the writer). Updates are relaxed atomics on the request path; rendering reads them
//! without stopping anything, so a scrape sees each counter at some recent moment. The text
//! follows the Prometheus exposition format (version 0.0.4); serving it over HTTP is the
//! caller's business (`Server::metrics_text`).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::transmission::Command;

/// Upper bounds of the latency buckets, in seconds (the last, `+Inf`, is implicit).
pub const LATENCY_BUCKETS_SECONDS: [f64; 14] = [
    0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
    5.0,
];

/// Commands with metrics of their own, in label order.
pub const COMMANDS: [Command; 7] = [
    Command::Read,
    Command::Write,
    Command::Flush,
    Command::Trim,
    Command::WriteZeroes,
    Command::Cache,
    Command::BlockStatus,
];

/// The `command` label of a command.
pub fn command_label(c: Command) -> &'static str {
    match c {
        Command::Read => "read",
        Command::Write => "write",
        Command::Flush => "flush",
        Command::Trim => "trim",
        Command::WriteZeroes => "write_zeroes",
        Command::Cache => "cache",
        Command::BlockStatus => "block_status",
        Command::Disconnect => "disconnect",
    }
}

fn index(c: Command) -> Option<usize> {
    COMMANDS.iter().position(|&k| k == c)
}

/// A latency histogram with fixed buckets.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations at or below each bound (not cumulative; rendering sums them).
    buckets: [AtomicU64; LATENCY_BUCKETS_SECONDS.len()],
    /// Observations above the last bound.
    overflow: AtomicU64,
    count: AtomicU64,
    sum_nanos: AtomicU64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        match LATENCY_BUCKETS_SECONDS.iter().position(|&b| secs <= b) {
            Some(i) => self.buckets[i].fetch_add(1, Ordering::Relaxed),
            None => self.overflow.fetch_add(1, Ordering::Relaxed),
        };
        self.count.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Cumulative counts per bound (Prometheus `le` semantics), then the total count and sum.
    fn cumulative(&self) -> (Vec<u64>, u64, f64) {
        let mut acc = 0;
        let mut out = Vec::with_capacity(LATENCY_BUCKETS_SECONDS.len());
        for b in &self.buckets {
            acc += b.load(Ordering::Relaxed);
            out.push(acc);
        }
        // The total is at least the bucket sum even if a scrape races an observation.
        let count = self
            .count
            .load(Ordering::Relaxed)
            .max(acc + self.overflow.load(Ordering::Relaxed));
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        (out, count, sum)
    }
}

#[derive(Debug, Default)]
struct CommandMetrics {
    requests: AtomicU64,
    bytes: AtomicU64,
    errors: AtomicU64,
    latency: Histogram,
}

/// The metrics of one export.
#[derive(Debug, Default)]
pub struct ExportMetrics {
    commands: [CommandMetrics; COMMANDS.len()],
}

impl ExportMetrics {
    /// Records one answered request: its length in bytes (for commands that carry or cover
    /// data), whether it failed, and how long it took.
    pub fn record(&self, c: Command, bytes: u32, failed: bool, took: Duration) {
        let Some(i) = index(c) else { return };
        let m = &self.commands[i];
        m.requests.fetch_add(1, Ordering::Relaxed);
        m.bytes.fetch_add(u64::from(bytes), Ordering::Relaxed);
        if failed {
            m.errors.fetch_add(1, Ordering::Relaxed);
        }
        m.latency.observe(took);
    }

    /// Records a request refused before it reached the device.
    pub fn refused(&self, c: Command) {
        let Some(i) = index(c) else { return };
        let m = &self.commands[i];
        m.requests.fetch_add(1, Ordering::Relaxed);
        m.errors.fetch_add(1, Ordering::Relaxed);
    }
}

/// Server-wide values rendered next to the per-export ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct ServerGauges {
    pub clients: u32,
    pub max_clients: u32,
    pub refused_over_limit: u64,
}

/// One export's values for rendering.
pub struct ExportSample<'a> {
    pub name: &'a str,
    pub connections_active: u64,
    pub connections_total: u64,
    pub metrics: &'a ExportMetrics,
}

/// Escapes a label value (backslash, double quote, newline), as the text format requires.
fn escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for ch in v.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

/// Renders the server's metrics in the Prometheus text format.
pub fn render(server: ServerGauges, exports: &[ExportSample<'_>]) -> String {
    let mut out = String::new();
    header(
        &mut out,
        "twinblock_nbd_clients",
        "gauge",
        "NBD clients connected (handshaking or transmitting).",
    );
    let _ = writeln!(out, "twinblock_nbd_clients {}", server.clients);
    header(
        &mut out,
        "twinblock_nbd_clients_max",
        "gauge",
        "Configured limit on NBD clients.",
    );
    let _ = writeln!(out, "twinblock_nbd_clients_max {}", server.max_clients);
    header(
        &mut out,
        "twinblock_nbd_clients_refused_total",
        "counter",
        "NBD clients refused because the server was at its connection limit.",
    );
    let _ = writeln!(
        out,
        "twinblock_nbd_clients_refused_total {}",
        server.refused_over_limit
    );

    header(
        &mut out,
        "twinblock_nbd_export_connections",
        "gauge",
        "Connections in transmission on an export.",
    );
    for e in exports {
        let _ = writeln!(
            out,
            "twinblock_nbd_export_connections{{export=\"{}\"}} {}",
            escape(e.name),
            e.connections_active
        );
    }
    header(
        &mut out,
        "twinblock_nbd_export_connections_total",
        "counter",
        "Connections that entered transmission on an export.",
    );
    for e in exports {
        let _ = writeln!(
            out,
            "twinblock_nbd_export_connections_total{{export=\"{}\"}} {}",
            escape(e.name),
            e.connections_total
        );
    }
    type Field = fn(&CommandMetrics) -> u64;
    let counters: [(&str, &str, Field); 3] = [
        ("twinblock_nbd_requests_total", "NBD requests answered, by export and command.", |m| {
            m.requests.load(Ordering::Relaxed)
        }),
        (
            "twinblock_nbd_request_bytes_total",
            "Bytes covered by NBD requests (payload for read and write, range for trim, zero, cache, block status).",
            |m| m.bytes.load(Ordering::Relaxed),
        ),
        ("twinblock_nbd_request_errors_total", "NBD requests answered with an error.", |m| {
            m.errors.load(Ordering::Relaxed)
        }),
    ];
    for (name, help, field) in counters {
        header(&mut out, name, "counter", help);
        for e in exports {
            for (c, m) in COMMANDS.iter().zip(&e.metrics.commands) {
                let _ = writeln!(
                    out,
                    "{name}{{export=\"{}\",command=\"{}\"}} {}",
                    escape(e.name),
                    command_label(*c),
                    field(m)
                );
            }
        }
    }
    let name = "twinblock_nbd_request_duration_seconds";
    header(
        &mut out,
        name,
        "histogram",
        "Time from accepting an NBD request to queueing its reply.",
    );
    for e in exports {
        for (c, m) in COMMANDS.iter().zip(&e.metrics.commands) {
            let labels = format!(
                "export=\"{}\",command=\"{}\"",
                escape(e.name),
                command_label(*c)
            );
            let (cumulative, count, sum) = m.latency.cumulative();
            for (bound, n) in LATENCY_BUCKETS_SECONDS.iter().zip(&cumulative) {
                let _ = writeln!(out, "{name}_bucket{{{labels},le=\"{bound}\"}} {n}");
            }
            let _ = writeln!(out, "{name}_bucket{{{labels},le=\"+Inf\"}} {count}");
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(out, "{name}_count{{{labels}}} {count}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(10));
        h.observe(Duration::from_micros(700));
        h.observe(Duration::from_secs(60));
        let (cum, count, sum) = h.cumulative();
        assert_eq!(cum[0], 1, "10 us is in the first bucket");
        assert_eq!(cum[4], 2, "700 us is at or below 1 ms");
        assert_eq!(*cum.last().unwrap(), 2, "60 s is only in +Inf");
        assert_eq!(count, 3);
        assert!((sum - 60.00071).abs() < 1e-6, "{sum}");
    }

    #[test]
    fn rendering_labels_every_series_and_escapes_names() {
        let m = ExportMetrics::default();
        m.record(Command::Read, 4096, false, Duration::from_micros(80));
        m.record(Command::Write, 512, true, Duration::from_millis(3));
        m.refused(Command::Trim);
        let text = render(
            ServerGauges {
                clients: 2,
                max_clients: 256,
                refused_over_limit: 1,
            },
            &[ExportSample {
                name: "vol\"0",
                connections_active: 1,
                connections_total: 4,
                metrics: &m,
            }],
        );
        for line in [
            "twinblock_nbd_clients 2",
            "twinblock_nbd_clients_refused_total 1",
            r#"twinblock_nbd_export_connections_total{export="vol\"0"} 4"#,
            r#"twinblock_nbd_requests_total{export="vol\"0",command="read"} 1"#,
            r#"twinblock_nbd_request_bytes_total{export="vol\"0",command="read"} 4096"#,
            r#"twinblock_nbd_request_errors_total{export="vol\"0",command="write"} 1"#,
            r#"twinblock_nbd_request_errors_total{export="vol\"0",command="trim"} 1"#,
            r#"twinblock_nbd_request_duration_seconds_bucket{export="vol\"0",command="read",le="0.0001"} 1"#,
            r#"twinblock_nbd_request_duration_seconds_bucket{export="vol\"0",command="write",le="0.0025"} 0"#,
            r#"twinblock_nbd_request_duration_seconds_bucket{export="vol\"0",command="write",le="0.005"} 1"#,
            r#"twinblock_nbd_request_duration_seconds_count{export="vol\"0",command="write"} 1"#,
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "missing {line:?} in\n{text}"
            );
        }
        // Every sample line is `name{labels} value` or `name value`, value a number.
        for l in text.lines().filter(|l| !l.starts_with('#')) {
            let value = l.rsplit(' ').next().unwrap();
            assert!(value.parse::<f64>().is_ok(), "bad value in {l:?}");
        }
    }
}
