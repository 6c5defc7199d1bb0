//! `nll_loss` (PyTorch's `F.nll_loss`, i.e. `nll_loss_nd`): the negative
//! log-likelihood of class-index targets given log-probabilities, with class
//! weights, `ignore_index` and reductions. It is the op under
//! `cross_entropy` (whose grad_fn is `NllLossBackward0` on top of
//! `LogSoftmaxBackward0`).
//!
//! Shapes as PyTorch's: input `[C]` with a 0-d target, `[N, C]` with `[N]`
//! (grad_fn `NllLossBackward0`), `[N, C, d1, ...]` with `[N, d1, ...]`
//! (`NllLoss2DBackward0`; for 3-d and >4-d inputs PyTorch views the input as
//! `[N, C, 1, -1]` and, under `reduction='none'`, views the output back, so
//! its grad_fn is then `ViewBackward0`). Sums are accumulated in f64.
//!
//! The backward is `coef * grad` with a constant `coef` holding `-weight[t]`
//! (divided by the total weight for 'mean') at each target position and 0
//! elsewhere, so it is differentiable again.

use crate::autograd::record;
use crate::error::{Error, Result};
use crate::nn::functional::Reduction;
use crate::tensor::Tensor;
use kiln_ir::DType;

const OP: &str = "nll_loss";

/// A class-weight tensor must be 1-d float with one entry per class
/// (`nll_loss` and `cross_entropy` share PyTorch's check and message).
pub(crate) fn check_class_weight(op: &str, weight: Option<&Tensor>, c: usize) -> Result<()> {
    if let Some(w) = weight {
        if w.dim() != 1 || w.numel() != c || !w.is_floating_point() {
            return Err(Error::op(
                op,
                format!(
                    "weight tensor should be defined either for all {c} classes or no classes but got weight tensor of shape: {:?} ({})",
                    w.shape(),
                    w.dtype()
                ),
            ));
        }
    }
    Ok(())
}

/// `F.nll_loss(input, target, weight, ignore_index, reduction)`. `input`
/// holds log-probabilities (floating), `target` class indices (i64) in
/// `[0, C)` or equal to `ignore_index` (PyTorch's default is -100).
/// 'mean' divides by the summed weight of the non-ignored targets (NaN when
/// every target is ignored, as PyTorch). A gradient for `weight` is an error
/// at backward time, as PyTorch's.
pub fn nll_loss(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    ignore_index: i64,
) -> Result<Tensor> {
    crate::device::check_cpu_opt("nll_loss", &[Some(input), Some(target), weight])?;
    let shape = input.shape();
    let nd = shape.len();
    if !input.is_floating_point() {
        return Err(Error::op(
            OP,
            format!(
                "expected a floating point input (log-probabilities), got {}",
                input.dtype()
            ),
        ));
    }
    if target.dtype() != DType::I64 {
        return Err(Error::op(
            OP,
            format!(
                "expected scalar type Long for target (class indices) but found {}",
                target.dtype()
            ),
        ));
    }
    let tshape = target.shape();
    if nd == 0 {
        return Err(Error::op(OP, "Expected 1 or more dimensions (got 0)"));
    }
    if nd == 1 {
        if !tshape.is_empty() {
            return Err(Error::op(
                OP,
                format!("an input of shape {shape:?} (no batch dim) needs a 0-d target, got target of shape {tshape:?}"),
            ));
        }
    } else {
        if tshape.first() != Some(&shape[0]) {
            return Err(Error::op(
                OP,
                format!(
                    "Expected input batch_size ({}) to match target batch_size ({}) (input {shape:?}, target {tshape:?})",
                    shape[0],
                    tshape.first().copied().unwrap_or(0)
                ),
            ));
        }
        let mut want = vec![shape[0]];
        want.extend_from_slice(&shape[2..]);
        if tshape != want {
            return Err(Error::op(
                OP,
                format!("Expected target size {want:?}, got {tshape:?} (input {shape:?})"),
            ));
        }
    }
    let c = if nd == 1 { shape[0] } else { shape[1] };
    check_class_weight(OP, weight, c)?;
    if nd == 3 || nd > 4 {
        // PyTorch's nll_loss_nd: view as [N, C, 1, -1], run nll_loss2d, view back.
        let n = shape[0] as isize;
        let x = input.reshape(&[n, c as isize, 1, -1])?;
        let t = target.reshape(&[n, 1, -1])?;
        let out = nll_core(&x, &t, weight, reduction, ignore_index, c)?;
        return if reduction == Reduction::None {
            out.reshape_to(&tshape)
        } else {
            Ok(out)
        };
    }
    nll_core(input, target, weight, reduction, ignore_index, c)
}

