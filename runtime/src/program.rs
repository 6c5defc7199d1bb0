//! The compiled CPU program of one variant: the fusion plan lowered to a
//! flat list of steps over one f32 arena.
//!
//! Every f32 value has a home: a leaf (user input, parameter, buffer or
//! constant, read in place) or a range of the arena, described as a strided
//! view (`Loc`), so reshape/permute/expand/slice/select cost nothing.
//! Steps are JIT-compiled pointwise kernels (kiln-cranelift), matmul/addmm
//! on the gemm kernels (strided operands read in place), conv2d, pooling,
//! softmax and layer_norm on kiln-cpu's kernels, gathers that materialize a
//! view where a kernel needs contiguous data, and, for what has no native
//! lowering, the reference interpreter's `exec_node` on tensors: an
//! explicit fallback listed by `Program::fallbacks` with the op's name.
//!
//! Memory is planned at compile time: arena buffers are assigned offsets by
//! liveness (a buffer is reused once its last reader has run), and a
//! pointwise kernel writes in place over an input that dies with it. The
//! arena lives in the variant and is reused by every call, so a steady-state
//! call allocates only its outputs (plus what fallback nodes allocate).

use crate::interpreter::{check_types, describe_node, exec_node};
use crate::{Error, Result};
use kiln_cpu::conv::Conv2dParams;
use kiln_cpu::matmul::MatLayout;
use kiln_cpu::pool::{AvgPool2dParams, MaxPool2dParams};
use kiln_cranelift::PointwiseKernel;
use kiln_frontend::Tensor;
use kiln_ir::{
    DType, FusionPlan, Graph, InputKind, Kernel, KernelKind, NodeId, Op, OpClass, Value,
};
use std::collections::{HashMap, HashSet};

/// Where a value's elements live: a leaf tensor or an arena buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    Leaf(usize),
    Buf(usize),
    /// Graph output buffer `k`: allocated per call and returned as the
    /// output tensor (no copy out of the arena).
    Out(usize),
    /// The (contiguous f32) tensor a fallback node produced for dynamic
    /// value `k`, read in place until its last reader ran.
    Dyn(usize),
}

/// A strided view of a base (offsets and strides in elements).
#[derive(Clone, Debug)]
struct Loc {
    base: Base,
    off: usize,
    shape: Vec<usize>,
    strides: Vec<usize>,
}

impl Loc {
    fn contiguous(base: Base, off: usize, shape: &[usize]) -> Loc {
        Loc {
            base,
            off,
            shape: shape.to_vec(),
            strides: kiln_ir::contiguous_strides(shape),
        }
    }

    fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// PyTorch's `is_contiguous` (strides of size-1 dims ignored).
    fn is_contiguous(&self) -> bool {
        let mut expected = 1usize;
        for i in (0..self.shape.len()).rev() {
            if self.shape[i] != 1 {
                if self.strides[i] != expected {
                    return false;
                }
                expected *= self.shape[i];
            }
        }
        true
    }

    /// Elements from `off` to the last one touched, plus one.
    fn extent(&self) -> usize {
        if self.shape.contains(&0) {
            return 0;
        }
        1 + self
            .shape
            .iter()
            .zip(&self.strides)
            .map(|(&n, &s)| (n - 1) * s)
            .sum::<usize>()
    }

    fn span(&self) -> Span {
        debug_assert!(self.is_contiguous());
        Span {
            base: self.base,
            off: self.off,
            len: self.numel(),
        }
    }

    /// Dims `a..b` merged into one (size, stride) if they are laid out as
    /// one run (`stride[i] == stride[i+1] * shape[i+1]`).
    fn merged(&self, a: usize, b: usize) -> Option<(usize, usize)> {
        if a == b {
            return Some((1, 0));
        }
        for i in a..b - 1 {
            if self.shape[i] != 1 && self.strides[i] != self.strides[i + 1] * self.shape[i + 1] {
                return None;
            }
        }
        Some((self.shape[a..b].iter().product(), self.strides[b - 1]))
    }
}

/// A contiguous range of a base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Span {
    base: Base,
    off: usize,
    len: usize,
}

/// Where a fallback node's operand comes from.
#[derive(Clone, Debug)]
enum Arg {
    /// Computed by an earlier fallback node.
    Tensor(Value),
    Leaf(usize),
    /// An f32 view, copied into a new tensor.
    View(Loc),
}

#[derive(Clone, Debug)]
enum Bias {
    /// `[n]`, added to every row.
    Row(Span),
    /// `[m, n]`.
    Full(Span),
}

/// A pointwise kernel and its operands.
struct Jit {
    kernel: Box<PointwiseKernel>,
    ins: Vec<Span>,
    outs: Vec<Span>,
}

enum Step {
    Jit(Jit),
    Gemm {
        a: Span,
        la: MatLayout,
        b: Span,
        lb: MatLayout,
        bias: Option<Bias>,
        batch: usize,
        m: usize,
        k: usize,
        n: usize,
        out: Span,
        /// Pointwise epilogue applied to each block of rows as it is done.
        epi: Option<Jit>,
    },
    Conv {
        x: Span,
        xs: [usize; 4],
        w: Span,
        ws: [usize; 4],
        bias: Option<Span>,
        p: Conv2dParams,
        out: Span,
        /// Pointwise epilogue applied to each image as it is done.
        epi: Option<Jit>,
        /// A max_pool2d of the (epilogue's) output fused in: each image
        /// is pooled while it is still in cache (`out` is still written).
        pool: Option<FusedPool>,
    },
    /// Gradient of conv2d w.r.t. its input (compiled training).
    ConvBwdInput {
        g: Span,
        w: Span,
        ws: [usize; 4],
        xs: [usize; 4],
        p: Conv2dParams,
        out: Span,
    },
    /// Gradient of conv2d w.r.t. its weight (compiled training).
    ConvBwdWeight {
        x: Span,
        xs: [usize; 4],
        g: Span,
        ws: [usize; 4],
        p: Conv2dParams,
        out: Span,
    },
    MaxPool {
        x: Span,
        xs: [usize; 4],
        p: MaxPool2dParams,
        out: Span,
    },
    AvgPool {
        x: Span,
        xs: [usize; 4],
        p: AvgPool2dParams,
        out: Span,
    },
    Softmax {
        x: Span,
        k: usize,
        log: bool,
        out: Span,
    },
    LayerNorm {
        x: Span,
        k: usize,
        w: Option<Span>,
        b: Option<Span>,
        eps: f64,
        out: Span,
    },
    /// Materializes a strided view.
    Gather {
        src: Loc,
        out: Span,
    },
    /// Sum (times `scale`: a mean) of a contiguous `[r1, k, r2]` over r1
    /// and r2, or with `var` = Some(correction) and r1 = 1 the variance
    /// of each of the k rows (as eager's `var`).
    SumOuterInner {
        x: Span,
        dims: [usize; 3],
        scale: Option<f64>,
        var: Option<usize>,
        out: Span,
    },
    /// max_pool2d with indices (compiled training): x read in place, the
    /// values and i64 indices held as the node's tensors (as a fallback's).
    MaxPoolIdx {
        node: NodeId,
        x: Span,
        xs: [usize; 4],
        p: MaxPool2dParams,
    },
    /// Training-mode batch norm of x `[N, C, S]` (batch statistics); with
    /// running stats `(mean, var, new mean, new var)` their update.
    BatchNormTrain {
        x: Span,
        shape: [usize; 3],
        w: Option<Span>,
        b: Option<Span>,
        run: Option<[Span; 4]>,
        momentum: f64,
        eps: f64,
        out: Span,
    },
    /// Gradient of layer norm over rows of `k` (row statistics recomputed
    /// from x, as eager's).
    LayerNormBwd {
        g: Span,
        x: Span,
        k: usize,
        w: Option<Span>,
        eps: f64,
        gi: Span,
        gw: Span,
        gb: Span,
    },
    /// Gradient of training-mode batch norm (statistics recomputed from x).
    BatchNormBwd {
        g: Span,
        x: Span,
        shape: [usize; 3],
        w: Option<Span>,
        eps: f64,
        gi: Span,
        gw: Span,
        gb: Span,
    },
    /// Gradient of max_pool2d (compiled training): `out` (`planes` planes
    /// of `hw` elements) zeroed, `g` added at the i64 plane offsets `idx`.
    MaxPoolBwd {
        g: Span,
        idx: Arg,
        planes: usize,
        hw: usize,
        out: Span,
    },
    /// Training dropout's scaled keep-mask drawn from the global generator
    /// (the draws eager's `dropout_mask` makes, in the same order).
    DropoutMask {
        p: f64,
        out: Span,
    },
    /// Gradient of a slice (compiled training): `out` zeroed, `src`
    /// copied into its view `dst`.
    SliceBwd {
        src: Loc,
        out: Span,
        dst: Loc,
    },
    /// Runs one node on tensors with the interpreter's kernels.
    Fallback {
        node: NodeId,
        args: Vec<Arg>,
    },
    /// A hooked submodule's call (`module_call` node), run by the runtime.
    Call {
        node: NodeId,
        path: String,
        arg: Arg,
    },
}

// Test-only fault injection: after the step with this 1-based index, the
// first element it wrote is perturbed (to test per-node localization).
#[cfg(test)]
thread_local! {
    pub(crate) static FAULT_AFTER_STEP: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// A max_pool2d run on each image of a conv step's output.
#[derive(Clone, Debug)]
pub(crate) struct FusedPool {
    p: MaxPool2dParams,
    /// The conv's output shape.
    ys: [usize; 4],
    out: Span,
}

impl Step {
    /// The first span the step writes, if it writes the arena.
    #[cfg(test)]
    fn out_span(&self) -> Option<Span> {
        match self {
            Step::Jit(j) => j.outs.first().copied(),
            Step::Gemm { out, .. }
            | Step::Conv { out, .. }
            | Step::ConvBwdInput { out, .. }
            | Step::ConvBwdWeight { out, .. }
            | Step::MaxPool { out, .. }
            | Step::AvgPool { out, .. }
            | Step::Softmax { out, .. }
            | Step::LayerNorm { out, .. }
            | Step::SliceBwd { out, .. }
            | Step::MaxPoolBwd { out, .. }
            | Step::BatchNormTrain { out, .. }
            | Step::SumOuterInner { out, .. }
            | Step::BatchNormBwd { gi: out, .. }
            | Step::LayerNormBwd { gi: out, .. }
            | Step::DropoutMask { out, .. }
            | Step::Gather { out, .. } => Some(*out),
            Step::Fallback { .. } | Step::Call { .. } | Step::MaxPoolIdx { .. } => None,
        }
    }

    /// The `Base::Dyn` slots the step reads.
    fn dyn_reads(&self) -> Vec<usize> {
        let mut bases: Vec<Base> = Vec::new();
        let jit = |j: &Jit, bases: &mut Vec<Base>| bases.extend(j.ins.iter().map(|s| s.base));
        match self {
            Step::Jit(j) => jit(j, &mut bases),
            Step::Gemm {
                a, b, bias, epi, ..
            } => {
                bases.extend([a.base, b.base]);
                if let Some(Bias::Row(s) | Bias::Full(s)) = bias {
                    bases.push(s.base);
                }
                if let Some(j) = epi {
                    jit(j, &mut bases);
                }
            }
            Step::Conv {
                x, w, bias, epi, ..
            } => {
                bases.extend([x.base, w.base]);
                bases.extend(bias.iter().map(|s| s.base));
                if let Some(j) = epi {
                    jit(j, &mut bases);
                }
            }
            Step::MaxPool { x, .. } | Step::AvgPool { x, .. } | Step::Softmax { x, .. } => {
                bases.push(x.base)
            }
            Step::ConvBwdInput { g, w, .. } => bases.extend([g.base, w.base]),
            Step::ConvBwdWeight { x, g, .. } => bases.extend([x.base, g.base]),
            Step::LayerNorm { x, w, b, .. } => {
                bases.push(x.base);
                bases.extend(w.iter().chain(b.iter()).map(|s| s.base));
            }
            Step::Gather { src, .. } | Step::SliceBwd { src, .. } => bases.push(src.base),
            Step::MaxPoolBwd { g, .. } => bases.push(g.base),
            Step::MaxPoolIdx { x, .. } | Step::SumOuterInner { x, .. } => bases.push(x.base),
            Step::BatchNormTrain { x, w, b, run, .. } => {
                bases.push(x.base);
                bases.extend(w.iter().chain(b.iter()).map(|s| s.base));
                if let Some([rm, rv, _, _]) = run {
                    bases.extend([rm.base, rv.base]);
                }
            }
            Step::BatchNormBwd { g, x, w, .. } | Step::LayerNormBwd { g, x, w, .. } => {
                bases.extend([g.base, x.base]);
                bases.extend(w.iter().map(|s| s.base));
            }
            Step::DropoutMask { .. } => {}
            Step::Fallback { args, .. } => bases.extend(args.iter().filter_map(|a| match a {
                Arg::View(l) => Some(l.base),
                _ => None,
            })),
            Step::Call { arg, .. } => {
                if let Arg::View(l) = arg {
                    bases.push(l.base);
                }
            }
        }
        bases
            .into_iter()
            .filter_map(|b| match b {
                Base::Dyn(k) => Some(k),
                _ => None,
            })
            .collect()
    }

    fn name(&self) -> &'static str {
        match self {
            Step::Jit(_) => "jit",
            Step::Gemm { .. } => "gemm",
            Step::Conv { .. } => "conv2d",
            Step::ConvBwdInput { .. } => "conv2d_backward_input",
            Step::ConvBwdWeight { .. } => "conv2d_backward_weight",
            Step::MaxPool { .. } => "max_pool2d",
            Step::AvgPool { .. } => "avg_pool2d",
            Step::Softmax { .. } => "softmax",
            Step::LayerNorm { .. } => "layer_norm",
            Step::Gather { .. } => "gather",
            Step::SliceBwd { .. } => "slice_backward",
            Step::MaxPoolBwd { .. } => "max_pool2d_backward",
            Step::BatchNormTrain { .. } => "batch_norm",
            Step::MaxPoolIdx { .. } => "max_pool2d_with_indices",
            Step::SumOuterInner { .. } => "sum",
            Step::BatchNormBwd { .. } => "batch_norm_backward",
            Step::LayerNormBwd { .. } => "layer_norm_backward",
            Step::DropoutMask { .. } => "dropout_mask",
            Step::Fallback { .. } => "fallback",
            Step::Call { .. } => "module_call",
        }
    }
}

/// What a leaf is bound to at each call.
#[derive(Clone, Debug)]
pub(crate) enum LeafSrc {
    User(usize),
    State(InputKind),
    Const(Tensor),
}

/// How a graph output is produced at the end of a call.
#[derive(Clone, Debug)]
enum OutSrc {
    Tensor(Value),
    Leaf(usize),
    View(Loc),
    /// Written in place by the steps into output buffer `k`.
    Out(usize),
    /// Left in the arena for a later program (`GraphExec::new_pair`); the
    /// call returns an empty placeholder tensor.
    Kept,
}

