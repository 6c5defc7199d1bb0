//! Finite-difference gradient checks (f64) for the structural ops: matmul in
//! every form (incl. broadcast batches and transposed operands), addmm,
//! linear, conv2d and conv_transpose2d over stride/padding/dilation/groups,
//! cat/stack/index_select/narrow/select/split. (Elementwise, reductions and
//! views are in gradcheck.rs; pooling and norms next to their ops.)

use kiln_cpu::conv::Conv2dParams;
use kiln_frontend::ops::conv::{conv2d, conv_transpose2d};
use kiln_frontend::ops::linalg::linear;
use kiln_frontend::testing::{gradcheck_default, uniform};
use kiln_frontend::Tensor;

#[test]
fn matmul_all_forms() {
    let cases: &[(&[usize], &[usize])] = &[
        (&[3, 4], &[4, 5]),
        (&[4], &[4, 5]),
        (&[3, 4], &[4]),
        (&[4], &[4]),
        (&[2, 3, 4], &[2, 4, 5]),
        (&[2, 1, 3, 4], &[3, 4, 2]),
        (&[2, 3, 4], &[4, 5]),
    ];
    for (i, (sa, sb)) in cases.iter().enumerate() {
        let a = uniform(sa, -1.0, 1.0, 10 + i as u64);
        let b = uniform(sb, -1.0, 1.0, 20 + i as u64);
        gradcheck_default(|t| t[0].matmul(&t[1]), &[a, b])
            .unwrap_or_else(|e| panic!("{sa:?} @ {sb:?}: {e}"));
    }
    // transposed operand views
    let a = uniform(&[4, 3], -1.0, 1.0, 1);
    let b = uniform(&[5, 4], -1.0, 1.0, 2);
    gradcheck_default(|t| t[0].t()?.matmul(&t[1].t()?), &[a, b]).unwrap();
}

#[test]
fn addmm_and_linear() {
    let bias = uniform(&[5], -1.0, 1.0, 3);
    let a = uniform(&[3, 4], -1.0, 1.0, 4);
    let b = uniform(&[4, 5], -1.0, 1.0, 5);
    gradcheck_default(
        |t| Tensor::addmm(&t[0], &t[1], &t[2]),
        &[bias.clone(), a, b],
    )
    .unwrap();
    let x = uniform(&[2, 3, 4], -1.0, 1.0, 6);
    let w = uniform(&[5, 4], -1.0, 1.0, 7);
    gradcheck_default(|t| linear(&t[0], &t[1], Some(&t[2])), &[x, w, bias]).unwrap();
}

#[test]
fn conv2d_stride_padding_dilation_groups() {
    let cases = [
        ((1, 1), (0, 0), (1, 1), 1),
        ((2, 1), (1, 2), (1, 1), 1),
        ((1, 2), (1, 0), (2, 1), 1),
        ((1, 1), (1, 1), (1, 1), 2),
        ((2, 2), (0, 1), (1, 2), 2),
    ];
    for (i, (stride, padding, dilation, groups)) in cases.into_iter().enumerate() {
        let p = Conv2dParams {
            stride,
            padding,
            dilation,
            groups,
        };
        let x = uniform(&[2, 4, 6, 5], -1.0, 1.0, 30 + i as u64);
        let w = uniform(&[4, 4 / groups, 3, 2], -1.0, 1.0, 40 + i as u64);
        let b = uniform(&[4], -1.0, 1.0, 50 + i as u64);
        gradcheck_default(|t| conv2d(&t[0], &t[1], Some(&t[2]), p), &[x, w, b])
            .unwrap_or_else(|e| panic!("{p:?}: {e}"));
    }
}

#[test]
fn conv_transpose2d_stride_padding_output_padding_groups() {
    let cases = [
        ((1, 1), (0, 0), (0, 0), (1, 1), 1),
        ((2, 2), (1, 0), (1, 1), (1, 1), 1),
        ((2, 1), (0, 1), (1, 0), (1, 2), 2),
    ];
    for (i, (stride, padding, output_padding, dilation, groups)) in cases.into_iter().enumerate() {
        let p = Conv2dParams {
            stride,
            padding,
            dilation,
            groups,
        };
        let x = uniform(&[2, 4, 4, 3], -1.0, 1.0, 60 + i as u64);
        let w = uniform(&[4, 6 / groups, 3, 2], -1.0, 1.0, 70 + i as u64);
        let b = uniform(&[6], -1.0, 1.0, 80 + i as u64);
        gradcheck_default(
            |t| conv_transpose2d(&t[0], &t[1], Some(&t[2]), p, output_padding),
            &[x, w, b],
        )
        .unwrap_or_else(|e| panic!("{p:?} op={output_padding:?}: {e}"));
    }
}

#[test]
fn copying_shape_ops_and_slicing_views() {
    let a = uniform(&[2, 3], -1.0, 1.0, 90);
    let b = uniform(&[2, 2], -1.0, 1.0, 91);
    gradcheck_default(|t| Tensor::cat(&[&t[0], &t[1]], 1), &[a.clone(), b]).unwrap();
    let c = uniform(&[2, 3], -1.0, 1.0, 92);
    gradcheck_default(|t| Tensor::stack(&[&t[0], &t[1]], 1), &[a.clone(), c]).unwrap();
    let idx = Tensor::from_vec(vec![2i64, 0, 2], &[3]).unwrap();
    gradcheck_default(|t| t[0].index_select(1, &idx), &[a.clone()]).unwrap();
    gradcheck_default(
        |t| t[0].narrow(1, 1, 2)?.mul(&t[0].select(1, 0)?.unsqueeze(1)?),
        &[a.clone()],
    )
    .unwrap();
    gradcheck_default(
        |t| {
            let parts = t[0].split(2, 1)?;
            parts[0]
                .sum_dims(&[1], false)?
                .mul(&parts[1].squeeze_dim(1)?)
        },
        &[a],
    )
    .unwrap();
}
