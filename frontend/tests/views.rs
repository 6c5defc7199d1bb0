//! View and shape ops against PyTorch: for every view op the shape,
//! strides, storage offset, `is_contiguous` and storage sharing PyTorch
//! gives (the PyTorch expression is in a comment next to each assert), that
//! in-place writes through a view reach the base and other views, and
//! hand-computed gradients of each op's backward.

use kiln_frontend::{DType, Tensor};
use std::sync::Arc;

/// `torch.arange(24.).view(2, 3, 4)`: shape (2, 3, 4), strides (12, 4, 1).
fn base() -> Tensor {
    Tensor::arange(0.0, 24.0, 1.0, DType::F32)
        .unwrap()
        .view(&[2, 3, 4])
        .unwrap()
}

fn arange(n: usize) -> Tensor {
    Tensor::arange(0.0, n as f64, 1.0, DType::F32).unwrap()
}

fn f32s(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_slice(v, shape).unwrap()
}

fn leaf(v: &[f32], shape: &[usize]) -> Tensor {
    f32s(v, shape).requires_grad_(true).unwrap()
}

/// Asserts a view's geometry and that it shares `base`'s storage.
#[track_caller]
fn check_view(
    t: &Tensor,
    base: &Tensor,
    shape: &[usize],
    strides: &[usize],
    offset: usize,
    contiguous: bool,
) {
    assert_eq!(t.shape(), shape, "shape");
    assert_eq!(t.strides(), strides, "strides");
    assert_eq!(t.storage_offset(), offset, "storage_offset");
    assert_eq!(t.is_contiguous(), contiguous, "is_contiguous");
    assert!(t.shares_storage(base), "shares storage with the base");
}

fn vals(t: &Tensor) -> Vec<f32> {
    t.to_vec::<f32>()
}

fn grad_of(t: &Tensor) -> Vec<f32> {
    t.grad().expect("a gradient").to_vec::<f32>()
}

// ------------------------------------------------------------------ view / reshape

#[test]
fn view_geometry_and_write_through() {
    let a = base();
    // torch.arange(24.).view(2,3,4).view(6,4).stride() == (4, 1)
    let v = a.view(&[6, 4]).unwrap();
    check_view(&v, &a, &[6, 4], &[4, 1], 0, true);
    // .view(-1).stride() == (1,)
    let flat = a.view(&[-1]).unwrap();
    check_view(&flat, &a, &[24], &[1], 0, true);
    assert_eq!(v.grad_fn_name(), None); // base needs no grad
                                        // v[1].fill_(-1.) is seen by a and by a.view(-1)
    v.select(0, 1).unwrap().fill_(-1.0).unwrap();
    assert_eq!(
        a.select(0, 0)
            .unwrap()
            .select(0, 1)
            .unwrap()
            .to_vec::<f32>(),
        vec![-1.0; 4]
    );
    assert_eq!(vals(&flat)[4..8], [-1.0; 4]);
    // a.permute(2,0,1).view(24) raises (not viewable)
    let err = a.permute(&[2, 0, 1]).unwrap().view(&[24]).unwrap_err();
    assert!(err.to_string().contains("view"), "{err}");
    // view_as
    let w = a.view_as(&Tensor::zeros(&[4, 6], DType::F32)).unwrap();
    check_view(&w, &a, &[4, 6], &[6, 1], 0, true);
}

#[test]
fn reshape_as_view_and_as_copy() {
    let a = base();
    // torch.arange(24.).view(2,3,4).reshape(4,6): a view, stride (6, 1)
    let r = a.reshape(&[4, 6]).unwrap();
    check_view(&r, &a, &[4, 6], &[6, 1], 0, true);
    r.add_(&Tensor::scalar(100.0f32)).unwrap();
    assert_eq!(vals(&a)[0], 100.0);
    // a.permute(2,0,1).reshape(24): a copy (new storage), stride (1,)
    let p = a.permute(&[2, 0, 1]).unwrap();
    let c = p.reshape(&[24]).unwrap();
    assert_eq!(c.shape(), vec![24]);
    assert_eq!(c.strides(), vec![1]);
    assert_eq!(c.storage_offset(), 0);
    assert!(c.is_contiguous());
    assert!(!c.shares_storage(&a));
    assert_eq!(vals(&c)[..4], [100.0, 104.0, 108.0, 112.0]);
    c.fill_(0.0).unwrap();
    assert_eq!(vals(&a)[0], 100.0, "a copy does not write back");
    // reshape_as
    let ra = a.reshape_as(&Tensor::zeros(&[3, 8], DType::F32)).unwrap();
    check_view(&ra, &a, &[3, 8], &[8, 1], 0, true);
    // reshape through a copy records UnsafeViewBackward0, a view ViewBackward0
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    // x.t().reshape(6).grad_fn -> <UnsafeViewBackward0>
    let y = x.t().unwrap().reshape(&[6]).unwrap();
    assert_eq!(y.grad_fn_name().as_deref(), Some("UnsafeViewBackward0"));
    assert_eq!(vals(&y), vec![1.0, 4.0, 2.0, 5.0, 3.0, 6.0]);
    // x.reshape(3, 2).grad_fn -> <ViewBackward0>
    let z = x.reshape(&[3, 2]).unwrap();
    assert_eq!(z.grad_fn_name().as_deref(), Some("ViewBackward0"));
    let w = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[6]);
    y.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    // d/dx sum(x.t().reshape(6) * w): x[i][j] sits at position j*2+i
    assert_eq!(grad_of(&x), vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
}

// ------------------------------------------------------------------ permutations

