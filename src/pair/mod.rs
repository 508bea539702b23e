//! The node's side of the HA pair: the NVRAM mirror over the interconnect.
//!
//! | module | holds |
//! | --- | --- |
//! | [`mirror`] | the owner's side: the journal's `MirrorHook`, the send queue, the ACK gate and its one deadline task per volume, in/out of sync |
//! | [`outbox`] | who sends next on the outgoing connection: a writer itself on an idle link, the send loop under load |
//! | [`receiver`] | the partner's side: this node's copies of the partner's journals |
//! | [`interconnect`] | the TCP connections: dialing with backoff, accepting, handshake, sender and receiver loops |
//! | [`fetch`] | NVRAM-loss recovery: fetching this node's own log back from the partner's copy |
//! | [`hops`] | per-hop timestamps of a mirrored write (off unless `TWINBLOCK_HOP_TRACE` names a file) |
//! | [`send_batch`] | the frames of one vectored send, and the transport (io_uring, or tokio as the fallback) |
//! | `uring_send` | the io_uring SENDMSG sender: the mirror's only `unsafe`, its invariant documented there |
//! | `seq_queue` | the owner's writers waiting for an ACK and its unacknowledged bytes, in seq order (no allocation per ACK) |
//! | `rx_batch` | the partner's handling of one read: every whole frame stored, persisted once, one cumulative ACK per volume |
//! | `rx_thread` | the partner's receive loop on a thread of its own (blocking `recv`, batch, ACKs written by the same thread) |
//!
//! [`Pair`] ties them together: built from the `[pair]` config before the volumes open (each
//! journaled volume gets its [`VolumeMirror`] as its hook), started by `Node::run`, and asked for
//! status by the admin API. The wire format lives in `twinblock_pair::wire`.

pub mod fetch;
pub mod hops;
pub mod interconnect;
pub mod mirror;
pub mod outbox;
pub mod receiver;
mod rx_batch;
mod rx_thread;
pub mod send_batch;
mod seq_queue;
mod uring_send;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, Result};
use tokio::sync::watch;
use twinblock_pair::wire::{Identity, PairKey, SeenNonces, VolumeAnnounce, PROTOCOL_VERSION};

use crate::config::{load_key, Config, PersistenceMode};
pub use mirror::{LogSource, VolumeMeta, VolumeMirror};
use receiver::{CopySettings, Receiver};

/// At most one log line per this interval and kind of event; the rest are counted.
const LOG_INTERVAL_MS: u64 = 5000;

/// The outgoing link's phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LinkPhase {
    Down,
    Connecting,
    /// Handshake done, sending the resync.
    Resyncing,
    Up,
}

#[derive(Debug)]
struct LinkInfo {
    phase: LinkPhase,
    since: SystemTime,
    last_error: Option<String>,
    /// When `last_error` happened (status tells a stale error from a current one by it).
    last_error_at: Option<SystemTime>,
    /// Increases at every phase change (watchdogs compare it).
    epoch: u64,
    connections: u64,
    peer_generation: Option<u64>,
    sends: u64,
    records: u64,
    /// What the outgoing connection sends with: `io_uring`, or `tokio (io_uring unavailable: ...)`.
    sender: Option<String>,
}

/// State of the outgoing connection, for status and the watchdog.
#[derive(Debug)]
pub struct LinkShared(Mutex<LinkInfo>);

