//! `twinblockd --check`, second half: after the config parsed and validated, open and inspect
//! every file it names, read-only, so a config that passes the check also starts. Disk images
//! either exist (and hold this array's superblocks, or are blank and big enough for the array to
//! be created on them) or would be created (a `disk_size` big enough for the member layout, an
//! existing directory); volume images likewise; NVRAM files, the admin socket and the NBD Unix
//! socket need an existing directory. Nothing is created or written here.
//!
//! The findings are collected rather than stopping at the first, so an operator sees every
//! problem of a config in one run. The judgements on disks are the ones the node applies when it
//! starts (`crate::disk_check`).

use super::{format_bytes, ArrayConfig, Config};
use crate::candidates::{self, Found, Selection};
use crate::disk_check::{self, Contents};
use std::fs::File;
use std::path::{Path, PathBuf};
use twinblock_raid::superblock::{Superblock, SUPERBLOCK_BYTES};

/// What `--check` found: errors mean the node would not start (or would lose data); warnings
/// are worth fixing; notes say what starting would do.
#[derive(Debug, Default)]
pub struct Inspection {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    pub notes: Vec<String>,
}

/// One configured disk as found on the filesystem.
struct Disk {
    key: String,
    path: PathBuf,
    /// Size and contents when the disk exists.
    found: Option<(u64, Contents)>,
}

impl Config {
    /// Inspects every file the config names, read-only.
    pub fn inspect(&self) -> Inspection {
        let mut out = Inspection::default();
        for (i, a) in self.arrays.iter().enumerate() {
            self.inspect_array(i, a, &mut out);
        }
        self.inspect_volumes(&mut out);
        let mut sockets = vec![("node.admin_socket", self.admin_socket())];
        if let Some(u) = &self.nbd.unix {
            sockets.push(("nbd.unix", self.resolve(u)));
        }
        for (key, path) in sockets {
            if let Some(why) = disk_check::missing_directory(&path) {
                out.errors.push(format!("{key}: {why}"));
            }
        }
        out
    }

    fn inspect_array(&self, i: usize, a: &ArrayConfig, out: &mut Inspection) {
        let chunk = a.chunk.bytes();
        let key = |k: String| format!("array[{i}].{k}");
        if let Some(ds) = a.disk_size.filter(|_| a.create) {
            if let Some(why) = disk_check::too_small("images created from it", ds.bytes(), chunk) {
                out.errors
                    .push(format!("{}: {why}", key("disk_size".into())));
            }
        }
        // Every candidate that exists, as the node would read it.
        let mut disks = Vec::new();
        let mut found = Vec::new();
        for p in a.disks.iter().chain(a.spares.iter()) {
            let path = self.resolve(p);
            if !path.exists() {
                continue;
            }
            match disk_check::probe_path(&path) {
                Ok((size, contents)) => {
                    let superblock =
                        (contents == Contents::Twinblock).then(|| read_superblock(&path));
                    found.push(Found {
                        name: path.display().to_string(),
                        contents: contents.clone(),
                        superblock,
                    });
                    disks.push(Disk {
                        key: key("disks".into()),
                        path,
                        found: Some((size, contents)),
                    });
                }
                Err(e) => out.errors.push(format!(
                    "{}: cannot read disk {}: {e}",
                    key("disks".into()),
                    path.display()
                )),
            }
        }
        match candidates::select(&a.name, a.uuid, &found) {
            Err(e) => out.errors.push(format!("{}: {e}", key("disks".into()))),
            Ok(Selection::Assemble { members, skipped }) => {
                for (j, why) in skipped {
                    out.notes.push(format!(
                        "array `{}`: candidate {} not used: {why}",
                        a.name, found[j].name
                    ));
                }
                let chosen: Vec<Disk> = members
                    .into_iter()
                    .map(|j| Disk {
                        key: disks[j].key.clone(),
                        path: disks[j].path.clone(),
                        found: disks[j].found.clone(),
                    })
                    .collect();
                inspect_assembly(a, &chosen, out);
            }
            Ok(Selection::Absent) if crate::arrays::other_array(&found).is_some() => {
                if let Some(other) = crate::arrays::other_array(&found) {
                    out.errors.push(format!(
                        "{}: {other}, not `{}`: the node would not start; correct the array's \
                         `name` or `disks`",
                        key("disks".into()),
                        a.name
                    ));
                }
            }
            Ok(Selection::Absent) if !a.create => out.errors.push(format!(
                "{}: none of the {} candidate disks holds array `{}`, so the node would not \
                 start; to create it on blank disks set `create = true` (and `disk_size` to \
                 create the images), or correct `disks`",
                key("disks".into()),
                found.len(),
                a.name
            )),
            Ok(Selection::Absent) => {
                let mut new = Vec::new();
                let named = a.new_members().iter().map(|d| (d, "disks")).enumerate();
                let spares = a.spares.iter().map(|d| (d, "spares")).enumerate();
                for (j, (d, list)) in named.chain(spares) {
                    let disk = Disk {
                        key: key(format!("{list}[{j}]")),
                        path: self.resolve(d),
                        found: None,
                    };
                    if let Some(d) = self.inspect_disk(disk, a, out) {
                        new.push(d);
                    }
                }
                if new.len() == a.new_members().len() + a.spares.len() {
                    inspect_creation(a, &new, out);
                }
            }
        }
    }

