//! `softmax` and `log_softmax` along a dim: the dim is moved last, the row
//! kernel runs, and the result is moved back. Their backwards are composed
//! of tensor ops (so they are differentiable again):
//! softmax: `y * (g - sum(g * y, dim))`; log_softmax: `g - exp(y) * sum(g, dim)`.

use crate::autograd::record;
use crate::error::Result;
use crate::tensor::{normalize_dim, Tensor};
use kiln_cpu::reduce as k;

impl Tensor {
    /// `softmax(dim)` (grad_fn `SoftmaxBackward0`). Floating inputs only.
    pub fn softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl("softmax", dim, false)
    }

    /// `log_softmax(dim)` (grad_fn `LogSoftmaxBackward0`), computed as
    /// `x - max - log(sum(exp(x - max)))` for stability.
    pub fn log_softmax(&self, dim: isize) -> Result<Tensor> {
        self.softmax_impl("log_softmax", dim, true)
    }

    fn softmax_impl(&self, op: &'static str, dim: isize, log: bool) -> Result<Tensor> {
        crate::device::check_cpu(op, &[self])?;
        let nd = self.dim();
        let d = normalize_dim(dim, nd, op)?;
        let d = if nd == 0 { None } else { Some(d) };
        let out = self.map_rows(
            op,
            d,
            |s, _, kk| k::softmax_rows(s, kk, log),
            |s, _, kk| k::softmax_rows(s, kk, log),
        )?;
        let dim_ir = d.unwrap_or(0);
        let ir_op = if log {
            kiln_ir::Op::LogSoftmax { dim: dim_ir }
        } else {
            kiln_ir::Op::Softmax { dim: dim_ir }
        };
        crate::trace::record(ir_op, &[self], &[&out]);
        let y = out.detach();
        let dims: Vec<isize> = d.iter().map(|&d| d as isize).collect();
        let name = if log {
            "LogSoftmaxBackward0"
        } else {
            "SoftmaxBackward0"
        };
        record(name, &[self], &[&out], move |g, _| {
            let g = g[0].as_ref().unwrap();
            let gi = if log {
                g.sub(&y.exp()?.mul(&g.sum_dims(&dims, true)?)?)?
            } else {
                y.mul(&g.sub(&g.mul(&y)?.sum_dims(&dims, true)?)?)?
            };
            Ok(vec![Some(gi)])
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_ir::DType;

    #[test]
    fn softmax_values_along_each_dim() {
        // torch.tensor([[0., 1.], [2., 4.]]).softmax(0)
        let x = Tensor::from_vec(vec![0.0f64, 1.0, 2.0, 4.0], &[2, 2]).unwrap();
        let s0 = x.softmax(0).unwrap().to_vec::<f64>();
        let e = |a: f64, b: f64| a.exp() / (a.exp() + b.exp());
        let want0 = [e(0.0, 2.0), e(1.0, 4.0), e(2.0, 0.0), e(4.0, 1.0)];
        for (a, b) in s0.iter().zip(want0) {
            assert!((a - b).abs() < 1e-15, "{a} vs {b}");
        }
        let ls = x.log_softmax(-1).unwrap().to_vec::<f64>();
        let want1 = [e(0.0, 1.0), e(1.0, 0.0), e(2.0, 4.0), e(4.0, 2.0)];
        for (a, b) in ls.iter().zip(want1) {
            assert!((a - b.ln()).abs() < 1e-15, "{a} vs {}", b.ln());
        }
        let s = Tensor::scalar(3.0f32).softmax(0).unwrap();
        assert_eq!(s.to_vec::<f32>(), vec![1.0]);
        let err = Tensor::zeros(&[2], DType::I64)
            .softmax(0)
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("softmax"), "{err}");
        let err = x.softmax(2).unwrap_err().to_string();
        assert!(
            err.starts_with("softmax") && err.contains("out of range"),
            "{err}"
        );
    }
}
