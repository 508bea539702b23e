//! One vectored send's worth of frames, and the transport that puts it on the wire.
//!
//! A [`SendBatch`] holds the frames the sender collected since its last send, as segments: the
//! small parts (frame headers, tags, fixed fields, whole ACK / LOG_RESET / STATUS frames) are
//! appended to one `head` buffer, and each RECORD's record bytes are the journal's own copy
//! (`Bytes`, reference counted), never copied again. A send hands the segments to the kernel as
//! one iovec array: with io_uring as one SENDMSG ([`super::uring_send`]), without it as
//! `write_vectored` calls on the tokio socket ([`Transport::Tokio`]). Under load the sender
//! collects every record queued while the previous send was in flight, so several records go
//! per send; an idle link sends each record as soon as it is queued.
//!
//! The batch is passed *by value* to the transport and handed back when the send completed, so
//! the memory the kernel reads is owned by the transport for exactly as long as it may read it.

use std::io::{self, IoSlice};
use std::ops::Range;

use bytes::Bytes;
use tokio::io::AsyncWriteExt;
use tokio::net::tcp::OwnedWriteHalf;
use twinblock_pair::wire::{messages::encode_record_head, FrameWriter, Message};

use super::uring_send::UringSender;

/// Most iovecs handed to the kernel in one call (Linux's `UIO_MAXIOV` is 1024).
pub const SEND_IOVECS_MAX: usize = 1024;

/// Iovecs per `sendmsg` of the non-io_uring paths, held on the stack (a direct send carries one
/// or a few records: two segments each; a longer batch takes several calls).
const STACK_IOVECS: usize = 64;

/// One part of a batch: a range of the batch's `head` buffer, or a record's bytes.
#[derive(Debug, Clone)]
enum Seg {
    Head(Range<usize>),
    Data(Bytes),
}

/// The frames of one send.
#[derive(Debug, Default)]
pub struct SendBatch {
    head: Vec<u8>,
    segs: Vec<Seg>,
    bytes: usize,
    records: u64,
    /// The seq of the last RECORD frame (0: none).
    last_seq: u64,
}

impl SendBatch {
    pub fn new() -> SendBatch {
        SendBatch::default()
    }

    pub fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Bytes the batch puts on the wire.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// RECORD frames in the batch.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The seq of the batch's last RECORD frame (0 when it has none).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn clear(&mut self) {
        self.head.clear();
        self.segs.clear();
        self.bytes = 0;
        self.records = 0;
        self.last_seq = 0;
    }

    fn push_head(&mut self, start: usize) {
        let end = self.head.len();
        self.bytes += end - start;
        match self.segs.last_mut() {
            Some(Seg::Head(r)) if r.end == start => r.end = end,
            _ => self.segs.push(Seg::Head(start..end)),
        }
    }

    /// Appends one message, sealed by `w`.
    pub fn message<W: FrameWriter>(&mut self, w: &mut W, msg: &Message) {
        let start = self.head.len();
        msg.encode_with(w, &mut self.head);
        self.push_head(start);
    }

    /// Appends one RECORD frame whose record bytes are sent from `record` itself.
    pub fn record<W: FrameWriter>(
        &mut self,
        w: &mut W,
        volume: u64,
        log_offset: u64,
        seq: u64,
        record: &Bytes,
    ) {
        let start = self.head.len();
        encode_record_head(w, &mut self.head, volume, log_offset, seq, record);
        self.push_head(start);
        if !record.is_empty() {
            self.bytes += record.len();
            self.segs.push(Seg::Data(record.clone()));
        }
        self.records += 1;
        self.last_seq = seq;
    }

    fn seg(&self, i: usize) -> &[u8] {
        match &self.segs[i] {
            Seg::Head(r) => &self.head[r.clone()],
            Seg::Data(b) => b,
        }
    }

    /// The segments from `at` on, at most [`SEND_IOVECS_MAX`] of them, as slices (the first one
    /// starting `at.offset` bytes in).
    pub fn slices_from(&self, at: Cursor) -> impl Iterator<Item = &[u8]> {
        (at.seg..self.segs.len())
            .take(SEND_IOVECS_MAX)
            .map(move |i| {
                let s = self.seg(i);
                if i == at.seg {
                    &s[at.offset..]
                } else {
                    s
                }
            })
    }

    /// Fills `out` with the segments from `at` on (as [`SendBatch::slices_from`]); returns how
    /// many. A caller's stack array instead of a `Vec` per send: no allocation on the send path.
    pub fn io_slices_from<'a>(&'a self, at: Cursor, out: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, s) in out.iter_mut().zip(self.slices_from(at)) {
            *slot = IoSlice::new(s);
            n += 1;
        }
        n
    }

    /// Moves `at` forward by `n` bytes the kernel took.
    pub fn advance(&self, at: &mut Cursor, mut n: usize) {
        while n > 0 && at.seg < self.segs.len() {
            let left = self.seg(at.seg).len() - at.offset;
            if n < left {
                at.offset += n;
                return;
            }
            n -= left;
            at.seg += 1;
            at.offset = 0;
        }
    }

    /// True once every byte before `at` was sent.
    pub fn done(&self, at: Cursor) -> bool {
        at.seg >= self.segs.len()
    }

    /// The whole batch as one buffer (tests).
    #[cfg(test)]
    pub fn concat(&self) -> Vec<u8> {
        (0..self.segs.len())
            .flat_map(|i| self.seg(i))
            .copied()
            .collect()
    }
}

