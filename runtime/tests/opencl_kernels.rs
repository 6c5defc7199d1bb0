//! Each OpenCL kernel type (feature `opencl`, PoCL in CI) against the
//! reference interpreter on graphs built directly: pointwise chains with
//! broadcasting and mixed dtypes, GEMM (addmm with a transposed weight,
//! batched matmul with broadcast), conv2d as implicit GEMM (groups, stride,
//! padding, dilation) with fused epilogue, pooling, reductions, views and
//! copies, an op without a device kernel running on the host, and the
//! `float4` pointwise path (vload4/vstore4) against the scalar one.
#![cfg(feature = "opencl")]

use kiln_frontend::Tensor;
use kiln_ir::{
    BinaryOp, DType, Graph, InputKind, Op, OutputKind, ReduceOp, TensorType, UnaryOp, Value,
};
use kiln_runtime::opencl::compile_traced;
use kiln_runtime::TracedModule;
use std::collections::HashMap;

#[derive(Default)]
struct B {
    g: Graph,
    weights: HashMap<String, Tensor>,
    inputs: Vec<Tensor>,
    outs: Vec<Value>,
}

impl B {
    fn input(&mut self, t: Tensor) -> Value {
        let ty = TensorType::new(&t.shape(), t.dtype());
        let v = self
            .g
            .add_input(InputKind::User(self.inputs.len()), ty, "")
            .unwrap();
        self.inputs.push(t);
        v
    }
    fn randn(&mut self, shape: &[usize]) -> Value {
        self.input(Tensor::randn(shape, DType::F32))
    }
    fn param(&mut self, name: &str, t: Tensor) -> Value {
        let ty = TensorType::new(&t.shape(), t.dtype());
        self.weights.insert(name.to_string(), t);
        self.g
            .add_input(InputKind::Param(name.into()), ty, "")
            .unwrap()
    }
    fn op(&mut self, op: Op, args: &[Value]) -> Value {
        self.g.add1(op, args, "").unwrap()
    }
    fn un(&mut self, u: UnaryOp, x: Value) -> Value {
        self.op(Op::Unary(u), &[x])
    }
    fn bin(&mut self, b: BinaryOp, x: Value, y: Value) -> Value {
        self.op(Op::Binary(b), &[x, y])
    }
    fn out(&mut self, v: Value) {
        self.outs.push(v);
    }

    /// Runs the graph on the interpreter and on OpenCL; every output must
    /// agree (relative 1e-4); returns the OpenCL fallbacks.
    fn check(self, what: &str) -> Vec<String> {
        self.check_source(what).0
    }

    /// `check`, also returning the program's OpenCL C source.
    fn check_source(mut self, what: &str) -> (Vec<String>, String) {
        for v in self.outs.clone() {
            self.g.add_output(v, OutputKind::User).unwrap();
        }
        let reference = TracedModule::from_weights(self.g.clone(), self.weights.clone()).unwrap();
        let want = reference.forward(&self.inputs).unwrap();
        let tm = TracedModule::from_weights(self.g, self.weights).unwrap();
        let dev = compile_traced(tm, None).unwrap();
        let got = dev.forward(&self.inputs).unwrap();
        assert_eq!(got.len(), want.len());
        for (k, (a, b)) in got.iter().zip(&want).enumerate() {
            assert_eq!(a.shape(), b.shape(), "{what}: output {k} shape");
            assert_eq!(a.dtype(), b.dtype(), "{what}: output {k} dtype");
            let (a, b) = (a.to_vec::<f64>(), b.to_vec::<f64>());
            let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
            let err = a
                .iter()
                .zip(&b)
                .map(|(x, y)| {
                    if x.is_nan() && y.is_nan() {
                        0.0
                    } else {
                        (x - y).abs()
                    }
                })
                .fold(0.0, f64::max)
                / scale;
            assert!(
                err <= 1e-4 && !err.is_nan(),
                "{what}: output {k} differs ({err:.2e})\n{}",
                dev.source()
            );
        }
        (dev.fallbacks(), dev.source())
    }
}

