//! The node's side of high availability: the drivers that connect the pure pair logic
//! (`twinblock_pair`: state machine, status records, heartbeat merge, reservations) to sockets,
//! disks and timers.
//!
//! | module | holds |
//! | --- | --- |
//! | [`address_hook`] | the LAN address-takeover program run when a set's service address moves |
//! | [`admin`] | the HA admin requests (takeover, giveback, enable/disable, status) |
//! | [`controller`] | the task owning the state machine: ticks, paths, operator, actions |
//! | [`executor`] | carrying out the machine's operations on reservations and sites |
//! | [`runtime`] | the node's HA side: partner config, sites, UDP, mailbox, controller start |
//! | [`mailbox_loop`] | writing this node's slot and reading the partner's, every interval |
//! | [`fenced_member`] | the member-level fence: no member write once the reservation is lost |
//! | [`gate`] | the data path's fence: lease permit + reservation check before writes |
//! | [`generation`] | the persisted generation number, increased at every start |
//! | [`udp`] | the datagram heartbeat path |
//! | [`mailbox_io`] | `O_DIRECT` reads and writes of the mailbox area on the shared disks |
//! | [`fault`] | fault injection switches for end-to-end tests (off unless an env var is set) |

pub mod address_hook;
pub mod admin;
pub mod controller;
pub mod executor;
pub mod fault;
pub mod fenced_member;
pub mod gate;
pub mod generation;
pub mod mailbox_io;
pub mod mailbox_loop;
pub mod names;
pub mod runtime;
pub mod udp;

use std::sync::OnceLock;
use std::time::Instant;

/// Milliseconds on the process's monotonic clock (since its first use). Every HA timer, lease
/// and permit uses this one clock, so they compare directly.
pub fn now_ms() -> u64 {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    let origin = ORIGIN.get_or_init(Instant::now);
    u64::try_from(origin.elapsed().as_millis()).unwrap_or(u64::MAX)
}
