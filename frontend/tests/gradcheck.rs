//! Finite-difference checks (`kiln_frontend::testing::gradcheck`) of every
//! differentiable op: elementwise binary ops with broadcasting both ways and
//! their scalar forms, every unary op, `where`, the reductions (sum, mean,
//! var, std, prod, max/min, amax/amin) over each dim with and without
//! keepdim, softmax/log_softmax, and the view ops. Inputs are built away
//! from non-differentiable points (relu/abs at 0, ties of max/min).

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

use kiln_frontend::testing::{away_from_zero, distinct, gradcheck_default, input, uniform};
use kiln_frontend::{Result, Tensor};

/// Runs gradcheck with torch's default tolerances and reports `what` on
/// failure.
fn check(what: &str, f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) {
    if let Err(e) = gradcheck_default(f, inputs) {
        panic!("{what}: {e}");
    }
}

/// Shape pairs covering broadcasting in both directions.
const BROADCAST_PAIRS: &[(&[usize], &[usize])] = &[
    (&[2, 3], &[2, 3]),
    (&[2, 3], &[3]),
    (&[3], &[2, 3]),
    (&[2, 1], &[1, 3]),
    (&[1, 3], &[2, 1]),
    (&[2, 3, 1], &[4]),
    (&[2, 3], &[]),
    (&[], &[2, 3]),
];

type Binary = fn(&Tensor, &Tensor) -> Result<Tensor>;

#[test]
fn binary_ops_with_broadcasting() {
    let ops: &[(&str, Binary)] = &[
        ("add", Tensor::add),
        ("sub", Tensor::sub),
        ("mul", Tensor::mul),
        ("div", Tensor::div),
    ];
    for (name, op) in ops {
        for (i, (sa, sb)) in BROADCAST_PAIRS.iter().enumerate() {
            let a = uniform(sa, -2.0, 2.0, i as u64);
            // denominators away from zero
            let b = away_from_zero(sb, 0.5, 1.5, 100 + i as u64);
            check(
                &format!("{name} {sa:?} {sb:?}"),
                |t| op(&t[0], &t[1]),
                &[a.clone(), b.clone()],
            );
            // only one side requiring grad
            let a_const = a.detach();
            check(
                &format!("{name} {sa:?} {sb:?} (rhs only)"),
                |t| op(&t[0], &t[1]),
                &[a_const, b.clone()],
            );
            let b_const = b.detach();
            check(
                &format!("{name} {sa:?} {sb:?} (lhs only)"),
                |t| op(&t[0], &t[1]),
                &[a, b_const],
            );
        }
    }
}

#[test]
fn pow_with_broadcasting() {
    for (i, (sa, sb)) in BROADCAST_PAIRS.iter().enumerate() {
        // base > 0 so that d/db a^b = a^b ln a exists
        let a = uniform(sa, 0.5, 2.0, i as u64);
        let b = uniform(sb, -1.5, 2.5, 50 + i as u64);
        check(&format!("pow {sa:?} {sb:?}"), |t| t[0].pow(&t[1]), &[a, b]);
    }
}

#[test]
fn maximum_minimum_with_broadcasting() {
    let ops: &[(&str, Binary)] = &[("maximum", Tensor::maximum), ("minimum", Tensor::minimum)];
    for (name, op) in ops {
        for (i, (sa, sb)) in BROADCAST_PAIRS.iter().enumerate() {
            // integers vs half-integers: never tied
            let a = distinct(sa, -3.0, 1.0, i as u64);
            let b = distinct(sb, -2.5, 1.0, 10 + i as u64);
            check(
                &format!("{name} {sa:?} {sb:?}"),
                |t| op(&t[0], &t[1]),
                &[a, b],
            );
        }
    }
}

