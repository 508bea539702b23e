//! The node: turns a validated `Config` into open volumes, an NBD server and an admin socket,
//! and runs them until shutdown.
//!
//! Opening (`Node::open`) does everything that can fail because of the config or the disks, so a
//! mistake is reported before anything is served; `Node::run` only binds and serves.

use crate::admin::{self, AdminHandler, Request};
use crate::arrays::ArrayEntry;
use crate::config::Config;
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
    /// `file`, `array` or `journaled-array`.
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
}

pub struct Node {
    config: Config,
    /// What this node's own config serves.
    own: Arc<Site>,
    /// The HA pair's side: the partner's site and the controller (None: no `[ha]` section).
    ha: Option<crate::ha::runtime::HaNode>,
    started: Instant,
}

impl Node {
    /// Open every volume the config names; fail with a clear message on the first problem.
    /// In an HA pair nothing is opened here: the HA controller brings the sites up once it knows
    /// which disks this node may hold.
    pub async fn open(config: Config) -> Result<Arc<Node>> {
        if config.ha.is_some() {
            let (own, ha) = crate::ha::runtime::HaNode::prepare(&config)?;
            return Ok(Arc::new(Node {
                config,
                own,
                ha: Some(ha),
                started: Instant::now(),
            }));
        }
        let own = Arc::new(Site::new(config.clone(), None, 0));
        own.assemble().await?;
        own.open_volumes().await?;
        Ok(Arc::new(Node {
            config,
            own,
            ha: None,
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
                ha.start(self.own.clone()).await?;
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

        on_ready(&bound);
        shutdown.await;
        tracing::info!("shutting down");
        admin_task.abort();
        let _ = std::fs::remove_file(&admin_path);
        self.close().await;
        Ok(())
    }

    /// Clean shutdown: stop serving, apply every journal to its array, then mark the arrays
    /// clean. A failure here loses nothing (the journal is replayed at the next start); it is
    /// only reported. In an HA pair the controller then announces STOPPED.
    pub async fn close(&self) {
        for site in self.sites() {
            site.stop(Teardown::Clean).await;
        }
        if let Some(ha) = &self.ha {
            ha.stop().await;
        }
    }

    fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "node_id": self.config.node.id,
            "name": self.config.node.name,
            "version": env!("CARGO_PKG_VERSION"),
            "admin_protocol": admin::proto::ADMIN_PROTOCOL_VERSION,
            "uptime_s": self.started.elapsed().as_secs(),
            "nbd_listen": self.config.nbd.listen,
            "volumes": self.volumes().iter().map(|v| v.name.clone()).collect::<Vec<_>>(),
            "arrays": self.arrays().into_keys().collect::<Vec<_>>(),
            "nvram": self.config.nvram.as_ref().map(|n| serde_json::json!({
                "path": self.config.resolve(&n.path),
                "persistence": n.persistence,
            })),
        })
    }

    fn volume_json(&self, v: &VolumeInfo) -> serde_json::Value {
        let mut j = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
        let site = self
            .sites()
            .into_iter()
            .find(|s| s.volumes().iter().any(|x| x.name == v.name))
            .unwrap_or(&self.own);
        if let Some(a) = site
            .config()
            .volumes
            .iter()
            .find(|c| c.name == v.name)
            .and_then(|c| c.array.as_ref())
        {
            if let Some(entry) = site.arrays().get(a) {
                let st = entry.status();
                j["state"] = serde_json::json!(if st.failed {
                    "failed"
                } else if st.degraded {
                    "degraded"
                } else {
                    "optimal"
                });
                j["array"] = serde_json::to_value(&st).unwrap_or_default();
            }
        } else {
            j["state"] = serde_json::json!("optimal");
        }
        if let Some(dev) = site.journaled().get(&v.name) {
            j["journal"] = serde_json::to_value(dev.volume().status()).unwrap_or_default();
            j["journal_recovery"] =
                serde_json::to_value(dev.volume().recovery()).unwrap_or_default();
        }
        if let Some(stats) = site.server().and_then(|srv| srv.export_stats(&v.name)) {
            j["stats"] = serde_json::json!({
                "connections_active": stats.connections_active,
                "connections_total": stats.connections_total,
                "read_ops": stats.read_ops,
                "read_bytes": stats.read_bytes,
                "write_ops": stats.write_ops,
                "write_bytes": stats.write_bytes,
                "flush_ops": stats.flush_ops,
                "trim_ops": stats.trim_ops,
                "zero_ops": stats.zero_ops,
                "errors": stats.errors,
            });
        }
        j
    }
}

impl Node {
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
            Request::Status => Ok(self.status()),
            Request::VolumeList => Ok(serde_json::Value::Array(
                self.volumes().iter().map(|v| self.volume_json(v)).collect(),
            )),
            Request::VolumeShow { name } => self
                .volumes()
                .iter()
                .find(|v| v.name == name)
                .map(|v| self.volume_json(v))
                .ok_or_else(|| format!("no volume named `{name}`")),
            Request::DiskFail { array, disk } => self.array(&array)?.fail(&disk).await,
            Request::DiskRemove { array, disk } => self.array(&array)?.remove(&disk).await,
            Request::DiskAdd { array, path } => self.array(&array)?.add(&path).await,
            Request::DiskReplace { array, old, new } => {
                self.array(&array)?.replace(&old, &new).await
            }
            Request::RebuildStatus => Ok(serde_json::Value::Array(
                self.arrays().values().map(|a| a.rebuild_json()).collect(),
            )),
            Request::ScrubStart { array, repair } => self.array(&array)?.start_scrub(repair),
            Request::ScrubStatus => {
                let mut out = Vec::new();
                for a in self.arrays().values() {
                    out.push(a.scrub_json().await);
                }
                Ok(serde_json::Value::Array(out))
            }
            Request::HaStatus => crate::ha::admin::status(self.ha.as_ref()).await,
            Request::HaTakeover => self.ha_command(PairCommand::Takeover).await,
            Request::HaGiveback => self.ha_command(PairCommand::Giveback).await,
            Request::HaTakeoverDisable => self.ha_command(PairCommand::DisableTakeover).await,
            Request::HaTakeoverEnable => self.ha_command(PairCommand::EnableTakeover).await,
        }
    }
}
