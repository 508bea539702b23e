//! The server handle: configuration, the export registry, accept loops for TCP and Unix
//! sockets, and the per-connection task that runs the handshake then transmission.
//!
//! `Server` is cheap to clone; every clone manages the same exports. A connection's failure is
//! logged and ends only that connection.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader, BufWriter};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

use crate::error::ConnectionError;
use crate::export::{
    ConnectionGuard, Export, ExportError, ExportInfo, ExportRegistry, ExportStatsSnapshot,
};
use crate::handshake::{self, HandshakeLimits, Outcome};
use crate::transmission::{self, REQUEST_OVERHEAD_BYTES};

/// Default largest READ/WRITE payload (the spec's interoperable maximum, 32 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 32 << 20;
/// Default in-flight budget per connection (payloads of queued and running requests).
pub const DEFAULT_MAX_INFLIGHT_BYTES: u32 = 64 << 20;
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Default largest option data accepted in the handshake.
pub const DEFAULT_MAX_OPTION_BYTES: u32 = 64 << 10;
/// Default number of options a client may send before it is considered abusive.
pub const DEFAULT_MAX_OPTIONS: u32 = 1024;
/// Read-ahead for request headers (payloads past it are read straight into their buffers).
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Buffer for handshake replies (the transmission writer batches on its own).
const WRITE_BUFFER_BYTES: usize = 16 << 10;
/// Pause after a failed `accept` (for example out of file descriptors).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload; also the advertised maximum block size (capped by the device).
    pub max_request_bytes: u32,
    /// Bytes of request payload a connection may have queued or in flight at once.
    pub max_inflight_bytes_per_connection: u32,
    /// Time a client has from connecting to entering transmission.
    pub handshake_timeout: Duration,
    pub max_option_bytes: u32,
    pub max_options: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_inflight_bytes_per_connection: DEFAULT_MAX_INFLIGHT_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_option_bytes: DEFAULT_MAX_OPTION_BYTES,
            max_options: DEFAULT_MAX_OPTIONS,
        }
    }
}

impl ServerConfig {
    /// Keeps the in-flight budget large enough for one maximal request, so a legal request can
    /// always be admitted.
    fn normalised(mut self) -> Self {
        self.max_request_bytes = self.max_request_bytes.max(4096);
        let floor = self
            .max_request_bytes
            .saturating_add(REQUEST_OVERHEAD_BYTES);
        self.max_inflight_bytes_per_connection = self.max_inflight_bytes_per_connection.max(floor);
        self
    }
}

struct Inner {
    config: ServerConfig,
    registry: ExportRegistry,
    /// Set once by `shutdown()`: every connection finishes in-flight requests and closes.
    shutdown: watch::Sender<bool>,
}

