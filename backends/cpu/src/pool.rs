//! 2-d max and average pooling over NCHW (contiguous), forward and
//! backward, with PyTorch's output sizes (ceil_mode), padding semantics
//! (-inf for max, count_include_pad / divisor_override for avg) and
//! `return_indices` convention (flat index into each input H*W plane).
//! Forward work is split by (n, c) plane over the static thread pool (`par`).

use crate::element::Float;

/// Kernel, stride, padding, dilation as `(h, w)` pairs (stride defaults to
/// the kernel in PyTorch; the frontend fills it in).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MaxPool2dParams {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub ceil_mode: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AvgPool2dParams {
    pub kernel: (usize, usize),
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub ceil_mode: bool,
    pub count_include_pad: bool,
    pub divisor_override: Option<usize>,
}

/// PyTorch's `pooling_output_shape` for one axis.
fn out_len(i: usize, k: usize, s: usize, p: usize, d: usize, ceil: bool) -> usize {
    assert!(
        k > 0 && s > 0 && d > 0,
        "pool2d: kernel, stride and dilation must be > 0"
    );
    assert!(
        p <= k / 2,
        "pool2d: padding {p} must be at most half of kernel size {k}"
    );
    let num = (i + 2 * p) as i64 - (d * (k - 1)) as i64 - 1 + if ceil { s as i64 - 1 } else { 0 };
    let mut o = num.div_euclid(s as i64) + 1;
    if ceil && (o - 1) * s as i64 >= (i + p) as i64 {
        o -= 1;
    }
    assert!(o > 0, "pool2d: output size would be {o} for input {i}");
    o as usize
}

/// Output `(Ho, Wo)` of a 2-d pooling (avg pooling has dilation 1).
pub fn pool2d_output_size(
    input_hw: (usize, usize),
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil_mode: bool,
) -> (usize, usize) {
    (
        out_len(
            input_hw.0, kernel.0, stride.0, padding.0, dilation.0, ceil_mode,
        ),
        out_len(
            input_hw.1, kernel.1, stride.1, padding.1, dilation.1, ceil_mode,
        ),
    )
}

/// Applies `f(plane_index, out_plane)` to every `plane`-sized chunk of
/// `out`, in parallel when the whole is large.
fn per_plane<U: Send>(
    out: &mut [U],
    plane: usize,
    work: usize,
    f: impl Fn(usize, &mut [U]) + Sync + Send,
) {
    if plane == 0 {
        return;
    }
    if work >= crate::PAR_THRESHOLD {
        // Static runs of planes, one per thread (see `par`).
        let parts = (out.len() / plane).min(crate::par::threads());
        crate::par::chunks_mut_in(out, parts, plane, |start, piece| {
            for (i, o) in piece.chunks_mut(plane).enumerate() {
                f(start / plane + i, o);
            }
        });
    } else {
        out.chunks_mut(plane).enumerate().for_each(|(i, o)| f(i, o));
    }
}

/// First in-image tap and end (exclusive) of the window starting at
/// `start` (may be negative) with `k` taps `d` apart, in an axis of `len`.
#[inline]
fn window(start: i64, k: usize, d: usize, len: usize) -> (i64, i64) {
    let end = (start + ((k - 1) * d) as i64 + 1).min(len as i64);
    let mut s = start;
    while s < 0 {
        s += d as i64;
    }
    (s, end)
}

