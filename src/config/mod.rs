//! The node's configuration file (TOML; the format is described in `docs/CONFIG.md`).
//!
//! Loading is two steps: serde parses the text (unknown keys refused), then `validate` checks what
//! the types cannot (unique names, references between tables, sane ranges). Every error names the
//! file, the key and what is wrong, so an operator can fix it without reading code.

pub mod disks;
pub mod ha;
mod inspect;
mod pair;
mod size;

pub use inspect::Inspection;
pub use pair::{check_partner, load_key, PairConfig, DEFAULT_MIRROR_TIMEOUT_MS};

pub use size::{format_bytes, parse_size, ByteSize};

use serde::Deserialize;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// A configuration mistake: which file, which key, what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: key `{key}`: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub node: NodeConfig,
    #[serde(default)]
    pub nbd: NbdConfig,
    #[serde(default, rename = "volume")]
    pub volumes: Vec<VolumeConfig>,
    #[serde(default, rename = "array")]
    pub arrays: Vec<ArrayConfig>,
    #[serde(default)]
    pub nvram: Option<NvramConfig>,
    /// High availability: heartbeat paths, timers, the partner's config (absent: no takeover).
    #[serde(default)]
    pub ha: Option<ha::HaConfig>,
    /// The HA pair (partner, interconnect, key, mirror wait); absent on a single node.
    #[serde(default)]
    pub pair: Option<PairConfig>,
    /// Prometheus metrics over HTTP (absent: not served).
    #[serde(default)]
    pub metrics: Option<MetricsConfig>,
    /// Where the file was read from; relative paths resolve against `node.data_dir`.
    #[serde(skip)]
    pub source: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    pub id: u8,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    #[serde(default = "default_admin_socket")]
    pub admin_socket: PathBuf,
    /// Identity of the HA pair (a UUID), stamped into the NVRAM file so a file from another
    /// pair is refused. Both nodes of a pair use the same value.
    #[serde(default)]
    pub pair_id: Option<String>,
}

fn default_admin_socket() -> PathBuf {
    PathBuf::from("admin.sock")
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NbdConfig {
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    #[serde(default)]
    pub unix: Option<PathBuf>,
    #[serde(default)]
    pub default_export: Option<String>,
    #[serde(default = "default_max_request")]
    pub max_request: ByteSize,
    /// Clients served at once (all listeners); more are refused during the handshake.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
    /// How long shutdown waits for in-flight NBD requests before closing connections.
    #[serde(default = "default_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
    /// `off`, `optional` or `required` (`NBD_OPT_STARTTLS`).
    #[serde(default)]
    pub tls: TlsMode,
    /// PEM certificate chain (server certificate first) and PEM private key.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// PEM CA certificate(s) that sign client certificates; needed for `allow_cert_names`.
    #[serde(default)]
    pub tls_client_ca: Option<PathBuf>,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            listen: default_listen(),
            unix: None,
            default_export: None,
            max_request: default_max_request(),
            max_connections: default_max_connections(),
            shutdown_grace_ms: default_shutdown_grace_ms(),
            tls: TlsMode::Off,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }
}

/// `[metrics]`: where the Prometheus text is served (`GET /metrics`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// TCP address; loopback by default, so nothing is exposed unless asked for.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

/// The default metrics address (the port commonly left free for exporters' use).
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9464";

fn default_metrics_listen() -> String {
    DEFAULT_METRICS_LISTEN.to_string()
}

/// `nbd.tls`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    #[default]
    Off,
    Optional,
    Required,
}

fn default_max_connections() -> u32 {
    twinblock_nbd::server::DEFAULT_MAX_CONNECTIONS
}

fn default_shutdown_grace_ms() -> u64 {
    twinblock_nbd::server::DEFAULT_SHUTDOWN_GRACE.as_millis() as u64
}

/// Most clients `nbd.max_connections` may allow (each holds file descriptors and memory).
const MAX_CONNECTIONS_LIMIT: u32 = 65_536;
/// Longest `nbd.shutdown_grace_ms` (a stop must finish well within a service manager's timeout).
const SHUTDOWN_GRACE_MS_MAX: u64 = 300_000;

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:10809".to_string()]
}

