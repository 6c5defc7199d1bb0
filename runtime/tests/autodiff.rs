//! Every derivative rule of `kiln_ir::autodiff` against eager autograd
//! (itself gradchecked in kiln-frontend): a small function is traced, its
//! graph differentiated, the forward and backward graphs run by the
//! reference interpreter, and the gradients compared with
//! `autograd::grad` of the eager function, in f64.

use kiln_cpu::conv::Conv2dParams;
use kiln_frontend::ops::{conv, nn as fnn};
use kiln_frontend::testing::uniform;
use kiln_frontend::trace::trace_fn;
use kiln_frontend::{DType, Result, Tensor};
use kiln_ir::autodiff::differentiate;
use kiln_ir::InputKind;
use kiln_runtime::run_graph;

fn rel(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.shape(), b.shape());
    let (a, b) = (a.to_vec::<f64>(), b.to_vec::<f64>());
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-30);
    a.iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f64::max)
        / scale
}

fn u(shape: &[usize], seed: u64) -> Tensor {
    uniform(shape, -1.0, 1.0, seed)
}

/// Positive values (for log, sqrt, pow, division).
fn pos(shape: &[usize], seed: u64) -> Tensor {
    uniform(shape, 0.5, 2.0, seed)
}

/// Differentiates `f` at `inputs` w.r.t. the inputs listed in `wrt` and
/// compares with eager autograd; returns how many values were saved.
fn check_wrt(
    what: &str,
    inputs: &[Tensor],
    wrt: &[usize],
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
) -> usize {
    let t = trace_fn(inputs, &[], |xs| Ok(vec![f(xs)?]), Vec::new)
        .unwrap_or_else(|e| panic!("{what}: trace: {e}"));
    let j = differentiate(
        &t.graph,
        &|k: &InputKind| matches!(k, InputKind::User(i) if wrt.contains(i)),
    )
    .unwrap_or_else(|e| panic!("{what}: differentiate: {e}"));
    let nobind = |k: &InputKind| -> kiln_runtime::Result<Tensor> {
        Err(kiln_runtime::Error::Binding(format!("{k:?}")))
    };
    kiln_frontend::manual_seed(11);
    let outs = kiln_frontend::no_grad(|| run_graph(&j.forward, inputs, &nobind))
        .unwrap_or_else(|e| panic!("{what}: forward: {e}"));
    let y = &outs[0];
    let g = uniform(&y.shape(), -1.0, 1.0, 99)
        .to_dtype(y.dtype())
        .unwrap();
    let mut bin = vec![g.clone()];
    bin.extend(outs[j.num_outputs..].iter().cloned());
    let grads =
        kiln_frontend::no_grad(|| run_graph(&j.backward, &bin, &nobind)).unwrap_or_else(|e| {
            panic!(
                "{what}: backward: {e}\n{}",
                kiln_ir::printer::listing(&j.backward)
            )
        });
    // Eager.
    let xs: Vec<Tensor> = inputs
        .iter()
        .enumerate()
        .map(|(i, x)| {
            let c = x.detach().clone_tensor().unwrap();
            if wrt.contains(&i) {
                c.requires_grad_(true).unwrap()
            } else {
                c
            }
        })
        .collect();
    kiln_frontend::manual_seed(11);
    let ye = f(&xs).unwrap();
    assert!(rel(y, &ye) <= 1e-12, "{what}: forward differs");
    let want: Vec<Tensor> = wrt.iter().map(|&i| xs[i].clone()).collect();
    let ge = kiln_frontend::autograd::grad(&[ye], &want, Some(&[g]), false, false, true).unwrap();
    assert_eq!(
        j.grad_inputs.len(),
        wrt.len(),
        "{what}: one gradient per input"
    );
    for (k, kind) in j.grad_inputs.iter().enumerate() {
        let InputKind::User(i) = kind else {
            panic!("{what}: unexpected {kind:?}")
        };
        let pos = wrt.iter().position(|w| w == i).unwrap();
        let e = rel(&grads[k], ge[pos].as_ref().expect("eager gradient"));
        assert!(
            e <= 1e-10,
            "{what}: gradient of input {i} differs by {e:.3e}"
        );
    }
    j.num_saved
}

