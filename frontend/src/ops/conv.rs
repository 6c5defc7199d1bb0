//! 2-d convolution and transposed convolution (NCHW), validated with
//! PyTorch's error messages and differentiated through the kiln-cpu conv
//! kernels (`ConvolutionBackward0`). An unbatched 3-d input is treated as a
//! batch of one, as PyTorch.

use crate::autograd::{record, record_no_double_backward};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_cpu::conv::{self as k, Conv2dParams};
use kiln_cpu::{CpuStorage, Float};
use kiln_ir::DType;

fn shape4(s: &[usize]) -> [usize; 4] {
    [s[0], s[1], s[2], s[3]]
}

fn contiguous_vec<T: Float>(t: &Tensor) -> Vec<T> {
    t.contiguous_vec::<T>()
}

/// Validates conv2d operands; returns (x as 4-d, was_unbatched).
fn check_conv(
    op: &str,
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    p: &Conv2dParams,
    transposed: bool,
) -> Result<(Tensor, bool)> {
    let ws = w.shape();
    if ws.len() != 4 {
        return Err(Error::op(
            op,
            format!("expected a 4-d weight, got shape {ws:?}"),
        ));
    }
    let xs = x.shape();
    let (x4, unbatched) = match xs.len() {
        4 => (x.clone(), false),
        3 => (x.unsqueeze(0)?, true),
        _ => {
            return Err(Error::op(
                op,
                format!("Expected 3D (unbatched) or 4D (batched) input to {op}, but got input of size: {xs:?}"),
            ))
        }
    };
    let s = x4.shape();
    if !x.dtype().is_float() || x.dtype() != w.dtype() {
        return Err(Error::op(
            op,
            format!(
                "Input type ({}) and weight type ({}) should be the same floating type",
                x.dtype(),
                w.dtype()
            ),
        ));
    }
    if p.groups == 0 || p.stride.0 == 0 || p.stride.1 == 0 || p.dilation.0 == 0 || p.dilation.1 == 0
    {
        return Err(Error::op(
            op,
            format!("groups, stride and dilation must be positive (got {p:?})"),
        ));
    }
    let (expected_cin, out_total) = if transposed {
        (ws[0], ws[1] * p.groups)
    } else {
        (ws[1] * p.groups, ws[0])
    };
    if s[1] != expected_cin || !ws[0].is_multiple_of(p.groups) {
        return Err(Error::op(
            op,
            format!(
                "Given groups={}, weight of size {ws:?}, expected input{s:?} to have {expected_cin} channels, but got {} channels instead",
                p.groups, s[1]
            ),
        ));
    }
    if let Some(b) = bias {
        if b.shape() != [out_total] || b.dtype() != x.dtype() {
            return Err(Error::op(
                op,
                format!(
                    "bias of shape {:?} ({}) does not match {out_total} output channels ({})",
                    b.shape(),
                    b.dtype(),
                    x.dtype()
                ),
            ));
        }
    }
    if !transposed {
        for (i, (&n, &kk)) in s[2..].iter().zip(&ws[2..]).enumerate() {
            let (pd, dl) = if i == 0 {
                (p.padding.0, p.dilation.0)
            } else {
                (p.padding.1, p.dilation.1)
            };
            if n + 2 * pd < dl * (kk - 1) + 1 {
                return Err(Error::op(
                    op,
                    format!(
                        "Calculated padded input size per channel: ({} x {}). Kernel size: ({} x {}). Kernel size can't be greater than actual input size",
                        s[2] + 2 * p.padding.0,
                        s[3] + 2 * p.padding.1,
                        dl * (ws[2] - 1) + 1,
                        p.dilation.1 * (ws[3] - 1) + 1
                    ),
                ));
            }
        }
    }
    Ok((x4, unbatched))
}

