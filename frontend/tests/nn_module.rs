//! Module behaviour: registry order and de-duplication, lookups and their
//! errors, replacing children (the ReLU -> LeakyReLU example), hooks in
//! `_call_impl`'s order (with replacement and removal, surviving to_dtype),
//! scoped forward errors, state_dict loading that fails cleanly, repr,
//! and optimizer state round trips.

use kiln_frontend::nn::prelude::*;
use kiln_frontend::nn::{init, register_module_forward_pre_hook};
use kiln_frontend::optim::{Adam, AdamOptions, Optimizer, SgdOptions, SGD};
use kiln_frontend::{DType, Error, Result, Tensor};
use parking_lot::Mutex;
use std::sync::Arc;

/// y = x * scale + shift, elementwise over the last dim.
struct Affine {
    core: ModuleCore,
}

impl Affine {
    fn new(n: usize) -> Affine {
        let core = ModuleCore::new("Affine");
        core.register_parameter(
            "scale",
            Some(Parameter::new(Tensor::ones(&[n], DType::F32)).unwrap()),
        )
        .unwrap();
        core.register_parameter(
            "shift",
            Some(Parameter::new(Tensor::zeros(&[n], DType::F32)).unwrap()),
        )
        .unwrap();
        core.register_buffer("count", Some(Tensor::zeros(&[], DType::I64)), true)
            .unwrap();
        core.register_buffer("scratch", Some(Tensor::zeros(&[n], DType::F32)), false)
            .unwrap();
        Affine { core }
    }
}

impl Module for Affine {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.mul(&self.core.param("scale")?)?
            .add(&self.core.param("shift")?)
    }
    fn extra_repr(&self) -> String {
        format!("n={}", self.core.param("scale").unwrap().numel())
    }
}

struct Net {
    core: ModuleCore,
}

impl Net {
    fn new() -> Net {
        let core = ModuleCore::new("Net");
        let shared: Arc<dyn Module> = Arc::new(Affine::new(3));
        core.add_module("a", Some(shared.clone())).unwrap();
        let seq = kiln_frontend::sequential![ReLU::new(), Affine::new(3), ReLU::with_inplace(true)];
        core.add_module("body", Some(Arc::new(seq))).unwrap();
        core.add_module("again", Some(shared)).unwrap();
        core.add_module("none", None).unwrap();
        Net { core }
    }
}

impl Module for Net {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = self.core.child("a")?.call(x)?;
        self.core.child("body")?.call(&y)
    }
}

fn t(v: &[f32]) -> Tensor {
    Tensor::from_slice(v, &[v.len()]).unwrap()
}

#[test]
fn registry_order_and_dedup() {
    let n = Net::new();
    // PyTorch: shared module yielded once under its first name; None skipped.
    let mods: Vec<String> = n.named_modules().into_iter().map(|(k, _)| k).collect();
    assert_eq!(mods, ["", "a", "body", "body.0", "body.1", "body.2"]);
    let with_dups: Vec<String> = n
        .named_modules_with("", false)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        with_dups,
        ["", "a", "body", "body.0", "body.1", "body.2", "again"]
    );
    let params: Vec<String> = n.named_parameters().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        params,
        ["a.scale", "a.shift", "body.1.scale", "body.1.shift"]
    );
    let params_dup: Vec<String> = n
        .named_parameters_with("m", true, false)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        params_dup,
        [
            "m.a.scale",
            "m.a.shift",
            "m.body.1.scale",
            "m.body.1.shift",
            "m.again.scale",
            "m.again.shift"
        ]
    );
    let bufs: Vec<String> = n.named_buffers().into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        bufs,
        ["a.count", "a.scratch", "body.1.count", "body.1.scratch"]
    );
    // state_dict: no dedup, non-persistent buffers left out.
    assert_eq!(
        n.state_dict().keys(),
        [
            "a.scale",
            "a.shift",
            "a.count",
            "body.1.scale",
            "body.1.shift",
            "body.1.count",
            "again.scale",
            "again.shift",
            "again.count"
        ]
    );
    let children: Vec<String> = n.named_children().into_iter().map(|(k, _)| k).collect();
    assert_eq!(children, ["a", "body"]);
    assert!(n.parameters_with(false).is_empty());
    let a = n.get_submodule("a").unwrap();
    assert_eq!(a.parameters_with(false).len(), 2);
}

