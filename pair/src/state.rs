//! The node state machine of the HA pair: pure code, events in, actions out.
//!
//! [`Node`] holds everything one node decides about the pair: its state, the merged view of its
//! partner's status records ([`Heartbeat`]), its own lease, which disk sets it holds and serves,
//! and why it would refuse a takeover. The node's drivers (UDP, interconnect, mailbox I/O,
//! reservation calls, array assembly, journal replay, export) feed it [`Event`]s and carry out the
//! [`Action`]s it returns. It never reads a clock: every call takes `now_ms`, the caller's
//! monotonic milliseconds. So the same code runs in the daemon and in the deterministic simulator
//! (`pair/tests/simulation.rs`).
//!
//! # API
//!
//! * [`Node::new`] at process start, with the persisted generation (already increased for this
//!   start) and whether the reservation files say this node holds its partner's disks.
//! * [`Node::step`] for every [`Event`]; call it with [`Event::Tick`] at least every
//!   `interval_ms / 2`.
//! * [`Node::operator`] for `twinctl takeover | giveback | takeover-disable | takeover-enable |
//!   stop`; a refusal names its reasons.
//! * [`Node::may_write`] before every member write: true only while this node holds the set's
//!   reservation and its lease is fresh.
//! * [`Node::view`] for `twinctl status` ([`Node::state`], [`Node::takeover_blockers`],
//!   [`Node::holds`], [`Node::serving`] for single facts).
//!
//! Every [`Action::Start`] is answered by exactly one [`Event::Completed`] for the same [`Op`]
//! (completions for an op the node no longer waits for are ignored). [`Action::Fence`] needs no
//! answer: it must stop the set's exports and drop its client connections at once, and cancel any
//! operation on that set still in flight.
//!
//! # States and transitions
//!
//! | state (wire) | holds / serves | event or condition | next | actions |
//! | --- | --- | --- | --- | --- |
//! | Rebooting: listening (REBOOTING) | nothing | partner heard in TAKEOVER or holding our disks | waiting for giveback | status with WAITING_FOR_GIVEBACK |
//! | Rebooting: listening | nothing | own lease fresh, and partner heard (not in TAKEOVER) or silence window over | bringing up own | Reserve, Assemble, Replay, Serve (own) |
//! | Rebooting: bringing up own | own | Reserve answered HeldByPartner | waiting for giveback | |
//! | Rebooting: bringing up own | own | all done, not holding partner's disks | NORMAL | |
//! | Rebooting: bringing up own | own | all done, holding partner's disks since before the restart | TAKEOVER: resuming | Assemble, Replay, Serve (partner) |
//! | Rebooting: waiting for giveback | nothing | partner's newer record no longer holds our disks, or retry timer | bringing up own | Reserve (own) ... |
//! | NORMAL | own | partner silent on every path for k × interval (the longer of the two nodes' intervals) and no [`TakeoverBlocked`] reason | TAKEOVER: announced | status TAKEOVER on every path |
//! | TAKEOVER: announced | own | any blocker appears (partner heard, disabled, mirror out of sync, version) | NORMAL | status NORMAL |
//! | TAKEOVER: announced | own | partner's lease (+ margin) and the announce delay waited out, and a mailbox read at or after that time succeeded showing nothing newer | TAKEOVER: taking over | Preempt, Assemble, Replay, Serve (partner) |
//! | TAKEOVER: taking over | own + partner | an op fails | NORMAL (attempt failed) | Preempt failed: nothing; later: StopServing, Release (partner) |
//! | TAKEOVER: taking over | own + partner | all done | TAKEOVER | |
//! | TAKEOVER | own + partner | operator giveback, or auto giveback and partner waits for giveback | GIVEBACK | Checkpoint, StopServing, Release (partner) |
//! | GIVEBACK (TAKEOVER) | own + partner | all done | NORMAL, giveback pending | status NORMAL |
//! | GIVEBACK | own + partner | Checkpoint fails | TAKEOVER (no more auto giveback; the operator retries) | |
//! | GIVEBACK | own + partner | StopServing fails (final CP or the partner's log fence failed: arrays left unfenced) | TAKEOVER: resuming, reason kept in `last_error` (no more auto giveback) | Assemble, Replay, Serve (partner); no Release |
//! | TAKEOVER: resuming after a failed giveback | own + partner | an op fails | TAKEOVER, the partner's volumes unserved but still reserved (operator needed) | |
//! | GIVEBACK | own + partner | Release fails | GIVEBACK | the same op again after `retry_ms` |
//! | any | any | reservation conflict on a set, or partner's newer record holds our disks | own lost: waiting for giveback; partner lost: NORMAL | Fence (set) |
//! | any | any | operator stop | STOPPED | Fence (every served set) |
//!
//! "Giveback pending" blocks takeover until the partner reports NORMAL, so a crash-looping partner
//! is not seized on every crash; auto giveback is also suppressed for a takeover that starts within
//! `auto_giveback_holdoff_ms` of the previous auto giveback, so the disks stay put until an operator
//! looks. A node that has taken over holds the disks until a giveback, whatever its partner says.
//!
//! # Why the takeover waits the way it does
//!
//! A node writes its disks only while its lease is fresh: within `lease_ms` of creating a status
//! record whose mailbox write then succeeded ([`Event::MailboxWritten`]). The survivor preempts
//! only after `last heard + max(partner's lease, own lease) + lease_margin_ms`, and only after a
//! mailbox read at or after that moment succeeded without a newer record. Any record whose mailbox
//! write completed before that read is in the slot, so it is not newer than the newest record
//! heard, so it was created before the survivor last heard the partner: its lease has run out. A
//! partner that cannot write the mailbox cannot renew its lease; a survivor that cannot read the
//! mailbox cannot take over ([`TakeoverBlocked::MailboxUnreadable`]).
//!
//! One deliberate difference from the seed: a live node that receives a TAKEOVER announcement
//! does not stop writing. If it is really alive, its own records make the announcer abort (the
//! announcer needs silence on every path and a quiet mailbox); if the announcer nevertheless
//! preempts, the reservation check in the write path and the lease fence it. Stopping on the
//! announcement alone would let a one-way network fault stop both nodes.

use crate::heartbeat::{Delivery, Heartbeat, HeartbeatConfig, Path};
use crate::status::{
    ForeignRecord, NodeId, Stamp, StatusFlags, StatusRecord, TakeoverBlocked, WireState,
};
use std::collections::VecDeque;
use thiserror::Error;

