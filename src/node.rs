//! The node: turns a validated `Config` into open volumes, an NBD server and an admin socket,
//! and runs them until shutdown.
//!
//! Opening (`Node::open`) does everything that can fail because of the config or the disks, so a
//! mistake is reported before anything is served; `Node::run` only binds and serves.

use crate::admin::reply::{to_result, ExportCounters, NodeStatus, NvramSummary, VolumeReply};
use crate::admin::{self, AdminHandler, Request};
use crate::arrays::ArrayEntry;
use crate::config::Config;
use crate::pair::receiver::record_json;
use crate::pair::Pair;
use crate::site::{Site, Teardown};
use anyhow::{Context, Result};
use async_trait::async_trait;
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Instant;
use twinblock_pair::state::Command as PairCommand;

/// What the admin API reports about one volume.
#[derive(Debug, Clone, Serialize)]
pub struct VolumeInfo {
    pub name: String,
    pub description: String,
    /// `file`, `array` or `journaled_array`.
    pub kind: &'static str,
    pub size: u64,
    pub read_only: bool,
    /// The image path, or the array name.
    pub backing: String,
    /// Member I/O engine (`io_uring` or `thread-pool`) and whether O_DIRECT is active.
    pub io_engine: String,
    pub direct_io: bool,
    /// The NVRAM file of a journaled volume.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nvram: Option<String>,
    /// The volume's read cache (None: `read_cache = 0`); its counters are in the reply's
    /// `read_cache`.
    #[serde(skip)]
    pub cache: Option<Arc<crate::cache::ReadCache>>,
}

pub struct Node {
    config: Config,
    /// What this node's own config serves.
    own: Arc<Site>,
    /// The HA pair's side: the partner's site and the controller (None: no `[ha]` section).
    ha: Option<crate::ha::runtime::HaNode>,
    /// The HA pair's NVRAM mirror, when the config has a `[pair]` section.
    pair: Option<Arc<Pair>>,
    started: Instant,
}

impl Node {
    /// Open every volume the config names; fail with a clear message on the first problem.
    /// In an HA pair nothing is opened here: the HA controller brings the sites up once it knows
    /// which disks this node may hold.
    pub async fn open(config: Config) -> Result<Arc<Node>> {
        let pair = Pair::from_config(&config).context("[pair]")?;
        if config.ha.is_some() {
            let (own, ha) = crate::ha::runtime::HaNode::prepare(&config)?;
            own.set_pair(pair.clone());
            return Ok(Arc::new(Node {
                config,
                own,
                ha: Some(ha),
                pair,
                started: Instant::now(),
            }));
        }
        let own = Arc::new(Site::new(config.clone(), None, 0));
        own.set_pair(pair.clone());
        own.assemble().await?;
        own.open_volumes().await?;
        Ok(Arc::new(Node {
            config,
            own,
            ha: None,
            pair,
            started: Instant::now(),
        }))
    }

