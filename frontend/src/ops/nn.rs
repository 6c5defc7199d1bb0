//! The neural-network functional ops (PyTorch's `torch.nn.functional`
//! forms): max/avg pooling, batch norm (training and eval, with running-stat
//! updates), layer norm and dropout. Each validates its operands with
//! PyTorch's messages, runs the kiln-cpu kernel and records PyTorch's
//! grad_fn (`MaxPool2DWithIndicesBackward0`, `NativeBatchNormBackward0`...).

use crate::autograd::{no_grad, record, record_no_double_backward};
use crate::error::{Error, Result};
use crate::random;
use crate::tensor::Tensor;
use kiln_cpu::norm as nk;
use kiln_cpu::pool::{self as pk, AvgPool2dParams, MaxPool2dParams};
use kiln_cpu::{CpuStorage, Element, Float};
use kiln_ir::DType;

macro_rules! float_dispatch {
    ($op:expr, $dtype:expr, $T:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::F64 => {
                type $T = f64;
                $body
            }
            d => return Err(Error::op($op, format!("not implemented for {d}"))),
        }
    };
}

fn storage<T: Float>(v: Vec<T>) -> CpuStorage {
    T::into_storage(v)
}

/// Runs `f` on f32 copies of half-precision operands and converts back.
fn via_f32(ts: &[&Tensor]) -> Result<Option<(DType, Vec<Tensor>)>> {
    let d = ts[0].dtype();
    if matches!(d, DType::F16 | DType::BF16) {
        let up = ts
            .iter()
            .map(|t| t.to_dtype(DType::F32))
            .collect::<Result<Vec<_>>>()?;
        return Ok(Some((d, up)));
    }
    Ok(None)
}

/// A 3-d (unbatched) or 4-d input as 4-d, and whether it was unbatched.
fn as_4d(op: &str, x: &Tensor) -> Result<(Tensor, bool)> {
    match x.dim() {
        4 => Ok((x.clone(), false)),
        3 => Ok((x.unsqueeze(0)?, true)),
        _ => Err(Error::op(
            op,
            format!(
                "Expected 3D or 4D (batch mode) tensor for input, got shape {:?}",
                x.shape()
            ),
        )),
    }
}

fn check_pool(
    op: &str,
    x: &[usize],
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    dilation: (usize, usize),
) -> Result<()> {
    if kernel.0 == 0
        || kernel.1 == 0
        || stride.0 == 0
        || stride.1 == 0
        || dilation.0 == 0
        || dilation.1 == 0
    {
        return Err(Error::op(op, format!("kernel {kernel:?}, stride {stride:?} and dilation {dilation:?} must be greater than zero")));
    }
    if padding.0 > kernel.0 / 2 || padding.1 > kernel.1 / 2 {
        return Err(Error::op(op, format!("pad should be at most half of effective kernel size, but got pad={padding:?}, kernel_size={kernel:?}")));
    }
    for (i, (&n, (k, (p, d)))) in x[2..]
        .iter()
        .zip([
            (kernel.0, (padding.0, dilation.0)),
            (kernel.1, (padding.1, dilation.1)),
        ])
        .enumerate()
    {
        if n + 2 * p < d * (k - 1) + 1 {
            return Err(Error::op(op, format!("input of shape {x:?} is too small for kernel {kernel:?} (dilation {dilation:?}, padding {padding:?}) along dim {}", i + 2)));
        }
    }
    Ok(())
}

/// `F.max_pool2d(x, kernel, stride (None = kernel), padding, dilation,
/// ceil_mode)`.
pub fn max_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil_mode: bool,
) -> Result<Tensor> {
    let (out, _) = max_pool2d_impl(x, kernel, stride, padding, dilation, ceil_mode, false)?;
    Ok(out)
}

/// `max_pool2d(..., return_indices=True)`: values and i64 flat indices
/// into each input plane.
pub fn max_pool2d_with_indices(
    x: &Tensor,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil_mode: bool,
) -> Result<(Tensor, Tensor)> {
    let (v, i) = max_pool2d_impl(x, kernel, stride, padding, dilation, ceil_mode, true)?;
    Ok((v, i.expect("indices requested")))
}

