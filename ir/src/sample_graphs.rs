//! Reference graphs built by hand, for tests and benchmarks in every crate
//! that works on graphs (one definition instead of one per crate).

use crate::{BinaryOp, DType, Graph, InputKind, Op, OutputKind, TensorType, UnaryOp};

/// The zoo's PointwiseChain (python/zoo.py) on f32 `[rows, cols]` with a
/// per-column parameter `scale` and buffer `shift`:
/// y = x*scale + shift; y = gelu(y)*sigmoid(y) + tanh(0.5*y);
/// y = exp(-|y|) + relu(y-0.1)*0.5; out = sqrt(y*y+1) - 1.
pub fn pointwise_chain(rows: usize, cols: usize) -> Graph {
    let t = |s: &[usize]| TensorType::new(s, DType::F32);
    let mut g = Graph::new();
    let x = g
        .add_input(InputKind::User(0), t(&[rows, cols]), "")
        .unwrap();
    let scale = g
        .add_input(InputKind::Param("scale".into()), t(&[cols]), "")
        .unwrap();
    let shift = g
        .add_input(InputKind::Buffer("shift".into()), t(&[cols]), "")
        .unwrap();
    let s = "PointwiseChain";
    let bin = |g: &mut Graph, b, x, y| g.add1(Op::Binary(b), &[x, y], s).unwrap();
    let un = |g: &mut Graph, u, x| g.add1(Op::Unary(u), &[x], s).unwrap();
    let y = bin(&mut g, BinaryOp::Mul, x, scale);
    let y = bin(&mut g, BinaryOp::Add, y, shift);
    let a = un(&mut g, UnaryOp::GeluErf, y);
    let b = un(&mut g, UnaryOp::Sigmoid, y);
    let ab = bin(&mut g, BinaryOp::Mul, a, b);
    let hy = un(&mut g, UnaryOp::MulScalar(0.5), y);
    let th = un(&mut g, UnaryOp::Tanh, hy);
    let y = bin(&mut g, BinaryOp::Add, ab, th);
    let ay = un(&mut g, UnaryOp::Abs, y);
    let ny = un(&mut g, UnaryOp::Neg, ay);
    let e = un(&mut g, UnaryOp::Exp, ny);
    let d = un(&mut g, UnaryOp::AddScalar(-0.1), y);
    let r = un(&mut g, UnaryOp::Relu, d);
    let r = un(&mut g, UnaryOp::MulScalar(0.5), r);
    let y = bin(&mut g, BinaryOp::Add, e, r);
    let yy = bin(&mut g, BinaryOp::Mul, y, y);
    let p = un(&mut g, UnaryOp::AddScalar(1.0), yy);
    let q = un(&mut g, UnaryOp::Sqrt, p);
    let out = un(&mut g, UnaryOp::AddScalar(-1.0), q);
    g.add_output(out, OutputKind::User).unwrap();
    g
}
