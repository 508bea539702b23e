//! Focused scenarios of the pair protocol, each named for the one behaviour it checks. They run
//! the real state machine in the simulated world of `common/mod.rs` with scripted faults (no
//! random ones), and also assert that the world's invariants held throughout.

mod common;

use common::World;
use twinblock_pair::heartbeat::Path;
use twinblock_pair::state::{Action, Command, Config, DiskSet, Event, NodeState};
use twinblock_pair::status::{ForeignRecord, Stamp, StatusRecord, TakeoverBlocked};

fn world() -> World {
    World::new(1, World::default_config())
}

fn world_with(f: impl FnOnce(&mut Config)) -> World {
    let mut c = World::default_config();
    f(&mut c);
    World::new(1, c)
}

fn settled() -> World {
    let mut w = world();
    w.run_for(1_000);
    w
}

fn assert_clean(w: &World) {
    assert!(w.violations.is_empty(), "{:#?}", w.violations);
}

fn serving(w: &World, i: usize, set: DiskSet) -> bool {
    w.node(i).is_some_and(|n| n.serving(set))
}

fn blockers(w: &World, i: usize) -> Vec<TakeoverBlocked> {
    w.node(i)
        .map(|n| n.takeover_blockers(w.now))
        .unwrap_or_default()
}

#[test]
fn both_nodes_reach_normal_and_serve_their_own_disks() {
    let w = settled();
    for i in 0..2 {
        assert_eq!(w.state(i), Some(NodeState::Normal));
        assert!(serving(&w, i, DiskSet::Own));
        assert_eq!(w.holder[i], Some(i));
    }
    assert!(w.writes_by[0] > 0 && w.writes_by[1] > 0);
    assert_clean(&w);
}

#[test]
fn killed_partner_is_taken_over_within_two_seconds() {
    let mut w = settled();
    w.crash(0);
    let t0 = w.now;
    assert!(w.run_until(5_000, |w| serving(w, 1, DiskSet::Partner)));
    let took = w.now - t0;
    println!("takeover with default timers: {took} ms from the kill to serving");
    assert!(took < 2_000, "took {took} ms");
    assert_eq!(w.holder[0], Some(1));
    assert_eq!(w.state(1), Some(NodeState::Takeover));
    assert_clean(&w);
}

#[test]
fn mailbox_alone_prevents_takeover() {
    let mut w = settled();
    w.set_path(Path::Udp, false);
    w.set_path(Path::Interconnect, false);
    w.run_for(5_000);
    assert_eq!(w.stats.announces, 0);
    for i in 0..2 {
        assert_eq!(w.state(i), Some(NodeState::Normal));
        assert!(blockers(&w, i).contains(&TakeoverBlocked::PartnerHeard));
        let n = w.node(i).unwrap();
        assert!(n.heartbeat().path_age_ms(Path::Mailbox, w.now).unwrap() < 300);
        assert!(n.heartbeat().path_age_ms(Path::Udp, w.now).unwrap() > 4_000);
    }
    assert_clean(&w);
}

#[test]
fn network_alone_prevents_takeover() {
    let mut w = settled();
    w.set_path(Path::Mailbox, false);
    w.run_for(5_000);
    assert_eq!(w.stats.announces, 0);
    for i in 0..2 {
        let b = blockers(&w, i);
        assert!(b.contains(&TakeoverBlocked::PartnerHeard), "{b:?}");
        assert!(b.contains(&TakeoverBlocked::MailboxUnreadable), "{b:?}");
    }
    assert_clean(&w);
}

#[test]
fn node_that_cannot_read_the_mailbox_never_takes_over() {
    let mut w = settled();
    w.set_path(Path::Udp, false);
    w.set_path(Path::Interconnect, false);
    w.disk_up[1] = false;
    w.run_for(5_000);
    assert_ne!(w.state(1), Some(NodeState::Takeover));
    assert!(blockers(&w, 1).contains(&TakeoverBlocked::MailboxUnreadable));
    // Node 1 lost its disks and with them its lease: node 0 may take it over, safely.
    assert!(!w.node(1).unwrap().lease_fresh(w.now));
    assert_clean(&w);
}

