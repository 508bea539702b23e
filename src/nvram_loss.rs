//! What a node does when a journaled volume's NVRAM log was lost after an unclean stop (the
//! journal's `loss` module says so): fetch the log back from the partner's copy when there is a
//! partner, else hold the volume (not served) until the operator accepts the loss.
//!
//! | situation | outcome |
//! | --- | --- |
//! | no loss | the journal opens as usual |
//! | loss, partner reachable and its copy whole | the copy is written into the blank own log, the NVRAM file is reopened and the journal recovers it as usual: nothing acknowledged is lost |
//! | loss, no partner, or its copy unusable | the volume is held: [`HeldVolume`], not exported, shown by status, until `twinctl journal accept-loss` or `accept_nvram_loss = true` |
//! | loss accepted | the journal opens on the new log; the event stays in the volume's history |
//!
//! A held volume has changed nothing on the array; only the NVRAM file was formatted.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::Serialize;
use twinblock_journal::restore::{restore_into, RestoreTarget};
use twinblock_journal::{
    check_log_continuity, Backing, JournalError, LossCause, LostWrites, Nvram, NvramConfig,
};

use crate::device::ArrayBacking;
use crate::history;
use crate::pair::fetch::fetch_own_log;
use crate::pair::Pair;

/// How often re-opening the NVRAM file after a restore retries while the file is still locked.
const REOPEN_RETRY_INTERVAL_MS: u64 = 20;
/// How long re-opening waits for the lock (it is this process's own, released on drop).
const REOPEN_WAIT_MS: u64 = 2000;

/// A journaled volume that does not serve because acknowledged writes may be lost.
#[derive(Debug, Clone, Serialize)]
pub struct HeldVolume {
    pub name: String,
    pub loss: LostWrites,
    /// Why the partner's copy could not be used (no partner configured: none).
    pub partner_fetch_error: Option<String>,
    /// The operator's way out.
    pub remedy: String,
}

/// The [`HeldError`] anywhere in `e`'s chain, if that is what `e` is: the loss and what the
/// partner said.
pub fn lost_writes(e: &anyhow::Error) -> Option<(LostWrites, Option<String>)> {
    e.chain().find_map(|c| {
        let h = c.downcast_ref::<HeldError>()?;
        Some((h.loss.clone(), h.partner_fetch_error.clone()))
    })
}

/// A loss the node could not repair: the journal's refusal plus what the partner said.
#[derive(Debug, thiserror::Error)]
#[error("{}{}; the volume does not serve until the loss is accepted (`twinctl journal accept-loss {volume}`, or accept_nvram_loss = true in its [[volume]] config)",
    .loss.describe(),
    .partner_fetch_error.as_ref().map(|e| format!("; the partner's copy could not be used: {e}")).unwrap_or_default())]
pub struct HeldError {
    pub volume: String,
    pub loss: LostWrites,
    pub partner_fetch_error: Option<String>,
}

/// Checks the NVRAM file just opened against the array's journal mark and repairs or refuses a
/// loss (module table). Returns the NVRAM to open the journal on.
#[allow(clippy::too_many_arguments)]
pub async fn resolve(
    nvram: Nvram,
    nvram_config: &NvramConfig,
    backing: &ArrayBacking,
    name: &str,
    volume_id: u64,
    pair: Option<&Pair>,
    accept: bool,
    data_dir: &Path,
) -> Result<Nvram> {
    let Some(loss) = check_log_continuity(&nvram, backing)
        .await
        .context("checking the NVRAM log against the array's journal mark")?
    else {
        return Ok(nvram);
    };
    tracing::error!(volume = %name, first_lost_seq = loss.first_lost_seq, "{}", loss.describe());
    history::record(data_dir, name, "nvram-loss-detected", &loss.describe());
    let mut fetch_error = None;
    match (pair, loss.cause) {
        (Some(pair), LossCause::MissingOrBlank) => {
            match restore_from_partner(nvram, nvram_config, backing, name, volume_id, pair, &loss)
                .await
            {
                Ok(restored) => {
                    history::record(
                        data_dir,
                        name,
                        "nvram-restored-from-partner",
                        &format!(
                            "the own NVRAM log was rebuilt from the partner's copy; no \
                             acknowledged write was lost (seq {} and later recovered)",
                            loss.first_lost_seq
                        ),
                    );
                    return Ok(restored);
                }
                Err(RestoreFailure::Untouched(nv, e)) => {
                    tracing::error!(volume = %name, "the partner's copy of the log could not be used: {e:#}");
                    fetch_error = Some(format!("{e:#}"));
                    return finish(*nv, name, loss, fetch_error, accept, data_dir);
                }
                Err(RestoreFailure::Reopen(e)) => return Err(e),
            }
        }
        (Some(_), LossCause::Foreign) => {
            fetch_error = Some(
                "not tried: the NVRAM file holds another log, which is never overwritten \
                 (move it away to have the log fetched from the partner)"
                    .into(),
            );
        }
        (None, _) => {}
    }
    finish(nvram, name, loss, fetch_error, accept, data_dir)
}

