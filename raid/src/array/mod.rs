//! A running RAID array over `Member`s: reads, writes (with stripe locking), degraded operation,
//! member failure handling, hot spares, rebuild, bitmap resync, scrub and superblock upkeep.
//!
//! Concurrency: rows (chunk number on the members) are locked through a fixed table of
//! [`ROW_LOCK_SHARDS`] async mutexes (`row % shards`); an operation locks the shards it needs in
//! ascending order, so no two operations can deadlock. Healthy reads of data take no lock;
//! reconstructing reads, writes, rebuild batches and scrub batches do.
//!
//! Failure: a member whose I/O fails is marked faulty at once (events bumped, superblocks of the
//! others rewritten), a hot spare takes its slot if one is present, and the operation is retried
//! degraded. When the level cannot tolerate the failures, every later I/O returns
//! [`ArrayError::Failed`]: the array never returns bytes it cannot vouch for.
//!
//! Durability order used by callers (the journal's flusher): `write`s, then [`Array::flush`] (syncs
//! members, then clears idle bitmap bits), then [`Array::set_applied_seq`] (persisted on every
//! member before it returns).
//!
//! Layout by concern, each an `impl Inner` (and where it has operator entry points, `impl Array`):
//! `open` (create, assemble), `read` and `write` (the foreground I/O path, degraded reconstruct
//! included), `membership` (failures, spares, add / remove / replace), `metadata` (superblocks and
//! the write-intent bitmap on the members), `resync` (the background task and its pipeline),
//! `rebuild` (one batch of a rebuild), `hotreplace` (copying an active member onto its replacement),
//! `scrub`, `status`. This module holds the shared state
//! (`Inner`, `Meta`, `View`), the row locks and the small helpers every part uses.

mod fullrows;
mod hotreplace;
mod membership;
mod metadata;
mod open;
mod ppl;
mod read;
mod rebuild;
mod resync;
mod scrub;
mod status;
mod write;

pub use self::ppl::PartialParityLog;
use rebuild::BatchOutcome;
pub use resync::ResyncKind;
pub use scrub::{ScrubMode, ScrubReport};
pub use status::{ArrayStatus, MemberStatus, RebuildStatus};

use crate::assemble::{self, AssembleError, Candidate, SlotStart};
use crate::bitmap::{self, Bitmap, BITMAP_BLOCK_BYTES};
use crate::layout::{ChunkRole, Extent, Geometry, LayoutError, Level};
use crate::parity::{self, RowBufs};
use crate::rowplan::{self, Piece, RowPlan, COLUMN_BYTES};
use crate::superblock::{
    BitmapGeometry, JournalMark, MemberEntry, MemberState, RebuildCheckpoint, Role, Superblock,
    SuperblockError, DATA_OFFSET_BYTES, NAME_BYTES, SUPERBLOCK_BYTES,
};
use bytes::{Bytes, BytesMut};
use futures_util::future::{join_all, try_join_all};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use thiserror::Error;
use twinblock_io::buf::AlignedBuf;
use twinblock_io::Member;
use uuid::Uuid;

/// Number of row-lock shards.
pub const ROW_LOCK_SHARDS: u64 = 1024;
/// Member bytes per rebuild / scrub batch (one contiguous read per source member).
pub const REBUILD_BATCH_BYTES: u64 = 4 << 20;
/// Rebuild batches being read (and recomputed) ahead of the one being written.
pub const REBUILD_READ_AHEAD: usize = 2;
/// Rebuild batches whose target write is in flight at once.
pub const REBUILD_WRITE_DEPTH: usize = 2;
/// How often a running rebuild records its checkpoint in the superblocks.
pub const CHECKPOINT_INTERVAL_MS: u64 = 1000;
/// Largest buffer used when a discard must be written as zeroes.
pub const ZERO_WRITE_BYTES: u64 = 1 << 20;

