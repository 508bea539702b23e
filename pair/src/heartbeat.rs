//! Merging the partner's status records from three paths into one order, and deciding silence.
//!
//! Every record goes out on every path, so the receiver sees the same record up to three times,
//! late, reordered, or (on the mailbox) over and over until the partner writes its slot again. The
//! merge keeps one high-water mark: the newest [`Stamp`] (generation, sequence) delivered by any
//! path. A record is **new** iff its stamp is greater than that mark; only new records change what
//! the node believes about its partner (its state, flags, lease).
//!
//! # What counts as hearing the partner
//!
//! Only a **new** record proves the partner alive: it was created after everything heard before,
//! so the partner was running after that. The partner counts as heard at the moment the first
//! copy of a new record arrives, on whichever path. A replayed or delayed old record proves
//! nothing (the partner may have died since), and neither does a second copy of the newest
//! record arriving late on another path, nor the same record re-read from the mailbox slot.
//!
//! For status output each path also keeps its own age: when it last delivered a record at
//! least as new as the newest known (the first copy of a record on that path). A path that only
//! ever carries copies that another path delivered first is shown working, but it never keeps
//! the partner alive on its own; cut the faster paths and its copies become the new ones.
//!
//! # Silence
//!
//! [`Heartbeat::partner_silent`] is true only when no path has delivered a new record for
//! `silence_intervals × interval_ms`: every path has been silent. Time is an input (milliseconds
//! of a monotonic clock chosen by the caller), so the module has no clock and the simulator can
//! drive it.
//!
//! Defaults: `interval_ms = 100`, `silence_intervals = 5`, so the partner is declared failed 500 ms
//! after the last record heard. The takeover then waits out the partner's lease (400 ms by
//! default, counted from the same last record, so already over) and an announcement delay of two
//! intervals (200 ms), preempts, assembles and replays (milliseconds with the NVRAM recovery path)
//! and binds the address: about 0.8 s in all, under the 2 s budget with room for slow disks. Five
//! intervals tolerate four lost datagrams in a row on every path at once, which is the seed's
//! "2 to 5 timeout periods" at its conservative end.

use crate::status::{Stamp, StatusRecord};

/// The three paths a status record travels on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Path {
    /// A UDP datagram on the public network.
    Udp,
    /// A frame on the interconnect (the NVRAM mirror link).
    Interconnect,
    /// The partner's slot in the mailbox area of the shared disks.
    Mailbox,
}

impl Path {
    /// All paths, in index order.
    pub const ALL: [Path; 3] = [Path::Udp, Path::Interconnect, Path::Mailbox];

    fn index(self) -> usize {
        match self {
            Path::Udp => 0,
            Path::Interconnect => 1,
            Path::Mailbox => 2,
        }
    }

    /// Lower-case name for status output.
    pub fn name(self) -> &'static str {
        match self {
            Path::Udp => "udp",
            Path::Interconnect => "interconnect",
            Path::Mailbox => "mailbox",
        }
    }
}

/// Default heartbeat interval.
pub const DEFAULT_INTERVAL_MS: u64 = 100;
/// Default number of silent intervals (on every path) before the partner is declared failed.
pub const DEFAULT_SILENCE_INTERVALS: u32 = 5;

/// Timer settings of the failure detector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeartbeatConfig {
    /// How often each node sends its status on every path.
    pub interval_ms: u64,
    /// k: intervals of silence on every path before the partner counts as failed (2..=5 in the
    /// seed; 5 by default).
    pub silence_intervals: u32,
}

impl Default for HeartbeatConfig {
    fn default() -> Self {
        HeartbeatConfig {
            interval_ms: DEFAULT_INTERVAL_MS,
            silence_intervals: DEFAULT_SILENCE_INTERVALS,
        }
    }
}

impl HeartbeatConfig {
    /// k × interval: how long every path must be silent.
    pub fn silence_window_ms(&self) -> u64 {
        self.interval_ms
            .saturating_mul(u64::from(self.silence_intervals))
    }
}

/// What a delivery did to the merged order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Newer than anything delivered before: the partner is heard; process it.
    New,
    /// The newest record again, first time on this path: the path works (its age is reset),
    /// but the partner is not heard again and there is nothing to process.
    Duplicate,
    /// Older than the newest, or already seen on this path: ignored entirely.
    Stale,
}

