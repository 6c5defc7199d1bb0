//! `kiln bench`: median milliseconds per eval-mode forward of each zoo
//! model, timed the way `python/bench_peers.py` times PyTorch (3 warm-up
//! calls, then at least 10 calls and at least 1 s, median), so the two
//! tables can be put side by side from one run on one machine.

use crate::nn::ModuleExt;
use crate::{zoo, DType, Result, Tensor};
use std::time::Instant;

/// One timed model.
pub struct BenchRow {
    pub model: String,
    pub shape: Vec<usize>,
    /// Median ms per eager forward (no_grad, eval mode).
    pub eager_ms: f64,
    /// Median ms per forward of `jit::compile`d model, and how many of its
    /// kernels run as machine code.
    pub compiled_ms: f64,
    pub jit_kernels: usize,
}

/// Median ms of `f` after warm-up: at least `min_runs` calls and `min_time` s.
pub fn median_ms(mut f: impl FnMut() -> Result<()>, min_time: f64, min_runs: usize) -> Result<f64> {
    for _ in 0..3 {
        f()?;
    }
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < min_runs || start.elapsed().as_secs_f64() < min_time {
        let t = Instant::now();
        f()?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    Ok(times[times.len() / 2])
}

/// Times every model in `models` (all zoo models if empty) at the fixture
/// (latency) shapes, or the throughput shapes with `large`.
pub fn bench_eager(models: &[String], large: bool, min_time: f64) -> Result<Vec<BenchRow>> {
    let names: Vec<String> = if models.is_empty() {
        zoo::names().iter().map(|s| s.to_string()).collect()
    } else {
        models.to_vec()
    };
    let mut rows = Vec::new();
    for name in names {
        crate::manual_seed(0);
        let model = zoo::build(&name)?;
        model.eval();
        let (small, big) = zoo::shapes(&name)?;
        let shape = if large { big } else { small };
        let x = Tensor::randn(&shape, DType::F32);
        let ms = crate::no_grad(|| {
            median_ms(
                || {
                    std::hint::black_box(model.call(&x)?);
                    Ok(())
                },
                min_time,
                10,
            )
        })?;
        let compiled = crate::jit::compile(&model, &[x.clone()])?;
        let cms = crate::no_grad(|| {
            median_ms(
                || {
                    std::hint::black_box(compiled.forward(&[x.clone()])?);
                    Ok(())
                },
                min_time,
                10,
            )
        })?;
        rows.push(BenchRow {
            model: name,
            shape,
            eager_ms: ms,
            compiled_ms: cms,
            jit_kernels: compiled.jit_kernel_count(),
        });
    }
    Ok(rows)
}

/// The table `kiln bench` prints.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| model | input shape | kiln eager ms | kiln compiled ms | JIT kernels |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:?} | {:.3} | {:.3} | {} |\n",
            r.model, r.shape, r.eager_ms, r.compiled_ms, r.jit_kernels
        ));
    }
    s
}