/// Default lease: four intervals, so three slow or lost mailbox writes in a row do not stall I/O.
/// Shorter than the default silence window, so waiting it out adds nothing to a takeover.
pub const DEFAULT_LEASE_MS: u64 = 400;
/// Default allowance for clock-rate difference between the nodes and in-flight I/O latency.
pub const DEFAULT_LEASE_MARGIN_MS: u64 = 50;
/// Default number of intervals between announcing TAKEOVER and preempting.
pub const DEFAULT_ANNOUNCE_WAIT_INTERVALS: u32 = 2;
/// Default: a takeover within a minute of the last auto giveback gets no auto giveback.
pub const DEFAULT_AUTO_GIVEBACK_HOLDOFF_MS: u64 = 60_000;
/// Default delay before retrying a failed reservation, release or bring-up.
pub const DEFAULT_RETRY_MS: u64 = 1_000;
/// Blockers an operator takeover overrides (and that therefore do not abort one under way).
/// Never-heard is among them: an operator may take over a partner that was already dead when
/// this node started (its mirror must still be in sync, and its lease is taken to be ours).
const OPERATOR_OVERRIDES: u32 = (1 << TakeoverBlocked::GivebackPending as u32)
    | (1 << TakeoverBlocked::PreviousAttemptFailed as u32)
    | (1 << TakeoverBlocked::PartnerNeverHeard as u32);
/// How many recently sent records' creation times are remembered to anchor the lease.
const SENT_MEMORY: usize = 16;

/// Which node's disks (and the arrays and volumes on them) an operation is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DiskSet {
    /// This node's own disks.
    Own,
    /// The partner's disks.
    Partner,
}

/// A long-running operation the driver carries out and answers with [`Event::Completed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// Register this node's key and reserve the set (write exclusive, registrants only); a no-op
    /// success if already held. Answer [`Outcome::HeldByPartner`] if the partner holds it.
    Reserve(DiskSet),
    /// Preempt the partner's reservation of the set (removes its key, takes the reservation).
    Preempt(DiskSet),
    /// Assemble the set's arrays from their superblocks.
    Assemble(DiskSet),
    /// Bring up the set's journaled volumes from NVRAM (own region for [`DiskSet::Own`], the
    /// partner region for [`DiskSet::Partner`]), replaying unapplied records.
    Replay(DiskSet),
    /// Export the set's volumes (the partner's on the partner's service address).
    Serve(DiskSet),
    /// Apply the set's journal to its arrays (a consistency point) and make it durable.
    Checkpoint(DiskSet),
    /// Stop exporting the set's volumes and close its arrays.
    StopServing(DiskSet),
    /// Release the set's reservation.
    Release(DiskSet),
}

/// How an [`Op`] ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// It worked.
    Done,
    /// A reservation is held by the partner (only for [`Op::Reserve`]).
    HeldByPartner,
    /// It failed; the text says why (shown in status).
    Failed(String),
}

/// What the node tells the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Time passed. Send at least every `interval_ms / 2`.
    Tick,
    /// A status record (already checked by `status::decode_for`) arrived on a path. For the
    /// mailbox path, send it after every successful slot read, changed or not.
    Status {
        /// The path it arrived on.
        path: Path,
        /// The record.
        record: StatusRecord,
    },
    /// A valid record of another protocol version arrived (`StatusError::VersionMismatch`).
    ForeignStatus {
        /// The path it arrived on.
        path: Path,
        /// Its invariant frame.
        record: ForeignRecord,
    },
    /// A read of the partner's mailbox slot finished: `ok` if at least one mailbox disk yielded a
    /// valid slot or a never-written (all-zero) one; send its record as [`Event::Status`] first.
    /// A takeover preempts only after such a read that *started* at or after its lease
    /// deadline: a read started earlier may have missed a record written just after it began,
    /// however late its result is delivered (a stalled node delivers it late).
    MailboxRead {
        /// Whether the read succeeded.
        ok: bool,
        /// When the read began, on the caller's monotonic clock (a time after the step's
        /// `now_ms` is taken as `now_ms`).
        started_ms: u64,
    },
    /// The mailbox write of the record with `stamp` finished: `ok` only if it reached every
    /// mailbox disk in use. Renews the lease.
    MailboxWritten {
        /// The record written.
        stamp: Stamp,
        /// Whether every mailbox disk took it.
        ok: bool,
    },
    /// The NVRAM mirror's sync state changed (or is reported again): whether this node's copy
    /// of the partner's journal is complete enough to take the partner over. Until the driver
    /// reports [`Event::OutgoingMirrorSync`] it is also what the status record's
    /// MIRROR_IN_SYNC flag says.
    MirrorSync {
        /// In sync with the partner.
        in_sync: bool,
    },
    /// Whether this node's own journals are mirrored in sync into the partner (the NVRAM
    /// mirror's view). Sent to the partner as the MIRROR_IN_SYNC flag: the partner may take this
    /// node over only while it is set. Separate from [`Event::MirrorSync`] because a dead
    /// partner takes this node's outgoing mirror out of sync, which must not block taking it
    /// over.
    OutgoingMirrorSync {
        /// This node's journals are in sync in the partner's copies.
        in_sync: bool,
    },
    /// An [`Action::Start`]ed operation finished.
    Completed {
        /// The operation.
        op: Op,
        /// How it ended.
        outcome: Outcome,
    },
    /// A member write of the set was refused because another node holds the reservation.
    ReservationConflict {
        /// The set the refused write belonged to.
        set: DiskSet,
    },
}

/// What the state machine asks the node to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this record on every path: UDP, interconnect, and this node's mailbox slot (then
    /// report [`Event::MailboxWritten`]).
    SendStatus(StatusRecord),
    /// Start an operation; answer with [`Event::Completed`].
    Start(Op),
    /// Stop serving the set now (exports down, client connections dropped, in-flight operations
    /// on it cancelled): this node no longer holds it. No answer.
    Fence(DiskSet),
}

/// Operator commands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Take the partner over now (it must be silent on every path).
    Takeover,
    /// Give the partner's disks back.
    Giveback,
    /// Disable takeover (in both directions: the partner sees the flag).
    DisableTakeover,
    /// Enable takeover again.
    EnableTakeover,
    /// Stop serving everything and enter STOPPED (before the process exits).
    Stop,
}

/// Why an operator command was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum CommandRefused {
    /// Takeover not possible now.
    #[error("takeover refused: {}", describe_all(.0))]
    TakeoverBlocked(Vec<TakeoverBlocked>),
    /// Giveback needs this node to be in TAKEOVER, holding the partner's disks.
    #[error("giveback refused: this node is {0:?}, not in TAKEOVER holding the partner's disks")]
    NotInTakeover(NodeState),
    /// The node is stopped.
    #[error("refused: this node is STOPPED; restart it")]
    Stopped,
}

fn describe_all(reasons: &[TakeoverBlocked]) -> String {
    let v: Vec<&str> = reasons.iter().map(|r| r.describe()).collect();
    v.join("; ")
}

/// Configuration of the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// The pair's id (records of other pairs are ignored).
    pub pair_id: [u8; 16],
    /// This node's id.
    pub node_id: NodeId,
    /// Heartbeat interval and silence window.
    pub heartbeat: HeartbeatConfig,
    /// This node's lease.
    pub lease_ms: u64,
    /// Added to the partner's lease before preempting (clock rate difference, I/O in flight).
    pub lease_margin_ms: u64,
    /// Intervals between announcing TAKEOVER and preempting, so a live partner can answer.
    pub announce_wait_intervals: u32,
    /// Give back automatically when the recovered partner reports it waits for giveback.
    pub auto_giveback: bool,
    /// No auto giveback for a takeover starting this soon after the previous auto giveback.
    pub auto_giveback_holdoff_ms: u64,
    /// Delay before retrying a failed reserve, release or bring-up.
    pub retry_ms: u64,
}

