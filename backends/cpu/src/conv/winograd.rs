//! Winograd F(2x2, 3x3) f32 convolution (Lavin & Gray) for 3x3 kernels,
//! stride 1, dilation 1, one group, any padding, on AVX-512 machines.
//!
//! Each 2x2 output tile is `A^T [(G g G^T) . (B^T d B)] A` with `d` the
//! 4x4 input patch and `g` the 3x3 kernel: 16 multiplies per tile and
//! input/output channel pair instead of 36, so the multiply stage does
//! 2.25x fewer multiply-adds than the direct kernel (plus the junk of
//! tiles that overhang an odd output size). The stages, per group of tile
//! rows (all images of the part laid end to end):
//! - input transform, vectorized over 16 tiles of a tile row: the four
//!   input rows of a tile row are loaded with masks (the padding is never
//!   materialised), split into even/odd columns with two permutes, and
//!   combined into `V[xi][ci][t]` (16 matrices, tiles contiguous);
//! - 16 products `M[xi] = U[xi] V[xi]` (`U` = the transformed weights,
//!   packed by 8 output channels) with the direct kernel's 8-channel x
//!   48-pixel register block (one "tap", channels as the reduction);
//! - output transform over 16 tiles at once, bias added, the 2x2 results
//!   interleaved into two output rows with masked stores.
//!
//! Numerics: the transforms only add, subtract and halve; the result
//! differs from the direct sum by rounding (tested against the direct
//! kernel at 1e-5 of the output's magnitude). Where it is used is decided
//! by `applies` and measured in `conv::use_winograd`.

use super::direct::micro;
use super::{Geom, ImageEpilogue, Scratch};

/// Output channels per weight block (the direct kernel's register block).
const CO: usize = 8;
/// Lanes of one vector (tiles per vector).
const L: usize = 16;
/// Tiles per group of tile rows: the group's `V` and `M` (16 matrices of
/// `cin` and `cout` rows) should stay in L2. bench_ops (seed convs, one
/// thread): 64, 96 and 160 within noise, 256 5-15% slower; 96 keeps
/// 64-channel groups under 1 MiB (Zen 4's L2).
const TARGET_TILES: usize = 96;

/// Whether the Winograd path can run `g` (f32 is checked by the caller).
pub(super) fn applies(g: &Geom) -> bool {
    g.p.groups == 1
        && (g.kh, g.kw) == (3, 3)
        && g.p.stride == (1, 1)
        && g.p.dilation == (1, 1)
        && g.howo() > 0
        && g.c > 0
        && avx512()
}

/// AVX-512F (with FMA, as every AVX-512 CPU has), detected once.
fn avx512() -> bool {
    crate::simd::level() >= 3
}

/// Tile counts of one image.
#[derive(Clone, Copy)]
struct Tiles {
    /// Tile rows (`ceil(ho/2)`).
    th: usize,
    /// Tiles per row (`ceil(wo/2)`).
    tw: usize,
    /// Weight blocks of `CO` output channels.
    nblk: usize,
}

impl Tiles {
    fn new(g: &Geom) -> Tiles {
        Tiles {
            th: g.ho.div_ceil(2),
            tw: g.wo.div_ceil(2),
            nblk: g.cout.div_ceil(CO),
        }
    }
}

/// `U = G g G^T` for every (output, input) channel pair, stored as
/// `[16][nblk][cin][CO]` (zero rows for the channels past `cout`).
fn transform_weights(w: &[f32], g: &Geom, nblk: usize, out: &mut Vec<f32>) {
    let cin = g.c;
    out.clear();
    out.resize(16 * nblk * cin * CO, 0.0);
    for co in 0..g.cout {
        let (b, c) = (co / CO, co % CO);
        for ci in 0..cin {
            let k = &w[(co * cin + ci) * 9..][..9];
            // t = G g (4x3), then u = t G^T (4x4).
            let mut t = [[0.0f32; 3]; 4];
            for j in 0..3 {
                let (g0, g1, g2) = (k[j], k[3 + j], k[6 + j]);
                t[0][j] = g0;
                t[1][j] = 0.5 * (g0 + g1 + g2);
                t[2][j] = 0.5 * (g0 - g1 + g2);
                t[3][j] = g2;
            }
            for (i, r) in t.iter().enumerate() {
                let u = [
                    r[0],
                    0.5 * (r[0] + r[1] + r[2]),
                    0.5 * (r[0] - r[1] + r[2]),
                    r[2],
                ];
                for (j, &v) in u.iter().enumerate() {
                    out[(((i * 4 + j) * nblk + b) * cin + ci) * CO + c] = v;
                }
            }
        }
    }
}

