//! Tracing every zoo model (issue 5's acceptance): the interpreted graph
//! equals eager in eval and in training mode (buffer updates included),
//! every pass keeps outputs equal on random inputs, parameters stay bound
//! by name, export round-trips with no model code, host reads warn and
//! `check_trace` catches a frozen branch, and simple_net's listing matches
//! its golden file.

mod common;
use common::{fixtures, model, rel};
use kiln::nn::prelude::*;
use kiln::nn::StateDict;
use kiln::runtime::{load, TracedModule};
use kiln::{jit, zoo, DType, Result, Tensor};
use std::path::Path;
use std::sync::Arc;

const TOL: f64 = 1e-5;

fn buffers(m: &dyn Module) -> Vec<(String, Tensor)> {
    m.named_buffers()
        .into_iter()
        .map(|(n, t)| (n, t.detach().clone_tensor().unwrap()))
        .collect()
}

#[test]
fn every_zoo_model_traces_in_eval_and_the_graph_equals_eager() {
    for &name in zoo::names() {
        let (m, x) = model(name);
        m.eval();
        let eager = kiln::no_grad(|| m.call(&x)).unwrap();
        let traced = jit::trace(&m, &[x.clone()]).unwrap();
        let got = kiln::no_grad(|| traced.forward(&[x.clone()])).unwrap();
        let e = rel(&got[0], &eager);
        assert!(e <= TOL, "{name}: traced vs eager {e:.2e}");
        // Every scope starts at the model's type.
        let root = m.core().type_name().to_string();
        for n in traced.graph().node_ids() {
            let s = &traced.graph().node(n).scope;
            assert!(s.is_empty() || s.starts_with(&root), "{name}: scope {s}");
        }
    }
}

#[test]
fn every_zoo_model_traces_in_training_mode_with_buffer_updates() {
    for &name in zoo::names() {
        // Eager reference: one training forward from the fixture state.
        let (a, x) = model(name);
        a.train(true);
        kiln::verify::disable_dropout(&*a).unwrap();
        let want = kiln::no_grad(|| a.call(&x)).unwrap();
        let want_buffers = buffers(&*a);
        // Trace (runs the forward once, like torch.jit.trace), reset the
        // state, then run the graph once.
        let (b, _) = model(name);
        b.train(true);
        kiln::verify::disable_dropout(&*b).unwrap();
        let traced = jit::trace(&b, &[x.clone()]).unwrap();
        b.load_safetensors(fixtures().join(format!("{name}.safetensors")), true)
            .unwrap();
        let got = kiln::no_grad(|| traced.forward(&[x.clone()])).unwrap();
        let e = rel(&got[0], &want);
        assert!(e <= TOL, "{name}: training output {e:.2e}");
        for ((n, w), (_, g)) in want_buffers.iter().zip(buffers(&*b)) {
            let e = rel(&g, w);
            assert!(
                e <= TOL,
                "{name}: buffer {n} after one traced training run: {e:.2e}"
            );
        }
    }
}

#[test]
fn passes_keep_outputs_on_random_inputs_for_every_zoo_graph() {
    for &name in zoo::names() {
        for train in [false, true] {
            let (m, x) = model(name);
            m.train(train);
            kiln::verify::disable_dropout(&*m).unwrap();
            let mut traced = jit::trace(&m, &[x.clone()]).unwrap();
            let reference = jit::trace(&m, &[x.clone()]).unwrap();
            traced.run_passes().unwrap();
            for seed in 0..3 {
                kiln::manual_seed(100 + seed);
                let r = Tensor::randn(&x.shape(), DType::F32);
                let sd = m.state_dict();
                let snap: Vec<Tensor> = sd
                    .iter()
                    .map(|(_, t)| t.detach().clone_tensor().unwrap())
                    .collect();
                let want = kiln::no_grad(|| reference.forward(&[r.clone()])).unwrap();
                restore(&sd, &snap);
                let got = kiln::no_grad(|| traced.forward(&[r.clone()])).unwrap();
                restore(&sd, &snap);
                let e = rel(&got[0], &want[0]);
                assert!(
                    e <= TOL,
                    "{name} (train={train}) seed {seed}: optimized graph {e:.2e}"
                );
            }
        }
    }
}

