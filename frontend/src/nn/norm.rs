//! Normalization layers: `nn.BatchNorm1d`, `nn.BatchNorm2d` (PyTorch's
//! `_BatchNorm`: affine weight/bias, running_mean/running_var and the I64
//! 0-d `num_batches_tracked` buffer, momentum None = cumulative moving
//! average) and `nn.LayerNorm`. Registration order, input-dim checks and
//! `extra_repr` follow PyTorch (the version that wrote tests/fixtures, whose
//! BatchNorm and LayerNorm print a `bias=` flag).

use super::core::ModuleCore;
use super::layers::Parameter;
use super::module::{py_bool, py_float, Module};
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::ops::nn::{batch_norm, layer_norm};
use crate::tensor::Tensor;
use kiln_ir::DType;

/// `_BatchNorm`'s keyword arguments with PyTorch's defaults (eps 1e-5,
/// momentum Some(0.1), affine, bias, track_running_stats). `bias` is the
/// newer PyTorch's flag (printed by its `extra_repr`, as in the fixtures):
/// with `affine` and not `bias`, the layer has a weight and no bias.
#[derive(Clone, Copy, Debug)]
pub struct BatchNormOptions {
    pub eps: f64,
    /// `None`: the running stats are the cumulative average over
    /// `num_batches_tracked` batches.
    pub momentum: Option<f64>,
    pub affine: bool,
    pub bias: bool,
    pub track_running_stats: bool,
}

impl Default for BatchNormOptions {
    fn default() -> Self {
        BatchNormOptions {
            eps: 1e-5,
            momentum: Some(0.1),
            affine: true,
            bias: true,
            track_running_stats: true,
        }
    }
}

/// The state and forward shared by BatchNorm1d and BatchNorm2d.
struct BatchNormBase {
    core: ModuleCore,
    num_features: usize,
    o: BatchNormOptions,
}

impl BatchNormBase {
    fn new(type_name: &str, num_features: usize, o: BatchNormOptions) -> Result<BatchNormBase> {
        let core = ModuleCore::new(type_name);
        let c = num_features;
        if o.affine {
            core.register_parameter(
                "weight",
                Some(Parameter::new(Tensor::ones(&[c], DType::F32))?),
            )?;
            let b = if o.bias {
                Some(Parameter::new(Tensor::zeros(&[c], DType::F32))?)
            } else {
                None
            };
            core.register_parameter("bias", b)?;
        } else {
            core.register_parameter("weight", None)?;
            core.register_parameter("bias", None)?;
        }
        if o.track_running_stats {
            core.register_buffer("running_mean", Some(Tensor::zeros(&[c], DType::F32)), true)?;
            core.register_buffer("running_var", Some(Tensor::ones(&[c], DType::F32)), true)?;
            core.register_buffer("num_batches_tracked", Some(Tensor::scalar(0i64)), true)?;
        } else {
            core.register_buffer("running_mean", None, true)?;
            core.register_buffer("running_var", None, true)?;
            core.register_buffer("num_batches_tracked", None, true)?;
        }
        Ok(BatchNormBase {
            core,
            num_features,
            o,
        })
    }

    /// `_BatchNorm.forward` after the dim check.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.core;
        let training = c.is_training();
        let rm = c.buffer_opt("running_mean")?;
        let rv = c.buffer_opt("running_var")?;
        let nbt = c.buffer_opt("num_batches_tracked")?;
        let mut factor = self.o.momentum.unwrap_or(0.0);
        let count_batch = training && self.o.track_running_stats && nbt.is_some();
        if count_batch && self.o.momentum.is_none() {
            // PyTorch increments first, then uses 1 / num_batches_tracked.
            let n = nbt.as_ref().unwrap().item()? + 1.0;
            factor = 1.0 / n;
        }
        let bn_training = training || (rm.is_none() && rv.is_none());
        let use_stats = !training || self.o.track_running_stats;
        let (rm, rv) = if use_stats { (rm, rv) } else { (None, None) };
        let w = c.param_opt("weight")?;
        let b = c.param_opt("bias")?;
        let y = batch_norm(
            x,
            rm.as_ref(),
            rv.as_ref(),
            w.as_ref(),
            b.as_ref(),
            bn_training,
            factor,
            self.o.eps,
        )?;
        // Counted after a successful forward, so a rejected input leaves the
        // module's state as it was (PyTorch counts before the call).
        if count_batch {
            let nbt = nbt.unwrap();
            no_grad(|| nbt.add_(&Tensor::scalar(1i64)).map(|_| ()))?;
        }
        Ok(y)
    }

    fn extra_repr(&self) -> String {
        format!(
            "{}, eps={}, momentum={}, affine={}, bias={}, track_running_stats={}",
            self.num_features,
            py_float(self.o.eps),
            self.o
                .momentum
                .map(py_float)
                .unwrap_or_else(|| "None".into()),
            py_bool(self.o.affine),
            py_bool(self.o.bias),
            py_bool(self.o.track_running_stats)
        )
    }

    /// `reset_running_stats()`.
    fn reset_running_stats(&self) -> Result<()> {
        no_grad(|| -> Result<()> {
            if let Some(t) = self.core.buffer_opt("running_mean")? {
                t.zero_()?;
            }
            if let Some(t) = self.core.buffer_opt("running_var")? {
                t.fill_(1.0)?;
            }
            if let Some(t) = self.core.buffer_opt("num_batches_tracked")? {
                t.zero_()?;
            }
            Ok(())
        })
    }
}

