//! Containers: `Sequential` (children "0", "1", ... run in order),
//! `ModuleList` (indexable list, no forward, PyTorch's compressed repr of
//! repeated entries) and `ModuleDict` (ordered name -> module, no forward).
//! All keep their children in the `ModuleCore`, so replacing one by name or
//! index changes what runs.

use super::core::ModuleCore;
use super::module::{addindent, Module, ModuleExt};

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use std::sync::Arc;

/// `nn.Sequential(...)` from a list of modules: `sequential![ReLU::new(), Tanh::new()]`.
#[macro_export]
macro_rules! sequential {
    ($($m:expr),* $(,)?) => {
        $crate::nn::Sequential::new(vec![$(std::sync::Arc::new($m) as std::sync::Arc<dyn $crate::nn::Module>),*])
    };
}

fn resolve_index(idx: isize, len: usize, what: &str) -> Result<usize> {
    let n = len as isize;
    let i = if idx < 0 { idx + n } else { idx };
    if i < 0 || i >= n {
        return Err(Error::Lookup(format!(
            "index {idx} is out of range for {what} of length {len}"
        )));
    }
    Ok(i as usize)
}

fn nth_key(core: &ModuleCore, i: usize) -> String {
    core.reg.read().modules[i].0.clone()
}

fn nth_module(core: &ModuleCore, i: usize) -> Result<Arc<dyn Module>> {
    let (k, m) = core.reg.read().modules[i].clone();
    m.ok_or_else(|| Error::Lookup(format!("{}: entry `{k}` is None", core.type_name())))
}

/// `nn.Sequential`.
pub struct Sequential {
    core: ModuleCore,
}

impl Sequential {
    /// `nn.Sequential(m0, m1, ...)`: children named "0", "1", ...
    pub fn new(modules: impl IntoIterator<Item = Arc<dyn Module>>) -> Sequential {
        let core = ModuleCore::new("Sequential");
        for (i, m) in modules.into_iter().enumerate() {
            core.add_module(&i.to_string(), Some(m))
                .expect("internal: numeric child names are valid");
        }
        Sequential { core }
    }

    /// `nn.Sequential(OrderedDict([...]))`.
    pub fn from_named(
        modules: impl IntoIterator<Item = (String, Arc<dyn Module>)>,
    ) -> Result<Sequential> {
        let core = ModuleCore::new("Sequential");
        for (k, m) in modules {
            core.add_module(&k, Some(m))?;
        }
        Ok(Sequential { core })
    }

    pub fn len(&self) -> usize {
        self.core.reg.read().modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `seq[idx]` (negative counts from the end).
    pub fn get(&self, idx: isize) -> Result<Arc<dyn Module>> {
        let i = resolve_index(idx, self.len(), "Sequential")?;
        nth_module(&self.core, i)
    }

    /// `seq[idx] = module`.
    pub fn set(&self, idx: isize, module: Arc<dyn Module>) -> Result<()> {
        let i = resolve_index(idx, self.len(), "Sequential")?;
        let k = nth_key(&self.core, i);
        self.core.set_child(&k, module)
    }

    /// `seq.append(module)`: added under the key `str(len(seq))`.
    pub fn append(&self, module: Arc<dyn Module>) -> Result<&Self> {
        let k = self.len().to_string();
        self.core.add_module(&k, Some(module))?;
        Ok(self)
    }

    /// The modules in order (`iter(seq)`).
    pub fn iter(&self) -> Vec<Arc<dyn Module>> {
        self.core
            .local_modules()
            .into_iter()
            .filter_map(|(_, m)| m)
            .collect()
    }
}

impl Module for Sequential {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for m in self.iter() {
            x = m.call(&x)?;
        }
        Ok(x)
    }
}

/// `nn.ModuleList`.
pub struct ModuleList {
    core: ModuleCore,
}

impl ModuleList {
    pub fn new(modules: impl IntoIterator<Item = Arc<dyn Module>>) -> ModuleList {
        let l = ModuleList {
            core: ModuleCore::new("ModuleList"),
        };
        for m in modules {
            l.append(m);
        }
        l
    }

