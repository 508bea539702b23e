//! A deterministic two-node world for the pure state machine.
//!
//! Time advances in `STEP_MS` steps. Each node is a real [`Node`]; everything around it is a
//! model: the three heartbeat paths (loss, delay, duplication, cuts; the mailbox as two slots of
//! two copies with serialized writes), the disks' reservation table (reserve, preempt, release),
//! the drivers' operations (with latency and occasional failure), member writes (gated by the
//! node's `may_write` and then by the reservation check of the I/O path), crashes with restarts
//! (generation + 1), pauses (the node does not step; its inbox fills), operator commands and
//! mirror-sync flapping. Randomness comes from one `StdRng` seeded by the schedule's seed, so a
//! seed replays exactly.
//!
//! Invariants, checked while the world runs (violations are collected, not panicked on, so a
//! test can print the seed and the trace):
//! (a) when a node preempts its partner's disks, the partner (running or paused) cannot write
//!     them at that moment (its lease has run out or it no longer believes it holds them); after
//!     a preemption the new writer's first write comes at least `lease_margin_ms` after the old
//!     writer's last (room for the old writer's I/O in flight); every landed write passed the
//!     holder check of the I/O path;
//! (b) no takeover is announced or preempts while the partner was heard (a record newer than any
//!     before it reached the node, on any path) within the detection window, or within the
//!     window after the node started;
//! (c) no takeover is announced or preempts while the node's takeover is disabled or its mirror
//!     is out of sync as last told to it (a node paused while the mirror fell out of sync learns
//!     it after the events queued before the change, as a real node's inbox would deliver them).

#![allow(dead_code)]

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use twinblock_pair::heartbeat::{HeartbeatConfig, Path};
use twinblock_pair::state::{Boot, Command, Config, DiskSet, Event, Node, NodeState, Op, Outcome};
use twinblock_pair::status::{NodeId, Stamp, StatusRecord};

pub const PAIR: [u8; 16] = [0x5a; 16];

/// SplitMix64, seeded from `StdRng::seed_from_u64(seed)`: the world draws several numbers per
/// step, and ChaCha in an unoptimized test build made the default run ten times slower.
pub struct SimRng(u64);

impl SimRng {
    pub fn from_seed(seed: u64) -> SimRng {
        SimRng(StdRng::seed_from_u64(seed).gen())
    }
}

impl rand::RngCore for SimRng {
    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let x = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&x[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}
pub const STEP_MS: u64 = 20;
/// Fault probabilities below are per 10 ms; scaled by the step length.
const RATE: f64 = STEP_MS as f64 / 10.0;

/// One direction of a network path.
#[derive(Clone, Copy, Debug)]
pub struct Link {
    pub up: bool,
    pub loss: f64,
    pub max_delay_ms: u64,
    pub dup: f64,
}

impl Link {
    pub const GOOD: Link = Link {
        up: true,
        loss: 0.0,
        max_delay_ms: 2,
        dup: 0.0,
    };
}

#[derive(Clone, Debug)]
enum Payload {
    Event(Event),
    SlotWrite(StatusRecord),
}

#[derive(Clone, Debug)]
struct Pending {
    at: u64,
    seq: u64,
    to: usize,
    incarnation: u64,
    payload: Payload,
}

/// Counters that show a schedule exercised something.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub announces: u64,
    pub preempts: u64,
    pub reserve_attempts: u64,
    pub takeovers_completed: u64,
    pub givebacks_completed: u64,
    pub writes: u64,
    pub refused_writes: u64,
    pub fences: u64,
    pub crashes: u64,
    pub pauses: u64,
}

