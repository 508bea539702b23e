//! The node: turns a validated `Config` into open volumes, an NBD server and an admin socket,
//! and runs them until shutdown.
//!
//! Opening (`Node::open`) does everything that can fail because of the config or the disks, so a
//! mistake is reported before anything is served; `Node::run` only binds and serves.

use crate::admin::{self, AdminHandler, Request};
use crate::arrays::ArrayEntry;
use crate::config::{format_bytes, Config, PersistenceMode, VolumeConfig};
use crate::device::{ArrayBacking, ArrayDevice, JournaledDevice, MemberDevice};
use anyhow::{bail, Context, Result};
use async_trait::async_trait;
use serde::Serialize;
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;
use twinblock_io::file::{FileMember, FileOptions};
use twinblock_io::Member;
use twinblock_journal::{JournaledVolume, Nvram, NvramConfig};
use twinblock_nbd::{BlockDevice, Export, Server, ServerConfig};

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
    server: Server,
    volumes: Vec<VolumeInfo>,
    arrays: BTreeMap<String, ArrayEntry>,
    /// Journaled volumes by name, for status and the clean-shutdown checkpoint.
    journaled: BTreeMap<String, Arc<JournaledDevice>>,
    started: Instant,
}

impl Node {
    /// Open every volume the config names; fail with a clear message on the first problem.
    pub async fn open(config: Config) -> Result<Arc<Node>> {
        let server = Server::new(ServerConfig {
            max_request_bytes: u32::try_from(config.nbd.max_request.bytes())
                .context("nbd.max_request does not fit in 32 bits")?,
            ..ServerConfig::default()
        });
        let mut arrays = BTreeMap::new();
        for a in &config.arrays {
            let entry = ArrayEntry::open(&config, a)
                .await
                .with_context(|| format!("array `{}`", a.name))?;
            arrays.insert(a.name.clone(), entry);
        }
        let mut volumes = Vec::new();
        let mut journaled = BTreeMap::new();
        for v in &config.volumes {
            let (device, info) = match &v.array {
                None => open_volume(&config, v).await,
                Some(a) => open_array_volume(&config, v, &arrays[a.as_str()], &mut journaled).await,
            }
            .with_context(|| format!("volume `{}`", v.name))?;
            server
                .add_export(Export {
                    name: v.name.clone(),
                    description: info.description.clone(),
                    device,
                })
                .with_context(|| format!("volume `{}`", v.name))?;
            tracing::info!(
                volume = %v.name,
                size = %format_bytes(info.size),
                backing = %info.backing,
                engine = %info.io_engine,
                direct = info.direct_io,
                "volume ready"
            );
            volumes.push(info);
        }
        if let Some(def) = &config.nbd.default_export {
            server.set_default_export(Some(def.clone()))?;
        } else if volumes.len() == 1 {
            // One volume: let clients that send an empty export name reach it.
            server.set_default_export(Some(volumes[0].name.clone()))?;
        }
        Ok(Arc::new(Node {
            config,
            server,
            volumes,
            arrays,
            journaled,
            started: Instant::now(),
        }))
    }

