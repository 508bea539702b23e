//! The HA pair's side of a node: built from the `[ha]` section at open, started when the node
//! runs.
//!
//! [`HaNode::prepare`] loads the partner's config (its arrays, disks, volumes and NBD address),
//! checks that the two configs describe one pair, and builds both [`Site`]s with write gates.
//! [`HaNode::start`] increases the persisted generation, binds the UDP path, starts the mailbox
//! loop and the controller with the real [`SiteExecutor`], and from then on the controller
//! decides what is assembled and served. The controller, the UDP path and the mailbox loop run
//! on a thread of their own ([`spawn_control_plane`]), so the data path's blocking work never
//! delays a heartbeat.

use super::address_hook::AddressHook;
use super::controller::{self, Handle, Link, Parts, Permits};
use super::executor::{holds_all, SiteExecutor};
use super::fenced_member::FencedMember;
use super::gate::WriteGate;
use super::generation;
use super::mailbox_loop::{MailboxHealth, MailboxLoop};
use super::udp::UdpPath;
use crate::config::ha::HaConfig;
use crate::config::Config;
use crate::pair::Pair;
use crate::site::{journal_volume_id, Fences, Site};
use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use twinblock_pair::heartbeat::{HeartbeatConfig, Path as HbPath};
use twinblock_pair::reservation::{node_key, Key};
use twinblock_pair::state::{Boot, Command, Config as MachineConfig, DiskSet, Event};
use twinblock_pair::status::NodeId;

/// How long a site's NBD address is retried while in use: the survivor binding the partner's
/// address (free at once after SIGKILL on loopback; only after its fence for a paused partner),
/// and a node taking its own address back after a giveback.
pub const PARTNER_BIND_RETRY_MS: u64 = 10_000;
/// Datagrams queued for the UDP sender before new ones are dropped (the path is lossy anyway).
const UDP_SEND_QUEUE: usize = 16;
/// STATUS frames from the interconnect queued for the controller before new ones are dropped.
const INTERCONNECT_STATUS_QUEUE: usize = 64;

/// The node's HA side.
pub struct HaNode {
    config: Config,
    ha: HaConfig,
    pair_id: [u8; 16],
    node_id: NodeId,
    own_key: Key,
    partner_key: Key,
    partner: Arc<Site>,
    permits: Permits,
    events: Mutex<Option<(mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>)>>,
    handle: OnceLock<Handle>,
    /// Why the mirror blocks a takeover, when it does (for `twinctl status`).
    mirror_detail: Arc<Mutex<Option<String>>>,
    /// Each mailbox disk's latest failure (for `twinctl status`).
    mailbox_health: MailboxHealth,
    /// Dropping it ends the HA control plane's thread.
    control_plane_stop: Mutex<Option<oneshot::Sender<()>>>,
}

fn fences(
    set: DiskSet,
    permits: &Permits,
    key: Key,
    events: &mpsc::UnboundedSender<Event>,
) -> Fences {
    let permit = permits.of(set).clone();
    let gate_events = events.clone();
    let member_events = events.clone();
    Fences {
        gates: Box::new(move |disks: &[PathBuf]| {
            Arc::new(WriteGate::new(
                set,
                permit.clone(),
                key,
                disks,
                gate_events.clone(),
            ))
        }),
        members: Arc::new(move |path, member| {
            FencedMember::wrap(member, path, key, set, member_events.clone())
        }),
    }
}

