//! `FileMember`: a disk image file or a block device as a `Member`.
//!
//! Engine: io_uring (`uring`, one ring per process) when the kernel allows it, else the blocking
//! thread pool (`pool`). The automatic choice is made once per process by a probe and logged;
//! `TWINBLOCK_IO=uring|pool` forces it, and `FileOptions::engine` forces it per member (tests
//! use that to run both engines in one process).
//!
//! `O_DIRECT` where alignment allows: with `FileOptions::direct` the file is opened twice, once
//! with `O_DIRECT` and once buffered. A request whose offset and length are multiples of the
//! direct alignment (4096 for images, the logical block size for block devices) goes through the
//! `O_DIRECT` descriptor, its buffer copied into an `AlignedBuf` first if it is not aligned;
//! anything else goes through the buffered descriptor. Linux keeps the two coherent: a direct
//! write writes back and invalidates overlapping page cache, a direct read writes back dirty
//! pages first. Members are shared between two hosts, so callers that need another host to see
//! their bytes issue aligned writes (which bypass this host's cache) and `sync`. If the
//! filesystem refuses `O_DIRECT` (EINVAL at open or on a probe read), the member runs buffered
//! and says so in the log and in `direct()`.

use crate::buf::{is_direct_aligned, AlignedBuf, ALIGN_BYTES};
use crate::bufpool::{block_pool, BLOCK_POOL_BLOCK_BYTES};
use crate::uring::{self, UringEngine};
use crate::{inline, pool, DeviceIdentity, Member};
use async_trait::async_trait;
use bytes::Bytes;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Environment variable that forces the engine for the whole process: `uring` or `pool`.
pub const ENGINE_ENV: &str = "TWINBLOCK_IO";
/// `O_DIRECT` alignment used for image files (safe for every logical block size).
pub const IMAGE_DIRECT_ALIGN_BYTES: usize = ALIGN_BYTES;
/// Size of each write when a discard has to be emulated by writing zeroes.
pub const ZERO_FILL_CHUNK_BYTES: usize = 1 << 20;

/// Which I/O engine a member uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EngineChoice {
    /// The process default: `TWINBLOCK_IO` if set, else io_uring when the probe succeeds.
    #[default]
    Auto,
    /// io_uring; opening fails if the kernel refuses it.
    Uring,
    /// The blocking thread pool.
    Pool,
}

/// How to open a member.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// Use `O_DIRECT` for aligned requests (falls back to buffered if the filesystem refuses).
    pub direct: bool,
    pub read_only: bool,
    /// Create a missing (or extend an empty) image file to this many bytes, sparse.
    pub create_size: Option<u64>,
    pub engine: EngineChoice,
}

/// Why a member could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("cannot open {}: {source}", path.display())]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot create {} with {size} bytes: {source}", path.display())]
    Create {
        path: PathBuf,
        size: u64,
        source: io::Error,
    },
    #[error("cannot determine the size of {}: {source}", path.display())]
    Size { path: PathBuf, source: io::Error },
    #[error("{} is neither a regular file nor a block device", path.display())]
    NotADisk { path: PathBuf },
    #[error("invalid options for {}: {reason}", path.display())]
    InvalidOptions { path: PathBuf, reason: &'static str },
    #[error("io_uring requested for {} but unavailable: {reason}", path.display())]
    UringUnavailable { path: PathBuf, reason: String },
}

/// Counters of how requests were routed, for tests and diagnostics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FileStats {
    /// Reads and writes issued on the `O_DIRECT` descriptor.
    pub direct_ops: u64,
    /// Reads and writes issued on the buffered descriptor.
    pub buffered_ops: u64,
    /// Aligned writes whose buffer had to be copied into an `AlignedBuf`.
    pub bounce_copies: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum EngineKind {
    Uring,
    Pool,
}

enum Engine {
    Uring(Arc<UringEngine>),
    Pool,
}

