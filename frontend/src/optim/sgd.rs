//! SGD with momentum, dampening, Nesterov, weight decay and maximize, as
//! PyTorch's `_single_tensor_sgd`.

use super::{
    check_entry_names, fused, get_bool, get_f64, load_like, GroupOptions, Groups, Optimizer,
    OptimizerStateDict, ParamGroup,
};
use crate::autograd::NoGradGuard;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use serde_json::{Map, Value};

/// `torch.optim.SGD` hyperparameters (PyTorch's defaults: lr 1e-3, the rest 0/false).
#[derive(Clone, Debug)]
pub struct SgdOptions {
    pub lr: f64,
    pub momentum: f64,
    pub dampening: f64,
    pub weight_decay: f64,
    pub nesterov: bool,
    pub maximize: bool,
}

impl Default for SgdOptions {
    fn default() -> Self {
        SgdOptions {
            lr: 1e-3,
            momentum: 0.0,
            dampening: 0.0,
            weight_decay: 0.0,
            nesterov: false,
            maximize: false,
        }
    }
}

impl SgdOptions {
    pub fn lr(lr: f64) -> SgdOptions {
        SgdOptions {
            lr,
            ..Default::default()
        }
    }
    fn validate(&self) -> Result<()> {
        if self.lr < 0.0 {
            return Err(Error::op(
                "SGD",
                format!("Invalid learning rate: {}", self.lr),
            ));
        }
        if self.momentum < 0.0 {
            return Err(Error::op(
                "SGD",
                format!("Invalid momentum value: {}", self.momentum),
            ));
        }
        if self.weight_decay < 0.0 {
            return Err(Error::op(
                "SGD",
                format!("Invalid weight_decay value: {}", self.weight_decay),
            ));
        }
        if self.nesterov && (self.momentum <= 0.0 || self.dampening != 0.0) {
            return Err(Error::op(
                "SGD",
                "Nesterov momentum requires a momentum and zero dampening",
            ));
        }
        Ok(())
    }
}

impl GroupOptions for SgdOptions {
    fn lr_mut(&mut self) -> &mut f64 {
        &mut self.lr
    }
    fn to_json(&self) -> Map<String, Value> {
        let mut m = Map::new();
        m.insert("lr".into(), Value::from(self.lr));
        m.insert("momentum".into(), Value::from(self.momentum));
        m.insert("dampening".into(), Value::from(self.dampening));
        m.insert("weight_decay".into(), Value::from(self.weight_decay));
        m.insert("nesterov".into(), Value::from(self.nesterov));
        m.insert("maximize".into(), Value::from(self.maximize));
        m
    }
    fn update_from_json(&mut self, v: &Map<String, Value>) -> Result<()> {
        get_f64(v, "lr", &mut self.lr)?;
        get_f64(v, "momentum", &mut self.momentum)?;
        get_f64(v, "dampening", &mut self.dampening)?;
        get_f64(v, "weight_decay", &mut self.weight_decay)?;
        get_bool(v, "nesterov", &mut self.nesterov)?;
        get_bool(v, "maximize", &mut self.maximize)?;
        self.validate()
    }
}

#[derive(Clone)]
pub(crate) struct SgdState {
    momentum_buffer: Option<Tensor>,
}

/// `torch.optim.SGD`.
pub struct SGD {
    g: Groups<SgdOptions, SgdState>,
    fused: bool,
}

impl SGD {
    /// One group holding `params`.
    pub fn new(params: Vec<Tensor>, options: SgdOptions) -> Result<SGD> {
        SGD::with_groups(vec![ParamGroup::new(params, options)])
    }

    pub fn with_groups(groups: Vec<ParamGroup<SgdOptions>>) -> Result<SGD> {
        for g in &groups {
            g.options.validate()?;
        }
        Ok(SGD {
            g: Groups::new(groups)?,
            fused: false,
        })
    }

    pub fn add_param_group(&mut self, group: ParamGroup<SgdOptions>) -> Result<()> {
        group.options.validate()?;
        self.g.add(group)
    }

    pub fn param_groups(&self) -> &[ParamGroup<SgdOptions>] {
        &self.g.groups
    }

