//! Explicit creation, `twinctl create`: makes everything a node's config names that does not
//! exist yet (disk images, arrays, volume images) in one step, before the node first starts.
//!
//! Shaped as plan, then apply, then (on failure) undo:
//! - the plan is `--check`'s read-only inspection of the config as if every array said
//!   `create = true`; any problem it finds (a disk holding a known signature, a missing
//!   directory, a disk too small, no `disk_size` for a missing image) refuses the whole command
//!   before anything is written, so a refusal leaves every file as it was;
//! - applying goes through the node's own creation path (`crate::arrays::create_array`, the code
//!   `create = true` runs at start), which judges every disk again;
//! - each change is logged as it is made, and when a later step fails the log is undone in
//!   reverse: images made here are removed, and disks that existed (blank) have their metadata
//!   area zeroed again, so they read as blank to every later check.
//!
//! Arrays that exist already are left alone and reported. NVRAM files are not made here: the
//! node makes (and formats) them at its start.

use crate::arrays;
use crate::config::{format_bytes, Config};
use anyhow::{bail, Context, Result};
use serde::Serialize;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use twinblock_raid::superblock::DATA_OFFSET_BYTES;

/// What `create` made and found, for its output (`--json` prints it as is).
#[derive(Debug, Default, Clone, Serialize)]
pub struct CreateReport {
    /// Config files written (with `create --pair`).
    pub configs: Vec<PathBuf>,
    /// Arrays created.
    pub arrays: Vec<ArrayMade>,
    /// Arrays whose disks hold them already (left as they are).
    pub arrays_existing: Vec<String>,
    /// Disk and volume images created (sparse).
    pub images: Vec<PathBuf>,
    /// Worth knowing (members of different sizes).
    pub warnings: Vec<String>,
}

/// One array created.
#[derive(Debug, Clone, Serialize)]
pub struct ArrayMade {
    pub name: String,
    pub level: u8,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    pub members: Vec<String>,
    pub spares: Vec<String>,
}

/// One change made, with how to take it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A file that did not exist (an image, a config file, a key): removed on undo.
    NewFile(PathBuf),
    /// A blank disk that now holds array metadata: its metadata area is zeroed on undo.
    DiskUsed(PathBuf),
}

/// The changes of one `create`, in the order made.
#[derive(Debug, Default)]
pub struct UndoLog {
    changes: Vec<Change>,
}

impl UndoLog {
    pub fn push(&mut self, c: Change) {
        self.changes.push(c);
    }

    /// Takes every change back, newest first; returns what could not be undone (one line each).
    pub fn undo(self) -> Vec<String> {
        let mut problems = Vec::new();
        for c in self.changes.into_iter().rev() {
            let r = match &c {
                Change::NewFile(p) => std::fs::remove_file(p)
                    .with_context(|| format!("cannot remove {}", p.display())),
                Change::DiskUsed(p) => wipe_metadata(p),
            };
            if let Err(e) = r {
                problems.push(format!("{e:#}"));
            }
        }
        problems
    }
}

/// Zeroes a disk's metadata area (superblock, bitmap, mailbox: everything before the data), so
/// the disk reads as blank again.
fn wipe_metadata(path: &Path) -> Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("cannot open {} to wipe its metadata", path.display()))?;
    let zeros = vec![0u8; 1 << 20];
    let mut off = 0;
    while off < DATA_OFFSET_BYTES {
        f.write_all_at(&zeros, off)
            .with_context(|| format!("cannot wipe the metadata of {}", path.display()))?;
        off += zeros.len() as u64;
    }
    f.sync_all()
        .with_context(|| format!("cannot sync {}", path.display()))
}

/// The read-only plan: every config checked as `create` would run it. Returns the configs to
/// apply and the warnings; refuses with every problem found, one per line.
pub fn plan(configs: &[Config]) -> Result<(Vec<Config>, Vec<String>)> {
    let mut out = Vec::new();
    let mut errors = Vec::new();
    let mut warnings = Vec::new();
    for c in configs {
        let forced = c.for_creation()?;
        let ins = forced.inspect();
        errors.extend(
            ins.errors
                .into_iter()
                .map(|e| format!("{}: {e}", c.source.display())),
        );
        warnings.extend(ins.warnings);
        out.push(forced);
    }
    match errors.as_slice() {
        [] => {}
        [one] => bail!("{one}; nothing was created or changed"),
        many => bail!(
            "nothing was created or changed; fix these {} problems first:\n  {}",
            many.len(),
            many.join("\n  ")
        ),
    }
    Ok((out, warnings))
}

