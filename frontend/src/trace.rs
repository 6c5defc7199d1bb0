//! The tracer: while `trace_module` runs a module's forward once, every
//! tensor op records a node into a kiln-ir `Graph` (as PyTorch's
//! `_slow_forward` path records a trace). Tensors are mapped to graph values
//! by their identity; parameters and buffers of the module enter as inputs
//! bound BY NAME (never baked in), user inputs as user inputs, and any other
//! tensor the forward reads (a captured tensor, a `zeros` made inside
//! forward) as a constant. Module calls push their scope
//! (`SimpleNet/Linear[layer1]`), so every node knows where it was recorded.
//!
//! In-place writes rebind the written tensor to its new value, so buffer
//! updates (BatchNorm running stats, reassigned buffers) become graph
//! outputs written back to the buffers. A host read of tensor data
//! (`item`, `to_vec`) records a warning naming the scope: the trace may not
//! generalize. A value produced by an op the tracer cannot express makes the
//! trace fail (if the value is used), never a silently frozen constant.

use crate::error::{Error, Result};
use crate::tensor::Tensor;
use kiln_ir::{Graph, GraphOutput, InputKind, NodeId, Op, OutputKind, TensorType, Value};
use std::cell::RefCell;
use std::collections::{HashMap, HashSet};

struct State {
    graph: Graph,
    values: HashMap<u64, Value>,
    /// Tensors bound by name (parameters and buffers) by identity.
    bindings: HashMap<u64, InputKind>,
    /// Tensors made by factories during the trace (legitimate constants).
    created: HashSet<u64>,
    /// First tensor id allocated during the trace.
    start_id: u64,
    /// Constant nodes awaiting their data (filled at the end, only for
    /// constants that survive dead-code elimination).
    constants: HashMap<NodeId, Tensor>,
    /// Constants standing for values no recorded op produced.
    poison: HashMap<NodeId, String>,
    scopes: Vec<String>,
    suspended: u32,
    warnings: Vec<String>,
    error: Option<Error>,
    last_op: String,
}

