//! Hooks in compiled training: full backward hooks and forward hooks on
//! submodules run as in eager mode (same order, same arguments, their
//! replacements flow on), registered before or after compilation (a new
//! hook recompiles). The compiled graph is cut at the hooked submodules:
//! compiled segments, each one `CompiledFunctionBackward` node, with the
//! hooked calls in eager autograd between them.

mod common;
use common::{model, rel};
use kiln::jit::compile_for_training;
use kiln::nn::prelude::*;
use kiln::Tensor;
use std::sync::{Arc, Mutex};

type Log = Arc<Mutex<Vec<(String, f64, f64)>>>;

/// A full backward hook that logs (name, sum of grad_input[0], sum of
/// grad_output[0]) and halves grad_input.
fn log_hook(m: &Arc<dyn Module>, path: &str, log: &Log) -> kiln::hooks::RemovableHandle {
    let l = log.clone();
    let name = path.to_string();
    let sub = m.get_submodule(path).unwrap().arc().unwrap();
    sub.register_full_backward_hook(move |gi, go| {
        let s = |g: &[Option<Tensor>]| {
            g.first()
                .and_then(|t| t.as_ref())
                .map(|t| t.sum().unwrap().item().unwrap())
                .unwrap_or(f64::NAN)
        };
        l.lock().unwrap().push((name.clone(), s(gi), s(go)));
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

fn step(m: &Arc<dyn Module>, y: Tensor) -> Vec<Tensor> {
    y.square().unwrap().sum().unwrap().backward().unwrap();
    let g = grads(m);
    m.zero_grad(true).unwrap();
    g
}

fn same_log(a: &[(String, f64, f64)], b: &[(String, f64, f64)]) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert_eq!(x.0, y.0, "order: {a:?} vs {b:?}");
        for (p, q) in [(x.1, y.1), (x.2, y.2)] {
            // NaN: no gradient (grad_input of a module whose input does not
            // require grad), on both sides.
            let same = (p.is_nan() && q.is_nan()) || (p - q).abs() <= 1e-4 * (1.0 + q.abs());
            assert!(same, "{a:?} vs {b:?}");
        }
    }
}

#[test]
fn backward_hooks_in_compiled_training_equal_eager() {
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
    let cm = compile_for_training(&m, std::slice::from_ref(&x)).unwrap();
    log.lock().unwrap().clear();
    let compiled = step(&m, cm.call(&x).unwrap());
    let compiled_log = std::mem::take(&mut *log.lock().unwrap());
    same_log(&compiled_log, &eager_log);
    for (a, b) in compiled.iter().zip(&eager) {
        assert!(rel(a, b) <= 1e-4, "grad with halved grad_input");
    }
}

#[test]
fn hooks_registered_after_compilation_recompile_and_run() {
    let (m, x) = model("seed_cnn");
    m.train(true);
    let cm = compile_for_training(&m, std::slice::from_ref(&x)).unwrap();
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