/// A lowered graph (see the module docs).
pub(crate) struct Program {
    /// The `Base::Dyn` slot of each fallback value read in place.
    dyn_of: HashMap<Value, usize>,
    /// Tensor-held values to drop after each step (their last reader).
    frees: Vec<Vec<Value>>,
    /// Shapes of the output buffers written in place (`Base::Out`).
    out_shapes: Vec<Vec<usize>>,
    /// When each value with a view is readable (for `collect` runs): after
    /// that many steps, at that view.
    avail: Vec<(usize, Value, Loc)>,
    leaves: Vec<LeafSrc>,
    leaf_nodes: Vec<NodeId>,
    steps: Vec<Step>,
    /// Arena offset of each buffer.
    buf_offsets: Vec<usize>,
    buf_lens: Vec<usize>,
    arena_len: usize,
    outputs: Vec<OutSrc>,
    /// `op: reason` for every node that runs on the fallback path.
    fallbacks: Vec<String>,
    pos: HashMap<NodeId, usize>,
    /// Inputs taken by value (input index, value), dropped after their
    /// last reader (`lower`'s `consumed`).
    consumed: Vec<(usize, Value)>,
}

// ------------------------------------------------------------------ building

struct Builder<'g> {
    g: &'g Graph,
    locs: HashMap<Value, Loc>,
    /// Values produced by fallback nodes (held as tensors at run time).
    tensors: HashSet<Value>,
    leaf_of: HashMap<Value, usize>,
    buf_lens: Vec<usize>,
    steps: Vec<Step>,
    /// Buffers each step reads and writes (for liveness).
    reads: Vec<Vec<usize>>,
    writes: Vec<Vec<usize>>,
    fallbacks: Vec<String>,
    /// (steps run, value): when each arena/leaf value becomes readable.
    avail: Vec<(usize, Value, Loc)>,
    /// Building an epilogue of the step already pushed.
    epilogue_mode: bool,
    /// Shapes of the `Base::Out` buffers.
    out_shapes: Vec<Vec<usize>>,
    /// The last step reading each tensor-held value (freed after it).
    tensor_last: HashMap<Value, usize>,
    /// The value of each `Base::Dyn` slot.
    dyn_values: Vec<Value>,
    /// Graph outputs that stay in the arena (`GraphExec::new_pair`): homed
    /// in arena buffers, not in returned output buffers.
    kept: HashSet<Value>,
    /// (input buffer, output buffer) of standalone pointwise kernels that
    /// may share memory if the input's last reader is that kernel
    /// (`plan_memory`).
    inplace: Vec<(usize, usize)>,
}

fn bufs_of(spans: &[Span]) -> Vec<usize> {
    spans
        .iter()
        .filter_map(|s| match s.base {
            Base::Buf(b) => Some(b),
            Base::Leaf(_) | Base::Out(_) | Base::Dyn(_) => None,
        })
        .collect()
}

fn pair(v: [usize; 2]) -> (usize, usize) {
    (v[0], v[1])
}

fn four(s: &[usize]) -> Option<[usize; 4]> {
    s.try_into().ok()
}

impl<'g> Builder<'g> {
    /// Records `v`'s home; it is readable once the steps so far (and the
    /// step about to be pushed, if `pending`) have run.
    fn set_loc(&mut self, v: Value, loc: Loc, pending: bool) {
        let after = self.steps.len() + (pending && !self.epilogue_mode) as usize;
        if !self.locs.contains_key(&v) {
            self.avail.push((after, v, loc.clone()));
        }
        self.locs.insert(v, loc);
    }

    fn new_buf(&mut self, len: usize) -> usize {
        self.buf_lens.push(len);
        self.buf_lens.len() - 1
    }

    fn push(&mut self, step: Step, reads: Vec<usize>, writes: Vec<usize>) {
        self.steps.push(step);
        self.reads.push(reads);
        self.writes.push(writes);
    }

    fn is_f32(&self, v: Value) -> bool {
        self.g.value_type(v).dtype == DType::F32
    }

    /// The value's view, importing a fallback result into the arena if
    /// needed. `None` for non-f32 values.
    fn loc(&mut self, v: Value) -> Option<Loc> {
        if let Some(l) = self.locs.get(&v) {
            return Some(l.clone());
        }
        if !self.is_f32(v) || !self.tensors.contains(&v) {
            return None;
        }
        // Read in place from the fallback's tensor (made contiguous when
        // it is produced); kept alive until its last reader.
        let shape = self.g.value_type(v).shape.clone();
        self.dyn_values.push(v);
        let loc = Loc::contiguous(Base::Dyn(self.dyn_values.len() - 1), 0, &shape);
        self.set_loc(v, loc.clone(), false);
        Some(loc)
    }

    /// The value as a contiguous span (gathering a strided view).
    fn contiguous(&mut self, v: Value) -> Option<Span> {
        let loc = self.loc(v)?;
        if loc.is_contiguous() {
            return Some(loc.span());
        }
        let b = self.new_buf(loc.numel());
        let out = Loc::contiguous(Base::Buf(b), 0, &loc.shape);
        let reads = bufs_of(&[Span {
            base: loc.base,
            off: 0,
            len: 0,
        }]);
        self.push(
            Step::Gather {
                src: loc,
                out: out.span(),
            },
            reads,
            vec![b],
        );
        self.set_loc(v, out.clone(), false);
        Some(out.span())
    }

    /// A fresh contiguous arena value for output `v`.
    fn output(&mut self, v: Value) -> Span {
        let shape = self.g.value_type(v).shape.clone();
        // A graph output is written straight into the tensor returned.
        let base = if self.g.is_graph_output(v) && self.is_f32(v) && !self.kept.contains(&v) {
            self.out_shapes.push(shape.clone());
            Base::Out(self.out_shapes.len() - 1)
        } else {
            Base::Buf(self.new_buf(kiln_ir::numel(&shape)))
        };
        let loc = Loc::contiguous(base, 0, &shape);
        let s = loc.span();
        self.set_loc(v, loc, true);
        s
    }

    fn fallback(&mut self, n: NodeId, why: String) {
        self.tensor_step(n);
        self.fallbacks
            .push(format!("{}: {why}", self.g.node(n).op.name()));
    }

    /// A node run on tensors: a fallback, or a hooked module's call.
    fn tensor_step(&mut self, n: NodeId) {
        let mut args = Vec::new();
        let mut reads = Vec::new();
        for v in self.g.operands(n) {
            let a = if self.tensors.contains(&v) {
                self.tensor_last.insert(v, self.steps.len());
                Arg::Tensor(v)
            } else if let Some(&i) = self.leaf_of.get(&v) {
                Arg::Leaf(i)
            } else {
                let loc = self.locs[&v].clone();
                if let Base::Buf(b) = loc.base {
                    reads.push(b);
                }
                Arg::View(loc)
            };
            args.push(a);
        }
        for k in 0..self.g.node(n).outputs.len() {
            self.tensors.insert(Value::new(n, k));
        }
        let step = match &self.g.node(n).op {
            Op::ModuleCall { path, .. } => Step::Call {
                node: n,
                path: path.clone(),
                arg: args.remove(0),
            },
            _ => Step::Fallback { node: n, args },
        };
        self.push(step, reads, vec![]);
    }

    /// Values of `nodes` used by a node outside `nodes` or returned.
    fn escaping(&self, nodes: &[NodeId]) -> Vec<Value> {
        let set: HashSet<NodeId> = nodes.iter().copied().collect();
        let mut out = Vec::new();
        for &n in nodes {
            for k in 0..self.g.node(n).outputs.len() {
                let v = Value::new(n, k);
                if self.g.is_graph_output(v)
                    || self.g.users(v).iter().any(|(u, _)| !set.contains(u))
                {
                    out.push(v);
                }
            }
        }
        out
    }

    /// A run of pointwise nodes as one JIT kernel; `internal` are values
    /// used only inside the fusion-plan kernel (safe to overwrite in place).
    fn jit_run(
        &mut self,
        nodes: &[NodeId],
        internal: &HashSet<Value>,
    ) -> std::result::Result<(), String> {
        let (jit, reads, writes) = self.jit_build(nodes, internal)?;
        // Whole-buffer inputs read element for element, each buffer
        // through one span only: an output may take one's memory.
        let whole = |s: &Span, lens: &[usize]| match s.base {
            Base::Buf(b) if s.off == 0 && lens[b] == s.len => Some(b),
            _ => None,
        };
        for o in &jit.outs {
            let Some(bo) = whole(o, &self.buf_lens) else {
                continue;
            };
            for i in &jit.ins {
                let Some(bi) = whole(i, &self.buf_lens) else {
                    continue;
                };
                let only = jit
                    .ins
                    .iter()
                    .all(|j| j.base != i.base || (j.off == 0 && j.len == i.len));
                let written = jit.outs.iter().any(|j| j.base == i.base);
                if only && !written && i.len == o.len {
                    self.inplace.push((bi, bo));
                }
            }
        }
        self.push(Step::Jit(jit), reads, writes);
        Ok(())
    }

    /// Compiles a run of pointwise nodes; gathers its inputs need are pushed
    /// as steps, the kernel itself is returned (with the buffers it reads
    /// and writes) for a caller to push or attach as an epilogue.
    fn jit_build(
        &mut self,
        nodes: &[NodeId],
        internal: &HashSet<Value>,
    ) -> std::result::Result<(Jit, Vec<usize>, Vec<usize>), String> {
        let set: HashSet<NodeId> = nodes.iter().copied().collect();
        let mut inputs: Vec<Value> = Vec::new();
        for &n in nodes {
            for v in self.g.operands(n) {
                if !set.contains(&v.node) && !inputs.contains(&v) {
                    inputs.push(v);
                }
            }
        }
        let outputs = self.escaping(nodes);
        if let Some(v) = inputs.iter().find(|v| !self.is_f32(**v)) {
            return Err(format!(
                "kernel input of type {} (the JIT reads f32)",
                self.g.value_type(*v)
            ));
        }
        let kernel = Kernel {
            kind: KernelKind::Pointwise,
            nodes: nodes.to_vec(),
            inputs: inputs.clone(),
            outputs: outputs.clone(),
        };
        let pk = PointwiseKernel::compile(self.g, &kernel).map_err(|e| e.to_string())?;
        let mut ins = Vec::new();
        for d in pk.inputs() {
            let s = self
                .contiguous(d.value)
                .ok_or_else(|| format!("input {:?} has no f32 home", d.value))?;
            ins.push(s);
        }
        let out_numel: usize = pk.shape().iter().product();
        let mut outs = Vec::new();
        let mut taken: HashSet<usize> = HashSet::new();
        for &v in pk.outputs() {
            // In place over a same-sized contiguous input that dies here.
            let reuse = pk.inputs().iter().zip(&ins).find_map(|(d, s)| {
                let whole =
                    matches!(s.base, Base::Buf(b) if s.off == 0 && self.buf_lens[b] == s.len);
                let dies = internal.contains(&d.value)
                    && self.g.users(d.value).iter().all(|(u, _)| set.contains(u));
                match s.base {
                    Base::Buf(b) if whole && dies && s.len == out_numel && !taken.contains(&b) => {
                        Some(b)
                    }
                    _ => None,
                }
            });
            let reuse = reuse.filter(|_| !self.g.is_graph_output(v));
            let span = match reuse {
                Some(b) => {
                    taken.insert(b);
                    let shape = self.g.value_type(v).shape.clone();
                    let loc = Loc::contiguous(Base::Buf(b), 0, &shape);
                    let s = loc.span();
                    self.set_loc(v, loc, true);
                    s
                }
                None => self.output(v),
            };
            outs.push(span);
        }
        let reads = bufs_of(&ins);
        let writes = bufs_of(&outs);
        Ok((
            Jit {
                kernel: Box::new(pk),
                ins,
                outs,
            },
            reads,
            writes,
        ))
    }

    /// Fuses a max_pool2d of `x` into the conv step just pushed when `x`
    /// is exactly that step's output (no epilogue, or one written in
    /// place): the pool then runs per image right after the image's conv
    /// and epilogue, reading it from cache instead of from memory in a
    /// second pass (test_net at batch 256: the separate pool pass was a
    /// third of the forward). The conv output is still written, so other
    /// readers of it are unaffected.
    fn fuse_pool_into_conv(
        &mut self,
        x: Value,
        out_v: Value,
        xs: [usize; 4],
        p: MaxPool2dParams,
    ) -> bool {
        let Some(loc) = self.locs.get(&x).cloned() else {
            return false;
        };
        if !loc.is_contiguous() {
            return false;
        }
        let xspan = loc.span();
        let fusable = matches!(
            self.steps.last(),
            Some(Step::Conv { out, pool: None, epi, xs: cxs, .. })
                if *out == xspan
                    && cxs[0] == xs[0]
                    && epi.as_ref().is_none_or(|j| j.outs.iter().all(|o| *o == *out))
        );
        if !fusable {
            return false;
        }
        let out = self.output(out_v);
        let hi = self.steps.len() - 1;
        self.reads[hi].extend(bufs_of(&[xspan]));
        self.writes[hi].extend(bufs_of(&[out]));
        if let Step::Conv { pool, .. } = &mut self.steps[hi] {
            *pool = Some(FusedPool { p, ys: xs, out });
        }
        true
    }

    /// Fuses the pointwise run `run` into the head step just pushed (a
    /// single matmul/addmm or a conv2d producing `h`) as its per-tile
    /// epilogue. The run's other inputs were made contiguous before the
    /// head was pushed. False if it cannot (the caller then runs it as
    /// its own step).
    fn attach_epilogue(&mut self, run: &[NodeId], h: Value, internal: &HashSet<Value>) -> bool {
        let Some(last) = self.steps.last() else {
            return false;
        };
        let unit = match last {
            Step::Gemm {
                batch: 1,
                bias: None | Some(Bias::Row(_)),
                n,
                out,
                ..
            } if out.off == 0 => *n,
            Step::Conv { xs, out, .. } if out.off == 0 && xs[0] > 0 => out.len / xs[0],
            _ => return false,
        };
        // Tiles must start at multiples of 4 elements (the JIT's vector loop).
        let is_conv = matches!(last, Step::Conv { .. });
        if is_conv && !unit.is_multiple_of(4) {
            return false;
        }
        let before = self.steps.len();
        self.epilogue_mode = true;
        let built = self.jit_build(run, internal);
        self.epilogue_mode = false;
        let Ok((jit, reads, writes)) = built else {
            return false;
        };
        // jit_build must not have pushed steps (gathers) after the head.
        if self.steps.len() != before || !jit.kernel.inputs().iter().any(|d| d.value == h) {
            return false;
        }
        let hi = self.steps.len() - 1;
        // Overwritten in place within the step: `h` is never readable.
        if let Some(hb) = self.locs.get(&h).map(|l| l.base) {
            if jit.outs.iter().any(|o| o.base == hb) {
                self.avail.retain(|(_, v, _)| *v != h);
            }
        }
        self.reads[hi].extend(reads);
        self.writes[hi].extend(writes);
        match &mut self.steps[hi] {
            Step::Gemm { epi, .. } | Step::Conv { epi, .. } => *epi = Some(jit),
            _ => unreachable!("checked above"),
        }
        true
    }

