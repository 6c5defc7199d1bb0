//! Reverse-mode autograd, as PyTorch's: each differentiable op run with
//! grad mode on and an input that requires grad records a `Node` (its
//! `grad_fn`, named like PyTorch's: `AddBackward0`, `AddmmBackward0`...)
//! pointing at the nodes of its inputs. Leaves get an `AccumulateGrad` node
//! that sums into `.grad`. `Tensor::backward` and `autograd::grad` run the
//! engine in `engine.rs`.

mod engine;

pub use engine::{grad, retains_graph};

use crate::error::{Error, Result};
use crate::hooks::{next_hook_id, RemovableHandle};
use crate::tensor::{Tensor, TensorImpl};
use parking_lot::Mutex;
use std::borrow::Cow;
use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

/// A tensor hook: sees the gradient and may return a replacement.
pub type TensorHook = Arc<dyn Fn(&Tensor) -> Option<Tensor> + Send + Sync>;

/// An op's backward: given the gradient of each output (None = zero / not
/// reached) and which inputs need a gradient, returns one gradient per input.
pub type BackwardFn =
    Box<dyn Fn(&[Option<Tensor>], &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync>;

#[derive(Default)]
pub(crate) struct AutogradMeta {
    pub requires_grad: bool,
    pub grad: Option<Tensor>,
    pub grad_fn: Option<Arc<Node>>,
    pub output_nr: usize,
    pub retains_grad: bool,
    pub grad_accumulator: Weak<Node>,
    /// Hooks of a leaf (a non-leaf's hooks live on its grad_fn).
    pub hooks: Vec<(u64, TensorHook)>,
}

/// Where a gradient flows: input `input_nr` of `node`.
#[derive(Clone)]
pub struct Edge {
    pub node: Arc<Node>,
    pub input_nr: usize,
}

pub(crate) enum NodeKind {
    /// An op's backward; `None` once released after a backward pass.
    Function(Mutex<Option<BackwardFn>>),
    /// Sums the gradient into the leaf's `.grad`, after the leaf's hooks.
    AccumulateGrad(Arc<TensorImpl>),
}

/// A node of the backward graph (PyTorch's `torch.autograd.graph.Node`).
pub struct Node {
    name: Cow<'static, str>,
    pub(crate) seq: u64,
    pub(crate) next: Vec<Option<Edge>>,
    pub(crate) kind: NodeKind,
    pub(crate) num_outputs: usize,
    /// Hooks of non-leaf outputs: (hook id, output_nr, hook).
    pub(crate) pre_hooks: Mutex<Vec<(u64, usize, TensorHook)>>,
    /// Outputs that called `retain_grad`.
    pub(crate) retained: Mutex<Vec<(usize, Weak<TensorImpl>)>>,
}

impl Node {
    /// PyTorch's class name of this node (`MulBackward0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `grad_fn.next_functions`: (node, input_nr) per input, None where the
    /// input needs no gradient.
    pub fn next_functions(&self) -> Vec<Option<(Arc<Node>, usize)>> {
        self.next
            .iter()
            .map(|e| e.as_ref().map(|e| (e.node.clone(), e.input_nr)))
            .collect()
    }

    /// For an AccumulateGrad node, the leaf tensor it accumulates into.
    pub fn variable(&self) -> Option<Tensor> {
        match &self.kind {
            NodeKind::AccumulateGrad(t) => Some(Tensor { inner: t.clone() }),
            NodeKind::Function(_) => None,
        }
    }
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "<{}>", self.name)
    }
}

fn next_seq() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(1);
    SEQ.fetch_add(1, Ordering::Relaxed)
}

// -------------------------------------------------------------------- grad mode

thread_local! {
    static GRAD_ENABLED: Cell<bool> = const { Cell::new(true) };
}

/// True unless inside `no_grad` (per thread, as PyTorch's grad mode).
pub fn is_grad_enabled() -> bool {
    GRAD_ENABLED.with(|g| g.get())
}

/// Sets grad mode for this thread; returns the previous value.
pub fn set_grad_enabled(enabled: bool) -> bool {
    GRAD_ENABLED.with(|g| g.replace(enabled))
}

/// Restores the previous grad mode when dropped (`with torch.no_grad():`).
pub struct NoGradGuard {
    prev: bool,
}

impl NoGradGuard {
    #[allow(clippy::new_without_default)]
    pub fn new() -> NoGradGuard {
        NoGradGuard {
            prev: set_grad_enabled(false),
        }
    }
}

impl Drop for NoGradGuard {
    fn drop(&mut self) {
        set_grad_enabled(self.prev);
    }
}

/// Runs `f` with gradient recording off.
pub fn no_grad<R>(f: impl FnOnce() -> R) -> R {
    let _g = NoGradGuard::new();
    f()
}

// -------------------------------------------------------------------- recording

/// The edge a gradient for `t` flows into, or None if `t` needs no gradient.
pub(crate) fn edge_of(t: &Tensor) -> Option<Edge> {
    let mut m = t.inner.meta.lock();
    if !m.requires_grad {
        return None;
    }
    if let Some(f) = &m.grad_fn {
        return Some(Edge {
            node: f.clone(),
            input_nr: m.output_nr,
        });
    }
    let acc = match m.grad_accumulator.upgrade() {
        Some(a) => a,
        None => {
            let a = Arc::new(Node {
                name: Cow::Borrowed("AccumulateGrad"),
                seq: u64::MAX, // run as soon as ready, like PyTorch's
                next: Vec::new(),
                kind: NodeKind::AccumulateGrad(t.inner.clone()),
                num_outputs: 1,
                pre_hooks: Mutex::new(Vec::new()),
                retained: Mutex::new(Vec::new()),
            });
            m.grad_accumulator = Arc::downgrade(&a);
            a
        }
    };
    Some(Edge {
        node: acc,
        input_nr: 0,
    })
}

