//! A site: what one node's config serves (its arrays, volumes, journaled devices, and one NBD
//! server on that config's listen addresses), brought up and torn down in steps.
//!
//! A node without HA opens its own site at start and serves it until shutdown, as it always did.
//! In an HA pair the node owns two sites: its own, and its partner's (built from the partner's
//! config file), and the HA executor drives each through the state machine's operations:
//!
//! | op | site step |
//! | --- | --- |
//! | Assemble | [`Site::assemble`]: open the disks, assemble (or create) the arrays |
//! | Replay | [`Site::open_volumes`]: open the volumes, journal recovery included, add exports |
//! | Serve | [`Site::serve`]: bind the listen addresses (retrying while a dead partner's port is still held) |
//! | Checkpoint | [`Site::checkpoint`]: apply every journal to its array |
//! | StopServing | [`Site::stop`] (`Teardown::Clean`): listeners down, connections closed, arrays closed; a daemon shutdown uses `Teardown::Shutdown`, which keeps the partner copies |
//! | Fence | [`Site::stop`] (`Teardown::Fenced`): the same, but nothing written to the disks |
//!
//! Every step is idempotent where the state machine may repeat it (a retried bring-up), and the
//! site's parts are behind a short-held mutex: admin requests read a consistent snapshot while
//! the executor swaps parts in and out.

use crate::admin;
use crate::arrays::{ArrayEntry, MemberWrap};
use crate::cache::ReadCache;
use crate::config::{format_bytes, Config, VolumeConfig};
use crate::device::member::CacheScope;
use crate::device::{ArrayBacking, ArrayDevice, JournaledDevice, MemberDevice};
use crate::ha::gate::WriteGate;
use crate::node::VolumeInfo;
use crate::pair::{LogSource, Pair, VolumeMeta};
use anyhow::{bail, Context, Result};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;
use tokio::task::JoinSet;
use twinblock_io::file::{FileMember, FileOptions};
use twinblock_io::Member;
use twinblock_journal::{
    Backing, JournalError, JournaledVolume, MirrorHook, NoMirror, Nvram, NvramConfig,
};
use twinblock_nbd::{BlockDevice, Export, Server, ServerConfig};

/// How often a bind of a listen address still in use is retried.
const BIND_RETRY_INTERVAL_MS: u64 = 50;

/// Builds the write gate of one array (HA sites only): given the array's disk paths.
pub type GateFactory = Box<dyn Fn(&[PathBuf]) -> Arc<WriteGate> + Send + Sync>;

/// The HA fences of a site: one gate per array (lease + reservations, checked before array
/// writes) and a wrapper per disk (reservation, checked at member submission).
pub struct Fences {
    pub gates: GateFactory,
    pub members: MemberWrap,
}

/// How [`Site::stop`] leaves the disks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Teardown {
    /// Arrays closed (superblocks marked clean): this node still holds the disks. A partner
    /// array this stop fenced gives its copy up (it is given back: everything in the copy is
    /// applied, and the partner's own log is fenced below its applied seq).
    Clean,
    /// The daemon shuts down: the same final CP, fence and array close as [`Teardown::Clean`],
    /// but the partner copies stay. Shutdown releases no reservation, so the next start still
    /// holds the partner's disks and resumes the takeover from those copies; a giveback (a
    /// `Clean` stop) removes them later. Removing them here left that start nothing to resume
    /// from, and it backed out, leaving the partner's volumes unserved while the partner was
    /// still down.
    Shutdown,
    /// Nothing written: another node holds the disks now. Arrays and journals are dropped.
    Fenced,
}

/// One config's arrays, volumes and NBD server.
pub struct Site {
    config: Config,
    fences: Option<Fences>,
    /// How long [`Site::serve`] retries an address in use, and opening a journal waits for an
    /// NVRAM file another process still has locked (0: fail at once). In a takeover on one host
    /// the departing node may hold both for a moment (until its fence).
    bind_retry_ms: u64,
    /// The NVRAM mirror to the partner (`[pair]`), set once before the volumes open; only the
    /// own site has one.
    pair: OnceLock<Arc<Pair>>,
    /// The partner's site of a node with `[pair]`: its journaled volumes open from this node's
    /// copies of the partner's journals, kept by this mirror's receiver (see
    /// [`Site::set_partner_copies`]).
    copies: OnceLock<Arc<Pair>>,
    parts: Mutex<Parts>,
    /// Arrays served from partner copies whose last clean stop could not fence the partner's
    /// old log (see [`Stopped`]). Remembered across stops: a later stop of a site that no
    /// longer has them open still reports them until a stop fences them.
    unfenced: Mutex<std::collections::BTreeSet<String>>,
}

