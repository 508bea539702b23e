//! An in-memory [`Member`] with fault injection, for tests, models and benchmarks.
//!
//! A `MemMember` holds its bytes in a `Vec<u8>` behind a mutex. Faults are switched on and off at
//! run time through shared handles, so a test can make a member fail in the middle of a workload:
//! - [`MemMember::fail_reads`] / [`MemMember::fail_writes`]: every later read / write errors;
//! - [`MemMember::fail_range`]: I/O touching a byte range errors (a bad sector area);
//! - [`MemMember::vanish`]: the member behaves like a pulled disk (everything errors).
//!
//! I/O counters ([`MemMember::stats`]) let a test assert how much a resync touched.
//!
//! With [`MemMember::enable_write_cache`] the member models a disk with a volatile write cache
//! (see [`crate::wcache`]): [`MemMember::power_cut`] drops, keeps or tears at sector granularity
//! every write not followed by a `sync`.

use crate::wcache::{CutPolicy, PowerSupply, WriteCache};
use crate::Member;
use async_trait::async_trait;
use bytes::Bytes;
use std::io;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

/// Counts of I/O a member served since creation (or the last [`MemMember::reset_stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemStats {
    pub reads: u64,
    pub writes: u64,
    pub read_bytes: u64,
    pub written_bytes: u64,
    pub syncs: u64,
}

/// An in-memory disk with fault injection.
pub struct MemMember {
    name: String,
    data: Mutex<Vec<u8>>,
    fail_reads: AtomicBool,
    fail_writes: AtomicBool,
    vanished: AtomicBool,
    bad_ranges: Mutex<Vec<Range<u64>>>,
    /// The volatile write cache model, when enabled.
    cache: Mutex<Option<WriteCache>>,
    /// When set and off, writes, discards and syncs do nothing (see [`PowerSupply`]).
    power: Mutex<Option<std::sync::Arc<PowerSupply>>>,
    reads: AtomicU64,
    writes: AtomicU64,
    read_bytes: AtomicU64,
    written_bytes: AtomicU64,
    syncs: AtomicU64,
}

impl MemMember {
    /// A zero-filled member of `size_bytes`.
    pub fn new(name: impl Into<String>, size_bytes: u64) -> MemMember {
        let len = usize::try_from(size_bytes).unwrap_or(usize::MAX);
        Self::from_vec(name, vec![0u8; len])
    }

    /// A member holding exactly `data`.
    pub fn from_vec(name: impl Into<String>, data: Vec<u8>) -> MemMember {
        MemMember {
            name: name.into(),
            data: Mutex::new(data),
            fail_reads: AtomicBool::new(false),
            fail_writes: AtomicBool::new(false),
            vanished: AtomicBool::new(false),
            bad_ranges: Mutex::new(Vec::new()),
            cache: Mutex::new(None),
            power: Mutex::new(None),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            read_bytes: AtomicU64::new(0),
            written_bytes: AtomicU64::new(0),
            syncs: AtomicU64::new(0),
        }
    }

    /// Make every later read fail (`true`) or succeed again (`false`).
    pub fn fail_reads(&self, on: bool) {
        self.fail_reads.store(on, Ordering::SeqCst);
    }

    /// Make every later write (and discard) fail (`true`) or succeed again (`false`).
    pub fn fail_writes(&self, on: bool) {
        self.fail_writes.store(on, Ordering::SeqCst);
    }

    /// Make I/O overlapping `range` (member byte offsets) fail.
    pub fn fail_range(&self, range: Range<u64>) {
        self.lock_ranges().push(range);
    }

    /// Forget every range given to [`MemMember::fail_range`].
    pub fn clear_fail_ranges(&self) {
        self.lock_ranges().clear();
    }

    /// The disk disappears: every later operation fails until [`MemMember::reappear`].
    pub fn vanish(&self) {
        self.vanished.store(true, Ordering::SeqCst);
    }

