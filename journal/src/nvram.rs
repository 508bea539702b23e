//! Opening an NVRAM file: identity checks, formatting a fresh file, the generation bump, and the
//! two regions (own and partner) with their control slots.
//!
//! Outcomes for bad input (all refuse to open, with a typed [`JournalError`]): a file too short
//! for its header or regions, a foreign file (no valid header slot), an unsupported version, a
//! file of another node or pair, or a file whose size differs from the config. A damaged *log*
//! is not an open error: it is found by the scan during recovery (see `volume`).

use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::error::{FormatError, JournalError};
use crate::format::{
    ControlSlot, CpPayload, FileHeader, RecordHeader, RecordKind, CONTROL_AREA_BYTES,
    CONTROL_SLOT_BYTES, CONTROL_SLOT_B_OFFSET, HEADER_AREA_BYTES, HEADER_SLOT_BYTES,
    HEADER_SLOT_B_OFFSET, RECORD_ALIGN_BYTES, RECORD_HEADER_BYTES,
};
use crate::pmem::{MapSpan, Mapping, PersistMethod, PersistenceMode};
use crate::scan::{scan_log, scan_log_deferred, Scan, ScanReport, ScanStart};

/// Default directory of NVRAM files (tmpfs).
pub const DEFAULT_NVRAM_DIR: &str = "/dev/shm";
/// Default log size of each region.
pub const DEFAULT_LOG_BYTES_PER_REGION: u64 = 64 * 1024 * 1024;

/// How to open the NVRAM file.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NvramConfig {
    pub path: PathBuf,
    pub persistence: PersistenceMode,
    pub node_id: u32,
    /// Identity of the HA pair (a UUID's 16 bytes).
    pub pair_id: [u8; 16],
    /// Bytes of circular log in each of the two regions (multiple of 64).
    pub log_bytes_per_region: u64,
    /// Create and format the file when it does not exist (or is empty).
    pub create_if_missing: bool,
}

impl NvramConfig {
    /// Defaults for `node_id`: `/dev/shm/twinblock-nvram-node<N>.img`, tmpfs persistence.
    pub fn new(node_id: u32, pair_id: [u8; 16]) -> NvramConfig {
        NvramConfig {
            path: Path::new(DEFAULT_NVRAM_DIR).join(format!("twinblock-nvram-node{node_id}.img")),
            persistence: PersistenceMode::None,
            node_id,
            pair_id,
            log_bytes_per_region: DEFAULT_LOG_BYTES_PER_REGION,
            create_if_missing: true,
        }
    }
}

/// Picks the valid header slot with the highest generation from the header area.
pub fn read_header(bytes: &[u8]) -> Result<(usize, FileHeader), FormatError> {
    if (bytes.len() as u64) < HEADER_AREA_BYTES {
        return Err(FormatError::Truncated {
            what: "NVRAM file header",
            need: HEADER_AREA_BYTES,
            have: bytes.len() as u64,
        });
    }
    let b_at = HEADER_SLOT_B_OFFSET as usize;
    let a = FileHeader::decode(&bytes[..HEADER_SLOT_BYTES]);
    let b = FileHeader::decode(&bytes[b_at..b_at + HEADER_SLOT_BYTES]);
    match (a, b) {
        (Ok(x), Ok(y)) if y.generation > x.generation => Ok((1, y)),
        (Ok(x), _) => Ok((0, x)),
        (Err(_), Ok(y)) => Ok((1, y)),
        // Report the more telling of the two errors: a version mismatch over a blank slot.
        (Err(FormatError::Blank), Err(e)) | (Err(e), Err(_)) => Err(e),
    }
}

/// One region: control slots and circular log, over its span of the mapping.
#[derive(Debug)]
pub struct Region {
    name: &'static str,
    span: MapSpan,
    control: Option<ControlSlot>,
    control_index: usize,
}

