//! Offline dump of an NVRAM file (`twinctl journal dump FILE`): header, each region's control
//! slot, its intact records (seq, type, volume, offset, length, CRC), CPs, transitions, and how the
//! scan ended. [`dump_bytes`] is pure and works on any byte slice (including damaged or foreign
//! files: it reports instead of failing); [`dump_file`] reads the file without locking it, so a
//! dump of a file in use is a best-effort snapshot.

use std::fmt;
use std::path::Path;

use crate::error::JournalError;
use crate::format::{
    decode_transitions, ControlSlot, CpPayload, FileHeader, RecordHeader, RecordKind,
    TransitionState, CONTROL_AREA_BYTES, CONTROL_SLOT_BYTES, CONTROL_SLOT_B_OFFSET,
    RECORD_HEADER_BYTES,
};
use crate::nvram::read_header;
use crate::scan::{scan_log, ScanReport, ScanStart};
use uuid::Uuid;

/// One record as shown by the dump.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecordDump {
    pub log_offset: u64,
    pub seq: u64,
    pub generation: u64,
    pub kind: RecordKind,
    pub volume_id: u64,
    pub offset: u64,
    pub length: u64,
    pub payload_bytes: u32,
    pub crc_ok: bool,
    /// CP payload or TRANSITION entries, in words.
    pub detail: Option<String>,
}

/// One region of the dump.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RegionDump {
    pub name: &'static str,
    pub file_offset: u64,
    pub log_bytes: u64,
    pub control: Option<ControlSlot>,
    pub records: Vec<RecordDump>,
    pub cps: Vec<CpPayload>,
    pub scan: ScanReport,
    /// The record the scan stopped at, when its header could still be decoded.
    pub stopped_at: Option<RecordDump>,
}

/// The whole dump.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Dump {
    pub file_bytes: u64,
    pub header: Option<FileHeader>,
    pub pair_id: Option<String>,
    pub header_error: Option<String>,
    pub regions: Vec<RegionDump>,
}

fn record_dump(log: &[u8], at: u64, h: &RecordHeader, crc_ok: bool) -> RecordDump {
    let payload = log
        .get(at as usize + RECORD_HEADER_BYTES..)
        .and_then(|p| p.get(..h.payload_bytes as usize));
    let detail = match (h.kind, payload) {
        (RecordKind::Cp, Some(p)) => CpPayload::decode(p).ok().map(|cp| {
            format!(
                "applied_seq {} tail {}@{}",
                cp.applied_seq, cp.tail_seq, cp.tail_offset
            )
        }),
        (RecordKind::Transition, Some(p)) => decode_transitions(p).ok().map(|es| {
            es.iter()
                .map(|e| {
                    let state = match e.state {
                        TransitionState::Mirrored => "mirrored",
                        TransitionState::Acknowledged => "acknowledged",
                    };
                    format!("{state} {}..={}", e.first_seq, e.last_seq)
                })
                .collect::<Vec<_>>()
                .join(", ")
        }),
        (RecordKind::Stored, _) => Some(format!(
            "store holds [{}, {}) as of this seq (large write, no payload)",
            h.offset,
            h.offset.saturating_add(h.length)
        )),
        _ => None,
    };
    RecordDump {
        log_offset: at,
        seq: h.seq,
        generation: h.generation,
        kind: h.kind,
        volume_id: h.volume_id,
        offset: h.offset,
        length: h.length,
        payload_bytes: h.payload_bytes,
        crc_ok,
        detail,
    }
}