fn check(what: &str, inputs: &[Tensor], f: impl Fn(&[Tensor]) -> Result<Tensor>) -> usize {
    let wrt: Vec<usize> = (0..inputs.len()).collect();
    check_wrt(what, inputs, &wrt, f)
}

#[test]
fn unary_rules() {
    let x = u(&[3, 4], 1);
    let p = pos(&[3, 4], 2);
    type F = fn(&Tensor) -> Result<Tensor>;
    let on_any: &[(&str, F)] = &[
        ("neg", |x| x.neg()),
        ("abs", |x| x.abs()),
        ("exp", |x| x.exp()),
        ("sin", |x| x.sin()),
        ("cos", |x| x.cos()),
        ("tanh", |x| x.tanh()),
        ("sigmoid", |x| x.sigmoid()),
        ("relu", |x| x.relu()),
        ("leaky_relu", |x| x.leaky_relu(0.2)),
        ("gelu", |x| x.gelu()),
        ("gelu_tanh", |x| x.gelu_tanh()),
        ("erf", |x| x.erf()),
        ("clamp", |x| x.clamp(Some(-0.3), Some(0.4))),
        ("clamp_min", |x| x.clamp(Some(-0.3), None)),
        ("square", |x| x.square()),
        ("pow3", |x| x.pow_scalar(3.0)),
        ("add_scalar", |x| x.add_scalar(2.0)),
        ("mul_scalar", |x| x.mul_scalar(-1.5)),
        ("rsub_scalar", |x| x.rsub_scalar(2.0)),
    ];
    for (name, f) in on_any {
        check(name, std::slice::from_ref(&x), |t| f(&t[0]));
    }
    let on_pos: &[(&str, F)] = &[
        ("log", |x| x.log()),
        ("sqrt", |x| x.sqrt()),
        ("rsqrt", |x| x.rsqrt()),
        ("reciprocal", |x| x.reciprocal()),
        ("rdiv_scalar", |x| x.rdiv_scalar(3.0)),
        ("pow_half", |x| x.pow_scalar(0.5)),
    ];
    for (name, f) in on_pos {
        check(name, std::slice::from_ref(&p), |t| f(&t[0]));
    }
}

#[test]
fn binary_where_and_cast_rules() {
    let a = u(&[2, 3, 4], 3);
    let b = u(&[3, 1], 4);
    let bp = pos(&[3, 1], 5);
    check("add_broadcast", &[a.clone(), b.clone()], |t| {
        t[0].add(&t[1])
    });
    check("sub_broadcast", &[a.clone(), b.clone()], |t| {
        t[0].sub(&t[1])
    });
    check("mul_broadcast", &[a.clone(), b.clone()], |t| {
        t[0].mul(&t[1])
    });
    check("div_broadcast", &[a.clone(), bp.clone()], |t| {
        t[0].div(&t[1])
    });
    check("pow", &[pos(&[2, 3], 6), u(&[2, 3], 7)], |t| {
        t[0].pow(&t[1])
    });
    check("maximum", &[a.clone(), u(&[2, 3, 4], 8)], |t| {
        t[0].maximum(&t[1])
    });
    check("minimum", &[a.clone(), u(&[4], 9)], |t| t[0].minimum(&t[1]));
    check("mul_self", std::slice::from_ref(&a), |t| t[0].mul(&t[0]));
    // Only the second operand wants a gradient.
    check_wrt("mul_wrt_b", &[a.clone(), b.clone()], &[1], |t| {
        t[0].mul(&t[1])
    });
    check("where", &[a.clone(), u(&[4], 10)], |t| {
        Tensor::where_(&t[0].gt_scalar(0.0)?, &t[0], &t[1])
    });
    check("cast", std::slice::from_ref(&a), |t| {
        t[0].to_dtype(DType::F32)?
            .to_dtype(DType::F64)?
            .mul_scalar(2.0)
    });
}

