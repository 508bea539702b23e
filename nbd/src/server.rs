//! The server handle: configuration, the export registry, accept loops for TCP and Unix
//! sockets, and the per-connection task that runs the handshake (with its optional switch to
//! TLS) then transmission.
//!
//! `Server` is cheap to clone; every clone manages the same exports. A connection's failure is
//! logged (rate-limited) and ends only that connection. Two server-wide bounds protect the node:
//! a connection limit (clients over it are refused during the handshake) and a shutdown grace
//! period (connections that do not finish in it, for example because their client stopped
//! reading, are closed, so a node's shutdown never hangs on a client).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::access::{Access, ClientInfo};
use crate::error::ConnectionError;
use crate::export::{
    ConnectionGuard, Export, ExportError, ExportInfo, ExportRegistry, ExportStatsSnapshot,
};
use crate::handshake::{self, HandshakeLimits, Negotiated, Outcome, Policy, Refusal};
use crate::proto::NBD_REP_ERR_POLICY;
use crate::ratelimit::RefusalLogs;
use crate::tls::TlsSettings;
use crate::transmission::{self, ConnectionLimits, REQUEST_OVERHEAD_BYTES};
use crate::transport::{AnyStream, Transport};
use crate::wakegate::WakeGated;

/// Default largest READ/WRITE payload (the spec's interoperable maximum, 32 MiB).
pub const DEFAULT_MAX_REQUEST_BYTES: u32 = 32 << 20;
/// Largest READ/WRITE payload the server can be configured for. Each connection's in-flight
/// budget must hold at least one such request, so this bounds per-connection memory.
pub const MAX_REQUEST_BYTES_LIMIT: u32 = 64 << 20;
/// Smallest `max_request_bytes` (the spec's floor for an advertised maximum).
pub const MIN_REQUEST_BYTES_LIMIT: u32 = 4096;
/// Default in-flight budget per connection (payloads of queued and running requests).
pub const DEFAULT_MAX_INFLIGHT_BYTES: u32 = 64 << 20;
/// Default number of clients served at once (handshaking or transmitting), over all listeners.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 256;
/// Default time a shutting-down server waits for connections to answer their in-flight
/// requests before closing them.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshake time left to a client refused for the connection limit (enough to read the
/// refusal; short so refused clients do not pile up).
const REFUSED_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
/// Default largest option data accepted in the handshake.
pub const DEFAULT_MAX_OPTION_BYTES: u32 = 64 << 10;
/// Default number of options a client may send before it is considered abusive.
pub const DEFAULT_MAX_OPTIONS: u32 = 1024;
/// Read-ahead for option and request headers (payloads past it are read straight into their
/// buffers).
const READ_BUFFER_BYTES: usize = 64 << 10;
/// Pause after a failed `accept` (for example out of file descriptors).
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Extra time an accept loop gives its connections after the grace period before aborting
/// their tasks (each connection already closes itself at the end of the grace period).
const SHUTDOWN_ABORT_MARGIN: Duration = Duration::from_secs(1);
/// What a client over the connection limit is told.
const MSG_TOO_MANY_CONNECTIONS: &str = "server is at its connection limit; try again later";

#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest READ/WRITE payload; also the advertised maximum block size (capped by the
    /// device). Clamped to `MIN_REQUEST_BYTES_LIMIT ..= MAX_REQUEST_BYTES_LIMIT`.
    pub max_request_bytes: u32,
    /// Bytes of request payload (and other per-request memory) a connection may have queued or
    /// in flight at once. Raised to hold at least one maximal request.
    pub max_inflight_bytes_per_connection: u32,
    /// Time a client has from connecting to entering transmission.
    pub handshake_timeout: Duration,
    pub max_option_bytes: u32,
    pub max_options: u32,
    /// Clients served at once over all listeners; at least 1.
    pub max_connections: u32,
    /// How long shutdown waits for in-flight requests before closing connections.
    pub shutdown_grace: Duration,
    /// `None`: no TLS (`NBD_OPT_STARTTLS` is refused).
    pub tls: Option<TlsSettings>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_request_bytes: DEFAULT_MAX_REQUEST_BYTES,
            max_inflight_bytes_per_connection: DEFAULT_MAX_INFLIGHT_BYTES,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
            max_option_bytes: DEFAULT_MAX_OPTION_BYTES,
            max_options: DEFAULT_MAX_OPTIONS,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
            tls: None,
        }
    }
}

