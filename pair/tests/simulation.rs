//! Deterministic simulation of two nodes running the real state machine under random schedules
//! of loss, delay, duplication, path cuts, crashes, restarts, pauses, unreachable disks, operator
//! commands and mirror-sync flapping. See `common/mod.rs` for the model and the invariants.
//!
//! * `random_schedules_keep_the_invariants`: the default run (`DEFAULT_SEEDS` seeds).
//! * `many_random_schedules_keep_the_invariants` (ignored): `TWINBLOCK_SIM_SEEDS` seeds
//!   (default 100 000), e.g. `TWINBLOCK_SIM_SEEDS=1000000 cargo test --release -p twinblock-pair
//!   --test simulation -- --ignored`.
//! * `replay_seed_from_env`: `TWINBLOCK_SIM_SEED=N cargo test -p twinblock-pair --test
//!   simulation replay_seed_from_env -- --nocapture` prints the trace of schedule N.

mod common;

use common::{run_schedule, Stats};

const DEFAULT_SEEDS: u64 = 2000;
const SCHEDULE_MS: u64 = 5_000;

fn run_seeds(first: u64, count: u64) -> Stats {
    let mut total = Stats::default();
    for seed in first..first + count {
        let w = run_schedule(seed, SCHEDULE_MS, false);
        if let Some(v) = w.violations.first() {
            panic!(
                "simulation seed {seed} violated an invariant: {v}\n({} violations in all)\n\
                 replay with: TWINBLOCK_SIM_SEED={seed} cargo test -p twinblock-pair --test simulation \
                 replay_seed_from_env -- --nocapture",
                w.violations.len()
            );
        }
        let s = w.stats;
        total.announces += s.announces;
        total.preempts += s.preempts;
        total.reserve_attempts += s.reserve_attempts;
        total.takeovers_completed += s.takeovers_completed;
        total.givebacks_completed += s.givebacks_completed;
        total.writes += s.writes;
        total.refused_writes += s.refused_writes;
        total.fences += s.fences;
        total.crashes += s.crashes;
        total.pauses += s.pauses;
    }
    total
}

#[test]
fn random_schedules_keep_the_invariants() {
    let stats = run_seeds(0, DEFAULT_SEEDS);
    println!("{DEFAULT_SEEDS} schedules: {stats:?}");
    // The schedules must exercise the interesting paths, or the run proves nothing.
    assert!(stats.preempts > DEFAULT_SEEDS / 10, "{stats:?}");
    assert!(stats.takeovers_completed > DEFAULT_SEEDS / 10, "{stats:?}");
    assert!(stats.givebacks_completed > 0, "{stats:?}");
    assert!(stats.refused_writes > 0, "{stats:?}");
    assert!(stats.pauses > 0 && stats.crashes > 0, "{stats:?}");
}

#[test]
#[ignore = "long: set TWINBLOCK_SIM_SEEDS (default 100000) and run with --ignored"]
fn many_random_schedules_keep_the_invariants() {
    let count = std::env::var("TWINBLOCK_SIM_SEEDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let stats = run_seeds(DEFAULT_SEEDS, count);
    println!("{count} schedules from seed {DEFAULT_SEEDS}: {stats:?}");
}

#[test]
fn replay_seed_from_env() {
    let Some(seed) = std::env::var("TWINBLOCK_SIM_SEED")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        println!("skipped: set TWINBLOCK_SIM_SEED=N to replay schedule N with its trace");
        return;
    };
    let w = run_schedule(seed, SCHEDULE_MS, true);
    for line in w.trace.iter().flatten() {
        println!("{line}");
    }
    println!("config: {:?}", w.cfg[0]);
    println!("stats: {:?}", w.stats);
    assert!(w.violations.is_empty(), "seed {seed}: {:#?}", w.violations);
}

#[test]
fn same_seed_replays_the_same_schedule() {
    let a = run_schedule(7, 3_000, true);
    let b = run_schedule(7, 3_000, true);
    assert_eq!(a.trace, b.trace);
}
