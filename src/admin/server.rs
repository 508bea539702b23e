//! The daemon side of the admin socket: bounded line reads, dispatch to an `AdminHandler`.

use super::proto::{Request, Response, REQUEST_LINE_BYTES_MAX};
use async_trait::async_trait;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

/// What answers admin requests: the node.
#[async_trait]
pub trait AdminHandler: Send + Sync + 'static {
    async fn handle(&self, req: Request) -> Result<serde_json::Value, String>;
}

/// Bind the admin socket, replacing a stale socket file left by a dead daemon (but never a
/// socket another live daemon answers on).
pub async fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if path.exists() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AddrInUse,
                format!(
                    "admin socket {} is in use by a running daemon",
                    path.display()
                ),
            ));
        }
        std::fs::remove_file(path)?;
    }
    // The node never creates directories: a mistyped socket path fails here, clearly.
    if let Some(why) = crate::disk_check::missing_directory(path) {
        return Err(std::io::Error::new(std::io::ErrorKind::NotFound, why));
    }
    UnixListener::bind(path)
}

/// Accept admin connections until the listener fails; each connection runs on its own task.
pub async fn serve(listener: UnixListener, handler: Arc<dyn AdminHandler>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let h = handler.clone();
                tokio::spawn(async move {
                    if let Err(e) = connection(stream, h).await {
                        tracing::debug!("admin connection ended: {e}");
                    }
                });
            }
            Err(e) => {
                tracing::warn!("admin socket accept failed: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

async fn connection(stream: UnixStream, handler: Arc<dyn AdminHandler>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = (&mut r)
            .take(REQUEST_LINE_BYTES_MAX as u64 + 1)
            .read_until(b'\n', &mut line)
            .await?;
        if n == 0 {
            return Ok(());
        }
        let resp = if line.len() > REQUEST_LINE_BYTES_MAX {
            let resp = Response::err(format!(
                "request longer than {REQUEST_LINE_BYTES_MAX} bytes refused"
            ));
            send(&mut w, &resp).await?;
            return Ok(());
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => {
                    tracing::debug!(?req, "admin request");
                    match handler.handle(req).await {
                        Ok(v) => Response::ok(v),
                        Err(e) => Response::err(e),
                    }
                }
                Err(e) => Response::err(format!("bad admin request: {e}")),
            }
        };
        send(&mut w, &resp).await?;
    }
}

async fn send(w: &mut tokio::net::unix::OwnedWriteHalf, resp: &Response) -> std::io::Result<()> {
    let mut out = serde_json::to_vec(resp).map_err(std::io::Error::other)?;
    out.push(b'\n');
    w.write_all(&out).await
}