    /// Checks one disk on its own; `None` when it cannot be used at all (error reported).
    fn inspect_disk(&self, mut d: Disk, a: &ArrayConfig, out: &mut Inspection) -> Option<Disk> {
        if !d.path.exists() {
            if a.disk_size.is_none() {
                out.errors.push(format!(
                    "{}: disk image {} does not exist and `disk_size` is not set, so it would \
                     not be created; create it or set `disk_size`",
                    d.key,
                    d.path.display()
                ));
                return None;
            }
            if let Some(why) = disk_check::missing_directory(&d.path) {
                out.errors.push(format!("{}: {why}", d.key));
                return None;
            }
            return Some(d);
        }
        match disk_check::probe_path(&d.path) {
            Ok((size, contents)) => {
                if let Some(why) =
                    disk_check::too_small(&d.path.display().to_string(), size, a.chunk.bytes())
                {
                    out.errors.push(format!("{}: {why}", d.key));
                    return None;
                }
                d.found = Some((size, contents));
                Some(d)
            }
            Err(e) => {
                out.errors.push(format!(
                    "{}: cannot read disk {}: {e}",
                    d.key,
                    d.path.display()
                ));
                None
            }
        }
    }

    fn inspect_volumes(&self, out: &mut Inspection) {
        for (i, v) in self.volumes.iter().enumerate() {
            if let Some(file) = &v.file {
                let key = format!("volume[{i}].file");
                let path = self.resolve(file);
                if path.exists() {
                    match File::open(&path).and_then(|f| disk_check::disk_size(&f)) {
                        Ok(size) => {
                            if let Some(want) = v.size.filter(|w| w.bytes() != size) {
                                out.errors.push(format!(
                                    "{key}: image {} is {} but `size` says {want}",
                                    path.display(),
                                    format_bytes(size)
                                ));
                            }
                        }
                        Err(e) => out
                            .errors
                            .push(format!("{key}: cannot read image {}: {e}", path.display())),
                    }
                } else if v.read_only {
                    out.errors.push(format!(
                        "{key}: image {} does not exist, and a read-only volume is never created",
                        path.display()
                    ));
                } else if v.size.is_none() {
                    out.errors.push(format!(
                        "{key}: image {} does not exist and `size` is not set, so it would not be \
                         created",
                        path.display()
                    ));
                } else if let Some(why) = disk_check::missing_directory(&path) {
                    out.errors.push(format!("{key}: {why}"));
                } else {
                    out.notes
                        .push(format!("{key}: image {} would be created", path.display()));
                }
            }
            if let Some(nv) = self.volume_nvram_path(v) {
                let key = format!("volume[{i}] NVRAM file");
                if let Some(why) = disk_check::missing_directory(&nv) {
                    out.errors.push(format!("{key}: {why}"));
                } else if nv.exists() {
                    if let Err(e) = File::open(&nv) {
                        out.errors
                            .push(format!("{key}: cannot read {}: {e}", nv.display()));
                    }
                }
            }
        }
    }
}

