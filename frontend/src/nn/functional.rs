//! `nn.functional`: the losses (mse_loss, l1_loss,
//! binary_cross_entropy_with_logits) with PyTorch's reductions and grad_fn
//! names, plus re-exports of the functional forms of the layers (dropout,
//! flatten). CrossEntropy waits for `log_softmax`.

use crate::autograd::{no_grad, record};
use crate::error::{Error, Result};
use crate::tensor::Tensor;

pub use super::layers::{dropout, flatten};

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
    let out = no_grad(|| -> Result<Tensor> {
        let d = input.sub(target)?;
        reduce(&d.mul(&d)?, reduction)
    })
    .map_err(|e| Error::op("mse_loss", e.to_string()))?;
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
            let diff = a.sub(&b)?;
            // PyTorch: (input - target) * (2 / numel for mean, 2 for sum/none) * grad
            let norm = if reduction == Reduction::Mean {
                2.0 / diff.numel().max(1) as f64
            } else {
                2.0
            };
            let gg = if reduction == Reduction::None {
                g.clone()
            } else {
                g.expand_to(&diff.shape())?
            };
            let gi = diff.mul_scalar(norm)?.mul(&gg)?;
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