fn dump_region(name: &'static str, file_offset: u64, region: &[u8]) -> RegionDump {
    let control_bytes = CONTROL_AREA_BYTES as usize;
    let b_at = CONTROL_SLOT_B_OFFSET as usize;
    let control = ControlSlot::pick(
        &region[..CONTROL_SLOT_BYTES],
        &region[b_at..b_at + CONTROL_SLOT_BYTES],
    )
    .map(|p| p.1);
    let log = &region[control_bytes..];
    let start = control.map_or(
        ScanStart {
            tail_offset: 0,
            tail_seq: 1,
            generation: 0,
        },
        |c| ScanStart {
            tail_offset: c.tail_offset,
            tail_seq: c.tail_seq,
            generation: c.generation,
        },
    );
    let scan = scan_log(log, start);
    let records: Vec<RecordDump> = scan
        .records
        .iter()
        .map(|r| record_dump(log, r.log_offset, &r.header, true))
        .collect();
    let cps = scan
        .records
        .iter()
        .filter(|r| r.header.kind == RecordKind::Cp)
        .filter_map(|r| {
            let p = &log[r.payload_offset() as usize..][..r.header.payload_bytes as usize];
            CpPayload::decode(p).ok()
        })
        .collect();
    let stop = scan.report.stop_offset;
    let stopped_at = log
        .get(stop as usize..)
        .and_then(|b| RecordHeader::decode(b).ok())
        .map(|h| {
            let payload_end = stop as usize + RECORD_HEADER_BYTES + h.payload_bytes as usize;
            let crc_ok = log
                .get(stop as usize + RECORD_HEADER_BYTES..payload_end)
                .is_some_and(|p| RecordHeader::verify_crc(&log[stop as usize..], p).is_ok());
            record_dump(log, stop, &h, crc_ok)
        });
    RegionDump {
        name,
        file_offset,
        log_bytes: log.len() as u64,
        control,
        records,
        cps,
        scan: scan.report,
        stopped_at,
    }
}

/// Dumps an NVRAM image held in memory. Never fails: problems are reported in the result.
pub fn dump_bytes(bytes: &[u8]) -> Dump {
    let file_bytes = bytes.len() as u64;
    let header = match read_header(bytes) {
        Ok((_, h)) => h,
        Err(e) => {
            return Dump {
                file_bytes,
                header: None,
                pair_id: None,
                header_error: Some(e.to_string()),
                regions: Vec::new(),
            }
        }
    };
    if let Err(e) = header.check_geometry(file_bytes) {
        return Dump {
            file_bytes,
            header: Some(header),
            pair_id: Some(Uuid::from_bytes(header.pair_id).to_string()),
            header_error: Some(e.to_string()),
            regions: Vec::new(),
        };
    }
    let region = |off: u64, n: u64| &bytes[off as usize..(off + n) as usize];
    let regions = vec![
        dump_region(
            "own",
            header.own_region_offset,
            region(header.own_region_offset, header.own_region_bytes),
        ),
        dump_region(
            "partner",
            header.partner_region_offset,
            region(header.partner_region_offset, header.partner_region_bytes),
        ),
    ];
    Dump {
        file_bytes,
        header: Some(header),
        pair_id: Some(Uuid::from_bytes(header.pair_id).to_string()),
        header_error: None,
        regions,
    }
}

/// Reads and dumps the NVRAM file at `path` (without locking it).
pub fn dump_file(path: &Path) -> Result<Dump, JournalError> {
    let bytes = std::fs::read(path).map_err(|source| JournalError::Io {
        path: path.to_path_buf(),
        op: "read",
        source,
    })?;
    Ok(dump_bytes(&bytes))
}

impl Dump {
    /// The dump as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self)
            .unwrap_or_else(|e| format!("{{\"error\": \"cannot serialise dump: {e}\"}}"))
    }
}

/// A record kind as the human dump shows it.
fn kind_word(k: RecordKind) -> &'static str {
    match k {
        RecordKind::Write => "WRITE",
        RecordKind::Zero => "ZERO",
        RecordKind::Trim => "TRIM",
        RecordKind::Cp => "CP",
        RecordKind::Transition => "TRANSITION",
        RecordKind::Pad => "PAD",
        RecordKind::Ppl => "PPL",
        RecordKind::Stored => "STORED",
    }
}

