//! Reverse-mode autodiff on the IR (AOTAutograd-style). `differentiate`
//! takes a traced forward graph and the inputs that want a gradient
//! (trainable parameters, user inputs that require grad) and derives, in the
//! IR itself, a forward graph that also outputs the values saved for
//! backward (residuals) and a backward graph whose inputs are the gradients
//! of the forward's user outputs and the residuals and whose outputs are the
//! gradients of the inputs that want one. One vector-Jacobian rule per op
//! (`Ctx::vjp`), the same derivatives as the eager autograd
//! (kiln-frontend `ops/*`), the structured ones (conv, pooling, norms)
//! through backward ops that run the very kernels eager's backward runs.
//!
//! Memory: a value the backward needs is recomputed there instead of saved
//! when it is cheap pointwise or a view (as fusing compilers do), as long as
//! recomputing it does not need more than one full-size operand; contraction,
//! reduction, norm and pool outputs are saved. Inputs that want no gradient
//! (frozen parameters) get no gradient computation at all. Dropout is
//! rewritten to `x * dropout_mask(x)` so its mask is a saved value.

use crate::graph::{Graph, OutputKind, Value};
use crate::op::{err, infer, infer_pool, require_float, InputKind, Op};
use crate::types::{IrError, Result, TensorType};
use crate::{BinaryOp, DType, NodeId, ReduceOp, UnaryOp};
use std::collections::{HashMap, HashSet};

/// The two graphs of a differentiated forward.
#[derive(Clone, Debug)]
pub struct JointGraphs {
    /// The forward graph: the original outputs in their order, then one
    /// `User` output per saved value (residual).
    pub forward: Graph,
    /// How many outputs the original graph has (residuals follow).
    pub num_outputs: usize,
    /// How many residuals the forward outputs after `num_outputs`.
    pub num_saved: usize,
    /// The backward graph. User input `i < grad_outputs.len()` is the
    /// gradient of the forward's user output `grad_outputs[i]` (counted
    /// among user outputs); user input `grad_outputs.len() + j` is residual
    /// `j`. Output `k` is the gradient of forward input `grad_inputs[k]`.
    pub backward: Graph,
    pub grad_outputs: Vec<usize>,
    pub grad_inputs: Vec<InputKind>,
}

/// Differentiates `g`. `wants_grad` says which graph inputs (by kind) get a
/// gradient; a floating-point input for which it returns false is treated
/// as a constant (no gradient computation at all flows into it).
pub fn differentiate(g: &Graph, wants_grad: &dyn Fn(&InputKind) -> bool) -> Result<JointGraphs> {
    let mut f = g.clone();
    rewrite_dropout(&mut f)?;
    let order = f.topo_order()?;
    // Values that require grad.
    let mut req: HashSet<Value> = HashSet::new();
    for &n in &order {
        let node = f.node(n);
        match &node.op {
            Op::Input { kind, ty } => {
                if ty.dtype.is_float() && wants_grad(kind) {
                    req.insert(Value::new(n, 0));
                }
            }
            op => {
                if f.operands(n).iter().any(|v| req.contains(v)) {
                    for k in differentiable_outputs(op) {
                        if node.outputs[k].dtype.is_float() {
                            req.insert(Value::new(n, k));
                        }
                    }
                }
            }
        }
    }
    let mut ctx = Ctx {
        f: &f,
        b: Graph::new(),
        map: HashMap::new(),
        saved: Vec::new(),
        next_input: 0,
        grads: HashMap::new(),
        req: &req,
        scope: String::new(),
    };
    let mut grad_outputs = Vec::new();
    let user_outs: Vec<Value> = f
        .outputs()
        .iter()
        .filter(|o| o.kind == OutputKind::User)
        .map(|o| o.value)
        .collect();
    for (i, v) in user_outs.iter().enumerate() {
        if req.contains(v) {
            let ty = f.value_type(*v).clone();
            let gi = ctx.b.add_input(InputKind::User(ctx.next_input), ty, "")?;
            ctx.next_input += 1;
            grad_outputs.push(i);
            ctx.acc(*v, gi)?;
        }
    }
    for &n in order.iter().rev() {
        let node = f.node(n);
        if matches!(node.op, Op::Input { .. } | Op::Constant { .. }) {
            continue;
        }
        let gs: Vec<Option<Value>> = (0..node.outputs.len())
            .map(|k| ctx.grads.get(&Value::new(n, k)).copied())
            .collect();
        if gs.iter().all(Option::is_none) {
            continue;
        }
        ctx.scope = node.scope.clone();
        ctx.vjp(n, &gs).map_err(|e| match e {
            IrError::Builder(m) => IrError::Builder(format!(
                "autodiff of {} (at {}): {m}",
                node.op.name(),
                node.scope
            )),
            e => e,
        })?;
    }
    let mut grad_inputs = Vec::new();
    let mut outs = Vec::new();
    for &n in f.inputs() {
        if let Op::Input { kind, .. } = &f.node(n).op {
            let v = Value::new(n, 0);
            if req.contains(&v) {
                if let Some(&gv) = ctx.grads.get(&v) {
                    outs.push(gv);
                    grad_inputs.push(kind.clone());
                }
            }
        }
    }
    for gv in outs {
        ctx.b.add_output(gv, OutputKind::User)?;
    }
    let saved = std::mem::take(&mut ctx.saved);
    let mut backward = ctx.b;
    crate::passes::dce(&mut backward)?;
    let num_outputs = f.outputs().len();
    for s in &saved {
        f.add_output(*s, OutputKind::User)?;
    }
    crate::verify(&f)?;
    crate::verify(&backward)?;
    Ok(JointGraphs {
        forward: f,
        num_outputs,
        num_saved: saved.len(),
        backward,
        grad_outputs,
        grad_inputs,
    })
}

fn is_view(op: &Op) -> bool {
    matches!(
        op,
        Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. }
            | Op::Select { .. }
            | Op::Contiguous
    )
}

fn is_pointwise(op: &Op) -> bool {
    matches!(op, Op::Unary(_) | Op::Binary(_) | Op::Where | Op::Cast(_))
}