#[test]
fn reduction_rules() {
    let x = u(&[3, 4, 5], 11);
    check("sum", std::slice::from_ref(&x), |t| {
        t[0].sum_dims(&[1], false)
    });
    check("sum_keep", std::slice::from_ref(&x), |t| {
        t[0].sum_dims(&[0, 2], true)
    });
    check("mean", std::slice::from_ref(&x), |t| {
        t[0].mean_dims(&[2], false)
    });
    check("amax", std::slice::from_ref(&x), |t| t[0].amax(&[1], false));
    check("amin", std::slice::from_ref(&x), |t| {
        t[0].amin(&[0, 2], true)
    });
    check("prod", &[pos(&[3, 4], 12)], |t| t[0].prod_dim(1, false));
    check("var", std::slice::from_ref(&x), |t| {
        t[0].var_dims(&[1], 1, false)
    });
    check("var_biased", std::slice::from_ref(&x), |t| {
        t[0].var_dims(&[0, 2], 0, true)
    });
    check("softmax", std::slice::from_ref(&x), |t| t[0].softmax(1));
    check("log_softmax", std::slice::from_ref(&x), |t| {
        t[0].log_softmax(2)
    });
}

#[test]
fn contraction_rules() {
    check("matmul_2d", &[u(&[3, 4], 13), u(&[4, 5], 14)], |t| {
        t[0].matmul(&t[1])
    });
    check("matmul_nd_2d", &[u(&[2, 3, 4], 15), u(&[4, 5], 16)], |t| {
        t[0].matmul(&t[1])
    });
    check(
        "matmul_batched",
        &[u(&[2, 3, 4], 17), u(&[2, 4, 5], 18)],
        |t| t[0].matmul(&t[1]),
    );
    check(
        "matmul_broadcast",
        &[u(&[2, 1, 3, 4], 19), u(&[3, 4, 2], 20)],
        |t| t[0].matmul(&t[1]),
    );
    check("matmul_vec", &[u(&[4], 21), u(&[4, 5], 22)], |t| {
        t[0].matmul(&t[1])
    });
    check("matvec", &[u(&[3, 4], 23), u(&[4], 24)], |t| {
        t[0].matmul(&t[1])
    });
    check(
        "addmm",
        &[u(&[5], 25), u(&[3, 4], 26), u(&[4, 5], 27)],
        |t| Tensor::addmm(&t[0], &t[1], &t[2]),
    );
    for (stride, padding, groups) in [(1, 0, 1), (2, 1, 1), (1, 1, 2)] {
        let p = Conv2dParams {
            stride: (stride, stride),
            padding: (padding, padding),
            dilation: (1, 1),
            groups,
        };
        check(
            &format!("conv2d s{stride} p{padding} g{groups}"),
            &[
                u(&[2, 4, 7, 6], 28),
                u(&[6, 4 / groups, 3, 3], 29),
                u(&[6], 30),
            ],
            |t| conv::conv2d(&t[0], &t[1], Some(&t[2]), p),
        );
    }
    // A frozen weight: only the input gets a gradient.
    let p = Conv2dParams {
        stride: (1, 1),
        padding: (1, 1),
        dilation: (1, 1),
        groups: 1,
    };
    check_wrt(
        "conv2d_wrt_x",
        &[u(&[1, 2, 5, 5], 31), u(&[3, 2, 3, 3], 32)],
        &[0],
        |t| conv::conv2d(&t[0], &t[1], None, p),
    );
}

