//! Max/min reductions and arg-reductions: `max_dim`/`min_dim` (values and
//! the index of the first occurrence, as PyTorch), full `max()`/`min()`,
//! `amax`/`amin` over several dims, and `argmax`/`argmin`. Gradients follow
//! PyTorch: `max(dim)` sends the gradient to the selected index only;
//! `max()` and `amax` share it evenly among tied elements.

use super::reduce::{kept_shape, reduce_dims, reduced_shape};
use crate::autograd::record;
use crate::error::{Error, Result};
use crate::tensor::{normalize_dim, Tensor};
use kiln_cpu::reduce as k;
use kiln_cpu::{CpuStorage, Element};
use kiln_ir::DType;

/// First index of the max (or min) of each row for ordered non-float
/// elements.
fn arg_rows_ord<T: Element + PartialOrd>(x: &[T], kk: usize, min: bool) -> (Vec<T>, Vec<i64>) {
    let mut vals = Vec::with_capacity(x.len() / kk.max(1));
    let mut idx = Vec::with_capacity(x.len() / kk.max(1));
    for r in x.chunks(kk) {
        let mut best = r[0];
        let mut bi = 0usize;
        for (i, &v) in r.iter().enumerate().skip(1) {
            if (min && v < best) || (!min && v > best) {
                best = v;
                bi = i;
            }
        }
        vals.push(best);
        idx.push(bi as i64);
    }
    (vals, idx)
}

fn split<T>(v: Vec<(T, i64)>) -> (Vec<T>, Vec<i64>) {
    v.into_iter().unzip()
}

/// Max (or min) and its first index for each row of a contiguous
/// `[outer, kk]` tensor (`kk > 0`), in the tensor's dtype.
fn arg_rows(x: &Tensor, kk: usize, min: bool) -> Result<(CpuStorage, Vec<i64>)> {
    Ok(match x.dtype() {
        DType::F32 => {
            let (v, i) = split(x.with_contiguous::<f32, _>(|s| k::argmax_rows(s, kk, min)));
            (CpuStorage::F32(v), i)
        }
        DType::F64 => {
            let (v, i) = split(x.with_contiguous::<f64, _>(|s| k::argmax_rows(s, kk, min)));
            (CpuStorage::F64(v), i)
        }
        DType::F16 | DType::BF16 => {
            // Exact: the values are elements of the input.
            let up = x.to_dtype(DType::F32)?;
            let (v, i) = arg_rows(&up, kk, min)?;
            (v.to_dtype(x.dtype()), i)
        }
        DType::I64 => {
            let (v, i) = x.with_contiguous::<i64, _>(|s| arg_rows_ord(s, kk, min));
            (CpuStorage::I64(v), i)
        }
        DType::Bool => {
            let (v, i) = x.with_contiguous::<bool, _>(|s| arg_rows_ord(s, kk, min));
            (CpuStorage::Bool(v), i)
        }
    })
}

fn op_name(min: bool) -> &'static str {
    if min {
        "min"
    } else {
        "max"
    }
}

impl Tensor {
    /// The reduction over `rd` of every row: (values, first indices) with
    /// `out_shape`. Errors when a reduced dim is empty.
    fn arg_reduce(
        &self,
        op: &str,
        rd: &[usize],
        out_shape: &[usize],
        min: bool,
    ) -> Result<(Tensor, Tensor)> {
        let shape = self.shape();
        let (x, _outer, kk) = self.rows_over(rd)?;
        if kk == 0 {
            let msg = if rd.len() == 1 && rd.len() < shape.len() {
                format!(
                    "Expected reduction dim {} to have non-zero size (input shape {:?})",
                    rd[0], shape
                )
            } else {
                format!(
                    "Expected reduction dim to be specified for input.numel() == 0 (input shape {shape:?}). Specify the reduction dim with the 'dim' argument."
                )
            };
            return Err(Error::op(op, msg));
        }
        let (vals, idx) = arg_rows(&x, kk, min)?;
        Ok((
            Tensor::from_storage(vals, out_shape),
            Tensor::from_storage(CpuStorage::I64(idx), out_shape),
        ))
    }

    /// `max(dim, keepdim)`: (values, indices) where indices (i64) point at
    /// the first occurrence of the max; NaN counts as the max. The gradient
    /// (`MaxBackward0`) goes to the indexed elements only.
    pub fn max_dim(&self, dim: isize, keepdim: bool) -> Result<(Tensor, Tensor)> {
        crate::device::check_cpu("max", &[self])?;
        self.minmax_dim(dim, keepdim, false)
    }

