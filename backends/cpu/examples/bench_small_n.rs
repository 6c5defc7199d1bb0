//! Micro-benchmark of `matmul_epilogue` on the weight-gradient products
//! with few output features that compiled training runs (`h^T @ g`, h
//! `[batch, in]`, g `[batch, out]`): the outer-product kernel
//! (`matmul/small_n.rs`) against gemm, alternating in one run. Run with
//! `cargo run --release -p kiln-cpu --example bench_small_n [-- reps]`.

mod common;
use common::{data, time};
use kiln_cpu::matmul::{force_small_n, matmul_epilogue, MatLayout};

fn main() {
    let reps: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    println!(
        "| {:<34} | {:<6} | {:>8} |",
        "h^T @ g (m x k x n)", "kernel", "ms"
    );
    println!("|{:-<36}|{:-<8}|{:-<10}|", "", "", "");
    // complex_net fc, simple_net layer2, net_with_dropout-like sizes.
    for (batch, inp, out) in [
        (1024, 1152, 10),
        (4096, 256, 10),
        (8192, 50, 4),
        (64, 256, 10),
    ] {
        let h = data(batch * inp, 1);
        let g = data(batch * out, 2);
        let (m, k, n) = (inp, batch, out);
        let la = MatLayout::contiguous(batch, inp).t();
        let lb = MatLayout::contiguous(batch, out);
        let mut c = vec![0.0f32; m * n];
        for (force, name) in [
            (Some(true), "outer"),
            (Some(false), "gemm"),
            (Some(true), "outer"),
            (Some(false), "gemm"),
        ] {
            force_small_n(force);
            let t = time(reps, || {
                matmul_epilogue(&mut c, &h, la, &g, lb, m, k, n, None, None)
            });
            println!(
                "| {:<34} | {name:<6} | {:8.3} |",
                format!("{m}x{k}x{n}"),
                t * 1e3
            );
        }
        force_small_n(None);
    }
}