impl HaNode {
    /// Loads the partner's config and builds both sites (nothing opened).
    pub fn prepare(config: &Config) -> Result<(Arc<Site>, HaNode)> {
        let Some(ha) = config.ha.clone() else {
            bail!("no [ha] section");
        };
        let partner_path = config.resolve(&ha.partner_config);
        let partner_cfg = Config::load(&partner_path)
            .with_context(|| format!("ha.partner_config {}", partner_path.display()))?;
        let pair = config.pair_id();
        if pair.is_nil() {
            bail!("[ha] needs node.pair_id: both nodes of the pair name the same UUID");
        }
        if partner_cfg.pair_id() != pair {
            bail!(
                "ha.partner_config {}: its node.pair_id ({}) differs from this node's ({pair}): \
                 the two configs must describe one pair",
                partner_path.display(),
                partner_cfg.pair_id()
            );
        }
        let Some(node_id) = NodeId::new(config.node.id) else {
            bail!("node.id {} is not 0 or 1", config.node.id);
        };
        if partner_cfg.node.id != node_id.partner().get() {
            bail!(
                "ha.partner_config {}: its node.id is {}, but this node is {} so its partner must \
                 be {}",
                partner_path.display(),
                partner_cfg.node.id,
                node_id.get(),
                node_id.partner().get()
            );
        }
        let check = crate::config::ha::check_ha_partner(config, &partner_cfg);
        if !check.fatal.is_empty() {
            bail!(
                "ha.partner_config {} and this config do not form one HA pair:\n  - {}",
                partner_path.display(),
                check.fatal.join("\n  - ")
            );
        }
        for w in &check.warnings {
            tracing::warn!("ha.partner_config {}: {w}", partner_path.display());
        }
        if config.pair.is_none() && config.volumes.iter().any(|v| v.journal) {
            tracing::warn!(
                "[ha] without [pair]: a takeover opens the partner's own NVRAM files as its \
                 config names them, which works only where both nodes share that storage (one \
                 host); configure [pair] to mirror the journals"
            );
        }
        let pair_id = *pair.as_bytes();
        let own_key = node_key(&pair_id, node_id.get());
        let partner_key = node_key(&pair_id, node_id.partner().get());
        let permits = Permits::default();
        let (tx, rx) = controller::event_channel();
        let own = Arc::new(Site::new(
            config.clone(),
            Some(fences(DiskSet::Own, &permits, own_key, &tx)),
            // After a giveback the partner may still be closing this node's address.
            PARTNER_BIND_RETRY_MS,
        ));
        let partner = Arc::new(Site::new(
            partner_cfg,
            Some(fences(DiskSet::Partner, &permits, own_key, &tx)),
            PARTNER_BIND_RETRY_MS,
        ));
        Ok((
            own,
            HaNode {
                config: config.clone(),
                ha,
                pair_id,
                node_id,
                own_key,
                partner_key,
                partner,
                permits,
                events: Mutex::new(Some((tx, rx))),
                handle: OnceLock::new(),
                mirror_detail: Arc::default(),
                mailbox_health: MailboxHealth::default(),
                control_plane_stop: Mutex::new(None),
            },
        ))
    }

    pub fn partner(&self) -> &Site {
        &self.partner
    }

    pub fn handle(&self) -> Option<&Handle> {
        self.handle.get()
    }

    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// This node's own disks (from its own config).
    pub fn own_disks(&self) -> Vec<PathBuf> {
        self.config
            .arrays
            .iter()
            .flat_map(|a| a.disks.iter().chain(a.spares.iter()))
            .map(|p| self.config.resolve(p))
            .collect()
    }

    pub fn keys(&self) -> (Key, Key) {
        (self.own_key, self.partner_key)
    }

    pub fn ha_config(&self) -> &HaConfig {
        &self.ha
    }