    /// A norm backward's operands (grad_out, x, the optional weight, made
    /// contiguous) and its three outputs (grad input, weight, bias).
    #[allow(clippy::type_complexity)]
    fn norm_bwd_spans(
        &mut self,
        ops: &[Value],
        outs: &[Value],
        has_weight: bool,
    ) -> std::result::Result<(Span, Span, Option<Span>, [Span; 3]), String> {
        let g = self.contiguous(ops[0]).ok_or("no home")?;
        let x = self.contiguous(ops[1]).ok_or("no home")?;
        let w = match has_weight {
            true => Some(self.contiguous(ops[2]).ok_or("no home")?),
            false => None,
        };
        let o = [
            self.output(outs[0]),
            self.output(outs[1]),
            self.output(outs[2]),
        ];
        Ok((g, x, w, o))
    }

    /// A view op as a new `Loc` over the operand's base (no copy).
    fn view(&mut self, n: NodeId) -> std::result::Result<(), String> {
        let node = self.g.node(n);
        let x = self.g.operands(n)[0];
        let out_shape = node.outputs[0].shape.clone();
        let mut l = self.loc(x).ok_or_else(|| "non-f32 view".to_string())?;
        let nl = match &node.op {
            Op::Reshape { .. } | Op::Contiguous => {
                if !l.is_contiguous() {
                    let s = self.contiguous(x).ok_or("no home")?;
                    l = Loc::contiguous(s.base, s.off, &l.shape);
                }
                Loc::contiguous(l.base, l.off, &out_shape)
            }
            Op::Permute { dims } => Loc {
                base: l.base,
                off: l.off,
                shape: dims.iter().map(|&d| l.shape[d]).collect(),
                strides: dims.iter().map(|&d| l.strides[d]).collect(),
            },
            Op::Expand { shape } => {
                let lead = shape.len() - l.shape.len();
                let mut strides = vec![0usize; shape.len()];
                for i in 0..l.shape.len() {
                    strides[lead + i] = if l.shape[i] == shape[lead + i] {
                        l.strides[i]
                    } else {
                        0
                    };
                }
                Loc {
                    base: l.base,
                    off: l.off,
                    shape: shape.clone(),
                    strides,
                }
            }
            Op::Slice {
                dim,
                start,
                end,
                step,
            } => {
                let mut nl = l.clone();
                nl.off += start * l.strides[*dim];
                nl.shape[*dim] = (end.saturating_sub(*start)).div_ceil(*step);
                nl.strides[*dim] *= step;
                nl
            }
            Op::Select { dim, index } => {
                let mut nl = l.clone();
                nl.off += index * l.strides[*dim];
                nl.shape.remove(*dim);
                nl.strides.remove(*dim);
                nl
            }
            other => return Err(format!("{} is not a view", other.name())),
        };
        if nl.shape != out_shape {
            return Err(format!(
                "view shape {:?} disagrees with the graph's {:?}",
                nl.shape, out_shape
            ));
        }
        self.set_loc(Value::new(n, 0), nl, false);
        Ok(())
    }

    /// matmul / addmm on the gemm kernels.
    fn gemm(&mut self, n: NodeId) -> std::result::Result<(), String> {
        let node = self.g.node(n);
        let ops = self.g.operands(n);
        let (bias_v, av, bv) = match node.op {
            Op::Addmm => (Some(ops[0]), ops[1], ops[2]),
            _ => (None, ops[0], ops[1]),
        };
        let out_v = Value::new(n, 0);
        if ![av, bv, out_v].iter().all(|v| self.is_f32(*v))
            || bias_v.is_some_and(|v| !self.is_f32(v))
        {
            return Err("non-f32 operands".into());
        }
        let ta = self.g.value_type(av).shape.clone();
        let tb = self.g.value_type(bv).shape.clone();
        let (ra, rb) = (ta.len(), tb.len());
        if ra < 2 || rb < 2 {
            return Err("1-D operand".into());
        }
        let (m, k, n_) = (ta[ra - 2], ta[ra - 1], tb[rb - 1]);
        let mut la_loc = self.loc(av).ok_or("no home")?;
        let mut lb_loc = self.loc(bv).ok_or("no home")?;
        let ml = |l: &Loc, row: usize, col: usize, batch_stride: usize| MatLayout {
            offset: 0,
            row_stride: l.strides[row],
            col_stride: l.strides[col],
            batch_stride,
        };
        let (batch, m_eff, la, lb);
        if rb == 2 {
            // [.., m, k] @ [k, n]: batch dims of A fold into its rows.
            if la_loc.merged(0, ra - 1).is_none() {
                let s = self.contiguous(av).ok_or("no home")?;
                la_loc = Loc::contiguous(s.base, s.off, &ta);
            }
            let (rows, rs) = la_loc.merged(0, ra - 1).expect("contiguous merges");
            batch = 1;
            m_eff = rows;
            la = MatLayout {
                offset: 0,
                row_stride: if rows == 1 { k } else { rs },
                col_stride: la_loc.strides[ra - 1],
                batch_stride: 0,
            };
            lb = ml(&lb_loc, 0, 1, 0);
        } else if ra == 2 || ta[..ra - 2] == tb[..rb - 2] {
            let nb = rb - 2;
            if self.gemm_outer_split(n, &la_loc, &lb_loc, ra, rb, bias_v.is_some())? {
                return Ok(());
            }
            if lb_loc.merged(0, nb).is_none() {
                let s = self.contiguous(bv).ok_or("no home")?;
                lb_loc = Loc::contiguous(s.base, s.off, &tb);
            }
            let (bbatch, bbs) = lb_loc.merged(0, nb).expect("contiguous merges");
            let (abatch, abs) = if ra == 2 {
                (1, 0)
            } else {
                if la_loc.merged(0, ra - 2).is_none() {
                    let s = self.contiguous(av).ok_or("no home")?;
                    la_loc = Loc::contiguous(s.base, s.off, &ta);
                }
                la_loc.merged(0, ra - 2).expect("contiguous merges")
            };
            batch = bbatch;
            debug_assert!(abatch == 1 || abatch == bbatch);
            m_eff = m;
            la = ml(&la_loc, ra - 2, ra - 1, if abatch == 1 { 0 } else { abs });
            lb = ml(&lb_loc, rb - 2, rb - 1, if bbatch == 1 { 0 } else { bbs });
        } else {
            return Err("broadcast batch dims of both operands".into());
        }
        let bias = match bias_v {
            None => None,
            Some(v) => {
                let shape = self.g.value_type(v).shape.clone();
                let s = self.contiguous(v).ok_or("no home")?;
                let numel: usize = shape.iter().product();
                if numel == n_ && shape.last() == Some(&n_) && batch == 1 {
                    Some(Bias::Row(s))
                } else if shape == [m_eff, n_] && batch == 1 {
                    Some(Bias::Full(s))
                } else {
                    return Err(format!("bias of shape {shape:?}"));
                }
            }
        };
        let a = Span {
            base: la_loc.base,
            off: la_loc.off,
            len: la_loc.extent(),
        };
        let b = Span {
            base: lb_loc.base,
            off: lb_loc.off,
            len: lb_loc.extent(),
        };
        let out = self.output(out_v);
        let mut reads = bufs_of(&[a, b]);
        if let Some(Bias::Row(s) | Bias::Full(s)) = &bias {
            reads.extend(bufs_of(&[*s]));
        }
        let writes = bufs_of(&[out]);
        self.push(
            Step::Gemm {
                a,
                la,
                b,
                lb,
                bias,
                batch,
                m: m_eff,
                k,
                n: n_,
                out,
                epi: None,
            },
            reads,
            writes,
        );
        Ok(())
    }

    /// A batched matmul whose batch dims cannot be merged into one stride
    /// (attention's `[b, heads, ...]` views of a qkv projection) but whose
    /// inner batch dims can: one Gemm step per index of the first batch
    /// dim over views, instead of gathering the operands. Measured on
    /// transformer_block's compiled training step (2-core box): the
    /// gathers of q/k/v and their gradients cost 0.1-0.5 ms each. Returns
    /// false (nothing pushed) when it does not apply.
    fn gemm_outer_split(
        &mut self,
        n: NodeId,
        la_loc: &Loc,
        lb_loc: &Loc,
        ra: usize,
        rb: usize,
        has_bias: bool,
    ) -> std::result::Result<bool, String> {
        let nb = rb - 2;
        if has_bias || nb < 2 || (ra != 2 && ra != rb) {
            return Ok(false);
        }
        let outer = lb_loc.shape[0];
        let a_batched = ra == rb;
        let needs =
            lb_loc.merged(0, nb).is_none() || (a_batched && la_loc.merged(0, ra - 2).is_none());
        let inner_ok =
            lb_loc.merged(1, nb).is_some() && (!a_batched || la_loc.merged(1, ra - 2).is_some());
        if !needs || !inner_ok || !(2..=64).contains(&outer) {
            return Ok(false);
        }
        let sub = |l: &Loc, i: usize| Loc {
            base: l.base,
            off: l.off + i * l.strides[0],
            shape: l.shape[1..].to_vec(),
            strides: l.strides[1..].to_vec(),
        };
        let (m, k, nn) = (
            la_loc.shape[ra - 2],
            la_loc.shape[ra - 1],
            lb_loc.shape[rb - 1],
        );
        let out = self.output(Value::new(n, 0));
        let per_out = out.len / outer;
        for i in 0..outer {
            let bl = sub(lb_loc, i);
            let (bbatch, bbs) = bl.merged(0, nb - 1).expect("checked");
            let (al, abatch, abs) = if a_batched {
                let al = sub(la_loc, i);
                let (ab, s) = al.merged(0, ra - 3).expect("checked");
                (al, ab, s)
            } else {
                (la_loc.clone(), 1, 0)
            };
            let ar = al.shape.len();
            let br = bl.shape.len();
            let la = MatLayout {
                offset: 0,
                row_stride: al.strides[ar - 2],
                col_stride: al.strides[ar - 1],
                batch_stride: if abatch == 1 { 0 } else { abs },
            };
            let lb = MatLayout {
                offset: 0,
                row_stride: bl.strides[br - 2],
                col_stride: bl.strides[br - 1],
                batch_stride: if bbatch == 1 { 0 } else { bbs },
            };
            let a = Span {
                base: al.base,
                off: al.off,
                len: al.extent(),
            };
            let b = Span {
                base: bl.base,
                off: bl.off,
                len: bl.extent(),
            };
            let o = Span {
                base: out.base,
                off: out.off + i * per_out,
                len: per_out,
            };
            self.push(
                Step::Gemm {
                    a,
                    la,
                    b,
                    lb,
                    bias: None,
                    batch: bbatch,
                    m,
                    k,
                    n: nn,
                    out: o,
                    epi: None,
                },
                bufs_of(&[a, b]),
                bufs_of(&[o]),
            );
        }
        Ok(true)
    }

    /// A step reading `x` (contiguous) and writing a fresh `out_v`.
    fn map_step(
        &mut self,
        x: Value,
        out_v: Value,
        make: impl FnOnce(Span, Span) -> Step,
    ) -> std::result::Result<(), String> {
        let x = self.contiguous(x).ok_or("no home")?;
        let out = self.output(out_v);
        self.push(make(x, out), bufs_of(&[x]), bufs_of(&[out]));
        Ok(())
    }

    /// conv2d, pooling, softmax, layer_norm on kiln-cpu's kernels.
    /// `max_pool2d_backward` into a zeroed arena value (compiled
    /// training); the i64 indices are read in place from their tensor.
    fn max_pool_backward(&mut self, n: NodeId) -> std::result::Result<(), String> {
        let ops = self.g.operands(n);
        let out_v = Value::new(n, 0);
        let (gv, iv) = (ops[0], ops[1]);
        if !self.is_f32(out_v) || !self.is_f32(gv) || self.g.value_type(iv).dtype != DType::I64 {
            return Err("operand types".into());
        }
        let os = self.g.value_type(out_v).shape.clone();
        let gs = &self.g.value_type(gv).shape;
        if os.len() < 2 || gs.len() != os.len() || gs[..os.len() - 2] != os[..os.len() - 2] {
            return Err("shapes".into());
        }
        let hw = os[os.len() - 2] * os[os.len() - 1];
        let planes: usize = os[..os.len() - 2].iter().product();
        let idx = if self.tensors.contains(&iv) {
            self.tensor_last.insert(iv, self.steps.len());
            Arg::Tensor(iv)
        } else if let Some(&i) = self.leaf_of.get(&iv) {
            Arg::Leaf(i)
        } else {
            return Err("indices not held as a tensor".into());
        };
        let g = self.contiguous(gv).ok_or("no home")?;
        let out = self.output(out_v);
        self.push(
            Step::MaxPoolBwd {
                g,
                idx,
                planes,
                hw,
                out,
            },
            bufs_of(&[g]),
            bufs_of(&[out]),
        );
        Ok(())
    }

    /// `slice_backward` into a zeroed arena value (compiled training).
    fn slice_backward(&mut self, n: NodeId) -> std::result::Result<(), String> {
        let Op::SliceBackward {
            input_shape,
            dim,
            start,
            step,
            ..
        } = self.g.node(n).op.clone()
        else {
            return Err("not slice_backward".into());
        };
        let x = self.g.operands(n)[0];
        let out_v = Value::new(n, 0);
        if !self.is_f32(out_v) || !self.is_f32(x) {
            return Err("non-f32 operands".into());
        }
        let src = self.loc(x).ok_or("no home")?;
        let out = self.output(out_v);
        let mut strides = kiln_ir::contiguous_strides(&input_shape);
        let off = out.off + start * strides[dim];
        strides[dim] *= step;
        let dst = Loc {
            base: out.base,
            off,
            shape: src.shape.clone(),
            strides,
        };
        if dst.numel() > 0 && off + dst.extent() > out.off + out.len {
            return Err("slice outside its input".into());
        }
        let reads = bufs_of(&[Span {
            base: src.base,
            off: 0,
            len: 0,
        }]);
        self.push(Step::SliceBwd { src, out, dst }, reads, bufs_of(&[out]));
        Ok(())
    }