impl Config {
    /// Defaults for `node_id` of pair `pair_id`.
    pub fn new(pair_id: [u8; 16], node_id: NodeId) -> Config {
        Config {
            pair_id,
            node_id,
            heartbeat: HeartbeatConfig::default(),
            lease_ms: DEFAULT_LEASE_MS,
            lease_margin_ms: DEFAULT_LEASE_MARGIN_MS,
            announce_wait_intervals: DEFAULT_ANNOUNCE_WAIT_INTERVALS,
            auto_giveback: false,
            auto_giveback_holdoff_ms: DEFAULT_AUTO_GIVEBACK_HOLDOFF_MS,
            retry_ms: DEFAULT_RETRY_MS,
        }
    }
}

/// What the node was told at start, read from persistent state before the first step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Boot {
    /// This start's generation: persisted (and made durable) before the first step, strictly
    /// greater than any earlier start's. A node that reuses an old generation is ignored by its
    /// partner as stale and may be taken over (the reservations then fence it).
    pub generation: u64,
    /// The partner's disks' reservations are held by this node (it was in TAKEOVER when it
    /// stopped): it resumes the takeover after bringing up its own disks.
    pub holds_partner_disks: bool,
}

/// The node's state as shown to operators (finer than [`WireState`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum NodeState {
    /// Starting: listening to the partner, or bringing up its own disks.
    Rebooting,
    /// Starting, found its disks held by the partner: waits for giveback, seizes nothing.
    WaitingForGiveback,
    /// Serving its own disks.
    Normal,
    /// Announced TAKEOVER, or taking the partner's disks (not yet serving them).
    TakingOver,
    /// Serving both sets.
    Takeover,
    /// Giving the partner's disks back.
    GivingBack,
    /// Stopped.
    Stopped,
}

/// A sequence of operations run one after the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chain {
    BringUpOwn,
    ResumePartner,
    TakeOver,
    Backout,
    GiveBack,
}

impl Chain {
    fn ops(self) -> &'static [Op] {
        use DiskSet::{Own, Partner};
        match self {
            Chain::BringUpOwn => &[
                Op::Reserve(Own),
                Op::Assemble(Own),
                Op::Replay(Own),
                Op::Serve(Own),
            ],
            Chain::ResumePartner => &[
                Op::Assemble(Partner),
                Op::Replay(Partner),
                Op::Serve(Partner),
            ],
            Chain::TakeOver => &[
                Op::Preempt(Partner),
                Op::Assemble(Partner),
                Op::Replay(Partner),
                Op::Serve(Partner),
            ],
            Chain::Backout => &[Op::StopServing(Partner), Op::Release(Partner)],
            Chain::GiveBack => &[
                Op::Checkpoint(Partner),
                Op::StopServing(Partner),
                Op::Release(Partner),
            ],
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Listening {
        not_before_ms: u64,
    },
    WaitingForGiveback {
        retry_at_ms: u64,
        /// The partner's newest stamp when waiting began: only a newer record saying the
        /// partner no longer holds our disks triggers an early retry (no retry storm).
        seen: Option<Stamp>,
    },
    Running {
        chain: Chain,
        index: usize,
        retry_at_ms: Option<u64>,
    },
    Normal,
    Announced {
        announced_ms: u64,
    },
    Takeover,
    Stopped,
}

/// A snapshot for `twinctl status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct View {
    /// This node's state.
    pub state: NodeState,
    /// This node's current (generation, sequence).
    pub stamp: Stamp,
    /// Why a takeover would be refused now (empty: possible).
    pub blockers: Vec<TakeoverBlocked>,
    /// The partner's newest decodable record.
    pub partner: Option<StatusRecord>,
    /// The partner's protocol version if it differs from ours.
    pub partner_version_mismatch: Option<u16>,
    /// Per path: milliseconds since the partner was last heard on it.
    pub path_age_ms: [(Path, Option<u64>); 3],
    /// Milliseconds of lease left (0: expired or never held).
    pub lease_left_ms: u64,
    /// Holds the reservations of its own / the partner's disks.
    pub holds: (bool, bool),
    /// Serves its own / the partner's volumes.
    pub serving: (bool, bool),
    /// Takeover disabled by the operator here.
    pub takeover_disabled: bool,
    /// Mirror in sync (this node's view).
    pub mirror_in_sync: bool,
    /// This node's own journals mirrored in sync into the partner (`None`: not reported, the
    /// flag follows `mirror_in_sync`).
    pub outgoing_mirror_in_sync: Option<bool>,
    /// The last operation failure, if any.
    pub last_error: Option<String>,
    /// Status records ignored because of a wrong pair id or sender.
    pub rejected_records: u64,
}

/// One node's state machine. See the module docs.
#[derive(Clone, Debug)]
pub struct Node {
    cfg: Config,
    generation: u64,
    sequence: u64,
    started_ms: u64,
    phase: Phase,
    hb: Heartbeat,
    takeover_disabled: bool,
    mirror_in_sync: bool,
    outgoing_mirror_in_sync: Option<bool>,
    partner_version_mismatch: Option<u16>,
    lease_until_ms: Option<u64>,
    sent: VecDeque<(Stamp, u64)>,
    last_sent_ms: Option<u64>,
    last_sent_shape: Option<(WireState, StatusFlags)>,
    last_mailbox_read_ok_ms: Option<u64>,
    holds_own: bool,
    holds_partner: bool,
    serving_own: bool,
    serving_partner: bool,
    giveback_pending: bool,
    previous_attempt_failed: bool,
    last_auto_giveback_ms: Option<u64>,
    auto_giveback_suppressed: bool,
    /// A giveback's StopServing failed: the partner's disks stay here, the reason stays in
    /// `last_error` through the resume, and a failed resume holds them unserved instead of
    /// backing out (a Release).
    giveback_aborted: bool,
    last_error: Option<String>,
    rejected_records: u64,
}

