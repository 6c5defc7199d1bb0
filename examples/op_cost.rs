//! Per-op cost of small eager ops (no_grad): median microseconds per call
//! of a few ops on tiny tensors, where the kernel is negligible and what is
//! measured is the frontend's overhead (validation, allocation, autograd
//! and trace checks, Tensor creation).
//!
//! Run: `cargo run --release --example op_cost`

use kiln::{DType, Tensor};
use std::time::Instant;

fn us(mut f: impl FnMut() -> kiln::Result<Tensor>) -> kiln::Result<f64> {
    for _ in 0..200 {
        std::hint::black_box(f()?);
    }
    let mut t: Vec<f64> = (0..2000)
        .map(|_| {
            let s = Instant::now();
            std::hint::black_box(f().expect("op"));
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    Ok(t[t.len() / 2])
}

fn main() -> kiln::Result<()> {
    let a = Tensor::randn(&[2, 16, 256], DType::F32);
    let b = Tensor::randn(&[2, 16, 256], DType::F32);
    let s = Tensor::randn(&[4], DType::F32);
    let w = Tensor::randn(&[256, 256], DType::F32);
    println!("| op | median us |\n|---|---|");
    kiln::no_grad(|| -> kiln::Result<()> {
        for (name, v) in [
            ("add [4]+[4]", us(|| s.add(&s))?),
            ("add [2,16,256]", us(|| a.add(&b))?),
            ("mul_scalar [4]", us(|| s.mul_scalar(2.0))?),
            ("relu [4]", us(|| s.relu())?),
            ("view [2,16,256]->[32,256]", us(|| a.view(&[32, 256]))?),
            ("transpose(1,2)", us(|| a.transpose(1, 2))?),
            (
                "contiguous of transpose",
                us(|| a.transpose(1, 2)?.contiguous())?,
            ),
            ("softmax(-1) [2,16,256]", us(|| a.softmax(-1))?),
            (
                "matmul [32,256]@[256,256]",
                us(|| a.view(&[32, 256])?.matmul(&w))?,
            ),
        ] {
            println!("| {name} | {v:.2} |");
        }
        Ok(())
    })?;
    Ok(())
}
