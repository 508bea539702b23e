//! The NVRAM mapping and its persistence: the only module with `unsafe` code.
//!
//! The NVRAM file is mapped `MAP_SHARED` (memmap2 `MmapRaw`) so that stores reach the file (or
//! the persistent memory behind a DAX mapping) without system calls. The mapping is split into
//! disjoint [`MapSpan`]s (header, own region, partner region); each span is the only in-process
//! writer of its bytes and mutation takes `&mut self`, so Rust's aliasing rules hold span by span.
//!
//! Persistence, chosen explicitly by [`PersistenceMode`]:
//! - `Pmem`: stores are written back cache line by cache line (`clwb`, else `clflushopt`, else
//!   `clflush`) and ordered by `sfence`. Correct only on a DAX mapping of real persistent memory.
//!   On non-x86-64 machines this falls back to `msync` (reported by [`PersistMethod`]).
//! - `Msync`: `msync(MS_SYNC)` of the touched pages: an ordinary file on a disk.
//! - `None`: nothing; `/dev/shm` (tmpfs) survives a process crash but not a power loss.
//!
//! Invariants relied on by the `unsafe` blocks:
//! 1. The mapping lives as long as any span (they share it through an `Arc`), and its length never changes
//!    (the file is never truncated while mapped: we hold an exclusive `flock`, and the journal never
//!    calls `set_len` after mapping).
//! 2. Spans never overlap (checked in [`Mapping::split`], which consumes the mapping).
//! 3. Every access is bounds-checked against the span before touching the pointer.
//! 4. No other process writes the file while we hold it: the exclusive `flock` taken at open keeps
//!    out other twinblock processes (it is advisory; other programs must not touch the file).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use memmap2::MmapRaw;

use crate::error::JournalError;

/// How writes to NVRAM are made persistent (configured, shown in status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PersistenceMode {
    /// Real persistent memory mapped with DAX: cache-line write-back and a store fence.
    Pmem,
    /// An ordinary file: `msync` of the touched pages.
    Msync,
    /// tmpfs (`/dev/shm`): stores are already in the file's page cache.
    None,
}

/// What is actually executed for a [`PersistenceMode`] on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum PersistMethod {
    Clwb,
    ClflushOpt,
    Clflush,
    /// `msync`; for `Pmem` mode on a machine without cache-line write-back instructions.
    Msync,
    Nothing,
}

/// Cache line size assumed for write-back (every x86-64 part in use has 64-byte lines).
const CACHE_LINE_BYTES: usize = 64;

