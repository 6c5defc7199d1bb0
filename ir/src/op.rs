//! The graph op set (one enum at the level of PyTorch's aten ops) and its one
//! type-inference function. Shape rules are PyTorch's: broadcasting, matmul
//! batch broadcast, conv/pool output sizes (incl. ceil_mode), reductions.
//! Dims are already normalized (non-negative) and view shapes have their -1
//! resolved by the tracer.

use crate::shape::reduced_shape;
use crate::types::{IrError, Result, TensorType};
use crate::{broadcast_shapes, BinaryOp, DType, ReduceOp, UnaryOp};
use serde::{Deserialize, Serialize};

/// Where a graph input comes from. Parameters and buffers are bound by name
/// (the module's state_dict key), so a compiled graph sees later updates.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum InputKind {
    /// The i-th positional input of the traced call.
    User(usize),
    Param(String),
    Buffer(String),
}

/// One graph op. Optional operands are described by flags so that operand
/// positions are unambiguous.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Op {
    /// A graph input (no operands).
    Input {
        kind: InputKind,
        ty: TensorType,
    },
    /// A small literal tensor, row-major, stored as f64 whatever its dtype.
    Constant {
        ty: TensorType,
        #[serde(with = "f64_list")]
        data: Vec<f64>,
    },
    Unary(UnaryOp),
    /// Elementwise with broadcasting and PyTorch type promotion.
    Binary(BinaryOp),
    /// where(cond, a, b), all three broadcast.
    Where,
    Cast(DType),
    Reduce {
        op: ReduceOp,
        dims: Vec<usize>,
        keepdim: bool,
    },
    /// Variance with `correction` (1 = unbiased).
    Var {
        dims: Vec<usize>,
        correction: f64,
        keepdim: bool,
    },
    ArgMax {
        dim: usize,
        keepdim: bool,
    },
    ArgMin {
        dim: usize,
        keepdim: bool,
    },
    /// `torch.max(x, dim)`: outputs (values, indices).
    MaxDim {
        dim: usize,
        keepdim: bool,
    },
    /// `torch.min(x, dim)`: outputs (values, indices).
    MinDim {
        dim: usize,
        keepdim: bool,
    },
    Softmax {
        dim: usize,
    },
    LogSoftmax {
        dim: usize,
    },
    /// `torch.matmul` semantics (1-D promotion, batch broadcast).
    MatMul,
    /// bias + mat1 @ mat2 (operands: bias, mat1, mat2).
    Addmm,
    /// Operands: x [N,C,H,W], weight [O,C/g,kh,kw], optional bias [O].
    Conv2d {
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    },
    /// Operands: x [N,C,H,W], weight [C,O/g,kh,kw], optional bias [O].
    ConvTranspose2d {
        stride: [usize; 2],
        padding: [usize; 2],
        output_padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
    },
    MaxPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        ceil_mode: bool,
    },
    AvgPool2d {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        ceil_mode: bool,
        count_include_pad: bool,
        divisor_override: Option<usize>,
    },
    /// Operands: x, [weight], [bias], [running_mean, running_var].
    /// Outputs: y, and in training with running stats the new running_mean
    /// and running_var (to be written back to the buffers).
    BatchNorm {
        training: bool,
        momentum: f64,
        eps: f64,
        has_weight: bool,
        has_bias: bool,
        has_running_stats: bool,
    },
    /// Operands: x, [weight], [bias] (both of `normalized_shape`).
    LayerNorm {
        normalized_shape: Vec<usize>,
        eps: f64,
        has_weight: bool,
        has_bias: bool,
    },
    /// Training-mode dropout; the mask comes from (seed, offset) so that a
    /// graph run is reproducible.
    Dropout {
        p: f64,
        seed: u64,
        offset: u64,
    },
    Reshape {
        shape: Vec<usize>,
    },
    /// Also used for transpose, t() and mT.
    Permute {
        dims: Vec<usize>,
    },
    Expand {
        shape: Vec<usize>,
    },
    /// Start/end already clamped to [0, size], step >= 1.
    Slice {
        dim: usize,
        start: usize,
        end: usize,
        step: usize,
    },
    Select {
        dim: usize,
        index: usize,
    },
    /// Operands: x, index (1-D i64).
    IndexSelect {
        dim: usize,
    },
    Contiguous,
    Cat {
        dim: usize,
    },
    Stack {
        dim: usize,
    },
    /// A call of the submodule at `path` (relative to the traced root)
    /// that has hooks: the compiled runtime runs the module's `call` (its
    /// pre-hooks, forward and forward hooks, live) between compiled
    /// segments. `ty` is the output type seen when tracing. Not pure: never
    /// merged, folded or removed.
    ModuleCall {
        path: String,
        ty: TensorType,
    },
    // ----- backward ops (emitted by `autodiff`) -----
    /// Gradient of conv2d w.r.t. its input. Operands: grad_out
    /// [N,O,Ho,Wo], weight [O,C/g,kh,kw]; `input_size` is the input's (H, W).
    Conv2dBackwardInput {
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        input_size: [usize; 2],
    },
    /// Gradient of conv2d w.r.t. its weight. Operands: grad_out, x
    /// [N,C,H,W]; `kernel` is the weight's (kh, kw).
    Conv2dBackwardWeight {
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        groups: usize,
        kernel: [usize; 2],
    },
    /// max_pool2d that also outputs the i64 argmax indices (flat within
    /// each input plane), for the backward (compiled training rewrites
    /// max_pool2d to it). Outputs: values, indices.
    MaxPool2dWithIndices {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        dilation: [usize; 2],
        ceil_mode: bool,
    },
    /// Gradient of max_pool2d. Operands: grad_out, indices (from
    /// `MaxPool2dWithIndices`); `input_size` is the input's (H, W).
    MaxPool2dBackward {
        input_size: [usize; 2],
    },
    /// Gradient of avg_pool2d. Operand: grad_out; `input_size` is the
    /// input's (H, W).
    AvgPool2dBackward {
        kernel: [usize; 2],
        stride: [usize; 2],
        padding: [usize; 2],
        ceil_mode: bool,
        count_include_pad: bool,
        divisor_override: Option<usize>,
        input_size: [usize; 2],
    },
    /// Gradient of batch_norm. Operands: grad_out, x, [weight], and in eval
    /// mode running_mean, running_var (training recomputes the batch
    /// statistics from x). Outputs: grad_x, grad_weight [C], grad_bias [C].
    BatchNormBackward {
        training: bool,
        eps: f64,
        has_weight: bool,
    },
    /// Gradient of layer_norm. Operands: grad_out, x, [weight] (the row
    /// statistics are recomputed from x). Outputs: grad_x, grad_weight,
    /// grad_bias (both of `normalized_shape`).
    LayerNormBackward {
        normalized_shape: Vec<usize>,
        eps: f64,
        has_weight: bool,
    },
    /// The scaled keep-mask of training dropout (0 or 1/(1-p)) for an
    /// operand of x's type, drawn from the global generator exactly as
    /// eager `dropout` draws it. Compiled training rewrites
    /// `dropout(x)` to `x * dropout_mask(x)` so the mask can be saved.
    DropoutMask {
        p: f64,
    },
    /// Gradient of a slice: zeros of `input_shape` with the operand written
    /// at `[start:end:step]` along `dim`.
    SliceBackward {
        input_shape: Vec<usize>,
        dim: usize,
        start: usize,
        end: usize,
        step: usize,
    },
    /// Gradient of index_select: operands grad_out, index; zeros with
    /// `size` rows along `dim`, grad_out rows added at the indices.
    IndexSelectBackward {
        dim: usize,
        size: usize,
    },
}

/// The family of an op: what fusion and the printer care about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum OpClass {
    Input,
    Constant,
    /// Elementwise over the output shape (incl. eval BatchNorm and dropout).
    Pointwise,
    /// Reduces over some dims (sum, var, softmax, layer_norm, training BN...).
    Reduction,
    /// matmul, addmm, conv, conv_transpose.
    Contraction,
    /// max/avg pooling (a windowed reduction).
    Pool,
    /// Layout only: reshape, permute, expand, slice, select, contiguous.
    View,
    /// Data movement that is not a view: cat, stack, index_select.
    Copy,
}

/// stride, padding, dilation, groups as printer attributes.
fn conv_attrs(
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
) -> Vec<(&'static str, String)> {
    let l = |v: [usize; 2]| format!("[{},{}]", v[0], v[1]);
    vec![
        ("stride", l(stride)),
        ("padding", l(padding)),
        ("dilation", l(dilation)),
        ("groups", groups.to_string()),
    ]
}