/// A disk image or block device.
pub struct FileMember {
    name: String,
    size: u64,
    identity: DeviceIdentity,
    read_only: bool,
    is_block_device: bool,
    buffered: Arc<File>,
    /// The `O_DIRECT` descriptor, when direct I/O is requested and accepted.
    direct: Option<Arc<File>>,
    direct_align_bytes: usize,
    engine: Engine,
    direct_ops: AtomicU64,
    buffered_ops: AtomicU64,
    bounce_copies: AtomicU64,
}

impl fmt::Debug for FileMember {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FileMember")
            .field("name", &self.name)
            .field("size", &self.size)
            .field("engine", &self.engine())
            .field("direct", &self.direct())
            .finish()
    }
}

/// The engine `EngineChoice::Auto` resolves to, decided and logged once per process.
fn process_engine_kind() -> EngineKind {
    static KIND: OnceLock<EngineKind> = OnceLock::new();
    *KIND.get_or_init(|| {
        match std::env::var(ENGINE_ENV).as_deref() {
            Ok("pool") => {
                tracing::info!("member I/O engine: thread pool (forced by {ENGINE_ENV}=pool)");
                return EngineKind::Pool;
            }
            Ok("uring") => {
                tracing::info!("member I/O engine: io_uring (forced by {ENGINE_ENV}=uring)");
                return EngineKind::Uring;
            }
            Ok(other) => tracing::warn!(
                "ignoring {ENGINE_ENV}={other:?} (expected \"uring\" or \"pool\"); probing"
            ),
            Err(_) => {}
        }
        match uring::probe() {
            Ok(()) => {
                tracing::info!("member I/O engine: io_uring");
                EngineKind::Uring
            }
            Err(reason) => {
                tracing::warn!(
                    "member I/O engine: thread pool, because io_uring is unavailable: {reason}"
                );
                EngineKind::Pool
            }
        }
    })
}

impl FileMember {
    /// Open (and with `create_size`, create) a member.
    pub fn open(path: impl AsRef<Path>, opts: &FileOptions) -> Result<Arc<FileMember>, FileError> {
        let path = path.as_ref();
        let pb = || path.to_path_buf();
        if opts.read_only && opts.create_size.is_some() {
            return Err(FileError::InvalidOptions {
                path: pb(),
                reason: "create_size needs a writable member",
            });
        }

        let mut base = OpenOptions::new();
        base.read(true).write(!opts.read_only);
        let mut buffered_opts = base.clone();
        if opts.create_size.is_some() {
            buffered_opts.create(true);
        }
        let buffered = buffered_opts
            .open(path)
            .map_err(|source| FileError::Open { path: pb(), source })?;
        let meta = buffered
            .metadata()
            .map_err(|source| FileError::Open { path: pb(), source })?;
        let is_block_device = meta.file_type().is_block_device();
        if !is_block_device && !meta.is_file() {
            return Err(FileError::NotADisk { path: pb() });
        }
        let identity = if is_block_device {
            DeviceIdentity::BlockDevice { rdev: meta.rdev() }
        } else {
            DeviceIdentity::File {
                dev: meta.dev(),
                ino: meta.ino(),
            }
        };

        let size = if is_block_device {
            sys::block_device_size(&buffered)
                .map_err(|source| FileError::Size { path: pb(), source })?
        } else {
            match opts.create_size {
                Some(want) if meta.len() == 0 && want > 0 => {
                    buffered.set_len(want).map_err(|source| FileError::Create {
                        path: pb(),
                        size: want,
                        source,
                    })?;
                    want
                }
                _ => meta.len(),
            }
        };

        let direct_align_bytes = if is_block_device {
            sys::logical_block_size(&buffered)
                .map_err(|source| FileError::Size { path: pb(), source })?
        } else {
            IMAGE_DIRECT_ALIGN_BYTES
        };

        let direct = if opts.direct {
            open_direct(path, &base, size, direct_align_bytes)?
        } else {
            None
        };

        // Chosen after the files opened, so a bad path does not start a ring.
        let kind = match opts.engine {
            EngineChoice::Auto => process_engine_kind(),
            EngineChoice::Uring => EngineKind::Uring,
            EngineChoice::Pool => EngineKind::Pool,
        };
        let engine = match kind {
            EngineKind::Pool => Engine::Pool,
            EngineKind::Uring => {
                let engine = uring::probe()
                    .and_then(|()| uring::process_engine().map_err(|e| e.to_string()))
                    .map_err(|reason| FileError::UringUnavailable { path: pb(), reason })?;
                Engine::Uring(engine)
            }
        };

        let member = FileMember {
            name: path.display().to_string(),
            size,
            identity,
            read_only: opts.read_only,
            is_block_device,
            buffered: Arc::new(buffered),
            direct: direct.map(Arc::new),
            direct_align_bytes,
            engine,
            direct_ops: AtomicU64::new(0),
            buffered_ops: AtomicU64::new(0),
            bounce_copies: AtomicU64::new(0),
        };
        tracing::info!(
            "opened member {} ({} bytes, {}, engine {}, O_DIRECT {}{})",
            member.name,
            member.size,
            if is_block_device {
                "block device"
            } else {
                "image file"
            },
            member.engine(),
            if member.direct() { "on" } else { "off" },
            if opts.read_only { ", read-only" } else { "" },
        );
        Ok(Arc::new(member))
    }

