//! `nn.functional`: the losses (mse_loss, l1_loss,
//! binary_cross_entropy_with_logits, cross_entropy, nll_loss) with PyTorch's
//! reductions and grad_fn names, plus re-exports of the functional forms of
//! the layers (dropout, flatten).

use crate::autograd::{no_grad, record};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub use super::layers::{dropout, flatten};
pub use crate::ops::nll::nll_loss;

/// `reduction='none' | 'mean' | 'sum'`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    None,
    #[default]
    Mean,
    Sum,
}

impl Reduction {
    pub fn as_str(self) -> &'static str {
        match self {
            Reduction::None => "none",
            Reduction::Mean => "mean",
            Reduction::Sum => "sum",
        }
    }

    pub fn parse(s: &str) -> Result<Reduction> {
        match s {
            "none" => Ok(Reduction::None),
            "mean" => Ok(Reduction::Mean),
            "sum" => Ok(Reduction::Sum),
            _ => Err(Error::op(
                "loss",
                format!("{s} is not a valid value for reduction"),
            )),
        }
    }
}

fn reduce(l: &Tensor, r: Reduction) -> Result<Tensor> {
    match r {
        Reduction::None => Ok(l.clone()),
        Reduction::Mean => l.mean(),
        Reduction::Sum => l.sum(),
    }
}

/// The gradient of the reduced loss with respect to each element of the
/// unreduced loss of `shape`.
fn unreduce_grad(g: &Tensor, shape: &[usize], r: Reduction) -> Result<Tensor> {
    let n = kiln_ir::numel(shape).max(1) as f64;
    match r {
        Reduction::None => Ok(g.clone()),
        Reduction::Sum => g.expand_to(shape),
        Reduction::Mean => g.div_scalar(n)?.expand_to(shape),
    }
}

fn check_float(op: &str, input: &Tensor, target: &Tensor) -> Result<()> {
    if !input.is_floating_point() || !target.is_floating_point() {
        return Err(Error::op(
            op,
            format!(
                "expected floating input and target, got {} and {}",
                input.dtype(),
                target.dtype()
            ),
        ));
    }
    Ok(())
}

