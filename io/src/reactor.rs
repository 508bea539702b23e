//! io_uring operations reaped by the tokio runtime that awaits them, instead of by the driver
//! thread of [`crate::uring`].
//!
//! Why: with the driver thread, every member read costs two cross-thread hand-offs: the tokio
//! worker writes an eventfd to wake the thread, and the thread, once the kernel completed the
//! read, resolves a oneshot that wakes a tokio worker parked on a futex. On a 2-core node those
//! hand-offs (context switches, `finish_task_switch` in profiles) cost more than the read.
//! Here the tokio worker that issues an operation pushes its SQE and enters the kernel itself
//! (an `O_DIRECT` read is issued to the device inside that call), and completions are reaped
//! by one task of the same runtime, woken by tokio's own reactor when the ring's descriptor
//! becomes readable (the ring is pollable: `EPOLLIN` while its completion queue is not empty).
//! The reaper resolves the oneshots from a tokio worker, so the waiting task is woken on that
//! worker's run queue: no extra thread, no futex wake.
//!
//! One ring per runtime (found through its `Handle::id`), shared by its workers under a mutex:
//! with a handful of workers the lock is brief (an SQE push and one `io_uring_enter`) and one
//! reaper wake-up collects the completions of every worker's requests. A ring is created on the
//! first operation issued inside a runtime and lives as long as its reaper task, that is, until
//! the runtime shuts down; dropping it waits for (and answers) every operation still in the
//! kernel, so no buffer is freed while the kernel may write into it.
//!
//! The ring is set up without `SINGLE_ISSUER`/`DEFER_TASKRUN` (several workers submit) and
//! without `COOP_TASKRUN` (a worker asleep in `epoll_wait` must be woken to post a completion
//! its read's task work produces).
//!
//! An operation outside a runtime, or one this ring cannot take (every slot in use, the ring
//! failed, `TWINBLOCK_IO_REAP=thread`), goes to the driver thread as before: the caller gets its
//! request back from [`ReactorRing::submit`] and queues it there.

use crate::uring::{Request, IOWQ_BOUNDED_WORKERS_MAX};
use io_uring::IoUring;
use std::cell::RefCell;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::runtime::{Handle, Id};
use tokio::sync::Notify;

/// Submission queue entries of a runtime's ring (the completion queue is twice as large).
pub const REACTOR_RING_ENTRIES: u32 = 256;
/// Operations in the kernel at once on one ring; more go to the driver thread. Kept at the SQ
/// size so the completion queue can never overflow.
pub const REACTOR_MAX_IN_FLIGHT: usize = REACTOR_RING_ENTRIES as usize;
/// Environment variable choosing who reaps completions: `runtime` (default) or `thread` (every
/// operation through the driver thread, as before this module existed).
pub const REAP_ENV: &str = "TWINBLOCK_IO_REAP";
/// How often an `io_uring_enter` interrupted by a signal is retried before the ring is given up.
const ENTER_RETRIES_MAX: u32 = 64;

/// Operations submitted through a runtime's ring (resubmissions included), process-wide.
static REACTOR_OPS: AtomicU64 = AtomicU64::new(0);

/// Operations submitted through runtime-reaped rings so far (for tests and diagnostics).
pub fn reactor_ops() -> u64 {
    REACTOR_OPS.load(Ordering::Relaxed)
}

/// The ring's descriptor as tokio's reactor sees it. Borrowed: the `IoUring` in the same
/// `ReactorRing` owns it and is dropped after the `AsyncFd` (field order).
struct RingFd(RawFd);

impl AsRawFd for RingFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

struct State {
    ring: IoUring,
    /// In-flight requests indexed by `user_data`. A request stays here until its completion has
    /// been reaped: it owns the buffer and descriptor its SQE names.
    slots: Vec<Option<Request>>,
    free_slots: Vec<usize>,
    /// Reused by every reap, so reaping does not allocate.
    reaped: Vec<(u64, i32)>,
    /// Set when the ring failed beyond repair: new operations go to the driver thread.
    broken: bool,
}

impl State {
    fn in_flight(&self) -> usize {
        self.slots.len() - self.free_slots.len()
    }

