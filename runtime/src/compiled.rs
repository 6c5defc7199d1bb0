//! `CompiledModule`: a module traced, optimized (`PassManager::compile_pipeline`),
//! fused and lowered to a compiled CPU program (`program.rs`: JIT pointwise
//! kernels, gemm/conv/pool/softmax/layer_norm kernels, one liveness-planned
//! arena; nodes without a native lowering run on the interpreter's kernels,
//! an explicit fallback that `fallbacks()` lists by op name).
//!
//! Live state: parameters and buffers are the live module's tensors (an
//! optimizer step or `load_state_dict` is seen by the next call without
//! recompiling), training-mode buffer updates are written back.
//!
//! Guards, checked at every call: the input shapes and dtypes, the training
//! flag, and the module tree (children, their types, parameter and buffer
//! names/dtypes/shapes, and the hooks registered on every module and
//! globally). The tree is fingerprinted only when `nn::structure_epoch()`
//! moved (any registration, replacement, hook change or `to(dtype)`), so a
//! steady-state call does not walk the tree. A failed guard compiles a new
//! variant (cached; at most `CompileOptions::max_variants`); past the
//! limit, or with recompilation disabled, the call runs in eager mode with a
//! warning printed once: never a wrong answer.
//!
//! Hooks stay live: the root's hooks run around the compiled forward
//! (`nn::call_with_forward`), and each call of a submodule with hooks is a
//! `module_call` node of the graph, executed by calling the module (its
//! pre-hooks, forward and forward hooks, exactly as eager) between the
//! compiled segments. Hooks registered after compilation change the
//! fingerprint and so compile a variant with the new boundary.

use crate::interpreter::{exec_node, tensor_type};
use crate::program::{LeafSrc, Program};
use crate::{Error, Result, TracedModule};
use kiln_frontend::nn::{Module, ModuleExt};
use kiln_frontend::Tensor;
use kiln_ir::{plan_fusion, DType, InputKind, Op, OutputKind, TensorType};
use parking_lot::{Mutex, RwLock};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

/// Which backend runs the compiled graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Backend {
    /// The compiled CPU program (Cranelift + gemm + rayon).
    #[default]
    Cpu,
}

/// Options of `jit::compile_with`.
#[derive(Clone, Debug)]
pub struct CompileOptions {
    pub backend: Backend,
    /// Compile a new variant when a guard fails (otherwise run eagerly).
    pub allow_recompile: bool,
    /// The most variants kept; past it, calls that match none run eagerly.
    pub max_variants: usize,
}

impl Default for CompileOptions {
    fn default() -> Self {
        CompileOptions {
            backend: Backend::Cpu,
            allow_recompile: true,
            max_variants: MAX_VARIANTS,
        }
    }
}

/// The default variant limit.
pub const MAX_VARIANTS: usize = 8;

/// Per-call scratch kept by a variant: the arena, the bound leaves and
/// their raw views, reused so a steady-state call allocates only outputs.
struct Scratch {
    arena: Vec<f32>,
    leaves: Vec<Tensor>,
    ptrs: Vec<(usize, usize)>,
}

/// The result of `CompiledModule::verify`.
#[derive(Clone, Debug, PartialEq)]
pub struct VerifyReport {
    /// max |compiled - eager| / max |eager| over the first user output.
    pub max_rel: f64,
    /// The first node (execution order) whose compiled value differs from
    /// the reference interpreter's, as a listing line with its module
    /// scope, when the outputs differ.
    pub first_mismatch: Option<String>,
    /// Why the comparison could not be made per node, if it could not.
    pub note: Option<String>,
}

impl VerifyReport {
    pub fn passed(&self, rtol: f64) -> bool {
        self.max_rel <= rtol
    }
}

impl std::fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "compiled vs eager: max relative error {:.3e}",
            self.max_rel
        )?;
        if let Some(m) = &self.first_mismatch {
            write!(f, "; first differing node: {m}")?;
        }
        if let Some(n) = &self.note {
            write!(f, " ({n})")?;
        }
        Ok(())
    }
}

/// max |a - b| / max |b| (infinite on a shape mismatch).
fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    if a.shape() != b.shape() {
        return f64::INFINITY;
    }
    let (a, b) = (a.to_vec::<f64>(), b.to_vec::<f64>());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, |m: f64, d| if d.is_nan() || d > m { d } else { m })
        / scale
}

