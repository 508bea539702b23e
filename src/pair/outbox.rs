//! Who puts the next bytes on the outgoing connection: the writer itself when the link is idle,
//! the send loop when it is busy.
//!
//! # Why writers send their own records
//!
//! A mirrored write at queue depth 1 used to cross three tasks: the writer queued its record and
//! woke the interconnect's send loop, the send loop sent it, and the ACK reader woke the writer.
//! Each hop is a wake-up of another task (often on the other worker thread: a futex wake and a
//! context switch), and on an idle link they cost more than the loopback round trip itself. So
//! the outgoing connection's sending state (the frame sealer, the socket and a partly sent batch:
//! a [`Wire`]) lives here, and whoever holds it may send:
//!
//! - a writer whose volume has no record in flight (every record sent is acknowledged: the
//!   link is idle, as at queue depth 1) takes the wire if it is free, seals the contiguous run
//!   of queued records of its volume (its own among them) and writes them with one non-blocking
//!   `sendmsg` from its own thread ([`Transport::try_send_now`]), then puts the wire back. No
//!   other task runs for the send.
//! - under load (records in flight) a writer only queues its record and wakes the send loop,
//!   which sends every record queued meanwhile in one vectored io_uring send, so records go
//!   several per send (fewer sends, reads and ACKs on both nodes). The same happens when an idle
//!   writer finds the wire taken: it marks the miss, and whoever puts the wire back wakes the
//!   send loop. Only the send loop ever waits for the socket.
//!
//! A direct send the socket does not take whole (its buffer is full) leaves the rest as the
//! wire's `carry`, which the send loop sends before anything else; a direct send that fails
//! leaves its error for the send loop, which ends the connection with it. Frames are sealed and
//! written by the wire's holder only, so they reach the socket in the order they were sealed.
//!
//! # Connections
//!
//! A wire is installed per connection and carries the connection's epoch; a wire put back after
//! its connection ended (uninstalled) is dropped instead of reinstalled, so a writer never sends
//! on a newer connection with an older connection's sealer.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;
use twinblock_pair::wire::FrameSealer;

use super::hops::{self, Hop};
use super::mirror::VolumeMirror;
use super::send_batch::{Cursor, SendBatch, Transport};

/// Most bytes a writer's direct send takes from its volume's queue (the send loop batches up to
/// its own limit).
pub const DIRECT_SEND_MAX_BYTES: usize = 256 * 1024;

/// The sending state of one outgoing connection.
pub struct Wire {
    pub seal: FrameSealer,
    pub tx: Transport,
    /// Bytes of a direct send the socket did not take yet: sent first by the send loop.
    pub carry: Option<(SendBatch, Cursor)>,
    /// A direct send failed: the send loop ends the connection with this error.
    pub error: Option<io::Error>,
    /// A batch to reuse for the next send.
    pub spare: SendBatch,
}

impl Wire {
    pub fn new(seal: FrameSealer, tx: Transport) -> Wire {
        Wire {
            seal,
            tx,
            carry: None,
            error: None,
            spare: SendBatch::new(),
        }
    }
}

#[derive(Default)]
struct State {
    /// The installed connection's epoch (0: none yet).
    epoch: u64,
    installed: bool,
    /// The wire when nobody holds it.
    wire: Option<Wire>,
    /// Someone found the wire taken: its holder wakes the send loop when it puts the wire back.
    missed: bool,
}

/// Counters for `twinctl status` (`interconnect.outbound`).
#[derive(Debug, Default)]
pub struct OutboxStats {
    pub direct_sends: AtomicU64,
    pub direct_records: AtomicU64,
    pub direct_partial: AtomicU64,
}

/// The node's outgoing sending state, shared by its mirrors and the send loop.
#[derive(Default)]
pub struct Outbox {
    state: Mutex<State>,
    /// Wakes the send loop.
    wake: Notify,
    pub stats: OutboxStats,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox").finish_non_exhaustive()
    }
}

