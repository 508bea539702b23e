//! Tests of the pure transitions and the byte format: unit tests for each rule, property tests
//! over random operation sequences for the invariants.

use super::format::{self, decode, encode, FormatError, Snapshot};
use super::*;
use proptest::prelude::*;

const WE_RO: ReservationType = ReservationType::WriteExclusiveRegistrantsOnly;
const A: Key = 0xA;
const B: Key = 0xB;
const C: Key = 0xC;

fn registered(keys: &[Key]) -> ReservationState {
    keys.iter().fold(ReservationState::empty(), |s, &k| {
        s.register(k).expect("register in a test setup")
    })
}

fn held_by(keys: &[Key], holder: Key) -> ReservationState {
    registered(keys)
        .reserve(holder, WE_RO)
        .expect("reserve in a test setup")
}

#[test]
fn register_is_idempotent() {
    let once = registered(&[A]);
    assert_eq!(once.register(A).unwrap(), once);
    assert_eq!(once.keys(), &[A]);
}

#[test]
fn register_keeps_keys_sorted() {
    assert_eq!(registered(&[C, A, B]).keys(), &[A, B, C]);
}

#[test]
fn zero_key_refused_everywhere() {
    let s = registered(&[A]);
    assert_eq!(s.register(0), Err(ReservationError::ZeroKey));
    assert_eq!(s.reserve(0, WE_RO), Err(ReservationError::ZeroKey));
    assert_eq!(s.preempt(A, 0, WE_RO), Err(ReservationError::ZeroKey));
}

#[test]
fn register_beyond_max_keys_refused() {
    let keys: Vec<Key> = (1..=MAX_KEYS as Key).collect();
    let full = registered(&keys);
    assert_eq!(
        full.register(MAX_KEYS as Key + 1),
        Err(ReservationError::TooManyKeys { max: MAX_KEYS })
    );
    // Re-registering a present key is still fine at the limit.
    assert_eq!(full.register(1).unwrap(), full);
}

#[test]
fn unregister_unknown_key_refused() {
    assert_eq!(
        registered(&[A]).unregister(B),
        Err(ReservationError::NotRegistered { key: B })
    );
}

#[test]
fn unregister_of_holder_drops_reservation() {
    let s = held_by(&[A, B], A).unregister(A).unwrap();
    assert_eq!(s.reservation(), None);
    assert_eq!(s.keys(), &[B]);
}

#[test]
fn reserve_requires_registration() {
    assert_eq!(
        registered(&[A]).reserve(B, WE_RO),
        Err(ReservationError::NotRegistered { key: B })
    );
}

#[test]
fn reserve_by_other_key_conflicts_naming_holder() {
    assert_eq!(
        held_by(&[A, B], A).reserve(B, WE_RO),
        Err(ReservationError::ReservationConflict { holder: A })
    );
}

#[test]
fn reserve_again_by_holder_changes_nothing() {
    let s = held_by(&[A], A);
    assert_eq!(s.reserve(A, WE_RO).unwrap(), s);
}

#[test]
fn release_by_non_holder_conflicts() {
    assert_eq!(
        held_by(&[A, B], A).release(B),
        Err(ReservationError::ReservationConflict { holder: A })
    );
}

#[test]
fn release_by_holder_keeps_registrations() {
    let s = held_by(&[A, B], A).release(A).unwrap();
    assert_eq!(s.reservation(), None);
    assert_eq!(s.keys(), &[A, B]);
}

#[test]
fn release_without_reservation_changes_nothing() {
    let s = registered(&[A]);
    assert_eq!(s.release(A).unwrap(), s);
}

#[test]
fn clear_refused_while_held_unless_allowed() {
    let s = held_by(&[A, B], A);
    assert_eq!(
        s.clear(None, false),
        Err(ReservationError::ClearWouldDropHolder { holder: A })
    );
    assert_eq!(s.clear(None, true).unwrap(), ReservationState::empty());
    assert_eq!(
        registered(&[A]).clear(None, false).unwrap(),
        ReservationState::empty()
    );
}

#[test]
fn clear_with_key_requires_registration() {
    assert_eq!(
        registered(&[A]).clear(Some(B), true),
        Err(ReservationError::NotRegistered { key: B })
    );
}

#[test]
fn preempt_by_unregistered_key_refused() {
    assert_eq!(
        held_by(&[A], A).preempt(B, A, WE_RO),
        Err(ReservationError::NotRegistered { key: B })
    );
}

#[test]
fn preempt_removes_victim_and_takes_reservation() {
    let s = held_by(&[A, B], A).preempt(B, A, WE_RO).unwrap();
    assert_eq!(s.keys(), &[B]);
    assert_eq!(s.holder(), Some(B));
}

#[test]
fn preempt_without_reservation_takes_it() {
    let s = registered(&[A, B]).preempt(B, A, WE_RO).unwrap();
    assert_eq!(s.keys(), &[B]);
    assert_eq!(s.holder(), Some(B));
}

