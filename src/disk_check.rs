//! What a disk holds before the node makes it an array member, and the checks on disk paths and
//! sizes that must pass before anything is created: paths never create directories, an array is
//! only created over disks that are really blank (no twinblock superblock, no known signature of
//! another format, nothing at all in the first 4 KiB), members of different sizes are reported
//! with the space they leave unused.
//!
//! Used both when the node opens its arrays (async, through the member) and by `twinblockd
//! --check` (sync, read-only, through `std::fs`); the decisions themselves are pure functions over
//! the bytes read, so both paths judge a disk the same way.

use crate::config::format_bytes;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use twinblock_io::Member;
use twinblock_raid::signature::{self, Probe, Signature, HEAD_BYTES};
use twinblock_raid::superblock::{DATA_OFFSET_BYTES, MAGIC, SUPERBLOCK_BYTES};

/// Bytes at the start of a disk that must be zero for the disk to count as blank (where the
/// twinblock superblock goes).
const BLANK_HEAD_BYTES: usize = SUPERBLOCK_BYTES;
/// Smallest chunk the RAID layer lays out, whatever the config says.
const CHUNK_BYTES_FLOOR: u64 = 4096;

/// What is on a disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// Zeroes where the superblock goes and no known signature: safe to create an array on.
    Blank,
    /// A twinblock RAID superblock (valid or not: the assembler judges it).
    Twinblock,
    /// Other formats' signatures.
    Foreign(Vec<Signature>),
    /// Data in the first 4 KiB of no format this node knows.
    Unknown,
}

impl Contents {
    /// A phrase for messages ("holds a btrfs filesystem").
    pub fn describe(&self) -> String {
        match self {
            Contents::Blank => "is blank".into(),
            Contents::Twinblock => "holds a twinblock RAID superblock".into(),
            Contents::Foreign(s) => format!(
                "holds {}",
                s.iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(" and ")
            ),
            Contents::Unknown => {
                "is not blank: its first 4 KiB hold data of no known format".into()
            }
        }
    }
}

/// Judges a disk from its first bytes (`head`) and the bytes from
/// `signature::tail_offset(size_bytes)` to its end (`tail`).
pub fn classify(size_bytes: u64, head: &[u8], tail: &[u8]) -> Contents {
    if head.len() >= MAGIC.len() && head[..MAGIC.len()] == MAGIC {
        return Contents::Twinblock;
    }
    let found = signature::detect(&Probe {
        size_bytes,
        head,
        tail,
    });
    if !found.is_empty() {
        return Contents::Foreign(found);
    }
    if head.iter().take(BLANK_HEAD_BYTES).any(|b| *b != 0) {
        return Contents::Unknown;
    }
    Contents::Blank
}

/// Smallest member an array with `chunk_bytes` chunks can use: the metadata area (superblock,
/// bitmap, mailbox; data starts at 4 MiB) plus one chunk.
pub fn member_bytes_min(chunk_bytes: u64) -> u64 {
    DATA_OFFSET_BYTES + chunk_bytes.max(CHUNK_BYTES_FLOOR)
}

/// The refusal for a disk too small to be a member, if it is.
pub fn too_small(name: &str, size_bytes: u64, chunk_bytes: u64) -> Option<String> {
    let need = member_bytes_min(chunk_bytes);
    (size_bytes < need).then(|| {
        format!(
            "disk {name} is {}, too small for an array member: at least {} is needed \
             (4 MiB of metadata before the data, plus one {} chunk); use a larger disk or \
             `disk_size`",
            format_bytes(size_bytes),
            format_bytes(need),
            format_bytes(chunk_bytes)
        )
    })
}

/// A warning when members differ in size: every member uses only as much as the smallest has,
/// so the rest of each larger one is lost. `disks` are (name, size) pairs.
pub fn size_mismatch(disks: &[(String, u64)]) -> Option<String> {
    let (small_name, small) = disks.iter().min_by_key(|(_, s)| *s)?;
    let largest = disks.iter().map(|(_, s)| *s).max()?;
    if largest == *small {
        return None;
    }
    let lost: u64 = disks.iter().map(|(_, s)| s - small).sum();
    Some(format!(
        "members differ in size ({} to {}): each uses only the {} of the smallest, {small_name}, \
         so {} of disk space is left unused; use disks of one size to avoid the loss",
        format_bytes(*small),
        format_bytes(largest),
        format_bytes(*small),
        format_bytes(lost)
    ))
}

