//! Hand-built graphs (shaped like what the tracer records) and helpers
//! shared by the runtime tests: random weights, bindings from a map, and
//! comparisons.

use kiln_frontend::{DType, Tensor};
use kiln_ir::{
    BinaryOp, Graph, GraphOutput, InputKind, Op, OutputKind, ReduceOp, TensorType, UnaryOp, Value,
};
use kiln_runtime::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::HashMap;

pub const F: DType = DType::F32;

pub fn t(shape: &[usize]) -> TensorType {
    TensorType::new(shape, F)
}

/// f32 uniform in [-1, 1) from its own generator.
pub fn rand_t(shape: &[usize], seed: u64) -> Tensor {
    let mut g = ChaCha8Rng::seed_from_u64(seed);
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n).map(|_| g.gen_range(-1.0f32..1.0)).collect();
    Tensor::from_vec(v, shape).unwrap()
}

/// Random weights for every parameter and buffer input of `g`: running
/// variances in [0.5, 1.5), integer buffers zero.
pub fn weights_for(g: &Graph, seed: u64) -> HashMap<String, Tensor> {
    let mut w = HashMap::new();
    for (i, (kind, ty)) in kiln_runtime::traced::state_inputs(g)
        .into_iter()
        .enumerate()
    {
        let (InputKind::Param(name) | InputKind::Buffer(name)) = kind else {
            unreachable!()
        };
        let s = seed.wrapping_mul(1000).wrapping_add(i as u64);
        let v = if !ty.dtype.is_float() {
            Tensor::zeros(&ty.shape, ty.dtype)
        } else if name.contains("running_var") {
            rand_t(&ty.shape, s).add_scalar(1.0).unwrap()
        } else {
            rand_t(&ty.shape, s).to_dtype(ty.dtype).unwrap()
        };
        w.insert(name, v);
    }
    w
}

/// Random user inputs for `g`.
pub fn inputs_for(g: &Graph, seed: u64) -> Vec<Tensor> {
    let tm_types = {
        let mut v: Vec<(usize, TensorType)> = g
            .inputs()
            .iter()
            .filter_map(|&n| match &g.node(n).op {
                Op::Input {
                    kind: InputKind::User(i),
                    ty,
                } => Some((*i, ty.clone())),
                _ => None,
            })
            .collect();
        v.sort_by_key(|p| p.0);
        v
    };
    tm_types
        .into_iter()
        .map(|(i, ty)| rand_t(&ty.shape, seed * 7919 + i as u64))
        .collect()
}

pub fn binder(w: &HashMap<String, Tensor>) -> impl Fn(&InputKind) -> Result<Tensor> + '_ {
    move |k| match k {
        InputKind::Param(n) | InputKind::Buffer(n) => w
            .get(n)
            .cloned()
            .ok_or_else(|| kiln_runtime::Error::Binding(format!("no weight {n}"))),
        InputKind::User(i) => panic!("user input {i} bound by name"),
    }
}

/// Deep copies of the weights (buffers get updated in place by eager code).
pub fn copy_weights(w: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    w.iter()
        .map(|(k, v)| (k.clone(), v.clone_tensor().unwrap()))
        .collect()
}

pub fn assert_same(a: &Tensor, b: &Tensor, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shape");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    let (x, y) = (a.to_vec_f64(), b.to_vec_f64());
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        assert!(
            p == q || (p.is_nan() && q.is_nan()),
            "{what}: element {i}: {p} vs {q}"
        );
    }
}

pub fn assert_close(a: &Tensor, b: &Tensor, rtol: f64, what: &str) {
    assert_eq!(a.shape(), b.shape(), "{what}: shape");
    assert_eq!(a.dtype(), b.dtype(), "{what}: dtype");
    let (x, y) = (a.to_vec_f64(), b.to_vec_f64());
    for (i, (p, q)) in x.iter().zip(&y).enumerate() {
        let tol = rtol * (1.0 + p.abs().max(q.abs()));
        assert!(
            p == q || (p - q).abs() <= tol || (p.is_nan() && q.is_nan()),
            "{what}: element {i}: {p} vs {q}"
        );
    }
}

// ------------------------------------------------------------ builders

pub fn param(g: &mut Graph, name: &str, shape: &[usize]) -> Value {
    g.add_input(InputKind::Param(name.into()), t(shape), "")
        .unwrap()
}

pub fn buffer(g: &mut Graph, name: &str, ty: TensorType) -> Value {
    g.add_input(InputKind::Buffer(name.into()), ty, "").unwrap()
}