/// How far a partly sent batch got.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    seg: usize,
    offset: usize,
}

/// The outgoing connection's write side.
pub enum Transport {
    /// io_uring SENDMSG from the batch's segments.
    Uring(Box<UringSender>),
    /// tokio `write_vectored`: the fallback where io_uring is unavailable.
    Tokio(OwnedWriteHalf),
}

impl Transport {
    /// io_uring when the kernel allows it, else tokio; with the reason for the fallback.
    pub fn new(wr: OwnedWriteHalf) -> (Transport, String) {
        match UringSender::new(wr) {
            Ok(u) => (Transport::Uring(Box::new(u)), "io_uring".into()),
            Err((wr, e)) => (
                Transport::Tokio(wr),
                format!("tokio (io_uring unavailable: {e})"),
            ),
        }
    }

    /// Sends every byte of `batch`; hands it back for reuse.
    pub async fn send(&mut self, batch: SendBatch) -> io::Result<SendBatch> {
        self.send_from(batch, Cursor::default()).await
    }

    /// Sends the bytes of `batch` from `at` on (the rest of a partly sent batch).
    pub async fn send_from(&mut self, batch: SendBatch, mut at: Cursor) -> io::Result<SendBatch> {
        match self {
            Transport::Uring(u) => u.send(batch, at).await,
            Transport::Tokio(wr) => {
                let mut slices = [IoSlice::new(&[]); STACK_IOVECS];
                while !batch.done(at) {
                    let k = batch.io_slices_from(at, &mut slices);
                    let n = wr.write_vectored(&slices[..k]).await?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    batch.advance(&mut at, n);
                }
                Ok(batch)
            }
        }
    }