    /// Every volume served now (the partner's too, during a takeover).
    pub fn volumes(&self) -> Vec<VolumeInfo> {
        let mut v = self.own.volumes();
        if let Some(ha) = &self.ha {
            v.extend(ha.partner().volumes());
        }
        v
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The sites whose parts are open now: own first.
    fn sites(&self) -> Vec<&Site> {
        let mut s = vec![&*self.own];
        if let Some(ha) = &self.ha {
            s.push(ha.partner());
        }
        s
    }

    /// Bind the NBD listeners and the admin socket, then serve until `shutdown` resolves.
    /// Returns the bound NBD addresses through `on_ready` before serving (for the demo and tests;
    /// empty in an HA pair, where the controller binds once the disks are held).
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()> + Send + 'static,
        on_ready: impl FnOnce(&[std::net::SocketAddr]) + Send,
    ) -> Result<()> {
        let bound = match &self.ha {
            None => self.own.serve().await?,
            Some(ha) => {
                ha.start(self.own.clone(), self.pair.clone()).await?;
                Vec::new()
            }
        };
        let admin_path = self.config.admin_socket();
        let admin_listener = admin::server::bind(&admin_path)
            .await
            .with_context(|| format!("cannot open admin socket {}", admin_path.display()))?;
        tracing::info!("admin socket {}", admin_path.display());
        let handler: Arc<dyn AdminHandler> = self.clone();
        let admin_task = tokio::spawn(admin::server::serve(admin_listener, handler));
        let (pair_stop_tx, pair_stop_rx) = tokio::sync::watch::channel(false);
        let pair_tasks = match &self.pair {
            Some(p) => p.start(pair_stop_rx).await?,
            None => Vec::new(),
        };

        let metrics_task = match &self.config.metrics {
            Some(m) => {
                let listener = tokio::net::TcpListener::bind(&m.listen)
                    .await
                    .with_context(|| format!("cannot listen for metrics on {}", m.listen))?;
                tracing::info!("metrics on http://{}/metrics", m.listen);
                let node = self.clone();
                let source: crate::metrics::http::Source = Arc::new(move || {
                    let node = node.clone();
                    Box::pin(async move { node.metrics_text().await })
                });
                Some(tokio::spawn(crate::metrics::http::serve(listener, source)))
            }
            None => None,
        };

        on_ready(&bound);
        shutdown.await;
        tracing::info!("shutting down");
        let _ = pair_stop_tx.send(true);
        admin_task.abort();
        if let Some(t) = metrics_task {
            t.abort();
        }
        for t in pair_tasks {
            t.abort();
        }
        let _ = std::fs::remove_file(&admin_path);
        self.close().await;
        Ok(())
    }

    /// Clean shutdown: stop serving, apply every journal to its array, then mark the arrays
    /// clean. A failure here loses nothing (the journal is replayed at the next start); it is
    /// only reported. In an HA pair the controller then announces STOPPED.
    pub async fn close(&self) {
        for site in self.sites() {
            // Shutdown, not Clean: the partner copies of a takeover stay for the next start.
            let stopped = site.stop(Teardown::Shutdown).await;
            if !stopped.unfenced.is_empty() {
                // The reservation stays with this node (shutdown releases nothing), so the
                // next start resumes serving them from the copies (kept by a shutdown whether
                // fenced or not).
                tracing::error!(
                    arrays = ?stopped.unfenced,
                    "shutdown left partner arrays unfenced: their reservation is kept; the next \
                     start serves them again and a giveback must fence them"
                );
            }
        }
        if let Some(ha) = &self.ha {
            ha.stop().await;
        }
    }

    /// The Prometheus exposition text: NBD counters of every serving site, then the node's own.
    pub async fn metrics_text(&self) -> String {
        let mut texts = Vec::new();
        let mut sample = crate::metrics::NodeSample {
            node_id: self.config.node.id,
            uptime_s: self.started.elapsed().as_secs(),
            arrays: self.arrays().values().map(|a| a.status()).collect(),
            pair: self.pair.as_ref().map(|p| p.status_json()),
            ..Default::default()
        };
        for site in self.sites() {
            if let Some(srv) = site.server() {
                texts.push(srv.metrics_text());
            }
            for (name, dev) in site.journaled() {
                sample.journals.push((name, dev.volume().status()));
            }
            for v in site.volumes() {
                if let Some(c) = &v.cache {
                    sample.read_caches.push((v.name.clone(), c.stats()));
                }
            }
        }
        if self.ha.is_some() {
            // Skipped (not an error) while the HA controller is still starting.
            sample.ha = crate::ha::admin::status(self.ha.as_ref()).await.ok();
        }
        texts.push(crate::metrics::render(&sample));
        crate::metrics::merge(&texts)
    }

