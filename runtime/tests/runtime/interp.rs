//! The interpreter on hand-built graphs, compared with the same computation
//! done directly with eager ops (bit for bit) or with kiln-ir's f64
//! reference evaluator.

use crate::common::*;
use kiln_frontend::{DType, Tensor};
use kiln_ir::eval::eval_graph;
use kiln_ir::{Graph, InputKind, Op, OutputKind, TensorType, Value};
use kiln_runtime::{run_graph, run_graph_collect};
use std::sync::Mutex;

/// Tests that use the global generator (dropout) run one at a time.
pub static RNG_LOCK: Mutex<()> = Mutex::new(());

#[test]
fn mlp_equals_eager() {
    let g = mlp();
    for seed in 0..3 {
        let w = weights_for(&g, seed);
        let x = rand_t(&[8, 20], 100 + seed);
        let out = run_graph(&g, std::slice::from_ref(&x), &binder(&w)).unwrap();
        assert_eq!(out.len(), 1);
        assert_same(&out[0], &mlp_eager(&x, &w), "mlp");
    }
}

#[test]
fn cnn_eval_equals_eager() {
    let g = cnn(false);
    let w = weights_for(&g, 1);
    let x = rand_t(&[2, 3, 8, 8], 7);
    let out = run_graph(&g, std::slice::from_ref(&x), &binder(&w)).unwrap();
    assert_eq!(out.len(), 1);
    assert_same(
        &out[0],
        &cnn_eager(&x, &copy_weights(&w), false),
        "cnn eval",
    );
}

#[test]
fn cnn_train_outputs_and_buffer_updates_equal_eager() {
    let g = cnn(true);
    let w = weights_for(&g, 2);
    let before = copy_weights(&w);
    let x = rand_t(&[2, 3, 8, 8], 8);
    let out = run_graph(&g, std::slice::from_ref(&x), &binder(&w)).unwrap();
    // y, then num_batches_tracked, running_mean, running_var.
    assert_eq!(out.len(), 4);
    let eager_w = copy_weights(&w);
    let y = cnn_eager(&x, &eager_w, true);
    assert_same(&out[0], &y, "y");
    assert_same(&out[1], &eager_w["bn.num_batches_tracked"], "nbt");
    assert_eq!(out[1].to_vec_f64(), vec![1.0]);
    assert_same(&out[2], &eager_w["bn.running_mean"], "running_mean");
    assert_same(&out[3], &eager_w["bn.running_var"], "running_var");
    // The running stats moved; the bound buffers themselves were not
    // written by the interpreter (TracedModule writes back).
    assert!(out[2].to_vec_f64() != before["bn.running_mean"].to_vec_f64());
    for (k, v) in &before {
        assert_same(&w[k], v, k);
    }
}

#[test]
fn block_equals_eager() {
    let g = block();
    for seed in 0..3 {
        let w = weights_for(&g, seed);
        let x = rand_t(&[2, 4, 8], 50 + seed);
        let out = run_graph(&g, std::slice::from_ref(&x), &binder(&w)).unwrap();
        assert_same(&out[0], &block_eager(&x, &w), "block");
    }
}

fn f64_binding(
    g: &Graph,
    w: &std::collections::HashMap<String, Tensor>,
    xs: &[Tensor],
) -> impl Fn(&InputKind) -> Option<Vec<f64>> {
    let _ = g;
    let w: Vec<(String, Vec<f64>)> = w.iter().map(|(k, v)| (k.clone(), v.to_vec_f64())).collect();
    let xs: Vec<Vec<f64>> = xs.iter().map(|x| x.to_vec_f64()).collect();
    move |k| match k {
        InputKind::User(i) => xs.get(*i).cloned(),
        InputKind::Param(n) | InputKind::Buffer(n) => {
            w.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone())
        }
    }
}