pub struct World {
    pub now: u64,
    pub seed: u64,
    rng: SimRng,
    pub cfg: [Config; 2],
    nodes: [Option<Node>; 2],
    incarnation: [u64; 2],
    generation: [u64; 2],
    started_at: [u64; 2],
    pub paused: [bool; 2],
    /// Indexed by sender.
    pub udp: [Link; 2],
    pub interconnect: [Link; 2],
    /// Whether each node reaches the shared disks (mailbox, reservations, member writes).
    pub disk_up: [bool; 2],
    pub mailbox_loss: f64,
    /// Longest time a mailbox write takes to land (writes of one node land in order).
    pub mailbox_max_delay_ms: u64,
    pub op_failure: f64,
    slots: [[Option<StatusRecord>; 2]; 2],
    mailbox_busy_until: [u64; 2],
    next_mailbox_read: [u64; 2],
    /// Holder of each node's disk group (index = owner node).
    pub holder: [Option<usize>; 2],
    /// Last landed write per disk: (writer, time).
    last_write: [Option<(usize, u64)>; 2],
    /// Last preemption per disk.
    preempted_at: [Option<u64>; 2],
    queue: Vec<Pending>,
    seq: u64,
    gt_newest: [Option<Stamp>; 2],
    gt_last_new: [Option<u64>; 2],
    pub disabled: [bool; 2],
    /// The mirror's real state per node.
    pub mirror: [bool; 2],
    /// The mirror state last delivered to each node (a paused node learns a change on resume,
    /// after the events queued before it).
    told_mirror: [bool; 2],
    restart_at: [Option<u64>; 2],
    resume_at: [Option<u64>; 2],
    history: [Vec<StatusRecord>; 2],
    pub random_faults: bool,
    pub violations: Vec<String>,
    pub stats: Stats,
    /// Landed member writes per writing node.
    pub writes_by: [u64; 2],
    pub trace: Option<Vec<String>>,
    pub refused_commands: Vec<String>,
}

impl World {
    /// Two healthy nodes started at time 0 with `cfg` (same for both but the node id).
    pub fn new(seed: u64, base: Config) -> World {
        World::new_partial(seed, base, [true, true])
    }

    /// Like [`World::new`], starting only the nodes marked `true` (the others stay down until
    /// [`World::restart`]).
    pub fn new_partial(seed: u64, base: Config, start: [bool; 2]) -> World {
        let mut c0 = base.clone();
        c0.node_id = NodeId::ZERO;
        let mut c1 = base;
        c1.node_id = NodeId::ONE;
        let mut w = World {
            now: 0,
            seed,
            rng: SimRng::from_seed(seed),
            cfg: [c0, c1],
            nodes: [None, None],
            incarnation: [0; 2],
            generation: [0; 2],
            started_at: [0; 2],
            paused: [false; 2],
            udp: [Link::GOOD; 2],
            interconnect: [Link::GOOD; 2],
            disk_up: [true; 2],
            mailbox_loss: 0.0,
            mailbox_max_delay_ms: 20,
            op_failure: 0.0,
            slots: [[None; 2]; 2],
            mailbox_busy_until: [0; 2],
            next_mailbox_read: [0; 2],
            holder: [None; 2],
            last_write: [None; 2],
            preempted_at: [None; 2],
            queue: Vec::new(),
            seq: 0,
            gt_newest: [None; 2],
            gt_last_new: [None; 2],
            disabled: [false; 2],
            mirror: [true; 2],
            told_mirror: [true; 2],
            restart_at: [None; 2],
            resume_at: [None; 2],
            history: [Vec::new(), Vec::new()],
            random_faults: false,
            violations: Vec::new(),
            stats: Stats::default(),
            writes_by: [0; 2],
            trace: None,
            refused_commands: Vec::new(),
        };
        for (i, &up) in start.iter().enumerate() {
            if up {
                w.start(i);
            }
        }
        w
    }

    /// A default configuration for pair `PAIR` (node id is set per node).
    pub fn default_config() -> Config {
        Config::new(PAIR, NodeId::ZERO)
    }

    pub fn node(&self, i: usize) -> Option<&Node> {
        self.nodes[i].as_ref()
    }

    pub fn state(&self, i: usize) -> Option<NodeState> {
        self.nodes[i].as_ref().map(|n| n.state())
    }

    pub fn running(&self, i: usize) -> bool {
        self.nodes[i].is_some()
    }

    fn log(&mut self, msg: impl FnOnce() -> String) {
        if let Some(t) = self.trace.as_mut() {
            t.push(format!("{:>6} ms  {}", self.now, msg()));
        }
    }

    fn violation(&mut self, msg: String) {
        let m = format!("t={} ms: {msg}", self.now);
        self.log(|| format!("VIOLATION {msg}"));
        self.violations.push(m);
    }

