//! The HA admin requests: `twinctl takeover | giveback | takeover-disable | takeover-enable` and
//! the HA part of `twinctl status` (both nodes' states, whether takeover is possible and why
//! not, per-path heartbeat age, who holds each disk).
//!
//! Kept apart from `node.rs` so the node's admin dispatch only forwards here.

use super::controller::Snapshot;
use super::names;
use super::runtime::HaNode;
use serde_json::{json, Value};
use std::path::Path;
use twinblock_pair::reservation::{Key, ReservationFile};
use twinblock_pair::state::Command;
use twinblock_pair::status::{StatusFlags, StatusRecord, TakeoverBlocked};

/// Runs an operator command.
pub async fn operator(ha: Option<&HaNode>, cmd: Command) -> Result<Value, String> {
    let handle = require(ha)?;
    handle.operator(cmd).await?;
    let message = match cmd {
        Command::Takeover => "takeover started: `twinctl status` shows its progress",
        Command::Giveback => "giveback started: `twinctl status` shows its progress",
        Command::DisableTakeover => "takeover disabled (in both directions)",
        Command::EnableTakeover => "takeover enabled",
        Command::Stop => "stopped",
    };
    Ok(json!({ "accepted": names::command(cmd), "message": message }))
}

fn require(ha: Option<&HaNode>) -> Result<&super::controller::Handle, String> {
    let ha = ha.ok_or(
        "this node has no [ha] section: it is not part of an HA pair (see docs/CONFIG.md)",
    )?;
    ha.handle()
        .ok_or_else(|| "the HA controller has not started yet; retry in a moment".to_string())
}

/// The HA status (`null` for a node without HA).
pub async fn status(ha: Option<&HaNode>) -> Result<Value, String> {
    let Some(node) = ha else {
        return Ok(Value::Null);
    };
    let snap = require(ha)?.snapshot().await?;
    let (own_key, partner_key) = node.keys();
    let mut disks = Vec::new();
    for (set, site) in [
        ("own", node.own_disks()),
        ("partner", node.partner().disks()),
    ] {
        for d in site {
            disks.push(disk_json(&d, set, own_key, partner_key, node.node_id()));
        }
    }
    let mut out = snapshot_json(&snap, node.node_id(), disks);
    out["mailbox_disks"] = node
        .mailbox_health()
        .into_iter()
        .map(|(disk, error)| json!({ "disk": disk.display().to_string(), "error": error }))
        .collect();
    explain_mirror(&mut out, &snap, node.mirror_detail());
    Ok(out)
}

/// Adds to the MirrorOutOfSync blocker's reason which side of the mirror is not in sync.
fn explain_mirror(out: &mut Value, snap: &Snapshot, local: Option<String>) {
    let v = &snap.view;
    let mut why = Vec::new();
    if v.partner
        .as_ref()
        .is_some_and(|r| !r.flags.contains(StatusFlags::MIRROR_IN_SYNC))
    {
        why.push("the partner reports its journals out of sync in this node's copies".to_string());
    }
    if !v.mirror_in_sync {
        why.push(
            local.unwrap_or_else(|| {
                "this node's copy of the partner's journal is not usable".into()
            }),
        );
    }
    if why.is_empty() {
        return;
    }
    let code = names::blocker(TakeoverBlocked::MirrorOutOfSync);
    for b in out["takeover_blockers"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        if b["code"] == code {
            b["reason"] = json!(format!(
                "{}: {}",
                TakeoverBlocked::MirrorOutOfSync.describe(),
                why.join("; ")
            ));
        }
    }
    out["node"]["mirror_detail"] = json!(why);
}

fn blockers_json(reasons: &[TakeoverBlocked]) -> Vec<Value> {
    reasons
        .iter()
        .map(|r| json!({ "code": names::blocker(*r), "reason": r.describe() }))
        .collect()
}

fn flag_names(flags: StatusFlags) -> Vec<&'static str> {
    [
        (StatusFlags::TAKEOVER_DISABLED, "takeover_disabled"),
        (StatusFlags::MIRROR_IN_SYNC, "mirror_in_sync"),
        (StatusFlags::WAITING_FOR_GIVEBACK, "waiting_for_giveback"),
        (StatusFlags::HOLDS_PARTNER_DISKS, "holds_partner_disks"),
        (StatusFlags::GIVEBACK_IN_PROGRESS, "giveback_in_progress"),
    ]
    .into_iter()
    .filter(|(f, _)| flags.contains(*f))
    .map(|(_, n)| n)
    .collect()
}

fn partner_json(r: &StatusRecord) -> Value {
    json!({
        "node_id": r.node_id.get(),
        "state": names::wire_state(r.state),
        "generation": r.stamp.generation,
        "sequence": r.stamp.sequence,
        "flags": flag_names(r.flags),
        "lease_ms": r.lease_ms,
        "interval_ms": r.interval_ms,
        "takeover_blockers": blockers_json(&r.blocker_list()),
    })
}

/// The JSON of one controller snapshot (pure: tested below).
pub fn snapshot_json(
    snap: &Snapshot,
    node_id: twinblock_pair::status::NodeId,
    disks: Vec<Value>,
) -> Value {
    let v = &snap.view;
    json!({
        "node": {
            "node_id": node_id.get(),
            "state": names::node_state(v.state),
            "generation": v.stamp.generation,
            "sequence": v.stamp.sequence,
            "lease_left_ms": v.lease_left_ms,
            "holds_own_disks": v.holds.0,
            "holds_partner_disks": v.holds.1,
            "serving_own": v.serving.0,
            "serving_partner": v.serving.1,
            "takeover_disabled": v.takeover_disabled,
            "mirror_in_sync": v.mirror_in_sync,
            "last_error": v.last_error,
        },
        "partner": v.partner.as_ref().map(partner_json),
        "partner_version_mismatch": v.partner_version_mismatch,
        "takeover_possible": v.blockers.is_empty(),
        "takeover_blockers": blockers_json(&v.blockers),
        "paths": v.path_age_ms.iter().map(|(p, age)| json!({
            "path": p.name(),
            "age_ms": age,
        })).collect::<Vec<_>>(),
        "rejected_records": v.rejected_records,
        "undecodable_records": snap.undecodable,
        "last_undecodable": snap.last_undecodable,
        "disks": disks,
    })
}

fn key_owner(key: Key, own: Key, partner: Key, node: twinblock_pair::status::NodeId) -> String {
    if key == own {
        format!("node {} (this node)", node.get())
    } else if key == partner {
        format!("node {} (partner)", node.partner().get())
    } else {
        format!("unknown key {key:#018x}")
    }
}

fn disk_json(
    disk: &Path,
    set: &str,
    own: Key,
    partner: Key,
    node: twinblock_pair::status::NodeId,
) -> Value {
    let file = ReservationFile::for_disk(disk);
    let (holder, error) = match file.read() {
        Ok(s) => (
            s.state
                .holder()
                .map_or("none".to_string(), |k| key_owner(k, own, partner, node)),
            None,
        ),
        Err(e) => ("unknown".to_string(), Some(e.to_string())),
    };
    json!({
        "disk": disk.display().to_string(),
        "set": set,
        "holder": holder,
        "error": error,
    })
}