/// One compiled graph: the variant for one set of input types, one
/// training flag and one module-tree fingerprint.
pub struct Variant {
    training: bool,
    tree: u64,
    input_types: Vec<TensorType>,
    traced: TracedModule,
    program: Program,
    /// Live parameter/buffer tensors per leaf (None for user inputs and
    /// constants), rebound when `structure_epoch` moves.
    bound: RwLock<(u64, Vec<Option<Tensor>>)>,
    scratch: Mutex<Scratch>,
    compile_ms: f64,
}

/// `compile_with` with the default options.
pub fn compile(module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<CompiledModule> {
    compile_with(module, inputs, CompileOptions::default())
}

/// Traces `module` on `inputs` (hooks kept live), runs the compile
/// pipeline and lowers the fusion plan to a compiled program.
pub fn compile_with(
    module: &Arc<dyn Module>,
    inputs: &[Tensor],
    options: CompileOptions,
) -> Result<CompiledModule> {
    if options.max_variants == 0 {
        return Err(Error::Input(
            "compile: max_variants must be at least 1".into(),
        ));
    }
    let epoch = kiln_frontend::nn::structure_epoch();
    let tree = fingerprint(&**module);
    let first = compile_variant(module, inputs, tree)?;
    Ok(CompiledModule {
        module: module.clone(),
        options,
        variants: Mutex::new(vec![Arc::new(first)]),
        seen: Mutex::new((epoch, tree)),
        warned: AtomicBool::new(false),
        eager_calls: AtomicU64::new(0),
    })
}

/// A hash of what the compiled graph depends on in the module tree: every
/// module's path, type and hook ids, every parameter's and buffer's name,
/// dtype and shape, and the global hooks.
pub(crate) fn fingerprint(m: &dyn Module) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for (name, sub) in m.named_modules() {
        name.hash(&mut h);
        sub.core().type_name().hash(&mut h);
        sub.core().hook_ids().hash(&mut h);
    }
    for (name, t) in m.named_parameters() {
        ("p", name, t.shape(), t.dtype().short_name()).hash(&mut h);
    }
    for (name, t) in m.named_buffers() {
        ("b", name, t.shape(), t.dtype().short_name()).hash(&mut h);
    }
    kiln_frontend::nn::global_hook_ids().hash(&mut h);
    h.finish()
}

/// Copies of every parameter and buffer, by name, with the tensor objects
/// the names referred to when it was taken.
pub(crate) struct StateSnapshot(Vec<(bool, String, Tensor, Tensor)>);

impl StateSnapshot {
    pub(crate) fn take(m: &dyn Module, params: bool) -> Result<StateSnapshot> {
        let mut v = Vec::new();
        if params {
            for (n, t) in m.named_parameters() {
                let saved = t.detach().clone_tensor()?;
                v.push((true, n, t, saved));
            }
        }
        for (n, t) in m.named_buffers() {
            let saved = t.detach().clone_tensor()?;
            v.push((false, n, t, saved));
        }
        Ok(StateSnapshot(v))
    }

    /// Writes the saved values back into the original tensors; a buffer
    /// the forward reassigned (`self.running_mean = ...`, as MyBatchNorm1d
    /// does) gets its original tensor object back under its name.
    pub(crate) fn restore(&self, m: &dyn Module) -> Result<()> {
        kiln_frontend::no_grad(|| -> Result<()> {
            for (is_param, n, orig, saved) in &self.0 {
                let live = if *is_param {
                    m.get_parameter(n)?
                } else {
                    m.get_buffer(n)?
                };
                if !*is_param && !live.same_object(orig) {
                    let (owner, leaf) = match n.rsplit_once('.') {
                        Some((p, l)) => (Some(p), l),
                        None => (None, n.as_str()),
                    };
                    match owner {
                        Some(p) => m
                            .get_submodule(p)?
                            .core()
                            .set_buffer(leaf, Some(orig.clone()))?,
                        None => m.core().set_buffer(leaf, Some(orig.clone()))?,
                    }
                }
                let dst = if *is_param { &live } else { orig };
                if dst.shape() == saved.shape() && dst.dtype() == saved.dtype() {
                    dst.copy_(saved)?;
                } else {
                    return Err(Error::Binding(format!(
                        "cannot restore `{n}`: it is now {}, it was {}",
                        tensor_type(dst),
                        tensor_type(saved)
                    )));
                }
            }
            Ok(())
        })
    }
}

