//! Tests of the JIT pointwise kernels against kiln-ir's f64 reference
//! evaluator (`eval_graph`, which rounds each op's result to f32).
//!
//! Tolerances: `|jit - ref| <= (u + 0.5) * EPS * |ref| + a + g * max(1, |x|)`
//! where `(u, a, g)` is the op's documented bound (see `codegen.rs`; the
//! extra half ulp is the reference's own rounding to f32). Exactly rounded
//! ops (add, mul, div, sqrt, ...) have `u = 0`: they must match bit for bit.

use super::*;
use kiln_ir::eval::eval_graph;
use kiln_ir::{plan_fusion, BinaryOp, InputKind, Op, OutputKind, TensorType, UnaryOp};
use std::collections::HashMap;

const EPS: f64 = f32::EPSILON as f64;

fn ty(shape: &[usize]) -> TensorType {
    TensorType::new(shape, DType::F32)
}

/// [-20, 20] in `n - specials` steps plus special values; length `n`.
fn grid(n: usize) -> Vec<f32> {
    let specials = [
        0.0f32,
        -0.0,
        1e-6,
        -1e-6,
        1e-30,
        50.0,
        -50.0,
        88.0,
        -87.0,
        0.5,
        -0.5,
        0.625,
        f32::NAN,
    ];
    let m = n.saturating_sub(specials.len()).max(1);
    let mut v: Vec<f32> = (0..m)
        .map(|i| -20.0 + 40.0 * i as f32 / (m.max(2) - 1) as f32)
        .collect();
    v.extend(specials);
    v.truncate(n);
    v
}

/// Compiles the single compute kernel of `g` (must be pointwise).
fn compile_only(g: &Graph) -> Result<PointwiseKernel, CompileError> {
    compile_fma(g, true)
}

fn compile_fma(g: &Graph, fma: bool) -> Result<PointwiseKernel, CompileError> {
    compile_opts(g, fma, true)
}

fn compile_opts(g: &Graph, fma: bool, tiles: bool) -> Result<PointwiseKernel, CompileError> {
    let plan = plan_fusion(g).unwrap();
    assert_eq!(plan.kernels.len(), 1, "{:?}", plan.kernel_ops(g));
    PointwiseKernel::compile_with(g, &plan.kernels[0], fma, tiles)
}

/// Whether this CPU has the tile routines (AVX2+FMA or AVX-512F).
fn host_tiles() -> bool {
    kiln_cpu::fastmath::tile_fn(kiln_cpu::fastmath::FastFn::Exp).is_some()
}

/// Runs the graph's one kernel with the JIT and with the f64 reference.
fn run_both(g: &Graph, data: &HashMap<InputKind, Vec<f32>>) -> (Vec<f32>, Vec<f64>) {
    run_both_fma(g, data, true)
}

fn run_both_fma(g: &Graph, data: &HashMap<InputKind, Vec<f32>>, fma: bool) -> (Vec<f32>, Vec<f64>) {
    run_both_opts(g, data, fma, true)
}

fn run_both_opts(
    g: &Graph,
    data: &HashMap<InputKind, Vec<f32>>,
    fma: bool,
    tiles: bool,
) -> (Vec<f32>, Vec<f64>) {
    let k = compile_opts(g, fma, tiles).unwrap();
    let ins: Vec<&[f32]> = k
        .inputs()
        .iter()
        .map(|d| match &g.node(d.value.node).op {
            Op::Input { kind, .. } => data[kind].as_slice(),
            o => panic!("kernel input from {}", o.name()),
        })
        .collect();
    let n: usize = k.shape().iter().product();
    let mut out = vec![f32::NAN; n];
    k.run(&ins, &mut [&mut out]).unwrap();
    let r = eval_graph(g, &|kind| {
        data.get(kind)
            .map(|v| v.iter().map(|&x| x as f64).collect())
    })
    .unwrap();
    (out, r[0].data.clone())
}

