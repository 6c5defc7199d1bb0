//! CrossEntropyLoss / F.cross_entropy / F.nll_loss against values computed
//! by hand (PyTorch snippets in the comments) and against an f64 reference
//! written from PyTorch's formulas; gradients by gradcheck; grad_fn names;
//! the errors for bad targets, shapes and arguments.

use kiln_frontend::nn::functional::{cross_entropy, nll_loss, Reduction};
use kiln_frontend::nn::CrossEntropyLoss;
use kiln_frontend::testing::{gradcheck, uniform, ATOL, EPS, RTOL};
use kiln_frontend::{DType, Tensor};

fn close(a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{a:?} vs {b:?}");
    for (x, y) in a.iter().zip(b) {
        assert!(
            (x - y).abs() <= tol * (1.0 + y.abs()) || (x.is_nan() && y.is_nan()),
            "{a:?} vs {b:?}"
        );
    }
}

fn logits() -> Tensor {
    Tensor::from_vec(vec![2.0f64, 0.5, -1.0, 0.0, 1.0, 3.0], &[2, 3]).unwrap()
}

fn idx(v: &[i64], shape: &[usize]) -> Tensor {
    Tensor::from_vec(v.to_vec(), shape).unwrap()
}

#[test]
fn class_index_values_and_grad_fn() {
    // x = torch.tensor([[2., .5, -1.], [0., 1., 3.]], dtype=torch.float64)
    // t = torch.tensor([0, 2])
    // F.cross_entropy(x, t, reduction='none') -> [0.24131129665715703, 0.16984601955628567]
    // F.cross_entropy(x, t) -> 0.20557865810672135 ; reduction='sum' -> 0.4111573162134427
    let x = logits();
    let t = idx(&[0, 2], &[2]);
    let none = cross_entropy(&x, &t, Reduction::None, 0.0, None, -100).unwrap();
    assert_eq!(none.shape(), vec![2]);
    close(
        &none.to_vec::<f64>(),
        &[0.24131129665715703, 0.16984601955628567],
        1e-15,
    );
    let mean = cross_entropy(&x, &t, Reduction::Mean, 0.0, None, -100).unwrap();
    close(&[mean.item().unwrap()], &[0.20557865810672135], 1e-15);
    let sum = cross_entropy(&x, &t, Reduction::Sum, 0.0, None, -100).unwrap();
    close(&[sum.item().unwrap()], &[0.4111573162134427], 1e-15);

    // grad_fn chain: NllLossBackward0 -> LogSoftmaxBackward0 -> AccumulateGrad
    let xr = x.clone_tensor().unwrap().requires_grad_(true).unwrap();
    let loss = CrossEntropyLoss::new().forward(&xr, &t).unwrap();
    assert_eq!(loss.grad_fn_name().as_deref(), Some("NllLossBackward0"));
    let next = loss.grad_fn().unwrap().next_functions();
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].as_ref().unwrap().0.name(), "LogSoftmaxBackward0");
    // x.grad = (softmax(x) - one_hot(t)) / N
    loss.backward().unwrap();
    close(
        &xr.grad().unwrap().to_vec::<f64>(),
        &[
            -0.10720148270536206,
            0.08764519607001835,
            0.019556286635343725,
            0.021005033067033024,
            0.05709759969229724,
            -0.07810263275933027,
        ],
        1e-14,
    );
    assert_eq!(CrossEntropyLoss::new().repr(), "CrossEntropyLoss()");
}