/// The loss on validated shapes: input `[C]`, `[N, C]` or `[N, C, H, W]`.
fn nll_core(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    reduction: Reduction,
    ignore_index: i64,
    c: usize,
) -> Result<Tensor> {
    let shape = input.shape();
    let nd = shape.len();
    let (n, s) = match nd {
        1 => (1, 1),
        _ => (shape[0], shape[2..].iter().product::<usize>()),
    };
    let x = input.to_vec::<f64>();
    let t = target.to_vec::<i64>();
    let w: Vec<f64> = match weight {
        Some(w) => w.to_vec::<f64>(),
        None => vec![1.0; c],
    };
    for &ti in &t {
        if ti != ignore_index && (ti < 0 || ti as usize >= c) {
            return Err(Error::op(
                OP,
                format!(
                    "Target {ti} is out of bounds: expected a class index in [0, {c}) (input {shape:?} has C = {c} classes) or ignore_index ({ignore_index})"
                ),
            ));
        }
    }
    // per-element losses, the total weight, and the backward coefficients
    let mut losses = vec![0.0f64; n * s];
    let mut coef = vec![0.0f64; n * c * s];
    let mut total_weight = 0.0f64;
    for i in 0..n {
        for j in 0..s {
            let ti = t[i * s + j];
            if ti == ignore_index {
                continue;
            }
            let k = ti as usize;
            let pos = (i * c + k) * s + j;
            losses[i * s + j] = -w[k] * x[pos];
            coef[pos] = -w[k];
            total_weight += w[k];
        }
    }
    let dtype = input.dtype();
    let out = match reduction {
        Reduction::None => {
            let oshape: Vec<usize> = if nd == 1 {
                vec![]
            } else {
                let mut o = vec![n];
                o.extend_from_slice(&shape[2..]);
                o
            };
            Tensor::from_vec(losses, &oshape)?.to_dtype(dtype)?
        }
        Reduction::Sum => Tensor::scalar(losses.iter().sum::<f64>()).to_dtype(dtype)?,
        Reduction::Mean => {
            Tensor::scalar(losses.iter().sum::<f64>() / total_weight).to_dtype(dtype)?
        }
    };
    if reduction == Reduction::Mean && total_weight != 0.0 {
        for v in &mut coef {
            *v /= total_weight;
        }
    }
    let coef = Tensor::from_vec(coef, &shape)?.to_dtype(dtype)?;
    let name = if nd <= 2 {
        "NllLossBackward0"
    } else {
        "NllLoss2DBackward0"
    };
    let mut inputs = vec![input];
    if let Some(w) = weight {
        inputs.push(w);
    }
    record(name, &inputs, &[&out], move |g, needs| {
        if needs.get(1) == Some(&true) {
            return Err(Error::Autograd(
                "the derivative for 'weight' is not implemented (nll_loss)".into(),
            ));
        }
        let Some(g) = &g[0] else {
            return Ok(vec![None; needs.len()]);
        };
        // grad of the unreduced loss at (i, j) broadcast over the class dim
        let gb = if reduction == Reduction::None && nd >= 2 {
            g.unsqueeze(1)?
        } else {
            g.clone()
        };
        let mut r = vec![Some(coef.mul(&gb)?)];
        if needs.len() > 1 {
            r.push(None);
        }
        Ok(r)
    });
    Ok(out)
}
