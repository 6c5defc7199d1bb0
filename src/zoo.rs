//! The reference zoo: the eight models of python/zoo.py written in Rust the
//! way a user writes their own modules — a struct holding a `ModuleCore`,
//! parts registered by name in the constructor, `forward` reaching them by
//! name through the core (so replacing a child by name changes what runs).
//! User-defined modules (Flatten, MyLinear, MyBatchNorm1d, Attention) are
//! plain `Module` impls next to the models.
//!
//! ```
//! use kiln::nn::prelude::*;
//! let m = kiln::zoo::build("simple_net").unwrap();
//! let (shape, _throughput_shape) = kiln::zoo::shapes("simple_net").unwrap();
//! let y = m.call(&kiln::Tensor::randn(&shape, kiln::DType::F32)).unwrap();
//! assert_eq!(y.shape(), [64, 10]);
//! ```

use crate::nn::prelude::*;
use crate::{DType, Error, Result, Tensor};
use std::sync::Arc;

macro_rules! core_fn {
    () => {
        fn core(&self) -> &ModuleCore {
            &self.core
        }
    };
}

fn boxed(m: impl Module) -> Option<Arc<dyn Module>> {
    Some(Arc::new(m))
}

// ------------------------------------------------------------------ SimpleNet

/// `784 -> 256 -> ReLU -> 10`: the canonical custom model.
pub struct SimpleNet {
    core: ModuleCore,
}

impl SimpleNet {
    pub fn new() -> Result<SimpleNet> {
        let core = ModuleCore::new("SimpleNet");
        core.add_module("layer1", boxed(Linear::new(784, 256, true)?))?;
        core.add_module("relu", boxed(ReLU::new()))?;
        core.add_module("layer2", boxed(Linear::new(256, 10, true)?))?;
        Ok(SimpleNet { core })
    }
}

impl Module for SimpleNet {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.core;
        let h = c.child("layer1")?.call(x)?;
        let h = c.child("relu")?.call(&h)?;
        c.child("layer2")?.call(&h)
    }
}

// ------------------------------------------------------------------ NetWithDropout

/// Linear -> BatchNorm1d -> ReLU -> Dropout -> Linear; train/eval differ.
pub struct NetWithDropout {
    core: ModuleCore,
}

impl NetWithDropout {
    pub fn new(p: f64) -> Result<NetWithDropout> {
        let core = ModuleCore::new("NetWithDropout");
        core.add_module("fc1", boxed(Linear::new(20, 50, true)?))?;
        core.add_module("bn1", boxed(BatchNorm1d::new(50)?))?;
        core.add_module("dropout", boxed(Dropout::new(p)?))?;
        core.add_module("fc2", boxed(Linear::new(50, 2, true)?))?;
        Ok(NetWithDropout { core })
    }
}

impl Module for NetWithDropout {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.core;
        let h = c.child("fc1")?.call(x)?;
        let h = c.child("bn1")?.call(&h)?.relu()?;
        let h = c.child("dropout")?.call(&h)?;
        c.child("fc2")?.call(&h)
    }
}

// ------------------------------------------------------------------ SeedCNN

fn conv(cin: usize, cout: usize, k: usize, stride: usize, padding: usize) -> Result<Conv2d> {
    Conv2d::with_options(
        cin,
        cout,
        k,
        Conv2dOptions {
            stride: stride.into(),
            padding: padding.into(),
            ..Default::default()
        },
    )
}

/// The Sequential conv stack: conv, max-pool, ReLU, BatchNorm2d, four times.
pub struct SeedCNN {
    core: ModuleCore,
}

impl SeedCNN {
    pub fn new() -> Result<SeedCNN> {
        let core = ModuleCore::new("SeedCNN");
        let net = crate::sequential![
            conv(1, 32, 5, 1, 1)?,
            MaxPool2d::new(2, Some(2.into())),
            ReLU::with_inplace(true),
            BatchNorm2d::new(32)?,
            conv(32, 64, 3, 1, 1)?,
            ReLU::with_inplace(true),
            BatchNorm2d::new(64)?,
            conv(64, 64, 3, 1, 1)?,
            MaxPool2d::new(2, Some(2.into())),
            ReLU::with_inplace(true),
            BatchNorm2d::new(64)?,
            conv(64, 128, 3, 1, 1)?,
            ReLU::with_inplace(true),
            BatchNorm2d::new(128)?,
        ];
        core.add_module("net", boxed(net))?;
        Ok(SeedCNN { core })
    }
}

