//! Benchmark of the JIT pointwise kernel on the zoo's pointwise_chain
//! (python/zoo.py PointwiseChain) at 4096x1024 f32: compile time (ms) and
//! median run time (ms), plus the single-thread vs rayon timings at small
//! sizes that `PAR_WORK` is chosen from.
//!
//! `cargo run --release -p kiln-cranelift --example bench_pointwise`
//!
//! One run on the 2-core dev machine (Intel Xeon, AVX-512 host, Cranelift
//! emits 128-bit VEX code), 2026-11-25: compile 1.5 ms; run 19.6 ms median
//! on 2 threads (38.8 ms on one: ~9.3 ns per element, compute-bound: the
//! chain evaluates erf, three exps and three divisions per element); a
//! single relu kernel compiles in 0.1 ms. Per op, one thread, ns/element:
//! relu 0.28, exp 0.94, sigmoid 1.21, tanh 1.95, erf 3.03, gelu 3.22.

use kiln_cranelift::{PointwiseKernel, PAR_WORK};
use kiln_ir::{plan_fusion, Graph, InputKind, Op, OutputKind, TensorType, UnaryOp};
use std::time::Instant;

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn compile(rows: usize, cols: usize) -> (PointwiseKernel, f64) {
    let g = kiln_ir::sample_graphs::pointwise_chain(rows, cols);
    let plan = plan_fusion(&g).unwrap();
    let t = Instant::now();
    let k = PointwiseKernel::compile(&g, &plan.kernels[0]).unwrap();
    (k, t.elapsed().as_secs_f64() * 1e3)
}

/// Median ms of `k` run split across threads above `threshold` elements.
fn time_run(k: &PointwiseKernel, rows: usize, cols: usize, threshold: usize, reps: usize) -> f64 {
    let x: Vec<f32> = (0..rows * cols)
        .map(|i| (i % 1000) as f32 * 0.01 - 5.0)
        .collect();
    let scale = vec![1.1f32; cols];
    let shift = vec![0.1f32; cols];
    let mut out = vec![0.0f32; rows * cols];
    let mut ts = Vec::with_capacity(reps);
    for _ in 0..reps + 3 {
        let t = Instant::now();
        k.run_with_threshold(&[&x, &scale, &shift], &mut [&mut out], threshold)
            .unwrap();
        ts.push(t.elapsed().as_secs_f64() * 1e3);
    }
    median(ts[3..].to_vec())
}

fn main() {
    // Tiled (transcendentals as AVX-512/AVX2 tile calls) against all-inline
    // f32x4 code, one thread, interleaved so load changes hit both alike.
    {
        let (rows, cols) = (256, 1024);
        let g = kiln_ir::sample_graphs::pointwise_chain(rows, cols);
        let plan = plan_fusion(&g).unwrap();
        let tiled = PointwiseKernel::compile_tiles(&g, &plan.kernels[0], true).unwrap();
        let inline = PointwiseKernel::compile_tiles(&g, &plan.kernels[0], false).unwrap();
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for _ in 0..15 {
            a.push(time_run(&tiled, rows, cols, usize::MAX, 5));
            b.push(time_run(&inline, rows, cols, usize::MAX, 5));
        }
        let (a, b) = (median(a), median(b));
        let ns = |ms: f64| ms * 1e6 / (rows * cols) as f64;
        println!(
            "pointwise_chain {rows}x{cols}, 1 thread: tiled ({}) {a:.3} ms = {:.2} ns/element, inline {b:.3} ms = {:.2} ns/element, {:.2}x",
            tiled.tiled(),
            ns(a),
            ns(b),
            b / a
        );
    }
    let (rows, cols) = (4096, 1024);
    let compile_ms = median((0..7).map(|_| compile(rows, cols).1).collect());
    let (k, _) = compile(rows, cols);
    let run_ms = time_run(&k, rows, cols, k.par_threshold(), 30);
    let run1_ms = time_run(&k, rows, cols, usize::MAX, 10);
    let threads = rayon::current_num_threads();
    println!("pointwise_chain {rows}x{cols} f32 (cranelift JIT, {threads} threads)");
    println!("  compile: {compile_ms:.3} ms (median of 7)");
    println!("  run:     {run_ms:.3} ms (median of 30), single thread {run1_ms:.3} ms");
    println!(
        "  {:.2} GB/s read+write",
        (rows * cols * 8) as f64 / (run_ms * 1e-3) / 1e9
    );
    // A light kernel (one relu) for the other end of the threshold.
    println!("\nrelu: elements, 1 thread ms, rayon ms");
    let mut relu_th = 0;
    let mut relu_compile_ms = 0.0;
    for n in [16384usize, 32768, 65536, 131072, 262144, 524288] {
        let mut g = Graph::new();
        let t = TensorType::new(&[n], kiln_ir::DType::F32);
        let x = g.add_input(InputKind::User(0), t, "").unwrap();
        let y = g.add1(Op::Unary(UnaryOp::Relu), &[x], "").unwrap();
        g.add_output(y, OutputKind::User).unwrap();
        let plan = plan_fusion(&g).unwrap();
        let mut cts = Vec::new();
        for _ in 0..7 {
            let t = Instant::now();
            PointwiseKernel::compile(&g, &plan.kernels[0]).unwrap();
            cts.push(t.elapsed().as_secs_f64() * 1e3);
        }
        relu_compile_ms = median(cts);
        let k = PointwiseKernel::compile(&g, &plan.kernels[0]).unwrap();
        let xs: Vec<f32> = (0..n).map(|i| i as f32 - 1000.0).collect();
        let mut out = vec![0.0f32; n];
        let mut tm = |th: usize| {
            let mut ts = Vec::new();
            for _ in 0..300 {
                let t = Instant::now();
                k.run_with_threshold(&[&xs], &mut [&mut out], th).unwrap();
                ts.push(t.elapsed().as_secs_f64() * 1e3);
            }
            median(ts)
        };
        let (s, p) = (tm(usize::MAX), tm(0));
        relu_th = k.par_threshold();
        println!("  {n:>7} {s:.4} {p:.4}");
    }
    println!("  (relu par_threshold {relu_th} elements, compile {relu_compile_ms:.3} ms)");
    println!(
        "\npointwise_chain (PAR_WORK = {PAR_WORK}, par_threshold {} elements): elements, 1 thread ms, rayon ms",
        k.par_threshold()
    );
    for n in [2048usize, 4096, 8192, 16384, 32768, 65536, 131072] {
        let (k, _) = compile(n / 256, 256);
        let s = time_run(&k, n / 256, 256, usize::MAX, 300);
        let p = time_run(&k, n / 256, 256, 0, 300);
        println!("  {n:>7} {s:.4} {p:.4}");
    }
}
