//! The transmission phase: one reader loop that parses and validates requests and polls each
//! small one once, one task per request that is large or (reads, flushes...) still waiting
//! after that poll, and one writer task that batches replies and completes the small writes
//! still waiting after that poll (see [`crate::pending`]).
//!
//! Memory per connection is bounded by a semaphore counted in bytes: every request takes what it
//! can allocate (`request_cost_bytes`: `REQUEST_OVERHEAD_BYTES` plus its payload for READ and
//! WRITE, the device's zero-fill scratch for TRIM and WRITE_ZEROES, the extent lists for
//! BLOCK_STATUS) before its payload is read or its task spawned, and gives it back once the
//! reply is in the socket buffer. A request the validator refuses is answered without allocating
//! its length; a refused `WRITE` has its payload skipped through a fixed buffer so the stream
//! stays in sync.
//!
//! Clients see NBD error codes with generic messages; the details (device errors name member
//! files) go to the log, rate-limited so a misbehaving client cannot flood it.
//!
//! When the connection is stopped (server shutdown, export removed), in-flight requests are
//! answered for at most the shutdown grace period; a client that stops reading cannot hold the
//! connection open past it.
//!
//! Validation (`check_request`) and charging (`request_cost_bytes`) are pure so each is
//! unit-tested.

use std::borrow::Cow;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::collections::VecDeque;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncBufRead, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};
use tracing::{debug, warn};

use crate::buffer::BufferPool;
use crate::device::{DeviceError, Extent, ZeroFlags};
use crate::error::ConnectionError;
use crate::export::ExportEntry;
use crate::handshake::{BlockLimits, Negotiated};
use crate::pending::{Intake, Pending, RequestFuture, ToWriter};
use crate::proto::*;
use crate::ratelimit::RefusalLogs;
use crate::readdata::ReadData;
use crate::reply::{self, Reply, ReplyBody, StatusDescriptor};

/// Budget charged for every request besides its payload (header, task, reply header).
pub const REQUEST_OVERHEAD_BYTES: u32 = 512;
/// Most extents one BLOCK_STATUS reply carries (the client asks again for the rest); bounds the
/// memory a block status request is charged for.
pub const BLOCK_STATUS_EXTENTS_MAX: usize = 4096;
/// Memory per extent of a block status request: the device's `Extent`, the clipped
/// descriptor, and its 8 bytes on the wire.
const BLOCK_STATUS_EXTENT_COST_BYTES: u32 =
    (std::mem::size_of::<Extent>() + std::mem::size_of::<StatusDescriptor>() + 8) as u32;

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

/// What the validator needs to know about the session.
#[derive(Debug, Clone, Copy)]
pub struct SessionLimits {
    pub size_bytes: u64,
    pub flags: u16,
    pub structured: bool,
    pub meta_context: Option<u32>,
    pub block: BlockLimits,
}

/// Why a request is refused: the NBD error and a message for the log / error chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    pub errno: u32,
    pub reason: &'static str,
}

fn reject(errno: u32, reason: &'static str) -> Result<Command, Rejection> {
    Err(Rejection { errno, reason })
}

/// Decides whether a request may run, following the spec's error choices: unknown commands and
/// flags `EINVAL`, writes to a read-only export `EPERM`, writes past the end `ENOSPC`, other
/// out-of-range or unaligned requests `EINVAL`, over-long payloads `EINVAL` (`EOVERFLOW` for a
/// structured read).
pub fn check_request(h: &RequestHeader, s: &SessionLimits) -> Result<Command, Rejection> {
    let cmd = match h.command {
        NBD_CMD_READ => Command::Read,
        NBD_CMD_WRITE => Command::Write,
        NBD_CMD_DISC => return Ok(Command::Disconnect),
        NBD_CMD_FLUSH => Command::Flush,
        NBD_CMD_TRIM => Command::Trim,
        NBD_CMD_CACHE => Command::Cache,
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
        NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
        _ => return reject(NBD_EINVAL, "unknown command"),
    };
    let has = |bit: u16| s.flags & bit != 0;

    let mut allowed = 0u16;
    if has(NBD_FLAG_SEND_FUA) {
        allowed |= NBD_CMD_FLAG_FUA;
    }
    match cmd {
        Command::Read if s.structured && has(NBD_FLAG_SEND_DF) => allowed |= NBD_CMD_FLAG_DF,
        Command::WriteZeroes => {
            allowed |= NBD_CMD_FLAG_NO_HOLE;
            if has(NBD_FLAG_SEND_FAST_ZERO) {
                allowed |= NBD_CMD_FLAG_FAST_ZERO;
            }
        }
        Command::BlockStatus => allowed |= NBD_CMD_FLAG_REQ_ONE,
        _ => {}
    }
    if h.flags & !allowed != 0 {
        return reject(NBD_EINVAL, "command flag not valid for this command");
    }

    let writes = matches!(cmd, Command::Write | Command::Trim | Command::WriteZeroes);
    if writes && has(NBD_FLAG_READ_ONLY) {
        return reject(NBD_EPERM, "export is read-only");
    }
    match cmd {
        Command::Flush if !has(NBD_FLAG_SEND_FLUSH) => {
            return reject(NBD_EINVAL, "flush not supported")
        }
        Command::Flush => return Ok(cmd),
        Command::Trim if !has(NBD_FLAG_SEND_TRIM) => {
            return reject(NBD_EINVAL, "trim not supported")
        }
        Command::WriteZeroes if !has(NBD_FLAG_SEND_WRITE_ZEROES) => {
            return reject(NBD_EINVAL, "write zeroes not supported")
        }
        Command::BlockStatus if s.meta_context.is_none() => {
            return reject(NBD_EINVAL, "no metadata context was negotiated")
        }
        _ => {}
    }

    if h.len == 0 {
        return reject(NBD_EINVAL, "zero-length request");
    }
    if matches!(cmd, Command::Read | Command::Write) && h.len > s.block.max_bytes {
        let errno = if cmd == Command::Read && s.structured {
            NBD_EOVERFLOW
        } else {
            NBD_EINVAL
        };
        return reject(errno, "request longer than the maximum payload");
    }
    let end = h.offset.checked_add(u64::from(h.len));
    if end.is_none_or(|end| end > s.size_bytes) {
        return match cmd {
            Command::Write | Command::WriteZeroes => {
                reject(NBD_ENOSPC, "write past the end of the export")
            }
            _ => reject(NBD_EINVAL, "request past the end of the export"),
        };
    }
    let min = u64::from(s.block.min_bytes);
    if min > 1 && cmd != Command::BlockStatus {
        let reaches_end = end == Some(s.size_bytes);
        if !h.offset.is_multiple_of(min) || (!u64::from(h.len).is_multiple_of(min) && !reaches_end)
        {
            return reject(NBD_EINVAL, "request not aligned to the minimum block size");
        }
    }
    Ok(cmd)
}

