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

use crate::assemble::{self, AssembleError, Candidate, SlotStart};
use crate::bitmap::{self, Bitmap, BITMAP_BLOCK_BYTES};
use crate::layout::{ChunkRole, Extent, Geometry, LayoutError, Level};
use crate::parity::{self, RowBufs};
use crate::rowplan::{self, Piece, COLUMN_BYTES};
use crate::superblock::{
    BitmapGeometry, MemberEntry, MemberState, RebuildCheckpoint, Role, Superblock, SuperblockError,
    DATA_OFFSET_BYTES, NAME_BYTES, SUPERBLOCK_BYTES,
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

/// Scrub mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ScrubMode {
    /// Count mismatching stripes only.
    Check,
    /// Count and rewrite parity / mirror copies from the data.
    Repair,
}

/// Outcome of a scrub.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScrubReport {
    pub rows_checked: u64,
    pub mismatches: u64,
    pub repaired: u64,
}

/// What a resync does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResyncKind {
    /// Every row, from a checkpoint.
    Full,
    /// Only rows of regions the write-intent bitmap marks.
    Bitmap,
}

/// Progress of the current or last rebuild.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildStatus {
    pub slot: usize,
    pub member: String,
    pub kind: ResyncKind,
    pub running: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    pub rate_bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
    pub error: Option<String>,
}

/// One slot or spare in [`ArrayStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Slot number, `None` for spares.
    pub slot: Option<usize>,
    /// Member name, `None` when the slot has no device.
    pub name: Option<String>,
    pub state: MemberState,
}

/// What `mdadm --detail` tells, serialisable for the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayStatus {
    pub name: String,
    pub uuid: Uuid,
    pub level: Level,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    pub stripe_bytes: u64,
    pub members: Vec<MemberStatus>,
    pub degraded: bool,
    pub failed: bool,
    pub events: u64,
    pub applied_seq: u64,
    pub rebuild: Option<RebuildStatus>,
    pub mismatch_count: u64,
    pub scrub_running: bool,
    /// Regions resynchronised from the bitmap for returning members (cumulative).
    pub bitmap_resync_regions: u64,
    /// Regions resynchronised at assembly after an unclean shutdown.
    pub unclean_resync_regions: u64,
    pub bitmap_dirty_regions: u64,
    pub bitmap_region_bytes: u64,
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
    rebuild: Option<RebuildCheckpoint>,
    failed: Option<String>,
}

/// How one rebuild batch ended.
enum BatchOutcome {
    Done,
    /// The target left its slot or the array failed: stop this resync quietly.
    TargetGone,
    Error(String),
}

/// Row locks of one rebuild batch, held from before its sources are read until its target
/// write completes, so no foreground write to those rows can land in between.
type BatchLocks = Vec<tokio::sync::OwnedMutexGuard<()>>;

/// A rebuild batch read and recomputed, waiting for its target write.
struct RebuiltBatch {
    _rows: BatchLocks,
    slot: usize,
    dev: Uuid,
    target: Arc<dyn Member>,
    offset: u64,
    out: Bytes,
}

/// What reading and recomputing a rebuild batch gave.
enum Prepared {
    Ready(RebuiltBatch),
    /// A source failed (and is now faulty): retry with the remaining members, same locks.
    Retry(BatchLocks),
    TargetGone,
}

