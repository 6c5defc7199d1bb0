//! Matrix products with PyTorch's `matmul` semantics (1-d/2-d/batched with
//! broadcast batch dims), `mm`, `bmm`, `addmm` and `linear`, on the kiln-cpu
//! gemm kernels. Transposed and broadcast operands are passed to gemm as
//! strided views, without copies, whenever their batch dims collapse to one
//! stride.

use crate::autograd::record;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_cpu::matmul::{matmul as mm_kernel, matmul_epilogue, matmul_into, MatLayout};
use kiln_cpu::{Float, Layout};
use kiln_ir::DType;

/// The batch dims of `l` (all but the last two), collapsed to one stride if
/// possible: Some(stride) (0 when fully broadcast), None otherwise.
fn collapse_batch(l: &Layout) -> Option<usize> {
    let nb = l.shape.len() - 2;
    let dims: Vec<(usize, usize)> = (0..nb)
        .filter(|&i| l.shape[i] != 1)
        .map(|i| (l.shape[i], l.strides[i]))
        .collect();
    if dims.is_empty() {
        return Some(0);
    }
    if dims.iter().all(|d| d.1 == 0) {
        return Some(0);
    }
    for w in dims.windows(2) {
        if w[0].1 != w[1].1 * w[1].0 {
            return None;
        }
    }
    Some(dims.last().unwrap().1)
}

fn mat_layout(l: &Layout, batch_stride: usize) -> MatLayout {
    let nd = l.shape.len();
    MatLayout {
        offset: l.offset,
        row_stride: l.strides[nd - 2],
        col_stride: l.strides[nd - 1],
        batch_stride,
    }
}

