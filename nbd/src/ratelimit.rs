//! A small rate limiter for log lines.
//!
//! A misbehaving or hostile client can make the server refuse thousands of requests or
//! connections a second; logging each one would fill the disk and bury everything else. Each
//! kind of refusal gets a limiter: at most `burst` lines per `window`, and the first line after a
//! quiet period says how many were suppressed. The decision (`check_at`) is pure given the
//! clock, so it is unit-tested without sleeping.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Lines each kind of refusal may log per window.
pub const REFUSAL_LOG_BURST: u32 = 10;
/// The window over which `REFUSAL_LOG_BURST` applies.
pub const REFUSAL_LOG_WINDOW: Duration = Duration::from_secs(10);

#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

/// Allows `burst` events per `window` (fixed windows).
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    window: Duration,
    state: Mutex<Window>,
}

impl RateLimiter {
    pub fn new(burst: u32, window: Duration) -> Self {
        RateLimiter {
            burst,
            window,
            state: Mutex::new(Window::default()),
        }
    }

    /// Whether to log now: `Some(n)` with the number of events suppressed since the last allowed
    /// one, `None` when this one is to be suppressed.
    pub fn check(&self) -> Option<u64> {
        self.check_at(Instant::now())
    }

    /// As [`RateLimiter::check`], at a given time.
    pub fn check_at(&self, now: Instant) -> Option<u64> {
        // The guarded data is three counters; a panic elsewhere cannot leave them unusable.
        let mut w = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let expired = w
            .start
            .is_none_or(|start| now.saturating_duration_since(start) >= self.window);
        if expired {
            w.start = Some(now);
            w.used = 0;
        }
        if w.used < self.burst {
            w.used += 1;
            Some(std::mem::take(&mut w.suppressed))
        } else {
            w.suppressed += 1;
            None
        }
    }
}

/// The limiters of one server, one per kind of refusal so a flood of one kind cannot hide
/// another.
#[derive(Debug)]
pub struct RefusalLogs {
    /// Requests refused by validation (bad range, unknown command...).
    pub requests: RateLimiter,
    /// Requests the device failed.
    pub device_errors: RateLimiter,
    /// Connections refused (connection limit, allow-list, TLS required) or failed handshakes.
    pub connections: RateLimiter,
}

impl Default for RefusalLogs {
    fn default() -> Self {
        let limiter = || RateLimiter::new(REFUSAL_LOG_BURST, REFUSAL_LOG_WINDOW);
        RefusalLogs {
            requests: limiter(),
            device_errors: limiter(),
            connections: limiter(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_is_allowed_then_suppressed_until_the_window_ends() {
        let l = RateLimiter::new(3, Duration::from_secs(10));
        let t0 = Instant::now();
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0), Some(0));
        assert_eq!(l.check_at(t0 + Duration::from_secs(1)), Some(0));
        for _ in 0..5 {
            assert_eq!(l.check_at(t0 + Duration::from_secs(2)), None);
        }
        assert_eq!(
            l.check_at(t0 + Duration::from_secs(10)),
            Some(5),
            "the first line of a new window reports what was suppressed"
        );
        assert_eq!(l.check_at(t0 + Duration::from_secs(11)), Some(0));
    }

    #[test]
    fn zero_burst_suppresses_everything() {
        let l = RateLimiter::new(0, Duration::from_secs(1));
        assert_eq!(l.check_at(Instant::now()), None);
    }
}
