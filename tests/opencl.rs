//! The OpenCL backend (feature `opencl`, run on PoCL in CI): every zoo model
//! compiled for an OpenCL device equals eager CPU output, in eval and in
//! training mode (buffer updates included); data stays on the device.
#![cfg(feature = "opencl")]

mod common;
use common::{fixtures, model, rel};
use kiln::nn::prelude::*;
use kiln::runtime::opencl::compile_opencl;
use kiln::{zoo, Tensor};

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
