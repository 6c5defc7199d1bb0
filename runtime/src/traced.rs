//! `TracedModule`: a graph plus where its parameters and buffers come from.
//! Bound to a live module, every call binds the graph's parameter and
//! buffer inputs BY NAME from the module (`get_parameter`/`get_buffer`), so
//! an optimizer step or `load_state_dict` is seen without retracing, and
//! buffer updates (training-mode running stats) are written back into the
//! module's buffers. Loaded from a file, it binds its own stored weights.

use crate::error::{Error, Result};
use crate::interpreter::{run_graph, tensor_type, user_input_count};
use kiln_frontend::nn::{Module, ModuleExt};
use kiln_frontend::{no_grad, Tensor};
use kiln_ir::fusion::{plan_fusion, FusionPlan};
use kiln_ir::passes::{PassManager, PassStat};
use kiln_ir::{printer, verify, Graph, InputKind, Op, OutputKind, TensorType};
use std::collections::HashMap;
use std::sync::Arc;

/// Parameter and buffer inputs of a graph with their types, in the graph's
/// input order.
pub fn state_inputs(graph: &Graph) -> Vec<(InputKind, TensorType)> {
    graph
        .inputs()
        .iter()
        .filter_map(|&n| match &graph.node(n).op {
            Op::Input { kind, ty } if !matches!(kind, InputKind::User(_)) => {
                Some((kind.clone(), ty.clone()))
            }
            _ => None,
        })
        .collect()
}

pub struct TracedModule {
    graph: Graph,
    module: Option<Arc<dyn Module>>,
    weights: HashMap<String, Tensor>,
}

impl std::fmt::Debug for TracedModule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TracedModule")
            .field("nodes", &self.graph.node_count())
            .field("bound_to_module", &self.module.is_some())
            .field("weights", &self.weights.len())
            .finish()
    }
}

fn kind_name(kind: &InputKind) -> &'static str {
    match kind {
        InputKind::User(_) => "input",
        InputKind::Param(_) => "parameter",
        InputKind::Buffer(_) => "buffer",
    }
}

impl TracedModule {
    /// A traced module bound to a live module. The graph is verified and
    /// every parameter and buffer input must exist in the module with the
    /// graph's type.
    pub fn new(graph: Graph, module: Arc<dyn Module>) -> Result<TracedModule> {
        verify(&graph)?;
        let tm = TracedModule {
            graph,
            module: Some(module),
            weights: HashMap::new(),
        };
        for (kind, ty) in tm.state_inputs() {
            tm.bind_checked(&kind, &ty)?;
        }
        Ok(tm)
    }