impl Op {
    /// aten-like op name, used by the printer and in errors.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Input { kind, .. } => match kind {
                InputKind::User(_) => "input",
                InputKind::Param(_) => "param",
                InputKind::Buffer(_) => "buffer",
            },
            Op::Constant { .. } => "constant",
            Op::Unary(u) => match u {
                UnaryOp::AddScalar(_) => "add_scalar",
                UnaryOp::MulScalar(_) => "mul_scalar",
                UnaryOp::RSubScalar(_) => "rsub_scalar",
                UnaryOp::RDivScalar(_) => "rdiv_scalar",
                UnaryOp::PowScalar(_) => "pow_scalar",
                UnaryOp::RPowScalar(_) => "rpow_scalar",
                u => u.name(),
            },
            Op::Binary(b) => b.name(),
            Op::Where => "where",
            Op::Cast(_) => "cast",
            Op::Reduce { op, .. } => op.name(),
            Op::Var { .. } => "var",
            Op::ArgMax { .. } => "argmax",
            Op::ArgMin { .. } => "argmin",
            Op::MaxDim { .. } => "max_dim",
            Op::MinDim { .. } => "min_dim",
            Op::Softmax { .. } => "softmax",
            Op::LogSoftmax { .. } => "log_softmax",
            Op::MatMul => "matmul",
            Op::Addmm => "addmm",
            Op::Conv2d { .. } => "conv2d",
            Op::ConvTranspose2d { .. } => "conv_transpose2d",
            Op::MaxPool2d { .. } => "max_pool2d",
            Op::AvgPool2d { .. } => "avg_pool2d",
            Op::BatchNorm { .. } => "batch_norm",
            Op::LayerNorm { .. } => "layer_norm",
            Op::Dropout { .. } => "dropout",
            Op::Reshape { .. } => "reshape",
            Op::Permute { .. } => "permute",
            Op::Expand { .. } => "expand",
            Op::Slice { .. } => "slice",
            Op::Select { .. } => "select",
            Op::IndexSelect { .. } => "index_select",
            Op::Contiguous => "contiguous",
            Op::Cat { .. } => "cat",
            Op::Stack { .. } => "stack",
            Op::ModuleCall { .. } => "module_call",
            Op::Conv2dBackwardInput { .. } => "conv2d_backward_input",
            Op::Conv2dBackwardWeight { .. } => "conv2d_backward_weight",
            Op::MaxPool2dWithIndices { .. } => "max_pool2d_with_indices",
            Op::MaxPool2dBackward { .. } => "max_pool2d_backward",
            Op::AvgPool2dBackward { .. } => "avg_pool2d_backward",
            Op::BatchNormBackward { .. } => "batch_norm_backward",
            Op::LayerNormBackward { .. } => "layer_norm_backward",
            Op::DropoutMask { .. } => "dropout_mask",
            Op::SliceBackward { .. } => "slice_backward",
            Op::IndexSelectBackward { .. } => "index_select_backward",
        }
    }

    pub fn class(&self) -> OpClass {
        match self {
            Op::Input { .. } => OpClass::Input,
            Op::Constant { .. } => OpClass::Constant,
            Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast(_) | Op::Dropout { .. } => {
                OpClass::Pointwise
            }
            Op::BatchNorm { training, .. } => {
                if *training {
                    OpClass::Reduction
                } else {
                    OpClass::Pointwise
                }
            }
            Op::Reduce { .. }
            | Op::Var { .. }
            | Op::ArgMax { .. }
            | Op::ArgMin { .. }
            | Op::MaxDim { .. }
            | Op::MinDim { .. }
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::LayerNorm { .. } => OpClass::Reduction,
            Op::MatMul | Op::Addmm | Op::Conv2d { .. } | Op::ConvTranspose2d { .. } => {
                OpClass::Contraction
            }
            Op::MaxPool2d { .. } | Op::AvgPool2d { .. } => OpClass::Pool,
            Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. }
            | Op::Select { .. }
            | Op::Contiguous => OpClass::View,
            Op::IndexSelect { .. } | Op::Cat { .. } | Op::Stack { .. } | Op::ModuleCall { .. } => {
                OpClass::Copy
            }
            Op::Conv2dBackwardInput { .. } | Op::Conv2dBackwardWeight { .. } => {
                OpClass::Contraction
            }
            Op::MaxPool2dWithIndices { .. }
            | Op::MaxPool2dBackward { .. }
            | Op::AvgPool2dBackward { .. } => OpClass::Pool,
            Op::BatchNormBackward { .. } | Op::LayerNormBackward { .. } => OpClass::Reduction,
            Op::DropoutMask { .. } | Op::SliceBackward { .. } | Op::IndexSelectBackward { .. } => {
                OpClass::Copy
            }
        }
    }

    /// False for ops whose result is not a function of their operands alone
    /// (graph inputs and random ops): CSE and constant folding skip them.
    pub fn is_pure(&self) -> bool {
        !matches!(
            self,
            Op::Input { .. } | Op::Dropout { .. } | Op::DropoutMask { .. } | Op::ModuleCall { .. }
        )
    }

    /// Attributes as `key=value` pairs, in a stable order (for the printer).
    pub fn attrs(&self) -> Vec<(&'static str, String)> {
        fn l(v: &[usize]) -> String {
            format!(
                "[{}]",
                v.iter()
                    .map(|d| d.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            )
        }
        fn f(x: f64) -> String {
            format!("{x:?}")
        }
        let b = |x: bool| x.to_string();
        match self {
            Op::ModuleCall { path, .. } => vec![("path", format!("{path:?}"))],
            Op::Input { kind, .. } => match kind {
                InputKind::User(i) => vec![("index", i.to_string())],
                InputKind::Param(n) | InputKind::Buffer(n) => vec![("name", format!("{n:?}"))],
            },
            Op::Constant { data, .. } => {
                let shown: Vec<String> = data.iter().take(8).map(|x| f(*x)).collect();
                let more = if data.len() > 8 {
                    format!(", ... ({} values)", data.len())
                } else {
                    String::new()
                };
                vec![("data", format!("[{}{more}]", shown.join(", ")))]
            }
            Op::Unary(u) => match *u {
                UnaryOp::LeakyRelu(s) => vec![("negative_slope", f(s))],
                UnaryOp::Clamp(lo, hi) => {
                    let mut v = Vec::new();
                    if let Some(lo) = lo {
                        v.push(("min", f(lo)));
                    }
                    if let Some(hi) = hi {
                        v.push(("max", f(hi)));
                    }
                    v
                }
                UnaryOp::PowScalar(s)
                | UnaryOp::RPowScalar(s)
                | UnaryOp::AddScalar(s)
                | UnaryOp::MulScalar(s)
                | UnaryOp::RSubScalar(s)
                | UnaryOp::RDivScalar(s) => vec![("scalar", f(s))],
                _ => vec![],
            },
            Op::Binary(_) | Op::Where | Op::MatMul | Op::Addmm | Op::Contiguous => vec![],
            Op::Cast(d) => vec![("dtype", d.short_name().to_string())],
            Op::Reduce { dims, keepdim, .. } => vec![("dims", l(dims)), ("keepdim", b(*keepdim))],
            Op::Var {
                dims,
                correction,
                keepdim,
            } => vec![
                ("dims", l(dims)),
                ("correction", f(*correction)),
                ("keepdim", b(*keepdim)),
            ],
            Op::ArgMax { dim, keepdim }
            | Op::ArgMin { dim, keepdim }
            | Op::MaxDim { dim, keepdim }
            | Op::MinDim { dim, keepdim } => {
                vec![("dim", dim.to_string()), ("keepdim", b(*keepdim))]
            }
            Op::Softmax { dim }
            | Op::LogSoftmax { dim }
            | Op::IndexSelect { dim }
            | Op::Cat { dim }
            | Op::Stack { dim } => vec![("dim", dim.to_string())],
            Op::Conv2d {
                stride,
                padding,
                dilation,
                groups,
            } => conv_attrs(*stride, *padding, *dilation, *groups),
            Op::ConvTranspose2d {
                stride,
                padding,
                output_padding,
                dilation,
                groups,
            } => vec![
                ("stride", l(stride)),
                ("padding", l(padding)),
                ("output_padding", l(output_padding)),
                ("dilation", l(dilation)),
                ("groups", groups.to_string()),
            ],
            Op::MaxPool2d {
                kernel,
                stride,
                padding,
                dilation,
                ceil_mode,
            }
            | Op::MaxPool2dWithIndices {
                kernel,
                stride,
                padding,
                dilation,
                ceil_mode,
            } => vec![
                ("kernel", l(kernel)),
                ("stride", l(stride)),
                ("padding", l(padding)),
                ("dilation", l(dilation)),
                ("ceil_mode", b(*ceil_mode)),
            ],
            Op::AvgPool2d {
                kernel,
                stride,
                padding,
                ceil_mode,
                count_include_pad,
                divisor_override,
            } => {
                let mut v = vec![
                    ("kernel", l(kernel)),
                    ("stride", l(stride)),
                    ("padding", l(padding)),
                    ("ceil_mode", b(*ceil_mode)),
                    ("count_include_pad", b(*count_include_pad)),
                ];
                if let Some(d) = divisor_override {
                    v.push(("divisor_override", d.to_string()));
                }
                v
            }
            Op::BatchNorm {
                training,
                momentum,
                eps,
                has_weight,
                has_bias,
                has_running_stats,
            } => vec![
                ("training", b(*training)),
                ("momentum", f(*momentum)),
                ("eps", f(*eps)),
                ("weight", b(*has_weight)),
                ("bias", b(*has_bias)),
                ("running_stats", b(*has_running_stats)),
            ],
            Op::LayerNorm {
                normalized_shape,
                eps,
                has_weight,
                has_bias,
            } => vec![
                ("normalized_shape", l(normalized_shape)),
                ("eps", f(*eps)),
                ("weight", b(*has_weight)),
                ("bias", b(*has_bias)),
            ],
            Op::Dropout { p, seed, offset } => vec![
                ("p", f(*p)),
                ("seed", seed.to_string()),
                ("offset", offset.to_string()),
            ],
            Op::Reshape { shape } | Op::Expand { shape } => vec![("shape", l(shape))],
            Op::Permute { dims } => vec![("dims", l(dims))],
            Op::Slice {
                dim,
                start,
                end,
                step,
            } => vec![
                ("dim", dim.to_string()),
                ("start", start.to_string()),
                ("end", end.to_string()),
                ("step", step.to_string()),
            ],
            Op::Select { dim, index } => {
                vec![("dim", dim.to_string()), ("index", index.to_string())]
            }
            // Backward ops: their forward op's attributes, then their own.
            Op::Conv2dBackwardInput {
                stride,
                padding,
                dilation,
                groups,
                input_size,
            } => {
                let mut v = conv_attrs(*stride, *padding, *dilation, *groups);
                v.push(("input_size", l(input_size)));
                v
            }
            Op::Conv2dBackwardWeight {
                stride,
                padding,
                dilation,
                groups,
                kernel,
            } => {
                let mut v = conv_attrs(*stride, *padding, *dilation, *groups);
                v.push(("kernel", l(kernel)));
                v
            }
            Op::MaxPool2dBackward { input_size } => vec![("input_size", l(input_size))],
            Op::AvgPool2dBackward {
                kernel,
                stride,
                padding,
                ceil_mode,
                count_include_pad,
                divisor_override,
                input_size,
            } => {
                let mut v = Op::AvgPool2d {
                    kernel: *kernel,
                    stride: *stride,
                    padding: *padding,
                    ceil_mode: *ceil_mode,
                    count_include_pad: *count_include_pad,
                    divisor_override: *divisor_override,
                }
                .attrs();
                v.push(("input_size", l(input_size)));
                v
            }
            Op::BatchNormBackward {
                training,
                eps,
                has_weight,
            } => vec![
                ("training", b(*training)),
                ("eps", f(*eps)),
                ("weight", b(*has_weight)),
            ],
            Op::LayerNormBackward {
                normalized_shape,
                eps,
                has_weight,
            } => vec![
                ("normalized_shape", l(normalized_shape)),
                ("eps", f(*eps)),
                ("weight", b(*has_weight)),
            ],
            Op::DropoutMask { p } => vec![("p", f(*p))],
            Op::SliceBackward {
                input_shape,
                dim,
                start,
                end,
                step,
            } => vec![
                ("input_shape", l(input_shape)),
                ("dim", dim.to_string()),
                ("start", start.to_string()),
                ("end", end.to_string()),
                ("step", step.to_string()),
            ],
            Op::IndexSelectBackward { dim, size } => {
                vec![("dim", dim.to_string()), ("size", size.to_string())]
            }
        }
    }

    /// Number of operands the op takes, given its flags.
    fn arity(&self) -> Arity {
        match self {
            Op::Input { .. } | Op::Constant { .. } => Arity::Exact(0),
            Op::Binary(_)
            | Op::MatMul
            | Op::IndexSelect { .. }
            | Op::Conv2dBackwardInput { .. }
            | Op::Conv2dBackwardWeight { .. }
            | Op::MaxPool2dBackward { .. }
            | Op::IndexSelectBackward { .. } => Arity::Exact(2),
            Op::BatchNormBackward {
                training,
                has_weight,
                ..
            } => Arity::Exact(2 + *has_weight as usize + 2 * !*training as usize),
            Op::LayerNormBackward { has_weight, .. } => Arity::Exact(2 + *has_weight as usize),
            Op::Where | Op::Addmm => Arity::Exact(3),
            Op::Conv2d { .. } | Op::ConvTranspose2d { .. } => Arity::Range(2, 3),
            Op::BatchNorm {
                has_weight,
                has_bias,
                has_running_stats,
                ..
            } => Arity::Exact(
                1 + *has_weight as usize + *has_bias as usize + 2 * *has_running_stats as usize,
            ),
            Op::LayerNorm {
                has_weight,
                has_bias,
                ..
            } => Arity::Exact(1 + *has_weight as usize + *has_bias as usize),
            Op::Cat { .. } | Op::Stack { .. } => Arity::AtLeast(1),
            _ => Arity::Exact(1),
        }
    }
}