    fn status(&self) -> NodeStatus {
        NodeStatus {
            node_id: self.config.node.id,
            name: self.config.node.name.clone(),
            version: env!("CARGO_PKG_VERSION"),
            admin_protocol: admin::proto::ADMIN_PROTOCOL_VERSION,
            uptime_s: self.started.elapsed().as_secs(),
            nbd_listen: self.config.nbd.listen.clone(),
            volumes: self.volumes().iter().map(|v| v.name.clone()).collect(),
            arrays: self.arrays().into_keys().collect(),
            nvram: self.config.nvram.as_ref().map(|n| NvramSummary {
                path: self.config.resolve(&n.path),
                persistence: n.persistence,
            }),
            pair: self.pair.as_ref().map(|p| p.status_json()),
            volumes_held: self.sites().iter().flat_map(|s| s.held()).collect(),
        }
    }

    /// One volume's admin reply, from whichever site serves it (own or, in a takeover, the
    /// partner's).
    fn volume_json(&self, v: &VolumeInfo) -> Result<serde_json::Value, String> {
        let site = self
            .sites()
            .into_iter()
            .find(|s| s.volumes().iter().any(|x| x.name == v.name))
            .unwrap_or(&self.own);
        let array = site
            .config()
            .volumes
            .iter()
            .find(|c| c.name == v.name)
            .and_then(|c| c.array.as_ref())
            .and_then(|a| site.arrays().get(a).map(|entry| entry.status()));
        let state = match &array {
            Some(st) if st.failed => "failed",
            Some(st) if st.degraded => "degraded",
            _ => "optimal",
        };
        let journaled = site.journaled();
        let journal = journaled.get(&v.name).map(|dev| dev.volume());
        to_result(&VolumeReply {
            info: v,
            state,
            array,
            journal: journal.map(|j| j.status()),
            journal_recovery: journal.map(|j| j.recovery()),
            read_cache: v.cache.as_ref().map(|c| c.stats()),
            stats: site
                .server()
                .and_then(|srv| srv.export_stats(&v.name))
                .map(ExportCounters::from),
            history: crate::history::read(&site.config().data_dir(), &v.name),
        })
    }

    /// A held volume's admin reply (not served: its NVRAM log was lost).
    fn held_json(&self, name: &str) -> Option<serde_json::Value> {
        self.sites().into_iter().find_map(|site| {
            let held = site.held().into_iter().find(|h| h.name == name)?;
            Some(serde_json::json!({
                "name": name,
                "state": "held",
                "held": held,
                "history": crate::history::read(&site.config().data_dir(), name),
            }))
        })
    }

    /// The volumes this node answers for: those it serves and those held after an NVRAM loss.
    fn volume_names(&self) -> Vec<String> {
        let held = self.sites().into_iter().flat_map(|s| s.held());
        self.volumes()
            .iter()
            .map(|v| v.name.clone())
            .chain(held.map(|h| h.name))
            .collect()
    }

    /// The refusal for a volume name this node does not know, listing the ones it does.
    fn unknown_volume(&self, name: &str) -> String {
        let mut known = self.volume_names();
        known.sort();
        known.dedup();
        format!(
            "no volume named `{name}` (volumes: {}); nothing was changed",
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        )
    }

    /// `twinctl journal accept-loss`: serves a held volume on a new log.
    async fn accept_loss(&self, name: &str) -> Result<serde_json::Value, String> {
        if !self.volume_names().iter().any(|v| v == name) {
            return Err(self.unknown_volume(name));
        }
        for site in self.sites() {
            if site.held().iter().any(|h| h.name == name) {
                let info = site.accept_loss(name).await.map_err(|e| format!("{e:#}"))?;
                // With a partner, opening tries its copy again first: it may have come back.
                let restored = crate::history::read(&site.config().data_dir(), name)
                    .last()
                    .is_some_and(|e| e.event == "nvram-restored-from-partner");
                let message = if restored {
                    format!(
                        "volume `{name}` serves again: its NVRAM log was restored from the \
                         partner's copy, nothing was lost"
                    )
                } else {
                    format!(
                        "volume `{name}` serves again on a new NVRAM log; the writes acknowledged \
                         after its last consistency point are lost (kept in `twinctl volume show {name}`)"
                    )
                };
                return Ok(serde_json::json!({ "message": message, "volume": info }));
            }
        }
        Err(format!(
            "volume `{name}` is not waiting for an NVRAM loss to be accepted (only volumes listed \
             as held by `twinctl status` are); nothing was changed"
        ))
    }
}

