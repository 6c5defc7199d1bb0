//! Reductions: sum, mean, var, std and prod over dims (with keepdim), the
//! full reductions, and `sum_to_size`, which brings a broadcast gradient
//! back to an input's shape. Each moves the reduced dims last and runs a
//! row kernel (`map_rows` does the same for row-wise maps like softmax).

use super::float_op;
use crate::autograd::record;
use crate::error::{Error, Result};
use crate::tensor::{normalize_dim, Tensor};
use kiln_cpu::reduce as k;
use kiln_ir::DType;

/// Normalized, sorted, deduplicated reduction dims (all dims if empty).
pub(crate) fn reduce_dims(op: &str, dims: &[isize], ndim: usize) -> Result<Vec<usize>> {
    if dims.is_empty() {
        return Ok((0..ndim).collect());
    }
    let mut out = Vec::with_capacity(dims.len());
    for &d in dims {
        let d = normalize_dim(d, ndim, op)?;
        if ndim == 0 {
            // A 0-d tensor accepts dim 0 / -1 and has nothing to reduce.
            continue;
        }
        if out.contains(&d) {
            return Err(Error::op(
                op,
                format!("dim {d} appears multiple times in the list of dims"),
            ));
        }
        out.push(d);
    }
    out.sort_unstable();
    Ok(out)
}

pub(crate) use kiln_ir::shape::reduced_shape;

impl Tensor {
    /// The tensor permuted so `dims` come last, made contiguous: rows of
    /// length prod(shape[dims]). Returns (tensor, outer, k). No autograd.
    pub(crate) fn rows_over(&self, dims: &[usize]) -> Result<(Tensor, usize, usize)> {
        let _internal = crate::trace::suspend();
        let shape = self.shape();
        let nd = shape.len();
        let keep: Vec<usize> = (0..nd).filter(|d| !dims.contains(d)).collect();
        let perm: Vec<isize> = keep
            .iter()
            .chain(dims.iter())
            .map(|&d| d as isize)
            .collect();
        let x = crate::autograd::no_grad(|| -> Result<Tensor> {
            let p = if nd == 0 {
                self.clone()
            } else {
                self.permute(&perm)?
            };
            p.contiguous()
        })?;
        let kk: usize = dims.iter().map(|&d| shape[d]).product();
        let outer: usize = keep.iter().map(|&d| shape[d]).product();
        Ok((x, outer, kk))
    }

    /// Sum over sorted `dims` into `out_shape`, no autograd. Leading dims of
    /// a contiguous tensor are summed column-wise in place; anything else is
    /// moved last and summed row-wise.
    pub(crate) fn sum_raw(&self, dims: &[usize], out_shape: &[usize]) -> Result<Tensor> {
        let shape = self.shape();
        let leading = dims.iter().enumerate().all(|(i, &d)| i == d);
        if leading && !dims.is_empty() && dims.len() < shape.len() && self.is_contiguous() {
            let r: usize = dims.iter().map(|&d| shape[d]).product();
            let c = self.numel() / r.max(1);
            if r > 0 {
                return float_op(
                    "sum",
                    self,
                    out_shape,
                    |s| k::sum_cols(s, r, c),
                    |s| k::sum_cols(s, r, c),
                );
            }
        }
        let (x, outer, kk) = self.rows_over(dims)?;
        float_op(
            "sum",
            &x,
            out_shape,
            |s| k::sum_rows(s, outer, kk),
            |s| k::sum_rows(s, outer, kk),
        )
    }

    /// `sum(dims, keepdim)`; an empty `dims` sums everything. Integer and
    /// bool inputs sum to i64, as PyTorch.
    pub fn sum_dims(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("sum", &[self])?;
        let shape = self.shape();
        let rd = reduce_dims("sum", dims, shape.len())?;
        let out_shape = reduced_shape(&shape, &rd, keepdim);
        if !self.dtype().is_float() {
            let f = self.to_dtype(DType::F64)?.sum_dims(dims, keepdim)?;
            return f.to_dtype(DType::I64);
        }
        self.sum_or_mean(rd, out_shape, keepdim, dims.is_empty(), None)
    }

    /// Sum of all elements (0-d result).
    pub fn sum(&self) -> Result<Tensor> {
        crate::device::check_cpu("sum", &[self])?;
        self.sum_dims(&[], false)
    }

