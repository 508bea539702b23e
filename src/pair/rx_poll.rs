//! The partner's receive thread can poll its socket for a short while after each batch before
//! it sleeps in a blocking `recv` ([`super::rx_thread`]). Off by default: see "Measured" below.
//!
//! # Why poll
//!
//! Under load the owner sends the next batch within tens of microseconds of the ACK for the
//! last one. A thread that went to sleep in `recv` in between costs a context switch and a
//! wake-up on both sides: the owner's `send` has to wake it (on this VM, an idle vCPU's wake-up
//! is tens of microseconds), and this thread pays the switch back in. Polling with
//! `MSG_DONTWAIT` for a budget of tens of microseconds catches those batches awake. At depth 1 the next
//! record comes a full client round trip later, past the budget, and polling would only burn
//! the budget per record (a first version that always polled cost the partner about 60 us of
//! CPU per depth-1 write, on a 2-core machine shared with the owner and the client). So the
//! thread polls only while reads keep coming within the budget ([`Poller`]): one read that
//! took longer turns polling off until a read comes within the budget again.
//!
//! # Measured
//!
//! In interleaved runs on the shared 2-core machine (load average 13 to 17, docs/BENCHMARKS.md
//! "Mirror cost", 2026-11-28) polling did not show a win that stands above the noise: the
//! always-polling version cost the partner about 60 us of CPU per depth-1 write, and the
//! adaptive one put the partner's CPU per depth-32 write at 8.9 and 12.8 us against 7.3 and
//! 7.8 us without it (time spent spinning on a core the owner and the client also need), while
//! the throughput ratios swung by 2x between runs of one binary. So the budget defaults to 0 (the thread sleeps in
//! `recv` as before) and `TWINBLOCK_RX_POLL_US` sets one, so that one binary can be compared
//! with and without polling on a quiet machine (for benchmarks, not a setting an operator needs).
//!
//! This module holds the receive thread's only `unsafe`: one `recv(2)` call (see
//! [`recv_nowait`]).

use std::io;
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// Microseconds the receive thread polls for the next read before it blocks, unless
/// `TWINBLOCK_RX_POLL_US` says otherwise: none (see "Measured" in the module docs).
pub(super) const RX_POLL_DEFAULT_US: u64 = 0;
/// The largest budget `TWINBLOCK_RX_POLL_US` may set (a longer poll is a busy core, not a wait).
pub(super) const RX_POLL_MAX_US: u64 = 1_000;

/// The polling budget: `TWINBLOCK_RX_POLL_US` when set to a number up to [`RX_POLL_MAX_US`],
/// otherwise [`RX_POLL_DEFAULT_US`] (a bad value is logged once, when the thread starts).
pub(super) fn budget() -> Duration {
    Duration::from_micros(parse_budget(
        std::env::var("TWINBLOCK_RX_POLL_US").ok().as_deref(),
    ))
}

fn parse_budget(v: Option<&str>) -> u64 {
    let Some(v) = v else {
        return RX_POLL_DEFAULT_US;
    };
    match v.trim().parse::<u64>() {
        Ok(us) if us <= RX_POLL_MAX_US => us,
        _ => {
            tracing::warn!(
                value = v,
                default_us = RX_POLL_DEFAULT_US,
                max_us = RX_POLL_MAX_US,
                "TWINBLOCK_RX_POLL_US must be microseconds up to the maximum; using the default"
            );
            RX_POLL_DEFAULT_US
        }
    }
}

/// Whether the next read polls first: only when the last read came within the budget.
#[derive(Debug)]
pub(super) struct Poller {
    budget: Duration,
    last_within_budget: bool,
}

impl Poller {
    pub(super) fn new(budget: Duration) -> Poller {
        Poller {
            budget,
            last_within_budget: false,
        }
    }

    /// When polling for a read started at `from` should give up, or `None`: do not poll.
    pub(super) fn deadline(&self, from: Instant) -> Option<Instant> {
        (self.last_within_budget && !self.budget.is_zero()).then(|| from + self.budget)
    }

    /// A read started at `from` got bytes at `at`.
    pub(super) fn arrived(&mut self, from: Instant, at: Instant) {
        self.last_within_budget = at.saturating_duration_since(from) <= self.budget;
    }
}

/// One `recv` that does not wait: `Err(WouldBlock)` when no byte is queued, `Ok(0)` at end of
/// stream, else the bytes read into `buf`.
pub(super) fn recv_nowait(stream: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live, exclusively borrowed slice of `buf.len()` writable bytes for the
    // whole call, and the kernel writes at most that many; the descriptor belongs to `stream`,
    // which the borrow keeps open. `recv` keeps no pointer after it returns.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{ErrorKind, Write};
    use std::net::TcpListener;

    #[test]
    fn budget_defaults_and_rejects_bad_or_huge_values() {
        assert_eq!(parse_budget(None), RX_POLL_DEFAULT_US);
        assert_eq!(parse_budget(Some("0")), 0);
        assert_eq!(parse_budget(Some(" 20 ")), 20);
        assert_eq!(parse_budget(Some("fast")), RX_POLL_DEFAULT_US);
        assert_eq!(parse_budget(Some("-5")), RX_POLL_DEFAULT_US);
        assert_eq!(
            parse_budget(Some(&(RX_POLL_MAX_US + 1).to_string())),
            RX_POLL_DEFAULT_US
        );
    }

    #[test]
    fn poller_polls_only_after_a_read_within_the_budget() {
        let t0 = Instant::now();
        let us = Duration::from_micros;
        let mut p = Poller::new(us(50));
        assert_eq!(p.deadline(t0), None, "no poll before the first read");
        p.arrived(t0, t0 + us(10));
        assert_eq!(
            p.deadline(t0),
            Some(t0 + us(50)),
            "a quick read turns polling on"
        );
        p.arrived(t0, t0 + us(200));
        assert_eq!(p.deadline(t0), None, "a slow read (depth 1) turns it off");
        p.arrived(t0, t0 + us(50));
        assert!(
            p.deadline(t0).is_some(),
            "the budget itself counts as within"
        );
        let mut off = Poller::new(Duration::ZERO);
        off.arrived(t0, t0);
        assert_eq!(off.deadline(t0), None, "a zero budget never polls");
    }

    #[test]
    fn recv_nowait_reports_would_block_then_data_then_end_of_stream() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut tx = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (rx, _) = listener.accept().unwrap();
        let mut buf = [0u8; 16];
        let e = recv_nowait(&rx, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::WouldBlock);
        tx.write_all(b"abc").unwrap();
        let mut got = 0;
        for _ in 0..1000 {
            match recv_nowait(&rx, &mut buf) {
                Ok(n) => {
                    got = n;
                    break;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(&buf[..got], b"abc");
        drop(tx);
        let mut end = None;
        for _ in 0..1000 {
            match recv_nowait(&rx, &mut buf) {
                Ok(n) => {
                    end = Some(n);
                    break;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(end, Some(0), "end of stream reads as 0 bytes");
    }
}