#[test]
fn permute_transpose_t_movedim() {
    let a = base();
    // torch.arange(24.).view(2,3,4).permute(2,0,1).stride() == (1, 12, 4)
    let p = a.permute(&[2, 0, 1]).unwrap();
    check_view(&p, &a, &[4, 2, 3], &[1, 12, 4], 0, false);
    // .transpose(0, 2).stride() == (1, 4, 12)
    let t = a.transpose(0, 2).unwrap();
    check_view(&t, &a, &[4, 3, 2], &[1, 4, 12], 0, false);
    // .swapaxes(-1, 1).stride() == (12, 1, 4)
    let s = a.swapaxes(-1, 1).unwrap();
    check_view(&s, &a, &[2, 4, 3], &[12, 1, 4], 0, false);
    // .movedim(0, 2).stride() == (4, 1, 12)
    let m = a.movedim(0, 2).unwrap();
    check_view(&m, &a, &[3, 4, 2], &[4, 1, 12], 0, false);
    // .movedim((0, 1), (2, 0)) -> shape (3, 4, 2), stride (4, 1, 12)
    let m2 = a.movedims(&[0, 1], &[2, 0]).unwrap();
    check_view(&m2, &a, &[3, 4, 2], &[4, 1, 12], 0, false);
    // torch.arange(12.).view(3, 4).t().stride() == (1, 4)
    let b = arange(12).view(&[3, 4]).unwrap();
    let bt = b.t().unwrap();
    check_view(&bt, &b, &[4, 3], &[1, 4], 0, false);
    // bt[1].fill_(7.): column 1 of b, also seen through b.view(-1)
    bt.select(0, 1).unwrap().fill_(7.0).unwrap();
    assert_eq!(
        vals(&b),
        vec![0.0, 7.0, 2.0, 3.0, 4.0, 7.0, 6.0, 7.0, 8.0, 7.0, 10.0, 11.0]
    );
    assert_eq!(vals(&b.view(&[-1]).unwrap())[5], 7.0);
    // p[3, 1, 2] is a[1, 2, 3]: write through p, read through t
    p.select(0, 3)
        .unwrap()
        .select(0, 1)
        .unwrap()
        .select(0, 2)
        .unwrap()
        .fill_(-5.0)
        .unwrap();
    assert_eq!(vals(&a)[12 + 8 + 3], -5.0);
    assert_eq!(
        t.select(0, 3)
            .unwrap()
            .select(0, 2)
            .unwrap()
            .select(0, 1)
            .unwrap()
            .item()
            .unwrap(),
        -5.0
    );
    assert!(a.movedim(0, 3).is_err());
    assert!(a.movedims(&[0, 0], &[1, 2]).is_err());
}

#[test]
fn permute_family_gradients() {
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 2, 3]);
    let w = f32s(&[1.0, 10.0, 100.0, 2.0, 20.0, 200.0], &[3, 1, 2]);
    // x.permute(2, 0, 1).grad_fn -> <PermuteBackward0>
    let p = x.permute(&[2, 0, 1]).unwrap();
    assert_eq!(p.grad_fn_name().as_deref(), Some("PermuteBackward0"));
    p.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    // grad[0, i, j] = w[j, 0, i]
    assert_eq!(grad_of(&x), vec![1.0, 100.0, 20.0, 10.0, 2.0, 200.0]);
    // torch.ones(2,3).movedim(0,1).grad_fn -> <PermuteBackward0>; swapaxes -> <TransposeBackward0>
    let y = leaf(&[0.0; 6], &[2, 3]);
    assert_eq!(
        y.movedim(0, 1).unwrap().grad_fn_name().as_deref(),
        Some("PermuteBackward0")
    );
    assert_eq!(
        y.swapaxes(0, 1).unwrap().grad_fn_name().as_deref(),
        Some("TransposeBackward0")
    );
}

// ------------------------------------------------------------------ narrow / slice

#[test]
fn narrow_geometry_and_write_through() {
    let a = base();
    // torch.arange(24.).view(2,3,4).narrow(1, 1, 2): stride (12, 4, 1), offset 4, not contiguous
    let n = a.narrow(1, 1, 2).unwrap();
    check_view(&n, &a, &[2, 2, 4], &[12, 4, 1], 4, false);
    // .narrow(0, 1, 1): offset 12, contiguous
    let n0 = a.narrow(0, 1, 1).unwrap();
    check_view(&n0, &a, &[1, 3, 4], &[12, 4, 1], 12, true);
    // .narrow(2, -2, 2): offset 2
    let n2 = a.narrow(-1, -2, 2).unwrap();
    check_view(&n2, &a, &[2, 3, 2], &[12, 4, 1], 2, false);
    // n.fill_(0.) is seen by a and by n2 (they overlap at a[:, 1:3, 2:4])
    n.fill_(0.0).unwrap();
    assert_eq!(vals(&a)[4..12], [0.0; 8]);
    assert_eq!(vals(&a)[3], 3.0);
    assert_eq!(
        vals(&n2),
        vec![2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 14.0, 15.0, 0.0, 0.0, 0.0, 0.0]
    );
    // errors: start + length > size, start out of range, 0-d
    let e = a.narrow(1, 2, 2).unwrap_err().to_string();
    assert!(e.contains("exceeds dimension size (3)"), "{e}");
    assert!(a.narrow(1, -4, 1).is_err());
    assert!(Tensor::scalar(1.0f32).narrow(0, 0, 1).is_err());
}

