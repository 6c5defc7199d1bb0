//! `nn.Linear(in_features, out_features, bias=True)`: `y = x @ weight.T +
//! bias` over the last dim, with PyTorch's default initialization
//! (`kaiming_uniform_(weight, a=sqrt(5))`, bias `U(-1/sqrt(fan_in),
//! 1/sqrt(fan_in))`), registration order (weight, bias) and `extra_repr`.

use super::core::ModuleCore;
use super::init::{self, FanMode};
use super::layers::Parameter;
use super::module::{py_bool, Module};
use crate::error::Result;
use crate::ops::linalg::linear;
use crate::tensor::Tensor;
use kiln_ir::DType;

/// `nn.Linear`. Parameters: `weight` `[out, in]`, `bias` `[out]` (or None).
pub struct Linear {
    core: ModuleCore,
    pub in_features: usize,
    pub out_features: usize,
}

/// PyTorch's `reset_parameters` for Linear and the convolutions: weight from
/// `kaiming_uniform_(a=sqrt(5))` (= U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for
/// the weight), bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the
/// weight's fan_in (no bias change when fan_in is 0).
pub(crate) fn reset_weight_and_bias(weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
    init::kaiming_uniform_(weight, 5f64.sqrt(), FanMode::FanIn, "leaky_relu")?;
    if let Some(b) = bias {
        let (fan_in, _) = init::calculate_fan_in_and_fan_out(weight)?;
        if fan_in > 0 {
            let bound = 1.0 / (fan_in as f64).sqrt();
            init::uniform_(b, -bound, bound)?;
        }
    }
    Ok(())
}

impl Linear {
    /// `nn.Linear(in_features, out_features, bias)` in f32, initialized from
    /// the global generator (`kiln::manual_seed`).
    pub fn new(in_features: usize, out_features: usize, bias: bool) -> Result<Linear> {
        let core = ModuleCore::new("Linear");
        let weight = Parameter::new(Tensor::zeros(&[out_features, in_features], DType::F32))?;
        let b = if bias {
            Some(Parameter::new(Tensor::zeros(&[out_features], DType::F32))?)
        } else {
            None
        };
        reset_weight_and_bias(&weight, b.as_ref())?;
        core.register_parameter("weight", Some(weight))?;
        core.register_parameter("bias", b)?;
        Ok(Linear {
            core,
            in_features,
            out_features,
        })
    }

    /// `reset_parameters()`: re-draws weight and bias.
    pub fn reset_parameters(&self) -> Result<()> {
        let w = self.core.param("weight")?;
        let b = self.core.param_opt("bias")?;
        reset_weight_and_bias(&w, b.as_ref())
    }
}

impl Module for Linear {
    fn core(&self) -> &ModuleCore {
        &self.core
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.core.param("weight")?;
        let b = self.core.param_opt("bias")?;
        linear(x, &w, b.as_ref())
    }

    fn extra_repr(&self) -> String {
        format!(
            "in_features={}, out_features={}, bias={}",
            self.in_features,
            self.out_features,
            py_bool(self.core.param_opt("bias").ok().flatten().is_some())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::module::ModuleExt;

    #[test]
    fn registration_repr_and_init_bounds() {
        crate::manual_seed(0);
        let l = Linear::new(784, 256, true).unwrap();
        // repr(nn.Linear(784, 256)) == 'Linear(in_features=784, out_features=256, bias=True)'
        assert_eq!(
            l.to_repr(),
            "Linear(in_features=784, out_features=256, bias=True)"
        );
        let names: Vec<String> = l.named_parameters().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["weight", "bias"]);
        let bound = 1.0 / 784f32.sqrt();
        let w = l.core().param("weight").unwrap();
        assert_eq!(w.shape(), [256, 784]);
        assert!(w.requires_grad());
        let wv = w.to_vec_f32();
        assert!(wv.iter().all(|v| v.abs() <= bound));
        assert!(wv.iter().any(|v| v.abs() > 0.9 * bound));
        let bv = l.core().param("bias").unwrap().to_vec_f32();
        assert!(bv.iter().all(|v| v.abs() <= bound));

        let nb = Linear::new(3, 2, false).unwrap();
        assert_eq!(
            nb.to_repr(),
            "Linear(in_features=3, out_features=2, bias=False)"
        );
        assert_eq!(nb.named_parameters().len(), 1);
        assert_eq!(nb.state_dict().keys(), ["weight"]);
    }

    #[test]
    fn forward_values_and_shape_error() {
        let l = Linear::new(3, 2, true).unwrap();
        let w = l.core().param("weight").unwrap();
        let b = l.core().param("bias").unwrap();
        crate::no_grad(|| {
            w.copy_(&Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6.], &[2, 3]).unwrap())
                .unwrap();
            b.copy_(&Tensor::from_vec(vec![0.5f32, -1.], &[2]).unwrap())
                .unwrap();
        });
        let x = Tensor::from_vec(vec![1f32, 0., -1., 2., 1., 0.], &[2, 3]).unwrap();
        let y = l.call(&x).unwrap();
        assert_eq!(y.to_vec_f32(), [-1.5, -3.0, 4.5, 12.0]);
        // 3-d input folds into rows
        let y3 = l.call(&x.reshape(&[1, 2, 3]).unwrap()).unwrap();
        assert_eq!(y3.shape(), [1, 2, 2]);
        let e = l
            .call(&Tensor::zeros(&[4, 5], DType::F32))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4, 5]") && e.contains("[2, 3]"), "{e}");
    }
}
