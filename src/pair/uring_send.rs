//! The interconnect's io_uring sender: each batch goes to the kernel as one SENDMSG whose
//! iovecs point straight at the batch's segments (frame heads, and each record's bytes as the
//! journal copied them for shipping). This module holds all the `unsafe` of the mirror.
//!
//! # Where the bytes come from, and why not from the NVRAM mapping itself
//!
//! The record bytes sent are the journal's per-record `Bytes` copy, made under the journal's lock
//! when the record is appended, not the NVRAM mapping. Sending from the mapping would need the
//! record's log space to stay unchanged until the send completes, and the journal does not promise
//! that: a CP does not free space of records still *being shipped*, but shipping ends when the
//! writer's `MirrorHook::ship` returns, which is at the partner's ACK *or* at the bounded wait's
//! timeout, at once while the mirror is out of sync (the resync queue still holds the record
//! then), or when the writer's future is cancelled. After any of these a CP may retire the record
//! and new records may overwrite its space while a send from the mapping is still queued. The
//! reference-counted copy has no such window, and costs no copy on the send path: the kernel copies
//! from it into the socket buffer as it would from the mapping.
//!
//! # The invariant the `unsafe` relies on
//!
//! While a SENDMSG is in the kernel (from its push until its completion is reaped), everything it
//! points to — the `msghdr`, the iovec array, and every segment of the batch — is owned by
//! `UringSender::inflight` (a `Box`, so it does not move), and nothing else touches it. The
//! async `send` moves the batch into `inflight` before pushing and takes it back only after the
//! completion arrived; if the `send` future is dropped in between, the batch stays in `inflight`.
//! Dropping the sender with an operation in flight shuts the socket down (so the send ends at
//! once), cancels it, and waits for its completion; if none comes within
//! [`DROP_WAIT_FOR_COMPLETION_MS`], the in-flight memory is leaked rather than freed. The socket
//! itself (`OwnedWriteHalf`) is a field of the sender, so its descriptor stays open as long as
//! the ring may name it.

use std::fs::File;
use std::io::{self, Read as _};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use io_uring::{opcode, types, IoUring, Probe};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::net::tcp::OwnedWriteHalf;

use super::send_batch::{Cursor, SendBatch, SEND_IOVECS_MAX};

/// Submission queue entries: one SENDMSG, and a cancel at teardown.
const RING_ENTRIES: u32 = 4;
/// `user_data` of the SENDMSG.
const SEND_TOKEN: u64 = 1;
/// `user_data` of the cancel at teardown.
const CANCEL_TOKEN: u64 = 2;
/// How long dropping the sender waits for an in-flight send to complete before leaking it.
pub const DROP_WAIT_FOR_COMPLETION_MS: u64 = 1000;

/// What the kernel may read while a send is in flight (see the module docs).
struct InFlight {
    batch: SendBatch,
    iov: Vec<libc::iovec>,
    msg: libc::msghdr,
}

// SAFETY: the raw pointers in `iov` and `msg` point into the batch and the iovec array owned by
// this same value; moving it to another thread moves them together.
unsafe impl Send for InFlight {}

/// One outgoing connection's io_uring.
pub struct UringSender {
    ring: IoUring,
    /// Signalled by the ring at every completion (registered eventfd), awaited through tokio.
    completions: AsyncFd<File>,
    inflight: Option<Box<InFlight>>,
    /// The last send's `InFlight` (its iovec array's capacity kept), reused by the next send:
    /// no allocation of the iovec array (16 KiB) per send.
    spare: Option<Box<InFlight>>,
    wr: OwnedWriteHalf,
}

