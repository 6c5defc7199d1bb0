//! Layers that need no kernels beyond the elementwise and view ops:
//! `Parameter` (the nn.Parameter constructor), Identity, ReLU, LeakyReLU,
//! Sigmoid, Tanh, GELU, Flatten, Dropout. Each `extra_repr` is PyTorch's
//! text. `ReLU(inplace=True)` computes out of place (same values; the input
//! tensor is not overwritten) — the flag only shows in `repr`.

use super::core::ModuleCore;
use super::module::{py_bool, py_float, Module};
use crate::error::{Error, Result};
use crate::tensor::{normalize_dim, Tensor};
use parking_lot::Mutex;

/// `nn.Parameter(t)`: a new leaf tensor object sharing `t`'s storage, with
/// `requires_grad = true`.
pub struct Parameter;

impl Parameter {
    #[allow(clippy::new_ret_no_self)]
    pub fn new(t: Tensor) -> Result<Tensor> {
        Parameter::with_requires_grad(t, true)
    }

    /// `nn.Parameter(t, requires_grad)`.
    pub fn with_requires_grad(t: Tensor, requires_grad: bool) -> Result<Tensor> {
        t.detach().requires_grad_(requires_grad)
    }
}

macro_rules! simple_core {
    () => {
        fn core(&self) -> &ModuleCore {
            &self.core
        }
    };
}

/// `nn.Identity()`: returns its input (the same tensor object).
pub struct Identity {
    core: ModuleCore,
}

impl Identity {
    pub fn new() -> Identity {
        Identity {
            core: ModuleCore::new("Identity"),
        }
    }
}

impl Default for Identity {
    fn default() -> Self {
        Identity::new()
    }
}

impl Module for Identity {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

/// `nn.ReLU(inplace=False)`.
pub struct ReLU {
    core: ModuleCore,
    pub inplace: bool,
}

impl ReLU {
    pub fn new() -> ReLU {
        ReLU::with_inplace(false)
    }
    /// `nn.ReLU(True)`.
    pub fn with_inplace(inplace: bool) -> ReLU {
        ReLU {
            core: ModuleCore::new("ReLU"),
            inplace,
        }
    }
}

impl Default for ReLU {
    fn default() -> Self {
        ReLU::new()
    }
}

impl Module for ReLU {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.relu()
    }
    fn extra_repr(&self) -> String {
        if self.inplace {
            "inplace=True".into()
        } else {
            String::new()
        }
    }
}

/// `nn.LeakyReLU(negative_slope=0.01, inplace=False)`.
pub struct LeakyReLU {
    core: ModuleCore,
    pub negative_slope: f64,
    pub inplace: bool,
}

impl LeakyReLU {
    pub fn new(negative_slope: f64) -> LeakyReLU {
        LeakyReLU {
            core: ModuleCore::new("LeakyReLU"),
            negative_slope,
            inplace: false,
        }
    }
}

impl Default for LeakyReLU {
    fn default() -> Self {
        LeakyReLU::new(0.01)
    }
}

impl Module for LeakyReLU {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.leaky_relu(self.negative_slope)
    }
    fn extra_repr(&self) -> String {
        let inplace = if self.inplace { ", inplace=True" } else { "" };
        format!("negative_slope={}{inplace}", py_float(self.negative_slope))
    }
}

/// `nn.Sigmoid()`.
pub struct Sigmoid {
    core: ModuleCore,
}

impl Sigmoid {
    pub fn new() -> Sigmoid {
        Sigmoid {
            core: ModuleCore::new("Sigmoid"),
        }
    }
}

impl Default for Sigmoid {
    fn default() -> Self {
        Sigmoid::new()
    }
}

impl Module for Sigmoid {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.sigmoid()
    }
}

/// `nn.Tanh()`.
pub struct Tanh {
    core: ModuleCore,
}

impl Tanh {
    pub fn new() -> Tanh {
        Tanh {
            core: ModuleCore::new("Tanh"),
        }
    }
}

impl Default for Tanh {
    fn default() -> Self {
        Tanh::new()
    }
}

impl Module for Tanh {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.tanh()
    }
}

/// `nn.GELU(approximate='none' | 'tanh')`.
pub struct GELU {
    core: ModuleCore,
    pub approximate: String,
}

impl GELU {
    pub fn new() -> GELU {
        GELU {
            core: ModuleCore::new("GELU"),
            approximate: "none".into(),
        }
    }

    /// `nn.GELU(approximate=...)`; only "none" and "tanh" exist.
    pub fn with_approximate(approximate: &str) -> Result<GELU> {
        if approximate != "none" && approximate != "tanh" {
            return Err(Error::op(
                "GELU",
                format!("approximate argument must be either none or tanh (got '{approximate}')"),
            ));
        }
        Ok(GELU {
            core: ModuleCore::new("GELU"),
            approximate: approximate.into(),
        })
    }
}