impl Node {
    /// A node starting at `now_ms` in REBOOTING. Its first [`Node::step`] sends its status.
    pub fn new(cfg: Config, boot: Boot, now_ms: u64) -> Node {
        Node {
            hb: Heartbeat::new(cfg.heartbeat, now_ms),
            cfg,
            generation: boot.generation,
            sequence: 0,
            started_ms: now_ms,
            phase: Phase::Listening {
                not_before_ms: now_ms,
            },
            takeover_disabled: false,
            mirror_in_sync: false,
            outgoing_mirror_in_sync: None,
            partner_version_mismatch: None,
            lease_until_ms: None,
            sent: VecDeque::new(),
            last_sent_ms: None,
            last_sent_shape: None,
            last_mailbox_read_ok_ms: None,
            holds_own: false,
            holds_partner: boot.holds_partner_disks,
            serving_own: false,
            serving_partner: false,
            giveback_pending: false,
            previous_attempt_failed: false,
            last_auto_giveback_ms: None,
            auto_giveback_suppressed: false,
            giveback_aborted: false,
            last_error: None,
            rejected_records: 0,
        }
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The merged view of the partner's records.
    pub fn heartbeat(&self) -> &Heartbeat {
        &self.hb
    }

    /// Feeds one event; returns what to do, in order.
    pub fn step(&mut self, event: Event, now_ms: u64) -> Vec<Action> {
        // First: a long gap since the previous step is this node's own stall, not partner
        // silence (the events queued meanwhile are still to come).
        self.hb.observe(now_ms);
        let mut out = Vec::new();
        if self.phase == Phase::Stopped {
            self.maybe_send(now_ms, &mut out);
            return out;
        }
        match event {
            Event::Tick => {}
            Event::Status { path, record } => self.on_status(path, record, now_ms, &mut out),
            Event::ForeignStatus { path, record } => {
                if record.pair_id != self.cfg.pair_id
                    || record.node_id != self.cfg.node_id.partner().get()
                {
                    self.rejected_records += 1;
                } else if self.hb.receive_stamp(path, record.stamp, now_ms) == Delivery::New {
                    self.partner_version_mismatch = Some(record.version);
                }
            }
            Event::MailboxRead { ok, started_ms } => {
                if ok {
                    let started = started_ms.min(now_ms);
                    self.last_mailbox_read_ok_ms = Some(
                        self.last_mailbox_read_ok_ms
                            .map_or(started, |t| t.max(started)),
                    );
                }
            }
            Event::MailboxWritten { stamp, ok } => {
                if ok {
                    if let Some(&(_, created)) = self.sent.iter().find(|(s, _)| *s == stamp) {
                        let until = created.saturating_add(self.cfg.lease_ms);
                        self.lease_until_ms =
                            Some(self.lease_until_ms.map_or(until, |u| u.max(until)));
                    }
                }
            }
            Event::MirrorSync { in_sync } => self.mirror_in_sync = in_sync,
            Event::OutgoingMirrorSync { in_sync } => self.outgoing_mirror_in_sync = Some(in_sync),
            Event::Completed { op, outcome } => self.on_completed(op, outcome, now_ms, &mut out),
            Event::ReservationConflict { set } => self.lose(set, now_ms, &mut out),
        }
        self.evaluate(now_ms, &mut out);
        self.maybe_send(now_ms, &mut out);
        out
    }

    /// Carries out an operator command, or refuses it with the reasons.
    pub fn operator(&mut self, cmd: Command, now_ms: u64) -> Result<Vec<Action>, CommandRefused> {
        self.hb.observe(now_ms);
        if self.phase == Phase::Stopped {
            return Err(CommandRefused::Stopped);
        }
        let mut out = Vec::new();
        match cmd {
            Command::Takeover if matches!(self.phase, Phase::Announced { .. }) => {}
            Command::Takeover => {
                let bits = self.blocker_bits(now_ms) & !OPERATOR_OVERRIDES;
                if bits != 0 {
                    return Err(CommandRefused::TakeoverBlocked(TakeoverBlocked::from_bits(
                        bits,
                    )));
                }
                self.giveback_pending = false;
                self.previous_attempt_failed = false;
                self.announce(now_ms);
            }
            Command::Giveback => {
                if self.phase != Phase::Takeover {
                    return Err(CommandRefused::NotInTakeover(self.state()));
                }
                self.run(Chain::GiveBack, &mut out);
            }
            Command::DisableTakeover => self.takeover_disabled = true,
            Command::EnableTakeover => self.takeover_disabled = false,
            Command::Stop => {
                if self.serving_own {
                    out.push(Action::Fence(DiskSet::Own));
                }
                if self.serving_partner {
                    out.push(Action::Fence(DiskSet::Partner));
                }
                self.serving_own = false;
                self.serving_partner = false;
                self.phase = Phase::Stopped;
            }
        }
        self.evaluate(now_ms, &mut out);
        self.maybe_send(now_ms, &mut out);
        Ok(out)
    }

    /// True if this node may write a member of `set` now: it holds the set's reservation and its
    /// lease is fresh. Check before every member write (and mailbox writes are exempt: they
    /// renew the lease).
    pub fn may_write(&self, set: DiskSet, now_ms: u64) -> bool {
        self.phase != Phase::Stopped && self.holds(set) && self.lease_fresh(now_ms)
    }

    /// True if the lease is fresh at `now_ms`.
    pub fn lease_fresh(&self, now_ms: u64) -> bool {
        self.lease_until_ms.is_some_and(|u| now_ms < u)
    }

    /// When the lease ends (`None`: never held).
    pub fn lease_until_ms(&self) -> Option<u64> {
        self.lease_until_ms
    }

    /// The operator-facing state.
    pub fn state(&self) -> NodeState {
        match self.phase {
            Phase::Listening { .. } => NodeState::Rebooting,
            Phase::WaitingForGiveback { .. } => NodeState::WaitingForGiveback,
            Phase::Running { chain, .. } => match chain {
                Chain::BringUpOwn => NodeState::Rebooting,
                Chain::ResumePartner | Chain::TakeOver | Chain::Backout => NodeState::TakingOver,
                Chain::GiveBack => NodeState::GivingBack,
            },
            Phase::Normal => NodeState::Normal,
            Phase::Announced { .. } => NodeState::TakingOver,
            Phase::Takeover => NodeState::Takeover,
            Phase::Stopped => NodeState::Stopped,
        }
    }

    /// The state announced on the wire.
    pub fn wire_state(&self) -> WireState {
        match self.state() {
            NodeState::Rebooting | NodeState::WaitingForGiveback => WireState::Rebooting,
            NodeState::Normal => WireState::Normal,
            NodeState::TakingOver | NodeState::Takeover | NodeState::GivingBack => {
                WireState::Takeover
            }
            NodeState::Stopped => WireState::Stopped,
        }
    }

    /// Holds the reservations of `set` (as far as this node knows).
    pub fn holds(&self, set: DiskSet) -> bool {
        match set {
            DiskSet::Own => self.holds_own,
            DiskSet::Partner => self.holds_partner,
        }
    }

    /// Serves the volumes of `set` (its `Serve` completed and it has not stopped or been fenced).
    pub fn serving(&self, set: DiskSet) -> bool {
        match set {
            DiskSet::Own => self.serving_own,
            DiskSet::Partner => self.serving_partner,
        }
    }

    /// Why a takeover would be refused at `now_ms` (empty: it would start).
    pub fn takeover_blockers(&self, now_ms: u64) -> Vec<TakeoverBlocked> {
        TakeoverBlocked::from_bits(self.blocker_bits(now_ms))
    }

    /// [`Node::takeover_blockers`] as a bit set (allocation-free: evaluated at every step).
    fn blocker_bits(&self, now_ms: u64) -> u32 {
        let mut v = 0u32;
        let partner = self.hb.newest_record();
        let window = self.cfg.heartbeat.silence_window_ms();
        if self.takeover_disabled {
            v |= TakeoverBlocked::DisabledByOperator.bit();
        }
        if partner.is_some_and(|r| r.flags.contains(StatusFlags::TAKEOVER_DISABLED)) {
            v |= TakeoverBlocked::DisabledOnPartner.bit();
        }
        if !self.mirror_in_sync
            || partner.is_some_and(|r| !r.flags.contains(StatusFlags::MIRROR_IN_SYNC))
        {
            v |= TakeoverBlocked::MirrorOutOfSync.bit();
        }
        if self.partner_version_mismatch.is_some() {
            v |= TakeoverBlocked::VersionMismatch.bit();
        }
        if now_ms.saturating_sub(self.started_ms) < window {
            v |= TakeoverBlocked::JustStarted.bit();
        } else if !self.hb.silent_for(now_ms, self.partner_silence_window_ms()) {
            v |= TakeoverBlocked::PartnerHeard.bit();
        }
        if self
            .last_mailbox_read_ok_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= window)
        {
            v |= TakeoverBlocked::MailboxUnreadable.bit();
        }
        if !self.lease_fresh(now_ms) {
            v |= TakeoverBlocked::OwnLeaseExpired.bit();
        }
        if self.hb.newest().is_none() && !self.holds_partner {
            v |= TakeoverBlocked::PartnerNeverHeard.bit();
        }
        if !matches!(self.phase, Phase::Normal | Phase::Announced { .. }) {
            v |= TakeoverBlocked::NotNormal.bit();
        }
        if self.giveback_pending {
            v |= TakeoverBlocked::GivebackPending.bit();
        }
        if self.previous_attempt_failed {
            v |= TakeoverBlocked::PreviousAttemptFailed.bit();
        }
        v
    }

