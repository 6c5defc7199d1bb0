//! Eager tensor ops: each computes with the kiln-cpu kernels and, when an
//! input requires grad, records its backward (composed of other ops, so
//! double backward works). Grouped by family: creation, view, elementwise,
//! reduce (sum/mean/var/std/prod), minmax (max/min/argmax), softmax,
//! nll_loss, in-place, copying shape ops (cat, stack, index_select), linalg, conv.

pub mod conv;
pub mod creation;
pub mod elementwise;
pub mod inplace;
pub mod linalg;
pub mod minmax;
pub mod nll;
pub mod nn;
pub mod reduce;
pub mod shape;
pub mod softmax;
pub mod view;

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_cpu::{CpuStorage, Layout};
use kiln_ir::DType;

/// Runs a float kernel on a tensor: f32/f64 natively; f16/bf16 computed in
/// f32 and rounded back (as PyTorch's CPU kernels do for half types); other
/// dtypes are an error naming the op. `f` gets the contiguous input and
/// returns the output buffer (any length; `shape` is the output shape).
pub(crate) fn float_op(
    op: &str,
    x: &Tensor,
    shape: &[usize],
    f32_fn: impl FnOnce(&[f32]) -> Vec<f32>,
    f64_fn: impl FnOnce(&[f64]) -> Vec<f64>,
) -> Result<Tensor> {
    crate::device::check_cpu(op, &[x])?;
    match x.dtype() {
        DType::F32 => Ok(Tensor::from_storage(
            CpuStorage::F32(x.with_contiguous(f32_fn)),
            shape,
        )),
        DType::F64 => Ok(Tensor::from_storage(
            CpuStorage::F64(x.with_contiguous(f64_fn)),
            shape,
        )),
        DType::F16 | DType::BF16 => {
            let up = x.to_dtype(DType::F32)?;
            let y = Tensor::from_storage(CpuStorage::F32(up.with_contiguous(f32_fn)), shape);
            y.to_dtype(x.dtype())
        }
        d => Err(Error::op(
            op,
            format!("expected a floating point tensor, got {d}"),
        )),
    }
}

/// The layout of `t` broadcast to `shape` (stride 0 on broadcast dims).
pub(crate) fn broadcast_layout(l: &Layout, shape: &[usize]) -> Layout {
    let nd = shape.len();
    let off = nd - l.shape.len();
    let mut strides = vec![0; nd];
    for i in 0..l.shape.len() {
        strides[off + i] = if l.shape[i] == 1 && shape[off + i] != 1 {
            0
        } else {
            l.strides[i]
        };
    }
    Layout {
        shape: shape.to_vec(),
        strides,
        offset: l.offset,
    }
}
