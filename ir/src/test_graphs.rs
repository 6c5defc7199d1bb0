//! Hand-built graphs shaped like the zoo models' traces (what the tracer
//! will record), shared by the tests of passes, fusion, printer and format.

use crate::graph::{Graph, OutputKind, Value};
use crate::op::{InputKind, Op};
use crate::{BinaryOp, DType, ReduceOp, TensorType, UnaryOp};

const F: DType = DType::F32;

fn t(shape: &[usize]) -> TensorType {
    TensorType::new(shape, F)
}

fn param(g: &mut Graph, name: &str, shape: &[usize]) -> Value {
    g.add_input(InputKind::Param(name.into()), t(shape), "")
        .unwrap()
}

fn buffer(g: &mut Graph, name: &str, ty: TensorType) -> Value {
    g.add_input(InputKind::Buffer(name.into()), ty, "").unwrap()
}

fn op(g: &mut Graph, o: Op, args: &[Value], scope: &str) -> Value {
    g.add1(o, args, scope).unwrap()
}

fn bin(g: &mut Graph, b: BinaryOp, x: Value, y: Value, scope: &str) -> Value {
    op(g, Op::Binary(b), &[x, y], scope)
}

fn un(g: &mut Graph, u: UnaryOp, x: Value, scope: &str) -> Value {
    op(g, Op::Unary(u), &[x], scope)
}

/// F.linear on 2-D input, traced as addmm(b, x, w.t()).
fn linear2d(g: &mut Graph, x: Value, w: Value, b: Value, scope: &str) -> Value {
    let wt = op(g, Op::Permute { dims: vec![1, 0] }, &[w], scope);
    op(g, Op::Addmm, &[b, x, wt], scope)
}

/// F.linear on 3-D input, traced as matmul(x, w.t()) + b.
fn linear3d(g: &mut Graph, x: Value, w: Value, b: Value, scope: &str) -> Value {
    let wt = op(g, Op::Permute { dims: vec![1, 0] }, &[w], scope);
    let y = op(g, Op::MatMul, &[x, wt], scope);
    bin(g, BinaryOp::Add, y, b, scope)
}

/// Batch norm over params/buffers named `prefix.*`; in training the running
/// stats and num_batches_tracked become buffer-update outputs.
fn batch_norm(
    g: &mut Graph,
    x: Value,
    prefix: &str,
    c: usize,
    training: bool,
    scope: &str,
) -> Value {
    let w = param(g, &format!("{prefix}.weight"), &[c]);
    let b = param(g, &format!("{prefix}.bias"), &[c]);
    let rm = buffer(g, &format!("{prefix}.running_mean"), t(&[c]));
    let rv = buffer(g, &format!("{prefix}.running_var"), t(&[c]));
    let nbt = buffer(
        g,
        &format!("{prefix}.num_batches_tracked"),
        TensorType::new(&[], DType::I64),
    );
    let outs = g
        .add_node(
            Op::BatchNorm {
                training,
                momentum: 0.1,
                eps: 1e-5,
                has_weight: true,
                has_bias: true,
                has_running_stats: true,
            },
            &[x, w, b, rm, rv],
            scope,
        )
        .unwrap();
    if training {
        let n1 = un(g, UnaryOp::AddScalar(1.0), nbt, scope);
        for (v, s) in [
            (n1, "num_batches_tracked"),
            (outs[1], "running_mean"),
            (outs[2], "running_var"),
        ] {
            g.add_output(v, OutputKind::BufferUpdate(format!("{prefix}.{s}")))
                .unwrap();
        }
    }
    outs[0]
}

#[allow(clippy::too_many_arguments)]
fn conv(
    g: &mut Graph,
    x: Value,
    prefix: &str,
    cin: usize,
    cout: usize,
    k: usize,
    pad: usize,
    scope: &str,
) -> Value {
    let w = param(g, &format!("{prefix}.weight"), &[cout, cin, k, k]);
    let b = param(g, &format!("{prefix}.bias"), &[cout]);
    op(
        g,
        Op::Conv2d {
            stride: [1, 1],
            padding: [pad, pad],
            dilation: [1, 1],
            groups: 1,
        },
        &[x, w, b],
        scope,
    )
}