fn check_close(
    what: &str,
    jit: &[f32],
    reference: &[f64],
    x: &dyn Fn(usize) -> f64,
    tol: &dyn Fn(f64, f64) -> f64,
) {
    assert_eq!(jit.len(), reference.len());
    for (i, (&a, &r)) in jit.iter().zip(reference).enumerate() {
        if r.is_nan() {
            assert!(a.is_nan(), "{what}[{i}] (x = {}): {a} vs NaN", x(i));
            continue;
        }
        if r.is_infinite() {
            assert_eq!(a as f64, r, "{what}[{i}] (x = {})", x(i));
            continue;
        }
        let err = (a as f64 - r).abs();
        let t = tol(x(i), r);
        assert!(
            err <= t,
            "{what}[{i}]: x = {}, jit {a} vs ref {r} (err {err:e} > tol {t:e})",
            x(i)
        );
    }
}

/// (u, a, g): see the module comment. Relative terms only hold away from
/// f32 underflow; the grid keeps results normal or zero.
fn bound(u: UnaryOp) -> (f64, f64, f64) {
    use UnaryOp::*;
    match u {
        Exp | Sigmoid | Tanh => (3.0, 0.0, 0.0),
        Erf => (0.0, 2e-7, 0.0),
        GeluErf => (0.0, 0.0, 2e-7),
        GeluTanh => (0.0, 0.0, 3e-7),
        // 1 / sqrt(x): two roundings.
        Rsqrt => (1.5, 0.0, 0.0),
        // The scalar is rounded to f32 first (as PyTorch does for an f32
        // tensor); the reference uses the f64 scalar: one more rounding.
        // A product or quotient: one relative rounding; a sum: half an ulp
        // of |s| absolute.
        LeakyRelu(_) | MulScalar(_) | RDivScalar(_) => (1.0, 0.0, 0.0),
        AddScalar(s) | RSubScalar(s) => (0.5, 0.5 * EPS * s.abs(), 0.0),
        _ => (0.0, 0.0, 0.0),
    }
}

fn tol_of((u, a, g): (f64, f64, f64)) -> impl Fn(f64, f64) -> f64 {
    move |x: f64, r: f64| {
        let xm = if x.is_finite() { x.abs().max(1.0) } else { 1.0 };
        (u + 0.5) * EPS * r.abs() + a + g * xm
    }
}

fn unary_graph(u: UnaryOp, n: usize) -> Graph {
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), ty(&[n]), "").unwrap();
    let y = g.add1(Op::Unary(u), &[x], "t").unwrap();
    g.add_output(y, OutputKind::User).unwrap();
    g
}

const UNARY: [UnaryOp; 25] = [
    UnaryOp::Neg,
    UnaryOp::Abs,
    UnaryOp::Exp,
    UnaryOp::Sqrt,
    UnaryOp::Rsqrt,
    UnaryOp::Tanh,
    UnaryOp::Sigmoid,
    UnaryOp::Relu,
    UnaryOp::LeakyRelu(0.01),
    UnaryOp::GeluErf,
    UnaryOp::GeluTanh,
    UnaryOp::Erf,
    UnaryOp::Clamp(Some(-1.5), Some(2.0)),
    UnaryOp::Clamp(None, Some(0.25)),
    UnaryOp::PowScalar(2.0),
    UnaryOp::PowScalar(0.5),
    UnaryOp::PowScalar(1.0),
    UnaryOp::AddScalar(-0.1),
    UnaryOp::MulScalar(0.5),
    UnaryOp::RSubScalar(3.0),
    UnaryOp::RDivScalar(2.0),
    UnaryOp::Square,
    UnaryOp::Reciprocal,
    UnaryOp::Sign,
    UnaryOp::Step,
];

#[test]
fn every_unary_op_matches_reference_over_wide_range() {
    // 100_003 points (a tail of 3), above par_threshold for the
    // transcendentals (parallel path), below for the cheap ops.
    let n = 100_003;
    let xs = grid(n);
    // Every op inline (f32x4 polynomials) with and without FMA, and with
    // the transcendentals as tile calls.
    let modes = [(true, false), (false, false), (true, true)];
    for (u, (fma, tiles)) in UNARY.iter().flat_map(|&u| modes.map(|m| (u, m))) {
        let g = unary_graph(u, n);
        let data = HashMap::from([(InputKind::User(0), xs.clone())]);
        let (jit, r) = run_both_opts(&g, &data, fma, tiles);
        check_close(
            &format!("{u:?} fma={fma} tiles={tiles}"),
            &jit,
            &r,
            &|i| xs[i] as f64,
            &tol_of(bound(u)),
        );
    }
}

