//! twinblock-nbd: an NBD server on tokio, generic over a [`BlockDevice`].
//!
//! Layout, one module per protocol phase (after nbdkit's server core):
//! - [`proto`]: wire constants and message layouts, pure encode/decode;
//! - [`handshake`]: fixed-newstyle option haggling;
//! - [`transmission`]: request validation, the reader loop, per-request tasks, the reply writer;
//! - [`reply`]: simple and structured reply encoding; `pending`: what the writer receives, and
//!   the small waiting writes it completes itself;
//! - [`export`]: the export registry and per-export counters;
//! - [`server`]: accept loops and the per-connection task;
//! - [`buffer`]: the per-connection pool of write-payload buffers;
//! - [`device`]: the `BlockDevice` trait; [`readdata`]: a read's payload as one or several
//!   shared buffers; [`mem`]: an in-memory device for tests and examples;
//! - [`access`]: client identity and per-export allow-lists; [`tls`]: TLS settings from PEM
//!   files; [`cert`]: the certificate name an allow-list matches; [`transport`]: the streams a
//!   connection runs on (TCP, Unix, TLS);
//! - [`ratelimit`]: rate-limited refusal logs; [`zeroes`]: the shared zero buffer;
//!   [`wakegate`]: a future polled only after its own wake-up (a connection's stop signal);
//!   [`metrics`]: per-export request counters and latency histograms in the Prometheus text
//!   format (`Server::metrics_text`).
//!
//! ```no_run
//! use std::sync::Arc;
//! use twinblock_nbd::{mem::MemDevice, Export, Server, ServerConfig};
//! # async fn run() -> std::io::Result<()> {
//! let server = Server::new(ServerConfig::default());
//! server
//!     .add_export(Export {
//!         name: "disk0".into(),
//!         description: "scratch disk".into(),
//!         device: Arc::new(MemDevice::new(64 << 20)),
//!     })
//!     .expect("fresh server has no exports");
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:10809").await?;
//! server.serve_tcp(listener, std::future::pending()).await
//! # }
//! ```

pub mod access;
pub mod buffer;
pub mod cert;
pub mod device;
pub mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod mem;
pub mod metrics;
mod pending;
pub mod proto;
pub mod ratelimit;
pub mod readdata;
pub mod reply;
pub mod server;
pub mod tls;
pub mod transmission;
pub mod transport;
pub mod wakegate;
pub mod zeroes;

pub use access::{Access, ClientInfo, IpNet};
pub use device::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, Extent, ZeroFlags};
pub use error::ConnectionError;
pub use export::{Export, ExportError, ExportInfo, ExportStatsSnapshot};
pub use readdata::ReadData;
pub use server::{Server, ServerConfig, MAX_REQUEST_BYTES_LIMIT};
pub use tls::{TlsError, TlsRequirement, TlsSettings};
