//! The interconnect's connections: dialing the partner (with backoff), accepting it, the
//! handshake over TCP, and the sender, ack reader and receiver loops.
//!
//! # One connection per direction
//!
//! Each node dials the partner to ship *its own* records and accepts the partner's connection to
//! store the partner's. So there are two TCP connections, each carrying one journal stream one
//! way and its ACKs back. The shipping side owns reconnecting (it is the side whose writes wait),
//! neither side needs a tie-break rule for simultaneous connects, and a FETCH for NVRAM-loss
//! recovery fits on the node's own outgoing connection (it asks for its records back). STATUS
//! records may travel on either. A new authenticated inbound connection replaces the previous
//! one (the partner only redials once it gave the old one up).
//!
//! Sends are vectored: every frame queued while the previous send was in flight goes in one
//! [`SendBatch`] (several records per send under load), with the record bytes sent from the
//! journal's copy. On an idle link the writer sends its own record instead of waking the send
//! loop ([`super::outbox`]); the ACK reader completes the covered writers directly
//! ([`VolumeMirror::on_ack`]). The outgoing connection sends through io_uring when the kernel allows it
//! ([`super::uring_send`]) and through tokio otherwise; `status` names which
//! (`interconnect.sender`). Every frame after the handshake is sealed with a MAC of this
//! connection and direction and checked in order (`twinblock_pair::wire::session`).

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use twinblock_pair::wire::{
    handshake::{encode_accept, encode_reject},
    split_frame, Acceptor, Dialer, FrameKind, FrameOpener, LogReset, Message, RejectReason,
    WireError,
};

use super::hops::{self, Hop};
use super::mirror::VolumeMirror;
use super::outbox::{Outbox, Wire};
use super::receiver::ReceiveError;
use super::rx_thread;
use super::send_batch::{SendBatch, Transport};
use super::{LinkPhase, Pair};

/// How long a handshake may take before the attempt is abandoned.
const HANDSHAKE_TIMEOUT_MS: u64 = 2000;
/// Largest buffer the sender writes at once (several records coalesce up to this).
const SEND_BATCH_MAX_BYTES: usize = 1 << 20;
/// Read buffer growth step.
const READ_CHUNK_BYTES: usize = 256 * 1024;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("{0}")]
    Receive(#[from] ReceiveError),
    #[error("the peer closed the connection")]
    Closed,
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("ACK for volume {0}, which this node does not mirror")]
    UnknownVolume(u64),
    #[error("dropped: {0}")]
    Dropped(String),
}

/// A receive buffer that yields whole frames: unsealed ones during the handshake, then (once
/// `opener` is set) only frames sealed for this connection, in order. `buf[start..end]` holds
/// the bytes read and not yet consumed; `buf` keeps its length (zeroed once, when it grows) so
/// that a read goes straight into it, by async or blocking reads alike.
pub(super) struct FrameBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    pub(super) opener: Option<FrameOpener>,
}

impl FrameBuf {
    pub(super) fn new() -> FrameBuf {
        FrameBuf {
            buf: Vec::new(),
            start: 0,
            end: 0,
            opener: None,
        }
    }

    /// Moves the unconsumed bytes to the front and makes room for a read of
    /// [`READ_CHUNK_BYTES`]; returns the free space to read into.
    fn room(&mut self) -> &mut [u8] {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < READ_CHUNK_BYTES {
            self.buf.resize(self.end + READ_CHUNK_BYTES, 0);
        }
        &mut self.buf[self.end..]
    }

    /// Reads more bytes; `Closed` at end of stream.
    async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> Result<(), LinkError> {
        let n = r.read(self.room()).await?;
        if n == 0 {
            return Err(LinkError::Closed);
        }
        self.end += n;
        Ok(())
    }

    /// Reads more bytes with `read` (a blocking read into the slice it is given); returns what
    /// `read` returned (0: end of stream).
    pub(super) fn fill_from(
        &mut self,
        read: impl FnOnce(&mut [u8]) -> std::io::Result<usize>,
    ) -> std::io::Result<usize> {
        let room = self.room();
        let free = room.len();
        let n = read(room)?;
        self.end += n.min(free);
        Ok(n)
    }

    /// The next whole frame already buffered (its body's range), if any.
    pub(super) fn next(&mut self) -> Result<Option<(FrameKind, Range<usize>)>, WireError> {
        let rest = &self.buf[self.start..self.end];
        let found = match &mut self.opener {
            Some(o) => o.open(rest)?,
            None => split_frame(rest)?,
        };
        let Some(f) = found else {
            return Ok(None);
        };
        if self.opener.is_none() && f.flags != 0 {
            return Err(WireError::BadFlags(f.flags));
        }
        let body = self.start + f.body_start..self.start + f.total;
        self.start += f.total;
        Ok(Some((f.kind, body)))
    }