/// `F.mse_loss(input, target, reduction)`: mean/sum/none of (input - target)^2
/// (`MseLossBackward0`). Shapes broadcast, as PyTorch (which warns).
pub fn mse_loss(input: &Tensor, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
    check_float("mse_loss", input, target)?;
    // Device tensors are refused by name, as by every eager op (the one-pass
    // path below reads host memory).
    crate::device::check_cpu("mse_loss", &[input, target])?;
    // One pass for contiguous f32 operands of one shape with a reduction
    // (PyTorch's fused mse_loss kernel); the composite ops otherwise, and
    // while tracing (so the graph records them). The composite took five
    // passes over memory forward and four backward: 10 ms of
    // pointwise_chain's 28 ms compiled training step at 4096x1024.
    let fused = reduction != Reduction::None
        && !crate::trace::is_tracing()
        && input.shape() == target.shape();
    let fast = if fused {
        Tensor::with_f32_slices(&[input, target], |s| {
            kiln_cpu::reduce::sq_diff_sum(s[0], s[1])
        })
        .ok()
    } else {
        None
    };
    let out = match fast {
        Some(sum) => {
            let v = if reduction == Reduction::Mean {
                sum / input.numel().max(1) as f64
            } else {
                sum
            };
            Tensor::scalar(if input.numel() == 0 && reduction == Reduction::Mean {
                f32::NAN
            } else {
                v as f32
            })
        }
        None => no_grad(|| -> Result<Tensor> {
            let d = input.sub(target)?;
            reduce(&d.mul(&d)?, reduction)
        })
        .map_err(|e| Error::op("mse_loss", e.to_string()))?,
    };
    let (a, b) = (input.detach(), target.detach());
    let (sa, sb) = (input.shape(), target.shape());
    record(
        "MseLossBackward0",
        &[input, target],
        &[&out],
        move |g, needs| {
            let Some(g) = &g[0] else {
                return Ok(vec![None, None]);
            };
            // PyTorch: (input - target) * (2 / numel for mean, 2 for
            // sum/none) * grad, numel of the broadcast difference.
            let norm = |numel: usize| {
                if reduction == Reduction::Mean {
                    2.0 / numel.max(1) as f64
                } else {
                    2.0
                }
            };
            if reduction != Reduction::None
                && sa == sb
                && g.numel() == 1
                && !needs[1]
                && g.dtype() == kiln_ir::DType::F32
                && a.dtype() == kiln_ir::DType::F32
            {
                // One pass: (a - b) * (norm * g).
                let gv = g.to_vec_f32().first().copied().unwrap_or(0.0) as f64;
                let n = a.numel();
                let mut gi = kiln_cpu::buffers::alloc_uninit::<f32>(n);
                let done = Tensor::with_f32_slices(&[&a, &b], |s| {
                    kiln_cpu::reduce::scaled_diff_into(s[0], s[1], (norm(n) * gv) as f32, &mut gi)
                });
                if done.is_ok() {
                    return Ok(vec![Some(Tensor::from_vec(gi, &sa)?), None]);
                }
            }
            let diff = a.sub(&b)?;
            let gg = if reduction == Reduction::None {
                g.clone()
            } else {
                g.expand_to(&diff.shape())?
            };
            let gi = diff.mul_scalar(norm(diff.numel()))?.mul(&gg)?;
            Ok(vec![
                if needs[0] {
                    Some(gi.sum_to_size(&sa)?)
                } else {
                    None
                },
                if needs[1] {
                    Some(gi.neg()?.sum_to_size(&sb)?)
                } else {
                    None
                },
            ])
        },
    );
    Ok(out)
}

/// `F.l1_loss(input, target, reduction)`: mean/sum/none of |input - target|
/// (composite, as PyTorch's: the grad_fn is the reduction's).
pub fn l1_loss(input: &Tensor, target: &Tensor, reduction: Reduction) -> Result<Tensor> {
    check_float("l1_loss", input, target)?;
    reduce(&input.sub(target)?.abs()?, reduction).map_err(|e| Error::op("l1_loss", e.to_string()))
}

