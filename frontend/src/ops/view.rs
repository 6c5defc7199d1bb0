//! View and layout ops. A view shares its base's storage with a new shape,
//! strides and offset, exactly as PyTorch computes them (the tests assert
//! PyTorch's stride values); `reshape` is a view when the strides allow and
//! a copy otherwise. Each view records a backward that maps the gradient
//! back to the base's shape.

use crate::autograd::record;
use crate::error::{Error, Result};
use crate::tensor::{normalize_dim, Tensor};
use kiln_cpu::Layout;
use kiln_ir::DType;

/// PyTorch's `computeStride`: strides for viewing (shape, strides) as
/// `new_shape` without copying, or None if impossible.
pub(crate) fn view_strides(
    old: &[usize],
    old_strides: &[usize],
    new: &[usize],
) -> Option<Vec<usize>> {
    if old.is_empty() || old.contains(&0) {
        return Some(kiln_ir::contiguous_strides(new));
    }
    let mut new_strides = vec![0usize; new.len()];
    let mut view_d = new.len() as isize - 1;
    let mut chunk_base = *old_strides.last().unwrap();
    let mut tensor_numel = 1usize;
    let mut view_numel = 1usize;
    for tensor_d in (0..old.len()).rev() {
        tensor_numel *= old[tensor_d];
        if tensor_d == 0
            || (old[tensor_d - 1] != 1 && old_strides[tensor_d - 1] != tensor_numel * chunk_base)
        {
            while view_d >= 0 && (view_numel < tensor_numel || new[view_d as usize] == 1) {
                new_strides[view_d as usize] = view_numel * chunk_base;
                view_numel *= new[view_d as usize];
                view_d -= 1;
            }
            if view_numel != tensor_numel {
                return None;
            }
            if tensor_d > 0 {
                chunk_base = old_strides[tensor_d - 1];
                tensor_numel = 1;
                view_numel = 1;
            }
        }
    }
    if view_d != -1 {
        return None;
    }
    Some(new_strides)
}

/// Resolves one `-1` in a requested shape against `numel`.
pub(crate) fn infer_shape(
    op: &str,
    shape: &[isize],
    numel: usize,
    from: &[usize],
) -> Result<Vec<usize>> {
    let mut infer = None;
    let mut known = 1usize;
    for (i, &s) in shape.iter().enumerate() {
        if s == -1 {
            if infer.is_some() {
                return Err(Error::op(op, "only one dimension can be inferred"));
            }
            infer = Some(i);
        } else if s < 0 {
            return Err(Error::op(op, format!("invalid shape dimension {s}")));
        } else {
            known *= s as usize;
        }
    }
    let mut out: Vec<usize> = shape.iter().map(|&s| s.max(0) as usize).collect();
    match infer {
        Some(i) => {
            if known == 0 || !numel.is_multiple_of(known) {
                return Err(Error::op(
                    op,
                    format!("shape '{shape:?}' is invalid for input of size {numel} (input shape {from:?})"),
                ));
            }
            out[i] = numel / known;
        }
        None => {
            if known != numel {
                return Err(Error::op(
                    op,
                    format!("shape '{shape:?}' is invalid for input of size {numel} (input shape {from:?})"),
                ));
            }
        }
    }
    Ok(out)
}

impl Tensor {
    /// A new tensor object looking at the same storage with `layout`.
    pub(crate) fn alias_with(&self, layout: Layout) -> Tensor {
        let d = self.data();
        Tensor::from_parts(d.storage, layout, d.device)
    }

