//! Test support: a finite-difference gradient checker like
//! `torch.autograd.gradcheck`, and deterministic f64 input builders.
//!
//! `gradcheck(f, inputs, eps, atol, rtol)` compares, for every input that
//! requires grad and every element of it, the analytic gradient (from
//! `autograd::grad`, i.e. the op's recorded backward) with central
//! differences `(f(x + eps) - f(x - eps)) / 2 eps`, in f64. Small outputs
//! are checked element by element (the full Jacobian); outputs with more
//! than [`FULL_JACOBIAN_MAX`] elements are projected onto a fixed random
//! vector first (one backward pass instead of one per output element).
//! The analytic Jacobian is computed twice and must be identical (a
//! backward that is not deterministic is reported).
//!
//! ```
//! use kiln_frontend::testing::{gradcheck, uniform, EPS, ATOL, RTOL};
//! let x = uniform(&[2, 3], -1.0, 1.0, 0);
//! let w = uniform(&[3], 0.5, 2.0, 1);
//! gradcheck(|t| t[0].mul(&t[1])?.tanh(), &[x, w], EPS, ATOL, RTOL).unwrap();
//! ```
//!
//! Inputs that require grad must be f64 (finite differences in f32 are too
//! coarse, as torch warns); inputs that do not require grad are passed
//! through unchanged and may have any dtype. Keep inputs away from points
//! where the function is not differentiable (relu/abs at 0, ties of max).

use crate::autograd::{self, set_grad_enabled};
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_cpu::Element;
use kiln_ir::DType;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// torch.autograd.gradcheck's default step.
pub const EPS: f64 = 1e-6;
/// torch.autograd.gradcheck's default absolute tolerance.
pub const ATOL: f64 = 1e-5;
/// torch.autograd.gradcheck's default relative tolerance.
pub const RTOL: f64 = 1e-3;
/// Outputs up to this many elements are checked element by element; larger
/// ones through a random projection.
pub const FULL_JACOBIAN_MAX: usize = 256;

fn gc_err(msg: impl Into<String>) -> Error {
    Error::op("gradcheck", msg)
}

/// Restores grad mode on drop.
struct Mode(bool);
impl Drop for Mode {
    fn drop(&mut self) {
        set_grad_enabled(self.0);
    }
}

/// Row-major multi-index of flat element `e` of `shape`.
fn unravel(mut e: usize, shape: &[usize]) -> Vec<usize> {
    let mut idx = vec![0; shape.len()];
    for d in (0..shape.len()).rev() {
        if shape[d] > 0 {
            idx[d] = e % shape[d];
            e /= shape[d];
        }
    }
    idx
}

/// Storage position of flat element `e` of `t`.
fn storage_pos(t: &Tensor, e: usize) -> usize {
    let l = t.layout();
    let idx = unravel(e, &l.shape);
    l.offset
        + idx
            .iter()
            .zip(&l.strides)
            .map(|(i, s)| i * s)
            .sum::<usize>()
}

fn read_elem(t: &Tensor, pos: usize) -> f64 {
    let d = t.data();
    let buf = d.storage.buf.read();
    f64::slice(&buf).expect("gradcheck inputs are f64")[pos]
}

/// Writes one element in place, bypassing autograd's in-place checks (the
/// value is always restored exactly, so saved tensors stay valid).
fn write_elem(t: &Tensor, pos: usize, v: f64) {
    let d = t.data();
    let mut buf = d.storage.buf.write();
    f64::slice_mut(&mut buf).expect("gradcheck inputs are f64")[pos] = v;
}

/// How an output is examined: all its elements, or one random projection.
enum Probe {
    Full,
    Projected(Tensor),
}