/// max_pool2d with or without the index tensor. Without it, and when no
/// gradient will be needed, only the values are computed
/// (`max_pool2d_into`: no index pass, no index buffer); autograd needs the
/// indices, so they are computed whenever it records.
fn max_pool2d_impl(
    x: &Tensor,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    padding: (usize, usize),
    dilation: (usize, usize),
    ceil_mode: bool,
    want_indices: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    crate::device::check_cpu("max_pool2d", &[x])?;
    if let Some((d, up)) = via_f32(&[x])? {
        let (v, i) = max_pool2d_impl(
            &up[0],
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
            want_indices,
        )?;
        return Ok((v.to_dtype(d)?, i));
    }
    let records_grad = crate::autograd::is_grad_enabled() && x.requires_grad();
    let values_only = !want_indices && !records_grad;
    let (x4, unbatched) = as_4d("max_pool2d", x)?;
    let s = x4.shape();
    let xs = [s[0], s[1], s[2], s[3]];
    let stride = stride.unwrap_or(kernel);
    check_pool("max_pool2d", &s, kernel, stride, padding, dilation)?;
    let p = MaxPool2dParams {
        kernel,
        stride,
        padding,
        dilation,
        ceil_mode,
    };
    let (ho, wo) =
        pk::pool2d_output_size((xs[2], xs[3]), kernel, stride, padding, dilation, ceil_mode);
    let out_shape = [xs[0], xs[1], ho, wo];
    let ir = kiln_ir::Op::MaxPool2d {
        kernel: [kernel.0, kernel.1],
        stride: [stride.0, stride.1],
        padding: [padding.0, padding.1],
        dilation: [dilation.0, dilation.1],
        ceil_mode,
    };
    if values_only {
        let vals = float_dispatch!("max_pool2d", x.dtype(), T => {
            storage(x4.with_contiguous::<T, _>(|xv| {
                // Every element is written by the kernel.
                let mut v = kiln_cpu::buffers::alloc_uninit::<T>(out_shape.iter().product());
                pk::max_pool2d_into::<T>(xv, xs, &p, &mut v);
                v
            }))
        });
        let out = Tensor::from_storage(vals, &out_shape);
        crate::trace::record(ir, &[&x4], &[&out]);
        let out = if unbatched { out.squeeze_dim(0)? } else { out };
        return Ok((out, None));
    }
    let (vals, idx) = float_dispatch!("max_pool2d", x.dtype(), T => {
        let (v, i) = x4.with_contiguous::<T, _>(|xv| pk::max_pool2d::<T>(xv, xs, &p));
        (storage(v), i)
    });
    let out = Tensor::from_storage(vals, &out_shape);
    let indices = Tensor::from_storage(CpuStorage::I64(idx), &out_shape);
    crate::trace::record(ir, &[&x4], &[&out]);
    let saved_idx = indices.clone();
    record(
        "MaxPool2DWithIndicesBackward0",
        &[&x4],
        &[&out],
        move |g, _| {
            let g = g[0].as_ref().unwrap();
            let idx = saved_idx.contiguous_vec::<i64>();
            let buf = float_dispatch!("max_pool2d backward", g.dtype(), T => storage(pk::max_pool2d_backward::<T>(&g.contiguous_vec::<T>(), &idx, xs)));
            let gi = Tensor::from_storage(buf, &xs);
            record_no_double_backward("max_pool2d", &[g], &[&gi]);
            Ok(vec![Some(gi)])
        },
    );
    if unbatched {
        Ok((out.squeeze_dim(0)?, Some(indices.squeeze_dim(0)?)))
    } else {
        Ok((out, Some(indices)))
    }
}