/// Batched product of `a` [..., m, k] and `b` [..., k, n] whose batch dims
/// are already equal (broadcast layouts allowed). No autograd.
fn bmm_raw(
    a: &Tensor,
    b: &Tensor,
    batch_shape: &[usize],
    m: usize,
    k: usize,
    n: usize,
) -> Result<Tensor> {
    let _internal = crate::trace::suspend();
    let mut out_shape = batch_shape.to_vec();
    out_shape.extend([m, n]);
    let batch: usize = batch_shape.iter().product();
    let expand = |t: &Tensor, rows: usize, cols: usize| -> Result<(Tensor, Layout)> {
        let mut s = batch_shape.to_vec();
        s.extend([rows, cols]);
        let l = super::broadcast_layout(&t.layout(), &s);
        if collapse_batch(&l).is_some() {
            Ok((t.clone(), l))
        } else {
            // Batch dims that no single stride describes: copy them out.
            let c = crate::autograd::no_grad(|| t.expand_to(&s)?.contiguous())?;
            let l = c.layout();
            Ok((c, l))
        }
    };
    let (a, la) = expand(a, m, k)?;
    let (b, lb) = expand(b, k, n)?;
    let ma = mat_layout(&la, collapse_batch(&la).unwrap());
    let mb = mat_layout(&lb, collapse_batch(&lb).unwrap());
    #[allow(clippy::too_many_arguments)]
    fn run<T: Float>(
        a: &Tensor,
        ma: MatLayout,
        b: &Tensor,
        mb: MatLayout,
        batch: usize,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<T> {
        a.with_slice::<T, _>(|sa, _| {
            b.with_slice::<T, _>(|sb, _| mm_kernel(sa, ma, sb, mb, batch, m, k, n))
        })
    }
    match a.dtype() {
        DType::F32 => Ok(Tensor::from_storage(
            kiln_cpu::CpuStorage::F32(run::<f32>(&a, ma, &b, mb, batch, m, k, n)),
            &out_shape,
        )),
        DType::F64 => Ok(Tensor::from_storage(
            kiln_cpu::CpuStorage::F64(run::<f64>(&a, ma, &b, mb, batch, m, k, n)),
            &out_shape,
        )),
        DType::F16 | DType::BF16 => {
            let r = bmm_raw(
                &a.to_dtype(DType::F32)?,
                &b.to_dtype(DType::F32)?,
                batch_shape,
                m,
                k,
                n,
            )?;
            r.to_dtype(a.dtype())
        }
        d => Err(Error::op(
            "matmul",
            format!("expected floating point operands, got {d}"),
        )),
    }
}

/// `bias + mat1 @ mat2` for a bias holding one row of `n` (f32/f64, same
/// dtype as the matrices) through `matmul_epilogue`.
fn addmm_row_bias(
    bias: &Tensor,
    mat1: &Tensor,
    mat2: &Tensor,
    m: usize,
    k: usize,
    n: usize,
) -> Result<Tensor> {
    fn run<T: Float>(
        bias: &Tensor,
        a: &Tensor,
        b: &Tensor,
        m: usize,
        k: usize,
        n: usize,
    ) -> Vec<T> {
        let (ma, mb) = (mat_layout(&a.layout(), 0), mat_layout(&b.layout(), 0));
        // beta = 0 semantics: C is never read, every element written.
        let mut c = kiln_cpu::buffers::alloc_uninit::<T>(m * n);
        bias.with_contiguous::<T, _>(|bv| {
            a.with_slice::<T, _>(|sa, _| {
                b.with_slice::<T, _>(|sb, _| {
                    matmul_epilogue(&mut c, sa, ma, sb, mb, m, k, n, Some(bv), None)
                })
            })
        });
        c
    }
    let storage = match mat1.dtype() {
        DType::F32 => kiln_cpu::CpuStorage::F32(run::<f32>(bias, mat1, mat2, m, k, n)),
        DType::F64 => kiln_cpu::CpuStorage::F64(run::<f64>(bias, mat1, mat2, m, k, n)),
        d => return Err(Error::op("addmm", format!("unexpected dtype {d}"))),
    };
    Ok(Tensor::from_storage(storage, &[m, n]))
}

fn check_float_pair(op: &str, a: &Tensor, b: &Tensor) -> Result<()> {
    crate::device::check_cpu(op, &[a, b])?;
    if a.dtype() != b.dtype() || !a.dtype().is_float() {
        return Err(Error::op(
            op,
            format!(
                "expected both operands to have the same floating dtype, but got {} and {} (shapes {:?} and {:?})",
                a.dtype(),
                b.dtype(),
                a.shape(),
                b.shape()
            ),
        ));
    }
    Ok(())
}

/// Two 2-d operands whose inner dims agree, or PyTorch's error.
fn check_mat_pair(op: &str, sa: &[usize], sb: &[usize]) -> Result<()> {
    if sa.len() != 2 || sb.len() != 2 || sa[1] != sb[0] {
        return Err(Error::op(
            op,
            format!(
                "mat1 and mat2 shapes cannot be multiplied ({}x{} and {}x{})",
                sa.first().unwrap_or(&0),
                sa.get(1).unwrap_or(&0),
                sb.first().unwrap_or(&0),
                sb.get(1).unwrap_or(&0)
            ),
        ));
    }
    Ok(())
}

impl Tensor {
    /// `torch.matmul`: dot for 1-d x 1-d, matrix-vector, vector-matrix,
    /// matrix product, and batched products with broadcast batch dims.
    pub fn matmul(&self, other: &Tensor) -> Result<Tensor> {
        check_float_pair("matmul", self, other)?;
        let (sa, sb) = (self.shape(), other.shape());
        let mismatch = || {
            Error::op(
                "matmul",
                format!(
                    "shapes {sa:?} and {sb:?} cannot be multiplied ({} vs {})",
                    sa.last().copied().unwrap_or(0),
                    if sb.len() >= 2 {
                        sb[sb.len() - 2]
                    } else {
                        sb.first().copied().unwrap_or(0)
                    }
                ),
            )
        };
        match (sa.len(), sb.len()) {
            (0, _) | (_, 0) => Err(Error::op(
                "matmul",
                format!(
                    "both arguments to matmul need to be at least 1D, but they are {}D and {}D",
                    sa.len(),
                    sb.len()
                ),
            )),
            (1, 1) => {
                if sa[0] != sb[0] {
                    return Err(mismatch());
                }
                self.unsqueeze(0)?.mm(&other.unsqueeze(1)?)?.reshape_to(&[])
            }
            (1, _) => {
                let r = self.unsqueeze(0)?.matmul(other)?;
                r.squeeze_dim(-2)
            }
            (_, 1) => {
                let r = self.matmul(&other.unsqueeze(1)?)?;
                r.squeeze_dim(-1)
            }
            (2, 2) => self.mm(other),
            _ => {
                let (m, k) = (sa[sa.len() - 2], sa[sa.len() - 1]);
                let (k2, n) = (sb[sb.len() - 2], sb[sb.len() - 1]);
                if k != k2 {
                    return Err(mismatch());
                }
                let batch = kiln_ir::broadcast_shapes(&sa[..sa.len() - 2], &sb[..sb.len() - 2])
                    .map_err(|_| {
                        Error::op(
                            "matmul",
                            format!("batch dimensions of {sa:?} and {sb:?} cannot be broadcast"),
                        )
                    })?;
                let out = bmm_raw(self, other, &batch, m, k, n)?;
                crate::trace::record(kiln_ir::Op::MatMul, &[self, other], &[&out]);
                let name = if sa.len() == 3 && sb.len() == 3 && sa[0] == sb[0] {
                    "BmmBackward0"
                } else {
                    "UnsafeViewBackward0"
                };
                let (a, b) = (self.detach(), other.detach());
                record(name, &[self, other], &[&out], move |g, needs| {
                    let g = g[0].as_ref().unwrap();
                    Ok(vec![
                        if needs[0] {
                            Some(g.matmul(&b.transpose(-1, -2)?)?.sum_to_size(&sa)?)
                        } else {
                            None
                        },
                        if needs[1] {
                            Some(a.transpose(-1, -2)?.matmul(g)?.sum_to_size(&sb)?)
                        } else {
                            None
                        },
                    ])
                });
                Ok(out)
            }
        }
    }

    /// Matrix product of two 2-d tensors (`MmBackward0`).
    pub fn mm(&self, other: &Tensor) -> Result<Tensor> {
        check_float_pair("mm", self, other)?;
        let (sa, sb) = (self.shape(), other.shape());
        check_mat_pair("mm", &sa, &sb)?;
        let out = bmm_raw(self, other, &[], sa[0], sa[1], sb[1])?;
        crate::trace::record(kiln_ir::Op::MatMul, &[self, other], &[&out]);
        let (a, b) = (self.detach(), other.detach());
        record("MmBackward0", &[self, other], &[&out], move |g, needs| {
            let g = g[0].as_ref().unwrap();
            Ok(vec![
                if needs[0] { Some(g.mm(&b.t()?)?) } else { None },
                if needs[1] { Some(a.t()?.mm(g)?) } else { None },
            ])
        });
        Ok(out)
    }

    /// Batched matrix product of two 3-d tensors with equal batch.
    pub fn bmm(&self, other: &Tensor) -> Result<Tensor> {
        crate::device::check_cpu("bmm", &[self, other])?;
        let (sa, sb) = (self.shape(), other.shape());
        if sa.len() != 3 || sb.len() != 3 || sa[0] != sb[0] || sa[2] != sb[1] {
            return Err(Error::op("bmm", format!("expected 3-d tensors with matching batch and inner dims, got {sa:?} and {sb:?}")));
        }
        self.matmul(other)
    }

    /// `addmm(bias, mat1, mat2)`: `bias + mat1 @ mat2` with `bias`
    /// broadcast to the result (`AddmmBackward0`). The bias is written into
    /// the output first and gemm accumulates onto it: one pass over memory.
    pub fn addmm(bias: &Tensor, mat1: &Tensor, mat2: &Tensor) -> Result<Tensor> {
        crate::device::check_cpu("addmm", &[bias])?;
        check_float_pair("addmm", mat1, mat2)?;
        let (sa, sb) = (mat1.shape(), mat2.shape());
        check_mat_pair("addmm", &sa, &sb)?;
        let (m, k, n) = (sa[0], sa[1], sb[1]);
        let bshape = bias.shape();
        if kiln_ir::broadcast_shapes(&bshape, &[m, n]).ok().as_deref() != Some(&[m, n][..]) {
            return Err(Error::op(
                "addmm",
                format!(
                    "bias of shape {bshape:?} cannot be broadcast to the result {:?}",
                    [m, n]
                ),
            ));
        }
        if matches!(mat1.dtype(), DType::F32 | DType::F64)
            && bias.dtype() == mat1.dtype()
            && bias.numel() == n
            && bshape.last() == Some(&n)
        {
            // A bias row ([n] or [1, n]): fused into the product
            // (`matmul_epilogue`: no pre-filled output, added per row block
            // while it is in cache).
            let out = addmm_row_bias(bias, mat1, mat2, m, k, n)?;
            return Ok(Self::addmm_record(bias, mat1, mat2, out, bshape));
        }
        let filled = {
            let _internal = crate::trace::suspend();
            let bias_c = bias.to_dtype(mat1.dtype())?;
            crate::autograd::no_grad(|| bias_c.expand_to(&[m, n])?.contiguous_copy())?
        };
        let ma = mat_layout(&mat1.layout(), 0);
        let mb = mat_layout(&mat2.layout(), 0);
        #[allow(clippy::too_many_arguments)]
        fn run<T: Float>(
            c: &Tensor,
            a: &Tensor,
            ma: MatLayout,
            b: &Tensor,
            mb: MatLayout,
            m: usize,
            k: usize,
            n: usize,
        ) {
            let d = c.data();
            let mut buf = d.storage.buf.write();
            let cs = T::slice_mut(&mut buf).unwrap();
            a.with_slice::<T, _>(|sa, _| {
                b.with_slice::<T, _>(|sb, _| {
                    matmul_into(
                        cs,
                        MatLayout::contiguous(m, n),
                        T::one(),
                        T::one(),
                        sa,
                        ma,
                        sb,
                        mb,
                        1,
                        m,
                        k,
                        n,
                    )
                })
            });
        }
        match mat1.dtype() {
            DType::F32 => run::<f32>(&filled, mat1, ma, mat2, mb, m, k, n),
            DType::F64 => run::<f64>(&filled, mat1, ma, mat2, mb, m, k, n),
            _ => {
                // Half types: compute in f32.
                let r = Tensor::addmm(
                    &bias.to_dtype(DType::F32)?,
                    &mat1.to_dtype(DType::F32)?,
                    &mat2.to_dtype(DType::F32)?,
                )?;
                return r.to_dtype(mat1.dtype());
            }
        }
        Ok(Self::addmm_record(bias, mat1, mat2, filled, bshape))
    }

    /// Records addmm's trace node and `AddmmBackward0`; returns `out`.
    fn addmm_record(
        bias: &Tensor,
        mat1: &Tensor,
        mat2: &Tensor,
        out: Tensor,
        bshape: Vec<usize>,
    ) -> Tensor {
        crate::trace::record(kiln_ir::Op::Addmm, &[bias, mat1, mat2], &[&out]);
        let (a, b) = (mat1.detach(), mat2.detach());
        record(
            "AddmmBackward0",
            &[bias, mat1, mat2],
            &[&out],
            move |g, needs| {
                let g = g[0].as_ref().unwrap();
                Ok(vec![
                    if needs[0] {
                        Some(g.sum_to_size(&bshape)?)
                    } else {
                        None
                    },
                    if needs[1] { Some(g.mm(&b.t()?)?) } else { None },
                    if needs[2] { Some(a.t()?.mm(g)?) } else { None },
                ])
            },
        );
        out
    }

    /// A fresh contiguous copy with no autograd (internal buffer helper).
    pub(crate) fn contiguous_copy(&self) -> Result<Tensor> {
        crate::device::check_cpu("contiguous", &[self])?;
        Ok(Tensor::from_storage(
            self.contiguous_storage(),
            &self.shape(),
        ))
    }
}

/// `F.linear(x, weight, bias)`: `x @ weight.T + bias` for x `[..., in]`,
/// weight `[out, in]`. A 2-d input is one `addmm`; more dims are folded
/// into the rows and viewed back, as PyTorch does.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    crate::device::check_cpu_opt("linear", &[Some(x), Some(weight), bias])?;
    let xs = x.shape();
    let ws = weight.shape();
    if ws.len() != 2 || xs.is_empty() || xs[xs.len() - 1] != ws[1] {
        return Err(Error::op(
            "linear",
            format!(
                "input of shape {xs:?} and weight of shape {ws:?} cannot be multiplied (expected input [..., {}])",
                ws.get(1).copied().unwrap_or(0)
            ),
        ));
    }
    if let Some(b) = bias {
        if b.shape() != [ws[0]] {
            return Err(Error::op(
                "linear",
                format!("bias of shape {:?} does not match weight {ws:?}", b.shape()),
            ));
        }
    }
    let wt = weight.t()?;
    match (xs.len(), bias) {
        (2, Some(b)) => Tensor::addmm(b, x, &wt),
        (2, None) => x.mm(&wt),
        (1, _) => {
            let y = linear(&x.unsqueeze(0)?, weight, bias)?;
            y.squeeze_dim(0)
        }
        _ => {
            let rows: usize = xs[..xs.len() - 1].iter().product();
            let x2 = x.reshape_to(&[rows, ws[1]])?;
            let y = match bias {
                Some(b) => Tensor::addmm(b, &x2, &wt)?,
                None => x2.mm(&wt)?,
            };
            let mut out_shape = xs.clone();
            *out_shape.last_mut().unwrap() = ws[0];
            y.view(&out_shape.iter().map(|&d| d as isize).collect::<Vec<_>>())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn matmul_shapes_and_values() {
        crate::manual_seed(1);
        let a = Tensor::randn(&[3, 4], DType::F64);
        let b = Tensor::randn(&[4, 5], DType::F64);
        let c = a.matmul(&b).unwrap();
        let want = naive(&a.to_vec_f64(), &b.to_vec_f64(), 3, 4, 5);
        for (x, y) in c.to_vec_f64().iter().zip(&want) {
            assert!((x - y).abs() < 1e-12);
        }
        // transposed operand as a view
        let bt = Tensor::randn(&[5, 4], DType::F64);
        let c2 = a.matmul(&bt.t().unwrap()).unwrap();
        let want2 = naive(
            &a.to_vec_f64(),
            &bt.t().unwrap().contiguous().unwrap().to_vec_f64(),
            3,
            4,
            5,
        );
        for (x, y) in c2.to_vec_f64().iter().zip(&want2) {
            assert!((x - y).abs() < 1e-12);
        }
        // batched with broadcast: [2,1,3,4] @ [5?] -> use [3,4,2] permuted, etc.
        let x = Tensor::randn(&[2, 1, 3, 4], DType::F64);
        let y = Tensor::randn(&[3, 4, 2], DType::F64);
        let z = x.matmul(&y).unwrap();
        assert_eq!(z.shape(), vec![2, 3, 3, 2]);
        let xv = x.to_vec_f64();
        let yv = y.to_vec_f64();
        let zv = z.to_vec_f64();
        for bi in 0..2 {
            for h in 0..3 {
                let want = naive(&xv[bi * 12..bi * 12 + 12], &yv[h * 8..h * 8 + 8], 3, 4, 2);
                let got = &zv[(bi * 3 + h) * 6..(bi * 3 + h) * 6 + 6];
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-12);
                }
            }
        }
        // vector forms
        let v = Tensor::randn(&[4], DType::F64);
        assert_eq!(a.matmul(&v).unwrap().shape(), vec![3]);
        assert_eq!(v.matmul(&b).unwrap().shape(), vec![5]);
        assert_eq!(v.matmul(&v).unwrap().shape(), Vec::<usize>::new());
        let err = a.matmul(&a).unwrap_err().to_string();
        assert!(err.contains("3x4 and 3x4"), "{err}");
    }

    #[test]
    fn linear_and_grads() {
        crate::manual_seed(2);
        let x = Tensor::randn(&[6, 4], DType::F64)
            .requires_grad_(true)
            .unwrap();
        let w = Tensor::randn(&[3, 4], DType::F64)
            .requires_grad_(true)
            .unwrap();
        let b = Tensor::randn(&[3], DType::F64)
            .requires_grad_(true)
            .unwrap();
        let y = linear(&x, &w, Some(&b)).unwrap();
        assert_eq!(y.grad_fn_name().as_deref(), Some("AddmmBackward0"));
        let y2 = x.matmul(&w.t().unwrap()).unwrap().add(&b).unwrap();
        for (p, q) in y.to_vec_f64().iter().zip(y2.to_vec_f64()) {
            assert!((p - q).abs() < 1e-12);
        }
        y.sum().unwrap().backward().unwrap();
        // d sum / d b = number of rows; d/dx = sum of w rows; d/dw = column sums of x
        assert_eq!(b.grad().unwrap().to_vec_f64(), vec![6.0; 3]);
        let wsum: Vec<f64> = (0..4)
            .map(|j| (0..3).map(|i| w.to_vec_f64()[i * 4 + j]).sum())
            .collect();
        for row in x.grad().unwrap().to_vec_f64().chunks(4) {
            for (g, want) in row.iter().zip(&wsum) {
                assert!((g - want).abs() < 1e-12);
            }
        }
        let x3 = Tensor::randn(&[2, 5, 4], DType::F64);
        let y3 = linear(&x3, &w, Some(&b)).unwrap();
        assert_eq!(y3.shape(), vec![2, 5, 3]);
        assert_eq!(y3.grad_fn_name().as_deref(), Some("ViewBackward0"));
    }
}