/// `y = conv(x, w) + bias` on the Winograd path; `epi(n, y_n)` runs on
/// each image's output once it is complete. `y` holds `n*cout*ho*wo`.
pub(super) fn forward(
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    g: &Geom,
    y: &mut [f32],
    epi: Option<ImageEpilogue<'_, f32>>,
) {
    assert!(applies(g), "conv2d: Winograd path does not apply");
    let per_image = g.cout * g.howo();
    assert_eq!(y.len(), g.n * per_image, "conv2d: output length");
    if g.n == 0 {
        return;
    }
    let tl = Tiles::new(g);
    let ue = super::wcache::get(super::wcache::Kind::Winograd, w, g.cout, |out| {
        transform_weights(w, g, tl.nblk, out)
    });
    let u = &ue[..];
    let xlen = g.c * g.hw();
    let part = |n0: usize,
                nimg: usize,
                b0: usize,
                b1: usize,
                yp: &mut [f32],
                s: &mut Scratch<f32>,
                done: &mut dyn FnMut(usize, &mut [f32])| {
        let xs = &x[n0 * xlen..][..nimg * xlen];
        // SAFETY: applies() checked AVX-512; the slices are sized above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            part(xs, nimg, u, bias, g, tl, (b0, b1), yp, s, done);
        }
    };
    super::forward_parts(g, y, tl.nblk, CO, epi, &part);
}

/// Images `0..nimg` of `x` and output channel blocks `b0..b1` into `y`
/// (`[nimg][channels of the blocks][ho*wo]`), in groups of tile rows;
/// `done(i, y_i)` is called once image `i`'s outputs are all written.
///
/// Safety: AVX-512F; `x` holds `nimg` images, `u` the packed weights.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn part(
    x: &[f32],
    nimg: usize,
    u: &[f32],
    bias: Option<&[f32]>,
    g: &Geom,
    tl: Tiles,
    (b0, b1): (usize, usize),
    y: &mut [f32],
    s: &mut Scratch<f32>,
    done: &mut dyn FnMut(usize, &mut [f32]),
) {
    let cin = g.c;
    let ych = (b1 * CO).min(g.cout) - b0 * CO;
    let per_image = ych * g.howo();
    debug_assert_eq!(y.len(), nimg * per_image);
    let rows = nimg * tl.th;
    let groups = rows.div_ceil((TARGET_TILES / tl.tw).max(1));
    let rpg = rows.div_ceil(groups);
    let tstride = (rpg * tl.tw).div_ceil(L) * L + L;
    let nbp = b1 - b0;
    let (vs, ms) = (xi_stride(cin, tstride), xi_stride(nbp * CO, tstride));
    let v = super::grow(&mut s.cols, 16 * vs);
    let m = super::grow(&mut s.tmp, 16 * ms);
    let mut next_done = 0;
    let mut r0 = 0;
    while r0 < rows {
        let r1 = (r0 + rpg).min(rows);
        input_transform(x, g, tl, r0, r1, v, tstride);
        let nq = ((r1 - r0) * tl.tw).div_ceil(L);
        for xi in 0..16 {
            let vx = v.as_ptr().add(xi * vs);
            let mx = m.as_mut_ptr().add(xi * ms);
            let mut q = 0;
            while q < nq {
                let nv = (nq - q).min(3);
                for b in b0..b1 {
                    let w = u.as_ptr().add((xi * tl.nblk + b) * cin * CO);
                    let (xo, to) = (vx.add(q * L), mx.add((b - b0) * CO * tstride + q * L));
                    match nv {
                        3 => micro::<3>(xo, tstride, cin, &[0], w, to, tstride),
                        2 => micro::<2>(xo, tstride, cin, &[0], w, to, tstride),
                        _ => micro::<1>(xo, tstride, cin, &[0], w, to, tstride),
                    }
                }
                q += nv;
            }
        }
        output_transform(m, bias, g, tl, r0, r1, (b0, ych), y, tstride);
        while next_done < nimg && (next_done + 1) * tl.th <= r1 {
            done(next_done, &mut y[next_done * per_image..][..per_image]);
            next_done += 1;
        }
        r0 = r1;
    }
}

