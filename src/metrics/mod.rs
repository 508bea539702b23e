//! The node's metrics in the Prometheus text exposition format (version 0.0.4), served over HTTP
//! by [`http`] when the config has a `[metrics]` section.
//!
//! A scrape renders what the node already tracks, at that moment: the NBD server's per-export
//! request counters and latency histograms (`twinblock_nbd_*`, counted by the NBD crate), and
//! here the arrays (state, rebuild, scrub), the journals (log fill, consistency points), the
//! NVRAM mirror (lag and state) and the HA controller (node state, heartbeat age per path).
//! Nothing is counted twice and nothing runs between scrapes.
//!
//! Rendering is pure over a [`NodeSample`] the node fills (`Node::metrics_text`), so the text is
//! tested without a running node. Mirror and HA values are read from the JSON those parts already
//! give the admin API: the metrics follow their status without depending on their internal types.

pub mod http;

use serde_json::Value;
use std::fmt::Write as _;
use twinblock_journal::VolumeStatus;
use twinblock_raid::array::ArrayStatus;

/// Everything one scrape reports besides the NBD counters.
#[derive(Debug, Default)]
pub struct NodeSample {
    pub node_id: u8,
    pub uptime_s: u64,
    pub arrays: Vec<ArrayStatus>,
    /// (volume name, journal status) of every journaled volume.
    pub journals: Vec<(String, VolumeStatus)>,
    /// (volume name, read cache counters) of every volume with a read cache.
    pub read_caches: Vec<(String, crate::cache::CacheStats)>,
    /// `Pair::status_json()` when the node has a `[pair]` section.
    pub pair: Option<Value>,
    /// The HA status JSON (`twinctl status`'s `ha`) when the node has an `[ha]` section.
    pub ha: Option<Value>,
}

type Labels<'a> = Vec<(&'a str, String)>;

/// One metric family being written: its samples follow its HELP and TYPE lines.
struct Family<'a> {
    name: &'a str,
    kind: &'a str,
    help: &'a str,
    samples: Vec<(Labels<'a>, f64)>,
}

impl<'a> Family<'a> {
    fn new(name: &'a str, kind: &'a str, help: &'a str) -> Self {
        Family {
            name,
            kind,
            help,
            samples: Vec::new(),
        }
    }

    fn add(&mut self, labels: Labels<'a>, value: f64) {
        self.samples.push((labels, value));
    }

    /// Appends the family to `out`; a family without samples writes nothing.
    fn write(self, out: &mut String) {
        if self.samples.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {} {}", self.name, self.help);
        let _ = writeln!(out, "# TYPE {} {}", self.name, self.kind);
        for (labels, value) in self.samples {
            out.push_str(self.name);
            if !labels.is_empty() {
                out.push('{');
                let parts: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                out.push_str(&parts.join(","));
                out.push('}');
            }
            let _ = writeln!(out, " {}", number(value));
        }
    }
}

/// A label value escaped for the text format.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Integers without a fraction, others as Rust prints them.
fn number(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{}", v as i64)
    } else {
        format!("{v}")
    }
}

fn flag(b: bool) -> f64 {
    if b {
        1.0
    } else {
        0.0
    }
}

/// The node's own metrics (everything but the NBD families).
pub fn render(s: &NodeSample) -> String {
    let mut out = String::new();
    let mut up = Family::new(
        "twinblock_uptime_seconds",
        "gauge",
        "Seconds since the node started.",
    );
    up.add(vec![("node", s.node_id.to_string())], s.uptime_s as f64);
    up.write(&mut out);
    render_arrays(&s.arrays, &mut out);
    render_journals(&s.journals, &mut out);
    render_read_caches(&s.read_caches, &mut out);
    if let Some(p) = &s.pair {
        render_mirrors(p, &mut out);
    }
    if let Some(h) = &s.ha {
        render_ha(h, &mut out);
    }
    out
}