impl ServerConfig {
    /// Clamps the request size into its supported range and keeps the in-flight budget large
    /// enough for one maximal request, so a legal request can always be admitted.
    fn normalised(mut self) -> Self {
        self.max_request_bytes = self
            .max_request_bytes
            .clamp(MIN_REQUEST_BYTES_LIMIT, MAX_REQUEST_BYTES_LIMIT);
        let floor = self
            .max_request_bytes
            .saturating_add(REQUEST_OVERHEAD_BYTES);
        self.max_inflight_bytes_per_connection = self.max_inflight_bytes_per_connection.max(floor);
        self.max_connections = self.max_connections.max(1);
        self
    }
}

struct Inner {
    config: ServerConfig,
    registry: ExportRegistry,
    /// Set once by `shutdown()`: every connection finishes in-flight requests and closes.
    shutdown: watch::Sender<bool>,
    /// Connections counted against `max_connections`.
    connections: AtomicU32,
    /// Clients refused because the server was at `max_connections`.
    refused_over_limit: AtomicU64,
    logs: Arc<RefusalLogs>,
}

/// A handle on one NBD server. Clone it freely.
#[derive(Clone)]
pub struct Server {
    inner: Arc<Inner>,
}

/// Holds one of the server's connection slots; gives it back when dropped.
struct ConnectionSlot(Arc<Inner>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Server {
    pub fn new(config: ServerConfig) -> Self {
        Server {
            inner: Arc::new(Inner {
                config: config.normalised(),
                registry: ExportRegistry::default(),
                shutdown: watch::Sender::new(false),
                connections: AtomicU32::new(0),
                refused_over_limit: AtomicU64::new(0),
                logs: Arc::new(RefusalLogs::default()),
            }),
        }
    }

    pub fn config(&self) -> &ServerConfig {
        &self.inner.config
    }

    pub fn add_export(&self, export: Export) -> Result<(), ExportError> {
        self.add_export_with_access(export, Access::default())
    }

    /// Adds an export that only the clients `access` admits may use (others get
    /// `NBD_REP_ERR_POLICY` and do not see it in `NBD_OPT_LIST`).
    pub fn add_export_with_access(
        &self,
        export: Export,
        access: Access,
    ) -> Result<(), ExportError> {
        info!(export = %export.name, size = export.device.size(), "export added");
        self.inner.registry.add_with_access(export, access)
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

    /// Connections currently counted against the connection limit.
    pub fn active_connections(&self) -> u32 {
        self.inner.connections.load(Ordering::Acquire)
    }

    /// The server's metrics in the Prometheus text format: clients, per-export connections, and
    /// per export and command the requests, bytes, errors and a latency histogram.
    pub fn metrics_text(&self) -> String {
        let entries = self.inner.registry.entries();
        let snapshots: Vec<_> = entries.iter().map(|e| e.stats.snapshot()).collect();
        let samples: Vec<_> = entries
            .iter()
            .zip(&snapshots)
            .map(|(e, s)| crate::metrics::ExportSample {
                name: &e.export.name,
                connections_active: s.connections_active,
                connections_total: s.connections_total,
                metrics: &e.stats.commands,
            })
            .collect();
        crate::metrics::render(
            crate::metrics::ServerGauges {
                clients: self.active_connections(),
                max_clients: self.inner.config.max_connections,
                refused_over_limit: self.inner.refused_over_limit.load(Ordering::Relaxed),
            },
            &samples,
        )
    }

    /// Closes every connection (after answering in-flight requests, for at most the shutdown
    /// grace period), whichever listener it came from. Accept loops stop when their own
    /// shutdown future resolves.
    pub fn shutdown(&self) {
        self.inner.shutdown.send_replace(true);
    }

    fn shutdown_signal(&self) -> impl Future<Output = ()> + Send + 'static {
        watch_signal(&self.inner.shutdown)
    }

    /// Takes a connection slot, or `None` when the server is at its limit.
    fn admit(&self) -> Option<ConnectionSlot> {
        let max = self.inner.config.max_connections;
        self.inner
            .connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| ConnectionSlot(Arc::clone(&self.inner)))
    }

    /// Accepts TCP clients until `shutdown` resolves, then closes the connections it accepted
    /// (each answers its in-flight requests first, for at most the shutdown grace period) and
    /// returns.
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
                            debug!(%peer, "cannot set TCP_NODELAY: {e}");
                        }
                        let server = self.clone();
                        let stop = watch_signal(&stop_tx);
                        conns.spawn(async move {
                            let _ = server.run_connection(stream, tcp_client(peer), stop).await;
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
        self.drain(conns).await;
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
                        let client = ClientInfo {
                            peer: format!("unix#{next_id}"),
                            ..ClientInfo::default()
                        };
                        conns.spawn(async move {
                            let _ = server.run_connection(stream, client, stop).await;
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
        self.drain(conns).await;
        Ok(())
    }

    /// Waits for stopped connections to finish; each closes itself once the grace period is
    /// over, and any task still running shortly after that is aborted.
    async fn drain(&self, mut conns: JoinSet<()>) {
        let bound = self.inner.config.shutdown_grace + SHUTDOWN_ABORT_MARGIN;
        let all = async { while conns.join_next().await.is_some() {} };
        if tokio::time::timeout(bound, all).await.is_err() {
            warn!(
                connections = conns.len(),
                "connections still open {bound:?} after shutdown; closing them"
            );
            conns.shutdown().await;
        }
    }

    /// Serves one client on any byte stream (tests use `tokio::io::duplex`). Returns when the
    /// client disconnects, the export is removed, or the server shuts down.
    pub async fn handle_connection<S>(&self, stream: S, peer: &str) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let client = ClientInfo {
            peer: peer.to_owned(),
            ..ClientInfo::default()
        };
        self.handle_connection_from(stream, client).await
    }

    /// As [`Server::handle_connection`], for a client whose address is known (allow-lists
    /// match on `client.ip`).
    pub async fn handle_connection_from<S>(
        &self,
        stream: S,
        client: ClientInfo,
    ) -> Result<(), ConnectionError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        self.run_connection(AnyStream(stream), client, std::future::pending())
            .await
    }

    async fn run_connection<S: Transport>(
        &self,
        stream: S,
        client: ClientInfo,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<(), ConnectionError> {
        let slot = self.admit();
        let refusal = if slot.is_none() {
            self.inner
                .refused_over_limit
                .fetch_add(1, Ordering::Relaxed);
            if let Some(suppressed) = self.inner.logs.connections.check() {
                warn!(
                    peer = %client.peer,
                    limit = self.inner.config.max_connections,
                    suppressed,
                    "connection refused: the server already serves its maximum number of \
                     clients (nbd.max_connections)"
                );
            }
            Some(Refusal {
                reply: NBD_REP_ERR_POLICY,
                message: MSG_TOO_MANY_CONNECTIONS,
            })
        } else {
            None
        };
        let peer = client.peer.clone();
        let result = self.connection(stream, client, refusal, stop).await;
        drop(slot);
        match &result {
            Ok(()) => debug!(%peer, "connection closed"),
            Err(e) => {
                if let Some(suppressed) = self.inner.logs.connections.check() {
                    warn!(%peer, suppressed, "connection ended: {e}");
                }
            }
        }
        result
    }

    async fn connection<S: Transport>(
        &self,
        stream: S,
        mut client: ClientInfo,
        refusal: Option<Refusal>,
        stop: impl Future<Output = ()> + Send,
    ) -> Result<(), ConnectionError> {
        let cfg = &self.inner.config;
        let timeout = match refusal {
            Some(_) => cfg.handshake_timeout.min(REFUSED_HANDSHAKE_TIMEOUT),
            None => cfg.handshake_timeout,
        };
        let deadline = Instant::now() + timeout;
        let shutdown = self.shutdown_signal();
        let stop_all = async move {
            tokio::select! {
                () = stop => {}
                () = shutdown => {}
            }
        };
        tokio::pin!(stop_all);
        let mut stop_all: Pin<&mut _> = stop_all;
        let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
        let Some(flags) = handshake_step(handshake::greet(&mut reader), deadline, timeout)
            .run(stop_all.as_mut())
            .await?
        else {
            return Ok(());
        };
        let mut options_left = cfg.max_options;
        let outcome = {
            let policy = self.policy(&client, refusal);
            handshake_step(
                handshake::negotiate(&mut reader, &policy, flags, &mut options_left),
                deadline,
                timeout,
            )
            .run(stop_all.as_mut())
            .await?
        };
        match outcome {
            None | Some(Outcome::Aborted) => Ok(()),
            Some(Outcome::Transmission(n)) => self.transmit(reader, n, &client, stop_all).await,
            Some(Outcome::StartTls) => {
                let Some(tls) = &cfg.tls else {
                    return Err(ConnectionError::TlsHandshake(std::io::Error::other(
                        "STARTTLS acknowledged without TLS settings",
                    )));
                };
                let pending = reader.buffer().len();
                if pending > 0 {
                    return Err(ConnectionError::DataBeforeTls(pending));
                }
                let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.config));
                let stream = reader.into_inner();
                let accept = async move {
                    acceptor
                        .accept(stream)
                        .await
                        .map_err(ConnectionError::TlsHandshake)
                };
                let Some(stream) = handshake_step(accept, deadline, timeout)
                    .run(stop_all.as_mut())
                    .await?
                else {
                    return Ok(());
                };
                client.tls = true;
                client.cert_name = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|chain| chain.first())
                    .and_then(|c| crate::cert::subject_common_name(c));
                debug!(peer = %client.peer, cert = ?client.cert_name, "TLS established");
                let mut reader = BufReader::with_capacity(READ_BUFFER_BYTES, stream);
                let policy = self.policy(&client, refusal);
                let outcome = handshake_step(
                    handshake::negotiate(&mut reader, &policy, flags, &mut options_left),
                    deadline,
                    timeout,
                )
                .run(stop_all.as_mut())
                .await?;
                match outcome {
                    None | Some(Outcome::Aborted) => Ok(()),
                    Some(Outcome::Transmission(n)) => {
                        self.transmit(reader, n, &client, stop_all).await
                    }
                    // The handshake answers a second STARTTLS with an error, never with this.
                    Some(Outcome::StartTls) => Err(ConnectionError::TlsHandshake(
                        std::io::Error::other("second STARTTLS"),
                    )),
                }
            }
        }
    }

    fn policy<'a>(&'a self, client: &'a ClientInfo, refusal: Option<Refusal>) -> Policy<'a> {
        let cfg = &self.inner.config;
        Policy {
            registry: &self.inner.registry,
            limits: HandshakeLimits {
                max_option_bytes: cfg.max_option_bytes,
                max_options: cfg.max_options,
                max_request_bytes: cfg.max_request_bytes,
            },
            client,
            tls: cfg.tls.as_ref().map(|t| t.requirement),
            refusal,
            logs: &self.inner.logs,
        }
    }

    /// Runs the transmission phase on the negotiated stream until the client leaves, the
    /// export is removed or the server stops.
    async fn transmit<S: Transport, F: Future<Output = ()>>(
        &self,
        reader: BufReader<S>,
        negotiated: Negotiated,
        client: &ClientInfo,
        stop: Pin<&mut F>,
    ) -> Result<(), ConnectionError> {
        let entry = Arc::clone(&negotiated.entry);
        info!(
            peer = %client.peer,
            export = %entry.export.name,
            tls = client.tls,
            structured = negotiated.structured,
            block_status = negotiated.meta_context.is_some(),
            "client entered transmission"
        );
        let _guard = ConnectionGuard::new(Arc::clone(&entry));
        let removed = entry.removed();
        // Gated: the transmission phase polls this beside its reader on every wake-up, and
        // it completes at most once (see `wakegate`).
        let any_stop = WakeGated::new(async move {
            tokio::select! {
                () = stop => {}
                () = removed => {}
            }
        });
        // Bytes read ahead with the last option (a client may pipeline its first requests) are
        // replayed in front of the read half.
        let leftover = reader.buffer().to_vec();
        let (r, w) = reader.into_inner().into_halves();
        let mut reader =
            BufReader::with_capacity(READ_BUFFER_BYTES, std::io::Cursor::new(leftover).chain(r));
        let cfg = &self.inner.config;
        transmission::run(
            &mut reader,
            w,
            negotiated,
            ConnectionLimits {
                max_inflight_bytes: cfg.max_inflight_bytes_per_connection,
                shutdown_grace: cfg.shutdown_grace,
            },
            Arc::clone(&self.inner.logs),
            any_stop,
        )
        .await?;
        Ok(())
    }
}