/// Both nodes paused (so each would have suspected the other on resume before a node's own
/// stall stopped counting as partner silence), resumed at staggered moments: the one resumed
/// first sees the other silent in its running time and may announce or take over; the one
/// resumed later must not suspect a partner that kept running.
#[test]
fn both_paused_and_resumed_at_most_one_takes_over() {
    let mut announced = 0;
    for seed in 0..40 {
        let mut w = World::new(seed, World::default_config());
        w.run_for(1_000);
        w.set_path(Path::Udp, false);
        w.set_path(Path::Interconnect, false);
        w.pause(0);
        w.pause(1);
        w.run_for(2_000 + seed * 7);
        w.resume(1);
        w.run_for(seed * 23 % 1_200);
        w.resume(0);
        w.run_for(3_000);
        if w.stats.announces >= 1 {
            announced += 1;
        }
        let takeovers = (0..2)
            .filter(|&i| w.node(i).is_some_and(|n| n.holds(DiskSet::Partner)))
            .count();
        assert!(
            takeovers <= 1,
            "seed {seed}: both hold their partner's disks"
        );
        for d in 0..2 {
            let h = w.holder[d].expect("every disk held");
            // The holder of each disk serves it and nobody else believes it may write it.
            let other = 1 - h;
            let set_other = if other == d {
                DiskSet::Own
            } else {
                DiskSet::Partner
            };
            assert!(
                !w.node(other).unwrap().may_write(set_other, w.now),
                "seed {seed}"
            );
        }
        assert_clean(&w);
    }
    println!("a node announced TAKEOVER in {announced} of 40 schedules");
    assert!(
        announced > 0 && announced < 40,
        "the staggered resumes must sometimes, not always, lead to a takeover: {announced}"
    );
}

#[test]
fn takeover_disabled_by_operator_blocks_and_names_the_reason() {
    let mut w = settled();
    assert!(w.command(1, Command::DisableTakeover));
    w.run_for(200);
    w.crash(0);
    w.run_for(3_000);
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert_eq!(w.holder[0], Some(0), "nothing seized");
    let b = blockers(&w, 1);
    assert!(b.contains(&TakeoverBlocked::DisabledByOperator), "{b:?}");
    assert!(!b.contains(&TakeoverBlocked::PartnerHeard), "{b:?}");
    // Enabling it again lets the takeover proceed.
    assert!(w.command(1, Command::EnableTakeover));
    assert!(w.run_until(2_000, |w| serving(w, 1, DiskSet::Partner)));
    assert_clean(&w);
}

#[test]
fn takeover_disabled_on_the_partner_blocks_this_node_too() {
    let mut w = settled();
    assert!(w.command(0, Command::DisableTakeover));
    w.run_for(300);
    w.crash(0);
    w.run_for(3_000);
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert!(blockers(&w, 1).contains(&TakeoverBlocked::DisabledOnPartner));
    assert_clean(&w);
}

#[test]
fn mirror_out_of_sync_blocks_takeover() {
    let mut w = settled();
    w.set_mirror(1, false);
    w.crash(0);
    w.run_for(3_000);
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert_eq!(w.holder[0], Some(0));
    assert!(blockers(&w, 1).contains(&TakeoverBlocked::MirrorOutOfSync));
    assert_clean(&w);
}

#[test]
fn mirror_going_out_of_sync_mid_takeover_aborts_before_preempting() {
    let mut w = world_with(|c| c.announce_wait_intervals = 10);
    w.run_for(1_000);
    w.crash(0);
    assert!(w.run_until(2_000, |w| w.state(1) == Some(NodeState::TakingOver)));
    w.set_mirror(1, false);
    w.run_for(2_000);
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert_eq!(w.stats.preempts, 0);
    assert_eq!(w.holder[0], Some(0));
    assert_clean(&w);
}

#[test]
fn version_mismatch_blocks_takeover_and_still_proves_life() {
    let mut w = settled();
    let last = *w.sent_by(0).last().unwrap();
    w.crash(0);
    // A partner speaking protocol version 2 keeps talking: alive, but not ours to take over.
    for k in 1..=30u64 {
        let record = ForeignRecord {
            version: 2,
            pair_id: common::PAIR,
            node_id: 0,
            stamp: Stamp {
                generation: last.stamp.generation + 1,
                sequence: k,
            },
        };
        w.inject_event(
            1,
            Event::ForeignStatus {
                path: Path::Udp,
                record,
            },
        );
        w.run_for(100);
    }
    let b = blockers(&w, 1);
    assert!(b.contains(&TakeoverBlocked::VersionMismatch), "{b:?}");
    assert!(b.contains(&TakeoverBlocked::PartnerHeard), "{b:?}");
    assert_eq!(w.stats.announces, 0);
    // Silent from now on: the version mismatch alone still blocks the takeover.
    w.run_for(3_000);
    assert_eq!(w.stats.announces, 0);
    assert!(blockers(&w, 1).contains(&TakeoverBlocked::VersionMismatch));
    assert_clean(&w);
}