    /// A snapshot for status output.
    pub fn view(&self, now_ms: u64) -> View {
        View {
            state: self.state(),
            stamp: Stamp {
                generation: self.generation,
                sequence: self.sequence,
            },
            blockers: self.takeover_blockers(now_ms),
            partner: self.hb.newest_record().copied(),
            partner_version_mismatch: self.partner_version_mismatch,
            path_age_ms: Path::ALL.map(|p| (p, self.hb.path_age_ms(p, now_ms))),
            lease_left_ms: self.lease_until_ms.map_or(0, |u| u.saturating_sub(now_ms)),
            holds: (self.holds_own, self.holds_partner),
            serving: (self.serving_own, self.serving_partner),
            takeover_disabled: self.takeover_disabled,
            mirror_in_sync: self.mirror_in_sync,
            outgoing_mirror_in_sync: self.outgoing_mirror_in_sync,
            last_error: self.last_error.clone(),
            rejected_records: self.rejected_records,
        }
    }

    fn on_status(&mut self, path: Path, record: StatusRecord, now_ms: u64, out: &mut Vec<Action>) {
        if record.pair_id != self.cfg.pair_id || record.node_id != self.cfg.node_id.partner() {
            self.rejected_records += 1;
            return;
        }
        if self.hb.receive(path, &record, now_ms) != Delivery::New {
            return;
        }
        self.partner_version_mismatch = None;
        if record.state == WireState::Normal {
            self.giveback_pending = false;
        }
        // The partner says it holds our disks: whatever we believe, we have lost them.
        if record.flags.contains(StatusFlags::HOLDS_PARTNER_DISKS)
            && (self.holds_own || self.serving_own || self.chain_touches_own())
        {
            self.lose(DiskSet::Own, now_ms, out);
        }
    }

    fn chain_touches_own(&self) -> bool {
        matches!(
            self.phase,
            Phase::Running {
                chain: Chain::BringUpOwn,
                ..
            }
        )
    }

    /// This node learned it no longer holds `set`: fence it.
    fn lose(&mut self, set: DiskSet, now_ms: u64, out: &mut Vec<Action>) {
        out.push(Action::Fence(set));
        match set {
            DiskSet::Own => {
                self.holds_own = false;
                self.serving_own = false;
                if self.serving_partner || self.holds_partner {
                    // Both sets lost at once cannot happen under this protocol; hold nothing we
                    // cannot vouch for and let the operator sort the reservations out.
                    if self.serving_partner {
                        out.push(Action::Fence(DiskSet::Partner));
                    }
                    self.serving_partner = false;
                    self.last_error =
                        Some("lost own disks while holding the partner's; operator needed".into());
                }
                self.wait_for_giveback(now_ms);
            }
            DiskSet::Partner => {
                self.holds_partner = false;
                self.serving_partner = false;
                if !matches!(
                    self.phase,
                    Phase::Listening { .. } | Phase::WaitingForGiveback { .. }
                ) && !self.chain_touches_own()
                {
                    self.phase = Phase::Normal;
                }
            }
        }
    }

    fn on_completed(&mut self, op: Op, outcome: Outcome, now_ms: u64, out: &mut Vec<Action>) {
        let Phase::Running {
            chain,
            index,
            retry_at_ms: None,
        } = self.phase
        else {
            return;
        };
        if chain.ops().get(index) != Some(&op) {
            return;
        }
        match outcome {
            Outcome::Done => {
                self.apply_done(op);
                if index + 1 < chain.ops().len() {
                    self.phase = Phase::Running {
                        chain,
                        index: index + 1,
                        retry_at_ms: None,
                    };
                    out.push(Action::Start(chain.ops()[index + 1]));
                } else {
                    self.finish(chain, out);
                }
            }
            Outcome::HeldByPartner | Outcome::Failed(_) => {
                self.last_error = Some(match &outcome {
                    Outcome::Failed(e) => format!("{op:?} failed: {e}"),
                    _ => format!("{op:?}: reservation held by the partner"),
                });
                self.fail(chain, index, op, outcome, now_ms, out);
            }
        }
    }

    fn apply_done(&mut self, op: Op) {
        match op {
            Op::Reserve(DiskSet::Own) => self.holds_own = true,
            Op::Preempt(DiskSet::Partner) | Op::Reserve(DiskSet::Partner) => {
                self.holds_partner = true
            }
            Op::Serve(DiskSet::Own) => self.serving_own = true,
            Op::Serve(DiskSet::Partner) => self.serving_partner = true,
            Op::StopServing(DiskSet::Own) => self.serving_own = false,
            Op::StopServing(DiskSet::Partner) => self.serving_partner = false,
            Op::Release(DiskSet::Own) => self.holds_own = false,
            Op::Release(DiskSet::Partner) => self.holds_partner = false,
            _ => {}
        }
    }

    fn finish(&mut self, chain: Chain, out: &mut Vec<Action>) {
        match chain {
            Chain::BringUpOwn => {
                if self.holds_partner {
                    self.run(Chain::ResumePartner, out);
                } else {
                    self.phase = Phase::Normal;
                }
            }
            Chain::ResumePartner | Chain::TakeOver => {
                self.phase = Phase::Takeover;
                if !self.giveback_aborted {
                    self.last_error = None;
                }
                self.giveback_aborted = false;
            }
            Chain::Backout => {
                self.phase = Phase::Normal;
                self.previous_attempt_failed = true;
            }
            Chain::GiveBack => {
                self.phase = Phase::Normal;
                self.giveback_pending = true;
            }
        }
    }