/// Records `ConvolutionBackward0` for a conv-like op: `grad_input(g)` and
/// `grad_weight(g)` compute those gradients' buffers (shapes `xs`, `ws`);
/// the bias gradient is the sum of `g` over N, H and W. The fused kernels
/// are not differentiable again (explicitly).
fn record_conv_backward(
    op: &'static str,
    inputs: &[&Tensor],
    out: &Tensor,
    has_bias: bool,
    (xs, ws): ([usize; 4], [usize; 4]),
    grad_input: impl Fn(&Tensor) -> Result<CpuStorage> + Send + Sync + 'static,
    grad_weight: impl Fn(&Tensor) -> Result<CpuStorage> + Send + Sync + 'static,
) {
    record("ConvolutionBackward0", inputs, &[out], move |g, needs| {
        let g = g[0].as_ref().unwrap();
        let mut res = Vec::new();
        for (i, (f, shape)) in [
            (&grad_input as &dyn Fn(&Tensor) -> Result<CpuStorage>, xs),
            (&grad_weight, ws),
        ]
        .into_iter()
        .enumerate()
        {
            res.push(if needs[i] {
                let t = Tensor::from_storage(f(g)?, &shape);
                record_no_double_backward(op, &[g], &[&t]);
                Some(t)
            } else {
                None
            });
        }
        if has_bias {
            res.push(if needs[2] {
                Some(g.sum_dims(&[0, 2, 3], false)?)
            } else {
                None
            });
        }
        Ok(res)
    });
}

fn finish(out: Tensor, unbatched: bool) -> Result<Tensor> {
    if unbatched {
        out.squeeze_dim(0)
    } else {
        Ok(out)
    }
}

macro_rules! dispatch_float {
    ($dtype:expr, $op:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                CpuStorage::F32($body)
            }
            DType::F64 => {
                type $T = f64;
                CpuStorage::F64($body)
            }
            d => return Err(Error::op($op, format!("not implemented for {d}"))),
        }
    };
}

/// `F.conv2d(x, weight, bias, stride, padding, dilation, groups)`.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
) -> Result<Tensor> {
    crate::device::check_cpu_opt("conv2d", &[Some(x), Some(weight), bias])?;
    if matches!(x.dtype(), DType::F16 | DType::BF16) && x.dtype() == weight.dtype() {
        let up = |t: &Tensor| t.to_dtype(DType::F32);
        let b = bias.map(up).transpose()?;
        return conv2d(&up(x)?, &up(weight)?, b.as_ref(), p)?.to_dtype(x.dtype());
    }
    let (x4, unbatched) = check_conv("conv2d", x, weight, bias, &p, false)?;
    let xs = shape4(&x4.shape());
    let ws = shape4(&weight.shape());
    let (ho, wo) = k::conv2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &p);
    let out_shape = [xs[0], ws[0], ho, wo];
    let buf = dispatch_float!(x.dtype(), "conv2d", T => {
        let bv = bias.map(contiguous_vec::<T>);
        x4.with_contiguous::<T, _>(|xv| {
            weight.with_contiguous::<T, _>(|wv| k::conv2d::<T>(xv, xs, wv, ws, bv.as_deref(), &p))
        })
    });
    let out = Tensor::from_storage(buf, &out_shape);
    let (xd, wd) = (x4.detach(), weight.detach());
    let has_bias = bias.is_some();
    let mut inputs = vec![&x4, weight];
    if let Some(b) = bias {
        inputs.push(b);
    }
    let ir = kiln_ir::Op::Conv2d {
        stride: [p.stride.0, p.stride.1],
        padding: [p.padding.0, p.padding.1],
        dilation: [p.dilation.0, p.dilation.1],
        groups: p.groups,
    };
    crate::trace::record(ir, &inputs, &[&out]);
    record_conv_backward(
        "conv2d",
        &inputs,
        &out,
        has_bias,
        (xs, ws),
        move |g| {
            Ok(dispatch_float!(g.dtype(), "conv2d backward", T =>
                k::conv2d_backward_input::<T>(&contiguous_vec::<T>(g), &contiguous_vec::<T>(&wd), ws, xs, &p)))
        },
        move |g| {
            Ok(dispatch_float!(g.dtype(), "conv2d backward", T =>
                k::conv2d_backward_weight::<T>(&contiguous_vec::<T>(&xd), xs, &contiguous_vec::<T>(g), ws, &p)))
        },
    );
    finish(out, unbatched)
}

