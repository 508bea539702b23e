//! Per-hop timestamps of a mirrored write, for finding where its latency goes.
//!
//! A mirrored write crosses two processes and several threads: the owner's NBD request task
//! appends the record and sends it, the partner's connection task reads, stores, persists and
//! acknowledges it, the owner's ACK reader completes the writer, and the writer replies. Which
//! of these hops costs the time (a thread waking from idle, a MAC, a copy) cannot be seen from
//! the client's latency alone, so each hop can stamp the time it was reached.
//!
//! Off unless the environment variable [`HOP_TRACE_ENV`] names a file when the process first
//! marks a hop: then every [`mark`] appends `(hop, key, CLOCK_MONOTONIC ns, thread)` to an
//! in-memory list, and a background thread appends the list to the file every
//! [`HOP_TRACE_FLUSH_INTERVAL_MS`] as tab-separated lines `hop key ns thread`. Off, a mark costs
//! one load of an initialised `OnceLock` and a branch. Both daemons of a pair on one host share
//! `CLOCK_MONOTONIC`, so their stamps can be subtracted across processes: `tools/hop-report`
//! joins the owner's and the partner's files by seq and prints each hop's p50/p99.
//!
//! The key is the record's seq where the hop knows it (0 where it does not: a read that may
//! hold several frames); at queue depth 1 the report groups the owner's stamps into writes by
//! time.

use std::cell::Cell;
use std::io::Write;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

/// The environment variable naming the trace file (unset or empty: tracing off).
pub const HOP_TRACE_ENV: &str = "TWINBLOCK_HOP_TRACE";
/// How often the collected stamps are appended to the file.
const HOP_TRACE_FLUSH_INTERVAL_MS: u64 = 100;
/// Most stamps held in memory between flushes (more are dropped and counted).
const HOP_TRACE_BUFFER_MAX_EVENTS: usize = 1 << 20;

/// The hops of a mirrored write, in the order a depth-1 write reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hop {
    /// Owner: the journaled device's write was called (the NBD request is decoded, its payload
    /// read).
    DevWrite,
    /// Owner: the record is in the local log; the mirror's `ship` starts (key: seq).
    Ship,
    /// Owner: a send of records is handed to the kernel (key: the batch's last seq).
    SendStart,
    /// Owner: that send returned or completed (key: the batch's last seq). On loopback the send
    /// runs the partner's TCP input and wake-up, so this may come after the partner read it.
    SendDone,
    /// Partner: a read on the owner's connection returned bytes.
    RxRead,
    /// Partner: a RECORD frame was opened (MAC checked) and decoded (key: seq).
    RxFrame,
    /// Partner: the frame was stored in the copy (key: seq).
    RxStored,
    /// Partner: the read's records are persisted (key: the ACK's seq).
    RxPersisted,
    /// Partner: the ACK is handed to the socket (key: its seq).
    AckWrite,
    /// Partner: the ACK's write returned (key: its seq). On loopback the write runs the
    /// receiver's TCP input and wake-up, so this may come after the owner read the ACK.
    AckSent,
    /// Owner: a read on the ACK connection returned bytes.
    AckRead,
    /// Owner: the ACK completed the covered writers (key: its seq).
    AckApplied,
    /// Owner: the writer's `ship` returns (key: seq).
    ShipDone,
    /// Owner: the journaled device's write returns.
    DevDone,
}

impl Hop {
    pub fn name(self) -> &'static str {
        match self {
            Hop::DevWrite => "dev_write",
            Hop::Ship => "ship",
            Hop::SendStart => "send_start",
            Hop::SendDone => "send_done",
            Hop::RxRead => "rx_read",
            Hop::RxFrame => "rx_frame",
            Hop::RxStored => "rx_stored",
            Hop::RxPersisted => "rx_persisted",
            Hop::AckWrite => "ack_write",
            Hop::AckSent => "ack_sent",
            Hop::AckRead => "ack_read",
            Hop::AckApplied => "ack_applied",
            Hop::ShipDone => "ship_done",
            Hop::DevDone => "dev_done",
        }
    }
}