    /// Pushes `request`'s SQE into a free slot. Gives the request back when no slot is free or
    /// the submission queue is full (it then goes to the driver thread).
    fn push(&mut self, mut request: Request) -> Result<(), Request> {
        if self.broken {
            return Err(request);
        }
        let Some(slot) = self.free_slots.pop() else {
            return Err(request);
        };
        let entry = request.entry(slot as u64);
        // SAFETY: the buffer and descriptor named in `entry` are owned by `request`, stored in
        // `slots[slot]` right below, where it stays until the completion with this `user_data`
        // has been reaped (or, if the ring fails, it is leaked): moving `request` does not move
        // the heap memory the pointers refer to.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            self.free_slots.push(slot);
            return Err(request);
        }
        self.slots[slot] = Some(request);
        REACTOR_OPS.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Hands every pushed SQE to the kernel. On an error that is not transient the ring is
    /// marked broken; the SQEs still queued may or may not be consumed later, so their requests
    /// stay in their slots (never freed while the kernel may use them).
    fn submit(&mut self) -> io::Result<()> {
        let mut interrupted = 0;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e)
                    if e.raw_os_error() == Some(libc::EINTR) && interrupted < ENTER_RETRIES_MAX =>
                {
                    interrupted += 1;
                }
                Err(e) => {
                    self.broken = true;
                    return Err(e);
                }
            }
        }
    }

    /// Applies every completion in the queue; resubmits the remainder of short transfers and
    /// transient errors. Returns how many completions were reaped.
    fn reap(&mut self) -> usize {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        let count = reaped.len();
        let mut resubmit = false;
        for (user_data, res) in reaped.drain(..) {
            let slot = user_data as usize;
            let Some(request) = self.slots.get_mut(slot).and_then(Option::take) else {
                tracing::error!("io_uring (runtime ring): completion for unknown slot {slot}");
                continue;
            };
            self.free_slots.push(slot);
            if let Some(again) = request.complete(res) {
                match self.push(again) {
                    Ok(()) => resubmit = true,
                    Err(again) => again.fail_with(io::Error::other(
                        "io_uring runtime ring: cannot resubmit the rest of a short transfer",
                    )),
                }
            }
        }
        self.reaped = reaped;
        if resubmit {
            if let Err(e) = self.submit() {
                tracing::error!("io_uring runtime ring: resubmission failed: {e}");
            }
        }
        count
    }
}

/// A runtime's ring and its registration with the runtime's reactor.
pub(crate) struct ReactorRing {
    /// Declared before `state`: deregistered from the reactor before the ring's fd closes.
    afd: AsyncFd<RingFd>,
    state: Mutex<State>,
    /// SQEs were pushed that no flush has submitted yet (the flusher has been notified).
    flush_pending: AtomicBool,
    flush: Notify,
    /// `io_uring_enter` calls made by flushes (for tests of the batching).
    flushes: AtomicU64,
}

impl ReactorRing {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic under the lock leaves at worst a request in its slot (never freed early).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A ring registered with the reactor of the runtime `handle` belongs to, and its reaper
    /// task spawned there. Must be called inside that runtime's context.
    fn start(handle: &Handle) -> io::Result<Arc<ReactorRing>> {
        let ring = IoUring::new(REACTOR_RING_ENTRIES)?;
        // As for the driver ring: the default of 4 io-wq workers per CPU is too few for every
        // member's punted writes, syncs and hole punches. Not fatal if refused.
        let mut limits = [IOWQ_BOUNDED_WORKERS_MAX, 0];
        if let Err(e) = ring.submitter().register_iowq_max_workers(&mut limits) {
            tracing::debug!("io_uring runtime ring: cannot raise the io-wq worker limit: {e}");
        }
        let fd = ring.as_raw_fd();
        // A runtime built without its I/O driver makes tokio panic here rather than fail; that
        // is turned into an error (the runtime then uses the driver thread).
        let registered = std::panic::catch_unwind(|| {
            // SAFETY: `fd` is the ring's descriptor, owned by `ring`, which is stored in the same
            // `ReactorRing` as the `AsyncFd` and dropped after it (field order); nothing closes
            // or replaces the descriptor before that, and `RingFd` always returns it.
            unsafe { AsyncFd::register_with_interest(RingFd(fd), Interest::READABLE) }
        });
        let afd = match registered {
            Ok(Ok(afd)) => afd,
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(io::Error::other(
                    "the runtime has no I/O driver (built without enable_io)",
                ))
            }
        };
        let this = Arc::new(ReactorRing {
            afd,
            state: Mutex::new(State {
                ring,
                slots: (0..REACTOR_MAX_IN_FLIGHT).map(|_| None).collect(),
                free_slots: (0..REACTOR_MAX_IN_FLIGHT).rev().collect(),
                reaped: Vec::with_capacity(REACTOR_MAX_IN_FLIGHT),
                broken: false,
            }),
            flush_pending: AtomicBool::new(false),
            flush: Notify::new(),
            flushes: AtomicU64::new(0),
        });
        handle.spawn(reap_loop(Arc::clone(&this)));
        handle.spawn(flush_loop(Arc::clone(&this)));
        Ok(this)
    }

    /// Pushes `request`'s SQE; the flusher task hands it to the kernel together with every other
    /// SQE pushed before it runs. Gives the request back, untouched, when this ring cannot take
    /// it (the caller queues it on the driver thread instead).
    pub(crate) fn submit(&self, request: Request) -> Result<(), Request> {
        self.lock().push(request)?;
        if !self.flush_pending.swap(true, Ordering::AcqRel) {
            self.flush.notify_one();
        }
        Ok(())
    }

    /// Hands every pushed SQE to the kernel in one `io_uring_enter`.
    fn flush_now(&self) {
        // Cleared before the SQ is read: an SQE pushed after this point asks for another flush.
        self.flush_pending.store(false, Ordering::Release);
        self.flushes.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.lock().submit() {
            // The SQEs may still be consumed by the kernel: their requests stay in their slots
            // and are answered when (if) their completions arrive; later operations use the
            // driver thread.
            tracing::error!("io_uring runtime ring: io_uring_enter failed, giving it up: {e}");
        }
    }
}

