//! Graph passes, each a plain function `fn(&mut Graph) -> Result<bool>`
//! (true when it changed the graph), and a pass manager that runs a list of
//! them, verifies the graph after each (always in debug builds, on request
//! in release) and names the failing pass.

use crate::graph::{verify, Graph, Value};
use crate::types::{IrError, Result};

mod algebra;
mod bn_decompose;
mod bn_fold;
mod const_fold;
mod cse;
mod dce;
mod div_broadcast;
mod linear_nd;
mod views;

pub use algebra::simplify_algebra;
pub use bn_decompose::decompose_batchnorm_eval;
pub use bn_fold::fold_batchnorm;
pub use const_fold::{constant_fold, FOLD_MAX_ELEMENTS};
pub use cse::cse;
pub use dce::dce;
pub use div_broadcast::reciprocal_of_broadcast_divisor;
pub use linear_nd::unflatten_linear;
pub use views::simplify_views;

pub type PassFn = fn(&mut Graph) -> Result<bool>;

/// What one pass did during a pipeline run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PassStat {
    pub pass: &'static str,
    pub changed: bool,
    pub nodes_before: usize,
    pub nodes_after: usize,
}

#[derive(Clone)]
pub struct PassManager {
    passes: Vec<(&'static str, PassFn)>,
    verify_each: bool,
}

impl Default for PassManager {
    fn default() -> Self {
        PassManager::new()
    }
}

impl PassManager {
    /// An empty pipeline; verification after each pass is on in debug builds.
    pub fn new() -> PassManager {
        PassManager {
            passes: Vec::new(),
            verify_each: cfg!(debug_assertions),
        }
    }

    /// The standard pipeline: simplify, fold, fold BatchNorm, CSE, DCE.
    pub fn standard() -> PassManager {
        let mut pm = PassManager::new();
        pm.add("simplify_algebra", simplify_algebra)
            .add("simplify_views", simplify_views)
            .add("constant_fold", constant_fold)
            .add("fold_batchnorm", fold_batchnorm)
            .add("cse", cse)
            .add("dce", dce);
        pm
    }

    /// The pipeline of the compiled backends: `standard`, then eval-mode
    /// BatchNorms that did not fold become a per-channel multiply-add
    /// (`decompose_batchnorm_eval`) and linear layers on inputs of rank > 2
    /// a batched matmul plus bias (`unflatten_linear`: what follows fuses
    /// into the gemm's epilogue), divisions by a broadcast divisor a
    /// multiply by its reciprocal (`reciprocal_of_broadcast_divisor`),
    /// cleaned up by CSE and DCE.
    pub fn compile_pipeline() -> PassManager {
        let mut pm = PassManager::standard();
        pm.add("decompose_batchnorm_eval", decompose_batchnorm_eval)
            .add("unflatten_linear", unflatten_linear)
            .add(
                "reciprocal_of_broadcast_divisor",
                reciprocal_of_broadcast_divisor,
            )
            .add("cse", cse)
            .add("dce", dce);
        pm
    }

    pub fn add(&mut self, name: &'static str, pass: PassFn) -> &mut PassManager {
        self.passes.push((name, pass));
        self
    }

    /// Verify after every pass (also in release builds) or never.
    pub fn verify_each(&mut self, on: bool) -> &mut PassManager {
        self.verify_each = on;
        self
    }

    pub fn pass_names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|(n, _)| *n).collect()
    }

    /// Run every pass once, in order.
    pub fn run(&self, g: &mut Graph) -> Result<Vec<PassStat>> {
        let mut stats = Vec::new();
        for &(name, pass) in &self.passes {
            let before = g.node_count();
            let changed = pass(g).map_err(|e| IrError::Pass {
                pass: name.to_string(),
                source: Box::new(e),
            })?;
            if self.verify_each {
                verify(g).map_err(|e| IrError::Pass {
                    pass: name.to_string(),
                    source: Box::new(e),
                })?;
            }
            stats.push(PassStat {
                pass: name,
                changed,
                nodes_before: before,
                nodes_after: g.node_count(),
            });
        }
        Ok(stats)
    }

    /// Run the pipeline until no pass changes the graph (at most `max_rounds`).
    pub fn run_to_fixpoint(&self, g: &mut Graph, max_rounds: usize) -> Result<Vec<PassStat>> {
        let mut all = Vec::new();
        for _ in 0..max_rounds {
            let stats = self.run(g)?;
            let changed = stats.iter().any(|s| s.changed);
            all.extend(stats);
            if !changed {
                break;
            }
        }
        Ok(all)
    }
}

/// Replace node `n` (single-output) by value `v` everywhere, then remove it.
pub(crate) fn forward_to(g: &mut Graph, n: crate::NodeId, v: Value) {
    for o in 0..g.node(n).outputs.len() {
        g.replace_all_uses(Value::new(n, o), v);
    }
    g.remove_node(n);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_graphs::*;

    fn broken(g: &mut Graph) -> Result<bool> {
        // Change a node's recorded type so that the graph no longer verifies.
        let n = g
            .node_ids()
            .into_iter()
            .find(|&n| g.node(n).op.name() == "relu")
            .unwrap();
        g.node_mut(n).outputs[0].shape.push(1);
        Ok(true)
    }

    #[test]
    fn pass_manager_names_the_failing_pass() {
        let mut g = simple_net();
        let mut pm = PassManager::new();
        pm.verify_each(true).add("dce", dce).add("breaker", broken);
        let e = pm.run(&mut g).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("pass `breaker` failed: graph verification failed: node %"),
            "{msg}"
        );
        assert!(msg.contains("relu"), "{msg}");
    }

    #[test]
    fn standard_pipeline_reaches_a_fixpoint_and_verifies() {
        for (name, mut g) in all_test_graphs() {
            let mut pm = PassManager::standard();
            pm.verify_each(true);
            let stats = pm.run_to_fixpoint(&mut g, 5).unwrap();
            assert!(!stats.is_empty(), "{name}");
            verify(&g).unwrap();
            let again = pm.run(&mut g).unwrap();
            assert!(
                again.iter().all(|s| !s.changed),
                "{name} not at fixpoint: {again:?}"
            );
        }
    }
}

