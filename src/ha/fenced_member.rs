//! The member-level fence: a [`Member`] wrapper that refuses writes and discards once this
//! node's key no longer holds the disk's reservation.
//!
//! The array-level gate (`super::gate`) already refuses client writes and journal consistency
//! points before they reach the array, and also checks the lease. This wrapper sits right at
//! member submission and covers what does not pass through those paths: superblock and bitmap
//! updates, rebuild and scrub-repair writes, array close. It checks the reservation only, not
//! the lease: a lease lapse is transient, and refusing a member write in the middle of a stripe
//! update would make the array fail a healthy member; a lost reservation is final for this
//! array instance (the set is fenced and the array dropped).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::sync::mpsc;
use twinblock_io::Member;
use twinblock_pair::reservation::{Key, ReservationFile, ReservationWatch};
use twinblock_pair::state::{DiskSet, Event};

/// A member whose writes need this node's key to hold the disk's reservation.
pub struct FencedMember {
    inner: Arc<dyn Member>,
    path: PathBuf,
    key: Key,
    set: DiskSet,
    watch: Mutex<ReservationWatch>,
    conflicts: mpsc::UnboundedSender<Event>,
    reported: AtomicBool,
}

impl FencedMember {
    pub fn wrap(
        inner: Arc<dyn Member>,
        path: &Path,
        key: Key,
        set: DiskSet,
        conflicts: mpsc::UnboundedSender<Event>,
    ) -> Arc<dyn Member> {
        Arc::new(FencedMember {
            inner,
            path: path.to_path_buf(),
            key,
            set,
            watch: Mutex::new(ReservationWatch::new(&ReservationFile::for_disk(path))),
            conflicts,
            reported: AtomicBool::new(false),
        })
    }

    fn check(&self) -> io::Result<()> {
        let held = match self.watch.lock() {
            Ok(mut w) => w.holds(self.key).map_err(|e| e.to_string()),
            Err(_) => Err("reservation watch poisoned by a panic".to_string()),
        };
        let detail = match held {
            Ok(true) => return Ok(()),
            Ok(false) => format!("key {:#018x} does not hold its reservation", self.key),
            Err(e) => e,
        };
        if !self.reported.swap(true, Ordering::AcqRel) {
            tracing::error!(disk = %self.path.display(), "reservation lost: member write refused");
            let _ = self
                .conflicts
                .send(Event::ReservationConflict { set: self.set });
        }
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "write refused: reservation lost: this node no longer holds disk {} ({detail})",
                self.path.display()
            ),
        ))
    }
}

#[async_trait]
impl Member for FencedMember {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn size(&self) -> u64 {
        self.inner.size()
    }

    async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        self.inner.read_at(offset, len).await
    }

    async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()> {
        self.check()?;
        self.inner.write_at(offset, data).await
    }

    async fn sync(&self) -> io::Result<()> {
        self.inner.sync().await
    }

    async fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.check()?;
        self.inner.discard(offset, len).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use twinblock_io::mem::MemMember;
    use twinblock_pair::reservation::{Op, ReservationType};

    #[tokio::test]
    async fn member_writes_stop_once_the_reservation_is_preempted() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("d.img");
        let f = ReservationFile::for_disk(&disk);
        let kind = ReservationType::WriteExclusiveRegistrantsOnly;
        f.update(&Op::Register { key: 7 }).unwrap();
        f.update(&Op::Reserve { key: 7, kind }).unwrap();
        let inner: Arc<dyn Member> = Arc::new(MemMember::new("d", 1 << 20));
        let (tx, mut rx) = mpsc::unbounded_channel();
        let m = FencedMember::wrap(inner.clone(), &disk, 7, DiskSet::Partner, tx);
        m.write_at(0, Bytes::from(vec![1u8; 4096])).await.unwrap();

        f.update(&Op::Register { key: 9 }).unwrap();
        f.update(&Op::Preempt {
            key: 9,
            victim: 7,
            kind,
        })
        .unwrap();
        let e = m
            .write_at(4096, Bytes::from(vec![2u8; 4096]))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied);
        assert!(e.to_string().contains("reservation lost"), "{e}");
        assert!(m.discard(0, 4096).await.is_err());
        assert_eq!(
            rx.try_recv().unwrap(),
            Event::ReservationConflict {
                set: DiskSet::Partner
            }
        );
        let after = inner.read_at(0, 8192).await.unwrap();
        assert!(after[..4096].iter().all(|&b| b == 1));
        assert!(
            after[4096..].iter().all(|&b| b == 0),
            "the refused write reached nothing"
        );
        assert_eq!(m.read_at(0, 4096).await.unwrap()[0], 1, "reads still work");
    }
}