#[test]
fn repr_matches_pytorch() {
    let n = Net::new();
    let want = "Net(\n  (a): Affine(n=3)\n  (body): Sequential(\n    (0): ReLU()\n    (1): Affine(n=3)\n    (2): ReLU(inplace=True)\n  )\n  (again): Affine(n=3)\n  (none): None\n)";
    assert_eq!(n.to_repr(), want);
    assert_eq!(
        Dropout::new(0.5).unwrap().to_repr(),
        "Dropout(p=0.5, inplace=False)"
    );
    assert_eq!(
        LeakyReLU::new(0.2).to_repr(),
        "LeakyReLU(negative_slope=0.2)"
    );
    assert_eq!(GELU::new().to_repr(), "GELU(approximate='none')");
    assert_eq!(
        GELU::with_approximate("tanh").unwrap().to_repr(),
        "GELU(approximate='tanh')"
    );
    assert_eq!(Flatten::new().to_repr(), "Flatten(start_dim=1, end_dim=-1)");
    assert_eq!(Identity::new().to_repr(), "Identity()");
    assert_eq!(Sigmoid::new().to_repr(), "Sigmoid()");
    assert_eq!(Tanh::new().to_repr(), "Tanh()");
    // ModuleList compresses repeats (PyTorch >= 2.0).
    let l = ModuleList::new(vec![
        Arc::new(ReLU::new()) as Arc<dyn Module>,
        Arc::new(ReLU::new()),
        Arc::new(Tanh::new()),
    ]);
    assert_eq!(
        l.to_repr(),
        "ModuleList(\n  (0-1): 2 x ReLU()\n  (2): Tanh()\n)"
    );
    // Multi-line extra_repr with children.
    struct Multi {
        core: ModuleCore,
    }
    impl Module for Multi {
        fn core(&self) -> &ModuleCore {
            &self.core
        }
        fn forward(&self, x: &Tensor) -> Result<Tensor> {
            Ok(x.clone())
        }
        fn extra_repr(&self) -> String {
            "a=1\nb=2".into()
        }
    }
    let m = Multi {
        core: ModuleCore::new("Multi"),
    };
    assert_eq!(m.to_repr(), "Multi(\n  a=1\n  b=2\n)");
    m.core()
        .add_module(
            "inner",
            Some(Arc::new(Multi {
                core: ModuleCore::new("Multi"),
            })),
        )
        .unwrap();
    assert_eq!(
        m.to_repr(),
        "Multi(\n  a=1\n  b=2\n  (inner): Multi(\n    a=1\n    b=2\n  )\n)"
    );
}

#[test]
fn lookups_and_their_errors() {
    let n = Net::new();
    assert_eq!(n.get_submodule("body.1").unwrap().type_name(), "Affine");
    let e = n.get_submodule("body.7").err().unwrap().to_string();
    assert_eq!(e, "Sequential has no attribute `7`");
    let e = n.get_submodule("layer3").err().unwrap().to_string();
    assert_eq!(e, "Net has no attribute `layer3`");
    assert_eq!(
        n.get_submodule("a.scale").err().unwrap().to_string(),
        "`scale` is not an nn.Module"
    );
    let p = n.get_parameter("body.1.shift").unwrap();
    assert!(p.same_object(
        &n.get_submodule("body.1")
            .unwrap()
            .core()
            .param("shift")
            .unwrap()
    ));
    assert_eq!(
        n.get_parameter("a.count").err().unwrap().to_string(),
        "`count` is not an nn.Parameter"
    );
    assert_eq!(
        n.get_parameter("a.nope").err().unwrap().to_string(),
        "Affine has no attribute `nope`"
    );
    assert_eq!(n.get_buffer("a.count").unwrap().dtype(), DType::I64);
    assert_eq!(
        n.get_buffer("a.scale").err().unwrap().to_string(),
        "`scale` is not a buffer"
    );
    // Registration rules.
    let c = ModuleCore::new("X");
    assert!(c.register_parameter("a.b", None).is_err());
    c.register_parameter("w", None).unwrap();
    assert!(c.register_buffer("w", None, true).is_err());
    assert!(c.param("w").is_err());
    assert!(c.param_opt("w").unwrap().is_none());
    let nonleaf = Parameter::new(t(&[1.0])).unwrap().mul_scalar(2.0).unwrap();
    assert!(c.register_parameter("v", Some(nonleaf)).is_err());
}