    fn push(&mut self, at: u64, to: usize, payload: Payload) {
        self.seq += 1;
        self.queue.push(Pending {
            at,
            seq: self.seq,
            to,
            incarnation: self.incarnation[to],
            payload,
        });
    }

    fn start(&mut self, i: usize) {
        self.incarnation[i] += 1;
        self.generation[i] += 1;
        self.started_at[i] = self.now;
        self.gt_newest[i] = None;
        self.gt_last_new[i] = None;
        self.paused[i] = false;
        let boot = Boot {
            generation: self.generation[i],
            holds_partner_disks: self.holder[1 - i] == Some(i),
        };
        self.nodes[i] = Some(Node::new(self.cfg[i].clone(), boot, self.now));
        self.next_mailbox_read[i] = self.now;
        self.log(|| format!("node {i} starts, generation {}", boot.generation));
        let mirror = self.mirror[i];
        self.feed(i, Event::MirrorSync { in_sync: mirror });
        if self.disabled[i] {
            self.command(i, Command::DisableTakeover);
        }
    }

    pub fn crash(&mut self, i: usize) {
        if self.nodes[i].take().is_some() {
            self.stats.crashes += 1;
            self.log(|| format!("node {i} crashes"));
        }
        self.paused[i] = false;
        self.resume_at[i] = None;
    }

    pub fn restart(&mut self, i: usize) {
        if self.nodes[i].is_none() {
            self.start(i);
        }
    }

    pub fn pause(&mut self, i: usize) {
        if self.nodes[i].is_some() && !self.paused[i] {
            self.paused[i] = true;
            self.stats.pauses += 1;
            self.log(|| format!("node {i} paused"));
        }
    }

    pub fn resume(&mut self, i: usize) {
        if self.paused[i] {
            self.paused[i] = false;
            self.log(|| format!("node {i} resumed"));
        }
    }

    pub fn set_mirror(&mut self, i: usize, in_sync: bool) {
        self.mirror[i] = in_sync;
        if self.nodes[i].is_some() {
            if self.paused[i] {
                let now = self.now;
                self.push(now, i, Payload::Event(Event::MirrorSync { in_sync }));
            } else {
                self.feed(i, Event::MirrorSync { in_sync });
            }
        }
    }

    /// Cuts or restores both directions of a network path.
    pub fn set_path(&mut self, path: Path, up: bool) {
        match path {
            Path::Udp => self.udp.iter_mut().for_each(|l| l.up = up),
            Path::Interconnect => self.interconnect.iter_mut().for_each(|l| l.up = up),
            Path::Mailbox => self.disk_up = [up; 2],
        }
    }

    /// Sends an operator command to a running, unpaused node; returns whether it was accepted.
    pub fn command(&mut self, i: usize, cmd: Command) -> bool {
        if self.paused[i] {
            return false;
        }
        let now = self.now;
        let Some(node) = self.nodes[i].as_mut() else {
            return false;
        };
        let before = node.state();
        match node.operator(cmd, now) {
            Ok(actions) => {
                match cmd {
                    Command::DisableTakeover => self.disabled[i] = true,
                    Command::EnableTakeover => self.disabled[i] = false,
                    _ => {}
                }
                self.log(|| format!("node {i} operator {cmd:?}: accepted"));
                let after = self.nodes[i].as_ref().map(|n| n.state());
                self.check_transition(i, before, after);
                self.handle(i, actions);
                true
            }
            Err(e) => {
                self.log(|| format!("node {i} operator {cmd:?}: {e}"));
                self.refused_commands.push(format!("node {i} {cmd:?}: {e}"));
                false
            }
        }
    }

    /// Delivers a record to node `to` on `path` now, as if it came from its partner (for tests
    /// of stale, replayed or forged records).
    pub fn inject(&mut self, to: usize, path: Path, record: StatusRecord) {
        let now = self.now;
        self.push(now, to, Payload::Event(Event::Status { path, record }));
    }

    /// Delivers any event to node `to` at its next step.
    pub fn inject_event(&mut self, to: usize, ev: Event) {
        let now = self.now;
        self.push(now, to, Payload::Event(ev));
    }

