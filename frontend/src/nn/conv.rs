//! `nn.Conv2d` and `nn.ConvTranspose2d` (zeros padding), with PyTorch's
//! constructor checks, default initialization (`kaiming_uniform_(a=sqrt(5))`,
//! bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in))), parameter order (weight,
//! bias) and `_ConvNd.extra_repr` text. Options are a struct with PyTorch's
//! defaults: `Conv2d::with_options(1, 32, 5, Conv2dOptions { padding: 1.into(), ..Default::default() })`.
//!
//! `Size2` holds an argument given as an int or a pair, as Python's `2` vs
//! `(2, 3)`; it remembers which, because pooling layers print it as given.

use super::core::ModuleCore;
use super::layers::Parameter;
use super::linear::reset_weight_and_bias;
use super::module::Module;
use crate::error::{Error, Result};
use crate::ops::conv::{conv2d, conv_transpose2d};
use crate::tensor::Tensor;
use kiln_cpu::conv::Conv2dParams;
use kiln_ir::DType;
use std::fmt;

/// An int-or-pair argument (`kernel_size=2` or `kernel_size=(2, 3)`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size2 {
    One(usize),
    Two(usize, usize),
}

impl Size2 {
    /// PyTorch's `_pair`: `(n, n)` for an int.
    pub fn pair(self) -> (usize, usize) {
        match self {
            Size2::One(n) => (n, n),
            Size2::Two(a, b) => (a, b),
        }
    }

    /// The `_pair` form, printed as a tuple: `(2, 2)`.
    pub fn as_tuple(self) -> Size2 {
        let (a, b) = self.pair();
        Size2::Two(a, b)
    }
}

impl From<usize> for Size2 {
    fn from(n: usize) -> Size2 {
        Size2::One(n)
    }
}

impl From<(usize, usize)> for Size2 {
    fn from((a, b): (usize, usize)) -> Size2 {
        Size2::Two(a, b)
    }
}

impl fmt::Display for Size2 {
    /// Python's `str`: `2` or `(2, 3)`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Size2::One(n) => write!(f, "{n}"),
            Size2::Two(a, b) => write!(f, "({a}, {b})"),
        }
    }
}

/// `nn.Conv2d`'s keyword arguments with PyTorch's defaults (stride 1,
/// padding 0, dilation 1, groups 1, bias true).
#[derive(Clone, Copy, Debug)]
pub struct Conv2dOptions {
    pub stride: Size2,
    pub padding: Size2,
    pub dilation: Size2,
    pub groups: usize,
    pub bias: bool,
}

impl Default for Conv2dOptions {
    fn default() -> Self {
        Conv2dOptions {
            stride: Size2::One(1),
            padding: Size2::One(0),
            dilation: Size2::One(1),
            groups: 1,
            bias: true,
        }
    }
}

/// `nn.ConvTranspose2d`'s keyword arguments with PyTorch's defaults.
#[derive(Clone, Copy, Debug)]
pub struct ConvTranspose2dOptions {
    pub stride: Size2,
    pub padding: Size2,
    pub output_padding: Size2,
    pub groups: usize,
    pub bias: bool,
    pub dilation: Size2,
}

impl Default for ConvTranspose2dOptions {
    fn default() -> Self {
        ConvTranspose2dOptions {
            stride: Size2::One(1),
            padding: Size2::One(0),
            output_padding: Size2::One(0),
            groups: 1,
            bias: true,
            dilation: Size2::One(1),
        }
    }
}

/// The hyper-parameters both conv layers share (all in `_pair` form).
#[derive(Clone, Copy, Debug)]
struct ConvSpec {
    in_channels: usize,
    out_channels: usize,
    kernel_size: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
    output_padding: (usize, usize),
    groups: usize,
}

impl ConvSpec {
    fn params(&self) -> Conv2dParams {
        Conv2dParams {
            stride: self.stride,
            padding: self.padding,
            dilation: self.dilation,
            groups: self.groups,
        }
    }

    /// `_ConvNd.__init__`'s checks.
    fn check(&self, layer: &str) -> Result<()> {
        if self.groups == 0 {
            return Err(Error::op(layer, "groups must be a positive integer"));
        }
        if !self.in_channels.is_multiple_of(self.groups) {
            return Err(Error::op(layer, "in_channels must be divisible by groups"));
        }
        if !self.out_channels.is_multiple_of(self.groups) {
            return Err(Error::op(layer, "out_channels must be divisible by groups"));
        }
        let (s, d, k) = (self.stride, self.dilation, self.kernel_size);
        if s.0 == 0 || s.1 == 0 || d.0 == 0 || d.1 == 0 || k.0 == 0 || k.1 == 0 {
            return Err(Error::op(
                layer,
                format!(
                    "kernel_size, stride and dilation must be positive (got kernel_size={k:?}, stride={s:?}, dilation={d:?})"
                ),
            ));
        }
        Ok(())
    }