pub fn op(g: &mut Graph, o: Op, args: &[Value], scope: &str) -> Value {
    g.add1(o, args, scope).unwrap()
}

pub fn un(g: &mut Graph, u: UnaryOp, x: Value, scope: &str) -> Value {
    op(g, Op::Unary(u), &[x], scope)
}

pub fn bin(g: &mut Graph, b: BinaryOp, x: Value, y: Value, scope: &str) -> Value {
    op(g, Op::Binary(b), &[x, y], scope)
}

/// F.linear on 2-D input as traced: addmm(b, x, w.t()).
pub fn linear2d(g: &mut Graph, x: Value, prefix: &str, i: usize, o: usize, scope: &str) -> Value {
    let w = param(g, &format!("{prefix}.weight"), &[o, i]);
    let b = param(g, &format!("{prefix}.bias"), &[o]);
    let wt = op(g, Op::Permute { dims: vec![1, 0] }, &[w], scope);
    op(g, Op::Addmm, &[b, x, wt], scope)
}

/// User outputs first, then buffer updates already added.
pub fn finish(g: &mut Graph, ys: &[Value]) {
    let mut outs: Vec<GraphOutput> = ys
        .iter()
        .map(|&y| GraphOutput {
            value: y,
            kind: OutputKind::User,
        })
        .collect();
    outs.extend(g.outputs().iter().cloned());
    g.set_outputs(outs).unwrap();
}

/// fc1(20->30) -> relu -> fc2(30->5) on x [8, 20].
pub fn mlp() -> Graph {
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), t(&[8, 20]), "").unwrap();
    let h = linear2d(&mut g, x, "fc1", 20, 30, "Mlp/Linear[fc1]");
    let h = un(&mut g, UnaryOp::Relu, h, "Mlp/ReLU[act]");
    let y = linear2d(&mut g, h, "fc2", 30, 5, "Mlp/Linear[fc2]");
    finish(&mut g, &[y]);
    g
}

pub fn mlp_eager(x: &Tensor, w: &HashMap<String, Tensor>) -> Tensor {
    let h = Tensor::addmm(&w["fc1.bias"], x, &w["fc1.weight"].t().unwrap()).unwrap();
    let h = h.relu().unwrap();
    Tensor::addmm(&w["fc2.bias"], &h, &w["fc2.weight"].t().unwrap()).unwrap()
}

pub const BN_MOMENTUM: f64 = 0.1;
pub const BN_EPS: f64 = 1e-5;

/// conv(3->4, k3, pad 1) -> max_pool 2x2 -> relu -> BatchNorm2d(4) on
/// x [2, 3, 8, 8]; in training the running stats and num_batches_tracked
/// are buffer updates.
pub fn cnn(training: bool) -> Graph {
    let mut g = Graph::new();
    let x = g
        .add_input(InputKind::User(0), t(&[2, 3, 8, 8]), "")
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
        "Cnn/Conv2d[conv]",
    );
    let y = op(
        &mut g,
        Op::MaxPool2d {
            kernel: [2, 2],
            stride: [2, 2],
            padding: [0, 0],
            dilation: [1, 1],
            ceil_mode: false,
        },
        &[y],
        "Cnn/MaxPool2d[pool]",
    );
    let y = un(&mut g, UnaryOp::Relu, y, "Cnn/ReLU[act]");
    let s = "Cnn/BatchNorm2d[bn]";
    let bw = param(&mut g, "bn.weight", &[4]);
    let bb = param(&mut g, "bn.bias", &[4]);
    let rm = buffer(&mut g, "bn.running_mean", t(&[4]));
    let rv = buffer(&mut g, "bn.running_var", t(&[4]));
    let nbt = buffer(
        &mut g,
        "bn.num_batches_tracked",
        TensorType::new(&[], DType::I64),
    );
    let outs = g
        .add_node(
            Op::BatchNorm {
                training,
                momentum: BN_MOMENTUM,
                eps: BN_EPS,
                has_weight: true,
                has_bias: true,
                has_running_stats: true,
            },
            &[y, bw, bb, rm, rv],
            s,
        )
        .unwrap();
    if training {
        let n1 = un(&mut g, UnaryOp::AddScalar(1.0), nbt, s);
        for (v, name) in [
            (n1, "num_batches_tracked"),
            (outs[1], "running_mean"),
            (outs[2], "running_var"),
        ] {
            g.add_output(v, OutputKind::BufferUpdate(format!("bn.{name}")))
                .unwrap();
        }
    }
    finish(&mut g, &[outs[0]]);
    g
}