/// True if an op on these inputs must record a backward node.
pub(crate) fn needs_grad(inputs: &[&Tensor]) -> bool {
    is_grad_enabled() && inputs.iter().any(|t| t.requires_grad())
}

/// Records `backward` as the grad_fn of `outputs` (fresh tensors produced by
/// the op) if grad mode is on and an input requires grad. `backward`
/// captures what it saved (detached tensors, shapes); it is dropped after a
/// backward pass that does not retain the graph.
pub(crate) fn record(
    name: impl Into<Cow<'static, str>>,
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    backward: impl Fn(&[Option<Tensor>], &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) {
    if !needs_grad(inputs) {
        return;
    }
    let node = Arc::new(Node {
        name: name.into(),
        seq: next_seq(),
        next: inputs.iter().map(|t| edge_of(t)).collect(),
        kind: NodeKind::Function(Mutex::new(Some(Box::new(backward)))),
        num_outputs: outputs.len(),
        pre_hooks: Mutex::new(Vec::new()),
        retained: Mutex::new(Vec::new()),
    });
    for (i, o) in outputs.iter().enumerate() {
        let mut m = o.inner.meta.lock();
        m.requires_grad = true;
        m.grad_fn = Some(node.clone());
        m.output_nr = i;
    }
}

/// Public form of `record` for code outside this crate that computes a
/// differentiable function itself (compiled training's
/// `CompiledFunctionBackward`): records `backward` as the grad_fn of
/// `outputs` when grad mode is on and an input requires grad. `outputs`
/// must be fresh tensors (no grad_fn, not leaves anyone else owns).
pub fn record_function(
    name: impl Into<Cow<'static, str>>,
    inputs: &[&Tensor],
    outputs: &[&Tensor],
    backward: impl Fn(&[Option<Tensor>], &[bool]) -> Result<Vec<Option<Tensor>>> + Send + Sync + 'static,
) {
    record(name, inputs, outputs, backward)
}

/// Marks `outputs`, computed by a fused backward kernel from `inputs`, as
/// not differentiable again: if a graph of the gradient is being built
/// (create_graph), differentiating through them is an error naming `what`
/// instead of a silently wrong zero.
pub(crate) fn record_no_double_backward(what: &str, inputs: &[&Tensor], outputs: &[&Tensor]) {
    if !needs_grad(inputs) {
        return;
    }
    let what = what.to_string();
    record("NotImplemented", inputs, outputs, move |_, _| {
        Err(Error::Autograd(format!(
            "double backward through the backward of {what} is not supported yet"
        )))
    });
}

// -------------------------------------------------------------------- tensor API

impl Tensor {
    /// Registers a hook called with this tensor's gradient during backward;
    /// a hook returning `Some(g)` replaces the gradient. For a leaf the hook
    /// runs before accumulation into `.grad`.
    pub fn register_hook(
        &self,
        hook: impl Fn(&Tensor) -> Option<Tensor> + Send + Sync + 'static,
    ) -> Result<RemovableHandle> {
        let hook: TensorHook = Arc::new(hook);
        let id = next_hook_id();
        let mut m = self.inner.meta.lock();
        if !m.requires_grad {
            return Err(Error::Autograd(
                "cannot register a hook on a tensor that doesn't require gradient".into(),
            ));
        }
        match &m.grad_fn {
            Some(node) => {
                node.pre_hooks.lock().push((id, m.output_nr, hook));
                let weak = Arc::downgrade(node);
                Ok(RemovableHandle::new(id, move |id| {
                    if let Some(n) = weak.upgrade() {
                        n.pre_hooks.lock().retain(|(i, _, _)| *i != id);
                    }
                }))
            }
            None => {
                m.hooks.push((id, hook));
                let weak = Arc::downgrade(&self.inner);
                Ok(RemovableHandle::new(id, move |id| {
                    if let Some(t) = weak.upgrade() {
                        t.meta.lock().hooks.retain(|(i, _)| *i != id);
                    }
                }))
            }
        }
    }

    /// Makes a non-leaf keep its `.grad` after backward (no-op on leaves).
    pub fn retain_grad(&self) -> Result<()> {
        let mut m = self.inner.meta.lock();
        if !m.requires_grad {
            return Err(Error::Autograd(
                "can't retain_grad on Tensor that has requires_grad=False".into(),
            ));
        }
        if m.retains_grad {
            return Ok(());
        }
        if let Some(node) = &m.grad_fn {
            node.retained
                .lock()
                .push((m.output_nr, Arc::downgrade(&self.inner)));
            m.retains_grad = true;
        }
        Ok(())
    }

    /// `backward()`: for a one-element tensor the gradient defaults to 1.
    pub fn backward(&self) -> Result<()> {
        self.backward_with(None, false)
    }

    /// `backward(gradient, retain_graph)`.
    pub fn backward_with(&self, gradient: Option<&Tensor>, retain_graph: bool) -> Result<()> {
        let g = match gradient {
            Some(g) => g.clone(),
            None => {
                if self.numel() != 1 {
                    return Err(Error::Autograd(format!(
                        "grad can be implicitly created only for scalar outputs (got shape {:?})",
                        self.shape()
                    )));
                }
                self.ones_like()?
            }
        };
        engine::run_backward(std::slice::from_ref(self), &[g], retain_graph, false, None)
            .map(|_| ())
    }
}
