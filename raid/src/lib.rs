//! twinblock-raid: RAID arrays over shared disk images. Knows nothing of NBD or HA.
//!
//! Pure modules (no I/O, tested exhaustively): `layout` (address math per level), `parity`
//! (P/Q and recovery), `superblock` (on-disk format), `bitmap` (write-intent bitmap), `assemble`
//! (which member fills which slot), `rowplan` (how a write to one RAID 5/6 row is done), `rowdense`
//! (when a row is cheaper rewritten as one span per chunk),
//! `signature` (other formats found on a disk, so creation never overwrites them). I/O:
//! `array` (the running array) over `twinblock_io::Member`s.

pub mod array;
pub mod assemble;
pub mod bitmap;
pub mod layout;
pub mod parity;
pub mod ppl;
pub mod rowdense;
pub mod rowplan;
pub mod signature;
mod simd;
pub mod superblock;

pub use array::{
    Array, ArrayError, ArrayStatus, AssembleOptions, CreateOptions, MemberStatus, PartialParityLog,
    RebuildStatus, ScrubMode, ScrubReport,
};
pub use layout::Level;
pub use superblock::{JournalMark, MemberState};
