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
//! grad, train/eval flag, the set of parameters that require grad), so
//! freezing or unfreezing a parameter recompiles (a frozen parameter gets no
//! gradient computation at all). Graphs run through one function, `run`
//! (today the reference interpreter), so a faster executor can replace it.
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
use kiln_ir::{Graph, InputKind, OutputKind, TensorType};
use parking_lot::Mutex;
use std::sync::Arc;

/// Runs one graph: the compiled CPU program (JIT pointwise kernels, gemm/
/// conv kernels, one arena; the backward ops without a native lowering on
/// the interpreter's kernels). The single place compiled training executes
/// graphs.
fn run(
    exec: &GraphExec,
    inputs: &[Tensor],
    bindings: &dyn Fn(&InputKind) -> Result<Tensor>,
) -> Result<Vec<Tensor>> {
    no_grad(|| exec.run(inputs, bindings))
}

/// What selects a compiled variant.
#[derive(Clone, Debug, PartialEq)]
struct Key {
    training: bool,
    input_types: Vec<TensorType>,
    input_requires_grad: Vec<bool>,
    /// Names of the parameters that require grad, in module order.
    trainable: Vec<String>,
}

/// One compiled variant: the forward graph (bound by name to the live
/// module) and the backward graph.
pub struct TrainVariant {
    key: Key,
    forward: TracedModule,
    joint: JointGraphs,
    fwd_exec: GraphExec,
    bwd_exec: GraphExec,
    compile_ms: f64,
}

impl TrainVariant {
    /// The forward graph (original outputs, then the saved values).
    pub fn forward_graph(&self) -> &Graph {
        self.forward.graph()
    }

    /// Nodes of the forward and backward programs that run on the
    /// interpreter's kernels (`op: reason`), forward first.
    pub fn fallbacks(&self) -> Vec<String> {
        let mut v = self.fwd_exec.fallbacks().to_vec();
        v.extend(self.bwd_exec.fallbacks().iter().cloned());
        v
    }

    /// The backward graph (see `kiln_ir::autodiff::JointGraphs`).
    pub fn backward_graph(&self) -> &Graph {
        &self.joint.backward
    }

    /// How many values the forward saves for the backward.
    pub fn num_saved(&self) -> usize {
        self.joint.num_saved
    }

    /// The inputs (parameters by name, user inputs by index) that get a
    /// gradient, in the order of the backward graph's outputs.
    pub fn grad_inputs(&self) -> &[InputKind] {
        &self.joint.grad_inputs
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
    };
    cm.variant(inputs)?;
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
        let traced = no_grad(|| crate::jit::trace(module, inputs));
        restore_buffers(module, &snapshot)?;
        let mut traced = traced?;
        traced.run_passes()?;
        let trainable = &key.trainable;
        let req = &key.input_requires_grad;
        let mut joint = differentiate(traced.graph(), &|k: &InputKind| match k {
            InputKind::Param(n) => trainable.contains(n),
            InputKind::User(i) => req.get(*i).copied().unwrap_or(false),
            InputKind::Buffer(_) => false,
        })?;
        let pm = PassManager::standard();
        let mut fwd = std::mem::take(&mut joint.forward);
        pm.run(&mut fwd)?;
        pm.run(&mut joint.backward)?;
        let fwd_exec = GraphExec::new(fwd.clone())?;
        let bwd_exec = GraphExec::new(joint.backward.clone())?;
        let forward = TracedModule::new(fwd, module.clone())?;
        Ok(TrainVariant {
            key,
            forward,
            joint,
            fwd_exec,
            bwd_exec,
            compile_ms: start.elapsed().as_secs_f64() * 1e3,
        })
    }

    /// Runs the compiled forward. With grad mode on and something to
    /// differentiate, the outputs get a `CompiledFunctionBackward` grad_fn
    /// that runs the compiled backward. Buffer updates are written back.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let v = self.variant(inputs)?;
        let fwd = &v.forward;
        let outs = run(&v.fwd_exec, inputs, &|k| fwd.bind(k))?;
        let j = &v.joint;
        let mut user = Vec::new();
        let mut updates = Vec::new();
        let mut outs = outs.into_iter();
        for o in fwd.graph().outputs().iter().take(j.num_outputs) {
            let t = outs.next().expect("one tensor per output");
            match &o.kind {
                OutputKind::User => user.push(t.detach()),
                OutputKind::BufferUpdate(name) => updates.push((name.clone(), t)),
            }
        }
        let saved: Vec<Tensor> = outs.collect();
        fwd.write_back(updates)?;
        if !is_grad_enabled() || j.grad_inputs.is_empty() || j.grad_outputs.is_empty() {
            return Ok(user);
        }
        let diff_inputs: Vec<Tensor> = j
            .grad_inputs
            .iter()
            .map(|k| match k {
                InputKind::User(i) => Ok(inputs[*i].clone()),
                k => fwd.bind(k),
            })
            .collect::<Result<_>>()?;
        let out_types: Vec<TensorType> = j
            .grad_outputs
            .iter()
            .map(|&i| tensor_type(&user[i]))
            .collect();
        let v2 = v.clone();
        let backward = move |gs: &[Option<Tensor>], needs: &[bool]| {
            let mut bin: Vec<Tensor> = Vec::with_capacity(gs.len() + saved.len());
            for (g, ty) in gs.iter().zip(&out_types) {
                bin.push(match g {
                    Some(g) => g.clone(),
                    None => Tensor::zeros(&ty.shape, ty.dtype),
                });
            }
            bin.extend(saved.iter().cloned());
            let grads = run(&v2.bwd_exec, &bin, &|k| {
                Err(Error::Binding(format!(
                    "the backward graph binds nothing by name ({k:?})"
                )))
            })
            .map_err(|e| {
                kiln_frontend::Error::Autograd(format!("CompiledFunctionBackward: {e}"))
            })?;
            Ok(grads
                .into_iter()
                .zip(needs)
                .map(|(g, &n)| n.then_some(g))
                .collect())
        };
        let in_refs: Vec<&Tensor> = diff_inputs.iter().collect();
        let out_refs: Vec<&Tensor> = j.grad_outputs.iter().map(|&i| &user[i]).collect();
        record_function("CompiledFunctionBackward", &in_refs, &out_refs, backward);
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