/// max_pool2d of x `[N, C, H, W]`: returns the output `[N, C, Ho, Wo]` and
/// the argmax of each window as a flat index `ih*W + iw` into its input
/// plane (PyTorch's `return_indices`). NaN wins (the last NaN in the window,
/// as PyTorch's CPU kernel).
pub fn max_pool2d<T: Float>(
    x: &[T],
    x_shape: [usize; 4],
    p: &MaxPool2dParams,
) -> (Vec<T>, Vec<i64>) {
    let [n, c, h, w] = x_shape;
    assert_eq!(x.len(), n * c * h * w, "max_pool2d: input length");
    let (ho, wo) = pool2d_output_size(
        (h, w),
        p.kernel,
        p.stride,
        p.padding,
        p.dilation,
        p.ceil_mode,
    );
    let planes = n * c;
    let plane_out = ho * wo;
    let mut vals = crate::buffers::alloc_uninit::<T>(planes * plane_out);
    let mut idx = crate::buffers::alloc_uninit::<i64>(planes * plane_out);
    if plane_out == 0 || planes == 0 {
        return (vals, idx);
    }
    let (kh, kw) = p.kernel;
    let (sh, sw) = p.stride;
    let (dh, dw) = p.dilation;
    // The in-image taps of every window row and column, computed once.
    let rows: Vec<(i64, i64)> = (0..ho)
        .map(|oh| window((oh * sh) as i64 - p.padding.0 as i64, kh, dh, h))
        .collect();
    let cols: Vec<(i64, i64)> = (0..wo)
        .map(|ow| window((ow * sw) as i64 - p.padding.1 as i64, kw, dw, w))
        .collect();
    // The common 2x2 / stride 2 / no padding window, as straight-line code.
    let simple2 = p.kernel == (2, 2)
        && p.stride == (2, 2)
        && p.padding == (0, 0)
        && p.dilation == (1, 1)
        && 2 * ho <= h
        && 2 * wo <= w;
    let plane_fn = |xp: &[T], vo: &mut [T], io: &mut [i64]| {
        if simple2 {
            for oh in 0..ho {
                let r0 = 2 * oh * w;
                let r1 = r0 + w;
                let (a, b) = (&xp[r0..r0 + 2 * wo], &xp[r1..r1 + 2 * wo]);
                let vo = &mut vo[oh * wo..(oh + 1) * wo];
                let io = &mut io[oh * wo..(oh + 1) * wo];
                for ow in 0..wo {
                    // Scan order (row-major within the window) and the
                    // NaN rule are the general loop's.
                    let cands = [
                        (a[2 * ow], r0 + 2 * ow),
                        (a[2 * ow + 1], r0 + 2 * ow + 1),
                        (b[2 * ow], r1 + 2 * ow),
                        (b[2 * ow + 1], r1 + 2 * ow + 1),
                    ];
                    let mut best = T::neg_infinity();
                    let mut bi = r0 + 2 * ow;
                    for (v, i) in cands {
                        if v > best || v.is_nan() {
                            best = v;
                            bi = i;
                        }
                    }
                    vo[ow] = best;
                    io[ow] = bi as i64;
                }
            }
            return;
        }
        for (oh, &(h0, h1)) in rows.iter().enumerate() {
            for (ow, &(w0, w1)) in cols.iter().enumerate() {
                let mut best = T::neg_infinity();
                let mut bi = h0 * w as i64 + w0;
                let mut ih = h0;
                while ih < h1 {
                    let base = ih as usize * w;
                    let mut iw = w0;
                    while iw < w1 {
                        let v = xp[base + iw as usize];
                        if v > best || v.is_nan() {
                            best = v;
                            bi = (base + iw as usize) as i64;
                        }
                        iw += dw as i64;
                    }
                    ih += dh as i64;
                }
                vo[oh * wo + ow] = best;
                io[oh * wo + ow] = bi;
            }
        }
    };
    // Several planes per task, so tiny planes do not drown in scheduling.
    let per_task = (crate::PAR_THRESHOLD / (plane_out * kh * kw).max(1)).max(1);
    let chunk = per_task * plane_out;
    let task = |ci: usize, vo: &mut [T], io: &mut [i64]| {
        let first = ci * per_task;
        for (k, (v, i)) in vo
            .chunks_mut(plane_out)
            .zip(io.chunks_mut(plane_out))
            .enumerate()
        {
            let pi = first + k;
            plane_fn(&x[pi * h * w..][..h * w], v, i);
        }
    };
    if x.len() + vals.len() * kh * kw >= crate::PAR_THRESHOLD {
        // Static runs of whole tasks, one per thread (see `par`); the
        // indices follow the values' ranges.
        let pidx = crate::par::SendPtr::new(idx.as_mut_ptr());
        let parts = vals.len().div_ceil(chunk).min(crate::par::threads());
        crate::par::chunks_mut_in(&mut vals, parts, chunk, |start, vo| {
            // SAFETY: idx has vals' length; parts are disjoint ranges.
            let io = unsafe { std::slice::from_raw_parts_mut(pidx.get().add(start), vo.len()) };
            for (k, (v, i)) in vo.chunks_mut(chunk).zip(io.chunks_mut(chunk)).enumerate() {
                task(start / chunk + k, v, i);
            }
        });
    } else {
        task(0, &mut vals, &mut idx);
    }
    (vals, idx)
}

