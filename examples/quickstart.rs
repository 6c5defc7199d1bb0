//! Quickstart: build tensors, run eager ops with autograd, read gradients
//! and time a few kernels. (The model / trace / compile steps join this
//! example as those features land.)
//!
//! Run: `cargo run --release --example quickstart`

use kiln::{DType, Tensor};
use std::time::Instant;

fn main() -> kiln::Result<()> {
    kiln::manual_seed(0);

    // A leaf that requires grad, a broadcasting expression, a reduction.
    let x = Tensor::randn(&[4, 3], DType::F32).requires_grad_(true)?;
    let w = Tensor::linspace(0.5, 1.5, 3, DType::F32)?.requires_grad_(true)?;
    let y = x.mul(&w)?.add_scalar(1.0)?.tanh()?;
    let loss = y.square()?.mean()?;
    println!("x        = {:?}", x);
    println!(
        "loss     = {:.6} (grad_fn {})",
        loss.item()?,
        loss.grad_fn_name().unwrap()
    );

    loss.backward()?;
    println!("x.grad   = {:?}", x.grad().unwrap().to_vec::<f32>());
    println!("w.grad   = {:?}", w.grad().unwrap().to_vec::<f32>());

    // Views share storage, as in PyTorch.
    let base = Tensor::arange(0.0, 12.0, 1.0, DType::F32)?.reshape(&[3, 4])?;
    let t = base.t()?;
    println!(
        "base.t(): shape {:?} strides {:?} contiguous {} shares storage {}",
        t.shape(),
        t.strides(),
        t.is_contiguous(),
        t.shares_storage(&base)
    );

    // A quick timing of an elementwise chain on 4096x1024.
    let a = Tensor::randn(&[4096, 1024], DType::F32);
    let s = Tensor::linspace(0.5, 1.5, 1024, DType::F32)?;
    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        let z = a.mul(&s)?.gelu()?.mul(&a.sigmoid()?)?;
        std::hint::black_box(z);
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / reps as f64;
    println!("eager x*s -> gelu * sigmoid(x) on [4096, 1024]: {ms:.2} ms per call");
    Ok(())
}
