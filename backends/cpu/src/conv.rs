//! 2-d convolution (NCHW) and transposed convolution, forward and backward,
//! as gemm over im2col buffers. A 1x1/stride-1/unpadded conv is a plain
//! batched matmul; anything else is im2col of a block of images into a
//! reused buffer and one gemm per group, with blocks spread over rayon
//! threads when there are enough of them (else gemm parallelises inside).
//! All tensors are contiguous; weights are `[Cout, Cin/groups, Kh, Kw]`
//! (conv) or `[Cin, Cout/groups, Kh, Kw]` (transposed conv), as PyTorch.
//!
//! Forward tuning, measured on the 2-core AVX-512 box on the bench_ops
//! case 128x32x13x13 * 64x32x3x3 p1 against the 4096x784 @ 784x256 matmul
//! interleaved in one process (GFLOP/s, p90 of 40-100 runs; the box is
//! shared, so only ratios within one run mean anything):
//! - before: channels-major `[cout, cols]` gemm per block of 2 images
//!   (338 columns, blocks over threads) + shuffle: 225 vs matmul 340-390
//!   (0.58-0.66); about 2.4 ms gemm, 0.5 ms im2col, 0.35 ms shuffle.
//! - gemm alone on a ready im2col, 338-column blocks over threads:
//!   channels-major 300, pixel-major `[cols, cout]` 326 (matmul 352).
//!   One big gemm with Rayon(2) over all 21632 columns: channels-major
//!   206, pixel-major 287, pixel-major from a pixel-major im2col 339.
//! - pixel-major blocks + scalar tiled transpose: no gain (0.6 ms for the
//!   transpose); with an AVX-512 gather transpose fused with the bias:
//!   +8%; lhs given as W^T (gemm's packing becomes a copy): +2-3%. Kept:
//!   p90 250-260 vs matmul 335-345 (0.73-0.77).
//! - per-image gemm straight into the output (no shuffle): -3%.
//! - implicit GEMM, 9 per-tap gemms of depth Cin on a zero-padded copy
//!   (accumulating, 13-25% junk columns): 0.40-0.45 of matmul.
//! - kernel-row GEMM (Kw shifted copies, images stacked sharing padding
//!   rows, Kh accumulating gemms of depth Cin*Kw, 7% junk rows): same as the
//!   kept path, less general; not kept.
//! - 169, 338 or 676 columns per block: within noise; 1352+: -10%.
//! - 5x5 Cin=1 Cout=32: pixel-major 35 vs channels-major 45, hence
//!   `PIXEL_MAJOR_MIN_COUT`.
//! - then (bench_ops, quiet box, matmul 355-395): 16x16 register transpose
//!   instead of gathers for whole tiles: the transpose + first touch of
//!   the output still cost ~0.4 ms; output allocated uninitialized
//!   (no calloc zeroing): 250 -> 265-295; per-thread scratch kept between
//!   calls (rayon built 16 fresh im2col buffers per call): +3-4%.
//!   Ratio conv/matmul 0.69-0.77 from run to run.
//! - kernel-row GEMM again on top of all that: 267-296 vs 285-296 for the
//!   kept path in alternating runs: no gain.

use crate::element::Float;
use crate::matmul::{matmul_impl, matmul_into, MatLayout};
use rayon::prelude::*;
use std::any::Any;
use std::cell::RefCell;
use std::mem::MaybeUninit;

mod direct;
mod wcache;
mod wgrad;
mod winograd;

#[doc(hidden)]
pub use direct::force_avx2;

/// Stride, padding, dilation and groups of a 2-d convolution; pairs are
/// `(h, w)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Conv2dParams {
    pub stride: (usize, usize),
    pub padding: (usize, usize),
    pub dilation: (usize, usize),
    pub groups: usize,
}

impl Conv2dParams {
    /// From the `[h, w]` arrays the graph IR stores.
    pub fn from_arrays(
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    ) -> Conv2dParams {
        Conv2dParams {
            stride: (stride[0], stride[1]),
            padding: (padding[0], padding[1]),
            dilation: (dilation[0], dilation[1]),
            groups,
        }
    }
}

impl Default for Conv2dParams {
    fn default() -> Self {
        Conv2dParams {
            stride: (1, 1),
            padding: (0, 0),
            dilation: (1, 1),
            groups: 1,
        }
    }
}

fn out_len(i: usize, k: usize, s: usize, p: usize, d: usize) -> usize {
    let span = d * (k - 1) + 1;
    assert!(
        i + 2 * p >= span,
        "conv2d: kernel span {span} larger than padded input {}",
        i + 2 * p
    );
    (i + 2 * p - span) / s + 1
}

/// PyTorch's conv2d output `(Ho, Wo)` for input `(H, W)` and kernel
/// `(Kh, Kw)`: `(H + 2p - d*(k-1) - 1) / s + 1`.
pub fn conv2d_output_size(
    input_hw: (usize, usize),
    kernel: (usize, usize),
    p: &Conv2dParams,
) -> (usize, usize) {
    (
        out_len(input_hw.0, kernel.0, p.stride.0, p.padding.0, p.dilation.0),
        out_len(input_hw.1, kernel.1, p.stride.1, p.padding.1, p.dilation.1),
    )
}

/// PyTorch's conv_transpose2d output `(Ho, Wo)`:
/// `(H - 1)*s - 2p + d*(k-1) + output_padding + 1`.
pub fn conv_transpose2d_output_size(
    input_hw: (usize, usize),
    kernel: (usize, usize),
    p: &Conv2dParams,
    output_padding: (usize, usize),
) -> (usize, usize) {
    let f = |i: usize, k: usize, s: usize, pad: usize, d: usize, op: usize| {
        assert!(
            op < s || op < d,
            "conv_transpose2d: output_padding must be smaller than stride or dilation"
        );
        let full = (i - 1) * s + d * (k - 1) + op + 1;
        assert!(full > 2 * pad, "conv_transpose2d: output size would be < 1");
        full - 2 * pad
    };
    (
        f(
            input_hw.0,
            kernel.0,
            p.stride.0,
            p.padding.0,
            p.dilation.0,
            output_padding.0,
        ),
        f(
            input_hw.1,
            kernel.1,
            p.stride.1,
            p.padding.1,
            p.dilation.1,
            output_padding.1,
        ),
    )
}

/// The sizes of one convolution `y = conv(x, w)`: x `[n, c, h, w]`,
/// w `[cout, cg, kh, kw]`, y `[n, cout, ho, wo]`.
#[derive(Clone, Copy, Debug)]
struct Geom {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    cout: usize,
    kh: usize,
    kw: usize,
    ho: usize,
    wo: usize,
    p: Conv2dParams,
}

impl Geom {
    fn new(
        x_shape: [usize; 4],
        w_shape: [usize; 4],
        ho: usize,
        wo: usize,
        p: &Conv2dParams,
    ) -> Geom {
        let [n, c, h, w] = x_shape;
        let [cout, cg, kh, kw] = w_shape;
        let g = p.groups;
        assert!(g >= 1, "conv2d: groups must be >= 1");
        assert!(
            c % g == 0 && cout % g == 0,
            "conv2d: channels ({c} in, {cout} out) not divisible by groups {g}"
        );
        assert_eq!(
            cg,
            c / g,
            "conv2d: weight has {cg} input channels per group, expected {}",
            c / g
        );
        assert!(p.stride.0 > 0 && p.stride.1 > 0 && p.dilation.0 > 0 && p.dilation.1 > 0);
        Geom {
            n,
            c,
            h,
            w,
            cout,
            kh,
            kw,
            ho,
            wo,
            p: *p,
        }
    }
    fn cg(&self) -> usize {
        self.c / self.p.groups
    }
    fn coutg(&self) -> usize {
        self.cout / self.p.groups
    }
    /// Rows of one group's im2col matrix.
    fn kg(&self) -> usize {
        self.cg() * self.kh * self.kw
    }
    fn hw(&self) -> usize {
        self.h * self.w
    }
    fn howo(&self) -> usize {
        self.ho * self.wo
    }
    fn x_len(&self) -> usize {
        self.n * self.c * self.hw()
    }
    fn y_len(&self) -> usize {
        self.n * self.cout * self.howo()
    }
    fn w_len(&self) -> usize {
        self.cout * self.kg()
    }
    fn is_pointwise(&self) -> bool {
        self.kh == 1
            && self.kw == 1
            && self.p.stride == (1, 1)
            && self.p.padding == (0, 0)
            && (self.ho, self.wo) == (self.h, self.w)
    }
    /// Stride 1 with output rows as wide as input rows: a kernel tap's
    /// window is a contiguous shifted range of the input plane.
    fn same_pitch(&self) -> bool {
        self.p.stride == (1, 1) && self.wo == self.w
    }
    /// Kernel tap `t = i*kw + j`: `(i, j, oh_lo, oh_hi, ow_lo, ow_hi)`, the
    /// outputs whose input for that tap is inside the image.
    fn tap(&self, t: usize) -> (usize, usize, usize, usize, usize, usize) {
        let (i, j) = (t / self.kw, t % self.kw);
        let (oh_lo, oh_hi) = valid_range(
            self.h,
            self.ho,
            i,
            self.p.stride.0,
            self.p.padding.0,
            self.p.dilation.0,
        );
        let (ow_lo, ow_hi) = valid_range(
            self.w,
            self.wo,
            j,
            self.p.stride.1,
            self.p.padding.1,
            self.p.dilation.1,
        );
        (i, j, oh_lo, oh_hi, ow_lo, ow_hi)
    }
    /// Multiply-adds of one image's gemm (all groups).
    fn macs_per_image(&self) -> usize {
        self.cout * self.kg() * self.howo()
    }

    /// Images per block and whether blocks run in parallel (each gemm on
    /// one thread) or one after another (gemm parallel inside).
    fn plan(&self) -> (usize, bool) {
        let threads = rayon::current_num_threads();
        // Enough columns per gemm for the microkernel to run at full speed,
        // measured with bench_ops; bounded so the im2col buffer stays small.
        let target_cols = COLS_PER_BLOCK;
        let howo = self.howo().max(1);
        let mut b = target_cols.div_ceil(howo).clamp(1, self.n.max(1));
        let max_b = (MAX_COLS_ELEMS / (self.c * self.kh * self.kw * howo).max(1)).max(1);
        b = b.min(max_b);
        if threads > 1 && self.n >= threads && self.macs_per_image() * self.n >= PAR_MACS {
            // Parallel over blocks: make at least 2 blocks per thread
            // so the load balances.
            let b = b.min(self.n.div_ceil(2 * threads)).max(1);
            (b, true)
        } else {
            (b, false)
        }
    }
}

/// Target im2col columns (images x output pixels) per gemm: measured with
/// bench_ops on a 2-core AVX-512 machine, 169..676 columns per block ran
/// within noise of each other and 1200+ clearly slower (the block's im2col
/// buffer falls out of L2 before gemm reads it).
const COLS_PER_BLOCK: usize = 320;
/// Output channels per group from which the forward gemm writes
/// pixel-major blocks (gemm's f32 AVX-512 microkernel is 64 rows tall; at
/// 32 channels the 5x5 bench case ran 20% slower pixel-major).
const PIXEL_MAJOR_MIN_COUT: usize = 48;
/// Largest im2col buffer (elements) per block.
const MAX_COLS_ELEMS: usize = 1 << 22;
/// Total multiply-adds below which a conv runs on one thread. 2^16, not
/// 2^18: complex_net's batch-8 3->16 conv (221K MACs) on two threads took
/// the compiled forward from 0.030-0.034 to 0.024-0.026 ms (kiln bench,
/// old and new binary alternating, 2 threads); seed_cnn and test_net
/// within noise.
const PAR_MACS: usize = 1 << 16;