/// `F.avg_pool2d(x, kernel, stride (None = kernel), padding, ceil_mode,
/// count_include_pad, divisor_override)`.
pub fn avg_pool2d(
    x: &Tensor,
    kernel: (usize, usize),
    stride: Option<(usize, usize)>,
    padding: (usize, usize),
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
) -> Result<Tensor> {
    crate::device::check_cpu("avg_pool2d", &[x])?;
    if let Some((d, up)) = via_f32(&[x])? {
        return avg_pool2d(
            &up[0],
            kernel,
            stride,
            padding,
            ceil_mode,
            count_include_pad,
            divisor_override,
        )?
        .to_dtype(d);
    }
    if divisor_override == Some(0) {
        return Err(Error::op("avg_pool2d", "divisor must be not zero"));
    }
    let (x4, unbatched) = as_4d("avg_pool2d", x)?;
    let s = x4.shape();
    let xs = [s[0], s[1], s[2], s[3]];
    let stride = stride.unwrap_or(kernel);
    check_pool("avg_pool2d", &s, kernel, stride, padding, (1, 1))?;
    let p = AvgPool2dParams {
        kernel,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        divisor_override,
    };
    let (ho, wo) =
        pk::pool2d_output_size((xs[2], xs[3]), kernel, stride, padding, (1, 1), ceil_mode);
    let out_shape = [xs[0], xs[1], ho, wo];
    let buf = float_dispatch!("avg_pool2d", x.dtype(), T => storage(x4.with_contiguous::<T, _>(|xv| pk::avg_pool2d::<T>(xv, xs, &p))));
    let out = Tensor::from_storage(buf, &out_shape);
    let ir = kiln_ir::Op::AvgPool2d {
        kernel: [kernel.0, kernel.1],
        stride: [stride.0, stride.1],
        padding: [padding.0, padding.1],
        ceil_mode,
        count_include_pad,
        divisor_override,
    };
    crate::trace::record(ir, &[&x4], &[&out]);
    record("AvgPool2DBackward0", &[&x4], &[&out], move |g, _| {
        let g = g[0].as_ref().unwrap();
        let buf = float_dispatch!("avg_pool2d backward", g.dtype(), T => storage(pk::avg_pool2d_backward::<T>(&g.contiguous_vec::<T>(), xs, &p)));
        let gi = Tensor::from_storage(buf, &xs);
        record_no_double_backward("avg_pool2d", &[g], &[&gi]);
        Ok(vec![Some(gi)])
    });
    if unbatched {
        out.squeeze_dim(0)
    } else {
        Ok(out)
    }
}

fn vec_of<T: Float>(t: Option<&Tensor>) -> Option<Vec<T>> {
    t.map(|t| t.contiguous_vec::<T>())
}

