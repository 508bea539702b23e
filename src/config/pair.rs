//! The `[pair]` section: who the partner is, where the interconnect runs, the pre-shared key, and
//! the mirror's bounded wait. Kept apart from the rest of the config so that the HA work and the
//! NBD work can grow their own sections without touching this one.
//!
//! [`check_partner`] compares two nodes' configs (for `twinblockd --check-partner`): both must
//! name the same pair, each other's ids, each other's interconnect and service addresses, and
//! the same key (compared by fingerprint, never printed).

use super::{Config, ConfigError};
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use twinblock_pair::wire::PairKey;

/// Default bounded wait for the partner's acknowledgement before a write continues alone.
pub const DEFAULT_MIRROR_TIMEOUT_MS: u64 = 1000;
/// Bounds on `mirror_timeout_ms`.
const MIRROR_TIMEOUT_MS_MIN: u64 = 10;
const MIRROR_TIMEOUT_MS_MAX: u64 = 60_000;
/// Default first and longest pause between reconnect attempts.
pub const DEFAULT_RECONNECT_MIN_MS: u64 = 50;
pub const DEFAULT_RECONNECT_MAX_MS: u64 = 1000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PairConfig {
    /// The pair's identity (a UUID); the same on both nodes. Also stamped into NVRAM files.
    pub pair_id: String,
    /// The partner's node id (this node's is `node.id`).
    pub partner_id: u8,
    /// Where this node accepts the partner's interconnect connection.
    pub listen: String,
    /// The partner's interconnect address (its `listen`).
    pub partner_address: String,
    /// This node's NBD service address (default: the first `nbd.listen`).
    #[serde(default)]
    pub service_address: Option<String>,
    /// The partner's NBD service address.
    pub partner_service_address: String,
    /// The pre-shared key (at least 16 bytes); must not be readable by group or others.
    pub key_file: PathBuf,
    /// How long a write waits for the partner's acknowledgement before continuing on local NVRAM
    /// alone (the mirror is then out of sync until resynchronised).
    #[serde(default = "default_mirror_timeout")]
    pub mirror_timeout_ms: u64,
    /// First pause between reconnect attempts; doubles up to `reconnect_max_ms`.
    #[serde(default = "default_reconnect_min")]
    pub reconnect_min_ms: u64,
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max_ms: u64,
    /// Where the copies of the partner's journals live (default: the directory of
    /// `[nvram].path`): one `<volume>.partner.nvram` per partner volume.
    #[serde(default)]
    pub partner_nvram_dir: Option<PathBuf>,
}

fn default_mirror_timeout() -> u64 {
    DEFAULT_MIRROR_TIMEOUT_MS
}
fn default_reconnect_min() -> u64 {
    DEFAULT_RECONNECT_MIN_MS
}
fn default_reconnect_max() -> u64 {
    DEFAULT_RECONNECT_MAX_MS
}

fn addr(s: &str) -> Option<SocketAddr> {
    s.parse().ok()
}

impl PairConfig {
    /// This node's NBD service address.
    pub fn service_address(&self, cfg: &Config) -> Option<String> {
        self.service_address
            .clone()
            .or_else(|| cfg.nbd.listen.first().cloned())
    }

    /// Checks what the types cannot; called from `Config::validate`.
    pub(super) fn validate(&self, cfg: &Config) -> Result<(), ConfigError> {
        let pair_uuid = uuid::Uuid::parse_str(&self.pair_id).map_err(|_| {
            cfg.invalid(
                "pair.pair_id",
                format!(
                    "`{}` is not a UUID (e.g. 6f1c0d3e-8a4b-4c2d-9e7f-1a2b3c4d5e6f)",
                    self.pair_id
                ),
            )
        })?;
        if let Some(node_pair) = cfg.node.pair_id.as_deref() {
            if uuid::Uuid::parse_str(node_pair).ok() != Some(pair_uuid) {
                return Err(cfg.invalid(
                    "pair.pair_id",
                    format!("differs from node.pair_id `{node_pair}`; give one value (or drop node.pair_id)"),
                ));
            }
        }
        if self.partner_id > 1 || self.partner_id == cfg.node.id {
            return Err(cfg.invalid(
                "pair.partner_id",
                format!(
                    "must be the other node's id ({}), got {}",
                    1 - cfg.node.id.min(1),
                    self.partner_id
                ),
            ));
        }
        for (key, value) in [
            ("pair.listen", Some(&self.listen)),
            ("pair.partner_address", Some(&self.partner_address)),
            (
                "pair.partner_service_address",
                Some(&self.partner_service_address),
            ),
            ("pair.service_address", self.service_address.as_ref()),
        ] {
            if let Some(v) = value {
                if addr(v).is_none() {
                    return Err(cfg.invalid(
                        key,
                        format!("`{v}` is not an IP address with a port (e.g. 192.168.7.1:7800)"),
                    ));
                }
            }
        }
        if self.service_address(cfg).is_none() {
            return Err(cfg.invalid(
                "pair.service_address",
                "no NBD service address: set it, or give nbd.listen a TCP address",
            ));
        }
        if !(MIRROR_TIMEOUT_MS_MIN..=MIRROR_TIMEOUT_MS_MAX).contains(&self.mirror_timeout_ms) {
            return Err(cfg.invalid(
                "pair.mirror_timeout_ms",
                format!(
                    "{} is outside {MIRROR_TIMEOUT_MS_MIN}..={MIRROR_TIMEOUT_MS_MAX}",
                    self.mirror_timeout_ms
                ),
            ));
        }
        if self.reconnect_min_ms == 0 || self.reconnect_min_ms > self.reconnect_max_ms {
            return Err(cfg.invalid(
                "pair.reconnect_min_ms",
                "must be at least 1 and at most reconnect_max_ms",
            ));
        }
        if cfg.volumes.iter().any(|v| v.journal) && cfg.nvram.is_none() {
            return Err(cfg.invalid("nvram", "a pair needs an [nvram] section"));
        }
        Ok(())
    }

