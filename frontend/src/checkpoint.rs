//! Training checkpoints: ONE safetensors file holding the epoch and step,
//! the model's state dict (PyTorch's key names under `model.`), the
//! optimizer's state (tensors under `optim.state.<i>.<name>`, its
//! param_groups as JSON in the metadata), the last loss, the global random
//! generator's state, and free-form string metadata. Training resumed from a
//! checkpoint is bit-identical to uninterrupted training (parameters,
//! buffers and optimizer state are stored as raw bytes; floats in the
//! metadata round-trip exactly; the generator resumes where it stood, so
//! dropout masks and random batches continue the same sequence).
//!
//! ```no_run
//! # use kiln_frontend::checkpoint::{Checkpoint, save_checkpoint, load_checkpoint};
//! # use kiln_frontend::nn::prelude::*;
//! # use kiln_frontend::optim::{SGD, SgdOptions, Optimizer};
//! # fn f(model: &dyn Module, opt: &mut SGD) -> kiln_frontend::Result<()> {
//! let ckpt = Checkpoint::capture(model, Some(&*opt), 3, 1200, Some(0.25))?
//!     .with_metadata("note", "after warmup");
//! save_checkpoint("run.ckpt.safetensors", &ckpt)?;
//! // later, in a fresh process with a freshly built model and optimizer:
//! let ckpt = load_checkpoint("run.ckpt.safetensors")?;
//! ckpt.restore(model, Some(opt))?;
//! # Ok(()) }
//! ```
//!
//! File layout (metadata keys): `kiln.format` = `kiln-checkpoint`,
//! `kiln.version` = `1`, `epoch`, `step`, `loss` (optional, exact),
//! `model.keys` (the state dict's key order, as a JSON list),
//! `optim.kind` and `optim.param_groups` (when an optimizer was saved),
//! `rng_state` (hex), and `meta.<key>` for the user's entries.

use crate::error::{Error, Result};
use crate::nn::{Module, ModuleExt, StateDict};
use crate::optim::{Optimizer, OptimizerStateDict};
use crate::random;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

const FORMAT: &str = "kiln-checkpoint";
const VERSION: &str = "1";
const MODEL: &str = "model.";
const OPTIM: &str = "optim.";

/// Everything needed to resume training.
#[derive(Clone, Debug, Default)]
pub struct Checkpoint {
    pub epoch: u64,
    /// Optimizer steps taken so far (or any counter the caller keeps).
    pub step: u64,
    pub loss: Option<f64>,
    /// `model.state_dict()` with PyTorch's key names (no `model.` prefix here).
    pub model: StateDict,
    pub optimizer: Option<OptimizerStateDict>,
    /// `Optimizer::kind()` of the saved optimizer (`"SGD"`, `"Adam"`).
    pub optimizer_kind: Option<String>,
    /// `random::get_rng_state()` at capture time.
    pub rng_state: Option<Vec<u8>>,
    pub metadata: BTreeMap<String, String>,
}

impl Checkpoint {
    /// A snapshot of the model, the optimizer and the global generator:
    /// tensors are copied, so later training does not change the checkpoint.
    pub fn capture(
        model: &dyn Module,
        optimizer: Option<&dyn Optimizer>,
        epoch: u64,
        step: u64,
        loss: Option<f64>,
    ) -> Result<Checkpoint> {
        let snapshot = |t: &crate::Tensor| -> Result<crate::Tensor> {
            Ok(t.detach().clone_tensor()?.detach())
        };
        let mut sd = StateDict::new();
        for (k, t) in model.state_dict().iter() {
            sd.insert(k, snapshot(t)?);
        }
        let optimizer_state = match optimizer {
            Some(o) => {
                let mut osd = o.state_dict();
                for entries in osd.state.values_mut() {
                    for (_, t) in entries.iter_mut() {
                        *t = snapshot(t)?;
                    }
                }
                Some(osd)
            }
            None => None,
        };
        Ok(Checkpoint {
            epoch,
            step,
            loss,
            model: sd,
            optimizer: optimizer_state,
            optimizer_kind: optimizer.map(|o| o.kind().to_string()),
            rng_state: Some(random::get_rng_state()),
            metadata: BTreeMap::new(),
        })
    }

