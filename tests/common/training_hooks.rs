//! Hooks in compiled training, shared by the CPU
//! (`tests/compiled_training_hooks.rs`) and OpenCL
//! (`tests/opencl_training.rs`) backends: full backward hooks and forward
//! hooks on submodules run as in eager mode (same order, same arguments,
//! their replacements flow on), registered before or after compilation (a
//! new hook recompiles).

use super::training::CompileTrain;
use super::{model, rel};
use kiln::nn::prelude::*;
use kiln::Tensor;
use std::sync::{Arc, Mutex};

/// (module, grad_input[0], grad_output[0]) of each backward hook call.
type Entry = (String, Option<Tensor>, Option<Tensor>);
type Log = Arc<Mutex<Vec<Entry>>>;

/// A full backward hook that logs (name, grad_input[0], grad_output[0])
/// and halves grad_input.
pub fn log_hook(m: &Arc<dyn Module>, path: &str, log: &Log) -> kiln::hooks::RemovableHandle {
    let l = log.clone();
    let name = path.to_string();
    let sub = m.get_submodule(path).unwrap().arc().unwrap();
    sub.register_full_backward_hook(move |gi, go| {
        let first = |g: &[Option<Tensor>]| {
            g.first()
                .and_then(|t| t.as_ref())
                .map(|t| t.detach().clone_tensor().unwrap())
        };
        l.lock().unwrap().push((name.clone(), first(gi), first(go)));
        Some(
            gi.iter()
                .map(|g| g.as_ref().map(|g| g.mul_scalar(0.5).unwrap()))
                .collect(),
        )
    })
}

fn grads(m: &Arc<dyn Module>) -> Vec<Tensor> {
    m.parameters()
        .iter()
        .map(|p| p.grad().unwrap().clone_tensor().unwrap())
        .collect()
}

/// Backward of sum(y * r) for a fixed pseudo-random r (not sum(y^2): after
/// seed_cnn's final training-mode BatchNorm that loss is constant, and
/// every gradient is rounding noise), then the gradients.
fn step(m: &Arc<dyn Module>, y: Tensor) -> Vec<Tensor> {
    let n = y.numel();
    let r: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
        .collect();
    let r = Tensor::from_vec(r, &y.shape()).unwrap();
    y.mul(&r).unwrap().sum().unwrap().backward().unwrap();
    let g = grads(m);
    m.zero_grad(true).unwrap();
    g
}

/// Same calls in the same order, with the same gradients (relative 1e-4
/// of the tensor's max magnitude, the fixtures' gradient tolerance; `None`
/// where the module's input does not require grad, on both sides).
fn same_log(a: &[Entry], b: &[Entry]) {
    let names = |l: &[Entry]| l.iter().map(|e| e.0.clone()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "hook calls and their order");
    for (x, y) in a.iter().zip(b) {
        for (p, q) in [(&x.1, &y.1), (&x.2, &y.2)] {
            match (p, q) {
                (Some(p), Some(q)) => {
                    let e = rel(p, q);
                    assert!(e <= 1e-4, "{}: hook argument differs by {e:.2e}", x.0);
                }
                (None, None) => {}
                _ => panic!("{}: a gradient on one side only", x.0),
            }
        }
    }
}

/// Full backward hooks on two submodules (halving grad_input): the
/// compiled calls equal eager's (order, arguments, gradients).
pub fn backward_hooks_in_compiled_training_equal_eager(compile: CompileTrain) {
    let (m, x) = model("simple_net");
    m.train(true);
    let log: Log = Arc::default();
    let _h1 = log_hook(&m, "layer1", &log);
    let _h2 = log_hook(&m, "layer2", &log);
    let eager = step(&m, m.call(&x).unwrap());
    let eager_log = std::mem::take(&mut *log.lock().unwrap());
    assert_eq!(eager_log.len(), 2);
    assert_eq!(
        eager_log[0].0, "layer2",
        "backward runs layer2's hook first"
    );
    let cm = compile(&m, &x);
    log.lock().unwrap().clear();
    let compiled = step(&m, cm.call(&x).unwrap());
    let compiled_log = std::mem::take(&mut *log.lock().unwrap());
    same_log(&compiled_log, &eager_log);
    for (a, b) in compiled.iter().zip(&eager) {
        assert!(rel(a, b) <= 1e-4, "grad with halved grad_input");
    }
}

/// A forward hook and a backward hook registered after compilation: one
/// recompilation, eager's calls and gradients; removed again: the first
/// variant's gradients.
pub fn hooks_registered_after_compilation_recompile_and_run(compile: CompileTrain) {
    let (m, x) = model("seed_cnn");
    m.train(true);
    let cm = compile(&m, &x);
    let base = step(&m, cm.call(&x).unwrap());
    assert_eq!(cm.variant_count(), 1);
    // A forward hook replacing an output and a backward hook, added now.
    let log: Log = Arc::default();
    let mut h = log_hook(&m, "net.4", &log);
    let conv = m.get_submodule("net.7").unwrap().arc().unwrap();
    let mut f = conv.register_forward_hook(|_, _, y| Ok(Some(y.mul_scalar(1.5)?)));
    // Eager reference (training mode updates the BatchNorm buffers: restore).
    let sd: Vec<Tensor> = m
        .named_buffers()
        .iter()
        .map(|(_, b)| b.detach().clone_tensor().unwrap())
        .collect();
    let restore = |m: &Arc<dyn Module>| {
        kiln::no_grad(|| {
            for ((_, b), s) in m.named_buffers().iter().zip(&sd) {
                b.copy_(s).unwrap();
            }
        })
    };
    let eager = step(&m, m.call(&x).unwrap());
    let eager_log = std::mem::take(&mut *log.lock().unwrap());
    restore(&m);
    let compiled = step(&m, cm.call(&x).unwrap());
    assert_eq!(cm.variant_count(), 2, "the new hooks recompiled once");
    let compiled_log = std::mem::take(&mut *log.lock().unwrap());
    same_log(&compiled_log, &eager_log);
    for (a, b) in compiled.iter().zip(&eager) {
        assert!(rel(a, b) <= 1e-4);
    }
    // Removed again: the first variant's gradients come back.
    h.remove();
    f.remove();
    restore(&m);
    let again = step(&m, cm.call(&x).unwrap());
    assert_eq!(cm.variant_count(), 2);
    assert!(log.lock().unwrap().is_empty());
    for (a, b) in again.iter().zip(&base) {
        assert!(rel(a, b) <= 1e-4);
    }
}
