//! What the array tells operators: the serialisable status of the array, its members and the
//! current rebuild, assembled from `Inner`'s state under its locks in one place.

use super::*;

/// Progress of the current or last rebuild.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RebuildStatus {
    pub slot: usize,
    pub member: String,
    pub kind: ResyncKind,
    pub running: bool,
    pub done_bytes: u64,
    pub total_bytes: u64,
    pub percent: f64,
    /// JSON `rate_bytes_per_s`, as every admin reply names a rate.
    #[serde(rename = "rate_bytes_per_s")]
    pub rate_bytes_per_sec: f64,
    /// JSON `eta_s`, as every admin reply names seconds.
    #[serde(rename = "eta_s")]
    pub eta_secs: Option<f64>,
    pub error: Option<String>,
}

/// One slot or spare in [`ArrayStatus`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Slot number, `None` for spares.
    pub slot: Option<usize>,
    /// Member name, `None` when the slot has no device.
    pub name: Option<String>,
    pub state: MemberState,
}

/// What `mdadm --detail` tells, serialisable for the admin API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ArrayStatus {
    pub name: String,
    pub uuid: Uuid,
    pub level: Level,
    pub size_bytes: u64,
    pub chunk_bytes: u64,
    pub stripe_bytes: u64,
    pub members: Vec<MemberStatus>,
    pub degraded: bool,
    pub failed: bool,
    pub events: u64,
    pub applied_seq: u64,
    pub rebuild: Option<RebuildStatus>,
    /// JSON `mismatches`, the name the scrub replies use.
    #[serde(rename = "mismatches")]
    pub mismatch_count: u64,
    pub scrub_running: bool,
    /// Rows the running (or last) scrub has checked, of `scrub_rows_total`.
    #[serde(default)]
    pub scrub_rows_checked: u64,
    #[serde(default)]
    pub scrub_rows_total: u64,
    /// Regions resynchronised from the bitmap for returning members (cumulative).
    pub bitmap_resync_regions: u64,
    /// Regions resynchronised at assembly after an unclean shutdown.
    pub unclean_resync_regions: u64,
    pub bitmap_dirty_regions: u64,
    pub bitmap_region_bytes: u64,
}

impl Inner {
    pub(super) fn status(&self) -> ArrayStatus {
        let m = lock(&self.meta);
        let mut members: Vec<MemberStatus> = m
            .slots
            .iter()
            .enumerate()
            .map(|(i, s)| MemberStatus {
                slot: Some(i),
                name: s.member.as_ref().map(|d| d.name().to_string()),
                state: if s.member.is_none() && s.state == MemberState::Active {
                    MemberState::Missing
                } else {
                    s.state
                },
            })
            .collect();
        members.extend(m.spares.iter().map(|s| MemberStatus {
            slot: None,
            name: Some(s.member.name().to_string()),
            state: MemberState::Spare,
        }));
        // A hot replace's target: being filled, not yet in its slot.
        members.extend(m.replacement.iter().map(|r| MemberStatus {
            slot: None,
            name: Some(r.member.name().to_string()),
            state: MemberState::Rebuilding,
        }));
        let degraded = m
            .slots
            .iter()
            .any(|s| s.state != MemberState::Active || s.member.is_none());
        let (dirty, region) = {
            let b = lock(&self.bitmap);
            (b.dirty_regions().len() as u64, b.geometry().region_bytes)
        };
        ArrayStatus {
            name: self.name.clone(),
            uuid: self.uuid,
            level: self.geo.level,
            size_bytes: self.geo.size_bytes(),
            chunk_bytes: self.geo.chunk_bytes,
            stripe_bytes: self.geo.stripe_bytes(),
            members,
            degraded,
            failed: m.failed.is_some(),
            events: m.events,
            applied_seq: m.applied_seq,
            rebuild: lock(&self.progress).clone(),
            mismatch_count: self.mismatches.load(Ordering::SeqCst),
            scrub_running: self.scrub_running.load(Ordering::SeqCst),
            scrub_rows_checked: self.scrub_rows_done.load(Ordering::SeqCst),
            scrub_rows_total: self.geo.rows,
            bitmap_resync_regions: self.bitmap_resync_regions.load(Ordering::SeqCst),
            unclean_resync_regions: self.unclean_resync_regions.load(Ordering::SeqCst),
            bitmap_dirty_regions: dirty,
            bitmap_region_bytes: region,
        }
    }
}
