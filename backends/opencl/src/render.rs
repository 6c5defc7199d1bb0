//! Lowering of a graph's fusion plan to OpenCL C (no OpenCL library needed).
//!
//! Each kernel of `kiln_ir::plan_fusion` is split into *segments*: a head
//! (matmul/addmm, conv2d, a reduction, a pooling op, a view or a copy), or
//! none for a pure pointwise chain, followed by the pointwise nodes over the
//! head's output shape, fused as an epilogue into the head's OpenCL kernel
//! (bias, activation, residual add, eval BatchNorm affine). A plan kernel
//! holding conv + pool + epilogue becomes two OpenCL kernels (conv, then
//! pool with the epilogue) with the conv result in a device buffer.
//!
//! Every value lives in a device buffer with a static layout (offset and
//! strides, known at compile time): views (reshape of contiguous data,
//! permute, expand, slice, select, contiguous) are aliases and cost no
//! kernel; every kernel reads its operands through their layouts, with
//! broadcasting, so transposed weights feed the GEMM directly.
//!
//! Kernels:
//! * pointwise (a chain with no head): two variants.
//!   - `float4`: when the output has a multiple of 4 elements (at least 4),
//!     every value of the chain is f32, no op is `sign`/`where` (or a
//!     comparison, whose value is bool), and every operand read in full (as
//!     many distinct elements as the output) is contiguous at an offset that
//!     is a multiple of 4: one work item per 4 consecutive elements
//!     `i .. i + 3`, `float4` arithmetic (vector `?:` and built-ins, float4
//!     versions of the sigmoid/gelu helpers), `vstore4` of every
//!     materialized value. Operand loads: `vload4` when the 4 elements are
//!     consecutive in memory (a contiguous operand, or a broadcast operand
//!     whose innermost stride-1 run is a multiple of 4, e.g. a bias over
//!     the last dim), one scalar load splat to `float4` when they are the
//!     same element (a broadcast operand whose innermost stride-0 run is a
//!     multiple of 4, e.g. a per-row scale or a per-channel BatchNorm
//!     parameter over H*W % 4 == 0), else a gather of 4 scalar loads with
//!     per-element index math;
//!   - scalar, for every other chain: one work item per element, scalar
//!     loads and stores through each operand's layout (f32, i64 and bool
//!     values; exp, tanh, erf, sigmoid, gelu through OpenCL's built-ins).
//!
//!   Pointwise epilogues fused after a head (GEMM, reduction, pooling) stay
//!   scalar: the GEMM's register block stores columns `wx` apart, not 4
//!   consecutive ones. `Caps::vector_pointwise` (device: set
//!   `KILN_OPENCL_SCALAR=1` to turn it off) selects the scalar variant
//!   everywhere, for comparisons. Kept because it is not slower on PoCL
//!   and 3x faster on pointwise chains (numbers at `Lowering::pointwise`);
//! * GEMM (matmul, addmm, conv2d as implicit GEMM, batched over matmul batch
//!   dims or conv groups): a `TM x TN` output tile per work group, `TK`-deep
//!   slices of A and B staged in local memory, an `RT x RT` register block
//!   per work item; tile sizes chosen from the device's work-group limit;
//!   bias and the epilogue applied at the store;
//! * reductions (sum, mean, max, min, prod, var, softmax, log_softmax,
//!   layer_norm, training batch_norm with its running-stat updates): one
//!   work group per output row, tree reduction in local memory;
//! * pooling (max/avg 2-D, PyTorch's padding, dilation, ceil_mode and
//!   divisor rules): one work item per output element, epilogue fused;
//! * copies: materialization of a view that cannot alias, cat, stack,
//!   index_select (constant index, bounds checked at compile time).
//!
//! Work-group sizes, per kernel and device: GEMM tiles from
//! `CL_DEVICE_MAX_WORK_GROUP_SIZE` (16x16 items with 4x4 blocks from 256,
//! 8x8 from 64, else 4x4 with 2x2); reductions the row length rounded up to
//! a power of two, at most 256 and the device limit; kernels with one work
//! item per element or per `float4` (pointwise, pooling, copies) per
//! [`item_work_group`]: a power of two, at most 256 and the device limit,
//! at most the items per compute unit (`CL_DEVICE_MAX_COMPUTE_UNITS`, so
//! every unit gets a group) but at least 64 where there are that many.
//! `CL_DEVICE_PREFERRED_VECTOR_WIDTH_FLOAT` is not used to pick the
//! pointwise variant (PoCL on AVX-512 reports 16; GPUs often report 1
//! while still favouring 16-byte accesses); the float4 variant has only
//! been measured on PoCL.
//!
//! Ops without a device kernel (f64/f16/bf16 values, conv_transpose2d,
//! arg/max/min with indices, training dropout with 0 < p < 1, index_select
//! with a computed index, 1-D matmul operands) become `Step::Host` steps:
//! the runtime runs that node on the CPU explicitly and the reason names
//! the op (`Program::fallbacks`).
//!
//! A `module_call` node (a submodule with hooks, traced with live hooks)
//! becomes a `Step::Call`: the runtime downloads its operand, calls the
//! live submodule on the host (hooks and forward as eager) and uploads the
//! result; it is not a fallback.

use crate::OclError;
use kiln_ir::op::result_type;
use kiln_ir::{
    contiguous_strides, numel, BinaryOp, DType, Graph, InputKind, KernelKind, NodeId, Op, OpClass,
    ReduceOp, TensorType, UnaryOp, Value,
};
use std::collections::{HashMap, HashSet};
use std::fmt::Write;

/// What the lowering needs to know about the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caps {
    /// `CL_DEVICE_MAX_WORK_GROUP_SIZE`.
    pub max_work_group: usize,
    /// `CL_DEVICE_LOCAL_MEM_SIZE` in bytes.
    pub local_mem: usize,
    /// `CL_DEVICE_MAX_COMPUTE_UNITS` (work-group size of one-item-per-element
    /// kernels, see [`item_work_group`]).
    pub compute_units: usize,
    /// Whether pointwise kernels may take the `float4` path (see the module
    /// docs); on by default, off to compare against the scalar kernels.
    pub vector_pointwise: bool,
}

impl Default for Caps {
    fn default() -> Caps {
        Caps {
            max_work_group: 256,
            local_mem: 32 * 1024,
            compute_units: 1,
            vector_pointwise: true,
        }
    }
}

/// Where a value's elements are: buffer, element offset, element strides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub buf: usize,
    pub offset: usize,
    pub strides: Vec<usize>,
}

/// What fills a device buffer.
#[derive(Clone, Debug, PartialEq)]
pub enum BufRole {
    /// Graph input (user input, parameter or buffer): written by the runtime.
    Input(InputKind),
    /// A graph constant, uploaded once when the program is loaded.
    Constant(Vec<f64>),
    /// Written by a kernel or a host step.
    Intermediate,
}

#[derive(Clone, Debug, PartialEq)]
pub struct BufSpec {
    pub dtype: DType,
    pub numel: usize,
    pub role: BufRole,
}

impl BufSpec {
    /// Bytes on the device (at least one element: OpenCL has no empty buffers).
    pub fn bytes(&self) -> usize {
        self.numel.max(1) * elem_size(self.dtype)
    }
}

/// Bytes per element on the device (bool as one byte).
pub fn elem_size(d: DType) -> usize {
    match d {
        DType::Bool => 1,
        d => d.size(),
    }
}

/// One kernel launch.
#[derive(Clone, Debug, PartialEq)]
pub struct Launch {
    /// Kernel name in the program.
    pub name: String,
    /// Buffers bound to the kernel's arguments, in order.
    pub args: Vec<usize>,
    pub global: Vec<usize>,
    pub local: Vec<usize>,
    /// Op names of the nodes it computes, e.g. `conv2d+relu`.
    pub ops: String,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Launch(Launch),
    /// The node runs on the host; `reason` names the op.
    Host {
        node: NodeId,
        reason: String,
    },
    /// A `module_call` node: the runtime calls the live submodule at `path`
    /// on the host (its pre-hooks, forward and forward hooks, as eager).
    Call {
        node: NodeId,
        path: String,
    },
}

/// A graph lowered for one device: buffers, layouts and the steps in order.
#[derive(Clone, Debug)]
pub struct Program {
    pub bufs: Vec<BufSpec>,
    pub layouts: HashMap<Value, Layout>,
    pub steps: Vec<Step>,
    /// One OpenCL C program holding every kernel.
    pub source: String,
}

impl Program {
    /// Why each host step is not on the device.
    pub fn fallbacks(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Host { reason, .. } => Some(reason.clone()),
                _ => None,
            })
            .collect()
    }

    /// The submodule paths of the `module_call` steps, in order.
    pub fn module_calls(&self) -> Vec<String> {
        self.steps
            .iter()
            .filter_map(|s| match s {
                Step::Call { path, .. } => Some(path.clone()),
                _ => None,
            })
            .collect()
    }

    /// Number of kernel launches per run.
    pub fn launch_count(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Launch(_)))
            .count()
    }

    /// The buffer of a graph input.
    pub fn input_buf(&self, g: &Graph, kind: &InputKind) -> Option<usize> {
        let n = g.find_input(kind)?;
        self.layouts.get(&Value::new(n, 0)).map(|l| l.buf)
    }
}

fn ctype(d: DType) -> Result<&'static str, String> {
    match d {
        DType::F32 => Ok("float"),
        DType::I64 => Ok("long"),
        DType::Bool => Ok("uchar"),
        d => Err(format!("{} values have no device kernel", d.short_name())),
    }
}

