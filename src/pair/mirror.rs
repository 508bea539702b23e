//! The owner's side of the mirror for one journaled volume: the [`MirrorHook`] the journal calls
//! for every appended record, the queue the interconnect's sender drains, and the
//! acknowledgement gate a write waits on.
//!
//! # How a write is gated
//!
//! `ship(seq)` queues the record (when the link is up) and, while the mirror is in sync, waits
//! until the partner's cumulative ACK reaches `seq`, at most `mirror_timeout_ms`. A timeout marks
//! the mirror out of sync (with the reason), asks the interconnect to drop the connection (a
//! silent partner gets a fresh handshake and a resync rather than an ever-growing queue) and lets
//! the write continue on local NVRAM alone. While out of sync, `ship` returns at once.
//!
//! # One deadline per mirror, not a timer per write
//!
//! The bounded wait is kept by one task per mirror ([`watch_deadlines`]) rather than a
//! `tokio::time::timeout` around each write's wait: a timer per write costs two locked
//! operations on the runtime's timer wheel (insert, remove) on the write path, and the runtime
//! wakes a parked worker whenever a new timer is due before its planned wake-up. The task sleeps
//! until the oldest waiter's deadline (each waiter records when it started waiting); when it
//! finds no waiter it sleeps one full timeout, which can never overshoot, since a waiter that
//! arrives after that look has its deadline at least one timeout after it. When the oldest
//! waiter's deadline has passed, the task declares the mirror out of sync, which completes every
//! waiter as not mirrored, exactly as the first write's own timeout did before.
//!
//! # Order and duplicates
//!
//! Writers call `ship` after releasing the journal's lock, so seqs arrive here out of order; the
//! queue is keyed by seq and the sender takes only the contiguous run starting at `next_send`,
//! so records go on the wire in seq order. Seqs below `next_send` (already covered by a resync
//! snapshot) are dropped. A seq whose `ship` never comes (a cancelled writer) stalls the queue
//! until the bounded wait expires; the resync that follows sends it from the log.
//!
//! # Back in sync
//!
//! After a (re)connection the sender takes a snapshot of every unretired record
//! ([`LogSource::unretired`]) and sends it after a LOG_RESET. The mirror is in sync again once the
//! partner acknowledged the whole snapshot *and* every record that was acknowledged to a client
//! without the partner in the meantime (`unmirrored_high`): from then on the partner's copy holds
//! every acknowledged write again, and new writes wait for its ACK.

use async_trait::async_trait;
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::{oneshot, watch};
use twinblock_journal::{MirrorHook, MirrorOutcome, UnretiredRecords};
use twinblock_pair::wire::FrameWriter;

use super::hops::{self, Hop};
use super::outbox::Outbox;
use super::send_batch::SendBatch;
use super::seq_queue::SeqQueue;

/// Where the sender reads the own log for a resync (the journaled volume).
pub trait LogSource: Send + Sync {
    fn unretired(&self) -> UnretiredRecords;
}

/// What a waiting writer watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AckView {
    acked: u64,
    in_sync: bool,
}

/// Facts about the volume known once it is open.
#[derive(Debug, Clone, Copy)]
pub struct VolumeMeta {
    pub store_id: [u8; 16],
    pub log_bytes: u64,
}

#[derive(Debug)]
struct Inner {
    generation: u64,
    /// The link is up: `ship` queues records for the sender.
    queueing: bool,
    /// Records queued for the sender, by seq (log offset, record bytes): a ring, as writers
    /// queue nearly in seq order and the sender takes from the front (no allocation per record,
    /// where a `BTreeMap` allocated a node whenever the queue went from empty to one record, as
    /// at queue depth 1).
    pending: SeqQueue<(u64, Bytes)>,
    pending_bytes: u64,
    /// The next seq the sender puts on the wire.
    next_send: u64,
    in_sync: bool,
    out_of_sync_reason: Option<String>,
    out_of_sync_since: Option<SystemTime>,
    /// In sync again once acked reaches this (the last seq of the resync snapshot).
    resync_target: Option<u64>,
    /// Highest seq acknowledged to a client without the partner holding it.
    unmirrored_high: u64,
    acked: u64,
    last_ack_at: Option<Instant>,
    /// Highest seq handed to `ship`, and the bytes handed since the last ACK caught up.
    last_shipped: u64,
    shipped_bytes: SeqQueue<u64>,
    records_sent: u64,
    resyncs: u64,
    /// Writers waiting for the ACK of a seq, by seq, with when each started waiting: an ACK
    /// completes exactly the ones it covers (a watch channel would wake every waiting writer at
    /// every ACK). Dropping a sender (out of sync, reconnection) tells its writer the record was
    /// not mirrored.
    waiters: SeqQueue<Waiter>,
}