    /// `mean(dims, keepdim)`; floating inputs only, as PyTorch.
    pub fn mean_dims(&self, dims: &[isize], keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("mean", &[self])?;
        if !self.dtype().is_float() {
            return Err(Error::op(
                "mean",
                format!("could not infer output dtype. Input dtype must be either a floating point or complex dtype. Got: {}", self.dtype()),
            ));
        }
        let shape = self.shape();
        let rd = reduce_dims("mean", dims, shape.len())?;
        let count: usize = rd.iter().map(|&d| shape[d]).product();
        let out_shape = reduced_shape(&shape, &rd, keepdim);
        self.sum_or_mean(rd, out_shape, keepdim, dims.is_empty(), Some(count as f64))
    }

    /// The float sum (`count` None) or mean (divided by `count`) over sorted
    /// dims `rd`, with its trace node and backward (the gradient broadcast
    /// back over the reduced dims).
    fn sum_or_mean(
        &self,
        rd: Vec<usize>,
        out_shape: Vec<usize>,
        keepdim: bool,
        all: bool,
        count: Option<f64>,
    ) -> Result<Tensor> {
        let out = {
            let _internal = crate::trace::suspend();
            crate::autograd::no_grad(|| -> Result<Tensor> {
                let s = self.sum_raw(&rd, &out_shape)?;
                match count {
                    Some(c) => s.div_scalar(c),
                    None => Ok(s),
                }
            })?
        };
        let op = if count.is_some() {
            kiln_ir::ReduceOp::Mean
        } else {
            kiln_ir::ReduceOp::Sum
        };
        crate::trace::record(
            kiln_ir::Op::Reduce {
                op,
                dims: rd.clone(),
                keepdim,
            },
            &[self],
            &[&out],
        );
        let in_shape = self.shape();
        let name = match (count.is_some(), all) {
            (false, true) => "SumBackward0",
            (false, false) => "SumBackward1",
            (true, true) => "MeanBackward0",
            (true, false) => "MeanBackward1",
        };
        record(name, &[self], &[&out], move |g, _| {
            let g = g[0].as_ref().unwrap();
            let g = match count {
                Some(c) => g.div_scalar(c)?,
                None => g.clone(),
            };
            let mut kshape = in_shape.clone();
            for &d in &rd {
                kshape[d] = 1;
            }
            Ok(vec![Some(
                g.reshape_to(&kshape)?.expand_to(&in_shape)?.contiguous()?,
            )])
        });
        Ok(out)
    }

    pub fn mean(&self) -> Result<Tensor> {
        crate::device::check_cpu("mean", &[self])?;
        self.mean_dims(&[], false)
    }

    /// Sums a broadcast result back to `shape` (PyTorch's `sum_to_size`):
    /// leading extra dims are summed away, dims where `shape` has 1 are
    /// summed with keepdim.
    pub fn sum_to_size(&self, shape: &[usize]) -> Result<Tensor> {
        crate::device::check_cpu("sum_to_size", &[self])?;
        let cur = self.shape();
        if cur == shape {
            return Ok(self.clone());
        }
        if shape.len() > cur.len() {
            return Err(Error::op(
                "sum_to_size",
                format!("size {shape:?} is not expandable to size {cur:?}"),
            ));
        }
        let lead = cur.len() - shape.len();
        let mut dims: Vec<isize> = (0..lead as isize).collect();
        for (i, &s) in shape.iter().enumerate() {
            if s == 1 && cur[lead + i] != 1 {
                dims.push((lead + i) as isize);
            } else if s != cur[lead + i] {
                return Err(Error::op(
                    "sum_to_size",
                    format!("size {shape:?} is not expandable to size {cur:?}"),
                ));
            }
        }
        if dims.is_empty() {
            return self.reshape_to(shape);
        }
        self.sum_dims(&dims, true)?.reshape_to(shape)
    }
}

/// `shape` with the reduced dims set to 1 (the keepdim shape).
pub(crate) fn kept_shape(shape: &[usize], rd: &[usize]) -> Vec<usize> {
    let mut k = shape.to_vec();
    for &d in rd {
        k[d] = 1;
    }
    k
}

/// Exclusive product of each row: out[i] = prod_{j != i} row[j] (prefix
/// times suffix products, so zeros are handled exactly).
fn exclusive_prod_rows<T: kiln_cpu::Float>(x: &[T], k: usize) -> Vec<T> {
    let mut out = vec![T::one(); x.len()];
    if k == 0 {
        return out;
    }
    for (o, r) in out.chunks_mut(k).zip(x.chunks(k)) {
        let mut acc = T::one();
        for i in 0..k {
            o[i] = acc;
            acc *= r[i];
        }
        acc = T::one();
        for i in (0..k).rev() {
            o[i] *= acc;
            acc *= r[i];
        }
    }
    out
}

