//! Batch and layer normalization, forward and backward. Batch norm views
//! its input as contiguous `[N, C, S]` (S = H*W for BatchNorm2d, 1 for
//! BatchNorm1d on `[N, C]`) and normalizes per channel; layer norm
//! normalizes each contiguous row of `k` elements. Sums are accumulated in
//! f64 (also for f32 data). Running statistics are the frontend's business:
//! the kernels return the batch's biased variance and element count.

use crate::element::Float;
use rayon::prelude::*;

/// Per-channel statistics of a training-mode batch norm. `var` is biased
/// (divided by `count`); PyTorch updates `running_var` with the unbiased
/// `var * count / (count - 1)`. `invstd = 1 / sqrt(var + eps)` is what the
/// backward needs.
#[derive(Clone, Debug, PartialEq)]
pub struct BatchNormStats<T> {
    pub mean: Vec<T>,
    pub var: Vec<T>,
    pub invstd: Vec<T>,
    /// Elements per channel, N*S.
    pub count: usize,
}

/// `f(c)` for every channel, in parallel when the data is large.
fn per_channel<U: Send>(c: usize, work: usize, f: impl Fn(usize) -> U + Sync + Send) -> Vec<U> {
    if work >= crate::PAR_THRESHOLD && c > 1 {
        (0..c).into_par_iter().map(f).collect()
    } else {
        (0..c).map(f).collect()
    }
}

/// Lanes of the per-channel sums: element `i` of each `S`-plane goes to
/// accumulator `i % LANES`, planes in batch order, and the lanes are added
/// in a fixed tree at the end. Every per-channel sum (`channel_sum`,
/// `channel_moments`) uses this order, so the forward statistics and the
/// backward's sums agree bit for bit however they are computed. One f64
/// chain per sum (the previous order) was latency-bound: BatchNorm's
/// statistics took 11% of seed_cnn's compiled training step.
const LANES: usize = 8;

/// Adds `f(x[i], g[i])` of one plane segment into the lane accumulators.
#[inline(always)]
fn lane_add<T: Float>(
    xs: &[T],
    gs: Option<&[T]>,
    acc: &mut [f64; LANES],
    f: &impl Fn(f64, f64) -> f64,
) {
    match gs {
        Some(gs) => {
            let (xc, gc) = (xs.chunks_exact(LANES), gs.chunks_exact(LANES));
            let (xr, gr) = (xc.remainder(), gc.remainder());
            for (xv, gv) in xc.zip(gc) {
                for l in 0..LANES {
                    acc[l] += f(xv[l].as_f64(), gv[l].as_f64());
                }
            }
            for (l, (&x, &g)) in xr.iter().zip(gr).enumerate() {
                acc[l] += f(x.as_f64(), g.as_f64());
            }
        }
        None => {
            let xc = xs.chunks_exact(LANES);
            let xr = xc.remainder();
            for xv in xc {
                for l in 0..LANES {
                    acc[l] += f(xv[l].as_f64(), 0.0);
                }
            }
            for (l, &x) in xr.iter().enumerate() {
                acc[l] += f(x.as_f64(), 0.0);
            }
        }
    }
}

/// The lanes' total, in a fixed tree.
#[inline(always)]
fn lane_total(a: &[f64; LANES]) -> f64 {
    ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]))
}

/// Sum over batch and plane of `f(x, g)` for channel `ch` of `[N, C, S]`
/// tensors, in f64, in the lane order of `LANES`.
#[inline(always)]
fn channel_sum<T: Float>(
    x: &[T],
    g: Option<&[T]>,
    shape: [usize; 3],
    ch: usize,
    f: impl Fn(f64, f64) -> f64,
) -> f64 {
    let [n, c, s] = shape;
    crate::simd::dispatch!({
        let mut acc = [0.0f64; LANES];
        for b in 0..n {
            let off = (b * c + ch) * s;
            lane_add(&x[off..off + s], g.map(|g| &g[off..off + s]), &mut acc, &f);
        }
        lane_total(&acc)
    })
}

/// `out[n, c, s] = f(c, x[n, c, s], g[n, c, s])` with per-channel
/// coefficients (out: x's length); parallel over chunks of whole S-planes.
fn map_channels_into<T: Float>(
    x: &[T],
    g: Option<&[T]>,
    shape: [usize; 3],
    f: impl Fn(usize, T, T) -> T + Sync + Send,
    out: &mut [T],
) {
    let [_, c, s] = shape;
    assert_eq!(out.len(), x.len(), "batch_norm: output length");
    if out.is_empty() || s == 0 {
        return;
    }
    if s == 1 {
        // [N, C] (BatchNorm1d): rows of C channels, one pass per row.
        let body = |start: usize, o: &mut [T]| {
            for (ri, orow) in o.chunks_mut(c).enumerate() {
                let off = start + ri * c;
                let xs = &x[off..off + c];
                match g {
                    Some(g) => {
                        let gs = &g[off..off + c];
                        for ch in 0..c {
                            orow[ch] = f(ch, xs[ch], gs[ch]);
                        }
                    }
                    None => {
                        for ch in 0..c {
                            orow[ch] = f(ch, xs[ch], T::zero());
                        }
                    }
                }
            }
        };
        crate::par::chunks_mut(out, crate::PAR_THRESHOLD / 2, c, body);
        return;
    }
    let body = |start: usize, o: &mut [T]| {
        for (pi, op) in o.chunks_mut(s).enumerate() {
            let off = start + pi * s;
            let ch = (off / s) % c;
            let len = op.len();
            let xs = &x[off..off + len];
            match g {
                Some(g) => {
                    for ((o, &xv), &gv) in op.iter_mut().zip(xs).zip(&g[off..off + len]) {
                        *o = f(ch, xv, gv);
                    }
                }
                None => {
                    for (o, &xv) in op.iter_mut().zip(xs) {
                        *o = f(ch, xv, T::zero());
                    }
                }
            }
        }
    };
    crate::par::chunks_mut(out, crate::PAR_THRESHOLD / 2, s, body);
}

