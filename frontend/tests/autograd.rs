//! Autograd semantics against PyTorch: requires_grad propagation, is_leaf,
//! grad_fn names and next_functions, `.grad` of leaves and non-leaves,
//! retain_grad, tensor hooks (replacement, order, removal), accumulation
//! over several backward calls, retain_graph, `no_grad`, `detach`, and
//! `autograd::grad` (allow_unused, `.grad` untouched). The examples are
//! those of the design notes (shared/seeds, notes 002); each test quotes
//! the PyTorch code and its output.

// `&[x.clone()]` reads better than `std::slice::from_ref(&x)` in tests.
#![allow(clippy::cloned_ref_to_slice_refs)]

use kiln_frontend::autograd::{self, Node};
use kiln_frontend::{no_grad, DType, Tensor};
use std::sync::{Arc, Mutex};

fn t64(v: &[f64]) -> Tensor {
    Tensor::from_slice(v, &[v.len()]).unwrap()
}

fn leaf64(v: &[f64]) -> Tensor {
    t64(v).requires_grad_(true).unwrap()
}

fn vals(t: &Option<Tensor>) -> Vec<f64> {
    t.as_ref().expect("gradient present").to_vec::<f64>()
}

fn names(n: &Arc<Node>) -> Vec<Option<String>> {
    n.next_functions()
        .iter()
        .map(|e| e.as_ref().map(|(n, _)| n.name().to_string()))
        .collect()
}

/// Note 002, first example:
/// ```python
/// w = torch.tensor([1.], requires_grad=True)
/// x = torch.tensor([2.], requires_grad=True)
/// a = torch.add(w, x); b = torch.add(w, 1); y = torch.mul(a, b)
/// y.backward()
/// print(w.grad)                                  # tensor([5.])
/// print(w.is_leaf, x.is_leaf, a.is_leaf, b.is_leaf, y.is_leaf)
/// # True True False False False
/// print(w.grad, x.grad, a.grad, b.grad, y.grad)
/// # tensor([5.]) tensor([2.]) None None None
/// ```
#[test]
fn leaves_non_leaves_and_their_grads() {
    let w = Tensor::from_vec(vec![1.0f32], &[1])
        .unwrap()
        .requires_grad_(true)
        .unwrap();
    let x = Tensor::from_vec(vec![2.0f32], &[1])
        .unwrap()
        .requires_grad_(true)
        .unwrap();
    let a = w.add(&x).unwrap();
    let b = w.add_scalar(1.0).unwrap();
    let y = a.mul(&b).unwrap();
    y.backward().unwrap();
    assert_eq!(w.grad().unwrap().to_vec::<f32>(), vec![5.0]);
    assert_eq!(x.grad().unwrap().to_vec::<f32>(), vec![2.0]);
    assert_eq!(
        [
            w.is_leaf(),
            x.is_leaf(),
            a.is_leaf(),
            b.is_leaf(),
            y.is_leaf()
        ],
        [true, true, false, false, false]
    );
    assert!(a.grad().is_none() && b.grad().is_none() && y.grad().is_none());
    assert!(a.requires_grad() && b.requires_grad() && y.requires_grad());
    assert_eq!(y.grad_fn_name().as_deref(), Some("MulBackward0"));
    // the gradient of a leaf is itself a leaf without grad
    let g = w.grad().unwrap();
    assert!(g.is_leaf() && !g.requires_grad() && g.grad_fn().is_none());
}

/// ```python
/// x = torch.ones(2, 2, requires_grad=True)
/// print(x.grad_fn)            # None
/// y = x + 2
/// print(y.grad_fn)            # <AddBackward0 object at ...>
/// ```
#[test]
fn grad_fn_of_created_and_computed_tensors() {
    let x = Tensor::ones(&[2, 2], DType::F32)
        .requires_grad_(true)
        .unwrap();
    assert!(x.grad_fn().is_none() && x.is_leaf());
    let y = &x + 2.0;
    assert_eq!(y.grad_fn_name().as_deref(), Some("AddBackward0"));
    assert!(!y.is_leaf());
    assert!(
        format!("{y:?}").ends_with("grad_fn=<AddBackward0>)"),
        "{y:?}"
    );
}

/// ```python
/// a = torch.tensor([1.0]); print(a.is_leaf)      # True
/// b = a + 1;  print(b.is_leaf, b.requires_grad)  # True False
/// ```
#[test]
fn results_of_ops_without_grad_are_leaves() {
    let a = Tensor::from_vec(vec![1.0f32], &[1]).unwrap();
    assert!(a.is_leaf());
    let b = a.add_scalar(1.0).unwrap();
    assert!(b.is_leaf() && !b.requires_grad() && b.grad_fn().is_none());
    let c = a.mul(&b).unwrap().exp().unwrap().sum().unwrap();
    assert!(c.is_leaf() && !c.requires_grad());
    // backward on it is an error
    // c.backward()  -> RuntimeError: element 0 of tensors does not require grad and does not have a grad_fn
    let err = c.backward().unwrap_err().to_string();
    assert!(
        err.contains("does not require grad and does not have a grad_fn"),
        "{err}"
    );
    // one input requiring grad is enough
    let w = Tensor::ones(&[1], DType::F32).requires_grad_(true).unwrap();
    let d = a.mul(&w).unwrap();
    assert!(d.requires_grad() && !d.is_leaf());
}