impl LinkShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, LinkInfo> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set(&self, phase: LinkPhase, error: Option<String>) {
        let mut l = self.lock();
        if l.phase != phase {
            l.since = SystemTime::now();
            l.epoch += 1;
        }
        l.phase = phase;
        if error.is_some() {
            l.last_error = error;
            l.last_error_at = Some(SystemTime::now());
        }
    }

    pub fn connected(&self, peer_generation: u64, sender: &str) {
        self.set(LinkPhase::Resyncing, None);
        let mut l = self.lock();
        l.connections += 1;
        l.peer_generation = Some(peer_generation);
        l.sender = Some(sender.to_string());
    }

    pub fn phase(&self) -> LinkPhase {
        self.lock().phase
    }

    pub fn epoch(&self) -> u64 {
        self.lock().epoch
    }

    /// One send of `records` streamed records went out.
    pub fn count_send(&self, records: u64) {
        let mut l = self.lock();
        l.sends += 1;
        l.records += records;
    }

    fn json(&self) -> serde_json::Value {
        let l = self.lock();
        serde_json::json!({
            "state": l.phase,
            "since_unix_ms": unix_ms(l.since),
            "last_error": l.last_error,
            "last_error_unix_ms": l.last_error_at.and_then(unix_ms),
            "connections": l.connections,
            "peer_generation": l.peer_generation,
            "sends": l.sends,
            "records_streamed": l.records,
            "sender": l.sender,
        })
    }
}

