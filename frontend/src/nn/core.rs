//! `ModuleCore`: the state PyTorch's `nn.Module.__init__` creates (training
//! flag, ordered `_parameters`, `_buffers` with the non-persistent set,
//! `_modules`, and the hook dicts), behind locks so a module shared as
//! `Arc<dyn Module>` can be changed through `&self` (train/eval, a forward
//! that reassigns its buffers, replacing a child by name).
//!
//! Registration and the attribute-style accessors that forward code uses
//! (`param("weight")`, `child("layer1")`, `set_buffer(..)`) live here.

use super::hooks::{
    BackwardHook, BackwardPreHook, ForwardHook, ForwardPreHook, HookList, LoadStateDictPreHook,
    StateDictHook,
};
use super::module::Module;
use super::state_dict::StateDict;
use crate::error::{Error, Result};
use crate::hooks::RemovableHandle;
use crate::tensor::Tensor;
use parking_lot::{Mutex, RwLock};
use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// The ordered dicts of one module (insertion order, as Python's).
#[derive(Default, Clone)]
pub(crate) struct Registry {
    pub params: Vec<(String, Option<Tensor>)>,
    pub buffers: Vec<(String, Option<Tensor>)>,
    pub non_persistent: HashSet<String>,
    pub modules: Vec<(String, Option<Arc<dyn Module>>)>,
}

fn find<'a, T>(v: &'a [(String, T)], name: &str) -> Option<&'a T> {
    v.iter().find(|(k, _)| k == name).map(|(_, t)| t)
}

fn set_entry<T>(v: &mut Vec<(String, T)>, name: &str, value: T) {
    match v.iter_mut().find(|(k, _)| k == name) {
        Some(slot) => slot.1 = value,
        None => v.push((name.to_string(), value)),
    }
}

/// Per-module hook dicts (`_forward_pre_hooks`, `_forward_hooks`,
/// `_backward_hooks`, `_backward_pre_hooks`, `_state_dict_hooks`,
/// `_load_state_dict_pre_hooks`).
#[derive(Default)]
pub(crate) struct Hooks {
    pub forward_pre: HookList<ForwardPreHook>,
    pub forward: HookList<ForwardHook>,
    pub backward: HookList<BackwardHook>,
    pub backward_pre: HookList<BackwardPreHook>,
    pub state_dict: HookList<StateDictHook>,
    pub load_state_dict_pre: HookList<LoadStateDictPreHook>,
}

static STRUCTURE_EPOCH: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// A counter bumped by every change to any module's registry (parameters,
/// buffers, children set or replaced), any hook registration or removal,
/// and `_apply` (`to(dtype)`): the compiled runtime re-checks its guards
/// (module tree, hooks, bound tensors) only when it moved.
pub fn structure_epoch() -> u64 {
    STRUCTURE_EPOCH.load(Ordering::Acquire)
}

pub(crate) fn bump_structure_epoch() {
    STRUCTURE_EPOCH.fetch_add(1, Ordering::AcqRel);
}

/// The base state of every module. Build one with `ModuleCore::new("Name")`
/// in the module's constructor (the name is what `repr` prints, PyTorch's
/// class name), then register parameters, buffers and children on it.
pub struct ModuleCore {
    type_name: String,
    training: AtomicBool,
    pub(crate) reg: RwLock<Registry>,
    pub(crate) hooks: Arc<Mutex<Hooks>>,
}

impl std::fmt::Debug for ModuleCore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ModuleCore({})", self.type_name)
    }
}

fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty() {
        return Err(Error::Lookup(format!(
            "{kind} name can't be empty string \"\""
        )));
    }
    if name.contains('.') {
        return Err(Error::Lookup(format!(
            "{kind} name can't contain \".\", got: {name}"
        )));
    }
    Ok(())
}

impl ModuleCore {
    /// A fresh core in training mode with empty dicts.
    pub fn new(type_name: impl Into<String>) -> ModuleCore {
        ModuleCore {
            type_name: type_name.into(),
            training: AtomicBool::new(true),
            reg: RwLock::new(Registry::default()),
            hooks: Arc::new(Mutex::new(Hooks::default())),
        }
    }

