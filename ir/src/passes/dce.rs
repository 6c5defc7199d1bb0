//! Dead-code elimination: remove every node no graph output depends on.
//! Graph inputs stay (they are the call signature and the name bindings).

use crate::graph::Graph;
use crate::op::Op;
use crate::types::Result;
use std::collections::HashSet;

pub fn dce(g: &mut Graph) -> Result<bool> {
    let mut live = HashSet::new();
    // Module calls run hooks (side effects), as in eager: always live.
    let mut stack: Vec<_> = g.outputs().iter().map(|o| o.value.node).collect();
    stack.extend(
        g.node_ids()
            .into_iter()
            .filter(|&n| matches!(g.node(n).op, Op::ModuleCall { .. })),
    );
    while let Some(n) = stack.pop() {
        if live.insert(n) {
            stack.extend(g.operands(n).into_iter().map(|v| v.node));
        }
    }
    let dead: Vec<_> = g
        .node_ids()
        .into_iter()
        .filter(|n| !live.contains(n) && !matches!(g.node(*n).op, Op::Input { .. }))
        .collect();
    for &n in &dead {
        g.remove_node(n);
    }
    Ok(!dead.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_graphs::*;
    use crate::{verify, UnaryOp};

    #[test]
    fn removes_unused_chains_but_keeps_inputs() {
        let mut g = simple_net();
        let before = g.node_count();
        let x = g.inputs()[0];
        let a = g
            .add1(Op::Unary(UnaryOp::Exp), &[crate::Value::new(x, 0)], "dead")
            .unwrap();
        g.add1(Op::Unary(UnaryOp::Neg), &[a], "dead").unwrap();
        assert_eq!(g.node_count(), before + 2);
        assert!(dce(&mut g).unwrap());
        assert_eq!(g.node_count(), before);
        verify(&g).unwrap();
        assert!(!dce(&mut g).unwrap());
        // An unused parameter input stays.
        let mut g2 = simple_net();
        g2.add_input(
            crate::InputKind::Param("unused".into()),
            crate::TensorType::new(&[3], crate::DType::F32),
            "",
        )
        .unwrap();
        let n = g2.node_count();
        dce(&mut g2).unwrap();
        assert_eq!(g2.node_count(), n);
    }
}
