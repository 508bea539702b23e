//! The data path's cheap check: "does my key still hold this disk's reservation?", asked before
//! every member write.
//!
//! Shape: a cache of the last decoded file, keyed by the identity of the inode it came from
//! (device, inode number, size, mtime, ctime). Each check does one `stat(2)` of the path and
//! compares identities; only when they differ is the file re-opened, read and decoded. Cost:
//! one `stat` per check (about a microsecond: a path lookup in the dentry cache and an inode
//! attribute copy, no disk I/O), plus an open + read of at most a few hundred bytes + CRC after
//! each change.
//!
//! Why not `mmap` of the file and a compare of the mapped generation: every update renames a
//! new inode over the path, and a mapping keeps showing the old inode forever, so a mapped
//! reader would need the same `stat` per check to notice the rename. Mapping would save nothing
//! and add `unsafe` (and SIGBUS if someone truncates the mapped file).
//!
//! Inode numbers are reused once an inode is freed, so a watch that only remembered the number
//! could miss a replacement that happened to get the old number. The watch keeps the file it
//! read open: that pins the old inode, so the inode now at the path necessarily has another
//! number.

use super::file::{decode_at, read_all, ReservationFile, ReservationFileError};
use super::format::Snapshot;
use super::Key;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// What identifies one version of the file at the path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Identity {
    Missing,
    Inode {
        dev: u64,
        ino: u64,
        size: u64,
        mtime_ns: i128,
        ctime_ns: i128,
    },
}

impl Identity {
    fn of(m: &fs::Metadata) -> Self {
        Identity::Inode {
            dev: m.dev(),
            ino: m.ino(),
            size: m.size(),
            mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            ctime_ns: i128::from(m.ctime()) * 1_000_000_000 + i128::from(m.ctime_nsec()),
        }
    }
}

struct Cached {
    identity: Identity,
    snapshot: Snapshot,
    /// Keeps the inode read alive so its number is not reused while we compare against it.
    _pinned: Option<File>,
}

/// Watches one reservation file and answers [`ReservationWatch::holds`] cheaply.
///
/// Errors (an unreadable or corrupt file) are returned, never cached: the caller must treat an
/// error as "not held" and stop writing. A watch is `&mut` per check: give each writer its own
/// (they are cheap: a path, one open file and a decoded state), or share one behind a mutex.
pub struct ReservationWatch {
    path: PathBuf,
    cached: Option<Cached>,
}

impl ReservationWatch {
    pub fn new(file: &ReservationFile) -> Self {
        ReservationWatch {
            path: file.path().to_path_buf(),
            cached: None,
        }
    }

    /// Whether `key` holds the reservation now (as of the file at the path at this moment).
    pub fn holds(&mut self, key: Key) -> Result<bool, ReservationFileError> {
        Ok(self.current()?.state.holds(key))
    }

    /// The generation of the file now at the path (0 when there is none).
    pub fn generation(&mut self) -> Result<u64, ReservationFileError> {
        Ok(self.current()?.generation)
    }

    /// The state of the file now at the path, re-read only if it changed since the last call.
    pub fn current(&mut self) -> Result<&Snapshot, ReservationFileError> {
        let now = match fs::metadata(&self.path) {
            Ok(m) => Identity::of(&m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Identity::Missing,
            Err(error) => {
                return Err(ReservationFileError::Io {
                    path: self.path.clone(),
                    action: "stat",
                    error,
                })
            }
        };
        let cached = match self.cached.take() {
            Some(c) if c.identity == now => c,
            _ => self.load()?,
        };
        Ok(&self.cached.insert(cached).snapshot)
    }

    /// Open, identify (by `fstat` of what was opened, so a rename racing the open is noticed at
    /// the next check) and decode the file at the path.
    fn load(&self) -> Result<Cached, ReservationFileError> {
        let io_err = |action: &'static str| {
            let path = self.path.clone();
            move |error| ReservationFileError::Io {
                path,
                action,
                error,
            }
        };
        let mut file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Ok(Cached {
                    identity: Identity::Missing,
                    snapshot: Snapshot::default(),
                    _pinned: None,
                })
            }
            Err(e) => return Err(io_err("open")(e)),
        };
        let identity = Identity::of(&file.metadata().map_err(io_err("fstat"))?);
        let bytes = read_all(&mut file, &self.path)?;
        let snapshot = decode_at(&self.path, &bytes)?;
        Ok(Cached {
            identity,
            snapshot,
            _pinned: Some(file),
        })
    }
}