    /// A float sum over `dims` whose reduced and kept dims form at most
    /// the blocks `[reduced, kept, reduced]`.
    fn sum(
        &mut self,
        n: NodeId,
        dims: &[usize],
        mean: bool,
        var: Option<usize>,
    ) -> std::result::Result<(), String> {
        let x = self.g.operands(n)[0];
        let out_v = Value::new(n, 0);
        if !self.is_f32(x) || !self.is_f32(out_v) || (dims.is_empty() && var.is_some()) {
            return Err("non-f32 operand, or var over no dims".into());
        }
        let shape = self.g.value_type(x).shape.clone();
        // No dims (for sum/mean) or every dim: one row of every element.
        let all = dims.is_empty() || (0..shape.len()).all(|d| dims.contains(&d));
        // [r1, k, r2]: reduced dims before the first kept dim, the kept
        // dims (one run), the reduced dims after.
        let kept: Vec<usize> = (0..shape.len()).filter(|d| !dims.contains(d)).collect();
        let p = |r: std::ops::Range<usize>| shape[r].iter().product::<usize>();
        let b3 = match (kept.first(), kept.last()) {
            _ if all => [1, 1, p(0..shape.len())],
            (Some(&lo), Some(&b)) if b + 1 - lo == kept.len() => {
                [p(0..lo), p(lo..b + 1), p(b + 1..shape.len())]
            }
            _ => return Err("reduced dims between kept dims".into()),
        };
        if var.is_some() && (b3[0] != 1 || b3[2] == 0) {
            return Err("variance over leading dims".into());
        }
        let count = b3[0] * b3[2];
        if mean && count == 0 {
            return Err("mean of nothing".into());
        }
        let scale = mean.then(|| 1.0 / count as f64);
        let x = self.contiguous(x).ok_or("no home")?;
        let out = self.output(out_v);
        self.push(
            Step::SumOuterInner {
                x,
                dims: b3,
                scale,
                var,
                out,
            },
            bufs_of(&[x]),
            bufs_of(&[out]),
        );
        Ok(())
    }

    /// `layer_norm_backward` (compiled training).
    fn layer_norm_backward(&mut self, n: NodeId) -> std::result::Result<(), String> {
        let Op::LayerNormBackward {
            normalized_shape,
            eps,
            has_weight,
        } = self.g.node(n).op.clone()
        else {
            return Err("not layer_norm_backward".into());
        };
        let ops = self.g.operands(n);
        let outs: Vec<Value> = (0..3).map(|k| Value::new(n, k)).collect();
        if self.g.node(n).outputs.len() != 3
            || ops.len() != 2 + has_weight as usize
            || ops.iter().chain(&outs).any(|v| !self.is_f32(*v))
        {
            return Err("operands".into());
        }
        let k: usize = normalized_shape.iter().product();
        let numel = kiln_ir::numel(&self.g.value_type(ops[1]).shape);
        if k == 0
            || !numel.is_multiple_of(k)
            || self.g.value_type(ops[0]).shape != self.g.value_type(ops[1]).shape
        {
            return Err("shapes".into());
        }
        let (g, x, w, [gi, gw, gb]) = self.norm_bwd_spans(&ops, &outs, has_weight)?;
        let mut reads = vec![g, x];
        reads.extend(w.iter());
        self.push(
            Step::LayerNormBwd {
                g,
                x,
                k,
                w,
                eps,
                gi,
                gw,
                gb,
            },
            bufs_of(&reads),
            bufs_of(&[gi, gw, gb]),
        );
        Ok(())
    }

    /// Training-mode batch_norm and its backward (compiled training).
    fn batch_norm(&mut self, n: NodeId) -> std::result::Result<(), String> {
        let node = self.g.node(n).clone();
        let ops = self.g.operands(n);
        let outs: Vec<Value> = (0..node.outputs.len()).map(|k| Value::new(n, k)).collect();
        if ops.iter().chain(&outs).any(|v| !self.is_f32(*v)) {
            return Err("non-f32 operands".into());
        }
        let xs = &self.g.value_type(ops[0]).shape;
        if xs.len() < 2 {
            return Err("input of rank < 2".into());
        }
        let shape = [xs[0], xs[1], xs[2..].iter().product()];
        match node.op {
            Op::BatchNorm {
                training: true,
                momentum,
                eps,
                has_weight,
                has_bias,
                has_running_stats,
            } => {
                if shape[0] * shape[2] <= 1 {
                    return Err("one value per channel".into());
                }
                let x = self.contiguous(ops[0]).ok_or("no home")?;
                let mut k = 1;
                let mut next = |b: &mut Self, present: bool| -> Option<Option<Span>> {
                    if !present {
                        return Some(None);
                    }
                    k += 1;
                    b.contiguous(ops[k - 1]).map(Some)
                };
                let w = next(self, has_weight).ok_or("no home")?;
                let b = next(self, has_bias).ok_or("no home")?;
                let stats = if has_running_stats {
                    let rm = next(self, true).flatten().ok_or("no home")?;
                    let rv = next(self, true).flatten().ok_or("no home")?;
                    Some((rm, rv))
                } else {
                    None
                };
                if outs.len() != 1 + 2 * has_running_stats as usize {
                    return Err("outputs".into());
                }
                let out = self.output(outs[0]);
                let run =
                    stats.map(|(rm, rv)| [rm, rv, self.output(outs[1]), self.output(outs[2])]);
                let mut reads = vec![x];
                reads.extend(w.iter().chain(b.iter()));
                let mut writes = vec![out];
                if let Some([rm, rv, om, ov]) = run {
                    reads.extend([rm, rv]);
                    writes.extend([om, ov]);
                }
                self.push(
                    Step::BatchNormTrain {
                        x,
                        shape,
                        w,
                        b,
                        run,
                        momentum,
                        eps,
                        out,
                    },
                    bufs_of(&reads),
                    bufs_of(&writes),
                );
            }
            Op::BatchNormBackward {
                training: true,
                eps,
                has_weight,
            } => {
                if outs.len() != 3 || ops.len() != 2 + has_weight as usize {
                    return Err("operands".into());
                }
                let (g, x, w, [gi, gw, gb]) = self.norm_bwd_spans(&ops, &outs, has_weight)?;
                let mut reads = vec![g, x];
                reads.extend(w.iter());
                self.push(
                    Step::BatchNormBwd {
                        g,
                        x,
                        shape,
                        w,
                        eps,
                        gi,
                        gw,
                        gb,
                    },
                    bufs_of(&reads),
                    bufs_of(&[gi, gw, gb]),
                );
            }
            _ => return Err("eval-mode batch norm".into()),
        }
        Ok(())
    }

    fn native(&mut self, n: NodeId) -> std::result::Result<(), String> {
        match &self.g.node(n).op {
            Op::BatchNorm { .. } | Op::BatchNormBackward { .. } => return self.batch_norm(n),
            Op::LayerNormBackward { .. } => return self.layer_norm_backward(n),
            Op::MaxPool2dBackward { .. } => return self.max_pool_backward(n),
            Op::Reduce {
                op: op @ (kiln_ir::ReduceOp::Sum | kiln_ir::ReduceOp::Mean),
                dims,
                ..
            } => {
                let (dims, mean) = (dims.clone(), matches!(op, kiln_ir::ReduceOp::Mean));
                return self.sum(n, &dims, mean, None);
            }
            &Op::Var {
                ref dims,
                correction,
                ..
            } => {
                if correction.fract() != 0.0 || correction < 0.0 {
                    return Err("fractional correction".into());
                }
                let dims = dims.clone();
                return self.sum(n, &dims, false, Some(correction as usize));
            }
            &Op::MaxPool2dWithIndices {
                kernel,
                stride,
                padding,
                dilation,
                ceil_mode,
            } => {
                let x = self.g.operands(n)[0];
                if !self.is_f32(x) || self.g.node(n).outputs.len() != 2 {
                    return Err("non-f32 input".into());
                }
                let xs = four(&self.g.value_type(x).shape).ok_or("input not 4-D")?;
                let x = self.contiguous(x).ok_or("no home")?;
                let p = MaxPool2dParams {
                    kernel: pair(kernel),
                    stride: pair(stride),
                    padding: pair(padding),
                    dilation: pair(dilation),
                    ceil_mode,
                };
                self.push(
                    Step::MaxPoolIdx { node: n, x, xs, p },
                    bufs_of(&[x]),
                    vec![],
                );
                for k in 0..2 {
                    self.tensors.insert(Value::new(n, k));
                }
                return Ok(());
            }
            _ => {}
        }
        let node = self.g.node(n).clone();
        let ops = self.g.operands(n);
        let out_v = Value::new(n, 0);
        if node.outputs.len() != 1 || !self.is_f32(out_v) || ops.iter().any(|v| !self.is_f32(*v)) {
            return Err("non-f32 operands or several outputs".into());
        }
        let xs = self.g.value_type(ops[0]).shape.clone();
        match &node.op {
            Op::Conv2d {
                stride,
                padding,
                dilation,
                groups,
            } => {
                let x = self.contiguous(ops[0]).ok_or("no home")?;
                let w = self.contiguous(ops[1]).ok_or("no home")?;
                let ws = four(&self.g.value_type(ops[1]).shape).ok_or("weight not 4-D")?;
                let bias = match ops.get(2) {
                    Some(&b) => Some(self.contiguous(b).ok_or("no home")?),
                    None => None,
                };
                let out = self.output(out_v);
                let mut reads = bufs_of(&[x, w]);
                reads.extend(bufs_of(&bias.into_iter().collect::<Vec<_>>()));
                self.push(
                    Step::Conv {
                        x,
                        xs: four(&xs).ok_or("input not 4-D")?,
                        w,
                        ws,
                        bias,
                        p: Conv2dParams::from_arrays(*stride, *padding, *dilation, *groups),
                        out,
                        epi: None,
                        pool: None,
                    },
                    reads,
                    bufs_of(&[out]),
                );
            }
            Op::Conv2dBackwardInput {
                stride,
                padding,
                dilation,
                groups,
                input_size,
            } => {
                let g = self.contiguous(ops[0]).ok_or("no home")?;
                let w = self.contiguous(ops[1]).ok_or("no home")?;
                let ws = four(&self.g.value_type(ops[1]).shape).ok_or("weight not 4-D")?;
                let xs4 = [xs[0], ws[1] * groups, input_size[0], input_size[1]];
                let out = self.output(out_v);
                self.push(
                    Step::ConvBwdInput {
                        g,
                        w,
                        ws,
                        xs: xs4,
                        p: Conv2dParams::from_arrays(*stride, *padding, *dilation, *groups),
                        out,
                    },
                    bufs_of(&[g, w]),
                    bufs_of(&[out]),
                );
            }
            Op::Conv2dBackwardWeight {
                stride,
                padding,
                dilation,
                groups,
                kernel,
            } => {
                let g = self.contiguous(ops[0]).ok_or("no home")?;
                let x = self.contiguous(ops[1]).ok_or("no home")?;
                let x_shape = four(&self.g.value_type(ops[1]).shape).ok_or("input not 4-D")?;
                let ws = [xs[1], x_shape[1] / groups, kernel[0], kernel[1]];
                let out = self.output(out_v);
                self.push(
                    Step::ConvBwdWeight {
                        x,
                        xs: x_shape,
                        g,
                        ws,
                        p: Conv2dParams::from_arrays(*stride, *padding, *dilation, *groups),
                        out,
                    },
                    bufs_of(&[g, x]),
                    bufs_of(&[out]),
                );
            }
            Op::MaxPool2d {
                kernel,
                stride,
                padding,
                dilation,
                ceil_mode,
            } => {
                let xs4 = four(&xs).ok_or("input not 4-D")?;
                let p = MaxPool2dParams {
                    kernel: pair(*kernel),
                    stride: pair(*stride),
                    padding: pair(*padding),
                    dilation: pair(*dilation),
                    ceil_mode: *ceil_mode,
                };
                if !self.fuse_pool_into_conv(ops[0], out_v, xs4, p) {
                    self.map_step(ops[0], out_v, |x, out| Step::MaxPool { x, xs: xs4, p, out })?;
                }
            }
            Op::AvgPool2d {
                kernel,
                stride,
                padding,
                ceil_mode,
                count_include_pad,
                divisor_override,
            } => {
                let xs4 = four(&xs).ok_or("input not 4-D")?;
                let p = AvgPool2dParams {
                    kernel: pair(*kernel),
                    stride: pair(*stride),
                    padding: pair(*padding),
                    ceil_mode: *ceil_mode,
                    count_include_pad: *count_include_pad,
                    divisor_override: *divisor_override,
                };
                self.map_step(ops[0], out_v, |x, out| Step::AvgPool { x, xs: xs4, p, out })?;
            }
            Op::Softmax { dim } | Op::LogSoftmax { dim } => {
                if *dim + 1 != xs.len() {
                    return Err("softmax over a dim other than the last".into());
                }
                let (k, log) = (xs[*dim], matches!(node.op, Op::LogSoftmax { .. }));
                self.map_step(ops[0], out_v, |x, out| Step::Softmax { x, k, log, out })?;
            }
            Op::LayerNorm {
                normalized_shape,
                eps,
                has_weight,
                has_bias,
            } => {
                let k: usize = normalized_shape.iter().product();
                let x = self.contiguous(ops[0]).ok_or("no home")?;
                let w = if *has_weight {
                    Some(self.contiguous(ops[1]).ok_or("no home")?)
                } else {
                    None
                };
                let b = if *has_bias {
                    Some(
                        self.contiguous(ops[1 + *has_weight as usize])
                            .ok_or("no home")?,
                    )
                } else {
                    None
                };
                let out = self.output(out_v);
                let mut reads = bufs_of(&[x]);
                reads.extend(bufs_of(
                    &w.iter().chain(b.iter()).copied().collect::<Vec<_>>(),
                ));
                self.push(
                    Step::LayerNorm {
                        x,
                        k,
                        w,
                        b,
                        eps: *eps,
                        out,
                    },
                    reads,
                    bufs_of(&[out]),
                );
            }
            other => return Err(format!("no native CPU lowering for {}", other.name())),
        }
        Ok(())
    }