impl Default for GELU {
    fn default() -> Self {
        GELU::new()
    }
}

impl Module for GELU {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.approximate == "tanh" {
            x.gelu_tanh()
        } else {
            x.gelu()
        }
    }
    fn extra_repr(&self) -> String {
        format!("approximate='{}'", self.approximate)
    }
}

/// `nn.Flatten(start_dim=1, end_dim=-1)`.
pub struct Flatten {
    core: ModuleCore,
    pub start_dim: isize,
    pub end_dim: isize,
}

impl Flatten {
    pub fn new() -> Flatten {
        Flatten::with_dims(1, -1)
    }
    pub fn with_dims(start_dim: isize, end_dim: isize) -> Flatten {
        Flatten {
            core: ModuleCore::new("Flatten"),
            start_dim,
            end_dim,
        }
    }
}

impl Default for Flatten {
    fn default() -> Self {
        Flatten::new()
    }
}

/// `torch.flatten(x, start_dim, end_dim)` (a view when the strides allow).
pub fn flatten(x: &Tensor, start_dim: isize, end_dim: isize) -> Result<Tensor> {
    let shape = x.shape();
    if shape.is_empty() {
        return x.reshape(&[1]);
    }
    let s = normalize_dim(start_dim, shape.len(), "flatten")?;
    let e = normalize_dim(end_dim, shape.len(), "flatten")?;
    if s > e {
        return Err(Error::op(
            "flatten",
            "flatten() has invalid args: start_dim cannot come after end_dim",
        ));
    }
    let mut new: Vec<isize> = shape[..s].iter().map(|&d| d as isize).collect();
    new.push(shape[s..=e].iter().product::<usize>() as isize);
    new.extend(shape[e + 1..].iter().map(|&d| d as isize));
    x.reshape(&new)
}

impl Module for Flatten {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        flatten(x, self.start_dim, self.end_dim)
    }
    fn extra_repr(&self) -> String {
        format!("start_dim={}, end_dim={}", self.start_dim, self.end_dim)
    }
}

/// `nn.Dropout(p=0.5, inplace=False)`: in training mode zeroes each element
/// with probability `p` (mask from the global generator) and scales the rest
/// by `1/(1-p)`; identity in eval mode or with p = 0.
pub struct Dropout {
    core: ModuleCore,
    p: Mutex<f64>,
    pub inplace: bool,
}

fn check_p(p: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::op(
            "Dropout",
            format!(
                "dropout probability has to be between 0 and 1, but got {}",
                py_float(p)
            ),
        ));
    }
    Ok(())
}

impl Dropout {
    pub fn new(p: f64) -> Result<Dropout> {
        check_p(p)?;
        Ok(Dropout {
            core: ModuleCore::new("Dropout"),
            p: Mutex::new(p),
            inplace: false,
        })
    }

    pub fn p(&self) -> f64 {
        *self.p.lock()
    }

    /// `dropout.p = p`.
    pub fn set_p(&self, p: f64) -> Result<()> {
        check_p(p)?;
        *self.p.lock() = p;
        Ok(())
    }
}

/// `F.dropout(x, p, training)`.
pub fn dropout(x: &Tensor, p: f64, training: bool) -> Result<Tensor> {
    crate::ops::nn::dropout(x, p, training)
}

impl Module for Dropout {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        dropout(x, self.p(), self.core.is_training())
    }
    fn extra_repr(&self) -> String {
        format!(
            "p={}, inplace={}",
            py_float(self.p()),
            py_bool(self.inplace)
        )
    }
}

/// `nn.Softmax(dim)`: `x.softmax(dim)`.
pub struct Softmax {
    core: ModuleCore,
    pub dim: isize,
}

impl Softmax {
    pub fn new(dim: isize) -> Softmax {
        Softmax {
            core: ModuleCore::new("Softmax"),
            dim,
        }
    }
}

impl Module for Softmax {
    simple_core!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.softmax(self.dim)
    }
    fn extra_repr(&self) -> String {
        format!("dim={}", self.dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::module::ModuleExt;
    use kiln_ir::DType;

    #[test]
    fn softmax_module() {
        let m = Softmax::new(1);
        // repr(nn.Softmax(dim=1)) == 'Softmax(dim=1)'
        assert_eq!(m.to_repr(), "Softmax(dim=1)");
        let x = Tensor::from_vec(vec![1f32, 2., 3., 0., 0., 0.], &[2, 3]).unwrap();
        let y = m.call(&x).unwrap().to_vec_f32();
        assert!((y[0] + y[1] + y[2] - 1.0).abs() < 1e-6);
        assert!((y[3] - 1.0 / 3.0).abs() < 1e-6);
        assert!(y[2] > y[1] && y[1] > y[0]);
        assert!(Softmax::new(2).call(&x).is_err());
        assert!(m.call(&Tensor::zeros(&[2, 3], DType::I64)).is_err());
    }
}