    /// A traced module that binds parameters and buffers from `weights`
    /// (by name). Every state input of the graph needs a weight of its
    /// type; a weight the graph does not use is an error too.
    pub fn from_weights(graph: Graph, weights: HashMap<String, Tensor>) -> Result<TracedModule> {
        verify(&graph)?;
        let tm = TracedModule {
            graph,
            module: None,
            weights,
        };
        let wanted = tm.state_inputs();
        for (kind, ty) in &wanted {
            tm.bind_checked(kind, ty)?;
        }
        let mut extra: Vec<&String> = tm
            .weights
            .keys()
            .filter(|k| {
                !wanted
                    .iter()
                    .any(|(kind, _)| matches!(kind, InputKind::Param(n) | InputKind::Buffer(n) if n == *k))
            })
            .collect();
        extra.sort();
        if !extra.is_empty() {
            return Err(Error::Binding(format!(
                "weights not used by the graph: {extra:?}"
            )));
        }
        Ok(tm)
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The graph, for passes (the compiled backends' pipeline).
    pub(crate) fn graph_mut(&mut self) -> &mut Graph {
        &mut self.graph
    }

    /// The live module this traced module binds from, if any.
    pub fn module(&self) -> Option<&Arc<dyn Module>> {
        self.module.as_ref()
    }

    /// The stored weights (empty when bound to a module).
    pub fn weights(&self) -> &HashMap<String, Tensor> {
        &self.weights
    }

    /// The types of the user inputs, in order.
    pub fn input_types(&self) -> Vec<TensorType> {
        let mut v: Vec<(usize, TensorType)> = self
            .graph
            .inputs()
            .iter()
            .filter_map(|&n| match &self.graph.node(n).op {
                Op::Input {
                    kind: InputKind::User(i),
                    ty,
                } => Some((*i, ty.clone())),
                _ => None,
            })
            .collect();
        v.sort_by_key(|(i, _)| *i);
        v.into_iter().map(|(_, t)| t).collect()
    }

    /// Parameter and buffer inputs of the graph with their types, in the
    /// graph's input order.
    pub fn state_inputs(&self) -> Vec<(InputKind, TensorType)> {
        state_inputs(&self.graph)
    }

    /// The tensor a parameter or buffer input is bound to right now.
    pub fn bind(&self, kind: &InputKind) -> Result<Tensor> {
        let name = match kind {
            InputKind::Param(n) | InputKind::Buffer(n) => n,
            InputKind::User(i) => {
                return Err(Error::Binding(format!(
                    "user input {i} is not bound by name"
                )))
            }
        };
        match &self.module {
            Some(m) => {
                let r = match kind {
                    InputKind::Param(_) => m.get_parameter(name),
                    _ => m.get_buffer(name),
                };
                r.map_err(|e| {
                    Error::Binding(format!(
                        "cannot bind {} `{name}` from the module: {e}",
                        kind_name(kind)
                    ))
                })
            }
            None => self.weights.get(name).cloned().ok_or_else(|| {
                Error::Binding(format!("no weight for {} `{name}`", kind_name(kind)))
            }),
        }
    }

    fn bind_checked(&self, kind: &InputKind, ty: &TensorType) -> Result<Tensor> {
        let t = self.bind(kind)?;
        let got = tensor_type(&t);
        if &got != ty {
            let name = match kind {
                InputKind::Param(n) | InputKind::Buffer(n) => n.as_str(),
                _ => "",
            };
            return Err(Error::Binding(format!(
                "{} `{name}` is {got}, the graph expects {ty}",
                kind_name(kind)
            )));
        }
        Ok(t)
    }

    /// Check user inputs against the graph's input types.
    fn check_inputs(&self, inputs: &[Tensor]) -> Result<()> {
        let want = self.input_types();
        debug_assert_eq!(want.len(), user_input_count(&self.graph));
        if inputs.len() != want.len() {
            return Err(Error::Input(format!(
                "TracedModule.forward: expected {} input(s), got {}",
                want.len(),
                inputs.len()
            )));
        }
        for (i, (t, w)) in inputs.iter().zip(&want).enumerate() {
            let got = tensor_type(t);
            if &got != w {
                return Err(Error::Input(format!(
                    "TracedModule.forward: input {i} is {got}, the graph was traced for {w}"
                )));
            }
        }
        Ok(())
    }

    /// Run the graph: bind parameters and buffers (live), run the
    /// interpreter, write buffer updates back, return the user outputs.
    pub fn forward(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        self.check_inputs(inputs)?;
        let outs = run_graph(&self.graph, inputs, &|k| self.bind(k))?;
        let mut user = Vec::new();
        let mut updates = Vec::new();
        for (o, t) in self.graph.outputs().iter().zip(outs) {
            match &o.kind {
                OutputKind::User => user.push(t),
                OutputKind::BufferUpdate(name) => updates.push((name.clone(), t)),
            }
        }
        self.write_back(updates)?;
        Ok(user)
    }

    /// `forward` for a graph with one input and one user output.
    pub fn call(&self, x: &Tensor) -> Result<Tensor> {
        let mut outs = self.forward(std::slice::from_ref(x))?;
        if outs.len() != 1 {
            return Err(Error::Input(format!(
                "TracedModule.call: the graph has {} user outputs, use forward",
                outs.len()
            )));
        }
        Ok(outs.pop().expect("one output"))
    }

    /// Copy new buffer values into the live buffers (under no_grad). All
    /// targets are checked first, and values aliasing a target buffer are
    /// materialized, so a failure writes nothing and order does not matter.
    pub(crate) fn write_back(&self, updates: Vec<(String, Tensor)>) -> Result<()> {
        let mut plan = Vec::with_capacity(updates.len());
        for (name, v) in &updates {
            let dst = self.bind(&InputKind::Buffer(name.clone()))?;
            if dst.shape() != v.shape() || dst.dtype() != v.dtype() {
                return Err(Error::Binding(format!(
                    "buffer update for `{name}`: the buffer is {}, the new value is {}",
                    tensor_type(&dst),
                    tensor_type(v)
                )));
            }
            plan.push((dst, v.clone()));
        }
        for i in 0..plan.len() {
            if plan.iter().any(|(d, _)| d.shares_storage(&plan[i].1)) {
                plan[i].1 = plan[i].1.clone_tensor()?.detach();
            }
        }
        no_grad(|| -> Result<()> {
            for (dst, v) in &plan {
                dst.copy_(v)?;
            }
            Ok(())
        })
    }

    /// Run the standard pass pipeline on the graph.
    pub fn run_passes(&mut self) -> Result<Vec<PassStat>> {
        Ok(PassManager::standard().run(&mut self.graph)?)
    }

    pub fn fusion_plan(&self) -> Result<FusionPlan> {
        Ok(plan_fusion(&self.graph)?)
    }

    /// One line per node (value, op, attributes, type, scope).
    pub fn listing(&self) -> String {
        printer::listing(&self.graph)
    }

    /// Op counts, parameters and the kernels after fusion.
    pub fn summary(&self) -> Result<String> {
        let plan = self.fusion_plan()?;
        Ok(printer::summary(&self.graph, Some(&plan)))
    }

    /// Graphviz DOT with module scopes as clusters and fused kernels colored.
    pub fn to_dot(&self) -> Result<String> {
        let plan = self.fusion_plan()?;
        Ok(printer::to_dot(&self.graph, Some(&plan)))
    }
}