#[test]
fn scalar_forms_and_operators() {
    let x = uniform(&[2, 3], -2.0, 2.0, 1);
    let xs = [x];
    check("add_scalar", |t| t[0].add_scalar(1.5), &xs);
    check("sub_scalar", |t| t[0].sub_scalar(-0.5), &xs);
    check("mul_scalar", |t| t[0].mul_scalar(-3.0), &xs);
    check("div_scalar", |t| t[0].div_scalar(4.0), &xs);
    check("rsub_scalar", |t| t[0].rsub_scalar(2.0), &xs);
    check("operator + f64", |t| Ok(&t[0] + 2.0), &xs);
    check("operator - f64", |t| Ok(&t[0] - 2.0), &xs);
    check("operator * f64", |t| Ok(&t[0] * 0.25), &xs);
    check("operator / f64", |t| Ok(&t[0] / 8.0), &xs);
    check("operator neg", |t| Ok(-&t[0]), &xs);
    check(
        "operators tensor",
        |t| Ok(&(&t[0] * &t[0]) - &(&t[0] / 3.0)),
        &xs,
    );
    let nz = [away_from_zero(&[2, 3], 0.5, 1.5, 2)];
    check("rdiv_scalar", |t| t[0].rdiv_scalar(3.0), &nz);
    let pos = [uniform(&[2, 3], 0.5, 2.0, 3)];
    for p in [0.0, 1.0, 2.0, 3.0, 0.5, -1.0, -1.5, 2.7] {
        check(&format!("pow_scalar {p}"), |t| t[0].pow_scalar(p), &pos);
    }
    // integer powers of negative bases
    let neg = [uniform(&[2, 3], -2.0, -0.5, 4)];
    for p in [2.0, 3.0, -2.0] {
        check(
            &format!("pow_scalar {p} (negative base)"),
            |t| t[0].pow_scalar(p),
            &neg,
        );
    }
}

#[test]
fn unary_ops() {
    type Unary = fn(&Tensor) -> Result<Tensor>;
    let any = uniform(&[3, 4], -2.0, 2.0, 11);
    let nonzero = away_from_zero(&[3, 4], 0.1, 2.0, 12);
    let positive = uniform(&[3, 4], 0.3, 3.0, 13);
    let cases: &[(&str, Unary, &Tensor)] = &[
        ("neg", Tensor::neg, &any),
        ("abs", Tensor::abs, &nonzero),
        ("exp", Tensor::exp, &any),
        ("log", Tensor::log, &positive),
        ("sqrt", Tensor::sqrt, &positive),
        ("rsqrt", Tensor::rsqrt, &positive),
        ("sin", Tensor::sin, &any),
        ("cos", Tensor::cos, &any),
        ("tanh", Tensor::tanh, &any),
        ("sigmoid", Tensor::sigmoid, &any),
        ("relu", Tensor::relu, &nonzero),
        ("gelu", Tensor::gelu, &any),
        ("gelu_tanh", Tensor::gelu_tanh, &any),
        ("erf", Tensor::erf, &any),
        ("square", Tensor::square, &any),
        ("reciprocal", Tensor::reciprocal, &nonzero),
        ("sign", Tensor::sign, &nonzero),
    ];
    for (name, op, x) in cases {
        check(name, |t| op(&t[0]), &[(*x).clone()]);
        // the same op on a non-contiguous (transposed) leaf
        let xt = x.detach().t().unwrap().requires_grad_(true).unwrap();
        assert!(!xt.is_contiguous());
        check(&format!("{name} (transposed input)"), |t| op(&t[0]), &[xt]);
        // and on a 0-d input
        let x0 = input(&[x.to_vec::<f64>()[1]], &[]);
        check(&format!("{name} (0-d)"), |t| op(&t[0]), &[x0]);
    }
    for slope in [0.01, 0.2, -0.5] {
        check(
            &format!("leaky_relu {slope}"),
            |t| t[0].leaky_relu(slope),
            &[nonzero.clone()],
        );
    }
}

#[test]
fn clamp_away_from_the_bounds() {
    // values never within 0.05 of -0.5 or 0.5
    let x = input(
        &[
            -1.2, -0.7, -0.3, 0.0, 0.2, 0.45, 0.55, 0.9, 1.7, -0.45, -0.56, 0.3,
        ],
        &[3, 4],
    );
    check(
        "clamp(min, max)",
        |t| t[0].clamp(Some(-0.5), Some(0.5)),
        &[x.clone()],
    );
    check("clamp(min)", |t| t[0].clamp(Some(-0.5), None), &[x.clone()]);
    check("clamp(max)", |t| t[0].clamp(None, Some(0.5)), &[x]);
}

#[test]
fn where_with_broadcasting() {
    let cond = Tensor::from_vec(vec![true, false, false, true, true, false], &[2, 3]).unwrap();
    let row_cond = Tensor::from_vec(vec![true, false, true], &[3]).unwrap();
    for (c, sa, sb) in [
        (&cond, &[2usize, 3][..], &[2usize, 3][..]),
        (&cond, &[3][..], &[2, 1][..]),
        (&row_cond, &[2, 3][..], &[][..]),
        (&row_cond, &[2, 1][..], &[3][..]),
    ] {
        let a = uniform(sa, -1.0, 1.0, 21);
        let b = uniform(sb, -1.0, 1.0, 22);
        let c = c.clone();
        check(
            &format!("where {:?} {sa:?} {sb:?}", c.shape()),
            |t| Tensor::where_(&c, &t[0], &t[1]),
            &[a, b],
        );
    }
}