impl Module for SeedCNN {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.core.child("net")?.call(x)
    }
}

// ------------------------------------------------------------------ TestNet

/// A user-written flatten: `x.view(x.size(0), -1)`.
pub struct Flatten {
    core: ModuleCore,
}

impl Flatten {
    #[allow(clippy::new_without_default)]
    pub fn new() -> Flatten {
        Flatten {
            core: ModuleCore::new("Flatten"),
        }
    }
}

impl Module for Flatten {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.view(&[x.size(0)? as isize, -1])
    }
}

/// A user-written Flatten module inside a Sequential.
pub struct TestNet {
    core: ModuleCore,
}

impl TestNet {
    pub fn new() -> Result<TestNet> {
        let core = ModuleCore::new("TestNet");
        let net = crate::sequential![
            conv(1, 16, 3, 1, 1)?,
            MaxPool2d::new(2, Some(2.into())),
            Flatten::new(),
            Linear::new(16 * 14 * 14, 10, true)?,
        ];
        core.add_module("net", boxed(net))?;
        Ok(TestNet { core })
    }
}

impl Module for TestNet {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.core.child("net")?.call(x)
    }
}

// ------------------------------------------------------------------ CustomStack

/// `x @ w.t() + b` with `w ~ randn(out, in) / sqrt(in)`, `b ~ 0.1 randn(out)`.
pub struct MyLinear {
    core: ModuleCore,
}

impl MyLinear {
    pub fn new(inp: usize, outp: usize) -> Result<MyLinear> {
        let core = ModuleCore::new("MyLinear");
        let w = Tensor::randn(&[outp, inp], DType::F32).mul_scalar((inp as f64).powf(-0.5))?;
        let b = Tensor::randn(&[outp], DType::F32).mul_scalar(0.1)?;
        core.register_parameter("w", Some(Parameter::new(w)?))?;
        core.register_parameter("b", Some(Parameter::new(b)?))?;
        Ok(MyLinear { core })
    }
}

impl Module for MyLinear {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.core.param("w")?;
        x.matmul(&w.t()?)?.add(&self.core.param("b")?)
    }
}

/// Hand-written batch norm whose training forward reassigns its registered
/// buffers (`self.running_mean = 0.9 * self.running_mean + 0.1 * mean`).
pub struct MyBatchNorm1d {
    core: ModuleCore,
}

impl MyBatchNorm1d {
    pub fn new(num_features: usize) -> Result<MyBatchNorm1d> {
        let n = num_features;
        let core = ModuleCore::new("MyBatchNorm1d");
        core.register_parameter(
            "weight",
            Some(Parameter::new(Tensor::ones(&[n], DType::F32))?),
        )?;
        core.register_parameter(
            "bias",
            Some(Parameter::new(Tensor::zeros(&[n], DType::F32))?),
        )?;
        core.register_buffer("running_mean", Some(Tensor::zeros(&[n], DType::F32)), true)?;
        core.register_buffer("running_var", Some(Tensor::ones(&[n], DType::F32)), true)?;
        Ok(MyBatchNorm1d { core })
    }
}

impl Module for MyBatchNorm1d {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.core;
        let x_hat = if c.is_training() {
            let mean = x.mean_dims(&[0], false)?;
            let var = x.var_dims(&[0], 0, false)?;
            let rm = c
                .buffer("running_mean")?
                .mul_scalar(0.9)?
                .add(&mean.detach().mul_scalar(0.1)?)?;
            let rv = c
                .buffer("running_var")?
                .mul_scalar(0.9)?
                .add(&var.detach().mul_scalar(0.1)?)?;
            let x_hat = x.sub(&mean)?.div(&var.add_scalar(1e-5)?.sqrt()?)?;
            // Assigned once the whole forward has succeeded.
            c.set_buffer("running_mean", Some(rm))?;
            c.set_buffer("running_var", Some(rv))?;
            x_hat
        } else {
            x.sub(&c.buffer("running_mean")?)?
                .div(&c.buffer("running_var")?.add_scalar(1e-5)?.sqrt()?)?
        };
        c.param("weight")?.mul(&x_hat)?.add(&c.param("bias")?)
    }
}

/// MyLinear -> MyBatchNorm1d -> LeakyReLU -> MyLinear -> Sigmoid.
pub struct CustomStack {
    core: ModuleCore,
}