    /// Undo [`MemMember::vanish`]; the content is what it was when the disk vanished.
    pub fn reappear(&self) {
        self.vanished.store(false, Ordering::SeqCst);
    }

    /// A copy of the whole content (faults are ignored: this is the test's view of the platter).
    pub fn snapshot(&self) -> Vec<u8> {
        self.lock_data().clone()
    }

    /// From now on, writes are volatile until the next `sync` (see [`MemMember::power_cut`]).
    pub fn enable_write_cache(&self) {
        let mut c = self.lock_cache();
        if c.is_none() {
            *c = Some(WriteCache::default());
        }
    }

    /// The power goes: every write since the last `sync` is lost, kept or torn per `policy`
    /// (nothing happens without a write cache). The member stays usable, as after a reboot.
    pub fn power_cut(&self, policy: CutPolicy) {
        let mut cache = self.lock_cache();
        if let Some(c) = cache.as_mut() {
            let mut data = self.lock_data();
            c.cut(&mut data, policy);
        }
    }

    /// Feeds the member from `power`: once it is off, writes, discards and syncs do nothing.
    pub fn attach_power(&self, power: std::sync::Arc<PowerSupply>) {
        *self.power.lock().unwrap_or_else(|e| e.into_inner()) = Some(power);
    }

    /// False when the member's power is off (the operation must change nothing).
    fn powered(&self) -> bool {
        self.power
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .is_none_or(|p| p.draw())
    }

    /// Writes not yet made durable by a `sync` (0 without a write cache).
    pub fn unsynced_writes(&self) -> usize {
        self.lock_cache()
            .as_ref()
            .map_or(0, WriteCache::pending_writes)
    }

    fn lock_cache(&self) -> std::sync::MutexGuard<'_, Option<WriteCache>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Changes `range` of `data` with `apply`, recording the change in the write cache.
    fn change(&self, data: &mut [u8], range: Range<usize>, apply: impl FnOnce(&mut [u8])) {
        let mut cache = self.lock_cache();
        match cache.as_mut() {
            None => apply(&mut data[range]),
            Some(c) => {
                let span = WriteCache::sector_span(range.start as u64, range.len() as u64);
                let span = span.start as usize..(span.end as usize).min(data.len());
                let before = data[span.clone()].to_vec();
                apply(&mut data[range]);
                c.record(span.start as u64, before, data[span].to_vec());
            }
        }
    }

    /// Overwrite bytes directly, bypassing faults and counters (for corrupting data in tests).
    pub fn poke(&self, offset: u64, bytes: &[u8]) {
        let mut data = self.lock_data();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(data.len());
        let end = start.saturating_add(bytes.len()).min(data.len());
        data[start..end].copy_from_slice(&bytes[..end - start]);
    }

    /// Counters of I/O served.
    pub fn stats(&self) -> MemStats {
        MemStats {
            reads: self.reads.load(Ordering::SeqCst),
            writes: self.writes.load(Ordering::SeqCst),
            read_bytes: self.read_bytes.load(Ordering::SeqCst),
            written_bytes: self.written_bytes.load(Ordering::SeqCst),
            syncs: self.syncs.load(Ordering::SeqCst),
        }
    }

    /// Zero the counters.
    pub fn reset_stats(&self) {
        for c in [
            &self.reads,
            &self.writes,
            &self.read_bytes,
            &self.written_bytes,
            &self.syncs,
        ] {
            c.store(0, Ordering::SeqCst);
        }
    }