/// ```python
/// x = torch.ones(3, requires_grad=True)
/// z = (x * 2 + 1).sum()
/// z.grad_fn                                   # <SumBackward0>
/// z.grad_fn.next_functions                    # ((<AddBackward0>, 0),)
/// z.grad_fn.next_functions[0][0].next_functions
/// # ((<MulBackward0>, 0), (None, 0))
/// mul = z.grad_fn.next_functions[0][0].next_functions[0][0]
/// mul.next_functions                          # ((<AccumulateGrad>, 0), (None, 0))
/// mul.next_functions[0][0].variable is x      # True
/// ```
#[test]
fn grad_fn_graph_of_a_composed_expression() {
    let x = Tensor::ones(&[3], DType::F32).requires_grad_(true).unwrap();
    let z = x
        .mul_scalar(2.0)
        .unwrap()
        .add_scalar(1.0)
        .unwrap()
        .sum()
        .unwrap();
    let sum = z.grad_fn().unwrap();
    assert_eq!(sum.name(), "SumBackward0");
    assert_eq!(names(&sum), vec![Some("AddBackward0".to_string())]);
    let add = sum.next_functions()[0].clone().unwrap().0;
    assert_eq!(names(&add), vec![Some("MulBackward0".to_string()), None]);
    let mul = add.next_functions()[0].clone().unwrap().0;
    assert_eq!(names(&mul), vec![Some("AccumulateGrad".to_string()), None]);
    let acc = mul.next_functions()[0].clone().unwrap().0;
    assert!(acc.variable().unwrap().same_object(&x));
    // the same AccumulateGrad node is reused while it is alive
    let y = x.sub_scalar(1.0).unwrap();
    let acc2 = y.grad_fn().unwrap().next_functions()[0].clone().unwrap().0;
    assert!(Arc::ptr_eq(&acc, &acc2));

    // More names, as PyTorch 2.x prints them:
    // x = torch.ones(2, 3, requires_grad=True)
    // (x / 2).grad_fn -> DivBackward0        (x - 1).grad_fn -> SubBackward0
    // (1 - x).grad_fn -> RsubBackward1       (x ** 2).grad_fn -> PowBackward0
    // x.exp() -> ExpBackward0  x.view(6) -> ViewBackward0  x.t() -> TBackward0
    // x.permute(1, 0) -> PermuteBackward0    x.transpose(0, 1) -> TransposeBackward0
    // x.expand(4, 2, 3) -> ExpandBackward0   x.unsqueeze(0) -> UnsqueezeBackward0
    // x.sum(1) -> SumBackward1  x.mean() -> MeanBackward0  x.mean(0) -> MeanBackward1
    // x.var(1) -> VarBackward0  x.std(1) -> StdBackward0  x.prod() -> ProdBackward0
    // x.max(1)[0] -> MaxBackward0  x.max() -> MaxBackward1  x.amax(1) -> AmaxBackward0
    // x.softmax(1) -> SoftmaxBackward0  x.log_softmax(1) -> LogSoftmaxBackward0
    // x.clone() -> CloneBackward0  x.t().reshape(6) -> UnsafeViewBackward0
    // torch.where(x > 0, x, 0.) -> WhereBackward0
    let x = Tensor::ones(&[2, 3], DType::F32)
        .requires_grad_(true)
        .unwrap();
    let cases: Vec<(Tensor, &str)> = vec![
        (x.div_scalar(2.0).unwrap(), "DivBackward0"),
        (x.sub_scalar(1.0).unwrap(), "SubBackward0"),
        (x.rsub_scalar(1.0).unwrap(), "RsubBackward1"),
        (x.pow_scalar(2.0).unwrap(), "PowBackward0"),
        (x.exp().unwrap(), "ExpBackward0"),
        (x.view(&[6]).unwrap(), "ViewBackward0"),
        (x.t().unwrap(), "TBackward0"),
        (x.permute(&[1, 0]).unwrap(), "PermuteBackward0"),
        (x.transpose(0, 1).unwrap(), "TransposeBackward0"),
        (x.expand(&[4, 2, 3]).unwrap(), "ExpandBackward0"),
        (x.unsqueeze(0).unwrap(), "UnsqueezeBackward0"),
        (x.sum_dims(&[1], false).unwrap(), "SumBackward1"),
        (x.mean().unwrap(), "MeanBackward0"),
        (x.mean_dims(&[0], false).unwrap(), "MeanBackward1"),
        (x.var_dims(&[1], 1, false).unwrap(), "VarBackward0"),
        (x.std_dims(&[1], 1, false).unwrap(), "StdBackward0"),
        (x.prod().unwrap(), "ProdBackward0"),
        (x.prod_dim(1, false).unwrap(), "ProdBackward1"),
        (x.max_dim(1, false).unwrap().0, "MaxBackward0"),
        (x.min_dim(1, false).unwrap().0, "MinBackward0"),
        (x.max().unwrap(), "MaxBackward1"),
        (x.min().unwrap(), "MinBackward1"),
        (x.amax(&[1], false).unwrap(), "AmaxBackward0"),
        (x.softmax(1).unwrap(), "SoftmaxBackward0"),
        (x.log_softmax(1).unwrap(), "LogSoftmaxBackward0"),
        (x.clone_tensor().unwrap(), "CloneBackward0"),
        (x.t().unwrap().reshape(&[6]).unwrap(), "UnsafeViewBackward0"),
        (
            Tensor::where_(&x.gt_scalar(0.0).unwrap(), &x, &Tensor::scalar(0.0f32)).unwrap(),
            "WhereBackward0",
        ),
    ];
    for (t, name) in cases {
        assert_eq!(t.grad_fn_name().as_deref(), Some(name));
    }
    // indices of max(dim) carry no gradient
    let (_, idx) = x.max_dim(1, false).unwrap();
    assert!(!idx.requires_grad() && idx.grad_fn().is_none());
    assert!(!x.argmax(None, false).unwrap().requires_grad());
}