/// Maps a device failure to the NBD error the client sees.
pub fn device_errno(e: &DeviceError) -> u32 {
    match e {
        DeviceError::Io(io) => match io.raw_os_error() {
            Some(libc_errno::EPERM) | Some(libc_errno::EROFS) => NBD_EPERM,
            Some(libc_errno::ENOSPC) | Some(libc_errno::EDQUOT) | Some(libc_errno::EFBIG) => {
                NBD_ENOSPC
            }
            Some(libc_errno::ENOMEM) => NBD_ENOMEM,
            Some(libc_errno::EINVAL) => NBD_EINVAL,
            Some(libc_errno::ESHUTDOWN) => NBD_ESHUTDOWN,
            _ => NBD_EIO,
        },
        DeviceError::NoSpace => NBD_ENOSPC,
        DeviceError::ReadOnly => NBD_EPERM,
        DeviceError::NotSupported(_) => NBD_EINVAL,
        DeviceError::NotFast => NBD_ENOTSUP,
        DeviceError::ShuttingDown => NBD_ESHUTDOWN,
        DeviceError::Other(_) => NBD_EIO,
    }
}

/// The text a client gets with an error: generic, so no member path or internal detail leaves
/// the server (the log has the details).
pub fn client_message(errno: u32) -> &'static str {
    match errno {
        NBD_EPERM => "operation not permitted",
        NBD_EIO => "I/O error on the server",
        NBD_ENOMEM => "server out of memory",
        NBD_EINVAL => "invalid request",
        NBD_ENOSPC => "no space left",
        NBD_EOVERFLOW => "request too large",
        NBD_ENOTSUP => "operation not supported",
        NBD_ESHUTDOWN => "server is shutting down",
        _ => "request failed",
    }
}

/// Bytes of the in-flight budget a validated request is charged: what serving it can allocate.
/// Always at least `REQUEST_OVERHEAD_BYTES`, at most `max_inflight` (so any legal request can
/// be admitted, alone if need be).
pub fn request_cost_bytes(
    cmd: Command,
    len: u32,
    zero_scratch_bytes: u32,
    max_inflight: u32,
) -> u32 {
    let extra = match cmd {
        Command::Read | Command::Write => len,
        Command::Trim | Command::WriteZeroes => len.min(zero_scratch_bytes),
        Command::BlockStatus => {
            let extents = (len as usize).min(BLOCK_STATUS_EXTENTS_MAX) as u32;
            extents.saturating_mul(BLOCK_STATUS_EXTENT_COST_BYTES)
        }
        // CACHE only hints the device (page cache or nothing); FLUSH and DISC carry no data.
        Command::Cache | Command::Flush | Command::Disconnect => 0,
    };
    REQUEST_OVERHEAD_BYTES
        .saturating_add(extra)
        .min(max_inflight)
}

/// Linux errno values for mapping `std::io::Error`s (same numbers as the NBD ones where both exist).
mod libc_errno {
    pub const EPERM: i32 = 1;
    pub const ENOMEM: i32 = 12;
    pub const EINVAL: i32 = 22;
    pub const EFBIG: i32 = 27;
    pub const ENOSPC: i32 = 28;
    pub const EROFS: i32 = 30;
    pub const ESHUTDOWN: i32 = 108;
    pub const EDQUOT: i32 = 122;
}

/// Clips device extents to the request and turns them into wire descriptors: never past
/// `len`, no zero lengths, at most one with `REQ_ONE`, never more than the spec's cap, and at
/// least one (a single "allocated, unknown content" extent when the device gave nothing usable).
pub fn clip_extents(extents: &[Extent], len: u32, req_one: bool) -> Vec<StatusDescriptor> {
    let max = if req_one {
        1
    } else {
        BLOCK_STATUS_EXTENTS_MAX.min(MAX_BLOCK_STATUS_DESCRIPTORS)
    };
    let mut out = Vec::with_capacity(extents.len().min(max));
    let mut covered: u32 = 0;
    for e in extents {
        if out.len() == max || covered == len {
            break;
        }
        let length = e.length.min(len - covered);
        if length == 0 {
            continue;
        }
        let mut flags = 0;
        if e.hole {
            flags |= NBD_STATE_HOLE;
        }
        if e.zero {
            flags |= NBD_STATE_ZERO;
        }
        covered += length;
        out.push(StatusDescriptor { length, flags });
    }
    if out.is_empty() {
        out.push(StatusDescriptor {
            length: len,
            flags: 0,
        });
    }
    out
}

/// State shared by the reader and the per-request tasks of one connection.
struct Conn {
    entry: Arc<ExportEntry>,
    session: SessionLimits,
    inflight: Arc<Semaphore>,
    max_inflight: u32,
    zero_scratch_bytes: u32,
    replies: mpsc::UnboundedSender<ToWriter>,
    /// Requests admitted whose reply the writer has not encoded yet (see [`writer_loop`]).
    unanswered: Arc<AtomicUsize>,
    logs: Arc<RefusalLogs>,
}

impl Conn {
    /// Hands a reply to the writer. Every reply sent this way was counted in `unanswered`
    /// when its request was admitted ([`Conn::admit`]).
    fn reply(&self, reply: Reply) {
        let _ = self.replies.send(ToWriter::Reply(reply));
    }

    /// Hands a small request still waiting to the writer, which completes it and sends its
    /// reply. With the writer gone, the request finishes on a task of its own (its reply goes
    /// nowhere), as it would have had it been spawned.
    fn hand_over(&self, request: Pending) {
        if let Err(mpsc::error::SendError(ToWriter::Pending(request))) =
            self.replies.send(ToWriter::Pending(request))
        {
            request.detach();
        }
    }

    /// Counts a request whose reply will follow through [`Conn::reply`].
    fn admit(&self) {
        self.unanswered.fetch_add(1, Ordering::Relaxed);
    }
}

/// Per-connection bounds, from the server config.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    pub max_inflight_bytes: u32,
    /// How long a stopped connection may take to answer its in-flight requests.
    pub shutdown_grace: Duration,
}

/// How the reader loop ended without a protocol error.
#[derive(Debug, PartialEq, Eq)]
pub enum ReaderEnd {
    Disconnect,
    ClientClosed,
    WriterGone,
}