/// `F.batch_norm(x, running_mean, running_var, weight, bias, training,
/// momentum, eps)` for x `[N, C, *]`. In training the batch statistics
/// normalize and, when running stats are given, update them in place:
/// `running = (1 - momentum) * running + momentum * stat`, with the
/// unbiased variance, as PyTorch. Eval uses the running stats.
#[allow(clippy::too_many_arguments)]
pub fn batch_norm(
    x: &Tensor,
    running_mean: Option<&Tensor>,
    running_var: Option<&Tensor>,
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    training: bool,
    momentum: f64,
    eps: f64,
) -> Result<Tensor> {
    crate::device::check_cpu_opt(
        "batch_norm",
        &[Some(x), running_mean, running_var, weight, bias],
    )?;
    let s = x.shape();
    if s.len() < 2 {
        return Err(Error::op(
            "batch_norm",
            format!("expected an input of at least 2 dims [N, C, ...], got {s:?}"),
        ));
    }
    let (n, c) = (s[0], s[1]);
    let sp: usize = s[2..].iter().product();
    for (name, t) in [
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ] {
        if let Some(t) = t {
            if t.shape() != [c] {
                return Err(Error::op(
                    "batch_norm",
                    format!(
                        "{name} should contain {c} elements not {} (shape {:?}, input {s:?})",
                        t.numel(),
                        t.shape()
                    ),
                ));
            }
        }
    }
    if !x.dtype().is_float() {
        return Err(Error::op(
            "batch_norm",
            format!("expected a floating point input, got {}", x.dtype()),
        ));
    }
    if training && n * sp <= 1 {
        return Err(Error::op(
            "batch_norm",
            format!("Expected more than 1 value per channel when training, got input size {s:?}"),
        ));
    }
    if !training && (running_mean.is_none() || running_var.is_none()) {
        return Err(Error::op(
            "batch_norm",
            "running_mean and running_var must be defined in evaluation mode",
        ));
    }
    let cdt = if matches!(x.dtype(), DType::F16 | DType::BF16) {
        DType::F32
    } else {
        x.dtype()
    };
    let shape3 = [n, c, sp];
    let internal = crate::trace::suspend();
    let xc = x.to_dtype(cdt)?;
    let w = weight.map(|t| t.to_dtype(cdt)).transpose()?;
    let b = bias.map(|t| t.to_dtype(cdt)).transpose()?;
    let rm = running_mean.map(|t| t.to_dtype(cdt)).transpose()?;
    let rv = running_var.map(|t| t.to_dtype(cdt)).transpose()?;
    let (y, mean_t, invstd_t) = float_dispatch!("batch_norm", cdt, T => {
        if !training {
            // Eval: x is read in place (no copy), y written once.
            let rmv = rm.as_ref().unwrap().contiguous_vec::<T>();
            let rvv = rv.as_ref().unwrap().contiguous_vec::<T>();
            let (wv, bv) = (vec_of::<T>(w.as_ref()), vec_of::<T>(b.as_ref()));
            let y = xc.with_contiguous::<T, _>(|xv| {
                let mut y = kiln_cpu::buffers::alloc_uninit::<T>(xv.len());
                nk::batch_norm_eval_into::<T>(xv, shape3, &rmv, &rvv, wv.as_deref(), bv.as_deref(), eps, &mut y);
                y
            });
            (storage(y), None, None)
        } else {
            let xv = xc.contiguous_vec::<T>();
            let (y, st) = nk::batch_norm_train::<T>(&xv, shape3, vec_of::<T>(w.as_ref()).as_deref(), vec_of::<T>(b.as_ref()).as_deref(), eps);
            if let (Some(rm), Some(rv)) = (running_mean, running_var) {
                let unbiased: Vec<T> = st.var.iter().map(|&v| T::from_f64(v.as_f64() * st.count as f64 / (st.count as f64 - 1.0))).collect();
                let mean_t = Tensor::from_storage(storage(st.mean.clone()), &[c]);
                let var_t = Tensor::from_storage(storage(unbiased), &[c]);
                no_grad(|| -> Result<()> {
                    rm.copy_(&rm.mul_scalar(1.0 - momentum)?.add(&mean_t.mul_scalar(momentum)?)?)?;
                    rv.copy_(&rv.mul_scalar(1.0 - momentum)?.add(&var_t.mul_scalar(momentum)?)?)?;
                    Ok(())
                })?;
            }
            (storage(y), Some(storage(st.mean)), Some(storage(st.invstd)))
        }
    });
    let out = Tensor::from_storage(y, &s).to_dtype(x.dtype())?;
    drop(internal);
    {
        let mut tin = vec![x];
        tin.extend(weight);
        tin.extend(bias);
        let stats = running_mean.zip(running_var);
        if let Some((rm, rv)) = stats {
            tin.push(rm);
            tin.push(rv);
        }
        let ir = kiln_ir::Op::BatchNorm {
            training,
            momentum,
            eps,
            has_weight: weight.is_some(),
            has_bias: bias.is_some(),
            has_running_stats: stats.is_some(),
        };
        // In training the running stats' new values are outputs 1 and 2:
        // the buffers are rebound to them.
        let mut touts = vec![&out];
        if let (true, Some((rm, rv))) = (training, stats) {
            touts.push(rm);
            touts.push(rv);
        }
        crate::trace::record(ir, &tin, &touts);
    }
    let mut inputs = vec![x];
    let has_w = weight.is_some();
    let has_b = bias.is_some();
    if let Some(w) = weight {
        inputs.push(w);
    }
    if let Some(b) = bias {
        inputs.push(b);
    }
    let xd = xc.detach();
    let wd = w.map(|t| t.detach());
    let (rmd, rvd) = (
        rm.map(|t| t.detach().clone_tensor()).transpose()?,
        rv.map(|t| t.detach().clone_tensor()).transpose()?,
    );
    let x_dtype = x.dtype();
    let wdt = weight.map(|t| t.dtype());
    let mean_saved = mean_t.map(|m| Tensor::from_storage(m, &[c]));
    let invstd_saved = invstd_t.map(|m| Tensor::from_storage(m, &[c]));
    record(
        "NativeBatchNormBackward0",
        &inputs,
        &[&out],
        move |g, needs| {
            let g = g[0].as_ref().unwrap().to_dtype(cdt)?;
            let (gi, gw, gb) = float_dispatch!("batch_norm backward", cdt, T => {
                let gv = g.contiguous_vec::<T>();
                let xv = xd.contiguous_vec::<T>();
                let wv = vec_of::<T>(wd.as_ref());
                let (gi, gw, gb) = match (&mean_saved, &invstd_saved) {
                    (Some(m), Some(is)) => nk::batch_norm_backward::<T>(&gv, &xv, shape3, wv.as_deref(), &m.contiguous_vec::<T>(), &is.contiguous_vec::<T>(), true),
                    _ => nk::batch_norm_backward_eval::<T>(&gv, &xv, shape3, wv.as_deref(), &rmd.as_ref().unwrap().contiguous_vec::<T>(), &rvd.as_ref().unwrap().contiguous_vec::<T>(), eps),
                };
                (storage(gi), storage(gw), storage(gb))
            });
            let gi = Tensor::from_storage(gi, &g.shape()).to_dtype(x_dtype)?;
            record_no_double_backward("batch_norm", &[&g], &[&gi]);
            let mut res = vec![if needs[0] { Some(gi) } else { None }];
            let mut k = 1;
            if has_w {
                res.push(if needs[k] {
                    Some(Tensor::from_storage(gw, &[c]).to_dtype(wdt.unwrap())?)
                } else {
                    None
                });
                k += 1;
            }
            if has_b {
                res.push(if needs[k] {
                    Some(Tensor::from_storage(gb, &[c]).to_dtype(wdt.unwrap_or(x_dtype))?)
                } else {
                    None
                });
            }
            Ok(res)
        },
    );
    Ok(out)
}

