//! TracedModule bound to a live module: parameters and buffers bound by
//! name at every call, buffer updates written back, input checks, passes
//! and printing.

use crate::common::*;
use kiln_frontend::nn::prelude::*;
use kiln_frontend::{no_grad, DType, Result, Tensor};
use kiln_runtime::TracedModule;
use std::collections::HashMap;
use std::sync::Arc;

/// A module holding only parameters and buffers.
struct Holder {
    core: ModuleCore,
}

impl Module for Holder {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.clone())
    }
}

fn holder(name: &str, params: &[(&str, Tensor)], buffers: &[(&str, Tensor)]) -> Arc<dyn Module> {
    let core = ModuleCore::new(name);
    for (n, t) in params {
        core.register_parameter(n, Some(Parameter::new(t.clone()).unwrap()))
            .unwrap();
    }
    for (n, t) in buffers {
        core.register_buffer(n, Some(t.clone()), true).unwrap();
    }
    Arc::new(Holder { core })
}

/// A module whose state dict has the graph's names; forward is the
/// eager computation `f` over the live tensors.
struct Net {
    core: ModuleCore,
    f: fn(&Tensor, &HashMap<String, Tensor>) -> Tensor,
}

impl Module for Net {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut w: HashMap<String, Tensor> = self.named_parameters().into_iter().collect();
        w.extend(self.named_buffers());
        Ok((self.f)(x, &w))
    }
}

/// Build a Net from `weights` named `child.name`.
fn net(
    weights: &HashMap<String, Tensor>,
    buffers: &[&str],
    f: fn(&Tensor, &HashMap<String, Tensor>) -> Tensor,
) -> Arc<Net> {
    let core = ModuleCore::new("Net");
    let mut children: Vec<&str> = weights
        .keys()
        .map(|k| k.split_once('.').unwrap().0)
        .collect();
    children.sort();
    children.dedup();
    for c in children {
        let mut ps = Vec::new();
        let mut bs = Vec::new();
        for (k, t) in weights {
            let (cc, n) = k.split_once('.').unwrap();
            if cc == c {
                if buffers.contains(&k.as_str()) {
                    bs.push((n, t.clone_tensor().unwrap()));
                } else {
                    ps.push((n, t.clone_tensor().unwrap()));
                }
            }
        }
        core.add_module(c, Some(holder(c, &ps, &bs))).unwrap();
    }
    Arc::new(Net { core, f })
}

fn mlp_net(seed: u64) -> Arc<Net> {
    net(&weights_for(&mlp(), seed), &[], mlp_eager)
}

const BN_BUFFERS: [&str; 3] = [
    "bn.running_mean",
    "bn.running_var",
    "bn.num_batches_tracked",
];

#[test]
fn forward_equals_the_module_and_sees_in_place_parameter_changes() {
    let m = mlp_net(0);
    let tm = TracedModule::new(mlp(), m.clone()).unwrap();
    let x = rand_t(&[8, 20], 1);
    let y0 = tm.forward(std::slice::from_ref(&x)).unwrap();
    assert_eq!(y0.len(), 1);
    assert_same(&y0[0], &m.call(&x).unwrap(), "traced vs eager");
    // Change a parameter in place, as an optimizer step does.
    let w = m.get_parameter("fc1.weight").unwrap();
    no_grad(|| w.mul_scalar_(-2.0).map(|_| ())).unwrap();
    let y1 = tm.call(&x).unwrap();
    assert_same(&y1, &m.call(&x).unwrap(), "after the in-place change");
    assert!(y1.to_vec_f64() != y0[0].to_vec_f64());
    // load_state_dict: the next call uses the loaded values.
    let other = mlp_net(5);
    m.load_state_dict(&other.state_dict(), true).unwrap();
    assert_same(
        &tm.call(&x).unwrap(),
        &other.call(&x).unwrap(),
        "after load_state_dict",
    );
}

#[test]
fn a_replaced_parameter_is_bound_by_name() {
    let m = mlp_net(0);
    let tm = TracedModule::new(mlp(), m.clone()).unwrap();
    let x = rand_t(&[8, 20], 2);
    let fc2 = m.get_submodule("fc2").unwrap();
    fc2.core()
        .set_parameter(
            "bias",
            Some(Parameter::new(Tensor::ones(&[5], DType::F32)).unwrap()),
        )
        .unwrap();
    assert_same(&tm.call(&x).unwrap(), &m.call(&x).unwrap(), "replaced bias");
    fc2.core()
        .set_parameter(
            "bias",
            Some(Parameter::new(Tensor::ones(&[6], DType::F32)).unwrap()),
        )
        .unwrap();
    let e = tm.call(&x).unwrap_err().to_string();
    assert!(
        e.ends_with("parameter `fc2.bias`: expected f32[5], got f32[6]"),
        "{e}"
    );
}

#[test]
fn training_updates_the_live_buffers_like_eager() {
    let g = cnn(true);
    let w = weights_for(&g, 3);
    let m = net(&w, &BN_BUFFERS, |x, w| cnn_eager(x, w, true));
    let reference = net(&w, &BN_BUFFERS, |x, w| cnn_eager(x, w, true));
    let tm = TracedModule::new(g, m.clone()).unwrap();
    for step in 0..3 {
        let x = rand_t(&[2, 3, 8, 8], 10 + step);
        let y = tm.call(&x).unwrap();
        let e = reference.call(&x).unwrap();
        assert_same(&y, &e, "y");
        for b in BN_BUFFERS {
            assert_same(
                &m.get_buffer(b).unwrap(),
                &reference.get_buffer(b).unwrap(),
                b,
            );
        }
    }
    assert_eq!(
        m.get_buffer("bn.num_batches_tracked").unwrap().to_vec_f64(),
        vec![3.0]
    );
}