#[derive(Clone, Copy, Debug, Default)]
struct PathState {
    /// Newest stamp this path delivered while it was at least the global newest.
    mark: Option<Stamp>,
    /// When it did.
    heard_ms: Option<u64>,
    /// When anything (even stale) last arrived, for status.
    delivered_ms: Option<u64>,
}

/// The merged view of the partner's records. One per node, for its partner.
#[derive(Clone, Debug)]
pub struct Heartbeat {
    config: HeartbeatConfig,
    started_ms: u64,
    newest: Option<Stamp>,
    newest_record: Option<StatusRecord>,
    /// When the first copy of the newest record arrived.
    last_new_ms: Option<u64>,
    paths: [PathState; 3],
}

impl Heartbeat {
    /// A detector that has heard nothing yet. Silence is measured from `now_ms` until the first
    /// record, so a node that just started never declares its partner failed within its first
    /// silence window.
    pub fn new(config: HeartbeatConfig, now_ms: u64) -> Heartbeat {
        Heartbeat {
            config,
            started_ms: now_ms,
            newest: None,
            newest_record: None,
            last_new_ms: None,
            paths: [PathState::default(); 3],
        }
    }

    /// The timer settings.
    pub fn config(&self) -> HeartbeatConfig {
        self.config
    }

    /// Merges a decoded record that arrived on `path` at `now_ms`.
    pub fn receive(&mut self, path: Path, record: &StatusRecord, now_ms: u64) -> Delivery {
        let d = self.receive_stamp(path, record.stamp, now_ms);
        if d == Delivery::New {
            self.newest_record = Some(*record);
        }
        d
    }

    /// Merges the stamp of a record that could not be fully decoded because it speaks another
    /// protocol version (its frame and CRC were valid). It proves life like any record, but there
    /// is no [`StatusRecord`] to keep: [`Heartbeat::newest_record`] then still returns the last
    /// record this node understood.
    pub fn receive_stamp(&mut self, path: Path, stamp: Stamp, now_ms: u64) -> Delivery {
        let p = &mut self.paths[path.index()];
        p.delivered_ms = Some(now_ms);
        let newer_than_all = self.newest.is_none_or(|n| stamp > n);
        let at_least_newest = self.newest.is_none_or(|n| stamp >= n);
        let new_on_path = p.mark.is_none_or(|m| stamp > m);
        if !(at_least_newest && new_on_path) {
            return Delivery::Stale;
        }
        p.mark = Some(stamp);
        p.heard_ms = Some(now_ms);
        if newer_than_all {
            self.newest = Some(stamp);
            self.last_new_ms = Some(now_ms);
            Delivery::New
        } else {
            Delivery::Duplicate
        }
    }

    /// The newest stamp delivered by any path.
    pub fn newest(&self) -> Option<Stamp> {
        self.newest
    }

    /// The newest record this node could decode.
    pub fn newest_record(&self) -> Option<&StatusRecord> {
        self.newest_record.as_ref()
    }

    /// When the partner was last heard: the arrival of the first copy of its newest record
    /// (`None`: never since start). That record was created no later than this.
    pub fn last_heard_ms(&self) -> Option<u64> {
        self.last_new_ms
    }

    /// Milliseconds since `path` last delivered a record at least as new as the newest known
    /// (`None`: never). For status output; silence is decided by [`Heartbeat::partner_silent`].
    pub fn path_age_ms(&self, path: Path, now_ms: u64) -> Option<u64> {
        self.paths[path.index()]
            .heard_ms
            .map(|t| now_ms.saturating_sub(t))
    }

    /// Milliseconds since anything (even a stale record) arrived on `path`.
    pub fn path_delivery_age_ms(&self, path: Path, now_ms: u64) -> Option<u64> {
        self.paths[path.index()]
            .delivered_ms
            .map(|t| now_ms.saturating_sub(t))
    }

    /// True when the partner was heard on some path within the silence window (or the detector
    /// started less than a window ago).
    pub fn partner_heard_recently(&self, now_ms: u64) -> bool {
        !self.partner_silent(now_ms)
    }