/// Note 002, the hook / retain_grad / autograd.grad example (PyTorch 2.x):
/// ```python
/// x = torch.tensor([2], dtype=float, requires_grad=True)
/// y = torch.tensor([6], dtype=float, requires_grad=True)
/// y_ = y / 2
/// z = x ** 2 + y_ * 2
/// z.backward(retain_graph=True)
/// print(x.grad, y.grad, y_.grad, z.grad)       # [4.] [1.] None None
/// print(torch.autograd.grad(z, [x, y, y_], retain_graph=True))
/// # (tensor([4.]), tensor([1.]), tensor([2.]))
/// y_.retain_grad()
/// z.backward(retain_graph=True)
/// print(x.grad, y.grad, y_.grad, z.grad)       # [8.] [2.] [2.] None
/// x.grad.zero_()
/// z.backward(retain_graph=True)
/// print(x.grad, y.grad, y_.grad, z.grad)       # [4.] [3.] [4.] None
/// h1 = y_.register_hook(lambda grad: print(grad))
/// h2 = y_.register_hook(lambda grad: 2*grad)
/// z.backward()
/// # tensor([2.])                      (h1 sees the gradient before h2)
/// print(y.grad, y_.grad)              # [5.] [8.]
/// h1.remove(); h2.remove()
/// ```
/// The notes show `y_.grad == 6`: that was PyTorch 1.x, where retain_grad
/// was an ordinary hook run in registration order (before h2). Since 2.0
/// the retain_grad hook always runs after the other tensor hooks, so y_.grad
/// accumulates the doubled gradient: 4 + 4 = 8.
#[test]
fn notes_hook_retain_grad_and_autograd_grad_example() {
    let x = leaf64(&[2.0]);
    let y = leaf64(&[6.0]);
    let y_ = y.div_scalar(2.0).unwrap();
    let z = x
        .pow_scalar(2.0)
        .unwrap()
        .add(&y_.mul_scalar(2.0).unwrap())
        .unwrap();
    assert_eq!(z.grad_fn_name().as_deref(), Some("AddBackward0"));

    z.backward_with(None, true).unwrap();
    assert_eq!(vals(&x.grad()), vec![4.0]);
    assert_eq!(vals(&y.grad()), vec![1.0]);
    assert!(y_.grad().is_none() && z.grad().is_none());

    let g = autograd::grad(
        &[z.clone()],
        &[x.clone(), y.clone(), y_.clone()],
        None,
        true,
        false,
        false,
    )
    .unwrap();
    assert_eq!(vals(&g[0]), vec![4.0]);
    assert_eq!(vals(&g[1]), vec![1.0]);
    assert_eq!(vals(&g[2]), vec![2.0]);
    // autograd.grad does not touch .grad
    assert_eq!(vals(&x.grad()), vec![4.0]);
    assert_eq!(vals(&y.grad()), vec![1.0]);
    assert!(y_.grad().is_none());

    y_.retain_grad().unwrap();
    assert!(y_.retains_grad());
    z.backward_with(None, true).unwrap();
    assert_eq!(vals(&x.grad()), vec![8.0]);
    assert_eq!(vals(&y.grad()), vec![2.0]);
    assert_eq!(vals(&y_.grad()), vec![2.0]);
    assert!(z.grad().is_none());

    no_grad(|| x.grad().unwrap().zero_().map(|_| ())).unwrap();
    z.backward_with(None, true).unwrap();
    assert_eq!(vals(&x.grad()), vec![4.0]);
    assert_eq!(vals(&y.grad()), vec![3.0]);
    assert_eq!(vals(&y_.grad()), vec![4.0]);

    let seen: Arc<Mutex<Vec<f64>>> = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut h1 = y_
        .register_hook(move |g| {
            s.lock().unwrap().push(g.item().unwrap());
            None
        })
        .unwrap();
    let mut h2 = y_
        .register_hook(|g| Some(g.mul_scalar(2.0).unwrap()))
        .unwrap();
    z.backward_with(None, true).unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![2.0]);
    assert_eq!(vals(&y.grad()), vec![5.0]);
    assert_eq!(vals(&y_.grad()), vec![8.0]);

    h1.remove();
    h2.remove();
    h1.remove(); // removing twice is harmless
                 // hooks gone: y.grad += 1, y_.grad += 2, the print hook is not called
    z.backward().unwrap();
    assert_eq!(vals(&y.grad()), vec![6.0]);
    assert_eq!(vals(&y_.grad()), vec![10.0]);
    assert_eq!(seen.lock().unwrap().len(), 1);
}