impl Region {
    fn new(name: &'static str, span: MapSpan) -> Region {
        let b = span.bytes();
        let at_b = CONTROL_SLOT_B_OFFSET as usize;
        let picked = ControlSlot::pick(
            &b[..CONTROL_SLOT_BYTES],
            &b[at_b..at_b + CONTROL_SLOT_BYTES],
        );
        Region {
            name,
            control: picked.map(|p| p.1),
            control_index: picked.map_or(1, |p| p.0),
            span,
        }
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The circular log bytes.
    pub fn log(&self) -> &[u8] {
        &self.span.bytes()[CONTROL_AREA_BYTES as usize..]
    }

    pub fn log_bytes(&self) -> u64 {
        self.span.len() - CONTROL_AREA_BYTES
    }

    /// The newest valid control slot, `None` for a region never used.
    pub fn control(&self) -> Option<ControlSlot> {
        self.control
    }

    pub fn persist_method(&self) -> PersistMethod {
        self.span.method()
    }

    /// Where a scan starts: the control slot's tail, or offset 0 / seq 1 / generation 0 when the
    /// region was never used.
    pub fn scan_start(&self) -> ScanStart {
        match self.control {
            Some(c) => ScanStart {
                tail_offset: c.tail_offset,
                tail_seq: c.tail_seq,
                generation: c.generation,
            },
            None => ScanStart {
                tail_offset: 0,
                tail_seq: 1,
                generation: 0,
            },
        }
    }

    /// Scans the log from the control slot's tail.
    pub fn scan(&self) -> Scan {
        self.with_window(scan_log(self.log(), self.scan_start()))
    }

    /// Records of a log persisted by `msync` may have been stored and not persisted several at a
    /// time (group commit): the scan's report says so (see [`crate::scan`]).
    fn with_window(&self, mut scan: Scan) -> Scan {
        if self.span.method() == PersistMethod::Msync {
            scan.report.unpersisted_window_records = crate::scan::UNPERSISTED_MAX_RECORDS;
        }
        scan
    }

    /// [`Region::scan`] leaving the CRCs of older WRITE records to the caller
    /// ([`crate::scan::scan_log_deferred`]), with helper threads mapping the log's pages ahead
    /// of the walk ([`crate::prefault`]).
    pub fn scan_deferred(&self) -> Scan {
        let (log, start) = (self.log(), self.scan_start());
        let scan = crate::prefault::while_walking(log, start.tail_offset, || {
            scan_log_deferred(log, start)
        });
        self.with_window(scan)
    }

    /// Writes and persists a new control slot (into the slot not holding the current one).
    pub fn write_control(
        &mut self,
        generation: u64,
        tail_offset: u64,
        tail_seq: u64,
    ) -> Result<(), JournalError> {
        let store_id = self.store_id();
        self.put_control(ControlSlot {
            counter: self.control.map_or(1, |c| c.counter + 1),
            generation,
            tail_offset,
            tail_seq,
            store_id,
        })
    }

    /// The store this region's log is bound to (all zero: unbound).
    pub fn store_id(&self) -> [u8; 16] {
        self.control.map_or([0; 16], |c| c.store_id)
    }

    /// Binds the log to store `id` (persisted in a new control slot, tail unchanged).
    pub fn bind_store(&mut self, id: [u8; 16]) -> Result<(), JournalError> {
        let (generation, tail_offset, tail_seq) = match self.control {
            Some(c) => (c.generation, c.tail_offset, c.tail_seq),
            None => (0, 0, 1),
        };
        self.put_control(ControlSlot {
            counter: self.control.map_or(1, |c| c.counter + 1),
            generation,
            tail_offset,
            tail_seq,
            store_id: id,
        })
    }

    fn put_control(&mut self, slot: ControlSlot) -> Result<(), JournalError> {
        let idx = 1 - self.control_index;
        let at = idx as u64 * CONTROL_SLOT_B_OFFSET;
        self.span.write(at, &slot.encode());
        self.span.persist(at, CONTROL_SLOT_BYTES as u64)?;
        self.control = Some(slot);
        self.control_index = idx;
        Ok(())
    }

    /// Copies `data` into the log at `log_offset` (not persisted yet).
    pub fn write_log(&mut self, log_offset: u64, data: &[u8]) {
        self.span.write(CONTROL_AREA_BYTES + log_offset, data);
    }

    /// Zeroes `len` log bytes at `log_offset` (not persisted yet).
    pub fn zero_log(&mut self, log_offset: u64, len: u64) {
        self.span.zero(CONTROL_AREA_BYTES + log_offset, len);
    }

    /// Persists `len` log bytes at `log_offset`.
    pub fn persist_log(&self, log_offset: u64, len: u64) -> Result<(), JournalError> {
        self.span.persist(CONTROL_AREA_BYTES + log_offset, len)
    }

    /// Persists what the scan in `report` read and recovery is about to trust (the control area
    /// and the log from the tail through the header that ended the scan, or more: see
    /// [`crate::write_back`]), in case a crashed process stored it without persisting it.
    pub fn persist_after_crash(&self, report: &ScanReport) -> Result<(), JournalError> {
        let ranges = crate::write_back::crash_write_back_ranges(
            self.span.method(),
            report,
            self.log_bytes(),
        );
        for (at, len) in ranges {
            self.span.persist(at, len)?;
        }
        Ok(())
    }

    /// A function persisting `len` log bytes at `log_offset` from another thread (the group
    /// commit of `msync` mode), while this region keeps storing into the log.
    pub fn log_persister(&self) -> crate::group_commit::PersistFn {
        let persister = self.span.persister();
        Box::new(move |log_offset, len| persister.persist(CONTROL_AREA_BYTES + log_offset, len))
    }

    /// Blanks (zeroes and persists) the record headers at `log_offsets`: leftovers of a torn
    /// group commit beyond the log's end (see [`crate::scan::unpersisted_leftovers`]).
    pub fn blank_log_headers(&mut self, log_offsets: &[u64]) -> Result<(), JournalError> {
        let header = RECORD_HEADER_BYTES as u64;
        for &at in log_offsets {
            if at
                .checked_add(header)
                .is_none_or(|end| end > self.log_bytes())
            {
                continue;
            }
            self.zero_log(at, header);
            self.persist_log(at, header)?;
        }
        Ok(())
    }

    /// `len` log bytes at `log_offset`.
    pub fn log_slice(&self, log_offset: u64, len: u64) -> &[u8] {
        &self.log()[log_offset as usize..(log_offset + len) as usize]
    }
}

/// The partner region: a copy of the partner's own log, written by the mirror receiver.
#[derive(Debug)]
pub struct PartnerRegion {
    region: Region,
}

impl PartnerRegion {
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// The partner started a new log (after its recovery): records restart at `tail_offset`.
    pub fn reset(
        &mut self,
        generation: u64,
        tail_offset: u64,
        tail_seq: u64,
    ) -> Result<(), JournalError> {
        if tail_offset >= self.region.log_bytes() || !tail_offset.is_multiple_of(RECORD_ALIGN_BYTES)
        {
            return Err(JournalError::PartnerRecord {
                log_offset: tail_offset,
                detail: format!(
                    "log reset to an offset outside the log of {} bytes or unaligned",
                    self.region.log_bytes()
                ),
            });
        }
        self.region.write_control(generation, tail_offset, tail_seq)
    }