    pub(super) fn body(&self, r: Range<usize>) -> &[u8] {
        &self.buf[r]
    }

    /// Appends bytes as if read (tests of what one read does, without a socket).
    #[cfg(test)]
    pub(super) fn push(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let n = self
                .fill_from(|room| {
                    let n = room.len().min(rest.len());
                    room[..n].copy_from_slice(&rest[..n]);
                    Ok(n)
                })
                .unwrap_or(0);
            rest = &rest[n..];
        }
    }

    async fn read_frame<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
    ) -> Result<(FrameKind, Vec<u8>), LinkError> {
        loop {
            if let Some((k, range)) = self.next()? {
                return Ok((k, self.body(range).to_vec()));
            }
            self.fill(r).await?;
        }
    }
}

fn handshake_timeout() -> Duration {
    Duration::from_millis(HANDSHAKE_TIMEOUT_MS)
}

/// Dials the partner for as long as the node runs, with exponential backoff between attempts.
pub async fn dial_loop(pair: Arc<Pair>, mut stop: watch::Receiver<bool>) {
    let mut backoff = pair.backoff_min;
    loop {
        if *stop.borrow() {
            return;
        }
        pair.link.set(LinkPhase::Connecting, None);
        let started = Instant::now();
        let result = tokio::select! {
            r = outbound(&pair) => r,
            _ = stop.changed() => return,
        };
        let mirrors = pair.mirrors();
        for m in &mirrors {
            m.link_down();
        }
        let reason = match &result {
            Ok(()) => "closed".to_string(),
            Err(e) => e.to_string(),
        };
        let was_up = pair.link.phase() == LinkPhase::Up;
        pair.link.set(LinkPhase::Down, Some(reason.clone()));
        pair.log.warn(
            "outbound",
            &format!(
                "interconnect to partner {} down: {reason}",
                pair.partner_address
            ),
        );
        spawn_down_watchdog(&pair, reason);
        if was_up || started.elapsed() > pair.backoff_max {
            backoff = pair.backoff_min;
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.changed() => return,
        }
        backoff = (backoff * 2).min(pair.backoff_max);
    }
}

/// The link is down: if it is not back up within the bounded wait, every mirror is out of sync
/// (status then says so even when no write came to notice).
fn spawn_down_watchdog(pair: &Arc<Pair>, reason: String) {
    let epoch = pair.link.epoch();
    let pair = Arc::clone(pair);
    tokio::spawn(async move {
        tokio::time::sleep(pair.mirror_timeout).await;
        if pair.link.epoch() == epoch && pair.link.phase() != LinkPhase::Up {
            for m in pair.mirrors() {
                m.declare_out_of_sync(&format!("interconnect down: {reason}"));
            }
        }
    });
}

async fn write_all<W: AsyncWrite + Unpin>(w: &mut W, b: &[u8]) -> Result<(), LinkError> {
    w.write_all(b).await?;
    Ok(())
}

/// One outgoing connection: handshake, resync, then stream until something fails.
async fn outbound(pair: &Arc<Pair>) -> Result<(), LinkError> {
    let stream = tokio::time::timeout(
        handshake_timeout(),
        TcpStream::connect(pair.partner_address),
    )
    .await
    .map_err(|_| LinkError::Timeout("connect"))??;
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut fb = FrameBuf::new();
    let mirrors = pair.mirrors();
    let announce = pair.announce(&mirrors);
    let peer = tokio::time::timeout(handshake_timeout(), async {
        let (dialer, hello) = Dialer::start(pair.identity(), pair.key.clone(), rand::random());
        write_all(&mut wr, &hello).await?;
        let (k, body) = fb.read_frame(&mut rd).await?;
        let (dialer, auth) = dialer.on_challenge(k, &body, &announce)?;
        write_all(&mut wr, &auth).await?;
        let (k, body) = fb.read_frame(&mut rd).await?;
        Ok::<_, LinkError>(dialer.on_reply(k, &body)?)
    })
    .await
    .map_err(|_| LinkError::Timeout("handshake"))??;
    let (sealer, opener) = peer.keys.dialer();
    fb.opener = Some(opener);
    let (transport, sender) = Transport::new(wr);
    pair.link.connected(peer.generation, &sender);
    tracing::info!(partner = %pair.partner_address, peer_generation = peer.generation, "interconnect up; resynchronising the partner's copy");
    tracing::info!("interconnect sender: {sender}");
    let mut kill = pair.kill.subscribe();
    kill.borrow_and_update();
    let by_id: BTreeMap<u64, Arc<VolumeMirror>> = mirrors
        .iter()
        .map(|m| (m.volume_id, Arc::clone(m)))
        .collect();
    let reader = async {
        loop {
            while let Some((k, range)) = fb.next()? {
                match Message::decode(k, fb.body(range))? {
                    Message::Ack { volume, seq } => {
                        by_id
                            .get(&volume)
                            .ok_or(LinkError::UnknownVolume(volume))?
                            .on_ack(seq);
                        hops::mark(Hop::AckApplied, seq);
                    }
                    Message::Status(bytes) => pair.receiver.note_status(bytes),
                    other => {
                        return Err(LinkError::Wire(WireError::Unexpected {
                            got: other.kind(),
                            state: "receiving ACKs",
                        }))
                    }
                }
            }
            fb.fill(&mut rd).await?;
            hops::mark(Hop::AckRead, 0);
        }
    };
    let sender = send_loop(pair, &mirrors, Wire::new(sealer, transport));
    tokio::select! {
        r = reader => r,
        r = sender => r,
        _ = kill.changed() => Err(LinkError::Dropped("the partner did not acknowledge in time".into())),
    }
}

