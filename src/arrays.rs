//! Arrays of a node: opening the configured disks, creating an array on blank disks or
//! assembling it from their superblocks, and the operator's member and scrub commands.

use crate::admin::reply::{to_result, CommandReply, RebuildLine, RebuildProgress, ScrubLine};
use crate::candidates::{self, Found, Selection};
use crate::config::disks::{matches as matches_pattern, DiskEntry};
use crate::config::{format_bytes, ArrayConfig, Config};
use crate::disk_check;
use anyhow::{anyhow, bail, Context, Result};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use twinblock_io::file::{FileMember, FileOptions};
use twinblock_io::Member;
use twinblock_raid::array::{
    Array, ArrayStatus, AssembleOptions, CreateOptions, ScrubMode, ScrubReport,
};
use twinblock_raid::superblock::{Superblock, SUPERBLOCK_BYTES};
use twinblock_raid::Level;

/// The last scrub of an array, for `scrub status`.
#[derive(Default)]
struct ScrubState {
    mode: Option<ScrubMode>,
    /// When the running (or last) scrub started, for its rate.
    started: Option<std::time::Instant>,
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

/// Opens a disk image, creating it at `create_size` when it does not exist. Never creates a
/// directory: a path in a missing directory is refused. Returns the member and whether this call
/// created the image (so a refused command can remove it again).
fn open_disk(
    path: &Path,
    create_size: Option<u64>,
    direct: bool,
) -> Result<(Arc<FileMember>, bool)> {
    let exists = path.exists();
    if !exists && create_size.is_none() {
        bail!(
            "disk image {} does not exist; create it, or set `disk_size` in the array's config",
            path.display()
        );
    }
    if !exists {
        if let Some(why) = disk_check::missing_directory(path) {
            bail!("{why}");
        }
    }
    let m = FileMember::open(
        path,
        &FileOptions {
            direct,
            read_only: false,
            create_size: if exists { None } else { create_size },
            engine: Default::default(),
        },
    )?;
    Ok((m, !exists))
}

/// Removes an image a refused command created, so the refusal leaves nothing behind.
fn forget_created(created: Option<PathBuf>) {
    if let Some(p) = created {
        if let Err(e) = std::fs::remove_file(&p) {
            tracing::warn!(path = %p.display(), "cannot remove the image created for a refused command: {e}");
        }
    }
}

/// Refuses to create an array unless every disk is blank; the refusal names the disk and what
/// was found on it. Warns (log) when the disks differ in size.
fn check_blank_for_create(
    a: &ArrayConfig,
    all: &[Arc<dyn Member>],
    contents: &[disk_check::Contents],
) -> Result<()> {
    for (m, c) in all.iter().zip(contents) {
        if *c != disk_check::Contents::Blank {
            bail!(
                "disk {} {}; refusing to create array `{}` on it (creation discards the data \
                 area). If that data is not wanted, wipe the disk (e.g. `wipefs -a` and zero its \
                 first 4 KiB), or name another disk",
                m.name(),
                c.describe(),
                a.name
            );
        }
    }
    let sizes: Vec<(String, u64)> = all
        .iter()
        .map(|m| (m.name().to_string(), m.size()))
        .collect();
    if let Some(w) = disk_check::size_mismatch(&sizes) {
        tracing::warn!(array = %a.name, "{w}");
    }
    Ok(())
}

/// A borrowed member wrapper (the HA fence, or none) as the creation path takes it.
type WrapRef<'a> = dyn Fn(&Path, Arc<dyn Member>) -> Arc<dyn Member> + Sync + 'a;

/// Reads what each opened candidate holds (contents and, for ours, the superblock).
async fn probe_candidates(opened: &[(PathBuf, Arc<dyn Member>)]) -> Result<Vec<Found>> {
    let mut found = Vec::with_capacity(opened.len());
    for (path, m) in opened {
        let contents = disk_check::probe_member(m)
            .await
            .with_context(|| format!("cannot read the start and end of {}", path.display()))?;
        let superblock = if contents == disk_check::Contents::Twinblock {
            let head = m
                .read_at(0, SUPERBLOCK_BYTES)
                .await
                .with_context(|| format!("cannot read the superblock of {}", path.display()))?;
            Some(Superblock::decode(&head).map_err(|e| e.to_string()))
        } else {
            None
        };
        found.push(Found {
            name: path.display().to_string(),
            contents,
            superblock,
        });
    }
    Ok(found)
}

/// "disk X holds array `md0`" for the first candidate holding another twinblock array.
pub fn other_array(found: &[Found]) -> Option<String> {
    found.iter().find_map(|f| match &f.superblock {
        Some(Ok(sb)) => Some(format!(
            "disk {} holds another array, `{}` ({})",
            f.name, sb.name, sb.array_uuid
        )),
        _ => None,
    })
}

/// "d0.img is blank, d1.img does not exist, ..." for the refusal when an array is not found.
fn describe_found(
    config: &Config,
    a: &ArrayConfig,
    found: &[Found],
    opened: &[(PathBuf, Arc<dyn Member>)],
) -> String {
    let mut parts = Vec::new();
    for p in a.disks.iter().chain(a.spares.iter()) {
        let path = config.resolve(p);
        match opened.iter().position(|(o, _)| *o == path) {
            Some(i) => parts.push(format!(
                "{} {}",
                path.display(),
                match &found[i].superblock {
                    Some(Ok(sb)) => format!("holds array `{}`", sb.name),
                    _ => found[i].contents.describe(),
                }
            )),
            None => parts.push(format!("{} does not exist", path.display())),
        }
    }
    if parts.is_empty() {
        return "no disk matches".into();
    }
    parts.join("; ")
}

/// Assembles from the chosen members and checks the result against the config.
async fn assemble_checked(
    a: &ArrayConfig,
    level: Level,
    members: Vec<Arc<dyn Member>>,
    journaled: bool,
) -> Result<Array> {
    let array = Array::assemble_with(
        members,
        AssembleOptions {
            start_dirty_degraded: a.start_dirty_degraded,
            journaled,
        },
    )
    .await?;
    if array.level() != level {
        bail!(
            "array `{}`: the disks hold a RAID {} array, but the config says level = {}",
            a.name,
            array.level().code(),
            a.level
        );
    }
    Ok(array)
}

/// An array made by [`create_array`]: the array (open, to be served or closed), the member I/O
/// engine, and what the creation changed on disk, so a later failing step can undo it.
pub struct Created {
    pub array: Array,
    pub io: (&'static str, bool),
    /// Images that did not exist and were made for the array (removing them undoes that).
    pub new_images: Vec<PathBuf>,
    /// Disks that existed (blank) and now hold the array's metadata.
    pub used_disks: Vec<PathBuf>,
}

/// Opens the candidates of array `a` (members and spares) that exist; missing ones are left out.
fn open_existing_candidates(
    config: &Config,
    a: &ArrayConfig,
) -> Result<Vec<(PathBuf, Arc<dyn Member>)>> {
    let mut opened: Vec<(PathBuf, Arc<dyn Member>)> = Vec::new();
    for p in a.disks.iter().chain(a.spares.iter()) {
        let path = config.resolve(p);
        if path.exists() {
            let (m, _) = open_disk(&path, None, a.direct_io)?;
            opened.push((path, m));
        }
    }
    Ok(opened)
}

/// Whether a candidate of array `a` holds it already (read-only).
pub async fn array_exists(config: &Config, a: &ArrayConfig) -> Result<bool> {
    let opened = open_existing_candidates(config, a)?;
    let found = probe_candidates(&opened).await?;
    Ok(matches!(
        candidates::select(&a.name, a.uuid, &found)?,
        Selection::Assemble { .. }
    ))
}

/// Creates array `a` over its new members and the spares (the path of `create = true` at start
/// and of `twinctl create`): refuses when a candidate holds another twinblock array, creates
/// missing images at `disk_size`, requires every disk to be blank and big enough. Images made
/// here are removed again when the creation fails.
pub async fn create_array(
    config: &Config,
    a: &ArrayConfig,
    wrap: Option<&MemberWrap>,
) -> Result<Created> {
    let level = level_of(a.level)?;
    let wrapped = |path: &Path, m: Arc<dyn Member>| match wrap {
        Some(w) => w(path, m),
        None => m,
    };
    let opened = open_existing_candidates(config, a)?;
    let found = probe_candidates(&opened).await?;
    drop(opened);
    if let Some(other) = other_array(&found) {
        bail!(
            "array `{}`: {other}; creating `{}` would destroy it: correct the array's `name` or \
             `disks`",
            a.name,
            a.name
        );
    }
    if let candidates::Selection::Assemble { .. } = candidates::select(&a.name, a.uuid, &found)? {
        bail!(
            "array `{}` exists already on its disks; it is assembled at start, not created",
            a.name
        );
    }
    let mut new_images = Vec::new();
    let result = create_new(config, a, level, &wrapped, &mut new_images).await;
    match result {
        Ok((array, io, used_disks)) => Ok(Created {
            array,
            io,
            new_images,
            used_disks,
        }),
        Err(e) => {
            for p in new_images {
                forget_created(Some(p));
            }
            Err(e)
        }
    }
}

/// Creates the array (no candidate holds it) over its new members and the spares, creating
/// missing images at `disk_size` (each one pushed to `new_images` as soon as it exists); every
/// disk must be blank. Returns the array, the member I/O engine and the disks that existed.
async fn create_new(
    config: &Config,
    a: &ArrayConfig,
    level: Level,
    wrapped: &WrapRef<'_>,
    new_images: &mut Vec<PathBuf>,
) -> Result<(Array, (&'static str, bool), Vec<PathBuf>)> {
    let create = a.disk_size.map(|s| s.bytes());
    if let Some(why) = create
        .and_then(|s| disk_check::too_small("images created from `disk_size`", s, a.chunk.bytes()))
    {
        bail!("array `{}`: {why}", a.name);
    }
    let mut io = ("", false);
    let mut used_disks = Vec::new();
    let mut open = |paths: &[PathBuf]| -> Result<Vec<Arc<dyn Member>>> {
        let mut out = Vec::new();
        for p in paths {
            let path = config.resolve(p);
            let (m, created) = open_disk(&path, create, a.direct_io)?;
            if created {
                new_images.push(path.clone());
            } else {
                used_disks.push(path.clone());
            }
            io = (m.engine(), m.direct());
            out.push(wrapped(&path, m));
        }
        Ok(out)
    };
    let disks = open(a.new_members())?;
    let spares = open(&a.spares)?;
    let all: Vec<Arc<dyn Member>> = disks.iter().chain(spares.iter()).cloned().collect();
    let mut contents = Vec::with_capacity(all.len());
    for m in &all {
        if let Some(why) = disk_check::too_small(m.name(), m.size(), a.chunk.bytes()) {
            bail!("array `{}`: {why}", a.name);
        }
        contents.push(
            disk_check::probe_member(m)
                .await
                .with_context(|| format!("cannot read the start and end of {}", m.name()))?,
        );
    }
    check_blank_for_create(a, &all, &contents)?;
    tracing::info!(
        array = %a.name,
        level = a.level,
        disks = disks.len(),
        chunk = %format_bytes(a.chunk.bytes()),
        "creating array on blank disks"
    );
    let array = Array::create_with(
        &a.name,
        level,
        a.chunk.bytes(),
        disks,
        spares,
        CreateOptions {
            // Images created just now are sparse and read as zeroes: nothing to discard.
            assume_clean: used_disks.is_empty(),
            ..CreateOptions::default()
        },
    )
    .await?;
    Ok((array, io, used_disks))
}

/// A running scrub's rate (bytes of stripes per second) and time left, from the rows done so
/// far and the time since it started; `None` until it has run a moment.
fn scrub_rate_eta(
    done_rows: u64,
    total_rows: u64,
    stripe_bytes: u64,
    elapsed: std::time::Duration,
) -> (Option<u64>, Option<u64>) {
    let secs = elapsed.as_secs_f64();
    if secs < 0.1 || done_rows == 0 {
        return (None, None);
    }
    let rate = done_rows as f64 * stripe_bytes as f64 / secs;
    let left = total_rows.saturating_sub(done_rows) as f64 * stripe_bytes as f64;
    (Some(rate as u64), Some((left / rate).ceil() as u64))
}

/// A member state as a word for messages (`active`, `spare`, ...).
pub fn state_word(s: twinblock_raid::MemberState) -> &'static str {
    use twinblock_raid::MemberState as S;
    match s {
        S::Active => "active",
        S::Spare => "spare",
        S::Rebuilding => "rebuilding",
        S::Faulty => "faulty",
        S::Missing => "missing",
    }
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
        let wrapped = |path: &Path, m: Arc<dyn Member>| match wrap {
            Some(w) => w(path, m),
            None => m,
        };
        let mut io = ("", false);
        let mut opened: Vec<(PathBuf, Arc<dyn Member>)> = Vec::new();
        for p in a.disks.iter().chain(a.spares.iter()) {
            let path = config.resolve(p);
            if !path.exists() {
                continue; // Judged below: created with a new array, else reported missing.
            }
            let (m, _) = open_disk(&path, None, a.direct_io)?;
            io = (m.engine(), m.direct());
            opened.push((path, m));
        }
        let found = probe_candidates(&opened).await?;
        let selection = candidates::select(&a.name, a.uuid, &found)?;
        let array = match selection {
            Selection::Assemble { members, skipped } => {
                for (i, why) in skipped {
                    tracing::info!(array = %a.name, disk = %found[i].name, "candidate not used: {why}");
                }
                for p in a.disks.iter().chain(a.spares.iter()) {
                    let path = config.resolve(p);
                    if !path.exists() && !a.new_members().contains(p) {
                        tracing::warn!(array = %a.name, disk = %path.display(), "candidate disk does not exist");
                    }
                }
                let chosen: Vec<Arc<dyn Member>> = members
                    .iter()
                    .map(|&i| wrapped(&opened[i].0, opened[i].1.clone()))
                    .collect();
                // A journaled volume on the array replays the journal's partial-parity log
                // before any write: an unclean degraded start waits for it instead of failing.
                let journaled = config
                    .volumes
                    .iter()
                    .any(|v| v.journal && v.array.as_deref() == Some(a.name.as_str()));
                assemble_checked(a, level, chosen, journaled).await?
            }
            Selection::Absent if !a.create => bail!(
                "array `{}`: none of its {} candidate disks holds it ({}); to create it on blank \
                 disks, set `create = true` (and `disk_size` to create the images), or correct \
                 `disks`",
                a.name,
                a.disks.len() + a.spares.len(),
                describe_found(config, a, &found, &opened)
            ),
            Selection::Absent => {
                // Probes the candidates again: creation must judge what is on them now.
                let created = create_array(config, a, wrap).await?;
                io = created.io;
                created.array
            }
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

    /// Opens (or creates, at `disk_size`) the disk an operator names for `add` or `replace`.
    /// Refuses a disk holding another format's signature. Also returns the path when this call
    /// created the image, so a refused command can take it away again.
    async fn open_new(&self, path: &str) -> Result<(Arc<dyn Member>, Option<PathBuf>), String> {
        let path = self.resolve(path);
        let size = self.config.disk_size.map(|s| s.bytes());
        let (m, created) =
            open_disk(&path, size, self.config.direct_io).map_err(|e| format!("{e:#}"))?;
        let m: Arc<dyn Member> = m;
        let created = created.then_some(path);
        let refusal = match disk_check::probe_member(&m).await {
            Ok(c @ disk_check::Contents::Foreign(_)) => Some(format!(
                "array {}: disk {} {}; it is not added (a member's contents are overwritten). \
                 Wipe it first if that data is not wanted",
                self.name,
                m.name(),
                c.describe()
            )),
            Ok(_) => None,
            Err(e) => Some(format!(
                "array {}: cannot read {}: {e}",
                self.name,
                m.name()
            )),
        };
        match refusal {
            Some(why) => {
                forget_created(created);
                Err(why)
            }
            None => Ok((m, created)),
        }
    }

    /// What the operator must do for a disk added or swapped in to be found at the next start:
    /// nothing when a `disks`/`spares` entry names or matches it.
    fn keep_note(&self, disk: &str) -> String {
        let path = self.resolve(disk);
        let listed = self
            .config
            .disk_entries
            .iter()
            .chain(self.config.spare_entries.iter())
            .filter_map(|t| DiskEntry::parse(t).ok())
            .any(|e| match e {
                DiskEntry::Path(p) => self.resolve(&p.to_string_lossy()) == path,
                DiskEntry::Pattern { dir, name } => {
                    path.parent() == Some(self.resolve(&dir.to_string_lossy()).as_path())
                        && path
                            .file_name()
                            .and_then(|n| n.to_str())
                            .is_some_and(|n| matches_pattern(&name, n))
                }
            });
        if listed {
            String::new()
        } else {
            format!(
                "; {} is not among the candidate disks of array `{}` in the config: add it to \
                 `disks` (or use a pattern that matches it) so the next start finds it",
                path.display(),
                self.name
            )
        }
    }

    pub async fn fail(&self, disk: &str) -> Result<Value, String> {
        let slot = self.slot_of(disk)?;
        self.array
            .operator_fail_member(slot)
            .await
            .map_err(|e| e.to_string())?;
        to_result(&CommandReply::message(format!(
            "array {}: slot {slot} ({disk}) marked faulty",
            self.name
        )))
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
        to_result(&CommandReply::message(format!(
            "array {}: {disk} removed (its superblock stays: while it matches the config's \
             `disks`, the next start finds it again; move or wipe it to keep it out)",
            self.name
        )))
    }

    pub async fn add(&self, path: &str) -> Result<Value, String> {
        let (m, created) = self.open_new(path).await?;
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
        .map_err(|e| {
            forget_created(created);
            e.to_string()
        })?;
        to_result(&CommandReply {
            message: format!(
                "array {}: {path} added as {}{}{}",
                self.name,
                state_word(st.state),
                st.slot.map(|s| format!(" in slot {s}")).unwrap_or_default(),
                self.keep_note(path)
            ),
            member: Some(st),
        })
    }

    pub async fn replace(&self, old: &str, new: &str) -> Result<Value, String> {
        let slot = self.slot_of(old)?;
        let (m, created) = self.open_new(new).await?;
        let st = self.array.replace_member(slot, m).await.map_err(|e| {
            forget_created(created);
            e.to_string()
        })?;
        to_result(&CommandReply {
            message: format!(
                "array {}: rebuilding slot {slot} onto {new}, {old} retires when it completes{}",
                self.name,
                self.keep_note(new)
            ),
            member: Some(st),
        })
    }

    /// One line of `rebuild status`.
    pub fn rebuild_line(&self) -> RebuildLine {
        let st = self.array.status();
        match st.rebuild {
            Some(r) => RebuildLine::Progress(RebuildProgress {
                array: self.name.clone(),
                state: if r.running {
                    "rebuilding"
                } else if r.error.is_some() {
                    "failed"
                } else {
                    "done"
                },
                target: r.member,
                slot: r.slot,
                kind: r.kind,
                percent: r.percent,
                done_bytes: r.done_bytes,
                total_bytes: r.total_bytes,
                rate_bytes_per_s: r.rate_bytes_per_sec as u64,
                eta_s: r.eta_secs.map(|e| e.ceil() as u64),
                error: r.error,
            }),
            None => RebuildLine::Idle {
                array: self.name.clone(),
                state: "idle",
                degraded: st.degraded,
            },
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
        s.started = Some(std::time::Instant::now());
        s.last = None;
        s.task = Some(self.array.start_scrub(mode));
        to_result(&CommandReply::message(format!(
            "array {}: scrub ({}) started",
            self.name,
            if repair {
                "check and repair"
            } else {
                "check only"
            }
        )))
    }

    pub async fn scrub_line(&self) -> ScrubLine {
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
        let rows_checked = match (running, report) {
            (true, _) => Some(st.scrub_rows_checked),
            (false, Some(r)) => Some(r.rows_checked),
            (false, None) => None,
        };
        let percent = rows_checked
            .filter(|_| st.scrub_rows_total > 0)
            .map(|r| (r as f64 * 1000.0 / st.scrub_rows_total as f64).round() / 10.0);
        let (rate, eta) = match (running, s.started, rows_checked) {
            (true, Some(t), Some(done)) => {
                scrub_rate_eta(done, st.scrub_rows_total, st.stripe_bytes, t.elapsed())
            }
            _ => (None, None),
        };
        ScrubLine {
            array: self.name.clone(),
            state,
            mode: s.mode,
            mismatches: report.map(|r| r.mismatches).unwrap_or(st.mismatch_count),
            repaired: report.map(|r| r.repaired),
            rows_checked,
            rows_total: st.scrub_rows_total,
            percent,
            rate_bytes_per_s: rate,
            eta_s: eta,
            error,
        }
    }
}