thread_local! {
    static TRACE: RefCell<Option<State>> = const { RefCell::new(None) };
    static LIVE_HOOKS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// True while `trace_module_live_hooks` records (see `nn::call_with_forward`).
pub fn live_hooks() -> bool {
    is_tracing() && LIVE_HOOKS.with(|l| l.get())
}

/// Records a hooked submodule's call as one `module_call` node.
pub(crate) fn record_module_call(path: &str, x: &Tensor, y: &Tensor) {
    record(
        Op::ModuleCall {
            path: path.to_string(),
            ty: ty(y),
        },
        &[x],
        &[y],
    );
}

/// True while a trace is being recorded on this thread (and not suspended).
pub fn is_tracing() -> bool {
    TRACE.with(|t| t.borrow().as_ref().is_some_and(|s| s.suspended == 0))
}

fn with_state<R>(f: impl FnOnce(&mut State) -> R) -> Option<R> {
    TRACE.with(|t| {
        let mut b = t.borrow_mut();
        match b.as_mut() {
            Some(s) if s.suspended == 0 => Some(f(s)),
            _ => None,
        }
    })
}

fn ty(t: &Tensor) -> TensorType {
    TensorType::new(&t.shape(), t.dtype())
}

impl State {
    fn scope(&self) -> String {
        self.scopes.join("/")
    }

    fn value_of(&mut self, t: &Tensor) -> Option<Value> {
        if let Some(v) = self.values.get(&t.id()) {
            return Some(*v);
        }
        let scope = self.scope();
        let v = if let Some(kind) = self.bindings.get(&t.id()).cloned() {
            match self.graph.add_input(kind, ty(t), &scope) {
                Ok(v) => v,
                Err(e) => {
                    self.fail(Error::op("trace", e.to_string()));
                    return None;
                }
            }
        } else {
            // The data is filled in at the end, only if the constant is live.
            let node = self.graph.insert_raw(kiln_ir::Node {
                op: Op::Constant {
                    ty: ty(t),
                    data: Vec::new(),
                },
                outputs: vec![ty(t)],
                scope: scope.clone(),
            });
            let v = Value::new(node, 0);
            self.constants.insert(v.node, t.clone());
            if t.id() >= self.start_id && !self.created.contains(&t.id()) {
                self.poison.insert(
                    v.node,
                    format!("a value computed by an op the tracer cannot record (last recorded op: {}, scope {})", self.last_op, scope),
                );
            }
            v
        };
        self.values.insert(t.id(), v);
        Some(v)
    }

    fn fail(&mut self, e: Error) {
        if self.error.is_none() {
            self.error = Some(e);
        }
    }
}

/// Records `op` applied to `inputs` producing `outputs` (no-op when not
/// tracing). The graph's type inference must agree with what eager
/// produced; a disagreement fails the trace (it would be a kiln bug).
pub(crate) fn record(op: Op, inputs: &[&Tensor], outputs: &[&Tensor]) {
    with_state(|s| {
        if s.error.is_some() {
            return;
        }
        let mut vals = Vec::with_capacity(inputs.len());
        for t in inputs {
            match s.value_of(t) {
                Some(v) => vals.push(v),
                None => return,
            }
        }
        let name = op.name().to_string();
        let scope = s.scope();
        match s.graph.add_node(op, &vals, &scope) {
            Ok(outs) => {
                for (o, v) in outputs.iter().zip(outs) {
                    let want = s.graph.value_type(v).clone();
                    if want != ty(o) {
                        s.fail(Error::op(
                            "trace",
                            format!(
                                "{name} at {scope}: the graph infers {want} but eager produced {}",
                                ty(o)
                            ),
                        ));
                        return;
                    }
                    s.values.insert(o.id(), v);
                }
                s.last_op = name;
            }
            Err(e) => s.fail(Error::op("trace", format!("{e} (at {scope})"))),
        }
    });
}

/// `new` stands for the same value as `old` (detach, aliasing handles).
pub(crate) fn alias(new: &Tensor, old: &Tensor) {
    with_state(|s| {
        let id = old.id();
        // An intermediate no recorded op produced stays unknown (so a later
        // use is caught) instead of becoming a constant here.
        let unknown_intermediate = !s.values.contains_key(&id)
            && !s.bindings.contains_key(&id)
            && id >= s.start_id
            && !s.created.contains(&id);
        if unknown_intermediate {
            return;
        }
        if s.created.contains(&id) {
            s.created.insert(new.id());
        }
        if let Some(v) = s.value_of(old) {
            s.values.insert(new.id(), v);
        }
    });
}

/// After an in-place write, `target` now holds the value of `result`.
pub(crate) fn rebind(target: &Tensor, result: &Tensor) {
    with_state(|s| {
        if let Some(v) = s.value_of(result) {
            s.values.insert(target.id(), v);
        }
    });
}

/// An in-place write the tracer cannot express (through a partial view).
pub(crate) fn unsupported(what: &str) {
    with_state(|s| {
        let scope = s.scope();
        s.fail(Error::op(
            "trace",
            format!("{what} is not supported by the tracer (at {scope})"),
        ));
    });
}

/// Marks a tensor made by a factory (zeros, arange, randn...) as a
/// legitimate constant of the trace.
pub(crate) fn created(t: &Tensor, random: bool) {
    with_state(|s| {
        s.created.insert(t.id());
        if random {
            let scope = s.scope();
            s.warnings.push(format!(
                "TracerWarning: random values drawn in {scope} are frozen into the trace as a constant"
            ));
        }
    });
}

/// A host read of tensor data while tracing: the trace may not generalize.
pub(crate) fn host_read(what: &str) {
    with_state(|s| {
        let scope = s.scope();
        s.warnings.push(format!(
            "TracerWarning: reading tensor data on the host ({what}) in {scope} might cause the trace to be incorrect: the value is recorded as a constant and the branch taken is frozen, so the trace might not generalize to other inputs"
        ));
    });
}

/// Suspends recording until dropped (for an op's internal computations
/// that the op records as one node).
pub(crate) struct Suspend(bool);

pub(crate) fn suspend() -> Suspend {
    let active = TRACE.with(|t| {
        let mut b = t.borrow_mut();
        match b.as_mut() {
            Some(s) => {
                s.suspended += 1;
                true
            }
            None => false,
        }
    });
    Suspend(active)
}

impl Drop for Suspend {
    fn drop(&mut self) {
        if self.0 {
            TRACE.with(|t| {
                if let Some(s) = t.borrow_mut().as_mut() {
                    s.suspended -= 1;
                }
            });
        }
    }
}

/// A module scope pushed for the duration of a module call.
pub(crate) struct ScopeGuard(bool);

/// Pushes `Type[name]` (or `Type` for the root of the trace).
pub(crate) fn enter_module(type_name: &str, name: Option<&str>) -> ScopeGuard {
    let pushed = with_state(|s| {
        let seg = match name {
            Some(n) if !s.scopes.is_empty() => format!("{type_name}[{n}]"),
            _ => type_name.to_string(),
        };
        s.scopes.push(seg);
    })
    .is_some();
    ScopeGuard(pushed)
}

impl Drop for ScopeGuard {
    fn drop(&mut self) {
        if self.0 {
            with_state(|s| {
                s.scopes.pop();
            });
        }
    }
}

/// What a trace produced: the graph (outputs: the forward's result, then
/// one buffer update per buffer the forward changed), the eager outputs of
/// the traced run, and the warnings raised while tracing.
pub struct Trace {
    pub graph: Graph,
    pub outputs: Vec<Tensor>,
    pub warnings: Vec<String>,
}

/// Traces `forward(inputs)` once. `named` lists the parameters and buffers
/// to bind by name (`(name, tensor, is_buffer)`); `buffers_after` is called
/// after the forward to read the buffers' current tensors (a forward may
/// replace a buffer object). Runs the eager computation for real (its side
/// effects on buffers happen, as with `torch.jit.trace`).
pub fn trace_fn(
    inputs: &[Tensor],
    named: &[(String, Tensor, bool)],
    forward: impl FnOnce(&[Tensor]) -> Result<Vec<Tensor>>,
    buffers_after: impl FnOnce() -> Vec<(String, Tensor)>,
) -> Result<Trace> {
    if TRACE.with(|t| t.borrow().is_some()) {
        return Err(Error::op(
            "trace",
            "a trace is already being recorded on this thread",
        ));
    }
    let mut st = State {
        graph: Graph::new(),
        values: HashMap::new(),
        bindings: HashMap::new(),
        created: HashSet::new(),
        start_id: crate::tensor::peek_next_id(),
        constants: HashMap::new(),
        poison: HashMap::new(),
        scopes: Vec::new(),
        suspended: 0,
        warnings: Vec::new(),
        error: None,
        last_op: "(none)".into(),
    };
    // Inputs are distinct graph values even if the same tensor is passed twice.
    let mut user = Vec::new();
    for (i, t) in inputs.iter().enumerate() {
        let v = st
            .graph
            .add_input(InputKind::User(i), ty(t), "")
            .map_err(|e| Error::op("trace", e.to_string()))?;
        user.push(v);
        st.values.insert(t.id(), v);
    }
    for (name, t, is_buffer) in named {
        let kind = if *is_buffer {
            InputKind::Buffer(name.clone())
        } else {
            InputKind::Param(name.clone())
        };
        st.bindings.entry(t.id()).or_insert(kind);
    }
    TRACE.with(|t| *t.borrow_mut() = Some(st));
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            TRACE.with(|t| *t.borrow_mut() = None);
        }
    }
    let reset = Reset;
    let outputs = forward(inputs);
    let buffers = buffers_after();
    let mut st = TRACE.with(|t| t.borrow_mut().take()).expect("trace state");
    drop(reset);
    let outputs = outputs?;
    if let Some(e) = st.error.take() {
        return Err(e);
    }
    let mut graph_outputs = Vec::new();
    for o in &outputs {
        let v = st.value_of(o).ok_or_else(|| {
            st.error
                .take()
                .unwrap_or_else(|| Error::op("trace", "output has no value"))
        })?;
        graph_outputs.push(GraphOutput {
            value: v,
            kind: OutputKind::User,
        });
    }
    for (name, t) in buffers {
        // A buffer changed if its tensor object now stands for another value
        // than its own input (an in-place update or a reassignment).
        let Some(&v) = st.values.get(&t.id()) else {
            continue;
        };
        let is_own_input = matches!(
            &st.graph.node(v.node).op,
            Op::Input { kind: InputKind::Buffer(n), .. } if *n == name
        );
        if !is_own_input {
            graph_outputs.push(GraphOutput {
                value: v,
                kind: OutputKind::BufferUpdate(name),
            });
        }
    }
    st.graph
        .set_outputs(graph_outputs)
        .map_err(|e| Error::op("trace", e.to_string()))?;
    kiln_ir::passes::dce(&mut st.graph).map_err(|e| Error::op("trace", e.to_string()))?;
    for (node, why) in &st.poison {
        if st.graph.contains(*node) {
            return Err(Error::op("trace", format!("the traced forward used {why}")));
        }
    }
    for (node, t) in &st.constants {
        if st.graph.contains(*node) {
            let data = t.detach().to_vec::<f64>();
            if let Op::Constant { data: d, .. } = &mut st.graph.node_mut(*node).op {
                *d = data;
            }
        }
    }
    kiln_ir::verify(&st.graph).map_err(|e| Error::op("trace", e.to_string()))?;
    for w in &st.warnings {
        eprintln!("{w}");
    }
    Ok(Trace {
        graph: st.graph,
        outputs,
        warnings: st.warnings,
    })
}