#[test]
fn pointwise_chains_broadcast_and_dtypes() {
    let mut b = B::default();
    let x = b.randn(&[4, 8, 5]);
    let s = b.param("s", Tensor::randn(&[8, 1], DType::F32));
    let c = b.param("c", Tensor::randn(&[5], DType::F32));
    let t = b.bin(BinaryOp::Mul, x, s);
    let t = b.bin(BinaryOp::Add, t, c);
    let y = b.un(UnaryOp::GeluErf, t);
    let gt = b.bin(BinaryOp::Gt, y, c);
    let th = b.un(UnaryOp::Tanh, y);
    let ny = b.un(UnaryOp::Neg, y);
    let ex = b.un(UnaryOp::Exp, ny);
    let sg = b.un(UnaryOp::Sigmoid, ex);
    let w = b.op(Op::Where, &[gt, th, sg]);
    let e = b.un(UnaryOp::Erf, w);
    let l = b.un(UnaryOp::LeakyRelu(0.1), e);
    let cl = b.un(UnaryOp::Clamp(Some(-0.3), Some(0.7)), l);
    let p = b.un(UnaryOp::PowScalar(3.0), cl);
    let ab = b.un(UnaryOp::Abs, x);
    let ab = b.un(UnaryOp::AddScalar(1.0), ab);
    let r = b.un(UnaryOp::Rsqrt, ab);
    let m = b.bin(BinaryOp::Maximum, p, r);
    let gtf = b.op(Op::Cast(DType::F32), &[gt]);
    let m = b.bin(BinaryOp::Sub, m, gtf);
    let gt2 = b.un(UnaryOp::GeluTanh, m);
    b.out(gt2);
    b.out(gt);
    // i64 arithmetic (num_batches_tracked + 1).
    let n = b.input(Tensor::from_vec(vec![3i64, -2, 7], &[3]).unwrap());
    let n1 = b.un(UnaryOp::AddScalar(1.0), n);
    b.out(n1);
    assert!(b.check("pointwise").is_empty());
}

#[test]
fn gemm_addmm_transposed_weight_and_batched_matmul() {
    let mut b = B::default();
    let x = b.randn(&[37, 50]);
    let w = b.param("w", Tensor::randn(&[70, 50], DType::F32));
    let bias = b.param("bias", Tensor::randn(&[70], DType::F32));
    let wt = b.op(Op::Permute { dims: vec![1, 0] }, &[w]);
    let y = b.op(Op::Addmm, &[bias, x, wt]);
    let y = b.un(UnaryOp::Relu, y);
    b.out(y);
    let a = b.randn(&[2, 3, 17, 33]);
    let m = b.randn(&[33, 9]);
    let z = b.op(Op::MatMul, &[a, m]);
    let z = b.un(UnaryOp::MulScalar(0.5), z);
    b.out(z);
    let q = b.randn(&[3, 17, 33]);
    let k = b.randn(&[3, 9, 33]);
    let kt = b.op(
        Op::Permute {
            dims: vec![0, 2, 1],
        },
        &[k],
    );
    let s = b.op(Op::MatMul, &[q, kt]);
    b.out(s);
    assert!(b.check("gemm").is_empty());
}

