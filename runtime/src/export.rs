//! Export and load: `TracedModule::save` writes ONE safetensors file whose
//! tensors are the graph's parameters and buffers (by name) and whose
//! metadata holds `kiln.format_version` and the graph (`kiln.graph`, the
//! JSON of `kiln_ir::format`). `load` runs it with no model code. Loading
//! validates everything and names the problem: not a safetensors file or a
//! truncated one, no or an unknown format version, a graph that does not
//! parse or verify (cyclic, ill-typed), a missing or unexpected weight, a
//! weight whose shape or dtype differs from the graph's input.

use crate::error::{Error, Result};
use crate::interpreter::tensor_type;
use crate::traced::{state_inputs, TracedModule};
use kiln_frontend::nn::StateDict;
use kiln_frontend::Tensor;
use kiln_ir::format::{from_json, to_json, FORMAT_VERSION};
use kiln_ir::InputKind;
use std::collections::HashMap;
use std::path::Path;

/// Metadata key holding the file format version.
pub const VERSION_KEY: &str = "kiln.format_version";
/// Metadata key holding the graph JSON.
pub const GRAPH_KEY: &str = "kiln.graph";

impl TracedModule {
    /// The bytes `save` writes.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let mut sd = StateDict::new();
        for (kind, _) in self.state_inputs() {
            let name = match &kind {
                InputKind::Param(n) | InputKind::Buffer(n) => n.clone(),
                InputKind::User(_) => continue,
            };
            let t = self.bind(&kind)?;
            sd.insert(name, t.detach());
        }
        let mut meta = HashMap::new();
        meta.insert(VERSION_KEY.to_string(), FORMAT_VERSION.to_string());
        meta.insert(GRAPH_KEY.to_string(), to_json(self.graph())?);
        Ok(sd.to_safetensors_bytes(Some(meta))?)
    }

    /// Write the graph and the current weights (from the live module, or
    /// the stored ones) to one safetensors file.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let bytes = self.to_bytes()?;
        std::fs::write(path.as_ref(), bytes).map_err(|e| Error::File {
            path: path.as_ref().display().to_string(),
            msg: format!("cannot write: {e}"),
        })
    }
}

/// Load a file written by `TracedModule::save`.
pub fn load(path: impl AsRef<Path>) -> Result<TracedModule> {
    let p = path.as_ref().display().to_string();
    let bytes = std::fs::read(path.as_ref()).map_err(|e| Error::File {
        path: p.clone(),
        msg: format!("cannot read: {e}"),
    })?;
    from_bytes(&bytes).map_err(|e| match e {
        Error::File { msg, .. } => Error::File { path: p, msg },
        e => Error::File {
            path: p,
            msg: e.to_string(),
        },
    })
}

/// Load from the bytes of a saved file (errors carry the path `<bytes>`).
pub fn from_bytes(bytes: &[u8]) -> Result<TracedModule> {
    let ferr = |msg: String| Error::File {
        path: "<bytes>".into(),
        msg,
    };
    let (sd, meta) =
        StateDict::from_safetensors_bytes_with_metadata(bytes).map_err(|e| ferr(format!("{e}")))?;
    let version = meta.get(VERSION_KEY).ok_or_else(|| {
        ferr(format!(
            "not a kiln graph file: the safetensors metadata has no `{VERSION_KEY}`"
        ))
    })?;
    if version.trim() != FORMAT_VERSION.to_string() {
        return Err(ferr(format!(
            "unsupported kiln file format version {version:?} (this build reads version {FORMAT_VERSION})"
        )));
    }
    let json = meta.get(GRAPH_KEY).ok_or_else(|| {
        ferr(format!(
            "not a kiln graph file: the safetensors metadata has no `{GRAPH_KEY}`"
        ))
    })?;
    let graph = from_json(json).map_err(|e| ferr(format!("invalid graph: {e}")))?;
    let mut weights: HashMap<String, Tensor> =
        sd.iter().map(|(k, t)| (k.to_string(), t.clone())).collect();
    let mut used = HashMap::new();
    for (kind, ty) in state_inputs(&graph) {
        let (InputKind::Param(name) | InputKind::Buffer(name)) = &kind else {
            continue;
        };
        let what = if matches!(kind, InputKind::Param(_)) {
            "parameter"
        } else {
            "buffer"
        };
        let t = weights.remove(name).ok_or_else(|| {
            ferr(format!(
                "missing weight: the graph's {what} `{name}` ({ty}) is not in the file"
            ))
        })?;
        let got = tensor_type(&t);
        if got != ty {
            return Err(ferr(format!(
                "weight `{name}` is {got} in the file, the graph's {what} is {ty}"
            )));
        }
        used.insert(name.clone(), t);
    }
    if !weights.is_empty() {
        let mut extra: Vec<String> = weights.into_keys().collect();
        extra.sort();
        return Err(ferr(format!(
            "the file holds tensors the graph does not use: {extra:?}"
        )));
    }
    TracedModule::from_weights(graph, used).map_err(|e| ferr(e.to_string()))
}
