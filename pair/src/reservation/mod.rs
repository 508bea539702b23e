//! SCSI-3-style persistent reservations, kept in one small lock file per shared disk.
//!
//! A node may write a shared disk only while it holds that disk's reservation. The model is the one
//! `sg_persist` drives on a real device: nodes first *register* a 64-bit key, then one registered key
//! *reserves* the disk ("write exclusive, registrants only"), and a survivor fences a dead partner
//! by *preempting* the partner's key, which removes it and hands the reservation over in one atomic
//! step.
//!
//! The module is split by what each part may touch:
//!
//! | module | holds | I/O |
//! | --- | --- | --- |
//! | this file | [`ReservationState`] and [`Op`]: every operation as a pure state transition | none |
//! | [`format`] | the lock file's byte layout (magic, version, generation, keys, holder, CRC32C) | none |
//! | [`file`] | [`ReservationFile`]: read, and update under `flock` with temp file + fsync + rename | files |
//! | [`watch`] | [`ReservationWatch`]: the data path's cheap "do I still hold this disk?" check | `stat` |
//! | `flock` | the one `unsafe` call (`flock(2)`) in a tiny module | syscall |
//!
//! Pure transitions take `&self` and return the new state or a typed error, so a refused
//! operation cannot change anything, and the property tests (`tests.rs`) drive them with random
//! operation sequences without touching a disk.
//!
//! How a node uses it (key from [`node_key`]): register its key on every shared disk at start;
//! on takeover, after waiting out the partner's lease, `Preempt { victim: partner }` each of the
//! partner's disks (or `Reserve` when the partner's key is not registered); before every member
//! write, [`ReservationWatch::holds`] with its own key, treating an error as "not held"; on
//! giveback, `Release`. A node that starts and finds a disk held by the partner's key waits.
//!
//! Where this differs from SCSI-3 (on purpose, for the pair's takeover):
//! - `preempt` also *takes* the reservation when none is held (SCSI would only remove the victim's
//!   registration), so fencing the partner and owning the disk is one atomic update;
//! - `preempt` of a reservation held by a third key (neither caller nor victim) is refused;
//! - `release` by a registered non-holder is a conflict (SCSI treats it as a no-op);
//! - key 0 is invalid (SCSI uses it to mean "unregister"; here unregister is its own operation).

pub mod file;
mod flock;
pub mod format;
pub mod watch;

pub use file::{ReservationFile, ReservationFileError};
pub use format::{FormatError, Snapshot};
pub use watch::ReservationWatch;

use std::fmt;
use thiserror::Error;

/// Most keys one lock file holds. A pair needs two (one per node) plus a few for operators and
/// tests; the bound keeps the file (and a corrupt `key_count`) small.
pub const MAX_KEYS: usize = 64;

/// A reservation key (SCSI "PR key"). Never 0.
pub type Key = u64;

/// The reservation types this implementation supports. The numeric codes are SCSI's, so that
/// the file and `sg_persist` output read the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReservationType {
    /// Only registered keys may write; the holder is the one that reserved. SCSI type 5h.
    WriteExclusiveRegistrantsOnly,
}

impl ReservationType {
    /// The SCSI type code stored in the lock file.
    pub fn code(self) -> u8 {
        match self {
            ReservationType::WriteExclusiveRegistrantsOnly => 5,
        }
    }

    /// The type for a stored code; `None` for codes this version does not know.
    pub fn from_code(code: u8) -> Option<Self> {
        match code {
            5 => Some(ReservationType::WriteExclusiveRegistrantsOnly),
            _ => None,
        }
    }

    /// Short name used by `twinctl` (human and JSON output).
    pub fn name(self) -> &'static str {
        match self {
            ReservationType::WriteExclusiveRegistrantsOnly => "write-exclusive-registrants-only",
        }
    }
}

impl fmt::Display for ReservationType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The current reservation: who holds it and of which type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reservation {
    pub holder: Key,
    pub kind: ReservationType,
}

