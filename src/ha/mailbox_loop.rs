//! The mailbox path's loop: write this node's newest status record to its slot on every mailbox
//! disk, then read the partner's slot from each, every interval (and at once when a new record
//! is published).
//!
//! Results go to the controller as state-machine events: [`Event::MailboxWritten`] (ok only if
//! every disk took the record: that renews the lease), [`Event::Status`] with the newest valid
//! record found on any disk, and [`Event::MailboxRead`] (ok if at least one disk yielded a valid
//! slot). A disk that cannot be opened (not created yet, unplugged) is retried every round; it
//! counts as a failed write and read meanwhile. A read or write that fails closes the disk's
//! file, so the next round opens the path again: a disk replaced or re-attached under the same
//! path is picked up without a restart.
//!
//! Each disk's latest failure (or none) is kept in a [`MailboxHealth`] that `twinctl status`
//! shows next to the `MailboxUnreadable` takeover blocker, so the operator sees which disk and
//! why.

use super::fault::{self, Fault};
use super::mailbox_io::{MailboxDisk, MailboxIoError};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use twinblock_pair::heartbeat::Path as HbPath;
use twinblock_pair::mailbox::{self, MailboxError, SLOT_BYTES};
use twinblock_pair::state::Event;
use twinblock_pair::status::{NodeId, StatusError, StatusRecord};

/// Where the loop writes and what it reads.
pub struct MailboxLoop {
    pub disks: Vec<PathBuf>,
    pub pair_id: [u8; 16],
    pub partner: NodeId,
    pub interval_ms: u64,
    /// Where each disk's latest failure is published.
    pub health: MailboxHealth,
}

/// Per mailbox disk: the latest failure of a write or read (`None`: the last round worked).
#[derive(Clone, Debug, Default)]
pub struct MailboxHealth(Arc<Mutex<BTreeMap<PathBuf, Option<String>>>>);

impl MailboxHealth {
    /// Every disk with its latest failure, in path order.
    pub fn snapshot(&self) -> Vec<(PathBuf, Option<String>)> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(p, e)| (p.clone(), e.clone()))
            .collect()
    }

    fn set(&self, path: &std::path::Path, error: Option<String>) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(path.to_path_buf(), error);
    }
}

struct Disk {
    path: PathBuf,
    open: Option<MailboxDisk>,
    /// This round's failure (published at the end of the round).
    failed: Option<String>,
    /// The failure last logged (a dead disk is logged once, not every interval).
    logged: Option<String>,
}

impl Disk {
    fn get(&mut self) -> Option<MailboxDisk> {
        if self.open.is_none() {
            match MailboxDisk::open(&self.path) {
                Ok(d) => self.open = Some(d),
                Err(e) => self.fail(e.to_string()),
            }
        }
        self.open.clone()
    }

    /// Records a failure of this round; an I/O error also closes the file so the next round
    /// opens the path again.
    fn io_failed(&mut self, e: &MailboxIoError) {
        if matches!(e, MailboxIoError::Io { .. }) {
            self.open = None;
        }
        self.fail(e.to_string());
    }

    fn fail(&mut self, msg: String) {
        if self.logged.as_deref() != Some(msg.as_str()) {
            tracing::warn!(disk = %self.path.display(), "mailbox: {msg}");
            self.logged = Some(msg.clone());
        }
        self.failed.get_or_insert(msg);
    }

    /// Ends a round: publishes its outcome and logs a recovery.
    fn end_round(&mut self, health: &MailboxHealth) {
        let failed = self.failed.take();
        if failed.is_none() && self.logged.take().is_some() {
            tracing::info!(disk = %self.path.display(), "mailbox: disk works again");
        }
        health.set(&self.path, failed);
    }
}

/// A mailbox I/O error made up by an injected fault (see [`fault`]).
fn injected(disk: &MailboxDisk, fault: Fault, op: &'static str) -> MailboxIoError {
    MailboxIoError::Io {
        path: disk.path().to_path_buf(),
        op,
        source: fault::injected_error(fault),
    }
}

/// What one read of the partner's slot on one disk gave.
enum SlotRead {
    Record(StatusRecord),
    Foreign(twinblock_pair::status::ForeignRecord),
    Nothing,
}