    /// Writes as much of `batch` from `at` as the socket takes now, with non-blocking
    /// `sendmsg` calls from the calling thread, moving `at` on; never waits. A writer's direct
    /// send on an idle link (see `outbox`): one syscall and no other task, where an io_uring
    /// submission would cost the same syscall and its completion a wake-up of the send loop.
    pub fn try_send_now(&mut self, batch: &SendBatch, at: &mut Cursor) -> io::Result<()> {
        let wr = match self {
            Transport::Uring(u) => match u.idle_socket() {
                Some(wr) => wr,
                // An io_uring send is still in flight: nothing may go before it.
                None => return Ok(()),
            },
            Transport::Tokio(wr) => wr,
        };
        let mut slices = [IoSlice::new(&[]); STACK_IOVECS];
        while !batch.done(*at) {
            let k = batch.io_slices_from(*at, &mut slices);
            match wr.try_write_vectored(&slices[..k]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => batch.advance(at, n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinblock_pair::wire::{split_frame, Plain};

    fn batch() -> SendBatch {
        let mut b = SendBatch::new();
        b.message(&mut Plain, &Message::Ack { volume: 1, seq: 2 });
        b.record(&mut Plain, 1, 0, 3, &Bytes::from(vec![7u8; 128]));
        b.record(&mut Plain, 1, 128, 4, &Bytes::from(vec![8u8; 64]));
        b
    }

    #[test]
    fn batch_is_the_frames_back_to_back() {
        let b = batch();
        let mut flat = Vec::new();
        Message::Ack { volume: 1, seq: 2 }.encode(&mut flat);
        twinblock_pair::wire::messages::encode_record(&mut flat, 1, 0, 3, &[7u8; 128]);
        twinblock_pair::wire::messages::encode_record(&mut flat, 1, 128, 4, &[8u8; 64]);
        assert_eq!(b.concat(), flat);
        assert_eq!(b.bytes(), flat.len());
        assert_eq!(b.records(), 2);
        // Header segments of adjacent frames merge: ACK+RECORD head, record, head, record.
        assert_eq!(b.segs.len(), 4);
        assert!(split_frame(&flat).unwrap().is_some());
    }

    /// A connected pair of sockets: our write half (its read half kept open), the peer's stream.
    async fn socket_pair() -> (
        OwnedWriteHalf,
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::TcpStream,
    ) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(a, l.accept());
        let (rd, wr) = a.unwrap().into_split();
        (wr, rd, b.unwrap().0)
    }

    /// Sends 3 batches of 2000 records (24 MiB, far beyond the socket buffers) while the peer
    /// reads slowly: every byte arrives once and in order.
    async fn large_batches_arrive_whole(mut tx: Transport, mut peer: tokio::net::TcpStream) {
        use tokio::io::AsyncReadExt;
        let mut expect = Vec::new();
        let mut batches = Vec::new();
        for round in 0..3u64 {
            let mut b = SendBatch::new();
            for i in 0..2000u64 {
                let rec = Bytes::from(vec![(round * 7 + i) as u8; 4096]);
                b.record(&mut Plain, 1, i * 4096, round * 2000 + i, &rec);
            }
            expect.extend(b.concat());
            batches.push(b);
        }
        let reader = tokio::spawn(async move {
            let mut got = Vec::new();
            let mut chunk = vec![0u8; 64 * 1024];
            loop {
                let n = peer.read(&mut chunk).await.unwrap();
                if n == 0 {
                    return got;
                }
                got.extend_from_slice(&chunk[..n]);
                tokio::time::sleep(std::time::Duration::from_micros(200)).await;
            }
        });
        for b in batches {
            let back = tx.send(b).await.unwrap();
            assert!(back.bytes() > 0, "the batch comes back for reuse");
        }
        drop(tx);
        let got = reader.await.unwrap();
        assert_eq!(got.len(), expect.len());
        assert!(got == expect, "bytes differ");
    }

    #[tokio::test]
    async fn uring_transport_sends_large_batches_whole_and_in_order() {
        let (wr, _rd, peer) = socket_pair().await;
        match UringSender::new(wr) {
            Ok(u) => large_batches_arrive_whole(Transport::Uring(Box::new(u)), peer).await,
            Err((_, why)) => eprintln!("skipped: io_uring unavailable here: {why}"),
        }
    }

    #[tokio::test]
    async fn tokio_transport_sends_large_batches_whole_and_in_order() {
        let (wr, _rd, peer) = socket_pair().await;
        large_batches_arrive_whole(Transport::Tokio(wr), peer).await;
    }

    #[test]
    fn advancing_by_partial_sends_covers_every_byte_once() {
        let b = batch();
        let flat = b.concat();
        for step in [1usize, 7, 50, 1000] {
            let mut at = Cursor::default();
            let mut got = Vec::new();
            while !b.done(at) {
                let chunk: Vec<u8> = b.slices_from(at).flatten().copied().take(step).collect();
                b.advance(&mut at, chunk.len());
                got.extend(chunk);
            }
            assert_eq!(got, flat, "step {step}");
        }
    }
}
