//! Vectorizable f32 math for the hot elementwise ops: exp, sigmoid, tanh,
//! erf, gelu (exact and tanh forms), as branch-free polynomial code that
//! LLVM turns into SIMD. Loops are compiled three times (AVX-512, AVX2+FMA,
//! baseline SSE2) and the widest the CPU supports is chosen at run time, so
//! one binary runs on every x86-64 machine.
//!
//! Error bounds (measured against f64 libm over [-20, 20] and at the
//! extremes in the tests below): exp, sigmoid, tanh within 3 ulp relative
//! (tanh within 2e-7 absolute near 0 where it uses its odd polynomial);
//! erf within 2e-7 absolute; gelu within 2e-7 * max(1, |x|) absolute.
//! NaN propagates; exp saturates to +inf above 88.72 and to 0 below -103.9.

const LOG2E: f32 = std::f32::consts::LOG2_E;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
/// 1.5 * 2^23: adding and subtracting it rounds to the nearest integer.
const ROUND_MAGIC: f32 = 12_582_912.0;

/// `a * b + c`: one fused multiply-add in the SIMD bodies (`F`, compiled
/// where the CPU has FMA: half the instructions of the polynomials, and
/// one rounding instead of two), two operations otherwise.
#[inline(always)]
fn fma<const F: bool>(a: f32, b: f32, c: f32) -> f32 {
    if F {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// e^x (Cephes' expf polynomial with a split 2^n so the full range is exact).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    exp_f::<false>(x)
}

#[inline(always)]
fn exp_f<const F: bool>(x: f32) -> f32 {
    let x = x.clamp(-104.0, 88.73); // NaN stays NaN
    let y = fma::<F>(x, LOG2E, ROUND_MAGIC);
    let n = y - ROUND_MAGIC;
    // n is an integer held in y's low mantissa bits: read it without a
    // float-to-int conversion (which would not vectorize).
    let ni = (y.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let r = if F {
        fma::<F>(-n, LN2_LO, fma::<F>(-n, LN2_HI, x))
    } else {
        x - n * LN2_HI - n * LN2_LO
    };
    let mut p = 1.987_569_1e-4f32;
    p = fma::<F>(p, r, 1.398_2e-3);
    p = fma::<F>(p, r, 8.333_452e-3);
    p = fma::<F>(p, r, 4.166_579_6e-2);
    p = fma::<F>(p, r, 1.666_666_5e-1);
    p = fma::<F>(p, r, 0.5);
    let e = if F {
        fma::<F>(p, r * r, r) + 1.0
    } else {
        p * r * r + r + 1.0
    };
    let n1 = ni >> 1;
    let n2 = ni - n1;
    let s1 = f32::from_bits(((n1 + 127) as u32) << 23);
    let s2 = f32::from_bits(((n2 + 127) as u32) << 23);
    e * s1 * s2
}

#[inline(always)]
pub fn sigmoid(x: f32) -> f32 {
    sigmoid_f::<false>(x)
}

#[inline(always)]
fn sigmoid_f<const F: bool>(x: f32) -> f32 {
    1.0 / (1.0 + exp_f::<F>(-x))
}

/// tanh: an odd polynomial for |x| < 0.625 (no cancellation near 0), else
/// 1 - 2/(e^{2|x|} + 1) with the sign restored.
#[inline(always)]
pub fn tanh(x: f32) -> f32 {
    tanh_f::<false>(x)
}

#[inline(always)]
fn tanh_f<const F: bool>(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    let mut p = -5.704_988_7e-3f32;
    p = fma::<F>(p, z, 2.063_909e-2);
    p = fma::<F>(p, z, -5.373_971_6e-2);
    p = fma::<F>(p, z, 1.333_144_2e-1);
    p = fma::<F>(p, z, -0.333_332_8);
    let small = if F {
        fma::<F>(p * z, x, x)
    } else {
        p * z * x + x
    };
    let big = 1.0 - 2.0 / (exp_f::<F>(2.0 * a) + 1.0);
    let big = if x < 0.0 { -big } else { big };
    if a < 0.625 {
        small
    } else {
        big
    }
}

/// erf: a Taylor polynomial for |x| < 0.5, 1 - erfc(|x|) beyond (sign
/// restored).
#[inline(always)]
pub fn erf(x: f32) -> f32 {
    erf_f::<false>(x)
}

#[inline(always)]
fn erf_f<const F: bool>(x: f32) -> f32 {
    let a = x.abs();
    let z = x * x;
    // 2/sqrt(pi) * (x - x^3/3 + x^5/10 - x^7/42 + x^9/216 - x^11/1320)
    let mut p = -1.0f32 / 1320.0;
    p = fma::<F>(p, z, 1.0 / 216.0);
    p = fma::<F>(p, z, -1.0 / 42.0);
    p = fma::<F>(p, z, 1.0 / 10.0);
    p = fma::<F>(p, z, -1.0 / 3.0);
    let small = if F {
        fma::<F>(p * z, x, x) * std::f32::consts::FRAC_2_SQRT_PI
    } else {
        (p * z * x + x) * std::f32::consts::FRAC_2_SQRT_PI
    };
    // erfc(|x|) by Numerical Recipes' Chebyshev fit (relative error < 1.2e-7).
    let t = 1.0 / fma::<F>(0.5, a, 1.0);
    let mut q = 0.170_872_77f32;
    q = fma::<F>(q, t, -0.822_152_23);
    q = fma::<F>(q, t, 1.488_515_9);
    q = fma::<F>(q, t, -1.135_204);
    q = fma::<F>(q, t, 0.278_868_07);
    q = fma::<F>(q, t, -0.186_288_06);
    q = fma::<F>(q, t, 0.096_784_18);
    q = fma::<F>(q, t, 0.374_091_96);
    q = fma::<F>(q, t, 1.000_023_7);
    q = fma::<F>(q, t, -1.265_512_2);
    let big = 1.0 - t * exp_f::<F>(q - z);
    let big = if x < 0.0 { -big } else { big };
    if a < 0.5 {
        small
    } else {
        big
    }
}

#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    gelu_f::<false>(x)
}

#[inline(always)]
fn gelu_f<const F: bool>(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_f::<F>(x * std::f32::consts::FRAC_1_SQRT_2))
}

