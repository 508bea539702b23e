//! The `[ha]` section: how this node watches its partner and takes over from it.
//!
//! Defaults are chosen so that a takeover completes well inside 2 s: a status every
//! `heartbeat_interval_ms` = 100 ms on every path, the partner declared failed after
//! `silence_intervals` = 5 silent intervals on every path (500 ms), and a lease of
//! `lease_ms` = 400 ms (the pair state machine's default) that the survivor waits out (from the
//! partner's last record) before it preempts the partner's disks. The lease is shorter than the
//! silence window, so waiting it out adds little: detection + margin + announce + assembly +
//! journal load stays near 1 s. The lease must exceed the detection window's slack so that a paused node cannot write
//! after the survivor preempts: a node only writes while its own last mailbox write is younger
//! than `lease_ms`.

use serde::Deserialize;
use std::path::PathBuf;

/// Default interval between two status records on each path.
pub const DEFAULT_HEARTBEAT_INTERVAL_MS: u64 = 100;
/// Default number of silent intervals on every path before the partner is declared failed.
pub const DEFAULT_SILENCE_INTERVALS: u32 = 5;
/// Default lease: how long after its last mailbox write a node may still write its disks.
pub const DEFAULT_LEASE_MS: u64 = twinblock_pair::state::DEFAULT_LEASE_MS;
/// Shortest accepted heartbeat interval: below this, scheduling noise alone looks like silence.
pub const MIN_HEARTBEAT_INTERVAL_MS: u64 = 10;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HaConfig {
    /// UDP address this node receives the partner's status datagrams on.
    pub udp_listen: String,
    /// UDP address of the partner's `udp_listen`.
    pub partner_udp: String,
    /// Shared disks whose mailbox area carries both nodes' status (at least two).
    pub mailbox_disks: Vec<PathBuf>,
    /// The partner's config file: its arrays, volumes and service address, used at takeover.
    pub partner_config: PathBuf,
    #[serde(default = "default_interval")]
    pub heartbeat_interval_ms: u64,
    #[serde(default = "default_silence")]
    pub silence_intervals: u32,
    #[serde(default = "default_lease")]
    pub lease_ms: u64,
    /// Give back automatically when the recovered partner reports it is waiting.
    #[serde(default)]
    pub auto_giveback: bool,
    /// Start with takeover disabled (the operator enables it with `twinctl takeover-enable`).
    #[serde(default)]
    pub takeover_disabled: bool,
    /// LAN address takeover: a program run as `PROGRAM add|del IP/PREFIX DEVICE` when this node
    /// starts or stops serving a disk set (see `crate::ha::address_hook`).
    #[serde(default)]
    pub address_hook: Option<PathBuf>,
    /// This node's service address as `IP/PREFIX`, moved by `address_hook`; the partner's
    /// config names its own, which the survivor adds at takeover.
    #[serde(default)]
    pub service_address: Option<String>,
    /// The network interface `address_hook` adds both nodes' service addresses on.
    #[serde(default)]
    pub service_device: Option<String>,
}

fn default_interval() -> u64 {
    DEFAULT_HEARTBEAT_INTERVAL_MS
}
fn default_silence() -> u32 {
    DEFAULT_SILENCE_INTERVALS
}
fn default_lease() -> u64 {
    DEFAULT_LEASE_MS
}

impl HaConfig {
    /// The partner is declared failed after this long with nothing new on any path.
    pub fn detection_ms(&self) -> u64 {
        self.heartbeat_interval_ms * u64::from(self.silence_intervals)
    }

