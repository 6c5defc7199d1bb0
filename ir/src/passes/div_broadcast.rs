//! `a / b` where `b` is broadcast over `a` (a per-channel or per-feature
//! divisor: `(x - mean) / sqrt(var + eps)` in a hand-written batch norm)
//! becomes `a * reciprocal(b)` for the compiled backends
//! (`compile_pipeline`): the reciprocal runs once per element of `b` in a
//! small kernel of its own and the per-element work is a multiply instead
//! of a division (a 4-lane divide costs several multiplies). The result
//! differs from the division by at most about one ulp (two roundings
//! instead of one). Only divisors with at most a quarter of the output's
//! elements are rewritten.

use crate::graph::Graph;
use crate::op::Op;
use crate::types::Result;
use crate::{BinaryOp, DType, UnaryOp};

pub fn reciprocal_of_broadcast_divisor(g: &mut Graph) -> Result<bool> {
    let mut changed = false;
    for n in g.topo_order()? {
        let Op::Binary(BinaryOp::Div) = g.node(n).op else {
            continue;
        };
        let out = g.node(n).outputs[0].clone();
        let (a, b) = (g.operands(n)[0], g.operands(n)[1]);
        let bt = g.value_type(b).clone();
        if out.dtype != DType::F32
            || bt.dtype != DType::F32
            || g.value_type(a).dtype != DType::F32
            || bt.numel() * 4 > out.numel()
        {
            continue;
        }
        let scope = g.node(n).scope.clone();
        let r = g.add1(Op::Unary(UnaryOp::Reciprocal), &[b], &scope)?;
        let y = g.add1(Op::Binary(BinaryOp::Mul), &[a, r], &scope)?;
        g.replace_all_uses(crate::graph::Value::new(n, 0), y);
        g.remove_node(n);
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
    use crate::{verify, InputKind, TensorType};

    fn div_graph(bshape: &[usize]) -> Graph {
        let mut g = Graph::new();
        let t = |s: &[usize]| TensorType::new(s, DType::F32);
        let x = g.add_input(InputKind::User(0), t(&[16, 8]), "").unwrap();
        let v = g
            .add_input(InputKind::Buffer("v".into()), t(bshape), "")
            .unwrap();
        let s = g.add1(Op::Unary(UnaryOp::Sqrt), &[v], "bn").unwrap();
        let y = g.add1(Op::Binary(BinaryOp::Div), &[x, s], "bn").unwrap();
        g.add_output(y, OutputKind::User).unwrap();
        g
    }

    #[test]
    fn broadcast_divisor_becomes_a_reciprocal_multiply() {
        let g0 = div_graph(&[8]);
        let mut g = g0.clone();
        assert!(reciprocal_of_broadcast_divisor(&mut g).unwrap());
        verify(&g).unwrap();
        let names: Vec<&str> = g.node_ids().iter().map(|&n| g.node(n).op.name()).collect();
        assert!(
            !names.contains(&"div") && names.contains(&"reciprocal"),
            "{names:?}"
        );
        // Positive divisors (sqrt of the bound values' magnitudes).
        let bind = |k: &InputKind| {
            random_binding(&g0, 7)(k).map(|v| v.iter().map(|x| x.abs() + 0.5).collect())
        };
        let a = eval_graph(&g0, &bind).unwrap();
        let b = eval_graph(&g, &bind).unwrap();
        assert_close(&a[0].data, &b[0].data, 1e-6);
    }

    #[test]
    fn full_size_divisor_is_left_alone() {
        let mut g = div_graph(&[16, 8]);
        assert!(!reciprocal_of_broadcast_divisor(&mut g).unwrap());
    }
}
