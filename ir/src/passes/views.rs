//! Removal of no-op views: reshape to the same shape, reshape of a reshape
//! (one reshape), identity permute, permute of a permute (composed; double
//! transpose disappears), expand to the same shape, a slice covering a whole
//! dimension, single-operand cat, and contiguous whose operand is not a
//! view (already contiguous: covers contiguous of contiguous).

use super::forward_to;
use crate::graph::{Graph, Value};
use crate::op::{Op, OpClass};
use crate::types::Result;

pub fn simplify_views(g: &mut Graph) -> Result<bool> {
    let mut changed = false;
    for n in g.topo_order()? {
        let node = g.node(n);
        let operands = g.operands(n);
        let Some(&x) = operands.first() else {
            continue;
        };
        let in_ty = g.value_type(x).clone();
        let out_ty = node.outputs[0].clone();
        let producer = g.node(x.node).op.clone();
        let scope = node.scope.clone();
        let replacement: Option<Value> = match &node.op {
            Op::Reshape { .. } | Op::Expand { .. } if in_ty.shape == out_ty.shape => Some(x),
            Op::Slice { .. } if in_ty.shape == out_ty.shape => Some(x),
            Op::Cat { .. } if operands.len() == 1 => Some(x),
            Op::Reshape { shape } => match producer {
                Op::Reshape { .. } => {
                    let inner = g.operands(x.node)[0];
                    Some(g.add1(
                        Op::Reshape {
                            shape: shape.clone(),
                        },
                        &[inner],
                        &scope,
                    )?)
                }
                _ => None,
            },
            Op::Permute { dims } => {
                if dims.iter().enumerate().all(|(i, &d)| i == d) {
                    Some(x)
                } else if let Op::Permute { dims: inner_dims } = &producer {
                    let inner = g.operands(x.node)[0];
                    let composed: Vec<usize> = dims.iter().map(|&d| inner_dims[d]).collect();
                    if composed.iter().enumerate().all(|(i, &d)| i == d) {
                        Some(inner)
                    } else {
                        Some(g.add1(Op::Permute { dims: composed }, &[inner], &scope)?)
                    }
                } else {
                    None
                }
            }
            Op::Contiguous if producer.class() != OpClass::View => Some(x),
            _ => None,
        };
        if let Some(v) = replacement {
            forward_to(g, n, v);
            changed = true;
        }
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
    use crate::{verify, DType, InputKind, TensorType, UnaryOp};

    #[test]
    fn removes_noop_views() {
        let mut g = Graph::new();
        let x = g
            .add_input(
                InputKind::User(0),
                TensorType::new(&[2, 3, 4], DType::F32),
                "",
            )
            .unwrap();
        let r0 = g
            .add1(
                Op::Reshape {
                    shape: vec![2, 3, 4],
                },
                &[x],
                "",
            )
            .unwrap();
        let t1 = g
            .add1(
                Op::Permute {
                    dims: vec![0, 2, 1],
                },
                &[r0],
                "",
            )
            .unwrap();
        let t2 = g
            .add1(
                Op::Permute {
                    dims: vec![0, 2, 1],
                },
                &[t1],
                "",
            )
            .unwrap();
        let c1 = g.add1(Op::Contiguous, &[t2], "").unwrap();
        let c2 = g.add1(Op::Contiguous, &[c1], "").unwrap();
        let r1 = g
            .add1(Op::Reshape { shape: vec![6, 4] }, &[c2], "")
            .unwrap();
        let r2 = g.add1(Op::Reshape { shape: vec![24] }, &[r1], "").unwrap();
        let e = g.add1(Op::Unary(UnaryOp::Exp), &[r2], "").unwrap();
        let p = g.add1(Op::Permute { dims: vec![1, 0] }, &[r1], "").unwrap();
        let p2 = g.add1(Op::Permute { dims: vec![1, 0] }, &[p], "").unwrap();
        let keep = g.add1(Op::Contiguous, &[p], "").unwrap();
        for v in [e, p2, keep] {
            g.add_output(v, OutputKind::User).unwrap();
        }
        assert_eq!(g.node_count(), 12);
        assert!(simplify_views(&mut g).unwrap());
        verify(&g).unwrap();
        // x, reshape[6,4], reshape[24], exp, permute, contiguous(permute)
        assert_eq!(g.node_count(), 6, "{}", crate::printer::listing(&g));
        let names: Vec<&str> = g.node_ids().iter().map(|&n| g.node(n).op.name()).collect();
        assert_eq!(names.iter().filter(|&&s| s == "reshape").count(), 2);
        assert_eq!(names.iter().filter(|&&s| s == "contiguous").count(), 1);
        // permute(permute(r1)) is r1 itself: a reshape of x.
        let o1 = g.outputs()[1].value;
        assert_eq!(g.node(o1.node).op, Op::Reshape { shape: vec![6, 4] });
        assert_eq!(g.operands(o1.node), vec![x]);
        // reshape(reshape(x)) became one reshape of x.
        let exp_in = g.operands(g.outputs()[0].value.node)[0];
        assert_eq!(g.operands(exp_in.node), vec![x]);
        assert!(!simplify_views(&mut g).unwrap());
    }
}