    /// The resolved key file path.
    pub fn key_path(&self, cfg: &Config) -> PathBuf {
        cfg.resolve(&self.key_file)
    }

    /// Where the copy of the partner's volume `name` lives.
    pub fn partner_copy_path(&self, cfg: &Config, name: &str) -> PathBuf {
        let dir = match (&self.partner_nvram_dir, &cfg.nvram) {
            (Some(d), _) => cfg.resolve(d),
            (None, Some(nv)) => cfg
                .resolve(&nv.path)
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| cfg.data_dir()),
            (None, None) => cfg.data_dir(),
        };
        dir.join(format!("{name}.partner.nvram"))
    }
}

/// Reads the pre-shared key from `path`, refusing a file readable by group or others (as ssh
/// refuses such a private key) and one too short to be a key.
pub fn load_key(path: &Path) -> Result<PairKey, String> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path)
        .map_err(|e| format!("cannot read the pair key file {}: {e}", path.display()))?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(format!(
            "the pair key file {} has mode {mode:03o}: it must not be readable by group or \
             others; run `chmod 600 {}`",
            path.display(),
            path.display()
        ));
    }
    let mut bytes = std::fs::read(path)
        .map_err(|e| format!("cannot read the pair key file {}: {e}", path.display()))?;
    while bytes.last().is_some_and(|b| b.is_ascii_whitespace()) {
        bytes.pop();
    }
    PairKey::new(bytes).map_err(|e| format!("pair key file {}: {e}", path.display()))
}

fn same_addr(a: &str, b: &str) -> bool {
    match (addr(a), addr(b)) {
        // A wildcard listen address matches any address with the same port.
        (Some(x), Some(y)) => {
            x.port() == y.port()
                && (x.ip() == y.ip() || x.ip().is_unspecified() || y.ip().is_unspecified())
        }
        _ => false,
    }
}