/// Gradient of `conv2d` w.r.t. its 4-D input of shape `x_shape`: the
/// kernel eager's `ConvolutionBackward0` runs (used by compiled training's
/// `conv2d_backward_input` op). Not recorded for autograd.
pub fn conv2d_backward_input(
    g: &Tensor,
    weight: &Tensor,
    x_shape: [usize; 4],
    p: Conv2dParams,
) -> Result<Tensor> {
    let ws = shape4(&weight.shape());
    let buf = dispatch_float!(g.dtype(), "conv2d backward", T =>
        k::conv2d_backward_input::<T>(&contiguous_vec::<T>(g), &contiguous_vec::<T>(weight), ws, x_shape, &p));
    Ok(Tensor::from_storage(buf, &x_shape))
}

/// Gradient of `conv2d` w.r.t. its weight of shape `w_shape` (eager's
/// kernel). Not recorded for autograd.
pub fn conv2d_backward_weight(
    g: &Tensor,
    x: &Tensor,
    w_shape: [usize; 4],
    p: Conv2dParams,
) -> Result<Tensor> {
    let xs = shape4(&x.shape());
    let buf = dispatch_float!(g.dtype(), "conv2d backward", T =>
        k::conv2d_backward_weight::<T>(&contiguous_vec::<T>(x), xs, &contiguous_vec::<T>(g), w_shape, &p));
    Ok(Tensor::from_storage(buf, &w_shape))
}