    /// Stores one encoded record received from the partner at `log_offset` (the offset it has in
    /// the partner's own log) and persists it. A CP record also moves the partner region's tail.
    /// The record is checked (decode, CRC, bounds) before anything is written.
    pub fn receive(&mut self, log_offset: u64, record: &[u8]) -> Result<(), JournalError> {
        if let Some((at, len)) = self.receive_unpersisted(log_offset, record)? {
            self.region.persist_log(at, len)?;
        }
        Ok(())
    }

    /// [`PartnerRegion::receive`] leaving the persist of a data record to the caller: returns the
    /// log range `(at, len)` still to persist, so the receiver persists a whole batch of records
    /// with [`PartnerRegion::persist_received`] (one `msync` per run of pages, as the own log's
    /// group commit does) before it acknowledges them. The caller keeps at most
    /// [`crate::group_commit::UNPERSISTED_MAX_RECORDS`] records and
    /// [`crate::group_commit::UNPERSISTED_MAX_LOG_BYTES`] unpersisted, the bound a scan of an
    /// `msync` log relies on. A CP record is persisted here, before it moves the tail.
    pub fn receive_unpersisted(
        &mut self,
        log_offset: u64,
        record: &[u8],
    ) -> Result<Option<(u64, u64)>, JournalError> {
        let bad = |detail: String| JournalError::PartnerRecord { log_offset, detail };
        let header = RecordHeader::decode(record).map_err(|e| bad(e.to_string()))?;
        let payload_end = RECORD_HEADER_BYTES + header.payload_bytes as usize;
        if record.len() < payload_end {
            return Err(bad(format!(
                "{} bytes, header says {payload_end}",
                record.len()
            )));
        }
        RecordHeader::verify_crc(record, &record[RECORD_HEADER_BYTES..payload_end])
            .map_err(|e| bad(e.to_string()))?;
        // A record arrives as its padded bytes, possibly followed by the zeroed next header
        // slot (see `volume`); a PAD arrives as its header alone.
        let total = header.total_bytes();
        let body = if header.kind == RecordKind::Pad {
            RECORD_HEADER_BYTES as u64
        } else {
            (record.len() as u64).min(total)
        };
        let trailing_zero = header.kind != RecordKind::Pad && record.len() as u64 > total;
        if !log_offset.is_multiple_of(RECORD_ALIGN_BYTES)
            || log_offset + total > self.region.log_bytes()
            || record.len() as u64 > total + RECORD_HEADER_BYTES as u64
            || (trailing_zero
                && log_offset + total + RECORD_HEADER_BYTES as u64 > self.region.log_bytes())
        {
            return Err(bad("does not fit the partner region".into()));
        }
        let order = (header.generation, header.seq);
        if let Some(c) = self.region.control() {
            if order < (c.generation, c.tail_seq) {
                // Already retired by a CP the partner told us about: its space may be reused.
                return Ok(None);
            }
        }
        self.region.write_log(log_offset, &record[..body as usize]);
        let mut persist = body;
        if trailing_zero {
            // Records can arrive out of order: do not blank a newer record already received.
            let next = log_offset + total;
            let slot = self.region.log_slice(next, RECORD_HEADER_BYTES as u64);
            let newer_there =
                RecordHeader::decode(slot).is_ok_and(|h| (h.generation, h.seq) > order);
            if !newer_there {
                self.region.zero_log(next, RECORD_HEADER_BYTES as u64);
                persist = total + RECORD_HEADER_BYTES as u64;
            }
        }
        if header.kind != RecordKind::Cp {
            return Ok(Some((log_offset, persist)));
        }
        self.region.persist_log(log_offset, persist)?;
        {
            let cp = CpPayload::decode(&record[RECORD_HEADER_BYTES..payload_end])
                .map_err(|e| bad(e.to_string()))?;
            let newer_tail = self
                .region
                .control()
                .is_none_or(|c| (header.generation, cp.tail_seq) > (c.generation, c.tail_seq));
            if newer_tail {
                self.region
                    .write_control(header.generation, cp.tail_offset, cp.tail_seq)?;
            }
        }
        Ok(None)
    }

