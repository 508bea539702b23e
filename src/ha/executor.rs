//! The real executor: carries out the state machine's operations on reservation lock files and
//! on the two sites (this node's own, and its partner's from the partner's config).
//!
//! Operations on one disk set run one at a time (a mutex per set), and a fence waits for the
//! operation in flight on its set before tearing the set down, so a bring-up that races a fence
//! ends torn down. The write permit is cleared by the controller before the fence is queued, so
//! nothing is written meanwhile. Reservation updates (file lock, fsync, rename) run on the
//! blocking pool.

use super::address_hook::{AddressHook, Verb};
use super::controller::Executor;
use crate::site::{Site, Teardown};
use async_trait::async_trait;
use std::path::PathBuf;
use std::sync::Arc;
use twinblock_pair::reservation::{
    Key, Op as ResvOp, ReservationError, ReservationFile, ReservationType,
};
use twinblock_pair::state::{DiskSet, Op, Outcome};

const KIND: ReservationType = ReservationType::WriteExclusiveRegistrantsOnly;

/// Executes ops on this node's own site and its partner's.
pub struct SiteExecutor {
    own: Arc<Site>,
    partner: Arc<Site>,
    own_key: Key,
    partner_key: Key,
    serial: [Arc<tokio::sync::Mutex<()>>; 2],
    /// The data path's runtime: fences (and every op, spawned there by the controller) run on
    /// it, never on the HA control plane's thread.
    runtime: tokio::runtime::Handle,
    /// The address-takeover hook of each set (own, partner), when `ha.address_hook` is set.
    hooks: [Option<Arc<AddressHook>>; 2],
}

/// What a reservation step found.
enum Resv {
    Done,
    HeldByPartner,
}

impl SiteExecutor {
    /// `runtime`: where the sites' work runs (the node's main runtime).
    pub fn new(
        own: Arc<Site>,
        partner: Arc<Site>,
        own_key: Key,
        partner_key: Key,
        runtime: tokio::runtime::Handle,
    ) -> Self {
        SiteExecutor {
            own,
            partner,
            own_key,
            partner_key,
            serial: [Arc::default(), Arc::default()],
            runtime,
            hooks: [None, None],
        }
    }

    /// Moves the sets' service addresses with `own` and `partner` hooks (LAN takeover).
    pub fn with_address_hooks(
        mut self,
        own: Option<AddressHook>,
        partner: Option<AddressHook>,
    ) -> Self {
        self.hooks = [own.map(Arc::new), partner.map(Arc::new)];
        self
    }

    fn hook(&self, set: DiskSet) -> Option<Arc<AddressHook>> {
        self.hooks[usize::from(set == DiskSet::Partner)].clone()
    }

    fn site(&self, set: DiskSet) -> &Arc<Site> {
        match set {
            DiskSet::Own => &self.own,
            DiskSet::Partner => &self.partner,
        }
    }

    fn lock(&self, set: DiskSet) -> Arc<tokio::sync::Mutex<()>> {
        self.serial[usize::from(set == DiskSet::Partner)].clone()
    }

    async fn reservations(
        &self,
        set: DiskSet,
        step: fn(&ReservationFile, Key, Key) -> Result<Resv, String>,
    ) -> Outcome {
        let disks = self.site(set).disks();
        let (me, other) = (self.own_key, self.partner_key);
        let result = tokio::task::spawn_blocking(move || {
            for disk in &disks {
                match step(&ReservationFile::for_disk(disk), me, other) {
                    Ok(Resv::Done) => {}
                    Ok(Resv::HeldByPartner) => return Ok(Resv::HeldByPartner),
                    Err(e) => return Err(format!("{}: {e}", disk.display())),
                }
            }
            Ok(Resv::Done)
        })
        .await;
        match result {
            Ok(Ok(Resv::Done)) => Outcome::Done,
            Ok(Ok(Resv::HeldByPartner)) => Outcome::HeldByPartner,
            Ok(Err(e)) => Outcome::Failed(e),
            Err(e) => Outcome::Failed(format!("reservation task failed: {e}")),
        }
    }

    async fn run_op(&self, op: Op) -> anyhow::Result<Outcome> {
        Ok(match op {
            Op::Reserve(set) => self.reservations(set, reserve).await,
            Op::Preempt(set) => self.reservations(set, preempt).await,
            Op::Release(set) => self.reservations(set, release).await,
            Op::Assemble(set) => {
                self.site(set).assemble().await?;
                Outcome::Done
            }
            Op::Replay(set) => {
                self.site(set).open_volumes().await?;
                Outcome::Done
            }
            Op::Serve(set) => {
                // The address must be on the interface before the bind.
                if let Some(hook) = self.hook(set) {
                    hook.run(Verb::Add).await?;
                }
                let bound = self.site(set).serve().await?;
                tracing::info!(?set, ?bound, "HA: serving");
                Outcome::Done
            }
            Op::Checkpoint(set) => {
                self.site(set).checkpoint().await?;
                Outcome::Done
            }
            Op::StopServing(set) => {
                let stopped = self.site(set).stop(Teardown::Clean).await;
                remove_address(self.hook(set)).await;
                if stopped.unfenced.is_empty() {
                    Outcome::Done
                } else {
                    // The state machine keeps the reservation and serves the set again.
                    Outcome::Failed(format!(
                        "the final consistency point or the fence of the partner's old log did                          not complete for array(s) {}; keeping their reservation (releasing                          would let the partner replay superseded records): fix the cause (see                          the log), then run `twinctl giveback` again",
                        stopped.unfenced.join(", ")
                    ))
                }
            }
        })
    }
}

