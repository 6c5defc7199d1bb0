//! Checks a zoo model against PyTorch's fixtures (python/make_fixtures.py's
//! files: NAME.safetensors, NAME.io.safetensors, NAME.train.safetensors,
//! NAME.json). Shared by the integration tests and `kiln verify`.
//!
//! For one model: strict load with no missing/unexpected keys (values equal
//! to the file's); eval output; gradients of `sum(eval_output *
//! grad_output)`; one training-mode forward (dropout p = 0) and the buffers
//! after it; three SGD (lr 0.05, momentum 0.9, weight_decay 1e-4) and three
//! Adam (lr 1e-3) steps on `mse_loss(model(input), target)` in training
//! mode: losses, parameters and buffers; named_parameters / named_buffers
//! (names, shapes) / named_modules / named_children / state_dict keys in
//! order; repr byte for byte (taken, as make_fixtures.py does, after the
//! dropout probabilities were set to 0).
//!
//! Errors are relative: max |actual - expected| / max |expected| per tensor,
//! the max over tensors per check. Tolerances: 1e-4 for forwards, 1e-3 for
//! gradients and optimizer steps.
//!
//! One exception, stated in the report: a parameter whose gradient is
//! rounding noise at every Adam step (a bias feeding a batch norm in
//! training mode has an exact gradient of zero; the computed one is ~1e-9)
//! gets Adam steps of arbitrary sign, in PyTorch as here (Adam normalizes
//! the noise to steps of size ~lr). For such a parameter only the bound
//! |change| <= steps * lr is checked (on PyTorch's result and on ours).

use crate::nn::functional::{mse_loss, Reduction};
use crate::nn::prelude::*;
use crate::optim::{Adam, AdamOptions, Optimizer, SgdOptions, SGD};
use crate::{no_grad, zoo, Error, Result, Tensor};
use std::fmt;
use std::path::{Path, PathBuf};

/// Tolerance of forward outputs and buffers after one forward.
pub const FORWARD_TOL: f64 = 1e-4;
/// Tolerance of gradients, losses and parameters after optimizer steps.
pub const STEP_TOL: f64 = 1e-3;
/// A gradient below this fraction of the model's largest gradient (at every
/// step) is treated as rounding noise by the Adam check.
pub const NOISE_GRAD: f64 = 1e-6;

const STEPS: usize = 3;
const ADAM_LR: f64 = 1e-3;

/// The outcome of `verify_model`: max relative errors per check, whether
/// the names and repr matched, and every failure in words.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub name: String,
    pub eval: f64,
    pub grad: f64,
    pub train: f64,
    pub sgd: f64,
    pub adam: f64,
    pub names_ok: bool,
    pub repr_ok: bool,
    pub load_ok: bool,
    /// With `--backend cpu`: the worst error of the compiled path (eval and
    /// training forward vs the fixtures, eval vs eager).
    pub compiled: Option<f64>,
    /// Each failed check: what, which tensor, the error and the tolerance.
    pub failures: Vec<String>,
    /// Every compared tensor: (what, relative error, tolerance).
    pub details: Vec<(String, f64, f64)>,
    /// Things the reader should know that are not failures (noise-gradient
    /// parameters checked by bound only).
    pub notes: Vec<String>,
}

impl Report {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    fn check(&mut self, what: &str, err: f64, tol: f64) -> f64 {
        self.details.push((what.to_string(), err, tol));
        if err.is_nan() || err > tol {
            self.failures
                .push(format!("{what}: relative error {err:.3e} > {tol:.0e}"));
        }
        err
    }
}

fn ok(b: bool) -> &'static str {
    if b {
        "OK"
    } else {
        "MISMATCH"
    }
}

impl fmt::Display for Report {
    /// One line: `simple_net  eval 1.2e-7  grad ...  names OK  repr OK  PASS`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<18} eval {:.1e}  grad {:.1e}  train {:.1e}  sgd {:.1e}  adam {:.1e}  load {}  names {}  repr {}  {}",
            self.name,
            self.eval,
            self.grad,
            self.train,
            self.sgd,
            self.adam,
            ok(self.load_ok),
            ok(self.names_ok),
            ok(self.repr_ok),
            if self.passed() { "PASS" } else { "FAIL" }
        )?;
        if let Some(c) = self.compiled {
            write!(f, "  compiled(cpu) {c:.1e}")?;
        }
        Ok(())
    }
}

