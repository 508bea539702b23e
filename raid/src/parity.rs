//! Parity for RAID 5 and 6, with no I/O.
//!
//! P is the XOR of the data chunks. Q is `sum(g^i * D_i)` over GF(2^8) with generator `g = 2` and
//! the polynomial x^8+x^4+x^3+x^2+1 (0x11d), as in Linux md and ISA-L, so the bytes on disk do not
//! depend on which kernel computed them.
//!
//! Q is computed by a hand-written kernel that evaluates it by Horner's rule over 4 KiB strips
//! (multiplying by 2 is a compare, an add, an and and a xor per byte, which the compiler turns
//! into SIMD; `simd` runs an AVX2 build of it when the CPU has AVX2). `benches/parity.rs` compares
//! it with the `reed-solomon-erasure` crate's table-driven `mul_slice_xor` (a dev-dependency, also
//! used by the tests as a reference): the hand-written kernel is 7-12x faster (raid/README.md).
//!
//! [`recover`] fills in up to two missing chunks of a row: any one chunk, P+data, Q+data or two data.

use thiserror::Error;

const BLOCK_BYTES: usize = 64;

/// Multiplication tables: EXP[i] = g^i (doubled to avoid a modulo), LOG[x] = log_g(x).
const fn build_tables() -> ([u8; 512], [u8; 256]) {
    let mut exp = [0u8; 512];
    let mut log = [0u8; 256];
    let mut x: u16 = 1;
    let mut i = 0;
    while i < 255 {
        exp[i] = x as u8;
        exp[i + 255] = x as u8;
        log[x as usize] = i as u8;
        x <<= 1;
        if x & 0x100 != 0 {
            x ^= 0x11d;
        }
        i += 1;
    }
    (exp, log)
}

const TABLES: ([u8; 512], [u8; 256]) = build_tables();
const EXP: [u8; 512] = TABLES.0;
const LOG: [u8; 256] = TABLES.1;

/// Product in GF(2^8).
pub fn gf_mul(a: u8, b: u8) -> u8 {
    if a == 0 || b == 0 {
        return 0;
    }
    EXP[LOG[a as usize] as usize + LOG[b as usize] as usize]
}

/// Multiplicative inverse in GF(2^8); `a` must not be 0.
pub fn gf_inv(a: u8) -> u8 {
    debug_assert!(a != 0, "0 has no inverse");
    EXP[255 - LOG[a as usize] as usize]
}

/// g^i.
pub fn gf_pow2(i: usize) -> u8 {
    EXP[i % 255]
}

/// `dst ^= src`.
pub fn xor_into(dst: &mut [u8], src: &[u8]) {
    assert_eq!(dst.len(), src.len(), "xor of unequal lengths");
    let mut d = dst.chunks_exact_mut(BLOCK_BYTES);
    let mut s = src.chunks_exact(BLOCK_BYTES);
    for (db, sb) in (&mut d).zip(&mut s) {
        for (x, y) in db.iter_mut().zip(sb) {
            *x ^= *y;
        }
    }
    for (x, y) in d.into_remainder().iter_mut().zip(s.remainder()) {
        *x ^= *y;
    }
}

/// `dst = srcs[0] ^ srcs[1] ^ ...`, strip by strip so each strip of `dst` stays in L1 while
/// every source is folded in (one pass over memory instead of one per source).
pub fn xor_of(dst: &mut [u8], srcs: &[&[u8]]) {
    assert!(!srcs.is_empty(), "xor of no sources");
    assert!(
        srcs.iter().all(|s| s.len() == dst.len()),
        "xor of unequal lengths"
    );
    crate::simd::xor_of(dst, srcs);
}