fn check_bn<T>(x: &[T], shape: [usize; 3], weight: Option<&[T]>, bias: Option<&[T]>) {
    let [n, c, s] = shape;
    assert_eq!(x.len(), n * c * s, "batch_norm: input length");
    if let Some(w) = weight {
        assert_eq!(w.len(), c, "batch_norm: weight length");
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), c, "batch_norm: bias length");
    }
}

/// Training-mode batch norm of x `[N, C, S]`: normalizes with the batch's
/// per-channel mean and biased variance, then scales by `weight` and
/// shifts by `bias` (each `[C]`, optional). Returns y `[N, C, S]` and the
/// statistics.
pub fn batch_norm_train<T: Float>(
    x: &[T],
    shape: [usize; 3],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> (Vec<T>, BatchNormStats<T>) {
    let mut y = crate::buffers::alloc_uninit::<T>(x.len());
    let st = batch_norm_train_into(x, shape, weight, bias, eps, Some(&mut y));
    (y, st)
}

/// `batch_norm_train` writing y into `out` (x's length; every element
/// overwritten), or only the statistics when `out` is None.
pub fn batch_norm_train_into<T: Float>(
    x: &[T],
    shape: [usize; 3],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    out: Option<&mut [T]>,
) -> BatchNormStats<T> {
    check_bn(x, shape, weight, bias);
    let [n, c, s] = shape;
    let count = n * s;
    assert!(
        count > 0,
        "batch_norm: expected more than 0 values per channel in training"
    );
    let stats: Vec<(f64, f64)> = per_channel(c, x.len(), |ch| {
        let mean = channel_sum(x, None, shape, ch, |v, _| v) / count as f64;
        let var = channel_sum(x, None, shape, ch, |v, _| (v - mean) * (v - mean)) / count as f64;
        (mean, var)
    });
    let mean: Vec<T> = stats.iter().map(|&(m, _)| T::from_f64(m)).collect();
    let var: Vec<T> = stats.iter().map(|&(_, v)| T::from_f64(v)).collect();
    let invstd64: Vec<f64> = stats.iter().map(|&(_, v)| 1.0 / (v + eps).sqrt()).collect();
    let invstd: Vec<T> = invstd64.iter().map(|&v| T::from_f64(v)).collect();
    if let Some(out) = out {
        normalize_into(
            x,
            shape,
            &stats.iter().map(|&(m, _)| m).collect::<Vec<_>>(),
            &invstd64,
            weight,
            bias,
            out,
        );
    }
    BatchNormStats {
        mean,
        var,
        invstd,
        count,
    }
}

/// `y = (x - mean[c]) * invstd[c] * w[c] + b[c]`, folded into one
/// multiply-add per element.
fn normalize_into<T: Float>(
    x: &[T],
    shape: [usize; 3],
    mean: &[f64],
    invstd: &[f64],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    out: &mut [T],
) {
    let c = shape[1];
    let coef: Vec<(T, T)> = (0..c)
        .map(|ch| {
            let w = weight.map_or(1.0, |w| w[ch].as_f64());
            let b = bias.map_or(0.0, |b| b[ch].as_f64());
            let scale = invstd[ch] * w;
            (T::from_f64(scale), T::from_f64(b - mean[ch] * scale))
        })
        .collect();
    map_channels_into(x, None, shape, |ch, v, _| v * coef[ch].0 + coef[ch].1, out)
}

/// Eval-mode batch norm of x `[N, C, S]` with the running statistics.
pub fn batch_norm_eval<T: Float>(
    x: &[T],
    shape: [usize; 3],
    running_mean: &[T],
    running_var: &[T],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> Vec<T> {
    // Every element is written by `batch_norm_eval_into`.
    let mut y = crate::buffers::alloc_uninit::<T>(x.len());
    batch_norm_eval_into(
        x,
        shape,
        running_mean,
        running_var,
        weight,
        bias,
        eps,
        &mut y,
    );
    y
}

/// Eval-mode batch norm of x `[N, C, S]` into `out` (same length, every
/// element overwritten, nothing allocated): per channel
/// `y = x * scale + shift` with `scale = w / sqrt(var + eps)` and
/// `shift = b - mean * scale` computed in f64, as `batch_norm_eval`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_eval_into<T: Float>(
    x: &[T],
    shape: [usize; 3],
    running_mean: &[T],
    running_var: &[T],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    out: &mut [T],
) {
    check_bn(x, shape, weight, bias);
    let [_, c, s] = shape;
    assert_eq!(running_mean.len(), c, "batch_norm: running_mean length");
    assert_eq!(running_var.len(), c, "batch_norm: running_var length");
    assert_eq!(out.len(), x.len(), "batch_norm: output length");
    if s == 0 || x.is_empty() {
        return;
    }
    let coef = |ch: usize| {
        let invstd = 1.0 / (running_var[ch].as_f64() + eps).sqrt();
        let w = weight.map_or(1.0, |w| w[ch].as_f64());
        let b = bias.map_or(0.0, |b| b[ch].as_f64());
        let scale = invstd * w;
        (
            T::from_f64(scale),
            T::from_f64(b - running_mean[ch].as_f64() * scale),
        )
    };
    if s == 1 {
        // [N, C] (BatchNorm1d): rows of C channels; the coefficients of a
        // block of channels are computed once per chunk of rows, on the
        // stack (a sqrt per element was 10x slower).
        const CB: usize = 64;
        let body = |start: usize, o: &mut [T]| {
            let xs = &x[start..][..o.len()];
            for c0 in (0..c).step_by(CB) {
                let cn = CB.min(c - c0);
                let mut ab = [(T::zero(), T::zero()); CB];
                for (j, v) in ab[..cn].iter_mut().enumerate() {
                    *v = coef(c0 + j);
                }
                for (orow, xrow) in o.chunks_exact_mut(c).zip(xs.chunks_exact(c)) {
                    for ((o, &xv), &(a, b)) in orow[c0..c0 + cn]
                        .iter_mut()
                        .zip(&xrow[c0..c0 + cn])
                        .zip(&ab[..cn])
                    {
                        *o = xv * a + b;
                    }
                }
            }
        };
        crate::par::chunks_mut(out, crate::PAR_THRESHOLD / 2, c, body);
        return;
    }
    let body = |start: usize, o: &mut [T]| {
        for (pi, op) in o.chunks_mut(s).enumerate() {
            let off = start + pi * s;
            let (a, b) = coef((off / s) % c);
            let len = op.len();
            for (o, &xv) in op.iter_mut().zip(&x[off..off + len]) {
                *o = xv * a + b;
            }
        }
    };
    crate::par::chunks_mut(out, crate::PAR_THRESHOLD / 2, s, body);
}

/// Backward of batch norm. `mean`/`invstd` are the ones the forward used:
/// the batch's (from `BatchNormStats`) when `training`, else the running
/// mean and `1/sqrt(running_var + eps)` (see `batch_norm_backward_eval`).
/// Returns `(grad_input [N, C, S], grad_weight [C], grad_bias [C])`;
/// grad_weight is computed even if there is no weight (ignore it then).
pub fn batch_norm_backward<T: Float>(
    grad_out: &[T],
    x: &[T],
    shape: [usize; 3],
    weight: Option<&[T]>,
    mean: &[T],
    invstd: &[T],
    training: bool,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut gi = crate::buffers::alloc_uninit::<T>(x.len());
    let (gw, gb) =
        batch_norm_backward_into(grad_out, x, shape, weight, mean, invstd, training, &mut gi);
    (gi, gw, gb)
}

/// `batch_norm_backward` writing grad_input into `gi` (x's length);
/// returns `(grad_weight, grad_bias)`.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_into<T: Float>(
    grad_out: &[T],
    x: &[T],
    shape: [usize; 3],
    weight: Option<&[T]>,
    mean: &[T],
    invstd: &[T],
    training: bool,
    gi: &mut [T],
) -> (Vec<T>, Vec<T>) {
    check_bn(x, shape, weight, None);
    assert_eq!(
        grad_out.len(),
        x.len(),
        "batch_norm_backward: grad_out length"
    );
    let [n, c, s] = shape;
    let count = (n * s) as f64;
    // Per channel: sum(g) and sum(g * (x - mean)).
    let sums: Vec<(f64, f64)> = per_channel(c, x.len(), |ch| {
        let m = mean[ch].as_f64();
        let sg = channel_sum(x, Some(grad_out), shape, ch, |_, g| g);
        let sgx = channel_sum(x, Some(grad_out), shape, ch, |v, g| g * (v - m));
        (sg, sgx)
    });
    let gw: Vec<T> = sums
        .iter()
        .zip(invstd)
        .map(|(&(_, sgx), &is)| T::from_f64(sgx * is.as_f64()))
        .collect();
    let gb: Vec<T> = sums.iter().map(|&(sg, _)| T::from_f64(sg)).collect();
    // grad_input = a*g + b*x + d per channel.
    let coef: Vec<(T, T, T)> = (0..c)
        .map(|ch| {
            let w = weight.map_or(1.0, |w| w[ch].as_f64());
            let is = invstd[ch].as_f64();
            let m = mean[ch].as_f64();
            if training && count > 0.0 {
                let (sg, sgx) = sums[ch];
                train_coef(w, is, m, sg, sgx, count)
            } else {
                (T::from_f64(w * is), T::zero(), T::zero())
            }
        })
        .collect();
    apply_coef(x, grad_out, shape, &coef, gi);
    (gw, gb)
}

