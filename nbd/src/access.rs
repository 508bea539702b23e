//! Who may use an export: the client's identity as the server knows it after the handshake
//! (address, whether TLS is on, the verified certificate's name) and each export's allow-list.
//!
//! The rules are pure so they are unit-tested without sockets: an empty allow-list allows
//! everyone; a list of networks admits only TCP clients whose address lies in one of them (a
//! Unix-socket client has no address and is refused); a list of certificate names admits only
//! TLS clients whose verified certificate's subject common name is one of them. When both lists
//! are given, a client must pass both.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

/// What the server knows about a connected client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientInfo {
    /// For logs: `ip:port`, or `unix#N` for a Unix-socket client.
    pub peer: String,
    /// The TCP peer address; `None` on a Unix socket.
    pub ip: Option<IpAddr>,
    /// TLS was negotiated (`NBD_OPT_STARTTLS`).
    pub tls: bool,
    /// Subject common name of the client certificate, when one was presented and verified.
    pub cert_name: Option<String>,
}

/// An IP network in CIDR notation (`10.0.0.0/8`, `2001:db8::/32`), or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix_len: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{text}` is not an IP address or network: {why} (e.g. 192.168.1.10, 10.0.0.0/8, fd00::/8)"
)]
pub struct IpNetError {
    text: String,
    why: &'static str,
}

impl IpNet {
    /// Whether `ip` lies in this network. IPv4 addresses seen as IPv4-mapped IPv6 (`::ffff:a.b.c.d`,
    /// as a dual-stack listener reports them) match IPv4 networks.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix_len)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                prefix_matches(&net.octets(), &ip.octets(), self.prefix_len)
            }
            _ => false,
        }
    }
}

fn prefix_matches(net: &[u8], ip: &[u8], prefix_len: u8) -> bool {
    let full = usize::from(prefix_len / 8);
    if net[..full] != ip[..full] {
        return false;
    }
    let rest = prefix_len % 8;
    if rest == 0 {
        return true;
    }
    let mask = 0xffu8 << (8 - rest);
    net[full] & mask == ip[full] & mask
}

impl FromStr for IpNet {
    type Err = IpNetError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let err = |why| IpNetError {
            text: text.to_owned(),
            why,
        };
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr.trim().parse().map_err(|_| err("bad address"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix_len = match prefix {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| err("bad prefix length"))?,
        };
        Ok(IpNet { addr, prefix_len })
    }
}

impl fmt::Display for IpNet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

/// An export's allow-list. The default allows every client.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Access {
    /// When not empty, only TCP clients from these networks.
    pub networks: Vec<IpNet>,
    /// When not empty, only TLS clients whose verified certificate has one of these subject
    /// common names.
    pub cert_names: Vec<String>,
}

impl Access {
    /// `Ok` when `client` may use the export; otherwise why not (for the log, never the client).
    pub fn check(&self, client: &ClientInfo) -> Result<(), String> {
        if !self.networks.is_empty() {
            match client.ip {
                None => return Err("client has no IP address (Unix socket) and the export has an address allow-list".into()),
                Some(ip) if !self.networks.iter().any(|n| n.contains(ip)) => {
                    return Err(format!("address {ip} is not in the export's allow-list"));
                }
                Some(_) => {}
            }
        }
        if !self.cert_names.is_empty() {
            match &client.cert_name {
                None if !client.tls => {
                    return Err(
                        "the export needs a TLS client certificate; client did not use TLS".into(),
                    )
                }
                None => {
                    return Err(
                        "the export needs a TLS client certificate; client presented none".into(),
                    )
                }
                Some(name) if !self.cert_names.iter().any(|n| n == name) => {
                    return Err(format!(
                        "certificate name {name:?} is not in the export's allow-list"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn client(ip: Option<&str>, cert: Option<&str>) -> ClientInfo {
        ClientInfo {
            peer: "test".into(),
            ip: ip.map(|i| i.parse().unwrap()),
            tls: cert.is_some(),
            cert_name: cert.map(str::to_owned),
        }
    }

    #[test]
    fn networks_match_by_prefix() {
        assert!(net("10.0.0.0/8").contains("10.200.1.2".parse().unwrap()));
        assert!(!net("10.0.0.0/8").contains("11.0.0.1".parse().unwrap()));
        assert!(net("192.168.1.128/25").contains("192.168.1.200".parse().unwrap()));
        assert!(!net("192.168.1.128/25").contains("192.168.1.100".parse().unwrap()));
        assert!(net("127.0.0.1").contains("127.0.0.1".parse().unwrap()));
        assert!(!net("127.0.0.1").contains("127.0.0.2".parse().unwrap()));
        assert!(net("0.0.0.0/0").contains("8.8.8.8".parse().unwrap()));
        assert!(net("fd00::/8").contains("fd12::1".parse().unwrap()));
        assert!(!net("fd00::/8").contains("fe80::1".parse().unwrap()));
        assert!(!net("::/0").contains("1.2.3.4".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_addresses_match_ipv4_networks() {
        assert!(net("10.0.0.0/8").contains("::ffff:10.1.2.3".parse().unwrap()));
    }

    #[test]
    fn malformed_networks_are_refused() {
        for bad in [
            "",
            "10.0.0.0/33",
            "10.0.0/8",
            "fd00::/129",
            "host",
            "1.2.3.4/x",
        ] {
            assert!(bad.parse::<IpNet>().is_err(), "{bad}");
        }
        assert_eq!(net("10.1.0.0/16").to_string(), "10.1.0.0/16");
    }

    #[test]
    fn empty_access_allows_everyone() {
        assert_eq!(Access::default().check(&client(None, None)), Ok(()));
    }

    #[test]
    fn network_list_refuses_other_addresses_and_unix_clients() {
        let a = Access {
            networks: vec![net("127.0.0.0/8")],
            ..Access::default()
        };
        assert_eq!(a.check(&client(Some("127.0.0.5"), None)), Ok(()));
        assert!(a.check(&client(Some("10.0.0.1"), None)).is_err());
        assert!(a.check(&client(None, None)).is_err());
    }

    #[test]
    fn cert_name_list_needs_a_matching_verified_certificate() {
        let a = Access {
            cert_names: vec!["backup-host".into()],
            ..Access::default()
        };
        assert_eq!(
            a.check(&client(Some("1.2.3.4"), Some("backup-host"))),
            Ok(())
        );
        assert!(a.check(&client(Some("1.2.3.4"), Some("other"))).is_err());
        assert!(a.check(&client(Some("1.2.3.4"), None)).is_err());
        let both = Access {
            networks: vec![net("10.0.0.0/8")],
            cert_names: vec!["backup-host".into()],
        };
        assert!(both
            .check(&client(Some("1.2.3.4"), Some("backup-host")))
            .is_err());
        assert_eq!(
            both.check(&client(Some("10.9.9.9"), Some("backup-host"))),
            Ok(())
        );
    }
}
