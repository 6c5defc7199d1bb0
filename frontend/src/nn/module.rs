//! The `Module` trait (PyTorch's `nn.Module`) and `ModuleExt`, the methods
//! every module gets: `call` (with hooks in `_call_impl`'s order), the
//! registry walks (`named_parameters`, `named_modules`, ... with PyTorch's
//! names, order and de-duplication), `apply`/`_apply`, dtype conversion,
//! train/eval, freezing, `zero_grad`, `repr`, `state_dict`/`load_state_dict`.
//!
//! Decision: a module maps ONE tensor to ONE tensor (`forward(&self, x:
//! &Tensor) -> Result<Tensor>`). Every zoo model fits; hooks see that one
//! input and output, and backward hooks get one-element grad tuples.
//!
//! Forward code reaches its children and parameters by name through the core
//! (`self.core().child("layer1")?.call(&x)`, `self.core().param("weight")?`),
//! so replacing a child by name (`set_submodule`, PyTorch's `setattr`)
//! changes what forward runs.

use super::core::ModuleCore;
use super::hooks::{BackwardHookState, ANY_GLOBAL, GLOBAL_HOOKS};
use super::state_dict::{self, IncompatibleKeys, StateDict};
use crate::autograd::no_grad;
use crate::error::{Error, Result};
use crate::hooks::RemovableHandle;
use crate::tensor::Tensor;
use kiln_ir::DType;
use std::any::Any;
use std::cell::RefCell;
use std::collections::HashSet;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

/// Object plumbing every `Module` gets for free (blanket-implemented for
/// sized modules): `&dyn Any` for downcasting and `&dyn Module` for hooks.
pub trait ModuleBase {
    fn as_any(&self) -> &dyn Any;
    fn as_dyn(&self) -> &dyn Module;
    fn into_any_arc(self: Arc<Self>) -> Arc<dyn Any + Send + Sync>;
}

impl<T: Module> ModuleBase for T {
    fn as_any(&self) -> &dyn Any {
        self
    }
    fn as_dyn(&self) -> &dyn Module {
        self
    }
    fn into_any_arc(self: Arc<Self>) -> Arc<dyn Any + Send + Sync> {
        self
    }
}

/// A neural-network module. Implement `core` (return the `ModuleCore` built
/// in the constructor) and `forward`; `extra_repr` for the text inside the
/// parentheses of `repr`. Call a module with `m.call(&x)` (runs the hooks),
/// not `forward`.
pub trait Module: ModuleBase + Send + Sync + 'static {
    fn core(&self) -> &ModuleCore;

    /// The computation. Reach children and parameters through `self.core()`
    /// by name.
    fn forward(&self, x: &Tensor) -> Result<Tensor>;

    /// PyTorch's `extra_repr()`: e.g. `in_features=4, out_features=2, bias=True`.
    fn extra_repr(&self) -> String {
        String::new()
    }

    /// PyTorch's `__repr__`; containers like ModuleList override it.
    fn repr(&self) -> String {
        default_repr(self.as_dyn())
    }
}

impl dyn Module {
    /// `isinstance(m, T)`.
    pub fn is<T: Module>(&self) -> bool {
        self.as_any().is::<T>()
    }

    pub fn downcast_ref<T: Module>(&self) -> Option<&T> {
        self.as_any().downcast_ref::<T>()
    }
}

/// Downcasts a shared module to its concrete type.
pub fn downcast_arc<T: Module>(m: Arc<dyn Module>) -> Option<Arc<T>> {
    m.into_any_arc().downcast::<T>().ok()
}

impl std::fmt::Display for dyn Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repr())
    }
}

impl std::fmt::Debug for dyn Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.repr())
    }
}

/// A module yielded by `named_modules`/`get_submodule`: the module called on
/// (borrowed) or one of its descendants (shared).
#[derive(Clone)]
pub enum ModuleRef<'a> {
    Root(&'a dyn Module),
    Shared(Arc<dyn Module>),
}

impl<'a> ModuleRef<'a> {
    /// The shared handle, for a descendant (None for the root itself).
    pub fn arc(&self) -> Option<Arc<dyn Module>> {
        match self {
            ModuleRef::Root(_) => None,
            ModuleRef::Shared(a) => Some(a.clone()),
        }
    }
}

