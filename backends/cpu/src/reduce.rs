//! Reductions over the last axis of a contiguous `[outer, k]` buffer. The
//! frontend permutes the reduced dimensions to the end first, so every
//! reduction (sum, mean, var, max/argmax, softmax...) is a row kernel here.

use crate::element::Float;
use rayon::prelude::*;

fn rows<T: Float, U: Send>(x: &[T], k: usize, f: impl Fn(&[T]) -> U + Sync + Send) -> Vec<U> {
    debug_assert!(k > 0, "callers handle empty rows");
    if x.len() >= crate::PAR_THRESHOLD {
        x.par_chunks(k).map(f).collect()
    } else {
        x.chunks(k).map(f).collect()
    }
}

/// Sum of each row, accumulated in f64 for f32 inputs' accuracy (pairwise
/// for long rows would be faster; accuracy first).
pub fn sum_rows<T: Float>(x: &[T], outer: usize, k: usize) -> Vec<T> {
    if k == 0 {
        return vec![T::zero(); outer];
    }
    rows(x, k, |r| T::from_f64(lanes_sum_f64(r)))
}

pub fn prod_rows<T: Float>(x: &[T], outer: usize, k: usize) -> Vec<T> {
    if k == 0 {
        return vec![T::one(); outer];
    }
    rows(x, k, |r| r.iter().fold(T::one(), |a, &b| a * b))
}

/// Variance of each row with `correction` (1 = unbiased).
pub fn var_rows<T: Float>(x: &[T], outer: usize, k: usize, correction: usize) -> Vec<T> {
    if k == 0 {
        return vec![T::nan(); outer];
    }
    rows(x, k, |r| {
        let mean = lanes_sum_f64(r) / k as f64;
        let ss: f64 = lanes_sq_dev_f64(r, mean);
        let denom = k as f64 - correction as f64;
        T::from_f64(if denom <= 0.0 { f64::NAN } else { ss / denom })
    })
}

/// Max (or min) of each row and the index of its first occurrence; NaN wins,
/// as in PyTorch.
pub fn argmax_rows<T: Float>(x: &[T], k: usize, min: bool) -> Vec<(T, i64)> {
    rows(x, k, |r| {
        let mut best = r[0];
        let mut bi = 0usize;
        for (i, &v) in r.iter().enumerate().skip(1) {
            if best.is_nan() {
                break;
            }
            let better = if min { v < best } else { v > best };
            if better || v.is_nan() {
                best = v;
                bi = i;
            }
        }
        (best, bi as i64)
    })
}

/// Max of a slice with 8 independent lanes (so it vectorizes); NaN is
/// ignored here and propagates through the exp that follows.
#[inline(always)]
fn lanes_max<T: Float>(r: &[T]) -> T {
    let mut acc = [T::neg_infinity(); 8];
    let mut chunks = r.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            if v > *a {
                *a = v;
            }
        }
    }
    let mx = |a: T, b: T| if b > a { b } else { a };
    let mut m = mx(
        mx(mx(acc[0], acc[4]), mx(acc[2], acc[6])),
        mx(mx(acc[1], acc[5]), mx(acc[3], acc[7])),
    );
    for &v in chunks.remainder() {
        m = mx(m, v);
    }
    m
}

/// Sum in f64 of a slice with 8 independent accumulators, so the loop
/// vectorizes (a single f64 accumulator is a chain of dependent adds: 256
/// elements took ~1000 cycles).
#[inline(always)]
pub(crate) fn lanes_sum_f64<T: Float>(r: &[T]) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = r.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v.as_f64();
        }
    }
    let mut s = 0.0;
    for &v in chunks.remainder() {
        s += v.as_f64();
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + s
}

/// Sum in f64 of `(v - mu)^2` over a slice, 8 accumulators.
#[inline(always)]
pub(crate) fn lanes_sq_dev_f64<T: Float>(r: &[T], mu: f64) -> f64 {
    let mut acc = [0.0f64; 8];
    let mut chunks = r.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            let d = v.as_f64() - mu;
            *a += d * d;
        }
    }
    let mut s = 0.0;
    for &v in chunks.remainder() {
        let d = v.as_f64() - mu;
        s += d * d;
    }
    ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7])) + s
}