/// An operation on a disk's reservation state, as `sg_persist --out` service actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Add `key` to the registrants (idempotent).
    Register { key: Key },
    /// Remove `key`; if it held the reservation, the reservation goes too.
    Unregister { key: Key },
    /// Take the reservation; `key` must be registered and nobody else may hold it.
    Reserve { key: Key, kind: ReservationType },
    /// Give up the reservation; only its holder may. A no-op when nothing is reserved.
    Release { key: Key },
    /// Remove every key and the reservation.
    ///
    /// With `key`, that key must be registered (SCSI CLEAR). Without it the operator acts with no
    /// key. Unless `allow_held`, a clear is refused while any key holds the reservation: its node
    /// may be alive and writing (the tool's `--force`).
    Clear { key: Option<Key>, allow_held: bool },
    /// Remove `victim`'s registration and take the reservation (see the module docs).
    Preempt {
        key: Key,
        victim: Key,
        kind: ReservationType,
    },
}

impl Op {
    /// Short name for messages and JSON (`register`, `preempt`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Op::Register { .. } => "register",
            Op::Unregister { .. } => "unregister",
            Op::Reserve { .. } => "reserve",
            Op::Release { .. } => "release",
            Op::Clear { .. } => "clear",
            Op::Preempt { .. } => "preempt",
        }
    }
}

/// Why an operation was refused. A refused operation changes nothing.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ReservationError {
    #[error(
        "reservation conflict: the reservation is held by key {holder:#018x}; \
         preempt that key to take the disk over"
    )]
    ReservationConflict { holder: Key },
    #[error("key {key:#018x} is not registered: register it first")]
    NotRegistered { key: Key },
    #[error(
        "victim key {victim:#018x} is not registered, so there is nothing to preempt: \
         read the keys and name a registered one, or reserve directly"
    )]
    VictimNotRegistered { victim: Key },
    #[error("key 0 is not a valid reservation key: use a non-zero key")]
    ZeroKey,
    #[error("a key cannot preempt itself ({key:#018x}): name the other node's key as victim")]
    PreemptSelf { key: Key },
    #[error("too many registered keys (at most {max}): unregister stale keys first")]
    TooManyKeys { max: usize },
    #[error(
        "refusing to clear: key {holder:#018x} holds the reservation and its node may be alive \
         and writing; stop that node before clearing"
    )]
    ClearWouldDropHolder { holder: Key },
}

/// Registered keys and the reservation of one disk. Invariants (checked by `is_consistent`,
/// kept by every transition): keys are non-zero, unique and ascending, at most [`MAX_KEYS`];
/// the holder, if any, is registered.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ReservationState {
    keys: Vec<Key>,
    reservation: Option<Reservation>,
}

impl ReservationState {
    /// No keys, no reservation (also what a missing lock file means).
    pub fn empty() -> Self {
        Self::default()
    }