#[test]
fn pool_and_norm_rules() {
    let x = u(&[2, 3, 6, 5], 33);
    check("max_pool2d", std::slice::from_ref(&x), |t| {
        fnn::max_pool2d(&t[0], (2, 2), Some((2, 2)), (0, 0), (1, 1), false)
    });
    check("max_pool2d_ceil_pad", std::slice::from_ref(&x), |t| {
        fnn::max_pool2d(&t[0], (3, 2), Some((2, 1)), (1, 1), (1, 2), true)
    });
    check("avg_pool2d", std::slice::from_ref(&x), |t| {
        fnn::avg_pool2d(&t[0], (3, 3), Some((2, 2)), (1, 1), true, false, None)
    });
    let (w, b) = (u(&[3], 34), u(&[3], 35));
    check(
        "batch_norm_train",
        &[x.clone(), w.clone(), b.clone()],
        |t| {
            let rm = Tensor::zeros(&[3], DType::F64);
            let rv = Tensor::ones(&[3], DType::F64);
            fnn::batch_norm(
                &t[0],
                Some(&rm),
                Some(&rv),
                Some(&t[1]),
                Some(&t[2]),
                true,
                0.1,
                1e-5,
            )
        },
    );
    check(
        "batch_norm_train_no_affine",
        std::slice::from_ref(&x),
        |t| fnn::batch_norm(&t[0], None, None, None, None, true, 0.1, 1e-5),
    );
    let rm = u(&[3], 36);
    let rv = pos(&[3], 37);
    check("batch_norm_eval", &[x.clone(), w.clone(), b.clone()], |t| {
        fnn::batch_norm(
            &t[0],
            Some(&rm),
            Some(&rv),
            Some(&t[1]),
            Some(&t[2]),
            false,
            0.1,
            1e-5,
        )
    });
    let y = u(&[2, 3, 8], 38);
    check("layer_norm", &[y.clone(), u(&[8], 39), u(&[8], 40)], |t| {
        fnn::layer_norm(&t[0], &[8], Some(&t[1]), Some(&t[2]), 1e-5)
    });
    check("layer_norm_2d", std::slice::from_ref(&y), |t| {
        fnn::layer_norm(&t[0], &[3, 8], None, None, 1e-5)
    });
    // Dropout: the mask is saved (same draw as eager under one seed).
    let n = check("dropout", std::slice::from_ref(&y), |t| {
        fnn::dropout(&t[0], 0.3, true)?.mul_scalar(2.0)
    });
    assert!(n >= 1, "the dropout mask is saved");
}

#[test]
fn view_and_copy_rules() {
    let x = u(&[2, 3, 4], 41);
    check("reshape", std::slice::from_ref(&x), |t| {
        t[0].reshape(&[6, 4])?.exp()
    });
    check("permute", std::slice::from_ref(&x), |t| {
        t[0].permute(&[2, 0, 1])?.exp()
    });
    check("expand", &[u(&[3, 1], 42)], |t| {
        t[0].expand_to(&[2, 3, 4])?.exp()
    });
    check("slice", std::slice::from_ref(&x), |t| {
        t[0].slice(2, Some(1), Some(4), 2)?.exp()
    });
    check("select", std::slice::from_ref(&x), |t| {
        t[0].select(1, 2)?.exp()
    });
    check("contiguous", std::slice::from_ref(&x), |t| {
        t[0].transpose(0, 2)?.contiguous()?.exp()
    });
    let idx = Tensor::from_vec::<i64>(vec![2, 0, 2], &[3]).unwrap();
    check_wrt("index_select", &[x.clone(), idx.clone()], &[0], |t| {
        t[0].index_select(1, &t[1])?.exp()
    });
    check("cat", &[x.clone(), u(&[2, 1, 4], 43)], |t| {
        Tensor::cat(&[&t[0], &t[1]], 1)?.exp()
    });
    check("stack", &[x.clone(), u(&[2, 3, 4], 44)], |t| {
        Tensor::stack(&[&t[0], &t[1]], 1)?.exp()
    });
}

#[test]
fn cheap_pointwise_values_are_recomputed_not_saved() {
    // A chain of pointwise ops: only the input is saved, the chain is
    // recomputed in the backward.
    let x = u(&[64, 64], 45);
    let saved = check("chain", std::slice::from_ref(&x), |t| {
        t[0].mul_scalar(2.0)?
            .tanh()?
            .add_scalar(1.0)?
            .sigmoid()?
            .mul(&t[0])?
            .exp()
    });
    assert_eq!(saved, 1, "only x is saved");
}