    /// The records node `i` has sent (newest last, at most 64).
    pub fn sent_by(&self, i: usize) -> &[StatusRecord] {
        &self.history[i]
    }

    pub fn run_for(&mut self, ms: u64) {
        let end = self.now + ms;
        while self.now < end {
            self.tick();
        }
    }

    /// Runs until `cond` holds or `ms` pass; returns whether it held.
    pub fn run_until(&mut self, ms: u64, mut cond: impl FnMut(&World) -> bool) -> bool {
        let end = self.now + ms;
        while self.now < end {
            if cond(self) {
                return true;
            }
            self.tick();
        }
        cond(self)
    }

    pub fn tick(&mut self) {
        if self.random_faults {
            self.random_fault();
        }
        for i in 0..2 {
            if self.restart_at[i].is_some_and(|t| t <= self.now) {
                self.restart_at[i] = None;
                self.restart(i);
            }
            if self.resume_at[i].is_some_and(|t| t <= self.now) {
                self.resume_at[i] = None;
                self.resume(i);
            }
        }
        self.land_slot_writes();
        // Which node steps first alternates with the seed and the time, without an RNG draw.
        let first = ((self.now / STEP_MS + self.seed) % 2) as usize;
        for i in [first, 1 - first] {
            if self.nodes[i].is_some() && !self.paused[i] {
                self.step_node(i);
            }
        }
        self.now += STEP_MS;
    }

    fn land_slot_writes(&mut self) {
        let now = self.now;
        let mut i = 0;
        while i < self.queue.len() {
            if self.queue[i].at <= now {
                if let Payload::SlotWrite(rec) = self.queue[i].payload {
                    let owner = rec.node_id.get() as usize;
                    self.slots[owner][(rec.stamp.sequence % 2) as usize] = Some(rec);
                    self.queue.swap_remove(i);
                    continue;
                }
            }
            i += 1;
        }
    }

    fn take_due(&mut self, to: usize) -> Vec<Event> {
        let now = self.now;
        let inc = self.incarnation[to];
        let mut due: Vec<Pending> = Vec::new();
        let mut i = 0;
        while i < self.queue.len() {
            let p = &self.queue[i];
            let mine = p.to == to && matches!(p.payload, Payload::Event(_));
            if mine && (p.incarnation != inc || p.at <= now) {
                let p = self.queue.swap_remove(i);
                if p.incarnation == inc {
                    due.push(p);
                }
                continue;
            }
            i += 1;
        }
        due.sort_by_key(|p| (p.at, p.seq));
        due.into_iter()
            .filter_map(|p| match p.payload {
                Payload::Event(e) => Some(e),
                Payload::SlotWrite(_) => None,
            })
            .collect()
    }

    fn step_node(&mut self, i: usize) {
        for ev in self.take_due(i) {
            self.feed(i, ev);
        }
        self.feed(i, Event::Tick);
        let interval = self.cfg[i].heartbeat.interval_ms;
        if self.now >= self.next_mailbox_read[i] && self.nodes[i].is_some() {
            self.next_mailbox_read[i] = self.now + interval;
            let loss = self.mailbox_loss;
            if self.disk_up[i] && !(loss > 0.0 && self.rng.gen_bool(loss)) {
                let p = 1 - i;
                let newest = match self.slots[p] {
                    [Some(a), Some(b)] => Some(if b.stamp > a.stamp { b } else { a }),
                    [Some(a), None] | [None, Some(a)] => Some(a),
                    [None, None] => None,
                };
                if let Some(record) = newest {
                    self.feed(
                        i,
                        Event::Status {
                            path: Path::Mailbox,
                            record,
                        },
                    );
                }
                self.feed(
                    i,
                    Event::MailboxRead {
                        ok: true,
                        started_ms: self.now,
                    },
                );
            } else {
                self.feed(
                    i,
                    Event::MailboxRead {
                        ok: false,
                        started_ms: self.now,
                    },
                );
            }
        }
        self.writes(i);
    }

