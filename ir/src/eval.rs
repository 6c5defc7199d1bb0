//! A small reference evaluator on f64 data, inside kiln-ir: constant folding
//! uses it, and tests use it to check that passes keep a graph's outputs.
//! It computes in f64 and rounds each result to its dtype (f32 through
//! `as f32`, i64 by truncation, bool as 0/1). Not evaluated: dropout (random)
//! and conv_transpose2d; f16/bf16 results are left in f64 (constant folding
//! skips them). The runtime's interpreter on the eager kernels is the real
//! oracle; this one only needs to be simple and obviously right.

use crate::graph::{Graph, Value};
use crate::op::{InputKind, Op};
use crate::types::{IrError, Result, TensorType};
use crate::{contiguous_strides, BinaryOp, DType, ReduceOp, UnaryOp};
use std::collections::HashMap;

/// A tensor of f64 values, row-major.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor64 {
    pub ty: TensorType,
    pub data: Vec<f64>,
}

impl Tensor64 {
    pub fn new(ty: TensorType, data: Vec<f64>) -> Tensor64 {
        Tensor64 { ty, data }
    }
    fn shape(&self) -> &[usize] {
        &self.ty.shape
    }
}

fn round_to(d: DType, x: f64) -> f64 {
    match d {
        DType::F32 => x as f32 as f64,
        DType::I64 => x.trunc(),
        DType::Bool => {
            if x != 0.0 {
                1.0
            } else {
                0.0
            }
        }
        _ => x,
    }
}

fn unary(u: UnaryOp, x: f64) -> f64 {
    use UnaryOp::*;
    match u {
        Neg => -x,
        Abs => x.abs(),
        Exp => x.exp(),
        Log => x.ln(),
        Sqrt => x.sqrt(),
        Rsqrt => 1.0 / x.sqrt(),
        Sin => x.sin(),
        Cos => x.cos(),
        Tanh => x.tanh(),
        Sigmoid => 1.0 / (1.0 + (-x).exp()),
        Relu => {
            if x > 0.0 || x.is_nan() {
                x
            } else {
                0.0
            }
        }
        LeakyRelu(s) => {
            if x > 0.0 {
                x
            } else {
                x * s
            }
        }
        GeluErf => 0.5 * x * (1.0 + libm::erf(x / std::f64::consts::SQRT_2)),
        GeluTanh => {
            let k = (2.0 / std::f64::consts::PI).sqrt();
            0.5 * x * (1.0 + (k * (x + 0.044715 * x * x * x)).tanh())
        }
        Erf => libm::erf(x),
        Clamp(lo, hi) => {
            let mut y = x;
            if let Some(lo) = lo {
                if y < lo {
                    y = lo;
                }
            }
            if let Some(hi) = hi {
                if y > hi {
                    y = hi;
                }
            }
            y
        }
        PowScalar(p) => x.powf(p),
        RPowScalar(s) => s.powf(x),
        AddScalar(s) => x + s,
        MulScalar(s) => x * s,
        RSubScalar(s) => s - x,
        RDivScalar(s) => s / x,
        Square => x * x,
        Reciprocal => 1.0 / x,
        Sign => {
            if x > 0.0 {
                1.0
            } else if x < 0.0 {
                -1.0
            } else {
                x
            }
        }
        Step => {
            if x > 0.0 {
                1.0
            } else {
                0.0
            }
        }
    }
}

fn binary(b: BinaryOp, x: f64, y: f64) -> f64 {
    use BinaryOp::*;
    let t = |c: bool| if c { 1.0 } else { 0.0 };
    match b {
        Add => x + y,
        Sub => x - y,
        Mul => x * y,
        Div => x / y,
        Pow => x.powf(y),
        Maximum => {
            if x.is_nan() || y.is_nan() {
                f64::NAN
            } else {
                x.max(y)
            }
        }
        Minimum => {
            if x.is_nan() || y.is_nan() {
                f64::NAN
            } else {
                x.min(y)
            }
        }
        Eq => t(x == y),
        Ne => t(x != y),
        Lt => t(x < y),
        Le => t(x <= y),
        Gt => t(x > y),
        Ge => t(x >= y),
    }
}