impl Deref for ModuleRef<'_> {
    type Target = dyn Module;
    fn deref(&self) -> &(dyn Module + 'static) {
        match self {
            ModuleRef::Root(m) => *m,
            ModuleRef::Shared(a) => &**a,
        }
    }
}

fn core_key(m: &dyn Module) -> usize {
    m.core() as *const ModuleCore as usize
}

fn join(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{prefix}.{name}")
    }
}

// -------------------------------------------------------------------- call scope

/// One module being called on this thread: its dotted path and its
/// children's (name, core address), from which a child finds its own name.
struct Frame {
    path: String,
    children: Vec<(String, usize)>,
}

thread_local! {
    static CALL_STACK: RefCell<Vec<Frame>> = const { RefCell::new(Vec::new()) };
}

struct ScopeGuard;

impl ScopeGuard {
    /// Pushes `m`'s frame; returns its path ("" for the root of the call).
    fn enter(m: &dyn Module) -> (ScopeGuard, String) {
        let key = core_key(m);
        let path = CALL_STACK.with(|s| match s.borrow().last() {
            None => String::new(),
            Some(parent) => {
                let name = parent
                    .children
                    .iter()
                    .find(|(_, k)| *k == key)
                    .map(|(n, _)| n.as_str())
                    .unwrap_or("?");
                join(&parent.path, name)
            }
        });
        let children = m
            .core()
            .reg
            .read()
            .modules
            .iter()
            .filter_map(|(n, c)| c.as_ref().map(|c| (n.clone(), core_key(&**c))))
            .collect();
        CALL_STACK.with(|s| {
            s.borrow_mut().push(Frame {
                path: path.clone(),
                children,
            })
        });
        (ScopeGuard, path)
    }
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        CALL_STACK.with(|s| {
            s.borrow_mut().pop();
        });
    }
}

/// `net.3 (Linear)`, or just the type name for the root of the call.
fn scope_text(path: &str, m: &dyn Module) -> String {
    if path.is_empty() {
        m.core().type_name().to_string()
    } else {
        format!("{path} ({})", m.core().type_name())
    }
}

fn with_scope(e: Error, path: &str, m: &dyn Module) -> Error {
    match e {
        e @ Error::Module { .. } => e,
        e => Error::Module {
            scope: scope_text(path, m),
            source: Box::new(e),
        },
    }
}

/// `_call_impl`: global then module forward pre-hooks (may replace the
/// input), backward-hook setup on the input, forward, global then module
/// forward hooks (may replace the output), backward-hook setup on the output.
fn call_impl(m: &dyn Module, x: &Tensor) -> Result<Tensor> {
    call_with_forward(m, x, &|x| m.forward(x))
}

/// `_call_impl` with `body` in place of `m.forward`: the compiled runtime
/// runs a module's hooks, live, around its compiled forward.
///
/// While a trace with live hooks is recorded (`trace::trace_module_live_hooks`),
/// the root's hooks are left to the runtime (only `body` is traced), and a
/// submodule with hooks (or any module while global hooks exist) is not
/// traced into: its whole call runs untraced and is recorded as one
/// `module_call` node, which the compiled runtime executes by calling the
/// module, so its hooks run at every call exactly as in eager mode.
pub fn call_with_forward(
    m: &dyn Module,
    x: &Tensor,
    body: &dyn Fn(&Tensor) -> Result<Tensor>,
) -> Result<Tensor> {
    let (_scope, path) = ScopeGuard::enter(m);
    // The tracer's scope: `Type` for the root, `Type[name]` below it.
    let attr = (!path.is_empty()).then(|| path.rsplit('.').next().unwrap_or(""));
    let _trace_scope = crate::trace::enter_module(m.core().type_name(), attr);

    if crate::trace::live_hooks() {
        if path.is_empty() {
            return body(x).map_err(|e| with_scope(e, &path, m));
        }
        let global = ANY_GLOBAL.load(std::sync::atomic::Ordering::Relaxed)
            && !super::hooks::global_hook_ids().is_empty();
        if global || m.core().has_call_hooks() {
            let y = {
                let _off = crate::trace::suspend();
                hooked_call(m, x, body, &path)?
            };
            crate::trace::record_module_call(&path, x, &y);
            return Ok(y);
        }
    }
    hooked_call(m, x, body, &path)
}