#[test]
fn unary_ops_at_odd_lengths_and_around_the_threshold() {
    for u in [UnaryOp::GeluErf, UnaryOp::Tanh, UnaryOp::Relu, UnaryOp::Exp] {
        let th = compile_only(&unary_graph(u, 8)).unwrap().par_threshold();
        assert!(th > 1000 && th < PAR_WORK, "{u:?}: {th}");
        for n in [1, 2, 3, 4, 5, 7, 9, 63, 1023, th - 1, th, th + 5] {
            let xs: Vec<f32> = (0..n)
                .map(|i| ((i * 37) % 101) as f32 * 0.3 - 15.0)
                .collect();
            let g = unary_graph(u, n);
            let data = HashMap::from([(InputKind::User(0), xs.clone())]);
            let (jit, r) = run_both(&g, &data);
            check_close(
                &format!("{u:?} n={n}"),
                &jit,
                &r,
                &|i| xs[i] as f64,
                &tol_of(bound(u)),
            );
        }
    }
}

#[test]
fn parallel_threshold_follows_cost() {
    let relu = compile_only(&unary_graph(UnaryOp::Relu, 8)).unwrap();
    let chain = compile_only(&pointwise_chain(2, 4)).unwrap();
    // A light kernel needs far more elements than the transcendental chain.
    assert!(relu.par_threshold() > 100_000, "{}", relu.par_threshold());
    // ~33 cost units per element tiled (3.7 ns measured), ~97 inline.
    let limit = if chain.tiled() { 40_000 } else { 20_000 };
    assert!(chain.par_threshold() < limit, "{}", chain.par_threshold());
}

#[test]
fn transcendental_special_values() {
    let xs = vec![f32::INFINITY, f32::NEG_INFINITY, 100.0, -200.0, f32::NAN];
    let run = |u: UnaryOp| {
        let g = unary_graph(u, xs.len());
        let k = compile_only(&g).unwrap();
        let mut out = vec![0.0; xs.len()];
        k.run(&[&xs], &mut [&mut out]).unwrap();
        out
    };
    let e = run(UnaryOp::Exp);
    assert_eq!(&e[..4], &[f32::INFINITY, 0.0, f32::INFINITY, 0.0]);
    assert!(e[4].is_nan());
    let t = run(UnaryOp::Tanh);
    assert_eq!(&t[..4], &[1.0, -1.0, 1.0, -1.0]);
    assert!(t[4].is_nan());
    let s = run(UnaryOp::Sigmoid);
    assert_eq!(&s[..4], &[1.0, 0.0, 1.0, 0.0]);
    let r = run(UnaryOp::Erf);
    assert_eq!(&r[..4], &[1.0, -1.0, 1.0, -1.0]);
    assert!(r[4].is_nan());
}

fn binary_graph(b: BinaryOp, sx: &[usize], sy: &[usize], out_shape: &[usize]) -> Graph {
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), ty(sx), "").unwrap();
    let y = g.add_input(InputKind::User(1), ty(sy), "").unwrap();
    let z = g.add1(Op::Binary(b), &[x, y], "t").unwrap();
    assert_eq!(g.value_type(z).shape, out_shape);
    g.add_output(z, OutputKind::User).unwrap();
    g
}

fn vals(n: usize, seed: usize) -> Vec<f32> {
    (0..n)
        .map(|i| ((i * 7919 + seed * 104_729) % 2003) as f32 * 0.02 - 20.0)
        .collect()
}

#[test]
fn binary_ops_are_exact() {
    for n in [5, 4099, 500_007] {
        for b in [
            BinaryOp::Add,
            BinaryOp::Sub,
            BinaryOp::Mul,
            BinaryOp::Div,
            BinaryOp::Maximum,
            BinaryOp::Minimum,
        ] {
            let g = binary_graph(b, &[n], &[n], &[n]);
            let mut y = vals(n, 2);
            y[0] = f32::NAN;
            let data = HashMap::from([(InputKind::User(0), vals(n, 1)), (InputKind::User(1), y)]);
            let (jit, r) = run_both(&g, &data);
            check_close(
                &format!("{b:?}"),
                &jit,
                &r,
                &|_| 0.0,
                &tol_of((0.0, 0.0, 0.0)),
            );
        }
    }
}