impl Tensor {
    /// Applies a row kernel that keeps the row length along `dim` (moved
    /// last, made contiguous) and moves the result back: a contiguous
    /// tensor of self's shape. `dim` None is one row per element (0-d
    /// tensors). The kernels get (rows, outer, k). No autograd.
    pub(crate) fn map_rows(
        &self,
        op: &str,
        dim: Option<usize>,
        f32_fn: impl FnOnce(&[f32], usize, usize) -> Vec<f32>,
        f64_fn: impl FnOnce(&[f64], usize, usize) -> Vec<f64>,
    ) -> Result<Tensor> {
        let _internal = crate::trace::suspend();
        let nd = self.dim();
        let dims: Vec<usize> = dim.into_iter().collect();
        let (x, outer, kk) = self.rows_over(&dims)?;
        let pshape = x.shape();
        let y = float_op(
            op,
            &x,
            &pshape,
            |s| f32_fn(s, outer, kk),
            |s| f64_fn(s, outer, kk),
        )?;
        match dim {
            Some(d) if d + 1 != nd => {
                // rows_over put the dims in order keep ++ [d]; invert that.
                let perm: Vec<usize> = (0..nd).filter(|&i| i != d).chain([d]).collect();
                let mut inv = vec![0isize; nd];
                for (i, &p) in perm.iter().enumerate() {
                    inv[p] = i as isize;
                }
                crate::autograd::no_grad(|| y.permute(&inv)?.contiguous())
            }
            _ => Ok(y),
        }
    }

    /// `var(dims, correction, keepdim)`: the variance over `dims` (all dims
    /// if empty) divided by `N - correction` (1 = unbiased, PyTorch's
    /// default; `N - correction <= 0` gives NaN). Floating inputs only.
    /// grad_fn `VarBackward0`.
    pub fn var_dims(&self, dims: &[isize], correction: usize, keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("var", &[self])?;
        self.var_std("var", dims, correction, keepdim, false)
    }

    /// `var()` over all elements, unbiased.
    pub fn var(&self) -> Result<Tensor> {
        crate::device::check_cpu("var", &[self])?;
        self.var_dims(&[], 1, false)
    }

    /// `std(dims, correction, keepdim)`: the square root of `var_dims`.
    /// grad_fn `StdBackward0`.
    pub fn std_dims(&self, dims: &[isize], correction: usize, keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("std", &[self])?;
        self.var_std("std", dims, correction, keepdim, true)
    }

    /// `std()` over all elements, unbiased.
    pub fn std(&self) -> Result<Tensor> {
        crate::device::check_cpu("std", &[self])?;
        self.std_dims(&[], 1, false)
    }

    fn var_std(
        &self,
        op: &'static str,
        dims: &[isize],
        correction: usize,
        keepdim: bool,
        sqrt: bool,
    ) -> Result<Tensor> {
        if !self.dtype().is_float() {
            return Err(Error::op(
                op,
                format!(
                    "std and var only support floating point and complex dtypes (got {} of shape {:?})",
                    self.dtype(),
                    self.shape()
                ),
            ));
        }
        let shape = self.shape();
        let rd = reduce_dims(op, dims, shape.len())?;
        let out_shape = reduced_shape(&shape, &rd, keepdim);
        let (x, outer, kk) = self.rows_over(&rd)?;
        let out = float_op(
            op,
            &x,
            &out_shape,
            |s| {
                let v = k::var_rows(s, outer, kk, correction);
                if sqrt {
                    v.into_iter().map(f32::sqrt).collect()
                } else {
                    v
                }
            },
            |s| {
                let v = k::var_rows(s, outer, kk, correction);
                if sqrt {
                    v.into_iter().map(f64::sqrt).collect()
                } else {
                    v
                }
            },
        )?;
        let var_op = kiln_ir::Op::Var {
            dims: rd.clone(),
            correction: correction as f64,
            keepdim,
        };
        if sqrt && crate::trace::is_tracing() {
            // std is two graph nodes: var then sqrt (the placeholder only
            // carries the intermediate's identity and type).
            let var_t = Tensor::zeros(&out.shape(), out.dtype());
            crate::trace::record(var_op, &[self], &[&var_t]);
            crate::trace::record(
                kiln_ir::Op::Unary(kiln_ir::UnaryOp::Sqrt),
                &[&var_t],
                &[&out],
            );
        } else {
            crate::trace::record(var_op, &[self], &[&out]);
        }
        let xs = self.detach();
        let o = out.detach();
        let kshape = kept_shape(&shape, &rd);
        let rdi: Vec<isize> = rd.iter().map(|&d| d as isize).collect();
        let n: usize = rd.iter().map(|&d| shape[d]).product();
        let scale = 2.0 / (n as f64 - correction as f64);
        let name = if sqrt { "StdBackward0" } else { "VarBackward0" };
        record(name, &[self], &[&out], move |g, _| {
            let g = g[0].as_ref().unwrap().reshape_to(&kshape)?;
            // d var / dx = 2 (x - mean) / (N - correction)
            let g = if sqrt {
                // d std = d var / (2 std), 0 where std == 0 (as PyTorch)
                let s = o.reshape_to(&kshape)?;
                let raw = g.div(&s.mul_scalar(2.0)?)?;
                let zero = Tensor::zeros(&[], raw.dtype());
                Tensor::where_(&s.eq_scalar(0.0)?, &zero, &raw)?
            } else {
                g
            };
            let centered = xs.sub(&xs.mean_dims(&rdi, true)?)?;
            Ok(vec![Some(g.mul(&centered)?.mul_scalar(scale)?)])
        });
        Ok(out)
    }

