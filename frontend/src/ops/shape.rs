//! Shape ops that copy: `cat`, `stack` (with PyTorch's dtype promotion
//! across inputs), `index_select` and its backward `index_add`. Each
//! records PyTorch's grad_fn (`CatBackward0`, `StackBackward0`,
//! `IndexSelectBackward0`, `IndexAddBackward0`).

use crate::autograd::{no_grad, record};
use crate::error::{Error, Result};
use crate::tensor::{normalize_dim, Tensor};
use kiln_cpu::{with_storage, CpuStorage, Element};
use kiln_ir::DType;

/// Concatenates contiguous buffers of one dtype: for each of `outer` rows,
/// `inners[i]` elements from part `i`. `_witness` fixes `T`.
fn cat_typed<T: Element>(
    _witness: &[T],
    parts: &[CpuStorage],
    outer: usize,
    inners: &[usize],
) -> CpuStorage {
    let slices: Vec<&[T]> = parts.iter().map(|p| T::slice(p).unwrap()).collect();
    let mut out = Vec::with_capacity(outer * inners.iter().sum::<usize>());
    for o in 0..outer {
        for (s, &n) in slices.iter().zip(inners) {
            out.extend_from_slice(&s[o * n..(o + 1) * n]);
        }
    }
    T::into_storage(out)
}

/// `cat` without autograd or checks: `parts` all have `dtype` and agree on
/// every dim but `d`; the result has `out_shape`.
fn cat_raw(parts: &[Tensor], d: usize, out_shape: &[usize], dtype: DType) -> Result<Tensor> {
    if parts.is_empty() {
        return Ok(Tensor::zeros(out_shape, dtype));
    }
    let bufs: Vec<CpuStorage> = no_grad(|| -> Result<Vec<CpuStorage>> {
        parts
            .iter()
            .map(|p| Ok(p.to_dtype(dtype)?.contiguous_storage()))
            .collect()
    })?;
    let outer: usize = out_shape[..d].iter().product();
    let inner: usize = out_shape[d + 1..].iter().product();
    let inners: Vec<usize> = parts.iter().map(|p| p.shape()[d] * inner).collect();
    let out = with_storage!(&bufs[0], v => cat_typed(v.as_slice(), &bufs, outer, &inners));
    Ok(Tensor::from_storage(out, out_shape))
}

/// The dtype `torch.cat` gives a list of tensors (`result_type` over them).
fn promote_all(tensors: &[&Tensor]) -> DType {
    tensors
        .iter()
        .map(|t| t.dtype())
        .reduce(DType::promote)
        .unwrap_or(DType::F32)
}

/// Checks an index tensor for `index_select` / `index_add` and returns its
/// values (each in `0..size`).
fn index_values(op: &str, index: &Tensor, size: usize) -> Result<Vec<i64>> {
    if index.dtype() != DType::I64 {
        return Err(Error::op(
            op,
            format!(
                "{op}(): Expected dtype int64 for index, got {}",
                index.dtype()
            ),
        ));
    }
    if index.dim() > 1 {
        return Err(Error::op(
            op,
            format!(
                "{op}(): Index is supposed to be a vector (got shape {:?})",
                index.shape()
            ),
        ));
    }
    let idx = index.to_vec::<i64>();
    if let Some(&bad) = idx.iter().find(|&&i| i < 0 || i as usize >= size) {
        return Err(Error::op(
            op,
            format!("index {bad} is out of bounds for dimension with size {size} (index out of range in self)"),
        ));
    }
    Ok(idx)
}

/// Rows `idx` of dim `d` of a contiguous buffer viewed as
/// `[outer, size, inner]`.
fn index_select_typed<T: Element>(
    src: &[T],
    idx: &[i64],
    outer: usize,
    size: usize,
    inner: usize,
) -> CpuStorage {
    let mut out = Vec::with_capacity(outer * idx.len() * inner);
    for o in 0..outer {
        for &i in idx {
            let s = (o * size + i as usize) * inner;
            out.extend_from_slice(&src[s..s + inner]);
        }
    }
    T::into_storage(out)
}