    /// True only when no path has delivered a new record for `silence_intervals × interval_ms`
    /// (counting from the detector's start if none ever did).
    pub fn partner_silent(&self, now_ms: u64) -> bool {
        self.silent_for(now_ms, self.config.silence_window_ms())
    }

    /// True when no path has delivered a new record for `window_ms` (counting from the
    /// detector's start if none ever did).
    pub fn silent_for(&self, now_ms: u64, window_ms: u64) -> bool {
        let since = self.last_heard_ms().unwrap_or(self.started_ms);
        let since = since.max(self.started_ms);
        now_ms.saturating_sub(since) >= window_ms
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{NodeId, StatusFlags, WireState};

    fn rec(g: u64, s: u64) -> StatusRecord {
        StatusRecord {
            pair_id: [1; 16],
            node_id: NodeId::ONE,
            state: WireState::Normal,
            flags: StatusFlags::empty(),
            stamp: Stamp {
                generation: g,
                sequence: s,
            },
            partner_seen: Stamp::default(),
            lease_ms: 400,
            interval_ms: 100,
            blockers: 0,
        }
    }

    #[test]
    fn same_record_on_three_paths_is_processed_once() {
        let mut h = Heartbeat::new(HeartbeatConfig::default(), 0);
        assert_eq!(h.receive(Path::Udp, &rec(1, 1), 10), Delivery::New);
        assert_eq!(
            h.receive(Path::Interconnect, &rec(1, 1), 11),
            Delivery::Duplicate
        );
        assert_eq!(
            h.receive(Path::Mailbox, &rec(1, 1), 12),
            Delivery::Duplicate
        );
        assert_eq!(h.receive(Path::Mailbox, &rec(1, 1), 13), Delivery::Stale);
        assert_eq!(h.path_age_ms(Path::Mailbox, 20), Some(8));
    }

    #[test]
    fn lower_sequence_is_ignored_higher_generation_accepted() {
        let mut h = Heartbeat::new(HeartbeatConfig::default(), 0);
        h.receive(Path::Udp, &rec(1, 5), 1);
        assert_eq!(h.receive(Path::Udp, &rec(1, 4), 2), Delivery::Stale);
        assert_eq!(
            h.receive(Path::Interconnect, &rec(1, 4), 2),
            Delivery::Stale
        );
        assert_eq!(h.receive(Path::Udp, &rec(2, 1), 3), Delivery::New);
        assert_eq!(h.receive(Path::Udp, &rec(1, 9), 4), Delivery::Stale);
        assert_eq!(h.newest_record().map(|r| r.stamp), Some(rec(2, 1).stamp));
    }

    #[test]
    fn silent_only_when_every_path_is_silent_for_the_window() {
        let cfg = HeartbeatConfig::default();
        let mut h = Heartbeat::new(cfg, 0);
        assert!(!h.partner_silent(499), "just started");
        assert!(h.partner_silent(500));
        h.receive(Path::Mailbox, &rec(1, 1), 600);
        assert!(!h.partner_silent(1099));
        assert!(h.partner_silent(1100));
    }

    #[test]
    fn late_copy_of_the_newest_record_does_not_count_as_hearing() {
        let mut h = Heartbeat::new(HeartbeatConfig::default(), 0);
        h.receive(Path::Udp, &rec(1, 1), 0);
        assert_eq!(
            h.receive(Path::Mailbox, &rec(1, 1), 450),
            Delivery::Duplicate
        );
        assert_eq!(h.last_heard_ms(), Some(0));
        assert!(h.partner_silent(500));
        assert_eq!(h.path_age_ms(Path::Mailbox, 500), Some(50));
    }

    #[test]
    fn stale_mailbox_slot_does_not_keep_the_partner_alive() {
        let mut h = Heartbeat::new(HeartbeatConfig::default(), 0);
        h.receive(Path::Mailbox, &rec(1, 1), 0);
        for t in (100..=1000).step_by(100) {
            assert_eq!(h.receive(Path::Mailbox, &rec(1, 1), t), Delivery::Stale);
        }
        assert!(h.partner_silent(1000));
        assert_eq!(h.path_delivery_age_ms(Path::Mailbox, 1000), Some(0));
    }
}