#[test]
fn conv_implicit_gemm_with_epilogue_and_pooling() {
    let mut b = B::default();
    let x = b.randn(&[2, 4, 11, 9]);
    let w = b.param("w", Tensor::randn(&[6, 2, 3, 3], DType::F32));
    let bias = b.param("bias", Tensor::randn(&[6], DType::F32));
    let y = b.op(
        Op::Conv2d {
            stride: [2, 1],
            padding: [1, 2],
            dilation: [1, 2],
            groups: 2,
        },
        &[x, w, bias],
    );
    let y = b.un(UnaryOp::Relu, y);
    b.out(y);
    let mp = b.op(
        Op::MaxPool2d {
            kernel: [2, 3],
            stride: [2, 2],
            padding: [1, 1],
            dilation: [1, 1],
            ceil_mode: true,
        },
        &[y],
    );
    let mp = b.un(UnaryOp::Tanh, mp);
    b.out(mp);
    for (cip, div) in [(false, None), (true, None), (true, Some(5))] {
        let ap = b.op(
            Op::AvgPool2d {
                kernel: [3, 3],
                stride: [2, 2],
                padding: [1, 1],
                ceil_mode: false,
                count_include_pad: cip,
                divisor_override: div,
            },
            &[y],
        );
        b.out(ap);
    }
    // 1x1 conv without bias, batch of 3.
    let x2 = b.randn(&[3, 5, 6, 7]);
    let w2 = b.param("w2", Tensor::randn(&[8, 5, 1, 1], DType::F32));
    let y2 = b.op(
        Op::Conv2d {
            stride: [1, 1],
            padding: [0, 0],
            dilation: [1, 1],
            groups: 1,
        },
        &[x2, w2],
    );
    b.out(y2);
    assert!(b.check("conv").is_empty());
}

#[test]
fn work_group_reductions() {
    let mut b = B::default();
    let x = b.randn(&[3, 7, 5]);
    let sm = b.op(Op::Softmax { dim: 1 }, &[x]);
    b.out(sm);
    let ls = b.op(Op::LogSoftmax { dim: 2 }, &[x]);
    b.out(ls);
    for (op, dims, keep) in [
        (ReduceOp::Sum, vec![0, 2], true),
        (ReduceOp::Mean, vec![1], false),
        (ReduceOp::Max, vec![2], false),
        (ReduceOp::Min, vec![0, 1, 2], false),
    ] {
        let r = b.op(
            Op::Reduce {
                op,
                dims,
                keepdim: keep,
            },
            &[x],
        );
        b.out(r);
    }
    let v = b.op(
        Op::Var {
            dims: vec![0],
            correction: 1.0,
            keepdim: false,
        },
        &[x],
    );
    let v = b.un(UnaryOp::Sqrt, v);
    b.out(v);
    let h = b.randn(&[4, 6, 300]);
    let lw = b.param("lw", Tensor::randn(&[300], DType::F32));
    let lb = b.param("lb", Tensor::randn(&[300], DType::F32));
    let ln = b.op(
        Op::LayerNorm {
            normalized_shape: vec![300],
            eps: 1e-5,
            has_weight: true,
            has_bias: true,
        },
        &[h, lw, lb],
    );
    let ln = b.un(UnaryOp::GeluErf, ln);
    b.out(ln);
    // Training batch norm: normalized output and the new running stats.
    let xb = b.randn(&[5, 3, 4, 4]);
    let g = b.param("g", Tensor::randn(&[3], DType::F32));
    let be = b.param("be", Tensor::randn(&[3], DType::F32));
    let rm = b.param("rm", Tensor::randn(&[3], DType::F32));
    let rv = b.param("rv", Tensor::rand(&[3], DType::F32));
    let bn =
        b.g.add_node(
            Op::BatchNorm {
                training: true,
                momentum: 0.1,
                eps: 1e-5,
                has_weight: true,
                has_bias: true,
                has_running_stats: true,
            },
            &[xb, g, be, rm, rv],
            "",
        )
        .unwrap();
    let y = b.un(UnaryOp::Relu, bn[0]);
    b.out(y);
    b.out(bn[1]);
    b.out(bn[2]);
    assert!(b.check("reductions").is_empty());
}