/// Elements from one of the 16 matrices to the next: `rows*tstride` plus
/// one cache line, so that the 16 streams the transforms read or write at
/// once do not all fall into one L1 set (`rows*tstride` is often a
/// multiple of 4 KiB: 64 channels x 96 tiles made the transforms 10x
/// slower than the products).
fn xi_stride(rows: usize, tstride: usize) -> usize {
    rows * tstride + L
}

/// Lane mask of the 16 columns `c..c+16` of a row of `w` that lie in
/// `[0, w)`.
#[inline]
fn col_mask(c: isize, w: usize) -> u16 {
    let lo = (-c).clamp(0, 16) as u32;
    let hi = (w as isize - c).clamp(0, 16) as u32;
    if hi <= lo {
        return 0;
    }
    let upto = if hi == 16 { u16::MAX } else { (1u16 << hi) - 1 };
    upto & !((1u16 << lo) - 1)
}

/// Tile rows per 16-lane vector: rows of at most 3 tiles go four to a
/// vector, of at most 7 two to a vector (tiles packed without gaps, so
/// the products see no junk columns), wider rows one per vector (in
/// chunks of 16 tiles).
fn rows_per_vector(tw: usize) -> usize {
    match tw {
        0..=3 => 4,
        4..=7 => 2,
        _ => 1,
    }
}

/// The lane tables of a packed vector of `rpv` rows of `tw` tiles: for
/// `k` in 0..4, lane `l` (tile `l % tw` of row `l / tw`) takes element
/// `2*(l % tw) + k` of that row's source, where the sources are two
/// 16-lane registers (two rows, or four rows of 8 lanes each).
fn packed_index(rpv: usize, tw: usize, k: usize) -> [i32; 16] {
    std::array::from_fn(|l| {
        let (row, t) = (l / tw, l % tw);
        if row >= rpv {
            return 0;
        }
        let base = if rpv == 2 {
            row * 16
        } else {
            (row / 2) * 16 + (row % 2) * 8
        };
        (base + 2 * t + k) as i32
    })
}

/// `(B^T d B)` rows for one input row offset: `[d0-d2, d1+d2, d2-d1, d1-d3]`
/// from the even/odd column vectors `e=d0`, `o=d1`, `e1=d2`, `o1=d3`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn row_transform(
    e: std::arch::x86_64::__m512,
    o: std::arch::x86_64::__m512,
    e1: std::arch::x86_64::__m512,
    o1: std::arch::x86_64::__m512,
) -> [std::arch::x86_64::__m512; 4] {
    use std::arch::x86_64::*;
    [
        _mm512_sub_ps(e, e1),
        _mm512_add_ps(o, e1),
        _mm512_sub_ps(e1, o),
        _mm512_sub_ps(o, o1),
    ]
}

/// Combines the four row transforms into the 16 `V` vectors and stores
/// them at `at` of each matrix (`xs` apart).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn store_v(t: &[[std::arch::x86_64::__m512; 4]; 4], vp: *mut f32, xs: usize, at: usize) {
    use std::arch::x86_64::*;
    for (j, ((&t0, &t1), (&t2, &t3))) in t[0]
        .iter()
        .zip(&t[1])
        .zip(t[2].iter().zip(&t[3]))
        .enumerate()
    {
        let vs = [
            _mm512_sub_ps(t0, t2),
            _mm512_add_ps(t1, t2),
            _mm512_sub_ps(t2, t1),
            _mm512_sub_ps(t1, t3),
        ];
        for (i, &vv) in vs.iter().enumerate() {
            _mm512_storeu_ps(vp.add((i * 4 + j) * xs + at), vv);
        }
    }
}