/// A writer waiting for the partner's ACK of its record.
#[derive(Debug)]
struct Waiter {
    done: oneshot::Sender<()>,
    since: Instant,
}

impl Inner {
    /// Takes the queued record that goes on the wire next (seq `next_send`), if it is queued.
    fn take_next(&mut self) -> Option<(u64, u64, Bytes)> {
        let seq = self.next_send;
        // Seqs below `next_send` (a duplicate, or covered by a resync snapshot) never go.
        while self.pending.front_seq().is_some_and(|s| s < seq) {
            if let Some((_, (_, stale))) = self.pending.pop_front() {
                self.pending_bytes -= stale.len() as u64;
            }
        }
        if self.pending.front_seq() != Some(seq) {
            return None;
        }
        let (_, (off, bytes)) = self.pending.pop_front()?;
        self.pending_bytes -= bytes.len() as u64;
        self.next_send += 1;
        self.records_sent += 1;
        Some((seq, off, bytes))
    }
}

/// The mirror of one journaled volume (one per volume; the journal holds it as its hook).
pub struct VolumeMirror {
    pub name: String,
    pub volume_id: u64,
    timeout: Duration,
    inner: Mutex<Inner>,
    acks: watch::Sender<AckView>,
    /// The outgoing connection's sending state: writers send their own records through it when
    /// the link is idle, and wake its send loop otherwise.
    outbox: Arc<Outbox>,
    /// Asks the interconnect to drop the connection (partner silent): a counter the connection
    /// watches, so a request never outlives the connection it was meant for.
    kill_link: Arc<watch::Sender<u64>>,
    source: OnceLock<Weak<dyn LogSource>>,
    meta: OnceLock<VolumeMeta>,
    /// This mirror, for the deadline task started by the first waiting writer.
    me: Weak<VolumeMirror>,
    deadline_task_started: AtomicBool,
}

impl std::fmt::Debug for VolumeMirror {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VolumeMirror")
            .field("name", &self.name)
            .field("volume_id", &self.volume_id)
            .finish()
    }
}

/// Why a mirror starts out of sync.
const NOT_CONNECTED_YET: &str = "not yet connected to the partner";
/// Queue limit as a multiple of the log size (the resync reads the log anyway).
const PENDING_MAX_LOG_MULTIPLE: u64 = 2;