    /// Member writes: the node writes every set it serves whenever its own gate allows; the I/O
    /// path's reservation check refuses writes to a disk held by the other node.
    fn writes(&mut self, i: usize) {
        for set in [DiskSet::Own, DiskSet::Partner] {
            let now = self.now;
            let Some(node) = self.nodes[i].as_ref() else {
                return;
            };
            if !node.serving(set) || !node.may_write(set, now) || !self.disk_up[i] {
                continue;
            }
            let disk = match set {
                DiskSet::Own => i,
                DiskSet::Partner => 1 - i,
            };
            if self.holder[disk] == Some(i) {
                self.check_writer_change(i, disk);
                self.last_write[disk] = Some((i, now));
                self.stats.writes += 1;
                self.writes_by[i] += 1;
            } else {
                self.stats.refused_writes += 1;
                let h = self.holder[disk];
                self.log(|| format!("node {i} write to disk {disk} refused: held by {h:?}"));
                self.push(now, i, Payload::Event(Event::ReservationConflict { set }));
            }
        }
    }

    /// After a preemption, the new writer's first write must come at least `lease_margin_ms`
    /// after the old writer's last one: writes the old writer had in flight (up to that much
    /// I/O latency) land before the new writer touches the disk.
    fn check_writer_change(&mut self, i: usize, disk: usize) {
        let Some((m, tm)) = self.last_write[disk] else {
            return;
        };
        let preempted_since = self.preempted_at[disk].is_some_and(|p| p >= tm);
        let margin = self.cfg[i].lease_margin_ms;
        if m != i && preempted_since && self.now - tm < margin {
            self.violation(format!(
                "node {i} wrote disk {disk} {} ms after node {m}'s last write (margin {margin} ms)",
                self.now - tm
            ));
        }
    }

    fn feed(&mut self, i: usize, ev: Event) {
        let now = self.now;
        if let Event::MirrorSync { in_sync } = ev {
            self.told_mirror[i] = in_sync;
        }
        if let Event::Status { record, path } = &ev {
            let from_partner = record.pair_id == PAIR && record.node_id.get() as usize == 1 - i;
            if from_partner && self.gt_newest[i].is_none_or(|n| record.stamp > n) {
                self.gt_newest[i] = Some(record.stamp);
                self.gt_last_new[i] = Some(now);
                let (p, s) = (*path, record.stamp);
                self.log(|| format!("node {i} hears {s} on {}", p.name()));
            }
        }
        let Some(node) = self.nodes[i].as_mut() else {
            return;
        };
        let before = node.state();
        let actions = node.step(ev, now);
        let after = node.state();
        self.check_transition(i, before, Some(after));
        self.handle(i, actions);
    }

    fn check_transition(&mut self, i: usize, before: NodeState, after: Option<NodeState>) {
        let Some(after) = after else { return };
        if before != after {
            self.log(|| format!("node {i}: {before:?} -> {after:?}"));
        }
        if before == NodeState::Normal && after == NodeState::TakingOver {
            self.stats.announces += 1;
            self.check_may_take_over(i, "announced TAKEOVER");
        }
        if before == NodeState::TakingOver && after == NodeState::Takeover {
            self.stats.takeovers_completed += 1;
        }
        if before == NodeState::GivingBack && after == NodeState::Normal {
            self.stats.givebacks_completed += 1;
        }
    }

    fn check_may_take_over(&mut self, i: usize, what: &str) {
        let now = self.now;
        let window = self.cfg[i].heartbeat.silence_window_ms();
        if let Some(t) = self.gt_last_new[i] {
            if now.saturating_sub(t) < window {
                self.violation(format!(
                    "node {i} {what} {} ms after hearing its partner (window {window} ms)",
                    now - t
                ));
            }
        }
        if now.saturating_sub(self.started_at[i]) < window {
            self.violation(format!(
                "node {i} {what} {} ms after starting (window {window} ms)",
                now - self.started_at[i]
            ));
        }
        if self.disabled[i] {
            self.violation(format!("node {i} {what} while takeover is disabled"));
        }
        if !self.told_mirror[i] {
            self.violation(format!("node {i} {what} while its mirror is out of sync"));
        }
    }

    fn handle(&mut self, i: usize, actions: Vec<twinblock_pair::state::Action>) {
        use twinblock_pair::state::Action;
        for a in actions {
            match a {
                Action::SendStatus(rec) => self.send(i, rec),
                Action::Start(op) => self.start_op(i, op),
                Action::Fence(set) => {
                    self.stats.fences += 1;
                    self.log(|| format!("node {i} fences {set:?}"));
                }
            }
        }
    }