fn replace_relu(m: &dyn Module) -> Result<()> {
    for (name, child) in m.named_children() {
        if child.is::<ReLU>() {
            m.core().set_child(&name, Arc::new(LeakyReLU::new(0.2)))?;
        } else {
            replace_relu(&*child)?;
        }
    }
    Ok(())
}

#[test]
fn replacing_children_changes_forward() {
    let n = Net::new();
    let x = t(&[-1.0, 2.0, -3.0]);
    assert_eq!(n.call(&x).unwrap().to_vec_f32(), [0.0, 2.0, 0.0]);
    // The notes' example: every ReLU becomes a LeakyReLU through named_children + setattr.
    replace_relu(&n).unwrap();
    assert_eq!(
        n.call(&x).unwrap().to_vec_f32(),
        [-0.040000003, 2.0, -0.120000005]
    );
    assert!(n.to_repr().contains("(0): LeakyReLU(negative_slope=0.2)"));
    assert!(n.to_repr().contains("(2): LeakyReLU(negative_slope=0.2)"));
    // set_submodule by dotted path.
    n.set_submodule("body.2", Arc::new(Identity::new()))
        .unwrap();
    n.set_submodule("body.0", Arc::new(Identity::new()))
        .unwrap();
    assert_eq!(n.call(&x).unwrap().to_vec_f32(), [-1.0, 2.0, -3.0]);
    assert!(n.set_submodule("zz.1", Arc::new(Identity::new())).is_err());
    assert!(n
        .set_submodule("a.scale", Arc::new(Identity::new()))
        .is_err());
}

#[test]
fn forward_errors_carry_the_module_scope() {
    let n = Net::new();
    let e = n.call(&t(&[1.0, 2.0])).err().unwrap();
    match &e {
        Error::Module { scope, source } => {
            assert_eq!(scope, "a (Affine)");
            assert!(
                source.to_string().contains("[2]") && source.to_string().contains("[3]"),
                "{source}"
            );
        }
        other => panic!("{other}"),
    }
    // A nested module's scope is its dotted path from the called root.
    let body = n.get_submodule("body").unwrap().arc().unwrap();
    let nested = Net::new();
    nested
        .core()
        .set_child("a", Arc::new(Identity::new()))
        .unwrap();
    let e = nested.call(&t(&[1.0, 2.0])).err().unwrap();
    assert!(e.to_string().starts_with("in body.1 (Affine): "), "{e}");
    let e = body.call(&t(&[1.0, 2.0])).err().unwrap();
    assert!(e.to_string().starts_with("in 1 (Affine): "), "{e}");
}