/// Several hooks run in registration order, each seeing the previous one's
/// result; a non-leaf's hooks run when its gradient is complete, before it
/// flows on; a leaf's hooks run before accumulation into `.grad`.
/// ```python
/// x = torch.tensor([1., 2.], requires_grad=True)
/// y = x * 3
/// log = []
/// y.register_hook(lambda g: log.append('y1') or g + 1)
/// y.register_hook(lambda g: log.append('y2') or g * 10)
/// x.register_hook(lambda g: log.append('x') or g / 2)
/// y.sum().backward()
/// log                      # ['y1', 'y2', 'x']
/// x.grad                   # ((1 + 1) * 10 * 3) / 2 = tensor([30., 30.])
/// ```
#[test]
fn several_hooks_on_leaf_and_non_leaf_in_order() {
    let x = leaf64(&[1.0, 2.0]);
    let y = x.mul_scalar(3.0).unwrap();
    let log: Arc<Mutex<Vec<&'static str>>> = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    y.register_hook(move |g| {
        l.lock().unwrap().push("y1");
        Some(g.add_scalar(1.0).unwrap())
    })
    .unwrap();
    let l = log.clone();
    y.register_hook(move |g| {
        l.lock().unwrap().push("y2");
        Some(g.mul_scalar(10.0).unwrap())
    })
    .unwrap();
    let l = log.clone();
    x.register_hook(move |g| {
        l.lock().unwrap().push("x");
        Some(g.div_scalar(2.0).unwrap())
    })
    .unwrap();
    y.sum().unwrap().backward().unwrap();
    assert_eq!(*log.lock().unwrap(), vec!["y1", "y2", "x"]);
    assert_eq!(vals(&x.grad()), vec![30.0, 30.0]);

    // Reversed registration order gives (g * 10 + 1) * 3 / 2 = 16.5
    let x = leaf64(&[1.0, 2.0]);
    let y = x.mul_scalar(3.0).unwrap();
    y.register_hook(|g| Some(g.mul_scalar(10.0).unwrap()))
        .unwrap();
    y.register_hook(|g| Some(g.add_scalar(1.0).unwrap()))
        .unwrap();
    x.register_hook(|g| Some(g.div_scalar(2.0).unwrap()))
        .unwrap();
    y.sum().unwrap().backward().unwrap();
    assert_eq!(vals(&x.grad()), vec![16.5, 16.5]);
}

/// A hook that returns None only observes; a leaf hook's replacement is
/// what accumulates, and the hook sees the incoming gradient, not `.grad`.
/// ```python
/// x = torch.tensor([1., 2.], requires_grad=True)
/// seen = []
/// h = x.register_hook(lambda g: seen.append(g.clone()))
/// (x * x).sum().backward()
/// (x * x).sum().backward()
/// seen    # [tensor([2., 4.]), tensor([2., 4.])]   x.grad: tensor([4., 8.])
/// h.remove()
/// (x * 2).sum().backward(); x.grad            # tensor([6., 10.]), seen unchanged
/// ```
#[test]
fn leaf_hook_observes_each_incoming_gradient_and_can_be_removed() {
    let x = leaf64(&[1.0, 2.0]);
    let seen: Arc<Mutex<Vec<Vec<f64>>>> = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let mut h = x
        .register_hook(move |g| {
            s.lock().unwrap().push(g.to_vec::<f64>());
            None
        })
        .unwrap();
    x.mul(&x).unwrap().sum().unwrap().backward().unwrap();
    x.mul(&x).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(*seen.lock().unwrap(), vec![vec![2.0, 4.0], vec![2.0, 4.0]]);
    assert_eq!(vals(&x.grad()), vec![4.0, 8.0]);
    h.remove();
    x.mul_scalar(2.0)
        .unwrap()
        .sum()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(vals(&x.grad()), vec![6.0, 10.0]);
    assert_eq!(seen.lock().unwrap().len(), 2);
}