/// What [`Site::stop`] left behind.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[must_use = "a clean stop that left arrays unfenced must not be followed by a release"]
pub struct Stopped {
    /// Arrays served from this node's copies of the partner's journals (a takeover) whose final
    /// consistency point or log fence did not complete: their disks may lack writes only the
    /// copies hold, and the partner's old log is not fenced, so releasing them would let the
    /// partner replay superseded records over newer data.
    pub unfenced: Vec<String>,
}

#[derive(Default)]
struct Parts {
    arrays: BTreeMap<String, Arc<ArrayEntry>>,
    array_gates: BTreeMap<String, Arc<WriteGate>>,
    server: Option<Server>,
    volumes: Vec<VolumeInfo>,
    journaled: BTreeMap<String, Arc<JournaledDevice>>,
    /// Journaled volumes not served because their NVRAM log was lost (see `nvram_loss`).
    held: BTreeMap<String, crate::nvram_loss::HeldVolume>,
    listeners: Option<Listeners>,
    /// Partner copies taken from the mirror receiver by this site (takeover), by volume name:
    /// (journal volume id, array name). Given back to the receiver by [`Site::stop`].
    seized: BTreeMap<String, (u64, String)>,
}

struct Listeners {
    stop: tokio::sync::watch::Sender<bool>,
    tasks: JoinSet<std::io::Result<()>>,
    bound: Vec<SocketAddr>,
    unix: Option<PathBuf>,
}

impl Site {
    /// A site for `config`, nothing opened yet. `fences` makes its writes fenced (HA).
    pub fn new(config: Config, fences: Option<Fences>, bind_retry_ms: u64) -> Site {
        Site {
            config,
            fences,
            bind_retry_ms,
            pair: OnceLock::new(),
            copies: OnceLock::new(),
            parts: Mutex::new(Parts::default()),
            unfenced: Mutex::default(),
        }
    }

    /// Mirrors this site's journaled volumes to the partner through `pair` (call before
    /// [`Site::open_volumes`]; a second call is ignored).
    pub fn set_pair(&self, pair: Option<Arc<Pair>>) {
        if let Some(p) = pair {
            let _ = self.pair.set(p);
        }
    }