impl Drop for ReactorRing {
    /// The runtime is gone (or the reaper ended): wait for what the kernel still holds, so no
    /// buffer is freed while it may be written, and answer each waiting caller.
    fn drop(&mut self) {
        let st = self
            .state
            .get_mut()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        while st.in_flight() > 0 {
            if !st.broken {
                if let Err(e) = st.ring.submit_and_wait(1) {
                    if e.raw_os_error() != Some(libc::EINTR) {
                        st.broken = true;
                    }
                }
                st.reap();
                continue;
            }
            // The ring cannot be waited on: leak the requests the kernel may still use.
            tracing::error!(
                "io_uring runtime ring dropped with {} operations it cannot wait for; their \
                 buffers are leaked",
                st.in_flight()
            );
            for slot in st.slots.iter_mut() {
                if let Some(request) = slot.take() {
                    request.abandon(io::Error::other("io_uring runtime ring failed"));
                }
            }
            break;
        }
    }
}

/// The reaper: waits for the ring's descriptor to become readable and applies completions.
async fn reap_loop(ring: Arc<ReactorRing>) {
    loop {
        let mut guard = match ring.afd.readable().await {
            Ok(guard) => guard,
            Err(e) => {
                tracing::error!("io_uring runtime ring: reactor stopped watching it: {e}");
                ring.lock().broken = true;
                return;
            }
        };
        if ring.lock().reap() == 0 {
            // Only when the queue was seen empty; a completion posted since wakes the
            // reactor again (tokio keeps readiness that arrived after this guard was taken).
            guard.clear_ready();
        }
    }
}

/// The flusher: submits what the runtime's tasks pushed, once they have all had their turn.
///
/// Why not enter the kernel in [`ReactorRing::submit`]: each `io_uring_enter` that issues a read
/// rings the device's doorbell (on a virtual machine, an exit to the hypervisor: `iowrite16` in
/// profiles), and a burst of requests (the NBD reader decoding a batch of headers, the tasks a
/// batch of completions woke) would ring it once per request. `yield_now` puts this task behind
/// every task that is ready now (tokio runs deferred tasks after the others and the I/O driver),
/// so one enter carries the whole burst.
async fn flush_loop(ring: Arc<ReactorRing>) {
    loop {
        ring.flush.notified().await;
        tokio::task::yield_now().await;
        ring.flush_now();
    }
}

/// Whether the runtime rings are wanted, decided once per process.
fn enabled() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| match std::env::var(REAP_ENV).as_deref() {
        Ok("thread") => {
            tracing::info!("io_uring completions reaped by the driver thread ({REAP_ENV}=thread)");
            false
        }
        Ok("runtime") | Err(_) => true,
        Ok(other) => {
            tracing::warn!("ignoring {REAP_ENV}={other:?} (expected \"runtime\" or \"thread\")");
            true
        }
    })
}

