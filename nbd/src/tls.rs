//! TLS for NBD (`NBD_OPT_STARTTLS`): server settings loaded from PEM files, and whether TLS is
//! optional or required.
//!
//! The server's certificate chain and private key come from PEM files. When a client CA file is
//! given, clients may present a certificate signed by it; a presented certificate is verified,
//! and its subject common name can then be used in an export's allow-list. Clients without a
//! certificate are still accepted at the TLS level (an export's allow-list decides). The crypto
//! provider is `ring`, named explicitly so the choice does not depend on which provider
//! features other crates happen to enable.
//!
//! Not supported: TLS-PSK (rustls has no server-side PSK for TLS 1.3 external keys), and
//! selective TLS per export (with `Required` every export needs TLS).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;

/// Whether clients must switch to TLS before anything else.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsRequirement {
    /// `NBD_OPT_STARTTLS` is offered; plaintext clients are served too.
    Optional,
    /// Every option but `STARTTLS` and `ABORT` is refused with `NBD_REP_ERR_TLS_REQD` until the
    /// client has switched to TLS.
    Required,
}

/// A server's TLS settings.
#[derive(Clone)]
pub struct TlsSettings {
    pub requirement: TlsRequirement,
    pub config: Arc<rustls::ServerConfig>,
}

impl std::fmt::Debug for TlsSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsSettings")
            .field("requirement", &self.requirement)
            .finish_non_exhaustive()
    }
}

/// Why TLS settings could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} file {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} file {path} is not valid PEM: {message}")]
    Pem {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
    #[error("{what} file {path} holds no {expected} (expected a PEM block `-----BEGIN {expected}-----`)")]
    Empty {
        what: &'static str,
        path: PathBuf,
        expected: &'static str,
    },
    #[error("TLS setup refused the {what}: {message}")]
    Rustls { what: &'static str, message: String },
}

impl TlsError {
    /// Which input failed: `"TLS certificate"`, `"TLS private key"`, `"TLS client CA"`, or for
    /// a refusal by rustls what it refused.
    pub fn what(&self) -> &'static str {
        match self {
            TlsError::Read { what, .. }
            | TlsError::Pem { what, .. }
            | TlsError::Empty { what, .. }
            | TlsError::Rustls { what, .. } => what,
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

fn pem_err(what: &'static str, path: &Path, e: rustls::pki_types::pem::Error) -> TlsError {
    TlsError::Pem {
        what,
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

/// Every certificate in a PEM file, in order.
pub fn load_certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let text = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(what, path, e))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            what,
            path: path.to_path_buf(),
            expected: "CERTIFICATE",
        });
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 RSA or SEC1 EC) in a PEM file.
pub fn load_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    const WHAT: &str = "TLS private key";
    let text = read(WHAT, path)?;
    match PrivateKeyDer::from_pem_slice(&text) {
        Ok(k) => Ok(k),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(TlsError::Empty {
            what: WHAT,
            path: path.to_path_buf(),
            expected: "PRIVATE KEY",
        }),
        Err(e) => Err(pem_err(WHAT, path, e)),
    }
}

/// Builds the rustls server configuration: the certificate chain and key, and, with
/// `client_ca`, verification of client certificates signed by that CA (optional for clients).
pub fn server_config(
    cert_chain: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let rustls_err = |what| {
        move |e: rustls::Error| TlsError::Rustls {
            what,
            message: e.to_string(),
        }
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(rustls_err("protocol versions"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in load_certificates("TLS client CA", ca)? {
                roots.add(c).map_err(rustls_err("client CA certificate"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .map_err(|e| TlsError::Rustls {
                    what: "client CA certificate",
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(
            load_certificates("TLS certificate", cert_chain)?,
            load_private_key(key)?,
        )
        .map_err(rustls_err(
            "certificate and private key (do they belong together?)",
        ))?;
    Ok(Arc::new(config))
}