    /// Use the fused step (`optim::fused`): one pass per parameter over
    /// gradient, state and parameter, bit-for-bit the eager step's result.
    pub fn set_fused(&mut self, fused: bool) -> &mut SGD {
        self.fused = fused;
        self
    }

    pub fn is_fused(&self) -> bool {
        self.fused
    }

    /// The momentum buffer of a parameter, once a step created it.
    pub fn momentum_buffer(&self, p: &Tensor) -> Option<Tensor> {
        self.g
            .state
            .get(&p.id())
            .and_then(|s| s.momentum_buffer.clone())
    }
}

impl Optimizer for SGD {
    fn step(&mut self) -> Result<()> {
        let _ng = NoGradGuard::new();
        for group in &self.g.groups {
            let o = &group.options;
            for p in &group.params {
                let Some(grad) = p.grad() else { continue };
                if self.fused && fused::applies(p, &[&grad]) {
                    let (buf, first) = if o.momentum != 0.0 {
                        let st = self.g.state.entry(p.id()).or_insert(SgdState {
                            momentum_buffer: None,
                        });
                        match &st.momentum_buffer {
                            Some(b) if fused::applies(p, &[&grad, b]) => (Some(b.clone()), false),
                            Some(_) => (None, false),
                            None => {
                                let b = p.zeros_like()?.detach();
                                st.momentum_buffer = Some(b.clone());
                                (Some(b), true)
                            }
                        }
                    } else {
                        (None, false)
                    };
                    if o.momentum == 0.0 || buf.is_some() {
                        let h = fused::SgdHyper {
                            lr: o.lr,
                            momentum: o.momentum,
                            dampening: o.dampening,
                            weight_decay: o.weight_decay,
                            nesterov: o.nesterov,
                            maximize: o.maximize,
                            first,
                        };
                        fused::sgd(p, &grad, buf.as_ref(), h)?;
                        continue;
                    }
                }
                let mut d_p = if o.maximize { grad.neg()? } else { grad };
                if o.weight_decay != 0.0 {
                    // grad.add(param, alpha=weight_decay)
                    d_p = d_p.add(&p.mul_scalar(o.weight_decay)?)?;
                }
                if o.momentum != 0.0 {
                    let st = self.g.state.entry(p.id()).or_insert(SgdState {
                        momentum_buffer: None,
                    });
                    let buf = match &st.momentum_buffer {
                        None => {
                            let b = d_p.clone_tensor()?.detach();
                            st.momentum_buffer = Some(b.clone());
                            b
                        }
                        Some(b) => {
                            // buf.mul_(momentum).add_(grad, alpha=1 - dampening)
                            b.mul_scalar_(o.momentum)?;
                            if o.dampening == 0.0 {
                                b.add_(&d_p)?;
                            } else {
                                b.add_scaled_(&d_p, 1.0 - o.dampening)?;
                            }
                            b.clone()
                        }
                    };
                    d_p = if o.nesterov {
                        d_p.add(&buf.mul_scalar(o.momentum)?)?
                    } else {
                        buf
                    };
                }
                // param.add_(grad, alpha=-lr)
                p.add_scaled_(&d_p, -o.lr)?;
            }
        }
        Ok(())
    }

    fn zero_grad(&mut self, set_to_none: bool) -> Result<()> {
        self.g.zero_grad(set_to_none)
    }

    fn state_dict(&self) -> OptimizerStateDict {
        self.g.state_dict(|s| {
            s.momentum_buffer
                .iter()
                .map(|b| ("momentum_buffer".to_string(), b.clone()))
                .collect()
        })
    }

    fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<()> {
        self.g.load_state_dict(sd, make_state)
    }

    fn check_state_dict(&self, sd: &OptimizerStateDict) -> Result<()> {
        self.g.plan_load(sd, make_state).map(|_| ())
    }

    fn kind(&self) -> &'static str {
        "SGD"
    }

    fn lrs(&self) -> Vec<f64> {
        self.g.groups.iter().map(|g| g.options.lr).collect()
    }

    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        self.g.set_lr(group, lr)
    }
}

fn make_state(p: &Tensor, e: &[(String, Tensor)]) -> Result<SgdState> {
    check_entry_names("SGD", e, &["momentum_buffer"])?;
    Ok(SgdState {
        momentum_buffer: load_like(p, e, "momentum_buffer")?,
    })
}