enum Arity {
    Exact(usize),
    Range(usize, usize),
    AtLeast(usize),
}

pub(crate) fn err(op: &Op, operands: &[TensorType], msg: impl Into<String>) -> IrError {
    IrError::Type {
        op: op.name().to_string(),
        operands: operands.to_vec(),
        msg: msg.into(),
    }
}

fn category(d: DType) -> u8 {
    match d {
        DType::Bool => 0,
        DType::I64 => 1,
        _ => 2,
    }
}

/// `torch.result_type` for two tensors: dimensioned tensors take priority
/// over zero-dim ones unless the zero-dim one is of a higher category
/// (bool < integer < float).
pub fn result_type(a: &TensorType, b: &TensorType) -> DType {
    match (a.rank() == 0, b.rank() == 0) {
        (false, true) if category(b.dtype) <= category(a.dtype) => a.dtype,
        (true, false) if category(a.dtype) <= category(b.dtype) => b.dtype,
        (false, true) | (true, false) => {
            // The zero-dim operand is of a higher category: the default
            // dtype of that category wins (its own dtype, as for scalars).
            if a.rank() == 0 {
                a.dtype
            } else {
                b.dtype
            }
        }
        _ => DType::promote(a.dtype, b.dtype),
    }
}

fn unary_dtype(op: &Op, u: &UnaryOp, t: &TensorType) -> Result<DType> {
    let d = t.dtype;
    let is_float_scalar = |s: f64| s.fract() != 0.0 || !s.is_finite();
    Ok(match *u {
        UnaryOp::Exp
        | UnaryOp::Log
        | UnaryOp::Sqrt
        | UnaryOp::Rsqrt
        | UnaryOp::Sin
        | UnaryOp::Cos
        | UnaryOp::Tanh
        | UnaryOp::Sigmoid
        | UnaryOp::Erf
        | UnaryOp::Reciprocal
        | UnaryOp::RDivScalar(_) => {
            if d.is_float() {
                d
            } else {
                DType::F32
            }
        }
        UnaryOp::LeakyRelu(_) | UnaryOp::GeluErf | UnaryOp::GeluTanh => {
            if !d.is_float() {
                return Err(err(
                    op,
                    std::slice::from_ref(t),
                    format!("expected a floating point tensor, got {}", d.torch_name()),
                ));
            }
            d
        }
        UnaryOp::Neg => {
            if d == DType::Bool {
                return Err(err(
                    op,
                    std::slice::from_ref(t),
                    "negation on a bool tensor is not supported, use logical_not",
                ));
            }
            d
        }
        UnaryOp::Abs
        | UnaryOp::Relu
        | UnaryOp::Sign
        | UnaryOp::Square
        | UnaryOp::Step
        | UnaryOp::Clamp(..) => d,
        UnaryOp::AddScalar(s)
        | UnaryOp::MulScalar(s)
        | UnaryOp::RSubScalar(s)
        | UnaryOp::PowScalar(s)
        | UnaryOp::RPowScalar(s) => DType::promote_scalar(d, is_float_scalar(s)),
    })
}

