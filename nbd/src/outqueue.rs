//! The reply writer's queue: the bytes of replies waiting for the socket, in order, and how
//! they are written.
//!
//! Headers and small payloads are copied into one staging buffer; large payloads are queued as
//! they are (a read cache's blocks by reference, a page-cache file range as the range) so the
//! writer never copies them. Runs of in-memory chunks go out with vectored writes; a file range
//! goes with `sendfile` on a plain socket (the bytes before it with `MSG_MORE`, so header and
//! data leave together), or is read into memory first on a stream that cannot take it (TLS).

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::readdata::{FileRange, ReadData};
use crate::sendfile;
use crate::transport::ReplySink;

/// Read payloads up to this size are copied next to their reply header; larger ones are
/// queued as their own buffer and written with one vectored write, never copied.
pub const INLINE_PAYLOAD_BYTES: usize = 16 << 10;

/// Most buffers handed to one vectored write (Linux takes up to 1024): a 1 MiB read of 4 KiB
/// cache blocks is 256 pieces, so a batch of them goes out in a few system calls.
pub const WRITE_IOVECS_MAX: usize = 512;

/// One queued run of reply bytes.
enum Chunk {
    Bytes(Bytes),
    File(FileRange),
}

/// Reply bytes waiting for the socket, in order.
#[derive(Default)]
pub struct OutQueue {
    chunks: VecDeque<Chunk>,
    queued_bytes: usize,
}

impl OutQueue {
    /// Bytes queued and not written yet.
    pub fn remaining(&self) -> usize {
        self.queued_bytes
    }

    /// Queues in-memory bytes (nothing for an empty buffer).
    pub fn push_bytes(&mut self, b: Bytes) {
        if !b.is_empty() {
            self.queued_bytes += b.len();
            self.chunks.push_back(Chunk::Bytes(b));
        }
    }

    /// Queues a file range, sent from the page cache.
    pub fn push_file(&mut self, r: FileRange) {
        if r.len > 0 {
            self.queued_bytes += r.len;
            self.chunks.push_back(Chunk::File(r));
        }
    }

    /// Fills `dst` with the in-memory chunks at the front, up to the first file range. Returns
    /// how many slices it filled and whether a file range is what stopped it.
    fn bytes_vectored<'a>(&'a self, dst: &mut [IoSlice<'a>]) -> (usize, bool) {
        let mut n = 0;
        for c in &self.chunks {
            match c {
                Chunk::Bytes(b) => {
                    let Some(slot) = dst.get_mut(n) else {
                        return (n, false);
                    };
                    *slot = IoSlice::new(b);
                    n += 1;
                }
                Chunk::File(_) => return (n, true),
            }
        }
        (n, false)
    }

    /// Drops `cnt` written bytes from the in-memory chunks at the front.
    fn advance(&mut self, mut cnt: usize) {
        self.queued_bytes -= cnt.min(self.queued_bytes);
        while cnt > 0 {
            let Some(Chunk::Bytes(front)) = self.chunks.front_mut() else {
                return;
            };
            if cnt < front.len() {
                front.advance(cnt);
                return;
            }
            cnt -= front.len();
            self.chunks.pop_front();
        }
    }
}

/// Queues one read reply's payload after its header (already in `staging`): a small in-memory
/// payload is copied next to the header; a large one's pieces, or a file range, are queued as
/// they are.
pub fn queue_payload(out: &mut OutQueue, staging: &mut BytesMut, payload: &ReadData) {
    if let Some(pieces) = payload.pieces() {
        if payload.len() <= INLINE_PAYLOAD_BYTES {
            for p in pieces {
                staging.extend_from_slice(p);
            }
            return;
        }
    }
    out.push_bytes(staging.split().freeze());
    match payload {
        ReadData::File(range) => out.push_file(range.clone()),
        ReadData::One(_) | ReadData::Pieces(_) => {
            for p in payload.pieces().unwrap_or_default() {
                out.push_bytes(p.clone());
            }
        }
    }
}

