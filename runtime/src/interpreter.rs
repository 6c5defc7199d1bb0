//! The reference interpreter: runs any graph node by node, in the graph's
//! deterministic topological order, with the frontend's eager ops (one arm
//! per `Op` variant), freeing each value after its last use (torch.fx
//! `Interpreter` style). It is the semantic oracle for every backend: a
//! backend is right when it agrees with `run_graph`.
//!
//! Semantics follow the IR's type inference exactly: every node's result is
//! checked against the type the graph records for it. Where the eager op's
//! own promotion differs from `torch.result_type` (a 0-dim operand of the
//! same category does not take part in promotion), the operands are first
//! cast to the inferred dtype. Views (reshape, permute, expand, slice,
//! select) stay views; later ops read them through their strides. A
//! training BatchNorm updates copies of the running stats, which become its
//! second and third outputs (the bound buffers are never written here).

use crate::error::{Error, Result};
use kiln_cpu::conv::Conv2dParams;
use kiln_frontend::ops::{conv, nn as fnn};
use kiln_frontend::Tensor;
use kiln_ir::op::result_type;
use kiln_ir::{DType, Graph, InputKind, NodeId, Op, ReduceOp, TensorType, UnaryOp, Value};
use std::collections::HashMap;

/// Every value a run computed, for per-node comparison between backends.
pub struct Collected {
    /// Nodes in execution (topological) order.
    pub order: Vec<NodeId>,
    /// The value of every output of every node.
    pub values: HashMap<Value, Tensor>,
    /// The graph outputs, in order.
    pub outputs: Vec<Tensor>,
}

/// Run `graph` on `inputs` (user input `i` is `inputs[i]`); parameters and
/// buffers come from `bindings` by name. Returns the graph outputs in order
/// (user outputs and buffer updates, as the graph lists them).
pub fn run_graph(
    graph: &Graph,
    inputs: &[Tensor],
    bindings: &dyn Fn(&InputKind) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    Ok(run(graph, inputs, bindings, false)?.outputs)
}

/// `run_graph` that keeps every node's value.
pub fn run_graph_collect(
    graph: &Graph,
    inputs: &[Tensor],
    bindings: &dyn Fn(&InputKind) -> Result<Tensor>,
) -> Result<Collected> {
    run(graph, inputs, bindings, true)
}

/// The number of user inputs of a graph.
pub fn user_input_count(graph: &Graph) -> usize {
    graph
        .inputs()
        .iter()
        .filter(|&&n| {
            matches!(
                graph.node(n).op,
                Op::Input {
                    kind: InputKind::User(_),
                    ..
                }
            )
        })
        .count()
}

/// `f32[2,3]`-style type of a tensor.
pub fn tensor_type(t: &Tensor) -> TensorType {
    TensorType::new(&t.shape(), t.dtype())
}

fn run(
    graph: &Graph,
    inputs: &[Tensor],
    bindings: &dyn Fn(&InputKind) -> Result<Tensor>,
    keep_all: bool,
) -> Result<Collected> {
    let order = graph.topo_order()?;
    let nusers = user_input_count(graph);
    if inputs.len() != nusers {
        return Err(Error::Input(format!(
            "the graph takes {nusers} input(s), got {}",
            inputs.len()
        )));
    }
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    // Last use (position in `order`) of every value read by a node; values
    // that are graph outputs live to the end.
    let mut last_use: HashMap<Value, usize> = HashMap::new();
    for (i, &n) in order.iter().enumerate() {
        for v in graph.operands(n) {
            let e = last_use.entry(v).or_insert(i);
            *e = (*e).max(i);
        }
    }
    for o in graph.outputs() {
        last_use.insert(o.value, usize::MAX);
    }
    let mut values: HashMap<Value, Tensor> = HashMap::new();
    for (i, &n) in order.iter().enumerate() {
        let node = graph.node(n);
        let operands = graph.operands(n);
        let args: Vec<Tensor> = operands.iter().map(|v| values[v].clone()).collect();
        let outs = exec_node(&node.op, &args, inputs, bindings)
            .and_then(|outs| check_types(&outs, &node.outputs).map(|_| outs))
            .map_err(|e| Error::Exec {
                node: describe_node(graph, &pos, n),
                source: Box::new(e),
            })?;
        drop(args);
        for (k, t) in outs.into_iter().enumerate() {
            let v = Value::new(n, k);
            if keep_all || last_use.contains_key(&v) {
                values.insert(v, t);
            }
        }
        if !keep_all {
            for v in operands {
                if last_use.get(&v) == Some(&i) {
                    values.remove(&v);
                }
            }
        }
    }
    let outputs = graph
        .outputs()
        .iter()
        .map(|o| values[&o.value].clone())
        .collect();
    Ok(Collected {
        order,
        values,
        outputs,
    })
}