#[test]
fn preempt_of_unregistered_victim_refused() {
    assert_eq!(
        registered(&[B]).preempt(B, A, WE_RO),
        Err(ReservationError::VictimNotRegistered { victim: A })
    );
}

#[test]
fn preempt_of_self_refused() {
    assert_eq!(
        held_by(&[A], A).preempt(A, A, WE_RO),
        Err(ReservationError::PreemptSelf { key: A })
    );
}

#[test]
fn preempt_of_third_party_holder_refused() {
    assert_eq!(
        held_by(&[A, B, C], C).preempt(B, A, WE_RO),
        Err(ReservationError::ReservationConflict { holder: C })
    );
}

#[test]
fn node_keys_are_nonzero_distinct_and_stable() {
    let pair = [7u8; 16];
    let other = [8u8; 16];
    assert_ne!(node_key(&pair, 0), 0);
    assert_ne!(node_key(&pair, 0), node_key(&pair, 1));
    assert_ne!(node_key(&pair, 0), node_key(&other, 0));
    assert_eq!(node_key(&pair, 1), node_key(&pair, 1));
    assert_eq!(node_key(&pair, 1) & 0xFFFF_FFFF, 0x5442_0001);
}

fn sample_snapshot() -> Snapshot {
    Snapshot {
        generation: 42,
        state: held_by(&[A, B], B),
    }
}

/// Re-seal bytes whose fields a test changed on purpose, so the CRC is right and the decoder
/// has to find the field-level problem.
fn reseal(mut bytes: Vec<u8>) -> Vec<u8> {
    let body = bytes.len() - format::CRC_BYTES;
    let crc = crc32c::crc32c(&bytes[..body]);
    bytes[body..].copy_from_slice(&crc.to_le_bytes());
    bytes
}

#[test]
fn format_round_trips() {
    let s = sample_snapshot();
    let bytes = encode(&s);
    assert_eq!(bytes.len(), format::encoded_len(2));
    assert_eq!(decode(&bytes).unwrap(), s);
}

#[test]
fn format_layout_matches_the_documented_offsets() {
    let bytes = encode(&sample_snapshot());
    assert_eq!(&bytes[0..8], b"TWBRESV\x01");
    assert_eq!(&bytes[8..10], &1u16.to_le_bytes());
    assert_eq!(bytes[10], 5);
    assert_eq!(bytes[11], 0);
    assert_eq!(&bytes[12..16], &2u32.to_le_bytes());
    assert_eq!(&bytes[16..24], &42u64.to_le_bytes());
    assert_eq!(&bytes[24..32], &B.to_le_bytes());
    assert_eq!(&bytes[32..40], &A.to_le_bytes());
    assert_eq!(&bytes[40..48], &B.to_le_bytes());
    assert_eq!(&bytes[48..52], &crc32c::crc32c(&bytes[..48]).to_le_bytes());
}

#[test]
fn format_refuses_every_single_bit_flip() {
    let bytes = encode(&sample_snapshot());
    for i in 0..bytes.len() {
        for bit in 0..8 {
            let mut b = bytes.clone();
            b[i] ^= 1 << bit;
            assert!(
                decode(&b).is_err(),
                "flip of bit {bit} in byte {i} accepted"
            );
        }
    }
}

#[test]
fn format_refuses_every_truncation() {
    let bytes = encode(&sample_snapshot());
    for len in 0..bytes.len() {
        assert!(
            decode(&bytes[..len]).is_err(),
            "truncation to {len} accepted"
        );
    }
}

#[test]
fn format_refuses_trailing_bytes() {
    let mut bytes = encode(&sample_snapshot());
    bytes.push(0);
    assert!(matches!(
        decode(&bytes),
        Err(FormatError::TrailingBytes { .. })
    ));
}

#[test]
fn format_refuses_foreign_file() {
    assert_eq!(
        decode(b"this is not a reservation file at all, just text"),
        Err(FormatError::BadMagic)
    );
}

#[test]
fn format_refuses_unknown_version() {
    let mut b = encode(&sample_snapshot());
    b[8] = 2;
    assert_eq!(
        decode(&reseal(b)),
        Err(FormatError::UnsupportedVersion { found: 2 })
    );
}

#[test]
fn format_refuses_unknown_type_code() {
    let mut b = encode(&sample_snapshot());
    b[10] = 3;
    assert_eq!(
        decode(&reseal(b)),
        Err(FormatError::UnknownType { code: 3 })
    );
}

#[test]
fn format_refuses_unregistered_holder() {
    let mut b = encode(&sample_snapshot());
    b[24..32].copy_from_slice(&C.to_le_bytes());
    assert!(matches!(
        decode(&reseal(b)),
        Err(FormatError::Inconsistent(_))
    ));
}