/// `F.layer_norm(x, normalized_shape, weight, bias, eps)`: normalizes over
/// the trailing `normalized_shape` dims.
pub fn layer_norm(
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    bias: Option<&Tensor>,
    eps: f64,
) -> Result<Tensor> {
    crate::device::check_cpu_opt("layer_norm", &[Some(x), weight, bias])?;
    let s = x.shape();
    let nd = normalized_shape.len();
    if nd == 0 || s.len() < nd || s[s.len() - nd..] != *normalized_shape {
        return Err(Error::op(
            "layer_norm",
            format!("Given normalized_shape={normalized_shape:?}, expected input with shape [*, {}], but got input of size {s:?}", normalized_shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", ")),
        ));
    }
    for (name, t) in [("weight", weight), ("bias", bias)] {
        if let Some(t) = t {
            if t.shape() != normalized_shape {
                return Err(Error::op(
                    "layer_norm",
                    format!(
                        "{name} of shape {:?} does not match normalized_shape {normalized_shape:?}",
                        t.shape()
                    ),
                ));
            }
        }
    }
    if !x.dtype().is_float() {
        return Err(Error::op(
            "layer_norm",
            format!("expected a floating point input, got {}", x.dtype()),
        ));
    }
    let k: usize = normalized_shape.iter().product();
    let cdt = if matches!(x.dtype(), DType::F16 | DType::BF16) {
        DType::F32
    } else {
        x.dtype()
    };
    let internal = crate::trace::suspend();
    let xc = x.to_dtype(cdt)?;
    let w = weight.map(|t| t.to_dtype(cdt)).transpose()?;
    let b = bias.map(|t| t.to_dtype(cdt)).transpose()?;
    let rows = x.numel() / k.max(1);
    let (y, mean, rstd) = float_dispatch!("layer_norm", cdt, T => {
        let (wv, bv) = (vec_of::<T>(w.as_ref()), vec_of::<T>(b.as_ref()));
        let (y, m, r) = xc.with_contiguous::<T, _>(|xv| nk::layer_norm::<T>(xv, k, wv.as_deref(), bv.as_deref(), eps));
        (storage(y), storage(m), storage(r))
    });
    let out = Tensor::from_storage(y, &s).to_dtype(x.dtype())?;
    drop(internal);
    {
        let mut tin = vec![x];
        tin.extend(weight);
        tin.extend(bias);
        let ir = kiln_ir::Op::LayerNorm {
            normalized_shape: normalized_shape.to_vec(),
            eps,
            has_weight: weight.is_some(),
            has_bias: bias.is_some(),
        };
        crate::trace::record(ir, &tin, &[&out]);
    }
    let mean = Tensor::from_storage(mean, &[rows]);
    let rstd = Tensor::from_storage(rstd, &[rows]);
    let mut inputs = vec![x];
    let (has_w, has_b) = (weight.is_some(), bias.is_some());
    if let Some(w) = weight {
        inputs.push(w);
    }
    if let Some(b) = bias {
        inputs.push(b);
    }
    let xd = xc.detach();
    let wd = w.map(|t| t.detach());
    let x_dtype = x.dtype();
    let wdt = weight.map(|t| t.dtype()).unwrap_or(x_dtype);
    let ns = normalized_shape.to_vec();
    record(
        "NativeLayerNormBackward0",
        &inputs,
        &[&out],
        move |g, needs| {
            let g = g[0].as_ref().unwrap().to_dtype(cdt)?;
            let (gi, gw, gb) = float_dispatch!("layer_norm backward", cdt, T => {
                let (gi, gw, gb) = nk::layer_norm_backward::<T>(&g.contiguous_vec::<T>(), &xd.contiguous_vec::<T>(), k, &mean.contiguous_vec::<T>(), &rstd.contiguous_vec::<T>(), vec_of::<T>(wd.as_ref()).as_deref());
                (storage(gi), storage(gw), storage(gb))
            });
            let gi = Tensor::from_storage(gi, &g.shape()).to_dtype(x_dtype)?;
            record_no_double_backward("layer_norm", &[&g], &[&gi]);
            let mut res = vec![if needs[0] { Some(gi) } else { None }];
            let mut i = 1;
            if has_w {
                res.push(if needs[i] {
                    Some(Tensor::from_storage(gw, &ns).to_dtype(wdt)?)
                } else {
                    None
                });
                i += 1;
            }
            if has_b {
                res.push(if needs[i] {
                    Some(Tensor::from_storage(gb, &ns).to_dtype(wdt)?)
                } else {
                    None
                });
            }
            Ok(res)
        },
    );
    Ok(out)
}