/// Valid output range `[lo, hi)` along one axis for kernel tap `k`: the
/// outputs `o` whose input `o*s + k*d - p` lies in `[0, len)`.
#[inline]
fn valid_range(len: usize, out: usize, k: usize, s: usize, p: usize, d: usize) -> (usize, usize) {
    let kd = k * d;
    // o*s + kd >= p
    let lo = if p > kd { (p - kd).div_ceil(s) } else { 0 };
    // o*s + kd < len + p
    let hi = if len + p > kd {
        (len + p - kd).div_ceil(s)
    } else {
        0
    };
    (lo.min(out), hi.min(out).max(lo.min(out)))
}

/// Zeroes a slice that is usually 0-2 long without a memset call.
#[inline(always)]
fn zero_small<T: Float>(s: &mut [T]) {
    match s.len() {
        0 => {}
        1 => s[0] = T::zero(),
        2 => {
            s[0] = T::zero();
            s[1] = T::zero();
        }
        _ => s.fill(T::zero()),
    }
}

/// im2col of `nb` images `x` (`[nb, c, h, w]`) into `cols`, a row-major
/// `[c*kh*kw, nb*ho*wo]` matrix: row `(ci*kh + i)*kw + j`, column
/// `b*ho*wo + oh*wo + ow` holds `x[b, ci, oh*s + i*d - p, ow*s + j*d - p]`
/// (0 in the padding).
fn im2col<T: Float>(x: &[T], nb: usize, g: &Geom, cols: &mut [T], parallel: bool) {
    let (howo, hw) = (g.howo(), g.hw());
    let ncols = nb * howo;
    let (sh, sw) = g.p.stride;
    let (ph, pw) = g.p.padding;
    let (dh, dw) = g.p.dilation;
    let same_pitch = g.same_pitch();
    let khw = g.kh * g.kw;
    let row = |r: usize, dst: &mut [T]| {
        let ci = r / khw;
        let (i, j, oh_lo, oh_hi, ow_lo, ow_hi) = g.tap(r - ci * khw);
        for b in 0..nb {
            let plane = &x[(b * g.c + ci) * hw..][..hw];
            let d = &mut dst[b * howo..][..howo];
            zero_small(&mut d[..oh_lo * g.wo]);
            zero_small(&mut d[oh_hi * g.wo..]);
            if same_pitch && oh_lo < oh_hi && ow_lo < ow_hi {
                // Output and input rows have the same pitch, so the valid
                // window is one contiguous shifted copy; the columns that
                // wrapped around are zeroed afterwards.
                let start = oh_lo * g.wo + ow_lo;
                let end = (oh_hi - 1) * g.wo + ow_hi;
                let src0 = (oh_lo + i * dh - ph) * g.w + ow_lo + j * dw - pw;
                d[start..end].copy_from_slice(&plane[src0..src0 + (end - start)]);
                if ow_lo > 0 || ow_hi < g.wo {
                    // A few elements per row: plain stores beat memset calls.
                    for row in d[oh_lo * g.wo..oh_hi * g.wo].chunks_exact_mut(g.wo) {
                        zero_small(&mut row[..ow_lo]);
                        zero_small(&mut row[ow_hi..]);
                    }
                }
                continue;
            }
            for oh in oh_lo..oh_hi {
                let ih = oh * sh + i * dh - ph;
                let drow = &mut d[oh * g.wo..][..g.wo];
                drow[..ow_lo].fill(T::zero());
                drow[ow_hi..].fill(T::zero());
                if ow_lo < ow_hi {
                    let iw0 = ow_lo * sw + j * dw - pw;
                    let src = &plane[ih * g.w..][..g.w];
                    if sw == 1 {
                        drow[ow_lo..ow_hi].copy_from_slice(&src[iw0..iw0 + (ow_hi - ow_lo)]);
                    } else {
                        for (t, o) in drow[ow_lo..ow_hi].iter_mut().enumerate() {
                            *o = src[iw0 + t * sw];
                        }
                    }
                }
            }
        }
    };
    let cols = &mut cols[..g.c * g.kh * g.kw * ncols];
    if parallel && cols.len() >= crate::PAR_THRESHOLD {
        crate::par::chunks_mut(cols, crate::PAR_THRESHOLD / 2, ncols, |start, piece| {
            for (i, d) in piece.chunks_mut(ncols).enumerate() {
                row(start / ncols + i, d);
            }
        });
    } else {
        for (r, d) in cols.chunks_mut(ncols).enumerate() {
            row(r, d);
        }
    }
}

/// The adjoint of `im2col`: adds each column entry back onto the input
/// position it was read from. `dx` (`[nb, c, h, w]`) must be zeroed.
fn col2im<T: Float>(cols: &[T], nb: usize, g: &Geom, dx: &mut [T], parallel: bool) {
    let (howo, hw) = (g.howo(), g.hw());
    let ncols = nb * howo;
    let (sh, sw) = g.p.stride;
    let (ph, pw) = g.p.padding;
    let (dh, dw) = g.p.dilation;
    let same_pitch = g.same_pitch();
    let taps: Vec<_> = (0..g.kh * g.kw).map(|t| g.tap(t)).collect();
    // One task per (image, channel) plane: no two tasks write one element.
    let plane_fn = |bc: usize, plane: &mut [T]| {
        let (b, ci) = (bc / g.c, bc % g.c);
        for (tap, &(i, j, oh_lo, oh_hi, ow_lo, ow_hi)) in taps.iter().enumerate() {
            {
                if ow_lo >= ow_hi {
                    continue;
                }
                let r = ci * g.kh * g.kw + tap;
                let src = &cols[r * ncols + b * howo..][..howo];
                if same_pitch && ow_lo == 0 && ow_hi == g.wo && oh_lo < oh_hi {
                    // Whole rows valid and equal pitches: one shifted add.
                    let start = oh_lo * g.wo;
                    let end = oh_hi * g.wo;
                    let dst0 = (oh_lo + i * dh - ph) * g.w + j * dw - pw;
                    for (d, &v) in plane[dst0..dst0 + (end - start)]
                        .iter_mut()
                        .zip(&src[start..end])
                    {
                        *d += v;
                    }
                    continue;
                }
                for oh in oh_lo..oh_hi {
                    let ih = oh * sh + i * dh - ph;
                    let iw0 = ow_lo * sw + j * dw - pw;
                    let dst = &mut plane[ih * g.w..][..g.w];
                    let s = &src[oh * g.wo + ow_lo..oh * g.wo + ow_hi];
                    if sw == 1 {
                        for (d, &v) in dst[iw0..iw0 + s.len()].iter_mut().zip(s) {
                            *d += v;
                        }
                    } else {
                        for (t, &v) in s.iter().enumerate() {
                            dst[iw0 + t * sw] += v;
                        }
                    }
                }
            }
        }
    };
    let dx = &mut dx[..nb * g.c * hw];
    if parallel && cols.len() >= crate::PAR_THRESHOLD {
        dx.par_chunks_mut(hw)
            .enumerate()
            .for_each(|(bc, p)| plane_fn(bc, p));
    } else {
        for (bc, p) in dx.chunks_mut(hw).enumerate() {
            plane_fn(bc, p);
        }
    }
}

/// Copies channels-major `[cout, nb, howo]` into image-major
/// `[nb, cout, howo]`, adding `bias[co]`; or the reverse when `to_image`
/// is false (then bias is ignored).
fn shuffle<T: Float>(
    src: &[T],
    dst: &mut [T],
    nb: usize,
    cout: usize,
    howo: usize,
    bias: Option<&[T]>,
    to_image: bool,
) {
    for b in 0..nb {
        for co in 0..cout {
            let cm = (co * nb + b) * howo;
            let im = (b * cout + co) * howo;
            if to_image {
                let d = &mut dst[im..im + howo];
                d.copy_from_slice(&src[cm..cm + howo]);
                if let Some(bias) = bias {
                    let bv = bias[co];
                    for v in d {
                        *v += bv;
                    }
                }
            } else {
                dst[cm..cm + howo].copy_from_slice(&src[im..im + howo]);
            }
        }
    }
}

/// Transposes pixel-major `[nb*howo, cout]` into `[nb, cout, howo]`,
/// adding `bias[co]`, in tiles that stay in L1.
fn unshuffle_pixels<T: Float>(
    src: &[T],
    dst: &mut [MaybeUninit<T>],
    nb: usize,
    cout: usize,
    howo: usize,
    bias: Option<&[T]>,
) {
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && is_x86_feature_detected!("avx512f")
    {
        // SAFETY: T is f32 (checked), so the casts are identity casts; the
        // feature is detected above.
        unsafe {
            let src = std::slice::from_raw_parts(src.as_ptr() as *const f32, src.len());
            let dst = std::slice::from_raw_parts_mut(
                dst.as_mut_ptr() as *mut MaybeUninit<f32>,
                dst.len(),
            );
            let bias = bias.map(|b| std::slice::from_raw_parts(b.as_ptr() as *const f32, b.len()));
            unshuffle_pixels_avx512(src, dst, nb, cout, howo, bias);
        }
        return;
    }
    const TP: usize = 16;
    const TC: usize = 16;
    for b in 0..nb {
        let s = &src[b * howo * cout..][..howo * cout];
        let d = &mut dst[b * cout * howo..][..cout * howo];
        for c0 in (0..cout).step_by(TC) {
            let c1 = (c0 + TC).min(cout);
            for p0 in (0..howo).step_by(TP) {
                let p1 = (p0 + TP).min(howo);
                for co in c0..c1 {
                    let bv = bias.map_or(T::zero(), |bb| bb[co]);
                    let drow = &mut d[co * howo + p0..co * howo + p1];
                    for (k, v) in drow.iter_mut().enumerate() {
                        v.write(s[(p0 + k) * cout + co] + bv);
                    }
                }
            }
        }
    }
}

/// `unshuffle_pixels` for f32 with AVX-512: whole 16x16 tiles are
/// transposed in registers, the edges are gathered (16 pixels of one
/// channel per gather).
///
/// Safety: the CPU must support avx512f; `src` holds `nb*howo*cout` and
/// `dst` `nb*cout*howo` elements.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn unshuffle_pixels_avx512(
    src: &[f32],
    dst: &mut [MaybeUninit<f32>],
    nb: usize,
    cout: usize,
    howo: usize,
    bias: Option<&[f32]>,
) {
    use std::arch::x86_64::*;
    assert!(src.len() >= nb * howo * cout);
    assert!(dst.len() >= nb * cout * howo);
    assert!(16 * cout * 4 < i32::MAX as usize);
    let c = cout as i32;
    let idx = _mm512_setr_epi32(
        0,
        c,
        2 * c,
        3 * c,
        4 * c,
        5 * c,
        6 * c,
        7 * c,
        8 * c,
        9 * c,
        10 * c,
        11 * c,
        12 * c,
        13 * c,
        14 * c,
        15 * c,
    );
    let tail = howo % 16;
    let mask: __mmask16 = ((1u32 << tail) - 1) as u16;
    let (pfull, cfull) = (howo / 16 * 16, cout / 16 * 16);
    for b in 0..nb {
        let s = src.as_ptr().add(b * howo * cout);
        let d = (dst.as_mut_ptr() as *mut f32).add(b * cout * howo);
        // Whole 16x16 tiles: transposed in registers.
        for c0 in (0..cfull).step_by(16) {
            let bv: [__m512; 16] =
                std::array::from_fn(|k| _mm512_set1_ps(bias.map_or(0.0, |bb| bb[c0 + k])));
            for p0 in (0..pfull).step_by(16) {
                let mut r: [__m512; 16] =
                    std::array::from_fn(|k| _mm512_loadu_ps(s.add((p0 + k) * cout + c0)));
                transpose16(&mut r);
                for (k, v) in r.iter().enumerate() {
                    _mm512_storeu_ps(d.add((c0 + k) * howo + p0), _mm512_add_ps(*v, bv[k]));
                }
            }
        }
        // The rest (pixel tail, channel tail): one gather per 16 pixels.
        for co in 0..cout {
            let bv = _mm512_set1_ps(bias.map_or(0.0, |bb| bb[co]));
            let drow = d.add(co * howo);
            let mut p = if co < cfull { pfull } else { 0 };
            while p + 16 <= howo {
                let v = _mm512_i32gather_ps::<4>(idx, s.add(p * cout + co));
                _mm512_storeu_ps(drow.add(p), _mm512_add_ps(v, bv));
                p += 16;
            }
            if tail > 0 {
                let v = _mm512_mask_i32gather_ps::<4>(
                    _mm512_setzero_ps(),
                    mask,
                    idx,
                    s.add(p * cout + co),
                );
                _mm512_mask_storeu_ps(drow.add(p), mask, _mm512_add_ps(v, bv));
            }
        }
    }
}