#[test]
fn weight_ignore_index_smoothing_probabilities_by_hand() {
    let x = logits();
    // w = torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64)
    // F.cross_entropy(torch.cat([x, x[:1]]), torch.tensor([0, 2, -100]), weight=w)
    //   -> 0.1743125993750901 (the ignored row counts neither in the sum nor the weight)
    let w = Tensor::from_vec(vec![0.2f64, 1.0, 3.0], &[3]).unwrap();
    let x3 = Tensor::cat(&[&x, &x.narrow(0, 0, 1).unwrap()], 0).unwrap();
    let t3 = idx(&[0, 2, -100], &[3]);
    let l = cross_entropy(&x3, &t3, Reduction::Mean, 0.0, Some(&w), -100).unwrap();
    close(&[l.item().unwrap()], &[0.1743125993750901], 1e-15);
    // a custom ignore_index
    let t3b = idx(&[0, 2, 1], &[3]);
    let l = cross_entropy(&x3, &t3b, Reduction::Mean, 0.0, Some(&w), 1).unwrap();
    close(&[l.item().unwrap()], &[0.1743125993750901], 1e-15);
    let none = cross_entropy(&x3, &t3, Reduction::None, 0.0, None, -100).unwrap();
    close(
        &none.to_vec::<f64>(),
        &[0.24131129665715703, 0.16984601955628567, 0.0],
        1e-15,
    );

    // F.cross_entropy(x, torch.tensor([0, 2]), label_smoothing=0.1) -> 0.3639119914400547
    let t = idx(&[0, 2], &[2]);
    let l = cross_entropy(&x, &t, Reduction::Mean, 0.1, None, -100).unwrap();
    close(&[l.item().unwrap()], &[0.3639119914400547], 1e-15);
    // with smoothing the result is (1 - e) * nll + e / C * smooth: AddBackward0
    let xr = x.clone_tensor().unwrap().requires_grad_(true).unwrap();
    let l = cross_entropy(&xr, &t, Reduction::Mean, 0.1, None, -100).unwrap();
    assert_eq!(l.grad_fn_name().as_deref(), Some("AddBackward0"));

    // p = torch.tensor([[.7, .2, .1], [0., .5, .5]], dtype=torch.float64)
    // F.cross_entropy(x, p) -> 1.0055786581067214
    let p = Tensor::from_vec(vec![0.7f64, 0.2, 0.1, 0.0, 0.5, 0.5], &[2, 3]).unwrap();
    let l = cross_entropy(&x, &p, Reduction::Mean, 0.0, None, -100).unwrap();
    close(&[l.item().unwrap()], &[1.0055786581067214], 1e-15);

    // every target ignored: mean is nan (0 / 0), sum is 0
    let all = idx(&[-100, -100], &[2]);
    let l = cross_entropy(&x, &all, Reduction::Mean, 0.0, None, -100).unwrap();
    assert!(l.item().unwrap().is_nan());
    let l = cross_entropy(&x, &all, Reduction::Sum, 0.0, None, -100).unwrap();
    assert_eq!(l.item().unwrap(), 0.0);
}

/// PyTorch's formulas, element by element in f64, for input [N, C, S]
/// (S = product of the trailing dims) and class-index targets [N, S].
#[allow(clippy::too_many_arguments)]
fn reference_index(
    x: &[f64],
    n: usize,
    c: usize,
    s: usize,
    t: &[i64],
    w: Option<&[f64]>,
    ii: i64,
    red: Reduction,
    e: f64,
) -> Vec<f64> {
    let wt = |k: usize| w.map(|w| w[k]).unwrap_or(1.0);
    let mut nll = vec![0.0; n * s];
    let mut smooth = vec![0.0; n * s];
    let (mut tw, mut count) = (0.0, 0.0);
    for i in 0..n {
        for j in 0..s {
            let col: Vec<f64> = (0..c).map(|k| x[(i * c + k) * s + j]).collect();
            let m = col.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = m + col.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
            let ti = t[i * s + j];
            if ti == ii {
                continue;
            }
            let k = ti as usize;
            nll[i * s + j] = -wt(k) * (col[k] - lse);
            smooth[i * s + j] = -(0..c).map(|q| wt(q) * (col[q] - lse)).sum::<f64>();
            tw += wt(k);
            count += 1.0;
        }
    }
    match red {
        Reduction::None => nll
            .iter()
            .zip(&smooth)
            .map(|(a, b)| (1.0 - e) * a + e / c as f64 * b)
            .collect(),
        Reduction::Sum => {
            vec![(1.0 - e) * nll.iter().sum::<f64>() + e / c as f64 * smooth.iter().sum::<f64>()]
        }
        Reduction::Mean => {
            let sden = if w.is_some() { tw } else { count };
            vec![
                (1.0 - e) * nll.iter().sum::<f64>() / tw
                    + e / c as f64 * smooth.iter().sum::<f64>() / sden,
            ]
        }
    }
}

