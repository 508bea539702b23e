//! The admin protocol between `twinctl` and `twinblockd`: one JSON object per line over a Unix
//! socket, one request then one response per line, the connection may carry several.
//!
//! Request: `{"op":"volume_show","name":"vol0"}`. Response: `{"ok":true,"result":{...}}` or
//! `{"ok":false,"error":"what went wrong"}`. The format is documented in `docs/FORMATS.md`.

use serde::{Deserialize, Serialize};

/// Longest request line the daemon reads; longer ones are refused without buffering them all.
pub const REQUEST_LINE_BYTES_MAX: usize = 64 * 1024;
/// Version of this protocol, reported by `status`.
pub const ADMIN_PROTOCOL_VERSION: u32 = 1;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Node identity, versions, exports and arrays in brief.
    Status,
    VolumeList,
    VolumeShow {
        name: String,
    },
    /// Mark a member faulty as if it had failed.
    DiskFail {
        array: String,
        disk: String,
    },
    /// Take a faulty or spare member out of the array.
    DiskRemove {
        array: String,
        disk: String,
    },
    /// Add an image as a spare (or as the rebuild target of a degraded array).
    DiskAdd {
        array: String,
        path: String,
    },
    /// Rebuild onto `new` and then retire `old`.
    DiskReplace {
        array: String,
        old: String,
        new: String,
    },
    RebuildStatus,
    ScrubStart {
        array: String,
        #[serde(default)]
        repair: bool,
    },
    ScrubStatus,
    /// HA: both nodes' states, takeover blockers, heartbeat ages, disk holders (null: no HA).
    HaStatus,
    /// HA: take the partner over now (it must be silent on every path).
    HaTakeover,
    /// HA: give the partner's disks back.
    HaGiveback,
    /// HA: refuse takeover (in both directions) until enabled again.
    HaTakeoverDisable,
    /// HA: allow takeover again.
    HaTakeoverEnable,
    /// The journal records the mirror covers: this node's unretired records per journaled volume
    /// and its copies of the partner's, each as (seq, log offset, CRC).
    MirrorRecords,
    /// Serve a journaled volume held because its NVRAM log was lost after an unclean stop,
    /// accepting that the writes after its last consistency point are gone.
    JournalAcceptLoss {
        name: String,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(result: serde_json::Value) -> Self {
        Response {
            ok: true,
            result: Some(result),
            error: None,
        }
    }
    pub fn err(message: impl Into<String>) -> Self {
        Response {
            ok: false,
            result: None,
            error: Some(message.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_as_tagged_json() {
        let r = Request::VolumeShow {
            name: "vol0".into(),
        };
        let text = serde_json::to_string(&r).unwrap();
        assert_eq!(text, r#"{"op":"volume_show","name":"vol0"}"#);
        assert_eq!(serde_json::from_str::<Request>(&text).unwrap(), r);
    }

    #[test]
    fn unknown_op_is_an_error_not_a_panic() {
        assert!(serde_json::from_str::<Request>(r#"{"op":"format_everything"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"volume_show"}"#).is_err());
        assert!(serde_json::from_str::<Request>("not json").is_err());
    }
}