    /// Build a state from decoded parts, checking the invariants (used by [`format`]).
    pub fn from_parts(
        keys: Vec<Key>,
        reservation: Option<Reservation>,
    ) -> Result<Self, &'static str> {
        let state = ReservationState { keys, reservation };
        state.consistency_error().map_or(Ok(state), Err)
    }

    /// Registered keys, ascending.
    pub fn keys(&self) -> &[Key] {
        &self.keys
    }

    /// The reservation, if any.
    pub fn reservation(&self) -> Option<Reservation> {
        self.reservation
    }

    pub fn holder(&self) -> Option<Key> {
        self.reservation.map(|r| r.holder)
    }

    pub fn is_registered(&self, key: Key) -> bool {
        self.keys.binary_search(&key).is_ok()
    }

    /// Whether `key` holds the reservation.
    pub fn holds(&self, key: Key) -> bool {
        self.holder() == Some(key)
    }

    /// Whether the invariants in the type docs hold.
    pub fn is_consistent(&self) -> bool {
        self.consistency_error().is_none()
    }

    fn consistency_error(&self) -> Option<&'static str> {
        if self.keys.len() > MAX_KEYS {
            return Some("more keys than the maximum");
        }
        if self.keys.contains(&0) {
            return Some("key 0 registered");
        }
        if self.keys.windows(2).any(|w| w[0] >= w[1]) {
            return Some("keys not unique and ascending");
        }
        match self.reservation {
            Some(r) if !self.is_registered(r.holder) => Some("holder is not registered"),
            _ => None,
        }
    }

    /// Apply one operation: the new state, or why it was refused.
    pub fn apply(&self, op: &Op) -> Result<ReservationState, ReservationError> {
        match *op {
            Op::Register { key } => self.register(key),
            Op::Unregister { key } => self.unregister(key),
            Op::Reserve { key, kind } => self.reserve(key, kind),
            Op::Release { key } => self.release(key),
            Op::Clear { key, allow_held } => self.clear(key, allow_held),
            Op::Preempt { key, victim, kind } => self.preempt(key, victim, kind),
        }
    }

    pub fn register(&self, key: Key) -> Result<ReservationState, ReservationError> {
        check_key(key)?;
        let mut next = self.clone();
        if let Err(at) = next.keys.binary_search(&key) {
            if next.keys.len() >= MAX_KEYS {
                return Err(ReservationError::TooManyKeys { max: MAX_KEYS });
            }
            next.keys.insert(at, key);
        }
        Ok(next)
    }

    pub fn unregister(&self, key: Key) -> Result<ReservationState, ReservationError> {
        self.require_registered(key)?;
        let mut next = self.clone();
        next.keys.retain(|&k| k != key);
        if next.holds(key) {
            // A holder that leaves takes its reservation with it (SCSI, registrants-only types).
            next.reservation = None;
        }
        Ok(next)
    }

    pub fn reserve(
        &self,
        key: Key,
        kind: ReservationType,
    ) -> Result<ReservationState, ReservationError> {
        self.require_registered(key)?;
        match self.reservation {
            None => Ok(ReservationState {
                keys: self.keys.clone(),
                reservation: Some(Reservation { holder: key, kind }),
            }),
            Some(r) if r.holder == key && r.kind == kind => Ok(self.clone()),
            Some(r) => Err(ReservationError::ReservationConflict { holder: r.holder }),
        }
    }

    pub fn release(&self, key: Key) -> Result<ReservationState, ReservationError> {
        self.require_registered(key)?;
        match self.reservation {
            None => Ok(self.clone()),
            Some(r) if r.holder == key => Ok(ReservationState {
                keys: self.keys.clone(),
                reservation: None,
            }),
            Some(r) => Err(ReservationError::ReservationConflict { holder: r.holder }),
        }
    }

    pub fn clear(
        &self,
        key: Option<Key>,
        allow_held: bool,
    ) -> Result<ReservationState, ReservationError> {
        if let Some(key) = key {
            self.require_registered(key)?;
        }
        match self.reservation {
            Some(r) if !allow_held => {
                Err(ReservationError::ClearWouldDropHolder { holder: r.holder })
            }
            _ => Ok(ReservationState::empty()),
        }
    }

    pub fn preempt(
        &self,
        key: Key,
        victim: Key,
        kind: ReservationType,
    ) -> Result<ReservationState, ReservationError> {
        check_key(victim)?;
        if key == victim {
            return Err(ReservationError::PreemptSelf { key });
        }
        self.require_registered(key)?;
        if !self.is_registered(victim) {
            return Err(ReservationError::VictimNotRegistered { victim });
        }
        match self.reservation {
            Some(r) if r.holder != key && r.holder != victim => {
                return Err(ReservationError::ReservationConflict { holder: r.holder });
            }
            _ => {}
        }
        let keys = self.keys.iter().copied().filter(|&k| k != victim).collect();
        Ok(ReservationState {
            keys,
            reservation: Some(Reservation { holder: key, kind }),
        })
    }

    fn require_registered(&self, key: Key) -> Result<(), ReservationError> {
        check_key(key)?;
        if self.is_registered(key) {
            Ok(())
        } else {
            Err(ReservationError::NotRegistered { key })
        }
    }
}

fn check_key(key: Key) -> Result<(), ReservationError> {
    if key == 0 {
        Err(ReservationError::ZeroKey)
    } else {
        Ok(())
    }
}

/// Tag in the middle bits of every node key (ASCII "TB"), so a node key is recognisable in
/// `twinctl disk reservation show` and never 0.
const NODE_KEY_TAG: u64 = 0x5442;

/// The reservation key of node `node_id` of the pair `pair_id` (the pair's UUID bytes).
///
/// Layout: bits 63..32 = CRC32C of the pair id, bits 31..16 = `0x5442` ("TB"), bits 15..0 =
/// node id. Both nodes of a pair compute the same key for the same node, keys of different
/// nodes always differ, and keys of different pairs differ with high probability.
pub fn node_key(pair_id: &[u8; 16], node_id: u8) -> Key {
    (u64::from(crc32c::crc32c(pair_id)) << 32) | (NODE_KEY_TAG << 16) | u64::from(node_id)
}

#[cfg(test)]
mod tests;