    /// Persists the log ranges [`PartnerRegion::receive_unpersisted`] returned, with one persist
    /// per run of adjacent pages.
    pub fn persist_received(&self, ranges: &[(u64, u64)]) -> Result<(), JournalError> {
        for (at, len) in crate::group_commit::coalesce(ranges) {
            self.region.persist_log(at, len)?;
        }
        Ok(())
    }

    /// The region itself, to serve the partner's volume from it at takeover (see
    /// `JournaledVolume::open_partner_copy`); the copy stops being a mirror target.
    pub fn into_region(self) -> Region {
        self.region
    }

    /// Scans the mirrored log (for takeover replay).
    pub fn scan(&self) -> Scan {
        self.region.scan()
    }

    /// Binds the copy to the partner's store (its array's UUID), so a takeover never replays it
    /// into another array.
    pub fn bind_store(&mut self, id: [u8; 16]) -> Result<(), JournalError> {
        self.region.bind_store(id)
    }
}

/// An opened NVRAM file, its generation already bumped and persisted.
#[derive(Debug)]
pub struct Nvram {
    path: PathBuf,
    header: FileHeader,
    previous_generation: u64,
    mode: PersistenceMode,
    method: PersistMethod,
    survives_power_loss: bool,
    lost_with_power: bool,
    formatted: bool,
    own: Option<Region>,
    partner: Option<PartnerRegion>,
    _header_span: MapSpan,
}

impl Nvram {
    /// Opens (or creates and formats) the NVRAM file, checks its identity and bumps its
    /// generation.
    pub fn open(cfg: &NvramConfig) -> Result<Nvram, JournalError> {
        Self::open_inner(cfg, None)
    }

    /// [`Nvram::open`] with a power-loss model told of every store and persist (tests of `msync`
    /// and `pmem` mode; `pmem` then runs on any file system, see [`Mapping::open_modelled`]).
    pub fn open_with_power_model(
        cfg: &NvramConfig,
        model: std::sync::Arc<crate::power::NvramPowerModel>,
    ) -> Result<Nvram, JournalError> {
        Self::open_inner(cfg, Some(model))
    }