/// max |a - b| / max |b|; infinite on a shape mismatch or a NaN.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f64 {
    if actual.shape() != expected.shape() {
        return f64::INFINITY;
    }
    let (a, b) = (actual.to_vec_f64(), expected.to_vec_f64());
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs()));
    let diff = a.iter().zip(&b).fold(0f64, |m, (x, y)| {
        let d = (x - y).abs();
        if d.is_nan() {
            f64::INFINITY
        } else {
            m.max(d)
        }
    });
    if scale == 0.0 {
        diff
    } else {
        diff / scale
    }
}

fn path(dir: &Path, file: &str) -> PathBuf {
    dir.join(file)
}

fn get<'a>(sd: &'a StateDict, key: &str, file: &str) -> Result<&'a Tensor> {
    sd.get(key)
        .ok_or_else(|| Error::Format(format!("{file}: no tensor `{key}`")))
}

/// The zoo models whose fixture JSON is in `dir`, in zoo order.
pub fn available(dir: &Path) -> Vec<&'static str> {
    zoo::names()
        .iter()
        .copied()
        .filter(|n| path(dir, &format!("{n}.json")).is_file())
        .collect()
}

/// Sets every Dropout's p to 0 (make_fixtures.py does this for the training
/// forward and the optimizer steps).
pub fn disable_dropout(m: &dyn Module) -> Result<()> {
    for (_, sub) in m.named_modules() {
        if let Some(d) = sub.downcast_ref::<Dropout>() {
            d.set_p(0.0)?;
        }
    }
    Ok(())
}

fn json_names(v: &serde_json::Value, key: &str) -> Result<Vec<(String, Option<Vec<usize>>)>> {
    let bad = || Error::Format(format!("fixture JSON: bad `{key}`"));
    v[key]
        .as_array()
        .ok_or_else(bad)?
        .iter()
        .map(|e| match e {
            serde_json::Value::String(s) => Ok((s.clone(), None)),
            serde_json::Value::Array(pair) if pair.len() == 2 => {
                let n = pair[0].as_str().ok_or_else(bad)?.to_string();
                let shape = pair[1]
                    .as_array()
                    .ok_or_else(bad)?
                    .iter()
                    .map(|d| d.as_u64().map(|d| d as usize).ok_or_else(bad))
                    .collect::<Result<Vec<_>>>()?;
                Ok((n, Some(shape)))
            }
            _ => Err(bad()),
        })
        .collect()
}

fn check_names(m: &dyn Module, j: &serde_json::Value, r: &mut Report) -> Result<()> {
    let with_shapes = |v: Vec<(String, Tensor)>| -> Vec<(String, Option<Vec<usize>>)> {
        v.into_iter().map(|(n, t)| (n, Some(t.shape()))).collect()
    };
    let plain = |v: Vec<String>| -> Vec<(String, Option<Vec<usize>>)> {
        v.into_iter().map(|n| (n, None)).collect()
    };
    let ours = [
        ("named_parameters", with_shapes(m.named_parameters())),
        ("named_buffers", with_shapes(m.named_buffers())),
        (
            "named_modules",
            plain(m.named_modules().into_iter().map(|(n, _)| n).collect()),
        ),
        (
            "named_children",
            plain(m.named_children().into_iter().map(|(n, _)| n).collect()),
        ),
        ("state_dict_keys", plain(m.state_dict().keys())),
    ];
    r.names_ok = true;
    for (key, got) in ours {
        let want = json_names(j, key)?;
        if got != want {
            r.names_ok = false;
            r.failures
                .push(format!("{key}: got {got:?}, PyTorch has {want:?}"));
        }
    }
    Ok(())
}

/// make_fixtures.py takes the repr at the end, after setting every dropout
/// probability to 0: call this on a model in that state.
fn check_repr(m: &dyn Module, j: &serde_json::Value, r: &mut Report) -> Result<()> {
    let want_repr = j["repr"]
        .as_str()
        .ok_or_else(|| Error::Format("fixture JSON: no `repr`".into()))?;
    let got_repr = m.to_repr();
    r.repr_ok = got_repr == want_repr;
    if !r.repr_ok {
        r.failures.push(format!(
            "repr differs:\n--- kiln\n{got_repr}\n--- PyTorch\n{want_repr}"
        ));
    }
    Ok(())
}

/// Builds the model and loads NAME.safetensors strictly.
fn load_model(dir: &Path, name: &str) -> Result<std::sync::Arc<dyn Module>> {
    let m = zoo::build(name)?;
    m.load_safetensors(path(dir, &format!("{name}.safetensors")), true)?;
    Ok(m)
}