macro_rules! batch_norm_layer {
    ($name:ident, $doc:literal, $check:expr) => {
        #[doc = $doc]
        pub struct $name {
            base: BatchNormBase,
        }

        impl $name {
            /// With PyTorch's defaults (eps 1e-5, momentum 0.1, affine, tracking).
            pub fn new(num_features: usize) -> Result<$name> {
                $name::with_options(num_features, BatchNormOptions::default())
            }

            pub fn with_options(num_features: usize, o: BatchNormOptions) -> Result<$name> {
                Ok($name {
                    base: BatchNormBase::new(stringify!($name), num_features, o)?,
                })
            }

            pub fn num_features(&self) -> usize {
                self.base.num_features
            }

            pub fn options(&self) -> BatchNormOptions {
                self.base.o
            }

            /// `reset_running_stats()`: mean 0, var 1, count 0.
            pub fn reset_running_stats(&self) -> Result<()> {
                self.base.reset_running_stats()
            }
        }

        impl Module for $name {
            fn core(&self) -> &ModuleCore {
                &self.base.core
            }

            fn forward(&self, x: &Tensor) -> Result<Tensor> {
                let check: fn(usize) -> Option<&'static str> = $check;
                if let Some(expected) = check(x.dim()) {
                    return Err(Error::op(
                        stringify!($name),
                        format!(
                            "expected {expected} input (got {}D input): shape {:?}",
                            x.dim(),
                            x.shape()
                        ),
                    ));
                }
                self.base.forward(x)
            }

            fn extra_repr(&self) -> String {
                self.base.extra_repr()
            }
        }
    };
}

batch_norm_layer!(
    BatchNorm1d,
    "`nn.BatchNorm1d(num_features)`: input `[N, C]` or `[N, C, L]`.",
    |d| if d == 2 || d == 3 {
        None
    } else {
        Some("2D or 3D")
    }
);

batch_norm_layer!(
    BatchNorm2d,
    "`nn.BatchNorm2d(num_features)`: input `[N, C, H, W]`.",
    |d| if d == 4 { None } else { Some("4D") }
);

