//! Folding an eval-mode BatchNorm into the conv2d or addmm (linear) right
//! before it, when the BatchNorm is the only user of that output (nothing
//! non-linear, no zero padding in between).
//!
//! Parameters are bound by name and live (an optimizer step or
//! load_state_dict changes them without retracing), so the folded weight and
//! bias are not baked-in numbers: they are new nodes computing, from the
//! parameter and buffer inputs,
//!   scale = gamma * rsqrt(running_var + eps)          (gamma = 1 if absent)
//!   w'    = w * scale (per output channel)
//!   b'    = (b - running_mean) * scale + beta         (b, beta = 0 if absent)
//! and the conv/addmm then uses w' and b'. These nodes depend only on
//! parameters: the runtime may compute them once per set of parameter
//! versions. For addmm (F.linear traced as addmm(b, x, w.t())) the scale
//! multiplies the columns of mat2 (the output features).

use crate::graph::{Graph, Value};
use crate::op::Op;
use crate::types::Result;
use crate::{BinaryOp, UnaryOp};

/// The operands of an eval-mode BatchNorm node with running stats:
/// (gamma, beta, running_mean, running_var).
pub(crate) fn bn_operands(
    ops: &[Value],
    has_weight: bool,
    has_bias: bool,
) -> (Option<Value>, Option<Value>, Value, Value) {
    let mut k = 1;
    let gamma = has_weight.then(|| {
        k += 1;
        ops[k - 1]
    });
    let beta = has_bias.then(|| {
        k += 1;
        ops[k - 1]
    });
    (gamma, beta, ops[k], ops[k + 1])
}

/// `gamma * rsqrt(running_var + eps)` as new nodes (gamma = 1 if absent).
pub(crate) fn bn_scale(
    g: &mut Graph,
    var: Value,
    gamma: Option<Value>,
    eps: f64,
    scope: &str,
) -> Result<Value> {
    let ve = g.add1(Op::Unary(UnaryOp::AddScalar(eps)), &[var], scope)?;
    let scale = g.add1(Op::Unary(UnaryOp::Rsqrt), &[ve], scope)?;
    match gamma {
        Some(gm) => g.add1(Op::Binary(BinaryOp::Mul), &[gm, scale], scope),
        None => Ok(scale),
    }
}

pub fn fold_batchnorm(g: &mut Graph) -> Result<bool> {
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
        let bn_ops = g.operands(bn);
        let x = bn_ops[0];
        let prod = x.node;
        let is_conv = matches!(g.node(prod).op, Op::Conv2d { .. });
        if !(is_conv || matches!(g.node(prod).op, Op::Addmm)) || g.use_count(x) != 1 {
            continue;
        }
        // Everything must share one dtype, or w' would change type.
        let dtype = g.value_type(x).dtype;
        let prod_ops = g.operands(prod);
        if bn_ops
            .iter()
            .chain(&prod_ops)
            .any(|v| g.value_type(*v).dtype != dtype)
        {
            continue;
        }
        let (gamma, beta, mean, var) = bn_operands(&bn_ops, has_weight, has_bias);
        let scope = g.node(bn).scope.clone();
        let s = scope.as_str();
        let bin =
            |g: &mut Graph, b: BinaryOp, l: Value, r: Value| g.add1(Op::Binary(b), &[l, r], s);
        let scale = bn_scale(g, var, gamma, eps, s)?;
        let old_bias = if is_conv {
            prod_ops.get(2).copied()
        } else {
            Some(prod_ops[0])
        };
        let mut shift = match old_bias {
            Some(b) => bin(g, BinaryOp::Sub, b, mean)?,
            None => g.add1(Op::Unary(UnaryOp::Neg), &[mean], s)?,
        };
        shift = bin(g, BinaryOp::Mul, shift, scale)?;
        if let Some(bt) = beta {
            shift = bin(g, BinaryOp::Add, shift, bt)?;
        }
        let prod_node = g.node(prod).clone();
        let new_out = if is_conv {
            let w = prod_ops[1];
            let o = g.value_type(w).shape[0];
            let scale_r = g.add1(
                Op::Reshape {
                    shape: vec![o, 1, 1, 1],
                },
                &[scale],
                s,
            )?;
            let w2 = bin(g, BinaryOp::Mul, w, scale_r)?;
            g.add1(prod_node.op, &[prod_ops[0], w2, shift], &prod_node.scope)?
        } else {
            let m2 = bin(g, BinaryOp::Mul, prod_ops[2], scale)?;
            g.add1(Op::Addmm, &[shift, prod_ops[1], m2], &prod_node.scope)?
        };
        g.replace_all_uses(Value::new(bn, 0), new_out);
        g.remove_node(bn);
        g.remove_node(prod);
        changed = true;
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eval::eval_graph;
    use crate::test_graphs::*;
    use crate::{verify, InputKind};

    fn count(g: &Graph, name: &str) -> usize {
        g.node_ids()
            .iter()
            .filter(|&&n| g.node(n).op.name() == name)
            .count()
    }

    #[test]
    fn folds_conv_bn_and_keeps_outputs() {
        let g0 = conv_bn_net(true);
        let mut g = g0.clone();
        assert!(fold_batchnorm(&mut g).unwrap());
        verify(&g).unwrap();
        assert_eq!(count(&g, "batch_norm"), 0);
        assert_eq!(count(&g, "conv2d"), 1);
        // Params stay bound by name: the folded weight is computed from them.
        assert!(g
            .find_input(&InputKind::Param("bn.weight".into()))
            .is_some());
        let bind = random_binding(&g0, 7);
        let a = eval_graph(&g0, &bind).unwrap();
        let b = eval_graph(&g, &bind).unwrap();
        assert_close(&a[0].data, &b[0].data, 1e-5);
        // With other parameter values (an optimizer step), still equal.
        let bind2 = random_binding(&g0, 8);
        assert_close(
            &eval_graph(&g0, &bind2).unwrap()[0].data,
            &eval_graph(&g, &bind2).unwrap()[0].data,
            1e-5,
        );
    }

    #[test]
    fn folds_linear_bn_but_not_through_relu_or_shared_outputs() {
        let g0 = linear_bn_net();
        let mut g = g0.clone();
        assert!(fold_batchnorm(&mut g).unwrap());
        verify(&g).unwrap();
        assert_eq!(count(&g, "batch_norm"), 0);
        let bind = random_binding(&g0, 3);
        assert_close(
            &eval_graph(&g0, &bind).unwrap()[0].data,
            &eval_graph(&g, &bind).unwrap()[0].data,
            1e-5,
        );
        // seed_cnn: every BatchNorm follows a ReLU: nothing to fold.
        let mut s = seed_cnn(false);
        assert!(!fold_batchnorm(&mut s).unwrap());
        // Conv output also returned: no fold.
        let mut g2 = conv_bn_net(true);
        let conv = g2
            .node_ids()
            .into_iter()
            .find(|&n| g2.node(n).op.name() == "conv2d")
            .unwrap();
        g2.add_output(Value::new(conv, 0), crate::OutputKind::User)
            .unwrap();
        assert!(!fold_batchnorm(&mut g2).unwrap());
        // Training-mode BatchNorm is never folded.
        let mut g3 = conv_bn_net(false);
        assert!(!fold_batchnorm(&mut g3).unwrap());
    }
}