/// Serves on the new log when the loss is accepted, else refuses with [`HeldError`].
fn finish(
    nvram: Nvram,
    name: &str,
    loss: LostWrites,
    partner_fetch_error: Option<String>,
    accept: bool,
    data_dir: &Path,
) -> Result<Nvram> {
    if accept {
        let detail = format!("loss accepted; serving on a new log: {}", loss.describe());
        tracing::warn!(volume = %name, "{detail}");
        history::record(data_dir, name, "nvram-loss-accepted", &detail);
        return Ok(nvram);
    }
    Err(HeldError {
        volume: name.to_string(),
        loss,
        partner_fetch_error,
    }
    .into())
}

/// Why the partner's copy was not restored.
enum RestoreFailure {
    /// Nothing was written: the NVRAM is handed back as it was.
    Untouched(Box<Nvram>, anyhow::Error),
    /// The copy was written but the file could not be re-opened (a restart recovers it).
    Reopen(anyhow::Error),
}

/// Fetches the partner's copy, writes it into the blank own log and re-opens the file (so its
/// generation moves past the restored records').
async fn restore_from_partner(
    mut nvram: Nvram,
    nvram_config: &NvramConfig,
    backing: &ArrayBacking,
    name: &str,
    volume_id: u64,
    pair: &Pair,
    loss: &LostWrites,
) -> Result<Nvram, RestoreFailure> {
    let untouched = |nv, e| RestoreFailure::Untouched(Box::new(nv), e);
    let Some(store_id) = backing.store_id() else {
        return Err(untouched(
            nvram,
            anyhow::anyhow!("the array has no identity"),
        ));
    };
    let target = RestoreTarget {
        store_id,
        volume_id,
        log_bytes: nvram_config.log_bytes_per_region,
        from_seq: loss.first_lost_seq,
    };
    tracing::info!(volume = %name, from_seq = target.from_seq, "fetching the lost NVRAM log back from the partner's copy");
    let copy = match fetch_own_log(pair, name, &target).await {
        Ok(c) => c,
        Err(e) => return Err(untouched(nvram, e.into())),
    };
    let Some(mut own) = nvram.take_own() else {
        return Err(untouched(
            nvram,
            anyhow::anyhow!("the own region is already in use"),
        ));
    };
    // Checks the whole copy again before the first byte is written.
    if let Err(e) = restore_into(&mut own, &target, &copy) {
        return Err(untouched(nvram, e.into()));
    }
    drop(own);
    drop(nvram);
    let nv = reopen(nvram_config)
        .await
        .with_context(|| {
            format!(
                "re-opening NVRAM file {} after restoring the partner's copy into it (a restart \
                 recovers the restored log)",
                nvram_config.path.display()
            )
        })
        .map_err(RestoreFailure::Reopen)?;
    tracing::info!(volume = %name, records = copy.records.len(), tail_seq = copy.tail_seq,
        last_seq = copy.last_seq, "own NVRAM log restored from the partner's copy");
    Ok(nv)
}

async fn reopen(cfg: &NvramConfig) -> Result<Nvram, JournalError> {
    let deadline = std::time::Instant::now() + Duration::from_millis(REOPEN_WAIT_MS);
    loop {
        match Nvram::open(cfg) {
            Err(JournalError::Locked { .. }) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(REOPEN_RETRY_INTERVAL_MS)).await;
            }
            other => return other,
        }
    }
}