/// Creates what `configs` name and does not exist (after [`plan`]), logging each change in
/// `undo`. Stops at the first failure (the caller undoes).
pub async fn apply(
    configs: &[Config],
    report: &mut CreateReport,
    undo: &mut UndoLog,
) -> Result<()> {
    for c in configs {
        for a in &c.arrays {
            if arrays::array_exists(c, a).await? {
                report.arrays_existing.push(a.name.clone());
                continue;
            }
            let made = arrays::create_array(c, a, None).await?;
            for p in &made.new_images {
                undo.push(Change::NewFile(p.clone()));
                report.images.push(p.clone());
            }
            for p in &made.used_disks {
                undo.push(Change::DiskUsed(p.clone()));
            }
            let st = made.array.status();
            made.array
                .close()
                .await
                .with_context(|| format!("array `{}` created but not closed cleanly", a.name))?;
            let names = |slot: bool| {
                st.members
                    .iter()
                    .filter(|m| m.slot.is_some() == slot)
                    .filter_map(|m| m.name.clone())
                    .collect()
            };
            report.arrays.push(ArrayMade {
                name: a.name.clone(),
                level: a.level,
                size_bytes: st.size_bytes,
                chunk_bytes: a.chunk.bytes(),
                members: names(true),
                spares: names(false),
            });
        }
        for v in &c.volumes {
            let Some(file) = &v.file else { continue };
            let path = c.resolve(file);
            if path.exists() {
                continue;
            }
            crate::site::open_image(&path, v).await?;
            undo.push(Change::NewFile(path.clone()));
            report.images.push(path);
        }
    }
    Ok(())
}

/// Plan, apply, and undo on failure: the whole of `twinctl create` for configs already written.
/// `undo` may hold earlier changes of the same command (config files written), undone too.
pub async fn create(
    configs: &[Config],
    mut undo: UndoLog,
    report: &mut CreateReport,
) -> Result<()> {
    let planned = match plan(configs) {
        Ok(p) => p,
        Err(e) => return Err(undone(e, undo)),
    };
    report.warnings.extend(planned.1);
    match apply(&planned.0, report, &mut undo).await {
        Ok(()) => Ok(()),
        Err(e) => Err(undone(e, undo)),
    }
}

/// The error of a failed step, with what its undo did.
fn undone(e: anyhow::Error, undo: UndoLog) -> anyhow::Error {
    let made = !undo.changes.is_empty();
    let problems = undo.undo();
    if problems.is_empty() {
        if made {
            e.context("create failed; what it had made is undone")
        } else {
            e
        }
    } else {
        e.context(format!(
            "create failed, and undoing what it had made failed too (clean up by hand): {}",
            problems.join("; ")
        ))
    }
}