#[test]
fn eval_graph_leaves_buffers_alone() {
    let g = cnn(false);
    let w = weights_for(&g, 4);
    let m = net(&w, &BN_BUFFERS, |x, w| cnn_eager(x, w, false));
    let tm = TracedModule::new(g, m.clone()).unwrap();
    let x = rand_t(&[2, 3, 8, 8], 3);
    assert_same(&tm.call(&x).unwrap(), &m.call(&x).unwrap(), "eval");
    for b in BN_BUFFERS {
        assert_same(&m.get_buffer(b).unwrap(), &w[b], b);
    }
}

#[test]
fn inputs_are_checked_against_the_graph() {
    let tm = TracedModule::new(mlp(), mlp_net(0)).unwrap();
    let e = tm.forward(&[rand_t(&[8, 21], 0)]).unwrap_err().to_string();
    assert_eq!(
        e,
        "TracedModule.forward: input 0 is f32[8,21], the graph was traced for f32[8,20]"
    );
    let x64 = rand_t(&[8, 20], 0).to_dtype(DType::F64).unwrap();
    let e = tm.forward(&[x64]).unwrap_err().to_string();
    assert_eq!(
        e,
        "TracedModule.forward: input 0 is f64[8,20], the graph was traced for f32[8,20]"
    );
    let e = tm.forward(&[]).unwrap_err().to_string();
    assert_eq!(e, "TracedModule.forward: expected 1 input(s), got 0");
}

#[test]
fn construction_checks_the_module_has_every_weight() {
    let w = weights_for(&mlp(), 0);
    let mut partial = w.clone();
    partial.remove("fc2.bias");
    let m = net(&partial, &[], mlp_eager);
    let e = TracedModule::new(mlp(), m).unwrap_err().to_string();
    assert!(
        e.starts_with("cannot bind parameter `fc2.bias` from the module"),
        "{e}"
    );
    let mut wrong = w.clone();
    wrong.insert("fc2.bias".into(), Tensor::zeros(&[5], DType::F64));
    let e = TracedModule::new(mlp(), net(&wrong, &[], mlp_eager))
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "parameter `fc2.bias` is f64[5], the graph expects f32[5]"
    );
}

#[test]
fn a_buffer_that_changed_shape_is_an_error_on_write_back() {
    let g = cnn(true);
    let w = weights_for(&g, 3);
    let m = net(&w, &BN_BUFFERS, |x, w| cnn_eager(x, w, true));
    let tm = TracedModule::new(g, m.clone()).unwrap();
    let bn = m.get_submodule("bn").unwrap();
    bn.core()
        .set_buffer("running_mean", Some(Tensor::zeros(&[5], DType::F32)))
        .unwrap();
    let e = tm.call(&rand_t(&[2, 3, 8, 8], 0)).unwrap_err().to_string();
    assert!(
        e.ends_with("buffer `bn.running_mean`: expected f32[4], got f32[5]"),
        "{e}"
    );
}

#[test]
fn passes_listing_summary_and_dot() {
    let g = cnn(false);
    let w = weights_for(&g, 6);
    let m = net(&w, &BN_BUFFERS, |x, w| cnn_eager(x, w, false));
    let mut tm = TracedModule::new(g, m.clone()).unwrap();
    let x = rand_t(&[2, 3, 8, 8], 9);
    let before = tm.call(&x).unwrap();
    let stats = tm.run_passes().unwrap();
    assert_eq!(stats.len(), 6);
    assert_close(&tm.call(&x).unwrap(), &before, 1e-5, "after passes");
    let listing = tm.listing();
    assert!(
        listing.contains("= conv2d(%0, %1, %2) stride=[1,1] padding=[1,1] dilation=[1,1] groups=1 : f32[2,4,8,8]  # Cnn/Conv2d[conv]"),
        "{listing}"
    );
    assert!(listing.ends_with("return %11\n"), "{listing}");
    let summary = tm.summary().unwrap();
    assert!(summary.contains("parameters"), "{summary}");
    assert!(summary.contains("kernels: "), "{summary}");
    let dot = tm.to_dot().unwrap();
    assert!(dot.starts_with("digraph kiln {"), "{dot}");
    assert!(dot.contains("cluster"), "{dot}");
}

#[test]
fn gradients_flow_through_the_interpreter_like_eager() {
    let m = mlp_net(1);
    let tm = TracedModule::new(mlp(), m.clone()).unwrap();
    let x = rand_t(&[8, 20], 4);
    tm.call(&x).unwrap().sum().unwrap().backward().unwrap();
    let traced: Vec<Tensor> = m
        .parameters()
        .iter()
        .map(|p| p.grad().expect("a gradient"))
        .collect();
    m.zero_grad(true).unwrap();
    m.call(&x).unwrap().sum().unwrap().backward().unwrap();
    for ((n, p), g) in m.named_parameters().iter().zip(&traced) {
        assert_same(g, &p.grad().unwrap(), n);
    }
}

#[test]
fn runtime_errors_convert_into_kiln_errors() {
    let tm = TracedModule::new(mlp(), mlp_net(0)).unwrap();
    let f = || -> kiln_frontend::Result<Tensor> { Ok(tm.call(&rand_t(&[1], 0))?) };
    assert_eq!(
        f().unwrap_err().to_string(),
        "TracedModule.forward: input 0 is f32[1], the graph was traced for f32[8,20]"
    );
}