/// The eager computation of `cnn`; in training it updates the running
/// stats in `w` in place (and num_batches_tracked).
pub fn cnn_eager(x: &Tensor, w: &HashMap<String, Tensor>, training: bool) -> Tensor {
    use kiln_cpu::conv::Conv2dParams;
    use kiln_frontend::ops::{conv, nn};
    let p = Conv2dParams {
        stride: (1, 1),
        padding: (1, 1),
        dilation: (1, 1),
        groups: 1,
    };
    let y = conv::conv2d(x, &w["conv.weight"], Some(&w["conv.bias"]), p).unwrap();
    let y = nn::max_pool2d(&y, (2, 2), None, (0, 0), (1, 1), false).unwrap();
    let y = y.relu().unwrap();
    if training {
        let n = &w["bn.num_batches_tracked"];
        kiln_frontend::no_grad(|| n.copy_(&n.add_scalar(1.0).unwrap()).map(|_| ())).unwrap();
    }
    nn::batch_norm(
        &y,
        Some(&w["bn.running_mean"]),
        Some(&w["bn.running_var"]),
        Some(&w["bn.weight"]),
        Some(&w["bn.bias"]),
        training,
        BN_MOMENTUM,
        BN_EPS,
    )
    .unwrap()
}

/// layer_norm -> 3-D linear (matmul + bias) -> gelu -> self-attention-like
/// scores (matmul with its own transpose, scale, softmax) -> matmul with
/// the normalized input -> residual add, on x [2, 4, 8].
pub fn block() -> Graph {
    let mut g = Graph::new();
    let s = "Block";
    let x = g.add_input(InputKind::User(0), t(&[2, 4, 8]), "").unwrap();
    let lw = param(&mut g, "ln.weight", &[8]);
    let lb = param(&mut g, "ln.bias", &[8]);
    let y = op(
        &mut g,
        Op::LayerNorm {
            normalized_shape: vec![8],
            eps: 1e-5,
            has_weight: true,
            has_bias: true,
        },
        &[x, lw, lb],
        "Block/LayerNorm[ln]",
    );
    let w = param(&mut g, "fc.weight", &[8, 8]);
    let b = param(&mut g, "fc.bias", &[8]);
    let wt = op(
        &mut g,
        Op::Permute { dims: vec![1, 0] },
        &[w],
        "Block/Linear[fc]",
    );
    let h = op(&mut g, Op::MatMul, &[y, wt], "Block/Linear[fc]");
    let h = bin(&mut g, BinaryOp::Add, h, b, "Block/Linear[fc]");
    let h = un(&mut g, UnaryOp::GeluErf, h, "Block/GELU[act]");
    let ht = op(
        &mut g,
        Op::Permute {
            dims: vec![0, 2, 1],
        },
        &[h],
        s,
    );
    let sc = op(&mut g, Op::MatMul, &[h, ht], s);
    let sc = un(&mut g, UnaryOp::MulScalar(0.35), sc, s);
    let p = op(&mut g, Op::Softmax { dim: 2 }, &[sc], s);
    let o = op(&mut g, Op::MatMul, &[p, y], s);
    let out = bin(&mut g, BinaryOp::Add, x, o, s);
    finish(&mut g, &[out]);
    g
}

pub fn block_eager(x: &Tensor, w: &HashMap<String, Tensor>) -> Tensor {
    use kiln_frontend::ops::nn;
    let y = nn::layer_norm(x, &[8], Some(&w["ln.weight"]), Some(&w["ln.bias"]), 1e-5).unwrap();
    let h = y
        .matmul(&w["fc.weight"].t().unwrap())
        .unwrap()
        .add(&w["fc.bias"])
        .unwrap()
        .gelu()
        .unwrap();
    let sc = h
        .matmul(&h.permute(&[0, 2, 1]).unwrap())
        .unwrap()
        .mul_scalar(0.35)
        .unwrap();
    let p = sc.softmax(2).unwrap();
    x.add(&p.matmul(&y).unwrap()).unwrap()
}

