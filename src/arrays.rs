//! Arrays of a node: opening the configured disks, creating an array on blank disks or
//! assembling it from their superblocks, and the operator's member and scrub commands.

use crate::config::{format_bytes, ArrayConfig, Config};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use twinblock_raid::array::{Array, ArrayStatus, CreateOptions, ScrubMode, ScrubReport};
use twinblock_raid::io::file::{FileMember, FileOptions};
use twinblock_raid::io::Member;
use twinblock_raid::Level;

/// Bytes read from the start of a disk to tell a blank disk from one that holds a superblock.
const SUPERBLOCK_PROBE_BYTES: usize = 4096;

/// The last scrub of an array, for `scrub status`.
#[derive(Default)]
struct ScrubState {
    mode: Option<ScrubMode>,
    task: Option<tokio::task::JoinHandle<twinblock_raid::array::Result<ScrubReport>>>,
    last: Option<Result<ScrubReport, String>>,
}

/// One configured array and what the operator did to it.
pub struct ArrayEntry {
    pub name: String,
    pub array: Array,
    /// Member I/O engine and whether O_DIRECT is in effect (as opened for the last disk).
    pub io_engine: &'static str,
    pub direct_io: bool,
    config: ArrayConfig,
    data_dir: PathBuf,
    scrub: Mutex<ScrubState>,
}

fn level_of(code: u8) -> Result<Level> {
    Level::from_code(u32::from(code)).ok_or_else(|| anyhow!("RAID level {code} is not supported"))
}

fn open_disk(path: &Path, create_size: Option<u64>, direct: bool) -> Result<Arc<FileMember>> {
    let exists = path.exists();
    if !exists && create_size.is_none() {
        bail!(
            "disk image {} does not exist; create it, or set `disk_size` in the array's config",
            path.display()
        );
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create directory {}", dir.display()))?;
    }
    Ok(FileMember::open(
        path,
        &FileOptions {
            direct,
            read_only: false,
            create_size: if exists { None } else { create_size },
            engine: Default::default(),
        },
    )?)
}

async fn is_blank(m: &Arc<dyn Member>) -> Result<bool> {
    let head = m
        .read_at(0, SUPERBLOCK_PROBE_BYTES)
        .await
        .with_context(|| format!("cannot read the superblock area of {}", m.name()))?;
    Ok(head.iter().all(|b| *b == 0))
}

/// Wraps each opened disk before the array sees it (the HA member fence); gets the disk's path.
pub type MemberWrap = Arc<dyn Fn(&Path, Arc<dyn Member>) -> Arc<dyn Member> + Send + Sync>;

impl ArrayEntry {
    /// Create the array on blank disks, or assemble it from the superblocks already there.
    pub async fn open(config: &Config, a: &ArrayConfig) -> Result<ArrayEntry> {
        ArrayEntry::open_with(config, a, None).await
    }

