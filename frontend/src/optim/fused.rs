//! Fused optimizer steps (`SGD::set_fused(true)`, `Adam::set_fused(true)`):
//! one pass over each parameter's elements that reads the gradient and the
//! state once and writes the parameter and the state in place, for all
//! parameters of a group in one call, instead of eager's chain of
//! elementwise ops (each a full pass with a fresh buffer). The arithmetic
//! is eager's, operation by operation in the same order and the same
//! precision (the scalar hyperparameters rounded to the parameter's dtype
//! as the eager kernels round them), so the result is bit-for-bit eager's.
//! The state lives in the optimizer as for eager, so `state_dict` is the
//! same. Large tensors are split into chunks run in parallel.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_cpu::{Element, Float};
use kiln_ir::DType;
use rayon::prelude::*;
use std::sync::atomic::Ordering;

/// Elements per parallel chunk.
const CHUNK: usize = 1 << 15;

/// SGD hyperparameters of one group, as the fused kernel needs them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct SgdHyper {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
    /// The momentum buffer was just created (first step): buf = d_p.
    pub first: bool,
}

/// Adam hyperparameters of one group and step.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamHyper {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    pub decoupled: bool,
    pub maximize: bool,
    /// The step count after this step's increment.
    pub step: f64,
}

/// A contiguous float tensor, checked for the fused path.
fn check(op: &str, t: &Tensor, d: DType, n: usize) -> Result<()> {
    if !t.is_contiguous() || t.dtype() != d || t.numel() != n {
        return Err(Error::op(
            op,
            format!(
                "fused step needs contiguous {d} tensors of {n} elements, got {} {:?}",
                t.dtype(),
                t.shape()
            ),
        ));
    }
    Ok(())
}

/// Whether the fused path applies to these tensors (distinct storages,
/// contiguous, f32/f64); otherwise the caller runs the eager step.
pub(crate) fn applies(p: &Tensor, others: &[&Tensor]) -> bool {
    matches!(p.dtype(), DType::F32 | DType::F64)
        && p.is_contiguous()
        && others.iter().all(|o| {
            o.is_contiguous()
                && o.dtype() == p.dtype()
                && o.numel() == p.numel()
                && !o.shares_storage(p)
        })
        && others
            .iter()
            .enumerate()
            .all(|(i, a)| others[i + 1..].iter().all(|b| !a.shares_storage(b)))
}

/// Runs `f` on the parameter (mutable), the gradient (read) and the state
/// tensors (mutable), each as a contiguous slice.
fn with_slices<T: Element>(
    p: &Tensor,
    grad: &Tensor,
    state: &[&Tensor],
    f: impl FnOnce(&mut [T], &[T], &mut [&mut [T]]),
) -> Result<()> {
    let n = p.numel();
    for t in std::iter::once(grad).chain(state.iter().copied()) {
        check("fused optimizer step", t, p.dtype(), n)?;
    }
    let pd = p.data();
    let gd = grad.data();
    let sds: Vec<_> = state.iter().map(|t| t.data()).collect();
    let gbuf = gd.storage.buf.read();
    let g = &T::slice(&gbuf).expect("dtype checked")[gd.layout.offset..gd.layout.offset + n];
    let mut pbuf = pd.storage.buf.write();
    let pv = &mut T::slice_mut(&mut pbuf).expect("dtype checked")
        [pd.layout.offset..pd.layout.offset + n];
    let mut sbufs: Vec<_> = sds.iter().map(|d| d.storage.buf.write()).collect();
    let mut svs: Vec<&mut [T]> = sbufs
        .iter_mut()
        .zip(&sds)
        .map(|(b, d)| {
            &mut T::slice_mut(&mut *b).expect("dtype checked")[d.layout.offset..d.layout.offset + n]
        })
        .collect();
    f(pv, g, &mut svs);
    drop(svs);
    drop(sbufs);
    drop(pbuf);
    pd.storage.version.fetch_add(1, Ordering::Relaxed);
    for d in &sds {
        d.storage.version.fetch_add(1, Ordering::Relaxed);
    }
    Ok(())
}