    /// The registry for writing (bumps `structure_epoch`).
    pub(crate) fn reg_mut(&self) -> parking_lot::RwLockWriteGuard<'_, Registry> {
        bump_structure_epoch();
        self.reg.write()
    }

    /// Ids of this module's forward pre-, forward, backward and backward
    /// pre-hooks, in that order (for the compiled runtime's guards).
    pub fn hook_ids(&self) -> Vec<u64> {
        let h = self.hooks.lock();
        h.forward_pre
            .ids()
            .chain(h.forward.ids())
            .chain(h.backward.ids())
            .chain(h.backward_pre.ids())
            .collect()
    }

    /// True if a forward pre-, forward, backward or backward pre-hook is
    /// registered on this module.
    pub fn has_call_hooks(&self) -> bool {
        let h = self.hooks.lock();
        !(h.forward_pre.is_empty()
            && h.forward.is_empty()
            && h.backward.is_empty()
            && h.backward_pre.is_empty())
    }

    /// The class name printed by `repr` (`_get_name()`).
    pub fn type_name(&self) -> &str {
        &self.type_name
    }

    /// `self.training`.
    pub fn is_training(&self) -> bool {
        self.training.load(Ordering::Relaxed)
    }

    /// Sets this module's own flag (`Module::train` recurses).
    pub fn set_training_flag(&self, mode: bool) {
        self.training.store(mode, Ordering::Relaxed)
    }

    fn no_attr(&self, name: &str) -> Error {
        Error::Lookup(format!("{} has no attribute `{}`", self.type_name, name))
    }

    fn exists_elsewhere(&self, r: &Registry, name: &str, except: &str) -> bool {
        (except != "param" && find(&r.params, name).is_some())
            || (except != "buffer" && find(&r.buffers, name).is_some())
            || (except != "module" && find(&r.modules, name).is_some())
    }

    // ------------------------------------------------------------ registration

    /// `register_parameter(name, param)`: `None` registers the name with no
    /// tensor (like `bias=False` layers). The tensor must be a leaf; it is
    /// registered as is (use `nn::Parameter::new` to make one that
    /// requires grad). Re-registering a parameter name replaces it.
    pub fn register_parameter(&self, name: &str, param: Option<Tensor>) -> Result<()> {
        check_name("parameter", name)?;
        let mut r = self.reg_mut();
        if self.exists_elsewhere(&r, name, "param") {
            return Err(Error::Lookup(format!("attribute '{name}' already exists")));
        }
        if let Some(p) = &param {
            if !p.is_leaf() {
                return Err(Error::Lookup(format!(
                    "Cannot assign non-leaf Tensor to parameter '{name}'. Model parameters must be created explicitly. To express '{name}' as a function of another Tensor, compute the value in the forward() method."
                )));
            }
        }
        set_entry(&mut r.params, name, param);
        Ok(())
    }

    /// `register_buffer(name, tensor, persistent)`: non-persistent buffers
    /// are left out of `state_dict`.
    pub fn register_buffer(
        &self,
        name: &str,
        tensor: Option<Tensor>,
        persistent: bool,
    ) -> Result<()> {
        check_name("buffer", name)?;
        let mut r = self.reg_mut();
        if self.exists_elsewhere(&r, name, "buffer") {
            return Err(Error::Lookup(format!("attribute '{name}' already exists")));
        }
        set_entry(&mut r.buffers, name, tensor);
        if persistent {
            r.non_persistent.remove(name);
        } else {
            r.non_persistent.insert(name.to_string());
        }
        Ok(())
    }

    /// `add_module(name, module)` / `register_module`. `None` keeps the
    /// slot (it prints as `(name): None` and is skipped by iterations).
    pub fn add_module(&self, name: &str, module: Option<Arc<dyn Module>>) -> Result<()> {
        check_name("module", name)?;
        let mut r = self.reg_mut();
        if self.exists_elsewhere(&r, name, "module") {
            return Err(Error::Lookup(format!("attribute '{name}' already exists")));
        }
        set_entry(&mut r.modules, name, module);
        Ok(())
    }

    /// Same as `add_module`.
    pub fn register_module(&self, name: &str, module: Option<Arc<dyn Module>>) -> Result<()> {
        self.add_module(name, module)
    }

    // ------------------------------------------------------------ attribute access

    /// `self.<name>` for a parameter: errors when the name is not a
    /// parameter or is registered as None.
    pub fn param(&self, name: &str) -> Result<Tensor> {
        self.param_opt(name)?.ok_or_else(|| {
            Error::Lookup(format!("{}: parameter `{}` is None", self.type_name, name))
        })
    }

    /// `self.<name>` for a parameter that may be None (`bias`).
    pub fn param_opt(&self, name: &str) -> Result<Option<Tensor>> {
        let r = self.reg.read();
        find(&r.params, name)
            .cloned()
            .ok_or_else(|| self.no_attr(name))
    }

    /// `self.<name>` for a buffer.
    pub fn buffer(&self, name: &str) -> Result<Tensor> {
        self.buffer_opt(name)?
            .ok_or_else(|| Error::Lookup(format!("{}: buffer `{}` is None", self.type_name, name)))
    }

    pub fn buffer_opt(&self, name: &str) -> Result<Option<Tensor>> {
        let r = self.reg.read();
        find(&r.buffers, name)
            .cloned()
            .ok_or_else(|| self.no_attr(name))
    }

    /// `self.<name>` for a submodule.
    pub fn child(&self, name: &str) -> Result<Arc<dyn Module>> {
        let r = self.reg.read();
        match find(&r.modules, name) {
            Some(Some(m)) => Ok(m.clone()),
            Some(None) => Err(Error::Lookup(format!(
                "{}: submodule `{}` is None",
                self.type_name, name
            ))),
            None => Err(self.no_attr(name)),
        }
    }

    pub fn has_parameter(&self, name: &str) -> bool {
        find(&self.reg.read().params, name).is_some()
    }

    pub fn has_buffer(&self, name: &str) -> bool {
        find(&self.reg.read().buffers, name).is_some()
    }

    pub fn has_child(&self, name: &str) -> bool {
        find(&self.reg.read().modules, name).is_some()
    }

    /// `self.<name> = param` for a registered parameter (Python's setattr
    /// with a Parameter value): the slot now holds this tensor object.
    pub fn set_parameter(&self, name: &str, param: Option<Tensor>) -> Result<()> {
        if !self.has_parameter(name) {
            return Err(self.no_attr(name));
        }
        self.register_parameter(name, param)
    }

    /// `self.<name> = tensor` for a registered buffer (what MyBatchNorm1d's
    /// forward does in training mode): replaces the buffer object, keeping
    /// its persistence.
    pub fn set_buffer(&self, name: &str, tensor: Option<Tensor>) -> Result<()> {
        let mut r = self.reg_mut();
        match r.buffers.iter_mut().find(|(k, _)| k == name) {
            Some(slot) => {
                slot.1 = tensor;
                Ok(())
            }
            None => Err(self.no_attr(name)),
        }
    }

    /// `setattr(self, name, module)`: replaces the child in place (same
    /// position in `_modules`) or appends a new one. A parameter or buffer of
    /// that name is removed first, as Python's `__setattr__` does.
    pub fn set_child(&self, name: &str, module: Arc<dyn Module>) -> Result<()> {
        check_name("module", name)?;
        let mut r = self.reg_mut();
        r.params.retain(|(k, _)| k != name);
        r.buffers.retain(|(k, _)| k != name);
        r.non_persistent.remove(name);
        set_entry(&mut r.modules, name, Some(module));
        Ok(())
    }

    /// `delattr(self, name)` for a parameter, buffer or submodule.
    pub fn remove_attr(&self, name: &str) -> Result<()> {
        let mut r = self.reg_mut();
        let before = r.params.len() + r.buffers.len() + r.modules.len();
        r.params.retain(|(k, _)| k != name);
        r.buffers.retain(|(k, _)| k != name);
        r.modules.retain(|(k, _)| k != name);
        r.non_persistent.remove(name);
        if r.params.len() + r.buffers.len() + r.modules.len() == before {
            return Err(self.no_attr(name));
        }
        Ok(())
    }

    /// `_parameters.items()` (None entries included).
    pub fn local_parameters(&self) -> Vec<(String, Option<Tensor>)> {
        self.reg.read().params.clone()
    }

    /// `_buffers.items()` (None entries included).
    pub fn local_buffers(&self) -> Vec<(String, Option<Tensor>)> {
        self.reg.read().buffers.clone()
    }

    /// `_modules.items()` (None entries included).
    pub fn local_modules(&self) -> Vec<(String, Option<Arc<dyn Module>>)> {
        self.reg.read().modules.clone()
    }

    pub fn is_persistent_buffer(&self, name: &str) -> bool {
        !self.reg.read().non_persistent.contains(name)
    }

    // ------------------------------------------------------------ hooks

    fn handle<T>(
        &self,
        id: u64,
        pick: impl Fn(&mut Hooks) -> &mut HookList<T> + Send + Sync + 'static,
    ) -> RemovableHandle {
        let weak = Arc::downgrade(&self.hooks);
        RemovableHandle::new(id, move |id| {
            if let Some(h) = weak.upgrade() {
                pick(&mut h.lock()).remove(id);
            }
        })
    }

    /// `register_forward_pre_hook(hook)`: `hook(module, input)` runs before
    /// forward; returning `Some(x)` replaces the input.
    pub fn register_forward_pre_hook(
        &self,
        hook: impl Fn(&dyn Module, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
    ) -> RemovableHandle {
        let id = self.hooks.lock().forward_pre.push(Arc::new(hook));
        self.handle(id, |h| &mut h.forward_pre)
    }

    /// `register_forward_hook(hook)`: `hook(module, input, output)` runs
    /// after forward; returning `Some(y)` replaces the output.
    pub fn register_forward_hook(
        &self,
        hook: impl Fn(&dyn Module, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
    ) -> RemovableHandle {
        let id = self.hooks.lock().forward.push(Arc::new(hook));
        self.handle(id, |h| &mut h.forward)
    }

    /// `register_full_backward_hook(hook)`: `hook(grad_input, grad_output)`
    /// runs when the gradient with respect to the module's input has been
    /// computed; returning `Some(g)` replaces grad_input. (Unlike PyTorch the
    /// hook does not receive the module: capture what it needs.)
    pub fn register_full_backward_hook(
        &self,
        hook: impl Fn(&[Option<Tensor>], &[Option<Tensor>]) -> Option<Vec<Option<Tensor>>>
            + Send
            + Sync
            + 'static,
    ) -> RemovableHandle {
        let id = self.hooks.lock().backward.push(Arc::new(hook));
        self.handle(id, |h| &mut h.backward)
    }

    /// `register_full_backward_pre_hook(hook)`: `hook(grad_output)` runs when
    /// the gradient of the module's output is known, before the module's own
    /// backward; returning `Some(g)` replaces grad_output.
    pub fn register_full_backward_pre_hook(
        &self,
        hook: impl Fn(&[Option<Tensor>]) -> Option<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> RemovableHandle {
        let id = self.hooks.lock().backward_pre.push(Arc::new(hook));
        self.handle(id, |h| &mut h.backward_pre)
    }

    /// `_register_state_dict_hook(hook)`: `hook(module, state_dict, prefix)`
    /// runs after the module (and its children) wrote their entries and may
    /// edit the dict.
    pub fn register_state_dict_hook(
        &self,
        hook: impl Fn(&dyn Module, &mut StateDict, &str) + Send + Sync + 'static,
    ) -> RemovableHandle {
        let id = self.hooks.lock().state_dict.push(Arc::new(hook));
        self.handle(id, |h| &mut h.state_dict)
    }

    /// `_register_load_state_dict_pre_hook(hook)`: `hook(state_dict, prefix)`
    /// runs before this module reads its entries from the (local) state dict
    /// being loaded, and may edit it (rename keys, convert tensors).
    pub fn register_load_state_dict_pre_hook(
        &self,
        hook: impl Fn(&mut StateDict, &str) -> Result<()> + Send + Sync + 'static,
    ) -> RemovableHandle {
        let id = self.hooks.lock().load_state_dict_pre.push(Arc::new(hook));
        self.handle(id, |h| &mut h.load_state_dict_pre)
    }
}