#[test]
fn slice_python_semantics_and_steps() {
    let v = arange(10);
    // v[-3:]: offset 7, size 3
    let s = v.slice(0, Some(-3), None, 1).unwrap();
    check_view(&s, &v, &[3], &[1], 7, true);
    assert_eq!(vals(&s), vec![7.0, 8.0, 9.0]);
    // v[2:100]: end clamped, size 8
    let s = v.slice(0, Some(2), Some(100), 1).unwrap();
    check_view(&s, &v, &[8], &[1], 2, true);
    // v[-100:3]: start clamped to 0
    let s = v.slice(0, Some(-100), Some(3), 1).unwrap();
    check_view(&s, &v, &[3], &[1], 0, true);
    // v[8:2]: empty, offset 8, is_contiguous() True
    let s = v.slice(0, Some(8), Some(2), 1).unwrap();
    check_view(&s, &v, &[0], &[1], 8, true);
    assert_eq!(vals(&s), Vec::<f32>::new());
    // v[1:8:3] -> [1, 4, 7], stride (3,), offset 1
    let s = v.slice(0, Some(1), Some(8), 3).unwrap();
    check_view(&s, &v, &[3], &[3], 1, false);
    assert_eq!(vals(&s), vec![1.0, 4.0, 7.0]);
    // v[::4] -> [0, 4, 8]
    let s4 = v.slice(0, None, None, 4).unwrap();
    check_view(&s4, &v, &[3], &[4], 0, false);
    // v[::4].add_(100) is seen by v and by v[1:8:3] (shares element 4)
    s4.add_(&Tensor::scalar(100.0f32)).unwrap();
    assert_eq!(
        vals(&v),
        vec![100.0, 1.0, 2.0, 3.0, 104.0, 5.0, 6.0, 7.0, 108.0, 9.0]
    );
    assert_eq!(vals(&s), vec![1.0, 104.0, 7.0]);
    // torch.arange(24.).view(2,3,4)[:, :, 1::2]: stride (12, 4, 2), offset 1
    let a = base();
    let c = a.slice(2, Some(1), None, 2).unwrap();
    check_view(&c, &a, &[2, 3, 2], &[12, 4, 2], 1, false);
    // [:, 1:, :][:, :, 1::2] composes: offset 5
    let cc = a
        .slice(1, Some(1), None, 1)
        .unwrap()
        .slice(2, Some(1), None, 2)
        .unwrap();
    check_view(&cc, &a, &[2, 2, 2], &[12, 4, 2], 5, false);
    assert_eq!(vals(&cc), vec![5.0, 7.0, 9.0, 11.0, 17.0, 19.0, 21.0, 23.0]);
    // a[1:] of shape (1, 3, 4) is contiguous again (offset 12)
    let r = a.slice(0, Some(1), None, 1).unwrap();
    check_view(&r, &a, &[1, 3, 4], &[12, 4, 1], 12, true);
    // copy_ through the stepped view, read from the base
    c.copy_(&Tensor::zeros(&[2, 3, 2], DType::F32)).unwrap();
    assert_eq!(vals(&a)[..8], [0.0, 0.0, 2.0, 0.0, 4.0, 0.0, 6.0, 0.0]);
    assert!(v.slice(0, None, None, 0).is_err());
    assert!(Tensor::scalar(1.0f32).slice(0, None, None, 1).is_err());
}

#[test]
fn narrow_and_slice_gradients() {
    // x.narrow(0, 1, 3).grad_fn -> <SliceBackward0>
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[6]);
    let y = x.narrow(0, 1, 3).unwrap();
    assert_eq!(y.grad_fn_name().as_deref(), Some("SliceBackward0"));
    let w = f32s(&[10.0, 20.0, 30.0], &[3]);
    y.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![0.0, 10.0, 20.0, 30.0, 0.0, 0.0]);

    // x[:, 1::2] on a (2, 5) tensor: gradient lands in columns 1 and 3
    let x = leaf(&[0.0; 10], &[2, 5]);
    let y = x.slice(1, Some(1), None, 2).unwrap();
    assert_eq!(y.grad_fn_name().as_deref(), Some("SliceBackward0"));
    let w = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    y.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(
        grad_of(&x),
        vec![0.0, 1.0, 0.0, 2.0, 0.0, 0.0, 3.0, 0.0, 4.0, 0.0]
    );
}

// ------------------------------------------------------------------ select / unbind

#[test]
fn select_geometry_and_write_through() {
    let a = base();
    // torch.arange(24.).view(2,3,4).select(1, 2): stride (12, 1), offset 8
    let s = a.select(1, 2).unwrap();
    check_view(&s, &a, &[2, 4], &[12, 1], 8, false);
    // .select(0, -1): stride (4, 1), offset 12, contiguous
    let s0 = a.select(0, -1).unwrap();
    check_view(&s0, &a, &[3, 4], &[4, 1], 12, true);
    // a[:, :, 1]: stride (12, 4), offset 1
    let s2 = a.select(2, 1).unwrap();
    check_view(&s2, &a, &[2, 3], &[12, 4], 1, false);
    // a[1, 2, 3] is 0-d: offset 23, shape ()
    let e = s0.select(0, 2).unwrap().select(0, 3).unwrap();
    check_view(&e, &a, &[], &[], 23, true);
    // s.fill_(-1.) is seen by a and by a[1] (row 2)
    s.fill_(-1.0).unwrap();
    assert_eq!(vals(&a)[8..12], [-1.0; 4]);
    assert_eq!(vals(&s0.select(0, 2).unwrap()), vec![-1.0; 4]);
    assert_eq!(e.item().unwrap(), -1.0);
    let err = a.select(1, 3).unwrap_err().to_string();
    assert!(err.contains("out of range"), "{err}");
    assert!(a.select(1, -4).is_err());
    assert!(Tensor::scalar(2.0f32).select(0, 0).is_err());
}