    pub fn len(&self) -> usize {
        self.core.reg.read().modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn get(&self, idx: isize) -> Result<Arc<dyn Module>> {
        let i = resolve_index(idx, self.len(), "ModuleList")?;
        nth_module(&self.core, i)
    }

    pub fn set(&self, idx: isize, module: Arc<dyn Module>) -> Result<()> {
        let i = resolve_index(idx, self.len(), "ModuleList")?;
        let k = nth_key(&self.core, i);
        self.core.set_child(&k, module)
    }

    pub fn append(&self, module: Arc<dyn Module>) -> &Self {
        let k = self.len().to_string();
        self.core
            .add_module(&k, Some(module))
            .expect("internal: numeric child names are valid");
        self
    }

    pub fn extend(&self, modules: impl IntoIterator<Item = Arc<dyn Module>>) -> &Self {
        for m in modules {
            self.append(m);
        }
        self
    }

    /// `insert(index, module)`: later entries shift up and are re-keyed.
    pub fn insert(&self, index: isize, module: Arc<dyn Module>) -> Result<()> {
        let n = self.len();
        let i = if index < 0 {
            (index + n as isize).max(0) as usize
        } else {
            (index as usize).min(n)
        };
        let mut r = self.core.reg_mut();
        r.modules.insert(i, (String::new(), Some(module)));
        for (j, (k, _)) in r.modules.iter_mut().enumerate() {
            *k = j.to_string();
        }
        Ok(())
    }

    pub fn iter(&self) -> Vec<Arc<dyn Module>> {
        self.core
            .local_modules()
            .into_iter()
            .filter_map(|(_, m)| m)
            .collect()
    }
}

impl Module for ModuleList {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    /// ModuleList has no forward in PyTorch either.
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::Lookup(
            "Module [ModuleList] is missing the required \"forward\" function".into(),
        ))
    }
    /// PyTorch's ModuleList repr: runs of identical entries are compressed
    /// to `(0-2): 3 x Linear(...)`.
    fn repr(&self) -> String {
        let reprs: Vec<String> = self
            .core
            .local_modules()
            .into_iter()
            .map(|(_, m)| m.map(|m| m.repr()).unwrap_or_else(|| "None".into()))
            .collect();
        if reprs.is_empty() {
            return "ModuleList()".into();
        }
        let mut blocks: Vec<(usize, usize, String)> = Vec::new();
        for (i, r) in reprs.into_iter().enumerate() {
            match blocks.last_mut() {
                Some(b) if b.2 == r => b.1 = i,
                _ => blocks.push((i, i, r)),
            }
        }
        let lines: Vec<String> = blocks
            .into_iter()
            .map(|(s, e, b)| {
                let l = if s == e {
                    format!("({s}): {b}")
                } else {
                    format!("({s}-{e}): {} x {b}", e - s + 1)
                };
                addindent(&l, 2)
            })
            .collect();
        format!("ModuleList(\n  {}\n)", lines.join("\n  "))
    }
}

/// `nn.ModuleDict`.
pub struct ModuleDict {
    core: ModuleCore,
}

impl ModuleDict {
    pub fn new(modules: impl IntoIterator<Item = (String, Arc<dyn Module>)>) -> Result<ModuleDict> {
        let d = ModuleDict {
            core: ModuleCore::new("ModuleDict"),
        };
        for (k, m) in modules {
            d.insert(&k, m)?;
        }
        Ok(d)
    }

    /// `d[key] = module` (replaces in place or appends).
    pub fn insert(&self, key: &str, module: Arc<dyn Module>) -> Result<()> {
        if self.core.has_child(key) {
            self.core.set_child(key, module)
        } else {
            self.core.add_module(key, Some(module))
        }
    }

    pub fn get(&self, key: &str) -> Result<Arc<dyn Module>> {
        self.core.child(key)
    }

    /// `d.pop(key)`.
    pub fn remove(&self, key: &str) -> Result<Arc<dyn Module>> {
        let m = self.core.child(key)?;
        self.core.remove_attr(key)?;
        Ok(m)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.core.has_child(key)
    }

    pub fn keys(&self) -> Vec<String> {
        self.core
            .local_modules()
            .into_iter()
            .map(|(k, _)| k)
            .collect()
    }

    pub fn len(&self) -> usize {
        self.core.reg.read().modules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn items(&self) -> Vec<(String, Arc<dyn Module>)> {
        self.core
            .local_modules()
            .into_iter()
            .filter_map(|(k, m)| m.map(|m| (k, m)))
            .collect()
    }
}

impl Module for ModuleDict {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    /// ModuleDict has no forward in PyTorch either.
    fn forward(&self, _x: &Tensor) -> Result<Tensor> {
        Err(Error::Lookup(
            "Module [ModuleDict] is missing the required \"forward\" function".into(),
        ))
    }
}