/// Transposes the 16x16 matrix whose rows are `r` in place.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
pub(crate) fn transpose16(r: &mut [std::arch::x86_64::__m512; 16]) {
    use std::arch::x86_64::*;
    // 32-bit interleave within 128-bit lanes of row pairs.
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // 64-bit interleave of pairs of those.
    for q in 0..4 {
        let (a0, a1, a2, a3) = (t[4 * q], t[4 * q + 1], t[4 * q + 2], t[4 * q + 3]);
        let pd = _mm512_castps_pd;
        r[4 * q] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a0), pd(a2)));
        r[4 * q + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a0), pd(a2)));
        r[4 * q + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(pd(a1), pd(a3)));
        r[4 * q + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(pd(a1), pd(a3)));
    }
    // 128-bit lanes: rows 4 apart, then rows 8 apart.
    for h in 0..2 {
        for i in 0..4 {
            let (a, b) = (r[8 * h + i], r[8 * h + 4 + i]);
            t[8 * h + i] = _mm512_shuffle_f32x4::<0x88>(a, b);
            t[8 * h + 4 + i] = _mm512_shuffle_f32x4::<0xdd>(a, b);
        }
    }
    for i in 0..8 {
        r[i] = _mm512_shuffle_f32x4::<0x88>(t[i], t[8 + i]);
        r[8 + i] = _mm512_shuffle_f32x4::<0xdd>(t[i], t[8 + i]);
    }
}

fn add_bias<T: Float>(y: &mut [T], bias: &[T], cout: usize, plane: usize) {
    if plane == 0 {
        return;
    }
    let body = |(i, p): (usize, &mut [T])| {
        let b = bias[i % cout];
        for v in p {
            *v += b;
        }
    };
    crate::par::chunks_mut(y, crate::PAR_THRESHOLD / 2, plane, |start, piece| {
        for (i, p) in piece.chunks_mut(plane).enumerate() {
            body((start / plane + i, p));
        }
    });
}

/// Reusable per-thread buffers (im2col matrix and a channels-major
/// output/gradient block), grown on demand and never shrunk.
struct Scratch<T> {
    cols: Vec<T>,
    tmp: Vec<T>,
    /// The transposed weight of the pixel-major forward.
    wt: Vec<T>,
}

impl<T: Float> Scratch<T> {
    fn new() -> Self {
        Scratch {
            cols: Vec::new(),
            tmp: Vec::new(),
            wt: Vec::new(),
        }
    }
}

thread_local! {
    /// Each thread's `Scratch` buffers kept between calls (at most one per
    /// element type): rayon's `for_each_init` builds a fresh state for
    /// every piece it splits off (16 per 3x3 bench conv), and growing new
    /// buffers each time cost more than the shuffle.
    static SCRATCH: RefCell<Vec<Box<dyn Any>>> = const { RefCell::new(Vec::new()) };
}

const SCRATCH_PER_TYPE: usize = 2;

/// A thread's cached `Scratch<T>` (or a new one), returned to the cache
/// when dropped. Up to `SCRATCH_PER_TYPE` are kept per thread and type, so
/// that a caller holding one while rayon runs a block on the same thread
/// (a worker calling a conv) still finds one. The box moves in and out of
/// the cache as is: steady-state calls allocate nothing.
struct Cached<T: Float>(Option<Box<Scratch<T>>>);

impl<T: Float> Cached<T> {
    fn take() -> Self {
        let cached = SCRATCH
            .try_with(|c| {
                let mut c = c.try_borrow_mut().ok()?;
                let i = c.iter().position(|b| b.is::<Scratch<T>>())?;
                c.swap_remove(i).downcast::<Scratch<T>>().ok()
            })
            .ok()
            .flatten();
        Cached(Some(cached.unwrap_or_else(|| Box::new(Scratch::new()))))
    }

    fn s(&mut self) -> &mut Scratch<T> {
        self.0.as_mut().expect("present until dropped")
    }
}

impl<T: Float> Drop for Cached<T> {
    fn drop(&mut self) {
        let Some(s) = self.0.take() else { return };
        let _ = SCRATCH.try_with(|c| {
            if let Ok(mut c) = c.try_borrow_mut() {
                if c.iter().filter(|b| b.is::<Scratch<T>>()).count() < SCRATCH_PER_TYPE {
                    c.push(s);
                }
            }
        });
    }
}

/// The first `len` elements of `v`, growing it (with zeros) if needed;
/// the contents are whatever the previous user left.
fn grow<T: Float>(v: &mut Vec<T>, len: usize) -> &mut [T] {
    if v.len() < len {
        v.resize(len, T::zero());
    }
    &mut v[..len]
}

/// Runs `f(first_image, images, out_chunk, scratch, parallel_inside)` over
/// blocks of images whose outputs are consecutive `per_image`-element
/// chunks of `out`; the sequential path uses `outer`'s scratch.
fn for_blocks<T: Float, U: Send>(
    out: &mut [U],
    per_image: usize,
    n: usize,
    plan: (usize, bool),
    outer: &mut Scratch<T>,
    f: impl Fn(usize, usize, &mut [U], &mut Scratch<T>, bool) + Sync + Send,
) {
    let (b, par_blocks) = plan;
    if n == 0 || per_image == 0 {
        return;
    }
    if par_blocks {
        // Contiguous runs of blocks, one per thread (the static pool: see
        // `par`), each with its thread's scratch.
        let blocks = n.div_ceil(b);
        let parts = blocks.min(crate::par::threads());
        crate::par::chunks_mut_in(out, parts, b * per_image, |start, piece| {
            let mut s = Cached::take();
            for (i, chunk) in piece.chunks_mut(b * per_image).enumerate() {
                let n0 = start / per_image + i * b;
                f(n0, chunk.len() / per_image, chunk, s.s(), false)
            }
        });
    } else {
        for (i, chunk) in out.chunks_mut(b * per_image).enumerate() {
            f(i * b, chunk.len() / per_image, chunk, outer, true);
        }
    }
}

/// One part of a forward kernel's work: images `n0..n0 + nimg`, output
/// channel blocks `b0..b1` into `y` (`[nimg][channels of those blocks]
/// [ho*wo]`), calling `done(i, y_i)` for each image `i` it finishes.
type ForwardPart<'a> = dyn Fn(usize, usize, usize, usize, &mut [f32], &mut Scratch<f32>, &mut dyn FnMut(usize, &mut [f32]))
    + Sync
    + 'a;

/// The thread split shared by the direct and Winograd forward kernels
/// (`blocks` blocks of `block` output channels): with fewer images than
/// threads each image's blocks are split too and `epi` runs once an
/// image's parts are joined (n=1 64->64 3x3 on 112x112: one thread per
/// image left the second core idle); else contiguous runs of images, one
/// per thread of the static pool; below `PAR_MACS` on this thread.
fn forward_parts(
    g: &Geom,
    y: &mut [f32],
    blocks: usize,
    block: usize,
    epi: Option<ImageEpilogue<'_, f32>>,
    part: &ForwardPart<'_>,
) {
    let per_image = g.cout * g.howo();
    let threads = rayon::current_num_threads();
    let parallel = threads > 1 && g.macs_per_image() * g.n >= PAR_MACS;
    if parallel && g.n < threads && blocks > 1 {
        // One image at a time, its blocks over the static pool (the same
        // threads at every call, so their scratch stays allocated: rayon's
        // pieces could land on a thread without one).
        let parts = threads.min(blocks);
        let bpp = blocks.div_ceil(parts);
        let unit = bpp * block * g.howo();
        for (n, yi) in y.chunks_mut(per_image).enumerate() {
            crate::par::chunks_mut_in(yi, yi.len().div_ceil(unit), unit, |start, ys| {
                let mut s = Cached::<f32>::take();
                let b0 = start / unit * bpp;
                part(n, 1, b0, (b0 + bpp).min(blocks), ys, s.s(), &mut |_, _| {});
            });
            if let Some(f) = epi {
                f(n, yi);
            }
        }
        return;
    }
    let run = |n0: usize, yp: &mut [f32]| {
        let mut s = Cached::<f32>::take();
        part(
            n0,
            yp.len() / per_image,
            0,
            blocks,
            yp,
            s.s(),
            &mut |i, yi| {
                if let Some(f) = epi {
                    f(n0 + i, yi)
                }
            },
        );
    };
    if parallel && g.n > 1 {
        let parts = g.n.min(crate::par::threads());
        crate::par::chunks_mut_in(y, parts, per_image, |start, piece| {
            run(start / per_image, piece)
        });
    } else {
        run(0, y);
    }
}

/// An epilogue called on each finished image's output: `epi(n, y_n)`.
pub type ImageEpilogue<'a, T> = &'a (dyn Fn(usize, &mut [T]) + Sync);

/// Calls `epi` on each of the `nb` images of a finished block that starts
/// at image `n0`.
fn epi_block<T>(epi: Option<ImageEpilogue<'_, T>>, n0: usize, out: &mut [T], per_image: usize) {
    if let Some(f) = epi {
        for (i, yi) in out.chunks_mut(per_image).enumerate() {
            f(n0 + i, yi);
        }
    }
}

/// Forward conv for at least `PIXEL_MAJOR_MIN_COUT` output channels per
/// group: per block, gemm writes a pixel-major `[ncols, cout]` buffer (its
/// microkernel then runs down Cout, reads the im2col matrix unpacked, and
/// the lhs W^T packs as a plain copy), which is transposed into the output
/// with the bias added; see the measurements at the top of the file.
fn conv_forward_pixel_major<T: Float>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    g: &Geom,
    y: &mut [T],
    epi: Option<ImageEpilogue<'_, T>>,
) {
    let (coutg, kg, howo, groups) = (g.coutg(), g.kg(), g.howo(), g.p.groups);
    let mut outer = Cached::<T>::take();
    // wt[k*cout + co] = w[co, k] (per group: column-major [coutg, kg]).
    let mut wt = std::mem::take(&mut outer.s().wt);
    wt.clear();
    wt.resize(w.len(), T::zero());
    for co in 0..g.cout {
        for k in 0..kg {
            wt[k * g.cout + co] = w[co * kg + k];
        }
    }
    let wt_s = &wt[..];
    // SAFETY: MaybeUninit<T> has T's layout, and only initialized values
    // are written through this view.
    let yu: &mut [MaybeUninit<T>] =
        unsafe { std::slice::from_raw_parts_mut(y.as_mut_ptr() as *mut MaybeUninit<T>, y.len()) };
    let per_image = g.cout * howo;
    for_blocks(
        yu,
        per_image,
        g.n,
        g.plan(),
        outer.s(),
        |n0, nb, out: &mut [MaybeUninit<T>], s: &mut Scratch<T>, par_inside| {
            let ncols = nb * howo;
            let cols = grow(&mut s.cols, g.c * g.kh * g.kw * ncols);
            im2col(&x[n0 * g.c * g.hw()..], nb, g, cols, par_inside);
            let cols = &*cols;
            let tmp = grow(&mut s.tmp, g.cout * ncols);
            let pm = MatLayout {
                offset: 0,
                row_stride: 1,
                col_stride: g.cout,
                batch_stride: 0,
            };
            for gi in 0..groups {
                matmul_impl(
                    tmp,
                    pm.with_offset(gi * coutg),
                    T::zero(),
                    T::one(),
                    wt_s,
                    pm.with_offset(gi * coutg),
                    cols,
                    MatLayout::contiguous(kg, ncols).with_offset(gi * kg * ncols),
                    1,
                    coutg,
                    kg,
                    ncols,
                    par_inside,
                );
            }
            unshuffle_pixels(tmp, out, nb, g.cout, howo, bias);
            // SAFETY: `unshuffle_pixels` wrote every element of the block.
            let out =
                unsafe { std::slice::from_raw_parts_mut(out.as_mut_ptr() as *mut T, out.len()) };
            epi_block(epi, n0, out, per_image);
        },
    );
    outer.s().wt = wt;
}