#[test]
fn views_alias_and_copies() {
    let mut b = B::default();
    let x = b.randn(&[4, 6, 5]);
    let y = b.randn(&[4, 5, 3]);
    let yt = b.op(
        Op::Permute {
            dims: vec![0, 2, 1],
        },
        &[y],
    );
    let c = b.op(Op::Cat { dim: 1 }, &[x, yt]);
    b.out(c);
    let s = b.op(Op::Stack { dim: 1 }, &[x, x]);
    b.out(s);
    let idx =
        b.g.add_constant(TensorType::new(&[3], DType::I64), vec![2.0, 0.0, 2.0], "")
            .unwrap();
    let is = b.op(Op::IndexSelect { dim: 1 }, &[x, idx]);
    b.out(is);
    let sl = b.op(
        Op::Slice {
            dim: 1,
            start: 1,
            end: 6,
            step: 2,
        },
        &[x],
    );
    let se = b.op(Op::Select { dim: 2, index: 3 }, &[sl]);
    let ex = b.op(
        Op::Expand {
            shape: vec![2, 4, 3],
        },
        &[se],
    );
    let e = b.un(UnaryOp::Exp, ex);
    b.out(e);
    // Reshape of a permuted tensor cannot alias: a strided copy.
    let xt = b.op(
        Op::Permute {
            dims: vec![2, 0, 1],
        },
        &[x],
    );
    let r = b.op(Op::Reshape { shape: vec![20, 6] }, &[xt]);
    b.out(r);
    // A view returned directly.
    b.out(xt);
    assert!(b.check("views").is_empty());
}

#[test]
fn ops_without_device_kernel_run_on_the_host_explicitly() {
    let mut b = B::default();
    let x = b.randn(&[4, 9]);
    let r = b.un(UnaryOp::Relu, x);
    let a = b.op(
        Op::ArgMax {
            dim: 1,
            keepdim: false,
        },
        &[r],
    );
    let a1 = b.un(UnaryOp::AddScalar(1.0), a);
    b.out(a1);
    let f = b.check("host fallback");
    assert_eq!(f.len(), 1);
    assert!(f[0].contains("argmax"), "{f:?}");
}

/// Occurrences of `what` in a program's source.
fn count(src: &str, what: &str) -> usize {
    src.matches(what).count()
}

#[test]
fn contiguous_f32_pointwise_kernels_use_float4() {
    let mut b = B::default();
    // Contiguous [6, 32] operands; a bias over the last dim (vload4 of a
    // broadcast row), a per-row scale (splat), a scalar.
    let x = b.randn(&[6, 32]);
    let y = b.randn(&[6, 32]);
    let bias = b.param("bias", Tensor::randn(&[32], DType::F32));
    let sc = b.param("sc", Tensor::randn(&[6, 1], DType::F32));
    let one = b.param("one", Tensor::randn(&[1], DType::F32));
    let t = b.bin(BinaryOp::Mul, x, sc);
    let t = b.bin(BinaryOp::Add, t, bias);
    let t = b.bin(BinaryOp::Sub, t, one);
    let g = b.un(UnaryOp::GeluErf, t);
    let gt = b.un(UnaryOp::GeluTanh, y);
    let m = b.bin(BinaryOp::Maximum, g, gt);
    let mn = b.bin(BinaryOp::Minimum, m, y);
    let r = b.un(UnaryOp::Relu, mn);
    let l = b.un(UnaryOp::LeakyRelu(0.2), t);
    let c = b.un(UnaryOp::Clamp(Some(-0.5), Some(0.25)), l);
    let st = b.un(UnaryOp::Step, y);
    let sg = b.un(UnaryOp::Sigmoid, x);
    let th = b.un(UnaryOp::Tanh, sg);
    let ab = b.un(UnaryOp::Abs, y);
    let ab = b.un(UnaryOp::AddScalar(1.0), ab);
    let lg = b.un(UnaryOp::Log, ab);
    let sq = b.un(UnaryOp::Sqrt, ab);
    let p = b.un(UnaryOp::PowScalar(1.5), ab);
    let rp = b.un(UnaryOp::RPowScalar(2.0), c);
    let rd = b.un(UnaryOp::RDivScalar(3.0), ab);
    let pw = b.bin(BinaryOp::Pow, ab, th);
    let e = b.un(UnaryOp::Erf, r);
    let mut acc = b.bin(BinaryOp::Add, e, st);
    for v in [lg, sq, p, rp, rd, pw] {
        acc = b.bin(BinaryOp::Add, acc, v);
    }
    let d = b.bin(BinaryOp::Div, acc, ab);
    b.out(d);
    b.out(c);
    // Eval BatchNorm: per-channel operands over [2, 4, 3, 4] (splat).
    let xb = b.randn(&[2, 4, 3, 4]);
    let w = b.param("w", Tensor::randn(&[4], DType::F32));
    let be = b.param("be", Tensor::randn(&[4], DType::F32));
    let rm = b.param("rm", Tensor::randn(&[4], DType::F32));
    let rv = b.param(
        "rv",
        Tensor::from_vec(vec![0.5f32, 1.0, 2.0, 0.1], &[4]).unwrap(),
    );
    let bn = b.op(
        Op::BatchNorm {
            training: false,
            momentum: 0.1,
            eps: 1e-5,
            has_weight: true,
            has_bias: true,
            has_running_stats: true,
        },
        &[xb, w, be, rm, rv],
    );
    let bn = b.un(UnaryOp::Relu, bn);
    b.out(bn);
    // [4, 8, 5]: 160 elements, operands broadcast over an inner size of 5
    // (gathers of four scalar loads).
    let z = b.randn(&[4, 8, 5]);
    let s8 = b.param("s8", Tensor::randn(&[8, 1], DType::F32));
    let c5 = b.param("c5", Tensor::randn(&[5], DType::F32));
    let u = b.bin(BinaryOp::Mul, z, s8);
    let u = b.bin(BinaryOp::Add, u, c5);
    let u = b.un(UnaryOp::Exp, u);
    b.out(u);
    let (fallbacks, src) = b.check_source("float4 pointwise");
    assert!(fallbacks.is_empty());
    // Every kernel is a float4 one (the planner may split the chains).
    let kernels = count(&src, "int i = q * 4;");
    assert!(kernels >= 3, "{src}");
    assert!(count(&src, "vload4(") >= 4, "{src}");
    assert!(count(&src, "vstore4(") >= kernels, "{src}");
    assert!(src.contains("(float4)(a"), "splat or gather loads:\n{src}");
    assert!(!src.contains("int i = get_global_id(0);"), "{src}");
}

