//! The page-cache fast path for buffered requests, done on the calling task with no thread
//! handoff.
//!
//! A buffered read that the page cache holds completes in microseconds; sending it to the
//! io_uring thread or the blocking pool costs two thread wake-ups, which dominate latency at low
//! queue depth. `read_nowait` tries `preadv2(RWF_NOWAIT)`: the kernel copies what is cached and
//! answers `EAGAIN` instead of waiting for the disk, in which case the caller falls back to its
//! engine. Buffered writes of bounded size are a copy into the page cache (ext4 refuses
//! `RWF_NOWAIT` for them, so they are plain `pwrite`s); large ones go to the engine.
//!
//! The only unsafe code is the `preadv2` call into a vector's spare capacity; see its comment.

use bytes::Bytes;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

/// Buffered writes up to this size are copied into the page cache inline.
pub const INLINE_WRITE_BYTES_MAX: usize = 4 * 1024 * 1024;
/// Buffered reads up to this size are tried inline.
pub const INLINE_READ_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Read buffers at least this large are recycled: fresh ones of this size come from `mmap`, so
/// every read would fault their pages in and every drop would unmap them.
const RECYCLE_MIN_BYTES: usize = 64 * 1024;
/// Bound on the bytes kept for reuse.
const RECYCLE_POOL_BYTES_MAX: usize = 32 * 1024 * 1024;

/// Large read buffers waiting for reuse.
static RECYCLED: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// A read buffer handed out as `Bytes`; its allocation returns to `RECYCLED` when the last
/// `Bytes` referring to it is dropped.
struct Recycled(Vec<u8>);

impl AsRef<[u8]> for Recycled {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Drop for Recycled {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.0);
        let mut pool = RECYCLED.lock().unwrap_or_else(|p| p.into_inner());
        let pooled: usize = pool.iter().map(Vec::capacity).sum();
        if pooled + buf.capacity() <= RECYCLE_POOL_BYTES_MAX {
            pool.push(buf);
        }
    }
}

/// An empty vector with room for `len` bytes, reusing a pooled allocation when one fits
/// (not more than twice too large, so small reads never pin big buffers).
fn buffer_for(len: usize) -> Vec<u8> {
    if len >= RECYCLE_MIN_BYTES {
        let mut pool = RECYCLED.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = pool
            .iter()
            .position(|b| b.capacity() >= len && b.capacity() <= 2 * len)
        {
            let mut buf = pool.swap_remove(i);
            buf.clear();
            return buf;
        }
    }
    // A 4 KiB read gets a plain allocation, not a block of `bufpool::block_pool` as the
    // engines' block reads do: tried under a plain volume's read cache (4 KiB random reads over
    // a 1 GiB set, 256 MiB cache, `tools/bench-cpu`, 2026-11-28 01:16Z, load 10-12), pooled
    // blocks cost more server CPU per request once the cache was full (10.9 and 10.6 us against
    // 10.4 and 8.9 us in the two warm rounds; cold round 16.3 against 16.1).
    Vec::with_capacity(len)
}

/// Set once the kernel or filesystem refuses `RWF_NOWAIT` reads, to stop trying.
static NOWAIT_UNSUPPORTED: AtomicBool = AtomicBool::new(false);

/// Read `len` bytes at `offset` from the page cache without blocking. `Ok(None)` means "not
/// all cached" (or not supported): use the engine.
pub fn read_nowait(file: &File, offset: u64, len: usize) -> io::Result<Option<Bytes>> {
    if len > INLINE_READ_BYTES_MAX || NOWAIT_UNSUPPORTED.load(Ordering::Relaxed) {
        return Ok(None);
    }
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Ok(None);
    };
    let mut buf = buffer_for(len);
    let mut done = 0usize;
    while done < len {
        // `buf.len() == done`, so the spare capacity starts at byte `done` and holds
        // `capacity - done >= len - done` bytes.
        let spare = buf.spare_capacity_mut();
        debug_assert!(spare.len() >= len - done);
        let iov = libc::iovec {
            iov_base: spare.as_mut_ptr().cast(),
            iov_len: len - done,
        };
        // SAFETY: the iovec covers the first `len - done` bytes of `buf`'s spare capacity, which
        // `buf` owns and nothing else references during the call; the kernel writes at most
        // `iov_len` bytes there. The descriptor is kept open by `file`.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                off + done as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.raw_os_error() {
                Some(libc::EAGAIN) => Ok(None),
                Some(libc::EOPNOTSUPP) | Some(libc::EINVAL) | Some(libc::ENOSYS) => {
                    NOWAIT_UNSUPPORTED.store(true, Ordering::Relaxed);
                    tracing::debug!("RWF_NOWAIT reads unsupported ({e}); using the engine");
                    Ok(None)
                }
                Some(libc::EINTR) => continue,
                _ => Err(e),
            };
        }
        if n == 0 {
            // End of file before `len`: let the engine report it with full context.
            return Ok(None);
        }
        done += n as usize;
        // SAFETY: the kernel initialised bytes `..done` (the earlier ones in earlier rounds).
        unsafe { buf.set_len(done) };
    }
    if len >= RECYCLE_MIN_BYTES {
        return Ok(Some(Bytes::from_owner(Recycled(buf))));
    }
    Ok(Some(Bytes::from(buf)))
}

/// Copy `data` into the page cache at `offset` (a buffered `pwrite`), when small enough.
/// `Ok(false)`: too large, use the engine.
pub fn write_buffered(file: &File, offset: u64, data: &[u8]) -> io::Result<bool> {
    if data.len() > INLINE_WRITE_BYTES_MAX {
        return Ok(false);
    }
    file.write_all_at(data, offset)?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cached_reads_complete_inline_and_match_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        // Just written: in the page cache.
        match read_nowait(&f, 4096, 8192).unwrap() {
            Some(b) => assert_eq!(&b[..], &data[4096..12288]),
            None => assert!(
                NOWAIT_UNSUPPORTED.load(Ordering::Relaxed),
                "cached read refused"
            ),
        }
        // Past the end: a short first read, then end of file; left to the engine, never a short
        // buffer.
        assert!(read_nowait(&f, 60000, 8192).unwrap().is_none());
        // Two rounds are needed when the kernel returns less than asked: a read across the end
        // of what is cached still assembles the right bytes or defers.
        if let Some(b) = read_nowait(&f, 0, 65536).unwrap() {
            assert_eq!(&b[..], &data[..]);
        }
    }

    #[test]
    fn large_read_buffers_are_recycled_with_correct_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        let data: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 253) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let f = File::open(&path).unwrap();
        for round in 0..4u64 {
            let off = round * 65536;
            let Some(b) = read_nowait(&f, off, 256 * 1024).unwrap() else {
                return; // RWF_NOWAIT unsupported here: nothing to recycle.
            };
            assert_eq!(&b[..], &data[off as usize..off as usize + 256 * 1024]);
            drop(b);
            let pool = RECYCLED.lock().unwrap();
            assert!(
                pool.iter().any(|v| v.capacity() >= 256 * 1024),
                "buffer not returned"
            );
        }
    }

    #[test]
    fn small_writes_go_inline_large_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("img"))
            .unwrap();
        assert!(write_buffered(&f, 100, b"hello").unwrap());
        let mut back = [0u8; 5];
        f.read_exact_at(&mut back, 100).unwrap();
        assert_eq!(&back, b"hello");
        assert!(!write_buffered(&f, 0, &vec![0u8; INLINE_WRITE_BYTES_MAX + 1]).unwrap());
    }
}