/// A C literal of `v` in dtype `d`.
fn lit(v: f64, d: DType) -> String {
    match d {
        DType::F32 => {
            let f = v as f32;
            if f.is_nan() {
                "NAN".into()
            } else if f.is_infinite() {
                if f > 0.0 { "INFINITY" } else { "(-INFINITY)" }.into()
            } else {
                format!("{:e}f", f)
            }
        }
        DType::I64 => format!("{}L", v as i64),
        _ => format!("{}", (v != 0.0) as u8),
    }
}

fn is_contiguous(shape: &[usize], strides: &[usize]) -> bool {
    let c = contiguous_strides(shape);
    shape
        .iter()
        .zip(strides.iter().zip(&c))
        .all(|(&s, (&a, &b))| s <= 1 || a == b)
}

/// C expression of the element offset of flat index `ivar` (row-major over
/// `shape`) for a tensor with these strides and offset.
pub fn index_expr(shape: &[usize], strides: &[usize], offset: usize, ivar: &str) -> String {
    if numel(shape) <= 1 || strides.iter().zip(shape).all(|(&s, &d)| s == 0 || d == 1) {
        return offset.to_string();
    }
    if is_contiguous(shape, strides) {
        return if offset == 0 {
            ivar.to_string()
        } else {
            format!("({ivar} + {offset})")
        };
    }
    let mut terms = Vec::new();
    let first = shape.iter().position(|&d| d != 1).unwrap_or(0);
    for d in 0..shape.len() {
        if shape[d] == 1 || strides[d] == 0 {
            continue;
        }
        let inner: usize = shape[d + 1..].iter().product();
        let q = if inner == 1 {
            ivar.to_string()
        } else {
            format!("({ivar} / {inner})")
        };
        let c = if d == first {
            q
        } else {
            format!("({q} % {})", shape[d])
        };
        terms.push(if strides[d] == 1 {
            c
        } else {
            format!("{c} * {}", strides[d])
        });
    }
    if offset != 0 {
        terms.push(offset.to_string());
    }
    format!("({})", terms.join(" + "))
}

/// Strides of a value of shape `vshape`/`vstrides` broadcast (right-aligned)
/// over `shape`.
fn broadcast_strides(shape: &[usize], vshape: &[usize], vstrides: &[usize]) -> Vec<usize> {
    let r = shape.len();
    let k = vshape.len();
    (0..r)
        .map(|d| {
            if d + k < r {
                0
            } else {
                let sd = d + k - r;
                if vshape[sd] == 1 {
                    0
                } else {
                    vstrides[sd]
                }
            }
        })
        .collect()
}

/// For a value read through `strides` over `shape` (row-major): the number
/// of trailing elements that are consecutive in memory (stride-1 run), and
/// the number of trailing elements that are the same element (stride 0).
fn inner_runs(shape: &[usize], strides: &[usize]) -> (usize, usize) {
    let dims = || (0..shape.len()).rev().filter(|&d| shape[d] != 1);
    let mut run = 1;
    for d in dims() {
        if strides[d] != run {
            break;
        }
        run *= shape[d];
    }
    let mut same = 1;
    for d in dims() {
        if strides[d] != 0 {
            break;
        }
        same *= shape[d];
    }
    (run, same)
}

/// A segment: an optional head followed by pointwise nodes over `shape`.
#[derive(Clone, Debug)]
struct Segment {
    head: Option<NodeId>,
    epi: Vec<NodeId>,
    shape: Vec<usize>,
    host: Option<String>,
    kind: KernelKind,
}

impl Segment {
    fn nodes(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.head.iter().copied().chain(self.epi.iter().copied())
    }
}

fn unsupported(g: &Graph, n: NodeId, why: impl Into<String>) -> String {
    format!("opencl backend: op {} {}", g.node(n).op.name(), why.into())
}

/// Why node `n` has no device kernel, if it has none.
fn check_node(g: &Graph, n: NodeId) -> Option<String> {
    let node = g.node(n);
    if let Op::ModuleCall { path, .. } = &node.op {
        return Some(format!(
            "opencl backend: module_call `{path}` runs the hooked submodule on the host"
        ));
    }
    for t in node.outputs.iter().chain(g.operand_types(n).iter()) {
        if let Err(e) = ctype(t.dtype) {
            return Some(unsupported(
                g,
                n,
                format!("on {}: {e}", t.dtype.short_name()),
            ));
        }
    }
    let ops = g.operand_types(n);
    let all_f32 = || {
        ops.iter()
            .chain(node.outputs.iter())
            .all(|t| t.dtype == DType::F32)
    };
    match &node.op {
        Op::Dropout { p, .. } if *p != 0.0 && *p != 1.0 => Some(unsupported(
            g,
            n,
            "in training mode: the mask comes from the host generator",
        )),
        Op::BatchNorm {
            training: false,
            has_running_stats: false,
            ..
        } => Some(unsupported(g, n, "in eval mode without running stats")),
        Op::BatchNorm { .. }
        | Op::LayerNorm { .. }
        | Op::Softmax { .. }
        | Op::LogSoftmax { .. }
            if !all_f32() =>
        {
            Some(unsupported(g, n, "on non-f32 values"))
        }
        Op::BatchNorm { .. } if ops[0].rank() < 2 => {
            Some(unsupported(g, n, "on an input of rank < 2"))
        }
        Op::Reduce { .. } | Op::Var { .. } if !all_f32() => {
            Some(unsupported(g, n, "on non-f32 values"))
        }
        Op::MatMul if ops[0].rank() < 2 || ops[1].rank() < 2 => {
            Some(unsupported(g, n, "on a 1-D operand"))
        }
        Op::MatMul
        | Op::Addmm
        | Op::Conv2d { .. }
        | Op::MaxPool2d { .. }
        | Op::AvgPool2d { .. }
            if !all_f32() =>
        {
            Some(unsupported(g, n, "on non-f32 values"))
        }
        Op::ConvTranspose2d { .. }
        | Op::ArgMax { .. }
        | Op::ArgMin { .. }
        | Op::MaxDim { .. }
        | Op::MinDim { .. } => Some(unsupported(g, n, "has no device kernel")),
        Op::IndexSelect { .. } => {
            let idx = g.operands(n)[1];
            match &g.node(idx.node).op {
                Op::Constant { data, .. } => {
                    let size = ops[0].shape.get(index_dim(&node.op)).copied().unwrap_or(1);
                    if data.iter().any(|&i| i < 0.0 || i as usize >= size) {
                        Some(unsupported(g, n, "with an index out of range"))
                    } else {
                        None
                    }
                }
                _ => Some(unsupported(
                    g,
                    n,
                    "with a computed index (bounds are checked on the host)",
                )),
            }
        }
        Op::Cat { .. } | Op::Stack { .. }
            if ops.iter().any(|t| t.dtype != node.outputs[0].dtype) =>
        {
            Some(unsupported(g, n, "with operands of mixed dtypes"))
        }
        // Training's backward ops (kiln_ir::autodiff), the pooling that saves
        // its argmax, dropout masks: explicit host steps.
        op if op.class() != OpClass::Pointwise && !heads_a_kernel(op) => {
            Some(unsupported(g, n, "has no device kernel"))
        }
        _ => None,
    }
}

/// Ops that `Renderer::segment` renders at the head of a kernel.
fn heads_a_kernel(op: &Op) -> bool {
    matches!(
        op,
        Op::MatMul
            | Op::Addmm
            | Op::Conv2d { .. }
            | Op::MaxPool2d { .. }
            | Op::AvgPool2d { .. }
            | Op::Reduce { .. }
            | Op::Var { .. }
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::LayerNorm { .. }
            | Op::BatchNorm { .. }
            | Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. }
            | Op::Select { .. }
            | Op::Contiguous
            | Op::Cat { .. }
            | Op::Stack { .. }
            | Op::IndexSelect { .. }
    )
}

fn index_dim(op: &Op) -> usize {
    match op {
        Op::IndexSelect { dim } => *dim,
        _ => 0,
    }
}

/// Splits the plan's kernels into segments (see the module docs).
fn segments(g: &Graph) -> Result<Vec<Segment>, OclError> {
    let plan = kiln_ir::plan_fusion(g).map_err(|e| OclError::new("kernel", e.to_string()))?;
    let mut out = Vec::new();
    for k in &plan.kernels {
        let mut cur: Option<Segment> = None;
        for &n in &k.nodes {
            let node = g.node(n);
            let class = node.op.class();
            let reason = check_node(g, n);
            if reason.is_none() && class == OpClass::Pointwise {
                if let Some(s) = cur.as_mut() {
                    let joinable = s.host.is_none()
                        && !matches!(s.kind, KernelKind::View | KernelKind::Copy)
                        && node.outputs[0].shape == s.shape
                        && node.outputs.len() == 1
                        && g.operands(n).iter().all(|v| {
                            let inside = s.nodes().any(|m| m == v.node);
                            !inside || v.output == 0
                        });
                    if joinable {
                        s.epi.push(n);
                        continue;
                    }
                }
            }
            if let Some(s) = cur.take() {
                out.push(s);
            }
            let shape = node.outputs[0].shape.clone();
            let kind = match class {
                OpClass::Pointwise => KernelKind::Pointwise,
                OpClass::Reduction => KernelKind::Reduction,
                OpClass::Contraction => KernelKind::Contraction,
                OpClass::Pool => KernelKind::Pool,
                OpClass::View => KernelKind::View,
                _ => KernelKind::Copy,
            };
            let seg = if class == OpClass::Pointwise && reason.is_none() {
                Segment {
                    head: None,
                    epi: vec![n],
                    shape,
                    host: None,
                    kind,
                }
            } else {
                Segment {
                    head: Some(n),
                    epi: vec![],
                    shape,
                    host: reason,
                    kind,
                }
            };
            if seg.host.is_some() {
                out.push(seg);
            } else {
                cur = Some(seg);
            }
        }
        if let Some(s) = cur.take() {
            out.push(s);
        }
    }
    Ok(out)
}