#[test]
fn select_and_unbind_gradients() {
    // grad of sum(x.select(1, 2) * w) is w in column 2
    let x = leaf(&[0.0; 12], &[3, 4]);
    let y = x.select(1, 2).unwrap();
    // x.select(1, 2).grad_fn -> <SelectBackward0>
    assert_eq!(y.grad_fn_name().as_deref(), Some("SelectBackward0"));
    let w = f32s(&[1.0, 2.0, 3.0], &[3]);
    y.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(
        grad_of(&x),
        vec![0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 0.0]
    );
    // negative index
    let x = leaf(&[0.0; 6], &[2, 3]);
    x.select(0, -1)
        .unwrap()
        .mul_scalar(5.0)
        .unwrap()
        .sum()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grad_of(&x), vec![0.0, 0.0, 0.0, 5.0, 5.0, 5.0]);

    // unbind: views with offsets 0, 1, 2 along dim 1; one UnbindBackward0 node
    let b = arange(6).view(&[2, 3]).unwrap();
    let parts = b.unbind(1).unwrap();
    assert_eq!(parts.len(), 3);
    // torch.arange(6.).view(2,3).unbind(1)[2]: stride (3,), offset 2
    check_view(&parts[2], &b, &[2], &[3], 2, false);
    parts[2].fill_(9.0).unwrap();
    assert_eq!(vals(&b), vec![0.0, 1.0, 9.0, 3.0, 4.0, 9.0]);
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let u = x.unbind(1).unwrap();
    assert_eq!(u[0].grad_fn_name().as_deref(), Some("UnbindBackward0"));
    assert!(Arc::ptr_eq(
        &u[0].grad_fn().unwrap(),
        &u[2].grad_fn().unwrap()
    ));
    // loss = sum(u0 * 2) + sum(u2 * u2): column 0 gets 2, column 1 nothing, column 2 gets 2x
    let loss = u[0]
        .mul_scalar(2.0)
        .unwrap()
        .sum()
        .unwrap()
        .add(&u[2].square().unwrap().sum().unwrap())
        .unwrap();
    loss.backward().unwrap();
    assert_eq!(grad_of(&x), vec![2.0, 0.0, 6.0, 2.0, 0.0, 12.0]);
}

// ------------------------------------------------------------------ expand

#[test]
fn expand_geometry_and_write_through() {
    // torch.arange(3.).view(3, 1).expand(3, 4).stride() == (1, 0)
    let b = arange(3).view(&[3, 1]).unwrap();
    let e = b.expand(&[3, 4]).unwrap();
    check_view(&e, &b, &[3, 4], &[1, 0], 0, false);
    // .expand(2, 3, 4).stride() == (0, 1, 0); .expand(-1, 2) keeps dim 0
    let e3 = b.expand(&[2, 3, 4]).unwrap();
    check_view(&e3, &b, &[2, 3, 4], &[0, 1, 0], 0, false);
    let e2 = b.expand(&[-1, 2]).unwrap();
    check_view(&e2, &b, &[3, 2], &[1, 0], 0, false);
    // expand_as
    let ea = b.expand_as(&Tensor::zeros(&[3, 5], DType::F32)).unwrap();
    check_view(&ea, &b, &[3, 5], &[1, 0], 0, false);
    // writing the base is seen by every expanded view
    b.select(0, 1).unwrap().fill_(7.0).unwrap();
    assert_eq!(vals(&e.select(0, 1).unwrap()), vec![7.0; 4]);
    assert_eq!(
        vals(&e3.select(0, 1).unwrap().select(0, 1).unwrap()),
        vec![7.0; 4]
    );
    // writing an expanded view is an error, as PyTorch's
    assert!(e.fill_(0.0).is_err());
    // grad of an expand sums over the expanded dims
    let x = leaf(&[1.0, 2.0], &[2, 1]);
    let y = x.expand(&[3, 2, 4]).unwrap();
    assert_eq!(y.grad_fn_name().as_deref(), Some("ExpandBackward0"));
    y.sum().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![12.0, 12.0]);
    assert_eq!(x.grad().unwrap().shape(), vec![2, 1]);
}

// ------------------------------------------------------------------ squeeze / unsqueeze

#[test]
fn squeeze_unsqueeze_geometry() {
    let a = base();
    // torch.arange(24.).view(2,3,4).unsqueeze(1).stride() == (12, 12, 4, 1)
    let u = a.unsqueeze(1).unwrap();
    check_view(&u, &a, &[2, 1, 3, 4], &[12, 12, 4, 1], 0, true);
    // .unsqueeze(-1).stride() == (12, 4, 1, 1)
    let u2 = a.unsqueeze(-1).unwrap();
    check_view(&u2, &a, &[2, 3, 4, 1], &[12, 4, 1, 1], 0, true);
    // .permute(2,0,1).unsqueeze(0).stride() == (4, 1, 12, 4)
    let pu = a.permute(&[2, 0, 1]).unwrap().unsqueeze(0).unwrap();
    check_view(&pu, &a, &[1, 4, 2, 3], &[4, 1, 12, 4], 0, false);
    // torch.zeros(2, 1, 3).squeeze().stride() == (3, 1); squeeze(1) the same
    let z = Tensor::zeros(&[2, 1, 3], DType::F32);
    check_view(&z.squeeze().unwrap(), &z, &[2, 3], &[3, 1], 0, true);
    check_view(&z.squeeze_dim(1).unwrap(), &z, &[2, 3], &[3, 1], 0, true);
    // squeeze(0) on a size-2 dim is a no-op view
    check_view(
        &z.squeeze_dim(0).unwrap(),
        &z,
        &[2, 1, 3],
        &[3, 3, 1],
        0,
        true,
    );
    // torch.zeros(1, 2, 1).squeeze((0, 2)) -> shape (2,), stride (1,)
    let z2 = Tensor::zeros(&[1, 2, 1], DType::F32);
    let sq = z2.squeeze_dims(&[0, -1]).unwrap();
    check_view(&sq, &z2, &[2], &[1], 0, true);
    assert!(z2.squeeze_dims(&[0, 0]).is_err());
    // a view of a select: a[:, 1].unsqueeze(1) -> stride (12, 4, 1), offset 4
    let su = a.select(1, 1).unwrap().unsqueeze(1).unwrap();
    check_view(&su, &a, &[2, 1, 4], &[12, 4, 1], 4, false);
    // write through the unsqueezed view; seen by a and by u
    su.fill_(-2.0).unwrap();
    assert_eq!(vals(&a)[4..8], [-2.0; 4]);
    assert_eq!(
        vals(
            &u.select(0, 1)
                .unwrap()
                .select(0, 0)
                .unwrap()
                .select(0, 1)
                .unwrap()
        ),
        vec![-2.0; 4]
    );
    // grad_fns: UnsqueezeBackward0, SqueezeBackward0/1/2
    let x = leaf(&[1.0, 2.0], &[2, 1]);
    assert_eq!(
        x.unsqueeze(0).unwrap().grad_fn_name().as_deref(),
        Some("UnsqueezeBackward0")
    );
    assert_eq!(
        x.squeeze().unwrap().grad_fn_name().as_deref(),
        Some("SqueezeBackward0")
    );
    assert_eq!(
        x.squeeze_dim(1).unwrap().grad_fn_name().as_deref(),
        Some("SqueezeBackward1")
    );
    let s = x.squeeze_dims(&[1]).unwrap();
    assert_eq!(s.grad_fn_name().as_deref(), Some("SqueezeBackward2"));
    s.mul(&f32s(&[3.0, 4.0], &[2]))
        .unwrap()
        .sum()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grad_of(&x), vec![3.0, 4.0]);
    assert_eq!(x.grad().unwrap().shape(), vec![2, 1]);
}