#[test]
fn broadcast_operands() {
    // (x shape, y shape, out shape): trailing vectors with C % 4 != 0 and
    // == 0, per-channel with H*W % 4 != 0 and == 0, a middle block, 0-d
    // and all-ones scalars, and a broadcast first operand.
    let cases: Vec<(Vec<usize>, Vec<usize>, Vec<usize>)> = vec![
        (vec![7, 5], vec![5], vec![7, 5]),
        (vec![9, 8], vec![8], vec![9, 8]),
        (vec![3, 6, 2, 3], vec![1, 6, 1, 1], vec![3, 6, 2, 3]),
        (vec![2, 3, 2, 2], vec![3, 1, 1], vec![2, 3, 2, 2]),
        (vec![2, 3, 4, 5], vec![3, 4, 1], vec![2, 3, 4, 5]),
        (vec![129, 257], vec![], vec![129, 257]),
        (vec![3, 5], vec![1, 1], vec![3, 5]),
        (vec![300, 128], vec![128], vec![300, 128]),
        (vec![33], vec![40, 33], vec![40, 33]),
        // inner 3 and [3] over [6, 3] (per-lane gather), a trailing [33]
        // (wrapping lanes), inner 169 (two-channel select, parallel path).
        (vec![5, 7, 3], vec![7, 1], vec![5, 7, 3]),
        (vec![6, 3], vec![3], vec![6, 3]),
        (vec![1000, 33], vec![33], vec![1000, 33]),
        (vec![128, 16, 13, 13], vec![16, 1, 1], vec![128, 16, 13, 13]),
    ];
    for (sx, sy, so) in cases {
        for b in [BinaryOp::Mul, BinaryOp::Sub] {
            let g = binary_graph(b, &sx, &sy, &so);
            let nx = sx.iter().product();
            let ny = sy.iter().product();
            let data = HashMap::from([
                (InputKind::User(0), vals(nx, 3)),
                (InputKind::User(1), vals(ny, 4)),
            ]);
            let (jit, r) = run_both(&g, &data);
            check_close(
                &format!("{b:?} {sx:?} {sy:?}"),
                &jit,
                &r,
                &|_| 0.0,
                &tol_of((0.0, 0.0, 0.0)),
            );
        }
    }
}

#[test]
fn input_access_modes_are_reported() {
    let g = binary_graph(BinaryOp::Add, &[2, 3, 4, 5], &[3, 1, 1], &[2, 3, 4, 5]);
    let k = compile_only(&g).unwrap();
    assert_eq!(k.inputs()[0].access, InputAccess::Contiguous);
    assert_eq!(
        k.inputs()[1].access,
        InputAccess::Broadcast { inner: 20, size: 3 }
    );
    assert_eq!(k.inputs()[1].numel, 3);
    let g = binary_graph(BinaryOp::Add, &[4, 5], &[], &[4, 5]);
    assert_eq!(
        compile_only(&g).unwrap().inputs()[1].access,
        InputAccess::Scalar
    );
    // Not a block of consecutive dims: [2,1,5] over [2,3,5].
    let g = binary_graph(BinaryOp::Add, &[2, 3, 5], &[2, 1, 5], &[2, 3, 5]);
    let e = compile_only(&g).unwrap_err();
    assert!(
        e.to_string()
            .starts_with("cranelift backend: input of shape [2, 1, 5]"),
        "{e}"
    );
}

#[test]
fn comparisons_where_and_casts() {
    for cmp in [
        BinaryOp::Eq,
        BinaryOp::Ne,
        BinaryOp::Lt,
        BinaryOp::Le,
        BinaryOp::Gt,
        BinaryOp::Ge,
    ] {
        let n = 1001;
        let mut g = Graph::new();
        let x = g.add_input(InputKind::User(0), ty(&[n]), "").unwrap();
        let y = g.add_input(InputKind::User(1), ty(&[n]), "").unwrap();
        // The kernel's root is x + 0 (a node over graph inputs only starts
        // a kernel of its own, so the rest must hang off one root).
        let x = g
            .add1(Op::Unary(UnaryOp::AddScalar(0.0)), &[x], "t")
            .unwrap();
        let c = g.add1(Op::Binary(cmp), &[x, y], "t").unwrap();
        let x2 = g
            .add1(Op::Unary(UnaryOp::MulScalar(2.0)), &[x], "t")
            .unwrap();
        let w = g.add1(Op::Where, &[c, x2, y], "t").unwrap();
        let cf = g.add1(Op::Cast(DType::F32), &[c], "t").unwrap();
        let z = g.add1(Op::Binary(BinaryOp::Add), &[w, cf], "t").unwrap();
        g.add_output(z, OutputKind::User).unwrap();
        // Many equal pairs so eq/le/ge see both outcomes.
        let xs: Vec<f32> = (0..n).map(|i| (i % 7) as f32 - 3.0).collect();
        let mut ys: Vec<f32> = (0..n).map(|i| (i % 5) as f32 - 2.0).collect();
        ys[3] = f32::NAN;
        let data = HashMap::from([(InputKind::User(0), xs), (InputKind::User(1), ys)]);
        let (jit, r) = run_both(&g, &data);
        check_close(
            &format!("{cmp:?}"),
            &jit,
            &r,
            &|_| 0.0,
            &tol_of((0.0, 0.0, 0.0)),
        );
    }
}