    fn open_inner(
        cfg: &NvramConfig,
        model: Option<std::sync::Arc<crate::power::NvramPowerModel>>,
    ) -> Result<Nvram, JournalError> {
        let path = cfg.path.clone();
        if cfg.log_bytes_per_region < 4 * RECORD_ALIGN_BYTES
            || !cfg.log_bytes_per_region.is_multiple_of(RECORD_ALIGN_BYTES)
        {
            return Err(JournalError::Config(format!(
                "log_bytes_per_region {} must be a multiple of {RECORD_ALIGN_BYTES} and at least {}",
                cfg.log_bytes_per_region,
                4 * RECORD_ALIGN_BYTES
            )));
        }
        let fresh = FileHeader::new(cfg.node_id, cfg.pair_id, cfg.log_bytes_per_region);
        let (create, bytes) = (cfg.create_if_missing, fresh.file_bytes);
        let mapping = match model {
            None => Mapping::open(&path, cfg.persistence, create, bytes)?,
            Some(m) => Mapping::open_modelled(&path, cfg.persistence, create, bytes, m)?,
        };
        let method = mapping.method();
        let survives_power_loss = mapping.survives_power_loss();
        let lost_with_power = mapping.lost_with_power();
        let file_bytes = mapping.len();
        let foreign = |source| JournalError::Foreign {
            path: path.clone(),
            source,
        };
        let (formatted, current, slot) = match read_header(mapping.bytes()) {
            Ok((slot, h)) => (false, h, slot),
            Err(FormatError::Blank) if mapping.bytes().iter().all(|&b| b == 0) => {
                if file_bytes != fresh.file_bytes {
                    return Err(JournalError::WrongSize {
                        path,
                        found: file_bytes,
                        expected: fresh.file_bytes,
                    });
                }
                (true, fresh, 1)
            }
            Err(e) => return Err(foreign(e)),
        };
        current.check_geometry(file_bytes).map_err(foreign)?;
        if current.node_id != cfg.node_id {
            return Err(JournalError::WrongNode {
                path,
                found: current.node_id,
                expected: cfg.node_id,
            });
        }
        if current.pair_id != cfg.pair_id {
            return Err(JournalError::WrongPair {
                path,
                found: Uuid::from_bytes(current.pair_id).to_string(),
                expected: Uuid::from_bytes(cfg.pair_id).to_string(),
            });
        }
        let log_bytes = current.own_region_bytes - CONTROL_AREA_BYTES;
        if log_bytes != cfg.log_bytes_per_region {
            return Err(JournalError::WrongSize {
                path,
                found: log_bytes,
                expected: cfg.log_bytes_per_region,
            });
        }
        let ranges = [
            (0, HEADER_AREA_BYTES),
            (current.own_region_offset, current.own_region_bytes),
            (current.partner_region_offset, current.partner_region_bytes),
        ];
        let mut spans = mapping.split(&ranges).map_err(|_| {
            foreign(FormatError::BadGeometry {
                detail: "regions overlap or leave the file".into(),
            })
        })?;
        let partner_span = spans.pop();
        let own_span = spans.pop();
        let (Some(mut header_span), Some(own_span), Some(partner_span)) =
            (spans.pop(), own_span, partner_span)
        else {
            return Err(JournalError::Config("mapping split lost a span".into()));
        };
        let own = Region::new("own", own_span);
        // A torn header update can leave an older generation readable; the own region's control
        // slot also remembers the last generation used, so G never repeats.
        let last_used = current
            .generation
            .max(own.control().map_or(0, |c| c.generation));
        // A file formatted now, or before log ids existed, gets its log id with this header
        // update; it never changes afterwards.
        let log_id = if current.log_id == [0; 16] {
            *Uuid::new_v4().as_bytes()
        } else {
            current.log_id
        };
        let header = FileHeader {
            generation: last_used + 1,
            log_id,
            ..current
        };
        let at = (1 - slot) as u64 * HEADER_SLOT_B_OFFSET;
        header_span.write(at, &header.encode());
        header_span.persist(at, HEADER_SLOT_BYTES as u64)?;
        Ok(Nvram {
            path,
            previous_generation: current.generation,
            header,
            mode: cfg.persistence,
            method,
            survives_power_loss,
            lost_with_power,
            formatted,
            own: Some(own),
            partner: Some(PartnerRegion {
                region: Region::new("partner", partner_span),
            }),
            _header_span: header_span,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The header as persisted by this open (generation already increased).
    pub fn header(&self) -> &FileHeader {
        &self.header
    }

    /// The identity of the own log (see [`FileHeader::log_id`]).
    pub fn log_id(&self) -> [u8; 16] {
        self.header.log_id
    }

    /// This open's generation G.
    pub fn generation(&self) -> u64 {
        self.header.generation
    }

    pub fn previous_generation(&self) -> u64 {
        self.previous_generation
    }

    /// True when this open created the layout (the file was new or all zero).
    pub fn formatted(&self) -> bool {
        self.formatted
    }

    pub fn persistence(&self) -> PersistenceMode {
        self.mode
    }

    pub fn persist_method(&self) -> PersistMethod {
        self.method
    }

    /// True when a persisted record survives the loss of the host's power: `msync` or `pmem`
    /// mode on a medium that is not RAM. False for mode `none` and for any file on tmpfs/ramfs.
    pub fn survives_power_loss(&self) -> bool {
        self.survives_power_loss
    }

    /// True when the file is on tmpfs/ramfs: no record in it survives the loss of the host's
    /// power (a file on a disk kept in mode `none` may keep any subset of them).
    pub fn lost_with_power(&self) -> bool {
        self.lost_with_power
    }

    /// True when the own log was never used (no control slot written): the file is new or was
    /// blank, even if an earlier start formatted it. False once the own region was taken.
    pub fn own_log_unused(&self) -> bool {
        self.own.as_ref().is_some_and(|r| r.control().is_none())
    }

    /// Takes the own region (once; the journaled volume owns it).
    pub fn take_own(&mut self) -> Option<Region> {
        self.own.take()
    }

    /// The store the partner region is bound to (all zero: unbound; `None`: region taken).
    pub fn partner_store_id(&self) -> Option<[u8; 16]> {
        self.partner.as_ref().map(|p| p.region.store_id())
    }

    /// Takes the partner region (once; the mirror receiver owns it).
    pub fn take_partner(&mut self) -> Option<PartnerRegion> {
        self.partner.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> NvramConfig {
        NvramConfig {
            path: dir.join("nvram.img"),
            log_bytes_per_region: 64 * 1024,
            ..NvramConfig::new(1, [9; 16])
        }
    }

    #[test]
    fn generation_increases_at_every_open() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        let g1 = Nvram::open(&c).unwrap();
        assert!(g1.formatted());
        let first = g1.generation();
        drop(g1);
        let g2 = Nvram::open(&c).unwrap();
        assert!(!g2.formatted());
        assert_eq!(g2.generation(), first + 1);
        drop(g2);
        assert_eq!(Nvram::open(&c).unwrap().generation(), first + 2);
    }

    #[test]
    fn wrong_node_pair_and_size_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        drop(Nvram::open(&c).unwrap());
        let other_node = NvramConfig {
            node_id: 2,
            ..c.clone()
        };
        assert!(matches!(
            Nvram::open(&other_node),
            Err(JournalError::WrongNode { found: 1, .. })
        ));
        let other_pair = NvramConfig {
            pair_id: [1; 16],
            ..c.clone()
        };
        assert!(matches!(
            Nvram::open(&other_pair),
            Err(JournalError::WrongPair { .. })
        ));
        let other_size = NvramConfig {
            log_bytes_per_region: 128 * 1024,
            ..c.clone()
        };
        assert!(matches!(
            Nvram::open(&other_size),
            Err(JournalError::WrongSize { .. })
        ));
    }

    #[test]
    fn foreign_and_truncated_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        std::fs::write(&c.path, vec![0x5a; 200_000]).unwrap();
        let e = Nvram::open(&c).unwrap_err();
        assert!(matches!(e, JournalError::Foreign { .. }), "{e}");
        std::fs::remove_file(&c.path).unwrap();
        drop(Nvram::open(&c).unwrap());
        let bytes = std::fs::read(&c.path).unwrap();
        std::fs::write(&c.path, &bytes[..bytes.len() / 2]).unwrap();
        let e = Nvram::open(&c).unwrap_err();
        assert!(
            matches!(
                e,
                JournalError::Foreign {
                    source: FormatError::Truncated { .. },
                    ..
                }
            ),
            "{e}"
        );
        std::fs::write(&c.path, &bytes[..100]).unwrap();
        assert!(matches!(Nvram::open(&c), Err(JournalError::Foreign { .. })));
    }

    #[test]
    fn torn_header_update_falls_back_to_other_slot() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(dir.path());
        drop(Nvram::open(&c).unwrap());
        let g = {
            let mut n = Nvram::open(&c).unwrap();
            let g = n.generation();
            // Records of generation g exist in the own region.
            n.take_own().unwrap().write_control(g, 0, 1).unwrap();
            g
        };
        // The newest copy is in the slot written last; damage it.
        let mut bytes = std::fs::read(&c.path).unwrap();
        let (slot, h) = read_header(&bytes).unwrap();
        assert_eq!(h.generation, g);
        bytes[slot * HEADER_SLOT_B_OFFSET as usize + 45] ^= 0xff;
        std::fs::write(&c.path, &bytes).unwrap();
        // Opens from the older slot (g - 1), yet never reuses g.
        let n = Nvram::open(&c).unwrap();
        assert_eq!(n.previous_generation(), g - 1);
        assert_eq!(n.generation(), g + 1);
    }