#[test]
fn spatial_inputs_against_the_reference() {
    // [N, C, d1] (3-d), [N, C, H, W] (4-d) and [N, C, a, b, c] (5-d), with
    // weights, an ignored position and smoothing, every reduction.
    for (shape, seed) in [
        (vec![2usize, 4, 3], 1u64),
        (vec![2, 3, 2, 2], 2),
        (vec![1, 3, 2, 1, 2], 3),
    ] {
        let (n, c) = (shape[0], shape[1]);
        let s: usize = shape[2..].iter().product();
        let x = uniform(&shape, -2.0, 2.0, seed);
        let xv = x.to_vec::<f64>();
        let mut tshape = vec![n];
        tshape.extend_from_slice(&shape[2..]);
        let tv: Vec<i64> = (0..n * s)
            .map(|i| {
                if i == 1 {
                    -100
                } else {
                    ((i * 7 + 1) % c) as i64
                }
            })
            .collect();
        let t = idx(&tv, &tshape);
        let wv: Vec<f64> = (0..c).map(|k| 0.5 + k as f64 * 0.75).collect();
        let w = Tensor::from_vec(wv.clone(), &[c]).unwrap();
        for red in [Reduction::None, Reduction::Mean, Reduction::Sum] {
            for e in [0.0, 0.2] {
                for weighted in [false, true] {
                    let wo = weighted.then_some(&w);
                    let got = cross_entropy(&x, &t, red, e, wo, -100).unwrap();
                    let want = reference_index(
                        &xv,
                        n,
                        c,
                        s,
                        &tv,
                        weighted.then_some(wv.as_slice()),
                        -100,
                        red,
                        e,
                    );
                    if red == Reduction::None {
                        assert_eq!(got.shape(), tshape);
                    } else {
                        assert_eq!(got.shape(), Vec::<usize>::new());
                    }
                    close(&got.to_vec::<f64>(), &want, 1e-13);
                }
            }
        }
        // grad_fn names as PyTorch's nll_loss_nd: 4-d -> NllLoss2DBackward0;
        // 3-d/5-d view to [N, C, 1, -1] (ViewBackward0 on top under 'none')
        let xr = x.clone_tensor().unwrap().requires_grad_(true).unwrap();
        let m = cross_entropy(&xr, &t, Reduction::Mean, 0.0, None, -100).unwrap();
        assert_eq!(m.grad_fn_name().as_deref(), Some("NllLoss2DBackward0"));
        let nn = cross_entropy(&xr, &t, Reduction::None, 0.0, None, -100).unwrap();
        let want = if shape.len() == 4 {
            "NllLoss2DBackward0"
        } else {
            "ViewBackward0"
        };
        assert_eq!(nn.grad_fn_name().as_deref(), Some(want));
    }
}

#[test]
fn f32_matches_f64_and_unbatched_input() {
    let x = uniform(&[5, 4], -3.0, 3.0, 9);
    let t = idx(&[0, 3, 1, 1, 2], &[5]);
    let a = cross_entropy(&x, &t, Reduction::Mean, 0.05, None, -100).unwrap();
    let b = cross_entropy(
        &x.to_dtype(DType::F32).unwrap(),
        &t,
        Reduction::Mean,
        0.05,
        None,
        -100,
    )
    .unwrap();
    assert_eq!(b.dtype(), DType::F32);
    close(&[b.item().unwrap()], &[a.item().unwrap()], 1e-6);
    // input [C], target 0-d: F.cross_entropy(x[0], t[0]) == F.cross_entropy(x[:1], t[:1])
    let x0 = x.select(0, 0).unwrap();
    let t0 = t.select(0, 0).unwrap();
    for red in [Reduction::None, Reduction::Mean, Reduction::Sum] {
        let u = cross_entropy(&x0, &t0, red, 0.1, None, -100).unwrap();
        assert_eq!(u.shape(), Vec::<usize>::new());
        let v = cross_entropy(
            &x.narrow(0, 0, 1).unwrap(),
            &t.narrow(0, 0, 1).unwrap(),
            Reduction::Sum,
            0.1,
            None,
            -100,
        )
        .unwrap();
        close(&[u.item().unwrap()], &[v.item().unwrap()], 1e-15);
    }
    // probability targets on an unbatched input
    let p0 = x0.softmax(0).unwrap();
    let u = cross_entropy(&x0, &p0, Reduction::None, 0.0, None, -100).unwrap();
    let lp = x0.log_softmax(0).unwrap().to_vec::<f64>();
    let pv = p0.to_vec::<f64>();
    let want: f64 = -lp.iter().zip(&pv).map(|(a, b)| a * b).sum::<f64>();
    close(&[u.item().unwrap()], &[want], 1e-14);
}