impl PersistMethod {
    /// Picks the method for `mode` on the running CPU.
    pub fn detect(mode: PersistenceMode) -> PersistMethod {
        match mode {
            PersistenceMode::None => PersistMethod::Nothing,
            PersistenceMode::Msync => PersistMethod::Msync,
            PersistenceMode::Pmem => detect_cache_flush(),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn detect_cache_flush() -> PersistMethod {
    // Leaf 7 / subleaf 0, EBX bit 24 = CLWB, bit 23 = CLFLUSHOPT; CLFLUSH is part of SSE2, which
    // every x86-64 CPU has.
    #[allow(unused_unsafe)]
    // SAFETY: `cpuid` exists on every x86-64 CPU and has no side effects.
    let leaf7 = unsafe { std::arch::x86_64::__cpuid_count(7, 0) };
    if leaf7.ebx & (1 << 24) != 0 {
        PersistMethod::Clwb
    } else if leaf7.ebx & (1 << 23) != 0 {
        PersistMethod::ClflushOpt
    } else {
        PersistMethod::Clflush
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect_cache_flush() -> PersistMethod {
    PersistMethod::Msync
}

/// Writes back the cache lines covering `[ptr, ptr+len)` and fences.
///
/// # Safety
/// `[ptr, ptr+len)` must lie inside a live mapping.
#[cfg(target_arch = "x86_64")]
unsafe fn write_back_lines(method: PersistMethod, ptr: *const u8, len: usize) {
    let first = (ptr as usize) & !(CACHE_LINE_BYTES - 1);
    let end = ptr as usize + len;
    let mut line = first;
    while line < end {
        // SAFETY: `line` is inside a cache line that overlaps the mapped range (caller's
        // contract); the write-back instructions only read the address and never fault on mapped
        // memory. The byte encodings are used so that no target feature is needed at build time:
        // clwb = 66 0F AE /6, clflushopt = 66 0F AE /7, with a [rax] operand (ModRM 0x30 / 0x38).
        unsafe {
            match method {
                PersistMethod::Clwb => std::arch::asm!(
                    ".byte 0x66, 0x0f, 0xae, 0x30",
                    in("rax") line,
                    options(nostack, preserves_flags)
                ),
                PersistMethod::ClflushOpt => std::arch::asm!(
                    ".byte 0x66, 0x0f, 0xae, 0x38",
                    in("rax") line,
                    options(nostack, preserves_flags)
                ),
                _ => std::arch::x86_64::_mm_clflush(line as *const u8),
            }
        }
        line += CACHE_LINE_BYTES;
    }
    // SAFETY: `sfence` only orders stores; always valid on x86-64.
    unsafe { std::arch::x86_64::_mm_sfence() };
}

/// The mapped file, shared by the spans cut from it.
struct Inner {
    map: MmapRaw,
    /// Held for the exclusive `flock` (released when the file closes).
    _file: File,
    path: PathBuf,
    method: PersistMethod,
}

/// An open, locked and mapped NVRAM file, before it is split into spans.
pub struct Mapping {
    inner: Inner,
}

impl std::fmt::Debug for Mapping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mapping")
            .field("path", &self.inner.path)
            .field("len", &self.inner.map.len())
            .field("method", &self.inner.method)
            .finish()
    }
}

impl Mapping {
    /// Opens (creating when `create` is set) `path`, takes an exclusive lock, sizes the file to
    /// `min_bytes` when it is empty (just created), and maps the whole file.
    pub fn open(
        path: &Path,
        mode: PersistenceMode,
        create: bool,
        min_bytes: u64,
    ) -> Result<Mapping, JournalError> {
        let io = |op: &'static str| {
            move |source: std::io::Error| JournalError::Io {
                path: path.to_path_buf(),
                op,
                source,
            }
        };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(JournalError::Missing {
                    path: path.to_path_buf(),
                })
            }
            Err(e) => return Err(io("open")(e)),
        };
        // SAFETY: `flock` on a valid, owned file descriptor; no memory is passed.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(JournalError::Locked {
                    path: path.to_path_buf(),
                });
            }
            return Err(io("flock")(err));
        }
        let len = file.metadata().map_err(io("stat"))?.len();
        if len == 0 {
            if !create {
                return Err(JournalError::Foreign {
                    path: path.to_path_buf(),
                    source: crate::error::FormatError::Truncated {
                        what: "NVRAM file",
                        need: min_bytes,
                        have: 0,
                    },
                });
            }
            file.set_len(min_bytes).map_err(io("set_len"))?;
        }
        let map = MmapRaw::map_raw(&file).map_err(io("mmap"))?;
        Ok(Mapping {
            inner: Inner {
                map,
                _file: file,
                path: path.to_path_buf(),
                method: PersistMethod::detect(mode),
            },
        })
    }

    pub fn len(&self) -> u64 {
        self.inner.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.inner.map.len() == 0
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub fn method(&self) -> PersistMethod {
        self.inner.method
    }

    /// Read-only view of the whole file (to validate the header before splitting).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: before `split` (which consumes `self`) no span exists, so nothing in this
        // process writes the mapping while the borrow lives (invariant 4 excludes other
        // processes); pointer and length come from the live mapping (invariant 1).
        unsafe { std::slice::from_raw_parts(self.inner.map.as_ptr(), self.inner.map.len()) }
    }

    /// Splits the mapping into disjoint spans `(offset, len)`. Returns the mapping back when the
    /// ranges overlap or leave the file.
    pub fn split(self, ranges: &[(u64, u64)]) -> Result<Vec<MapSpan>, Mapping> {
        let mut sorted: Vec<(u64, u64)> = ranges.to_vec();
        sorted.sort_unstable();
        let len = self.len();
        let mut prev_end = 0;
        for &(off, n) in &sorted {
            match off.checked_add(n) {
                Some(end) if off >= prev_end && end <= len => prev_end = end,
                _ => return Err(self),
            }
        }
        let inner = Arc::new(self.inner);
        Ok(ranges
            .iter()
            .map(|&(off, n)| MapSpan {
                map: Arc::clone(&inner),
                start: off as usize,
                len: n as usize,
            })
            .collect())
    }
}

