//! The hasher of the read cache's block maps.
//!
//! Block numbers are hashed with one multiplication (Fibonacci hashing): keys are block numbers
//! chosen by clients, not secrets, and SipHash's resistance to chosen keys cost more than the
//! rest of a cache hit. Keys of one shard share their low bits (block % shards), which the
//! multiplication spreads into the high bits, folded back into the low ones.

use std::hash::Hasher;

#[derive(Default, Clone)]
pub struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        let x = (self.0 ^ n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        // The product's low bits depend only on the key's low bits; fold the well-mixed high
        // half into them (hash tables take the bucket from the low bits, the tag from the top).
        self.0 = x ^ (x >> 32);
    }
}