    /// Checks the values against each other; `Err((key, problem))`.
    pub fn check(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: String| Err((format!("ha.{k}"), m));
        for (key, addr) in [
            ("udp_listen", &self.udp_listen),
            ("partner_udp", &self.partner_udp),
        ] {
            if addr.parse::<std::net::SocketAddr>().is_err() {
                return bad(
                    key,
                    format!("`{addr}` is not an IP address with a port (e.g. 127.0.0.1:10900)"),
                );
            }
        }
        if let Some(a) = &self.service_address {
            crate::ha::address_hook::check_address(a).or_else(|m| bad("service_address", m))?;
        }
        if let Some(d) = &self.service_device {
            crate::ha::address_hook::check_device(d).or_else(|m| bad("service_device", m))?;
        }
        if self.address_hook.is_some()
            && (self.service_address.is_none() || self.service_device.is_none())
        {
            return bad(
                "address_hook",
                "needs ha.service_address (this node's IP/PREFIX) and ha.service_device (the \
                 interface to add the addresses on)"
                    .into(),
            );
        }
        if self.udp_listen == self.partner_udp {
            return bad(
                "partner_udp",
                "is this node's own udp_listen address: the partner needs its own".into(),
            );
        }
        if self.mailbox_disks.len() < 2 {
            return bad(
                "mailbox_disks",
                format!(
                    "names {} disk(s); the mailbox path needs at least two shared disks so that \
                     one unreadable disk does not silence it",
                    self.mailbox_disks.len()
                ),
            );
        }
        if self.heartbeat_interval_ms < MIN_HEARTBEAT_INTERVAL_MS {
            return bad(
                "heartbeat_interval_ms",
                format!(
                    "{} ms is below the minimum of {MIN_HEARTBEAT_INTERVAL_MS} ms",
                    self.heartbeat_interval_ms
                ),
            );
        }
        if self.silence_intervals < 2 {
            return bad(
                "silence_intervals",
                "must be at least 2: one late datagram must not declare the partner failed".into(),
            );
        }
        if self.lease_ms <= self.heartbeat_interval_ms {
            return bad(
                "lease_ms",
                format!(
                    "{} ms must exceed heartbeat_interval_ms ({} ms): a node renews its lease \
                     with every mailbox write",
                    self.lease_ms, self.heartbeat_interval_ms
                ),
            );
        }
        Ok(())
    }
}

/// What keeps `own` (with `[ha]`) and the partner config its `ha.partner_config` names from
/// running as one HA pair.
#[derive(Debug, Default)]
pub struct HaPartnerCheck {
    /// The node refuses to start: the two configs cannot work together.
    pub fatal: Vec<String>,
    /// Logged at start: addresses that do not point at each other (legitimate behind NAT or a
    /// proxy, a mistake otherwise), timers that differ.
    pub warnings: Vec<String>,
}

