//! kiln-cranelift: lowers the fused kernels of a fusion plan (from kiln-ir)
//! to Cranelift IR and JIT-compiles them into machine code, with f32x4 SIMD
//! loops, a scalar tail and parallel chunks (kiln-cpu's static pool). It depends on kiln-ir
//! and on kiln-cpu's `fastmath` tile routines (never on the frontend or the
//! runtime).
//!
//! Cranelift's x86-64 backend emits 128-bit vectors only. Where the CPU has
//! AVX-512F or AVX2+FMA, a kernel with transcendental ops (exp, sigmoid,
//! tanh, erf, gelu) runs in tiles of [`TILE`] elements: the cheap ops of
//! each step stay inline f32x4 code, values crossing steps sit in stack
//! tile buffers (L1), and each transcendental op is one call per tile to
//! kiln-cpu's AVX-512/AVX2 loop (`fastmath::tile_fn`, the polynomials the
//! inline code also uses, with fused multiply-adds; sqrt too):
//! pointwise_chain runs 3.1x faster on one thread
//! than all-inline (`examples/bench_pointwise.rs`). Ranges shorter than a
//! tile, and CPUs without AVX2, run the inline code.
//!
//! # API (pointwise kernels, f32)
//!
//! ```text
//! let k = PointwiseKernel::compile(&graph, &plan.kernels[i])?; // CompileError names the op
//! k.inputs();   // one KernelInput per external input: graph Value + InputAccess
//! k.outputs();  // graph Values written, each the full output shape, contiguous
//! k.run(&[x, scale, shift], &mut [&mut out])?; // Result<(), RunError>
//! ```
//!
//! * [`PointwiseKernel::compile`] takes a kernel of kind `Pointwise` (unary,
//!   binary, where, cast nodes over one output index space) and returns one
//!   machine-code function for it, or a [`CompileError`] naming the op it
//!   cannot lower (`cranelift backend: op erf on bf16 not supported`), so that
//!   the runtime can fall back to eager kernels explicitly.
//! * [`PointwiseKernel::inputs`] says how each external input is read:
//!   [`InputAccess::Contiguous`] (same number of elements as the output,
//!   row-major), [`InputAccess::Scalar`] (one element, e.g. a 0-d tensor), or
//!   [`InputAccess::Broadcast`] (element `(flat / inner) % size`: a trailing
//!   vector `[C]` over `[N, C]`, a per-channel `[1, C, 1, 1]` over
//!   `[N, C, H, W]`, any block of consecutive output dims).
//! * [`PointwiseKernel::run`] checks the slice lengths and runs the kernel,
//!   split across threads above [`PointwiseKernel::par_threshold`]
//!   elements (derived from the kernel's estimated cost and [`PAR_WORK`]).
//!
//! Supported ops (f32 values, bool masks from comparisons): add, sub, mul,
//! div, maximum, minimum, eq/ne/lt/le/gt/ge (feeding where or a cast), neg,
//! abs, relu, leaky_relu, sqrt, rsqrt, reciprocal, square, sign, step,
//! add/mul/rsub/rdiv scalar, pow_scalar with exponent 0.5, 1 or 2, clamp,
//! where, cast f32<->bool, and exp, sigmoid, tanh, erf, gelu (erf and tanh
//! forms) as inline polynomials ported from kiln-cpu's fastmath, with fused
//! multiply-add where the host has FMA (error bounds documented in
//! `codegen.rs` and tested on the JIT code with and without FMA). A call
//! allocates nothing; wrong slice counts or lengths give a [`RunError`].

mod codegen;

pub use codegen::TILE;

use codegen::KernelFn;
use cranelift_jit::JITModule;
use kiln_ir::{DType, Graph, Kernel, KernelKind, Value};
use std::fmt;

/// A kernel is split into chunks run in parallel (kiln-cpu's `par` pool) when
/// `elements * cost_per_element >= PAR_WORK` (cost units of ~0.12 ns, see
/// `codegen::cost_per_element`); [`PointwiseKernel::par_threshold`] gives
/// the resulting element count.
///
/// Measured with `examples/bench_pointwise.rs` on 2 cores (single thread
/// vs rayon, median ms): a lone relu (2.2 units/element) gains from the
/// second core only from ~512K elements (262144: 0.041 vs 0.082;
/// 524288: 0.139 vs 0.127), the pointwise_chain (~97 units) from ~4K
/// elements (2048: 0.023 vs 0.017-0.051, noisy; 4096: 0.046 vs 0.029;
/// 16384: 0.183 vs 0.097). Both cross over near 0.4-1.1M units (~50-130
/// us of single-thread work); 1M keeps the light kernels single-threaded
/// where rayon's fork/join noise dominates.
pub const PAR_WORK: usize = 1 << 20;

