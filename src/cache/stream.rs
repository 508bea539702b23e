//! Sequential-stream detection for the read cache's fills: a stream of large misses that has
//! already read more than the cache can keep stops filling the cache.
//!
//! Why: a sequential read of a range larger than the cache (a backup, a `dd`, a scan of a big
//! file) fills the cache with blocks that are evicted again before the stream comes back to them,
//! and each fill costs a copy of the data and a policy insert and eviction per 4 KiB block. Worse,
//! it pushes out blocks the cache held that were read only once (the policy's probationary queue
//! protects only blocks read again). Once a stream has filled `limit` bytes (a fraction of the
//! cache), its further misses are served without being kept: what the cache held stays, so does
//! the part of the stream already filled (nothing the stream reads later evicts it), and the
//! cost of the rest of the stream is the disk read alone.
//!
//! Only misses of at least [`STREAM_MIN_READ_BYTES`] are tracked: small reads never take the
//! tracker's lock (the 4 KiB path stays as it is) and a small read always fills.
//!
//! Pure logic: no I/O, no clock; the caller holds it under a mutex.

/// Misses smaller than this are not tracked and always fill.
pub const STREAM_MIN_READ_BYTES: u64 = 64 << 10;
/// Streams tracked at once (least recently extended one replaced first).
pub const STREAM_SLOTS: usize = 8;
/// How far a read may start before or after a stream's end and still continue it: requests of
/// a deep queue are issued in order but reach the cache slightly out of order.
pub const STREAM_SLACK_BYTES: u64 = 16 << 20;

#[derive(Debug, Clone, Copy, Default)]
struct Stream {
    /// One past the highest byte the stream read.
    next: u64,
    /// Bytes the stream filled into the cache so far.
    filled_bytes: u64,
    /// Bytes the stream read so far (filled or not).
    run_bytes: u64,
    /// Tick of its last read, for replacement; 0: slot unused.
    last_tick: u64,
}

/// Tracks up to [`STREAM_SLOTS`] sequential streams and says which misses fill the cache.
#[derive(Debug)]
pub struct StreamTracker {
    slots: [Stream; STREAM_SLOTS],
    tick: u64,
    /// Bytes one stream may fill before its later misses stop filling.
    limit_bytes: u64,
}

impl StreamTracker {
    /// A tracker letting each stream fill at most `limit_bytes`.
    pub fn new(limit_bytes: u64) -> StreamTracker {
        StreamTracker {
            slots: [Stream::default(); STREAM_SLOTS],
            tick: 0,
            limit_bytes,
        }
    }

    /// Records a miss of `len` bytes at `offset`; true when its blocks should be kept.
    pub fn should_fill(&mut self, offset: u64, len: u64) -> bool {
        if len < STREAM_MIN_READ_BYTES {
            return true;
        }
        self.tick += 1;
        let end = offset.saturating_add(len);
        let tick = self.tick;
        let continued = self.slots.iter().position(|s| {
            s.last_tick != 0
                && offset >= s.next.saturating_sub(STREAM_SLACK_BYTES)
                && offset <= s.next.saturating_add(STREAM_SLACK_BYTES)
        });
        let at = match continued {
            Some(at) => at,
            None => {
                // A new stream replaces the least recently extended one.
                let mut lru = 0;
                for (i, s) in self.slots.iter().enumerate() {
                    if s.last_tick < self.slots[lru].last_tick {
                        lru = i;
                    }
                }
                self.slots[lru] = Stream {
                    next: end,
                    ..Stream::default()
                };
                lru
            }
        };
        let s = &mut self.slots[at];
        s.next = s.next.max(end);
        s.last_tick = tick;
        s.run_bytes = s.run_bytes.saturating_add(len);
        let fill = s.filled_bytes.saturating_add(len) <= self.limit_bytes;
        if fill {
            s.filled_bytes += len;
        }
        fill
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn small_reads_always_fill() {
        let mut t = StreamTracker::new(0);
        for i in 0..100 {
            assert!(t.should_fill(i * 4096, 4096));
        }
    }

    #[test]
    fn a_stream_stops_filling_past_the_limit() {
        let mut t = StreamTracker::new(4 * MIB);
        let fills: Vec<bool> = (0..8).map(|i| t.should_fill(i * MIB, MIB)).collect();
        assert_eq!(fills, [true, true, true, true, false, false, false, false]);
    }

    #[test]
    fn a_stream_starting_over_fills_its_head_again() {
        let mut t = StreamTracker::new(2 * MIB);
        // 64 MiB apart is far beyond the slack: the second pass is a new stream.
        for i in 0..64 {
            t.should_fill(i * MIB, MIB);
        }
        assert!(t.should_fill(0, MIB));
        assert!(t.should_fill(MIB, MIB));
        assert!(!t.should_fill(2 * MIB, MIB));
    }

    #[test]
    fn slightly_out_of_order_requests_continue_the_stream() {
        let mut t = StreamTracker::new(3 * MIB);
        assert!(t.should_fill(0, MIB));
        assert!(t.should_fill(2 * MIB, MIB));
        assert!(t.should_fill(MIB, MIB));
        assert!(
            !t.should_fill(3 * MIB, MIB),
            "the three reads were one stream"
        );
    }

    #[test]
    fn interleaved_streams_are_counted_apart() {
        let mut t = StreamTracker::new(2 * MIB);
        let a = 0;
        let b = 10_000 * MIB;
        for i in 0..2 {
            assert!(t.should_fill(a + i * MIB, MIB));
            assert!(t.should_fill(b + i * MIB, MIB));
        }
        assert!(!t.should_fill(a + 2 * MIB, MIB));
        assert!(!t.should_fill(b + 2 * MIB, MIB));
    }

    #[test]
    fn more_streams_than_slots_replace_the_least_recent() {
        let mut t = StreamTracker::new(MIB);
        for s in 0..STREAM_SLOTS as u64 + 1 {
            assert!(t.should_fill(s * 1000 * MIB, MIB), "stream {s} is new");
        }
        // Stream 0 was replaced: its next read starts a new stream that may fill.
        assert!(t.should_fill(MIB, MIB));
        // The last stream is still tracked and over its limit.
        assert!(!t.should_fill(STREAM_SLOTS as u64 * 1000 * MIB + MIB, MIB));
    }
}
