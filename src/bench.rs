//! `kiln bench`: median milliseconds per eval-mode forward of each zoo
//! model, eager and compiled side by side in one run, plus the compile time
//! (trace + passes + codegen), timed the way `python/bench_peers.py` times
//! PyTorch (3 warm-up calls, then at least 10 calls and at least 1 s,
//! median), so the tables can be put side by side from one run on one
//! machine.

use crate::nn::ModuleExt;
use crate::{zoo, DType, Result, Tensor};
use std::time::Instant;

/// What the "compiled" column runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Eager only (no compiled column).
    Eager,
    /// The traced graph on the reference interpreter (`TracedModule`).
    Interp,
    /// `jit::compile`: the compiled CPU program.
    Cpu,
}

impl std::str::FromStr for Backend {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Backend, String> {
        match s {
            "eager" => Ok(Backend::Eager),
            "interp" => Ok(Backend::Interp),
            "cpu" => Ok(Backend::Cpu),
            other => Err(format!(
                "unknown backend `{other}` (known: eager, interp, cpu)"
            )),
        }
    }
}

/// One timed model.
pub struct BenchRow {
    pub model: String,
    pub shape: Vec<usize>,
    /// Median ms per eager forward (no_grad, eval mode).
    pub eager_ms: f64,
    /// Median ms per forward of the compiled model (None with `Eager`).
    pub compiled_ms: Option<f64>,
    /// Trace + passes + codegen ms (None with `Eager`).
    pub compile_ms: Option<f64>,
    /// Kernels run as machine code, and nodes on the fallback path.
    pub jit_kernels: usize,
    pub fallbacks: usize,
}

impl BenchRow {
    /// eager / compiled.
    pub fn speedup(&self) -> Option<f64> {
        self.compiled_ms.map(|c| self.eager_ms / c)
    }
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
/// (latency) shapes, or the throughput shapes with `large`: eager, and the
/// `backend`'s compiled form.
pub fn bench(
    models: &[String],
    large: bool,
    backend: Backend,
    min_time: f64,
) -> Result<Vec<BenchRow>> {
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
        let time =
            |f: &mut dyn FnMut() -> Result<()>| crate::no_grad(|| median_ms(f, min_time, 10));
        let eager_ms = time(&mut || {
            std::hint::black_box(model.call(&x)?);
            Ok(())
        })?;
        let (mut compiled_ms, mut compile_ms, mut jit_kernels, mut fallbacks) = (None, None, 0, 0);
        match backend {
            Backend::Eager => {}
            Backend::Interp => {
                let t0 = Instant::now();
                let mut traced = crate::jit::trace(&model, std::slice::from_ref(&x))?;
                traced.run_passes()?;
                compile_ms = Some(t0.elapsed().as_secs_f64() * 1e3);
                compiled_ms = Some(time(&mut || {
                    std::hint::black_box(traced.forward(std::slice::from_ref(&x))?);
                    Ok(())
                })?);
            }
            Backend::Cpu => {
                let compiled = crate::jit::compile(&model, std::slice::from_ref(&x))?;
                compile_ms = Some(compiled.compile_ms());
                jit_kernels = compiled.jit_kernel_count();
                fallbacks = compiled.fallbacks().len();
                compiled_ms = Some(time(&mut || {
                    std::hint::black_box(compiled.forward(std::slice::from_ref(&x))?);
                    Ok(())
                })?);
            }
        }
        rows.push(BenchRow {
            model: name,
            shape,
            eager_ms,
            compiled_ms,
            compile_ms,
            jit_kernels,
            fallbacks,
        });
    }
    Ok(rows)
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("-".into(), |v| format!("{v:.digits$}"))
}

/// The table `kiln bench` prints.
pub fn format_table(rows: &[BenchRow]) -> String {
    let mut s = String::from(
        "| model | input shape | eager ms | compiled ms | speedup | compile ms | JIT kernels | fallback nodes |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:?} | {:.3} | {} | {} | {} | {} | {} |\n",
            r.model,
            r.shape,
            r.eager_ms,
            opt(r.compiled_ms, 3),
            r.speedup().map_or("-".into(), |v| format!("{v:.2}x")),
            opt(r.compile_ms, 1),
            r.jit_kernels,
            r.fallbacks
        ));
    }
    s
}

/// `{"MODEL": {"eager_ms": .., "compiled_ms": .., "compile_ms": ..}, ...}`
/// (null where a figure was not taken), as `--json FILE` writes it.
pub fn to_json(rows: &[BenchRow]) -> serde_json::Value {
    let mut m = serde_json::Map::new();
    for r in rows {
        m.insert(
            r.model.clone(),
            serde_json::json!({
                "shape": r.shape,
                "eager_ms": r.eager_ms,
                "compiled_ms": r.compiled_ms,
                "compile_ms": r.compile_ms,
            }),
        );
    }
    serde_json::Value::Object(m)
}
