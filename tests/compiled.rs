//! `kiln::jit::compile`: every zoo model compiled along its fusion plan
//! (pointwise kernels as Cranelift machine code, the rest on the eager
//! kernels) equals eager, in eval and in training mode (buffers included).

mod common;
use common::{fixtures, model, rel};
use kiln::nn::prelude::*;
use kiln::{jit, zoo, Tensor};

#[test]
fn every_zoo_model_compiled_equals_eager() {
    let mut jit_kernels = 0;
    for &name in zoo::names() {
        let (m, x) = model(name);
        m.eval();
        let eager = kiln::no_grad(|| m.call(&x)).unwrap();
        let c = jit::compile(&m, &[x.clone()]).unwrap();
        jit_kernels += c.jit_kernel_count();
        let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
        let e = rel(&got[0], &eager);
        assert!(
            e <= 1e-5,
            "{name}: compiled vs eager {e:.2e} (fallbacks {:?})",
            c.fallbacks()
        );
    }
    assert!(jit_kernels >= 4, "only {jit_kernels} kernels were compiled");
}

#[test]
fn pointwise_chain_is_one_machine_code_kernel() {
    let (m, x) = model("pointwise_chain");
    m.eval();
    let c = jit::compile(&m, &[x.clone()]).unwrap();
    assert_eq!(c.jit_kernel_count(), 1, "fallbacks: {:?}", c.fallbacks());
    assert!(c.fallbacks().is_empty());
    // Live parameters: a change to `scale` is seen without recompiling.
    kiln::no_grad(|| {
        m.get_parameter("scale").unwrap().mul_scalar_(1.5).unwrap();
    });
    let eager = kiln::no_grad(|| m.call(&x)).unwrap();
    let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    assert!(rel(&got[0], &eager) <= 1e-5);
}

/// Guards: another input shape, or a switch to training mode, compiles a
/// new variant (cached) and never gives a wrong answer; tracing a training
/// variant does not update the buffers a second time.
#[test]
fn failed_guards_recompile_and_are_cached() {
    let (m, x) = model("seed_cnn");
    m.eval();
    let c = jit::compile(&m, &[x.clone()]).unwrap();
    assert_eq!(c.variant_count(), 1);
    let x2 = Tensor::randn(&[3, 1, 28, 28], kiln::DType::F32);
    let got = kiln::no_grad(|| c.forward(&[x2.clone()])).unwrap();
    let want = kiln::no_grad(|| m.call(&x2)).unwrap();
    assert!(rel(&got[0], &want) <= 1e-5);
    assert_eq!(c.variant_count(), 2);
    kiln::no_grad(|| c.forward(&[x2.clone()])).unwrap();
    assert_eq!(c.variant_count(), 2, "cached");
    // Training mode: a new variant; one call updates the buffers once.
    let (eager, _) = model("seed_cnn");
    eager.train(true);
    let want = kiln::no_grad(|| eager.call(&x)).unwrap();
    m.train(true);
    let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    assert_eq!(c.variant_count(), 3);
    assert!(rel(&got[0], &want) <= 1e-5);
    for ((n, a), (_, b)) in m.named_buffers().into_iter().zip(eager.named_buffers()) {
        assert!(
            rel(&a, &b) <= 1e-5,
            "buffer {n} after one compiled training call"
        );
    }
}

#[test]
fn training_mode_compiled_updates_buffers_like_eager() {
    for &name in zoo::names() {
        let (a, x) = model(name);
        a.train(true);
        kiln::verify::disable_dropout(&*a).unwrap();
        let want = kiln::no_grad(|| a.call(&x)).unwrap();
        let want_buffers: Vec<Tensor> = a
            .named_buffers()
            .into_iter()
            .map(|(_, t)| t.detach().clone_tensor().unwrap())
            .collect();
        let (b, _) = model(name);
        b.train(true);
        kiln::verify::disable_dropout(&*b).unwrap();
        let c = jit::compile(&b, &[x.clone()]).unwrap();
        b.load_safetensors(fixtures().join(format!("{name}.safetensors")), true)
            .unwrap();
        let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
        assert!(rel(&got[0], &want) <= 1e-5, "{name}: training output");
        for ((n, t), w) in b.named_buffers().into_iter().zip(&want_buffers) {
            assert!(rel(&t, w) <= 1e-5, "{name}: buffer {n}");
        }
    }
}