fn hooked_call(
    m: &dyn Module,
    x: &Tensor,
    body: &dyn Fn(&Tensor) -> Result<Tensor>,
    path: &str,
) -> Result<Tensor> {
    let core = m.core();
    let (pre, fwd, bwd, bwd_pre) = {
        let h = core.hooks.lock();
        (
            h.forward_pre.snapshot(),
            h.forward.snapshot(),
            h.backward.snapshot(),
            h.backward_pre.snapshot(),
        )
    };
    let (gpre, gfwd, gbwd) = if ANY_GLOBAL.load(std::sync::atomic::Ordering::Relaxed) {
        let g = GLOBAL_HOOKS.lock();
        (
            g.forward_pre.snapshot(),
            g.forward.snapshot(),
            g.backward.snapshot(),
        )
    } else {
        (Vec::new(), Vec::new(), Vec::new())
    };
    let run = || -> Result<Tensor> {
        let mut x = x.clone();
        for h in gpre.iter().chain(pre.iter()) {
            if let Some(nx) = h(m, &x)? {
                x = nx;
            }
        }
        let bw = if !gbwd.is_empty() || !bwd.is_empty() || !bwd_pre.is_empty() {
            let hooks = gbwd.iter().chain(bwd.iter()).cloned().collect();
            Some(BackwardHookState::new(hooks, bwd_pre.clone()))
        } else {
            None
        };
        if let Some(bw) = &bw {
            x = bw.setup_input(&x);
        }
        let mut y = body(&x)?;
        for h in gfwd.iter().chain(fwd.iter()) {
            if let Some(ny) = h(m, &x, &y)? {
                y = ny;
            }
        }
        if let Some(bw) = &bw {
            y = bw.setup_output(&y);
        }
        Ok(y)
    };
    run().map_err(|e| with_scope(e, path, m))
}

// -------------------------------------------------------------------- repr

/// PyTorch's `_addindent`.
pub fn addindent(s: &str, spaces: usize) -> String {
    let mut lines = s.split('\n');
    let first = lines.next().unwrap_or("");
    let rest: Vec<String> = lines
        .map(|l| format!("{}{}", " ".repeat(spaces), l))
        .collect();
    if rest.is_empty() {
        return s.to_string();
    }
    format!("{first}\n{}", rest.join("\n"))
}

/// `nn.Module.__repr__`.
pub fn default_repr(m: &dyn Module) -> String {
    let extra = m.extra_repr();
    let extra_lines: Vec<String> = if extra.is_empty() {
        Vec::new()
    } else {
        extra.split('\n').map(str::to_string).collect()
    };
    let child_lines: Vec<String> = m
        .core()
        .local_modules()
        .into_iter()
        .map(|(k, c)| {
            let s = c.map(|c| c.repr()).unwrap_or_else(|| "None".to_string());
            format!("({k}): {}", addindent(&s, 2))
        })
        .collect();
    let mut s = format!("{}(", m.core().type_name());
    if extra_lines.len() == 1 && child_lines.is_empty() {
        s.push_str(&extra_lines[0]);
    } else if !extra_lines.is_empty() || !child_lines.is_empty() {
        let lines: Vec<String> = extra_lines.into_iter().chain(child_lines).collect();
        s.push_str("\n  ");
        s.push_str(&lines.join("\n  "));
        s.push('\n');
    }
    s.push(')');
    s
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below
/// 1e-4 and from 1e16 (`0.01`, `1.0`, `1e-05`).
pub fn py_float(v: f64) -> String {
    if v.is_nan() {
        return "nan".into();
    }
    if v.is_infinite() {
        return if v > 0.0 { "inf".into() } else { "-inf".into() };
    }
    if v == 0.0 {
        return if v.is_sign_negative() {
            "-0.0".into()
        } else {
            "0.0".into()
        };
    }
    let e = format!("{v:e}"); // like "1.5e-5" / "-2e0"
    let (mant, exp) = e.split_once('e').unwrap();
    let exp: i32 = exp.parse().unwrap();
    let neg = mant.starts_with('-');
    let digits: String = mant.chars().filter(|c| c.is_ascii_digit()).collect();
    let sign = if neg { "-" } else { "" };
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        let body = if exp >= 0 {
            let int_len = exp + 1;
            if n <= int_len {
                format!("{}{}.0", digits, "0".repeat((int_len - n) as usize))
            } else {
                format!(
                    "{}.{}",
                    &digits[..int_len as usize],
                    &digits[int_len as usize..]
                )
            }
        } else {
            format!("0.{}{}", "0".repeat((-exp - 1) as usize), digits)
        };
        format!("{sign}{body}")
    } else {
        let m = if digits.len() > 1 {
            format!("{}.{}", &digits[..1], &digits[1..])
        } else {
            digits.clone()
        };
        let es = if exp < 0 { "-" } else { "+" };
        format!("{sign}{m}e{es}{:02}", exp.abs())
    }
}

