//! Compiled mode keeps hooks live and guards the module tree: forward
//! pre-hooks and forward hooks on submodules (and the root) run at every
//! compiled call and may replace values, whether registered before or after
//! compilation; a replaced child, a new hook, another batch size or a
//! train/eval switch each compile exactly one new variant; the variant
//! limit is respected (calls past it run eagerly, correctly).

mod common;
use common::{model, rel};
use kiln::nn::prelude::*;
use kiln::{jit, DType, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

fn same(c: &jit::CompiledModule, m: &Arc<dyn Module>, x: &Tensor) {
    let want = kiln::no_grad(|| m.call(x)).unwrap();
    let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    let e = rel(&got[0], &want);
    assert!(e <= 1e-5, "compiled vs eager {e:.2e}");
}

#[test]
fn hooks_registered_before_compile_run_live_and_replace_values() {
    let (m, x) = model("simple_net");
    m.eval();
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let relu = m.get_submodule("relu").unwrap().arc().unwrap();
    let _h1 = relu.register_forward_hook(move |_, _, y| {
        c2.fetch_add(1, Ordering::SeqCst);
        Ok(Some(y.add_scalar(1.0)?))
    });
    let layer2 = m.get_submodule("layer2").unwrap().arc().unwrap();
    let _h2 = layer2.register_forward_pre_hook(|_, x| Ok(Some(x.mul_scalar(2.0)?)));
    let _h3 = m.register_forward_hook(|_, _, y| Ok(Some(y.mul_scalar(3.0)?)));
    let c = jit::compile(&m, &[x.clone()]).unwrap();
    let v = c.first();
    assert_eq!(
        v.step_names()
            .iter()
            .filter(|s| **s == "module_call")
            .count(),
        2,
        "steps {:?}",
        v.step_names()
    );
    let before = calls.load(Ordering::SeqCst);
    same(&c, &m, &x); // one eager call, one compiled call
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 2,
        "the hook ran in compiled mode"
    );
    kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), before + 3);
    assert_eq!(c.variant_count(), 1);
}

#[test]
fn hooks_registered_after_compile_recompile_once_and_removal_restores() {
    let (m, x) = model("seed_cnn");
    m.eval();
    let c = jit::compile(&m, &[x.clone()]).unwrap();
    same(&c, &m, &x);
    let conv = m.get_submodule("net.4").unwrap().arc().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    let mut h = conv.register_forward_hook(move |_, _, y| {
        s2.fetch_add(1, Ordering::SeqCst);
        Ok(Some(y.neg()?))
    });
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 2, "one recompilation for the new hook");
    // Eager call, the trace of the new variant (it runs the forward once,
    // as torch.jit.trace does), the compiled call.
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 2, "cached");
    assert_eq!(seen.load(Ordering::SeqCst), 5);
    h.remove();
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 2, "the hook-free variant is reused");
    assert_eq!(seen.load(Ordering::SeqCst), 5, "removed hooks do not run");
    // A pre-hook replacing the input of a hooked submodule.
    let bn = m.get_submodule("net.3").unwrap().arc().unwrap();
    let _p = bn.register_forward_pre_hook(|_, x| Ok(Some(x.mul_scalar(0.5)?)));
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 3);
}

#[test]
fn guards_each_cause_exactly_one_recompilation() {
    let (m, x) = model("simple_net");
    m.eval();
    let c = jit::compile(&m, &[x.clone()]).unwrap();
    assert_eq!(c.variant_count(), 1);
    // A new batch size.
    let x2 = Tensor::randn(&[5, 784], DType::F32);
    same(&c, &m, &x2);
    assert_eq!(c.variant_count(), 2);
    // eval -> train.
    m.train(true);
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 3);
    m.eval();
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 3);
    // A child replaced (ReLU -> LeakyReLU), as in the design notes.
    m.set_submodule("relu", Arc::new(LeakyReLU::new(0.2)))
        .unwrap();
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 4);
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 4);
    // A new hook anywhere in the tree.
    let l1 = m.get_submodule("layer1").unwrap().arc().unwrap();
    let _h = l1.register_forward_pre_hook(|_, _| Ok(None));
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 5);
}

#[test]
fn variant_limit_is_respected_and_calls_past_it_run_eagerly() {
    let (m, x) = model("simple_net");
    m.eval();
    let opts = jit::CompileOptions {
        max_variants: 2,
        ..Default::default()
    };
    let c = jit::compile_with(&m, &[x.clone()], opts).unwrap();
    for b in [3, 4, 5, 6] {
        same(&c, &m, &Tensor::randn(&[b, 784], DType::F32));
    }
    assert_eq!(c.variant_count(), 2);
    assert_eq!(c.eager_call_count(), 3);
    // Without recompilation, a new shape runs eagerly, correctly.
    let opts = jit::CompileOptions {
        allow_recompile: false,
        ..Default::default()
    };
    let c = jit::compile_with(&m, &[x.clone()], opts).unwrap();
    same(&c, &m, &Tensor::randn(&[7, 784], DType::F32));
    assert_eq!((c.variant_count(), c.eager_call_count()), (1, 1));
}

#[test]
fn parameter_changes_are_seen_without_recompiling() {
    let (m, x) = model("seed_cnn");
    m.eval();
    let c = jit::compile(&m, &[x.clone()]).unwrap();
    kiln::no_grad(|| {
        m.get_parameter("net.4.weight")
            .unwrap()
            .mul_scalar_(0.5)
            .unwrap();
        m.get_buffer("net.6.running_var")
            .unwrap()
            .mul_scalar_(2.0)
            .unwrap();
    });
    same(&c, &m, &x);
    // A parameter replaced by a new tensor object (rebinding by name).
    let l = m.get_submodule("net.0").unwrap();
    l.core()
        .register_parameter(
            "bias",
            Some(Parameter::new(Tensor::randn(&[32], DType::F32)).unwrap()),
        )
        .unwrap();
    same(&c, &m, &x);
    assert_eq!(c.variant_count(), 1);
}