fn check_dims(op: &Op, ops: &[TensorType], dims: &[usize], rank: usize) -> Result<()> {
    let mut seen = vec![false; rank.max(1)];
    for &d in dims {
        // A zero-dim tensor accepts dim 0 (as PyTorch accepts dim 0 and -1).
        if d >= rank.max(1) {
            return Err(err(
                op,
                ops,
                format!(
                    "dimension {d} out of range for a tensor of rank {rank} (expected 0..{})",
                    rank.max(1)
                ),
            ));
        }
        if seen[d] {
            return Err(err(
                op,
                ops,
                format!("dimension {d} appears more than once"),
            ));
        }
        seen[d] = true;
    }
    Ok(())
}

pub(crate) fn require_float(op: &Op, ops: &[TensorType], t: &TensorType, what: &str) -> Result<()> {
    if t.dtype.is_float() {
        Ok(())
    } else {
        Err(err(
            op,
            ops,
            format!(
                "{what} must be a floating point tensor, got {}",
                t.dtype.torch_name()
            ),
        ))
    }
}

pub(crate) fn require_same_dtype(op: &Op, ops: &[TensorType]) -> Result<()> {
    if let Some(first) = ops.first() {
        if let Some(o) = ops.iter().find(|t| t.dtype != first.dtype) {
            return Err(err(
                op,
                ops,
                format!(
                    "expected all operands to have the same dtype, got {} and {}",
                    first.dtype.torch_name(),
                    o.dtype.torch_name()
                ),
            ));
        }
    }
    Ok(())
}

/// PyTorch's pooling output size (`pooling_output_shape`).
fn pool_out(
    input: usize,
    k: usize,
    pad: usize,
    stride: usize,
    dil: usize,
    ceil: bool,
) -> Option<usize> {
    let span = input as i64 + 2 * pad as i64 - (dil as i64) * (k as i64 - 1) - 1;
    if span < 0 && !ceil {
        return None;
    }
    let s = stride as i64;
    let mut out = if ceil {
        (span + s - 1).div_euclid(s) + 1
    } else {
        span.div_euclid(s) + 1
    };
    // The last window must start inside the input or its left padding.
    if ceil && (out - 1) * s >= input as i64 + pad as i64 {
        out -= 1;
    }
    if out < 1 {
        None
    } else {
        Some(out as usize)
    }
}