/// Errors of array operations; each names the array and, where one is involved, the member.
#[derive(Debug, Error)]
pub enum ArrayError {
    #[error("array {array}: {source}")]
    Layout { array: String, source: LayoutError },
    #[error(transparent)]
    Assemble(Box<AssembleError>),
    #[error("array {array}: member {member}: {op} failed: {source}")]
    MemberIo {
        array: String,
        member: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("array {array}: member {member}: {source}")]
    MemberSuperblock {
        array: String,
        member: String,
        source: SuperblockError,
    },
    #[error("array {array} has failed ({detail}); I/O is refused so no wrong data is returned")]
    Failed { array: String, detail: String },
    #[error(
        "array {array}: request at offset {offset} length {len} passes the end ({size} bytes)"
    )]
    OutOfRange {
        array: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("array {array}: {what}")]
    Invalid { array: String, what: String },
    #[error("array {array} stopped uncleanly while degraded, with {regions} bitmap region(s) being written: parity there may not match the data, and the missing member's chunks cannot be recomputed from it (the RAID write hole); refusing to start. Bring the missing member back, or set start_dirty_degraded = true for this array to start anyway (chunks of the missing member in those regions may then read wrong)")]
    DirtyDegraded { array: String, regions: usize },
    #[error("array {array}: row {row}: the partial-parity record could not be persisted before the stripe update ({source}); nothing was written, the update can be retried")]
    PartialParityLog {
        array: String,
        row: u64,
        source: io::Error,
    },
    #[error(
        "array {array}: member {member} has {size_bytes} bytes, at least {need_bytes} are needed"
    )]
    MemberTooSmall {
        array: String,
        member: String,
        size_bytes: u64,
        need_bytes: u64,
    },
}

impl From<AssembleError> for ArrayError {
    fn from(e: AssembleError) -> ArrayError {
        ArrayError::Assemble(Box::new(e))
    }
}

impl From<ArrayError> for io::Error {
    fn from(e: ArrayError) -> io::Error {
        let kind = match &e {
            ArrayError::OutOfRange { .. } | ArrayError::Invalid { .. } => {
                io::ErrorKind::InvalidInput
            }
            _ => io::ErrorKind::Other,
        };
        io::Error::new(kind, e)
    }
}

pub type Result<T> = std::result::Result<T, ArrayError>;

/// Options for [`Array::assemble_with`].
#[derive(Debug, Clone, Default)]
pub struct AssembleOptions {
    /// Start an array that stopped uncleanly while degraded with dirty bitmap regions (md's
    /// `start_dirty_degraded`): their parity cannot be checked, so a chunk of a missing member
    /// reconstructed there may be wrong. Off: such a start is refused with
    /// [`ArrayError::DirtyDegraded`].
    pub start_dirty_degraded: bool,
    /// A journal opens on the array and replays its partial-parity log
    /// ([`Array::replay_ppl`]) before any write. An unclean, degraded start with dirty regions
    /// then waits for that replay instead of being refused (RAID 5, and RAID 6 missing one
    /// member: what partial parity can protect).
    pub journaled: bool,
}

/// Options for [`Array::create`].
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    /// Member bytes per bitmap bit (default: see `bitmap::geometry`).
    pub bitmap_region_bytes: Option<u64>,
    /// Use at most this many bytes of each member (default: the smallest member).
    pub member_bytes: Option<u64>,
    /// The data areas already read as zeroes (fresh sparse images): skip discarding them.
    /// Without it, create discards every member's data area so parity starts consistent.
    pub assume_clean: bool,
}

#[derive(Clone)]
struct Slot {
    member: Option<Arc<dyn Member>>,
    dev_uuid: Uuid,
    state: MemberState,
    left_events: u64,
    /// Set while the slot's device is writable but not yet readable.
    resync: Option<(ResyncKind, u64)>,
}

struct Spare {
    member: Arc<dyn Member>,
    dev_uuid: Uuid,
}

struct Meta {
    slots: Vec<Slot>,
    spares: Vec<Spare>,
    events: u64,
    applied_seq: u64,
    clean: bool,
    /// The NVRAM log journaling the array, kept in every superblock (see [`JournalMark`]).
    journal: JournalMark,
    rebuild: Option<RebuildCheckpoint>,
    failed: Option<String>,
    /// A hot replace in progress (see `hotreplace`): kept in memory only.
    replacement: Option<Replacement>,
}

/// The device being copied onto for a hot replace of `slot`, whose device stays active.
#[derive(Clone)]
struct Replacement {
    slot: usize,
    member: Arc<dyn Member>,
    dev_uuid: Uuid,
    /// Rows before this one are copied (writes go to both devices, so they stay copied).
    rows_done: u64,
}

/// Members as seen by one I/O.
struct View {
    members: Vec<Option<Arc<dyn Member>>>,
    readable: Vec<bool>,
    writable: Vec<bool>,
}

