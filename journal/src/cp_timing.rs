//! How long consistency points take, as a histogram with fixed buckets: the node's metrics
//! export it per volume (`twinblock_journal_cp_duration_seconds`), so an operator sees a CP
//! slowing down (a slow or degraded array under the journal) before writers wait for log space.
//!
//! Kept under the volume's state lock with the other CP counters (one observation per CP, a
//! handful of additions), so it needs no atomics.

use std::time::Duration;

/// Upper bounds of the buckets, in seconds (the last, `+Inf`, is implicit). A CP applies up to the
/// whole log to the array: from a millisecond for a few writes to seconds for a full log.
pub const CP_DURATION_BUCKETS_SECONDS: [f64; 12] = [
    0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// CP durations observed since the volume opened.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpDurations {
    /// Observations at or below each bound (not cumulative).
    buckets: [u64; CP_DURATION_BUCKETS_SECONDS.len()],
    /// Observations above the last bound.
    overflow: u64,
    sum_micros: u64,
}

impl CpDurations {
    pub fn observe(&mut self, d: Duration) {
        let secs = d.as_secs_f64();
        match CP_DURATION_BUCKETS_SECONDS.iter().position(|&b| secs <= b) {
            Some(i) => self.buckets[i] += 1,
            None => self.overflow += 1,
        }
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros = self.sum_micros.saturating_add(micros);
    }

    /// Observations at or below each bound of [`CP_DURATION_BUCKETS_SECONDS`] (Prometheus `le`).
    pub fn cumulative(&self) -> Vec<u64> {
        self.buckets
            .iter()
            .scan(0, |acc, n| {
                *acc += n;
                Some(*acc)
            })
            .collect()
    }

    /// Every observation.
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum::<u64>() + self.overflow
    }

    /// The sum of the observed durations, in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros as f64 / 1e6
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_their_bucket_and_cumulate() {
        let mut h = CpDurations::default();
        h.observe(Duration::from_micros(500));
        h.observe(Duration::from_millis(30));
        h.observe(Duration::from_secs(20));
        let c = h.cumulative();
        assert_eq!(c[0], 1, "0.5 ms is at or below 1 ms");
        assert_eq!(c[4], 1, "30 ms is above 25 ms");
        assert_eq!(c[5], 2, "30 ms is at or below 50 ms");
        assert_eq!(*c.last().unwrap(), 2, "20 s is only in +Inf");
        assert_eq!(h.count(), 3);
        assert!((h.sum_seconds() - 20.0305).abs() < 1e-9);
    }
}
