//! A volume's history: events an operator must be able to find later (an NVRAM loss, who
//! accepted it, a log restored from the partner), kept as one JSON object per line in
//! `<data_dir>/<volume>.history.jsonl` and shown by `twinctl volume show`.
//!
//! Appending is best effort: failing to record an event is logged and never stops the volume
//! (the same event is also in the daemon's log). Reading skips lines that do not parse, so a torn
//! last line after a crash costs that line only.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Most events `twinctl volume show` returns (the newest).
pub const HISTORY_SHOWN_EVENTS_MAX: usize = 50;

/// One event of a volume's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryEvent {
    pub unix_ms: u64,
    /// What happened, as a short fixed word: `nvram-loss-detected`, `nvram-loss-accepted`,
    /// `nvram-restored-from-partner`.
    pub event: String,
    /// The sentence that explains it.
    pub detail: String,
}

/// Where the history of volume `name` is kept.
pub fn history_path(data_dir: &Path, name: &str) -> PathBuf {
    data_dir.join(format!("{name}.history.jsonl"))
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Appends an event (and logs a warning when it cannot).
pub fn record(data_dir: &Path, name: &str, event: &str, detail: &str) {
    let e = HistoryEvent {
        unix_ms: now_ms(),
        event: event.to_string(),
        detail: detail.to_string(),
    };
    let path = history_path(data_dir, name);
    let result = (|| -> std::io::Result<()> {
        std::fs::create_dir_all(data_dir)?;
        let mut line = serde_json::to_vec(&e).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        f.write_all(&line)?;
        f.sync_data()
    })();
    if let Err(err) = result {
        tracing::warn!(volume = %name, file = %path.display(), event, "cannot record the event in the volume's history: {err}");
    }
}

/// The newest events (at most [`HISTORY_SHOWN_EVENTS_MAX`]), oldest first; none when there is
/// no history file.
pub fn read(data_dir: &Path, name: &str) -> Vec<HistoryEvent> {
    let Ok(text) = std::fs::read_to_string(history_path(data_dir, name)) else {
        return Vec::new();
    };
    let all: Vec<HistoryEvent> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let skip = all.len().saturating_sub(HISTORY_SHOWN_EVENTS_MAX);
    all.into_iter().skip(skip).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_kept_in_order_and_torn_lines_skipped() {
        let dir = tempfile::tempdir().unwrap();
        record(
            dir.path(),
            "v0",
            "nvram-loss-detected",
            "lost seq 5 and later",
        );
        record(dir.path(), "v0", "nvram-loss-accepted", "by the operator");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(history_path(dir.path(), "v0"))
            .unwrap();
        f.write_all(b"{\"unix_ms\":1,\"eve").unwrap();
        let got = read(dir.path(), "v0");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].event, "nvram-loss-detected");
        assert_eq!(got[1].event, "nvram-loss-accepted");
        assert!(read(dir.path(), "other").is_empty());
    }
}