struct Inner {
    name: String,
    uuid: Uuid,
    geo: Geometry,
    data_offset: u64,
    meta: Mutex<Meta>,
    sb_lock: tokio::sync::Mutex<()>,
    /// Serialises the operator's membership commands (fail, remove, add, replace), so the
    /// checks a command makes before changing anything still hold when it applies the change.
    membership_lock: tokio::sync::Mutex<()>,
    row_locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    /// Member images of whole-row runs (`fullrows`), reused across writes.
    image_pool: Arc<twinblock_io::AlignedPool>,
    /// Chunk-sized aligned buffers of the RAID 5/6 row writes (parity, partial data, the spans of
    /// a dense row): reused instead of allocated, since a fresh allocation of this size costs a
    /// page fault and a kernel page clear per 4 KiB (see `twinblock_io::AlignedPool`).
    row_pool: Arc<twinblock_io::AlignedPool>,
    bitmap: Mutex<Bitmap>,
    bitmap_io: tokio::sync::Mutex<()>,
    progress: Mutex<Option<RebuildStatus>>,
    rebuild_running: AtomicBool,
    rebuild_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    scrub_running: AtomicBool,
    /// Rows the running (or last) scrub has checked, for progress.
    scrub_rows_done: AtomicU64,
    stop: AtomicBool,
    rate_limit_bytes_per_sec: AtomicU64,
    mismatches: AtomicU64,
    bitmap_resync_regions: AtomicU64,
    unclean_resync_regions: AtomicU64,
    read_rr: AtomicUsize,
    /// Where degraded row updates persist partial parity (see `ppl`).
    ppl: Mutex<Option<Arc<dyn PartialParityLog>>>,
    /// Assembled after an unclean degraded stop: waits for `Array::replay_ppl`.
    ppl_pending: AtomicBool,
    /// The operator's `start_dirty_degraded`, for a replay without the log that protected it.
    start_dirty_degraded: AtomicBool,
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before it).
fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Poisoning means a panic elsewhere; the data under these locks stays consistent per field.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A RAID array. Cheap to clone (shared handle).
#[derive(Clone)]
pub struct Array {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Array {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Array")
            .field("name", &self.inner.name)
            .field("geo", &self.inner.geo)
            .finish()
    }
}

impl Array {
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn uuid(&self) -> Uuid {
        self.inner.uuid
    }

    pub fn level(&self) -> Level {
        self.inner.geo.level
    }

    pub fn geometry(&self) -> Geometry {
        self.inner.geo
    }

    /// Logical size in bytes.
    pub fn size(&self) -> u64 {
        self.inner.geo.size_bytes()
    }

    /// Data bytes per full stripe: writes of this size and alignment skip read-modify-write.
    pub fn stripe_bytes(&self) -> u64 {
        self.inner.geo.stripe_bytes()
    }