/// Sum of a slice with 8 independent accumulators (vectorizes; pairwise-like
/// accuracy).
#[inline(always)]
fn lanes_sum<T: Float>(r: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = r.chunks_exact(8);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a += v;
        }
    }
    // A tree over the lanes (a chain of 8 dependent adds cost about a
    // quarter of a 128-wide softmax row).
    let mut s = ((acc[0] + acc[4]) + (acc[2] + acc[6])) + ((acc[1] + acc[5]) + (acc[3] + acc[7]));
    for &v in chunks.remainder() {
        s += v;
    }
    s
}

/// Softmax (or log-softmax) of each row.
pub fn softmax_rows<T: Float>(x: &[T], k: usize, log: bool) -> Vec<T> {
    // Every element is written by `softmax_rows_into`.
    let mut out = crate::buffers::alloc_uninit::<T>(x.len());
    softmax_rows_into(x, k, log, &mut out);
    out
}

/// Softmax (or log-softmax) of each contiguous row of `k` elements of `x`
/// into `out` (same length; every element overwritten, nothing allocated).
pub fn softmax_rows_into<T: Float>(x: &[T], k: usize, log: bool, out: &mut [T]) {
    assert_eq!(out.len(), x.len(), "softmax: output length");
    if k == 0 {
        return;
    }
    assert!(
        x.len().is_multiple_of(k),
        "softmax: length not a multiple of the row length"
    );
    crate::par::chunks_mut(out, crate::PAR_THRESHOLD / 2, k, |s, o| {
        let x = &x[s..s + o.len()];
        crate::simd::dispatch!(softmax_rows_body::<T>(x, k, log, o))
    });
}

/// The rows of softmax: max, exp of the differences, sum, scale (or the
/// log form). Inlined into `simd::dispatch!`'s per-ISA copies.
#[inline(always)]
fn softmax_rows_body<T: Float>(x: &[T], k: usize, log: bool, out: &mut [T]) {
    for (o, r) in out.chunks_mut(k).zip(x.chunks(k)) {
        let m = lanes_max(r);
        for (o, &v) in o.iter_mut().zip(r) {
            *o = v - m;
        }
        T::exp_inplace(o);
        let s = lanes_sum(o);
        if log {
            let ls = s.ln();
            for (o, &v) in o.iter_mut().zip(r) {
                *o = v - m - ls;
            }
        } else {
            let inv = T::one() / s;
            for o in o.iter_mut() {
                *o *= inv;
            }
        }
    }
}

