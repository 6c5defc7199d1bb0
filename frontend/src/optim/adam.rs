//! Adam and AdamW, as PyTorch's `_single_tensor_adam` (AdamW = decoupled
//! weight decay: `param.mul_(1 - lr * weight_decay)` before the update).
//! Bias corrections are computed in f64 from the f32 `step` counter, as
//! PyTorch does in Python floats; tensor ops run in the parameter's dtype in
//! PyTorch's order: `exp_avg.lerp_(grad, 1-beta1)`,
//! `exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1-beta2)`,
//! `denom = (exp_avg_sq.sqrt() / sqrt(bc2)).add_(eps)`,
//! `param.addcdiv_(exp_avg, denom, value=-lr/bc1)`.

use super::{
    check_entry_names, fused, get_bool, get_f64, load_like, GroupOptions, Groups, Optimizer,
    OptimizerStateDict, ParamGroup,
};
use crate::autograd::NoGradGuard;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_ir::DType;
use serde_json::{Map, Value};

/// Adam/AdamW hyperparameters.
#[derive(Clone, Debug)]
pub struct AdamOptions {
    pub lr: f64,
    pub betas: (f64, f64),
    pub eps: f64,
    pub weight_decay: f64,
    pub amsgrad: bool,
    pub maximize: bool,
    /// AdamW's decoupled weight decay.
    pub decoupled_weight_decay: bool,
}

impl AdamOptions {
    /// `torch.optim.Adam` defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, no weight decay.
    pub fn adam(lr: f64) -> AdamOptions {
        AdamOptions {
            lr,
            betas: (0.9, 0.999),
            eps: 1e-8,
            weight_decay: 0.0,
            amsgrad: false,
            maximize: false,
            decoupled_weight_decay: false,
        }
    }

    /// `torch.optim.AdamW` defaults: as Adam with weight_decay 1e-2, decoupled.
    pub fn adamw(lr: f64) -> AdamOptions {
        AdamOptions {
            weight_decay: 1e-2,
            decoupled_weight_decay: true,
            ..AdamOptions::adam(lr)
        }
    }

    fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::op("Adam", m));
        if self.lr < 0.0 {
            return bad(format!("Invalid learning rate: {}", self.lr));
        }
        if self.eps < 0.0 {
            return bad(format!("Invalid epsilon value: {}", self.eps));
        }
        if !(0.0..1.0).contains(&self.betas.0) {
            return bad(format!(
                "Invalid beta parameter at index 0: {}",
                self.betas.0
            ));
        }
        if !(0.0..1.0).contains(&self.betas.1) {
            return bad(format!(
                "Invalid beta parameter at index 1: {}",
                self.betas.1
            ));
        }
        if self.weight_decay < 0.0 {
            return bad(format!("Invalid weight_decay value: {}", self.weight_decay));
        }
        Ok(())
    }
}

impl Default for AdamOptions {
    fn default() -> Self {
        AdamOptions::adam(1e-3)
    }
}

impl GroupOptions for AdamOptions {
    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.lr
    }
    fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("lr".into(), Value::from(self.lr));
        m.insert(
            "betas".into(),
            Value::from(vec![self.betas.0, self.betas.1]),
        );
        m.insert("eps".into(), Value::from(self.eps));
        m.insert("weight_decay".into(), Value::from(self.weight_decay));
        m.insert("amsgrad".into(), Value::from(self.amsgrad));
        m.insert("maximize".into(), Value::from(self.maximize));
        m.insert(
            "decoupled_weight_decay".into(),
            Value::from(self.decoupled_weight_decay),
        );
        m
    }
    fn update_from_json(&mut self, v: &Map<String, Value>) -> Result<()> {
        get_f64(v, "lr", &mut self.lr)?;
        get_f64(v, "eps", &mut self.eps)?;
        get_f64(v, "weight_decay", &mut self.weight_decay)?;
        get_bool(v, "amsgrad", &mut self.amsgrad)?;
        get_bool(v, "maximize", &mut self.maximize)?;
        get_bool(
            v,
            "decoupled_weight_decay",
            &mut self.decoupled_weight_decay,
        )?;
        if let Some(b) = v.get("betas") {
            let b = b
                .as_array()
                .filter(|a| a.len() == 2)
                .and_then(|a| Some((a[0].as_f64()?, a[1].as_f64()?)))
                .ok_or_else(|| {
                    Error::op(
                        "load_state_dict",
                        "param group `betas` is not a pair of numbers",
                    )
                })?;
            self.betas = b;
        }
        self.validate()
    }
}

