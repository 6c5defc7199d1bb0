//! Compiled mode keeps hooks live and guards the module tree: forward
//! pre-hooks and forward hooks on submodules (and the root) run at every
//! compiled call and may replace values, whether registered before or after
//! compilation; a replaced child, a new hook, another batch size or a
//! train/eval switch each compile exactly one new variant; the variant
//! limit is respected (calls past it run eagerly, correctly).

mod common;
use common::{model, rel, scenarios};
use kiln::nn::prelude::*;
use kiln::{jit, DType, Tensor};
use std::sync::atomic::Ordering;
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
    let (calls, _handles) = scenarios::three_replacing_hooks(&m);
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
    scenarios::hooks_after_compile(&|m, x| Box::new(jit::compile(m, &[x.clone()]).unwrap()));
}

#[test]
fn guards_each_cause_exactly_one_recompilation() {
    scenarios::guards(&|m, x| Box::new(jit::compile(m, &[x.clone()]).unwrap()));
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
