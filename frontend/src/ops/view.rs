//! View and layout ops. A view shares its base's storage with a new shape,
//! strides and offset, exactly as PyTorch computes them (the tests assert
//! PyTorch's stride values); `reshape` is a view when the strides allow and
//! a copy otherwise. Each view records a backward that maps the gradient
//! back to the base's shape. Ops that cut out part of the base (slice,
//! narrow, select, split, chunk, unbind) scatter the gradient into zeros
//! with a differentiable op, so double backward works.

use crate::autograd::{no_grad, record};
use crate::device::Device;
use crate::error::{Error, Result};
use crate::tensor::{normalize_dim, Tensor};
use kiln_cpu::Layout;
use kiln_ir::DType;
use std::sync::Arc;

/// Applies a view op (with autograd) to a tensor of a known shape.
type ViewFn = Arc<dyn Fn(&Tensor) -> Result<Tensor> + Send + Sync>;

/// The backward of a view that looks at part of its input (PyTorch's
/// `slice_backward` / `select_backward`): zeros of `in_shape` with `g`
/// written where `view` looks. Recorded as `name`
/// (`SliceBackwardBackward0`...), whose own backward applies `view` again.
fn view_scatter_backward(
    name: &'static str,
    g: &Tensor,
    in_shape: &[usize],
    view: ViewFn,
) -> Result<Tensor> {
    let z = Tensor::zeros(in_shape, g.dtype());
    no_grad(|| -> Result<()> {
        view(&z)?.copy_(g)?;
        Ok(())
    })?;
    record(name, &[g], &[&z], move |gg, _| {
        Ok(vec![Some(view(gg[0].as_ref().unwrap())?)])
    });
    Ok(z)
}