/// Writes everything queued: in-memory runs in vectored writes of up to `WRITE_IOVECS_MAX`
/// buffers (tokio's `write_all_buf` passes at most 64, which would split a 1 MiB reply of cache
/// blocks into four system calls), file ranges with `sendfile`. An error part-way through a
/// reply leaves the stream unusable: the caller drops the connection.
pub async fn write_out<W: ReplySink>(writer: &mut W, out: &mut OutQueue) -> io::Result<()> {
    while let Some(front) = out.chunks.front() {
        if let Chunk::File(range) = front {
            let range = range.clone();
            match writer.socket() {
                Some(sock) => sendfile::send_file(sock, &range).await?,
                // Resident pages (the device checked): the read does not wait for the disk.
                None => writer.write_all(&range.read()?).await?,
            }
            out.queued_bytes -= range.len.min(out.queued_bytes);
            out.chunks.pop_front();
            continue;
        }
        let written = {
            let mut slices = [IoSlice::new(&[]); WRITE_IOVECS_MAX];
            let (n, file_follows) = out.bytes_vectored(&mut slices);
            match writer.socket() {
                Some(sock) if file_follows => sendfile::send_more(sock, &slices[..n]).await?,
                _ => writer.write_vectored(&slices[..n]).await?,
            }
        };
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        out.advance(written);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn chunk_bytes(q: &OutQueue) -> Vec<u8> {
        let mut slices = [IoSlice::new(&[]); 8];
        let (n, _) = q.bytes_vectored(&mut slices);
        slices[..n].iter().flat_map(|s| s.iter().copied()).collect()
    }

    #[test]
    fn out_queue_advances_across_chunks() {
        let mut q = OutQueue::default();
        for c in [&b"abc"[..], b"defgh", b"ij"] {
            q.push_bytes(Bytes::copy_from_slice(c));
        }
        assert_eq!(chunk_bytes(&q), b"abcdefghij");
        q.advance(4);
        assert_eq!((q.remaining(), chunk_bytes(&q)), (6, b"efghij".to_vec()));
        q.advance(4);
        assert_eq!(chunk_bytes(&q), b"ij");
        q.advance(2);
        assert_eq!((q.remaining(), chunk_bytes(&q)), (0, Vec::new()));
    }

    #[test]
    fn vectored_bytes_stop_at_a_file_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![5u8; 8192]).unwrap();
        let mut q = OutQueue::default();
        q.push_bytes(Bytes::from_static(b"head"));
        q.push_file(FileRange {
            file: Arc::new(std::fs::File::open(&path).unwrap()),
            offset: 0,
            len: 8192,
        });
        q.push_bytes(Bytes::from_static(b"tail"));
        let mut slices = [IoSlice::new(&[]); 8];
        assert_eq!(q.bytes_vectored(&mut slices), (1, true));
        assert_eq!(q.remaining(), 4 + 8192 + 4);
    }

    #[test]
    fn large_payload_pieces_are_queued_by_reference() {
        let mut out = OutQueue::default();
        let mut staging = BytesMut::new();
        staging.extend_from_slice(b"head");
        let pieces: Vec<Bytes> = (0..8).map(|_| Bytes::from(vec![1u8; 4096])).collect();
        let ptrs: Vec<*const u8> = pieces.iter().map(|p| p.as_ptr()).collect();
        queue_payload(&mut out, &mut staging, &ReadData::from(pieces));
        assert_eq!(out.chunks.len(), 9, "the header, then each piece");
        assert_eq!(out.remaining(), 4 + 8 * 4096);
        let queued: Vec<*const u8> = out
            .chunks
            .iter()
            .skip(1)
            .filter_map(|c| match c {
                Chunk::Bytes(b) => Some(b.as_ptr()),
                Chunk::File(_) => None,
            })
            .collect();
        assert_eq!(queued, ptrs, "pieces were copied");
        assert!(staging.is_empty());
    }

    #[test]
    fn small_payload_pieces_are_copied_next_to_the_header() {
        let mut out = OutQueue::default();
        let mut staging = BytesMut::new();
        staging.extend_from_slice(b"head");
        let data = ReadData::from(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
        queue_payload(&mut out, &mut staging, &data);
        assert_eq!(&staging[..], b"headabcd");
        assert_eq!(out.remaining(), 0);
    }
}
