//! Compiled training. `compile_for_training(&model, &[x])` traces the
//! forward, runs the passes and differentiates the graph in the IR
//! (`kiln_ir::autodiff`): a forward graph that also outputs the values saved
//! for backward and a backward graph from those and the outputs' gradients
//! to the gradients of the trainable parameters (and of inputs that require
//! grad). `CompiledTrainModule::forward` runs the forward graph and records
//! one `CompiledFunctionBackward` node in the eager autograd whose backward
//! runs the backward graph, so `loss.backward()` on a loss computed from its
//! outputs accumulates into the live parameters' `.grad` exactly as eager
//! does (accumulation, `zero_grad(set_to_none)`, `retain_graph`, tensor hooks
//! on the outputs, `autograd::grad`).
//!
//! Guards: a variant is compiled per (input types, which inputs require
//! grad, train/eval flag, the set of parameters that require grad, the
//! module tree and its hooks), so freezing or unfreezing a parameter, or a
//! new hook, recompiles (a frozen parameter gets no gradient computation at
//! all). Graphs run on the compiled CPU program (`GraphExec`: JIT pointwise
//! kernels, gemm/conv kernels, one arena).
//!
//! Hooks stay live: the forward is traced with live hooks, so each call of
//! a submodule with hooks is a `module_call` node; such a graph is cut into
//! compiled segments (`Segmented`), each differentiated on its own and
//! recorded as one `CompiledFunctionBackward`, with the hooked submodule's
//! call run eagerly between them (its forward hooks, and its full backward
//! hooks through eager autograd, exactly as in eager mode; a replaced
//! grad_input flows into the previous segment's backward). The root's hooks
//! run around the compiled forward.
//!
//! `compile_training(&model, loss_fn, optimizer, &example)` bundles a
//! compiled forward, the loss, the backward and the optimizer step into one
//! `TrainStep::step(x, target)` call.

use crate::interpreter::tensor_type;
use crate::program::GraphExec;
use crate::{Error, Result, TracedModule};
use kiln_frontend::autograd::{is_grad_enabled, record_function};
use kiln_frontend::nn::{Module, ModuleExt};
use kiln_frontend::optim::Optimizer;
use kiln_frontend::{no_grad, Tensor};
use kiln_ir::autodiff::{differentiate, JointGraphs};
use kiln_ir::passes::PassManager;
use kiln_ir::{Graph, InputKind, Op, OutputKind, TensorType};
use parking_lot::Mutex;
use std::sync::Arc;

/// Where compiled training runs its graphs.
#[derive(Clone)]
enum Target {
    /// The compiled CPU program.
    Cpu,
    /// An OpenCL device (`compile_for_training_opencl`).
    #[cfg(feature = "opencl")]
    OpenCl(Arc<kiln_opencl::Context>),
}

/// One compiled graph (a forward or a backward) of compiled training.
enum Exec {
    /// The compiled CPU program (JIT pointwise kernels, gemm/conv kernels,
    /// one arena; backward ops without a native lowering on the
    /// interpreter's kernels).
    Cpu(Box<GraphExec>),
    /// The graph rendered for an OpenCL device (ops without a device kernel
    /// run on the CPU, named by `fallbacks`).
    #[cfg(feature = "opencl")]
    OpenCl(Box<crate::opencl::ClGraphExec>),
}

impl Exec {
    /// A forward and a backward graph, with the saved values of `handoff`
    /// (forward output, backward input) kept in one shared arena on the CPU
    /// (`GraphExec::new_pair`); on a device, two programs whose saved
    /// values travel as tensors.
    fn new_pair(
        fwd: Graph,
        bwd: Graph,
        handoff: &[(usize, usize)],
        target: &Target,
    ) -> Result<(Exec, Exec)> {
        Ok(match target {
            Target::Cpu => {
                let (f, b) = GraphExec::new_pair(fwd, bwd, handoff)?;
                (Exec::Cpu(Box::new(f)), Exec::Cpu(Box::new(b)))
            }
            #[cfg(feature = "opencl")]
            Target::OpenCl(ctx) => (
                Exec::OpenCl(Box::new(crate::opencl::ClGraphExec::new(ctx, fwd)?)),
                Exec::OpenCl(Box::new(crate::opencl::ClGraphExec::new(ctx, bwd)?)),
            ),
        })
    }