    fn lock_data(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A poisoned lock only means a test thread panicked while holding it; the bytes are intact.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_ranges(&self) -> std::sync::MutexGuard<'_, Vec<Range<u64>>> {
        self.bad_ranges.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check(&self, what: &str, offset: u64, len: u64, write: bool) -> io::Result<()> {
        if self.vanished.load(Ordering::SeqCst) {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{}: member vanished ({what} at {offset})", self.name),
            ));
        }
        let flag = if write {
            &self.fail_writes
        } else {
            &self.fail_reads
        };
        if flag.load(Ordering::SeqCst) {
            return Err(io::Error::other(format!(
                "{}: injected {what} error at offset {offset}",
                self.name
            )));
        }
        let end = offset.saturating_add(len);
        if self
            .lock_ranges()
            .iter()
            .any(|r| r.start < end && offset < r.end)
        {
            return Err(io::Error::other(format!(
                "{}: injected {what} error in bad range at offset {offset} len {len}",
                self.name
            )));
        }
        Ok(())
    }

    fn bounds(&self, offset: u64, len: u64, data_len: usize) -> io::Result<Range<usize>> {
        let end = offset.checked_add(len).filter(|&e| e <= data_len as u64);
        match end {
            Some(end) => Ok(offset as usize..end as usize),
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "{}: I/O at offset {offset} len {len} passes the end ({data_len} bytes)",
                    self.name
                ),
            )),
        }
    }
}

#[async_trait]
impl Member for MemMember {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.lock_data().len() as u64
    }

    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.check("read", offset, len as u64, false)?;
        let data = self.lock_data();
        let range = self.bounds(offset, len as u64, data.len())?;
        let out = Bytes::copy_from_slice(&data[range]);
        self.reads.fetch_add(1, Ordering::SeqCst);
        self.read_bytes.fetch_add(len as u64, Ordering::SeqCst);
        Ok(out)
    }

    async fn write_at(&self, offset: u64, buf: Bytes) -> io::Result<()> {
        self.check("write", offset, buf.len() as u64, true)?;
        if !self.powered() {
            return Ok(());
        }
        let mut data = self.lock_data();
        let range = self.bounds(offset, buf.len() as u64, data.len())?;
        self.change(&mut data, range, |d| d.copy_from_slice(&buf));
        self.writes.fetch_add(1, Ordering::SeqCst);
        self.written_bytes
            .fetch_add(buf.len() as u64, Ordering::SeqCst);
        Ok(())
    }

    async fn sync(&self) -> io::Result<()> {
        self.check("sync", 0, 0, true)?;
        if !self.powered() {
            return Ok(());
        }
        if let Some(c) = self.lock_cache().as_mut() {
            c.flushed();
        }
        self.syncs.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check("discard", offset, len, true)?;
        if !self.powered() {
            return Ok(());
        }
        let mut data = self.lock_data();
        let range = self.bounds(offset, len, data.len())?;
        self.change(&mut data, range, |d| d.fill(0));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn injected_faults_fail_io_and_clear_again() {
        let m = MemMember::new("m0", 8192);
        m.write_at(0, Bytes::from_static(b"abcd")).await.unwrap();
        m.fail_reads(true);
        assert!(m.read_at(0, 4).await.is_err());
        m.fail_reads(false);
        assert_eq!(&m.read_at(0, 4).await.unwrap()[..], b"abcd");
        m.fail_range(4096..8192);
        assert!(m.read_at(4000, 200).await.is_err());
        assert!(m.read_at(0, 4096).await.is_ok());
        m.vanish();
        assert!(m.sync().await.is_err());
        m.reappear();
        assert!(
            m.read_at(8190, 4).await.is_err(),
            "read past the end must fail"
        );
        assert_eq!(m.stats().writes, 1);
    }

    #[tokio::test]
    async fn power_cut_loses_only_writes_since_the_last_sync() {
        let m = MemMember::new("m0", 8192);
        m.enable_write_cache();
        m.write_at(0, Bytes::from(vec![1u8; 4096])).await.unwrap();
        m.sync().await.unwrap();
        m.write_at(4096, Bytes::from(vec![2u8; 4096]))
            .await
            .unwrap();
        m.discard(0, 512).await.unwrap();
        assert_eq!(m.unsynced_writes(), 2);
        m.power_cut(CutPolicy::LoseAll);
        let d = m.snapshot();
        assert!(d[..4096].iter().all(|&b| b == 1));
        assert!(d[4096..].iter().all(|&b| b == 0));
        assert_eq!(m.unsynced_writes(), 0);
    }
}