/// Why a kernel could not be compiled. `op` is the graph op's name (or
/// `kernel` for structural problems) so that a caller can fall back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CompileError {
    pub op: String,
    pub msg: String,
}

impl CompileError {
    fn new(op: &str, msg: String) -> CompileError {
        CompileError {
            op: op.to_string(),
            msg,
        }
    }
}

impl fmt::Display for CompileError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cranelift backend: {}", self.msg)
    }
}

impl std::error::Error for CompileError {}

/// Wrong arguments to [`PointwiseKernel::run`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunError(pub String);

impl fmt::Display for RunError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "cranelift pointwise kernel: {}", self.0)
    }
}

impl std::error::Error for RunError {}

/// How an external input is indexed by the flat output index `i`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InputAccess {
    /// `x[i]`: same element count as the output, row-major.
    Contiguous,
    /// `x[0]`: one element broadcast everywhere (0-d or all-ones shape).
    Scalar,
    /// `x[(i / inner) % size]`: the input's non-1 dims are the output dims
    /// `a..b`, `size` their product and `inner` the product of the dims
    /// after `b`.
    Broadcast { inner: usize, size: usize },
}

/// One external input of a compiled kernel.
#[derive(Clone, Debug, PartialEq)]
pub struct KernelInput {
    /// The graph value to pass.
    pub value: Value,
    /// Its element count (the slice length `run` expects).
    pub numel: usize,
    pub access: InputAccess,
}

/// Owns the JIT code memory; frees it on drop.
struct Code(Option<JITModule>);

// SAFETY: after `finalize_definitions` the module is never used again
// except to free its memory on drop; the code it holds is immutable.
unsafe impl Send for Code {}
// SAFETY: as above, no `&self` method touches the module.
unsafe impl Sync for Code {}

impl Drop for Code {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            // SAFETY: the function pointer into this memory lives in the same
            // `PointwiseKernel` and is dropped with it; no call is running
            // (`run` borrows the kernel).
            unsafe { m.free_memory() };
        }
    }
}

/// A pointwise kernel compiled to machine code.
pub struct PointwiseKernel {
    func: KernelFn,
    inputs: Vec<KernelInput>,
    outputs: Vec<Value>,
    shape: Vec<usize>,
    numel: usize,
    par_threshold: usize,
    /// Runs full tiles of [`TILE`] elements with tile calls for its
    /// transcendental ops (see `codegen::plan_tiles`).
    tiled: bool,
    _code: Code,
}

impl fmt::Debug for PointwiseKernel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PointwiseKernel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("shape", &self.shape)
            .finish()
    }
}

fn classify(s: &[usize], out: &[usize]) -> Option<InputAccess> {
    let n: usize = s.iter().product();
    if n == 1 {
        return Some(InputAccess::Scalar);
    }
    if out.contains(&0) {
        // Nothing is read: no index arithmetic (no modulo by 0).
        return Some(InputAccess::Contiguous);
    }
    if s.len() > out.len() {
        return None;
    }
    let mut p = vec![1usize; out.len() - s.len()];
    p.extend_from_slice(s);
    if p == out {
        return Some(InputAccess::Contiguous);
    }
    let nz: Vec<usize> = (0..p.len()).filter(|&d| p[d] != 1).collect();
    let (a, b) = (nz[0], nz[nz.len() - 1] + 1);
    if (a..b).any(|d| p[d] != out[d]) {
        return None;
    }
    Some(InputAccess::Broadcast {
        inner: out[b..].iter().product(),
        size: out[a..b].iter().product(),
    })
}

impl PointwiseKernel {
    /// Compiles a `Pointwise` kernel of `graph` (from `kiln_ir::plan_fusion`).
    pub fn compile(graph: &Graph, kernel: &Kernel) -> Result<PointwiseKernel, CompileError> {
        Self::compile_with(graph, kernel, true, true)
    }

    /// `compile`, choosing whether transcendental ops may run as tile calls
    /// (`tiles = true`, what `compile` does) or all inline on 4 lanes (for
    /// side-by-side measurements).
    pub fn compile_tiles(
        graph: &Graph,
        kernel: &Kernel,
        tiles: bool,
    ) -> Result<PointwiseKernel, CompileError> {
        Self::compile_with(graph, kernel, true, tiles)
    }