#[test]
fn probability_targets_with_weight_and_smoothing() {
    let x = uniform(&[3, 4, 2], -2.0, 2.0, 4);
    let p = uniform(&[3, 4, 2], 0.0, 1.0, 5);
    let w = Tensor::from_vec(vec![1.0f64, 0.5, 2.0, 1.5], &[4]).unwrap();
    let (xv, pv, wv) = (x.to_vec::<f64>(), p.to_vec::<f64>(), w.to_vec::<f64>());
    let e = 0.3;
    // -(logp * (p * (1 - e) + e / C) * w[c]).sum(1), then mean over N * d1
    let mut per = vec![0.0; 6];
    for i in 0..3 {
        for j in 0..2 {
            let col: Vec<f64> = (0..4).map(|k| xv[(i * 4 + k) * 2 + j]).collect();
            let lse = col.iter().map(|v| v.exp()).sum::<f64>().ln();
            per[i * 2 + j] = -(0..4)
                .map(|k| (col[k] - lse) * (pv[(i * 4 + k) * 2 + j] * (1.0 - e) + e / 4.0) * wv[k])
                .sum::<f64>();
        }
    }
    let none = cross_entropy(&x, &p, Reduction::None, e, Some(&w), -100).unwrap();
    assert_eq!(none.shape(), vec![3, 2]);
    close(&none.to_vec::<f64>(), &per, 1e-14);
    let mean = cross_entropy(&x, &p, Reduction::Mean, e, Some(&w), -100).unwrap();
    close(
        &[mean.item().unwrap()],
        &[per.iter().sum::<f64>() / 6.0],
        1e-14,
    );
    let sum = cross_entropy(&x, &p, Reduction::Sum, e, Some(&w), -100).unwrap();
    close(&[sum.item().unwrap()], &[per.iter().sum::<f64>()], 1e-14);
}

#[test]
fn gradcheck_every_variant() {
    let x = uniform(&[3, 4], -2.0, 2.0, 11)
        .requires_grad_(true)
        .unwrap();
    let t = idx(&[1, -100, 3], &[3]);
    let w = Tensor::from_vec(vec![0.3f64, 1.0, 2.0, 0.7], &[4]).unwrap();
    for red in [Reduction::None, Reduction::Mean, Reduction::Sum] {
        for e in [0.0, 0.25] {
            for wo in [None, Some(&w)] {
                gradcheck(
                    |v| cross_entropy(&v[0], &t, red, e, wo, -100),
                    std::slice::from_ref(&x),
                    EPS,
                    ATOL,
                    RTOL,
                )
                .unwrap();
            }
        }
    }
    // spatial input, and gradients with respect to probability targets too
    let xs = uniform(&[2, 3, 2, 2], -1.0, 1.0, 12)
        .requires_grad_(true)
        .unwrap();
    let ts = idx(&[0, 1, 2, 0, 2, 2, 1, -100], &[2, 2, 2]);
    gradcheck(
        |v| {
            cross_entropy(
                &v[0],
                &ts,
                Reduction::Mean,
                0.1,
                Some(&w.narrow(0, 0, 3).unwrap()),
                -100,
            )
        },
        std::slice::from_ref(&xs),
        EPS,
        ATOL,
        RTOL,
    )
    .unwrap();
    let p = uniform(&[3, 4], 0.0, 1.0, 13).requires_grad_(true).unwrap();
    gradcheck(
        |v| cross_entropy(&v[0], &v[1], Reduction::Mean, 0.1, Some(&w), -100),
        &[x.clone(), p],
        EPS,
        ATOL,
        RTOL,
    )
    .unwrap();
    // nll_loss alone
    let lp = uniform(&[3, 4], -3.0, -0.1, 14)
        .requires_grad_(true)
        .unwrap();
    gradcheck(
        |v| {
            nll_loss(&v[0], &t, Some(&w), Reduction::None, -100)?
                .square()?
                .sum()
        },
        std::slice::from_ref(&lp),
        EPS,
        ATOL,
        RTOL,
    )
    .unwrap();
}