/// Compares the two configs of an HA pair. Both need `[ha]`, and `[pair]` on both or on
/// neither: with `[pair]` a takeover serves the partner's volumes from this node's copies of its
/// journals, so both nodes must mirror; without it the survivor opens the partner's own NVRAM
/// files, which only works on one host. With `[pair]` the two mirror configs are compared too
/// ([`super::check_partner`]).
pub fn check_ha_partner(own: &super::Config, partner: &super::Config) -> HaPartnerCheck {
    let mut out = HaPartnerCheck::default();
    let (on, pn) = (own.source.display(), partner.source.display());
    match (&own.ha, &partner.ha) {
        (Some(a), Some(b)) => {
            if a.partner_udp != b.udp_listen || b.partner_udp != a.udp_listen {
                out.warnings.push(format!(
                    "ha UDP addresses do not point at each other: {on} listens on {} and sends \
                     to {}, {pn} listens on {} and sends to {}",
                    a.udp_listen, a.partner_udp, b.udp_listen, b.partner_udp
                ));
            }
            if a.address_hook.is_some() && b.service_address.is_none() {
                out.fatal.push(format!(
                    "{on} has ha.address_hook but {pn} names no ha.service_address: the \
                     survivor could not move the partner's address at takeover"
                ));
            }
            if a.heartbeat_interval_ms != b.heartbeat_interval_ms
                || a.silence_intervals != b.silence_intervals
            {
                out.warnings.push(format!(
                    "heartbeat timers differ ({} ms x {} vs {} ms x {}): both nodes should \
                     detect alike",
                    a.heartbeat_interval_ms,
                    a.silence_intervals,
                    b.heartbeat_interval_ms,
                    b.silence_intervals
                ));
            }
        }
        _ => out
            .fatal
            .push(format!("both {on} and {pn} need an [ha] section")),
    }
    match (&own.pair, &partner.pair) {
        (Some(_), Some(_)) => out.warnings.extend(super::check_partner(own, partner)),
        (None, None) => {}
        _ => out.fatal.push(format!(
            "[pair] must be on both nodes or on neither ({on}: {}, {pn}: {}): a takeover \
             serves the partner's volumes from the mirror's copies only when both mirror",
            if own.pair.is_some() { "yes" } else { "no" },
            if partner.pair.is_some() { "yes" } else { "no" },
        )),
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> HaConfig {
        toml::from_str(
            r#"
            udp_listen = "127.0.0.1:10900"
            partner_udp = "127.0.0.1:10901"
            mailbox_disks = ["d0.img", "d1.img"]
            partner_config = "node1.toml"
            "#,
        )
        .unwrap()
    }

    #[test]
    fn address_hook_needs_a_valid_address_and_device() {
        let mut c = sample();
        c.address_hook = Some("/usr/local/sbin/hook".into());
        let (key, msg) = c.check().unwrap_err();
        assert_eq!(key, "ha.address_hook");
        assert!(msg.contains("service_address"), "{msg}");
        c.service_address = Some("192.168.10.11".into());
        c.service_device = Some("eth0".into());
        assert_eq!(c.check().unwrap_err().0, "ha.service_address");
        c.service_address = Some("192.168.10.11/24".into());
        assert!(c.check().is_ok());
        c.service_device = Some("eth 0".into());
        assert_eq!(c.check().unwrap_err().0, "ha.service_device");
    }

    #[test]
    fn defaults_detect_and_lease_within_the_takeover_budget() {
        let c = sample();
        c.check().unwrap();
        assert!(c.detection_ms() + c.lease_ms < 2000);
    }

    #[test]
    fn one_mailbox_disk_is_refused() {
        let mut c = sample();
        c.mailbox_disks.pop();
        let (key, msg) = c.check().unwrap_err();
        assert_eq!(key, "ha.mailbox_disks");
        assert!(msg.contains("at least two"), "{msg}");
    }

    #[test]
    fn lease_not_longer_than_interval_is_refused() {
        let mut c = sample();
        c.lease_ms = c.heartbeat_interval_ms;
        assert_eq!(c.check().unwrap_err().0, "ha.lease_ms");
    }

    fn node_text(dir: &std::path::Path, id: u8, udp_to: u16, pair: bool) -> String {
        let other = 1 - id;
        let mut t = format!(
            r#"
[node]
id = {id}
data_dir = "{dir}"
pair_id = "6f1c0d3e-8a4b-4c2d-9e7f-1a2b3c4d5e6f"
[nbd]
listen = ["127.0.0.1:1080{id}"]
[nvram]
path = "{dir}/n{id}/nvram"
[ha]
udp_listen = "127.0.0.1:1090{id}"
partner_udp = "127.0.0.1:{udp_to}"
mailbox_disks = ["d0.img", "d1.img"]
partner_config = "node{other}.toml"
"#,
            dir = dir.display()
        );
        if pair {
            t.push_str(&format!(
                r#"
[pair]
pair_id = "6f1c0d3e-8a4b-4c2d-9e7f-1a2b3c4d5e6f"
partner_id = {other}
listen = "127.0.0.1:780{id}"
partner_address = "127.0.0.1:780{other}"
partner_service_address = "127.0.0.1:1080{other}"
key_file = "{dir}/key"
"#,
                dir = dir.display()
            ));
        }
        t
    }

    fn two(pair: [bool; 2], udp_to0: u16) -> (tempfile::TempDir, [super::super::Config; 2]) {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let key = d.path().join("key");
        std::fs::write(&key, b"0123456789abcdef0123\n").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
        let parse = |id: u8, udp: u16| {
            super::super::Config::parse(
                &node_text(d.path(), id, udp, pair[usize::from(id)]),
                &d.path().join(format!("node{id}.toml")),
            )
            .unwrap()
        };
        let cfgs = [parse(0, udp_to0), parse(1, 10900)];
        (d, cfgs)
    }

    #[test]
    fn ha_with_pair_on_both_nodes_forms_one_pair() {
        let (_d, [a, b]) = two([true, true], 10901);
        for (x, y) in [(&a, &b), (&b, &a)] {
            let c = check_ha_partner(x, y);
            assert!(c.fatal.is_empty() && c.warnings.is_empty(), "{c:?}");
        }
    }

    #[test]
    fn pair_on_one_node_only_is_refused() {
        let (_d, [a, b]) = two([true, false], 10901);
        let p = check_ha_partner(&a, &b).fatal;
        assert!(
            p.iter().any(|m| m.contains("[pair] must be on both")),
            "{p:?}"
        );
    }

    #[test]
    fn ha_udp_addresses_not_pointing_at_each_other_are_reported() {
        let (_d, [a, b]) = two([true, true], 10999);
        let c = check_ha_partner(&a, &b);
        assert!(
            c.fatal.is_empty(),
            "a proxy in between is legitimate: {c:?}"
        );
        let p = c.warnings;
        assert!(p.iter().any(|m| m.contains("UDP addresses")), "{p:?}");
    }

    #[test]
    fn own_udp_address_as_partner_is_refused() {
        let mut c = sample();
        c.partner_udp = c.udp_listen.clone();
        assert_eq!(c.check().unwrap_err().0, "ha.partner_udp");
    }
}