#[test]
fn every_graph_agrees_with_the_f64_reference_evaluator() {
    for (name, g) in [
        ("mlp", mlp()),
        ("cnn_eval", cnn(false)),
        ("cnn_train", cnn(true)),
        ("block", block()),
        ("misc", misc()),
    ] {
        for seed in 0..3 {
            let w = weights_for(&g, seed);
            let xs = inputs_for(&g, seed);
            let out = run_graph(&g, &xs, &binder(&w)).unwrap();
            let reference = eval_graph(&g, &f64_binding(&g, &w, &xs)).unwrap();
            assert_eq!(out.len(), reference.len());
            for (k, (o, r)) in out.iter().zip(&reference).enumerate() {
                let r = Tensor::from_vec(r.data.clone(), &r.ty.shape)
                    .unwrap()
                    .to_dtype(r.ty.dtype)
                    .unwrap();
                assert_close(o, &r, 1e-5, &format!("{name} seed {seed} output {k}"));
            }
        }
    }
}

#[test]
fn misc_output_types_follow_inference() {
    let g = misc();
    let w = weights_for(&g, 0);
    let out = run_graph(&g, &inputs_for(&g, 0), &binder(&w)).unwrap();
    let dtypes: Vec<DType> = out.iter().map(|t| t.dtype()).collect();
    // The f64 0-dim constant does not promote the f32 tensor (torch:
    // (torch.ones(2, 1) + torch.tensor(0.5, dtype=torch.float64)).dtype
    // -> torch.float32).
    assert_eq!(
        dtypes,
        vec![
            DType::F64,
            DType::F32,
            DType::F32,
            DType::I64,
            DType::F32,
            DType::I64
        ]
    );
    for (o, go) in out.iter().zip(g.outputs()) {
        assert_eq!(&o.shape(), &g.value_type(go.value).shape);
    }
}

#[test]
fn conv_transpose_equals_eager() {
    use kiln_cpu::conv::Conv2dParams;
    let mut g = Graph::new();
    let x = g
        .add_input(InputKind::User(0), t(&[2, 3, 4, 4]), "")
        .unwrap();
    let wt = param(&mut g, "up.weight", &[3, 2, 3, 3]);
    let b = param(&mut g, "up.bias", &[2]);
    let y = op(
        &mut g,
        Op::ConvTranspose2d {
            stride: [2, 2],
            padding: [1, 1],
            output_padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
        },
        &[x, wt, b],
        "Up",
    );
    finish(&mut g, &[y]);
    let w = weights_for(&g, 3);
    let xs = inputs_for(&g, 3);
    let out = run_graph(&g, &xs, &binder(&w)).unwrap();
    let p = Conv2dParams {
        stride: (2, 2),
        padding: (1, 1),
        dilation: (1, 1),
        groups: 1,
    };
    let e = kiln_frontend::ops::conv::conv_transpose2d(
        &xs[0],
        &w["up.weight"],
        Some(&w["up.bias"]),
        p,
        (1, 1),
    )
    .unwrap();
    assert_eq!(out[0].shape(), vec![2, 2, 8, 8]);
    assert_same(&out[0], &e, "conv_transpose2d");
}

#[test]
fn dropout_uses_the_global_generator_like_eager() {
    let _l = RNG_LOCK.lock().unwrap();
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), t(&[6, 10]), "").unwrap();
    let y = op(
        &mut g,
        Op::Dropout {
            p: 0.5,
            seed: 0,
            offset: 0,
        },
        &[x],
        "D",
    );
    finish(&mut g, &[y]);
    let xs = inputs_for(&g, 1);
    kiln_frontend::manual_seed(42);
    let out = run_graph(&g, &xs, &binder(&Default::default())).unwrap();
    kiln_frontend::manual_seed(42);
    let e = kiln_frontend::ops::nn::dropout(&xs[0], 0.5, true).unwrap();
    assert_same(&out[0], &e, "dropout");
    let zeros = out[0].to_vec_f64().iter().filter(|v| **v == 0.0).count();
    assert!(zeros > 5 && zeros < 55, "{zeros}");
}

