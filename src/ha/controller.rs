//! The HA controller: one task that owns the pair state machine (`twinblock_pair::state::Node`)
//! and connects it to time, the heartbeat paths, the operator and the executor.
//!
//! Inputs, all funnelled into [`Node::step`] / [`Node::operator`] in one task so the machine
//! needs no lock:
//! - a tick every `interval_ms / 2`; before a tick is fed, every input already queued is fed
//!   (bounded, so a flood cannot hold the tick back), so after a stall of this task (CPU starvation,
//!   SIGSTOP) the partner's records queued meanwhile are seen before the machine looks at the
//!   time. The machine itself discounts the stall from the partner's silence
//!   (`Heartbeat::observe`); a long gap between ticks is logged;
//! - datagram-like [`Link`]s (UDP today; the interconnect joins as one more link), whose bytes
//!   are decoded and checked here (`decode_for`: pair id, sender, CRC, version) before they
//!   become [`Event::Status`] or [`Event::ForeignStatus`]; anything else is counted and dropped;
//! - the event channel: mailbox results from [`MailboxLoop`](super::mailbox_loop::MailboxLoop),
//!   op completions, and [`Event::ReservationConflict`] from the data path's gates;
//! - operator requests from the admin socket (with a reply channel).
//!
//! Outputs: [`Action::SendStatus`] goes to every link and to the mailbox loop (which reports
//! [`Event::MailboxWritten`]); [`Action::Start`] runs on the [`Executor`] in its own task (on the
//! `ops` runtime, so assembly and journal recovery never delay the heartbeats) and is
//! answered by [`Event::Completed`]; [`Action::Fence`] clears the set's write permit at once and
//! asks the executor to tear the set down. After every step the controller republishes each
//! set's [`Permit`]: "writes allowed until" the lease end while the machine holds the set, else 0.
//!
//! The executor is a trait so that this loop is tested with a fake one (tests below) and the
//! node plugs in the real one (`super::executor`).

use super::gate::Permit;
use super::mailbox_loop::MailboxLoop;
use super::now_ms;
use async_trait::async_trait;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use twinblock_pair::heartbeat::Path as HbPath;
use twinblock_pair::state::{
    Action, Boot, Command, Config as MachineConfig, DiskSet, Event, Node as Machine, Op, Outcome,
    View,
};
use twinblock_pair::status::{decode_for, NodeId, StatusError, StatusRecord};

/// Carries out the state machine's operations on the node's disks, arrays and exports.
#[async_trait]
pub trait Executor: Send + Sync + 'static {
    /// Runs `op` to its end; the outcome goes back to the machine as [`Event::Completed`].
    async fn run(&self, op: Op) -> Outcome;
    /// Stops serving `set` now (exports down, connections dropped, arrays closed). Must not
    /// block: start the teardown and return.
    fn fence(&self, set: DiskSet);
}

/// A datagram-like heartbeat path: how to send a record and where received bytes arrive.
pub struct Link {
    pub path: HbPath,
    /// Sends one encoded record; must not block (queue it or drop it).
    pub send: Box<dyn Fn(Vec<u8>) + Send + Sync>,
    /// Bytes received on the path, one record per item.
    pub rx: mpsc::Receiver<Vec<u8>>,
}

/// The write permits the controller publishes for the data path.
#[derive(Debug, Clone, Default)]
pub struct Permits {
    pub own: Permit,
    pub partner: Permit,
}

impl Permits {
    pub fn of(&self, set: DiskSet) -> &Permit {
        match set {
            DiskSet::Own => &self.own,
            DiskSet::Partner => &self.partner,
        }
    }
}

/// What the controller reports for `twinctl status`.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub view: View,
    pub generation: u64,
    /// Received datagrams dropped before the machine saw them (bad CRC, wrong pair, ...).
    pub undecodable: u64,
    pub last_undecodable: Option<String>,
}

enum Request {
    Operator(Command, oneshot::Sender<Result<(), String>>),
    Snapshot(oneshot::Sender<Snapshot>),
}

/// The node's handle on the controller task.
#[derive(Clone)]
pub struct Handle {
    requests: mpsc::Sender<Request>,
    events: mpsc::UnboundedSender<Event>,
    permits: Permits,
}

/// A gap between two ticks longer than this many heartbeat intervals is logged as a stall of
/// this node (ticks come every half interval when the task runs).
const STALL_LOG_INTERVALS: u64 = 2;

/// At most this many queued inputs are fed before a tick (a flood must not hold the tick back;
/// the paths queue far fewer: 64 datagrams, 256 in the merged queue).
const DRAIN_MAX_ITEMS: usize = 1024;

