//! `nn.MaxPool2d` and `nn.AvgPool2d`. Arguments keep the form they were
//! given in (`2` or `(2, 2)`), because PyTorch's `extra_repr` prints them as
//! given; `stride` defaults to `kernel_size`.

use super::conv::Size2;
use super::core::ModuleCore;
use super::module::{py_bool, Module};
use crate::error::{Error, Result};
use crate::ops::nn::{avg_pool2d, max_pool2d, max_pool2d_with_indices};
use crate::tensor::Tensor;

/// `nn.MaxPool2d(kernel_size, stride=None, padding=0, dilation=1,
/// return_indices=False, ceil_mode=False)`.
pub struct MaxPool2d {
    core: ModuleCore,
    pub kernel_size: Size2,
    pub stride: Size2,
    pub padding: Size2,
    pub dilation: Size2,
    pub return_indices: bool,
    pub ceil_mode: bool,
}

impl MaxPool2d {
    /// `nn.MaxPool2d(kernel_size, stride)` (stride None = kernel_size).
    pub fn new(kernel_size: impl Into<Size2>, stride: Option<Size2>) -> MaxPool2d {
        let k = kernel_size.into();
        MaxPool2d {
            core: ModuleCore::new("MaxPool2d"),
            kernel_size: k,
            stride: stride.unwrap_or(k),
            padding: Size2::One(0),
            dilation: Size2::One(1),
            return_indices: false,
            ceil_mode: false,
        }
    }

    /// All of PyTorch's arguments.
    pub fn with_options(
        kernel_size: impl Into<Size2>,
        stride: Option<Size2>,
        padding: impl Into<Size2>,
        dilation: impl Into<Size2>,
        return_indices: bool,
        ceil_mode: bool,
    ) -> MaxPool2d {
        MaxPool2d {
            padding: padding.into(),
            dilation: dilation.into(),
            return_indices,
            ceil_mode,
            ..MaxPool2d::new(kernel_size, stride)
        }
    }

    /// `forward` with `return_indices=True`: the pooled values and the flat
    /// (per-plane) indices of the maxima.
    pub fn forward_with_indices(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        max_pool2d_with_indices(
            x,
            self.kernel_size.pair(),
            Some(self.stride.pair()),
            self.padding.pair(),
            self.dilation.pair(),
            self.ceil_mode,
        )
    }
}

impl Module for MaxPool2d {
    fn core(&self) -> &ModuleCore {
        &self.core
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.return_indices {
            return Err(Error::op(
                "MaxPool2d",
                "return_indices=True gives two tensors: call forward_with_indices",
            ));
        }
        max_pool2d(
            x,
            self.kernel_size.pair(),
            Some(self.stride.pair()),
            self.padding.pair(),
            self.dilation.pair(),
            self.ceil_mode,
        )
    }

    fn extra_repr(&self) -> String {
        format!(
            "kernel_size={}, stride={}, padding={}, dilation={}, ceil_mode={}",
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            py_bool(self.ceil_mode)
        )
    }
}

/// `nn.AvgPool2d(kernel_size, stride=None, padding=0, ceil_mode=False,
/// count_include_pad=True, divisor_override=None)`.
pub struct AvgPool2d {
    core: ModuleCore,
    pub kernel_size: Size2,
    pub stride: Size2,
    pub padding: Size2,
    pub ceil_mode: bool,
    pub count_include_pad: bool,
    pub divisor_override: Option<usize>,
}

impl AvgPool2d {
    pub fn new(kernel_size: impl Into<Size2>, stride: Option<Size2>) -> AvgPool2d {
        let k = kernel_size.into();
        AvgPool2d {
            core: ModuleCore::new("AvgPool2d"),
            kernel_size: k,
            stride: stride.unwrap_or(k),
            padding: Size2::One(0),
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        }
    }

    pub fn with_options(
        kernel_size: impl Into<Size2>,
        stride: Option<Size2>,
        padding: impl Into<Size2>,
        ceil_mode: bool,
        count_include_pad: bool,
        divisor_override: Option<usize>,
    ) -> AvgPool2d {
        AvgPool2d {
            padding: padding.into(),
            ceil_mode,
            count_include_pad,
            divisor_override,
            ..AvgPool2d::new(kernel_size, stride)
        }
    }
}

impl Module for AvgPool2d {
    fn core(&self) -> &ModuleCore {
        &self.core
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        avg_pool2d(
            x,
            self.kernel_size.pair(),
            Some(self.stride.pair()),
            self.padding.pair(),
            self.ceil_mode,
            self.count_include_pad,
            self.divisor_override,
        )
    }

    /// PyTorch prints only kernel_size, stride and padding.
    fn extra_repr(&self) -> String {
        format!(
            "kernel_size={}, stride={}, padding={}",
            self.kernel_size, self.stride, self.padding
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::module::ModuleExt;
    use kiln_ir::DType;

    #[test]
    fn reprs_as_given() {
        // repr(nn.MaxPool2d(2, 2))
        assert_eq!(
            MaxPool2d::new(2, Some(2.into())).to_repr(),
            "MaxPool2d(kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)"
        );
        // repr(nn.MaxPool2d((3, 2), padding=1, ceil_mode=True))
        assert_eq!(
            MaxPool2d::with_options((3, 2), None, 1, 1, false, true).to_repr(),
            "MaxPool2d(kernel_size=(3, 2), stride=(3, 2), padding=1, dilation=1, ceil_mode=True)"
        );
        // repr(nn.AvgPool2d(3, stride=(2, 1), padding=1, count_include_pad=False))
        assert_eq!(
            AvgPool2d::with_options(3, Some((2, 1).into()), 1, false, false, None).to_repr(),
            "AvgPool2d(kernel_size=3, stride=(2, 1), padding=1)"
        );
    }

    #[test]
    fn forward_values() {
        let x = Tensor::from_vec((0..16).map(|v| v as f32).collect(), &[1, 1, 4, 4]).unwrap();
        let m = MaxPool2d::new(2, None);
        assert_eq!(m.call(&x).unwrap().to_vec_f32(), [5., 7., 13., 15.]);
        let (_, idx) = m.forward_with_indices(&x).unwrap();
        assert_eq!(idx.to_vec::<i64>(), [5, 7, 13, 15]);
        let withi = MaxPool2d::with_options(2, None, 0, 1, true, false);
        assert!(withi.call(&x).is_err());
        let a = AvgPool2d::new(2, None);
        assert_eq!(a.call(&x).unwrap().to_vec_f32(), [2.5, 4.5, 10.5, 12.5]);
        assert!(a.call(&Tensor::zeros(&[4], DType::F32)).is_err());
    }
}