    /// `"uring"` or `"pool"`.
    pub fn engine(&self) -> &'static str {
        match self.engine {
            Engine::Uring(_) => "uring",
            Engine::Pool => "pool",
        }
    }

    /// Whether aligned requests go through `O_DIRECT`.
    pub fn direct(&self) -> bool {
        self.direct.is_some()
    }

    /// Alignment (offset, length, buffer address) a request needs to go through `O_DIRECT`.
    pub fn direct_align_bytes(&self) -> usize {
        self.direct_align_bytes
    }

    pub fn is_block_device(&self) -> bool {
        self.is_block_device
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    pub fn stats(&self) -> FileStats {
        FileStats {
            direct_ops: self.direct_ops.load(Ordering::Relaxed),
            buffered_ops: self.buffered_ops.load(Ordering::Relaxed),
            bounce_copies: self.bounce_copies.load(Ordering::Relaxed),
        }
    }

    /// The io_uring batching counters, when this member uses io_uring.
    pub fn uring_stats(&self) -> Option<uring::UringStats> {
        match &self.engine {
            Engine::Uring(engine) => Some(engine.stats()),
            Engine::Pool => None,
        }
    }

    /// The `O_DIRECT` descriptor if the range `offset..offset+len` may use it.
    fn direct_for(&self, offset: u64, len: usize) -> Option<&Arc<File>> {
        let direct = self.direct.as_ref()?;
        // `direct_align_bytes` is a power of two (checked when the descriptor was opened).
        let mask = self.direct_align_bytes as u64 - 1;
        (offset & mask == 0 && len as u64 & mask == 0).then_some(direct)
    }

    fn count(&self, direct: bool) {
        let counter = if direct {
            &self.direct_ops
        } else {
            &self.buffered_ops
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Wrap an error with the operation, range and member name.
    fn context(&self, e: io::Error, op: &str, offset: u64, len: u64) -> io::Error {
        io::Error::new(
            e.kind(),
            format!(
                "{op} of {len} bytes at offset {offset} on {}: {e}",
                self.name
            ),
        )
    }

    /// Check that `offset..offset+len` lies inside the member.
    fn check_range(&self, op: &str, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => {
                let kind = if op == "read" {
                    io::ErrorKind::UnexpectedEof
                } else {
                    io::ErrorKind::InvalidInput
                };
                Err(io::Error::new(
                    kind,
                    format!(
                        "{op} of {len} bytes at offset {offset} on {} runs past its end ({} bytes)",
                        self.name, self.size
                    ),
                ))
            }
        }
    }

    /// The one gate every mutating request (`write_at`, `discard`, and the zero-fill fallback of
    /// a discard, which runs after it) passes before it is submitted to an engine. The HA pair's
    /// fencing check (this node still holds the disk's reservation and its lease is fresh) goes
    /// here, next to the read-only check, so no write reaches a disk the node no longer owns.
    fn check_writable(&self, op: &str, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!(
                    "{op} of {len} bytes at offset {offset} on {}: member is open read-only",
                    self.name
                ),
            ));
        }
        self.check_range(op, offset, len)
    }

    async fn raw_write(&self, file: Arc<File>, offset: u64, data: Bytes) -> io::Result<()> {
        match &self.engine {
            Engine::Uring(engine) => engine.write(file, offset, data).await,
            Engine::Pool => pool::write(file, offset, data).await,
        }
    }

    async fn write_routed(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let (file, data) = match self.direct_for(offset, data.len()) {
            Some(direct) => {
                let data = if is_direct_aligned(&data, self.direct_align_bytes) {
                    data
                } else {
                    self.bounce_copies.fetch_add(1, Ordering::Relaxed);
                    AlignedBuf::copy_from(&data).into_bytes()
                };
                self.count(true);
                (Arc::clone(direct), data)
            }
            None => {
                self.count(false);
                if inline::write_buffered(&self.buffered, offset, &data)? {
                    return Ok(());
                }
                (Arc::clone(&self.buffered), data)
            }
        };
        self.raw_write(file, offset, data).await
    }

    /// Emulate a discard by writing zeroes (filesystems or devices without hole punching).
    async fn zero_fill(&self, offset: u64, len: u64) -> io::Result<()> {
        let chunk_len = ZERO_FILL_CHUNK_BYTES.min(len as usize);
        let zeroes = AlignedBuf::zeroed(chunk_len).into_bytes();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(chunk_len as u64) as usize;
            self.write_routed(offset + done, zeroes.slice(..n)).await?;
            done += n as u64;
        }
        Ok(())
    }
}