/// A disjoint byte range of the mapping with exclusive write access.
pub struct MapSpan {
    map: Arc<Inner>,
    start: usize,
    len: usize,
}

impl std::fmt::Debug for MapSpan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MapSpan")
            .field("start", &self.start)
            .field("len", &self.len)
            .finish()
    }
}

impl MapSpan {
    pub fn len(&self) -> u64 {
        self.len as u64
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn method(&self) -> PersistMethod {
        self.map.method
    }

    pub fn path(&self) -> &Path {
        &self.map.path
    }

    /// The span's bytes.
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: the range is inside the mapping (checked by `split`, invariant 2/3), the
        // mapping outlives `self` (invariant 1), and writes need `&mut self`, so no write to these
        // bytes happens while this shared borrow lives.
        unsafe { std::slice::from_raw_parts(self.map.map.as_ptr().add(self.start), self.len) }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `bytes`, and `&mut self` makes this the only borrow of the span's bytes
        // (spans are disjoint, invariant 2).
        unsafe {
            std::slice::from_raw_parts_mut(self.map.map.as_mut_ptr().add(self.start), self.len)
        }
    }

    /// Copies `data` to span offset `at` (not persisted until [`MapSpan::persist`]).
    /// Panics if the range is outside the span: callers compute it from the span's own length.
    pub fn write(&mut self, at: u64, data: &[u8]) {
        let at = at as usize;
        self.bytes_mut()[at..at + data.len()].copy_from_slice(data);
    }

    /// Zeroes `len` bytes at span offset `at`.
    pub fn zero(&mut self, at: u64, len: u64) {
        let at = at as usize;
        self.bytes_mut()[at..at + len as usize].fill(0);
    }

    /// Makes `[at, at+len)` of the span persistent according to the mode.
    pub fn persist(&self, at: u64, len: u64) -> Result<(), JournalError> {
        let (at, len) = (at as usize, len as usize);
        assert!(at + len <= self.len, "persist range outside span");
        match self.map.method {
            PersistMethod::Nothing => Ok(()),
            PersistMethod::Msync => {
                self.map
                    .map
                    .flush_range(self.start + at, len)
                    .map_err(|source| JournalError::Io {
                        path: self.map.path.clone(),
                        op: "msync",
                        source,
                    })
            }
            #[cfg(target_arch = "x86_64")]
            method => {
                // SAFETY: the range was checked against the span just above, and the span is
                // inside the live mapping (invariants 1-3).
                unsafe {
                    write_back_lines(method, self.map.map.as_ptr().add(self.start + at), len)
                };
                Ok(())
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_must_be_disjoint_and_inside_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nv");
        let m = Mapping::open(&path, PersistenceMode::None, true, 8192).unwrap();
        let m = m.split(&[(0, 4096), (4000, 100)]).unwrap_err();
        let m = m.split(&[(0, 9000)]).unwrap_err();
        let spans = m.split(&[(0, 4096), (4096, 4096)]).unwrap();
        assert_eq!(spans.len(), 2);
    }

    #[test]
    fn second_open_of_locked_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nv");
        let _a = Mapping::open(&path, PersistenceMode::None, true, 4096).unwrap();
        assert!(matches!(
            Mapping::open(&path, PersistenceMode::None, true, 4096),
            Err(JournalError::Locked { .. })
        ));
    }

    #[test]
    fn writes_reach_the_file_in_every_mode() {
        for mode in [
            PersistenceMode::None,
            PersistenceMode::Msync,
            PersistenceMode::Pmem,
        ] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("nv");
            {
                let m = Mapping::open(&path, mode, true, 8192).unwrap();
                let mut spans = m.split(&[(4096, 4096)]).unwrap();
                let s = &mut spans[0];
                s.write(100, b"hello");
                s.persist(100, 5).unwrap();
                assert_eq!(&s.bytes()[100..105], b"hello");
            }
            let bytes = std::fs::read(&path).unwrap();
            assert_eq!(&bytes[4196..4201], b"hello", "mode {mode:?}");
        }
    }
}