/// Runs the transmission phase until the client disconnects, a protocol error, or `stop`
/// resolves (export removed, server shutting down). In-flight requests are answered before the
/// socket is closed; once `stop` has resolved, for at most `limits.shutdown_grace`.
pub async fn run<R, W>(
    reader: &mut BufReader<R>,
    writer: W,
    negotiated: Negotiated,
    limits: ConnectionLimits,
    logs: Arc<RefusalLogs>,
    stop: impl std::future::Future<Output = ()>,
) -> Result<ReaderEnd, ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let session = SessionLimits {
        size_bytes: negotiated.entry.export.device.size(),
        flags: negotiated.flags,
        structured: negotiated.structured,
        meta_context: negotiated.meta_context,
        block: negotiated.limits,
    };
    let zero_scratch_bytes = negotiated.entry.export.device.caps().zero_scratch_bytes;
    let (tx, rx) = mpsc::unbounded_channel();
    let unanswered = Arc::new(AtomicUsize::new(0));
    let mut writer_task = tokio::spawn(writer_loop(
        writer,
        rx,
        negotiated.structured,
        Arc::clone(&unanswered),
    ));
    let conn = Arc::new(Conn {
        entry: negotiated.entry,
        session,
        inflight: Arc::new(Semaphore::new(limits.max_inflight_bytes as usize)),
        max_inflight: limits.max_inflight_bytes,
        zero_scratch_bytes,
        replies: tx,
        unanswered,
        logs,
    });
    tokio::pin!(stop);
    let mut stopped = false;
    let result = tokio::select! {
        r = reader_loop(reader, conn) => r,
        () = &mut stop => {
            debug!("connection stopped by the server");
            stopped = true;
            Ok(ReaderEnd::Disconnect)
        }
    };
    // The reader's sender is gone; the writer ends once every request task has replied. Once
    // the server wants the connection closed, that wait is bounded: a client that stopped
    // reading would otherwise hold it (and the server's shutdown) forever.
    let grace_over = async {
        if !stopped {
            stop.await;
        }
        tokio::time::sleep(limits.shutdown_grace).await;
    };
    tokio::select! {
        r = &mut writer_task => match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!("writing replies failed: {e}"),
            Err(e) => warn!("reply writer task failed: {e}"),
        },
        () = grace_over => {
            warn!(
                "replies not delivered {:?} after the connection was stopped (client not \
                 reading?); closing it",
                limits.shutdown_grace
            );
            writer_task.abort();
        }
    }
    result
}

async fn reader_loop<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    conn: Arc<Conn>,
) -> Result<ReaderEnd, ConnectionError> {
    let pool = Arc::new(BufferPool::default());
    loop {
        if conn.replies.is_closed() {
            return Ok(ReaderEnd::WriterGone);
        }
        let mut raw = [0u8; REQUEST_HEADER_BYTES];
        match reader.read_exact(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return Ok(ReaderEnd::ClientClosed);
            }
            Err(e) => return Err(ConnectionError::io("request header")(e)),
        }
        let h = RequestHeader::decode(&raw).map_err(ConnectionError::BadRequest)?;
        let cmd = match check_request(&h, &conn.session) {
            Ok(Command::Disconnect) => return Ok(ReaderEnd::Disconnect),
            Ok(cmd) => cmd,
            Err(rej) => {
                if let Some(suppressed) = conn.logs.requests.check() {
                    warn!(
                        export = %conn.entry.export.name,
                        command = h.command,
                        flags = h.flags,
                        offset = h.offset,
                        len = h.len,
                        errno = rej.errno,
                        suppressed,
                        "request refused: {}",
                        rej.reason
                    );
                }
                conn.entry.stats.error();
                if let Some(c) = command_of(h.command) {
                    conn.entry.stats.commands.refused(c);
                }
                if h.command == NBD_CMD_WRITE {
                    skip_payload(reader, &h).await?;
                }
                let permit = conn
                    .inflight
                    .clone()
                    .acquire_many_owned(REQUEST_OVERHEAD_BYTES)
                    .await
                    .ok();
                conn.admit();
                conn.reply(Reply {
                    cookie: h.cookie,
                    command: h.command,
                    body: ReplyBody::Error {
                        errno: rej.errno,
                        offset: None,
                        message: Cow::Borrowed(rej.reason),
                    },
                    permit,
                });
                continue;
            }
        };
        let payload = match cmd {
            Command::Read | Command::Write => h.len,
            _ => 0,
        };
        // The cost never exceeds the budget, so the acquire can always be satisfied.
        let cost = request_cost_bytes(cmd, h.len, conn.zero_scratch_bytes, conn.max_inflight);
        let permit = conn.inflight.clone().acquire_many_owned(cost).await.ok();
        let data = if cmd == Command::Write {
            Some(read_payload(reader, &h, &pool).await?)
        } else {
            None
        };
        conn.admit();
        let request_conn = Arc::clone(&conn);
        let mut request: RequestFuture = Box::pin(async move {
            let body = execute(&request_conn, &h, cmd, data).await;
            Reply {
                cookie: h.cookie,
                command: h.command,
                body,
                permit,
            }
        });
        // Most requests on a page-cache or journaled device finish without waiting: poll once
        // here and save a task spawn and a wake-up. A small write that does wait (for the
        // partner's ACK, a group commit, a member write) goes to the writer, which completes it
        // and sends its reply without a task of its own. Other requests that wait move to a
        // task of their own, so slow requests still overlap each other and the reading of the
        // next ones. Large requests always get a task: their first poll is the costly part (a
        // read's copy; a write's copy into NVRAM or into member images and its parity), and
        // doing it here would serialise it with the receiving of the next payloads on this
        // connection's reader while the other cores idle (see `polls_inline`).
        let inline = polls_inline(cmd, payload);
        let ready = if inline {
            std::future::poll_fn(|cx| {
                std::task::Poll::Ready(match request.as_mut().poll(cx) {
                    std::task::Poll::Ready(reply) => Some(reply),
                    std::task::Poll::Pending => None,
                })
            })
            .await
        } else {
            None
        };
        match ready {
            Some(reply) => conn.reply(reply),
            None if joins_writer(cmd, payload) => {
                conn.hand_over(Pending::new(h.cookie, h.command, request));
            }
            None => {
                let conn = Arc::clone(&conn);
                tokio::spawn(async move {
                    let reply = request.await;
                    conn.reply(reply);
                });
            }
        }
    }
}

/// Whether a request still waiting after its first poll is completed by the writer rather
/// than a task of its own: small writes, whose remaining work after the wait (the journal's
/// bookkeeping, the counters) is light. Reads and large requests keep their tasks: their
/// completion can be heavy (copies, parity) and must stay parallel across the runtime's
/// workers, not serialised on the writer.
fn joins_writer(cmd: Command, payload: u32) -> bool {
    cmd == Command::Write && polls_inline(cmd, payload)
}