/// The portable kernel of [`xor_of`] (lengths already checked); `simd` calls it again compiled
/// for AVX2. Each strip of `dst` is written once from the first three sources together (RAID-5
/// of four members has exactly three), not copied from the first and then read back and
/// rewritten once per further source; sources past the third are folded in afterwards.
#[inline(always)]
pub(crate) fn xor_of_strips(dst: &mut [u8], srcs: &[&[u8]]) {
    let mut at = 0;
    while at < dst.len() {
        let n = STRIP_BYTES.min(dst.len() - at);
        let strip = &mut dst[at..at + n];
        match srcs {
            [a] => strip.copy_from_slice(&a[at..at + n]),
            [a, b] => {
                for ((x, y), z) in strip.iter_mut().zip(&a[at..at + n]).zip(&b[at..at + n]) {
                    *x = y ^ z;
                }
            }
            [a, b, c, rest @ ..] => {
                let three = a[at..at + n].iter().zip(&b[at..at + n]).zip(&c[at..at + n]);
                for (x, ((y, z), w)) in strip.iter_mut().zip(three) {
                    *x = y ^ z ^ w;
                }
                for s in rest {
                    xor_into(strip, &s[at..at + n]);
                }
            }
            // `xor_of` checked there is at least one source.
            [] => {}
        }
        at += n;
    }
}

/// `dst ^= c * src` over GF(2^8) using a 256-entry product table.
pub fn mul_xor_into(c: u8, src: &[u8], dst: &mut [u8]) {
    assert_eq!(dst.len(), src.len(), "multiply of unequal lengths");
    let mut table = [0u8; 256];
    for (x, t) in table.iter_mut().enumerate() {
        *t = gf_mul(c, x as u8);
    }
    for (x, y) in dst.iter_mut().zip(src) {
        *x ^= table[*y as usize];
    }
}

/// Bytes of each data chunk processed per pass; P and Q strips of this size stay in L1.
pub(crate) const STRIP_BYTES: usize = 4096;

/// P and Q of one strip `[at, at + p.len())` by Horner's rule: Q = (((D_last)·2 ^ D_last-1)·2 ...) ^ D_0.
/// Written as plain byte loops so the compiler emits SIMD (compare/add/and/xor per 16 or 32 bytes).
#[inline(always)]
fn pq_strip(data: &[&[u8]], at: usize, p: &mut [u8], q: &mut [u8]) {
    let len = p.len();
    let last = data.len() - 1;
    p.copy_from_slice(&data[last][at..at + len]);
    q.copy_from_slice(&data[last][at..at + len]);
    for d in data[..last].iter().rev() {
        let d = &d[at..at + len];
        for ((pb, qb), db) in p.iter_mut().zip(q.iter_mut()).zip(d) {
            let high = ((*qb as i8) >> 7) as u8;
            *qb = (*qb << 1) ^ (high & 0x1d) ^ *db;
            *pb ^= *db;
        }
    }
}

/// The portable strip kernel over whole buffers; `simd` calls it again compiled for AVX2.
#[inline(always)]
pub(crate) fn gen_pq_strips(data: &[&[u8]], p: &mut [u8], q: &mut [u8]) {
    let len = p.len();
    let mut at = 0;
    while at < len {
        let n = STRIP_BYTES.min(len - at);
        pq_strip(data, at, &mut p[at..at + n], &mut q[at..at + n]);
        at += n;
    }
}

/// Computes P (and Q when given) of `data`. All slices have one length; `data` is not empty.
pub fn gen_pq(data: &[&[u8]], p: &mut [u8], q: Option<&mut [u8]>) {
    assert!(!data.is_empty(), "parity of no data chunks");
    assert!(
        data.iter().all(|d| d.len() == p.len()),
        "data chunks of unequal length"
    );
    if let Some(q) = q.as_deref() {
        assert_eq!(q.len(), p.len(), "Q of another length than P");
    }
    match q {
        Some(q) => crate::simd::gen_pq(data, p, q),
        None => xor_of(p, data),
    }
}

