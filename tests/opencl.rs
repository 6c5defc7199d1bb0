//! The OpenCL backend (feature `opencl`, run on PoCL in CI): every zoo model
//! compiled for an OpenCL device equals eager CPU output, in eval and in
//! training mode (buffer updates included); data stays on the device; hooks
//! stay live across CPU/GPU segments and the module tree is guarded, as in
//! `jit::compile` (`tests/compiled_hooks.rs`).
#![cfg(feature = "opencl")]

mod common;
use common::scenarios::{self, Compiled};
use common::{fixtures, model, rel};
use kiln::nn::prelude::*;
use kiln::runtime::opencl::{compile_opencl, OpenClModule};
use kiln::{zoo, Tensor};
use std::sync::atomic::Ordering;
use std::sync::Arc;

impl Compiled for OpenClModule {
    fn forward1(&self, x: &Tensor) -> Tensor {
        self.forward(&[x.clone()]).unwrap().remove(0)
    }
    fn variants(&self) -> usize {
        self.variant_count()
    }
    fn tolerance(&self) -> f64 {
        1e-4
    }
}

/// One eager call and one OpenCL call of `m` on `x`: equal within 1e-4.
fn same(c: &OpenClModule, m: &Arc<dyn Module>, x: &Tensor) {
    let want = kiln::no_grad(|| m.call(x)).unwrap();
    let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    let e = rel(&got[0], &want);
    assert!(e <= 1e-4, "opencl vs eager {e:.2e}");
}

#[test]
fn every_zoo_model_on_opencl_equals_eager() {
    for &name in zoo::names() {
        let (m, x) = model(name);
        m.eval();
        let eager = kiln::no_grad(|| m.call(&x)).unwrap();
        let c = compile_opencl(&m, &[x.clone()], None).unwrap();
        let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
        let e = rel(&got[0], &eager);
        eprintln!(
            "{name}: rel {e:.2e}, {} launches, fallbacks {:?}",
            c.launch_count(),
            c.fallbacks()
        );
        assert!(e <= 1e-4, "{name}: opencl vs eager {e:.2e}");
        assert!(c.fallbacks().is_empty(), "{name}: {:?}", c.fallbacks());
    }
}

#[test]
fn training_mode_on_opencl_updates_buffers_like_eager() {
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
        let c = compile_opencl(&b, &[x.clone()], None).unwrap();
        b.load_safetensors(fixtures().join(format!("{name}.safetensors")), true)
            .unwrap();
        let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
        assert!(rel(&got[0], &want) <= 1e-4, "{name}: training output");
        for ((n, t), w) in b.named_buffers().into_iter().zip(&want_buffers) {
            assert!(rel(&t, w) <= 1e-4, "{name}: buffer {n}");
        }
        // A second call starts from the updated buffers (kept on the device).
        let want2 = kiln::no_grad(|| a.call(&x)).unwrap();
        let got2 = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
        assert!(
            rel(&got2[0], &want2) <= 1e-4,
            "{name}: second training call"
        );
        for ((n, t), (_, w)) in b.named_buffers().into_iter().zip(a.named_buffers()) {
            assert!(rel(&t, &w) <= 1e-4, "{name}: buffer {n} after two calls");
        }
    }
}

/// Data stays on the device: a compiled seed_cnn call moves its input up
/// and its output down, nothing else; parameters are uploaded once and
/// again only when they change.
#[test]
fn seed_cnn_moves_only_inputs_and_outputs() {
    let (m, x) = model("seed_cnn");
    m.eval();
    let c = compile_opencl(&m, &[x.clone()], None).unwrap();
    assert!(c.fallbacks().is_empty(), "{:?}", c.fallbacks());
    // Eval mode reads every parameter and the running stats (not
    // num_batches_tracked).
    let state = m.parameters().len()
        + m.buffers()
            .iter()
            .filter(|b| b.dtype() == kiln::DType::F32)
            .count();
    kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    let (up, down) = c.transfers();
    assert_eq!(
        up,
        1 + state as u64,
        "first call: input + parameters and buffers"
    );
    assert_eq!(down, 1, "first call downloads");
    for _ in 0..2 {
        kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    }
    let (up2, down2) = c.transfers();
    assert_eq!(
        (up2 - up, down2 - down),
        (2, 2),
        "two calls: one input, one output each"
    );
    // A changed parameter is uploaded again (only that one), and seen.
    kiln::no_grad(|| {
        m.get_parameter("net.0.weight")
            .unwrap()
            .mul_scalar_(0.5)
            .unwrap();
    });
    let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    let (up3, down3) = c.transfers();
    assert_eq!((up3 - up2, down3 - down2), (2, 1));
    let want = kiln::no_grad(|| m.call(&x)).unwrap();
    assert!(rel(&got[0], &want) <= 1e-4);
}