/// Everything else the evaluator also knows: pooling, views (reshape,
/// slice, select, expand, permute), cat/stack, index_select, where,
/// comparisons, casts, reductions (sum/mean/max/min/prod, var, argmax,
/// max/min with indices), log_softmax, scalar ops, a 0-dim f64 constant
/// added to an f32 tensor (stays f32, as `torch.result_type`).
/// Several user outputs of several dtypes.
pub fn misc() -> Graph {
    let mut g = Graph::new();
    let s = "Misc";
    let x = g
        .add_input(InputKind::User(0), t(&[2, 3, 4, 4]), "")
        .unwrap();
    let v = param(&mut g, "v", &[3]);
    let a = op(
        &mut g,
        Op::AvgPool2d {
            kernel: [3, 3],
            stride: [1, 1],
            padding: [1, 1],
            ceil_mode: false,
            count_include_pad: false,
            divisor_override: None,
        },
        &[x],
        s,
    );
    let v4 = op(
        &mut g,
        Op::Reshape {
            shape: vec![1, 3, 1, 1],
        },
        &[v],
        s,
    );
    let ve = op(
        &mut g,
        Op::Expand {
            shape: vec![2, 3, 4, 4],
        },
        &[v4],
        s,
    );
    let gt = bin(&mut g, BinaryOp::Gt, a, ve, s);
    let w = op(&mut g, Op::Where, &[gt, a, ve], s);
    let sl = op(
        &mut g,
        Op::Slice {
            dim: 3,
            start: 1,
            end: 4,
            step: 2,
        },
        &[w],
        s,
    ); // [2,3,4,2]
    let sel = op(&mut g, Op::Select { dim: 2, index: 1 }, &[sl], s); // [2,3,2]
    let cat = op(&mut g, Op::Cat { dim: 2 }, &[sel, sel], s); // [2,3,4]
    let st = op(&mut g, Op::Stack { dim: 0 }, &[cat, cat], s); // [2,2,3,4]
    let sum = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Sum,
            dims: vec![0, 3],
            keepdim: false,
        },
        &[st],
        s,
    ); // [2,3]
    let mean = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Mean,
            dims: vec![1],
            keepdim: true,
        },
        &[sum],
        s,
    ); // [2,1]
    let c0 = g
        .add_constant(TensorType::new(&[], DType::F64), vec![0.5], s)
        .unwrap();
    let m2 = bin(&mut g, BinaryOp::Add, mean, c0, s); // f32[2,1]
    let mx = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Max,
            dims: vec![2, 3],
            keepdim: false,
        },
        &[x],
        s,
    ); // [2,3]
    let mn = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Min,
            dims: vec![0],
            keepdim: true,
        },
        &[mx],
        s,
    ); // [1,3]
    let pr = op(
        &mut g,
        Op::Reduce {
            op: ReduceOp::Prod,
            dims: vec![1, 3],
            keepdim: false,
        },
        &[x],
        s,
    ); // [2,4]
    let var = op(
        &mut g,
        Op::Var {
            dims: vec![2, 3],
            correction: 1.0,
            keepdim: false,
        },
        &[x],
        s,
    ); // [2,3]
    let am = op(
        &mut g,
        Op::ArgMax {
            dim: 1,
            keepdim: false,
        },
        &[var],
        s,
    ); // i64[2]
    let md = g
        .add_node(
            Op::MinDim {
                dim: 1,
                keepdim: true,
            },
            &[pr],
            s,
        )
        .unwrap(); // [2,1], i64[2,1]
    let idx = g
        .add_constant(TensorType::new(&[3], DType::I64), vec![2.0, 0.0, 2.0], s)
        .unwrap();
    let is = op(&mut g, Op::IndexSelect { dim: 1 }, &[mx, idx], s); // [2,3]
    let ls = op(&mut g, Op::LogSoftmax { dim: 1 }, &[is], s);
    let d = op(&mut g, Op::Cast(DType::F64), &[ls], s);
    let d = un(&mut g, UnaryOp::RPowScalar(2.0), d, s);
    let d = un(&mut g, UnaryOp::Clamp(Some(0.1), Some(0.9)), d, s);
    let d = un(&mut g, UnaryOp::LeakyRelu(0.2), d, s);
    let e = un(&mut g, UnaryOp::AddScalar(-0.5), is, s);
    let e = un(&mut g, UnaryOp::Step, e, s);
    let e = un(&mut g, UnaryOp::RDivScalar(3.0), e, s); // 3/0 = inf where step is 0
    let f = un(&mut g, UnaryOp::Abs, mn, s);
    let f = un(&mut g, UnaryOp::PowScalar(1.5), f, s);
    let f = bin(&mut g, BinaryOp::Maximum, f, m2, s); // [2,3]
    let f = bin(&mut g, BinaryOp::Div, f, is, s);
    finish(&mut g, &[d, e, f, am, md[0], md[1]]);
    g
}