/// max_pool2d of x `[N, C, H, W]` into `out` (`[N, C, Ho, Wo]`, every
/// element overwritten), values only (no indices: inference), nothing
/// allocated. The values (NaN rule included) are `max_pool2d`'s.
pub fn max_pool2d_into<T: Float>(x: &[T], x_shape: [usize; 4], p: &MaxPool2dParams, out: &mut [T]) {
    let [n, c, h, w] = x_shape;
    assert_eq!(x.len(), n * c * h * w, "max_pool2d: input length");
    let (ho, wo) = pool2d_output_size(
        (h, w),
        p.kernel,
        p.stride,
        p.padding,
        p.dilation,
        p.ceil_mode,
    );
    let plane_out = ho * wo;
    assert_eq!(out.len(), n * c * plane_out, "max_pool2d: output length");
    if out.is_empty() {
        return;
    }
    let (kh, kw) = p.kernel;
    let (sh, sw) = p.stride;
    let (dh, dw) = p.dilation;
    let simple2 = p.kernel == (2, 2)
        && p.stride == (2, 2)
        && p.padding == (0, 0)
        && p.dilation == (1, 1)
        && 2 * ho <= h
        && 2 * wo <= w;
    let pick = |best: T, v: T| if v > best || v.is_nan() { v } else { best };
    let plane_fn = |xp: &[T], vo: &mut [T]| {
        if simple2 {
            #[cfg(target_arch = "x86_64")]
            if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
                && crate::simd::level() >= 3
            {
                // SAFETY: T is f32 (identity casts); AVX-512F detected.
                unsafe {
                    let xf = std::slice::from_raw_parts(xp.as_ptr() as *const f32, xp.len());
                    let of = std::slice::from_raw_parts_mut(vo.as_mut_ptr() as *mut f32, vo.len());
                    max_pool2x2_plane_avx512(xf, w, wo, of);
                }
                return;
            }
            crate::simd::dispatch!(max_pool2x2_plane(xp, w, wo, vo));
            return;
        }
        for (oh, vo) in vo.chunks_exact_mut(wo).enumerate() {
            let (h0, h1) = window((oh * sh) as i64 - p.padding.0 as i64, kh, dh, h);
            for (ow, o) in vo.iter_mut().enumerate() {
                let (w0, w1) = window((ow * sw) as i64 - p.padding.1 as i64, kw, dw, w);
                let mut best = T::neg_infinity();
                let mut ih = h0;
                while ih < h1 {
                    let base = ih as usize * w;
                    let mut iw = w0;
                    while iw < w1 {
                        best = pick(best, xp[base + iw as usize]);
                        iw += dw as i64;
                    }
                    ih += dh as i64;
                }
                *o = best;
            }
        }
    };
    // Several planes per task, so tiny planes do not drown in scheduling.
    let per_task = (crate::PAR_THRESHOLD / (plane_out * kh * kw).max(1)).max(1);
    let task = |(ci, vo): (usize, &mut [T])| {
        for (k, v) in vo.chunks_mut(plane_out).enumerate() {
            let pi = ci * per_task + k;
            plane_fn(&x[pi * h * w..][..h * w], v);
        }
    };
    if x.len() + out.len() * kh * kw >= crate::PAR_THRESHOLD {
        let chunk = per_task * plane_out;
        let parts = out.len().div_ceil(chunk).min(crate::par::threads());
        crate::par::chunks_mut_in(out, parts, chunk, |start, piece| {
            for (k, vo) in piece.chunks_mut(chunk).enumerate() {
                task((start / chunk + k, vo));
            }
        });
    } else {
        out.chunks_mut(per_task * plane_out)
            .enumerate()
            .for_each(task);
    }
}

/// One plane of a 2x2/stride-2 max pool (no padding): per output row, the
/// elementwise max of the two input rows, then of the column pairs, in
/// runs of 64 outputs so both steps are contiguous loops the compiler
/// vectorizes (inlined into `simd::dispatch!`'s copies). NaN propagates as
/// in PyTorch; of two equal values the first of the window is kept, as
/// PyTorch does, except that for -0.0 and 0.0 in different rows either
/// may come out. test_net's 16x28x28 planes: the scalar window loop took
/// 35% of the model's time.
#[inline(always)]
fn max_pool2x2_plane<T: Float>(xp: &[T], w: usize, wo: usize, vo: &mut [T]) {
    let pick = |best: T, v: T| if v > best || v.is_nan() { v } else { best };
    const RUN: usize = 64;
    let mut tmp = [T::zero(); 2 * RUN];
    for (oh, vo) in vo.chunks_exact_mut(wo).enumerate() {
        let r0 = 2 * oh * w;
        let (a, b) = (&xp[r0..r0 + 2 * wo], &xp[r0 + w..r0 + w + 2 * wo]);
        for (k, o) in vo.chunks_mut(RUN).enumerate() {
            let n = o.len();
            let t = &mut tmp[..2 * n];
            for ((t, &x), &y) in t.iter_mut().zip(&a[2 * k * RUN..]).zip(&b[2 * k * RUN..]) {
                *t = pick(x, y);
            }
            for (o, p) in o.iter_mut().zip(t.chunks_exact(2)) {
                *o = pick(p[0], p[1]);
            }
        }
    }
}