#[test]
fn paused_node_writes_nothing_after_takeover() {
    let mut w = settled();
    w.pause(0);
    assert!(w.run_until(3_000, |w| serving(w, 1, DiskSet::Partner)));
    w.run_for(1_000);
    let writes_before = w.writes_by[0];
    w.resume(0);
    w.run_for(1_000);
    assert_eq!(
        w.writes_by[0], writes_before,
        "the paused node wrote after resuming"
    );
    assert!(!serving(&w, 0, DiskSet::Own));
    assert_eq!(w.state(0), Some(NodeState::WaitingForGiveback));
    assert_eq!(w.holder[0], Some(1));
    assert_clean(&w);
}

#[test]
fn restarted_node_waits_for_giveback_and_seizes_nothing() {
    let mut w = settled();
    w.crash(0);
    assert!(w.run_until(3_000, |w| serving(w, 1, DiskSet::Partner)));
    w.restart(0);
    let attempts = w.stats.reserve_attempts;
    w.run_for(3_000);
    assert_eq!(w.state(0), Some(NodeState::WaitingForGiveback));
    // One attempt at start, then one per retry interval: no retry storm.
    let retries = w.stats.reserve_attempts - attempts;
    assert!(
        retries <= 1 + 3_000 / w.cfg[0].retry_ms,
        "{retries} reserve attempts"
    );
    assert_eq!(w.holder[0], Some(1));
    assert_eq!(w.holder[1], Some(1));
    assert!(!serving(&w, 0, DiskSet::Own));
    // Giveback by the operator returns the disks; the waiting node brings itself up.
    assert!(w.command(1, Command::Giveback));
    assert!(w.run_until(3_000, |w| serving(w, 0, DiskSet::Own)));
    assert_eq!(w.holder[0], Some(0));
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert!(!serving(&w, 1, DiskSet::Partner));
    w.run_for(500);
    assert!(
        blockers(&w, 1).is_empty() || !blockers(&w, 1).contains(&TakeoverBlocked::GivebackPending)
    );
    assert_clean(&w);
}

#[test]
fn auto_giveback_when_the_partner_waits() {
    let mut w = world_with(|c| c.auto_giveback = true);
    w.run_for(1_000);
    w.crash(0);
    assert!(w.run_until(3_000, |w| serving(w, 1, DiskSet::Partner)));
    w.restart(0);
    assert!(w.run_until(3_000, |w| serving(w, 0, DiskSet::Own)));
    assert_eq!(w.state(0), Some(NodeState::Normal));
    assert_eq!(w.stats.givebacks_completed, 1);
    assert_clean(&w);
}

#[test]
fn crash_looping_partner_is_not_seized_back_and_forth() {
    let mut w = world_with(|c| c.auto_giveback = true);
    w.run_for(1_000);
    for _ in 0..5 {
        w.crash(0);
        w.run_for(2_000);
        w.restart(0);
        w.run_for(1_500);
    }
    // One takeover, one auto giveback, one more takeover; then the disks stay put.
    assert!(w.stats.preempts <= 2, "{:?}", w.stats);
    assert!(w.stats.givebacks_completed <= 1, "{:?}", w.stats);
    assert_eq!(w.holder[0], Some(1));
    assert_eq!(w.state(0), Some(NodeState::WaitingForGiveback));
    assert_clean(&w);
}

#[test]
fn giveback_pending_blocks_a_new_takeover_until_the_partner_reports_normal() {
    let mut w = settled();
    w.crash(0);
    assert!(w.run_until(3_000, |w| serving(w, 1, DiskSet::Partner)));
    w.restart(0);
    w.run_for(500);
    w.set_path(Path::Udp, false);
    w.set_path(Path::Interconnect, false);
    w.disk_up[0] = false; // the partner cannot bring itself up
    assert!(w.command(1, Command::Giveback));
    w.run_for(300);
    w.crash(0);
    w.run_for(3_000);
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert!(blockers(&w, 1).contains(&TakeoverBlocked::GivebackPending));
    assert_eq!(w.stats.preempts, 1);
    assert_clean(&w);
}