    /// Reads `len` bytes at `offset`, reconstructing from parity or mirrors when needed.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes> {
        self.inner.read(offset, len as u64).await
    }

    /// The bytes of [`Array::read`] as one buffer per chunk extent, in order (no joining copy).
    pub async fn read_pieces(&self, offset: u64, len: usize) -> Result<Vec<Bytes>> {
        self.inner.read_pieces(offset, len as u64).await
    }

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.inner.write(offset, data).await
    }

    /// True while a member is missing, failed or rebuilding: writes then depend on
    /// reconstruction (and, on RAID 5/6, on partial parity), so a journal keeps large writes on
    /// its logged path.
    pub fn is_degraded(&self) -> bool {
        self.inner.is_degraded()
    }

    /// Writes several non-overlapping (offset, data) pieces, for a flusher that gathered many
    /// writes at once. On RAID 5/6 the pieces that fall inside one row are planned together
    /// (see [`crate::rowplan`]): per 4 KiB column the cheaper of read-modify-write and
    /// reconstruct-write, touched blocks and their parity written once, adjacent blocks in one
    /// I/O. Rows run concurrently. Overlapping pieces are refused.
    pub async fn write_scattered(&self, writes: Vec<(u64, Bytes)>) -> Result<()> {
        self.inner.write_scattered(writes).await
    }

    /// Makes all completed writes durable on every member, then clears idle bitmap bits.
    pub async fn flush(&self) -> Result<()> {
        self.inner.flush().await
    }

    /// Deallocates a range: whole rows are discarded on the members, the rest written as zeroes.
    pub async fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len).await
    }

    /// Makes a range read as zeroes (the same operation as [`Array::discard`], whose ranges
    /// always read back as zeroes).
    pub async fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.inner.discard(offset, len).await
    }

    /// The journal sequence number recorded as applied.
    pub fn applied_seq(&self) -> u64 {
        lock(&self.inner.meta).applied_seq
    }

    /// Records `seq` as applied in every member's superblock (durably) before returning. Call
    /// after [`Array::flush`].
    pub async fn set_applied_seq(&self, seq: u64) -> Result<()> {
        {
            let mut m = lock(&self.inner.meta);
            m.applied_seq = seq;
            m.journal.last_cp_unix_ms = unix_now_ms();
        }
        self.inner.write_superblocks().await;
        self.inner.check_failed()
    }

    /// What the superblocks record about the NVRAM log journaling this array.
    pub fn journal_mark(&self) -> JournalMark {
        lock(&self.inner.meta).journal
    }

    /// Records (durably, in every member's superblock) the NVRAM log journaling this array and
    /// whether it stopped cleanly. The journal calls it when it starts (not clean) and after its
    /// final CP at a clean stop (clean).
    pub async fn set_journal_mark(&self, log_id: Uuid, stopped_clean: bool) -> Result<()> {
        {
            let mut m = lock(&self.inner.meta);
            m.journal.log_id = log_id;
            m.journal.stopped_clean = stopped_clean;
        }
        self.inner.write_superblocks().await;
        self.inner.check_failed()
    }

    /// Status for operators.
    pub fn status(&self) -> ArrayStatus {
        self.inner.status()
    }

    /// Limits rebuild and resync to `bytes_per_sec` (0: unlimited).
    pub fn set_rebuild_rate(&self, bytes_per_sec: u64) {
        self.inner
            .rate_limit_bytes_per_sec
            .store(bytes_per_sec, Ordering::SeqCst);
    }

    /// Waits until no rebuild or resync runs (for tests and tools).
    pub async fn wait_rebuild(&self) {
        loop {
            let h = lock(&self.inner.rebuild_task).take();
            match h {
                Some(h) => {
                    let _ = h.await;
                }
                None if !self.inner.rebuild_running.load(Ordering::SeqCst) => return,
                None => tokio::time::sleep(Duration::from_millis(5)).await,
            }
        }
    }

    /// Checks (and in repair mode fixes) parity and mirror copies of the whole array.
    pub async fn scrub(&self, mode: ScrubMode) -> Result<ScrubReport> {
        self.inner.scrub(mode).await
    }

    /// Runs [`Array::scrub`] in the background; progress through [`Array::status`].
    pub fn start_scrub(&self, mode: ScrubMode) -> tokio::task::JoinHandle<Result<ScrubReport>> {
        let me = self.clone();
        tokio::spawn(async move { me.scrub(mode).await })
    }

    /// Stops background work, flushes, and marks every superblock clean.
    pub async fn close(&self) -> Result<()> {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.wait_rebuild().await;
        self.flush().await?;
        lock(&self.inner.meta).clean = true;
        self.inner.write_superblocks().await;
        self.inner.check_failed()
    }

    /// Stops background work without marking the array clean (simulates a crash for tests).
    pub async fn abandon(&self) {
        self.inner.stop.store(true, Ordering::SeqCst);
        self.wait_rebuild().await;
    }
}

impl Inner {
    fn new(
        name: String,
        uuid: Uuid,
        geo: Geometry,
        data_offset: u64,
        _bgeo: BitmapGeometry,
        meta: Meta,
        bitmap: Bitmap,
    ) -> Inner {
        Inner {
            name,
            uuid,
            geo,
            data_offset,
            meta: Mutex::new(meta),
            sb_lock: tokio::sync::Mutex::new(()),
            membership_lock: tokio::sync::Mutex::new(()),
            image_pool: Arc::default(),
            row_pool: Arc::default(),
            row_locks: (0..ROW_LOCK_SHARDS)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            bitmap: Mutex::new(bitmap),
            bitmap_io: tokio::sync::Mutex::new(()),
            progress: Mutex::new(None),
            rebuild_running: AtomicBool::new(false),
            rebuild_task: Mutex::new(None),
            scrub_running: AtomicBool::new(false),
            scrub_rows_done: AtomicU64::new(0),
            stop: AtomicBool::new(false),
            rate_limit_bytes_per_sec: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            bitmap_resync_regions: AtomicU64::new(0),
            unclean_resync_regions: AtomicU64::new(0),
            read_rr: AtomicUsize::new(0),
            ppl: Mutex::new(None),
            ppl_pending: AtomicBool::new(false),
            start_dirty_degraded: AtomicBool::new(false),
        }
    }