fn sgd_typed<T: Float + Element>(
    p: &Tensor,
    grad: &Tensor,
    buf: Option<&Tensor>,
    h: SgdHyper,
) -> Result<()> {
    let state: Vec<&Tensor> = buf.into_iter().collect();
    with_slices::<T>(p, grad, &state, |pv, g, st| {
        let wd = T::c(h.weight_decay);
        let mom = T::c(h.momentum);
        let damp = T::c(1.0 - h.dampening);
        let neg_lr = T::c(-h.lr);
        let kernel = |pv: &mut [T], g: &[T], mut b: Option<&mut [T]>| {
            for i in 0..pv.len() {
                let mut d = if h.maximize { -g[i] } else { g[i] };
                if h.weight_decay != 0.0 {
                    d += pv[i] * wd;
                }
                if let Some(b) = b.as_deref_mut() {
                    let nb = if h.first {
                        d
                    } else if h.dampening == 0.0 {
                        b[i] * mom + d
                    } else {
                        b[i] * mom + d * damp
                    };
                    b[i] = nb;
                    d = if h.nesterov { d + nb * mom } else { nb };
                }
                pv[i] += d * neg_lr;
            }
        };
        match st.first_mut() {
            Some(b) => pv
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(b.par_chunks_mut(CHUNK))
                .for_each(|((pc, gc), bc)| kernel(pc, gc, Some(bc))),
            None => pv
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .for_each(|(pc, gc)| kernel(pc, gc, None)),
        }
    })
}

/// One fused SGD update of `p` (and its momentum buffer when momentum != 0).
pub(crate) fn sgd(p: &Tensor, grad: &Tensor, buf: Option<&Tensor>, h: SgdHyper) -> Result<()> {
    match p.dtype() {
        DType::F32 => sgd_typed::<f32>(p, grad, buf, h),
        DType::F64 => sgd_typed::<f64>(p, grad, buf, h),
        d => Err(Error::op(
            "SGD",
            format!("fused step not implemented for {d}"),
        )),
    }
}