/// Lowers `g` for a device with `caps`.
pub fn lower(g: &Graph, caps: &Caps) -> Result<Program, OclError> {
    let segs = segments(g)?;
    let mut seg_of: HashMap<NodeId, usize> = HashMap::new();
    for (i, s) in segs.iter().enumerate() {
        for n in s.nodes() {
            seg_of.insert(n, i);
        }
    }
    // Values that must live in memory.
    let mut mat: HashSet<Value> = HashSet::new();
    for (i, s) in segs.iter().enumerate() {
        for n in s.nodes() {
            for o in 0..g.node(n).outputs.len() {
                let v = Value::new(n, o);
                let outside = g.users(v).iter().any(|(u, _)| seg_of.get(u) != Some(&i));
                if outside || g.is_graph_output(v) || s.host.is_some() {
                    mat.insert(v);
                }
            }
        }
    }
    let mut lw = Lowering {
        g,
        caps: *caps,
        bufs: Vec::new(),
        layouts: HashMap::new(),
        steps: Vec::new(),
        source: String::from(PRELUDE),
        mat,
        kcount: 0,
    };
    for &n in g.inputs() {
        let ty = &g.node(n).outputs[0];
        let Op::Input { kind, .. } = &g.node(n).op else {
            continue;
        };
        lw.new_buf(Value::new(n, 0), ty, BufRole::Input(kind.clone()));
    }
    for n in g
        .topo_order()
        .map_err(|e| OclError::new("kernel", e.to_string()))?
    {
        if let Op::Constant { ty, data } = &g.node(n).op {
            lw.new_buf(Value::new(n, 0), ty, BufRole::Constant(data.clone()));
        }
    }
    for s in &segs {
        lw.segment(s)?;
    }
    Ok(Program {
        bufs: lw.bufs,
        layouts: lw.layouts,
        steps: lw.steps,
        source: lw.source,
    })
}

const PRELUDE: &str = "// kiln OpenCL program\n\
inline float kiln_sigmoid(float x) { return 1.0f / (1.0f + exp(-x)); }\n\
inline float kiln_gelu(float x) { return 0.5f * x * (1.0f + erf(x * 0.70710678118654752f)); }\n\
inline float kiln_gelu_tanh(float x) { return 0.5f * x * (1.0f + tanh(0.79788456080286536f * (x + 0.044715f * x * x * x))); }\n\
inline float4 kiln_sigmoid4(float4 x) { return 1.0f / (1.0f + exp(-x)); }\n\
inline float4 kiln_gelu4(float4 x) { return 0.5f * x * (1.0f + erf(x * 0.70710678118654752f)); }\n\
inline float4 kiln_gelu_tanh4(float4 x) { return 0.5f * x * (1.0f + tanh(0.79788456080286536f * (x + 0.044715f * x * x * x))); }\n";

struct Lowering<'a> {
    g: &'a Graph,
    caps: Caps,
    bufs: Vec<BufSpec>,
    layouts: HashMap<Value, Layout>,
    steps: Vec<Step>,
    source: String,
    mat: HashSet<Value>,
    kcount: usize,
}

/// Arguments and code of one kernel being rendered.
struct KernelText {
    /// (buffer, C type, written)
    args: Vec<(usize, &'static str, bool)>,
    body: String,
    /// Registers holding values (epilogue).
    regs: HashMap<Value, String>,
    /// Loads already emitted in the current scope: (buf, index) -> register.
    loads: HashMap<(usize, String), String>,
    tmp: usize,
    /// `float4` mode: every register holds the 4 elements `i .. i + 3`.
    vec: bool,
}

impl KernelText {
    fn new() -> KernelText {
        KernelText {
            args: Vec::new(),
            body: String::new(),
            regs: HashMap::new(),
            loads: HashMap::new(),
            tmp: 0,
            vec: false,
        }
    }

    /// The argument name of buffer `buf`.
    fn arg(&mut self, buf: usize, ct: &'static str, write: bool) -> String {
        if let Some(i) = self.args.iter().position(|a| a.0 == buf) {
            if write {
                self.args[i].2 = true;
            }
            return format!("a{i}");
        }
        self.args.push((buf, ct, write));
        format!("a{}", self.args.len() - 1)
    }

    fn fresh(&mut self, p: &str) -> String {
        self.tmp += 1;
        format!("{p}{}", self.tmp)
    }

    fn signature(&self, name: &str, attr: &str) -> String {
        let params: Vec<String> = self
            .args
            .iter()
            .enumerate()
            .map(|(i, (_, ct, w))| {
                if *w {
                    format!("__global {ct}* a{i}")
                } else {
                    format!("__global const {ct}* a{i}")
                }
            })
            .collect();
        format!("__kernel {attr}void {name}({})", params.join(", "))
    }
}

fn wg_pow2(max: usize, want: usize) -> usize {
    let mut w = 1;
    while w * 2 <= max.min(want.max(1)) {
        w *= 2;
    }
    w
}

/// Work-group size of a kernel with one work item per element (or per
/// `float4`) over `items` work items: the largest power of two that is at
/// most 256 and the device's `CL_DEVICE_MAX_WORK_GROUP_SIZE`, and at most
/// `items / compute units` so that every compute unit gets a work group,
/// but not below 64 (two warps, one wavefront) unless there are fewer
/// items than that.
pub fn item_work_group(caps: &Caps, items: usize) -> usize {
    let per_cu = items.div_ceil(caps.compute_units.max(1));
    wg_pow2(caps.max_work_group, 256.min(per_cu.max(64)).min(items))
}

impl<'a> Lowering<'a> {
    fn new_buf(&mut self, v: Value, ty: &TensorType, role: BufRole) -> usize {
        self.bufs.push(BufSpec {
            dtype: ty.dtype,
            numel: ty.numel(),
            role,
        });
        let b = self.bufs.len() - 1;
        self.layouts.insert(
            v,
            Layout {
                buf: b,
                offset: 0,
                strides: contiguous_strides(&ty.shape),
            },
        );
        b
    }

    fn ty(&self, v: Value) -> &'a TensorType {
        self.g.value_type(v)
    }

    fn layout(&self, v: Value) -> Result<&Layout, OclError> {
        self.layouts.get(&v).ok_or_else(|| {
            OclError::new(
                self.g.node(v.node).op.name(),
                format!(
                    "internal: value of op {} is not in device memory",
                    self.g.node(v.node).op.name()
                ),
            )
        })
    }

    fn ops_name(&self, s: &Segment) -> String {
        s.nodes()
            .map(|n| self.g.node(n).op.name())
            .collect::<Vec<_>>()
            .join("+")
    }

    fn push_kernel(
        &mut self,
        kt: KernelText,
        attr: &str,
        global: Vec<usize>,
        local: Vec<usize>,
        ops: String,
    ) {
        let name = format!("k{}", self.kcount);
        self.kcount += 1;
        let _ = writeln!(
            self.source,
            "\n// {ops}\n{} {{\n{}}}",
            kt.signature(&name, attr),
            kt.body
        );
        let global = global
            .iter()
            .zip(&local)
            .map(|(&g, &l)| g.div_ceil(l).max(1) * l)
            .collect();
        self.steps.push(Step::Launch(Launch {
            name,
            args: kt.args.iter().map(|a| a.0).collect(),
            global,
            local,
            ops,
        }));
    }

    fn segment(&mut self, s: &Segment) -> Result<(), OclError> {
        let g = self.g;
        if let Some(reason) = &s.host {
            let n = s.head.expect("host segments have a head");
            for o in 0..g.node(n).outputs.len() {
                let v = Value::new(n, o);
                let ty = self.ty(v).clone();
                self.new_buf(v, &ty, BufRole::Intermediate);
            }
            self.steps.push(match &g.node(n).op {
                Op::ModuleCall { path, .. } => Step::Call {
                    node: n,
                    path: path.clone(),
                },
                _ => Step::Host {
                    node: n,
                    reason: reason.clone(),
                },
            });
            return Ok(());
        }
        // Buffers of the values this segment writes.
        for n in s.nodes() {
            if matches!(g.node(n).op.class(), OpClass::View) {
                continue;
            }
            for o in 0..g.node(n).outputs.len() {
                let v = Value::new(n, o);
                if self.mat.contains(&v) {
                    let ty = self.ty(v).clone();
                    self.new_buf(v, &ty, BufRole::Intermediate);
                }
            }
        }
        let ops = self.ops_name(s);
        let Some(h) = s.head else {
            return self.pointwise(s, ops);
        };
        match &g.node(h).op {
            Op::MatMul | Op::Addmm | Op::Conv2d { .. } => self.gemm(s, h, ops),
            Op::MaxPool2d { .. } | Op::AvgPool2d { .. } => self.pool(s, h, ops),
            Op::Reduce { .. }
            | Op::Var { .. }
            | Op::Softmax { .. }
            | Op::LogSoftmax { .. }
            | Op::LayerNorm { .. }
            | Op::BatchNorm { .. } => self.reduction(s, h, ops),
            Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::Expand { .. }
            | Op::Slice { .. }
            | Op::Select { .. }
            | Op::Contiguous => self.view(h),
            Op::Cat { .. } | Op::Stack { .. } => self.cat(h, ops),
            Op::IndexSelect { .. } => self.index_select(h, ops),
            op => Err(OclError::new(
                op.name(),
                format!("opencl backend: op {} cannot head a kernel", op.name()),
            )),
        }
    }