    /// Makes this (the partner's) site serve its journaled volumes from `pair`'s copies of the
    /// partner's journals, instead of the NVRAM files the partner's config names (which only
    /// the partner's host has). Call before [`Site::open_volumes`]; a second call is ignored.
    pub fn set_partner_copies(&self, pair: Option<Arc<Pair>>) {
        if let Some(p) = pair {
            let _ = self.copies.set(p);
        }
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    fn parts(&self) -> MutexGuard<'_, Parts> {
        // A panic while holding this short lock leaves plain data behind: keep using it.
        self.parts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every disk (members and spares) of the site's arrays, resolved.
    pub fn disks(&self) -> Vec<PathBuf> {
        self.config
            .arrays
            .iter()
            .flat_map(|a| a.disks.iter().chain(a.spares.iter()))
            .map(|p| self.config.resolve(p))
            .collect()
    }

    /// The NVRAM files of the site's journaled volumes.
    pub fn nvram_files(&self) -> Vec<PathBuf> {
        self.config
            .volumes
            .iter()
            .filter_map(|v| self.config.volume_nvram_path(v))
            .collect()
    }

    pub fn arrays(&self) -> BTreeMap<String, Arc<ArrayEntry>> {
        self.parts().arrays.clone()
    }

    pub fn volumes(&self) -> Vec<VolumeInfo> {
        self.parts().volumes.clone()
    }

    pub fn journaled(&self) -> BTreeMap<String, Arc<JournaledDevice>> {
        self.parts().journaled.clone()
    }

    pub fn server(&self) -> Option<Server> {
        self.parts().server.clone()
    }

    /// The addresses bound by [`Site::serve`] (empty when not serving).
    pub fn bound(&self) -> Vec<SocketAddr> {
        self.parts()
            .listeners
            .as_ref()
            .map(|l| l.bound.clone())
            .unwrap_or_default()
    }

    /// Opens (or creates) every array of the config. Already assembled: nothing to do.
    pub async fn assemble(&self) -> Result<()> {
        if !self.parts().arrays.is_empty() || self.config.arrays.is_empty() {
            return Ok(());
        }
        let mut arrays = BTreeMap::new();
        let mut gates = BTreeMap::new();
        for a in &self.config.arrays {
            if let Some(f) = &self.fences {
                let disks: Vec<PathBuf> = a
                    .disks
                    .iter()
                    .chain(a.spares.iter())
                    .map(|p| self.config.resolve(p))
                    .collect();
                gates.insert(a.name.clone(), (f.gates)(&disks));
            }
            let wrap = self.fences.as_ref().map(|f| &f.members);
            let entry = ArrayEntry::open_with(&self.config, a, wrap)
                .await
                .with_context(|| format!("array `{}`", a.name))?;
            arrays.insert(a.name.clone(), Arc::new(entry));
        }
        let mut p = self.parts();
        p.arrays = arrays;
        p.array_gates = gates;
        Ok(())
    }

    /// Opens every volume (journal recovery included) and adds it to a new NBD server. Already
    /// open: nothing to do.
    pub async fn open_volumes(&self) -> Result<()> {
        if self.parts().server.is_some() {
            return Ok(());
        }
        let config = &self.config;
        let server = Server::new(ServerConfig {
            max_request_bytes: u32::try_from(config.nbd.max_request.bytes())
                .context("nbd.max_request does not fit in 32 bits")?,
            max_connections: config.nbd.max_connections,
            shutdown_grace: Duration::from_millis(config.nbd.shutdown_grace_ms),
            tls: config.nbd_tls()?,
            ..ServerConfig::default()
        });
        let (arrays, gates) = {
            let p = self.parts();
            (p.arrays.clone(), p.array_gates.clone())
        };
        let mut volumes = Vec::new();
        let mut journaled = BTreeMap::new();
        let mut held = BTreeMap::new();
        for v in &config.volumes {
            let opened = match &v.array {
                None => open_volume(config, v).await,
                Some(a) => {
                    let Some(entry) = arrays.get(a.as_str()) else {
                        bail!("volume `{}`: array `{a}` is not assembled", v.name);
                    };
                    let gate = gates.get(a.as_str()).cloned();
                    let copy = match self.copies.get() {
                        Some(pair) if v.journal => Some(CopySource {
                            pair,
                            site: self,
                            array: a,
                        }),
                        _ => None,
                    };
                    open_array_volume(
                        config,
                        v,
                        entry,
                        gate,
                        self.bind_retry_ms,
                        &mut journaled,
                        self.pair.get().map(|p| &**p),
                        copy,
                    )
                    .await
                }
            }
            .with_context(|| format!("volume `{}`", v.name));
            let (device, info) = match opened {
                Ok(x) => x,
                Err(e) => match crate::nvram_loss::lost_writes(&e) {
                    // Held, not fatal: the other volumes serve, the operator decides.
                    Some((loss, partner_fetch_error)) => {
                        tracing::error!(volume = %v.name, "{e:#}");
                        held.insert(
                            v.name.clone(),
                            crate::nvram_loss::HeldVolume {
                                name: v.name.clone(),
                                remedy: format!("twinctl journal accept-loss {}", v.name),
                                loss,
                                partner_fetch_error,
                            },
                        );
                        continue;
                    }
                    None => return Err(e),
                },
            };
            export(&server, v, &info, device)?;
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
        let mut p = self.parts();
        p.server = Some(server);
        p.volumes = volumes;
        p.journaled = journaled;
        p.held = held;
        Ok(())
    }

    /// Journaled volumes held (not served) because their NVRAM log was lost.
    pub fn held(&self) -> Vec<crate::nvram_loss::HeldVolume> {
        self.parts().held.values().cloned().collect()
    }

    /// `twinctl journal accept-loss`: serves held volume `name` on a new, empty log (the writes
    /// acknowledged after its last CP are gone; the event goes into its history). Refused, with
    /// nothing changed, for a volume that is not held.
    pub async fn accept_loss(&self, name: &str) -> Result<VolumeInfo> {
        if !self.parts().held.contains_key(name) {
            bail!(
                "volume `{name}` is not waiting for an NVRAM loss to be accepted (only volumes \
                 listed as held by `twinctl status` are); nothing was changed"
            );
        }
        let Some(server) = self.server() else {
            bail!("volume `{name}`: the site's volumes are not open; nothing was changed");
        };
        let Some(v) = self.config.volumes.iter().find(|v| v.name == name) else {
            bail!("volume `{name}` is not in this node's config; nothing was changed");
        };
        let Some(array_name) = &v.array else {
            bail!("volume `{name}` is not on an array; nothing was changed");
        };
        let (entry, gate) = {
            let p = self.parts();
            (
                p.arrays.get(array_name.as_str()).cloned(),
                p.array_gates.get(array_name.as_str()).cloned(),
            )
        };
        let Some(entry) = entry else {
            bail!("volume `{name}`: array `{array_name}` is not assembled; nothing was changed");
        };
        let accepted = VolumeConfig {
            accept_nvram_loss: true,
            ..v.clone()
        };
        let mut journaled = BTreeMap::new();
        let (device, info) = open_array_volume(
            &self.config,
            &accepted,
            &entry,
            gate,
            self.bind_retry_ms,
            &mut journaled,
            self.pair.get().map(|p| &**p),
            None,
        )
        .await
        .with_context(|| format!("volume `{name}`"))?;
        export(&server, v, &info, device)?;
        tracing::warn!(volume = %name, "NVRAM loss accepted by the operator; volume ready");
        let mut p = self.parts();
        p.held.remove(name);
        p.journaled.extend(journaled);
        p.volumes.push(info.clone());
        Ok(info)
    }

    /// Binds the NBD listen addresses (and the Unix socket) and serves the exports. Returns the
    /// bound addresses. Already serving: returns them again.
    pub async fn serve(&self) -> Result<Vec<SocketAddr>> {
        let Some(server) = self.server() else {
            bail!("cannot serve: the volumes are not open");
        };
        if let Some(l) = &self.parts().listeners {
            return Ok(l.bound.clone());
        }
        let mut tasks = JoinSet::new();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut bound = Vec::new();
        for addr in &self.config.nbd.listen {
            let listener = self
                .bind_tcp(addr)
                .await
                .with_context(|| format!("cannot listen for NBD on {addr}"))?;
            let local = listener.local_addr()?;
            bound.push(local);
            tracing::info!("serving NBD on {local}");
            let server = server.clone();
            let mut rx = stop_rx.clone();
            tasks.spawn(async move {
                server
                    .serve_tcp(listener, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await
            });
        }
        let mut unix_path = None;
        if let Some(unix) = &self.config.nbd.unix {
            let path = self.config.resolve(unix);
            let listener = admin::server::bind(&path)
                .await
                .with_context(|| format!("cannot listen for NBD on {}", path.display()))?;
            tracing::info!("serving NBD on unix socket {}", path.display());
            let server = server.clone();
            let mut rx = stop_rx.clone();
            tasks.spawn(async move {
                server
                    .serve_unix(listener, async move {
                        let _ = rx.wait_for(|s| *s).await;
                    })
                    .await
            });
            unix_path = Some(path);
        }
        self.parts().listeners = Some(Listeners {
            stop: stop_tx,
            tasks,
            bound: bound.clone(),
            unix: unix_path,
        });
        Ok(bound)
    }

    /// Binds `addr`, retrying for up to `bind_retry_ms` while it is in use (a partner that just
    /// died, or was fenced, may still hold the port for a moment).
    async fn bind_tcp(&self, addr: &str) -> std::io::Result<tokio::net::TcpListener> {
        let deadline = crate::ha::now_ms() + self.bind_retry_ms;
        loop {
            match tokio::net::TcpListener::bind(addr).await {
                Err(e)
                    if e.kind() == std::io::ErrorKind::AddrInUse
                        && crate::ha::now_ms() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(BIND_RETRY_INTERVAL_MS)).await;
                }
                other => return other,
            }
        }
    }

    /// A consistency point of every journaled volume; the first failure is returned.
    pub async fn checkpoint(&self) -> Result<()> {
        for (name, dev) in self.journaled() {
            dev.volume()
                .checkpoint()
                .await
                .with_context(|| format!("consistency point of volume `{name}`"))?;
        }
        Ok(())
    }

    /// Stops serving: listeners closed, client connections closed (after in-flight requests
    /// are answered), exports dropped; with [`Teardown::Clean`] or [`Teardown::Shutdown`] a
    /// final CP and array close.
    /// The result names arrays a clean stop left unfenced (always empty for `Fenced`).
    pub async fn stop(&self, how: Teardown) -> Stopped {
        let (listeners, server, journaled, arrays, gates, seized) = {
            let mut p = self.parts();
            p.volumes.clear();
            p.held.clear();
            (
                p.listeners.take(),
                p.server.take(),
                std::mem::take(&mut p.journaled),
                std::mem::take(&mut p.arrays),
                std::mem::take(&mut p.array_gates),
                std::mem::take(&mut p.seized),
            )
        };
        if let Some(server) = &server {
            server.shutdown();
        }
        if let Some(mut l) = listeners {
            let _ = l.stop.send(true);
            while let Some(r) = l.tasks.join_next().await {
                match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::warn!("listener ended with error: {e}"),
                    Err(e) => tracing::warn!("listener task failed: {e}"),
                }
            }
            if let Some(path) = l.unix {
                let _ = std::fs::remove_file(path);
            }
        }
        if how == Teardown::Fenced {
            // Dropping the journals closes their NVRAM files (as a crash would: the new holder
            // replays them); dropping the arrays writes nothing. A partner copy in use stays
            // as it is (it may hold writes the disks do not have yet).
            drop(journaled);
            self.release_copies(&seized, &BTreeMap::new());
            return Stopped::default();
        }
        // The exports hold the devices: let them go before the journals are closed.
        drop(server);
        let mut applied = std::collections::BTreeSet::new();
        for (name, dev) in &journaled {
            if crate::ha::fault::active(crate::ha::fault::Fault::FinalCheckpoint) {
                tracing::warn!(volume = %name, "final consistency point skipped: injected fault");
                continue;
            }
            // A clean stop also tells the array that nothing is left in the log, so a start
            // that finds the NVRAM file gone (RAM after a power cut) knows nothing was lost.
            match dev.volume().stop_clean().await {
                Ok(true) => {
                    applied.insert(name.clone());
                }
                Ok(false) => {
                    tracing::warn!(volume = %name, "writes arrived during the final consistency point; the journal will be replayed at next start")
                }
                Err(e) => {
                    tracing::warn!(volume = %name, "final consistency point failed (the journal will be replayed at next start): {e}")
                }
            }
        }
        drop(journaled);
        let fenced = fence_given_back_arrays(&seized, &applied, &arrays, &gates).await;
        if how == Teardown::Shutdown {
            self.release_copies(&seized, &BTreeMap::new());
        } else {
            self.release_copies(&seized, &fenced);
        }
        for (name, a) in &arrays {
            if let Err(e) = a.array.close().await {
                tracing::warn!(array = %name, "array close failed: {e}");
            }
        }
        self.note_unfenced(&fenced, &arrays)
    }

