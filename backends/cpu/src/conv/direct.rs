//! Direct (im2col-free) f32 convolution for stride 1, dilation 1, one
//! group, with an AVX-512 micro-kernel chosen at run time. Each image's
//! input is copied once into zero-padded planes of pitch `Wp = W + 2*pw`;
//! output pixel `(oh, ow)` is then flat position `q = oh*Wp + ow` and its
//! input for tap `(i, j)` is flat position `q + i*Wp + j` of the padded
//! plane, so every tap reads one contiguous run of the plane. The kernel
//! keeps an 8-channel x 48-pixel block of outputs in 24 zmm registers
//! (weights broadcast, pixels as vectors) and accumulates over channels and
//! taps; the junk columns `ow >= Wo` of each flat row are computed and
//! dropped when the block is copied out with the bias added.
//!
//! Without AVX-512 (AVX2 + FMA) the same scheme runs with 8-lane vectors
//! and 4 channels x 24 pixels per register block. On the AVX-512 box
//! (bench_ops `direct avx2` rows, n=8) it runs at 0.45-0.75x the AVX-512
//! kernel and at 0.5-3x the im2col path with AVX-512 gemm; an AVX2-only
//! machine has no AVX-512 gemm either, so it is used there too (not
//! measured on such a machine).
//!
//! Measured against the im2col + gemm path with the bench_ops example on
//! the 2-core AVX-512 box (see `use_direct` for the rule it gave).

use super::{Geom, Scratch};

/// Output channels per register block.
const CO: usize = 8;
/// Lanes of one vector.
const L: usize = 16;
/// Most vectors of pixels per register block.
const NV: usize = 3;

/// Whether the direct path applies to `g` (f32 is checked by the caller).
pub(super) fn applies(g: &Geom) -> bool {
    g.p.groups == 1
        && g.p.stride == (1, 1)
        && g.p.dilation == (1, 1)
        && g.kh * g.kw <= 64
        && g.howo() > 0
        && g.c > 0
        && isa().is_some()
}

/// The instruction set the micro-kernel runs with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Isa {
    /// 16 lanes, 8 channels x 3 vectors in 24 zmm registers.
    Avx512,
    /// 8 lanes, 4 channels x 3 vectors in 12 ymm registers (two passes per
    /// 8-channel block).
    Avx2,
}

thread_local! {
    static NO_AVX512: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// For tests: run the AVX2 kernel even where AVX-512 is available (on
/// the calling thread's calls).
#[doc(hidden)]
pub fn force_avx2(on: bool) {
    NO_AVX512.with(|f| f.set(on));
}

fn isa() -> Option<Isa> {
    #[cfg(target_arch = "x86_64")]
    {
        if is_x86_feature_detected!("avx512f") && !NO_AVX512.with(|f| f.get()) {
            return Some(Isa::Avx512);
        }
        if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
            return Some(Isa::Avx2);
        }
    }
    None
}

/// Padded geometry of one image.
#[derive(Clone, Copy)]
struct Pad {
    wp: usize,
    /// Vectors of flat output positions per channel.
    nq: usize,
    /// Elements of one padded input plane (with the tail the last vector
    /// block reads past the last row).
    plane: usize,
}

fn pad_geom(g: &Geom) -> Pad {
    let wp = g.w + 2 * g.p.padding.1;
    let hp = g.h + 2 * g.p.padding.0;
    let last_q = (g.ho - 1) * wp + g.wo; // one past the last valid flat position
    let nq = last_q.div_ceil(L);
    let reach = nq * L + (g.kh - 1) * wp + (g.kw - 1);
    Pad {
        wp,
        nq,
        plane: reach.max(hp * wp),
    }
}

