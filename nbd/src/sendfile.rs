//! Sending reply bytes to a plain socket with the system calls `AsyncWrite` does not offer:
//! `sendfile` for read data the page cache holds, and `sendmsg(MSG_MORE)` for the header
//! before it.
//!
//! `sendfile` from a file to a TCP or Unix socket hands the page-cache pages themselves to the
//! socket: the server copies nothing, where reading into a buffer and writing that buffer costs
//! two copies of every byte (page cache to buffer, buffer to socket). For a 1 MiB read that is
//! most of the server's CPU time per request. The header goes first with `MSG_MORE`, so the
//! kernel holds it for the data instead of sending a 16-byte segment of its own.
//!
//! Both calls run on the socket's non-blocking descriptor under tokio's readiness: a full socket
//! buffer answers `EAGAIN` and the writer waits until the socket is writable again. The file side
//! is not non-blocking (`sendfile` has no `RWF_NOWAIT`): a page evicted since the device checked
//! the range was resident is read from the disk inside the call, on the writer's thread.
//!
//! The only `unsafe` code is the two system calls; see their comments.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, RawFd};

use tokio::io::Interest;

use crate::readdata::FileRange;
use crate::transport::SocketRef;

/// Most bytes one `sendfile` call may be asked for (Linux caps a call at 2 GiB minus a page).
const SENDFILE_CALL_BYTES_MAX: usize = 0x7fff_f000;

/// Runs `op` on the socket's descriptor once the socket is writable, again after every
/// `EAGAIN`, and returns its first other result.
async fn when_writable<F>(sock: SocketRef<'_>, mut op: F) -> io::Result<usize>
where
    F: FnMut(RawFd) -> io::Result<usize>,
{
    loop {
        let result = match sock {
            SocketRef::Tcp(s) => {
                s.writable().await?;
                s.try_io(Interest::WRITABLE, || op(s.as_raw_fd()))
            }
            SocketRef::Unix(s) => {
                s.writable().await?;
                s.try_io(Interest::WRITABLE, || op(s.as_raw_fd()))
            }
        };
        match result {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Sends the whole of `range` from the page cache to `sock`.
pub async fn send_file(sock: SocketRef<'_>, range: &FileRange) -> io::Result<()> {
    let in_fd = range.file.as_raw_fd();
    let end = range
        .offset
        .checked_add(range.len as u64)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "file range runs past 2^64"))?;
    let mut offset = range.offset;
    while offset < end {
        let want = ((end - offset) as usize).min(SENDFILE_CALL_BYTES_MAX);
        let mut off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset beyond off_t"))?;
        let sent = when_writable(sock, |out_fd| {
            // SAFETY: both descriptors are open for the call (`range.file` and the socket are
            // borrowed for it); `off` is a live local the kernel reads and advances.
            let n = unsafe { libc::sendfile(out_fd, in_fd, &mut off, want) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        })
        .await?;
        if sent == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!(
                    "file ended at offset {offset}, before the {} bytes of a read reply were sent",
                    end - offset
                ),
            ));
        }
        offset += sent as u64;
    }
    Ok(())
}

/// Writes some of `slices` to `sock` with `MSG_MORE` (more of this reply follows at once);
/// returns how many bytes went.
pub async fn send_more(sock: SocketRef<'_>, slices: &[IoSlice<'_>]) -> io::Result<usize> {
    when_writable(sock, |fd| {
        // SAFETY: an all-zero msghdr is a valid empty message; it is then pointed at `slices`,
        // whose `IoSlice`s have the layout of `iovec` (std guarantees it on Unix) and stay
        // borrowed, unmodified, for the call. The kernel only reads them.
        let n = unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = slices.as_ptr() as *mut libc::iovec;
            msg.msg_iovlen = slices.len() as _;
            libc::sendmsg(fd, &msg, libc::MSG_MORE | libc::MSG_NOSIGNAL)
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    })
    .await
}