/// Which outputs of an op carry a gradient (BatchNorm's running-stat
/// outputs and index outputs do not).
fn differentiable_outputs(op: &Op) -> Vec<usize> {
    match op {
        Op::ArgMax { .. }
        | Op::ArgMin { .. }
        | Op::Unary(UnaryOp::Sign)
        | Op::Unary(UnaryOp::Step)
        | Op::DropoutMask { .. }
        | Op::Input { .. }
        | Op::Constant { .. } => vec![],
        Op::Binary(b) if b.is_comparison() => vec![],
        _ => vec![0],
    }
}

/// `dropout(x)` becomes `x * dropout_mask(x)` (same draw from the global
/// generator), so the mask is a value the backward can save; `max_pool2d`
/// becomes `max_pool2d_with_indices`, so the backward saves the indices
/// (as eager does) instead of the pool's input.
fn rewrite_dropout(f: &mut Graph) -> Result<()> {
    for n in f.topo_order()? {
        if let Op::MaxPool2d {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        } = f.node(n).op
        {
            let scope = f.node(n).scope.clone();
            let x = f.operands(n)[0];
            let vs = f.add_node(
                Op::MaxPool2dWithIndices {
                    kernel,
                    stride,
                    padding,
                    dilation,
                    ceil_mode,
                },
                &[x],
                &scope,
            )?;
            f.replace_all_uses(Value::new(n, 0), vs[0]);
            f.remove_node(n);
            continue;
        }
        if let Op::Dropout { p, .. } = f.node(n).op {
            let scope = f.node(n).scope.clone();
            let x = f.operands(n)[0];
            let mask = f.add1(Op::DropoutMask { p }, &[x], &scope)?;
            let y = f.add1(Op::Binary(BinaryOp::Mul), &[x, mask], &scope)?;
            f.replace_all_uses(Value::new(n, 0), y);
            f.remove_node(n);
        }
    }
    Ok(())
}

struct Ctx<'a> {
    f: &'a Graph,
    b: Graph,
    /// Forward value -> its value in the backward graph (saved or recomputed).
    map: HashMap<Value, Value>,
    saved: Vec<Value>,
    next_input: usize,
    /// Forward value -> accumulated gradient (a backward value).
    grads: HashMap<Value, Value>,
    req: &'a HashSet<Value>,
    scope: String,
}

fn bad(msg: impl Into<String>) -> IrError {
    IrError::Builder(msg.into())
}