    /// Adds a free-form metadata entry.
    pub fn with_metadata(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.insert(key.into(), value.into());
        self
    }

    /// Loads the model state (strict), the optimizer state and the
    /// generator state. Everything is validated before anything changes: a
    /// missing/unexpected/mis-shaped model key, an optimizer state of
    /// another kind or layout, or a bad generator state is an error and
    /// leaves the model, the optimizer and the generator as they were.
    pub fn restore(&self, model: &dyn Module, optimizer: Option<&mut dyn Optimizer>) -> Result<()> {
        if let Some(o) = optimizer.as_deref() {
            let sd = self.optimizer.as_ref().ok_or_else(|| {
                Error::Format("checkpoint: it holds no optimizer state to restore".into())
            })?;
            if let Some(kind) = &self.optimizer_kind {
                if kind != o.kind() {
                    return Err(Error::Format(format!(
                        "checkpoint: it holds {kind} state, the optimizer is {}",
                        o.kind()
                    )));
                }
            }
            o.check_state_dict(sd)
                .map_err(|e| Error::Format(format!("checkpoint: optimizer state: {e}")))?;
        }
        if let Some(r) = &self.rng_state {
            random::check_rng_state(r)?;
        }
        // validates every key first and copies only if all are fine
        model.load_state_dict(&self.model, true)?;
        if let (Some(o), Some(sd)) = (optimizer, &self.optimizer) {
            o.load_state_dict(sd)?;
        }
        if let Some(r) = &self.rng_state {
            random::set_rng_state(r)?;
        }
        Ok(())
    }