/// Runs the hook's `del` (if any); a failure is logged: the stop itself is done.
async fn remove_address(hook: Option<Arc<AddressHook>>) {
    if let Some(hook) = hook {
        if let Err(e) = hook.run(Verb::Del).await {
            tracing::error!("{e}");
        }
    }
}

/// Registers `me` and reserves; a disk held by `other` stops the whole op.
fn reserve(f: &ReservationFile, me: Key, other: Key) -> Result<Resv, String> {
    f.update(&ResvOp::Register { key: me })
        .map_err(|e| e.to_string())?;
    match f.update(&ResvOp::Reserve {
        key: me,
        kind: KIND,
    }) {
        Ok(_) => Ok(Resv::Done),
        Err(e) => match e.refusal() {
            Some(ReservationError::ReservationConflict { holder }) if *holder == other => {
                Ok(Resv::HeldByPartner)
            }
            _ => Err(e.to_string()),
        },
    }
}

/// Takes the disk from `other`: preempt its key if registered, else reserve a free disk.
fn preempt(f: &ReservationFile, me: Key, other: Key) -> Result<Resv, String> {
    f.update(&ResvOp::Register { key: me })
        .map_err(|e| e.to_string())?;
    let snap = f.read().map_err(|e| e.to_string())?;
    if snap.state.holds(me) {
        return Ok(Resv::Done);
    }
    let op = if snap.state.is_registered(other) {
        ResvOp::Preempt {
            key: me,
            victim: other,
            kind: KIND,
        }
    } else {
        ResvOp::Reserve {
            key: me,
            kind: KIND,
        }
    };
    f.update(&op).map(|_| Resv::Done).map_err(|e| e.to_string())
}

/// Releases the disk; a disk this node does not hold (key gone, or another holder) is done.
fn release(f: &ReservationFile, me: Key, _other: Key) -> Result<Resv, String> {
    match f.update(&ResvOp::Release { key: me }) {
        Ok(_) => Ok(Resv::Done),
        Err(e) => match e.refusal() {
            Some(ReservationError::NotRegistered { .. })
            | Some(ReservationError::ReservationConflict { .. }) => {
                tracing::warn!("release: {e} (not held by this node: nothing to release)");
                Ok(Resv::Done)
            }
            _ => Err(e.to_string()),
        },
    }
}

/// Whether `key` holds every one of `disks` (false for none, or on any error).
pub fn holds_all(disks: &[PathBuf], key: Key) -> bool {
    !disks.is_empty()
        && disks.iter().all(|d| {
            ReservationFile::for_disk(d)
                .read()
                .is_ok_and(|s| s.state.holds(key))
        })
}

#[async_trait]
impl Executor for SiteExecutor {
    async fn run(&self, op: Op) -> Outcome {
        let set = match op {
            Op::Reserve(s)
            | Op::Preempt(s)
            | Op::Assemble(s)
            | Op::Replay(s)
            | Op::Serve(s)
            | Op::Checkpoint(s)
            | Op::StopServing(s)
            | Op::Release(s) => s,
        };
        let _serial = self.lock(set).lock_owned().await;
        match self.run_op(op).await {
            Ok(o) => o,
            Err(e) => {
                tracing::error!(?op, "HA operation failed: {e:#}");
                // A half-done bring-up must not stay half up: the machine retries from the
                // start of its chain.
                if matches!(op, Op::Assemble(_) | Op::Replay(_) | Op::Serve(_)) {
                    // Any array left unfenced is remembered by the site and reported by the
                    // next StopServing, which keeps the reservation then.
                    let _ = self.site(set).stop(Teardown::Clean).await;
                    remove_address(self.hook(set)).await;
                }
                Outcome::Failed(format!("{e:#}"))
            }
        }
    }

    fn fence(&self, set: DiskSet) {
        let site = self.site(set).clone();
        let lock = self.lock(set);
        let hook = self.hook(set);
        self.runtime.spawn(async move {
            let _serial = lock.lock_owned().await;
            let _ = site.stop(Teardown::Fenced).await;
            // The set's new holder adds the address: this node must not answer for it.
            remove_address(hook).await;
            tracing::warn!(?set, "fenced: stopped serving, connections dropped");
        });
    }
}
