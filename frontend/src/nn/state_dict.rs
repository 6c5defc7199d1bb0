//! `StateDict` (an ordered name -> tensor dict, PyTorch's OrderedDict),
//! `load_state_dict` (validate everything, then copy), and safetensors
//! files with PyTorch's key names: a PyTorch `save_file(model.state_dict())`
//! loads as is.

use super::module::Module;
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_cpu::CpuStorage;
use kiln_ir::DType;
use safetensors::tensor::{Dtype as StDtype, SafeTensors, TensorView};
use std::collections::HashMap;
use std::path::Path;

/// An ordered dict of named tensors. Inserting an existing key replaces the
/// value in place (keeps the position), as Python's OrderedDict.
#[derive(Clone, Default)]
pub struct StateDict {
    entries: Vec<(String, Tensor)>,
    index: HashMap<String, usize>,
}

impl std::fmt::Debug for StateDict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map()
            .entries(self.entries.iter().map(|(k, v)| (k, v)))
            .finish()
    }
}

impl StateDict {
    pub fn new() -> StateDict {
        StateDict::default()
    }

    pub fn insert(&mut self, key: impl Into<String>, t: Tensor) {
        let key = key.into();
        match self.index.get(&key) {
            Some(&i) => self.entries[i].1 = t,
            None => {
                self.index.insert(key.clone(), self.entries.len());
                self.entries.push((key, t));
            }
        }
    }

    pub fn get(&self, key: &str) -> Option<&Tensor> {
        self.index.get(key).map(|&i| &self.entries[i].1)
    }

