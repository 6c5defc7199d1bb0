//! Hooks in compiled training: full backward hooks and forward hooks on
//! submodules run as in eager mode (same order, same arguments, their
//! replacements flow on), registered before or after compilation (a new
//! hook recompiles). The compiled graph is cut at the hooked submodules:
//! compiled segments, each one `CompiledFunctionBackward` node, with the
//! hooked calls in eager autograd between them.

mod common;
use common::training_hooks as scenarios;
use kiln::jit::{compile_for_training, CompiledTrainModule};
use kiln::nn::prelude::*;
use kiln::Tensor;
use std::sync::Arc;

fn cpu(m: &Arc<dyn Module>, x: &Tensor) -> CompiledTrainModule {
    compile_for_training(m, std::slice::from_ref(x)).unwrap()
}

#[test]
fn backward_hooks_in_compiled_training_equal_eager() {
    scenarios::backward_hooks_in_compiled_training_equal_eager(&cpu);
}

#[test]
fn hooks_registered_after_compilation_recompile_and_run() {
    scenarios::hooks_registered_after_compilation_recompile_and_run(&cpu);
}
