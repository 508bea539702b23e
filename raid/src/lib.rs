//! twinblock-raid: RAID arrays over shared disk images. Knows nothing of NBD or HA.
//!
//! Pure modules (no I/O, tested exhaustively): `layout` (address math per level), `parity`
//! (P/Q and recovery), `superblock` (on-disk format), `bitmap` (write-intent bitmap), `assemble`
//! (which member fills which slot). I/O: `io` (members), `array` (the running array).

pub mod array;
pub mod assemble;
pub mod bitmap;
pub mod io;
pub mod layout;
pub mod parity;
pub mod rowplan;
mod simd;
pub mod superblock;

pub use array::{
    Array, ArrayError, ArrayStatus, CreateOptions, MemberStatus, RebuildStatus, ScrubMode,
    ScrubReport,
};
pub use layout::Level;
pub use superblock::MemberState;
