//! The partner's side of the mirror: this node's copies of the partner's journals.
//!
//! # Where the copy lives
//!
//! Each journaled volume of the partner gets an NVRAM file of its own on this node,
//! `<partner_nvram_dir>/<volume>.partner.nvram` (default directory: the one holding `[nvram].path`,
//! so the copy sits on the same medium as this node's own journals, with the same persistence
//! mode). It is an ordinary twinblock NVRAM file stamped with this node's id and the pair id; the
//! copy is kept in its *partner region* (its own region stays unused), with the partner's log
//! size, records at the same log offsets as in the partner's log, and the region bound to the
//! partner volume's store id (the array's UUID), so a takeover replays it only into that array.
//! The file survives a restart of this node like any NVRAM file, and `twinctl journal dump` reads
//! it.
//!
//! # What is accepted
//!
//! Per volume and connection the copy follows one stream: a LOG_RESET (generation, tail) first,
//! then records with consecutive seqs. A seq already stored is a duplicate (acknowledged again,
//! stored once); a gap, a record of another generation or volume, a bad CRC, an unknown volume,
//! a generation older than the copy's, or any frame this side does not serve is an error: the
//! connection is dropped and nothing of the offending frame is stored.
//!
//! # Persisting: one group per read
//!
//! The connection stores every frame it read at once ([`Receiver::apply`]) and then persists
//! them together ([`Receiver::persist_pending`]) before it sends the ACKs: in `msync` mode one
//! `msync` per run of adjacent pages instead of one per record, as the own log's group commit
//! does. At most [`UNPERSISTED_MAX_RECORDS`] records and [`UNPERSISTED_MAX_LOG_BYTES`] of log
//! are left unpersisted at a time (a larger read persists in several groups), which is the bound
//! a scan of an `msync` log relies on to tell a torn group at the end from damage; a LOG_RESET
//! or a CP record (both move the copy's tail) persists what is pending first.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use std::time::Instant;

use twinblock_journal::format::{RecordHeader, RecordKind, RECORD_HEADER_BYTES};
use twinblock_journal::group_commit::{UNPERSISTED_MAX_LOG_BYTES, UNPERSISTED_MAX_RECORDS};
use twinblock_journal::{JournalError, Nvram, NvramConfig, PartnerRegion, PersistenceMode};
use twinblock_pair::wire::{
    format_id, FetchBegin, FrameWriter, LogReset, Message, RecordFrame, RecordRef, VolumeAnnounce,
};

/// A frame the receiver refuses (the connection is dropped; nothing of it was stored).
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("frame for volume {0}, which the partner did not announce in its handshake")]
    UnknownVolume(u64),
    #[error("record for volume `{volume}` before any LOG_RESET on this connection")]
    NoReset { volume: String },
    #[error(
        "volume `{volume}`: expected seq {expected}, got {found} (records must arrive in order)"
    )]
    Gap {
        volume: String,
        expected: u64,
        found: u64,
    },
    #[error("volume `{volume}`: the partner's log generation went back from {copy} to {announced}; its NVRAM may have been lost, the copy is kept and not overwritten")]
    GenerationBackwards {
        volume: String,
        copy: u64,
        announced: u64,
    },
    #[error("volume `{volume}` seq {seq}: bad record: {detail}")]
    BadRecord {
        volume: String,
        seq: u64,
        detail: String,
    },
    #[error("volume `{volume}`: {source}")]
    Journal {
        volume: String,
        #[source]
        source: JournalError,
    },
    #[error("{0} frames are not served by this node")]
    Unsupported(&'static str),
}

/// The stream a copy is following on the current connection.
#[derive(Debug, Clone, Copy)]
struct Stream {
    generation: u64,
    next_seq: u64,
}

/// This node's copy of one partner volume's journal.
pub struct PartnerCopy {
    name: String,
    path: PathBuf,
    log_bytes: u64,
    region: PartnerRegion,
    stream: Option<Stream>,
    records_stored: u64,
    last_record_at: Option<Instant>,
    /// Log ranges stored and not yet persisted (see the module docs), and their bytes.
    unpersisted: Vec<(u64, u64)>,
    unpersisted_bytes: u64,
    /// Persist calls made for groups of records (status).
    persist_groups: u64,
    /// Holds the file's mapping and lock for as long as the copy is in use.
    _nvram: Nvram,
}

