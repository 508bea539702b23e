//! Fetching this node's own log back from the partner's copy (NVRAM-loss recovery).
//!
//! A node whose NVRAM file was lost (tmpfs after a power cut) but whose partner mirrored its
//! records asks for them before its journal opens: a short-lived connection of its own (the
//! normal outbound link only starts once the volumes are open), the usual authenticated handshake
//! announcing only the volume, with an all-zero store id so the partner keeps its copy bound to
//! whatever store it is bound to, then FETCH_REQUEST. The partner answers FETCH_BEGIN (its copy's
//! store, generation, tail, last seq) and one FETCH_RECORD per record. Each record is checked as
//! it arrives (seq and offset continuity, generation, volume, CRC) and the whole copy once more
//! before anything is written (`twinblock_journal::restore`). Any failure refuses the whole copy.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use twinblock_journal::restore::{
    check_fetched, check_fetched_record, FetchRefusal, FetchedLog, RestoreTarget,
};
use twinblock_journal::UnretiredRecord;
use twinblock_pair::wire::{
    split_frame, Dialer, FrameKind, FrameOpener, Message, VolumeAnnounce, WireError,
};

use super::Pair;

/// How long connecting and the handshake may take.
const FETCH_CONNECT_TIMEOUT_MS: u64 = 3000;
/// How long the whole copy may take to arrive (a full 64 MiB log over a slow link included).
const FETCH_TRANSFER_TIMEOUT_MS: u64 = 60_000;
/// Read buffer growth step.
const FETCH_READ_CHUNK_BYTES: usize = 256 * 1024;

/// Why the copy could not be fetched (nothing was stored).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("cannot reach the partner at {addr}: {source}")]
    Connect {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} timed out")]
    Timeout(&'static str),
    #[error("interconnect I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("the partner closed the connection")]
    Closed,
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("unexpected {0:?} frame in the fetch reply")]
    Unexpected(FrameKind),
    #[error("the reply is for volume {got}, asked for {asked}")]
    WrongVolume { got: u64, asked: u64 },
    #[error("the partner's copy is refused: {0}")]
    Refused(#[from] FetchRefusal),
}

/// Reads whole frames from a stream: unsealed during the handshake, then (with `opener`) only
/// frames sealed for this connection, in order.
struct Frames {
    stream: TcpStream,
    buf: Vec<u8>,
    start: usize,
    opener: Option<FrameOpener>,
}

impl Frames {
    async fn next(&mut self) -> Result<(FrameKind, Vec<u8>), FetchError> {
        loop {
            let rest = &self.buf[self.start..];
            let found = match &mut self.opener {
                Some(o) => o.open(rest)?,
                None => match split_frame(rest)? {
                    Some(f) if f.flags != 0 => return Err(WireError::BadFlags(f.flags).into()),
                    f => f,
                },
            };
            if let Some(f) = found {
                let body = self.buf[self.start + f.body_start..self.start + f.total].to_vec();
                self.start += f.total;
                return Ok((f.kind, body));
            }
            self.buf.drain(..self.start);
            self.start = 0;
            self.buf.reserve(FETCH_READ_CHUNK_BYTES);
            if self.stream.read_buf(&mut self.buf).await? == 0 {
                return Err(FetchError::Closed);
            }
        }
    }
}