/// One handshake step bounded by the handshake deadline; `run` also ends it (with `None`) when
/// the connection is told to stop.
struct HandshakeStep<Fut> {
    fut: Fut,
    deadline: Instant,
    timeout: Duration,
}

fn handshake_step<Fut>(fut: Fut, deadline: Instant, timeout: Duration) -> HandshakeStep<Fut> {
    HandshakeStep {
        fut,
        deadline,
        timeout,
    }
}

impl<T, Fut: Future<Output = Result<T, ConnectionError>>> HandshakeStep<Fut> {
    async fn run<F: Future<Output = ()>>(
        self,
        stop: Pin<&mut F>,
    ) -> Result<Option<T>, ConnectionError> {
        tokio::select! {
            r = tokio::time::timeout_at(self.deadline, self.fut) => {
                r.map_err(|_| ConnectionError::HandshakeTimeout(self.timeout))?.map(Some)
            }
            () = stop => Ok(None),
        }
    }
}

fn tcp_client(peer: SocketAddr) -> ClientInfo {
    ClientInfo {
        peer: peer.to_string(),
        ip: Some(peer.ip()),
        ..ClientInfo::default()
    }
}

fn watch_signal(tx: &watch::Sender<bool>) -> impl Future<Output = ()> + Send + 'static {
    let mut rx = tx.subscribe();
    async move {
        let _ = rx.wait_for(|s| *s).await;
    }
}