fn maxpool(g: &mut Graph, x: Value, scope: &str) -> Value {
    op(
        g,
        Op::MaxPool2d {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
            dilation: [1, 1],
            ceil_mode: false,
        },
        &[x],
        scope,
    )
}

/// Graph outputs are set so that user outputs come first.
fn finish(g: &mut Graph, y: Value) {
    let mut outs = vec![crate::GraphOutput {
        value: y,
        kind: OutputKind::User,
    }];
    outs.extend(g.outputs().iter().cloned());
    g.set_outputs(outs).unwrap();
}

pub fn simple_net() -> Graph {
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), t(&[64, 784]), "").unwrap();
    let w1 = param(&mut g, "layer1.weight", &[256, 784]);
    let b1 = param(&mut g, "layer1.bias", &[256]);
    let w2 = param(&mut g, "layer2.weight", &[10, 256]);
    let b2 = param(&mut g, "layer2.bias", &[10]);
    let h = linear2d(&mut g, x, w1, b1, "SimpleNet/Linear[layer1]");
    let h = un(&mut g, UnaryOp::Relu, h, "SimpleNet/ReLU[relu]");
    let y = linear2d(&mut g, h, w2, b2, "SimpleNet/Linear[layer2]");
    finish(&mut g, y);
    g
}

pub fn seed_cnn(training: bool) -> Graph {
    let mut g = Graph::new();
    let s = |m: &str| format!("SeedCNN/Sequential[net]/{m}");
    let mut x = g
        .add_input(InputKind::User(0), t(&[8, 1, 28, 28]), "")
        .unwrap();
    // (conv index, cin, cout, pool after conv)
    let blocks = [
        (0, 1, 32, true),
        (4, 32, 64, false),
        (7, 64, 64, true),
        (11, 64, 128, false),
    ];
    for (i, cin, cout, pool) in blocks {
        let k = if i == 0 { 5 } else { 3 };
        x = conv(
            &mut g,
            x,
            &format!("net.{i}"),
            cin,
            cout,
            k,
            1,
            &s(&format!("Conv2d[{i}]")),
        );
        let mut j = i + 1;
        if pool {
            x = maxpool(&mut g, x, &s(&format!("MaxPool2d[{j}]")));
            j += 1;
        }
        x = un(&mut g, UnaryOp::Relu, x, &s(&format!("ReLU[{j}]")));
        j += 1;
        x = batch_norm(
            &mut g,
            x,
            &format!("net.{j}"),
            cout,
            training,
            &s(&format!("BatchNorm2d[{j}]")),
        );
    }
    finish(&mut g, x);
    g
}

/// conv(3->4, pad 1) -> BatchNorm2d: the foldable case.
pub fn conv_bn_net(eval: bool) -> Graph {
    let mut g = Graph::new();
    let x = g
        .add_input(InputKind::User(0), t(&[2, 3, 6, 6]), "")
        .unwrap();
    let y = conv(&mut g, x, "conv", 3, 4, 3, 1, "Net/Conv2d[conv]");
    let y = batch_norm(&mut g, y, "bn", 4, !eval, "Net/BatchNorm2d[bn]");
    finish(&mut g, y);
    g
}

/// net_with_dropout in eval mode: linear -> BatchNorm1d -> relu -> linear.
pub fn linear_bn_net() -> Graph {
    net_with_dropout(false)
}

pub fn net_with_dropout(training: bool) -> Graph {
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), t(&[10, 20]), "").unwrap();
    let w1 = param(&mut g, "fc1.weight", &[50, 20]);
    let b1 = param(&mut g, "fc1.bias", &[50]);
    let h = linear2d(&mut g, x, w1, b1, "NetWithDropout/Linear[fc1]");
    let h = batch_norm(
        &mut g,
        h,
        "bn1",
        50,
        training,
        "NetWithDropout/BatchNorm1d[bn1]",
    );
    let mut h = un(&mut g, UnaryOp::Relu, h, "NetWithDropout");
    if training {
        h = op(
            &mut g,
            Op::Dropout {
                p: 0.5,
                seed: 0,
                offset: 0,
            },
            &[h],
            "NetWithDropout/Dropout[dropout]",
        );
    }
    let w2 = param(&mut g, "fc2.weight", &[2, 50]);
    let b2 = param(&mut g, "fc2.bias", &[2]);
    let y = linear2d(&mut g, h, w2, b2, "NetWithDropout/Linear[fc2]");
    finish(&mut g, y);
    g
}