// ------------------------------------------------------------------ flatten / unflatten

#[test]
fn flatten_geometry() {
    let a = base();
    // torch.arange(24.).view(2,3,4).flatten(): a view, stride (1,)
    let f = a.flatten(0, -1).unwrap();
    check_view(&f, &a, &[24], &[1], 0, true);
    // .flatten(1): shape (2, 12), stride (12, 1)
    let f1 = a.flatten(1, -1).unwrap();
    check_view(&f1, &a, &[2, 12], &[12, 1], 0, true);
    // a.flatten(1, 1) is a (same object)
    assert!(a.flatten(1, 1).unwrap().same_object(&a));
    // a 1-d tensor: v.flatten() is v
    let v = arange(5);
    assert!(v.flatten(0, -1).unwrap().same_object(&v));
    // torch.tensor(5.).flatten(): shape (1,), stride (1,)
    let s = Tensor::scalar(5.0f32);
    let sf = s.flatten(0, -1).unwrap();
    check_view(&sf, &s, &[1], &[1], 0, true);
    // a.permute(2,0,1).flatten(1, 2): dims (2, 3) with strides (12, 4) merge: view, stride (1, 4)
    let p = a.permute(&[2, 0, 1]).unwrap();
    let pf = p.flatten(1, 2).unwrap();
    check_view(&pf, &a, &[4, 6], &[1, 4], 0, false);
    // a.permute(2,0,1).flatten(0, 1): dims with strides (1, 12) cannot merge: a copy
    let pc = p.flatten(0, 1).unwrap();
    assert_eq!(pc.shape(), vec![8, 3]);
    assert_eq!(pc.strides(), vec![3, 1]);
    assert!(pc.is_contiguous());
    assert!(!pc.shares_storage(&a));
    // a narrowed tensor: a[:, :2].flatten(1) is viewable (stride 12, 1), offset 0
    let nf = a.narrow(1, 0, 2).unwrap().flatten(1, 2).unwrap();
    check_view(&nf, &a, &[2, 8], &[12, 1], 0, false);
    // writes through f (a view) reach a and f1; the copy pc is untouched
    f.narrow(0, 12, 4).unwrap().fill_(-3.0).unwrap();
    assert_eq!(vals(&a)[12..16], [-3.0; 4]);
    assert_eq!(vals(&f1.select(0, 1).unwrap())[..4], [-3.0; 4]);
    assert_eq!(vals(&pc)[3], 12.0, "the copy keeps the old a[1, 0, 0]");
    assert!(a.flatten(2, 1).is_err());
    // grad: flatten of a view is ViewBackward0; the copy path goes through UnsafeViewBackward0
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 2, 3]);
    let y = x.flatten(1, 2).unwrap();
    assert_eq!(y.grad_fn_name().as_deref(), Some("ViewBackward0"));
    y.mul(&f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[1, 6]))
        .unwrap()
        .sum()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grad_of(&x), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(x.grad().unwrap().shape(), vec![1, 2, 3]);
}

#[test]
fn unflatten_geometry() {
    let a = base();
    // torch.arange(24.).view(2,3,4).unflatten(2, (2, 2)).stride() == (12, 4, 2, 1)
    let u = a.unflatten(2, &[2, 2]).unwrap();
    check_view(&u, &a, &[2, 3, 2, 2], &[12, 4, 2, 1], 0, true);
    // .unflatten(1, (-1, 1)).stride() == (12, 4, 4, 1)
    let u1 = a.unflatten(1, &[-1, 1]).unwrap();
    check_view(&u1, &a, &[2, 3, 1, 4], &[12, 4, 4, 1], 0, true);
    // a.permute(2,0,1).unflatten(0, (2, 2)).stride() == (2, 1, 12, 4)
    let p = a
        .permute(&[2, 0, 1])
        .unwrap()
        .unflatten(0, &[2, 2])
        .unwrap();
    check_view(&p, &a, &[2, 2, 2, 3], &[2, 1, 12, 4], 0, false);
    // u[1, 2, 1].fill_(0.) -> a[1, 2, 2:4]
    u.select(0, 1)
        .unwrap()
        .select(0, 2)
        .unwrap()
        .select(0, 1)
        .unwrap()
        .fill_(0.0)
        .unwrap();
    assert_eq!(vals(&a)[20..24], [20.0, 21.0, 0.0, 0.0]);
    assert_eq!(
        vals(&u1.select(0, 1).unwrap().select(0, 2).unwrap()),
        vec![20.0, 21.0, 0.0, 0.0]
    );
    let e = a.unflatten(2, &[3, 2]).unwrap_err().to_string();
    assert!(e.contains("don't multiply up"), "{e}");
    assert!(a.unflatten(0, &[]).is_err());
    // grad_fn -> <ViewBackward0>
    let x = leaf(&[1.0, 2.0, 3.0, 4.0], &[4]);
    let y = x.unflatten(0, &[2, 2]).unwrap();
    assert_eq!(y.grad_fn_name().as_deref(), Some("ViewBackward0"));
    y.select(1, 0).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![1.0, 0.0, 1.0, 0.0]);
}

// ------------------------------------------------------------------ chunk / split

