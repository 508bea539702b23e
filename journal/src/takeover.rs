//! Giveback after a takeover: making the returning node's own, superseded log harmless.
//!
//! During a takeover the survivor serves the partner's volume from its copy of the partner's
//! log and numbers new records after the copy's last one. The partner's own NVRAM file still
//! holds its old log, which can contain records the copy never received (written locally, not
//! yet acknowledged by the mirror when the node died). Those carry seqs the survivor may reuse
//! for *other* writes, or seqs above the survivor's last one, and a plain recovery of the
//! returning node would replay them over newer data (the store's `applied_seq` only retires
//! records at or below it).
//!
//! So giveback, after its final CP applied every record of the copy, raises the store's
//! `applied_seq` by [`TAKEOVER_SEQ_GAP`]: every record of the returning node's old log is then at
//! or below it and is skipped, and the returning node's recovery starts its new log above it
//! (recovery numbers new records after `max(last seq, applied_seq)`). The gap bounds how many
//! records the partner can have written past its copy: records it wrote while its status still
//! said "mirror in sync" (at most the silence window plus the mirror timeout of writes, far
//! fewer than 2^32); a partner whose mirror was out of sync is never taken over.

use crate::backing::Backing;
use crate::error::JournalError;
use crate::recover::backing_err;

/// How far giveback raises the store's `applied_seq` past the last record it applied (records).
pub const TAKEOVER_SEQ_GAP: u64 = 1 << 32;

/// Raises `store`'s `applied_seq` by [`TAKEOVER_SEQ_GAP`] and returns the new value. Call only
/// once every record of the log that served the store during the takeover is applied (a CP with
/// nothing left): records still unapplied would be skipped too.
pub async fn fence_superseded_log<B: Backing>(store: &B) -> Result<u64, JournalError> {
    let applied = store
        .applied_seq()
        .await
        .map_err(backing_err("applied_seq", 0))?;
    let fenced = applied.saturating_add(TAKEOVER_SEQ_GAP);
    store.flush().await.map_err(backing_err("flush", 0))?;
    store
        .set_applied_seq(fenced)
        .await
        .map_err(backing_err("set_applied_seq", 0))?;
    Ok(fenced)
}