/// `max_pool2x2_plane` for f32 with AVX-512: per 16 outputs, the
/// NaN-propagating max of the two rows' 32 inputs, then of the even and
/// odd lanes (two permutes); masked loads and stores for the row tail.
/// test_net (16x28x28 planes, batch 256, one thread): the
/// compiler-vectorized loop took 17% of the forward.
///
/// Safety: AVX-512F; `xp` holds the plane (`2*wo <= w`, rows `2*ho`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn max_pool2x2_plane_avx512(xp: &[f32], w: usize, wo: usize, vo: &mut [f32]) {
    use std::arch::x86_64::*;
    // max(a, b) with a NaN in either operand giving a NaN (maxps returns
    // its second operand when either is NaN).
    #[inline(always)]
    unsafe fn nanmax(a: __m512, b: __m512) -> __m512 {
        let m = _mm512_max_ps(a, b);
        _mm512_mask_mov_ps(m, _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(a, a), a)
    }
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mask = |n: usize| -> u16 {
        if n >= 16 {
            u16::MAX
        } else {
            (1u16 << n) - 1
        }
    };
    let ho = vo.len() / wo.max(1);
    assert!(xp.len() >= 2 * ho * w && 2 * wo <= w);
    for oh in 0..ho {
        let a = xp.as_ptr().add(2 * oh * w);
        let b = a.add(w);
        let o = vo.as_mut_ptr().add(oh * wo);
        let mut k = 0;
        while k < wo {
            let n = (wo - k).min(16);
            let (m0, m1) = (mask(2 * n), mask((2 * n).saturating_sub(16)));
            let v0 = nanmax(
                _mm512_maskz_loadu_ps(m0, a.add(2 * k)),
                _mm512_maskz_loadu_ps(m0, b.add(2 * k)),
            );
            let v1 = nanmax(
                _mm512_maskz_loadu_ps(m1, a.add(2 * k + 16)),
                _mm512_maskz_loadu_ps(m1, b.add(2 * k + 16)),
            );
            let r = nanmax(
                _mm512_permutex2var_ps(v0, even, v1),
                _mm512_permutex2var_ps(v0, odd, v1),
            );
            _mm512_mask_storeu_ps(o.add(k), mask(n), r);
            k += 16;
        }
    }
}

/// Gradient of max_pool2d: scatter-adds grad_out `[N, C, Ho, Wo]` into a
/// zeroed `[N, C, H, W]` at `indices` (as returned by `max_pool2d`).
pub fn max_pool2d_backward<T: Float>(
    grad_out: &[T],
    indices: &[i64],
    x_shape: [usize; 4],
) -> Vec<T> {
    let [n, c, h, w] = x_shape;
    let planes = n * c;
    assert_eq!(
        grad_out.len(),
        indices.len(),
        "max_pool2d_backward: indices length"
    );
    let mut gi = crate::buffers::alloc_zeroed::<T>(planes * h * w);
    if planes == 0 {
        return gi;
    }
    assert_eq!(
        grad_out.len() % planes,
        0,
        "max_pool2d_backward: grad_out length"
    );
    let po = grad_out.len() / planes;
    per_plane(&mut gi, h * w, grad_out.len() + h * w * planes, |pi, g| {
        for (&go, &idx) in grad_out[pi * po..][..po]
            .iter()
            .zip(&indices[pi * po..][..po])
        {
            g[idx as usize] += go;
        }
    });
    gi
}

/// The clipped window of output `(oh, ow)` of an avg pool and its divisor,
/// or `None` if the window lies entirely in the padding.
#[inline]
fn avg_window(
    oh: usize,
    ow: usize,
    h: usize,
    w: usize,
    p: &AvgPool2dParams,
) -> Option<(usize, usize, usize, usize, usize)> {
    let (kh, kw) = p.kernel;
    let ih0 = (oh * p.stride.0) as i64 - p.padding.0 as i64;
    let iw0 = (ow * p.stride.1) as i64 - p.padding.1 as i64;
    let ih1 = (ih0 + kh as i64).min((h + p.padding.0) as i64);
    let iw1 = (iw0 + kw as i64).min((w + p.padding.1) as i64);
    let pool_size = (ih1 - ih0) * (iw1 - iw0);
    let (ih0, iw0) = (ih0.max(0), iw0.max(0));
    let (ih1, iw1) = (ih1.min(h as i64), iw1.min(w as i64));
    if ih0 >= ih1 || iw0 >= iw1 {
        return None;
    }
    let div = match p.divisor_override {
        Some(d) => d as i64,
        None if p.count_include_pad => pool_size,
        None => (ih1 - ih0) * (iw1 - iw0),
    };
    Some((
        ih0 as usize,
        ih1 as usize,
        iw0 as usize,
        iw1 as usize,
        div as usize,
    ))
}

/// avg_pool2d of x `[N, C, H, W]` -> `[N, C, Ho, Wo]` (PyTorch semantics
/// for padding, ceil_mode, count_include_pad and divisor_override).
pub fn avg_pool2d<T: Float>(x: &[T], x_shape: [usize; 4], p: &AvgPool2dParams) -> Vec<T> {
    let [n, c, h, w] = x_shape;
    let (ho, wo) = pool2d_output_size((h, w), p.kernel, p.stride, p.padding, (1, 1), p.ceil_mode);
    // Every element is written by `avg_pool2d_into`.
    let mut out = crate::buffers::alloc_uninit::<T>(n * c * ho * wo);
    avg_pool2d_into(x, x_shape, p, &mut out);
    out
}