#[inline(always)]
pub fn gelu_tanh(x: f32) -> f32 {
    gelu_tanh_f::<false>(x)
}

#[inline(always)]
fn gelu_tanh_f<const F: bool>(x: f32) -> f32 {
    let inner = 0.797_884_6 * fma::<F>(0.044_715 * x * x, x, x);
    0.5 * x * (1.0 + tanh_f::<F>(inner))
}

/// Which f32 functions this module vectorizes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FastFn {
    Exp,
    Sigmoid,
    Tanh,
    Erf,
    Gelu,
    GeluTanh,
}

#[inline(always)]
fn body<const F: bool>(f: FastFn, x: &[f32], out: &mut [f32]) {
    macro_rules! go {
        ($g:path) => {
            for (o, &v) in out.iter_mut().zip(x) {
                *o = $g(v);
            }
        };
    }
    match f {
        FastFn::Exp => go!(exp_f::<F>),
        FastFn::Sigmoid => go!(sigmoid_f::<F>),
        FastFn::Tanh => go!(tanh_f::<F>),
        FastFn::Erf => go!(erf_f::<F>),
        FastFn::Gelu => go!(gelu_f::<F>),
        FastFn::GeluTanh => go!(gelu_tanh_f::<F>),
    }
}

#[inline(always)]
fn body_inplace<const F: bool>(f: FastFn, x: &mut [f32]) {
    macro_rules! go {
        ($g:path) => {
            for v in x.iter_mut() {
                *v = $g(*v);
            }
        };
    }
    match f {
        FastFn::Exp => go!(exp_f::<F>),
        FastFn::Sigmoid => go!(sigmoid_f::<F>),
        FastFn::Tanh => go!(tanh_f::<F>),
        FastFn::Erf => go!(erf_f::<F>),
        FastFn::Gelu => go!(gelu_f::<F>),
        FastFn::GeluTanh => go!(gelu_tanh_f::<F>),
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn inplace_avx512(f: FastFn, x: &mut [f32]) {
    body_inplace::<true>(f, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn inplace_avx2(f: FastFn, x: &mut [f32]) {
    body_inplace::<true>(f, x)
}

/// `f` applied in place to a slice, on the calling thread, with the widest
/// SIMD the CPU has (for kernels that already run inside a rayon task).
pub fn apply_inplace(f: FastFn, x: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { inplace_avx512(f, x) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { inplace_avx2(f, x) };
        }
    }
    body_inplace::<false>(f, x)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
unsafe fn body_avx512(f: FastFn, x: &[f32], out: &mut [f32]) {
    body::<true>(f, x, out)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn body_avx2(f: FastFn, x: &[f32], out: &mut [f32]) {
    body::<true>(f, x, out)
}

/// Runs `f` over a chunk with the widest SIMD the CPU has.
fn dispatch(f: FastFn, x: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU supports AVX-512F (checked just above).
            return unsafe { body_avx512(f, x, out) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: the CPU supports AVX2 and FMA (checked just above).
            return unsafe { body_avx2(f, x, out) };
        }
    }
    body::<false>(f, x, out)
}

/// `f` over a contiguous slice, split across rayon threads when large.
pub fn map(f: FastFn, x: &[f32]) -> Vec<f32> {
    let mut out = crate::buffers::alloc_uninit::<f32>(x.len());
    map_into(f, x, &mut out);
    out
}

/// `f` over `x` into `out` (same length).
pub fn map_into(f: FastFn, x: &[f32], out: &mut [f32]) {
    assert_eq!(x.len(), out.len(), "fastmath::map_into: lengths");
    crate::par::chunks_mut(out, crate::PAR_THRESHOLD / 2, 16, |s, o| {
        dispatch(f, &x[s..s + o.len()], o)
    });
}

/// A tile routine for JIT-compiled code: `f` over `n` f32 read from `src`
/// and written to `dst` (the two must not overlap), C ABI, on the calling
/// thread. Cranelift's x86-64 backend emits 128-bit vectors only; its
/// kernels call these AVX-512 / AVX2 loops on L1-resident tiles for the
/// transcendental ops (and sqrt) instead of inlining them four lanes at a
/// time. Their polynomials use fused multiply-adds (these builds target FMA
/// hardware): the same formulas with fewer roundings, within the bounds
/// above (tested on the JIT's tiled kernels in kiln-cranelift).
pub type TileFn = unsafe extern "C" fn(src: *const f32, dst: *mut f32, n: usize);

macro_rules! tile_entries {
    ($($f:ident => $a512:ident, $a2:ident;)*) => {$(
        /// # Safety
        /// AVX-512F present; `src` readable and `dst` writable for `n`
        /// f32, not overlapping.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,fma")]
        unsafe extern "C" fn $a512(src: *const f32, dst: *mut f32, n: usize) {
            // SAFETY: the caller's contract.
            let (x, o) = unsafe {
                (std::slice::from_raw_parts(src, n), std::slice::from_raw_parts_mut(dst, n))
            };
            for (o, &v) in o.iter_mut().zip(x) {
                *o = $f::<true>(v);
            }
        }
        /// # Safety
        /// AVX2 and FMA present; `src` readable and `dst` writable for `n`
        /// f32, not overlapping.
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe extern "C" fn $a2(src: *const f32, dst: *mut f32, n: usize) {
            // SAFETY: the caller's contract.
            let (x, o) = unsafe {
                (std::slice::from_raw_parts(src, n), std::slice::from_raw_parts_mut(dst, n))
            };
            for (o, &v) in o.iter_mut().zip(x) {
                *o = $f::<true>(v);
            }
        }
    )*};
}

tile_entries! {
    exp_f => exp_tile_avx512, exp_tile_avx2;
    sigmoid_f => sigmoid_tile_avx512, sigmoid_tile_avx2;
    tanh_f => tanh_tile_avx512, tanh_tile_avx2;
    erf_f => erf_tile_avx512, erf_tile_avx2;
    gelu_f => gelu_tile_avx512, gelu_tile_avx2;
    gelu_tanh_f => gelu_tanh_tile_avx512, gelu_tanh_tile_avx2;
    sqrt_f => sqrt_tile_avx512, sqrt_tile_avx2;
}

/// sqrt (IEEE, exactly rounded): as a tile routine for its 16-lane form.
#[inline(always)]
fn sqrt_f<const F: bool>(x: f32) -> f32 {
    x.sqrt()
}

/// The widest tile routine for `f` this CPU runs (AVX-512F, else AVX2 with
/// FMA), or `None` where neither exists (JIT code then inlines the
/// polynomial on 4 lanes, which is as fast as a baseline SSE loop).
pub fn tile_fn(f: FastFn) -> Option<TileFn> {
    #[cfg(target_arch = "x86_64")]
    {
        let wide = if std::arch::is_x86_feature_detected!("avx512f") {
            true
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            false
        } else {
            return None;
        };
        let pick = |a: TileFn, b: TileFn| Some(if wide { a } else { b });
        match f {
            FastFn::Exp => pick(exp_tile_avx512, exp_tile_avx2),
            FastFn::Sigmoid => pick(sigmoid_tile_avx512, sigmoid_tile_avx2),
            FastFn::Tanh => pick(tanh_tile_avx512, tanh_tile_avx2),
            FastFn::Erf => pick(erf_tile_avx512, erf_tile_avx2),
            FastFn::Gelu => pick(gelu_tile_avx512, gelu_tile_avx2),
            FastFn::GeluTanh => pick(gelu_tanh_tile_avx512, gelu_tanh_tile_avx2),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = f;
        None
    }
}

/// The widest sqrt tile routine this CPU runs (see [`tile_fn`]).
pub fn sqrt_tile_fn() -> Option<TileFn> {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            Some(sqrt_tile_avx512)
        } else if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
        {
            Some(sqrt_tile_avx2)
        } else {
            None
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ulps(a: f32, b: f64) -> f64 {
        let b32 = b as f32;
        if b32 == 0.0 {
            return (a as f64 - b).abs() / f32::MIN_POSITIVE as f64;
        }
        ((a as f64 - b) / (b32.abs() as f64 * f32::EPSILON as f64)).abs()
    }

    fn grid() -> Vec<f32> {
        let mut v: Vec<f32> = (-400_000..=400_000).map(|i| i as f32 * 5e-5).collect();
        v.extend([1e-6, -1e-6, 1e-30, 0.0, -0.0, 50.0, -50.0, 88.0, -87.0]);
        v
    }

    #[test]
    fn tile_routines_equal_the_scalar_functions() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.037).collect();
        let fs = [
            (FastFn::Exp, exp as fn(f32) -> f32),
            (FastFn::Sigmoid, sigmoid),
            (FastFn::Tanh, tanh),
            (FastFn::Erf, erf),
            (FastFn::Gelu, gelu),
            (FastFn::GeluTanh, gelu_tanh),
        ];
        for (f, g) in fs {
            let Some(t) = tile_fn(f) else { return };
            let mut out = vec![f32::NAN; x.len() + 1];
            // SAFETY: tile_fn returned a routine this CPU runs; lengths hold.
            unsafe { t(x.as_ptr(), out.as_mut_ptr(), x.len() - 3) };
            // Fused multiply-adds only remove roundings: a few ulp from the
            // plain build (the bounds themselves are tested on the JIT's
            // tiled kernels against f64).
            for (i, (&o, &v)) in out.iter().zip(&x).enumerate().take(x.len() - 3) {
                let r = g(v);
                let tol = 8.0 * f32::EPSILON * r.abs() + 2e-7 * v.abs().max(1.0);
                assert!((o - r).abs() <= tol, "{f:?}({v}) at {i}: {o} vs {r}");
            }
            assert!(out[x.len() - 3].is_nan(), "{f:?} wrote past n");
        }
        if let Some(t) = sqrt_tile_fn() {
            let y: Vec<f32> = x.iter().map(|v| v.abs()).collect();
            let mut out = vec![0.0; y.len()];
            // SAFETY: a routine this CPU runs; lengths hold.
            unsafe { t(y.as_ptr(), out.as_mut_ptr(), y.len()) };
            assert!(out
                .iter()
                .zip(&y)
                .all(|(o, v)| o.to_bits() == v.sqrt().to_bits()));
        }
    }

    #[test]
    fn exp_sigmoid_tanh_within_3_ulp() {
        exp_sigmoid_tanh::<false>();
        exp_sigmoid_tanh::<true>();
    }

    fn exp_sigmoid_tanh<const F: bool>() {
        let (exp, sigmoid, tanh, erf) = (exp_f::<F>, sigmoid_f::<F>, tanh_f::<F>, erf_f::<F>);
        for &x in &grid() {
            let xd = x as f64;
            assert!(
                ulps(exp(x), xd.exp()) <= 3.0,
                "exp({x}) = {} vs {}",
                exp(x),
                xd.exp()
            );
            let s = 1.0 / (1.0 + (-xd).exp());
            assert!(ulps(sigmoid(x), s) <= 3.0, "sigmoid({x})");
            let t = xd.tanh();
            let err = (tanh(x) as f64 - t).abs();
            assert!(
                ulps(tanh(x), t) <= 3.0 || err <= 2e-7 * t.abs().clamp(1e-30, 1.0) + 1e-12,
                "tanh({x}) = {} vs {t}",
                tanh(x)
            );
        }
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(100.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan() && tanh(f32::NAN).is_nan() && erf(f32::NAN).is_nan());
        assert_eq!(tanh(30.0), 1.0);
        assert_eq!(tanh(-30.0), -1.0);
    }

    #[test]
    fn erf_and_gelu_absolute_error() {
        erf_and_gelu::<false>();
        erf_and_gelu::<true>();
    }

    fn erf_and_gelu<const F: bool>() {
        let (erf, gelu, gelu_tanh) = (erf_f::<F>, gelu_f::<F>, gelu_tanh_f::<F>);
        for &x in &grid() {
            let xd = x as f64;
            let e = libm::erf(xd);
            assert!(
                (erf(x) as f64 - e).abs() <= 2e-7,
                "erf({x}) = {} vs {e}",
                erf(x)
            );
            let g = 0.5 * xd * (1.0 + libm::erf(xd / std::f64::consts::SQRT_2));
            assert!(
                (gelu(x) as f64 - g).abs() <= 2e-7 * xd.abs().max(1.0),
                "gelu({x})"
            );
            let inner = 0.797_884_560_802_865_4 * (xd + 0.044715 * xd * xd * xd);
            let gt = 0.5 * xd * (1.0 + inner.tanh());
            assert!(
                (gelu_tanh(x) as f64 - gt).abs() <= 3e-7 * xd.abs().max(1.0),
                "gelu_tanh({x})"
            );
        }
    }

    #[test]
    fn dispatch_matches_scalar() {
        let x = grid();
        for f in [
            FastFn::Exp,
            FastFn::Sigmoid,
            FastFn::Tanh,
            FastFn::Erf,
            FastFn::Gelu,
            FastFn::GeluTanh,
        ] {
            let v = map(f, &x);
            let mut s = vec![0.0; x.len()];
            // The SIMD bodies use fused multiply-adds where the CPU has them.
            #[cfg(target_arch = "x86_64")]
            let fused = std::arch::is_x86_feature_detected!("avx512f")
                || (std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma"));
            #[cfg(not(target_arch = "x86_64"))]
            let fused = false;
            if fused {
                body::<true>(f, &x, &mut s);
            } else {
                body::<false>(f, &x, &mut s);
            }
            for (a, b) in v.iter().zip(&s) {
                assert!(
                    a == b
                        || (a.is_nan() && b.is_nan())
                        || (a - b).abs() <= 1e-7 * b.abs().max(1.0),
                    "{f:?}: {a} vs {b}"
                );
            }
        }
    }
}