fn eventfd() -> io::Result<File> {
    // SAFETY: plain syscall; the result is checked before it is used as a descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

impl UringSender {
    /// A ring for the socket `wr`; on failure (io_uring disabled, SENDMSG not supported) the
    /// write half comes back with the reason, for the tokio fallback.
    pub fn new(wr: OwnedWriteHalf) -> Result<UringSender, (OwnedWriteHalf, String)> {
        match Self::ring() {
            Ok((ring, completions)) => Ok(UringSender {
                ring,
                completions,
                inflight: None,
                spare: None,
                wr,
            }),
            Err(e) => Err((wr, e)),
        }
    }

    fn ring() -> Result<(IoUring, AsyncFd<File>), String> {
        let mut ring = IoUring::new(RING_ENTRIES).map_err(|e| format!("io_uring_setup: {e}"))?;
        let mut probe = Probe::new();
        ring.submitter()
            .register_probe(&mut probe)
            .map_err(|e| format!("probing io_uring opcodes: {e}"))?;
        if !probe.is_supported(opcode::SendMsg::CODE) {
            return Err("the kernel's io_uring has no SENDMSG".into());
        }
        let efd = eventfd().map_err(|e| format!("eventfd: {e}"))?;
        ring.submitter()
            .register_eventfd(efd.as_raw_fd())
            .map_err(|e| format!("registering the completion eventfd: {e}"))?;
        // Signalled only while a send waits (see `wait_send`).
        ring.completion().disable_eventfd();
        // SAFETY: `efd` is an open eventfd owned by the `File` the AsyncFd takes over; a `File`
        // always reports the descriptor it was made from, and closes it only when dropped.
        let completions = unsafe { AsyncFd::register_with_interest(efd, Interest::READABLE) }
            .map_err(|e| format!("eventfd with tokio: {e}"))?;
        Ok((ring, completions))
    }

    /// The socket, when no SENDMSG is in flight on it (a direct send may then write to it).
    pub fn idle_socket(&self) -> Option<&OwnedWriteHalf> {
        self.inflight.is_none().then_some(&self.wr)
    }

    /// Sends every byte of `batch` from `at` on (resubmitting after short sends); hands it back
    /// for reuse.
    pub async fn send(&mut self, batch: SendBatch, mut at: Cursor) -> io::Result<SendBatch> {
        if self.inflight.is_some() {
            // A previous send's future was dropped mid-flight: the stream position is unknown.
            return Err(io::Error::other(
                "an earlier interconnect send was abandoned in flight; reconnect",
            ));
        }
        let mut op = match self.spare.take() {
            Some(mut op) => {
                op.batch = batch;
                op
            }
            None => Box::new(InFlight {
                batch,
                iov: Vec::with_capacity(SEND_IOVECS_MAX),
                // SAFETY: `msghdr` is plain data; all zero is a valid empty header.
                msg: unsafe { std::mem::zeroed() },
            }),
        };
        while !op.batch.done(at) {
            let InFlight { batch, iov, msg } = &mut *op;
            iov.clear();
            iov.extend(batch.slices_from(at).map(|s| libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            }));
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = iov.len() as _;
            let entry = opcode::SendMsg::new(types::Fd(self.wr.as_ref().as_raw_fd()), &op.msg)
                .flags(libc::MSG_NOSIGNAL as u32)
                .build()
                .user_data(SEND_TOKEN);
            self.inflight = Some(op);
            // SAFETY: the SQE points at `self.inflight`'s msghdr, iovecs and batch, which stay
            // there, unmoved and untouched, until `wait_send` reaped the completion (module docs).
            let pushed = unsafe { self.ring.submission().push(&entry) };
            if pushed.is_err() {
                self.inflight = None; // never reached the kernel
                return Err(io::Error::other("io_uring submission queue full"));
            }
            self.ring.submit()?;
            let res = self.wait_send().await?;
            op = self.take_inflight()?;
            if res == -libc::EAGAIN || res == -libc::EINTR {
                // A non-blocking socket with a full send buffer: wait until it drains. tokio
                // never saw this socket block, so clear its cached readiness first.
                let tcp = self.wr.as_ref();
                let _ = tcp.try_io(Interest::WRITABLE, || {
                    Err::<(), _>(io::ErrorKind::WouldBlock.into())
                });
                tcp.writable().await?;
                continue;
            }
            if res < 0 {
                return Err(io::Error::from_raw_os_error(-res));
            }
            if res == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            op.batch.advance(&mut at, res as usize);
        }
        // The kernel is done with `op` (its completion was reaped): keep it for the next send.
        let batch = std::mem::take(&mut op.batch);
        op.iov.clear();
        self.spare = Some(op);
        Ok(batch)
    }

    fn take_inflight(&mut self) -> io::Result<Box<InFlight>> {
        self.inflight
            .take()
            .ok_or_else(|| io::Error::other("io_uring send state lost"))
    }

    /// Waits for the SENDMSG's completion; its result (bytes sent, or a negative errno).
    ///
    /// A send on a socket with buffer space completes inside `submit` (loopback and most LAN
    /// sends), so the completion is usually there at the first look. The ring's eventfd is
    /// enabled only for a send that did not complete at once: an eventfd signal per send would
    /// wake tokio's I/O driver (often parked on the other core) for nothing, once per send.
    async fn wait_send(&mut self) -> io::Result<i32> {
        loop {
            if let Some(res) = self.reap(SEND_TOKEN) {
                return Ok(res);
            }
            // Enabled, then looked at again: a completion posted before the enable is found by
            // this look, one posted after it signals the eventfd.
            self.ring.completion().enable_eventfd();
            if let Some(res) = self.reap(SEND_TOKEN) {
                self.ring.completion().disable_eventfd();
                return Ok(res);
            }
            let waited = self.completions.readable().await;
            self.ring.completion().disable_eventfd();
            let mut guard = waited?;
            let mut buf = [0u8; 8];
            match guard.try_io(|f| f.get_ref().read(&mut buf)) {
                Ok(Ok(_)) | Err(_) => {}
                Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(Err(e)) => return Err(e),
            }
        }
    }

    /// The result of the completion with `token`, if it arrived (others are discarded).
    fn reap(&mut self, token: u64) -> Option<i32> {
        let mut found = None;
        for cqe in self.ring.completion() {
            if cqe.user_data() == token {
                found = Some(cqe.result());
            }
        }
        found
    }
}

