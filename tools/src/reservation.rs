//! `twinctl disk reservation ...`: a disk's SCSI-3-style reservation, read and edited straight
//! on its lock file, as `sg_persist` works on a device. It needs no daemon, so an operator can
//! inspect and repair reservations with both nodes stopped.
//!
//! The lock file of disk image `DISK` is `DISK.resv` (a path ending in `.resv` is taken as the
//! lock file itself). Updates go through `twinblock_pair::reservation::ReservationFile`, so they
//! take the same `flock` as a running node and are atomic and durable. Parsing of arguments and
//! building of the output are pure functions; only [`run`] touches files and stdout.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use twinblock_pair::reservation::{
    file::RESERVATION_SUFFIX, Key, Op, ReservationError, ReservationFile, ReservationType, Snapshot,
};

/// The only reservation type the pair uses.
const KIND: ReservationType = ReservationType::WriteExclusiveRegistrantsOnly;

#[derive(Subcommand, Debug)]
pub enum ReservationCmd {
    /// Registered keys (hex), the holder and the type.
    Show(DiskArg),
    /// Register a key (idempotent).
    Register(KeyArgs),
    /// Remove a key; if it held the reservation, the reservation goes too.
    Unregister(KeyArgs),
    /// Reserve the disk for a registered key (write exclusive, registrants only).
    Reserve(KeyArgs),
    /// Release the reservation (holder only; nothing to do when none is held).
    Release(KeyArgs),
    /// Remove the victim's key and take the reservation for --key (which must be registered).
    Preempt(PreemptArgs),
    /// Remove every key and the reservation. Refused while a key holds the reservation unless
    /// --force; --force also rewrites a corrupt file empty.
    Clear(ClearArgs),
}

#[derive(Args, Debug)]
pub struct DiskArg {
    /// The disk image (its lock file is DISK.resv), or the .resv lock file itself.
    disk: PathBuf,
}

#[derive(Args, Debug)]
pub struct KeyArgs {
    #[command(flatten)]
    target: DiskArg,
    /// Reservation key: hex with 0x, or decimal; not 0.
    #[arg(long, value_parser = parse_key)]
    key: Key,
}

#[derive(Args, Debug)]
pub struct PreemptArgs {
    #[command(flatten)]
    target: DiskArg,
    /// The preempting key (must be registered).
    #[arg(long, value_parser = parse_key)]
    key: Key,
    /// The key to remove (usually the other node's).
    #[arg(long, value_parser = parse_key)]
    victim: Key,
}

#[derive(Args, Debug)]
pub struct ClearArgs {
    #[command(flatten)]
    target: DiskArg,
    /// Clear as this registered key (SCSI CLEAR); without it the operator clears with no key.
    #[arg(long, value_parser = parse_key)]
    key: Option<Key>,
    /// Clear even if a key holds the reservation (its node may be alive: stop it first), and
    /// rewrite a corrupt file empty.
    #[arg(long)]
    force: bool,
}

/// A key argument: `0x` + hex digits, or decimal; 0 is refused.
pub fn parse_key(s: &str) -> Result<Key, String> {
    let t = s.trim();
    let parsed = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        Some(hex) => Key::from_str_radix(hex, 16),
        None => t.parse::<Key>(),
    };
    match parsed {
        Ok(0) => Err("key 0 is not a valid reservation key".into()),
        Ok(k) => Ok(k),
        Err(e) => Err(format!(
            "`{s}` is not a key ({e}): give hex with 0x (0x54420001) or decimal"
        )),
    }
}

/// `0x` + 16 hex digits, the way keys are always printed.
pub fn hex(key: Key) -> String {
    format!("{key:#018x}")
}

/// The lock file for the DISK argument; the disk image (or the lock file) must exist, so a
/// mistyped name is an error instead of a new lock file beside nothing.
fn lock_file(disk: &Path) -> Result<ReservationFile> {
    let is_lock_file = disk
        .file_name()
        .is_some_and(|n| n.to_string_lossy().ends_with(RESERVATION_SUFFIX));
    if is_lock_file {
        return Ok(ReservationFile::at(disk));
    }
    if !disk.exists() {
        bail!(
            "{}: no such disk image (give the disk image path; its lock file is DISK{RESERVATION_SUFFIX})",
            disk.display()
        );
    }
    Ok(ReservationFile::for_disk(disk))
}

/// The JSON object of a state (also the body of every mutating command's answer).
pub fn state_json(file: &ReservationFile, exists: bool, snap: &Snapshot) -> Value {
    json!({
        "file": file.path().display().to_string(),
        "exists": exists,
        "generation": snap.generation,
        "reservation": snap.state.reservation().map(|r| json!({
            "holder": hex(r.holder),
            "type": r.kind.name(),
        })),
        "keys": snap.state.keys().iter().map(|&k| hex(k)).collect::<Vec<_>>(),
    })
}