    fn lower_kernel(&mut self, k: &Kernel) {
        // Values produced and consumed only inside this kernel.
        let inside: HashSet<NodeId> = k.nodes.iter().copied().collect();
        let internal: HashSet<Value> = k
            .nodes
            .iter()
            .flat_map(|&n| (0..self.g.node(n).outputs.len()).map(move |i| Value::new(n, i)))
            .filter(|v| !k.outputs.contains(v) && !self.g.is_graph_output(*v))
            .filter(|v| self.g.users(*v).iter().all(|(u, _)| inside.contains(u)))
            .collect();
        let mut i = 0;
        while i < k.nodes.len() {
            let n = k.nodes[i];
            let class = self.g.node(n).op.class();
            if class == OpClass::Pointwise {
                let mut j = i;
                while j < k.nodes.len() && self.g.node(k.nodes[j]).op.class() == OpClass::Pointwise
                {
                    j += 1;
                }
                let run = k.nodes[i..j].to_vec();
                if let Err(why) = self.jit_run(&run, &internal) {
                    for &m in &run {
                        self.fallback(m, why.clone());
                    }
                }
                i = j;
                continue;
            }
            if matches!(self.g.node(n).op, Op::ModuleCall { .. }) {
                self.tensor_step(n);
                i += 1;
                continue;
            }
            // A matmul/conv followed by pointwise nodes reading its output:
            // make the run's other inputs contiguous first, so the run can
            // be applied to each output tile inside the head's step.
            let head_run: Option<Vec<NodeId>> = if class == OpClass::Contraction {
                let h = Value::new(n, 0);
                let mut j = i + 1;
                while j < k.nodes.len() && self.g.node(k.nodes[j]).op.class() == OpClass::Pointwise
                {
                    j += 1;
                }
                let run = k.nodes[i + 1..j].to_vec();
                let reads_h = run.iter().any(|&m| self.g.operands(m).contains(&h));
                (reads_h && !run.is_empty()).then_some(run)
            } else {
                None
            };
            if let Some(run) = &head_run {
                let set: HashSet<NodeId> = run.iter().copied().collect();
                let outside: Vec<Value> = run
                    .iter()
                    .flat_map(|&m| self.g.operands(m))
                    .filter(|v| !set.contains(&v.node) && v.node != n)
                    .collect();
                for v in outside {
                    if self.is_f32(v) {
                        let _ = self.contiguous(v);
                    }
                }
            }
            let r = match class {
                OpClass::View => self.view(n),
                OpClass::Contraction if matches!(self.g.node(n).op, Op::MatMul | Op::Addmm) => {
                    self.gemm(n)
                }
                OpClass::Contraction | OpClass::Pool | OpClass::Reduction => self.native(n),
                _ if matches!(self.g.node(n).op, Op::SliceBackward { .. }) => {
                    self.slice_backward(n)
                }
                _ if matches!(self.g.node(n).op, Op::DropoutMask { .. })
                    && self.is_f32(Value::new(n, 0)) =>
                {
                    let Op::DropoutMask { p } = self.g.node(n).op else {
                        unreachable!("matched above")
                    };
                    let out = self.output(Value::new(n, 0));
                    self.push(Step::DropoutMask { p, out }, vec![], bufs_of(&[out]));
                    Ok(())
                }
                _ if matches!(self.g.node(n).op, Op::MaxPool2dBackward { .. }) => {
                    self.max_pool_backward(n)
                }
                _ => Err(format!(
                    "no native CPU lowering for {}",
                    self.g.node(n).op.name()
                )),
            };
            let ok = r.is_ok();
            if let Err(why) = r {
                self.fallback(n, why);
            }
            i += 1;
            if let (true, Some(run)) = (ok, head_run) {
                if self.attach_epilogue(&run, Value::new(n, 0), &internal) {
                    i += run.len();
                }
            }
        }
    }
}

/// Offsets for buffers by liveness: first fit in a free list, a buffer's
/// range free again after the last step that reads it.
fn plan_memory(lens: &[usize], first: &[usize], last: &[usize]) -> (Vec<usize>, usize) {
    plan_memory_inplace(lens, first, last, &[])
}

/// `plan_memory` where, for each `(a, b)` in `inplace` (a pointwise step
/// reading buffer `a` element for element and writing `b`), `b` takes
/// `a`'s range when that step is `a`'s last reader and `b`'s first writer.
fn plan_memory_inplace(
    lens: &[usize],
    first: &[usize],
    last: &[usize],
    inplace: &[(usize, usize)],
) -> (Vec<usize>, usize) {
    const ALIGN: usize = 16;
    let mut order: Vec<usize> = (0..lens.len()).collect();
    order.sort_by_key(|&b| (first[b], b));
    let mut free: Vec<(usize, usize)> = Vec::new(); // (offset, len), sorted
    let mut active: Vec<usize> = Vec::new();
    let mut offsets = vec![0usize; lens.len()];
    let mut top = 0usize;
    let mut peak = 0usize;
    for b in order {
        // Release buffers whose last reader ran before this one is written.
        let (done, keep): (Vec<usize>, Vec<usize>) =
            active.into_iter().partition(|&a| last[a] < first[b]);
        active = keep;
        for a in done {
            let len = lens[a].div_ceil(ALIGN) * ALIGN;
            free.push((offsets[a], len));
        }
        free.sort();
        let mut merged: Vec<(usize, usize)> = Vec::new();
        for (o, l) in free.drain(..) {
            match merged.last_mut() {
                Some((mo, ml)) if *mo + *ml == o => *ml += l,
                _ => merged.push((o, l)),
            }
        }
        // The block at the top of the arena can grow.
        if let Some(&(o, l)) = merged.last() {
            if o + l == top {
                top = o;
                merged.pop();
            }
        }
        free = merged;
        let need = lens[b].div_ceil(ALIGN) * ALIGN;
        let heir = inplace.iter().find_map(|&(a, o)| {
            (o == b
                && last[a] == first[b]
                && lens[a].div_ceil(ALIGN) * ALIGN == need
                && active.contains(&a))
            .then_some(a)
        });
        if let Some(a) = heir {
            active.retain(|&x| x != a);
            offsets[b] = offsets[a];
            active.push(b);
            continue;
        }
        let slot = free
            .iter()
            .enumerate()
            .filter(|(_, (_, l))| *l >= need)
            .min_by_key(|(_, (_, l))| *l)
            .map(|(i, _)| i);
        offsets[b] = match slot {
            Some(i) => {
                let (o, l) = free[i];
                if l == need {
                    free.remove(i);
                } else {
                    free[i] = (o + need, l - need);
                }
                o
            }
            None => {
                let o = top;
                top += need;
                peak = peak.max(top);
                o
            }
        };
        active.push(b);
    }
    (offsets, peak)
}

/// A program lowered but not yet given arena offsets: its buffers' live
/// ranges in step indices (inclusive; `usize::MAX` = read at the end).
struct Lowered {
    program: Program,
    first: Vec<usize>,
    last: Vec<usize>,
    /// For each graph output kept in the arena (`keep`): its buffer and
    /// view, or None where it is returned as a tensor.
    kept: Vec<Option<(usize, Loc)>>,
    /// The buffer of each pinned user input, by input index.
    pinned: HashMap<usize, usize>,
    /// In-place candidates (`Builder::inplace`).
    inplace: Vec<(usize, usize)>,
}

/// Offsets by size: buffers (in-place pairs merged into one block that
/// lives from the first's write to the last's read) placed largest first
/// at the lowest offset free of every placed block that is live at the
/// same time. Often tighter than `plan_memory_inplace`'s order of first
/// writes when long-lived values interleave with large temporaries.
fn plan_memory_by_size(
    lens: &[usize],
    first: &[usize],
    last: &[usize],
    inplace: &[(usize, usize)],
) -> (Vec<usize>, usize) {
    const ALIGN: usize = 16;
    let n = lens.len();
    let size = |b: usize| lens[b].div_ceil(ALIGN) * ALIGN;
    // Blocks: union of in-place pairs that `plan_memory_inplace` would
    // apply (the input's last reader writes the output, same size).
    let mut parent: Vec<usize> = (0..n).collect();
    fn root(p: &mut [usize], mut b: usize) -> usize {
        while p[b] != b {
            p[b] = p[p[b]];
            b = p[b];
        }
        b
    }
    let mut heir_taken = vec![false; n];
    let mut has_heir = vec![false; n];
    for &(a, b) in inplace {
        if last[a] == first[b] && size(a) == size(b) && !has_heir[a] && !heir_taken[b] {
            has_heir[a] = true;
            heir_taken[b] = true;
            let (ra, rb) = (root(&mut parent, a), root(&mut parent, b));
            if ra != rb {
                parent[rb] = ra;
            }
        }
    }
    let mut span: HashMap<usize, (usize, usize, usize)> = HashMap::new(); // root -> (first, last, size)
    for b in 0..n {
        let r = root(&mut parent, b);
        let e = span.entry(r).or_insert((first[b], last[b], size(b)));
        e.0 = e.0.min(first[b]);
        e.1 = e.1.max(last[b]);
        e.2 = e.2.max(size(b));
    }
    let mut blocks: Vec<(usize, (usize, usize, usize))> = span.into_iter().collect();
    blocks.sort_by_key(|&(r, (f, _, s))| (std::cmp::Reverse(s), f, r));
    let mut placed: Vec<(usize, usize, usize, usize)> = Vec::new(); // (off, size, first, last)
    let mut off_of: HashMap<usize, usize> = HashMap::new();
    let mut top = 0usize;
    for (r, (f, l, s)) in blocks {
        let mut busy: Vec<(usize, usize)> = placed
            .iter()
            .filter(|p| p.2 <= l && f <= p.3)
            .map(|p| (p.0, p.0 + p.1))
            .collect();
        busy.sort();
        let mut off = 0usize;
        for (a, b) in busy {
            if a >= off + s {
                break;
            }
            off = off.max(b);
        }
        placed.push((off, s, f, l));
        off_of.insert(r, off);
        top = top.max(off + s);
    }
    let offsets = (0..n).map(|b| off_of[&root(&mut parent, b)]).collect();
    (offsets, top)
}

impl Program {
    /// Lowers `g` along `plan`. `leaves` binds each Input/Constant node.
    pub(crate) fn build(
        g: &Graph,
        plan: &FusionPlan,
        bind_leaf: &dyn Fn(NodeId) -> Result<LeafSrc>,
    ) -> Result<Program> {
        let mut l = Self::lower(g, plan, bind_leaf, &[], &HashMap::new(), &HashSet::new())?;
        let (offs, len) = plan_memory(&l.program.buf_lens, &l.first, &l.last);
        l.program.set_plan(offs, len);
        Ok(l.program)
    }

    fn set_plan(&mut self, buf_offsets: Vec<usize>, arena_len: usize) {
        for (o, l) in buf_offsets.iter().zip(&self.buf_lens) {
            assert!(o + l <= arena_len, "memory plan: buffer outside the arena");
        }
        self.buf_offsets = buf_offsets;
        self.arena_len = arena_len;
    }

    /// Lowers `g`; the graph outputs whose index is in `keep` stay in the
    /// arena when they live in an arena buffer (returned as the leaf
    /// tensor itself when they are an f32 leaf), and user input `i` in
    /// `pinned` is not a leaf but a view `(buffer length, view)` of an
    /// arena buffer written before the program runs; user input `i` in
    /// `consumed` is handed over by value (`run_owned`) and dropped after
    /// its last reader.
    fn lower(
        g: &Graph,
        plan: &FusionPlan,
        bind_leaf: &dyn Fn(NodeId) -> Result<LeafSrc>,
        keep: &[usize],
        pinned: &HashMap<usize, (usize, Loc)>,
        consumed: &HashSet<usize>,
    ) -> Result<Lowered> {
        let order = g.topo_order()?;
        let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let mut b = Builder {
            g,
            locs: HashMap::new(),
            tensors: HashSet::new(),
            leaf_of: HashMap::new(),
            buf_lens: Vec::new(),
            steps: Vec::new(),
            reads: Vec::new(),
            writes: Vec::new(),
            fallbacks: Vec::new(),
            avail: Vec::new(),
            epilogue_mode: false,
            out_shapes: Vec::new(),
            tensor_last: HashMap::new(),
            dyn_values: Vec::new(),
            kept: HashSet::new(),
            inplace: Vec::new(),
        };
        // Values returned only through kept outputs live in the arena.
        for (i, o) in g.outputs().iter().enumerate() {
            if keep.contains(&i) {
                b.kept.insert(o.value);
            }
        }
        for (i, o) in g.outputs().iter().enumerate() {
            if !keep.contains(&i) {
                b.kept.remove(&o.value);
            }
        }
        let mut leaves = Vec::new();
        let mut leaf_nodes = Vec::new();
        let mut pinned_bufs = HashMap::new();
        let mut consumed_vals = Vec::new();
        for &n in &order {
            if matches!(g.node(n).op.class(), OpClass::Input | OpClass::Constant) {
                let i = leaves.len();
                leaves.push(bind_leaf(n)?);
                leaf_nodes.push(n);
                let v = Value::new(n, 0);
                if let Op::Input {
                    kind: InputKind::User(u),
                    ..
                } = g.node(n).op
                {
                    if let Some((len, loc)) = pinned.get(&u) {
                        let buf = b.new_buf(*len);
                        pinned_bufs.insert(u, buf);
                        let loc = Loc {
                            base: Base::Buf(buf),
                            ..loc.clone()
                        };
                        b.set_loc(v, loc, false);
                        continue;
                    }
                    if consumed.contains(&u) {
                        b.tensors.insert(v);
                        consumed_vals.push((u, v));
                        continue;
                    }
                }
                b.leaf_of.insert(v, i);
                if b.is_f32(v) {
                    let shape = g.value_type(v).shape.clone();
                    b.locs.insert(v, Loc::contiguous(Base::Leaf(i), 0, &shape));
                }
            }
        }
        for k in &plan.kernels {
            b.lower_kernel(k);
        }
        let mut outputs = Vec::new();
        let mut end_reads = Vec::new();
        let mut kept = Vec::new();
        for (oi, o) in g.outputs().iter().enumerate() {
            let v = o.value;
            let keep = keep.contains(&oi);
            if keep {
                kept.push(None);
            }
            outputs.push(if b.tensors.contains(&v) {
                OutSrc::Tensor(v)
            } else if let (Some(&i), false) = (b.leaf_of.get(&v), b.is_f32(v) && !keep) {
                OutSrc::Leaf(i)
            } else {
                let loc = b.locs.get(&v).cloned().ok_or_else(|| {
                    Error::Input(format!("compiled program: output {v:?} was not computed"))
                })?;
                if let Base::Dyn(k) = loc.base {
                    // Read at the very end: never freed before.
                    b.tensor_last.insert(b.dyn_values[k], usize::MAX);
                }
                match loc.base {
                    Base::Out(k) if loc.off == 0 && loc.is_contiguous() => OutSrc::Out(k),
                    Base::Buf(x) if keep => {
                        end_reads.push(x);
                        *kept.last_mut().expect("pushed") = Some((x, loc));
                        OutSrc::Kept
                    }
                    Base::Buf(x) => {
                        end_reads.push(x);
                        OutSrc::View(loc)
                    }
                    _ => OutSrc::View(loc),
                }
            });
        }
        let nbuf = b.buf_lens.len();
        let mut first = vec![usize::MAX; nbuf];
        let mut last = vec![0usize; nbuf];
        for (s, (r, w)) in b.reads.iter().zip(&b.writes).enumerate() {
            for &x in w {
                first[x] = first[x].min(s);
                last[x] = last[x].max(s);
            }
            for &x in r {
                last[x] = last[x].max(s);
            }
        }
        for x in end_reads {
            last[x] = usize::MAX;
        }
        for f in first.iter_mut() {
            if *f == usize::MAX {
                *f = 0;
            }
        }
        let mut avail = std::mem::take(&mut b.avail);
        avail.sort_by_key(|(k, _, _)| *k);
        // A fallback value read in place lives until its last reader.
        for (si, st) in b.steps.iter().enumerate() {
            for k in st.dyn_reads() {
                let v = b.dyn_values[k];
                let e = b.tensor_last.entry(v).or_insert(si);
                *e = (*e).max(si);
            }
        }
        let mut frees = vec![Vec::new(); b.steps.len()];
        for (v, &st) in &b.tensor_last {
            let returned = outputs
                .iter()
                .any(|o| matches!(o, OutSrc::Tensor(t) if t == v));
            if !returned && st < frees.len() {
                frees[st].push(*v);
            }
        }
        let dyn_of = b
            .dyn_values
            .iter()
            .enumerate()
            .map(|(k, v)| (*v, k))
            .collect();
        let program = Program {
            dyn_of,
            frees,
            out_shapes: std::mem::take(&mut b.out_shapes),
            avail,
            leaves,
            leaf_nodes,
            steps: b.steps,
            buf_offsets: Vec::new(),
            buf_lens: b.buf_lens,
            arena_len: 0,
            outputs,
            fallbacks: b.fallbacks,
            pos,
            consumed: consumed_vals,
        };
        Ok(Lowered {
            program,
            first,
            last,
            kept,
            pinned: pinned_bufs,
            inplace: std::mem::take(&mut b.inplace),
        })
    }

