//! Constant folding: a pure node whose operands are all constants is
//! evaluated with the f64 reference evaluator (`crate::eval`) and replaced
//! by constants. Folded: everything the evaluator implements (elementwise,
//! reductions, softmax, views, cat/stack, matmul/addmm, conv2d, pooling,
//! norms). Left alone: dropout (random), conv_transpose2d, results in
//! f16/bf16 (the evaluator does not round to them), and results that would
//! be larger than both `FOLD_MAX_ELEMENTS` and their operands together (an
//! `expand` of a scalar stays an expand, not a big literal).

use crate::eval::{eval_op, Tensor64};
use crate::graph::{Graph, Value};
use crate::op::Op;
use crate::types::Result;
use crate::DType;

pub const FOLD_MAX_ELEMENTS: usize = 4096;

pub fn constant_fold(g: &mut Graph) -> Result<bool> {
    let mut changed = false;
    for n in g.topo_order()? {
        let node = g.node(n);
        if !node.op.is_pure() || matches!(node.op, Op::Constant { .. }) {
            continue;
        }
        if node
            .outputs
            .iter()
            .any(|t| matches!(t.dtype, DType::F16 | DType::BF16))
        {
            continue;
        }
        let operands = g.operands(n);
        let mut args = Vec::with_capacity(operands.len());
        for v in &operands {
            match &g.node(v.node).op {
                Op::Constant { ty, data } => args.push(Tensor64::new(ty.clone(), data.clone())),
                _ => break,
            }
        }
        if args.len() != operands.len() {
            continue;
        }
        let out_size: usize = node.outputs.iter().map(|t| t.numel()).sum();
        let in_size: usize = args.iter().map(|a| a.data.len()).sum();
        if out_size > FOLD_MAX_ELEMENTS && out_size > in_size {
            continue;
        }
        let Some(outs) = eval_op(&node.op, &args)? else {
            continue;
        };
        let scope = node.scope.clone();
        for (i, t) in outs.into_iter().enumerate() {
            let c = g.add_constant(t.ty, t.data, &scope)?;
            g.replace_all_uses(Value::new(n, i), c);
        }
        g.remove_node(n);
        changed = true;
    }
    if changed {
        super::dce(g)?;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::OutputKind;
    use crate::{verify, BinaryOp, InputKind, ReduceOp, TensorType, UnaryOp};

    #[test]
    fn folds_constant_subgraphs_and_stops_at_inputs() {
        let mut g = Graph::new();
        let x = g
            .add_input(InputKind::User(0), TensorType::new(&[2, 2], DType::F32), "")
            .unwrap();
        let c = g
            .add_constant(
                TensorType::new(&[2, 2], DType::F32),
                vec![1.0, 2.0, 3.0, 4.0],
                "",
            )
            .unwrap();
        let s = g
            .add1(
                Op::Reduce {
                    op: ReduceOp::Sum,
                    dims: vec![1],
                    keepdim: true,
                },
                &[c],
                "",
            )
            .unwrap();
        let e = g.add1(Op::Unary(UnaryOp::Sqrt), &[s], "").unwrap();
        let p = g.add1(Op::Permute { dims: vec![1, 0] }, &[c], "").unwrap();
        let y = g.add1(Op::Binary(BinaryOp::Mul), &[x, e], "").unwrap();
        let z = g.add1(Op::Binary(BinaryOp::Add), &[y, p], "").unwrap();
        g.add_output(z, OutputKind::User).unwrap();
        assert_eq!(g.node_count(), 7);
        assert!(constant_fold(&mut g).unwrap());
        verify(&g).unwrap();
        // x, const(sqrt), const(permute), mul, add
        assert_eq!(g.node_count(), 5);
        let consts: Vec<Vec<f64>> = g
            .node_ids()
            .into_iter()
            .filter_map(|n| match &g.node(n).op {
                Op::Constant { data, .. } => Some(data.clone()),
                _ => None,
            })
            .collect();
        assert!(consts.contains(&vec![
            (3.0f64).sqrt() as f32 as f64,
            (7.0f64).sqrt() as f32 as f64
        ]));
        assert!(consts.contains(&vec![1.0, 3.0, 2.0, 4.0]));
        assert!(!constant_fold(&mut g).unwrap());
    }

    #[test]
    fn does_not_blow_up_a_scalar_expand() {
        let mut g = Graph::new();
        let x = g
            .add_input(
                InputKind::User(0),
                TensorType::new(&[100, 100], DType::F32),
                "",
            )
            .unwrap();
        let c = g
            .add_constant(TensorType::new(&[], DType::F32), vec![2.0], "")
            .unwrap();
        let e = g
            .add1(
                Op::Expand {
                    shape: vec![100, 100],
                },
                &[c],
                "",
            )
            .unwrap();
        let y = g.add1(Op::Binary(BinaryOp::Mul), &[x, e], "").unwrap();
        g.add_output(y, OutputKind::User).unwrap();
        assert!(!constant_fold(&mut g).unwrap());
    }
}
