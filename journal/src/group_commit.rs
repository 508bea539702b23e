//! Group commit of log records in `msync` mode: one thread per journaled log persists the records
//! appended since its last round with as few `msync` calls as their byte ranges allow, and wakes
//! the writers whose records it covered.
//!
//! Why a thread: `msync(MS_SYNC)` of a page costs a disk write (hundreds of microseconds to
//! milliseconds). Done by each appender under the volume's lock, it serialises every writer behind
//! every other writer's disk write. Here an appender only copies its record into the mapping under
//! the lock (as before), hands `(seq, range)` to this thread ([`GroupCommit::submit`]) and awaits
//! [`GroupCommit::wait_persisted`] with the lock released. While one round's `msync` runs, the
//! records of the writers that arrive meanwhile accumulate; the next round covers all of them with
//! one `msync` per run of adjacent pages ([`coalesce`]; the ring wrap makes two runs).
//!
//! Acknowledgement semantics are unchanged: a round completes only when every range of it is
//! persisted, and it then marks every seq up to its newest as persisted, so the persisted seqs are
//! always a prefix of the log (a waiter is never woken before all older records are persistent).
//!
//! Records stored but not persisted can now be several at once, and a power cut can leave any of
//! them torn or on the medium (the kernel writes dirty pages back on its own). The number of such
//! records and the log bytes they span are bounded ([`UNPERSISTED_MAX_RECORDS`],
//! [`UNPERSISTED_MAX_LOG_BYTES`]; appenders wait for room), which is what recovery relies on to
//! tell a torn group from damage in the middle of the log (see `scan`).
//!
//! A failed `msync` fails every waiter of its round and every later one (sticky): Linux reports a
//! write-back error once and may drop the pages, so a later successful `msync` would not prove that
//! the failed round's records are persistent, and acknowledging newer records would break the
//! prefix rule above. The volume refuses writes from then on with an error saying so.

use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use tokio::sync::watch;

use crate::error::JournalError;
pub use crate::scan::{UNPERSISTED_MAX_LOG_BYTES, UNPERSISTED_MAX_RECORDS};

/// Ranges whose gap is smaller than this are persisted by one `msync` (it works on whole pages:
/// a range starting in the page where the previous one ends adds no page).
const MSYNC_PAGE_BYTES: u64 = 4096;

/// One appended record waiting to be persisted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PendingRecord {
    pub seq: u64,
    /// Log offset of the bytes to persist.
    pub at: u64,
    /// Bytes to persist.
    pub len: u64,
    /// Log bytes the record takes (a PAD: up to the end of the log), for the unpersisted bound.
    pub consumed: u64,
}

/// Counters of the group commit, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct GroupCommitStats {
    /// Records persisted.
    pub records: u64,
    /// Rounds (each wakes the writers it covered).
    pub rounds: u64,
    /// `msync` calls made.
    pub persist_calls: u64,
}

/// Why records are not persisted: the first failed round.
#[derive(Debug)]
pub struct Failure {
    /// The oldest seq the failed round held (everything from it on is not persistent).
    pub first_seq: u64,
    pub kind: std::io::ErrorKind,
    pub message: String,
}

/// What the thread has done so far.
#[derive(Debug, Clone, Default)]
pub struct Progress {
    /// Every record with seq <= this is persistent.
    pub persisted_seq: u64,
    pub failed: Option<Arc<Failure>>,
}

/// Persists `len` bytes at log offset `at`.
pub type PersistFn = Box<dyn FnMut(u64, u64) -> Result<(), JournalError> + Send>;

struct State {
    pending: Vec<PendingRecord>,
    /// Records submitted and not yet through a round (pending or being persisted).
    unpersisted_records: u64,
    unpersisted_bytes: u64,
    persisted_seq: u64,
    failed: Option<Arc<Failure>>,
    closing: bool,
    stats: GroupCommitStats,
}