#[test]
fn no_such_device_is_a_clear_error() {
    let (m, x) = model("simple_net");
    let e = compile_opencl(&m, &[x.clone()], Some(999)).err().unwrap();
    assert!(e.to_string().contains("no OpenCL device 999"), "{e}");
    let devs = kiln::runtime::opencl::devices().unwrap();
    assert!(!devs.is_empty() && devs[0].compute_units > 0);
}

/// `kiln verify --backend opencl`'s check on the project's fixtures: eval
/// output, one training forward and its buffer updates, relative 1e-4.
#[test]
fn every_zoo_fixture_on_opencl_matches_pytorch() {
    for &name in zoo::names() {
        let r = kiln::opencl::verify_opencl(&fixtures(), name, None).unwrap();
        assert!(r.passed(), "{r}: {:?}", r.checks);
        assert!(r.checks.len() >= 2);
    }
}

#[test]
fn hooks_registered_before_compile_run_live_and_replace_values() {
    let (m, x) = model("simple_net");
    m.eval();
    let (calls, _handles) = scenarios::three_replacing_hooks(&m);
    let c = compile_opencl(&m, &[x.clone()], None).unwrap();
    assert_eq!(c.first().module_calls(), ["relu", "layer2"]);
    assert!(c.fallbacks().is_empty(), "{:?}", c.fallbacks());
    assert!(c.launch_count() > 0, "layer1 runs on the device");
    let before = calls.load(Ordering::SeqCst);
    same(&c, &m, &x); // one eager call, one OpenCL call
    assert_eq!(
        calls.load(Ordering::SeqCst),
        before + 2,
        "the hook ran in the OpenCL call"
    );
    kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    assert_eq!(calls.load(Ordering::SeqCst), before + 3);
    assert_eq!(c.variant_count(), 1);
}

#[test]
fn hooks_registered_after_compile_recompile_once_and_removal_restores() {
    scenarios::hooks_after_compile(&|m, x| {
        Box::new(compile_opencl(m, &[x.clone()], None).unwrap())
    });
}

#[test]
fn guards_each_cause_exactly_one_recompilation() {
    scenarios::guards(&|m, x| Box::new(compile_opencl(m, &[x.clone()], None).unwrap()));
}

#[test]
fn training_hooks_across_segments_and_buffers_restored_by_name() {
    let (a, x) = model("custom_stack");
    let (b, _) = model("custom_stack");
    for m in [&a, &b] {
        m.train(true);
        let bn = m.get_submodule("net.1").unwrap().arc().unwrap();
        let _ = bn.register_forward_hook(|_, _, y| Ok(Some(y.mul_scalar(0.5)?)));
    }
    let before: Vec<(String, Tensor, Vec<f64>)> = b
        .named_buffers()
        .into_iter()
        .map(|(n, t)| (n, t.clone(), t.to_vec::<f64>()))
        .collect();
    let c = compile_opencl(&b, &[x.clone()], None).unwrap();
    assert_eq!(c.first().module_calls(), ["net.1"]);
    for (n, t, v) in &before {
        let now = b.get_buffer(n).unwrap();
        assert!(now.same_object(t), "{n}: the original tensor object");
        assert_eq!(&now.to_vec::<f64>(), v, "{n}: values restored");
    }
    for _ in 0..2 {
        let want = kiln::no_grad(|| a.call(&x)).unwrap();
        let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
        assert!(rel(&got[0], &want) <= 1e-4);
        for ((n, t), (_, w)) in b.named_buffers().into_iter().zip(a.named_buffers()) {
            assert!(rel(&t, &w) <= 1e-4, "buffer {n}");
        }
    }
}