/// `dst[:, idx[k], :] += src[:, k, :]` for buffers viewed as
/// `[outer, size, inner]` and `[outer, idx.len(), inner]`.
fn index_add_typed<T: Copy>(
    dst: &mut [T],
    src: &[T],
    idx: &[i64],
    outer: usize,
    size: usize,
    inner: usize,
    add: impl Fn(T, T) -> T,
) {
    let n = idx.len();
    for o in 0..outer {
        for (k, &i) in idx.iter().enumerate() {
            let dd = (o * size + i as usize) * inner;
            let ss = (o * n + k) * inner;
            for j in 0..inner {
                dst[dd + j] = add(dst[dd + j], src[ss + j]);
            }
        }
    }
}

impl Tensor {
    /// `torch.cat(tensors, dim)`: the result dtype is the promotion of all
    /// inputs; all shapes must match except in `dim`. As PyTorch's legacy
    /// rule, 1-d empty tensors (shape [0]) are skipped whatever the others'
    /// shapes. Grad_fn `CatBackward0`; each input's gradient is cast back
    /// to its dtype.
    pub fn cat(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        crate::device::check_cpu("cat", tensors)?;
        if tensors.is_empty() {
            return Err(Error::op(
                "cat",
                "torch.cat(): expected a non-empty list of Tensors",
            ));
        }
        let shapes: Vec<Vec<usize>> = tensors.iter().map(|t| t.shape()).collect();
        let dtype = promote_all(tensors);
        let all = || format!(" (shapes {shapes:?})");
        if let Some(i) = shapes.iter().position(|s| s.is_empty()) {
            return Err(Error::op(
                "cat",
                format!(
                    "zero-dimensional tensor (at position {i}) cannot be concatenated{}",
                    all()
                ),
            ));
        }
        let skipped: Vec<bool> = shapes.iter().map(|s| s.as_slice() == [0]).collect();
        let kept: Vec<usize> = (0..tensors.len()).filter(|&i| !skipped[i]).collect();
        let (d, out_shape) = match kept.first() {
            None => (0, vec![0]),
            Some(&first) => {
                let reference = &shapes[first];
                let nd = reference.len();
                let d = normalize_dim(dim, nd, "cat")?;
                let mut total = 0;
                for &i in &kept {
                    let s = &shapes[i];
                    if s.len() != nd {
                        return Err(Error::op(
                            "cat",
                            format!(
                                "Tensors must have same number of dimensions: got {nd} and {} (tensor number {i} in the list){}",
                                s.len(),
                                all()
                            ),
                        ));
                    }
                    for k in 0..nd {
                        if k != d && s[k] != reference[k] {
                            return Err(Error::op(
                                "cat",
                                format!(
                                    "Sizes of tensors must match except in dimension {d}. Expected size {} but got size {} for tensor number {i} in the list{}",
                                    reference[k],
                                    s[k],
                                    all()
                                ),
                            ));
                        }
                    }
                    total += s[d];
                }
                let mut out_shape = reference.clone();
                out_shape[d] = total;
                (d, out_shape)
            }
        };
        let parts: Vec<Tensor> = kept.iter().map(|&i| tensors[i].detach()).collect();
        let out = cat_raw(&parts, d, &out_shape, dtype)?;
        let kept_refs: Vec<&Tensor> = kept.iter().map(|&i| tensors[i]).collect();
        if !kept_refs.is_empty() {
            crate::trace::record(kiln_ir::Op::Cat { dim: d }, &kept_refs, &[&out]);
        }
        let dtypes: Vec<DType> = tensors.iter().map(|t| t.dtype()).collect();
        record("CatBackward0", tensors, &[&out], move |g, needs| {
            let g = g[0].as_ref().unwrap();
            let mut start = 0;
            let mut grads = Vec::with_capacity(shapes.len());
            for (i, s) in shapes.iter().enumerate() {
                if skipped[i] {
                    grads.push(needs[i].then(|| Tensor::zeros(&[0], dtypes[i])));
                    continue;
                }
                let n = s[d];
                grads.push(if needs[i] {
                    Some(
                        g.narrow(d as isize, start as isize, n)?
                            .to_dtype(dtypes[i])?,
                    )
                } else {
                    None
                });
                start += n;
            }
            Ok(grads)
        });
        Ok(out)
    }