/// Admin requests wait at most this long for the controller (it never blocks; this only guards
/// against a stopped task).
const REQUEST_TIMEOUT_MS: u64 = 5_000;

impl Handle {
    /// Runs an operator command; `Err` carries the refusal (with its reasons).
    pub async fn operator(&self, cmd: Command) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.ask(Request::Operator(cmd, tx), rx).await?
    }

    pub async fn snapshot(&self) -> Result<Snapshot, String> {
        let (tx, rx) = oneshot::channel();
        self.ask(Request::Snapshot(tx), rx).await
    }

    async fn ask<T>(&self, req: Request, rx: oneshot::Receiver<T>) -> Result<T, String> {
        let gone = || "the HA controller is not running (the daemon is shutting down)".to_string();
        self.requests.send(req).await.map_err(|_| gone())?;
        match tokio::time::timeout(Duration::from_millis(REQUEST_TIMEOUT_MS), rx).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(_)) => Err(gone()),
            Err(_) => Err("the HA controller did not answer within 5 s".into()),
        }
    }

    /// Where gates and other drivers send events.
    pub fn events(&self) -> mpsc::UnboundedSender<Event> {
        self.events.clone()
    }

    pub fn permits(&self) -> &Permits {
        &self.permits
    }
}

/// Everything the controller task needs.
pub struct Parts {
    pub machine: MachineConfig,
    pub boot: Boot,
    pub executor: Arc<dyn Executor>,
    pub links: Vec<Link>,
    pub mailbox: Option<MailboxLoop>,
    /// The runtime the executor's operations run on (the data path's). The controller itself,
    /// its links and the mailbox loop run on the runtime `spawn` is called on, which the node
    /// keeps free of blocking work (`super::runtime`).
    pub ops: tokio::runtime::Handle,
}

/// The event channel, created before the controller so gates can be built first.
pub fn event_channel() -> (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>) {
    mpsc::unbounded_channel()
}

/// Starts the controller (and the mailbox loop) and returns its handle.
pub fn spawn(
    parts: Parts,
    events: (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>),
    permits: Permits,
) -> Handle {
    let (req_tx, req_rx) = mpsc::channel(16);
    let (events_tx, events_rx) = events;
    let (records_tx, records_rx) = watch::channel(None);
    if let Some(mb) = parts.mailbox {
        tokio::spawn(mb.run(records_rx, events_tx.clone()));
    }
    // One queue for every link's received bytes, tagged with the path.
    let (in_tx, in_rx) = mpsc::channel::<(HbPath, Vec<u8>)>(256);
    let mut senders = Vec::new();
    for link in parts.links {
        let Link { path, send, mut rx } = link;
        senders.push(send);
        let in_tx = in_tx.clone();
        tokio::spawn(async move {
            while let Some(bytes) = rx.recv().await {
                if in_tx.send((path, bytes)).await.is_err() {
                    return;
                }
            }
        });
    }
    let pair_id = parts.machine.pair_id;
    let partner = parts.machine.node_id.partner();
    let interval_ms = parts.machine.heartbeat.interval_ms;
    let generation = parts.boot.generation;
    let ctl = Controller {
        machine: Machine::new(parts.machine, parts.boot, now_ms()),
        executor: parts.executor,
        ops: parts.ops,
        senders,
        records: records_tx,
        permits: permits.clone(),
        events: events_tx.clone(),
        pair_id,
        partner,
        generation,
        undecodable: 0,
        last_undecodable: None,
    };
    tokio::spawn(ctl.run(events_rx, req_rx, in_rx, interval_ms));
    Handle {
        requests: req_tx,
        events: events_tx,
        permits,
    }
}

struct Controller {
    machine: Machine,
    executor: Arc<dyn Executor>,
    ops: tokio::runtime::Handle,
    senders: Vec<Box<dyn Fn(Vec<u8>) + Send + Sync>>,
    records: watch::Sender<Option<StatusRecord>>,
    permits: Permits,
    events: mpsc::UnboundedSender<Event>,
    pair_id: [u8; 16],
    partner: NodeId,
    generation: u64,
    undecodable: u64,
    last_undecodable: Option<String>,
}

