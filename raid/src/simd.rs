//! CPU-feature dispatch for the parity kernels: the only `unsafe` in the crate.
//!
//! The P+Q kernel (`parity::gen_pq_strips`) and the XOR kernel (`parity::xor_of_strips`) are
//! plain Rust written so the compiler vectorises them.
//! Compiled for the baseline x86-64 target it uses SSE2 (16 bytes per instruction); this module
//! compiles the same code a second time with AVX2 enabled (32 bytes) and picks that copy at run
//! time when the CPU has AVX2.

/// P and Q of `data` into `p` and `q` (all the same length), fastest available code path.
pub(crate) fn gen_pq(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: `gen_pq_avx2` only requires the CPU to support AVX2, which was checked
            // just above; it touches memory only through the safe slices it is given.
            unsafe { gen_pq_avx2(data, p, q) };
            return;
        }
    }
    crate::parity::gen_pq_strips(data, p, q);
}

/// # Safety
/// The CPU must support AVX2 (the caller checks `is_x86_feature_detected!("avx2")`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn gen_pq_avx2(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) {
    crate::parity::gen_pq_strips(data, p, q);
}

/// `dst = srcs[0] ^ srcs[1] ^ ...` (all the same length, at least one source), fastest
/// available code path.
pub(crate) fn xor_of(dst: &mut [u8], srcs: &[&[u8]]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: `xor_of_avx2` only requires the CPU to support AVX2, which was checked
            // just above; it touches memory only through the safe slices it is given.
            unsafe { xor_of_avx2(dst, srcs) };
            return;
        }
    }
    crate::parity::xor_of_strips(dst, srcs);
}

/// # Safety
/// The CPU must support AVX2 (the caller checks `is_x86_feature_detected!("avx2")`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn xor_of_avx2(dst: &mut [u8], srcs: &[&[u8]]) {
    crate::parity::xor_of_strips(dst, srcs);
}
