//! Every pass of the standard pipeline, alone and together, keeps the
//! interpreter's outputs on random inputs and weights (several seeds).

use crate::common::*;
use kiln_frontend::{DType, Tensor};
use kiln_ir::passes::PassManager;
use kiln_ir::{BinaryOp, Graph, InputKind, Op, TensorType, UnaryOp};
use kiln_runtime::run_graph;

/// conv(3->4, pad 1) -> eval BatchNorm2d: the BatchNorm folds into the conv.
fn conv_bn() -> Graph {
    let mut g = Graph::new();
    let x = g
        .add_input(InputKind::User(0), t(&[2, 3, 6, 6]), "")
        .unwrap();
    let w = param(&mut g, "conv.weight", &[4, 3, 3, 3]);
    let b = param(&mut g, "conv.bias", &[4]);
    let y = op(
        &mut g,
        Op::Conv2d {
            stride: [1, 1],
            padding: [1, 1],
            dilation: [1, 1],
            groups: 1,
        },
        &[x, w, b],
        "Net/Conv2d[conv]",
    );
    let bw = param(&mut g, "bn.weight", &[4]);
    let bb = param(&mut g, "bn.bias", &[4]);
    let rm = buffer(&mut g, "bn.running_mean", t(&[4]));
    let rv = buffer(&mut g, "bn.running_var", t(&[4]));
    let y = op(
        &mut g,
        Op::BatchNorm {
            training: false,
            momentum: 0.1,
            eps: 1e-5,
            has_weight: true,
            has_bias: true,
            has_running_stats: true,
        },
        &[y, bw, bb, rm, rv],
        "Net/BatchNorm2d[bn]",
    );
    finish(&mut g, &[y]);
    g
}

/// Fodder for the simplifications: x*1, x+0, neg(neg), constant
/// arithmetic, duplicated subexpressions, a no-op permute and reshape, a
/// dead branch; linear (addmm) -> eval BatchNorm1d folds too.
fn fodder() -> Graph {
    let mut g = Graph::new();
    let s = "Fodder";
    let x = g.add_input(InputKind::User(0), t(&[4, 6]), "").unwrap();
    let one = g.add_constant(t(&[]), vec![1.0], s).unwrap();
    let zero = g.add_constant(t(&[6]), vec![0.0; 6], s).unwrap();
    let c2 = g.add_constant(t(&[6]), vec![2.0; 6], s).unwrap();
    let c3 = g.add_constant(t(&[6]), vec![0.5; 6], s).unwrap();
    let cc = bin(&mut g, BinaryOp::Mul, c2, c3, s); // folds to 1.0s
    let a = bin(&mut g, BinaryOp::Mul, x, one, s);
    let a = bin(&mut g, BinaryOp::Add, a, zero, s);
    let a = un(&mut g, UnaryOp::Neg, a, s);
    let a = un(&mut g, UnaryOp::Neg, a, s);
    let a = op(&mut g, Op::Permute { dims: vec![0, 1] }, &[a], s);
    let a = op(&mut g, Op::Reshape { shape: vec![4, 6] }, &[a], s);
    let p = un(&mut g, UnaryOp::Tanh, a, s);
    let q = un(&mut g, UnaryOp::Tanh, a, s);
    let _dead = un(&mut g, UnaryOp::Exp, a, s);
    let r = bin(&mut g, BinaryOp::Add, p, q, s);
    let r = bin(&mut g, BinaryOp::Mul, r, cc, s);
    let h = linear2d(&mut g, r, "fc", 6, 5, "Fodder/Linear[fc]");
    let bw = param(&mut g, "bn.weight", &[5]);
    let bb = param(&mut g, "bn.bias", &[5]);
    let rm = buffer(&mut g, "bn.running_mean", t(&[5]));
    let rv = buffer(&mut g, "bn.running_var", t(&[5]));
    let y = op(
        &mut g,
        Op::BatchNorm {
            training: false,
            momentum: 0.1,
            eps: 1e-5,
            has_weight: true,
            has_bias: true,
            has_running_stats: true,
        },
        &[h, bw, bb, rm, rv],
        "Fodder/BatchNorm1d[bn]",
    );
    let n = buffer(&mut g, "count", TensorType::new(&[], DType::I64));
    let n = un(&mut g, UnaryOp::MulScalar(1.0), n, s);
    finish(&mut g, &[y, n]);
    g
}

fn graphs() -> Vec<(&'static str, Graph)> {
    vec![
        ("mlp", mlp()),
        ("cnn_eval", cnn(false)),
        ("cnn_train", cnn(true)),
        ("block", block()),
        ("misc", misc()),
        ("conv_bn", conv_bn()),
        ("fodder", fodder()),
    ]
}

fn outputs(g: &Graph, seed: u64) -> Vec<Tensor> {
    let w = weights_for(g, seed);
    let out = run_graph(g, &inputs_for(g, seed), &binder(&w)).unwrap();
    out
}

fn check(name: &str, before: &Graph, after: &Graph) {
    for seed in 0..4 {
        let a = outputs(before, seed);
        let b = outputs(after, seed);
        assert_eq!(a.len(), b.len(), "{name}");
        for (k, (x, y)) in a.iter().zip(&b).enumerate() {
            assert_close(x, y, 1e-5, &format!("{name} seed {seed} output {k}"));
        }
    }
}

#[test]
fn every_standard_pass_keeps_outputs() {
    let std_pm = PassManager::standard();
    for (name, g) in graphs() {
        for pass in std_pm.pass_names() {
            let mut pm = PassManager::new();
            // Reuse the standard pass function by name.
            let f = STANDARD
                .iter()
                .find(|(n, _)| *n == pass)
                .unwrap_or_else(|| panic!("unknown pass {pass}"))
                .1;
            pm.add(pass, f).verify_each(true);
            let mut h = g.clone();
            pm.run(&mut h).unwrap();
            check(&format!("{name} after {pass}"), &g, &h);
        }
    }
}

const STANDARD: [(&str, kiln_ir::passes::PassFn); 6] = [
    ("simplify_algebra", kiln_ir::passes::simplify_algebra),
    ("simplify_views", kiln_ir::passes::simplify_views),
    ("constant_fold", kiln_ir::passes::constant_fold),
    ("fold_batchnorm", kiln_ir::passes::fold_batchnorm),
    ("cse", kiln_ir::passes::cse),
    ("dce", kiln_ir::passes::dce),
];

#[test]
fn the_standard_pipeline_keeps_outputs_and_does_work() {
    let mut pm = PassManager::standard();
    pm.verify_each(true);
    for (name, g) in graphs() {
        let mut h = g.clone();
        pm.run_to_fixpoint(&mut h, 4).unwrap();
        check(&format!("{name} after the pipeline"), &g, &h);
        let count = |g: &Graph, op: &str| {
            g.node_ids()
                .into_iter()
                .filter(|&n| g.node(n).op.name() == op)
                .count()
        };
        match name {
            "conv_bn" => {
                assert_eq!(count(&g, "batch_norm"), 1);
                assert_eq!(count(&h, "batch_norm"), 0, "conv_bn: BN folded");
            }
            "fodder" => {
                assert_eq!(count(&h, "batch_norm"), 0, "fodder: BN folded");
                assert_eq!(count(&h, "neg"), 0);
                assert_eq!(count(&h, "exp"), 0, "dead code removed");
                assert_eq!(count(&h, "tanh"), 1, "cse");
                assert!(h.node_count() < g.node_count());
            }
            "cnn_train" => assert_eq!(count(&h, "batch_norm"), 1, "training BN stays"),
            _ => {}
        }
    }
}