/// The disks hold (some) superblocks: every disk must hold a readable one of this array, as the
/// assembler refuses anything else.
fn inspect_assembly(a: &ArrayConfig, disks: &[Disk], out: &mut Inspection) {
    let mut first: Option<(&Path, Superblock)> = None;
    for d in disks {
        let sb = match &d.found {
            None => {
                out.errors.push(format!(
                    "{}: disk {} does not exist, but the other disks hold array `{}`: a new \
                     blank image cannot be assembled; add it with `twinctl disk add` once the \
                     array runs, and list it afterwards",
                    d.key,
                    d.path.display(),
                    a.name
                ));
                continue;
            }
            Some((_, c @ (Contents::Blank | Contents::Foreign(_) | Contents::Unknown))) => {
                out.errors.push(format!(
                    "{}: disk {} {}, but the other disks hold array `{}`: the array would not \
                     assemble with it listed",
                    d.key,
                    d.path.display(),
                    c.describe(),
                    a.name
                ));
                continue;
            }
            Some((size, Contents::Twinblock)) => match read_superblock(&d.path) {
                Ok(sb) => {
                    let need = sb.data_offset + sb.member_data_bytes;
                    if *size < need {
                        out.errors.push(format!(
                            "{}: disk {} is {}, smaller than the array's members ({})",
                            d.key,
                            d.path.display(),
                            format_bytes(*size),
                            format_bytes(need)
                        ));
                    }
                    sb
                }
                Err(e) => {
                    out.errors.push(format!(
                        "{}: disk {}: cannot read its superblock: {e}",
                        d.key,
                        d.path.display()
                    ));
                    continue;
                }
            },
        };
        if sb.name != a.name || sb.level.code() != u32::from(a.level) {
            out.errors.push(format!(
                "{}: disk {} holds RAID {} array `{}`, but the config names RAID {} array `{}`",
                d.key,
                d.path.display(),
                sb.level.code(),
                sb.name,
                a.level,
                a.name
            ));
        }
        match &first {
            Some((p, f)) if f.array_uuid != sb.array_uuid => out.errors.push(format!(
                "{}: disk {} belongs to another array (UUID {}) than {} (UUID {})",
                d.key,
                d.path.display(),
                sb.array_uuid,
                p.display(),
                f.array_uuid
            )),
            Some(_) => {}
            None => first = Some((&d.path, sb)),
        }
    }
    if let Some((_, sb)) = first {
        out.notes.push(format!(
            "array `{}`: would be assembled from the superblocks on its disks ({} members, {})",
            a.name,
            sb.member_count,
            format_bytes(sb.array_bytes)
        ));
    }
}

/// No disk holds a superblock: the array would be created, which needs every existing disk blank.
fn inspect_creation(a: &ArrayConfig, disks: &[Disk], out: &mut Inspection) {
    let mut sizes = Vec::new();
    for d in disks {
        match &d.found {
            Some((size, c)) => {
                if *c != Contents::Blank {
                    out.errors.push(format!(
                        "{}: disk {} {}; the array would be created on it (discarding its data \
                         area), so it is refused: wipe it if that data is not wanted, or name \
                         another disk",
                        d.key,
                        d.path.display(),
                        c.describe()
                    ));
                }
                sizes.push((d.path.display().to_string(), *size));
            }
            None => {
                if let Some(ds) = a.disk_size {
                    sizes.push((d.path.display().to_string(), ds.bytes()));
                }
            }
        }
    }
    if let Some(w) = disk_check::size_mismatch(&sizes) {
        out.warnings.push(format!("array `{}`: {w}", a.name));
    }
    let created = disks.iter().filter(|d| d.found.is_none()).count();
    out.notes.push(format!(
        "array `{}`: would be created on {} blank disks ({created} images to be created)",
        a.name,
        disks.len()
    ));
}

fn read_superblock(path: &Path) -> Result<Superblock, String> {
    use std::os::unix::fs::FileExt;
    let f = File::open(path).map_err(|e| e.to_string())?;
    let mut b = vec![0u8; SUPERBLOCK_BYTES];
    f.read_exact_at(&mut b, 0).map_err(|e| e.to_string())?;
    Superblock::decode(&b).map_err(|e| e.to_string())
}