/// Where and how copies are opened.
#[derive(Debug, Clone)]
pub struct CopySettings {
    pub node_id: u32,
    pub pair_id: [u8; 16],
    pub persistence: PersistenceMode,
    /// The directory of the copies.
    pub dir: PathBuf,
}

/// The partner copies of this node, by the partner's journal volume id.
pub struct Receiver {
    settings: CopySettings,
    copies: Mutex<BTreeMap<u64, PartnerCopy>>,
    /// Partner volumes this node serves from their copies (a takeover): their files belong to
    /// the journal now, and the partner's stream for them is ignored until giveback.
    seized: Mutex<HashSet<u64>>,
    last_status: Mutex<Option<(Instant, Vec<u8>)>>,
    /// Where every STATUS frame's bytes also go (the HA controller's interconnect path).
    status_tx: Mutex<Option<tokio::sync::mpsc::Sender<Vec<u8>>>>,
}

impl Receiver {
    pub fn new(settings: CopySettings) -> Receiver {
        Receiver {
            settings,
            copies: Mutex::new(BTreeMap::new()),
            seized: Mutex::new(HashSet::new()),
            last_status: Mutex::new(None),
            status_tx: Mutex::new(None),
        }
    }

    fn seized(&self) -> MutexGuard<'_, HashSet<u64>> {
        self.seized.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takeover: hands the copy of partner volume `volume` to this node's journal. The copy is
    /// closed here (its file lock released, so the journal can open it), and until
    /// [`Receiver::release`] the partner's records for it are ignored, never stored (a partner
    /// resuming from a pause must not write into a log this node is serving from).
    pub fn seize(&self, volume: u64) {
        self.seized().insert(volume);
        self.lock().remove(&volume);
    }

    /// Giveback: the copy of `volume` follows the partner's stream again (from its next
    /// connection, which starts with a LOG_RESET).
    pub fn release(&self, volume: u64) {
        self.seized().remove(&volume);
    }

    /// The NVRAM config the copy of partner volume `name` is kept under (log size `log_bytes`).
    pub fn copy_config(&self, name: &str, log_bytes: u64) -> NvramConfig {
        NvramConfig {
            path: self.copy_path(name),
            persistence: self.settings.persistence,
            node_id: self.settings.node_id,
            pair_id: self.settings.pair_id,
            log_bytes_per_region: log_bytes,
            create_if_missing: false,
        }
    }

    /// True when this node holds a copy of partner volume `volume` that follows the partner's
    /// stream: opened, bound, and reset by the partner's LOG_RESET on the current (or last)
    /// connection. A copy opened but not yet reset is mid-resync, not usable.
    pub fn copy_ready(&self, volume: u64) -> bool {
        self.lock().get(&volume).is_some_and(|c| c.stream.is_some())
    }

    /// True while the copy of `volume` is seized (this node serves the volume from it).
    pub fn copy_in_use(&self, volume: u64) -> bool {
        self.seized().contains(&volume)
    }