/// Infer the output types of `op` applied to operands of these types.
/// Errors name the op and the operand types.
pub fn infer(op: &Op, operands: &[TensorType]) -> Result<Vec<TensorType>> {
    let ops = operands;
    let n = ops.len();
    let ok = match op.arity() {
        Arity::Exact(k) => n == k,
        Arity::Range(a, b) => (a..=b).contains(&n),
        Arity::AtLeast(a) => n >= a,
    };
    if !ok {
        let want = match op.arity() {
            Arity::Exact(k) => k.to_string(),
            Arity::Range(a, b) => format!("{a} or {b}"),
            Arity::AtLeast(a) => format!("at least {a}"),
        };
        return Err(err(op, ops, format!("expected {want} operands, got {n}")));
    }
    let one = |t: TensorType| Ok(vec![t]);
    match op {
        Op::Input { ty, .. } => one(ty.clone()),
        Op::ModuleCall { ty, .. } => one(ty.clone()),
        Op::Constant { ty, data } => {
            if data.len() != ty.numel() {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "constant of type {ty} needs {} values, got {}",
                        ty.numel(),
                        data.len()
                    ),
                ));
            }
            one(ty.clone())
        }
        Op::Unary(u) => {
            let d = unary_dtype(op, u, &ops[0])?;
            one(ops[0].with_dtype(d))
        }
        Op::Binary(b) => {
            let shape = broadcast_shapes(&ops[0].shape, &ops[1].shape)
                .map_err(|e| err(op, ops, e.to_string()))?;
            let mut d = result_type(&ops[0], &ops[1]);
            if b.is_comparison() {
                d = DType::Bool;
            } else if *b == BinaryOp::Div && !d.is_float() {
                d = DType::F32;
            } else if d == DType::Bool && matches!(b, BinaryOp::Sub) {
                return Err(err(
                    op,
                    ops,
                    "subtraction of two bool tensors is not supported",
                ));
            }
            one(TensorType { shape, dtype: d })
        }
        Op::Where => {
            if ops[0].dtype != DType::Bool {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "condition must be a bool tensor, got {}",
                        ops[0].dtype.torch_name()
                    ),
                ));
            }
            let s = broadcast_shapes(&ops[0].shape, &ops[1].shape)
                .and_then(|s| broadcast_shapes(&s, &ops[2].shape))
                .map_err(|e| err(op, ops, e.to_string()))?;
            one(TensorType {
                shape: s,
                dtype: result_type(&ops[1], &ops[2]),
            })
        }
        Op::Cast(d) => one(ops[0].with_dtype(*d)),
        Op::Reduce {
            op: r,
            dims,
            keepdim,
        } => {
            let t = &ops[0];
            check_dims(op, ops, dims, t.rank())?;
            let dtype = match r {
                ReduceOp::Sum | ReduceOp::Prod if !t.dtype.is_float() => DType::I64,
                ReduceOp::Mean => {
                    require_float(op, ops, t, "input of mean")?;
                    t.dtype
                }
                _ => t.dtype,
            };
            if matches!(r, ReduceOp::Max | ReduceOp::Min) {
                if let Some(&d) = dims.iter().find(|&&d| t.shape.get(d) == Some(&0)) {
                    return Err(err(
                        op,
                        ops,
                        format!("cannot reduce over dimension {d} of size 0 (no identity)"),
                    ));
                }
            }
            one(TensorType {
                shape: reduced_shape(&t.shape, dims, *keepdim),
                dtype,
            })
        }
        Op::Var { dims, keepdim, .. } => {
            let t = &ops[0];
            check_dims(op, ops, dims, t.rank())?;
            require_float(op, ops, t, "input of var")?;
            one(t.with_shape(reduced_shape(&t.shape, dims, *keepdim)))
        }
        Op::ArgMax { dim, keepdim }
        | Op::ArgMin { dim, keepdim }
        | Op::MaxDim { dim, keepdim }
        | Op::MinDim { dim, keepdim } => {
            let t = &ops[0];
            check_dims(op, ops, &[*dim], t.rank())?;
            if t.shape.get(*dim) == Some(&0) {
                return Err(err(
                    op,
                    ops,
                    format!("cannot reduce over dimension {dim} of size 0"),
                ));
            }
            let shape = reduced_shape(&t.shape, &[*dim], *keepdim);
            let idx = TensorType {
                shape: shape.clone(),
                dtype: DType::I64,
            };
            match op {
                Op::MaxDim { .. } | Op::MinDim { .. } => Ok(vec![t.with_shape(shape), idx]),
                _ => one(idx),
            }
        }
        Op::Softmax { dim } | Op::LogSoftmax { dim } => {
            let t = &ops[0];
            check_dims(op, ops, &[*dim], t.rank())?;
            require_float(op, ops, t, "input")?;
            one(t.clone())
        }
        Op::MatMul => infer_matmul(op, ops),
        Op::Addmm => {
            let (bias, a, b) = (&ops[0], &ops[1], &ops[2]);
            if a.rank() != 2 || b.rank() != 2 {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "mat1 and mat2 must be matrices, got {}-D and {}-D",
                        a.rank(),
                        b.rank()
                    ),
                ));
            }
            if a.shape[1] != b.shape[0] {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "mat1 and mat2 shapes cannot be multiplied ({}x{} and {}x{})",
                        a.shape[0], a.shape[1], b.shape[0], b.shape[1]
                    ),
                ));
            }
            require_same_dtype(op, ops)?;
            let out = vec![a.shape[0], b.shape[1]];
            let bs =
                broadcast_shapes(&bias.shape, &out).map_err(|e| err(op, ops, e.to_string()))?;
            if bs != out {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "bias of shape {:?} cannot broadcast to {:?}",
                        bias.shape, out
                    ),
                ));
            }
            one(TensorType {
                shape: out,
                dtype: a.dtype,
            })
        }
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        } => infer_conv(op, ops, *stride, *padding, *dilation, *groups, None),
        Op::ConvTranspose2d {
            stride,
            padding,
            output_padding,
            dilation,
            groups,
        } => infer_conv(
            op,
            ops,
            *stride,
            *padding,
            *dilation,
            *groups,
            Some(*output_padding),
        ),
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        } => infer_pool(op, ops, *kernel, *stride, *padding, *dilation, *ceil_mode),
        Op::AvgPool2d {
            kernel,
            stride,
            padding,
            ceil_mode,
            divisor_override,
            ..
        } => {
            if *divisor_override == Some(0) {
                return Err(err(op, ops, "divisor must be not zero"));
            }
            infer_pool(op, ops, *kernel, *stride, *padding, [1, 1], *ceil_mode)
        }
        Op::BatchNorm {
            training,
            momentum,
            has_running_stats,
            ..
        } => {
            let x = &ops[0];
            if x.rank() < 2 {
                return Err(err(
                    op,
                    ops,
                    format!("expected an input of rank >= 2, got rank {}", x.rank()),
                ));
            }
            require_float(op, ops, x, "input")?;
            let c = x.shape[1];
            for (i, t) in ops.iter().enumerate().skip(1) {
                if t.shape != [c] {
                    return Err(err(
                        op,
                        ops,
                        format!(
                            "operand {i} must have shape [{c}] (the channel count), got {:?}",
                            t.shape
                        ),
                    ));
                }
                if !t.dtype.is_float() {
                    return Err(err(op, ops, format!("operand {i} must be floating point")));
                }
            }
            if !*training && !*has_running_stats {
                return Err(err(op, ops, "eval mode needs running_mean and running_var"));
            }
            if *training && !(0.0..=1.0).contains(momentum) {
                return Err(err(op, ops, format!("momentum {momentum} outside [0, 1]")));
            }
            if *training {
                let numel_per_c = x.numel() / c.max(1);
                if numel_per_c <= 1 {
                    return Err(err(
                        op,
                        ops,
                        format!(
                            "expected more than 1 value per channel when training, got input size {:?}",
                            x.shape
                        ),
                    ));
                }
            }
            let mut out = vec![x.clone()];
            if *training && *has_running_stats {
                let rm = &ops[ops.len() - 2];
                let rv = &ops[ops.len() - 1];
                out.push(rm.clone());
                out.push(rv.clone());
            }
            Ok(out)
        }
        Op::LayerNorm {
            normalized_shape, ..
        } => {
            let x = &ops[0];
            require_float(op, ops, x, "input")?;
            let k = normalized_shape.len();
            if k == 0 || x.rank() < k || x.shape[x.rank() - k..] != normalized_shape[..] {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "given normalized_shape={normalized_shape:?}, expected input with shape [*, {}], but got input of size {:?}",
                        normalized_shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(", "),
                        x.shape
                    ),
                ));
            }
            for (i, t) in ops.iter().enumerate().skip(1) {
                if t.shape != *normalized_shape {
                    return Err(err(
                        op,
                        ops,
                        format!(
                            "operand {i} must have shape {normalized_shape:?}, got {:?}",
                            t.shape
                        ),
                    ));
                }
            }
            one(x.clone())
        }
        Op::Dropout { p, .. } => {
            if !(0.0..=1.0).contains(p) {
                return Err(err(
                    op,
                    ops,
                    format!("dropout probability has to be between 0 and 1, but got {p}"),
                ));
            }
            require_float(op, ops, &ops[0], "input")?;
            one(ops[0].clone())
        }
        Op::Reshape { shape } => {
            if crate::numel(shape) != ops[0].numel() {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "shape {shape:?} is invalid for input of size {}",
                        ops[0].numel()
                    ),
                ));
            }
            one(ops[0].with_shape(shape.clone()))
        }
        Op::Permute { dims } => {
            let t = &ops[0];
            if dims.len() != t.rank() {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "number of dims don't match in permute: input has {} dims, {} given",
                        t.rank(),
                        dims.len()
                    ),
                ));
            }
            check_dims(op, ops, dims, t.rank())?;
            one(t.with_shape(dims.iter().map(|&d| t.shape[d]).collect()))
        }
        Op::Expand { shape } => {
            let t = &ops[0];
            if shape.len() < t.rank() {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "the number of sizes provided ({}) must be greater or equal to the number of dimensions in the tensor ({})",
                        shape.len(),
                        t.rank()
                    ),
                ));
            }
            let off = shape.len() - t.rank();
            for (i, &s) in t.shape.iter().enumerate() {
                if s != 1 && s != shape[off + i] {
                    return Err(err(
                        op,
                        ops,
                        format!(
                            "the expanded size of the tensor ({}) must match the existing size ({s}) at non-singleton dimension {}",
                            shape[off + i],
                            off + i
                        ),
                    ));
                }
            }
            one(t.with_shape(shape.clone()))
        }
        Op::Slice {
            dim,
            start,
            end,
            step,
        } => {
            let t = &ops[0];
            check_dims(op, ops, &[*dim], t.rank())?;
            if t.rank() == 0 {
                return Err(err(op, ops, "slice() cannot be applied to a 0-dim tensor"));
            }
            if *step == 0 {
                return Err(err(op, ops, "slice step must be positive"));
            }
            if start > end || *end > t.shape[*dim] {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "slice [{start}:{end}] out of range for dimension {dim} of size {}",
                        t.shape[*dim]
                    ),
                ));
            }
            let mut s = t.shape.clone();
            s[*dim] = (end - start).div_ceil(*step);
            one(t.with_shape(s))
        }
        Op::Select { dim, index } => {
            let t = &ops[0];
            if t.rank() == 0 {
                return Err(err(op, ops, "select() cannot be applied to a 0-dim tensor"));
            }
            check_dims(op, ops, &[*dim], t.rank())?;
            if *index >= t.shape[*dim] {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "index {index} is out of bounds for dimension {dim} with size {}",
                        t.shape[*dim]
                    ),
                ));
            }
            let mut s = t.shape.clone();
            s.remove(*dim);
            one(t.with_shape(s))
        }
        Op::IndexSelect { dim } => {
            let (t, idx) = (&ops[0], &ops[1]);
            check_dims(op, ops, &[*dim], t.rank())?;
            if idx.dtype != DType::I64 || idx.rank() > 1 {
                return Err(err(op, ops, "index must be a 1-D (or 0-D) int64 tensor"));
            }
            let mut s = t.shape.clone();
            if !s.is_empty() {
                s[*dim] = idx.numel();
            }
            one(t.with_shape(s))
        }
        Op::Contiguous => one(ops[0].clone()),
        Op::Cat { dim } => {
            let first = &ops[0];
            if first.rank() == 0 {
                return Err(err(
                    op,
                    ops,
                    "zero-dimensional tensor cannot be concatenated",
                ));
            }
            check_dims(op, ops, &[*dim], first.rank())?;
            let mut shape = first.shape.clone();
            shape[*dim] = 0;
            let mut dtype = first.dtype;
            for (i, t) in ops.iter().enumerate() {
                let same_rest = t.rank() == first.rank()
                    && (0..t.rank()).all(|d| d == *dim || t.shape[d] == first.shape[d]);
                if !same_rest {
                    return Err(err(
                        op,
                        ops,
                        format!(
                            "sizes of tensors must match except in dimension {dim}: operand {i} has shape {:?}, operand 0 has {:?}",
                            t.shape, first.shape
                        ),
                    ));
                }
                shape[*dim] += t.shape[*dim];
                dtype = DType::promote(dtype, t.dtype);
            }
            one(TensorType { shape, dtype })
        }
        Op::Stack { dim } => {
            let first = &ops[0];
            if *dim > first.rank() {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "dimension {dim} out of range (expected 0..={})",
                        first.rank()
                    ),
                ));
            }
            let mut dtype = first.dtype;
            for (i, t) in ops.iter().enumerate() {
                if t.shape != first.shape {
                    return Err(err(
                        op,
                        ops,
                        format!(
                            "stack expects each tensor to be equal size, but got {:?} at entry 0 and {:?} at entry {i}",
                            first.shape, t.shape
                        ),
                    ));
                }
                dtype = DType::promote(dtype, t.dtype);
            }
            let mut shape = first.shape.clone();
            shape.insert(*dim, ops.len());
            one(TensorType { shape, dtype })
        }
        _ => crate::autodiff::infer_backward_op(op, ops),
    }
}

