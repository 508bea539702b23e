//! The partner's stream read on a thread of its own: a blocking `recv` into the frame buffer,
//! then the whole read applied ([`super::rx_batch`]: stored, persisted once, one cumulative ACK
//! per volume) and the ACKs written with a blocking `send`, all on the thread that was woken by
//! the data.
//!
//! # Why a thread and not a tokio task
//!
//! On the receiving node every batch of the partner's records used to cost an `epoll_wait`
//! wake-up of a runtime worker, a task poll, a `recv` that returns data, and a second `recv`
//! that returns `EAGAIN` before the task parks again; the data's arrival wakes the reader
//! directly here, and the thread sleeps in the `recv` that returns the next read. One such
//! connection exists per node (the partner's), so one thread is cheap.
//!
//! # Sharing the socket
//!
//! The thread owns the read side. Writes (the thread's ACKs and FETCH replies, and this node's
//! STATUS records, which an async task forwards) share one [`RxWriter`] behind a mutex, so
//! frames are sealed and written in the same order (the peer checks the MAC sequence). STATUS
//! writes run on tokio's blocking pool, never on a runtime worker: a partner that stops reading
//! blocks a write. The connection's task ends the thread by shutting the socket down
//! ([`ShutdownOnDrop`]), which also happens when the task is dropped (node stopping).

use std::collections::{BTreeMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};

use twinblock_pair::wire::{FrameSealer, Message};

use super::hops::{self, Hop};
use super::interconnect::{FrameBuf, LinkError};
use super::rx_batch;
use super::Pair;

/// The write side of the partner's connection: the sealer and the socket, used together.
pub(super) struct RxWriter {
    seal: FrameSealer,
    stream: TcpStream,
    /// Reused for the STATUS frames.
    out: Vec<u8>,
}

/// An [`RxWriter`] shared by the receive thread and the STATUS forwarder.
pub(super) type SharedWriter = Arc<Mutex<RxWriter>>;

pub(super) fn shared_writer(seal: FrameSealer, stream: TcpStream) -> SharedWriter {
    Arc::new(Mutex::new(RxWriter {
        seal,
        stream,
        out: Vec::new(),
    }))
}

fn lock(w: &SharedWriter) -> MutexGuard<'_, RxWriter> {
    w.lock().unwrap_or_else(|p| p.into_inner())
}

/// Seals and writes one STATUS frame (blocking: call it off the runtime's workers).
pub(super) fn write_status(w: &SharedWriter, record: Vec<u8>) -> Result<(), LinkError> {
    let mut guard = lock(w);
    let RxWriter { seal, stream, out } = &mut *guard;
    out.clear();
    Message::Status(record).encode_with(seal, out);
    stream.write_all(out)?;
    Ok(())
}

/// Shuts the connection down when dropped: the receive thread's `recv` returns and it ends.
pub(super) struct ShutdownOnDrop(pub(super) TcpStream);

impl Drop for ShutdownOnDrop {
    fn drop(&mut self) {
        let _ = self.0.shutdown(Shutdown::Both);
    }
}

/// Reads more bytes into `fb` (blocking); `Closed` at end of stream.
fn fill(fb: &mut FrameBuf, stream: &mut TcpStream) -> Result<(), LinkError> {
    loop {
        match fb.fill_from(|spare| stream.read(spare)) {
            Ok(0) => return Err(LinkError::Closed),
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// The receive loop of one connection, run on its own thread until the connection fails or is
/// shut down: every read is applied as one batch and its ACKs written before the next read.
pub(super) fn receive_loop(
    pair: &Pair,
    mut stream: TcpStream,
    mut fb: FrameBuf,
    writer: &SharedWriter,
    announced: &HashSet<u64>,
) -> Result<(), LinkError> {
    let mut out = Vec::new();
    let mut touched = BTreeMap::new();
    loop {
        fill(&mut fb, &mut stream)?;
        hops::mark(Hop::RxRead, 0);
        let mut guard = lock(writer);
        let w = &mut *guard;
        // Every whole frame of this read: stored, persisted as one group, then one cumulative
        // ACK per volume (a bad frame still acknowledges the good ones before it). Sealed under
        // the writer's lock, so a STATUS frame cannot be sealed between sealing and writing.
        let applied = rx_batch::apply_read(
            &mut fb,
            &pair.receiver,
            announced,
            &mut w.seal,
            &mut out,
            &mut touched,
        );
        if out.is_empty() {
            applied?;
            continue;
        }
        for seq in touched.values() {
            hops::mark(Hop::AckWrite, *seq);
        }
        let written = w.stream.write_all(&out);
        drop(guard);
        out.clear();
        applied?;
        written?;
        for seq in touched.values() {
            hops::mark(Hop::AckSent, *seq);
        }
    }
}