/// Training batch norm's grad_input per channel as `a*g + b*x + d`:
/// `gi = w*is * (g - sg/M - (x-m) * is^2 * sgx/M)` from the weight `w`, the
/// inverse std `is`, the mean `m`, `sg = sum(g)`, `sgx = sum(g*(x-m))` and
/// the count `M`.
fn train_coef<T: Float>(w: f64, is: f64, m: f64, sg: f64, sgx: f64, count: f64) -> (T, T, T) {
    let k = is * is * sgx / count;
    let a = w * is;
    (
        T::from_f64(a),
        T::from_f64(-a * k),
        T::from_f64(a * (k * m - sg / count)),
    )
}

/// `gi[n, c, s] = a_c * g + b_c * x + d_c` for per-channel `(a, b, d)`.
fn apply_coef<T: Float>(x: &[T], g: &[T], shape: [usize; 3], coef: &[(T, T, T)], gi: &mut [T]) {
    map_channels_into(
        x,
        Some(g),
        shape,
        |ch, v, g| {
            let (a, b, d) = coef[ch];
            a * g + b * v + d
        },
        gi,
    );
}

/// Backward of eval-mode batch norm (statistics are constants).
#[allow(clippy::too_many_arguments)]
pub fn batch_norm_backward_eval<T: Float>(
    grad_out: &[T],
    x: &[T],
    shape: [usize; 3],
    weight: Option<&[T]>,
    running_mean: &[T],
    running_var: &[T],
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let invstd: Vec<T> = running_var
        .iter()
        .map(|v| T::from_f64(1.0 / (v.as_f64() + eps).sqrt()))
        .collect();
    batch_norm_backward(grad_out, x, shape, weight, running_mean, &invstd, false)
}

/// Rows per parallel task for a row kernel with rows of `k` elements.
fn rows_per_task(k: usize) -> usize {
    (crate::PAR_THRESHOLD / 2 / k.max(1)).max(1)
}

