//! Batched strided matrix multiplication on top of the `gemm` crate.
//! Operands are described by a `MatLayout` (offset, row/column/batch
//! strides in elements), so transposed views and broadcast batches (batch
//! stride 0) are multiplied in place without a copy. `matmul` returns a
//! contiguous `[batch, m, n]` Vec; `matmul_into` is the accumulate form
//! `C = beta*C + alpha*A@B` used for fused bias and gradient accumulation
//! (with `beta == 0` it is also the batched product into a provided
//! buffer: C is not read). `matmul_epilogue` is the single product into a
//! provided C with a fused bias and a per-row-block epilogue, for compiled
//! code.

use crate::element::Float;
use gemm::Parallelism;

mod small_n;
#[doc(hidden)]
pub use small_n::force_small_n;

/// Where the matrices of a batched operand sit in its slice: element
/// `(b, i, j)` is at `offset + b*batch_stride + i*row_stride + j*col_stride`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatLayout {
    pub offset: usize,
    pub row_stride: usize,
    pub col_stride: usize,
    pub batch_stride: usize,
}

impl MatLayout {
    /// Contiguous row-major `[batch, rows, cols]`.
    pub fn contiguous(rows: usize, cols: usize) -> MatLayout {
        MatLayout {
            offset: 0,
            row_stride: cols,
            col_stride: 1,
            batch_stride: rows * cols,
        }
    }

    /// The same storage read as the transpose of each matrix.
    pub fn t(self) -> MatLayout {
        MatLayout {
            row_stride: self.col_stride,
            col_stride: self.row_stride,
            ..self
        }
    }

    /// The same matrix for every batch index (batch stride 0).
    pub fn broadcast(self) -> MatLayout {
        MatLayout {
            batch_stride: 0,
            ..self
        }
    }

    pub fn with_offset(self, offset: usize) -> MatLayout {
        MatLayout { offset, ..self }
    }

    /// Largest index touched plus one, for a `[batch, rows, cols]` view
    /// (0 when the view is empty).
    fn extent(&self, batch: usize, rows: usize, cols: usize) -> usize {
        if batch == 0 || rows == 0 || cols == 0 {
            return 0;
        }
        self.offset
            + (batch - 1) * self.batch_stride
            + (rows - 1) * self.row_stride
            + (cols - 1) * self.col_stride
            + 1
    }
}

/// Multiply-adds per matrix below which a lone matmul is run on one thread
/// (fork/join costs more than it saves). gemm has its own threshold on top.
/// Measured with `bench_ops -- 100 --small-mm` (2-core AVX-512 box, shared
/// with other jobs): 64x256x10 (164K MACs) 0.006 ms on one thread vs
/// 0.013-0.030 split over two, 64x256x32 (524K) 0.008 vs 0.015; from about
/// 1M MACs (10-15 us on one thread) a split can pay on an idle box.
const GEMM_PAR_WORK: usize = 1 << 20;

/// Whether a lone product is worth splitting across threads: enough
/// multiply-adds, or (few output columns: 8192x50 @ 50x2 has 0.8M) enough
/// memory to stream through A and C that one thread is bound by it (that
/// product ran at 152 us on one thread, PyTorch splits it).
fn worth_splitting(m: usize, k: usize, n: usize) -> bool {
    m * k * n >= GEMM_PAR_WORK || (m >= 64 && m * (k + n) >= 8 * crate::PAR_THRESHOLD)
}

/// Multiply-adds per matrix below which a batch is split across threads
/// by batch index rather than inside each gemm.
const BATCH_PAR_WORK: usize = 192 * 192 * 192;

/// How a medium product is cut for `parts` threads: `(rows, cols)` per
/// block, one of them the whole dimension. The larger of `m`, `n` is split
/// (column blocks a multiple of 16 for gemm's vector kernels).
fn split_block(m: usize, n: usize, parts: usize) -> (usize, usize) {
    if m >= n {
        (m.div_ceil(parts), n)
    } else {
        (m, n.div_ceil(parts).next_multiple_of(16).min(n))
    }
}

fn threads(parallel: bool) -> usize {
    if parallel {
        rayon::current_num_threads()
    } else {
        1
    }
}

/// One single-matrix gemm `c = beta*c + alpha*a@b` on raw pointers.
///
/// Safety: the three views must be in bounds, `c` must not overlap `a`/`b`
/// and no two `(i, j)` of `c` may share an address.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_one<T: Float>(
    m: usize,
    k: usize,
    n: usize,
    c: *mut T,
    lc: (usize, usize),
    a: *const T,
    la: (usize, usize),
    b: *const T,
    lb: (usize, usize),
    alpha: T,
    beta: T,
    par: Parallelism,
) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        for i in 0..m {
            for j in 0..n {
                let p = c.add(i * lc.0 + j * lc.1);
                *p = if beta == T::zero() {
                    T::zero()
                } else {
                    beta * *p
                };
            }
        }
        return;
    }
    // gemm's convention: dst := alpha*dst + beta*lhs@rhs, and with
    // `read_dst == false` dst is not read (so a NaN in it does not leak).
    let _in_gemm = InGemm::enter();
    gemm::gemm(
        m,
        n,
        k,
        c,
        lc.1 as isize,
        lc.0 as isize,
        beta != T::zero(),
        a,
        la.1 as isize,
        la.0 as isize,
        b,
        lb.1 as isize,
        lb.0 as isize,
        beta,
        alpha,
        false,
        false,
        false,
        par,
    );
}