    /// Sends the bytes of every STATUS frame from now on to `tx` too (replacing an older `tx`).
    pub fn subscribe_status(&self, tx: tokio::sync::mpsc::Sender<Vec<u8>>) {
        *self.status_tx.lock().unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, PartnerCopy>> {
        self.copies.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn copy_path(&self, name: &str) -> PathBuf {
        self.settings.dir.join(format!("{name}.partner.nvram"))
    }

    /// Opens (or creates) the copy of every announced volume, binds each to the announced store
    /// and forgets the previous connection's streams. Fails on the first copy that cannot be used.
    pub fn open_copies(&self, volumes: &[VolumeAnnounce]) -> Result<(), String> {
        let seized = self.seized().clone();
        let mut copies = self.lock();
        for v in volumes {
            if seized.contains(&v.volume) {
                tracing::info!(volume = %v.name,
                    "partner volume is served here from its copy (takeover): its copy takes no records until giveback");
                continue;
            }
            let reuse = copies
                .get(&v.volume)
                .is_some_and(|c| c.log_bytes == v.log_bytes);
            if !reuse {
                copies.remove(&v.volume);
                let copy = self.open_copy(v)?;
                copies.insert(v.volume, copy);
            }
            let Some(copy) = copies.get_mut(&v.volume) else {
                continue;
            };
            copy.stream = None;
            let bound = copy.region.region().store_id();
            if v.store_id != [0; 16] && bound != v.store_id {
                if bound != [0; 16] {
                    tracing::info!(volume = %v.name, from = %format_id(&bound), to = %format_id(&v.store_id),
                        "partner copy moves to the partner volume's new store");
                }
                copy.region
                    .bind_store(v.store_id)
                    .map_err(|e| format!("partner copy {}: {e}", copy.path.display()))?;
            }
        }
        Ok(())
    }

    fn open_copy(&self, v: &VolumeAnnounce) -> Result<PartnerCopy, String> {
        let path = self.copy_path(&v.name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        }
        let mut nvram = Nvram::open(&NvramConfig {
            path: path.clone(),
            persistence: self.settings.persistence,
            node_id: self.settings.node_id,
            pair_id: self.settings.pair_id,
            log_bytes_per_region: v.log_bytes,
            create_if_missing: true,
        })
        .map_err(|e| {
            format!(
                "cannot keep a copy of the partner's volume `{}`: {e}",
                v.name
            )
        })?;
        let region = nvram
            .take_partner()
            .ok_or_else(|| format!("partner copy {}: partner region in use", path.display()))?;
        Ok(PartnerCopy {
            name: v.name.clone(),
            path,
            log_bytes: v.log_bytes,
            region,
            stream: None,
            records_stored: 0,
            last_record_at: None,
            unpersisted: Vec::new(),
            unpersisted_bytes: 0,
            persist_groups: 0,
            _nvram: nvram,
        })
    }

    /// Persists every record stored and not yet persisted (see the module docs): the seqs
    /// `apply` put in `touched` may be acknowledged once this returned.
    pub fn persist_pending(&self) -> Result<(), ReceiveError> {
        for copy in self.lock().values_mut() {
            copy.persist_pending()?;
        }
        Ok(())
    }

    /// Applies one frame of the partner's stream; `touched` collects, per volume, the seq to
    /// acknowledge (cumulative) once the batch is done and persisted
    /// ([`Receiver::persist_pending`]).
    pub fn apply(
        &self,
        msg: Message,
        announced: &HashSet<u64>,
        touched: &mut BTreeMap<u64, u64>,
    ) -> Result<(), ReceiveError> {
        let volume = match &msg {
            Message::Status(bytes) => {
                self.note_status(bytes.clone());
                return Ok(());
            }
            Message::Ack { .. } => return Err(ReceiveError::Unsupported("ACK")),
            // FETCH_REQUEST is answered by `fetch_reply` (the connection writes the reply).
            Message::FetchRequest { .. } => return Err(ReceiveError::Unsupported("FETCH_REQUEST")),
            Message::FetchRecord(_) => return Err(ReceiveError::Unsupported("FETCH_RECORD")),
            Message::FetchBegin(_) => return Err(ReceiveError::Unsupported("FETCH_BEGIN")),
            Message::Record(r) => r.volume,
            Message::LogReset(r) => r.volume,
            Message::ResyncBegin { volume, .. } | Message::ResyncEnd { volume, .. } => *volume,
        };
        if self.seized().contains(&volume) {
            // Served here from its copy: neither stored nor acknowledged (the partner's mirror
            // times out and reports itself out of sync).
            return Ok(());
        }
        let mut copies = self.lock();
        let copy = match copies.get_mut(&volume) {
            Some(c) if announced.contains(&volume) => c,
            _ => return Err(ReceiveError::UnknownVolume(volume)),
        };
        match msg {
            Message::LogReset(r) => copy.reset(r)?,
            Message::Record(r) => copy.store(RecordRef {
                volume: r.volume,
                log_offset: r.log_offset,
                seq: r.seq,
                record: &r.record,
            })?,
            Message::ResyncBegin { first_seq, .. } => {
                let next = copy.expect_stream()?.next_seq;
                if first_seq != next {
                    return Err(copy.gap(next, first_seq));
                }
            }
            Message::ResyncEnd { last_seq, .. } => {
                let next = copy.expect_stream()?.next_seq;
                if last_seq + 1 != next {
                    return Err(copy.gap(next, last_seq + 1));
                }
            }
            _ => {}
        }
        if let Some(s) = copy.stream {
            touched.insert(volume, s.next_seq - 1);
        }
        Ok(())
    }

    /// [`Receiver::apply`] for a RECORD read in place ([`RecordRef`]): the same checks and
    /// effects, with the record bytes copied once, from the receive buffer into the copy's
    /// NVRAM mapping (the hot path of the receiving node).
    pub fn apply_record(
        &self,
        r: RecordRef<'_>,
        announced: &HashSet<u64>,
        touched: &mut BTreeMap<u64, u64>,
    ) -> Result<(), ReceiveError> {
        if self.seized().contains(&r.volume) {
            return Ok(()); // served here from its copy: see `apply`
        }
        let mut copies = self.lock();
        let copy = match copies.get_mut(&r.volume) {
            Some(c) if announced.contains(&r.volume) => c,
            _ => return Err(ReceiveError::UnknownVolume(r.volume)),
        };
        copy.store(r)?;
        if let Some(s) = copy.stream {
            touched.insert(r.volume, s.next_seq - 1);
        }
        Ok(())
    }

    /// The reply to the partner's FETCH_REQUEST (NVRAM-loss recovery): FETCH_BEGIN (the copy's
    /// store, generation, tail and last seq) then every record of the copy's live log as
    /// FETCH_RECORDs, in seq order. A copy never bound to a store answers with an all-zero store
    /// id and no records. Read-only: the copy stays as it is until the owner's next LOG_RESET.
    pub fn fetch_reply(
        &self,
        volume: u64,
        from_seq: u64,
        announced: &HashSet<u64>,
        seal: &mut impl FrameWriter,
    ) -> Result<Vec<u8>, ReceiveError> {
        let copies = self.lock();
        let copy = match copies.get(&volume) {
            Some(c) if announced.contains(&volume) => c,
            _ => return Err(ReceiveError::UnknownVolume(volume)),
        };
        let region = copy.region.region();
        let scan = copy.region.scan();
        if scan.report.corrupt_mid_region() {
            return Err(ReceiveError::BadRecord {
                volume: copy.name.clone(),
                seq: scan.report.last_seq + 1,
                detail: format!(
                    "the copy is damaged in the middle ({} at log offset {}); not sent",
                    scan.report.stop.describe(),
                    scan.report.stop_offset
                ),
            });
        }
        let start = scan.report.start;
        let mut out = Vec::new();
        Message::FetchBegin(FetchBegin {
            volume,
            store_id: region.store_id(),
            generation: start.generation,
            tail_offset: start.tail_offset,
            tail_seq: start.tail_seq,
            last_seq: scan.report.last_seq,
        })
        .encode_with(seal, &mut out);
        if region.store_id() != [0; 16] {
            for r in &scan.records {
                let len = if r.header.kind == RecordKind::Pad {
                    RECORD_HEADER_BYTES as u64
                } else {
                    r.header.total_bytes()
                };
                Message::FetchRecord(RecordFrame {
                    volume,
                    log_offset: r.log_offset,
                    seq: r.header.seq,
                    record: region.log_slice(r.log_offset, len).to_vec(),
                })
                .encode_with(seal, &mut out);
            }
        }
        tracing::info!(volume = %copy.name, records = scan.records.len(), tail_seq = start.tail_seq,
            last_seq = scan.report.last_seq, from_seq, "sending the partner its log back (NVRAM-loss recovery)");
        Ok(out)
    }

    /// Status of every copy (for `twinctl status`).
    pub fn status_json(&self) -> serde_json::Value {
        let copies = self.lock();
        let list: Vec<_> = copies
            .values()
            .map(|c| {
                let ctl = c.region.region().control();
                serde_json::json!({
                    "volume": c.name,
                    "file": c.path.display().to_string(),
                    "generation": ctl.map(|c| c.generation),
                    "tail_seq": ctl.map(|c| c.tail_seq),
                    "stored_through_seq": c.stream.map(|s| s.next_seq - 1),
                    "records_stored": c.records_stored,
                    "persist_groups": c.persist_groups,
                    "last_record_age_ms": c.last_record_at.map(|t| t.elapsed().as_millis() as u64),
                })
            })
            .collect();
        let status_age = self
            .last_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|(t, _)| t.elapsed().as_millis() as u64);
        serde_json::json!({ "copies": list, "last_status_age_ms": status_age })
    }

    /// Every record of each copy's live log (seq, log offset, CRC), for comparing with the owner.
    pub fn records_json(&self) -> serde_json::Value {
        let copies = self.lock();
        let mut out = serde_json::Map::new();
        for c in copies.values() {
            let region = c.region.region();
            let scan = c.region.scan();
            let list: Vec<_> = scan
                .records
                .iter()
                .map(|r| {
                    record_json(
                        r.header.seq,
                        r.log_offset,
                        region.log_slice(r.log_offset, 64),
                    )
                })
                .collect();
            out.insert(c.name.clone(), serde_json::Value::Array(list));
        }
        serde_json::Value::Object(out)
    }

    /// Keeps a status record the partner sent (on either connection).
    pub fn note_status(&self, bytes: Vec<u8>) {
        if let Some(tx) = &*self.status_tx.lock().unwrap_or_else(|p| p.into_inner()) {
            // Full: the controller is behind; a newer record follows within an interval.
            let _ = tx.try_send(bytes.clone());
        }
        *self.last_status.lock().unwrap_or_else(|p| p.into_inner()) = Some((Instant::now(), bytes));
    }

    /// The last status record the partner sent on the interconnect (for the HA controller).
    pub fn last_status(&self) -> Option<(Instant, Vec<u8>)> {
        self.last_status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// One record as `{seq, log_offset, crc}`: the CRC is the record header's CRC32C field, which
/// covers header and payload, so equal CRCs at equal seqs mean equal records.
pub fn record_json(seq: u64, log_offset: u64, header: &[u8]) -> serde_json::Value {
    let crc = header
        .get(60..64)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .unwrap_or(0);
    serde_json::json!({ "seq": seq, "log_offset": log_offset, "crc": crc })
}

impl PartnerCopy {
    fn persist_pending(&mut self) -> Result<(), ReceiveError> {
        if self.unpersisted.is_empty() {
            return Ok(());
        }
        self.region
            .persist_received(&self.unpersisted)
            .map_err(|source| ReceiveError::Journal {
                volume: self.name.clone(),
                source,
            })?;
        self.unpersisted.clear();
        self.unpersisted_bytes = 0;
        self.persist_groups += 1;
        Ok(())
    }

    fn expect_stream(&self) -> Result<Stream, ReceiveError> {
        self.stream.ok_or_else(|| ReceiveError::NoReset {
            volume: self.name.clone(),
        })
    }

    fn gap(&self, expected: u64, found: u64) -> ReceiveError {
        ReceiveError::Gap {
            volume: self.name.clone(),
            expected,
            found,
        }
    }

    fn reset(&mut self, r: LogReset) -> Result<(), ReceiveError> {
        self.persist_pending()?;
        let copy_gen = self.region.region().control().map_or(0, |c| c.generation);
        if r.generation < copy_gen {
            return Err(ReceiveError::GenerationBackwards {
                volume: self.name.clone(),
                copy: copy_gen,
                announced: r.generation,
            });
        }
        self.region
            .reset(r.generation, r.tail_offset, r.tail_seq)
            .map_err(|source| ReceiveError::Journal {
                volume: self.name.clone(),
                source,
            })?;
        self.stream = Some(Stream {
            generation: r.generation,
            next_seq: r.tail_seq,
        });
        Ok(())
    }

    fn store(&mut self, r: RecordRef<'_>) -> Result<(), ReceiveError> {
        let mut stream = self.expect_stream()?;
        if r.seq < stream.next_seq {
            return Ok(()); // a duplicate: stored once already, acknowledged again
        }
        if r.seq > stream.next_seq {
            return Err(self.gap(stream.next_seq, r.seq));
        }
        let bad = |name: &str, detail: String| ReceiveError::BadRecord {
            volume: name.to_string(),
            seq: r.seq,
            detail,
        };
        let h = RecordHeader::decode(r.record).map_err(|e| bad(&self.name, e.to_string()))?;
        if h.seq != r.seq || h.generation != stream.generation {
            return Err(bad(
                &self.name,
                format!(
                    "header says seq {} generation {}, the stream is at generation {}",
                    h.seq, h.generation, stream.generation
                ),
            ));
        }
        if h.kind != RecordKind::Pad && h.volume_id != r.volume {
            return Err(bad(
                &self.name,
                format!("header names volume {}", h.volume_id),
            ));
        }
        if h.kind == RecordKind::Cp {
            // A CP moves the copy's tail: the records before it are persisted first.
            self.persist_pending()?;
        }
        // Checks CRC and bounds before writing anything.
        let range = self
            .region
            .receive_unpersisted(r.log_offset, r.record)
            .map_err(|e| bad(&self.name, e.to_string()))?;
        if let Some((at, len)) = range {
            self.unpersisted.push((at, len));
            self.unpersisted_bytes += len;
            if self.unpersisted.len() as u64 >= UNPERSISTED_MAX_RECORDS
                || self.unpersisted_bytes >= UNPERSISTED_MAX_LOG_BYTES
            {
                self.persist_pending()?;
            }
        }
        stream.next_seq += 1;
        self.stream = Some(stream);
        self.records_stored += 1;
        self.last_record_at = Some(Instant::now());
        Ok(())
    }
}

#[cfg(test)]
pub(super) mod tests {
    //! The fixtures here also serve `rx_batch`'s tests (same volume, copy settings and records).
    use super::*;
    use twinblock_journal::format::encode_record;

    pub(in crate::pair) const VOL: u64 = 42;

    pub(in crate::pair) fn receiver(dir: &std::path::Path) -> Receiver {
        Receiver::new(CopySettings {
            node_id: 1,
            pair_id: [7; 16],
            persistence: PersistenceMode::None,
            dir: dir.to_path_buf(),
        })
    }

    pub(in crate::pair) fn announce() -> VolumeAnnounce {
        VolumeAnnounce {
            volume: VOL,
            name: "r5".into(),
            generation: 3,
            log_bytes: 64 * 1024,
            store_id: [9; 16],
        }
    }

    pub(in crate::pair) fn record(seq: u64, generation: u64, fill: u8) -> Vec<u8> {
        let h = RecordHeader {
            kind: RecordKind::Write,
            generation,
            seq,
            volume_id: VOL,
            offset: 4096 * seq,
            length: 64,
            payload_bytes: 64,
        };
        encode_record(&h, &[fill; 64])
    }

    fn frame(seq: u64, fill: u8) -> Message {
        Message::Record(RecordFrame {
            volume: VOL,
            log_offset: (seq - 10) * 128,
            seq,
            record: record(seq, 3, fill),
        })
    }

    pub(in crate::pair) fn reset() -> Message {
        Message::LogReset(LogReset {
            volume: VOL,
            generation: 3,
            tail_offset: 0,
            tail_seq: 10,
        })
    }

    fn setup(dir: &std::path::Path) -> (Receiver, HashSet<u64>) {
        let r = receiver(dir);
        r.open_copies(&[announce()]).unwrap();
        (r, HashSet::from([VOL]))
    }

    fn stored_seqs(r: &Receiver) -> Vec<u64> {
        r.records_json()["r5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x["seq"].as_u64().unwrap())
            .collect()
    }

    #[test]
    fn records_are_stored_in_order_and_acked_cumulatively() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let mut t = BTreeMap::new();
        r.apply(reset(), &ann, &mut t).unwrap();
        assert_eq!(t[&VOL], 9);
        for s in 10..15 {
            r.apply(frame(s, s as u8), &ann, &mut t).unwrap();
        }
        assert_eq!(t[&VOL], 14);
        assert_eq!(stored_seqs(&r), vec![10, 11, 12, 13, 14]);
    }

    #[test]
    fn records_of_one_read_are_persisted_as_one_group() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let mut t = BTreeMap::new();
        r.apply(reset(), &ann, &mut t).unwrap();
        for s in 10..15 {
            r.apply(frame(s, s as u8), &ann, &mut t).unwrap();
        }
        let groups = |r: &Receiver| r.lock()[&VOL].persist_groups;
        assert_eq!(groups(&r), 0, "persisted before the read was done");
        assert_eq!(r.lock()[&VOL].unpersisted.len(), 5);
        r.persist_pending().unwrap();
        assert_eq!(groups(&r), 1);
        assert!(r.lock()[&VOL].unpersisted.is_empty());
        r.persist_pending().unwrap();
        assert_eq!(groups(&r), 1, "nothing pending: no persist");
    }

    #[test]
    fn unpersisted_records_stay_within_the_scan_window() {
        let d = tempfile::tempdir().unwrap();
        let r = receiver(d.path());
        let mut big = announce();
        big.log_bytes = 4 << 20;
        r.open_copies(&[big]).unwrap();
        let ann = HashSet::from([VOL]);
        let mut t = BTreeMap::new();
        r.apply(reset(), &ann, &mut t).unwrap();
        let n = UNPERSISTED_MAX_RECORDS * 2 + 3;
        for s in 10..10 + n {
            r.apply(frame(s, 1), &ann, &mut t).unwrap();
            assert!((r.lock()[&VOL].unpersisted.len() as u64) < UNPERSISTED_MAX_RECORDS);
        }
        assert_eq!(r.lock()[&VOL].persist_groups, 2);
        assert_eq!(t[&VOL], 9 + n);
    }

    #[test]
    fn duplicate_record_is_stored_once_and_acked_again() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let mut t = BTreeMap::new();
        r.apply(reset(), &ann, &mut t).unwrap();
        r.apply(frame(10, 1), &ann, &mut t).unwrap();
        r.apply(frame(11, 1), &ann, &mut t).unwrap();
        // seq 10 again, with other bytes: ignored, not written over the stored one.
        r.apply(frame(10, 2), &ann, &mut t).unwrap();
        assert_eq!(t[&VOL], 11);
        assert_eq!(stored_seqs(&r), vec![10, 11]);
    }

    #[test]
    fn gaps_unknown_volumes_and_missing_resets_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let mut t = BTreeMap::new();
        assert!(matches!(
            r.apply(frame(10, 1), &ann, &mut t),
            Err(ReceiveError::NoReset { .. })
        ));
        r.apply(reset(), &ann, &mut t).unwrap();
        assert!(matches!(
            r.apply(frame(12, 1), &ann, &mut t),
            Err(ReceiveError::Gap { .. })
        ));
        let mut other = frame(10, 1);
        if let Message::Record(f) = &mut other {
            f.volume = 5;
        }
        assert!(matches!(
            r.apply(other, &ann, &mut t),
            Err(ReceiveError::UnknownVolume(5))
        ));
        assert!(stored_seqs(&r).is_empty());
    }

