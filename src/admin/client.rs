//! The `twinctl` side of the admin socket.

use super::proto::{Request, Response};
use std::path::{Path, PathBuf};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach twinblockd at {path}: {source} (is the daemon running? see --socket)")]
    Connect {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("admin socket {path}: daemon closed the connection without answering")]
    Closed { path: PathBuf },
    #[error("admin socket {path}: unreadable answer: {message}")]
    Garbled { path: PathBuf, message: String },
    #[error("{0}")]
    Refused(String),
}

/// Send one request and return the daemon's result (or its error message as `Refused`).
pub async fn call(socket: &Path, req: &Request) -> Result<serde_json::Value, ClientError> {
    let io = |source| ClientError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|source| ClientError::Connect {
            path: socket.to_path_buf(),
            source,
        })?;
    let (r, mut w) = stream.into_split();
    let mut line = serde_json::to_vec(req).map_err(|e| ClientError::Garbled {
        path: socket.to_path_buf(),
        message: e.to_string(),
    })?;
    line.push(b'\n');
    w.write_all(&line).await.map_err(io)?;
    let mut answer = String::new();
    let n = BufReader::new(r).read_line(&mut answer).await.map_err(io)?;
    if n == 0 {
        return Err(ClientError::Closed {
            path: socket.to_path_buf(),
        });
    }
    let resp: Response = serde_json::from_str(&answer).map_err(|e| ClientError::Garbled {
        path: socket.to_path_buf(),
        message: e.to_string(),
    })?;
    if resp.ok {
        Ok(resp.result.unwrap_or(serde_json::Value::Null))
    } else {
        Err(ClientError::Refused(
            resp.error.unwrap_or_else(|| "request failed".into()),
        ))
    }
}