#[test]
fn hooks_run_in_call_impl_order_and_can_replace() {
    let m = Affine::new(2);
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let l = log.clone();
    let mut h_pre = m.register_forward_pre_hook(move |_, x| {
        l.lock().push(format!("pre {:?}", x.to_vec_f32()));
        Ok(Some(x.mul_scalar(2.0)?)) // replaces the input
    });
    let l = log.clone();
    let _h_fwd = m.register_forward_hook(move |m, x, y| {
        l.lock().push(format!(
            "fwd {} {:?} {:?}",
            m.core().type_name(),
            x.to_vec_f32(),
            y.to_vec_f32()
        ));
        Ok(Some(y.add_scalar(1.0)?)) // replaces the output
    });
    let l = log.clone();
    let _h_bpre = m.register_full_backward_pre_hook(move |go| {
        l.lock().push(format!(
            "bwd_pre {:?}",
            go[0].as_ref().unwrap().to_vec_f32()
        ));
        None
    });
    let l = log.clone();
    let _h_bwd = m.register_full_backward_hook(move |gi, go| {
        l.lock().push(format!(
            "bwd {:?} {:?}",
            gi[0].as_ref().unwrap().to_vec_f32(),
            go[0].as_ref().unwrap().to_vec_f32()
        ));
        Some(vec![Some(
            gi[0].as_ref().unwrap().mul_scalar(10.0).unwrap(),
        )]) // replaces grad_input
    });
    let x = Tensor::from_slice(&[1.0f32, 2.0], &[2])
        .unwrap()
        .requires_grad_(true)
        .unwrap();
    let y = m.call(&x).unwrap();
    assert_eq!(y.to_vec_f32(), [3.0, 5.0]);
    assert_eq!(
        y.grad_fn_name().as_deref(),
        Some("BackwardHookFunctionBackward")
    );
    y.mul(&t(&[1.0, 3.0]))
        .unwrap()
        .sum()
        .unwrap()
        .backward()
        .unwrap();
    // d(sum(y*g))/dx = g * 2 (pre-hook doubled x) * scale(1), then x10 by the hook
    assert_eq!(x.grad().unwrap().to_vec_f32(), [20.0, 60.0]);
    assert_eq!(
        *log.lock(),
        [
            "pre [1.0, 2.0]",
            "fwd Affine [2.0, 4.0] [2.0, 4.0]",
            "bwd_pre [1.0, 3.0]",
            "bwd [1.0, 3.0] [1.0, 3.0]",
        ]
    );
    // Removal by handle; the remaining hooks survive a dtype conversion.
    h_pre.remove();
    h_pre.remove();
    log.lock().clear();
    m.double().unwrap();
    assert_eq!(m.core().param("scale").unwrap().dtype(), DType::F64);
    assert_eq!(m.core().buffer("count").unwrap().dtype(), DType::I64);
    let y = m
        .call(&Tensor::from_slice(&[1.0f64, 2.0], &[2]).unwrap())
        .unwrap();
    assert_eq!(y.to_vec_f64(), [2.0, 3.0]);
    assert_eq!(log.lock().len(), 1);
    assert!(log.lock()[0].starts_with("fwd Affine [1.0, 2.0]"));
}

#[test]
fn global_hooks_run_before_module_hooks() {
    let m = Affine::new(1);
    let log: Arc<Mutex<Vec<&'static str>>> = Arc::default();
    let l = log.clone();
    let _a = m.register_forward_pre_hook(move |_, _| {
        l.lock().push("module");
        Ok(None)
    });
    let l = log.clone();
    let target = m.core() as *const ModuleCore as usize;
    let mut g = register_module_forward_pre_hook(move |m, _| {
        if m.core() as *const ModuleCore as usize == target {
            l.lock().push("global");
        }
        Ok(None)
    });
    m.call(&t(&[1.0])).unwrap();
    g.remove();
    m.call(&t(&[1.0])).unwrap();
    assert_eq!(*log.lock(), ["global", "module", "module"]);
}

#[test]
fn apply_train_eval_freeze_zero_grad() {
    let n = Net::new();
    let mut order = Vec::new();
    n.apply(|m| order.push(m.core().type_name().to_string()));
    assert_eq!(
        order,
        ["Affine", "ReLU", "Affine", "ReLU", "Sequential", "Net"]
    );
    n.eval();
    assert!(n.modules().iter().all(|m| !m.is_training()));
    n.train(true);
    assert!(n.modules().iter().all(|m| m.is_training()));
    // init through apply, keeping the parameter objects
    let before = n.get_parameter("a.scale").unwrap();
    n.apply(|m| {
        if let Ok(Some(p)) = m.core().param_opt("scale") {
            init::constant_(&p, 3.0).unwrap();
        }
    });
    assert!(before.same_object(&n.get_parameter("a.scale").unwrap()));
    assert_eq!(before.to_vec_f32(), [3.0, 3.0, 3.0]);
    let x = t(&[1.0, 1.0, 1.0]);
    n.call(&x).unwrap().sum().unwrap().backward().unwrap();
    assert!(n.parameters().iter().all(|p| p.grad().is_some()));
    n.zero_grad(false).unwrap();
    assert!(n.parameters().iter().all(|p| p
        .grad()
        .unwrap()
        .to_vec_f32()
        .iter()
        .all(|&v| v == 0.0)));
    n.zero_grad(true).unwrap();
    assert!(n.parameters().iter().all(|p| p.grad().is_none()));
    n.requires_grad_(false).unwrap();
    assert!(!n.call(&x).unwrap().requires_grad());
}