/// Python's `str(bool)`.
pub fn py_bool(b: bool) -> &'static str {
    if b {
        "True"
    } else {
        "False"
    }
}

// -------------------------------------------------------------------- walks

fn named_modules_into<'a>(
    m: ModuleRef<'a>,
    prefix: String,
    memo: &mut HashSet<usize>,
    remove_duplicate: bool,
    out: &mut Vec<(String, ModuleRef<'a>)>,
) {
    let key = core_key(&*m);
    if memo.contains(&key) {
        return;
    }
    if remove_duplicate {
        memo.insert(key);
    }
    let children = m.core().local_modules();
    out.push((prefix.clone(), m));
    for (name, c) in children {
        if let Some(c) = c {
            named_modules_into(
                ModuleRef::Shared(c),
                join(&prefix, &name),
                memo,
                remove_duplicate,
                out,
            );
        }
    }
}

/// `_named_members`: walks modules (or only self) and yields their members,
/// skipping None and, with `remove_duplicate`, tensors already seen.
fn named_members(
    m: &dyn Module,
    prefix: &str,
    recurse: bool,
    remove_duplicate: bool,
    members: impl Fn(&ModuleCore) -> Vec<(String, Option<Tensor>)>,
) -> Vec<(String, Tensor)> {
    let modules = if recurse {
        m.named_modules_with(prefix, remove_duplicate)
    } else {
        vec![(prefix.to_string(), ModuleRef::Root(m))]
    };
    let mut memo: HashSet<u64> = HashSet::new();
    let mut out = Vec::new();
    for (mp, module) in modules {
        for (k, v) in members(module.core()) {
            let Some(v) = v else { continue };
            if memo.contains(&v.id()) {
                continue;
            }
            if remove_duplicate {
                memo.insert(v.id());
            }
            out.push((join(&mp, &k), v));
        }
    }
    out
}

fn apply_rec(m: &dyn Module, f: &mut dyn FnMut(&dyn Module)) {
    for c in m.children() {
        apply_rec(&*c, f);
    }
    f(m);
}

fn apply_tensors_rec(m: &dyn Module, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
    super::core::bump_structure_epoch();
    for c in m.children() {
        apply_tensors_rec(&*c, f)?;
    }
    let core = m.core();
    for (_, p) in core.local_parameters() {
        let Some(p) = p else { continue };
        let applied = no_grad(|| f(&p))?;
        p.set_data(&applied);
        if let Some(g) = p.grad() {
            let ga = no_grad(|| f(&g))?;
            g.set_data(&ga);
        }
    }
    for (k, b) in core.local_buffers() {
        let Some(b) = b else { continue };
        let nb = no_grad(|| f(&b))?;
        core.set_buffer(&k, Some(nb))?;
    }
    Ok(())
}

fn state_dict_rec(m: &dyn Module, dest: &mut StateDict, prefix: &str) {
    let core = m.core();
    for (k, p) in core.local_parameters() {
        if let Some(p) = p {
            dest.insert(format!("{prefix}{k}"), p.detach());
        }
    }
    {
        let r = core.reg.read();
        for (k, b) in &r.buffers {
            if let Some(b) = b {
                if !r.non_persistent.contains(k) {
                    dest.insert(format!("{prefix}{k}"), b.detach());
                }
            }
        }
    }
    for (k, c) in core.local_modules() {
        if let Some(c) = c {
            state_dict_rec(&*c, dest, &format!("{prefix}{k}."));
        }
    }
    let hooks = core.hooks.lock().state_dict.snapshot();
    for h in hooks {
        h(m, dest, prefix);
    }
}