/// Layer norm of each contiguous row of `k` elements of x (`x.len()` a
/// multiple of k), with optional elementwise weight/bias `[k]`. Returns
/// `(y, mean [rows], rstd [rows])` with `rstd = 1/sqrt(biased var + eps)`.
pub fn layer_norm<T: Float>(
    x: &[T],
    k: usize,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    assert!(
        k > 0 && x.len().is_multiple_of(k),
        "layer_norm: length not a multiple of k"
    );
    if let Some(w) = weight {
        assert_eq!(w.len(), k, "layer_norm: weight length");
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), k, "layer_norm: bias length");
    }
    let rows = x.len() / k;
    // Every element of y is written.
    let mut y = crate::buffers::alloc_uninit::<T>(x.len());
    let mut mean = vec![T::zero(); rows];
    let mut rstd = vec![T::zero(); rows];
    // Static parts of whole rows (see `par`), each in the widest SIMD copy.
    let parts = crate::par::parts(x.len(), crate::PAR_THRESHOLD / 2);
    let (pm, pr) = (
        crate::par::SendPtr::new(mean.as_mut_ptr()),
        crate::par::SendPtr::new(rstd.as_mut_ptr()),
    );
    crate::par::chunks_mut_in(&mut y, parts, k, |s, yc| {
        let (r0, nr) = (s / k, yc.len() / k);
        // SAFETY: rows [r0, r0+nr) of mean/rstd belong to this part only
        // (parts are disjoint row ranges of y).
        let (mc, rc) = unsafe {
            (
                std::slice::from_raw_parts_mut(pm.get().add(r0), nr),
                std::slice::from_raw_parts_mut(pr.get().add(r0), nr),
            )
        };
        let xc = &x[s..s + yc.len()];
        crate::simd::dispatch!(layer_norm_rows(
            xc,
            k,
            weight,
            bias,
            eps,
            yc,
            Some((mc, rc))
        ))
    });
    (y, mean, rstd)
}

/// Layer norm of consecutive rows, writing each row's mean and rstd when
/// `stats` is given. Inlined into `simd::dispatch!`'s per-ISA copies.
#[inline(always)]
fn layer_norm_rows<T: Float>(
    x: &[T],
    k: usize,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    y: &mut [T],
    stats: Option<(&mut [T], &mut [T])>,
) {
    match stats {
        Some((mc, rc)) => {
            for (((yr, xr), m), rs) in y.chunks_mut(k).zip(x.chunks(k)).zip(mc).zip(rc) {
                let (mu, is) = layer_norm_row(xr, weight, bias, eps, yr);
                *m = T::from_f64(mu);
                *rs = T::from_f64(is);
            }
        }
        None => {
            for (yr, xr) in y.chunks_mut(k).zip(x.chunks(k)) {
                layer_norm_row(xr, weight, bias, eps, yr);
            }
        }
    }
}

/// Layer norm of each contiguous row of `k` elements of x into `out`
/// (same length, every element overwritten, nothing allocated), without
/// the mean/rstd outputs; the same arithmetic as `layer_norm`.
pub fn layer_norm_into<T: Float>(
    x: &[T],
    k: usize,
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    out: &mut [T],
) {
    assert!(
        k > 0 && x.len().is_multiple_of(k),
        "layer_norm: length not a multiple of k"
    );
    if let Some(w) = weight {
        assert_eq!(w.len(), k, "layer_norm: weight length");
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), k, "layer_norm: bias length");
    }
    assert_eq!(out.len(), x.len(), "layer_norm: output length");
    crate::par::chunks_mut(out, crate::PAR_THRESHOLD / 2, k, |s, yc| {
        let xc = &x[s..s + yc.len()];
        crate::simd::dispatch!(layer_norm_rows(xc, k, weight, bias, eps, yc, None))
    });
}

/// One row of layer norm; returns `(mean, rstd)` (in f64).
#[inline(always)]
fn layer_norm_row<T: Float>(
    xr: &[T],
    weight: Option<&[T]>,
    bias: Option<&[T]>,
    eps: f64,
    yr: &mut [T],
) -> (f64, f64) {
    let k = xr.len();
    let mu = crate::reduce::lanes_sum_f64(xr) / k as f64;
    let var = crate::reduce::lanes_sq_dev_f64(xr, mu) / k as f64;
    let is = 1.0 / (var + eps).sqrt();
    let (mu_t, is_t) = (T::from_f64(mu), T::from_f64(is));
    // One loop per case, so none tests an Option per element (and each
    // vectorizes); the arithmetic is the same in every case.
    let yr = &mut yr[..k];
    match (weight, bias) {
        (Some(w), Some(b)) => {
            for (((o, &v), &w), &b) in yr.iter_mut().zip(xr).zip(&w[..k]).zip(&b[..k]) {
                *o = (v - mu_t) * is_t * w + b;
            }
        }
        (Some(w), None) => {
            for ((o, &v), &w) in yr.iter_mut().zip(xr).zip(&w[..k]) {
                *o = (v - mu_t) * is_t * w;
            }
        }
        (None, Some(b)) => {
            for ((o, &v), &b) in yr.iter_mut().zip(xr).zip(&b[..k]) {
                *o = (v - mu_t) * is_t + b;
            }
        }
        (None, None) => {
            for (o, &v) in yr.iter_mut().zip(xr) {
                *o = (v - mu_t) * is_t;
            }
        }
    }
    (mu, is)
}

/// Backward of `layer_norm`: returns `(grad_input, grad_weight [k],
/// grad_bias [k])` (the last two are computed whether or not the forward
/// had a weight/bias). `mean`/`rstd` are the forward's.
pub fn layer_norm_backward<T: Float>(
    grad_out: &[T],
    x: &[T],
    k: usize,
    mean: &[T],
    rstd: &[T],
    weight: Option<&[T]>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let mut gi = vec![T::zero(); x.len()];
    let (gw, gb) = layer_norm_backward_into(grad_out, x, k, mean, rstd, weight, &mut gi);
    (gi, gw, gb)
}