fn conv_forward<T: Float>(x: &[T], w: &[T], bias: Option<&[T]>, g: &Geom) -> Vec<T> {
    // Every path below writes every element of y.
    let mut y = crate::buffers::alloc_uninit::<T>(g.y_len());
    conv_forward_into(x, w, bias, g, &mut y, None);
    y
}

/// Whether the direct kernel (`direct.rs`) runs this forward: f32 with
/// AVX-512, stride 1, dilation 1, one group. Measured with
/// `bench_ops -- 40 --zoo-conv` (2-core AVX-512 box, shared, so noisy):
/// the direct kernel ran 1.0-4x faster than im2col + gemm on every zoo conv
/// at batch 8 (1->32 5x5: 0.078 vs 0.107 ms; 64->128 3x3 on 6x6: 0.39 vs
/// 0.53; 3->16 on 10x10: 0.005 vs 0.023) and at the throughput batches
/// within noise or faster (16->32 on 8x8, n=1024: 2.8 vs 12.0 ms), so it
/// is taken whenever it applies.
fn use_direct<T: Float>(g: &Geom) -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && !g.is_pointwise()
        && direct::applies(g)
        && DIRECT_FORCE.with(|f| f.get()).unwrap_or(true)
}

thread_local! {
    static DIRECT_FORCE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// For benchmarks and tests: force (`Some(true)`), forbid (`Some(false)`)
/// or leave to the measured rule (`None`) the direct conv kernel on the
/// calling thread.
#[doc(hidden)]
pub fn force_direct(v: Option<bool>) {
    DIRECT_FORCE.with(|f| f.set(v));
}

/// Winograd F(2x2, 3x3) (`conv/winograd.rs`) for f32 3x3 stride-1
/// convs on AVX-512 with at least `WINOGRAD_MIN_CIN` input channels.
fn use_winograd<T: Float>(g: &Geom) -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && winograd::applies(g)
        && WINOGRAD_FORCE.with(|f| f.get()).unwrap_or(
            // Forcing the direct or im2col path (tests, benchmarks) means
            // that path.
            DIRECT_FORCE.with(|f| f.get()).is_none()
                && g.c >= WINOGRAD_MIN_CIN
                && g.cout >= WINOGRAD_MIN_COUT,
        )
}

/// Channels from which Winograd beats the direct kernel: measured with
/// `bench_ops -- 200 --zoo-conv --algo winograd|direct` (2-core AVX-512
/// box, 2 threads): seed_cnn's 32->64 and 64->64 on 13x13 and 64->128 on
/// 6x6 ran 1.6-1.7x faster at n=8 and n=128 (0.141 vs 0.225 ms, 0.259 vs
/// 0.446, 0.138 vs 0.237 at n=8). complex_net's 16->32 on 8x8 ran 1.4-2x
/// slower with the first transforms (one tile row per vector), 1.25x
/// faster once narrow rows were packed (one thread: 2.01 vs 2.51 ms at
/// n=1024, 0.017 vs 0.019 at n=8); its 3->16 stays direct (0.615 vs
/// 1.235 ms: three input channels leave the products too small).
const WINOGRAD_MIN_CIN: usize = 16;
const WINOGRAD_MIN_COUT: usize = 16;

thread_local! {
    static WINOGRAD_FORCE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// For benchmarks and tests: force (`Some(true)`, where it applies),
/// forbid (`Some(false)`) or leave to the measured rule (`None`) the
/// Winograd path on the calling thread.
#[doc(hidden)]
pub fn force_winograd(v: Option<bool>) {
    WINOGRAD_FORCE.with(|f| f.set(v));
}

fn conv_forward_into<T: Float>(
    x: &[T],
    w: &[T],
    bias: Option<&[T]>,
    g: &Geom,
    y: &mut [T],
    epi: Option<ImageEpilogue<'_, T>>,
) {
    assert_eq!(x.len(), g.x_len(), "conv2d: input length");
    assert_eq!(w.len(), g.w_len(), "conv2d: weight length");
    assert_eq!(y.len(), g.y_len(), "conv2d: output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), g.cout, "conv2d: bias length");
    }
    let (cg, coutg, kg, howo, groups) = (g.cg(), g.coutg(), g.kg(), g.howo(), g.p.groups);
    if g.y_len() == 0 {
        return;
    }
    let per_image = g.cout * howo;
    if use_winograd::<T>(g) {
        // SAFETY: T is f32 (checked in use_winograd): identity casts.
        unsafe {
            let c = |s: &[T]| std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len());
            let yf = std::slice::from_raw_parts_mut(y.as_mut_ptr() as *mut f32, y.len());
            let epi_f: Option<ImageEpilogue<'_, f32>> =
                epi.map(|f| std::mem::transmute::<ImageEpilogue<'_, T>, ImageEpilogue<'_, f32>>(f));
            winograd::forward(c(x), c(w), bias.map(c), g, yf, epi_f);
        }
        return;
    }
    if use_direct::<T>(g) {
        // SAFETY: T is f32 (checked in use_direct): identity casts.
        unsafe {
            let c = |s: &[T]| std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len());
            let yf = std::slice::from_raw_parts_mut(y.as_mut_ptr() as *mut f32, y.len());
            let epi_f: Option<ImageEpilogue<'_, f32>> =
                epi.map(|f| std::mem::transmute::<ImageEpilogue<'_, T>, ImageEpilogue<'_, f32>>(f));
            direct::forward(c(x), c(w), bias.map(c), g, yf, epi_f);
        }
        return;
    }
    if !g.is_pointwise() && coutg >= PIXEL_MAJOR_MIN_COUT {
        return conv_forward_pixel_major(x, w, bias, g, y, epi);
    }
    if g.is_pointwise() {
        for gi in 0..groups {
            matmul_into(
                y,
                MatLayout {
                    offset: gi * coutg * howo,
                    row_stride: howo,
                    col_stride: 1,
                    batch_stride: g.cout * howo,
                },
                T::zero(),
                T::one(),
                w,
                MatLayout::contiguous(coutg, cg)
                    .with_offset(gi * coutg * cg)
                    .broadcast(),
                x,
                MatLayout {
                    offset: gi * cg * howo,
                    row_stride: howo,
                    col_stride: 1,
                    batch_stride: g.c * howo,
                },
                g.n,
                coutg,
                cg,
                howo,
            );
        }
        if let Some(b) = bias {
            add_bias(y, b, g.cout, howo);
        }
        if let Some(f) = epi {
            // The whole batch came from one batched matmul: the epilogue
            // runs per image afterwards, images spread over the threads.
            if y.len() >= crate::PAR_THRESHOLD {
                crate::par::chunks_mut(y, crate::PAR_THRESHOLD / 2, per_image, |start, piece| {
                    for (i, yi) in piece.chunks_mut(per_image).enumerate() {
                        f(start / per_image + i, yi);
                    }
                });
            } else {
                epi_block(Some(f), 0, y, per_image);
            }
        }
        return;
    }
    let plan = g.plan();
    let mut outer = Cached::<T>::take();
    for_blocks(
        y,
        per_image,
        g.n,
        plan,
        outer.s(),
        |n0, nb, out, s, par_inside| {
            let ncols = nb * howo;
            let cols = grow(&mut s.cols, g.c * g.kh * g.kw * ncols);
            im2col(&x[n0 * g.c * g.hw()..], nb, g, cols, par_inside);
            let cols = &*cols;
            // One image: gemm straight into the output; else through a
            // channels-major buffer.
            let tmp = grow(&mut s.tmp, if nb == 1 { 0 } else { g.cout * ncols });
            for gi in 0..groups {
                let dst: &mut [T] = if nb == 1 { &mut *out } else { &mut *tmp };
                matmul_impl(
                    dst,
                    MatLayout::contiguous(coutg, ncols).with_offset(gi * coutg * ncols),
                    T::zero(),
                    T::one(),
                    w,
                    MatLayout::contiguous(coutg, kg).with_offset(gi * coutg * kg),
                    cols,
                    MatLayout::contiguous(kg, ncols).with_offset(gi * kg * ncols),
                    1,
                    coutg,
                    kg,
                    ncols,
                    par_inside,
                );
            }
            if nb == 1 {
                if let Some(b) = bias {
                    add_bias(out, b, g.cout, howo);
                }
            } else {
                shuffle(tmp, out, nb, g.cout, howo, bias, true);
            }
            epi_block(epi, n0, out, per_image);
        },
    );
}

/// The stride-1 input gradient as a forward convolution: `dx` is the
/// "full" correlation of `gy` with the weight flipped in both spatial axes
/// and with input/output channels swapped (per group), at padding
/// `(k-1)*d - p`. Returns the geometry of that forward conv and fills `wt`
/// with its weight `[C, Cout/groups, Kh, Kw]`, or None where it does not
/// apply (stride > 1, or padding larger than `(k-1)*d`).
fn backward_input_as_forward<T: Float>(g: &Geom, w: &[T], wt: &mut Vec<T>) -> Option<Geom> {
    if g.p.stride != (1, 1) {
        return None;
    }
    let (dh, dw) = g.p.dilation;
    let ph = ((g.kh - 1) * dh).checked_sub(g.p.padding.0)?;
    let pw = ((g.kw - 1) * dw).checked_sub(g.p.padding.1)?;
    let p2 = Conv2dParams {
        stride: (1, 1),
        padding: (ph, pw),
        dilation: (dh, dw),
        groups: g.p.groups,
    };
    let g2 = Geom::new(
        [g.n, g.cout, g.ho, g.wo],
        [g.c, g.coutg(), g.kh, g.kw],
        g.h,
        g.w,
        &p2,
    );
    let (cg, coutg, khw) = (g.cg(), g.coutg(), g.kh * g.kw);
    wt.clear();
    wt.resize(g.w_len(), T::zero());
    for gi in 0..g.p.groups {
        for col in 0..coutg {
            for cil in 0..cg {
                let src = &w[((gi * coutg + col) * cg + cil) * khw..][..khw];
                let dst = &mut wt[((gi * cg + cil) * coutg + col) * khw..][..khw];
                for (t, &v) in src.iter().enumerate() {
                    dst[khw - 1 - t] = v;
                }
            }
        }
    }
    Some(g2)
}

fn conv_backward_input<T: Float>(gy: &[T], w: &[T], g: &Geom) -> Vec<T> {
    let mut dx = crate::buffers::alloc_uninit::<T>(g.x_len());
    conv_backward_input_into(gy, w, g, &mut dx);
    dx
}

