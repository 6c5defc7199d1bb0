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

use crate::interpreter::{check_types, describe_node, exec_node, tensor_type};
use crate::{Error, Result, TracedModule};
use kiln_cranelift::{InputAccess, PointwiseKernel};
use kiln_frontend::nn::Module;
use kiln_frontend::nn::ModuleExt;
use kiln_frontend::Tensor;
use kiln_ir::{plan_fusion, DType, InputKind, KernelKind, NodeId, OpClass, Value};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

enum Step {
    /// Nodes run one by one with the eager kernels.
    Nodes(Vec<NodeId>),
    /// One JIT-compiled pointwise kernel.
    Jit(Box<PointwiseKernel>),
}

/// One compiled graph: the variant for one set of input types and one
/// training flag.
pub struct Variant {
    training: bool,
    traced: TracedModule,
    /// Listing number of each node (for error messages).
    pos: HashMap<NodeId, usize>,
    leaves: Vec<NodeId>,
    steps: Vec<Step>,
    fallbacks: Vec<String>,
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
    traced.run_passes()?;
    let plan = plan_fusion(traced.graph())?;
    let g = traced.graph();
    let order = g.topo_order()?;
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let leaves: Vec<NodeId> = order
        .into_iter()
        .filter(|&n| matches!(g.node(n).op.class(), OpClass::Input | OpClass::Constant))
        .collect();
    let mut steps = Vec::new();
    let mut fallbacks = Vec::new();
    for k in &plan.kernels {
        if k.kind == KernelKind::Pointwise {
            match PointwiseKernel::compile(g, k) {
                Ok(pk) => {
                    steps.push(Step::Jit(Box::new(pk)));
                    continue;
                }
                Err(e) => fallbacks.push(e.to_string()),
            }
        }
        steps.push(Step::Nodes(k.nodes.clone()));
    }
    Ok(Variant {
        training,
        traced,
        pos,
        leaves,
        steps,
        fallbacks,
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
        self.steps
            .iter()
            .filter(|s| matches!(s, Step::Jit(_)))
            .count()
    }

    /// Why each pointwise kernel that runs on the eager kernels could not
    /// be lowered (the backend's error, naming the op).
    pub fn fallbacks(&self) -> &[String] {
        &self.fallbacks
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
        let mut values: HashMap<Value, Tensor> = HashMap::new();
        let run_node = |n: NodeId, values: &mut HashMap<Value, Tensor>| -> Result<()> {
            let node = g.node(n);
            let args: Vec<Tensor> = g.operands(n).iter().map(|v| values[v].clone()).collect();
            let outs = exec_node(&node.op, &args, inputs, &bind)
                .and_then(|o| check_types(&o, &node.outputs).map(|_| o))
                .map_err(|e| Error::Exec {
                    node: describe_node(g, &self.pos, n),
                    source: Box::new(e),
                })?;
            for (k, t) in outs.into_iter().enumerate() {
                values.insert(Value::new(n, k), t);
            }
            Ok(())
        };
        for &n in &self.leaves {
            run_node(n, &mut values)?;
        }
        for step in &self.steps {
            match step {
                Step::Nodes(nodes) => {
                    for &n in nodes {
                        run_node(n, &mut values)?;
                    }
                }
                Step::Jit(k) => {
                    let ins: Vec<Tensor> = k
                        .inputs()
                        .iter()
                        .map(|i| {
                            let t = &values[&i.value];
                            let t = if t.dtype() == DType::F32 {
                                t.clone()
                            } else {
                                t.to_dtype(DType::F32)?
                            };
                            let t = if matches!(i.access, InputAccess::Scalar) && t.numel() == 1 {
                                t.reshape_to(&[1])?
                            } else {
                                t
                            };
                            Ok(t.contiguous()?)
                        })
                        .collect::<Result<_>>()?;
                    let refs: Vec<&Tensor> = ins.iter().collect();
                    let shape = k.shape().to_vec();
                    let n_out = k.outputs().len();
                    let mut bufs: Vec<Vec<f32>> = Vec::with_capacity(n_out);
                    Tensor::with_f32_slices(&refs, |slices| -> Result<()> {
                        bufs = (0..n_out)
                            .map(|_| kiln_cpu::buffers::alloc_uninit::<f32>(kiln_ir::numel(&shape)))
                            .collect();
                        let mut outs: Vec<&mut [f32]> =
                            bufs.iter_mut().map(|b| b.as_mut_slice()).collect();
                        k.run(slices, &mut outs).map_err(|e| Error::Input(e.0))
                    })??;
                    for (v, b) in k.outputs().iter().zip(bufs) {
                        let want = &g.value_type(*v);
                        let t = Tensor::from_vec(b, &shape)?;
                        let t = if want.dtype == DType::F32 {
                            t
                        } else {
                            t.to_dtype(want.dtype)?
                        };
                        values.insert(*v, t);
                    }
                }
            }
        }
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
