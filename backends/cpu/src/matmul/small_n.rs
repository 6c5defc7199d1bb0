//! `C = A @ B` for few columns (`n <= 12`) and a long reduction, with A
//! stored row-index-contiguous (`A^T` row-major, as in a weight gradient
//! `g^T @ h` computed as `(h^T @ g)^T`, or `h^T @ g` itself), on an
//! AVX-512 outer-product micro-kernel: 32 rows of C (two vectors loaded
//! straight from A's rows, no packing) times `n` broadcast values of B,
//! accumulated over all of `k` in `2n <= 24` zmm registers. gemm packs A
//! for these shapes and runs its 64x6 micro-kernel on 2 column tiles for
//! `n = 10` (see `matmul_epilogue` for the measured figures).

use super::MatLayout;

/// Most columns of C.
pub(super) const NMAX: usize = 12;
/// Lanes of one vector.
const L: usize = 16;
/// Rows of C per register block (two vectors).
const MB: usize = 2 * L;

thread_local! {
    static FORCE: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// For benchmarks and tests: force (`Some(true)`, wherever it applies),
/// forbid (`Some(false)`) or leave to the rule (`None`) this kernel on the
/// calling thread.
#[doc(hidden)]
pub fn force_small_n(v: Option<bool>) {
    FORCE.with(|f| f.set(v));
}

/// Whether the kernel applies: f32 is checked by the caller; A's rows
/// contiguous, B's columns contiguous, `1 <= n <= NMAX`, AVX-512.
pub(super) fn applies(m: usize, k: usize, n: usize, la: MatLayout, lb: MatLayout) -> bool {
    let shape_ok = (1..=NMAX).contains(&n) && m > 0 && k > 0;
    let layout_ok = la.row_stride == 1 && (lb.col_stride == 1 || n == 1);
    let rule = FORCE.with(|f| f.get()).unwrap_or(m >= MB && k >= 64);
    shape_ok && layout_ok && rule && avx512()
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

/// `c` (`[m, n]` row-major, overwritten) = A @ B; the views are checked
/// to lie inside `a` and `b`.
#[allow(clippy::too_many_arguments)]
pub(super) fn run(
    c: &mut [f32],
    a: &[f32],
    la: MatLayout,
    b: &[f32],
    lb: MatLayout,
    m: usize,
    k: usize,
    n: usize,
) {
    assert!(c.len() >= m * n);
    assert!(la.extent(1, m, k) <= a.len() && lb.extent(1, k, n) <= b.len());
    let blocks = m.div_ceil(MB);
    // Below ~1M multiply-adds a second thread costs more than it saves.
    let parts = if m * k * n >= 1 << 20 {
        crate::par::parts(blocks, 1)
    } else {
        1
    };
    let pc = crate::par::SendPtr::new(c.as_mut_ptr());
    let block_range = |r: std::ops::Range<usize>| {
        for blk in r {
            let m0 = blk * MB;
            let rows = MB.min(m - m0);
            // SAFETY: avx512f checked in `applies`; A rows m0..m0+rows and
            // all of B are in bounds (asserted above); this block writes
            // only rows m0..m0+rows of C, which no other block writes.
            unsafe {
                block(
                    pc.get().add(m0 * n),
                    a.as_ptr().add(la.offset + m0),
                    la.col_stride,
                    b.as_ptr().add(lb.offset),
                    lb.row_stride,
                    rows,
                    k,
                    n,
                )
            };
        }
    };
    if parts > 1 {
        crate::par::for_each_part(blocks, parts, 1, block_range);
    } else {
        block_range(0..blocks);
    }
}

#[allow(clippy::too_many_arguments)]
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn block(
    c: *mut f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    rows: usize,
    k: usize,
    n: usize,
) {
    macro_rules! call {
        ($($n:literal)*) => {
            match n {
                $($n => micro::<$n>(c, a, lda, b, ldb, rows, k),)*
                _ => unreachable!("1 <= n <= NMAX"),
            }
        };
    }
    call!(1 2 3 4 5 6 7 8 9 10 11 12);
}

#[allow(clippy::too_many_arguments)]
#[cfg(not(target_arch = "x86_64"))]
unsafe fn block(
    _: *mut f32,
    _: *const f32,
    _: usize,
    _: *const f32,
    _: usize,
    _: usize,
    _: usize,
    _: usize,
) {
    unreachable!("applies() is false off x86_64")
}

/// Rows `0..rows` (at most 32) of `C[r, j] = sum_kk A[r + kk*lda] *
/// B[kk*ldb + j]`, `j < N`, written to `c[r*N + j]`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline(never)]
unsafe fn micro<const N: usize>(
    c: *mut f32,
    a: *const f32,
    lda: usize,
    b: *const f32,
    ldb: usize,
    rows: usize,
    k: usize,
) {
    use std::arch::x86_64::*;
    let mask = |lo: usize| -> __mmask16 {
        let r = rows.saturating_sub(lo).min(L);
        if r == L {
            0xffff
        } else {
            ((1u32 << r) - 1) as __mmask16
        }
    };
    let (m0, m1) = (mask(0), mask(L));
    let mut acc = [[_mm512_setzero_ps(); 2]; N];
    let (mut ap, mut bp) = (a, b);
    for _ in 0..k {
        let a0 = _mm512_maskz_loadu_ps(m0, ap);
        let a1 = _mm512_maskz_loadu_ps(m1, ap.add(L));
        for (j, r) in acc.iter_mut().enumerate() {
            let bv = _mm512_set1_ps(*bp.add(j));
            r[0] = _mm512_fmadd_ps(a0, bv, r[0]);
            r[1] = _mm512_fmadd_ps(a1, bv, r[1]);
        }
        ap = ap.add(lda);
        bp = bp.add(ldb);
    }
    let mut t = [[0.0f32; MB]; N];
    for (j, r) in acc.iter().enumerate() {
        _mm512_storeu_ps(t[j].as_mut_ptr(), r[0]);
        _mm512_storeu_ps(t[j].as_mut_ptr().add(L), r[1]);
    }
    for i in 0..rows {
        for (j, tj) in t.iter().enumerate() {
            *c.add(i * N + j) = tj[i];
        }
    }
}