use kiln_ir::sample_graphs::pointwise_chain;

#[test]
fn pointwise_chain_matches_reference() {
    for (rows, cols, fma, tiles) in [
        (3, 5, true, true),
        (4, 16, true, true),
        (17, 33, true, true),
        (17, 33, true, false),
        (256, 1000, true, true),
        (256, 1000, true, false),
        (256, 1000, false, false),
    ] {
        let g = pointwise_chain(rows, cols);
        let n = rows * cols;
        let xs = grid(n);
        let scale: Vec<f32> = (0..cols).map(|c| 0.5 + (c % 7) as f32 * 0.25).collect();
        let shift: Vec<f32> = (0..cols).map(|c| (c % 5) as f32 * 0.3 - 0.6).collect();
        let data = HashMap::from([
            (InputKind::User(0), xs.clone()),
            (InputKind::Param("scale".into()), scale.clone()),
            (InputKind::Buffer("shift".into()), shift.clone()),
        ]);
        let (jit, r) = run_both_opts(&g, &data, fma, tiles);
        // Per-op bounds summed along the chain, each stage's derivative is
        // at most ~1.5 in magnitude (gelu*sigmoid + tanh/2, exp(-|y|) +
        // relu/2, y/sqrt(y^2+1)): gelu's 2e-7*max(1,|y1|) plus ~a dozen
        // 3.5-ulp terms of values <= max(1, |y1|) -> 3e-6 * max(1, |y1|).
        let y1 = |i: usize| xs[i] as f64 * scale[i % cols] as f64 + shift[i % cols] as f64;
        check_close(
            &format!("chain {rows}x{cols} fma={fma} tiles={tiles}"),
            &jit,
            &r,
            &y1,
            &|y1: f64, _| {
                3e-6 * if y1.is_finite() {
                    y1.abs().max(1.0)
                } else {
                    1.0
                }
            },
        );
    }
}

