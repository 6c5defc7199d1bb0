//! Quickstart, the main job: build simple_net and seed_cnn, load their
//! PyTorch weights (the fixtures' safetensors, when present), compile them
//! with `kiln::jit::compile`, check the compiled model against eager, and
//! print eager vs compiled timings at the latency and throughput shapes;
//! then trace and export one to a file that runs with no model code.
//!
//! Run: `cargo run --release --example quickstart`

use kiln::nn::prelude::*;
use kiln::{jit, zoo, DType, Tensor};
use std::path::Path;

fn ms(f: &mut dyn FnMut() -> kiln::Result<()>) -> kiln::Result<f64> {
    kiln::bench::median_ms(f, 0.3, 10)
}

fn main() -> kiln::Result<()> {
    // One worker per core, this thread being one of them (torch.set_num_threads).
    kiln::set_num_threads(std::thread::available_parallelism().map_or(1, |n| n.get()))?;
    kiln::manual_seed(0);
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    println!(
        "| model | input | eager ms | compiled ms | speed-up | compile ms | compiled vs eager |"
    );
    println!("|---|---|---|---|---|---|---|");
    for name in ["simple_net", "seed_cnn"] {
        // 1. The model, with PyTorch's weights (a state_dict in safetensors).
        let model = zoo::build(name)?;
        let weights = fixtures.join(format!("{name}.safetensors"));
        if weights.exists() {
            model.load_safetensors(&weights, true)?;
        }
        model.eval();
        let (latency, throughput) = zoo::shapes(name)?;
        for shape in [latency, throughput] {
            let x = Tensor::randn(&shape, DType::F32);
            // 2. Compile: trace once, optimize, fuse, lower to machine code.
            let compiled = jit::compile(&model, &[x.clone()])?;
            // 3. Compiled must equal eager (panics with the first
            //    differing node and its module scope otherwise).
            let report = kiln::testing::assert_same(&model, &compiled, &[x.clone()], 1e-5);
            // 4. Timings: median ms per forward, no_grad.
            let (eager, comp) = kiln::no_grad(|| -> kiln::Result<(f64, f64)> {
                let e = ms(&mut || {
                    std::hint::black_box(model.call(&x)?);
                    Ok(())
                })?;
                let c = ms(&mut || {
                    std::hint::black_box(compiled.forward(&[x.clone()])?);
                    Ok(())
                })?;
                Ok((e, c))
            })?;
            println!(
                "| {name} | {shape:?} | {eager:.3} | {comp:.3} | {:.2}x | {:.1} | {:.1e} |",
                eager / comp,
                compiled.compile_ms(),
                report.max_rel
            );
        }
    }

    // 5. Export: one file holding the graph and the weights, run with no
    //    model code (`kiln run` does the same from the command line).
    let model = zoo::build("seed_cnn")?;
    model.eval();
    let x = Tensor::randn(&[8, 1, 28, 28], DType::F32);
    let mut traced = jit::trace(&model, &[x.clone()])?;
    traced.run_passes()?;
    let path = std::env::temp_dir().join("quickstart_seed_cnn.kiln");
    traced.save(&path)?;
    let loaded = kiln::runtime::load(&path)?;
    let same = loaded.forward(&[x.clone()])?[0].to_vec::<f32>()
        == traced.forward(&[x.clone()])?[0].to_vec::<f32>();
    println!(
        "\nseed_cnn exported to {} ({} graph nodes) and reloaded: outputs identical = {same}",
        path.display(),
        traced.graph().node_count()
    );
    Ok(())
}