/// Weights `[cout, cin, kh, kw]` as `[cout/CO (rounded up), cin, kh*kw, CO]`,
/// zero-padded to a whole number of channel blocks.
fn pack_weights(w: &[f32], g: &Geom, out: &mut Vec<f32>) {
    let taps = g.kh * g.kw;
    let nblk = g.cout.div_ceil(CO);
    let len = nblk * g.c * taps * CO;
    out.clear();
    out.resize(len, 0.0);
    for co in 0..g.cout {
        let (b, c) = (co / CO, co % CO);
        for ci in 0..g.c {
            for t in 0..taps {
                out[((b * g.c + ci) * taps + t) * CO + c] = w[(co * g.c + ci) * taps + t];
            }
        }
    }
}

/// `y = conv(x, w) + bias` for f32 on the direct path; `epi(n, y_n)` is
/// called on each image's output once it is complete, from the thread
/// that computed it. `y` must hold `n*cout*ho*wo` elements.
pub(super) fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &Geom,
    y: &mut [f32],
    epi: Option<super::ImageEpilogue<'_, f32>>,
) {
    assert!(applies(g), "conv2d: direct path does not apply");
    let per_image = g.cout * g.howo();
    assert_eq!(y.len(), g.n * per_image, "conv2d: output length");
    if g.n == 0 {
        return;
    }
    let wp = super::wcache::get(super::wcache::Kind::Direct, w, g.cout, |out| {
        pack_weights(w, g, out)
    });
    let pd = pad_geom(g);
    let isa = isa().expect("checked by applies");
    let xlen = g.c * g.hw();
    let howo = g.howo();
    let part = |n0: usize,
                nimg: usize,
                b0: usize,
                b1: usize,
                yp: &mut [f32],
                s: &mut Scratch<f32>,
                done: &mut dyn FnMut(usize, &mut [f32])| {
        let per = ((b1 * CO).min(g.cout) - b0 * CO) * howo;
        for (i, yi) in yp.chunks_mut(per).take(nimg).enumerate() {
            let xi = &x[(n0 + i) * xlen..][..xlen];
            image_forward(xi, &wp, bias, g, &pd, isa, b0, yi, s);
            done(i, yi);
        }
    };
    super::forward_parts(g, y, g.cout.div_ceil(CO), CO, epi, &part);
}

