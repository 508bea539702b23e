//! The node's `BlockDevice` implementations: how each kind of volume meets the NBD server.

mod holes;
pub mod member;

pub use member::MemberDevice;