/// Backward of `softmax_rows(x, k, log)` given its output `y` and the
/// output gradient `g` (both contiguous `[outer, k]`): for softmax
/// `y * (g - sum(g * y))`, for log-softmax `g - exp(y) * sum(g)`, per row.
/// Row sums are accumulated in f64.
pub fn softmax_backward_rows<T: Float>(y: &[T], g: &[T], k: usize, log: bool) -> Vec<T> {
    assert_eq!(y.len(), g.len(), "softmax_backward_rows: lengths differ");
    let mut out = vec![T::zero(); y.len()];
    if k == 0 {
        return out;
    }
    let body = |o: &mut [T], y: &[T], g: &[T]| {
        if log {
            let s = T::from_f64(g.iter().map(|v| v.as_f64()).sum::<f64>());
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = g - y.exp() * s;
            }
        } else {
            let s = T::from_f64(
                y.iter()
                    .zip(g)
                    .map(|(&y, &g)| y.as_f64() * g.as_f64())
                    .sum::<f64>(),
            );
            for ((o, &y), &g) in o.iter_mut().zip(y).zip(g) {
                *o = y * (g - s);
            }
        }
    };
    if y.len() >= crate::PAR_THRESHOLD {
        out.par_chunks_mut(k)
            .zip(y.par_chunks(k).zip(g.par_chunks(k)))
            .for_each(|(o, (y, g))| body(o, y, g));
    } else {
        for ((o, y), g) in out.chunks_mut(k).zip(y.chunks(k)).zip(g.chunks(k)) {
            body(o, y, g);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_reductions() {
        let x = [1.0f64, 2.0, 3.0, 4.0, 0.0, -1.0];
        assert_eq!(sum_rows(&x, 2, 3), vec![6.0, 3.0]);
        assert_eq!(argmax_rows(&x, 3, false), vec![(3.0, 2), (4.0, 0)]);
        assert_eq!(argmax_rows(&x, 3, true), vec![(1.0, 0), (-1.0, 2)]);
        assert_eq!(var_rows(&x, 2, 3, 1), vec![1.0, 7.0]);
        assert_eq!(var_rows(&x, 2, 3, 0), vec![2.0 / 3.0, 14.0 / 3.0]);
        let s = softmax_rows(&[0.0f64, 0.0], 2, false);
        assert_eq!(s, vec![0.5, 0.5]);
    }

    #[test]
    fn softmax_backward_matches_finite_differences() {
        use crate::matmul::tests::{assert_close, rand_vec};
        for &(outer, k) in &[(3usize, 5usize), (1, 1), (40, 1000)] {
            let x: Vec<f64> = rand_vec(outer * k, 31);
            let g: Vec<f64> = rand_vec(outer * k, 32);
            for log in [false, true] {
                let y = softmax_rows(&x, k, log);
                let gi = softmax_backward_rows(&y, &g, k, log);
                // Analytic reference per row: J^T g with J the softmax Jacobian.
                let mut want = vec![0.0; x.len()];
                for r in 0..outer {
                    let p = softmax_rows(&x[r * k..(r + 1) * k], k, false);
                    let gr = &g[r * k..(r + 1) * k];
                    for i in 0..k {
                        want[r * k + i] = if log {
                            // d/dx_i sum_j g_j (x_j - lse) = g_i - p_i sum g
                            gr[i] - p[i] * gr.iter().sum::<f64>()
                        } else {
                            (0..k)
                                .map(|j| gr[j] * p[j] * (if i == j { 1.0 } else { 0.0 } - p[i]))
                                .sum()
                        };
                    }
                }
                assert_close(&gi, &want, 1e-12, "softmax backward f64");
                let y32: Vec<f32> = y.iter().map(|&v| v as f32).collect();
                let g32: Vec<f32> = g.iter().map(|&v| v as f32).collect();
                assert_close(
                    &softmax_backward_rows(&y32, &g32, k, log),
                    &want,
                    1e-5,
                    "softmax backward f32",
                );
            }
        }
    }
}

/// Columns `j0..j0 + o.len()` (at most 256) of `sum_cols`, inlined into
/// the widest SIMD copy (`simd::dispatch!`).
#[inline(always)]
fn sum_cols_block<T: Float>(x: &[T], r: usize, c: usize, j0: usize, o: &mut [T]) {
    let w = o.len();
    let mut acc = [0.0f64; 256];
    for i in 0..r {
        let row = &x[i * c + j0..i * c + j0 + w];
        for (a, v) in acc.iter_mut().zip(row) {
            *a += v.as_f64();
        }
    }
    for (o, a) in o.iter_mut().zip(&acc) {
        *o = T::from_f64(*a);
    }
}

/// Sum over the rows of a contiguous `[r, c]` buffer (a reduction over
/// leading dims): `out[j] = sum_i x[i*c + j]`, accumulated in f64 per block
/// of columns, the blocks spread over the threads (at least one block per thread). Avoids transposing the
/// input as `sum_rows` would need.
pub fn sum_cols<T: Float>(x: &[T], r: usize, c: usize) -> Vec<T> {
    const BLOCK: usize = 256;
    let mut out = vec![T::zero(); c];
    if c == 0 {
        return out;
    }
    // Columns split into at least one block per thread (of whole
    // 16-column groups): 256 columns used to be one block on one thread
    // (simple_net's bias gradient, [4096, 256]).
    let block = c
        .div_ceil(crate::par::threads())
        .next_multiple_of(16)
        .clamp(16, BLOCK);
    let body = |j0: usize, o: &mut [T]| crate::simd::dispatch!(sum_cols_block(x, r, c, j0, o));
    if r * c >= crate::PAR_THRESHOLD && c > block {
        let blocks = c.div_ceil(block);
        crate::par::chunks_mut_in(
            &mut out,
            blocks.min(crate::par::threads()),
            block,
            |j0, o| {
                for (b, ob) in o.chunks_mut(block).enumerate() {
                    body(j0 + b * block, ob);
                }
            },
        );
    } else {
        for (b, o) in out.chunks_mut(block).enumerate() {
            body(b * block, o);
        }
    }
    out
}

#[cfg(test)]
mod col_tests {
    use super::*;

    #[test]
    fn sum_cols_matches_naive() {
        let (r, c) = (37, 600);
        let x: Vec<f64> = (0..r * c).map(|i| (i % 13) as f64 - 6.0).collect();
        let got = sum_cols(&x, r, c);
        for j in 0..c {
            let want: f64 = (0..r).map(|i| x[i * c + j]).sum();
            assert_eq!(got[j], want);
        }
    }
}

#[cfg(test)]
mod into_tests {
    use super::*;
    use crate::matmul::tests::rand_vec;

    /// `softmax_rows_into` over stale contents equals `softmax_rows`, and
    /// the rows sum to 1 (softmax) / their exps do (log-softmax).
    #[test]
    fn softmax_rows_into_matches() {
        for &(rows, k) in &[(3, 7), (64, 1024), (1, 1)] {
            let x: Vec<f32> = rand_vec(rows * k, k as u64);
            for log in [false, true] {
                let want = softmax_rows(&x, k, log);
                let mut got = vec![f32::NAN; x.len()];
                softmax_rows_into(&x, k, log, &mut got);
                assert_eq!(got, want, "{rows}x{k} log={log}");
                for r in got.chunks(k) {
                    let s: f32 = r.iter().map(|&v| if log { v.exp() } else { v }).sum();
                    assert!((s - 1.0).abs() < 1e-4, "row sum {s}");
                }
            }
        }
    }
}

/// Outputs `j0..j0 + out.len()` of `sum_outer_inner_into`: per output, 16
/// f64 partial sums (lane `t % 16` of each inner row of length r2; the
/// elements past the last whole 16 of each row in 16 more, added to the
/// first at the end), added pairwise at the end. For f32
/// with AVX-512 the lanes are two zmm registers fed 16 floats at a time;
/// otherwise the same arithmetic in scalar code (same result bits).
fn sum_outer_inner_part<T: Float>(
    x: &[T],
    r1: usize,
    k: usize,
    r2: usize,
    j0: usize,
    out: &mut [T],
) {
    const W: usize = 16;
    for (jj, o) in out.iter_mut().enumerate() {
        let j = j0 + jj;
        let mut a = [0.0f64; W];
        #[cfg(target_arch = "x86_64")]
        if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
            && r2 >= W
            && crate::simd::level() >= 3
        {
            // SAFETY: T is f32 (identity cast); AVX-512F detected.
            unsafe {
                let xf = std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len());
                sum_rows_f64_avx512(xf, j * r2, k * r2, r1, r2, &mut a);
            }
            *o = T::from_f64(pairwise16(a));
            continue;
        }
        let mut rest = [0.0f64; W];
        for i in 0..r1 {
            let row = &x[(i * k + j) * r2..][..r2];
            let mut q = row.chunks_exact(W);
            for c in &mut q {
                for l in 0..W {
                    a[l] += c[l].as_f64();
                }
            }
            for (l, &v) in q.remainder().iter().enumerate() {
                rest[l] += v.as_f64();
            }
        }
        for (v, r) in a.iter_mut().zip(&rest) {
            *v += r;
        }
        *o = T::from_f64(pairwise16(a));
    }
}