fn restore(sd: &StateDict, snap: &[Tensor]) {
    kiln::no_grad(|| {
        for ((_, live), saved) in sd.iter().zip(snap) {
            live.copy_(saved).unwrap();
        }
    });
}

#[test]
fn parameters_are_bound_by_name_after_optimizer_steps_and_loads() {
    let (m, x) = model("simple_net");
    m.eval();
    let traced = jit::trace(&m, &[x.clone()]).unwrap();
    // An SGD step changes the live parameters: the trace sees them.
    let mut opt = kiln::optim::SGD::new(
        m.parameters(),
        kiln::optim::SgdOptions {
            lr: 0.1,
            ..Default::default()
        },
    )
    .unwrap();
    let loss = m.call(&x).unwrap().square().unwrap().mean().unwrap();
    loss.backward().unwrap();
    kiln::optim::Optimizer::step(&mut opt).unwrap();
    let eager = kiln::no_grad(|| m.call(&x)).unwrap();
    let got = kiln::no_grad(|| traced.forward(&[x.clone()])).unwrap();
    assert!(rel(&got[0], &eager) <= TOL);
    // load_state_dict too.
    let fresh = zoo::build("simple_net").unwrap();
    m.load_state_dict(&fresh.state_dict(), true).unwrap();
    let eager = kiln::no_grad(|| m.call(&x)).unwrap();
    let got = kiln::no_grad(|| traced.forward(&[x.clone()])).unwrap();
    assert!(rel(&got[0], &eager) <= TOL);
}

#[test]
fn export_round_trip_for_every_zoo_model() {
    let dir = std::env::temp_dir().join(format!("kiln-zoo-export-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for &name in zoo::names() {
        let (m, x) = model(name);
        m.eval();
        let traced = jit::trace(&m, &[x.clone()]).unwrap();
        let path = dir.join(format!("{name}.kiln"));
        traced.save(&path).unwrap();
        let loaded: TracedModule = load(&path).unwrap();
        assert!(loaded.module().is_none());
        let want = kiln::no_grad(|| traced.forward(&[x.clone()])).unwrap();
        let got = kiln::no_grad(|| loaded.forward(&[x.clone()])).unwrap();
        assert_eq!(got[0].to_vec::<f32>(), want[0].to_vec::<f32>(), "{name}");
    }
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn simple_net_listing_matches_the_golden_file() {
    let (m, x) = model("simple_net");
    m.eval();
    let traced = jit::trace(&m, &[x]).unwrap();
    let listing = traced.listing();
    let golden = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/simple_net.listing");
    if std::env::var_os("KILN_BLESS").is_some() {
        std::fs::write(&golden, &listing).unwrap();
    }
    let want =
        std::fs::read_to_string(&golden).expect("golden file (regenerate with KILN_BLESS=1)");
    assert_eq!(listing, want);
}

/// Branches on a host read of the data: the trace freezes the branch taken.
struct Branchy {
    core: ModuleCore,
}

impl Module for Branchy {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.sum()?.item()? > 0.0 {
            x.mul_scalar(2.0)
        } else {
            x.neg()
        }
    }
}

#[test]
fn host_read_warns_and_check_trace_catches_the_other_branch() {
    let m: Arc<dyn Module> = Arc::new(Branchy {
        core: ModuleCore::new("Branchy"),
    });
    let pos = Tensor::ones(&[3], DType::F32);
    let t = jit::trace_with_warnings(&m, &[pos.clone()]).unwrap();
    assert_eq!(t.warnings.len(), 1);
    assert!(t.warnings[0].contains("item") && t.warnings[0].contains("Branchy"));
    // Same branch: fine. Other branch: divergence reported.
    jit::check_trace(&t.module, &[pos.mul_scalar(3.0).unwrap()], 1e-6).unwrap();
    let err = jit::check_trace(&t.module, &[pos.neg().unwrap()], 1e-6)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diverges"), "{err}");
}
