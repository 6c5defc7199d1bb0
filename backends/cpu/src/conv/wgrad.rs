//! Direct (im2col-free) f32 weight gradient of a stride-1, one-group
//! convolution with an AVX-512 micro-kernel chosen at run time. Each
//! image's input planes are copied once into zero-padded planes of pitch
//! `Wp = W + 2*pw` (as in `direct.rs`), and grad_output is transposed to
//! pixel-major `[Ho*Wo, Cout]` (channels padded to whole vectors with
//! zeros). `dw[co, r]` for an im2col row `r = (ci, i, j)` is then the sum
//! over images and output pixels `(oh, ow)` of `gy[pixel][co]` times the
//! padded input at `ci*plane + (oh + i*dh)*Wp + ow + j*dw`: an outer
//! product per pixel of up to 32 channels (two vectors) and up to 12 rows
//! (broadcast input values), accumulated in 24 zmm registers over every
//! pixel of every image of a block. That replaces im2col (Kh*Kw copies of
//! the input) by one padded copy of it and one transpose of grad_output.
//!
//! Padding values are exact zeros and add nothing unless a grad_output
//! value is infinite or NaN; the caller checks the result and recomputes
//! it on the reference path when it is not finite.
//!
//! Measured with the bench_conv_bwd example on the 2-core AVX-512 box
//! (figures at its call in conv.rs): faster than im2col + gemm on every
//! zoo conv (1.1-2.7x), equal on seed_cnn's 1->32 5x5. A first version
//! vectorised over pixels (16-lane partial sums per (channel, tap),
//! reduced per block) ran 0.6-1.5x of im2col: unaligned loads and
//! register spills.

use super::Geom;
use std::cell::RefCell;

/// Vectors of output channels per register block.
const MV: usize = 2;
/// Most im2col rows per register block.
const NR: usize = 12;
/// Lanes of one vector.
const L: usize = 16;
/// Scratch floats per block of images (padded input + transposed
/// grad_output): 1 MiB, half a core's L2.
const BLOCK_FLOATS: usize = 1 << 18;

/// Whether this path applies: stride 1, one group and AVX-512 (f32 is
/// checked by the caller).
pub(super) fn applies(g: &Geom) -> bool {
    g.p.stride == (1, 1)
        && g.p.groups == 1
        && g.howo() > 0
        && g.c > 0
        && g.cout > 0
        && g.n > 0
        && avx512()
}

/// AVX-512F (with FMA, as every AVX-512 CPU has), detected once.
fn avx512() -> bool {
    crate::simd::level() >= 3
}

/// Sizes of the per-image scratch layout.
#[derive(Clone, Copy)]
struct Lay {
    wp: usize,
    /// Elements of one padded input plane.
    px: usize,
    /// Output channels rounded up to whole vectors.
    cop: usize,
    /// Floats of one image in the scratch (input planes, then the
    /// transposed grad_output).
    per_image: usize,
}

fn lay(g: &Geom) -> Lay {
    let (ph, pw) = g.p.padding;
    let wp = g.w + 2 * pw;
    let px = (g.h + 2 * ph) * wp;
    let cop = g.cout.div_ceil(L) * L;
    Lay {
        wp,
        px,
        cop,
        per_image: g.c * px + g.howo() * cop,
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `dw` (`[cout, c, kh, kw]`, overwritten) from x and gy.
pub(super) fn weight_grad(x: &[f32], gy: &[f32], g: &Geom, dw: &mut [f32]) {
    let l = lay(g);
    let kg = g.kg();
    let nb = (BLOCK_FLOATS / l.per_image).clamp(1, g.n);
    let parts = crate::par::parts(g.n, 2 * nb);
    // Chunks of images, each with its own partial sum `[kg, cop]` (added
    // in chunk order, so the result does not depend on which thread ran
    // what); a few per thread so an idle thread can take over a
    // descheduled one's.
    let grain = if parts > 1 { 4 } else { 1 };
    let chunks = (parts * grain).min(g.n.div_ceil(nb)).max(1);
    let partials: Vec<std::sync::Mutex<Vec<f32>>> = (0..chunks)
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    let run_chunk = |t: usize| {
        let imgs = crate::par::range(g.n, chunks, t, 1);
        let mut acc = vec![0.0f32; kg * l.cop];
        SCRATCH.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < nb * l.per_image {
                s.resize(nb * l.per_image, 0.0);
            }
            let mut b0 = imgs.start;
            while b0 < imgs.end {
                let k = nb.min(imgs.end - b0);
                let buf = &mut s[..k * l.per_image];
                prepare(x, gy, g, &l, b0, k, buf);
                // SAFETY: avx512f checked in `applies`; `buf` holds `k`
                // images in the layout `lay` describes.
                unsafe { accumulate(buf, g, &l, k, &mut acc) };
                b0 += k;
            }
        });
        *partials[t].lock().expect("partial") = acc;
    };
    if chunks == 1 {
        run_chunk(0);
    } else {
        crate::par::for_each_part_grained(chunks, parts, grain, 1, |r| r.for_each(&run_chunk));
    }
    let mut sum = vec![0.0f32; kg * l.cop];
    for p in partials {
        let p = p.into_inner().expect("partial");
        for (d, v) in sum.iter_mut().zip(&p) {
            *d += v;
        }
    }
    for (co, row) in dw.chunks_exact_mut(kg).enumerate() {
        for (r, d) in row.iter_mut().enumerate() {
            *d = sum[r * l.cop + co];
        }
    }
}