impl Ctx<'_> {
    fn ty(&self, bv: Value) -> TensorType {
        self.b.value_type(bv).clone()
    }

    fn fty(&self, v: Value) -> &TensorType {
        self.f.value_type(v)
    }

    fn add(&mut self, op: Op, operands: &[Value]) -> Result<Value> {
        let scope = self.scope.clone();
        self.b.add1(op, operands, &scope)
    }

    fn un(&mut self, u: UnaryOp, x: Value) -> Result<Value> {
        self.add(Op::Unary(u), &[x])
    }

    fn bin(&mut self, op: BinaryOp, x: Value, y: Value) -> Result<Value> {
        self.add(Op::Binary(op), &[x, y])
    }

    fn cast(&mut self, x: Value, d: DType) -> Result<Value> {
        if self.ty(x).dtype == d {
            Ok(x)
        } else {
            self.add(Op::Cast(d), &[x])
        }
    }

    fn reshape(&mut self, x: Value, shape: &[usize]) -> Result<Value> {
        if self.ty(x).shape == shape {
            Ok(x)
        } else {
            self.add(
                Op::Reshape {
                    shape: shape.to_vec(),
                },
                &[x],
            )
        }
    }

    fn permute(&mut self, x: Value, dims: Vec<usize>) -> Result<Value> {
        self.add(Op::Permute { dims }, &[x])
    }

    /// Swap the last two dims.
    fn mt(&mut self, x: Value) -> Result<Value> {
        let r = self.ty(x).rank();
        let mut d: Vec<usize> = (0..r).collect();
        d.swap(r - 2, r - 1);
        self.permute(x, d)
    }

    fn sum(&mut self, x: Value, dims: Vec<usize>, keepdim: bool) -> Result<Value> {
        if dims.is_empty() {
            return Ok(x);
        }
        self.add(
            Op::Reduce {
                op: ReduceOp::Sum,
                dims,
                keepdim,
            },
            &[x],
        )
    }

    /// A 0-dim constant of dtype `d`.
    fn scalar(&mut self, value: f64, d: DType) -> Result<Value> {
        let scope = self.scope.clone();
        self.b
            .add_constant(TensorType::new(&[], d), vec![value], &scope)
    }

    fn mul_scalar(&mut self, x: Value, s: f64) -> Result<Value> {
        self.un(UnaryOp::MulScalar(s), x)
    }

    /// Sum a broadcast gradient down to `shape` (PyTorch's `sum_to_size`).
    fn sum_to(&mut self, g: Value, shape: &[usize]) -> Result<Value> {
        let gs = self.ty(g).shape;
        if gs == shape {
            return Ok(g);
        }
        if gs.len() < shape.len() {
            return Err(bad(format!("cannot sum {gs:?} to {shape:?}")));
        }
        let lead = gs.len() - shape.len();
        let mut dims: Vec<usize> = (0..lead).collect();
        for (i, &s) in shape.iter().enumerate() {
            if s == 1 && gs[lead + i] != 1 {
                dims.push(lead + i);
            }
        }
        let s = self.sum(g, dims, true)?;
        self.reshape(s, shape)
    }

    /// The gradient of a reduction's output brought back to the input's
    /// shape (keepdim reshape + expand).
    fn unreduce(
        &mut self,
        g: Value,
        in_shape: &[usize],
        dims: &[usize],
        keepdim: bool,
    ) -> Result<Value> {
        let keep = crate::shape::reduced_shape(in_shape, dims, true);
        let g = if keepdim { g } else { self.reshape(g, &keep)? };
        if keep == in_shape {
            return Ok(g);
        }
        self.add(
            Op::Expand {
                shape: in_shape.to_vec(),
            },
            &[g],
        )
    }

    /// Add `g` into the gradient of forward value `v` (cast to its dtype).
    fn acc(&mut self, v: Value, g: Value) -> Result<()> {
        if !self.req.contains(&v) {
            return Ok(());
        }
        let want = self.fty(v).clone();
        let got = self.ty(g);
        if got.shape != want.shape {
            return Err(bad(format!(
                "gradient of shape {:?} for a value of shape {:?}",
                got.shape, want.shape
            )));
        }
        let g = self.cast(g, want.dtype)?;
        let new = match self.grads.get(&v) {
            Some(&old) => self.bin(BinaryOp::Add, old, g)?,
            None => g,
        };
        self.grads.insert(v, new);
        Ok(())
    }

    fn needs(&self, v: Value) -> bool {
        self.req.contains(&v)
    }

    /// Whether forward value `v` is recomputed in the backward instead of
    /// saved: views, and cheap pointwise ops whose recomputation needs at
    /// most one value not already available (a residual add of two big
    /// tensors saves its sum instead of both operands).
    fn recompute(&self, v: Value) -> bool {
        let mut memo = HashMap::new();
        match &self.f.node(v.node).op {
            Op::Constant { .. } => true,
            op if is_view(op) => true,
            op if is_pointwise(op) => self.sources(v, &mut memo).len() <= 1,
            _ => false,
        }
    }

    /// The values (not yet available in the backward) that recomputing `v`
    /// would need; `[v]` itself if it would be saved.
    fn sources(&self, v: Value, memo: &mut HashMap<Value, Vec<Value>>) -> Vec<Value> {
        if self.map.contains_key(&v) {
            return Vec::new();
        }
        if let Some(s) = memo.get(&v) {
            return s.clone();
        }
        let op = &self.f.node(v.node).op;
        let r = if matches!(op, Op::Constant { .. }) {
            Vec::new()
        } else if is_view(op) || is_pointwise(op) {
            let mut all: Vec<Value> = Vec::new();
            for o in self.f.operands(v.node) {
                all.extend(self.sources(o, memo));
            }
            all.sort();
            all.dedup();
            if is_pointwise(op) && all.len() > 1 {
                vec![v]
            } else {
                all
            }
        } else {
            vec![v]
        };
        memo.insert(v, r.clone());
        r
    }

    /// Forward value `v` as a backward value: recomputed or saved.
    fn fv(&mut self, v: Value) -> Result<Value> {
        if let Some(&x) = self.map.get(&v) {
            return Ok(x);
        }
        let x = if self.recompute(v) {
            let node = self.f.node(v.node);
            let operands = self.f.operands(v.node);
            let mut ops = Vec::with_capacity(operands.len());
            for o in operands {
                ops.push(self.fv(o)?);
            }
            let outs = self.b.add_node(node.op.clone(), &ops, &node.scope)?;
            for (k, o) in outs.iter().enumerate() {
                self.map.insert(Value::new(v.node, k), *o);
            }
            outs[v.output]
        } else {
            let ty = self.fty(v).clone();
            let x = self.b.add_input(InputKind::User(self.next_input), ty, "")?;
            self.next_input += 1;
            self.saved.push(v);
            x
        };
        self.map.insert(v, x);
        Ok(x)
    }

    /// Emit the vector-Jacobian product of node `n` given the gradients of
    /// its outputs, accumulating into the gradients of its operands.
    fn vjp(&mut self, n: NodeId, gs: &[Option<Value>]) -> Result<()> {
        let node = self.f.node(n).clone();
        let ops = self.f.operands(n);
        let y = Value::new(n, 0);
        let g = match gs[0] {
            Some(g) => g,
            None => return Ok(()),
        };
        let ot = node.outputs[0].clone();
        match &node.op {
            Op::Input { .. } | Op::Constant { .. } => Ok(()),
            Op::Unary(u) => {
                let x = ops[0];
                if !self.needs(x) {
                    return Ok(());
                }
                let d = ot.dtype;
                let gx = match *u {
                    UnaryOp::Neg | UnaryOp::RSubScalar(_) => self.un(UnaryOp::Neg, g)?,
                    UnaryOp::AddScalar(_) => g,
                    UnaryOp::MulScalar(s) => self.mul_scalar(g, s)?,
                    UnaryOp::Abs => {
                        let xv = self.fv(x)?;
                        let s = self.un(UnaryOp::Sign, xv)?;
                        self.bin(BinaryOp::Mul, g, s)?
                    }
                    UnaryOp::Exp => {
                        let yv = self.fv(y)?;
                        self.bin(BinaryOp::Mul, g, yv)?
                    }
                    UnaryOp::Log => {
                        let xv = self.fv(x)?;
                        self.bin(BinaryOp::Div, g, xv)?
                    }
                    UnaryOp::Sqrt => {
                        // g / (2 y)
                        let yv = self.fv(y)?;
                        let t = self.mul_scalar(yv, 2.0)?;
                        self.bin(BinaryOp::Div, g, t)?
                    }
                    UnaryOp::Rsqrt => {
                        // -0.5 g y^3
                        let yv = self.fv(y)?;
                        let t = self.un(UnaryOp::PowScalar(3.0), yv)?;
                        let t = self.mul_scalar(t, -0.5)?;
                        self.bin(BinaryOp::Mul, g, t)?
                    }
                    UnaryOp::Sin => {
                        let xv = self.fv(x)?;
                        let c = self.un(UnaryOp::Cos, xv)?;
                        self.bin(BinaryOp::Mul, g, c)?
                    }
                    UnaryOp::Cos => {
                        let xv = self.fv(x)?;
                        let s = self.un(UnaryOp::Sin, xv)?;
                        let s = self.un(UnaryOp::Neg, s)?;
                        self.bin(BinaryOp::Mul, g, s)?
                    }
                    UnaryOp::Tanh => {
                        // g (1 - y^2)
                        let yv = self.fv(y)?;
                        let t = self.un(UnaryOp::Square, yv)?;
                        let t = self.un(UnaryOp::RSubScalar(1.0), t)?;
                        self.bin(BinaryOp::Mul, g, t)?
                    }
                    UnaryOp::Sigmoid => {
                        // g y (1 - y)
                        let yv = self.fv(y)?;
                        let t = self.un(UnaryOp::RSubScalar(1.0), yv)?;
                        let t = self.bin(BinaryOp::Mul, yv, t)?;
                        self.bin(BinaryOp::Mul, g, t)?
                    }
                    UnaryOp::Relu => {
                        // threshold_backward on the result, as eager.
                        let yv = self.fv(y)?;
                        let m = self.un(UnaryOp::Step, yv)?;
                        self.bin(BinaryOp::Mul, g, m)?
                    }
                    UnaryOp::LeakyRelu(s) => {
                        // x > 0 ? g : s g
                        let xv = self.fv(x)?;
                        let m = self.un(UnaryOp::Step, xv)?;
                        let m = self.mul_scalar(m, 1.0 - s)?;
                        let m = self.un(UnaryOp::AddScalar(s), m)?;
                        self.bin(BinaryOp::Mul, g, m)?
                    }
                    UnaryOp::GeluErf => {
                        // Phi(x) + x phi(x)
                        let xv = self.fv(x)?;
                        let t = self.mul_scalar(xv, std::f64::consts::FRAC_1_SQRT_2)?;
                        let t = self.un(UnaryOp::Erf, t)?;
                        let t = self.un(UnaryOp::AddScalar(1.0), t)?;
                        let cdf = self.mul_scalar(t, 0.5)?;
                        let sq = self.un(UnaryOp::Square, xv)?;
                        let e = self.mul_scalar(sq, -0.5)?;
                        let e = self.un(UnaryOp::Exp, e)?;
                        let pdf = self.mul_scalar(
                            e,
                            0.5 * std::f64::consts::FRAC_2_SQRT_PI
                                * std::f64::consts::FRAC_1_SQRT_2,
                        )?;
                        let xp = self.bin(BinaryOp::Mul, xv, pdf)?;
                        let dd = self.bin(BinaryOp::Add, cdf, xp)?;
                        self.bin(BinaryOp::Mul, g, dd)?
                    }
                    UnaryOp::GeluTanh => {
                        // 0.5 (1 + t) + 0.5 x (1 - t^2) k (1 + 3 c x^2),
                        // t = tanh(k (x + c x^3)), k = sqrt(2/pi)
                        let k = (2.0 / std::f64::consts::PI).sqrt();
                        let c = 0.044715;
                        let xv = self.fv(x)?;
                        let x2 = self.un(UnaryOp::Square, xv)?;
                        let x3 = self.bin(BinaryOp::Mul, x2, xv)?;
                        let inner = self.mul_scalar(x3, c)?;
                        let inner = self.bin(BinaryOp::Add, xv, inner)?;
                        let inner = self.mul_scalar(inner, k)?;
                        let t = self.un(UnaryOp::Tanh, inner)?;
                        let left = self.un(UnaryOp::AddScalar(1.0), t)?;
                        let left = self.mul_scalar(left, 0.5)?;
                        let t2 = self.un(UnaryOp::Square, t)?;
                        let sech = self.un(UnaryOp::RSubScalar(1.0), t2)?;
                        let dinner = self.mul_scalar(x2, 3.0 * c)?;
                        let dinner = self.un(UnaryOp::AddScalar(1.0), dinner)?;
                        let dinner = self.mul_scalar(dinner, 0.5 * k)?;
                        let right = self.bin(BinaryOp::Mul, xv, sech)?;
                        let right = self.bin(BinaryOp::Mul, right, dinner)?;
                        let dd = self.bin(BinaryOp::Add, left, right)?;
                        self.bin(BinaryOp::Mul, g, dd)?
                    }
                    UnaryOp::Erf => {
                        let xv = self.fv(x)?;
                        let sq = self.un(UnaryOp::Square, xv)?;
                        let e = self.mul_scalar(sq, -1.0)?;
                        let e = self.un(UnaryOp::Exp, e)?;
                        let e = self.mul_scalar(e, std::f64::consts::FRAC_2_SQRT_PI)?;
                        self.bin(BinaryOp::Mul, g, e)?
                    }
                    UnaryOp::Clamp(lo, hi) => {
                        let xv = self.fv(x)?;
                        let mut m: Option<Value> = None;
                        for (bound, cmp) in [(lo, BinaryOp::Ge), (hi, BinaryOp::Le)] {
                            if let Some(b) = bound {
                                let c = self.scalar(b, self.ty(xv).dtype)?;
                                let k = self.bin(cmp, xv, c)?;
                                let k = self.cast(k, d)?;
                                m = Some(match m {
                                    Some(p) => self.bin(BinaryOp::Mul, p, k)?,
                                    None => k,
                                });
                            }
                        }
                        match m {
                            Some(m) => self.bin(BinaryOp::Mul, g, m)?,
                            None => g,
                        }
                    }
                    UnaryOp::PowScalar(p) => {
                        if p == 0.0 {
                            return Ok(());
                        }
                        let xv = self.fv(x)?;
                        let t = if p == 2.0 {
                            xv
                        } else {
                            self.un(UnaryOp::PowScalar(p - 1.0), xv)?
                        };
                        let t = self.mul_scalar(t, p)?;
                        self.bin(BinaryOp::Mul, g, t)?
                    }
                    UnaryOp::RPowScalar(s) => {
                        let yv = self.fv(y)?;
                        let t = self.mul_scalar(yv, s.ln())?;
                        self.bin(BinaryOp::Mul, g, t)?
                    }
                    UnaryOp::RDivScalar(_) => {
                        // y = s / x: -g y / x
                        let (xv, yv) = (self.fv(x)?, self.fv(y)?);
                        let t = self.bin(BinaryOp::Div, yv, xv)?;
                        let t = self.un(UnaryOp::Neg, t)?;
                        self.bin(BinaryOp::Mul, g, t)?
                    }
                    UnaryOp::Square => {
                        let xv = self.fv(x)?;
                        let t = self.mul_scalar(xv, 2.0)?;
                        self.bin(BinaryOp::Mul, g, t)?
                    }
                    UnaryOp::Reciprocal => {
                        let yv = self.fv(y)?;
                        let t = self.un(UnaryOp::Square, yv)?;
                        let t = self.un(UnaryOp::Neg, t)?;
                        self.bin(BinaryOp::Mul, g, t)?
                    }
                    UnaryOp::Sign | UnaryOp::Step => return Ok(()),
                };
                self.acc(x, gx)
            }
            Op::Binary(b) => {
                let (a, c) = (ops[0], ops[1]);
                let (sa, sc) = (self.fty(a).shape.clone(), self.fty(c).shape.clone());
                let (ga, gc): (Option<Value>, Option<Value>) = match b {
                    BinaryOp::Add => (Some(g), Some(g)),
                    BinaryOp::Sub => {
                        let n = if self.needs(c) {
                            Some(self.un(UnaryOp::Neg, g)?)
                        } else {
                            None
                        };
                        (Some(g), n)
                    }
                    BinaryOp::Mul => {
                        let ga = if self.needs(a) {
                            let cv = self.fv(c)?;
                            Some(self.bin(BinaryOp::Mul, g, cv)?)
                        } else {
                            None
                        };
                        let gc = if self.needs(c) {
                            let av = self.fv(a)?;
                            Some(self.bin(BinaryOp::Mul, g, av)?)
                        } else {
                            None
                        };
                        (ga, gc)
                    }
                    BinaryOp::Div => {
                        let cv = self.fv(c)?;
                        let ga = self.bin(BinaryOp::Div, g, cv)?;
                        let gc = if self.needs(c) {
                            // -g a / c^2 = -(g / c) * (a / c)
                            let av = self.fv(a)?;
                            let q = self.bin(BinaryOp::Div, av, cv)?;
                            let t = self.bin(BinaryOp::Mul, ga, q)?;
                            Some(self.un(UnaryOp::Neg, t)?)
                        } else {
                            None
                        };
                        (Some(ga), gc)
                    }
                    BinaryOp::Pow => {
                        let (av, cv) = (self.fv(a)?, self.fv(c)?);
                        let ga = if self.needs(a) {
                            let e = self.un(UnaryOp::AddScalar(-1.0), cv)?;
                            let p = self.bin(BinaryOp::Pow, av, e)?;
                            let p = self.bin(BinaryOp::Mul, p, cv)?;
                            Some(self.bin(BinaryOp::Mul, g, p)?)
                        } else {
                            None
                        };
                        let gc = if self.needs(c) {
                            let yv = self.fv(y)?;
                            let l = self.un(UnaryOp::Log, av)?;
                            let t = self.bin(BinaryOp::Mul, yv, l)?;
                            Some(self.bin(BinaryOp::Mul, g, t)?)
                        } else {
                            None
                        };
                        (ga, gc)
                    }
                    BinaryOp::Maximum | BinaryOp::Minimum => {
                        // The winner gets g, a tie splits it in halves.
                        let (av, cv) = (self.fv(a)?, self.fv(c)?);
                        let cmp = if *b == BinaryOp::Maximum {
                            BinaryOp::Gt
                        } else {
                            BinaryOp::Lt
                        };
                        let d = ot.dtype;
                        let wa = self.bin(cmp, av, cv)?;
                        let wa = self.cast(wa, d)?;
                        let eq = self.bin(BinaryOp::Eq, av, cv)?;
                        let eq = self.cast(eq, d)?;
                        let half = self.mul_scalar(eq, 0.5)?;
                        let ma = self.bin(BinaryOp::Add, wa, half)?;
                        let ga = self.bin(BinaryOp::Mul, g, ma)?;
                        let gc = self.bin(BinaryOp::Sub, g, ga)?;
                        (Some(ga), Some(gc))
                    }
                    _ => (None, None),
                };
                if let (Some(ga), true) = (ga, self.needs(a)) {
                    let s = self.sum_to(ga, &sa)?;
                    self.acc(a, s)?;
                }
                if let (Some(gc), true) = (gc, self.needs(c)) {
                    let s = self.sum_to(gc, &sc)?;
                    self.acc(c, s)?;
                }
                Ok(())
            }
            Op::Where => {
                let cond = self.fv(ops[0])?;
                let zero = self.scalar(0.0, ot.dtype)?;
                for (i, v) in [(1, ops[1]), (2, ops[2])] {
                    if self.needs(v) {
                        let w = if i == 1 {
                            self.add(Op::Where, &[cond, g, zero])?
                        } else {
                            self.add(Op::Where, &[cond, zero, g])?
                        };
                        let s = self.fty(v).shape.clone();
                        let w = self.sum_to(w, &s)?;
                        self.acc(v, w)?;
                    }
                }
                Ok(())
            }
            Op::Cast(_) => self.acc(ops[0], g),
            Op::Reduce {
                op: r,
                dims,
                keepdim,
            } => {
                let x = ops[0];
                let xs = self.fty(x).shape.clone();
                let gu = self.unreduce(g, &xs, dims, *keepdim)?;
                let gx = match r {
                    ReduceOp::Sum => gu,
                    ReduceOp::Mean => {
                        let cnt: usize = dims.iter().map(|&d| xs[d]).product();
                        self.mul_scalar(gu, 1.0 / cnt.max(1) as f64)?
                    }
                    ReduceOp::Max | ReduceOp::Min => {
                        // Evenly over the ties, as amax/amin's backward.
                        let (xv, yv) = (self.fv(x)?, self.fv(y)?);
                        let yk = self.unreduce(yv, &xs, dims, *keepdim)?;
                        let m = self.bin(BinaryOp::Eq, xv, yk)?;
                        let m = self.cast(m, ot.dtype)?;
                        let cnt = self.sum(m, dims.clone(), true)?;
                        let gm = self.bin(BinaryOp::Mul, gu, m)?;
                        self.bin(BinaryOp::Div, gm, cnt)?
                    }
                    ReduceOp::Prod => {
                        let (xv, yv) = (self.fv(x)?, self.fv(y)?);
                        let yk = self.unreduce(yv, &xs, dims, *keepdim)?;
                        let t = self.bin(BinaryOp::Div, yk, xv)?;
                        self.bin(BinaryOp::Mul, gu, t)?
                    }
                };
                self.acc(x, gx)
            }
            Op::Var {
                dims,
                correction,
                keepdim,
            } => {
                let x = ops[0];
                let xs = self.fty(x).shape.clone();
                let cnt: usize = dims.iter().map(|&d| xs[d]).product();
                let xv = self.fv(x)?;
                let m = self.add(
                    Op::Reduce {
                        op: ReduceOp::Mean,
                        dims: dims.clone(),
                        keepdim: true,
                    },
                    &[xv],
                )?;
                let c = self.bin(BinaryOp::Sub, xv, m)?;
                let gu = self.unreduce(g, &xs, dims, *keepdim)?;
                let t = self.bin(BinaryOp::Mul, gu, c)?;
                let gx = self.mul_scalar(t, 2.0 / (cnt as f64 - correction).max(0.0))?;
                self.acc(x, gx)
            }
            Op::Softmax { dim } => {
                // y (g - sum(g y))
                let yv = self.fv(y)?;
                let gy = self.bin(BinaryOp::Mul, g, yv)?;
                let s = self.sum(gy, vec![*dim], true)?;
                let t = self.bin(BinaryOp::Sub, g, s)?;
                let gx = self.bin(BinaryOp::Mul, yv, t)?;
                self.acc(ops[0], gx)
            }
            Op::LogSoftmax { dim } => {
                // g - exp(y) sum(g)
                let yv = self.fv(y)?;
                let p = self.un(UnaryOp::Exp, yv)?;
                let s = self.sum(g, vec![*dim], true)?;
                let t = self.bin(BinaryOp::Mul, p, s)?;
                let gx = self.bin(BinaryOp::Sub, g, t)?;
                self.acc(ops[0], gx)
            }
            Op::MatMul => self.vjp_matmul(ops[0], ops[1], g),
            Op::Addmm => {
                let (bias, m1, m2) = (ops[0], ops[1], ops[2]);
                if self.needs(bias) {
                    let s = self.fty(bias).shape.clone();
                    let gb = self.sum_to(g, &s)?;
                    self.acc(bias, gb)?;
                }
                if self.needs(m1) {
                    let w = self.fv(m2)?;
                    let wt = self.mt(w)?;
                    let gm = self.add(Op::MatMul, &[g, wt])?;
                    self.acc(m1, gm)?;
                }
                if self.needs(m2) {
                    let a = self.fv(m1)?;
                    let at = self.mt(a)?;
                    let gm = self.add(Op::MatMul, &[at, g])?;
                    self.acc(m2, gm)?;
                }
                Ok(())
            }
            Op::Conv2d {
                stride,
                padding,
                dilation,
                groups,
            } => {
                let (x, w) = (ops[0], ops[1]);
                if self.needs(x) {
                    let xs = self.fty(x).shape.clone();
                    let wv = self.fv(w)?;
                    let gx = self.add(
                        Op::Conv2dBackwardInput {
                            stride: *stride,
                            padding: *padding,
                            dilation: *dilation,
                            groups: *groups,
                            input_size: [xs[2], xs[3]],
                        },
                        &[g, wv],
                    )?;
                    self.acc(x, gx)?;
                }
                if self.needs(w) {
                    let ws = self.fty(w).shape.clone();
                    let xv = self.fv(x)?;
                    let gw = self.add(
                        Op::Conv2dBackwardWeight {
                            stride: *stride,
                            padding: *padding,
                            dilation: *dilation,
                            groups: *groups,
                            kernel: [ws[2], ws[3]],
                        },
                        &[g, xv],
                    )?;
                    self.acc(w, gw)?;
                }
                if ops.len() == 3 && self.needs(ops[2]) {
                    let gb = self.sum(g, vec![0, 2, 3], false)?;
                    self.acc(ops[2], gb)?;
                }
                Ok(())
            }
            Op::MaxPool2dWithIndices { .. } => {
                let xs = self.fty(ops[0]).shape.clone();
                let r = xs.len();
                let idx = self.fv(Value::new(n, 1))?;
                let gx = self.add(
                    Op::MaxPool2dBackward {
                        input_size: [xs[r - 2], xs[r - 1]],
                    },
                    &[g, idx],
                )?;
                self.acc(ops[0], gx)
            }
            Op::AvgPool2d {
                kernel,
                stride,
                padding,
                ceil_mode,
                count_include_pad,
                divisor_override,
            } => {
                let xs = self.fty(ops[0]).shape.clone();
                let r = xs.len();
                let gx = self.add(
                    Op::AvgPool2dBackward {
                        kernel: *kernel,
                        stride: *stride,
                        padding: *padding,
                        ceil_mode: *ceil_mode,
                        count_include_pad: *count_include_pad,
                        divisor_override: *divisor_override,
                        input_size: [xs[r - 2], xs[r - 1]],
                    },
                    &[g],
                )?;
                self.acc(ops[0], gx)
            }
            Op::BatchNorm {
                training,
                eps,
                has_weight,
                has_bias,
                has_running_stats,
                ..
            } => {
                let xv = self.fv(ops[0])?;
                let mut operands = vec![g, xv];
                if *has_weight {
                    operands.push(self.fv(ops[1])?);
                }
                if !*training {
                    let k = 1 + *has_weight as usize + *has_bias as usize;
                    if !*has_running_stats {
                        return Err(bad("eval batch_norm without running stats"));
                    }
                    operands.push(self.fv(ops[k])?);
                    operands.push(self.fv(ops[k + 1])?);
                }
                let scope = self.scope.clone();
                let outs = self.b.add_node(
                    Op::BatchNormBackward {
                        training: *training,
                        eps: *eps,
                        has_weight: *has_weight,
                    },
                    &operands,
                    &scope,
                )?;
                self.acc(ops[0], outs[0])?;
                if *has_weight {
                    self.acc(ops[1], outs[1])?;
                }
                if *has_bias {
                    self.acc(ops[1 + *has_weight as usize], outs[2])?;
                }
                Ok(())
            }
            Op::LayerNorm {
                normalized_shape,
                eps,
                has_weight,
                has_bias,
            } => {
                let xv = self.fv(ops[0])?;
                let mut operands = vec![g, xv];
                if *has_weight {
                    operands.push(self.fv(ops[1])?);
                }
                let scope = self.scope.clone();
                let outs = self.b.add_node(
                    Op::LayerNormBackward {
                        normalized_shape: normalized_shape.clone(),
                        eps: *eps,
                        has_weight: *has_weight,
                    },
                    &operands,
                    &scope,
                )?;
                self.acc(ops[0], outs[0])?;
                if *has_weight {
                    self.acc(ops[1], outs[1])?;
                }
                if *has_bias {
                    self.acc(ops[1 + *has_weight as usize], outs[2])?;
                }
                Ok(())
            }
            Op::Reshape { .. } | Op::Contiguous => {
                let s = self.fty(ops[0]).shape.clone();
                let gx = self.reshape(g, &s)?;
                self.acc(ops[0], gx)
            }
            Op::Permute { dims } => {
                let mut inv = vec![0; dims.len()];
                for (i, &d) in dims.iter().enumerate() {
                    inv[d] = i;
                }
                let gx = self.permute(g, inv)?;
                self.acc(ops[0], gx)
            }
            Op::Expand { .. } => {
                let s = self.fty(ops[0]).shape.clone();
                let gx = self.sum_to(g, &s)?;
                self.acc(ops[0], gx)
            }
            Op::Slice {
                dim,
                start,
                end,
                step,
            } => {
                let s = self.fty(ops[0]).shape.clone();
                let gx = self.add(
                    Op::SliceBackward {
                        input_shape: s,
                        dim: *dim,
                        start: *start,
                        end: *end,
                        step: *step,
                    },
                    &[g],
                )?;
                self.acc(ops[0], gx)
            }
            Op::Select { dim, index } => {
                let s = self.fty(ops[0]).shape.clone();
                let mut keep = s.clone();
                keep[*dim] = 1;
                let gk = self.reshape(g, &keep)?;
                let gx = self.add(
                    Op::SliceBackward {
                        input_shape: s,
                        dim: *dim,
                        start: *index,
                        end: index + 1,
                        step: 1,
                    },
                    &[gk],
                )?;
                self.acc(ops[0], gx)
            }
            Op::IndexSelect { dim } => {
                let s = self.fty(ops[0]).shape.clone();
                if s.is_empty() {
                    return self.acc(ops[0], g);
                }
                let idx = self.fv(ops[1])?;
                let gx = self.add(
                    Op::IndexSelectBackward {
                        dim: *dim,
                        size: s[*dim],
                    },
                    &[g, idx],
                )?;
                self.acc(ops[0], gx)
            }
            Op::Cat { dim } => {
                let mut off = 0;
                for &v in &ops {
                    let size = self.fty(v).shape[*dim];
                    if self.needs(v) {
                        let gi = self.add(
                            Op::Slice {
                                dim: *dim,
                                start: off,
                                end: off + size,
                                step: 1,
                            },
                            &[g],
                        )?;
                        self.acc(v, gi)?;
                    }
                    off += size;
                }
                Ok(())
            }
            Op::Stack { dim } => {
                for (i, &v) in ops.iter().enumerate() {
                    if self.needs(v) {
                        let gi = self.add(
                            Op::Select {
                                dim: *dim,
                                index: i,
                            },
                            &[g],
                        )?;
                        self.acc(v, gi)?;
                    }
                }
                Ok(())
            }
            Op::ArgMax { .. } | Op::ArgMin { .. } | Op::DropoutMask { .. } => Ok(()),
            op => Err(err(
                op,
                &self.f.operand_types(n),
                "no derivative rule for this op in compiled training yet",
            )),
        }
    }

    fn vjp_matmul(&mut self, a: Value, b: Value, g: Value) -> Result<()> {
        let (sa, sb) = (self.fty(a).shape.clone(), self.fty(b).shape.clone());
        let av = self.fv(a)?;
        let bv = self.fv(b)?;
        // Promote 1-D operands to matrices, as torch.matmul does.
        let a2s = if sa.len() == 1 {
            vec![1, sa[0]]
        } else {
            sa.clone()
        };
        let b2s = if sb.len() == 1 {
            vec![sb[0], 1]
        } else {
            sb.clone()
        };
        let a2 = self.reshape(av, &a2s)?;
        let b2 = self.reshape(bv, &b2s)?;
        let batch = crate::broadcast_shapes(&a2s[..a2s.len() - 2], &b2s[..b2s.len() - 2])
            .map_err(|e| bad(e.to_string()))?;
        let (m, k, n) = (a2s[a2s.len() - 2], a2s[a2s.len() - 1], b2s[b2s.len() - 1]);
        let mut g2s = batch.clone();
        g2s.extend([m, n]);
        let g2 = self.reshape(g, &g2s)?;
        if b2s.len() == 2 && a2s.len() > 2 {
            // x[..., k] @ w[k, n]: fold the batch into rows.
            let rows: usize = batch.iter().product::<usize>() * m;
            if self.needs(a) {
                let bt = self.mt(b2)?;
                let ga = self.add(Op::MatMul, &[g2, bt])?;
                let ga = self.reshape(ga, &sa)?;
                self.acc(a, ga)?;
            }
            if self.needs(b) {
                let af = self.reshape(a2, &[rows, k])?;
                let gf = self.reshape(g2, &[rows, n])?;
                let aft = self.mt(af)?;
                let gb = self.add(Op::MatMul, &[aft, gf])?;
                let gb = self.reshape(gb, &sb)?;
                self.acc(b, gb)?;
            }
            return Ok(());
        }
        if self.needs(a) {
            let bt = self.mt(b2)?;
            let ga = self.add(Op::MatMul, &[g2, bt])?;
            let ga = self.sum_to(ga, &a2s)?;
            let ga = self.reshape(ga, &sa)?;
            self.acc(a, ga)?;
        }
        if self.needs(b) {
            let at = self.mt(a2)?;
            let gb = self.add(Op::MatMul, &[at, g2])?;
            let gb = self.sum_to(gb, &b2s)?;
            let gb = self.reshape(gb, &sb)?;
            self.acc(b, gb)?;
        }
        Ok(())
    }
}