/// Fetches the partner's copy of journaled volume `name` (journal id `target.volume_id`) and
/// checks it against `target`. Returns it only when it can be restored whole.
pub async fn fetch_own_log(
    pair: &Pair,
    name: &str,
    target: &RestoreTarget,
) -> Result<FetchedLog, FetchError> {
    let addr = pair.partner_address;
    let connect = Duration::from_millis(FETCH_CONNECT_TIMEOUT_MS);
    let stream = tokio::time::timeout(connect, TcpStream::connect(addr))
        .await
        .map_err(|_| FetchError::Timeout("connecting to the partner"))?
        .map_err(|source| FetchError::Connect { addr, source })?;
    stream.set_nodelay(true)?;
    let mut frames = Frames {
        stream,
        buf: Vec::new(),
        start: 0,
        opener: None,
    };
    let announce = [VolumeAnnounce {
        volume: target.volume_id,
        name: name.to_string(),
        generation: 0,
        log_bytes: target.log_bytes,
        // All zero: the partner must not rebind its copy to what this node claims.
        store_id: [0; 16],
    }];
    let peer = tokio::time::timeout(connect, async {
        let (dialer, hello) = Dialer::start(pair.identity(), pair.key.clone(), rand::random());
        frames.stream.write_all(&hello).await?;
        let (k, body) = frames.next().await?;
        let (dialer, auth) = dialer.on_challenge(k, &body, &announce)?;
        frames.stream.write_all(&auth).await?;
        let (k, body) = frames.next().await?;
        Ok::<_, FetchError>(dialer.on_reply(k, &body)?)
    })
    .await
    .map_err(|_| FetchError::Timeout("the fetch handshake"))??;
    let (mut seal, opener) = peer.keys.dialer();
    frames.opener = Some(opener);
    let mut request = Vec::new();
    Message::FetchRequest {
        volume: target.volume_id,
        from_seq: target.from_seq,
    }
    .encode_with(&mut seal, &mut request);
    frames.stream.write_all(&request).await?;
    let transfer = Duration::from_millis(FETCH_TRANSFER_TIMEOUT_MS);
    let log = tokio::time::timeout(transfer, receive_copy(&mut frames, target))
        .await
        .map_err(|_| FetchError::Timeout("receiving the partner's copy"))??;
    check_fetched(target, &log)?;
    Ok(log)
}

