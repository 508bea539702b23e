//! twinblock-journal: the NVRAM journal of a twinblock node.
//!
//! A write to a journaled volume is acknowledged once it is a record in NVRAM (a memory-mapped
//! file, persisted by cache-line write-back, `msync` or nothing on tmpfs); consistency points
//! later apply the records to the backing RAID array in large, stripe-aligned batches; at start,
//! recovery rebuilds the dirty index from the records the array does not hold yet and serves at once.
//!
//! Modules, pure logic first:
//! - [`format`](mod@format): byte layouts of header, control slots and records (encode/decode, CRC32C);
//! - [`scan`]: walking a region's log, stopping at (and reporting) the first torn/corrupt record;
//! - [`log`]: circular-log space accounting; [`index`]: the dirty index;
//! - [`pmem`]: the mapping and persistence modes (the only `unsafe` code);
//! - [`ppl`]: partial-parity records a degraded RAID store persists before stripe updates;
//! - [`group_commit`]: `msync` mode's group-commit thread (one `msync` for many records);
//! - [`power`]: a power-loss model of the NVRAM medium for tests of `msync` and `pmem` mode;
//! - [`write_back`]: what recovery persists before trusting a log a crashed process left;
//! - [`nvram`]: opening, identity checks, generation bump, own and partner regions;
//! - [`recover`]: checking a region's log and turning its unretired records into a dirty index
//!   (serve at once) or redoing them through the store;
//! - [`loss`]: knowing that acknowledged writes were lost with the NVRAM log (missing, blank or
//!   foreign file after an unclean stop);
//! - [`restore`]: checking the partner's copy of a lost own log and writing it back;
//! - [`backing`]: the [`Backing`] trait the array implements, and an in-memory backing;
//! - [`volume`]: [`JournaledVolume`]: write/read/flush/trim, CPs, back-pressure, recovery;
//! - [`takeover`]: giveback's fence against replaying the returning node's superseded log;
//! - [`dump`]: an offline, human- and JSON-readable dump of an NVRAM file.

pub mod backing;
pub mod cp_timing;
pub mod dump;
pub mod error;
pub mod format;
pub mod group_commit;
pub mod index;
pub mod log;
pub mod loss;
pub mod nvram;
pub mod pmem;
pub mod power;
pub mod ppl;
pub mod ppl_budget;
pub mod prefault;
pub mod recover;
pub mod restore;
pub mod scan;
pub mod takeover;
pub mod verify;
pub mod volume;
pub mod write_back;

pub use backing::{Backing, MemBacking};
pub use error::{BackingError, FormatError, JournalError};
pub use loss::{check_log_continuity, LossCause, LostWrites, StoreMark};
pub use nvram::{Nvram, NvramConfig, PartnerRegion, Region};
pub use pmem::{PersistMethod, PersistenceMode};
pub use ppl::PplLog;
pub use recover::{apply_plan, plan_recovery, replay_region, RecoveryPlan, RecoveryReport};
pub use scan::{Scan, ScanReport, StopReason};
pub use volume::{
    JournaledVolume, MirrorHook, MirrorOutcome, NoMirror, UnretiredRecord, UnretiredRecords,
    VolumeConfig, VolumeStatus,
};