/// Python's `str(tuple)`: `(256,)`, `(2, 3)`.
pub fn py_tuple(v: &[usize]) -> String {
    match v {
        [one] => format!("({one},)"),
        _ => format!(
            "({})",
            v.iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `nn.LayerNorm(normalized_shape, eps=1e-5, elementwise_affine=True,
/// bias=True)`.
pub struct LayerNorm {
    core: ModuleCore,
    pub normalized_shape: Vec<usize>,
    pub eps: f64,
    pub elementwise_affine: bool,
    /// The `bias` flag as given (printed by `extra_repr`).
    pub bias: bool,
}

impl LayerNorm {
    /// `nn.LayerNorm(normalized_shape)` with the defaults.
    pub fn new(normalized_shape: &[usize]) -> Result<LayerNorm> {
        LayerNorm::with_options(normalized_shape, 1e-5, true, true)
    }

    pub fn with_options(
        normalized_shape: &[usize],
        eps: f64,
        elementwise_affine: bool,
        bias: bool,
    ) -> Result<LayerNorm> {
        if normalized_shape.is_empty() {
            return Err(Error::op("LayerNorm", "normalized_shape must not be empty"));
        }
        let core = ModuleCore::new("LayerNorm");
        if elementwise_affine {
            core.register_parameter(
                "weight",
                Some(Parameter::new(Tensor::ones(normalized_shape, DType::F32))?),
            )?;
            let b = if bias {
                Some(Parameter::new(Tensor::zeros(normalized_shape, DType::F32))?)
            } else {
                None
            };
            core.register_parameter("bias", b)?;
        } else {
            core.register_parameter("weight", None)?;
            core.register_parameter("bias", None)?;
        }
        Ok(LayerNorm {
            core,
            normalized_shape: normalized_shape.to_vec(),
            eps,
            elementwise_affine,
            bias,
        })
    }
}

impl Module for LayerNorm {
    fn core(&self) -> &ModuleCore {
        &self.core
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.core.param_opt("weight")?;
        let b = self.core.param_opt("bias")?;
        layer_norm(x, &self.normalized_shape, w.as_ref(), b.as_ref(), self.eps)
    }

    fn extra_repr(&self) -> String {
        format!(
            "{}, eps={}, elementwise_affine={}, bias={}",
            py_tuple(&self.normalized_shape),
            py_float(self.eps),
            py_bool(self.elementwise_affine),
            py_bool(self.bias)
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::module::ModuleExt;

    #[test]
    fn batch_norm_registry_and_repr() {
        let bn = BatchNorm2d::new(32).unwrap();
        assert_eq!(
            bn.to_repr(),
            "BatchNorm2d(32, eps=1e-05, momentum=0.1, affine=True, bias=True, track_running_stats=True)"
        );
        assert_eq!(
            bn.state_dict().keys(),
            [
                "weight",
                "bias",
                "running_mean",
                "running_var",
                "num_batches_tracked"
            ]
        );
        let nbt = bn.core().buffer("num_batches_tracked").unwrap();
        assert_eq!(nbt.dtype(), DType::I64);
        assert_eq!(nbt.shape(), Vec::<usize>::new());
        let o = BatchNormOptions {
            momentum: None,
            affine: false,
            track_running_stats: false,
            ..Default::default()
        };
        let bn1 = BatchNorm1d::with_options(5, o).unwrap();
        assert_eq!(
            bn1.to_repr(),
            "BatchNorm1d(5, eps=1e-05, momentum=None, affine=False, bias=True, track_running_stats=False)"
        );
        assert!(bn1.state_dict().is_empty());
        // no running stats: batch statistics in eval too
        bn1.eval();
        let x = Tensor::from_vec(vec![1f32, 2., 3., 4., 5., 6., 7., 8., 9., 10.], &[2, 5]).unwrap();
        let y = bn1.call(&x).unwrap().to_vec_f32();
        assert!(
            (y[0] + 1.0).abs() < 1e-3 && (y[5] - 1.0).abs() < 1e-3,
            "{y:?}"
        );
    }

    #[test]
    fn batch_norm_dim_checks_and_counting() {
        let bn = BatchNorm1d::new(3).unwrap();
        let e = bn
            .call(&Tensor::zeros(&[2, 3, 4, 5], DType::F32))
            .unwrap_err()
            .to_string();
        // PyTorch: ValueError: expected 2D or 3D input (got 4D input)
        assert!(
            e.contains("expected 2D or 3D input (got 4D input): shape [2, 3, 4, 5]"),
            "{e}"
        );
        let e2 = BatchNorm2d::new(3)
            .unwrap()
            .call(&Tensor::zeros(&[2, 3], DType::F32))
            .unwrap_err()
            .to_string();
        assert!(e2.contains("expected 4D input (got 2D input)"), "{e2}");
        let x = Tensor::from_vec(vec![0f32, 1., 2., 2., 3., 6.], &[2, 3]).unwrap();
        bn.call(&x).unwrap();
        bn.call(&x).unwrap();
        assert_eq!(
            bn.core()
                .buffer("num_batches_tracked")
                .unwrap()
                .item()
                .unwrap(),
            2.0
        );
        // momentum 0.1 twice: running_mean = (1 - 0.9^2) * batch mean
        let rm = bn.core().buffer("running_mean").unwrap().to_vec_f32();
        assert!((rm[2] - 0.19 * 4.0).abs() < 1e-6, "{rm:?}");
        // wrong channels: error, nothing counted
        assert!(bn.call(&Tensor::zeros(&[2, 4], DType::F32)).is_err());
        assert_eq!(
            bn.core()
                .buffer("num_batches_tracked")
                .unwrap()
                .item()
                .unwrap(),
            2.0
        );
        bn.eval();
        bn.call(&x).unwrap();
        assert_eq!(
            bn.core()
                .buffer("num_batches_tracked")
                .unwrap()
                .item()
                .unwrap(),
            2.0
        );
    }

    #[test]
    fn cumulative_moving_average() {
        // torch: bn = nn.BatchNorm1d(1, momentum=None); two batches -> mean of batch means
        let bn = BatchNorm1d::with_options(
            1,
            BatchNormOptions {
                momentum: None,
                ..Default::default()
            },
        )
        .unwrap();
        bn.call(&Tensor::from_vec(vec![1f32, 3.], &[2, 1]).unwrap())
            .unwrap();
        bn.call(&Tensor::from_vec(vec![5f32, 7.], &[2, 1]).unwrap())
            .unwrap();
        let rm = bn.core().buffer("running_mean").unwrap().item().unwrap();
        assert!((rm - 4.0).abs() < 1e-6, "{rm}");
        // unbiased variance of each batch is 2
        let rv = bn.core().buffer("running_var").unwrap().item().unwrap();
        assert!((rv - 2.0).abs() < 1e-6, "{rv}");
    }

    #[test]
    fn layer_norm_repr_and_bias_flag() {
        assert_eq!(
            LayerNorm::new(&[256]).unwrap().to_repr(),
            "LayerNorm((256,), eps=1e-05, elementwise_affine=True, bias=True)"
        );
        let ln = LayerNorm::with_options(&[2, 3], 1e-6, true, false).unwrap();
        assert_eq!(
            ln.to_repr(),
            "LayerNorm((2, 3), eps=1e-06, elementwise_affine=True, bias=False)"
        );
        assert_eq!(ln.state_dict().keys(), ["weight"]);
        let e = ln
            .call(&Tensor::zeros(&[4, 3, 2], DType::F32))
            .unwrap_err()
            .to_string();
        assert!(e.contains("[4, 3, 2]"), "{e}");
    }
}