    /// Load expression of value `v` at flat index `ivar` of `shape`
    /// (broadcast right-aligned; `channel` maps a 1-D operand to dim 1).
    fn load(
        &self,
        kt: &mut KernelText,
        v: Value,
        shape: &[usize],
        ivar: &str,
        channel: bool,
    ) -> Result<String, OclError> {
        if let Some(r) = kt.regs.get(&v) {
            return Ok(r.clone());
        }
        let ty = self.ty(v);
        let l = self.layout(v)?.clone();
        let ct = ctype(ty.dtype).map_err(|e| OclError::new("kernel", e))?;
        let (vshape, vstrides) = if channel && shape.len() >= 2 {
            let mut vs = vec![1; shape.len()];
            let mut st = vec![0; shape.len()];
            vs[1] = ty.numel();
            st[1] = *l.strides.first().unwrap_or(&1);
            (vs, st)
        } else {
            (ty.shape.clone(), l.strides.clone())
        };
        let strides = broadcast_strides(shape, &vshape, &vstrides);
        let idx = index_expr(shape, &strides, l.offset, ivar);
        if let Some(r) = kt.loads.get(&(l.buf, idx.clone())) {
            return Ok(r.clone());
        }
        let a = kt.arg(l.buf, ct, false);
        let r = kt.fresh("t");
        if kt.vec {
            // Elements i .. i + 3 (i a multiple of 4): one vload4 when they
            // are consecutive in memory, one load splat when they are the
            // same element, else a gather of four scalar loads.
            let (run, bcast) = inner_runs(shape, &strides);
            let e = if run.is_multiple_of(4) {
                format!("vload4(0, {a} + {idx})")
            } else if bcast.is_multiple_of(4) {
                format!("(float4)({a}[{idx}])")
            } else {
                let g: Vec<String> = (0..4)
                    .map(|k| {
                        let iv = format!("({ivar} + {k})");
                        format!("{a}[{}]", index_expr(shape, &strides, l.offset, &iv))
                    })
                    .collect();
                format!("(float4)({})", g.join(", "))
            };
            let _ = writeln!(kt.body, "    float4 {r} = {e};");
        } else {
            let _ = writeln!(kt.body, "    {ct} {r} = {a}[{idx}];");
        }
        kt.loads.insert((l.buf, idx), r.clone());
        Ok(r)
    }

    /// Code computing the epilogue nodes of `s` at flat index `ivar` and
    /// storing every materialized value (the head's output 0 is in `head`).
    fn epilogue(
        &self,
        kt: &mut KernelText,
        s: &Segment,
        ivar: &str,
        head: Option<(Value, String)>,
    ) -> Result<(), OclError> {
        kt.loads.clear();
        kt.regs.clear();
        if let Some((v, r)) = &head {
            kt.regs.insert(*v, r.clone());
            self.store(kt, *v, r, ivar)?;
        }
        for &n in &s.epi {
            let r = self.pointwise_node(kt, n, &s.shape, ivar)?;
            let v = Value::new(n, 0);
            kt.regs.insert(v, r.clone());
            self.store(kt, v, &r, ivar)?;
        }
        Ok(())
    }

    fn store(&self, kt: &mut KernelText, v: Value, r: &str, ivar: &str) -> Result<(), OclError> {
        if self.mat.contains(&v) {
            let l = self.layout(v)?.clone();
            let ct = ctype(self.ty(v).dtype).map_err(|e| OclError::new("kernel", e))?;
            let a = kt.arg(l.buf, ct, true);
            if kt.vec {
                let _ = writeln!(kt.body, "    vstore4({r}, 0, {a} + {ivar});");
            } else {
                let _ = writeln!(kt.body, "    {a}[{ivar}] = {r};");
            }
        }
        Ok(())
    }

    /// Emits one pointwise node; returns the register holding its value.
    fn pointwise_node(
        &self,
        kt: &mut KernelText,
        n: NodeId,
        shape: &[usize],
        ivar: &str,
    ) -> Result<String, OclError> {
        let g = self.g;
        let node = g.node(n);
        let out = node.outputs[0].dtype;
        let oct = ctype(out).map_err(|e| OclError::new(node.op.name(), e))?;
        let oct = if kt.vec { "float4" } else { oct };
        // Vector mode: literals as float4 (a vector `?:` needs vector arms)
        // and the float4 versions of the prelude's helpers.
        let vec = kt.vec;
        let lit = |v: f64, d: DType| -> String {
            if vec {
                format!("(float4)({})", lit(v, d))
            } else {
                lit(v, d)
            }
        };
        let sfx = if vec { "4" } else { "" };
        let operands = g.operands(n);
        let mut x = Vec::new();
        for (k, v) in operands.iter().enumerate() {
            let channel = matches!(node.op, Op::BatchNorm { .. }) && k > 0;
            x.push(self.load(kt, *v, shape, ivar, channel)?);
        }
        let dt = |k: usize| g.value_type(operands[k]).dtype;
        let conv = |e: &str, from: DType, to: DType| -> String {
            if from == to {
                e.to_string()
            } else if to == DType::Bool {
                format!("(uchar)({e} != 0)")
            } else {
                format!("({})({e})", ctype(to).unwrap_or("float"))
            }
        };
        let is_f = out == DType::F32;
        let expr = match &node.op {
            Op::Unary(u) => {
                let a = conv(&x[0], dt(0), out);
                let l = |v: f64| lit(v, out);
                match *u {
                    UnaryOp::Neg => format!("-{a}"),
                    UnaryOp::Abs if is_f => format!("fabs({a})"),
                    UnaryOp::Abs => format!("({a} < 0 ? -{a} : {a})"),
                    UnaryOp::Exp => format!("exp({a})"),
                    UnaryOp::Log => format!("log({a})"),
                    UnaryOp::Sqrt => format!("sqrt({a})"),
                    UnaryOp::Rsqrt => format!("rsqrt({a})"),
                    UnaryOp::Sin => format!("sin({a})"),
                    UnaryOp::Cos => format!("cos({a})"),
                    UnaryOp::Tanh => format!("tanh({a})"),
                    UnaryOp::Sigmoid => format!("kiln_sigmoid{sfx}({a})"),
                    UnaryOp::Erf => format!("erf({a})"),
                    UnaryOp::GeluErf => format!("kiln_gelu{sfx}({a})"),
                    UnaryOp::GeluTanh => format!("kiln_gelu_tanh{sfx}({a})"),
                    UnaryOp::Relu => format!("({a} < 0 ? {} : {a})", l(0.0)),
                    UnaryOp::LeakyRelu(s) => format!("({a} > 0 ? {a} : {a} * {})", l(s)),
                    UnaryOp::Clamp(lo, hi) => {
                        let mut e = a.clone();
                        if let Some(lo) = lo {
                            e = format!("({e} < {0} ? {0} : {e})", l(lo));
                        }
                        if let Some(hi) = hi {
                            e = format!("({e} > {0} ? {0} : {e})", l(hi));
                        }
                        e
                    }
                    UnaryOp::PowScalar(2.0) => format!("({a} * {a})"),
                    UnaryOp::PowScalar(1.0) => a,
                    UnaryOp::PowScalar(p) if p == 0.5 && is_f => format!("sqrt({a})"),
                    UnaryOp::PowScalar(p) if is_f => format!("pow({a}, {})", l(p)),
                    UnaryOp::RPowScalar(s) if is_f => format!("pow({}, {a})", l(s)),
                    UnaryOp::AddScalar(s) => format!("({a} + {})", l(s)),
                    UnaryOp::MulScalar(s) => format!("({a} * {})", l(s)),
                    UnaryOp::RSubScalar(s) => format!("({} - {a})", l(s)),
                    UnaryOp::RDivScalar(s) => format!("({} / {a})", l(s)),
                    UnaryOp::Square => format!("({a} * {a})"),
                    UnaryOp::Reciprocal => format!("({} / {a})", l(1.0)),
                    UnaryOp::Sign => format!("({oct})(({a} > 0) - ({a} < 0))"),
                    UnaryOp::Step => format!("({a} > 0 ? {} : {})", l(1.0), l(0.0)),
                    u => {
                        return Err(OclError::new(
                            u.name(),
                            format!(
                                "opencl backend: op {} on {} not supported",
                                u.name(),
                                out.short_name()
                            ),
                        ))
                    }
                }
            }
            Op::Binary(b) => {
                let d = result_type(g.value_type(operands[0]), g.value_type(operands[1]));
                let a = conv(&x[0], dt(0), d);
                let c = conv(&x[1], dt(1), d);
                let fl = d == DType::F32;
                let e = match b {
                    BinaryOp::Add => format!("({a} + {c})"),
                    BinaryOp::Sub => format!("({a} - {c})"),
                    BinaryOp::Mul => format!("({a} * {c})"),
                    BinaryOp::Div => format!("({a} / {c})"),
                    BinaryOp::Pow if fl => format!("pow({a}, {c})"),
                    BinaryOp::Maximum if fl => {
                        format!("(isnan({a}) || {a} > {c} ? {a} : {c})")
                    }
                    BinaryOp::Minimum if fl => {
                        format!("(isnan({a}) || {a} < {c} ? {a} : {c})")
                    }
                    BinaryOp::Maximum => format!("({a} > {c} ? {a} : {c})"),
                    BinaryOp::Minimum => format!("({a} < {c} ? {a} : {c})"),
                    BinaryOp::Eq => format!("(uchar)({a} == {c})"),
                    BinaryOp::Ne => format!("(uchar)({a} != {c})"),
                    BinaryOp::Lt => format!("(uchar)({a} < {c})"),
                    BinaryOp::Le => format!("(uchar)({a} <= {c})"),
                    BinaryOp::Gt => format!("(uchar)({a} > {c})"),
                    BinaryOp::Ge => format!("(uchar)({a} >= {c})"),
                    b => {
                        return Err(OclError::new(
                            b.name(),
                            format!(
                                "opencl backend: op {} on {} not supported",
                                b.name(),
                                d.short_name()
                            ),
                        ))
                    }
                };
                let rd = if b.is_comparison() { DType::Bool } else { d };
                conv(&e, rd, out)
            }
            Op::Where => format!(
                "({} ? {} : {})",
                x[0],
                conv(&x[1], dt(1), out),
                conv(&x[2], dt(2), out)
            ),
            Op::Cast(_) => conv(&x[0], dt(0), out),
            Op::Dropout { p, .. } => {
                if *p == 0.0 {
                    x[0].clone()
                } else {
                    lit(0.0, out)
                }
            }
            Op::BatchNorm {
                eps,
                has_weight,
                has_bias,
                ..
            } => {
                let mut k = 1;
                let w = has_weight.then(|| {
                    k += 1;
                    x[k - 1].clone()
                });
                let b = has_bias.then(|| {
                    k += 1;
                    x[k - 1].clone()
                });
                let (rm, rv) = (&x[k], &x[k + 1]);
                let mut e = format!("(({} - {rm}) * rsqrt({rv} + {}))", x[0], lit(*eps, out));
                if let Some(w) = w {
                    e = format!("({e} * {w})");
                }
                if let Some(b) = b {
                    e = format!("({e} + {b})");
                }
                e
            }
            op => {
                return Err(OclError::new(
                    op.name(),
                    format!("opencl backend: op {} is not pointwise", op.name()),
                ))
            }
        };
        let r = kt.fresh("v");
        let _ = writeln!(kt.body, "    {oct} {r} = {expr};");
        Ok(r)
    }