/// Index of the first batch not covered by `done_rows` rows of completed batches.
fn done_batches(batches: &[(u64, u64)], done_rows: u64) -> usize {
    let mut rows = 0;
    for (i, (a, b)) in batches.iter().enumerate() {
        if rows >= done_rows {
            return i;
        }
        rows += b - a;
    }
    batches.len()
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
    row_locks: Vec<Arc<tokio::sync::Mutex<()>>>,
    bitmap: Mutex<Bitmap>,
    bitmap_io: tokio::sync::Mutex<()>,
    progress: Mutex<Option<RebuildStatus>>,
    rebuild_running: AtomicBool,
    rebuild_task: Mutex<Option<tokio::task::JoinHandle<()>>>,
    scrub_running: AtomicBool,
    stop: AtomicBool,
    rate_limit_bytes_per_sec: AtomicU64,
    mismatches: AtomicU64,
    bitmap_resync_regions: AtomicU64,
    unclean_resync_regions: AtomicU64,
    read_rr: AtomicUsize,
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
    /// Creates a new array over `members` (in slot order) with `spares`, writing fresh
    /// superblocks and an empty bitmap. The data areas are discarded (punched, or zero-filled by
    /// members that cannot punch) so the array reads as zeroes and parity is consistent from the
    /// start; `CreateOptions::assume_clean` skips that for images known to be blank.
    pub async fn create(
        name: &str,
        level: Level,
        chunk_bytes: u64,
        members: Vec<Arc<dyn Member>>,
        spares: Vec<Arc<dyn Member>>,
    ) -> Result<Array> {
        Self::create_with(
            name,
            level,
            chunk_bytes,
            members,
            spares,
            CreateOptions::default(),
        )
        .await
    }

    /// [`Array::create`] with options.
    pub async fn create_with(
        name: &str,
        level: Level,
        chunk_bytes: u64,
        members: Vec<Arc<dyn Member>>,
        spares: Vec<Arc<dyn Member>>,
        opts: CreateOptions,
    ) -> Result<Array> {
        let invalid = |what: String| ArrayError::Invalid {
            array: name.to_string(),
            what,
        };
        if name.is_empty() || name.len() > NAME_BYTES {
            return Err(invalid(format!("name must be 1..={NAME_BYTES} bytes")));
        }
        let all: Vec<&Arc<dyn Member>> = members.iter().chain(spares.iter()).collect();
        for (i, m) in all.iter().enumerate() {
            for o in &all[..i] {
                if m.name() == o.name() || Arc::ptr_eq(m, o) {
                    return Err(invalid(format!("member {} is listed twice", m.name())));
                }
            }
        }
        let min_size = all.iter().map(|m| m.size()).min().unwrap_or(0);
        let usable = opts.member_bytes.unwrap_or(u64::MAX).min(min_size);
        let need = DATA_OFFSET_BYTES + chunk_bytes.max(4096);
        for m in &all {
            if m.size() < need {
                return Err(ArrayError::MemberTooSmall {
                    array: name.to_string(),
                    member: m.name().to_string(),
                    size_bytes: m.size(),
                    need_bytes: need,
                });
            }
        }
        let geo = Geometry::new(
            level,
            members.len(),
            chunk_bytes,
            usable.saturating_sub(DATA_OFFSET_BYTES),
        )
        .map_err(|source| ArrayError::Layout {
            array: name.to_string(),
            source,
        })?;
        let bgeo = bitmap::geometry(
            geo.member_data_bytes(),
            chunk_bytes,
            opts.bitmap_region_bytes,
        );
        let slots = members
            .into_iter()
            .map(|m| Slot {
                member: Some(m),
                dev_uuid: Uuid::new_v4(),
                state: MemberState::Active,
                left_events: 0,
                resync: None,
            })
            .collect();
        let spares = spares
            .into_iter()
            .map(|m| Spare {
                member: m,
                dev_uuid: Uuid::new_v4(),
            })
            .collect();
        let meta = Meta {
            slots,
            spares,
            events: 1,
            applied_seq: 0,
            clean: false,
            rebuild: None,
            failed: None,
        };
        let inner = Arc::new(Inner::new(
            name.to_string(),
            Uuid::new_v4(),
            geo,
            DATA_OFFSET_BYTES,
            bgeo,
            meta,
            Bitmap::new(bgeo),
        ));
        // Empty bitmap on every member, blank data areas, then the superblocks.
        let bm_len = inner.with_bitmap(|b| b.stored_len());
        let zeros = Bytes::from(vec![0u8; bm_len as usize]);
        let targets = inner.all_devices();
        if !opts.assume_clean {
            let area = geo.member_data_bytes();
            let results = join_all(
                targets
                    .iter()
                    .map(|(m, _)| m.discard(DATA_OFFSET_BYTES, area)),
            )
            .await;
            for ((m, _), r) in targets.iter().zip(results) {
                r.map_err(|source| ArrayError::MemberIo {
                    array: name.to_string(),
                    member: m.name().to_string(),
                    op: "discard of the data area",
                    source,
                })?;
            }
        }
        for (m, _) in &targets {
            m.write_at(bgeo.offset, zeros.clone())
                .await
                .map_err(|source| ArrayError::MemberIo {
                    array: name.to_string(),
                    member: m.name().to_string(),
                    op: "bitmap write",
                    source,
                })?;
        }
        inner.write_superblocks_strict().await?;
        Ok(Array { inner })
    }

    /// Assembles an array from the superblocks on `members` (any order; spares included).
    /// Starts degraded when members are missing or stale, resyncs dirty bitmap regions after an
    /// unclean shutdown, and starts rebuilds of stale members in the background.
    pub async fn assemble(members: Vec<Arc<dyn Member>>) -> Result<Array> {
        let reads = join_all(members.iter().map(|m| m.read_at(0, SUPERBLOCK_BYTES))).await;
        let mut candidates = Vec::with_capacity(members.len());
        for (m, r) in members.iter().zip(reads) {
            let bytes = r.map_err(|source| ArrayError::MemberIo {
                array: "(assembling)".into(),
                member: m.name().to_string(),
                op: "superblock read",
                source,
            })?;
            candidates.push(Candidate {
                name: m.name().to_string(),
                size_bytes: m.size(),
                superblock: Superblock::decode(&bytes),
            });
        }
        let plan = assemble::plan(&candidates)?;
        let sb = &plan.superblock;
        let geo = Geometry::new(
            sb.level,
            sb.member_count as usize,
            sb.chunk_bytes,
            sb.member_data_bytes,
        )
        .map_err(|source| ArrayError::Layout {
            array: sb.name.clone(),
            source,
        })?;
        let mut events = sb.events;
        let mut changed = false;
        let mut slots = Vec::with_capacity(plan.slots.len());
        for (i, sp) in plan.slots.iter().enumerate() {
            let member = sp.member.map(|c| members[c].clone());
            let slot = match sp.start {
                SlotStart::Active => Slot {
                    member,
                    dev_uuid: sp.dev_uuid,
                    state: MemberState::Active,
                    left_events: 0,
                    resync: None,
                },
                SlotStart::Absent => {
                    let (state, left) = match sp.recorded {
                        MemberState::Active | MemberState::Rebuilding => {
                            changed = true;
                            (MemberState::Missing, events)
                        }
                        s => (s, sp.left_events),
                    };
                    Slot {
                        member: None,
                        dev_uuid: sp.dev_uuid,
                        state,
                        left_events: left,
                        resync: None,
                    }
                }
                SlotStart::BitmapResync => Slot {
                    member,
                    dev_uuid: sp.dev_uuid,
                    state: MemberState::Rebuilding,
                    left_events: sp.left_events.max(1),
                    resync: Some((ResyncKind::Bitmap, 0)),
                },
                SlotStart::FullRebuild { from_row } => {
                    changed |= sp.recorded != MemberState::Rebuilding;
                    Slot {
                        member,
                        dev_uuid: sp.dev_uuid,
                        state: MemberState::Rebuilding,
                        left_events: 0,
                        resync: Some((ResyncKind::Full, from_row.min(geo.rows))),
                    }
                }
            };
            tracing::info!(array = %sb.name, slot = i, start = ?sp.start, "assembling slot");
            slots.push(slot);
        }
        for (i, why) in &plan.ignored {
            tracing::warn!(array = %sb.name, member = %members[*i].name(), "{why}; not used");
        }
        if changed {
            events += 1;
        }
        let applied_seq = candidates
            .iter()
            .filter_map(|c| c.superblock.as_ref().ok())
            .filter(|s| s.events == sb.events)
            .map(|s| s.applied_seq)
            .max()
            .unwrap_or(sb.applied_seq);
        let spares = plan
            .spares
            .iter()
            .filter_map(|&i| {
                let dev = candidates[i].superblock.as_ref().ok()?.dev_uuid;
                Some(Spare {
                    member: members[i].clone(),
                    dev_uuid: dev,
                })
            })
            .collect();
        // The bitmap from a member that is active and current.
        let bgeo = sb.bitmap;
        let mut bm = Bitmap::new(bgeo);
        if let Some(src) = slots
            .iter()
            .find(|s| s.state == MemberState::Active)
            .and_then(|s| s.member.clone())
        {
            let stored = src
                .read_at(bgeo.offset, bm.stored_len() as usize)
                .await
                .map_err(|source| ArrayError::MemberIo {
                    array: sb.name.clone(),
                    member: src.name().to_string(),
                    op: "bitmap read",
                    source,
                })?;
            bm = Bitmap::from_bytes(bgeo, &stored);
        }
        let meta = Meta {
            slots,
            spares,
            events,
            applied_seq,
            clean: false,
            rebuild: sb.rebuild,
            failed: None,
        };
        let inner = Arc::new(Inner::new(
            sb.name.clone(),
            sb.array_uuid,
            geo,
            sb.data_offset,
            bgeo,
            meta,
            bm,
        ));
        inner.write_superblocks().await;
        inner.check_failed()?;
        if plan.unclean && geo.level != Level::Raid0 {
            if inner.is_degraded() {
                tracing::warn!(array = %sb.name, "unclean shutdown of a degraded array: parity of dirty regions cannot be checked; relying on the journal");
            } else {
                let regions = inner.with_bitmap(|b| b.dirty_regions());
                for r in &regions {
                    let (r0, r1) = inner.region_rows(*r);
                    inner.scrub_rows(r0, r1, ScrubMode::Repair).await?;
                }
                inner
                    .unclean_resync_regions
                    .fetch_add(regions.len() as u64, Ordering::SeqCst);
                tracing::info!(array = %sb.name, regions = regions.len(), "resynced dirty regions after unclean shutdown");
            }
        }
        inner.kick_rebuild();
        Ok(Array { inner })
    }

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

    /// Writes `data` at `offset`.
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<()> {
        self.inner.write(offset, data).await
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
        lock(&self.inner.meta).applied_seq = seq;
        self.inner.write_superblocks().await;
        self.inner.check_failed()
    }

    /// Status for operators.
    pub fn status(&self) -> ArrayStatus {
        self.inner.status()
    }

    /// Marks the member in `slot` faulty (like an I/O error would); a hot spare takes over.
    pub async fn fail_member(&self, slot: usize) -> Result<()> {
        self.inner.check_slot(slot)?;
        self.inner
            .member_failed(slot, "operator fail", None, true)
            .await;
        Ok(())
    }

    /// Detaches the device of a faulty (or rebuilding) slot, which becomes missing.
    pub async fn remove_member(&self, slot: usize) -> Result<()> {
        self.inner.check_slot(slot)?;
        {
            let mut m = lock(&self.inner.meta);
            let s = &mut m.slots[slot];
            if s.state == MemberState::Active {
                return Err(self
                    .inner
                    .invalid(format!("slot {slot} is active; fail it before removing it")));
            }
            if s.state == MemberState::Rebuilding {
                s.left_events = 0;
            }
            s.member = None;
            s.resync = None;
            if s.state != MemberState::Faulty {
                s.state = MemberState::Missing;
            }
            m.events += 1;
        }
        self.inner.write_superblocks().await;
        Ok(())
    }

    /// Removes a spare by member name.
    pub async fn remove_spare(&self, name: &str) -> Result<()> {
        let found = {
            let mut m = lock(&self.inner.meta);
            let before = m.spares.len();
            m.spares.retain(|s| s.member.name() != name);
            before != m.spares.len()
        };
        if !found {
            return Err(self.inner.invalid(format!("no spare named {name}")));
        }
        self.inner.write_superblocks().await;
        Ok(())
    }

    /// Adds a device: a member that comes back to its empty slot is resynchronised from the
    /// bitmap; otherwise it fills an empty slot (full rebuild) or becomes a spare.
    pub async fn add_member(&self, member: Arc<dyn Member>) -> Result<MemberStatus> {
        self.inner.add_member(member, None).await
    }

    /// Replaces the device of `slot` by `new`: the old device is failed and removed and `new`
    /// is rebuilt in its place. Redundancy is reduced while the rebuild runs.
    pub async fn replace_member(&self, slot: usize, new: Arc<dyn Member>) -> Result<MemberStatus> {
        self.inner.check_slot(slot)?;
        let active = lock(&self.inner.meta).slots[slot].state == MemberState::Active;
        if active {
            self.inner.member_failed(slot, "replace", None, false).await;
        }
        self.remove_member(slot).await?;
        self.inner.add_member(new, Some(slot)).await
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
            row_locks: (0..ROW_LOCK_SHARDS)
                .map(|_| Arc::new(tokio::sync::Mutex::new(())))
                .collect(),
            bitmap: Mutex::new(bitmap),
            bitmap_io: tokio::sync::Mutex::new(()),
            progress: Mutex::new(None),
            rebuild_running: AtomicBool::new(false),
            rebuild_task: Mutex::new(None),
            scrub_running: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            rate_limit_bytes_per_sec: AtomicU64::new(0),
            mismatches: AtomicU64::new(0),
            bitmap_resync_regions: AtomicU64::new(0),
            unclean_resync_regions: AtomicU64::new(0),
            read_rr: AtomicUsize::new(0),
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

    // ---------- superblocks ----------

    fn superblock_for(&self, m: &Meta, role: Role, dev_uuid: Uuid) -> Superblock {
        let bgeo = lock(&self.bitmap).geometry();
        Superblock {
            array_uuid: self.uuid,
            name: self.name.clone(),
            level: self.geo.level,
            chunk_bytes: self.geo.chunk_bytes,
            member_count: self.geo.members as u32,
            role,
            dev_uuid,
            events: m.events,
            applied_seq: m.applied_seq,
            data_offset: self.data_offset,
            member_data_bytes: self.geo.member_data_bytes(),
            array_bytes: self.geo.size_bytes(),
            clean: m.clean,
            rebuild: m.rebuild,
            bitmap: bgeo,
            members: m
                .slots
                .iter()
                .map(|s| MemberEntry {
                    dev_uuid: s.dev_uuid,
                    state: match (s.state, s.resync) {
                        // A bitmap resync is recorded as the absence it repairs, so a restart
                        // resyncs from the bitmap again.
                        (MemberState::Rebuilding, Some((ResyncKind::Bitmap, _))) => {
                            MemberState::Faulty
                        }
                        (st, _) => st,
                    },
                    left_events: s.left_events,
                })
                .collect(),
        }
    }

    /// Writes (and syncs) the superblock on every attached device; a device that fails is
    /// marked faulty and the round is repeated without it.
    async fn write_superblocks(self: &Arc<Self>) {
        let _g = self.sb_lock.lock().await;
        for _round in 0..=self.geo.members + 1 {
            let targets: Vec<(Option<usize>, Arc<dyn Member>, Bytes)> = {
                let m = lock(&self.meta);
                let mut t = Vec::new();
                for (i, s) in m.slots.iter().enumerate() {
                    if let (Some(d), MemberState::Active | MemberState::Rebuilding) =
                        (&s.member, s.state)
                    {
                        let sb = self.superblock_for(&m, Role::Slot(i as u32), s.dev_uuid);
                        t.push((Some(i), d.clone(), Bytes::from(sb.encode())));
                    }
                }
                for sp in &m.spares {
                    let sb = self.superblock_for(&m, Role::Spare, sp.dev_uuid);
                    t.push((None, sp.member.clone(), Bytes::from(sb.encode())));
                }
                t
            };
            let results = join_all(targets.iter().map(|(_, d, b)| async move {
                d.write_at(0, b.clone()).await?;
                d.sync().await
            }))
            .await;
            let mut any_failed = false;
            for ((slot, d, _), r) in targets.iter().zip(results) {
                if let Err(e) = r {
                    tracing::error!(array = %self.name, member = %d.name(), error = %e, "superblock write failed");
                    any_failed = true;
                    match slot {
                        Some(i) => {
                            let mut m = lock(&self.meta);
                            self.mark_faulty_locked(&mut m, *i, true);
                        }
                        None => {
                            lock(&self.meta)
                                .spares
                                .retain(|s| !Arc::ptr_eq(&s.member, d));
                        }
                    }
                }
            }
            if !any_failed {
                break;
            }
        }
        self.kick_rebuild();
    }

    /// Like `write_superblocks` but any failure is an error (used at create).
    async fn write_superblocks_strict(self: &Arc<Self>) -> Result<()> {
        let targets: Vec<(Arc<dyn Member>, Bytes)> = {
            let m = lock(&self.meta);
            let mut t = Vec::new();
            for (i, s) in m.slots.iter().enumerate() {
                if let Some(d) = &s.member {
                    t.push((
                        d.clone(),
                        Bytes::from(
                            self.superblock_for(&m, Role::Slot(i as u32), s.dev_uuid)
                                .encode(),
                        ),
                    ));
                }
            }
            for sp in &m.spares {
                t.push((
                    sp.member.clone(),
                    Bytes::from(self.superblock_for(&m, Role::Spare, sp.dev_uuid).encode()),
                ));
            }
            t
        };
        for (d, b) in targets {
            let r = async {
                d.write_at(0, b).await?;
                d.sync().await
            }
            .await;
            r.map_err(|source| ArrayError::MemberIo {
                array: self.name.clone(),
                member: d.name().to_string(),
                op: "superblock write",
                source,
            })?;
        }
        Ok(())
    }

    /// Marks `slot` faulty in `m`; returns whether a spare took the slot.
    fn mark_faulty_locked(&self, m: &mut Meta, slot: usize, use_spare: bool) -> bool {
        let s = &mut m.slots[slot];
        if !matches!(s.state, MemberState::Active | MemberState::Rebuilding) {
            return false;
        }
        let was_active = s.state == MemberState::Active;
        s.state = MemberState::Faulty;
        s.resync = None;
        s.left_events = if was_active { m.events } else { 0 };
        if m.rebuild.is_some_and(|c| c.slot as usize == slot) {
            m.rebuild = None;
        }
        m.events += 1;
        tracing::warn!(array = %self.name, slot, "member marked faulty");
        let down: Vec<bool> = m
            .slots
            .iter()
            .map(|s| s.state != MemberState::Active || s.member.is_none())
            .collect();
        if !self.geo.survives(&down) && m.failed.is_none() {
            let detail = format!(
                "{} of {} members unusable for {}",
                down.iter().filter(|d| **d).count(),
                m.slots.len(),
                self.geo.level
            );
            tracing::error!(array = %self.name, %detail, "array failed");
            m.failed = Some(detail);
        }
        if use_spare && m.failed.is_none() && !m.spares.is_empty() {
            let sp = m.spares.remove(0);
            let s = &mut m.slots[slot];
            tracing::info!(array = %self.name, slot, spare = %sp.member.name(), "hot spare takes the slot");
            s.member = Some(sp.member);
            s.dev_uuid = sp.dev_uuid;
            s.state = MemberState::Rebuilding;
            s.left_events = 0;
            s.resync = Some((ResyncKind::Full, 0));
            m.rebuild = Some(RebuildCheckpoint {
                slot: slot as u32,
                rows_done: 0,
            });
            return true;
        }
        false
    }

    /// Handles an I/O error (or operator request) on `slot`.
    async fn member_failed(
        self: &Arc<Self>,
        slot: usize,
        op: &str,
        err: Option<&io::Error>,
        use_spare: bool,
    ) {
        self.slot_failed(slot, None, op, err, use_spare).await
    }

    /// An I/O error of device `dev` in `slot`. Ignored when the slot holds another device by
    /// now (a spare or a replacement took over while the I/O was in flight): the error says
    /// nothing about the new device.
    async fn device_failed(
        self: &Arc<Self>,
        slot: usize,
        dev: &Arc<dyn Member>,
        op: &str,
        err: &io::Error,
    ) {
        self.slot_failed(slot, Some(dev), op, Some(err), true).await
    }

    /// Issues member writes `(slot, offset, bytes)` of `view` concurrently; a device whose write
    /// fails is marked faulty.
    async fn write_members(self: &Arc<Self>, view: &View, writes: Vec<(usize, u64, Bytes)>) {
        let results = join_all(writes.into_iter().filter_map(|(m, off, b)| {
            let dv = view.members[m].clone()?;
            Some(async move {
                let r = dv.write_at(off, b).await;
                (m, dv, r)
            })
        }))
        .await;
        for (m, dv, r) in results {
            if let Err(e) = r {
                self.device_failed(m, &dv, "write", &e).await;
            }
        }
    }

    async fn slot_failed(
        self: &Arc<Self>,
        slot: usize,
        dev: Option<&Arc<dyn Member>>,
        op: &str,
        err: Option<&io::Error>,
        use_spare: bool,
    ) {
        let changed = {
            let mut m = lock(&self.meta);
            if let Some(dev) = dev {
                let current = m.slots[slot]
                    .member
                    .as_ref()
                    .is_some_and(|d| Arc::ptr_eq(d, dev));
                if !current {
                    tracing::warn!(array = %self.name, slot, member = %dev.name(), op,
                        "I/O error of a device no longer in its slot; ignored");
                    return;
                }
            }
            let before = m.slots[slot].state;
            if let (Some(e), Some(d)) = (err, &m.slots[slot].member) {
                tracing::error!(array = %self.name, member = %d.name(), op, error = %e, "member I/O failed");
            }
            self.mark_faulty_locked(&mut m, slot, use_spare);
            before != m.slots[slot].state || m.slots[slot].state == MemberState::Rebuilding
        };
        if changed {
            self.write_superblocks().await;
        }
    }

    // ---------- reads ----------

    async fn read_member(
        self: &Arc<Self>,
        slot: usize,
        d: &Arc<dyn Member>,
        off: u64,
        len: u64,
    ) -> Option<Bytes> {
        match d.read_at(off, len as usize).await {
            Ok(b) if b.len() as u64 == len => Some(b),
            Ok(b) => {
                let e = io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("short read: {} of {len} bytes", b.len()),
                );
                self.device_failed(slot, d, "read", &e).await;
                None
            }
            Err(e) => {
                self.device_failed(slot, d, "read", &e).await;
                None
            }
        }
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

    async fn read(self: &Arc<Self>, offset: u64, len: u64) -> Result<Bytes> {
        self.check_range(offset, len)?;
        self.check_failed()?;
        let exts = self.geo.extents(offset, len);
        if exts.len() == 1 {
            return self.read_extent(exts[0]).await;
        }
        let parts = try_join_all(exts.iter().map(|e| self.read_extent(*e))).await?;
        let mut out = BytesMut::with_capacity(len as usize);
        for p in parts {
            out.extend_from_slice(&p);
        }
        Ok(out.freeze())
    }

    async fn read_extent(self: &Arc<Self>, e: Extent) -> Result<Bytes> {
        for _attempt in 0..=self.geo.members {
            self.check_failed()?;
            let view = self.view();
            let places = self.geo.places(e.chunk);
            let start = self.read_rr.fetch_add(1, Ordering::Relaxed);
            let pick = (0..places.len())
                .map(|j| places[(start + j) % places.len()])
                .find(|p| view.readable[p.member]);
            match pick {
                Some(p) => {
                    let Some(d) = view.members[p.member].clone() else {
                        continue;
                    };
                    if let Some(b) = self
                        .read_member(
                            p.member,
                            &d,
                            self.member_off(p.row, e.offset_in_chunk),
                            e.len,
                        )
                        .await
                    {
                        return Ok(b);
                    }
                }
                None if self.geo.level.parity_chunks() > 0 => {
                    let row = places[0].row;
                    let i = (e.chunk % self.geo.data_per_row() as u64) as usize;
                    let _g = self.lock_rows([row]).await;
                    if let Some(b) = self
                        .reconstruct(row, i, e.offset_in_chunk, e.offset_in_chunk + e.len)
                        .await?
                    {
                        return Ok(b);
                    }
                }
                None => break,
            }
        }
        self.check_failed()?;
        Err(ArrayError::Failed {
            array: self.name.clone(),
            detail: format!("no readable copy of chunk {}", e.chunk),
        })
    }

    /// Reads `[lo, hi)` of every readable member of `row` (skipping `skip`) and recovers the row.
    /// `None` means a member failed meanwhile: retry. Caller holds the row lock.
    async fn gather_row(
        self: &Arc<Self>,
        row: u64,
        lo: u64,
        hi: u64,
        want: &[bool],
    ) -> Result<Option<RowBufs>> {
        let view = self.view();
        let n = self.geo.members;
        let reads = join_all((0..n).map(|m| {
            let d = view.members[m].clone();
            let go = view.readable[m] && want[m];
            async move {
                match (go, d) {
                    (true, Some(d)) => Some(
                        self.read_member(m, &d, self.member_off(row, lo), hi - lo)
                            .await,
                    ),
                    _ => None,
                }
            }
        }))
        .await;
        let mut rb = RowBufs {
            data: vec![None; self.geo.data_per_row()],
            p: None,
            q: None,
            has_q: self.geo.level == Level::Raid6,
        };
        for (m, r) in reads.into_iter().enumerate() {
            match r {
                Some(None) => return Ok(None),
                Some(Some(b)) => {
                    let v = b.to_vec();
                    match self.geo.role(row, m) {
                        ChunkRole::Data(i) => rb.data[i] = Some(v),
                        ChunkRole::P => rb.p = Some(v),
                        ChunkRole::Q => rb.q = Some(v),
                    }
                }
                None => {}
            }
        }
        match parity::recover(&mut rb) {
            Ok(()) => Ok(Some(rb)),
            Err(e) => {
                self.check_failed()?;
                Err(ArrayError::Failed {
                    array: self.name.clone(),
                    detail: format!("row {row}: {e}"),
                })
            }
        }
    }

    async fn reconstruct(
        self: &Arc<Self>,
        row: u64,
        i: usize,
        lo: u64,
        hi: u64,
    ) -> Result<Option<Bytes>> {
        let want = vec![true; self.geo.members];
        Ok(self
            .gather_row(row, lo, hi, &want)
            .await?
            .and_then(|mut rb| rb.data[i].take().map(Bytes::from)))
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

    // ---------- writes ----------

    async fn write(self: &Arc<Self>, offset: u64, data: Bytes) -> Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        self.check_failed()?;
        if len == 0 {
            return Ok(());
        }
        let exts = self.geo.extents(offset, len);
        let (first_row, last_row) = self.rows_span(&exts);
        let c = self.geo.chunk_bytes;
        let tracked = self.geo.level != Level::Raid0;
        if tracked {
            self.bitmap_begin(first_row * c, (last_row + 1) * c).await?;
        }
        let res = if self.geo.level.parity_chunks() > 0 {
            let d = self.geo.data_per_row() as u64;
            let mut groups: Vec<Vec<Extent>> = Vec::new();
            for e in exts {
                match groups.last_mut() {
                    Some(g) if g[0].chunk / d == e.chunk / d => g.push(e),
                    _ => groups.push(vec![e]),
                }
            }
            try_join_all(groups.into_iter().map(|g| self.write_parity_row(g, &data)))
                .await
                .map(|_| ())
        } else {
            try_join_all(exts.into_iter().map(|e| {
                self.write_copies(
                    e,
                    data.slice(e.buf_offset as usize..(e.buf_offset + e.len) as usize),
                )
            }))
            .await
            .map(|_| ())
        };
        if tracked {
            self.with_bitmap(|b| {
                let rs = b.regions(first_row * c, (last_row + 1) * c);
                b.end_write(rs)
            });
        }
        res?;
        self.check_failed()
    }

    async fn write_scattered(self: &Arc<Self>, writes: Vec<(u64, Bytes)>) -> Result<()> {
        for (offset, data) in &writes {
            self.check_range(*offset, data.len() as u64)?;
        }
        let mut sorted: Vec<(u64, u64)> = writes
            .iter()
            .map(|(o, d)| (*o, d.len() as u64))
            .filter(|(_, len)| *len > 0)
            .collect();
        sorted.sort_unstable();
        if let Some(w) = sorted.windows(2).find(|w| w[0].0 + w[0].1 > w[1].0) {
            return Err(self.invalid(format!(
                "scattered writes overlap: {}+{} and {}+{}",
                w[0].0, w[0].1, w[1].0, w[1].1
            )));
        }
        self.check_failed()?;
        if self.geo.level.parity_chunks() == 0 {
            return try_join_all(writes.into_iter().map(|(o, d)| self.write(o, d)))
                .await
                .map(|_| ());
        }
        // Pieces by row; a write that crosses rows goes its own way.
        let d = self.geo.data_per_row() as u64;
        let mut rows: std::collections::BTreeMap<u64, Vec<(Piece, Bytes)>> = Default::default();
        let mut spanning = Vec::new();
        for (offset, data) in writes {
            if data.is_empty() {
                continue;
            }
            let exts = self.geo.extents(offset, data.len() as u64);
            let row = exts[0].chunk / d;
            if exts.iter().any(|e| e.chunk / d != row) {
                spanning.push((offset, data));
                continue;
            }
            let pieces = rows.entry(row).or_default();
            for e in exts {
                let piece = Piece {
                    data: (e.chunk % d) as usize,
                    start: e.offset_in_chunk,
                    len: e.len,
                };
                let at = e.buf_offset as usize;
                pieces.push((piece, data.slice(at..at + e.len as usize)));
            }
        }
        // Every job runs to its end even when one fails: dropping the others mid-way would
        // release their row locks while their member writes are still in flight.
        let row_jobs = join_all(
            rows.into_iter()
                .map(|(row, pieces)| self.write_row_pieces(row, pieces)),
        );
        let spanning_jobs = join_all(spanning.into_iter().map(|(o, b)| self.write(o, b)));
        let (a, b) = futures_util::future::join(row_jobs, spanning_jobs).await;
        a.into_iter().chain(b).collect::<Result<Vec<()>>>()?;
        self.check_failed()
    }

    /// Writes pieces that all lie in parity row `row`, as one plan when every member of the row
    /// is healthy, else piece by piece through the degraded-capable path.
    async fn write_row_pieces(
        self: &Arc<Self>,
        row: u64,
        pieces: Vec<(Piece, Bytes)>,
    ) -> Result<()> {
        let c = self.geo.chunk_bytes;
        self.bitmap_begin(row * c, (row + 1) * c).await?;
        let res = self.write_row_pieces_tracked(row, pieces).await;
        self.with_bitmap(|b| {
            let rs = b.regions(row * c, (row + 1) * c);
            b.end_write(rs)
        });
        res
    }

    async fn write_row_pieces_tracked(
        self: &Arc<Self>,
        row: u64,
        pieces: Vec<(Piece, Bytes)>,
    ) -> Result<()> {
        let geo = self.geo;
        let d = geo.data_per_row();
        let np = geo.level.parity_chunks();
        let shape: Vec<Piece> = pieces.iter().map(|(p, _)| *p).collect();
        let plan = rowplan::plan(d, np, geo.chunk_bytes, &shape)
            .map_err(|e| self.invalid(format!("row {row}: {e}")))?;
        let member_of = |role: usize| match role {
            r if r < d => geo.data_member(row, r),
            r if r == d => geo.p_member(row),
            _ => geo.q_member(row),
        };
        {
            let _g = self.lock_rows([row]).await;
            self.check_failed()?;
            let view = self.view();
            let healthy =
                (0..d + np).all(|r| view.readable[member_of(r)] && view.writable[member_of(r)]);
            if healthy {
                // Reads.
                let reads = join_all(plan.reads.iter().enumerate().flat_map(|(role, runs)| {
                    let m = member_of(role);
                    let dv = view.members[m].clone();
                    runs.iter().map(move |r| {
                        let dv = dv.clone();
                        async move {
                            let dv = dv?;
                            let off = self.member_off(row, r.first * COLUMN_BYTES);
                            self.read_member(m, &dv, off, r.columns() * COLUMN_BYTES)
                                .await
                        }
                    })
                }))
                .await;
                if reads.iter().all(Option::is_some) {
                    let mut it = reads.into_iter().flatten();
                    let old: Vec<Vec<Bytes>> = plan
                        .reads
                        .iter()
                        .map(|runs| it.by_ref().take(runs.len()).collect())
                        .collect();
                    let old_refs: Vec<Vec<&[u8]>> = old
                        .iter()
                        .map(|v| v.iter().map(|b| b.as_ref()).collect())
                        .collect();
                    let mut bufs: Vec<Vec<AlignedBuf>> = plan
                        .writes
                        .iter()
                        .map(|runs| {
                            runs.iter()
                                .map(|r| AlignedBuf::zeroed((r.columns() * COLUMN_BYTES) as usize))
                                .collect()
                        })
                        .collect();
                    {
                        let mut outs: Vec<Vec<&mut [u8]>> = bufs
                            .iter_mut()
                            .map(|v| v.iter_mut().map(|b| &mut b[..]).collect())
                            .collect();
                        let data: Vec<&[u8]> = pieces.iter().map(|(_, b)| b.as_ref()).collect();
                        rowplan::compute(&plan, d, &shape, &data, &old_refs, &mut outs)
                            .map_err(|e| self.invalid(format!("row {row}: {e}")))?;
                    }
                    let writes: Vec<(usize, u64, Bytes)> = plan
                        .writes
                        .iter()
                        .zip(bufs)
                        .enumerate()
                        .flat_map(|(role, (runs, bufs))| {
                            let m = member_of(role);
                            runs.iter().zip(bufs).map(move |(r, b)| {
                                (
                                    m,
                                    self.member_off(row, r.first * COLUMN_BYTES),
                                    b.into_bytes(),
                                )
                            })
                        })
                        .collect();
                    // Members may have failed (or a spare arrived) during the reads: write to
                    // what is writable now; the blocks computed are right for any of them.
                    let now = self.view();
                    let writes = writes
                        .into_iter()
                        .filter(|(m, _, _)| now.writable[*m])
                        .collect();
                    self.write_members(&now, writes).await;
                    return self.check_failed();
                }
                // A read failed (its member is now faulty): nothing was written yet.
            }
        }
        for (p, data) in pieces {
            let e = Extent {
                chunk: row * d as u64 + p.data as u64,
                offset_in_chunk: p.start,
                len: p.len,
                buf_offset: 0,
            };
            self.write_parity_row(vec![e], &data).await?;
        }
        self.check_failed()
    }

    fn rows_span(&self, exts: &[Extent]) -> (u64, u64) {
        let mut lo = u64::MAX;
        let mut hi = 0;
        for e in [exts.first(), exts.last()].into_iter().flatten() {
            for p in self.geo.places(e.chunk) {
                lo = lo.min(p.row);
                hi = hi.max(p.row);
            }
        }
        if self.geo.level == Level::Raid10 {
            // copies of the first/last chunk bound the rows in between
            lo = lo.saturating_sub(1);
            hi = (hi + 1).min(self.geo.rows - 1);
        }
        (lo, hi)
    }

    /// Registers a write to member offsets `[start, end)` in the bitmap (persisting newly set
    /// bits first). On error the registration is undone, so callers that bail out with `?` do
    /// not leave the regions counted as busy.
    async fn bitmap_begin(self: &Arc<Self>, start: u64, end: u64) -> Result<()> {
        let _g = self.bitmap_io.lock().await;
        let blocks = self.with_bitmap(|b| {
            let rs = b.regions(start, end);
            b.begin_write(rs)
        });
        if !blocks.is_empty() {
            self.persist_bitmap(&blocks).await;
        }
        let res = self.check_failed();
        if res.is_err() {
            self.with_bitmap(|b| {
                let rs = b.regions(start, end);
                b.end_write(rs)
            });
        }
        res
    }

    /// Writes bitmap blocks to every writable member. Caller holds `bitmap_io`.
    async fn persist_bitmap(self: &Arc<Self>, blocks: &[u64]) {
        let base = lock(&self.bitmap).geometry().offset;
        let writes: Vec<(u64, Bytes)> = self.with_bitmap(|b| {
            blocks
                .iter()
                .map(|&blk| {
                    (
                        base + blk * BITMAP_BLOCK_BYTES,
                        Bytes::from(b.block_bytes(blk)),
                    )
                })
                .collect()
        });
        let view = self.view();
        let results = join_all(
            (0..self.geo.members)
                .filter(|m| view.writable[*m])
                .filter_map(|m| {
                    let d = view.members[m].clone()?;
                    let writes = writes.clone();
                    Some(async move {
                        for (off, b) in writes {
                            if let Err(e) = d.write_at(off, b).await {
                                return (m, Err(e));
                            }
                        }
                        (m, Ok(()))
                    })
                }),
        )
        .await;
        for (m, r) in results {
            if let Err(e) = r {
                self.member_failed(m, "bitmap write", Some(&e), true).await;
            }
        }
    }

    async fn write_copies(self: &Arc<Self>, e: Extent, bytes: Bytes) -> Result<()> {
        let rows = self.geo.lock_rows(e.chunk);
        let _g = self.lock_rows(rows).await;
        let view = self.view();
        let places = self.geo.places(e.chunk);
        let writes = places
            .iter()
            .filter(|p| view.writable[p.member])
            .map(|p| {
                (
                    p.member,
                    self.member_off(p.row, e.offset_in_chunk),
                    bytes.clone(),
                )
            })
            .collect();
        self.write_members(&view, writes).await;
        self.check_failed()?;
        let view = self.view();
        if !places.iter().any(|p| view.readable[p.member]) {
            return Err(ArrayError::Failed {
                array: self.name.clone(),
                detail: format!("no copy of chunk {} could be written", e.chunk),
            });
        }
        Ok(())
    }

    /// Writes extents that all fall in one parity row.
    async fn write_parity_row(self: &Arc<Self>, exts: Vec<Extent>, data: &Bytes) -> Result<()> {
        let geo = self.geo;
        let d = geo.data_per_row();
        let c = geo.chunk_bytes;
        let row = exts[0].chunk / d as u64;
        let _g = self.lock_rows([row]).await;
        let lo = exts.iter().map(|e| e.offset_in_chunk).min().unwrap_or(0);
        let hi = exts
            .iter()
            .map(|e| e.offset_in_chunk + e.len)
            .max()
            .unwrap_or(0);
        let span = (hi - lo) as usize;
        let raid6 = geo.level == Level::Raid6;
        let mut newdata: Vec<Option<(Extent, Bytes)>> = vec![None; d];
        for e in &exts {
            let i = (e.chunk % d as u64) as usize;
            newdata[i] = Some((
                *e,
                data.slice(e.buf_offset as usize..(e.buf_offset + e.len) as usize),
            ));
        }
        let full = lo == 0
            && hi == c
            && newdata
                .iter()
                .all(|x| x.as_ref().is_some_and(|(e, _)| e.len == c));
        for _attempt in 0..=geo.members {
            self.check_failed()?;
            let view = self.view();
            let pm = geo.p_member(row);
            let qm = geo.q_member(row);
            let parity_readable = view.readable[pm] && (!raid6 || view.readable[qm]);
            let touched: Vec<usize> = (0..d).filter(|i| newdata[*i].is_some()).collect();
            let fully: usize = newdata
                .iter()
                .flatten()
                .filter(|(e, _)| e.offset_in_chunk == lo && e.len as usize == span)
                .count();
            let rmw_reads = touched.len() + geo.level.parity_chunks();
            let rcw_reads = d - fully;
            let rmw = !full
                && parity_readable
                && touched
                    .iter()
                    .all(|i| view.readable[geo.data_member(row, *i)])
                && rmw_reads < rcw_reads;
            let (p, q) = if full {
                let refs: Vec<&[u8]> = newdata.iter().flatten().map(|(_, b)| b.as_ref()).collect();
                // Page-aligned, so O_DIRECT members write the parity without a bounce copy.
                let mut p = AlignedBuf::zeroed(span);
                let mut q = AlignedBuf::zeroed(if raid6 { span } else { 0 });
                parity::gen_pq(&refs, &mut p, raid6.then_some(&mut q[..]));
                (p.into_bytes(), q.into_bytes())
            } else if rmw {
                let mut want = vec![false; geo.members];
                want[pm] = true;
                if raid6 {
                    want[qm] = true;
                }
                for i in &touched {
                    want[geo.data_member(row, *i)] = true;
                }
                let reads = join_all((0..geo.members).filter(|m| want[*m]).map(|m| {
                    let dv = view.members[m].clone();
                    async move {
                        match dv {
                            Some(dv) => (
                                m,
                                self.read_member(m, &dv, self.member_off(row, lo), hi - lo)
                                    .await,
                            ),
                            None => (m, None),
                        }
                    }
                }))
                .await;
                let mut old: Vec<Option<Vec<u8>>> = vec![None; geo.members];
                let mut ok = true;
                for (m, r) in reads {
                    match r {
                        Some(b) => old[m] = Some(b.to_vec()),
                        None => ok = false,
                    }
                }
                if !ok {
                    continue;
                }
                let mut p = old[pm].take().unwrap_or_default();
                let mut q = if raid6 {
                    old[qm].take().unwrap_or_default()
                } else {
                    Vec::new()
                };
                for &i in &touched {
                    let mut delta = old[geo.data_member(row, i)].take().unwrap_or_default();
                    let before = delta.clone();
                    if let Some((e, b)) = &newdata[i] {
                        let at = (e.offset_in_chunk - lo) as usize;
                        delta[at..at + b.len()].copy_from_slice(b);
                    }
                    parity::xor_into(&mut delta, &before);
                    parity::xor_into(&mut p, &delta);
                    if raid6 {
                        parity::mul_xor_into(parity::gf_pow2(i), &delta, &mut q);
                    }
                }
                (Bytes::from(p), Bytes::from(q))
            } else {
                // Reconstruct-write: every data chunk over [lo, hi), recovered where needed.
                let mut want = vec![true; geo.members];
                let all_data_readable = (0..d).all(|i| view.readable[geo.data_member(row, i)]);
                if all_data_readable {
                    want[pm] = false;
                    if raid6 {
                        want[qm] = false;
                    }
                }
                for (i, nd) in newdata.iter().enumerate() {
                    if nd
                        .as_ref()
                        .is_some_and(|(e, _)| e.offset_in_chunk == lo && e.len as usize == span)
                        && all_data_readable
                    {
                        want[geo.data_member(row, i)] = false;
                    }
                }
                let mut rb = if want.iter().any(|w| *w) || !all_data_readable {
                    if all_data_readable {
                        // read only what is wanted; fully-overwritten chunks get placeholders
                        let view2 = self.view();
                        let reads = join_all((0..d).map(|i| {
                            let m = geo.data_member(row, i);
                            let dv = view2.members[m].clone();
                            let go = want[m];
                            async move {
                                match (go, dv) {
                                    (true, Some(dv)) => Some(
                                        self.read_member(m, &dv, self.member_off(row, lo), hi - lo)
                                            .await,
                                    ),
                                    _ => None,
                                }
                            }
                        }))
                        .await;
                        let mut rb = RowBufs {
                            data: vec![None; d],
                            p: None,
                            q: None,
                            has_q: raid6,
                        };
                        let mut ok = true;
                        for (i, r) in reads.into_iter().enumerate() {
                            match r {
                                Some(Some(b)) => rb.data[i] = Some(b.to_vec()),
                                Some(None) => ok = false,
                                None => rb.data[i] = Some(vec![0u8; span]),
                            }
                        }
                        if !ok {
                            continue;
                        }
                        rb
                    } else {
                        match self.gather_row(row, lo, hi, &want).await? {
                            Some(rb) => rb,
                            None => continue,
                        }
                    }
                } else {
                    RowBufs {
                        data: vec![Some(vec![0u8; span]); d],
                        p: None,
                        q: None,
                        has_q: raid6,
                    }
                };
                for (i, nd) in newdata.iter().enumerate() {
                    if let (Some((e, b)), Some(buf)) = (nd, rb.data[i].as_mut()) {
                        let at = (e.offset_in_chunk - lo) as usize;
                        buf[at..at + b.len()].copy_from_slice(b);
                    }
                }
                let refs: Vec<&[u8]> = rb
                    .data
                    .iter()
                    .map(|x| x.as_deref().unwrap_or(&[]))
                    .collect();
                if refs.iter().any(|r| r.len() != span) {
                    return Err(ArrayError::Failed {
                        array: self.name.clone(),
                        detail: format!("row {row} could not be reconstructed"),
                    });
                }
                let mut p = vec![0u8; span];
                let mut q = vec![0u8; span];
                parity::gen_pq(&refs, &mut p, raid6.then_some(&mut q[..]));
                (Bytes::from(p), Bytes::from(q))
            };
            // Issue the writes.
            let view = self.view();
            let mut writes: Vec<(usize, u64, Bytes)> = Vec::new();
            for (i, nd) in newdata.iter().enumerate() {
                if let Some((e, b)) = nd {
                    let m = geo.data_member(row, i);
                    if view.writable[m] {
                        writes.push((m, self.member_off(row, e.offset_in_chunk), b.clone()));
                    }
                }
            }
            if view.writable[pm] {
                writes.push((pm, self.member_off(row, lo), p));
            }
            if raid6 && view.writable[qm] {
                writes.push((qm, self.member_off(row, lo), q));
            }
            self.write_members(&view, writes).await;
            return self.check_failed();
        }
        self.check_failed()?;
        Err(ArrayError::Failed {
            array: self.name.clone(),
            detail: format!("row {row}: members kept failing"),
        })
    }

    // ---------- flush / discard ----------

    async fn flush(self: &Arc<Self>) -> Result<()> {
        self.check_failed()?;
        let epoch = self.with_bitmap(|b| b.start_flush());
        let view = self.view();
        let results = join_all(
            (0..self.geo.members)
                .filter(|m| view.writable[*m])
                .filter_map(|m| {
                    let d = view.members[m].clone()?;
                    Some(async move { (m, d.sync().await) })
                }),
        )
        .await;
        for (m, r) in results {
            if let Err(e) = r {
                self.member_failed(m, "sync", Some(&e), true).await;
            }
        }
        self.check_failed()?;
        if !self.is_degraded() {
            let _g = self.bitmap_io.lock().await;
            let blocks = self.with_bitmap(|b| b.finish_flush(epoch));
            if !blocks.is_empty() {
                self.persist_bitmap(&blocks).await;
            }
        }
        self.check_failed()
    }

    async fn discard(self: &Arc<Self>, offset: u64, len: u64) -> Result<()> {
        self.check_range(offset, len)?;
        self.check_failed()?;
        let geo = self.geo;
        let row_bytes = match geo.level {
            Level::Raid10 if geo.members % 2 == 1 => 0,
            Level::Raid1 => geo.chunk_bytes,
            _ => geo.data_per_row() as u64 * geo.chunk_bytes,
        };
        let end = offset + len;
        let (r0, r1) = if row_bytes == 0 {
            (0, 0)
        } else {
            (offset.div_ceil(row_bytes), end / row_bytes)
        };
        let (head_end, tail_start) = if r1 > r0 {
            (r0 * row_bytes, r1 * row_bytes)
        } else {
            (end, end)
        };
        self.zero_fill(offset, head_end).await?;
        if r1 > r0 {
            let c = geo.chunk_bytes;
            self.bitmap_begin(r0 * c, r1 * c).await?;
            let _g = self.lock_rows(r0..r1.min(r0 + ROW_LOCK_SHARDS)).await;
            let view = self.view();
            let results = join_all((0..geo.members).filter(|m| view.writable[*m]).filter_map(
                |m| {
                    let d = view.members[m].clone()?;
                    let off = self.member_off(r0, 0);
                    Some(async move { (m, d.discard(off, (r1 - r0) * c).await) })
                },
            ))
            .await;
            self.with_bitmap(|b| {
                let rs = b.regions(r0 * c, r1 * c);
                b.end_write(rs)
            });
            for (m, r) in results {
                if let Err(e) = r {
                    self.member_failed(m, "discard", Some(&e), true).await;
                }
            }
        }
        self.zero_fill(tail_start, end).await?;
        self.check_failed()
    }

    async fn zero_fill(self: &Arc<Self>, start: u64, end: u64) -> Result<()> {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(ZERO_WRITE_BYTES);
            self.write(pos, Bytes::from(vec![0u8; n as usize])).await?;
            pos += n;
        }
        Ok(())
    }

    // ---------- rebuild ----------

    fn next_resync_slot(&self) -> Option<usize> {
        let m = lock(&self.meta);
        if m.failed.is_some() {
            return None;
        }
        m.slots
            .iter()
            .position(|s| s.resync.is_some() && s.member.is_some())
    }

    fn kick_rebuild(self: &Arc<Self>) {
        if self.stop.load(Ordering::SeqCst) || self.next_resync_slot().is_none() {
            return;
        }
        if self.rebuild_running.swap(true, Ordering::SeqCst) {
            return;
        }
        let me = self.clone();
        let handle = tokio::spawn(async move {
            while let Some(slot) = me.next_resync_slot() {
                if me.stop.load(Ordering::SeqCst) || !me.run_resync(slot).await {
                    break;
                }
            }
            me.rebuild_running.store(false, Ordering::SeqCst);
            // Work queued while this task was finishing would otherwise wait for the next kick.
            if !me.stop.load(Ordering::SeqCst) && me.next_resync_slot().is_some() {
                me.kick_rebuild();
            }
        });
        *lock(&self.rebuild_task) = Some(handle);
    }

    /// Row ranges a resync of `kind` covers, starting at `from_row`.
    fn resync_ranges(&self, kind: ResyncKind, from_row: u64) -> (Vec<(u64, u64)>, u64) {
        match kind {
            ResyncKind::Full => (vec![(from_row, self.geo.rows)], 0),
            ResyncKind::Bitmap => {
                let regions = self.with_bitmap(|b| b.dirty_regions());
                let ranges: Vec<(u64, u64)> = regions
                    .iter()
                    .map(|r| self.region_rows(*r))
                    .filter(|(a, b)| a < b)
                    .collect();
                (ranges, regions.len() as u64)
            }
        }
    }

    /// Rebuilds or resyncs `slot`; returns false when the task should stop.
    async fn run_resync(self: &Arc<Self>, slot: usize) -> bool {
        let (kind, from_row, dev, name) = {
            let m = lock(&self.meta);
            let s = &m.slots[slot];
            let Some((kind, from)) = s.resync else {
                return true;
            };
            let name = s
                .member
                .as_ref()
                .map(|d| d.name().to_string())
                .unwrap_or_default();
            (kind, from, s.dev_uuid, name)
        };
        let (ranges, regions) = self.resync_ranges(kind, from_row);
        let c = self.geo.chunk_bytes;
        let total_rows: u64 = ranges.iter().map(|(a, b)| b - a).sum();
        let started = Instant::now();
        let mut done_rows = 0u64;
        let mut last_cp = Instant::now();
        let set_progress = |done_rows: u64, running: bool, error: Option<String>| {
            let elapsed = started.elapsed().as_secs_f64().max(1e-6);
            let done = done_rows * c;
            let total = total_rows * c;
            let rate = done as f64 / elapsed;
            *lock(&self.progress) = Some(RebuildStatus {
                slot,
                member: name.clone(),
                kind,
                running,
                done_bytes: done,
                total_bytes: total,
                percent: if total == 0 {
                    100.0
                } else {
                    done as f64 * 100.0 / total as f64
                },
                rate_bytes_per_sec: rate,
                eta_secs: (rate > 0.0).then(|| (total - done) as f64 / rate),
                error,
            });
        };
        set_progress(0, true, None);
        tracing::info!(array = %self.name, slot, member = %name, ?kind, rows = total_rows, "resync starts");
        // Batches in flight never share a row-lock shard.
        let in_flight = (REBUILD_READ_AHEAD + REBUILD_WRITE_DEPTH) as u64;
        let mut batch_rows = (REBUILD_BATCH_BYTES / c).clamp(1, ROW_LOCK_SHARDS / in_flight);
        let rate = self.rate_limit_bytes_per_sec.load(Ordering::SeqCst);
        if rate > 0 {
            // Keep each step to about a tenth of a second of the allowed rate.
            batch_rows = batch_rows.min((rate / 10 / c).max(1));
        }
        let mut batches = Vec::new();
        for (a, b) in ranges {
            let mut r0 = a;
            while r0 < b {
                let r1 = (r0 + batch_rows).min(b);
                batches.push((r0, r1));
                r0 = r1;
            }
        }
        // A two-stage pipeline: up to REBUILD_READ_AHEAD batches are read and recomputed while
        // up to REBUILD_WRITE_DEPTH earlier ones are written, so the sources and the target are
        // busy at the same time (batches that each read, then write, fall into step and leave
        // the disks idle in turn). Results arrive in order, so every batch before the one being
        // consumed is complete when a checkpoint is recorded.
        //
        // Batches take their row locks one batch after the other (`then`), each batch all of its
        // locks before the next one starts: a batch waiting in the pipeline for an earlier one
        // to finish then never holds a lock that earlier batch (or a foreground request that the
        // earlier batch waits for) still needs. RAID 10 batches share rows at their edges.
        //
        // The rate limit delays a batch before it takes its locks, so a throttled rebuild does
        // not keep rows locked (and foreground writes to them waiting) while it sleeps.
        let mut rows_before = Vec::with_capacity(batches.len());
        let mut sum = 0u64;
        for &(r0, r1) in &batches {
            rows_before.push(sum);
            sum += r1 - r0;
        }
        let results = stream::iter(batches.clone().into_iter().zip(rows_before))
            .then(|((r0, r1), rows_before)| {
                let me = Arc::clone(self);
                async move {
                    let rate = me.rate_limit_bytes_per_sec.load(Ordering::SeqCst);
                    if rate > 0 {
                        let due = Duration::from_secs_f64((rows_before * c) as f64 / rate as f64);
                        if let Some(wait) = due.checked_sub(started.elapsed()) {
                            tokio::time::sleep(wait).await;
                        }
                    }
                    let locks = me.lock_rows_owned(me.rebuild_lock_rows(r0, r1)).await;
                    (r0, r1, locks)
                }
            })
            .map(|(r0, r1, locks)| async move {
                (r0, r1, self.rebuild_prepare(slot, dev, r0, r1, locks).await)
            })
            .buffered(REBUILD_READ_AHEAD)
            .map(|(r0, r1, read)| async move {
                (r0, r1, self.rebuild_finish(slot, dev, r0, r1, read).await)
            })
            .buffered(REBUILD_WRITE_DEPTH);
        let mut results = Box::pin(results);
        loop {
            if self.stop.load(Ordering::SeqCst) {
                drop(results);
                let next = batches.get(done_batches(&batches, done_rows)).map(|b| b.0);
                if let Some(r0) = next {
                    self.record_checkpoint(slot, dev, kind, r0).await;
                }
                set_progress(done_rows, false, Some("stopped".into()));
                return false;
            }
            let Some((r0, r1, outcome)) = results.next().await else {
                break;
            };
            match outcome {
                BatchOutcome::Done => {}
                BatchOutcome::TargetGone => {
                    set_progress(done_rows, false, Some("target or array failed".into()));
                    return true;
                }
                BatchOutcome::Error(e) => {
                    set_progress(done_rows, false, Some(e));
                    return false;
                }
            }
            done_rows += r1 - r0;
            set_progress(done_rows, true, None);
            if kind == ResyncKind::Full
                && last_cp.elapsed() >= Duration::from_millis(CHECKPOINT_INTERVAL_MS)
            {
                self.record_checkpoint(slot, dev, kind, r1).await;
                last_cp = Instant::now();
            }
        }
        {
            let mut m = lock(&self.meta);
            let s = &mut m.slots[slot];
            if s.dev_uuid != dev || s.resync.is_none() {
                return true;
            }
            s.state = MemberState::Active;
            s.resync = None;
            s.left_events = 0;
            m.rebuild = None;
            m.events += 1;
        }
        if kind == ResyncKind::Bitmap {
            self.bitmap_resync_regions
                .fetch_add(regions, Ordering::SeqCst);
        }
        set_progress(done_rows, false, None);
        tracing::info!(array = %self.name, slot, ?kind, "resync complete");
        self.write_superblocks().await;
        true
    }

    /// Whether `slot` still holds device `dev` under resync in a working array.
    fn still_rebuilding(&self, slot: usize, dev: Uuid) -> bool {
        let m = lock(&self.meta);
        m.slots[slot].dev_uuid == dev && m.slots[slot].resync.is_some() && m.failed.is_none()
    }

    /// The rows a rebuild batch `[r0, r1)` locks: RAID 10 copies may sit in a neighbouring row
    /// (odd member count), so one more on each side there; other levels exactly their rows.
    fn rebuild_lock_rows(&self, r0: u64, r1: u64) -> std::ops::Range<u64> {
        if self.geo.level == Level::Raid10 {
            r0.saturating_sub(1)..(r1 + 1).min(self.geo.rows)
        } else {
            r0..r1
        }
    }

    /// Writes a prepared batch to its target. A failed write fails the target (when it is still the
    /// slot's device), not the batch; a target that left its slot is not written at all.
    async fn rebuild_write(self: &Arc<Self>, batch: RebuiltBatch) -> BatchOutcome {
        if !self.still_rebuilding(batch.slot, batch.dev) {
            return BatchOutcome::TargetGone;
        }
        if let Err(e) = batch.target.write_at(batch.offset, batch.out).await {
            self.device_failed(batch.slot, &batch.target, "rebuild write", &e)
                .await;
            return BatchOutcome::TargetGone;
        }
        BatchOutcome::Done
    }

    /// Second stage of a rebuild batch, given what its first stage (`rebuild_prepare`) gave:
    /// writes the target, or reads again (still holding the batch's locks) after a source
    /// failed, a bounded number of times.
    async fn rebuild_finish(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        r0: u64,
        r1: u64,
        mut prepared: Result<Prepared>,
    ) -> BatchOutcome {
        for _attempt in 0..=self.geo.members {
            match prepared {
                Ok(Prepared::Ready(batch)) => return self.rebuild_write(batch).await,
                Ok(Prepared::TargetGone) => return BatchOutcome::TargetGone,
                Err(e) => return BatchOutcome::Error(e.to_string()),
                Ok(Prepared::Retry(locks)) => {
                    prepared = self.rebuild_prepare(slot, dev, r0, r1, locks).await;
                }
            }
        }
        BatchOutcome::Error(format!("rows {r0}..{r1}: source members kept failing"))
    }

    /// Records that rows before `row` of device `dev` in `slot` are rebuilt. Nothing when the
    /// slot holds another device by now: a replacement must not inherit this progress.
    async fn record_checkpoint(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        kind: ResyncKind,
        row: u64,
    ) {
        if kind != ResyncKind::Full {
            return;
        }
        {
            let mut m = lock(&self.meta);
            if m.slots[slot].dev_uuid != dev || m.slots[slot].resync.is_none() {
                return;
            }
            m.rebuild = Some(RebuildCheckpoint {
                slot: slot as u32,
                rows_done: row,
            });
            if let Some(r) = m.slots[slot].resync.as_mut() {
                r.1 = row;
            }
        }
        self.write_superblocks().await;
    }

    /// Reads the sources of rows `[r0, r1)` of `slot` and computes the target's contents; the
    /// caller holds the rows' locks (`locks`, from [`Inner::rebuild_lock_rows`]).
    async fn rebuild_prepare(
        self: &Arc<Self>,
        slot: usize,
        dev: Uuid,
        r0: u64,
        r1: u64,
        locks: BatchLocks,
    ) -> Result<Prepared> {
        let geo = self.geo;
        let c = geo.chunk_bytes;
        let view = self.view();
        let target = match &view.members[slot] {
            Some(t) if self.still_rebuilding(slot, dev) => Arc::clone(t),
            _ => return Ok(Prepared::TargetGone),
        };
        let len = ((r1 - r0) * c) as usize;
        // Output buffers are page-aligned so O_DIRECT members write them without a bounce copy.
        let out: Bytes = match geo.level {
            Level::Raid0 => return Err(self.invalid("raid0 cannot rebuild a member".into())),
            Level::Raid1 => {
                let Some(src) = (0..geo.members).find(|m| *m != slot && view.readable[*m]) else {
                    return Err(ArrayError::Failed {
                        array: self.name.clone(),
                        detail: "no source copy".into(),
                    });
                };
                let Some(d) = view.members[src].clone() else {
                    return Ok(Prepared::Retry(locks));
                };
                match self
                    .read_member(src, &d, self.member_off(r0, 0), len as u64)
                    .await
                {
                    Some(b) => b,
                    None => return Ok(Prepared::Retry(locks)),
                }
            }
            Level::Raid10 => {
                let mut out = AlignedBuf::zeroed(len);
                let mut jobs = Vec::new();
                for r in r0..r1 {
                    let Some(k) = geo.raid10_chunk_at(slot, r) else {
                        continue;
                    };
                    let Some(p) = geo
                        .places(k)
                        .into_iter()
                        .find(|p| p.member != slot || p.row != r)
                    else {
                        continue;
                    };
                    if !view.readable[p.member] {
                        return Err(ArrayError::Failed {
                            array: self.name.clone(),
                            detail: format!("chunk {k} has no readable copy"),
                        });
                    }
                    jobs.push((r, p));
                }
                let reads = join_all(jobs.iter().map(|(r, p)| {
                    let d = view.members[p.member].clone();
                    async move {
                        match d {
                            Some(d) => (
                                *r,
                                self.read_member(p.member, &d, self.member_off(p.row, 0), c)
                                    .await,
                            ),
                            None => (*r, None),
                        }
                    }
                }))
                .await;
                for (r, b) in reads {
                    let Some(b) = b else {
                        return Ok(Prepared::Retry(locks));
                    };
                    let at = ((r - r0) * c) as usize;
                    out[at..at + c as usize].copy_from_slice(&b);
                }
                out.into_bytes()
            }
            Level::Raid5 | Level::Raid6 => {
                let reads = join_all((0..geo.members).map(|m| {
                    let d = view.members[m].clone();
                    let go = m != slot && view.readable[m];
                    async move {
                        match (go, d) {
                            (true, Some(d)) => Some(
                                self.read_member(m, &d, self.member_off(r0, 0), len as u64)
                                    .await,
                            ),
                            _ => None,
                        }
                    }
                }))
                .await;
                let mut srcs: Vec<Option<Bytes>> = Vec::with_capacity(geo.members);
                for r in reads {
                    match r {
                        Some(None) => return Ok(Prepared::Retry(locks)),
                        Some(Some(b)) => srcs.push(Some(b)),
                        None => srcs.push(None),
                    }
                }
                let mut out = AlignedBuf::zeroed(len);
                let cu = c as usize;
                for r in r0..r1 {
                    let at = ((r - r0) * c) as usize;
                    if self.rebuild_chunk_fast(r, slot, &srcs, at, &mut out[at..at + cu]) {
                        continue;
                    }
                    let mut rb = RowBufs {
                        data: vec![None; geo.data_per_row()],
                        p: None,
                        q: None,
                        has_q: geo.level == Level::Raid6,
                    };
                    for (m, s) in srcs.iter().enumerate() {
                        if let Some(s) = s {
                            let v = s[at..at + cu].to_vec();
                            match geo.role(r, m) {
                                ChunkRole::Data(i) => rb.data[i] = Some(v),
                                ChunkRole::P => rb.p = Some(v),
                                ChunkRole::Q => rb.q = Some(v),
                            }
                        }
                    }
                    parity::recover(&mut rb).map_err(|e| ArrayError::Failed {
                        array: self.name.clone(),
                        detail: format!("row {r}: {e}"),
                    })?;
                    let chunk = match geo.role(r, slot) {
                        ChunkRole::Data(i) => rb.data[i].take(),
                        ChunkRole::P => rb.p.take(),
                        ChunkRole::Q => rb.q.take(),
                    };
                    if let Some(chunk) = chunk {
                        out[at..at + cu].copy_from_slice(&chunk);
                    }
                }
                out.into_bytes()
            }
        };
        Ok(Prepared::Ready(RebuiltBatch {
            _rows: locks,
            slot,
            dev,
            target,
            offset: self.member_off(r0, 0),
            out,
        }))
    }

    /// The common single-failure cases without copies: a data chunk or P is the XOR of every
    /// other chunk but Q; Q is recomputed from the data. Returns false when the general
    /// recovery is needed (two chunks of the row missing).
    fn rebuild_chunk_fast(
        &self,
        row: u64,
        slot: usize,
        srcs: &[Option<Bytes>],
        at: usize,
        out: &mut [u8],
    ) -> bool {
        let geo = self.geo;
        let len = out.len();
        let chunk = |m: usize| srcs[m].as_ref().map(|b| &b[at..at + len]);
        let raid6 = geo.level == Level::Raid6;
        match geo.role(row, slot) {
            ChunkRole::Q => {
                let data: Option<Vec<&[u8]>> = (0..geo.data_per_row())
                    .map(|i| chunk(geo.data_member(row, i)))
                    .collect();
                let Some(data) = data else { return false };
                let mut p = vec![0u8; len];
                parity::gen_pq(&data, &mut p, Some(out));
                true
            }
            _ => {
                let others: Option<Vec<&[u8]>> = (0..geo.members)
                    .filter(|m| *m != slot && !(raid6 && *m == geo.q_member(row)))
                    .map(chunk)
                    .collect();
                let Some(others) = others else { return false };
                parity::xor_of(out, &others);
                true
            }
        }
    }

    // ---------- add ----------

    async fn add_member(
        self: &Arc<Self>,
        member: Arc<dyn Member>,
        want_slot: Option<usize>,
    ) -> Result<MemberStatus> {
        let need = self.data_offset + self.geo.member_data_bytes();
        if member.size() < need {
            return Err(ArrayError::MemberTooSmall {
                array: self.name.clone(),
                member: member.name().to_string(),
                size_bytes: member.size(),
                need_bytes: need,
            });
        }
        if self
            .all_devices()
            .iter()
            .any(|(d, _)| d.name() == member.name() || Arc::ptr_eq(d, &member))
        {
            return Err(self.invalid(format!("member {} is already in the array", member.name())));
        }
        let existing = match member.read_at(0, SUPERBLOCK_BYTES).await {
            Ok(b) => Superblock::decode(&b).ok(),
            Err(e) => {
                return Err(ArrayError::MemberIo {
                    array: self.name.clone(),
                    member: member.name().to_string(),
                    op: "superblock read",
                    source: e,
                })
            }
        };
        let status = {
            let mut m = lock(&self.meta);
            // A returning member: same array, its old slot empty and still assigned to it.
            let returning = existing
                .as_ref()
                .filter(|sb| sb.array_uuid == self.uuid)
                .and_then(|sb| match sb.role {
                    Role::Slot(i) => {
                        let s = &m.slots[i as usize];
                        (s.member.is_none()
                            && s.dev_uuid == sb.dev_uuid
                            && s.left_events > 0
                            && sb.events >= s.left_events
                            && want_slot.is_none_or(|w| w == i as usize))
                        .then_some(i as usize)
                    }
                    Role::Spare => None,
                });
            if let Some(i) = returning {
                let s = &mut m.slots[i];
                s.member = Some(member.clone());
                s.state = MemberState::Rebuilding;
                s.resync = Some((ResyncKind::Bitmap, 0));
                m.events += 1;
                tracing::info!(array = %self.name, slot = i, member = %member.name(), "member returns: bitmap resync");
                MemberStatus {
                    slot: Some(i),
                    name: Some(member.name().to_string()),
                    state: MemberState::Rebuilding,
                }
            } else {
                let empty = match want_slot {
                    Some(w) => (m.slots[w].member.is_none()).then_some(w),
                    None => m.slots.iter().position(|s| s.member.is_none()),
                };
                let dev = Uuid::new_v4();
                match empty {
                    Some(i) if m.failed.is_none() => {
                        let s = &mut m.slots[i];
                        s.member = Some(member.clone());
                        s.dev_uuid = dev;
                        s.state = MemberState::Rebuilding;
                        s.left_events = 0;
                        s.resync = Some((ResyncKind::Full, 0));
                        m.rebuild = Some(RebuildCheckpoint {
                            slot: i as u32,
                            rows_done: 0,
                        });
                        m.events += 1;
                        MemberStatus {
                            slot: Some(i),
                            name: Some(member.name().to_string()),
                            state: MemberState::Rebuilding,
                        }
                    }
                    _ => {
                        m.spares.push(Spare {
                            member: member.clone(),
                            dev_uuid: dev,
                        });
                        m.events += 1;
                        MemberStatus {
                            slot: None,
                            name: Some(member.name().to_string()),
                            state: MemberState::Spare,
                        }
                    }
                }
            }
        };
        if status.state == MemberState::Rebuilding {
            // The bitmap must be present on the new device before it takes writes.
            let _g = self.bitmap_io.lock().await;
            let (len, bytes) = self.with_bitmap(|b| {
                let n = b.stored_len() / BITMAP_BLOCK_BYTES;
                (
                    n,
                    (0..n)
                        .flat_map(|blk| b.block_bytes(blk))
                        .collect::<Vec<u8>>(),
                )
            });
            let off = lock(&self.bitmap).geometry().offset;
            if len > 0 {
                if let Err(e) = member.write_at(off, Bytes::from(bytes)).await {
                    if let Some(i) = status.slot {
                        self.member_failed(i, "bitmap write", Some(&e), false).await;
                    }
                }
            }
        }
        self.write_superblocks().await;
        Ok(status)
    }

    // ---------- scrub ----------

    async fn scrub(self: &Arc<Self>, mode: ScrubMode) -> Result<ScrubReport> {
        self.check_failed()?;
        if self.geo.level == Level::Raid0 {
            return Ok(ScrubReport {
                rows_checked: self.geo.rows,
                mismatches: 0,
                repaired: 0,
            });
        }
        if self.is_degraded() {
            return Err(
                self.invalid("scrub needs every member active; wait for the rebuild".into())
            );
        }
        if self.scrub_running.swap(true, Ordering::SeqCst) {
            return Err(self.invalid("a scrub is already running".into()));
        }
        self.mismatches.store(0, Ordering::SeqCst);
        let batch = (REBUILD_BATCH_BYTES / self.geo.chunk_bytes).clamp(1, ROW_LOCK_SHARDS);
        let mut report = ScrubReport {
            rows_checked: 0,
            mismatches: 0,
            repaired: 0,
        };
        let mut r0 = 0;
        let mut result = Ok(());
        while r0 < self.geo.rows {
            let r1 = (r0 + batch).min(self.geo.rows);
            match self.scrub_rows(r0, r1, mode).await {
                Ok((mm, rep)) => {
                    report.mismatches += mm;
                    report.repaired += rep;
                    report.rows_checked += r1 - r0;
                    self.mismatches.fetch_add(mm, Ordering::SeqCst);
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            r0 = r1;
        }
        self.scrub_running.store(false, Ordering::SeqCst);
        result.map(|_| report)
    }

    /// Checks rows `[r0, r1)`; returns (mismatching rows, rows rewritten).
    async fn scrub_rows(self: &Arc<Self>, r0: u64, r1: u64, mode: ScrubMode) -> Result<(u64, u64)> {
        let geo = self.geo;
        let c = geo.chunk_bytes as usize;
        let _g = self
            .lock_rows(r0.saturating_sub(1)..(r1 + 1).min(geo.rows))
            .await;
        let view = self.view();
        if view.readable.iter().any(|r| !r) {
            return Err(self.invalid("scrub needs every member active".into()));
        }
        // RAID 10 with an odd member count: a chunk's second copy may sit in the next row, so
        // read one row more than is checked.
        let read_end = if geo.level == Level::Raid10 {
            (r1 + 1).min(geo.rows)
        } else {
            r1
        };
        let len = (read_end - r0) as usize * c;
        let reads = join_all((0..geo.members).map(|m| {
            let d = view.members[m].clone();
            async move {
                match d {
                    Some(d) => {
                        self.read_member(m, &d, self.member_off(r0, 0), len as u64)
                            .await
                    }
                    None => None,
                }
            }
        }))
        .await;
        let mut bufs = Vec::with_capacity(geo.members);
        for r in reads {
            match r {
                Some(b) => bufs.push(b),
                None => return Err(self.invalid("a member failed during scrub".into())),
            }
        }
        let mut fixes: Vec<(usize, u64, Bytes)> = Vec::new();
        let mut mismatches = 0;
        let mut repaired_rows = std::collections::BTreeSet::new();
        for r in r0..r1 {
            let at = (r - r0) as usize * c;
            let chunk = |m: usize| &bufs[m][at..at + c];
            let mut bad = false;
            match geo.level {
                Level::Raid1 => {
                    for m in 1..geo.members {
                        if chunk(m) != chunk(0) {
                            bad = true;
                            fixes.push((m, r, Bytes::copy_from_slice(chunk(0))));
                        }
                    }
                }
                Level::Raid10 => {
                    for m in 0..geo.members {
                        let Some(k) = geo.raid10_chunk_at(m, r) else {
                            continue;
                        };
                        let places = geo.places(k);
                        if places[0].member != m || places[0].row != r {
                            continue;
                        }
                        let p = places[1];
                        if p.row >= read_end {
                            continue; // beyond the array's last row: no second copy
                        }
                        let other = &bufs[p.member]
                            [(p.row - r0) as usize * c..(p.row - r0) as usize * c + c];
                        if other != chunk(m) {
                            bad = true;
                            fixes.push((p.member, p.row, Bytes::copy_from_slice(chunk(m))));
                        }
                    }
                }
                Level::Raid5 | Level::Raid6 => {
                    let data: Vec<&[u8]> = (0..geo.data_per_row())
                        .map(|i| chunk(geo.data_member(r, i)))
                        .collect();
                    let mut p = vec![0u8; c];
                    let mut q = vec![0u8; c];
                    let raid6 = geo.level == Level::Raid6;
                    parity::gen_pq(&data, &mut p, raid6.then_some(&mut q[..]));
                    if chunk(geo.p_member(r)) != p.as_slice() {
                        bad = true;
                        fixes.push((geo.p_member(r), r, Bytes::from(p)));
                    }
                    if raid6 && chunk(geo.q_member(r)) != q.as_slice() {
                        bad = true;
                        fixes.push((geo.q_member(r), r, Bytes::from(q)));
                    }
                }
                Level::Raid0 => {}
            }
            if bad {
                mismatches += 1;
                repaired_rows.insert(r);
            }
        }
        if mode == ScrubMode::Repair && !fixes.is_empty() {
            let results = join_all(fixes.into_iter().map(|(m, r, b)| {
                let d = view.members[m].clone();
                async move {
                    match d {
                        Some(d) => (m, d.write_at(self.member_off(r, 0), b).await),
                        None => (m, Ok(())),
                    }
                }
            }))
            .await;
            for (m, r) in results {
                if let Err(e) = r {
                    self.member_failed(m, "scrub repair write", Some(&e), true)
                        .await;
                }
            }
            return Ok((mismatches, repaired_rows.len() as u64));
        }
        Ok((mismatches, 0))
    }

    // ---------- status ----------

    fn status(&self) -> ArrayStatus {
        let m = lock(&self.meta);
        let mut members: Vec<MemberStatus> = m
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| MemberStatus {
                slot: Some(i),
                name: s.member.as_ref().map(|d| d.name().to_string()),
                state: if s.member.is_none() && s.state == MemberState::Active {
                    MemberState::Missing
                } else {
                    s.state
                },
            })
            .collect();
        members.extend(m.spares.iter().map(|s| MemberStatus {
            slot: None,
            name: Some(s.member.name().to_string()),
            state: MemberState::Spare,
        }));
        let degraded = m
            .slots
            .iter()
            .any(|s| s.state != MemberState::Active || s.member.is_none());
        let (dirty, region) = {
            let b = lock(&self.bitmap);
            (b.dirty_regions().len() as u64, b.geometry().region_bytes)
        };
        ArrayStatus {
            name: self.name.clone(),
            uuid: self.uuid,
            level: self.geo.level,
            size_bytes: self.geo.size_bytes(),
            chunk_bytes: self.geo.chunk_bytes,
            stripe_bytes: self.geo.stripe_bytes(),
            members,
            degraded,
            failed: m.failed.is_some(),
            events: m.events,
            applied_seq: m.applied_seq,
            rebuild: lock(&self.progress).clone(),
            mismatch_count: self.mismatches.load(Ordering::SeqCst),
            scrub_running: self.scrub_running.load(Ordering::SeqCst),
            bitmap_resync_regions: self.bitmap_resync_regions.load(Ordering::SeqCst),
            unclean_resync_regions: self.unclean_resync_regions.load(Ordering::SeqCst),
            bitmap_dirty_regions: dirty,
            bitmap_region_bytes: region,
        }
    }
}