/// Gradients of a multi-output view op: each output's gradient, or zeros
/// of its shape where it got none.
fn grads_or_zeros(g: &[Option<Tensor>], shapes: &[Vec<usize>], dtype: DType) -> Vec<Tensor> {
    g.iter()
        .zip(shapes)
        .map(|(g, s)| match g {
            Some(g) => g.clone(),
            None => Tensor::zeros(s, dtype),
        })
        .collect()
}

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

    /// A reshape-like view (view, reshape, squeeze, unsqueeze; expand when
    /// `name` is `ExpandBackward0`) with an explicit layout, recording
    /// `backward` under `name`.
    pub(crate) fn make_view(
        &self,
        layout: Layout,
        name: &'static str,
        backward: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Tensor {
        let shape = layout.shape.clone();
        let ir = if name == "ExpandBackward0" {
            kiln_ir::Op::Expand { shape }
        } else {
            kiln_ir::Op::Reshape { shape }
        };
        self.make_view_op(layout, name, ir, backward)
    }

    /// A view recorded in a trace as `ir`.
    pub(crate) fn make_view_op(
        &self,
        layout: Layout,
        name: &'static str,
        ir: kiln_ir::Op,
        backward: impl Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
    ) -> Tensor {
        let out = self.alias_with(layout);
        crate::trace::record(ir, &[self], &[&out]);
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
                crate::device::check_cpu("reshape", &[self])?;
                let c = self.contiguous()?;
                let flat = c.detach().alias_with(Layout::contiguous(shape));
                crate::trace::record(
                    kiln_ir::Op::Reshape {
                        shape: shape.to_vec(),
                    },
                    &[&c],
                    &[&flat],
                );
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
        let ir = kiln_ir::Op::Permute { dims: perm.clone() };
        Ok(self.make_view_op(layout, "PermuteBackward0", ir, move |g| g.permute(&inv)))
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
        let mut dims: Vec<usize> = (0..nd).collect();
        if nd > 0 {
            dims.swap(a, b);
        }
        let ir = kiln_ir::Op::Permute { dims };
        let (a, b) = (a as isize, b as isize);
        Ok(self.make_view_op(l, "TransposeBackward0", ir, move |g| g.transpose(a, b)))
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
        let ir = kiln_ir::Op::Permute { dims: vec![1, 0] };
        Ok(self.make_view_op(l, "TBackward0", ir, |g| g.t()))
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

    /// `squeeze(dims)`: removes the listed dims that have size 1
    /// (`SqueezeBackward2`); a repeated dim is an error.
    pub fn squeeze_dims(&self, dims: &[isize]) -> Result<Tensor> {
        let l = self.layout();
        let nd = l.shape.len();
        let mut drop = vec![false; nd.max(1)];
        for &d in dims {
            let d = normalize_dim(d, nd, "squeeze")?;
            if drop[d] {
                return Err(Error::op(
                    "squeeze",
                    format!("dim {d} appears multiple times in the list of dims ({dims:?})"),
                ));
            }
            drop[d] = true;
        }
        let keep: Vec<usize> = (0..nd).filter(|&i| !(drop[i] && l.shape[i] == 1)).collect();
        let layout = Layout {
            shape: keep.iter().map(|&i| l.shape[i]).collect(),
            strides: keep.iter().map(|&i| l.strides[i]).collect(),
            offset: l.offset,
        };
        let in_shape = l.shape.clone();
        Ok(self.make_view(layout, "SqueezeBackward2", move |g| g.reshape_to(&in_shape)))
    }

    /// `slice(dim, start, end, step)`: Python's `x[..., start:end:step]` on
    /// one dim. Negative bounds count from the end, out-of-range bounds are
    /// clamped, `end < start` gives an empty dim; the view's offset moves by
    /// `start * stride` and its stride is multiplied by `step`
    /// (`SliceBackward0`).
    pub fn slice(
        &self,
        dim: isize,
        start: Option<isize>,
        end: Option<isize>,
        step: usize,
    ) -> Result<Tensor> {
        let mut l = self.layout();
        let nd = l.shape.len();
        if nd == 0 {
            return Err(Error::op(
                "slice",
                "slice() cannot be applied to a 0-dim tensor.",
            ));
        }
        if step == 0 {
            return Err(Error::op("slice", "slice step must be positive"));
        }
        let d = normalize_dim(dim, nd, "slice")?;
        let size = l.shape[d] as isize;
        let mut s = start.unwrap_or(0);
        let mut e = end.unwrap_or(isize::MAX);
        if s < 0 {
            s += size;
        }
        if e < 0 {
            e += size;
        }
        let s = s.clamp(0, size) as usize;
        let e = e.clamp(s as isize, size) as usize;
        let in_shape = l.shape.clone();
        l.offset += s * l.strides[d];
        l.shape[d] = (e - s).div_ceil(step);
        l.strides[d] *= step;
        let (dd, si, ei) = (d as isize, s as isize, e as isize);
        let view: ViewFn = Arc::new(move |t| t.slice(dd, Some(si), Some(ei), step));
        let ir = kiln_ir::Op::Slice {
            dim: d,
            start: s,
            end: e,
            step,
        };
        Ok(self.make_view_op(l, "SliceBackward0", ir, move |g| {
            view_scatter_backward("SliceBackwardBackward0", g, &in_shape, view.clone())
        }))
    }

    /// `narrow(dim, start, length)`: elements `start..start+length` of `dim`
    /// (a negative `start` counts from the end). PyTorch implements it with
    /// `slice`, so the grad_fn is `SliceBackward0`.
    pub fn narrow(&self, dim: isize, start: isize, length: usize) -> Result<Tensor> {
        let nd = self.dim();
        if nd == 0 {
            return Err(Error::op(
                "narrow",
                "narrow() cannot be applied to a 0-dim tensor.",
            ));
        }
        let d = normalize_dim(dim, nd, "narrow")?;
        let size = self.shape()[d] as isize;
        if start < -size || start > size {
            return Err(Error::op(
                "narrow",
                format!(
                    "start out of range (expected to be in range of [{}, {size}], but got {start})",
                    -size
                ),
            ));
        }
        let s = if start < 0 { start + size } else { start };
        if s + length as isize > size {
            return Err(Error::op(
                "narrow",
                format!("start ({s}) + length ({length}) exceeds dimension size ({size})."),
            ));
        }
        self.slice(dim, Some(s), Some(s + length as isize), 1)
    }

    /// `select(dim, index)`: the sub-tensor at `index` of `dim`, which is
    /// removed (a negative index counts from the end; `SelectBackward0`).
    pub fn select(&self, dim: isize, index: isize) -> Result<Tensor> {
        let mut l = self.layout();
        let nd = l.shape.len();
        if nd == 0 {
            return Err(Error::op(
                "select",
                "select() cannot be applied to a 0-dim tensor.",
            ));
        }
        let d = normalize_dim(dim, nd, "select")?;
        let size = l.shape[d] as isize;
        if index < -size || index >= size {
            return Err(Error::op(
                "select",
                format!(
                    "select(): index {index} out of range for tensor of size {:?} at dimension {d}",
                    l.shape
                ),
            ));
        }
        let i = if index < 0 { index + size } else { index } as usize;
        let in_shape = l.shape.clone();
        l.offset += i * l.strides[d];
        l.shape.remove(d);
        l.strides.remove(d);
        let (dd, ii) = (d as isize, i as isize);
        let view: ViewFn = Arc::new(move |t| t.select(dd, ii));
        let ir = kiln_ir::Op::Select { dim: d, index: i };
        Ok(self.make_view_op(l, "SelectBackward0", ir, move |g| {
            view_scatter_backward("SelectBackwardBackward0", g, &in_shape, view.clone())
        }))
    }

    /// Views of consecutive pieces of `dim` with the given sizes, sharing
    /// one backward node `name` (output_nr = piece index) whose backward
    /// concatenates the pieces' gradients.
    fn split_views(&self, name: &'static str, d: usize, sizes: &[usize]) -> Vec<Tensor> {
        let l = self.layout();
        let mut start = 0;
        let pieces: Vec<Tensor> = sizes
            .iter()
            .map(|&n| {
                let mut pl = l.clone();
                pl.offset += start * l.strides[d];
                pl.shape[d] = n;
                let piece = self.alias_with(pl);
                let ir = kiln_ir::Op::Slice {
                    dim: d,
                    start,
                    end: start + n,
                    step: 1,
                };
                crate::trace::record(ir, &[self], &[&piece]);
                start += n;
                piece
            })
            .collect();
        let refs: Vec<&Tensor> = pieces.iter().collect();
        let shapes: Vec<Vec<usize>> = pieces.iter().map(|p| p.shape()).collect();
        let dtype = self.dtype();
        record(name, &[self], &refs, move |g, _| {
            let parts = grads_or_zeros(g, &shapes, dtype);
            let refs: Vec<&Tensor> = parts.iter().collect();
            Ok(vec![Some(Tensor::cat(&refs, d as isize)?)])
        });
        pieces
    }

    /// `split(split_size, dim)`: views of `split_size` elements of `dim`
    /// each (the last may be smaller); grad_fn `SplitBackward0`.
    pub fn split(&self, split_size: usize, dim: isize) -> Result<Vec<Tensor>> {
        let nd = self.dim();
        if nd == 0 {
            return Err(Error::op(
                "split",
                "split expects at least a 1-dimensional tensor",
            ));
        }
        let d = normalize_dim(dim, nd, "split")?;
        let size = self.shape()[d];
        if split_size == 0 && size != 0 {
            return Err(Error::op(
                "split",
                format!("split_size can only be 0 if dimension size is 0, but got dimension size of {size}"),
            ));
        }
        let n = if split_size == 0 {
            1
        } else {
            size.div_ceil(split_size).max(1)
        };
        let sizes: Vec<usize> = (0..n)
            .map(|i| split_size.min(size.saturating_sub(i * split_size)))
            .collect();
        Ok(self.split_views("SplitBackward0", d, &sizes))
    }

    /// `split(split_sizes, dim)` with explicit sizes summing to the dim's
    /// size; grad_fn `SplitWithSizesBackward0`.
    pub fn split_with_sizes(&self, split_sizes: &[usize], dim: isize) -> Result<Vec<Tensor>> {
        let nd = self.dim();
        if nd == 0 {
            return Err(Error::op(
                "split_with_sizes",
                "split expects at least a 1-dimensional tensor",
            ));
        }
        let d = normalize_dim(dim, nd, "split_with_sizes")?;
        let size = self.shape()[d];
        if split_sizes.iter().sum::<usize>() != size {
            return Err(Error::op(
                "split_with_sizes",
                format!("split_with_sizes expects split_sizes to sum exactly to {size} (input tensor's size at dimension {d}), but got split_sizes={split_sizes:?}"),
            ));
        }
        Ok(self.split_views("SplitWithSizesBackward0", d, split_sizes))
    }

    /// `chunk(chunks, dim)`: `split` with `ceil(size / chunks)` elements per
    /// piece, so there may be fewer than `chunks` pieces (as PyTorch).
    pub fn chunk(&self, chunks: usize, dim: isize) -> Result<Vec<Tensor>> {
        let nd = self.dim();
        if nd == 0 {
            return Err(Error::op(
                "chunk",
                "chunk expects at least a 1-dimensional tensor",
            ));
        }
        if chunks == 0 {
            return Err(Error::op(
                "chunk",
                "chunk expects `chunks` to be greater than 0, got: 0",
            ));
        }
        let d = normalize_dim(dim, nd, "chunk")?;
        let size = self.shape()[d];
        let split_size = size.div_ceil(chunks);
        if split_size == 0 && size == 0 {
            // PyTorch keeps the number of (empty) chunks here.
            return self.split_with_sizes(&vec![0; chunks], dim);
        }
        self.split(split_size, dim)
    }

    /// `unbind(dim)`: the `select(dim, i)` views for every `i`, sharing one
    /// `UnbindBackward0` node whose backward stacks the gradients.
    pub fn unbind(&self, dim: isize) -> Result<Vec<Tensor>> {
        let l = self.layout();
        let nd = l.shape.len();
        if nd == 0 {
            return Err(Error::op(
                "unbind",
                "Dimension specified as 0 but tensor has no dimensions",
            ));
        }
        let d = normalize_dim(dim, nd, "unbind")?;
        let pieces: Vec<Tensor> = (0..l.shape[d])
            .map(|i| {
                let mut pl = l.clone();
                pl.offset += i * l.strides[d];
                pl.shape.remove(d);
                pl.strides.remove(d);
                let piece = self.alias_with(pl);
                crate::trace::record(kiln_ir::Op::Select { dim: d, index: i }, &[self], &[&piece]);
                piece
            })
            .collect();
        let refs: Vec<&Tensor> = pieces.iter().collect();
        let mut piece_shape = l.shape.clone();
        piece_shape.remove(d);
        let shapes = vec![piece_shape; pieces.len()];
        let dtype = self.dtype();
        let in_shape = l.shape.clone();
        record("UnbindBackward0", &[self], &refs, move |g, _| {
            if g.is_empty() {
                return Ok(vec![Some(Tensor::zeros(&in_shape, dtype))]);
            }
            let parts = grads_or_zeros(g, &shapes, dtype);
            let refs: Vec<&Tensor> = parts.iter().collect();
            Ok(vec![Some(Tensor::stack(&refs, d as isize)?)])
        });
        Ok(pieces)
    }

    /// `flatten(start_dim, end_dim)`: merges dims `start_dim..=end_dim`
    /// (a view when the strides allow, else a copy, as `reshape`). As in
    /// PyTorch, a 0-d tensor becomes shape [1] and `start_dim == end_dim`
    /// returns `self` itself.
    pub fn flatten(&self, start_dim: isize, end_dim: isize) -> Result<Tensor> {
        let shape = self.shape();
        let nd = shape.len();
        let s = normalize_dim(start_dim, nd, "flatten")?;
        let e = normalize_dim(end_dim, nd, "flatten")?;
        if s > e {
            return Err(Error::op(
                "flatten",
                format!("flatten() has invalid args: start_dim ({start_dim}) cannot come after end_dim ({end_dim})"),
            ));
        }
        if nd == 0 {
            return self.reshape_to(&[1]);
        }
        if s == e {
            return Ok(self.clone());
        }
        let mut new: Vec<usize> = shape[..s].to_vec();
        new.push(shape[s..=e].iter().product());
        new.extend_from_slice(&shape[e + 1..]);
        self.reshape_to(&new)
    }

    /// `unflatten(dim, sizes)`: splits `dim` into `sizes` (one may be -1).
    /// PyTorch implements it with `view`, so it never copies.
    pub fn unflatten(&self, dim: isize, sizes: &[isize]) -> Result<Tensor> {
        let shape = self.shape();
        if shape.is_empty() {
            return Err(Error::op(
                "unflatten",
                "unflatten() cannot be applied to a 0-dim tensor",
            ));
        }
        let d = normalize_dim(dim, shape.len(), "unflatten")?;
        if sizes.is_empty() {
            return Err(Error::op("unflatten", "unflatten: sizes must be non-empty"));
        }
        let inner = infer_shape("unflatten", sizes, shape[d], &shape).map_err(|_| {
            Error::op(
                "unflatten",
                format!(
                    "unflatten: Provided sizes {sizes:?} don't multiply up to the size of dim {dim} ({}) in the input tensor (shape {shape:?})",
                    shape[d]
                ),
            )
        })?;
        let new: Vec<isize> = shape[..d]
            .iter()
            .chain(&inner)
            .chain(&shape[d + 1..])
            .map(|&x| x as isize)
            .collect();
        self.view(&new)
    }

    /// `movedim(source, destination)` for one dim (a `permute` view).
    pub fn movedim(&self, source: isize, destination: isize) -> Result<Tensor> {
        self.movedims(&[source], &[destination])
    }

    /// `movedim(sources, destinations)`: moves each source dim to its
    /// destination; the other dims keep their order (a `permute` view).
    pub fn movedims(&self, source: &[isize], destination: &[isize]) -> Result<Tensor> {
        let nd = self.dim();
        if source.len() != destination.len() {
            return Err(Error::op(
                "movedim",
                format!("movedim: Invalid source or destination dims: source ({source:?} dims) should contain the same number of dims as destination ({destination:?} dims)"),
            ));
        }
        let src: Vec<usize> = source
            .iter()
            .map(|&d| normalize_dim(d, nd, "movedim"))
            .collect::<Result<_>>()?;
        let dst: Vec<usize> = destination
            .iter()
            .map(|&d| normalize_dim(d, nd, "movedim"))
            .collect::<Result<_>>()?;
        let n = nd.max(1);
        let mut order: Vec<Option<usize>> = vec![None; n];
        let mut src_used = vec![false; n];
        for (&s, &d) in src.iter().zip(&dst) {
            if src_used[s] || order[d].is_some() {
                return Err(Error::op(
                    "movedim",
                    format!("movedim: repeated dim in `source` ({source:?}) or `destination` ({destination:?})"),
                ));
            }
            src_used[s] = true;
            order[d] = Some(s);
        }
        if nd == 0 {
            return self.permute(&[]);
        }
        let mut rest = (0..nd).filter(|&s| !src_used[s]);
        let perm: Vec<isize> = order
            .iter()
            .map(|o| o.unwrap_or_else(|| rest.next().unwrap()) as isize)
            .collect();
        self.permute(&perm)
    }

    /// `swapaxes(a, b)`: an alias of `transpose` (`TransposeBackward0`).
    pub fn swapaxes(&self, a: isize, b: isize) -> Result<Tensor> {
        self.transpose(a, b)
    }

    /// `expand_as(other)`.
    pub fn expand_as(&self, other: &Tensor) -> Result<Tensor> {
        self.expand_to(&other.shape())
    }

    /// `view_as(other)`.
    pub fn view_as(&self, other: &Tensor) -> Result<Tensor> {
        let s: Vec<isize> = other.shape().iter().map(|&d| d as isize).collect();
        self.view(&s)
    }

    /// `reshape_as(other)`.
    pub fn reshape_as(&self, other: &Tensor) -> Result<Tensor> {
        self.reshape_to(&other.shape())
    }

    /// `is_same_size(other)`: same shape.
    pub fn is_same_size(&self, other: &Tensor) -> bool {
        self.shape() == other.shape()
    }

    /// `to(device)`: `self` itself when it is already on `device` (as
    /// PyTorch's `to` when nothing changes), else a contiguous copy on
    /// `device` (`ToCopyBackward0`). A tensor on an OpenCL device keeps its
    /// values in host memory, marked with the device (see `device.rs`):
    /// eager ops refuse it, views keep the device, the OpenCL runtime
    /// uploads it; `to_device(Device::Cpu)` brings it back.
    pub fn to_device(&self, device: Device) -> Result<Tensor> {
        let src = self.device();
        if src == device {
            return Ok(self.clone());
        }
        if !device.is_cpu() {
            crate::device::mark_off_cpu();
        }
        let out = Tensor::from_parts(
            crate::tensor::Storage::new(self.contiguous_storage()),
            Layout::contiguous(&self.shape()),
            device,
        );
        crate::trace::record(kiln_ir::Op::Contiguous, &[self], &[&out]);
        record("ToCopyBackward0", &[self], &[&out], move |g, _| {
            Ok(vec![Some(g[0].as_ref().unwrap().to_device(src)?)])
        });
        Ok(out)
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
        crate::device::check_cpu("clone", &[self])?;
        let out = Tensor::from_storage(self.contiguous_storage(), &self.shape());
        crate::trace::record(kiln_ir::Op::Contiguous, &[self], &[&out]);
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
        crate::device::check_cpu("to", &[self])?;
        let out = Tensor::from_storage(self.contiguous_storage().to_dtype(dtype), &self.shape());
        crate::trace::record(kiln_ir::Op::Cast(dtype), &[self], &[&out]);
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

    /// The slice/select backward is itself differentiable: its backward
    /// applies the view again (PyTorch's `SliceBackwardBackward0`). The
    /// engine seeds backward with detached gradients, so this is tested on
    /// the op directly.
    #[test]
    fn view_scatter_backward_is_differentiable() {
        let v = Tensor::from_slice(&[5.0f32, 6.0], &[2])
            .unwrap()
            .requires_grad_(true)
            .unwrap();
        let view: ViewFn = Arc::new(|t| t.slice(0, Some(1), Some(3), 1));
        let z = view_scatter_backward("SliceBackwardBackward0", &v, &[4], view).unwrap();
        assert_eq!(z.to_vec::<f32>(), vec![0.0, 5.0, 6.0, 0.0]);
        assert_eq!(z.grad_fn_name().as_deref(), Some("SliceBackwardBackward0"));
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[4]).unwrap();
        z.mul(&w).unwrap().sum().unwrap().backward().unwrap();
        assert_eq!(v.grad().unwrap().to_vec::<f32>(), vec![2.0, 3.0]);

        let v = Tensor::from_slice(&[1.0f32, 1.0], &[2])
            .unwrap()
            .requires_grad_(true)
            .unwrap();
        let view: ViewFn = Arc::new(|t| t.select(1, 1));
        let z = view_scatter_backward("SelectBackwardBackward0", &v, &[2, 3], view).unwrap();
        assert_eq!(z.to_vec::<f32>(), vec![0.0, 1.0, 0.0, 0.0, 1.0, 0.0]);
        let w = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]).unwrap();
        z.mul(&w).unwrap().sum().unwrap().backward().unwrap();
        assert_eq!(v.grad().unwrap().to_vec::<f32>(), vec![2.0, 5.0]);
    }
}