    /// A pointwise chain with no head: the `float4` variant when
    /// [`Self::vectorizable`], else the scalar one (see the module docs).
    ///
    /// `kiln bench --backend opencl --min-time 2`, PoCL 3.1 (LLVM 15) on 2 shared
    /// Skylake-AVX512 cores (preferred float vector width 16, 2 compute
    /// units), median ms, two interleaved rounds in one session; "before" is
    /// the scalar-only renderer, "scalar" this one with
    /// `KILN_OPENCL_SCALAR=1` (new work-group rule, no float4):
    ///
    /// | model, shape                        | before        | float4        | scalar        |
    /// |-------------------------------------|---------------|---------------|---------------|
    /// | pointwise_chain [64, 1024]          | 3.19 / 3.20   | 0.91 / 0.62   | 3.08 / 3.02   |
    /// | pointwise_chain [4096, 1024]        | 212.2 / 201.8 | 66.4 / 65.3   | 218.4 / 200.7 |
    /// | simple_net [64, 784]                | 4.05 / 3.91   | 4.15 / 4.00   | 4.18 / 4.05   |
    /// | simple_net [4096, 784]              | 268.6 / 259.2 | 262.5 / 259.6 | 259.7 / 255.9 |
    /// | transformer_block [2, 16, 256]      | 15.9 / 15.5   | 15.7 / 15.4   | 16.0 / 14.3   |
    /// | transformer_block [8, 128, 256]     | 291.7 / 284.3 | 275.3 / 278.5 | 298.1 / 280.5 |
    ///
    /// simple_net is two GEMMs with fused epilogues (no pointwise kernel);
    /// transformer_block's time is in its GEMMs and row reductions.
    fn pointwise(&mut self, s: &Segment, ops: String) -> Result<(), OclError> {
        let n = numel(&s.shape);
        let mut kt = KernelText::new();
        kt.vec = self.caps.vector_pointwise && self.vectorizable(s)?;
        let items = if kt.vec { n / 4 } else { n };
        if kt.vec {
            let _ = writeln!(
                kt.body,
                "    int q = get_global_id(0);\n    if (q >= {items}) return;\n    int i = q * 4;"
            );
        } else {
            kt.body.push_str("    int i = get_global_id(0);\n");
            let _ = writeln!(kt.body, "    if (i >= {n}) return;");
        }
        self.epilogue(&mut kt, s, "i", None)?;
        if !kt.args.iter().any(|a| a.2) || n == 0 {
            return Ok(());
        }
        let wg = item_work_group(&self.caps, items);
        self.push_kernel(kt, "", vec![items], vec![wg], ops);
        Ok(())
    }