/// A differentiable output's analytic Jacobian rows: `rows[r][p]` is the
/// gradient (flattened) of probe row `r` with respect to diff input `p`.
fn analytic(
    out: &Tensor,
    probe: &Probe,
    diff_inputs: &[Tensor],
    input_ids: &[usize],
) -> Result<Vec<Vec<Vec<f64>>>> {
    let n_rows = match probe {
        Probe::Full => out.numel(),
        Probe::Projected(_) => 1,
    };
    let mut rows = Vec::with_capacity(n_rows);
    for r in 0..n_rows {
        if !out.requires_grad() {
            rows.push(diff_inputs.iter().map(|x| vec![0.0; x.numel()]).collect());
            continue;
        }
        let g = match probe {
            Probe::Full => {
                let mut v = vec![0.0f64; out.numel()];
                v[r] = 1.0;
                Tensor::from_vec(v, &out.shape())?.to_dtype(out.dtype())?
            }
            Probe::Projected(u) => u.clone(),
        };
        let grads = autograd::grad(
            std::slice::from_ref(out),
            diff_inputs,
            Some(std::slice::from_ref(&g)),
            true,
            false,
            true,
        )?;
        let mut row = Vec::with_capacity(diff_inputs.len());
        for ((gr, x), &i) in grads.iter().zip(diff_inputs).zip(input_ids) {
            match gr {
                None => row.push(vec![0.0; x.numel()]),
                Some(gr) => {
                    if gr.shape() != x.shape() {
                        return Err(gc_err(format!(
                            "the analytical gradient for input {i} has shape {:?}, expected the input's shape {:?}",
                            gr.shape(),
                            x.shape()
                        )));
                    }
                    if gr.dtype() != x.dtype() {
                        return Err(gc_err(format!(
                            "the analytical gradient for input {i} has dtype {}, expected the input's dtype {}",
                            gr.dtype(),
                            x.dtype()
                        )));
                    }
                    row.push(gr.to_vec::<f64>());
                }
            }
        }
        rows.push(row);
    }
    Ok(rows)
}

/// Evaluates `f` without recording and returns its outputs as f64 vectors
/// (probed: projected outputs are reduced to one number).
fn eval_probed(
    f: &dyn Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    inputs: &[Tensor],
    outs_meta: &[(usize, Vec<usize>)],
    probes: &[Probe],
) -> Result<Vec<Vec<f64>>> {
    let outs = autograd::no_grad(|| f(inputs))?;
    let mut res = Vec::with_capacity(outs_meta.len());
    for ((o, shape), probe) in outs_meta.iter().zip(probes) {
        let t = outs.get(*o).ok_or_else(|| {
            gc_err(format!(
                "the function returned {} outputs on a perturbed input, {} before",
                outs.len(),
                outs_meta.len()
            ))
        })?;
        if &t.shape() != shape {
            return Err(gc_err(format!(
                "output {o} has shape {:?} on a perturbed input, {shape:?} before",
                t.shape()
            )));
        }
        let v = t.to_vec::<f64>();
        res.push(match probe {
            Probe::Full => v,
            Probe::Projected(u) => {
                let u = u.to_vec::<f64>();
                vec![v.iter().zip(&u).map(|(a, b)| a * b).sum()]
            }
        });
    }
    Ok(res)
}

/// `torch.autograd.gradcheck` for a function with one output. See the
/// module docs; the error (op `gradcheck`) names the output, the input
/// index, the element (flat and multi-index) and both values.
pub fn gradcheck(
    f: impl Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[Tensor],
    eps: f64,
    atol: f64,
    rtol: f64,
) -> Result<()> {
    gradcheck_outputs(|t| Ok(vec![f(t)?]), inputs, eps, atol, rtol)
}

/// `gradcheck` with torch's default `eps`, `atol` and `rtol`.
pub fn gradcheck_default(f: impl Fn(&[Tensor]) -> Result<Tensor>, inputs: &[Tensor]) -> Result<()> {
    gradcheck(f, inputs, EPS, ATOL, RTOL)
}

