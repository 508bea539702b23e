//! NBD over TLS (`NBD_OPT_STARTTLS`) and per-export allow-lists: a rustls client switches to TLS
//! mid-handshake and uses the export; with TLS required a plaintext client is refused during the
//! handshake; clients outside an export's address or certificate-name allow-list are refused;
//! bad PEM files give errors naming the file. Every certificate is made at test time.

mod common;

use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;

use common::{Raw, TempDir, TestPki};
use rustls::pki_types::{PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream};
use twinblock_nbd::mem::MemDevice;
use twinblock_nbd::proto::*;
use twinblock_nbd::{
    tls, Access, ClientInfo, Export, IpNet, Server, ServerConfig, TlsRequirement, TlsSettings,
};

const CLIENT_NAME: &str = "backup-host";

/// Files for one test: the PKI written to a temp dir.
struct Pki {
    pki: TestPki,
    dir: TempDir,
}

fn pki() -> Pki {
    let pki = TestPki::generate(CLIENT_NAME);
    let dir = TempDir::new("tls");
    pki.write_to(&dir.0);
    Pki { pki, dir }
}

fn tls_settings(p: &Pki, requirement: TlsRequirement) -> TlsSettings {
    let d = &p.dir.0;
    TlsSettings {
        requirement,
        config: tls::server_config(
            &d.join("server-cert.pem"),
            &d.join("server-key.pem"),
            Some(&d.join("ca-cert.pem")),
        )
        .unwrap(),
    }
}

/// A server with export `open` (no allow-list) and export `locked` (`access`).
fn server(tls: Option<TlsSettings>, access: Access) -> Server {
    let s = Server::new(ServerConfig {
        tls,
        ..ServerConfig::default()
    });
    for (name, access) in [("open", Access::default()), ("locked", access)] {
        s.add_export_with_access(
            Export {
                name: name.into(),
                description: String::new(),
                device: Arc::new(MemDevice::new(1 << 20)),
            },
            access,
        )
        .unwrap();
    }
    s
}

async fn connect_from(server: &Server, ip: Option<&str>) -> Raw<DuplexStream> {
    let (client, server_side) = tokio::io::duplex(1 << 20);
    let s = server.clone();
    let info = ClientInfo {
        peer: "test".into(),
        ip: ip.map(|i| i.parse::<IpAddr>().unwrap()),
        ..ClientInfo::default()
    };
    tokio::spawn(async move { s.handle_connection_from(server_side, info).await });
    Raw::start(client).await
}

fn client_config(p: &Pki, with_cert: bool) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(p.pki.ca_der.clone()).unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    if with_cert {
        let chain =
            tls::load_certificates("client certificate", &p.dir.0.join("client-cert.pem")).unwrap();
        let key: PrivateKeyDer<'static> =
            tls::load_private_key(&p.dir.0.join("client-key.pem")).unwrap();
        builder.with_client_auth_cert(chain, key).unwrap()
    } else {
        builder.with_no_client_auth()
    }
}

/// Sends STARTTLS, expects ACK, and runs the TLS handshake as a client of `localhost`.
async fn starttls<S>(
    mut c: Raw<S>,
    p: &Pki,
    with_cert: bool,
) -> Raw<tokio_rustls::client::TlsStream<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    c.option(NBD_OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.kind, NBD_REP_ACK);
    let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config(p, with_cert)));
    let name = ServerName::try_from("localhost").unwrap();
    let s = connector.connect(name, c.s).await.expect("TLS handshake");
    Raw { s }
}

#[tokio::test]
async fn client_switches_to_tls_and_uses_the_export() {
    let p = pki();
    let s = server(
        Some(tls_settings(&p, TlsRequirement::Optional)),
        Access::default(),
    );
    let c = connect_from(&s, Some("127.0.0.1")).await;
    let mut c = starttls(c, &p, false).await;
    let info = c.go("open").await.unwrap();
    assert_eq!(info.size, 1 << 20);
    c.request(NBD_CMD_WRITE, 1, 4096, 4, b"tls!").await;
    assert_eq!(c.simple(0).await.0, 0);
    c.request(NBD_CMD_READ, 2, 4096, 4, &[]).await;
    assert_eq!(c.simple(4).await, (0, 2, b"tls!".to_vec()));
}

#[tokio::test]
async fn optional_tls_still_serves_plaintext_clients() {
    let p = pki();
    let s = server(
        Some(tls_settings(&p, TlsRequirement::Optional)),
        Access::default(),
    );
    let mut c = connect_from(&s, Some("127.0.0.1")).await;
    c.go("open").await.unwrap();
}