    /// As [`ArrayEntry::open`], each disk passed through `wrap` first.
    pub async fn open_with(
        config: &Config,
        a: &ArrayConfig,
        wrap: Option<&MemberWrap>,
    ) -> Result<ArrayEntry> {
        let level = level_of(a.level)?;
        let create = a.disk_size.map(|s| s.bytes());
        let mut created_all = true;
        let mut io = ("", false);
        let mut open = |paths: &[PathBuf]| -> Result<Vec<Arc<dyn Member>>> {
            let mut out: Vec<Arc<dyn Member>> = Vec::new();
            for p in paths {
                let path = config.resolve(p);
                created_all &= !path.exists();
                let m = open_disk(&path, create, a.direct_io)?;
                io = (m.engine(), m.direct());
                out.push(match wrap {
                    Some(w) => w(&path, m),
                    None => m,
                });
            }
            Ok(out)
        };
        let disks = open(&a.disks)?;
        let spares = open(&a.spares)?;

        let mut blank = Vec::new();
        for m in disks.iter().chain(spares.iter()) {
            blank.push(is_blank(m).await?);
        }
        let array = if blank.iter().all(|b| *b) {
            tracing::info!(
                array = %a.name,
                level = a.level,
                disks = disks.len(),
                chunk = %format_bytes(a.chunk.bytes()),
                "creating array on blank disks"
            );
            Array::create_with(
                &a.name,
                level,
                a.chunk.bytes(),
                disks,
                spares,
                CreateOptions {
                    // Images created just now are sparse and read as zeroes: nothing to discard.
                    assume_clean: created_all,
                    ..CreateOptions::default()
                },
            )
            .await?
        } else {
            let all: Vec<Arc<dyn Member>> = disks.into_iter().chain(spares).collect();
            let array = Array::assemble(all).await?;
            if array.name() != a.name {
                bail!(
                    "the disks hold array `{}`, but the config calls it `{}`; check the disks list",
                    array.name(),
                    a.name
                );
            }
            if array.level() != level {
                bail!(
                    "the disks hold a RAID {} array, but the config says level = {}",
                    array.level().code(),
                    a.level
                );
            }
            array
        };
        if let Some(rate) = a.rebuild_rate {
            array.set_rebuild_rate(rate.bytes());
        }
        let st = array.status();
        tracing::info!(
            array = %a.name,
            size = %format_bytes(st.size_bytes),
            degraded = st.degraded,
            applied_seq = st.applied_seq,
            "array ready"
        );
        Ok(ArrayEntry {
            name: a.name.clone(),
            io_engine: io.0,
            direct_io: io.1,
            array,
            config: a.clone(),
            data_dir: config.data_dir(),
            scrub: Mutex::new(ScrubState::default()),
        })
    }

    pub fn status(&self) -> ArrayStatus {
        self.array.status()
    }

    /// Find a member slot from what the operator typed: a slot number, a path, or a file name.
    fn slot_of(&self, disk: &str) -> Result<usize, String> {
        let st = self.array.status();
        if let Ok(n) = disk.parse::<usize>() {
            if n < st.members.iter().filter(|m| m.slot.is_some()).count() {
                return Ok(n);
            }
            return Err(format!("array {}: no slot {n}", self.name));
        }
        let wanted = self.resolve(disk);
        st.members
            .iter()
            .find(|m| {
                m.slot.is_some()
                    && m.name.as_deref().is_some_and(|n| {
                        Path::new(n) == wanted
                            || Path::new(n).file_name() == Some(std::ffi::OsStr::new(disk))
                    })
            })
            .and_then(|m| m.slot)
            .ok_or_else(|| {
                format!(
                    "array {}: no member `{disk}` (members: {})",
                    self.name,
                    st.members
                        .iter()
                        .filter_map(|m| m.name.clone())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            })
    }

    fn resolve(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.data_dir.join(p)
        }
    }

    fn open_new(&self, path: &str) -> Result<Arc<dyn Member>, String> {
        let path = self.resolve(path);
        let size = self.config.disk_size.map(|s| s.bytes());
        open_disk(&path, size, self.config.direct_io)
            .map(|m| m as Arc<dyn Member>)
            .map_err(|e| format!("{e:#}"))
    }

    fn keep_note(&self) -> String {
        format!(
            "update the disks/spares of array `{}` in the config file to keep this after a restart",
            self.name
        )
    }

    pub async fn fail(&self, disk: &str) -> Result<Value, String> {
        let slot = self.slot_of(disk)?;
        self.array
            .fail_member(slot)
            .await
            .map_err(|e| e.to_string())?;
        Ok(json!({ "message": format!("array {}: slot {slot} ({disk}) marked faulty", self.name) }))
    }

    pub async fn remove(&self, disk: &str) -> Result<Value, String> {
        match self.slot_of(disk) {
            Ok(slot) => self
                .array
                .remove_member(slot)
                .await
                .map_err(|e| e.to_string())?,
            Err(_) => {
                let path = self.resolve(disk);
                self.array
                    .remove_spare(&path.display().to_string())
                    .await
                    .map_err(|e| e.to_string())?
            }
        }
        Ok(
            json!({ "message": format!("array {}: {disk} removed; {}", self.name, self.keep_note()) }),
        )
    }