    /// `min(dim, keepdim)`: like `max_dim` (`MinBackward0`).
    pub fn min_dim(&self, dim: isize, keepdim: bool) -> Result<(Tensor, Tensor)> {
        crate::device::check_cpu("min", &[self])?;
        self.minmax_dim(dim, keepdim, true)
    }

    fn minmax_dim(&self, dim: isize, keepdim: bool, min: bool) -> Result<(Tensor, Tensor)> {
        let op = op_name(min);
        let shape = self.shape();
        let nd = shape.len();
        let d = normalize_dim(dim, nd, op)?;
        let rd: Vec<usize> = if nd == 0 { vec![] } else { vec![d] };
        if nd > 0 && shape[d] == 0 {
            return Err(Error::op(
                op,
                format!("Expected reduction dim {d} to have non-zero size (input shape {shape:?})"),
            ));
        }
        let out_shape = reduced_shape(&shape, &rd, keepdim);
        let (values, indices) = self.arg_reduce(op, &rd, &out_shape, min)?;
        if nd > 0 {
            let ir = if min {
                kiln_ir::Op::MinDim { dim: d, keepdim }
            } else {
                kiln_ir::Op::MaxDim { dim: d, keepdim }
            };
            crate::trace::record(ir, &[self], &[&values, &indices]);
        }
        let kshape = kept_shape(&shape, &rd);
        let idx = indices.detach();
        let in_shape = shape.clone();
        let name = if min { "MinBackward0" } else { "MaxBackward0" };
        record(name, &[self], &[&values], move |g, _| {
            let g = g[0].as_ref().unwrap();
            if nd == 0 {
                return Ok(vec![Some(g.clone())]);
            }
            // One-hot of the selected index along d, then scatter g there.
            let mut pos_shape = vec![1usize; nd];
            pos_shape[d] = in_shape[d];
            let pos =
                Tensor::arange(0.0, in_shape[d] as f64, 1.0, DType::I64)?.reshape_to(&pos_shape)?;
            let mask = pos.eq(&idx.reshape_to(&kshape)?)?;
            let zero = Tensor::zeros(&[], g.dtype());
            let gk = g.reshape_to(&kshape)?;
            Ok(vec![Some(Tensor::where_(&mask, &gk, &zero)?)])
        });
        Ok((values, indices))
    }

    /// `max()`: the largest element (0-d); NaN if any element is NaN. The
    /// gradient (`MaxBackward1`) is shared evenly among the elements equal
    /// to the max, as PyTorch.
    pub fn max(&self) -> Result<Tensor> {
        self.extreme_all(false)
    }

    /// `min()`: like `max()` (`MinBackward1`).
    pub fn min(&self) -> Result<Tensor> {
        self.extreme_all(true)
    }

    fn extreme_all(&self, min: bool) -> Result<Tensor> {
        crate::device::check_cpu(if min { "min" } else { "max" }, &[self])?;
        let op = op_name(min);
        let shape = self.shape();
        let rd: Vec<usize> = (0..shape.len()).collect();
        if self.numel() == 0 {
            return Err(Error::op(
                op,
                format!("Expected reduction dim to be specified for input.numel() == 0 (input shape {shape:?}). Specify the reduction dim with the 'dim' argument."),
            ));
        }
        let (values, _) = self.arg_reduce(op, &rd, &[], min)?;
        let rop = if min {
            kiln_ir::ReduceOp::Min
        } else {
            kiln_ir::ReduceOp::Max
        };
        crate::trace::record(
            kiln_ir::Op::Reduce {
                op: rop,
                dims: rd.clone(),
                keepdim: false,
            },
            &[self],
            &[&values],
        );
        let name = if min { "MinBackward1" } else { "MaxBackward1" };
        self.record_evenly(name, &values, &rd)?;
        Ok(values)
    }

    /// `amax(dims, keepdim)`: max over several dims (all if empty). The
    /// gradient (`AmaxBackward0`) is shared evenly among ties.
    pub fn amax(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("amax", &[self])?;
        self.amax_amin(dims, keepdim, false)
    }

    /// `amin(dims, keepdim)` (`AminBackward0`).
    pub fn amin(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("amin", &[self])?;
        self.amax_amin(dims, keepdim, true)
    }