/// A kernel whose tiled form has every kind of step boundary: a call on a
/// kernel input, a mask computed before a call and used after it, a call
/// result that is both an output and read later, an input read again after
/// the calls, and (run in place) an output over that input's memory.
#[test]
fn tiled_kernel_boundaries_and_in_place() {
    let (rows, cols) = (13, 67); // 871 elements: 3 tiles and a tail of 103
    let n = rows * cols;
    let mut g = Graph::new();
    let x = g
        .add_input(InputKind::User(0), ty(&[rows, cols]), "")
        .unwrap();
    let b = g.add_input(InputKind::User(1), ty(&[cols]), "").unwrap();
    let e0 = g.add1(Op::Unary(UnaryOp::Exp), &[x], "t").unwrap();
    let y = g.add1(Op::Binary(BinaryOp::Mul), &[e0, b], "t").unwrap();
    let m = g.add1(Op::Binary(BinaryOp::Gt), &[y, x], "t").unwrap();
    let t = g.add1(Op::Unary(UnaryOp::Tanh), &[y], "t").unwrap();
    let w = g.add1(Op::Where, &[m, t, y], "t").unwrap();
    let s = g.add1(Op::Unary(UnaryOp::Sigmoid), &[w], "t").unwrap();
    let z = g.add1(Op::Binary(BinaryOp::Sub), &[s, x], "t").unwrap();
    g.add_output(s, OutputKind::User).unwrap();
    g.add_output(z, OutputKind::User).unwrap();
    let plan = plan_fusion(&g).unwrap();
    assert_eq!(plan.kernels.len(), 1, "{:?}", plan.kernel_ops(&g));
    let xs: Vec<f32> = (0..n)
        .map(|i| ((i * 37) % 211) as f32 * 0.05 - 5.0)
        .collect();
    let bs: Vec<f32> = (0..cols).map(|c| (c % 9) as f32 * 0.25 - 1.0).collect();
    let r = eval_graph(&g, &|kind| match kind {
        InputKind::User(0) => Some(xs.iter().map(|&v| v as f64).collect()),
        InputKind::User(1) => Some(bs.iter().map(|&v| v as f64).collect()),
        _ => None,
    })
    .unwrap();
    for tiles in [true, false] {
        let k = PointwiseKernel::compile_with(&g, &plan.kernels[0], true, tiles).unwrap();
        assert_eq!(k.tiled(), tiles && host_tiles());
        let by_value = |v: Value| g.outputs().iter().position(|o| o.value == v).unwrap();
        let jx = k.inputs().iter().position(|d| d.value == x).unwrap();
        let jb = 1 - jx;
        for in_place in [false, true] {
            let mut xbuf = xs.clone();
            let mut other = vec![f32::NAN; n];
            // Output slot 1 (z) over x's memory when in place.
            let zslot = k.outputs().iter().position(|&v| v == z).unwrap();
            let sslot = 1 - zslot;
            let mut ins = [std::ptr::null::<f32>(); 2];
            ins[jx] = xbuf.as_ptr();
            ins[jb] = bs.as_ptr();
            let mut zbuf = vec![f32::NAN; n];
            let mut outs = [std::ptr::null_mut::<f32>(); 2];
            outs[sslot] = other.as_mut_ptr();
            outs[zslot] = if in_place {
                xbuf.as_mut_ptr()
            } else {
                zbuf.as_mut_ptr()
            };
            for threshold in [usize::MAX, 1] {
                if threshold == 1 && in_place {
                    continue;
                }
                // SAFETY: every pointer covers its operand; z may be x
                // (a Contiguous input), which run_ptrs allows.
                unsafe { k.run_ptrs(&ins, &outs, threshold) };
                let zout = if in_place { &xbuf } else { &zbuf };
                for (slot, out) in [(sslot, &other), (zslot, zout)] {
                    let gi = by_value(k.outputs()[slot]);
                    check_close(
                        &format!("tiles={tiles} in_place={in_place} output {slot}"),
                        out,
                        &r[gi].data,
                        &|i| xs[i] as f64,
                        &tol_of((8.0, 1e-6, 0.0)),
                    );
                }
            }
        }
    }
}

#[test]
fn unsupported_ops_name_themselves() {
    let g = unary_graph(UnaryOp::Log, 8);
    let e = compile_only(&g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cranelift backend: op log on f32 not supported"
    );
    assert_eq!(e.op, "log");
    let g = unary_graph(UnaryOp::PowScalar(3.0), 8);
    let e = compile_only(&g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cranelift backend: op pow_scalar with exponent 3 on f32 not supported"
    );
    let mut g = Graph::new();
    let x = g
        .add_input(InputKind::User(0), TensorType::new(&[8], DType::BF16), "")
        .unwrap();
    let y = g.add1(Op::Unary(UnaryOp::Erf), &[x], "t").unwrap();
    g.add_output(y, OutputKind::User).unwrap();
    let e = compile_only(&g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cranelift backend: op erf on bf16 not supported"
    );
    let g = binary_graph(BinaryOp::Pow, &[4], &[4], &[4]);
    let e = compile_only(&g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cranelift backend: op pow on f32 not supported"
    );
}

#[test]
fn run_checks_lengths() {
    let g = unary_graph(UnaryOp::Relu, 8);
    let k = compile_only(&g).unwrap();
    let x = vec![0.0f32; 7];
    let mut o = vec![0.0f32; 8];
    let e = k.run(&[&x], &mut [&mut o]).unwrap_err();
    assert!(
        e.to_string().contains("input 0 has 7 elements, expected 8"),
        "{e}"
    );
    let x = vec![0.0f32; 8];
    let mut o = vec![0.0f32; 9];
    assert!(k.run(&[&x], &mut [&mut o]).is_err());
    assert!(k.run(&[], &mut [&mut o]).is_err());
}