fn infer_matmul(op: &Op, ops: &[TensorType]) -> Result<Vec<TensorType>> {
    let (a, b) = (&ops[0], &ops[1]);
    if a.rank() == 0 || b.rank() == 0 {
        return Err(err(
            op,
            ops,
            "both arguments to matmul need to be at least 1D",
        ));
    }
    require_same_dtype(op, ops)?;
    if a.dtype == DType::Bool {
        return Err(err(op, ops, "matmul is not implemented for bool tensors"));
    }
    let (ar, br) = (a.rank(), b.rank());
    // Matrix dims after 1-D promotion.
    let (m, k1) = if ar == 1 {
        (None, a.shape[0])
    } else {
        (Some(a.shape[ar - 2]), a.shape[ar - 1])
    };
    let (k2, nn) = if br == 1 {
        (b.shape[0], None)
    } else {
        (b.shape[br - 2], Some(b.shape[br - 1]))
    };
    if k1 != k2 {
        let msg = if ar == 1 && br == 1 {
            format!(
                "inconsistent tensor size, expected tensor [{}] and src [{}] to have the same number of elements",
                a.shape[0], b.shape[0]
            )
        } else {
            format!(
                "shapes cannot be multiplied ({}x{} and {}x{})",
                m.unwrap_or(1),
                k1,
                k2,
                nn.unwrap_or(1)
            )
        };
        return Err(err(op, ops, msg));
    }
    let ba = if ar > 2 { &a.shape[..ar - 2] } else { &[][..] };
    let bb = if br > 2 { &b.shape[..br - 2] } else { &[][..] };
    let mut shape = broadcast_shapes(ba, bb).map_err(|e| err(op, ops, e.to_string()))?;
    if let Some(m) = m {
        shape.push(m);
    }
    if let Some(nn) = nn {
        shape.push(nn);
    }
    Ok(vec![TensorType {
        shape,
        dtype: a.dtype,
    }])
}

fn infer_conv(
    op: &Op,
    ops: &[TensorType],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    groups: usize,
    output_padding: Option<[usize; 2]>,
) -> Result<Vec<TensorType>> {
    let (x, w) = (&ops[0], &ops[1]);
    if x.rank() != 4 {
        return Err(err(
            op,
            ops,
            format!(
                "expected 4-D input [N, C, H, W], got input of size {:?}",
                x.shape
            ),
        ));
    }
    if w.rank() != 4 {
        return Err(err(
            op,
            ops,
            format!("expected a 4-D weight, got weight of size {:?}", w.shape),
        ));
    }
    require_same_dtype(op, ops)?;
    require_float(op, ops, x, "input")?;
    if groups == 0 || stride.contains(&0) || dilation.contains(&0) {
        return Err(err(op, ops, "groups, stride and dilation must be positive"));
    }
    let c = x.shape[1];
    let transposed = output_padding.is_some();
    let (w_in, out_c) = if transposed {
        (w.shape[0], w.shape[1] * groups)
    } else {
        (w.shape[1] * groups, w.shape[0])
    };
    if w_in != c {
        let msg = if transposed {
            format!(
                "given transposed=1, weight of size {:?}, expected input {:?} to have {} channels, but got {c} channels instead",
                w.shape, x.shape, w.shape[0]
            )
        } else {
            format!(
                "given groups={groups}, weight of size {:?}, expected input {:?} to have {} channels, but got {c} channels instead",
                w.shape,
                x.shape,
                w.shape[1] * groups
            )
        };
        return Err(err(op, ops, msg));
    }
    if c % groups != 0 || (!transposed && w.shape[0] % groups != 0) {
        return Err(err(
            op,
            ops,
            format!("channels must be divisible by groups={groups}"),
        ));
    }
    if let Some(bias) = ops.get(2) {
        if bias.shape != [out_c] {
            return Err(err(
                op,
                ops,
                format!(
                    "expected bias to be 1-dimensional with {out_c} elements, but got bias of size {:?}",
                    bias.shape
                ),
            ));
        }
    }
    let mut hw = [0usize; 2];
    for i in 0..2 {
        let (inp, k) = (x.shape[2 + i] as i64, w.shape[2 + i] as i64);
        let (s, p, d) = (stride[i] as i64, padding[i] as i64, dilation[i] as i64);
        let o = match output_padding {
            None => {
                let eff = d * (k - 1) + 1;
                if inp + 2 * p < eff {
                    return Err(err(
                        op,
                        ops,
                        format!(
                            "calculated padded input size per channel: ({} x {}). Kernel size: ({} x {}). Kernel size can't be greater than actual input size",
                            x.shape[2] + 2 * padding[0],
                            x.shape[3] + 2 * padding[1],
                            dilation[0] * (w.shape[2] - 1) + 1,
                            dilation[1] * (w.shape[3] - 1) + 1
                        ),
                    ));
                }
                (inp + 2 * p - eff) / s + 1
            }
            Some(op_pad) => {
                let opd = op_pad[i] as i64;
                if opd >= s && opd >= d {
                    return Err(err(
                        op,
                        ops,
                        "output padding must be smaller than either stride or dilation",
                    ));
                }
                (inp - 1) * s - 2 * p + d * (k - 1) + opd + 1
            }
        };
        if o <= 0 {
            return Err(err(
                op,
                ops,
                format!("computed output size {o} is too small"),
            ));
        }
        hw[i] = o as usize;
    }
    Ok(vec![TensorType {
        shape: vec![x.shape[0], out_c, hw[0], hw[1]],
        dtype: x.dtype,
    }])
}

pub(crate) fn infer_pool(
    op: &Op,
    ops: &[TensorType],
    kernel: [usize; 2],
    stride: [usize; 2],
    padding: [usize; 2],
    dilation: [usize; 2],
    ceil_mode: bool,
) -> Result<Vec<TensorType>> {
    let x = &ops[0];
    if x.rank() != 3 && x.rank() != 4 {
        return Err(err(
            op,
            ops,
            format!("expected 3-D or 4-D input, got input of size {:?}", x.shape),
        ));
    }
    if kernel.contains(&0) || stride.contains(&0) || dilation.contains(&0) {
        return Err(err(
            op,
            ops,
            "kernel size, stride and dilation must be greater than zero",
        ));
    }
    if (0..2).any(|i| padding[i] * 2 > kernel[i]) {
        return Err(err(
            op,
            ops,
            format!(
                "pad should be at most half of effective kernel size, but got pad={padding:?}, kernel_size={kernel:?}"
            ),
        ));
    }
    let r = x.rank();
    let mut shape = x.shape.clone();
    for i in 0..2 {
        match pool_out(
            x.shape[r - 2 + i],
            kernel[i],
            padding[i],
            stride[i],
            dilation[i],
            ceil_mode,
        ) {
            Some(o) => shape[r - 2 + i] = o,
            None => {
                return Err(err(
                    op,
                    ops,
                    format!(
                        "given input size {:?}, calculated output size is too small",
                        &x.shape[r - 2..]
                    ),
                ))
            }
        }
    }
    Ok(vec![x.with_shape(shape)])
}

/// Serializes f64 lists with non-finite values as strings ("inf", "-inf",
/// "nan"), which JSON numbers cannot carry.
mod f64_list {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Serialize, Deserialize)]
    #[serde(untagged)]
    enum Num {
        F(f64),
        S(String),
    }

    pub fn serialize<S: Serializer>(v: &[f64], s: S) -> Result<S::Ok, S::Error> {
        let out: Vec<Num> = v
            .iter()
            .map(|&x| {
                if x.is_finite() {
                    Num::F(x)
                } else if x.is_nan() {
                    Num::S("nan".into())
                } else if x > 0.0 {
                    Num::S("inf".into())
                } else {
                    Num::S("-inf".into())
                }
            })
            .collect();
        out.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f64>, D::Error> {
        let raw: Vec<Num> = Vec::deserialize(d)?;
        raw.into_iter()
            .map(|n| match n {
                Num::F(x) => Ok(x),
                Num::S(s) => match s.as_str() {
                    "nan" => Ok(f64::NAN),
                    "inf" => Ok(f64::INFINITY),
                    "-inf" => Ok(f64::NEG_INFINITY),
                    other => Err(serde::de::Error::custom(format!(
                        "bad constant value {other:?}"
                    ))),
                },
            })
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::cloned_ref_to_slice_refs)]
mod tests {
    use super::*;

    fn f(shape: &[usize]) -> TensorType {
        TensorType::new(shape, DType::F32)
    }
    fn ty(shape: &[usize], d: DType) -> TensorType {
        TensorType::new(shape, d)
    }
    fn one(op: Op, ops: &[TensorType]) -> TensorType {
        let mut v = infer(&op, ops).unwrap();
        assert_eq!(v.len(), 1);
        v.remove(0)
    }
    fn err_msg(op: Op, ops: &[TensorType]) -> String {
        infer(&op, ops).unwrap_err().to_string()
    }
    fn conv(stride: usize, pad: usize, dil: usize, groups: usize) -> Op {
        Op::Conv2d {
            stride: [stride; 2],
            padding: [pad; 2],
            dilation: [dil; 2],
            groups,
        }
    }

