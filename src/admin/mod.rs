//! The local admin API: `twinctl` talks to `twinblockd` over a Unix socket.

pub mod client;
pub mod proto;
pub mod reply;
pub mod server;

pub use proto::{Request, Response};
pub use server::AdminHandler;
