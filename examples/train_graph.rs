//! Prints the forward and backward graphs of a zoo model's compiled training
//! step at its throughput shape, and the interpreter fallbacks (debugging aid).
//! `cargo run --release --example train_graph -- complex_net`
use kiln::nn::prelude::*;

fn main() -> kiln::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = args.get(1).map(String::as_str).unwrap_or("complex_net");
    let m = kiln::zoo::build(name)?;
    m.train(true);
    let (_, shape) = kiln::zoo::shapes(name)?;
    let x = kiln::Tensor::randn(&shape, kiln::DType::F32);
    let c = kiln::jit::compile_for_training(&m, &[x.clone()])?;
    let v = c.variant(&[x])?;
    println!(
        "== forward\n{}",
        kiln::ir::printer::listing(v.forward_graph())
    );
    println!(
        "== backward\n{}",
        kiln::ir::printer::listing(v.backward_graph())
    );
    println!("fallbacks: {:?}", v.fallbacks());
    Ok(())
}
