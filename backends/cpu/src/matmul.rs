//! Batched strided matrix multiplication on top of the `gemm` crate.
//! Operands are described by a `MatLayout` (offset, row/column/batch
//! strides in elements), so transposed views and broadcast batches (batch
//! stride 0) are multiplied in place without a copy. `matmul` returns a
//! contiguous `[batch, m, n]` Vec; `matmul_into` is the accumulate form
//! `C = beta*C + alpha*A@B` used for fused bias and gradient accumulation.

use crate::element::Float;
use gemm::Parallelism;
use rayon::prelude::*;

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
const GEMM_PAR_WORK: usize = 48 * 48 * 48;

/// Multiply-adds below which a lone product is split by rows across the
/// threads (single-threaded gemm each) rather than parallelized inside gemm.
const ROW_SPLIT_WORK: usize = 32 << 20;

/// Multiply-adds per matrix below which a batch is split across threads
/// by batch index rather than inside each gemm.
const BATCH_PAR_WORK: usize = 192 * 192 * 192;

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
    if batch > 1 && nthreads > 1 && work < BATCH_PAR_WORK {
        // Many small products: one thread per group of batch indices.
        let pc = SendPtr(c.as_mut_ptr());
        let (pa, pb) = (SendPtr(pa as *mut T), SendPtr(pb as *mut T));
        let min_len = (GEMM_PAR_WORK / work.max(1)).max(1);
        (0..batch)
            .into_par_iter()
            .with_min_len(min_len)
            .for_each(|bi| {
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
            });
        return;
    }

    if batch == 1
        && nthreads > 1
        && (GEMM_PAR_WORK..ROW_SPLIT_WORK).contains(&work)
        && m >= 2 * nthreads
    {
        // A medium product: split the rows of A and C across the threads,
        // one single-threaded gemm each (cheaper than gemm's own fork/join
        // at these sizes; measured on simple_net 64x784x256 and the
        // transformer block's projections).
        let pc = SendPtr(c.as_mut_ptr());
        let (pa, pb) = (SendPtr(pa as *mut T), SendPtr(pb as *mut T));
        let rows = m.div_ceil(nthreads);
        (0..nthreads).into_par_iter().for_each(|t| {
            let r0 = t * rows;
            if r0 >= m {
                return;
            }
            let mr = rows.min(m - r0);
            let (pc, pa, pb) = (&pc, &pa, &pb);
            // SAFETY: bounds checked above; each task writes its own rows
            // of C (no two (i, j) of C share an address).
            unsafe {
                gemm_one(
                    mr,
                    k,
                    n,
                    pc.0.add(lc.offset + r0 * lc.row_stride),
                    rs(lc),
                    pa.0.add(la.offset + r0 * la.row_stride),
                    rs(la),
                    pb.0.add(lb.offset),
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

    /// A medium product (row-split path) with a transposed B and beta = 1.
    #[test]
    fn row_split_matches_naive() {
        let (m, k, n) = (67, 53, 71);
        assert!((GEMM_PAR_WORK..ROW_SPLIT_WORK).contains(&(m * k * n)));
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