fn pairwise16(mut h: [f64; 16]) -> f64 {
    let mut w = 16;
    while w > 1 {
        w /= 2;
        for l in 0..w {
            h[l] += h[l + w];
        }
    }
    h[0]
}

/// Adds rows `x[start + i*stride..][..len]`, `i < rows`, into the 16 f64
/// lanes `a` as `sum_outer_inner_part` does (`len >= 16`).
///
/// Safety: AVX-512F; every row inside `x`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn sum_rows_f64_avx512(
    x: &[f32],
    start: usize,
    stride: usize,
    rows: usize,
    len: usize,
    a: &mut [f64; 16],
) {
    use std::arch::x86_64::*;
    assert!(rows == 0 || start + (rows - 1) * stride + len <= x.len());
    let (mut lo, mut hi) = (
        _mm512_loadu_pd(a.as_ptr()),
        _mm512_loadu_pd(a.as_ptr().add(8)),
    );
    let full = len / 16 * 16;
    let mut rest = [0.0f64; 16];
    for i in 0..rows {
        let p = x.as_ptr().add(start + i * stride);
        let mut t = 0;
        while t < full {
            lo = _mm512_add_pd(lo, _mm512_cvtps_pd(_mm256_loadu_ps(p.add(t))));
            hi = _mm512_add_pd(hi, _mm512_cvtps_pd(_mm256_loadu_ps(p.add(t + 8))));
            t += 16;
        }
        for (l, r) in rest.iter_mut().enumerate().take(len - full) {
            *r += *p.add(full + l) as f64;
        }
    }
    _mm512_storeu_pd(a.as_mut_ptr(), lo);
    _mm512_storeu_pd(a.as_mut_ptr().add(8), hi);
    for (v, r) in a.iter_mut().zip(&rest) {
        *v += r;
    }
}

