//! The owner's end of the ACK stream, shared by the connection's reader task and by a writer
//! that waits for its own ACK on an idle link.
//!
//! # Why a writer may read its own ACK
//!
//! At queue depth 1 a mirrored write used to sleep until the ACK reader task woke it: the ACK
//! arrived, the kernel woke a parked runtime thread (on this VM an idle vCPU's wake-up costs
//! tens of µs), that thread ran the reader, which completed the writer. A writer that just sent
//! its record on an idle link (see [`super::outbox`]) knows the ACK is due within one round
//! trip, so it polls the ACK socket itself for a short bounded time
//! ([`super::outbox::Outbox::spin_until`]): when the ACK comes during the poll, it is read,
//! applied and the writer continues without any thread waking. The reader task still owns the
//! stream otherwise, and whichever holds the buffer's lock reads: a poll never blocks on it.
//!
//! Frames are opened in the order they arrived whoever reads them, since both go through the
//! one [`FrameBuf`] (its frame opener checks the sequence of MACs). A failure found by a polling
//! writer (a bad frame, the end of the stream) is handed to the reader task, which ends the
//! connection with it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Notify;
use twinblock_pair::wire::{Message, WireError};

use super::hops::{self, Hop};
use super::interconnect::{FrameBuf, LinkError};
use super::mirror::VolumeMirror;

/// What the owner does with a STATUS frame that arrives among the ACKs.
pub type StatusSink = Box<dyn Fn(Vec<u8>) + Send + Sync>;

/// The read side of the outgoing connection: ACKs (and STATUS records) from the partner.
pub struct AckInbox {
    rd: OwnedReadHalf,
    fb: Mutex<FrameBuf>,
    mirrors: BTreeMap<u64, Arc<VolumeMirror>>,
    status: StatusSink,
    /// A failure a polling writer found, for the reader task.
    failed: Mutex<Option<LinkError>>,
    failure: Notify,
}

impl AckInbox {
    pub(super) fn new(
        rd: OwnedReadHalf,
        fb: FrameBuf,
        mirrors: &[Arc<VolumeMirror>],
        status: StatusSink,
    ) -> AckInbox {
        AckInbox {
            rd,
            fb: Mutex::new(fb),
            mirrors: mirrors
                .iter()
                .map(|m| (m.volume_id, Arc::clone(m)))
                .collect(),
            status,
            failed: Mutex::new(None),
            failure: Notify::new(),
        }
    }

    fn failed(&self) -> MutexGuard<'_, Option<LinkError>> {
        self.failed.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The reader task: applies every frame as it arrives until the stream fails.
    pub async fn run(&self) -> Result<(), LinkError> {
        loop {
            if let Some(e) = self.failed().take() {
                return Err(e);
            }
            {
                let fb = self.fb.lock().unwrap_or_else(|p| p.into_inner());
                self.drain(fb)?;
            }
            tokio::select! {
                r = self.rd.readable() => r?,
                () = self.failure.notified() => {}
            }
        }
    }

    /// A waiting writer's poll: applies what arrived, if nobody else is reading right now.
    /// Never waits; a failure goes to the reader task.
    pub fn poll(&self) {
        let Ok(fb) = self.fb.try_lock() else {
            return;
        };
        if self.failed().is_some() {
            return;
        }
        if let Err(e) = self.drain(fb) {
            *self.failed() = Some(e);
            self.failure.notify_one();
        }
    }

    /// Applies every buffered frame and reads more until the socket has none.
    fn drain(&self, mut fb: MutexGuard<'_, FrameBuf>) -> Result<(), LinkError> {
        loop {
            while let Some((k, range)) = fb.next()? {
                self.apply(Message::decode(k, fb.body(range))?)?;
            }
            if !fb.try_fill(&self.rd)? {
                return Ok(());
            }
            hops::mark(Hop::AckRead, 0);
        }
    }

    fn apply(&self, msg: Message) -> Result<(), LinkError> {
        match msg {
            Message::Ack { volume, seq } => {
                self.mirrors
                    .get(&volume)
                    .ok_or(LinkError::UnknownVolume(volume))?
                    .on_ack(seq);
                hops::mark(Hop::AckApplied, seq);
            }
            Message::Status(bytes) => (self.status)(bytes),
            other => {
                return Err(LinkError::Wire(WireError::Unexpected {
                    got: other.kind(),
                    state: "receiving ACKs",
                }))
            }
        }
        Ok(())
    }
}