#[test]
fn chunk_and_split_geometry() {
    let v = arange(10);
    // torch.arange(10.).chunk(3): sizes 4, 4, 2 at offsets 0, 4, 8
    let c = v.chunk(3, 0).unwrap();
    assert_eq!(c.len(), 3);
    check_view(&c[0], &v, &[4], &[1], 0, true);
    check_view(&c[1], &v, &[4], &[1], 4, true);
    check_view(&c[2], &v, &[2], &[1], 8, true);
    // torch.arange(6.).chunk(4) gives 3 chunks of 2
    assert_eq!(arange(6).chunk(4, 0).unwrap().len(), 3);
    // torch.zeros(0).chunk(3) gives 3 empty chunks
    assert_eq!(
        Tensor::zeros(&[0], DType::F32).chunk(3, 0).unwrap().len(),
        3
    );
    // torch.arange(10.).split(4): sizes 4, 4, 2
    let s = v.split(4, 0).unwrap();
    let sizes: Vec<usize> = s.iter().map(|t| t.shape()[0]).collect();
    assert_eq!(sizes, vec![4, 4, 2]);
    // .split([3, 7]): offsets 0, 3
    let sw = v.split_with_sizes(&[3, 7], 0).unwrap();
    check_view(&sw[0], &v, &[3], &[1], 0, true);
    check_view(&sw[1], &v, &[7], &[1], 3, true);
    // torch.arange(24.).view(2,3,4).chunk(2, 2): shape (2, 3, 2), stride (12, 4, 1), offsets 0, 2
    let a = base();
    let ac = a.chunk(2, 2).unwrap();
    check_view(&ac[0], &a, &[2, 3, 2], &[12, 4, 1], 0, false);
    check_view(&ac[1], &a, &[2, 3, 2], &[12, 4, 1], 2, false);
    // a.split(2, 1): shapes (2, 2, 4), (2, 1, 4) at offsets 0, 8
    let asp = a.split(2, 1).unwrap();
    check_view(&asp[0], &a, &[2, 2, 4], &[12, 4, 1], 0, false);
    check_view(&asp[1], &a, &[2, 1, 4], &[12, 4, 1], 8, false);
    // a.split(1, 0)[1]: shape (1, 3, 4), offset 12, contiguous
    let a0 = a.split(1, 0).unwrap();
    check_view(&a0[1], &a, &[1, 3, 4], &[12, 4, 1], 12, true);
    // writes through a chunk reach the base and other views
    ac[1].fill_(-1.0).unwrap();
    assert_eq!(vals(&a)[..4], [0.0, 1.0, -1.0, -1.0]);
    assert_eq!(
        vals(&asp[1]),
        vec![8.0, 9.0, -1.0, -1.0, 20.0, 21.0, -1.0, -1.0]
    );
    sw[1].add_(&Tensor::scalar(1.0f32)).unwrap();
    assert_eq!(vals(&c[0]), vec![0.0, 1.0, 2.0, 4.0]);
    // errors
    assert!(v.chunk(0, 0).is_err());
    assert!(v.split(0, 0).is_err());
    let e = v.split_with_sizes(&[3, 3], 0).unwrap_err().to_string();
    assert!(e.contains("sum exactly to 10"), "{e}");
    assert!(Tensor::scalar(1.0f32).chunk(2, 0).is_err());
}

#[test]
fn chunk_and_split_gradients() {
    // x.chunk(3)[0].grad_fn -> <SplitBackward0> (one node for all pieces)
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0], &[5]);
    let c = x.chunk(3, 0).unwrap();
    assert_eq!(c.len(), 3);
    assert_eq!(c[0].grad_fn_name().as_deref(), Some("SplitBackward0"));
    assert!(Arc::ptr_eq(
        &c[0].grad_fn().unwrap(),
        &c[2].grad_fn().unwrap()
    ));
    // sum(c0 * 2) + sum(c2 * 3): the unused middle chunk gets zeros
    let loss = c[0]
        .mul_scalar(2.0)
        .unwrap()
        .sum()
        .unwrap()
        .add(&c[2].mul_scalar(3.0).unwrap().sum().unwrap())
        .unwrap();
    loss.backward().unwrap();
    assert_eq!(grad_of(&x), vec![2.0, 2.0, 0.0, 0.0, 3.0]);

    // split_with_sizes on dim 1 of a (2, 3): <SplitWithSizesBackward0>
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    let s = x.split_with_sizes(&[1, 2], 1).unwrap();
    assert_eq!(
        s[1].grad_fn_name().as_deref(),
        Some("SplitWithSizesBackward0")
    );
    // d/dx sum(s1 ** 2) = 2x on columns 1, 2
    s[1].square().unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![0.0, 4.0, 6.0, 0.0, 10.0, 12.0]);
}

// ------------------------------------------------------------------ contiguous

#[test]
fn contiguous_same_object_or_copy() {
    let a = base();
    // a.contiguous() is a
    assert!(a.contiguous().unwrap().same_object(&a));
    // a.narrow(0, 1, 1).contiguous() is itself (already contiguous)
    let n = a.narrow(0, 1, 1).unwrap();
    assert!(n.contiguous().unwrap().same_object(&n));
    // a.permute(2,0,1).contiguous(): a copy with stride (6, 3, 1)
    let p = a.permute(&[2, 0, 1]).unwrap();
    let c = p.contiguous().unwrap();
    assert!(!c.same_object(&p));
    assert!(!c.shares_storage(&a));
    assert_eq!(c.shape(), vec![4, 2, 3]);
    assert_eq!(c.strides(), vec![6, 3, 1]);
    assert_eq!(c.storage_offset(), 0);
    assert!(c.is_contiguous());
    assert_eq!(vals(&c)[..6], [0.0, 4.0, 8.0, 12.0, 16.0, 20.0]);
    // a stepped slice copies too, from its offset
    let s = a.slice(2, Some(1), None, 2).unwrap().contiguous().unwrap();
    assert_eq!(s.strides(), vec![6, 2, 1]);
    assert_eq!(vals(&s)[..4], [1.0, 3.0, 5.0, 7.0]);
    // the copy is independent of the base
    c.fill_(0.0).unwrap();
    assert_eq!(vals(&a)[4], 4.0);
    // grad_fn of a contiguous() copy -> <CloneBackward0>
    let x = leaf(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let xt = x.t().unwrap().contiguous().unwrap();
    assert_eq!(xt.grad_fn_name().as_deref(), Some("CloneBackward0"));
    xt.mul(&f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]))
        .unwrap()
        .sum()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(grad_of(&x), vec![1.0, 3.0, 2.0, 4.0]);
}