#[tokio::test]
async fn plaintext_client_is_refused_when_tls_is_required() {
    let p = pki();
    let s = server(
        Some(tls_settings(&p, TlsRequirement::Required)),
        Access::default(),
    );
    let mut c = connect_from(&s, Some("127.0.0.1")).await;
    let r = c.go("open").await.unwrap_err();
    assert_eq!(r.kind, NBD_REP_ERR_TLS_REQD);
    assert_eq!(c.list().await.unwrap_err().kind, NBD_REP_ERR_TLS_REQD);
    // EXPORT_NAME has no error reply: the connection is closed.
    c.option(NBD_OPT_EXPORT_NAME, b"open").await;
    assert!(c.closed().await);

    // The same server serves a client that switches to TLS first.
    let c = connect_from(&s, Some("127.0.0.1")).await;
    let mut c = starttls(c, &p, false).await;
    assert_eq!(c.list().await.unwrap(), vec!["locked", "open"]);
    c.go("open").await.unwrap();
}

#[tokio::test]
async fn second_starttls_is_invalid() {
    let p = pki();
    let s = server(
        Some(tls_settings(&p, TlsRequirement::Required)),
        Access::default(),
    );
    let c = connect_from(&s, None).await;
    let mut c = starttls(c, &p, false).await;
    c.option(NBD_OPT_STARTTLS, &[]).await;
    assert_eq!(c.option_reply().await.kind, NBD_REP_ERR_INVALID);
    c.go("open").await.unwrap();
}

#[tokio::test]
async fn client_outside_the_address_allow_list_is_refused() {
    let access = Access {
        networks: vec!["127.0.0.0/8".parse::<IpNet>().unwrap()],
        ..Access::default()
    };
    let s = server(None, access);
    let mut outside = connect_from(&s, Some("10.1.2.3")).await;
    assert_eq!(outside.list().await.unwrap(), vec!["open"], "LIST hides it");
    let r = outside.go("locked").await.unwrap_err();
    assert_eq!(r.kind, NBD_REP_ERR_POLICY);
    assert!(
        !r.message().contains("10.1.2.3"),
        "the reason stays in the log"
    );
    outside.go("open").await.expect("other exports stay usable");

    let mut unix = connect_from(&s, None).await;
    assert_eq!(
        unix.go("locked").await.unwrap_err().kind,
        NBD_REP_ERR_POLICY
    );
    unix.option(NBD_OPT_EXPORT_NAME, b"locked").await;
    assert!(
        unix.closed().await,
        "EXPORT_NAME to a refused export closes"
    );

    let mut inside = connect_from(&s, Some("127.0.0.1")).await;
    inside.go("locked").await.unwrap();
}

#[tokio::test]
async fn certificate_name_allow_list_needs_a_verified_matching_certificate() {
    let p = pki();
    let access = Access {
        cert_names: vec![CLIENT_NAME.into()],
        ..Access::default()
    };
    let s = server(Some(tls_settings(&p, TlsRequirement::Optional)), access);

    let mut plain = connect_from(&s, Some("127.0.0.1")).await;
    assert_eq!(
        plain.go("locked").await.unwrap_err().kind,
        NBD_REP_ERR_POLICY
    );

    let c = connect_from(&s, Some("127.0.0.1")).await;
    let mut anonymous = starttls(c, &p, false).await;
    assert_eq!(
        anonymous.go("locked").await.unwrap_err().kind,
        NBD_REP_ERR_POLICY
    );

    let c = connect_from(&s, Some("127.0.0.1")).await;
    let mut named = starttls(c, &p, true).await;
    named.go("locked").await.unwrap();
}

#[test]
fn certificate_common_name_is_read_from_der() {
    use rustls::pki_types::pem::PemObject;
    let p = TestPki::generate("node-b.example");
    let der =
        rustls::pki_types::CertificateDer::from_pem_slice(p.client_cert_pem.as_bytes()).unwrap();
    assert_eq!(
        twinblock_nbd::cert::subject_common_name(&der).as_deref(),
        Some("node-b.example")
    );
    assert_eq!(
        twinblock_nbd::cert::subject_common_name(&p.ca_der).as_deref(),
        Some("twinblock test CA")
    );
}

fn expect_error(cert: &Path, key: &Path, needle: &str) {
    let e = tls::server_config(cert, key, None).unwrap_err().to_string();
    assert!(e.contains(needle), "{needle:?} not in: {e}");
}

#[test]
fn bad_pem_files_give_errors_naming_the_file() {
    let p = pki();
    let d = &p.dir.0;
    let missing = d.join("missing.pem");
    expect_error(&missing, &d.join("server-key.pem"), "missing.pem");
    // A key file where the certificate should be: no CERTIFICATE block.
    expect_error(
        &d.join("server-key.pem"),
        &d.join("server-key.pem"),
        "CERTIFICATE",
    );
    expect_error(
        &d.join("server-cert.pem"),
        &d.join("ca-cert.pem"),
        "PRIVATE KEY",
    );
    // The client's key does not belong to the server's certificate.
    expect_error(
        &d.join("server-cert.pem"),
        &d.join("client-key.pem"),
        "belong together",
    );
}