fn unix_ms(t: SystemTime) -> Option<u64> {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

#[derive(Debug, Default)]
struct InboundInfo {
    peer: Option<SocketAddr>,
    since: Option<SystemTime>,
    last_error: Option<String>,
    last_error_at: Option<SystemTime>,
    connections: u64,
    peer_generation: Option<u64>,
}

/// State of the incoming connection (the partner's stream), and the epoch that retires an older
/// connection when a newer one authenticates.
#[derive(Debug)]
pub struct InboundShared {
    info: Mutex<InboundInfo>,
    epoch: watch::Sender<u64>,
}

impl InboundShared {
    fn lock(&self) -> std::sync::MutexGuard<'_, InboundInfo> {
        self.info.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A new connection is serving; returns its epoch (older connections see it change and end).
    pub fn connected(&self, peer: SocketAddr, generation: u64) -> u64 {
        let mut i = self.lock();
        i.peer = Some(peer);
        i.since = Some(SystemTime::now());
        i.connections += 1;
        i.peer_generation = Some(generation);
        let mut epoch = 0;
        self.epoch.send_modify(|e| {
            *e += 1;
            epoch = *e;
        });
        epoch
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.epoch.subscribe()
    }

    pub fn disconnected(&self, epoch: u64) {
        if *self.epoch.borrow() == epoch {
            let mut i = self.lock();
            i.peer = None;
            i.since = None;
        }
    }

    pub fn set_error(&self, peer: SocketAddr, e: &str) {
        let mut i = self.lock();
        i.last_error = Some(format!("{peer}: {e}"));
        i.last_error_at = Some(SystemTime::now());
    }

    fn json(&self) -> serde_json::Value {
        let i = self.lock();
        serde_json::json!({
            "state": if i.peer.is_some() { "up" } else { "down" },
            "peer": i.peer.map(|p| p.to_string()),
            "since_unix_ms": i.since.and_then(unix_ms),
            "last_error": i.last_error,
            "last_error_unix_ms": i.last_error_at.and_then(unix_ms),
            "connections": i.connections,
            "peer_generation": i.peer_generation,
        })
    }
}

/// One log line per kind of event and interval; the suppressed ones are counted in the next.
#[derive(Debug, Default)]
pub struct RateLimitedLog(Mutex<HashMap<&'static str, (Option<Instant>, u64)>>);

impl RateLimitedLog {
    pub fn warn(&self, kind: &'static str, message: &str) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let entry = m.entry(kind).or_insert((None, 0));
        let due = entry
            .0
            .is_none_or(|t| t.elapsed() >= Duration::from_millis(LOG_INTERVAL_MS));
        if due {
            tracing::warn!(suppressed_since_last = entry.1, "{message}");
            *entry = (Some(Instant::now()), 0);
        } else {
            entry.1 += 1;
        }
    }
}

/// The node's pair machinery.
pub struct Pair {
    node_id: u8,
    partner_id: u8,
    pair_id: [u8; 16],
    key: PairKey,
    listen: SocketAddr,
    partner_address: SocketAddr,
    service_address: String,
    partner_service_address: String,
    mirror_timeout: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
    mirrors: Mutex<Vec<Arc<VolumeMirror>>>,
    receiver: Receiver,
    link: LinkShared,
    inbound: InboundShared,
    outbox: Arc<outbox::Outbox>,
    kill: Arc<watch::Sender<u64>>,
    seen_nonces: Mutex<SeenNonces>,
    log: RateLimitedLog,
    /// The newest status record to send to the partner (see [`Pair::send_status`]).
    status_out: Mutex<Option<Vec<u8>>>,
    /// The same record for the partner's connection to this node (see
    /// `interconnect::inbound`), which has no send loop to take it from `status_out`.
    status_watch: watch::Sender<Option<Vec<u8>>>,
}

impl Pair {
    /// Builds the pair from the config (reads and checks the key file); `None` without `[pair]`.
    pub fn from_config(config: &Config) -> Result<Option<Arc<Pair>>> {
        let Some(p) = &config.pair else {
            return Ok(None);
        };
        let key = load_key(&p.key_path(config)).map_err(anyhow::Error::msg)?;
        let parse = |what: &str, s: &str| -> Result<SocketAddr> {
            s.parse().with_context(|| format!("pair.{what} `{s}`"))
        };
        let persistence = match config.nvram.as_ref().map(|n| n.persistence) {
            Some(PersistenceMode::Msync) => twinblock_journal::PersistenceMode::Msync,
            Some(PersistenceMode::Pmem) => twinblock_journal::PersistenceMode::Pmem,
            _ => twinblock_journal::PersistenceMode::None,
        };
        let copy_dir = p
            .partner_copy_path(config, "x")
            .parent()
            .map(std::path::Path::to_path_buf)
            .unwrap_or_else(|| config.data_dir());
        let pair_id = *config.pair_id().as_bytes();
        Ok(Some(Arc::new(Pair {
            node_id: config.node.id,
            partner_id: p.partner_id,
            pair_id,
            key,
            listen: parse("listen", &p.listen)?,
            partner_address: parse("partner_address", &p.partner_address)?,
            service_address: p.service_address(config).unwrap_or_default(),
            partner_service_address: p.partner_service_address.clone(),
            mirror_timeout: Duration::from_millis(p.mirror_timeout_ms),
            backoff_min: Duration::from_millis(p.reconnect_min_ms),
            backoff_max: Duration::from_millis(p.reconnect_max_ms),
            mirrors: Mutex::new(Vec::new()),
            receiver: Receiver::new(CopySettings {
                node_id: u32::from(config.node.id),
                pair_id,
                persistence,
                dir: copy_dir,
            }),
            link: LinkShared(Mutex::new(LinkInfo {
                phase: LinkPhase::Down,
                since: SystemTime::now(),
                last_error: None,
                last_error_at: None,
                epoch: 0,
                connections: 0,
                peer_generation: None,
                sends: 0,
                records: 0,
                sender: None,
            })),
            inbound: InboundShared {
                info: Mutex::new(InboundInfo::default()),
                epoch: watch::channel(0).0,
            },
            outbox: Arc::new(outbox::Outbox::new()),
            kill: Arc::new(watch::channel(0).0),
            seen_nonces: Mutex::new(SeenNonces::default()),
            log: RateLimitedLog::default(),
            status_out: Mutex::new(None),
            status_watch: watch::channel(None).0,
        })))
    }

    /// True when the partner's interconnect address is on this machine (a loopback address, or
    /// this node's own listen address): its NVRAM copy then shares this host's power, so a
    /// partner ACK makes a record survive a crash of this daemon, not a power cut (the demo).
    pub fn partner_on_this_host(&self) -> bool {
        let ip = self.partner_address.ip();
        ip.is_loopback() || (!ip.is_unspecified() && ip == self.listen.ip())
    }

    /// The mirror for journaled volume `name` (journal id `volume_id`), to pass to the journal.
    pub fn add_volume(&self, name: &str, volume_id: u64) -> Arc<VolumeMirror> {
        let m = VolumeMirror::new(
            name.to_string(),
            volume_id,
            self.mirror_timeout,
            Arc::clone(&self.outbox),
            Arc::clone(&self.kill),
        );
        let mut mirrors = self.mirrors.lock().unwrap_or_else(|p| p.into_inner());
        // An HA node reopens its volumes after it gets its disks back: the new mirror replaces
        // the closed volume's.
        mirrors.retain(|old| old.name != name);
        mirrors.push(Arc::clone(&m));
        m
    }

    pub fn mirrors(&self) -> Vec<Arc<VolumeMirror>> {
        self.mirrors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Every mirror in sync (what the HA controller requires before a takeover is allowed).
    pub fn all_in_sync(&self) -> bool {
        self.mirrors().iter().all(|m| m.in_sync())
    }

    fn identity(&self) -> Identity {
        Identity {
            pair_id: self.pair_id,
            node_id: u32::from(self.node_id),
            partner_id: u32::from(self.partner_id),
            generation: self
                .mirrors()
                .iter()
                .map(|m| m.generation())
                .max()
                .unwrap_or(0),
        }
    }

    fn announce(&self, mirrors: &[Arc<VolumeMirror>]) -> Vec<VolumeAnnounce> {
        mirrors
            .iter()
            .filter_map(|m| {
                let meta = m.meta()?;
                Some(VolumeAnnounce {
                    volume: m.volume_id,
                    name: m.name.clone(),
                    generation: m.generation(),
                    log_bytes: meta.log_bytes,
                    store_id: meta.store_id,
                })
            })
            .collect()
    }

    /// Binds the interconnect listener and starts dialing the partner.
    pub async fn start(
        self: &Arc<Self>,
        stop: watch::Receiver<bool>,
    ) -> Result<Vec<tokio::task::JoinHandle<()>>> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .with_context(|| {
                format!(
                    "cannot listen for the interconnect on {} (pair.listen)",
                    self.listen
                )
            })?;
        tracing::info!(listen = %self.listen, partner = %self.partner_address, "interconnect listening");
        Ok(vec![
            tokio::spawn(interconnect::accept_loop(
                Arc::clone(self),
                listener,
                stop.clone(),
            )),
            tokio::spawn(interconnect::dial_loop(Arc::clone(self), stop)),
        ])
    }

    /// Status for `twinctl status` (and the HA controller: `in_sync` per volume).
    pub fn status_json(&self) -> serde_json::Value {
        let mirrors: Vec<_> = self.mirrors().iter().map(|m| m.status_json()).collect();
        serde_json::json!({
            "pair_id": twinblock_pair::wire::format_id(&self.pair_id),
            "node_id": self.node_id,
            "partner_id": self.partner_id,
            "protocol_version": PROTOCOL_VERSION,
            "service_address": self.service_address,
            "partner_service_address": self.partner_service_address,
            "interconnect": {
                "listen": self.listen.to_string(),
                "partner_address": self.partner_address.to_string(),
                "outbound": self.link.json(),
                "direct_sends": self.outbox.stats_json(),
                "inbound": self.inbound.json(),
            },
            "mirror_timeout_ms": self.mirror_timeout.as_millis() as u64,
            "mirrors_in_sync": self.all_in_sync(),
            "mirrors": mirrors,
            "partner_copies": self.receiver.status_json(),
        })
    }

    /// Sends an opaque status record (the HA controller's) to the partner on the interconnect
    /// with the next send; a newer one replaces one not yet sent. Refused when too large.
    ///
    /// It goes on both connections that are up: this node's own (outgoing, with the next batch
    /// of journal records) and the partner's connection to this node (beside its ACKs). So the
    /// path works while either direction can connect, and the partner's heartbeat merge drops
    /// the duplicate when both do.
    pub fn send_status(&self, record: Vec<u8>) -> Result<()> {
        let max = twinblock_pair::wire::MAX_STATUS_BYTES;
        if record.is_empty() || record.len() > max {
            anyhow::bail!(
                "status record of {} bytes (must be 1..={max})",
                record.len()
            );
        }
        *self.status_out.lock().unwrap_or_else(|p| p.into_inner()) = Some(record.clone());
        self.status_watch.send_replace(Some(record));
        self.outbox.wake().notify_one();
        Ok(())
    }

    /// Status records for a connection the partner made to this node: the newest from now on.
    pub(crate) fn status_updates(&self) -> watch::Receiver<Option<Vec<u8>>> {
        let mut rx = self.status_watch.subscribe();
        rx.mark_unchanged();
        rx
    }

    fn take_status(&self) -> Option<Vec<u8>> {
        self.status_out
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// The last status record the partner sent on the interconnect, and when it arrived.
    pub fn partner_status(&self) -> Option<(Instant, Vec<u8>)> {
        self.receiver.last_status()
    }

    /// A journaled volume opened after the current connection's handshake (an HA node brings
    /// its volumes up once it holds its disks): drops the outgoing connection so the next
    /// handshake announces it and the partner opens its copy.
    pub fn reannounce(&self) {
        self.kill.send_modify(|k| *k += 1);
    }

    /// This node's id.
    pub fn node_id(&self) -> u8 {
        self.node_id
    }

    /// Takeover of partner volume `name` (journal id `volume_id`, log of `log_bytes` per
    /// region): closes the receiver's copy and returns the config to open it as the volume's
    /// journal (see [`receiver::Receiver::seize`]). Refused when this node has no copy file.
    pub fn seize_copy(
        &self,
        name: &str,
        volume_id: u64,
        log_bytes: u64,
    ) -> Result<twinblock_journal::NvramConfig> {
        let cfg = self.receiver.copy_config(name, log_bytes);
        if !cfg.path.exists() {
            anyhow::bail!(
                "this node holds no copy of the partner's journal for volume `{name}` ({} is                  missing): the mirror never reached this node, so a takeover would lose the                  partner's acknowledged writes; bring the partner back, or restore its NVRAM",
                cfg.path.display()
            );
        }
        self.receiver.seize(volume_id);
        Ok(cfg)
    }

    /// Giveback of partner volume `name`: its copy follows the partner's stream again. With
    /// `discard`, the copy file is removed first (every record in it was applied by giveback's
    /// final CP; the partner's next LOG_RESET starts a fresh copy, whatever its generation).
    pub fn release_copy(&self, name: &str, volume_id: u64, discard: bool) {
        if discard {
            let path = self.receiver.copy_path(name);
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), "cannot remove the used partner copy: {e}");
                }
            }
        }
        self.receiver.release(volume_id);
    }

    /// True when this node's copy of partner volume `volume_id` follows the partner's stream.
    pub fn partner_copy_ready(&self, volume_id: u64) -> bool {
        self.receiver.copy_ready(volume_id)
    }

    /// True while this node serves partner volume `volume_id` from its copy (a takeover).
    pub fn partner_copy_in_use(&self, volume_id: u64) -> bool {
        self.receiver.copy_in_use(volume_id)
    }

    /// The bytes of every STATUS frame the partner sends from now on (the HA controller's
    /// interconnect heartbeat path); `capacity` frames queue before new ones are dropped.
    pub fn subscribe_status(&self, capacity: usize) -> tokio::sync::mpsc::Receiver<Vec<u8>> {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity.max(1));
        self.receiver.subscribe_status(tx);
        rx
    }

    /// The partner copies' records (seq, log offset, CRC) per partner volume.
    pub fn partner_records_json(&self) -> serde_json::Value {
        self.receiver.records_json()
    }
}