pub fn complex_net() -> Graph {
    let mut g = Graph::new();
    let x = g
        .add_input(InputKind::User(0), t(&[8, 3, 10, 10]), "")
        .unwrap();
    let h = conv(
        &mut g,
        x,
        "layer1.0",
        3,
        16,
        3,
        0,
        "ComplexNet/Sequential[layer1]/Conv2d[0]",
    );
    let h = un(
        &mut g,
        UnaryOp::Relu,
        h,
        "ComplexNet/Sequential[layer1]/ReLU[1]",
    );
    let h = conv(
        &mut g,
        h,
        "layer2.0",
        16,
        32,
        3,
        0,
        "ComplexNet/Sequential[layer2]/Conv2d[0]",
    );
    let h = un(
        &mut g,
        UnaryOp::Relu,
        h,
        "ComplexNet/Sequential[layer2]/ReLU[1]",
    );
    let h = op(
        &mut g,
        Op::Reshape {
            shape: vec![8, 32 * 6 * 6],
        },
        &[h],
        "ComplexNet",
    );
    let w = param(&mut g, "fc.weight", &[10, 1152]);
    let b = param(&mut g, "fc.bias", &[10]);
    let y = linear2d(&mut g, h, w, b, "ComplexNet/Linear[fc]");
    finish(&mut g, y);
    g
}

/// TransformerBlock(dim=32, heads=4) on [2, 8, 32].
pub fn transformer_block() -> Graph {
    let (b, tt, c, h) = (2, 8, 32, 4);
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), t(&[b, tt, c]), "").unwrap();
    let ln = |g: &mut Graph, x: Value, name: &str| {
        let w = param(g, &format!("{name}.weight"), &[c]);
        let bb = param(g, &format!("{name}.bias"), &[c]);
        op(
            g,
            Op::LayerNorm {
                normalized_shape: vec![c],
                eps: 1e-5,
                has_weight: true,
                has_bias: true,
            },
            &[x, w, bb],
            &format!("TransformerBlock/LayerNorm[{name}]"),
        )
    };
    let a = "TransformerBlock/Attention[attn]";
    let y = ln(&mut g, x, "ln1");
    let wq = param(&mut g, "attn.qkv.weight", &[3 * c, c]);
    let bq = param(&mut g, "attn.qkv.bias", &[3 * c]);
    let qkv = linear3d(&mut g, y, wq, bq, &format!("{a}/Linear[qkv]"));
    let qkv = op(
        &mut g,
        Op::Reshape {
            shape: vec![b, tt, 3, h, c / h],
        },
        &[qkv],
        a,
    );
    let qkv = op(
        &mut g,
        Op::Permute {
            dims: vec![2, 0, 3, 1, 4],
        },
        &[qkv],
        a,
    );
    let q = op(&mut g, Op::Select { dim: 0, index: 0 }, &[qkv], a);
    let k = op(&mut g, Op::Select { dim: 0, index: 1 }, &[qkv], a);
    let v = op(&mut g, Op::Select { dim: 0, index: 2 }, &[qkv], a);
    let kt = op(
        &mut g,
        Op::Permute {
            dims: vec![0, 1, 3, 2],
        },
        &[k],
        a,
    );
    let att = op(&mut g, Op::MatMul, &[q, kt], a);
    let att = un(
        &mut g,
        UnaryOp::MulScalar(((c / h) as f64).powf(-0.5)),
        att,
        a,
    );
    let att = op(&mut g, Op::Softmax { dim: 3 }, &[att], a);
    let y = op(&mut g, Op::MatMul, &[att, v], a);
    let y = op(
        &mut g,
        Op::Permute {
            dims: vec![0, 2, 1, 3],
        },
        &[y],
        a,
    );
    let y = op(
        &mut g,
        Op::Reshape {
            shape: vec![b, tt, c],
        },
        &[y],
        a,
    );
    let wp = param(&mut g, "attn.proj.weight", &[c, c]);
    let bp = param(&mut g, "attn.proj.bias", &[c]);
    let y = linear3d(&mut g, y, wp, bp, &format!("{a}/Linear[proj]"));
    let x1 = bin(&mut g, BinaryOp::Add, x, y, "TransformerBlock");
    let y = ln(&mut g, x1, "ln2");
    let m = "TransformerBlock/Sequential[mlp]";
    let w0 = param(&mut g, "mlp.0.weight", &[4 * c, c]);
    let b0 = param(&mut g, "mlp.0.bias", &[4 * c]);
    let y = linear3d(&mut g, y, w0, b0, &format!("{m}/Linear[0]"));
    let y = un(&mut g, UnaryOp::GeluErf, y, &format!("{m}/GELU[1]"));
    let w2 = param(&mut g, "mlp.2.weight", &[c, 4 * c]);
    let b2 = param(&mut g, "mlp.2.bias", &[c]);
    let y = linear3d(&mut g, y, w2, b2, &format!("{m}/Linear[2]"));
    let out = bin(&mut g, BinaryOp::Add, x1, y, "TransformerBlock");
    finish(&mut g, out);
    g
}