/// Methods every module has (blanket-implemented; `use kiln_frontend::nn::ModuleExt`
/// or the `nn::prelude`).
pub trait ModuleExt: Module {
    /// `module(x)`: hooks and forward in `_call_impl`'s order; an error from
    /// forward is wrapped with the module's scope (`net.3 (Linear)`).
    fn call(&self, x: &Tensor) -> Result<Tensor> {
        call_impl(self.as_dyn(), x)
    }

    fn type_name(&self) -> &str {
        self.core().type_name()
    }

    fn is_training(&self) -> bool {
        self.core().is_training()
    }

    /// `train(mode)`: sets the flag on this module and every descendant.
    fn train(&self, mode: bool) {
        self.core().set_training_flag(mode);
        for c in self.children() {
            c.train(mode);
        }
    }

    /// `eval()` = `train(false)`.
    fn eval(&self) {
        self.train(false)
    }

    // ---------------------------------------------------------------- walks

    /// `named_modules()`: self first (name ""), then depth-first in
    /// registration order; a module reachable twice is yielded once.
    fn named_modules(&self) -> Vec<(String, ModuleRef<'_>)> {
        self.named_modules_with("", true)
    }

    fn named_modules_with(
        &self,
        prefix: &str,
        remove_duplicate: bool,
    ) -> Vec<(String, ModuleRef<'_>)> {
        let mut out = Vec::new();
        let mut memo = HashSet::new();
        named_modules_into(
            ModuleRef::Root(self.as_dyn()),
            prefix.to_string(),
            &mut memo,
            remove_duplicate,
            &mut out,
        );
        out
    }