/// The refusal for a path whose directory does not exist (the node never creates directories:
/// a mistyped path must fail, not grow a new tree).
pub fn missing_directory(path: &Path) -> Option<String> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    (!dir.is_dir()).then(|| {
        format!(
            "directory {} (for {}) does not exist; the node does not create directories: \
             correct the path or create the directory first",
            dir.display(),
            path.display()
        )
    })
}

/// Reads and judges a member's contents.
pub async fn probe_member(m: &Arc<dyn Member>) -> io::Result<Contents> {
    let size = m.size();
    let head_len = (HEAD_BYTES as u64).min(size) as usize;
    let head = m.read_at(0, head_len).await?;
    let t0 = signature::tail_offset(size);
    let tail = m.read_at(t0, (size - t0) as usize).await?;
    Ok(classify(size, &head, &tail))
}

/// Reads and judges a disk image or device by path, read-only (for `--check`).
pub fn probe_path(path: &Path) -> io::Result<(u64, Contents)> {
    let f = File::open(path)?;
    let size = disk_size(&f)?;
    let mut head = vec![0u8; (HEAD_BYTES as u64).min(size) as usize];
    f.read_exact_at(&mut head, 0)?;
    let t0 = signature::tail_offset(size);
    let mut tail = vec![0u8; (size - t0) as usize];
    f.read_exact_at(&mut tail, t0)?;
    Ok((size, classify(size, &head, &tail)))
}

/// Size of an image file or block device.
pub fn disk_size(f: &File) -> io::Result<u64> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileTypeExt;
    let meta = f.metadata()?;
    if meta.file_type().is_block_device() {
        // A block device's length is where its end is.
        let mut handle = f;
        handle.seek(SeekFrom::End(0))
    } else {
        Ok(meta.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DISK_BYTES: u64 = 64 << 20;

    fn judge(head: &[u8]) -> Contents {
        classify(DISK_BYTES, head, &[0u8; 4096])
    }

    #[test]
    fn zeroes_are_blank() {
        assert_eq!(judge(&[0u8; HEAD_BYTES]), Contents::Blank);
    }

    #[test]
    fn twinblock_magic_is_ours_even_with_other_bytes_around() {
        let mut h = vec![0u8; HEAD_BYTES];
        h[..8].copy_from_slice(&MAGIC);
        assert_eq!(judge(&h), Contents::Twinblock);
    }

    #[test]
    fn md_superblock_past_the_first_4_kib_is_not_blank() {
        let mut h = vec![0u8; HEAD_BYTES];
        h[4096..4100].copy_from_slice(&0xa92b_4efcu32.to_le_bytes());
        h[4100..4104].copy_from_slice(&1u32.to_le_bytes());
        let c = judge(&h);
        assert_eq!(c, Contents::Foreign(vec![Signature::Md("1.2")]));
        assert!(
            c.describe().contains("md RAID superblock (v1.2)"),
            "{}",
            c.describe()
        );
    }

    #[test]
    fn unknown_bytes_in_the_superblock_area_are_not_blank() {
        let mut h = vec![0u8; HEAD_BYTES];
        h[100] = 1;
        assert_eq!(judge(&h), Contents::Unknown);
    }

    #[test]
    fn equal_sizes_give_no_warning() {
        let d = vec![("a".to_string(), 64 << 20), ("b".to_string(), 64 << 20)];
        assert_eq!(size_mismatch(&d), None);
    }

    #[test]
    fn mixed_sizes_report_the_space_lost() {
        let d: Vec<(String, u64)> = vec![
            ("a".into(), 64 << 20),
            ("b".into(), 64 << 20),
            ("c".into(), 64 << 20),
            ("small".into(), 32 << 20),
        ];
        let w = size_mismatch(&d).unwrap();
        assert!(w.contains("small") && w.contains("96 MiB"), "{w}");
    }

    #[test]
    fn disk_below_metadata_plus_one_chunk_is_too_small() {
        let chunk = 64 << 10;
        assert!(too_small("d", 1024, chunk).is_some_and(|e| e.contains("4.1 MiB")));
        assert!(too_small("d", member_bytes_min(chunk), chunk).is_none());
    }

    #[test]
    fn path_in_a_missing_directory_is_named() {
        let e = missing_directory(Path::new("/nonexistent-twinblock/dir/x.img")).unwrap();
        assert!(e.contains("/nonexistent-twinblock/dir"), "{e}");
        assert!(missing_directory(Path::new("x.img")).is_none());
        assert!(missing_directory(Path::new("/tmp/x.img")).is_none());
    }
}