struct Tracer {
    events: Mutex<Vec<(Hop, u64, u64, u32)>>,
    dropped: AtomicU32,
}

static TRACER: OnceLock<Option<&'static Tracer>> = OnceLock::new();
static NEXT_THREAD: AtomicU32 = AtomicU32::new(1);

thread_local! {
    /// A small number per thread (0: not yet assigned), so the report can tell a hop that
    /// changed threads from one that did not.
    static THREAD: Cell<u32> = const { Cell::new(0) };
}

/// True when hop tracing is on in this process.
pub fn enabled() -> bool {
    tracer().is_some()
}

/// Stamps `hop` for `key` (see the module docs); nothing when tracing is off.
#[inline]
pub fn mark(hop: Hop, key: u64) {
    if let Some(t) = tracer() {
        t.push(hop, key);
    }
}

fn tracer() -> Option<&'static Tracer> {
    *TRACER.get_or_init(start)
}

/// CLOCK_MONOTONIC in nanoseconds (the clock `Instant` uses on Linux, readable as a number so
/// two processes' stamps compare).
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the duration of the call; clock_gettime
    // writes only into it.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

impl Tracer {
    fn push(&self, hop: Hop, key: u64) {
        let ns = monotonic_ns();
        let thread = THREAD.with(|t| {
            if t.get() == 0 {
                t.set(NEXT_THREAD.fetch_add(1, Ordering::Relaxed));
            }
            t.get()
        });
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        if ev.len() >= HOP_TRACE_BUFFER_MAX_EVENTS {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        ev.push((hop, key, ns, thread));
    }
}

fn start() -> Option<&'static Tracer> {
    let path = std::env::var_os(HOP_TRACE_ENV).filter(|p| !p.is_empty())?;
    let file = match std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
    {
        Ok(f) => f,
        Err(e) => {
            tracing::warn!(path = %std::path::Path::new(&path).display(), "hop tracing off: cannot open its file: {e}");
            return None;
        }
    };
    let tracer: &'static Tracer = Box::leak(Box::new(Tracer {
        events: Mutex::new(Vec::with_capacity(4096)),
        dropped: AtomicU32::new(0),
    }));
    let spawned = std::thread::Builder::new()
        .name("hop-trace".into())
        .spawn(move || flush_loop(tracer, file));
    if let Err(e) = spawned {
        tracing::warn!("hop tracing off: cannot start its writer thread: {e}");
        return None;
    }
    tracing::info!(path = %std::path::Path::new(&path).display(), "hop tracing on");
    Some(tracer)
}

fn flush_loop(tracer: &'static Tracer, file: std::fs::File) {
    let mut out = std::io::BufWriter::new(file);
    let mut taken = Vec::new();
    loop {
        std::thread::sleep(Duration::from_millis(HOP_TRACE_FLUSH_INTERVAL_MS));
        std::mem::swap(
            &mut taken,
            &mut *tracer.events.lock().unwrap_or_else(|p| p.into_inner()),
        );
        for (hop, key, ns, thread) in taken.drain(..) {
            let _ = writeln!(out, "{}\t{key}\t{ns}\t{thread}", hop.name());
        }
        let dropped = tracer.dropped.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            let _ = writeln!(out, "dropped\t{dropped}\t0\t0");
        }
        let _ = out.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        std::thread::sleep(Duration::from_millis(2));
        let b = monotonic_ns();
        assert!(b >= a + 2_000_000, "{a} then {b}");
    }

    #[test]
    fn hop_names_are_distinct() {
        let all = [
            Hop::DevWrite,
            Hop::Ship,
            Hop::SendStart,
            Hop::SendDone,
            Hop::RxRead,
            Hop::RxFrame,
            Hop::RxStored,
            Hop::RxPersisted,
            Hop::AckWrite,
            Hop::AckSent,
            Hop::AckRead,
            Hop::AckApplied,
            Hop::ShipDone,
            Hop::DevDone,
        ];
        let names: std::collections::HashSet<_> = all.iter().map(|h| h.name()).collect();
        assert_eq!(names.len(), all.len());
    }
}
