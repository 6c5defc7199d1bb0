//! The fixture checks of compiled training, shared by the CPU
//! (`tests/compiled_training.rs`) and OpenCL (`tests/opencl_training.rs`)
//! backends: for a zoo model, the compiled forward + backward give the
//! fixture's `grad.<param>` (and eager kiln's), and three SGD and three
//! Adam steps through the compiled forward and backward give the fixture's
//! losses, parameters and buffers.

use super::{fixtures, model, rel};
use kiln::jit::{compile_training, CompiledTrainModule};
use kiln::nn::functional::{mse_loss, Reduction};
use kiln::nn::prelude::*;
use kiln::nn::StateDict;
use kiln::optim::{Adam, AdamOptions, Optimizer, SgdOptions, SGD};
use kiln::Tensor;
use std::sync::Arc;

/// Compiles a module for training on an example input.
pub type CompileTrain = &'static dyn Fn(&Arc<dyn Module>, &Tensor) -> CompiledTrainModule;

pub const GRAD_TOL: f64 = 1e-4;
pub const STEP_TOL: f64 = 1e-3;

pub fn io(name: &str) -> StateDict {
    StateDict::load_safetensors(fixtures().join(format!("{name}.io.safetensors"))).unwrap()
}

pub fn train_fixture(name: &str) -> StateDict {
    StateDict::load_safetensors(fixtures().join(format!("{name}.train.safetensors"))).unwrap()
}

/// Eval-mode compiled forward + backward of sum(y * grad_output): the
/// fixture's gradients, and eager kiln's.
pub fn grads(name: &str, compile: CompileTrain) {
    let (m, x) = model(name);
    let io = io(name);
    m.eval();
    let cm = compile(&m, &x);
    let v = cm.variant(std::slice::from_ref(&x)).unwrap();
    println!(
        "{name}: saved {} values, backward {} nodes",
        v.num_saved(),
        v.backward_graph().node_count()
    );
    m.zero_grad(true).unwrap();
    let y = cm.call(&x).unwrap();
    assert!(rel(&y, io.get("eval_output").unwrap()) <= GRAD_TOL);
    let go = io.get("grad_output").unwrap();
    y.mul(go).unwrap().sum().unwrap().backward().unwrap();
    let compiled: Vec<(String, Tensor)> = m
        .named_parameters()
        .into_iter()
        .map(|(n, p)| (n, p.grad().expect("a gradient")))
        .collect();
    m.zero_grad(true).unwrap();
    m.call(&x)
        .unwrap()
        .mul(go)
        .unwrap()
        .sum()
        .unwrap()
        .backward()
        .unwrap();
    for (pname, g) in compiled {
        let want = io.get(&format!("grad.{pname}")).unwrap();
        let e = rel(&g, want);
        let eager = m.get_parameter(&pname).unwrap().grad().unwrap();
        let e_eager = rel(&g, &eager);
        println!("  grad.{pname}: vs PyTorch {e:.2e}, vs eager kiln {e_eager:.2e}");
        assert!(e <= GRAD_TOL, "{name} grad.{pname}: {e:.3e}");
        assert!(
            e_eager <= GRAD_TOL,
            "{name} grad.{pname} vs eager: {e_eager:.3e}"
        );
    }
}