    fn send(&mut self, i: usize, rec: StatusRecord) {
        let now = self.now;
        let h = &mut self.history[i];
        if h.len() == 64 {
            h.remove(0);
        }
        h.push(rec);
        for (path, link) in [
            (Path::Udp, self.udp[i]),
            (Path::Interconnect, self.interconnect[i]),
        ] {
            if !link.up || (link.loss > 0.0 && self.rng.gen_bool(link.loss)) {
                continue;
            }
            let copies = if link.dup > 0.0 && self.rng.gen_bool(link.dup) {
                2
            } else {
                1
            };
            for _ in 0..copies {
                let at = now + self.rng.gen_range(0..=link.max_delay_ms);
                self.push(
                    at,
                    1 - i,
                    Payload::Event(Event::Status { path, record: rec }),
                );
            }
        }
        let delay = self.rng.gen_range(0..=self.mailbox_max_delay_ms);
        let land = (now + delay).max(self.mailbox_busy_until[i] + 1);
        self.mailbox_busy_until[i] = land;
        let loss = self.mailbox_loss;
        let ok = self.disk_up[i] && !(loss > 0.0 && self.rng.gen_bool(loss));
        if ok {
            self.push(land, i, Payload::SlotWrite(rec));
        }
        self.push(
            land,
            i,
            Payload::Event(Event::MailboxWritten {
                stamp: rec.stamp,
                ok,
            }),
        );
    }

    fn start_op(&mut self, i: usize, op: Op) {
        let now = self.now;
        let p = 1 - i;
        let disk = |set: DiskSet| match set {
            DiskSet::Own => i,
            DiskSet::Partner => p,
        };
        let fail = !self.disk_up[i];
        let outcome = match op {
            _ if fail => Outcome::Failed("disks unreachable".into()),
            Op::Reserve(set) => {
                self.stats.reserve_attempts += 1;
                let d = disk(set);
                match self.holder[d] {
                    None => {
                        self.holder[d] = Some(i);
                        Outcome::Done
                    }
                    Some(h) if h == i => Outcome::Done,
                    Some(_) => Outcome::HeldByPartner,
                }
            }
            Op::Preempt(set) => {
                let d = disk(set);
                self.stats.preempts += 1;
                self.check_may_take_over(i, "preempted");
                if let Some(victim) = self.nodes[p].as_ref() {
                    if victim.may_write(DiskSet::Own, now) {
                        let until = victim.lease_until_ms();
                        self.violation(format!(
                            "node {i} preempted disk {d} while node {p} could still write it (lease until {until:?})"
                        ));
                    }
                }
                self.holder[d] = Some(i);
                self.preempted_at[d] = Some(now);
                Outcome::Done
            }
            Op::Release(set) => {
                let d = disk(set);
                if self.holder[d] == Some(i) {
                    self.holder[d] = None;
                }
                Outcome::Done
            }
            _ if self.op_failure > 0.0 && self.rng.gen_bool(self.op_failure) => {
                Outcome::Failed("injected failure".into())
            }
            _ => Outcome::Done,
        };
        self.log(|| format!("node {i} starts {op:?} -> {outcome:?}"));
        let at = now + self.rng.gen_range(1..=30);
        self.push(at, i, Payload::Event(Event::Completed { op, outcome }));
    }

    fn random_link(rng: &mut SimRng) -> Link {
        Link {
            up: rng.gen_bool(0.8),
            loss: [0.0, 0.0, 0.1, 0.5, 0.95][rng.gen_range(0..5)],
            max_delay_ms: [2, 20, 100, 400][rng.gen_range(0..4)],
            dup: [0.0, 0.1, 0.5][rng.gen_range(0..3)],
        }
    }