/// Reads of at most this many bytes are first polled on the reader task (see the loop).
const INLINE_POLL_BYTES_MAX: u32 = 128 * 1024;

/// Writes of at most this many bytes are first polled on the reader task. Larger ones go to a
/// task at once: on the journaled RAID volume a 1 MiB write's first poll copies it into member
/// images and computes their parity (about as much CPU as receiving it), and done on the reader
/// that work held up the next request's receive, so a depth-8 stream of them ran on one core.
const INLINE_WRITE_BYTES_MAX: u32 = 128 * 1024;

/// Whether a request of `cmd` with `payload` bytes is polled once on the reader task before it
/// gets a task of its own (small requests mostly finish on that first poll).
fn polls_inline(cmd: Command, payload: u32) -> bool {
    match cmd {
        Command::Write => payload <= INLINE_WRITE_BYTES_MAX,
        _ => payload <= INLINE_POLL_BYTES_MAX,
    }
}

/// Reads a write payload into a pooled buffer. Bytes the reader already buffered (read ahead with
/// the header) are copied; the rest goes from the socket straight into the payload buffer.
async fn read_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    h: &RequestHeader,
    pool: &Arc<BufferPool>,
) -> Result<Bytes, ConnectionError> {
    let len = h.len as usize;
    let mut buf = pool.take(len);
    let buffered = reader.buffer();
    let from_buffer = buffered.len().min(len);
    buf.extend_from_slice(&buffered[..from_buffer]);
    std::pin::Pin::new(&mut *reader).consume(from_buffer);
    // Either the payload is complete or the read-ahead buffer is now empty, so reading from the
    // inner reader cannot skip buffered bytes.
    let inner = reader.get_mut();
    while buf.len() < len {
        let n = (&mut *inner)
            .take((len - buf.len()) as u64)
            .read_buf(&mut buf)
            .await
            .map_err(ConnectionError::io("write payload"))?;
        if n == 0 {
            return Err(ConnectionError::DisconnectedMidRequest {
                what: "write payload",
                cookie: h.cookie,
            });
        }
    }
    Ok(pool.freeze(buf))
}

/// Discards the payload of a refused write without buffering it.
async fn skip_payload<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    h: &RequestHeader,
) -> Result<(), ConnectionError> {
    let skipped = tokio::io::copy(
        &mut (&mut *reader).take(u64::from(h.len)),
        &mut tokio::io::sink(),
    )
    .await
    .map_err(ConnectionError::io("refused write payload"))?;
    if skipped != u64::from(h.len) {
        return Err(ConnectionError::DisconnectedMidRequest {
            what: "refused write payload",
            cookie: h.cookie,
        });
    }
    Ok(())
}

/// The command a wire command number names, if it is one this server knows.
pub fn command_of(wire: u16) -> Option<Command> {
    Some(match wire {
        NBD_CMD_READ => Command::Read,
        NBD_CMD_WRITE => Command::Write,
        NBD_CMD_DISC => Command::Disconnect,
        NBD_CMD_FLUSH => Command::Flush,
        NBD_CMD_TRIM => Command::Trim,
        NBD_CMD_CACHE => Command::Cache,
        NBD_CMD_WRITE_ZEROES => Command::WriteZeroes,
        NBD_CMD_BLOCK_STATUS => Command::BlockStatus,
        _ => return None,
    })
}

/// Runs a validated request on the device and records its metrics.
async fn execute(conn: &Conn, h: &RequestHeader, cmd: Command, data: Option<Bytes>) -> ReplyBody {
    let started = std::time::Instant::now();
    let body = run_on_device(conn, h, cmd, data).await;
    let failed = matches!(body, ReplyBody::Error { .. });
    let bytes = if cmd == Command::Flush { 0 } else { h.len };
    conn.entry
        .stats
        .commands
        .record(cmd, bytes, failed, started.elapsed());
    body
}

async fn run_on_device(
    conn: &Conn,
    h: &RequestHeader,
    cmd: Command,
    data: Option<Bytes>,
) -> ReplyBody {
    let device = &conn.entry.export.device;
    let stats = &conn.entry.stats;
    let fua = h.flags & NBD_CMD_FLAG_FUA != 0;
    let result = match cmd {
        Command::Read => match device.read_data(h.offset, h.len).await {
            Ok(data) if data.len() == h.len as usize => {
                stats.read(h.len);
                return ReplyBody::Data {
                    offset: h.offset,
                    data,
                };
            }
            Ok(data) => Err(DeviceError::Other(format!(
                "device returned {} bytes for a {}-byte read",
                data.len(),
                h.len
            ))),
            Err(e) => Err(e),
        },
        Command::Write => {
            let data = data.unwrap_or_default();
            let r = device.write(h.offset, data, fua).await;
            if r.is_ok() {
                stats.write(h.len);
            }
            r
        }
        Command::Flush => {
            stats.flush();
            device.flush().await
        }
        Command::Trim => {
            stats.trim();
            device.trim(h.offset, h.len, fua).await
        }
        Command::WriteZeroes => {
            stats.zero();
            let flags = ZeroFlags {
                may_trim: h.flags & NBD_CMD_FLAG_NO_HOLE == 0,
                fast: h.flags & NBD_CMD_FLAG_FAST_ZERO != 0,
                fua,
            };
            device.write_zeroes(h.offset, h.len, flags).await
        }
        Command::Cache => device.cache(h.offset, h.len).await,
        Command::BlockStatus => {
            stats.block_status();
            match device.block_status(h.offset, h.len).await {
                Ok(extents) => {
                    let req_one = h.flags & NBD_CMD_FLAG_REQ_ONE != 0;
                    return ReplyBody::BlockStatus {
                        // Validation refused block status without a context.
                        context_id: conn
                            .session
                            .meta_context
                            .unwrap_or(BASE_ALLOCATION_CONTEXT_ID),
                        descriptors: clip_extents(&extents, h.len, req_one),
                    };
                }
                Err(e) => Err(e),
            }
        }
        Command::Disconnect => Ok(()),
    };
    match result {
        Ok(()) => ReplyBody::Done,
        Err(e) => {
            let errno = device_errno(&e);
            // A refused fast zero is the expected answer, not a failure worth a warning.
            if errno == NBD_ENOTSUP {
                debug!(export = %conn.entry.export.name, offset = h.offset, len = h.len, "fast zero refused");
            } else if let Some(suppressed) = conn.logs.device_errors.check() {
                warn!(
                    export = %conn.entry.export.name,
                    command = h.command,
                    offset = h.offset,
                    len = h.len,
                    errno,
                    suppressed,
                    "device error: {e}"
                );
            }
            stats.error();
            ReplyBody::Error {
                errno,
                offset: (cmd == Command::Read).then_some(h.offset),
                message: Cow::Borrowed(client_message(errno)),
            }
        }
    }
}