/// Tolerance of compiled vs eager (both kiln, same machine).
pub const COMPILED_VS_EAGER_TOL: f64 = 1e-5;

/// `verify_model`, plus, with `compiled`, every forward check through
/// `jit::compile` too: the compiled eval output against the fixture and
/// against eager, and a compiled training-mode forward against the
/// fixture's `train_output` and `train_state.*` buffers.
pub fn verify_model_with(dir: &Path, name: &str, compiled: bool) -> Result<Report> {
    let mut r = verify_model(dir, name)?;
    if !compiled {
        return Ok(r);
    }
    let io_name = format!("{name}.io.safetensors");
    let io = StateDict::load_safetensors(path(dir, &io_name))?;
    let x = get(&io, "input", &io_name)?;
    let m = load_model(dir, name)?;
    m.eval();
    let eager = no_grad(|| m.call(x))?;
    let c = crate::jit::compile(&m, std::slice::from_ref(x))?;
    let y = no_grad(|| c.forward(std::slice::from_ref(x)))?;
    let mut worst = r.check(
        "compiled.eval_output",
        rel_err(&y[0], get(&io, "eval_output", &io_name)?),
        FORWARD_TOL,
    );
    worst = worst.max(r.check(
        "compiled.eval_output vs eager",
        rel_err(&y[0], &eager),
        COMPILED_VS_EAGER_TOL,
    ));
    let m = load_model(dir, name)?;
    m.train(true);
    disable_dropout(&*m)?;
    let c = crate::jit::compile(&m, std::slice::from_ref(x))?;
    let yt = no_grad(|| c.forward(std::slice::from_ref(x)))?;
    worst = worst.max(r.check(
        "compiled.train_output",
        rel_err(&yt[0], get(&io, "train_output", &io_name)?),
        FORWARD_TOL,
    ));
    for (bname, b) in m.named_buffers() {
        let key = format!("train_state.{bname}");
        let e = r.check(
            &format!("compiled.{key}"),
            rel_err(&b, get(&io, &key, &io_name)?),
            FORWARD_TOL,
        );
        worst = worst.max(e);
    }
    r.compiled = Some(worst);
    Ok(r)
}