fn conv_backward_input_into<T: Float>(gy: &[T], w: &[T], g: &Geom, dx: &mut [T]) {
    assert_eq!(
        gy.len(),
        g.y_len(),
        "conv2d_backward_input: grad_output length"
    );
    assert_eq!(w.len(), g.w_len(), "conv2d_backward_input: weight length");
    assert_eq!(dx.len(), g.x_len(), "conv2d_backward_input: output length");
    let (cg, coutg, kg, howo, groups) = (g.cg(), g.coutg(), g.kg(), g.howo(), g.p.groups);
    if dx.is_empty() {
        return;
    }
    if !g.is_pointwise() {
        // Stride 1: a forward conv of gy on the direct kernel, when that
        // applies. Measured with the bench_conv_bwd example (2-core
        // AVX-512 box, old binary vs new in one run): complex_net 16->32
        // 3x3 on 8x8, n=1024: 4.30 ms (im2col + gemm + col2im) -> 3.00;
        // seed_cnn 3x3 p1 at n=128: 32->64 on 13x13 3.72 -> 3.38, 64->64
        // 7.25 -> 6.48, 64->128 on 6x6 3.10 -> 2.95.
        // With Winograd where the transposed conv qualifies for it
        // (bench_ops `conv2d 3x3 bwd input`, 128x32x13x13 with 64 out, 2
        // threads: 3.83 ms on im2col + gemm + col2im -> 2.20).
        let mut wt = Vec::new();
        if let Some(g2) = backward_input_as_forward(g, w, &mut wt) {
            if use_winograd::<T>(&g2) || use_direct::<T>(&g2) {
                conv_forward_into(gy, &wt, None, &g2, dx, None);
                return;
            }
        }
    }
    dx.fill(T::zero());
    if g.is_pointwise() {
        for gi in 0..groups {
            matmul_into(
                dx,
                MatLayout {
                    offset: gi * cg * howo,
                    row_stride: howo,
                    col_stride: 1,
                    batch_stride: g.c * howo,
                },
                T::zero(),
                T::one(),
                w,
                MatLayout::contiguous(coutg, cg)
                    .with_offset(gi * coutg * cg)
                    .t()
                    .broadcast(),
                gy,
                MatLayout {
                    offset: gi * coutg * howo,
                    row_stride: howo,
                    col_stride: 1,
                    batch_stride: g.cout * howo,
                },
                g.n,
                cg,
                coutg,
                howo,
            );
        }
        return;
    }
    let plan = g.plan();
    let per_image = g.c * g.hw();
    let mut outer = Cached::<T>::take();
    for_blocks(
        dx,
        per_image,
        g.n,
        plan,
        outer.s(),
        |n0, nb, out, s, par_inside| {
            let ncols = nb * howo;
            let gblock = &gy[n0 * g.cout * howo..][..nb * g.cout * howo];
            let gcm: &[T] = if nb == 1 {
                gblock
            } else {
                let t = grow(&mut s.tmp, g.cout * ncols);
                shuffle(gblock, t, nb, g.cout, howo, None, false);
                t
            };
            let cols = grow(&mut s.cols, g.c * g.kh * g.kw * ncols);
            for gi in 0..groups {
                matmul_impl(
                    cols,
                    MatLayout::contiguous(kg, ncols).with_offset(gi * kg * ncols),
                    T::zero(),
                    T::one(),
                    w,
                    MatLayout::contiguous(coutg, kg)
                        .with_offset(gi * coutg * kg)
                        .t(),
                    gcm,
                    MatLayout::contiguous(coutg, ncols).with_offset(gi * coutg * ncols),
                    1,
                    kg,
                    coutg,
                    ncols,
                    par_inside,
                );
            }
            col2im(cols, nb, g, out, par_inside);
        },
    );
}

