//! `OpenClModule` (feature `opencl`): a module traced, optimized and lowered
//! by kiln-opencl to one OpenCL program, run on an OpenCL device.
//!
//! Data stays on the device: a call uploads the user inputs, uploads a
//! parameter or buffer only when its tensor changed since the last upload
//! (another storage, or a bumped version counter: an optimizer step,
//! `load_state_dict`, `copy_`), runs every kernel on device buffers and
//! downloads only the user outputs and the buffer updates, which are written
//! back to the live module; the device copy of an updated buffer is
//! refreshed on the device, so training-mode running stats are not
//! re-uploaded. `transfers()` counts host<->device copies.
//!
//! Ops without a device kernel (listed by `fallbacks()`, each naming the
//! op) run explicitly on the CPU with the eager kernels: their operands are
//! downloaded and their results uploaded (counted as transfers too).
//! Guards and variants work as for `CompiledModule`: other input types, a
//! train/eval switch or a changed module tree (a replaced child, a new or
//! removed hook: `compiled::fingerprint`, recomputed only when
//! `nn::structure_epoch()` moved) compile another variant (at most
//! `MAX_VARIANTS`).
//!
//! Hooks stay live across CPU/GPU segments, as in `CompiledModule`: the
//! module is traced with live hooks, the root's hooks run around the device
//! forward (`nn::call_with_forward`), and each call of a submodule with
//! hooks is a `module_call` step: its operand is downloaded, the live
//! submodule is called on the host (pre-hooks, forward, forward hooks,
//! exactly as eager, replacing values included) and its result uploaded.

use crate::compiled::{fingerprint, StateSnapshot, MAX_VARIANTS};
use crate::interpreter::{check_types, describe_node, exec_node, tensor_type};
use crate::{Error, Result, TracedModule};
use kiln_frontend::nn::{Module, ModuleExt};
use kiln_frontend::{Device, Tensor};
use kiln_ir::{DType, Graph, InputKind, NodeId, OutputKind, TensorType, Value};
use kiln_opencl::{Context, DeviceGraph, OclError, Step};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;

pub use kiln_opencl::{context, devices, DeviceInfo};

fn ocl(e: OclError) -> Error {
    Error::Input(e.to_string())
}

/// Contiguous little-endian bytes of `t` in its dtype (f32, i64, bool).
fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::F32 => t
            .to_vec::<f32>()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => t
            .to_vec::<i64>()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::Bool => t.to_vec::<bool>().iter().map(|&v| v as u8).collect(),
        d => {
            return Err(Error::Input(format!(
                "opencl backend: {} tensors cannot be moved to the device",
                d.short_name()
            )))
        }
    })
}

fn from_bytes(b: &[u8], ty: &TensorType) -> Result<Tensor> {
    Ok(match ty.dtype {
        DType::F32 => Tensor::from_vec(
            b.chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
                .collect::<Vec<f32>>(),
            &ty.shape,
        )?,
        DType::I64 => Tensor::from_vec(
            b.chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")))
                .collect::<Vec<i64>>(),
            &ty.shape,
        )?,
        DType::Bool => {
            Tensor::from_vec(b.iter().map(|&v| v != 0).collect::<Vec<bool>>(), &ty.shape)?
        }
        d => {
            return Err(Error::Input(format!(
                "opencl backend: {} values cannot be read from the device",
                d.short_name()
            )))
        }
    })
}

/// True if `t` is the tensor last uploaded (same storage, layout and
/// version).
fn fresh(prev: Option<&(Tensor, u64)>, t: &Tensor) -> bool {
    prev.is_some_and(|(prev, ver)| {
        prev.shares_storage(t)
            && prev.storage_offset() == t.storage_offset()
            && prev.strides() == t.strides()
            && t.version() == *ver
    })
}

/// One compiled graph on the device: the variant for one set of input
/// types, one training flag and one module-tree fingerprint.
pub struct ClVariant {
    training: bool,
    tree: u64,
    traced: TracedModule,
    pos: HashMap<NodeId, usize>,
    dg: Mutex<DeviceGraph>,
    /// State buffers as last uploaded: buffer -> (tensor, version).
    uploaded: Mutex<HashMap<usize, (Tensor, u64)>>,
    compile_ms: f64,
}

/// A module compiled for an OpenCL device (see the module docs).
pub struct OpenClModule {
    module: Arc<dyn Module>,
    ctx: Arc<Context>,
    variants: Mutex<Vec<Arc<ClVariant>>>,
    /// (structure epoch, tree fingerprint) last seen.
    seen: Mutex<(u64, u64)>,
}