/// A row cannot be recovered.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{missing} chunks of a row are missing, parity can rebuild at most {parity}")]
pub struct TooManyMissing {
    pub missing: usize,
    pub parity: usize,
}

/// One row of a parity stripe: data chunks, P, and (RAID 6) Q; `None` marks a missing chunk.
#[derive(Debug, Clone)]
pub struct RowBufs {
    pub data: Vec<Option<Vec<u8>>>,
    pub p: Option<Vec<u8>>,
    pub q: Option<Vec<u8>>,
    /// Whether the row has a Q chunk at all (RAID 6).
    pub has_q: bool,
}

/// Fills every missing chunk of `row` (data, P and Q), or says why it cannot.
pub fn recover(row: &mut RowBufs) -> Result<(), TooManyMissing> {
    let parity = if row.has_q { 2 } else { 1 };
    let missing_data: Vec<usize> = row
        .data
        .iter()
        .enumerate()
        .filter(|(_, d)| d.is_none())
        .map(|(i, _)| i)
        .collect();
    let missing = missing_data.len()
        + usize::from(row.p.is_none())
        + usize::from(row.has_q && row.q.is_none());
    if missing > parity {
        return Err(TooManyMissing { missing, parity });
    }
    let len = row
        .data
        .iter()
        .flatten()
        .chain(row.p.iter())
        .chain(row.q.iter())
        .map(|v| v.len())
        .next()
        .unwrap_or(0);
    match missing_data.as_slice() {
        [] => {}
        [x] if row.p.is_some() => {
            let mut v = row.p.clone().unwrap_or_default();
            for d in row.data.iter().flatten() {
                xor_into(&mut v, d);
            }
            row.data[*x] = Some(v);
        }
        [x] => {
            // P is missing too: D_x = (Q ^ Q_without_x) / g^x.
            let mut v = row.q.clone().unwrap_or_default();
            for (i, d) in row.data.iter().enumerate() {
                if let Some(d) = d {
                    mul_xor_into(gf_pow2(i), d, &mut v);
                }
            }
            let mut out = vec![0u8; len];
            mul_xor_into(gf_inv(gf_pow2(*x)), &v, &mut out);
            row.data[*x] = Some(out);
        }
        [x, y] => {
            // A = P ^ P_xy = Dx ^ Dy; B = Q ^ Q_xy = g^x Dx ^ g^y Dy.
            let (x, y) = (*x, *y);
            let mut a = row.p.clone().unwrap_or_default();
            let mut b = row.q.clone().unwrap_or_default();
            for (i, d) in row.data.iter().enumerate() {
                if let Some(d) = d {
                    xor_into(&mut a, d);
                    mul_xor_into(gf_pow2(i), d, &mut b);
                }
            }
            // Dy = (B ^ g^x A) / (g^x ^ g^y); Dx = A ^ Dy.
            let gx = gf_pow2(x);
            let denom_inv = gf_inv(gx ^ gf_pow2(y));
            mul_xor_into(gx, &a, &mut b);
            let mut dy = vec![0u8; len];
            mul_xor_into(denom_inv, &b, &mut dy);
            xor_into(&mut a, &dy);
            row.data[x] = Some(a);
            row.data[y] = Some(dy);
        }
        _ => unreachable!("more than two data chunks missing passed the count check"),
    }
    if row.p.is_none() || (row.has_q && row.q.is_none()) {
        let refs: Vec<&[u8]> = row.data.iter().flatten().map(|v| v.as_slice()).collect();
        let mut p = vec![0u8; len];
        let mut q = vec![0u8; len];
        gen_pq(&refs, &mut p, if row.has_q { Some(&mut q) } else { None });
        row.p.get_or_insert(p);
        if row.has_q {
            row.q.get_or_insert(q);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn random_data(seed: u64, chunks: usize, len: usize) -> Vec<Vec<u8>> {
        let mut x = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..chunks)
            .map(|_| {
                (0..len)
                    .map(|_| {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        (x >> 33) as u8
                    })
                    .collect()
            })
            .collect()
    }

    #[test]
    fn gf_tables_are_a_field() {
        for a in 1..=255u8 {
            assert_eq!(gf_mul(a, gf_inv(a)), 1, "inverse of {a}");
            assert_eq!(gf_mul(a, 2), reed_solomon_erasure::galois_8::mul(a, 2));
        }
    }

    #[test]
    fn xor_of_equals_bytewise_xor() {
        for (len, n) in [
            (1, 1),
            (4095, 2),
            (3 * 4096 + 100, 3),
            (3 * 4096 + 100, 4),
            (8192, 5),
            (65536, 3),
        ] {
            let data = random_data(len as u64 + n as u64, n, len);
            let refs: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
            let mut got = vec![0xAA; len];
            xor_of(&mut got, &refs);
            let want: Vec<u8> = (0..len)
                .map(|i| data.iter().fold(0, |acc, d| acc ^ d[i]))
                .collect();
            assert_eq!(got, want, "len {len}, {n} sources");
        }
    }

    /// The reference encode: P by plain XOR, Q by the `reed-solomon-erasure` crate's tables.
    fn gen_pq_rs(data: &[&[u8]], p: &mut [u8], q: Option<&mut [u8]>) {
        p.copy_from_slice(data[0]);
        for d in &data[1..] {
            xor_into(p, d);
        }
        if let Some(q) = q {
            q.fill(0);
            for (i, d) in data.iter().enumerate() {
                reed_solomon_erasure::galois_8::mul_slice_xor(gf_pow2(i), d, q);
            }
        }
    }

    #[test]
    fn both_kernels_write_identical_q() {
        for len in [64, 4096, 4096 + 17, 5] {
            let data = random_data(len as u64, 6, len);
            let refs: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
            let (mut p1, mut q1, mut p2, mut q2) =
                (vec![0; len], vec![0; len], vec![0; len], vec![0; len]);
            gen_pq(&refs, &mut p1, Some(&mut q1));
            gen_pq_rs(&refs, &mut p2, Some(&mut q2));
            assert_eq!(p1, p2);
            assert_eq!(q1, q2, "Q differs at len {len}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        #[test]
        fn recover_restores_any_two_missing_chunks(
            seed in any::<u64>(), d in 2usize..8, a in 0usize..10, b in 0usize..10, raid6 in any::<bool>()
        ) {
            let len = 128 + 3;
            let data = random_data(seed, d, len);
            let refs: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
            let mut p = vec![0; len];
            let mut q = vec![0; len];
            gen_pq(&refs, &mut p, if raid6 { Some(&mut q) } else { None });
            let total = d + if raid6 { 2 } else { 1 };
            let mut row = RowBufs {
                data: data.iter().cloned().map(Some).collect(),
                p: Some(p.clone()),
                q: raid6.then(|| q.clone()),
                has_q: raid6,
            };
            let drop = |idx: usize, row: &mut RowBufs| {
                if idx < d { row.data[idx] = None } else if idx == d { row.p = None } else { row.q = None }
            };
            drop(a % total, &mut row);
            if raid6 { drop(b % total, &mut row); }
            recover(&mut row).unwrap();
            for (i, want) in data.iter().enumerate() {
                prop_assert_eq!(row.data[i].as_ref(), Some(want));
            }
            prop_assert_eq!(row.p.as_ref(), Some(&p));
            if raid6 { prop_assert_eq!(row.q.as_ref(), Some(&q)); }
        }
    }

    #[test]
    fn recover_refuses_three_missing() {
        let mut row = RowBufs {
            data: vec![None, None, Some(vec![1])],
            p: None,
            q: Some(vec![0]),
            has_q: true,
        };
        assert_eq!(
            recover(&mut row),
            Err(TooManyMissing {
                missing: 3,
                parity: 2
            })
        );
    }
}