    /// A view with an explicit layout, recording `backward` under `name`.
    pub(crate) fn make_view(
        &self,
        layout: Layout,
        name: &'static str,
        backward: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Tensor {
        let out = self.alias_with(layout);
        record(name, &[self], &[&out], move |g, _| {
            Ok(vec![Some(backward(g[0].as_ref().unwrap())?)])
        });
        out
    }

    /// `view(shape)`: never copies; an error if the strides do not allow it.
    pub fn view(&self, shape: &[isize]) -> Result<Tensor> {
        let l = self.layout();
        let new = infer_shape("view", shape, l.numel(), &l.shape)?;
        let strides = view_strides(&l.shape, &l.strides, &new).ok_or_else(|| {
            Error::op(
                "view",
                format!(
                    "view size is not compatible with input tensor's size and stride (shape {:?}, strides {:?}, requested {:?}): at least one dimension spans across two contiguous subspaces. Use .reshape(...) instead.",
                    l.shape, l.strides, new
                ),
            )
        })?;
        let in_shape = l.shape.clone();
        Ok(self.make_view(
            Layout {
                shape: new,
                strides,
                offset: l.offset,
            },
            "ViewBackward0",
            move |g| g.reshape_to(&in_shape),
        ))
    }

    /// `reshape(shape)`: a view when possible, else a contiguous copy.
    pub fn reshape(&self, shape: &[isize]) -> Result<Tensor> {
        let l = self.layout();
        let new = infer_shape("reshape", shape, l.numel(), &l.shape)?;
        self.reshape_to(&new)
    }

    /// `reshape` with a fully known shape.
    pub fn reshape_to(&self, shape: &[usize]) -> Result<Tensor> {
        let l = self.layout();
        if kiln_ir::numel(shape) != l.numel() {
            return Err(Error::op(
                "reshape",
                format!(
                    "shape {shape:?} is invalid for input of size {} (input shape {:?})",
                    l.numel(),
                    l.shape
                ),
            ));
        }
        let in_shape = l.shape.clone();
        match view_strides(&l.shape, &l.strides, shape) {
            Some(strides) => Ok(self.make_view(
                Layout {
                    shape: shape.to_vec(),
                    strides,
                    offset: l.offset,
                },
                "ViewBackward0",
                move |g| g.reshape_to(&in_shape),
            )),
            None => {
                // Copy: PyTorch records the clone then the view (_unsafe_view);
                // the grad_fn seen on the result is UnsafeViewBackward0.
                let c = self.contiguous()?;
                let flat = c.detach().alias_with(Layout::contiguous(shape));
                record("UnsafeViewBackward0", &[&c], &[&flat], move |g, _| {
                    Ok(vec![Some(g[0].as_ref().unwrap().reshape_to(&in_shape)?)])
                });
                Ok(flat)
            }
        }
    }

    /// `expand(shape)`: -1 keeps a dimension; new leading dims allowed;
    /// expanded dims get stride 0 (no copy).
    pub fn expand(&self, shape: &[isize]) -> Result<Tensor> {
        let l = self.layout();
        if shape.len() < l.shape.len() {
            return Err(Error::op(
                "expand",
                format!(
                    "the number of sizes provided ({}) must be greater or equal to the number of dimensions in the tensor ({})",
                    shape.len(),
                    l.shape.len()
                ),
            ));
        }
        let off = shape.len() - l.shape.len();
        let mut new_shape = vec![0usize; shape.len()];
        let mut new_strides = vec![0usize; shape.len()];
        for i in 0..shape.len() {
            if i < off {
                if shape[i] < 0 {
                    return Err(Error::op("expand", format!("the expanded size {} is not allowed in a leading, non-existing dimension {i}", shape[i])));
                }
                new_shape[i] = shape[i] as usize;
                new_strides[i] = 0;
            } else {
                let (s, st) = (l.shape[i - off], l.strides[i - off]);
                if shape[i] == -1 || shape[i] as usize == s {
                    new_shape[i] = s;
                    new_strides[i] = st;
                } else if s == 1 {
                    new_shape[i] = shape[i] as usize;
                    new_strides[i] = 0;
                } else {
                    return Err(Error::op(
                        "expand",
                        format!(
                            "The expanded size of the tensor ({}) must match the existing size ({s}) at non-singleton dimension {i}.  Target sizes: {shape:?}.  Tensor sizes: {:?}",
                            shape[i], l.shape
                        ),
                    ));
                }
            }
        }
        let in_shape = l.shape.clone();
        Ok(self.make_view(
            Layout {
                shape: new_shape,
                strides: new_strides,
                offset: l.offset,
            },
            "ExpandBackward0",
            move |g| g.sum_to_size(&in_shape),
        ))
    }

    /// `expand` to a known shape.
    pub fn expand_to(&self, shape: &[usize]) -> Result<Tensor> {
        let s: Vec<isize> = shape.iter().map(|&d| d as isize).collect();
        self.expand(&s)
    }

    /// `permute(dims)`.
    pub fn permute(&self, dims: &[isize]) -> Result<Tensor> {
        let l = self.layout();
        let nd = l.shape.len();
        if dims.len() != nd {
            return Err(Error::op(
                "permute",
                format!(
                    "number of dims don't match in permute: input has {nd} dims, got {} ({dims:?})",
                    dims.len()
                ),
            ));
        }
        let mut perm = Vec::with_capacity(nd);
        let mut seen = vec![false; nd];
        for &d in dims {
            let d = normalize_dim(d, nd, "permute")?;
            if seen[d] {
                return Err(Error::op(
                    "permute",
                    format!("repeated dim in permute: {dims:?}"),
                ));
            }
            seen[d] = true;
            perm.push(d);
        }
        let layout = Layout {
            shape: perm.iter().map(|&d| l.shape[d]).collect(),
            strides: perm.iter().map(|&d| l.strides[d]).collect(),
            offset: l.offset,
        };
        let mut inv = vec![0isize; nd];
        for (i, &p) in perm.iter().enumerate() {
            inv[p] = i as isize;
        }
        Ok(self.make_view(layout, "PermuteBackward0", move |g| g.permute(&inv)))
    }

    /// `transpose(d0, d1)`.
    pub fn transpose(&self, d0: isize, d1: isize) -> Result<Tensor> {
        let nd = self.dim();
        let a = normalize_dim(d0, nd, "transpose")?;
        let b = normalize_dim(d1, nd, "transpose")?;
        let mut l = self.layout();
        if nd > 0 {
            l.shape.swap(a, b);
            l.strides.swap(a, b);
        }
        let (a, b) = (a as isize, b as isize);
        Ok(self.make_view(l, "TransposeBackward0", move |g| g.transpose(a, b)))
    }

    /// `t()`: transpose of a tensor with at most 2 dims.
    pub fn t(&self) -> Result<Tensor> {
        let nd = self.dim();
        if nd > 2 {
            return Err(Error::op(
                "t",
                format!("t() expects a tensor with <= 2 dimensions, but self is {nd}D"),
            ));
        }
        if nd < 2 {
            return Ok(self.make_view(self.layout(), "TBackward0", |g| Ok(g.clone())));
        }
        let mut l = self.layout();
        l.shape.swap(0, 1);
        l.strides.swap(0, 1);
        Ok(self.make_view(l, "TBackward0", |g| g.t()))
    }

    /// `unsqueeze(dim)`.
    pub fn unsqueeze(&self, dim: isize) -> Result<Tensor> {
        let mut l = self.layout();
        let d = normalize_dim(dim, l.shape.len() + 1, "unsqueeze")?;
        let st = if d < l.shape.len() {
            l.strides[d] * l.shape[d]
        } else {
            1
        };
        l.shape.insert(d, 1);
        l.strides.insert(d, st);
        let dd = d as isize;
        Ok(self.make_view(l, "UnsqueezeBackward0", move |g| g.squeeze_dim(dd)))
    }

    /// `squeeze(dim)`: removes `dim` if it has size 1 (else a plain view).
    pub fn squeeze_dim(&self, dim: isize) -> Result<Tensor> {
        let mut l = self.layout();
        let d = normalize_dim(dim, l.shape.len(), "squeeze")?;
        let in_shape = l.shape.clone();
        if !l.shape.is_empty() && l.shape[d] == 1 {
            l.shape.remove(d);
            l.strides.remove(d);
        }
        Ok(self.make_view(l, "SqueezeBackward1", move |g| g.reshape_to(&in_shape)))
    }

    /// `squeeze()`: removes every size-1 dim.
    pub fn squeeze(&self) -> Result<Tensor> {
        let l = self.layout();
        let in_shape = l.shape.clone();
        let keep: Vec<usize> = (0..l.shape.len()).filter(|&i| l.shape[i] != 1).collect();
        let layout = Layout {
            shape: keep.iter().map(|&i| l.shape[i]).collect(),
            strides: keep.iter().map(|&i| l.strides[i]).collect(),
            offset: l.offset,
        };
        Ok(self.make_view(layout, "SqueezeBackward0", move |g| g.reshape_to(&in_shape)))
    }

    /// A contiguous tensor with the same values: `self` itself when already
    /// contiguous (as PyTorch), else a copy.
    pub fn contiguous(&self) -> Result<Tensor> {
        if self.is_contiguous() {
            return Ok(self.clone());
        }
        self.clone_tensor()
    }

    /// PyTorch's `clone()`: a new contiguous tensor with its own storage
    /// (`CloneBackward0`). Rust's `Clone` on `Tensor` copies the handle.
    pub fn clone_tensor(&self) -> Result<Tensor> {
        let out = Tensor::from_storage(self.contiguous_storage(), &self.shape());
        record("CloneBackward0", &[self], &[&out], |g, _| {
            Ok(vec![g[0].clone()])
        });
        Ok(out)
    }

    /// `to(dtype)`: the same tensor when the dtype already matches, else a
    /// converted copy (`ToCopyBackward0`).
    pub fn to_dtype(&self, dtype: DType) -> Result<Tensor> {
        let src = self.dtype();
        if src == dtype {
            return Ok(self.clone());
        }
        let out = Tensor::from_storage(self.contiguous_storage().to_dtype(dtype), &self.shape());
        if dtype.is_float() && src.is_float() {
            record("ToCopyBackward0", &[self], &[&out], move |g, _| {
                Ok(vec![Some(g[0].as_ref().unwrap().to_dtype(src)?)])
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn view_strides_match_pytorch() {
        // torch.arange(24).view(2,3,4).permute(1,0,2) -> strides (4,12,1); view(3,8) ok
        assert_eq!(view_strides(&[3, 2, 4], &[4, 12, 1], &[3, 8]), None);
        assert_eq!(
            view_strides(&[3, 2, 4], &[4, 12, 1], &[3, 2, 2, 2]),
            Some(vec![4, 12, 2, 1])
        );
        assert_eq!(
            view_strides(&[2, 3, 4], &[12, 4, 1], &[6, 4]),
            Some(vec![4, 1])
        );
        // transposed 2-d cannot be flattened
        assert_eq!(view_strides(&[4, 3], &[1, 4], &[12]), None);
    }
}