    pub(crate) fn leaves(&self) -> &[LeafSrc] {
        &self.leaves
    }

    /// A fallback result that later steps read in place: made contiguous
    /// and its address recorded in the call's `Base::Dyn` table. The
    /// tensor stays in the call's map (alive, unchanged) until its last
    /// reader ran.
    fn register_dyn(&self, ctx: &Ctx, v: Value, t: Tensor) -> Result<Tensor> {
        let Some(&k) = self.dyn_of.get(&v) else {
            return Ok(t);
        };
        let t = if t.is_contiguous() {
            t
        } else {
            t.contiguous()?
        };
        let (p, n) = t
            .with_f32_contiguous(|s| (s.as_ptr() as usize, s.len()))
            .ok_or_else(|| Error::Input(format!("value {v:?} read in place is not f32")))?;
        ctx.dyns[k].set((p, n));
        Ok(t)
    }

    /// Fresh output buffers (the call's only allocations besides what
    /// fallback nodes allocate) and their (address, length).
    #[allow(clippy::type_complexity)]
    fn alloc_outputs(
        &self,
    ) -> (
        std::cell::RefCell<Vec<Option<Vec<f32>>>>,
        Vec<(usize, usize)>,
    ) {
        let bufs: Vec<Option<Vec<f32>>> = self
            .out_shapes
            .iter()
            .map(|s| Some(kiln_cpu::buffers::alloc_uninit::<f32>(kiln_ir::numel(s))))
            .collect();
        let outs = bufs
            .iter()
            .map(|b| {
                let b = b.as_ref().expect("fresh");
                (b.as_ptr() as usize, b.len())
            })
            .collect();
        (std::cell::RefCell::new(bufs), outs)
    }

    /// The graph node of each leaf.
    pub(crate) fn leaf_nodes(&self) -> &[NodeId] {
        &self.leaf_nodes
    }

    pub(crate) fn arena_len(&self) -> usize {
        self.arena_len
    }

    pub(crate) fn fallbacks(&self) -> &[String] {
        &self.fallbacks
    }

    pub(crate) fn jit_count(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Jit(_)))
            .count()
    }

    /// Step names in order (for tests and `kiln graph`-style summaries).
    pub(crate) fn step_names(&self) -> Vec<&'static str> {
        self.steps.iter().map(Step::name).collect()
    }

    /// Runs the program. `leaves[i]` is leaf i's tensor (f32 ones
    /// contiguous), `arena` holds at least `arena_len` elements. Returns
    /// the graph outputs in order.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run(
        &self,
        g: &Graph,
        leaves: &[Tensor],
        ptrs: &mut Vec<(usize, usize)>,
        arena: &mut [f32],
        user_inputs: &[Tensor],
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
        call: &dyn Fn(&str, &Tensor) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        assert!(arena.len() >= self.arena_len, "arena too small");
        ptrs.clear();
        let (out_bufs, outs) = self.alloc_outputs();
        let dyns: Vec<std::cell::Cell<(usize, usize)>> =
            (0..self.dyn_of.len()).map(|_| Default::default()).collect();
        with_leaf_slices(leaves, ptrs, &mut |ptrs| {
            let ctx = Ctx {
                leaves: ptrs,
                arena: arena.as_mut_ptr(),
                offs: &self.buf_offsets,
                lens: &self.buf_lens,
                outs: &outs,
                out_bufs: &out_bufs,
                dyns: &dyns,
            };
            self.exec(g, &ctx, leaves, user_inputs, bind, call, None, Vec::new())
        })
    }

    /// `run` with the inputs the program takes by value (`lower`'s
    /// `consumed`) in `owned`, by input index.
    #[allow(clippy::too_many_arguments)]
    fn run_owned(
        &self,
        g: &Graph,
        leaves: &[Tensor],
        ptrs: &mut Vec<(usize, usize)>,
        arena: &mut [f32],
        user_inputs: &[Tensor],
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
        call: &dyn Fn(&str, &Tensor) -> Result<Tensor>,
        owned: Vec<Option<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        assert!(arena.len() >= self.arena_len, "arena too small");
        ptrs.clear();
        let (out_bufs, outs) = self.alloc_outputs();
        let dyns: Vec<std::cell::Cell<(usize, usize)>> =
            (0..self.dyn_of.len()).map(|_| Default::default()).collect();
        let mut owned = Some(owned);
        with_leaf_slices(leaves, ptrs, &mut |ptrs| {
            let ctx = Ctx {
                leaves: ptrs,
                arena: arena.as_mut_ptr(),
                offs: &self.buf_offsets,
                lens: &self.buf_lens,
                outs: &outs,
                out_bufs: &out_bufs,
                dyns: &dyns,
            };
            let owned = owned.take().unwrap_or_default();
            self.exec(g, &ctx, leaves, user_inputs, bind, call, None, owned)
        })
    }

    /// `run` that also returns a copy of every value the program
    /// materializes (arena values right after the step that writes them,
    /// fallback results), for per-node comparison with the interpreter.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_collect(
        &self,
        g: &Graph,
        leaves: &[Tensor],
        arena: &mut [f32],
        user_inputs: &[Tensor],
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
        call: &dyn Fn(&str, &Tensor) -> Result<Tensor>,
    ) -> Result<(Vec<Tensor>, HashMap<Value, Tensor>)> {
        let mut ptrs = Vec::new();
        let mut seen = HashMap::new();
        let (out_bufs, outs) = self.alloc_outputs();
        let dyns: Vec<std::cell::Cell<(usize, usize)>> =
            (0..self.dyn_of.len()).map(|_| Default::default()).collect();
        let outs = with_leaf_slices(leaves, &mut ptrs, &mut |ptrs| {
            let ctx = Ctx {
                leaves: ptrs,
                arena: arena.as_mut_ptr(),
                offs: &self.buf_offsets,
                lens: &self.buf_lens,
                outs: &outs,
                out_bufs: &out_bufs,
                dyns: &dyns,
            };
            self.exec(
                g,
                &ctx,
                leaves,
                user_inputs,
                bind,
                call,
                Some(&mut seen),
                Vec::new(),
            )
        })?;
        Ok((outs, seen))
    }

    #[allow(clippy::too_many_arguments)]
    fn exec(
        &self,
        g: &Graph,
        ctx: &Ctx,
        leaves: &[Tensor],
        user_inputs: &[Tensor],
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
        call: &dyn Fn(&str, &Tensor) -> Result<Tensor>,
        mut collect: Option<&mut HashMap<Value, Tensor>>,
        mut owned: Vec<Option<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let mut tensors: HashMap<Value, Tensor> = HashMap::new();
        // Inputs handed over by value: held like fallback results, dropped
        // after their last reader.
        for &(i, v) in &self.consumed {
            let t = owned.get_mut(i).and_then(Option::take).ok_or_else(|| {
                Error::Input(format!("compiled program: input {i} (by value) missing"))
            })?;
            let t = self.register_dyn(ctx, v, t)?;
            tensors.insert(v, t);
        }
        drop(owned);
        let mut next_avail = 0;
        // Copies (for `run_collect`) of the values readable once `ran` steps ran.
        let mut snapshot = |ran: usize, collect: &mut Option<&mut HashMap<Value, Tensor>>| {
            if let Some(seen) = collect.as_deref_mut() {
                while next_avail < self.avail.len() && self.avail[next_avail].0 <= ran {
                    let (_, v, loc) = &self.avail[next_avail];
                    // SAFETY: the view is inside its base, written by now.
                    let t =
                        Tensor::f32_filled_by(&loc.shape, |d| unsafe { gather_into(ctx, loc, d) });
                    seen.entry(*v).or_insert(t);
                    next_avail += 1;
                }
            }
        };
        snapshot(0, &mut collect);
        for (si, step) in self.steps.iter().enumerate() {
            // SAFETY (every arm): spans come from the compile-time plan:
            // each lies inside its leaf (checked types) or its arena buffer;
            // buffers live at the same time never overlap (`plan_memory`),
            // so an output span never aliases an input span, except the
            // in-place pointwise case `run_ptrs` allows.
            unsafe {
                match step {
                    Step::Jit(j) => {
                        let mut ins = [std::ptr::null::<f32>(); 32];
                        let mut outs = [std::ptr::null_mut::<f32>(); 16];
                        if j.ins.len() > 32 || j.outs.len() > 16 {
                            let i: Vec<*const f32> =
                                j.ins.iter().map(|s| ctx.ptr(s) as *const f32).collect();
                            let o: Vec<*mut f32> = j.outs.iter().map(|s| ctx.ptr(s)).collect();
                            j.kernel.run_ptrs(&i, &o, j.kernel.par_threshold());
                        } else {
                            for (p, s) in ins.iter_mut().zip(&j.ins) {
                                *p = ctx.ptr(s);
                            }
                            for (p, s) in outs.iter_mut().zip(&j.outs) {
                                *p = ctx.ptr(s);
                            }
                            j.kernel.run_ptrs(
                                &ins[..j.ins.len()],
                                &outs[..j.outs.len()],
                                j.kernel.par_threshold(),
                            );
                        }
                    }
                    Step::Gemm {
                        a,
                        la,
                        b,
                        lb,
                        bias,
                        batch,
                        m,
                        k,
                        n,
                        out,
                        epi,
                    } => {
                        if let (1, None | Some(Bias::Row(_))) = (*batch, bias) {
                            let c = ctx.slice_mut(out);
                            let bias = match bias {
                                Some(Bias::Row(s)) => Some(ctx.slice(s)),
                                _ => None,
                            };
                            let ptrs = epi.as_ref().map(|j| JitPtrs::new(ctx, j));
                            let f = |r0: usize, rows: &mut [f32]| {
                                if let (Some(j), Some(p)) = (epi, &ptrs) {
                                    let s = r0 * *n;
                                    // SAFETY: the plan's spans; the tile
                                    // [s, s + rows.len()) is final.
                                    p.run_range(j, s, s + rows.len());
                                }
                            };
                            kiln_cpu::matmul::matmul_epilogue(
                                c,
                                ctx.slice(a),
                                *la,
                                ctx.slice(b),
                                *lb,
                                *m,
                                *k,
                                *n,
                                bias,
                                epi.as_ref()
                                    .map(|_| &f as kiln_cpu::matmul::RowEpilogue<f32>),
                            );
                        } else {
                            let c = ctx.slice_mut(out);
                            let beta = match bias {
                                None => 0.0,
                                Some(Bias::Row(s)) => {
                                    let bs = ctx.slice(s);
                                    for row in c.chunks_exact_mut(*n) {
                                        row.copy_from_slice(bs);
                                    }
                                    1.0
                                }
                                Some(Bias::Full(s)) => {
                                    c.copy_from_slice(ctx.slice(s));
                                    1.0
                                }
                            };
                            kiln_cpu::matmul::matmul_into(
                                c,
                                MatLayout::contiguous(*m, *n),
                                beta,
                                1.0,
                                ctx.slice(a),
                                *la,
                                ctx.slice(b),
                                *lb,
                                *batch,
                                *m,
                                *k,
                                *n,
                            );
                        }
                    }
                    Step::Conv {
                        x,
                        xs,
                        w,
                        ws,
                        bias,
                        p,
                        out,
                        epi,
                        pool,
                    } => {
                        let unit = out.len / xs[0].max(1);
                        let ptrs = epi.as_ref().map(|j| JitPtrs::new(ctx, j));
                        // SAFETY: the plan's spans (the pooled output is
                        // not the conv's input or output: it is written
                        // in the same step, so the planner keeps it apart).
                        let pooled = pool.as_ref().map(|fp| ctx.ptr(&fp.out) as usize);
                        let f = |img: usize, y: &mut [f32]| {
                            if let (Some(j), Some(p)) = (epi, &ptrs) {
                                // SAFETY: the plan's spans; image `img` is final.
                                p.run_range(j, img * unit, (img + 1) * unit);
                            }
                            if let (Some(fp), Some(base)) = (pool, pooled) {
                                let per = fp.out.len / fp.ys[0].max(1);
                                // SAFETY: image `img`'s range of the pooled
                                // output, written by this call only.
                                let dst = std::slice::from_raw_parts_mut(
                                    (base as *mut f32).add(img * per),
                                    per,
                                );
                                let ys = [1, fp.ys[1], fp.ys[2], fp.ys[3]];
                                kiln_cpu::pool::max_pool2d_into(y, ys, &fp.p, dst);
                            }
                        };
                        kiln_cpu::conv::conv2d_into(
                            ctx.slice(x),
                            *xs,
                            ctx.slice(w),
                            *ws,
                            bias.as_ref().map(|b| ctx.slice(b)),
                            p,
                            ctx.slice_mut(out),
                            (epi.is_some() || pool.is_some())
                                .then_some(&f as kiln_cpu::conv::ImageEpilogue<f32>),
                        );
                    }
                    Step::ConvBwdInput {
                        g,
                        w,
                        ws,
                        xs,
                        p,
                        out,
                    } => {
                        kiln_cpu::conv::conv2d_backward_input_into(
                            ctx.slice(g),
                            ctx.slice(w),
                            *ws,
                            *xs,
                            p,
                            ctx.slice_mut(out),
                        );
                    }
                    Step::ConvBwdWeight {
                        x,
                        xs,
                        g,
                        ws,
                        p,
                        out,
                    } => {
                        kiln_cpu::conv::conv2d_backward_weight_into(
                            ctx.slice(x),
                            *xs,
                            ctx.slice(g),
                            *ws,
                            p,
                            ctx.slice_mut(out),
                        );
                    }
                    Step::MaxPool { x, xs, p, out } => {
                        kiln_cpu::pool::max_pool2d_into(ctx.slice(x), *xs, p, ctx.slice_mut(out));
                    }
                    Step::AvgPool { x, xs, p, out } => {
                        kiln_cpu::pool::avg_pool2d_into(ctx.slice(x), *xs, p, ctx.slice_mut(out));
                    }
                    Step::Softmax { x, k, log, out } => {
                        kiln_cpu::reduce::softmax_rows_into(
                            ctx.slice(x),
                            *k,
                            *log,
                            ctx.slice_mut(out),
                        );
                    }
                    Step::LayerNorm {
                        x,
                        k,
                        w,
                        b,
                        eps,
                        out,
                    } => {
                        kiln_cpu::norm::layer_norm_into(
                            ctx.slice(x),
                            *k,
                            w.as_ref().map(|s| ctx.slice(s)),
                            b.as_ref().map(|s| ctx.slice(s)),
                            *eps,
                            ctx.slice_mut(out),
                        );
                    }
                    Step::Gather { src, out } => {
                        gather_into(ctx, src, ctx.slice_mut(out));
                    }
                    Step::SumOuterInner {
                        x,
                        dims,
                        scale,
                        var,
                        out,
                    } => {
                        let [r1, k, r2] = *dims;
                        let xv = ctx.slice(x);
                        let o = ctx.slice_mut(out);
                        if let Some(c) = var {
                            o.copy_from_slice(&kiln_cpu::reduce::var_rows(xv, k, r2, *c));
                        } else if r2 == 1 {
                            o.copy_from_slice(&kiln_cpu::reduce::sum_cols(xv, r1, k));
                        } else if r1 == 1 {
                            o.copy_from_slice(&kiln_cpu::reduce::sum_rows(xv, k, r2));
                        } else {
                            kiln_cpu::reduce::sum_outer_inner_into(xv, r1, k, r2, o);
                        }
                        if let Some(s) = scale {
                            // As eager's mean: the f32 sum times f32(1/count).
                            let s = *s as f32;
                            for v in o.iter_mut() {
                                *v *= s;
                            }
                        }
                    }
                    Step::MaxPoolIdx { node, x, xs, p } => {
                        let (v, i) = kiln_cpu::pool::max_pool2d(ctx.slice(x), *xs, p);
                        let shape = &g.node(*node).outputs[0].shape;
                        let ts = [Tensor::from_vec(v, shape)?, Tensor::from_vec(i, shape)?];
                        for (k, t) in ts.into_iter().enumerate() {
                            let v = Value::new(*node, k);
                            let t = self.register_dyn(ctx, v, t)?;
                            tensors.insert(v, t);
                        }
                    }
                    Step::BatchNormTrain {
                        x,
                        shape,
                        w,
                        b,
                        run,
                        momentum,
                        eps,
                        out,
                    } => {
                        let st = kiln_cpu::norm::batch_norm_train_into(
                            ctx.slice(x),
                            *shape,
                            w.as_ref().map(|s| ctx.slice(s)),
                            b.as_ref().map(|s| ctx.slice(s)),
                            *eps,
                            Some(ctx.slice_mut(out)),
                        );
                        if let Some([rm, rv, om, ov]) = run {
                            // As eager: running * (1 - m) + stat * m, in f32,
                            // the variance unbiased.
                            let (a, m) = ((1.0 - momentum) as f32, *momentum as f32);
                            let cnt = st.count as f64;
                            let (rm, rv) = (ctx.slice(rm), ctx.slice(rv));
                            let (om, ov) = (ctx.slice_mut(om), ctx.slice_mut(ov));
                            for ch in 0..shape[1] {
                                om[ch] = rm[ch] * a + st.mean[ch] * m;
                                let unbiased = (st.var[ch] as f64 * cnt / (cnt - 1.0)) as f32;
                                ov[ch] = rv[ch] * a + unbiased * m;
                            }
                        }
                    }
                    Step::LayerNormBwd {
                        g,
                        x,
                        k,
                        w,
                        eps,
                        gi,
                        gw,
                        gb,
                    } => {
                        let xv = ctx.slice(x);
                        let (mean, rstd) = kiln_cpu::norm::layer_norm_stats(xv, *k, *eps);
                        let (gwv, gbv) = kiln_cpu::norm::layer_norm_backward_into(
                            ctx.slice(g),
                            xv,
                            *k,
                            &mean,
                            &rstd,
                            w.as_ref().map(|s| ctx.slice(s)),
                            ctx.slice_mut(gi),
                        );
                        ctx.slice_mut(gw).copy_from_slice(&gwv);
                        ctx.slice_mut(gb).copy_from_slice(&gbv);
                    }
                    Step::BatchNormBwd {
                        g,
                        x,
                        shape,
                        w,
                        eps,
                        gi,
                        gw,
                        gb,
                    } => {
                        let (gwv, gbv) = kiln_cpu::norm::batch_norm_backward_train_fused(
                            ctx.slice(g),
                            ctx.slice(x),
                            *shape,
                            w.as_ref().map(|s| ctx.slice(s)),
                            *eps,
                            ctx.slice_mut(gi),
                        );
                        ctx.slice_mut(gw).copy_from_slice(&gwv);
                        ctx.slice_mut(gb).copy_from_slice(&gbv);
                    }
                    Step::MaxPoolBwd {
                        g,
                        idx,
                        planes,
                        hw,
                        out,
                    } => {
                        let t = match idx {
                            Arg::Tensor(v) => &tensors[v],
                            Arg::Leaf(i) => &leaves[*i],
                            Arg::View(_) => unreachable!("indices are tensors"),
                        };
                        let o = ctx.slice_mut(out);
                        let gs = ctx.slice(g);
                        o.fill(0.0);
                        let po = if *planes == 0 { 0 } else { gs.len() / planes };
                        t.with_contiguous_as::<i64, _>(|ix| {
                            assert_eq!(ix.len(), gs.len(), "max_pool2d_backward: indices");
                            for p in 0..*planes {
                                let plane = &mut o[p * hw..][..*hw];
                                for (&gv, &i) in gs[p * po..][..po].iter().zip(&ix[p * po..][..po])
                                {
                                    plane[i as usize] += gv;
                                }
                            }
                        })
                        .ok_or_else(|| {
                            Error::Input("max_pool2d_backward: indices not contiguous i64".into())
                        })?;
                    }
                    Step::DropoutMask { p, out } => {
                        let scale = if *p == 1.0 { 0.0 } else { 1.0 / (1.0 - p) };
                        kiln_frontend::random::bernoulli_fill_f32(
                            ctx.slice_mut(out),
                            1.0 - p,
                            scale as f32,
                        );
                    }
                    Step::SliceBwd { src, out, dst } => {
                        ctx.slice_mut(out).fill(0.0);
                        copy_view(ctx, src, dst);
                    }
                    Step::Call { node, path, arg } => {
                        let x = match arg {
                            Arg::Tensor(v) => tensors[v].clone(),
                            Arg::Leaf(i) => leaves[*i].clone(),
                            Arg::View(loc) => {
                                Tensor::f32_filled_by(&loc.shape, |d| gather_into(ctx, loc, d))
                            }
                        };
                        let y = call(path, &x)
                            .and_then(|y| {
                                check_types(std::slice::from_ref(&y), &g.node(*node).outputs)
                                    .map(|_| y)
                            })
                            .map_err(|e| Error::Exec {
                                node: describe_node(g, &self.pos, *node),
                                source: Box::new(e),
                            })?;
                        let v = Value::new(*node, 0);
                        let y = self.register_dyn(ctx, v, y)?;
                        tensors.insert(v, y);
                    }
                    Step::Fallback { node, args } => {
                        let args: Vec<Tensor> = args
                            .iter()
                            .map(|a| {
                                Ok(match a {
                                    Arg::Tensor(v) => tensors[v].clone(),
                                    Arg::Leaf(i) => leaves[*i].clone(),
                                    Arg::View(loc) => Tensor::f32_filled_by(&loc.shape, |d| {
                                        gather_into(ctx, loc, d)
                                    }),
                                })
                            })
                            .collect::<Result<_>>()?;
                        let op = &g.node(*node).op;
                        let outs = exec_node(op, &args, user_inputs, bind)
                            .and_then(|o| check_types(&o, &g.node(*node).outputs).map(|_| o))
                            .map_err(|e| Error::Exec {
                                node: describe_node(g, &self.pos, *node),
                                source: Box::new(e),
                            })?;
                        for (k, t) in outs.into_iter().enumerate() {
                            let v = Value::new(*node, k);
                            let t = self.register_dyn(ctx, v, t)?;
                            tensors.insert(v, t);
                        }
                    }
                }
            }
            #[cfg(test)]
            if FAULT_AFTER_STEP.with(|f| f.get()) == si + 1 {
                if let Some(o) = step.out_span() {
                    // SAFETY: the span is inside the arena (as when written).
                    unsafe { ctx.slice_mut(&o)[0] += 1.0 };
                }
            }
            snapshot(si + 1, &mut collect);
            if collect.is_none() {
                for v in &self.frees[si] {
                    tensors.remove(v);
                }
            }
        }
        if let Some(seen) = collect {
            for (v, t) in &tensors {
                seen.entry(*v).or_insert_with(|| t.clone());
            }
        }
        self.outputs
            .iter()
            .map(|o| {
                Ok(match o {
                    OutSrc::Tensor(v) => tensors[v].clone(),
                    OutSrc::Leaf(i) => leaves[*i].clone(),
                    OutSrc::Kept => Tensor::from_vec(Vec::<f32>::new(), &[0])?,
                    OutSrc::View(loc) => {
                        Tensor::f32_filled_by(&loc.shape, |d| unsafe { gather_into(ctx, loc, d) })
                    }
                    OutSrc::Out(k) => {
                        let mut bufs = ctx.out_bufs.borrow_mut();
                        match bufs[*k].take() {
                            Some(b) => Tensor::from_vec(b, &self.out_shapes[*k])?,
                            // The same value returned twice.
                            None => Tensor::f32_filled_by(&self.out_shapes[*k], |d| {
                                d.copy_from_slice(unsafe {
                                    std::slice::from_raw_parts(
                                        ctx.outs[*k].0 as *const f32,
                                        ctx.outs[*k].1,
                                    )
                                })
                            }),
                        }
                    }
                })
            })
            .collect()
    }
}

