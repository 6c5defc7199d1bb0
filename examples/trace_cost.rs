//! Tracing cost and graph sizes per zoo model: trace time, pass-pipeline
//! time, node counts before and after the passes and the number of compute
//! kernels after fusion, in eval and training mode (median of 20 traces).
//!
//! Run: `cargo run --release --example trace_cost`

use kiln::nn::prelude::*;
use kiln::{jit, zoo, DType, Tensor};
use std::time::Instant;

fn main() -> kiln::Result<()> {
    println!("| model | mode | trace ms | passes ms | nodes before | nodes after | kernels |");
    println!("|---|---|---|---|---|---|---|");
    for &name in zoo::names() {
        for train in [false, true] {
            let m = zoo::build(name)?;
            m.train(train);
            kiln::verify::disable_dropout(&*m)?;
            let (shape, _) = zoo::shapes(name)?;
            let x = Tensor::randn(&shape, DType::F32);
            let mut trace_ms = Vec::new();
            let mut pass_ms = Vec::new();
            let mut sizes = (0, 0, 0);
            for _ in 0..20 {
                let t0 = Instant::now();
                let mut tm = jit::trace(&m, &[x.clone()])?;
                trace_ms.push(t0.elapsed().as_secs_f64() * 1e3);
                let before = tm.graph().node_count();
                let t1 = Instant::now();
                tm.run_passes()?;
                let plan = tm.fusion_plan()?;
                pass_ms.push(t1.elapsed().as_secs_f64() * 1e3);
                sizes = (before, tm.graph().node_count(), plan.compute_kernel_count());
            }
            trace_ms.sort_by(f64::total_cmp);
            pass_ms.sort_by(f64::total_cmp);
            println!(
                "| {name} | {} | {:.2} | {:.2} | {} | {} | {} |",
                if train { "train" } else { "eval" },
                trace_ms[10],
                pass_ms[10],
                sizes.0,
                sizes.1,
                sizes.2
            );
        }
    }
    Ok(())
}