/// `F.dropout(x, p, training)`: in training, zeroes each element with
/// probability `p` (from the global generator, `kiln::manual_seed`) and
/// scales the rest by 1/(1-p); identity in eval or when p == 0.
pub fn dropout(x: &Tensor, p: f64, training: bool) -> Result<Tensor> {
    crate::device::check_cpu("dropout", &[x])?;
    if !(0.0..=1.0).contains(&p) {
        return Err(Error::op(
            "dropout",
            format!("dropout probability has to be between 0 and 1, but got {p}"),
        ));
    }
    if !training || p == 0.0 {
        return Ok(x.clone());
    }
    if !x.dtype().is_float() {
        return Err(Error::op(
            "dropout",
            format!("expected a floating point input, got {}", x.dtype()),
        ));
    }
    let mask = {
        let _internal = crate::trace::suspend();
        dropout_mask(x, p)?
    };
    let out = {
        let _internal = crate::trace::suspend();
        no_grad(|| x.mul(&mask))?
    };
    crate::trace::record(
        kiln_ir::Op::Dropout {
            p,
            seed: 0,
            offset: 0,
        },
        &[x],
        &[&out],
    );
    record("NativeDropoutBackward0", &[x], &[&out], move |g, _| {
        Ok(vec![Some(g[0].as_ref().unwrap().mul(&mask)?)])
    });
    Ok(out)
}

/// The scaled keep-mask training dropout multiplies by: 0 with
/// probability `p`, else `1/(1-p)`, of x's shape and dtype, drawn from the
/// global generator. `dropout` uses it, and so does compiled training (the
/// IR's `dropout_mask`), so both draw the same numbers in the same order.
pub fn dropout_mask(x: &Tensor, p: f64) -> Result<Tensor> {
    let keep = random::bernoulli_vec(x.numel(), 1.0 - p);
    let scale = if p == 1.0 { 0.0 } else { 1.0 / (1.0 - p) };
    Tensor::from_storage(
        CpuStorage::F64(keep.iter().map(|&k| if k { scale } else { 0.0 }).collect()),
        &x.shape(),
    )
    .to_dtype(x.dtype())
}

/// Gradient of `max_pool2d` (eager's kernel) for an input of `x_shape`,
/// from the indices `max_pool2d_with_indices` returned. Not recorded for
/// autograd.
pub fn max_pool2d_backward(g: &Tensor, indices: &Tensor, x_shape: &[usize]) -> Result<Tensor> {
    let xs = match x_shape.len() {
        4 => [x_shape[0], x_shape[1], x_shape[2], x_shape[3]],
        3 => [1, x_shape[0], x_shape[1], x_shape[2]],
        _ => {
            return Err(Error::op(
                "max_pool2d backward",
                format!("expected a 3-D or 4-D input shape, got {x_shape:?}"),
            ))
        }
    };
    if indices.shape() != g.shape() || indices.dtype() != DType::I64 {
        return Err(Error::op(
            "max_pool2d backward",
            format!(
                "indices {:?} ({}) must be i64 of grad_out's shape {:?}",
                indices.shape(),
                indices.dtype(),
                g.shape()
            ),
        ));
    }
    let iv = indices.contiguous_vec::<i64>();
    let buf = float_dispatch!("max_pool2d backward", g.dtype(), T => storage(pk::max_pool2d_backward::<T>(&g.contiguous_vec::<T>(), &iv, xs)));
    Ok(Tensor::from_storage(buf, x_shape))
}