impl Node {
    /// The journal records the mirror covers: this node's own unretired records per journaled
    /// volume, and its copies of the partner's.
    fn mirror_records(&self) -> serde_json::Value {
        let own: serde_json::Map<String, serde_json::Value> = self
            .own
            .journaled()
            .iter()
            .map(|(name, dev)| {
                let list = dev
                    .volume()
                    .unretired_records()
                    .records
                    .iter()
                    .map(|r| record_json(r.seq, r.log_offset, &r.bytes))
                    .collect();
                (name.clone(), serde_json::Value::Array(list))
            })
            .collect();
        serde_json::json!({
            "own": own,
            "partner": self.pair.as_ref().map(|p| p.partner_records_json()),
        })
    }

    async fn ha_command(&self, cmd: PairCommand) -> Result<serde_json::Value, String> {
        crate::ha::admin::operator(self.ha.as_ref(), cmd).await
    }

    /// Every open array, own first (an own array shadows a partner's of the same name).
    fn arrays(&self) -> BTreeMap<String, Arc<ArrayEntry>> {
        let mut all = BTreeMap::new();
        for site in self.sites().into_iter().rev() {
            all.extend(site.arrays());
        }
        all
    }

    fn array(&self, name: &str) -> Result<Arc<ArrayEntry>, String> {
        let arrays = self.arrays();
        arrays.get(name).cloned().ok_or_else(|| {
            format!(
                "no array named `{name}` (arrays: {})",
                arrays.keys().cloned().collect::<Vec<_>>().join(", ")
            )
        })
    }
}

#[async_trait]
impl AdminHandler for Node {
    async fn handle(&self, req: Request) -> Result<serde_json::Value, String> {
        match req {
            Request::Status => to_result(&self.status()),
            Request::VolumeList => Ok(serde_json::Value::Array(
                self.volumes()
                    .iter()
                    .map(|v| self.volume_json(v))
                    .collect::<Result<Vec<_>, String>>()?,
            )),
            Request::VolumeShow { name } => match self.volumes().iter().find(|v| v.name == name) {
                Some(v) => self.volume_json(v),
                None => self
                    .held_json(&name)
                    .ok_or_else(|| self.unknown_volume(&name)),
            },
            Request::JournalAcceptLoss { name } => self.accept_loss(&name).await,
            Request::DiskFail { array, disk } => self.array(&array)?.fail(&disk).await,
            Request::DiskRemove { array, disk } => self.array(&array)?.remove(&disk).await,
            Request::DiskAdd { array, path } => self.array(&array)?.add(&path).await,
            Request::DiskReplace { array, old, new } => {
                self.array(&array)?.replace(&old, &new).await
            }
            Request::RebuildStatus => to_result(
                &self
                    .arrays()
                    .values()
                    .map(|a| a.rebuild_line())
                    .collect::<Vec<_>>(),
            ),
            Request::ScrubStart { array, repair } => self.array(&array)?.start_scrub(repair),
            Request::MirrorRecords => Ok(self.mirror_records()),
            Request::ScrubStatus => {
                let mut out = Vec::new();
                for a in self.arrays().values() {
                    out.push(a.scrub_line().await);
                }
                to_result(&out)
            }
            Request::HaStatus => crate::ha::admin::status(self.ha.as_ref()).await,
            Request::HaTakeover => self.ha_command(PairCommand::Takeover).await,
            Request::HaGiveback => self.ha_command(PairCommand::Giveback).await,
            Request::HaTakeoverDisable => self.ha_command(PairCommand::DisableTakeover).await,
            Request::HaTakeoverEnable => self.ha_command(PairCommand::EnableTakeover).await,
        }
    }
}