/// Copies images `b0..b0+k` into `buf`: per image, the zero-padded input
/// planes (pitch `wp`), then grad_output transposed to `[howo, cop]`.
fn prepare(x: &[f32], gy: &[f32], g: &Geom, l: &Lay, b0: usize, k: usize, buf: &mut [f32]) {
    let (ph, pw) = g.p.padding;
    let (hw, howo) = (g.hw(), g.howo());
    for (bi, img) in buf.chunks_exact_mut(l.per_image).take(k).enumerate() {
        let b = b0 + bi;
        let (xs, gs) = img.split_at_mut(g.c * l.px);
        for (ci, dst) in xs.chunks_exact_mut(l.px).enumerate() {
            let src = &x[(b * g.c + ci) * hw..][..hw];
            if ph == 0 && pw == 0 {
                dst.copy_from_slice(src);
            } else {
                dst.fill(0.0);
                for (ih, row) in src.chunks_exact(g.w).enumerate() {
                    dst[(ih + ph) * l.wp + pw..][..g.w].copy_from_slice(row);
                }
            }
        }
        let gsrc = &gy[b * g.cout * howo..][..g.cout * howo];
        if l.cop > g.cout {
            gs.fill(0.0);
        }
        // Transpose in tiles of 16 pixels so both sides stay in cache lines.
        for p0 in (0..howo).step_by(L) {
            let p1 = (p0 + L).min(howo);
            for co in 0..g.cout {
                let src = &gsrc[co * howo + p0..co * howo + p1];
                for (i, &v) in src.iter().enumerate() {
                    gs[(p0 + i) * l.cop + co] = v;
                }
            }
        }
    }
}

/// Adds the block's contribution to `acc` (`[kg, cop]`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate(buf: &[f32], g: &Geom, l: &Lay, k: usize, acc: &mut [f32]) {
    let khw = g.kh * g.kw;
    let kg = g.kg();
    let roffs: Vec<usize> = (0..kg)
        .map(|r| {
            let (ci, t) = (r / khw, r % khw);
            ci * l.px + (t / g.kw) * g.p.dilation.0 * l.wp + (t % g.kw) * g.p.dilation.1
        })
        .collect();
    let base = buf.as_ptr();
    let gbase = base.add(g.c * l.px);
    let geo = Pix {
        stride: l.per_image,
        k,
        ho: g.ho,
        wo: g.wo,
        wp: l.wp,
        cop: l.cop,
    };
    let nvec = l.cop / L;
    for r0 in (0..kg).step_by(NR) {
        let nr = NR.min(kg - r0);
        let ro = &roffs[r0..r0 + nr];
        let mut v0 = 0;
        while v0 < nvec {
            let mv = MV.min(nvec - v0);
            let gp = gbase.add(v0 * L);
            let out = acc.as_mut_ptr().add(r0 * l.cop + v0 * L);
            macro_rules! call {
                ($m:literal; $($n:literal)*) => {
                    match nr {
                        $($n => micro::<$m, $n>(base, ro, gp, &geo, out),)*
                        _ => unreachable!("1 <= nr <= NR"),
                    }
                };
            }
            if mv == 2 {
                call!(2; 1 2 3 4 5 6 7 8 9 10 11 12);
            } else {
                call!(1; 1 2 3 4 5 6 7 8 9 10 11 12);
            }
            v0 += mv;
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn accumulate(_: &[f32], _: &Geom, _: &Lay, _: usize, _: &mut [f32]) {
    unreachable!("applies() is false off x86_64")
}

/// The pixel walk of one block: `k` images `stride` floats apart, `ho` x
/// `wo` output pixels, input pitch `wp`, grad_output rows of `cop`.
struct Pix {
    stride: usize,
    k: usize,
    ho: usize,
    wo: usize,
    wp: usize,
    cop: usize,
}

/// `out[r*cop + m*L + lane] += sum over images and pixels of
/// g[pixel][m*L + lane] * x[roffs[r] + (oh*wp + ow)]`, for `m < M`,
/// `r < N`.
///
/// Safety: avx512f; the image block in the layout of `Lay`; `out` holds
/// `N` rows of `cop` from its start.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn micro<const M: usize, const N: usize>(
    x: *const f32,
    roffs: &[usize],
    g: *const f32,
    pix: &Pix,
    out: *mut f32,
) {
    use std::arch::x86_64::*;
    let mut ro = [0usize; N];
    ro.copy_from_slice(&roffs[..N]);
    let mut a = [[_mm512_setzero_ps(); M]; N];
    for b in 0..pix.k {
        let xb = x.add(b * pix.stride);
        let mut gp = g.add(b * pix.stride);
        for oh in 0..pix.ho {
            let xr = xb.add(oh * pix.wp);
            for ow in 0..pix.wo {
                let xp = xr.add(ow);
                let gv: [__m512; M] = std::array::from_fn(|m| _mm512_loadu_ps(gp.add(m * L)));
                for r in 0..N {
                    let xv = _mm512_set1_ps(*xp.add(ro[r]));
                    for m in 0..M {
                        a[r][m] = _mm512_fmadd_ps(gv[m], xv, a[r][m]);
                    }
                }
                gp = gp.add(pix.cop);
            }
        }
    }
    for (r, ar) in a.iter().enumerate() {
        for (m, &v) in ar.iter().enumerate() {
            let o = out.add(r * pix.cop + m * L);
            _mm512_storeu_ps(o, _mm512_add_ps(_mm512_loadu_ps(o), v));
        }
    }
}
