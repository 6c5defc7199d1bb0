//! Common-subexpression elimination: two pure nodes with the same op
//! (attributes included) and the same operands become one. Operands of
//! commutative binary ops are compared as a set. Inputs and dropout (random)
//! are never merged.

use crate::graph::{Graph, Value};
use crate::op::Op;
use crate::types::Result;
use crate::BinaryOp;
use std::collections::HashMap;

fn commutative(op: &Op) -> bool {
    matches!(
        op,
        Op::Binary(
            BinaryOp::Add
                | BinaryOp::Mul
                | BinaryOp::Maximum
                | BinaryOp::Minimum
                | BinaryOp::Eq
                | BinaryOp::Ne
        )
    )
}

pub fn cse(g: &mut Graph) -> Result<bool> {
    let mut seen: HashMap<String, crate::NodeId> = HashMap::new();
    let mut changed = false;
    for n in g.topo_order()? {
        let op = &g.node(n).op;
        if !op.is_pure() {
            continue;
        }
        let mut operands: Vec<Value> = g.operands(n);
        if commutative(op) {
            operands.sort();
        }
        let key = format!("{op:?}|{operands:?}");
        match seen.get(&key) {
            Some(&m) => {
                for o in 0..g.node(n).outputs.len() {
                    g.replace_all_uses(Value::new(n, o), Value::new(m, o));
                }
                g.remove_node(n);
                changed = true;
            }
            None => {
                seen.insert(key, n);
            }
        }
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::OutputKind;
    use crate::{verify, DType, InputKind, TensorType, UnaryOp};

    #[test]
    fn merges_duplicates_transitively_and_commutatively() {
        let mut g = Graph::new();
        let t = TensorType::new(&[4], DType::F32);
        let x = g.add_input(InputKind::User(0), t.clone(), "").unwrap();
        let y = g.add_input(InputKind::User(1), t.clone(), "").unwrap();
        let a1 = g.add1(Op::Binary(BinaryOp::Add), &[x, y], "").unwrap();
        let a2 = g.add1(Op::Binary(BinaryOp::Add), &[y, x], "").unwrap();
        let e1 = g.add1(Op::Unary(UnaryOp::Exp), &[a1], "").unwrap();
        let e2 = g.add1(Op::Unary(UnaryOp::Exp), &[a2], "").unwrap();
        let s1 = g.add1(Op::Binary(BinaryOp::Sub), &[x, y], "").unwrap();
        let s2 = g.add1(Op::Binary(BinaryOp::Sub), &[y, x], "").unwrap();
        let d1 = g
            .add1(
                Op::Dropout {
                    p: 0.5,
                    seed: 0,
                    offset: 0,
                },
                &[x],
                "",
            )
            .unwrap();
        let d2 = g
            .add1(
                Op::Dropout {
                    p: 0.5,
                    seed: 0,
                    offset: 0,
                },
                &[x],
                "",
            )
            .unwrap();
        for v in [e1, e2, s1, s2, d1, d2] {
            g.add_output(v, OutputKind::User).unwrap();
        }
        assert_eq!(g.node_count(), 10);
        assert!(cse(&mut g).unwrap());
        verify(&g).unwrap();
        // add and exp merged; sub (not commutative) and dropout (random) kept.
        assert_eq!(g.node_count(), 8);
        assert_eq!(g.outputs()[0].value, g.outputs()[1].value);
        assert_ne!(g.outputs()[2].value, g.outputs()[3].value);
        assert_ne!(g.outputs()[4].value, g.outputs()[5].value);
        assert!(!cse(&mut g).unwrap());
    }

    #[test]
    fn different_attributes_are_not_merged() {
        let mut g = Graph::new();
        let x = g
            .add_input(InputKind::User(0), TensorType::new(&[2, 3], DType::F32), "")
            .unwrap();
        let a = g
            .add1(
                Op::Reduce {
                    op: crate::ReduceOp::Sum,
                    dims: vec![0],
                    keepdim: false,
                },
                &[x],
                "",
            )
            .unwrap();
        let b = g
            .add1(
                Op::Reduce {
                    op: crate::ReduceOp::Sum,
                    dims: vec![1],
                    keepdim: false,
                },
                &[x],
                "",
            )
            .unwrap();
        g.add_output(a, OutputKind::User).unwrap();
        g.add_output(b, OutputKind::User).unwrap();
        assert!(!cse(&mut g).unwrap());
    }
}