/// The human summary of a report.
pub fn describe(r: &CreateReport) -> String {
    let mut out = String::new();
    for p in &r.configs {
        out.push_str(&format!("wrote {}\n", p.display()));
    }
    for p in &r.images {
        out.push_str(&format!("created image {}\n", p.display()));
    }
    for a in &r.arrays {
        out.push_str(&format!(
            "created array {} (RAID {}, {}, chunk {}) on {}{}\n",
            a.name,
            a.level,
            format_bytes(a.size_bytes),
            format_bytes(a.chunk_bytes),
            a.members.join(", "),
            if a.spares.is_empty() {
                String::new()
            } else {
                format!("; spares {}", a.spares.join(", "))
            }
        ));
    }
    for a in &r.arrays_existing {
        out.push_str(&format!("array {a} exists already: left as it is\n"));
    }
    for w in &r.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    if r.configs.is_empty() && r.images.is_empty() && r.arrays.is_empty() {
        out.push_str("nothing to create: everything the config names exists\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// Every file under `dir` with its length and contents' hash: "state before == after".
    fn state(dir: &Path) -> BTreeMap<PathBuf, (u64, u64)> {
        let mut out = BTreeMap::new();
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                out.extend(state(&p));
                continue;
            }
            let data = std::fs::read(&p).unwrap();
            let h = data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
            out.insert(p, (data.len() as u64, h));
        }
        out
    }

    fn config(dir: &Path, arrays: &str) -> Config {
        let text = format!("[node]\nid = 0\n{arrays}");
        Config::parse(&text, &dir.join("node0.toml")).unwrap()
    }

    const ONE_ARRAY: &str =
        "[[array]]\nname = \"md0\"\nlevel = 1\ndisks = [\"a.img\", \"b.img\"]\n\
                             disk_size = \"8MiB\"\ndirect_io = false\n";

    fn md_signature(path: &Path) {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .unwrap();
        f.set_len(8 << 20).unwrap();
        let mut sb = 0xa92b_4efcu32.to_le_bytes().to_vec();
        sb.extend_from_slice(&1u32.to_le_bytes());
        f.write_all_at(&sb, 4096).unwrap();
    }

    #[tokio::test]
    async fn create_makes_images_and_the_array_and_leaves_it_alone_the_second_time() {
        let d = tempfile::tempdir().unwrap();
        let c = config(d.path(), ONE_ARRAY);
        let mut report = CreateReport::default();
        create(std::slice::from_ref(&c), UndoLog::default(), &mut report)
            .await
            .unwrap();
        assert_eq!(report.arrays.len(), 1, "{report:?}");
        assert_eq!(report.images.len(), 2);
        for img in ["a.img", "b.img"] {
            let (_, contents) = crate::disk_check::probe_path(&d.path().join(img)).unwrap();
            assert_eq!(contents, crate::disk_check::Contents::Twinblock);
        }
        let before = state(d.path());
        let mut again = CreateReport::default();
        create(&[c], UndoLog::default(), &mut again).await.unwrap();
        assert_eq!(again.arrays_existing, vec!["md0".to_string()]);
        assert!(again.arrays.is_empty() && again.images.is_empty());
        assert_eq!(state(d.path()), before, "a second create changes nothing");
    }

    #[tokio::test]
    async fn disk_with_an_md_superblock_is_refused_and_nothing_changes() {
        let d = tempfile::tempdir().unwrap();
        md_signature(&d.path().join("b.img"));
        let before = state(d.path());
        let c = config(d.path(), ONE_ARRAY);
        let e = create(&[c], UndoLog::default(), &mut CreateReport::default())
            .await
            .unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("b.img") && msg.contains("md RAID"), "{msg}");
        assert!(msg.contains("nothing was created"), "{msg}");
        assert_eq!(state(d.path()), before);
    }

    #[tokio::test]
    async fn missing_directory_and_small_size_are_refused_without_creating_anything() {
        let d = tempfile::tempdir().unwrap();
        let text = ONE_ARRAY.replace("b.img", "nosuch/b.img");
        let before = state(d.path());
        let e = create(
            &[config(d.path(), &text)],
            UndoLog::default(),
            &mut CreateReport::default(),
        )
        .await
        .unwrap_err();
        assert!(format!("{e:#}").contains("nosuch"), "{e:#}");
        assert!(!d.path().join("nosuch").exists());
        let text = ONE_ARRAY.replace("8MiB", "1MiB");
        let e = create(
            &[config(d.path(), &text)],
            UndoLog::default(),
            &mut CreateReport::default(),
        )
        .await
        .unwrap_err();
        assert!(format!("{e:#}").contains("too small"), "{e:#}");
        assert_eq!(state(d.path()), before);
    }

    #[tokio::test]
    async fn a_failing_later_step_undoes_the_arrays_and_images_already_made() {
        let d = tempfile::tempdir().unwrap();
        // md0 over one new image and one blank image that exists; md1 over a disk that gets an
        // md superblock after the plan passed (as if written by someone else meanwhile).
        std::fs::File::create(d.path().join("b.img"))
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let two = format!(
            "{ONE_ARRAY}[[array]]\nname = \"md1\"\nlevel = 1\ndisks = [\"c.img\", \"e.img\"]\n\
             disk_size = \"8MiB\"\ndirect_io = false\n"
        );
        let c = config(d.path(), &two);
        let before = state(d.path());
        let (planned, _) = plan(std::slice::from_ref(&c)).unwrap();
        md_signature(&d.path().join("e.img"));
        let raced = state(d.path());
        let mut undo = UndoLog::default();
        let mut report = CreateReport::default();
        let e = apply(&planned, &mut report, &mut undo).await.unwrap_err();
        assert!(format!("{e:#}").contains("e.img"), "{e:#}");
        assert_eq!(report.arrays.len(), 1, "md0 was made before md1 failed");
        assert!(d.path().join("a.img").exists());
        let e = undone(e, undo);
        assert!(format!("{e:#}").contains("undone"), "{e:#}");
        assert_eq!(
            state(d.path()),
            raced,
            "md0's images removed, b.img blank again"
        );
        assert_ne!(before, raced);
    }
}