/// The human form of a state: a few `name  value` lines and a table of keys.
pub fn state_text(file: &ReservationFile, exists: bool, snap: &Snapshot) -> String {
    let mut out = format!("reservation file  {}", file.path().display());
    if !exists {
        out.push_str("  (absent: no keys, no reservation)");
    }
    out.push_str(&format!("\ngeneration        {}\n", snap.generation));
    match snap.state.reservation() {
        Some(r) => out.push_str(&format!(
            "reservation       {}, held by {}\n",
            r.kind,
            hex(r.holder)
        )),
        None => out.push_str("reservation       none\n"),
    }
    let keys = snap.state.keys();
    if keys.is_empty() {
        out.push_str("keys              none\n");
        return out;
    }
    out.push('\n');
    let rows: Vec<Vec<String>> = keys
        .iter()
        .map(|&k| {
            let holder = if snap.state.holds(k) { "yes" } else { "-" };
            vec![hex(k), holder.to_string()]
        })
        .collect();
    out.push_str(&crate::render::table(&["KEY", "HOLDER"], &rows));
    out
}

fn print_state(json: bool, file: &ReservationFile, snap: &Snapshot, extra: Value) -> Result<()> {
    let exists = file.path().exists();
    if json {
        let mut v = state_json(file, exists, snap);
        if let (Some(obj), Value::Object(more)) = (v.as_object_mut(), extra) {
            obj.extend(more);
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", state_text(file, exists, snap));
    }
    Ok(())
}

/// The operation a mutating subcommand asks for, and its disk.
fn op_of(cmd: &ReservationCmd) -> Option<(&DiskArg, Op)> {
    Some(match cmd {
        ReservationCmd::Show(_) => return None,
        ReservationCmd::Register(a) => (&a.target, Op::Register { key: a.key }),
        ReservationCmd::Unregister(a) => (&a.target, Op::Unregister { key: a.key }),
        ReservationCmd::Reserve(a) => (
            &a.target,
            Op::Reserve {
                key: a.key,
                kind: KIND,
            },
        ),
        ReservationCmd::Release(a) => (&a.target, Op::Release { key: a.key }),
        ReservationCmd::Preempt(a) => (
            &a.target,
            Op::Preempt {
                key: a.key,
                victim: a.victim,
                kind: KIND,
            },
        ),
        ReservationCmd::Clear(a) => (
            &a.target,
            Op::Clear {
                key: a.key,
                allow_held: a.force,
            },
        ),
    })
}

/// Run one `disk reservation` subcommand.
pub fn run(cmd: &ReservationCmd, json: bool) -> Result<()> {
    match cmd {
        ReservationCmd::Show(target) => {
            let file = lock_file(&target.disk)?;
            let snap = file.read().context("disk reservation show")?;
            return print_state(json, &file, &snap, json!({}));
        }
        ReservationCmd::Clear(a) if a.force && a.key.is_none() => {
            return clear_forced(&lock_file(&a.target.disk)?, json);
        }
        _ => {}
    }
    let Some((target, op)) = op_of(cmd) else {
        bail!("internal: `disk reservation` has no operation for {cmd:?}");
    };
    let file = lock_file(&target.disk)?;
    let update = file.update(&op).map_err(|e| match e.refusal() {
        Some(ReservationError::ClearWouldDropHolder { .. }) => {
            anyhow!("{e}, then rerun with --force")
        }
        _ => anyhow!(e),
    });
    let update = update.with_context(|| format!("disk reservation {}", op.name()))?;
    if !json {
        if update.changed() {
            println!(
                "{}: done (generation {} -> {})",
                op.name(),
                update.before.generation,
                update.after.generation
            );
        } else {
            println!("{}: nothing to change", op.name());
        }
    }
    let extra = json!({ "op": op.name(), "changed": update.changed() });
    print_state(json, &file, &update.after, extra)
}

/// `clear --force` without a key: the recovery path, which also rewrites a corrupt file.
fn clear_forced(file: &ReservationFile, json: bool) -> Result<()> {
    let out = file
        .clear_forced()
        .context("disk reservation clear --force")?;
    let corrupt = out.before.as_ref().err().map(|e| e.to_string());
    if !json {
        match (&corrupt, &out.before) {
            (Some(why), _) => println!("clear: the old file was corrupt ({why}); rewritten empty"),
            (None, Ok(old)) => match old.state.holder() {
                Some(h) => println!("clear: forced; dropped the reservation of {}", hex(h)),
                None => println!("clear: done"),
            },
            (None, Err(_)) => {}
        }
    }
    let extra =
        json!({ "op": "clear", "changed": true, "forced": true, "recovered_corrupt": corrupt });
    print_state(json, file, &out.after, extra)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_parses_hex_and_decimal() {
        assert_eq!(parse_key("0x10"), Ok(16));
        assert_eq!(parse_key("0XfF"), Ok(255));
        assert_eq!(parse_key("42"), Ok(42));
        assert_eq!(parse_key("0xffffffffffffffff"), Ok(u64::MAX));
    }

    #[test]
    fn key_refuses_zero_garbage_and_overflow() {
        assert!(parse_key("0").is_err());
        assert!(parse_key("0x0").is_err());
        assert!(parse_key("ten").is_err());
        assert!(parse_key("0x1ffffffffffffffff").is_err());
        assert!(parse_key("-1").is_err());
    }

    #[test]
    fn keys_print_as_fixed_width_hex() {
        assert_eq!(hex(0x5442_0001), "0x0000000054420001");
    }
}