/// `gradcheck` for a function with several outputs (every floating output
/// is checked; integer/bool outputs such as indices are skipped).
pub fn gradcheck_outputs(
    f: impl Fn(&[Tensor]) -> Result<Vec<Tensor>>,
    inputs: &[Tensor],
    eps: f64,
    atol: f64,
    rtol: f64,
) -> Result<()> {
    let _mode = Mode(set_grad_enabled(true));
    let input_ids: Vec<usize> = (0..inputs.len())
        .filter(|&i| inputs[i].requires_grad())
        .collect();
    if input_ids.is_empty() {
        return Err(gc_err(
            "no input requires grad: mark the inputs to check with requires_grad_(true)",
        ));
    }
    for &i in &input_ids {
        let x = &inputs[i];
        if x.dtype() != DType::F64 {
            return Err(gc_err(format!(
                "input {i} (shape {:?}) is {}; inputs that require grad must be f64 (finite differences in lower precision are too coarse)",
                x.shape(),
                x.dtype()
            )));
        }
        let l = x.layout();
        if l.shape
            .iter()
            .zip(&l.strides)
            .any(|(&n, &s)| n > 1 && s == 0)
        {
            return Err(gc_err(format!(
                "input {i} (shape {:?}, strides {:?}) has overlapping memory (an expanded tensor): perturbing one element would perturb several",
                l.shape, l.strides
            )));
        }
    }
    let diff_inputs: Vec<Tensor> = input_ids.iter().map(|&i| inputs[i].clone()).collect();

    // Outputs and how each is probed.
    let outs = f(inputs)?;
    let mut outs_meta = Vec::new();
    let mut probes = Vec::new();
    let mut rng = ChaCha8Rng::seed_from_u64(0x6772_6164);
    for (o, t) in outs.iter().enumerate() {
        if !t.dtype().is_float() {
            continue;
        }
        outs_meta.push((o, t.shape()));
        probes.push(if t.numel() <= FULL_JACOBIAN_MAX {
            Probe::Full
        } else {
            let u: Vec<f64> = (0..t.numel())
                .map(|_| rng.gen::<f64>() * 2.0 - 1.0)
                .collect();
            Probe::Projected(Tensor::from_vec(u, &t.shape())?.to_dtype(t.dtype())?)
        });
    }
    if outs_meta.is_empty() {
        return Err(gc_err("the function returned no floating point output"));
    }

    // Analytic Jacobians, twice (the backward must be deterministic).
    let mut ana = Vec::with_capacity(outs_meta.len());
    for ((o, _), probe) in outs_meta.iter().zip(&probes) {
        let a1 = analytic(&outs[*o], probe, &diff_inputs, &input_ids)?;
        let a2 = analytic(&outs[*o], probe, &diff_inputs, &input_ids)?;
        if a1 != a2 {
            return Err(gc_err(format!(
                "backward is not reentrant: two backward passes of output {o} gave different gradients"
            )));
        }
        ana.push(a1);
    }
    drop(outs);

    // Numerical Jacobians by central differences, one input element at a time.
    let f: &dyn Fn(&[Tensor]) -> Result<Vec<Tensor>> = &f;
    for (p, (&i, x)) in input_ids.iter().zip(&diff_inputs).enumerate() {
        let shape = x.shape();
        #[allow(clippy::needless_range_loop)] // e indexes the input and ana[q][r][p]
        for e in 0..x.numel() {
            let pos = storage_pos(x, e);
            let orig = read_elem(x, pos);
            write_elem(x, pos, orig + eps);
            let plus = eval_probed(f, inputs, &outs_meta, &probes);
            write_elem(x, pos, orig - eps);
            let minus = eval_probed(f, inputs, &outs_meta, &probes);
            write_elem(x, pos, orig);
            let (plus, minus) = (plus?, minus?);
            for (q, (o, oshape)) in outs_meta.iter().enumerate() {
                for (r, (a, b)) in plus[q].iter().zip(&minus[q]).enumerate() {
                    let num = (a - b) / (2.0 * eps);
                    let an = ana[q][r][p][e];
                    let ok = (an - num).abs() <= atol + rtol * num.abs()
                        || (an.is_nan() && num.is_nan());
                    if !ok {
                        let which = match probes[q] {
                            Probe::Full => {
                                format!("output {o} element {r} (index {:?})", unravel(r, oshape))
                            }
                            Probe::Projected(_) => {
                                format!(
                                    "output {o} (shape {oshape:?}) projected on a random vector"
                                )
                            }
                        };
                        return Err(gc_err(format!(
                            "Jacobian mismatch for {which} with respect to input {i} element {e} (index {:?}, input shape {shape:?}): numerical {num:.10e}, analytical {an:.10e} (atol {atol:e}, rtol {rtol:e}, eps {eps:e})",
                            unravel(e, &shape)
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

// -------------------------------------------------------------------- inputs

fn leaf(v: Vec<f64>, shape: &[usize]) -> Tensor {
    Tensor::from_vec(v, shape)
        .and_then(|t| t.requires_grad_(true))
        .expect("f64 leaf")
}

/// An f64 leaf that requires grad with the given values.
pub fn input(values: &[f64], shape: &[usize]) -> Tensor {
    leaf(values.to_vec(), shape)
}

/// An f64 leaf requiring grad, uniform in [lo, hi), from its own generator
/// seeded with `seed` (independent of `manual_seed` and of other tests).
pub fn uniform(shape: &[usize], lo: f64, hi: f64, seed: u64) -> Tensor {
    let mut g = ChaCha8Rng::seed_from_u64(seed);
    let n = kiln_ir::numel(shape);
    leaf(
        (0..n).map(|_| lo + (hi - lo) * g.gen::<f64>()).collect(),
        shape,
    )
}

/// An f64 leaf requiring grad whose values have magnitude in
/// [margin, margin + spread) and a random sign: safe for relu, abs,
/// leaky_relu, and clamp bounds at 0.
pub fn away_from_zero(shape: &[usize], margin: f64, spread: f64, seed: u64) -> Tensor {
    let mut g = ChaCha8Rng::seed_from_u64(seed);
    let n = kiln_ir::numel(shape);
    leaf(
        (0..n)
            .map(|_| {
                let m = margin + spread * g.gen::<f64>();
                if g.gen::<bool>() {
                    m
                } else {
                    -m
                }
            })
            .collect(),
        shape,
    )
}

/// An f64 leaf requiring grad with pairwise distinct values: a shuffled
/// ramp from `lo` with step `step` (so no ties: safe for max/min, maximum,
/// sorting). Elements differ by at least `step`.
pub fn distinct(shape: &[usize], lo: f64, step: f64, seed: u64) -> Tensor {
    let mut g = ChaCha8Rng::seed_from_u64(seed);
    let n = kiln_ir::numel(shape);
    let mut v: Vec<f64> = (0..n).map(|i| lo + step * i as f64).collect();
    for i in (1..n).rev() {
        let j = g.gen_range(0..=i);
        v.swap(i, j);
    }
    leaf(v, shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_a_correct_gradient_and_reports_a_wrong_one() {
        let x = uniform(&[2, 3], -1.0, 1.0, 7);
        let y = uniform(&[3], 0.5, 1.5, 8);
        gradcheck_default(|t| t[0].mul(&t[1])?.sin(), &[x.clone(), y.clone()]).unwrap();
        // .grad is untouched by gradcheck
        assert!(x.grad().is_none() && y.grad().is_none());
        // A deliberately wrong backward: forward x^2, backward says 3x.
        let wrong = |t: &[Tensor]| -> Result<Tensor> {
            let a = t[0].detach();
            let out = crate::autograd::no_grad(|| a.square())?;
            let saved = a.clone();
            crate::autograd::record("WrongBackward", &[&t[0]], &[&out], move |g, _| {
                Ok(vec![Some(
                    g[0].as_ref().unwrap().mul(&saved)?.mul_scalar(3.0)?,
                )])
            });
            Ok(out)
        };
        let err = gradcheck_default(wrong, std::slice::from_ref(&x))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("gradcheck: Jacobian mismatch for output 0 element 0")
                && err.contains("input 0 element 0")
                && err.contains("numerical")
                && err.contains("analytical"),
            "{err}"
        );
        // f32 inputs are refused, naming the input
        let xf = Tensor::ones(&[2], DType::F32).requires_grad_(true).unwrap();
        let err = gradcheck_default(|t| t[0].exp(), &[xf])
            .unwrap_err()
            .to_string();
        assert!(err.contains("input 0") && err.contains("f64"), "{err}");
        // the input values are restored exactly
        let before = x.to_vec::<f64>();
        gradcheck_default(|t| t[0].exp(), std::slice::from_ref(&x)).unwrap();
        assert_eq!(x.to_vec::<f64>(), before);
    }

    #[test]
    fn large_outputs_use_a_projection_and_still_catch_errors() {
        let x = uniform(&[20, 20], -1.0, 1.0, 3);
        gradcheck_default(|t| t[0].tanh(), std::slice::from_ref(&x)).unwrap();
        let wrong = |t: &[Tensor]| -> Result<Tensor> {
            let a = t[0].detach();
            let out = crate::autograd::no_grad(|| a.mul_scalar(2.0))?;
            crate::autograd::record("WrongBackward", &[&t[0]], &[&out], move |g, _| {
                Ok(vec![Some(g[0].as_ref().unwrap().clone())])
            });
            Ok(out)
        };
        let err = gradcheck_default(wrong, &[x]).unwrap_err().to_string();
        assert!(err.contains("projected on a random vector"), "{err}");
    }

    #[test]
    fn input_builders() {
        let d = distinct(&[3, 4], -2.0, 0.25, 1).to_vec::<f64>();
        let mut s = d.clone();
        s.sort_by(f64::total_cmp);
        assert_eq!(
            s,
            (0..12).map(|i| -2.0 + 0.25 * i as f64).collect::<Vec<_>>()
        );
        assert!(away_from_zero(&[50], 0.1, 1.0, 2)
            .to_vec::<f64>()
            .iter()
            .all(|v| v.abs() >= 0.1));
        assert_eq!(
            uniform(&[4], 0.0, 1.0, 5).to_vec::<f64>(),
            uniform(&[4], 0.0, 1.0, 5).to_vec::<f64>()
        );
        assert!(uniform(&[4], 0.0, 1.0, 5).requires_grad());
    }
}