/// Every single dim (positive and negative) and a few dim sets of a 3-d
/// tensor, plus the empty list (all dims).
fn dim_sets() -> Vec<Vec<isize>> {
    vec![
        vec![0],
        vec![1],
        vec![2],
        vec![-1],
        vec![-3],
        vec![0, 2],
        vec![1, -1],
        vec![0, 1, 2],
        vec![],
    ]
}

#[test]
fn sum_and_mean_over_each_dim() {
    let x = uniform(&[2, 3, 4], -1.0, 1.0, 31);
    for dims in dim_sets() {
        for keepdim in [false, true] {
            check(
                &format!("sum {dims:?} keepdim={keepdim}"),
                |t| t[0].sum_dims(&dims, keepdim),
                &[x.clone()],
            );
            check(
                &format!("mean {dims:?} keepdim={keepdim}"),
                |t| t[0].mean_dims(&dims, keepdim),
                &[x.clone()],
            );
        }
    }
    check("sum()", |t| t[0].sum(), &[x.clone()]);
    check("mean()", |t| t[0].mean(), &[x.clone()]);
    let x0 = input(&[1.5], &[]);
    check(
        "sum of 0-d over dim 0",
        |t| t[0].sum_dims(&[0], true),
        &[x0.clone()],
    );
    check("mean of 0-d", |t| t[0].mean(), &[x0]);
    // sum_to_size, the reduction behind broadcasting gradients
    check(
        "sum_to_size [3, 1]",
        |t| t[0].sum_to_size(&[3, 1]),
        &[x.clone()],
    );
    check("sum_to_size [4]", |t| t[0].sum_to_size(&[4]), &[x]);
}

#[test]
fn var_and_std_over_each_dim() {
    let x = uniform(&[2, 3, 4], -1.0, 1.0, 32);
    for dims in dim_sets() {
        for correction in [0, 1] {
            for keepdim in [false, true] {
                check(
                    &format!("var {dims:?} correction={correction} keepdim={keepdim}"),
                    |t| t[0].var_dims(&dims, correction, keepdim),
                    &[x.clone()],
                );
                check(
                    &format!("std {dims:?} correction={correction} keepdim={keepdim}"),
                    |t| t[0].std_dims(&dims, correction, keepdim),
                    &[x.clone()],
                );
            }
        }
    }
    check("var()", |t| t[0].var(), &[x.clone()]);
    check("std()", |t| t[0].std(), &[x]);
}

#[test]
fn prod_over_each_dim() {
    let x = uniform(&[2, 3, 4], 0.5, 1.5, 33);
    // one exact zero: the gradient is the product of the others
    let mut v = x.to_vec::<f64>();
    v[5] = 0.0;
    let xz = input(&v, &[2, 3, 4]);
    for x in [x, xz] {
        for dim in [0isize, 1, 2, -1] {
            for keepdim in [false, true] {
                check(
                    &format!("prod dim {dim} keepdim={keepdim}"),
                    |t| t[0].prod_dim(dim, keepdim),
                    &[x.clone()],
                );
            }
        }
        check("prod()", |t| t[0].prod(), &[x.clone()]);
    }
}

#[test]
fn max_min_over_each_dim() {
    let x = distinct(&[2, 3, 4], -2.0, 0.25, 34);
    for dim in [0isize, 1, 2, -1, -2] {
        for keepdim in [false, true] {
            check(
                &format!("max dim {dim} keepdim={keepdim}"),
                |t| Ok(t[0].max_dim(dim, keepdim)?.0),
                &[x.clone()],
            );
            check(
                &format!("min dim {dim} keepdim={keepdim}"),
                |t| Ok(t[0].min_dim(dim, keepdim)?.0),
                &[x.clone()],
            );
        }
    }
    check("max()", |t| t[0].max(), &[x.clone()]);
    check("min()", |t| t[0].min(), &[x.clone()]);
    for dims in dim_sets() {
        for keepdim in [false, true] {
            check(
                &format!("amax {dims:?} keepdim={keepdim}"),
                |t| t[0].amax(&dims, keepdim),
                &[x.clone()],
            );
            check(
                &format!("amin {dims:?} keepdim={keepdim}"),
                |t| t[0].amin(&dims, keepdim),
                &[x.clone()],
            );
        }
    }
}

