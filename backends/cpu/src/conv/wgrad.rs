//! Direct (im2col-free) f32 weight gradient of a stride-1 convolution with
//! an AVX-512 micro-kernel chosen at run time. As in `direct.rs`, each
//! image's input planes are copied once into zero-padded planes of pitch
//! `Wp = W + 2*pw`, and grad_output is copied into planes of the same pitch
//! whose junk columns (`ow >= Wo`, and the tail up to a whole vector) are
//! zero. Then `dw[co, ci, i, j]` is the dot product of grad_output plane
//! `co` with input plane `ci` shifted by `i*dh*Wp + j*dw`, over every image:
//! the kernel keeps 4 output channels x up to 3 taps of 16-lane partial
//! sums in 12 zmm registers, runs over all the images of a block, and
//! reduces each register once per block. That replaces im2col (Kh*Kw
//! copies of the input) by one padded copy of it.
//!
//! Junk columns multiply input values by an exact zero, which adds nothing
//! unless an input value is infinite or NaN; the caller checks the result
//! and recomputes it on the reference path when it is not finite.
//!
//! Measured with the bench_conv_bwd example on the 2-core AVX-512 box
//! (see the commit message for the table).

use super::Geom;
use std::cell::RefCell;

/// Output channels per register block.
const COB: usize = 4;
/// Most taps per register block.
const NT: usize = 3;
/// Lanes of one vector.
const L: usize = 16;
/// Scratch floats per block of images (padded input + pitched
/// grad_output), sized to stay in a 1-2 MiB L2 next to the output.
const BLOCK_FLOATS: usize = 1 << 18;

/// Whether this path applies: stride 1 and AVX-512 (f32 is checked by the
/// caller).
pub(super) fn applies(g: &Geom) -> bool {
    g.p.stride == (1, 1) && g.howo() > 0 && g.c > 0 && g.cout > 0 && g.n > 0 && avx512()
}

fn avx512() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Sizes of the padded per-image layout.
#[derive(Clone, Copy)]
struct Lay {
    wp: usize,
    /// Elements of one pitched grad_output plane (`Ho*Wp` rounded up to
    /// whole vectors).
    q: usize,
    /// Elements of one padded input plane, with slack for the reads of the
    /// last vector's junk columns.
    px: usize,
    /// Floats of one image in the scratch (input planes, then grad_output
    /// planes plus one zero plane for channel blocks past `cout`).
    per_image: usize,
}

fn lay(g: &Geom) -> Lay {
    let (ph, pw) = g.p.padding;
    let hp = g.h + 2 * ph;
    let wp = g.w + 2 * pw;
    let q = (g.ho * wp).div_ceil(L) * L;
    // Largest read: (q - 1) + (kh-1)*dh*wp + (kw-1)*dw, and
    // ho*wp + (kh-1)*dh*wp = hp*wp.
    let px = hp * wp + (q - g.ho * wp) + (g.kw - 1) * g.p.dilation.1;
    Lay {
        wp,
        q,
        px,
        per_image: g.c * px + (g.cout + 1) * q,
    }
}