/// Everything that keeps configs `a` and `b` from forming one pair (empty: they do). Keys are
/// compared by fingerprint when both can be read.
pub fn check_partner(a: &Config, b: &Config) -> Vec<String> {
    let (Some(pa), Some(pb)) = (&a.pair, &b.pair) else {
        return vec!["both configs need a [pair] section".into()];
    };
    let mut problems = Vec::new();
    let (an, bn) = (a.source.display(), b.source.display());
    if a.pair_id() != b.pair_id() {
        problems.push(format!(
            "pair ids differ: {an} has {}, {bn} has {}",
            pa.pair_id, pb.pair_id
        ));
    }
    if a.node.id == b.node.id {
        problems.push(format!("both are node {}", a.node.id));
    }
    if pa.partner_id != b.node.id || pb.partner_id != a.node.id {
        problems.push(format!(
            "partner ids do not point at each other: {an} is node {} with partner {}, {bn} is node {} with partner {}",
            a.node.id, pa.partner_id, b.node.id, pb.partner_id
        ));
    }
    if !same_addr(&pa.partner_address, &pb.listen) {
        problems.push(format!(
            "{an} dials {} but {bn} listens on {}",
            pa.partner_address, pb.listen
        ));
    }
    if !same_addr(&pb.partner_address, &pa.listen) {
        problems.push(format!(
            "{bn} dials {} but {an} listens on {}",
            pb.partner_address, pa.listen
        ));
    }
    let (sa, sb) = (
        pa.service_address(a).unwrap_or_default(),
        pb.service_address(b).unwrap_or_default(),
    );
    if !same_addr(&pa.partner_service_address, &sb) {
        problems.push(format!(
            "{an} expects the partner's service at {} but {bn} serves at {sb}",
            pa.partner_service_address
        ));
    }
    if !same_addr(&pb.partner_service_address, &sa) {
        problems.push(format!(
            "{bn} expects the partner's service at {} but {an} serves at {sa}",
            pb.partner_service_address
        ));
    }
    if pa.mirror_timeout_ms != pb.mirror_timeout_ms {
        problems.push(format!(
            "mirror_timeout_ms differs ({} vs {}): both nodes should wait alike",
            pa.mirror_timeout_ms, pb.mirror_timeout_ms
        ));
    }
    match (load_key(&pa.key_path(a)), load_key(&pb.key_path(b))) {
        (Ok(ka), Ok(kb)) if ka.fingerprint() != kb.fingerprint() => problems.push(format!(
            "the key files differ (fingerprints {} and {})",
            ka.fingerprint(),
            kb.fingerprint()
        )),
        (Ok(_), Ok(_)) => {}
        (ra, rb) => {
            problems.extend(ra.err());
            problems.extend(rb.err());
        }
    }
    problems
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn node_cfg(dir: &Path, id: u8, key: &str) -> String {
        let other = 1 - id;
        format!(
            r#"
[node]
id = {id}
data_dir = "{dir}"
[nbd]
listen = ["127.0.0.1:1080{id}"]
[pair]
pair_id = "6f1c0d3e-8a4b-4c2d-9e7f-1a2b3c4d5e6f"
partner_id = {other}
listen = "127.0.0.1:780{id}"
partner_address = "127.0.0.1:780{other}"
partner_service_address = "127.0.0.1:1080{other}"
key_file = "{key}"
"#,
            dir = dir.display()
        )
    }

    fn write_key(dir: &Path, name: &str, content: &[u8], mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, content).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    fn parse(text: &str, name: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new(name))
    }

    #[test]
    fn matching_configs_form_a_pair() {
        let d = tempfile::tempdir().unwrap();
        write_key(d.path(), "k", b"0123456789abcdef0123\n", 0o600);
        let a = parse(&node_cfg(d.path(), 0, "k"), "/x/a.toml").unwrap();
        let b = parse(&node_cfg(d.path(), 1, "k"), "/x/b.toml").unwrap();
        assert_eq!(
            a.pair.as_ref().unwrap().mirror_timeout_ms,
            DEFAULT_MIRROR_TIMEOUT_MS
        );
        assert_eq!(check_partner(&a, &b), Vec::<String>::new());
    }

    #[test]
    fn mismatched_addresses_ids_and_keys_are_each_reported() {
        let d = tempfile::tempdir().unwrap();
        write_key(d.path(), "k", b"0123456789abcdef0123", 0o600);
        write_key(d.path(), "k2", b"another-key-of-enough-bytes", 0o600);
        let a = parse(&node_cfg(d.path(), 0, "k"), "/x/a.toml").unwrap();
        let b_text = node_cfg(d.path(), 1, "k2").replace("127.0.0.1:7800", "127.0.0.1:7900");
        let b = parse(&b_text, "/x/b.toml").unwrap();
        let p = check_partner(&a, &b).join("\n");
        assert!(p.contains("dials 127.0.0.1:7900"), "{p}");
        assert!(p.contains("key files differ"), "{p}");
        let same_node = parse(&node_cfg(d.path(), 0, "k"), "/x/c.toml").unwrap();
        let p = check_partner(&a, &same_node).join("\n");
        assert!(p.contains("both are node 0"), "{p}");
    }

    #[test]
    fn group_readable_or_short_key_files_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let open = write_key(d.path(), "open", b"0123456789abcdef0123", 0o644);
        let e = load_key(&open).unwrap_err();
        assert!(e.contains("chmod 600") && e.contains("644"), "{e}");
        let short = write_key(d.path(), "short", b"tiny\n", 0o600);
        assert!(load_key(&short).unwrap_err().contains("at least 16"));
        assert!(load_key(&d.path().join("missing")).is_err());
    }

    #[test]
    fn partner_id_must_name_the_other_node() {
        let d = tempfile::tempdir().unwrap();
        let text = node_cfg(d.path(), 0, "k").replace("partner_id = 1", "partner_id = 0");
        let e = parse(&text, "/x/a.toml").unwrap_err().to_string();
        assert!(e.contains("pair.partner_id"), "{e}");
    }

    #[test]
    fn bad_addresses_and_timeouts_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let text = node_cfg(d.path(), 0, "k")
            .replace("listen = \"127.0.0.1:7800\"", "listen = \"nowhere\"");
        assert!(parse(&text, "/x/a.toml")
            .unwrap_err()
            .to_string()
            .contains("pair.listen"));
        let text = format!("{}mirror_timeout_ms = 0\n", node_cfg(d.path(), 0, "k"));
        assert!(parse(&text, "/x/a.toml")
            .unwrap_err()
            .to_string()
            .contains("pair.mirror_timeout_ms"));
    }
}
