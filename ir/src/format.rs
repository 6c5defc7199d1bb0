//! The graph file format: JSON with a `format_version`, nodes in
//! topological order (a node's id is its position), each with its op (all
//! attributes), operands as `[node, output]` pairs, output types and scope;
//! the ordered graph inputs (node ids) and outputs. Weights are not here
//! (the runtime stores them beside the graph, in safetensors). Loading
//! checks the version first, then the structure, then runs the verifier:
//! an unknown version, a cyclic or an ill-typed graph is a clear error.

use crate::graph::{verify, Graph, GraphOutput, Node, OutputKind, Value};
use crate::op::Op;
use crate::types::{IrError, Result, TensorType};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

pub const FORMAT_VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct GraphFile {
    format_version: u32,
    nodes: Vec<NodeRecord>,
    inputs: Vec<usize>,
    outputs: Vec<OutputRecord>,
}

#[derive(Serialize, Deserialize)]
struct NodeRecord {
    op: Op,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    operands: Vec<[usize; 2]>,
    outputs: Vec<TensorType>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    scope: String,
}

#[derive(Serialize, Deserialize)]
struct OutputRecord {
    value: [usize; 2],
    kind: OutputKind,
}

fn to_file(g: &Graph) -> Result<GraphFile> {
    let order = g.topo_order()?;
    let id: HashMap<_, _> = order.iter().enumerate().map(|(i, &n)| (n, i)).collect();
    let vref = |v: Value| [id[&v.node], v.output];
    Ok(GraphFile {
        format_version: FORMAT_VERSION,
        nodes: order
            .iter()
            .map(|&n| {
                let node = g.node(n);
                NodeRecord {
                    op: node.op.clone(),
                    operands: g.operands(n).into_iter().map(vref).collect(),
                    outputs: node.outputs.clone(),
                    scope: node.scope.clone(),
                }
            })
            .collect(),
        inputs: g.inputs().iter().map(|n| id[n]).collect(),
        outputs: g
            .outputs()
            .iter()
            .map(|o| OutputRecord {
                value: vref(o.value),
                kind: o.kind.clone(),
            })
            .collect(),
    })
}

/// The graph as compact JSON. Fails only on a cyclic graph.
pub fn to_json(g: &Graph) -> Result<String> {
    serde_json::to_string(&to_file(g)?).map_err(|e| IrError::Format(e.to_string()))
}

/// The graph as indented JSON.
pub fn to_json_pretty(g: &Graph) -> Result<String> {
    serde_json::to_string_pretty(&to_file(g)?).map_err(|e| IrError::Format(e.to_string()))
}