    #[test]
    fn elementwise_broadcast_and_promotion() {
        let add = Op::Binary(BinaryOp::Add);
        assert_eq!(
            one(add.clone(), &[f(&[3, 1, 5]), f(&[4, 1])]),
            f(&[3, 4, 5])
        );
        // torch.ones(3, dtype=f16) + torch.tensor(1.0) -> float16 (0-dim loses)
        assert_eq!(
            one(add.clone(), &[ty(&[3], DType::F16), ty(&[], DType::F64)]),
            ty(&[3], DType::F16)
        );
        // torch.ones(3, dtype=int64) + torch.tensor(1.5) -> float32... the
        // 0-dim float wins its category: here f32.
        assert_eq!(
            one(add.clone(), &[ty(&[3], DType::I64), ty(&[], DType::F32)]),
            ty(&[3], DType::F32)
        );
        assert_eq!(
            one(add.clone(), &[ty(&[3], DType::F32), ty(&[3], DType::F64)]),
            ty(&[3], DType::F64)
        );
        // int / int is true division.
        assert_eq!(
            one(
                Op::Binary(BinaryOp::Div),
                &[ty(&[2], DType::I64), ty(&[2], DType::I64)]
            ),
            ty(&[2], DType::F32)
        );
        assert_eq!(
            one(Op::Binary(BinaryOp::Lt), &[f(&[2, 3]), f(&[3])]),
            ty(&[2, 3], DType::Bool)
        );
        assert_eq!(
            err_msg(add, &[f(&[3, 2]), f(&[3])]),
            "add(f32[3,2], f32[3]): shapes [3, 2] and [3] cannot be broadcast together (dimension 1 is 2 vs 3)"
        );
        assert_eq!(
            one(
                Op::Where,
                &[ty(&[2, 1], DType::Bool), f(&[3]), ty(&[], DType::F32)]
            ),
            f(&[2, 3])
        );
        assert_eq!(
            err_msg(Op::Where, &[f(&[2]), f(&[2]), f(&[2])]),
            "where(f32[2], f32[2], f32[2]): condition must be a bool tensor, got torch.float32"
        );
        assert_eq!(one(Op::Cast(DType::F16), &[f(&[2])]), ty(&[2], DType::F16));
    }

    #[test]
    fn unary_dtypes() {
        let i = ty(&[4], DType::I64);
        assert_eq!(one(Op::Unary(UnaryOp::Exp), &[i.clone()]).dtype, DType::F32);
        assert_eq!(
            one(Op::Unary(UnaryOp::Relu), &[i.clone()]).dtype,
            DType::I64
        );
        assert_eq!(
            one(Op::Unary(UnaryOp::MulScalar(0.5)), &[i.clone()]).dtype,
            DType::F32
        );
        assert_eq!(
            one(Op::Unary(UnaryOp::MulScalar(2.0)), &[i.clone()]).dtype,
            DType::I64
        );
        assert_eq!(
            err_msg(Op::Unary(UnaryOp::GeluErf), &[i]),
            "gelu(i64[4]): expected a floating point tensor, got torch.int64"
        );
        assert_eq!(
            err_msg(Op::Unary(UnaryOp::Neg), &[ty(&[1], DType::Bool)]),
            "neg(bool[1]): negation on a bool tensor is not supported, use logical_not"
        );
        assert!(err_msg(Op::Unary(UnaryOp::Neg), &[]).ends_with("expected 1 operands, got 0"));
    }

    #[test]
    fn reductions() {
        let x = f(&[2, 3, 4]);
        let sum = |dims: Vec<usize>, keepdim| Op::Reduce {
            op: ReduceOp::Sum,
            dims,
            keepdim,
        };
        assert_eq!(one(sum(vec![0, 2], false), &[x.clone()]), f(&[3]));
        assert_eq!(one(sum(vec![1], true), &[x.clone()]), f(&[2, 1, 4]));
        assert_eq!(one(sum(vec![0, 1, 2], false), &[x.clone()]), f(&[]));
        assert_eq!(
            one(sum(vec![0], false), &[ty(&[3], DType::Bool)]),
            ty(&[], DType::I64)
        );
        assert_eq!(
            err_msg(sum(vec![3], false), &[x.clone()]),
            "sum(f32[2,3,4]): dimension 3 out of range for a tensor of rank 3 (expected 0..3)"
        );
        assert_eq!(
            err_msg(sum(vec![1, 1], false), &[x.clone()]),
            "sum(f32[2,3,4]): dimension 1 appears more than once"
        );
        assert_eq!(
            err_msg(
                Op::Reduce {
                    op: ReduceOp::Mean,
                    dims: vec![0],
                    keepdim: false
                },
                &[ty(&[3], DType::I64)]
            ),
            "mean(i64[3]): input of mean must be a floating point tensor, got torch.int64"
        );
        assert_eq!(
            err_msg(
                Op::Reduce {
                    op: ReduceOp::Max,
                    dims: vec![0],
                    keepdim: false
                },
                &[f(&[0, 2])]
            ),
            "max(f32[0,2]): cannot reduce over dimension 0 of size 0 (no identity)"
        );
        assert_eq!(
            one(
                Op::Var {
                    dims: vec![0],
                    correction: 1.0,
                    keepdim: false
                },
                &[x.clone()]
            ),
            f(&[3, 4])
        );
        assert_eq!(
            infer(
                &Op::MaxDim {
                    dim: 1,
                    keepdim: true
                },
                &[x.clone()]
            )
            .unwrap(),
            vec![f(&[2, 1, 4]), ty(&[2, 1, 4], DType::I64)]
        );
        assert_eq!(
            one(
                Op::ArgMin {
                    dim: 2,
                    keepdim: false
                },
                &[x.clone()]
            ),
            ty(&[2, 3], DType::I64)
        );
        assert_eq!(one(Op::LogSoftmax { dim: 2 }, &[x.clone()]), x);
        assert_eq!(
            err_msg(Op::Softmax { dim: 0 }, &[ty(&[2], DType::I64)]),
            "softmax(i64[2]): input must be a floating point tensor, got torch.int64"
        );
    }

    #[test]
    fn matmul_follows_torch_matmul() {
        let mm = |a: &[usize], b: &[usize]| one(Op::MatMul, &[f(a), f(b)]).shape;
        assert_eq!(mm(&[3], &[3]), Vec::<usize>::new());
        assert_eq!(mm(&[2, 3], &[3]), vec![2]);
        assert_eq!(mm(&[3], &[3, 4]), vec![4]);
        assert_eq!(mm(&[2, 3], &[3, 4]), vec![2, 4]);
        assert_eq!(mm(&[5, 1, 2, 3], &[7, 3, 4]), vec![5, 7, 2, 4]);
        assert_eq!(mm(&[3], &[6, 3, 4]), vec![6, 4]);
        assert_eq!(
            err_msg(Op::MatMul, &[f(&[2, 3]), f(&[4, 5])]),
            "matmul(f32[2,3], f32[4,5]): shapes cannot be multiplied (2x3 and 4x5)"
        );
        assert_eq!(
            err_msg(Op::MatMul, &[f(&[2, 3]), ty(&[3, 5], DType::F64)]),
            "matmul(f32[2,3], f64[3,5]): expected all operands to have the same dtype, got torch.float32 and torch.float64"
        );
        assert_eq!(
            one(Op::Addmm, &[f(&[4]), f(&[2, 3]), f(&[3, 4])]),
            f(&[2, 4])
        );
        assert_eq!(
            err_msg(Op::Addmm, &[f(&[5]), f(&[2, 3]), f(&[3, 4])]),
            "addmm(f32[5], f32[2,3], f32[3,4]): shapes [5] and [2, 4] cannot be broadcast together (dimension 1 is 5 vs 4)"
        );
    }