    /// Why this node's view of the mirror blocks a takeover (`None`: it does not).
    pub fn mirror_detail(&self) -> Option<String> {
        self.mirror_detail
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Each mailbox disk with its latest failure (`None`: the last round worked).
    pub fn mailbox_health(&self) -> Vec<(PathBuf, Option<String>)> {
        self.mailbox_health.snapshot()
    }

    /// The address-takeover hooks of the own and the partner's set (`ha.address_hook`): this
    /// node's service address and the partner config's, both on this node's device.
    fn address_hooks(&self) -> (Option<AddressHook>, Option<AddressHook>) {
        let (Some(program), Some(device)) = (&self.ha.address_hook, &self.ha.service_device) else {
            return (None, None);
        };
        let program = self.config.resolve(program);
        let hook = |address: Option<&String>| {
            address.map(|a| AddressHook {
                program: program.clone(),
                address: a.clone(),
                device: device.clone(),
            })
        };
        let partner_address = self
            .partner
            .config()
            .ha
            .as_ref()
            .and_then(|h| h.service_address.as_ref());
        (
            hook(self.ha.service_address.as_ref()),
            hook(partner_address),
        )
    }

    fn machine_config(&self) -> MachineConfig {
        let mut m = MachineConfig::new(self.pair_id, self.node_id);
        m.heartbeat = HeartbeatConfig {
            interval_ms: self.ha.heartbeat_interval_ms,
            silence_intervals: self.ha.silence_intervals,
        };
        m.lease_ms = self.ha.lease_ms;
        m.auto_giveback = self.ha.auto_giveback;
        m
    }

    /// Starts the controller: generation, UDP, interconnect (with `[pair]`), mailbox, executor.
    /// With `pair` the partner's journaled volumes open from this node's copies at takeover and
    /// the mirror's own state decides whether a takeover is possible.
    pub async fn start(&self, own: Arc<Site>, pair: Option<Arc<Pair>>) -> Result<()> {
        let Some(events) = self.events.lock().ok().and_then(|mut e| e.take()) else {
            bail!("the HA controller was already started");
        };
        super::fault::announce();
        let generation = generation::next(&self.config.data_dir())?;
        let holds_partner_disks = holds_all(&self.partner.disks(), self.own_key);
        tracing::info!(
            generation,
            holds_partner_disks,
            node = self.node_id.get(),
            "HA: starting"
        );
        let listen: SocketAddr = self.ha.udp_listen.parse().context("ha.udp_listen")?;
        let partner_udp: SocketAddr = self.ha.partner_udp.parse().context("ha.partner_udp")?;
        let mut links = Vec::new();
        if let Some(p) = &pair {
            links.push(interconnect_link(p.clone()));
            self.partner.set_partner_copies(Some(p.clone()));
        }
        let mailbox = MailboxLoop {
            disks: self
                .ha
                .mailbox_disks
                .iter()
                .map(|d| self.config.resolve(d))
                .collect(),
            pair_id: self.pair_id,
            partner: self.node_id.partner(),
            interval_ms: self.ha.heartbeat_interval_ms,
            health: self.mailbox_health.clone(),
        };
        let ops = tokio::runtime::Handle::current();
        let (own_hook, partner_hook) = self.address_hooks();
        let executor = Arc::new(
            SiteExecutor::new(
                own,
                self.partner.clone(),
                self.own_key,
                self.partner_key,
                ops.clone(),
            )
            .with_address_hooks(own_hook, partner_hook),
        );
        let parts = Parts {
            machine: self.machine_config(),
            boot: Boot {
                generation,
                holds_partner_disks,
            },
            executor,
            links,
            mailbox: Some(mailbox),
            ops,
        };
        let (handle, stop) =
            spawn_control_plane(listen, partner_udp, parts, events, self.permits.clone()).await?;
        *self
            .control_plane_stop
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(stop);
        if self.ha.takeover_disabled {
            if let Err(e) = handle.operator(Command::DisableTakeover).await {
                tracing::warn!("cannot disable takeover at start: {e}");
            }
        }
        match pair {
            Some(p) => {
                let volumes = self
                    .partner
                    .config()
                    .volumes
                    .iter()
                    .filter(|v| v.journal && v.array.is_some())
                    .map(|v| (v.name.clone(), journal_volume_id(&v.name)))
                    .collect();
                tokio::spawn(report_pair_mirror_sync(
                    p,
                    volumes,
                    handle.events(),
                    self.mirror_detail.clone(),
                    self.ha.heartbeat_interval_ms,
                ));
            }
            None => {
                tokio::spawn(report_mirror_sync(
                    self.partner.nvram_files(),
                    handle.events(),
                    self.ha.heartbeat_interval_ms,
                ));
            }
        }
        let _ = self.handle.set(handle);
        Ok(())
    }

    /// Announces STOPPED (the sites are already stopped) and gives the record a moment to go
    /// out on every path.
    pub async fn stop(&self) {
        if let Some(h) = self.handle.get() {
            // What was served before the stop: those sets' service addresses go too.
            let served = match h.snapshot().await {
                Ok(s) => s.view.serving,
                Err(_) => (true, true),
            };
            if let Err(e) = h.operator(Command::Stop).await {
                tracing::warn!("HA stop: {e}");
            }
            self.remove_addresses(served).await;
            tokio::time::sleep(Duration::from_millis(self.ha.heartbeat_interval_ms)).await;
        }
    }

    /// Runs the address hook's `del` for the sets in `served` (own, partner): a node that stops
    /// must let go of the addresses, or the partner's takeover would add an address this host
    /// still answers for.
    async fn remove_addresses(&self, served: (bool, bool)) {
        let (own, partner) = self.address_hooks();
        for (hook, was_served) in [(own, served.0), (partner, served.1)] {
            let Some(hook) = hook.filter(|_| was_served) else {
                continue;
            };
            if let Err(e) = hook.run(super::address_hook::Verb::Del).await {
                tracing::error!("{e}");
            }
        }
    }
}

/// Starts the HA control plane (controller, UDP path, mailbox loop) on a thread of its own with
/// a single-threaded runtime, and returns its handle and the sender whose drop ends the thread.
///
/// Why a thread of its own: the data path's runtime runs blocking work on its workers (array
/// assembly, journal recovery, NVRAM persistence, file I/O). A heartbeat task queued behind such
/// work on a busy host sends nothing and reads nothing meanwhile, and the partner, or this node,
/// then sees silence from a node that is alive. Here nothing else runs: the executor's operations
/// go to the data path's runtime (`Parts::ops`) and mailbox I/O to this runtime's blocking pool.
async fn spawn_control_plane(
    listen: SocketAddr,
    partner_udp: SocketAddr,
    mut parts: Parts,
    events: (mpsc::UnboundedSender<Event>, mpsc::UnboundedReceiver<Event>),
    permits: Permits,
) -> Result<(Handle, oneshot::Sender<()>)> {
    let (ready_tx, ready_rx) = oneshot::channel::<Result<Handle>>();
    let (stop_tx, stop_rx) = oneshot::channel::<()>();
    std::thread::Builder::new()
        .name("twinblockd-ha".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(anyhow::Error::new(e)
                        .context("cannot start the HA control plane's runtime")));
                    return;
                }
            };
            rt.block_on(async move {
                let udp = match UdpPath::bind(listen, partner_udp).await {
                    Ok(u) => u,
                    Err(e) => {
                        let _ = ready_tx.send(Err(anyhow::Error::new(e)
                            .context(format!("cannot bind the UDP heartbeat address {listen}"))));
                        return;
                    }
                };
                parts.links.insert(0, udp_link(udp));
                let handle = controller::spawn(parts, events, permits);
                if ready_tx.send(Ok(handle)).is_err() {
                    return;
                }
                // Runs until the node lets go of the stop sender (or the process exits).
                let _ = stop_rx.await;
            });
        })
        .context("cannot start the HA control plane's thread")?;
    let handle = ready_rx
        .await
        .context("the HA control plane's thread ended before it started")??;
    Ok((handle, stop_tx))
}

