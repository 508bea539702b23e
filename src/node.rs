//! The node: turns a validated `Config` into open volumes, an NBD server and an admin socket,
//! and runs them until shutdown.
//!
//! Opening (`Node::open`) does everything that can fail because of the config or the disks, so a
//! mistake is reported before anything is served; `Node::run` only binds and serves.

use crate::admin::reply::{to_result, ExportCounters, NodeStatus, NvramSummary, VolumeReply};
use crate::admin::{self, AdminHandler, Request};
use crate::arrays::ArrayEntry;
use crate::config::{format_bytes, Config, VolumeConfig};
use crate::device::{ArrayBacking, ArrayDevice, JournaledDevice, MemberDevice};
use crate::pair::receiver::record_json;
use crate::pair::{LogSource, Pair, VolumeMeta};
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
use twinblock_journal::{Backing, JournaledVolume, MirrorHook, NoMirror, Nvram, NvramConfig};
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
    /// The HA pair's mirror, when the config has a `[pair]` section.
    pair: Option<Arc<Pair>>,
    started: Instant,
}

impl Node {
    /// Open every volume the config names; fail with a clear message on the first problem.
    pub async fn open(config: Config) -> Result<Arc<Node>> {
        let server = Server::new(ServerConfig {
            max_request_bytes: u32::try_from(config.nbd.max_request.bytes())
                .context("nbd.max_request does not fit in 32 bits")?,
            max_connections: config.nbd.max_connections,
            shutdown_grace: std::time::Duration::from_millis(config.nbd.shutdown_grace_ms),
            tls: config.nbd_tls()?,
            ..ServerConfig::default()
        });
        let pair = Pair::from_config(&config).context("[pair]")?;
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
                Some(a) => {
                    open_array_volume(
                        &config,
                        v,
                        &arrays[a.as_str()],
                        &mut journaled,
                        pair.as_deref(),
                    )
                    .await
                }
            }
            .with_context(|| format!("volume `{}`", v.name))?;
            let access = v
                .nbd_access()
                .map_err(anyhow::Error::msg)
                .with_context(|| format!("volume `{}`", v.name))?;
            server
                .add_export_with_access(
                    Export {
                        name: v.name.clone(),
                        description: info.description.clone(),
                        device,
                    },
                    access,
                )
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
            pair,
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
        let pair_tasks = match &self.pair {
            Some(p) => p.start(stop_rx.clone()).await?,
            None => Vec::new(),
        };

        on_ready(&bound);
        shutdown.await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
        admin_task.abort();
        for t in pair_tasks {
            t.abort();
        }
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

    fn status(&self) -> NodeStatus {
        NodeStatus {
            node_id: self.config.node.id,
            name: self.config.node.name.clone(),
            version: env!("CARGO_PKG_VERSION"),
            admin_protocol: admin::proto::ADMIN_PROTOCOL_VERSION,
            uptime_s: self.started.elapsed().as_secs(),
            nbd_listen: self.config.nbd.listen.clone(),
            volumes: self.volumes.iter().map(|v| v.name.clone()).collect(),
            arrays: self.arrays.keys().cloned().collect(),
            nvram: self.config.nvram.as_ref().map(|n| NvramSummary {
                path: self.config.resolve(&n.path),
                persistence: n.persistence,
            }),
            pair: self.pair.as_ref().map(|p| p.status_json()),
        }
    }

    fn volume_reply<'a>(&'a self, v: &'a VolumeInfo) -> VolumeReply<'a> {
        let array = self
            .config
            .volumes
            .iter()
            .find(|c| c.name == v.name)
            .and_then(|c| c.array.as_ref())
            .and_then(|a| self.arrays.get(a))
            .map(|entry| entry.status());
        let state = match &array {
            Some(st) if st.failed => "failed",
            Some(st) if st.degraded => "degraded",
            _ => "optimal",
        };
        let journal = self.journaled.get(&v.name).map(|dev| dev.volume());
        VolumeReply {
            info: v,
            state,
            array,
            journal: journal.map(|j| j.status()),
            journal_recovery: journal.map(|j| j.recovery()),
            stats: self.server.export_stats(&v.name).map(ExportCounters::from),
        }
    }
}

impl Node {
    fn mirror_records(&self) -> serde_json::Value {
        let own: serde_json::Map<String, serde_json::Value> = self
            .journaled
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
            Request::Status => to_result(&self.status()),
            Request::VolumeList => to_result(
                &self
                    .volumes
                    .iter()
                    .map(|v| self.volume_reply(v))
                    .collect::<Vec<_>>(),
            ),
            Request::VolumeShow { name } => match self.volumes.iter().find(|v| v.name == name) {
                Some(v) => to_result(&self.volume_reply(v)),
                None => Err(format!("no volume named `{name}`")),
            },
            Request::DiskFail { array, disk } => self.array(&array)?.fail(&disk).await,
            Request::DiskRemove { array, disk } => self.array(&array)?.remove(&disk).await,
            Request::DiskAdd { array, path } => self.array(&array)?.add(&path).await,
            Request::DiskReplace { array, old, new } => {
                self.array(&array)?.replace(&old, &new).await
            }
            Request::RebuildStatus => to_result(
                &self
                    .arrays
                    .values()
                    .map(|a| a.rebuild_line())
                    .collect::<Vec<_>>(),
            ),
            Request::ScrubStart { array, repair } => self.array(&array)?.start_scrub(repair),
            Request::MirrorRecords => Ok(self.mirror_records()),
            Request::ScrubStatus => {
                let mut out = Vec::new();
                for a in self.arrays.values() {
                    out.push(a.scrub_line().await);
                }
                to_result(&out)
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
    pair: Option<&Pair>,
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
        persistence: nv.persistence,
        node_id: u32::from(config.node.id),
        pair_id: *config.pair_id().as_bytes(),
        log_bytes_per_region: per_region,
        create_if_missing: true,
    })
    .with_context(|| format!("NVRAM file {}", path.display()))?;
    let volume_id = journal_volume_id(&v.name);
    let mirror = pair.map(|p| p.add_volume(&v.name, volume_id));
    let hook: Arc<dyn MirrorHook> = match &mirror {
        Some(m) => m.clone(),
        None => Arc::new(NoMirror),
    };
    let volume = JournaledVolume::open_with_mirror(
        nvram,
        ArrayBacking { array },
        volume_id,
        twinblock_journal::VolumeConfig {
            cp_interval_ms: nv.cp_interval_ms,
            ..Default::default()
        },
        hook,
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
    if volume.ack_survives_power_loss() {
        tracing::info!(
            volume = %v.name,
            nvram = %path.display(),
            "acknowledged writes survive a daemon crash and a loss of host power (NVRAM on a persistent medium)"
        );
    } else {
        tracing::warn!(
            volume = %v.name,
            nvram = %path.display(),
            "acknowledged writes survive a daemon crash only, not a loss of host power (NVRAM in RAM: persistence \"none\" or a tmpfs file); FLUSH and FUA wait for a consistency point"
        );
    }
    let meta = VolumeMeta {
        store_id: volume.backing().store_id().unwrap_or([0; 16]),
        log_bytes: volume.status().log_bytes,
    };
    let dev = Arc::new(JournaledDevice::new(volume, v.read_only));
    if let Some(m) = mirror {
        let source: Arc<dyn LogSource> = dev.clone();
        m.attach(Arc::downgrade(&source), meta);
    }
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