/// Gradient of `avg_pool2d` for an input of `x_shape` (eager's kernel).
/// Not recorded for autograd.
#[allow(clippy::too_many_arguments)]
pub fn avg_pool2d_backward(
    g: &Tensor,
    x_shape: &[usize],
    kernel: (usize, usize),
    stride: (usize, usize),
    padding: (usize, usize),
    ceil_mode: bool,
    count_include_pad: bool,
    divisor_override: Option<usize>,
) -> Result<Tensor> {
    let xs = match x_shape.len() {
        4 => [x_shape[0], x_shape[1], x_shape[2], x_shape[3]],
        3 => [1, x_shape[0], x_shape[1], x_shape[2]],
        _ => {
            return Err(Error::op(
                "avg_pool2d backward",
                format!("expected a 3-D or 4-D input shape, got {x_shape:?}"),
            ))
        }
    };
    let p = AvgPool2dParams {
        kernel,
        stride,
        padding,
        ceil_mode,
        count_include_pad,
        divisor_override,
    };
    let buf = float_dispatch!("avg_pool2d backward", g.dtype(), T => storage(pk::avg_pool2d_backward::<T>(&g.contiguous_vec::<T>(), xs, &p)));
    Ok(Tensor::from_storage(buf, x_shape))
}

/// Gradient of `batch_norm` (eager's kernel): `(grad_input, grad_weight
/// [C], grad_bias [C])`. In training the batch statistics are recomputed
/// from `x`; in eval `running` holds (running_mean, running_var). Not
/// recorded for autograd.
pub fn batch_norm_backward(
    g: &Tensor,
    x: &Tensor,
    weight: Option<&Tensor>,
    running: Option<(&Tensor, &Tensor)>,
    training: bool,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let s = x.shape();
    if s.len() < 2 || g.shape() != s {
        return Err(Error::op(
            "batch_norm backward",
            format!(
                "grad_out {:?} and input {s:?} must have one shape of rank >= 2",
                g.shape()
            ),
        ));
    }
    let (n, c) = (s[0], s[1]);
    let sp: usize = s[2..].iter().product();
    let shape3 = [n, c, sp];
    let (gi, gw, gb) = float_dispatch!("batch_norm backward", x.dtype(), T => {
        let xv = x.contiguous_vec::<T>();
        let gv = g.contiguous_vec::<T>();
        let wv = vec_of::<T>(weight);
        let (gi, gw, gb) = if training {
            let (_, st) = nk::batch_norm_train::<T>(&xv, shape3, None, None, eps);
            nk::batch_norm_backward::<T>(&gv, &xv, shape3, wv.as_deref(), &st.mean, &st.invstd, true)
        } else {
            let (rm, rv) = running.ok_or_else(|| Error::op("batch_norm backward", "eval mode needs the running stats"))?;
            nk::batch_norm_backward_eval::<T>(&gv, &xv, shape3, wv.as_deref(), &rm.contiguous_vec::<T>(), &rv.contiguous_vec::<T>(), eps)
        };
        (storage(gi), storage(gw), storage(gb))
    });
    Ok((
        Tensor::from_storage(gi, &s),
        Tensor::from_storage(gw, &[c]),
        Tensor::from_storage(gb, &[c]),
    ))
}