    fn invalid(&self, what: String) -> ArrayError {
        ArrayError::Invalid {
            array: self.name.clone(),
            what,
        }
    }

    fn check_slot(&self, slot: usize) -> Result<()> {
        if slot >= self.geo.members {
            return Err(self.invalid(format!(
                "no slot {slot} (the array has {})",
                self.geo.members
            )));
        }
        Ok(())
    }

    fn with_bitmap<T>(&self, f: impl FnOnce(&mut Bitmap) -> T) -> T {
        f(&mut lock(&self.bitmap))
    }

    fn view(&self) -> View {
        let m = lock(&self.meta);
        View {
            members: m.slots.iter().map(|s| s.member.clone()).collect(),
            readable: m
                .slots
                .iter()
                .map(|s| s.member.is_some() && s.state == MemberState::Active)
                .collect(),
            writable: m
                .slots
                .iter()
                .map(|s| {
                    s.member.is_some()
                        && matches!(s.state, MemberState::Active | MemberState::Rebuilding)
                })
                .collect(),
        }
    }

    fn check_failed(&self) -> Result<()> {
        match &lock(&self.meta).failed {
            Some(detail) => Err(ArrayError::Failed {
                array: self.name.clone(),
                detail: detail.clone(),
            }),
            None => Ok(()),
        }
    }

    /// A slot has no device to read at all (missing or faulty); a member being rebuilt counts as
    /// present.
    fn has_absent_slot(&self) -> bool {
        lock(&self.meta).slots.iter().any(|s| {
            s.member.is_none() || !matches!(s.state, MemberState::Active | MemberState::Rebuilding)
        })
    }

    /// Slots with no device to read or write (missing or faulty).
    fn absent_slots(&self) -> usize {
        lock(&self.meta)
            .slots
            .iter()
            .filter(|s| {
                s.member.is_none()
                    || !matches!(s.state, MemberState::Active | MemberState::Rebuilding)
            })
            .count()
    }

    fn is_degraded(&self) -> bool {
        lock(&self.meta)
            .slots
            .iter()
            .any(|s| s.state != MemberState::Active || s.member.is_none())
    }

    fn all_devices(&self) -> Vec<(Arc<dyn Member>, Role)> {
        let m = lock(&self.meta);
        let mut out: Vec<(Arc<dyn Member>, Role)> = m
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| s.member.clone().map(|d| (d, Role::Slot(i as u32))))
            .collect();
        out.extend(m.spares.iter().map(|s| (s.member.clone(), Role::Spare)));
        out.extend(
            m.replacement
                .iter()
                .map(|r| (r.member.clone(), Role::Spare)),
        );
        out
    }

    fn member_off(&self, row: u64, within: u64) -> u64 {
        self.data_offset + row * self.geo.chunk_bytes + within
    }

    fn region_rows(&self, region: u64) -> (u64, u64) {
        let range = self.with_bitmap(|b| b.region_range(region));
        let c = self.geo.chunk_bytes;
        (range.start / c, (range.end / c).min(self.geo.rows))
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<()> {
        let size = self.geo.size_bytes();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(ArrayError::OutOfRange {
                array: self.name.clone(),
                offset,
                len,
                size,
            });
        }
        Ok(())
    }

    /// The lock shards of `rows`, sorted and without repeats: every locker takes shards in
    /// ascending order, so two lockers never wait for each other in a cycle.
    fn row_shards(rows: impl IntoIterator<Item = u64>) -> Vec<usize> {
        let mut shards: Vec<usize> = rows
            .into_iter()
            .map(|r| (r % ROW_LOCK_SHARDS) as usize)
            .collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }

    async fn lock_rows(
        &self,
        rows: impl IntoIterator<Item = u64>,
    ) -> Vec<tokio::sync::MutexGuard<'_, ()>> {
        let mut guards = Vec::new();
        for s in Self::row_shards(rows) {
            guards.push(self.row_locks[s].lock().await);
        }
        guards
    }

    /// [`Inner::lock_rows`] with guards that own their lock, to travel between pipeline stages.
    async fn lock_rows_owned(
        &self,
        rows: impl IntoIterator<Item = u64>,
    ) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let mut guards = Vec::new();
        for s in Self::row_shards(rows) {
            guards.push(Arc::clone(&self.row_locks[s]).lock_owned().await);
        }
        guards
    }
}