    /// `_ConvNd.extra_repr`.
    fn extra_repr(&self, has_bias: bool) -> String {
        let t = |p: (usize, usize)| Size2::Two(p.0, p.1).to_string();
        let mut s = format!(
            "{}, {}, kernel_size={}, stride={}",
            self.in_channels,
            self.out_channels,
            t(self.kernel_size),
            t(self.stride)
        );
        if self.padding != (0, 0) {
            s += &format!(", padding={}", t(self.padding));
        }
        if self.dilation != (1, 1) {
            s += &format!(", dilation={}", t(self.dilation));
        }
        if self.output_padding != (0, 0) {
            s += &format!(", output_padding={}", t(self.output_padding));
        }
        if self.groups != 1 {
            s += &format!(", groups={}", self.groups);
        }
        if !has_bias {
            s += ", bias=False";
        }
        s
    }
}

/// Registers weight (of `wshape`) and bias (`[out_channels]` or None),
/// initialized as `_ConvNd.reset_parameters`.
fn make_params(core: &ModuleCore, wshape: &[usize], out: usize, bias: bool) -> Result<()> {
    let w = Parameter::new(Tensor::zeros(wshape, DType::F32))?;
    let b = if bias {
        Some(Parameter::new(Tensor::zeros(&[out], DType::F32))?)
    } else {
        None
    };
    reset_weight_and_bias(&w, b.as_ref())?;
    core.register_parameter("weight", Some(w))?;
    core.register_parameter("bias", b)
}

/// `nn.Conv2d(in, out, kernel_size, stride, padding, dilation, groups,
/// bias)`. Weight `[out, in/groups, kh, kw]`.
pub struct Conv2d {
    core: ModuleCore,
    spec: ConvSpec,
}

impl Conv2d {
    /// `nn.Conv2d(in, out, kernel_size)` with the default options.
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl Into<Size2>,
    ) -> Result<Conv2d> {
        Conv2d::with_options(
            in_channels,
            out_channels,
            kernel_size,
            Conv2dOptions::default(),
        )
    }

    pub fn with_options(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl Into<Size2>,
        o: Conv2dOptions,
    ) -> Result<Conv2d> {
        let spec = ConvSpec {
            in_channels,
            out_channels,
            kernel_size: kernel_size.into().pair(),
            stride: o.stride.pair(),
            padding: o.padding.pair(),
            dilation: o.dilation.pair(),
            output_padding: (0, 0),
            groups: o.groups,
        };
        spec.check("Conv2d")?;
        let core = ModuleCore::new("Conv2d");
        let k = spec.kernel_size;
        make_params(
            &core,
            &[out_channels, in_channels / o.groups, k.0, k.1],
            out_channels,
            o.bias,
        )?;
        Ok(Conv2d { core, spec })
    }

    pub fn in_channels(&self) -> usize {
        self.spec.in_channels
    }
    pub fn out_channels(&self) -> usize {
        self.spec.out_channels
    }
    pub fn kernel_size(&self) -> (usize, usize) {
        self.spec.kernel_size
    }
    pub fn stride(&self) -> (usize, usize) {
        self.spec.stride
    }
    pub fn padding(&self) -> (usize, usize) {
        self.spec.padding
    }
    pub fn dilation(&self) -> (usize, usize) {
        self.spec.dilation
    }
    pub fn groups(&self) -> usize {
        self.spec.groups
    }

    /// `reset_parameters()`.
    pub fn reset_parameters(&self) -> Result<()> {
        let w = self.core.param("weight")?;
        let b = self.core.param_opt("bias")?;
        reset_weight_and_bias(&w, b.as_ref())
    }
}

impl Module for Conv2d {
    fn core(&self) -> &ModuleCore {
        &self.core
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.core.param("weight")?;
        let b = self.core.param_opt("bias")?;
        conv2d(x, &w, b.as_ref(), self.spec.params())
    }

    fn extra_repr(&self) -> String {
        self.spec
            .extra_repr(self.core.param_opt("bias").ok().flatten().is_some())
    }
}

/// `nn.ConvTranspose2d(in, out, kernel_size, stride, padding,
/// output_padding, groups, bias, dilation)`. Weight `[in, out/groups, kh, kw]`.
pub struct ConvTranspose2d {
    core: ModuleCore,
    spec: ConvSpec,
}

impl ConvTranspose2d {
    pub fn new(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl Into<Size2>,
    ) -> Result<ConvTranspose2d> {
        ConvTranspose2d::with_options(
            in_channels,
            out_channels,
            kernel_size,
            ConvTranspose2dOptions::default(),
        )
    }

    pub fn with_options(
        in_channels: usize,
        out_channels: usize,
        kernel_size: impl Into<Size2>,
        o: ConvTranspose2dOptions,
    ) -> Result<ConvTranspose2d> {
        let spec = ConvSpec {
            in_channels,
            out_channels,
            kernel_size: kernel_size.into().pair(),
            stride: o.stride.pair(),
            padding: o.padding.pair(),
            dilation: o.dilation.pair(),
            output_padding: o.output_padding.pair(),
            groups: o.groups,
        };
        spec.check("ConvTranspose2d")?;
        let core = ModuleCore::new("ConvTranspose2d");
        let k = spec.kernel_size;
        make_params(
            &core,
            &[in_channels, out_channels / o.groups, k.0, k.1],
            out_channels,
            o.bias,
        )?;
        Ok(ConvTranspose2d { core, spec })
    }