/// Uninstalls the connection's wire from the outbox when the send loop ends (also when its
/// future is dropped).
struct Installed<'a> {
    outbox: &'a Outbox,
    epoch: u64,
}

impl Drop for Installed<'_> {
    fn drop(&mut self) {
        self.outbox.uninstall(self.epoch);
    }
}

/// Resyncs every volume (LOG_RESET, the unretired records, RESYNC_END), then installs the wire
/// in the outbox and streams: records writers did not send themselves, several per send (see
/// [`super::outbox`]).
async fn send_loop(
    pair: &Pair,
    mirrors: &[Arc<VolumeMirror>],
    mut wire: Wire,
) -> Result<(), LinkError> {
    // Queue first on every volume, so no record appended after its snapshot is missed.
    for m in mirrors {
        m.start_queueing();
    }
    let mut batch = SendBatch::new();
    for m in mirrors {
        let Some(snap) = m.snapshot() else {
            continue;
        };
        let last_seq = snap.next_seq - 1;
        batch.message(
            &mut wire.seal,
            &Message::LogReset(LogReset {
                volume: m.volume_id,
                generation: snap.generation,
                tail_offset: snap.tail_offset,
                tail_seq: snap.tail_seq,
            }),
        );
        batch.message(
            &mut wire.seal,
            &Message::ResyncBegin {
                volume: m.volume_id,
                first_seq: snap.tail_seq,
                last_seq,
            },
        );
        for r in &snap.records {
            batch.record(&mut wire.seal, m.volume_id, r.log_offset, r.seq, &r.bytes);
            if batch.bytes() >= SEND_BATCH_MAX_BYTES {
                batch = wire.tx.send(batch).await?;
                batch.clear();
            }
        }
        let end = Message::ResyncEnd {
            volume: m.volume_id,
            last_seq,
        };
        batch.message(&mut wire.seal, &end);
        batch = wire.tx.send(batch).await?;
        batch.clear();
        tracing::info!(volume = %m.name, records = snap.records.len(), through_seq = last_seq, "resync sent");
    }
    let installed = Installed {
        outbox: &pair.outbox,
        epoch: pair.outbox.install(wire),
    };
    pair.link.set(LinkPhase::Up, None);
    loop {
        let wake = installed.outbox.wake().notified();
        tokio::pin!(wake);
        wake.as_mut().enable();
        let Some((mut wire, epoch)) = installed.outbox.take() else {
            wake.await;
            continue;
        };
        let sent = stream_once(pair, mirrors, &mut wire).await;
        installed.outbox.put_back(wire, epoch);
        if !sent? {
            wake.await;
        }
    }
}

/// One send of the send loop: a direct send's leftover, or the status record and every queued
/// record (in seq order per volume). False when there was nothing to send.
async fn stream_once(
    pair: &Pair,
    mirrors: &[Arc<VolumeMirror>],
    wire: &mut Wire,
) -> Result<bool, LinkError> {
    if let Some(e) = wire.error.take() {
        return Err(e.into());
    }
    if let Some((rest, at)) = wire.carry.take() {
        wire.spare = wire.tx.send_from(rest, at).await?;
        return Ok(true);
    }
    let mut batch = std::mem::take(&mut wire.spare);
    batch.clear();
    if let Some(status) = pair.take_status() {
        batch.message(&mut wire.seal, &Message::Status(status));
    }
    for m in mirrors {
        let room = SEND_BATCH_MAX_BYTES.saturating_sub(batch.bytes());
        if room == 0 {
            break;
        }
        m.seal_queued(&mut wire.seal, room, &mut batch);
    }
    if batch.is_empty() {
        wire.spare = batch;
        return Ok(false);
    }
    let records = batch.records();
    let last_seq = batch.last_seq();
    hops::mark(Hop::SendStart, last_seq);
    wire.spare = wire.tx.send(batch).await?;
    hops::mark(Hop::SendDone, last_seq);
    pair.link.count_send(records);
    Ok(true)
}