    fn fail(
        &mut self,
        chain: Chain,
        index: usize,
        op: Op,
        outcome: Outcome,
        now_ms: u64,
        out: &mut Vec<Action>,
    ) {
        let retry = now_ms.saturating_add(self.cfg.retry_ms);
        match chain {
            Chain::BringUpOwn => {
                if outcome == Outcome::HeldByPartner {
                    self.wait_for_giveback(now_ms);
                } else {
                    if self.serving_own {
                        out.push(Action::Fence(DiskSet::Own));
                        self.serving_own = false;
                    }
                    self.phase = Phase::Listening {
                        not_before_ms: retry,
                    };
                }
            }
            Chain::TakeOver if op == Op::Preempt(DiskSet::Partner) => {
                self.phase = Phase::Normal;
                self.previous_attempt_failed = true;
            }
            Chain::ResumePartner if self.giveback_aborted => {
                // Backing out would release arrays the failed giveback left unfenced: hold the
                // disks, unserved, until an operator sorts out the cause.
                self.phase = Phase::Takeover;
                self.giveback_aborted = false;
                self.last_error = Some(format!(
                    "giveback aborted and the partner's volumes could not be served again ({}); \
                     their disks stay reserved by this node: fix the cause, then run \
                     `twinctl giveback` again",
                    self.last_error.as_deref().unwrap_or("no detail")
                ));
            }
            Chain::TakeOver | Chain::ResumePartner => self.run(Chain::Backout, out),
            Chain::GiveBack if op == Op::Checkpoint(DiskSet::Partner) => {
                // Keep serving; no automatic retry (an operator giveback tries again).
                self.phase = Phase::Takeover;
                self.auto_giveback_suppressed = true;
            }
            Chain::GiveBack if op == Op::StopServing(DiskSet::Partner) => {
                // The volumes are down, but their arrays may hold writes that only this node's
                // journal copies have (the final CP or the fence of the partner's old log
                // failed): a release would let the partner replay superseded records over
                // them. Keep the reservation, serve them again, leave the retry to an operator.
                self.serving_partner = false;
                self.auto_giveback_suppressed = true;
                self.giveback_aborted = true;
                self.last_error = Some(format!(
                    "giveback aborted, the partner's disks stay reserved by this node: {}",
                    self.last_error.as_deref().unwrap_or("StopServing failed")
                ));
                self.run(Chain::ResumePartner, out);
            }
            Chain::Backout | Chain::GiveBack => {
                self.phase = Phase::Running {
                    chain,
                    index,
                    retry_at_ms: Some(retry),
                };
            }
        }
    }

    fn wait_for_giveback(&mut self, now_ms: u64) {
        self.phase = Phase::WaitingForGiveback {
            retry_at_ms: now_ms.saturating_add(self.cfg.retry_ms),
            seen: self.hb.newest(),
        };
    }

    fn run(&mut self, chain: Chain, out: &mut Vec<Action>) {
        self.phase = Phase::Running {
            chain,
            index: 0,
            retry_at_ms: None,
        };
        out.push(Action::Start(chain.ops()[0]));
    }

    fn announce(&mut self, now_ms: u64) {
        self.auto_giveback_suppressed = self
            .last_auto_giveback_ms
            .is_some_and(|t| now_ms.saturating_sub(t) < self.cfg.auto_giveback_holdoff_ms);
        self.phase = Phase::Announced {
            announced_ms: now_ms,
        };
    }

    /// k × the longer of the two nodes' intervals: a partner configured with a longer interval
    /// than ours is not declared silent between two of its records.
    fn partner_silence_window_ms(&self) -> u64 {
        let hb = self.cfg.heartbeat;
        let partner_interval = self
            .hb
            .newest_record()
            .map_or(0, |r| u64::from(r.interval_ms));
        hb.interval_ms
            .max(partner_interval)
            .saturating_mul(u64::from(hb.silence_intervals))
    }

    /// When the partner's lease has certainly run out, and the announcement has had time to arrive.
    fn preempt_not_before_ms(&self, announced_ms: u64) -> u64 {
        let partner_lease = self
            .hb
            .newest_record()
            .map_or(0, |r| u64::from(r.lease_ms))
            .max(self.cfg.lease_ms);
        let heard = self.hb.last_heard_ms().unwrap_or(self.started_ms);
        let lease_end = heard
            .saturating_add(partner_lease)
            .saturating_add(self.cfg.lease_margin_ms);
        let announce_end = announced_ms.saturating_add(
            self.cfg
                .heartbeat
                .interval_ms
                .saturating_mul(u64::from(self.cfg.announce_wait_intervals)),
        );
        lease_end.max(announce_end)
    }

    /// Time-driven transitions.
    fn evaluate(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        match self.phase {
            Phase::Listening { not_before_ms } => {
                if now_ms < not_before_ms || !self.lease_fresh(now_ms) {
                    return;
                }
                let partner = self.hb.newest_record();
                if partner.is_some_and(|r| {
                    r.state == WireState::Takeover
                        || r.flags.contains(StatusFlags::HOLDS_PARTNER_DISKS)
                }) {
                    self.wait_for_giveback(now_ms);
                } else if partner.is_some() || self.hb.partner_silent(now_ms) {
                    self.run(Chain::BringUpOwn, out);
                }
            }
            Phase::WaitingForGiveback { retry_at_ms, seen } => {
                let given_back = self.hb.newest_record().is_some_and(|r| {
                    seen.is_none_or(|s| r.stamp > s)
                        && r.state != WireState::Takeover
                        && !r.flags.contains(StatusFlags::HOLDS_PARTNER_DISKS)
                });
                if (given_back || now_ms >= retry_at_ms) && self.lease_fresh(now_ms) {
                    self.run(Chain::BringUpOwn, out);
                }
            }
            Phase::Running {
                chain,
                index,
                retry_at_ms: Some(t),
            } if now_ms >= t => {
                self.phase = Phase::Running {
                    chain,
                    index,
                    retry_at_ms: None,
                };
                out.push(Action::Start(chain.ops()[index]));
            }
            Phase::Running { .. } | Phase::Stopped => {}
            Phase::Normal => {
                if self.blocker_bits(now_ms) == 0 {
                    self.announce(now_ms);
                }
            }
            Phase::Announced { announced_ms } => self.evaluate_announced(announced_ms, now_ms, out),
            Phase::Takeover => {
                let waiting = self.hb.newest_record().is_some_and(|r| {
                    r.state == WireState::Rebooting
                        && r.flags.contains(StatusFlags::WAITING_FOR_GIVEBACK)
                });
                if self.cfg.auto_giveback
                    && !self.auto_giveback_suppressed
                    && waiting
                    && !self.hb.silent_for(now_ms, self.partner_silence_window_ms())
                {
                    self.last_auto_giveback_ms = Some(now_ms);
                    self.run(Chain::GiveBack, out);
                }
            }
        }
    }

    fn evaluate_announced(&mut self, announced_ms: u64, now_ms: u64, out: &mut Vec<Action>) {
        // Reasons that must hold all the way to the preemption (an operator takeover may have
        // overridden giveback-pending and a previous failure; nothing else).
        if self.blocker_bits(now_ms) & !OPERATOR_OVERRIDES != 0 {
            self.phase = Phase::Normal;
            return;
        }
        let not_before = self.preempt_not_before_ms(announced_ms);
        let quiet_mailbox_read = self
            .last_mailbox_read_ok_ms
            .is_some_and(|t| t >= not_before);
        if now_ms >= not_before && quiet_mailbox_read {
            self.run(Chain::TakeOver, out);
        }
    }