/// `F.conv_transpose2d(x, weight, bias, stride, padding, output_padding,
/// groups, dilation)`; weight is `[Cin, Cout/groups, Kh, Kw]`.
pub fn conv_transpose2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    p: Conv2dParams,
    output_padding: (usize, usize),
) -> Result<Tensor> {
    crate::device::check_cpu_opt("conv_transpose2d", &[Some(x), Some(weight), bias])?;
    if matches!(x.dtype(), DType::F16 | DType::BF16) && x.dtype() == weight.dtype() {
        let up = |t: &Tensor| t.to_dtype(DType::F32);
        let b = bias.map(up).transpose()?;
        return conv_transpose2d(&up(x)?, &up(weight)?, b.as_ref(), p, output_padding)?
            .to_dtype(x.dtype());
    }
    let (x4, unbatched) = check_conv("conv_transpose2d", x, weight, bias, &p, true)?;
    let xs = shape4(&x4.shape());
    let ws = shape4(&weight.shape());
    let (op_h, op_w) = output_padding;
    if (op_h >= p.stride.0 && op_h >= p.dilation.0) || (op_w >= p.stride.1 && op_w >= p.dilation.1)
    {
        return Err(Error::op(
            "conv_transpose2d",
            format!("output padding must be smaller than either stride or dilation, but got output_padding={output_padding:?}, stride={:?}, dilation={:?}", p.stride, p.dilation),
        ));
    }
    let full_h = (xs[2] - 1) * p.stride.0 + p.dilation.0 * (ws[2] - 1) + op_h + 1;
    let full_w = (xs[3] - 1) * p.stride.1 + p.dilation.1 * (ws[3] - 1) + op_w + 1;
    if full_h <= 2 * p.padding.0 || full_w <= 2 * p.padding.1 {
        return Err(Error::op(
            "conv_transpose2d",
            format!(
                "output size would be empty for input {xs:?}, weight {ws:?}, padding {:?}",
                p.padding
            ),
        ));
    }
    let (ho, wo) =
        k::conv_transpose2d_output_size((xs[2], xs[3]), (ws[2], ws[3]), &p, output_padding);
    let out_shape = [xs[0], ws[1] * p.groups, ho, wo];
    let buf = dispatch_float!(x.dtype(), "conv_transpose2d", T => {
        let bv = bias.map(contiguous_vec::<T>);
        x4.with_contiguous::<T, _>(|xv| {
            weight.with_contiguous::<T, _>(|wv| {
                k::conv_transpose2d::<T>(xv, xs, wv, ws, bv.as_deref(), &p, output_padding)
            })
        })
    });
    let out = Tensor::from_storage(buf, &out_shape);
    let (xd, wd) = (x4.detach(), weight.detach());
    let has_bias = bias.is_some();
    let mut inputs = vec![&x4, weight];
    if let Some(b) = bias {
        inputs.push(b);
    }
    let ir = kiln_ir::Op::ConvTranspose2d {
        stride: [p.stride.0, p.stride.1],
        padding: [p.padding.0, p.padding.1],
        output_padding: [output_padding.0, output_padding.1],
        dilation: [p.dilation.0, p.dilation.1],
        groups: p.groups,
    };
    crate::trace::record(ir, &inputs, &[&out]);
    record_conv_backward(
        "conv_transpose2d",
        &inputs,
        &out,
        has_bias,
        (xs, ws),
        move |g| {
            Ok(dispatch_float!(g.dtype(), "conv_transpose2d backward", T =>
                k::conv_transpose2d_backward_input::<T>(&contiguous_vec::<T>(g), out_shape, &contiguous_vec::<T>(&wd), ws, xs, &p)))
        },
        move |g| {
            Ok(dispatch_float!(g.dtype(), "conv_transpose2d backward", T =>
                k::conv_transpose2d_backward_weight::<T>(&contiguous_vec::<T>(&xd), xs, &contiguous_vec::<T>(g), out_shape, ws, &p)))
        },
    );
    finish(out, unbatched)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conv2d_matches_direct_sum_and_errors() {
        crate::manual_seed(5);
        let x = Tensor::randn(&[2, 4, 7, 6], DType::F64);
        let w = Tensor::randn(&[6, 2, 3, 2], DType::F64);
        let b = Tensor::randn(&[6], DType::F64);
        let p = Conv2dParams {
            stride: (2, 1),
            padding: (1, 1),
            dilation: (1, 2),
            groups: 2,
        };
        let y = conv2d(&x, &w, Some(&b), p).unwrap();
        let (ho, wo) = ((7 + 2 - 3) / 2 + 1, (6 + 2 - 2 - 1) + 1);
        assert_eq!(y.shape(), vec![2, 6, ho, wo]);
        let (xv, wv, bv, yv) = (
            x.to_vec_f64(),
            w.to_vec_f64(),
            b.to_vec_f64(),
            y.to_vec_f64(),
        );
        for n in 0..2 {
            for co in 0..6 {
                let g = co / 3;
                for i in 0..ho {
                    for j in 0..wo {
                        let mut s = bv[co];
                        for ci in 0..2 {
                            for ki in 0..3 {
                                for kj in 0..2 {
                                    let hi = (i * 2 + ki) as isize - 1;
                                    let wj = (j + kj * 2) as isize - 1;
                                    if (0..7).contains(&hi) && (0..6).contains(&wj) {
                                        s += xv[((n * 4 + g * 2 + ci) * 7 + hi as usize) * 6
                                            + wj as usize]
                                            * wv[((co * 2 + ci) * 3 + ki) * 2 + kj];
                                    }
                                }
                            }
                        }
                        let got = yv[((n * 6 + co) * ho + i) * wo + j];
                        assert!((got - s).abs() < 1e-10, "{got} vs {s}");
                    }
                }
            }
        }
        let bad = Tensor::randn(&[2, 3, 7, 6], DType::F64);
        let e = conv2d(&bad, &w, None, p).unwrap_err().to_string();
        assert!(
            e.contains("expected input[2, 3, 7, 6] to have 4 channels, but got 3 channels instead"),
            "{e}"
        );
        let xr = x.clone().requires_grad_(true).unwrap();
        let y = conv2d(&xr, &w, Some(&b), p).unwrap();
        assert_eq!(y.grad_fn_name().as_deref(), Some("ConvolutionBackward0"));
    }
}