impl fmt::Display for RecordDump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "  @{:<10} seq {:<8} gen {:<4} {:<10} vol {:<4} off {:<12} len {:<9} crc {}",
            self.log_offset,
            self.seq,
            self.generation,
            kind_word(self.kind),
            self.volume_id,
            self.offset,
            self.length,
            if self.crc_ok { "ok" } else { "BAD" }
        )?;
        if let Some(d) = &self.detail {
            write!(f, "  [{d}]")?;
        }
        Ok(())
    }
}

impl fmt::Display for Dump {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "file: {} bytes", self.file_bytes)?;
        if let Some(h) = &self.header {
            writeln!(
                f,
                "header: version {} node {} pair {} generation {}",
                h.version,
                h.node_id,
                self.pair_id.as_deref().unwrap_or("?"),
                h.generation
            )?;
        }
        if let Some(e) = &self.header_error {
            writeln!(f, "header error: {e}")?;
        }
        for r in &self.regions {
            writeln!(
                f,
                "\n{} region at file offset {}, log {} bytes",
                r.name, r.file_offset, r.log_bytes
            )?;
            match &r.control {
                Some(c) => writeln!(
                    f,
                    "  control: generation {} tail seq {} at log offset {} (update {}), store {}",
                    c.generation,
                    c.tail_seq,
                    c.tail_offset,
                    c.counter,
                    if c.store_id == [0; 16] {
                        "unbound".to_string()
                    } else {
                        Uuid::from_bytes(c.store_id).to_string()
                    }
                )?,
                None => writeln!(f, "  control: never written")?,
            }
            for rec in &r.records {
                writeln!(f, "{rec}")?;
            }
            for cp in &r.cps {
                writeln!(
                    f,
                    "  CP: applied through seq {} (tail {}@{})",
                    cp.applied_seq, cp.tail_seq, cp.tail_offset
                )?;
            }
            let s = &r.scan;
            let verdict = if s.corrupt_mid_region() {
                "DAMAGED in the middle: newer intact records follow"
            } else if s.stop.is_clean_end() {
                "clean end"
            } else {
                "damaged last record (torn write?)"
            };
            writeln!(
                f,
                "  scan: {} intact records, last seq {}, stopped at log offset {}: {} ({verdict})",
                s.records_valid,
                s.last_seq,
                s.stop_offset,
                s.stop.describe()
            )?;
            if let Some(rec) = &r.stopped_at {
                if !s.stop.is_clean_end() {
                    writeln!(f, "  stopped on:\n{rec}")?;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dump_of_foreign_bytes_reports_header_error() {
        let d = dump_bytes(&[0x11; 10_000]);
        assert!(d.header.is_none());
        assert!(d.header_error.is_some());
        assert!(d.to_string().contains("header error"));
        assert!(d.to_json().contains("header_error"));
    }

    proptest::proptest! {
        /// A valid header over arbitrary region bytes: the dump never panics.
        #[test]
        fn dump_of_garbage_regions_is_safe(seed in proptest::prelude::any::<u64>()) {
            let h = FileHeader::new(0, [1; 16], 4096);
            let mut x = seed | 1;
            let mut bytes: Vec<u8> = (0..h.file_bytes)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            bytes[..4096].fill(0);
            bytes[..128].copy_from_slice(&h.encode());
            let d = dump_bytes(&bytes);
            proptest::prop_assert_eq!(d.regions.len(), 2);
            let _ = d.to_string();
            let _ = d.to_json();
        }
    }

    #[test]
    fn dump_of_short_file_reports_truncation() {
        let h = FileHeader::new(0, [1; 16], 64 * 1024);
        let mut bytes = vec![0u8; 8192];
        bytes[..128].copy_from_slice(&h.encode());
        let d = dump_bytes(&bytes);
        assert!(d.header.is_some());
        assert!(d
            .header_error
            .as_deref()
            .unwrap_or("")
            .contains("truncated"));
    }
}