/// `F.binary_cross_entropy_with_logits(input, target, weight, pos_weight,
/// reduction)` in PyTorch's stable form: `(1 - t) * x - lw * log_sigmoid(x)`
/// with `lw = (pos_weight - 1) * t + 1`, `log_sigmoid(x) = min(x, 0) -
/// log(1 + exp(-|x|))` (`BinaryCrossEntropyWithLogitsBackward0`).
pub fn binary_cross_entropy_with_logits(
    input: &Tensor,
    target: &Tensor,
    weight: Option<&Tensor>,
    pos_weight: Option<&Tensor>,
    reduction: Reduction,
) -> Result<Tensor> {
    check_float("binary_cross_entropy_with_logits", input, target)?;
    if input.shape() != target.shape() {
        return Err(Error::op(
            "binary_cross_entropy_with_logits",
            format!(
                "Target size ({:?}) must be the same as input size ({:?})",
                target.shape(),
                input.shape()
            ),
        ));
    }
    let log_sigmoid = |x: &Tensor| -> Result<Tensor> {
        let soft = x.abs()?.neg()?.exp()?.add_scalar(1.0)?.log()?;
        x.clamp(None, Some(0.0))?.sub(&soft)
    };
    let (w, pw) = (weight.map(|t| t.detach()), pos_weight.map(|t| t.detach()));
    let unreduced = |x: &Tensor, t: &Tensor| -> Result<Tensor> {
        let ls = log_sigmoid(x)?;
        let first = t.rsub_scalar(1.0)?.mul(x)?;
        let mut l = match &pw {
            Some(pw) => {
                let lw = pw.sub_scalar(1.0)?.mul(t)?.add_scalar(1.0)?;
                first.sub(&lw.mul(&ls)?)?
            }
            None => first.sub(&ls)?,
        };
        if let Some(w) = &w {
            l = l.mul(w)?;
        }
        Ok(l)
    };
    let out = no_grad(|| reduce(&unreduced(input, target)?, reduction))
        .map_err(|e| Error::op("binary_cross_entropy_with_logits", e.to_string()))?;
    let (x, t) = (input.detach(), target.detach());
    let shape = input.shape();
    record(
        "BinaryCrossEntropyWithLogitsBackward0",
        &[input, target],
        &[&out],
        move |g, needs| {
            let Some(g) = &g[0] else {
                return Ok(vec![None, None]);
            };
            let ge = unreduce_grad(g, &shape, reduction)?;
            let gi = if needs[0] {
                // d/dx = (1 - t) - lw * sigmoid(-x); = sigmoid(x) - t without pos_weight
                let d = match &pw {
                    Some(pw) => {
                        let lw = pw.sub_scalar(1.0)?.mul(&t)?.add_scalar(1.0)?;
                        t.rsub_scalar(1.0)?.sub(&lw.mul(&x.neg()?.sigmoid()?)?)?
                    }
                    None => x.sigmoid()?.sub(&t)?,
                };
                let mut d = d.mul(&ge)?;
                if let Some(w) = &w {
                    d = d.mul(w)?;
                }
                Some(d)
            } else {
                None
            };
            let gt = if needs[1] {
                // d/dt = -x - (pos_weight - 1) * log_sigmoid(x)
                let mut d = x.neg()?;
                if let Some(pw) = &pw {
                    let ls = {
                        let soft = x.abs()?.neg()?.exp()?.add_scalar(1.0)?.log()?;
                        x.clamp(None, Some(0.0))?.sub(&soft)?
                    };
                    d = d.sub(&pw.sub_scalar(1.0)?.mul(&ls)?)?;
                }
                let mut d = d.mul(&ge)?;
                if let Some(w) = &w {
                    d = d.mul(w)?;
                }
                Some(d)
            } else {
                None
            };
            Ok(vec![gi, gt])
        },
    );
    Ok(out)
}