#[test]
fn dropout_train_and_eval() {
    kiln_frontend::manual_seed(7);
    let d = Dropout::new(0.5).unwrap();
    let x = Tensor::ones(&[1000], DType::F32)
        .requires_grad_(true)
        .unwrap();
    let y = d.call(&x).unwrap();
    let v = y.to_vec_f32();
    assert!(v.iter().all(|&e| e == 0.0 || e == 2.0));
    let kept = v.iter().filter(|&&e| e == 2.0).count();
    assert!((400..600).contains(&kept), "{kept}");
    assert_eq!(y.grad_fn_name().as_deref(), Some("NativeDropoutBackward0"));
    y.sum().unwrap().backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32(), v);
    d.eval();
    assert!(d.call(&x).unwrap().same_object(&x));
    assert!(Dropout::new(1.5).is_err());
}

fn snapshot(m: &dyn Module) -> Vec<(String, Vec<f64>, DType, u64)> {
    m.named_parameters()
        .into_iter()
        .chain(m.named_buffers())
        .map(|(k, t)| (k, t.to_vec_f64(), t.dtype(), t.id()))
        .collect()
}

#[test]
fn load_state_dict_strict_and_non_strict() {
    let src = Net::new();
    init::constant_(&src.get_parameter("body.1.scale").unwrap(), 5.0).unwrap();
    let sd = src.state_dict();
    let dst = Net::new();
    let keys = dst.load_state_dict(&sd, true).unwrap();
    assert!(keys.is_empty());
    assert_eq!(
        dst.get_parameter("body.1.scale").unwrap().to_vec_f32(),
        [5.0; 3]
    );
    // Non-strict: report, load the rest.
    let mut partial = sd.clone();
    partial.remove("a.shift");
    partial.insert("extra.weight", t(&[1.0]));
    let keys = dst.load_state_dict(&partial, false).unwrap();
    assert_eq!(keys.missing_keys, ["a.shift"]);
    assert_eq!(keys.unexpected_keys, ["extra.weight"]);
}