/// Each runtime's ring, or `None` for a runtime that cannot have one (no I/O driver, or the
/// kernel refused the ring): trying again on every operation would only repeat the failure.
static REGISTRY: Mutex<Vec<(Id, Option<Weak<ReactorRing>>)>> = Mutex::new(Vec::new());

thread_local! {
    /// The ring this thread used last, so most look-ups take no global lock.
    static LOCAL: RefCell<Option<(Id, Weak<ReactorRing>)>> = const { RefCell::new(None) };
}

/// The ring of the runtime this thread is running in, created on first use; `None` outside a
/// runtime or when runtime rings are off or unavailable.
pub(crate) fn current() -> Option<Arc<ReactorRing>> {
    if !enabled() {
        return None;
    }
    let handle = Handle::try_current().ok()?;
    let id = handle.id();
    let local = LOCAL.with(|l| match &*l.borrow() {
        Some((i, w)) if *i == id => w.upgrade(),
        _ => None,
    });
    if local.is_some() {
        return local;
    }
    let ring = {
        let mut registry = REGISTRY
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Rings of runtimes that shut down are gone; runtimes without one are remembered.
        registry.retain(|(_, w)| w.as_ref().is_none_or(|w| w.strong_count() > 0));
        match registry.iter().find(|(i, _)| *i == id) {
            Some((_, None)) => return None,
            Some((_, Some(w))) => w.upgrade()?,
            None => match ReactorRing::start(&handle) {
                Ok(ring) => {
                    registry.push((id, Some(Arc::downgrade(&ring))));
                    ring
                }
                Err(e) => {
                    tracing::warn!(
                        "io_uring: cannot reap completions on this runtime ({e}); its \
                         operations use the driver thread"
                    );
                    registry.push((id, None));
                    return None;
                }
            },
        }
    };
    LOCAL.with(|l| *l.borrow_mut() = Some((id, Arc::downgrade(&ring))));
    Some(ring)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uring::{self, Done, UringEngine};
    use std::fs::File;
    use std::io::Write as _;

    /// The process's driver-thread engine, or `None` (test skipped, with a note) when this
    /// kernel or sandbox refuses io_uring.
    fn engine_or_skip() -> Option<Arc<UringEngine>> {
        match uring::probe() {
            Ok(()) => Some(uring::process_engine().expect("ring after a successful probe")),
            Err(reason) => {
                eprintln!("skipping: io_uring unavailable: {reason}");
                None
            }
        }
    }

    fn pattern(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 13 + i / 4093) as u8).collect()
    }

    fn file_with(bytes: &[u8]) -> (tempfile::TempDir, Arc<File>) {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("f");
        File::create(&path)
            .and_then(|mut f| f.write_all(bytes))
            .expect("write file");
        let f = File::open(&path).expect("open");
        (dir, Arc::new(f))
    }

    fn multi_thread_runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn many_concurrent_reads_each_get_their_own_bytes_through_the_runtime_ring() {
        const READS: usize = 600;
        const BLOCK: usize = 4096;
        let Some(engine) = engine_or_skip() else {
            return;
        };
        let expected = pattern(READS * BLOCK);
        let (_dir, file) = file_with(&expected);
        let before = reactor_ops();
        let rt = multi_thread_runtime();
        let results = rt.block_on(async {
            let tasks: Vec<_> = (0..READS)
                .map(|i| {
                    let engine = Arc::clone(&engine);
                    let file = Arc::clone(&file);
                    // Blocks in a scrambled order, so neighbours do not complete together.
                    let block = (i * 7919) % READS;
                    tokio::spawn(async move {
                        (
                            block,
                            engine.read(file, (block * BLOCK) as u64, BLOCK).await,
                        )
                    })
                })
                .collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await.expect("task"));
            }
            out
        });
        for (block, result) in results {
            let buf = result.expect("read");
            assert_eq!(
                &buf[..],
                &expected[block * BLOCK..][..BLOCK],
                "block {block}"
            );
        }
        // More reads than the ring has slots may have gone to the driver thread; most did not.
        assert!(reactor_ops() - before >= REACTOR_MAX_IN_FLIGHT as u64);
    }

    #[test]
    fn kernel_read_error_reaches_the_caller_through_the_runtime_ring() {
        let Some(engine) = engine_or_skip() else {
            return;
        };
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("w");
        std::fs::write(&path, pattern(8192)).expect("write file");
        // Open for writing only: the kernel answers a read with EBADF.
        let write_only = Arc::new(
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .expect("open"),
        );
        let rt = multi_thread_runtime();
        let before = reactor_ops();
        let err = rt
            .block_on(engine.read(write_only, 0, 4096))
            .expect_err("read of a write-only descriptor");
        assert_eq!(err.raw_os_error(), Some(libc::EBADF), "{err}");
        assert!(
            reactor_ops() > before,
            "the read did not use the runtime ring"
        );
        let (_dir2, short) = file_with(&pattern(5000));
        let err = rt
            .block_on(engine.read(short, 0, 8192))
            .expect_err("read past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{err}");
    }

    #[test]
    fn a_burst_of_reads_goes_to_the_kernel_in_one_flush() {
        const READS: usize = 64;
        let Some(engine) = engine_or_skip() else {
            return;
        };
        let data = pattern(READS * 4096);
        let (_dir, file) = file_with(&data);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            // One warm-up read creates this runtime's ring.
            engine.read(Arc::clone(&file), 0, 4096).await.expect("read");
            let ring = current().expect("runtime ring");
            let before = ring.flushes.load(Ordering::Relaxed);
            // Every read is pushed during one poll of the joined future, before the flusher runs.
            let reads = (0..READS).map(|i| engine.read(Arc::clone(&file), (i * 4096) as u64, 4096));
            let results = futures_join_all(reads).await;
            for (i, r) in results.into_iter().enumerate() {
                assert_eq!(&r.expect("read")[..], &data[i * 4096..][..4096]);
            }
            let flushes = ring.flushes.load(Ordering::Relaxed) - before;
            assert!(flushes <= 2, "{READS} reads took {flushes} flushes");
        });
    }

    /// Polls every future in turn until all are done (a minimal `join_all`).
    async fn futures_join_all<F: std::future::Future>(
        futures: impl Iterator<Item = F>,
    ) -> Vec<F::Output> {
        let mut futures: Vec<_> = futures.map(Box::pin).collect();
        let mut out: Vec<Option<F::Output>> = futures.iter().map(|_| None).collect();
        std::future::poll_fn(|cx| {
            let mut all = true;
            for (f, o) in futures.iter_mut().zip(out.iter_mut()) {
                if o.is_none() {
                    match f.as_mut().poll(cx) {
                        std::task::Poll::Ready(v) => *o = Some(v),
                        std::task::Poll::Pending => all = false,
                    }
                }
            }
            if all {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await;
        out.into_iter().flatten().collect()
    }

    #[test]
    fn a_new_runtime_gets_a_new_ring_after_the_old_one_shut_down() {
        let Some(engine) = engine_or_skip() else {
            return;
        };
        let data = pattern(3 * 4096);
        let (_dir, file) = file_with(&data);
        for round in 0..3 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            let before = reactor_ops();
            let buf = rt
                .block_on(engine.read(Arc::clone(&file), 4096 * round, 4096))
                .expect("read");
            assert_eq!(&buf[..], &data[4096 * round as usize..][..4096]);
            assert!(
                reactor_ops() > before,
                "round {round} did not use a runtime ring"
            );
            drop(rt);
        }
    }

    #[test]
    fn a_full_ring_gives_requests_back_for_the_driver_thread() {
        if engine_or_skip().is_none() {
            return;
        }
        let (_dir, file) = file_with(&pattern(4096));
        let mut st = State {
            ring: IoUring::new(8).expect("ring"),
            slots: (0..2).map(|_| None).collect(),
            free_slots: vec![1, 0],
            reaped: Vec::new(),
            broken: false,
        };
        let mut receivers = Vec::new();
        for _ in 0..2 {
            let (request, rx) = Request::new_read(Arc::clone(&file), 0, 4096);
            assert!(st.push(request).is_ok());
            receivers.push(rx);
        }
        let (extra, _rx) = Request::new_read(Arc::clone(&file), 0, 4096);
        let extra = st.push(extra).expect_err("no free slot");
        st.broken = true;
        st.free_slots.push(7);
        assert!(st.push(extra).is_err(), "a broken ring takes nothing");
        st.free_slots.pop();
        st.broken = false;
        st.submit().expect("submit");
        let mut reaped = 0;
        while reaped < 2 {
            st.ring.submit_and_wait(1).expect("wait");
            reaped += st.reap();
        }
        assert_eq!(st.in_flight(), 0);
        for mut rx in receivers {
            match rx.try_recv() {
                Ok(Ok(Done::Read(buf))) => assert_eq!(&buf[..], &pattern(4096)[..]),
                _ => panic!("read not answered"),
            }
        }
    }
}