#[test]
fn views_stay_views_and_outputs_alias_like_eager() {
    // A permuted parameter returned as is: a strided view of the bound
    // tensor (torch: w.t() shares storage with w).
    let mut g = Graph::new();
    let w = param(&mut g, "w", &[2, 3]);
    let wt = op(&mut g, Op::Permute { dims: vec![1, 0] }, &[w], "");
    let c = op(&mut g, Op::Contiguous, &[wt], "");
    finish(&mut g, &[wt, c]);
    let ws = weights_for(&g, 0);
    let out = run_graph(&g, &[], &binder(&ws)).unwrap();
    assert!(out[0].shares_storage(&ws["w"]));
    assert_eq!(out[0].strides(), vec![1, 3]);
    assert!(!out[1].shares_storage(&ws["w"]));
    assert!(out[1].is_contiguous());
    assert_same(&out[0], &out[1], "contiguous");
}

#[test]
fn collect_keeps_every_value() {
    let g = mlp();
    let w = weights_for(&g, 0);
    let x = rand_t(&[8, 20], 3);
    let c = run_graph_collect(&g, std::slice::from_ref(&x), &binder(&w)).unwrap();
    assert_eq!(c.order.len(), g.node_count());
    assert_eq!(c.values.len(), g.node_count()); // one output each
    let relu = g
        .node_ids()
        .into_iter()
        .find(|&n| g.node(n).op.name() == "relu")
        .unwrap();
    let h = &c.values[&Value::new(relu, 0)];
    let eh = Tensor::addmm(&w["fc1.bias"], &x, &w["fc1.weight"].t().unwrap())
        .unwrap()
        .relu()
        .unwrap();
    assert_same(h, &eh, "relu value");
    assert_same(&c.outputs[0], &mlp_eager(&x, &w), "output");
}

#[test]
fn runtime_errors_name_the_node_and_scope() {
    // index_select with an index out of range passes type inference and
    // fails when run.
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), t(&[4, 3]), "").unwrap();
    let idx = g
        .add_constant(TensorType::new(&[2], DType::I64), vec![1.0, 9.0], "")
        .unwrap();
    let y = op(
        &mut g,
        Op::IndexSelect { dim: 0 },
        &[x, idx],
        "Net/Gather[g]",
    );
    finish(&mut g, &[y]);
    let e = run_graph(&g, &inputs_for(&g, 0), &binder(&Default::default()))
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("while executing %2 = index_select(%0, %1) dim=0 : f32[2,3]  # Net/Gather[g]: index_select"),
        "{e}"
    );
}

#[test]
fn bad_inputs_and_bindings_are_clear_errors() {
    let g = mlp();
    let w = weights_for(&g, 0);
    let e = run_graph(&g, &[], &binder(&w)).unwrap_err().to_string();
    assert_eq!(e, "the graph takes 1 input(s), got 0");
    let e = run_graph(&g, &[rand_t(&[8, 21], 0)], &binder(&w))
        .unwrap_err()
        .to_string();
    assert!(
        e.ends_with("input 0: expected f32[8,20], got f32[8,21]"),
        "{e}"
    );
    let mut w2 = w.clone();
    w2.insert("fc2.bias".into(), Tensor::zeros(&[5], DType::F64));
    let e = run_graph(&g, &[rand_t(&[8, 20], 0)], &binder(&w2))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("= param name=\"fc2.bias\" : f32[5]")
            && e.ends_with("parameter `fc2.bias`: expected f32[5], got f64[5]"),
        "{e}"
    );
    let mut w3 = w.clone();
    w3.remove("fc1.weight");
    let e = run_graph(&g, &[rand_t(&[8, 20], 0)], &binder(&w3))
        .unwrap_err()
        .to_string();
    assert!(e.ends_with("no weight fc1.weight"), "{e}");
}

#[test]
fn buffer_update_outputs_come_after_user_outputs_in_graph_order() {
    let g = cnn(true);
    let kinds: Vec<OutputKind> = g.outputs().iter().map(|o| o.kind.clone()).collect();
    assert_eq!(kinds[0], OutputKind::User);
    assert_eq!(
        kinds[1],
        OutputKind::BufferUpdate("bn.num_batches_tracked".into())
    );
}