    /// `prod(dim, keepdim)`. Integer and bool inputs give i64 (computed in
    /// f64, like `sum`). grad_fn `ProdBackward1`.
    pub fn prod_dim(&self, dim: isize, keepdim: bool) -> Result<Tensor> {
        crate::device::check_cpu("prod", &[self])?;
        self.prod_impl(Some(dim), keepdim)
    }

    /// `prod()` of all elements (0-d result). grad_fn `ProdBackward0`.
    pub fn prod(&self) -> Result<Tensor> {
        crate::device::check_cpu("prod", &[self])?;
        self.prod_impl(None, false)
    }

    fn prod_impl(&self, dim: Option<isize>, keepdim: bool) -> Result<Tensor> {
        let shape = self.shape();
        let rd = match dim {
            Some(d) => reduce_dims("prod", &[d], shape.len())?,
            None => (0..shape.len()).collect(),
        };
        if !self.dtype().is_float() {
            let f = self.to_dtype(DType::F64)?.prod_impl(dim, keepdim)?;
            return f.to_dtype(DType::I64);
        }
        let out_shape = reduced_shape(&shape, &rd, keepdim);
        let (x, outer, kk) = self.rows_over(&rd)?;
        let out = float_op(
            "prod",
            &x,
            &out_shape,
            |s| k::prod_rows(s, outer, kk),
            |s| k::prod_rows(s, outer, kk),
        )?;
        crate::trace::record(
            kiln_ir::Op::Reduce {
                op: kiln_ir::ReduceOp::Prod,
                dims: rd.clone(),
                keepdim,
            },
            &[self],
            &[&out],
        );
        let xs = self.detach();
        let kshape = kept_shape(&shape, &rd);
        let name = if dim.is_some() {
            "ProdBackward1"
        } else {
            "ProdBackward0"
        };
        record(name, &[self], &[&out], move |g, _| {
            let g = g[0].as_ref().unwrap().reshape_to(&kshape)?;
            // d prod / d x_i = prod of the other elements of its row.
            let excl = match rd.len() {
                0 => xs.ones_like()?,
                1 => xs.map_rows(
                    "prod_backward",
                    Some(rd[0]),
                    |s, _, kk| exclusive_prod_rows(s, kk),
                    |s, _, kk| exclusive_prod_rows(s, kk),
                )?,
                _ => {
                    let flat = xs.reshape(&[-1])?;
                    flat.map_rows(
                        "prod_backward",
                        Some(0),
                        |s, _, kk| exclusive_prod_rows(s, kk),
                        |s, _, kk| exclusive_prod_rows(s, kk),
                    )?
                    .reshape_to(&xs.shape())?
                }
            };
            Ok(vec![Some(g.mul(&excl)?)])
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sum_and_mean_over_dims() {
        let x = Tensor::arange(0.0, 24.0, 1.0, DType::F64)
            .unwrap()
            .reshape(&[2, 3, 4])
            .unwrap();
        let s = x.sum_dims(&[1], false).unwrap();
        assert_eq!(s.shape(), vec![2, 4]);
        assert_eq!(
            s.to_vec::<f64>(),
            vec![12.0, 15.0, 18.0, 21.0, 48.0, 51.0, 54.0, 57.0]
        );
        let m = x.mean_dims(&[0, 2], true).unwrap();
        assert_eq!(m.shape(), vec![1, 3, 1]);
        assert_eq!(m.to_vec::<f64>(), vec![7.5, 11.5, 15.5]);
        assert_eq!(x.sum().unwrap().item().unwrap(), 276.0);
        let b = x.sum_to_size(&[3, 1]).unwrap();
        assert_eq!(b.to_vec::<f64>(), vec![60.0, 92.0, 124.0]);
        assert!(x.sum_dims(&[3], false).is_err());
    }
}
