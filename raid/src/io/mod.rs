//! Member I/O: how the RAID engine (and the node's plain-file exports) reach bytes on a disk.
//!
//! `Member` is the one interface; implementations:
//! - `file`: a disk image or block device, through io_uring (`uring`) with `O_DIRECT` where the
//!   request is aligned, and a thread-pool (`pool`, `pread`/`pwrite`) fallback when the kernel
//!   refuses io_uring;
//! - `mem`: an in-memory member with fault injection, for tests and models.
//!
//! Buffers are `bytes::Bytes`. A buffer made by `buf::AlignedBuf` and frozen into `Bytes` keeps its
//! alignment, so aligned writes reach the kernel without a copy; anything else is copied into an
//! aligned bounce buffer when `O_DIRECT` is in use.

pub mod buf;
pub mod file;
pub mod inline;
pub mod mem;
pub mod pool;
pub mod uring;

pub use buf::AlignedBuf;
pub use file::{EngineChoice, FileError, FileMember, FileOptions};

use async_trait::async_trait;
use bytes::Bytes;
use std::io;

/// One disk of an array (or a plain exported image).
#[async_trait]
pub trait Member: Send + Sync + 'static {
    /// Human name for messages: usually the path.
    fn name(&self) -> &str;
    /// Size in bytes.
    fn size(&self) -> u64;
    /// Read exactly `len` bytes at `offset`. A short read past the end is an error.
    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes>;
    /// Write all of `data` at `offset`.
    async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()>;
    /// Make every completed write durable (fdatasync).
    async fn sync(&self) -> io::Result<()>;
    /// Deallocate a range so it reads as zeroes (punch hole); may fall back to writing zeroes.
    async fn discard(&self, offset: u64, len: u64) -> io::Result<()>;
}