#[derive(Clone)]
pub(crate) struct AdamState {
    step: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Option<Tensor>,
}

/// `torch.optim.Adam` / `torch.optim.AdamW` (see `AdamOptions::adamw`).
pub struct Adam {
    g: Groups<AdamOptions, AdamState>,
    fused: bool,
}

impl Adam {
    pub fn new(params: Vec<Tensor>, options: AdamOptions) -> Result<Adam> {
        Adam::with_groups(vec![ParamGroup::new(params, options)])
    }

    /// `torch.optim.AdamW(params, lr)` with its defaults.
    pub fn adamw(params: Vec<Tensor>, lr: f64) -> Result<Adam> {
        Adam::new(params, AdamOptions::adamw(lr))
    }

    pub fn with_groups(groups: Vec<ParamGroup<AdamOptions>>) -> Result<Adam> {
        for g in &groups {
            g.options.validate()?;
        }
        Ok(Adam {
            g: Groups::new(groups)?,
            fused: false,
        })
    }

    /// Use the fused step (`optim::fused`): one pass per parameter over
    /// gradient, state and parameter, bit-for-bit the eager step's result.
    pub fn set_fused(&mut self, fused: bool) -> &mut Adam {
        self.fused = fused;
        self
    }

    pub fn is_fused(&self) -> bool {
        self.fused
    }

    pub fn add_param_group(&mut self, group: ParamGroup<AdamOptions>) -> Result<()> {
        group.options.validate()?;
        self.g.add(group)
    }

    pub fn param_groups(&self) -> &[ParamGroup<AdamOptions>] {
        &self.g.groups
    }

    /// (step, exp_avg, exp_avg_sq) of a parameter, once a step created them.
    pub fn param_state(&self, p: &Tensor) -> Option<(f64, Tensor, Tensor)> {
        self.g.state.get(&p.id()).map(|s| {
            (
                s.step.item().unwrap_or(0.0),
                s.exp_avg.clone(),
                s.exp_avg_sq.clone(),
            )
        })
    }
}