/// Read payloads up to this size are copied next to their reply header; larger ones are
/// queued as their own buffer and written with one vectored write, never copied. Small: a 4 KiB
/// cache hit is a block the CPU has not touched lately, and copying it into the staging buffer
/// (only for the kernel to copy it again into the socket) was a tenth of the daemon's CPU on
/// resident 4 KiB random reads; an extra iovec costs far less.
const INLINE_PAYLOAD_BYTES: usize = 1 << 10;
/// Bytes queued before the writer writes even though more replies are waiting.
const WRITE_BATCH_BYTES: usize = 256 << 10;

/// Reply bytes waiting for the socket: staged headers and small payloads, plus large payloads
/// as shared `Bytes`, in order.
#[derive(Default)]
struct OutQueue {
    chunks: VecDeque<Bytes>,
    queued_bytes: usize,
}

impl Buf for OutQueue {
    fn remaining(&self) -> usize {
        self.queued_bytes
    }

    fn chunk(&self) -> &[u8] {
        self.chunks.front().map_or(&[], |c| &c[..])
    }

    fn chunks_vectored<'a>(&'a self, dst: &mut [std::io::IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (slot, c) in dst.iter_mut().zip(self.chunks.iter()) {
            *slot = std::io::IoSlice::new(c);
            n += 1;
        }
        n
    }