/// Accepts the partner's connections until the node stops.
pub async fn accept_loop(pair: Arc<Pair>, listener: TcpListener, mut stop: watch::Receiver<bool>) {
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => return,
        };
        match accepted {
            Ok((stream, peer)) => {
                let pair = Arc::clone(&pair);
                tokio::spawn(async move {
                    if let Err(e) = inbound(&pair, stream, peer).await {
                        pair.inbound.set_error(peer, &e.to_string());
                        pair.log.warn(
                            "inbound",
                            &format!("interconnect connection from {peer} dropped: {e}"),
                        );
                    }
                });
            }
            Err(e) => {
                pair.log
                    .warn("accept", &format!("interconnect accept failed: {e}"));
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One incoming connection: handshake, open the copies, then store records and acknowledge.
async fn inbound(pair: &Arc<Pair>, stream: TcpStream, peer: SocketAddr) -> Result<(), LinkError> {
    stream.set_nodelay(true)?;
    let (mut rd, mut wr) = stream.into_split();
    let mut fb = FrameBuf::new();
    let session = tokio::time::timeout(handshake_timeout(), async {
        let acceptor = Acceptor::new(pair.identity(), pair.key.clone(), rand::random());
        let (k, body) = fb.read_frame(&mut rd).await?;
        let step = {
            let mut seen = pair.seen_nonces.lock().unwrap_or_else(|p| p.into_inner());
            acceptor.on_hello(k, &body, &mut seen)
        };
        let (acceptor, challenge) = match step {
            Ok(x) => x,
            Err(f) => {
                let _ = wr.write_all(&f.reply).await;
                return Err(LinkError::Wire(f.error));
            }
        };
        write_all(&mut wr, &challenge).await?;
        let (k, body) = fb.read_frame(&mut rd).await?;
        match acceptor.on_auth(k, &body) {
            Ok(s) => Ok(s),
            Err(f) => {
                let _ = wr.write_all(&f.reply).await;
                Err(LinkError::Wire(f.error))
            }
        }
    })
    .await
    .map_err(|_| LinkError::Timeout("handshake"))??;
    if let Err(text) = pair.receiver.open_copies(&session.volumes) {
        let mut out = Vec::new();
        encode_reject(&mut out, RejectReason::Volume, &text);
        let _ = wr.write_all(&out).await;
        return Err(LinkError::Dropped(text));
    }
    let mut accept = Vec::new();
    encode_accept(&mut accept);
    write_all(&mut wr, &accept).await?;
    let (seal, opener) = session.keys.acceptor();
    fb.opener = Some(opener);
    // From here the connection is served by a thread of its own (see `rx_thread`).
    let stream = rd
        .reunite(wr)
        .map_err(|e| LinkError::Dropped(e.to_string()))?;
    let stream = stream.into_std()?;
    stream.set_nonblocking(false)?;
    let writer = rx_thread::shared_writer(seal, stream.try_clone()?);
    let _shutdown = rx_thread::ShutdownOnDrop(stream.try_clone()?);
    let epoch = pair.inbound.connected(peer, session.generation);
    let mut replaced = pair.inbound.subscribe();
    tracing::info!(%peer, volumes = session.volumes.len(), "partner connected; storing its journal records");
    let announced: HashSet<u64> = session.volumes.iter().map(|v| v.volume).collect();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    {
        let pair = Arc::clone(pair);
        let writer = Arc::clone(&writer);
        std::thread::Builder::new()
            .name("twinblock-rx".into())
            .spawn(move || {
                let r = rx_thread::receive_loop(&pair, stream, fb, &writer, &announced);
                let _ = done_tx.send(r);
            })?;
    }
    // This node's status goes back on the partner's connection too, so the interconnect path
    // works while only the partner can connect (`Pair::send_status`).
    let mut status = pair.status_updates();
    let forward_status = async {
        while status.changed().await.is_ok() {
            let record = status.borrow_and_update().clone();
            let Some(record) = record else { continue };
            let writer = Arc::clone(&writer);
            tokio::task::spawn_blocking(move || rx_thread::write_status(&writer, record))
                .await
                .map_err(|e| LinkError::Dropped(format!("status writer: {e}")))??;
        }
        std::future::pending::<Result<(), LinkError>>().await
    };
    let result = tokio::select! {
        r = done_rx => r.unwrap_or(Err(LinkError::Dropped("the receive thread ended".into()))),
        r = forward_status => r,
        _ = replaced.wait_for(|e| *e != epoch) => Err(LinkError::Dropped("replaced by a newer connection".into())),
    };
    pair.inbound.disconnected(epoch);
    result
}