/// Compiles one variant. Tracing runs the forward once; in training mode
/// that would update the buffers, so their values are restored afterwards
/// (the compiled call is what updates them).
fn compile_variant(module: &Arc<dyn Module>, inputs: &[Tensor], tree: u64) -> Result<Variant> {
    let start = std::time::Instant::now();
    if inputs.len() != 1 {
        return Err(Error::Input(format!(
            "compile: kiln modules take one input tensor, got {}",
            inputs.len()
        )));
    }
    let training = module.is_training();
    let snapshot = StateSnapshot::take(&**module, false)?;
    let trace = kiln_frontend::trace::trace_module_live_hooks(&**module, &inputs[0]);
    snapshot.restore(&**module)?;
    let mut traced = TracedModule::new(trace?.graph, module.clone())?;
    kiln_ir::passes::PassManager::compile_pipeline().run(traced.graph_mut())?;
    let plan = plan_fusion(traced.graph())?;
    let g = traced.graph();
    let program = Program::build(g, &plan, &|n| {
        Ok(match &g.node(n).op {
            Op::Input {
                kind: InputKind::User(i),
                ..
            } => LeafSrc::User(*i),
            Op::Input { kind, .. } => LeafSrc::State(kind.clone()),
            op => {
                let mut t = exec_node(op, &[], &[], &|k| traced.bind(k))?;
                LeafSrc::Const(t.remove(0))
            }
        })
    })?;
    let input_types = traced.input_types();
    let scratch = Mutex::new(Scratch {
        arena: vec![0f32; program.arena_len()],
        leaves: Vec::with_capacity(program.leaves().len()),
        ptrs: Vec::with_capacity(program.leaves().len()),
    });
    let v = Variant {
        training,
        tree,
        input_types,
        traced,
        program,
        bound: RwLock::new((u64::MAX, Vec::new())),
        scratch,
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
    };
    v.rebind(kiln_frontend::nn::structure_epoch())?;
    Ok(v)
}

/// A module compiled along its fusion plan (see the module docs), with a
/// cache of variants guarded by input types, the training flag and the
/// module tree.
pub struct CompiledModule {
    module: Arc<dyn Module>,
    options: CompileOptions,
    variants: Mutex<Vec<Arc<Variant>>>,
    /// (structure epoch, tree fingerprint) last seen.
    seen: Mutex<(u64, u64)>,
    warned: AtomicBool,
    eager_calls: AtomicU64,
}

impl CompiledModule {
    /// The compiled module's live module.
    pub fn module(&self) -> &Arc<dyn Module> {
        &self.module
    }

    fn tree(&self) -> u64 {
        let epoch = kiln_frontend::nn::structure_epoch();
        let mut seen = self.seen.lock();
        if seen.0 != epoch {
            *seen = (epoch, fingerprint(&*self.module));
        }
        seen.1
    }

    /// The variant for these inputs and the module's current state,
    /// compiling it if allowed; `None` means "run eagerly" (limit reached
    /// or recompilation disabled; a warning was printed once).
    pub fn variant(&self, inputs: &[Tensor]) -> Result<Option<Arc<Variant>>> {
        let training = self.module.is_training();
        let tree = self.tree();
        let matches = |v: &Variant| {
            v.training == training
                && v.tree == tree
                && v.input_types.len() == inputs.len()
                && v.input_types
                    .iter()
                    .zip(inputs)
                    .all(|(t, x)| x.has_type(&t.shape, t.dtype))
        };
        let n = {
            let vs = self.variants.lock();
            if let Some(v) = vs.iter().find(|v| matches(v)) {
                return Ok(Some(v.clone()));
            }
            vs.len()
        };
        if !self.options.allow_recompile || n >= self.options.max_variants {
            if !self.warned.swap(true, Ordering::Relaxed) {
                let types: Vec<TensorType> = inputs.iter().map(tensor_type).collect();
                eprintln!(
                    "kiln: warning: {}: inputs {types:?} in {} mode match none of the {n} compiled variant(s); running in eager mode (raise CompileOptions::max_variants or allow recompilation)",
                    if self.options.allow_recompile {
                        "recompilation limit reached"
                    } else {
                        "recompilation disabled"
                    },
                    if training { "training" } else { "eval" }
                );
            }
            return Ok(None);
        }
        let v = Arc::new(compile_variant(&self.module, inputs, tree)?);
        self.variants.lock().push(v.clone());
        Ok(Some(v))
    }