    #[test]
    fn conv_output_sizes_and_errors() {
        // nn.Conv2d(1, 32, 5, 1, 1)(torch.zeros(8, 1, 28, 28)).shape == [8, 32, 26, 26]
        assert_eq!(
            one(
                conv(1, 1, 1, 1),
                &[f(&[8, 1, 28, 28]), f(&[32, 1, 5, 5]), f(&[32])]
            ),
            f(&[8, 32, 26, 26])
        );
        // stride 2, padding 1, dilation 2, groups 2: (7+2-4-1)/2+1 = 3
        assert_eq!(
            one(conv(2, 1, 2, 2), &[f(&[2, 4, 7, 7]), f(&[6, 2, 3, 3])]),
            f(&[2, 6, 3, 3])
        );
        assert_eq!(
            err_msg(conv(1, 0, 1, 1), &[f(&[1, 3, 5, 5]), f(&[8, 2, 3, 3])]),
            "conv2d(f32[1,3,5,5], f32[8,2,3,3]): given groups=1, weight of size [8, 2, 3, 3], expected input [1, 3, 5, 5] to have 2 channels, but got 3 channels instead"
        );
        assert!(
            err_msg(conv(1, 0, 1, 1), &[f(&[1, 3, 2, 2]), f(&[8, 3, 3, 3])])
                .contains("Kernel size can't be greater than actual input size")
        );
        assert!(err_msg(
            conv(1, 0, 1, 1),
            &[f(&[1, 3, 5, 5]), f(&[8, 3, 3, 3]), f(&[7])]
        )
        .contains("expected bias to be 1-dimensional with 8 elements"));
        // nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1)
        // on [1, 4, 5, 5] -> [1, 6, 10, 10]
        let ct = Op::ConvTranspose2d {
            stride: [2, 2],
            padding: [1, 1],
            output_padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
        };
        assert_eq!(
            one(ct.clone(), &[f(&[1, 4, 5, 5]), f(&[4, 6, 3, 3]), f(&[6])]),
            f(&[1, 6, 10, 10])
        );
        let bad = Op::ConvTranspose2d {
            stride: [1, 1],
            padding: [0, 0],
            output_padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
        };
        assert!(err_msg(bad, &[f(&[1, 4, 5, 5]), f(&[4, 6, 3, 3])])
            .contains("output padding must be smaller than either stride or dilation"));
    }

    #[test]
    fn pool_output_sizes_with_ceil_mode() {
        let mp = |k: usize, s: usize, p: usize, ceil: bool| Op::MaxPool2d {
            kernel: [k; 2],
            stride: [s; 2],
            padding: [p; 2],
            dilation: [1; 2],
            ceil_mode: ceil,
        };
        assert_eq!(
            one(mp(2, 2, 0, false), &[f(&[8, 32, 26, 26])]),
            f(&[8, 32, 13, 13])
        );
        // nn.MaxPool2d(2, 2)(torch.zeros(1, 1, 13, 13)).shape[-1] == 6; ceil_mode=True gives 7
        assert_eq!(one(mp(2, 2, 0, false), &[f(&[1, 1, 13, 13])]).shape[3], 6);
        assert_eq!(one(mp(2, 2, 0, true), &[f(&[1, 1, 13, 13])]).shape[3], 7);
        // nn.MaxPool2d(3, 2, 1, ceil_mode=True) on 6 -> 4 (the last window
        // would start in the right padding, so it is dropped: not 4+1)
        assert_eq!(
            one(mp(3, 2, 1, true), &[f(&[1, 6, 6])]).shape,
            vec![1, 4, 4]
        );
        assert_eq!(
            one(mp(3, 3, 1, true), &[f(&[1, 5, 5])]).shape,
            vec![1, 2, 2]
        );
        assert_eq!(
            err_msg(mp(2, 2, 2, false), &[f(&[1, 1, 4, 4])]),
            "max_pool2d(f32[1,1,4,4]): pad should be at most half of effective kernel size, but got pad=[2, 2], kernel_size=[2, 2]"
        );
        let ap = Op::AvgPool2d {
            kernel: [3, 3],
            stride: [2, 2],
            padding: [1, 1],
            ceil_mode: false,
            count_include_pad: true,
            divisor_override: None,
        };
        assert_eq!(one(ap, &[f(&[2, 3, 7, 7])]), f(&[2, 3, 4, 4]));
        assert!(err_msg(mp(3, 1, 0, false), &[f(&[1, 1, 2, 2])])
            .contains("calculated output size is too small"));
    }

    #[test]
    fn norms_and_dropout() {
        let bn = |training, running| Op::BatchNorm {
            training,
            momentum: 0.1,
            eps: 1e-5,
            has_weight: true,
            has_bias: true,
            has_running_stats: running,
        };
        let c = f(&[4]);
        let x = f(&[2, 4, 3, 3]);
        let all = [x.clone(), c.clone(), c.clone(), c.clone(), c.clone()];
        assert_eq!(infer(&bn(false, true), &all).unwrap(), vec![x.clone()]);
        assert_eq!(
            infer(&bn(true, true), &all).unwrap(),
            vec![x.clone(), c.clone(), c.clone()]
        );
        assert_eq!(infer(&bn(true, false), &all[..3]).unwrap(), vec![x.clone()]);
        assert!(err_msg(bn(false, false), &all[..3])
            .ends_with("eval mode needs running_mean and running_var"));
        assert!(err_msg(
            bn(false, true),
            &[x.clone(), c.clone(), f(&[5]), c.clone(), c.clone()]
        )
        .contains("operand 2 must have shape [4] (the channel count), got [5]"));
        assert!(err_msg(
            bn(true, true),
            &[f(&[1, 4]), c.clone(), c.clone(), c.clone(), c.clone()]
        )
        .contains("expected more than 1 value per channel when training"));
        let ln = Op::LayerNorm {
            normalized_shape: vec![3, 3],
            eps: 1e-5,
            has_weight: true,
            has_bias: false,
        };
        assert_eq!(one(ln.clone(), &[x.clone(), f(&[3, 3])]), x);
        assert_eq!(
            err_msg(ln, &[f(&[2, 4]), f(&[3, 3])]),
            "layer_norm(f32[2,4], f32[3,3]): given normalized_shape=[3, 3], expected input with shape [*, 3, 3], but got input of size [2, 4]"
        );
        assert_eq!(
            err_msg(
                Op::Dropout {
                    p: 1.5,
                    seed: 0,
                    offset: 0
                },
                &[x]
            ),
            "dropout(f32[2,4,3,3]): dropout probability has to be between 0 and 1, but got 1.5"
        );
    }

    #[test]
    fn views_and_copies() {
        let x = f(&[2, 3, 4]);
        assert_eq!(
            one(Op::Reshape { shape: vec![6, 4] }, &[x.clone()]),
            f(&[6, 4])
        );
        assert_eq!(
            err_msg(Op::Reshape { shape: vec![5, 5] }, &[x.clone()]),
            "reshape(f32[2,3,4]): shape [5, 5] is invalid for input of size 24"
        );
        assert_eq!(
            one(
                Op::Permute {
                    dims: vec![2, 0, 1]
                },
                &[x.clone()]
            ),
            f(&[4, 2, 3])
        );
        assert!(err_msg(
            Op::Permute {
                dims: vec![0, 0, 1]
            },
            &[x.clone()]
        )
        .contains("appears more than once"));
        assert_eq!(
            one(
                Op::Expand {
                    shape: vec![5, 2, 3, 4]
                },
                &[x.clone()]
            ),
            f(&[5, 2, 3, 4])
        );
        assert_eq!(
            err_msg(Op::Expand { shape: vec![2, 5, 4] }, &[x.clone()]),
            "expand(f32[2,3,4]): the expanded size of the tensor (5) must match the existing size (3) at non-singleton dimension 1"
        );
        assert_eq!(
            one(
                Op::Slice {
                    dim: 2,
                    start: 1,
                    end: 4,
                    step: 2
                },
                &[x.clone()]
            ),
            f(&[2, 3, 2])
        );
        assert!(err_msg(
            Op::Slice {
                dim: 2,
                start: 1,
                end: 5,
                step: 1
            },
            &[x.clone()]
        )
        .contains("out of range"));
        assert_eq!(
            one(Op::Select { dim: 1, index: 2 }, &[x.clone()]),
            f(&[2, 4])
        );
        assert_eq!(
            err_msg(Op::Select { dim: 1, index: 3 }, &[x.clone()]),
            "select(f32[2,3,4]): index 3 is out of bounds for dimension 1 with size 3"
        );
        assert_eq!(
            one(
                Op::IndexSelect { dim: 2 },
                &[x.clone(), ty(&[7], DType::I64)]
            ),
            f(&[2, 3, 7])
        );
        assert_eq!(one(Op::Contiguous, &[x.clone()]), x);
        assert_eq!(
            one(Op::Cat { dim: 1 }, &[x.clone(), ty(&[2, 5, 4], DType::F64)]),
            ty(&[2, 8, 4], DType::F64)
        );
        assert!(err_msg(Op::Cat { dim: 1 }, &[x.clone(), f(&[2, 5, 3])])
            .contains("sizes of tensors must match except in dimension 1"));
        assert_eq!(
            one(Op::Stack { dim: 3 }, &[x.clone(), x.clone()]),
            f(&[2, 3, 4, 2])
        );
        assert!(err_msg(Op::Stack { dim: 0 }, &[x.clone(), f(&[2, 3])])
            .contains("stack expects each tensor to be equal size"));
        assert_eq!(
            err_msg(
                Op::Constant {
                    ty: f(&[2]),
                    data: vec![1.0]
                },
                &[]
            ),
            "constant(): constant of type f32[2] needs 2 values, got 1"
        );
    }
}