/// `F.cross_entropy(input, target, weight, ignore_index=-100,
/// reduction, label_smoothing)` (arguments in kiln's order), composed as
/// PyTorch's `cross_entropy_loss`: `log_softmax` over the class dim (1, or 0
/// for an unbatched `[C]` input), then
///
/// - class-index targets (i64, shape `[N]` / `[N, d1, ...]` / 0-d):
///   `nll_loss(logp, target, weight, ignore_index, reduction)` (grad_fn
///   `NllLossBackward0` over `LogSoftmaxBackward0`); with
///   `label_smoothing = e > 0`: `(1 - e) * nll + smooth * e / C` where
///   `smooth = -(logp * weight).sum(class_dim)`, zero at ignored targets,
///   reduced by sum, or for 'mean' divided by the number of non-ignored
///   targets (or, with `weight`, by `weight[target[non-ignored]].sum()`);
/// - class-probability targets (floating, same shape as input):
///   `-(logp * target' * weight).sum(class_dim)` with
///   `target' = target * (1 - e) + e / C`; 'mean' divides the sum by
///   `numel / C`. `ignore_index` must then be negative (PyTorch's rule).
///
/// `weight` (optional, `[C]`) weighs each class.
pub fn cross_entropy(
    input: &Tensor,
    target: &Tensor,
    reduction: Reduction,
    label_smoothing: f64,
    weight: Option<&Tensor>,
    ignore_index: i64,
) -> Result<Tensor> {
    const OP: &str = "cross_entropy";
    let shape = input.shape();
    if shape.is_empty() {
        return Err(Error::op(OP, "Expected 1 or more dimensions (got 0)"));
    }
    if !input.is_floating_point() {
        return Err(Error::op(
            OP,
            format!(
                "expected a floating point input (logits), got {}",
                input.dtype()
            ),
        ));
    }
    if !(0.0..=1.0).contains(&label_smoothing) {
        return Err(Error::op(
            OP,
            format!("label_smoothing must be between 0.0 and 1.0. Got: {label_smoothing}"),
        ));
    }
    let class_dim: usize = if shape.len() == 1 { 0 } else { 1 };
    let c = shape[class_dim];
    crate::ops::nll::check_class_weight(OP, weight, c)?;
    // weight viewed as [1, C, 1, ...] to broadcast against the input
    let weight_nd = |w: &Tensor| -> Result<Tensor> {
        let mut v = vec![1isize; shape.len()];
        v[class_dim] = c as isize;
        w.reshape(&v)
    };
    let cd = class_dim as isize;
    let logp = input.log_softmax(cd)?;

    if target.shape() == shape {
        // class probabilities
        if !target.is_floating_point() {
            return Err(Error::op(
                OP,
                format!(
                    "Expected floating point type for target with class probabilities, got {}",
                    target.dtype()
                ),
            ));
        }
        if ignore_index >= 0 {
            return Err(Error::op(
                OP,
                "ignore_index is not supported for floating point target",
            ));
        }
        let t = if label_smoothing > 0.0 {
            target
                .mul_scalar(1.0 - label_smoothing)?
                .add_scalar(label_smoothing / c as f64)?
        } else {
            target.clone()
        };
        let mut prod = logp.mul(&t)?;
        if let Some(w) = weight {
            prod = prod.mul(&weight_nd(w)?)?;
        }
        return match reduction {
            Reduction::None => prod.sum_dims(&[cd], false)?.neg(),
            Reduction::Sum => prod.sum()?.neg(),
            Reduction::Mean => {
                let rows = (input.numel() / c.max(1)) as f64;
                if input.numel() == 0 {
                    prod.sum()?.neg()?.mul_scalar(f64::NAN)
                } else {
                    prod.sum()?.neg()?.div_scalar(rows)
                }
            }
        };
    }

    // class indices
    if target.is_floating_point() {
        return Err(Error::op(
            OP,
            format!(
                "class-probability targets must have the input's shape {shape:?}, got {:?}; class-index targets must be i64, got {}",
                target.shape(),
                target.dtype()
            ),
        ));
    }
    let nll =
        nll_loss(&logp, target, weight, reduction, ignore_index).map_err(|e| rename_op(e, OP))?;
    if label_smoothing <= 0.0 {
        return Ok(nll);
    }
    let ignore_mask = target.eq_scalar(ignore_index as f64)?;
    let smooth = match weight {
        Some(w) => logp.mul(&weight_nd(w)?)?.sum_dims(&[cd], false)?.neg()?,
        None => logp.sum_dims(&[cd], false)?.neg()?,
    };
    let smooth = Tensor::where_(&ignore_mask, &Tensor::zeros(&[], smooth.dtype()), &smooth)?;
    let ret = match reduction {
        Reduction::None => smooth,
        Reduction::Sum => smooth.sum()?,
        Reduction::Mean => {
            let tv = target.to_vec::<i64>();
            let kept: Vec<i64> = tv.into_iter().filter(|&t| t != ignore_index).collect();
            match weight {
                Some(w) => {
                    let n = kept.len();
                    let idx = Tensor::from_vec(kept, &[n])?;
                    smooth.sum()?.div(&w.index_select(0, &idx)?.sum()?)?
                }
                None => smooth.sum()?.div_scalar(kept.len() as f64)?,
            }
        }
    };
    nll.mul_scalar(1.0 - label_smoothing)?
        .add(&ret.mul_scalar(label_smoothing / c as f64)?)
}

/// Re-labels an op error with the public function's name.
fn rename_op(e: Error, op: &str) -> Error {
    match e {
        Error::Op { msg, .. } => Error::op(op, msg),
        e => e,
    }
}