    fn advance(&mut self, mut cnt: usize) {
        // `cnt` never exceeds `remaining()` (the `Buf` contract); the loop stops at the end anyway.
        self.queued_bytes -= cnt.min(self.queued_bytes);
        while cnt > 0 {
            let Some(front) = self.chunks.front_mut() else {
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

/// Queues one read reply's payload after its header (already in `staging`): a small payload is
/// copied next to the header, a large one's pieces are queued by reference (a cache's blocks go
/// to the socket from the cache's own memory).
fn queue_payload(out: &mut OutQueue, staging: &mut BytesMut, payload: &ReadData) {
    let len = payload.len();
    if len <= INLINE_PAYLOAD_BYTES {
        for p in payload.pieces() {
            staging.extend_from_slice(p);
        }
        return;
    }
    let head = staging.split().freeze();
    out.queued_bytes += head.len() + len;
    out.chunks.push_back(head);
    out.chunks
        .extend(payload.pieces().iter().filter(|p| !p.is_empty()).cloned());
}

/// Most buffers handed to one vectored write (Linux takes up to 1024): a 1 MiB read of 4 KiB
/// cache blocks is 256 pieces, so a batch of them goes out in a few system calls.
const WRITE_IOVECS_MAX: usize = 512;

/// Queues of at most this many buffers are written from a small slice array. Most batches are
/// one staging buffer (write replies, small read replies) or a few; filling the
/// `WRITE_IOVECS_MAX` array (8 KiB of empty slices) for them cost about 1,500 instructions per
/// `writev`, an eighth of the daemon's user-space instructions per depth-1 write.
const WRITE_IOVECS_SMALL: usize = 8;

/// Writes everything queued, in vectored writes of up to `WRITE_IOVECS_MAX` buffers (tokio's
/// `write_all_buf` passes at most 64, which would split a 1 MiB reply of cache blocks into four
/// system calls).
async fn write_out<W: AsyncWrite + Unpin>(
    writer: &mut W,
    out: &mut OutQueue,
) -> std::io::Result<()> {
    while out.has_remaining() {
        let written = if out.chunks.len() <= WRITE_IOVECS_SMALL {
            write_some::<_, WRITE_IOVECS_SMALL>(writer, out).await?
        } else {
            write_some::<_, WRITE_IOVECS_MAX>(writer, out).await?
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        out.advance(written);
    }
    Ok(())
}

/// One vectored write of the first `N` queued buffers; returns the bytes written.
async fn write_some<W: AsyncWrite + Unpin, const N: usize>(
    writer: &mut W,
    out: &OutQueue,
) -> std::io::Result<usize> {
    let mut slices = [std::io::IoSlice::new(&[]); N];
    let n = out.chunks_vectored(&mut slices);
    writer.write_vectored(&slices[..n]).await
}

/// Whether the writer, having taken every reply queued so far, lets the other ready tasks run
/// once before writing: only when requests are still unanswered (their tasks may be about to
/// reply: a batch of member completions wakes several at once), it has not done so for this
/// batch yet, and the batch has room. One `writev` then carries several replies instead of one
/// each; a lone request (depth 1) never waits, so its latency is unchanged.
fn wait_for_more_replies(already_waited: bool, batch_bytes: usize, unanswered: usize) -> bool {
    !already_waited && unanswered > 0 && batch_bytes < WRITE_BATCH_BYTES
}

/// Writes replies as they arrive, batching: replies that are already queued are gathered
/// (headers and small payloads into one staging buffer, large payloads by reference) and sent
/// with vectored writes once the queue is empty (after one scheduler turn when more replies are
/// due, see [`wait_for_more_replies`]) or the batch is large. Small writes handed over by the
/// reader ([`crate::pending`]) are polled here: when one event (an ACK, a group commit) completes
/// several, this task is woken once and their replies share a batch. They are polled while a
/// batch is being written too, so a client slow to read its replies never holds up a request's
/// completion (the journal waits for it, e.g. before a CP). Budget permits are held until their
/// reply's bytes are in the socket. `unanswered` counts admitted requests whose reply has not
/// been encoded yet; the writer takes one off per reply.
async fn writer_loop<W: AsyncWrite + Unpin>(
    mut writer: W,
    rx: mpsc::UnboundedReceiver<ToWriter>,
    structured: bool,
    unanswered: Arc<AtomicUsize>,
) -> std::io::Result<()> {
    use std::task::Poll;
    // Dropped with this future (also when the task is aborted): what it still drives then
    // finishes on tasks of its own.
    let mut intake = Intake::new(rx);
    let mut staging = BytesMut::with_capacity(WRITE_BATCH_BYTES);
    let mut out = OutQueue::default();
    let mut permits = Vec::new();
    loop {
        // Until there is a reply to send, or nothing more can come (every sender, which every
        // request holds, is gone).
        let more = std::future::poll_fn(|cx| {
            intake.poll_intake(cx);
            if intake.has_ready() {
                Poll::Ready(true)
            } else if intake.finished() {
                Poll::Ready(false)
            } else {
                Poll::Pending
            }
        })
        .await;
        if !more {
            break;
        }
        let mut waited = false;
        loop {
            while let Some(mut r) = intake.pop_ready() {
                // Saturating: a refused reply sent before its count could be seen is harmless.
                let _ = unanswered.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                    Some(n.saturating_sub(1))
                });
                if let Some(p) = r.permit.take() {
                    permits.push(p);
                }
                if let Some(payload) = reply::encode(&r, structured, &mut staging) {
                    queue_payload(&mut out, &mut staging, payload);
                }
                if out.queued_bytes + staging.len() >= WRITE_BATCH_BYTES {
                    break;
                }
            }
            let batch_bytes = out.queued_bytes + staging.len();
            if !wait_for_more_replies(waited, batch_bytes, unanswered.load(Ordering::Relaxed)) {
                break;
            }
            waited = true;
            tokio::task::yield_now().await;
            std::future::poll_fn(|cx| {
                intake.poll_intake(cx);
                Poll::Ready(())
            })
            .await;
            if !intake.has_ready() {
                break;
            }
        }
        if !staging.is_empty() {
            let tail = staging.split().freeze();
            out.queued_bytes += tail.len();
            out.chunks.push_back(tail);
        }
        {
            let write = async {
                write_out(&mut writer, &mut out).await?;
                writer.flush().await
            };
            let mut write = std::pin::pin!(write);
            std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = write.as_mut().poll(cx) {
                    return Poll::Ready(r);
                }
                // Replies completed meanwhile wait in `intake` for the next batch.
                intake.poll_intake(cx);
                Poll::Pending
            })
            .await?;
        }
        permits.clear();
        // Reclaim the staging allocation once every frozen piece of it has been dropped.
        staging.reserve(WRITE_BATCH_BYTES);
    }
    writer.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn large_writes_skip_the_reader_poll_and_small_ones_keep_it() {
        assert!(polls_inline(Command::Write, 4096));
        assert!(polls_inline(Command::Write, INLINE_WRITE_BYTES_MAX));
        assert!(!polls_inline(Command::Write, INLINE_WRITE_BYTES_MAX + 1));
        assert!(!polls_inline(Command::Write, 1 << 20));
        assert!(polls_inline(Command::Read, 4096));
        assert!(!polls_inline(Command::Read, 1 << 20));
        assert!(polls_inline(Command::Flush, 0));
    }

    #[test]
    fn only_small_writes_are_completed_by_the_writer() {
        assert!(joins_writer(Command::Write, 4096));
        assert!(joins_writer(Command::Write, INLINE_WRITE_BYTES_MAX));
        assert!(!joins_writer(Command::Write, 1 << 20));
        assert!(!joins_writer(Command::Read, 4096));
        assert!(!joins_writer(Command::Flush, 0));
        assert!(!joins_writer(Command::Trim, 0));
    }

    const MIB: u64 = 1 << 20;

    fn session() -> SessionLimits {
        SessionLimits {
            size_bytes: MIB,
            flags: crate::handshake::transmission_flags(&crate::DeviceCaps::default(), true),
            structured: true,
            meta_context: Some(1),
            block: BlockLimits {
                min_bytes: 1,
                preferred_bytes: 4096,
                max_bytes: 32 << 20,
            },
        }
    }

    fn req(command: u16, flags: u16, offset: u64, len: u32) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            len,
        }
    }

    fn errno(h: RequestHeader, s: &SessionLimits) -> u32 {
        check_request(&h, s).unwrap_err().errno
    }

    #[test]
    fn valid_requests_map_to_commands() {
        let s = session();
        assert_eq!(
            check_request(&req(NBD_CMD_READ, 0, 0, 4096), &s),
            Ok(Command::Read)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 4096, 512), &s),
            Ok(Command::Write)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_FLUSH, 0, 0, 0), &s),
            Ok(Command::Flush)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_DISC, 0, 0, 0), &s),
            Ok(Command::Disconnect)
        );
        assert_eq!(
            check_request(
                &req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_NO_HOLE, 0, MIB as u32),
                &s
            ),
            Ok(Command::WriteZeroes)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_BLOCK_STATUS, NBD_CMD_FLAG_REQ_ONE, 0, 1), &s),
            Ok(Command::BlockStatus)
        );
        assert_eq!(
            check_request(&req(NBD_CMD_CACHE, 0, 0, 1), &s),
            Ok(Command::Cache)
        );
    }

    #[test]
    fn unknown_command_is_einval() {
        assert_eq!(errno(req(9, 0, 0, 1), &session()), NBD_EINVAL);
        assert_eq!(errno(req(0xffff, 0, 0, 1), &session()), NBD_EINVAL);
    }

    #[test]
    fn unknown_or_misplaced_flag_is_einval() {
        let s = session();
        assert_eq!(errno(req(NBD_CMD_READ, 1 << 9, 0, 1), &s), NBD_EINVAL);
        assert_eq!(
            errno(req(NBD_CMD_WRITE, NBD_CMD_FLAG_NO_HOLE, 0, 1), &s),
            NBD_EINVAL
        );
        assert_eq!(
            errno(req(NBD_CMD_READ, NBD_CMD_FLAG_REQ_ONE, 0, 1), &s),
            NBD_EINVAL
        );
        assert_eq!(
            errno(req(NBD_CMD_WRITE, NBD_CMD_FLAG_DF, 0, 1), &s),
            NBD_EINVAL
        );
    }

    #[test]
    fn df_needs_structured_replies() {
        let mut s = session();
        assert!(check_request(&req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), &s).is_ok());
        s.structured = false;
        s.flags &= !NBD_FLAG_SEND_DF;
        assert_eq!(
            errno(req(NBD_CMD_READ, NBD_CMD_FLAG_DF, 0, 1), &s),
            NBD_EINVAL
        );
    }

    #[test]
    fn fast_zero_needs_advertisement() {
        let s = session();
        assert_eq!(
            errno(req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 1), &s),
            NBD_EINVAL
        );
        let mut s2 = s;
        s2.flags |= NBD_FLAG_SEND_FAST_ZERO;
        assert!(check_request(
            &req(NBD_CMD_WRITE_ZEROES, NBD_CMD_FLAG_FAST_ZERO, 0, 1),
            &s2
        )
        .is_ok());
    }

    #[test]
    fn fua_refused_when_not_advertised() {
        let mut s = session();
        s.flags &= !NBD_FLAG_SEND_FUA;
        assert_eq!(
            errno(req(NBD_CMD_WRITE, NBD_CMD_FLAG_FUA, 0, 1), &s),
            NBD_EINVAL
        );
    }

    #[test]
    fn writes_past_end_are_enospc_and_reads_einval() {
        let s = session();
        assert_eq!(errno(req(NBD_CMD_WRITE, 0, MIB - 1, 2), &s), NBD_ENOSPC);
        assert_eq!(errno(req(NBD_CMD_WRITE_ZEROES, 0, MIB, 1), &s), NBD_ENOSPC);
        assert_eq!(errno(req(NBD_CMD_READ, 0, MIB, 1), &s), NBD_EINVAL);
        assert_eq!(errno(req(NBD_CMD_TRIM, 0, MIB - 1, 2), &s), NBD_EINVAL);
        assert_eq!(errno(req(NBD_CMD_BLOCK_STATUS, 0, MIB, 1), &s), NBD_EINVAL);
        assert_eq!(errno(req(NBD_CMD_CACHE, 0, MIB, 1), &s), NBD_EINVAL);
    }

    #[test]
    fn offset_overflow_is_refused_not_wrapped() {
        let s = session();
        assert_eq!(errno(req(NBD_CMD_READ, 0, u64::MAX, 4096), &s), NBD_EINVAL);
        assert_eq!(
            errno(req(NBD_CMD_WRITE, 0, u64::MAX - 1, 4), &s),
            NBD_ENOSPC
        );
    }

    #[test]
    fn over_max_payload_is_refused() {
        let mut s = session();
        s.size_bytes = u64::MAX;
        assert_eq!(
            errno(req(NBD_CMD_WRITE, 0, 0, (32 << 20) + 1), &s),
            NBD_EINVAL
        );
        assert_eq!(errno(req(NBD_CMD_READ, 0, 0, u32::MAX), &s), NBD_EOVERFLOW);
        s.structured = false;
        s.flags &= !NBD_FLAG_SEND_DF;
        assert_eq!(errno(req(NBD_CMD_READ, 0, 0, u32::MAX), &s), NBD_EINVAL);
        // Commands without payload may exceed the payload limit.
        assert!(check_request(&req(NBD_CMD_TRIM, 0, 0, u32::MAX), &s).is_ok());
    }

    #[test]
    fn zero_length_is_einval() {
        assert_eq!(errno(req(NBD_CMD_READ, 0, 0, 0), &session()), NBD_EINVAL);
        assert_eq!(errno(req(NBD_CMD_WRITE, 0, 0, 0), &session()), NBD_EINVAL);
    }

    #[test]
    fn unaligned_requests_are_einval_when_min_block_is_set() {
        let mut s = session();
        s.block.min_bytes = 512;
        assert_eq!(errno(req(NBD_CMD_READ, 0, 100, 512), &s), NBD_EINVAL);
        assert_eq!(errno(req(NBD_CMD_WRITE, 0, 512, 100), &s), NBD_EINVAL);
        assert!(check_request(&req(NBD_CMD_WRITE, 0, 512, 1024), &s).is_ok());
        // Block status lengths are only a hint.
        assert!(check_request(&req(NBD_CMD_BLOCK_STATUS, 0, 0, 100), &s).is_ok());
    }

    #[test]
    fn read_only_export_refuses_writes_with_eperm() {
        let mut s = session();
        s.flags = crate::handshake::transmission_flags(
            &crate::DeviceCaps {
                read_only: true,
                ..Default::default()
            },
            true,
        );
        assert_eq!(errno(req(NBD_CMD_WRITE, 0, 0, 1), &s), NBD_EPERM);
        assert_eq!(errno(req(NBD_CMD_TRIM, 0, 0, 1), &s), NBD_EPERM);
        assert_eq!(errno(req(NBD_CMD_WRITE_ZEROES, 0, 0, 1), &s), NBD_EPERM);
        assert!(check_request(&req(NBD_CMD_READ, 0, 0, 1), &s).is_ok());
    }

    #[test]
    fn block_status_without_context_is_einval() {
        let mut s = session();
        s.meta_context = None;
        assert_eq!(errno(req(NBD_CMD_BLOCK_STATUS, 0, 0, 1), &s), NBD_EINVAL);
    }

    #[test]
    fn unadvertised_commands_are_einval() {
        let mut s = session();
        s.flags = NBD_FLAG_HAS_FLAGS;
        assert_eq!(errno(req(NBD_CMD_FLUSH, 0, 0, 0), &s), NBD_EINVAL);
        assert_eq!(errno(req(NBD_CMD_TRIM, 0, 0, 1), &s), NBD_EINVAL);
        assert_eq!(errno(req(NBD_CMD_WRITE_ZEROES, 0, 0, 1), &s), NBD_EINVAL);
    }

    #[test]
    fn extents_are_clipped_to_request() {
        let e = |length, hole| Extent {
            length,
            hole,
            zero: hole,
        };
        let d = clip_extents(&[e(100, true), e(1000, false)], 500, false);
        assert_eq!(
            d,
            vec![
                StatusDescriptor {
                    length: 100,
                    flags: NBD_STATE_HOLE | NBD_STATE_ZERO
                },
                StatusDescriptor {
                    length: 400,
                    flags: 0
                },
            ]
        );
        assert_eq!(
            clip_extents(&[e(100, true), e(1000, false)], 500, true).len(),
            1
        );
        assert_eq!(
            clip_extents(&[e(0, true)], 7, false),
            vec![StatusDescriptor {
                length: 7,
                flags: 0
            }]
        );
        assert_eq!(clip_extents(&[], 7, true).len(), 1);
    }

    #[test]
    fn out_queue_advances_across_chunks() {
        let mut q = OutQueue::default();
        for c in [&b"abc"[..], b"defgh", b"ij"] {
            q.queued_bytes += c.len();
            q.chunks.push_back(Bytes::copy_from_slice(c));
        }
        let mut slices = [std::io::IoSlice::new(&[]); 4];
        assert_eq!(q.chunks_vectored(&mut slices), 3);
        q.advance(4);
        assert_eq!((q.remaining(), q.chunk()), (6, &b"efgh"[..]));
        q.advance(4);
        assert_eq!(q.chunk(), b"ij");
        q.advance(2);
        assert_eq!((q.remaining(), q.chunk()), (0, &b""[..]));
    }

    fn data_reply(cookie: u64, pieces: Vec<Bytes>) -> Reply {
        Reply {
            cookie,
            command: NBD_CMD_READ,
            body: ReplyBody::Data {
                offset: 0,
                data: ReadData::from(pieces),
            },
            permit: None,
        }
    }

    /// A connection's writer task on `server` (simple replies, nothing unanswered yet) and the
    /// channel that feeds it.
    fn spawn_writer(
        server: tokio::io::DuplexStream,
    ) -> (
        mpsc::UnboundedSender<ToWriter>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = tokio::spawn(writer_loop(
            server,
            rx,
            false,
            Arc::new(AtomicUsize::new(0)),
        ));
        (tx, writer)
    }

    /// Replies made of many pieces (more than one vectored write takes, and small ones that
    /// are copied next to their header) reach the socket whole and in order.
    #[tokio::test]
    async fn writer_sends_every_piece_of_read_replies_in_order() {
        let (client, server) = tokio::io::duplex(64 << 10);
        let (tx, writer) = spawn_writer(server);
        let piece = |i: usize, len: usize| Bytes::from(vec![(i % 251) as u8; len]);
        let big: Vec<Bytes> = (0..WRITE_IOVECS_MAX + 100)
            .map(|i| piece(i, 4096))
            .collect();
        let small: Vec<Bytes> = (0..3).map(|i| piece(i + 7, 100)).collect();
        let mut want = Vec::new();
        for (cookie, pieces) in [(1u64, &big), (2, &small), (3, &big)] {
            let mut head = BytesMut::new();
            put_simple_reply(&mut head, 0, cookie);
            want.extend_from_slice(&head);
            for p in pieces.iter() {
                want.extend_from_slice(p);
            }
            let _ = tx.send(ToWriter::Reply(data_reply(cookie, pieces.clone())));
        }
        drop(tx);
        let mut got = Vec::new();
        let mut client = client;
        client.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got.len(), want.len());
        assert!(
            got == want,
            "reply bytes differ from header + pieces in order"
        );
    }

    /// A handed-over write finishes (the journal may be waiting for it, e.g. before a CP) even
    /// while the writer cannot write: its client is not reading.
    #[tokio::test]
    async fn handed_over_requests_complete_while_the_socket_is_full() {
        use std::sync::atomic::AtomicBool;
        let (client, server) = tokio::io::duplex(1024);
        let (tx, writer) = spawn_writer(server);
        let big = vec![Bytes::from(vec![1u8; 256 << 10])];
        let _ = tx.send(ToWriter::Reply(data_reply(1, big)));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let finished = Arc::new(AtomicBool::new(false));
        let done = Arc::clone(&finished);
        let _ = tx.send(ToWriter::Pending(Pending::new(
            2,
            NBD_CMD_WRITE,
            Box::pin(async move {
                let _ = wait.await;
                done.store(true, Ordering::SeqCst);
                Reply {
                    cookie: 2,
                    command: NBD_CMD_WRITE,
                    body: ReplyBody::Done,
                    permit: None,
                }
            }),
        )));
        tokio::time::sleep(Duration::from_millis(20)).await;
        let _ = go.send(());
        for _ in 0..200 {
            if finished.load(Ordering::SeqCst) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(
            finished.load(Ordering::SeqCst),
            "the request waited for the socket"
        );
        assert!(!writer.is_finished());
        drop(client);
        drop(tx);
        let _ = writer.await;
    }

    /// Queues on both sides of the small-array bound (and past one vectored write's limit)
    /// are written whole and in order, also when the socket takes a few bytes at a time.
    #[tokio::test]
    async fn write_out_sends_queues_of_every_length_in_order() {
        for count in [
            1,
            WRITE_IOVECS_SMALL - 1,
            WRITE_IOVECS_SMALL,
            WRITE_IOVECS_SMALL + 1,
            WRITE_IOVECS_MAX + 3,
        ] {
            let mut out = OutQueue::default();
            let mut want = Vec::new();
            for i in 0..count {
                let chunk = Bytes::from(vec![(i % 251) as u8; 1 + i % 7]);
                want.extend_from_slice(&chunk);
                out.queued_bytes += chunk.len();
                out.chunks.push_back(chunk);
            }
            let (mut client, mut server) = tokio::io::duplex(5);
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                client.read_to_end(&mut got).await.map(|_| got)
            });
            write_out(&mut server, &mut out).await.unwrap();
            drop(server);
            let got = reader.await.unwrap().unwrap();
            assert!(got == want, "{count} chunks: bytes differ");
            assert_eq!(out.remaining(), 0);
            assert!(out.chunks.is_empty());
        }
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
        let queued: Vec<*const u8> = out.chunks.iter().skip(1).map(|c| c.as_ptr()).collect();
        assert_eq!(queued, ptrs, "pieces were copied");
        assert!(staging.is_empty());
    }

    #[test]
    fn a_4k_cache_hit_is_queued_by_reference_not_copied() {
        let mut out = OutQueue::default();
        let mut staging = BytesMut::new();
        put_simple_reply(&mut staging, 0, 9);
        let block = Bytes::from(vec![3u8; 4096]);
        let ptr = block.as_ptr();
        queue_payload(&mut out, &mut staging, &ReadData::from(block));
        assert_eq!(out.chunks.len(), 2, "the header, then the block");
        assert_eq!(out.chunks[1].as_ptr(), ptr, "the block was copied");
        assert_eq!(out.remaining(), SIMPLE_REPLY_HEADER_BYTES + 4096);
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

    #[test]
    fn writer_waits_once_for_replies_still_due() {
        assert!(wait_for_more_replies(false, 64, 3));
        assert!(!wait_for_more_replies(true, 64, 3), "only once per batch");
    }

    #[test]
    fn writer_never_waits_with_nothing_unanswered() {
        // Depth 1: the only request has replied; waiting would only add latency.
        assert!(!wait_for_more_replies(false, 64, 0));
    }

    #[test]
    fn writer_does_not_wait_with_a_full_batch() {
        assert!(!wait_for_more_replies(false, WRITE_BATCH_BYTES, 5));
    }

    #[test]
    fn device_errors_map_to_nbd_errors() {
        assert_eq!(device_errno(&DeviceError::NoSpace), NBD_ENOSPC);
        assert_eq!(device_errno(&DeviceError::NotFast), NBD_ENOTSUP);
        assert_eq!(device_errno(&DeviceError::ReadOnly), NBD_EPERM);
        assert_eq!(device_errno(&DeviceError::ShuttingDown), NBD_ESHUTDOWN);
        assert_eq!(
            device_errno(&DeviceError::Io(std::io::Error::from_raw_os_error(
                libc_errno::EDQUOT
            ))),
            NBD_ENOSPC
        );
        assert_eq!(
            device_errno(&DeviceError::Io(std::io::Error::other("x"))),
            NBD_EIO
        );
    }
}