    /// `compile`, with fused multiply-add in polynomials only if `allow_fma`
    /// (and the host has it), and the tiled loop (transcendental ops as
    /// AVX-512/AVX2 tile calls) only if `allow_tiles` (and the host has one
    /// of them); tests cover every code path.
    pub(crate) fn compile_with(
        graph: &Graph,
        kernel: &Kernel,
        allow_fma: bool,
        allow_tiles: bool,
    ) -> Result<PointwiseKernel, CompileError> {
        if kernel.kind != KernelKind::Pointwise {
            return Err(CompileError::new(
                kernel.kind.name(),
                format!(
                    "{} kernels are not supported (pointwise only)",
                    kernel.kind.name()
                ),
            ));
        }
        let first = kernel
            .nodes
            .first()
            .ok_or_else(|| CompileError::new("kernel", "empty kernel".into()))?;
        let shape = graph.node(*first).outputs[0].shape.clone();
        let numel: usize = shape.iter().product();
        let mut inputs = Vec::new();
        for &v in &kernel.inputs {
            let ty = graph.value_type(v);
            let access = classify(&ty.shape, &shape).ok_or_else(|| {
                CompileError::new(
                    "kernel",
                    format!(
                        "input of shape {:?} broadcast to {:?} is not supported",
                        ty.shape, shape
                    ),
                )
            })?;
            inputs.push(KernelInput {
                value: v,
                numel: ty.numel(),
                access,
            });
        }
        for &n in &kernel.nodes {
            let node = graph.node(n);
            if node.outputs.len() != 1 {
                let name = node.op.name();
                return Err(CompileError::new(
                    name,
                    format!(
                        "op {name} with {} outputs not supported",
                        node.outputs.len()
                    ),
                ));
            }
            if node.outputs[0].shape != shape {
                return Err(CompileError::new(
                    node.op.name(),
                    format!(
                        "op {} with output shape {:?} in a kernel over {:?} is not supported",
                        node.op.name(),
                        node.outputs[0].shape,
                        shape
                    ),
                ));
            }
        }
        for &v in &kernel.outputs {
            let ty = graph.value_type(v);
            if ty.dtype != DType::F32 {
                let name = graph.node(v.node).op.name();
                return Err(CompileError::new(
                    name,
                    format!("op {name} on {} not supported", ty.dtype.short_name()),
                ));
            }
        }
        let (module, func, tiled) =
            codegen::compile(graph, kernel, &inputs, allow_fma, allow_tiles)?;
        Ok(PointwiseKernel {
            func,
            inputs,
            outputs: kernel.outputs.clone(),
            shape,
            numel,
            par_threshold: PAR_WORK.div_ceil(codegen::cost_per_element(graph, kernel, tiled)),
            tiled,
            _code: Code(Some(module)),
        })
    }

    /// External inputs in the order `run` takes them.
    pub fn inputs(&self) -> &[KernelInput] {
        &self.inputs
    }

    /// Values written, in the order `run` takes the output slices; each has
    /// the kernel's full shape, contiguous.
    pub fn outputs(&self) -> &[Value] {
        &self.outputs
    }

    /// Element count from which `run` splits the work across threads.
    pub fn par_threshold(&self) -> usize {
        self.par_threshold
    }

    /// Whether the kernel runs its transcendental ops as AVX-512/AVX2 tile
    /// calls on tiles of [`TILE`] elements (else all inline, f32x4).
    pub fn tiled(&self) -> bool {
        self.tiled
    }

    /// The output (index space) shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Runs the kernel. `inputs[j]` must hold `self.inputs()[j].numel`
    /// elements, each output `numel(shape)`.
    pub fn run(&self, inputs: &[&[f32]], outputs: &mut [&mut [f32]]) -> Result<(), RunError> {
        self.run_with_threshold(inputs, outputs, self.par_threshold)
    }

    /// As [`run`](Self::run) but on the calling thread only (for callers
    /// already inside a parallel task, and to measure [`PAR_WORK`]).
    pub fn run_single_thread(
        &self,
        inputs: &[&[f32]],
        outputs: &mut [&mut [f32]],
    ) -> Result<(), RunError> {
        self.run_with_threshold(inputs, outputs, usize::MAX)
    }