/// A JIT kernel's operand addresses for one call, shareable across the
/// threads that run its tiles.
struct JitPtrs {
    ins: [usize; 32],
    outs: [usize; 16],
    n_in: usize,
    n_out: usize,
}

impl JitPtrs {
    unsafe fn new(ctx: &Ctx, j: &Jit) -> JitPtrs {
        assert!(
            j.ins.len() <= 32 && j.outs.len() <= 16,
            "epilogue with too many operands"
        );
        let mut p = JitPtrs {
            ins: [0; 32],
            outs: [0; 16],
            n_in: j.ins.len(),
            n_out: j.outs.len(),
        };
        for (d, s) in p.ins.iter_mut().zip(&j.ins) {
            // SAFETY: the plan's spans.
            *d = unsafe { ctx.ptr(s) } as usize;
        }
        for (d, s) in p.outs.iter_mut().zip(&j.outs) {
            *d = unsafe { ctx.ptr(s) } as usize;
        }
        p
    }

    /// Runs `j` over flat indices `[start, end)` on this thread.
    unsafe fn run_range(&self, j: &Jit, start: usize, end: usize) {
        let ins: [*const f32; 32] = self.ins.map(|a| a as *const f32);
        let outs: [*mut f32; 16] = self.outs.map(|a| a as *mut f32);
        // SAFETY: the caller's tile is final and inside every operand.
        unsafe {
            j.kernel
                .run_range_ptrs(&ins[..self.n_in], &outs[..self.n_out], start, end)
        };
    }
}

/// Raw views of the leaves and the arena for one call.
struct Ctx<'a> {
    /// (address, length) of each leaf's elements (0 for non-f32 leaves).
    leaves: &'a [(usize, usize)],
    arena: *mut f32,
    offs: &'a [usize],
    lens: &'a [usize],
    /// (address, length) of each output buffer.
    outs: &'a [(usize, usize)],
    /// The output buffers, taken out as the returned tensors at the end.
    out_bufs: &'a std::cell::RefCell<Vec<Option<Vec<f32>>>>,
    /// (address, length) of each `Base::Dyn` tensor, set when produced.
    dyns: &'a [std::cell::Cell<(usize, usize)>],
}

impl Ctx<'_> {
    unsafe fn base_ptr(&self, base: Base) -> *mut f32 {
        match base {
            Base::Leaf(i) => self.leaves[i].0 as *mut f32,
            Base::Out(k) => self.outs[k].0 as *mut f32,
            Base::Dyn(k) => self.dyns[k].get().0 as *mut f32,
            // SAFETY: offsets are inside the arena (`plan_memory`).
            Base::Buf(b) => unsafe { self.arena.add(self.offs[b]) },
        }
    }

    unsafe fn ptr(&self, s: &Span) -> *mut f32 {
        let cap = match s.base {
            Base::Leaf(i) => self.leaves[i].1,
            Base::Buf(b) => self.lens[b],
            Base::Out(k) => self.outs[k].1,
            Base::Dyn(k) => self.dyns[k].get().1,
        };
        assert!(
            s.off + s.len <= cap,
            "compiled program: span {s:?} outside its base of {cap} elements"
        );
        // SAFETY: the caller's plan keeps `off` inside the base.
        unsafe { self.base_ptr(s.base).add(s.off) }
    }

    unsafe fn slice<'s>(&self, s: &Span) -> &'s [f32] {
        if s.len == 0 {
            return &[];
        }
        // SAFETY: as `ptr`, and the span is inside its base.
        unsafe { std::slice::from_raw_parts(self.ptr(s), s.len) }
    }

    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut<'s>(&self, s: &Span) -> &'s mut [f32] {
        if s.len == 0 {
            return &mut [];
        }
        // SAFETY: as `slice`; no other live reference covers an output span.
        unsafe { std::slice::from_raw_parts_mut(self.ptr(s), s.len) }
    }
}

