//! Quickstart: build a model, load PyTorch weights, run it eagerly, trace
//! it into a graph, compare traced with eager, export it and run the file
//! with no model code, and print timings.
//!
//! Run: `cargo run --release --example quickstart`

use kiln::nn::prelude::*;
use kiln::{jit, zoo, DType, Tensor};
use std::path::Path;
use std::time::Instant;

fn ms(f: &mut dyn FnMut() -> kiln::Result<()>) -> kiln::Result<f64> {
    kiln::bench::median_ms(f, 0.3, 10)
}

fn main() -> kiln::Result<()> {
    kiln::manual_seed(0);

    // 1. A model, with PyTorch's weights (a state_dict saved by safetensors).
    let model = zoo::build("transformer_block")?;
    let weights =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/transformer_block.safetensors");
    let missing = model.load_safetensors(&weights, true)?;
    model.eval();
    println!("{}", model.to_repr());
    println!(
        "loaded {} tensors ({missing:?})\n",
        model.state_dict().len()
    );

    // 2. Eager forward, with autograd.
    let x = Tensor::randn(&[2, 16, 256], DType::F32);
    let y = model.call(&x)?;
    y.sum()?.backward()?;
    let g = model.get_parameter("attn.qkv.weight")?.grad().unwrap();
    println!(
        "eager output {:?}, grad_fn {:?}, |d qkv.weight| max {:.4}",
        y.shape(),
        y.grad_fn_name(),
        g.abs()?.max()?.item()?
    );

    // 3. Trace once into a graph; the graph binds parameters by name.
    let t0 = Instant::now();
    let mut traced = jit::trace(&model, &[x.clone()])?;
    let trace_ms = t0.elapsed().as_secs_f64() * 1e3;
    let before = traced.graph().node_count();
    traced.run_passes()?;
    let plan = traced.fusion_plan()?;
    println!(
        "traced in {trace_ms:.2} ms: {before} nodes, {} after passes, {} fused kernels",
        traced.graph().node_count(),
        plan.compute_kernel_count()
    );

    // 4. Traced vs eager on a new input.
    let x2 = Tensor::randn(&[2, 16, 256], DType::F32);
    let check = jit::check_trace(&traced, &[x2.clone()], 1e-5)?;
    println!(
        "traced vs eager on a new input: max relative difference {:.2e}",
        check.max_rel_diff
    );

    // 5. Export to one file and run it with no model code.
    let path = std::env::temp_dir().join("quickstart_transformer_block.kiln");
    traced.save(&path)?;
    let loaded = kiln::runtime::load(&path)?;
    let same = loaded.forward(&[x2.clone()])?[0].to_vec::<f32>()
        == traced.forward(&[x2.clone()])?[0].to_vec::<f32>();
    println!(
        "exported to {} and reloaded: outputs identical = {same}",
        path.display()
    );

    // 6. Timings (median of repeated calls, no_grad).
    kiln::no_grad(|| -> kiln::Result<()> {
        let eager = ms(&mut || {
            std::hint::black_box(model.call(&x2)?);
            Ok(())
        })?;
        let interp = ms(&mut || {
            std::hint::black_box(traced.forward(&[x2.clone()])?);
            Ok(())
        })?;
        let compiled = jit::compile(&model, &[x2.clone()])?;
        let check = kiln::verify::rel_err(&compiled.forward(&[x2.clone()])?[0], &model.call(&x2)?);
        let comp = ms(&mut || {
            std::hint::black_box(compiled.forward(&[x2.clone()])?);
            Ok(())
        })?;
        println!("\n| path | ms per forward |\n|---|---|");
        println!("| eager | {eager:.3} |");
        println!("| traced graph (reference interpreter) | {interp:.3} |");
        println!(
            "| compiled ({} pointwise kernels as Cranelift machine code, compiled in {:.1} ms; vs eager {check:.1e}) | {comp:.3} |",
            compiled.jit_kernel_count(),
            compiled.compile_ms()
        );
        Ok(())
    })?;
    Ok(())
}
