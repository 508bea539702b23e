//! The data path's fence: "may this node write the members of this disk set now?"
//!
//! Two conditions, both checked before every array write of an HA-managed set:
//! - the lease is fresh: the controller publishes, after every step of the state machine, the
//!   monotonic millisecond until which this node may write the set (0 when it may not); one
//!   atomic load and a compare;
//! - this node's key holds the reservation of every disk of the set: one
//!   [`ReservationWatch::holds`] per disk (a `stat` each; the file is re-read only when it
//!   changed).
//!
//! A lost reservation is reported to the controller as [`Event::ReservationConflict`] (once per
//! gate), which fences the set. An expired lease is not reported: the controller knows its own
//! lease, and it may come back with the next mailbox write.

use super::now_ms;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use twinblock_pair::reservation::{Key, ReservationFile, ReservationWatch};
use twinblock_pair::state::{DiskSet, Event};

/// Why a write was refused by the fence.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FenceError {
    #[error(
        "write refused: this node's HA lease for its {set:?} disks has expired (its status has \
         not reached the mailbox disks in time); writes resume once it is renewed"
    )]
    LeaseExpired { set: DiskSet },
    #[error(
        "write refused: reservation lost: this node no longer holds disk {disk} ({detail}); the \
         partner has taken these disks over and this node stops serving them"
    )]
    ReservationLost {
        set: DiskSet,
        disk: PathBuf,
        detail: String,
    },
}

/// The published permission of one disk set: writes allowed while `now_ms() < until`.
#[derive(Debug, Clone, Default)]
pub struct Permit(Arc<AtomicU64>);

impl Permit {
    pub fn set_until_ms(&self, until_ms: u64) {
        self.0.store(until_ms, Ordering::Release);
    }

    pub fn until_ms(&self) -> u64 {
        self.0.load(Ordering::Acquire)
    }

    pub fn allows(&self, now_ms: u64) -> bool {
        now_ms < self.until_ms()
    }
}

/// The fence of one disk set, shared by every array device and journal backing of the set.
pub struct WriteGate {
    set: DiskSet,
    permit: Permit,
    key: Key,
    disks: Vec<(PathBuf, Mutex<ReservationWatch>)>,
    conflicts: mpsc::UnboundedSender<Event>,
    reported: AtomicBool,
}

impl std::fmt::Debug for WriteGate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteGate")
            .field("set", &self.set)
            .field("key", &format_args!("{:#018x}", self.key))
            .field("disks", &self.disks.len())
            .finish()
    }
}

impl WriteGate {
    pub fn new(
        set: DiskSet,
        permit: Permit,
        key: Key,
        disks: &[PathBuf],
        conflicts: mpsc::UnboundedSender<Event>,
    ) -> WriteGate {
        WriteGate {
            set,
            permit,
            key,
            disks: disks
                .iter()
                .map(|d| {
                    let w = ReservationWatch::new(&ReservationFile::for_disk(d));
                    (d.clone(), Mutex::new(w))
                })
                .collect(),
            conflicts,
            reported: AtomicBool::new(false),
        }
    }

    /// Ok if a write to the set may be submitted now.
    pub fn check(&self) -> Result<(), FenceError> {
        if !self.permit.allows(now_ms()) {
            return Err(FenceError::LeaseExpired { set: self.set });
        }
        for (disk, watch) in &self.disks {
            let held = match watch.lock() {
                Ok(mut w) => w.holds(self.key).map_err(|e| e.to_string()),
                Err(_) => Err("reservation watch poisoned by a panic".to_string()),
            };
            let detail = match held {
                Ok(true) => continue,
                Ok(false) => format!("key {:#018x} does not hold its reservation", self.key),
                Err(e) => e,
            };
            self.report();
            return Err(FenceError::ReservationLost {
                set: self.set,
                disk: disk.clone(),
                detail,
            });
        }
        Ok(())
    }

    fn report(&self) {
        if !self.reported.swap(true, Ordering::AcqRel) {
            tracing::error!(set = ?self.set, "reservation lost: fencing this disk set");
            let _ = self
                .conflicts
                .send(Event::ReservationConflict { set: self.set });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinblock_pair::reservation::{Op, ReservationType};

    fn reserve(disk: &std::path::Path, key: Key) {
        let f = ReservationFile::for_disk(disk);
        f.update(&Op::Register { key }).unwrap();
        f.update(&Op::Reserve {
            key,
            kind: ReservationType::WriteExclusiveRegistrantsOnly,
        })
        .unwrap();
    }

    #[test]
    fn writes_need_a_fresh_lease_and_every_reservation() {
        let dir = tempfile::tempdir().unwrap();
        let disks = vec![dir.path().join("a.img"), dir.path().join("b.img")];
        reserve(&disks[0], 7);
        reserve(&disks[1], 7);
        let permit = Permit::default();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let gate = WriteGate::new(DiskSet::Own, permit.clone(), 7, &disks, tx);
        assert!(matches!(gate.check(), Err(FenceError::LeaseExpired { .. })));
        permit.set_until_ms(now_ms() + 60_000);
        gate.check().unwrap();
        assert!(rx.try_recv().is_err(), "nothing reported while held");

        let f = ReservationFile::for_disk(&disks[1]);
        f.update(&Op::Register { key: 9 }).unwrap();
        f.update(&Op::Preempt {
            key: 9,
            victim: 7,
            kind: ReservationType::WriteExclusiveRegistrantsOnly,
        })
        .unwrap();
        let e = gate.check().unwrap_err().to_string();
        assert!(e.contains("reservation lost") && e.contains("b.img"), "{e}");
        assert_eq!(
            rx.try_recv().unwrap(),
            Event::ReservationConflict { set: DiskSet::Own }
        );
        assert!(gate.check().is_err());
        assert!(rx.try_recv().is_err(), "reported once");
    }
}