    /// `torch.stack(tensors, dim)`: all shapes equal; a new dim `dim` is
    /// inserted (dtype promotion as `cat`; grad_fn `StackBackward0`).
    pub fn stack(tensors: &[&Tensor], dim: isize) -> Result<Tensor> {
        crate::device::check_cpu("stack", tensors)?;
        if tensors.is_empty() {
            return Err(Error::op("stack", "stack expects a non-empty TensorList"));
        }
        let shape = tensors[0].shape();
        for (i, t) in tensors.iter().enumerate().skip(1) {
            if t.shape() != shape {
                return Err(Error::op(
                    "stack",
                    format!(
                        "stack expects each tensor to be equal size, but got {shape:?} at entry 0 and {:?} at entry {i}",
                        t.shape()
                    ),
                ));
            }
        }
        let d = normalize_dim(dim, shape.len() + 1, "stack")?;
        let dtype = promote_all(tensors);
        let mut piece = shape.clone();
        piece.insert(d, 1);
        let parts: Vec<Tensor> = {
            let _internal = crate::trace::suspend();
            tensors
                .iter()
                .map(|t| t.detach().reshape_to(&piece))
                .collect::<Result<_>>()?
        };
        let mut out_shape = shape.clone();
        out_shape.insert(d, tensors.len());
        let out = cat_raw(&parts, d, &out_shape, dtype)?;
        crate::trace::record(kiln_ir::Op::Stack { dim: d }, tensors, &[&out]);
        let dtypes: Vec<DType> = tensors.iter().map(|t| t.dtype()).collect();
        record("StackBackward0", tensors, &[&out], move |g, needs| {
            let g = g[0].as_ref().unwrap();
            (0..dtypes.len())
                .map(|i| {
                    if needs[i] {
                        Ok(Some(g.select(d as isize, i as isize)?.to_dtype(dtypes[i])?))
                    } else {
                        Ok(None)
                    }
                })
                .collect()
        });
        Ok(out)
    }

    /// `index_select(dim, index)`: a copy of the rows `index` (an i64
    /// tensor with at most one dim) of `dim`; repeated indices repeat rows.
    /// The backward (`IndexSelectBackward0`) index-adds the gradient's rows
    /// into zeros, so repeated indices accumulate.
    pub fn index_select(&self, dim: isize, index: &Tensor) -> Result<Tensor> {
        crate::device::check_cpu("index_select", &[self, index])?;
        let shape = self.shape();
        let nd = shape.len();
        let d = normalize_dim(dim, nd, "index_select")?;
        let size = shape.get(d).copied().unwrap_or(1);
        let idx = index_values("index_select", index, size)?;
        let mut out_shape = shape.clone();
        if nd > 0 {
            out_shape[d] = idx.len();
        } else if idx.len() != 1 {
            return Err(Error::op(
                "index_select",
                format!(
                    "index_select(): a 0-dim tensor needs exactly one index, got {}",
                    idx.len()
                ),
            ));
        }
        let outer: usize = shape[..d.min(nd)].iter().product();
        let inner: usize = if nd > 0 {
            shape[d + 1..].iter().product()
        } else {
            1
        };
        let src = self.contiguous_storage();
        let out =
            with_storage!(&src, v => index_select_typed(v.as_slice(), &idx, outer, size, inner));
        let out = Tensor::from_storage(out, &out_shape);
        if nd > 0 {
            crate::trace::record(kiln_ir::Op::IndexSelect { dim: d }, &[self, index], &[&out]);
        }
        let index = index.detach();
        record("IndexSelectBackward0", &[self], &[&out], move |g, _| {
            let g = g[0].as_ref().unwrap();
            let z = Tensor::zeros(&shape, g.dtype());
            Ok(vec![Some(z.index_add(d as isize, &index, g)?)])
        });
        Ok(out)
    }