/// `C[b] = A[b] @ B[b]` for `b < batch`, A `[m, k]`, B `[k, n]` as views
/// into `a`/`b`. Returns C contiguous `[batch, m, n]`.
#[allow(clippy::too_many_arguments)]
pub fn matmul<T: Float>(
    a: &[T],
    la: MatLayout,
    b: &[T],
    lb: MatLayout,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) -> Vec<T> {
    // beta = 0: C is never read, so a recycled buffer needs no zero fill.
    let mut c = crate::buffers::alloc_uninit::<T>(batch * m * n);
    matmul_into(
        &mut c,
        MatLayout::contiguous(m, n),
        T::zero(),
        T::one(),
        a,
        la,
        b,
        lb,
        batch,
        m,
        k,
        n,
    );
    c
}

/// `C[b] = beta*C[b] + alpha*A[b]@B[b]`. With `beta == 0` C is not read
/// (NaN/garbage in it is overwritten). C is a view of `c` that must not
/// overlap itself within a matrix; its batch stride is either at least one
/// matrix's extent or 0, and 0 means every product is accumulated into the
/// same matrix (`C = beta*C + alpha*sum_b A[b]@B[b]`, e.g. a weight
/// gradient summed over a broadcast batch).
#[allow(clippy::too_many_arguments)]
pub fn matmul_into<T: Float>(
    c: &mut [T],
    lc: MatLayout,
    beta: T,
    alpha: T,
    a: &[T],
    la: MatLayout,
    b: &[T],
    lb: MatLayout,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
) {
    matmul_impl(c, lc, beta, alpha, a, la, b, lb, batch, m, k, n, true)
}

/// `matmul_into` with the threading decided by the caller: with
/// `parallel == false` everything runs on the calling thread (for kernels
/// that already split their work across rayon tasks).
#[allow(clippy::too_many_arguments)]
pub(crate) fn matmul_impl<T: Float>(
    c: &mut [T],
    lc: MatLayout,
    beta: T,
    alpha: T,
    a: &[T],
    la: MatLayout,
    b: &[T],
    lb: MatLayout,
    batch: usize,
    m: usize,
    k: usize,
    n: usize,
    parallel: bool,
) {
    if batch == 0 || m == 0 || n == 0 {
        return;
    }
    assert!(
        la.extent(batch, m, k) <= a.len(),
        "matmul: A view out of bounds"
    );
    assert!(
        lb.extent(batch, k, n) <= b.len(),
        "matmul: B view out of bounds"
    );
    assert!(
        lc.extent(batch, m, n) <= c.len(),
        "matmul: C view out of bounds"
    );
    // No two (i, j) of one C matrix may alias (gemm writes them in parallel).
    let distinct = (m == 1 || lc.row_stride > 0)
        && (n == 1 || lc.col_stride > 0)
        && (m == 1
            || n == 1
            || lc.row_stride >= n * lc.col_stride
            || lc.col_stride >= m * lc.row_stride);
    assert!(distinct, "matmul: C view overlaps itself");
    let c_mat = lc.extent(1, m, n) - lc.offset;
    assert!(
        batch == 1 || lc.batch_stride == 0 || lc.batch_stride >= c_mat,
        "matmul: C batches overlap"
    );

    let work = m * n * k;
    let rs = |l: MatLayout| (l.row_stride, l.col_stride);
    let (pa, pb) = (a.as_ptr(), b.as_ptr());

    if batch > 1 && lc.batch_stride == 0 {
        // Reduction over the batch into one C: sequential, gemm parallel inside.
        let par = if work >= GEMM_PAR_WORK && threads(parallel) > 1 {
            Parallelism::Rayon(threads(parallel))
        } else {
            Parallelism::None
        };
        let pc = c.as_mut_ptr();
        for bi in 0..batch {
            let beta_i = if bi == 0 { beta } else { T::one() };
            // SAFETY: bounds and aliasing checked above; a, b are shared
            // borrows distinct from the exclusive borrow of c.
            unsafe {
                gemm_one(
                    m,
                    k,
                    n,
                    pc.add(lc.offset),
                    rs(lc),
                    pa.add(la.offset + bi * la.batch_stride),
                    rs(la),
                    pb.add(lb.offset + bi * lb.batch_stride),
                    rs(lb),
                    alpha,
                    beta_i,
                    par,
                );
            }
        }
        return;
    }

    let nthreads = threads(parallel);
    if batch > 1 && nthreads > 1 && work < BATCH_PAR_WORK && batch * work >= GEMM_PAR_WORK {
        // Many small products: one thread per group of batch indices.
        let pc = SendPtr(c.as_mut_ptr());
        let (pa, pb) = (SendPtr(pa as *mut T), SendPtr(pb as *mut T));
        let min_len = (GEMM_PAR_WORK / work.max(1)).max(1);
        let parts = (batch / min_len).clamp(1, nthreads);
        crate::par::for_each_part(batch, parts, 1, |range| {
            for bi in range {
                let (pc, pa, pb) = (&pc, &pa, &pb);
                // SAFETY: bounds checked above; batch index bi's C matrix
                // is disjoint from every other one (batch stride >= extent).
                unsafe {
                    gemm_one(
                        m,
                        k,
                        n,
                        pc.0.add(lc.offset + bi * lc.batch_stride),
                        rs(lc),
                        pa.0.add(la.offset + bi * la.batch_stride),
                        rs(la),
                        pb.0.add(lb.offset + bi * lb.batch_stride),
                        rs(lb),
                        alpha,
                        beta,
                        Parallelism::None,
                    );
                }
            }
        });
        return;
    }

    if batch == 1
        && beta == T::zero()
        && alpha == T::one()
        && lc.col_stride == 1
        && transposed_dst_wins(m, k, n, lb)
    {
        let nth = if work >= GEMM_PAR_WORK { nthreads } else { 1 };
        let row = lc.row_stride;
        matmul_via_ct(&mut c[lc.offset..], row, a, la, b, lb, m, k, n, nth, None);
        return;
    }

    if batch == 1 && nthreads > 1 && worth_splitting(m, k, n) && m.max(n) >= 2 * nthreads {
        // A medium product: one single-threaded gemm per thread on a slice
        // of the larger of C's dimensions (cheaper than gemm's own
        // fork/join at these sizes). Each gemm packs all of the operand
        // that is not split, so splitting the larger dimension packs the
        // smaller operand twice instead of the larger: 32x1024 @ 1024x256
        // split by rows ran at half the speed of one thread (bench_ops
        // --small-mm), split by columns it is on par or ahead.
        let (r, cl) = split_block(m, n, nthreads);
        let pc = SendPtr(c.as_mut_ptr());
        let (pa, pb) = (SendPtr(pa as *mut T), SendPtr(pb as *mut T));
        crate::par::for_each_task(nthreads, |t| {
            let (r0, mr) = if r < m {
                (t * r, r.min(m.saturating_sub(t * r)))
            } else {
                (0, m)
            };
            let (c0, nc) = if cl < n {
                (t * cl, cl.min(n.saturating_sub(t * cl)))
            } else {
                (0, n)
            };
            if mr == 0 || nc == 0 {
                return;
            }
            let (pc, pa, pb) = (&pc, &pa, &pb);
            // SAFETY: bounds checked above; each task writes its own rows
            // or columns of C (no two (i, j) of C share an address).
            unsafe {
                gemm_one(
                    mr,
                    k,
                    nc,
                    pc.0.add(lc.offset + r0 * lc.row_stride + c0 * lc.col_stride),
                    rs(lc),
                    pa.0.add(la.offset + r0 * la.row_stride),
                    rs(la),
                    pb.0.add(lb.offset + c0 * lb.col_stride),
                    rs(lb),
                    alpha,
                    beta,
                    Parallelism::None,
                );
            }
        });
        return;
    }

    let par = if work >= GEMM_PAR_WORK && nthreads > 1 {
        Parallelism::Rayon(nthreads)
    } else {
        Parallelism::None
    };
    let pc = c.as_mut_ptr();
    for bi in 0..batch {
        // SAFETY: as above.
        unsafe {
            gemm_one(
                m,
                k,
                n,
                pc.add(lc.offset + bi * lc.batch_stride),
                rs(lc),
                pa.add(la.offset + bi * la.batch_stride),
                rs(la),
                pb.add(lb.offset + bi * lb.batch_stride),
                rs(lb),
                alpha,
                beta,
                par,
            );
        }
    }
}