/// ```python
/// x = torch.tensor([1., 2.])
/// x.register_hook(lambda g: g)   # RuntimeError: cannot register a hook on a
///                                # tensor that doesn't require gradient
/// x.retain_grad()                # RuntimeError: can't retain_grad on Tensor
///                                # that has requires_grad=False
/// ```
#[test]
fn hooks_and_retain_grad_need_requires_grad() {
    let x = t64(&[1.0, 2.0]);
    let err = x.register_hook(|_| None).unwrap_err().to_string();
    assert!(
        err.contains("cannot register a hook on a tensor that doesn't require gradient"),
        "{err}"
    );
    let err = x.retain_grad().unwrap_err().to_string();
    assert!(
        err.contains("can't retain_grad on Tensor that has requires_grad=False"),
        "{err}"
    );
    // retain_grad on a leaf is a no-op (a leaf keeps its grad anyway)
    let w = leaf64(&[1.0]);
    w.retain_grad().unwrap();
    w.mul_scalar(3.0)
        .unwrap()
        .sum()
        .unwrap()
        .backward()
        .unwrap();
    assert_eq!(vals(&w.grad()), vec![3.0]);
}

/// ```python
/// x = torch.tensor([1., 2., 3.], requires_grad=True)
/// h = x * 2; y = h.exp().sum()
/// y.backward()
/// h.grad                      # None (UserWarning: .grad of a non-leaf)
/// h = x * 2; h.retain_grad(); y = h.exp().sum(); y.backward()
/// h.grad                      # tensor([e^2, e^4, e^6])
/// h.is_leaf, h.retains_grad   # False True
/// ```
#[test]
fn retain_grad_on_a_non_leaf() {
    let x = leaf64(&[1.0, 2.0, 3.0]);
    let h = x.mul_scalar(2.0).unwrap();
    h.exp().unwrap().sum().unwrap().backward().unwrap();
    assert!(h.grad().is_none() && !h.retains_grad());

    let h = x.mul_scalar(2.0).unwrap();
    h.retain_grad().unwrap();
    h.exp().unwrap().sum().unwrap().backward().unwrap();
    let want: Vec<f64> = [2.0f64, 4.0, 6.0].iter().map(|v| v.exp()).collect();
    assert_eq!(vals(&h.grad()), want);
    assert!(!h.is_leaf() && h.retains_grad());
    // x.grad accumulated both passes: 2 e^(2x) twice
    let gx: Vec<f64> = want.iter().map(|v| 4.0 * v).collect();
    assert_eq!(vals(&x.grad()), gx);
}

/// ```python
/// x = torch.tensor([1., 2.], requires_grad=True)
/// y = (x * x).sum()
/// y.backward(retain_graph=True)
/// y.backward()
/// x.grad                        # tensor([4., 8.])  (2x accumulated twice)
/// y.backward()
/// # RuntimeError: Trying to backward through the graph a second time (or
/// # directly access saved tensors after they have already been freed). ...
/// # Specify retain_graph=True if you need to backward through the graph a
/// # second time ...
/// ```
#[test]
fn accumulation_and_backward_twice() {
    let x = leaf64(&[1.0, 2.0]);
    let y = x.mul(&x).unwrap().sum().unwrap();
    y.backward_with(None, true).unwrap();
    assert_eq!(vals(&x.grad()), vec![2.0, 4.0]);
    y.backward().unwrap();
    assert_eq!(vals(&x.grad()), vec![4.0, 8.0]);
    let err = y.backward().unwrap_err().to_string();
    assert!(
        err.contains("Trying to backward through the graph a second time")
            && err.contains("retain_graph=True"),
        "{err}"
    );
    // .grad was not changed by the failed call
    assert_eq!(vals(&x.grad()), vec![4.0, 8.0]);

    // backward_with an explicit gradient and retain_graph, as the brief's
    // `y.backward(g, retain_graph=True)`: grads add up
    let x = leaf64(&[1.0, 2.0, 3.0]);
    let y = x.mul_scalar(2.0).unwrap();
    let g = t64(&[1.0, 0.1, 0.01]);
    y.backward_with(Some(&g), true).unwrap();
    y.backward_with(Some(&g), false).unwrap();
    assert_eq!(vals(&x.grad()), vec![4.0, 0.4, 0.04]);

    // zeroing between passes (set_to_none) restarts accumulation
    x.set_grad(None);
    let y = x.mul_scalar(5.0).unwrap().sum().unwrap();
    y.backward().unwrap();
    assert_eq!(vals(&x.grad()), vec![5.0, 5.0, 5.0]);
}