thread_local! {
    static WGRAD_FORCE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// For benchmarks and tests: force (`Some(true)`, wherever it applies),
/// forbid (`Some(false)`) or leave to the measured rule (`None`) the
/// direct weight-gradient kernel (`wgrad.rs`) on the calling thread.
#[doc(hidden)]
pub fn force_wgrad_direct(v: Option<bool>) {
    WGRAD_FORCE.with(|f| f.set(v));
}

fn conv_backward_weight<T: Float>(x: &[T], gy: &[T], g: &Geom) -> Vec<T> {
    let mut dw = crate::buffers::alloc_uninit::<T>(g.w_len());
    conv_backward_weight_into(x, gy, g, &mut dw);
    dw
}

fn conv_backward_weight_into<T: Float>(x: &[T], gy: &[T], g: &Geom, dw: &mut [T]) {
    assert_eq!(x.len(), g.x_len(), "conv2d_backward_weight: input length");
    assert_eq!(
        gy.len(),
        g.y_len(),
        "conv2d_backward_weight: grad_output length"
    );
    assert_eq!(dw.len(), g.w_len(), "conv2d_backward_weight: output length");
    let (cg, coutg, kg, howo, groups) = (g.cg(), g.coutg(), g.kg(), g.howo(), g.p.groups);
    dw.fill(T::zero());
    if dw.is_empty() || g.n == 0 || howo == 0 {
        return;
    }
    // The direct kernel wherever it applies. Measured with the
    // bench_conv_bwd example (2-core AVX-512 box, ms direct vs im2col +
    // gemm in one run): complex_net 3->16 3x3 on 10x10 n=1024 0.54 vs
    // 1.24, 16->32 on 8x8 1.57 vs 4.1; seed_cnn n=128 1->32 5x5 on 28x28
    // 1.32 vs 1.33, 3x3 p1 32->64 and 64->64 on 13x13 3.0 vs 3.6 and 5.7
    // vs 7.6, 64->128 on 6x6 3.17 vs 3.47.
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && !g.is_pointwise()
        && wgrad::applies(g)
        && WGRAD_FORCE.with(|f| f.get()).unwrap_or(true)
    {
        // SAFETY: T is f32 (checked above): identity casts.
        let (xf, gf, dwf) = unsafe {
            (
                std::slice::from_raw_parts(x.as_ptr() as *const f32, x.len()),
                std::slice::from_raw_parts(gy.as_ptr() as *const f32, gy.len()),
                std::slice::from_raw_parts_mut(dw.as_mut_ptr() as *mut f32, dw.len()),
            )
        };
        wgrad::weight_grad(xf, gf, g, dwf);
        // Junk columns add exact zeros unless an input is inf/NaN (see
        // wgrad.rs): a non-finite result is recomputed below.
        if dwf.iter().all(|v| v.is_finite()) {
            return;
        }
        dw.fill(T::zero());
    }
    if g.is_pointwise() {
        for gi in 0..groups {
            matmul_into(
                dw,
                MatLayout::contiguous(coutg, cg)
                    .with_offset(gi * coutg * cg)
                    .broadcast(),
                T::zero(),
                T::one(),
                gy,
                MatLayout {
                    offset: gi * coutg * howo,
                    row_stride: howo,
                    col_stride: 1,
                    batch_stride: g.cout * howo,
                },
                x,
                MatLayout {
                    offset: gi * cg * howo,
                    row_stride: 1,
                    col_stride: howo,
                    batch_stride: g.c * howo,
                },
                g.n,
                coutg,
                howo,
                cg,
            );
        }
        return;
    }
    let (b, par_blocks) = g.plan();
    // dw += gy_block (channels-major [cout, ncols]) @ cols^T, per group.
    let block = |n0: usize, acc: &mut [T], s: &mut Scratch<T>, par_inside: bool| {
        let nb = b.min(g.n - n0);
        let ncols = nb * howo;
        let gblock = &gy[n0 * g.cout * howo..][..nb * g.cout * howo];
        let gcm: &[T] = if nb == 1 {
            gblock
        } else {
            let t = grow(&mut s.tmp, g.cout * ncols);
            shuffle(gblock, t, nb, g.cout, howo, None, false);
            t
        };
        let cols = grow(&mut s.cols, g.c * g.kh * g.kw * ncols);
        im2col(&x[n0 * g.c * g.hw()..], nb, g, cols, par_inside);
        for gi in 0..groups {
            matmul_impl(
                acc,
                MatLayout::contiguous(coutg, kg).with_offset(gi * coutg * kg),
                T::one(),
                T::one(),
                gcm,
                MatLayout::contiguous(coutg, ncols).with_offset(gi * coutg * ncols),
                cols,
                MatLayout::contiguous(kg, ncols)
                    .with_offset(gi * kg * ncols)
                    .t(),
                1,
                coutg,
                ncols,
                kg,
                par_inside,
            );
        }
    };
    let starts: Vec<usize> = (0..g.n).step_by(b).collect();
    if par_blocks {
        // Per-task partial sums, added up at the end.
        let len = dw.len();
        let sum = starts
            .par_iter()
            .fold(
                || (vec![T::zero(); len], Scratch::new()),
                |(mut acc, mut s), &n0| {
                    block(n0, &mut acc, &mut s, false);
                    (acc, s)
                },
            )
            .map(|(acc, _)| acc)
            .reduce(
                || vec![T::zero(); len],
                |mut a, b| {
                    for (x, y) in a.iter_mut().zip(&b) {
                        *x += *y;
                    }
                    a
                },
            );
        dw.copy_from_slice(&sum);
    } else {
        let mut s = Scratch::new();
        for &n0 in &starts {
            block(n0, dw, &mut s, true);
        }
    }
}

/// conv2d forward: x `[N, Cin, H, W]`, weight `[Cout, Cin/groups, Kh, Kw]`,
/// optional bias `[Cout]`; returns y `[N, Cout, Ho, Wo]` (sizes from
/// `conv2d_output_size`).
pub fn conv2d<T: Float>(
    x: &[T],
    x_shape: [usize; 4],
    weight: &[T],
    w_shape: [usize; 4],
    bias: Option<&[T]>,
    p: &Conv2dParams,
) -> Vec<T> {
    let (ho, wo) = conv2d_output_size((x_shape[2], x_shape[3]), (w_shape[2], w_shape[3]), p);
    conv_forward(x, weight, bias, &Geom::new(x_shape, w_shape, ho, wo, p))
}

/// conv2d forward into a provided buffer: as `conv2d`, writing y
/// `[N, Cout, Ho, Wo]` into `out` (exactly that many elements; every one
/// is overwritten, so its previous contents do not matter). When image `n`
/// is complete, `epi(n, &mut out[n*Cout*Ho*Wo..(n+1)*Cout*Ho*Wo])` is
/// called on it from the thread that computed it (while it is in cache);
/// paths that compute several images at once call it per image after the
/// block. Steady-state calls (same shapes again) allocate nothing: the
/// scratch buffers are thread-local and kept.
#[allow(clippy::too_many_arguments)]
pub fn conv2d_into<T: Float>(
    x: &[T],
    x_shape: [usize; 4],
    weight: &[T],
    w_shape: [usize; 4],
    bias: Option<&[T]>,
    p: &Conv2dParams,
    out: &mut [T],
    epi: Option<ImageEpilogue<'_, T>>,
) {
    let (ho, wo) = conv2d_output_size((x_shape[2], x_shape[3]), (w_shape[2], w_shape[3]), p);
    conv_forward_into(
        x,
        weight,
        bias,
        &Geom::new(x_shape, w_shape, ho, wo, p),
        out,
        epi,
    )
}

/// Gradient of conv2d wrt its input: grad_out `[N, Cout, Ho, Wo]` (Ho, Wo
/// from `conv2d_output_size` of `x_shape`), weight as in `conv2d`; returns
/// `[N, Cin, H, W]` = `x_shape`.
pub fn conv2d_backward_input<T: Float>(
    grad_out: &[T],
    weight: &[T],
    w_shape: [usize; 4],
    x_shape: [usize; 4],
    p: &Conv2dParams,
) -> Vec<T> {
    let (ho, wo) = conv2d_output_size((x_shape[2], x_shape[3]), (w_shape[2], w_shape[3]), p);
    conv_backward_input(grad_out, weight, &Geom::new(x_shape, w_shape, ho, wo, p))
}

/// As `conv2d_backward_input`, writing `[N, Cin, H, W]` into `out`
/// (exactly that many elements; every one is overwritten).
pub fn conv2d_backward_input_into<T: Float>(
    grad_out: &[T],
    weight: &[T],
    w_shape: [usize; 4],
    x_shape: [usize; 4],
    p: &Conv2dParams,
    out: &mut [T],
) {
    let (ho, wo) = conv2d_output_size((x_shape[2], x_shape[3]), (w_shape[2], w_shape[3]), p);
    conv_backward_input_into(
        grad_out,
        weight,
        &Geom::new(x_shape, w_shape, ho, wo, p),
        out,
    )
}

/// Gradient of conv2d wrt its weight: x `[N, Cin, H, W]`, grad_out
/// `[N, Cout, Ho, Wo]`; returns `[Cout, Cin/groups, Kh, Kw]` = `w_shape`.
pub fn conv2d_backward_weight<T: Float>(
    x: &[T],
    x_shape: [usize; 4],
    grad_out: &[T],
    w_shape: [usize; 4],
    p: &Conv2dParams,
) -> Vec<T> {
    let (ho, wo) = conv2d_output_size((x_shape[2], x_shape[3]), (w_shape[2], w_shape[3]), p);
    conv_backward_weight(x, grad_out, &Geom::new(x_shape, w_shape, ho, wo, p))
}

/// As `conv2d_backward_weight`, writing `[Cout, Cin/groups, Kh, Kw]` into
/// `out` (exactly that many elements; every one is overwritten).
pub fn conv2d_backward_weight_into<T: Float>(
    x: &[T],
    x_shape: [usize; 4],
    grad_out: &[T],
    w_shape: [usize; 4],
    p: &Conv2dParams,
    out: &mut [T],
) {
    let (ho, wo) = conv2d_output_size((x_shape[2], x_shape[3]), (w_shape[2], w_shape[3]), p);
    conv_backward_weight_into(x, grad_out, &Geom::new(x_shape, w_shape, ho, wo, p), out)
}

/// Gradient of a per-channel bias: the sum of grad_out `[N, C, H, W]` over
/// N, H and W (works for conv and conv_transpose alike); returns `[C]`.
pub fn conv2d_backward_bias<T: Float>(grad_out: &[T], shape: [usize; 4]) -> Vec<T> {
    let [n, c, h, w] = shape;
    assert_eq!(
        grad_out.len(),
        n * c * h * w,
        "conv2d_backward_bias: length"
    );
    let plane = h * w;
    let f = |ci: usize| {
        let mut s = 0.0f64;
        for b in 0..n {
            s += grad_out[(b * c + ci) * plane..][..plane]
                .iter()
                .map(|v| v.as_f64())
                .sum::<f64>();
        }
        T::from_f64(s)
    };
    if grad_out.len() >= crate::PAR_THRESHOLD {
        (0..c).into_par_iter().map(f).collect()
    } else {
        (0..c).map(f).collect()
    }
}

/// conv_transpose2d forward: x `[N, Cin, H, W]`, weight
/// `[Cin, Cout/groups, Kh, Kw]`, optional bias `[Cout]`; returns
/// `[N, Cout, Ho, Wo]` with sizes from `conv_transpose2d_output_size`.
/// This is `conv2d_backward_input` with x as the gradient.
pub fn conv_transpose2d<T: Float>(
    x: &[T],
    x_shape: [usize; 4],
    weight: &[T],
    w_shape: [usize; 4],
    bias: Option<&[T]>,
    p: &Conv2dParams,
    output_padding: (usize, usize),
) -> Vec<T> {
    let [n, cin, h, w] = x_shape;
    let [wc, coutg, kh, kw] = w_shape;
    assert_eq!(wc, cin, "conv_transpose2d: weight's first dim must be Cin");
    let (ho, wo) = conv_transpose2d_output_size((h, w), (kh, kw), p, output_padding);
    let cout = coutg * p.groups;
    // The conv whose input gradient this is: input [n, cout, ho, wo],
    // weight [cin, coutg, kh, kw], output [n, cin, h, w].
    let g = Geom::new([n, cout, ho, wo], w_shape, h, w, p);
    let mut y = conv_backward_input(x, weight, &g);
    if let Some(b) = bias {
        assert_eq!(b.len(), cout, "conv_transpose2d: bias length");
        add_bias(&mut y, b, cout, ho * wo);
    }
    y
}

/// Gradient of conv_transpose2d wrt its input: grad_out `[N, Cout, Ho, Wo]`,
/// weight `[Cin, Cout/groups, Kh, Kw]`, x_shape `[N, Cin, H, W]`; returns
/// `[N, Cin, H, W]`. It is conv2d of grad_out with the same weight.
pub fn conv_transpose2d_backward_input<T: Float>(
    grad_out: &[T],
    go_shape: [usize; 4],
    weight: &[T],
    w_shape: [usize; 4],
    x_shape: [usize; 4],
    p: &Conv2dParams,
) -> Vec<T> {
    let g = Geom::new(go_shape, w_shape, x_shape[2], x_shape[3], p);
    assert_eq!(
        g.cout, x_shape[1],
        "conv_transpose2d_backward_input: channels"
    );
    conv_forward(grad_out, weight, None, &g)
}

/// Gradient of conv_transpose2d wrt its weight: x `[N, Cin, H, W]`,
/// grad_out `[N, Cout, Ho, Wo]`; returns `[Cin, Cout/groups, Kh, Kw]` =
/// `w_shape`.
pub fn conv_transpose2d_backward_weight<T: Float>(
    x: &[T],
    x_shape: [usize; 4],
    grad_out: &[T],
    go_shape: [usize; 4],
    w_shape: [usize; 4],
    p: &Conv2dParams,
) -> Vec<T> {
    // conv view: input = grad_out, output = x, weight [cin, coutg, kh, kw].
    let g = Geom::new(go_shape, w_shape, x_shape[2], x_shape[3], p);
    assert_eq!(
        g.cout, x_shape[1],
        "conv_transpose2d_backward_weight: channels"
    );
    conv_backward_weight(grad_out, x, &g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matmul::tests::{assert_close, rand_vec};

    fn to<T: Float>(v: &[f64]) -> Vec<T> {
        v.iter().map(|&x| T::from_f64(x)).collect()
    }

    /// Direct loops: y[n,co,oh,ow] = b[co] + sum x[n, g*cg+ci, ih, iw] * w[co,ci,i,j].
    fn naive_conv(
        x: &[f64],
        xs: [usize; 4],
        w: &[f64],
        ws: [usize; 4],
        bias: Option<&[f64]>,
        p: &Conv2dParams,
    ) -> Vec<f64> {
        let [n, c, h, wd] = xs;
        let [cout, cg, kh, kw] = ws;
        let (ho, wo) = conv2d_output_size((h, wd), (kh, kw), p);
        let coutg = cout / p.groups;
        let mut y = vec![0.0; n * cout * ho * wo];
        for b in 0..n {
            for co in 0..cout {
                let gi = co / coutg;
                for oh in 0..ho {
                    for ow in 0..wo {
                        let mut s = bias.map_or(0.0, |bb| bb[co]);
                        for ci in 0..cg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let ih = (oh * p.stride.0 + i * p.dilation.0) as isize
                                        - p.padding.0 as isize;
                                    let iw = (ow * p.stride.1 + j * p.dilation.1) as isize
                                        - p.padding.1 as isize;
                                    if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                        continue;
                                    }
                                    let xc = gi * cg + ci;
                                    s += x[((b * c + xc) * h + ih as usize) * wd + iw as usize]
                                        * w[((co * cg + ci) * kh + i) * kw + j];
                                }
                            }
                        }
                        y[((b * cout + co) * ho + oh) * wo + ow] = s;
                    }
                }
            }
        }
        y
    }

    /// Gradients of the naive conv by the chain rule on the same loops.
    fn naive_conv_grads(
        x: &[f64],
        xs: [usize; 4],
        w: &[f64],
        ws: [usize; 4],
        gy: &[f64],
        p: &Conv2dParams,
    ) -> (Vec<f64>, Vec<f64>) {
        let [n, c, h, wd] = xs;
        let [cout, cg, kh, kw] = ws;
        let (ho, wo) = conv2d_output_size((h, wd), (kh, kw), p);
        let coutg = cout / p.groups;
        let mut dx = vec![0.0; x.len()];
        let mut dw = vec![0.0; w.len()];
        for b in 0..n {
            for co in 0..cout {
                let gi = co / coutg;
                for oh in 0..ho {
                    for ow in 0..wo {
                        let g = gy[((b * cout + co) * ho + oh) * wo + ow];
                        for ci in 0..cg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let ih = (oh * p.stride.0 + i * p.dilation.0) as isize
                                        - p.padding.0 as isize;
                                    let iw = (ow * p.stride.1 + j * p.dilation.1) as isize
                                        - p.padding.1 as isize;
                                    if ih < 0 || iw < 0 || ih >= h as isize || iw >= wd as isize {
                                        continue;
                                    }
                                    let xi = ((b * c + gi * cg + ci) * h + ih as usize) * wd
                                        + iw as usize;
                                    let wi = ((co * cg + ci) * kh + i) * kw + j;
                                    dx[xi] += g * w[wi];
                                    dw[wi] += g * x[xi];
                                }
                            }
                        }
                    }
                }
            }
        }
        (dx, dw)
    }

    fn p(
        stride: (usize, usize),
        padding: (usize, usize),
        dilation: (usize, usize),
        groups: usize,
    ) -> Conv2dParams {
        Conv2dParams {
            stride,
            padding,
            dilation,
            groups,
        }
    }

    fn cases() -> Vec<([usize; 4], [usize; 4], Conv2dParams)> {
        vec![
            ([2, 3, 7, 6], [4, 3, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
            ([1, 1, 5, 5], [1, 1, 1, 1], p((1, 1), (0, 0), (1, 1), 1)),
            ([3, 4, 6, 5], [6, 2, 1, 1], p((1, 1), (0, 0), (1, 1), 2)),
            ([2, 4, 9, 8], [6, 2, 3, 2], p((2, 3), (1, 2), (1, 1), 2)),
            ([2, 3, 11, 10], [2, 3, 3, 3], p((1, 2), (2, 1), (2, 3), 1)),
            ([5, 6, 8, 7], [6, 1, 3, 3], p((2, 2), (1, 1), (1, 1), 6)),
            ([4, 2, 5, 5], [3, 2, 5, 5], p((1, 1), (0, 0), (1, 1), 1)),
            ([3, 2, 6, 7], [4, 2, 2, 3], p((3, 1), (0, 1), (2, 1), 1)),
            ([2, 2, 4, 4], [3, 2, 1, 1], p((2, 2), (1, 0), (1, 1), 1)),
            // Stride 1 with output width == input width (shifted-copy path).
            ([3, 4, 9, 10], [5, 4, 3, 3], p((1, 1), (2, 2), (2, 2), 1)),
            ([2, 3, 8, 9], [4, 3, 3, 5], p((1, 1), (1, 2), (1, 1), 1)),
            ([2, 2, 6, 5], [2, 2, 2, 1], p((1, 1), (0, 0), (1, 1), 1)),
            // Big enough to take the parallel / blocked paths.
            ([9, 5, 13, 13], [8, 5, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
            ([6, 8, 20, 20], [8, 4, 3, 3], p((2, 1), (1, 2), (1, 2), 2)),
            ([16, 4, 9, 9], [10, 4, 1, 1], p((1, 1), (0, 0), (1, 1), 1)),
            // At least PIXEL_MAJOR_MIN_COUT channels per group: forward gemm
            // into pixel-major blocks, then the (gather) transpose; odd
            // sizes, 1 and several images per block, ho*wo below, at and
            // not a multiple of 16.
            ([3, 5, 7, 9], [64, 5, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
            ([5, 3, 4, 4], [48, 3, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
            ([6, 4, 11, 9], [96, 2, 3, 2], p((2, 1), (1, 2), (1, 2), 2)),
            ([2, 3, 5, 6], [50, 3, 3, 3], p((1, 1), (0, 0), (1, 1), 1)),
            ([12, 6, 13, 13], [64, 6, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
            // Winograd forward, and (>= 32 channels both ways) the input
            // gradient as a Winograd forward conv.
            ([3, 32, 9, 9], [40, 32, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
            ([2, 33, 6, 7], [32, 33, 3, 3], p((1, 1), (0, 2), (1, 1), 1)),
        ]
    }

    fn check_conv<T: Float>(tol: f64) {
        for (ci, (xs, ws, prm)) in cases().into_iter().enumerate() {
            let x: Vec<f64> = rand_vec(xs.iter().product(), ci as u64 + 1);
            let w: Vec<f64> = rand_vec(ws.iter().product(), ci as u64 + 100);
            let bias: Vec<f64> = rand_vec(ws[0], ci as u64 + 200);
            let want = naive_conv(&x, xs, &w, ws, Some(&bias), &prm);
            let got = conv2d(
                &to::<T>(&x),
                xs,
                &to::<T>(&w),
                ws,
                Some(&to::<T>(&bias)),
                &prm,
            );
            assert_close(&got, &want, tol, &format!("conv2d case {ci}"));
            let gy: Vec<f64> = rand_vec(want.len(), ci as u64 + 300);
            let (dx, dw) = naive_conv_grads(&x, xs, &w, ws, &gy, &prm);
            let gx = conv2d_backward_input(&to::<T>(&gy), &to::<T>(&w), ws, xs, &prm);
            assert_close(&gx, &dx, tol, &format!("conv2d_backward_input case {ci}"));
            let gw = conv2d_backward_weight(&to::<T>(&x), xs, &to::<T>(&gy), ws, &prm);
            assert_close(&gw, &dw, tol, &format!("conv2d_backward_weight case {ci}"));
            let (ho, wo) = conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &prm);
            let gb = conv2d_backward_bias(&to::<T>(&gy), [xs[0], ws[0], ho, wo]);
            let want_gb: Vec<f64> = (0..ws[0])
                .map(|co| {
                    (0..xs[0])
                        .map(|b| {
                            gy[(b * ws[0] + co) * ho * wo..][..ho * wo]
                                .iter()
                                .sum::<f64>()
                        })
                        .sum()
                })
                .collect();
            assert_close(&gb, &want_gb, tol, &format!("bias grad case {ci}"));
        }
    }

    #[test]
    fn pixel_major_forward_without_bias() {
        // The pixel-major path for f32 (AVX-512 gather where available)
        // and f64 (scalar transpose), with no bias to add.
        let (xs, ws) = ([4, 3, 9, 7], [64, 3, 3, 3]);
        let prm = p((1, 1), (1, 1), (1, 1), 1);
        assert!(ws[0] >= PIXEL_MAJOR_MIN_COUT);
        let x: Vec<f64> = rand_vec(xs.iter().product(), 7);
        let w: Vec<f64> = rand_vec(ws.iter().product(), 8);
        let want = naive_conv(&x, xs, &w, ws, None, &prm);
        let got = conv2d(&to::<f32>(&x), xs, &to::<f32>(&w), ws, None, &prm);
        assert_close(&got, &want, 2e-4, "conv2d f32 no bias");
        let got = conv2d(&to::<f64>(&x), xs, &to::<f64>(&w), ws, None, &prm);
        assert_close(&got, &want, 1e-10, "conv2d f64 no bias");
    }

    #[test]
    fn unshuffle_pixels_matches_loops() {
        for (nb, cout, howo) in [
            (1, 1, 1),
            (2, 3, 15),
            (3, 17, 16),
            (2, 64, 169),
            (1, 5, 33),
            (2, 32, 48),
            (1, 33, 35),
        ] {
            let src: Vec<f32> = rand_vec(nb * howo * cout, 11);
            let bias: Vec<f32> = rand_vec(cout, 12);
            for b in [None, Some(&bias[..])] {
                let mut dst = vec![MaybeUninit::new(f32::NAN); nb * cout * howo];
                unshuffle_pixels(&src, &mut dst, nb, cout, howo, b);
                // SAFETY: initialized with NaN above.
                let dst: Vec<f32> = dst.iter().map(|v| unsafe { v.assume_init() }).collect();
                let mut want = vec![0.0f64; dst.len()];
                for i in 0..nb {
                    for co in 0..cout {
                        for px in 0..howo {
                            want[(i * cout + co) * howo + px] = src[(i * howo + px) * cout + co]
                                as f64
                                + b.map_or(0.0, |bb| bb[co] as f64);
                        }
                    }
                }
                assert_close(&dst, &want, 1e-6, &format!("unshuffle {nb}x{cout}x{howo}"));
            }
        }
    }

    /// The stride-1 fast paths (input gradient as a forward conv on the
    /// direct kernel, weight gradient on `wgrad.rs`), each forced on and
    /// off, against the naive loops and through the `_into` entry points
    /// (outputs prefilled with NaN): odd sizes, channel counts that are
    /// not multiples of the register blocks, 1xk / kx1 / 5x5 kernels,
    /// dilation, groups, padding wider than the kernel (no fast input
    /// path), and batches big enough for several parallel chunks.
    #[test]
    fn stride1_backward_fast_paths_match_naive() {
        let extra = [
            ([7, 3, 10, 10], [16, 3, 3, 3], p((1, 1), (0, 0), (1, 1), 1)),
            ([5, 16, 8, 8], [32, 16, 3, 3], p((1, 1), (0, 0), (1, 1), 1)),
            ([3, 5, 7, 9], [7, 5, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
            ([2, 1, 13, 11], [5, 1, 5, 5], p((1, 1), (1, 2), (1, 1), 1)),
            ([3, 2, 9, 6], [6, 2, 1, 3], p((1, 1), (0, 1), (1, 1), 1)),
            ([2, 3, 6, 9], [4, 3, 3, 1], p((1, 1), (2, 0), (1, 1), 1)),
            ([2, 4, 11, 12], [6, 2, 3, 3], p((1, 1), (2, 3), (2, 2), 2)),
            ([2, 3, 5, 5], [5, 3, 2, 2], p((1, 1), (3, 2), (1, 1), 1)),
            ([40, 3, 10, 10], [9, 3, 3, 3], p((1, 1), (0, 0), (1, 1), 1)),
            ([300, 2, 6, 5], [5, 2, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
        ];
        for (ci, (xs, ws, prm)) in cases().into_iter().chain(extra).enumerate() {
            if prm.stride != (1, 1) {
                continue;
            }
            let x: Vec<f64> = rand_vec(xs.iter().product(), ci as u64 + 11);
            let w: Vec<f64> = rand_vec(ws.iter().product(), ci as u64 + 110);
            let (ho, wo) = conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &prm);
            let gy: Vec<f64> = rand_vec(xs[0] * ws[0] * ho * wo, ci as u64 + 310);
            let (dx, dw) = naive_conv_grads(&x, xs, &w, ws, &gy, &prm);
            let (xf, wf, gf) = (to::<f32>(&x), to::<f32>(&w), to::<f32>(&gy));
            for fast in [None, Some(true), Some(false)] {
                let what = format!("case {ci} {xs:?} {ws:?} fast={fast:?}");
                force_direct(fast);
                force_wgrad_direct(fast);
                let mut gx = vec![f32::NAN; dx.len()];
                conv2d_backward_input_into(&gf, &wf, ws, xs, &prm, &mut gx);
                assert_close(&gx, &dx, 2e-4, &format!("backward_input {what}"));
                let mut gw = vec![f32::NAN; dw.len()];
                conv2d_backward_weight_into(&xf, xs, &gf, ws, &prm, &mut gw);
                assert_close(&gw, &dw, 2e-4, &format!("backward_weight {what}"));
                let gx64 = conv2d_backward_input(&gy, &w, ws, xs, &prm);
                assert_close(&gx64, &dx, 1e-10, &format!("backward_input f64 {what}"));
                let gw64 = conv2d_backward_weight(&x, xs, &gy, ws, &prm);
                assert_close(&gw64, &dw, 1e-10, &format!("backward_weight f64 {what}"));
            }
            force_direct(None);
            force_wgrad_direct(None);
        }
    }

    /// An infinite input: the direct weight gradient's junk columns would
    /// turn it into NaN where the true gradient is finite or infinite, so
    /// the result must equal the im2col path's exactly.
    #[test]
    fn wgrad_direct_with_infinite_input_matches_im2col() {
        let (xs, ws) = ([3, 2, 6, 7], [4, 2, 3, 3]);
        for prm in [p((1, 1), (0, 0), (1, 1), 1), p((1, 1), (1, 1), (1, 1), 1)] {
            for pos in [0, 5, 6, 41, 83] {
                let mut x: Vec<f32> = rand_vec(xs.iter().product(), 5);
                x[pos] = f32::INFINITY;
                let (ho, wo) = conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &prm);
                let gy: Vec<f32> = rand_vec(xs[0] * ws[0] * ho * wo, 6);
                force_wgrad_direct(Some(true));
                let a = conv2d_backward_weight(&x, xs, &gy, ws, &prm);
                force_wgrad_direct(Some(false));
                let b = conv2d_backward_weight(&x, xs, &gy, ws, &prm);
                force_wgrad_direct(None);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&a), bits(&b), "inf at {pos}, {prm:?}");
                assert!(a.iter().any(|v| !v.is_finite()), "inf at {pos}");
            }
        }
    }

    #[test]
    fn conv2d_forward_and_backward_f64() {
        check_conv::<f64>(1e-10);
    }

    #[test]
    fn conv2d_forward_and_backward_f32() {
        check_conv::<f32>(2e-4);
    }

    /// Naive transposed conv: y[n, g*coutg+co, ih*s - p + i*d, ...] += x[n, ci, ih, iw] * w[ci, co, i, j].
    fn naive_conv_t(
        x: &[f64],
        xs: [usize; 4],
        w: &[f64],
        ws: [usize; 4],
        bias: Option<&[f64]>,
        p: &Conv2dParams,
        op: (usize, usize),
    ) -> Vec<f64> {
        let [n, cin, h, wd] = xs;
        let [_, coutg, kh, kw] = ws;
        let (ho, wo) = conv_transpose2d_output_size((h, wd), (kh, kw), p, op);
        let cout = coutg * p.groups;
        let cing = cin / p.groups;
        let mut y = vec![0.0; n * cout * ho * wo];
        for b in 0..n {
            for ci in 0..cin {
                let gi = ci / cing;
                for ih in 0..h {
                    for iw in 0..wd {
                        let xv = x[((b * cin + ci) * h + ih) * wd + iw];
                        for co in 0..coutg {
                            for i in 0..kh {
                                for j in 0..kw {
                                    let oh = (ih * p.stride.0 + i * p.dilation.0) as isize
                                        - p.padding.0 as isize;
                                    let ow = (iw * p.stride.1 + j * p.dilation.1) as isize
                                        - p.padding.1 as isize;
                                    if oh < 0 || ow < 0 || oh >= ho as isize || ow >= wo as isize {
                                        continue;
                                    }
                                    let oc = gi * coutg + co;
                                    y[((b * cout + oc) * ho + oh as usize) * wo + ow as usize] +=
                                        xv * w[((ci * coutg + co) * kh + i) * kw + j];
                                }
                            }
                        }
                    }
                }
            }
        }
        if let Some(bias) = bias {
            for (idx, v) in y.iter_mut().enumerate() {
                *v += bias[(idx / (ho * wo)) % cout];
            }
        }
        y
    }

    fn check_conv_t<T: Float>(tol: f64) {
        type Case = ([usize; 4], [usize; 4], Conv2dParams, (usize, usize));
        let cases: Vec<Case> = vec![
            (
                [2, 3, 5, 4],
                [3, 2, 3, 3],
                p((2, 2), (1, 1), (1, 1), 1),
                (1, 0),
            ),
            (
                [1, 4, 3, 3],
                [4, 3, 2, 2],
                p((2, 2), (0, 0), (1, 1), 2),
                (0, 0),
            ),
            (
                [2, 2, 4, 5],
                [2, 3, 3, 2],
                p((2, 3), (2, 0), (2, 1), 1),
                (1, 2),
            ),
            (
                [3, 6, 4, 4],
                [6, 1, 3, 3],
                p((2, 1), (1, 1), (1, 1), 3),
                (1, 0),
            ),
            (
                [2, 3, 4, 4],
                [3, 5, 1, 1],
                p((1, 1), (0, 0), (1, 1), 1),
                (0, 0),
            ),
            (
                [8, 8, 9, 9],
                [8, 4, 4, 4],
                p((2, 2), (1, 1), (1, 1), 1),
                (0, 0),
            ),
        ];
        for (ci, (xs, ws, prm, op)) in cases.into_iter().enumerate() {
            let x: Vec<f64> = rand_vec(xs.iter().product(), ci as u64 + 7);
            let w: Vec<f64> = rand_vec(ws.iter().product(), ci as u64 + 70);
            let cout = ws[1] * prm.groups;
            let bias: Vec<f64> = rand_vec(cout, ci as u64 + 700);
            let want = naive_conv_t(&x, xs, &w, ws, Some(&bias), &prm, op);
            let got = conv_transpose2d(
                &to::<T>(&x),
                xs,
                &to::<T>(&w),
                ws,
                Some(&to::<T>(&bias)),
                &prm,
                op,
            );
            assert_close(&got, &want, tol, &format!("conv_transpose2d case {ci}"));
            // Gradients by linearity: d<gy, y(x,w)>/dx and /dw via unit
            // probes would be slow; instead use the adjoint identities
            // <gy, T(x)> = <T*(gy), x> and <gy, T_w(w)> = <dW, w>.
            let (ho, wo) = conv_transpose2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &prm, op);
            let gos = [xs[0], cout, ho, wo];
            let gy: Vec<f64> = rand_vec(want.len(), ci as u64 + 900);
            let nobias = naive_conv_t(&x, xs, &w, ws, None, &prm, op);
            let lhs: f64 = gy.iter().zip(&nobias).map(|(a, b)| a * b).sum();
            let gx =
                conv_transpose2d_backward_input(&to::<T>(&gy), gos, &to::<T>(&w), ws, xs, &prm);
            let rhs_x: f64 = gx.iter().zip(&x).map(|(a, b)| a.as_f64() * b).sum();
            let gw =
                conv_transpose2d_backward_weight(&to::<T>(&x), xs, &to::<T>(&gy), gos, ws, &prm);
            let rhs_w: f64 = gw.iter().zip(&w).map(|(a, b)| a.as_f64() * b).sum();
            let scale = 1.0 + lhs.abs() + (want.len() as f64).sqrt();
            assert!(
                (lhs - rhs_x).abs() <= tol * scale,
                "conv_t grad x case {ci}: {lhs} vs {rhs_x}"
            );
            assert!(
                (lhs - rhs_w).abs() <= tol * scale,
                "conv_t grad w case {ci}: {lhs} vs {rhs_w}"
            );
            // And elementwise: grad x is conv2d of gy (naive), grad w from
            // the naive conv grads with roles swapped.
            let want_gx = naive_conv(&gy, gos, &w, ws, None, &prm);
            assert_close(
                &gx,
                &want_gx,
                tol,
                &format!("conv_t grad x elementwise case {ci}"),
            );
            let (_, want_gw) = naive_conv_grads(&gy, gos, &w, ws, &x, &prm);
            assert_close(
                &gw,
                &want_gw,
                tol,
                &format!("conv_t grad w elementwise case {ci}"),
            );
        }
    }

    #[test]
    fn conv_transpose2d_forward_and_backward() {
        check_conv_t::<f64>(1e-10);
        check_conv_t::<f32>(2e-4);
    }

    /// Random x, w, bias (seeds `seed`, `seed + 1`, `seed + 2`) of a conv
    /// case, its output elements per image, and the f64 reference after the
    /// test epilogue `y * 2 + n` (n = the image).
    #[allow(clippy::type_complexity)]
    fn epilogue_case(
        xs: [usize; 4],
        ws: [usize; 4],
        prm: &Conv2dParams,
        seed: u64,
    ) -> (Vec<f32>, Vec<f32>, Vec<f32>, Vec<f64>, usize) {
        let x: Vec<f32> = rand_vec(xs.iter().product(), seed);
        let w: Vec<f32> = rand_vec(ws.iter().product(), seed + 1);
        let b: Vec<f32> = rand_vec(ws[0], seed + 2);
        let (ho, wo) = conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), prm);
        let per = ws[0] * ho * wo;
        let xd: Vec<f64> = x.iter().map(|&v| v as f64).collect();
        let wd: Vec<f64> = w.iter().map(|&v| v as f64).collect();
        let bd: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let want: Vec<f64> = naive_conv(&xd, xs, &wd, ws, Some(&bd), prm)
            .chunks(per)
            .enumerate()
            .flat_map(|(n, img)| img.iter().map(move |v| v * 2.0 + n as f64))
            .collect();
        (x, w, b, want, per)
    }

    /// `conv2d_into` (direct kernel forced on and off, with an epilogue)
    /// against `conv2d` plus the same epilogue, which runs once per image.
    #[test]
    fn conv2d_into_matches_conv2d() {
        let cases: &[([usize; 4], [usize; 4], Conv2dParams)] = &[
            ([8, 1, 28, 28], [32, 1, 5, 5], p((1, 1), (1, 1), (1, 1), 1)),
            (
                [3, 32, 13, 13],
                [64, 32, 3, 3],
                p((1, 1), (1, 1), (1, 1), 1),
            ),
            ([2, 64, 6, 6], [130, 64, 3, 3], p((1, 1), (1, 1), (1, 1), 1)),
            ([5, 3, 10, 10], [16, 3, 3, 3], p((1, 1), (0, 0), (1, 1), 1)),
            ([1, 3, 9, 7], [5, 3, 2, 4], p((1, 1), (1, 2), (1, 1), 1)),
            ([2, 4, 9, 9], [6, 2, 3, 3], p((2, 1), (1, 0), (1, 2), 2)),
            ([3, 8, 5, 5], [4, 8, 1, 1], p((1, 1), (0, 0), (1, 1), 1)),
            // One image, channel blocks split across threads.
            (
                [1, 16, 20, 20],
                [40, 16, 3, 3],
                p((1, 1), (1, 1), (1, 1), 1),
            ),
        ];
        for (ci, &(xs, ws, prm)) in cases.iter().enumerate() {
            let (x, w, b, want, per) = epilogue_case(xs, ws, &prm, 11 + ci as u64);
            let calls = parking_lot::Mutex::new(vec![0usize; xs[0]]);
            let epi = |n: usize, y: &mut [f32]| {
                assert_eq!(y.len(), per);
                calls.lock()[n] += 1;
                for v in y {
                    *v = *v * 2.0 + n as f32;
                }
            };
            #[cfg(target_arch = "x86_64")]
            let avx2 = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
            #[cfg(not(target_arch = "x86_64"))]
            let avx2 = false;
            for (force, only_avx2) in [
                (Some(true), false),
                (Some(true), true),
                (Some(false), false),
                (None, false),
            ] {
                if only_avx2 && !avx2 {
                    continue;
                }
                force_avx2(only_avx2);
                force_direct(force);
                calls.lock().iter_mut().for_each(|c| *c = 0);
                let mut y = vec![f32::NAN; xs[0] * per];
                conv2d_into(&x, xs, &w, ws, Some(&b), &prm, &mut y, Some(&epi));
                let what = format!("conv2d_into case {ci} {force:?} avx2-only={only_avx2}");
                assert_close(&y, &want, 2e-4, &what);
                assert!(
                    calls.lock().iter().all(|&c| c == 1),
                    "case {ci}: epilogue calls"
                );
                let plain = conv2d(&x, xs, &w, ws, None, &prm);
                let mut y2 = vec![f32::NAN; xs[0] * per];
                conv2d_into(&x, xs, &w, ws, None, &prm, &mut y2, None);
                let plain: Vec<f64> = plain.iter().map(|&v| v as f64).collect();
                assert_close(&y2, &plain, 1e-5, &format!("no bias case {ci} {force:?}"));
            }
            force_avx2(false);
            force_direct(None);
        }
    }

    /// The Winograd path (forced) against the f64 reference: odd and even
    /// output sizes, paddings 0..2, channel counts off the 8-block, rows
    /// wider than one 16-tile vector, one image split over channel blocks,
    /// and the per-image epilogue called exactly once.
    #[test]
    fn winograd_matches_reference() {
        #[cfg(target_arch = "x86_64")]
        if !is_x86_feature_detected!("avx512f") {
            return;
        }
        #[cfg(not(target_arch = "x86_64"))]
        return;
        let cases: &[([usize; 4], [usize; 4], usize)] = &[
            ([8, 32, 13, 13], [64, 32, 3, 3], 1),
            ([3, 64, 6, 6], [130, 64, 3, 3], 1),
            ([5, 16, 8, 8], [32, 16, 3, 3], 0),
            ([2, 3, 10, 9], [5, 3, 3, 3], 0),
            ([1, 16, 20, 20], [40, 16, 3, 3], 1),
            ([2, 9, 37, 41], [17, 9, 3, 3], 2),
            ([4, 8, 3, 3], [8, 8, 3, 3], 0),
            ([3, 12, 1, 5], [9, 12, 3, 3], 1),
            ([1, 1, 4, 4], [1, 1, 3, 3], 1),
            ([2, 32, 16, 15], [16, 32, 3, 3], 1),
            ([3, 5, 9, 5], [8, 5, 3, 3], 2),
        ];
        let mut worst = 0.0f64;
        for (ci, &(xs, ws, pad)) in cases.iter().enumerate() {
            let prm = p((1, 1), (pad, pad), (1, 1), 1);
            let (x, w, b, want, per) = epilogue_case(xs, ws, &prm, 21 + ci as u64);
            let calls = parking_lot::Mutex::new(vec![0usize; xs[0]]);
            let epi = |n: usize, y: &mut [f32]| {
                assert_eq!(y.len(), per);
                calls.lock()[n] += 1;
                for v in y {
                    *v = *v * 2.0 + n as f32;
                }
            };
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .expect("pool");
                calls.lock().iter_mut().for_each(|c| *c = 0);
                let mut y = vec![f32::NAN; xs[0] * per];
                pool.install(|| {
                    force_winograd(Some(true));
                    conv2d_into(&x, xs, &w, ws, Some(&b), &prm, &mut y, Some(&epi));
                    force_winograd(None);
                });
                let what = format!("winograd case {ci} threads {threads}");
                // The bound: 1e-5 of the output's scale (the sum of |terms|
                // is at most 9*cin here).
                let scale = 1.0 + (9 * xs[1]) as f64 / 4.0;
                for (i, (&g, &w)) in y.iter().zip(&want).enumerate() {
                    let e = (g as f64 - w).abs() / scale;
                    worst = worst.max(e);
                    assert!(e <= 1e-6, "{what}: index {i}: got {g}, want {w}");
                }
                assert!(
                    calls.lock().iter().all(|&c| c == 1),
                    "{what}: epilogue calls {:?}",
                    calls.lock()
                );
            }
        }
        eprintln!("winograd worst error / scale: {worst:e}");
    }

    #[test]
    fn output_sizes_match_pytorch() {
        let prm = p((2, 3), (1, 0), (2, 1), 1);
        // H: (10 + 2 - 2*2 - 1)/2 + 1 = 4; W: (10 - 2 - 1)/3 + 1 = 3
        assert_eq!(conv2d_output_size((10, 10), (3, 3), &prm), (4, 3));
        // (4-1)*2 - 2 + 2*2 + 1 + 1 = 10; (3-1)*3 - 0 + 2 + 0 + 1 = 9
        assert_eq!(
            conv_transpose2d_output_size((4, 3), (3, 3), &prm, (1, 0)),
            (10, 9)
        );
    }
}