/// The UDP path as a controller link: a sender task with a short queue, a receiver task.
fn udp_link(udp: UdpPath) -> Link {
    let (in_tx, in_rx) = mpsc::channel(64);
    tokio::spawn(udp.clone().receive_into(in_tx));
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(UDP_SEND_QUEUE);
    tokio::spawn(async move {
        let mut last_error: Option<String> = None;
        while let Some(bytes) = out_rx.recv().await {
            match udp.send(&bytes).await {
                Ok(()) => last_error = None,
                Err(e) => {
                    let msg = e.to_string();
                    if last_error.as_ref() != Some(&msg) {
                        tracing::debug!("UDP heartbeat send failed: {msg}");
                    }
                    last_error = Some(msg);
                }
            }
        }
    });
    Link {
        path: HbPath::Udp,
        send: Box::new(move |bytes| {
            let _ = out_tx.try_send(bytes);
        }),
        rx: in_rx,
    }
}

/// The interconnect as a heartbeat path: records go out as STATUS frames with the next send on
/// the mirror's connection; every STATUS frame the partner sends arrives on a channel.
fn interconnect_link(pair: Arc<Pair>) -> Link {
    let rx = pair.subscribe_status(INTERCONNECT_STATUS_QUEUE);
    Link {
        path: HbPath::Interconnect,
        send: Box::new(move |bytes| {
            if let Err(e) = pair.send_status(bytes) {
                tracing::debug!("interconnect status not sent: {e:#}");
            }
        }),
        rx,
    }
}

/// Whether the mirror allows taking the partner over, from the mirror itself, every interval:
/// - this node's copies of the partner's journaled volumes are ready (opened, bound, following
///   the partner's stream; a copy this node is serving from counts as ready), reported as
///   [`Event::MirrorSync`];
/// - this node's own journals are in sync in the partner ([`Pair::all_in_sync`]), reported as
///   [`Event::OutgoingMirrorSync`] and sent to the partner as the MIRROR_IN_SYNC flag, which the
///   partner requires before it takes this node over (and this node requires of the partner's).
async fn report_pair_mirror_sync(
    pair: Arc<Pair>,
    volumes: Vec<(String, u64)>,
    events: mpsc::UnboundedSender<Event>,
    detail: Arc<Mutex<Option<String>>>,
    interval_ms: u64,
) {
    loop {
        let missing: Vec<&str> = volumes
            .iter()
            .filter(|(_, id)| !pair.partner_copy_ready(*id) && !pair.partner_copy_in_use(*id))
            .map(|(n, _)| n.as_str())
            .collect();
        let note = (!missing.is_empty()).then(|| {
            format!(
                "no complete copy here of the partner's journal for volume(s) {} (the partner \
                 has not mirrored to this node since it started, or is resynchronising)",
                missing.join(", ")
            )
        });
        *detail.lock().unwrap_or_else(|p| p.into_inner()) = note;
        let copies = Event::MirrorSync {
            in_sync: missing.is_empty(),
        };
        let outgoing = Event::OutgoingMirrorSync {
            in_sync: pair.all_in_sync(),
        };
        if events.send(copies).is_err() || events.send(outgoing).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
}

/// Without `[pair]` there is no mirror: the survivor opens the partner's own NVRAM files (named
/// in the partner's config), which works only where both nodes reach that storage (one host).
/// So "in sync" here means: every one of those files is readable from this node.
async fn report_mirror_sync(
    files: Vec<PathBuf>,
    events: mpsc::UnboundedSender<Event>,
    interval_ms: u64,
) {
    loop {
        let in_sync = files.iter().all(|f| std::fs::File::open(f).is_ok());
        if events.send(Event::MirrorSync { in_sync }).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(interval_ms)).await;
    }
}
