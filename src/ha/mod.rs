//! The node's side of high availability: the drivers that connect the pure pair logic
//! (`twinblock_pair`: state machine, status records, heartbeat merge, reservations) to sockets,
//! disks and timers.
//!
//! | module | holds |
//! | --- | --- |
//! | [`udp`] | the datagram heartbeat path |
//! | [`mailbox_io`] | `O_DIRECT` reads and writes of the mailbox area on the shared disks |

pub mod mailbox_io;
pub mod udp;