/// The row statistics `layer_norm` returns (mean and rstd rounded to T),
/// without writing y: the same arithmetic.
pub fn layer_norm_stats<T: Float>(x: &[T], k: usize, eps: f64) -> (Vec<T>, Vec<T>) {
    assert!(
        k > 0 && x.len().is_multiple_of(k),
        "layer_norm: length not a multiple of k"
    );
    let rows = x.len() / k;
    let stat = |r: usize| {
        let xr = &x[r * k..][..k];
        let mu = xr.iter().map(|v| v.as_f64()).sum::<f64>() / k as f64;
        let var = xr.iter().map(|v| (v.as_f64() - mu).powi(2)).sum::<f64>() / k as f64;
        (T::from_f64(mu), T::from_f64(1.0 / (var + eps).sqrt()))
    };
    let st: Vec<(T, T)> = if x.len() >= crate::PAR_THRESHOLD {
        (0..rows).into_par_iter().map(stat).collect()
    } else {
        (0..rows).map(stat).collect()
    };
    st.into_iter().unzip()
}

/// `layer_norm_backward` writing grad_input into `gi` (x's length);
/// returns `(grad_weight, grad_bias)`.
pub fn layer_norm_backward_into<T: Float>(
    grad_out: &[T],
    x: &[T],
    k: usize,
    mean: &[T],
    rstd: &[T],
    weight: Option<&[T]>,
    gi: &mut [T],
) -> (Vec<T>, Vec<T>) {
    assert_eq!(gi.len(), x.len(), "layer_norm_backward: grad_input length");
    assert!(
        k > 0 && x.len().is_multiple_of(k),
        "layer_norm_backward: length not a multiple of k"
    );
    assert_eq!(
        grad_out.len(),
        x.len(),
        "layer_norm_backward: grad_out length"
    );
    let rows = x.len() / k;
    assert_eq!(mean.len(), rows, "layer_norm_backward: mean length");
    assert_eq!(rstd.len(), rows, "layer_norm_backward: rstd length");
    let rpt = rows_per_task(k);
    // Each task: grad_input of its rows, and partial column sums
    // (sum g*xhat, sum g) in f64.
    let task = |gc: &mut [T], start: usize| -> (Vec<f64>, Vec<f64>) {
        let mut gw = vec![0.0f64; k];
        let mut gb = vec![0.0f64; k];
        let mut wg = vec![0.0f64; k];
        for (r, gir) in gc.chunks_mut(k).enumerate() {
            let row = start + r;
            let xr = &x[row * k..][..k];
            let gr = &grad_out[row * k..][..k];
            let (mu, is) = (mean[row].as_f64(), rstd[row].as_f64());
            let (mut a, mut b) = (0.0f64, 0.0f64);
            for j in 0..k {
                let g = gr[j].as_f64();
                let xh = (xr[j].as_f64() - mu) * is;
                gw[j] += g * xh;
                gb[j] += g;
                let v = g * weight.map_or(1.0, |w| w[j].as_f64());
                wg[j] = v;
                a += v;
                b += v * xh;
            }
            a /= k as f64;
            b /= k as f64;
            for j in 0..k {
                let xh = (xr[j].as_f64() - mu) * is;
                gir[j] = T::from_f64(is * (wg[j] - a - xh * b));
            }
        }
        (gw, gb)
    };
    let add = |(mut a, mut b): (Vec<f64>, Vec<f64>), (c, d): (Vec<f64>, Vec<f64>)| {
        for (x, y) in a.iter_mut().zip(&c) {
            *x += y;
        }
        for (x, y) in b.iter_mut().zip(&d) {
            *x += y;
        }
        (a, b)
    };
    let (gw, gb) = if x.len() >= crate::PAR_THRESHOLD {
        gi.par_chunks_mut(rpt * k)
            .enumerate()
            .map(|(i, c)| task(c, i * rpt))
            .reduce(|| (vec![0.0; k], vec![0.0; k]), add)
    } else {
        task(gi, 0)
    };
    let to = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect::<Vec<T>>();
    (to(gw), to(gb))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{assert_close, rand_vec};

    fn to<T: Float>(v: &[f64]) -> Vec<T> {
        v.iter().map(|&x| T::from_f64(x)).collect()
    }

    /// Reference batch norm as a function of (x, w, b), for finite
    /// differences: returns y.
    fn bn_ref(x: &[f64], shape: [usize; 3], w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        let [n, c, s] = shape;
        let mut y = vec![0.0; x.len()];
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|bi| (0..s).map(move |si| (bi, si)))
                .map(|(bi, si)| x[(bi * c + ch) * s + si])
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|t| (t - m).powi(2)).sum::<f64>() / vals.len() as f64;
            for bi in 0..n {
                for si in 0..s {
                    let i = (bi * c + ch) * s + si;
                    y[i] = (x[i] - m) / (v + eps).sqrt() * w[ch] + b[ch];
                }
            }
        }
        y
    }

    /// Numerical gradient of `sum(go * f(x))` wrt each element of `x`.
    fn numgrad(x: &[f64], go: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
        let h = 1e-6;
        (0..x.len())
            .map(|i| {
                let mut xp = x.to_vec();
                xp[i] += h;
                let mut xm = x.to_vec();
                xm[i] -= h;
                let (yp, ym) = (f(&xp), f(&xm));
                yp.iter()
                    .zip(&ym)
                    .zip(go)
                    .map(|((a, b), g)| (a - b) * g)
                    .sum::<f64>()
                    / (2.0 * h)
            })
            .collect()
    }

    fn check_bn_train<T: Float>(shape: [usize; 3], tol: f64) {
        let eps = 1e-5;
        let [n, c, s] = shape;
        let x: Vec<f64> = rand_vec::<f64>(n * c * s, 3)
            .iter()
            .map(|v| v * 2.0 + 0.5)
            .collect();
        let w: Vec<f64> = rand_vec(c, 4);
        let b: Vec<f64> = rand_vec(c, 5);
        let want = bn_ref(&x, shape, &w, &b, eps);
        let (y, st) = batch_norm_train(
            &to::<T>(&x),
            shape,
            Some(&to::<T>(&w)),
            Some(&to::<T>(&b)),
            eps,
        );
        assert_close(&y, &want, tol, "batch_norm_train y");
        assert_eq!(st.count, n * s);
        for ch in 0..c {
            let vals: Vec<f64> = (0..n)
                .flat_map(|bi| (0..s).map(move |si| (bi, si)))
                .map(|(bi, si)| x[(bi * c + ch) * s + si])
                .collect();
            let m = vals.iter().sum::<f64>() / vals.len() as f64;
            let v = vals.iter().map(|t| (t - m).powi(2)).sum::<f64>() / vals.len() as f64;
            assert_close(
                &[st.mean[ch], st.var[ch], st.invstd[ch]],
                &[m, v, 1.0 / (v + eps).sqrt()],
                tol,
                "bn stats",
            );
        }
        // Backward against finite differences (in f64 of the reference).
        let go: Vec<f64> = rand_vec(x.len(), 6);
        let (gi, gw, gb) = batch_norm_backward(
            &to::<T>(&go),
            &to::<T>(&x),
            shape,
            Some(&to::<T>(&w)),
            &st.mean,
            &st.invstd,
            true,
        );
        let ngi = numgrad(&x, &go, |xx| bn_ref(xx, shape, &w, &b, eps));
        let ngw = numgrad(&w, &go, |ww| bn_ref(&x, shape, ww, &b, eps));
        let ngb = numgrad(&b, &go, |bb| bn_ref(&x, shape, &w, bb, eps));
        let ftol = tol.max(1e-6);
        assert_close(&gi, &ngi, ftol, "bn grad input");
        assert_close(&gw, &ngw, ftol, "bn grad weight");
        assert_close(&gb, &ngb, ftol, "bn grad bias");
        // No weight/bias: same as weight 1, bias 0.
        let ones = vec![1.0; c];
        let zeros = vec![0.0; c];
        let (y2, _) = batch_norm_train(&to::<T>(&x), shape, None, None, eps);
        assert_close(
            &y2,
            &bn_ref(&x, shape, &ones, &zeros, eps),
            tol,
            "bn no affine",
        );
    }

    #[test]
    fn batch_norm_train_forward_backward() {
        for shape in [[4, 3, 5], [7, 2, 1], [2, 5, 9], [1, 1, 6]] {
            check_bn_train::<f64>(shape, 1e-9);
            check_bn_train::<f32>(shape, 2e-4);
        }
        // Large enough for the parallel paths (checked against f64).
        let shape = [16, 8, 300];
        let x: Vec<f64> = rand_vec(16 * 8 * 300, 9);
        let w: Vec<f64> = rand_vec(8, 10);
        let b: Vec<f64> = rand_vec(8, 11);
        let (y, _) = batch_norm_train(
            &to::<f32>(&x),
            shape,
            Some(&to::<f32>(&w)),
            Some(&to::<f32>(&b)),
            1e-5,
        );
        assert_close(&y, &bn_ref(&x, shape, &w, &b, 1e-5), 1e-4, "bn large");
    }

    #[test]
    fn batch_norm_eval_forward_backward() {
        let shape = [3, 4, 5];
        let eps = 1e-3;
        let x: Vec<f64> = rand_vec(60, 12);
        let rm: Vec<f64> = rand_vec(4, 13);
        let rv: Vec<f64> = rand_vec::<f64>(4, 14)
            .iter()
            .map(|v| v.abs() + 0.5)
            .collect();
        let w: Vec<f64> = rand_vec(4, 15);
        let b: Vec<f64> = rand_vec(4, 16);
        let f = |xx: &[f64], ww: &[f64], bb: &[f64]| -> Vec<f64> {
            xx.iter()
                .enumerate()
                .map(|(i, &v)| {
                    let ch = (i / 5) % 4;
                    (v - rm[ch]) / (rv[ch] + eps).sqrt() * ww[ch] + bb[ch]
                })
                .collect()
        };
        let y = batch_norm_eval(&x, shape, &rm, &rv, Some(&w), Some(&b), eps);
        assert_close(&y, &f(&x, &w, &b), 1e-12, "bn eval");
        let go: Vec<f64> = rand_vec(60, 17);
        let (gi, gw, gb) = batch_norm_backward_eval(&go, &x, shape, Some(&w), &rm, &rv, eps);
        assert_close(
            &gi,
            &numgrad(&x, &go, |xx| f(xx, &w, &b)),
            1e-6,
            "bn eval gi",
        );
        assert_close(
            &gw,
            &numgrad(&w, &go, |ww| f(&x, ww, &b)),
            1e-6,
            "bn eval gw",
        );
        assert_close(
            &gb,
            &numgrad(&b, &go, |bb| f(&x, &w, bb)),
            1e-6,
            "bn eval gb",
        );
    }

    fn ln_ref(x: &[f64], k: usize, w: &[f64], b: &[f64], eps: f64) -> Vec<f64> {
        x.chunks(k)
            .flat_map(|r| {
                let m = r.iter().sum::<f64>() / k as f64;
                let v = r.iter().map(|t| (t - m).powi(2)).sum::<f64>() / k as f64;
                r.iter()
                    .enumerate()
                    .map(move |(j, t)| (t - m) / (v + eps).sqrt() * w[j] + b[j])
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    fn check_ln<T: Float>(rows: usize, k: usize, tol: f64) {
        let eps = 1e-5;
        let x: Vec<f64> = rand_vec::<f64>(rows * k, 20)
            .iter()
            .map(|v| v * 3.0 - 1.0)
            .collect();
        let w: Vec<f64> = rand_vec(k, 21);
        let b: Vec<f64> = rand_vec(k, 22);
        let (y, mean, rstd) =
            layer_norm(&to::<T>(&x), k, Some(&to::<T>(&w)), Some(&to::<T>(&b)), eps);
        assert_close(&y, &ln_ref(&x, k, &w, &b, eps), tol, "layer_norm y");
        let go: Vec<f64> = rand_vec(rows * k, 23);
        let (gi, gw, gb) = layer_norm_backward(
            &to::<T>(&go),
            &to::<T>(&x),
            k,
            &mean,
            &rstd,
            Some(&to::<T>(&w)),
        );
        if rows * k <= 200 {
            let ftol = tol.max(1e-6);
            assert_close(
                &gi,
                &numgrad(&x, &go, |xx| ln_ref(xx, k, &w, &b, eps)),
                ftol,
                "ln gi",
            );
            assert_close(
                &gw,
                &numgrad(&w, &go, |ww| ln_ref(&x, k, ww, &b, eps)),
                ftol,
                "ln gw",
            );
            assert_close(
                &gb,
                &numgrad(&b, &go, |bb| ln_ref(&x, k, &w, bb, eps)),
                ftol,
                "ln gb",
            );
        } else {
            // Large: compare with the serial f64 kernel on the same data.
            let (_, m64, r64) = layer_norm(&x, k, Some(&w), Some(&b), eps);
            let (gi64, gw64, gb64) = layer_norm_backward(&go, &x, k, &m64, &r64, Some(&w));
            assert_close(&gi, &gi64, tol, "ln gi large");
            assert_close(&gw, &gw64, tol * 10.0, "ln gw large");
            assert_close(&gb, &gb64, tol * 10.0, "ln gb large");
        }
        // No affine.
        let (y2, _, _) = layer_norm(&to::<T>(&x), k, None, None, eps);
        assert_close(
            &y2,
            &ln_ref(&x, k, &vec![1.0; k], &vec![0.0; k], eps),
            tol,
            "ln no affine",
        );
    }

    #[test]
    fn layer_norm_forward_backward() {
        for (rows, k) in [(3, 5), (1, 7), (6, 16), (4, 1)] {
            check_ln::<f64>(rows, k, 1e-9);
            check_ln::<f32>(rows, k, 2e-4);
        }
        check_ln::<f64>(300, 257, 1e-9);
        check_ln::<f32>(300, 257, 2e-4);
    }
}

#[cfg(test)]
mod into_tests {
    use super::*;
    use crate::matmul::tests::{assert_close, rand_vec};

    #[test]
    fn layer_norm_into_matches_layer_norm() {
        for &(rows, k) in &[(4, 5), (32, 256), (200, 300)] {
            let x: Vec<f32> = rand_vec(rows * k, 3);
            let w: Vec<f32> = rand_vec(k, 4);
            let b: Vec<f32> = rand_vec(k, 5);
            for (wo, bo) in [(Some(&w[..]), Some(&b[..])), (None, None)] {
                let (want, _, _) = layer_norm(&x, k, wo, bo, 1e-5);
                let mut got = vec![f32::NAN; x.len()];
                layer_norm_into(&x, k, wo, bo, 1e-5, &mut got);
                assert_eq!(got, want, "{rows}x{k}");
            }
        }
    }

    #[test]
    fn batch_norm_eval_into_matches_formula() {
        for &shape in &[
            [2, 3, 5],
            [8, 64, 169],
            [16, 50, 1],
            [8192, 70, 1],
            [3, 130, 1],
        ] {
            let [n, c, s] = shape;
            let x: Vec<f32> = rand_vec(n * c * s, 6);
            let mean: Vec<f32> = rand_vec(c, 7);
            let var: Vec<f32> = rand_vec::<f32>(c, 8).iter().map(|v| v + 1.5).collect();
            let w: Vec<f32> = rand_vec(c, 9);
            let b: Vec<f32> = rand_vec(c, 10);
            let want: Vec<f64> = (0..x.len())
                .map(|i| {
                    let ch = (i / s) % c;
                    (x[i] as f64 - mean[ch] as f64) / (var[ch] as f64 + 1e-5).sqrt() * w[ch] as f64
                        + b[ch] as f64
                })
                .collect();
            let mut got = vec![f32::NAN; x.len()];
            batch_norm_eval_into(&x, shape, &mean, &var, Some(&w), Some(&b), 1e-5, &mut got);
            assert_close(&got, &want, 1e-5, &format!("bn {shape:?}"));
            let vec_form = batch_norm_eval(&x, shape, &mean, &var, Some(&w), Some(&b), 1e-5);
            assert_eq!(got, vec_form);
        }
    }
}

/// Per channel of x and g `[N, C, S]`: the batch mean, the biased
/// variance, Σg and Σg·(x - mean), each summed in f64 in exactly the order
/// of `batch_norm_train` and `batch_norm_backward` (so the same values),
/// in two reads instead of four: the sums of the second read are three
/// independent chains in one loop.
fn channel_moments<T: Float>(x: &[T], g: &[T], shape: [usize; 3], ch: usize) -> [f64; 4] {
    let [n, c, s] = shape;
    let count = (n * s) as f64;
    let mean = channel_sum(x, None, shape, ch, |v, _| v) / count;
    // The backward centres on the mean rounded to T (`BatchNormStats`).
    let mt = T::from_f64(mean).as_f64();
    // Three sums in one read, each in `channel_sum`'s lane order.
    crate::simd::dispatch!({
        let (mut ss, mut sg, mut sgx) = ([0.0f64; LANES], [0.0f64; LANES], [0.0f64; LANES]);
        for b in 0..n {
            let off = (b * c + ch) * s;
            let (xs, gs) = (&x[off..off + s], &g[off..off + s]);
            let (xc, gc) = (xs.chunks_exact(LANES), gs.chunks_exact(LANES));
            let (xr, gr) = (xc.remainder(), gc.remainder());
            let mut one = |l: usize, v: f64, gv: f64| {
                ss[l] += (v - mean) * (v - mean);
                sg[l] += gv;
                sgx[l] += gv * (v - mt);
            };
            for (xv, gv) in xc.zip(gc) {
                for l in 0..LANES {
                    one(l, xv[l].as_f64(), gv[l].as_f64());
                }
            }
            for (l, (&v, &gv)) in xr.iter().zip(gr).enumerate() {
                one(l, v.as_f64(), gv.as_f64());
            }
        }
        [
            mean,
            lane_total(&ss) / count,
            lane_total(&sg),
            lane_total(&sgx),
        ]
    })
}

/// `channel_moments` of every channel of x and g `[N, C]` (S = 1), row by
/// row: each channel's sums still run over n in order (the same values),
/// but the reads are contiguous and the C chains independent.
fn channel_moments_rows<T: Float>(x: &[T], g: &[T], n: usize, c: usize) -> Vec<[f64; 4]> {
    let count = n as f64;
    let mut sx = vec![0.0f64; c];
    for xr in x.chunks_exact(c) {
        for (a, v) in sx.iter_mut().zip(xr) {
            *a += v.as_f64();
        }
    }
    let mean: Vec<f64> = sx.iter().map(|s| s / count).collect();
    let mt: Vec<f64> = mean.iter().map(|&m| T::from_f64(m).as_f64()).collect();
    let (mut ss, mut sg, mut sgx) = (vec![0.0f64; c], vec![0.0f64; c], vec![0.0f64; c]);
    for (xr, gr) in x.chunks_exact(c).zip(g.chunks_exact(c)) {
        for j in 0..c {
            let (v, gv) = (xr[j].as_f64(), gr[j].as_f64());
            ss[j] += (v - mean[j]) * (v - mean[j]);
            sg[j] += gv;
            sgx[j] += gv * (v - mt[j]);
        }
    }
    (0..c)
        .map(|j| [mean[j], ss[j] / count, sg[j], sgx[j]])
        .collect()
}

/// Gradient of training-mode batch norm (compiled training's native
/// step): the batch statistics recomputed from x and the gradient sums
/// in two reads of x and g, then grad_input in one more; the same values
/// as `batch_norm_train` followed by `batch_norm_backward`. Writes
/// grad_input into `gi` (x's length); returns `(grad_weight, grad_bias)`.
pub fn batch_norm_backward_train_fused<T: Float>(
    grad_out: &[T],
    x: &[T],
    shape: [usize; 3],
    weight: Option<&[T]>,
    eps: f64,
    gi: &mut [T],
) -> (Vec<T>, Vec<T>) {
    check_bn(x, shape, weight, None);
    assert_eq!(
        grad_out.len(),
        x.len(),
        "batch_norm_backward: grad_out length"
    );
    assert_eq!(gi.len(), x.len(), "batch_norm_backward: grad_input length");
    let [n, c, s] = shape;
    let count = (n * s) as f64;
    assert!(
        count > 0.0,
        "batch_norm: expected more than 0 values per channel in training"
    );
    let m = if s == 1 {
        channel_moments_rows(x, grad_out, n, c)
    } else {
        per_channel(c, x.len(), |ch| channel_moments(x, grad_out, shape, ch))
    };
    let mut gw = Vec::with_capacity(c);
    let mut gb = Vec::with_capacity(c);
    let coef: Vec<(T, T, T)> = m
        .iter()
        .enumerate()
        .map(|(ch, &[mean, var, sg, sgx])| {
            // `batch_norm_train`'s statistics rounded to T, used as
            // `batch_norm_backward` uses them.
            let is = T::from_f64(1.0 / (var + eps).sqrt()).as_f64();
            let m = T::from_f64(mean).as_f64();
            gw.push(T::from_f64(sgx * is));
            gb.push(T::from_f64(sg));
            let w = weight.map_or(1.0, |w| w[ch].as_f64());
            train_coef(w, is, m, sg, sgx, count)
        })
        .collect();
    apply_coef(x, grad_out, shape, &coef, gi);
    (gw, gb)
}

#[cfg(test)]
mod fused_backward_tests {
    use super::*;

    #[test]
    fn fused_batch_norm_backward_equals_the_four_pass_one() {
        let shape = [3, 4, 7];
        let len = 3 * 4 * 7;
        let x: Vec<f32> = (0..len)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.3 + 0.5)
            .collect();
        let g: Vec<f32> = (0..len)
            .map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.1)
            .collect();
        let w = [0.5f32, -1.0, 2.0, 1.5];
        let st = batch_norm_train_into(&x, shape, None, None, 1e-5, None);
        let (gi0, gw0, gb0) =
            batch_norm_backward(&g, &x, shape, Some(&w), &st.mean, &st.invstd, true);
        let mut gi = vec![0.0f32; len];
        let (gw, gb) = batch_norm_backward_train_fused(&g, &x, shape, Some(&w), 1e-5, &mut gi);
        // Bit for bit: the same sums in the same order.
        assert_eq!(gi, gi0);
        assert_eq!((gw, gb), (gw0, gb0));
        // [N, C] (BatchNorm1d): the row-major path.
        let shape = [21, 4, 1];
        let st = batch_norm_train_into(&x[..84], shape, None, None, 1e-5, None);
        let (gi0, gw0, gb0) = batch_norm_backward(
            &g[..84],
            &x[..84],
            shape,
            Some(&w),
            &st.mean,
            &st.invstd,
            true,
        );
        let mut gi = vec![0.0f32; 84];
        let (gw, gb) =
            batch_norm_backward_train_fused(&g[..84], &x[..84], shape, Some(&w), 1e-5, &mut gi);
        assert_eq!(gi, gi0);
        assert_eq!((gw, gb), (gw0, gb0));
    }
}