/// Values of `t` read through a view: `out_shape`, element strides (0 for
/// broadcast dims) and an offset into `t.data`.
fn gather(t: &[f64], out_shape: &[usize], strides: &[usize], offset: usize) -> Vec<f64> {
    let n = crate::numel(out_shape);
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; out_shape.len()];
    for _ in 0..n {
        let pos: usize = offset + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>();
        out.push(t[pos]);
        for d in (0..out_shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < out_shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    out
}

/// Data of `t` broadcast to `shape` (trailing alignment).
fn broadcast_to(t: &Tensor64, shape: &[usize]) -> Vec<f64> {
    if t.shape() == shape {
        return t.data.clone();
    }
    let st = contiguous_strides(t.shape());
    let off = shape.len() - t.shape().len();
    let strides: Vec<usize> = (0..shape.len())
        .map(|d| {
            if d < off || t.shape()[d - off] == 1 {
                0
            } else {
                st[d - off]
            }
        })
        .collect();
    gather(&t.data, shape, &strides, 0)
}

/// For each input flat index, the flat index of its reduction slot.
fn reduce_map(shape: &[usize], dims: &[usize]) -> (Vec<usize>, usize) {
    let out_shape: Vec<usize> = shape
        .iter()
        .enumerate()
        .map(|(i, &s)| if dims.contains(&i) { 1 } else { s })
        .collect();
    let ost = contiguous_strides(&out_shape);
    let n = crate::numel(shape);
    let mut map = Vec::with_capacity(n);
    let mut idx = vec![0usize; shape.len()];
    for _ in 0..n {
        let o: usize = idx
            .iter()
            .enumerate()
            .map(|(d, &i)| if dims.contains(&d) { 0 } else { i * ost[d] })
            .sum();
        map.push(o);
        for d in (0..shape.len()).rev() {
            idx[d] += 1;
            if idx[d] < shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
    (map, crate::numel(&out_shape))
}

/// (outer, size, inner) split of a shape around `dim`.
fn split(shape: &[usize], dim: usize) -> (usize, usize, usize) {
    if shape.is_empty() {
        return (1, 1, 1);
    }
    (
        shape[..dim].iter().product(),
        shape[dim],
        shape[dim + 1..].iter().product(),
    )
}

fn matmul2(a: &[f64], b: &[f64], m: usize, k: usize, n: usize, out: &mut Vec<f64>) {
    for i in 0..m {
        for j in 0..n {
            let mut s = 0.0;
            for p in 0..k {
                s += a[i * k + p] * b[p * n + j];
            }
            out.push(s);
        }
    }
}

fn matmul(a: &Tensor64, b: &Tensor64, out_ty: &TensorType) -> Vec<f64> {
    let (ar, br) = (a.shape().len(), b.shape().len());
    let a_sh: Vec<usize> = if ar == 1 {
        vec![1, a.shape()[0]]
    } else {
        a.shape().to_vec()
    };
    let b_sh: Vec<usize> = if br == 1 {
        vec![b.shape()[0], 1]
    } else {
        b.shape().to_vec()
    };
    let (m, k) = (a_sh[a_sh.len() - 2], a_sh[a_sh.len() - 1]);
    let n = b_sh[b_sh.len() - 1];
    let batch = crate::broadcast_shapes(&a_sh[..a_sh.len() - 2], &b_sh[..b_sh.len() - 2])
        .expect("inference checked the batch broadcast");
    let mut afull = batch.clone();
    afull.extend([m, k]);
    let mut bfull = batch.clone();
    bfull.extend([k, n]);
    let a2 = broadcast_to(
        &Tensor64::new(a.ty.with_shape(a_sh), a.data.clone()),
        &afull,
    );
    let b2 = broadcast_to(
        &Tensor64::new(b.ty.with_shape(b_sh), b.data.clone()),
        &bfull,
    );
    let nb = crate::numel(&batch);
    let mut out = Vec::with_capacity(crate::numel(&out_ty.shape));
    for bi in 0..nb {
        matmul2(
            &a2[bi * m * k..(bi + 1) * m * k],
            &b2[bi * k * n..(bi + 1) * k * n],
            m,
            k,
            n,
            &mut out,
        );
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn conv2d(
    x: &Tensor64,
    w: &Tensor64,
    bias: Option<&Tensor64>,
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    out_ty: &TensorType,
) -> Vec<f64> {
    let (n, c, h, wd) = (x.shape()[0], x.shape()[1], x.shape()[2], x.shape()[3]);
    let (o, cg, kh, kw) = (w.shape()[0], w.shape()[1], w.shape()[2], w.shape()[3]);
    let (ho, wo) = (out_ty.shape[2], out_ty.shape[3]);
    let og = o / groups;
    let mut out = vec![0.0; n * o * ho * wo];
    for b in 0..n {
        for oc in 0..o {
            let g = oc / og;
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut s = bias.map_or(0.0, |bb| bb.data[oc]);
                    for ic in 0..cg {
                        let ch = g * cg + ic;
                        for ky in 0..kh {
                            let iy =
                                (oy * stride[0] + ky * dilation[0]) as isize - padding[0] as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..kw {
                                let ix = (ox * stride[1] + kx * dilation[1]) as isize
                                    - padding[1] as isize;
                                if ix < 0 || ix >= wd as isize {
                                    continue;
                                }
                                s += x.data[((b * c + ch) * h + iy as usize) * wd + ix as usize]
                                    * w.data[((oc * cg + ic) * kh + ky) * kw + kx];
                            }
                        }
                    }
                    out[((b * o + oc) * ho + oy) * wo + ox] = s;
                }
            }
        }
    }
    out
}

/// Max or average pooling over the last two dims.
fn pool(x: &Tensor64, op: &Op, out_ty: &TensorType) -> Vec<f64> {
    let r = x.shape().len();
    let (h, w) = (x.shape()[r - 2], x.shape()[r - 1]);
    let (ho, wo) = (out_ty.shape[r - 2], out_ty.shape[r - 1]);
    let planes = crate::numel(&x.shape()[..r - 2]);
    let (kernel, stride, padding, dilation) = match op {
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
            dilation,
            ..
        } => (*kernel, *stride, *padding, *dilation),
        Op::AvgPool2d {
            kernel,
            stride,
            padding,
            ..
        } => (*kernel, *stride, *padding, [1, 1]),
        _ => unreachable!("pool() is only called for pooling ops"),
    };
    let mut out = Vec::with_capacity(planes * ho * wo);
    for p in 0..planes {
        for oy in 0..ho {
            for ox in 0..wo {
                let y0 = (oy * stride[0]) as isize - padding[0] as isize;
                let x0 = (ox * stride[1]) as isize - padding[1] as isize;
                match op {
                    Op::MaxPool2d { .. } => {
                        let mut m = f64::NEG_INFINITY;
                        for ky in 0..kernel[0] {
                            for kx in 0..kernel[1] {
                                let iy = y0 + (ky * dilation[0]) as isize;
                                let ix = x0 + (kx * dilation[1]) as isize;
                                if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w {
                                    let v = x.data[(p * h + iy as usize) * w + ix as usize];
                                    if v > m || v.is_nan() {
                                        m = v;
                                    }
                                }
                            }
                        }
                        out.push(m);
                    }
                    Op::AvgPool2d {
                        count_include_pad,
                        divisor_override,
                        ..
                    } => {
                        // PyTorch: the window is clipped to input + padding
                        // for the padded count, to the input for the sum.
                        let hend = (y0 + kernel[0] as isize).min((h + padding[0]) as isize);
                        let wend = (x0 + kernel[1] as isize).min((w + padding[1]) as isize);
                        let pool_size = (hend - y0) * (wend - x0);
                        let (ys, xs) = (y0.max(0), x0.max(0));
                        let (ye, xe) = (hend.min(h as isize), wend.min(w as isize));
                        let mut s = 0.0;
                        for iy in ys..ye {
                            for ix in xs..xe {
                                s += x.data[(p * h + iy as usize) * w + ix as usize];
                            }
                        }
                        let div = match divisor_override {
                            Some(d) => *d as isize,
                            None if *count_include_pad => pool_size,
                            None => (ye - ys) * (xe - xs),
                        };
                        out.push(s / div as f64);
                    }
                    _ => unreachable!(),
                }
            }
        }
    }
    out
}

/// Evaluate one op on f64 operands. `Ok(None)` means this evaluator does
/// not implement the op (dropout, conv_transpose2d, inputs).
pub fn eval_op(op: &Op, args: &[Tensor64]) -> Result<Option<Vec<Tensor64>>> {
    let types: Vec<TensorType> = args.iter().map(|a| a.ty.clone()).collect();
    let out_types = crate::op::infer(op, &types)?;
    let oty = &out_types[0];
    let data: Vec<Vec<f64>> = match op {
        Op::Input { .. }
        | Op::Dropout { .. }
        | Op::ConvTranspose2d { .. }
        | Op::ModuleCall { .. }
        | Op::Conv2dBackwardInput { .. }
        | Op::Conv2dBackwardWeight { .. }
        | Op::MaxPool2dWithIndices { .. }
        | Op::MaxPool2dBackward { .. }
        | Op::AvgPool2dBackward { .. }
        | Op::BatchNormBackward { .. }
        | Op::LayerNormBackward { .. }
        | Op::DropoutMask { .. }
        | Op::SliceBackward { .. }
        | Op::IndexSelectBackward { .. } => return Ok(None),
        Op::Constant { data, .. } => vec![data.clone()],
        Op::Unary(u) => vec![args[0].data.iter().map(|&x| unary(*u, x)).collect()],
        Op::Binary(b) => {
            let x = broadcast_to(&args[0], &oty.shape);
            let y = broadcast_to(&args[1], &oty.shape);
            // Integer division is true division; the operands are promoted
            // to the result dtype first (so i64 pow stays integral).
            vec![x.iter().zip(&y).map(|(&x, &y)| binary(*b, x, y)).collect()]
        }
        Op::Where => {
            let c = broadcast_to(&args[0], &oty.shape);
            let x = broadcast_to(&args[1], &oty.shape);
            let y = broadcast_to(&args[2], &oty.shape);
            vec![c
                .iter()
                .zip(x.iter().zip(&y))
                .map(|(&c, (&x, &y))| if c != 0.0 { x } else { y })
                .collect()]
        }
        Op::Cast(_) => vec![args[0].data.clone()],
        Op::Reduce { op: r, dims, .. } => {
            let (map, n) = reduce_map(args[0].shape(), dims);
            let init = match r {
                ReduceOp::Sum | ReduceOp::Mean => 0.0,
                ReduceOp::Prod => 1.0,
                ReduceOp::Max => f64::NEG_INFINITY,
                ReduceOp::Min => f64::INFINITY,
            };
            let mut acc = vec![init; n];
            for (&x, &o) in args[0].data.iter().zip(&map) {
                acc[o] = match r {
                    ReduceOp::Sum | ReduceOp::Mean => acc[o] + x,
                    ReduceOp::Prod => acc[o] * x,
                    ReduceOp::Max => {
                        if x.is_nan() || x > acc[o] {
                            x
                        } else {
                            acc[o]
                        }
                    }
                    ReduceOp::Min => {
                        if x.is_nan() || x < acc[o] {
                            x
                        } else {
                            acc[o]
                        }
                    }
                };
            }
            if *r == ReduceOp::Mean {
                let cnt = (args[0].data.len() / n.max(1)) as f64;
                acc.iter_mut().for_each(|a| *a /= cnt);
            }
            vec![acc]
        }
        Op::Var {
            dims, correction, ..
        } => {
            let (map, n) = reduce_map(args[0].shape(), dims);
            let cnt = (args[0].data.len() / n.max(1)) as f64;
            let mut mean = vec![0.0; n];
            for (&x, &o) in args[0].data.iter().zip(&map) {
                mean[o] += x / cnt;
            }
            let mut ss = vec![0.0; n];
            for (&x, &o) in args[0].data.iter().zip(&map) {
                ss[o] += (x - mean[o]) * (x - mean[o]);
            }
            vec![ss
                .into_iter()
                .map(|s| s / (cnt - correction).max(0.0))
                .collect()]
        }
        Op::ArgMax { dim, .. }
        | Op::ArgMin { dim, .. }
        | Op::MaxDim { dim, .. }
        | Op::MinDim { dim, .. } => {
            let is_max = matches!(op, Op::ArgMax { .. } | Op::MaxDim { .. });
            let (outer, size, inner) = split(args[0].shape(), *dim);
            let (mut vals, mut idxs) = (Vec::new(), Vec::new());
            for o in 0..outer {
                for i in 0..inner {
                    let (mut best, mut bi) = (args[0].data[o * size * inner + i], 0);
                    for k in 1..size {
                        let v = args[0].data[(o * size + k) * inner + i];
                        let better = if is_max { v > best } else { v < best };
                        if !best.is_nan() && (better || v.is_nan()) {
                            best = v;
                            bi = k;
                        }
                    }
                    vals.push(best);
                    idxs.push(bi as f64);
                }
            }
            match op {
                Op::MaxDim { .. } | Op::MinDim { .. } => vec![vals, idxs],
                _ => vec![idxs],
            }
        }
        Op::Softmax { dim } | Op::LogSoftmax { dim } => {
            let (outer, size, inner) = split(args[0].shape(), *dim);
            let mut out = args[0].data.clone();
            for o in 0..outer {
                for i in 0..inner {
                    let at = |k: usize| (o * size + k) * inner + i;
                    let m = (0..size)
                        .map(|k| args[0].data[at(k)])
                        .fold(f64::NEG_INFINITY, f64::max);
                    let s: f64 = (0..size).map(|k| (args[0].data[at(k)] - m).exp()).sum();
                    for k in 0..size {
                        let x = args[0].data[at(k)] - m;
                        out[at(k)] = if matches!(op, Op::Softmax { .. }) {
                            x.exp() / s
                        } else {
                            x - s.ln()
                        };
                    }
                }
            }
            vec![out]
        }
        Op::MatMul => vec![matmul(&args[0], &args[1], oty)],
        Op::Addmm => {
            let mut mm = matmul(&args[1], &args[2], oty);
            let b = broadcast_to(&args[0], &oty.shape);
            mm.iter_mut().zip(&b).for_each(|(m, b)| *m += b);
            vec![mm]
        }
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        } => vec![conv2d(
            &args[0],
            &args[1],
            args.get(2),
            *stride,
            *padding,
            *dilation,
            *groups,
            oty,
        )],
        Op::MaxPool2d { .. } | Op::AvgPool2d { .. } => vec![pool(&args[0], op, oty)],
        Op::BatchNorm {
            training,
            momentum,
            eps,
            has_weight,
            has_bias,
            has_running_stats,
        } => {
            let x = &args[0];
            let c = x.shape()[1];
            let (outer, _, inner) = split(x.shape(), 1);
            let mut k = 1;
            let w = if *has_weight {
                k += 1;
                Some(&args[k - 1])
            } else {
                None
            };
            let b = if *has_bias {
                k += 1;
                Some(&args[k - 1])
            } else {
                None
            };
            let (rm, rv) = if *has_running_stats {
                (Some(&args[k]), Some(&args[k + 1]))
            } else {
                (None, None)
            };
            let cnt = (outer * inner) as f64;
            let (mut mean, mut var) = (vec![0.0; c], vec![0.0; c]);
            if *training {
                for ch in 0..c {
                    let vals =
                        (0..outer).flat_map(|o| (0..inner).map(move |i| (o * c + ch) * inner + i));
                    let m: f64 = vals.clone().map(|p| x.data[p]).sum::<f64>() / cnt;
                    let v: f64 = vals.map(|p| (x.data[p] - m) * (x.data[p] - m)).sum::<f64>() / cnt;
                    mean[ch] = m;
                    var[ch] = v;
                }
            } else {
                mean = rm.expect("eval batch_norm has running stats").data.clone();
                var = rv.expect("eval batch_norm has running stats").data.clone();
            }
            let mut y = x.data.clone();
            for o in 0..outer {
                for ch in 0..c {
                    let scale = w.map_or(1.0, |w| w.data[ch]) / (var[ch] + eps).sqrt();
                    let shift = b.map_or(0.0, |b| b.data[ch]);
                    for i in 0..inner {
                        let p = (o * c + ch) * inner + i;
                        y[p] = (x.data[p] - mean[ch]) * scale + shift;
                    }
                }
            }
            let mut outs = vec![y];
            if *training && *has_running_stats {
                let (rm, rv) = (rm.unwrap(), rv.unwrap());
                let unbiased = cnt / (cnt - 1.0);
                outs.push(
                    (0..c)
                        .map(|ch| (1.0 - momentum) * rm.data[ch] + momentum * mean[ch])
                        .collect(),
                );
                outs.push(
                    (0..c)
                        .map(|ch| (1.0 - momentum) * rv.data[ch] + momentum * var[ch] * unbiased)
                        .collect(),
                );
            }
            outs
        }
        Op::LayerNorm {
            normalized_shape,
            eps,
            has_weight,
            has_bias,
        } => {
            let x = &args[0];
            let inner = crate::numel(normalized_shape);
            let rows = x.data.len() / inner.max(1);
            let w = has_weight.then(|| &args[1]);
            let b = has_bias.then(|| &args[1 + *has_weight as usize]);
            let mut y = Vec::with_capacity(x.data.len());
            for r in 0..rows {
                let row = &x.data[r * inner..(r + 1) * inner];
                let m = row.iter().sum::<f64>() / inner as f64;
                let v = row.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / inner as f64;
                let rs = 1.0 / (v + eps).sqrt();
                for (j, &xv) in row.iter().enumerate() {
                    y.push(
                        (xv - m) * rs * w.map_or(1.0, |w| w.data[j]) + b.map_or(0.0, |b| b.data[j]),
                    );
                }
            }
            vec![y]
        }
        Op::Reshape { .. } | Op::Contiguous => vec![args[0].data.clone()],
        Op::Permute { dims } => {
            let st = contiguous_strides(args[0].shape());
            let strides: Vec<usize> = dims.iter().map(|&d| st[d]).collect();
            vec![gather(&args[0].data, &oty.shape, &strides, 0)]
        }
        Op::Expand { .. } => vec![broadcast_to(&args[0], &oty.shape)],
        Op::Slice {
            dim, start, step, ..
        } => {
            let mut strides = contiguous_strides(args[0].shape());
            let off = start * strides[*dim];
            strides[*dim] *= step;
            vec![gather(&args[0].data, &oty.shape, &strides, off)]
        }
        Op::Select { dim, index } => {
            let mut strides = contiguous_strides(args[0].shape());
            let off = index * strides[*dim];
            strides.remove(*dim);
            vec![gather(&args[0].data, &oty.shape, &strides, off)]
        }
        Op::IndexSelect { dim } => {
            let x = &args[0];
            if x.shape().is_empty() {
                vec![x.data.clone()]
            } else {
                let (outer, size, inner) = split(x.shape(), *dim);
                let mut out = Vec::new();
                for o in 0..outer {
                    for &ix in &args[1].data {
                        let ix = ix as usize;
                        if ix >= size {
                            return Err(IrError::Type {
                                op: "index_select".into(),
                                operands: types,
                                msg: format!("index {ix} out of range for size {size}"),
                            });
                        }
                        let base = (o * size + ix) * inner;
                        out.extend_from_slice(&x.data[base..base + inner]);
                    }
                }
                vec![out]
            }
        }
        Op::Cat { dim } | Op::Stack { dim } => {
            let stack = matches!(op, Op::Stack { .. });
            let outer: usize = oty.shape[..*dim].iter().product();
            let mut out = Vec::with_capacity(oty.numel());
            for o in 0..outer {
                for a in args {
                    let chunk = if stack {
                        a.data.len() / outer.max(1)
                    } else {
                        a.shape()[*dim..].iter().product()
                    };
                    out.extend_from_slice(&a.data[o * chunk..(o + 1) * chunk]);
                }
            }
            vec![out]
        }
    };
    Ok(Some(
        out_types
            .into_iter()
            .zip(data)
            .map(|(ty, d)| {
                let d = d.into_iter().map(|x| round_to(ty.dtype, x)).collect();
                Tensor64::new(ty, d)
            })
            .collect(),
    ))
}

/// Run a whole graph; `bind` gives the data of each graph input. Returns
/// the graph outputs in order. Errors on an op the evaluator lacks.
pub fn eval_graph(
    g: &Graph,
    bind: &dyn Fn(&InputKind) -> Option<Vec<f64>>,
) -> Result<Vec<Tensor64>> {
    let mut env: HashMap<Value, Tensor64> = HashMap::new();
    for n in g.topo_order()? {
        let node = g.node(n);
        let outs = if let Op::Input { kind, ty } = &node.op {
            let d = bind(kind).ok_or_else(|| {
                IrError::Builder(format!("no data bound for graph input {kind:?}"))
            })?;
            if d.len() != ty.numel() {
                return Err(IrError::Builder(format!(
                    "input {kind:?} has {} values, its type {ty} needs {}",
                    d.len(),
                    ty.numel()
                )));
            }
            vec![Tensor64::new(ty.clone(), d)]
        } else {
            let args: Vec<Tensor64> = g.operands(n).iter().map(|v| env[v].clone()).collect();
            eval_op(&node.op, &args)?.ok_or_else(|| {
                IrError::Builder(format!(
                    "the reference evaluator does not implement {} (node %{})",
                    node.op.name(),
                    n.index()
                ))
            })?
        };
        for (i, t) in outs.into_iter().enumerate() {
            env.insert(Value::new(n, i), t);
        }
    }
    Ok(g.outputs().iter().map(|o| env[&o.value].clone()).collect())
}

#[cfg(test)]
#[allow(clippy::cloned_ref_to_slice_refs)]
mod tests {
    use super::*;

    fn t64(shape: &[usize], data: Vec<f64>) -> Tensor64 {
        Tensor64::new(TensorType::new(shape, DType::F64), data)
    }
    fn run(op: Op, args: &[Tensor64]) -> Vec<Tensor64> {
        eval_op(&op, args).unwrap().unwrap()
    }

    #[test]
    fn reference_values() {
        let x = t64(&[2, 3], vec![1.0, 2.0, 3.0, 4.0, 6.0, 8.0]);
        // torch.tensor([[1.,2,3],[4,6,8]]).var(1) -> [1., 4.]
        let v = run(
            Op::Var {
                dims: vec![1],
                correction: 1.0,
                keepdim: false,
            },
            &[x.clone()],
        );
        assert_eq!(v[0].data, vec![1.0, 4.0]);
        // .sum(0) -> [5, 8, 11]; .permute(1, 0) -> [[1,4],[2,6],[3,8]]
        let s = run(
            Op::Reduce {
                op: ReduceOp::Sum,
                dims: vec![0],
                keepdim: false,
            },
            &[x.clone()],
        );
        assert_eq!(s[0].data, vec![5.0, 8.0, 11.0]);
        let p = run(Op::Permute { dims: vec![1, 0] }, &[x.clone()]);
        assert_eq!(p[0].data, vec![1.0, 4.0, 2.0, 6.0, 3.0, 8.0]);
        // torch.softmax(torch.tensor([1., 2, 3]), 0) -> [0.0900, 0.2447, 0.6652]
        let sm = run(Op::Softmax { dim: 0 }, &[t64(&[3], vec![1.0, 2.0, 3.0])]);
        let e: Vec<f64> = [1.0f64, 2.0, 3.0].iter().map(|v| v.exp()).collect();
        let z: f64 = e.iter().sum();
        for (a, b) in sm[0].data.iter().zip(&e) {
            assert!((a - b / z).abs() < 1e-15);
        }
        // torch.max(x, 1) -> values [3, 8], indices [2, 2]
        let m = run(
            Op::MaxDim {
                dim: 1,
                keepdim: false,
            },
            &[x.clone()],
        );
        assert_eq!(
            (m[0].data.clone(), m[1].data.clone()),
            (vec![3.0, 8.0], vec![2.0, 2.0])
        );
        // x[:, ::2] -> [[1,3],[4,8]]; x.select(1, 1) -> [2, 6]
        let sl = run(
            Op::Slice {
                dim: 1,
                start: 0,
                end: 3,
                step: 2,
            },
            &[x.clone()],
        );
        assert_eq!(sl[0].data, vec![1.0, 3.0, 4.0, 8.0]);
        let se = run(Op::Select { dim: 1, index: 1 }, &[x.clone()]);
        assert_eq!(se[0].data, vec![2.0, 6.0]);
        // torch.cat([x, x[:, :1]], 1) rows: [1,2,3,1], [4,6,8,4]
        let first = run(
            Op::Slice {
                dim: 1,
                start: 0,
                end: 1,
                step: 1,
            },
            &[x.clone()],
        );
        let c = run(Op::Cat { dim: 1 }, &[x.clone(), first[0].clone()]);
        assert_eq!(c[0].data, vec![1.0, 2.0, 3.0, 1.0, 4.0, 6.0, 8.0, 4.0]);
        // batched matmul with broadcast: [2,1,2] @ [2,1] -> [2,1,1]
        let a = t64(&[2, 1, 2], vec![1.0, 2.0, 3.0, 4.0]);
        let b = t64(&[2, 1], vec![10.0, 1.0]);
        assert_eq!(run(Op::MatMul, &[a, b])[0].data, vec![12.0, 34.0]);
        // f32 results are rounded to f32.
        let f = Tensor64::new(TensorType::new(&[1], DType::F32), vec![0.1]);
        let y = run(Op::Unary(UnaryOp::MulScalar(3.0)), &[f]);
        assert_eq!(y[0].data[0], (0.1f64 * 3.0) as f32 as f64);
    }

    #[test]
    fn conv_and_pool_reference_values() {
        // 1x1x3x3 input 1..9, 2x2 kernel of ones, bias 0.5:
        // F.conv2d(x, w, b) -> [[12.5, 16.5], [24.5, 28.5]]
        let x = t64(&[1, 1, 3, 3], (1..=9).map(|v| v as f64).collect());
        let w = t64(&[1, 1, 2, 2], vec![1.0; 4]);
        let b = t64(&[1], vec![0.5]);
        let conv = Op::Conv2d {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        };
        assert_eq!(
            run(conv, &[x.clone(), w, b])[0].data,
            vec![12.5, 16.5, 24.5, 28.5]
        );
        // F.max_pool2d(x, 2, 2, ceil_mode=True) -> [[5, 6], [8, 9]]
        let mp = Op::MaxPool2d {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
            dilation: [1, 1],
            ceil_mode: true,
        };
        assert_eq!(run(mp, &[x.clone()])[0].data, vec![5.0, 6.0, 8.0, 9.0]);
        // F.avg_pool2d(x, 2, 2, padding=1) -> [[0.25, 1.25], [2.75, 7.0]]
        // (count_include_pad=True divides by 4 everywhere)
        let ap = |count_include_pad| Op::AvgPool2d {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [1, 1],
            ceil_mode: false,
            count_include_pad,
            divisor_override: None,
        };
        assert_eq!(
            run(ap(true), &[x.clone()])[0].data,
            vec![0.25, 1.25, 2.75, 7.0]
        );
        // count_include_pad=False -> [[1, 2.5], [5.5, 7]]
        assert_eq!(run(ap(false), &[x])[0].data, vec![1.0, 2.5, 5.5, 7.0]);
    }
}
