//! twinblock-io: how twinblock reaches bytes on a disk. Used by the RAID engine for its members,
//! by the node for plain-image exports, and (later) by the HA pair for its mailbox and
//! reservation I/O on the shared disks; it knows nothing of RAID, NBD or HA.
//!
//! `Member` is the one interface; implementations:
//! - `file`: a disk image or block device, through io_uring (`uring`) with `O_DIRECT` where the
//!   request is aligned, and a thread-pool (`pool`, `pread`/`pwrite`) fallback when the kernel
//!   refuses io_uring; `inline` is the page-cache fast path that skips the thread handoff;
//! - `mem`: an in-memory member with fault injection and an optional volatile write cache
//!   (`wcache`: what a power cut leaves), for tests and models.
//!
//! Buffers are `bytes::Bytes`. A buffer made by `buf::AlignedBuf` and frozen into `Bytes` keeps its
//! alignment, so aligned writes reach the kernel without a copy; anything else is copied into an
//! aligned bounce buffer when `O_DIRECT` is in use.
//!
//! Every write or discard a `FileMember` issues passes one gate before it is submitted,
//! `FileMember::check_writable` (see `file.rs`): that is where the pair's fencing check ("do I
//! still hold this disk's reservation and is my lease fresh") belongs.

pub mod buf;
pub mod bufpool;
pub mod file;
pub mod inline;
pub mod mem;
pub mod pool;
pub mod reactor;
pub mod uring;
pub mod wcache;

pub use buf::AlignedBuf;
pub use bufpool::AlignedPool;
pub use file::{EngineChoice, FileError, FileMember, FileOptions};

use async_trait::async_trait;
use bytes::Bytes;
use std::io;

/// The identity of the storage behind a member: the device and inode of an image file, or the
/// device number of a block device (two device nodes of one disk share it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeviceIdentity {
    File { dev: u64, ino: u64 },
    BlockDevice { rdev: u64 },
}

/// One disk of an array (or a plain exported image).
#[async_trait]
pub trait Member: Send + Sync + 'static {
    /// Human name for messages: usually the path.
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// What the member is underneath its name, so one file reached through two paths (a
    /// symlink, `./x` and `x`, a hard link) is recognised as one device. `None` when the member
    /// cannot tell (in-memory members): callers then compare names only.
    fn identity(&self) -> Option<DeviceIdentity> {
        None
    }
    /// Read exactly `len` bytes at `offset`. A short read past the end is an error.
    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes>;
    /// Write all of `data` at `offset`.
    async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    async fn sync(&self) -> io::Result<()>;
    /// Deallocate a range so it reads as zeroes (punch hole); may fall back to writing zeroes.
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
}