    /// Updates the remembered unfenced arrays with this stop's outcome and returns them: an
    /// array this stop fenced is forgotten; one served from a copy (assembled) but not fenced
    /// is added.
    fn note_unfenced(
        &self,
        fenced: &BTreeMap<String, bool>,
        arrays: &BTreeMap<String, Arc<ArrayEntry>>,
    ) -> Stopped {
        let mut unfenced = self.unfenced.lock().unwrap_or_else(|p| p.into_inner());
        for (name, ok) in fenced {
            if *ok {
                unfenced.remove(name);
            } else if arrays.contains_key(name) {
                unfenced.insert(name.clone());
            }
        }
        Stopped {
            unfenced: unfenced.iter().cloned().collect(),
        }
    }
}

/// Exports an opened volume under its name, with the volume's client allow-list.
fn export(
    server: &Server,
    v: &VolumeConfig,
    info: &VolumeInfo,
    device: Arc<dyn BlockDevice>,
) -> Result<()> {
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
        .with_context(|| format!("volume `{}`", v.name))
}

/// A volume on an array, through the journal when the config says so.
#[allow(clippy::too_many_arguments)]
async fn open_array_volume(
    config: &Config,
    v: &VolumeConfig,
    entry: &ArrayEntry,
    gate: Option<Arc<WriteGate>>,
    lock_wait_ms: u64,
    journaled: &mut BTreeMap<String, Arc<JournaledDevice>>,
    pair: Option<&Pair>,
    copy: Option<CopySource<'_>>,
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
        cache: None,
    };
    if !v.journal {
        let cache = volume_cache(v, array.size());
        info.cache = cache.clone();
        return Ok((
            Arc::new(
                ArrayDevice::new(array, v.read_only)
                    .with_gate(gate)
                    .with_cache(cache),
            ),
            info,
        ));
    }
    let (Some(nv), Some(path)) = (&config.nvram, config.volume_nvram_path(v)) else {
        bail!("journal = true needs an [nvram] section");
    };
    // Two regions (own, partner) share the file; leave room for the header and control slots.
    const NVRAM_OVERHEAD_BYTES: u64 = 1 << 20;
    let per_region = (nv.size.bytes().saturating_sub(NVRAM_OVERHEAD_BYTES) / 2) & !4095;
    if let Some(copy) = copy {
        let (dev, log) =
            open_from_partner_copy(copy, v, &array, gate, per_region, lock_wait_ms).await?;
        journaled.insert(v.name.clone(), dev.clone());
        info.kind = "journaled_array";
        info.nvram = Some(log.display().to_string());
        info.cache = dev.volume().backing().cache.clone();
        return Ok((dev, info));
    }
    // Without `[pair]` the partner's site (a takeover) opens the partner's own NVRAM file as its
    // config names it, which only works where this node can reach that file (one host, with no
    // mirror configured). With `[pair]` it opens from the mirror's copy (above).
    let nvram_config = NvramConfig {
        path: path.clone(),
        persistence: nv.persistence,
        node_id: u32::from(config.node.id),
        pair_id: *config.pair_id().as_bytes(),
        log_bytes_per_region: per_region,
        create_if_missing: true,
    };
    let nvram = open_nvram_waiting(&nvram_config, lock_wait_ms).await?;
    let volume_id = journal_volume_id(&v.name);
    let cache = volume_cache(v, array.size());
    info.cache = cache.clone();
    let backing = ArrayBacking { array, gate, cache };
    // A lost log (tmpfs after a power cut): fetched back from the partner, or held until accepted.
    let nvram = crate::nvram_loss::resolve(
        nvram,
        &nvram_config,
        &backing,
        &v.name,
        volume_id,
        pair,
        v.accept_nvram_loss,
        &config.data_dir(),
    )
    .await?;
    let mirror = pair.map(|p| p.add_volume(&v.name, volume_id));
    let hook: Arc<dyn MirrorHook> = match &mirror {
        Some(m) => m.clone(),
        None => Arc::new(NoMirror),
    };
    let volume = JournaledVolume::open_with_mirror(
        nvram,
        backing,
        volume_id,
        v.journal_config(nv.cp_interval_ms),
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
    let copy = match pair {
        None => AckCopy::NoPair,
        Some(p) if p.partner_on_this_host() => AckCopy::PartnerOnThisHost,
        Some(_) => AckCopy::PartnerOnAnotherHost,
    };
    let (warn, promise) = ack_promise(volume.ack_survives_power_loss(), copy);
    if warn {
        tracing::warn!(volume = %v.name, nvram = %path.display(), "{promise}");
    } else {
        tracing::info!(volume = %v.name, nvram = %path.display(), "{promise}");
    }
    let meta = VolumeMeta {
        store_id: volume.backing().store_id().unwrap_or([0; 16]),
        log_bytes: volume.status().log_bytes,
    };
    let dev = Arc::new(JournaledDevice::new(volume, v.read_only));
    if let Some(m) = mirror {
        let source: Arc<dyn LogSource> = dev.clone();
        m.attach(Arc::downgrade(&source), meta);
        if let Some(p) = pair {
            p.reannounce();
        }
    }
    journaled.insert(v.name.clone(), dev.clone());
    info.kind = "journaled_array";
    info.nvram = Some(path.display().to_string());
    Ok((dev, info))
}