/// Sum of a contiguous `[r1, k, r2]` buffer over r1 and r2 into `out`
/// (`[k]`), accumulated in f64 (16 interleaved partial sums per output, so
/// the adds vectorize: the last bits may differ from `sum_rows` over the
/// permuted input). The outputs are split into one contiguous range per
/// thread, each thread reading its range's part of every outer row
/// (results do not depend on the thread count). Measured on the shared
/// 2-core AVX-512 box (compiled complex_net step times, min of 30 steps,
/// conv bias gradients [1024, 32, 36] and [1024, 16, 64]): 4 scalar
/// partial sums with rayon over outputs 0.255 / 0.357 ms, this 0.221 /
/// 0.222 ms (the inputs come from memory: mostly bandwidth).
pub fn sum_outer_inner_into<T: Float>(x: &[T], r1: usize, k: usize, r2: usize, out: &mut [T]) {
    assert_eq!(x.len(), r1 * k * r2, "sum: input length");
    assert_eq!(out.len(), k, "sum: output length");
    let part = |j0: usize, out: &mut [T]| sum_outer_inner_part(x, r1, k, r2, j0, out);
    let parts = if x.len() >= crate::PAR_THRESHOLD {
        crate::par::parts(k, 1)
    } else {
        1
    };
    if parts > 1 {
        crate::par::chunks_mut_in(out, parts, 1, part);
    } else {
        part(0, out);
    }
}

#[cfg(test)]
mod outer_inner_tests {
    use super::*;

    /// Inner rows shorter than, equal to and longer than the 16 lanes
    /// (with remainders), small and parallel sizes, f32 (the AVX-512 path
    /// where available) and f64, against f64 loops.
    #[test]
    fn sum_outer_inner_lanes_and_threads() {
        for (r1, k, r2) in [
            (2, 3, 16),
            (5, 4, 36),
            (7, 3, 64),
            (300, 32, 36),
            (1024, 16, 17),
        ] {
            let x: Vec<f64> = (0..r1 * k * r2)
                .map(|i| ((i * 7919) % 23) as f64 * 0.125 - 1.3)
                .collect();
            let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let mut o64 = vec![0.0f64; k];
            let mut o32 = vec![0.0f32; k];
            sum_outer_inner_into(&x, r1, k, r2, &mut o64);
            sum_outer_inner_into(&xf, r1, k, r2, &mut o32);
            for j in 0..k {
                let want: f64 = (0..r1)
                    .flat_map(|i| (0..r2).map(move |t| (i, t)))
                    .map(|(i, t)| x[(i * k + j) * r2 + t])
                    .sum();
                assert!((o64[j] - want).abs() < 1e-9, "f64 {r1}x{k}x{r2} {j}");
                let wantf: f64 = (0..r1)
                    .flat_map(|i| (0..r2).map(move |t| (i, t)))
                    .map(|(i, t)| xf[(i * k + j) * r2 + t] as f64)
                    .sum();
                assert!(
                    (o32[j] as f64 - wantf).abs() <= 1e-6 * (1.0 + wantf.abs()),
                    "f32 {r1}x{k}x{r2} {j}: {} vs {wantf}",
                    o32[j]
                );
            }
        }
    }

