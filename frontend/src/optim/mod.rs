//! `torch.optim`: SGD, Adam and AdamW over `Module::parameters()`, with
//! PyTorch's update formulas in PyTorch's operation order (the single-tensor
//! CPU path: `_single_tensor_sgd`, `_single_tensor_adam`), parameter groups,
//! `zero_grad`, and `state_dict`/`load_state_dict` (per-parameter state keyed
//! by the parameter's index across groups, plus the groups' hyperparameters).
//! Parameters whose `.grad` is None (frozen ones) are skipped. Steps run under
//! no_grad with in-place ops, so parameters keep their tensor objects.

mod adam;
mod fused;
mod sgd;

pub use adam::{Adam, AdamOptions};
pub use sgd::{SgdOptions, SGD};

use crate::error::{Error, Result};
use crate::nn::StateDict;
use crate::tensor::Tensor;
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashMap, HashSet};

/// A group of parameters sharing hyperparameters (`{'params': [...], 'lr': ...}`).
#[derive(Clone)]
pub struct ParamGroup<O> {
    pub params: Vec<Tensor>,
    pub options: O,
}

impl<O> ParamGroup<O> {
    pub fn new(params: Vec<Tensor>, options: O) -> ParamGroup<O> {
        ParamGroup { params, options }
    }
}

/// Hyperparameters of one optimizer kind, convertible to the JSON object
/// PyTorch's `state_dict()['param_groups'][i]` holds.
pub trait GroupOptions: Clone {
    fn to_json(&self) -> Map<String, Value>;
    fn update_from_json(&mut self, v: &Map<String, Value>) -> Result<()>;
    /// The group's learning rate, for schedulers.
    fn lr_mut(&mut self) -> &mut f64;
}

/// `optimizer.state_dict()`: `state[i]` is the state of parameter `i`
/// (numbered across groups in order), `param_groups[g]` the group's
/// hyperparameters with `"params": [i, ...]`.
#[derive(Clone, Debug, Default)]
pub struct OptimizerStateDict {
    pub state: BTreeMap<usize, Vec<(String, Tensor)>>,
    pub param_groups: Vec<Map<String, Value>>,
}

impl OptimizerStateDict {
    /// Flattens the tensors to `state.<i>.<name>` keys under `prefix` (for a
    /// safetensors checkpoint); the groups go in the returned JSON string.
    pub fn to_flat(&self, prefix: &str) -> (StateDict, String) {
        let mut sd = StateDict::new();
        for (i, entries) in &self.state {
            for (k, t) in entries {
                sd.insert(format!("{prefix}state.{i}.{k}"), t.clone());
            }
        }
        let groups = Value::Array(
            self.param_groups
                .iter()
                .cloned()
                .map(Value::Object)
                .collect(),
        );
        (sd, groups.to_string())
    }