    fn modules(&self) -> Vec<ModuleRef<'_>> {
        self.named_modules().into_iter().map(|(_, m)| m).collect()
    }

    /// `named_children()`: direct children, each module once.
    fn named_children(&self) -> Vec<(String, Arc<dyn Module>)> {
        let mut memo = HashSet::new();
        self.core()
            .local_modules()
            .into_iter()
            .filter_map(|(k, m)| m.map(|m| (k, m)))
            .filter(|(_, m)| memo.insert(core_key(&**m)))
            .collect()
    }

    fn children(&self) -> Vec<Arc<dyn Module>> {
        self.named_children().into_iter().map(|(_, m)| m).collect()
    }

    /// `named_parameters()` (recurse, no prefix, duplicates removed).
    fn named_parameters(&self) -> Vec<(String, Tensor)> {
        self.named_parameters_with("", true, true)
    }

    fn named_parameters_with(
        &self,
        prefix: &str,
        recurse: bool,
        remove_duplicate: bool,
    ) -> Vec<(String, Tensor)> {
        named_members(self.as_dyn(), prefix, recurse, remove_duplicate, |c| {
            c.local_parameters()
        })
    }

    fn parameters(&self) -> Vec<Tensor> {
        self.named_parameters()
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    fn parameters_with(&self, recurse: bool) -> Vec<Tensor> {
        self.named_parameters_with("", recurse, true)
            .into_iter()
            .map(|(_, t)| t)
            .collect()
    }

    /// `named_buffers()` (persistent and not).
    fn named_buffers(&self) -> Vec<(String, Tensor)> {
        self.named_buffers_with("", true, true)
    }

    fn named_buffers_with(
        &self,
        prefix: &str,
        recurse: bool,
        remove_duplicate: bool,
    ) -> Vec<(String, Tensor)> {
        named_members(self.as_dyn(), prefix, recurse, remove_duplicate, |c| {
            c.local_buffers()
        })
    }

    fn buffers(&self) -> Vec<Tensor> {
        self.named_buffers().into_iter().map(|(_, t)| t).collect()
    }

    // ---------------------------------------------------------------- lookup

    /// `get_submodule("a.b.c")`; "" is self. Errors name the module lacking
    /// the attribute: "SimpleNet has no attribute `layer3`".
    fn get_submodule(&self, target: &str) -> Result<ModuleRef<'_>> {
        let mut cur = ModuleRef::Root(self.as_dyn());
        if target.is_empty() {
            return Ok(cur);
        }
        for item in target.split('.') {
            let core = cur.core();
            if !core.has_child(item) {
                if core.has_parameter(item) || core.has_buffer(item) {
                    return Err(Error::Lookup(format!("`{item}` is not an nn.Module")));
                }
                return Err(Error::Lookup(format!(
                    "{} has no attribute `{item}`",
                    core.type_name()
                )));
            }
            let next = core.child(item)?;
            cur = ModuleRef::Shared(next);
        }
        Ok(cur)
    }

    /// `get_parameter("a.b.weight")`.
    fn get_parameter(&self, target: &str) -> Result<Tensor> {
        let (path, name) = target.rsplit_once('.').unwrap_or(("", target));
        let m = self.get_submodule(path)?;
        let core = m.core();
        if core.has_parameter(name) {
            return core
                .param_opt(name)?
                .ok_or_else(|| Error::Lookup(format!("`{name}` is not an nn.Parameter")));
        }
        if core.has_buffer(name) || core.has_child(name) {
            return Err(Error::Lookup(format!("`{name}` is not an nn.Parameter")));
        }
        Err(Error::Lookup(format!(
            "{} has no attribute `{name}`",
            core.type_name()
        )))
    }

    /// `get_buffer("a.b.running_mean")`.
    fn get_buffer(&self, target: &str) -> Result<Tensor> {
        let (path, name) = target.rsplit_once('.').unwrap_or(("", target));
        let m = self.get_submodule(path)?;
        let core = m.core();
        if core.has_buffer(name) {
            return core
                .buffer_opt(name)?
                .ok_or_else(|| Error::Lookup(format!("`{name}` is not a buffer")));
        }
        if core.has_parameter(name) || core.has_child(name) {
            return Err(Error::Lookup(format!("`{name}` is not a buffer")));
        }
        Err(Error::Lookup(format!(
            "{} has no attribute `{name}`",
            core.type_name()
        )))
    }

    /// `set_submodule("net.2", module)`: replaces (or adds) the module at a
    /// dotted path; forward runs the new one.
    fn set_submodule(&self, target: &str, module: Arc<dyn Module>) -> Result<()> {
        if target.is_empty() {
            return Err(Error::Lookup(
                "Cannot set the submodule without a target name!".into(),
            ));
        }
        let (path, name) = target.rsplit_once('.').unwrap_or(("", target));
        let parent = self.get_submodule(path)?;
        let core = parent.core();
        if core.has_parameter(name) || core.has_buffer(name) {
            return Err(Error::Lookup(format!("`{name}` is not an nn.Module")));
        }
        core.set_child(name, module)
    }

    // ---------------------------------------------------------------- apply

    /// `apply(fn)`: `fn` on every child (recursively) first, then on self.
    fn apply(&self, mut f: impl FnMut(&dyn Module)) {
        apply_rec(self.as_dyn(), &mut f)
    }

    /// `_apply(fn)`: children first; each parameter keeps its tensor object
    /// (`param.data = fn(param)`, the grad likewise); buffers are replaced by
    /// `fn(buffer)`. Runs under no_grad.
    fn apply_tensors(&self, f: &dyn Fn(&Tensor) -> Result<Tensor>) -> Result<()> {
        apply_tensors_rec(self.as_dyn(), f)
    }

    /// `to(dtype)`: floating parameters and buffers are converted (integer
    /// ones such as `num_batches_tracked` are kept). `dtype` must be floating.
    fn to_dtype(&self, dtype: DType) -> Result<()> {
        if !dtype.is_float() {
            return Err(Error::op(
                "Module.to",
                format!("nn.Module.to only accepts floating point or complex dtypes, but got desired dtype={dtype}"),
            ));
        }
        self.apply_tensors(&|t: &Tensor| {
            if t.is_floating_point() {
                t.to_dtype(dtype)
            } else {
                Ok(t.clone())
            }
        })
    }

    /// `to(device)`: every parameter and buffer moved to `device`;
    /// parameters keep their tensor objects (`param.data = ...`, as
    /// `_apply`), so optimizers and hooks holding them still see them.
    fn to_device(&self, device: crate::Device) -> Result<()> {
        self.apply_tensors(&|t: &Tensor| t.to_device(device))
    }

    fn float(&self) -> Result<()> {
        self.to_dtype(DType::F32)
    }
    fn double(&self) -> Result<()> {
        self.to_dtype(DType::F64)
    }
    fn half(&self) -> Result<()> {
        self.to_dtype(DType::F16)
    }
    fn bfloat16(&self) -> Result<()> {
        self.to_dtype(DType::BF16)
    }

    /// `requires_grad_(flag)` on every parameter (freezing with `false`).
    fn requires_grad_(&self, requires_grad: bool) -> Result<()> {
        for p in self.parameters() {
            p.set_requires_grad(requires_grad)?;
        }
        Ok(())
    }

    /// `zero_grad(set_to_none)`: drops every parameter's `.grad`, or zeroes
    /// it in place (detached) when `set_to_none` is false.
    fn zero_grad(&self, set_to_none: bool) -> Result<()> {
        for p in self.parameters() {
            zero_grad_of(&p, set_to_none)?;
        }
        Ok(())
    }

    // ---------------------------------------------------------------- repr

    /// The `repr` text (same as `format!("{}", m as &dyn Module)`).
    fn to_repr(&self) -> String {
        self.repr()
    }

    // ---------------------------------------------------------------- state dict

    /// `state_dict()`: per module, its parameters then its persistent
    /// buffers, then its children's entries, under dotted keys; values are
    /// detached (sharing storage with the model); state-dict hooks applied.
    fn state_dict(&self) -> StateDict {
        let mut sd = StateDict::new();
        state_dict_rec(self.as_dyn(), &mut sd, "");
        sd
    }

    /// `load_state_dict(sd, strict)`. Validates everything first (missing and
    /// unexpected keys under `strict`, shapes, dtypes: a dtype different from
    /// the model's is rejected, not converted), and only then copies under
    /// no_grad: on error the model is unchanged and the error lists every
    /// offending key.
    fn load_state_dict(&self, sd: &StateDict, strict: bool) -> Result<IncompatibleKeys> {
        state_dict::load_into(self.as_dyn(), sd, strict)
    }

    /// Writes `state_dict()` to a safetensors file (PyTorch's key names).
    fn save_safetensors(&self, path: impl AsRef<Path>) -> Result<()> {
        self.state_dict().save_safetensors(path, None)
    }

    /// Loads a safetensors file (e.g. PyTorch's `save_file(model.state_dict())`).
    fn load_safetensors(&self, path: impl AsRef<Path>, strict: bool) -> Result<IncompatibleKeys> {
        let sd = StateDict::load_safetensors(path)?;
        self.load_state_dict(&sd, strict)
    }

    // ---------------------------------------------------------------- hooks

    fn register_forward_pre_hook(
        &self,
        hook: impl Fn(&dyn Module, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
    ) -> RemovableHandle {
        self.core().register_forward_pre_hook(hook)
    }

    fn register_forward_hook(
        &self,
        hook: impl Fn(&dyn Module, &Tensor, &Tensor) -> Result<Option<Tensor>> + Send + Sync + 'static,
    ) -> RemovableHandle {
        self.core().register_forward_hook(hook)
    }

    fn register_full_backward_hook(
        &self,
        hook: impl Fn(&[Option<Tensor>], &[Option<Tensor>]) -> Option<Vec<Option<Tensor>>>
            + Send
            + Sync
            + 'static,
    ) -> RemovableHandle {
        self.core().register_full_backward_hook(hook)
    }

    fn register_full_backward_pre_hook(
        &self,
        hook: impl Fn(&[Option<Tensor>]) -> Option<Vec<Option<Tensor>>> + Send + Sync + 'static,
    ) -> RemovableHandle {
        self.core().register_full_backward_pre_hook(hook)
    }
}

impl<T: Module + ?Sized> ModuleExt for T {}

/// Zeroes or drops one tensor's gradient (shared by modules and optimizers).
pub(crate) fn zero_grad_of(p: &Tensor, set_to_none: bool) -> Result<()> {
    if let Some(g) = p.grad() {
        if set_to_none {
            p.set_grad(None);
        } else {
            let g = if g.grad_fn().is_some() {
                let d = g.detach();
                p.set_grad(Some(d.clone()));
                d
            } else {
                g
            };
            no_grad(|| g.zero_()).map(|_| ())?;
        }
    }
    Ok(())
}