    #[test]
    fn record_with_bad_crc_is_refused_and_not_stored() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let mut t = BTreeMap::new();
        r.apply(reset(), &ann, &mut t).unwrap();
        let mut bad = frame(10, 1);
        if let Message::Record(f) = &mut bad {
            f.record[100] ^= 1;
        }
        assert!(matches!(
            r.apply(bad, &ann, &mut t),
            Err(ReceiveError::BadRecord { .. })
        ));
        assert!(stored_seqs(&r).is_empty());
        // The stream is unchanged: the good record still fits.
        r.apply(frame(10, 1), &ann, &mut t).unwrap();
        assert_eq!(stored_seqs(&r), vec![10]);
    }

    /// The in-place RECORD path the connection uses: stores in order, refuses a bad CRC, a gap
    /// and an unknown volume without storing, and acknowledges a duplicate without storing it again.
    #[test]
    fn record_read_in_place_is_checked_like_a_decoded_one() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let mut t = BTreeMap::new();
        r.apply(reset(), &ann, &mut t).unwrap();
        let rec = |seq: u64| record(seq, 3, seq as u8);
        fn at(seq: u64, bytes: &[u8]) -> RecordRef<'_> {
            RecordRef {
                volume: VOL,
                log_offset: (seq - 10) * 128,
                seq,
                record: bytes,
            }
        }
        let mut bad = rec(10);
        bad[100] ^= 1;
        assert!(matches!(
            r.apply_record(at(10, &bad), &ann, &mut t),
            Err(ReceiveError::BadRecord { .. })
        ));
        let r12 = rec(12);
        assert!(matches!(
            r.apply_record(at(12, &r12), &ann, &mut t),
            Err(ReceiveError::Gap { .. })
        ));
        let r10 = rec(10);
        let mut other = at(10, &r10);
        other.volume = VOL + 1;
        assert!(matches!(
            r.apply_record(other, &ann, &mut t),
            Err(ReceiveError::UnknownVolume(_))
        ));
        assert!(stored_seqs(&r).is_empty());
        r.apply_record(at(10, &r10), &ann, &mut t).unwrap();
        let r11 = rec(11);
        r.apply_record(at(11, &r11), &ann, &mut t).unwrap();
        r.apply_record(at(10, &r10), &ann, &mut t).unwrap();
        assert_eq!(stored_seqs(&r), vec![10, 11]);
        assert_eq!(t[&VOL], 11);
    }

    #[test]
    fn log_reset_to_an_older_generation_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let mut t = BTreeMap::new();
        r.apply(reset(), &ann, &mut t).unwrap();
        let older = Message::LogReset(LogReset {
            volume: VOL,
            generation: 2,
            tail_offset: 0,
            tail_seq: 1,
        });
        assert!(matches!(
            r.apply(older, &ann, &mut t),
            Err(ReceiveError::GenerationBackwards { .. })
        ));
    }

    #[test]
    fn seized_copy_takes_no_records_and_is_not_reopened() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let mut t = BTreeMap::new();
        r.apply(reset(), &ann, &mut t).unwrap();
        r.apply(frame(10, 1), &ann, &mut t).unwrap();
        assert!(r.copy_ready(VOL));
        r.seize(VOL);
        assert!(!r.copy_ready(VOL));
        // The file is free for the journal to open (the lock was released).
        let cfg = r.copy_config("r5", announce().log_bytes);
        let nv = Nvram::open(&cfg).unwrap();
        // A resuming partner announces and streams again: nothing is opened or stored.
        r.open_copies(&[announce()]).unwrap();
        let mut t2 = BTreeMap::new();
        r.apply(reset(), &ann, &mut t2).unwrap();
        r.apply(frame(10, 9), &ann, &mut t2).unwrap();
        assert!(t2.is_empty(), "nothing acknowledged for a seized copy");
        drop(nv);
        r.release(VOL);
        r.open_copies(&[announce()]).unwrap();
        assert_eq!(stored_seqs(&r), vec![10]);
    }

    #[test]
    fn status_frames_reach_the_subscriber() {
        let d = tempfile::tempdir().unwrap();
        let (r, ann) = setup(d.path());
        let (tx, mut rx) = tokio::sync::mpsc::channel(4);
        r.subscribe_status(tx);
        r.apply(Message::Status(vec![1, 2, 3]), &ann, &mut BTreeMap::new())
            .unwrap();
        assert_eq!(rx.try_recv().unwrap(), vec![1, 2, 3]);
        assert!(r.last_status().is_some());
    }

    #[test]
    fn copy_survives_a_reopen_and_is_bound_to_the_partner_store() {
        let d = tempfile::tempdir().unwrap();
        {
            let (r, ann) = setup(d.path());
            let mut t = BTreeMap::new();
            r.apply(reset(), &ann, &mut t).unwrap();
            r.apply(frame(10, 1), &ann, &mut t).unwrap();
        }
        let (r, _) = setup(d.path());
        assert_eq!(stored_seqs(&r), vec![10]);
        let copies = r.lock();
        assert_eq!(copies[&VOL].region.region().store_id(), [9; 16]);
    }
}