    pub fn output_padding(&self) -> (usize, usize) {
        self.spec.output_padding
    }
}

impl Module for ConvTranspose2d {
    fn core(&self) -> &ModuleCore {
        &self.core
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.core.param("weight")?;
        let b = self.core.param_opt("bias")?;
        conv_transpose2d(
            x,
            &w,
            b.as_ref(),
            self.spec.params(),
            self.spec.output_padding,
        )
    }

    fn extra_repr(&self) -> String {
        self.spec
            .extra_repr(self.core.param_opt("bias").ok().flatten().is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::module::ModuleExt;

    #[test]
    fn reprs_match_pytorch() {
        // repr(nn.Conv2d(1, 32, 5, 1, 1))
        let c = Conv2d::with_options(
            1,
            32,
            5,
            Conv2dOptions {
                padding: 1.into(),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            c.to_repr(),
            "Conv2d(1, 32, kernel_size=(5, 5), stride=(1, 1), padding=(1, 1))"
        );
        // repr(nn.Conv2d(4, 8, (3, 2), stride=2, dilation=2, groups=2, bias=False))
        let c = Conv2d::with_options(
            4,
            8,
            (3, 2),
            Conv2dOptions {
                stride: 2.into(),
                dilation: 2.into(),
                groups: 2,
                bias: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            c.to_repr(),
            "Conv2d(4, 8, kernel_size=(3, 2), stride=(2, 2), dilation=(2, 2), groups=2, bias=False)"
        );
        assert_eq!(c.core().param("weight").unwrap().shape(), [8, 2, 3, 2]);
        assert_eq!(c.state_dict().keys(), ["weight"]);
        // repr(nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2))
        let t = ConvTranspose2d::with_options(
            4,
            6,
            3,
            ConvTranspose2dOptions {
                stride: 2.into(),
                padding: 1.into(),
                output_padding: 1.into(),
                groups: 2,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            t.to_repr(),
            "ConvTranspose2d(4, 6, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), output_padding=(1, 1), groups=2)"
        );
        assert_eq!(t.core().param("weight").unwrap().shape(), [4, 3, 3, 3]);
        let y = t.call(&Tensor::zeros(&[1, 4, 5, 5], DType::F32)).unwrap();
        assert_eq!(y.shape(), [1, 6, 10, 10]);
    }

    /// conv_transpose2d is the adjoint of conv2d with the same weight:
    /// <conv(x), y> == <x, conv_t(y)> (stride 2, padding 1, groups 2).
    #[test]
    fn transpose_is_the_adjoint_of_conv() {
        crate::manual_seed(7);
        let o = Conv2dOptions {
            stride: 2.into(),
            padding: 1.into(),
            groups: 2,
            bias: false,
            ..Default::default()
        };
        let c = Conv2d::with_options(4, 6, 3, o).unwrap();
        let t = ConvTranspose2d::with_options(
            6,
            4,
            3,
            ConvTranspose2dOptions {
                stride: 2.into(),
                padding: 1.into(),
                groups: 2,
                bias: false,
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(t.to_repr(), "ConvTranspose2d(6, 4, kernel_size=(3, 3), stride=(2, 2), padding=(1, 1), groups=2, bias=False)");
        let w = c.core().param("weight").unwrap();
        crate::no_grad(|| t.core().param("weight").unwrap().copy_(&w).map(|_| ())).unwrap();
        let x = Tensor::randn(&[2, 4, 9, 9], DType::F64);
        c.double().unwrap();
        t.double().unwrap();
        let cx = c.call(&x).unwrap();
        assert_eq!(cx.shape(), [2, 6, 5, 5]);
        let y = Tensor::randn(&cx.shape(), DType::F64);
        let ty = t.call(&y).unwrap();
        assert_eq!(ty.shape(), [2, 4, 9, 9]);
        let lhs = cx.mul(&y).unwrap().sum().unwrap().item().unwrap();
        let rhs = x.mul(&ty).unwrap().sum().unwrap().item().unwrap();
        assert!(
            (lhs - rhs).abs() < 1e-9 * lhs.abs().max(1.0),
            "{lhs} vs {rhs}"
        );
    }

    #[test]
    fn init_bounds_and_checks() {
        let c = Conv2d::new(3, 16, 3).unwrap();
        // fan_in = 3 * 3 * 3 = 27: weight and bias in U(-1/sqrt(27), 1/sqrt(27))
        let bound = 1.0 / 27f32.sqrt();
        for (_, p) in c.named_parameters() {
            assert!(p.to_vec_f32().iter().all(|v| v.abs() <= bound));
        }
        assert!(Conv2d::with_options(
            3,
            4,
            3,
            Conv2dOptions {
                groups: 2,
                ..Default::default()
            }
        )
        .is_err());
        let e = c
            .call(&Tensor::zeros(&[2, 4, 8, 8], DType::F32))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("[16, 3, 3, 3]") && e.contains("[2, 4, 8, 8]"),
            "{e}"
        );
    }
}