/// A tensor reached along two paths accumulates inside one backward:
/// ```python
/// x = torch.tensor([3.], requires_grad=True)
/// a = x * 2; b = x * x; c = a * b          # c = 2 x^3
/// c.backward(); x.grad                      # 6 x^2 = tensor([54.])
/// ```
#[test]
fn gradients_accumulate_over_several_paths() {
    let x = leaf64(&[3.0]);
    let a = x.mul_scalar(2.0).unwrap();
    let b = x.mul(&x).unwrap();
    let c = a.mul(&b).unwrap();
    c.backward().unwrap();
    assert_eq!(vals(&x.grad()), vec![54.0]);
}

/// ```python
/// x = torch.ones(2, 3, requires_grad=True)
/// y = x * 2
/// y.backward()
/// # RuntimeError: grad can be implicitly created only for scalar outputs
/// y.backward(torch.ones(3))
/// # RuntimeError: Mismatch in shape: grad_output[0] has a shape of
/// # torch.Size([3]) and output[0] has a shape of torch.Size([2, 3]).
/// ```
#[test]
fn backward_of_non_scalar_needs_a_gradient() {
    let x = Tensor::ones(&[2, 3], DType::F64)
        .requires_grad_(true)
        .unwrap();
    let y = x.mul_scalar(2.0).unwrap();
    let err = y.backward().unwrap_err().to_string();
    assert!(
        err.contains("grad can be implicitly created only for scalar outputs"),
        "{err}"
    );
    let err = y
        .backward_with(Some(&Tensor::ones(&[3], DType::F64)), false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Mismatch in shape") && err.contains("[3]") && err.contains("[2, 3]"),
        "{err}"
    );
    // a one-element non-0-d output is fine: torch.ones(1, 1) * x.sum()
    let s = x.sum_dims(&[0, 1], true).unwrap();
    assert_eq!(s.shape(), vec![1, 1]);
    s.backward().unwrap();
    assert_eq!(vals(&x.grad()), vec![1.0; 6]);
    // autograd.grad has the same rule
    let err = autograd::grad(&[y.clone()], &[x.clone()], None, false, false, false)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("grad can be implicitly created only for scalar outputs"),
        "{err}"
    );
}

/// ```python
/// x = torch.ones(3, requires_grad=True)
/// with torch.no_grad():
///     y = x * 2
/// y.requires_grad, y.grad_fn, y.is_leaf       # False None True
/// z = x * 2;  z.requires_grad                  # True (mode restored)
/// torch.set_grad_enabled(False); (x + 1).requires_grad   # False
/// ```
#[test]
fn no_grad_results_do_not_require_grad() {
    let x = Tensor::ones(&[3], DType::F32).requires_grad_(true).unwrap();
    let y = no_grad(|| x.mul_scalar(2.0).unwrap());
    assert!(!y.requires_grad() && y.grad_fn().is_none() && y.is_leaf());
    let y2 = no_grad(|| x.softmax(0).unwrap().max_dim(0, false).unwrap().0);
    assert!(!y2.requires_grad());
    let z = x.mul_scalar(2.0).unwrap();
    assert!(z.requires_grad());
    assert!(kiln_frontend::is_grad_enabled());
    {
        let _g = kiln_frontend::NoGradGuard::new();
        assert!(!x.add_scalar(1.0).unwrap().requires_grad());
        // nested no_grad keeps it off, and leaving the inner scope keeps it off
        no_grad(|| assert!(!kiln_frontend::is_grad_enabled()));
        assert!(!kiln_frontend::is_grad_enabled());
    }
    let prev = kiln_frontend::set_grad_enabled(false);
    assert!(prev);
    assert!(!x.add_scalar(1.0).unwrap().requires_grad());
    kiln_frontend::set_grad_enabled(true);
    assert!(x.add_scalar(1.0).unwrap().requires_grad());
    // a leaf keeps requires_grad inside no_grad
    no_grad(|| assert!(x.requires_grad()));
}

