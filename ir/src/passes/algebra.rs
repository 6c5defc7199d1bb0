//! Algebraic simplification: x*1, 1*x, x+0, 0+x, x-0, x/1, x**1 (with a
//! constant all-ones/all-zeros operand), the scalar forms (mul_scalar 1,
//! add_scalar 0, pow_scalar 1), neg(neg(x)) and a cast to the same dtype.
//! A rewrite only fires when the result type equals x's type (a broadcast
//! or a type promotion by the constant is not a no-op). x*0 is left alone
//! (NaN and inf).

use super::forward_to;
use crate::graph::{Graph, Value};
use crate::op::Op;
use crate::types::Result;
use crate::{BinaryOp, UnaryOp};

fn const_all(g: &Graph, v: Value, want: f64) -> bool {
    match &g.node(v.node).op {
        Op::Constant { data, .. } => !data.is_empty() && data.iter().all(|&x| x == want),
        _ => false,
    }
}

pub fn simplify_algebra(g: &mut Graph) -> Result<bool> {
    let mut changed = false;
    for n in g.topo_order()? {
        if !g.contains(n) {
            continue;
        }
        let node = g.node(n);
        let out_ty = node.outputs[0].clone();
        let ops = g.operands(n);
        let candidate: Option<Value> = match &node.op {
            Op::Binary(b) => {
                let (x, y) = (ops[0], ops[1]);
                match b {
                    BinaryOp::Mul if const_all(g, y, 1.0) => Some(x),
                    BinaryOp::Mul if const_all(g, x, 1.0) => Some(y),
                    BinaryOp::Add if const_all(g, y, 0.0) => Some(x),
                    BinaryOp::Add if const_all(g, x, 0.0) => Some(y),
                    BinaryOp::Sub if const_all(g, y, 0.0) => Some(x),
                    BinaryOp::Div | BinaryOp::Pow if const_all(g, y, 1.0) => Some(x),
                    _ => None,
                }
            }
            Op::Unary(UnaryOp::MulScalar(s)) | Op::Unary(UnaryOp::PowScalar(s)) if *s == 1.0 => {
                Some(ops[0])
            }
            Op::Unary(UnaryOp::AddScalar(s)) if *s == 0.0 => Some(ops[0]),
            Op::Unary(UnaryOp::Neg) => match g.node(ops[0].node).op {
                Op::Unary(UnaryOp::Neg) => Some(g.operands(ops[0].node)[0]),
                _ => None,
            },
            Op::Cast(_) => Some(ops[0]),
            _ => None,
        };
        if let Some(v) = candidate {
            if *g.value_type(v) == out_ty {
                forward_to(g, n, v);
                changed = true;
            }
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
    use crate::{verify, DType, InputKind, TensorType};

    #[test]
    fn removes_identities_but_not_broadcasts_or_promotions() {
        let mut g = Graph::new();
        let f = TensorType::new(&[3], DType::F32);
        let x = g.add_input(InputKind::User(0), f.clone(), "").unwrap();
        let one = g
            .add_constant(TensorType::new(&[], DType::F32), vec![1.0], "")
            .unwrap();
        let zero = g
            .add_constant(TensorType::new(&[3], DType::F32), vec![0.0; 3], "")
            .unwrap();
        let ones_b = g
            .add_constant(TensorType::new(&[2, 3], DType::F32), vec![1.0; 6], "")
            .unwrap();
        let one64 = g
            .add_constant(TensorType::new(&[3], DType::F64), vec![1.0; 3], "")
            .unwrap();
        let a = g.add1(Op::Binary(BinaryOp::Mul), &[one, x], "").unwrap();
        let b = g.add1(Op::Binary(BinaryOp::Add), &[a, zero], "").unwrap();
        let c = g.add1(Op::Binary(BinaryOp::Div), &[b, one], "").unwrap();
        let d = g.add1(Op::Unary(UnaryOp::Neg), &[c], "").unwrap();
        let e = g.add1(Op::Unary(UnaryOp::Neg), &[d], "").unwrap();
        let h = g
            .add1(Op::Unary(UnaryOp::MulScalar(1.0)), &[e], "")
            .unwrap();
        let i = g.add1(Op::Cast(DType::F32), &[h], "").unwrap();
        // Broadcasting to [2,3] and promoting to f64 are not no-ops.
        let bc = g.add1(Op::Binary(BinaryOp::Mul), &[i, ones_b], "").unwrap();
        let pr = g.add1(Op::Binary(BinaryOp::Mul), &[i, one64], "").unwrap();
        g.add_output(i, OutputKind::User).unwrap();
        g.add_output(bc, OutputKind::User).unwrap();
        g.add_output(pr, OutputKind::User).unwrap();
        assert!(simplify_algebra(&mut g).unwrap());
        verify(&g).unwrap();
        assert_eq!(g.outputs()[0].value, x);
        // x, ones_b, one64, the two muls
        assert_eq!(g.node_count(), 5, "{}", crate::printer::listing(&g));
        assert!(!simplify_algebra(&mut g).unwrap());
    }
}
