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
//! Guards and variants work as for `CompiledModule`: other input types or a
//! train/eval switch compile another variant (at most `MAX_VARIANTS`).

use crate::compiled::MAX_VARIANTS;
use crate::interpreter::{check_types, describe_node, exec_node, tensor_type};
use crate::{Error, Result, TracedModule};
use kiln_frontend::nn::{Module, ModuleExt};
use kiln_frontend::Tensor;
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

/// One compiled graph on the device.
pub struct ClVariant {
    training: bool,
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
}

/// Traces `module` on `inputs` and compiles it for OpenCL device `device`
/// (None: `KILN_OPENCL_DEVICE`, else 0).
pub fn compile_opencl(
    module: &Arc<dyn Module>,
    inputs: &[Tensor],
    device: Option<usize>,
) -> Result<OpenClModule> {
    let ctx = kiln_opencl::context(device).map_err(ocl)?;
    let first = compile_variant(&ctx, module, inputs)?;
    Ok(OpenClModule {
        module: module.clone(),
        ctx,
        variants: Mutex::new(vec![Arc::new(first)]),
    })
}

/// Traces (restoring the buffers a training-mode trace updated) and runs
/// the standard passes.
pub(crate) fn trace_optimized(module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<TracedModule> {
    let snapshot: Vec<(String, Tensor, Tensor)> = if module.is_training() {
        module
            .named_buffers()
            .into_iter()
            .map(|(n, t)| Ok((n, t.clone(), t.detach().clone_tensor()?)))
            .collect::<Result<_>>()?
    } else {
        Vec::new()
    };
    let traced = crate::jit::trace(module, inputs);
    kiln_frontend::no_grad(|| -> kiln_frontend::Result<()> {
        for (name, live, saved) in &snapshot {
            live.copy_(saved)?;
            // A buffer the forward reassigned (`self.running_mean = ...`,
            // MyBatchNorm1d) gets its original tensor object back.
            if !module.get_buffer(name)?.shares_storage(live) {
                let (owner, leaf) = match name.rsplit_once('.') {
                    Some((p, l)) => (Some(p), l),
                    None => (None, name.as_str()),
                };
                match owner {
                    Some(p) => module
                        .get_submodule(p)?
                        .core()
                        .set_buffer(leaf, Some(live.clone()))?,
                    None => module.core().set_buffer(leaf, Some(live.clone()))?,
                }
            }
        }
        Ok(())
    })?;
    let mut traced = traced?;
    traced.run_passes()?;
    Ok(traced)
}

fn compile_variant(
    ctx: &Arc<Context>,
    module: &Arc<dyn Module>,
    inputs: &[Tensor],
) -> Result<ClVariant> {
    let start = std::time::Instant::now();
    let training = module.is_training();
    let traced = trace_optimized(module, inputs)?;
    let g = traced.graph();
    let order = g.topo_order()?;
    let pos = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let dg = DeviceGraph::compile(ctx, g).map_err(ocl)?;
    Ok(ClVariant {
        training,
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

    /// The variant for these inputs and the module's mode, compiled if needed.
    pub fn variant(&self, inputs: &[Tensor]) -> Result<Arc<ClVariant>> {
        let training = self.module.is_training();
        let types: Vec<TensorType> = inputs.iter().map(tensor_type).collect();
        {
            let vs = self.variants.lock();
            if let Some(v) = vs
                .iter()
                .find(|v| v.training == training && v.traced.input_types() == types)
            {
                return Ok(v.clone());
            }
            if vs.len() >= MAX_VARIANTS {
                let msg = format!(
                    "recompilation limit reached: {} OpenCL variants are compiled (limit {MAX_VARIANTS}); inputs {types:?} would need another",
                    vs.len()
                );
                eprintln!("kiln: warning: {msg}");
                return Err(Error::Input(msg));
            }
        }
        let v = Arc::new(compile_variant(&self.ctx, &self.module, inputs)?);
        self.variants.lock().push(v.clone());
        Ok(v)
    }

    pub fn variant_count(&self) -> usize {
        self.variants.lock().len()
    }

    fn first(&self) -> Arc<ClVariant> {
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

    /// Runs the variant for these inputs (compiling it on first use).
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.variant(inputs)?.forward(inputs)
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
            let fresh = up.get(&buf).is_some_and(|(prev, ver)| {
                prev.shares_storage(&t)
                    && prev.storage_offset() == t.storage_offset()
                    && prev.strides() == t.strides()
                    && t.version() == *ver
            });
            if !fresh {
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
        for (i, t) in inputs.iter().enumerate() {
            if let Some(buf) = dg.program().input_buf(g, &InputKind::User(i)) {
                dg.write(buf, &to_bytes(t)?).map_err(ocl)?;
            }
        }
        self.bind_state(&dg, g)?;
        let bind = |k: &InputKind| self.traced.bind(k);
        for (i, step) in dg.program().steps.iter().enumerate() {
            match step {
                Step::Launch(_) => dg.launch(i).map_err(ocl)?,
                Step::Host { node, .. } => {
                    // Explicit CPU fallback: operands down, results up.
                    let n = *node;
                    let args = g
                        .operands(n)
                        .iter()
                        .map(|&v| from_bytes(&dg.read(g, v).map_err(ocl)?, g.value_type(v)))
                        .collect::<Result<Vec<_>>>()?;
                    let want = &g.node(n).outputs;
                    let outs = exec_node(&g.node(n).op, &args, inputs, &bind)
                        .and_then(|o| check_types(&o, want).map(|_| o))
                        .map_err(|e| Error::Exec {
                            node: describe_node(g, &self.pos, n),
                            source: Box::new(e),
                        })?;
                    for (k, t) in outs.iter().enumerate() {
                        let l = &dg.program().layouts[&Value::new(n, k)];
                        dg.write(l.buf, &to_bytes(t)?).map_err(ocl)?;
                    }
                }
            }
        }
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
