//! Property tests of the status record and mailbox codecs, driven by a seeded RNG so a failure
//! names its case: every record round-trips, every single-bit flip of an encoded record or
//! mailbox block is detected, and random or mutated bytes never panic and never decode to a
//! record by accident.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use twinblock_pair::mailbox::{self, COPY_BYTES, SLOT_BYTES};
use twinblock_pair::status::{
    self, NodeId, Stamp, StatusError, StatusFlags, StatusRecord, TakeoverBlocked, WireState,
    RECORD_BYTES,
};

const CASES: u64 = 300;

fn random_record(rng: &mut StdRng) -> StatusRecord {
    let mut pair_id = [0u8; 16];
    rng.fill(&mut pair_id);
    let states = [
        WireState::Normal,
        WireState::Takeover,
        WireState::Stopped,
        WireState::Rebooting,
    ];
    StatusRecord {
        pair_id,
        node_id: NodeId::new(rng.gen_range(0..2)).unwrap(),
        state: states[rng.gen_range(0..4)],
        flags: StatusFlags::from_bits(rng.gen::<u32>() & StatusFlags::ALL.bits()).unwrap(),
        stamp: Stamp {
            generation: rng.gen_range(1..u64::MAX),
            sequence: rng.gen_range(1..u64::MAX),
        },
        partner_seen: Stamp {
            generation: rng.gen(),
            sequence: rng.gen(),
        },
        lease_ms: rng.gen(),
        interval_ms: rng.gen(),
        blockers: rng.gen::<u32>() & TakeoverBlocked::to_bits(&TakeoverBlocked::ALL),
    }
}

#[test]
fn every_record_round_trips() {
    let mut rng = StdRng::seed_from_u64(1);
    for case in 0..CASES {
        let r = random_record(&mut rng);
        assert_eq!(status::decode(&r.encode()), Ok(r), "case {case}");
        assert_eq!(
            status::decode_for(&r.encode(), &r.pair_id, r.node_id),
            Ok(r),
            "case {case}"
        );
    }
}

#[test]
fn every_single_bit_flip_of_a_record_is_detected() {
    let mut rng = StdRng::seed_from_u64(2);
    for case in 0..20 {
        let r = random_record(&mut rng);
        let good = r.encode();
        for bit in 0..RECORD_BYTES * 8 {
            let mut b = good;
            b[bit / 8] ^= 1 << (bit % 8);
            let res = status::decode(&b);
            assert!(
                res.is_err(),
                "case {case}: flipping bit {bit} still decodes: {res:?}"
            );
        }
    }
}

#[test]
fn random_bytes_never_panic_and_never_decode() {
    let mut rng = StdRng::seed_from_u64(3);
    for _ in 0..20_000 {
        let len = rng.gen_range(0..200);
        let mut b = vec![0u8; len];
        rng.fill(&mut b[..]);
        // With the right magic and length the CRC still has to match by chance (2^-32).
        if len >= 8 && rng.gen_bool(0.5) {
            b[0..4].copy_from_slice(&status::MAGIC);
            b[4..6].copy_from_slice(&1u16.to_le_bytes());
            b[6..8].copy_from_slice(&(len as u16).to_le_bytes());
        }
        assert!(status::decode(&b).is_err());
    }
}

#[test]
fn truncations_of_a_record_are_refused_as_truncated() {
    let r = random_record(&mut StdRng::seed_from_u64(4));
    let b = r.encode();
    for len in 8..RECORD_BYTES {
        assert!(
            matches!(
                status::decode(&b[..len]),
                Err(StatusError::Truncated { .. })
            ),
            "length {len}"
        );
    }
}

#[test]
fn every_single_bit_flip_of_a_mailbox_block_is_detected() {
    let mut rng = StdRng::seed_from_u64(5);
    let r = random_record(&mut rng);
    let good = mailbox::encode_copy(&r);
    let copy = mailbox::copy_for(&r);
    assert_eq!(mailbox::decode_copy(&good, r.node_id, copy), Ok(r));
    for bit in 0..COPY_BYTES * 8 {
        let mut b = good;
        b[bit / 8] ^= 1 << (bit % 8);
        assert!(
            mailbox::decode_copy(&b, r.node_id, copy).is_err(),
            "flipping bit {bit} still decodes"
        );
    }
}

#[test]
fn random_mailbox_slots_never_panic_and_never_decode() {
    let mut rng = StdRng::seed_from_u64(6);
    let r = random_record(&mut rng);
    for case in 0..300 {
        let mut slot = vec![0u8; SLOT_BYTES];
        match case % 3 {
            0 => rng.fill(&mut slot[..]),
            1 => {
                // A valid block with random bytes sprayed over it.
                slot[..COPY_BYTES].copy_from_slice(&mailbox::encode_copy(&r));
                for _ in 0..rng.gen_range(1..8) {
                    let at = rng.gen_range(0..COPY_BYTES);
                    slot[at] ^= rng.gen_range(1..=255u8);
                }
            }
            _ => {
                let len = rng.gen_range(0..SLOT_BYTES);
                slot.truncate(len);
            }
        }
        assert!(
            mailbox::decode_slot(&slot, r.node_id).is_err(),
            "case {case}"
        );
    }
}