/// One image (or the channel blocks from `b0` on that `y` covers): pad,
/// then per block of CO output channels, all pixel blocks into a tile,
/// then the tile's valid columns (plus bias) into `y`.
#[allow(clippy::too_many_arguments)]
fn image_forward(
    x: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    g: &Geom,
    pd: &Pad,
    isa: Isa,
    b0: usize,
    y: &mut [f32],
    s: &mut Scratch<f32>,
) {
    let (ph, pw) = g.p.padding;
    let xp = super::grow(&mut s.cols, g.c * pd.plane);
    // Without column padding the rows are one contiguous copy and only the
    // top rows and the tail are zeroed (complex_net's 10x10 and 8x8 planes:
    // 12% of the conv's time was zeroing then overwriting); with column
    // padding, one memset of the plane and a copy per row measured faster
    // than zeroing the borders row by row (seed_cnn, test_net).
    let rows_end = (g.h + ph) * pd.wp;
    for ci in 0..g.c {
        let src = &x[ci * g.hw()..][..g.hw()];
        let dst = &mut xp[ci * pd.plane..][..pd.plane];
        if pw == 0 {
            dst[..ph * pd.wp].fill(0.0);
            dst[ph * pd.wp..rows_end].copy_from_slice(src);
            dst[rows_end..].fill(0.0);
        } else {
            dst.fill(0.0);
            for (r, row) in src.chunks_exact(g.w).enumerate() {
                dst[(r + ph) * pd.wp + pw..][..g.w].copy_from_slice(row);
            }
        }
    }
    let tstride = pd.nq * L;
    let tile = super::grow(&mut s.tmp, CO * tstride);
    let mut offs = [0usize; 64];
    let taps = g.kh * g.kw;
    for i in 0..g.kh {
        for j in 0..g.kw {
            offs[i * g.kw + j] = i * pd.wp + j;
        }
    }
    let offs = &offs[..taps];
    let howo = g.howo();
    // `y` holds output channels [b0*CO, b0*CO + y.len()/howo).
    let b1 = (b0 * CO + y.len() / howo).div_ceil(CO);
    for b in b0..b1 {
        let wb = &wp[b * g.c * taps * CO..][..g.c * taps * CO];
        match isa {
            Isa::Avx512 => {
                let mut q = 0;
                while q < pd.nq {
                    let nv = (pd.nq - q).min(NV);
                    // SAFETY: avx512f was detected (`isa`); the reads stay
                    // in the padded planes (`plane` covers `nq*L + max
                    // offset`) and the writes in the tile (`CO` rows of
                    // `nq*L`).
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        let (xo, to) = (xp.as_ptr().add(q * L), tile.as_mut_ptr().add(q * L));
                        let w = wb.as_ptr();
                        match nv {
                            3 => micro::<3>(xo, pd.plane, g.c, offs, w, to, tstride),
                            2 => micro::<2>(xo, pd.plane, g.c, offs, w, to, tstride),
                            _ => micro::<1>(xo, pd.plane, g.c, offs, w, to, tstride),
                        }
                    }
                    q += nv;
                }
            }
            Isa::Avx2 => {
                // Vectors of 8: twice as many, same tile.
                let nq8 = pd.nq * 2;
                for half in 0..2 {
                    let mut q = 0;
                    while q < nq8 {
                        let nv = (nq8 - q).min(NV);
                        // SAFETY: avx2 and fma were detected (`isa`); as
                        // above, with 8-lane vectors and 4 channels of the
                        // block (`half`) per pass.
                        #[cfg(target_arch = "x86_64")]
                        unsafe {
                            let (xo, to) = (
                                xp.as_ptr().add(q * 8),
                                tile.as_mut_ptr().add(half * 4 * tstride + q * 8),
                            );
                            let w = wb.as_ptr().add(half * 4);
                            match nv {
                                3 => micro_avx2::<3>(xo, pd.plane, g.c, offs, w, to, tstride),
                                2 => micro_avx2::<2>(xo, pd.plane, g.c, offs, w, to, tstride),
                                _ => micro_avx2::<1>(xo, pd.plane, g.c, offs, w, to, tstride),
                            }
                        }
                        q += nv;
                    }
                }
            }
        }
        for c in 0..CO.min(g.cout - b * CO) {
            let co = b * CO + c;
            let bv = bias.map_or(0.0, |bb| bb[co]);
            let trow = &tile[c * tstride..];
            let yrow = &mut y[(co - b0 * CO) * howo..][..howo];
            #[cfg(target_arch = "x86_64")]
            if isa == Isa::Avx512 {
                // SAFETY: AVX-512F (`isa`); the tile holds `ho` rows of
                // pitch `wp >= wo`.
                unsafe { copy_out_avx512(trow, pd.wp, yrow, g.wo, bv) };
                continue;
            }
            crate::simd::dispatch!(copy_out(trow, pd.wp, yrow, g.wo, bv));
        }
    }
}

/// The valid columns of one channel's tile rows (pitch `wp`) plus the
/// bias into `y` (rows of `wo`), inlined into `simd::dispatch!`'s copies.
#[inline(always)]
fn copy_out(trow: &[f32], wp: usize, y: &mut [f32], wo: usize, bias: f32) {
    for (oh, yr) in y.chunks_exact_mut(wo).enumerate() {
        for (d, &v) in yr.iter_mut().zip(&trow[oh * wp..][..wo]) {
            *d = v + bias;
        }
    }
}

