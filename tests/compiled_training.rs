//! Compiled training (`kiln::jit::compile_for_training` /
//! `compile_training`) against PyTorch's fixtures: for every zoo model the
//! compiled forward + compiled backward give the fixture's `grad.<param>`,
//! and three SGD and three Adam steps through the compiled training step
//! give the fixture's losses, parameters and buffers. Also: the gradients
//! equal eager kiln's, the autograd engine features work through the
//! compiled node, and a frozen layer gets no gradient and no update
//! (unfreezing it recompiles and it trains again).

mod common;

use common::{model, rel};
use kiln::jit::{compile_for_training, CompiledTrainModule};
use kiln::nn::prelude::*;
use kiln::optim::{Optimizer, SgdOptions, SGD};
use kiln::Tensor;
use std::sync::Arc;

fn cpu(m: &Arc<dyn Module>, x: &Tensor) -> CompiledTrainModule {
    compile_for_training(m, std::slice::from_ref(x)).unwrap()
}

common::training::zoo_training_tests!(crate::cpu, true);

#[test]
fn frozen_layer_gets_no_gradient_and_unfreezing_recompiles() {
    let (m, x) = model("simple_net");
    m.train(true);
    let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
    let frozen = names[0].clone();
    let p0 = m.get_parameter(&frozen).unwrap();
    p0.clone().requires_grad_(false).unwrap();
    let cm = compile_for_training(&m, std::slice::from_ref(&x)).unwrap();
    let v = cm.variant(std::slice::from_ref(&x)).unwrap();
    assert!(!v
        .grad_inputs()
        .contains(&kiln::ir::InputKind::Param(frozen.clone())));
    let before = p0.detach().clone_tensor().unwrap();
    let mut opt = SGD::new(
        m.parameters(),
        SgdOptions {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    opt.zero_grad(true).unwrap();
    cm.call(&x)
        .unwrap()
        .square()
        .unwrap()
        .mean()
        .unwrap()
        .backward()
        .unwrap();
    assert!(p0.grad().is_none(), "a frozen parameter gets no gradient");
    for n in &names[1..] {
        assert!(m.get_parameter(n).unwrap().grad().is_some(), "{n}");
    }
    opt.step().unwrap();
    assert_eq!(rel(&p0, &before), 0.0, "and no update");
    assert_eq!(cm.variant_count(), 1);
    // Unfreeze: a recompile, and it trains again.
    p0.clone().requires_grad_(true).unwrap();
    opt.zero_grad(true).unwrap();
    cm.call(&x)
        .unwrap()
        .square()
        .unwrap()
        .mean()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(cm.variant_count(), 2);
    let g = p0.grad().expect("unfrozen parameter has a gradient");
    // Equal to eager's gradient.
    let g = g.clone_tensor().unwrap();
    opt.zero_grad(true).unwrap();
    m.call(&x)
        .unwrap()
        .square()
        .unwrap()
        .mean()
        .unwrap()
        .backward()
        .unwrap();
    assert!(rel(&g, &p0.grad().unwrap()) <= 1e-5);
    opt.step().unwrap();
    assert!(rel(&p0, &before) > 0.0);
}

#[test]
fn autograd_engine_features_through_the_compiled_node() {
    let (m, x) = model("test_net");
    m.eval();
    let cm = compile_for_training(&m, std::slice::from_ref(&x)).unwrap();
    let p = m.parameters()[0].clone();
    // Accumulation over two backwards, retain_graph.
    m.zero_grad(true).unwrap();
    let y = cm.call(&x).unwrap();
    assert_eq!(y.grad_fn().unwrap().name(), "CompiledFunctionBackward");
    let loss = y.square().unwrap().sum().unwrap();
    loss.backward_with(None, true).unwrap();
    let g1 = p.grad().unwrap().clone_tensor().unwrap();
    loss.backward().unwrap();
    let g2 = p.grad().unwrap();
    assert!(rel(&g2, &g1.mul_scalar(2.0).unwrap()) <= 1e-6);
    // A second backward without retain_graph fails as in eager.
    assert!(loss.backward().is_err());
    // A tensor hook on the output sees and replaces the gradient.
    m.zero_grad(true).unwrap();
    let y = cm.call(&x).unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(0usize));
    let s2 = seen.clone();
    y.register_hook(move |g| {
        *s2.lock().unwrap() += 1;
        Some(g.mul_scalar(0.0).unwrap())
    })
    .unwrap();
    y.square().unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(*seen.lock().unwrap(), 1);
    assert_eq!(
        p.grad()
            .unwrap()
            .abs()
            .unwrap()
            .max()
            .unwrap()
            .item()
            .unwrap(),
        0.0
    );
    // autograd::grad w.r.t. an input that requires grad.
    let xi = x
        .detach()
        .clone_tensor()
        .unwrap()
        .requires_grad_(true)
        .unwrap();
    let y = cm.call(&xi).unwrap();
    let l = y.square().unwrap().sum().unwrap();
    let gx = kiln::autograd::grad(&[l], &[xi.clone()], None, false, false, false).unwrap();
    let ye = m.call(&xi).unwrap().square().unwrap().sum().unwrap();
    let gxe = kiln::autograd::grad(&[ye], &[xi.clone()], None, false, false, false).unwrap();
    assert!(rel(gx[0].as_ref().unwrap(), gxe[0].as_ref().unwrap()) <= 1e-5);
    assert_eq!(
        cm.variant_count(),
        2,
        "an input requiring grad is another variant"
    );
}