struct Shared {
    state: Mutex<State>,
    /// The thread waits here for records.
    work: Condvar,
    /// Appenders blocked for room wait here (see [`GroupCommit::wait_room_blocking`]).
    room: Condvar,
    progress: watch::Sender<Progress>,
    path: PathBuf,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Every update leaves the state consistent; a panicking holder must not wedge writers.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The group-commit thread of one log and the handle appenders and waiters use.
pub struct GroupCommit {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for GroupCommit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GroupCommit")
            .field("path", &self.shared.path)
            .finish()
    }
}

/// The runs of pages to persist for `ranges` (`(at, len)`, any order): the union of the ranges,
/// with ranges that start in the page where the previous run ends joined into it. Pure.
pub fn coalesce(ranges: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut sorted: Vec<(u64, u64)> = ranges.iter().copied().filter(|r| r.1 > 0).collect();
    sorted.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(2);
    for (at, len) in sorted {
        let end = at + len;
        match out.last_mut() {
            Some(run) if at <= (run.0 + run.1).next_multiple_of(MSYNC_PAGE_BYTES) => {
                run.1 = run.1.max(end - run.0);
            }
            _ => out.push((at, len)),
        }
    }
    out
}

impl GroupCommit {
    /// Starts the thread for a log whose records up to `persisted_seq` are persistent; `persist`
    /// persists log ranges; `path` names the NVRAM file in errors.
    pub fn start(
        persisted_seq: u64,
        persist: PersistFn,
        path: PathBuf,
    ) -> Result<GroupCommit, JournalError> {
        let (progress, _) = watch::channel(Progress {
            persisted_seq,
            failed: None,
        });
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: Vec::new(),
                unpersisted_records: 0,
                unpersisted_bytes: 0,
                persisted_seq,
                failed: None,
                closing: false,
                stats: GroupCommitStats::default(),
            }),
            work: Condvar::new(),
            room: Condvar::new(),
            progress,
            path: path.clone(),
        });
        let worker = Arc::clone(&shared);
        let thread = std::thread::Builder::new()
            .name("tb-group-commit".into())
            .spawn(move || run(&worker, persist))
            .map_err(|source| JournalError::Io {
                path,
                op: "start the group-commit thread",
                source,
            })?;
        Ok(GroupCommit {
            shared,
            thread: Some(thread),
        })
    }

    /// The error a writer of `seq` gets after `failure`.
    fn failure_error(&self, failure: &Failure, seq: u64) -> JournalError {
        JournalError::Io {
            path: self.shared.path.clone(),
            op: "msync",
            source: std::io::Error::new(
                failure.kind,
                format!(
                    "{}; log records from seq {} on (this one: {seq}) are not persistent, so \
                     their writes were not acknowledged, and the volume refuses writes until the \
                     daemon is restarted on a working NVRAM medium",
                    failure.message, failure.first_seq
                ),
            ),
        }
    }

    fn room_in(&self, st: &State, records: u64, bytes: u64) -> Result<bool, JournalError> {
        if let Some(f) = &st.failed {
            return Err(self.failure_error(f, st.persisted_seq + 1));
        }
        // Alone, any record may go (a record larger than the byte bound is still one record).
        Ok(st.unpersisted_records == 0
            || (st.unpersisted_records + records <= UNPERSISTED_MAX_RECORDS
                && st.unpersisted_bytes + bytes <= UNPERSISTED_MAX_LOG_BYTES))
    }

    /// True when `records` more records spanning `bytes` of log may be stored now without passing
    /// the unpersisted bounds; an error once a persist failed.
    pub fn has_room(&self, records: u64, bytes: u64) -> Result<bool, JournalError> {
        self.room_in(&self.shared.lock(), records, bytes)
    }

    /// Blocks the calling thread until [`GroupCommit::has_room`]; for appends that cannot wait
    /// asynchronously (CP and TRANSITION records appended under the volume's lock). The thread
    /// never needs that lock, so this always ends.
    pub fn wait_room_blocking(&self, records: u64, bytes: u64) -> Result<(), JournalError> {
        let mut st = self.shared.lock();
        while !self.room_in(&st, records, bytes)? {
            st = self.shared.room.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        Ok(())
    }

    /// Hands one stored record to the thread (call in seq order, after [`GroupCommit::has_room`]).
    pub fn submit(&self, record: PendingRecord) {
        let mut st = self.shared.lock();
        st.unpersisted_records += 1;
        st.unpersisted_bytes += record.consumed;
        st.pending.push(record);
        drop(st);
        self.shared.work.notify_one();
    }

    /// A receiver of the thread's progress: subscribe before checking for room, then await its
    /// `changed()` to learn that room may have been made.
    pub fn subscribe(&self) -> watch::Receiver<Progress> {
        self.shared.progress.subscribe()
    }

    /// Returns once every record with seq <= `seq` is persistent; the persist error when the
    /// round holding `seq` (or an earlier one) failed.
    pub async fn wait_persisted(&self, seq: u64) -> Result<(), JournalError> {
        let mut rx = self.subscribe();
        let (persisted, failed) = {
            let p = rx
                .wait_for(|p| p.persisted_seq >= seq || p.failed.is_some())
                .await
                .map_err(|_| JournalError::ShutDown)?;
            (p.persisted_seq, p.failed.clone())
        };
        match failed {
            Some(f) if persisted < seq => Err(self.failure_error(&f, seq)),
            _ => Ok(()),
        }
    }

    /// Every record with seq <= this is persistent.
    pub fn persisted_seq(&self) -> u64 {
        self.shared.lock().persisted_seq
    }

    pub fn stats(&self) -> GroupCommitStats {
        self.shared.lock().stats
    }
}