// ------------------------------------------------------------------ cat / stack / index_select

#[test]
fn cat_values_promotion_and_errors() {
    let a = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let b = f32s(&[5.0, 6.0], &[1, 2]);
    // torch.cat([a, b]) -> [[1, 2], [3, 4], [5, 6]]
    let c = Tensor::cat(&[&a, &b], 0).unwrap();
    assert_eq!(c.shape(), vec![3, 2]);
    assert_eq!(vals(&c), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert!(!c.shares_storage(&a));
    // torch.cat([a, a.t()], 1) -> [[1, 2, 1, 3], [3, 4, 2, 4]]
    let c1 = Tensor::cat(&[&a, &a.t().unwrap()], -1).unwrap();
    assert_eq!(vals(&c1), vec![1.0, 2.0, 1.0, 3.0, 3.0, 4.0, 2.0, 4.0]);
    // torch.cat([float32, float64, int64]).dtype == torch.float64
    let d = Tensor::from_slice(&[7.0f64], &[1]).unwrap();
    let i = Tensor::from_slice(&[8i64], &[1]).unwrap();
    let f = f32s(&[0.5], &[1]);
    let m = Tensor::cat(&[&f, &d, &i], 0).unwrap();
    assert_eq!(m.dtype(), DType::F64);
    assert_eq!(m.to_vec::<f64>(), vec![0.5, 7.0, 8.0]);
    // torch.cat([int64, bool]).dtype == torch.int64
    let bl = Tensor::from_slice(&[true], &[1]).unwrap();
    assert_eq!(
        Tensor::cat(&[&i, &bl], 0).unwrap().to_vec::<i64>(),
        vec![8, 1]
    );
    // legacy: torch.cat([torch.zeros(0), a]) skips the 1-d empty tensor
    let e = Tensor::zeros(&[0], DType::F32);
    let ce = Tensor::cat(&[&e, &a, &e], 1).unwrap();
    assert_eq!(ce.shape(), vec![2, 2]);
    assert_eq!(Tensor::cat(&[&e, &e], 0).unwrap().shape(), vec![0]);
    // but a (0, 2) tensor takes part normally
    let e2 = Tensor::zeros(&[0, 2], DType::F32);
    assert_eq!(Tensor::cat(&[&e2, &a], 0).unwrap().shape(), vec![2, 2]);
    // errors name every shape
    let bad = f32s(&[0.0; 3], &[1, 3]);
    let err = Tensor::cat(&[&a, &bad], 0).unwrap_err().to_string();
    assert!(
        err.contains("Sizes of tensors must match except in dimension 0"),
        "{err}"
    );
    assert!(err.contains("[[2, 2], [1, 3]]"), "{err}");
    let err = Tensor::cat(&[&a, &f], 0).unwrap_err().to_string();
    assert!(err.contains("same number of dimensions"), "{err}");
    assert!(Tensor::cat(&[], 0).is_err());
    assert!(Tensor::cat(&[&Tensor::scalar(1.0f32)], 0).is_err());
    assert!(Tensor::cat(&[&a], 2).is_err());
}

#[test]
fn cat_gradients() {
    // cat of float32 (2,) and float64 (3,) -> float64; each grad keeps its dtype
    let x = leaf(&[1.0, 2.0], &[2]);
    let y = Tensor::from_slice(&[3.0f64, 4.0, 5.0], &[3])
        .unwrap()
        .requires_grad_(true)
        .unwrap();
    let c = Tensor::cat(&[&x, &y], 0).unwrap();
    // torch.cat([x, y]).grad_fn -> <CatBackward0>
    assert_eq!(c.grad_fn_name().as_deref(), Some("CatBackward0"));
    let w = Tensor::from_slice(&[1.0f64, 2.0, 3.0, 4.0, 5.0], &[5]).unwrap();
    c.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().dtype(), DType::F32);
    assert_eq!(grad_of(&x), vec![1.0, 2.0]);
    assert_eq!(y.grad().unwrap().to_vec::<f64>(), vec![3.0, 4.0, 5.0]);

    // along dim 1 with a skipped empty tensor that requires grad
    let a = leaf(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let b = leaf(&[5.0, 6.0], &[2, 1]);
    let e = leaf(&[], &[0]);
    let c = Tensor::cat(&[&a, &e, &b], 1).unwrap();
    assert_eq!(vals(&c), vec![1.0, 2.0, 5.0, 3.0, 4.0, 6.0]);
    let w = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 3]);
    c.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(grad_of(&a), vec![1.0, 2.0, 4.0, 5.0]);
    assert_eq!(grad_of(&b), vec![3.0, 6.0]);
    assert_eq!(e.grad().unwrap().shape(), vec![0]);
}