    fn amax_amin(&self, dims: &[isize], keepdim: bool, min: bool) -> Result<Tensor> {
        let op = if min { "amin" } else { "amax" };
        let shape = self.shape();
        let rd = reduce_dims(op, dims, shape.len())?;
        if let Some(&d) = rd.iter().find(|&&d| shape[d] == 0) {
            return Err(Error::op(
                op,
                format!("Expected reduction dim {d} to have non-zero size (input shape {shape:?})"),
            ));
        }
        let out_shape = reduced_shape(&shape, &rd, keepdim);
        let (values, _) = self.arg_reduce(op, &rd, &out_shape, min)?;
        let rop = if min {
            kiln_ir::ReduceOp::Min
        } else {
            kiln_ir::ReduceOp::Max
        };
        crate::trace::record(
            kiln_ir::Op::Reduce {
                op: rop,
                dims: rd.clone(),
                keepdim,
            },
            &[self],
            &[&values],
        );
        let name = if min {
            "AminBackward0"
        } else {
            "AmaxBackward0"
        };
        self.record_evenly(name, &values, &rd)?;
        Ok(values)
    }

    /// Records a backward that shares the gradient of `values` (a max/min
    /// over `rd`) evenly among the elements equal to it.
    fn record_evenly(&self, name: &'static str, values: &Tensor, rd: &[usize]) -> Result<()> {
        if !crate::autograd::needs_grad(&[self]) {
            return Ok(());
        }
        let _internal = crate::trace::suspend();
        let shape = self.shape();
        let kshape = kept_shape(&shape, rd);
        let v = values.detach().reshape_to(&kshape)?;
        let x = self.detach();
        // NaN max: the NaN elements share the gradient.
        let mask = if self.dtype().is_float() {
            let xnan = x.ne(&x)?;
            let vnan = v.ne(&v)?;
            let eq = x.eq(&v)?;
            // eq | (xnan & vnan)
            eq.logical_not()?
                .logical_and(&xnan.logical_and(&vnan)?.logical_not()?)?
                .logical_not()?
        } else {
            x.eq(&v)?
        };
        let rdi: Vec<isize> = rd.iter().map(|&d| d as isize).collect();
        let count = mask.sum_dims(&rdi, true)?.to_dtype(self.dtype())?;
        record(name, &[self], &[values], move |g, _| {
            let g = g[0].as_ref().unwrap();
            let share = g.reshape_to(&kshape)?.div(&count)?;
            let zero = Tensor::zeros(&[], share.dtype());
            Ok(vec![Some(Tensor::where_(&mask, &share, &zero)?)])
        });
        Ok(())
    }

    /// `argmax(dim, keepdim)`: i64 indices of the first max along `dim`;
    /// with `dim` None, the index into the flattened tensor (shape `[]`, or
    /// all ones with keepdim, as PyTorch).
    pub fn argmax(&self, dim: Option<isize>, keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("argmax", &[self])?;
        self.arg_extreme(dim, keepdim, false)
    }

    /// `argmin(dim, keepdim)`, like `argmax`.
    pub fn argmin(&self, dim: Option<isize>, keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("argmin", &[self])?;
        self.arg_extreme(dim, keepdim, true)
    }

