//! One shared, page-aligned buffer of zeroes.
//!
//! Devices that implement `WRITE_ZEROES` (or a TRIM that falls back to writing zeroes) by
//! writing real zeroes slice this buffer instead of allocating one per request, so a zeroing
//! request costs no memory beyond its bookkeeping and is charged that way against a
//! connection's in-flight budget. The buffer is a zero-initialised static: it lives in the
//! program's zero page mapping and is never written. It is aligned to 4 KiB so `O_DIRECT`
//! writes can use it as it is.

use bytes::Bytes;

/// Size of the shared zero buffer; larger ranges are written in pieces of this size.
pub const ZERO_BUFFER_BYTES: usize = 1 << 20;

#[repr(C, align(4096))]
struct Aligned([u8; ZERO_BUFFER_BYTES]);

static ZEROES: Aligned = Aligned([0; ZERO_BUFFER_BYTES]);

/// `min(len, ZERO_BUFFER_BYTES)` zero bytes, borrowed from the shared buffer (no allocation).
pub fn zeroes(len: usize) -> Bytes {
    Bytes::from_static(&ZEROES.0[..len.min(ZERO_BUFFER_BYTES)])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_zeroes_are_aligned_zero_and_never_allocated() {
        let a = zeroes(4096);
        let b = zeroes(ZERO_BUFFER_BYTES * 2);
        assert_eq!(a.len(), 4096);
        assert_eq!(b.len(), ZERO_BUFFER_BYTES);
        assert_eq!(a.as_ptr(), b.as_ptr(), "every caller shares one buffer");
        assert_eq!(a.as_ptr() as usize % 4096, 0);
        assert!(b.iter().all(|&x| x == 0));
    }
}