/// PointwiseChain(width=16) on [4, 16].
pub fn pointwise_chain() -> Graph {
    crate::sample_graphs::pointwise_chain(4, 16)
}

/// y = x*w + b; sqrt(mean(y, 1, keepdim)); y - that: a reduction with a
/// pointwise prologue and epilogue, then a pointwise op at the input shape.
pub fn mean_sub_prologue() -> Graph {
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), t(&[4, 8]), "").unwrap();
    let w = param(&mut g, "w", &[8]);
    let b = param(&mut g, "b", &[8]);
    let y = bin(&mut g, BinaryOp::Mul, x, w, "M");
    let y = bin(&mut g, BinaryOp::Add, y, b, "M");
    let m = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Mean,
            dims: vec![1],
            keepdim: true,
        },
        &[y],
        "M",
    );
    let s = un(&mut g, UnaryOp::Sqrt, m, "M");
    let z = bin(&mut g, BinaryOp::Sub, y, s, "M");
    finish(&mut g, z);
    g
}

pub fn all_test_graphs() -> Vec<(&'static str, Graph)> {
    vec![
        ("simple_net", simple_net()),
        ("seed_cnn_eval", seed_cnn(false)),
        ("seed_cnn_train", seed_cnn(true)),
        ("conv_bn_eval", conv_bn_net(true)),
        ("net_with_dropout_eval", net_with_dropout(false)),
        ("net_with_dropout_train", net_with_dropout(true)),
        ("complex_net", complex_net()),
        ("transformer_block", transformer_block()),
        ("pointwise_chain", pointwise_chain()),
        ("mean_sub_prologue", mean_sub_prologue()),
    ]
}

/// Deterministic pseudo-random data for every graph input (running_var
/// positive, integer buffers zero); `seed` varies it.
pub fn random_binding(g: &Graph, seed: u64) -> impl Fn(&InputKind) -> Option<Vec<f64>> {
    let mut types = std::collections::HashMap::new();
    for &i in g.inputs() {
        if let Op::Input { kind, ty } = &g.node(i).op {
            types.insert(kind.clone(), ty.clone());
        }
    }
    move |k: &InputKind| {
        let ty = types.get(k)?;
        let name = format!("{k:?}");
        let mut h: u64 = seed ^ 0x9E37_79B9_7F4A_7C15;
        for byte in name.bytes() {
            h = (h ^ byte as u64).wrapping_mul(0x100_0000_01B3);
        }
        let mut next = || {
            h ^= h << 13;
            h ^= h >> 7;
            h ^= h << 17;
            (h >> 11) as f64 / (1u64 << 53) as f64
        };
        let data = (0..ty.numel())
            .map(|_| {
                let u = next();
                if !ty.dtype.is_float() {
                    0.0
                } else if name.contains("running_var") {
                    0.5 + u
                } else {
                    let v = 2.0 * u - 1.0;
                    if ty.dtype == DType::F32 {
                        v as f32 as f64
                    } else {
                        v
                    }
                }
            })
            .collect();
        Some(data)
    }
}

pub fn assert_close(a: &[f64], b: &[f64], rtol: f64) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let tol = rtol * (1.0 + x.abs().max(y.abs()));
        let both_nan = x.is_nan() && y.is_nan();
        assert!(both_nan || (x - y).abs() <= tol, "element {i}: {x} vs {y}");
    }
}