    /// How many variants are compiled.
    pub fn variant_count(&self) -> usize {
        self.variants.lock().len()
    }

    /// Calls that ran in eager mode because no variant could be compiled.
    pub fn eager_call_count(&self) -> u64 {
        self.eager_calls.load(Ordering::Relaxed)
    }

    /// The first compiled variant.
    pub fn first(&self) -> Arc<Variant> {
        self.variants.lock()[0].clone()
    }

    /// Kernels of the first variant compiled to machine code.
    pub fn jit_kernel_count(&self) -> usize {
        self.first().jit_kernel_count()
    }

    /// Nodes of the first variant that run on the fallback path.
    pub fn fallbacks(&self) -> Vec<String> {
        self.first().fallbacks().to_vec()
    }

    /// Trace + passes + codegen time of the first variant.
    pub fn compile_ms(&self) -> f64 {
        self.first().compile_ms()
    }

    /// Runs the module: the root's hooks (live) around the compiled
    /// variant for these inputs.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let root_hooks =
            self.module.core().has_call_hooks() || !kiln_frontend::nn::global_hook_ids().is_empty();
        if !root_hooks || inputs.len() != 1 {
            return self.forward_body(inputs);
        }
        let y = kiln_frontend::nn::call_with_forward(&*self.module, &inputs[0], &|x| {
            let mut outs = self
                .forward_body(std::slice::from_ref(x))
                .map_err(|e| kiln_frontend::Error::Lookup(e.to_string()))?;
            Ok(outs.remove(0))
        })?;
        Ok(vec![y])
    }

    /// `forward` for one input and one output.
    pub fn call(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = self.forward(std::slice::from_ref(x))?;
        Ok(outs.remove(0))
    }

    /// Runs eager and compiled on `inputs` (the module's parameters and
    /// buffers restored after each run, so no side effects) and compares
    /// them. When the outputs differ by more than `rtol` (relative to the
    /// eager output's largest magnitude), the compiled program's value of
    /// every node it materializes is compared with the reference
    /// interpreter's, and the first differing node in execution order is
    /// reported with its module scope.
    pub fn verify(&self, inputs: &[Tensor], rtol: f64) -> Result<VerifyReport> {
        if inputs.len() != 1 {
            return Err(Error::Input(format!(
                "verify: kiln modules take one input tensor, got {}",
                inputs.len()
            )));
        }
        let state = StateSnapshot::take(&*self.module, true)?;
        let restore = || state.restore(&*self.module);
        let eager = kiln_frontend::no_grad(|| self.module.call(&inputs[0]));
        restore()?;
        let eager = eager?;
        let Some(v) = self.variant(inputs)? else {
            return Ok(VerifyReport {
                max_rel: 0.0,
                first_mismatch: None,
                note: Some("no compiled variant for these inputs: the call runs eagerly".into()),
            });
        };
        let got = kiln_frontend::no_grad(|| v.run_collect(&self.module, inputs));
        restore()?;
        let (outs, seen) = got?;
        let g = v.traced.graph();
        let user: Vec<&Tensor> = g
            .outputs()
            .iter()
            .zip(&outs)
            .filter(|(o, _)| matches!(o.kind, OutputKind::User))
            .map(|(_, t)| t)
            .collect();
        let max_rel = match user.first() {
            Some(t) => rel_diff(t, &eager),
            None => f64::INFINITY,
        };
        let mut report = VerifyReport {
            max_rel,
            first_mismatch: None,
            note: None,
        };
        if max_rel <= rtol {
            return Ok(report);
        }
        let reference = kiln_frontend::no_grad(|| {
            crate::interpreter::run_graph_collect(g, inputs, &|k| v.traced.bind(k))
        });
        restore()?;
        match reference {
            Err(e) => {
                report.note = Some(format!(
                    "the reference interpreter cannot run this graph: {e}"
                ))
            }
            Ok(r) => {
                let pos: std::collections::HashMap<_, _> =
                    r.order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
                'nodes: for &n in &r.order {
                    for k in 0..g.node(n).outputs.len() {
                        let val = kiln_ir::Value::new(n, k);
                        if let (Some(a), Some(b)) = (seen.get(&val), r.values.get(&val)) {
                            if a.dtype() != DType::F32 {
                                continue;
                            }
                            let e = rel_diff(a, b);
                            if e.is_nan() || e > rtol {
                                report.first_mismatch = Some(format!(
                                    "{}  (relative error {e:.3e} > {rtol:.0e})",
                                    crate::interpreter::describe_node(g, &pos, n)
                                ));
                                break 'nodes;
                            }
                        }
                    }
                }
            }
        }
        Ok(report)
    }

    fn forward_body(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        match self.variant(inputs)? {
            Some(v) => v.forward(&self.module, inputs),
            None => {
                self.eager_calls.fetch_add(1, Ordering::Relaxed);
                if inputs.len() != 1 {
                    return Err(Error::Input(format!(
                        "kiln modules take one input tensor, got {}",
                        inputs.len()
                    )));
                }
                Ok(vec![self.module.forward(&inputs[0])?])
            }
        }
    }
}