#[test]
fn pointwise_kernels_outside_the_float4_rules_stay_scalar() {
    let mut b = B::default();
    // 21 elements (not a multiple of 4), with a broadcast row.
    let x = b.randn(&[3, 7]);
    let r = b.param("r", Tensor::randn(&[7], DType::F32));
    let t = b.bin(BinaryOp::Mul, x, r);
    let t = b.un(UnaryOp::Tanh, t);
    b.out(t);
    // A transposed operand read in full.
    let a = b.randn(&[8, 4]);
    let at = b.op(Op::Permute { dims: vec![1, 0] }, &[a]);
    let c = b.randn(&[4, 8]);
    let s = b.bin(BinaryOp::Add, at, c);
    let s = b.un(UnaryOp::Sigmoid, s);
    b.out(s);
    // A contiguous operand at offset 1 (a slice).
    let v = b.randn(&[18]);
    let sl = b.op(
        Op::Slice {
            dim: 0,
            start: 1,
            end: 17,
            step: 1,
        },
        &[v],
    );
    let w = b.randn(&[16]);
    let m = b.bin(BinaryOp::Mul, sl, w);
    let m = b.un(UnaryOp::Neg, m);
    b.out(m);
    // A bool value (comparison) and an i64 chain.
    let q = b.randn(&[4, 4]);
    let k = b.randn(&[4, 4]);
    let gt = b.bin(BinaryOp::Gt, q, k);
    let wh = b.op(Op::Where, &[gt, q, k]);
    b.out(wh);
    let n = b.input(Tensor::from_vec(vec![3i64, -2, 7, 1], &[4]).unwrap());
    let n1 = b.un(UnaryOp::AddScalar(1.0), n);
    b.out(n1);
    let (fallbacks, src) = b.check_source("scalar pointwise");
    assert!(fallbacks.is_empty());
    assert!(
        !src.contains("vload4(") && !src.contains("vstore4("),
        "{src}"
    );
    assert_eq!(count(&src, "int i = get_global_id(0);"), 5, "{src}");
}