#[test]
fn failing_loads_leave_the_model_unchanged() {
    let m = Net::new();
    init::constant_(&m.get_parameter("a.shift").unwrap(), 0.25).unwrap();
    let good = Net::new().state_dict();
    let before = snapshot(&m);
    let check = |sd: &StateDict, expect: &[&str]| {
        let e = m.load_state_dict(sd, true).expect_err("load must fail");
        let Error::StateDict { module, errors } = &e else {
            panic!("{e}")
        };
        assert_eq!(module, "Net");
        let text = e.to_string();
        for x in expect {
            assert!(text.contains(x), "{text} lacks {x}");
        }
        assert!(!errors.is_empty());
        assert_eq!(snapshot(&m), before);
    };
    let mut missing = good.clone();
    missing.remove("body.1.shift");
    missing.remove("a.count");
    check(
        &missing,
        &["Missing key(s) in state_dict: \"a.count\", \"body.1.shift\". "],
    );
    let mut extra = good.clone();
    extra.insert("body.9.weight", t(&[1.0]));
    extra.insert("bogus", t(&[1.0]));
    // PyTorch's order: the root's own keys first, then each child's.
    check(
        &extra,
        &["Unexpected key(s) in state_dict: \"bogus\", \"body.9.weight\". "],
    );
    let mut shape = good.clone();
    shape.insert("a.scale", t(&[1.0, 2.0]));
    shape.insert("body.1.shift", t(&[1.0]));
    check(
        &shape,
        &[
            "size mismatch for a.scale: copying a param with shape [2] from checkpoint, the shape in current model is [3].",
            "size mismatch for body.1.shift",
        ],
    );
    let mut dtype = good.clone();
    dtype.insert("a.scale", Tensor::ones(&[3], DType::F64));
    check(
        &dtype,
        &["dtype mismatch for a.scale: copying a param with dtype"],
    );
    // Truncated and corrupt files.
    let dir = std::env::temp_dir().join(format!("kiln-nn-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("good.safetensors");
    good.save_safetensors(&path, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let trunc = dir.join("trunc.safetensors");
    std::fs::write(&trunc, &bytes[..bytes.len() - 5]).unwrap();
    let e = m.load_safetensors(&trunc, true).err().unwrap();
    assert!(
        matches!(e, Error::Format(_)) && e.to_string().contains("trunc.safetensors"),
        "{e}"
    );
    std::fs::write(&trunc, b"garbage").unwrap();
    assert!(matches!(
        m.load_safetensors(&trunc, true),
        Err(Error::Format(_))
    ));
    assert_eq!(snapshot(&m), before);
    // And a good file loads, with the same values as the dict it came from.
    m.load_safetensors(&path, true).unwrap();
    assert_eq!(m.get_parameter("a.shift").unwrap().to_vec_f32(), [0.0; 3]);
    let back = StateDict::load_safetensors(&path).unwrap();
    assert_eq!(back.len(), good.len());
    for (k, v) in good.iter() {
        assert_eq!(back.get(k).unwrap().to_vec_f64(), v.to_vec_f64(), "{k}");
        assert_eq!(back.get(k).unwrap().dtype(), v.dtype());
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn state_dict_hooks_and_load_pre_hooks() {
    let m = Affine::new(2);
    let _h = m.core().register_state_dict_hook(|_, sd, prefix| {
        sd.remove(&format!("{prefix}count"));
    });
    assert_eq!(m.state_dict().keys(), ["scale", "shift"]);
    // A pre-hook renaming an old key.
    let _p = m.core().register_load_state_dict_pre_hook(|sd, prefix| {
        if let Some(t) = sd.remove(&format!("{prefix}gain")) {
            sd.insert(format!("{prefix}scale"), t);
        }
        Ok(())
    });
    let mut sd = StateDict::new();
    sd.insert("gain", t(&[4.0, 4.0]));
    sd.insert("shift", t(&[1.0, 1.0]));
    let keys = m.load_state_dict(&sd, false).unwrap();
    assert_eq!(keys.missing_keys, ["count"]);
    assert_eq!(m.core().param("scale").unwrap().to_vec_f32(), [4.0, 4.0]);
}

#[test]
fn sgd_momentum_nesterov_and_weight_decay_by_hand() {
    // torch: p = tensor([1., -2.], requires_grad=True)
    // opt = SGD([p], lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True)
    // for _ in range(2): opt.zero_grad(); (p*p).sum().backward(); opt.step()
    // print(p)  -> tensor([ 0.4944, -0.9888])  (hand-derived below)
    let p = Parameter::new(t(&[1.0, -2.0])).unwrap();
    let mut opt = SGD::new(
        vec![p.clone()],
        SgdOptions {
            lr: 0.1,
            momentum: 0.9,
            weight_decay: 0.01,
            nesterov: true,
            ..Default::default()
        },
    )
    .unwrap();
    let mut expect = [1.0f64, -2.0];
    let mut buf = [0.0f64; 2];
    for step in 0..2 {
        opt.zero_grad(true).unwrap();
        p.mul(&p).unwrap().sum().unwrap().backward().unwrap();
        opt.step().unwrap();
        for i in 0..2 {
            let g = 2.0 * expect[i] + 0.01 * expect[i];
            buf[i] = if step == 0 { g } else { 0.9 * buf[i] + g };
            expect[i] -= 0.1 * (g + 0.9 * buf[i]);
        }
    }
    for (a, b) in p.to_vec_f64().iter().zip(expect) {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    // A frozen parameter (no grad) is skipped.
    let frozen = Parameter::with_requires_grad(t(&[1.0]), false).unwrap();
    let mut opt = SGD::new(vec![frozen.clone()], SgdOptions::lr(1.0)).unwrap();
    opt.step().unwrap();
    assert_eq!(frozen.to_vec_f32(), [1.0]);
}

#[test]
fn adam_and_adamw_by_hand_and_state_round_trip() {
    // torch.optim.Adam([p], lr=0.1) on loss sum(p**2), two steps, by the
    // documented formulas; AdamW(lr=0.1, weight_decay=0.5) decays p first.
    for decoupled in [false, true] {
        let p = Parameter::new(t(&[1.0, -0.5])).unwrap();
        let opts = if decoupled {
            AdamOptions {
                weight_decay: 0.5,
                ..AdamOptions::adamw(0.1)
            }
        } else {
            AdamOptions::adam(0.1)
        };
        let mut opt = Adam::new(vec![p.clone()], opts).unwrap();
        let mut x = [1.0f64, -0.5];
        let (mut m, mut v) = ([0.0f64; 2], [0.0f64; 2]);
        for step in 1..=2 {
            opt.zero_grad(true).unwrap();
            p.mul(&p).unwrap().sum().unwrap().backward().unwrap();
            opt.step().unwrap();
            for i in 0..2 {
                let g = 2.0 * x[i];
                if decoupled {
                    x[i] *= 1.0 - 0.1 * 0.5;
                }
                m[i] = 0.9 * m[i] + 0.1 * g;
                v[i] = 0.999 * v[i] + 0.001 * g * g;
                let bc1 = 1.0 - 0.9f64.powi(step);
                let bc2 = 1.0 - 0.999f64.powi(step);
                x[i] -= 0.1 / bc1 * m[i] / (v[i].sqrt() / bc2.sqrt() + 1e-8);
            }
        }
        for (a, b) in p.to_vec_f64().iter().zip(x) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        // Round trip: a fresh optimizer loaded from the state dict takes the
        // same next step as the original.
        let sd = opt.state_dict();
        assert_eq!(
            sd.state[&0]
                .iter()
                .map(|(k, _)| k.as_str())
                .collect::<Vec<_>>(),
            ["step", "exp_avg", "exp_avg_sq"]
        );
        assert_eq!(sd.param_groups[0]["params"], serde_json::json!([0]));
        let (flat, groups) = sd.to_flat("optim.");
        let restored =
            kiln_frontend::optim::OptimizerStateDict::from_flat(&flat, "optim.", &groups).unwrap();
        let q = Parameter::new(p.detach().clone_tensor().unwrap()).unwrap();
        let mut opt2 = Adam::new(vec![q.clone()], AdamOptions::adam(123.0)).unwrap();
        opt2.load_state_dict(&restored).unwrap();
        assert_eq!(opt2.lrs(), [0.1]);
        for (o, t) in [
            (&mut opt as &mut dyn Optimizer, &p),
            (&mut opt2 as &mut dyn Optimizer, &q),
        ] {
            o.zero_grad(true).unwrap();
            t.mul(t).unwrap().sum().unwrap().backward().unwrap();
            o.step().unwrap();
        }
        assert_eq!(p.to_vec_f32(), q.to_vec_f32());
        // Mismatched groups are rejected and leave the optimizer unchanged.
        let mut opt3 = Adam::new(
            vec![q.clone(), Parameter::new(t(&[0.0])).unwrap()],
            AdamOptions::adam(0.5),
        )
        .unwrap();
        assert!(opt3.load_state_dict(&restored).is_err());
        assert_eq!(opt3.lrs(), [0.5]);
    }
}

#[test]
fn losses_values_and_grads() {
    use kiln_frontend::nn::functional::{
        binary_cross_entropy_with_logits, l1_loss, mse_loss, Reduction,
    };
    // F.binary_cross_entropy_with_logits(x, t): x = [0.5, -1, 3], t = [1, 0, 1]
    // -> mean of log1p(exp(-0.5)), log1p(exp(-1)), log1p(exp(-3)) = 0.2786420;
    // x.grad = (sigmoid(x) - t) / 3 = [-0.1258470, 0.0896471, -0.0158089]
    let x = Parameter::new(t(&[0.5, -1.0, 3.0])).unwrap();
    let tg = t(&[1.0, 0.0, 1.0]);
    let l = binary_cross_entropy_with_logits(&x, &tg, None, None, Reduction::Mean).unwrap();
    assert_eq!(
        l.grad_fn_name().as_deref(),
        Some("BinaryCrossEntropyWithLogitsBackward0")
    );
    assert!((l.item().unwrap() - 0.2786420).abs() < 1e-6);
    l.backward().unwrap();
    for (a, b) in x
        .grad()
        .unwrap()
        .to_vec_f64()
        .iter()
        .zip([-0.1258470, 0.0896471, -0.0158089])
    {
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    }
    // Stable for large logits: x = 100, t = 0 -> loss 100 (not inf).
    let big =
        binary_cross_entropy_with_logits(&t(&[100.0]), &t(&[0.0]), None, None, Reduction::Sum)
            .unwrap();
    assert_eq!(big.item().unwrap(), 100.0);
    assert!(binary_cross_entropy_with_logits(
        &t(&[1.0]),
        &t(&[1.0, 0.0]),
        None,
        None,
        Reduction::Mean
    )
    .is_err());
    // F.mse_loss([1, 2], [0, 4], reduction) -> none [1, 4], sum 5, mean 2.5; grad(mean) = (x - t) = [1, -2]
    let x = Parameter::new(t(&[1.0, 2.0])).unwrap();
    let tg = t(&[0.0, 4.0]);
    assert_eq!(
        mse_loss(&x, &tg, Reduction::None).unwrap().to_vec_f32(),
        [1.0, 4.0]
    );
    assert_eq!(
        mse_loss(&x, &tg, Reduction::Sum).unwrap().item().unwrap(),
        5.0
    );
    let l = mse_loss(&x, &tg, Reduction::Mean).unwrap();
    assert_eq!(l.grad_fn_name().as_deref(), Some("MseLossBackward0"));
    assert_eq!(l.item().unwrap(), 2.5);
    l.backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32(), [1.0, -2.0]);
    // F.l1_loss([1, 2], [0, 4]) = 1.5; grad = sign(x - t) / 2
    let x = Parameter::new(t(&[1.0, 2.0])).unwrap();
    let l = l1_loss(&x, &tg, Reduction::Mean).unwrap();
    assert_eq!(l.item().unwrap(), 1.5);
    l.backward().unwrap();
    assert_eq!(x.grad().unwrap().to_vec_f32(), [0.5, -0.5]);
    assert_eq!(MSELoss::default().repr(), "MSELoss()");
}

/// mse_loss's one-pass path (contiguous f32 operands of one shape) equals
/// the composite path (taken for a transposed view) in value and in both
/// gradients, for mean and sum, with and without a target that needs grad.
#[test]
fn mse_loss_one_pass_equals_composite() {
    use kiln_frontend::nn::functional::{mse_loss, Reduction};
    let base = Tensor::randn(&[37, 53], DType::F32);
    let tgt = Tensor::randn(&[37, 53], DType::F32);
    for red in [Reduction::Mean, Reduction::Sum] {
        for target_grad in [false, true] {
            let run = |x: &Tensor, t: &Tensor| {
                let x = x.detach().requires_grad_(true).unwrap();
                let t = t.detach().requires_grad_(target_grad).unwrap();
                let l = mse_loss(&x, &t, red).unwrap();
                l.backward().unwrap();
                let gt = t.grad().map(|g| g.to_vec_f32());
                (l.item().unwrap(), x.grad().unwrap().to_vec_f32(), gt)
            };
            // Contiguous: one pass. Transposed twice: same values, strided.
            let (l1, gx1, gt1) = run(&base, &tgt);
            let xs = base.t().unwrap().contiguous().unwrap().t().unwrap();
            let ts = tgt.t().unwrap().contiguous().unwrap().t().unwrap();
            assert!(!xs.is_contiguous());
            let (l2, gx2, gt2) = run(&xs, &ts);
            assert!((l1 - l2).abs() <= 1e-5 * l2.abs(), "{red:?}: {l1} vs {l2}");
            for (a, b) in gx1.iter().zip(&gx2) {
                assert!(
                    (a - b).abs() <= 1e-6 * (1.0 + b.abs()),
                    "{red:?}: {a} vs {b}"
                );
            }
            assert_eq!(gt1.is_some(), target_grad);
            if let (Some(a), Some(b)) = (gt1, gt2) {
                for (a, b) in a.iter().zip(&b) {
                    assert!((a - b).abs() <= 1e-6 * (1.0 + b.abs()));
                }
            }
        }
    }
}