/// Open the `O_DIRECT` descriptor and check the filesystem accepts a direct read. `Ok(None)`
/// (with a warning) when the filesystem refuses `O_DIRECT`.
fn open_direct(
    path: &Path,
    base: &OpenOptions,
    size: u64,
    align_bytes: usize,
) -> Result<Option<File>, FileError> {
    let refused = |why: String| {
        tracing::warn!(
            "O_DIRECT refused for {} ({why}); using buffered I/O for it",
            path.display()
        );
        Ok(None)
    };
    if align_bytes > ALIGN_BYTES || !align_bytes.is_power_of_two() {
        return refused(format!("logical block size {align_bytes} not supported"));
    }
    let file = match base.clone().custom_flags(libc::O_DIRECT).open(path) {
        Ok(file) => file,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return refused(e.to_string()),
        Err(source) => {
            return Err(FileError::Open {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    // Some filesystems accept the flag at open and refuse the I/O: read the first block.
    if size >= align_bytes as u64 {
        let mut probe = AlignedBuf::zeroed(align_bytes);
        if let Err(e) = file.read_at(&mut probe, 0) {
            if e.raw_os_error() == Some(libc::EINVAL) {
                return refused(format!("probe read: {e}"));
            }
            return Err(FileError::Open {
                path: path.to_path_buf(),
                source: e,
            });
        }
    }
    Ok(Some(file))
}

#[async_trait]
impl Member for FileMember {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn identity(&self) -> Option<DeviceIdentity> {
        Some(self.identity)
    }

    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.check_range("read", offset, len as u64)?;
        if len == 0 {
            return Ok(Bytes::new());
        }
        let file = match self.direct_for(offset, len) {
            Some(direct) => {
                self.count(true);
                Arc::clone(direct)
            }
            None => {
                self.count(false);
                match inline::read_nowait(&self.buffered, offset, len) {
                    Ok(Some(data)) => return Ok(data),
                    Ok(None) => {}
                    Err(e) => return Err(self.context(e, "read", offset, len as u64)),
                }
                Arc::clone(&self.buffered)
            }
        };
        let result = match &self.engine {
            // A block-sized read lands in a recycled block (see `bufpool::block_pool`).
            Engine::Uring(engine) if len == BLOCK_POOL_BLOCK_BYTES => {
                let pool = block_pool();
                let buf = pool.take();
                engine
                    .read_into(file, offset, buf)
                    .await
                    .map(|buf| pool.freeze(buf))
            }
            Engine::Uring(engine) => engine.read(file, offset, len).await.map(|b| b.into_bytes()),
            Engine::Pool => pool::read(file, offset, len).await.map(|b| b.into_bytes()),
        };
        result.map_err(|e| self.context(e, "read", offset, len as u64))
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_writable("write", offset, len)?;
        if data.is_empty() {
            return Ok(());
        }
        self.write_routed(offset, data)
            .await
            .map_err(|e| self.context(e, "write", offset, len))
    }

    async fn sync(&self) -> io::Result<()> {
        // One descriptor is enough: fdatasync covers the inode, whichever fd wrote the data.
        let file = Arc::clone(&self.buffered);
        let result = match &self.engine {
            Engine::Uring(engine) => engine.fdatasync(file).await,
            Engine::Pool => pool::fdatasync(file).await,
        };
        result.map_err(|e| io::Error::new(e.kind(), format!("fdatasync of {}: {e}", self.name)))
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable("discard", offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let file = Arc::clone(&self.buffered);
        let mode = pool::PUNCH_HOLE_MODE;
        let result = match &self.engine {
            Engine::Uring(engine) => engine.fallocate(file, offset, len, mode).await,
            Engine::Pool => pool::fallocate(file, offset, len, mode).await,
        };
        match result {
            Ok(()) => Ok(()),
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EOPNOTSUPP) | Some(libc::EINVAL)
                ) =>
            {
                tracing::debug!(
                    "punch hole unsupported on {} ({e}); writing zeroes instead",
                    self.name
                );
                self.zero_fill(offset, len)
                    .await
                    .map_err(|e| self.context(e, "discard (zero fill)", offset, len))
            }
            Err(e) => Err(self.context(e, "discard", offset, len)),
        }
    }
}

/// Block-device ioctls. The only `unsafe` in this module.
mod sys {
    use std::fs::File;
    use std::io;
    use std::os::fd::AsRawFd;

    /// `BLKGETSIZE64` = `_IOR(0x12, 114, size_t)` in the generic ioctl encoding (x86, arm,
    /// riscv, loongarch; not mips/powerpc/sparc, which we do not build for).
    const BLKGETSIZE64: u64 =
        (2 << 30) | ((std::mem::size_of::<usize>() as u64) << 16) | (0x12 << 8) | 114;

    /// Size in bytes of the block device open as `file`.
    pub fn block_device_size(file: &File) -> io::Result<u64> {
        let mut size: u64 = 0;
        // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to a live local;
        // the descriptor is kept open by `file` for the call.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                BLKGETSIZE64 as libc::Ioctl,
                &mut size as *mut u64,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(size)
    }

    /// Logical block size in bytes of the block device open as `file`.
    pub fn logical_block_size(file: &File) -> io::Result<usize> {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which points to a live local.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::BLKSSZGET,
                &mut size as *mut libc::c_int,
            )
        };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        usize::try_from(size)
            .ok()
            .filter(|s| *s > 0)
            .ok_or_else(|| io::Error::other(format!("BLKSSZGET returned {size}")))
    }
}