    /// f32 elements of the arena a call takes (0 on a device: its buffers
    /// are the device program's).
    fn arena_len(&self) -> usize {
        match self {
            Exec::Cpu(e) => e.arena_len(),
            #[cfg(feature = "opencl")]
            Exec::OpenCl(_) => 0,
        }
    }

    fn fallbacks(&self) -> Vec<String> {
        match self {
            Exec::Cpu(e) => e.fallbacks().to_vec(),
            #[cfg(feature = "opencl")]
            Exec::OpenCl(e) => e.fallbacks(),
        }
    }

    /// Runs the graph (in `arena` on the CPU). The single place compiled
    /// training executes graphs.
    fn run_in(
        &self,
        inputs: Vec<Tensor>,
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
        arena: &mut [f32],
    ) -> Result<Vec<Tensor>> {
        match self {
            Exec::Cpu(e) => e.run_in(inputs, bind, arena),
            #[cfg(feature = "opencl")]
            Exec::OpenCl(e) => {
                let _ = arena;
                e.run(&inputs, bind)
            }
        }
    }
}

/// What selects a compiled variant.
#[derive(Clone, Debug, PartialEq)]
struct Key {
    training: bool,
    input_types: Vec<TensorType>,
    input_requires_grad: Vec<bool>,
    /// Names of the parameters that require grad, in module order.
    trainable: Vec<String>,
    /// The module tree and its hooks (`compiled::fingerprint`).
    tree: u64,
}

/// One compiled variant: the forward graph (bound by name to the live
/// module) and the backward graph.
pub struct TrainVariant {
    key: Key,
    /// The forward graph bound to the live module (binding, write-back).
    forward: TracedModule,
    /// The compiled forward/backward pair.
    f: Arc<DiffFn>,
    /// When the module has hooked submodules: the traced graph cut at its
    /// `module_call` nodes (each piece differentiated on its own, the
    /// hooked calls run eagerly with autograd between them). `forward` and
    /// `f` then describe the first piece only.
    segments: Option<Arc<Segmented>>,
    compile_ms: f64,
}

impl TrainVariant {
    /// The forward graph (original outputs, then the saved values).
    pub fn forward_graph(&self) -> &Graph {
        self.forward.graph()
    }

    /// Bytes of the forward's and the backward's arenas (intermediate
    /// values, planned by liveness; taken per call).
    pub fn arena_bytes(&self) -> (usize, usize) {
        (
            4 * self.f.fwd_exec.arena_len(),
            4 * self.f.bwd_exec.arena_len(),
        )
    }

    /// Nodes of the forward and backward programs that run on the
    /// interpreter's kernels (`op: reason`), forward first.
    pub fn fallbacks(&self) -> Vec<String> {
        let mut v = self.f.fwd_exec.fallbacks();
        v.extend(self.f.bwd_exec.fallbacks());
        v
    }

    /// The backward graph (see `kiln_ir::autodiff::JointGraphs`).
    pub fn backward_graph(&self) -> &Graph {
        &self.f.joint.backward
    }

    /// How many values the forward saves for the backward.
    pub fn num_saved(&self) -> usize {
        self.f.joint.num_saved
    }

    /// The inputs (parameters by name, user inputs by index) that get a
    /// gradient, in the order of the backward graph's outputs.
    pub fn grad_inputs(&self) -> &[InputKind] {
        &self.f.joint.grad_inputs
    }

    /// Trace + differentiation + passes time.
    pub fn compile_ms(&self) -> f64 {
        self.compile_ms
    }
}

/// A module whose forward and backward are compiled (see the module docs).
pub struct CompiledTrainModule {
    module: Arc<dyn Module>,
    variants: Mutex<Vec<Arc<TrainVariant>>>,
    target: Target,
}

/// The most variants a `CompiledTrainModule` keeps.
pub const MAX_TRAIN_VARIANTS: usize = 8;

/// Compiles `module` for training on inputs like `inputs` (the first
/// variant is compiled now; others on demand).
pub fn compile_for_training(
    module: &Arc<dyn Module>,
    inputs: &[Tensor],
) -> Result<CompiledTrainModule> {
    let cm = CompiledTrainModule {
        module: module.clone(),
        variants: Mutex::new(Vec::new()),
        target: Target::Cpu,
    };
    cm.variant(inputs)?;
    Ok(cm)
}