/// Opens an NVRAM file, waiting up to `lock_wait_ms` while another process still holds it.
async fn open_nvram_waiting(cfg: &NvramConfig, lock_wait_ms: u64) -> Result<Nvram> {
    let deadline = crate::ha::now_ms() + lock_wait_ms;
    loop {
        match Nvram::open(cfg) {
            Err(JournalError::Locked { .. }) if crate::ha::now_ms() < deadline => {
                tokio::time::sleep(Duration::from_millis(BIND_RETRY_INTERVAL_MS)).await;
            }
            other => break other,
        }
    }
    .with_context(|| format!("NVRAM file {}", cfg.path.display()))
}

/// Where the partner's site finds a journaled volume's log at takeover: this node's copy.
#[derive(Clone, Copy)]
struct CopySource<'a> {
    pair: &'a Pair,
    site: &'a Site,
    array: &'a str,
}

/// Takeover of a journaled partner volume: takes this node's copy of the partner's log from the
/// mirror receiver, checks it is bound to this array, and recovers from it through the same
/// path as the partner's own start (scan, dirty index, serve at once, CPs in the background).
/// New writes continue in the copy; nothing is mirrored while the partner is down.
async fn open_from_partner_copy(
    copy: CopySource<'_>,
    v: &VolumeConfig,
    array: &twinblock_raid::Array,
    gate: Option<Arc<WriteGate>>,
    log_bytes: u64,
    lock_wait_ms: u64,
) -> Result<(Arc<JournaledDevice>, PathBuf)> {
    let volume_id = journal_volume_id(&v.name);
    let cfg = copy.pair.seize_copy(&v.name, volume_id, log_bytes)?;
    copy.site
        .parts()
        .seized
        .insert(v.name.clone(), (volume_id, copy.array.to_string()));
    let nvram = open_nvram_waiting(&cfg, lock_wait_ms).await?;
    let store = *array.uuid().as_bytes();
    let bound = nvram.partner_store_id().unwrap_or([0; 16]);
    if bound == [0; 16] {
        bail!(
            "this node's copy of the partner's journal ({}) was never bound to a store: the              partner never mirrored this volume here, so its acknowledged writes are not in it",
            cfg.path.display()
        );
    }
    if bound != store {
        bail!(
            "this node's copy of the partner's journal ({}) belongs to store {}, but array `{}`              is store {}: it is never replayed into another array (was the array recreated?)",
            cfg.path.display(),
            uuid::Uuid::from_bytes(bound),
            copy.array,
            uuid::Uuid::from_bytes(store),
        );
    }
    let nv = copy.site.config.nvram.as_ref();
    // A cold cache: takeover never inherits what the partner's memory held.
    let volume = JournaledVolume::open_partner_copy(
        nvram,
        ArrayBacking {
            array: array.clone(),
            gate,
            cache: volume_cache(v, array.size()),
        },
        volume_id,
        v.journal_config(nv.map_or(1000, |n| n.cp_interval_ms)),
        Arc::new(NoMirror),
    )
    .await
    .with_context(|| {
        format!(
            "journal recovery from the partner copy {}",
            cfg.path.display()
        )
    })?;
    let r = volume.recovery();
    tracing::info!(
        volume = %v.name,
        copy = %cfg.path.display(),
        replayed = r.replayed_records,
        skipped_retired = r.skipped_retired_records,
        damaged_tail_discarded = r.damaged_tail_discarded,
        "takeover: journal recovered from this node's copy of the partner's log"
    );
    Ok((
        Arc::new(JournaledDevice::new(volume, v.read_only)),
        cfg.path,
    ))
}