    #[test]
    fn partner_region_accepts_records_and_moves_tail_on_cp() {
        use crate::format::{encode_record, CpPayload, RecordHeader, RecordKind};
        let dir = tempfile::tempdir().unwrap();
        let mut n = Nvram::open(&cfg(dir.path())).unwrap();
        let mut p = n.take_partner().unwrap();
        p.reset(7, 0, 100).unwrap();
        let w = RecordHeader {
            kind: RecordKind::Write,
            generation: 7,
            seq: 100,
            volume_id: 1,
            offset: 0,
            length: 5,
            payload_bytes: 5,
        };
        let rec = encode_record(&w, b"hello");
        p.receive(0, &rec).unwrap();
        let mut corrupt = rec.clone();
        corrupt[66] ^= 1;
        assert!(p.receive(128, &corrupt).is_err());
        let s = p.scan();
        assert_eq!(s.records.len(), 1);
        let cp = CpPayload {
            applied_seq: 100,
            tail_offset: 128,
            tail_seq: 101,
        }
        .encode();
        let h = RecordHeader {
            kind: RecordKind::Cp,
            seq: 101,
            offset: 0,
            length: 0,
            payload_bytes: cp.len() as u32,
            ..w
        };
        p.receive(128, &encode_record(&h, &cp)).unwrap();
        let s = p.scan();
        assert_eq!(s.report.start.tail_offset, 128);
        assert_eq!(s.records.len(), 1);
        assert_eq!(s.records[0].header.kind, RecordKind::Cp);
    }

