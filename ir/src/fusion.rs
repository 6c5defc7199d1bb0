//! The fusion planner: groups graph nodes into kernels. The plan is data
//! (`FusionPlan`), consumed by the backends; it does not change the graph.
//!
//! Rules (few and general), applied greedily in topological order:
//! 1. A pointwise node (unary, binary, where, cast, dropout, eval-mode
//!    batch_norm) joins the kernel of one of its operands (tried in operand
//!    order) when that kernel's current iteration shape equals the node's
//!    output shape: pointwise chains, and epilogues of reductions, matmul /
//!    addmm / conv and pooling (bias, activation, residual add, scale, BN
//!    affine). Other operands (broadcast or not) become kernel inputs.
//! 2. A reduction (sum, mean, var, softmax, log_softmax, layer_norm,
//!    training batch_norm, arg/max/min) joins the kernel of its first
//!    operand when that kernel is purely pointwise over the operand's shape
//!    (the pointwise prologue); otherwise it starts a kernel.
//! 3. A pooling op joins the kernel of its operand when it is a pointwise or
//!    contraction kernel without a pooling op yet, over the pooled input's
//!    shape (conv + bias + pool, as in seed_cnn); otherwise it starts one.
//! 4. Contractions, views and copies (cat, stack, index_select) start a
//!    kernel of their own. A view kernel may be an alias (no work).
//!
//! A join never creates a cycle between kernels: a node does not join
//! kernel K if another of its operands comes from a kernel that depends on
//! K. Graph inputs and constants belong to no kernel; they are kernel inputs.

use crate::graph::{Graph, NodeId, Value};
use crate::op::OpClass;
use crate::types::Result;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum KernelKind {
    Pointwise,
    Reduction,
    Contraction,
    Pool,
    View,
    Copy,
}

