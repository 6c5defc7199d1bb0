//! Module hooks: the hook types, ordered hook lists, the global hooks
//! (`register_module_forward_pre_hook`, `register_module_forward_hook`,
//! `register_module_full_backward_hook`), and PyTorch's `BackwardHook`
//! machinery: identity autograd nodes (`BackwardHookFunctionBackward`)
//! recorded on a module's input and output, so full backward hooks see
//! grad_input and grad_output and may replace grad_input.

use super::module::Module;
use super::state_dict::StateDict;
use crate::autograd::{is_grad_enabled, record};
use crate::error::{Error, Result};
use crate::hooks::{next_hook_id, RemovableHandle};
use crate::tensor::Tensor;
use parking_lot::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, LazyLock};

pub type ForwardPreHook = Arc<dyn Fn(&dyn Module, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;
pub type ForwardHook =
    Arc<dyn Fn(&dyn Module, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync>;
pub type BackwardHook =
    Arc<dyn Fn(&[Option<Tensor>], &[Option<Tensor>]) -> Option<Vec<Option<Tensor>>> + Send + Sync>;
pub type BackwardPreHook =
    Arc<dyn Fn(&[Option<Tensor>]) -> Option<Vec<Option<Tensor>>> + Send + Sync>;
pub type StateDictHook = Arc<dyn Fn(&dyn Module, &mut StateDict, &str) + Send + Sync>;
pub type LoadStateDictPreHook = Arc<dyn Fn(&mut StateDict, &str) -> Result<()> + Send + Sync>;

/// An ordered dict of hooks keyed by registration id.
pub struct HookList<T> {
    items: Vec<(u64, T)>,
}

impl<T> Default for HookList<T> {
    fn default() -> Self {
        HookList { items: Vec::new() }
    }
}

impl<T> HookList<T> {
    pub(crate) fn push(&mut self, h: T) -> u64 {
        super::core::bump_structure_epoch();
        let id = next_hook_id();
        self.items.push((id, h));
        id
    }
    pub(crate) fn remove(&mut self, id: u64) {
        super::core::bump_structure_epoch();
        self.items.retain(|(i, _)| *i != id);
    }

    /// Registration ids, in order.
    pub(crate) fn ids(&self) -> impl Iterator<Item = u64> + '_ {
        self.items.iter().map(|(i, _)| *i)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

impl<T: Clone> HookList<T> {
    pub(crate) fn snapshot(&self) -> Vec<T> {
        self.items.iter().map(|(_, h)| h.clone()).collect()
    }
}

// -------------------------------------------------------------------- global hooks

#[derive(Default)]
pub(crate) struct GlobalHooks {
    pub forward_pre: HookList<ForwardPreHook>,
    pub forward: HookList<ForwardHook>,
    pub backward: HookList<BackwardHook>,
}

pub(crate) static GLOBAL_HOOKS: LazyLock<Arc<Mutex<GlobalHooks>>> =
    LazyLock::new(|| Arc::new(Mutex::new(GlobalHooks::default())));
/// Fast path: true once any global hook was registered.
pub(crate) static ANY_GLOBAL: AtomicBool = AtomicBool::new(false);

fn global_handle<T: 'static>(
    id: u64,
    pick: impl Fn(&mut GlobalHooks) -> &mut HookList<T> + Send + Sync + 'static,
) -> RemovableHandle {
    RemovableHandle::new(id, move |id| pick(&mut GLOBAL_HOOKS.lock()).remove(id))
}

/// Ids of the registered global forward pre-, forward and backward hooks
/// (for the compiled runtime's guards).
pub fn global_hook_ids() -> Vec<u64> {
    let g = GLOBAL_HOOKS.lock();
    g.forward_pre
        .ids()
        .chain(g.forward.ids())
        .chain(g.backward.ids())
        .collect()
}

/// `torch.nn.modules.module.register_module_forward_pre_hook`: runs before
/// every module's own forward pre-hooks, for every module call.
pub fn register_module_forward_pre_hook(
    hook: impl Fn(&dyn Module, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
) -> RemovableHandle {
    ANY_GLOBAL.store(true, Ordering::Relaxed);
    let id = GLOBAL_HOOKS.lock().forward_pre.push(Arc::new(hook));
    global_handle(id, |g| &mut g.forward_pre)
}

/// `register_module_forward_hook`: runs before every module's own forward hooks.
pub fn register_module_forward_hook(
    hook: impl Fn(&dyn Module, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
) -> RemovableHandle {
    ANY_GLOBAL.store(true, Ordering::Relaxed);
    let id = GLOBAL_HOOKS.lock().forward.push(Arc::new(hook));
    global_handle(id, |g| &mut g.forward)
}

/// `register_module_full_backward_hook`: runs before every module's own
/// full backward hooks.
pub fn register_module_full_backward_hook(
    hook: impl Fn(&[Option<Tensor>], &[Option<Tensor>]) -> Option<Vec<Option<Tensor>>>
        + Send
        + Sync
        + 'static,
) -> RemovableHandle {
    ANY_GLOBAL.store(true, Ordering::Relaxed);
    let id = GLOBAL_HOOKS.lock().backward.push(Arc::new(hook));
    global_handle(id, |g| &mut g.backward)
}

// -------------------------------------------------------------------- BackwardHook

/// One call's backward-hook state (PyTorch's `torch.utils.hooks.BackwardHook`).
pub(crate) struct BackwardHookState {
    hooks: Vec<BackwardHook>,
    pre_hooks: Vec<BackwardPreHook>,
    grad_outputs: Mutex<Option<Vec<Option<Tensor>>>>,
    input_hooked: AtomicBool,
}

fn check_len(res: &[Option<Tensor>], n: usize, what: &str) -> Result<()> {
    if res.len() != n {
        return Err(Error::Autograd(format!(
            "Backward hook returned an invalid number of {what} (got {}, but expected {n})",
            res.len()
        )));
    }
    Ok(())
}

impl BackwardHookState {
    pub fn new(hooks: Vec<BackwardHook>, pre_hooks: Vec<BackwardPreHook>) -> Arc<Self> {
        Arc::new(BackwardHookState {
            hooks,
            pre_hooks,
            grad_outputs: Mutex::new(None),
            input_hooked: AtomicBool::new(false),
        })
    }

    /// `setup_input_hook`: wraps the input in an identity node whose
    /// backward calls the full backward hooks with (grad_input, grad_output).
    pub fn setup_input(self: &Arc<Self>, x: &Tensor) -> Tensor {
        if !(is_grad_enabled() && x.requires_grad()) {
            return x.clone();
        }
        let y = x.detach();
        self.input_hooked.store(true, Ordering::Relaxed);
        let state = self.clone();
        record("BackwardHookFunctionBackward", &[x], &[&y], move |g, _| {
            let mut grad_input: Vec<Option<Tensor>> = g.to_vec();
            let grad_output = state.grad_outputs.lock().clone().unwrap_or_default();
            for h in &state.hooks {
                if let Some(r) = h(&grad_input, &grad_output) {
                    check_len(&r, grad_input.len(), "grad_input")?;
                    grad_input = r;
                }
            }
            Ok(grad_input)
        });
        y
    }

    /// `setup_output_hook`: wraps the output in an identity node whose
    /// backward records grad_output (after the backward pre-hooks).
    pub fn setup_output(self: &Arc<Self>, y: &Tensor) -> Tensor {
        if !(is_grad_enabled() && y.requires_grad()) {
            return y.clone();
        }
        let out = y.detach();
        let state = self.clone();
        record(
            "BackwardHookFunctionBackward",
            &[y],
            &[&out],
            move |g, _| {
                let mut grad_output: Vec<Option<Tensor>> = g.to_vec();
                for h in &state.pre_hooks {
                    if let Some(r) = h(&grad_output) {
                        check_len(&r, grad_output.len(), "grad_output")?;
                        grad_output = r;
                    }
                }
                *state.grad_outputs.lock() = Some(grad_output.clone());
                if !state.input_hooked.load(Ordering::Relaxed) {
                    // No input requires grad: hooks see grad_input = (None,) and
                    // must not return gradients.
                    let none = vec![None];
                    for h in &state.hooks {
                        if let Some(r) = h(&none, &grad_output) {
                            if r.iter().any(|t| t.is_some()) {
                                return Err(Error::Autograd(
                                "Backward hook for Modules where no input requires gradient should always return None or None for all gradients.".into(),
                            ));
                            }
                        }
                    }
                }
                Ok(grad_output)
            },
        );
        out
    }
}