/// Giveback after a takeover from partner copies: every array whose seized journaled volumes
/// were all opened from their copies and finished their final CP (`applied`) gets its
/// `applied_seq` fenced past the partner's old log (see `twinblock_journal::takeover`). Returns
/// the arrays fenced; an array not fenced keeps its copies (they may hold writes the disks lack),
/// and one whose copy never opened (a failed takeover) is left as the partner left it.
async fn fence_given_back_arrays(
    seized: &BTreeMap<String, (u64, String)>,
    applied: &std::collections::BTreeSet<String>,
    arrays: &BTreeMap<String, Arc<ArrayEntry>>,
    gates: &BTreeMap<String, Arc<WriteGate>>,
) -> BTreeMap<String, bool> {
    let mut out = BTreeMap::new();
    for (volume, (_, array)) in seized {
        let ok = out.entry(array.clone()).or_insert(true);
        *ok &= applied.contains(volume);
    }
    for (name, ok) in out.iter_mut() {
        let Some(entry) = arrays.get(name).filter(|_| *ok) else {
            if *ok {
                // The array never assembled: nothing was served from the copy.
                *ok = false;
            } else {
                tracing::warn!(array = %name, "the partner copies of this array were not all opened and applied (a failed takeover, or a final CP failed): they are kept and the array's applied seq is not fenced");
            }
            continue;
        };
        let backing = ArrayBacking::new(entry.array.clone(), gates.get(name).cloned());
        match twinblock_journal::takeover::fence_superseded_log(&backing).await {
            Ok(seq) => {
                tracing::info!(array = %name, applied_seq = seq, "giveback: the partner's old log is fenced (its records are never replayed)")
            }
            Err(e) => {
                tracing::error!(array = %name, "giveback: cannot fence the partner's old log: {e}");
                *ok = false;
            }
        }
    }
    out
}

