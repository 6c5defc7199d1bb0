//! Looking at graphs: a stable text listing (one line per node, in the
//! graph's deterministic topological order, values renumbered %0, %1, ...),
//! a summary (op counts, parameters, kernels after fusion) and Graphviz DOT
//! with module scopes as nested clusters and fused kernels colored.
//!
//! Listing line format:
//! `%3 = conv2d(%0, %1, %2) stride=[1,1] padding=[1,1] dilation=[1,1] groups=1 : f32[8,32,26,26]  # SeedCNN/Sequential[net]/Conv2d[0]`
//! A node with several outputs prints `: (t0, t1)` and its values are
//! referred to as `%5.0`, `%5.1`.

use crate::fusion::FusionPlan;
use crate::graph::{Graph, NodeId, OutputKind, Value};
use crate::op::{InputKind, Op};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;

/// Listing numbers: node -> position in topological order.
fn numbering(g: &Graph) -> (Vec<NodeId>, HashMap<NodeId, usize>) {
    // A cyclic graph still prints (in index order) so it can be inspected.
    let order = g.topo_order().unwrap_or_else(|_| g.node_ids());
    let num = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    (order, num)
}

fn value_name(g: &Graph, num: &HashMap<NodeId, usize>, v: Value) -> String {
    match num.get(&v.node) {
        Some(i) if g.node(v.node).outputs.len() == 1 => format!("%{i}"),
        Some(i) => format!("%{i}.{}", v.output),
        None => format!("%<missing {}>", v.node.index()),
    }
}