impl Controller {
    async fn run(
        mut self,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut requests: mpsc::Receiver<Request>,
        mut incoming: mpsc::Receiver<(HbPath, Vec<u8>)>,
        interval_ms: u64,
    ) {
        let mut tick = tokio::time::interval(Duration::from_millis((interval_ms / 2).max(1)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_tick_ms = now_ms();
        loop {
            // Not biased: a flood of datagrams must not starve the ticks (the status this node
            // sends). Queued inputs are drained before each tick instead.
            tokio::select! {
                Some((path, bytes)) = incoming.recv() => self.receive(path, &bytes),
                Some(ev) = events.recv() => self.step(ev),
                _ = tick.tick() => {
                    self.drain(&mut events, &mut incoming);
                    let now = now_ms();
                    let gap = now.saturating_sub(last_tick_ms);
                    last_tick_ms = now;
                    if gap > interval_ms.saturating_mul(STALL_LOG_INTERVALS) {
                        tracing::warn!(
                            gap_ms = gap,
                            "HA controller ran late (host overloaded or process paused); the \
                             stall does not count as partner silence"
                        );
                    }
                    self.step(Event::Tick);
                }
                req = requests.recv() => match req {
                    Some(r) => self.request(r),
                    // The node dropped its handle: shutting down.
                    None => return,
                },
            }
        }
    }

    /// Feeds every input already queued (received records, mailbox results, completions)
    /// without waiting, so a tick after a stall decides on everything that arrived meanwhile.
    fn drain(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<Event>,
        incoming: &mut mpsc::Receiver<(HbPath, Vec<u8>)>,
    ) {
        for _ in 0..DRAIN_MAX_ITEMS {
            if let Ok((path, bytes)) = incoming.try_recv() {
                self.receive(path, &bytes);
            } else if let Ok(ev) = events.try_recv() {
                self.step(ev);
            } else {
                return;
            }
        }
    }

    fn receive(&mut self, path: HbPath, bytes: &[u8]) {
        let event = match decode_for(bytes, &self.pair_id, self.partner) {
            Ok(record) => Event::Status { path, record },
            Err(StatusError::VersionMismatch(record)) => Event::ForeignStatus { path, record },
            Err(e) => {
                self.undecodable += 1;
                let msg = format!("{}: {e}", path.name());
                if self.last_undecodable.as_ref() != Some(&msg) {
                    tracing::warn!("ignored a status record: {msg}");
                }
                self.last_undecodable = Some(msg);
                return;
            }
        };
        self.step(event);
    }

    fn request(&mut self, req: Request) {
        match req {
            Request::Operator(cmd, reply) => {
                let now = now_ms();
                let result = match self.machine.operator(cmd, now) {
                    Ok(actions) => {
                        tracing::info!(?cmd, "operator command accepted");
                        self.execute(actions);
                        Ok(())
                    }
                    Err(e) => Err(e.to_string()),
                };
                self.publish_permits();
                let _ = reply.send(result);
            }
            Request::Snapshot(reply) => {
                let _ = reply.send(Snapshot {
                    view: self.machine.view(now_ms()),
                    generation: self.generation,
                    undecodable: self.undecodable,
                    last_undecodable: self.last_undecodable.clone(),
                });
            }
        }
    }

    fn step(&mut self, event: Event) {
        if let Event::Completed { op, outcome } = &event {
            tracing::info!(?op, ?outcome, "HA operation finished");
        }
        let before = self.machine.state();
        let actions = self.machine.step(event, now_ms());
        self.execute(actions);
        self.publish_permits();
        let after = self.machine.state();
        if before != after {
            tracing::info!(from = ?before, to = ?after, "HA state changed");
        }
    }

    fn execute(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::SendStatus(record) => {
                    let bytes = record.encode();
                    for send in &self.senders {
                        send(bytes.to_vec());
                    }
                    self.records.send_replace(Some(record));
                }
                Action::Start(op) => {
                    tracing::info!(?op, "HA operation started");
                    let exec = self.executor.clone();
                    let events = self.events.clone();
                    self.ops.spawn(async move {
                        let outcome = exec.run(op).await;
                        let _ = events.send(Event::Completed { op, outcome });
                    });
                }
                Action::Fence(set) => {
                    tracing::warn!(?set, "fencing: no longer holding these disks");
                    self.permits.of(set).set_until_ms(0);
                    self.executor.fence(set);
                }
            }
        }
    }

    /// Recomputes both permits from the machine: the lease end while it holds the set.
    fn publish_permits(&self) {
        let lease = self.machine.lease_until_ms().unwrap_or(0);
        for set in [DiskSet::Own, DiskSet::Partner] {
            let until = if self.machine.holds(set) { lease } else { 0 };
            self.permits.of(set).set_until_ms(until);
        }
    }
}

#[cfg(test)]
mod tests;