impl Site {
    /// Hands the partner copies this site took back to the mirror receiver; those of a fenced
    /// array are removed (everything in them is applied).
    fn release_copies(
        &self,
        seized: &BTreeMap<String, (u64, String)>,
        fenced: &BTreeMap<String, bool>,
    ) {
        let Some(pair) = self.copies.get() else {
            return;
        };
        for (volume, (id, array)) in seized {
            let discard = fenced.get(array).copied().unwrap_or(false);
            pair.release_copy(volume, *id, discard);
        }
    }
}

/// The read cache `v.read_cache` asks for over a store of `store_bytes` (None: turned off).
fn volume_cache(v: &VolumeConfig, store_bytes: u64) -> Option<Arc<ReadCache>> {
    ReadCache::new(v.read_cache.bytes(), store_bytes).map(Arc::new)
}

/// A stable 64-bit id for a volume's journal records, from its name.
pub(crate) fn journal_volume_id(name: &str) -> u64 {
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
        cache: volume_cache(v, member.size()),
    };
    let cache = info.cache.clone();
    let scope = CacheScope::for_member(member.direct());
    let device = MemberDevice::new(member, v.read_only, map)
        .with_cache(cache)
        .with_cache_scope(scope);
    Ok((Arc::new(device), info))
}

pub(crate) async fn open_image(path: &Path, v: &VolumeConfig) -> Result<Arc<FileMember>> {
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

/// Where a journaled volume's acknowledged writes are kept besides this node's NVRAM (for the
/// start log line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AckCopy {
    NoPair,
    PartnerOnAnotherHost,
    /// The partner's address is a loopback address or this node's own (the demo, the tests).
    PartnerOnThisHost,
}