/// Property tests: every pass, and the whole pipeline, keeps the outputs of
/// every zoo-shaped graph on random inputs (f64 reference evaluator).
#[cfg(test)]
mod property_tests {
    use super::*;
    use crate::eval::eval_graph;
    use crate::test_graphs::*;

    fn check(name: &str, g0: &Graph, g: &Graph) {
        for seed in 0..2 {
            let bind = random_binding(g0, seed);
            let a = eval_graph(g0, &bind).unwrap();
            let b = eval_graph(g, &bind).unwrap();
            assert_eq!(a.len(), b.len(), "{name}");
            for (x, y) in a.iter().zip(&b) {
                assert_eq!(x.ty, y.ty, "{name}");
                assert_close(&x.data, &y.data, 1e-5);
            }
        }
    }

    #[test]
    fn passes_keep_outputs_on_random_inputs() {
        let passes: [(&str, PassFn); 6] = [
            ("simplify_algebra", simplify_algebra),
            ("simplify_views", simplify_views),
            ("constant_fold", constant_fold),
            ("fold_batchnorm", fold_batchnorm),
            ("cse", cse),
            ("dce", dce),
        ];
        for (name, g0) in all_test_graphs() {
            if name.ends_with("_train") {
                continue; // dropout is random; the interpreter tests it later
            }
            for (pname, pass) in passes {
                let mut g = g0.clone();
                if !pass(&mut g).unwrap() {
                    continue; // unchanged
                }
                verify(&g).unwrap();
                check(&format!("{name}/{pname}"), &g0, &g);
            }
            let mut g = g0.clone();
            PassManager::standard().run_to_fixpoint(&mut g, 5).unwrap();
            check(&format!("{name}/pipeline"), &g0, &g);
        }
    }

    #[test]
    fn pipeline_node_counts() {
        // (graph, nodes before, nodes after the standard pipeline)
        let got: Vec<(&str, usize, usize)> = all_test_graphs()
            .into_iter()
            .map(|(name, mut g)| {
                let before = g.node_count();
                PassManager::standard().run_to_fixpoint(&mut g, 5).unwrap();
                (name, before, g.node_count())
            })
            .collect();
        // The zoo-shaped traces are already clean: the pipeline only folds
        // eval BatchNorms into the conv/linear before them, which adds the
        // per-channel nodes computing w' and b' from the live parameters
        // (conv_bn: +9 -2; linear_bn: +8 -2) and removes the per-element
        // batch_norm from the hot path.
        assert_eq!(
            got,
            vec![
                ("simple_net", 10, 10),
                ("seed_cnn_eval", 43, 43),
                ("seed_cnn_train", 47, 47),
                ("conv_bn_eval", 10, 17),
                ("net_with_dropout_eval", 16, 22),
                ("net_with_dropout_train", 18, 18),
                ("complex_net", 14, 14),
                ("transformer_block", 42, 42),
                ("pointwise_chain", 22, 22),
                ("mean_sub_prologue", 8, 8),
            ]
        );
    }

    #[test]
    fn pipeline_cleans_up_a_noisy_graph() {
        use crate::{BinaryOp, DType, InputKind, Op, TensorType, UnaryOp};
        // x*1 + 0, transposed twice, a duplicated exp, a constant subexpression.
        let mut g = Graph::new();
        let x = g
            .add_input(InputKind::User(0), TensorType::new(&[3, 4], DType::F32), "")
            .unwrap();
        let one = g
            .add_constant(TensorType::new(&[], DType::F32), vec![1.0], "")
            .unwrap();
        let two = g
            .add_constant(TensorType::new(&[], DType::F32), vec![2.0], "")
            .unwrap();
        let c = g.add1(Op::Binary(BinaryOp::Add), &[one, two], "").unwrap();
        let a = g.add1(Op::Binary(BinaryOp::Mul), &[x, one], "").unwrap();
        let t1 = g.add1(Op::Permute { dims: vec![1, 0] }, &[a], "").unwrap();
        let t2 = g.add1(Op::Permute { dims: vec![1, 0] }, &[t1], "").unwrap();
        let e1 = g.add1(Op::Unary(UnaryOp::Exp), &[t2], "").unwrap();
        let e2 = g.add1(Op::Unary(UnaryOp::Exp), &[x], "").unwrap();
        let s = g.add1(Op::Binary(BinaryOp::Add), &[e1, e2], "").unwrap();
        let y = g.add1(Op::Binary(BinaryOp::Mul), &[s, c], "").unwrap();
        g.add_output(y, crate::OutputKind::User).unwrap();
        let g0 = g.clone();
        let mut pm = PassManager::standard();
        pm.verify_each(true);
        pm.run_to_fixpoint(&mut g, 5).unwrap();
        assert_eq!(
            crate::printer::listing(&g),
            "%0 = input index=0 : f32[3,4]\n\
             %1 = constant data=[3.0] : f32[]\n\
             %2 = exp(%0) : f32[3,4]\n\
             %3 = add(%2, %2) : f32[3,4]\n\
             %4 = mul(%3, %1) : f32[3,4]\n\
             return %4\n"
        );
        check("noisy", &g0, &g);
    }
}