/// Type inference of the backward ops (called by `op::infer`).
/// The conv2d of `x` and `w` with these (stride, padding, dilation,
/// groups) must produce `g`'s type: a conv backward op's grad_out.
fn check_conv_grad_out(
    op: &Op,
    ops: &[TensorType],
    (stride, padding, dilation, groups): ([usize; 2], [usize; 2], [usize; 2], usize),
    x: &TensorType,
    w: &TensorType,
    g: &TensorType,
) -> Result<()> {
    let conv = Op::Conv2d {
        stride,
        padding,
        dilation,
        groups,
    };
    let fwd = infer(&conv, &[x.clone(), w.clone()])?;
    if fwd[0] != *g {
        return Err(err(op, ops, format!("grad_out must be {}", fwd[0])));
    }
    Ok(())
}

pub(crate) fn infer_backward_op(op: &Op, ops: &[TensorType]) -> Result<Vec<TensorType>> {
    let same = |a: &TensorType, b: &TensorType, what: &str| -> Result<()> {
        if a.dtype != b.dtype {
            return Err(err(op, ops, format!("{what}: dtypes differ")));
        }
        Ok(())
    };
    match op {
        Op::Conv2dBackwardInput {
            stride,
            padding,
            dilation,
            groups,
            input_size,
        } => {
            let (g, w) = (&ops[0], &ops[1]);
            if g.rank() != 4 || w.rank() != 4 {
                return Err(err(op, ops, "expected 4-D grad_out and weight"));
            }
            same(g, w, "grad_out and weight")?;
            let x = TensorType {
                shape: vec![
                    g.shape[0],
                    w.shape[1] * groups,
                    input_size[0],
                    input_size[1],
                ],
                dtype: g.dtype,
            };
            check_conv_grad_out(op, ops, (*stride, *padding, *dilation, *groups), &x, w, g)?;
            Ok(vec![x])
        }
        Op::Conv2dBackwardWeight {
            stride,
            padding,
            dilation,
            groups,
            kernel,
        } => {
            let (g, x) = (&ops[0], &ops[1]);
            if g.rank() != 4 || x.rank() != 4 || *groups == 0 {
                return Err(err(op, ops, "expected 4-D grad_out and input"));
            }
            same(g, x, "grad_out and input")?;
            let w = TensorType {
                shape: vec![g.shape[1], x.shape[1] / groups, kernel[0], kernel[1]],
                dtype: g.dtype,
            };
            check_conv_grad_out(op, ops, (*stride, *padding, *dilation, *groups), x, &w, g)?;
            Ok(vec![w])
        }
        Op::MaxPool2dWithIndices {
            kernel,
            stride,
            padding,
            dilation,
            ceil_mode,
        } => {
            let v = infer_pool(op, ops, *kernel, *stride, *padding, *dilation, *ceil_mode)?;
            let idx = v[0].with_dtype(DType::I64);
            Ok(vec![v[0].clone(), idx])
        }
        Op::MaxPool2dBackward { input_size } => {
            let (g, idx) = (&ops[0], &ops[1]);
            if idx.dtype != DType::I64 || idx.shape != g.shape || (g.rank() != 3 && g.rank() != 4) {
                return Err(err(
                    op,
                    ops,
                    "expected grad_out and i64 indices of one 3-D or 4-D shape",
                ));
            }
            require_float(op, ops, g, "grad_out")?;
            let r = g.rank();
            let mut xs = g.shape.clone();
            xs[r - 2] = input_size[0];
            xs[r - 1] = input_size[1];
            Ok(vec![g.with_shape(xs)])
        }
        Op::AvgPool2dBackward {
            kernel,
            stride,
            padding,
            ceil_mode,
            input_size,
            ..
        } => {
            let g = &ops[0];
            if g.rank() != 3 && g.rank() != 4 {
                return Err(err(op, ops, "expected a 3-D or 4-D grad_out"));
            }
            let r = g.rank();
            let mut xs = g.shape.clone();
            xs[r - 2] = input_size[0];
            xs[r - 1] = input_size[1];
            let x = g.with_shape(xs);
            let fwd = infer_pool(
                op,
                std::slice::from_ref(&x),
                *kernel,
                *stride,
                *padding,
                [1, 1],
                *ceil_mode,
            )?;
            if fwd[0] != *g {
                return Err(err(op, ops, format!("grad_out must be {}", fwd[0])));
            }
            Ok(vec![x])
        }
        Op::BatchNormBackward { .. } => {
            let (g, x) = (&ops[0], &ops[1]);
            if g != x || x.rank() < 2 {
                return Err(err(
                    op,
                    ops,
                    "grad_out and input must have one type, rank >= 2",
                ));
            }
            require_float(op, ops, x, "input")?;
            let c = x.shape[1];
            for (i, t) in ops.iter().enumerate().skip(2) {
                if t.shape != [c] {
                    return Err(err(op, ops, format!("operand {i} must have shape [{c}]")));
                }
            }
            let ct = x.with_shape(vec![c]);
            Ok(vec![x.clone(), ct.clone(), ct])
        }
        Op::LayerNormBackward {
            normalized_shape, ..
        } => {
            let (g, x) = (&ops[0], &ops[1]);
            let k = normalized_shape.len();
            if g != x || k == 0 || x.rank() < k || x.shape[x.rank() - k..] != normalized_shape[..] {
                return Err(err(
                    op,
                    ops,
                    format!("grad_out and input must have one type ending in {normalized_shape:?}"),
                ));
            }
            require_float(op, ops, x, "input")?;
            if ops.len() == 3 && ops[2].shape != *normalized_shape {
                return Err(err(op, ops, "weight must have normalized_shape"));
            }
            let nt = x.with_shape(normalized_shape.clone());
            Ok(vec![x.clone(), nt.clone(), nt])
        }
        Op::DropoutMask { p } => {
            if !(0.0..=1.0).contains(p) {
                return Err(err(
                    op,
                    ops,
                    format!("dropout probability {p} outside [0, 1]"),
                ));
            }
            require_float(op, ops, &ops[0], "input")?;
            Ok(vec![ops[0].clone()])
        }
        Op::SliceBackward {
            input_shape,
            dim,
            start,
            end,
            step,
        } => {
            let x = ops[0].with_shape(input_shape.clone());
            let fwd = infer(
                &Op::Slice {
                    dim: *dim,
                    start: *start,
                    end: *end,
                    step: *step,
                },
                std::slice::from_ref(&x),
            )?;
            if fwd[0] != ops[0] {
                return Err(err(op, ops, format!("operand must be {}", fwd[0])));
            }
            Ok(vec![x])
        }
        Op::IndexSelectBackward { dim, size } => {
            let (g, idx) = (&ops[0], &ops[1]);
            if idx.dtype != DType::I64 || idx.rank() > 1 || *dim >= g.rank() {
                return Err(err(op, ops, "expected a 1-D int64 index and dim < rank"));
            }
            if g.shape[*dim] != idx.numel() {
                return Err(err(op, ops, "grad_out and index sizes differ along dim"));
            }
            let mut s = g.shape.clone();
            s[*dim] = *size;
            Ok(vec![g.with_shape(s)])
        }
        _ => Err(err(op, ops, "not a backward op")),
    }
}