thread_local! {
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// `dw` (`[cout, cg, kh, kw]`, overwritten) from x and gy.
pub(super) fn weight_grad(x: &[f32], gy: &[f32], g: &Geom, dw: &mut [f32]) {
    let l = lay(g);
    let nb = (BLOCK_FLOATS / l.per_image).clamp(1, g.n);
    let parts = crate::par::parts(g.n, 2 * nb);
    // Chunks of images, each with its own partial sum (added in chunk
    // order, so the result does not depend on which thread ran what); a few
    // per thread so an idle thread can take over a descheduled one's.
    let grain = if parts > 1 { 4 } else { 1 };
    let chunks = (parts * grain).min(g.n.div_ceil(nb)).max(1);
    let partials: Vec<std::sync::Mutex<Vec<f32>>> = (0..chunks)
        .map(|_| std::sync::Mutex::new(Vec::new()))
        .collect();
    let wlen = dw.len();
    let run_chunk = |t: usize| {
        let imgs = crate::par::range(g.n, chunks, t, 1);
        let mut acc = vec![0.0f32; wlen];
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
    dw.fill(0.0);
    for p in partials {
        let p = p.into_inner().expect("partial");
        for (d, v) in dw.iter_mut().zip(&p) {
            *d += v;
        }
    }
}

/// Copies images `b0..b0+k` into `buf`: per image, the zero-padded input
/// planes (pitch `wp`) then the grad_output planes at pitch `wp` with zero
/// junk columns, then one zero plane.
fn prepare(x: &[f32], gy: &[f32], g: &Geom, l: &Lay, b0: usize, k: usize, buf: &mut [f32]) {
    let (ph, pw) = g.p.padding;
    let (hw, howo) = (g.hw(), g.howo());
    for (bi, img) in buf.chunks_exact_mut(l.per_image).take(k).enumerate() {
        let b = b0 + bi;
        let (xs, gs) = img.split_at_mut(g.c * l.px);
        for (ci, dst) in xs.chunks_exact_mut(l.px).enumerate() {
            let src = &x[(b * g.c + ci) * hw..][..hw];
            if ph == 0 && pw == 0 {
                dst[..hw].copy_from_slice(src);
                dst[hw..].fill(0.0);
            } else {
                dst.fill(0.0);
                for (ih, row) in src.chunks_exact(g.w).enumerate() {
                    dst[(ih + ph) * l.wp + pw..][..g.w].copy_from_slice(row);
                }
            }
        }
        for (co, dst) in gs.chunks_exact_mut(l.q).enumerate() {
            if co == g.cout {
                dst.fill(0.0);
                continue;
            }
            let src = &gy[(b * g.cout + co) * howo..][..howo];
            if l.wp == g.wo {
                dst[..howo].copy_from_slice(src);
                dst[howo..].fill(0.0);
            } else {
                for (oh, row) in src.chunks_exact(g.wo).enumerate() {
                    let d = &mut dst[oh * l.wp..][..l.wp];
                    d[..g.wo].copy_from_slice(row);
                    d[g.wo..].fill(0.0);
                }
                dst[g.ho * l.wp..].fill(0.0);
            }
        }
    }
}

/// Adds the block's contribution to `acc` (`[cout, cg, kh*kw]`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn accumulate(buf: &[f32], g: &Geom, l: &Lay, k: usize, acc: &mut [f32]) {
    let (cg, coutg, khw) = (g.cg(), g.coutg(), g.kh * g.kw);
    let offs: Vec<usize> = (0..khw)
        .map(|t| (t / g.kw) * g.p.dilation.0 * l.wp + (t % g.kw) * g.p.dilation.1)
        .collect();
    let base = buf.as_ptr();
    let nv = l.q / L;
    for gi in 0..g.p.groups {
        for cil in 0..cg {
            let ci = gi * cg + cil;
            let xp = base.add(ci * l.px);
            for cob in (0..coutg).step_by(COB) {
                let mut gp = [base; COB];
                for (c, p) in gp.iter_mut().enumerate() {
                    let co = gi * coutg + cob + c;
                    let plane = if cob + c < coutg { co } else { g.cout };
                    *p = base.add(g.c * l.px + plane * l.q);
                }
                for t0 in (0..khw).step_by(NT) {
                    let nt = NT.min(khw - t0);
                    let mut out = [[0.0f32; NT]; COB];
                    macro_rules! call {
                        ($($n:literal)*) => {
                            match nt {
                                $($n => micro::<$n>(
                                    xp, &offs[t0..t0 + $n], gp, l.per_image, k, nv, &mut out,
                                ),)*
                                _ => unreachable!("1 <= nt <= NT"),
                            }
                        };
                    }
                    call!(1 2 3);
                    for (c, o) in out.iter().enumerate() {
                        if cob + c >= coutg {
                            break;
                        }
                        let co = gi * coutg + cob + c;
                        let dst = &mut acc[(co * cg + cil) * khw + t0..][..nt];
                        for (d, v) in dst.iter_mut().zip(o) {
                            *d += v;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
unsafe fn accumulate(_: &[f32], _: &Geom, _: &Lay, _: usize, _: &mut [f32]) {
    unreachable!("applies() is false off x86_64")
}

/// `out[c][t] = sum over images b < k and pixels of g[c][b] * x[b][off t]`,
/// with per-image strides `stride` (`x` and `g` point into image 0).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn micro<const N: usize>(
    x: *const f32,
    offs: &[usize],
    g: [*const f32; COB],
    stride: usize,
    k: usize,
    nv: usize,
    out: &mut [[f32; NT]; COB],
) {
    use std::arch::x86_64::*;
    let mut off = [0usize; N];
    off.copy_from_slice(&offs[..N]);
    let mut a = [[_mm512_setzero_ps(); N]; COB];
    for b in 0..k {
        let xb = x.add(b * stride);
        let gb = g.map(|p| p.add(b * stride));
        for v in 0..nv {
            let gv = gb.map(|p| _mm512_loadu_ps(p.add(v * L)));
            let xv0 = xb.add(v * L);
            for t in 0..N {
                let xv = _mm512_loadu_ps(xv0.add(off[t]));
                for c in 0..COB {
                    a[c][t] = _mm512_fmadd_ps(gv[c], xv, a[c][t]);
                }
            }
        }
    }
    for c in 0..COB {
        for t in 0..N {
            out[c][t] = _mm512_reduce_add_ps(a[c][t]);
        }
    }
}