impl CustomStack {
    pub fn new() -> Result<CustomStack> {
        let core = ModuleCore::new("CustomStack");
        let net = crate::sequential![
            MyLinear::new(20, 50)?,
            MyBatchNorm1d::new(50)?,
            LeakyReLU::new(0.01),
            MyLinear::new(50, 4)?,
            Sigmoid::new(),
        ];
        core.add_module("net", boxed(net))?;
        Ok(CustomStack { core })
    }
}

impl Module for CustomStack {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.core.child("net")?.call(x)
    }
}

// ------------------------------------------------------------------ ComplexNet

/// Two conv blocks and a linear head (3x10x10 input).
pub struct ComplexNet {
    core: ModuleCore,
}

impl ComplexNet {
    pub fn new() -> Result<ComplexNet> {
        let core = ModuleCore::new("ComplexNet");
        core.add_module(
            "layer1",
            boxed(crate::sequential![Conv2d::new(3, 16, 3)?, ReLU::new()]),
        )?;
        core.add_module(
            "layer2",
            boxed(crate::sequential![Conv2d::new(16, 32, 3)?, ReLU::new()]),
        )?;
        core.add_module("fc", boxed(Linear::new(32 * 6 * 6, 10, true)?))?;
        Ok(ComplexNet { core })
    }
}

impl Module for ComplexNet {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.core;
        let x = c.child("layer1")?.call(x)?;
        let x = c.child("layer2")?.call(&x)?;
        let x = x.view(&[-1, 32 * 6 * 6])?;
        c.child("fc")?.call(&x)
    }
}

// ------------------------------------------------------------------ TransformerBlock

/// Multi-head self-attention: one qkv projection, softmax(q k^T / sqrt(d)) v,
/// output projection.
pub struct Attention {
    core: ModuleCore,
    pub heads: usize,
}

impl Attention {
    pub fn new(dim: usize, heads: usize) -> Result<Attention> {
        let core = ModuleCore::new("Attention");
        core.add_module("qkv", boxed(Linear::new(dim, 3 * dim, true)?))?;
        core.add_module("proj", boxed(Linear::new(dim, dim, true)?))?;
        Ok(Attention { core, heads })
    }
}

impl Module for Attention {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let s = x.shape();
        if s.len() != 3 {
            return Err(Error::op(
                "Attention",
                format!("expected a [batch, tokens, channels] input, got shape {s:?}"),
            ));
        }
        let (b, t, c) = (s[0] as isize, s[1] as isize, s[2] as isize);
        let h = self.heads as isize;
        let qkv = self
            .core
            .child("qkv")?
            .call(x)?
            .view(&[b, t, 3, h, c / h])?
            .permute(&[2, 0, 3, 1, 4])?;
        let (q, k, v) = (qkv.select(0, 0)?, qkv.select(0, 1)?, qkv.select(0, 2)?);
        let att = q
            .matmul(&k.transpose(-2, -1)?)?
            .mul_scalar(((c / h) as f64).powf(-0.5))?;
        let att = att.softmax(-1)?;
        let y = att.matmul(&v)?.transpose(1, 2)?.reshape(&[b, t, c])?;
        self.core.child("proj")?.call(&y)
    }
}

/// Pre-norm block: LayerNorm, attention, LayerNorm, GELU MLP, residuals.
pub struct TransformerBlock {
    core: ModuleCore,
}

impl TransformerBlock {
    pub fn new(dim: usize, heads: usize) -> Result<TransformerBlock> {
        let core = ModuleCore::new("TransformerBlock");
        core.add_module("ln1", boxed(LayerNorm::new(&[dim])?))?;
        core.add_module("attn", boxed(Attention::new(dim, heads)?))?;
        core.add_module("ln2", boxed(LayerNorm::new(&[dim])?))?;
        let mlp = crate::sequential![
            Linear::new(dim, 4 * dim, true)?,
            GELU::new(),
            Linear::new(4 * dim, dim, true)?,
        ];
        core.add_module("mlp", boxed(mlp))?;
        Ok(TransformerBlock { core })
    }
}

impl Module for TransformerBlock {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.core;
        let a = c.child("attn")?.call(&c.child("ln1")?.call(x)?)?;
        let x = x.add(&a)?;
        let m = c.child("mlp")?.call(&c.child("ln2")?.call(&x)?)?;
        x.add(&m)
    }
}

// ------------------------------------------------------------------ PointwiseChain