/// `trace_module` for the compiled runtime, with hooks kept live: the
/// root's hooks are not traced (the runtime runs them around the compiled
/// forward) and every call of a submodule with hooks becomes a
/// `module_call` node (see `nn::call_with_forward`).
pub fn trace_module_live_hooks(module: &dyn crate::nn::Module, input: &Tensor) -> Result<Trace> {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            LIVE_HOOKS.with(|l| l.set(self.0));
        }
    }
    let _reset = Reset(LIVE_HOOKS.with(|l| l.replace(true)));
    trace_module(module, input)
}

/// Traces `module.call(input)`: its parameters and buffers are bound by
/// their `named_parameters` / `named_buffers` names.
pub fn trace_module(module: &dyn crate::nn::Module, input: &Tensor) -> Result<Trace> {
    use crate::nn::ModuleExt;
    let mut named: Vec<(String, Tensor, bool)> = module
        .named_parameters()
        .into_iter()
        .map(|(n, t)| (n, t, false))
        .collect();
    named.extend(
        module
            .named_buffers()
            .into_iter()
            .map(|(n, t)| (n, t, true)),
    );
    trace_fn(
        std::slice::from_ref(input),
        &named,
        |xs| Ok(vec![module.call(&xs[0])?]),
        || module.named_buffers(),
    )
}