/// The start log line saying what a journaled volume's acknowledgement survives, as
/// docs/OPERATIONS.md says it per mode; `true` when it is a warning (a power cut of this host can
/// lose acknowledged writes that no FLUSH covered).
fn ack_promise(survives_power_loss: bool, copy: AckCopy) -> (bool, &'static str) {
    if survives_power_loss {
        return (
            false,
            "acknowledged writes survive a daemon crash and a loss of host power (NVRAM on a persistent medium)",
        );
    }
    let line = match copy {
        AckCopy::PartnerOnThisHost => "acknowledged writes survive a daemon crash only, not a loss of host power (NVRAM in RAM: persistence \"none\" or a tmpfs file); FLUSH and FUA complete once the in-sync partner acknowledges, else after a consistency point; the partner runs on THIS machine, so its copy does not survive this machine's power loss either",
        AckCopy::PartnerOnAnotherHost => "acknowledged writes survive a daemon crash only, not a loss of this host's power (NVRAM in RAM: persistence \"none\" or a tmpfs file); FLUSH and FUA complete once the in-sync partner (another host) holds the writes, else after a consistency point",
        AckCopy::NoPair => "acknowledged writes survive a daemon crash only, not a loss of host power (NVRAM in RAM: persistence \"none\" or a tmpfs file); FLUSH and FUA wait for a consistency point",
    };
    (true, line)
}

#[cfg(test)]
mod ack_promise_tests {
    use super::*;

    #[test]
    fn start_line_says_what_the_acknowledgement_survives_per_mode_and_pair() {
        let (warn, line) = ack_promise(true, AckCopy::NoPair);
        assert!(!warn && line.contains("and a loss of host power"), "{line}");
        for copy in [
            AckCopy::NoPair,
            AckCopy::PartnerOnAnotherHost,
            AckCopy::PartnerOnThisHost,
        ] {
            let (warn, line) = ack_promise(false, copy);
            assert!(
                warn && line.contains("daemon crash only"),
                "{copy:?}: {line}"
            );
        }
        let (_, alone) = ack_promise(false, AckCopy::NoPair);
        assert!(
            alone.contains("FLUSH and FUA wait for a consistency point"),
            "{alone}"
        );
        let (_, remote) = ack_promise(false, AckCopy::PartnerOnAnotherHost);
        assert!(
            remote.contains("partner (another host) holds the writes"),
            "{remote}"
        );
        let (_, local) = ack_promise(false, AckCopy::PartnerOnThisHost);
        assert!(local.contains("THIS machine"), "{local}");
    }
}