    pub async fn add(&self, path: &str) -> Result<Value, String> {
        let m = self.open_new(path)?;
        // Like md: a disk added to an array with a faulty member takes that member's role and is
        // rebuilt at once; otherwise it waits as a hot spare.
        let faulty = self.array.status().members.iter().find_map(|s| {
            (s.state == twinblock_raid::MemberState::Faulty)
                .then_some(s.slot)
                .flatten()
        });
        let st = match faulty {
            Some(slot) => self.array.replace_member(slot, m).await,
            None => self.array.add_member(m).await,
        }
        .map_err(|e| e.to_string())?;
        Ok(json!({
            "message": format!(
                "array {}: {path} added as {:?}{}; {}",
                self.name,
                st.state,
                st.slot.map(|s| format!(" in slot {s}")).unwrap_or_default(),
                self.keep_note()
            ),
            "member": st,
        }))
    }

    pub async fn replace(&self, old: &str, new: &str) -> Result<Value, String> {
        let slot = self.slot_of(old)?;
        let m = self.open_new(new)?;
        let st = self
            .array
            .replace_member(slot, m)
            .await
            .map_err(|e| e.to_string())?;
        Ok(json!({
            "message": format!(
                "array {}: rebuilding slot {slot} onto {new}, {old} retires when it completes; {}",
                self.name,
                self.keep_note()
            ),
            "member": st,
        }))
    }

    /// One line of `rebuild status`.
    pub fn rebuild_json(&self) -> Value {
        let st = self.array.status();
        match &st.rebuild {
            Some(r) => json!({
                "array": self.name,
                "state": if r.running { "rebuilding" } else if r.error.is_some() { "failed" } else { "done" },
                "target": r.member,
                "slot": r.slot,
                "kind": r.kind,
                "percent": r.percent,
                "done_bytes": r.done_bytes,
                "total_bytes": r.total_bytes,
                "rate_bytes_per_s": r.rate_bytes_per_sec as u64,
                "eta_s": r.eta_secs.map(|e| e.ceil() as u64),
                "error": r.error,
            }),
            None => json!({ "array": self.name, "state": "idle", "degraded": st.degraded }),
        }
    }

    pub fn start_scrub(&self, repair: bool) -> Result<Value, String> {
        let mut s = self.scrub.lock().unwrap_or_else(|p| p.into_inner());
        if s.task.as_ref().is_some_and(|t| !t.is_finished()) {
            return Err(format!("array {}: a scrub is already running", self.name));
        }
        let mode = if repair {
            ScrubMode::Repair
        } else {
            ScrubMode::Check
        };
        s.mode = Some(mode);
        s.last = None;
        s.task = Some(self.array.start_scrub(mode));
        Ok(json!({ "message": format!("array {}: scrub ({mode:?}) started", self.name) }))
    }

    pub async fn scrub_json(&self) -> Value {
        let finished = {
            let mut s = self.scrub.lock().unwrap_or_else(|p| p.into_inner());
            if s.task.as_ref().is_some_and(|t| t.is_finished()) {
                s.task.take()
            } else {
                None
            }
        };
        if let Some(task) = finished {
            let result = match task.await {
                Ok(Ok(r)) => Ok(r),
                Ok(Err(e)) => Err(e.to_string()),
                Err(e) => Err(format!("scrub task failed: {e}")),
            };
            self.scrub.lock().unwrap_or_else(|p| p.into_inner()).last = Some(result);
        }
        let s = self.scrub.lock().unwrap_or_else(|p| p.into_inner());
        let st = self.array.status();
        let running = s.task.is_some();
        let (state, report, error) = match (&s.last, running) {
            (_, true) => ("running", None, None),
            (Some(Ok(r)), false) => ("done", Some(*r), None),
            (Some(Err(e)), false) => ("failed", None, Some(e.clone())),
            (None, false) => ("idle", None, None),
        };
        json!({
            "array": self.name,
            "state": state,
            "mode": s.mode,
            "mismatches": report.map(|r| r.mismatches).unwrap_or(st.mismatch_count),
            "repaired": report.map(|r| r.repaired),
            "rows_checked": report.map(|r| r.rows_checked),
            "mismatch_count": st.mismatch_count,
            "error": error,
        })
    }
}