impl MailboxLoop {
    /// Runs until the record channel or the event channel closes.
    pub async fn run(
        self,
        mut records: watch::Receiver<Option<StatusRecord>>,
        events: mpsc::UnboundedSender<Event>,
    ) {
        let mut disks: Vec<Disk> = self
            .disks
            .iter()
            .map(|p| Disk {
                path: p.clone(),
                open: None,
                failed: None,
                logged: None,
            })
            .collect();
        let interval = Duration::from_millis(self.interval_ms);
        loop {
            let record = *records.borrow_and_update();
            if let Some(r) = record {
                // A record is rewritten each round even if unchanged: a slot another writer
                // damaged heals, and the partner's reads keep succeeding.
                let ok = self.write_all(&mut disks, &r).await;
                if events
                    .send(Event::MailboxWritten { stamp: r.stamp, ok })
                    .is_err()
                {
                    return;
                }
            }
            if !self.read_partner(&mut disks, &events).await {
                return;
            }
            for d in &mut disks {
                d.end_round(&self.health);
            }
            tokio::select! {
                changed = records.changed() => if changed.is_err() { return },
                () = tokio::time::sleep(interval) => {}
            }
        }
    }

    async fn write_all(&self, disks: &mut [Disk], record: &StatusRecord) -> bool {
        let block = mailbox::encode_copy(record);
        let offset = mailbox::copy_offset_for(record);
        let mut ok = true;
        for d in disks.iter_mut() {
            let Some(disk) = d.get() else {
                ok = false;
                continue;
            };
            let result = if fault::active(Fault::MailboxWrite) {
                Err(injected(&disk, Fault::MailboxWrite, "write"))
            } else {
                disk.write(offset, &block).await
            };
            if let Err(e) = result {
                d.io_failed(&e);
                ok = false;
            }
        }
        ok
    }

    /// Reads the partner's slot on every disk and reports the newest record; false when the
    /// controller is gone.
    async fn read_partner(
        &self,
        disks: &mut [Disk],
        events: &mpsc::UnboundedSender<Event>,
    ) -> bool {
        // Taken before the first read: the machine trusts a quiet read only from its start.
        let started_ms = super::now_ms();
        let mut newest: Option<StatusRecord> = None;
        let mut foreign = None;
        let mut any_ok = false;
        for d in disks.iter_mut() {
            match self.read_one(d).await {
                Some(SlotRead::Record(r)) => {
                    any_ok = true;
                    if newest.is_none_or(|n| r.stamp > n.stamp) {
                        newest = Some(r);
                    }
                }
                Some(SlotRead::Foreign(f)) => {
                    any_ok = true;
                    foreign = Some(f);
                }
                Some(SlotRead::Nothing) | None => {}
            }
        }
        let mut out = Vec::new();
        if let Some(record) = newest {
            out.push(Event::Status {
                path: HbPath::Mailbox,
                record,
            });
        } else if let Some(record) = foreign {
            out.push(Event::ForeignStatus {
                path: HbPath::Mailbox,
                record,
            });
        }
        out.push(Event::MailboxRead {
            ok: any_ok,
            started_ms,
        });
        out.into_iter().all(|e| events.send(e).is_ok())
    }

    async fn read_one(&self, d: &mut Disk) -> Option<SlotRead> {
        let disk = d.get()?;
        let result = if fault::active(Fault::MailboxRead) {
            Err(injected(&disk, Fault::MailboxRead, "read"))
        } else {
            disk.read(mailbox::slot_offset(self.partner), SLOT_BYTES)
                .await
        };
        let bytes = match result {
            Ok(b) => b,
            Err(e) => {
                d.io_failed(&e);
                return None;
            }
        };
        match mailbox::decode_slot(&bytes, self.partner) {
            Ok(r) if r.pair_id == self.pair_id => Some(SlotRead::Record(r)),
            Ok(_) => {
                d.fail("the partner's slot holds a record of another pair".into());
                Some(SlotRead::Nothing)
            }
            Err(MailboxError::Status(StatusError::VersionMismatch(f)))
                if f.pair_id == self.pair_id =>
            {
                Some(SlotRead::Foreign(f))
            }
            // Never written: the read worked but proves nothing about the partner.
            Err(MailboxError::Empty) => Some(SlotRead::Nothing),
            Err(e) => {
                d.fail(format!("the partner's slot is unreadable: {e}"));
                Some(SlotRead::Nothing)
            }
        }
    }
}