/// `CompiledModule::verify` / `kiln::testing::assert_same` on every zoo
/// model: no side effects, and the report says they agree.
#[test]
fn verify_and_assert_same_on_the_zoo() {
    for &name in zoo::names() {
        let (m, x) = model(name);
        m.eval();
        let c = jit::compile(&m, &[x.clone()]).unwrap();
        let before: Vec<Tensor> = m
            .state_dict()
            .iter()
            .map(|(_, t)| t.detach().clone_tensor().unwrap())
            .collect();
        let r = kiln::testing::assert_same(&m, &c, &[x.clone()], 1e-5);
        assert_eq!(r.first_mismatch, None, "{name}");
        for ((k, t), b) in m.state_dict().iter().zip(&before) {
            assert_eq!(rel(t, b), 0.0, "{name}: verify changed {k}");
        }
    }
}

/// A trace that froze a data-dependent branch: verify reports the output
/// difference (the graph itself agrees with the interpreter node by node).
#[test]
fn verify_reports_a_diverging_trace() {
    struct Branchy {
        core: ModuleCore,
    }
    impl Module for Branchy {
        fn core(&self) -> &ModuleCore {
            &self.core
        }
        fn forward(&self, x: &Tensor) -> kiln::Result<Tensor> {
            if x.sum()?.item()? > 0.0 {
                x.mul_scalar(2.0)
            } else {
                x.neg()
            }
        }
    }
    let m: std::sync::Arc<dyn Module> = std::sync::Arc::new(Branchy {
        core: ModuleCore::new("Branchy"),
    });
    let pos = Tensor::ones(&[4], kiln::DType::F32);
    let c = jit::compile(&m, &[pos.clone()]).unwrap();
    assert!(c.verify(&[pos.clone()], 1e-6).unwrap().passed(1e-6));
    let neg = pos.neg().unwrap();
    let r = c.verify(&[neg], 1e-6).unwrap();
    assert!(!r.passed(1e-6), "{r}");
    assert!(r.max_rel > 1.0, "{r}");
    assert_eq!(r.first_mismatch, None, "{r}");
}

/// A max_pool2d right after a conv2d runs inside the conv step (each image
/// pooled as it is finished) and still equals eager, at batch sizes that
/// take each of the conv's thread splits (one image: channel blocks split;
/// several: images split).
#[test]
fn max_pool_after_conv_is_fused_and_equals_eager() {
    for name in ["test_net", "seed_cnn"] {
        for batch in [1, 3, 8] {
            let (m, _) = model(name);
            m.eval();
            let x = Tensor::randn(&[batch, 1, 28, 28], kiln::DType::F32);
            let c = jit::compile(&m, &[x.clone()]).unwrap();
            let steps = c.first().step_names();
            assert!(
                !steps.iter().any(|s| s.contains("max_pool")),
                "{name}: pool not fused: {steps:?}"
            );
            let eager = kiln::no_grad(|| m.call(&x)).unwrap();
            let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
            let e = rel(&got[0], &eager);
            assert!(e <= 1e-5, "{name} batch {batch}: compiled vs eager {e:.2e}");
        }
    }
}

/// Batched matmuls on views whose batch dims do not merge into one stride
/// (attention's q/k/v selected from one projection) run as
/// one gemm per index of the first batch dim; the result equals eager,
/// and no gather is left for those operands.
#[test]
fn batched_matmul_on_unmergeable_views_equals_eager() {
    struct Attn {
        core: ModuleCore,
    }
    impl Module for Attn {
        fn core(&self) -> &ModuleCore {
            &self.core
        }
        fn forward(&self, x: &Tensor) -> kiln::Result<Tensor> {
            // x [3, 7, 3*2*5] -> [3 (qkv), 3 (b), 2 (heads), 7 (t), 5 (d)].
            let qkv = x.reshape(&[3, 7, 3, 2, 5])?.permute(&[2, 0, 3, 1, 4])?;
            let (q, k, v) = (qkv.select(0, 0)?, qkv.select(0, 1)?, qkv.select(0, 2)?);
            let s = q.matmul(&k.transpose(-2, -1)?)?; // [3, 2, 7, 7]
            let o = s.matmul(&v)?; // [3, 2, 7, 5]
            o.reshape(&[3, 70])
        }
    }
    let m: std::sync::Arc<dyn Module> = std::sync::Arc::new(Attn {
        core: ModuleCore::new("Attn"),
    });
    let x = Tensor::randn(&[3, 7, 30], kiln::DType::F32);
    let want = kiln::no_grad(|| m.call(&x)).unwrap();
    let c = jit::compile(&m, &[x.clone()]).unwrap();
    let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    assert!(rel(&got[0], &want) <= 1e-5, "{}", rel(&got[0], &want));
    let names = c.first().step_names();
    let gathers = names.iter().filter(|s| **s == "gather").count();
    let gemms = names.iter().filter(|s| **s == "gemm").count();
    // Two products, 3 gemms each (one per index of the first batch dim);
    // only the permuted output is gathered for the reshape.
    assert_eq!(gemms, 6, "{names:?}");
    assert!(gathers <= 1, "{names:?}");
}