fn render_arrays(arrays: &[ArrayStatus], out: &mut String) {
    let mut degraded = Family::new(
        "twinblock_array_degraded",
        "gauge",
        "1 when the array runs without full redundancy.",
    );
    let mut failed = Family::new(
        "twinblock_array_failed",
        "gauge",
        "1 when the array has lost more members than its level tolerates.",
    );
    let mut size = Family::new("twinblock_array_size_bytes", "gauge", "Usable array size.");
    let mut members = Family::new(
        "twinblock_array_members",
        "gauge",
        "Slots and spares of the array by member state.",
    );
    let mut rebuilding = Family::new(
        "twinblock_rebuild_running",
        "gauge",
        "1 while a rebuild or resync runs.",
    );
    let mut done = Family::new(
        "twinblock_rebuild_done_bytes",
        "gauge",
        "Bytes of the current (or last) rebuild done.",
    );
    let mut total = Family::new(
        "twinblock_rebuild_total_bytes",
        "gauge",
        "Bytes the current (or last) rebuild covers.",
    );
    let mut rate = Family::new(
        "twinblock_rebuild_rate_bytes_per_second",
        "gauge",
        "Recent rebuild rate.",
    );
    let mut scrubbing = Family::new("twinblock_scrub_running", "gauge", "1 while a scrub runs.");
    let mut mismatches = Family::new(
        "twinblock_scrub_mismatches",
        "gauge",
        "Inconsistent stripes found by scrubs since the array was opened.",
    );
    for a in arrays {
        let l = || vec![("array", a.name.clone())];
        degraded.add(l(), flag(a.degraded));
        failed.add(l(), flag(a.failed));
        size.add(l(), a.size_bytes as f64);
        let mut by_state: std::collections::BTreeMap<&str, u64> = Default::default();
        for m in &a.members {
            *by_state
                .entry(crate::arrays::state_word(m.state))
                .or_default() += 1;
        }
        for (state, n) in by_state {
            members.add(
                vec![("array", a.name.clone()), ("state", state.to_string())],
                n as f64,
            );
        }
        let r = a.rebuild.as_ref();
        rebuilding.add(l(), flag(r.is_some_and(|r| r.running)));
        if let Some(r) = r {
            done.add(l(), r.done_bytes as f64);
            total.add(l(), r.total_bytes as f64);
            rate.add(l(), r.rate_bytes_per_sec.round());
        }
        scrubbing.add(l(), flag(a.scrub_running));
        mismatches.add(l(), a.mismatch_count as f64);
    }
    for f in [
        degraded, failed, size, members, rebuilding, done, total, rate, scrubbing, mismatches,
    ] {
        f.write(out);
    }
}

fn render_journals(journals: &[(String, VolumeStatus)], out: &mut String) {
    let mut size = Family::new(
        "twinblock_journal_log_bytes",
        "gauge",
        "Size of the journal's log in NVRAM.",
    );
    let mut used = Family::new(
        "twinblock_journal_log_used_bytes",
        "gauge",
        "Log bytes holding writes not yet applied to the array.",
    );
    let mut dirty = Family::new(
        "twinblock_journal_dirty_bytes",
        "gauge",
        "Bytes written to the journal and not yet applied to the array.",
    );
    let mut cps = Family::new(
        "twinblock_journal_consistency_points_total",
        "counter",
        "Consistency points completed (journal applied to the array).",
    );
    let mut waits = Family::new(
        "twinblock_journal_writer_waits_total",
        "counter",
        "Writes that waited for log space.",
    );
    let mut cp_error = Family::new(
        "twinblock_journal_cp_failing",
        "gauge",
        "1 when the last consistency point failed.",
    );
    for (name, j) in journals {
        let l = || vec![("volume", name.clone())];
        size.add(l(), j.log_bytes as f64);
        used.add(l(), j.log_used_bytes as f64);
        dirty.add(l(), j.dirty_bytes as f64);
        cps.add(l(), j.cps_done as f64);
        waits.add(l(), j.writer_waits as f64);
        cp_error.add(l(), flag(j.last_cp_error.is_some()));
    }
    for f in [size, used, dirty, cps, waits, cp_error] {
        f.write(out);
    }
    render_cp_durations(journals, out);
}

