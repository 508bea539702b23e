//! twinblock-nbd: an NBD server on tokio.
//!
//! Layout (one module per protocol phase, wire structs in `proto`):
//! - `device`: the `BlockDevice` trait the server is generic over;
//! - more modules follow (handshake, transmission, reply, export, extent).

pub mod device;

pub use device::{BlockDevice, DeviceCaps, DeviceError, DeviceResult, Extent, ZeroFlags};