/// `tensor.to_device(Device::OpenCl(0))`: an OpenCL module takes it, keeps
/// it on the device while it is unchanged and returns its output on the
/// device; eager ops refuse device tensors, naming the op.
#[test]
fn device_tensors_in_and_out_of_an_opencl_module() {
    use kiln::Device;
    let (m, x) = model("seed_cnn");
    m.eval();
    let want = kiln::no_grad(|| m.call(&x)).unwrap();
    let dx = x.to_device(Device::OpenCl(0)).unwrap();
    let e = m.call(&dx).unwrap_err().to_string();
    assert!(e.contains("conv2d") && e.contains("opencl:0"), "{e}");
    let c = compile_opencl(&m, &[dx.clone()], Some(0)).unwrap();
    let y = kiln::no_grad(|| c.forward(&[dx.clone()])).unwrap();
    assert_eq!(y[0].device(), Device::OpenCl(0));
    let e = y[0].relu().unwrap_err().to_string();
    assert!(e.contains("relu") && e.contains("opencl:0"), "{e}");
    let back = y[0].to_device(Device::Cpu).unwrap();
    assert!(rel(&back, &want) <= 1e-4);
    // The resident input is not uploaded again; a CPU input is.
    let (up, _) = c.transfers();
    kiln::no_grad(|| c.forward(&[dx.clone()])).unwrap();
    assert_eq!(c.transfers().0, up, "nothing uploaded");
    let y = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
    assert_eq!(y[0].device(), Device::Cpu);
    assert_eq!(c.transfers().0, up + 1);
    // A written device input is uploaded again.
    kiln::no_grad(|| dx.copy_(&x.mul_scalar(0.5).unwrap()).map(|_| ())).unwrap();
    let y = kiln::no_grad(|| c.forward(&[dx.clone()])).unwrap();
    assert_eq!(c.transfers().0, up + 2);
    let want = kiln::no_grad(|| m.call(&x.mul_scalar(0.5).unwrap())).unwrap();
    assert!(rel(&y[0].to_device(Device::Cpu).unwrap(), &want) <= 1e-4);
}

/// `module.to_device(device)` keeps the parameter objects; the module then
/// compiles for OpenCL (eval and training, buffer updates written back to
/// the device buffers) and its eager call is a clear error.
#[test]
fn module_to_device_then_compile_opencl() {
    use kiln::Device;
    for name in ["seed_cnn", "custom_stack"] {
        let (a, x) = model(name);
        let (b, _) = model(name);
        let params = b.parameters();
        b.to_device(Device::OpenCl(0)).unwrap();
        assert!(b
            .parameters()
            .iter()
            .zip(&params)
            .all(|(p, q)| p.same_object(q) && p.device() == Device::OpenCl(0)));
        assert!(b.buffers().iter().all(|t| t.device() == Device::OpenCl(0)));
        let e = kiln::no_grad(|| b.call(&x)).unwrap_err().to_string();
        assert!(e.contains("opencl:0") && e.contains("to_device"), "{e}");
        for training in [false, true] {
            a.train(training);
            b.train(training);
            let c = compile_opencl(&b, &[x.clone()], Some(0)).unwrap();
            let want = kiln::no_grad(|| a.call(&x)).unwrap();
            let got = kiln::no_grad(|| c.forward(&[x.clone()])).unwrap();
            assert!(rel(&got[0], &want) <= 1e-4, "{name} training={training}");
            for ((n, t), (_, w)) in b.named_buffers().into_iter().zip(a.named_buffers()) {
                assert_eq!(t.device(), Device::OpenCl(0), "{name}: {n}");
                assert!(
                    rel(&t.to_device(Device::Cpu).unwrap(), &w) <= 1e-4,
                    "{name}: {n}"
                );
            }
        }
        b.to_device(Device::Cpu).unwrap();
        a.eval();
        b.eval();
        let want = kiln::no_grad(|| a.call(&x)).unwrap();
        assert!(rel(&kiln::no_grad(|| b.call(&x)).unwrap(), &want) <= 1e-4);
    }
}