    /// At most one fault per step, drawn with one random number in the common case (the RNG is
    /// the simulator's main cost in debug builds). Rates are per 10 ms.
    fn random_fault(&mut self) {
        const FAULTS: [(f64, u8); 9] = [
            (0.016, 0), // re-draw one link
            (0.003, 1), // mailbox loss rate
            (0.004, 2), // a node's disk access flips
            (0.003, 3), // a node crashes (restarts later)
            (0.003, 4), // a node pauses (resumes later)
            (0.004, 5), // a node's mirror sync flips
            (0.006, 6), // an operator command
            (0.004, 7), // an old partner record is replayed to a node
            (0.002, 8), // a forged record of another pair, claiming to hold the node's disks
        ];
        let total: f64 = FAULTS.iter().map(|f| f.0).sum::<f64>() * RATE;
        let x: f64 = self.rng.gen();
        if x >= total {
            return;
        }
        let mut y = x / RATE;
        let mut kind = 0;
        for (w, k) in FAULTS {
            if y < w {
                kind = k;
                break;
            }
            y -= w;
        }
        let i = self.rng.gen_range(0..2usize);
        let r = &mut self.rng;
        match kind {
            0 => {
                let l = Self::random_link(r);
                if r.gen_bool(0.5) {
                    self.udp[i] = l;
                } else {
                    self.interconnect[i] = l;
                }
            }
            1 => self.mailbox_loss = [0.0, 0.0, 0.2, 0.7][r.gen_range(0..4)],
            2 => self.disk_up[i] = !self.disk_up[i],
            3 if self.nodes[i].is_some() => {
                let back = self.now + r.gen_range(50..3000);
                self.crash(i);
                self.restart_at[i] = Some(back);
            }
            4 if self.nodes[i].is_some() && !self.paused[i] => {
                let back = self.now + r.gen_range(100..3000);
                self.pause(i);
                self.resume_at[i] = Some(back);
            }
            5 => {
                let m = !self.mirror[i];
                self.set_mirror(i, m);
            }
            6 => {
                let cmd = [
                    Command::Takeover,
                    Command::Giveback,
                    Command::Giveback,
                    Command::DisableTakeover,
                    Command::EnableTakeover,
                    Command::EnableTakeover,
                ][r.gen_range(0..6)];
                self.command(i, cmd);
            }
            7 if !self.history[1 - i].is_empty() => {
                let k = r.gen_range(0..self.history[1 - i].len());
                let rec = self.history[1 - i][k];
                let path = [Path::Udp, Path::Interconnect][r.gen_range(0..2)];
                self.inject(i, path, rec);
            }
            8 if !self.history[1 - i].is_empty() => {
                let mut rec = self.history[1 - i][self.history[1 - i].len() - 1];
                rec.pair_id = [0xee; 16];
                rec.stamp.sequence += 1_000;
                rec.state = twinblock_pair::status::WireState::Takeover;
                rec.flags.set(
                    twinblock_pair::status::StatusFlags::HOLDS_PARTNER_DISKS,
                    true,
                );
                self.inject(i, Path::Udp, rec);
            }
            _ => {}
        }
    }
}

/// A random configuration: timers around the defaults, lease sometimes longer than the
/// detection window (so waiting it out matters), auto giveback on or off.
pub fn random_config(rng: &mut StdRng) -> Config {
    let mut c = World::default_config();
    c.heartbeat = HeartbeatConfig {
        interval_ms: [50, 100, 150][rng.gen_range(0..3)],
        silence_intervals: rng.gen_range(2..=5),
    };
    let window = c.heartbeat.silence_window_ms();
    c.lease_ms = rng.gen_range(2 * c.heartbeat.interval_ms..=2 * window);
    c.lease_margin_ms = rng.gen_range(10..=300);
    c.announce_wait_intervals = rng.gen_range(1..=3);
    c.auto_giveback = rng.gen_bool(0.5);
    c.auto_giveback_holdoff_ms = [0, 2_000, 60_000][rng.gen_range(0..3)];
    c.retry_ms = rng.gen_range(200..=1000);
    c
}

/// Runs one random schedule; returns the world (check `violations`).
pub fn run_schedule(seed: u64, duration_ms: u64, trace: bool) -> World {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
    let cfg = random_config(&mut rng);
    let mut w = World::new(seed, cfg);
    w.op_failure = 0.02;
    w.mailbox_max_delay_ms = [5, 20, 80][(seed % 3) as usize];
    if trace {
        w.trace = Some(Vec::new());
    }
    w.random_faults = true;
    w.run_for(duration_ms);
    w
}
