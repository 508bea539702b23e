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
//! # The observer's own stalls
//!
//! Silence is only evidence while this node was running to hear. A node that was not scheduled
//! (SIGSTOP, a stalled VM, CPU starvation of its runtime) has records queued in its sockets and
//! channels that it has not read yet, so the wall-clock time of its own stall says nothing about
//! the partner. The caller reports every step with [`Heartbeat::observe`]; a gap between two
//! steps longer than [`STALL_GAP_INTERVALS`] intervals is a stall of this node, and the part of
//! the gap beyond that allowance is not counted as partner silence (until the next new record
//! starts a new silence period). The partner therefore gets the rest of its silence window, after
//! this node resumes, for its queued and fresh records to arrive. Discounting (rather than
//! restarting the window) keeps a chronically late node able to take over: each late step
//! only adds its excess. The partner's lease is not discounted: it runs on the partner's clock,
//! which did not stop.
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

/// A gap between two observed steps longer than this many heartbeat intervals is a stall of this
/// node (steps come at least every half interval when it runs); the excess does not count as
/// partner silence.
pub const STALL_GAP_INTERVALS: u64 = 1;

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
    /// When [`Heartbeat::observe`] was last called.
    last_observed_ms: Option<u64>,
    /// Milliseconds of this node's own stalls since the current silence period began (the last
    /// new record, or the start): not counted as partner silence.
    stalled_ms: u64,
    /// The longest single stall seen since start, for status and logs.
    longest_stall_ms: u64,
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
            last_observed_ms: Some(now_ms),
            stalled_ms: 0,
            longest_stall_ms: 0,
        }
    }

    /// Reports that this node is running at `now_ms` (call at every step, before its event).
    /// Returns the length of the stall that just ended, if the gap since the previous call was
    /// one: longer than [`STALL_GAP_INTERVALS`] intervals. The excess of the gap over that
    /// allowance is not counted as partner silence.
    pub fn observe(&mut self, now_ms: u64) -> Option<u64> {
        let prev = self.last_observed_ms.replace(now_ms)?;
        let gap = now_ms.saturating_sub(prev);
        let allowed = self.stall_allowance_ms();
        if gap <= allowed {
            return None;
        }
        self.stalled_ms = self.stalled_ms.saturating_add(gap - allowed);
        self.longest_stall_ms = self.longest_stall_ms.max(gap);
        Some(gap)
    }

    fn stall_allowance_ms(&self) -> u64 {
        self.config.interval_ms.saturating_mul(STALL_GAP_INTERVALS)
    }

    /// Milliseconds of this node's own stalls not counted in the current silence period.
    pub fn stalled_ms(&self) -> u64 {
        self.stalled_ms
    }

    /// The longest gap between two steps since start (0: none longer than the allowance).
    pub fn longest_stall_ms(&self) -> u64 {
        self.longest_stall_ms
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
            // A new silence period begins: earlier stalls are behind the evidence.
            self.stalled_ms = 0;
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

    /// True when no path has delivered a new record for `window_ms` of time this node was
    /// running (counting from the detector's start if none ever did; this node's own stalls,
    /// see [`Heartbeat::observe`], do not count).
    pub fn silent_for(&self, now_ms: u64, window_ms: u64) -> bool {
        self.silence_ms(now_ms) >= window_ms
    }

    /// How long the partner has been silent at `now_ms`, in time this node was running: since
    /// the last new record (or the start), minus this node's own stalls since then.
    pub fn silence_ms(&self, now_ms: u64) -> u64 {
        let since = self.last_heard_ms().unwrap_or(self.started_ms);
        let since = since.max(self.started_ms);
        now_ms.saturating_sub(since).saturating_sub(self.stalled_ms)
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

    /// Steps every 50 ms from `from` to `to` (inclusive), as a running node does.
    fn run(h: &mut Heartbeat, from: u64, to: u64) {
        for t in (from..=to).step_by(50) {
            h.observe(t);
        }
    }

    #[test]
    fn own_stall_does_not_count_as_partner_silence() {
        let mut h = Heartbeat::new(HeartbeatConfig::default(), 0);
        run(&mut h, 0, 1000);
        h.receive(Path::Udp, &rec(1, 1), 1000);
        run(&mut h, 1000, 1100);
        // Not scheduled from 1100 to 2100 (SIGSTOP): the first step after it sees the gap.
        assert_eq!(h.observe(2100), Some(1000));
        assert_eq!(h.stalled_ms(), 900);
        assert!(!h.partner_silent(2100), "only 200 ms of observed silence");
        run(&mut h, 2100, 2350);
        assert!(!h.partner_silent(2350));
        // Still nothing heard: the partner is silent once 500 ms of running time passed.
        run(&mut h, 2350, 2400);
        assert!(h.partner_silent(2400));
    }

    #[test]
    fn new_record_after_a_stall_starts_a_fresh_silence_period() {
        let mut h = Heartbeat::new(HeartbeatConfig::default(), 0);
        run(&mut h, 0, 200);
        h.observe(1200);
        // The records queued during the stall are read right after it.
        assert_eq!(h.receive(Path::Udp, &rec(1, 1), 1200), Delivery::New);
        assert_eq!(h.stalled_ms(), 0);
        run(&mut h, 1200, 1650);
        assert!(!h.partner_silent(1650));
        assert!(h.partner_silent(1700));
        assert_eq!(h.longest_stall_ms(), 1000);
    }

    #[test]
    fn late_steps_within_the_allowance_count_in_full() {
        let mut h = Heartbeat::new(HeartbeatConfig::default(), 0);
        h.receive(Path::Udp, &rec(1, 1), 0);
        for t in (100..=500).step_by(100) {
            assert_eq!(h.observe(t), None, "a 100 ms gap is no stall");
        }
        assert!(h.partner_silent(500));
    }

    #[test]
    fn chronically_late_steps_only_stretch_the_window() {
        let mut h = Heartbeat::new(HeartbeatConfig::default(), 0);
        h.receive(Path::Udp, &rec(1, 1), 0);
        // Every step 150 ms late: 50 ms of each gap is discounted, 100 ms counts.
        let mut t = 0;
        while !h.partner_silent(t) {
            t += 150;
            h.observe(t);
            assert!(
                t < 2_000,
                "a chronically late node must still detect silence"
            );
        }
        assert_eq!(t, 750);
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