/// `twinblock_journal_cp_duration_seconds`: a histogram per volume (buckets, sum, count).
fn render_cp_durations(journals: &[(String, VolumeStatus)], out: &mut String) {
    use twinblock_journal::cp_timing::CP_DURATION_BUCKETS_SECONDS;
    const NAME: &str = "twinblock_journal_cp_duration_seconds";
    if journals.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "# HELP {NAME} Time a consistency point took (applying the journal to the array)."
    );
    let _ = writeln!(out, "# TYPE {NAME} histogram");
    for (name, j) in journals {
        let h = &j.cp_durations;
        let v = escape(name);
        for (bound, n) in CP_DURATION_BUCKETS_SECONDS.iter().zip(h.cumulative()) {
            let _ = writeln!(
                out,
                "{NAME}_bucket{{volume=\"{v}\",le=\"{}\"}} {n}",
                number(*bound)
            );
        }
        let _ = writeln!(
            out,
            "{NAME}_bucket{{volume=\"{v}\",le=\"+Inf\"}} {}",
            h.count()
        );
        let _ = writeln!(
            out,
            "{NAME}_sum{{volume=\"{v}\"}} {}",
            number(h.sum_seconds())
        );
        let _ = writeln!(out, "{NAME}_count{{volume=\"{v}\"}} {}", h.count());
    }
}

fn render_read_caches(caches: &[(String, crate::cache::CacheStats)], out: &mut String) {
    let mut hits = Family::new(
        "twinblock_read_cache_hits_total",
        "counter",
        "Reads answered entirely from the volume's read cache.",
    );
    let mut misses = Family::new(
        "twinblock_read_cache_misses_total",
        "counter",
        "Reads that went to the store.",
    );
    let mut evictions = Family::new(
        "twinblock_read_cache_evictions_total",
        "counter",
        "Cached 4 KiB blocks dropped to make room.",
    );
    let mut blocks = Family::new(
        "twinblock_read_cache_blocks",
        "gauge",
        "4 KiB blocks held by the read cache.",
    );
    for (name, c) in caches {
        let l = || vec![("volume", name.clone())];
        hits.add(l(), c.hits as f64);
        misses.add(l(), c.misses as f64);
        evictions.add(l(), c.evictions as f64);
        blocks.add(l(), c.blocks as f64);
    }
    for f in [hits, misses, evictions, blocks] {
        f.write(out);
    }
}

fn u64_of(v: &Value, key: &str) -> Option<f64> {
    v.get(key).and_then(Value::as_u64).map(|n| n as f64)
}

fn render_mirrors(pair: &Value, out: &mut String) {
    let mut in_sync = Family::new(
        "twinblock_mirror_in_sync",
        "gauge",
        "1 when the partner holds a copy of every acknowledged journal write.",
    );
    let mut lag_records = Family::new(
        "twinblock_mirror_lag_records",
        "gauge",
        "Journal records shipped to the partner and not yet acknowledged.",
    );
    let mut lag_bytes = Family::new(
        "twinblock_mirror_lag_bytes",
        "gauge",
        "Bytes of journal records not yet acknowledged by the partner.",
    );
    let mut ack_age = Family::new(
        "twinblock_mirror_last_ack_age_seconds",
        "gauge",
        "Seconds since the partner last acknowledged a record.",
    );
    let mut resyncs = Family::new(
        "twinblock_mirror_resyncs_total",
        "counter",
        "Full resynchronisations of the mirror.",
    );
    for m in pair
        .get("mirrors")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        let Some(name) = m.get("volume").and_then(Value::as_str) else {
            continue;
        };
        let l = || vec![("volume", name.to_string())];
        in_sync.add(l(), flag(m.get("in_sync") == Some(&Value::Bool(true))));
        if let Some(v) = u64_of(m, "lag_records") {
            lag_records.add(l(), v);
        }
        if let Some(v) = u64_of(m, "lag_bytes") {
            lag_bytes.add(l(), v);
        }
        if let Some(v) = u64_of(m, "last_ack_age_ms") {
            ack_age.add(l(), v / 1000.0);
        }
        if let Some(v) = u64_of(m, "resyncs") {
            resyncs.add(l(), v);
        }
    }
    for f in [in_sync, lag_records, lag_bytes, ack_age, resyncs] {
        f.write(out);
    }
}