/// ```python
/// x = torch.tensor([1., 2., 3.], requires_grad=True)
/// y = x * 2
/// d = y.detach()
/// d.requires_grad, d.grad_fn, d.is_leaf          # False None True
/// d.untyped_storage().data_ptr() == y.untyped_storage().data_ptr()  # True
/// d[0] = 10.; y                                  # tensor([10., 4., 6.], grad_fn=...)
/// (d * x).sum().backward(); x.grad               # d = tensor([10., 4., 6.])
/// ```
#[test]
fn detach_shares_storage_and_cuts_the_graph() {
    let x = leaf64(&[1.0, 2.0, 3.0]);
    let y = x.mul_scalar(2.0).unwrap();
    let d = y.detach();
    assert!(!d.requires_grad() && d.grad_fn().is_none() && d.is_leaf());
    assert!(d.shares_storage(&y) && !d.same_object(&y));
    let v0 = y.version();
    // d[0] = 10. (written through a view of d into the shared storage)
    d.view(&[-1])
        .unwrap()
        .copy_(&t64(&[10.0, 4.0, 6.0]))
        .unwrap();
    assert_eq!(y.to_vec::<f64>(), vec![10.0, 4.0, 6.0]);
    assert!(y.version() > v0); // the version counter is shared
    d.mul(&x).unwrap().sum().unwrap().backward().unwrap();
    assert_eq!(vals(&x.grad()), vec![10.0, 4.0, 6.0]);
    // y still has its graph
    assert_eq!(y.grad_fn_name().as_deref(), Some("MulBackward0"));
    // requires_grad_ on a detached tensor makes a new leaf
    let e = y.detach().requires_grad_(true).unwrap();
    assert!(e.is_leaf() && e.requires_grad());
    e.sum().unwrap().backward().unwrap();
    assert_eq!(vals(&e.grad()), vec![1.0, 1.0, 1.0]);
    assert_eq!(vals(&x.grad()), vec![10.0, 4.0, 6.0]);
}

/// ```python
/// x = torch.tensor([1., 2.], requires_grad=True)
/// w = torch.tensor([3., 4.], requires_grad=True)
/// u = torch.tensor([5.], requires_grad=True)
/// y = (x * w).sum()
/// gx, gw = torch.autograd.grad(y, [x, w])
/// gx, gw                        # tensor([3., 4.]) tensor([1., 2.])
/// x.grad, w.grad, u.grad        # None None None
/// torch.autograd.grad(y, [x, u])
/// # RuntimeError: One of the differentiated Tensors appears to not have been
/// # used in the graph. Set allow_unused=True if this is the desired behavior.
/// torch.autograd.grad(y, [x, u], allow_unused=True)    # (tensor([3., 4.]), None)
/// ```
#[test]
fn autograd_grad_returns_gradients_and_leaves_dot_grad_alone() {
    let x = leaf64(&[1.0, 2.0]);
    let w = leaf64(&[3.0, 4.0]);
    let u = leaf64(&[5.0]);
    let h = x.mul(&w).unwrap();
    h.retain_grad().unwrap();
    let y = h.sum().unwrap();
    let g = autograd::grad(
        &[y.clone()],
        &[x.clone(), w.clone()],
        None,
        true,
        false,
        false,
    )
    .unwrap();
    assert_eq!(vals(&g[0]), vec![3.0, 4.0]);
    assert_eq!(vals(&g[1]), vec![1.0, 2.0]);
    assert!(x.grad().is_none() && w.grad().is_none() && u.grad().is_none());
    // even retained non-leaf grads are untouched
    assert!(h.grad().is_none());
    // returned gradients are plain tensors
    assert!(!g[0].as_ref().unwrap().requires_grad());

    let err = autograd::grad(
        &[y.clone()],
        &[x.clone(), u.clone()],
        None,
        true,
        false,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("appears to not have been used in the graph")
            && err.contains("allow_unused=True"),
        "{err}"
    );
    let g = autograd::grad(
        &[y.clone()],
        &[x.clone(), u.clone()],
        None,
        true,
        false,
        true,
    )
    .unwrap();
    assert_eq!(vals(&g[0]), vec![3.0, 4.0]);
    assert!(g[1].is_none());
    assert!(x.grad().is_none() && u.grad().is_none());

    // with respect to a non-leaf, and with an explicit grad_output
    // torch.autograd.grad(h, [h, x], grad_outputs=torch.tensor([1., 10.]))
    // -> (tensor([1., 10.]), tensor([3., 40.]))
    let go = t64(&[1.0, 10.0]);
    let g = autograd::grad(
        &[h.clone()],
        &[h.clone(), x.clone()],
        Some(&[go]),
        true,
        false,
        false,
    )
    .unwrap();
    assert_eq!(vals(&g[0]), vec![1.0, 10.0]);
    assert_eq!(vals(&g[1]), vec![3.0, 40.0]);

    // several outputs: grad([y, (x*x).sum()], [x]) = w + 2x
    let y2 = x.mul(&x).unwrap().sum().unwrap();
    let g = autograd::grad(&[y.clone(), y2], &[x.clone()], None, true, false, false).unwrap();
    assert_eq!(vals(&g[0]), vec![5.0, 8.0]);

    // an input that does not require grad is an error
    // torch.autograd.grad(y, [torch.ones(2)])
    // RuntimeError: One of the differentiated Tensors does not require grad
    let err = autograd::grad(&[y.clone()], &[t64(&[1.0, 1.0])], None, true, false, true)
        .unwrap_err()
        .to_string();
    assert!(err.contains("does not require grad"), "{err}");
    // without retain_graph the graph is freed afterwards
    autograd::grad(&[y.clone()], &[x.clone()], None, false, false, false).unwrap();
    let err = y.backward().unwrap_err().to_string();
    assert!(
        err.contains("Trying to backward through the graph a second time"),
        "{err}"
    );
}