impl Drop for GroupCommit {
    /// Persists what was submitted, then stops the thread (which holds the NVRAM mapping: the file
    /// is closed, and its lock released, when this returns).
    fn drop(&mut self) {
        self.shared.lock().closing = true;
        self.shared.work.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The thread: rounds until closed and drained.
fn run(shared: &Shared, mut persist: PersistFn) {
    loop {
        let (batch, failed) = {
            let mut st = shared.lock();
            while st.pending.is_empty() && !st.closing {
                st = shared.work.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.pending.is_empty() {
                return;
            }
            (std::mem::take(&mut st.pending), st.failed.is_some())
        };
        let ranges: Vec<(u64, u64)> = batch.iter().map(|r| (r.at, r.len)).collect();
        let runs = coalesce(&ranges);
        let mut calls = 0;
        let result = if failed {
            Ok(())
        } else {
            runs.iter().try_for_each(|&(at, len)| {
                calls += 1;
                persist(at, len)
            })
        };
        let mut st = shared.lock();
        st.unpersisted_records -= batch.len() as u64;
        st.unpersisted_bytes -= batch.iter().map(|r| r.consumed).sum::<u64>();
        st.stats.rounds += 1;
        st.stats.persist_calls += calls;
        match result {
            Ok(()) if !failed => {
                st.stats.records += batch.len() as u64;
                st.persisted_seq = batch.iter().map(|r| r.seq).max().unwrap_or(0);
            }
            Ok(()) => {}
            Err(e) => {
                let (kind, message) = match &e {
                    JournalError::Io { source, .. } => (source.kind(), e.to_string()),
                    _ => (std::io::ErrorKind::Other, e.to_string()),
                };
                let first_seq = batch.iter().map(|r| r.seq).min().unwrap_or(0);
                tracing::error!(
                    path = %shared.path.display(),
                    first_seq,
                    error = %e,
                    "persisting the NVRAM log failed: the writes waiting for it fail and the volume refuses writes"
                );
                st.failed = Some(Arc::new(Failure {
                    first_seq,
                    kind,
                    message,
                }));
            }
        }
        let progress = Progress {
            persisted_seq: st.persisted_seq,
            failed: st.failed.clone(),
        };
        drop(st);
        shared.progress.send_replace(progress);
        shared.room.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[test]
    fn adjacent_and_same_page_ranges_make_one_run() {
        assert_eq!(
            coalesce(&[(0, 4160), (4160, 4160), (8320, 4160)]),
            vec![(0, 12480)]
        );
        // A gap inside the page where the run ends joins; one starting a page later does not.
        assert_eq!(coalesce(&[(0, 100), (200, 100)]), vec![(0, 300)]);
        assert_eq!(
            coalesce(&[(0, 100), (8192, 64)]),
            vec![(0, 100), (8192, 64)]
        );
        // The ring wrap: a PAD header at the end, records again from offset 0.
        assert_eq!(
            coalesce(&[(1_000_000, 64), (0, 4160), (4160, 4160)]),
            vec![(0, 8320), (1_000_000, 64)]
        );
        // Overlaps (a record's zeroed next header is the next record's header).
        assert_eq!(coalesce(&[(0, 4224), (4160, 4224)]), vec![(0, 8384)]);
        assert_eq!(coalesce(&[]), Vec::<(u64, u64)>::new());
    }

    fn record(seq: u64) -> PendingRecord {
        PendingRecord {
            seq,
            at: (seq - 1) * 4160,
            len: 4224,
            consumed: 4160,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_records_share_rounds_and_all_complete() {
        let calls = Arc::new(AtomicU64::new(0));
        let c = Arc::clone(&calls);
        let persist: PersistFn = Box::new(move |_, _| {
            c.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(std::time::Duration::from_millis(2));
            Ok(())
        });
        let gc = Arc::new(GroupCommit::start(0, persist, "nv".into()).unwrap());
        let next = Arc::new(Mutex::new(1u64));
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let (gc, next) = (Arc::clone(&gc), Arc::clone(&next));
            tasks.push(tokio::spawn(async move {
                let seq = loop {
                    let mut rx = gc.subscribe();
                    {
                        let mut n = next.lock().unwrap();
                        if gc.has_room(1, 4160).unwrap() {
                            let seq = *n;
                            *n += 1;
                            gc.submit(record(seq));
                            break seq;
                        }
                    }
                    rx.changed().await.unwrap();
                };
                gc.wait_persisted(seq).await.unwrap();
                assert!(gc.persisted_seq() >= seq);
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let stats = gc.stats();
        assert_eq!(stats.records, 200);
        assert_eq!(stats.persist_calls, calls.load(Ordering::Relaxed));
        assert!(
            stats.persist_calls <= 50,
            "{} msync calls for 200 concurrent records",
            stats.persist_calls
        );
    }

    #[test]
    fn unpersisted_records_are_bounded() {
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let rx = Mutex::new(rx);
        // Each persist blocks until the test lets it go.
        let persist: PersistFn = Box::new(move |_, _| {
            let _ = rx.lock().unwrap().recv();
            Ok(())
        });
        let gc = GroupCommit::start(0, persist, "nv".into()).unwrap();
        let mut seq = 0;
        while gc.has_room(1, 4160).unwrap() {
            seq += 1;
            gc.submit(record(seq));
        }
        assert!(seq <= UNPERSISTED_MAX_RECORDS, "{seq} records unpersisted");
        assert!(!gc.has_room(1, 4160).unwrap());
        // Big records: the byte bound; a single one always fits an empty window.
        drop(tx);
        gc.wait_room_blocking(UNPERSISTED_MAX_RECORDS, 4160)
            .unwrap();
        assert!(gc.has_room(1, UNPERSISTED_MAX_LOG_BYTES * 2).unwrap());
    }

    #[tokio::test]
    async fn a_failed_persist_fails_every_waiter_it_covers_and_later_ones() {
        let persist: PersistFn = Box::new(|_, _| {
            Err(JournalError::Io {
                path: "nv".into(),
                op: "msync",
                source: std::io::Error::from_raw_os_error(libc::EIO),
            })
        });
        let gc = GroupCommit::start(10, persist, "/x/nvram.img".into()).unwrap();
        assert!(gc.wait_persisted(10).await.is_ok(), "already persistent");
        gc.submit(record(11));
        gc.submit(record(12));
        for seq in [11, 12] {
            let e = gc.wait_persisted(seq).await.unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains("/x/nvram.img"), "{msg}");
            assert!(msg.contains("not persistent"), "{msg}");
            assert!(
                matches!(&e, JournalError::Io { source, .. } if source.kind() == std::io::Error::from_raw_os_error(libc::EIO).kind())
            );
        }
        assert!(
            gc.has_room(1, 64).is_err(),
            "writes are refused after a failure"
        );
        assert!(gc.wait_room_blocking(1, 64).is_err());
        assert_eq!(gc.persisted_seq(), 10);
    }
}
