//! `kiln bench --train`: median milliseconds per training step (zero_grad,
//! forward, MSE loss, backward, SGD step with momentum 0.9) of each zoo
//! model in training mode, eager kiln against compiled kiln
//! (`jit::compile_training` with the fused SGD step), timed as `kiln bench`
//! and `python/bench_peers.py --train` time them.

use crate::bench::median_ms;
use crate::nn::functional::{mse_loss, Reduction};
use crate::nn::ModuleExt;
use crate::optim::{Optimizer, SgdOptions, SGD};
use crate::{zoo, DType, Result, Tensor};

/// One timed model.
pub struct TrainRow {
    pub model: String,
    pub shape: Vec<usize>,
    /// Median ms per eager training step.
    pub eager_ms: f64,
    /// Median ms per compiled training step.
    pub compiled_ms: f64,
    /// Values the compiled forward saves for the backward.
    pub saved: usize,
}

fn sgd(model: &dyn crate::nn::Module, fused: bool) -> Result<SGD> {
    let mut o = SGD::new(
        model.parameters(),
        SgdOptions {
            lr: 1e-3,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    o.set_fused(fused);
    Ok(o)
}

/// Times a training step of every model in `models` (all if empty) at the
/// fixture shapes, or the throughput shapes with `large`.
pub fn bench_train(models: &[String], large: bool, min_time: f64) -> Result<Vec<TrainRow>> {
    let names: Vec<String> = if models.is_empty() {
        zoo::names().iter().map(|s| s.to_string()).collect()
    } else {
        models.to_vec()
    };
    let mut rows = Vec::new();
    for name in names {
        crate::manual_seed(0);
        let model = zoo::build(&name)?;
        model.train(true);
        let (small, big) = zoo::shapes(&name)?;
        let shape = if large { big } else { small };
        let x = Tensor::randn(&shape, DType::F32);
        let y0 = crate::no_grad(|| model.call(&x))?;
        let target = Tensor::randn(&y0.shape(), DType::F32);
        let mut opt = sgd(&*model, false)?;
        let eager_ms = median_ms(
            || {
                opt.zero_grad(true)?;
                let loss = mse_loss(&model.call(&x)?, &target, Reduction::Mean)?;
                loss.backward()?;
                opt.step()?;
                Ok(())
            },
            min_time,
            10,
        )?;
        let loss_fn: crate::jit::LossFn = Box::new(|y, t| mse_loss(y, t, Reduction::Mean));
        let mut step =
            crate::jit::compile_training(&model, loss_fn, Box::new(sgd(&*model, true)?), &x)?;
        let saved = step.model().variant(std::slice::from_ref(&x))?.num_saved();
        let compiled_ms = median_ms(
            || {
                std::hint::black_box(step.step(&x, &target)?);
                Ok(())
            },
            min_time,
            10,
        )?;
        rows.push(TrainRow {
            model: name,
            shape,
            eager_ms,
            compiled_ms,
            saved,
        });
    }
    Ok(rows)
}

/// The table `kiln bench --train` prints.
pub fn format_train_table(rows: &[TrainRow]) -> String {
    let mut s = String::from(
        "| model | input shape | kiln eager train-step ms | kiln compiled train-step ms | saved values |\n|---|---|---|---|---|\n",
    );
    for r in rows {
        s.push_str(&format!(
            "| {} | {:?} | {:.3} | {:.3} | {} |\n",
            r.model, r.shape, r.eager_ms, r.compiled_ms, r.saved
        ));
    }
    s
}