/// `%5 = relu(%4) : f32[2,3]  # Net/ReLU[act]`, numbered as in the listing.
pub(crate) fn describe_node(g: &Graph, pos: &HashMap<NodeId, usize>, n: NodeId) -> String {
    let node = g.node(n);
    let name = |v: &Value| {
        if g.node(v.node).outputs.len() == 1 {
            format!("%{}", pos[&v.node])
        } else {
            format!("%{}.{}", pos[&v.node], v.output)
        }
    };
    let mut s = format!("%{} = {}", pos[&n], node.op.name());
    let ops: Vec<String> = g.operands(n).iter().map(name).collect();
    if !ops.is_empty() {
        s.push_str(&format!("({})", ops.join(", ")));
    }
    for (k, v) in node.op.attrs() {
        if k != "data" {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    let tys: Vec<String> = node.outputs.iter().map(|t| t.to_string()).collect();
    s.push_str(&format!(" : {}", tys.join(", ")));
    if !node.scope.is_empty() {
        s.push_str(&format!("  # {}", node.scope));
    }
    s
}

fn check_type(what: &str, got: &Tensor, want: &TensorType) -> Result<()> {
    if got.shape() != want.shape || got.dtype() != want.dtype {
        return Err(Error::Input(format!(
            "{what}: expected {want}, got {}",
            tensor_type(got)
        )));
    }
    Ok(())
}

pub(crate) fn check_types(outs: &[Tensor], want: &[TensorType]) -> Result<()> {
    if outs.len() != want.len() {
        return Err(Error::Input(format!(
            "the op produced {} outputs, the graph records {}",
            outs.len(),
            want.len()
        )));
    }
    for (k, (t, w)) in outs.iter().zip(want).enumerate() {
        if t.shape() != w.shape || t.dtype() != w.dtype {
            return Err(Error::Input(format!(
                "output {k} is {}, the graph records {w} (interpreter and type inference disagree)",
                tensor_type(t)
            )));
        }
    }
    Ok(())
}

fn cast(t: &Tensor, d: DType) -> Result<Tensor> {
    if t.dtype() == d {
        Ok(t.clone())
    } else {
        Ok(t.to_dtype(d)?)
    }
}

fn isz(v: &[usize]) -> Vec<isize> {
    v.iter().map(|&d| d as isize).collect()
}

fn pair(a: [usize; 2]) -> (usize, usize) {
    (a[0], a[1])
}

/// A tensor of `ty` from row-major f64 values.
pub fn constant_tensor(ty: &TensorType, data: &[f64]) -> Result<Tensor> {
    let t = Tensor::from_vec::<f64>(data.to_vec(), &ty.shape)?;
    cast(&t, ty.dtype)
}

/// Run one node. `a` holds its operands in order.
pub(crate) fn exec_node(
    op: &Op,
    a: &[Tensor],
    inputs: &[Tensor],
    bindings: &dyn Fn(&InputKind) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    let one = |t: Tensor| Ok(vec![t]);
    match op {
        Op::Input { kind, ty } => {
            let (t, what) = match kind {
                InputKind::User(i) => (
                    inputs
                        .get(*i)
                        .cloned()
                        .ok_or_else(|| Error::Input(format!("missing user input {i}")))?,
                    format!("input {i}"),
                ),
                InputKind::Param(name) => (bindings(kind)?, format!("parameter `{name}`")),
                InputKind::Buffer(name) => (bindings(kind)?, format!("buffer `{name}`")),
            };
            check_type(&what, &t, ty)?;
            one(t)
        }
        Op::Constant { ty, data } => one(constant_tensor(ty, data)?),
        Op::Unary(u) => one(unary(&a[0], *u)?),
        Op::Binary(b) => {
            let ta = tensor_type(&a[0]);
            let tb = tensor_type(&a[1]);
            let d = result_type(&ta, &tb);
            let (x, y) = (cast(&a[0], d)?, cast(&a[1], d)?);
            use kiln_ir::BinaryOp as B;
            one(match b {
                B::Add => x.add(&y)?,
                B::Sub => x.sub(&y)?,
                B::Mul => x.mul(&y)?,
                B::Div => x.div(&y)?,
                B::Pow => x.pow(&y)?,
                B::Maximum => x.maximum(&y)?,
                B::Minimum => x.minimum(&y)?,
                B::Eq => x.eq(&y)?,
                B::Ne => x.ne(&y)?,
                B::Lt => x.lt(&y)?,
                B::Le => x.le(&y)?,
                B::Gt => x.gt(&y)?,
                B::Ge => x.ge(&y)?,
            })
        }
        Op::Where => {
            let d = result_type(&tensor_type(&a[1]), &tensor_type(&a[2]));
            one(Tensor::where_(&a[0], &cast(&a[1], d)?, &cast(&a[2], d)?)?)
        }
        Op::Cast(d) => one(a[0].to_dtype(*d)?),
        Op::Reduce {
            op: r,
            dims,
            keepdim,
        } => {
            let x = &a[0];
            if dims.is_empty() {
                // No dims reduced: the IR keeps the shape (eager's empty
                // list would mean "all dims").
                let d = match r {
                    ReduceOp::Sum | ReduceOp::Prod if !x.dtype().is_float() => DType::I64,
                    _ => x.dtype(),
                };
                return one(x.to_dtype(d)?.contiguous()?);
            }
            let d = isz(dims);
            one(match r {
                ReduceOp::Sum => x.sum_dims(&d, *keepdim)?,
                ReduceOp::Mean => x.mean_dims(&d, *keepdim)?,
                ReduceOp::Max => x.amax(&d, *keepdim)?,
                ReduceOp::Min => x.amin(&d, *keepdim)?,
                ReduceOp::Prod => {
                    // One dim at a time, highest first (indices stay valid).
                    let mut ds = dims.clone();
                    ds.sort_unstable_by(|p, q| q.cmp(p));
                    let mut y = x.clone();
                    for dd in ds {
                        y = y.prod_dim(dd as isize, *keepdim)?;
                    }
                    y
                }
            })
        }
        Op::Var {
            dims,
            correction,
            keepdim,
        } => {
            let x = &a[0];
            if correction.fract() != 0.0 || *correction < 0.0 {
                return Err(Error::Tensor(kiln_frontend::Error::op(
                    "var",
                    format!("correction must be a non-negative integer, got {correction}"),
                )));
            }
            if dims.is_empty() {
                // The variance of each single element: 0 / (1 - correction).
                let z = x.sub(x)?.square()?;
                return one(z.mul_scalar(1.0 / (1.0 - correction).max(0.0))?);
            }
            one(x.var_dims(&isz(dims), *correction as usize, *keepdim)?)
        }
        Op::ArgMax { dim, keepdim } => one(a[0].argmax(Some(*dim as isize), *keepdim)?),
        Op::ArgMin { dim, keepdim } => one(a[0].argmin(Some(*dim as isize), *keepdim)?),
        Op::MaxDim { dim, keepdim } => {
            let (v, i) = a[0].max_dim(*dim as isize, *keepdim)?;
            Ok(vec![v, i])
        }
        Op::MinDim { dim, keepdim } => {
            let (v, i) = a[0].min_dim(*dim as isize, *keepdim)?;
            Ok(vec![v, i])
        }
        Op::Softmax { dim } => one(a[0].softmax(*dim as isize)?),
        Op::LogSoftmax { dim } => one(a[0].log_softmax(*dim as isize)?),
        Op::MatMul => one(a[0].matmul(&a[1])?),
        Op::ModuleCall { path, .. } => Err(Error::Input(format!(
            "module_call `{path}`: a hooked submodule's call is run by the compiled runtime (it needs the live module), not by the interpreter"
        )))?,
        Op::Addmm => one(Tensor::addmm(&a[0], &a[1], &a[2])?),
        Op::Conv2d {
            stride,
            padding,
            dilation,
            groups,
        } => {
            let p = Conv2dParams::from_arrays(*stride, *padding, *dilation, *groups);
            one(conv::conv2d(&a[0], &a[1], a.get(2), p)?)
        }
        Op::ConvTranspose2d {
            stride,
            padding,
            output_padding,
            dilation,
            groups,
        } => {
            let p = Conv2dParams::from_arrays(*stride, *padding, *dilation, *groups);
            one(conv::conv_transpose2d(
                &a[0],
                &a[1],
                a.get(2),
                p,
                pair(*output_padding),
            )?)
        }
        Op::MaxPool2d {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        } => one(fnn::max_pool2d(
            &a[0],
            pair(*kernel),
            Some(pair(*stride)),
            pair(*padding),
            pair(*dilation),
            *ceil_mode,
        )?),
        Op::AvgPool2d {
            kernel,
            stride,
            padding,
            ceil_mode,
            count_include_pad,
            divisor_override,
        } => one(fnn::avg_pool2d(
            &a[0],
            pair(*kernel),
            Some(pair(*stride)),
            pair(*padding),
            *ceil_mode,
            *count_include_pad,
            *divisor_override,
        )?),
        Op::BatchNorm {
            training,
            momentum,
            eps,
            has_weight,
            has_bias,
            has_running_stats,
        } => {
            let mut k = 1;
            let mut next = |present: bool| {
                present.then(|| {
                    k += 1;
                    &a[k - 1]
                })
            };
            let w = next(*has_weight);
            let b = next(*has_bias);
            let (rm, rv) = if *has_running_stats {
                (Some(&a[k]), Some(&a[k + 1]))
            } else {
                (None, None)
            };
            if *training && *has_running_stats {
                // The eager op updates the running stats in place: give it
                // copies, which become the node's 2nd and 3rd outputs.
                let rm = rm.unwrap().clone_tensor()?.detach();
                let rv = rv.unwrap().clone_tensor()?.detach();
                let y = fnn::batch_norm(&a[0], Some(&rm), Some(&rv), w, b, true, *momentum, *eps)?;
                Ok(vec![y, rm, rv])
            } else {
                one(fnn::batch_norm(
                    &a[0], rm, rv, w, b, *training, *momentum, *eps,
                )?)
            }
        }
        Op::LayerNorm {
            normalized_shape,
            eps,
            has_weight,
            has_bias,
        } => {
            let w = has_weight.then(|| &a[1]);
            let b = has_bias.then(|| &a[1 + *has_weight as usize]);
            one(fnn::layer_norm(&a[0], normalized_shape, w, b, *eps)?)
        }
        // The mask comes from the global generator (`kiln::manual_seed`),
        // as in eager training.
        Op::Dropout { p, .. } => one(fnn::dropout(&a[0], *p, true)?),
        Op::Reshape { shape } => one(a[0].reshape_to(shape)?),
        Op::Permute { dims } => one(a[0].permute(&isz(dims))?),
        Op::Expand { shape } => one(a[0].expand_to(shape)?),
        Op::Slice {
            dim,
            start,
            end,
            step,
        } => one(a[0].slice(
            *dim as isize,
            Some(*start as isize),
            Some(*end as isize),
            *step,
        )?),
        Op::Select { dim, index } => one(a[0].select(*dim as isize, *index as isize)?),
        Op::IndexSelect { dim } => one(a[0].index_select(*dim as isize, &a[1])?),
        Op::Contiguous => one(a[0].contiguous()?),
        Op::Cat { dim } | Op::Stack { dim } => {
            let d = a
                .iter()
                .map(|t| t.dtype())
                .reduce(DType::promote)
                .expect("cat has operands");
            let cs = a.iter().map(|t| cast(t, d)).collect::<Result<Vec<_>>>()?;
            let refs: Vec<&Tensor> = cs.iter().collect();
            one(if matches!(op, Op::Cat { .. }) {
                Tensor::cat(&refs, *dim as isize)?
            } else {
                Tensor::stack(&refs, *dim as isize)?
            })
        }
        // ----- backward ops (compiled training), on eager's backward kernels
        Op::Conv2dBackwardInput {
            stride,
            padding,
            dilation,
            groups,
            input_size,
        } => {
            let p = Conv2dParams::from_arrays(*stride, *padding, *dilation, *groups);
            let (g, w) = (&a[0], &a[1]);
            let xs = [
                g.shape()[0],
                w.shape()[1] * groups,
                input_size[0],
                input_size[1],
            ];
            one(conv::conv2d_backward_input(g, w, xs, p)?)
        }
        Op::Conv2dBackwardWeight {
            stride,
            padding,
            dilation,
            groups,
            kernel,
        } => {
            let p = Conv2dParams::from_arrays(*stride, *padding, *dilation, *groups);
            let (g, x) = (&a[0], &a[1]);
            let ws = [g.shape()[1], x.shape()[1] / groups, kernel[0], kernel[1]];
            one(conv::conv2d_backward_weight(g, x, ws, p)?)
        }
        Op::MaxPool2dWithIndices {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        } => {
            let (v, i) = fnn::max_pool2d_with_indices(
                &a[0],
                pair(*kernel),
                Some(pair(*stride)),
                pair(*padding),
                pair(*dilation),
                *ceil_mode,
            )?;
            Ok(vec![v, i])
        }
        Op::MaxPool2dBackward { input_size } => {
            let mut xs = a[0].shape();
            let r = xs.len();
            xs[r - 2] = input_size[0];
            xs[r - 1] = input_size[1];
            one(fnn::max_pool2d_backward(&a[0], &a[1], &xs)?)
        }
        Op::AvgPool2dBackward {
            kernel,
            stride,
            padding,
            ceil_mode,
            count_include_pad,
            divisor_override,
            input_size,
        } => {
            let mut xs = a[0].shape();
            let r = xs.len();
            xs[r - 2] = input_size[0];
            xs[r - 1] = input_size[1];
            one(fnn::avg_pool2d_backward(
                &a[0],
                &xs,
                pair(*kernel),
                pair(*stride),
                pair(*padding),
                *ceil_mode,
                *count_include_pad,
                *divisor_override,
            )?)
        }
        Op::BatchNormBackward {
            training,
            eps,
            has_weight,
        } => {
            let w = has_weight.then(|| &a[2]);
            let k = 2 + *has_weight as usize;
            let running = (!*training).then(|| (&a[k], &a[k + 1]));
            let (gi, gw, gb) = fnn::batch_norm_backward(&a[0], &a[1], w, running, *training, *eps)?;
            Ok(vec![gi, gw, gb])
        }
        Op::LayerNormBackward {
            normalized_shape,
            eps,
            has_weight,
        } => {
            let w = has_weight.then(|| &a[2]);
            let (gi, gw, gb) = fnn::layer_norm_backward(&a[0], &a[1], normalized_shape, w, *eps)?;
            Ok(vec![gi, gw, gb])
        }
        Op::DropoutMask { p } => one(fnn::dropout_mask(&a[0], *p)?),
        Op::SliceBackward {
            input_shape,
            dim,
            start,
            end,
            step,
        } => {
            let z = Tensor::zeros(input_shape, a[0].dtype());
            z.slice(
                *dim as isize,
                Some(*start as isize),
                Some(*end as isize),
                *step,
            )?
            .copy_(&a[0])?;
            one(z)
        }
        Op::IndexSelectBackward { dim, size } => {
            let mut s = a[0].shape();
            s[*dim] = *size;
            let z = Tensor::zeros(&s, a[0].dtype());
            one(z.index_add(*dim as isize, &a[1], &a[0])?)
        }
    }
}

/// A unary op through the eager method that implements it.
fn unary(x: &Tensor, u: UnaryOp) -> Result<Tensor> {
    Ok(match u {
        UnaryOp::Neg => x.neg()?,
        UnaryOp::Abs => x.abs()?,
        UnaryOp::Exp => x.exp()?,
        UnaryOp::Log => x.log()?,
        UnaryOp::Sqrt => x.sqrt()?,
        UnaryOp::Rsqrt => x.rsqrt()?,
        UnaryOp::Sin => x.sin()?,
        UnaryOp::Cos => x.cos()?,
        UnaryOp::Tanh => x.tanh()?,
        UnaryOp::Sigmoid => x.sigmoid()?,
        UnaryOp::Relu => x.relu()?,
        UnaryOp::LeakyRelu(s) => x.leaky_relu(s)?,
        UnaryOp::GeluErf => x.gelu()?,
        UnaryOp::GeluTanh => x.gelu_tanh()?,
        UnaryOp::Erf => x.erf()?,
        UnaryOp::Clamp(lo, hi) => x.clamp(lo, hi)?,
        UnaryOp::PowScalar(p) => x.pow_scalar(p)?,
        UnaryOp::RPowScalar(s) => {
            // s ** x as a tensor pow with a 0-dim base of the result dtype.
            let d = DType::promote_scalar(x.dtype(), s.fract() != 0.0 || !s.is_finite());
            let base = Tensor::full(&[], s, d);
            base.pow(&cast(x, d)?)?
        }
        UnaryOp::AddScalar(s) => x.add_scalar(s)?,
        UnaryOp::MulScalar(s) => x.mul_scalar(s)?,
        UnaryOp::RSubScalar(s) => x.rsub_scalar(s)?,
        UnaryOp::RDivScalar(s) => x.rdiv_scalar(s)?,
        UnaryOp::Square => x.square()?,
        UnaryOp::Reciprocal => x.reciprocal()?,
        UnaryOp::Sign => x.sign()?,
        UnaryOp::Step => {
            // 1 where x > 0 else 0, in x's dtype.
            x.gt_scalar(0.0)?.to_dtype(x.dtype())?
        }
    })
}