/// `V[xi][ci][t] = (B^T d B)[xi]` for tile rows `r0..r1` (image-major
/// across the part's images), `t` counting tiles from row `r0`, rows
/// packed as `rows_per_vector` says.
///
/// Safety: AVX-512F; `v` holds `16` matrices `xi_stride(cin, tstride)`
/// apart with `tstride >= (r1-r0)*tw + 16`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn input_transform(
    x: &[f32],
    g: &Geom,
    tl: Tiles,
    r0: usize,
    r1: usize,
    v: &mut [f32],
    tstride: usize,
) {
    use std::arch::x86_64::*;
    let (ph, pw) = (g.p.padding.0 as isize, g.p.padding.1 as isize);
    let (cin, hw) = (g.c, g.hw());
    let xs = xi_stride(cin, tstride);
    assert!(v.len() >= 16 * xs && tstride >= (r1 - r0) * tl.tw + L);
    let vp = v.as_mut_ptr();
    // Padded input row `i` of tile row `r`, as a pointer to its input
    // row, or None where it is padding (or past the group).
    let row_at = |plane0: *const f32, r: usize, i: usize| -> Option<*const f32> {
        if r >= r1 {
            return None;
        }
        let (img, th) = (r / tl.th, r % tl.th);
        let ir = (2 * th + i) as isize - ph;
        if ir < 0 || ir >= g.h as isize {
            return None;
        }
        Some(
            plane0
                .wrapping_add(img * cin * hw)
                .wrapping_offset(ir * g.w as isize),
        )
    };
    let rpv = rows_per_vector(tl.tw);
    if rpv > 1 {
        let idx: [__m512i; 4] = std::array::from_fn(|k| {
            _mm512_loadu_si512(packed_index(rpv, tl.tw, k).as_ptr().cast())
        });
        // Columns -pw.. of each row: 16 (two rows per vector) or 8.
        let mask = col_mask(-pw, g.w) & if rpv == 2 { u16::MAX } else { 0xff };
        // Masked-off lanes are not read (no fault), so the pointers may
        // point outside the row.
        let ld = |p: Option<*const f32>| match p {
            Some(p) => _mm512_maskz_loadu_ps(mask, p.wrapping_offset(-pw)),
            None => _mm512_setzero_ps(),
        };
        for ci in 0..cin {
            let plane0 = x.as_ptr().add(ci * hw);
            let mut r = r0;
            while r < r1 {
                let mut t = [[_mm512_setzero_ps(); 4]; 4];
                for (i, ti) in t.iter_mut().enumerate() {
                    let (a, b) = if rpv == 2 {
                        (ld(row_at(plane0, r, i)), ld(row_at(plane0, r + 1, i)))
                    } else {
                        let q: [__m512; 4] = std::array::from_fn(|k| ld(row_at(plane0, r + k, i)));
                        (
                            _mm512_shuffle_f32x4::<0x44>(q[0], q[1]),
                            _mm512_shuffle_f32x4::<0x44>(q[2], q[3]),
                        )
                    };
                    let p: [__m512; 4] =
                        std::array::from_fn(|k| _mm512_permutex2var_ps(a, idx[k], b));
                    *ti = row_transform(p[0], p[1], p[2], p[3]);
                }
                store_v(&t, vp, xs, ci * tstride + (r - r0) * tl.tw);
                r += rpv;
            }
        }
        return;
    }
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for ci in 0..cin {
        let plane0 = x.as_ptr().add(ci * hw);
        for r in r0..r1 {
            let t0 = (r - r0) * tl.tw;
            let mut tw0 = 0;
            while tw0 < tl.tw {
                let c0 = 2 * tw0 as isize - pw;
                let masks = [
                    col_mask(c0, g.w),
                    col_mask(c0 + 16, g.w),
                    col_mask(c0 + 2, g.w),
                    col_mask(c0 + 18, g.w),
                ];
                let mut t = [[_mm512_setzero_ps(); 4]; 4];
                for (i, ti) in t.iter_mut().enumerate() {
                    let Some(row) = row_at(plane0, r, i) else {
                        continue;
                    };
                    let ld = |k: usize, off: isize| {
                        _mm512_maskz_loadu_ps(masks[k], row.wrapping_offset(c0 + off))
                    };
                    let (lo, hi, lo2, hi2) = (ld(0, 0), ld(1, 16), ld(2, 2), ld(3, 18));
                    *ti = row_transform(
                        _mm512_permutex2var_ps(lo, even, hi),
                        _mm512_permutex2var_ps(lo, odd, hi),
                        _mm512_permutex2var_ps(lo2, even, hi2),
                        _mm512_permutex2var_ps(lo2, odd, hi2),
                    );
                }
                store_v(&t, vp, xs, ci * tstride + t0 + tw0);
                tw0 += L;
            }
        }
    }
}