/// A handle on one NBD server. Clone it freely.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        Server {
            inner: Arc::new(Inner {
                config: config.normalised(),
                registry: ExportRegistry::default(),
                shutdown: watch::Sender::new(false),
            }),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub fn add_export(&self, export: Export) -> Result<(), ExportError> {
        info!(export = %export.name, size = export.device.size(), "export added");
        self.inner.registry.add(export)
    }

    /// Withdraws an export: new connections to it are refused (`NBD_REP_ERR_UNKNOWN`), open
    /// ones get replies to their in-flight requests and are then closed.
    pub fn remove_export(&self, name: &str) -> Result<(), ExportError> {
        self.inner.registry.remove(name)?;
        info!(export = %name, "export removed");
        Ok(())
    }

    pub fn list_exports(&self) -> Vec<ExportInfo> {
        self.inner.registry.list()
    }

    pub fn export_stats(&self, name: &str) -> Option<ExportStatsSnapshot> {
        self.inner.registry.stats(name)
    }

    /// Chooses the export a client gets when it asks for the empty name.
    pub fn set_default_export(&self, name: Option<String>) -> Result<(), ExportError> {
        self.inner.registry.set_default(name)
    }

    /// Closes every connection (after answering in-flight requests), whichever listener it
    /// came from. Accept loops stop when their own shutdown future resolves.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.shutdown.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Accepts TCP clients until `shutdown` resolves, then closes the connections it accepted
    /// (each answers its in-flight requests first) and returns.
    pub async fn serve_tcp(
        &self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let (stop_tx, _) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, peer)) => {
                        if let Err(e) = stream.set_nodelay(true) {
                            warn!(%peer, "cannot set TCP_NODELAY: {e}");
                        }
                        let server = self.clone();
                        let stop = watch_signal(&stop_tx);
                        conns.spawn(async move {
                            let (r, w) = stream.into_split();
                            let _ = server.run_connection(r, w, peer.to_string(), stop).await;
                        });
                    }
                    Err(e) => {
                        warn!("accept on TCP listener failed: {e}");
                        tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    }
                },
            }
        }
        stop_tx.send_replace(true);
        while conns.join_next().await.is_some() {}
        Ok(())
    }

    /// As [`Server::serve_tcp`], for a Unix socket.
    pub async fn serve_unix(
        &self,
        listener: UnixListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let (stop_tx, _) = watch::channel(false);
        let mut conns = JoinSet::new();
        tokio::pin!(shutdown);
        let mut next_id: u64 = 0;
        loop {
            tokio::select! {
                () = &mut shutdown => break,
                Some(_) = conns.join_next(), if !conns.is_empty() => {}
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        next_id += 1;
                        let server = self.clone();
                        let stop = watch_signal(&stop_tx);
                        let peer = format!("unix#{next_id}");
                        conns.spawn(async move {
                            let (r, w) = stream.into_split();
                            let _ = server.run_connection(r, w, peer, stop).await;
                        });
                    }
                    Err(e) => {
                        warn!("accept on Unix listener failed: {e}");
                        tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    }
                },
            }
        }
        stop_tx.send_replace(true);
        while conns.join_next().await.is_some() {}
        Ok(())
    }

    /// Serves one client on any byte stream (tests use `tokio::io::duplex`). Returns when the
    /// client disconnects, the export is removed, or the server shuts down.
    pub async fn handle_connection<S>(&self, stream: S, peer: &str) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        self.run_connection(r, w, peer.to_owned(), std::future::pending())
            .await
    }

    async fn run_connection<R, W>(
        &self,
        r: R,
        w: W,
        peer: String,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<(), ConnectionError>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let result = self.connection(r, w, &peer, stop).await;
        match &result {
            Ok(()) => debug!(%peer, "connection closed"),
            Err(e) => warn!(%peer, "connection ended: {e}"),
        }
        result
    }

    async fn connection<R, W>(
        &self,
        r: R,
        w: W,
        peer: &str,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<(), ConnectionError>
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let cfg = &self.inner.config;
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, r);
        let mut writer = BufWriter::with_capacity(WRITE_BUFFER_BYTES, w);
        let limits = HandshakeLimits {
            max_option_bytes: cfg.max_option_bytes,
            max_options: cfg.max_options,
            max_request_bytes: cfg.max_request_bytes,
        };
        let shutdown = self.shutdown_signal();
        tokio::pin!(stop);
        tokio::pin!(shutdown);
        let handshake = tokio::time::timeout(
            cfg.handshake_timeout,
            handshake::negotiate(&mut reader, &mut writer, &self.inner.registry, limits),
        );
        let outcome = tokio::select! {
            r = handshake => r.map_err(|_| ConnectionError::HandshakeTimeout(cfg.handshake_timeout))??,
            () = &mut stop => return Ok(()),
            () = &mut shutdown => return Ok(()),
        };
        let negotiated = match outcome {
            Outcome::Aborted => return Ok(()),
            Outcome::Transmission(n) => n,
        };
        let entry = Arc::clone(&negotiated.entry);
        info!(
            %peer,
            export = %entry.export.name,
            structured = negotiated.structured,
            block_status = negotiated.meta_context.is_some(),
            "client entered transmission"
        );
        let _guard = ConnectionGuard::new(Arc::clone(&entry));
        let removed = entry.removed();
        let any_stop = async move {
            tokio::select! {
                () = stop => {}
                () = shutdown => {}
                () = removed => {}
            }
        };
        // Every option reply was flushed, so the handshake's write buffer is empty; the
        // transmission writer batches on its own.
        transmission::run(
            &mut reader,
            writer.into_inner(),
            negotiated,
            cfg.max_inflight_bytes_per_connection,
            any_stop,
        )
        .await?;
        Ok(())
    }
}

fn watch_signal(tx: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = tx.subscribe();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}