fn render_ha(ha: &Value, out: &mut String) {
    let mut state = Family::new(
        "twinblock_ha_node_state",
        "gauge",
        "1 for this node's HA state (the `state` label).",
    );
    let mut partner = Family::new(
        "twinblock_ha_partner_state",
        "gauge",
        "1 for the partner's last reported HA state.",
    );
    let mut age = Family::new(
        "twinblock_ha_heartbeat_age_seconds",
        "gauge",
        "Age of the partner's newest status on each heartbeat path.",
    );
    let mut possible = Family::new(
        "twinblock_ha_takeover_possible",
        "gauge",
        "1 when nothing blocks a takeover of the partner.",
    );
    let mut lease = Family::new(
        "twinblock_ha_lease_left_seconds",
        "gauge",
        "How long this node may still write its disks without renewing its lease.",
    );
    if let Some(s) = ha.pointer("/node/state").and_then(Value::as_str) {
        state.add(vec![("state", s.to_lowercase())], 1.0);
    }
    if let Some(s) = ha.pointer("/partner/state").and_then(Value::as_str) {
        partner.add(vec![("state", s.to_lowercase())], 1.0);
    }
    for p in ha
        .get("paths")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(name), Some(ms)) = (p.get("path").and_then(Value::as_str), u64_of(p, "age_ms"))
        {
            age.add(vec![("path", name.to_string())], ms / 1000.0);
        }
    }
    if let Some(b) = ha.get("takeover_possible").and_then(Value::as_bool) {
        possible.add(Vec::new(), flag(b));
    }
    if let Some(ms) = ha.pointer("/node/lease_left_ms").and_then(Value::as_u64) {
        lease.add(Vec::new(), ms as f64 / 1000.0);
    }
    for f in [state, partner, age, possible, lease] {
        f.write(out);
    }
}

