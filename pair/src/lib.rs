//! twinblock-pair: what the two nodes of an HA pair say to each other and decide together.
//!
//! Everything here is either pure (no I/O: the node state machine, status-record and wire-frame
//! codecs, the heartbeat merge and failure detector) so it can be driven by a deterministic
//! simulator, or small and file-local (the reservation lock files, which `twinctl` also edits with
//! the daemon stopped). The node (`src/pair/`) connects these to sockets, disks and timers.
//!
//! | module | holds |
//! | --- | --- |
//! | [`state`] | the node state machine: NORMAL, TAKEOVER, STOPPED, REBOOTING; events in, actions out |
//! | [`status`] | the status record (pair, node, state, generation, sequence, flags, CRC) and its codec |
//! | [`heartbeat`] | merging status records from several paths by (generation, sequence); silence detection |
//! | [`mailbox`] | the mailbox area on the shared disks: slot layout and codec |
//! | [`reservation`] | SCSI-3-style persistent reservation lock files, one per disk |
//! | [`wire`] | the interconnect: versioned, authenticated handshake and the frames that follow it |

pub mod heartbeat;
pub mod mailbox;
pub mod reservation;
pub mod state;
pub mod status;
pub mod wire;
