//! Error types of the journal: format errors (pure decoding) and journal errors (files, recovery,
//! I/O on the backing store). Every message names the object that failed.

use std::path::PathBuf;

/// A structure in NVRAM bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("{what} truncated: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: u64,
        have: u64,
    },
    #[error("never written (all zero)")]
    Blank,
    #[error("{what} has a bad magic number")]
    BadMagic { what: &'static str },
    #[error("{what} CRC32C mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BadCrc {
        what: &'static str,
        stored: u32,
        computed: u32,
    },
    #[error("format version {found} is not supported (this build reads version {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("record kind {0} is unknown")]
    BadRecordKind(u16),
    #[error("{what} payload of {bytes} bytes is malformed")]
    BadPayload { what: &'static str, bytes: u64 },
    #[error("region geometry is not the one this version writes: {detail}")]
    BadGeometry { detail: String },
}

/// Errors of opening, recovering and serving a journal.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("NVRAM file {path}: {op}: {source}")]
    Io {
        path: PathBuf,
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("NVRAM file {path}: cannot allocate its {need_bytes} bytes on its file system ({source}); free that much space on the medium (for tmpfs, raise its size= mount option) or lower nvram log_bytes_per_region")]
    NoSpace {
        path: PathBuf,
        need_bytes: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("NVRAM file {path}: persistence \"pmem\" needs a file on a DAX file system (persistent memory mounted with -o dax), but the kernel refused MAP_SYNC for it ({source}); use persistence \"msync\" for a file on an ordinary disk, or \"none\" for tmpfs")]
    NotDax {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("NVRAM file {path} is in use by another process (exclusive lock held)")]
    Locked { path: PathBuf },
    #[error("NVRAM file {path} does not exist and creation is disabled in the config")]
    Missing { path: PathBuf },
    #[error("NVRAM file {path} is not a twinblock NVRAM file or is damaged: {source}")]
    Foreign {
        path: PathBuf,
        #[source]
        source: FormatError,
    },
    #[error(
        "NVRAM file {path} belongs to node {found}, this node is {expected}; refusing to use it"
    )]
    WrongNode {
        path: PathBuf,
        found: u32,
        expected: u32,
    },
    #[error(
        "NVRAM file {path} belongs to pair {found}, this pair is {expected}; refusing to use it"
    )]
    WrongPair {
        path: PathBuf,
        found: String,
        expected: String,
    },
    #[error("NVRAM file {path} has a log of {found} bytes per region, the config asks for {expected}; refusing to reformat a file that may hold data")]
    WrongSize {
        path: PathBuf,
        found: u64,
        expected: u64,
    },
    #[error("invalid journal config: {0}")]
    Config(String),
    #[error("{region} region: corrupt record at log offset {offset} (seq {expected_seq}) with valid newer records after it (seq {later_seq} at {later_offset}); acknowledged writes would be lost, refusing to start (set discard_corrupt_log to start anyway)")]
    CorruptMidRegion {
        region: &'static str,
        offset: u64,
        expected_seq: u64,
        later_offset: u64,
        later_seq: u64,
    },
    #[error("{region} region: record seq {seq} at log offset {offset} fails its CRC check, with valid newer records after it (media damage in the middle of the log, found by the CRC verification that runs after recovery); the volume refuses I/O and applies nothing from this log; stop the node and inspect the NVRAM file with `twinctl journal dump` (discard_corrupt_log drops this record and every newer one)")]
    CorruptRecordFound {
        region: &'static str,
        offset: u64,
        seq: u64,
    },
    #[error("{region} region: record seq {seq} belongs to volume {found}, recovering volume {expected}; one NVRAM file serves one volume")]
    ForeignVolume {
        region: &'static str,
        seq: u64,
        found: u64,
        expected: u64,
    },
    #[error("{region} region: the log belongs to store {bound}, not to this volume's store {store}; refusing to replay another array's journal (point the config at that array's NVRAM file, or move this file away to start with an empty journal)")]
    ForeignStore {
        region: &'static str,
        bound: String,
        store: String,
    },
    #[error("record seq {seq} covers bytes {offset}..{end} past the end of volume ({size} bytes)")]
    RecordOutOfRange {
        seq: u64,
        offset: u64,
        end: u64,
        size: u64,
    },
    #[error("request at offset {offset}, {len} bytes is outside the volume ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("backing store {op} at offset {offset}: {message}")]
    Backing {
        op: &'static str,
        offset: u64,
        message: String,
    },
    #[error("mirror to partner failed for seq {seq}: {message}")]
    Mirror { seq: u64, message: String },
    #[error("record from partner for log offset {log_offset} refused: {detail}")]
    PartnerRecord { log_offset: u64, detail: String },
    #[error(
        "NVRAM log is full and consistency points fail ({message}); the write was not journaled"
    )]
    CpFailed { message: String },
    #[error("{region} region: no log space for a partial-parity record of {bytes} bytes (the consistency point that needs it stops and is retried with fewer records)")]
    PplLogFull { region: &'static str, bytes: u64 },
    #[error("{region} region: partial-parity record seq {seq} is malformed: {detail}")]
    BadPplRecord {
        region: &'static str,
        seq: u64,
        detail: String,
    },
    #[error("journal is shut down")]
    ShutDown,
}

/// Errors a [`crate::Backing`] implementation returns.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackingError(pub String);

impl From<std::io::Error> for BackingError {
    fn from(e: std::io::Error) -> Self {
        BackingError(e.to_string())
    }
}
