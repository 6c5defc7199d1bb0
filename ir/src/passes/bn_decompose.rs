//! Lowering an eval-mode BatchNorm that could not be folded into a conv or
//! addmm (it follows a ReLU or a pool, as in seed_cnn) into a per-channel
//! affine map:
//!   scale = gamma * rsqrt(running_var + eps)      ([C], gamma = 1 if absent)
//!   shift = beta - running_mean * scale           ([C], beta = 0 if absent)
//!   y     = x * scale[1,C,1..] + shift[1,C,1..]
//! The `[C]` nodes depend only on parameters and buffers (bound live by
//! name), so they form small kernels of their own and the per-element work
//! is one multiply-add that fuses into the producer's epilogue. Used by the
//! compiled backends (`compile_pipeline`); the reference pipeline keeps the
//! BatchNorm node so the interpreter runs eager's kernel.

use crate::graph::{Graph, Value};
use crate::op::Op;
use crate::types::Result;
use crate::{BinaryOp, UnaryOp};

pub fn decompose_batchnorm_eval(g: &mut Graph) -> Result<bool> {
    let mut changed = false;
    for bn in g.topo_order()? {
        let Op::BatchNorm {
            training: false,
            eps,
            has_weight,
            has_bias,
            has_running_stats: true,
            ..
        } = g.node(bn).op
        else {
            continue;
        };
        let ops = g.operands(bn);
        let x = ops[0];
        let xt = g.value_type(x).clone();
        if xt.shape.len() < 2 || ops.iter().any(|v| g.value_type(*v).dtype != xt.dtype) {
            continue;
        }
        let c = xt.shape[1];
        let (gamma, beta, mean, var) = super::bn_fold::bn_operands(&ops, has_weight, has_bias);
        let scope = g.node(bn).scope.clone();
        let s = scope.as_str();
        let bin =
            |g: &mut Graph, b: BinaryOp, l: Value, r: Value| g.add1(Op::Binary(b), &[l, r], s);
        let scale = super::bn_fold::bn_scale(g, var, gamma, eps, s)?;
        let ms = bin(g, BinaryOp::Mul, mean, scale)?;
        let shift = match beta {
            Some(bt) => bin(g, BinaryOp::Sub, bt, ms)?,
            None => g.add1(Op::Unary(UnaryOp::Neg), &[ms], s)?,
        };
        let mut shape = vec![1usize; xt.shape.len()];
        shape[1] = c;
        let scale_r = g.add1(
            Op::Reshape {
                shape: shape.clone(),
            },
            &[scale],
            s,
        )?;
        let shift_r = g.add1(Op::Reshape { shape }, &[shift], s)?;
        let y = bin(g, BinaryOp::Mul, x, scale_r)?;
        let y = bin(g, BinaryOp::Add, y, shift_r)?;
        g.replace_all_uses(Value::new(bn, 0), y);
        g.remove_node(bn);
        changed = true;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::eval_graph;
    use crate::test_graphs::*;
    use crate::verify;

    #[test]
    fn decomposed_batchnorm_matches_the_node() {
        // [N,C,H,W] after a conv, and [N,C] after a linear.
        for g0 in [conv_bn_net(true), linear_bn_net()] {
            let mut g = g0.clone();
            assert!(decompose_batchnorm_eval(&mut g).unwrap());
            verify(&g).unwrap();
            assert!(g
                .node_ids()
                .iter()
                .all(|&n| g.node(n).op.name() != "batch_norm"));
            let bind = random_binding(&g0, 3);
            let a = eval_graph(&g0, &bind).unwrap();
            let b = eval_graph(&g, &bind).unwrap();
            assert_close(&a[0].data, &b[0].data, 1e-5);
        }
    }
}