#[test]
fn errors_name_the_problem() {
    let x = logits();
    let err = |r: kiln_frontend::Result<Tensor>| r.unwrap_err().to_string();
    // out-of-range class: names the index and C
    let e = err(cross_entropy(
        &x,
        &idx(&[0, 3], &[2]),
        Reduction::Mean,
        0.0,
        None,
        -100,
    ));
    assert!(
        e.starts_with("cross_entropy") && e.contains("Target 3") && e.contains("C = 3"),
        "{e}"
    );
    let e = err(cross_entropy(
        &x,
        &idx(&[-1, 0], &[2]),
        Reduction::Mean,
        0.0,
        None,
        -100,
    ));
    assert!(e.contains("Target -1 is out of bounds"), "{e}");
    // batch mismatch and wrong spatial shape
    let e = err(cross_entropy(
        &x,
        &idx(&[0, 1, 2], &[3]),
        Reduction::Mean,
        0.0,
        None,
        -100,
    ));
    assert!(e.contains("batch_size (2)") && e.contains("(3)"), "{e}");
    let xs = Tensor::zeros(&[2, 3, 4], DType::F32);
    let e = err(cross_entropy(
        &xs,
        &idx(&[0; 6], &[2, 3]),
        Reduction::Mean,
        0.0,
        None,
        -100,
    ));
    assert!(e.contains("Expected target size [2, 4], got [2, 3]"), "{e}");
    // float targets of another shape, integer probability targets
    let e = err(cross_entropy(
        &x,
        &Tensor::zeros(&[2], DType::F64),
        Reduction::Mean,
        0.0,
        None,
        -100,
    ));
    assert!(e.contains("must be i64"), "{e}");
    let e = err(cross_entropy(
        &x,
        &Tensor::zeros(&[2, 3], DType::I64),
        Reduction::Mean,
        0.0,
        None,
        -100,
    ));
    assert!(e.contains("Expected floating point type for target"), "{e}");
    let e = err(cross_entropy(
        &x,
        &x.softmax(1).unwrap(),
        Reduction::Mean,
        0.0,
        None,
        0,
    ));
    assert!(e.contains("ignore_index is not supported"), "{e}");
    // smoothing out of range, bad weight, integer input, 0-d input
    let e = err(cross_entropy(
        &x,
        &idx(&[0, 1], &[2]),
        Reduction::Mean,
        1.5,
        None,
        -100,
    ));
    assert!(
        e.contains("label_smoothing must be between 0.0 and 1.0. Got: 1.5"),
        "{e}"
    );
    let w2 = Tensor::ones(&[2], DType::F64);
    let e = err(cross_entropy(
        &x,
        &idx(&[0, 1], &[2]),
        Reduction::Mean,
        0.0,
        Some(&w2),
        -100,
    ));
    assert!(e.contains("all 3 classes") && e.contains("[2]"), "{e}");
    let e = err(cross_entropy(
        &Tensor::zeros(&[2, 3], DType::I64),
        &idx(&[0, 1], &[2]),
        Reduction::Mean,
        0.0,
        None,
        -100,
    ));
    assert!(e.contains("floating point input"), "{e}");
    let e = err(cross_entropy(
        &Tensor::scalar(1.0f32),
        &idx(&[0], &[]),
        Reduction::Mean,
        0.0,
        None,
        -100,
    ));
    assert!(e.contains("Expected 1 or more dimensions"), "{e}");
    // a weight that requires grad: the backward refuses, as PyTorch's
    let wr = Tensor::ones(&[3], DType::F64).requires_grad_(true).unwrap();
    let l = nll_loss(&x, &idx(&[0, 1], &[2]), Some(&wr), Reduction::Sum, -100).unwrap();
    let e = l.backward().unwrap_err().to_string();
    assert!(
        e.contains("derivative for 'weight' is not implemented"),
        "{e}"
    );
}