    /// The safetensors bytes of the checkpoint.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut sd = StateDict::new();
        for (k, t) in self.model.iter() {
            sd.insert(format!("{MODEL}{k}"), t.clone());
        }
        let mut meta = HashMap::new();
        meta.insert("kiln.format".to_string(), FORMAT.to_string());
        meta.insert("kiln.version".to_string(), VERSION.to_string());
        meta.insert("epoch".to_string(), self.epoch.to_string());
        meta.insert("step".to_string(), self.step.to_string());
        meta.insert(
            "model.keys".to_string(),
            serde_json::Value::from(self.model.keys()).to_string(),
        );
        if let Some(l) = self.loss {
            // `{:e}` prints the shortest digits that parse back to the same bits
            meta.insert("loss".to_string(), format!("{l:e}"));
        }
        if let Some(o) = &self.optimizer {
            let (osd, groups) = o.to_flat(OPTIM);
            for (k, t) in osd.iter() {
                sd.insert(k, t.clone());
            }
            meta.insert("optim.param_groups".to_string(), groups);
            if let Some(kind) = &self.optimizer_kind {
                meta.insert("optim.kind".to_string(), kind.clone());
            }
        }
        if let Some(r) = &self.rng_state {
            meta.insert("rng_state".to_string(), hex(r));
        }
        for (k, v) in &self.metadata {
            meta.insert(format!("meta.{k}"), v.clone());
        }
        sd.to_safetensors_bytes(Some(meta))
    }

    /// Parses checkpoint bytes; anything truncated, corrupt or not a kiln
    /// checkpoint is an `Error::Format` saying what is wrong.
    pub fn from_bytes(bytes: &[u8]) -> Result<Checkpoint> {
        let (sd, meta) = StateDict::from_safetensors_bytes_with_metadata(bytes)?;
        let bad = |m: String| Error::Format(format!("checkpoint: {m}"));
        match meta.get("kiln.format").map(String::as_str) {
            Some(FORMAT) => {}
            Some(f) => return Err(bad(format!("format `{f}`, expected `{FORMAT}`"))),
            None => {
                return Err(bad(
                    "not a kiln checkpoint (no `kiln.format` metadata; a plain state dict loads with `load_safetensors`)".into(),
                ))
            }
        }
        match meta.get("kiln.version").map(String::as_str) {
            Some(VERSION) => {}
            v => {
                return Err(bad(format!(
                    "unsupported version {v:?} (this kiln reads {VERSION})"
                )))
            }
        }
        let int = |k: &str| -> Result<u64> {
            meta.get(k)
                .ok_or_else(|| bad(format!("missing `{k}`")))?
                .parse()
                .map_err(|_| bad(format!("`{k}` = {:?} is not an integer", meta[k])))
        };
        let epoch = int("epoch")?;
        let step = int("step")?;
        let loss = match meta.get("loss") {
            Some(s) => Some(
                s.parse::<f64>()
                    .map_err(|_| bad(format!("`loss` = {s:?} is not a number")))?,
            ),
            None => None,
        };
        let mut model = StateDict::new();
        let mut optim = StateDict::new();
        for (k, t) in sd.iter() {
            if let Some(rest) = k.strip_prefix(MODEL) {
                model.insert(rest, t.clone());
            } else if k.starts_with(OPTIM) {
                optim.insert(k, t.clone());
            } else {
                return Err(bad(format!(
                    "unexpected tensor `{k}` (expected `{MODEL}<key>` or `{OPTIM}state.<i>.<name>`)"
                )));
            }
        }
        // safetensors stores tensors sorted by dtype and name: put the model's
        // keys back in state_dict order
        if let Some(order) = meta.get("model.keys") {
            let keys: Vec<String> = serde_json::from_str(order)
                .map_err(|e| bad(format!("`model.keys` is not a list of names: {e}")))?;
            let mut ordered = StateDict::new();
            for k in &keys {
                let t = model
                    .get(k)
                    .ok_or_else(|| bad(format!("`model.keys` names `{k}`, which has no tensor")))?;
                ordered.insert(k.clone(), t.clone());
            }
            if ordered.len() != model.len() {
                return Err(bad("`model.keys` does not list every model tensor".into()));
            }
            model = ordered;
        }
        let optimizer = match meta.get("optim.param_groups") {
            Some(g) => Some(
                OptimizerStateDict::from_flat(&optim, OPTIM, g).map_err(|e| bad(e.to_string()))?,
            ),
            None if !optim.is_empty() => {
                return Err(bad("optimizer tensors without `optim.param_groups`".into()))
            }
            None => None,
        };
        let rng_state = match meta.get("rng_state") {
            Some(h) => {
                let v = unhex(h).ok_or_else(|| bad("`rng_state` is not hex".into()))?;
                random::check_rng_state(&v).map_err(|e| bad(e.to_string()))?;
                Some(v)
            }
            None => None,
        };
        let metadata = meta
            .iter()
            .filter_map(|(k, v)| k.strip_prefix("meta.").map(|k| (k.to_string(), v.clone())))
            .collect();
        Ok(Checkpoint {
            epoch,
            step,
            loss,
            model,
            optimizer,
            optimizer_kind: meta.get("optim.kind").cloned(),
            rng_state,
            metadata,
        })
    }
}

/// Writes the checkpoint to `path` (through a temporary file renamed into
/// place, so an interrupted save never leaves a half-written checkpoint).
pub fn save_checkpoint(path: impl AsRef<Path>, ckpt: &Checkpoint) -> Result<()> {
    let path = path.as_ref();
    let bytes = ckpt.to_bytes()?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads a checkpoint written by `save_checkpoint`; a truncated or corrupt
/// file is an `Error::Format` naming the path.
pub fn load_checkpoint(path: impl AsRef<Path>) -> Result<Checkpoint> {
    let path = path.as_ref();
    let bytes = std::fs::read(path)?;
    Checkpoint::from_bytes(&bytes).map_err(|e| match e {
        Error::Format(m) => Error::Format(format!("{}: {m}", path.display())),
        e => e,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}
