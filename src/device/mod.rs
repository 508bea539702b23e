//! The node's `BlockDevice` implementations: how each kind of volume meets the NBD server.

pub mod array;
mod holes;
pub mod journaled;
pub mod member;

pub use array::{ArrayBacking, ArrayDevice};
pub use journaled::JournaledDevice;
pub use member::MemberDevice;
