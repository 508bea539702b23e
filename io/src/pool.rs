//! Thread-pool member I/O: the fallback when the kernel refuses io_uring (old kernel, seccomp
//! filter, `kernel.io_uring_disabled`).
//!
//! Each operation is one blocking `pread`/`pwrite`/`fdatasync`/`fallocate` run on tokio's blocking
//! pool (`spawn_blocking`), so these functions must be called from inside a tokio runtime. The
//! functions take the file as `Arc<File>` so the descriptor stays open for as long as the blocking
//! call runs, even if the caller's future is dropped. Errors are returned raw; `file` adds the
//! path and offset.

use crate::buf::AlignedBuf;
use bytes::Bytes;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

/// `fallocate` mode that deallocates a range without changing the file size.
pub const PUNCH_HOLE_MODE: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> io::Result<T> + Send + 'static,
) -> io::Result<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(join_error) => Err(io::Error::other(format!(
            "blocking I/O task failed: {join_error}"
        ))),
    }
}

/// Read exactly `len` bytes at `offset` into a fresh aligned buffer. Reaching end of file first
/// is an `UnexpectedEof` error.
pub async fn read(file: Arc<File>, offset: u64, len: usize) -> io::Result<AlignedBuf> {
    blocking(move || {
        let mut buf = AlignedBuf::zeroed(len);
        // `read_exact_at` loops over short reads and EINTR, and reports EOF as UnexpectedEof.
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    })
    .await
}

/// Write all of `data` at `offset`.
pub async fn write(file: Arc<File>, offset: u64, data: Bytes) -> io::Result<()> {
    blocking(move || file.write_all_at(&data, offset)).await
}

/// `fdatasync`.
pub async fn fdatasync(file: Arc<File>) -> io::Result<()> {
    blocking(move || file.sync_data()).await
}

/// `fallocate(fd, mode, offset, len)`.
pub async fn fallocate(file: Arc<File>, offset: u64, len: u64, mode: i32) -> io::Result<()> {
    blocking(move || fallocate_blocking(&file, offset, len, mode)).await
}

/// Blocking `fallocate`, also used by `file` when it needs one outside the engines.
pub fn fallocate_blocking(file: &File, offset: u64, len: u64, mode: i32) -> io::Result<()> {
    let to_off = |v: u64| {
        libc::off_t::try_from(v).map_err(|_| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("fallocate range {v} exceeds off_t"),
            )
        })
    };
    let (offset, len) = (to_off(offset)?, to_off(len)?);
    loop {
        // SAFETY: plain syscall on a descriptor that `file` keeps open for the duration of the
        // call; no memory is passed to the kernel.
        let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}