/// Many elementwise ops with one learnable scale and one buffer.
pub struct PointwiseChain {
    core: ModuleCore,
}

impl PointwiseChain {
    pub fn new(width: usize) -> Result<PointwiseChain> {
        let core = ModuleCore::new("PointwiseChain");
        let scale = Tensor::linspace(0.5, 1.5, width, DType::F32)?;
        core.register_parameter("scale", Some(Parameter::new(scale)?))?;
        let shift = Tensor::linspace(-0.1, 0.1, width, DType::F32)?;
        core.register_buffer("shift", Some(shift), true)?;
        Ok(PointwiseChain { core })
    }
}

impl Module for PointwiseChain {
    core_fn!();
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.core;
        let y = x.mul(&c.param("scale")?)?.add(&c.buffer("shift")?)?;
        let y = y
            .gelu()?
            .mul(&y.sigmoid()?)?
            .add(&y.mul_scalar(0.5)?.tanh()?)?;
        let y = y
            .abs()?
            .neg()?
            .exp()?
            .add(&y.sub_scalar(0.1)?.relu()?.mul_scalar(0.5)?)?;
        y.mul(&y)?.add_scalar(1.0)?.sqrt()?.sub_scalar(1.0)
    }
}

// ------------------------------------------------------------------ registry

/// (name, fixture/latency input shape, throughput input shape), in zoo.py's order.
const ZOO: &[(&str, &[usize], &[usize])] = &[
    ("simple_net", &[64, 784], &[4096, 784]),
    ("net_with_dropout", &[10, 20], &[8192, 20]),
    ("seed_cnn", &[8, 1, 28, 28], &[128, 1, 28, 28]),
    ("test_net", &[8, 1, 28, 28], &[256, 1, 28, 28]),
    ("custom_stack", &[16, 20], &[8192, 20]),
    ("complex_net", &[8, 3, 10, 10], &[1024, 3, 10, 10]),
    ("transformer_block", &[2, 16, 256], &[8, 128, 256]),
    ("pointwise_chain", &[64, 1024], &[4096, 1024]),
];

const NAMES: [&str; 8] = [
    "simple_net",
    "net_with_dropout",
    "seed_cnn",
    "test_net",
    "custom_stack",
    "complex_net",
    "transformer_block",
    "pointwise_chain",
];

/// The zoo's model names, in zoo.py's order.
pub fn names() -> &'static [&'static str] {
    &NAMES
}

fn unknown(name: &str) -> Error {
    Error::Lookup(format!(
        "unknown zoo model `{name}` (known: {})",
        NAMES.join(", ")
    ))
}

/// A fresh model, initialized from the global generator, as zoo.py's
/// constructors (`net_with_dropout` with p = 0.5, `transformer_block` with
/// dim 256 and 4 heads, `pointwise_chain` with width 1024).
pub fn build(name: &str) -> Result<Arc<dyn Module>> {
    Ok(match name {
        "simple_net" => Arc::new(SimpleNet::new()?),
        "net_with_dropout" => Arc::new(NetWithDropout::new(0.5)?),
        "seed_cnn" => Arc::new(SeedCNN::new()?),
        "test_net" => Arc::new(TestNet::new()?),
        "custom_stack" => Arc::new(CustomStack::new()?),
        "complex_net" => Arc::new(ComplexNet::new()?),
        "transformer_block" => Arc::new(TransformerBlock::new(256, 4)?),
        "pointwise_chain" => Arc::new(PointwiseChain::new(1024)?),
        other => return Err(unknown(other)),
    })
}

/// (fixture/latency input shape, throughput input shape) of a zoo model.
pub fn shapes(name: &str) -> Result<(Vec<usize>, Vec<usize>)> {
    ZOO.iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, a, b)| (a.to_vec(), b.to_vec()))
        .ok_or_else(|| unknown(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_model_runs_at_its_shape() {
        assert_eq!(names().len(), ZOO.len());
        for (i, name) in names().iter().enumerate() {
            assert_eq!(ZOO[i].0, *name);
            let m = build(name).unwrap();
            let (shape, _) = shapes(name).unwrap();
            m.eval();
            let y = m.call(&Tensor::randn(&shape, DType::F32)).unwrap();
            assert_eq!(y.shape()[0], shape[0], "{name}");
        }
        assert!(build("nope").is_err());
        assert!(shapes("nope").is_err());
    }
}