/// Runs every check for zoo model `name` on the fixtures in `dir`. I/O and
/// format problems (a missing or corrupt file, a missing key) are `Err`;
/// numerical and naming mismatches are listed in the report.
pub fn verify_model(dir: &Path, name: &str) -> Result<Report> {
    let mut r = Report {
        name: name.to_string(),
        ..Default::default()
    };
    let jfile = path(dir, &format!("{name}.json"));
    let j: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&jfile)?)
        .map_err(|e| Error::Format(format!("{}: {e}", jfile.display())))?;
    let io_name = format!("{name}.io.safetensors");
    let io = StateDict::load_safetensors(path(dir, &io_name))?;
    let tr_name = format!("{name}.train.safetensors");
    let tr = StateDict::load_safetensors(path(dir, &tr_name))?;

    // ---------------------------------------------------------------- registry
    let m = zoo::build(name)?;
    check_names(&*m, &j, &mut r)?;

    // ---------------------------------------------------------------- load
    let st_name = format!("{name}.safetensors");
    let file = StateDict::load_safetensors(path(dir, &st_name))?;
    let keys = m.load_state_dict(&file, true)?;
    r.load_ok = keys.is_empty();
    if !r.load_ok {
        r.failures.push(format!(
            "load: missing {:?}, unexpected {:?}",
            keys.missing_keys, keys.unexpected_keys
        ));
    }
    for (k, v) in m.state_dict().iter() {
        if let Some(want) = file.get(k) {
            if v.dtype() != want.dtype() || rel_err(v, want) != 0.0 {
                r.load_ok = false;
                r.failures
                    .push(format!("load: `{k}` differs from the file after loading"));
            }
        }
    }

    // ---------------------------------------------------------------- eval + grads
    let x = get(&io, "input", &io_name)?;
    m.eval();
    let y = m.call(x)?;
    r.eval = r.check(
        "eval_output",
        rel_err(&y, get(&io, "eval_output", &io_name)?),
        FORWARD_TOL,
    );
    m.zero_grad(true)?;
    y.mul(get(&io, "grad_output", &io_name)?)?
        .sum()?
        .backward()?;
    for (pname, p) in m.named_parameters() {
        let key = format!("grad.{pname}");
        match (io.get(&key), p.grad()) {
            (Some(want), Some(g)) => {
                let e = r.check(&key, rel_err(&g, want), STEP_TOL);
                r.grad = r.grad.max(e);
            }
            (Some(_), None) => r.failures.push(format!("{key}: no gradient computed")),
            (None, Some(_)) if p.requires_grad() => r
                .failures
                .push(format!("{key}: PyTorch computed no gradient, kiln did")),
            _ => {}
        }
    }

    // ---------------------------------------------------------------- one training forward
    m.train(true);
    disable_dropout(&*m)?;
    let yt = no_grad(|| m.call(x))?;
    check_repr(&*m, &j, &mut r)?;
    r.train = r.check(
        "train_output",
        rel_err(&yt, get(&io, "train_output", &io_name)?),
        FORWARD_TOL,
    );
    for (bname, b) in m.named_buffers() {
        let key = format!("train_state.{bname}");
        let e = r.check(&key, rel_err(&b, get(&io, &key, &io_name)?), FORWARD_TOL);
        r.train = r.train.max(e);
    }

    // ---------------------------------------------------------------- optimizer steps
    let target = get(&tr, "target", &tr_name)?;
    for opt_name in ["sgd", "adam"] {
        let m = load_model(dir, name)?;
        m.train(true);
        disable_dropout(&*m)?;
        let start: Vec<(String, Tensor)> = m
            .named_parameters()
            .into_iter()
            .map(|(n, p)| Ok((n, p.detach().clone_tensor()?)))
            .collect::<Result<_>>()?;
        let mut opt: Box<dyn Optimizer> = if opt_name == "sgd" {
            Box::new(SGD::new(
                m.parameters(),
                SgdOptions {
                    lr: 0.05,
                    momentum: 0.9,
                    weight_decay: 1e-4,
                    ..Default::default()
                },
            )?)
        } else {
            Box::new(Adam::new(m.parameters(), AdamOptions::adam(ADAM_LR))?)
        };
        let names: Vec<String> = m.named_parameters().into_iter().map(|(n, _)| n).collect();
        // per parameter: was its gradient noise at every step so far?
        let mut noise = vec![true; names.len()];
        let mut losses = Vec::new();
        for _ in 0..STEPS {
            opt.zero_grad(true)?;
            let loss = mse_loss(&m.call(x)?, target, Reduction::Mean)?;
            loss.backward()?;
            let gmax: Vec<f64> = m
                .named_parameters()
                .iter()
                .map(|(_, p)| {
                    p.grad()
                        .map(|g| g.to_vec_f64().iter().fold(0f64, |a, v| a.max(v.abs())))
                        .unwrap_or(0.0)
                })
                .collect();
            let top = gmax.iter().cloned().fold(0f64, f64::max);
            for (nz, g) in noise.iter_mut().zip(&gmax) {
                *nz &= *g <= NOISE_GRAD * top;
            }
            opt.step()?;
            losses.push(loss.detach());
        }
        let losses = Tensor::stack(&losses.iter().collect::<Vec<_>>(), 0)?;
        let mut worst = r.check(
            &format!("{opt_name}.loss"),
            rel_err(&losses, get(&tr, &format!("{opt_name}.loss"), &tr_name)?),
            STEP_TOL,
        );
        for (i, (pname, p)) in m.named_parameters().into_iter().enumerate() {
            let key = format!("{opt_name}.param.{pname}");
            let want = get(&tr, &key, &tr_name)?;
            if opt_name == "adam" && noise[i] {
                let s = &start[i].1;
                let bound = STEPS as f64 * ADAM_LR * (1.0 + 1e-3);
                let ours = p.sub(s)?.abs()?.max()?.item()?;
                let theirs = want.sub(s)?.abs()?.max()?.item()?;
                r.notes.push(format!(
                    "{key}: gradient is rounding noise; checked |change| <= {STEPS} lr (kiln {ours:.2e}, PyTorch {theirs:.2e})"
                ));
                if ours > bound || theirs > bound {
                    r.failures.push(format!(
                        "{key}: change {ours:.3e} (PyTorch {theirs:.3e}) exceeds {bound:.3e}"
                    ));
                }
                continue;
            }
            worst = worst.max(r.check(&key, rel_err(&p, want), STEP_TOL));
        }
        for (bname, b) in m.named_buffers() {
            let key = format!("{opt_name}.buffer.{bname}");
            let want = get(&tr, &key, &tr_name)?;
            worst = worst.max(r.check(&key, rel_err(&b, want), STEP_TOL));
        }
        if opt_name == "sgd" {
            r.sgd = worst;
        } else {
            r.adam = worst;
        }
    }
    Ok(r)
}