/// Joins exposition texts (the NBD servers of both sites during a takeover, and the node's own)
/// so that each family appears once: its HELP and TYPE lines from the first text that has it,
/// then the samples of every text, in order.
pub fn merge(texts: &[String]) -> String {
    // (family name, header lines, sample lines), in first-seen order.
    let mut families: Vec<(String, Vec<String>, Vec<String>)> = Vec::new();
    for text in texts {
        let mut current: Option<usize> = None;
        for line in text.lines() {
            if let Some(rest) = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "))
            {
                let name = rest.split(' ').next().unwrap_or("").to_string();
                let i = match families.iter().position(|f| f.0 == name) {
                    Some(i) => i,
                    None => {
                        families.push((name, Vec::new(), Vec::new()));
                        families.len() - 1
                    }
                };
                if families[i].1.len() < 2 && !families[i].1.iter().any(|l| l == line) {
                    families[i].1.push(line.to_string());
                }
                current = Some(i);
            } else if !line.is_empty() && !line.starts_with('#') {
                match current {
                    Some(i) => families[i].2.push(line.to_string()),
                    None => {
                        families.push((String::new(), Vec::new(), vec![line.to_string()]));
                        current = Some(families.len() - 1);
                    }
                }
            }
        }
    }
    let mut out = String::new();
    for (_, header, samples) in families {
        for l in header.iter().chain(samples.iter()) {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn families_have_help_type_and_labelled_samples() {
        let s = NodeSample {
            node_id: 1,
            uptime_s: 7,
            pair: Some(
                json!({"mirrors": [{"volume": "r5", "in_sync": true, "lag_records": 3,
                "lag_bytes": 4096, "last_ack_age_ms": 1500, "resyncs": 2}]}),
            ),
            ha: Some(json!({"node": {"state": "UP", "lease_left_ms": 250},
                "partner": {"state": "UP"}, "takeover_possible": false,
                "paths": [{"path": "mailbox", "age_ms": 120}, {"path": "udp", "age_ms": 40}]})),
            ..Default::default()
        };
        let t = render(&s);
        assert!(
            t.contains(
                "# TYPE twinblock_uptime_seconds gauge\ntwinblock_uptime_seconds{node=\"1\"} 7\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("twinblock_mirror_in_sync{volume=\"r5\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("twinblock_mirror_lag_bytes{volume=\"r5\"} 4096\n"),
            "{t}"
        );
        assert!(
            t.contains("twinblock_mirror_last_ack_age_seconds{volume=\"r5\"} 1.5\n"),
            "{t}"
        );
        assert!(
            t.contains("twinblock_ha_node_state{state=\"up\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("twinblock_ha_heartbeat_age_seconds{path=\"mailbox\"} 0.12\n"),
            "{t}"
        );
        assert!(t.contains("twinblock_ha_takeover_possible 0\n"), "{t}");
        // No arrays, no journals: those families are left out rather than written empty.
        assert!(!t.contains("twinblock_array_degraded"), "{t}");
    }

    #[test]
    fn read_cache_counters_are_labelled_by_volume() {
        let s = NodeSample {
            read_caches: vec![(
                "vol0".to_string(),
                crate::cache::CacheStats {
                    hits: 9,
                    misses: 2,
                    evictions: 1,
                    blocks: 5,
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let t = render(&s);
        assert!(
            t.contains(
                "# TYPE twinblock_read_cache_hits_total counter\n\
                 twinblock_read_cache_hits_total{volume=\"vol0\"} 9\n"
            ),
            "{t}"
        );
        assert!(
            t.contains("twinblock_read_cache_misses_total{volume=\"vol0\"} 2\n"),
            "{t}"
        );
        assert!(
            t.contains("twinblock_read_cache_evictions_total{volume=\"vol0\"} 1\n"),
            "{t}"
        );
        assert!(
            t.contains("twinblock_read_cache_blocks{volume=\"vol0\"} 5\n"),
            "{t}"
        );
    }

    #[test]
    fn cp_duration_is_a_histogram_per_volume() {
        use twinblock_journal::cp_timing::CpDurations;
        let mut d = CpDurations::default();
        d.observe(std::time::Duration::from_millis(3));
        d.observe(std::time::Duration::from_millis(40));
        let mut t = String::new();
        let journals: Vec<(String, VolumeStatus)> = Vec::new();
        render_cp_durations(&journals, &mut t);
        assert_eq!(t, "", "no journaled volume, no family");
        let status = |cp_durations| {
            let mut st = sample_status();
            st.cp_durations = cp_durations;
            st
        };
        render_cp_durations(&[("r5".into(), status(d))], &mut t);
        assert!(
            t.contains("# TYPE twinblock_journal_cp_duration_seconds histogram\n"),
            "{t}"
        );
        for line in [
            "twinblock_journal_cp_duration_seconds_bucket{volume=\"r5\",le=\"0.001\"} 0\n",
            "twinblock_journal_cp_duration_seconds_bucket{volume=\"r5\",le=\"0.005\"} 1\n",
            "twinblock_journal_cp_duration_seconds_bucket{volume=\"r5\",le=\"0.05\"} 2\n",
            "twinblock_journal_cp_duration_seconds_bucket{volume=\"r5\",le=\"+Inf\"} 2\n",
            "twinblock_journal_cp_duration_seconds_sum{volume=\"r5\"} 0.043\n",
            "twinblock_journal_cp_duration_seconds_count{volume=\"r5\"} 2\n",
        ] {
            assert!(t.contains(line), "no {line} in\n{t}");
        }
    }

    /// A journal status as a fresh volume reports it.
    fn sample_status() -> VolumeStatus {
        VolumeStatus {
            volume_id: 1,
            persistence: twinblock_journal::PersistenceMode::None,
            persist_method: twinblock_journal::PersistMethod::Nothing,
            generation: 1,
            log_bytes: 1 << 20,
            log_used_bytes: 0,
            next_seq: 1,
            applied_seq: 0,
            dirty_extents: 0,
            dirty_bytes: 0,
            durable_seq: 0,
            ack_survives_power_loss: false,
            cps_done: 0,
            flushes_by_partner: 0,
            flushes_by_cp: 0,
            writer_waits: 0,
            last_cp_error: None,
            cp_durations: Default::default(),
            log_persists: 0,
            group_commit_rounds: 0,
            crc_unverified_records: 0,
            corrupt: None,
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }

    #[test]
    fn merged_texts_keep_each_family_together_once() {
        let a = "# HELP x X.\n# TYPE x counter\nx{e=\"a\"} 1\n# HELP y Y.\n# TYPE y gauge\ny 2\n";
        let b = "# HELP x X.\n# TYPE x counter\nx{e=\"b\"} 3\n";
        let m = merge(&[a.to_string(), b.to_string()]);
        assert_eq!(
            m,
            "# HELP x X.\n# TYPE x counter\nx{e=\"a\"} 1\nx{e=\"b\"} 3\n# HELP y Y.\n# TYPE y gauge\ny 2\n"
        );
    }
}
