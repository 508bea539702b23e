//! Reservation lock files on disk: lock-free reads, and updates that are atomic (under an
//! exclusive `flock`) and durable (temp file, fsync, rename, fsync of the directory).
//!
//! Naming, beside the disk image `DISK`:
//! - `DISK.resv` — the state ([`super::format`]); a missing file means no keys, no reservation;
//! - `DISK.resv.lock` — the `flock` target, created on first update and never removed (removing
//!   a lock file lets two updaters lock two different inodes). It is a sibling and not the state
//!   file itself because every update renames a new inode over `DISK.resv`, so a lock on the
//!   state file would lock a file that is about to be replaced;
//! - `DISK.resv.tmp` — the next state while it is written; only ever written under the lock, and
//!   a leftover from a crash is ignored by readers and overwritten by the next update.
//!
//! An update reads the current file, applies a pure [`Op`], and writes only if the state
//! changed, so refused and no-op operations leave the file byte-for-byte as it was. A corrupt
//! file is refused by every operation except [`ReservationFile::clear_forced`].

use super::flock::{lock_exclusive, LockFailure, LockGuard};
use super::format::{self, FormatError, Snapshot};
use super::{Op, ReservationError, ReservationState};
use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Appended to a disk image's file name to name its reservation file.
pub const RESERVATION_SUFFIX: &str = ".resv";
/// Appended to the reservation file's name to name its lock file.
pub const LOCK_SUFFIX: &str = ".lock";
/// Appended to the reservation file's name to name the temp file of an update.
pub const TEMP_SUFFIX: &str = ".tmp";
/// How long an update waits for another updater's lock. Updates hold it for a few
/// milliseconds (one small write and two fsyncs), so a longer wait means a stuck process.
pub const LOCK_WAIT_TIMEOUT_MS: u64 = 2_000;
/// Permissions of files this module creates.
const FILE_MODE: u32 = 0o644;

/// A reservation file operation that failed; every variant names the file. The cause is part of
/// the message (not a `source()`), so printing the error chain does not repeat it.
#[derive(Debug, Error)]
pub enum ReservationFileError {
    #[error("{path}: {error}", path = path.display())]
    Refused {
        path: PathBuf,
        error: ReservationError,
    },
    #[error(
        "{path} is corrupt ({error}); nothing was changed: inspect or move it away, or rewrite \
         it empty with `twinctl disk reservation clear --force DISK`",
        path = path.display()
    )]
    Corrupt { path: PathBuf, error: FormatError },
    #[error("{path}: cannot {action}: {error}", path = path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        error: io::Error,
    },
    #[error(
        "{path}: another process has held the lock for more than {waited_ms} ms; \
         retry, or find it with `fuser {path}`",
        path = path.display()
    )]
    LockTimeout { path: PathBuf, waited_ms: u64 },
    #[error("{path}: not a usable file path (it needs a file name)", path = path.display())]
    BadPath { path: PathBuf },
}

impl ReservationFileError {
    /// The reservation rule that refused the operation, if that is what failed.
    pub fn refusal(&self) -> Option<&ReservationError> {
        match self {
            ReservationFileError::Refused { error, .. } => Some(error),
            _ => None,
        }
    }
}

fn io_err(path: &Path, action: &'static str) -> impl FnOnce(io::Error) -> ReservationFileError {
    let path = path.to_path_buf();
    move |error| ReservationFileError::Io {
        path,
        action,
        error,
    }
}

/// The outcome of an update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Update {
    pub before: Snapshot,
    pub after: Snapshot,
}

impl Update {
    /// Whether the update wrote a new file (false: the operation was a no-op).
    pub fn changed(&self) -> bool {
        self.before != self.after
    }
}

/// The outcome of a forced clear.
#[derive(Debug)]
pub struct ForcedClear {
    pub after: Snapshot,
    /// The state that was cleared, or why the old file could not be read.
    pub before: Result<Snapshot, FormatError>,
}

/// One disk's reservation lock file.
#[derive(Debug, Clone)]
pub struct ReservationFile {
    path: PathBuf,
    lock_wait_timeout_ms: u64,
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s: OsString = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

impl ReservationFile {
    /// The reservation file of disk image `disk`: `disk` with `.resv` appended.
    pub fn for_disk(disk: &Path) -> Self {
        Self::at(with_suffix(disk, RESERVATION_SUFFIX))
    }

    /// A reservation file at exactly `path`.
    pub fn at(path: impl Into<PathBuf>) -> Self {
        ReservationFile {
            path: path.into(),
            lock_wait_timeout_ms: LOCK_WAIT_TIMEOUT_MS,
        }
    }