    /// Out-of-place `index_add(dim, index, source)`: a copy of `self` with
    /// row `k` of `source` (along `dim`) added to row `index[k]`; repeated
    /// indices accumulate. `source` has `self`'s dtype and shape except
    /// `index.numel()` along `dim`. Grad_fn `IndexAddBackward0`.
    pub fn index_add(&self, dim: isize, index: &Tensor, source: &Tensor) -> Result<Tensor> {
        crate::device::check_cpu("index_add", &[self, index, source])?;
        let shape = self.shape();
        let nd = shape.len();
        let d = normalize_dim(dim, nd, "index_add")?;
        let size = shape.get(d).copied().unwrap_or(1);
        let idx = index_values("index_add", index, size)?;
        if source.dtype() != self.dtype() {
            return Err(Error::op(
                "index_add",
                format!(
                    "index_add_(): self ({}) and source ({}) must have the same scalar type",
                    self.dtype(),
                    source.dtype()
                ),
            ));
        }
        let mut want = shape.clone();
        if nd > 0 {
            want[d] = idx.len();
        }
        let src_shape = source.shape();
        let ok = src_shape == want || (nd == 0 && idx.len() == 1 && source.numel() == 1);
        if !ok {
            return Err(Error::op(
                "index_add",
                format!(
                    "source of shape {src_shape:?} does not match self of shape {shape:?} with {} indices along dim {d} (expected {want:?})",
                    idx.len()
                ),
            ));
        }
        let outer: usize = shape[..d.min(nd)].iter().product();
        let inner: usize = if nd > 0 {
            shape[d + 1..].iter().product()
        } else {
            1
        };
        let mut dst = self.contiguous_storage();
        let src = source.contiguous_storage();
        match (&mut dst, &src) {
            (CpuStorage::F32(a), CpuStorage::F32(b)) => {
                index_add_typed(a, b, &idx, outer, size, inner, |x, y| x + y)
            }
            (CpuStorage::F64(a), CpuStorage::F64(b)) => {
                index_add_typed(a, b, &idx, outer, size, inner, |x, y| x + y)
            }
            (CpuStorage::F16(a), CpuStorage::F16(b)) => {
                index_add_typed(a, b, &idx, outer, size, inner, |x, y| {
                    half::f16::from_f32(x.to_f32() + y.to_f32())
                })
            }
            (CpuStorage::BF16(a), CpuStorage::BF16(b)) => {
                index_add_typed(a, b, &idx, outer, size, inner, |x, y| {
                    half::bf16::from_f32(x.to_f32() + y.to_f32())
                })
            }
            (CpuStorage::I64(a), CpuStorage::I64(b)) => {
                index_add_typed(a, b, &idx, outer, size, inner, i64::wrapping_add)
            }
            (CpuStorage::Bool(a), CpuStorage::Bool(b)) => {
                index_add_typed(a, b, &idx, outer, size, inner, |x, y| x | y)
            }
            _ => unreachable!("dtypes checked above"),
        }
        let out = Tensor::from_storage(dst, &shape);
        let index = index.detach();
        record(
            "IndexAddBackward0",
            &[self, source],
            &[&out],
            move |g, needs| {
                let g = g[0].as_ref().unwrap();
                let gs = if needs[1] {
                    Some(g.index_select(d as isize, &index)?.reshape_to(&src_shape)?)
                } else {
                    None
                };
                Ok(vec![needs[0].then(|| g.clone()), gs])
            },
        );
        Ok(out)
    }
}
