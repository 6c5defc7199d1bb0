//! Prints the compiled program's steps of a zoo model (debugging aid).
//! `cargo run --release --example step_list -- transformer_block [--large]`
use kiln::nn::prelude::*;

fn main() -> kiln::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let name = args
        .get(1)
        .map(String::as_str)
        .unwrap_or("transformer_block");
    let large = args.iter().any(|a| a == "--large");
    let m = kiln::zoo::build(name)?;
    m.eval();
    let (small, big) = kiln::zoo::shapes(name)?;
    let shape = if large { big } else { small };
    let x = kiln::Tensor::randn(&shape, kiln::DType::F32);
    let c = kiln::jit::compile(&m, &[x])?;
    println!("{name} {shape:?}: {:?}", c.first().step_names());
    if args.iter().any(|a| a == "--plan") {
        let g = c.first().traced().graph().clone();
        let plan = kiln::ir::plan_fusion(&g).map_err(|e| kiln::Error::Format(e.to_string()))?;
        for k in &plan.kernels {
            let ops: Vec<&str> = k.nodes.iter().map(|&n| g.node(n).op.name()).collect();
            println!("  {:?}: {}", k.kind, ops.join(" "));
        }
    }
    Ok(())
}