    /// As [`run`](Self::run), split across threads when the kernel
    /// has at least `threshold` elements (`run` uses [`Self::par_threshold`]).
    pub fn run_with_threshold(
        &self,
        inputs: &[&[f32]],
        outputs: &mut [&mut [f32]],
        threshold: usize,
    ) -> Result<(), RunError> {
        if inputs.len() != self.inputs.len() || outputs.len() != self.outputs.len() {
            return Err(RunError(format!(
                "expected {} inputs and {} outputs, got {} and {}",
                self.inputs.len(),
                self.outputs.len(),
                inputs.len(),
                outputs.len()
            )));
        }
        for (j, (x, d)) in inputs.iter().zip(&self.inputs).enumerate() {
            if x.len() != d.numel {
                return Err(RunError(format!(
                    "input {j} has {} elements, expected {}",
                    x.len(),
                    d.numel
                )));
            }
        }
        for (j, o) in outputs.iter().enumerate() {
            if o.len() != self.numel {
                return Err(RunError(format!(
                    "output {j} has {} elements, expected {}",
                    o.len(),
                    self.numel
                )));
            }
        }
        // Pointer tables on the stack for up to 16 operands: a call
        // allocates nothing (the runtime's steady state must not).
        let mut ins_a = [std::ptr::null::<f32>(); 16];
        let mut outs_a = [std::ptr::null_mut::<f32>(); 16];
        let (mut ins_v, mut outs_v) = (Vec::new(), Vec::new());
        let ins: &[*const f32] = if inputs.len() <= 16 {
            for (p, x) in ins_a.iter_mut().zip(inputs) {
                *p = x.as_ptr();
            }
            &ins_a[..inputs.len()]
        } else {
            ins_v.extend(inputs.iter().map(|x| x.as_ptr()));
            &ins_v
        };
        let n_out = outputs.len();
        let outs: &[*mut f32] = if n_out <= 16 {
            for (p, o) in outs_a.iter_mut().zip(outputs.iter_mut()) {
                *p = o.as_mut_ptr();
            }
            &outs_a[..n_out]
        } else {
            outs_v.extend(outputs.iter_mut().map(|o| o.as_mut_ptr()));
            &outs_v
        };
        // SAFETY: lengths checked above; safe references never alias.
        unsafe { self.run_ptrs(ins, outs, threshold) };
        Ok(())
    }

    /// Runs the kernel on raw pointers (the compiled runtime's arena), split
    /// across threads from `threshold` elements.
    ///
    /// # Safety
    /// `ins[j]` must be valid for reads of `self.inputs()[j].numel`
    /// elements and `outs[j]` for writes of `numel(shape)` elements, for
    /// the whole call. An output may be the same pointer as a `Contiguous`
    /// input (in place: element `i` is read before it is written, by the
    /// same lane); otherwise outputs must not overlap any input or each
    /// other.
    pub unsafe fn run_ptrs(&self, ins: &[*const f32], outs: &[*mut f32], threshold: usize) {
        debug_assert_eq!(ins.len(), self.inputs.len());
        debug_assert_eq!(outs.len(), self.outputs.len());
        let n = self.numel;
        let f = self.func;
        let (ip, op) = (ins.as_ptr() as usize, outs.as_ptr() as usize);
        // SAFETY (both calls): the caller's contract covers every index in
        // [0, n) (`InputAccess` indices stay below `numel` of the input); the
        // start of every range is a multiple of 4 as the vector loop's
        // broadcast loads need; chunks write disjoint output ranges.
        let threads = kiln_cpu::par::threads();
        if n >= threshold && threads > 1 {
            // kiln-cpu's static pool, as the eager kernels and gemm/conv
            // splits use (one part per thread, the caller taking part 0,
            // each part cut into 4 chunks an idle thread may take over):
            // no rayon wake-up, and no contention with that pool's spinning
            // workers. Whole tiles per chunk where the kernel is tiled.
            let q = if self.tiled { TILE } else { 64 };
            kiln_cpu::par::for_each_part_grained(n, threads, 4, q, |r| {
                if r.is_empty() {
                    return;
                }
                unsafe {
                    f(
                        ip as *const *const f32,
                        op as *const *mut f32,
                        r.start as u64,
                        r.end as u64,
                    )
                };
            });
        } else {
            unsafe { f(ins.as_ptr(), outs.as_ptr(), 0, n as u64) };
        }
    }

    /// Runs the kernel over the flat index range `[start, end)` only, on the
    /// calling thread: the epilogue of one output tile of a matmul or conv,
    /// applied while the tile is in cache.
    ///
    /// # Safety
    /// As [`run_ptrs`](Self::run_ptrs) (pointers are to the WHOLE operands,
    /// not the tile), and `start` must be a multiple of 4, `end <= numel`.
    pub unsafe fn run_range_ptrs(
        &self,
        ins: &[*const f32],
        outs: &[*mut f32],
        start: usize,
        end: usize,
    ) {
        debug_assert!(start.is_multiple_of(4) && start <= end && end <= self.numel);
        // SAFETY: the caller's contract.
        unsafe { (self.func)(ins.as_ptr(), outs.as_ptr(), start as u64, end as u64) };
    }
}

#[cfg(test)]
mod tests;