    /// Inverse of `to_flat`.
    pub fn from_flat(
        sd: &StateDict,
        prefix: &str,
        groups_json: &str,
    ) -> Result<OptimizerStateDict> {
        let groups: Value = serde_json::from_str(groups_json)
            .map_err(|e| Error::Format(format!("optimizer param_groups: {e}")))?;
        let param_groups = groups
            .as_array()
            .ok_or_else(|| Error::Format("optimizer param_groups: not a list".into()))?
            .iter()
            .map(|g| {
                g.as_object().cloned().ok_or_else(|| {
                    Error::Format("optimizer param_groups: a group is not an object".into())
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut state: BTreeMap<usize, Vec<(String, Tensor)>> = BTreeMap::new();
        let sp = format!("{prefix}state.");
        for (k, t) in sd.iter() {
            if let Some(rest) = k.strip_prefix(&sp) {
                let (i, name) = rest
                    .split_once('.')
                    .ok_or_else(|| Error::Format(format!("optimizer state key `{k}`")))?;
                let i: usize = i
                    .parse()
                    .map_err(|_| Error::Format(format!("optimizer state key `{k}`")))?;
                state
                    .entry(i)
                    .or_default()
                    .push((name.to_string(), t.clone()));
            }
        }
        Ok(OptimizerStateDict {
            state,
            param_groups,
        })
    }
}

/// What every optimizer does.
pub trait Optimizer {
    /// One update of every parameter that has a gradient.
    fn step(&mut self) -> Result<()>;
    /// Clears (set_to_none, PyTorch's default) or zeroes every parameter's grad.
    fn zero_grad(&mut self, set_to_none: bool) -> Result<()>;
    fn state_dict(&self) -> OptimizerStateDict;
    /// Restores state and hyperparameters; the groups must have the same
    /// sizes as this optimizer's. State tensors are copied (cast to the
    /// parameter's dtype, except `step`).
    fn load_state_dict(&mut self, sd: &OptimizerStateDict) -> Result<()>;
    /// Validates `sd` exactly as `load_state_dict` does, changing nothing
    /// (so a checkpoint restore can check everything before loading any of it).
    fn check_state_dict(&self, sd: &OptimizerStateDict) -> Result<()>;
    /// PyTorch's class name (`"SGD"`, `"Adam"`), stored in checkpoints.
    fn kind(&self) -> &'static str;
    /// The learning rate of each group (for schedulers).
    fn lrs(&self) -> Vec<f64>;
    fn set_lr(&mut self, group: usize, lr: f64) -> Result<()>;
}

/// Shared group/state bookkeeping.
pub(crate) struct Groups<O, S> {
    pub groups: Vec<ParamGroup<O>>,
    pub state: HashMap<u64, S>,
}

impl<O: GroupOptions, S> Groups<O, S> {
    pub fn new(groups: Vec<ParamGroup<O>>) -> Result<Self> {
        let mut g = Groups {
            groups: Vec::new(),
            state: HashMap::new(),
        };
        for group in groups {
            g.add(group)?;
        }
        Ok(g)
    }

    pub fn add(&mut self, group: ParamGroup<O>) -> Result<()> {
        let mut seen: HashSet<u64> = self
            .groups
            .iter()
            .flat_map(|g| g.params.iter().map(|p| p.id()))
            .collect();
        for p in &group.params {
            if !p.is_leaf() {
                return Err(Error::op("optimizer", "can't optimize a non-leaf Tensor"));
            }
            if !seen.insert(p.id()) {
                return Err(Error::op(
                    "optimizer",
                    "some parameters appear in more than one parameter group",
                ));
            }
        }
        self.groups.push(group);
        Ok(())
    }

    /// Sets group `group`'s learning rate.
    pub fn set_lr(&mut self, group: usize, lr: f64) -> Result<()> {
        let g = self
            .groups
            .get_mut(group)
            .ok_or_else(|| Error::op("set_lr", format!("no parameter group {group}")))?;
        *g.options.lr_mut() = lr;
        Ok(())
    }

    pub fn zero_grad(&self, set_to_none: bool) -> Result<()> {
        for g in &self.groups {
            for p in &g.params {
                crate::nn::module::zero_grad_of(p, set_to_none)?;
            }
        }
        Ok(())
    }

    pub fn state_dict(&self, entries: impl Fn(&S) -> Vec<(String, Tensor)>) -> OptimizerStateDict {
        let mut sd = OptimizerStateDict::default();
        let mut idx = 0;
        for g in &self.groups {
            let mut obj = g.options.to_json();
            let mut ids = Vec::new();
            for p in &g.params {
                if let Some(s) = self.state.get(&p.id()) {
                    sd.state.insert(idx, entries(s));
                }
                ids.push(Value::from(idx));
                idx += 1;
            }
            obj.insert("params".into(), Value::Array(ids));
            sd.param_groups.push(obj);
        }
        sd
    }

    /// Validates the shape of `sd` against the groups, then rebuilds the
    /// state with `make` (given the parameter and its saved entries) and
    /// updates the hyperparameters. Nothing changes on error.
    pub fn load_state_dict(
        &mut self,
        sd: &OptimizerStateDict,
        make: impl Fn(&Tensor, &[(String, Tensor)]) -> Result<S>,
    ) -> Result<()> {
        let (new_opts, new_state) = self.plan_load(sd, make)?;
        for (g, o) in self.groups.iter_mut().zip(new_opts) {
            g.options = o;
        }
        self.state = new_state;
        Ok(())
    }

    /// Everything `load_state_dict` would install, or the first error.
    #[allow(clippy::type_complexity)]
    pub fn plan_load(
        &self,
        sd: &OptimizerStateDict,
        make: impl Fn(&Tensor, &[(String, Tensor)]) -> Result<S>,
    ) -> Result<(Vec<O>, HashMap<u64, S>)> {
        if sd.param_groups.len() != self.groups.len() {
            return Err(Error::op(
                "load_state_dict",
                "loaded state dict has a different number of parameter groups",
            ));
        }
        let mut new_opts = Vec::new();
        for (g, saved) in self.groups.iter().zip(&sd.param_groups) {
            let n = saved
                .get("params")
                .and_then(|v| v.as_array())
                .map(|a| a.len())
                .ok_or_else(|| {
                    Error::op(
                        "load_state_dict",
                        "a parameter group has no \"params\" list",
                    )
                })?;
            if n != g.params.len() {
                return Err(Error::op(
                    "load_state_dict",
                    "loaded state dict contains a parameter group that doesn't match the size of optimizer's group",
                ));
            }
            let mut o = g.options.clone();
            o.update_from_json(saved)?;
            new_opts.push(o);
        }
        let params: Vec<Tensor> = self.groups.iter().flat_map(|g| g.params.clone()).collect();
        let mut new_state = HashMap::new();
        for (i, entries) in &sd.state {
            let p = params.get(*i).ok_or_else(|| {
                Error::op(
                    "load_state_dict",
                    format!(
                        "state for parameter {i}, but the optimizer has {} parameters",
                        params.len()
                    ),
                )
            })?;
            new_state.insert(p.id(), make(p, entries)?);
        }
        Ok((new_opts, new_state))
    }
}

/// Rejects state entries other than `allowed` (e.g. Adam state given to SGD).
pub(crate) fn check_entry_names(
    kind: &str,
    entries: &[(String, Tensor)],
    allowed: &[&str],
) -> Result<()> {
    for (k, _) in entries {
        if !allowed.contains(&k.as_str()) {
            return Err(Error::op(
                "load_state_dict",
                format!("unexpected {kind} state `{k}` (expected {allowed:?})"),
            ));
        }
    }
    Ok(())
}

/// A saved state tensor for parameter `p`: copied, cast to `p`'s dtype, and
/// checked against `p`'s shape.
pub(crate) fn load_like(
    p: &Tensor,
    entries: &[(String, Tensor)],
    name: &str,
) -> Result<Option<Tensor>> {
    let Some((_, t)) = entries.iter().find(|(k, _)| k == name) else {
        return Ok(None);
    };
    if t.shape() != p.shape() {
        return Err(Error::op(
            "load_state_dict",
            format!(
                "state `{name}` has shape {:?}, the parameter has {:?}",
                t.shape(),
                p.shape()
            ),
        ));
    }
    Ok(Some(t.to_dtype(p.dtype())?.clone_tensor()?.detach()))
}

pub(crate) fn get_f64(v: &Map<String, Value>, k: &str, into: &mut f64) -> Result<()> {
    if let Some(x) = v.get(k) {
        *into = x.as_f64().ok_or_else(|| {
            Error::op(
                "load_state_dict",
                format!("param group `{k}` is not a number"),
            )
        })?;
    }
    Ok(())
}

pub(crate) fn get_bool(v: &Map<String, Value>, k: &str, into: &mut bool) -> Result<()> {
    if let Some(x) = v.get(k) {
        *into = x.as_bool().ok_or_else(|| {
            Error::op(
                "load_state_dict",
                format!("param group `{k}` is not a bool"),
            )
        })?;
    }
    Ok(())
}