    fn arg_extreme(&self, dim: Option<isize>, keepdim: bool, min: bool) -> Result<Tensor> {
        let op = if min { "argmin" } else { "argmax" };
        let shape = self.shape();
        match dim {
            Some(dim) => {
                let d = normalize_dim(dim, shape.len(), op)?;
                let rd: Vec<usize> = if shape.is_empty() { vec![] } else { vec![d] };
                if !shape.is_empty() && shape[d] == 0 {
                    return Err(Error::op(
                        op,
                        format!("Expected reduction dim {d} to have non-zero size (input shape {shape:?})"),
                    ));
                }
                let out_shape = reduced_shape(&shape, &rd, keepdim);
                let idx = self.detach().arg_reduce(op, &rd, &out_shape, min)?.1;
                if !shape.is_empty() {
                    let ir = if min {
                        kiln_ir::Op::ArgMin { dim: d, keepdim }
                    } else {
                        kiln_ir::Op::ArgMax { dim: d, keepdim }
                    };
                    crate::trace::record(ir, &[self], &[&idx]);
                }
                Ok(idx)
            }
            None => {
                let rd: Vec<usize> = (0..shape.len()).collect();
                let out_shape = reduced_shape(&shape, &rd, keepdim);
                Ok(self.detach().arg_reduce(op, &rd, &out_shape, min)?.1)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(v: &[f64], shape: &[usize]) -> Tensor {
        Tensor::from_slice(v, shape).unwrap()
    }

    #[test]
    fn max_min_values_and_first_indices() {
        // x = torch.tensor([[1., 5., 5.], [7., -1., 7.]])
        let x = t(&[1.0, 5.0, 5.0, 7.0, -1.0, 7.0], &[2, 3]);
        let (v, i) = x.max_dim(1, false).unwrap();
        assert_eq!(v.to_vec::<f64>(), vec![5.0, 7.0]);
        assert_eq!(i.to_vec::<i64>(), vec![1, 0]); // first occurrence
        assert_eq!(i.dtype(), DType::I64);
        let (v, i) = x.min_dim(0, true).unwrap();
        assert_eq!(v.shape(), vec![1, 3]);
        assert_eq!(v.to_vec::<f64>(), vec![1.0, -1.0, 5.0]);
        assert_eq!(i.to_vec::<i64>(), vec![0, 1, 0]);
        assert_eq!(x.max().unwrap().item().unwrap(), 7.0);
        assert_eq!(x.min().unwrap().item().unwrap(), -1.0);
        assert_eq!(x.argmax(None, false).unwrap().to_vec::<i64>(), vec![3]);
        assert_eq!(x.argmax(None, true).unwrap().shape(), vec![1, 1]);
        assert_eq!(
            x.argmin(Some(-1), false).unwrap().to_vec::<i64>(),
            vec![0, 1]
        );
        assert_eq!(x.amax(&[0, 1], false).unwrap().to_vec::<f64>(), vec![7.0]);
        // integers stay integers
        let xi = Tensor::from_vec(vec![3i64, 9, 2], &[3]).unwrap();
        let (v, i) = xi.max_dim(0, false).unwrap();
        assert_eq!((v.to_vec::<i64>(), i.to_vec::<i64>()), (vec![9], vec![1]));
        // NaN wins
        let xn = t(&[1.0, f64::NAN, 3.0], &[3]);
        assert!(xn.max().unwrap().item().unwrap().is_nan());
        assert_eq!(xn.argmax(None, false).unwrap().to_vec::<i64>(), vec![1]);
    }

    #[test]
    fn max_gradients_follow_pytorch() {
        // x = torch.tensor([[1., 5., 5.], [7., -1., 7.]], requires_grad=True)
        // x.max(1).values.sum().backward() -> [[0,1,0],[1,0,0]]
        let x = t(&[1.0, 5.0, 5.0, 7.0, -1.0, 7.0], &[2, 3])
            .requires_grad_(true)
            .unwrap();
        let (v, _) = x.max_dim(1, false).unwrap();
        assert_eq!(v.grad_fn_name().as_deref(), Some("MaxBackward0"));
        v.sum().unwrap().backward().unwrap();
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0]
        );
        // x.max().backward() -> 0.5 on each of the two 7s
        x.set_grad(None);
        let m = x.max().unwrap();
        assert_eq!(m.grad_fn_name().as_deref(), Some("MaxBackward1"));
        m.backward().unwrap();
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![0.0, 0.0, 0.0, 0.5, 0.0, 0.5]
        );
        // x.amax(1).sum().backward() -> ties share: [[0,.5,.5],[.5,0,.5]]
        x.set_grad(None);
        let a = x.amax(&[1], false).unwrap();
        assert_eq!(a.grad_fn_name().as_deref(), Some("AmaxBackward0"));
        a.sum().unwrap().backward().unwrap();
        assert_eq!(
            x.grad().unwrap().to_vec::<f64>(),
            vec![0.0, 0.5, 0.5, 0.5, 0.0, 0.5]
        );
    }

    #[test]
    fn errors_name_op_and_shape() {
        let e = Tensor::zeros(&[2, 0], DType::F32);
        let err = e.max_dim(1, false).unwrap_err().to_string();
        assert!(err.starts_with("max") && err.contains("[2, 0]"), "{err}");
        let err = e.max().unwrap_err().to_string();
        assert!(
            err.starts_with("max") && err.contains("numel() == 0"),
            "{err}"
        );
        let err = e.argmin(None, false).unwrap_err().to_string();
        assert!(err.starts_with("argmin"), "{err}");
        // torch.zeros(2, 0).max(0) is fine: values of shape [0]
        let (v, i) = e.max_dim(0, false).unwrap();
        assert_eq!((v.shape(), i.shape()), (vec![0], vec![0]));
        let x = Tensor::zeros(&[2, 3], DType::F32);
        let err = x.min_dim(2, false).unwrap_err().to_string();
        assert!(
            err.starts_with("min") && err.contains("Dimension out of range"),
            "{err}"
        );
    }
}