    pub fn volumes(&self) -> &[VolumeInfo] {
        &self.volumes
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Bind the NBD listeners and the admin socket, then serve until `shutdown` resolves.
    /// Returns the bound NBD addresses through `on_ready` before serving (for the demo and tests).
    pub async fn run(
        self: Arc<Self>,
        shutdown: impl Future<Output = ()> + Send + 'static,
        on_ready: impl FnOnce(&[std::net::SocketAddr]) + Send,
    ) -> Result<()> {
        let mut tasks = tokio::task::JoinSet::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut bound = Vec::new();
        for addr in &self.config.nbd.listen {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen for NBD on {addr}"))?;
            let local = listener.local_addr()?;
            bound.push(local);
            tracing::info!("serving NBD on {local}");
            let server = self.server.clone();
            let mut rx = stop_rx.clone();
            tasks.spawn(async move {
                server
                    .serve_tcp(listener, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await
            });
        }
        if let Some(unix) = &self.config.nbd.unix {
            let path = self.config.resolve(unix);
            let listener = admin::server::bind(&path)
                .await
                .with_context(|| format!("cannot listen for NBD on {}", path.display()))?;
            tracing::info!("serving NBD on unix socket {}", path.display());
            let server = self.server.clone();
            let mut rx = stop_rx.clone();
            tasks.spawn(async move {
                server
                    .serve_unix(listener, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await
            });
        }
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
        let _ = stop_tx.send(true);
        admin_task.abort();
        let _ = std::fs::remove_file(&admin_path);
        while let Some(r) = tasks.join_next().await {
            match r {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::warn!("listener ended with error: {e}"),
                Err(e) => tracing::warn!("listener task failed: {e}"),
            }
        }
        self.close().await;
        Ok(())
    }

    /// Clean shutdown: apply every journal to its array, then mark the arrays clean. A failure
    /// here loses nothing (the journal is replayed at the next start); it is only reported.
    pub async fn close(&self) {
        for (name, dev) in &self.journaled {
            if let Err(e) = dev.volume().checkpoint().await {
                tracing::warn!(volume = %name, "final consistency point failed (the journal will be replayed at next start): {e}");
            }
        }
        for (name, a) in &self.arrays {
            if let Err(e) = a.array.close().await {
                tracing::warn!(array = %name, "array close failed: {e}");
            }
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
            "volumes": self.volumes.iter().map(|v| &v.name).collect::<Vec<_>>(),
            "arrays": self.arrays.keys().collect::<Vec<_>>(),
            "nvram": self.config.nvram.as_ref().map(|n| serde_json::json!({
                "path": self.config.resolve(&n.path),
                "persistence": n.persistence,
            })),
        })
    }

    fn volume_json(&self, v: &VolumeInfo) -> serde_json::Value {
        let mut j = serde_json::to_value(v).unwrap_or(serde_json::Value::Null);
        if let Some(a) = self
            .config
            .volumes
            .iter()
            .find(|c| c.name == v.name)
            .and_then(|c| c.array.as_ref())
        {
            if let Some(entry) = self.arrays.get(a) {
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
        if let Some(dev) = self.journaled.get(&v.name) {
            j["journal"] = serde_json::to_value(dev.volume().status()).unwrap_or_default();
            j["journal_recovery"] =
                serde_json::to_value(dev.volume().recovery()).unwrap_or_default();
        }
        if let Some(stats) = self.server.export_stats(&v.name) {
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
    fn array(&self, name: &str) -> Result<&ArrayEntry, String> {
        self.arrays.get(name).ok_or_else(|| {
            format!(
                "no array named `{name}` (arrays: {})",
                self.arrays.keys().cloned().collect::<Vec<_>>().join(", ")
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
                self.volumes.iter().map(|v| self.volume_json(v)).collect(),
            )),
            Request::VolumeShow { name } => self
                .volumes
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
                self.arrays.values().map(|a| a.rebuild_json()).collect(),
            )),
            Request::ScrubStart { array, repair } => self.array(&array)?.start_scrub(repair),
            Request::ScrubStatus => {
                let mut out = Vec::new();
                for a in self.arrays.values() {
                    out.push(a.scrub_json().await);
                }
                Ok(serde_json::Value::Array(out))
            }
        }
    }
}

/// A volume on an array, through the journal when the config says so.
async fn open_array_volume(
    config: &Config,
    v: &VolumeConfig,
    entry: &ArrayEntry,
    journaled: &mut BTreeMap<String, Arc<JournaledDevice>>,
) -> Result<(Arc<dyn BlockDevice>, VolumeInfo)> {
    let array = entry.array.clone();
    let st = array.status();
    let mut info = VolumeInfo {
        name: v.name.clone(),
        description: v.description.clone().unwrap_or_else(|| {
            format!(
                "twinblock RAID {} volume on {}",
                st.level.code(),
                entry.name
            )
        }),
        kind: "array",
        size: array.size(),
        read_only: v.read_only,
        backing: entry.name.clone(),
        io_engine: entry.io_engine.to_string(),
        direct_io: entry.direct_io,
        nvram: None,
    };
    if !v.journal {
        return Ok((Arc::new(ArrayDevice::new(array, v.read_only)), info));
    }
    let (Some(nv), Some(path)) = (&config.nvram, config.volume_nvram_path(v)) else {
        bail!("journal = true needs an [nvram] section");
    };
    // Two regions (own, partner) share the file; leave room for the header and control slots.
    const NVRAM_OVERHEAD_BYTES: u64 = 1 << 20;
    let per_region = (nv.size.bytes().saturating_sub(NVRAM_OVERHEAD_BYTES) / 2) & !4095;
    let nvram = Nvram::open(&NvramConfig {
        path: path.clone(),
        persistence: match nv.persistence {
            PersistenceMode::None => twinblock_journal::PersistenceMode::None,
            PersistenceMode::Msync => twinblock_journal::PersistenceMode::Msync,
            PersistenceMode::Pmem => twinblock_journal::PersistenceMode::Pmem,
        },
        node_id: u32::from(config.node.id),
        pair_id: *config.pair_id().as_bytes(),
        log_bytes_per_region: per_region,
        create_if_missing: true,
    })
    .with_context(|| format!("NVRAM file {}", path.display()))?;
    let volume = JournaledVolume::open(
        nvram,
        ArrayBacking { array },
        journal_volume_id(&v.name),
        twinblock_journal::VolumeConfig {
            cp_interval_ms: nv.cp_interval_ms,
            ..Default::default()
        },
    )
    .await
    .with_context(|| format!("journal recovery from {}", path.display()))?;
    let r = volume.recovery();
    tracing::info!(
        volume = %v.name,
        replayed = r.replayed_records,
        skipped_retired = r.skipped_retired_records,
        damaged_tail_discarded = r.damaged_tail_discarded,
        "journal recovered"
    );
    let dev = Arc::new(JournaledDevice::new(volume, v.read_only));
    journaled.insert(v.name.clone(), dev.clone());
    info.kind = "journaled-array";
    info.nvram = Some(path.display().to_string());
    Ok((dev, info))
}

/// A stable 64-bit id for a volume's journal records, from its name.
fn journal_volume_id(name: &str) -> u64 {
    // FNV-1a: stable across builds and platforms, unlike the std hasher.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

async fn open_volume(
    config: &Config,
    v: &VolumeConfig,
) -> Result<(Arc<dyn BlockDevice>, VolumeInfo)> {
    let Some(file) = &v.file else {
        bail!("array-backed volumes are not available in this build");
    };
    let path = config.resolve(file);
    let member = open_image(&path, v).await?;
    let map = std::fs::File::open(&path)
        .ok()
        .filter(|f| f.metadata().map(|m| m.is_file()).unwrap_or(false));
    let info = VolumeInfo {
        name: v.name.clone(),
        description: v
            .description
            .clone()
            .unwrap_or_else(|| format!("twinblock image {}", path.display())),
        kind: "file",
        size: member.size(),
        read_only: v.read_only,
        backing: path.display().to_string(),
        io_engine: member.engine().to_string(),
        direct_io: member.direct(),
        nvram: None,
    };
    let device = MemberDevice::new(member, v.read_only, map);
    Ok((Arc::new(device), info))
}

async fn open_image(path: &Path, v: &VolumeConfig) -> Result<Arc<FileMember>> {
    let exists = path.exists();
    if !exists && v.read_only {
        bail!(
            "image {} does not exist, and a read-only volume is never created",
            path.display()
        );
    }
    if !exists && v.size.is_none() {
        bail!(
            "image {} does not exist; create it, or set `size` in the volume's config to have \
             twinblockd create it",
            path.display()
        );
    }
    if !exists {
        if let Some(why) = crate::disk_check::missing_directory(path) {
            bail!("{why}");
        }
    }
    let member = FileMember::open(
        path,
        &FileOptions {
            direct: v.direct_io,
            read_only: v.read_only,
            create_size: if exists {
                None
            } else {
                v.size.map(|s| s.bytes())
            },
            engine: Default::default(),
        },
    )
    .with_context(|| format!("cannot open image {}", path.display()))?;
    if let Some(want) = v.size {
        if exists && member.size() != want.bytes() {
            bail!(
                "image {} is {} but the config says size = {}; fix `size` (or remove it to \
                 use the image as it is)",
                path.display(),
                format_bytes(member.size()),
                format_bytes(want.bytes()),
            );
        }
    }
    Ok(member)
}