    /// Whether pointwise segment `s` takes the `float4` path: at least 4
    /// elements, a multiple of 4; every value (operands and results) f32;
    /// every operand read in full (as many distinct elements as the
    /// output) contiguous at an offset that is a multiple of 4; no op whose vector
    /// form differs (sign; comparisons and where, which hold bool values).
    fn vectorizable(&self, s: &Segment) -> Result<bool, OclError> {
        let g = self.g;
        let n = numel(&s.shape);
        if s.head.is_some() || n < 4 || !n.is_multiple_of(4) {
            return Ok(false);
        }
        for &m in &s.epi {
            let node = g.node(m);
            if node.outputs.iter().any(|t| t.dtype != DType::F32) {
                return Ok(false);
            }
            match &node.op {
                Op::Unary(UnaryOp::Sign) | Op::Where => return Ok(false),
                Op::Unary(_) | Op::Binary(_) | Op::Cast(_) | Op::Dropout { .. } => {}
                Op::BatchNorm { .. } => {}
                _ => return Ok(false),
            }
            for v in g.operands(m) {
                let t = self.ty(v);
                if t.dtype != DType::F32 {
                    return Ok(false);
                }
                if s.epi.contains(&v.node) || t.numel() != n {
                    continue;
                }
                let l = self.layout(v)?;
                let st = broadcast_strides(&s.shape, &t.shape, &l.strides);
                // An expanded view (a stride 0) is a broadcast operand.
                let full = s.shape.iter().zip(&st).all(|(&d, &x)| d == 1 || x != 0);
                if full && (!is_contiguous(&s.shape, &st) || !l.offset.is_multiple_of(4)) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Tiled GEMM: matmul (batched), addmm, conv2d as implicit GEMM.
    fn gemm(&mut self, s: &Segment, h: NodeId, ops: String) -> Result<(), OclError> {
        let g = self.g;
        let node = g.node(h);
        let opv = g.operands(h);
        let out_ty = &node.outputs[0];
        let hv = Value::new(h, 0);
        let mut kt = KernelText::new();
        // Tile shape from the device's work-group limit.
        let (wx, rt) = if self.caps.max_work_group >= 256 {
            (16, 4)
        } else if self.caps.max_work_group >= 64 {
            (8, 4)
        } else {
            (4, 2)
        };
        let (tm, tk) = (wx * rt, 16);
        let tn = tm;
        // A(b, m, k), B(b, k, n) as C expressions; the store's flat index.
        let (batch, m, nn, k, load_a, load_b, out_idx, bias): (
            usize,
            usize,
            usize,
            usize,
            String,
            String,
            String,
            Option<String>,
        );
        match &node.op {
            Op::MatMul | Op::Addmm => {
                let (av, bv) = if matches!(node.op, Op::Addmm) {
                    (opv[1], opv[2])
                } else {
                    (opv[0], opv[1])
                };
                let (ta, tb) = (self.ty(av), self.ty(bv));
                let (la, lb) = (self.layout(av)?.clone(), self.layout(bv)?.clone());
                let r = out_ty.rank();
                m = out_ty.shape[r - 2];
                nn = out_ty.shape[r - 1];
                k = ta.shape[ta.rank() - 1];
                let bshape = &out_ty.shape[..r - 2];
                batch = numel(bshape);
                let ra = ta.rank();
                let rb = tb.rank();
                let sa = broadcast_strides(bshape, &ta.shape[..ra - 2], &la.strides[..ra - 2]);
                let sb = broadcast_strides(bshape, &tb.shape[..rb - 2], &lb.strides[..rb - 2]);
                let aa = kt.arg(la.buf, "float", false);
                let ab = kt.arg(lb.buf, "float", false);
                load_a = format!(
                    "{aa}[{} + m * {} + k * {}]",
                    index_expr(bshape, &sa, la.offset, "b"),
                    la.strides[ra - 2],
                    la.strides[ra - 1]
                );
                load_b = format!(
                    "{ab}[{} + k * {} + n * {}]",
                    index_expr(bshape, &sb, lb.offset, "b"),
                    lb.strides[rb - 2],
                    lb.strides[rb - 1]
                );
                out_idx = format!("((b * {m} + m) * {nn} + n)");
                bias = None;
            }
            Op::Conv2d {
                stride,
                padding,
                dilation,
                groups,
            } => {
                let (tx, tw) = (self.ty(opv[0]), self.ty(opv[1]));
                let (lx, lwt) = (self.layout(opv[0])?.clone(), self.layout(opv[1])?.clone());
                let (c, hh, ww) = (tx.shape[1], tx.shape[2], tx.shape[3]);
                let (o, cg, kh, kw) = (tw.shape[0], tw.shape[1], tw.shape[2], tw.shape[3]);
                let (oh, ow) = (out_ty.shape[2], out_ty.shape[3]);
                let og = o / groups;
                let _ = c;
                batch = *groups;
                m = out_ty.shape[0] * oh * ow;
                nn = og;
                k = cg * kh * kw;
                let ax = kt.arg(lx.buf, "float", false);
                let aw = kt.arg(lwt.buf, "float", false);
                let sx = &lx.strides;
                // Implicit im2col: m -> (n, oh, ow), k -> (c, ky, kx).
                let helper = format!(
                    "inline float kiln_conv_a{h}(__global const float* x, int b, int m, int k) {{\n\
                     \x20   int n_ = m / {ohw}, p = m % {ohw}, oh = p / {ow}, ow = p % {ow};\n\
                     \x20   int c = b * {cg} + k / {khw}, r = k % {khw}, ky = r / {kw}, kx = r % {kw};\n\
                     \x20   int ih = oh * {sh} - {ph} + ky * {dh}, iw = ow * {sw} - {pw} + kx * {dw};\n\
                     \x20   if (ih < 0 || ih >= {hh} || iw < 0 || iw >= {ww}) return 0.0f;\n\
                     \x20   return x[{off} + n_ * {s0} + c * {s1} + ih * {s2} + iw * {s3}];\n}}\n",
                    h = h.index(),
                    ohw = oh * ow,
                    khw = kh * kw,
                    sh = stride[0],
                    sw = stride[1],
                    ph = padding[0],
                    pw = padding[1],
                    dh = dilation[0],
                    dw = dilation[1],
                    off = lx.offset,
                    s0 = sx[0],
                    s1 = sx[1],
                    s2 = sx[2],
                    s3 = sx[3],
                );
                self.source.push_str(&helper);
                load_a = format!("kiln_conv_a{}({ax}, b, m, k)", h.index());
                let wk = index_expr(&tw.shape[1..], &lwt.strides[1..], lwt.offset, "k");
                load_b = format!("{aw}[(b * {og} + n) * {} + {wk}]", lwt.strides[0]);
                out_idx = format!(
                    "((m / {ohw}) * {o} + b * {og} + n) * {ohw} + m % {ohw}",
                    ohw = oh * ow
                );
                bias = if opv.len() > 2 {
                    let lb = self.layout(opv[2])?.clone();
                    let ab = kt.arg(lb.buf, "float", false);
                    Some(format!(
                        " + {ab}[{} + (b * {og} + n) * {}]",
                        lb.offset, lb.strides[0]
                    ))
                } else {
                    None
                };
            }
            _ => unreachable!("gemm is called for contractions only"),
        }
        let _ = write!(
            kt.body,
            "    const int tx = get_local_id(0), ty = get_local_id(1), tid = ty * {wx} + tx;\n\
             \x20   const int n0 = get_group_id(0) * {tn}, m0 = get_group_id(1) * {tm}, b = get_group_id(2);\n\
             \x20   __local float As[{tk}][{tm}];\n\
             \x20   __local float Bs[{tk}][{tn}];\n\
             \x20   float acc[{rt}][{rt}];\n\
             \x20   for (int r = 0; r < {rt}; r++) for (int c = 0; c < {rt}; c++) acc[r][c] = 0.0f;\n\
             \x20   for (int k0 = 0; k0 < {k}; k0 += {tk}) {{\n\
             \x20       for (int l = tid; l < {tm} * {tk}; l += {nt}) {{\n\
             \x20           int mm = l / {tk}, kk = l % {tk}, m = m0 + mm, k = k0 + kk;\n\
             \x20           As[kk][mm] = (m < {m} && k < {k}) ? {load_a} : 0.0f;\n\
             \x20       }}\n\
             \x20       for (int l = tid; l < {tk} * {tn}; l += {nt}) {{\n\
             \x20           int kk = l / {tn}, nn = l % {tn}, n = n0 + nn, k = k0 + kk;\n\
             \x20           Bs[kk][nn] = (n < {nn} && k < {k}) ? {load_b} : 0.0f;\n\
             \x20       }}\n\
             \x20       barrier(CLK_LOCAL_MEM_FENCE);\n\
             \x20       for (int kk = 0; kk < {tk}; kk++) {{\n\
             \x20           float ar[{rt}], br[{rt}];\n\
             \x20           for (int r = 0; r < {rt}; r++) ar[r] = As[kk][ty + r * {wx}];\n\
             \x20           for (int c = 0; c < {rt}; c++) br[c] = Bs[kk][tx + c * {wx}];\n\
             \x20           for (int r = 0; r < {rt}; r++) for (int c = 0; c < {rt}; c++) acc[r][c] = fma(ar[r], br[c], acc[r][c]);\n\
             \x20       }}\n\
             \x20       barrier(CLK_LOCAL_MEM_FENCE);\n\
             \x20   }}\n\
             \x20   for (int r = 0; r < {rt}; r++) for (int c = 0; c < {rt}; c++) {{\n\
             \x20       int m = m0 + ty + r * {wx}, n = n0 + tx + c * {wx};\n\
             \x20       if (m >= {m} || n >= {nn}) continue;\n\
             \x20       int i = {out_idx};\n",
            nt = wx * wx,
        );
        // Addmm's bias is read at the output index (broadcast over [M, N]).
        let head_expr = match (&node.op, bias) {
            (Op::Addmm, _) => {
                kt.loads.clear();
                let bv = self.load(&mut kt, opv[0], &out_ty.shape, "i", false)?;
                format!("acc[r][c] + {bv}")
            }
            (_, Some(b)) => format!("acc[r][c]{b}"),
            _ => "acc[r][c]".to_string(),
        };
        let _ = writeln!(kt.body, "    float hv = {head_expr};");
        self.epilogue(&mut kt, s, "i", Some((hv, "hv".into())))?;
        kt.body.push_str("    }\n");
        let attr = format!("__attribute__((reqd_work_group_size({wx}, {wx}, 1))) ");
        self.push_kernel(
            kt,
            &attr,
            vec![nn.div_ceil(tn) * wx, m.div_ceil(tm) * wx, batch.max(1)],
            vec![wx, wx, 1],
            ops,
        );
        Ok(())
    }

    fn pool(&mut self, s: &Segment, h: NodeId, ops: String) -> Result<(), OclError> {
        let g = self.g;
        let node = g.node(h);
        let xv = g.operands(h)[0];
        let tx = self.ty(xv);
        let lx = self.layout(xv)?.clone();
        let out = &node.outputs[0].shape;
        let (hh, ww) = (tx.shape[2], tx.shape[3]);
        let (oh, ow) = (out[2], out[3]);
        let total = numel(out);
        let mut kt = KernelText::new();
        let ax = kt.arg(lx.buf, "float", false);
        let st = &lx.strides;
        let _ = write!(
            kt.body,
            "    int i = get_global_id(0);\n    if (i >= {total}) return;\n\
             \x20   int ox = i % {ow}, oy = (i / {ow}) % {oh}, nc = i / {ohw};\n\
             \x20   int c = nc % {c}, n = nc / {c};\n\
             \x20   __global const float* xp = {ax} + {off} + n * {s0} + c * {s1};\n",
            ohw = oh * ow,
            c = tx.shape[1],
            off = lx.offset,
            s0 = st[0],
            s1 = st[1],
        );
        match &node.op {
            Op::MaxPool2d {
                kernel,
                stride,
                padding,
                dilation,
                ..
            } => {
                let _ = write!(
                    kt.body,
                    "    float hv = -INFINITY;\n\
                     \x20   for (int ky = 0; ky < {kh}; ky++) {{\n\
                     \x20       int y = oy * {sh} - {ph} + ky * {dh};\n\
                     \x20       if (y < 0 || y >= {hh}) continue;\n\
                     \x20       for (int kx = 0; kx < {kw}; kx++) {{\n\
                     \x20           int x = ox * {sw} - {pw} + kx * {dw};\n\
                     \x20           if (x < 0 || x >= {ww}) continue;\n\
                     \x20           float v = xp[y * {s2} + x * {s3}];\n\
                     \x20           if (v > hv || isnan(v)) hv = v;\n\
                     \x20       }}\n\
                     \x20   }}\n",
                    kh = kernel[0],
                    kw = kernel[1],
                    sh = stride[0],
                    sw = stride[1],
                    ph = padding[0],
                    pw = padding[1],
                    dh = dilation[0],
                    dw = dilation[1],
                    s2 = st[2],
                    s3 = st[3],
                );
            }
            Op::AvgPool2d {
                kernel,
                stride,
                padding,
                count_include_pad,
                divisor_override,
                ..
            } => {
                let div = match divisor_override {
                    Some(d) => format!("{}.0f", d),
                    None if *count_include_pad => "(float)((he - hs) * (we - ws))".into(),
                    None => "(float)((he2 - hs2) * (we2 - ws2))".into(),
                };
                let _ = write!(
                    kt.body,
                    "    int hs = oy * {sh} - {ph}, ws = ox * {sw} - {pw};\n\
                     \x20   int he = min(hs + {kh}, {hh} + {ph}), we = min(ws + {kw}, {ww} + {pw});\n\
                     \x20   int hs2 = max(hs, 0), ws2 = max(ws, 0), he2 = min(he, {hh}), we2 = min(we, {ww});\n\
                     \x20   float sum = 0.0f;\n\
                     \x20   for (int y = hs2; y < he2; y++) for (int x = ws2; x < we2; x++) sum += xp[y * {s2} + x * {s3}];\n\
                     \x20   float hv = sum / {div};\n",
                    kh = kernel[0],
                    kw = kernel[1],
                    sh = stride[0],
                    sw = stride[1],
                    ph = padding[0],
                    pw = padding[1],
                    s2 = st[2],
                    s3 = st[3],
                );
            }
            _ => unreachable!("pool is called for pooling ops only"),
        }
        self.epilogue(&mut kt, s, "i", Some((Value::new(h, 0), "hv".into())))?;
        let wg = item_work_group(&self.caps, total);
        self.push_kernel(kt, "", vec![total], vec![wg], ops);
        Ok(())
    }

    /// Reductions: one work group per output row.
    fn reduction(&mut self, s: &Segment, h: NodeId, ops: String) -> Result<(), OclError> {
        let g = self.g;
        let node = g.node(h);
        let opv = g.operands(h);
        let xv = opv[0];
        let tx = self.ty(xv);
        let lx = self.layout(xv)?.clone();
        let rank = tx.rank();
        let red: Vec<usize> = match &node.op {
            Op::Reduce { dims, .. } | Op::Var { dims, .. } => {
                let mut d = dims.clone();
                d.sort_unstable();
                d
            }
            Op::Softmax { dim } | Op::LogSoftmax { dim } => vec![*dim],
            Op::LayerNorm {
                normalized_shape, ..
            } => (rank - normalized_shape.len()..rank).collect(),
            Op::BatchNorm { .. } => (0..rank).filter(|&d| d != 1).collect(),
            _ => unreachable!("reduction is called for reductions only"),
        };
        let kept: Vec<usize> = (0..rank).filter(|d| !red.contains(d)).collect();
        let pick = |v: &[usize], ds: &[usize]| ds.iter().map(|&d| v[d]).collect::<Vec<_>>();
        let (kshape, rshape) = (pick(&tx.shape, &kept), pick(&tx.shape, &red));
        let rows = numel(&kshape);
        let len = numel(&rshape);
        let xr = index_expr(&kshape, &pick(&lx.strides, &kept), lx.offset, "r");
        let xj = index_expr(&rshape, &pick(&lx.strides, &red), 0, "j");
        let cs = contiguous_strides(&tx.shape);
        let or_ = index_expr(&kshape, &pick(&cs, &kept), 0, "r");
        let oj = index_expr(&rshape, &pick(&cs, &red), 0, "j");
        let wg = wg_pow2(self.caps.max_work_group, 256.min(len.next_power_of_two()));
        let mut kt = KernelText::new();
        let ax = kt.arg(lx.buf, "float", false);
        let _ = write!(
            kt.body,
            "    const int r = get_group_id(0), lid = get_local_id(0);\n\
             \x20   __local float red[{wg}];\n\
             \x20   __global const float* xr = {ax} + {xr};\n"
        );
        let reduce = |kt: &mut KernelText, init: &str, acc: &str, comb: &str, out: &str| {
            // `acc` accumulates element `x` (a C statement); `comb` merges
            // `a` and `b`.
            let _ = write!(
                kt.body,
                "    {{ float a = {init};\n\
                 \x20     for (int j = lid; j < {len}; j += {wg}) {{ float x = xr[{xj}]; {acc} }}\n\
                 \x20     red[lid] = a; barrier(CLK_LOCAL_MEM_FENCE);\n\
                 \x20     for (int s = {half}; s > 0; s >>= 1) {{ if (lid < s) {{ float a = red[lid], b = red[lid + s]; red[lid] = {comb}; }} barrier(CLK_LOCAL_MEM_FENCE); }}\n\
                 \x20     {out} = red[0]; barrier(CLK_LOCAL_MEM_FENCE); }}\n",
                half = wg / 2
            );
        };
        // The row's mean and sum of squared deviations (var, layer_norm,
        // training batch_norm), as two work-group reductions.
        let mean_and_ss = |kt: &mut KernelText| {
            kt.body.push_str("    float mean, ss;\n");
            reduce(kt, "0.0f", "a += x;", "a + b", "mean");
            let _ = writeln!(kt.body, "    mean = mean / {len}.0f;");
            reduce(kt, "0.0f", "a += (x - mean) * (x - mean);", "a + b", "ss");
        };
        let hv = Value::new(h, 0);
        match node.op.clone() {
            Op::Reduce { op, .. } => {
                kt.body.push_str("    float hv;\n");
                match op {
                    ReduceOp::Sum | ReduceOp::Mean => {
                        reduce(&mut kt, "0.0f", "a += x;", "a + b", "hv")
                    }
                    ReduceOp::Prod => reduce(&mut kt, "1.0f", "a *= x;", "a * b", "hv"),
                    ReduceOp::Max => reduce(
                        &mut kt,
                        "-INFINITY",
                        "if (x > a || isnan(x)) a = x;",
                        "(b > a || isnan(b)) ? b : a",
                        "hv",
                    ),
                    ReduceOp::Min => reduce(
                        &mut kt,
                        "INFINITY",
                        "if (x < a || isnan(x)) a = x;",
                        "(b < a || isnan(b)) ? b : a",
                        "hv",
                    ),
                }
                if op == ReduceOp::Mean {
                    let _ = writeln!(kt.body, "    hv = hv / {}.0f;", len);
                }
                kt.body.push_str("    if (lid == 0) {\n    int i = r;\n");
                self.epilogue(&mut kt, s, "i", Some((hv, "hv".into())))?;
                kt.body.push_str("    }\n");
            }
            Op::Var { correction, .. } => {
                mean_and_ss(&mut kt);
                let dof = (len as f64 - correction).max(0.0);
                let _ = writeln!(
                    kt.body,
                    "    float hv = ss / {};\n    if (lid == 0) {{\n    int i = r;",
                    lit(dof, DType::F32)
                );
                self.epilogue(&mut kt, s, "i", Some((hv, "hv".into())))?;
                kt.body.push_str("    }\n");
            }
            Op::Softmax { .. } | Op::LogSoftmax { .. } => {
                kt.body.push_str("    float mx, sum;\n");
                reduce(&mut kt, "-INFINITY", "a = fmax(a, x);", "fmax(a, b)", "mx");
                reduce(&mut kt, "0.0f", "a += exp(x - mx);", "a + b", "sum");
                let f = if matches!(node.op, Op::Softmax { .. }) {
                    "exp(xr[XJ] - mx) / sum"
                } else {
                    "xr[XJ] - mx - log(sum)"
                }
                .replace("XJ", &xj);
                let _ = writeln!(
                    kt.body,
                    "    for (int j = lid; j < {len}; j += {wg}) {{\n    int i = {or_} + {oj};\n    float hv = {f};"
                );
                self.epilogue(&mut kt, s, "i", Some((hv, "hv".into())))?;
                kt.body.push_str("    }\n");
            }
            Op::LayerNorm {
                eps,
                has_weight,
                has_bias,
                ..
            } => {
                mean_and_ss(&mut kt);
                let _ = writeln!(
                    kt.body,
                    "    float rstd = rsqrt(ss / {len}.0f + {});",
                    lit(eps, DType::F32)
                );
                let _ = writeln!(
                    kt.body,
                    "    for (int j = lid; j < {len}; j += {wg}) {{\n    int i = {or_} + {oj};\n    float hv = (xr[{xj}] - mean) * rstd;"
                );
                let mut k = 1;
                for present in [has_weight, has_bias] {
                    if present {
                        let l = self.layout(opv[k])?.clone();
                        let a = kt.arg(l.buf, "float", false);
                        let idx = index_expr(&rshape, &l.strides, l.offset, "j");
                        let op = if k == 1 && has_weight { "*" } else { "+" };
                        let _ = writeln!(kt.body, "    hv = hv {op} {a}[{idx}];");
                        k += 1;
                    }
                }
                self.epilogue(&mut kt, s, "i", Some((hv, "hv".into())))?;
                kt.body.push_str("    }\n");
            }
            Op::BatchNorm {
                momentum,
                eps,
                has_weight,
                has_bias,
                has_running_stats,
                ..
            } => {
                mean_and_ss(&mut kt);
                let _ = writeln!(
                    kt.body,
                    "    float var = ss / {len}.0f, rstd = rsqrt(var + {});",
                    lit(eps, DType::F32)
                );
                let mut k = 1;
                let mut param =
                    |kt: &mut KernelText, present: bool| -> Result<Option<String>, OclError> {
                        if !present {
                            return Ok(None);
                        }
                        let l = self.layout(opv[k])?.clone();
                        k += 1;
                        let a = kt.arg(l.buf, "float", false);
                        Ok(Some(format!("{a}[{} + r * {}]", l.offset, l.strides[0])))
                    };
                let w = param(&mut kt, has_weight)?;
                let b = param(&mut kt, has_bias)?;
                let rm = param(&mut kt, has_running_stats)?;
                let rv = param(&mut kt, has_running_stats)?;
                if let (Some(rm), Some(rv)) = (rm, rv) {
                    let unb = if len > 1 {
                        len as f64 / (len as f64 - 1.0)
                    } else {
                        f64::INFINITY
                    };
                    let mut st = String::new();
                    for (o, old, stat) in [
                        (1, rm, "mean"),
                        (2, rv, &*format!("var * {}", lit(unb, DType::F32))),
                    ] {
                        let v = Value::new(h, o);
                        if self.mat.contains(&v) {
                            let l = self.layout(v)?.clone();
                            let a = kt.arg(l.buf, "float", true);
                            let _ = writeln!(
                                st,
                                "        {a}[r] = {} * {old} + {} * ({stat});",
                                lit(1.0 - momentum, DType::F32),
                                lit(momentum, DType::F32)
                            );
                        }
                    }
                    let _ = write!(kt.body, "    if (lid == 0) {{\n{st}    }}\n");
                }
                let mut e = "(xr[XJ] - mean) * rstd".replace("XJ", &xj);
                if let Some(w) = w {
                    e = format!("{e} * {w}");
                }
                if let Some(b) = b {
                    e = format!("{e} + {b}");
                }
                let _ = writeln!(
                    kt.body,
                    "    for (int j = lid; j < {len}; j += {wg}) {{\n    int i = {or_} + {oj};\n    float hv = {e};"
                );
                self.epilogue(&mut kt, s, "i", Some((hv, "hv".into())))?;
                kt.body.push_str("    }\n");
            }
            _ => unreachable!(),
        }
        if rows == 0 {
            return Ok(());
        }
        self.push_kernel(kt, "", vec![rows * wg], vec![wg], ops);
        Ok(())
    }

    /// Views alias their operand's buffer when the layout allows it, else
    /// they are materialized by a strided copy.
    fn view(&mut self, h: NodeId) -> Result<(), OclError> {
        let g = self.g;
        let node = g.node(h);
        let xv = g.operands(h)[0];
        let tx = self.ty(xv);
        let l = self.layout(xv)?.clone();
        let out = &node.outputs[0];
        let hv = Value::new(h, 0);
        let alias: Option<Layout> = match &node.op {
            Op::Reshape { shape } => is_contiguous(&tx.shape, &l.strides).then(|| Layout {
                buf: l.buf,
                offset: l.offset,
                strides: contiguous_strides(shape),
            }),
            Op::Contiguous => is_contiguous(&tx.shape, &l.strides).then(|| l.clone()),
            Op::Permute { dims } => Some(Layout {
                buf: l.buf,
                offset: l.offset,
                strides: dims.iter().map(|&d| l.strides[d]).collect(),
            }),
            Op::Expand { shape } => Some(Layout {
                buf: l.buf,
                offset: l.offset,
                strides: broadcast_strides(shape, &tx.shape, &l.strides),
            }),
            Op::Slice {
                dim, start, step, ..
            } => {
                let mut st = l.strides.clone();
                st[*dim] *= step;
                Some(Layout {
                    buf: l.buf,
                    offset: l.offset + start * l.strides[*dim],
                    strides: st,
                })
            }
            Op::Select { dim, index } => {
                let mut st = l.strides.clone();
                st.remove(*dim);
                Some(Layout {
                    buf: l.buf,
                    offset: l.offset + index * l.strides[*dim],
                    strides: st,
                })
            }
            _ => None,
        };
        if let Some(a) = alias {
            self.layouts.insert(hv, a);
            return Ok(());
        }
        // A strided copy in logical (row-major) order.
        let b = self.new_buf(hv, out, BufRole::Intermediate);
        let n = out.numel();
        let ct = ctype(out.dtype).map_err(|e| OclError::new(node.op.name(), e))?;
        let mut kt = KernelText::new();
        let src = kt.arg(l.buf, ct, false);
        let dst = kt.arg(b, ct, true);
        let idx = index_expr(&tx.shape, &l.strides, l.offset, "i");
        let _ = write!(
            kt.body,
            "    int i = get_global_id(0);\n    if (i < {n}) {dst}[i] = {src}[{idx}];\n"
        );
        if n > 0 {
            let wg = item_work_group(&self.caps, n);
            self.push_kernel(kt, "", vec![n], vec![wg], node.op.name().into());
        }
        Ok(())
    }

    fn cat(&mut self, h: NodeId, ops: String) -> Result<(), OclError> {
        let g = self.g;
        let node = g.node(h);
        let out = &node.outputs[0];
        let hv = Value::new(h, 0);
        let dst_l = self.layout(hv)?.clone();
        let ct = ctype(out.dtype).map_err(|e| OclError::new(node.op.name(), e))?;
        let (dim, stack) = match &node.op {
            Op::Cat { dim } => (*dim, false),
            Op::Stack { dim } => (*dim, true),
            _ => unreachable!(),
        };
        let os = contiguous_strides(&out.shape);
        let mut at = 0usize;
        for v in g.operands(h) {
            let t = self.ty(v);
            let l = self.layout(v)?.clone();
            let (shape, strides) = if stack {
                let mut s = t.shape.clone();
                let mut st = l.strides.clone();
                s.insert(dim, 1);
                st.insert(dim, 0);
                (s, st)
            } else {
                (t.shape.clone(), l.strides.clone())
            };
            let n = numel(&shape);
            if n > 0 {
                let mut kt = KernelText::new();
                let src = kt.arg(l.buf, ct, false);
                let dst = kt.arg(dst_l.buf, ct, true);
                let si = index_expr(&shape, &strides, l.offset, "i");
                // Destination: the operand's coordinates in the output.
                let di = index_expr(&shape, &os, at * os[dim], "i");
                let _ = write!(
                    kt.body,
                    "    int i = get_global_id(0);\n    if (i < {n}) {dst}[{di}] = {src}[{si}];\n"
                );
                let wg = item_work_group(&self.caps, n);
                self.push_kernel(kt, "", vec![n], vec![wg], ops.clone());
            }
            at += shape[dim];
        }
        Ok(())
    }

    fn index_select(&mut self, h: NodeId, ops: String) -> Result<(), OclError> {
        let g = self.g;
        let node = g.node(h);
        let out = &node.outputs[0];
        let opv = g.operands(h);
        let (xv, iv) = (opv[0], opv[1]);
        let dim = index_dim(&node.op);
        let l = self.layout(xv)?.clone();
        let li = self.layout(iv)?.clone();
        let dst_l = self.layout(Value::new(h, 0))?.clone();
        let ct = ctype(out.dtype).map_err(|e| OclError::new(node.op.name(), e))?;
        let n = out.numel();
        if n == 0 {
            return Ok(());
        }
        let mut st = l.strides.clone();
        st[dim] = 0;
        let base = index_expr(&out.shape, &st, l.offset, "i");
        let inner: usize = out.shape[dim + 1..].iter().product();
        let mut kt = KernelText::new();
        let src = kt.arg(l.buf, ct, false);
        let ia = kt.arg(li.buf, "long", false);
        let dst = kt.arg(dst_l.buf, ct, true);
        let _ = write!(
            kt.body,
            "    int i = get_global_id(0);\n    if (i >= {n}) return;\n\
             \x20   int c = (i / {inner}) % {size};\n\
             \x20   {dst}[i] = {src}[{base} + (int){ia}[{io} + c * {is}] * {sd}];\n",
            size = out.shape[dim],
            io = li.offset,
            is = li.strides.first().copied().unwrap_or(1),
            sd = l.strides[dim],
        );
        let wg = item_work_group(&self.caps, n);
        self.push_kernel(kt, "", vec![n], vec![wg], ops);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_expressions() {
        assert_eq!(index_expr(&[2, 3], &[3, 1], 0, "i"), "i");
        assert_eq!(index_expr(&[2, 3], &[3, 1], 5, "i"), "(i + 5)");
        assert_eq!(index_expr(&[2, 3], &[0, 0], 7, "i"), "7");
        // Transposed [3,2] read as [2,3].
        assert_eq!(
            index_expr(&[2, 3], &[1, 2], 0, "i"),
            "((i / 3) + (i % 3) * 2)"
        );
        assert_eq!(broadcast_strides(&[4, 2, 3], &[3], &[1]), vec![0, 0, 1]);
        assert_eq!(
            broadcast_strides(&[4, 2, 3], &[2, 1], &[1, 1]),
            vec![0, 1, 0]
        );
    }

    #[test]
    fn inner_runs_and_work_groups() {
        // Contiguous; a row broadcast over [6, 32]; a column over [4, 8, 5].
        assert_eq!(inner_runs(&[6, 32], &[32, 1]), (192, 1));
        assert_eq!(inner_runs(&[6, 32], &[0, 1]), (32, 1));
        assert_eq!(inner_runs(&[6, 32], &[1, 0]), (1, 32));
        assert_eq!(inner_runs(&[4, 8, 5], &[0, 1, 0]), (1, 5));
        assert_eq!(inner_runs(&[4, 1, 5], &[5, 0, 1]), (20, 1));
        let cpu = Caps {
            max_work_group: 4096,
            compute_units: 2,
            ..Caps::default()
        };
        assert_eq!(item_work_group(&cpu, 1 << 20), 256);
        assert_eq!(item_work_group(&cpu, 200), 64);
        assert_eq!(item_work_group(&cpu, 20), 16);
        let gpu = Caps {
            max_work_group: 1024,
            compute_units: 132,
            ..Caps::default()
        };
        assert_eq!(item_work_group(&gpu, 132 * 128), 128);
        assert_eq!(item_work_group(&gpu, 1000), 64);
        let small = Caps {
            max_work_group: 32,
            ..Caps::default()
        };
        assert_eq!(item_work_group(&small, 1 << 20), 32);
    }

    fn chain(shape: &[usize], caps: &Caps) -> String {
        let mut g = Graph::new();
        let ty = TensorType::new(shape, DType::F32);
        let x = g.add_input(InputKind::User(0), ty.clone(), "").unwrap();
        let y = g.add_input(InputKind::User(1), ty, "").unwrap();
        let t = g.add1(Op::Binary(BinaryOp::Mul), &[x, y], "").unwrap();
        let t = g.add1(Op::Unary(UnaryOp::Sigmoid), &[t], "").unwrap();
        g.add_output(t, kiln_ir::OutputKind::User).unwrap();
        lower(&g, caps).unwrap().source
    }

    #[test]
    fn float4_pointwise_rendering() {
        let src = chain(&[8, 16], &Caps::default());
        assert!(src.contains("int i = q * 4;"), "{src}");
        assert!(src.contains("float4 t1 = vload4(0, a0 + i);"), "{src}");
        assert!(src.contains("kiln_sigmoid4("), "{src}");
        assert!(src.contains("vstore4("), "{src}");
        // Not a multiple of 4, or the vector path off: scalar.
        for (shape, vec) in [(&[3usize, 5][..], true), (&[8, 16][..], false)] {
            let caps = Caps {
                vector_pointwise: vec,
                ..Caps::default()
            };
            let src = chain(shape, &caps);
            assert!(!src.contains("vload4") && src.contains("float t1 = a0[i];"));
        }
    }

    #[test]
    fn literals() {
        assert_eq!(lit(1.5, DType::F32), "1.5e0f");
        assert_eq!(lit(f64::NEG_INFINITY, DType::F32), "(-INFINITY)");
        assert_eq!(lit(3.0, DType::I64), "3L");
    }
}