/// avg_pool2d into `out` (`[N, C, Ho, Wo]`, every element overwritten),
/// nothing allocated.
pub fn avg_pool2d_into<T: Float>(x: &[T], x_shape: [usize; 4], p: &AvgPool2dParams, out: &mut [T]) {
    let [n, c, h, w] = x_shape;
    assert_eq!(x.len(), n * c * h * w, "avg_pool2d: input length");
    if let Some(d) = p.divisor_override {
        assert!(d > 0, "avg_pool2d: divisor must be non-zero");
    }
    let (ho, wo) = pool2d_output_size((h, w), p.kernel, p.stride, p.padding, (1, 1), p.ceil_mode);
    assert_eq!(out.len(), n * c * ho * wo, "avg_pool2d: output length");
    per_plane(
        out,
        ho * wo,
        x.len() + n * c * ho * wo * p.kernel.0 * p.kernel.1,
        |pi, o| {
            let xp = &x[pi * h * w..][..h * w];
            for oh in 0..ho {
                for ow in 0..wo {
                    o[oh * wo + ow] = match avg_window(oh, ow, h, w, p) {
                        None => T::zero(),
                        Some((h0, h1, w0, w1, div)) => {
                            let mut s = T::zero();
                            for ih in h0..h1 {
                                for &v in &xp[ih * w + w0..ih * w + w1] {
                                    s += v;
                                }
                            }
                            s / T::from_f64(div as f64)
                        }
                    };
                }
            }
        },
    );
}

