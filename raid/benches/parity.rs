//! P and P+Q encode throughput on one core against `memcpy` of the same bytes.
//!
//! `cargo bench -p twinblock-raid --bench parity`. Prints GB/s of data bytes consumed per second
//! and the ratio to memcpy, for both Q kernels (hand-written lanes and reed-solomon-erasure).

use std::hint::black_box;
use std::time::{Duration, Instant};
use twinblock_raid::parity::{gen_pq, gf_pow2, xor_of};
use twinblock_raid::rowplan::{self, Piece};

const DATA_CHUNKS: usize = 6;
const MEASURE_FOR: Duration = Duration::from_millis(800);

fn rate(bytes_per_iter: usize, mut f: impl FnMut()) -> f64 {
    for _ in 0..3 {
        f();
    }
    let start = Instant::now();
    let mut iters = 0u64;
    while start.elapsed() < MEASURE_FOR {
        f();
        iters += 1;
    }
    (bytes_per_iter as f64 * iters as f64) / start.elapsed().as_secs_f64() / 1e9
}

fn main() {
    for chunk_bytes in [64usize << 10, 256 << 10] {
        let data: Vec<Vec<u8>> = (0..DATA_CHUNKS)
            .map(|i| (0..chunk_bytes).map(|j| (i * 31 + j * 7) as u8).collect())
            .collect();
        let refs: Vec<&[u8]> = data.iter().map(|v| v.as_slice()).collect();
        let total = DATA_CHUNKS * chunk_bytes;
        let mut dst = vec![0u8; total];
        let mut p = vec![0u8; chunk_bytes];
        let mut q = vec![0u8; chunk_bytes];
        let memcpy = rate(total, || {
            for (i, d) in refs.iter().enumerate() {
                dst[i * chunk_bytes..(i + 1) * chunk_bytes].copy_from_slice(black_box(d));
            }
            black_box(&dst);
        });
        let p_only = rate(total, || {
            gen_pq(black_box(&refs), &mut p, None);
            black_box(&p);
        });
        let pq_lanes = rate(total, || {
            gen_pq(black_box(&refs), &mut p, Some(&mut q));
            black_box(&q);
        });
        let pq_rs = rate(total, || {
            // P by XOR as above, Q with the crate's table-driven multiply-accumulate.
            let refs = black_box(&refs);
            xor_of(&mut p, refs);
            q.fill(0);
            for (i, d) in refs.iter().enumerate() {
                reed_solomon_erasure::galois_8::mul_slice_xor(gf_pow2(i), d, &mut q);
            }
            black_box(&q);
        });
        // A full-stripe RAID 6 write as the array does it: plan the row, then compute P and Q
        // into fresh buffers (the data runs are written from the pieces, not copied).
        let unplanned = rate(total, || {
            // What the array did before the planner: P and Q of the whole span at once.
            let mut p = vec![0u8; chunk_bytes];
            let mut q = vec![0u8; chunk_bytes];
            gen_pq(black_box(&refs), &mut p, Some(&mut q));
            black_box((&p, &q));
        });
        let pieces: Vec<Piece> = (0..DATA_CHUNKS)
            .map(|i| Piece {
                data: i,
                start: 0,
                len: chunk_bytes as u64,
            })
            .collect();
        let planned = rate(total, || {
            let plan = rowplan::plan(DATA_CHUNKS, 2, chunk_bytes as u64, &pieces).unwrap();
            let mut bufs: Vec<Vec<Vec<u8>>> = (0..DATA_CHUNKS + 2)
                .map(|role| vec![vec![0u8; plan.indirect_write_bytes(role, 0)]])
                .collect();
            let mut outs: Vec<Vec<&mut [u8]>> = bufs
                .iter_mut()
                .map(|v| v.iter_mut().map(|b| &mut b[..]).collect())
                .collect();
            let reads: Vec<Vec<&[u8]>> = vec![Vec::new(); DATA_CHUNKS + 2];
            rowplan::compute_indirect(
                &plan,
                DATA_CHUNKS,
                &pieces,
                black_box(&refs),
                &reads,
                &mut outs,
            )
            .unwrap();
            black_box(&outs);
        });
        println!(
            "{DATA_CHUNKS} data chunks x {} KiB, one core:",
            chunk_bytes >> 10
        );
        println!("  memcpy             {memcpy:7.2} GB/s");
        println!(
            "  P (xor)            {p_only:7.2} GB/s  {:.2}x memcpy",
            p_only / memcpy
        );
        println!(
            "  P+Q lanes kernel   {pq_lanes:7.2} GB/s  {:.2}x memcpy",
            pq_lanes / memcpy
        );
        println!(
            "  P+Q rs-erasure     {pq_rs:7.2} GB/s  {:.2}x memcpy",
            pq_rs / memcpy
        );
        println!("  full stripe, whole {unplanned:7.2} GB/s  (P+Q of the span into fresh buffers)");
        println!(
            "  full stripe, plan  {planned:7.2} GB/s  {:.2}x the whole-span path (rowplan + compute)",
            planned / unplanned
        );
    }
}