/// `copy_out` with 16-lane masked loads and stores: rows of 28 (test_net)
/// or 13 (seed_cnn) are one or two vectors with no scalar tail. The
/// baseline-compiled loop (SSE, scalar tail) was 40% of test_net's batch-256
/// forward on one thread.
///
/// Safety: AVX-512F; `trow` holds `y.len() / wo` rows of pitch `wp`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn copy_out_avx512(trow: &[f32], wp: usize, y: &mut [f32], wo: usize, bias: f32) {
    use std::arch::x86_64::*;
    let rows = y.len() / wo.max(1);
    assert!(wo <= wp && (rows == 0 || trow.len() >= (rows - 1) * wp + wo));
    let bv = _mm512_set1_ps(bias);
    for oh in 0..rows {
        let (src, dst) = (trow.as_ptr().add(oh * wp), y.as_mut_ptr().add(oh * wo));
        let mut k = 0;
        while k < wo {
            let n = wo - k;
            let m = if n >= L { u16::MAX } else { (1u16 << n) - 1 };
            let v = _mm512_maskz_loadu_ps(m, src.add(k));
            _mm512_mask_storeu_ps(dst.add(k), m, _mm512_add_ps(v, bv));
            k += L;
        }
    }
}

/// The register block: `tile[c][v*L..]` (rows `tstride` apart) = sum over
/// channels `ci` and taps `t` of `w[ci][t][c] * x[ci*plane + offs[t] + v*L..]`
/// for `c < CO`, `v < N`.
///
/// Safety: avx512f; `x + ci*plane + offs[t] + N*L` within the planes,
/// `w` holds `cin*offs.len()*CO`, the tile `CO` rows of `N*L` from `out`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(super) unsafe fn micro<const N: usize>(
    x: *const f32,
    plane: usize,
    cin: usize,
    offs: &[usize],
    w: *const f32,
    out: *mut f32,
    tstride: usize,
) {
    use std::arch::x86_64::*;
    let mut acc = [[_mm512_setzero_ps(); N]; CO];
    let mut wptr = w;
    for ci in 0..cin {
        let xc = x.add(ci * plane);
        for &o in offs {
            let xs: [__m512; N] = std::array::from_fn(|v| _mm512_loadu_ps(xc.add(o + v * L)));
            for (c, a) in acc.iter_mut().enumerate() {
                let wv = _mm512_set1_ps(*wptr.add(c));
                for v in 0..N {
                    a[v] = _mm512_fmadd_ps(wv, xs[v], a[v]);
                }
            }
            wptr = wptr.add(CO);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        for (v, &r) in a.iter().enumerate() {
            _mm512_storeu_ps(out.add(c * tstride + v * L), r);
        }
    }
}

/// The AVX2 register block: 4 channels (`w` points at the first of them
/// within an 8-channel weight block) x `N` vectors of 8 pixels.
///
/// Safety: avx2 and fma; bounds as for `micro` with 8-lane vectors.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn micro_avx2<const N: usize>(
    x: *const f32,
    plane: usize,
    cin: usize,
    offs: &[usize],
    w: *const f32,
    out: *mut f32,
    tstride: usize,
) {
    use std::arch::x86_64::*;
    const C4: usize = 4;
    let mut acc = [[_mm256_setzero_ps(); N]; C4];
    let mut wptr = w;
    for ci in 0..cin {
        let xc = x.add(ci * plane);
        for &o in offs {
            let xs: [__m256; N] = std::array::from_fn(|v| _mm256_loadu_ps(xc.add(o + v * 8)));
            for (c, a) in acc.iter_mut().enumerate() {
                let wv = _mm256_set1_ps(*wptr.add(c));
                for v in 0..N {
                    a[v] = _mm256_fmadd_ps(wv, xs[v], a[v]);
                }
            }
            wptr = wptr.add(CO);
        }
    }
    for (c, a) in acc.iter().enumerate() {
        for (v, &r) in a.iter().enumerate() {
            _mm256_storeu_ps(out.add(c * tstride + v * 8), r);
        }
    }
}