/// Whether `C = A @ B` is faster computed as C^T (C column-major, then
/// transposed): when B is column-major (`x @ W^T` with W `[n, k]` stored
/// row-major, i.e. every Linear layer) and much larger than A, gemm run on
/// a row-major C packs all of B on every call; on a column-major C it reads
/// B in place. Measured with `bench_ops -- 60 --small-mm` ("C^T" rows, one
/// thread): 32x1024 @ (256x1024)^T 0.231 -> 0.093 ms, 32x256 @
/// (768x256)^T 0.124 -> 0.065, 64x784 @ (256x784)^T 0.156 -> 0.118; slower
/// when B is small (64x256 @ (32x256)^T 0.011 -> 0.015) or A is not much
/// smaller than B (128x256 @ (64x256)^T 0.024 -> 0.028, 4096x784 @
/// (256x784)^T 7.7 -> 8.6), hence `k >= 4m` and `n*k >= 64K`.
fn transposed_dst_wins(m: usize, k: usize, n: usize, lb: MatLayout) -> bool {
    lb.row_stride == 1 && lb.col_stride != 1 && k >= 4 * m && n * k >= 1 << 16
}

thread_local! {
    /// Each thread's C^T buffers (one `Vec<T>` per element type), kept.
    static CT_SCRATCH: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on this thread's reusable buffer of at least `len` elements
/// (contents unspecified); a nested call gets a fresh buffer.
fn with_ct_scratch<T: Float, R>(len: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
    let mut v: Box<Vec<T>> = CT_SCRATCH
        .try_with(|c| {
            let mut c = c.try_borrow_mut().ok()?;
            let i = c.iter().position(|b| b.is::<Vec<T>>())?;
            c.swap_remove(i).downcast::<Vec<T>>().ok()
        })
        .ok()
        .flatten()
        .unwrap_or_default();
    if v.len() < len {
        v.resize(len, T::zero());
    }
    let r = f(&mut v[..len]);
    let _ = CT_SCRATCH.try_with(|c| {
        if let Ok(mut c) = c.try_borrow_mut() {
            if !c.iter().any(|b| b.is::<Vec<T>>()) {
                c.push(v);
            }
        }
    });
    r
}

/// `C = A @ B` into row-major C (`c[i*ldc + j]`) through a column-major
/// C^T in scratch: `nth` single-threaded gemms on column slices, then a
/// tiled transpose by row blocks (a multiple of 4 rows; in parallel when C
/// is large), each followed by `finish(r0, rows)` if given (rows are then
/// contiguous: `ldc == n` is required with `finish`).
#[allow(clippy::too_many_arguments)]
fn matmul_via_ct<T: Float>(
    c: &mut [T],
    ldc: usize,
    a: &[T],
    la: MatLayout,
    b: &[T],
    lb: MatLayout,
    m: usize,
    k: usize,
    n: usize,
    nth: usize,
    finish: Option<RowEpilogue<'_, T>>,
) {
    assert!(finish.is_none() || ldc == n);
    assert!(m == 0 || n == 0 || (m - 1) * ldc + n <= c.len());
    with_ct_scratch::<T, _>(m * n, |tmp| {
        let pt = SendPtr(tmp.as_mut_ptr());
        let (pa, pb) = (SendPtr(a.as_ptr() as *mut T), SendPtr(b.as_ptr() as *mut T));
        let cols = if nth > 1 {
            n.div_ceil(nth).next_multiple_of(16).min(n)
        } else {
            n
        };
        let part = |t: usize| {
            let c0 = t * cols;
            if c0 >= n {
                return;
            }
            let nc = cols.min(n - c0);
            let (pt, pa, pb) = (&pt, &pa, &pb);
            // SAFETY: the caller checked A and B; part t writes columns
            // [c0, c0+nc) of the column-major m x n C^T in `tmp` (m*n).
            unsafe {
                gemm_one(
                    m,
                    k,
                    nc,
                    pt.0.add(c0 * m),
                    (1, m),
                    pa.0.add(la.offset),
                    (la.row_stride, la.col_stride),
                    pb.0.add(lb.offset + c0 * lb.col_stride),
                    (lb.row_stride, lb.col_stride),
                    T::one(),
                    T::zero(),
                    Parallelism::None,
                );
            }
        };
        crate::par::for_each_task(nth, part);
        let tmp = &*tmp;
        let block = |r0: usize, cb: &mut [T]| {
            let rows = (m - r0).min(cb.len().div_ceil(ldc));
            transpose(&tmp[r0..], m, cb, ldc, rows, n);
            if let Some(f) = finish {
                f(r0, &mut cb[..rows * n]);
            }
        };
        // The transpose is a light pass: parallel only from 4x the
        // elementwise threshold.
        let rows = m.div_ceil(nth.max(1)).next_multiple_of(4);
        let used = (m - 1) * ldc + n;
        if nth > 1 && m * n >= 4 * crate::PAR_THRESHOLD && m > rows {
            crate::par::chunks_mut_in(&mut c[..used], nth, rows * ldc, |s, cb| block(s / ldc, cb));
        } else {
            block(0, &mut c[..used]);
        }
    });
}

/// `dst[i*ldd + j] = src[j*lds + i]` for `i < rows`, `j < cols`, in 16x16
/// tiles (AVX-512 register transposes for whole f32 tiles).
fn transpose<T: Float>(src: &[T], lds: usize, dst: &mut [T], ldd: usize, rows: usize, cols: usize) {
    const B: usize = 16;
    for i0 in (0..rows).step_by(B) {
        let i1 = (i0 + B).min(rows);
        for j0 in (0..cols).step_by(B) {
            let j1 = (j0 + B).min(cols);
            #[cfg(target_arch = "x86_64")]
            if i1 - i0 == B
                && j1 - j0 == B
                && std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
                && is_x86_feature_detected!("avx512f")
            {
                assert!((j0 + B - 1) * lds + i0 + B <= src.len());
                assert!((i0 + B - 1) * ldd + j0 + B <= dst.len());
                // SAFETY: T is f32 (checked), avx512f detected, the tile's
                // reads and writes are in bounds (asserted).
                unsafe {
                    tile16_avx512(
                        src.as_ptr().add(j0 * lds + i0) as *const f32,
                        lds,
                        dst.as_mut_ptr().add(i0 * ldd + j0) as *mut f32,
                        ldd,
                    );
                }
                continue;
            }
            for i in i0..i1 {
                let d = &mut dst[i * ldd + j0..i * ldd + j1];
                for (jj, v) in d.iter_mut().enumerate() {
                    *v = src[(j0 + jj) * lds + i];
                }
            }
        }
    }
}

/// One 16x16 f32 tile: `dst[r*ldd + c] = src[c*lds + r]`.
///
/// Safety: avx512f; 16 rows of 16 readable at `src` (stride `lds`) and
/// writable at `dst` (stride `ldd`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn tile16_avx512(src: *const f32, lds: usize, dst: *mut f32, ldd: usize) {
    use std::arch::x86_64::*;
    let mut r: [__m512; 16] = std::array::from_fn(|k| _mm512_loadu_ps(src.add(k * lds)));
    crate::conv::transpose16(&mut r);
    for (k, v) in r.iter().enumerate() {
        _mm512_storeu_ps(dst.add(k * ldd), *v);
    }
}

