//! Compiled training on OpenCL (feature `opencl`, PoCL in CI):
//! `compile_for_training_opencl` runs the forward and the IR-derived
//! backward graphs on the device; for every zoo model the gradients equal
//! the fixture's (and eager kiln's), and three SGD and three Adam steps
//! (eager optimizer on the host, compiled forward and backward on the
//! device) give the fixture's losses, parameters and buffers; backward and
//! forward hooks on submodules run as in eager mode (graph cut at hooked
//! modules, the segments on the device).
#![cfg(feature = "opencl")]

mod common;

use kiln::jit::{compile_for_training_opencl, CompiledTrainModule};
use kiln::nn::prelude::*;
use kiln::Tensor;
use std::sync::Arc;

fn opencl(m: &Arc<dyn Module>, x: &Tensor) -> CompiledTrainModule {
    compile_for_training_opencl(m, std::slice::from_ref(x), None).unwrap()
}

common::training::zoo_training_tests!(crate::opencl, false);

#[test]
fn the_backward_runs_on_the_device_and_names_its_host_ops() {
    let (m, x) = common::model("seed_cnn");
    m.train(true);
    let cm = opencl(&m, &x);
    let v = cm.variant(std::slice::from_ref(&x)).unwrap();
    // Every fallback names its op; the forward's conv/pool/batch norm and
    // the backward's reductions run as device kernels.
    let fb = v.fallbacks();
    println!("seed_cnn on OpenCL, host ops: {fb:?}");
    assert!(!fb.is_empty());
    assert!(
        fb.iter()
            .all(|f| f.starts_with("opencl backend: op ") && f.ends_with("has no device kernel")),
        "{fb:?}"
    );
    for on_device in ["op conv2d ", "op batch_norm ", "op sum ", "op mul "] {
        assert!(!fb.iter().any(|f| f.contains(on_device)), "{fb:?}");
    }
    let y = cm.call(&x).unwrap();
    y.sum().unwrap().backward().unwrap();
    assert!(m.parameters().iter().all(|p| p.grad().is_some()));
}

#[test]
fn backward_hooks_on_opencl_equal_eager() {
    common::training_hooks::backward_hooks_in_compiled_training_equal_eager(&opencl);
}

#[test]
fn hooks_registered_after_compilation_on_opencl_recompile_and_run() {
    common::training_hooks::hooks_registered_after_compilation_recompile_and_run(&opencl);
}
