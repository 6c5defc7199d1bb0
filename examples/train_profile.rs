//! Runs only the compiled training step of one zoo model at its throughput
//! shape in a loop (for a profiler: `perf record -g`), then prints the
//! median step time.
//!
//! `cargo run --release --example train_profile [model] [steps]`
//! (default: seed_cnn 50)

use kiln::nn::functional::{mse_loss, Reduction};
use kiln::nn::prelude::*;
use kiln::optim::{SgdOptions, SGD};
use kiln::{DType, Tensor};

fn main() -> kiln::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let name = args.first().cloned().unwrap_or_else(|| "seed_cnn".into());
    let steps: usize = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(50);
    kiln::manual_seed(0);
    let m = kiln::zoo::build(&name)?;
    m.train(true);
    let (_, shape) = kiln::zoo::shapes(&name)?;
    let x = Tensor::randn(&shape, DType::F32);
    let target = Tensor::randn(&kiln::no_grad(|| m.call(&x))?.shape(), DType::F32);
    let mut opt = SGD::new(
        m.parameters(),
        SgdOptions {
            lr: 1e-3,
            momentum: 0.9,
            ..Default::default()
        },
    )?;
    opt.set_fused(true);
    let loss_fn: kiln::jit::LossFn = Box::new(|y, t| mse_loss(y, t, Reduction::Mean));
    let mut step = kiln::jit::compile_training(&m, loss_fn, Box::new(opt), &x)
        .map_err(|e| kiln::Error::op("compile_training", e.to_string()))?;
    let mut times = Vec::with_capacity(steps);
    for _ in 0..steps {
        let t = std::time::Instant::now();
        step.step(&x, &target)
            .map_err(|e| kiln::Error::op("train step", e.to_string()))?;
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "{name}: median compiled step {:.3} ms over {steps} steps",
        times[steps / 2]
    );
    Ok(())
}