fn default_max_request() -> ByteSize {
    ByteSize(32 << 20)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VolumeConfig {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    /// A plain image file or block device.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Create the image at this size when it does not exist.
    #[serde(default)]
    pub size: Option<ByteSize>,
    /// Serve from this array instead of a file.
    #[serde(default)]
    pub array: Option<String>,
    #[serde(default)]
    pub journal: bool,
    /// This journaled volume's own NVRAM file (default: `[nvram].path`). Every journaled volume
    /// needs a file of its own; the `[nvram]` size, persistence and CP interval apply to each.
    #[serde(default)]
    pub nvram: Option<PathBuf>,
    #[serde(default)]
    pub read_only: bool,
    /// `O_DIRECT` on a plain image. Off by default: the image goes through the page cache,
    /// FLUSH is an `fdatasync` of the image and FUA a write followed by one, so what they
    /// acknowledge is on the medium either way (docs/CONFIG.md). Not used by array volumes
    /// (their members follow the array's `direct_io`).
    #[serde(default)]
    pub direct_io: bool,
    /// Bytes of memory for the volume's read cache (see `crate::cache`); 0 turns it off.
    #[serde(default = "default_read_cache")]
    pub read_cache: ByteSize,
    /// NBD allow-list: when not empty, only TCP clients from these addresses or networks
    /// (`10.0.0.0/8`, `192.168.1.7`, `fd00::/8`) may use the volume.
    #[serde(default)]
    pub allow_networks: Vec<String>,
    /// NBD allow-list: when not empty, only TLS clients whose verified certificate's subject
    /// common name is listed may use the volume (needs `nbd.tls_client_ca`).
    #[serde(default)]
    pub allow_cert_names: Vec<String>,
    /// Serve a journaled volume even when its NVRAM log was lost after an unclean stop (the
    /// writes acknowledged after the last consistency point are gone). Without it such a volume
    /// waits for `twinctl journal accept-loss`. For unattended test setups; the loss is still
    /// logged and kept in the volume's history.
    #[serde(default)]
    pub accept_nvram_loss: bool,
    /// Journaled array volumes: the whole stripes of a large write go to the array directly
    /// (durable first) and only a small record goes to NVRAM, instead of the data (see
    /// docs/CONFIG.md). Skipped while the array is degraded.
    #[serde(default = "default_true")]
    pub large_write_bypass: bool,
    /// The whole-stripe part of a write bypasses NVRAM only when it is at least this large
    /// (and at least one full stripe); 0: one full stripe.
    #[serde(default)]
    pub large_write_bypass_min: ByteSize,
}

impl VolumeConfig {
    /// The journal's tuning of this volume (the CP interval comes from `[nvram]`).
    pub fn journal_config(&self, cp_interval_ms: u64) -> twinblock_journal::VolumeConfig {
        twinblock_journal::VolumeConfig {
            cp_interval_ms,
            large_write_bypass: self.large_write_bypass,
            large_write_bypass_min_bytes: self.large_write_bypass_min.0,
            ..Default::default()
        }
    }

    /// The volume's NBD allow-list; a message naming the bad entry when one does not parse.
    pub fn nbd_access(&self) -> Result<twinblock_nbd::Access, String> {
        let networks = self
            .allow_networks
            .iter()
            .map(|n| n.parse::<twinblock_nbd::IpNet>().map_err(|e| e.to_string()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(twinblock_nbd::Access {
            networks,
            cert_names: self.allow_cert_names.clone(),
        })
    }
}

fn default_true() -> bool {
    true
}

fn default_read_cache() -> ByteSize {
    ByteSize(crate::cache::DEFAULT_READ_CACHE_BYTES)
}

/// Smallest `read_cache` other than 0 (one block per lock shard of the cache).
const READ_CACHE_MIN_BYTES: u64 = crate::cache::READ_CACHE_MIN_BYTES;
/// Largest `read_cache`: a typo (`read_cache = "1T"`) must not take the host's memory.
const READ_CACHE_MAX_BYTES: u64 = 256 << 30;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArrayConfig {
    pub name: String,
    pub level: u8,
    #[serde(default = "default_chunk")]
    pub chunk: ByteSize,
    /// The candidate disks as written: paths and file-name patterns (`disks/n0-*.img`); one
    /// string or a list. Which candidate is which member is read from the superblocks.
    #[serde(rename = "disks", deserialize_with = "one_or_many")]
    pub disk_entries: Vec<String>,
    /// More candidates, used as the new array's spares when it is created.
    #[serde(default, rename = "spares", deserialize_with = "one_or_many")]
    pub spare_entries: Vec<String>,
    /// `disk_entries` expanded when the config is loaded: every candidate path (the members of a
    /// new array first).
    #[serde(skip)]
    pub disks: Vec<PathBuf>,
    /// `spare_entries` expanded.
    #[serde(skip)]
    pub spares: Vec<PathBuf>,
    /// Create the array when no candidate holds it (every candidate must then be blank). Off:
    /// a node whose disks do not hold the array refuses to start.
    #[serde(default)]
    pub create: bool,
    /// Members of a new array created over a pattern (`n0-*.img` gives `n0-0.img` ...).
    #[serde(default)]
    pub members: Option<u32>,
    /// The array's UUID; picks the array when the disks hold two arrays of this name.
    #[serde(default)]
    pub uuid: Option<uuid::Uuid>,
    /// Create missing disk images at this size (only when the array is created).
    #[serde(default)]
    pub disk_size: Option<ByteSize>,
    /// Rebuild rate limit in bytes per second; 0 = unlimited.
    #[serde(default)]
    pub rebuild_rate: Option<ByteSize>,
    #[serde(default = "default_true")]
    pub direct_io: bool,
    /// Start the array even after an unclean stop while degraded with regions being written
    /// (their parity cannot be checked; md's `start_dirty_degraded`). Off: such a start fails.
    #[serde(default)]
    pub start_dirty_degraded: bool,
}

/// `disks = "a.img"` or `disks = ["a.img", "b.img"]`.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    match OneOrMany::deserialize(d) {
        Ok(OneOrMany::One(s)) => Ok(vec![s]),
        Ok(OneOrMany::Many(v)) => Ok(v),
        Err(_) => Err(serde::de::Error::custom(
            "expected a path or pattern (\"disks/n0-*.img\") or a list of them",
        )),
    }
}

fn default_chunk() -> ByteSize {
    ByteSize(64 << 10)
}

/// `nvram.persistence`: the journal's own type, so the config names exactly what it runs.
pub use twinblock_journal::PersistenceMode;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NvramConfig {
    pub path: PathBuf,
    #[serde(default = "default_nvram_size")]
    pub size: ByteSize,
    #[serde(default = "default_persistence")]
    pub persistence: PersistenceMode,
    #[serde(default = "default_cp_interval")]
    pub cp_interval_ms: u64,
}

fn default_nvram_size() -> ByteSize {
    ByteSize(256 << 20)
}
fn default_persistence() -> PersistenceMode {
    PersistenceMode::None
}
fn default_cp_interval() -> u64 {
    1000
}

/// Smallest NVRAM file: the file holds two regions (own log, partner's copy), and each log must
/// hold two of the largest records (1 MiB payload) plus its control area, so a 4 MiB file fails
/// at start; 8 MiB is the round size that starts.
const NVRAM_BYTES_MIN: u64 = 8 << 20;
/// Smallest image the node will create or serve; anything below is almost surely a typo.
const MIN_VOLUME_BYTES: u64 = 4096;
/// Chunk sizes outside this range are refused (md allows 4 KiB to several MiB).
const CHUNK_BYTES_MIN: u64 = 4 << 10;
const CHUNK_BYTES_MAX: u64 = 16 << 20;

impl Config {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parse and validate config text; `path` is used for messages and relative paths.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        cfg.source = path.to_path_buf();
        cfg.expand_disks()?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// This config as `twinctl create` runs it: every array to be created when no candidate
    /// holds it, as if it said `create = true` (the command is the operator's explicit request).
    /// Checked again, as the member count of a new array is only checked for creation.
    pub fn for_creation(&self) -> Result<Config, ConfigError> {
        let mut c = self.clone();
        for a in &mut c.arrays {
            a.create = true;
        }
        c.expand_disks()?;
        c.validate()?;
        Ok(c)
    }

    fn invalid(&self, key: impl Into<String>, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            path: self.source.clone(),
            key: key.into(),
            message: message.into(),
        }
    }

    /// Checks what parsing cannot: ranges, cross references, duplicates. Each part names the
    /// key at fault.
    fn validate(&self) -> Result<(), ConfigError> {
        self.validate_node()?;
        self.validate_nbd()?;
        let array_names = self.validate_arrays()?;
        let volume_names = self.validate_volumes(&array_names)?;
        self.validate_nvram_files()?;
        if let Some(def) = &self.nbd.default_export {
            if !volume_names.contains(def.as_str()) {
                return Err(self.invalid(
                    "nbd.default_export",
                    format!("no volume named `{def}` (defined: {})", list(&volume_names)),
                ));
            }
        }
        if let Some(nv) = &self.nvram {
            if nv.size.bytes() < NVRAM_BYTES_MIN {
                return Err(self.invalid(
                    "nvram.size",
                    format!(
                        "{} is too small: at least {} (two regions, each with room for two of \
                         the largest journal records, 1 MiB)",
                        format_bytes(nv.size.bytes()),
                        format_bytes(NVRAM_BYTES_MIN)
                    ),
                ));
            }
            if nv.cp_interval_ms == 0 {
                return Err(self.invalid("nvram.cp_interval_ms", "must be greater than 0"));
            }
        }
        if let Some(m) = &self.metrics {
            if m.listen.parse::<SocketAddr>().is_err() {
                return Err(self.invalid(
                    "metrics.listen",
                    format!(
                        "`{}` is not an IP address with a port (e.g. {DEFAULT_METRICS_LISTEN})",
                        m.listen
                    ),
                ));
            }
        }
        if let Some(p) = &self.pair {
            p.validate(self)?;
        }
        if let Some(h) = &self.ha {
            h.check()
                .map_err(|(key, problem)| self.invalid(key, problem))?;
        }
        Ok(())
    }

    fn validate_node(&self) -> Result<(), ConfigError> {
        if self.node.id > 1 {
            return Err(self.invalid(
                "node.id",
                format!(
                    "must be 0 or 1 (a pair has two nodes), got {}",
                    self.node.id
                ),
            ));
        }
        if let Some(p) = &self.node.pair_id {
            if uuid::Uuid::parse_str(p).is_err() {
                return Err(self.invalid(
                    "node.pair_id",
                    format!("`{p}` is not a UUID (e.g. 6f1c0d3e-8a4b-4c2d-9e7f-1a2b3c4d5e6f)"),
                ));
            }
        }
        Ok(())
    }

    fn validate_nbd(&self) -> Result<(), ConfigError> {
        if self.nbd.listen.is_empty() && self.nbd.unix.is_none() {
            return Err(self.invalid(
                "nbd.listen",
                "no address to serve on: give at least one TCP address or nbd.unix",
            ));
        }
        for (i, addr) in self.nbd.listen.iter().enumerate() {
            if addr.parse::<SocketAddr>().is_err() {
                return Err(self.invalid(
                    format!("nbd.listen[{i}]"),
                    format!("`{addr}` is not an IP address with a port (e.g. 127.0.0.1:10809)"),
                ));
            }
        }
        self.validate_nbd_limits()
    }

    /// Array names, levels, disk counts, chunk sizes, and no disk used twice; returns the names.
    fn validate_arrays(&self) -> Result<HashSet<&str>, ConfigError> {
        let mut array_names = HashSet::new();
        let mut all_disks = HashSet::new();
        for (i, a) in self.arrays.iter().enumerate() {
            let key = |k: &str| format!("array[{i}].{k}");
            check_name(&a.name).map_err(|m| self.invalid(key("name"), m))?;
            if !array_names.insert(a.name.as_str()) {
                return Err(self.invalid(key("name"), format!("array `{}` defined twice", a.name)));
            }
            let min_disks = match a.level {
                0 => 1,
                1 => 2,
                5 => 3,
                6 => 4,
                10 => 4,
                other => {
                    return Err(self.invalid(
                        key("level"),
                        format!("RAID level {other} is not supported (use 0, 1, 5, 6 or 10)"),
                    ))
                }
            };
            // A new array's member count; an existing array's comes from its superblocks.
            let count = a.new_member_count();
            if a.create && count < min_disks {
                return Err(self.invalid(
                    key("disks"),
                    format!(
                        "RAID {} needs at least {min_disks} disks, {count} given",
                        a.level
                    ),
                ));
            }
            if a.create && a.level == 10 && !count.is_multiple_of(2) {
                return Err(self.invalid(
                    key("disks"),
                    format!("RAID 10 needs an even number of disks, {count} given"),
                ));
            }
            let chunk = a.chunk.bytes();
            if !chunk.is_power_of_two() || !(CHUNK_BYTES_MIN..=CHUNK_BYTES_MAX).contains(&chunk) {
                return Err(self.invalid(
                    key("chunk"),
                    format!("{chunk} bytes: must be a power of two from 4 KiB to 16 MiB"),
                ));
            }
            for (j, d) in a.disks.iter().chain(a.spares.iter()).enumerate() {
                let resolved = self.resolve(d);
                if !all_disks.insert(resolved.clone()) {
                    return Err(self.invalid(
                        if j < a.disks.len() {
                            format!("array[{i}].disks[{j}]")
                        } else {
                            format!("array[{i}].spares[{}]", j - a.disks.len())
                        },
                        format!("disk {} is listed more than once", resolved.display()),
                    ));
                }
            }
        }
        Ok(array_names)
    }

    /// Volume names, backings, sizes and journal settings; returns the names.
    fn validate_volumes(&self, array_names: &HashSet<&str>) -> Result<HashSet<&str>, ConfigError> {
        let mut volume_names = HashSet::new();
        let mut used_arrays = HashSet::new();
        for (i, v) in self.volumes.iter().enumerate() {
            let key = |k: &str| format!("volume[{i}].{k}");
            check_name(&v.name).map_err(|m| self.invalid(key("name"), m))?;
            if !volume_names.insert(v.name.as_str()) {
                return Err(self.invalid(key("name"), format!("volume `{}` defined twice", v.name)));
            }
            match (&v.file, &v.array) {
                (Some(_), Some(_)) => {
                    return Err(self.invalid(
                        key("array"),
                        "a volume is backed by either `file` or `array`, not both",
                    ))
                }
                (None, None) => {
                    return Err(self.invalid(
                        key("file"),
                        format!(
                            "volume `{}` needs a backing: `file = ...` or `array = ...`",
                            v.name
                        ),
                    ))
                }
                (Some(_), None) => {
                    if v.journal {
                        return Err(self.invalid(
                            key("journal"),
                            "the journal sits on arrays; use `array = ...` for a journaled volume",
                        ));
                    }
                }
                (None, Some(a)) => {
                    if !array_names.contains(a.as_str()) {
                        return Err(self.invalid(
                            key("array"),
                            format!("no array named `{a}` (defined: {})", list(array_names)),
                        ));
                    }
                    if !used_arrays.insert(a.as_str()) {
                        return Err(self.invalid(
                            key("array"),
                            format!("array `{a}` already backs another volume"),
                        ));
                    }
                    if v.size.is_some() {
                        return Err(self.invalid(
                            key("size"),
                            "an array volume's size comes from the array; remove `size`",
                        ));
                    }
                }
            }
            if let Some(size) = v.size {
                if size.bytes() < MIN_VOLUME_BYTES {
                    return Err(self.invalid(
                        key("size"),
                        format!("{} bytes is below the minimum of 4096", size.bytes()),
                    ));
                }
            }
            let cache = v.read_cache.bytes();
            if cache != 0 && !(READ_CACHE_MIN_BYTES..=READ_CACHE_MAX_BYTES).contains(&cache) {
                return Err(self.invalid(
                    key("read_cache"),
                    format!(
                        "{} is outside {} to {} (0 turns the read cache off)",
                        v.read_cache,
                        ByteSize(READ_CACHE_MIN_BYTES),
                        ByteSize(READ_CACHE_MAX_BYTES)
                    ),
                ));
            }
            if v.journal && self.nvram.is_none() {
                return Err(self.invalid(key("journal"), "journal = true needs an [nvram] section"));
            }
            v.nbd_access()
                .map_err(|m| self.invalid(key("allow_networks"), m))?;
            if !v.allow_cert_names.is_empty() && self.nbd.tls_client_ca.is_none() {
                return Err(self.invalid(
                    key("allow_cert_names"),
                    "client certificate names can only be checked with nbd.tls_client_ca set \
                     (the CA that signs client certificates)",
                ));
            }
            if v.nvram.is_some() && !v.journal {
                return Err(self.invalid(
                    key("nvram"),
                    "an NVRAM file is only used by a journaled volume (journal = true)",
                ));
            }
            if v.accept_nvram_loss && !v.journal {
                return Err(self.invalid(
                    key("accept_nvram_loss"),
                    "only a journaled volume (journal = true) has an NVRAM log to lose",
                ));
            }
        }
        Ok(volume_names)
    }

    /// One NVRAM file per journaled volume: two journals in one file would overwrite each
    /// other's log.
    fn validate_nvram_files(&self) -> Result<(), ConfigError> {
        let mut nvram_owner: std::collections::HashMap<PathBuf, &str> = Default::default();
        for (i, v) in self.volumes.iter().enumerate() {
            let Some(path) = self.volume_nvram_path(v) else {
                continue;
            };
            if let Some(other) = nvram_owner.insert(path.clone(), &v.name) {
                return Err(self.invalid(
                    format!("volume[{i}].nvram"),
                    format!(
                        "volumes {other:?} and {:?} would share the NVRAM file {}; give each \
                         journaled volume its own file with `nvram = \"...\"`",
                        v.name,
                        path.display()
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `[nbd]` limits and TLS; the TLS files are read and parsed (read-only).
    /// Request size, connection and TLS limits of the NBD server.
    fn validate_nbd_limits(&self) -> Result<(), ConfigError> {
        use twinblock_nbd::server::MIN_REQUEST_BYTES_LIMIT;
        use twinblock_nbd::MAX_REQUEST_BYTES_LIMIT;
        let max_req = self.nbd.max_request.bytes();
        let range = u64::from(MIN_REQUEST_BYTES_LIMIT)..=u64::from(MAX_REQUEST_BYTES_LIMIT);
        if !range.contains(&max_req) {
            return Err(self.invalid(
                "nbd.max_request",
                format!(
                    "{} is outside the supported range {} ..= {}",
                    format_bytes(max_req),
                    format_bytes(*range.start()),
                    format_bytes(*range.end())
                ),
            ));
        }
        if !(1..=MAX_CONNECTIONS_LIMIT).contains(&self.nbd.max_connections) {
            return Err(self.invalid(
                "nbd.max_connections",
                format!(
                    "{} is outside 1 ..= {MAX_CONNECTIONS_LIMIT}",
                    self.nbd.max_connections
                ),
            ));
        }
        if self.nbd.shutdown_grace_ms > SHUTDOWN_GRACE_MS_MAX {
            return Err(self.invalid(
                "nbd.shutdown_grace_ms",
                format!(
                    "{} ms is longer than the maximum of {SHUTDOWN_GRACE_MS_MAX} ms",
                    self.nbd.shutdown_grace_ms
                ),
            ));
        }
        self.nbd_tls().map(|_| ())
    }

    /// The NBD server's TLS settings (certificate and key loaded), `None` with `nbd.tls = "off"`.
    pub fn nbd_tls(&self) -> Result<Option<twinblock_nbd::TlsSettings>, ConfigError> {
        use twinblock_nbd::TlsRequirement;
        let requirement = match self.nbd.tls {
            TlsMode::Off => {
                for (key, set) in [
                    ("nbd.tls_cert", self.nbd.tls_cert.is_some()),
                    ("nbd.tls_key", self.nbd.tls_key.is_some()),
                    ("nbd.tls_client_ca", self.nbd.tls_client_ca.is_some()),
                ] {
                    if set {
                        return Err(self.invalid(
                            key,
                            "set, but nbd.tls is \"off\"; set nbd.tls = \"optional\" or \
                             \"required\" to use it",
                        ));
                    }
                }
                return Ok(None);
            }
            TlsMode::Optional => TlsRequirement::Optional,
            TlsMode::Required => TlsRequirement::Required,
        };
        let (Some(cert), Some(key)) = (&self.nbd.tls_cert, &self.nbd.tls_key) else {
            return Err(self.invalid(
                if self.nbd.tls_cert.is_none() {
                    "nbd.tls_cert"
                } else {
                    "nbd.tls_key"
                },
                "TLS needs both tls_cert (PEM certificate chain) and tls_key (PEM private key)",
            ));
        };
        let ca = self.nbd.tls_client_ca.as_ref().map(|p| self.resolve(p));
        let config = twinblock_nbd::tls::server_config(
            &self.resolve(cert),
            &self.resolve(key),
            ca.as_deref(),
        )
        .map_err(|e| {
            let key = match e.what() {
                "TLS private key" => "nbd.tls_key",
                "TLS client CA" | "client CA certificate" => "nbd.tls_client_ca",
                _ => "nbd.tls_cert",
            };
            self.invalid(key, e.to_string())
        })?;
        Ok(Some(twinblock_nbd::TlsSettings {
            requirement,
            config,
        }))
    }

    /// The directory relative paths resolve against.
    pub fn data_dir(&self) -> PathBuf {
        let base = self
            .source
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        match &self.node.data_dir {
            Some(d) if d.is_absolute() => tidy_path(d),
            Some(d) => tidy_path(&base.join(d)),
            None => tidy_path(&base),
        }
    }

    /// Resolve a path from the config against the data directory.
    /// The NVRAM file of volume `v` (resolved), `None` unless it is journaled.
    pub fn volume_nvram_path(&self, v: &VolumeConfig) -> Option<PathBuf> {
        if !v.journal {
            return None;
        }
        let nv = self.nvram.as_ref()?;
        Some(self.resolve(v.nvram.as_ref().unwrap_or(&nv.path)))
    }

    pub fn resolve(&self, p: &Path) -> PathBuf {
        if p.is_absolute() {
            tidy_path(p)
        } else {
            tidy_path(&self.data_dir().join(p))
        }
    }

    /// The pair identity (nil UUID when the config names none: an unpaired node).
    pub fn pair_id(&self) -> uuid::Uuid {
        self.pair
            .as_ref()
            .map(|p| p.pair_id.as_str())
            .or(self.node.pair_id.as_deref())
            .and_then(|p| uuid::Uuid::parse_str(p).ok())
            .unwrap_or(uuid::Uuid::nil())
    }

    pub fn admin_socket(&self) -> PathBuf {
        self.resolve(&self.node.admin_socket)
    }
}

/// `p` without detours: `.` dropped, and `dir/..` folded where `dir` is a directory that is not a
/// symbolic link, so `node0/../disks/d0.img` is shown (and compared) as `disks/d0.img`. That is
/// the file the kernel reaches, so nothing changes but the spelling. A `..` after a symbolic link
/// (whose `..` is the link target's parent) or after a missing directory (which the kernel would
/// refuse to pass) is kept.
pub fn tidy_path(p: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                let foldable = matches!(out.components().next_back(), Some(Component::Normal(_)))
                    && std::fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_dir());
                if foldable {
                    out.pop();
                } else {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    if out.as_os_str().is_empty() && !p.as_os_str().is_empty() {
        out.push(".");
    }
    out
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 {
        return Err("names are 1 to 64 characters".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.')
    {
        return Err(format!(
            "`{name}`: use letters, digits, `-`, `_` and `.` only"
        ));
    }
    Ok(())
}

fn list(names: &HashSet<&str>) -> String {
    if names.is_empty() {
        return "none".into();
    }
    let mut v: Vec<&str> = names.iter().copied().collect();
    v.sort_unstable();
    v.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/twinblock/node.toml"))
    }

    const MINIMAL: &str = r#"
[node]
id = 0
[[volume]]
name = "vol0"
file = "vol0.img"
size = "1GiB"
"#;

    #[test]
    fn minimal_config_parses_with_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.nbd.listen, vec!["127.0.0.1:10809"]);
        assert_eq!(c.volumes[0].size, Some(ByteSize(1 << 30)));
        assert!(!c.volumes[0].direct_io);
        assert_eq!(
            c.volumes[0].read_cache.bytes(),
            crate::cache::DEFAULT_READ_CACHE_BYTES
        );
        assert_eq!(c.admin_socket(), PathBuf::from("/etc/twinblock/admin.sock"));
    }

    #[test]
    fn read_cache_zero_is_off_and_tiny_or_huge_is_refused() {
        let with = |v: &str| parse(&format!("{MINIMAL}read_cache = \"{v}\"\n"));
        assert_eq!(with("0").unwrap().volumes[0].read_cache.bytes(), 0);
        assert_eq!(
            with("64MiB").unwrap().volumes[0].read_cache.bytes(),
            64 << 20
        );
        for bad in ["4KiB", "300GiB"] {
            let e = with(bad).unwrap_err().to_string();
            assert!(e.contains("volume[0].read_cache"), "{e}");
            assert!(e.contains("0 turns the read cache off"), "{e}");
        }
    }

    #[test]
    fn large_write_bypass_is_on_by_default_and_reaches_the_journal_config() {
        let c = parse(MINIMAL).unwrap();
        let j = c.volumes[0].journal_config(250);
        assert!(j.large_write_bypass);
        assert_eq!(j.large_write_bypass_min_bytes, 0);
        assert_eq!(j.cp_interval_ms, 250);
        let off = parse(&format!(
            "{MINIMAL}large_write_bypass = false\nlarge_write_bypass_min = \"1MiB\"\n"
        ))
        .unwrap();
        let j = off.volumes[0].journal_config(1000);
        assert!(!j.large_write_bypass);
        assert_eq!(j.large_write_bypass_min_bytes, 1 << 20);
    }

    #[test]
    fn paths_are_resolved_without_detours_but_never_through_a_symlink() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("node0")).unwrap();
        std::fs::create_dir_all(root.join("elsewhere/deep")).unwrap();
        std::os::unix::fs::symlink(root.join("elsewhere/deep"), root.join("link")).unwrap();
        assert_eq!(
            tidy_path(&root.join("node0/../disks/./d0.img")),
            root.join("disks/d0.img")
        );
        // `link/..` is `elsewhere`, not `root`: kept as written.
        assert_eq!(tidy_path(&root.join("link/../x")), root.join("link/../x"));
        // A missing directory is not folded away (the kernel would fail on it).
        assert_eq!(
            tidy_path(&root.join("nosuch/../x")),
            root.join("nosuch/../x")
        );
        assert_eq!(tidy_path(Path::new("./a")), PathBuf::from("a"));
        assert_eq!(tidy_path(Path::new(".")), PathBuf::from("."));
        let c = Config::parse(
            "[node]\nid = 0\n[[volume]]\nname = \"v\"\nfile = \"../disks/v.img\"\n",
            &root.join("node0/n.toml"),
        )
        .unwrap();
        assert_eq!(
            c.resolve(c.volumes[0].file.as_ref().unwrap()),
            root.join("disks/v.img")
        );
    }

    #[test]
    fn nvram_too_small_to_start_fails_the_config() {
        let base = "[node]\nid = 0\n[nvram]\npath = \"n.nvram\"\nsize = \"SIZE\"\n";
        let e = parse(&base.replace("SIZE", "4MiB"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nvram.size") && e.contains("8 MiB"), "{e}");
        assert!(parse(&base.replace("SIZE", "8MiB")).is_ok());
    }

    #[test]
    fn unknown_key_names_the_key() {
        let e = parse(&format!("{MINIMAL}\nsizee = 3\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/twinblock/node.toml"), "{e}");
        assert!(e.contains("sizee"), "{e}");
    }

    #[test]
    fn bad_size_names_key_and_reason() {
        let e = parse(&MINIMAL.replace("1GiB", "1 furlong"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown unit"), "{e}");
    }

    #[test]
    fn node_id_out_of_range_is_refused() {
        let e = parse(&MINIMAL.replace("id = 0", "id = 2"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("node.id"), "{e}");
    }

    #[test]
    fn volume_needs_exactly_one_backing() {
        let e = parse("[node]\nid=0\n[[volume]]\nname=\"v\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("volume[0].file"), "{e}");
    }

    #[test]
    fn volume_referencing_missing_array_is_refused() {
        let e = parse("[node]\nid=0\n[[volume]]\nname=\"v\"\narray=\"md9\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("volume[0].array") && e.contains("md9"), "{e}");
    }

    #[test]
    fn disk_listed_twice_is_refused() {
        let text = r#"
[node]
id = 1
[[array]]
name = "md0"
level = 5
disks = ["a.img", "b.img", "a.img"]
"#;
        let e = parse(text).unwrap_err().to_string();
        assert!(
            e.contains("array[0].disks[2]") && e.contains("more than once"),
            "{e}"
        );
    }

    #[test]
    fn raid_level_and_disk_count_checked() {
        let base = "[node]\nid=0\n[[array]]\nname=\"m\"\nlevel=LEVEL\ndisks=[\"a\",\"b\",\"c\"]\n\
                    create=true\n";
        assert!(parse(&base.replace("LEVEL", "4"))
            .unwrap_err()
            .to_string()
            .contains("not supported"));
        assert!(parse(&base.replace("LEVEL", "6"))
            .unwrap_err()
            .to_string()
            .contains("at least 4"));
        assert!(parse(&base.replace("LEVEL", "5")).is_ok());
        // Without `create` the disks say how many members there are.
        assert!(parse(&base.replace("LEVEL", "6").replace("create=true", "")).is_ok());
    }

    #[test]
    fn disk_pattern_expands_to_matching_files_and_numbered_new_members() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("disks")).unwrap();
        for f in ["n0-0.img", "n0-1.img", "n0-spare.img", "n1-0.img"] {
            std::fs::write(d.path().join("disks").join(f), b"").unwrap();
        }
        let text = "[node]\nid=0\n[[array]]\nname=\"m\"\nlevel=5\ndisks=\"disks/n0-*.img\"\n";
        let c = Config::parse(text, &d.path().join("n.toml")).unwrap();
        let want: Vec<PathBuf> = ["n0-0.img", "n0-1.img", "n0-spare.img"]
            .iter()
            .map(|f| Path::new("disks").join(f))
            .collect();
        assert_eq!(c.arrays[0].disks, want);
        let create = format!("{text}create=true\nmembers=3\n");
        let c = Config::parse(&create, &d.path().join("n.toml")).unwrap();
        assert_eq!(c.arrays[0].new_members().len(), 3);
        assert_eq!(c.arrays[0].new_members()[2], Path::new("disks/n0-2.img"));
        assert_eq!(c.arrays[0].disks.len(), 4, "{:?}", c.arrays[0].disks);
    }

    #[test]
    fn create_over_a_pattern_needs_members() {
        let d = tempfile::tempdir().unwrap();
        let text =
            "[node]\nid=0\n[[array]]\nname=\"m\"\nlevel=5\ndisks=\"n0-*.img\"\ncreate=true\n";
        let e = Config::parse(text, &d.path().join("n.toml"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("array[0].members"), "{e}");
        let e = parse("[node]\nid=0\n[[array]]\nname=\"m\"\nlevel=5\ndisks=\"x*/a.img\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("file name only"), "{e}");
    }

    #[test]
    fn max_request_up_to_the_limit_is_accepted_and_above_it_refused() {
        let c = parse(&format!("[nbd]\nmax_request = \"40MiB\"\n{MINIMAL}")).unwrap();
        assert_eq!(c.nbd.max_request.bytes(), 40 << 20);
        let e = parse(&format!("[nbd]\nmax_request = \"65MiB\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.max_request"), "{e}");
        assert!(e.contains("64 MiB"), "the error names the maximum: {e}");
    }

    #[test]
    fn connection_limit_and_grace_have_defaults_and_ranges() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.nbd.max_connections, 256);
        assert_eq!(c.nbd.shutdown_grace_ms, 10_000);
        let e = parse(&format!("[nbd]\nmax_connections = 0\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.max_connections"), "{e}");
        let e = parse(&format!("[nbd]\nshutdown_grace_ms = 3600000\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.shutdown_grace_ms"), "{e}");
    }

    #[test]
    fn tls_needs_certificate_and_key_files_that_exist() {
        let e = parse(&format!("[nbd]\ntls = \"required\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.tls_cert"), "{e}");
        let e = parse(&format!(
            "[nbd]\ntls = \"optional\"\ntls_cert = \"/nonexistent/c.pem\"\n\
             tls_key = \"/nonexistent/k.pem\"\n{MINIMAL}"
        ))
        .unwrap_err()
        .to_string();
        assert!(e.contains("/nonexistent/c.pem"), "{e}");
        let dir = std::env::temp_dir().join(format!("twinblock-cfg-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("empty.pem"), "no pem here\n").unwrap();
        let e = parse(&format!(
            "[nbd]\ntls = \"optional\"\ntls_cert = \"{0}/empty.pem\"\n\
             tls_key = \"{0}/empty.pem\"\n{MINIMAL}",
            dir.display()
        ))
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("nbd.tls_cert") && e.contains("CERTIFICATE"),
            "{e}"
        );
        let _ = std::fs::remove_dir_all(&dir);
        let e = parse(&format!("[nbd]\ntls = \"maybe\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("maybe"), "{e}");
        let e = parse(&format!("[nbd]\ntls_cert = \"c.pem\"\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.tls_cert") && e.contains("off"), "{e}");
    }

    #[test]
    fn allow_lists_are_checked() {
        let c = parse(&format!(
            "{MINIMAL}allow_networks = [\"10.0.0.0/8\", \"::1\"]\n"
        ))
        .unwrap();
        assert_eq!(c.volumes[0].nbd_access().unwrap().networks.len(), 2);
        let e = parse(&format!("{MINIMAL}allow_networks = [\"10.0.0.0/40\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("volume[0].allow_networks") && e.contains("10.0.0.0/40"),
            "{e}"
        );
        let e = parse(&format!("{MINIMAL}allow_cert_names = [\"backup\"]\n"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.tls_client_ca"), "{e}");
    }

    #[test]
    fn bad_listen_address_is_refused() {
        let e = parse(&format!("[nbd]\nlisten=[\"localhost\"]\n{MINIMAL}"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("nbd.listen[0]"), "{e}");
    }

    #[test]
    fn journal_without_nvram_is_refused() {
        let text = r#"
[node]
id = 0
[[array]]
name = "md0"
level = 1
disks = ["a.img", "b.img"]
[[volume]]
name = "v"
array = "md0"
journal = true
"#;
        let e = parse(text).unwrap_err().to_string();
        assert!(
            e.contains("volume[0].journal") && e.contains("[nvram]"),
            "{e}"
        );
    }

    const TWO_ARRAYS: &str = r#"
[node]
id = 0
data_dir = "/var/lib/tb"
[nvram]
path = "/dev/shm/node0.nvram"
[[array]]
name = "md0"
level = 1
disks = ["a.img", "b.img"]
[[array]]
name = "md1"
level = 1
disks = ["c.img", "d.img"]
"#;

    #[test]
    fn each_journaled_volume_gets_its_own_nvram_file() {
        let text = format!(
            "{TWO_ARRAYS}[[volume]]\nname = \"v0\"\narray = \"md0\"\njournal = true\n\
             [[volume]]\nname = \"v1\"\narray = \"md1\"\njournal = true\nnvram = \"v1.nvram\"\n"
        );
        let c = parse(&text).unwrap();
        assert_eq!(
            c.volume_nvram_path(&c.volumes[0]),
            Some(PathBuf::from("/dev/shm/node0.nvram"))
        );
        assert_eq!(
            c.volume_nvram_path(&c.volumes[1]),
            Some(PathBuf::from("/var/lib/tb/v1.nvram"))
        );
    }

    #[test]
    fn two_journaled_volumes_on_one_nvram_file_are_refused() {
        let text = format!(
            "{TWO_ARRAYS}[[volume]]\nname = \"v0\"\narray = \"md0\"\njournal = true\n\
             [[volume]]\nname = \"v1\"\narray = \"md1\"\njournal = true\n"
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("volume[1].nvram") && e.contains("would share the NVRAM file"),
            "{e}"
        );
    }

    #[test]
    fn nvram_on_an_unjournaled_volume_is_refused() {
        let text = format!(
            "{TWO_ARRAYS}[[volume]]\nname = \"v0\"\narray = \"md0\"\nnvram = \"x.nvram\"\n"
        );
        let e = parse(&text).unwrap_err().to_string();
        assert!(
            e.contains("volume[0].nvram") && e.contains("journal = true"),
            "{e}"
        );
    }
}
