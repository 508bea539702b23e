//! The one `unsafe` call of the reservation code: `flock(2)` on the sibling `.lock` file.
//!
//! `std::fs::File::lock` would do the same without `unsafe`, but it needs Rust 1.89 and the
//! workspace promises 1.80. The lock is advisory and belongs to the open file description, so
//! two threads of one process that each open the lock file exclude each other just as two
//! processes do; it is released when the guard's `File` is closed (also when the process dies,
//! so a crashed updater never leaves the disk locked).

use std::fs::File;
use std::io;
use std::os::unix::io::AsRawFd;
use std::thread;
use std::time::{Duration, Instant};

/// How long to sleep between attempts while another process holds the lock.
const LOCK_RETRY_INTERVAL_MS: u64 = 1;

/// Holds an exclusive `flock` until dropped (closing the file releases it).
pub(crate) struct LockGuard {
    _file: File,
}

/// Why the lock was not taken.
pub(crate) enum LockFailure {
    TimedOut,
    Io(io::Error),
}

/// Take an exclusive lock on `file`, waiting at most `timeout_ms`.
pub(crate) fn lock_exclusive(file: File, timeout_ms: u64) -> Result<LockGuard, LockFailure> {
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    loop {
        // SAFETY: `flock` only reads its two integer arguments; the descriptor is valid because
        // `file` is owned here and stays open for the whole call (and, on success, inside the
        // returned guard for as long as the lock is meant to be held).
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(LockGuard { _file: file });
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
            _ => return Err(LockFailure::Io(err)),
        }
        if Instant::now() >= deadline {
            return Err(LockFailure::TimedOut);
        }
        thread::sleep(Duration::from_millis(LOCK_RETRY_INTERVAL_MS));
    }
}
