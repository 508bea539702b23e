//! The gate between large writes that bypass the log and CPs, by byte range.
//!
//! What must never happen is a CP writing bytes older than a bypass's STORED record over its
//! range after the bypass wrote the store (`bypass`). Only CPs and bypasses whose ranges overlap
//! can do that, so only those wait for each other:
//! - a bypass holds a [`BypassPass`] for its range from before its store write until its record
//!   is appended (the index then no longer holds older bytes of the range); it waits to get one
//!   while the running CP's snapshot covers part of its range;
//! - a CP registers the ranges of its index snapshot under the same hold of the volume's lock as
//!   the snapshot, together with the bypasses in flight over them; it waits for those to finish
//!   and then takes its snapshot again (without the ranges they superseded) before writing.
//!
//! A bypass that finished before the snapshot already removed its range from the index; one in
//! flight at the snapshot is seen by the CP; one that starts afterwards sees the CP's ranges. A
//! sequential stream of large writes thus never waits for a CP that applies the small head and
//! tail pieces beside it (the single gate this replaces stalled every bypass for every CP).

use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use crate::index::Extent;

#[derive(Default)]
struct State {
    /// The running CP's snapshot ranges `(start, end)`, sorted and disjoint.
    cp: Option<Vec<(u64, u64)>>,
    /// Bypasses in flight: `(id, start, end)`.
    bypasses: Vec<(u64, u64, u64)>,
    next_id: u64,
}

/// See the module doc.
#[derive(Default)]
pub(super) struct RangeGate {
    state: Mutex<State>,
    changed: Notify,
}

/// Whether `[start, end)` overlaps one of `ranges` (sorted, disjoint).
fn overlaps(ranges: &[(u64, u64)], start: u64, end: u64) -> bool {
    // The first range ending after `start` is the only candidate.
    let i = ranges.partition_point(|&(_, e)| e <= start);
    ranges.get(i).is_some_and(|&(s, _)| s < end)
}

/// The byte ranges an index snapshot (sorted by offset) covers, adjacent ones merged.
pub(super) fn ranges_of(snapshot: &[(u64, Extent)]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(offset, e) in snapshot {
        let end = offset.saturating_add(e.len);
        match out.last_mut() {
            Some((_, last_end)) if offset <= *last_end => *last_end = (*last_end).max(end),
            _ => out.push((offset, end)),
        }
    }
    out
}

impl RangeGate {
    fn lock(&self) -> MutexGuard<'_, State> {
        // Plain bookkeeping, consistent at every unlock: a panic elsewhere must not wedge it.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until no running CP writes part of `[offset, offset + len)`, then holds the range
    /// until the pass is dropped.
    pub(super) async fn enter_bypass(&self, offset: u64, len: u64) -> BypassPass<'_> {
        let end = offset.saturating_add(len);
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut st = self.lock();
                let blocked = st.cp.as_deref().is_some_and(|r| overlaps(r, offset, end));
                if !blocked {
                    let id = st.next_id;
                    st.next_id += 1;
                    st.bypasses.push((id, offset, end));
                    return BypassPass { gate: self, id };
                }
            }
            changed.await;
        }
    }

    /// Registers the running CP's snapshot `ranges` (call under the volume lock that guarded
    /// the snapshot); returns its pass and the bypasses in flight over them, to wait for with
    /// [`RangeGate::wait_finished`].
    pub(super) fn register_cp(&self, ranges: Vec<(u64, u64)>) -> (CpPass<'_>, Vec<u64>) {
        let mut st = self.lock();
        let waiting = st
            .bypasses
            .iter()
            .filter(|&&(_, s, e)| overlaps(&ranges, s, e))
            .map(|&(id, _, _)| id)
            .collect();
        st.cp = Some(ranges);
        (CpPass { gate: self }, waiting)
    }

    /// Returns once none of the bypasses `ids` is in flight any more.
    pub(super) async fn wait_finished(&self, ids: &[u64]) {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            if !self
                .lock()
                .bypasses
                .iter()
                .any(|(id, _, _)| ids.contains(id))
            {
                return;
            }
            changed.await;
        }
    }
}

/// A bypass's hold on its range.
pub(super) struct BypassPass<'a> {
    gate: &'a RangeGate,
    id: u64,
}

impl Drop for BypassPass<'_> {
    fn drop(&mut self) {
        self.gate
            .lock()
            .bypasses
            .retain(|(id, _, _)| *id != self.id);
        self.gate.changed.notify_waiters();
    }
}

/// The running CP's hold on its snapshot ranges.
pub(super) struct CpPass<'a> {
    gate: &'a RangeGate,
}

impl Drop for CpPass<'_> {
    fn drop(&mut self) {
        self.gate.lock().cp = None;
        self.gate.changed.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::index::ExtentData;
    use std::time::Duration;

    fn ext(len: u64) -> Extent {
        Extent {
            len,
            seq: 1,
            data: ExtentData::Zero,
        }
    }

    #[test]
    fn snapshot_ranges_merge_adjacent_extents() {
        let snap = vec![(0, ext(10)), (10, ext(5)), (20, ext(4)), (22, ext(10))];
        assert_eq!(ranges_of(&snap), vec![(0, 15), (20, 32)]);
    }

    #[test]
    fn overlap_is_strict_at_the_edges() {
        let r = [(10, 20), (30, 40)];
        assert!(!overlaps(&r, 0, 10));
        assert!(!overlaps(&r, 20, 30));
        assert!(overlaps(&r, 19, 21));
        assert!(overlaps(&r, 0, 100));
        assert!(!overlaps(&r, 40, 50));
    }

    #[tokio::test]
    async fn bypass_beside_a_cp_passes_and_one_over_it_waits_for_its_end() {
        let gate = RangeGate::default();
        let (cp, waiting) = gate.register_cp(vec![(0, 100)]);
        assert!(waiting.is_empty());
        // Beside the CP's ranges: at once.
        drop(gate.enter_bypass(100, 50).await);
        // Over them: only once the CP ends.
        let over = gate.enter_bypass(50, 100);
        tokio::pin!(over);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), over.as_mut())
                .await
                .is_err()
        );
        drop(cp);
        drop(over.await);
    }

    #[tokio::test]
    async fn cp_waits_for_the_bypasses_in_flight_over_its_ranges() {
        let gate = RangeGate::default();
        let beside = gate.enter_bypass(500, 100).await;
        let over = gate.enter_bypass(0, 100).await;
        let (_cp, waiting) = gate.register_cp(vec![(50, 60)]);
        assert_eq!(waiting.len(), 1);
        {
            let wait = gate.wait_finished(&waiting);
            tokio::pin!(wait);
            assert!(
                tokio::time::timeout(Duration::from_millis(50), wait.as_mut())
                    .await
                    .is_err()
            );
            drop(over);
            wait.await;
        }
        drop(beside);
    }
}