    pub fn contains_key(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    pub fn remove(&mut self, key: &str) -> Option<Tensor> {
        let i = self.index.remove(key)?;
        let (_, t) = self.entries.remove(i);
        for v in self.index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        Some(t)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn keys(&self) -> Vec<String> {
        self.entries.iter().map(|(k, _)| k.clone()).collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &Tensor)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The entries whose key starts with `prefix` (keys unchanged).
    pub fn filter_prefix(&self, prefix: &str) -> StateDict {
        let mut out = StateDict::new();
        for (k, v) in &self.entries {
            if k.starts_with(prefix) {
                out.insert(k.clone(), v.clone());
            }
        }
        out
    }

    // ---------------------------------------------------------------- safetensors

    /// The safetensors bytes of this dict (tensors made contiguous).
    pub fn to_safetensors_bytes(
        &self,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<Vec<u8>> {
        let mut bufs = Vec::with_capacity(self.entries.len());
        for (k, t) in &self.entries {
            bufs.push((
                k.clone(),
                st_dtype(t.dtype()),
                t.shape(),
                t.contiguous_storage().to_le_bytes(),
            ));
        }
        let views = bufs
            .iter()
            .map(|(k, d, s, b)| {
                TensorView::new(*d, s.clone(), b)
                    .map(|v| (k.clone(), v))
                    .map_err(|e| Error::Format(format!("safetensors: tensor `{k}`: {e:?}")))
            })
            .collect::<Result<Vec<_>>>()?;
        safetensors::tensor::serialize(views, &metadata)
            .map_err(|e| Error::Format(format!("safetensors: {e:?}")))
    }

    pub fn save_safetensors(
        &self,
        path: impl AsRef<Path>,
        metadata: Option<HashMap<String, String>>,
    ) -> Result<()> {
        let bytes = self.to_safetensors_bytes(metadata)?;
        std::fs::write(path, bytes)?;
        Ok(())
    }

    /// Parses safetensors bytes; entries come in file order (data offset).
    pub fn from_safetensors_bytes(bytes: &[u8]) -> Result<StateDict> {
        Ok(Self::from_safetensors_bytes_with_metadata(bytes)?.0)
    }

    /// Parses safetensors bytes, also returning the `__metadata__` map.
    pub fn from_safetensors_bytes_with_metadata(
        bytes: &[u8],
    ) -> Result<(StateDict, HashMap<String, String>)> {
        let st = SafeTensors::deserialize(bytes).map_err(|e| {
            Error::Format(format!(
                "not a valid safetensors file ({} bytes): {e:?}",
                bytes.len()
            ))
        })?;
        let (_, meta) = SafeTensors::read_metadata(bytes)
            .map_err(|e| Error::Format(format!("not a valid safetensors file: {e:?}")))?;
        let mut items: Vec<(String, TensorView<'_>)> = st.tensors();
        items.sort_by_key(|(k, _)| meta.info(k).map(|i| i.data_offsets.0).unwrap_or(0));
        let mut sd = StateDict::new();
        for (k, v) in items {
            let dtype = kiln_dtype(v.dtype()).ok_or_else(|| {
                Error::Format(format!(
                    "safetensors: tensor `{k}` has unsupported dtype {:?}",
                    v.dtype()
                ))
            })?;
            let storage = CpuStorage::from_le_bytes(dtype, v.data()).ok_or_else(|| {
                Error::Format(format!(
                    "safetensors: tensor `{k}`: data is not a whole number of {dtype} elements"
                ))
            })?;
            if storage.len() != kiln_ir::numel(v.shape()) {
                return Err(Error::Format(format!(
                    "safetensors: tensor `{k}`: {} elements for shape {:?}",
                    storage.len(),
                    v.shape()
                )));
            }
            sd.insert(k, Tensor::from_storage(storage, v.shape()));
        }
        Ok((sd, meta.metadata().clone().unwrap_or_default()))
    }

    /// Reads a safetensors file; a truncated or corrupt file is an
    /// `Error::Format` naming the path.
    pub fn load_safetensors(path: impl AsRef<Path>) -> Result<StateDict> {
        Ok(Self::load_safetensors_with_metadata(path)?.0)
    }

    pub fn load_safetensors_with_metadata(
        path: impl AsRef<Path>,
    ) -> Result<(StateDict, HashMap<String, String>)> {
        let path = path.as_ref();
        let bytes = std::fs::read(path)?;
        Self::from_safetensors_bytes_with_metadata(&bytes).map_err(|e| match e {
            Error::Format(m) => Error::Format(format!("{}: {m}", path.display())),
            e => e,
        })
    }
}

impl<'a> IntoIterator for &'a StateDict {
    type Item = (&'a str, &'a Tensor);
    type IntoIter = Box<dyn Iterator<Item = (&'a str, &'a Tensor)> + 'a>;
    fn into_iter(self) -> Self::IntoIter {
        Box::new(self.iter())
    }
}

impl FromIterator<(String, Tensor)> for StateDict {
    fn from_iter<I: IntoIterator<Item = (String, Tensor)>>(iter: I) -> Self {
        let mut sd = StateDict::new();
        for (k, v) in iter {
            sd.insert(k, v);
        }
        sd
    }
}

fn st_dtype(d: DType) -> StDtype {
    match d {
        DType::F32 => StDtype::F32,
        DType::F64 => StDtype::F64,
        DType::F16 => StDtype::F16,
        DType::BF16 => StDtype::BF16,
        DType::I64 => StDtype::I64,
        DType::Bool => StDtype::BOOL,
    }
}

fn kiln_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F64 => DType::F64,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I64 => DType::I64,
        StDtype::BOOL => DType::Bool,
        _ => return None,
    })
}

/// What `load_state_dict` returns: keys the model has that the dict lacks,
/// and keys the dict has that the model does not.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IncompatibleKeys {
    pub missing_keys: Vec<String>,
    pub unexpected_keys: Vec<String>,
}

impl IncompatibleKeys {
    pub fn is_empty(&self) -> bool {
        self.missing_keys.is_empty() && self.unexpected_keys.is_empty()
    }
}

struct LoadPlan {
    copies: Vec<(Tensor, Tensor)>,
    missing: Vec<String>,
    unexpected: Vec<String>,
    errors: Vec<String>,
}