#[test]
fn two_outputs_and_bool_casts() {
    // y = relu(x - 0.5) is a graph output and feeds z = cast(cast(y, bool), f32) * x.
    let n = 1003;
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), ty(&[n]), "").unwrap();
    let y = g
        .add1(Op::Unary(UnaryOp::AddScalar(-0.5)), &[x], "t")
        .unwrap();
    let y = g.add1(Op::Unary(UnaryOp::Relu), &[y], "t").unwrap();
    let b = g.add1(Op::Cast(DType::Bool), &[y], "t").unwrap();
    let f = g.add1(Op::Cast(DType::F32), &[b], "t").unwrap();
    let z = g.add1(Op::Binary(BinaryOp::Mul), &[f, x], "t").unwrap();
    g.add_output(z, OutputKind::User).unwrap();
    g.add_output(y, OutputKind::User).unwrap();
    let plan = plan_fusion(&g).unwrap();
    assert_eq!(plan.kernels.len(), 1);
    let k = PointwiseKernel::compile(&g, &plan.kernels[0]).unwrap();
    assert_eq!(k.outputs().len(), 2);
    let xs = grid(n);
    let mut o0 = vec![0.0f32; n];
    let mut o1 = vec![0.0f32; n];
    k.run(&[&xs], &mut [&mut o0, &mut o1]).unwrap();
    let r = eval_graph(&g, &|_| Some(xs.iter().map(|&v| v as f64).collect())).unwrap();
    // Kernel outputs are in node order: y first, then z.
    let by_value = |v: Value| g.outputs().iter().position(|o| o.value == v).unwrap();
    for (slot, out) in [(0, &o0), (1, &o1)] {
        let gi = by_value(k.outputs()[slot]);
        check_close(
            &format!("output {slot}"),
            out,
            &r[gi].data,
            &|i| xs[i] as f64,
            &tol_of((0.5, 0.25 * EPS, 0.0)),
        );
    }
}

#[test]
fn non_pointwise_kernel_is_refused() {
    let mut g = Graph::new();
    let x = g.add_input(InputKind::User(0), ty(&[4, 8]), "").unwrap();
    let y = g
        .add1(
            Op::Reduce {
                op: kiln_ir::ReduceOp::Sum,
                dims: vec![1],
                keepdim: false,
            },
            &[x],
            "t",
        )
        .unwrap();
    g.add_output(y, OutputKind::User).unwrap();
    let e = compile_only(&g).unwrap_err();
    assert_eq!(
        e.to_string(),
        "cranelift backend: reduction kernels are not supported (pointwise only)"
    );
}

#[test]
fn empty_index_space() {
    let g = binary_graph(BinaryOp::Add, &[0, 3], &[3], &[0, 3]);
    let k = compile_only(&g).unwrap();
    let y = [1.0f32, 2.0, 3.0];
    let mut out: Vec<f32> = vec![];
    k.run(&[&[], &y], &mut [&mut out]).unwrap();
    let g = binary_graph(BinaryOp::Add, &[3, 0], &[0], &[3, 0]);
    let k = compile_only(&g).unwrap();
    k.run(&[&[], &[]], &mut [&mut out]).unwrap();
}

#[test]
fn kernels_are_send_and_sync() {
    fn check<T: Send + Sync>(_: &T) {}
    let k = compile_only(&unary_graph(UnaryOp::Relu, 8)).unwrap();
    check(&k);
    // Run from another thread while this one holds it too.
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut o = [0.0f32; 8];
            k.run(&[&[-1.0; 8]], &mut [&mut o]).unwrap();
            assert_eq!(o, [0.0; 8]);
        });
    });
}

#[test]
fn vector_loop_and_scalar_tail_agree_bitwise() {
    // Length 7: lanes 0..4 go through the f32x4 loop, 4..7 through the
    // scalar tail; the tail repeats the first three inputs.
    let base = [-3.7f32, 0.3, 2.9];
    let xs: Vec<f32> = [base[0], base[1], base[2], 1.5, base[0], base[1], base[2]].to_vec();
    for u in UNARY {
        for fma in [true, false] {
            let k = compile_fma(&unary_graph(u, 7), fma).unwrap();
            let mut o = vec![0.0f32; 7];
            k.run(&[&xs], &mut [&mut o]).unwrap();
            for j in 0..3 {
                assert_eq!(
                    o[j].to_bits(),
                    o[4 + j].to_bits(),
                    "{u:?} fma={fma} x={}",
                    xs[j]
                );
            }
        }
    }
}