#[test]
fn softmax_and_log_softmax_over_each_dim() {
    let x = uniform(&[2, 3, 4], -2.0, 2.0, 35);
    for dim in [0isize, 1, 2, -1, -3] {
        check(
            &format!("softmax {dim}"),
            |t| t[0].softmax(dim),
            &[x.clone()],
        );
        check(
            &format!("log_softmax {dim}"),
            |t| t[0].log_softmax(dim),
            &[x.clone()],
        );
    }
    let xt = x
        .detach()
        .transpose(0, 2)
        .unwrap()
        .requires_grad_(true)
        .unwrap();
    check(
        "softmax of a transposed leaf",
        |t| t[0].softmax(1),
        &[xt.clone()],
    );
    check(
        "log_softmax of a transposed leaf",
        |t| t[0].log_softmax(0),
        &[xt],
    );
    let x0 = input(&[0.7], &[]);
    check("softmax 0-d", |t| t[0].softmax(0), &[x0.clone()]);
    check("log_softmax 0-d", |t| t[0].log_softmax(-1), &[x0]);
}

#[test]
fn view_ops() {
    let x = uniform(&[2, 3, 4], -1.0, 1.0, 36);
    let xs = [x.clone()];
    check("view", |t| t[0].view(&[6, -1]), &xs);
    check("view then op", |t| t[0].view(&[4, 6])?.mul_scalar(2.0), &xs);
    check("reshape (view path)", |t| t[0].reshape(&[-1]), &xs);
    check(
        "reshape (copy path)",
        |t| t[0].permute(&[2, 0, 1])?.reshape(&[4, 6]),
        &xs,
    );
    check("permute", |t| t[0].permute(&[1, 2, 0]), &xs);
    check("transpose", |t| t[0].transpose(0, -1), &xs);
    check("t", |t| t[0].view(&[6, 4])?.t(), &xs);
    check("t of 1-d", |t| t[0].view(&[24])?.t(), &xs);
    check("unsqueeze", |t| t[0].unsqueeze(1), &xs);
    check("unsqueeze last", |t| t[0].unsqueeze(-1), &xs);
    check("contiguous", |t| t[0].transpose(0, 1)?.contiguous(), &xs);
    check("clone_tensor", |t| t[0].clone_tensor(), &xs);
    check(
        "to_dtype same",
        |t| t[0].to_dtype(kiln_frontend::DType::F64),
        &xs,
    );
    let y = uniform(&[3, 1, 4], -1.0, 1.0, 37);
    check("expand", |t| t[0].expand(&[2, 3, 5, 4]), &[y.clone()]);
    check("expand -1", |t| t[0].expand(&[-1, 2, -1]), &[y.clone()]);
    check("expand_to", |t| t[0].expand_to(&[3, 3, 4]), &[y.clone()]);
    check("squeeze", |t| t[0].squeeze(), &[y.clone()]);
    check("squeeze_dim", |t| t[0].squeeze_dim(1), &[y.clone()]);
    check("squeeze_dim no-op", |t| t[0].squeeze_dim(0), &[y]);
    // a chain of views on a non-contiguous leaf
    let xt = x
        .detach()
        .permute(&[2, 1, 0])
        .unwrap()
        .requires_grad_(true)
        .unwrap();
    check(
        "views on a permuted leaf",
        |t| {
            t[0].transpose(0, 1)?
                .reshape(&[3, 8])?
                .unsqueeze(0)?
                .expand(&[2, 3, 8])?
                .sum_dims(&[0], false)
        },
        &[xt],
    );
}

#[test]
fn composed_expressions() {
    let x = uniform(&[3, 4], -1.0, 1.0, 41);
    let w = uniform(&[4], -1.0, 1.0, 42);
    let b = uniform(&[3, 1], -1.0, 1.0, 43);
    // a layer-norm-like expression built from the primitive ops
    check(
        "normalize",
        |t| {
            let m = t[0].mean_dims(&[-1], true)?;
            let v = t[0].var_dims(&[-1], 0, true)?;
            t[0].sub(&m)?
                .div(&v.add_scalar(1e-5)?.sqrt()?)?
                .mul(&t[1])?
                .add(&t[2])
        },
        &[x.clone(), w.clone(), b.clone()],
    );
    // a cross-entropy-like expression
    check(
        "log_softmax loss",
        |t| {
            t[0].mul(&t[1])?
                .add(&t[2])?
                .log_softmax(1)?
                .mean_dims(&[1], false)?
                .neg()?
                .sum()
        },
        &[x.clone(), w, b],
    );
    // a tensor used several times (gradient accumulation inside the graph)
    check(
        "reuse",
        |t| t[0].mul(&t[0])?.add(&t[0].sin()?)?.mul(&t[0].softmax(0)?),
        &[x],
    );
}