fn adam_typed<T: Float + Element>(
    p: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    max_exp_avg_sq: Option<&Tensor>,
    h: AdamHyper,
) -> Result<()> {
    let mut state = vec![exp_avg, exp_avg_sq];
    state.extend(max_exp_avg_sq);
    let bias_correction1 = 1.0 - h.beta1.powf(h.step);
    let bias_correction2 = 1.0 - h.beta2.powf(h.step);
    let step_size = h.lr / bias_correction1;
    with_slices::<T>(p, grad, &state, |pv, g, st| {
        let decay = T::c(1.0 - h.lr * h.weight_decay);
        let wd = T::c(h.weight_decay);
        let w = 1.0 - h.beta1;
        let (wt, one_minus_w) = (T::c(w), T::c(1.0 - w));
        let beta2 = T::c(h.beta2);
        let one_minus_beta2 = T::c(1.0 - h.beta2);
        let bc2_sqrt = T::c(bias_correction2.sqrt());
        let eps = T::c(h.eps);
        let neg_step = T::c(-step_size);
        let kernel = |pv: &mut [T], g: &[T], ea: &mut [T], eas: &mut [T], mx: Option<&mut [T]>| {
            let mut mx = mx;
            for i in 0..pv.len() {
                let mut gi = if h.maximize { -g[i] } else { g[i] };
                if h.weight_decay != 0.0 {
                    if h.decoupled {
                        pv[i] *= decay;
                    } else {
                        gi += pv[i] * wd;
                    }
                }
                // exp_avg.lerp_(grad, 1 - beta1), eager's two branches.
                ea[i] = if w < 0.5 {
                    ea[i] + (gi - ea[i]) * wt
                } else {
                    gi - (gi - ea[i]) * one_minus_w
                };
                eas[i] = eas[i] * beta2 + gi * one_minus_beta2 * gi;
                let second = match mx.as_deref_mut() {
                    Some(m) => {
                        let v = if m[i].is_nan() || eas[i].is_nan() {
                            T::nan()
                        } else if m[i] > eas[i] {
                            m[i]
                        } else {
                            eas[i]
                        };
                        m[i] = v;
                        v
                    }
                    None => eas[i],
                };
                let denom = second.sqrt() / bc2_sqrt + eps;
                pv[i] += ea[i] * neg_step / denom;
            }
        };
        let (ea, rest) = st.split_first_mut().expect("exp_avg");
        let (eas, rest) = rest.split_first_mut().expect("exp_avg_sq");
        match rest.first_mut() {
            Some(m) => pv
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(ea.par_chunks_mut(CHUNK))
                .zip(eas.par_chunks_mut(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .for_each(|((((pc, gc), a), s), mc)| kernel(pc, gc, a, s, Some(mc))),
            None => pv
                .par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(ea.par_chunks_mut(CHUNK))
                .zip(eas.par_chunks_mut(CHUNK))
                .for_each(|(((pc, gc), a), s)| kernel(pc, gc, a, s, None)),
        }
    })
}

/// One fused Adam/AdamW update of `p` and its state.
pub(crate) fn adam(
    p: &Tensor,
    grad: &Tensor,
    exp_avg: &Tensor,
    exp_avg_sq: &Tensor,
    max_exp_avg_sq: Option<&Tensor>,
    h: AdamHyper,
) -> Result<()> {
    match p.dtype() {
        DType::F32 => adam_typed::<f32>(p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, h),
        DType::F64 => adam_typed::<f64>(p, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, h),
        d => Err(Error::op(
            "Adam",
            format!("fused step not implemented for {d}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use crate::optim::{Adam, AdamOptions, Optimizer, SgdOptions, SGD};
    use crate::testing::uniform;
    use crate::{DType, Tensor};

    fn params(d: DType) -> Vec<Tensor> {
        [vec![70_000], vec![3, 5], vec![7]]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                uniform(s, -1.0, 1.0, i as u64 + 1)
                    .to_dtype(d)
                    .unwrap()
                    .detach()
                    .requires_grad_(true)
                    .unwrap()
            })
            .collect()
    }

    /// Three steps of `eager` and `fused` (same hyperparameters) on the
    /// same parameters and gradients: parameters and state_dict bit-equal.
    fn same(mk: &dyn Fn(Vec<Tensor>, bool) -> Box<dyn Optimizer>, d: DType) {
        let (pa, pb) = (params(d), params(d));
        let mut ea = mk(pa.clone(), false);
        let mut fb = mk(pb.clone(), true);
        for step in 0..3u64 {
            for (i, (a, b)) in pa.iter().zip(&pb).enumerate() {
                let g = uniform(&a.shape(), -1.0, 1.0, 100 + 10 * step + i as u64)
                    .to_dtype(d)
                    .unwrap();
                a.set_grad(Some(g.clone_tensor().unwrap()));
                b.set_grad(Some(g));
            }
            ea.step().unwrap();
            fb.step().unwrap();
            for (a, b) in pa.iter().zip(&pb) {
                assert_eq!(a.to_vec_f64(), b.to_vec_f64(), "step {step}");
            }
            let (sa, sb) = (ea.state_dict(), fb.state_dict());
            assert_eq!(sa.param_groups, sb.param_groups);
            assert_eq!(sa.state.len(), sb.state.len());
            for (k, va) in &sa.state {
                let vb = &sb.state[k];
                assert_eq!(va.len(), vb.len());
                for ((na, ta), (nb, tb)) in va.iter().zip(vb) {
                    assert_eq!(na, nb);
                    assert_eq!(ta.dtype(), tb.dtype());
                    assert_eq!(ta.to_vec_f64(), tb.to_vec_f64(), "{na}");
                }
            }
        }
    }

    #[test]
    fn fused_sgd_is_bit_for_bit_eager() {
        let cases = [
            SgdOptions {
                lr: 0.05,
                ..Default::default()
            },
            SgdOptions {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 1e-4,
                ..Default::default()
            },
            SgdOptions {
                lr: 0.05,
                momentum: 0.9,
                nesterov: true,
                weight_decay: 1e-2,
                ..Default::default()
            },
            SgdOptions {
                lr: 0.05,
                momentum: 0.8,
                dampening: 0.3,
                maximize: true,
                ..Default::default()
            },
        ];
        for d in [DType::F32, DType::F64] {
            for o in &cases {
                same(
                    &|p, f| {
                        let mut s = SGD::new(p, o.clone()).unwrap();
                        s.set_fused(f);
                        Box::new(s)
                    },
                    d,
                );
            }
        }
    }

    #[test]
    fn fused_adam_and_adamw_are_bit_for_bit_eager() {
        let mut cases = vec![AdamOptions::adam(1e-3), AdamOptions::adamw(1e-3)];
        let mut o = AdamOptions::adam(1e-2);
        o.weight_decay = 1e-2;
        o.amsgrad = true;
        o.maximize = true;
        o.betas = (0.3, 0.99);
        cases.push(o);
        for d in [DType::F32, DType::F64] {
            for o in &cases {
                same(
                    &|p, f| {
                        let mut a = Adam::new(p, o.clone()).unwrap();
                        a.set_fused(f);
                        Box::new(a)
                    },
                    d,
                );
            }
        }
    }
}
