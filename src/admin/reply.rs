//! Typed replies of the admin API, one struct per reply shape, so every command names a quantity
//! the same way: durations in whole seconds end in `_s` (`uptime_s`, `eta_s`), rates in
//! `_bytes_per_s`, sizes and counters in `_bytes` or a plain plural (`mismatches`). The list of
//! fields is in `docs/OPERATIONS.md`. The daemon serialises these into the `result` of a
//! response; `twinctl` reads them back as JSON.

use crate::node::VolumeInfo;
use serde::Serialize;
use std::path::PathBuf;
use twinblock_journal::{PersistenceMode, RecoveryReport, VolumeStatus};
use twinblock_nbd::ExportStatsSnapshot;
use twinblock_raid::array::{ArrayStatus, MemberStatus, ResyncKind, ScrubMode};

/// `status`: who this node is and what it serves.
#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub node_id: u8,
    pub name: Option<String>,
    pub version: &'static str,
    pub admin_protocol: u32,
    pub uptime_s: u64,
    pub nbd_listen: Vec<String>,
    pub volumes: Vec<String>,
    pub arrays: Vec<String>,
    pub nvram: Option<NvramSummary>,
    /// The HA pair: partner, interconnect, per-volume mirror state (absent without `[pair]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pair: Option<serde_json::Value>,
    /// Journaled volumes not served because their NVRAM log was lost (what, since when, why,
    /// and the command that serves them anyway).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub volumes_held: Vec<crate::nvram_loss::HeldVolume>,
}

/// The NVRAM file of [`NodeStatus`].
#[derive(Debug, Clone, Serialize)]
pub struct NvramSummary {
    pub path: PathBuf,
    pub persistence: PersistenceMode,
}

/// `volume_list` (one per volume) and `volume_show`.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeReply<'a> {
    #[serde(flatten)]
    pub info: &'a VolumeInfo,
    /// `optimal`, `degraded` or `failed`.
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal: Option<VolumeStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub journal_recovery: Option<&'a RecoveryReport>,
    /// Read cache counters (absent when the cache is off).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read_cache: Option<crate::cache::CacheStats>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stats: Option<ExportCounters>,
    /// Events kept for the operator (NVRAM loss, its acceptance, a log restored from the partner).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<crate::history::HistoryEvent>,
}

/// NBD traffic of one export since the daemon started.
#[derive(Debug, Clone, Serialize)]
pub struct ExportCounters {
    pub connections_active: u64,
    pub connections_total: u64,
    pub read_ops: u64,
    pub read_bytes: u64,
    pub write_ops: u64,
    pub write_bytes: u64,
    pub flush_ops: u64,
    pub trim_ops: u64,
    pub zero_ops: u64,
    pub errors: u64,
}

impl From<ExportStatsSnapshot> for ExportCounters {
    fn from(s: ExportStatsSnapshot) -> Self {
        ExportCounters {
            connections_active: s.connections_active,
            connections_total: s.connections_total,
            read_ops: s.read_ops,
            read_bytes: s.read_bytes,
            write_ops: s.write_ops,
            write_bytes: s.write_bytes,
            flush_ops: s.flush_ops,
            trim_ops: s.trim_ops,
            zero_ops: s.zero_ops,
            errors: s.errors,
        }
    }
}

/// Commands that change something (`disk_*`, `scrub_start`): what was done, and the member it
/// concerns where there is one.
#[derive(Debug, Clone, Serialize)]
pub struct CommandReply {
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub member: Option<MemberStatus>,
}

impl CommandReply {
    pub fn message(message: String) -> Self {
        CommandReply {
            message,
            member: None,
        }
    }
}

/// One array in `rebuild_status`.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum RebuildLine {
    /// No rebuild has run since the daemon started.
    Idle {
        array: String,
        /// Always `idle`.
        state: &'static str,
        degraded: bool,
    },
    Progress(RebuildProgress),
}

/// The current or last rebuild of an array.
#[derive(Debug, Clone, Serialize)]
pub struct RebuildProgress {
    pub array: String,
    /// `rebuilding`, `done` or `failed`.
    pub state: &'static str,
    pub target: String,
    pub slot: usize,
    pub kind: ResyncKind,
    pub percent: f64,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub rate_bytes_per_s: u64,
    pub eta_s: Option<u64>,
    pub error: Option<String>,
}

/// One array in `scrub_status`.
#[derive(Debug, Clone, Serialize)]
pub struct ScrubLine {
    pub array: String,
    /// `idle`, `running`, `done` or `failed`.
    pub state: &'static str,
    pub mode: Option<ScrubMode>,
    /// Mismatching rows found by the last (or running) scrub.
    pub mismatches: u64,
    pub repaired: Option<u64>,
    /// Rows checked by the running or last scrub, of `rows_total` (a row is one stripe).
    pub rows_checked: Option<u64>,
    pub rows_total: u64,
    /// `rows_checked` of `rows_total`, in percent (one decimal).
    pub percent: Option<f64>,
    /// While running: bytes of stripes checked per second since the start, and the time left.
    pub rate_bytes_per_s: Option<u64>,
    pub eta_s: Option<u64>,
    pub error: Option<String>,
}

/// Serialises a reply into the JSON `result` of a response.
pub fn to_result<T: Serialize>(reply: &T) -> Result<serde_json::Value, String> {
    serde_json::to_value(reply).map_err(|e| format!("cannot encode the reply: {e}"))
}