/// `_load_from_state_dict` for one module, then its children with their
/// filtered local dicts (PyTorch's `load` closure), collecting copies
/// instead of doing them.
fn plan_module(
    m: &dyn Module,
    mut local: StateDict,
    prefix: &str,
    plan: &mut LoadPlan,
) -> Result<()> {
    let core = m.core();
    let pre_hooks = core.hooks.lock().load_state_dict_pre.snapshot();
    for h in pre_hooks {
        h(&mut local, prefix)?;
    }
    let (local_state, module_names): (Vec<(String, Tensor)>, Vec<String>) = {
        let r = core.reg.read();
        let params = r
            .params
            .iter()
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)));
        let bufs = r
            .buffers
            .iter()
            .filter(|(k, _)| !r.non_persistent.contains(k))
            .filter_map(|(k, v)| v.clone().map(|v| (k.clone(), v)));
        (
            params.chain(bufs).collect(),
            r.modules.iter().map(|(k, _)| k.clone()).collect(),
        )
    };
    for (name, dst) in &local_state {
        let key = format!("{prefix}{name}");
        match local.get(&key) {
            Some(src) => {
                let mut src = src.clone();
                // PyTorch's backward-compat rule: a 1-element 1-d entry loads into a 0-d tensor.
                if dst.dim() == 0 && src.dim() == 1 && src.numel() == 1 {
                    src = src.reshape(&[])?;
                }
                if src.shape() != dst.shape() {
                    plan.errors.push(format!(
                        "size mismatch for {key}: copying a param with shape {:?} from checkpoint, the shape in current model is {:?}.",
                        src.shape(),
                        dst.shape()
                    ));
                    continue;
                }
                if src.dtype() != dst.dtype() {
                    plan.errors.push(format!(
                        "dtype mismatch for {key}: copying a param with dtype {} from checkpoint, the dtype in current model is {}.",
                        src.dtype(),
                        dst.dtype()
                    ));
                    continue;
                }
                plan.copies.push((dst.clone(), src));
            }
            None => plan.missing.push(key),
        }
    }
    for (key, _) in local.iter() {
        if let Some(rest) = key.strip_prefix(prefix) {
            let input_name = rest.split('.').next().unwrap_or("");
            if !module_names.iter().any(|n| n == input_name)
                && !local_state.iter().any(|(n, _)| n == input_name)
            {
                plan.unexpected.push(key.to_string());
            }
        }
    }
    for (name, child) in core.local_modules() {
        if let Some(child) = child {
            let child_prefix = format!("{prefix}{name}.");
            let child_local = local.filter_prefix(&child_prefix);
            plan_module(&*child, child_local, &child_prefix, plan)?;
        }
    }
    Ok(())
}

fn quoted(keys: &[String]) -> String {
    keys.iter()
        .map(|k| format!("\"{k}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn load_into(m: &dyn Module, sd: &StateDict, strict: bool) -> Result<IncompatibleKeys> {
    let mut plan = LoadPlan {
        copies: Vec::new(),
        missing: Vec::new(),
        unexpected: Vec::new(),
        errors: Vec::new(),
    };
    plan_module(m, sd.clone(), "", &mut plan)?;
    if strict {
        if !plan.unexpected.is_empty() {
            plan.errors.insert(
                0,
                format!(
                    "Unexpected key(s) in state_dict: {}. ",
                    quoted(&plan.unexpected)
                ),
            );
        }
        if !plan.missing.is_empty() {
            plan.errors.insert(
                0,
                format!("Missing key(s) in state_dict: {}. ", quoted(&plan.missing)),
            );
        }
    }
    if !plan.errors.is_empty() {
        return Err(Error::StateDict {
            module: m.core().type_name().to_string(),
            errors: plan.errors,
        });
    }
    no_grad(|| -> Result<()> {
        for (dst, src) in &plan.copies {
            dst.copy_(src)?;
        }
        Ok(())
    })?;
    Ok(IncompatibleKeys {
        missing_keys: plan.missing,
        unexpected_keys: plan.unexpected,
    })
}
