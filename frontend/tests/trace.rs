//! The tracer: graphs recorded from module forwards, with scopes, params
//! and buffers bound by name, buffer updates as outputs, warnings for host
//! reads, and clear failures for what cannot be traced.

use kiln_frontend::nn::functional as F;
use kiln_frontend::nn::prelude::*;
use kiln_frontend::nn::ReLU;
use kiln_frontend::trace::trace_module;
use kiln_frontend::{DType, Result, Tensor};
use kiln_ir::{printer, InputKind, Op, OutputKind};
use std::sync::Arc;

struct Affine {
    core: ModuleCore,
}

impl Affine {
    fn new(i: usize, o: usize) -> Arc<Affine> {
        let core = ModuleCore::new("Affine");
        core.register_parameter(
            "w",
            Some(
                Tensor::randn(&[i, o], DType::F32)
                    .requires_grad_(true)
                    .unwrap(),
            ),
        )
        .unwrap();
        core.register_parameter(
            "b",
            Some(
                Tensor::zeros(&[o], DType::F32)
                    .requires_grad_(true)
                    .unwrap(),
            ),
        )
        .unwrap();
        Arc::new(Affine { core })
    }
}

impl Module for Affine {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        x.matmul(&self.core.param("w")?)?
            .add(&self.core.param("b")?)
    }
}

struct Net {
    core: ModuleCore,
}

impl Module for Net {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.core.child("fc1")?.call(x)?;
        let h = self.core.child("act")?.call(&h)?;
        self.core.child("fc2")?.call(&h)
    }
}

fn net() -> Arc<Net> {
    let core = ModuleCore::new("Net");
    core.add_module("fc1", Some(Affine::new(4, 8))).unwrap();
    core.add_module("act", Some(Arc::new(ReLU::new()))).unwrap();
    core.add_module("fc2", Some(Affine::new(8, 2))).unwrap();
    Arc::new(Net { core })
}

#[test]
fn records_ops_with_scopes_and_named_params() {
    kiln_frontend::manual_seed(0);
    let m = net();
    let x = Tensor::randn(&[3, 4], DType::F32);
    let t = trace_module(&*m, &x).unwrap();
    let g = &t.graph;
    let listing = printer::listing(g);
    let names: Vec<String> = g
        .inputs()
        .iter()
        .filter_map(|&n| match &g.node(n).op {
            Op::Input {
                kind: InputKind::Param(p),
                ..
            } => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(names, vec!["fc1.w", "fc1.b", "fc2.w", "fc2.b"], "{listing}");
    assert!(listing.contains("Net/Affine[fc1]"), "{listing}");
    assert!(listing.contains("Net/ReLU[act]"), "{listing}");
    let counts: Vec<(&str, usize)> = g.op_counts();
    let count = |name: &str| {
        counts
            .iter()
            .find(|(n, _)| *n == name)
            .map(|c| c.1)
            .unwrap_or(0)
    };
    assert_eq!(count("matmul"), 2, "{listing}");
    assert_eq!(count("relu"), 1, "{listing}");
    assert!(t.warnings.is_empty());
    assert_eq!(t.outputs[0].to_vec_f32(), m.call(&x).unwrap().to_vec_f32());
}

/// A module that updates buffers in training, both in place (batch_norm's
/// running stats, a counter) and by reassignment (as MyBatchNorm1d does).
struct Stats {
    core: ModuleCore,
}

impl Module for Stats {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.core;
        let y = F_batch_norm(x, &c.buffer("rm")?, &c.buffer("rv")?, self.is_training())?;
        if self.is_training() {
            c.buffer("count")?.add_(&Tensor::scalar(1i64))?;
            let m = x.mean_dims(&[0], false)?.detach();
            c.set_buffer(
                "avg",
                Some(c.buffer("avg")?.mul_scalar(0.9)?.add(&m.mul_scalar(0.1)?)?),
            )?;
        }
        Ok(y)
    }
}

#[allow(non_snake_case)]
fn F_batch_norm(x: &Tensor, rm: &Tensor, rv: &Tensor, training: bool) -> Result<Tensor> {
    kiln_frontend::ops::nn::batch_norm(x, Some(rm), Some(rv), None, None, training, 0.1, 1e-5)
}

#[test]
fn training_trace_outputs_buffer_updates() {
    let core = ModuleCore::new("Stats");
    core.register_buffer("rm", Some(Tensor::zeros(&[3], DType::F32)), true)
        .unwrap();
    core.register_buffer("rv", Some(Tensor::ones(&[3], DType::F32)), true)
        .unwrap();
    core.register_buffer("count", Some(Tensor::scalar(0i64)), true)
        .unwrap();
    core.register_buffer("avg", Some(Tensor::zeros(&[3], DType::F32)), true)
        .unwrap();
    let m = Stats { core };
    let x = Tensor::randn(&[5, 3], DType::F32);
    let t = trace_module(&m, &x).unwrap();
    let updates: Vec<String> = t
        .graph
        .outputs()
        .iter()
        .filter_map(|o| match &o.kind {
            OutputKind::BufferUpdate(n) => Some(n.clone()),
            OutputKind::User => None,
        })
        .collect();
    assert_eq!(
        updates,
        vec!["rm", "rv", "count", "avg"],
        "{}",
        printer::listing(&t.graph)
    );
    // Eval mode: no updates.
    m.eval();
    let t = trace_module(&m, &x).unwrap();
    assert_eq!(t.graph.outputs().len(), 1);
}

struct Branchy {
    core: ModuleCore,
}

impl Module for Branchy {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.sum()?.item()? > 0.0 {
            x.relu()
        } else {
            x.neg()
        }
    }
}

#[test]
fn host_reads_warn_with_the_scope() {
    let m = Branchy {
        core: ModuleCore::new("Branchy"),
    };
    let t = trace_module(&m, &Tensor::ones(&[2], DType::F32)).unwrap();
    assert_eq!(t.warnings.len(), 1);
    assert!(
        t.warnings[0].contains("item") && t.warnings[0].contains("Branchy"),
        "{:?}",
        t.warnings
    );
}

struct Untraceable {
    core: ModuleCore,
}

impl Module for Untraceable {
    fn core(&self) -> &ModuleCore {
        &self.core
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // index_add has no graph op: its result must not become a constant.
        let idx = Tensor::from_vec(vec![0i64], &[1])?;
        let y = x.index_add(0, &idx, &x.narrow(0, 0, 1)?)?;
        y.mul_scalar(2.0)
    }
}

#[test]
fn values_from_untraceable_ops_fail_the_trace() {
    let m = Untraceable {
        core: ModuleCore::new("Untraceable"),
    };
    let err = trace_module(&m, &Tensor::ones(&[3, 2], DType::F32))
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("cannot record"), "{err}");
    let _ = F::Reduction::Mean;
}