/// Three SGD and three Adam steps with `compile_training` in training mode
/// (dropout p = 0, as make_fixtures.py): losses, parameters, buffers.
/// `compile`: how the forward and backward are compiled; `bundled`: also
/// check `compile_training`'s `TrainStep::step` (the CPU bundle).
pub fn steps(name: &str, compile: CompileTrain, bundled: bool) {
    let tr = train_fixture(name);
    let x = io(name).get("input").unwrap().clone();
    let target = tr.get("target").unwrap().clone();
    for opt_name in ["sgd", "adam"] {
        let (m, _) = model(name);
        m.train(true);
        kiln::verify::disable_dropout(&*m).unwrap();
        let start: Vec<Tensor> = m
            .parameters()
            .iter()
            .map(|p| p.detach().clone_tensor().unwrap())
            .collect();
        let opt: Box<dyn Optimizer> = if opt_name == "sgd" {
            Box::new(
                SGD::new(
                    m.parameters(),
                    SgdOptions {
                        lr: 0.05,
                        momentum: 0.9,
                        weight_decay: 1e-4,
                        ..Default::default()
                    },
                )
                .unwrap(),
            )
        } else {
            Box::new(Adam::new(m.parameters(), AdamOptions::adam(1e-3)).unwrap())
        };
        let mut opt = opt;
        let cm = compile(&m, &x);
        let mut noise = vec![true; start.len()];
        let mut losses = Vec::new();
        for _ in 0..3 {
            // The gradient-noise bookkeeping of kiln::verify (see there).
            opt.zero_grad(true).unwrap();
            let loss = mse_loss(&cm.call(&x).unwrap(), &target, Reduction::Mean).unwrap();
            loss.backward().unwrap();
            let gmax: Vec<f64> = m
                .parameters()
                .iter()
                .map(|p| {
                    p.grad()
                        .map(|g| g.to_vec_f64().iter().fold(0f64, |a, v| a.max(v.abs())))
                        .unwrap_or(0.0)
                })
                .collect();
            let top = gmax.iter().cloned().fold(0f64, f64::max);
            for (nz, g) in noise.iter_mut().zip(&gmax) {
                *nz &= *g <= kiln::verify::NOISE_GRAD * top;
            }
            opt.step().unwrap();
            losses.push(loss.detach());
        }
        assert_eq!(cm.variant_count(), 1, "no recompilation");
        let losses = Tensor::stack(&losses.iter().collect::<Vec<_>>(), 0).unwrap();
        let e = rel(&losses, tr.get(&format!("{opt_name}.loss")).unwrap());
        println!("{name} {opt_name}.loss: {e:.2e}");
        assert!(e <= STEP_TOL, "{name} {opt_name}.loss {e:.3e}");
        for (i, (pname, p)) in m.named_parameters().into_iter().enumerate() {
            let want = tr.get(&format!("{opt_name}.param.{pname}")).unwrap();
            if opt_name == "adam" && noise[i] {
                let bound = 3.0 * 1e-3 * (1.0 + 1e-3);
                let ours = p
                    .sub(&start[i])
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max()
                    .unwrap()
                    .item()
                    .unwrap();
                assert!(
                    ours <= bound,
                    "{name} {pname}: noise-gradient change {ours}"
                );
                continue;
            }
            let e = rel(&p, want);
            assert!(e <= STEP_TOL, "{name} {opt_name}.param.{pname}: {e:.3e}");
        }
        for (bname, b) in m.named_buffers() {
            let want = tr.get(&format!("{opt_name}.buffer.{bname}")).unwrap();
            let e = rel(&b, want);
            assert!(e <= STEP_TOL, "{name} {opt_name}.buffer.{bname}: {e:.3e}");
        }
        if bundled {
            // And TrainStep::step does the same thing in one call.
            let loss_fn: kiln::jit::LossFn = Box::new(|y, t| mse_loss(y, t, Reduction::Mean));
            let mut step = compile_training(&m, loss_fn, opt, &x).unwrap();
            let l = step.step(&x, &target).unwrap();
            assert!(l.item().unwrap().is_finite());
        }
    }
}

/// One `grads::<model>` and one `steps::<model>` test per zoo model for the
/// compile function `$compile` (a path from the crate root); `$bundled`:
/// also check `compile_training`'s one-call step.
#[allow(unused_macros)]
macro_rules! zoo_training_tests {
    ($compile:path, $bundled:expr) => {
        $crate::common::training::zoo_training_tests!(@models $compile, $bundled; simple_net, net_with_dropout, seed_cnn,
            test_net, custom_stack, complex_net, transformer_block, pointwise_chain);
    };
    (@models $compile:path, $bundled:expr; $($name:ident),*) => {
        mod grads {
            $( #[test] fn $name() { $crate::common::training::grads(stringify!($name), &$compile); } )*
        }
        mod steps {
            $( #[test] fn $name() {
                $crate::common::training::steps(stringify!($name), &$compile, $bundled);
            } )*
        }
    };
}
#[allow(unused_imports)]
pub(crate) use zoo_training_tests;