/// ```python
/// x = torch.tensor([1, 2])        # int64
/// x.requires_grad_()  # RuntimeError: only Tensors of floating point dtype can require gradients
/// w = torch.ones(2, requires_grad=True); y = w * 2
/// y.requires_grad_(False)
/// # RuntimeError: you can only change requires_grad flags of leaf variables. ...
/// ```
#[test]
fn requires_grad_rules() {
    let xi = Tensor::from_vec(vec![1i64, 2], &[2]).unwrap();
    let err = xi.set_requires_grad(true).unwrap_err().to_string();
    assert!(
        err.contains("only Tensors of floating point dtype can require gradients"),
        "{err}"
    );
    let w = Tensor::ones(&[2], DType::F32).requires_grad_(true).unwrap();
    let y = w.mul_scalar(2.0).unwrap();
    let err = y.set_requires_grad(false).unwrap_err().to_string();
    assert!(
        err.contains("you can only change requires_grad flags of leaf variables"),
        "{err}"
    );
    // setting True on a non-leaf is allowed (no-op)
    y.set_requires_grad(true).unwrap();
    // a leaf can be switched off, and then ops on it record nothing
    w.set_requires_grad(false).unwrap();
    assert!(!w.mul_scalar(2.0).unwrap().requires_grad());
}

/// Integer results of differentiable inputs (comparisons, argmax) and the
/// in-place rule for leaves.
/// ```python
/// x = torch.tensor([1., -2.], requires_grad=True)
/// (x > 0).requires_grad          # False
/// x.add_(1)  # RuntimeError: a leaf Variable that requires grad is being used
///            # in an in-place operation.
/// ```
#[test]
fn comparisons_carry_no_grad_and_leaves_refuse_in_place() {
    let x = leaf64(&[1.0, -2.0]);
    let c = x.gt_scalar(0.0).unwrap();
    assert!(!c.requires_grad() && c.grad_fn().is_none() && c.dtype() == DType::Bool);
    let err = x.add_(&t64(&[1.0, 1.0])).unwrap_err().to_string();
    assert!(
        err.contains("a leaf Variable that requires grad is being used in an in-place operation"),
        "{err}"
    );
    no_grad(|| x.add_(&t64(&[1.0, 1.0])).map(|_| ())).unwrap();
    assert_eq!(x.to_vec::<f64>(), vec![2.0, -1.0]);
}

/// Gradient dtype and shape follow the input, through broadcasting and
/// dtype promotion.
/// ```python
/// a = torch.ones(2, 3, requires_grad=True)                      # float32
/// b = torch.ones(3, dtype=torch.float64, requires_grad=True)
/// (a * b).sum().backward()
/// a.grad.dtype, b.grad.dtype, b.grad     # float32 float64 tensor([2., 2., 2.])
/// ```
#[test]
fn gradients_have_the_inputs_shape_and_dtype() {
    let a = Tensor::ones(&[2, 3], DType::F32)
        .requires_grad_(true)
        .unwrap();
    let b = Tensor::ones(&[3], DType::F64).requires_grad_(true).unwrap();
    let p = a.mul(&b).unwrap();
    assert_eq!(p.dtype(), DType::F64);
    p.sum().unwrap().backward().unwrap();
    let (ga, gb) = (a.grad().unwrap(), b.grad().unwrap());
    assert_eq!((ga.dtype(), ga.shape()), (DType::F32, vec![2, 3]));
    assert_eq!((gb.dtype(), gb.shape()), (DType::F64, vec![3]));
    assert_eq!(gb.to_vec::<f64>(), vec![2.0, 2.0, 2.0]);
}

/// Higher-order gradients are refused rather than silently incomplete.
#[test]
fn create_graph_is_an_explicit_error() {
    let x = Tensor::from_vec(vec![1.0f64, 2.0], &[2])
        .unwrap()
        .requires_grad_(true)
        .unwrap();
    let y = x.exp().unwrap().sum().unwrap();
    let err = kiln_frontend::autograd::grad(&[y], &[x.clone()], None, true, true, false)
        .unwrap_err()
        .to_string();
    assert!(err.contains("create_graph"), "{err}");
    assert!(x.grad().is_none());
}