/// Load and verify a graph written by `to_json`.
pub fn from_json(text: &str) -> Result<Graph> {
    let raw: serde_json::Value =
        serde_json::from_str(text).map_err(|e| IrError::Format(format!("not valid JSON: {e}")))?;
    match raw.get("format_version") {
        None => {
            return Err(IrError::Format(
                "missing `format_version`: not a kiln graph file".into(),
            ))
        }
        Some(v) if v.as_u64() != Some(FORMAT_VERSION as u64) => {
            return Err(IrError::Version {
                found: v.to_string(),
                supported: FORMAT_VERSION,
            })
        }
        _ => {}
    }
    let file: GraphFile =
        serde_json::from_value(raw).map_err(|e| IrError::Format(e.to_string()))?;
    let mut g = Graph::new();
    let ids: Vec<_> = file
        .nodes
        .iter()
        .map(|r| {
            g.insert_raw(Node {
                op: r.op.clone(),
                outputs: r.outputs.clone(),
                scope: r.scope.clone(),
            })
        })
        .collect();
    let lookup = |[n, o]: [usize; 2], what: &str| -> Result<Value> {
        ids.get(n).map(|&id| Value::new(id, o)).ok_or_else(|| {
            IrError::Format(format!("{what} refers to node {n}, which does not exist"))
        })
    };
    for (i, r) in file.nodes.iter().enumerate() {
        for (slot, &v) in r.operands.iter().enumerate() {
            let v = lookup(v, &format!("operand {slot} of node {i}"))?;
            g.connect(v, ids[i], slot);
        }
    }
    let inputs = file
        .inputs
        .iter()
        .map(|&n| lookup([n, 0], "the input list").map(|v| v.node))
        .collect::<Result<Vec<_>>>()?;
    g.set_input_order(inputs);
    let outputs = file
        .outputs
        .iter()
        .enumerate()
        .map(|(k, o)| {
            Ok(GraphOutput {
                value: lookup(o.value, &format!("output {k}"))?,
                kind: o.kind.clone(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    g.set_outputs_unchecked(outputs);
    verify(&g)?;
    Ok(g)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::printer::listing;
    use crate::test_graphs::*;

    #[test]
    fn round_trip_every_test_graph() {
        for (name, g) in all_test_graphs() {
            let text = to_json(&g).unwrap();
            let back = from_json(&text).unwrap();
            assert_eq!(listing(&back), listing(&g), "{name}");
            assert_eq!(to_json(&back).unwrap(), text, "{name}");
            let pretty = to_json_pretty(&g).unwrap();
            assert_eq!(listing(&from_json(&pretty).unwrap()), listing(&g));
        }
    }

    #[test]
    fn constants_with_non_finite_values_round_trip() {
        let mut g = Graph::new();
        let x = g
            .add_input(
                crate::InputKind::User(0),
                TensorType::new(&[3], crate::DType::F32),
                "",
            )
            .unwrap();
        let c = g
            .add_constant(
                TensorType::new(&[3], crate::DType::F32),
                vec![f64::NEG_INFINITY, f64::INFINITY, 0.25],
                "",
            )
            .unwrap();
        let y = g
            .add1(Op::Binary(crate::BinaryOp::Add), &[x, c], "")
            .unwrap();
        g.add_output(y, OutputKind::User).unwrap();
        let text = to_json(&g).unwrap();
        assert!(text.contains("[\"-inf\",\"inf\",0.25]"), "{text}");
        assert_eq!(listing(&from_json(&text).unwrap()), listing(&g));
    }

    fn edit(text: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
        let mut v: serde_json::Value = serde_json::from_str(text).unwrap();
        f(&mut v);
        v.to_string()
    }

    #[test]
    fn corrupt_files_give_clear_errors() {
        let text = to_json(&simple_net()).unwrap();
        // Unknown version.
        let e = from_json(&edit(&text, |v| v["format_version"] = 99.into())).unwrap_err();
        assert_eq!(
            e.to_string(),
            "unsupported graph format version 99 (this build reads version 1)"
        );
        // Missing version.
        let e = from_json(&edit(&text, |v| {
            v.as_object_mut().unwrap().remove("format_version");
        }))
        .unwrap_err();
        assert!(e.to_string().contains("missing `format_version`"), "{e}");
        // Truncated.
        let e = from_json(&text[..text.len() / 2]).unwrap_err();
        assert!(
            e.to_string().starts_with("graph file: not valid JSON"),
            "{e}"
        );
        // Ill-typed: the relu claims another shape.
        let e = from_json(&edit(&text, |v| {
            v["nodes"][7]["outputs"][0]["shape"] = serde_json::json!([64, 255]);
        }))
        .unwrap_err();
        assert!(
            e.to_string().contains("node %") && e.to_string().contains("ill-typed"),
            "{e}"
        );
        // Cycle: the first permute reads the relu (which depends on it).
        let e = from_json(&edit(&text, |v| {
            v["nodes"][5]["operands"] = serde_json::json!([[7, 0]]);
        }))
        .unwrap_err();
        assert!(e.to_string().contains("cycle"), "{e}");
        // Dangling operand.
        let e = from_json(&edit(&text, |v| {
            v["nodes"][6]["operands"][0] = serde_json::json!([42, 0]);
        }))
        .unwrap_err();
        assert_eq!(
            e.to_string(),
            "graph file: operand 0 of node 6 refers to node 42, which does not exist"
        );
        // Unknown op.
        let e = from_json(&edit(&text, |v| {
            v["nodes"][7]["op"] = serde_json::json!({"Frobnicate": null});
        }))
        .unwrap_err();
        assert!(e.to_string().contains("Frobnicate"), "{e}");
    }
}