impl KernelKind {
    pub fn name(self) -> &'static str {
        match self {
            KernelKind::Pointwise => "pointwise",
            KernelKind::Reduction => "reduction",
            KernelKind::Contraction => "contraction",
            KernelKind::Pool => "pool",
            KernelKind::View => "view",
            KernelKind::Copy => "copy",
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Kernel {
    pub kind: KernelKind,
    /// Nodes of the kernel in topological order.
    pub nodes: Vec<NodeId>,
    /// Values read from outside the kernel (graph inputs, constants, other
    /// kernels' outputs), in order of first use.
    pub inputs: Vec<Value>,
    /// Values used outside the kernel or returned by the graph.
    pub outputs: Vec<Value>,
}

#[derive(Clone, Debug, PartialEq, Default)]
pub struct FusionPlan {
    /// Kernels in execution order.
    pub kernels: Vec<Kernel>,
}

impl FusionPlan {
    /// Index of the kernel holding node `n`.
    pub fn kernel_of(&self, n: NodeId) -> Option<usize> {
        self.kernels.iter().position(|k| k.nodes.contains(&n))
    }

    /// Kernels that do work (all but view kernels).
    pub fn compute_kernel_count(&self) -> usize {
        self.kernels
            .iter()
            .filter(|k| k.kind != KernelKind::View)
            .count()
    }

    /// Number of kernels of each kind, sorted by kind.
    pub fn kind_counts(&self) -> Vec<(KernelKind, usize)> {
        let mut m: HashMap<KernelKind, usize> = HashMap::new();
        for k in &self.kernels {
            *m.entry(k.kind).or_default() += 1;
        }
        let mut v: Vec<_> = m.into_iter().collect();
        v.sort();
        v
    }

    /// Op names of each kernel, e.g. `["conv2d", "max_pool2d", "relu"]`.
    pub fn kernel_ops(&self, g: &Graph) -> Vec<Vec<&'static str>> {
        self.kernels
            .iter()
            .map(|k| k.nodes.iter().map(|&n| g.node(n).op.name()).collect())
            .collect()
    }
}

struct Group {
    kind: KernelKind,
    nodes: Vec<NodeId>,
    /// Iteration shape of the kernel's tail: what an epilogue must match.
    shape: Vec<usize>,
    has_pool: bool,
    /// Groups this one reads from.
    deps: HashSet<usize>,
}

/// Does group `from` depend (transitively) on group `target`?
fn reaches(groups: &[Group], from: usize, target: usize) -> bool {
    let mut stack = vec![from];
    let mut seen = HashSet::new();
    while let Some(g) = stack.pop() {
        if g == target {
            return true;
        }
        if seen.insert(g) {
            stack.extend(groups[g].deps.iter().copied());
        }
    }
    false
}

pub fn plan_fusion(g: &Graph) -> Result<FusionPlan> {
    let order = g.topo_order()?;
    let pos: HashMap<NodeId, usize> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: HashMap<NodeId, usize> = HashMap::new();
    for &n in &order {
        let node = g.node(n);
        let class = node.op.class();
        if matches!(class, OpClass::Input | OpClass::Constant) {
            continue;
        }
        let operands = g.operands(n);
        let operand_groups: Vec<usize> = {
            let mut v = Vec::new();
            for o in &operands {
                if let Some(&k) = group_of.get(&o.node) {
                    if !v.contains(&k) {
                        v.push(k);
                    }
                }
            }
            v
        };
        let out_shape = node.outputs[0].shape.clone();
        let in0_shape = operands
            .first()
            .map(|v| g.value_type(*v).shape.clone())
            .unwrap_or_default();
        let first_group = operands
            .first()
            .and_then(|v| group_of.get(&v.node).copied());
        // Candidate groups this node may join.
        let candidates: Vec<usize> = match class {
            OpClass::Pointwise => operand_groups
                .iter()
                .copied()
                .filter(|&k| {
                    matches!(
                        groups[k].kind,
                        KernelKind::Pointwise
                            | KernelKind::Reduction
                            | KernelKind::Contraction
                            | KernelKind::Pool
                    ) && groups[k].shape == out_shape
                })
                .collect(),
            OpClass::Reduction => first_group
                .filter(|&k| {
                    groups[k].kind == KernelKind::Pointwise && groups[k].shape == in0_shape
                })
                .into_iter()
                .collect(),
            OpClass::Pool => first_group
                .filter(|&k| {
                    matches!(
                        groups[k].kind,
                        KernelKind::Pointwise | KernelKind::Contraction
                    ) && !groups[k].has_pool
                        && groups[k].shape == in0_shape
                })
                .into_iter()
                .collect(),
            _ => Vec::new(),
        };
        let chosen = candidates.into_iter().find(|&k| {
            operand_groups
                .iter()
                .all(|&h| h == k || !reaches(&groups, h, k))
        });
        match chosen {
            Some(k) => {
                let grp = &mut groups[k];
                grp.nodes.push(n);
                grp.deps
                    .extend(operand_groups.iter().copied().filter(|&h| h != k));
                match class {
                    OpClass::Reduction => {
                        grp.kind = KernelKind::Reduction;
                        grp.shape = out_shape;
                    }
                    OpClass::Pool => {
                        grp.has_pool = true;
                        if grp.kind == KernelKind::Pointwise {
                            grp.kind = KernelKind::Pool;
                        }
                        grp.shape = out_shape;
                    }
                    _ => {}
                }
                group_of.insert(n, k);
            }
            None => {
                let kind = match class {
                    OpClass::Pointwise => KernelKind::Pointwise,
                    OpClass::Reduction => KernelKind::Reduction,
                    OpClass::Contraction => KernelKind::Contraction,
                    OpClass::Pool => KernelKind::Pool,
                    OpClass::View => KernelKind::View,
                    _ => KernelKind::Copy,
                };
                groups.push(Group {
                    kind,
                    nodes: vec![n],
                    shape: out_shape,
                    has_pool: class == OpClass::Pool,
                    deps: operand_groups.into_iter().collect(),
                });
                group_of.insert(n, groups.len() - 1);
            }
        }
    }
    // Execution order: topological over kernel dependencies, earliest first
    // node first among ready kernels.
    let ng = groups.len();
    let mut indeg = vec![0usize; ng];
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); ng];
    for (k, grp) in groups.iter().enumerate() {
        for &d in &grp.deps {
            succ[d].push(k);
            indeg[k] += 1;
        }
    }
    let first = |k: usize| groups[k].nodes.iter().map(|n| pos[n]).min().unwrap_or(0);
    let mut ready: BinaryHeap<Reverse<(usize, usize)>> = (0..ng)
        .filter(|&k| indeg[k] == 0)
        .map(|k| Reverse((first(k), k)))
        .collect();
    let mut kernel_order = Vec::with_capacity(ng);
    while let Some(Reverse((_, k))) = ready.pop() {
        kernel_order.push(k);
        for &s in &succ[k] {
            indeg[s] -= 1;
            if indeg[s] == 0 {
                ready.push(Reverse((first(s), s)));
            }
        }
    }
    assert_eq!(
        kernel_order.len(),
        ng,
        "fusion planner built a cyclic kernel graph (a bug in the join check)"
    );
    let kernels = kernel_order
        .into_iter()
        .map(|k| {
            let grp = &groups[k];
            let mut nodes = grp.nodes.clone();
            nodes.sort_by_key(|n| pos[n]);
            let members: HashSet<NodeId> = nodes.iter().copied().collect();
            let mut inputs = Vec::new();
            let mut outputs = Vec::new();
            for &n in &nodes {
                for v in g.operands(n) {
                    if !members.contains(&v.node) && !inputs.contains(&v) {
                        inputs.push(v);
                    }
                }
                for o in 0..g.node(n).outputs.len() {
                    let v = Value::new(n, o);
                    let used_outside = g.users(v).iter().any(|(u, _)| !members.contains(u))
                        || g.is_graph_output(v);
                    if used_outside {
                        outputs.push(v);
                    }
                }
            }
            Kernel {
                kind: grp.kind,
                nodes,
                inputs,
                outputs,
            }
        })
        .collect();
    Ok(FusionPlan { kernels })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::passes::PassManager;
    use crate::test_graphs::*;

    fn compute_ops(g: &Graph, plan: &FusionPlan) -> Vec<Vec<&'static str>> {
        plan.kernels
            .iter()
            .filter(|k| k.kind != KernelKind::View)
            .map(|k| k.nodes.iter().map(|&n| g.node(n).op.name()).collect())
            .collect()
    }

    fn optimized(mut g: Graph) -> Graph {
        let mut pm = PassManager::standard();
        pm.verify_each(true);
        pm.run_to_fixpoint(&mut g, 5).unwrap();
        g
    }

    #[test]
    fn seed_cnn_eval_one_kernel_per_conv_block() {
        let g = optimized(seed_cnn(false));
        let plan = plan_fusion(&g).unwrap();
        assert_eq!(
            compute_ops(&g, &plan),
            vec![
                vec!["conv2d", "max_pool2d", "relu", "batch_norm"],
                vec!["conv2d", "relu", "batch_norm"],
                vec!["conv2d", "max_pool2d", "relu", "batch_norm"],
                vec!["conv2d", "relu", "batch_norm"],
            ]
        );
        assert_eq!(plan.kernels.len(), 4);
        // The first kernel reads x, conv weight and bias, and the BN
        // params/buffers; it writes only the block's output.
        let k0 = &plan.kernels[0];
        assert_eq!(k0.inputs.len(), 7);
        assert_eq!(k0.outputs.len(), 1);
        assert_eq!(k0.kind, KernelKind::Contraction);
    }

    #[test]
    fn complex_net_conv_bias_relu_kernels() {
        let g = optimized(complex_net());
        let plan = plan_fusion(&g).unwrap();
        assert_eq!(
            compute_ops(&g, &plan),
            vec![
                vec!["conv2d", "relu"],
                vec!["conv2d", "relu"],
                vec!["addmm"]
            ]
        );
        assert_eq!(plan.compute_kernel_count(), 3);
        assert_eq!(
            plan.kind_counts(),
            vec![(KernelKind::Contraction, 3), (KernelKind::View, 2)]
        );
    }

    #[test]
    fn simple_net_and_pointwise_chain() {
        let g = optimized(simple_net());
        let plan = plan_fusion(&g).unwrap();
        assert_eq!(
            compute_ops(&g, &plan),
            vec![vec!["addmm", "relu"], vec!["addmm"]]
        );
        let g = optimized(pointwise_chain());
        let plan = plan_fusion(&g).unwrap();
        assert_eq!(plan.kernels.len(), 1);
        assert_eq!(plan.kernels[0].kind, KernelKind::Pointwise);
        assert_eq!(plan.kernels[0].outputs.len(), 1);
        // x, scale, shift
        assert_eq!(plan.kernels[0].inputs.len(), 3);
    }

    #[test]
    fn transformer_block_groups_epilogues_and_residuals() {
        let g = optimized(transformer_block());
        let plan = plan_fusion(&g).unwrap();
        assert_eq!(
            compute_ops(&g, &plan),
            vec![
                vec!["layer_norm"],
                vec!["matmul", "add"],
                vec!["matmul", "mul_scalar"],
                vec!["softmax"],
                vec!["matmul"],
                vec!["matmul", "add", "add"],
                vec!["layer_norm"],
                vec!["matmul", "add", "gelu"],
                vec!["matmul", "add", "add"],
            ]
        );
        // The first residual sum feeds ln2 and the last add: a kernel output.
        let k5 = &plan
            .kernels
            .iter()
            .filter(|k| k.kind != KernelKind::View)
            .nth(5)
            .unwrap();
        assert_eq!(k5.outputs.len(), 1);
        assert_eq!(g.users(k5.outputs[0]).len(), 2);
    }

    #[test]
    fn reduction_takes_pointwise_prologue_and_epilogue() {
        let g = optimized(net_with_dropout(true));
        let plan = plan_fusion(&g).unwrap();
        assert_eq!(
            compute_ops(&g, &plan),
            vec![
                vec!["addmm"],
                vec!["batch_norm", "relu", "dropout"],
                // num_batches_tracked + 1
                vec!["add_scalar"],
                vec!["addmm"],
            ]
        );
        let g = optimized(mean_sub_prologue());
        let plan = plan_fusion(&g).unwrap();
        assert_eq!(
            compute_ops(&g, &plan),
            vec![vec!["mul", "add", "mean", "sqrt"], vec!["sub"]]
        );
    }

    #[test]
    fn every_node_in_exactly_one_kernel_in_dependency_order() {
        for (name, g) in all_test_graphs() {
            let g = optimized(g);
            let plan = plan_fusion(&g).unwrap();
            let mut seen = HashSet::new();
            for k in &plan.kernels {
                for &n in &k.nodes {
                    assert!(seen.insert(n), "{name}: node in two kernels");
                }
                // Every kernel input is produced before the kernel runs.
                for v in &k.inputs {
                    let src = g.node(v.node).op.class();
                    if !matches!(src, OpClass::Input | OpClass::Constant) {
                        assert!(seen.contains(&v.node), "{name}: input produced later");
                    }
                }
            }
            let computed = g
                .node_ids()
                .into_iter()
                .filter(|&n| !matches!(g.node(n).op.class(), OpClass::Input | OpClass::Constant))
                .count();
            assert_eq!(seen.len(), computed, "{name}");
        }
    }
}