/// `compile_for_training` with the forward and backward graphs on OpenCL
/// device `device` (None: `KILN_OPENCL_DEVICE`, else 0). Parameters and
/// buffers are uploaded every call (an eager optimizer updates them on the
/// host between steps), gradients and buffer updates come back to the live
/// module; backward ops without a device kernel run on the CPU
/// (`TrainVariant::fallbacks` names them).
#[cfg(feature = "opencl")]
pub fn compile_for_training_opencl(
    module: &Arc<dyn Module>,
    inputs: &[Tensor],
    device: Option<usize>,
) -> Result<CompiledTrainModule> {
    let ctx = kiln_opencl::context(device).map_err(|e| Error::Input(e.to_string()))?;
    let cm = CompiledTrainModule {
        module: module.clone(),
        variants: Mutex::new(Vec::new()),
        target: Target::OpenCl(ctx),
    };
    kiln_frontend::device::host_access(|| cm.variant(inputs))?;
    Ok(cm)
}

impl CompiledTrainModule {
    pub fn module(&self) -> &Arc<dyn Module> {
        &self.module
    }

    fn key(&self, inputs: &[Tensor]) -> Key {
        Key {
            training: self.module.is_training(),
            input_types: inputs.iter().map(tensor_type).collect(),
            input_requires_grad: inputs.iter().map(|t| t.requires_grad()).collect(),
            trainable: self
                .module
                .named_parameters()
                .into_iter()
                .filter(|(_, p)| p.requires_grad())
                .map(|(n, _)| n)
                .collect(),
            tree: crate::compiled::fingerprint(&*self.module),
        }
    }

    /// The variant for these inputs and the module's current state,
    /// compiling it if needed.
    pub fn variant(&self, inputs: &[Tensor]) -> Result<Arc<TrainVariant>> {
        let key = self.key(inputs);
        {
            let vs = self.variants.lock();
            if let Some(v) = vs.iter().find(|v| v.key == key) {
                return Ok(v.clone());
            }
            if vs.len() >= MAX_TRAIN_VARIANTS {
                let msg = format!(
                    "compiled training: recompilation limit reached ({MAX_TRAIN_VARIANTS} variants); inputs {:?}, trainable {:?}",
                    key.input_types, key.trainable
                );
                eprintln!("kiln: warning: {msg}");
                return Err(Error::Input(msg));
            }
        }
        let v = Arc::new(self.compile_variant(inputs, key)?);
        self.variants.lock().push(v.clone());
        Ok(v)
    }

    /// How many variants are compiled (a recompile adds one).
    pub fn variant_count(&self) -> usize {
        self.variants.lock().len()
    }