    #[test]
    fn sum_outer_inner_matches_a_naive_sum() {
        let (r1, k, r2) = (3, 5, 7);
        let x: Vec<f32> = (0..r1 * k * r2)
            .map(|i| (i % 11) as f32 * 0.25 - 1.0)
            .collect();
        let mut out = vec![0.0f32; k];
        sum_outer_inner_into(&x, r1, k, r2, &mut out);
        for (j, &o) in out.iter().enumerate() {
            let want: f64 = (0..r1)
                .flat_map(|i| (0..r2).map(move |t| (i, t)))
                .map(|(i, t)| x[(i * k + j) * r2 + t] as f64)
                .sum();
            assert!((o as f64 - want).abs() < 1e-5, "{o} vs {want}");
        }
    }
}

/// `sum((a - b)^2)` in one pass (the MSE loss's forward): f32 lanes summed
/// in blocks of 1024 elements, blocks added in f64; parts over the static
/// pool. `a` and `b` have the same length.
pub fn sq_diff_sum(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "sq_diff_sum: lengths");
    const BLOCK: usize = 1024;
    let n = a.len();
    let parts = crate::par::parts(n, crate::PAR_THRESHOLD / 2);
    // Part sums added in part order, not in the order the threads finish,
    // so the loss is the same at every call.
    let sums = parking_lot::Mutex::new(Vec::with_capacity(parts));
    crate::par::for_each_part(n, parts, BLOCK, |r| {
        let s = crate::simd::dispatch!(sq_diff_sum_body(&a[r.clone()], &b[r.clone()], BLOCK));
        sums.lock().push((r.start, s));
    });
    let mut sums = sums.into_inner();
    sums.sort_by_key(|&(start, _)| start);
    sums.iter().map(|&(_, s)| s).sum()
}

/// Blocks of `block` elements: 16 f32 partial sums each, then into f64.
#[inline(always)]
fn sq_diff_sum_body(a: &[f32], b: &[f32], block: usize) -> f64 {
    let mut total = 0.0f64;
    for (ab, bb) in a.chunks(block).zip(b.chunks(block)) {
        let mut lanes = [0.0f32; 16];
        let (ac, bc) = (ab.chunks_exact(16), bb.chunks_exact(16));
        let (ar, br) = (ac.remainder(), bc.remainder());
        for (x, y) in ac.zip(bc) {
            for i in 0..16 {
                let d = x[i] - y[i];
                lanes[i] += d * d;
            }
        }
        for (x, y) in ar.iter().zip(br) {
            let d = x - y;
            lanes[0] += d * d;
        }
        total += lanes.iter().map(|&v| v as f64).sum::<f64>();
    }
    total
}

/// `out = (a - b) * s` in one pass (the MSE loss's backward with a scalar
/// output gradient folded into `s`), over the static pool.
pub fn scaled_diff_into(a: &[f32], b: &[f32], s: f32, out: &mut [f32]) {
    assert!(
        a.len() == b.len() && a.len() == out.len(),
        "scaled_diff_into: lengths"
    );
    crate::par::chunks_mut(out, crate::PAR_THRESHOLD / 2, 16, |start, o| {
        let (a, b) = (&a[start..start + o.len()], &b[start..start + o.len()]);
        crate::simd::dispatch!({
            for ((o, &x), &y) in o.iter_mut().zip(a).zip(b) {
                *o = (x - y) * s;
            }
        })
    });
}

#[cfg(test)]
mod mse_tests {
    /// Against f64 loops, lengths around the block and lane sizes.
    #[test]
    fn sq_diff_sum_and_scaled_diff_match_f64() {
        for n in [0usize, 1, 15, 16, 17, 1023, 1024, 1025, 70001, 300_000] {
            let a: Vec<f32> = (0..n)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 17.0)
                .collect();
            let b: Vec<f32> = (0..n)
                .map(|i| ((i * 11 % 53) as f32 - 26.0) / 9.0)
                .collect();
            let want: f64 = a
                .iter()
                .zip(&b)
                .map(|(&x, &y)| ((x - y) as f64).powi(2))
                .sum();
            let got = super::sq_diff_sum(&a, &b);
            assert!(
                (got - want).abs() <= 1e-6 * (1.0 + want),
                "n={n}: {got} vs {want}"
            );
            let mut o = vec![f32::NAN; n];
            super::scaled_diff_into(&a, &b, 0.25, &mut o);
            for i in 0..n {
                assert_eq!(o[i], (a[i] - b[i]) * 0.25, "n={n} i={i}");
            }
        }
    }
}
