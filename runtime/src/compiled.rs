//! `CompiledModule` (first step of the compiled backend): a traced and
//! optimized graph executed kernel by kernel along its fusion plan. Each
//! pointwise kernel that the Cranelift backend can lower runs as one
//! machine-code function; every other kernel runs node by node on the eager
//! kernels (the interpreter's), an explicit and reported fallback
//! (`CompiledModule::fallbacks` names the op that could not be lowered).
//! Parameters and buffers are bound by name from the live module at every
//! call, as for `TracedModule`. Guard: the input types must equal the
//! traced ones (a mismatch is an error naming both; recompilation on other
//! shapes is part of the open compiled-backend issue).

use crate::interpreter::{exec_node, tensor_type};
use crate::program::{LeafSrc, Program};
use crate::{Error, Result, TracedModule};
use kiln_frontend::nn::Module;
use kiln_frontend::nn::ModuleExt;
use kiln_frontend::Tensor;
use kiln_ir::{plan_fusion, DType, InputKind, Op};
use parking_lot::Mutex;
use std::sync::Arc;

/// One compiled graph: the variant for one set of input types and one
/// training flag.
pub struct Variant {
    training: bool,
    traced: TracedModule,
    program: Program,
    /// The arena of intermediate values, reused by every call (a call
    /// that finds it busy, from another thread, uses a fresh one).
    arena: Mutex<Vec<f32>>,
    compile_ms: f64,
}

/// Traces `module` on `inputs`, runs the standard passes and compiles the
/// fusion plan's pointwise kernels with Cranelift. Later calls with other
/// input shapes or dtypes, or after `train()`/`eval()`, compile another
/// variant (cached, at most `MAX_VARIANTS`).
pub fn compile(module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<CompiledModule> {
    let first = compile_variant(module, inputs)?;
    Ok(CompiledModule {
        module: module.clone(),
        variants: Mutex::new(vec![Arc::new(first)]),
        max_variants: MAX_VARIANTS,
    })
}

/// The most variants a `CompiledModule` keeps; past it, a call with new
/// input types is an error (with a warning naming the limit) rather than
/// unbounded recompilation.
pub const MAX_VARIANTS: usize = 8;

/// Compiles one variant. Tracing runs the forward once; in training mode
/// that would update the buffers, so their values are restored afterwards
/// (the compiled call is what updates them).
fn compile_variant(module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<Variant> {
    let start = std::time::Instant::now();
    let training = module.is_training();
    let snapshot: Vec<(Tensor, Tensor)> = if training {
        module
            .named_buffers()
            .into_iter()
            .map(|(_, t)| Ok((t.clone(), t.detach().clone_tensor()?)))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let traced = crate::jit::trace(module, inputs);
    kiln_frontend::no_grad(|| -> kiln_frontend::Result<()> {
        for (live, saved) in &snapshot {
            live.copy_(saved)?;
        }
        Ok(())
    })?;
    let mut traced = traced?;
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
    let arena = Mutex::new(vec![0f32; program.arena_len()]);
    Ok(Variant {
        training,
        traced,
        program,
        arena,
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// A module compiled along its fusion plan (see the module docs), with a
/// cache of variants guarded by input types and the training flag.
pub struct CompiledModule {
    module: Arc<dyn Module>,
    variants: Mutex<Vec<Arc<Variant>>>,
    max_variants: usize,
}

impl CompiledModule {
    /// The variant for these inputs and the module's current mode,
    /// compiling it if needed.
    pub fn variant(&self, inputs: &[Tensor]) -> Result<Arc<Variant>> {
        let training = self.module.is_training();
        let types: Vec<kiln_ir::TensorType> = inputs.iter().map(tensor_type).collect();
        {
            let vs = self.variants.lock();
            if let Some(v) = vs
                .iter()
                .find(|v| v.training == training && v.traced.input_types() == types)
            {
                return Ok(v.clone());
            }
            if vs.len() >= self.max_variants {
                let msg = format!(
                    "recompilation limit reached: {} variants are compiled (limit {}); inputs {types:?} in {} mode would need another",
                    vs.len(),
                    self.max_variants,
                    if training { "training" } else { "eval" }
                );
                eprintln!("kiln: warning: {msg}");
                return Err(Error::Input(msg));
            }
        }
        let v = Arc::new(compile_variant(&self.module, inputs)?);
        self.variants.lock().push(v.clone());
        Ok(v)
    }

    /// How many variants are compiled.
    pub fn variant_count(&self) -> usize {
        self.variants.lock().len()
    }

    fn first(&self) -> Arc<Variant> {
        self.variants.lock()[0].clone()
    }

    /// Kernels of the first variant compiled to machine code.
    pub fn jit_kernel_count(&self) -> usize {
        self.first().jit_kernel_count()
    }

    /// Why pointwise kernels of the first variant fell back (see `Variant`).
    pub fn fallbacks(&self) -> Vec<String> {
        self.first().fallbacks().to_vec()
    }

    /// Trace + passes + codegen time of the first variant.
    pub fn compile_ms(&self) -> f64 {
        self.first().compile_ms()
    }

    /// Runs the variant for these inputs (compiling it on first use).
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.variant(inputs)?.forward(inputs)
    }
}

impl Variant {
    /// The traced, optimized graph this module runs.
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
    /// `conv2d`, `gather`, `fallback`, ...).
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

    /// Runs the compiled graph: user outputs returned, buffer updates
    /// written back to the live module (as `TracedModule::forward`).
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let want = self.traced.input_types();
        if inputs.len() != want.len() {
            return Err(Error::Input(format!(
                "compiled module takes {} input(s), got {}",
                want.len(),
                inputs.len()
            )));
        }
        for (i, (t, w)) in inputs.iter().zip(&want).enumerate() {
            if tensor_type(t) != *w {
                return Err(Error::Input(format!(
                    "input {i}: compiled for {w}, got {}",
                    tensor_type(t)
                )));
            }
        }
        let g = self.traced.graph();
        let bind = |k: &InputKind| self.traced.bind(k);
        let leaves: Vec<Tensor> = self
            .program
            .leaves()
            .iter()
            .map(|l| {
                let t = match l {
                    LeafSrc::User(i) => inputs[*i].clone(),
                    LeafSrc::State(k) => bind(k)?,
                    LeafSrc::Const(t) => t.clone(),
                };
                Ok(if t.dtype() == DType::F32 && !t.is_contiguous() {
                    t.contiguous()?
                } else {
                    t
                })
            })
            .collect::<Result<_>>()?;
        let outs = match self.arena.try_lock() {
            Some(mut arena) => self.program.run(g, &leaves, &mut arena, inputs, &bind)?,
            None => {
                let mut arena = vec![0f32; self.program.arena_len()];
                self.program.run(g, &leaves, &mut arena, inputs, &bind)?
            }
        };
        let values: std::collections::HashMap<kiln_ir::Value, Tensor> =
            g.outputs().iter().map(|o| o.value).zip(outs).collect();
        let mut user = Vec::new();
        let mut updates = Vec::new();
        for o in g.outputs() {
            let t = values[&o.value].clone();
            match &o.kind {
                kiln_ir::OutputKind::User => user.push(t),
                kiln_ir::OutputKind::BufferUpdate(name) => updates.push((name.clone(), t)),
            }
        }
        self.traced.write_back(updates)?;
        Ok(user)
    }
}
