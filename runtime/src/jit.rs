//! `kiln::jit`: trace a module into a `TracedModule` and check a trace.
//!
//! `trace(&model, &[x])` runs the model's forward once under the frontend's
//! tracer (in the model's current train/eval mode, so its side effects on
//! buffers happen once, as with `torch.jit.trace`) and returns a
//! `TracedModule` bound to the live model: parameters and buffers are read
//! by name at every call. `check_trace` re-runs eager and traced on other
//! inputs and reports where they diverge (a trace that froze a branch or a
//! host value does not generalize).

use crate::{Error, Result, TracedModule};
use kiln_frontend::nn::{Module, ModuleExt};
use kiln_frontend::Tensor;
use std::sync::Arc;

/// A trace and the warnings raised while recording it.
pub struct Traced {
    pub module: TracedModule,
    pub warnings: Vec<String>,
}

/// Traces `module.call(inputs[0])` (kiln modules take one tensor).
pub fn trace(module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<TracedModule> {
    Ok(trace_with_warnings(module, inputs)?.module)
}

/// `trace`, also returning the tracer's warnings (they are printed to
/// stderr as well).
pub fn trace_with_warnings(module: &Arc<dyn Module>, inputs: &[Tensor]) -> Result<Traced> {
    if inputs.len() != 1 {
        return Err(Error::Input(format!(
            "trace: kiln modules take one input tensor, got {}",
            inputs.len()
        )));
    }
    let t = kiln_frontend::trace::trace_module(&**module, &inputs[0])?;
    Ok(Traced {
        module: TracedModule::new(t.graph, module.clone())?,
        warnings: t.warnings,
    })
}

/// The result of `check_trace`: the largest difference between eager and
/// traced outputs, relative to the eager output's largest magnitude.
#[derive(Debug, Clone, PartialEq)]
pub struct TraceCheck {
    pub max_abs_diff: f64,
    pub max_rel_diff: f64,
}

/// Runs the eager module and the trace on `inputs` and compares their
/// outputs; an error if they differ by more than `rtol` (relative to the
/// eager output's max magnitude). The module's parameters and buffers are
/// restored after each run, so the check has no side effects.
pub fn check_trace(traced: &TracedModule, inputs: &[Tensor], rtol: f64) -> Result<TraceCheck> {
    let module = traced
        .module()
        .ok_or_else(|| Error::Input("check_trace needs a trace bound to a module".into()))?
        .clone();
    let snapshot: Vec<(String, Tensor, Tensor)> = module
        .state_dict()
        .iter()
        .map(|(k, v)| Ok((k.to_string(), v.clone(), v.detach().clone_tensor()?)))
        .collect::<Result<_>>()?;
    let restore = || -> Result<()> {
        kiln_frontend::no_grad(|| -> kiln_frontend::Result<()> {
            for (_, live, saved) in &snapshot {
                live.copy_(saved)?;
            }
            Ok(())
        })?;
        Ok(())
    };
    let eager = kiln_frontend::no_grad(|| module.call(&inputs[0]))?;
    restore()?;
    let got = kiln_frontend::no_grad(|| traced.forward(inputs))?;
    restore()?;
    let want = eager.to_vec::<f64>();
    let have = got
        .first()
        .ok_or_else(|| Error::Input("the trace returned no output".into()))?;
    if have.shape() != eager.shape() {
        return Err(Error::Input(format!(
            "check_trace: the trace returned shape {:?} but eager returned {:?} for this input",
            have.shape(),
            eager.shape()
        )));
    }
    let have = have.to_vec::<f64>();
    let scale = want.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    let max_abs = want
        .iter()
        .zip(&have)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f64, |m, d| if d.is_nan() || d > m { d } else { m });
    let check = TraceCheck {
        max_abs_diff: max_abs,
        max_rel_diff: max_abs / scale,
    };
    if max_abs.is_nan() || check.max_rel_diff > rtol {
        return Err(Error::Input(format!(
            "check_trace: the trace diverges from eager on this input (max abs diff {:.3e}, relative {:.3e} > {rtol:.1e}); the trace probably froze a branch or a host-read value",
            check.max_abs_diff, check.max_rel_diff
        )));
    }
    Ok(check)
}

pub use crate::compiled::{
    compile, compile_with, Backend, CompileOptions, CompiledModule, VerifyReport,
};
pub use crate::training::{
    compile_for_training, compile_training, CompiledTrainModule, LossFn, TrainStep,
};

/// Compiled training with the graphs on an OpenCL device (feature `opencl`).
#[cfg(feature = "opencl")]
pub use crate::training::compile_for_training_opencl;