    #[test]
    fn unpersisted_receive_leaves_the_data_persist_to_the_caller_but_not_a_cp() {
        use crate::format::{encode_record, CpPayload, RecordHeader, RecordKind};
        let dir = tempfile::tempdir().unwrap();
        let mut n = Nvram::open(&cfg(dir.path())).unwrap();
        let mut p = n.take_partner().unwrap();
        p.reset(7, 0, 100).unwrap();
        let w = RecordHeader {
            kind: RecordKind::Write,
            generation: 7,
            seq: 100,
            volume_id: 1,
            offset: 0,
            length: 5,
            payload_bytes: 5,
        };
        let rec = encode_record(&w, b"hello");
        let range = p.receive_unpersisted(0, &rec).unwrap();
        assert_eq!(range, Some((0, rec.len() as u64)));
        p.persist_received(&[range.unwrap()]).unwrap();
        let cp = CpPayload {
            applied_seq: 100,
            tail_offset: 128,
            tail_seq: 101,
        }
        .encode();
        let h = RecordHeader {
            kind: RecordKind::Cp,
            seq: 101,
            offset: 0,
            length: 0,
            payload_bytes: cp.len() as u32,
            ..w
        };
        assert_eq!(
            p.receive_unpersisted(128, &encode_record(&h, &cp)).unwrap(),
            None,
            "a CP is persisted before it moves the tail"
        );
        assert_eq!(p.scan().report.start.tail_offset, 128);
    }
}
