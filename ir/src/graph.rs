//! The graph: a petgraph `StableGraph` whose nodes carry an op, their output
//! types and the module scope they were recorded in, plus ordered graph
//! inputs (user inputs, parameters and buffers bound by name) and ordered
//! outputs (incl. buffer updates). Builder API for the tracer, the editing
//! primitives passes use, and the verifier.

use crate::op::{infer, InputKind, Op};
use crate::types::{IrError, Result, TensorType};
use petgraph::stable_graph::{EdgeIndex, NodeIndex, StableGraph};
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

pub use petgraph::stable_graph::NodeIndex as NodeId;

/// One output of one node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Value {
    pub node: NodeIndex,
    pub output: usize,
}

impl Value {
    pub fn new(node: NodeIndex, output: usize) -> Value {
        Value { node, output }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Node {
    pub op: Op,
    /// One type per output (most ops have one).
    pub outputs: Vec<TensorType>,
    /// Module path it was recorded in, e.g. `SimpleNet/Linear[layer1]`.
    pub scope: String,
}

/// An edge carries output `output` of its source node into operand slot
/// `operand` of its target node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge {
    pub output: usize,
    pub operand: usize,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum OutputKind {
    /// A value returned by the traced call, in order.
    User,
    /// The new value of the named buffer (training-mode running stats...),
    /// written back by the runtime after a run.
    BufferUpdate(String),
}

#[derive(Clone, Debug, PartialEq)]
pub struct GraphOutput {
    pub value: Value,
    pub kind: OutputKind,
}

#[derive(Clone, Debug, Default)]
pub struct Graph {
    graph: StableGraph<Node, Edge>,
    inputs: Vec<NodeIndex>,
    outputs: Vec<GraphOutput>,
}

impl Graph {
    pub fn new() -> Graph {
        Graph::default()
    }

    // ----- builder (used by the tracer) -----

    /// Add a graph input. User inputs must be added with indices 0, 1, ...;
    /// parameter and buffer names must be unique.
    pub fn add_input(&mut self, kind: InputKind, ty: TensorType, scope: &str) -> Result<Value> {
        for &i in &self.inputs {
            if let Op::Input { kind: k, .. } = &self.graph[i].op {
                if *k == kind {
                    return Err(IrError::Builder(format!("duplicate graph input {kind:?}")));
                }
            }
        }
        let op = Op::Input {
            kind,
            ty: ty.clone(),
        };
        let n = self.graph.add_node(Node {
            op,
            outputs: vec![ty],
            scope: scope.to_string(),
        });
        self.inputs.push(n);
        Ok(Value::new(n, 0))
    }

    /// Add a literal constant (row-major values as f64).
    pub fn add_constant(&mut self, ty: TensorType, data: Vec<f64>, scope: &str) -> Result<Value> {
        Ok(self.add_node(Op::Constant { ty, data }, &[], scope)?[0])
    }

    /// Add a node, running type inference on the operand types. Returns one
    /// value per output.
    pub fn add_node(&mut self, op: Op, operands: &[Value], scope: &str) -> Result<Vec<Value>> {
        if matches!(op, Op::Input { .. }) {
            return Err(IrError::Builder(
                "graph inputs are added with add_input".into(),
            ));
        }
        let types = operands
            .iter()
            .map(|v| self.try_value_type(*v).cloned())
            .collect::<Result<Vec<_>>>()?;
        let outputs = infer(&op, &types)?;
        let k = outputs.len();
        let n = self.graph.add_node(Node {
            op,
            outputs,
            scope: scope.to_string(),
        });
        for (i, v) in operands.iter().enumerate() {
            self.graph.add_edge(
                v.node,
                n,
                Edge {
                    output: v.output,
                    operand: i,
                },
            );
        }
        Ok((0..k).map(|o| Value::new(n, o)).collect())
    }

    /// `add_node` for a single-output op.
    pub fn add1(&mut self, op: Op, operands: &[Value], scope: &str) -> Result<Value> {
        let name = op.name();
        let vs = self.add_node(op, operands, scope)?;
        if vs.len() != 1 {
            self.remove_node(vs[0].node);
            return Err(IrError::Builder(format!(
                "{name} has {} outputs, add1 expects one",
                vs.len()
            )));
        }
        Ok(vs[0])
    }

    /// Replace the graph outputs. A buffer update must name a buffer input
    /// of the same type.
    pub fn set_outputs(&mut self, outputs: Vec<GraphOutput>) -> Result<()> {
        for o in &outputs {
            self.check_output(o)?;
        }
        self.outputs = outputs;
        Ok(())
    }

    pub fn add_output(&mut self, value: Value, kind: OutputKind) -> Result<()> {
        let o = GraphOutput { value, kind };
        self.check_output(&o)?;
        self.outputs.push(o);
        Ok(())
    }

    fn check_output(&self, o: &GraphOutput) -> Result<()> {
        let t = self.try_value_type(o.value)?;
        if let OutputKind::BufferUpdate(name) = &o.kind {
            let buf = self
                .find_input(&InputKind::Buffer(name.clone()))
                .ok_or_else(|| {
                    IrError::Builder(format!("buffer update for unknown buffer {name:?}"))
                })?;
            let bt = &self.graph[buf].outputs[0];
            if bt != t {
                return Err(IrError::Builder(format!(
                    "buffer update for {name:?} has type {t}, the buffer is {bt}"
                )));
            }
        }
        Ok(())
    }

    // ----- queries -----

    pub fn inputs(&self) -> &[NodeIndex] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[GraphOutput] {
        &self.outputs
    }

    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.graph[n]
    }

    pub fn try_node(&self, n: NodeIndex) -> Option<&Node> {
        self.graph.node_weight(n)
    }

    pub fn contains(&self, n: NodeIndex) -> bool {
        self.graph.contains_node(n)
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    /// Node ids in index (insertion) order.
    pub fn node_ids(&self) -> Vec<NodeIndex> {
        self.graph.node_indices().collect()
    }

    /// The underlying petgraph graph (read-only).
    pub fn petgraph(&self) -> &StableGraph<Node, Edge> {
        &self.graph
    }

    pub fn value_type(&self, v: Value) -> &TensorType {
        &self.graph[v.node].outputs[v.output]
    }

    pub fn try_value_type(&self, v: Value) -> Result<&TensorType> {
        self.graph
            .node_weight(v.node)
            .and_then(|n| n.outputs.get(v.output))
            .ok_or_else(|| {
                IrError::Builder(format!(
                    "value %{}.{} does not exist",
                    v.node.index(),
                    v.output
                ))
            })
    }

    /// The operands of a node, in operand order.
    pub fn operands(&self, n: NodeIndex) -> Vec<Value> {
        let mut es: Vec<(usize, Value)> = self
            .graph
            .edges_directed(n, Direction::Incoming)
            .map(|e| {
                (
                    e.weight().operand,
                    Value::new(e.source(), e.weight().output),
                )
            })
            .collect();
        es.sort_by_key(|(i, _)| *i);
        es.into_iter().map(|(_, v)| v).collect()
    }

    pub fn operand_types(&self, n: NodeIndex) -> Vec<TensorType> {
        self.operands(n)
            .into_iter()
            .map(|v| self.value_type(v).clone())
            .collect()
    }

    /// (user node, operand slot) for every use of `v` by a node.
    pub fn users(&self, v: Value) -> Vec<(NodeIndex, usize)> {
        let mut u: Vec<(NodeIndex, usize)> = self
            .graph
            .edges_directed(v.node, Direction::Outgoing)
            .filter(|e| e.weight().output == v.output)
            .map(|e| (e.target(), e.weight().operand))
            .collect();
        u.sort();
        u
    }

    /// Distinct nodes using any output of `n`.
    pub fn user_nodes(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut u: Vec<NodeIndex> = self
            .graph
            .neighbors_directed(n, Direction::Outgoing)
            .collect();
        u.sort();
        u.dedup();
        u
    }

    pub fn is_graph_output(&self, v: Value) -> bool {
        self.outputs.iter().any(|o| o.value == v)
    }

    /// Number of uses of `v` by nodes and graph outputs.
    pub fn use_count(&self, v: Value) -> usize {
        self.users(v).len() + self.outputs.iter().filter(|o| o.value == v).count()
    }

    pub fn find_input(&self, kind: &InputKind) -> Option<NodeIndex> {
        self.inputs
            .iter()
            .copied()
            .find(|&i| matches!(&self.graph[i].op, Op::Input { kind: k, .. } if k == kind))
    }

    /// Nodes in a deterministic topological order (Kahn's algorithm, lowest
    /// node index first among ready nodes). Errors on a cycle.
    pub fn topo_order(&self) -> Result<Vec<NodeIndex>> {
        let mut indeg: HashMap<NodeIndex, usize> = HashMap::new();
        for n in self.graph.node_indices() {
            indeg.insert(n, self.graph.edges_directed(n, Direction::Incoming).count());
        }
        let mut ready: BinaryHeap<Reverse<NodeIndex>> = indeg
            .iter()
            .filter(|(_, &d)| d == 0)
            .map(|(&n, _)| Reverse(n))
            .collect();
        let mut order = Vec::with_capacity(indeg.len());
        while let Some(Reverse(n)) = ready.pop() {
            order.push(n);
            for e in self.graph.edges_directed(n, Direction::Outgoing) {
                let d = indeg.get_mut(&e.target()).expect("edge target exists");
                *d -= 1;
                if *d == 0 {
                    ready.push(Reverse(e.target()));
                }
            }
        }
        if order.len() != indeg.len() {
            let mut stuck: Vec<usize> = indeg
                .iter()
                .filter(|(_, &d)| d > 0)
                .map(|(n, _)| n.index())
                .collect();
            stuck.sort();
            return Err(IrError::Verify(format!(
                "the graph has a cycle through nodes {stuck:?}"
            )));
        }
        Ok(order)
    }

    // ----- editing primitives (used by passes and the file loader) -----

    /// Insert a node as is, without inference or operands (connect them
    /// with `connect`). The verifier checks the result.
    pub fn insert_raw(&mut self, node: Node) -> NodeIndex {
        let is_input = matches!(node.op, Op::Input { .. });
        let n = self.graph.add_node(node);
        if is_input {
            self.inputs.push(n);
        }
        n
    }

    /// Feed `v` into operand slot `operand` of `dst`.
    pub fn connect(&mut self, v: Value, dst: NodeIndex, operand: usize) -> EdgeIndex {
        self.graph.add_edge(
            v.node,
            dst,
            Edge {
                output: v.output,
                operand,
            },
        )
    }

    /// Set the graph outputs without checks (the file loader; the verifier
    /// checks them).
    pub fn set_outputs_unchecked(&mut self, outputs: Vec<GraphOutput>) {
        self.outputs = outputs;
    }

    /// Reorder the graph inputs (the file loader).
    pub fn set_input_order(&mut self, inputs: Vec<NodeIndex>) {
        self.inputs = inputs;
    }

    /// Make every use of `old` (by nodes and graph outputs) use `new`,
    /// except a use by `new`'s own node (so `x` can be replaced by `f(x)`).
    pub fn replace_all_uses(&mut self, old: Value, new: Value) {
        if old == new {
            return;
        }
        let edges: Vec<(EdgeIndex, NodeIndex, usize)> = self
            .graph
            .edges_directed(old.node, Direction::Outgoing)
            .filter(|e| e.weight().output == old.output && e.target() != new.node)
            .map(|e| (e.id(), e.target(), e.weight().operand))
            .collect();
        for (e, target, operand) in edges {
            self.graph.remove_edge(e);
            self.connect(new, target, operand);
        }
        for o in &mut self.outputs {
            if o.value == old {
                o.value = new;
            }
        }
    }

    /// Remove a node and its edges (users are left with a missing operand:
    /// remove or rewire them first).
    pub fn remove_node(&mut self, n: NodeIndex) -> Option<Node> {
        self.inputs.retain(|&i| i != n);
        self.graph.remove_node(n)
    }

    pub fn node_mut(&mut self, n: NodeIndex) -> &mut Node {
        &mut self.graph[n]
    }

    /// Counts of each op name, sorted by name.
    pub fn op_counts(&self) -> Vec<(&'static str, usize)> {
        let mut m: HashMap<&'static str, usize> = HashMap::new();
        for n in self.graph.node_weights() {
            *m.entry(n.op.name()).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort();
        v
    }
}

/// Check a graph: acyclic; operands numbered 0..n without gaps; every edge
/// from an existing output; every node's output types equal to inference on
/// its operand types; the inputs list holds exactly the input nodes, user
/// indices 0..k and unique names; every graph output names an existing
/// value, and buffer updates match their buffer.
pub fn verify(g: &Graph) -> Result<()> {
    let order = g.topo_order()?;
    let verr = |msg: String| Err(IrError::Verify(msg));
    for &n in &order {
        let node = g.node(n);
        let mut slots: Vec<usize> = g
            .graph
            .edges_directed(n, Direction::Incoming)
            .map(|e| e.weight().operand)
            .collect();
        slots.sort();
        if slots.iter().enumerate().any(|(i, &s)| i != s) {
            return verr(format!(
                "node %{} ({}) has operand slots {slots:?}, expected 0..{}",
                n.index(),
                node.op.name(),
                slots.len()
            ));
        }
        for e in g.graph.edges_directed(n, Direction::Incoming) {
            let src = g.node(e.source());
            if e.weight().output >= src.outputs.len() {
                return verr(format!(
                    "node %{} ({}) reads output {} of %{} ({}), which has {} outputs",
                    n.index(),
                    node.op.name(),
                    e.weight().output,
                    e.source().index(),
                    src.op.name(),
                    src.outputs.len()
                ));
            }
        }
        let types = g.operand_types(n);
        let inferred = infer(&node.op, &types)
            .map_err(|e| IrError::Verify(format!("node %{} is ill-typed: {e}", n.index())))?;
        if inferred != node.outputs {
            return verr(format!(
                "node %{} ({}) is ill-typed: it records output types [{}] but its operands give [{}]",
                n.index(),
                node.op.name(),
                crate::types::types_list(&node.outputs),
                crate::types::types_list(&inferred)
            ));
        }
    }
    // Inputs.
    let listed: HashSet<NodeIndex> = g.inputs.iter().copied().collect();
    if listed.len() != g.inputs.len() {
        return verr("an input node is listed twice".into());
    }
    let mut users_seen = Vec::new();
    let mut names = HashSet::new();
    for &i in &g.inputs {
        match g.try_node(i).map(|n| &n.op) {
            Some(Op::Input { kind, .. }) => match kind {
                InputKind::User(k) => users_seen.push(*k),
                InputKind::Param(s) | InputKind::Buffer(s) => {
                    if !names.insert(s.clone()) {
                        return verr(format!("two graph inputs are bound to the name {s:?}"));
                    }
                }
            },
            Some(op) => {
                return verr(format!(
                    "graph input %{} is a {} node, not an input",
                    i.index(),
                    op.name()
                ))
            }
            None => return verr(format!("graph input %{} does not exist", i.index())),
        }
    }
    users_seen.sort();
    if users_seen.iter().enumerate().any(|(i, &k)| i != k) {
        return verr(format!(
            "user inputs must be numbered 0..n without gaps, got {users_seen:?}"
        ));
    }
    for n in g.graph.node_indices() {
        if matches!(g.node(n).op, Op::Input { .. }) && !listed.contains(&n) {
            return verr(format!(
                "input node %{} is missing from the graph's input list",
                n.index()
            ));
        }
    }
    // Outputs.
    if g.outputs.is_empty() {
        return verr("the graph has no outputs".into());
    }
    for (k, o) in g.outputs.iter().enumerate() {
        if g.try_value_type(o.value).is_err() {
            return verr(format!(
                "graph output {k} refers to %{}.{}, which is not in the graph (unreachable)",
                o.value.node.index(),
                o.value.output
            ));
        }
        g.check_output(o)
            .map_err(|e| IrError::Verify(format!("graph output {k}: {e}")))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_graphs::*;
    use crate::{DType, UnaryOp};

    #[test]
    fn builder_infers_and_rejects() {
        let mut g = Graph::new();
        let x = g
            .add_input(InputKind::User(0), TensorType::new(&[2, 3], DType::F32), "")
            .unwrap();
        let vs = g
            .add_node(
                Op::MaxDim {
                    dim: 1,
                    keepdim: false,
                },
                &[x],
                "M",
            )
            .unwrap();
        assert_eq!(vs.len(), 2);
        assert_eq!(g.value_type(vs[1]), &TensorType::new(&[2], DType::I64));
        assert!(g
            .add1(
                Op::MaxDim {
                    dim: 1,
                    keepdim: false
                },
                &[x],
                ""
            )
            .is_err());
        let e = g
            .add1(Op::Reshape { shape: vec![7] }, &[x], "")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "reshape(f32[2,3]): shape [7] is invalid for input of size 6"
        );
        assert!(g
            .add_input(InputKind::User(0), TensorType::new(&[1], DType::F32), "")
            .is_err());
        let e = g
            .add_output(vs[0], OutputKind::BufferUpdate("nope".into()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph builder: buffer update for unknown buffer \"nope\""
        );
        assert_eq!(g.users(x), vec![(vs[0].node, 0)]);
    }

    #[test]
    fn verifier_accepts_test_graphs() {
        for (name, g) in all_test_graphs() {
            verify(&g).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    #[test]
    fn verifier_catches_cycles() {
        let mut g = simple_net();
        let relu = g
            .node_ids()
            .into_iter()
            .find(|&n| g.node(n).op.name() == "relu")
            .unwrap();
        let addmm1 = g.operands(relu)[0].node;
        // addmm1's mat1 operand now reads relu's output: a cycle.
        let e = g
            .petgraph()
            .edges_directed(addmm1, Direction::Incoming)
            .find(|e| e.weight().operand == 1)
            .unwrap()
            .id();
        g.graph.remove_edge(e);
        g.connect(Value::new(relu, 0), addmm1, 1);
        let err = verify(&g).unwrap_err().to_string();
        assert!(
            err.starts_with("graph verification failed: the graph has a cycle through nodes"),
            "{err}"
        );
    }

    #[test]
    fn verifier_catches_ill_typed_nodes() {
        let mut g = simple_net();
        let relu = g
            .node_ids()
            .into_iter()
            .find(|&n| g.node(n).op.name() == "relu")
            .unwrap();
        g.node_mut(relu).op = Op::Unary(UnaryOp::Exp);
        verify(&g).unwrap();
        g.node_mut(relu).outputs[0].dtype = DType::F64;
        let err = verify(&g).unwrap_err().to_string();
        assert!(err.contains("(exp) is ill-typed: it records output types [f64[64,256]] but its operands give [f32[64,256]]"), "{err}");
        // An op applied to operands it rejects.
        let mut g = simple_net();
        let relu = g
            .node_ids()
            .into_iter()
            .find(|&n| g.node(n).op.name() == "relu")
            .unwrap();
        g.node_mut(relu).op = Op::Reshape { shape: vec![3] };
        let err = verify(&g).unwrap_err().to_string();
        assert!(
            err.contains("is ill-typed: reshape(f32[64,256]): shape [3] is invalid"),
            "{err}"
        );
        // A missing operand slot.
        let mut g = simple_net();
        let addmm = g.outputs()[0].value.node;
        let e = g
            .petgraph()
            .edges_directed(addmm, Direction::Incoming)
            .find(|e| e.weight().operand == 1)
            .unwrap()
            .id();
        g.graph.remove_edge(e);
        let err = verify(&g).unwrap_err().to_string();
        assert!(
            err.contains("has operand slots [0, 2], expected 0..2"),
            "{err}"
        );
    }

    #[test]
    fn verifier_catches_unreachable_outputs_and_bad_inputs() {
        let mut g = simple_net();
        let out = g.outputs()[0].value.node;
        g.remove_node(out);
        let err = verify(&g).unwrap_err().to_string();
        assert!(
            err.contains("graph output 0 refers to") && err.contains("unreachable"),
            "{err}"
        );
        let mut g = simple_net();
        g.set_outputs_unchecked(vec![]);
        assert!(verify(&g).unwrap_err().to_string().contains("no outputs"));
        // A user input numbered 1 without a 0.
        let mut g = Graph::new();
        let x = g
            .add_input(InputKind::User(1), TensorType::new(&[1], DType::F32), "")
            .unwrap();
        g.add_output(x, OutputKind::User).unwrap();
        assert!(verify(&g)
            .unwrap_err()
            .to_string()
            .contains("user inputs must be numbered 0..n"));
        // An input node missing from the input list.
        let mut g = simple_net();
        let first = g.inputs()[0];
        g.set_input_order(g.inputs()[1..].to_vec());
        let err = verify(&g).unwrap_err().to_string();
        assert!(
            err.contains(&format!("input node %{} is missing", first.index())),
            "{err}"
        );
    }

    #[test]
    fn topo_order_is_deterministic_and_replace_all_uses_rewires() {
        let g = seed_cnn(false);
        assert_eq!(g.topo_order().unwrap(), g.topo_order().unwrap());
        let mut g = simple_net();
        let out = g.outputs()[0].value;
        let relu = g.operands(out.node)[1];
        // Replace relu's output by relu(relu): its users move, the new
        // node keeps reading the old value.
        let r2 = g.add1(Op::Unary(UnaryOp::Relu), &[relu], "").unwrap();
        g.replace_all_uses(relu, r2);
        verify(&g).unwrap();
        assert_eq!(g.operands(out.node)[1], r2);
        assert_eq!(g.operands(r2.node), vec![relu]);
        assert_eq!(g.users(relu), vec![(r2.node, 0)]);
    }
}