#[test]
fn operator_takeover_refused_while_partner_healthy() {
    let mut w = settled();
    assert!(!w.command(1, Command::Takeover));
    assert!(
        w.refused_commands[0].contains("partner heard"),
        "{:?}",
        w.refused_commands
    );
    w.run_for(1_000);
    assert_eq!(w.stats.announces, 0);
    assert_clean(&w);
}

#[test]
fn operator_giveback_refused_when_not_in_takeover() {
    let mut w = settled();
    assert!(!w.command(1, Command::Giveback));
    assert!(w.refused_commands[0].contains("giveback refused"));
}

#[test]
fn fresh_node_does_not_take_over_a_partner_it_never_heard() {
    let mut w = World::new_partial(1, World::default_config(), [false, true]);
    w.holder[0] = Some(0); // node 0 died holding its disks
    w.run_for(3_000);
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert!(blockers(&w, 1).contains(&TakeoverBlocked::PartnerNeverHeard));
    assert_eq!(w.holder[0], Some(0));
    // The operator may take it over (mirror in sync, partner silent).
    assert!(w.command(1, Command::Takeover));
    assert!(w.run_until(2_000, |w| serving(w, 1, DiskSet::Partner)));
    assert_clean(&w);
}

#[test]
fn replayed_old_records_do_not_keep_a_dead_partner_alive() {
    let mut w = settled();
    let old: Vec<StatusRecord> = w.sent_by(0).to_vec();
    w.crash(0);
    let t0 = w.now;
    let mut k = 0;
    let ok = w.run_until(3_000, |w| serving(w, 1, DiskSet::Partner));
    assert!(!ok || w.now - t0 < 2_000);
    // Run again with replays between steps.
    let mut w2 = settled();
    w2.crash(0);
    let t0 = w2.now;
    while w2.now - t0 < 3_000 && !serving(&w2, 1, DiskSet::Partner) {
        w2.inject(1, Path::Udp, old[k % old.len()]);
        k += 1;
        w2.run_for(20);
    }
    assert!(
        serving(&w2, 1, DiskSet::Partner),
        "stale replays kept the partner alive"
    );
    assert_clean(&w2);
}

#[test]
fn records_of_another_pair_are_ignored() {
    let mut w = settled();
    let mut forged = *w.sent_by(0).last().unwrap();
    w.crash(0);
    forged.pair_id = [0xee; 16];
    let t0 = w.now;
    while w.now - t0 < 3_000 && !serving(&w, 1, DiskSet::Partner) {
        forged.stamp.sequence += 1;
        w.inject(1, Path::Udp, forged);
        w.run_for(20);
    }
    assert!(serving(&w, 1, DiskSet::Partner));
    assert!(w.node(1).unwrap().view(w.now).rejected_records > 0);
    assert_clean(&w);
}

#[test]
fn reservation_conflict_fences_the_set() {
    let mut w = settled();
    let now = w.now;
    let mut n = w.node(0).unwrap().clone();
    let actions = n.step(Event::ReservationConflict { set: DiskSet::Own }, now);
    assert!(
        actions.contains(&Action::Fence(DiskSet::Own)),
        "{actions:?}"
    );
    assert!(!n.serving(DiskSet::Own));
    assert!(!n.may_write(DiskSet::Own, now));
    // In the world the table still says node 0 holds its disks (a spurious conflict): it
    // reserves again and comes back up.
    w.inject_event(0, Event::ReservationConflict { set: DiskSet::Own });
    w.run_for(20);
    assert!(w.stats.fences >= 1);
    assert!(w.run_until(3_000, |w| serving(w, 0, DiskSet::Own)));
    assert_clean(&w);
}

#[test]
fn partner_record_holding_our_disks_fences_them() {
    let mut w = settled();
    let mut rec = *w.sent_by(1).last().unwrap();
    rec.stamp.sequence += 1_000;
    rec.flags.set(
        twinblock_pair::status::StatusFlags::HOLDS_PARTNER_DISKS,
        true,
    );
    rec.state = twinblock_pair::status::WireState::Takeover;
    w.set_path(Path::Udp, false);
    w.set_path(Path::Interconnect, false);
    w.inject(0, Path::Udp, rec);
    w.run_for(40);
    assert!(!serving(&w, 0, DiskSet::Own));
    assert_eq!(w.state(0), Some(NodeState::WaitingForGiveback));
}