impl Optimizer for Adam {
    fn step(&mut self) -> Result<()> {
        let _ng = NoGradGuard::new();
        for group in &self.g.groups {
            let o = &group.options;
            let (beta1, beta2) = o.betas;
            for p in &group.params {
                let Some(grad) = p.grad() else { continue };
                let mut grad = if o.maximize { grad.neg()? } else { grad };
                let st = match self.g.state.get(&p.id()) {
                    Some(s) => s.clone(),
                    None => {
                        let s = AdamState {
                            step: Tensor::zeros(&[], DType::F32),
                            exp_avg: p.zeros_like()?,
                            exp_avg_sq: p.zeros_like()?,
                            max_exp_avg_sq: if o.amsgrad {
                                Some(p.zeros_like()?)
                            } else {
                                None
                            },
                        };
                        self.g.state.insert(p.id(), s.clone());
                        s
                    }
                };
                st.step.add_(&Tensor::scalar(1.0f32))?;
                let mut state: Vec<&Tensor> = vec![&grad, &st.exp_avg, &st.exp_avg_sq];
                state.extend(st.max_exp_avg_sq.as_ref());
                if self.fused && fused::applies(p, &state) {
                    let h = fused::AdamHyper {
                        lr: o.lr,
                        beta1,
                        beta2,
                        eps: o.eps,
                        weight_decay: o.weight_decay,
                        decoupled: o.decoupled_weight_decay,
                        // `grad` is already negated for maximize.
                        maximize: false,
                        step: st.step.item()?,
                    };
                    fused::adam(
                        p,
                        &grad,
                        &st.exp_avg,
                        &st.exp_avg_sq,
                        st.max_exp_avg_sq.as_ref(),
                        h,
                    )?;
                    continue;
                }
                if o.weight_decay != 0.0 {
                    if o.decoupled_weight_decay {
                        p.mul_scalar_(1.0 - o.lr * o.weight_decay)?;
                    } else {
                        grad = grad.add(&p.mul_scalar(o.weight_decay)?)?;
                    }
                }
                // exp_avg.lerp_(grad, 1 - beta1)
                let w = 1.0 - beta1;
                let lerped = if w < 0.5 {
                    st.exp_avg.add(&grad.sub(&st.exp_avg)?.mul_scalar(w)?)?
                } else {
                    grad.sub(&grad.sub(&st.exp_avg)?.mul_scalar(1.0 - w)?)?
                };
                st.exp_avg.copy_(&lerped)?;
                // exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                st.exp_avg_sq.mul_scalar_(beta2)?;
                st.exp_avg_sq
                    .add_(&grad.mul_scalar(1.0 - beta2)?.mul(&grad)?)?;
                let step = st.step.item()?;
                let bias_correction1 = 1.0 - beta1.powf(step);
                let bias_correction2 = 1.0 - beta2.powf(step);
                let step_size = o.lr / bias_correction1;
                let bc2_sqrt = Tensor::full(&[], bias_correction2.sqrt(), p.dtype());
                let second = match &st.max_exp_avg_sq {
                    Some(m) => {
                        m.copy_(&m.maximum(&st.exp_avg_sq)?)?;
                        m.clone()
                    }
                    None => st.exp_avg_sq.clone(),
                };
                let denom = second.sqrt()?.div(&bc2_sqrt)?.add_scalar(o.eps)?;
                // param.addcdiv_(exp_avg, denom, value=-step_size)
                p.add_(&st.exp_avg.mul_scalar(-step_size)?.div(&denom)?)?;
            }
        }
        Ok(())
    }

    fn zero_grad(&mut self, set_to_none: bool) -> Result<()> {
        self.g.zero_grad(set_to_none)
    }

    fn state_dict(&self) -> OptimizerStateDict {
        self.g.state_dict(|s| {
            let mut v = vec![
                ("step".to_string(), s.step.clone()),
                ("exp_avg".to_string(), s.exp_avg.clone()),
                ("exp_avg_sq".to_string(), s.exp_avg_sq.clone()),
            ];
            if let Some(m) = &s.max_exp_avg_sq {
                v.push(("max_exp_avg_sq".to_string(), m.clone()));
            }
            v
        })
    }

    fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<()> {
        self.g.load_state_dict(sd, make_state)
    }

    fn check_state_dict(&self, sd: &OptimizerStateDict) -> Result<()> {
        self.g.plan_load(sd, make_state).map(|_| ())
    }

    fn kind(&self) -> &'static str {
        "Adam"
    }

    fn lrs(&self) -> Vec<f64> {
        self.g.groups.iter().map(|g| g.options.lr).collect()
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.g.set_lr(group, lr)
    }
}

fn make_state(p: &Tensor, e: &[(String, Tensor)]) -> Result<AdamState> {
    check_entry_names(
        "Adam",
        e,
        &["step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"],
    )?;
    let step = e
        .iter()
        .find(|(k, _)| k == "step")
        .map(|(_, t)| {
            t.to_dtype(DType::F32)
                .and_then(|t| t.reshape(&[])?.clone_tensor())
        })
        .transpose()?
        .ok_or_else(|| Error::op("load_state_dict", "Adam state without `step`"))?
        .detach();
    let req = |name: &str| -> Result<Tensor> {
        load_like(p, e, name)?
            .ok_or_else(|| Error::op("load_state_dict", format!("Adam state without `{name}`")))
    };
    Ok(AdamState {
        step,
        exp_avg: req("exp_avg")?,
        exp_avg_sq: req("exp_avg_sq")?,
        max_exp_avg_sq: load_like(p, e, "max_exp_avg_sq")?,
    })
}
