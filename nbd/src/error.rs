//! Why a client connection ended abnormally. Every variant is logged by the server with the
//! peer address; none of them affects other connections.

use std::time::Duration;

use crate::proto::ProtoError;

#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    #[error("socket I/O failed during {phase}: {source}")]
    Io {
        phase: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("handshake not finished within {0:?}")]
    HandshakeTimeout(Duration),
    #[error("client sent unknown handshake flags {0:#x}")]
    UnknownClientFlags(u32),
    #[error("client did not negotiate fixed newstyle and sent option {0}, which needs it")]
    NotFixedNewstyle(u32),
    #[error("bad option header: {0}")]
    BadOption(ProtoError),
    #[error("client sent more than {0} options")]
    TooManyOptions(u32),
    #[error("NBD_OPT_EXPORT_NAME named unknown export {0:?}")]
    UnknownExport(String),
    #[error("NBD_OPT_EXPORT_NAME option of {0} bytes is too long")]
    ExportNameTooLong(u32),
    #[error("bad request header: {0}")]
    BadRequest(ProtoError),
    #[error("connection refused: {0}")]
    Refused(&'static str),
    #[error("client asked for export {0:?}, which its allow-list does not admit")]
    AccessDenied(String),
    #[error("client sent NBD_OPT_EXPORT_NAME without TLS, which this server requires")]
    TlsRequired,
    #[error("client sent {0} bytes after NBD_OPT_STARTTLS before the TLS handshake")]
    DataBeforeTls(usize),
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(std::io::Error),
    #[error("client disconnected in the middle of a {what} (cookie {cookie:#x})")]
    DisconnectedMidRequest { what: &'static str, cookie: u64 },
}

impl ConnectionError {
    pub(crate) fn io(phase: &'static str) -> impl FnOnce(std::io::Error) -> Self {
        move |source| ConnectionError::Io { phase, source }
    }
}