impl Variant {
    /// The traced, optimized graph this variant runs.
    pub fn traced(&self) -> &TracedModule {
        &self.traced
    }

    /// Kernels compiled to machine code.
    pub fn jit_kernel_count(&self) -> usize {
        self.program.jit_count()
    }

    /// Nodes that run on the interpreter's kernels, each as `op: reason`
    /// (the backend's error naming the op).
    pub fn fallbacks(&self) -> &[String] {
        self.program.fallbacks()
    }

    /// The steps of the compiled program, in order (`jit`, `gemm`,
    /// `conv2d`, `gather`, `fallback`, `module_call`, ...).
    pub fn step_names(&self) -> Vec<&'static str> {
        self.program.step_names()
    }

    /// Elements of the arena holding every intermediate value.
    pub fn arena_len(&self) -> usize {
        self.program.arena_len()
    }

    /// Trace + passes + codegen time.
    pub fn compile_ms(&self) -> f64 {
        self.compile_ms
    }

    /// Re-reads the live parameter and buffer tensors (by name, type
    /// checked) after the module tree changed.
    fn rebind(&self, epoch: u64) -> Result<()> {
        let g = self.traced.graph();
        let mut fresh = Vec::with_capacity(self.program.leaves().len());
        for (l, n) in self.program.leaves().iter().zip(self.program.leaf_nodes()) {
            fresh.push(match l {
                LeafSrc::State(k) => {
                    let t = self.traced.bind(k)?;
                    let want = &g.node(*n).outputs[0];
                    if !t.has_type(&want.shape, want.dtype) {
                        return Err(Error::Binding(format!(
                            "{k:?} is {}, the compiled graph expects {want}",
                            tensor_type(&t)
                        )));
                    }
                    Some(t)
                }
                _ => None,
            });
        }
        *self.bound.write() = (epoch, fresh);
        Ok(())
    }

    /// Runs the compiled program: user outputs returned, buffer updates
    /// written back to the live module.
    pub fn forward(&self, module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let outs = self.run_graph(module, inputs)?;
        let g = self.traced.graph();
        let mut user = Vec::with_capacity(1);
        let mut updates = Vec::new();
        for (o, t) in g.outputs().iter().zip(outs) {
            match &o.kind {
                OutputKind::User => user.push(t),
                OutputKind::BufferUpdate(name) => updates.push((name.clone(), t)),
            }
        }
        if !updates.is_empty() {
            self.traced.write_back(updates)?;
        }
        Ok(user)
    }

    /// The tensor of every leaf for this call (f32 ones contiguous).
    fn leaf_tensors(&self, inputs: &[Tensor], out: &mut Vec<Tensor>) -> Result<()> {
        let bound = self.bound.read();
        for (l, b) in self.program.leaves().iter().zip(&bound.1) {
            let t = match (l, b) {
                (LeafSrc::User(i), _) => inputs[*i].clone(),
                (LeafSrc::Const(t), _) => t.clone(),
                (LeafSrc::State(_), Some(t)) => t.clone(),
                (LeafSrc::State(k), None) => self.traced.bind(k)?,
            };
            let t = if t.dtype() == DType::F32 && !t.is_contiguous() {
                t.contiguous()?
            } else {
                t
            };
            out.push(t);
        }
        Ok(())
    }

    /// Runs the program keeping a copy of every value it materializes.
    fn run_collect(
        &self,
        module: &Arc<dyn Module>,
        inputs: &[Tensor],
    ) -> Result<(
        Vec<Tensor>,
        std::collections::HashMap<kiln_ir::Value, Tensor>,
    )> {
        let epoch = kiln_frontend::nn::structure_epoch();
        if self.bound.read().0 != epoch {
            self.rebind(epoch)?;
        }
        let mut leaves = Vec::new();
        self.leaf_tensors(inputs, &mut leaves)?;
        let mut arena = vec![0f32; self.program.arena_len()];
        let bind = |k: &InputKind| self.traced.bind(k);
        let call =
            |path: &str, x: &Tensor| -> Result<Tensor> { Ok(module.get_submodule(path)?.call(x)?) };
        self.program.run_collect(
            self.traced.graph(),
            &leaves,
            &mut arena,
            inputs,
            &bind,
            &call,
        )
    }

    /// All graph outputs (user outputs and buffer updates, in order).
    pub(crate) fn run_graph(
        &self,
        module: &Arc<dyn Module>,
        inputs: &[Tensor],
    ) -> Result<Vec<Tensor>> {
        if inputs.len() != self.input_types.len() {
            return Err(Error::Input(format!(
                "compiled module takes {} input(s), got {}",
                self.input_types.len(),
                inputs.len()
            )));
        }
        for (i, (t, w)) in inputs.iter().zip(&self.input_types).enumerate() {
            if !t.has_type(&w.shape, w.dtype) {
                return Err(Error::Input(format!(
                    "input {i}: compiled for {w}, got {}",
                    tensor_type(t)
                )));
            }
        }
        let epoch = kiln_frontend::nn::structure_epoch();
        if self.bound.read().0 != epoch {
            self.rebind(epoch)?;
        }
        let g = self.traced.graph();
        let bind = |k: &InputKind| self.traced.bind(k);
        let call =
            |path: &str, x: &Tensor| -> Result<Tensor> { Ok(module.get_submodule(path)?.call(x)?) };
        let mut fresh;
        let mut guard = self.scratch.try_lock();
        let scratch: &mut Scratch = match guard.as_deref_mut() {
            Some(s) => s,
            None => {
                fresh = Scratch {
                    arena: vec![0f32; self.program.arena_len()],
                    leaves: Vec::new(),
                    ptrs: Vec::new(),
                };
                &mut fresh
            }
        };
        scratch.leaves.clear();
        self.leaf_tensors(inputs, &mut scratch.leaves)?;
        let Scratch {
            arena,
            leaves,
            ptrs,
        } = scratch;
        let r = self
            .program
            .run(g, leaves, ptrs, arena, inputs, &bind, &call);
        leaves.clear();
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_frontend::nn::{Linear, ReLU, Sequential};

    /// A wrong value in one step of the compiled program is reported at
    /// the node that produced it, with its module scope.
    #[test]
    fn verify_names_the_first_differing_node() {
        kiln_frontend::manual_seed(0);
        let layers: Vec<Arc<dyn Module>> = vec![
            Arc::new(Linear::new(4, 8, true).unwrap()),
            Arc::new(ReLU::new()),
            Arc::new(Linear::new(8, 3, true).unwrap()),
        ];
        let m: Arc<dyn Module> = Arc::new(Sequential::new(layers));
        m.eval();
        let x = Tensor::randn(&[5, 4], DType::F32);
        let c = compile(&m, &[x.clone()]).unwrap();
        assert!(c.verify(&[x.clone()], 1e-6).unwrap().passed(1e-6));
        let steps = c.first().step_names();
        let last_gemm = steps
            .iter()
            .rposition(|s| *s == "gemm")
            .expect("a gemm step");
        crate::program::FAULT_AFTER_STEP.with(|f| f.set(last_gemm + 1));
        let r = c.verify(&[x.clone()], 1e-6).unwrap();
        crate::program::FAULT_AFTER_STEP.with(|f| f.set(0));
        assert!(!r.passed(1e-6), "{r}");
        let at = r.first_mismatch.expect("a node is named");
        assert!(at.contains("addmm") && at.contains("Linear[2]"), "{at}");
    }
}