#[test]
fn format_refuses_huge_key_count() {
    let mut b = encode(&sample_snapshot());
    b[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(decode(&b), Err(FormatError::TooManyKeys { .. })));
}

// ---- property tests ----

/// Keys from a small pool (so operations collide often), sometimes the invalid key 0.
fn key() -> impl Strategy<Value = Key> {
    prop_oneof![1 => Just(0u64), 10 => 1u64..=4]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        key().prop_map(|key| Op::Register { key }),
        key().prop_map(|key| Op::Unregister { key }),
        key().prop_map(|key| Op::Reserve { key, kind: WE_RO }),
        key().prop_map(|key| Op::Release { key }),
        (prop::option::of(key()), any::<bool>())
            .prop_map(|(key, allow_held)| Op::Clear { key, allow_held }),
        (key(), key()).prop_map(|(key, victim)| Op::Preempt {
            key,
            victim,
            kind: WE_RO
        }),
    ]
}

/// Whether `op` is one of the ways the holder `h` may lose the reservation.
fn may_drop_holder(op: &Op, h: Key) -> bool {
    match *op {
        Op::Release { key } | Op::Unregister { key } => key == h,
        Op::Clear { .. } => true,
        Op::Preempt { victim, .. } => victim == h,
        Op::Register { .. } | Op::Reserve { .. } => false,
    }
}

proptest! {
    #[test]
    fn invariants_hold_after_any_sequence(ops in prop::collection::vec(op(), 0..60)) {
        let mut s = ReservationState::empty();
        for op in &ops {
            if let Ok(next) = s.apply(op) {
                s = next;
            }
            prop_assert!(s.is_consistent(), "after {:?}: {:?}", op, s);
        }
    }

    #[test]
    fn holder_changes_only_by_release_unregister_clear_or_preempt(
        ops in prop::collection::vec(op(), 0..60)
    ) {
        let mut s = ReservationState::empty();
        for op in &ops {
            let Ok(next) = s.apply(op) else { continue };
            if let Some(h) = s.holder() {
                if next.holder() != Some(h) {
                    prop_assert!(may_drop_holder(op, h), "{:?} took the disk from {:#x}", op, h);
                }
            }
            if let (None, Some(n)) = (s.holder(), next.holder()) {
                prop_assert!(
                    matches!(*op, Op::Reserve { key, .. } | Op::Preempt { key, .. } if key == n),
                    "{:?} made {:#x} holder", op, n
                );
            }
            s = next;
        }
    }

    #[test]
    fn register_twice_equals_register_once(
        ops in prop::collection::vec(op(), 0..40), k in 1u64..=4
    ) {
        let s = ops.iter().fold(ReservationState::empty(), |s, op| s.apply(op).unwrap_or(s));
        let once = s.register(k).unwrap();
        prop_assert_eq!(once.register(k).unwrap(), once);
    }

    #[test]
    fn successful_preempt_leaves_caller_holding_and_victim_gone(
        ops in prop::collection::vec(op(), 0..40), k in 1u64..=4, v in 1u64..=4
    ) {
        let s = ops.iter().fold(ReservationState::empty(), |s, op| s.apply(op).unwrap_or(s));
        match s.preempt(k, v, WE_RO) {
            Ok(next) => {
                prop_assert!(next.holds(k));
                prop_assert!(!next.is_registered(v));
                prop_assert!(s.is_registered(k) && s.is_registered(v));
            }
            Err(ReservationError::NotRegistered { key }) => prop_assert!(!s.is_registered(key)),
            Err(ReservationError::VictimNotRegistered { victim }) => {
                prop_assert!(!s.is_registered(victim))
            }
            Err(ReservationError::ReservationConflict { holder }) => {
                prop_assert!(holder != k && holder != v && s.holds(holder))
            }
            Err(ReservationError::PreemptSelf { .. }) => prop_assert_eq!(k, v),
            Err(e) => prop_assert!(false, "unexpected refusal {:?}", e),
        }
    }

    #[test]
    fn non_holder_can_never_reserve_a_held_disk(
        ops in prop::collection::vec(op(), 0..40), k in 1u64..=4
    ) {
        let s = ops.iter().fold(ReservationState::empty(), |s, op| s.apply(op).unwrap_or(s));
        if let Some(h) = s.holder() {
            if h != k {
                let refused = matches!(
                    s.reserve(k, WE_RO),
                    Err(ReservationError::ReservationConflict { holder }) if holder == h
                ) || !s.is_registered(k);
                prop_assert!(refused);
            }
        }
    }

    #[test]
    fn encoding_round_trips_any_reachable_state(
        ops in prop::collection::vec(op(), 0..40), generation in any::<u64>()
    ) {
        let state = ops.iter().fold(ReservationState::empty(), |s, op| s.apply(op).unwrap_or(s));
        let snap = Snapshot { generation, state };
        prop_assert_eq!(decode(&encode(&snap)).unwrap(), snap);
    }
}