    fn flags(&self) -> StatusFlags {
        let mut f = StatusFlags::empty();
        f.set(StatusFlags::TAKEOVER_DISABLED, self.takeover_disabled);
        f.set(
            StatusFlags::MIRROR_IN_SYNC,
            self.outgoing_mirror_in_sync.unwrap_or(self.mirror_in_sync),
        );
        f.set(
            StatusFlags::WAITING_FOR_GIVEBACK,
            matches!(self.phase, Phase::WaitingForGiveback { .. }),
        );
        f.set(StatusFlags::HOLDS_PARTNER_DISKS, self.holds_partner);
        f.set(
            StatusFlags::GIVEBACK_IN_PROGRESS,
            self.state() == NodeState::GivingBack,
        );
        f
    }

    /// Sends a record when the interval has passed or the announced state or flags changed.
    fn maybe_send(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        let shape = (self.wire_state(), self.flags());
        let due = self
            .last_sent_ms
            .is_none_or(|t| now_ms.saturating_sub(t) >= self.cfg.heartbeat.interval_ms);
        if !due && self.last_sent_shape == Some(shape) {
            return;
        }
        self.sequence += 1;
        let stamp = Stamp {
            generation: self.generation,
            sequence: self.sequence,
        };
        let record = StatusRecord {
            pair_id: self.cfg.pair_id,
            node_id: self.cfg.node_id,
            state: shape.0,
            flags: shape.1,
            stamp,
            partner_seen: self.hb.newest().unwrap_or_default(),
            lease_ms: u32::try_from(self.cfg.lease_ms).unwrap_or(u32::MAX),
            interval_ms: u32::try_from(self.cfg.heartbeat.interval_ms).unwrap_or(u32::MAX),
            blockers: self.blocker_bits(now_ms),
        };
        if self.sent.len() == SENT_MEMORY {
            self.sent.pop_front();
        }
        self.sent.push_back((stamp, now_ms));
        self.last_sent_ms = Some(now_ms);
        self.last_sent_shape = Some(shape);
        out.push(Action::SendStatus(record));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    const PAIR: [u8; 16] = [9; 16];

    /// Drives one node alone: every op succeeds at once, every mailbox write succeeds, and the
    /// partner's records are fed by the test.
    struct Alone {
        node: Node,
        now: u64,
        log: Vec<(u64, Action)>,
        /// Ops answered with `Outcome::Failed`.
        failing: Vec<Op>,
    }

    impl Alone {
        fn new() -> Alone {
            let node = Node::new(
                Config::new(PAIR, NodeId::ONE),
                Boot {
                    generation: 1,
                    holds_partner_disks: false,
                },
                0,
            );
            let mut a = Alone {
                node,
                now: 0,
                log: Vec::new(),
                failing: Vec::new(),
            };
            a.feed(Event::MirrorSync { in_sync: true });
            a
        }

        fn feed(&mut self, ev: Event) {
            let mut queue = VecDeque::from([ev]);
            while let Some(ev) = queue.pop_front() {
                for a in self.node.step(ev, self.now) {
                    match &a {
                        Action::SendStatus(r) => queue.push_back(Event::MailboxWritten {
                            stamp: r.stamp,
                            ok: true,
                        }),
                        Action::Start(op) => queue.push_back(Event::Completed {
                            op: *op,
                            outcome: if self.failing.contains(op) {
                                Outcome::Failed("injected".into())
                            } else {
                                Outcome::Done
                            },
                        }),
                        Action::Fence(_) => {}
                    }
                    self.log.push((self.now, a));
                }
            }
        }

        fn partner(&mut self, sequence: u64) {
            let record = StatusRecord {
                pair_id: PAIR,
                node_id: NodeId::ZERO,
                state: WireState::Normal,
                flags: StatusFlags::MIRROR_IN_SYNC,
                stamp: Stamp {
                    generation: 1,
                    sequence,
                },
                partner_seen: Stamp::default(),
                lease_ms: 400,
                interval_ms: 100,
                blockers: 0,
            };
            self.feed(Event::Status {
                path: Path::Udp,
                record,
            });
        }

        /// Advances by `ms` in 10 ms ticks with a successful mailbox read every 100 ms.
        fn run(&mut self, ms: u64) {
            for _ in 0..ms / 10 {
                self.now += 10;
                if self.now.is_multiple_of(100) {
                    self.feed(Event::MailboxRead {
                        ok: true,
                        started_ms: self.now,
                    });
                }
                self.feed(Event::Tick);
            }
        }

        fn first(&self, f: impl Fn(&Action) -> bool) -> Option<(usize, u64)> {
            self.log
                .iter()
                .enumerate()
                .find(|(_, (_, a))| f(a))
                .map(|(i, (t, _))| (i, *t))
        }
    }

    #[test]
    fn takeover_steps_come_in_order_after_the_waits() {
        let mut a = Alone::new();
        for s in 1..=5 {
            a.partner(s);
            a.run(100);
        }
        assert_eq!(a.node.state(), NodeState::Normal);
        let last_heard = 400;
        a.run(2_000);
        assert_eq!(a.node.state(), NodeState::Takeover);
        let announce = a
            .first(|x| matches!(x, Action::SendStatus(r) if r.state == WireState::Takeover))
            .unwrap();
        let steps: Vec<(usize, u64)> = [
            Op::Preempt(DiskSet::Partner),
            Op::Assemble(DiskSet::Partner),
            Op::Replay(DiskSet::Partner),
            Op::Serve(DiskSet::Partner),
        ]
        .iter()
        .map(|op| a.first(|x| *x == Action::Start(*op)).unwrap())
        .collect();
        assert!(announce.0 < steps[0].0);
        assert!(steps.windows(2).all(|w| w[0].0 < w[1].0));
        // Announced after k × interval of silence; preempted after the lease and the delay.
        assert!(announce.1 >= last_heard + 500);
        assert!(steps[0].1 >= last_heard + 400 + 50);
        assert!(steps[0].1 >= announce.1 + 200);
        assert!(a.node.may_write(DiskSet::Partner, a.now));
    }

    /// Takes a silent partner over (see `takeover_steps_come_in_order_after_the_waits`).
    fn taken_over() -> Alone {
        let mut a = Alone::new();
        a.partner(1);
        a.run(2_000);
        assert_eq!(a.node.state(), NodeState::Takeover);
        a
    }

    fn releases(a: &Alone) -> usize {
        a.log
            .iter()
            .filter(|(_, x)| *x == Action::Start(Op::Release(DiskSet::Partner)))
            .count()
    }

    #[test]
    fn giveback_whose_stop_leaves_arrays_unfenced_keeps_the_disks_and_serves_them_again() {
        let mut a = taken_over();
        a.failing = vec![Op::StopServing(DiskSet::Partner)];
        a.node.operator(Command::Giveback, a.now).unwrap();
        // The operator call returns the first action; feed it like the driver would.
        a.feed(Event::Completed {
            op: Op::Checkpoint(DiskSet::Partner),
            outcome: Outcome::Done,
        });
        a.run(100);
        assert_eq!(a.node.state(), NodeState::Takeover);
        assert_eq!(releases(&a), 0, "no release after the failed stop");
        assert!(a.node.holds(DiskSet::Partner));
        assert!(a.node.serving(DiskSet::Partner), "served again");
        let err = a.node.view(a.now).last_error.unwrap_or_default();
        assert!(err.contains("giveback aborted"), "{err}");
        // A later giveback that fences releases as usual.
        a.failing.clear();
        a.node.operator(Command::Giveback, a.now).unwrap();
        a.feed(Event::Completed {
            op: Op::Checkpoint(DiskSet::Partner),
            outcome: Outcome::Done,
        });
        a.run(100);
        assert_eq!(releases(&a), 1);
        assert!(!a.node.holds(DiskSet::Partner));
    }

    #[test]
    fn failed_resume_after_an_aborted_giveback_holds_the_disks_instead_of_backing_out() {
        let mut a = taken_over();
        a.failing = vec![
            Op::StopServing(DiskSet::Partner),
            Op::Replay(DiskSet::Partner),
        ];
        a.node.operator(Command::Giveback, a.now).unwrap();
        a.feed(Event::Completed {
            op: Op::Checkpoint(DiskSet::Partner),
            outcome: Outcome::Done,
        });
        a.run(3_000);
        assert_eq!(a.node.state(), NodeState::Takeover);
        assert_eq!(releases(&a), 0, "never released: {:?}", a.log);
        assert!(a.node.holds(DiskSet::Partner) && !a.node.serving(DiskSet::Partner));
        let err = a.node.view(a.now).last_error.unwrap_or_default();
        assert!(err.contains("could not be served again"), "{err}");
        // The partner's newer records do not take the disks from it either.
        a.partner(100);
        a.run(500);
        assert!(a.node.holds(DiskSet::Partner));
        assert_eq!(releases(&a), 0);
    }

    /// The node was not scheduled for `ms` (SIGSTOP, CPU starvation): no step at all.
    fn stall(a: &mut Alone, ms: u64) {
        a.now += ms;
    }

    fn announced(a: &Alone) -> bool {
        a.first(|x| matches!(x, Action::SendStatus(r) if r.state == WireState::Takeover))
            .is_some()
    }

    #[test]
    fn observer_stalled_longer_than_the_window_does_not_take_over_a_live_partner() {
        let mut a = Alone::new();
        for s in 1..=10 {
            a.partner(s);
            a.run(100);
        }
        assert_eq!(a.node.state(), NodeState::Normal);
        stall(&mut a, 1_000);
        // Worst order after the stall: ticks (and mailbox results queued before it) come first;
        // the partner's records, queued in the sockets meanwhile, are read 250 ms later.
        a.run(250);
        assert!(!announced(&a), "announced TAKEOVER against a live partner");
        assert_eq!(a.node.state(), NodeState::Normal);
        for s in 11..=20 {
            a.partner(s);
            a.run(100);
        }
        assert_eq!(a.node.state(), NodeState::Normal);
        assert!(!a.node.holds(DiskSet::Partner));
        assert!(a
            .first(|x| *x == Action::Start(Op::Preempt(DiskSet::Partner)))
            .is_none());
    }

    #[test]
    fn partner_dead_during_own_stall_is_taken_over_after_the_rest_of_the_window() {
        let mut a = Alone::new();
        for s in 1..=10 {
            a.partner(s);
            a.run(100);
        }
        stall(&mut a, 1_000);
        let resumed = a.now;
        a.run(2_000);
        assert_eq!(a.node.state(), NodeState::Takeover);
        let (_, announce) = a
            .first(|x| matches!(x, Action::SendStatus(r) if r.state == WireState::Takeover))
            .unwrap();
        // Heard 100 ms before the stall; the allowance of one interval counts: 300 ms remain.
        assert!(announce >= resumed + 250, "announced at {announce}");
        assert!(announce <= resumed + 400, "announced at {announce}");
    }

    #[test]
    fn mailbox_read_started_before_the_lease_deadline_does_not_allow_the_preempt() {
        let mut a = Alone::new();
        for s in 1..=5 {
            a.partner(s);
            a.run(100);
        }
        // Heard last at 400; the partner dies. Announced at 900, preempt not before 1100.
        a.run(500);
        assert!(announced(&a));
        let preempt = |a: &Alone| {
            a.first(|x| *x == Action::Start(Op::Preempt(DiskSet::Partner)))
                .is_some()
        };
        for _ in 0..20 {
            a.now += 10;
            a.feed(Event::Tick);
            if a.now == 1200 {
                // Started at 1050 (before the deadline), delivered late.
                a.feed(Event::MailboxRead {
                    ok: true,
                    started_ms: 1050,
                });
            }
        }
        assert!(
            !preempt(&a),
            "a read begun before the deadline proved nothing"
        );
        a.feed(Event::MailboxRead {
            ok: true,
            started_ms: a.now,
        });
        assert!(preempt(&a));
    }

    #[test]
    fn operator_takeover_while_partner_heard_names_the_reason() {
        let mut a = Alone::new();
        for s in 1..=10 {
            a.partner(s);
            a.run(100);
        }
        match a.node.operator(Command::Takeover, a.now) {
            Err(CommandRefused::TakeoverBlocked(r)) => {
                assert_eq!(r, vec![TakeoverBlocked::PartnerHeard])
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    #[test]
    fn stopped_node_may_not_write() {
        let mut a = Alone::new();
        a.partner(1);
        a.run(200);
        assert!(a.node.may_write(DiskSet::Own, a.now));
        a.node.operator(Command::Stop, a.now).unwrap();
        assert!(!a.node.may_write(DiskSet::Own, a.now));
        assert_eq!(a.node.wire_state(), WireState::Stopped);
    }

    #[test]
    fn lease_is_anchored_at_record_creation_not_write_completion() {
        let mut n = Node::new(
            Config::new(PAIR, NodeId::ONE),
            Boot {
                generation: 1,
                holds_partner_disks: false,
            },
            0,
        );
        let acts = n.step(Event::Tick, 0);
        let Some(Action::SendStatus(r)) = acts.first() else {
            panic!("no status sent: {acts:?}");
        };
        // The write completes late; the lease still counts from the record's creation at 0. The
        // same step sends the next record (the interval has passed).
        let acts = n.step(
            Event::MailboxWritten {
                stamp: r.stamp,
                ok: true,
            },
            300,
        );
        assert_eq!(n.lease_until_ms(), Some(DEFAULT_LEASE_MS));
        // A failed write renews nothing.
        let Some(Action::SendStatus(r2)) = acts.first() else {
            panic!("no status sent: {acts:?}");
        };
        n.step(
            Event::MailboxWritten {
                stamp: r2.stamp,
                ok: false,
            },
            360,
        );
        assert_eq!(n.lease_until_ms(), Some(DEFAULT_LEASE_MS));
    }
}