/// `y = A^T M A + bias` for tile rows `r0..r1` and the `ych` output
/// channels from block `b0` on (`M` is 16 matrices of `blocks*CO` rows of
/// `tstride`, packed like `V`).
///
/// Safety: AVX-512F; `m` holds the group's products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn output_transform(
    m: &[f32],
    bias: Option<&[f32]>,
    g: &Geom,
    tl: Tiles,
    r0: usize,
    r1: usize,
    (b0, ych): (usize, usize),
    y: &mut [f32],
    tstride: usize,
) {
    use std::arch::x86_64::*;
    let howo = g.howo();
    let ms = xi_stride(ych.div_ceil(CO) * CO, tstride);
    assert!(m.len() >= 16 * ms);
    assert!(y.len() >= (r1 - 1) / tl.th * ych * howo + ych * howo);
    let yp = y.as_mut_ptr();
    let mask = |n: isize| -> u16 {
        match n {
            n if n >= 16 => u16::MAX,
            n if n <= 0 => 0,
            n => (1u16 << n) - 1,
        }
    };
    let rpv = rows_per_vector(tl.tw);
    // Interleave tables: row `rho` of a packed vector, tiles `rho*tw..`,
    // as `[y0[t], y1[t], ...]` (all 16 lanes when rows are not packed).
    let inter: [__m512i; 4] = std::array::from_fn(|rho| {
        let base = if rpv == 1 { 0 } else { rho * tl.tw };
        let t: [i32; 16] = std::array::from_fn(|l| ((l % 2) * 16 + (base + l / 2) % 16) as i32);
        _mm512_loadu_si512(t.as_ptr().cast())
    });
    let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for c in 0..ych {
        let bv = _mm512_set1_ps(bias.map_or(0.0, |b| b[b0 * CO + c]));
        let mc = m.as_ptr().add(c * tstride);
        let mut r = r0;
        while r < r1 {
            let t0 = (r - r0) * tl.tw;
            let mut tw0 = 0;
            while tw0 < tl.tw {
                let mv: [__m512; 16] =
                    std::array::from_fn(|xi| _mm512_loadu_ps(mc.add(xi * ms + t0 + tw0)));
                let mut ys = [[_mm512_setzero_ps(); 2]; 2];
                for (a, ya) in ys.iter_mut().enumerate() {
                    let s: [__m512; 4] = std::array::from_fn(|j| {
                        if a == 0 {
                            _mm512_add_ps(_mm512_add_ps(mv[j], mv[4 + j]), mv[8 + j])
                        } else {
                            _mm512_sub_ps(_mm512_sub_ps(mv[4 + j], mv[8 + j]), mv[12 + j])
                        }
                    });
                    ya[0] = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[0], s[1]), s[2]), bv);
                    ya[1] = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[1], s[2]), s[3]), bv);
                }
                let cols = g.wo as isize - 2 * tw0 as isize;
                for (rho, idx) in inter.iter().enumerate().take(rpv.min(r1 - r)) {
                    let (img, th) = ((r + rho) / tl.th, (r + rho) % tl.th);
                    let yc = yp.add((img * ych + c) * howo);
                    for (a, ya) in ys.iter().enumerate() {
                        let oh = 2 * th + a;
                        if oh >= g.ho {
                            break;
                        }
                        let dst = yc.add(oh * g.wo + 2 * tw0);
                        let lo = _mm512_permutex2var_ps(ya[0], *idx, ya[1]);
                        _mm512_mask_storeu_ps(dst, mask(cols), lo);
                        if cols > 16 {
                            let hi = _mm512_permutex2var_ps(ya[0], hi_idx, ya[1]);
                            _mm512_mask_storeu_ps(dst.add(16), mask(cols - 16), hi);
                        }
                    }
                }
                tw0 += L;
            }
            r += rpv;
        }
    }
}