impl VolumeMirror {
    pub fn new(
        name: String,
        volume_id: u64,
        timeout: Duration,
        outbox: Arc<Outbox>,
        kill_link: Arc<watch::Sender<u64>>,
    ) -> Arc<VolumeMirror> {
        let (acks, _) = watch::channel(AckView {
            acked: 0,
            in_sync: false,
        });
        Arc::new_cyclic(|me| VolumeMirror {
            name,
            volume_id,
            timeout,
            inner: Mutex::new(Inner {
                generation: 0,
                queueing: false,
                pending: SeqQueue::new(),
                pending_bytes: 0,
                next_send: 1,
                in_sync: false,
                out_of_sync_reason: Some(NOT_CONNECTED_YET.into()),
                out_of_sync_since: Some(SystemTime::now()),
                resync_target: None,
                unmirrored_high: 0,
                acked: 0,
                last_ack_at: None,
                last_shipped: 0,
                shipped_bytes: SeqQueue::new(),
                records_sent: 0,
                resyncs: 0,
                waiters: SeqQueue::new(),
            }),
            acks,
            outbox,
            kill_link,
            source: OnceLock::new(),
            meta: OnceLock::new(),
            me: me.clone(),
            deadline_task_started: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every critical section leaves the state consistent; ignore poisoning.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Connects the mirror to its opened volume (for resync snapshots and the handshake).
    pub fn attach(&self, source: Weak<dyn LogSource>, meta: VolumeMeta) {
        let _ = self.source.set(source);
        let _ = self.meta.set(meta);
    }

    /// Most bytes queued for the sender before the link is declared stuck.
    fn pending_max_bytes(&self) -> u64 {
        self.meta.get().map_or(u64::MAX, |m| {
            m.log_bytes.saturating_mul(PENDING_MAX_LOG_MULTIPLE)
        })
    }

    pub fn meta(&self) -> Option<VolumeMeta> {
        self.meta.get().copied()
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    fn publish(&self, inner: &mut Inner) {
        if !inner.in_sync {
            // Their records are not mirrored: the writers see their senders dropped.
            inner.waiters.clear();
        } else {
            let acked = inner.acked;
            inner.waiters.pop_through(acked, |_, w| {
                let _ = w.done.send(());
            });
        }
        self.acks.send_replace(AckView {
            acked: inner.acked,
            in_sync: inner.in_sync,
        });
    }

    /// Marks the mirror out of sync (first reason wins until it is in sync again).
    pub fn declare_out_of_sync(&self, reason: &str) {
        let mut inner = self.lock();
        inner.resync_target = None;
        if inner.in_sync {
            inner.in_sync = false;
            inner.out_of_sync_reason = Some(reason.to_string());
            inner.out_of_sync_since = Some(SystemTime::now());
            tracing::warn!(volume = %self.name, reason, "mirror out of sync; writes continue on local NVRAM alone");
        }
        self.publish(&mut inner);
    }

    pub fn in_sync(&self) -> bool {
        self.lock().in_sync
    }

    /// The link went down: stop queueing and drop what was queued (a resync resends it).
    pub fn link_down(&self) {
        let mut inner = self.lock();
        inner.queueing = false;
        inner.pending.clear();
        inner.pending_bytes = 0;
        inner.resync_target = None;
    }

    /// First resync step, before the snapshot: queue from now on, so every record appended
    /// after the snapshot reaches the sender.
    ///
    /// The partner's copy is rebuilt from here on, so the mirror is out of sync until the resync
    /// is acknowledged, and ACKs count afresh (an ACK of the previous stream says nothing about
    /// the rebuilt copy).
    pub fn start_queueing(&self) {
        let mut inner = self.lock();
        inner.queueing = true;
        inner.pending.clear();
        inner.pending_bytes = 0;
        inner.resyncs += 1;
        inner.acked = 0;
        inner.shipped_bytes.clear();
        if inner.in_sync {
            inner.in_sync = false;
            inner.out_of_sync_reason =
                Some("interconnect reconnected: resynchronising the partner's copy".into());
            inner.out_of_sync_since = Some(SystemTime::now());
        }
        self.publish(&mut inner);
    }

    /// Takes the resync snapshot and sets the stream to continue right after it. `None` when
    /// the volume is gone.
    pub fn snapshot(&self) -> Option<UnretiredRecords> {
        let source = self.source.get()?.upgrade()?;
        let snap = source.unretired();
        let mut inner = self.lock();
        inner.generation = snap.generation;
        inner.next_send = snap.next_seq;
        inner
            .pending
            .pop_through(snap.next_seq.saturating_sub(1), |_, _| {});
        inner.pending_bytes = inner.pending.values().map(|(_, b)| b.len() as u64).sum();
        inner.resync_target = Some(snap.next_seq - 1);
        Some(snap)
    }

    /// Seals the queued records next in seq order (up to about `max_bytes`) as RECORD frames
    /// into `batch`; returns how many.
    pub fn seal_queued(
        &self,
        seal: &mut impl FrameWriter,
        max_bytes: usize,
        batch: &mut SendBatch,
    ) -> u64 {
        let mut inner = self.lock();
        let mut records = 0;
        let mut taken = 0;
        while taken < max_bytes {
            let Some((seq, off, bytes)) = inner.take_next() else {
                break;
            };
            taken += bytes.len();
            batch.record(seal, self.volume_id, off, seq, &bytes);
            records += 1;
        }
        records
    }

    /// Takes queued records in seq order, from `next_send`, up to about `max_bytes`.
    pub fn take_batch(&self, max_bytes: usize, out: &mut Vec<(u64, u64, Bytes)>) -> usize {
        let mut inner = self.lock();
        let mut taken = 0;
        while taken < max_bytes {
            let Some((seq, off, bytes)) = inner.take_next() else {
                break;
            };
            taken += bytes.len();
            out.push((seq, off, bytes));
        }
        taken
    }

    /// The partner acknowledged every record up to `seq`.
    pub fn on_ack(&self, seq: u64) {
        let mut inner = self.lock();
        if seq > inner.acked {
            inner.acked = seq;
            inner.shipped_bytes.pop_through(seq, |_, _| {});
        }
        inner.last_ack_at = Some(Instant::now());
        let caught_up = inner.resync_target.is_some_and(|t| inner.acked >= t)
            && inner.acked >= inner.unmirrored_high;
        if !inner.in_sync && caught_up {
            inner.in_sync = true;
            inner.resync_target = None;
            inner.out_of_sync_reason = None;
            inner.out_of_sync_since = None;
            tracing::info!(volume = %self.name, acked = inner.acked, "mirror in sync: the partner holds every unretired record");
        }
        self.publish(&mut inner);
    }

    /// The mirror's `ship`, without the hop stamps (see [`super::hops`]).
    async fn ship_record(&self, log_offset: u64, seq: u64, record: Bytes) -> MirrorOutcome {
        let (send, acked) = {
            let mut inner = self.lock();
            inner.last_shipped = inner.last_shipped.max(seq);
            inner.shipped_bytes.insert(seq, record.len() as u64);
            let mut send = None;
            if inner.queueing && seq >= inner.next_send {
                inner.pending_bytes += record.len() as u64;
                inner.pending.insert(seq, (log_offset, record));
                // An idle link (every record sent is acknowledged): this writer sends, saving
                // the wake-up of the send loop. Otherwise records are in flight, and the send
                // loop collects every record queued meanwhile into one send.
                send = Some(inner.next_send.saturating_sub(1) <= inner.acked);
                if inner.pending_bytes > self.pending_max_bytes() {
                    drop(inner);
                    self.declare_out_of_sync("the partner falls behind: send queue over its limit");
                    self.kill_link.send_modify(|k| *k += 1);
                    inner = self.lock();
                }
            }
            let acked = if !inner.in_sync {
                inner.unmirrored_high = inner.unmirrored_high.max(seq);
                None
            } else if inner.acked >= seq {
                Some(None)
            } else {
                let (tx, rx) = oneshot::channel();
                let since = Instant::now();
                inner.waiters.insert(seq, Waiter { done: tx, since });
                Some(Some(rx))
            };
            (send, acked)
        };
        if matches!(acked, Some(Some(_))) {
            self.start_deadline_task();
        }
        // Registered as a waiter first: the ACK may come before the send returns.
        match send {
            Some(true) => self.outbox.send_direct(self),
            Some(false) => self.outbox.wake().notify_one(),
            None => {}
        }
        let rx = match acked {
            None => return MirrorOutcome::NotMirrored,
            Some(None) => return MirrorOutcome::Mirrored,
            Some(Some(rx)) => rx,
        };
        // Bounded by the deadline task: it declares the mirror out of sync (dropping every
        // waiter's sender) once the oldest waiter waited `timeout`.
        let outcome = match rx.await {
            Ok(()) => MirrorOutcome::Mirrored,
            Err(_) => MirrorOutcome::NotMirrored,
        };
        if outcome == MirrorOutcome::NotMirrored {
            let mut inner = self.lock();
            inner.unmirrored_high = inner.unmirrored_high.max(seq);
        }
        outcome
    }

    /// Starts [`watch_deadlines`] for this mirror, once (at the first writer that waits).
    fn start_deadline_task(&self) {
        if self.deadline_task_started.load(Ordering::Relaxed)
            || self.deadline_task_started.swap(true, Ordering::AcqRel)
        {
            return;
        }
        tokio::spawn(watch_deadlines(self.me.clone()));
    }

    /// The deadline task's look at `now`: when the oldest waiter waited `timeout`, declares the
    /// mirror out of sync (every waiter then returns not mirrored) and asks for the connection
    /// to be dropped. Returns when to look next: the oldest remaining waiter's deadline, or one
    /// timeout from `now` when none waits (a waiter arriving later has a later deadline).
    fn check_deadlines(&self, now: Instant) -> Instant {
        let expired = {
            let inner = self.lock();
            let oldest = inner
                .waiters
                .iter()
                .min_by_key(|(_, w)| w.since)
                .map(|(seq, w)| (seq, w.since));
            match oldest {
                None => return now + self.timeout,
                Some((_, since)) if now < since + self.timeout => return since + self.timeout,
                Some((seq, _)) => seq,
            }
        };
        self.declare_out_of_sync(&format!(
            "the partner did not acknowledge seq {expired} within {} ms",
            self.timeout.as_millis()
        ));
        self.kill_link.send_modify(|k| *k += 1);
        now + self.timeout
    }

    /// Status for `twinctl status` and the HA controller.
    pub fn status_json(&self) -> serde_json::Value {
        let inner = self.lock();
        let lag_records = inner.last_shipped.saturating_sub(inner.acked);
        let lag_bytes: u64 = inner.shipped_bytes.values().sum();
        serde_json::json!({
            "volume": self.name,
            "volume_id": self.volume_id,
            "in_sync": inner.in_sync,
            "out_of_sync_reason": inner.out_of_sync_reason,
            "out_of_sync_since_unix_ms": inner.out_of_sync_since
                .and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                .map(|d| d.as_millis() as u64),
            "generation": inner.generation,
            "last_shipped_seq": inner.last_shipped,
            "acked_seq": inner.acked,
            "lag_records": lag_records,
            "lag_bytes": lag_bytes,
            "last_ack_age_ms": inner.last_ack_at.map(|t| t.elapsed().as_millis() as u64),
            "queued_records": inner.pending.len(),
            "writers_waiting_for_ack": inner.waiters.len(),
            "records_sent": inner.records_sent,
            "resyncs": inner.resyncs,
        })
    }
}

/// Keeps the bounded wait of `mirror`'s writers (see the module docs); ends once the mirror is
/// dropped.
async fn watch_deadlines(mirror: Weak<VolumeMirror>) {
    loop {
        let next = match mirror.upgrade() {
            Some(m) => m.check_deadlines(Instant::now()),
            None => return,
        };
        tokio::time::sleep_until(next.into()).await;
    }
}

#[async_trait]
impl MirrorHook for VolumeMirror {
    fn enabled(&self) -> bool {
        true
    }

    async fn ship(&self, log_offset: u64, seq: u64, record: Bytes) -> MirrorOutcome {
        hops::mark(Hop::Ship, seq);
        let outcome = self.ship_record(log_offset, seq, record).await;
        hops::mark(Hop::ShipDone, seq);
        outcome
    }

    fn log_reset(&self, generation: u64, _tail_offset: u64, tail_seq: u64) {
        let mut inner = self.lock();
        inner.generation = generation;
        inner.next_send = tail_seq;
    }

    /// While in sync, the partner's cumulative ACK: it has stored every record of this log from
    /// the resync snapshot's tail through `acked` in its NVRAM (older records were retired by a
    /// CP, which flushed them to the store). The partner is another `twinblockd`; its copy
    /// survives the loss of *this* node's power when it runs on another host, whatever its
    /// persistence mode (see docs/OPERATIONS.md, "What a FLUSH means"). `None` out of sync.
    ///
    /// `acked` and `in_sync` are read from one published [`AckView`], so a reconnection (which
    /// zeroes `acked` and clears `in_sync` together) is never seen half done.
    fn partner_durable_seq(&self) -> Option<u64> {
        let v = *self.acks.borrow();
        v.in_sync.then_some(v.acked)
    }

    /// Waits for the partner's ACK of `seq` while the mirror stays in sync, at most the mirror's
    /// timeout. A timeout here only returns false (the FLUSH falls back to a CP); declaring the
    /// mirror out of sync is left to the write that shipped the record, which waits too.
    async fn wait_partner_durable(&self, seq: u64) -> bool {
        let mut rx = self.acks.subscribe();
        if !rx.borrow().in_sync {
            return false;
        }
        let waited =
            tokio::time::timeout(self.timeout, rx.wait_for(|v| v.acked >= seq || !v.in_sync)).await;
        matches!(waited, Ok(Ok(v)) if v.in_sync && v.acked >= seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mirror(timeout_ms: u64) -> Arc<VolumeMirror> {
        VolumeMirror::new(
            "v".into(),
            1,
            Duration::from_millis(timeout_ms),
            Arc::new(Outbox::new()),
            Arc::new(watch::channel(0).0),
        )
    }

    fn rec(n: u8) -> Bytes {
        Bytes::from(vec![n; 64])
    }

    /// Puts the mirror in sync as a finished resync of an empty log would.
    fn in_sync(m: &VolumeMirror, next_seq: u64) {
        m.start_queueing();
        {
            let mut i = m.lock();
            i.next_send = next_seq;
            i.resync_target = Some(next_seq - 1);
        }
        m.on_ack(next_seq - 1);
        assert!(m.in_sync());
    }

    #[tokio::test]
    async fn out_of_sync_mirror_does_not_wait() {
        let m = mirror(10_000);
        let t = Instant::now();
        assert_eq!(m.ship(0, 1, rec(1)).await, MirrorOutcome::NotMirrored);
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[tokio::test]
    async fn write_waits_for_the_ack_of_its_seq() {
        let m = mirror(10_000);
        in_sync(&m, 1);
        let m2 = m.clone();
        let w = tokio::spawn(async move { m2.ship(0, 1, rec(1)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!w.is_finished(), "returned before the partner acknowledged");
        m.on_ack(1);
        assert_eq!(w.await.unwrap(), MirrorOutcome::Mirrored);
    }

    #[tokio::test]
    async fn ack_completes_only_the_writers_it_covers() {
        let m = mirror(10_000);
        in_sync(&m, 1);
        let (m1, m2) = (m.clone(), m.clone());
        let w1 = tokio::spawn(async move { m1.ship(0, 1, rec(1)).await });
        let w2 = tokio::spawn(async move { m2.ship(64, 2, rec(2)).await });
        tokio::time::sleep(Duration::from_millis(30)).await;
        m.on_ack(1);
        assert_eq!(w1.await.unwrap(), MirrorOutcome::Mirrored);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!w2.is_finished(), "seq 2 returned on the ACK of seq 1");
        assert_eq!(m.lock().waiters.len(), 1, "seq 1's waiter was not removed");
        m.declare_out_of_sync("test: link cut");
        assert_eq!(w2.await.unwrap(), MirrorOutcome::NotMirrored);
        assert!(m.lock().waiters.is_empty());
    }

    #[tokio::test]
    async fn silent_partner_times_out_into_out_of_sync() {
        let m = mirror(50);
        in_sync(&m, 1);
        let t = Instant::now();
        assert_eq!(m.ship(0, 1, rec(1)).await, MirrorOutcome::NotMirrored);
        assert!(t.elapsed() >= Duration::from_millis(50));
        assert!(!m.in_sync());
        assert!(m.status_json()["out_of_sync_reason"]
            .as_str()
            .unwrap()
            .contains("did not acknowledge seq 1"));
    }

    #[tokio::test]
    async fn waiter_arriving_while_the_deadline_task_idles_waits_one_timeout() {
        // The deadline task starts with seq 1, finds no waiter at ~300 ms and sleeps one
        // timeout; seq 2 arrives in between and must still be released after its own timeout,
        // not at the task's next idle look.
        let m = mirror(300);
        in_sync(&m, 1);
        let m1 = m.clone();
        let w1 = tokio::spawn(async move { m1.ship(0, 1, rec(1)).await });
        tokio::time::sleep(Duration::from_millis(10)).await;
        m.on_ack(1);
        assert_eq!(w1.await.unwrap(), MirrorOutcome::Mirrored);
        tokio::time::sleep(Duration::from_millis(340)).await;
        let t = Instant::now();
        assert_eq!(m.ship(64, 2, rec(2)).await, MirrorOutcome::NotMirrored);
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(300),
            "released early: {waited:?}"
        );
        assert!(
            waited < Duration::from_millis(420),
            "seq 2 waited {waited:?}: past its bound of 300 ms"
        );
        assert!(m.status_json()["out_of_sync_reason"]
            .as_str()
            .unwrap()
            .contains("did not acknowledge seq 2"));
    }

    #[tokio::test]
    async fn oldest_waiter_deadline_releases_every_waiter() {
        // Seq 1's deadline is at 1 s, seq 2's own at 1.5 s: releasing both at the first tells
        // the two apart with 400 ms to spare for a loaded test machine (a 200 ms timeout with
        // a 290 ms bound once failed under load at 356 ms).
        let m = mirror(1000);
        in_sync(&m, 1);
        let m1 = m.clone();
        let t = Instant::now();
        let w1 = tokio::spawn(async move { m1.ship(0, 1, rec(1)).await });
        tokio::time::sleep(Duration::from_millis(500)).await;
        let m2 = m.clone();
        let w2 = tokio::spawn(async move { m2.ship(64, 2, rec(2)).await });
        assert_eq!(w1.await.unwrap(), MirrorOutcome::NotMirrored);
        assert_eq!(w2.await.unwrap(), MirrorOutcome::NotMirrored);
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(1000));
        assert!(
            waited < Duration::from_millis(1400),
            "seq 2 was held to its own deadline ({waited:?}) after the mirror left sync"
        );
        assert!(!m.in_sync());
        assert!(m.status_json()["out_of_sync_reason"]
            .as_str()
            .unwrap()
            .contains("did not acknowledge seq 1"));
        assert_eq!(m.lock().waiters.len(), 0);
    }

    #[tokio::test]
    async fn records_leave_the_queue_in_seq_order_only() {
        let m = mirror(10);
        m.start_queueing();
        m.lock().next_send = 5;
        let _ = m.ship(128, 6, rec(6)).await;
        let mut out = Vec::new();
        assert_eq!(
            m.take_batch(1 << 20, &mut out),
            0,
            "seq 5 is missing: nothing goes"
        );
        let _ = m.ship(64, 5, rec(5)).await;
        let _ = m.ship(0, 4, rec(4)).await; // below next_send: already covered
        m.take_batch(1 << 20, &mut out);
        assert_eq!(out.iter().map(|r| r.0).collect::<Vec<_>>(), vec![5, 6]);
    }

    #[tokio::test]
    async fn records_passed_by_a_log_reset_leave_the_queue_without_stalling_it() {
        let m = mirror(10);
        m.start_queueing();
        m.lock().next_send = 5;
        let _ = m.ship(0, 5, rec(5)).await;
        let _ = m.ship(64, 6, rec(6)).await;
        // The journal restarted its stream at seq 7: 5 and 6 never go, and must not block 7.
        m.log_reset(2, 0, 7);
        let _ = m.ship(128, 7, rec(7)).await;
        let mut out = Vec::new();
        m.take_batch(1 << 20, &mut out);
        assert_eq!(out.iter().map(|r| r.0).collect::<Vec<_>>(), vec![7]);
        assert_eq!(m.status_json()["queued_records"], 0);
        assert_eq!(m.lock().pending_bytes, 0);
    }

    #[tokio::test]
    async fn back_in_sync_only_after_unmirrored_writes_are_acked() {
        let m = mirror(10);
        m.start_queueing();
        {
            let mut i = m.lock();
            i.next_send = 11;
            i.resync_target = Some(10);
        }
        // A write acknowledged alone during the resync.
        assert_eq!(m.ship(0, 11, rec(1)).await, MirrorOutcome::NotMirrored);
        m.on_ack(10);
        assert!(!m.in_sync(), "seq 11 was acknowledged without the partner");
        m.on_ack(11);
        assert!(m.in_sync());
    }

    #[tokio::test]
    async fn reconnect_forgets_old_acks_until_the_resync_is_acked() {
        let m = mirror(10);
        in_sync(&m, 1);
        m.on_ack(100);
        // A new connection: the copy is rebuilt; the old ACK of seq 100 must not count.
        m.start_queueing();
        assert!(!m.in_sync());
        {
            let mut i = m.lock();
            i.resync_target = Some(100);
        }
        m.on_ack(0); // the LOG_RESET's ACK
        assert!(
            !m.in_sync(),
            "in sync before the partner stored the snapshot"
        );
        m.on_ack(100);
        assert!(m.in_sync());
    }

    mod flush {
        use super::*;
        use twinblock_journal::{JournaledVolume, MemBacking, Nvram, NvramConfig, VolumeConfig};

        /// A journaled volume on tmpfs-mode NVRAM (`none`: records survive a daemon crash only)
        /// with `m` as its mirror, and no timer or fill CPs: any CP is one a FLUSH asked for.
        async fn volume(
            dir: &std::path::Path,
            m: &Arc<VolumeMirror>,
        ) -> JournaledVolume<MemBacking> {
            let nv = Nvram::open(&NvramConfig {
                path: dir.join("nvram.img"),
                log_bytes_per_region: 1 << 20,
                ..NvramConfig::new(0, [5; 16])
            })
            .unwrap();
            let cfg = VolumeConfig {
                cp_interval_ms: 3_600_000,
                cp_fill_percent: 100,
                max_record_payload_bytes: 64 * 1024,
                ..VolumeConfig::default()
            };
            let hook: Arc<dyn MirrorHook> = m.clone();
            JournaledVolume::open_with_mirror(nv, MemBacking::new(1 << 20, 65536), 1, cfg, hook)
                .await
                .unwrap()
        }

        /// A mirror whose sender `wake` the test holds, and a stand-in partner that stores
        /// nothing but acknowledges every record the sender takes, in seq order.
        fn mirror_with_partner() -> (Arc<VolumeMirror>, tokio::task::JoinHandle<()>) {
            let outbox = Arc::new(Outbox::new());
            let m = VolumeMirror::new(
                "v".into(),
                1,
                Duration::from_secs(10),
                outbox.clone(),
                Arc::new(watch::channel(0).0),
            );
            let m2 = m.clone();
            let partner = tokio::spawn(async move {
                loop {
                    let _ =
                        tokio::time::timeout(Duration::from_millis(5), outbox.wake().notified())
                            .await;
                    let mut out = Vec::new();
                    m2.take_batch(1 << 20, &mut out);
                    if let Some((seq, _, _)) = out.last() {
                        m2.on_ack(*seq);
                    }
                }
            });
            (m, partner)
        }

        fn block(n: u8) -> Bytes {
            Bytes::from(vec![n; 4096])
        }

        #[tokio::test]
        async fn flush_on_tmpfs_with_in_sync_partner_runs_no_cp() {
            let dir = tempfile::tempdir().unwrap();
            let (m, partner) = mirror_with_partner();
            let vol = volume(dir.path(), &m).await;
            assert!(!vol.ack_survives_power_loss());
            in_sync(&m, vol.status().next_seq);
            vol.write(0, block(1)).await.unwrap();
            vol.write(8192, block(2)).await.unwrap();
            vol.flush().await.unwrap();
            vol.write_fua(4096, block(3)).await.unwrap();
            let st = vol.status();
            assert_eq!(st.cps_done, 0, "a FLUSH covered by the partner ran a CP");
            assert_eq!(st.flushes_by_cp, 0);
            assert_eq!(st.flushes_by_partner, 2);
            partner.abort();
        }

        #[tokio::test]
        async fn flush_on_tmpfs_with_out_of_sync_mirror_waits_for_a_cp() {
            let dir = tempfile::tempdir().unwrap();
            let (m, partner) = mirror_with_partner();
            let vol = volume(dir.path(), &m).await;
            in_sync(&m, vol.status().next_seq);
            m.declare_out_of_sync("test: link cut");
            vol.write(0, block(1)).await.unwrap();
            assert_eq!(m.partner_durable_seq(), None);
            vol.flush().await.unwrap();
            let st = vol.status();
            assert_eq!(st.cps_done, 1, "the FLUSH must be made durable by a CP");
            assert_eq!(st.flushes_by_cp, 1);
            assert_eq!(st.flushes_by_partner, 0);
            assert!(st.applied_seq >= 1);
            partner.abort();
        }

        #[tokio::test]
        async fn flush_waits_for_the_in_flight_ack_not_a_cp() {
            // A partner that acknowledges late: the FLUSH waits for its ACK and runs no CP.
            let dir = tempfile::tempdir().unwrap();
            let m = mirror(10_000);
            let vol = Arc::new(volume(dir.path(), &m).await);
            in_sync(&m, vol.status().next_seq);
            let v2 = vol.clone();
            let writer = tokio::spawn(async move { v2.write(0, block(9)).await });
            tokio::time::sleep(Duration::from_millis(20)).await;
            let v3 = vol.clone();
            let flush = tokio::spawn(async move { v3.flush().await });
            tokio::time::sleep(Duration::from_millis(30)).await;
            assert!(
                !flush.is_finished(),
                "FLUSH returned before the partner's ACK"
            );
            let last = m.status_json()["last_shipped_seq"].as_u64().unwrap();
            m.on_ack(last);
            writer.await.unwrap().unwrap();
            flush.await.unwrap().unwrap();
            assert_eq!(vol.status().cps_done, 0);
            assert_eq!(vol.status().flushes_by_partner, 1);
        }
    }

    #[tokio::test]
    async fn duplicate_and_stale_acks_change_nothing() {
        let m = mirror(10);
        in_sync(&m, 1);
        m.on_ack(5);
        m.on_ack(3);
        m.on_ack(5);
        assert_eq!(m.status_json()["acked_seq"], 5);
    }
}