    fn compile_variant(&self, inputs: &[Tensor], key: Key) -> Result<TrainVariant> {
        let start = std::time::Instant::now();
        let module = &self.module;
        // Tracing runs the forward once; restore the buffers it changed
        // (values, and the objects a forward may have reassigned).
        let snapshot: Vec<(String, Tensor, Tensor)> = if key.training {
            module
                .named_buffers()
                .into_iter()
                .map(|(n, t)| Ok((n, t.clone(), t.detach().clone_tensor()?)))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        if inputs.len() != 1 {
            return Err(Error::Input(format!(
                "compile_for_training: kiln modules take one input tensor, got {}",
                inputs.len()
            )));
        }
        // Hooks stay live: hooked submodules become `module_call` nodes.
        let traced =
            no_grad(|| kiln_frontend::trace::trace_module_live_hooks(&**module, &inputs[0]));
        restore_buffers(module, &snapshot)?;
        let mut traced = TracedModule::new(traced?.graph, module.clone())?;
        traced.run_passes()?;
        if traced
            .graph()
            .node_ids()
            .iter()
            .any(|&n| matches!(traced.graph().node(n).op, Op::ModuleCall { .. }))
        {
            let seg = Segmented::build(traced.graph(), &key, &self.target)?;
            let (fwd_graph, joint, fwd_exec, bwd_exec) = seg.first_fn()?;
            return Ok(TrainVariant {
                key,
                forward: TracedModule::new(fwd_graph.clone(), module.clone())?,
                f: Arc::new(DiffFn {
                    fwd_graph,
                    joint,
                    fwd_exec,
                    bwd_exec,
                }),
                segments: Some(Arc::new(seg)),
                compile_ms: start.elapsed().as_secs_f64() * 1e3,
            });
        }
        let trainable = &key.trainable;
        let req = &key.input_requires_grad;
        let (fwd_graph, joint, fwd_exec, bwd_exec) = diff_parts(
            traced.graph(),
            &|k: &InputKind| match k {
                InputKind::Param(n) => trainable.contains(n),
                InputKind::User(i) => req.get(*i).copied().unwrap_or(false),
                InputKind::Buffer(_) => false,
            },
            &self.target,
        )?;
        let forward = TracedModule::new(fwd_graph.clone(), module.clone())?;
        Ok(TrainVariant {
            key,
            forward,
            f: Arc::new(DiffFn {
                fwd_graph,
                joint,
                fwd_exec,
                bwd_exec,
            }),
            segments: None,
            compile_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Runs the compiled forward. With grad mode on and something to
    /// differentiate, the outputs get a `CompiledFunctionBackward` grad_fn
    /// that runs the compiled backward. Buffer updates are written back.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let root_hooks =
            self.module.core().has_call_hooks() || !kiln_frontend::nn::global_hook_ids().is_empty();
        if !root_hooks || inputs.len() != 1 {
            return self.forward_body(inputs);
        }
        // The root's hooks (forward, and full backward hooks through
        // eager autograd) run around the compiled forward, as in eager.
        let y = kiln_frontend::nn::call_with_forward(&*self.module, &inputs[0], &|x| {
            let mut outs = self
                .forward_body(std::slice::from_ref(x))
                .map_err(|e| kiln_frontend::Error::Lookup(e.to_string()))?;
            Ok(outs.remove(0))
        })?;
        Ok(vec![y])
    }

    fn forward_body(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let v = self.variant(inputs)?;
        if let Some(seg) = &v.segments {
            return seg.forward(&self.module, inputs);
        }
        let fwd = &v.forward;
        let outs = v.f.apply(inputs, &|k| fwd.bind(k))?;
        let mut user = Vec::new();
        let mut updates = Vec::new();
        for (o, t) in v.f.fwd_graph.outputs().iter().zip(outs) {
            match &o.kind {
                OutputKind::User => user.push(t),
                OutputKind::BufferUpdate(name) => updates.push((name.clone(), t)),
            }
        }
        fwd.write_back(updates)?;
        Ok(user)
    }

    /// `forward` for one input and one output.
    pub fn call(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = self.forward(std::slice::from_ref(x))?;
        if outs.len() != 1 {
            return Err(Error::Input(format!(
                "CompiledTrainModule.call: the graph has {} user outputs, use forward",
                outs.len()
            )));
        }
        Ok(outs.pop().expect("one output"))
    }
}

/// Puts back the buffer objects a traced forward may have reassigned
/// (`set_buffer`) and their values from before the trace.
fn restore_buffers(module: &Arc<dyn Module>, snapshot: &[(String, Tensor, Tensor)]) -> Result<()> {
    for (name, obj, saved) in snapshot {
        let live = module.get_buffer(name)?;
        if live.id() != obj.id() {
            match name.rsplit_once('.') {
                Some((path, leaf)) => module
                    .get_submodule(path)?
                    .core()
                    .set_buffer(leaf, Some(obj.clone()))?,
                None => module.core().set_buffer(name, Some(obj.clone()))?,
            }
        }
        no_grad(|| obj.copy_(saved).map(|_| ()))?;
    }
    Ok(())
}

/// A loss: `(output, target) -> scalar loss`.
pub type LossFn = Box<dyn Fn(&Tensor, &Tensor) -> kiln_frontend::Result<Tensor> + Send + Sync>;

/// One training step as one call: compiled forward, loss, compiled
/// backward, optimizer step (`jit::compile_training`).
pub struct TrainStep {
    model: CompiledTrainModule,
    loss_fn: LossFn,
    optimizer: Box<dyn Optimizer>,
}

/// Compiles `model` for training on inputs like `example` and bundles it
/// with `loss_fn` and `optimizer` (built over the model's parameters).
pub fn compile_training(
    model: &Arc<dyn Module>,
    loss_fn: LossFn,
    optimizer: Box<dyn Optimizer>,
    example: &Tensor,
) -> Result<TrainStep> {
    Ok(TrainStep {
        model: compile_for_training(model, std::slice::from_ref(example))?,
        loss_fn,
        optimizer,
    })
}

impl TrainStep {
    /// `zero_grad(set_to_none)`, forward, loss, backward, step; returns the
    /// loss (detached).
    pub fn step(&mut self, x: &Tensor, target: &Tensor) -> Result<Tensor> {
        self.optimizer.zero_grad(true)?;
        let y = self.model.call(x)?;
        let loss = (self.loss_fn)(&y, target)?;
        loss.backward()?;
        self.optimizer.step()?;
        Ok(loss.detach())
    }

    pub fn model(&self) -> &CompiledTrainModule {
        &self.model
    }

    pub fn optimizer(&self) -> &dyn Optimizer {
        &*self.optimizer
    }

    pub fn optimizer_mut(&mut self) -> &mut dyn Optimizer {
        &mut *self.optimizer
    }
}

// ------------------------------------------------------------------ segments

/// A graph differentiated and compiled as one autograd function: its
/// forward records one `CompiledFunctionBackward` node whose backward runs
/// the compiled backward graph.
struct DiffFn {
    fwd_graph: Graph,
    joint: JointGraphs,
    fwd_exec: Exec,
    bwd_exec: Exec,
}

/// Differentiates `g` and compiles both graphs over one arena
/// (`GraphExec::new_pair`): the saved values that live in the forward's
/// arena stay there for the backward, which reuses their space after
/// their last reader. Returns (forward graph, joint, forward exec,
/// backward exec).
fn diff_parts(
    g: &Graph,
    wants: &dyn Fn(&InputKind) -> bool,
    target: &Target,
) -> Result<(Graph, JointGraphs, Exec, Exec)> {
    let mut joint = differentiate(g, wants)?;
    let pm = PassManager::standard();
    let mut fwd = std::mem::take(&mut joint.forward);
    pm.run(&mut fwd)?;
    pm.run(&mut joint.backward)?;
    let handoff: Vec<(usize, usize)> = (0..joint.num_saved)
        .map(|j| (joint.num_outputs + j, joint.grad_outputs.len() + j))
        .collect();
    let (fwd_exec, bwd_exec) =
        Exec::new_pair(fwd.clone(), joint.backward.clone(), &handoff, target)?;
    Ok((fwd, joint, fwd_exec, bwd_exec))
}

impl DiffFn {
    /// Runs the forward on `inputs` (user inputs by index, parameters and
    /// buffers from `bind`) and returns the graph's original outputs in
    /// order; with grad mode on, the user outputs take part in autograd.
    fn apply(
        self: &Arc<Self>,
        inputs: &[Tensor],
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        // One arena for the forward and, when recorded, the backward: it
        // holds the saved values between them (see `diff_parts`).
        let mut arena = kiln_cpu::buffers::alloc_uninit::<f32>(self.fwd_exec.arena_len());
        let outs = no_grad(|| self.fwd_exec.run_in(inputs.to_vec(), bind, &mut arena));
        let outs = match outs {
            Ok(o) => o,
            Err(e) => {
                kiln_cpu::buffers::recycle(kiln_cpu::CpuStorage::F32(arena));
                return Err(e);
            }
        };
        let j = &self.joint;
        let mut originals = Vec::with_capacity(j.num_outputs);
        let mut user_pos = Vec::new();
        let mut outs = outs.into_iter();
        for o in self.fwd_graph.outputs().iter().take(j.num_outputs) {
            let t = outs.next().expect("one tensor per output");
            if matches!(o.kind, OutputKind::User) {
                user_pos.push(originals.len());
                originals.push(t.detach());
            } else {
                originals.push(t);
            }
        }
        let saved: Vec<Tensor> = outs.collect();
        if !is_grad_enabled() || j.grad_inputs.is_empty() || j.grad_outputs.is_empty() {
            kiln_cpu::buffers::recycle(kiln_cpu::CpuStorage::F32(arena));
            return Ok(originals);
        }
        // Saved tensors are read in place (parameters and inputs are not
        // copied): modifying one in place before the backward is an error,
        // as in PyTorch.
        let versions: Vec<u64> = saved.iter().map(|t| t.version()).collect();
        let arena = Mutex::new(Some(arena));
        // Without retain_graph the backward takes the saved tensors and
        // drops each after its last reader.
        let saved = Mutex::new(Some(saved));
        let diff_inputs: Vec<Tensor> = j
            .grad_inputs
            .iter()
            .map(|k| match k {
                InputKind::User(i) => Ok(inputs[*i].clone()),
                k => bind(k),
            })
            .collect::<Result<_>>()?;
        let out_types: Vec<TensorType> = j
            .grad_outputs
            .iter()
            .map(|&i| tensor_type(&originals[user_pos[i]]))
            .collect();
        let f = self.clone();
        let backward = move |gs: &[Option<Tensor>], needs: &[bool]| {
            let mut bin: Vec<Tensor> = Vec::with_capacity(gs.len() + versions.len());
            for (g, ty) in gs.iter().zip(&out_types) {
                bin.push(match g {
                    Some(g) => g.clone(),
                    None => Tensor::zeros(&ty.shape, ty.dtype),
                });
            }
            let retain = kiln_frontend::autograd::retains_graph();
            let saved = if retain {
                saved.lock().clone()
            } else {
                saved.lock().take()
            }
            .ok_or_else(|| {
                kiln_frontend::Error::Autograd(
                    "CompiledFunctionBackward: the saved values were freed by an earlier backward (use retain_graph=True to backward twice)".into(),
                )
            })?;
            if saved.iter().zip(&versions).any(|(t, &v)| t.version() != v) {
                return Err(kiln_frontend::Error::Autograd(
                    "one of the variables needed for gradient computation has been modified by an inplace operation (CompiledFunctionBackward)".into(),
                ));
            }
            // The backward overwrites saved values after their last
            // reader: with retain_graph it runs on a copy of the arena.
            bin.extend(saved);
            let mut own = if retain {
                arena.lock().as_ref().map(|a| {
                    let mut c = kiln_cpu::buffers::alloc_uninit::<f32>(a.len());
                    c.copy_from_slice(a);
                    c
                })
            } else {
                arena.lock().take()
            }
            .ok_or_else(|| {
                kiln_frontend::Error::Autograd(
                    "CompiledFunctionBackward: the saved values were freed by an earlier backward (use retain_graph=True to backward twice)".into(),
                )
            })?;
            let grads = no_grad(|| {
                f.bwd_exec.run_in(
                    bin,
                    &|k| {
                        Err(Error::Binding(format!(
                            "the backward graph binds nothing by name ({k:?})"
                        )))
                    },
                    &mut own,
                )
            });
            kiln_cpu::buffers::recycle(kiln_cpu::CpuStorage::F32(own));
            let grads = grads.map_err(|e| {
                kiln_frontend::Error::Autograd(format!("CompiledFunctionBackward: {e}"))
            })?;
            Ok(grads
                .into_iter()
                .zip(needs)
                .map(|(g, &n)| n.then_some(g))
                .collect())
        };
        let in_refs: Vec<&Tensor> = diff_inputs.iter().collect();
        let out_refs: Vec<&Tensor> = j
            .grad_outputs
            .iter()
            .map(|&i| &originals[user_pos[i]])
            .collect();
        record_function("CompiledFunctionBackward", &in_refs, &out_refs, backward);
        Ok(originals)
    }
}

/// One piece of a graph cut at its `module_call` nodes.
enum Piece {
    /// A compiled, differentiated subgraph: its user input `j` is slot
    /// `ext[j]`, its output `k` fills slot `defs[k]`.
    Seg {
        f: Arc<DiffFn>,
        ext: Vec<usize>,
        defs: Vec<usize>,
    },
    /// A hooked submodule's call, run eagerly (hooks, autograd and all).
    Call {
        path: String,
        arg: usize,
        out: usize,
    },
}

/// A traced graph cut at its `module_call` nodes: compiled segments, and
/// between them the hooked submodules' calls in eager mode, so their
/// forward hooks run and their full backward hooks see (and may replace)
/// the gradients flowing through the eager autograd between the compiled
/// segments' `CompiledFunctionBackward` nodes.
pub(crate) struct Segmented {
    pieces: Vec<Piece>,
    nslots: usize,
    /// Slot of user input `i`.
    user_slots: Vec<usize>,
    /// Where each of the original graph's outputs is, and its kind.
    outputs: Vec<(usize, OutputKind)>,
    /// The first segment's graph and input-gradient mask (for the
    /// variant's accessors).
    first: Option<(Graph, Vec<bool>)>,
    trainable: Vec<String>,
    target: Target,
}

fn seg_wants<'a>(trainable: &'a [String], mask: &'a [bool]) -> impl Fn(&InputKind) -> bool + 'a {
    move |k: &InputKind| match k {
        InputKind::Param(n) => trainable.contains(n),
        InputKind::User(i) => mask.get(*i).copied().unwrap_or(false),
        InputKind::Buffer(_) => false,
    }
}

impl Segmented {
    fn build(g: &Graph, key: &Key, target: &Target) -> Result<Segmented> {
        use kiln_ir::{OpClass, Value};
        use std::collections::{HashMap, HashSet};
        let order = g.topo_order()?;
        let mut slot_of: HashMap<Value, usize> = HashMap::new();
        let mut nslots = 0usize;
        let mut slot = |v: Value, slot_of: &mut HashMap<Value, usize>| {
            *slot_of.entry(v).or_insert_with(|| {
                nslots += 1;
                nslots - 1
            })
        };
        // User inputs first.
        let mut users: Vec<(usize, Value)> = Vec::new();
        for &n in &order {
            if let Op::Input {
                kind: InputKind::User(i),
                ..
            } = g.node(n).op
            {
                users.push((i, Value::new(n, 0)));
            }
        }
        users.sort_by_key(|(i, _)| *i);
        let user_slots: Vec<usize> = users.iter().map(|(_, v)| slot(*v, &mut slot_of)).collect();
        let is_user_input = |v: Value| {
            matches!(
                g.node(v.node).op,
                Op::Input {
                    kind: InputKind::User(_),
                    ..
                }
            )
        };
        // Runs of compute nodes between module calls.
        let mut runs: Vec<Result<Vec<kiln_ir::NodeId>, kiln_ir::NodeId>> = Vec::new();
        let mut cur = Vec::new();
        for &n in &order {
            match g.node(n).op.class() {
                OpClass::Input | OpClass::Constant => {}
                _ if matches!(g.node(n).op, Op::ModuleCall { .. }) => {
                    if !cur.is_empty() {
                        runs.push(Ok(std::mem::take(&mut cur)));
                    }
                    runs.push(Err(n));
                }
                _ => cur.push(n),
            }
        }
        if !cur.is_empty() {
            runs.push(Ok(cur));
        }
        let mut pieces = Vec::new();
        let mut first = None;
        for r in runs {
            match r {
                Err(n) => {
                    let Op::ModuleCall { path, .. } = &g.node(n).op else {
                        unreachable!("module calls only")
                    };
                    let arg = g.operands(n)[0];
                    let arg = slot(arg, &mut slot_of);
                    let out = slot(Value::new(n, 0), &mut slot_of);
                    pieces.push(Piece::Call {
                        path: path.clone(),
                        arg,
                        out,
                    });
                }
                Ok(nodes) => {
                    let set: HashSet<kiln_ir::NodeId> = nodes.iter().copied().collect();
                    let mut sg = Graph::new();
                    let mut map: HashMap<Value, Value> = HashMap::new();
                    let mut ext = Vec::new();
                    let mut mask = Vec::new();
                    for &n in &nodes {
                        let mut ops = Vec::new();
                        for v in g.operands(n) {
                            if let Some(&m) = map.get(&v) {
                                ops.push(m);
                                continue;
                            }
                            let node = g.node(v.node);
                            let m = match &node.op {
                                Op::Input { kind, ty } if !matches!(kind, InputKind::User(_)) => {
                                    sg.add_input(kind.clone(), ty.clone(), &node.scope)?
                                }
                                Op::Constant { ty, data } => {
                                    sg.add_constant(ty.clone(), data.clone(), &node.scope)?
                                }
                                _ => {
                                    let ty = g.value_type(v).clone();
                                    let j = ext.len();
                                    ext.push(slot(v, &mut slot_of));
                                    mask.push(if is_user_input(v) {
                                        let Op::Input {
                                            kind: InputKind::User(i),
                                            ..
                                        } = node.op
                                        else {
                                            unreachable!("user input")
                                        };
                                        key.input_requires_grad.get(i).copied().unwrap_or(false)
                                    } else {
                                        ty.dtype.is_float()
                                    });
                                    sg.add_input(InputKind::User(j), ty, "")?
                                }
                            };
                            map.insert(v, m);
                            ops.push(m);
                        }
                        let node = g.node(n);
                        let outs = sg.add_node(node.op.clone(), &ops, &node.scope)?;
                        for (k, o) in outs.into_iter().enumerate() {
                            map.insert(Value::new(n, k), o);
                        }
                    }
                    let mut defs = Vec::new();
                    for &n in &nodes {
                        for k in 0..g.node(n).outputs.len() {
                            let v = Value::new(n, k);
                            let escapes = g.is_graph_output(v)
                                || g.users(v).iter().any(|(u, _)| !set.contains(u));
                            if escapes {
                                sg.add_output(map[&v], OutputKind::User)?;
                                defs.push(slot(v, &mut slot_of));
                            }
                        }
                    }
                    let wants = seg_wants(&key.trainable, &mask);
                    let (fwd_graph, joint, fwd_exec, bwd_exec) = diff_parts(&sg, &wants, target)?;
                    if first.is_none() {
                        first = Some((sg, mask.clone()));
                    }
                    pieces.push(Piece::Seg {
                        f: Arc::new(DiffFn {
                            fwd_graph,
                            joint,
                            fwd_exec,
                            bwd_exec,
                        }),
                        ext,
                        defs,
                    });
                }
            }
        }
        let mut outputs = Vec::new();
        for o in g.outputs() {
            let s = slot(o.value, &mut slot_of);
            outputs.push((s, o.kind.clone()));
        }
        Ok(Segmented {
            pieces,
            nslots,
            user_slots,
            outputs,
            first,
            trainable: key.trainable.clone(),
            target: target.clone(),
        })
    }

    /// The first compiled segment's parts (for the variant's accessors).
    fn first_fn(&self) -> Result<(Graph, JointGraphs, Exec, Exec)> {
        let (g, mask) = self.first.as_ref().ok_or_else(|| {
            Error::Input("compiled training: the graph has no compiled segment".into())
        })?;
        diff_parts(g, &seg_wants(&self.trainable, mask), &self.target)
    }

    /// Runs the pieces in order; returns the user outputs and writes buffer
    /// updates back.
    fn forward(&self, module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        if inputs.len() != self.user_slots.len() {
            return Err(Error::Input(format!(
                "compiled training: {} input(s) expected, got {}",
                self.user_slots.len(),
                inputs.len()
            )));
        }
        let mut slots: Vec<Option<Tensor>> = vec![None; self.nslots];
        for (s, t) in self.user_slots.iter().zip(inputs) {
            slots[*s] = Some(t.clone());
        }
        let take = |slots: &[Option<Tensor>], s: usize| {
            slots[s].clone().ok_or_else(|| {
                Error::Input(format!(
                    "compiled training: slot {s} read before it was set"
                ))
            })
        };
        let bind = |k: &InputKind| -> Result<Tensor> {
            match k {
                InputKind::Param(n) => Ok(module.get_parameter(n)?),
                InputKind::Buffer(n) => Ok(module.get_buffer(n)?),
                InputKind::User(i) => Err(Error::Binding(format!("user input {i} by name"))),
            }
        };
        for p in &self.pieces {
            match p {
                Piece::Seg { f, ext, defs } => {
                    let ins: Vec<Tensor> = ext
                        .iter()
                        .map(|&s| take(&slots, s))
                        .collect::<Result<_>>()?;
                    let outs = f.apply(&ins, &bind)?;
                    for (s, t) in defs.iter().zip(outs) {
                        slots[*s] = Some(t);
                    }
                }
                Piece::Call { path, arg, out } => {
                    let x = take(&slots, *arg)?;
                    let y = module.get_submodule(path)?.call(&x)?;
                    slots[*out] = Some(y);
                }
            }
        }
        let mut user = Vec::new();
        let mut updates = Vec::new();
        for (s, kind) in &self.outputs {
            let t = take(&slots, *s)?;
            match kind {
                OutputKind::User => user.push(t),
                OutputKind::BufferUpdate(name) => updates.push((name.clone(), t)),
            }
        }
        no_grad(|| -> Result<()> {
            for (name, v) in &updates {
                let dst = module.get_buffer(name)?;
                let v = if dst.shares_storage(v) {
                    v.detach().clone_tensor()?
                } else {
                    v.detach()
                };
                dst.copy_(&v)?;
            }
            Ok(())
        })?;
        Ok(user)
    }
}