fn type_str(g: &Graph, n: NodeId) -> String {
    let outs = &g.node(n).outputs;
    if outs.len() == 1 {
        outs[0].to_string()
    } else {
        format!(
            "({})",
            outs.iter()
                .map(|t| t.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

fn node_line(g: &Graph, num: &HashMap<NodeId, usize>, n: NodeId) -> String {
    let node = g.node(n);
    let mut s = format!("%{} = {}", num[&n], node.op.name());
    let operands = g.operands(n);
    if !operands.is_empty() {
        let ops: Vec<String> = operands.iter().map(|v| value_name(g, num, *v)).collect();
        write!(s, "({})", ops.join(", ")).unwrap();
    }
    for (k, v) in node.op.attrs() {
        write!(s, " {k}={v}").unwrap();
    }
    write!(s, " : {}", type_str(g, n)).unwrap();
    if !node.scope.is_empty() {
        write!(s, "  # {}", node.scope).unwrap();
    }
    s
}

/// The text listing: one line per node, then a `return` line.
pub fn listing(g: &Graph) -> String {
    let (order, num) = numbering(g);
    let mut out = String::new();
    for &n in &order {
        out.push_str(&node_line(g, &num, n));
        out.push('\n');
    }
    let rets: Vec<String> = g
        .outputs()
        .iter()
        .map(|o| {
            let v = if g.try_value_type(o.value).is_ok() {
                value_name(g, &num, o.value)
            } else {
                format!("%<missing {}>", o.value.node.index())
            };
            match &o.kind {
                OutputKind::User => v,
                OutputKind::BufferUpdate(b) => format!("buffer {b:?} = {v}"),
            }
        })
        .collect();
    writeln!(out, "return {}", rets.join(", ")).unwrap();
    out
}

/// Counts of nodes, inputs, parameters, ops, and (with a plan) kernels.
pub fn summary(g: &Graph, plan: Option<&FusionPlan>) -> String {
    let mut out = String::new();
    let (mut users, mut params, mut buffers, mut param_elems) = (0, 0, 0, 0usize);
    for &i in g.inputs() {
        if let Op::Input { kind, ty } = &g.node(i).op {
            match kind {
                InputKind::User(_) => users += 1,
                InputKind::Param(_) => {
                    params += 1;
                    param_elems += ty.numel();
                }
                InputKind::Buffer(_) => buffers += 1,
            }
        }
    }
    let consts = g
        .node_ids()
        .iter()
        .filter(|&&n| matches!(g.node(n).op, Op::Constant { .. }))
        .count();
    writeln!(out, "nodes: {}", g.node_count()).unwrap();
    writeln!(
        out,
        "inputs: {users} user, {params} parameters ({param_elems} elements), {buffers} buffers, {consts} constants"
    )
    .unwrap();
    let updates = g
        .outputs()
        .iter()
        .filter(|o| matches!(o.kind, OutputKind::BufferUpdate(_)))
        .count();
    writeln!(
        out,
        "outputs: {} user, {updates} buffer updates",
        g.outputs().len() - updates
    )
    .unwrap();
    let ops: Vec<String> = g
        .op_counts()
        .into_iter()
        .filter(|(n, _)| !matches!(*n, "input" | "param" | "buffer" | "constant"))
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    writeln!(out, "ops: {}", ops.join(", ")).unwrap();
    if let Some(p) = plan {
        let kinds: Vec<String> = p
            .kind_counts()
            .into_iter()
            .map(|(k, c)| format!("{} {c}", k.name()))
            .collect();
        writeln!(
            out,
            "kernels: {} ({}); {} doing work",
            p.kernels.len(),
            kinds.join(", "),
            p.compute_kernel_count()
        )
        .unwrap();
    }
    out
}

fn dot_escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

const PALETTE: [&str; 10] = [
    "#8dd3c7", "#ffffb3", "#bebada", "#fb8072", "#80b1d3", "#fdb462", "#b3de69", "#fccde5",
    "#bc80bd", "#ccebc5",
];

#[derive(Default)]
struct ScopeTree {
    nodes: Vec<NodeId>,
    children: BTreeMap<String, ScopeTree>,
}

/// Graphviz DOT: module scopes as nested clusters; with a plan, the nodes
/// of each fused kernel share a fill color (and a `k<i>` tag).
pub fn to_dot(g: &Graph, plan: Option<&FusionPlan>) -> String {
    let (order, num) = numbering(g);
    let mut tree = ScopeTree::default();
    for &n in &order {
        let scope = &g.node(n).scope;
        let mut t = &mut tree;
        if !scope.is_empty() {
            for part in scope.split('/') {
                t = t.children.entry(part.to_string()).or_default();
            }
        }
        t.nodes.push(n);
    }
    let kernel_of: HashMap<NodeId, usize> = plan
        .map(|p| {
            p.kernels
                .iter()
                .enumerate()
                .flat_map(|(k, kern)| kern.nodes.iter().map(move |&n| (n, k)))
                .collect()
        })
        .unwrap_or_default();
    let mut out = String::from(
        "digraph kiln {\n  rankdir=TB;\n  node [shape=box, fontname=\"monospace\", fontsize=10];\n",
    );
    let node_stmt = |n: NodeId, indent: &str| -> String {
        let node = g.node(n);
        let mut label = format!("%{} {}", num[&n], node.op.name());
        let mut style = String::new();
        if let Some(&k) = kernel_of.get(&n) {
            write!(label, " [k{k}]").unwrap();
            write!(
                style,
                ", style=filled, fillcolor=\"{}\"",
                PALETTE[k % PALETTE.len()]
            )
            .unwrap();
        } else if matches!(node.op, Op::Input { .. } | Op::Constant { .. }) {
            style.push_str(", shape=ellipse");
        }
        if let Op::Input {
            kind: InputKind::Param(s) | InputKind::Buffer(s),
            ..
        } = &node.op
        {
            write!(label, "\\n{}", dot_escape(s)).unwrap();
        }
        write!(label, "\\n{}", type_str(g, n)).unwrap();
        format!("{indent}n{} [label=\"{label}\"{style}];\n", num[&n])
    };
    fn emit(
        t: &ScopeTree,
        depth: usize,
        counter: &mut usize,
        out: &mut String,
        node_stmt: &dyn Fn(NodeId, &str) -> String,
    ) {
        let indent = "  ".repeat(depth + 1);
        for &n in &t.nodes {
            out.push_str(&node_stmt(n, &indent));
        }
        for (name, child) in &t.children {
            *counter += 1;
            writeln!(out, "{indent}subgraph cluster_{} {{", *counter).unwrap();
            writeln!(out, "{indent}  label=\"{}\";", dot_escape(name)).unwrap();
            emit(child, depth + 1, counter, out, node_stmt);
            writeln!(out, "{indent}}}").unwrap();
        }
    }
    let mut counter = 0;
    emit(&tree, 0, &mut counter, &mut out, &node_stmt);
    for &n in &order {
        for (i, v) in g.operands(n).iter().enumerate() {
            if let Some(src) = num.get(&v.node) {
                let label = if g.node(v.node).outputs.len() > 1 {
                    format!(" [label=\"{}->{i}\"]", v.output)
                } else {
                    String::new()
                };
                writeln!(out, "  n{src} -> n{}{label};", num[&n]).unwrap();
            }
        }
    }
    for (k, o) in g.outputs().iter().enumerate() {
        if let Some(src) = num.get(&o.value.node) {
            let label = match &o.kind {
                OutputKind::User => format!("output {k}"),
                OutputKind::BufferUpdate(b) => format!("-> {}", dot_escape(b)),
            };
            writeln!(out, "  out{k} [label=\"{label}\", shape=plaintext];").unwrap();
            writeln!(out, "  n{src} -> out{k};").unwrap();
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fusion::plan_fusion;
    use crate::test_graphs::*;

    #[test]
    fn simple_net_listing_golden() {
        let g = simple_net();
        let expected = "\
%0 = input index=0 : f32[64,784]
%1 = param name=\"layer1.weight\" : f32[256,784]
%2 = param name=\"layer1.bias\" : f32[256]
%3 = param name=\"layer2.weight\" : f32[10,256]
%4 = param name=\"layer2.bias\" : f32[10]
%5 = permute(%1) dims=[1,0] : f32[784,256]  # SimpleNet/Linear[layer1]
%6 = addmm(%2, %0, %5) : f32[64,256]  # SimpleNet/Linear[layer1]
%7 = relu(%6) : f32[64,256]  # SimpleNet/ReLU[relu]
%8 = permute(%3) dims=[1,0] : f32[256,10]  # SimpleNet/Linear[layer2]
%9 = addmm(%4, %7, %8) : f32[64,10]  # SimpleNet/Linear[layer2]
return %9
";
        assert_eq!(listing(&g), expected);
    }

    #[test]
    fn seed_cnn_listing_lines_and_buffer_updates() {
        let g = seed_cnn(true);
        let text = listing(&g);
        assert!(text.contains(
            " = conv2d(%0, %1, %2) stride=[1,1] padding=[1,1] dilation=[1,1] groups=1 : f32[8,32,26,26]  # SeedCNN/Sequential[net]/Conv2d[0]\n"
        ), "{text}");
        assert!(text.contains(" = max_pool2d(%"));
        assert!(text.contains("batch_norm(%"));
        assert!(text.contains(
            "training=true momentum=0.1 eps=1e-5 weight=true bias=true running_stats=true : (f32[8,32,13,13], f32[32], f32[32])  # SeedCNN/Sequential[net]/BatchNorm2d[3]"
        ), "{text}");
        assert!(text.contains("buffer \"net.3.running_mean\" = %"), "{text}");
        let last = text.lines().last().unwrap();
        assert!(last.starts_with("return %"), "{last}");
        assert!(last.contains(".1, buffer"), "{last}");
    }

    #[test]
    fn summary_counts_ops_params_and_kernels() {
        let g = simple_net();
        let plan = plan_fusion(&g).unwrap();
        let s = summary(&g, Some(&plan));
        assert_eq!(
            s,
            "nodes: 10\n\
             inputs: 1 user, 4 parameters (203530 elements), 0 buffers, 0 constants\n\
             outputs: 1 user, 0 buffer updates\n\
             ops: addmm 2, permute 2, relu 1\n\
             kernels: 4 (contraction 2, view 2); 2 doing work\n"
        );
    }

    #[test]
    fn dot_has_nested_scope_clusters_and_kernel_colors() {
        let g = simple_net();
        let plan = plan_fusion(&g).unwrap();
        let d = to_dot(&g, Some(&plan));
        assert!(d.starts_with("digraph kiln {\n"));
        assert!(d.ends_with("}\n"));
        assert!(d.contains("label=\"SimpleNet\";"));
        assert!(d.contains("label=\"Linear[layer1]\";"));
        assert_eq!(d.matches("subgraph cluster_").count(), 4);
        // addmm and relu share kernel 1's color.
        let line = |name: &str| d.lines().find(|l| l.contains(name)).unwrap().to_string();
        let addmm = line("%6 addmm");
        let relu = line("%7 relu");
        assert!(
            addmm.contains("[k1]") && relu.contains("[k1]"),
            "{addmm}\n{relu}"
        );
        assert!(addmm.contains(PALETTE[1]) && relu.contains(PALETTE[1]));
        assert!(d.contains("  n6 -> n7;\n"));
        assert!(d.contains("n9 -> out0;"));
        assert!(d.contains("\\nlayer1.weight\\n"));
        // Without a plan: no colors.
        assert!(!to_dot(&g, None).contains("fillcolor"));
    }
}
