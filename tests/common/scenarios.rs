//! Hook and guard scenarios shared by every compiled backend's tests (CPU
//! `jit::compile`, OpenCL `compile_opencl`): each backend's module
//! implements `Compiled`, and the scenario checks it against eager.

use super::{model, rel};
use kiln::nn::prelude::*;
use kiln::{DType, Tensor};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// On simple_net: a forward hook on `relu` that counts its calls and adds
/// 1, a forward pre-hook on `layer2` doubling its input, a root forward
/// hook tripling the output. Returns the call counter and the handles.
pub fn three_replacing_hooks(
    m: &Arc<dyn Module>,
) -> (Arc<AtomicUsize>, Vec<kiln::hooks::RemovableHandle>) {
    let calls = Arc::new(AtomicUsize::new(0));
    let c2 = calls.clone();
    let relu = m.get_submodule("relu").unwrap().arc().unwrap();
    let h1 = relu.register_forward_hook(move |_, _, y| {
        c2.fetch_add(1, Ordering::SeqCst);
        Ok(Some(y.add_scalar(1.0)?))
    });
    let layer2 = m.get_submodule("layer2").unwrap().arc().unwrap();
    let h2 = layer2.register_forward_pre_hook(|_, x| Ok(Some(x.mul_scalar(2.0)?)));
    let h3 = m.register_forward_hook(|_, _, y| Ok(Some(y.mul_scalar(3.0)?)));
    (calls, vec![h1, h2, h3])
}

/// Compiles a model for the inputs like the given one.
pub type CompileFn<'a> = &'a dyn Fn(&Arc<dyn Module>, &Tensor) -> Box<dyn Compiled>;

/// A compiled module as the scenarios use it.
pub trait Compiled {
    fn forward1(&self, x: &Tensor) -> Tensor;
    fn variants(&self) -> usize;
    /// Largest relative difference from eager accepted.
    fn tolerance(&self) -> f64;
}

impl Compiled for kiln::jit::CompiledModule {
    fn forward1(&self, x: &Tensor) -> Tensor {
        self.forward(&[x.clone()]).unwrap().remove(0)
    }
    fn variants(&self) -> usize {
        self.variant_count()
    }
    fn tolerance(&self) -> f64 {
        1e-5
    }
}

/// One eager call and one compiled call of `m` on `x`: equal within the
/// backend's tolerance.
pub fn same(c: &dyn Compiled, m: &Arc<dyn Module>, x: &Tensor) {
    let want = kiln::no_grad(|| m.call(x)).unwrap();
    let got = kiln::no_grad(|| c.forward1(x));
    let e = rel(&got, &want);
    assert!(e <= c.tolerance(), "compiled vs eager {e:.2e}");
}

/// seed_cnn compiled by `compile`: a forward hook registered after
/// compilation recompiles once and runs at every call (also at the trace
/// of the new variant, as torch.jit.trace does); removing it reuses the
/// hook-free variant; a pre-hook replacing a submodule's input is live.
pub fn hooks_after_compile(compile: CompileFn) {
    let (m, x) = model("seed_cnn");
    m.eval();
    let c = compile(&m, &x);
    same(&*c, &m, &x);
    let conv = m.get_submodule("net.4").unwrap().arc().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let s2 = seen.clone();
    let mut h = conv.register_forward_hook(move |_, _, y| {
        s2.fetch_add(1, Ordering::SeqCst);
        Ok(Some(y.neg()?))
    });
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 2, "one recompilation for the new hook");
    // Eager call, the trace of the new variant, the compiled call.
    assert_eq!(seen.load(Ordering::SeqCst), 3);
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 2, "cached");
    assert_eq!(seen.load(Ordering::SeqCst), 5);
    h.remove();
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 2, "the hook-free variant is reused");
    assert_eq!(seen.load(Ordering::SeqCst), 5, "removed hooks do not run");
    let bn = m.get_submodule("net.3").unwrap().arc().unwrap();
    let _p = bn.register_forward_pre_hook(|_, x| Ok(Some(x.mul_scalar(0.5)?)));
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 3);
}

/// simple_net compiled by `compile`: a new batch size, eval -> train, a
/// child replaced (ReLU -> LeakyReLU, as in the design notes) and a new
/// hook each compile exactly one variant; going back reuses one.
pub fn guards(compile: CompileFn) {
    let (m, x) = model("simple_net");
    m.eval();
    let c = compile(&m, &x);
    assert_eq!(c.variants(), 1);
    let x2 = Tensor::randn(&[5, 784], DType::F32);
    same(&*c, &m, &x2);
    assert_eq!(c.variants(), 2);
    m.train(true);
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 3);
    m.eval();
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 3);
    m.set_submodule("relu", Arc::new(LeakyReLU::new(0.2)))
        .unwrap();
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 4);
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 4);
    let l1 = m.get_submodule("layer1").unwrap().arc().unwrap();
    let _h = l1.register_forward_pre_hook(|_, _| Ok(None));
    same(&*c, &m, &x);
    assert_eq!(c.variants(), 5);
}