    /// The same file with another limit on the wait for the update lock (default
    /// [`LOCK_WAIT_TIMEOUT_MS`]); a node on a takeover deadline may want less.
    pub fn with_lock_wait_timeout_ms(mut self, timeout_ms: u64) -> Self {
        self.lock_wait_timeout_ms = timeout_ms;
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The sibling file the updaters `flock`.
    pub fn lock_path(&self) -> PathBuf {
        with_suffix(&self.path, LOCK_SUFFIX)
    }

    /// Where an update writes the next state before renaming it over the file.
    pub fn temp_path(&self) -> PathBuf {
        with_suffix(&self.path, TEMP_SUFFIX)
    }

    /// The file's bytes, `None` when it does not exist. No lock needed: updates rename a
    /// complete file into place, so the path always names a whole old or whole new file.
    pub fn read_bytes(&self) -> Result<Option<Vec<u8>>, ReservationFileError> {
        match fs::read(&self.path) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err(&self.path, "read")(e)),
        }
    }

    /// The current state; a missing file is generation 0 with no keys and no reservation.
    pub fn read(&self) -> Result<Snapshot, ReservationFileError> {
        match self.read_bytes()? {
            None => Ok(Snapshot::default()),
            Some(b) => self.decode(&b),
        }
    }

    fn decode(&self, bytes: &[u8]) -> Result<Snapshot, ReservationFileError> {
        decode_at(&self.path, bytes)
    }

    /// Apply `op` atomically: lock, read, apply, and (only if the state changed) write the new
    /// state with the generation increased by one. A refusal or a corrupt file changes nothing.
    pub fn update(&self, op: &Op) -> Result<Update, ReservationFileError> {
        let _lock = self.lock()?;
        let before = self.read()?;
        let state = before
            .state
            .apply(op)
            .map_err(|error| ReservationFileError::Refused {
                path: self.path.clone(),
                error,
            })?;
        if state == before.state {
            return Ok(Update {
                after: before.clone(),
                before,
            });
        }
        let after = Snapshot {
            generation: before.generation.saturating_add(1),
            state,
        };
        self.write_atomically(&format::encode(&after))?;
        Ok(Update { before, after })
    }

    /// Recovery: rewrite the file empty (no keys, no reservation) whatever it holds, even when
    /// it is corrupt. The generation moves past the old one when that can still be read.
    pub fn clear_forced(&self) -> Result<ForcedClear, ReservationFileError> {
        let _lock = self.lock()?;
        let (before, old_generation) = match self.read_bytes()? {
            None => (Ok(Snapshot::default()), 0),
            Some(b) => match format::decode(&b) {
                Ok(s) => {
                    let g = s.generation;
                    (Ok(s), g)
                }
                Err(e) => (Err(e), format::salvage_generation(&b)),
            },
        };
        let after = Snapshot {
            generation: old_generation.saturating_add(1),
            state: ReservationState::empty(),
        };
        self.write_atomically(&format::encode(&after))?;
        Ok(ForcedClear { after, before })
    }

    fn lock(&self) -> Result<LockGuard, ReservationFileError> {
        let lock_path = self.lock_path();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(FILE_MODE)
            .open(&lock_path)
            .map_err(io_err(&lock_path, "open the lock file"))?;
        let timeout_ms = self.lock_wait_timeout_ms;
        lock_exclusive(file, timeout_ms).map_err(|f| match f {
            LockFailure::TimedOut => ReservationFileError::LockTimeout {
                path: lock_path.clone(),
                waited_ms: timeout_ms,
            },
            LockFailure::Io(e) => io_err(&lock_path, "lock")(e),
        })
    }

    /// Temp file, fsync, rename over, fsync the directory: after a crash the path names either
    /// the whole old file or the whole new one, and once this returns the new one survives a
    /// power cut.
    fn write_atomically(&self, bytes: &[u8]) -> Result<(), ReservationFileError> {
        let dir = self.directory()?;
        let tmp = self.temp_path();
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&tmp)
            .map_err(io_err(&tmp, "create the temp file"))?;
        f.write_all(bytes)
            .map_err(io_err(&tmp, "write the temp file"))?;
        f.sync_all().map_err(io_err(&tmp, "fsync the temp file"))?;
        drop(f);
        fs::rename(&tmp, &self.path).map_err(io_err(&self.path, "rename the temp file over"))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(&dir, "fsync the directory"))
    }

    fn directory(&self) -> Result<PathBuf, ReservationFileError> {
        if self.path.file_name().is_none() {
            return Err(ReservationFileError::BadPath {
                path: self.path.clone(),
            });
        }
        Ok(match self.path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        })
    }
}

/// Read a whole open file (used by the watch, which must read the inode it pinned).
pub(crate) fn read_all(file: &mut File, path: &Path) -> Result<Vec<u8>, ReservationFileError> {
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes).map_err(io_err(path, "read"))?;
    Ok(bytes)
}

/// Decode bytes read from `path`, naming it in the error.
pub(crate) fn decode_at(path: &Path, bytes: &[u8]) -> Result<Snapshot, ReservationFileError> {
    format::decode(bytes).map_err(|error| ReservationFileError::Corrupt {
        path: path.to_path_buf(),
        error,
    })
}

#[cfg(test)]
mod tests;