/// Copies the strided view `loc` into `dst` (row-major).
unsafe fn gather_into(ctx: &Ctx, loc: &Loc, dst: &mut [f32]) {
    let n = loc.numel();
    if n == 0 {
        return;
    }
    // SAFETY: the view lies inside its base.
    let base = unsafe { ctx.base_ptr(loc.base).add(loc.off) } as *const f32;
    let nd = loc.shape.len();
    if nd == 0 {
        dst[0] = unsafe { *base };
        return;
    }
    let inner = loc.shape[nd - 1];
    let is = loc.strides[nd - 1];
    let mut idx = vec![0usize; nd];
    let mut w = 0;
    while w < n {
        let off: usize = idx.iter().zip(&loc.strides).map(|(i, s)| i * s).sum();
        let row = &mut dst[w..w + inner];
        if is == 1 {
            // SAFETY: the row lies inside the view.
            row.copy_from_slice(unsafe { std::slice::from_raw_parts(base.add(off), inner) });
        } else {
            for (j, r) in row.iter_mut().enumerate() {
                *r = unsafe { *base.add(off + j * is) };
            }
        }
        w += inner;
        for d in (0..nd - 1).rev() {
            idx[d] += 1;
            if idx[d] < loc.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// Copies the strided view `src` into the strided view `dst` (same shape,
/// not overlapping).
unsafe fn copy_view(ctx: &Ctx, src: &Loc, dst: &Loc) {
    let n = src.numel();
    if n == 0 {
        return;
    }
    // SAFETY: both views lie inside their bases (checked at build time).
    let sb = unsafe { ctx.base_ptr(src.base).add(src.off) } as *const f32;
    let db = unsafe { ctx.base_ptr(dst.base).add(dst.off) };
    let nd = src.shape.len();
    if nd == 0 {
        unsafe { *db = *sb };
        return;
    }
    let inner = src.shape[nd - 1];
    let (ss, ds) = (src.strides[nd - 1], dst.strides[nd - 1]);
    let mut idx = vec![0usize; nd];
    let mut w = 0;
    while w < n {
        let so: usize = idx.iter().zip(&src.strides).map(|(i, s)| i * s).sum();
        let d_o: usize = idx.iter().zip(&dst.strides).map(|(i, s)| i * s).sum();
        for j in 0..inner {
            unsafe { *db.add(d_o + j * ds) = *sb.add(so + j * ss) };
        }
        w += inner;
        for d in (0..nd - 1).rev() {
            idx[d] += 1;
            if idx[d] < src.shape[d] {
                break;
            }
            idx[d] = 0;
        }
    }
}

/// The body run under the leaves' read locks.
type LeafFn<'a, R> = dyn FnMut(&[(usize, usize)]) -> R + 'a;

/// Holds a read lock on every leaf while `f` runs on raw views of them
/// (null for leaves that are not contiguous f32: only fallback nodes read
/// those, as tensors).
fn with_leaf_slices<R>(ts: &[Tensor], ptrs: &mut Vec<(usize, usize)>, f: &mut LeafFn<'_, R>) -> R {
    match ts.split_first() {
        None => f(ptrs),
        Some((t, rest)) => {
            let mut f = Some(f);
            let mut ptrs_opt = Some(&mut *ptrs);
            let r = t.with_f32_contiguous(|s| {
                let p = ptrs_opt.take().expect("once");
                p.push((s.as_ptr() as usize, s.len()));
                with_leaf_slices(rest, p, f.take().expect("once"))
            });
            match r {
                Some(r) => r,
                None => {
                    ptrs.push((0, 0));
                    with_leaf_slices(rest, ptrs, f.take().expect("not used"))
                }
            }
        }
    }
}

/// A bare graph lowered to a compiled program (`Program`), run with user
/// inputs by index and parameters/buffers from a binding function: the
/// executor of compiled training's forward and backward graphs.
pub(crate) struct GraphExec {
    graph: Graph,
    program: Program,
    /// Keep the arena between calls (inference) or take one per call.
    keep_arena: bool,
    arena: parking_lot::Mutex<Vec<f32>>,
    /// User inputs that are arena values written by the paired program
    /// (`new_pair`), not tensors; their call arguments are ignored.
    pinned: HashSet<usize>,
}

/// Binds a bare graph's leaves: user inputs by index, parameters/buffers by
/// name, constants evaluated once.
fn bare_leaf(g: &Graph, n: NodeId) -> Result<LeafSrc> {
    Ok(match &g.node(n).op {
        Op::Input {
            kind: InputKind::User(i),
            ..
        } => LeafSrc::User(*i),
        Op::Input { kind, .. } => LeafSrc::State(kind.clone()),
        op => {
            let mut t = exec_node(op, &[], &[], &|k| {
                Err(Error::Binding(format!("a constant binds nothing ({k:?})")))
            })?;
            LeafSrc::Const(t.remove(0))
        }
    })
}

impl GraphExec {
    /// Two graphs run back to back over one arena (compiled training's
    /// forward and backward): output `o` of `first` for each `(o, i)` in
    /// `handoff` is user input `i` of `second`. Where that value lives in
    /// an arena buffer of `first`, it stays there (`first` returns an empty
    /// placeholder for it, `second` reads it in place and ignores its
    /// argument), and one liveness plan covers both programs' steps, so
    /// the second program's values reuse the space of handed-off values
    /// after their last reader. Run both with `run_in` on the same arena
    /// of `arena_len` elements, which the second program may overwrite.
    /// Returns the two programs.
    pub(crate) fn new_pair(
        mut first: Graph,
        mut second: Graph,
        handoff: &[(usize, usize)],
    ) -> Result<(GraphExec, GraphExec)> {
        let pm = kiln_ir::passes::PassManager::compile_pipeline();
        pm.run(&mut first)?;
        pm.run(&mut second)?;
        let keep: Vec<usize> = handoff.iter().map(|&(o, _)| o).collect();
        let plan1 = kiln_ir::plan_fusion(&first)?;
        let f = Program::lower(
            &first,
            &plan1,
            &|n| bare_leaf(&first, n),
            &keep,
            &HashMap::new(),
            &HashSet::new(),
        )?;
        let mut pinned = HashMap::new();
        let mut in_arena = Vec::new();
        for (&(o, i), k) in handoff.iter().zip(&f.kept) {
            if let Some((x, loc)) = k {
                pinned.insert(i, (f.program.buf_lens[*x], loc.clone()));
                in_arena.push((o, i, *x));
            }
        }
        let plan2 = kiln_ir::plan_fusion(&second)?;
        // The other handed-off values are taken by value and dropped after
        // their last reader.
        let consumed: HashSet<usize> = handoff
            .iter()
            .map(|&(_, i)| i)
            .filter(|i| !pinned.contains_key(i))
            .collect();
        let s = Program::lower(
            &second,
            &plan2,
            &|n| bare_leaf(&second, n),
            &[],
            &pinned,
            &consumed,
        )?;
        // One timeline: the first program's steps, then the second's.
        let n1 = f.program.steps.len();
        let shift = |t: usize| if t == usize::MAX { t } else { n1 + 1 + t };
        let nf = f.program.buf_lens.len();
        let mut lens = f.program.buf_lens.clone();
        let mut firsts = f.first.clone();
        let mut lasts: Vec<usize> = f.last.iter().map(|&l| l.min(n1)).collect();
        // Joint index of each second-program buffer.
        let mut joint = Vec::with_capacity(s.program.buf_lens.len());
        let pinned_of: HashMap<usize, usize> = in_arena
            .iter()
            .filter_map(|&(_, i, x)| Some((*s.pinned.get(&i)?, x)))
            .collect();
        for (b, &len) in s.program.buf_lens.iter().enumerate() {
            match pinned_of.get(&b) {
                Some(&x) => {
                    lasts[x] = lasts[x].max(shift(s.last[b]));
                    joint.push(x);
                }
                None => {
                    lens.push(len);
                    firsts.push(shift(s.first[b]));
                    lasts.push(shift(s.last[b]));
                    joint.push(lens.len() - 1);
                }
            }
        }
        let mut inplace = f.inplace.clone();
        inplace.extend(s.inplace.iter().map(|&(a, o)| (joint[a], joint[o])));
        let (offs, len) = {
            let a = plan_memory_inplace(&lens, &firsts, &lasts, &inplace);
            let b = plan_memory_by_size(&lens, &firsts, &lasts, &inplace);
            if b.1 < a.1 {
                b
            } else {
                a
            }
        };
        let mut p1 = f.program;
        let mut p2 = s.program;
        p1.set_plan(offs[..nf].to_vec(), len);
        p2.set_plan(joint.iter().map(|&j| offs[j]).collect(), len);
        let mut pinned_inputs: HashSet<usize> = in_arena.iter().map(|&(_, i, _)| i).collect();
        pinned_inputs.extend(consumed);
        let mk = |graph: Graph, program: Program, pinned: HashSet<usize>| GraphExec {
            graph,
            program,
            keep_arena: false,
            arena: parking_lot::Mutex::new(Vec::new()),
            pinned,
        };
        Ok((mk(first, p1, HashSet::new()), mk(second, p2, pinned_inputs)))
    }

    /// Nodes on the fallback path (`op: reason`).
    pub(crate) fn fallbacks(&self) -> &[String] {
        self.program.fallbacks()
    }

    /// Elements of the arena a call uses.
    pub(crate) fn arena_len(&self) -> usize {
        self.program.arena_len()
    }

    /// `run` in the caller's arena (at least `arena_len` elements; see
    /// `new_pair`). Inputs the program takes by value are dropped after
    /// their last reader (the caller keeps a clone to keep them).
    pub(crate) fn run_in(
        &self,
        mut inputs: Vec<Tensor>,
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
        arena: &mut [f32],
    ) -> Result<Vec<Tensor>> {
        let mut owned = vec![None; inputs.len()];
        for &(i, _) in &self.program.consumed {
            if let Some(t) = inputs.get_mut(i) {
                owned[i] = Some(std::mem::replace(
                    t,
                    Tensor::from_vec(Vec::<f32>::new(), &[0])?,
                ));
            }
        }
        self.run_arena(&inputs, bind, Some(arena), owned)
    }

    fn run_arena(
        &self,
        inputs: &[Tensor],
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
        given: Option<&mut [f32]>,
        owned: Vec<Option<Tensor>>,
    ) -> Result<Vec<Tensor>> {
        let leaves: Vec<Tensor> = self
            .program
            .leaves()
            .iter()
            .zip(self.program.leaf_nodes())
            .map(|(l, n)| {
                let t = match l {
                    LeafSrc::User(i) if self.pinned.contains(i) => {
                        return Tensor::from_vec(Vec::<f32>::new(), &[0]).map_err(Error::from)
                    }
                    LeafSrc::User(i) => inputs
                        .get(*i)
                        .cloned()
                        .ok_or_else(|| Error::Input(format!("graph input {i} missing")))?,
                    LeafSrc::State(k) => bind(k)?,
                    LeafSrc::Const(t) => t.clone(),
                };
                let want = &self.graph.node(*n).outputs[0];
                if !t.has_type(&want.shape, want.dtype) {
                    return Err(Error::Input(format!(
                        "graph input {:?}: expected {want}, got {}",
                        l,
                        crate::interpreter::tensor_type(&t)
                    )));
                }
                Ok(if t.dtype() == DType::F32 && !t.is_contiguous() {
                    t.contiguous()?
                } else {
                    t
                })
            })
            .collect::<Result<_>>()?;
        let no_call = |path: &str, _: &Tensor| -> Result<Tensor> {
            Err(Error::Input(format!(
                "module_call `{path}` in a bare graph (no live module)"
            )))
        };
        let mut ptrs = Vec::with_capacity(leaves.len());
        if let Some(arena) = given {
            if arena.len() < self.program.arena_len() {
                return Err(Error::Input(format!(
                    "compiled program: arena of {} elements, {} needed",
                    arena.len(),
                    self.program.arena_len()
                )));
            }
            return self.program.run_owned(
                &self.graph,
                &leaves,
                &mut ptrs,
                arena,
                inputs,
                bind,
                &no_call,
                owned,
            );
        }
        if !self.keep_arena {
            // A per-call arena (from the recycling cache), released when the
            // call ends: training keeps no memory between steps.
            let mut arena = kiln_cpu::buffers::alloc_uninit::<f32>(self.program.arena_len());
            let r = self.program.run(
                &self.graph,
                &leaves,
                &mut ptrs,
                &mut arena,
                inputs,
                bind,
                &no_call,
            );
            kiln_cpu::buffers::recycle(kiln_cpu::CpuStorage::F32(arena));
            return r;
        }
        let mut fresh;
        let mut guard = self.arena.try_lock();
        let arena: &mut Vec<f32> = match guard.as_deref_mut() {
            Some(a) => a,
            None => {
                fresh = vec![0f32; self.program.arena_len()];
                &mut fresh
            }
        };
        self.program.run(
            &self.graph,
            &leaves,
            &mut ptrs,
            arena,
            inputs,
            bind,
            &no_call,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_plan_reuses_dead_buffers() {
        // b0 written at 0, read at 1; b1 written at 1, read at 2; b2 at 2..3.
        let lens = [100, 100, 100];
        let first = [0, 1, 2];
        let last = [1, 2, 3];
        let (offs, top) = plan_memory(&lens, &first, &last);
        // b0 and b1 overlap in time; b2 may take b0's place.
        assert_ne!(offs[0], offs[1]);
        assert_eq!(offs[2], offs[0]);
        assert_eq!(top, 2 * 112);
    }

    #[test]
    fn size_ordered_plan_never_overlaps_live_buffers_and_honours_in_place_pairs() {
        // Deterministic pseudo-random buffers.
        let mut seed = 12345u64;
        let mut next = |m: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % m
        };
        let n = 60;
        let lens: Vec<usize> = (0..n).map(|_| 1 + next(500)).collect();
        let first: Vec<usize> = (0..n).map(|_| next(40)).collect();
        let last: Vec<usize> = first.iter().map(|&f| f + next(15)).collect();
        let (offs, top) = plan_memory_by_size(&lens, &first, &last, &[]);
        for a in 0..n {
            assert!(offs[a] + lens[a] <= top);
            for b in a + 1..n {
                let live = first[a] <= last[b] && first[b] <= last[a];
                let overlap = offs[a] < offs[b] + lens[b] && offs[b] < offs[a] + lens[a];
                assert!(!(live && overlap), "buffers {a} and {b} overlap while live");
            }
        }
        // b1 is written by the step that reads b0 last: same range; b2 is
        // live meanwhile elsewhere.
        let lens = [64, 64, 64];
        let (first, last) = ([0, 2, 0], [2, 4, 4]);
        let (offs, top) = plan_memory_by_size(&lens, &first, &last, &[(0, 1)]);
        assert_eq!(offs[0], offs[1]);
        assert_ne!(offs[0], offs[2]);
        assert_eq!(top, 128);
    }

    #[test]
    fn memory_plan_never_overlaps_live_buffers() {
        let lens = [10, 50, 20, 70, 5, 40];
        let first = [0, 0, 1, 2, 3, 3];
        let last = [2, 1, 4, 3, 5, 5];
        let (offs, _) = plan_memory(&lens, &first, &last);
        for a in 0..lens.len() {
            for b in a + 1..lens.len() {
                let live = first[a] <= last[b] && first[b] <= last[a];
                let overlap = offs[a] < offs[b] + lens[b] && offs[b] < offs[a] + lens[a];
                assert!(!(live && overlap), "buffers {a} and {b} overlap while live");
            }
        }
    }
}