/// Gradient of avg_pool2d: each grad_out element divided by its window's
/// divisor and added to every input in the (clipped) window.
pub fn avg_pool2d_backward<T: Float>(
    grad_out: &[T],
    x_shape: [usize; 4],
    p: &AvgPool2dParams,
) -> Vec<T> {
    let [n, c, h, w] = x_shape;
    let (ho, wo) = pool2d_output_size((h, w), p.kernel, p.stride, p.padding, (1, 1), p.ceil_mode);
    assert_eq!(
        grad_out.len(),
        n * c * ho * wo,
        "avg_pool2d_backward: grad_out length"
    );
    let mut gi = vec![T::zero(); n * c * h * w];
    per_plane(
        &mut gi,
        h * w,
        grad_out.len() * p.kernel.0 * p.kernel.1 + n * c * h * w,
        |pi, g| {
            let gp = &grad_out[pi * ho * wo..][..ho * wo];
            for oh in 0..ho {
                for ow in 0..wo {
                    if let Some((h0, h1, w0, w1, div)) = avg_window(oh, ow, h, w, p) {
                        let v = gp[oh * wo + ow] / T::from_f64(div as f64);
                        for ih in h0..h1 {
                            for d in &mut g[ih * w + w0..ih * w + w1] {
                                *d += v;
                            }
                        }
                    }
                }
            }
        },
    );
    gi
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{assert_close, rand_vec};

    /// Naive max pool on the explicitly -inf-padded plane.
    fn naive_max(x: &[f64], xs: [usize; 4], p: &MaxPool2dParams) -> (Vec<f64>, Vec<i64>) {
        let [n, c, h, w] = xs;
        let (ho, wo) = pool2d_output_size(
            (h, w),
            p.kernel,
            p.stride,
            p.padding,
            p.dilation,
            p.ceil_mode,
        );
        let mut out = vec![];
        let mut idx = vec![];
        for pi in 0..n * c {
            for oh in 0..ho {
                for ow in 0..wo {
                    let mut best = f64::NEG_INFINITY;
                    let mut bi = -1i64;
                    for i in 0..p.kernel.0 {
                        for j in 0..p.kernel.1 {
                            let ih =
                                (oh * p.stride.0 + i * p.dilation.0) as i64 - p.padding.0 as i64;
                            let iw =
                                (ow * p.stride.1 + j * p.dilation.1) as i64 - p.padding.1 as i64;
                            if ih < 0 || iw < 0 || ih >= h as i64 || iw >= w as i64 {
                                continue;
                            }
                            let v = x[pi * h * w + (ih as usize) * w + iw as usize];
                            if v > best || bi < 0 {
                                best = v;
                                bi = ih * w as i64 + iw;
                            }
                        }
                    }
                    out.push(best);
                    idx.push(bi);
                }
            }
        }
        (out, idx)
    }

    fn naive_avg(x: &[f64], xs: [usize; 4], p: &AvgPool2dParams) -> Vec<f64> {
        let [n, c, h, w] = xs;
        let (ho, wo) =
            pool2d_output_size((h, w), p.kernel, p.stride, p.padding, (1, 1), p.ceil_mode);
        let mut out = vec![];
        for pi in 0..n * c {
            for oh in 0..ho {
                for ow in 0..wo {
                    let (mut s, mut cnt_in, mut cnt_pad) = (0.0, 0usize, 0usize);
                    for i in 0..p.kernel.0 {
                        for j in 0..p.kernel.1 {
                            let ih = (oh * p.stride.0 + i) as i64 - p.padding.0 as i64;
                            let iw = (ow * p.stride.1 + j) as i64 - p.padding.1 as i64;
                            // Positions past the padded edge (ceil_mode) count nowhere.
                            if ih >= (h + p.padding.0) as i64 || iw >= (w + p.padding.1) as i64 {
                                continue;
                            }
                            cnt_pad += 1;
                            if ih < 0 || iw < 0 || ih >= h as i64 || iw >= w as i64 {
                                continue;
                            }
                            cnt_in += 1;
                            s += x[pi * h * w + (ih as usize) * w + iw as usize];
                        }
                    }
                    let div = p.divisor_override.unwrap_or(if p.count_include_pad {
                        cnt_pad
                    } else {
                        cnt_in
                    });
                    out.push(if cnt_in == 0 { 0.0 } else { s / div as f64 });
                }
            }
        }
        out
    }

    fn mp(
        k: (usize, usize),
        s: (usize, usize),
        pd: (usize, usize),
        d: (usize, usize),
        ceil: bool,
    ) -> MaxPool2dParams {
        MaxPool2dParams {
            kernel: k,
            stride: s,
            padding: pd,
            dilation: d,
            ceil_mode: ceil,
        }
    }

    #[test]
    fn output_size_ceil_mode() {
        // PyTorch: MaxPool2d(2, 2, ceil_mode=True) on 5 -> 3; floor -> 2.
        assert_eq!(
            pool2d_output_size((5, 5), (2, 2), (2, 2), (0, 0), (1, 1), true),
            (3, 3)
        );
        assert_eq!(
            pool2d_output_size((5, 5), (2, 2), (2, 2), (0, 0), (1, 1), false),
            (2, 2)
        );
        // The last window must start inside the image (or left padding):
        // k=3, s=2, p=1, in=6, ceil: (6+2-3+1)/2+1 = 4, (4-1)*2=6 >= 6+1? no -> 4.
        assert_eq!(
            pool2d_output_size((6, 6), (3, 3), (2, 2), (1, 1), (1, 1), true),
            (4, 4)
        );
        // k=2, s=2, p=1, in=4, ceil: (4+2-2+1)/2+1 = 3 ... (3-1)*2 = 4 >= 5? no -> 3.
        assert_eq!(
            pool2d_output_size((4, 4), (2, 2), (2, 2), (1, 1), (1, 1), true),
            (3, 3)
        );
        // k=3, s=3, p=0, in=7, ceil: (7-3+2)/3+1 = 3; (3-1)*3 = 6 >= 7? no -> 3.
        assert_eq!(
            pool2d_output_size((7, 7), (3, 3), (3, 3), (0, 0), (1, 1), true),
            (3, 3)
        );
        // k=1, s=2, in=4, ceil: (4-1+1)/2+1 = 3; (3-1)*2 = 4 >= 4 -> 2.
        assert_eq!(
            pool2d_output_size((4, 4), (1, 1), (2, 2), (0, 0), (1, 1), true),
            (2, 2)
        );
    }

    fn check_max<T: Float>(tol: f64) {
        let cases = [
            ([2, 3, 8, 8], mp((2, 2), (2, 2), (0, 0), (1, 1), false)),
            ([1, 2, 7, 9], mp((3, 3), (2, 2), (1, 1), (1, 1), true)),
            ([2, 2, 9, 8], mp((3, 2), (2, 1), (1, 1), (2, 2), false)),
            ([1, 1, 5, 5], mp((2, 2), (2, 2), (1, 1), (1, 1), true)),
            ([3, 4, 11, 10], mp((3, 3), (3, 2), (1, 0), (1, 3), true)),
            ([8, 16, 28, 28], mp((2, 2), (2, 2), (0, 0), (1, 1), false)),
        ];
        for (ci, (xs, p)) in cases.into_iter().enumerate() {
            let x: Vec<f64> = rand_vec(xs.iter().product(), ci as u64 + 11);
            let xt: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
            let (want, want_i) = naive_max(&x, xs, &p);
            let (got, got_i) = max_pool2d(&xt, xs, &p);
            assert_close(&got, &want, tol, &format!("max_pool2d case {ci}"));
            assert_eq!(got_i, want_i, "max_pool2d indices case {ci}");
            let go: Vec<f64> = rand_vec(want.len(), ci as u64 + 12);
            let got_t: Vec<T> = go.iter().map(|&v| T::from_f64(v)).collect();
            let gi = max_pool2d_backward(&got_t, &got_i, xs);
            let (ho, wo) = pool2d_output_size(
                (xs[2], xs[3]),
                p.kernel,
                p.stride,
                p.padding,
                p.dilation,
                p.ceil_mode,
            );
            let plane = xs[2] * xs[3];
            let mut want_gi = vec![0.0; x.len()];
            for (k, (&g, &i)) in go.iter().zip(&want_i).enumerate() {
                want_gi[(k / (ho * wo)) * plane + i as usize] += g;
            }
            assert_close(
                &gi,
                &want_gi,
                tol,
                &format!("max_pool2d_backward case {ci}"),
            );
        }
    }

    #[test]
    fn max_pool_matches_naive() {
        check_max::<f64>(1e-12);
        check_max::<f32>(1e-6);
    }

    #[test]
    fn max_pool_nan_and_ties() {
        // Ties keep the first; NaN wins.
        let x = [1.0f32, 1.0, 0.0, f32::NAN];
        let p = mp((2, 2), (2, 2), (0, 0), (1, 1), false);
        let (o, i) = max_pool2d(&x[..], [1, 1, 2, 2], &p);
        assert!(o[0].is_nan());
        assert_eq!(i, vec![3]);
        let (o, i) = max_pool2d(&[1.0f32, 1.0, 0.0, 1.0], [1, 1, 2, 2], &p);
        assert_eq!((o, i), (vec![1.0], vec![0]));
    }

    /// The 2x2/stride-2 fast paths (`max_pool2d_into`, f32 AVX-512 or
    /// the dispatched loop; f64 the loop) against a plain window max:
    /// odd widths and heights, rows of more than 16 outputs, NaNs.
    #[test]
    fn max_pool_2x2_fast_path_matches_window_max() {
        let p = mp((2, 2), (2, 2), (0, 0), (1, 1), false);
        for (k, &(n, c, h, w)) in [(2, 3, 28, 28), (1, 2, 7, 9), (1, 1, 70, 67), (3, 2, 2, 33)]
            .iter()
            .enumerate()
        {
            let mut x: Vec<f32> = rand_vec(n * c * h * w, 40 + k as u64);
            for i in (k..x.len()).step_by(37) {
                x[i] = f32::NAN;
            }
            let (ho, wo) = (h / 2, w / 2);
            let mut got = vec![0.0f32; n * c * ho * wo];
            max_pool2d_into(&x, [n, c, h, w], &p, &mut got);
            let got64 = {
                let x64: Vec<f64> = x.iter().map(|&v| v as f64).collect();
                let mut o = vec![0.0f64; got.len()];
                max_pool2d_into(&x64, [n, c, h, w], &p, &mut o);
                o
            };
            for pl in 0..n * c {
                for oh in 0..ho {
                    for ow in 0..wo {
                        let at = |i: usize, j: usize| x[pl * h * w + (2 * oh + i) * w + 2 * ow + j];
                        let win = [at(0, 0), at(0, 1), at(1, 0), at(1, 1)];
                        let want = if win.iter().any(|v| v.is_nan()) {
                            f32::NAN
                        } else {
                            win.iter().copied().fold(f32::NEG_INFINITY, f32::max)
                        };
                        let i = (pl * ho + oh) * wo + ow;
                        for (g, what) in [(got[i], "f32"), (got64[i] as f32, "f64")] {
                            assert!(
                                g.to_bits() == want.to_bits() || (g.is_nan() && want.is_nan()),
                                "case {k} {what} plane {pl} ({oh}, {ow}): {g} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    fn check_avg<T: Float>(tol: f64) {
        let ap = |k, s, pd, ceil, cip, div| AvgPool2dParams {
            kernel: k,
            stride: s,
            padding: pd,
            ceil_mode: ceil,
            count_include_pad: cip,
            divisor_override: div,
        };
        let cases = [
            ([2, 3, 8, 8], ap((2, 2), (2, 2), (0, 0), false, true, None)),
            ([1, 2, 7, 9], ap((3, 3), (2, 2), (1, 1), true, true, None)),
            ([1, 2, 7, 9], ap((3, 3), (2, 2), (1, 1), true, false, None)),
            (
                [2, 2, 6, 5],
                ap((3, 2), (2, 1), (1, 1), false, false, Some(5)),
            ),
            ([1, 1, 5, 5], ap((2, 2), (2, 2), (1, 1), true, true, None)),
            ([2, 2, 5, 4], ap((4, 4), (3, 3), (2, 2), true, false, None)),
            (
                [8, 16, 20, 20],
                ap((3, 3), (1, 1), (1, 1), false, true, None),
            ),
        ];
        for (ci, (xs, p)) in cases.into_iter().enumerate() {
            let x: Vec<f64> = rand_vec(xs.iter().product(), ci as u64 + 21);
            let xt: Vec<T> = x.iter().map(|&v| T::from_f64(v)).collect();
            let want = naive_avg(&x, xs, &p);
            let got = avg_pool2d(&xt, xs, &p);
            assert_close(&got, &want, tol, &format!("avg_pool2d case {ci}"));
            // Backward via the adjoint identity <go, A x> = <A^T go, x>,
            // and the column sums of A (backward of ones) by unit probes.
            let go: Vec<f64> = rand_vec(want.len(), ci as u64 + 22);
            let got_t: Vec<T> = go.iter().map(|&v| T::from_f64(v)).collect();
            let gi = avg_pool2d_backward(&got_t, xs, &p);
            let lhs: f64 = go.iter().zip(&want).map(|(a, b)| a * b).sum();
            let rhs: f64 = gi.iter().zip(&x).map(|(a, b)| a.as_f64() * b).sum();
            assert!(
                (lhs - rhs).abs() < tol * 100.0,
                "avg_pool2d_backward adjoint case {ci}: {lhs} vs {rhs}"
            );
            if x.len() < 200 {
                for k in 0..x.len() {
                    let mut e = vec![0.0; x.len()];
                    e[k] = 1.0;
                    let col = naive_avg(&e, xs, &p);
                    let want_k: f64 = col.iter().zip(&go).map(|(a, b)| a * b).sum();
                    assert!(
                        (gi[k].as_f64() - want_k).abs() < tol * 10.0,
                        "avg bwd case {ci} elem {k}"
                    );
                }
            }
        }
    }

    #[test]
    fn avg_pool_matches_naive() {
        check_avg::<f64>(1e-12);
        check_avg::<f32>(1e-5);
    }
}

#[cfg(test)]
mod fast_path_tests {
    use super::*;

    /// The 2x2/stride-2 fast path against a direct loop, with ties, a NaN
    /// and an odd input size (the last row/column are not covered).
    #[test]
    fn two_by_two_matches_direct_loop() {
        let (n, c, h, w) = (2, 3, 7, 9);
        let mut x: Vec<f32> = (0..n * c * h * w)
            .map(|i| ((i * 37) % 11) as f32 - 5.0)
            .collect();
        x[20] = f32::NAN;
        let p = MaxPool2dParams {
            kernel: (2, 2),
            stride: (2, 2),
            padding: (0, 0),
            dilation: (1, 1),
            ceil_mode: false,
        };
        let (v, idx) = max_pool2d(&x, [n, c, h, w], &p);
        let (ho, wo) = (3, 4);
        for pl in 0..n * c {
            let xp = &x[pl * h * w..][..h * w];
            for oh in 0..ho {
                for ow in 0..wo {
                    let mut best = f32::NEG_INFINITY;
                    let mut bi = 2 * oh * w + 2 * ow;
                    for dh in 0..2 {
                        for dw in 0..2 {
                            let i = (2 * oh + dh) * w + 2 * ow + dw;
                            if xp[i] > best || xp[i].is_nan() {
                                best = xp[i];
                                bi = i;
                            }
                        }
                    }
                    let o = pl * ho * wo + oh * wo + ow;
                    assert!(v[o] == best || (v[o].is_nan() && best.is_nan()));
                    assert_eq!(idx[o], bi as i64);
                }
            }
        }
    }
}

#[cfg(test)]
mod into_tests {
    use super::*;
    use crate::matmul::tests::rand_vec;

    /// The `_into` forms write exactly what the Vec-returning kernels
    /// return, NaN rule included, over stale output contents.
    #[test]
    fn pool_into_matches_pool() {
        let shapes = [[2, 3, 8, 9], [8, 32, 26, 26], [1, 2, 7, 5]];
        for (si, &xs) in shapes.iter().enumerate() {
            let mut x: Vec<f32> = rand_vec(xs.iter().product(), si as u64);
            x[3] = f32::NAN;
            for &(k, s, pd, d, ceil) in &[
                ((2, 2), (2, 2), (0, 0), (1, 1), false),
                ((3, 2), (2, 1), (1, 1), (1, 1), true),
                ((2, 2), (1, 2), (0, 1), (2, 1), false),
            ] {
                let mp = MaxPool2dParams {
                    kernel: k,
                    stride: s,
                    padding: pd,
                    dilation: d,
                    ceil_mode: ceil,
                };
                let (want, _) = max_pool2d(&x, xs, &mp);
                let mut got = vec![1.5f32; want.len()];
                max_pool2d_into(&x, xs, &mp, &mut got);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "max {xs:?} {mp:?}"
                );
                let ap = AvgPool2dParams {
                    kernel: k,
                    stride: s,
                    padding: pd,
                    ceil_mode: ceil,
                    count_include_pad: d.0 == 1,
                    divisor_override: None,
                };
                let want = avg_pool2d(&x, xs, &ap);
                let mut got = vec![1.5f32; want.len()];
                avg_pool2d_into(&x, xs, &ap, &mut got);
                assert_eq!(
                    got.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    want.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    "avg {xs:?} {ap:?}"
                );
            }
        }
    }
}