#[test]
fn stack_values_and_gradients() {
    let x = leaf(&[1.0, 2.0], &[2]);
    let y = leaf(&[3.0, 4.0], &[2]);
    // torch.stack([x, y], 1) -> [[1, 3], [2, 4]]
    let s = Tensor::stack(&[&x, &y], 1).unwrap();
    assert_eq!(s.shape(), vec![2, 2]);
    assert_eq!(vals(&s), vec![1.0, 3.0, 2.0, 4.0]);
    // .grad_fn -> <StackBackward0>
    assert_eq!(s.grad_fn_name().as_deref(), Some("StackBackward0"));
    let w = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    s.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![1.0, 3.0]);
    assert_eq!(grad_of(&y), vec![2.0, 4.0]);
    // torch.stack([a, a.t()]) of non-contiguous (2, 2) inputs, dim -1 -> shape (2, 2, 2)
    let a = f32s(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let st = Tensor::stack(&[&a, &a.t().unwrap()], -1).unwrap();
    assert_eq!(st.shape(), vec![2, 2, 2]);
    assert_eq!(vals(&st), vec![1.0, 1.0, 2.0, 3.0, 3.0, 2.0, 4.0, 4.0]);
    // promotion
    let d = Tensor::from_slice(&[1.0f64, 1.0], &[2]).unwrap();
    assert_eq!(
        Tensor::stack(&[&x.detach(), &d], 0).unwrap().dtype(),
        DType::F64
    );
    let err = Tensor::stack(&[&a, &x], 0).unwrap_err().to_string();
    assert!(err.contains("equal size"), "{err}");
    assert!(Tensor::stack(&[], 0).is_err());
    assert!(Tensor::stack(&[&a], 3).is_err());
}

#[test]
fn index_select_values_and_gradients() {
    let idx = Tensor::from_slice(&[0i64, 2, 0], &[3]).unwrap();
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0], &[4, 2]);
    // x.index_select(0, [0, 2, 0]) -> rows 0, 2, 0 (a copy)
    let y = x.index_select(0, &idx).unwrap();
    assert_eq!(y.shape(), vec![3, 2]);
    assert_eq!(vals(&y), vec![1.0, 2.0, 5.0, 6.0, 1.0, 2.0]);
    assert!(!y.shares_storage(&x));
    assert!(y.is_contiguous());
    // .grad_fn -> <IndexSelectBackward0>
    assert_eq!(y.grad_fn_name().as_deref(), Some("IndexSelectBackward0"));
    let w = f32s(&[1.0, 2.0, 10.0, 20.0, 100.0, 200.0], &[3, 2]);
    y.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    // repeated index 0 accumulates rows 0 and 2 of w
    assert_eq!(
        grad_of(&x),
        vec![101.0, 202.0, 0.0, 0.0, 10.0, 20.0, 0.0, 0.0]
    );
    // along dim 1 of a non-contiguous input
    let x = leaf(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
    let xt = x.t().unwrap(); // [[1, 3, 5], [2, 4, 6]]
    let i2 = Tensor::from_slice(&[2i64, 1, 2], &[3]).unwrap();
    let y = xt.index_select(1, &i2).unwrap();
    assert_eq!(vals(&y), vec![5.0, 3.0, 5.0, 6.0, 4.0, 6.0]);
    y.sum().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![0.0, 0.0, 1.0, 1.0, 2.0, 2.0]);
    // integer tensors and a 0-d index
    let ints = Tensor::from_slice(&[10i64, 20, 30], &[3]).unwrap();
    let one = Tensor::scalar(1i64);
    let r = ints.index_select(0, &one).unwrap();
    assert_eq!(r.shape(), vec![1]);
    assert_eq!(r.to_vec::<i64>(), vec![20]);
    // errors: out of range, negative, non-int64 index, 2-d index
    assert!(ints.index_select(0, &Tensor::scalar(3i64)).is_err());
    assert!(ints.index_select(0, &Tensor::scalar(-1i64)).is_err());
    assert!(ints.index_select(0, &f32s(&[0.0], &[1])).is_err());
    let i2d = Tensor::from_slice(&[0i64, 1], &[1, 2]).unwrap();
    assert!(ints.index_select(0, &i2d).is_err());
}

#[test]
fn index_add_values_and_gradients() {
    let x = leaf(&[0.0; 6], &[3, 2]);
    let src = leaf(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    let idx = Tensor::from_slice(&[2i64, 2], &[2]).unwrap();
    // x.index_add(0, [2, 2], src): both source rows land in row 2
    let y = x.index_add(0, &idx, &src).unwrap();
    assert_eq!(vals(&y), vec![0.0, 0.0, 0.0, 0.0, 4.0, 6.0]);
    assert_eq!(y.grad_fn_name().as_deref(), Some("IndexAddBackward0"));
    let w = f32s(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[3, 2]);
    y.mul(&w).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(grad_of(&x), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(grad_of(&src), vec![5.0, 6.0, 5.0, 6.0]);
    let d = Tensor::zeros(&[2, 2], DType::F64);
    assert!(x.detach().index_add(0, &idx, &d).is_err());
}

// ------------------------------------------------------------------ misc

#[test]
fn to_device_and_is_same_size() {
    let a = base();
    assert!(a
        .to_device(kiln_frontend::Device::Cpu)
        .unwrap()
        .same_object(&a));
    assert!(a.is_same_size(&Tensor::zeros(&[2, 3, 4], DType::I64)));
    assert!(!a.is_same_size(&a.transpose(0, 2).unwrap()));
}

#[test]
fn empty_views_are_contiguous_like_pytorch() {
    // torch.zeros(4, 3)[4:][:, 2:].flatten(): numel 0, is_contiguous() True
    let z = Tensor::zeros(&[4, 3], DType::F32);
    let e = z
        .slice(0, Some(4), None, 1)
        .unwrap()
        .slice(1, Some(2), None, 1)
        .unwrap();
    assert!(e.is_contiguous());
    assert_eq!(e.storage_offset(), 14);
    let f = e.flatten(0, -1).unwrap();
    assert_eq!(f.shape(), vec![0]);
    assert_eq!(f.to_vec::<f32>(), Vec::<f32>::new());
    assert_eq!(f.contiguous().unwrap().numel(), 0);
}

#[test]
fn display_of_views() {
    let x = leaf(&[1.0, 2.0, 3.0, 4.0], &[2, 2]);
    // torch.tensor([[1., 2.], [3., 4.]], requires_grad=True)[:, 1]
    assert_eq!(
        x.select(1, 1).unwrap().to_string(),
        "tensor([2., 4.], grad_fn=<SelectBackward0>)"
    );
    // .t()
    assert_eq!(
        x.t().unwrap().to_string(),
        "tensor([[1., 3.],\n        [2., 4.]], grad_fn=<TBackward0>)"
    );
}