impl Drop for UringSender {
    fn drop(&mut self) {
        let Some(op) = self.inflight.take() else {
            return;
        };
        // SAFETY: plain syscall on the socket this sender owns; the connection is being torn
        // down, and shutting it down ends the pending send.
        unsafe { libc::shutdown(self.wr.as_ref().as_raw_fd(), libc::SHUT_RDWR) };
        let cancel = opcode::AsyncCancel::new(SEND_TOKEN)
            .build()
            .user_data(CANCEL_TOKEN);
        // SAFETY: a cancel SQE points at no memory.
        let _ = unsafe { self.ring.submission().push(&cancel) };
        let deadline = Instant::now() + Duration::from_millis(DROP_WAIT_FOR_COMPLETION_MS);
        while Instant::now() < deadline {
            let _ = self.ring.submit();
            if self.reap(SEND_TOKEN).is_some() {
                return; // `op` is freed here: the kernel is done with it.
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        tracing::warn!("an interconnect send did not complete after the socket was shut down; leaking its buffers");
        std::mem::forget(op);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use tokio::io::AsyncReadExt;
    use twinblock_pair::wire::Plain;

    /// A sender on one end of a loopback connection (with its read half, kept open), the other
    /// end's stream.
    async fn sender() -> Option<(
        UringSender,
        tokio::net::tcp::OwnedReadHalf,
        tokio::net::TcpStream,
    )> {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let a = tokio::net::TcpStream::connect(l.local_addr().unwrap());
        let (a, b) = tokio::join!(a, l.accept());
        let (rd, wr) = a.unwrap().into_split();
        match UringSender::new(wr) {
            Ok(u) => Some((u, rd, b.unwrap().0)),
            Err((_, why)) => {
                eprintln!("skipped: io_uring unavailable here: {why}");
                None
            }
        }
    }

    /// Reads the completion eventfd's counter without waiting (0 when it was never signalled).
    fn eventfd_count(u: &UringSender) -> u64 {
        let mut buf = [0u8; 8];
        match u.completions.get_ref().read(&mut buf) {
            Ok(8) => u64::from_ne_bytes(buf),
            Ok(n) => panic!("eventfd read {n} bytes"),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
            Err(e) => panic!("eventfd read: {e}"),
        }
    }

    #[tokio::test]
    async fn send_completed_at_once_does_not_signal_the_eventfd() {
        let Some((mut u, _rd, mut peer)) = sender().await else {
            return;
        };
        for seq in 1..=3u64 {
            let mut b = SendBatch::new();
            b.record(&mut Plain, 1, 0, seq, &Bytes::from(vec![seq as u8; 4096]));
            let want = b.bytes();
            u.send(b, Cursor::default()).await.unwrap();
            let mut got = vec![0u8; want];
            peer.read_exact(&mut got).await.unwrap();
        }
        assert_eq!(
            eventfd_count(&u),
            0,
            "a send the socket took at once woke the eventfd (and tokio's I/O driver)"
        );
    }
}
