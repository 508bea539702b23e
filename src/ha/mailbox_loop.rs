//! The mailbox path's loop: write this node's newest status record to its slot on every mailbox
//! disk, then read the partner's slot from each, every interval (and at once when a new record
//! is published).
//!
//! Results go to the controller as state-machine events: [`Event::MailboxWritten`] (ok only if
//! every disk took the record: that renews the lease), [`Event::Status`] with the newest valid
//! record found on any disk, and [`Event::MailboxRead`] (ok if at least one disk yielded a valid
//! slot). A disk that cannot be opened (not created yet, unplugged) is retried every round; it
//! counts as a failed write and read meanwhile.

use super::mailbox_io::MailboxDisk;
use std::path::PathBuf;
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
}

struct Disk {
    path: PathBuf,
    open: Option<MailboxDisk>,
    last_error: Option<String>,
}

impl Disk {
    fn get(&mut self) -> Option<MailboxDisk> {
        if self.open.is_none() {
            match MailboxDisk::open(&self.path) {
                Ok(d) => self.open = Some(d),
                Err(e) => self.note(e.to_string()),
            }
        }
        self.open.clone()
    }

    /// Logs a failure once per distinct message, so a dead disk does not flood the log.
    fn note(&mut self, msg: String) {
        if self.last_error.as_deref() != Some(msg.as_str()) {
            tracing::warn!(disk = %self.path.display(), "mailbox: {msg}");
            self.last_error = Some(msg);
        }
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
                last_error: None,
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
            if let Err(e) = disk.write(offset, &block).await {
                d.note(e.to_string());
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
        let bytes = match disk
            .read(mailbox::slot_offset(self.partner), SLOT_BYTES)
            .await
        {
            Ok(b) => b,
            Err(e) => {
                d.note(e.to_string());
                return None;
            }
        };
        match mailbox::decode_slot(&bytes, self.partner) {
            Ok(r) if r.pair_id == self.pair_id => Some(SlotRead::Record(r)),
            Ok(_) => {
                d.note("the partner's slot holds a record of another pair".into());
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
                d.note(format!("the partner's slot is unreadable: {e}"));
                Some(SlotRead::Nothing)
            }
        }
    }
}