thread_local! {
    static IN_GEMM: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as inside the gemm crate until dropped.
struct InGemm(bool);

impl InGemm {
    fn enter() -> InGemm {
        InGemm(IN_GEMM.with(|f| f.replace(true)))
    }
}

impl Drop for InGemm {
    fn drop(&mut self) {
        let prev = self.0;
        IN_GEMM.with(|f| f.set(prev));
    }
}

/// Whether the calling thread is inside a call into the `gemm` crate. The
/// gemm crate allocates on every call that packs (its packing buffer and
/// a `Vec<bool>` of packed-lhs flags, `gemm-common` 0.19 `gemm.rs`), with no
/// option to pass a workspace; the allocation test uses this to tell those
/// allocations from kiln's own (which must be none in steady state).
#[doc(hidden)]
pub fn in_gemm() -> bool {
    IN_GEMM.try_with(|f| f.get()).unwrap_or(false)
}

/// An epilogue on a finished block of rows of C: `epi(r0, rows)` with
/// `rows = &mut c[r0*n..(r0+len)*n]`, `r0` a multiple of 4.
pub type RowEpilogue<'a, T> = &'a (dyn Fn(usize, &mut [T]) + Sync);

/// Rows of C per task in `matmul_epilogue` for a product of `m` rows on
/// `threads` threads: one block per thread (a multiple of 4 rows). Each
/// block's gemm packs all of B, so smaller blocks (tried: ~256 KB of C per
/// block, to run the epilogue from L2) repacked B 12 times on 1024x256 @
/// (768x256)^T and ran at 0.6-0.7x the plain matmul (bench_ops
/// --small-mm).
fn epilogue_rows(m: usize, threads: usize) -> usize {
    m.div_ceil(threads).next_multiple_of(4)
}

/// `C = A @ B (+ bias)` for one product into contiguous C `[m, n]`
/// (`c.len() == m*n`, never read), A `[m, k]` and B `[k, n]` views as in
/// `matmul` (batch fields ignored). `bias` (`[n]`) is added to every row
/// (addmm). The rows are computed in blocks (spread over the rayon threads
/// when the product is large enough, each block's gemm single-threaded;
/// one block with gemm's own threading when there are too few rows), and
/// once a block of rows `[r0, r0+len)` is final, `epi(r0, &mut
/// c[r0*n..(r0+len)*n])` is called on it from the thread that computed it.
/// A medium product with fewer rows than columns is split by columns
/// instead (see `matmul_into`); then bias and epilogue run on row blocks
/// after the product.
/// Blocks start at multiples of 4 rows. Allocation-free apart from the
/// gemm crate's own per-call packing buffers (see `in_gemm`).
#[allow(clippy::too_many_arguments)]
pub fn matmul_epilogue<T: Float>(
    c: &mut [T],
    a: &[T],
    la: MatLayout,
    b: &[T],
    lb: MatLayout,
    m: usize,
    k: usize,
    n: usize,
    bias: Option<&[T]>,
    epi: Option<RowEpilogue<'_, T>>,
) {
    assert_eq!(c.len(), m * n, "matmul_epilogue: C must hold m*n elements");
    if let Some(bias) = bias {
        assert_eq!(bias.len(), n, "matmul_epilogue: bias must hold n elements");
    }
    if m == 0 || n == 0 {
        return;
    }
    assert!(
        la.extent(1, m, k) <= a.len(),
        "matmul: A view out of bounds"
    );
    assert!(
        lb.extent(1, k, n) <= b.len(),
        "matmul: B view out of bounds"
    );
    let (pa, pb) = (SendPtr(a.as_ptr() as *mut T), SendPtr(b.as_ptr() as *mut T));
    let block = |r0: usize, cb: &mut [T], par: Parallelism| {
        let rows = cb.len() / n;
        let (pa, pb) = (&pa, &pb);
        // SAFETY: A and B bounds checked above, this block's rows of C are
        // `cb` (contiguous, exclusively borrowed).
        unsafe {
            gemm_one(
                rows,
                k,
                n,
                cb.as_mut_ptr(),
                (n, 1),
                pa.0.add(la.offset + r0 * la.row_stride),
                (la.row_stride, la.col_stride),
                pb.0.add(lb.offset),
                (lb.row_stride, lb.col_stride),
                T::one(),
                T::zero(),
                par,
            );
        }
        if let Some(bias) = bias {
            for row in cb.chunks_exact_mut(n) {
                for (v, &bv) in row.iter_mut().zip(bias) {
                    *v += bv;
                }
            }
        }
        if let Some(f) = epi {
            f(r0, cb);
        }
    };
    let threads = rayon::current_num_threads();
    let work = m * n * k;
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && small_n::applies(m, k, n, la, lb)
    {
        // A weight gradient `h^T @ g` with few output features: the
        // outer-product kernel, then bias and epilogue over row blocks.
        // SAFETY: T is f32 (checked above): identity casts.
        unsafe {
            let f = |s: &[T]| std::slice::from_raw_parts(s.as_ptr() as *const f32, s.len());
            let cf = std::slice::from_raw_parts_mut(c.as_mut_ptr() as *mut f32, c.len());
            small_n::run(cf, f(a), la, f(b), lb, m, k, n);
        }
        if bias.is_some() || epi.is_some() {
            let rows = m.div_ceil(threads).next_multiple_of(4);
            if m * n >= 4 * crate::PAR_THRESHOLD && m > rows {
                crate::par::chunks_mut_in(c, threads, rows * n, |s, cb| {
                    if let Some(bias) = bias {
                        for row in cb.chunks_exact_mut(n) {
                            for (v, &bv) in row.iter_mut().zip(bias) {
                                *v += bv;
                            }
                        }
                    }
                    if let Some(f) = epi {
                        f(s / n, cb);
                    }
                });
            } else {
                if let Some(bias) = bias {
                    for row in c.chunks_exact_mut(n) {
                        for (v, &bv) in row.iter_mut().zip(bias) {
                            *v += bv;
                        }
                    }
                }
                if let Some(f) = epi {
                    f(0, c);
                }
            }
        }
        return;
    }
    let finish = |r0: usize, cb: &mut [T]| {
        if let Some(bias) = bias {
            for row in cb.chunks_exact_mut(n) {
                for (v, &bv) in row.iter_mut().zip(bias) {
                    *v += bv;
                }
            }
        }
        if let Some(f) = epi {
            f(r0, cb);
        }
    };
    if transposed_dst_wins(m, k, n, lb) {
        // Computed as C^T (see `transposed_dst_wins`); bias and epilogue
        // run on each row block right after it is transposed into C.
        let nth = if work >= GEMM_PAR_WORK { threads } else { 1 };
        matmul_via_ct(c, n, a, la, b, lb, m, k, n, nth, Some(&finish));
        return;
    }
    if threads > 1 && work >= GEMM_PAR_WORK && m < n && n >= 32 {
        // Fewer rows than columns: row blocks would each pack all of B,
        // so the product is split by columns (as `matmul_into` does) and
        // the bias and epilogue run afterwards on row blocks, in parallel
        // when C is large.
        matmul_impl(
            c,
            MatLayout::contiguous(m, n),
            T::zero(),
            T::one(),
            a,
            la,
            b,
            lb,
            1,
            m,
            k,
            n,
            true,
        );
        let rows = m.div_ceil(threads).next_multiple_of(4);
        if m * n >= 4 * crate::PAR_THRESHOLD && m > rows {
            crate::par::chunks_mut_in(c, threads, rows * n, |s, cb| finish(s / n, cb));
        } else {
            finish(0, c);
        }
        return;
    }
    if threads > 1 && worth_splitting(m, k, n) && m >= 8 {
        let rows = epilogue_rows(m, threads);
        crate::par::chunks_mut_in(c, m.div_ceil(rows), rows * n, |s, cb| {
            block(s / n, cb, Parallelism::None)
        });
    } else if threads > 1 && work >= GEMM_PAR_WORK {
        block(0, c, Parallelism::Rayon(threads));
    } else {
        block(0, c, Parallelism::None);
    }
}

/// A raw pointer that may cross threads; the code using it guarantees that
/// threads touch disjoint elements.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr<T>(pub(crate) *mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Deterministic pseudo-random values in [-1, 1).
    pub(crate) fn rand_vec<T: Float>(n: usize, seed: u64) -> Vec<T> {
        let mut s = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                T::from_f64(((s >> 11) as f64 / (1u64 << 53) as f64) * 2.0 - 1.0)
            })
            .collect()
    }

    pub(crate) fn assert_close<T: Float>(got: &[T], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            let g = g.as_f64();
            assert!(
                (g - w).abs() <= tol * (1.0 + w.abs()),
                "{what}: index {i}: got {g}, want {w}"
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn naive(
        a: &[f64],
        la: MatLayout,
        b: &[f64],
        lb: MatLayout,
        batch: usize,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<f64> {
        let mut c = vec![0.0; batch * m * n];
        for bi in 0..batch {
            for i in 0..m {
                for j in 0..n {
                    let mut s = 0.0;
                    for p in 0..k {
                        s += a[la.offset
                            + bi * la.batch_stride
                            + i * la.row_stride
                            + p * la.col_stride]
                            * b[lb.offset
                                + bi * lb.batch_stride
                                + p * lb.row_stride
                                + j * lb.col_stride];
                    }
                    c[(bi * m + i) * n + j] = s;
                }
            }
        }
        c
    }

    #[allow(clippy::too_many_arguments)]
    fn check<T: Float>(
        batch: usize,
        m: usize,
        k: usize,
        n: usize,
        ta: bool,
        tb: bool,
        bcast_b: bool,
        tol: f64,
    ) {
        // A stored as [batch, m, k] or [batch, k, m] (transposed view), with an offset.
        let off = 3;
        let a64: Vec<f64> = rand_vec::<f64>(off + batch * m * k, (m * 31 + k) as u64);
        let b64: Vec<f64> = rand_vec::<f64>(off + batch * k * n, (n * 17 + k) as u64);
        let la = if ta {
            MatLayout::contiguous(k, m).t()
        } else {
            MatLayout::contiguous(m, k)
        }
        .with_offset(off);
        let mut lb = if tb {
            MatLayout::contiguous(n, k).t()
        } else {
            MatLayout::contiguous(k, n)
        }
        .with_offset(off);
        if bcast_b {
            lb = lb.broadcast();
        }
        let want = naive(&a64, la, &b64, lb, batch, m, k, n);
        let a: Vec<T> = a64.iter().map(|&v| T::from_f64(v)).collect();
        let b: Vec<T> = b64.iter().map(|&v| T::from_f64(v)).collect();
        let got = matmul(&a, la, &b, lb, batch, m, k, n);
        let what = format!("matmul b{batch} {m}x{k}x{n} ta={ta} tb={tb} bc={bcast_b}");
        assert_close(&got, &want, tol * (k.max(1) as f64).sqrt(), &what);

        // Accumulate form: C = 0.5*C + 2*A@B.
        let c0: Vec<f64> = rand_vec::<f64>(batch * m * n, 99);
        let mut c: Vec<T> = c0.iter().map(|&v| T::from_f64(v)).collect();
        matmul_into(
            &mut c,
            MatLayout::contiguous(m, n),
            T::c(0.5),
            T::c(2.0),
            &a,
            la,
            &b,
            lb,
            batch,
            m,
            k,
            n,
        );
        let want2: Vec<f64> = c0
            .iter()
            .zip(&want)
            .map(|(c, p)| 0.5 * c + 2.0 * p)
            .collect();
        assert_close(
            &c,
            &want2,
            tol * (k.max(1) as f64).sqrt(),
            &format!("{what} acc"),
        );
    }

    #[test]
    fn matmul_matches_naive() {
        for &(batch, m, k, n) in &[
            (1, 1, 1, 1),
            (1, 7, 5, 3),
            (3, 17, 33, 9),
            (2, 64, 70, 65),
            (1, 129, 257, 95),
            (40, 12, 8, 16),
            (64, 32, 40, 32),
            (1, 8, 300, 300),
            (1, 20, 700, 100),
            (2, 3, 0, 4),
        ] {
            for &(ta, tb, bc) in &[
                (false, false, false),
                (true, false, false),
                (false, true, false),
                (true, true, true),
            ] {
                check::<f64>(batch, m, k, n, ta, tb, bc, 1e-12);
                check::<f32>(batch, m, k, n, ta, tb, bc, 1e-5);
            }
        }
    }

    #[test]
    fn matmul_reduces_over_broadcast_c() {
        // C (batch stride 0) += sum_b A[b]^T @ B[b], C read with beta = 1.
        let (batch, m, k, n) = (5, 6, 7, 8);
        let a: Vec<f64> = rand_vec(batch * k * m, 1);
        let b: Vec<f64> = rand_vec(batch * k * n, 2);
        let la = MatLayout::contiguous(k, m).t();
        let lb = MatLayout::contiguous(k, n);
        let prods = naive(&a, la, &b, lb, batch, m, k, n);
        let mut c = vec![1.0f64; m * n];
        matmul_into(
            &mut c,
            MatLayout::contiguous(m, n).broadcast(),
            1.0,
            1.0,
            &a,
            la,
            &b,
            lb,
            batch,
            m,
            k,
            n,
        );
        let want: Vec<f64> = (0..m * n)
            .map(|i| 1.0 + (0..batch).map(|bi| prods[bi * m * n + i]).sum::<f64>())
            .collect();
        assert_close(&c, &want, 1e-12, "reduce into broadcast C");
    }

    #[test]
    fn matmul_into_strided_transposed_c_ignores_nan_when_beta_zero() {
        let (m, k, n) = (5, 4, 3);
        let a: Vec<f32> = rand_vec(m * k, 5);
        let b: Vec<f32> = rand_vec(k * n, 6);
        let a64: Vec<f64> = a.iter().map(|&v| v as f64).collect();
        let b64: Vec<f64> = b.iter().map(|&v| v as f64).collect();
        let want = naive(
            &a64,
            MatLayout::contiguous(m, k),
            &b64,
            MatLayout::contiguous(k, n),
            1,
            m,
            k,
            n,
        );
        // C stored transposed ([n, m] buffer) and pre-filled with NaN.
        let mut c = vec![f32::NAN; m * n];
        matmul_into(
            &mut c,
            MatLayout::contiguous(n, m).t(),
            0.0,
            1.0,
            &a,
            MatLayout::contiguous(m, k),
            &b,
            MatLayout::contiguous(k, n),
            1,
            m,
            k,
            n,
        );
        let got: Vec<f32> = (0..m * n).map(|idx| c[(idx % n) * m + idx / n]).collect();
        assert_close(&got, &want, 1e-5, "transposed C");
    }

    #[test]
    #[should_panic(expected = "out of bounds")]
    fn matmul_rejects_out_of_bounds_views() {
        let a = vec![0.0f32; 5];
        let b = vec![0.0f32; 6];
        let _ = matmul(
            &a,
            MatLayout::contiguous(2, 3),
            &b,
            MatLayout::contiguous(3, 2),
            1,
            2,
            3,
            2,
        );
    }
}

#[cfg(test)]
mod row_split_tests {
    use super::*;

    /// A product split by rows or columns across threads, with a
    /// transposed B and beta = 1.
    #[test]
    fn row_split_matches_naive() {
        for (m, k, n) in [(67, 253, 71), (71, 253, 67), (9, 1700, 300)] {
            split_case(m, k, n);
        }
    }

    fn split_case(m: usize, k: usize, n: usize) {
        assert!(m * k * n >= GEMM_PAR_WORK);
        let a: Vec<f64> = (0..m * k).map(|i| ((i * 7) % 13) as f64 - 6.0).collect();
        let bt: Vec<f64> = (0..n * k).map(|i| ((i * 5) % 11) as f64 - 5.0).collect();
        let mut c: Vec<f64> = (0..m * n).map(|i| (i % 3) as f64).collect();
        let c0 = c.clone();
        let lb = MatLayout::contiguous(n, k).t();
        matmul_into(
            &mut c,
            MatLayout::contiguous(m, n),
            1.0,
            1.0,
            &a,
            MatLayout::contiguous(m, k),
            &bt,
            lb,
            1,
            m,
            k,
            n,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f64 =
                    c0[i * n + j] + (0..k).map(|p| a[i * k + p] * bt[j * k + p]).sum::<f64>();
                assert_eq!(c[i * n + j], want);
            }
        }
    }
}

#[cfg(test)]
mod epilogue_tests {
    use super::tests::{assert_close, rand_vec};
    use super::*;
    use parking_lot::Mutex;

    /// `matmul_epilogue` (bias + ReLU epilogue) against `matmul` plus the
    /// same bias and ReLU, for row-split, single-block and gemm-threaded
    /// shapes; the epilogue's row blocks start at multiples of 4 and cover
    /// every row exactly once.
    #[test]
    fn matmul_epilogue_matches_matmul() {
        for &(m, k, n, tb) in &[
            (1, 3, 5, false),
            (7, 5, 3, true),
            (64, 784, 256, true),
            (67, 53, 71, false),
            (4, 512, 600, true),
            (6, 40000, 5, false),
            (8192, 20, 50, true),
            (600, 300, 500, false),
        ] {
            let a: Vec<f32> = rand_vec(m * k, (m + k) as u64);
            let b: Vec<f32> = rand_vec(k * n, (k + n) as u64);
            let bias: Vec<f32> = rand_vec(n, 7);
            let lb = if tb {
                MatLayout::contiguous(n, k).t()
            } else {
                MatLayout::contiguous(k, n)
            };
            let la = MatLayout::contiguous(m, k);
            let want: Vec<f64> = matmul(&a, la, &b, lb, 1, m, k, n)
                .chunks(n)
                .flat_map(|r| r.iter().zip(&bias).map(|(v, bv)| (v + bv).max(0.0) as f64))
                .collect();
            let seen = Mutex::new(vec![0usize; m]);
            let epi = |r0: usize, rows: &mut [f32]| {
                assert_eq!(r0 % 4, 0, "row block start {r0}");
                assert_eq!(rows.len() % n, 0);
                for s in &mut seen.lock()[r0..r0 + rows.len() / n] {
                    *s += 1;
                }
                for v in rows {
                    *v = v.max(0.0);
                }
            };
            let mut c = vec![f32::NAN; m * n];
            matmul_epilogue(&mut c, &a, la, &b, lb, m, k, n, Some(&bias), Some(&epi));
            assert_close(&c, &want, 1e-5, &format!("matmul_epilogue {m}x{k}x{n}"));
            assert!(seen.lock().iter().all(|&s| s == 1), "{m}x{k}x{n}: rows");
            // No bias, no epilogue: exactly the product.
            let mut c2 = vec![f32::NAN; m * n];
            matmul_epilogue(&mut c2, &a, la, &b, lb, m, k, n, None, None);
            let plain = matmul(&a, la, &b, lb, 1, m, k, n);
            let plain: Vec<f64> = plain.iter().map(|&v| v as f64).collect();
            assert_close(&c2, &plain, 1e-5, &format!("plain {m}x{k}x{n}"));
        }
    }

    /// The small-n outer-product kernel (`matmul/small_n.rs`), forced on
    /// and off, against f64 loops: A stored transposed (a weight
    /// gradient's `h^T`), with offsets and padded strides, rows that are
    /// and are not multiples of its 32-row block (and fewer than 16),
    /// every n it takes, long and short reductions, with and without bias
    /// and epilogue (row blocks starting at multiples of 4, each row once).
    #[test]
    fn small_n_kernel_matches_loops() {
        for &(m, k, n) in &[
            (1, 1, 1),
            (5, 3, 2),
            (17, 64, 12),
            (32, 100, 10),
            (33, 257, 7),
            (1152, 1024, 10),
            (256, 4096, 10),
            (50, 8192, 4),
            (95, 300, 1),
            (64, 77, 3),
            (300, 40, 11),
        ] {
            // A: [k, m] rows of pitch m + 3 after an offset of 2, read as
            // [m, k]; B: [k, n] rows of pitch n + 1 after an offset of 5.
            let (pa, pb) = (m + 3, n + 1);
            let a: Vec<f32> = rand_vec(2 + k * pa, (m * 31 + k) as u64);
            let b: Vec<f32> = rand_vec(5 + k * pb, (k * 7 + n) as u64);
            let la = MatLayout {
                offset: 2,
                row_stride: 1,
                col_stride: pa,
                batch_stride: 0,
            };
            let lb = MatLayout {
                offset: 5,
                row_stride: pb,
                col_stride: 1,
                batch_stride: 0,
            };
            let bias: Vec<f32> = rand_vec(n, 9);
            let prod: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    (0..k)
                        .map(|kk| a[2 + kk * pa + r] as f64 * b[5 + kk * pb + j] as f64)
                        .sum()
                })
                .collect();
            // f32 accumulation over k terms: error within a few
            // sqrt(k) * eps * sum |a*b| (the usual random-rounding bound).
            let bound: Vec<f64> = (0..m * n)
                .map(|i| {
                    let (r, j) = (i / n, i % n);
                    let s: f64 = (0..k)
                        .map(|kk| (a[2 + kk * pa + r] as f64 * b[5 + kk * pb + j] as f64).abs())
                        .sum();
                    4.0 * (k as f64).sqrt() * f32::EPSILON as f64 * s + 1e-7
                })
                .collect();
            let check = |c: &[f32], want: &[f64], what: &str| {
                for (i, (&g, &w)) in c.iter().zip(want).enumerate() {
                    let err = (g as f64 - w).abs();
                    assert!(err <= bound[i], "{what}: index {i}: got {g}, want {w}");
                }
            };
            for force in [Some(true), Some(false), None] {
                let what = format!("{m}x{k}x{n} force={force:?}");
                force_small_n(force);
                let mut c = vec![f32::NAN; m * n];
                matmul_epilogue(&mut c, &a, la, &b, lb, m, k, n, None, None);
                check(&c, &prod, &format!("small_n plain {what}"));
                let seen = Mutex::new(vec![0usize; m]);
                let epi = |r0: usize, rows: &mut [f32]| {
                    assert_eq!(r0 % 4, 0, "row block start {r0}");
                    for s in &mut seen.lock()[r0..r0 + rows.len() / n] {
                        *s += 1;
                    }
                    for v in rows {
                        *v = v.max(0.0);
                    }
                };
                let want: Vec<f64> = prod
                    .iter()
                    .enumerate()
                    .map(|(i, v)| (v + bias[i % n] as f64).max(0.0))
                    .collect();
                let mut c = vec![f32::NAN; m * n];
                matmul_epilogue(&mut c, &a, la, &b, lb, m, k, n, Some(&bias), Some(&epi));
                check(&c, &want, &format!("small_n bias+relu {what}"));
                assert!(seen.lock().iter().all(|&s| s == 1), "{what}: rows");
            }
            force_small_n(None);
        }
    }

    #[test]
    #[should_panic(expected = "m*n")]
    fn matmul_epilogue_rejects_wrong_c_length() {
        let a = vec![0.0f32; 6];
        let mut c = vec![0.0f32; 3];
        matmul_epilogue(
            &mut c,
            &a,
            MatLayout::contiguous(2, 3),
            &a,
            MatLayout::contiguous(3, 2),
            2,
            3,
            2,
            None,
            None,
        );
    }
}