#[test]
fn takeover_announces_on_every_path_before_preempting() {
    let mut w = settled();
    w.crash(0);
    assert!(w.run_until(3_000, |w| w.state(1) == Some(NodeState::TakingOver)));
    let announced_at = w.now;
    let announce = *w.sent_by(1).last().unwrap();
    assert_eq!(announce.state, twinblock_pair::status::WireState::Takeover);
    assert_eq!(
        w.stats.preempts, 0,
        "preempted together with the announcement"
    );
    assert!(w.run_until(2_000, |w| w.stats.preempts == 1));
    let waited = w.now - announced_at;
    let c = &w.cfg[1];
    assert!(
        waited >= c.heartbeat.interval_ms * u64::from(c.announce_wait_intervals),
        "waited only {waited} ms"
    );
    assert_clean(&w);
}

#[test]
fn stop_fences_everything_and_announces_stopped() {
    let mut w = settled();
    let now = w.now;
    // Drive the node directly to see the actions.
    let mut n = w.node(0).unwrap().clone();
    let actions = n.operator(Command::Stop, now).unwrap();
    assert!(actions.contains(&Action::Fence(DiskSet::Own)));
    assert!(actions.iter().any(|a| matches!(a, Action::SendStatus(r)
        if r.state == twinblock_pair::status::WireState::Stopped)));
    assert_eq!(n.state(), NodeState::Stopped);
    assert!(n.operator(Command::Takeover, now).is_err());
    w.run_for(10);
}

#[test]
fn node_restarted_while_holding_partner_disks_serves_both_again() {
    let mut w = settled();
    w.crash(0);
    assert!(w.run_until(3_000, |w| serving(w, 1, DiskSet::Partner)));
    w.crash(1);
    w.run_for(500);
    w.restart(1);
    // Node 0 is still down: node 1 brings up its own disks, then resumes the partner's without
    // preempting (it never let go of them).
    let preempts = w.stats.preempts;
    assert!(w.run_until(3_000, |w| serving(w, 1, DiskSet::Partner)));
    assert!(serving(&w, 1, DiskSet::Own));
    assert_eq!(w.state(1), Some(NodeState::Takeover));
    assert_eq!(w.stats.preempts, preempts);
    assert_eq!(w.holder, [Some(1), Some(1)]);
    assert_clean(&w);
}

#[test]
fn node_restarted_while_partner_is_normal_takes_only_its_own_disks() {
    let mut w = settled();
    w.crash(0);
    w.restart(0);
    assert!(w.run_until(2_000, |w| serving(w, 0, DiskSet::Own)));
    w.run_for(1_000);
    assert_eq!(w.state(0), Some(NodeState::Normal));
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert_eq!(w.holder, [Some(0), Some(1)]);
    assert_eq!(w.stats.announces, 0);
    assert_clean(&w);
}

#[test]
fn partner_with_a_longer_interval_is_not_declared_silent_between_its_records() {
    let mut w = World::new_partial(1, World::default_config(), [false, false]);
    // Node 0 sends every 600 ms, longer than node 1's own silence window (5 × 100 ms).
    w.cfg[0].heartbeat.interval_ms = 600;
    w.restart(0);
    w.restart(1);
    w.run_for(6_000);
    assert_eq!(w.stats.announces, 0);
    assert_eq!(w.state(1), Some(NodeState::Normal));
    assert_clean(&w);
}

#[test]
fn outgoing_mirror_out_of_sync_after_partner_death_does_not_block_takeover() {
    let mut w = settled();
    for i in 0..2 {
        w.inject_event(i, Event::OutgoingMirrorSync { in_sync: true });
    }
    w.run_for(500);
    w.crash(0);
    // The dead partner no longer acknowledges: node 1's own mirror goes out of sync. Its copy
    // of node 0's journal is still complete, so the takeover goes on.
    w.inject_event(1, Event::OutgoingMirrorSync { in_sync: false });
    assert!(w.run_until(5_000, |w| serving(w, 1, DiskSet::Partner)));
    assert_clean(&w);
}

#[test]
fn partner_reporting_its_outgoing_mirror_out_of_sync_blocks_takeover() {
    let mut w = settled();
    w.inject_event(0, Event::OutgoingMirrorSync { in_sync: false });
    w.inject_event(1, Event::OutgoingMirrorSync { in_sync: true });
    w.run_for(500);
    assert!(w.sent_by(0).last().is_some_and(|r| !r
        .flags
        .contains(twinblock_pair::status::StatusFlags::MIRROR_IN_SYNC)));
    w.crash(0);
    w.run_for(3_000);
    assert_eq!(w.holder[0], Some(0));
    assert!(blockers(&w, 1).contains(&TakeoverBlocked::MirrorOutOfSync));
    assert_clean(&w);
}