/// Gradient of `layer_norm` (eager's kernel): `(grad_input, grad_weight,
/// grad_bias)`, the row statistics recomputed from `x`. Not recorded for
/// autograd.
pub fn layer_norm_backward(
    g: &Tensor,
    x: &Tensor,
    normalized_shape: &[usize],
    weight: Option<&Tensor>,
    eps: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let k: usize = normalized_shape.iter().product();
    if k == 0 || g.shape() != x.shape() || !x.numel().is_multiple_of(k) {
        return Err(Error::op(
            "layer_norm backward",
            format!(
                "grad_out {:?} and input {:?} do not fit normalized_shape {normalized_shape:?}",
                g.shape(),
                x.shape()
            ),
        ));
    }
    let (gi, gw, gb) = float_dispatch!("layer_norm backward", x.dtype(), T => {
        let xv = x.contiguous_vec::<T>();
        let (_, mean, rstd) = nk::layer_norm::<T>(&xv, k, None, None, eps);
        let wv = vec_of::<T>(weight);
        let (gi, gw, gb) = nk::layer_norm_backward::<T>(&g.contiguous_vec::<T>(), &xv, k, &mean, &rstd, wv.as_deref());
        (storage(gi), storage(gw), storage(gb))
    });
    Ok((
        Tensor::from_storage(gi, &x.shape()),
        Tensor::from_storage(gw, normalized_shape),
        Tensor::from_storage(gb, normalized_shape),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{gradcheck_default, uniform};

    #[test]
    fn pooling_values_and_grads() {
        let x = Tensor::arange(0.0, 16.0, 1.0, DType::F64)
            .unwrap()
            .reshape(&[1, 1, 4, 4])
            .unwrap();
        let y = max_pool2d(&x, (2, 2), None, (0, 0), (1, 1), false).unwrap();
        assert_eq!(y.to_vec_f64(), vec![5.0, 7.0, 13.0, 15.0]);
        let a = avg_pool2d(&x, (2, 2), None, (0, 0), false, true, None).unwrap();
        assert_eq!(a.to_vec_f64(), vec![2.5, 4.5, 10.5, 12.5]);
        let xi = uniform(&[2, 3, 6, 5], -1.0, 1.0, 3);
        gradcheck_default(
            |t| max_pool2d(&t[0], (3, 2), Some((2, 1)), (1, 1), (1, 2), true),
            std::slice::from_ref(&xi),
        )
        .unwrap();
        gradcheck_default(
            |t| avg_pool2d(&t[0], (3, 3), Some((2, 2)), (1, 1), true, false, None),
            &[xi],
        )
        .unwrap();
        let e = max_pool2d(
            &Tensor::zeros(&[1, 1, 4, 4], DType::F32),
            (2, 2),
            None,
            (2, 2),
            (1, 1),
            false,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("pad should be at most half"), "{e}");
    }

    #[test]
    fn batch_norm_train_updates_running_stats_and_grads() {
        let x = uniform(&[4, 3, 2, 2], -1.0, 1.0, 4);
        let rm = Tensor::zeros(&[3], DType::F64);
        let rv = Tensor::ones(&[3], DType::F64);
        let w = uniform(&[3], 0.5, 1.5, 5);
        let b = uniform(&[3], -0.5, 0.5, 6);
        let y = batch_norm(
            &x,
            Some(&rm),
            Some(&rv),
            Some(&w),
            Some(&b),
            true,
            0.1,
            1e-5,
        )
        .unwrap();
        assert_eq!(
            y.grad_fn_name().as_deref(),
            Some("NativeBatchNormBackward0")
        );
        // running_mean = 0.1 * batch mean of channel 0
        let xv = x.to_vec_f64();
        let ch0: Vec<f64> = (0..4)
            .flat_map(|n| xv[n * 12..n * 12 + 4].to_vec())
            .collect();
        let mean0 = ch0.iter().sum::<f64>() / 16.0;
        assert!((rm.to_vec_f64()[0] - 0.1 * mean0).abs() < 1e-12);
        let var0 = ch0.iter().map(|v| (v - mean0).powi(2)).sum::<f64>() / 15.0;
        assert!((rv.to_vec_f64()[0] - (0.9 + 0.1 * var0)).abs() < 1e-12);
        gradcheck_default(
            |t| batch_norm(&t[0], None, None, Some(&t[1]), Some(&t[2]), true, 0.1, 1e-5),
            &[x.clone(), w.clone(), b.clone()],
        )
        .unwrap();
        let rm2 = uniform(&[3], -0.2, 0.2, 7).detach();
        let rv2 = uniform(&[3], 0.5, 1.5, 8).detach();
        gradcheck_default(
            |t| {
                batch_norm(
                    &t[0],
                    Some(&rm2),
                    Some(&rv2),
                    Some(&t[1]),
                    Some(&t[2]),
                    false,
                    0.1,
                    1e-5,
                )
            },
            &[x, w, b],
        )
        .unwrap();
        let e = batch_norm(
            &Tensor::zeros(&[1, 3], DType::F32),
            None,
            None,
            None,
            None,
            true,
            0.1,
            1e-5,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("Expected more than 1 value per channel when training"),
            "{e}"
        );
    }

    #[test]
    fn layer_norm_grads_and_dropout() {
        let x = uniform(&[2, 3, 4], -1.0, 1.0, 9);
        let w = uniform(&[3, 4], 0.5, 1.5, 10);
        let b = uniform(&[3, 4], -0.5, 0.5, 11);
        gradcheck_default(
            |t| layer_norm(&t[0], &[3, 4], Some(&t[1]), Some(&t[2]), 1e-5),
            &[x.clone(), w, b],
        )
        .unwrap();
        let e = layer_norm(&x, &[5], None, None, 1e-5)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expected input with shape [*, 5]"), "{e}");
        crate::manual_seed(0);
        let d = dropout(&Tensor::ones(&[1000], DType::F32), 0.25, true).unwrap();
        let v = d.to_vec_f32();
        let zeros = v.iter().filter(|&&e| e == 0.0).count();
        assert!((150..350).contains(&zeros), "{zeros}");
        assert!(v.iter().all(|&e| e == 0.0 || (e - 4.0 / 3.0).abs() < 1e-6));
        assert!(dropout(&x, 0.5, false).unwrap().same_object(&x));
    }
}