/// Reads FETCH_BEGIN and the FETCH_RECORDs it announces, checking each record on arrival.
async fn receive_copy(
    frames: &mut Frames,
    target: &RestoreTarget,
) -> Result<FetchedLog, FetchError> {
    let begin = loop {
        let (k, body) = frames.next().await?;
        match Message::decode(k, &body)? {
            Message::FetchBegin(b) => break b,
            // The partner may send its HA status on any connection.
            Message::Status(_) => continue,
            other => return Err(FetchError::Unexpected(other.kind())),
        }
    };
    if begin.volume != target.volume_id {
        return Err(FetchError::WrongVolume {
            got: begin.volume,
            asked: target.volume_id,
        });
    }
    if begin.store_id == [0; 16] {
        return Err(FetchRefusal::NoCopy.into());
    }
    let mut log = FetchedLog {
        store_id: begin.store_id,
        generation: begin.generation,
        tail_offset: begin.tail_offset,
        tail_seq: begin.tail_seq,
        last_seq: begin.last_seq,
        records: Vec::new(),
    };
    // Refuse a copy of another store or one that misses the first lost seq before the records.
    check_fetched(
        target,
        &FetchedLog {
            last_seq: log.tail_seq.saturating_sub(1),
            ..log.clone()
        },
    )?;
    let mut seq = log.tail_seq;
    let mut at = log.tail_offset;
    // A live log never holds more bytes than the log has: a longer reply is not a copy.
    let mut received_bytes = 0u64;
    while seq <= log.last_seq {
        let (k, body) = frames.next().await?;
        let r = match Message::decode(k, &body)? {
            Message::FetchRecord(r) => r,
            Message::Status(_) => continue,
            other => return Err(FetchError::Unexpected(other.kind())),
        };
        if r.volume != target.volume_id {
            return Err(FetchError::WrongVolume {
                got: r.volume,
                asked: target.volume_id,
            });
        }
        received_bytes += r.record.len() as u64;
        if received_bytes > target.log_bytes {
            return Err(FetchRefusal::BadRecord {
                seq: r.seq,
                log_offset: r.log_offset,
                detail: format!("the reply exceeds the log's {} bytes", target.log_bytes),
            }
            .into());
        }
        let rec = UnretiredRecord {
            log_offset: r.log_offset,
            seq: r.seq,
            bytes: r.record.into(),
        };
        at = check_fetched_record(target, log.generation, seq, at, &rec)?;
        log.records.push(rec);
        seq += 1;
    }
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;
    use twinblock_journal::format::{encode_record, RecordHeader, RecordKind};
    use twinblock_pair::wire::{FetchBegin, RecordFrame, SessionKeys};

    /// The keys of the test connection (both ends derive them from one made-up transcript).
    fn keys() -> SessionKeys {
        SessionKeys::derive(b"0123456789abcdef", b"hello", b"challenge", b"auth")
    }

    const STORE: [u8; 16] = [8; 16];
    const VOL: u64 = 77;
    const LOG: u64 = 64 * 1024;

    fn target() -> RestoreTarget {
        RestoreTarget {
            store_id: STORE,
            volume_id: VOL,
            log_bytes: LOG,
            from_seq: 5,
        }
    }

    fn record(seq: u64) -> Vec<u8> {
        let h = RecordHeader {
            kind: RecordKind::Write,
            generation: 2,
            seq,
            volume_id: VOL,
            offset: seq * 4096,
            length: 64,
            payload_bytes: 64,
        };
        encode_record(&h, &[seq as u8; 64])
    }

    /// FETCH_BEGIN for seqs 5..=7 at log offset 0, then the given (offset, seq, bytes) records.
    fn reply(store_id: [u8; 16], records: &[(u64, u64, Vec<u8>)]) -> Vec<u8> {
        let (mut seal, _) = keys().acceptor();
        let mut out = Vec::new();
        Message::FetchBegin(FetchBegin {
            volume: VOL,
            store_id,
            generation: 2,
            tail_offset: 0,
            tail_seq: 5,
            last_seq: 7,
        })
        .encode_with(&mut seal, &mut out);
        for (log_offset, seq, bytes) in records {
            Message::FetchRecord(RecordFrame {
                volume: VOL,
                log_offset: *log_offset,
                seq: *seq,
                record: bytes.clone(),
            })
            .encode_with(&mut seal, &mut out);
        }
        out
    }

    fn good_records() -> Vec<(u64, u64, Vec<u8>)> {
        (5..=7).map(|s| ((s - 5) * 128, s, record(s))).collect()
    }

    /// Serves `bytes` to one client, then reads what the client makes of them.
    async fn fetch_from(bytes: Vec<u8>) -> Result<FetchedLog, FetchError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let _ = s.write_all(&bytes).await;
        });
        let mut frames = Frames {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: Vec::new(),
            start: 0,
            opener: Some(keys().dialer().1),
        };
        let log = receive_copy(&mut frames, &target()).await?;
        check_fetched(&target(), &log)?;
        Ok(log)
    }

    #[tokio::test]
    async fn whole_reply_is_accepted() {
        let log = fetch_from(reply(STORE, &good_records())).await.unwrap();
        assert_eq!(log.records.len(), 3);
        assert_eq!(log.last_seq, 7);
    }

    #[tokio::test]
    async fn reply_with_a_gap_is_refused() {
        let mut r = good_records();
        r.remove(1);
        let e = fetch_from(reply(STORE, &r)).await.unwrap_err();
        assert!(
            matches!(
                e,
                FetchError::Refused(FetchRefusal::Gap {
                    expected: 6,
                    found: 7
                })
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn reply_with_a_bad_crc_is_refused() {
        let mut r = good_records();
        r[2].2[70] ^= 1;
        let e = fetch_from(reply(STORE, &r)).await.unwrap_err();
        assert!(e.to_string().contains("CRC"), "{e}");
        assert!(
            matches!(
                e,
                FetchError::Refused(FetchRefusal::BadRecord { seq: 7, .. })
            ),
            "{e}"
        );
    }

    #[tokio::test]
    async fn reply_for_another_store_is_refused_before_any_record() {
        let e = fetch_from(reply([9; 16], &good_records()))
            .await
            .unwrap_err();
        assert!(
            matches!(e, FetchError::Refused(FetchRefusal::WrongStore { .. })),
            "{e}"
        );
        let e = fetch_from(reply([0; 16], &[])).await.unwrap_err();
        assert!(
            matches!(e, FetchError::Refused(FetchRefusal::NoCopy)),
            "{e}"
        );
    }

    #[tokio::test]
    async fn reply_sealed_for_another_connection_is_refused() {
        let other = SessionKeys::derive(b"0123456789abcdef", b"hello2", b"challenge", b"auth");
        let (mut seal, _) = other.acceptor();
        let mut out = Vec::new();
        Message::FetchRequest {
            volume: VOL,
            from_seq: 5,
        }
        .encode_with(&mut seal, &mut out);
        let e = fetch_from(out).await.unwrap_err();
        assert!(
            matches!(e, FetchError::Wire(WireError::BadFrameMac { seq: 0, .. })),
            "{e}"
        );
    }

    #[tokio::test]
    async fn reply_cut_short_is_an_error() {
        let mut r = good_records();
        r.pop();
        let e = fetch_from(reply(STORE, &r)).await.unwrap_err();
        assert!(matches!(e, FetchError::Closed), "{e}");
    }
}