/// Traces `module` on `inputs` and compiles it for OpenCL device `device`
/// (None: `KILN_OPENCL_DEVICE`, else 0).
pub fn compile_opencl(
    module: &Arc<dyn Module>,
    inputs: &[Tensor],
    device: Option<usize>,
) -> Result<OpenClModule> {
    let ctx = kiln_opencl::context(device).map_err(ocl)?;
    let epoch = kiln_frontend::nn::structure_epoch();
    let tree = fingerprint(&**module);
    let first = kiln_frontend::device::host_access(|| compile_variant(&ctx, module, inputs, tree))?;
    Ok(OpenClModule {
        module: module.clone(),
        ctx,
        variants: Mutex::new(vec![Arc::new(first)]),
        seen: Mutex::new((epoch, tree)),
    })
}

/// Traces with live hooks (the root's hooks are left to the caller, a
/// hooked submodule's call becomes a `module_call` node), restores the
/// buffers the tracing forward changed (by name, original tensor objects
/// included) and runs the standard passes.
fn trace_live(module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<TracedModule> {
    if inputs.len() != 1 {
        return Err(Error::Input(format!(
            "compile_opencl: kiln modules take one input tensor, got {}",
            inputs.len()
        )));
    }
    let snapshot = StateSnapshot::take(&**module, false)?;
    let trace = kiln_frontend::trace::trace_module_live_hooks(&**module, &inputs[0]);
    snapshot.restore(&**module)?;
    let mut traced = TracedModule::new(trace?.graph, module.clone())?;
    traced.run_passes()?;
    Ok(traced)
}

fn compile_variant(
    ctx: &Arc<Context>,
    module: &Arc<dyn Module>,
    inputs: &[Tensor],
    tree: u64,
) -> Result<ClVariant> {
    let start = std::time::Instant::now();
    let training = module.is_training();
    let traced = trace_live(module, inputs)?;
    let g = traced.graph();
    let order = g.topo_order()?;
    let pos = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let dg = DeviceGraph::compile(ctx, g).map_err(ocl)?;
    Ok(ClVariant {
        training,
        tree,
        traced,
        pos,
        dg: Mutex::new(dg),
        uploaded: Mutex::new(HashMap::new()),
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

/// Compiles a traced module (bound to a module or to stored weights, e.g.
/// `TracedModule::from_weights` or `runtime::load`) for OpenCL device
/// `device`, as it is (no further passes).
pub fn compile_traced(traced: TracedModule, device: Option<usize>) -> Result<ClVariant> {
    let ctx = kiln_opencl::context(device).map_err(ocl)?;
    let start = std::time::Instant::now();
    let g = traced.graph();
    let order = g.topo_order()?;
    let pos = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let dg = DeviceGraph::compile(&ctx, g).map_err(ocl)?;
    Ok(ClVariant {
        training: false,
        tree: 0,
        traced,
        pos,
        dg: Mutex::new(dg),
        uploaded: Mutex::new(HashMap::new()),
        compile_ms: start.elapsed().as_secs_f64() * 1e3,
    })
}

impl OpenClModule {
    /// The device this module runs on.
    pub fn device(&self) -> &DeviceInfo {
        self.ctx.info()
    }

    /// The compiled module's live module.
    pub fn module(&self) -> &Arc<dyn Module> {
        &self.module
    }

    /// The module tree's fingerprint, recomputed only when
    /// `nn::structure_epoch()` moved.
    fn tree(&self) -> u64 {
        let epoch = kiln_frontend::nn::structure_epoch();
        let mut seen = self.seen.lock();
        if seen.0 != epoch {
            *seen = (epoch, fingerprint(&*self.module));
        }
        seen.1
    }

    /// The variant for these inputs, the module's mode and its tree
    /// (children, hooks), compiled if needed.
    pub fn variant(&self, inputs: &[Tensor]) -> Result<Arc<ClVariant>> {
        let training = self.module.is_training();
        let tree = self.tree();
        let matches = |v: &ClVariant| {
            v.training == training
                && v.tree == tree
                && v.traced.input_types().len() == inputs.len()
                && v.traced
                    .input_types()
                    .iter()
                    .zip(inputs)
                    .all(|(t, x)| x.has_type(&t.shape, t.dtype))
        };
        {
            let vs = self.variants.lock();
            if let Some(v) = vs.iter().find(|v| matches(v)) {
                return Ok(v.clone());
            }
            if vs.len() >= MAX_VARIANTS {
                let types: Vec<TensorType> = inputs.iter().map(tensor_type).collect();
                let msg = format!(
                    "recompilation limit reached: {} OpenCL variants are compiled (limit {MAX_VARIANTS}); inputs {types:?} would need another",
                    vs.len()
                );
                eprintln!("kiln: warning: {msg}");
                return Err(Error::Input(msg));
            }
        }
        let v = kiln_frontend::device::host_access(|| {
            compile_variant(&self.ctx, &self.module, inputs, tree)
        })?;
        let v = Arc::new(v);
        self.variants.lock().push(v.clone());
        Ok(v)
    }

    pub fn variant_count(&self) -> usize {
        self.variants.lock().len()
    }

    /// The first compiled variant.
    pub fn first(&self) -> Arc<ClVariant> {
        self.variants.lock()[0].clone()
    }

    /// Why ops of the first variant run on the host (each names the op).
    pub fn fallbacks(&self) -> Vec<String> {
        self.first().fallbacks()
    }

    /// Kernel launches per call of the first variant.
    pub fn launch_count(&self) -> usize {
        self.first().dg.lock().program().launch_count()
    }

    /// The OpenCL C source of the first variant.
    pub fn source(&self) -> String {
        self.first().dg.lock().program().source.clone()
    }

    /// Trace + passes + lowering + program build time of the first variant.
    pub fn compile_ms(&self) -> f64 {
        self.first().compile_ms
    }

    /// Host<->device copies of all variants so far: (uploads, downloads).
    pub fn transfers(&self) -> (u64, u64) {
        self.variants.lock().iter().fold((0, 0), |(u, d), v| {
            let (a, b) = v.dg.lock().transfers();
            (u + a, d + b)
        })
    }

    /// Runs the module: the root's hooks (live) around the variant for
    /// these inputs (compiled on first use). Inputs may be on the CPU or on
    /// this module's device (`to_device(Device::OpenCl(n))`, kept on the
    /// device while unchanged); outputs are on the device when an input
    /// was. Parameters and buffers may be on either.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let root_hooks =
            self.module.core().has_call_hooks() || !kiln_frontend::nn::global_hook_ids().is_empty();
        if !root_hooks || inputs.len() != 1 {
            return self.run(inputs);
        }
        let y = kiln_frontend::nn::call_with_forward(&*self.module, &inputs[0], &|x| {
            let mut outs = self
                .run(std::slice::from_ref(x))
                .map_err(kiln_frontend::Error::from)?;
            Ok(outs.remove(0))
        })?;
        Ok(vec![y])
    }

    /// The variant for `inputs`, run; outputs moved to the device when an
    /// input is there.
    fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let here = Device::OpenCl(self.ctx.info().index);
        let mut on_device = false;
        for (i, t) in inputs.iter().enumerate() {
            match t.device() {
                Device::Cpu => {}
                d if d == here => on_device = true,
                d => {
                    return Err(Error::Input(format!(
                        "OpenCL module on {here}: input {i} is on {d} (move it with .to_device)"
                    )))
                }
            }
        }
        // The compiled program's explicit host steps (module calls,
        // fallbacks) and the trace of a new variant read device tensors'
        // host-resident values.
        let outs = kiln_frontend::device::host_access(|| {
            self.variant(inputs).and_then(|v| v.forward(inputs))
        })?;
        if !on_device {
            return Ok(outs);
        }
        Ok(outs
            .iter()
            .map(|t| t.to_device(here))
            .collect::<kiln_frontend::Result<_>>()?)
    }

    /// `forward` for one input and one output.
    pub fn call(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = self.forward(std::slice::from_ref(x))?;
        Ok(outs.remove(0))
    }
}

impl ClVariant {
    pub fn traced(&self) -> &TracedModule {
        &self.traced
    }

    pub fn fallbacks(&self) -> Vec<String> {
        self.dg.lock().program().fallbacks()
    }

    /// Kernel launches per call.
    pub fn launch_count(&self) -> usize {
        self.dg.lock().program().launch_count()
    }

    /// Host<->device copies so far: (uploads, downloads).
    pub fn transfers(&self) -> (u64, u64) {
        self.dg.lock().transfers()
    }

    /// The OpenCL C source.
    pub fn source(&self) -> String {
        self.dg.lock().program().source.clone()
    }

    /// Calls the live submodule at `path` (a `module_call` step).
    fn call_submodule(&self, path: &str, x: &Tensor) -> Result<Tensor> {
        let m = self.traced.module().ok_or_else(|| {
            Error::Binding(format!(
                "module_call `{path}`: this graph is not bound to a live module"
            ))
        })?;
        Ok(m.get_submodule(path)?.call(x)?)
    }

    /// The `module_call` steps' submodule paths, in order.
    pub fn module_calls(&self) -> Vec<String> {
        self.dg.lock().program().module_calls()
    }

    /// Uploads the state inputs whose tensors changed since their upload.
    fn bind_state(&self, dg: &DeviceGraph, g: &Graph) -> Result<()> {
        let mut up = self.uploaded.lock();
        for (kind, ty) in self.traced.state_inputs() {
            let Some(buf) = dg.program().input_buf(g, &kind) else {
                continue;
            };
            let t = self.traced.bind(&kind)?;
            if tensor_type(&t) != ty {
                return Err(Error::Binding(format!(
                    "{kind:?} is {}, the graph expects {ty}",
                    tensor_type(&t)
                )));
            }
            if !fresh(up.get(&buf), &t) {
                dg.write(buf, &to_bytes(&t)?).map_err(ocl)?;
                up.insert(buf, (t.clone(), t.version()));
            }
        }
        Ok(())
    }

    /// Runs the graph on the device: user outputs returned, buffer updates
    /// written back to the live module.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let want = self.traced.input_types();
        if inputs.len() != want.len() {
            return Err(Error::Input(format!(
                "OpenCL module takes {} input(s), got {}",
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
        let dg = self.dg.lock();
        {
            // An input on the device is uploaded once and kept while its
            // storage and version are unchanged; a CPU input every call.
            let mut up = self.uploaded.lock();
            for (i, t) in inputs.iter().enumerate() {
                if let Some(buf) = dg.program().input_buf(g, &InputKind::User(i)) {
                    let resident = !t.device().is_cpu();
                    if !(resident && fresh(up.get(&buf), t)) {
                        dg.write(buf, &to_bytes(t)?).map_err(ocl)?;
                        if resident {
                            up.insert(buf, (t.clone(), t.version()));
                        } else {
                            up.remove(&buf);
                        }
                    }
                }
            }
        }
        self.bind_state(&dg, g)?;
        let bind = |k: &InputKind| self.traced.bind(k);
        run_steps(&dg, g, &self.pos, inputs, &bind, &|path, x| {
            self.call_submodule(path, x)
        })?;
        dg.finish().map_err(ocl)?;
        let mut user = Vec::new();
        let mut updates = Vec::new();
        for o in g.outputs() {
            let t = from_bytes(&dg.read(g, o.value).map_err(ocl)?, g.value_type(o.value))?;
            match &o.kind {
                OutputKind::User => user.push(t),
                OutputKind::BufferUpdate(name) => updates.push((name.clone(), o.value, t)),
            }
        }
        let names: Vec<(String, Value)> = updates.iter().map(|(n, v, _)| (n.clone(), *v)).collect();
        self.traced
            .write_back(updates.into_iter().map(|(n, _, t)| (n, t)).collect())?;
        // The device already holds the new buffer values: refresh the
        // buffer's device copy there instead of uploading it next call.
        let mut up = self.uploaded.lock();
        for (name, v) in names {
            let kind = InputKind::Buffer(name);
            let (Some(dst), Some(l)) = (
                dg.program().input_buf(g, &kind),
                dg.program().layouts.get(&v),
            ) else {
                continue;
            };
            let ty = g.value_type(v);
            let contiguous = l.offset == 0
                && l.strides == kiln_ir::contiguous_strides(&ty.shape)
                && dg.program().bufs[l.buf].numel == ty.numel();
            if contiguous && l.buf != dst {
                dg.copy_buffer(l.buf, dst).map_err(ocl)?;
                let t = self.traced.bind(&kind)?;
                up.insert(dst, (t.clone(), t.version()));
            } else {
                up.remove(&dst);
            }
        }
        Ok(user)
    }
}

/// Runs a device program's steps in order: kernel launches, hooked
/// submodule calls (`call`: operand down, the live call, result up) and
/// explicit CPU fallbacks (operands down, the eager kernel, results up).
fn run_steps(
    dg: &DeviceGraph,
    g: &Graph,
    pos: &HashMap<NodeId, usize>,
    inputs: &[Tensor],
    bind: &dyn Fn(&InputKind) -> Result<Tensor>,
    call: &dyn Fn(&str, &Tensor) -> Result<Tensor>,
) -> Result<()> {
    for (i, step) in dg.program().steps.iter().enumerate() {
        match step {
            Step::Launch(_) => dg.launch(i).map_err(ocl)?,
            Step::Call { node, path } => {
                // A hooked submodule: operand down, the live module's
                // call (hooks + forward, as eager), result up.
                let n = *node;
                let v = g.operands(n)[0];
                let x = from_bytes(&dg.read(g, v).map_err(ocl)?, g.value_type(v))?;
                let y = call(path, &x)
                    .and_then(|y| {
                        check_types(std::slice::from_ref(&y), &g.node(n).outputs).map(|_| y)
                    })
                    .map_err(|e| Error::Exec {
                        node: describe_node(g, pos, n),
                        source: Box::new(e),
                    })?;
                let l = &dg.program().layouts[&Value::new(n, 0)];
                dg.write(l.buf, &to_bytes(&y)?).map_err(ocl)?;
            }
            Step::Host { node, .. } => {
                // Explicit CPU fallback: operands down, results up.
                let n = *node;
                let args = g
                    .operands(n)
                    .iter()
                    .map(|&v| from_bytes(&dg.read(g, v).map_err(ocl)?, g.value_type(v)))
                    .collect::<Result<Vec<_>>>()?;
                let want = &g.node(n).outputs;
                let outs = exec_node(&g.node(n).op, &args, inputs, bind)
                    .and_then(|o| check_types(&o, want).map(|_| o))
                    .map_err(|e| Error::Exec {
                        node: describe_node(g, pos, n),
                        source: Box::new(e),
                    })?;
                for (k, t) in outs.iter().enumerate() {
                    let l = &dg.program().layouts[&Value::new(n, k)];
                    dg.write(l.buf, &to_bytes(t)?).map_err(ocl)?;
                }
            }
        }
    }
    Ok(())
}

/// A bare graph compiled for an OpenCL device: compiled training's forward
/// and backward graphs (`training::compile_for_training_opencl`). Each call
/// uploads its inputs and the parameters and buffers `bind` gives, runs the
/// program and downloads every output (in graph order).
pub(crate) struct ClGraphExec {
    graph: Graph,
    pos: HashMap<NodeId, usize>,
    dg: Mutex<DeviceGraph>,
}

impl ClGraphExec {
    /// Runs the compile pipeline on `graph` and renders it for `ctx`'s
    /// device.
    pub(crate) fn new(ctx: &Arc<Context>, mut graph: Graph) -> Result<ClGraphExec> {
        kiln_ir::passes::PassManager::compile_pipeline().run(&mut graph)?;
        let order = graph.topo_order()?;
        let pos = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
        let dg = DeviceGraph::compile(ctx, &graph).map_err(ocl)?;
        Ok(ClGraphExec {
            graph,
            pos,
            dg: Mutex::new(dg),
        })
    }

    /// Nodes run on the CPU (`op: reason`).
    pub(crate) fn fallbacks(&self) -> Vec<String> {
        self.dg.lock().program().fallbacks()
    }

    pub(crate) fn run(
        &self,
        inputs: &[Tensor],
        bind: &dyn Fn(&InputKind) -> Result<Tensor>,
    ) -> Result<Vec<Tensor>> {
        let g = &self.graph;
        let dg = self.dg.lock();
        for &n in g.inputs() {
            let kiln_ir::Op::Input { kind, ty } = &g.node(n).op else {
                continue;
            };
            let Some(buf) = dg.program().input_buf(g, kind) else {
                continue;
            };
            let t = match kind {
                InputKind::User(i) => inputs.get(*i).cloned().ok_or_else(|| {
                    Error::Input(format!("the graph reads input {i}, {} given", inputs.len()))
                })?,
                k => bind(k)?,
            };
            if tensor_type(&t) != *ty {
                return Err(Error::Input(format!(
                    "{kind:?}: compiled for {ty}, got {}",
                    tensor_type(&t)
                )));
            }
            dg.write(buf, &to_bytes(&t)?).map_err(ocl)?;
        }
        run_steps(&dg, g, &self.pos, inputs, bind, &|path, _| {
            Err(Error::Binding(format!(
                "module_call `{path}`: compiled training cuts graphs at hooked submodules"
            )))
        })?;
        dg.finish().map_err(ocl)?;
        g.outputs()
            .iter()
            .map(|o| from_bytes(&dg.read(g, o.value).map_err(ocl)?, g.value_type(o.value)))
            .collect()
    }
}