impl Outbox {
    pub fn new() -> Outbox {
        Outbox::default()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Every critical section leaves the state consistent; ignore poisoning.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The send loop's wake-up.
    pub fn wake(&self) -> &Notify {
        &self.wake
    }

    /// Installs a new connection's wire; returns its epoch.
    pub fn install(&self, wire: Wire) -> u64 {
        let (old, epoch) = {
            let mut s = self.lock();
            s.epoch += 1;
            s.installed = true;
            s.missed = false;
            (s.wire.replace(wire), s.epoch)
        };
        drop(old);
        // Records may have been queued while no wire was installed.
        self.wake.notify_one();
        epoch
    }

    /// The connection of `epoch` ended: its wire (if not held) is dropped, and a held one is
    /// dropped when it comes back.
    pub fn uninstall(&self, epoch: u64) {
        let old = {
            let mut s = self.lock();
            if s.epoch != epoch {
                return;
            }
            s.epoch += 1;
            s.installed = false;
            s.wire.take()
        };
        drop(old);
    }

    /// Takes the wire with its epoch; `None` while another holds it (the miss is noted) or no
    /// connection is up.
    pub fn take(&self) -> Option<(Wire, u64)> {
        let mut s = self.lock();
        match s.wire.take() {
            Some(w) => Some((w, s.epoch)),
            None => {
                if s.installed {
                    s.missed = true;
                } else {
                    // No connection: the send loop (when one starts) drains the queue.
                    self.wake.notify_one();
                }
                None
            }
        }
    }

    /// Puts the wire back (drops it when its connection ended meanwhile) and wakes the send loop
    /// when it has something to do: records queued by writers that missed the wire, a carry, or
    /// an error.
    pub fn put_back(&self, wire: Wire, epoch: u64) {
        let work = wire.carry.is_some() || wire.error.is_some();
        let mut s = self.lock();
        if s.epoch != epoch || !s.installed {
            drop(s);
            drop(wire);
            return;
        }
        s.wire = Some(wire);
        if std::mem::take(&mut s.missed) || work {
            self.wake.notify_one();
        }
    }

    /// A writer's direct send: when the wire is free, sends `mirror`'s queued records that are
    /// next in seq order (its own among them, unless an older record is still missing) with one
    /// non-blocking send. Never waits.
    pub fn send_direct(&self, mirror: &VolumeMirror) {
        let Some((mut wire, epoch)) = self.take() else {
            return;
        };
        if wire.carry.is_none() && wire.error.is_none() {
            let mut batch = std::mem::take(&mut wire.spare);
            batch.clear();
            let records = mirror.seal_queued(&mut wire.seal, DIRECT_SEND_MAX_BYTES, &mut batch);
            if records > 0 {
                let mut at = Cursor::default();
                hops::mark(Hop::SendStart, batch.last_seq());
                let sent = wire.tx.try_send_now(&batch, &mut at);
                hops::mark(Hop::SendDone, batch.last_seq());
                match sent {
                    Ok(()) if batch.done(at) => {}
                    Ok(()) => {
                        self.stats.direct_partial.fetch_add(1, Ordering::Relaxed);
                        wire.carry = Some((batch, at));
                        batch = SendBatch::new();
                    }
                    Err(e) => wire.error = Some(e),
                }
                self.stats.direct_sends.fetch_add(1, Ordering::Relaxed);
                self.stats
                    .direct_records
                    .fetch_add(records, Ordering::Relaxed);
            }
            wire.spare = batch;
        }
        self.put_back(wire, epoch);
    }

    pub fn stats_json(&self) -> serde_json::Value {
        let s = &self.stats;
        serde_json::json!({
            "direct_sends": s.direct_sends.load(Ordering::Relaxed),
            "direct_records": s.direct_records.load(Ordering::Relaxed),
            "direct_partial_sends": s.direct_partial.load(Ordering::Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::sync::Arc;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;
    use tokio::sync::watch;
    use twinblock_journal::{MirrorHook, MirrorOutcome};
    use twinblock_pair::wire::{Message, SessionKeys};

    /// An outbox with a wire on a loopback socket (tokio transport), the mirror of volume 1
    /// queueing from seq 1, and the peer's stream with the matching frame opener.
    async fn setup() -> (
        Arc<Outbox>,
        Arc<VolumeMirror>,
        tokio::net::TcpStream,
        twinblock_pair::wire::FrameOpener,
        tokio::net::tcp::OwnedReadHalf,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(a, l.accept());
        let (rd, wr) = a.unwrap().into_split();
        let (seal, _) = SessionKeys::derive(b"k", b"h", b"c", b"a").dialer();
        let (_, open) = SessionKeys::derive(b"k", b"h", b"c", b"a").acceptor();
        let outbox = Arc::new(Outbox::new());
        outbox.install(Wire::new(seal, Transport::Tokio(wr)));
        let m = VolumeMirror::new(
            "v".into(),
            1,
            Duration::from_secs(10),
            outbox.clone(),
            Arc::new(watch::channel(0).0),
        );
        m.start_queueing();
        (outbox, m, b.unwrap().0, open, rd)
    }

    /// Reads one sealed frame from `peer`: the RECORD's seq.
    async fn read_record_seq(
        peer: &mut tokio::net::TcpStream,
        open: &mut twinblock_pair::wire::FrameOpener,
    ) -> u64 {
        let mut buf = Vec::new();
        loop {
            if let Some(f) = open.open(&buf).unwrap() {
                match Message::decode(f.kind, &buf[f.body_start..f.total]).unwrap() {
                    Message::Record(r) => return r.seq,
                    other => panic!("unexpected frame {:?}", other.kind()),
                }
            }
            let mut chunk = [0u8; 8192];
            let n = tokio::time::timeout(Duration::from_secs(5), peer.read(&mut chunk))
                .await
                .expect("no frame arrived")
                .unwrap();
            assert!(n > 0, "closed");
            buf.extend_from_slice(&chunk[..n]);
        }
    }

    #[tokio::test]
    async fn idle_writer_sends_its_own_record_without_the_send_loop() {
        let (outbox, m, mut peer, mut open, _rd) = setup().await;
        // No send loop runs: only the writer can have sent it.
        let out = m.ship(0, 1, Bytes::from(vec![5u8; 4096])).await;
        assert_eq!(out, MirrorOutcome::NotMirrored, "not in sync yet: no wait");
        assert_eq!(read_record_seq(&mut peer, &mut open).await, 1);
        assert_eq!(outbox.stats.direct_sends.load(Ordering::Relaxed), 1);
        assert!(m.status_json()["queued_records"] == 0);
    }

    #[tokio::test]
    async fn writer_that_misses_the_wire_leaves_its_record_to_the_holder() {
        let (outbox, m, _peer, _open, _rd) = setup().await;
        let (wire, epoch) = outbox.take().expect("wire free");
        let _ = m.ship(0, 1, Bytes::from(vec![5u8; 4096])).await;
        assert_eq!(m.status_json()["queued_records"], 1, "left queued");
        let woken = outbox.wake().notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        outbox.put_back(wire, epoch);
        tokio::time::timeout(Duration::from_secs(1), woken)
            .await
            .expect("putting the wire back must wake the send loop");
        let (mut wire, _) = outbox.take().unwrap();
        let mut batch = SendBatch::new();
        assert_eq!(m.seal_queued(&mut wire.seal, 1 << 20, &mut batch), 1);
    }

    #[tokio::test]
    async fn wire_of_an_ended_connection_is_not_reinstalled() {
        let (outbox, m, _peer, _open, _rd) = setup().await;
        let (wire, epoch) = outbox.take().unwrap();
        outbox.uninstall(epoch);
        outbox.put_back(wire, epoch);
        assert!(outbox.take().is_none(), "the old wire came back");
        // With no connection, a writer's record stays queued for the next one's send loop.
        let _ = m.ship(0, 1, Bytes::from(vec![5u8; 64])).await;
        assert_eq!(m.status_json()["queued_records"], 1);
    }
}
