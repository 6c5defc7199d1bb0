//! A linear layer on an input of rank > 2 is traced the way PyTorch's
//! `F.linear` runs it: flatten to 2-D, `addmm`, view back:
//!   reshape(addmm(bias, reshape(x, [M, K]), wT), [B.., N])
//! The views between the product and what follows (GELU, a residual add)
//! keep the fusion plan from applying those pointwise ops to the product's
//! output tiles. For the compiled backends (`compile_pipeline`) this pass
//! rewrites the pattern to the rank-N form
//!   add(matmul(x, wT), bias)        (x [B.., K], wT [K, N], bias [N])
//! whose batch dims the backends fold into the rows of one gemm, so the bias
//! and the ops after it form the gemm's epilogue. `matmul` without a bias
//! (`reshape(mm(reshape(x)), ..)`) is rewritten the same way. Same values up
//! to rounding (the bias is added after the product instead of before).

use crate::graph::{Graph, Value};
use crate::op::Op;
use crate::types::Result;
use crate::BinaryOp;

pub fn unflatten_linear(g: &mut Graph) -> Result<bool> {
    let mut changed = false;
    for r2 in g.topo_order()? {
        let Op::Reshape { shape: out_shape } = &g.node(r2).op else {
            continue;
        };
        let out_shape = out_shape.clone();
        let prod = g.operands(r2)[0];
        if prod.output != 0 || g.is_graph_output(prod) || g.users(prod).len() != 1 {
            continue;
        }
        let (bias, x2, wt) = match g.node(prod.node).op {
            Op::Addmm => {
                let o = g.operands(prod.node);
                (Some(o[0]), o[1], o[2])
            }
            Op::MatMul => {
                let o = g.operands(prod.node);
                (None, o[0], o[1])
            }
            _ => continue,
        };
        let Op::Reshape { .. } = g.node(x2.node).op else {
            continue;
        };
        let x = g.operands(x2.node)[0];
        let (xs, x2s, ws) = (
            g.value_type(x).shape.clone(),
            g.value_type(x2).shape.clone(),
            g.value_type(wt).shape.clone(),
        );
        if xs.len() < 3 || x2s.len() != 2 || ws.len() != 2 {
            continue;
        }
        let (k, n) = (ws[0], ws[1]);
        // x [B.., K] flattened to [prod B, K]; the result viewed as [B.., N].
        let lead = &xs[..xs.len() - 1];
        if xs[xs.len() - 1] != k
            || x2s != [lead.iter().product::<usize>(), k]
            || out_shape[..out_shape.len() - 1] != *lead
            || out_shape.last() != Some(&n)
        {
            continue;
        }
        if let Some(b) = bias {
            if g.value_type(b).shape != [n] {
                continue;
            }
        }
        let scope = g.node(prod.node).scope.clone();
        let mm = g.add1(Op::MatMul, &[x, wt], &scope)?;
        let y = match bias {
            Some(b) => g.add1(Op::Binary(BinaryOp::Add), &[mm, b], &scope)?,
            None => mm,
        };
        g.replace_all_uses(Value::new(r2, 0), y);
        g.remove_node(r2);
        g.remove_node(prod.node);
        if g.users(x2).is_empty() && !g.is_graph_output(x2) {
            g.remove_node(x2.node);
        }
        changed = true;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::eval_graph;
    use crate::graph::OutputKind;
    use crate::test_graphs::*;
    use crate::{verify, DType, InputKind, TensorType, UnaryOp};

    fn ty(s: &[usize]) -> TensorType {
        TensorType::new(s, DType::F32)
    }

    /// x [2, 3, 4] -> linear(4 -> 5) -> gelu, traced as F.linear does.
    fn linear3d(bias: bool) -> Graph {
        let mut g = Graph::new();
        let x = g.add_input(InputKind::User(0), ty(&[2, 3, 4]), "").unwrap();
        let w = g
            .add_input(InputKind::Param("w".into()), ty(&[5, 4]), "")
            .unwrap();
        let wt = g
            .add1(Op::Permute { dims: vec![1, 0] }, &[w], "fc")
            .unwrap();
        let x2 = g
            .add1(Op::Reshape { shape: vec![6, 4] }, &[x], "fc")
            .unwrap();
        let p = if bias {
            let b = g
                .add_input(InputKind::Param("b".into()), ty(&[5]), "")
                .unwrap();
            g.add1(Op::Addmm, &[b, x2, wt], "fc").unwrap()
        } else {
            g.add1(Op::MatMul, &[x2, wt], "fc").unwrap()
        };
        let y = g
            .add1(
                Op::Reshape {
                    shape: vec![2, 3, 5],
                },
                &[p],
                "fc",
            )
            .unwrap();
        let z = g.add1(Op::Unary(UnaryOp::GeluErf), &[y], "act").unwrap();
        g.add_output(z, OutputKind::User).unwrap();
        g
    }

    #[test]
    fn flattened_linear_becomes_a_batched_matmul_with_the_same_values() {
        for bias in [true, false] {
            let g0 = linear3d(bias);
            let mut g = g0.clone();
            assert!(unflatten_linear(&mut g).unwrap());
            verify(&g).unwrap();
            let names: Vec<&str> = g.node_ids().iter().map(|&n| g.node(n).op.name()).collect();
            assert!(
                !names.contains(&"addmm") && !names.contains(&"reshape"),
                "{names:?}"
            );
            assert!(names.contains(&"matmul"), "{names:?}");
            let bind = random_binding(&g0, 5);
            let a = eval_graph(&g0, &bind).unwrap();
            let b = eval_graph(&g, &bind).unwrap();
            assert_eq!(a[0].data.len(), b[0].data.len());
            assert_close(&a[0].data, &b[0].data, 1e-6);
            // Nothing left to rewrite.
            assert!(!unflatten_linear(&mut g).unwrap());
        }
    }

    #[test]
    fn a_product_read_elsewhere_is_left_alone() {
        let mut g = linear3d(true);
        let p = g
            .node_ids()
            .into_iter()
            .find(|&n| g.node(n).op.name() == "addmm")
            .unwrap();
        g.add_output(Value::new(p, 0), OutputKind::User).unwrap();
        assert!(!unflatten_linear(&mut g).unwrap());
    }
}
