//! twinblock-nbd: an NBD server on tokio, generic over a [`BlockDevice`].
//!
//! Layout, one module per protocol phase (after nbdkit's server core):
//! - [`proto`]: wire constants and message layouts, pure encode/decode;
//! - [`handshake`]: fixed-newstyle option haggling;
//! - [`transmission`]: request validation, the reader loop, per-request tasks, the reply writer;
//! - [`reply`]: simple and structured reply encoding;
//! - [`export`]: the export registry and per-export counters;
//! - [`server`]: accept loops and the per-connection task;
//! - [`buffer`]: the per-connection pool of write-payload buffers;
//! - [`device`]: the `BlockDevice` trait; [`mem`]: an in-memory device for tests and examples.
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

pub mod buffer;
pub mod device;
pub mod error;
pub mod export;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
pub mod mem;
pub mod proto;
pub mod reply;
pub mod server;
pub mod transmission;

pub use device::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, Extent, ZeroFlags};
pub use error::ConnectionError;
pub use export::{Export, ExportError, ExportInfo, ExportStatsSnapshot};
pub use server::{Server, ServerConfig};
