//! Helpers shared by the kiln-cpu benchmark examples: deterministic test
//! data and a median timer.

use std::hint::black_box;
use std::time::Instant;

/// `n` deterministic pseudo-random values in [-1, 1) (xorshift).
pub fn data(n: usize, seed: u32) -> Vec<f32> {
    let mut s = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s as f32 / u32::MAX as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Median seconds of `reps` runs after `reps / 4 + 2` warm-up runs.
pub fn time<R>(reps: usize, mut f: impl FnMut() -> R) -> f64 {
    for _ in 0..reps / 4 + 2 {
        black_box(f());
    }
    let mut ts: Vec<f64> = (0..reps)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            t.elapsed().as_secs_f64()
        })
        .collect();
    ts.sort_by(|a, b| a.total_cmp(b));
    ts[ts.len() / 2]
}
